//! `pitr restore`: a backup written into a new data directory, with the recovery settings
//! that bring it to the target. Everything that can be checked is checked before the first
//! byte is written: the target, the backup that reaches it, and continuous WAL between.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use repo::codec::Codec;
use repo::manifest::ManifestError;
use repo::objects::ObjectError;
use repo::repository::Repository;
use restore::files::{lay_out_files, write_files, FilesError, FilesOptions, INCOMPLETE_MARKER};
use restore::plan::{plan, PlanError, TimelineChoice};
use restore::recovery::{self, shell_quote, Action, RecoveryConfig};
use restore::target::{parse_time, Target};
use serde_json::json;

use super::repo_args::{open_failure, RepoArgs};
use super::{mb, Exit, Failure};

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("target").multiple(false))]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// The new data directory (must not exist, or be empty)
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// The backup to restore: an id from pitr list, or latest [default: the newest that
    /// ends before the target]
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Recover to this time: "2026-05-14 03:00:00+00", RFC 3339, or "15m ago"
    #[arg(long, group = "target", value_name = "TIME")]
    target_time: Option<String>,
    /// Recover to this WAL position (16/B374D848)
    #[arg(long, group = "target", value_name = "LSN")]
    target_lsn: Option<String>,
    /// Recover to the commit of this transaction
    #[arg(long, group = "target", value_name = "XID")]
    target_xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point)
    #[arg(long, group = "target", value_name = "NAME")]
    target_name: Option<String>,
    /// Stop as soon as the backup is consistent
    #[arg(long, group = "target")]
    target_immediate: bool,
    /// Stop just before the target instead of just after it
    #[arg(long)]
    target_exclusive: bool,
    /// What the server does at the target [default: PostgreSQL's, pause]
    #[arg(long, value_name = "ACTION", value_parser = ["promote", "pause", "shutdown"])]
    target_action: Option<String>,
    /// The timeline to recover along: latest, current (the backup's) or a number
    #[arg(long, value_name = "TIMELINE", default_value = "latest")]
    target_timeline: String,
    /// Put tablespace OID at PATH instead of where it was (repeatable)
    #[arg(long, value_name = "OID=PATH")]
    tablespace_map: Vec<String>,
    /// Stage the WAL recovery needs into wal-fetch's spool (pg_wal/.pitr/fetch) while the
    /// files are written, so replay starts without waiting on the repository
    #[arg(long)]
    prefetch_wal: bool,
    /// Then start PostgreSQL on the directory and return once it has reached the target
    /// and accepts writes; it is promoted as a standby is, without waiting for the
    /// end-of-recovery checkpoint
    #[arg(long)]
    start: bool,
    /// With --start: the directory of pg_ctl [default: the backup's major version under
    /// /usr/lib/postgresql/N/bin or /usr/pgsql-N/bin, or pg_ctl on PATH]
    #[arg(long, value_name = "DIR", env = "PITR_PG_BIN", requires = "start")]
    pg_bin: Option<PathBuf>,
    /// With --start: a server setting for this start (port=5433, say; repeatable)
    #[arg(long, value_name = "NAME=VALUE", requires = "start")]
    server_option: Vec<String>,
    /// Ranged reads from the repository at once
    #[arg(
        long,
        default_value_t = 8,
        value_name = "N",
        env = "PITR_RESTORE_PARALLEL"
    )]
    parallel: usize,
    /// Print the result as one JSON object
    #[arg(long)]
    json: bool,
}

fn target(args: &Args) -> Result<Target, Failure> {
    let bad = |m: String, h: &str| Failure::new(Exit::BadInput, m).hint(h);
    Ok(if let Some(t) = &args.target_time {
        Target::Time(parse_time(t).map_err(|e| bad(e.to_string(), e.hint()))?)
    } else if let Some(l) = &args.target_lsn {
        Target::Lsn(l.parse().map_err(|_| {
            bad(
                format!("invalid target LSN \"{l}\""),
                "an LSN looks like 16/B374D848",
            )
        })?)
    } else if let Some(x) = &args.target_xid {
        if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                format!("invalid target xid \"{x}\""),
                "a transaction id is a number",
            ));
        }
        Target::Xid(x.clone())
    } else if let Some(n) = &args.target_name {
        Target::Name(n.clone())
    } else if args.target_immediate {
        Target::Immediate
    } else {
        Target::End
    })
}

