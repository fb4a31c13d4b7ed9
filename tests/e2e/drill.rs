//! `pitr drill` end to end, as the server's OS user: a cluster archives into the bed's S3
//! server and is backed up; rows are committed; the cluster stops. A drill restores the
//! latest point into a directory of its own, brings the server up reachable only through
//! its socket, runs the checks and amcheck, and reports RTO and RPO (0: the repository
//! holds nothing newer than what it restored); it leaves no server, no directory, and
//! nothing in the repository but its record: no new timeline, no .history. A failing
//! check exits 13 naming it; a drill killed midway is torn down by its watchdog.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use testbed::StopMode;

use crate::json;
use crate::restore::Source;

/// Server processes whose working directory lies under `dir`.
fn servers_under(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
            out.push(pid);
        }
    }
    out
}

/// What is left in the work directory.
fn left_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_drill_restores_checks_reports_and_leaves_nothing_behind() {
    let mut src = Source::new("drill");
    src.pg
        .sql("CREATE TABLE t (batch int, n int PRIMARY KEY)")
        .unwrap();
    // A tablespace: the drill puts it in its own directory, not where it is here (it
    // would be refused as not empty, or write into the source's).
    let ts = src.pg.server_dir("ts").unwrap();
    src.pg
        .sql(&format!("CREATE TABLESPACE ts LOCATION '{}'", ts.display()))
        .unwrap();
    src.pg
        .sql("CREATE TABLE t2 TABLESPACE ts AS SELECT g FROM generate_series(1, 10) g")
        .unwrap();
    // A restore_command in postgresql.conf (as Patroni writes one): none is left after the
    // drill's recovery all the same.
    src.pg.set_config("restore_command", "false").unwrap();
    src.backup();
    // Rows keyed 1..100 and 1001..1100 (n is the primary key: an index for amcheck).
    src.pg
        .sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 100) g")
        .unwrap();
    src.pg
        .sql("INSERT INTO t SELECT 2, g FROM generate_series(1001, 1100) g")
        .unwrap();
    src.archive_all();
    src.pg.stop(StopMode::Fast).unwrap();

    let user = src.pg.os_user().clone();
    let home = src.pg.server_dir("drill-home").unwrap();
    let work = src.pg.server_dir("drill-work").unwrap();
    let metrics = home.join("drill.prom");
    let drill = |extra: &[&str]| -> Output {
        let mut cmd = src.pitr();
        cmd.env("HOME", &home)
            .args([
                "drill",
                "--json",
                "--record",
                "--repo",
                &src.url,
                "--work-dir",
            ])
            .arg(&work)
            .arg("--pg-bin")
            .arg(src.pg.bin().dir())
            .arg("--metrics-file")
            .arg(&metrics)
            .args(extra);
        user.apply(&mut cmd);
        cmd.output().unwrap()
    };

    let t0 = Instant::now();
    let out = drill(&[
        "--check",
        "SELECT count(*) = 200 FROM t",
        "--check",
        "SELECT current_setting('archive_mode') = 'off' AND current_setting('listen_addresses') = ''",
        "--check",
        // The last restore_command the configuration files give (postgresql.auto.conf is
        // read last) is empty (before 14 it takes effect at a restart only).
        "SELECT (SELECT setting FROM pg_file_settings WHERE name = 'restore_command' ORDER BY seqno DESC LIMIT 1) = '' AND count(*) = 10 FROM t2",
        "--check",
        "SELECT count(*) = 0 FROM pg_replication_slots",
        "--amcheck",
    ]);
    let took = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let r = json(&out);
    assert_eq!(r["passed"], true, "{r}");
    let checks = r["checks"].as_array().unwrap();
    assert!(
        checks.len() >= 4,
        "two checks and amcheck per database: {r}"
    );
    assert!(checks.iter().all(|c| c["passed"] == true), "{r}");
    assert!(
        checks
            .iter()
            .any(|c| c["sql"].as_str().unwrap().contains("amcheck")),
        "{r}"
    );
    // RTO: within what the whole command took; RPO 0: nothing newer in the repository.
    let rto = r["rto_seconds"].as_f64().unwrap();
    assert!(rto > 0.0 && rto <= took, "{rto} of {took}: {r}");
    assert!(r["rpo_seconds"].as_f64().unwrap() < 0.001, "{r}");
    assert!(r["age_seconds"].as_f64().unwrap() >= 0.0, "{r}");
    let p = &r["phases"];
    let sum: f64 = ["plan", "files", "recovery", "promotion"]
        .iter()
        .map(|k| p[k].as_f64().unwrap())
        .sum();
    assert!(
        (sum - rto).abs() < 0.5,
        "phases {sum} against RTO {rto}: {r}"
    );
    assert_eq!(r["timeline"], 1, "{r}");
    assert!(r["backup"].is_string(), "{r}");
    // Nothing left: no server, no directory; the source's tablespace as it was.
    assert!(left_in(&work).is_empty(), "{:?}", left_in(&work));
    assert_eq!(left_in(&ts).len(), 1, "{:?}", left_in(&ts));
    assert!(servers_under(&work).is_empty());
    let m = std::fs::read_to_string(&metrics).unwrap();
    assert!(m.contains("pitr_drill_success 1\n"), "{m}");
    assert!(m.contains("pitr_drill_rto_seconds "), "{m}");

    // A failing check: exit 13, named; the drill still tears down and is recorded.
    let bad = "SELECT count(*) = 999 FROM t";
    let out = drill(&["--check", "SELECT true", "--check", bad]);
    assert_eq!(
        out.status.code(),
        Some(13),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(bad));
    let r = json(&out);
    assert_eq!(r["passed"], false, "{r}");
    let failed: Vec<&serde_json::Value> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{r}");
    assert_eq!(failed[0]["sql"], bad, "{r}");
    assert!(left_in(&work).is_empty());
    let m = std::fs::read_to_string(&metrics).unwrap();
    assert!(m.contains("pitr_drill_success 0\n"), "{m}");

    // The records; the repository holds WAL of timeline 1 only, and no .history.
    let list = |args: &[&str]| {
        json(&crate::succeeds(
            src.pitr()
                .args(["list", "--json", "--repo", &src.url])
                .args(args),
        ))
    };
    let v = list(&[]);
    assert_eq!(v["last_drill"]["passed"], false, "{v}");
    assert!(
        v["wal"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["timeline"] == 1),
        "{v}"
    );
    let v = list(&["--drills"]);
    let drills = v["drills"].as_array().unwrap();
    assert_eq!(drills.len(), 2, "{v}");
    assert_eq!(drills[0]["passed"], true, "{v}");
    assert!(drills[0]["rto_seconds"].as_f64().unwrap() > 0.0, "{v}");
    let text = String::from_utf8_lossy(
        &crate::succeeds(src.pitr().args(["list", "--repo", &src.url])).stdout,
    )
    .into_owned();
    assert!(text.contains("last drill:"), "{text}");
    let storage = crate::bed_s3_storage(&src.s3, &format!("{}/drill", src.s3.prefix()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let all = rt
        .block_on(repo::storage::list_all(storage.as_ref(), ""))
        .unwrap();
    assert!(
        !all.iter().any(|o| o.key.ends_with(".history")),
        "{:?}",
        all.iter().map(|o| &o.key).collect::<Vec<_>>()
    );

    // Killed while its server is up (a check that sleeps): the watchdog stops the server
    // and removes the directory.
    let mut cmd = src.pitr();
    cmd.env("HOME", &home)
        .args(["drill", "--repo", &src.url, "--work-dir"])
        .arg(&work)
        .arg("--pg-bin")
        .arg(src.pg.bin().dir())
        .args(["--check", "SELECT pg_sleep(60) IS NOT NULL"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    user.apply(&mut cmd);
    let mut child = crate::Reaped(Some(cmd.spawn().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while servers_under(&work).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the drill's server never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.signal("-KILL");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !servers_under(&work).is_empty() || !left_in(&work).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?} {:?}",
            servers_under(&work),
            left_in(&work)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
