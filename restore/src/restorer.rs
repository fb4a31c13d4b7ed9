//! A whole restore, as one sequence: open the repository, plan (the backup, continuous WAL
//! to the target), check every entry of the backup's manifest against where it would be
//! written, write the files (staging WAL alongside when asked), write the recovery
//! settings, make the restore final (links, flush, pg_control, marker: [`finish_files`]),
//! and optionally start the server and promote it. `pitr restore` turns flags into
//! [`RestoreOptions`] and prints the [`Restored`] report; a drill or a copy check calls this
//! same function.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use repo::codec::Codec;
use repo::repository::{OpenError, Repository};
use repo::slots::KeySetting;
use repo::url::RepoUrl;

use crate::files::{
    check_manifest, check_table, finish_files, lay_out_files, write_files, FilesError,
    FilesOptions, FilesReport,
};
use crate::plan::{plan, Plan, PlanError, TimelineChoice};
use crate::recovery::{self, Action, RecoveryConfig};
use crate::start::{start_and_promote, Promotion, StartError, StartOptions, Started};
use crate::target::Target;

/// WAL segments `prefetch_wal` stages at most while the files are written (pg_wal's disk is
/// not for all the WAL of a long restore; the prefetch worker keeps a window ahead after).
const STAGE_MAX: usize = 64;

/// What to restore, where, and what to do after.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The repository.
    pub url: RepoUrl,
    /// Its key, when encrypted.
    pub key: KeySetting,
    /// The new data directory (absent or empty; absolute).
    pub to: PathBuf,
    /// A backup id, or `latest`; None: the newest that reaches the target.
    pub backup: Option<String>,
    /// Where recovery stops.
    pub target: Target,
    /// Stop just before the target.
    pub exclusive: bool,
    /// The timeline to recover along, and how the recovery settings spell it.
    pub timeline: TimelineChoice,
    /// `latest`, `current` or a number, as given.
    pub timeline_text: String,
    /// What the server does at the target (None: PostgreSQL's default).
    pub action: Option<Action>,
    /// Where each tablespace goes instead of where it was.
    pub tablespace_map: HashMap<u32, PathBuf>,
    /// Every tablespace `tablespace_map` does not name goes to `DIR/<oid>` (a drill:
    /// nothing outside its own directory), not where it was.
    pub tablespaces_under: Option<PathBuf>,
    /// Stage WAL into wal-fetch's spool while the files are written.
    pub prefetch_wal: bool,
    /// Ranged reads at once.
    pub parallel: usize,
    /// The restore_command written into the recovery settings.
    pub restore_command: String,
    /// Start the server and promote it ([`StartSettings`]).
    pub start: Option<StartSettings>,
    /// What becomes of the backup's archive_mode.
    pub archive_mode: crate::recovery::ArchiveMode,
    /// A test hook: called just before pg_control goes in place.
    pub before_pg_control: Option<fn()>,
}

/// How `--start` starts the restored server.
#[derive(Debug, Clone)]
pub struct StartSettings {
    /// The directory of pg_ctl (None: found for the backup's major version).
    pub pg_bin: Option<PathBuf>,
    /// Settings for this start (`-c name=value`).
    pub settings: Vec<(String, String)>,
    /// Settings for this start when the server's major version is at most the number
    /// given (settings later versions no longer know).
    pub settings_up_to: Vec<(u32, String, String)>,
}

/// What a restore reports as it goes; every method has a do-nothing default.
pub trait Progress: Send + Sync {
    /// The plan is made; nothing is written yet.
    fn planned(&self, _plan: &Plan) {}
    /// Files are being written; `written` counts their plaintext bytes.
    fn writing(&self, _plan: &Plan, _written: Arc<AtomicU64>) {}
    /// The files are written (or failed): progress lines about them stop.
    fn written(&self) {}
    /// Segments staged for recovery (with `prefetch_wal`).
    fn staged(&self, _done: usize, _of: usize) {}
    /// Staging failed (recovery fetches what is missing itself).
    fn staging_failed(&self, _e: &crate::wal_fetch::FetchError) {}
    /// The spool at `dir` holds what was staged; a prefetch worker may carry on from there.
    fn carry_on(&self, _dir: &Path) {}
    /// The restore is final after `seconds`; the server is about to start.
    fn starting(&self, _seconds: f64) {}
    /// Every so often while the started server recovers: the time since it started.
    fn recovering(&self, _elapsed: Duration) {}
    /// Recovery is over (or failed): progress lines about it stop.
    fn recovered(&self) {}
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default)]
pub struct Quiet;
impl Progress for Quiet {}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// What was planned.
    pub plan: Plan,
    /// What was written.
    pub files: FilesReport,
    /// Seconds to plan.
    pub plan_seconds: f64,
    /// Seconds until the directory was final.
    pub seconds: f64,
    /// With `start`: the server, and the file its log went to.
    pub server: Option<(Started, PathBuf)>,
    /// With `start`: seconds from the beginning until the server accepted writes.
    pub rto_seconds: Option<f64>,
}

