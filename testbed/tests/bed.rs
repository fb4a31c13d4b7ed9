//! Proves the test bed itself: a real PostgreSQL cluster that archives, restarts, adopts a
//! copied data dir, authenticates password roles and leaves no postmaster behind; a real
//! S3 server that aws-sdk-s3, configured the way pitr configures it, can use, and that
//! injects storage faults on command; and a TCP proxy that goes silent on command.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use testbed::{Cluster, ClusterOptions, S3Server, StopMode, PASSWORD, PASSWORD_ROLES};

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

#[test]
fn archive_command_receives_switched_segment() {
    let mut pg = Cluster::init(ClusterOptions::default()).unwrap();
    let archive = pg.server_dir("archive").unwrap();
    pg.set_config(
        "archive_command",
        &format!("test ! -f '{0}/%f' && cp %p '{0}/%f'", archive.display()),
    )
    .unwrap();
    pg.start().unwrap();

    let segment = pg.switch_wal().unwrap();
    assert_eq!(segment.len(), 24, "segment name {segment:?}");
    pg.wait_archived(&segment, Duration::from_secs(30)).unwrap();
    let copied = std::fs::metadata(archive.join(&segment)).unwrap();
    assert_eq!(copied.len(), 16 << 20);
}

#[test]
fn generated_segments_are_full_and_archived() {
    let (pg, archive) =
        Cluster::start_copy_archiving(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    assert_eq!(pg.wal_segment_size().unwrap(), 1 << 20);

    let segments = pg.generate_wal_segments(3).unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    for seg in &segments {
        pg.wait_archived(seg, Duration::from_secs(30)).unwrap();
        assert_eq!(std::fs::metadata(archive.join(seg)).unwrap().len(), 1 << 20);
    }
}

#[test]
fn restart_and_stop_modes_keep_data() {
    let mut pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    let version_num: u32 = pg.sql("SHOW server_version_num").unwrap().parse().unwrap();
    assert_eq!(
        version_num / 10000,
        pg.bin().major(),
        "the bed runs the binaries it found"
    );
    pg.sql("CREATE TABLE t (v int); INSERT INTO t VALUES (1), (2)")
        .unwrap();
    pg.restart().unwrap();
    assert_eq!(pg.sql("SELECT sum(v) FROM t").unwrap(), "3");
    pg.sql("INSERT INTO t VALUES (3)").unwrap();
    pg.stop(StopMode::Immediate).unwrap();
    assert!(!pg.is_running());
    pg.start().unwrap();
    assert_eq!(pg.sql("SELECT sum(v) FROM t").unwrap(), "6");
    assert!(pg.server_log().contains("database system was interrupted"));
    // A server that goes away by itself (a FATAL in its startup process; here stopped
    // behind the bed's back) is not running, and starts again (the campaign's recovery
    // on a full pg_wal met this).
    let mut stop = std::process::Command::new(pg.bin().tool("pg_ctl"));
    stop.arg("-D")
        .arg(pg.data_dir())
        .args(["-m", "immediate", "-w", "stop"])
        .current_dir(pg.data_dir());
    pg.os_user().apply(&mut stop);
    assert!(stop.output().unwrap().status.success());
    assert!(!pg.is_running());
    pg.start().unwrap();
    assert_eq!(pg.sql("SELECT sum(v) FROM t").unwrap(), "6");
}

#[test]
fn adopted_copy_of_a_data_dir_starts() {
    let mut pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    pg.sql("CREATE TABLE kept AS SELECT 42 AS answer").unwrap();
    pg.stop(StopMode::Fast).unwrap();

    let target = tempfile::Builder::new()
        .prefix("pitr-adopt-")
        .tempdir()
        .unwrap();
    let copy = target.path().join("restored");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(pg.data_dir())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    drop(pg);

    let mut restored = Cluster::adopt(&copy, ClusterOptions::default()).unwrap();
    restored.start().unwrap();
    assert_eq!(restored.sql("SELECT answer FROM kept").unwrap(), "42");
    let rows = restored.rows("SELECT 1, 'two'").unwrap();
    assert_eq!(rows, vec![vec!["1".to_owned(), "two".to_owned()]]);
}

#[test]
fn password_roles_authenticate_over_tcp() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    for (role, method) in PASSWORD_ROLES {
        assert_eq!(
            pg.sql_as(role, PASSWORD, "SELECT current_user").unwrap(),
            role,
            "{method}"
        );
        let err = pg.sql_as(role, "wrong", "SELECT 1").unwrap_err();
        assert!(
            format!("{err:#}").contains("password authentication failed"),
            "{method}: {err:#}"
        );
    }
    let method = pg
        .sql(
            "SELECT auth_method FROM pg_hba_file_rules WHERE 'pitr_scram' = ANY(user_name) LIMIT 1",
        )
        .unwrap();
    assert_eq!(method, "scram-sha-256");
}

