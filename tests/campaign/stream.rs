//! `pitr stream --sync` with its process and the server killed again and again.
//!
//! The stream is the synchronous standby (`synchronous_standby_names = 'pitr'`): a commit
//! returns only once its WAL is durable in the repository. A writer inserts one row per
//! transaction and remembers each one PostgreSQL acknowledged. At random moments either
//! `pitr stream` is SIGKILLed (and started again) or the server is shut down immediately
//! (a crash: no checkpoint, nothing flushed that was not; then started again). Afterwards
//! `pitr verify` reads the whole repository, and a restore to the end of the WAL must hold
//! every acknowledged row.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::{Cluster, ClusterOptions, Fault, S3Server, StopMode, SUPERUSER};

use crate::common::{counts_minus, describe, jitter, ok, pitr_at, start_and_wait, tail, PITR};
use crate::report::Row;
use crate::Scale;

/// Where the writer connects (the port can change when the server is started again).
#[derive(Clone)]
struct Target {
    psql: std::path::PathBuf,
    socket: String,
    port: Arc<Mutex<u16>>,
}

impl Target {
    fn insert(&self, id: u64) -> bool {
        let port = self.port.lock().map(|p| *p).unwrap_or(0);
        Command::new(&self.psql)
            .env_remove("PGHOST")
            .env_remove("PGUSER")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", &self.socket])
            .args(["-p", &port.to_string(), "-U", SUPERUSER, "-d", "postgres"])
            .args(["-c", &format!("INSERT INTO acked VALUES ({id})")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

fn stream(bin: &Path, s3: &S3Server, url: &str, pg: &Cluster) -> Child {
    let conn = format!(
        "host={} port={} user={SUPERUSER}",
        pg.socket_dir().display(),
        pg.port()
    );
    pitr_at(bin, s3, url)
        .args(["stream", "--sync", "--create-slot", "--pg", &conn])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pitr stream")
}

/// Waits until the stream is the synchronous standby (false after 60 s).
fn synchronous(pg: &Cluster) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if pg
            .sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pitr' AND sync_state = 'sync'")
            .is_ok_and(|n| n == "1")
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

pub fn run(scale: Scale) -> Vec<Row> {
    let s3 = S3Server::start_local().expect("start the S3 server");
    let url = s3.repo_url("campaign-stream");
    let mut pg = Cluster::init(
        ClusterOptions::default()
            .wal_segment_size_mb(1)
            .setting("archive_mode", "off"),
    )
    .unwrap();
    let bin = pg.expose_binary(Path::new(PITR)).unwrap();
    ok(pitr_at(&bin, &s3, &url)
        .args(["init", "--data-dir"])
        .arg(pg.data_dir()));
    pg.start().unwrap();
    pg.sql("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .unwrap();
    let mut streamer = stream(&bin, &s3, &url, &pg);
    pg.sql("ALTER SYSTEM SET synchronous_standby_names = 'pitr'")
        .unwrap();
    pg.sql("SELECT pg_reload_conf()").unwrap();
    assert!(
        synchronous(&pg),
        "the stream never became the synchronous standby"
    );
    let conn = format!(
        "host={} port={} user={SUPERUSER}",
        pg.socket_dir().display(),
        pg.port()
    );
    ok(pitr_at(&bin, &s3, &url).args(["backup", "--fast", "--pg", &conn]));

    let target = Target {
        psql: pg.bin().client("psql"),
        socket: pg.socket_dir().display().to_string(),
        port: Arc::new(Mutex::new(pg.port())),
    };
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (target, acked, stop) = (target.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut id = 0u64;
            while !stop.load(Ordering::SeqCst) {
                id += 1;
                if target.insert(id) {
                    if let Ok(mut a) = acked.lock() {
                        a.insert(id);
                    }
                } else {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
    };

    let started = Instant::now();
    let (mut stream_kills, mut server_kills) = (0u64, 0u64);
    for i in 0..scale.stream_kills {
        std::thread::sleep(Duration::from_millis(300 + jitter(2500)));
        if i % 2 == 0 {
            let _ = streamer.kill();
            let _ = streamer.wait();
            stream_kills += 1;
            streamer = stream(&bin, &s3, &url, &pg);
            // Commits wait for it: it must be back before the next round.
            assert!(
                synchronous(&pg),
                "the stream did not come back after a kill"
            );
        } else {
            pg.stop(StopMode::Immediate).unwrap();
            server_kills += 1;
            pg.start().unwrap();
            if let Ok(mut p) = target.port.lock() {
                *p = pg.port();
            }
            // The stream's connection died with the server: it connects again by itself
            // (to the port it was given; a new port needs a new stream).
            if !synchronous(&pg) {
                let _ = streamer.kill();
                let _ = streamer.wait();
                streamer = stream(&bin, &s3, &url, &pg);
                assert!(synchronous(&pg), "the stream did not come back");
            }
        }
    }
    // Storage faults with everything up: 10% of requests, then 30%; the stream retries,
    // and a commit is acknowledged only once its WAL is stored.
    let faulted_from = acked.lock().map(|a| a.len()).unwrap_or(0);
    let (faults0, requests0) = (s3.faults_injected(), s3.requests());
    let fault_started = Instant::now();
    for (i, rate) in [0.1, 0.3].into_iter().enumerate() {
        s3.set_faults(rate, &Fault::all(Duration::from_secs(3)), 0x57e0 + i as u64);
        std::thread::sleep(scale.fault_phase / 2);
    }
    s3.set_faults(0.0, &[], 0);
    let faults = counts_minus(s3.faults_injected(), faults0);
    let requests = s3.requests() - requests0;
    let faulted_to = acked.lock().map(|a| a.len()).unwrap_or(0);
    let fault_secs = fault_started.elapsed().as_secs_f64();
    if !synchronous(&pg) {
        // It gave up (loudly) on a fault that lasted: started again.
        let _ = streamer.kill();
        let _ = streamer.wait();
        streamer = stream(&bin, &s3, &url, &pg);
        assert!(synchronous(&pg), "the stream did not come back");
    }
    // A little more load with everything up, then the writer stops.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let _ = writer.join();
    let acked: BTreeSet<u64> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    // SIGTERM: the stream stores what it holds and exits.
    let _ = Command::new("kill")
        .args(["-TERM", &streamer.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while streamer.try_wait().ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "pitr stream did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pg.stop(StopMode::Immediate).unwrap();

    let mut row = Row {
        scenario: "stream --sync: SIGKILL of pitr stream, immediate shutdown (crash) of the server, at random moments".into(),
        runs: stream_kills + server_kills,
        faults: format!("{stream_kills} kills of the stream, {server_kills} server crashes"),
        ..Row::default()
    };
    let verified = pitr_at(&bin, &s3, &url).arg("verify").output().unwrap();
    if !verified.status.success() {
        eprintln!(
            "campaign: verify after the stream kills failed: {}{}",
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
        row.wrong += 1;
    }
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("data");
    ok(pitr_at(&bin, &s3, &url)
        .args(["restore", "--archive-mode", "off", "--to"])
        .arg(&to));
    let mut options = ClusterOptions::default().env("PITR_REPO", &url);
    for (k, v) in s3.env() {
        options = options.env(k, v);
    }
    let mut restored = Cluster::adopt(&to, options).unwrap();
    assert!(
        start_and_wait(&mut restored),
        "{}",
        tail(&restored.server_log())
    );
    let back: BTreeSet<u64> = restored
        .sql("SELECT coalesce(string_agg(id::text, ','), '') FROM acked")
        .unwrap()
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    row.lost = acked.difference(&back).count() as u64;
    row.injected = stream_kills.min(server_kills);
    row.compared = acked.len() as u64;
    if row.lost > 0 {
        eprintln!(
            "campaign: {} acknowledged rows not restored, first {:?}",
            row.lost,
            acked.difference(&back).next()
        );
    }
    row.checked = format!(
        "{} acknowledged commits looked for in a restore to the end of the WAL; the repository verified",
        acked.len()
    );
    row.secs = started.elapsed().as_secs_f64() - fault_secs;
    let _ = restored.stop(StopMode::Immediate);
    // The commits acknowledged while faults were injected, by their ids' order of
    // acknowledgement (the writer counts up).
    let during: Vec<u64> = acked
        .iter()
        .copied()
        .skip(faulted_from)
        .take(faulted_to - faulted_from)
        .collect();
    let lost_during = during.iter().filter(|id| !back.contains(id)).count() as u64;
    let fault_row = Row {
        scenario: "stream --sync under storage faults (10% then 30% of requests)".into(),
        runs: 2,
        faults: describe(faults, requests),
        checked: format!(
            "{} commits acknowledged meanwhile, looked for in the same restore",
            during.len()
        ),
        lost: lost_during,
        injected: faults.total(),
        compared: during.len() as u64,
        secs: fault_secs,
        ..Row::default()
    };
    row.lost -= lost_during;
    vec![row, fault_row]
}
