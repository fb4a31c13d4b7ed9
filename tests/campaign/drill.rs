//! `pitr drill --record` SIGKILLed at random moments: in its restore, its recovery, its
//! checks, its teardown or as it records.
//!
//! After each kill the drill's watchdog must have stopped the drilled server and removed
//! its directory within 30 s, `pitr list --drills` must read (a record is whole or absent)
//! and `pitr verify` must pass: a drill reads the repository and writes only its record.
//! At the end a drill runs to completion and its check of the data passes.

use std::path::Path;
use std::time::{Duration, Instant};

use testbed::{S3Server, StopMode};

use crate::common::{archiving_cluster, conninfo, kill_at_random, ok, pitr_at, state};
use crate::report::Row;
use crate::Scale;

/// Processes whose working directory is under `dir` (the drilled server's).
fn servers_under(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
            out.push(pid);
        }
    }
    out
}

/// What is left in the drills' work directory.
fn left_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

pub fn run(scale: Scale) -> Vec<Row> {
    let s3 = S3Server::start_local().expect("start the S3 server");
    let url = s3.repo_url("campaign-drill");
    let (mut pg, bin) = archiving_cluster(&s3, &url);
    ok(pitr_at(&bin, &s3, &url).args(["backup", "--fast", "--pg", &conninfo(&pg)]));
    pg.pgbench(&["-n", "-T", "2"]).unwrap();
    let _ = pg.sql("SELECT pg_switch_wal()");
    let held = state(&pg);
    let seg = pg
        .sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        .unwrap();
    let _ = pg.sql("SELECT pg_switch_wal()");
    let _ = pg.wait_archived(&seg, Duration::from_secs(60));
    // The source is gone (as in a disaster), so nothing but the drill runs a server.
    pg.stop(StopMode::Fast).unwrap();

    let user = pg.os_user().clone();
    let home = pg.server_dir("drill-home").unwrap();
    let work = pg.server_dir("drill-work").unwrap();
    // The drill checks that the restore holds what the source held at its end.
    let check = format!(
        "SELECT (SELECT count(*) || '/' || sum(abalance) FROM pgbench_accounts) || ' ' || \
         (SELECT count(*) || '/' || coalesce(sum(delta), 0) FROM pgbench_history) = '{held}'"
    );
    let drill = || {
        let mut c = pitr_at(&bin, &s3, &url);
        c.env("HOME", &home)
            .args(["drill", "--record", "--work-dir"])
            .arg(&work)
            .arg("--pg-bin")
            .arg(pg.bin().dir())
            .args(["--check", &check]);
        user.apply(&mut c);
        c
    };
    let t = Instant::now();
    ok(&mut drill());
    let whole = t.elapsed();

    let started = Instant::now();
    let mut row = Row {
        scenario: "drill --record SIGKILLed at random moments (restore, recovery, checks, teardown, record)".into(),
        ..Row::default()
    };
    let (mut kills, mut attempts, mut clean) = (0, 0, 0);
    while kills < scale.drill_kills && attempts < scale.drill_kills * 4 {
        attempts += 1;
        if kill_at_random(&mut drill(), whole) {
            kills += 1;
        }
        // The watchdog tears down what the drill left.
        let wrong = row.wrong;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !servers_under(&work).is_empty() || !left_in(&work).is_empty() {
            if Instant::now() > deadline {
                eprintln!(
                    "campaign: 30 s after a drill was killed: processes {:?}, left {:?}",
                    servers_under(&work),
                    left_in(&work)
                );
                row.wrong += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let drills = pitr_at(&bin, &s3, &url)
            .args(["list", "--drills", "--json"])
            .output()
            .unwrap();
        let out = pitr_at(&bin, &s3, &url).arg("verify").output().unwrap();
        if !drills.status.success() || !out.status.success() {
            eprintln!(
                "campaign: after a drill was killed, list --drills: {}; verify: {}{}",
                String::from_utf8_lossy(&drills.stderr),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            row.wrong += 1;
        }
        if row.wrong == wrong {
            clean += 1;
        }
    }
    // A drill that runs to the end passes its check.
    let out = drill().output().unwrap();
    let mut compared = 0;
    if out.status.success() {
        compared += 1;
    } else {
        eprintln!(
            "campaign: the drill after the kills: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        row.wrong += 1;
    }
    row.runs = attempts;
    row.injected = kills;
    row.compared = clean + compared;
    row.faults = format!("{kills} kills (of {attempts} drills started; the rest finished first)");
    row.checked = format!(
        "after each: no process or file of the drill left after 30 s, list --drills and verify pass; {clean} of {attempts} clean; the next drill's check of the data passes ({compared} of 1)"
    );
    row.secs = started.elapsed().as_secs_f64();
    vec![row]
}
