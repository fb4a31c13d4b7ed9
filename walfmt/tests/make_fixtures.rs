//! Makes the golden WAL fixtures for one PostgreSQL version (not a test: run by
//! `scripts/make-wal-fixtures`, which sets PITR_PG_BINDIR and PITR_FIXTURE_DIR).
//!
//! A cluster with 1 MiB segments (a non-default size) writes WAL with the edge cases on
//! purpose; its archived segments are stored gzipped with `expected.json`:
//! - the facts the server reported while writing: each test transaction's xid, commit time
//!   (track_commit_timestamp) and the LSN range its commit record lies in; restore points;
//! - on 15+, every record as pg_walinspect reports it (LSN, rmgr, length, xid, prev, desc);
//! - a segment whose tail is an older, recycled segment's WAL, and where the server's own
//!   crash recovery found valid WAL to end in it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use testbed::{Cluster, ClusterOptions, StopMode};

fn gz(src: &Path, dest: &Path) {
    let bytes = std::fs::read(src).unwrap();
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(dest).unwrap(),
        flate2::Compression::best(),
    );
    enc.write_all(&bytes).unwrap();
    enc.finish().unwrap();
}

fn lsn_now(pg: &Cluster) -> String {
    pg.sql("SELECT pg_current_wal_insert_lsn()").unwrap()
}

/// Runs `body` then `end` in one transaction; returns its xid and the LSN just before `end`.
fn xact(pg: &Cluster, body: &str, end: &str, kind: &str) -> Value {
    let out = pg
        .rows(&format!(
            "BEGIN; {body}; SELECT txid_current()::text, pg_current_wal_insert_lsn(); {end}"
        ))
        .unwrap();
    let row = out.iter().find(|r| r.len() == 2).unwrap();
    json!({ "kind": kind, "xid": row[0].parse::<u64>().unwrap(), "lo": row[1] })
}

fn finish_xact(pg: &Cluster, mut fact: Value, finish: Option<&str>) -> Value {
    if let Some(sql) = finish {
        fact["lo"] = json!(lsn_now(pg));
        pg.sql(sql).unwrap();
    }
    fact["hi"] = json!(lsn_now(pg));
    let xid = fact["xid"].as_u64().unwrap();
    let committed = fact["kind"].as_str().unwrap().starts_with("COMMIT");
    if committed {
        fact["time"] = json!(pg
            .sql(&format!(
                "SELECT to_char(pg_xact_commit_timestamp('{xid}'::xid) AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
            ))
            .unwrap());
    }
    fact
}

fn main_workload(pg: &Cluster) -> (Vec<Value>, Vec<Value>) {
    let sql = |q: &str| pg.sql(q).unwrap_or_else(|e| panic!("{q}: {e:#}"));
    sql("CREATE TABLE t (id int PRIMARY KEY, pad text)");
    let mut xacts = Vec::new();
    for i in 0..5 {
        let f = xact(
            pg,
            &format!("INSERT INTO t VALUES ({i}, md5('{i}'))"),
            "COMMIT",
            "COMMIT",
        );
        xacts.push(finish_xact(pg, f, None));
    }
    let f = xact(pg, "INSERT INTO t VALUES (100, 'x')", "ROLLBACK", "ABORT");
    xacts.push(finish_xact(pg, f, None));
    let mut points = Vec::new();
    let lo = lsn_now(pg);
    let hi = sql("SELECT pg_create_restore_point('golden-point')");
    points.push(json!({ "name": "golden-point", "lo": lo, "hi": hi }));
    let f = xact(
        pg,
        "INSERT INTO t VALUES (101, 'p1')",
        "PREPARE TRANSACTION 'p1'",
        "COMMIT_PREPARED",
    );
    xacts.push(finish_xact(pg, f, Some("COMMIT PREPARED 'p1'")));
    let f = xact(
        pg,
        "INSERT INTO t VALUES (102, 'p2')",
        "PREPARE TRANSACTION 'p2'",
        "ABORT_PREPARED",
    );
    xacts.push(finish_xact(pg, f, Some("ROLLBACK PREPARED 'p2'")));
    // Records larger than a page; some cross the 1 MiB segment boundaries.
    for i in 0..40 {
        sql(&format!(
            "SELECT pg_logical_emit_message(true, 'pitr', repeat(md5('{i}'), 900))"
        ));
    }
    // Full-page images after a checkpoint, and one more commit at the end.
    sql("CHECKPOINT");
    sql("UPDATE t SET pad = pad || 'x'");
    let f = xact(pg, "INSERT INTO t VALUES (200, 'last')", "COMMIT", "COMMIT");
    xacts.push(finish_xact(pg, f, None));
    (xacts, points)
}

