//! `pitr drill`: restore somewhere else, bring the server up, run the smoke checks, say how
//! long it took, tear it all down; optionally record the result in the repository and
//! write node_exporter metrics. A watchdog process (`pitr drill-watchdog`, hidden) stops
//! the server and removes the directory if the drill dies on the way.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use repo::codec::Codec;
use repo::repository::Repository;
use restore::drill::{DrillOptions, DrillReport};
use restore::plan::Plan;
use restore::restorer::Progress;
use walfmt::PgTimestamp;

use super::repo_args::{open_failure, RepoArgs};
use super::restore::{restore_command, restore_failure, target, timeline, TargetArgs};
use super::{mb, Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// A check: SQL that passes when it succeeds and the first column of its first row is
    /// true (repeatable)
    #[arg(long, value_name = "SQL")]
    check: Vec<String>,
    /// Checks from a file, one per line (blank lines and lines starting with -- or # are
    /// left out)
    #[arg(long, value_name = "FILE", env = "PITR_DRILL_CHECK_FILE")]
    check_file: Option<PathBuf>,
    /// Run amcheck's bt_index_check on every B-tree index of every database
    #[arg(long, env = "PITR_DRILL_AMCHECK", overrides_with = "no_amcheck")]
    amcheck: bool,
    /// No amcheck, whatever the configuration file or PITR_DRILL_AMCHECK says
    #[arg(long, overrides_with = "amcheck")]
    no_amcheck: bool,
    /// Where the drill's directory is made [default: the temp dir]
    #[arg(long, value_name = "DIR", env = "PITR_DRILL_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// The server's port (it only names its socket file: nothing listens on TCP)
    /// [default: one free on this host, so that nothing the drilled server connects to by
    /// port reaches another server here]
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// How long one check statement may run (0s: no limit); a check waiting on a lock
    /// fails after 60 s
    #[arg(long, value_name = "DURATION", default_value = "1h", env = "PITR_DRILL_CHECK_TIMEOUT", value_parser = humantime::parse_duration)]
    check_timeout: std::time::Duration,
    /// The directory of pg_ctl [default: the backup's major version under
    /// /usr/lib/postgresql/N/bin or /usr/pgsql-N/bin, or pg_ctl on PATH]
    #[arg(long, value_name = "DIR", env = "PITR_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// The role the checks connect as [default: PGUSER, this OS user, then postgres]
    #[arg(long, value_name = "ROLE", env = "PITR_DRILL_USER")]
    user: Option<String>,
    /// Leave the server running and its directory in place, and say how to connect
    #[arg(long)]
    keep: bool,
    /// Store the report in the repository (drills/), shown by pitr list
    #[arg(long, env = "PITR_DRILL_RECORD", overrides_with = "no_record")]
    record: bool,
    /// Do not record, whatever the configuration file or PITR_DRILL_RECORD says
    #[arg(long, overrides_with = "record")]
    no_record: bool,
    /// Write pitr_drill_* gauges to this file (node_exporter's textfile collector)
    #[arg(long, value_name = "PATH", env = "PITR_DRILL_METRICS_FILE")]
    metrics_file: Option<PathBuf>,
    /// Ranged reads from the repository at once
    #[arg(
        long,
        default_value_t = 8,
        value_name = "N",
        env = "PITR_RESTORE_PARALLEL"
    )]
    parallel: usize,
    /// Print the report as one JSON object
    #[arg(long)]
    json: bool,
}

/// `pitr drill-watchdog DIR` (started by the drill, not by users).
#[derive(Debug, clap::Args)]
pub struct WatchdogArgs {
    dir: PathBuf,
}

/// Lines on stderr as the restore goes.
struct Said;

impl Progress for Said {
    fn planned(&self, plan: &Plan) {
        eprintln!(
            "pitr: drill: restoring backup {} ({}), then WAL {} .. {}",
            plan.backup.id,
            mb(plan.backup.size),
            plan.first_segment,
            plan.last_segment
        );
    }
    fn starting(&self, seconds: f64) {
        eprintln!("pitr: drill: files restored in {seconds:.1} s; starting the server");
    }
}

fn checks(args: &Args) -> Result<Vec<String>, Failure> {
    let mut out = args.check.clone();
    if let Some(file) = &args.check_file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Failure::new(
                Exit::BadInput,
                format!("could not read --check-file \"{}\": {e}", file.display()),
            )
        })?;
        out.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("--") && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    Ok(out)
}