fn timeline(text: &str) -> Result<TimelineChoice, Failure> {
    match text {
        "latest" => Ok(TimelineChoice::Latest),
        "current" => Ok(TimelineChoice::Current),
        n => n
            .parse()
            .ok()
            .filter(|&n: &u32| n > 0)
            .map(TimelineChoice::Id)
            .ok_or_else(|| {
                Failure::new(Exit::BadInput, format!("invalid target timeline \"{n}\""))
                    .hint("latest, current, or a timeline number")
            }),
    }
}

/// WAL segments `--prefetch-wal` stages at most while the files are written.
const STAGE_MAX: usize = 64;

fn plan_failure(e: PlanError) -> Failure {
    let exit = match &e {
        PlanError::Unreachable { .. } | PlanError::NoBackup(_) => Exit::Unreachable,
        PlanError::Object(ObjectError::Corrupt { .. })
        | PlanError::Bad(_)
        | PlanError::Manifest(
            ManifestError::Bad { .. }
            | ManifestError::UnknownFormat { .. }
            | ManifestError::Object(ObjectError::Corrupt { .. }),
        ) => Exit::Corrupt,
        _ => Exit::Repository,
    };
    let hint = e.hint();
    let f = Failure::new(exit, e.to_string());
    match hint {
        Some(h) => f.hint(h),
        None => f,
    }
}

fn files_failure(e: FilesError, to: &std::path::Path) -> Failure {
    let exit = match &e {
        FilesError::NotEmpty(_) => Exit::BadInput,
        FilesError::Object {
            source: ObjectError::Corrupt { .. },
            ..
        }
        | FilesError::Manifest(_) => Exit::Corrupt,
        FilesError::Io { .. } => Exit::BadInput,
        _ => Exit::Repository,
    };
    let f = Failure::new(exit, format!("restore failed: {e}"));
    if matches!(e, FilesError::NotEmpty(_)) {
        f.hint("restore into a new or empty directory")
    } else {
        f.hint(format!(
            "{} is incomplete and PostgreSQL will not start on it (no global/pg_control, {INCOMPLETE_MARKER} present); remove it and restore again",
            to.display()
        ))
    }
}

/// The restore_command: this binary by absolute path, with the repository and the
/// non-secret S3 settings of this environment (credentials stay in the server's own).
fn restore_command(repo: &str) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "pitr".into());
    let mut words = Vec::new();
    for var in [
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "PITR_S3_PATH_STYLE",
        "PITR_S3_CONDITIONAL_PUT",
        "PITR_S3_CHECKSUMS",
        "AWS_CA_BUNDLE",
    ] {
        if let Ok(v) = std::env::var(var) {
            words.push(format!("{var}={}", shell_quote(&v)));
        }
    }
    words.push(shell_quote(&exe));
    words.push("wal-fetch".into());
    words.push("--repo".into());
    words.push(shell_quote(repo));
    words.push("%f".into());
    words.push("%p".into());
    words.join(" ")
}

/// `--server-option NAME=VALUE`s, checked.
fn server_options(args: &Args) -> Result<Vec<(String, String)>, Failure> {
    args.server_option
        .iter()
        .map(|o| match o.split_once('=') {
            Some((k, v))
                if !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') =>
            {
                Ok((k.to_owned(), v.to_owned()))
            }
            _ => Err(
                Failure::new(Exit::BadInput, format!("invalid --server-option \"{o}\""))
                    .hint("NAME=VALUE, as in postgresql.conf: port=5433"),
            ),
        })
        .collect()
}

