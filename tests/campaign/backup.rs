//! Backups killed and backups under storage faults.
//!
//! A cluster of about 150 MB (pgbench scale 10), static during the kills, archives with
//! plain `pitr wal-push`. `pitr backup` is SIGKILLed at a random moment of its run, again
//! and again: after each kill every backup `pitr list` shows must read back whole
//! (`pitr verify --backup`), and at the end one more backup must succeed and restore to
//! the data the cluster holds. Then backups run while the S3 server injects faults: each
//! must either complete and verify, or fail with its exit code.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use testbed::{Cluster, ClusterOptions, Fault, S3Server};

use crate::common::{
    conninfo, counts_minus, describe, jitter, listed, ok, pitr, pitr_at, start_and_wait, state,
    PITR,
};
use crate::report::Row;
use crate::Scale;

pub fn run(scale: Scale) -> Vec<Row> {
    let s3 = S3Server::start_local().expect("start the S3 server");
    let url = s3.repo_url("campaign-backup");
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let bin = pg.expose_binary(Path::new(PITR)).unwrap();
    for (k, v) in s3.env() {
        pg.set_env(&k, &v);
    }
    pg.set_env("PITR_REPO", &url);
    pg.set_config("archive_mode", "on").unwrap();
    pg.set_config(
        "archive_command",
        &format!("'{}' wal-push %p", bin.display()),
    )
    .unwrap();
    ok(pitr(&s3, &url)
        .args(["init", "--data-dir"])
        .arg(pg.data_dir()));
    pg.start().unwrap();
    pg.pgbench(&["-i", "-s", if scale.smoke { "3" } else { "10" }, "-q"])
        .unwrap();
    let expected = state(&pg);
    let conn = conninfo(&pg);
    let backup = || {
        let mut c = pitr(&s3, &url);
        c.args(["backup", "--fast", "--pg", &conn]);
        c
    };

    // How long an uninterrupted backup takes: the kills land anywhere in it.
    let t = Instant::now();
    ok(&mut backup());
    let whole = t.elapsed();
    let mut verified: BTreeSet<String> = BTreeSet::new();

    let started = Instant::now();
    let mut row = Row {
        scenario: "backup: SIGKILL at a random moment of its run".into(),
        ..Row::default()
    };
    let mut kills = 0;
    let mut attempts = 0;
    let mut failed = 0;
    while kills < scale.backup_kills && attempts < scale.backup_kills * 3 {
        attempts += 1;
        let mut child = backup()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let at = jitter(whole.as_millis() as u64 * 95 / 100 + 1);
        std::thread::sleep(Duration::from_millis(at));
        let _ = child.kill();
        let status = child.wait().unwrap();
        match status.code() {
            None => kills += 1,
            Some(0) => {}
            Some(code) => {
                eprintln!("campaign: a backup failed by itself (exit {code})");
                failed += 1;
            }
        }
        // Whatever is listed now reads back whole.
        for id in listed(pitr(&s3, &url)) {
            if verified.contains(&id) {
                continue;
            }
            let out = pitr(&s3, &url)
                .args(["verify", "--backup", &id])
                .output()
                .unwrap();
            if !out.status.success() {
                eprintln!(
                    "campaign: backup {id}, listed after a kill, does not verify: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                row.wrong += 1;
            }
            verified.insert(id);
        }
    }
    // The next backup succeeds and restores to what the cluster holds.
    let out = ok(backup().arg("--json"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("backup --json");
    let newest = v["id"].as_str().expect("an id").to_owned();
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("data");
    ok(pitr_at(&bin, &s3, &url)
        .args([
            "restore",
            "--archive-mode",
            "off",
            "--backup",
            &newest,
            "--to",
        ])
        .arg(&to));
    let mut options = ClusterOptions::default().env("PITR_REPO", &url);
    for (k, v) in s3.env() {
        options = options.env(k, v);
    }
    let mut restored = Cluster::adopt(&to, options).unwrap();
    assert!(start_and_wait(&mut restored), "{}", restored.server_log());
    if state(&restored) != expected {
        eprintln!("campaign: the backup after the kills restored wrong");
        row.wrong += 1;
    }
    let _ = restored.stop(testbed::StopMode::Immediate);
    row.runs = attempts;
    row.failed_loudly = failed;
    row.injected = kills;
    row.compared = verified.len() as u64;
    row.faults = format!(
        "{kills} kills (of {attempts} backups started; {failed} failed by themselves, the rest finished first)"
    );
    row.checked = format!(
        "{} listed backups verified; the next backup restored and compared",
        verified.len()
    );
    row.secs = started.elapsed().as_secs_f64();
    let mut rows = vec![row];

    // Backups under storage faults: complete and verify, or fail with an exit code.
    let started = Instant::now();
    let (before, requests) = (s3.faults_injected(), s3.requests());
    let mut row = Row {
        scenario: "backup under storage faults (10% and 30% of requests)".into(),
        runs: scale.restores,
        ..Row::default()
    };
    let mut completed = 0;
    for i in 0..scale.restores {
        let rate = if i % 2 == 0 { 0.3 } else { 0.1 };
        s3.set_faults(rate, &Fault::all(Duration::from_secs(3)), 0xbac0 + i);
        let out = backup()
            .env("PITR_S3_ATTEMPT_TIMEOUT", "2s")
            .args(["--json"])
            .output()
            .unwrap();
        s3.set_faults(0.0, &[], 0);
        match out.status.code() {
            Some(0) => {
                completed += 1;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                let check = pitr(&s3, &url)
                    .args(["verify", "--backup", &id])
                    .output()
                    .unwrap();
                if !check.status.success() {
                    eprintln!(
                        "campaign: backup {id} completed under faults but does not verify: {}",
                        String::from_utf8_lossy(&check.stderr).trim()
                    );
                    row.wrong += 1;
                }
            }
            Some(code) => {
                eprintln!(
                    "campaign: backup at {rate} failed loudly (exit {code}): {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                );
                row.failed_loudly += 1;
            }
            None => panic!("a backup under faults died of a signal"),
        }
    }
    let c = counts_minus(s3.faults_injected(), before);
    row.faults = describe(c, s3.requests() - requests);
    row.injected = c.total();
    row.compared = completed + row.failed_loudly;
    row.checked = format!("{completed} completed backups verified");
    row.secs = started.elapsed().as_secs_f64();
    rows.push(row);
    rows
}
