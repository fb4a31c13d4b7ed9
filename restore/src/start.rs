//! Starting a restored data directory and bringing it into production the way a standby is
//! promoted (`pitr restore --start`, later `pitr drill`).
//!
//! Left to itself, a server recovering with `recovery.signal` and `recovery_target_action =
//! promote` ends recovery with a checkpoint it waits for: every page replay dirtied is
//! written and fsync'd before the first write is accepted (0.35 to 1 s on the bench's 312
//! MB of WAL; minutes with large shared_buffers). A promoted standby skips that wait: it
//! writes an end-of-recovery record and checkpoints in the background. So this starts the
//! server with recovery pausing at the target (for a target) or as a standby (to the end of
//! the archive), and signals the promotion as soon as recovery is under way. PostgreSQL
//! (13 and later) looks at that signal only while paused at the target, or, as a standby,
//! once the archive has no next segment: recovery goes exactly as far as it would have,
//! and the promotion takes effect there. Nothing here needs a database connection: the
//! state comes from `postmaster.pid` and `pg_control`, the signal from `pg_ctl promote`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::recovery::shell_quote;

/// libpq's environment variables that choose a server or identity.
const LIBPQ_DEFAULTS: [&str; 11] = [
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGAPPNAME",
];

/// How the promotion is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// A recovery target is set (recovery.signal): recovery pauses there for this start and
    /// the signalled promotion ends the pause.
    AtTarget,
    /// No target (standby.signal): the server replays the whole archive as a standby and
    /// the signalled promotion ends recovery when the archive has no next segment.
    AtEndOfArchive,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// Directory of the server binaries (`pg_ctl`).
    pub bin: PathBuf,
    /// The restored data directory.
    pub data_dir: PathBuf,
    /// Where pg_ctl sends the server's output.
    pub log: PathBuf,
    /// Settings for this start only (`-c name=value` on the server's command line).
    pub settings: Vec<(String, String)>,
    pub promotion: Promotion,
    /// The server's major version.
    pub major: u32,
}

/// A started, promoted server.
#[derive(Debug, Clone)]
pub struct Started {
    pub pid: u32,
    /// Seconds from `pg_ctl start` until the server accepted connections as a primary.
    pub seconds: f64,
    /// Seconds from `pg_ctl start` until the promotion was signalled; None if recovery
    /// ended before (then PostgreSQL ran its end-of-recovery checkpoint as usual).
    pub signalled_after: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not run \"{program}\": {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("pg_ctl start failed: {0}")]
    PgCtl(String),
    #[error("the restored server stopped during recovery: {0}")]
    Stopped(String),
    #[error("the restored server did not write postmaster.pid within {0} s")]
    NoPidFile(u64),
    #[error("pg_ctl promote failed: {0}")]
    Promote(String),
}

/// The directory holding `pg_ctl` of major version `major`: `given` if set, else the usual
/// places of packaged servers (Debian's /usr/lib/postgresql/N/bin, the PGDG RPMs'
/// /usr/pgsql-N/bin), else the first `pg_ctl` on PATH whose version is `major`.
pub fn find_bin(major: u32, given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(dir) = given {
        let pg_ctl = dir.join("pg_ctl");
        return match pg_ctl_major(&pg_ctl) {
            Some(m) if m == major => Ok(dir.to_owned()),
            Some(m) => Err(format!(
                "\"{}\" is PostgreSQL {m}'s, the backup is of PostgreSQL {major}",
                pg_ctl.display()
            )),
            None => Err(format!("there is no pg_ctl in \"{}\"", dir.display())),
        };
    }
    let mut candidates = vec![
        PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
        PathBuf::from(format!("/usr/pgsql-{major}/bin")),
    ];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    for dir in candidates {
        let pg_ctl = dir.join("pg_ctl");
        if pg_ctl.is_file() && pg_ctl_major(&pg_ctl) == Some(major) {
            return Ok(dir);
        }
    }
    Err(format!("no pg_ctl of PostgreSQL {major} was found"))
}

