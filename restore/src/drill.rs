//! `pitr drill`: the disaster-recovery rehearsal as one command. The restore crate's own
//! sequence ([`crate::restorer::restore`] with `start`) brings a backup up in a directory of
//! the drill's, reachable only through a private socket, with nothing that writes to the
//! repository or to another server (archive_mode off, no primary_conninfo, no synchronous
//! standbys); then checks run over an ordinary SQL connection, and the report says how
//! long each phase took, the RTO and the RPO. Stopping the server and removing the
//! directory is [`teardown`], which a watchdog process also runs when the drill dies.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use repo::objects::ObjectStore;
use repo::repository::Repository;
use repo::slots::KeySetting;
use repo::storage::PutMode;
use repo::url::RepoUrl;
use serde::{Deserialize, Serialize};
use walfmt::PgTimestamp;

use crate::plan::TimelineChoice;
use crate::recovery::ArchiveMode;
use crate::restorer::{restore, Progress, RestoreError, RestoreOptions, StartSettings};
use crate::target::Target;

/// Where drill records live in the repository.
pub const DRILLS_PREFIX: &str = "drills/";

/// The most a drill record may hold (plaintext).
const RECORD_MAX: u64 = 1 << 20;

/// What to drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub url: RepoUrl,
    pub key: KeySetting,
    /// The restore_command the restored server runs.
    pub restore_command: String,
    /// A backup id, or `latest`; None: the newest that reaches the target.
    pub backup: Option<String>,
    pub target: Target,
    pub exclusive: bool,
    pub timeline: TimelineChoice,
    pub timeline_text: String,
    /// The drill's own directory (exists, empty, 0700): `data/`, `socket/`, `pg_hba.conf`.
    pub dir: PathBuf,
    /// The port (it names the socket file; nothing listens on TCP).
    pub port: u16,
    /// The directory of pg_ctl (None: found for the backup's major version).
    pub pg_bin: Option<PathBuf>,
    /// Ranged reads at once.
    pub parallel: usize,
    /// SQL checks: each passes when it succeeds and the first column of its first row is
    /// true.
    pub checks: Vec<String>,
    /// Run amcheck's bt_index_check on every B-tree index of every database.
    pub amcheck: bool,
    /// The role checks connect as (None: `PGUSER`, this OS user, then `postgres`).
    pub user: Option<String>,
    /// How long one check statement may run (0: no limit).
    pub check_timeout: Duration,
}

/// How long each phase took, in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Phases {
    /// Choosing the backup and checking its WAL is there.
    pub plan: f64,
    /// Writing the files.
    pub files: f64,
    /// From the server's start until replay was done.
    pub recovery: f64,
    /// From the end of replay until the server accepted writes.
    pub promotion: f64,
    /// The checks.
    pub checks: f64,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckResult {
    pub sql: String,
    pub passed: bool,
    /// What went wrong (an error, or the value the first column held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seconds: f64,
}

/// What a drill found: printed, stored as its record, and the source of its metrics.
/// (Fields a record lacks read as their defaults; fields it has that this pitr does not
/// know are ignored.)
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DrillReport {
    /// When it started (UTC, as PostgreSQL prints timestamps).
    pub started_at: String,
    /// Every check passed (and the server came up).
    pub passed: bool,
    /// Why it failed before any check could run (the restore or the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The backup restored.
    pub backup: Option<String>,
    /// The target, as given.
    pub target: String,
    /// The timeline recovered along.
    pub timeline: Option<u32>,
    /// The server's major version.
    pub pg_version: Option<u32>,
    /// From the start of the drill until the server accepted writes.
    pub rto_seconds: Option<f64>,
    /// The newest commit the repository holds minus the last one restored.
    pub rpo_seconds: Option<f64>,
    /// The drill's start minus the last commit restored.
    pub age_seconds: Option<f64>,
    /// The last commit (or abort) the restored server replayed.
    pub last_restored_commit: Option<String>,
    /// The newest commit (or abort) in the repository's WAL along the newest timeline.
    pub newest_commit: Option<String>,
    pub phases: Phases,
    pub checks: Vec<CheckResult>,
    /// Plaintext bytes of the files restored.
    pub bytes: u64,
    /// Seconds the whole drill took (teardown aside).
    pub seconds: f64,
}