/// Makes the drill's own directory (0700) under `base` (made absolute).
fn make_dir(base: &Path, port: u16) -> Result<PathBuf, Failure> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::fs::canonicalize(base).map_err(|e| {
        Failure::new(
            Exit::BadInput,
            format!("--work-dir \"{}\": {e}", base.display()),
        )
        .hint("--work-dir names an existing directory this user can write to")
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = base.join(format!("pitr-drill-{}-{nanos:08x}", std::process::id()));
    restore::drill::check_dir(&dir, port).map_err(|e| {
        Failure::new(Exit::BadInput, e)
            .hint("choose another --work-dir (short, without commas or quotes)")
    })?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            Failure::new(
                Exit::BadInput,
                format!(
                    "could not create the drill's directory \"{}\": {e}",
                    dir.display()
                ),
            )
            .hint("--work-dir names an existing directory this user can write to")
        })?;
    Ok(dir)
}

/// A port number no one listens on here now (it names the drilled server's socket).
fn free_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_or(55432, |a| a.port())
}

/// Starts the watchdog on `dir`: a process of its own group (a Ctrl-C, or a kill of the
/// drill's process group, does not reach it) that tears down when its stdin ends without "keep".
fn start_watchdog(dir: &Path) -> Option<std::process::ChildStdin> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().ok()?;
    let mut cmd = Command::new(exe);
    cmd.arg("drill-watchdog")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.process_group(0);
    cmd.spawn().ok()?.stdin.take()
}

pub fn run_watchdog(args: WatchdogArgs) -> Result<(), Failure> {
    restore::drill::watchdog(&args.dir, std::io::stdin().lock())
        .map_err(|e| Failure::new(Exit::BadInput, format!("drill watchdog: {e}")))
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let key = args.repo.key()?;
    let target = target(&args.target)?;
    let timeline_choice = timeline(&args.target.target_timeline)?;
    let checks = checks(&args)?;
    if rustix::process::geteuid().is_root() {
        return Err(
            Failure::new(Exit::BadInput, "pitr drill cannot start PostgreSQL as root")
                .hint("run pitr drill as the OS user the server runs as (postgres, say)"),
        );
    }
    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let port = args.port.unwrap_or_else(free_port);
    let dir = make_dir(&base, port)?;
    let Some(watchdog) = start_watchdog(&dir) else {
        let _ = std::fs::remove_dir(&dir);
        return Err(Failure::new(
            Exit::BadInput,
            "could not start the drill's watchdog (pitr drill-watchdog)",
        )
        .hint("without it a drill that dies would leave its server running; check that this pitr binary can be run again"));
    };
    let options = DrillOptions {
        url: url.clone(),
        restore_command: restore_command(&args.repo.url_text()?, &key)?,
        key: key.clone(),
        backup: args.target.backup.clone(),
        target,
        exclusive: args.target.target_exclusive,
        timeline: timeline_choice,
        timeline_text: args.target.target_timeline.clone(),
        dir: dir.clone(),
        port,
        pg_bin: args.pg_bin.clone(),
        parallel: args.parallel,
        checks,
        amcheck: args.amcheck && !args.no_amcheck,
        user: args.user.clone(),
        check_timeout: args.check_timeout,
    };
    let started_at = PgTimestamp::now();
    let runtime = super::runtime(Exit::Repository)?;
    let outcome = runtime.block_on(restore::drill::drill(&options, &Said));
    let (report, failure) = match outcome {
        Ok(report) => (report, None),
        Err(e) => {
            let failure = match e {
                restore::drill::DrillError::Restore(e) => {
                    let mut f = restore_failure(e, &dir.join("data"));
                    if f.exit == Exit::StartFailed
                        || f.hint
                            .as_deref()
                            .is_some_and(|h| h.contains(&*dir.to_string_lossy()))
                    {
                        f.hint = Some(if args.keep {
                            format!("the drill's directory is kept: {}", dir.display())
                        } else {
                            "run the drill again with --keep to keep its directory and the server's log".into()
                        });
                    }
                    f
                }
                e @ restore::drill::DrillError::Setup { .. } => {
                    Failure::new(Exit::BadInput, e.to_string())
                }
            };
            let report = DrillReport {
                started_at: started_at.to_pg_utc(),
                passed: false,
                error: Some(failure.message.clone()),
                ..Default::default()
            };
            (report, Some(failure))
        }
    };
    let keep = args.keep;
    let mut watchdog = watchdog;
    if keep {
        let _ = watchdog.write_all(b"keep\n");
    } else if let Err(e) = restore::drill::teardown(&dir) {
        eprintln!(
            "pitr: drill: WARNING: could not remove the drill's directory {}: {e}",
            dir.display()
        );
    }
    drop(watchdog);
    let mut record_failure = None;
    if args.record && !args.no_record {
        let recorded = runtime.block_on(async {
            let repo = Repository::open(&url, &key, None, Arc::new(Codec::new(1, 4)))
                .await
                .map_err(open_failure)?;
            restore::drill::record(repo.objects(), &report)
                .await
                .map_err(|e| {
                    Failure::new(Exit::Repository, format!("could not record the drill: {e}"))
                })
        });
        match recorded {
            Ok(k) => eprintln!("pitr: drill: recorded as {k}"),
            Err(f) => record_failure = Some(f),
        }
    }
    let mut metrics_failure = None;
    if let Some(path) = &args.metrics_file {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics_failure = write_metrics(path, &restore::drill::metrics(&report, now)).err();
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else if failure.is_none() {
        print_report(&report);
    }
    if keep {
        let pg_ctl = report
            .pg_version
            .and_then(|v| restore::start::find_bin(v, args.pg_bin.as_deref()).ok())
            .map_or("pg_ctl".into(), |b| b.join("pg_ctl").display().to_string());
        println!(
            "the drill's directory is kept: {}; its server, if it runs: psql -h {} -p {} postgres; when done: {pg_ctl} -D {} -m immediate stop; rm -rf {}",
            dir.display(),
            dir.join("socket").display(),
            port,
            dir.join("data").display(),
            dir.display()
        );
    }
    for f in record_failure.iter().chain(metrics_failure.iter()) {
        if failure.is_some() || !report.passed {
            eprintln!("pitr: drill: WARNING: {}", f.message);
        }
    }
    if let Some(f) = failure {
        return Err(f);
    }
    if !report.passed {
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.sql.as_str())
            .collect();
        return Err(Failure::new(
            Exit::DrillFailed,
            format!(
                "drill failed: {} check(s) did not pass: {}",
                failed.len(),
                failed.join("; ")
            ),
        ));
    }
    match record_failure.or(metrics_failure) {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// The metrics file, replaced whole (a temp file beside it, renamed): node_exporter never
/// reads half of one.
fn write_metrics(path: &Path, text: &str) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| {
        Failure::new(
            Exit::BadInput,
            format!("could not write --metrics-file \"{}\": {e}", path.display()),
        )
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_file_name(format!(".{name}.{}.{nanos:08x}", std::process::id()));
    // A new file, never one someone else placed there (or a link to one).
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e));
    }
    Ok(())
}

