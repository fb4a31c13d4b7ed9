//! What the campaign's scenarios share: pitr against a repository, the state of a
//! database as one line, fault counts as words.

use std::path::Path;
use std::process::Command;

use testbed::{Cluster, ClusterOptions, FaultCounts, S3Server, StopMode};

pub const PITR: &str = env!("CARGO_BIN_EXE_pitr");

/// pitr against the campaign's repository (no configuration file).
pub fn pitr(s3: &S3Server, url: &str) -> Command {
    pitr_at(std::path::Path::new(PITR), s3, url)
}

/// [`pitr`] from another copy of the binary (one the server's user can run: a restore
/// writes its own path into the restore_command).
pub fn pitr_at(bin: &std::path::Path, s3: &S3Server, url: &str) -> Command {
    let mut c = Command::new(bin);
    c.envs(s3.env())
        .env("PITR_REPO", url)
        .env_remove("PITR_CONFIG")
        .env("HOME", "/nonexistent");
    c
}

/// Starts a restored cluster and waits until it is promoted: Ok(true), or Ok(false) when
/// the server stopped (recovery failed, as it must when WAL cannot be fetched). A set-up
/// problem of the campaign's own is a panic.
pub fn start_and_wait(restored: &mut Cluster) -> bool {
    let started = restored.start();
    let log = restored.server_log();
    assert!(
        !log.contains("not executable") && !log.contains("Permission denied"),
        "the campaign's set-up: {log}"
    );
    if started.is_err() {
        return false;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        match restored.sql("SELECT pg_is_in_recovery()") {
            Ok(s) if s == "f" => return true,
            // The server removes its postmaster.pid as it stops (recovery failed).
            _ if !server_up(restored) => return false,
            _ => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "recovery took over 10 minutes"
                );
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        }
    }
}

