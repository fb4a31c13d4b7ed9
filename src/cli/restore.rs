//! `pitr restore`: a backup written into a new data directory, with the recovery settings
//! that bring it to the target. Everything that can be checked is checked before the first
//! byte is written: the target, the backup that reaches it, and continuous WAL between.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use repo::manifest::ManifestError;
use repo::objects::ObjectError;
use restore::files::{FilesError, INCOMPLETE_MARKER};
use restore::plan::{Plan, PlanError, TimelineChoice};
use restore::recovery::{shell_quote, Action};
use restore::restorer::{Progress, RestoreError, RestoreOptions, StartSettings};
use restore::start::StartError;
use restore::target::{parse_time, Target};
use serde_json::json;

use super::repo_args::{open_failure, RepoArgs};
use super::{mb, Exit, Failure};
use repo::slots::KeySetting;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// The new data directory (must not exist, or be empty)
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    #[command(flatten)]
    target: TargetArgs,
    /// What the server does at the target [default: PostgreSQL's, pause]
    #[arg(long, value_name = "ACTION", value_parser = ["promote", "pause", "shutdown"])]
    target_action: Option<String>,
    /// archive_mode of the restored server: preserve keeps the backup's (always becomes
    /// on: with always it would archive every restored segment again), off turns it off
    #[arg(long, value_name = "MODE", value_parser = ["preserve", "off"], default_value = "preserve")]
    archive_mode: String,
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
    #[arg(long, value_name = "DIR", env = "PITR_PG_BIN")]
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

/// Which backup and where recovery stops (restore and drill).
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("target").multiple(false))]
pub struct TargetArgs {
    /// The backup to restore: an id from pitr list, or latest [default: the newest that
    /// ends before the target]
    #[arg(long, value_name = "ID")]
    pub(super) backup: Option<String>,
    /// Recover to this time: "2026-05-14 03:00:00+00", RFC 3339, or "15m ago"
    #[arg(long, group = "target", value_name = "TIME")]
    pub(super) target_time: Option<String>,
    /// Recover to this WAL position (16/B374D848)
    #[arg(long, group = "target", value_name = "LSN")]
    pub(super) target_lsn: Option<String>,
    /// Recover to the commit of this transaction
    #[arg(long, group = "target", value_name = "XID")]
    pub(super) target_xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point)
    #[arg(long, group = "target", value_name = "NAME")]
    pub(super) target_name: Option<String>,
    /// Stop as soon as the backup is consistent
    #[arg(long, group = "target")]
    pub(super) target_immediate: bool,
    /// Stop just before the target instead of just after it
    #[arg(long)]
    pub(super) target_exclusive: bool,
    /// The timeline to recover along: latest, current (the backup's) or a number
    #[arg(long, value_name = "TIMELINE", default_value = "latest")]
    pub(super) target_timeline: String,
}