/// Why a restore failed. Up to [`RestoreError::Files`] nothing PostgreSQL would start on
/// has been written.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The repository cannot be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// No backup and WAL reach the target, or the repository could not be read.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The target directory is not empty (nothing was written).
    #[error("directory \"{0}\" exists and is not empty")]
    NotEmpty(PathBuf),
    /// The server binaries for `start` are not there (nothing was written).
    #[error("cannot start the restored server: {0}")]
    NoServer(String),
    /// Writing the files failed, or the manifest is damaged.
    #[error("restore failed: {0}")]
    Files(#[from] FilesError),
    /// The files are restored, but the server did not come up or could not be promoted.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The backup chosen is being removed by a running expire or delete (nothing written).
    #[error("backup {0} is being removed by a running pitr expire or delete")]
    Busy(String),
}

/// Restores as `o` says (module docs), reporting to `progress`.
pub async fn restore(
    o: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Restored, RestoreError> {
    let started = Instant::now();
    if std::fs::read_dir(&o.to).is_ok_and(|mut d| d.next().is_some()) {
        return Err(RestoreError::NotEmpty(o.to.clone()));
    }
    let repo = Repository::open(
        &o.url,
        &o.key,
        None,
        Arc::new(Codec::with_default_threads()),
    )
    .await?;
    let marker = repo::markers::reader(repo.objects(), "restore").await;
    let planned = plan(
        &repo,
        &o.target,
        o.exclusive,
        &o.timeline,
        o.backup.as_deref(),
    )
    .await;
    let plan = match planned {
        Ok(p) => p,
        Err(e) => {
            if let Some(m) = marker {
                m.finish().await;
            }
            return Err(e.into());
        }
    };
    if let Some(m) = &marker {
        let relied = m
            .rely_on(
                vec![plan.backup.id.clone()],
                Some(plan.first_segment.clone()),
            )
            .await;
        // Named now; and still there (an expire that removed it before this marker was
        // seen has finished: nothing here is read from it then).
        let still = match &relied {
            Ok(()) => {
                repo::manifest::generations(repo.objects().storage().as_ref(), &plan.backup.id)
                    .await
                    .map_or(true, |g| g.contains(&plan.backup.generation))
            }
            Err(_) => false,
        };
        if !still {
            if let Some(m) = marker {
                m.finish().await;
            }
            let ids = relied.err().unwrap_or_else(|| vec![plan.backup.id.clone()]);
            return Err(RestoreError::Busy(ids.join(", ")));
        }
    }
    let result = restore_planned(o, progress, &repo, plan, started).await;
    if let Some(marker) = marker {
        marker.finish().await;
    }
    result
}

async fn restore_planned(
    o: &RestoreOptions,
    progress: &dyn Progress,
    repo: &Repository,
    plan: Plan,
    started: Instant,
) -> Result<Restored, RestoreError> {
    let m = &plan.backup;
    let mut files_options = FilesOptions::new(o.to.clone());
    files_options.tablespace_map = o.tablespace_map.clone();
    if let Some(under) = &o.tablespaces_under {
        for t in &m.tablespaces {
            files_options
                .tablespace_map
                .entry(t.oid)
                .or_insert_with(|| under.join(t.oid.to_string()));
        }
    }
    files_options.fetches = o.parallel.max(1);
    files_options.before_pg_control = o.before_pg_control;
    // The whole manifest, the server binaries, then the chunk table (read through once),
    // before anything is written.
    let places = check_manifest(m, &files_options)?;
    let pg_bin = match &o.start {
        Some(s) => Some(
            crate::start::find_bin(m.pg_version, s.pg_bin.as_deref())
                .map_err(RestoreError::NoServer)?,
        ),
        None => None,
    };
    check_table(repo.objects(), m).await?;
    let plan_seconds = started.elapsed().as_secs_f64();
    progress.planned(&plan);

    let written = Arc::new(AtomicU64::new(0));
    progress.writing(&plan, written.clone());
    let files = write_with_staging(repo, &plan, o, &files_options, places, written, progress).await;
    progress.written();
    let (mut report, laid_out) = files?;

    let config = RecoveryConfig {
        restore_command: o.restore_command.clone(),
        target: o.target.clone(),
        exclusive: o.exclusive,
        timeline: Some(o.timeline_text.clone()),
        action: if o.start.is_some() {
            Some(Action::Promote)
        } else {
            o.action
        },
        // Without a target, a started server recovers as a standby: promoted when the
        // archive has no next segment (see crate::start).
        standby: o.start.is_some() && matches!(o.target, Target::End),
        archive_mode: o.archive_mode,
    };
    let to = o.to.clone();
    report.flush_seconds = finish_files(m, &files_options, laid_out, move || {
        recovery::write(&to, &config)
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();

    let server = match (&o.start, pg_bin) {
        (Some(s), Some(bin)) => {
            progress.starting(seconds);
            let r = start(o, s, bin, &plan, progress);
            progress.recovered();
            Some(r?)
        }
        _ => None,
    };
    Ok(Restored {
        rto_seconds: server.as_ref().map(|_| started.elapsed().as_secs_f64()),
        plan,
        files: report,
        plan_seconds,
        seconds,
        server,
    })
}

/// Lays out and writes the files; with `prefetch_wal`, stages WAL into the spool meanwhile,
/// and once the files are written hands the spool over to recovery (history answers, and
/// the prefetch worker to carry on).
async fn write_with_staging(
    repo: &Repository,
    plan: &Plan,
    o: &RestoreOptions,
    files_options: &FilesOptions,
    places: crate::dest::Places,
    written: Arc<AtomicU64>,
    progress: &dyn Progress,
) -> Result<(FilesReport, crate::files::LaidOut), FilesError> {
    let m = &plan.backup;
    let laid_out = lay_out_files(m, places).await?;
    let spool = crate::spool::default_dir(&o.to.join("pg_wal").join("RECOVERYXLOG"));
    // WAL is staged while the files are written, no longer: the prefetch worker wal-fetch
    // uses carries on from where staging got to. Without prefetch_wal nothing is staged
    // (on a small machine that slows the files more than it speeds replay), but the worker
    // still starts when they are done.
    let stage_list: Vec<String> = if o.prefetch_wal {
        plan.wal.iter().take(STAGE_MAX).cloned().collect()
    } else {
        Vec::new()
    };
    let staging = (!stage_list.is_empty()).then(|| {
        let (repo, spool, wal) = (repo.clone(), spool.clone(), stage_list.clone());
        tokio::spawn(async move { crate::wal_fetch::stage(&repo, &spool, &wal, 4).await })
    });
    let files = write_files(repo.objects(), m, files_options, &laid_out, written).await;
    let staged = match staging {
        None => Some(0),
        Some(staging) => {
            staging.abort();
            match staging.await {
                Ok(Ok(n)) => Some(n),
                Ok(Err(e)) => {
                    progress.staging_failed(&e);
                    None
                }
                Err(_) => None, // stopped while still staging
            }
        }
    };
    let report = files?;
    // Staging was cut short by the files being done, or reached its cap: the prefetch
    // worker carries on from there.
    let cut = staged.is_none_or(|n| n == stage_list.len());
    if let Ok(seg) = walfmt::WalSegmentSize::new(repo.config().wal_segment_size) {
        let (dir, url, wal) = (spool.clone(), repo.url().to_string(), plan.wal.clone());
        // Recovery's first calls are history probes: answered from the spool, they do not
        // wait on a repository the prefetch worker is busy with.
        let history = crate::wal_fetch::history_answers(
            repo,
            plan,
            m.timeline,
            matches!(o.timeline, TimelineChoice::Latest),
        )
        .await
        .ok();
        let handed = tokio::task::spawn_blocking(move || {
            let handed = crate::wal_fetch::hand_over(&dir, &url, &wal, seg);
            if let Some((files, absent)) = history {
                let _ = crate::spool::Spool::open(&dir, &url)
                    .and_then(|s| s.stage_history(&files, absent.as_deref()));
            }
            handed
        })
        .await;
        if let Ok(Ok((done, carry_on))) = handed {
            if o.prefetch_wal {
                progress.staged(done, plan.wal.len());
            }
            if cut && carry_on {
                progress.carry_on(&spool);
            }
        }
    }
    Ok((report, laid_out))
}

/// `start`: the server started on the restored directory and promoted at the target.
fn start(
    o: &RestoreOptions,
    s: &StartSettings,
    bin: PathBuf,
    plan: &Plan,
    progress: &dyn Progress,
) -> Result<(Started, PathBuf), RestoreError> {
    // A cluster whose configuration lives outside its data directory (Debian's
    // /etc/postgresql) was backed up without postgresql.conf: the server does not start
    // without one, and every setting it needs here comes with the start.
    let conf = o.to.join("postgresql.conf");
    if !conf.exists() {
        crate::spool::write_durably(
            &o.to,
            "postgresql.conf",
            b"# written by pitr restore --start: the backup held no postgresql.conf\n",
        )
        .map_err(|source| StartError::Spawn {
            program: format!("write {}", conf.display()),
            source,
        })?;
    }
    let log = crate::dest::start_log(&o.to);
    if let Some(dir) = log.parent() {
        crate::dest::create_dirs_below(&o.to, dir).map_err(|source| StartError::Spawn {
            program: format!("mkdir {}", dir.display()),
            source,
        })?;
    }
    let options = StartOptions {
        major: plan.backup.pg_version,
        bin,
        data_dir: o.to.clone(),
        log: log.clone(),
        settings: s
            .settings
            .iter()
            .cloned()
            .chain(
                s.settings_up_to
                    .iter()
                    .filter(|(max, _, _)| plan.backup.pg_version <= *max)
                    .map(|(_, k, v)| (k.clone(), v.clone())),
            )
            .collect(),
        promotion: if matches!(o.target, Target::End) {
            Promotion::AtEndOfArchive
        } else {
            Promotion::AtTarget
        },
    };
    let started = start_and_promote(&options, &mut |elapsed| progress.recovering(elapsed))?;
    Ok((started, log))
}
