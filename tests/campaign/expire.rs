//! `pitr expire` SIGKILLed at random moments while backups keep coming.
//!
//! Each round takes a backup of a cluster that is still while it runs (so what it holds is
//! known), then runs `pitr expire --keep-last 3 --grace 0s` and kills it at a random moment
//! of its run. After every kill `pitr verify` must pass on the whole repository. At the
//! end an expire runs to completion, and every kept backup is restored to its end
//! (`--target-immediate`) and compared with what the cluster held when it was taken; a
//! restore of the newest point is compared with the cluster's last state.

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
    let url = s3.repo_url("campaign-expire");
    let (pg, bin) = archiving_cluster(&s3, &url);
    let mut held: BTreeMap<String, String> = BTreeMap::new();
    let backup =
        |pg: &Cluster, held: &mut BTreeMap<String, String>| backup_held(&bin, &s3, &url, pg, held);
    let expire = || {
        let mut c = pitr_at(&bin, &s3, &url);
        c.args([
            "expire",
            "--keep-last",
            "3",
            "--grace",
            "0s",
            "--repack-below",
            "0.9",
        ]);
        c
    };
    for _ in 0..3 {
        pg.pgbench(&["-n", "-T", "1"]).unwrap();
        backup(&pg, &mut held);
    }
    // How long an expire with work to do takes: the kills land anywhere in it.
    pg.pgbench(&["-n", "-T", "1"]).unwrap();
    backup(&pg, &mut held);
    let t = Instant::now();
    ok(&mut expire());
    let whole = t.elapsed();

    let started = Instant::now();
    let mut row = Row {
        scenario: "expire (keep-last 3, grace 0, repack) SIGKILLed at random moments while backups keep coming".into(),
        ..Row::default()
    };
    let (mut kills, mut attempts) = (0, 0);
    while kills < scale.expire_kills && attempts < scale.expire_kills * 4 {
        attempts += 1;
        pg.pgbench(&["-n", "-T", "1"]).unwrap();
        backup(&pg, &mut held);
        if kill_at_random(&mut expire(), whole) {
            kills += 1;
        }
        // The newest three are listed whatever the kill interrupted.
        let now = listed(pitr_at(&bin, &s3, &url));
        let newest: Vec<&String> = held.keys().rev().take(3).collect();
        if let Some(gone) = newest.iter().find(|id| !now.contains(id)) {
            eprintln!("campaign: backup {gone}, among the newest three, is gone after a kill");
            row.wrong += 1;
        }
        let out = pitr_at(&bin, &s3, &url).arg("verify").output().unwrap();
        if !out.status.success() {
            eprintln!(
                "campaign: verify after an expire was killed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            row.wrong += 1;
        }
    }
    ok(&mut expire());
    let kept = listed(pitr_at(&bin, &s3, &url));
    let newest: Vec<String> = held.keys().rev().take(3).rev().cloned().collect();
    if kept != newest {
        // An expire that completed keeps what its policy keeps: more means something a
        // killed one left behind holds backups back.
        let why = ok(expire().arg("--dry-run"));
        eprintln!("campaign: kept {kept:?}, not the newest three {newest:?}:\n{why}");
        row.wrong += 1;
    }
    let mut compared = 0;
    for id in &kept {
        match restored_state(&bin, &s3, &url, Some(id)) {
            Ok(s) if Some(&s) == held.get(id) => compared += 1,
            Ok(s) => {
                eprintln!(
                    "campaign: kept backup {id} restored to {s}, held {:?}",
                    held.get(id)
                );
                row.wrong += 1;
            }
            Err(e) => {
                eprintln!("campaign: kept backup {id} does not restore: {e}");
                row.wrong += 1;
            }
        }
    }
    let _ = pg.sql("SELECT pg_switch_wal()");
    let last = state(&pg);
    let seg = pg
        .sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        .unwrap();
    let _ = pg.sql("SELECT pg_switch_wal()");
    let _ = pg.wait_archived(&seg, Duration::from_secs(60));
    match restored_state(&bin, &s3, &url, None) {
        Ok(s) if s == last => compared += 1,
        other => {
            eprintln!("campaign: the newest point after the expires: {other:?}, held {last}");
            row.wrong += 1;
        }
    }
    row.runs = attempts;
    row.injected = kills;
    row.compared = compared;
    row.faults = format!("{kills} kills (of {attempts} expires started; the rest finished first)");
    row.checked = format!(
        "verify after each; {} kept backups and the newest point restored, {compared} compared equal",
        kept.len()
    );
    row.secs = started.elapsed().as_secs_f64();
    vec![row]
}