pub(super) fn target(args: &TargetArgs) -> Result<Target, Failure> {
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

pub(super) fn timeline(text: &str) -> Result<TimelineChoice, Failure> {
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

fn plan_failure(e: PlanError) -> Failure {
    let exit = match &e {
        PlanError::Unreachable { .. } | PlanError::NoBackup(_) => Exit::Unreachable,
        PlanError::Object(ObjectError::Corrupt { .. }) | PlanError::Bad(_) => Exit::Corrupt,
        PlanError::Manifest(m) => manifest_exit(m),
        _ => Exit::Repository,
    };
    let hint = e.hint();
    let f = Failure::new(exit, e.to_string());
    match hint {
        Some(h) => f.hint(h),
        None => f,
    }
}

/// A manifest or chunk table piece damaged or of a newer format is corrupt input; one that
/// could not be read is the repository's failure.
fn manifest_exit(e: &ManifestError) -> Exit {
    match e {
        ManifestError::Bad { .. }
        | ManifestError::UnknownFormat { .. }
        | ManifestError::Object(ObjectError::Corrupt { .. }) => Exit::Corrupt,
        _ => Exit::Repository,
    }
}

fn files_failure(e: FilesError, to: &Path) -> Failure {
    let exit = match &e {
        FilesError::NotEmpty(_) => Exit::BadInput,
        FilesError::Object {
            source: ObjectError::Corrupt { .. },
            ..
        }
        | FilesError::Manifest(_) => Exit::Corrupt,
        FilesError::Io { .. } => Exit::BadInput,
        FilesError::Table(m) => manifest_exit(m),
        _ => Exit::Repository,
    };
    let f = Failure::new(exit, format!("restore failed: {e}"));
    if matches!(e, FilesError::NotEmpty(_)) {
        f.hint("restore into a new or empty directory")
    } else if !to.join(INCOMPLETE_MARKER).exists() {
        // Refused before anything was laid out.
        f
    } else {
        f.hint(format!(
            "{} is incomplete and PostgreSQL will not start on it (no global/pg_control, {INCOMPLETE_MARKER} present); remove it and restore again",
            to.display()
        ))
    }
}

pub(super) fn restore_failure(e: RestoreError, to: &Path) -> Failure {
    match e {
        RestoreError::Open(e) => open_failure(e),
        RestoreError::Plan(e) => plan_failure(e),
        RestoreError::NotEmpty(_) => Failure::new(Exit::BadInput, e.to_string())
            .hint("restore into a new or empty directory"),
        RestoreError::NoServer(_) => Failure::new(Exit::BadInput, e.to_string())
            .hint("name the directory of the server binaries with --pg-bin or PITR_PG_BIN"),
        RestoreError::Files(e) => files_failure(e, to),
        RestoreError::Busy(_) => Failure::new(Exit::Busy, e.to_string()).hint(
            "nothing was written; run the restore again: it chooses among the backups that stay",
        ),
        RestoreError::Start(e @ StartError::Promote(_)) => {
            Failure::new(Exit::StartFailed, e.to_string()).hint(format!(
                "the server is running on {}, recovering (or paused at the target): promote it with pg_ctl promote -D {} once the cause is fixed",
                to.display(),
                to.display()
            ))
        }
        RestoreError::Start(e) => Failure::new(Exit::StartFailed, e.to_string()).hint(format!(
            "the files are restored; see {} and start the server on {} yourself once fixed",
            restore::dest::start_log(to).display(),
            to.display()
        )),
    }
}

/// The restore_command: this binary by absolute path, with the repository and the
/// non-secret S3 settings of this environment (credentials stay in the server's own).
pub(super) fn restore_command(repo: &str, key: &KeySetting) -> Result<String, Failure> {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "pitr".into());
    let mut words = Vec::new();
    for var in [
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_PROFILE",
        "PITR_S3_PATH_STYLE",
        "PITR_S3_CONDITIONAL_PUT",
        "PITR_S3_CHECKSUMS",
        "AWS_CA_BUNDLE",
        "AWS_ENDPOINT_URL_KMS",
    ] {
        if let Ok(v) = std::env::var(var) {
            words.push(format!("{var}={}", shell_quote(&v)));
        }
    }
    words.push(shell_quote(&exe));
    words.push("wal-fetch".into());
    words.push("--repo".into());
    words.push(shell_quote(repo));
    // The key's source, never the key: a passphrase reaches the server's restore_command
    // only through its environment (PITR_PASSPHRASE); a KMS slot needs nothing unless one
    // was named.
    match key {
        KeySetting::File(p) => {
            words.push("--key-file".into());
            words.push(shell_quote(&p.display().to_string()));
        }
        KeySetting::Command(c) => {
            words.push("--key-command".into());
            words.push(shell_quote(c));
        }
        KeySetting::Kms(k) => {
            words.push("--key-kms".into());
            words.push(shell_quote(k));
        }
        KeySetting::Passphrase(_) | KeySetting::None => {}
    }
    if words.iter().any(|w| w.contains(['\n', '\r'])) {
        return Err(Failure::new(
            Exit::BadInput,
            "the restore_command would hold a line break (in the key command, the repository or an S3 setting)",
        )
        .hint("PostgreSQL's configuration values are one line; use a key command without line breaks, or a script"));
    }
    // PostgreSQL reads `%` as a placeholder (16 and later refuse an unknown one): every
    // literal one is doubled, then the two placeholders are added.
    let mut command: String = words.join(" ").replace('%', "%%");
    command.push_str(" %f %p");
    Ok(command)
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

/// `PITR_DEBUG_STOP=before-pg-control` (a test hook, not for users): the process dies the
/// way a kill would, just before pg_control goes in place.
fn stop_hook() -> Option<fn()> {
    (std::env::var("PITR_DEBUG_STOP").as_deref() == Ok("before-pg-control"))
        .then_some((|| std::process::exit(137)) as fn())
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let target = target(&args.target)?;
    check_can_start(&args)?;
    let start_settings = server_options(&args)?;
    let timeline_choice = timeline(&args.target.target_timeline)?;
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
    let key = args.repo.key()?;
    let options = RestoreOptions {
        url,
        restore_command: restore_command(&args.repo.url_text()?, &key)?,
        key,
        to: args.to.clone(),
        backup: args.target.backup.clone(),
        target: target.clone(),
        exclusive: args.target.target_exclusive,
        timeline: timeline_choice,
        timeline_text: args.target.target_timeline.clone(),
        action: args.target_action.as_deref().map(|a| match a {
            "promote" => Action::Promote,
            "shutdown" => Action::Shutdown,
            _ => Action::Pause,
        }),
        tablespace_map: map,
        tablespaces_under: None,
        prefetch_wal: args.prefetch_wal,
        parallel: args.parallel,
        start: args.start.then(|| StartSettings {
            pg_bin: args.pg_bin.clone(),
            settings: start_settings,
            settings_up_to: Vec::new(),
        }),
        before_pg_control: stop_hook(),
        archive_mode: match args.archive_mode.as_str() {
            "off" => restore::recovery::ArchiveMode::Off,
            _ => restore::recovery::ArchiveMode::Preserve,
        },
    };
    let progress = Printer::new(&args);
    let runtime = super::runtime(Exit::Repository)?;
    let r = runtime
        .block_on(restore::restorer::restore(&options, &progress))
        .map_err(|e| restore_failure(e, &args.to))?;
    let (m, plan, report, seconds) = (&r.plan.backup, &r.plan, &r.files, r.seconds);
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
                "plan_seconds": r.plan_seconds,
                "write_seconds": report.write_seconds,
                "flush_seconds": report.flush_seconds,
                "timeline": plan.timeline,
                "first_segment": plan.first_segment,
                "last_segment": plan.last_segment,
                "segments": plan.segments,
                "server": r.server.as_ref().map(|(s, log)| json!({
                    "pid": s.pid,
                    "log": log.display().to_string(),
                    "recovery_seconds": s.seconds,
                    "promoted_without_checkpoint_wait": s.signalled_after.is_some(),
                })),
                "rto_seconds": r.rto_seconds,
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
            match &r.server {
                None => "; start PostgreSQL on it to recover".to_owned(),
                Some((s, log)) => format!(
                    "; PostgreSQL (pid {}, log {}) recovered and accepts writes after {:.1} s more: {:.1} s in all",
                    s.pid,
                    log.display(),
                    s.seconds,
                    r.rto_seconds.unwrap_or_default()
                ),
            }
        );
    }
    Ok(())
}