/// Why a drill could not run to its checks.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("could not prepare the drill's directory {path}: {source}")]
    Setup {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The drilled server's settings for its start (on its command line, so they win over the
/// backup's configuration files): reachable only through the drill's socket with its own
/// pg_hba.conf, on its own directory, writing to no repository or archive and connecting to
/// no other server (no WAL receiver, no logical replication apply workers, no archive
/// cleanup), whatever the backup's configuration says.
pub fn server_settings(dir: &Path, port: u16) -> Vec<(String, String)> {
    let s = |k: &str, v: String| (k.to_owned(), v);
    vec![
        s("data_directory", dir.join("data").display().to_string()),
        s("port", port.to_string()),
        s("listen_addresses", String::new()),
        s(
            "unix_socket_directories",
            dir.join("socket").display().to_string(),
        ),
        s("hba_file", dir.join("pg_hba.conf").display().to_string()),
        // Not where the backup's server wrote its own (an empty value would not do: the
        // server tries to write a file named "").
        s(
            "external_pid_file",
            dir.join("postmaster.pid").display().to_string(),
        ),
        s("ssl", "off".into()),
        s("archive_mode", "off".into()),
        s("archive_cleanup_command", String::new()),
        s("recovery_end_command", String::new()),
        s("primary_conninfo", String::new()),
        s("primary_slot_name", String::new()),
        s("synchronous_standby_names", String::new()),
        s("max_logical_replication_workers", "0".into()),
        // pg_cron's jobs (a placeholder setting where pg_cron is not loaded).
        s("cron.launch_active_jobs", "off".into()),
        // The log the drill reads its phases from: one file, times in UTC.
        s("logging_collector", "off".into()),
        s("log_destination", "stderr".into()),
        s("log_line_prefix", "%m [%p] ".into()),
        s("log_timezone", "UTC".into()),
        s("cluster_name", "pitr-drill".into()),
    ]
}

/// Whether `dir` can be the drill's directory: `unix_socket_directories` is a
/// comma-separated list (a `,` would split it) and quotes and surrounding blanks are read
/// specially; the socket's path must fit a `sockaddr_un`.
pub fn check_dir(dir: &Path, port: u16) -> Result<(), String> {
    let text = dir.display().to_string();
    if !dir.is_absolute() {
        return Err(format!(
            "the drill's directory \"{text}\" is not an absolute path"
        ));
    }
    if text.contains([',', '"', '\'', '\\', '\n', '\r']) || text.trim() != text {
        return Err(format!(
            "the drill's directory \"{}\" holds a character PostgreSQL's unix_socket_directories cannot take (a comma, a quote, a backslash, a line break or surrounding blanks)",
            text.escape_debug()
        ));
    }
    let socket = dir.join("socket").join(format!(".s.PGSQL.{port}"));
    if socket.as_os_str().len() > 107 {
        return Err(format!(
            "the drill's socket path \"{}\" would be longer than a Unix socket path can be (107 bytes)",
            socket.display()
        ));
    }
    Ok(())
}

/// Restores, starts, checks. The server is left running (see [`teardown`]); with an
/// error before the checks, whatever was started is left for [`teardown`] too.
pub async fn drill(o: &DrillOptions, progress: &dyn Progress) -> Result<DrillReport, DrillError> {
    let t0 = Instant::now();
    let started_at = PgTimestamp::now();
    let setup = |path: PathBuf| move |source| DrillError::Setup { path, source };
    let socket = o.dir.join("socket");
    std::fs::create_dir(&socket).map_err(setup(socket.clone()))?;
    set_mode(&socket, 0o700).map_err(setup(socket.clone()))?;
    let hba = o.dir.join("pg_hba.conf");
    std::fs::write(
        &hba,
        "# pitr drill: only the drill, through its own socket\nlocal all all trust\n",
    )
    .map_err(setup(hba.clone()))?;

    let data = o.dir.join("data");
    let options = RestoreOptions {
        url: o.url.clone(),
        key: o.key.clone(),
        to: data.clone(),
        backup: o.backup.clone(),
        target: o.target.clone(),
        exclusive: o.exclusive,
        timeline: o.timeline.clone(),
        timeline_text: o.timeline_text.clone(),
        action: None,
        tablespace_map: Default::default(),
        tablespaces_under: Some(o.dir.join("tblspc")),
        prefetch_wal: false,
        parallel: o.parallel,
        restore_command: o.restore_command.clone(),
        start: Some(StartSettings {
            pg_bin: o.pg_bin.clone(),
            settings: server_settings(&o.dir, o.port),
            // Shared with the server the backup came from when it pointed elsewhere (the
            // setting is gone in 15).
            settings_up_to: vec![(14, "stats_temp_directory".into(), "pg_stat_tmp".into())],
        }),
        before_pg_control: None,
        archive_mode: ArchiveMode::Off,
    };
    let restored = restore(&options, progress).await?;
    let rto = t0.elapsed().as_secs_f64();
    let (server, log) = restored
        .server
        .clone()
        .expect("a restore with start returns its server");
    let mut report = DrillReport {
        started_at: started_at.to_pg_utc(),
        backup: Some(restored.plan.backup.id.clone()),
        target: describe_target(&o.target),
        timeline: Some(restored.plan.timeline),
        pg_version: Some(restored.plan.backup.pg_version),
        rto_seconds: Some(rto),
        bytes: restored.files.bytes,
        ..Default::default()
    };
    // The server's phases, from its log: its start is when the files were final.
    let server_start = started_at.unix_micros() + (restored.seconds * 1e6) as i64;
    let (recovery, promotion) = match redo_done(&log) {
        Some(done) => {
            let recovery = ((done - server_start) as f64 / 1e6).clamp(0.0, server.seconds);
            (recovery, server.seconds - recovery)
        }
        None => (server.seconds, 0.0),
    };
    report.phases = Phases {
        plan: restored.plan_seconds,
        files: (restored.seconds - restored.plan_seconds).max(0.0),
        recovery,
        promotion,
        checks: 0.0,
    };

    let checks_started = Instant::now();
    let mut checks = Vec::new();
    let mut last_restored = None;
    match connect(o, "postgres").await {
        Err(e) => checks.push(CheckResult {
            sql: "connect".into(),
            passed: false,
            error: Some(e),
            seconds: checks_started.elapsed().as_secs_f64(),
        }),
        Ok((client, user)) => {
            // Nothing of the restore is left to run: no restore_command once recovery is
            // over (the server reads it again only if it recovers again).
            // (Set empty, not reset: one in postgresql.conf would come back. Two
            // statements: ALTER SYSTEM cannot run inside a transaction block.)
            let reset = match client
                .batch_execute("ALTER SYSTEM SET restore_command = ''")
                .await
            {
                Ok(()) => client.batch_execute("SELECT pg_reload_conf()").await,
                Err(e) => Err(e),
            };
            // The reload reaches this session asynchronously: wait (up to 5 s) until the
            // setting reads empty here, so checks see the server as it stays. (Before 14
            // restore_command takes effect only at a restart: the file says it is empty,
            // and the running server uses it only in a recovery, which is over.)
            let reloadable = restored.plan.backup.pg_version >= 14;
            let reset = match reset {
                Ok(()) if !reloadable => Ok(()),
                Ok(()) => {
                    let t = Instant::now();
                    loop {
                        let now = client
                            .query_one("SELECT current_setting('restore_command')", &[])
                            .await
                            .map(|r| r.get::<_, String>(0));
                        match now {
                            Ok(v) if v.is_empty() => break Ok(()),
                            Ok(_) if t.elapsed() < Duration::from_secs(5) => {
                                tokio::time::sleep(Duration::from_millis(20)).await
                            }
                            Ok(v) => {
                                break Err(format!(
                                    "restore_command is still \"{v}\" after the reload"
                                ))
                            }
                            Err(e) => break Err(pg_error(&e)),
                        }
                    }
                }
                Err(e) => Err(pg_error(&e)),
            };
            if let Err(e) = reset {
                checks.push(CheckResult {
                    sql: "ALTER SYSTEM SET restore_command = ''".into(),
                    passed: false,
                    error: Some(e),
                    seconds: 0.0,
                });
            }
            last_restored = client
                .query_one(
                    "SELECT (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::int8",
                    &[],
                )
                .await
                .ok()
                .and_then(|row| row.get::<_, Option<i64>>(0));
            for sql in &o.checks {
                checks.push(run_check(&client, sql).await);
            }
            if o.amcheck {
                checks.extend(amcheck(o, &client, &user).await);
            }
        }
    }
    report.phases.checks = checks_started.elapsed().as_secs_f64();
    report.passed = checks.iter().all(|c| c.passed);
    report.checks = checks;

    // RPO: against the newest commit the repository holds (the plan's, when it recovered
    // to the end; else one more look at the WAL to the end).
    let newest = newest_in_repository(o, &restored.plan).await;
    let restored_at = last_restored.map(PgTimestamp::from_unix_micros);
    report.last_restored_commit = restored_at.map(|t| t.to_pg_utc());
    report.newest_commit = newest.map(|t| t.to_pg_utc());
    if let Some(r) = restored_at {
        report.age_seconds =
            Some(((started_at.unix_micros() - r.unix_micros()) as f64 / 1e6).max(0.0));
        if let Some(n) = newest {
            report.rpo_seconds = Some(((n.unix_micros() - r.unix_micros()) as f64 / 1e6).max(0.0));
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The newest commit time along the WAL to the end of the newest timeline.
async fn newest_in_repository(o: &DrillOptions, plan: &crate::plan::Plan) -> Option<PgTimestamp> {
    let repo = Repository::open(
        &o.url,
        &o.key,
        None,
        std::sync::Arc::new(repo::codec::Codec::new(1, 4)),
    )
    .await
    .ok()?;
    let wal = if matches!(o.target, Target::End) && matches!(o.timeline, TimelineChoice::Latest) {
        plan.wal.clone()
    } else {
        crate::plan::plan(&repo, &Target::End, false, &TimelineChoice::Latest, None)
            .await
            .ok()?
            .wal
    };
    crate::plan::newest_commit(&repo, &wal, 64).await
}

fn describe_target(t: &Target) -> String {
    match t {
        Target::End => "end of the archive".into(),
        Target::Immediate => "immediate".into(),
        Target::Time(t) => format!("time {}", t.to_pg_utc()),
        Target::Lsn(l) => format!("lsn {l}"),
        Target::Xid(x) => format!("xid {x}"),
        Target::Name(n) => format!("name {n}"),
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// When the server's log says replay was done (`redo done at`), in Unix microseconds.
fn redo_done(log: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains("redo done at"))?;
    log_time(line)
}

/// The time a log line starts with, as `log_line_prefix = '%m '` writes it in UTC
/// (`2026-12-05 22:30:01.123 UTC`).
fn log_time(line: &str) -> Option<i64> {
    let stamp = line.get(..23)?;
    let rest = line.get(23..)?;
    if !rest.starts_with(" UTC") {
        return None;
    }
    crate::target::parse_time(&format!("{stamp}+00"))
        .ok()
        .map(|t| t.unix_micros())
}

/// A connection to `dbname` on the drilled server, as the first role that exists among
/// the candidates; and that role.
async fn connect(
    o: &DrillOptions,
    dbname: &str,
) -> Result<(tokio_postgres::Client, String), String> {
    let mut users: Vec<String> = Vec::new();
    match &o.user {
        Some(u) => users.push(u.clone()),
        None => {
            users.extend(std::env::var("PGUSER").ok().filter(|u| !u.is_empty()));
            users.extend(os_user_name());
            users.push("postgres".into());
        }
    }
    users.dedup();
    let mut last = String::from("no role to connect as");
    for user in users {
        match connect_as(o, dbname, &user).await {
            Ok(c) => return Ok((c, user)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The name of this process's effective user, as libpq takes it (the passwd entry; else
/// `USER`).
fn os_user_name() -> Option<String> {
    let uid = rustix::process::geteuid().as_raw().to_string();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)? == uid).then(|| name.to_owned())
            })
        })
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
}

async fn connect_as(
    o: &DrillOptions,
    dbname: &str,
    user: &str,
) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(o.dir.join("socket"))
        .port(o.port)
        .user(user)
        .dbname(dbname)
        .application_name("pitr drill")
        .connect_timeout(Duration::from_secs(30))
        // A check that waits on a lock (a prepared transaction the backup carried holds
        // its locks after promotion) fails instead of hanging the drill; each statement
        // gets `check_timeout`.
        .options(format!(
            "-c lock_timeout=60s -c statement_timeout={}ms",
            o.check_timeout.as_millis()
        ));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
        format!(
            "could not connect to the drilled server as \"{user}\": {}",
            pg_error(&e)
        )
    })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A server error's message (with its DETAIL), or the error itself.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{}: {} ({d})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        },
        None => e.to_string(),
    }
}