#[test]
fn no_postmaster_survives_drop_or_panic() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    let pid = pg.postmaster_pid().unwrap();
    assert!(process_alive(pid));
    drop(pg);
    assert!(!process_alive(pid), "postmaster {pid} survived drop");

    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
        tx.send(pg.postmaster_pid().unwrap()).unwrap();
        panic!("a test failing with a cluster in hand");
    })
    .join();
    assert!(panicked.is_err());
    let pid = rx.recv().unwrap();
    assert!(!process_alive(pid), "postmaster {pid} survived a panic");
}

#[test]
fn watchdog_stops_postmaster_when_test_process_dies() {
    // A child copy of this test binary starts a cluster and is killed with SIGKILL: no Drop
    // runs, and the watchdog must still take the postmaster down.
    if let Ok(pid_file) = std::env::var("PITR_BED_CHILD_PIDFILE") {
        let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
        // The pid, and the bed's dir for the cluster, which no Drop will remove.
        let root = pg.data_dir().parent().unwrap().display().to_string();
        std::fs::write(
            &pid_file,
            format!("{}\n{root}", pg.postmaster_pid().unwrap()),
        )
        .unwrap();
        std::thread::sleep(Duration::from_secs(300));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "watchdog_stops_postmaster_when_test_process_dies",
            "--nocapture",
        ])
        .env("PITR_BED_CHILD_PIDFILE", &pid_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (pid, root) = loop {
        if let Ok(text) = std::fs::read_to_string(&pid_file) {
            if let Some((pid, root)) = text.split_once('\n') {
                if let Ok(pid) = pid.parse::<u32>() {
                    break (pid, std::path::PathBuf::from(root));
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "child never started a cluster"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(process_alive(pid));
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while process_alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "postmaster {pid} outlived its killed test process"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // What the killed child could not clean up (one bed dir per run, left in /tmp).
    assert!(root.join("data").is_dir(), "{}", root.display());
    std::fs::remove_dir_all(&root).unwrap();
}

/// aws-sdk-s3 set up as pitr sets it up: endpoint, path style, region, static credentials.
fn s3_client(s3: &S3Server) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .endpoint_url(s3.endpoint())
        .force_path_style(true)
        // One attempt per call: the fault test sees each fault as it was injected.
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .region(Region::new(s3.region().to_owned()))
        .credentials_provider(Credentials::new(
            s3.access_key(),
            s3.secret_key(),
            None,
            None,
            "testbed",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_put_get_list_delete() {
    let s3 = S3Server::start().unwrap();
    let client = s3_client(&s3);
    let key = format!("{}/hello/world.txt", s3.prefix());

    client
        .put_object()
        .bucket(s3.bucket())
        .key(&key)
        .body(ByteStream::from_static(b"hello, s3"))
        .send()
        .await
        .unwrap();

    let got = client
        .get_object()
        .bucket(s3.bucket())
        .key(&key)
        .send()
        .await
        .unwrap();
    let body = got.body.collect().await.unwrap().into_bytes();
    assert_eq!(&body[..], b"hello, s3");

    let ranged = client
        .get_object()
        .bucket(s3.bucket())
        .key(&key)
        .range("bytes=7-8")
        .send()
        .await
        .unwrap();
    assert_eq!(
        &ranged.body.collect().await.unwrap().into_bytes()[..],
        b"s3"
    );

    // Put-if-absent: the repository's "never overwrite" rests on this.
    let again = client
        .put_object()
        .bucket(s3.bucket())
        .key(&key)
        .if_none_match("*")
        .body(ByteStream::from_static(b"other bytes"))
        .send()
        .await;
    let status = again
        .unwrap_err()
        .raw_response()
        .map(|r| r.status().as_u16());
    assert_eq!(status, Some(412));

    let listed = client
        .list_objects_v2()
        .bucket(s3.bucket())
        .prefix(format!("{}/hello/", s3.prefix()))
        .send()
        .await
        .unwrap();
    let keys: Vec<_> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, [key.as_str()]);

    client
        .delete_object()
        .bucket(s3.bucket())
        .key(&key)
        .send()
        .await
        .unwrap();
    let gone = client
        .head_object()
        .bucket(s3.bucket())
        .key(&key)
        .send()
        .await
        .unwrap_err();
    assert_eq!(gone.raw_response().map(|r| r.status().as_u16()), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_refuses_then_recovers() {
    let mut s3 = S3Server::start_local().unwrap();
    let client = s3_client(&s3);
    let key = format!("{}/k", s3.prefix());
    client
        .put_object()
        .bucket(s3.bucket())
        .key(&key)
        .body(ByteStream::from_static(b"v"))
        .send()
        .await
        .unwrap();

    s3.stop().unwrap();
    let down = tokio::net::TcpStream::connect(s3.endpoint().trim_start_matches("http://")).await;
    assert!(
        down.is_err(),
        "the port still accepts connections while stopped"
    );

    s3.restart().unwrap();
    let got = client
        .get_object()
        .bucket(s3.bucket())
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(&got.body.collect().await.unwrap().into_bytes()[..], b"v");
}

/// The HTTP status an S3 call failed with, if a response came at all.
fn status<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_injects_each_kind_of_fault_on_command() {
    use testbed::Fault;
    let s3 = S3Server::start_local().unwrap();
    let client = s3_client(&s3);
    let key = |k: &str| format!("{}/{k}", s3.prefix());
    let put = |k: String| {
        client
            .put_object()
            .bucket(s3.bucket())
            .key(k)
            .body(ByteStream::from(vec![7u8; 1000]))
            .send()
    };
    let exists = |k: String| async {
        s3.set_faults(0.0, &[], 0);
        let r = client.head_object().bucket(s3.bucket()).key(k).send().await;
        r.is_ok()
    };

    // 503 SlowDown: not performed.
    s3.set_faults(1.0, &[Fault::SlowDown], 1);
    let e = put(key("slow")).await.unwrap_err();
    assert_eq!(status(&e), Some(503), "{e:?}");
    assert!(!exists(key("slow")).await);
    // 500 after the write: performed.
    s3.set_faults(1.0, &[Fault::ErrorAfter], 2);
    let e = put(key("after")).await.unwrap_err();
    assert_eq!(status(&e), Some(500), "{e:?}");
    assert!(exists(key("after")).await);
    // A reset: no response at all (an RST, not a close), not performed.
    s3.set_faults(1.0, &[Fault::Reset], 3);
    let e = put(key("reset")).await.unwrap_err();
    assert_eq!(status(&e), None, "{e:?}");
    let said = format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e));
    assert!(said.contains("reset by peer"), "{said}");
    assert!(!exists(key("reset")).await);
    // A cut GET: the body ends early, as an error.
    put(key("whole")).await.unwrap();
    s3.set_faults(1.0, &[Fault::Cut], 4);
    let cut = match client
        .get_object()
        .bucket(s3.bucket())
        .key(key("whole"))
        .send()
        .await
    {
        Ok(r) => r.body.collect().await.is_err(),
        Err(_) => true,
    };
    assert!(cut, "a cut response read whole");
    // A stall: answered late, in full.
    s3.set_faults(1.0, &[Fault::Stall(Duration::from_millis(400))], 5);
    let started = std::time::Instant::now();
    let got = client
        .get_object()
        .bucket(s3.bucket())
        .key(key("whole"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes().len(), 1000);
    assert!(started.elapsed() >= Duration::from_millis(400));
    // Counted by kind; a rate of 0.3 hits about that share.
    let c = s3.faults_injected();
    assert_eq!(
        (c.slow_down, c.error_after, c.reset, c.cut, c.stall),
        (1, 1, 1, 1, 1),
        "{c:?}"
    );
    s3.set_faults(0.3, &[Fault::SlowDown], 6);
    let mut failed = 0;
    for _ in 0..200 {
        if client
            .head_object()
            .bucket(s3.bucket())
            .key(key("whole"))
            .send()
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    assert!((30..=90).contains(&failed), "{failed} of 200 at 0.3");
    assert_eq!(s3.faults_injected().slow_down, 1 + failed);
}

#[test]
fn a_blackholed_proxy_goes_silent_without_closing_and_new_connections_pass() {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    // An echo server behind it.
    let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let target = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = testbed::Proxy::start(target).unwrap();
    let connect = || {
        let c = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        c
    };
    let echoes = |c: &mut TcpStream| {
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).is_ok() && &got == b"ping"
    };
    let mut old = connect();
    assert!(echoes(&mut old));
    proxy.blackhole();
    // Silence, not a close: the read times out (a close would read 0 bytes at once).
    old.write_all(b"lost").unwrap();
    let mut buf = [0u8; 4];
    let err = old.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    let mut new = connect();
    assert!(echoes(&mut new));
    assert_eq!(proxy.connections(), 2);
}

/// A write whose client goes away mid-request (a SIGKILLed pitr) is stored whole or not
/// at all, as on S3: never its new body beside the old one's checksum. s3s-fs renames the
/// body into place and then writes the checksum beside it; if the request's future were
/// dropped in between (hyper drops it when the client closes), every later GET of that
/// object would fail its checksum (seen as a marker of a killed pitr that no one could
/// read); and the write given up on, still running, must not interleave with the next
/// write of the key or with a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_writes_whose_client_went_away_are_whole_or_absent() {
    use aws_sdk_s3::types::ChecksumMode;
    let s3 = S3Server::start_local().unwrap();
    let client = s3_client(&s3);
    let key = format!("{}/overwritten", s3.prefix());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut versions: Vec<Vec<u8>> = Vec::new();
    for i in 0..150u32 {
        let body: Vec<u8> = format!("version {i} ")
            .repeat(1 + (i as usize % 7) * 50)
            .into_bytes();
        versions.push(body.clone());
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = Duration::from_micros((seed >> 33) % 4000);
        let put = client
            .put_object()
            .bucket(s3.bucket())
            .key(&key)
            .body(ByteStream::from(body))
            .send();
        // Given up on after a random moment: the connection is dropped mid-request.
        let _ = tokio::time::timeout(wait, put).await;
        // Read at once (the write given up on may still be running on the server): a GET
        // sees one version whole, its body with its own checksum, as on S3.
        let got = client
            .get_object()
            .bucket(s3.bucket())
            .key(&key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await;
        let bytes = match got {
            Ok(got) => match got.body.collect().await {
                Ok(b) => Some(b.into_bytes()),
                Err(e) => panic!("after write {i}: the stored object fails its checksum: {e}"),
            },
            Err(_) => None,
        };
        let Some(bytes) = bytes else { continue };
        assert!(
            versions.iter().any(|v| v[..] == bytes[..]),
            "after write {i}: a body never written"
        );
    }
}