/// What `pitr restore` prints while it works: the plan, a progress line while the files
/// are written (every 200 ms on a terminal, every 10 s otherwise), and while a started
/// server recovers, the segment it asked for last (as the spool records it).
struct Printer {
    json: bool,
    tty: bool,
    repo: String,
    key: super::repo_args::KeyArgs,
    to: PathBuf,
    wal: Mutex<Vec<String>>,
    ticker: Mutex<Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>>,
    recovery: Mutex<(Duration, bool)>,
}

impl Printer {
    fn new(args: &Args) -> Printer {
        Printer {
            json: args.json,
            tty: std::io::stderr().is_terminal() && !args.json,
            repo: args.repo.url_text().unwrap_or_default(),
            key: args.repo.key.clone(),
            to: args.to.clone(),
            wal: Mutex::new(Vec::new()),
            ticker: Mutex::new(None),
            recovery: Mutex::new((Duration::ZERO, false)),
        }
    }

    fn line(&self, line: &str) {
        if self.tty {
            eprint!("\r\x1b[2Kpitr: restore: {line}");
        } else if !self.json {
            eprintln!("pitr: restore: {line}");
        }
    }
}

impl Progress for Printer {
    fn planned(&self, plan: &Plan) {
        let m = &plan.backup;
        if let Some((missing, newest)) = &plan.stranded {
            eprintln!(
                "pitr: warning: WAL segment {missing} is not in the repository, but later WAL (up to {newest}) is: recovery will stop before {missing}\nHINT:  if {missing} can still be archived (pg_wal of the old server, another copy), archive it and restore again"
            );
        }
        if !self.json {
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
        if let Ok(mut wal) = self.wal.lock() {
            wal.clone_from(&plan.wal);
        }
    }

    fn writing(&self, plan: &Plan, written: Arc<AtomicU64>) {
        if self.json {
            return;
        }
        let (tty, total) = (self.tty, plan.backup.size);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let every = Duration::from_millis(if tty { 200 } else { 10_000 });
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut next = every;
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if t0.elapsed() < next {
                    continue;
                }
                next += every;
                let w = written.load(Ordering::Relaxed);
                let rate = w as f64 / t0.elapsed().as_secs_f64().max(0.001);
                let line = format!("{} of {} at {}/s", mb(w), mb(total), mb(rate as u64));
                if tty {
                    eprint!("\r\x1b[2Kpitr: restore: {line}");
                } else {
                    eprintln!("pitr: restore: {line}");
                }
            }
        });
        if let Ok(mut t) = self.ticker.lock() {
            *t = Some((stop, handle));
        }
    }

    fn written(&self) {
        let ticker = self.ticker.lock().ok().and_then(|mut t| t.take());
        if let Some((stop, handle)) = ticker {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
            if self.tty {
                eprintln!();
            }
        }
    }

    fn staged(&self, done: usize, of: usize) {
        if !self.json {
            eprintln!("pitr: restore: staged {done} of {of} WAL segments for recovery");
        }
    }

    fn staging_failed(&self, e: &restore::wal_fetch::FetchError) {
        eprintln!("pitr: warning: could not stage WAL for recovery: {e}");
    }

    fn carry_on(&self, dir: &Path) {
        super::wal_fetch::start_prefetch(&self.repo, &self.key, dir, 16, 4);
    }

    fn starting(&self, seconds: f64) {
        if !self.json {
            eprintln!(
                "pitr: restore: restored in {seconds:.1} s; starting PostgreSQL on {} to recover",
                self.to.display()
            );
        }
    }

    fn recovering(&self, elapsed: Duration) {
        let every = Duration::from_millis(if self.tty { 500 } else { 10_000 });
        let Ok(mut state) = self.recovery.lock() else {
            return;
        };
        let (last, seen) = &mut *state;
        if elapsed < *last + every {
            return;
        }
        *last = elapsed;
        let spool = restore::spool::Spool::at(&restore::spool::default_dir(
            &self.to.join("pg_wal").join("RECOVERYXLOG"),
        ));
        let wal = self.wal.lock().map(|w| w.clone()).unwrap_or_default();
        let at = match spool
            .wanted()
            .and_then(|w| wal.iter().position(|n| *n == w).map(|i| (i, w)))
        {
            Some((i, w)) => {
                *seen = true;
                format!("replaying WAL segment {} of {} ({w})", i + 1, wal.len())
            }
            None if *seen => "ending recovery".to_owned(),
            None => "starting".to_owned(),
        };
        self.line(&format!(
            "recovering for {:.0} s: {at}",
            elapsed.as_secs_f64()
        ));
    }

    fn recovered(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