/// The major version `pg_ctl --version` reports ("pg_ctl (PostgreSQL) 15.8 (Debian ...)").
fn pg_ctl_major(pg_ctl: &Path) -> Option<u32> {
    let out = Command::new(pg_ctl).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split(") ").nth(1)?;
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The options string pg_ctl hands to the server (through a shell): `-c name=value` each.
pub fn server_options(o: &StartOptions) -> String {
    let mut settings = vec![("hot_standby".to_owned(), "on".to_owned())];
    if o.promotion == Promotion::AtTarget {
        settings.push(("recovery_target_action".to_owned(), "pause".to_owned()));
    }
    // A server starting on a data directory not shut down cleanly first fsyncs every file
    // in it, one by one (0.1-0.3 s for the bench's 1000 files, far more with many
    // relations). pitr has just flushed every file it wrote: one syncfs of the filesystem
    // (14 and later) makes the same promise.
    if o.major >= 14 {
        settings.push(("recovery_init_sync_method".to_owned(), "syncfs".to_owned()));
    }
    settings.extend(o.settings.iter().cloned());
    settings
        .iter()
        .map(|(k, v)| format!("-c {}", shell_quote(&format!("{k}={v}"))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `DBState` in pg_control (at byte 16 in every version since 9.x).
const DB_IN_ARCHIVE_RECOVERY: u32 = 5;
const DB_IN_PRODUCTION: u32 = 6;

/// The cluster state field of `global/pg_control`, read without locking: pg_ctl does the
/// same, and a torn read only makes the next poll decide.
fn control_state(data_dir: &Path) -> Option<u32> {
    let bytes = std::fs::read(data_dir.join("global/pg_control")).ok()?;
    Some(u32::from_ne_bytes(bytes.get(16..20)?.try_into().ok()?))
}

/// The postmaster's pid and status line: "starting", "stopping", "ready" (accepting
/// connections, a hot standby's too) or "standby" (up, not accepting connections).
fn pid_file(data_dir: &Path) -> Option<(u32, String)> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let pid = lines.first()?.trim().parse().ok()?;
    Some((pid, lines.get(7).map_or("", |s| s.trim()).to_owned()))
}

fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The last lines of the server's log that say why it stopped (FATAL/PANIC first).
pub fn log_reason(log: &Path) -> String {
    // The log's last 64 KiB at most, read without following a link.
    let text = (|| -> std::io::Result<String> {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(log)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)))?;
        let mut bytes = Vec::new();
        f.take(64 << 10).read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    })()
    .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .rev()
        .find(|l| l.contains("FATAL:") || l.contains("PANIC:"))
        .or(lines.last())
        .map_or_else(|| "it wrote no log".to_owned(), |l| l.trim().to_owned())
}

