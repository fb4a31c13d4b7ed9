//! `pitr wal-inspect` on WAL archived by a real server: what it reports must agree with what
//! the server says it did.

use std::time::Duration;

use serde_json::Value;
use testbed::{Cluster, ClusterOptions};

use crate::pitr;

fn archiving_cluster(settings: &[(&str, &str)]) -> (Cluster, std::path::PathBuf) {
    let mut options = ClusterOptions::default();
    for (name, value) in settings {
        options = options.setting(*name, *value);
    }
    let (pg, archive) = Cluster::start_copy_archiving(options).unwrap();
    (pg, archive)
}

fn inspect_json(files: &[std::path::PathBuf]) -> Vec<Value> {
    let out = crate::succeeds(pitr().arg("wal-inspect").arg("--json").args(files));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn reports_commits_times_and_restore_points_of_an_archived_segment() {
    let (pg, archive) = archiving_cluster(&[("track_commit_timestamp", "on")]);
    pg.sql("CREATE TABLE t (v int)").unwrap();
    for i in 0..5 {
        pg.sql(&format!("INSERT INTO t VALUES ({i})")).unwrap();
    }
    pg.sql("SELECT pg_create_restore_point('before-the-mistake')")
        .unwrap();
    let rp_lsn: walfmt::Lsn = pg
        .sql("SELECT pg_current_wal_insert_lsn()")
        .unwrap()
        .parse()
        .unwrap();
    // The server's own record of each commit's xid and time.
    let commits = pg
        .rows(
            "SELECT xmin::text, to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', \
             'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM t ORDER BY v",
        )
        .unwrap();
    let segment = pg.switch_wal().unwrap();
    pg.wait_archived(&segment, Duration::from_secs(30)).unwrap();
    let sysid = pg
        .sql("SELECT system_identifier FROM pg_control_system()")
        .unwrap();

    let out = crate::succeeds(
        pitr()
            .args(["wal-inspect", "--json", "--records"])
            .arg(archive.join(&segment)),
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["file"], segment.as_str());
    assert_eq!(s["timeline"], 1);
    assert_eq!(s["system_identifier"], sysid.as_str());
    assert_eq!(s["pg_version"], pg.bin().major());
    assert_eq!(s["switched"], true);
    assert!(s["commits"].as_u64().unwrap() >= 6, "{s}");
    let records = s["records"].as_array().unwrap();
    for row in &commits {
        let (xid, time) = (row[0].parse::<u64>().unwrap(), &row[1]);
        let commit = records
            .iter()
            .find(|r| r["event"] == "COMMIT" && r["xact_xid"] == xid)
            .unwrap_or_else(|| panic!("no COMMIT of xid {xid}"));
        assert_eq!(commit["time"], time.as_str(), "commit time of xid {xid}");
    }
    let first = s["first_commit_time"].as_str().unwrap();
    let last = s["last_commit_time"].as_str().unwrap();
    assert!(first <= commits[0][1].as_str() && last >= commits[4][1].as_str());
    let rps = s["restore_points"].as_array().unwrap();
    assert_eq!(rps.len(), 1);
    assert_eq!(rps[0]["name"], "before-the-mistake");
    let rp_at: walfmt::Lsn = rps[0]["lsn"].as_str().unwrap().parse().unwrap();
    assert!(
        rp_at < rp_lsn,
        "restore point at {rp_at}, inserted before {rp_lsn}"
    );

    // The same as text, for a person.
    let out = pitr()
        .arg("wal-inspect")
        .arg(archive.join(&segment))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains(&format!("PostgreSQL {}", pg.bin().major())),
        "{text}"
    );
    assert!(
        text.contains("restore point \"before-the-mistake\""),
        "{text}"
    );
}

#[test]
fn finds_the_end_of_valid_wal_in_a_segment_being_written() {
    let (pg, _archive) = archiving_cluster(&[]);
    pg.sql("CREATE TABLE t AS SELECT 1 AS v").unwrap();
    let flushed = pg.sql("SELECT pg_current_wal_flush_lsn()").unwrap();
    let current = pg
        .sql("SELECT pg_walfile_name(pg_current_wal_flush_lsn())")
        .unwrap();
    let copy = tempfile::tempdir().unwrap();
    let partial = copy.path().join(format!("{current}.partial"));
    std::fs::copy(pg.data_dir().join("pg_wal").join(&current), &partial).unwrap();

    let s = &inspect_json(std::slice::from_ref(&partial))[0];
    let end: walfmt::Lsn = s["end_lsn"].as_str().unwrap().parse().unwrap();
    let flushed: walfmt::Lsn = flushed.parse().unwrap();
    assert!(
        end >= flushed,
        "valid WAL ends at {end}, before the flushed {flushed}"
    );
    assert!(s["end_reason"].is_string(), "{s}");
    assert_eq!(s["switched"], false);
}

#[test]
fn reads_backup_history_files() {
    let (pg, archive) = archiving_cluster(&[]);
    if pg.bin().major() >= 15 {
        pg.sql("SELECT pg_backup_start('nightly', true); SELECT pg_backup_stop()")
    } else {
        pg.sql("SELECT pg_start_backup('nightly', true, false); SELECT pg_stop_backup(false)")
    }
    .unwrap();
    pg.switch_wal().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let backup = loop {
        let found = std::fs::read_dir(&archive)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().ends_with(".backup"));
        if let Some(e) = found {
            break e.path();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no .backup file archived"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let b = &inspect_json(&[backup])[0];
    assert_eq!(b["kind"], "backup");
    assert_eq!(b["label"], "nightly");
    assert!(b["stop_lsn"].is_string());
}

#[test]
fn a_file_that_is_not_wal_is_refused_with_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("000000010000000000000001");
    std::fs::write(&junk, vec![0u8; 8192]).unwrap();
    let out = pitr().args(["wal-inspect"]).arg(&junk).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("pitr: error: file \""), "{err}");
    assert!(
        err.contains("is not valid WAL: not a WAL segment: invalid magic number 0000"),
        "{err}"
    );
    assert!(err.contains("\nHINT: "), "{err}");

    let missing = dir.path().join("nope");
    let out = pitr()
        .arg("wal-inspect")
        .arg(&missing)
        .arg(&junk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not read file"), "{err}");
    assert!(err.contains("2 of 2 files could not be inspected"), "{err}");
}
