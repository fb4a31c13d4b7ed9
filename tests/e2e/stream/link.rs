//! `pitr stream` and the link to its server: a primary that goes silent behind a proxy
//! (the network path lost, no socket closed) is noticed by the receive timeout and
//! streaming resumes over a new connection, while an idle one causes no reconnects; and as
//! the synchronous standby under `remote_write` and `remote_apply`, commits complete and
//! none is acknowledged before its WAL is durable in the repository.

use std::process::Stdio;
use std::time::{Duration, Instant};

use testbed::{Proxy, StopMode, PASSWORD, PASSWORD_ROLES};

use super::{caught_up_within, wait_sync, Bed, Streamer};

fn count(text: &str, what: &str) -> usize {
    text.matches(what).count()
}

#[test]
fn a_blackholed_primary_is_noticed_and_streaming_resumes_within_90_s() {
    let bed = Bed::new("blackhole");
    // The server gives up on the silent walsender (freeing the slot) after this; its
    // default of 60 s would do too, only slower.
    bed.pg
        .sql("ALTER SYSTEM SET wal_sender_timeout = '10s'")
        .unwrap();
    bed.pg.sql("SELECT pg_reload_conf()").unwrap();
    let proxy = Proxy::start(([127, 0, 0, 1], bed.pg.port()).into()).unwrap();
    // A password role over TCP, the password in the URI: it must never be printed.
    let (role, _) = PASSWORD_ROLES[0];
    let conninfo = format!(
        "postgresql://{role}:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=disable&connect_timeout=3",
        proxy.port()
    );
    let log_path = bed.dir.path().join("stream.log");
    let child = bed
        .pitr()
        .args([
            "stream",
            "--create-slot",
            "--receive-timeout",
            "5s",
            "--flush-interval",
            "200ms",
            "--repo",
            &bed.url,
            "--pg",
            &conninfo,
        ])
        .env("PGPASSFILE", "/nonexistent")
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
        .spawn()
        .unwrap();
    let stream = Streamer(Some(child));
    bed.wait_repository();
    bed.pg.sql("CREATE TABLE t (n int)").unwrap();
    caught_up_within(&bed.s3, &bed.url, &bed.pg, 1, Duration::from_secs(60));
    let log = || std::fs::read_to_string(&log_path).unwrap();

    // Idle for more than twice the receive timeout: the stream asks for replies at half
    // of it and stays on its one connection.
    let (conns, retries) = (proxy.connections(), count(&log(), "connecting again"));
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(proxy.connections(), conns, "{}", log());
    assert_eq!(count(&log(), "connecting again"), retries, "{}", log());

    // The path to the primary goes silent; the primary carries on.
    proxy.blackhole();
    let cut = Instant::now();
    bed.pg
        .sql("INSERT INTO t SELECT generate_series(1, 10000)")
        .unwrap();
    caught_up_within(&bed.s3, &bed.url, &bed.pg, 1, Duration::from_secs(90));
    assert!(proxy.connections() > conns, "{}", log());
    eprintln!(
        "caught up {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    stream.stop();
    let log = log();
    eprintln!("{log}");
    assert!(log.contains("no message from the server for 5 s"), "{log}");
    assert!(!log.contains(PASSWORD), "the password was printed:\n{log}");
}

/// pgbench for `seconds` under `level`; commits that wait longer than a minute fail the
/// test (they are released first, so it ends).
fn load_under(bed: &Bed, level: &str, seconds: u32) -> usize {
    bed.pg
        .sql(&format!("ALTER SYSTEM SET synchronous_commit = '{level}'"))
        .unwrap();
    bed.pg.sql("SELECT pg_reload_conf()").unwrap();
    std::thread::scope(|s| {
        let load = s.spawn(|| bed.load(seconds));
        let deadline = Instant::now() + Duration::from_secs(60 + u64::from(seconds));
        while !load.is_finished() {
            if Instant::now() > deadline {
                bed.pg
                    .sql("ALTER SYSTEM SET synchronous_standby_names = ''")
                    .unwrap();
                bed.pg.sql("SELECT pg_reload_conf()").unwrap();
                let _ = load.join();
                panic!("commits under synchronous_commit = {level} did not complete");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        load.join().unwrap()
    })
}

#[test]
fn remote_write_and_remote_apply_commits_complete_and_wait_for_durable_wal() {
    let bed = Bed::new("remote");
    let stream = bed.stream(true);
    wait_sync(&bed);
    bed.backup();
    let applied = load_under(&bed, "remote_apply", 5);
    let written = load_under(&bed, "remote_write", 5);
    assert!(applied > 20 && written > 20, "{applied} {written}");
    // What the stream reports: written and applied no further than flushed.
    assert_eq!(
        bed.pg
            .sql("SELECT write_lsn = flush_lsn AND replay_lsn = flush_lsn FROM pg_stat_replication WHERE application_name = 'pitr'")
            .unwrap(),
        "t"
    );
    // The stream dies with the host at once: every commit acknowledged must be in the
    // repository already.
    stream.kill();
    let mut pg = bed.pg;
    pg.stop(StopMode::Immediate).unwrap();
    let bed = Bed { pg, ..bed };
    let restored = bed.lose_and_restore();
    let committed = applied + written;
    assert!(
        restored >= committed,
        "{} acknowledged transactions lost",
        committed - restored
    );
}
