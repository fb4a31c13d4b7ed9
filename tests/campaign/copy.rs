//! `pitr copy` SIGKILLed at random moments while backups and WAL keep coming.
//!
//! A cluster archives into one repository and takes a backup each round (the cluster is
//! still while it runs, so what each holds is known); each round a copy into a second
//! repository on the same S3 server starts and is killed at a random moment of its run.
//! After every kill the copy must be a repository that verifies, listing only backups
//! that are whole. At the end a copy runs to completion; every backup the copy lists is
//! restored from it (`--target-immediate`) and compared with what the cluster held, and a
//! restore of the newest point from the copy with the cluster's last state.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use testbed::{Cluster, S3Server};

use crate::common::{
    archiving_cluster, backup_held, kill_at_random, listed, ok, pitr_at, restored_state, state,
};
use crate::report::Row;
use crate::Scale;

pub fn run(scale: Scale) -> Vec<Row> {
    let s3 = S3Server::start_local().expect("start the S3 server");
    let url = s3.repo_url("campaign-copy");
    let to = s3.repo_url("campaign-copy-offsite");
    let (pg, bin) = archiving_cluster(&s3, &url);
    let mut held: BTreeMap<String, String> = BTreeMap::new();
    let backup =
        |pg: &Cluster, held: &mut BTreeMap<String, String>| backup_held(&bin, &s3, &url, pg, held);
    let copy = || {
        let mut c = pitr_at(&bin, &s3, &url);
        c.args(["copy", "--to", &to]);
        c
    };
    // How long a copy of a round's new backup and WAL takes: the kills land anywhere in it.
    pg.pgbench(&["-n", "-T", "1"]).unwrap();
    backup(&pg, &mut held);
    ok(&mut copy());
    pg.pgbench(&["-n", "-T", "1"]).unwrap();
    backup(&pg, &mut held);
    let t = Instant::now();
    ok(&mut copy());
    let whole = t.elapsed();

    let started = Instant::now();
    let mut row = Row {
        scenario: "copy to a second repository SIGKILLed at random moments while backups and WAL keep coming".into(),
        ..Row::default()
    };
    let (mut kills, mut attempts, mut holes) = (0, 0, 0);
    while kills < scale.copy_kills && attempts < scale.copy_kills * 4 {
        attempts += 1;
        pg.pgbench(&["-n", "-T", "1"]).unwrap();
        backup(&pg, &mut held);
        if kill_at_random(&mut copy(), whole) {
            kills += 1;
        }
        // What the copy lists is whole, whatever the kill interrupted.
        let there = listed(pitr_at(&bin, &s3, &to));
        if let Some(odd) = there.iter().find(|id| !held.contains_key(*id)) {
            eprintln!("campaign: the copy lists {odd}, a backup never taken");
            row.wrong += 1;
        }
        // Segments are copied in parallel, so a kill can leave a hole in the copy's WAL:
        // verify says so (MISSING: the copy restores to points before it) and the next
        // copy fills it. Anything damaged is wrong.
        let out = pitr_at(&bin, &s3, &to)
            .args(["verify", "--json"])
            .output()
            .unwrap();
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let problems = report["problems"].as_array().cloned().unwrap_or_default();
        let damaged = problems
            .iter()
            .filter(|p| p["severity"] != "missing")
            .count();
        if report.is_null() || damaged > 0 {
            eprintln!(
                "campaign: verify of the copy after a copy was killed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            row.wrong += 1;
        } else if !problems.is_empty() {
            holes += 1;
        }
    }
    let _ = pg.sql("SELECT pg_switch_wal()");
    let last = state(&pg);
    let seg = pg
        .sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        .unwrap();
    let _ = pg.sql("SELECT pg_switch_wal()");
    let _ = pg.wait_archived(&seg, Duration::from_secs(60));
    ok(&mut copy());
    // The finished copy is whole: no hole left.
    let out = pitr_at(&bin, &s3, &to).arg("verify").output().unwrap();
    if !out.status.success() {
        eprintln!(
            "campaign: verify of the finished copy: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        row.wrong += 1;
    }
    let there = listed(pitr_at(&bin, &s3, &to));
    let all: Vec<String> = held.keys().cloned().collect();
    if there != all {
        eprintln!("campaign: the finished copy lists {there:?}, not every backup {all:?}");
        row.wrong += 1;
    }
    let mut compared = 0;
    // Every backup is restored in the full run; the short one takes the first, a middle
    // one and the last.
    let picked: Vec<&String> = if scale.smoke {
        let mut p = vec![&there[0], &there[there.len() / 2], &there[there.len() - 1]];
        p.dedup();
        p
    } else {
        there.iter().collect()
    };
    for id in picked {
        match restored_state(&bin, &s3, &to, Some(id)) {
            Ok(s) if Some(&s) == held.get(id) => compared += 1,
            Ok(s) => {
                eprintln!(
                    "campaign: backup {id} restored from the copy to {s}, held {:?}",
                    held.get(id)
                );
                row.wrong += 1;
            }
            Err(e) => {
                eprintln!("campaign: backup {id} does not restore from the copy: {e}");
                row.wrong += 1;
            }
        }
    }
    match restored_state(&bin, &s3, &to, None) {
        Ok(s) if s == last => compared += 1,
        other => {
            eprintln!("campaign: the newest point from the copy: {other:?}, held {last}");
            row.wrong += 1;
        }
    }
    row.runs = attempts;
    row.injected = kills;
    row.compared = compared;
    row.faults = format!("{kills} kills (of {attempts} copies started; the rest finished first)");
    row.checked = format!(
        "the copy verified after each (nothing damaged; {holes} times a hole in its WAL, MISSING until the next copy); the finished copy verified whole; {compared} restores from it (backups and the newest point) compared equal"
    );
    row.secs = started.elapsed().as_secs_f64();
    vec![row]
}
