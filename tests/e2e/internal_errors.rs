//! A panic (a bug) in any command reads as that command's failure, wherever it happens
//! (main thread, a thread of its own, an async task): above 125 from `wal-fetch`, so that
//! PostgreSQL stops recovery instead of taking it for "not found", ending recovery early
//! and promoting; exit 70 from the others (`wal-push`: PostgreSQL keeps the file and
//! retries); one line on stderr saying where. Panics are injected with the
//! `PITR_DEBUG_PANIC` test hook (src/cli/mod.rs).

use std::path::Path;
use std::process::Output;

use testbed::{Cluster, ClusterOptions};

use crate::pitr;

/// The one line a panic prints: the command and where in the source it happened.
fn says_where(out: &Output, command: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let prefix =
        format!("pitr: error: internal error in {command}: panic injected by PITR_DEBUG_PANIC at ");
    let at = lines[0]
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{stderr}"));
    let (file, line) = at.rsplit_once(':').unwrap();
    assert!(
        file.ends_with(".rs") && line.parse::<u32>().is_ok(),
        "{stderr}"
    );
}

#[test]
fn a_panic_exits_with_the_commands_failure_code_wherever_it_happens() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let dest = dir.path().join("RECOVERYXLOG");
    for place in ["", ":thread", ":task"] {
        let out = pitr()
            .args(["wal-fetch", "--repo", &url, "000000010000000000000001"])
            .arg(&dest)
            .env("PITR_DEBUG_PANIC", format!("wal-fetch{place}"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(200), "wal-fetch{place}: {out:?}");
        says_where(&out, "wal-fetch");
        assert!(!dest.exists());

        let out = pitr()
            .args(["wal-push", "--repo", &url])
            .arg(dir.path().join("000000010000000000000001"))
            .env("PITR_DEBUG_PANIC", format!("wal-push{place}"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(70), "wal-push{place}: {out:?}");
        says_where(&out, "wal-push");
    }
    assert!(!dir.path().join("repo").exists(), "nothing was done");
}

#[test]
fn a_panic_in_wal_fetch_stops_recovery_instead_of_ending_it() {
    // A cluster archiving into a repository of its own, so that without the panic
    // wal-fetch would answer "not found" for the next timeline's history file.
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    let repo = pg.server_dir("repo").unwrap();
    let url = format!("file://{}", repo.display());
    crate::init_repo(&url, &pg, None);
    // Made by this test's user (0600): handed to the server's, as pitr init run by it
    // would leave it.
    pg.os_user().give_tree(&repo).unwrap();
    pg.set_config(
        "archive_command",
        &format!("'{}' wal-push --repo '{url}' %p", bin.display()),
    )
    .unwrap();
    pg.start().unwrap();
    pg.sql("CREATE TABLE t (v int)").unwrap();
    let segment = pg.switch_wal().unwrap();
    pg.wait_archived(&segment, std::time::Duration::from_secs(60))
        .unwrap();
    pg.stop(testbed::StopMode::Fast).unwrap();

    pg.set_config(
        "restore_command",
        &format!("'{}' wal-fetch --repo '{url}' %f %p", bin.display()),
    )
    .unwrap();
    std::fs::write(pg.data_dir().join("recovery.signal"), b"").unwrap();
    pg.set_env("PITR_DEBUG_PANIC", "wal-fetch");
    // Recovery asks for 00000002.history first (the newest timeline). Read as "not found",
    // a panic would let it replay what pg_wal holds and promote onto timeline 2.
    let started = pg.start();
    let log = pg.server_log();
    assert!(started.is_err(), "the server came up:\n{log}");
    assert!(
        log.contains("could not restore file") && log.contains("exit code 200"),
        "{log}"
    );
    assert!(
        !pg.data_dir().join("pg_wal/00000002.history").exists(),
        "the server promoted"
    );
    assert!(pg.data_dir().join("recovery.signal").exists());
}