/// Whether the cluster's postmaster still runs.
pub fn server_up(pg: &Cluster) -> bool {
    pg.postmaster_pid()
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// The backups `pitr list` shows, oldest first (`list` is a pitr command, its repository
/// set).
pub fn listed(mut list: Command) -> Vec<String> {
    let out = ok(list.args(["list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("list --json");
    v["backups"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A libpq connection string for the cluster's socket as the bed's superuser.
pub fn conninfo(pg: &Cluster) -> String {
    format!(
        "host={} port={} user={}",
        pg.socket_dir().display(),
        pg.port(),
        testbed::SUPERUSER
    )
}

/// Whether the file `name` PostgreSQL marked archived comes back from the repository
/// (`fetch`: a pitr command, its repository set) as it is in the cluster's pg_wal; why
/// not, if not. `scratch` is a directory to fetch into.
pub fn archived_whole(
    mut fetch: Command,
    pg: &Cluster,
    name: &str,
    scratch: &std::path::Path,
) -> Result<(), String> {
    // wal_keep_size keeps every segment: one gone cannot be compared, so it counts.
    let want = std::fs::read(pg.data_dir().join("pg_wal").join(name))
        .map_err(|_| "gone from pg_wal: not compared".to_owned())?;
    let dest = scratch.join(name);
    let out = fetch
        .env("PITR_WAL_FETCH_PREFETCH", "0")
        .args(["wal-fetch", name])
        .arg(&dest)
        .output()
        .expect("run pitr wal-fetch");
    let got = std::fs::read(&dest).ok();
    let _ = std::fs::remove_file(&dest);
    if out.status.success() && got.as_deref() == Some(&want[..]) {
        Ok(())
    } else {
        Err(format!(
            "not in the repository as it is in pg_wal: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Restores `backup` (or the newest point) and returns what it holds.
pub fn restored_state(
    bin: &Path,
    s3: &S3Server,
    url: &str,
    backup: Option<&str>,
) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("data");
    let mut c = pitr_at(bin, s3, url);
    c.args(["restore", "--archive-mode", "off", "--to"])
        .arg(&to);
    if let Some(id) = backup {
        c.args([
            "--backup",
            id,
            "--target-immediate",
            "--target-action",
            "promote",
        ]);
    }
    let out = c.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let mut options = ClusterOptions::default().env("PITR_REPO", url);
    for (k, v) in s3.env() {
        options = options.env(k, v);
    }
    let mut restored = Cluster::adopt(&to, options).unwrap();
    if !start_and_wait(&mut restored) {
        return Err(tail(&restored.server_log()));
    }
    let s = state(&restored);
    let _ = restored.stop(StopMode::Immediate);
    Ok(s)
}

/// A cluster (1 MiB WAL segments) archiving into `url` with `pitr wal-push`, the repository
/// made for it, pgbench's tables at scale 2; with the copy of pitr the server's user runs.
pub fn archiving_cluster(s3: &S3Server, url: &str) -> (Cluster, std::path::PathBuf) {
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let bin = pg.expose_binary(Path::new(PITR)).unwrap();
    for (k, v) in s3.env() {
        pg.set_env(&k, &v);
    }
    pg.set_env("PITR_REPO", url);
    pg.set_config(
        "archive_command",
        &format!("'{}' wal-push %p", bin.display()),
    )
    .unwrap();
    ok(pitr_at(&bin, s3, url)
        .args(["init", "--data-dir"])
        .arg(pg.data_dir()));
    pg.start().unwrap();
    pg.pgbench(&["-i", "-s", "2", "-q"]).unwrap();
    (pg, bin)
}

/// Backs up `pg` (still while it runs) into `url` and notes what it holds under the new
/// backup's id.
pub fn backup_held(
    bin: &Path,
    s3: &S3Server,
    url: &str,
    pg: &Cluster,
    held: &mut std::collections::BTreeMap<String, String>,
) {
    // Backup ids are start times to the second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = ok(pitr_at(bin, s3, url).args(["backup", "--fast", "--json", "--pg", &conninfo(pg)]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("backup --json");
    held.insert(v["id"].as_str().unwrap_or_default().to_owned(), state(pg));
}

/// The last lines of a log.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub fn ok(c: &mut Command) -> String {
    let out = c.output().expect("run pitr");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` (output dropped) and SIGKILLs it at a random moment within `within`; true
/// when the kill landed (it had not finished by itself).
pub fn kill_at_random(cmd: &mut Command, within: std::time::Duration) -> bool {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the command to kill");
    std::thread::sleep(std::time::Duration::from_millis(jitter(
        within.as_millis() as u64 + 1,
    )));
    let _ = child.kill();
    child.wait().expect("wait for it").code().is_none()
}

/// A small random number from the clock (the kills need no more).
pub fn jitter(max: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) % max.max(1)
}

/// What the database holds, as one line to compare.
pub fn state(pg: &Cluster) -> String {
    pg.sql(
        "SELECT (SELECT count(*) || '/' || sum(abalance) FROM pgbench_accounts) || ' ' || \
         (SELECT count(*) || '/' || coalesce(sum(delta), 0) FROM pgbench_history)",
    )
    .expect("read the state")
}

pub fn counts_minus(a: FaultCounts, b: FaultCounts) -> FaultCounts {
    FaultCounts {
        reset: a.reset - b.reset,
        stall: a.stall - b.stall,
        cut: a.cut - b.cut,
        slow_down: a.slow_down - b.slow_down,
        error_after: a.error_after - b.error_after,
    }
}

/// "1 connection", "2 connections".
fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

pub fn describe(c: FaultCounts, requests: u64) -> String {
    format!(
        "{} storage faults in {requests} requests ({} reset before a response, {} stalled 3 s, {} cut midway, {} 503 SlowDown, {} 500 after performing)",
        c.total(),
        plural(c.reset, "connection"),
        c.stall,
        c.cut,
        c.slow_down,
        c.error_after
    )
}
