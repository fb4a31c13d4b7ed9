//! Archiving under pgbench with faults, then restores under faults.
//!
//! One cluster (1 MiB segments, so that many segments pass) archives with
//! `archive_command = 'bash push.sh %p'`: the script runs `pitr wal-push` and, when told,
//! SIGKILLs it at a random moment; a thread SIGKILLs wal-push's background worker at
//! random moments. Then the bed's S3 server injects every kind of storage fault into 1%,
//! 10% and 50% of requests, then goes down. Afterwards every segment PostgreSQL marked
//! `.done` is fetched back from the repository and compared with the server's own copy,
//! and `pitr verify` reads the whole repository. Last, the cluster is restored (to the end
//! of its archive) with faults and stalls during the restore and during recovery: the data
//! must be exactly what the source held, or the restore must fail loudly.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testbed::{Cluster, ClusterOptions, Fault, S3Server, SUPERUSER};

use crate::common::{
    archived_whole, conninfo, counts_minus, describe, jitter, ok, pitr, pitr_at, start_and_wait,
    state, tail, PITR,
};
use crate::report::Row;
use crate::Scale;

/// The archive_command: pitr wal-push, SIGKILLed at a random moment of its run with the
/// odds (percent) in `$CTL/kill-odds`; each kill that landed (exit 137) is counted in
/// `$CTL/kills`. PostgreSQL sees a failure and retries.
const PUSH_SCRIPT: &str = r#"#!/bin/bash
"$PITR_CAMPAIGN_BIN" wal-push "$1" &
pid=$!
odds=$(cat "$PITR_CAMPAIGN_CTL/kill-odds" 2>/dev/null || echo 0)
if [ "$odds" -gt 0 ] && [ $((RANDOM % 100)) -lt "$odds" ]; then
  sleep "$(printf '0.%03d' $((RANDOM % 40)))"
  kill -9 "$pid" 2>/dev/null
fi
wait "$pid"
rc=$?
# Killed: a failure PostgreSQL retries in a second (a status above 125 would make its
# archiver exit and come back only up to a minute later).
if [ "$rc" -eq 137 ]; then echo k >>"$PITR_CAMPAIGN_CTL/kills"; exit 1; fi
exit "$rc"
"#;

/// The processes of the program `bin` (this campaign's own copy, nobody else's) whose
/// command line holds `word`.
fn pids_with(bin: &Path, word: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let bin = bin.as_os_str().as_encoded_bytes();
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let mut args = c.split(|b| *b == 0);
                args.next() == Some(bin) && args.any(|a| a == word.as_bytes())
            })
        })
        .collect()
}