/// Runs one check: it passes when the query succeeds and the first column of its first
/// row is true.
async fn run_check(client: &tokio_postgres::Client, sql: &str) -> CheckResult {
    let t = Instant::now();
    let outcome = client.simple_query(sql).await;
    let (passed, error) = match outcome {
        Err(e) => (false, Some(pg_error(&e))),
        Ok(messages) => {
            let first = messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
                _ => None,
            });
            match first {
                Some(Some(v)) if v == "t" => (true, None),
                Some(Some(v)) => (false, Some(format!("the first column is {v}, not true"))),
                Some(None) => (false, Some("the first column is NULL, not true".into())),
                None => (false, Some("the query returned no row".into())),
            }
        }
    };
    CheckResult {
        sql: sql.to_owned(),
        passed,
        error,
        seconds: t.elapsed().as_secs_f64(),
    }
}

/// amcheck's `bt_index_check` on every B-tree index of every database that takes
/// connections: one result per database.
async fn amcheck(
    o: &DrillOptions,
    client: &tokio_postgres::Client,
    user: &str,
) -> Vec<CheckResult> {
    let t = Instant::now();
    let databases = match client
        .query(
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
            &[],
        )
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>(),
        Err(e) => {
            return vec![CheckResult {
                sql: "amcheck: the list of databases".into(),
                passed: false,
                error: Some(pg_error(&e)),
                seconds: t.elapsed().as_secs_f64(),
            }]
        }
    };
    let mut out = Vec::new();
    for db in databases {
        let t = Instant::now();
        let sql = format!("amcheck: bt_index_check on every B-tree index of database \"{db}\"");
        let error = match connect_as(o, &db, user).await {
            Err(e) => Some(e),
            Ok(c) => amcheck_database(&c).await.err(),
        };
        out.push(CheckResult {
            sql,
            passed: error.is_none(),
            error,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    out
}

async fn amcheck_database(c: &tokio_postgres::Client) -> Result<(), String> {
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        .await
        .map_err(|e| format!("amcheck is not installed: {}", pg_error(&e)))?;
    let rows = c
        .query(
            "SELECT c.oid, c.oid::regclass::text FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_am a ON a.oid = c.relam \
             WHERE a.amname = 'btree' AND c.relpersistence <> 't' \
             AND i.indisvalid AND i.indisready ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| pg_error(&e))?;
    for r in rows {
        let (oid, name): (u32, String) = (r.get(0), r.get(1));
        c.execute("SELECT bt_index_check($1::oid::regclass)", &[&oid])
            .await
            .map_err(|e| format!("index {name}: {}", pg_error(&e)))?;
    }
    Ok(())
}

/// Stops the server on `dir/data`, if one runs (immediate shutdown: nothing of it is
/// kept), then removes `dir` (a few tries: a helper process of the restore may still be
/// finishing a file in it). Also what the watchdog runs when the drill dies.
pub fn teardown(dir: &Path) -> std::io::Result<()> {
    stop_server(&dir.join("data"));
    let mut tries = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

/// SIGQUIT (immediate shutdown) to the postmaster named in `data/postmaster.pid`, if it
/// is a process whose working directory is `data` (so a stale file naming someone else's
/// process is not followed); after 10 s SIGKILL to its process group (pg_ctl makes the
/// postmaster lead one, so its children go too), or to it alone. A pid file that appears
/// a moment later (a server that was starting as the drill died) is waited for up to 5 s.
fn stop_server(data: &Path) {
    let waited = Instant::now();
    let pid = loop {
        let pid = std::fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        match pid {
            Some(p) => break p,
            None if data.exists() && waited.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            None => return,
        }
    };
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let ours = std::fs::read_link(proc.join("cwd"))
        .ok()
        .zip(std::fs::canonicalize(data).ok())
        .is_some_and(|(cwd, data)| cwd == data);
    if !ours {
        return;
    }
    let Some(p) = rustix::process::Pid::from_raw(pid) else {
        return;
    };
    let _ = rustix::process::kill_process(p, rustix::process::Signal::QUIT);
    let t = Instant::now();
    while proc.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if proc.exists() {
        let leads = rustix::process::getpgid(Some(p)).is_ok_and(|g| g == p);
        let _ = if leads {
            rustix::process::kill_process_group(p, rustix::process::Signal::KILL)
        } else {
            rustix::process::kill_process(p, rustix::process::Signal::KILL)
        };
    }
}

/// The watchdog: waits until `stdin` reaches its end (the drill closed it, or died), then,
/// unless the drill said `keep` first, runs [`teardown`] on `dir`.
pub fn watchdog(dir: &Path, mut stdin: impl std::io::Read) -> std::io::Result<()> {
    let mut said = Vec::new();
    let _ = stdin.read_to_end(&mut said);
    if said.starts_with(b"keep") {
        return Ok(());
    }
    teardown(dir)
}

/// A drill record's key: its start time, sortable, and a random suffix.
fn record_key(report: &DrillReport) -> String {
    let stamp: String = report
        .started_at
        .chars()
        .filter(|c| c.is_ascii_digit())
        .take(17)
        .collect();
    let suffix = hex_suffix();
    format!("{DRILLS_PREFIX}{stamp}-{suffix}")
}

fn hex_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:08x}", nanos ^ std::process::id().rotate_left(16))
}

/// Stores the report in the repository (sealed like every object: encrypted in an
/// encrypted repository); returns its key.
pub async fn record(
    objects: &ObjectStore,
    report: &DrillReport,
) -> Result<String, repo::objects::ObjectError> {
    let key = record_key(report);
    let body = serde_json::to_vec(report).unwrap_or_default();
    objects
        .put(&key, Bytes::from(body), PutMode::IfAbsent)
        .await?;
    Ok(key)
}

/// Whether `key` is a drill record's key as [`record`] writes them
/// (`drills/<17 digits>-<8 hex digits>`), and its time digits.
fn record_stamp(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(DRILLS_PREFIX)?;
    let (stamp, suffix) = rest.split_once('-')?;
    (stamp.len() == 17
        && stamp.bytes().all(|b| b.is_ascii_digit())
        && suffix.len() == 8
        && suffix.bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some(stamp)
}

/// The drill records in the repository, oldest first (at most the `newest` last ones);
/// a record that cannot be read or parsed is returned as an error in its place. Keys not
/// of a record's form, and records dated more than a day ahead of this host's clock (a
/// host whose clock ran ahead, or a planted one: it would stay "the last drill" for good),
/// are left out.
pub async fn records(
    objects: &ObjectStore,
    newest: usize,
) -> Result<Vec<(String, Result<DrillReport, String>)>, repo::storage::StorageError> {
    let tomorrow: String =
        PgTimestamp::from_unix_micros(PgTimestamp::now().unix_micros() + 86_400_000_000)
            .to_pg_utc()
            .chars()
            .filter(|c| c.is_ascii_digit())
            .take(17)
            .collect();
    let mut all = repo::storage::list_all(objects.storage().as_ref(), DRILLS_PREFIX).await?;
    all.retain(|o| record_stamp(&o.key).is_some_and(|s| s <= tomorrow.as_str()));
    let skip = all.len().saturating_sub(newest);
    let mut out = Vec::new();
    for o in all.into_iter().skip(skip) {
        let read = match objects.get_at_most(&o.key, RECORD_MAX).await {
            Ok((_, plain)) => {
                serde_json::from_slice::<DrillReport>(&plain).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        out.push((o.key, read));
    }
    Ok(out)
}

/// Text from a record, fit for a terminal: control characters (escape sequences a
/// planted record could carry) become `?`.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// node_exporter textfile-collector gauges of a drill.
pub fn metrics(report: &DrillReport, now_unix: f64) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        }
    };
    gauge(
        "pitr_drill_success",
        "1 if the last drill passed every check, else 0",
        Some(if report.passed { 1.0 } else { 0.0 }),
    );
    gauge(
        "pitr_drill_timestamp_seconds",
        "when the last drill ended (Unix time)",
        Some(now_unix),
    );
    gauge(
        "pitr_drill_rto_seconds",
        "the last drill's start until its server accepted writes",
        report.rto_seconds,
    );
    gauge(
        "pitr_drill_rpo_seconds",
        "the newest commit in the repository minus the last one the drill restored",
        report.rpo_seconds,
    );
    gauge(
        "pitr_drill_age_seconds",
        "the last drill's start minus the last commit it restored",
        report.age_seconds,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_are_sealed_and_read_back_newest_last() {
        use repo::crypto::{DataKey, Keys};
        use repo::envelope::Protection;
        let storage = std::sync::Arc::new(repo::storage::MemStorage::new());
        let objects = ObjectStore::new(
            storage.clone(),
            std::sync::Arc::new(repo::codec::Codec::new(1, 2)),
            repo::envelope::EncodeOptions::default(),
        )
        .with_protection(Protection::Encrypted(std::sync::Arc::new(Keys::new(
            &DataKey::generate(),
        ))));
        let mut keys = Vec::new();
        for (i, passed) in [(1, true), (2, false)] {
            let r = DrillReport {
                started_at: format!("2026-12-0{i} 10:00:00.000000+00"),
                passed,
                backup: Some("secret-backup-id".into()),
                ..Default::default()
            };
            keys.push(record(&objects, &r).await.unwrap());
        }
        // Planted: a key of another form, one from the far future, a damaged record.
        use repo::storage::Storage;
        for k in ["drills/junk", "drills/99991231235959999-00000000"] {
            storage
                .put(k, Bytes::from_static(b"x"), PutMode::Overwrite)
                .await
                .unwrap();
        }
        storage
            .put(
                "drills/20261203100000000-00000000",
                Bytes::from_static(b"x"),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        for k in &keys {
            let raw = repo::storage::get_bytes(storage.as_ref(), k).await.unwrap();
            assert!(
                !raw.windows(16).any(|w| w == b"secret-backup-id"),
                "not sealed"
            );
        }
        let all = records(&objects, 10).await.unwrap();
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(all[0].1.as_ref().unwrap().passed);
        assert!(!all[1].1.as_ref().unwrap().passed);
        assert!(
            all[2].1.is_err(),
            "the damaged one is unreadable, not a panic"
        );
        let last = records(&objects, 1).await.unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].0, "drills/20261203100000000-00000000");
    }

    #[test]
    fn record_keys_have_one_form() {
        let r = DrillReport {
            started_at: "2026-12-05 22:30:01.123456+00".into(),
            ..Default::default()
        };
        let key = record_key(&r);
        assert!(key.starts_with("drills/20261205223001123-"), "{key}");
        assert_eq!(record_stamp(&key), Some("20261205223001123"));
        for bad in [
            "drills/x",
            "drills/2026120522300112-0123abcd",
            "drills/20261205223001123-0123abcg",
            "drills/20261205223001123-0123abcd/x",
            "other/20261205223001123-0123abcd",
        ] {
            assert_eq!(record_stamp(bad), None, "{bad}");
        }
        assert_eq!(printable("a\x1b[2Jb\n"), "a?[2Jb?");
    }

    #[test]
    fn log_times_are_read_in_utc() {
        let t =
            log_time("2026-12-05 22:30:01.250 UTC [4242] LOG:  redo done at 0/3000060").unwrap();
        assert_eq!(
            t,
            crate::target::parse_time("2026-12-05 22:30:01.25+00")
                .unwrap()
                .unix_micros()
        );
        assert_eq!(log_time("2026-12-05 22:30:01.250 CET [1] LOG: x"), None);
        assert_eq!(log_time("LOG: short"), None);
    }

    #[test]
    fn metrics_are_gauges_and_leave_out_what_is_unknown() {
        let r = DrillReport {
            passed: true,
            rto_seconds: Some(1.5),
            ..Default::default()
        };
        let m = metrics(&r, 1700000000.0);
        assert!(m.contains("pitr_drill_success 1\n"), "{m}");
        assert!(m.contains("pitr_drill_rto_seconds 1.5\n"), "{m}");
        assert!(m.contains("# TYPE pitr_drill_timestamp_seconds gauge\npitr_drill_timestamp_seconds 1700000000\n"), "{m}");
        assert!(!m.contains("rpo"), "{m}");
    }

    #[test]
    fn the_watchdog_stands_down_only_when_told() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("drill");
        std::fs::create_dir(&dir).unwrap();
        watchdog(&dir, &b"keep\n"[..]).unwrap();
        assert!(dir.exists());
        watchdog(&dir, &b""[..]).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn a_stale_pid_file_naming_another_process_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        // This test's own pid: alive, but its working directory is not `data`.
        std::fs::write(
            data.join("postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        stop_server(&data);
    }
}