fn walinspect_records(pg: &Cluster, start: &str, end: &str) -> Vec<Value> {
    pg.sql("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .unwrap();
    let rows = pg
        .rows(&format!(
            "SET TimeZone = 'UTC'; SELECT start_lsn, resource_manager, record_type, record_length, \
             xid, prev_lsn, description FROM pg_get_wal_records_info('{start}', '{end}')"
        ))
        .unwrap();
    // Descriptions only where the checker reads them, up to the first ';' (payload dumps
    // and invalidation lists would bloat the file).
    rows.into_iter()
        .filter(|r| r.len() == 7)
        .map(|mut r| {
            if r[1] == "Transaction" || r[2] == "RESTORE_POINT" {
                let keep = r[6].split(';').next().unwrap_or("").to_owned();
                r[6] = keep;
            } else {
                r[6].clear();
            }
            json!(r)
        })
        .collect()
}

fn recycled_tail(out: &Path, options: ClusterOptions) -> Value {
    // Few, small segments and checkpoints: the segment being written is a recycled one.
    let mut pg = Cluster::start_new(
        options
            .setting("max_wal_size", "2MB")
            .setting("min_wal_size", "2MB")
            .setting("archive_mode", "off"),
    )
    .unwrap();
    for _ in 0..3 {
        pg.generate_wal_segments(2).unwrap();
        pg.sql("CHECKPOINT").unwrap();
    }
    pg.sql("CREATE TABLE tail_marker AS SELECT 1 AS x").unwrap();
    let flushed = pg.sql("SELECT pg_current_wal_flush_lsn()").unwrap();
    let name = pg
        .sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        .unwrap();
    pg.stop(StopMode::Immediate).unwrap();
    let seg = pg.data_dir().join("pg_wal").join(&name);
    gz(&seg, &out.join(format!("recycled-{name}.gz")));
    // Crash recovery reads this very file and logs where valid WAL ended.
    let log_start = pg.server_log().len();
    pg.start().unwrap();
    let log = pg.server_log()[log_start..].to_owned();
    let line = log
        .lines()
        .find(|l| {
            l.contains("LOG:")
                && (l.contains("invalid record")
                    || l.contains("invalid magic")
                    || l.contains("unexpected pageaddr")
                    || l.contains("contrecord")
                    || l.contains("incorrect resource manager data checksum")
                    || l.contains("record with incorrect prev-link"))
        })
        .unwrap_or_else(|| panic!("no end-of-WAL line in the recovery log:\n{log}"))
        .to_owned();
    json!({ "file": format!("recycled-{name}.gz"), "segment": name, "flushed": flushed, "recovery_log": line })
}

#[test]
#[ignore = "makes fixtures; run by scripts/make-wal-fixtures"]
fn make_fixtures() {
    let out = PathBuf::from(std::env::var("PITR_FIXTURE_DIR").expect("PITR_FIXTURE_DIR"));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let options = || {
        ClusterOptions::default()
            .wal_segment_size_mb(1)
            .setting("max_prepared_transactions", "5")
            .setting("track_commit_timestamp", "on")
            .setting("wal_keep_size", "1GB")
            .setting("autovacuum", "off")
    };
    let (pg, archive) = Cluster::start_copy_archiving(options()).unwrap();
    let major = pg.bin().major();
    let sysid = pg
        .sql("SELECT system_identifier FROM pg_control_system()")
        .unwrap();

    let before = pg.switch_wal().unwrap();
    let start = pg.sql("SELECT pg_current_wal_insert_lsn()").unwrap();
    let (xacts, points) = main_workload(&pg);
    let last = pg.switch_wal().unwrap();
    let end = pg.sql("SELECT pg_current_wal_insert_lsn()").unwrap();
    pg.wait_archived(&last, Duration::from_secs(60)).unwrap();
    let records = if major >= 15 {
        walinspect_records(&pg, &start, &end)
    } else {
        Vec::new()
    };

    let mut segments: Vec<String> = std::fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.as_str() > before.as_str() && n.as_str() <= last.as_str())
        .collect();
    segments.sort();
    for s in &segments {
        gz(&archive.join(s), &out.join(format!("{s}.gz")));
    }
    drop(pg);
    let tail = recycled_tail(&out, options());

    let expected = json!({
        "pg_version": major,
        "system_identifier": sysid,
        "segment_size": 1 << 20,
        "segments": segments,
        "xacts": xacts,
        "restore_points": points,
        "records": records,
        "recycled": tail,
    });
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_string_pretty(&expected).unwrap(),
    )
    .unwrap();
}