/// `--start` runs pg_ctl, which PostgreSQL does not let root run.
fn check_can_start(args: &Args) -> Result<(), Failure> {
    if !args.start {
        return Ok(());
    }
    if args
        .target_action
        .as_deref()
        .is_some_and(|a| a != "promote")
    {
        return Err(Failure::new(
            Exit::BadInput,
            "--start promotes the restored server: it cannot be combined with --target-action pause or shutdown",
        )
        .hint("leave out --start and start the server yourself"));
    }
    if rustix::process::geteuid().is_root() {
        return Err(Failure::new(
            Exit::BadInput,
            "--start cannot start PostgreSQL as root",
        )
        .hint("run pitr restore --start as the OS user the server runs as (postgres, say), or restore without --start and start the server as that user"));
    }
    Ok(())
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let target = target(&args)?;
    check_can_start(&args)?;
    let start_settings = server_options(&args)?;
    let timeline_choice = timeline(&args.target_timeline)?;
    let mut map = HashMap::new();
    for m in &args.tablespace_map {
        let parsed = m.split_once('=').and_then(|(oid, path)| {
            let p = PathBuf::from(path);
            (p.is_absolute()).then_some((oid.parse::<u32>().ok()?, p))
        });
        let (oid, path) = parsed.ok_or_else(|| {
            Failure::new(Exit::BadInput, format!("invalid --tablespace-map \"{m}\""))
                .hint("OID=/absolute/path, the OID as pitr list --json or pg_tablespace shows it")
        })?;
        map.insert(oid, path);
    }
    if !args.to.is_absolute() {
        return Err(Failure::new(
            Exit::BadInput,
            format!("--to \"{}\" is not an absolute path", args.to.display()),
        ));
    }
    if std::fs::read_dir(&args.to).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Failure::new(
            Exit::BadInput,
            format!(
                "directory \"{}\" exists and is not empty",
                args.to.display()
            ),
        )
        .hint("restore into a new or empty directory"));
    }
    let runtime = super::runtime(Exit::Repository)?;
    let started = Instant::now();
    let (plan, report, plan_seconds, pg_bin) = runtime.block_on(async {
        let repo = Repository::open(&url, None, Arc::new(Codec::with_default_threads()))
            .await
            .map_err(open_failure)?;
        let plan = plan(
            &repo,
            &target,
            args.target_exclusive,
            &timeline_choice,
            args.backup.as_deref(),
        )
        .await
        .map_err(plan_failure)?;
        let plan_seconds = started.elapsed().as_secs_f64();
        let m = &plan.backup;
        let pg_bin = if args.start {
            Some(restore::start::find_bin(m.pg_version, args.pg_bin.as_deref()).map_err(|e| {
                Failure::new(Exit::BadInput, format!("cannot start the restored server: {e}"))
                    .hint("name the directory of the server binaries with --pg-bin or PITR_PG_BIN")
            })?)
        } else {
            None
        };
        if let Some((missing, newest)) = &plan.stranded {
            eprintln!(
                "pitr: warning: WAL segment {missing} is not in the repository, but later WAL (up to {newest}) is: recovery will stop before {missing}\nHINT:  if {missing} can still be archived (pg_wal of the old server, another copy), archive it and restore again"
            );
        }
        if !args.json {
            eprintln!(
                "pitr: restore: backup {} ({}, ended {}), WAL {} .. {} ({} segments) on timeline {}",
                m.id,
                mb(m.size),
                m.stop_time,
                plan.first_segment,
                plan.last_segment,
                plan.segments,
                plan.timeline
            );
        }
        let mut options = FilesOptions::new(args.to.clone());
        options.tablespace_map = map.clone();
        options.fetches = args.parallel.max(1);
        let written = Arc::new(AtomicU64::new(0));
        let tty = std::io::stderr().is_terminal() && !args.json;
        let total = m.size;
        let ticker = {
            let written = written.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(if tty { 200 } else { 10_000 })).await;
                    let w = written.load(Ordering::Relaxed);
                    let rate = w as f64 / t0.elapsed().as_secs_f64().max(0.001);
                    let line = format!(
                        "{} of {} at {}/s",
                        mb(w),
                        mb(total),
                        mb(rate as u64)
                    );
                    if tty {
                        eprint!("\r\x1b[2Kpitr: restore: {line}");
                    } else {
                        eprintln!("pitr: restore: {line}");
                    }
                }
            })
        };
        let result = async {
            let laid_out = lay_out_files(m, &options).await?;
            let spool = restore::spool::default_dir(&args.to.join("pg_wal").join("RECOVERYXLOG"));
            // WAL is staged while the files are written, no longer: then the prefetch
            // worker wal-fetch uses carries on from where staging got to, so the restore
            // ends with its files and recovery starts on a filling spool.
            // At most STAGE_MAX segments: pg_wal's disk is not for all the WAL of a long
            // restore; the worker keeps a window of 16 ahead of replay after that.
            // Without --prefetch-wal nothing is staged while the files are written (on a
            // small machine that slows the files more than it speeds replay), but the
            // worker still starts when they are done: the first segments are in the spool
            // by the time PostgreSQL asks for them.
            let stage_list: Vec<String> = if args.prefetch_wal {
                plan.wal.iter().take(STAGE_MAX).cloned().collect()
            } else {
                Vec::new()
            };
            let staging = (!stage_list.is_empty()).then(|| {
                let (repo, spool, wal) = (repo.clone(), spool.clone(), stage_list.clone());
                tokio::spawn(async move { restore::wal_fetch::stage(&repo, &spool, &wal, 4).await })
            });
            let files = write_files(repo.objects(), m, &options, laid_out, written).await;
            let staged = match staging {
                None => Some(0),
                Some(staging) => {
                    staging.abort();
                    match staging.await {
                        Ok(Ok(n)) => Some(n),
                        Ok(Err(e)) => {
                            eprintln!("pitr: warning: could not stage WAL for recovery: {e}");
                            None
                        }
                        Err(_) => None, // stopped while still staging
                    }
                }
            };
            // Staging was cut short by the files being done, or reached its cap: the
            // prefetch worker carries on from there.
            let cut = staged.is_none_or(|n| n == stage_list.len());
            let seg = walfmt::WalSegmentSize::new(repo.config().wal_segment_size).ok();
            if let (Ok(_), Some(seg)) = (&files, seg) {
                let (dir, url, wal) = (spool.clone(), repo.url().to_string(), plan.wal.clone());
                // Recovery's first calls are history probes: answered from the spool, they
                // do not wait on a repository the prefetch worker is busy with.
                let history = restore::wal_fetch::history_answers(
                    &repo,
                    &plan,
                    m.timeline,
                    matches!(timeline_choice, TimelineChoice::Latest),
                )
                .await
                .ok();
                let handed = tokio::task::spawn_blocking(move || {
                    let handed = restore::wal_fetch::hand_over(&dir, &url, &wal, seg);
                    if let Some((files, absent)) = history {
                        let _ = restore::spool::Spool::open(&dir, &url)
                            .and_then(|s| s.stage_history(&files, absent.as_deref()));
                    }
                    handed
                })
                .await;
                if let Ok(Ok((done, carry_on))) = handed {
                    if !args.json && args.prefetch_wal {
                        eprintln!("pitr: restore: staged {done} of {} WAL segments for recovery", plan.wal.len());
                    }
                    if cut && carry_on {
                        super::wal_fetch::start_prefetch(&args.repo.repo, &spool, 16, 4);
                    }
                }
            }
            files
        }
        .await;
        ticker.abort();
        if tty {
            eprintln!();
        }
        let report = result.map_err(|e| files_failure(e, &args.to))?;
        Ok::<_, Failure>((plan, report, plan_seconds, pg_bin))
    })?;
    let action = args.target_action.as_deref().map(|a| match a {
        "promote" => Action::Promote,
        "shutdown" => Action::Shutdown,
        _ => Action::Pause,
    });
    let config = RecoveryConfig {
        restore_command: restore_command(&args.repo.repo),
        target: target.clone(),
        exclusive: args.target_exclusive,
        timeline: Some(args.target_timeline.clone()),
        action: if args.start {
            Some(Action::Promote)
        } else {
            action
        },
        // Without a target, --start recovers as a standby: promoted when the archive has
        // no next segment (see restore::start).
        standby: args.start && matches!(target, Target::End),
    };
    recovery::write(&args.to, &config).map_err(|e| {
        Failure::new(
            Exit::BadInput,
            format!(
                "could not write the recovery settings in \"{}\": {e}",
                args.to.display()
            ),
        )
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let m = &plan.backup;
    let server = match &pg_bin {
        None => None,
        Some(bin) => {
            if !args.json {
                eprintln!(
                    "pitr: restore: restored in {seconds:.1} s; starting PostgreSQL on {} to recover",
                    args.to.display()
                );
            }
            Some(start(
                &args,
                bin,
                start_settings,
                &target,
                m.pg_version,
                &plan.wal,
            )?)
        }
    };
    let rto = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            json!({
                "backup": m.id,
                "to": args.to.display().to_string(),
                "files": report.files,
                "bytes": report.bytes,
                "fetched": report.fetched,
                "requests": report.requests,
                "seconds": seconds,
                "plan_seconds": plan_seconds,
                "write_seconds": report.write_seconds,
                "flush_seconds": report.flush_seconds,
                "timeline": plan.timeline,
                "first_segment": plan.first_segment,
                "last_segment": plan.last_segment,
                "segments": plan.segments,
                "server": server.as_ref().map(|(s, log)| json!({
                    "pid": s.pid,
                    "log": log.display().to_string(),
                    "recovery_seconds": s.seconds,
                    "promoted_without_checkpoint_wait": s.signalled_after.is_some(),
                })),
                "rto_seconds": server.as_ref().map(|_| rto),
            })
        );
    } else {
        println!(
            "restored backup {} into {}: {} files, {} in {seconds:.1} s ({}/s); recovery replays WAL {} .. {}{}{}",
            m.id,
            args.to.display(),
            report.files,
            mb(report.bytes),
            mb((report.bytes as f64 / seconds.max(0.001)) as u64),
            plan.first_segment,
            plan.last_segment,
            plan.last_xact_time
                .as_ref()
                .map_or(String::new(), |t| format!(" (latest archived transaction {t})")),
            match &server {
                None => "; start PostgreSQL on it to recover".to_owned(),
                Some((s, log)) => format!(
                    "; PostgreSQL (pid {}, log {}) recovered and accepts writes after {:.1} s more: {rto:.1} s in all",
                    s.pid,
                    log.display(),
                    s.seconds
                ),
            }
        );
    }
    Ok(())
}