/// Starts the server on `o.data_dir`, signals the promotion as soon as recovery is under
/// way, and returns once the server accepts connections as a primary. Recovery can take
/// as long as the WAL takes to replay: there is no timeout but the server stopping.
/// `tick` is called every 10 ms while recovery runs (for progress lines).
pub fn start_and_promote(
    o: &StartOptions,
    tick: &mut dyn FnMut(Duration),
) -> Result<Started, StartError> {
    let pg_ctl = o.bin.join("pg_ctl");
    let run = |cmd: &mut Command| {
        cmd.output().map_err(|source| StartError::Spawn {
            program: pg_ctl.display().to_string(),
            source,
        })
    };
    let t0 = Instant::now();
    let mut start = Command::new(&pg_ctl);
    // The server's own libpq connections (dblink, postgres_fdw, a subscription) take no
    // defaults from whoever ran pitr.
    for var in LIBPQ_DEFAULTS {
        start.env_remove(var);
    }
    // What pitr's configuration file put into this process's environment is not the
    // server's: its archive_command and restore_command read the file themselves (the
    // restore_command carries what it needs in its own words), and must not take the
    // values named here for the environment's, nor drop those words as this process's.
    if let Some(list) = std::env::var_os("PITR_CONFIG_INJECTED") {
        for var in list.to_string_lossy().split(',').filter(|v| !v.is_empty()) {
            start.env_remove(var);
        }
        start.env_remove("PITR_CONFIG_INJECTED");
    }
    let out = run(start
        .arg("-D")
        .arg(&o.data_dir)
        .arg("-l")
        .arg(&o.log)
        .args(["-W", "-o", &server_options(o), "start"]))?;
    if !out.status.success() {
        return Err(StartError::PgCtl(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let mut pid = None;
    let mut signalled: Option<f64> = None;
    let mut last_try = None::<Instant>;
    let mut refused = 0;
    loop {
        match pid_file(&o.data_dir) {
            Some((p, status)) => {
                pid = Some(p);
                // "ready" is also a hot standby's status: production is pg_control's word
                // (pg_ctl promote -w waits for the same).
                if status == "ready" && control_state(&o.data_dir) == Some(DB_IN_PRODUCTION) {
                    return Ok(Started {
                        pid: p,
                        seconds: t0.elapsed().as_secs_f64(),
                        signalled_after: signalled,
                    });
                }
                if !alive(p) {
                    return Err(StartError::Stopped(log_reason(&o.log)));
                }
                let due = last_try.is_none_or(|t| t.elapsed() >= Duration::from_millis(50));
                if signalled.is_none()
                    && due
                    && control_state(&o.data_dir) == Some(DB_IN_ARCHIVE_RECOVERY)
                {
                    last_try = Some(Instant::now());
                    let out = run(Command::new(&pg_ctl)
                        .arg("-D")
                        .arg(&o.data_dir)
                        .args(["-W", "promote"]))?;
                    if out.status.success() {
                        signalled = Some(t0.elapsed().as_secs_f64());
                    } else {
                        // In archive recovery pg_ctl promote only fails for good reasons
                        // (it cannot write the signal file, say): the server would wait at
                        // the target for a promotion that does not come.
                        refused += 1;
                        if refused >= 20 {
                            return Err(StartError::Promote(
                                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                            ));
                        }
                    }
                }
            }
            None if pid.is_some() => return Err(StartError::Stopped(log_reason(&o.log))),
            None if t0.elapsed() > Duration::from_secs(60) => {
                return Err(StartError::NoPidFile(60));
            }
            None => {}
        }
        tick(t0.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_pause_at_a_target_and_quote_for_the_shell() {
        let o = StartOptions {
            bin: "/bin".into(),
            data_dir: "/d".into(),
            log: "/d/log".into(),
            settings: vec![
                ("port".into(), "5433".into()),
                ("listen_addresses".into(), "".into()),
                ("unix_socket_directories".into(), "/tmp/a b".into()),
            ],
            promotion: Promotion::AtTarget,
            major: 13,
        };
        assert_eq!(
            server_options(&o),
            "-c hot_standby=on -c recovery_target_action=pause -c port=5433 -c listen_addresses= -c 'unix_socket_directories=/tmp/a b'"
        );
        let o = StartOptions {
            promotion: Promotion::AtEndOfArchive,
            settings: vec![],
            major: 15,
            ..o
        };
        assert_eq!(
            server_options(&o),
            "-c hot_standby=on -c recovery_init_sync_method=syncfs"
        );
    }

    #[test]
    fn a_pid_file_gives_pid_and_status() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("postmaster.pid"),
            "4242\n/d\n1700000000\n5432\n/tmp\n*\n  1234   5678\nstandby \n",
        )
        .unwrap();
        assert_eq!(pid_file(d.path()), Some((4242, "standby".to_owned())));
        std::fs::write(d.path().join("postmaster.pid"), "4242\n/d\n").unwrap();
        assert_eq!(pid_file(d.path()), Some((4242, String::new())));
    }

    #[test]
    fn the_reason_is_the_last_fatal_line() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        std::fs::write(
            &log,
            "LOG: starting\nFATAL: recovery ended before configured recovery target was reached\nLOG: shut down\n",
        )
        .unwrap();
        assert_eq!(
            log_reason(&log),
            "FATAL: recovery ended before configured recovery target was reached"
        );
        assert_eq!(log_reason(&d.path().join("none")), "it wrote no log");
    }
}