fn secs(v: Option<f64>) -> String {
    v.map_or("unknown".into(), |s| format!("{s:.1} s"))
}

fn print_report(r: &DrillReport) {
    println!(
        "drill of backup {} to {} (timeline {}): {}",
        r.backup.as_deref().unwrap_or("-"),
        r.target,
        r.timeline.map_or("-".into(), |t| t.to_string()),
        if r.passed { "PASSED" } else { "FAILED" }
    );
    if let Some(e) = &r.error {
        println!("  error: {e}");
    }
    println!(
        "  RTO {} (from the start until the server accepted writes)",
        secs(r.rto_seconds)
    );
    println!(
        "  RPO {} (newest commit in the repository {}, last restored {})",
        secs(r.rpo_seconds),
        r.newest_commit.as_deref().unwrap_or("unknown"),
        r.last_restored_commit.as_deref().unwrap_or("unknown")
    );
    println!(
        "  age {} (the drill's start minus the last commit restored)",
        secs(r.age_seconds)
    );
    let p = &r.phases;
    println!(
        "  phases: plan {:.1} s, files {:.1} s ({}), recovery {:.1} s, promotion {:.1} s, checks {:.1} s",
        p.plan, p.files, mb(r.bytes), p.recovery, p.promotion, p.checks
    );
    for c in &r.checks {
        println!(
            "  {} {}{}",
            if c.passed { "pass" } else { "FAIL" },
            c.sql,
            c.error
                .as_deref()
                .map_or(String::new(), |e| format!(": {e}"))
        );
    }
}