/// `--start`: the server started on the restored directory and promoted at the target.
fn start(
    args: &Args,
    bin: &std::path::Path,
    settings: Vec<(String, String)>,
    target: &Target,
    major: u32,
    wal: &[String],
) -> Result<(restore::start::Started, PathBuf), Failure> {
    use restore::start::{start_and_promote, Promotion, StartOptions};
    let log_dir = args.to.join("log");
    let log = log_dir.join("pitr-start.log");
    let failed = |e: String| {
        Failure::new(Exit::StartFailed, e).hint(format!(
            "the files are restored; see {} and start the server on {} yourself once fixed",
            log.display(),
            args.to.display()
        ))
    };
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| failed(format!("could not create \"{}\": {e}", log_dir.display())))?;
    let options = StartOptions {
        major,
        bin: bin.to_owned(),
        data_dir: args.to.clone(),
        log: log.clone(),
        settings,
        promotion: if matches!(target, Target::End) {
            Promotion::AtEndOfArchive
        } else {
            Promotion::AtTarget
        },
    };
    // Progress: the segment PostgreSQL asked wal-fetch for last, as the spool records it.
    let tty = std::io::stderr().is_terminal() && !args.json;
    let every = Duration::from_millis(if tty { 500 } else { 10_000 });
    let spool = restore::spool::Spool::at(&restore::spool::default_dir(
        &args.to.join("pg_wal").join("RECOVERYXLOG"),
    ));
    let mut last = Duration::ZERO;
    let mut seen = false;
    let mut tick = |elapsed: Duration| {
        if elapsed < last + every {
            return;
        }
        last = elapsed;
        let at = match spool
            .wanted()
            .and_then(|w| wal.iter().position(|n| *n == w).map(|i| (i, w)))
        {
            Some((i, w)) => {
                seen = true;
                format!("replaying WAL segment {} of {} ({w})", i + 1, wal.len())
            }
            None if seen => "ending recovery".to_owned(),
            None => "starting".to_owned(),
        };
        let line = format!("recovering for {:.0} s: {at}", elapsed.as_secs_f64());
        if tty {
            eprint!("\r\x1b[2Kpitr: restore: {line}");
        } else if !args.json {
            eprintln!("pitr: restore: {line}");
        }
    };
    let started = start_and_promote(&options, &mut tick);
    if tty {
        eprintln!();
    }
    let started = started.map_err(|e| match e {
        restore::start::StartError::Promote(_) => Failure::new(Exit::StartFailed, e.to_string())
            .hint(format!(
                "the server is running on {}, recovering (or paused at the target): promote it with pg_ctl promote -D {} once the cause is fixed",
                args.to.display(),
                args.to.display()
            )),
        e => failed(e.to_string()),
    })?;
    Ok((started, log))
}