/// The files PostgreSQL has marked archived.
fn done(pg: &Cluster) -> BTreeSet<String> {
    std::fs::read_dir(pg.data_dir().join("pg_wal/archive_status"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_suffix(".done")
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn ready(pg: &Cluster) -> usize {
    std::fs::read_dir(pg.data_dir().join("pg_wal/archive_status"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".ready"))
                .count()
        })
        .unwrap_or(0)
}

/// pgbench, running until killed.
fn pgbench(pg: &Cluster) -> Child {
    Command::new(pg.bin().client("pgbench"))
        .env_remove("PGHOST")
        .env_remove("PGUSER")
        .arg("-h")
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", SUPERUSER])
        .args(["-n", "-c", "2", "-j", "2", "-T", "100000", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbench")
}

/// A phase's record: the files PostgreSQL marked archived during it.
struct Phase {
    row: Row,
    archived: BTreeSet<String>,
}

pub fn run(scale: Scale) -> Vec<Row> {
    let mut s3 = S3Server::start_local().expect("start the S3 server");
    let url = s3.repo_url("campaign");
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let ctl = pg.server_dir("campaign").unwrap();
    let script = ctl.join("push.sh");
    std::fs::write(&script, PUSH_SCRIPT).unwrap();
    let bin = pg.expose_binary(Path::new(PITR)).unwrap();
    for (k, v) in s3.env() {
        pg.set_env(&k, &v);
    }
    pg.set_env("PITR_REPO", &url);
    pg.set_env("PITR_CAMPAIGN_BIN", bin.to_str().unwrap());
    pg.set_env("PITR_CAMPAIGN_CTL", ctl.to_str().unwrap());
    pg.set_env("PITR_S3_ATTEMPT_TIMEOUT", "5s");
    for (name, value) in [
        ("archive_mode", "on".to_owned()),
        (
            "archive_command",
            format!("/bin/bash '{}' %p", script.display()),
        ),
        // Every segment stays in pg_wal, with its .done, to be compared at the end.
        ("wal_keep_size", "16GB".into()),
        ("max_wal_size", "16GB".into()),
        ("checkpoint_timeout", "1h".into()),
    ] {
        pg.set_config(name, &value).unwrap();
    }
    ok(pitr(&s3, &url)
        .args(["init", "--data-dir"])
        .arg(pg.data_dir()));
    pg.start().unwrap();
    pg.pgbench(&["-i", "-s", "2", "-q"]).unwrap();
    let conn = conninfo(&pg);
    ok(pitr(&s3, &url).args(["backup", "--fast", "--pg", &conn]));
    let mut bench = pgbench(&pg);
    let odds = ctl.join("kill-odds");
    let kills_file = ctl.join("kills");
    let push_kills = || {
        std::fs::read_to_string(&kills_file)
            .map(|s| s.lines().count() as u64)
            .unwrap_or(0)
    };

    // The worker killer: SIGKILL a running wal-push worker now and then while told to.
    let killing = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let worker_kills = Arc::new(AtomicU64::new(0));
    let killer = {
        let (killing, stop, worker_kills) = (killing.clone(), stop.clone(), worker_kills.clone());
        let bin = bin.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(30 + jitter(300)));
                if !killing.load(Ordering::SeqCst) {
                    continue;
                }
                for pid in pids_with(&bin, "wal-push-worker") {
                    if rustix::process::kill_process(
                        rustix::process::Pid::from_raw(pid).expect("a pid"),
                        rustix::process::Signal::KILL,
                    )
                    .is_ok()
                    {
                        worker_kills.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };

    let mut phases: Vec<Phase> = Vec::new();
    let mut seen = done(&pg);
    // One step of load: a segment switch (pgbench writes, this closes segments).
    let step = |pg: &Cluster| {
        let _ = pg.sql("SELECT pg_switch_wal()");
        std::thread::sleep(Duration::from_millis(150));
    };
    let mut finish = |pg: &Cluster, mut row: Row, started: Instant, seen: &mut BTreeSet<String>| {
        let now = done(pg);
        let archived: BTreeSet<String> = now.difference(seen).cloned().collect();
        *seen = now;
        row.secs = started.elapsed().as_secs_f64();
        row.checked = format!("{} files archived in the phase", archived.len());
        row.compared = archived.len() as u64;
        phases.push(Phase { row, archived });
    };

    // 1. Kills of wal-push and of its worker.
    let started = Instant::now();
    std::fs::write(&odds, "50").unwrap();
    killing.store(true, Ordering::SeqCst);
    let limit = if scale.smoke { 90 } else { 900 };
    while (push_kills() < scale.push_kills
        || worker_kills.load(Ordering::SeqCst) < scale.push_kills)
        && started.elapsed() < Duration::from_secs(limit)
    {
        step(&pg);
    }
    killing.store(false, Ordering::SeqCst);
    std::fs::write(&odds, "0").unwrap();
    let (pk, wk) = (push_kills(), worker_kills.load(Ordering::SeqCst));
    finish(
        &pg,
        Row {
            scenario: "wal-push under pgbench: SIGKILL of wal-push and of its push-ahead worker at random moments".into(),
            runs: pk + wk,
            faults: format!("{pk} kills of wal-push, {wk} of its worker"),
            injected: pk.min(wk),
            ..Row::default()
        },
        started,
        &mut seen,
    );

    // 2. Storage faults at 1%, 10%, 50% of requests.
    // (A short run leaves 1% out: in a few seconds it may inject nothing.)
    let rates: &[f64] = if scale.smoke {
        &[0.25, 0.50]
    } else {
        &[0.01, 0.10, 0.50]
    };
    for (i, &rate) in rates.iter().enumerate() {
        let started = Instant::now();
        let (before, requests) = (s3.faults_injected(), s3.requests());
        s3.set_faults(rate, &Fault::all(Duration::from_secs(3)), 0x5eed + i as u64);
        while started.elapsed() < scale.fault_phase {
            step(&pg);
        }
        s3.set_faults(0.0, &[], 0);
        let c = counts_minus(s3.faults_injected(), before);
        finish(
            &pg,
            Row {
                scenario: format!(
                    "wal-push under pgbench: storage faults in {:.0}% of requests",
                    rate * 100.0
                ),
                runs: 1,
                faults: describe(c, s3.requests() - requests),
                injected: c.total(),
                ..Row::default()
            },
            started,
            &mut seen,
        );
    }

    // 3. The server down, then back.
    let started = Instant::now();
    s3.stop().unwrap();
    while started.elapsed() < scale.outage {
        step(&pg);
    }
    s3.restart().unwrap();
    let down = started.elapsed().as_secs();
    let ready_then = ready(&pg);
    // Until everything waiting is archived.
    let deadline = Instant::now() + Duration::from_secs(if scale.smoke { 180 } else { 900 });
    let _ = bench.kill();
    let _ = bench.wait();
    let _ = pg.sql("SELECT pg_switch_wal()");
    while ready(&pg) > 0 {
        assert!(
            Instant::now() < deadline,
            "the archive did not catch up: {} files ready",
            ready(&pg)
        );
        std::thread::sleep(Duration::from_millis(500));
        // A new segment wakes an archiver waiting out its retry interval.
        let _ = pg.sql("SELECT pg_switch_wal()");
    }
    finish(
        &pg,
        Row {
            scenario: format!("wal-push under pgbench: the S3 server down for {down} s, then back"),
            runs: 1,
            faults: format!("{down} s down, {ready_then} files waiting when it came back"),
            injected: down.max(1),
            ..Row::default()
        },
        started,
        &mut seen,
    );
    stop.store(true, Ordering::SeqCst);
    let _ = killer.join();

    // Everything marked .done is in the repository, byte for byte.
    let fetched = tempfile::tempdir().unwrap();
    let mut missing: BTreeSet<String> = BTreeSet::new();
    let all = done(&pg);
    for name in &all {
        if let Err(why) = archived_whole(pitr(&s3, &url), &pg, name, fetched.path()) {
            eprintln!("campaign: {name} marked archived but {why}");
            missing.insert(name.clone());
        }
    }
    let verified = pitr(&s3, &url).args(["verify"]).output().unwrap();
    if !verified.status.success() {
        eprintln!(
            "campaign: verify failed: {}{}",
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
    }
    // Files marked archived before the first phase (the backup's) count with it.
    let attributed: BTreeSet<&String> = phases.iter().flat_map(|p| &p.archived).collect();
    let before_phases = missing.iter().filter(|m| !attributed.contains(m)).count() as u64;
    let mut rows: Vec<Row> = phases
        .into_iter()
        .map(|mut p| {
            p.row.lost = p.archived.intersection(&missing).count() as u64;
            p.row.checked = format!(
                "{} files marked archived in the phase, each fetched back and compared",
                p.archived.len()
            );
            p.row
        })
        .collect();
    rows[0].lost += before_phases;
    if !verified.status.success() {
        // The repository does not read back whole: counted against the last phase.
        if let Some(last) = rows.last_mut() {
            last.wrong += 1;
        }
    }

    // 4. Restores to the end of the archive under faults: from a backup taken now (the
    // phases above made hundreds of segments; replaying them all under faults, six
    // times, would take the better part of an hour), then some more WAL.
    ok(pitr(&s3, &url).args(["backup", "--fast", "--pg", &conn]));
    let mut bench = pgbench(&pg);
    let more = Instant::now();
    while more.elapsed() < Duration::from_secs(if scale.smoke { 3 } else { 15 }) {
        let _ = pg.sql("SELECT pg_switch_wal()");
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = bench.kill();
    let _ = bench.wait();
    // Its backends may still commit what they were running: wait until they are gone.
    let gone = Instant::now() + Duration::from_secs(60);
    while pg
        .sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'")
        .ok()
        .as_deref()
        != Some("0")
    {
        assert!(Instant::now() < gone, "pgbench's backends stayed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = pg.sql("SELECT pg_switch_wal()");
    let deadline = Instant::now() + Duration::from_secs(300);
    while ready(&pg) > 0 {
        assert!(Instant::now() < deadline, "the archive did not catch up");
        std::thread::sleep(Duration::from_millis(300));
    }
    let expected = state(&pg);
    pg.stop(testbed::StopMode::Fast).unwrap();
    rows.push(restores(&s3, &url, &bin, scale, &expected));
    rows
}

/// Restores of the whole archive with storage faults during the restore and the recovery.
fn restores(s3: &S3Server, url: &str, bin: &Path, scale: Scale, expected: &str) -> Row {
    let started = Instant::now();
    let mut row = Row {
        scenario: "restore and wal-fetch (recovery to the end of the archive) under storage faults and stalls".into(),
        runs: scale.restores,
        ..Row::default()
    };
    let (before, requests) = (s3.faults_injected(), s3.requests());
    // The first is the short run's: high enough that its hundred-odd requests meet faults.
    let rates = [0.2, 0.05, 0.5, 0.1, 0.3, 0.02];
    let mut checked = 0;
    for i in 0..scale.restores {
        let rate = rates[i as usize % rates.len()];
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("data");
        s3.set_faults(rate, &Fault::all(Duration::from_secs(3)), 0xfeed + i);
        let out = pitr_at(bin, s3, url)
            .env("PITR_S3_ATTEMPT_TIMEOUT", "2s")
            .args(["restore", "--archive-mode", "off", "--to"])
            .arg(&to)
            .output()
            .unwrap();
        if !out.status.success() {
            let code = out.status.code();
            eprintln!(
                "campaign: restore at {rate} failed loudly (exit {code:?}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            assert!(
                code.is_some_and(|c| c != 0),
                "a restore died without an exit code"
            );
            row.failed_loudly += 1;
            continue;
        }
        let mut options = ClusterOptions::default()
            .env("PITR_REPO", url)
            .env("PITR_S3_ATTEMPT_TIMEOUT", "2s");
        for (k, v) in s3.env() {
            options = options.env(k, v);
        }
        let mut restored = Cluster::adopt(&to, options).unwrap();
        let promoted = start_and_wait(&mut restored);
        s3.set_faults(0.0, &[], 0);
        if !promoted {
            eprintln!(
                "campaign: recovery at {rate} stopped (failed loudly):\n{}",
                tail(&restored.server_log())
            );
            row.failed_loudly += 1;
            continue;
        }
        let got = state(&restored);
        checked += 1;
        if got != expected {
            eprintln!(
                "campaign: restore at {rate} came back as {got}, the source held {expected}\n{}",
                tail(&restored.server_log())
            );
            row.wrong += 1;
        }
        let _ = restored.stop(testbed::StopMode::Immediate);
    }
    s3.set_faults(0.0, &[], 0);
    row.faults = describe(
        counts_minus(s3.faults_injected(), before),
        s3.requests() - requests,
    );
    row.checked = format!("{checked} restores compared with the source (row counts and sums)");
    row.compared = checked + row.failed_loudly;
    row.injected = counts_minus(s3.faults_injected(), before).total();
    row.secs = started.elapsed().as_secs_f64();
    row
}
