//! `pitr check`: the replication connection from the command line, with the libpq
//! settings, exit codes and HINTs, and the repository's cluster compared with the server's.

use testbed::{Cluster, ClusterOptions, PASSWORD, PASSWORD_ROLES};

use crate::{pitr, socket, succeeds};

#[test]
fn check_reports_the_server_and_compares_the_repository() {
    let pg = Cluster::start_new(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let sysid = pg
        .sql("SELECT system_identifier FROM pg_control_system()")
        .unwrap();
    let repo = tempfile::tempdir().unwrap();
    let url = format!("file://{}/r", repo.path().display());

    // No repository yet: fine, and said.
    let out = succeeds(pitr().args(["check", "--pg", &socket(&pg), "--repo", &url]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("system {sysid}, timeline 1")),
        "{text}"
    );
    assert!(text.contains("segment size 1 MiB"), "{text}");
    assert!(text.contains("not initialized yet"), "{text}");

    // A repository this cluster archived into.
    crate::init_repo(&url, &pg, None);
    let seg = pg.switch_wal().unwrap();
    succeeds(
        pitr()
            .args(["wal-push", "--ahead", "0", "--repo", &url])
            .arg(pg.data_dir().join("pg_wal").join(&seg)),
    );
    let out = succeeds(pitr().args(["check", "--json", "--pg", &socket(&pg), "--repo", &url]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["system_identifier"], sysid.as_str());
    assert_eq!(v["repository_state"], "this cluster's");
    // The bed's cluster archives with something else: said as a warning, not an error.
    assert_eq!(v["archive_mode"], "on");
    assert!(
        v["archiving_warning"]
            .as_str()
            .is_some_and(|w| w.contains("pitr wal-push")),
        "{v}"
    );

    // Another cluster's server against it: refused, exit 4, with a HINT.
    let other = Cluster::start_new(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let out = pitr()
        .args(["check", "--pg", &socket(&other), "--repo", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("system identifier"), "{err}");
    assert!(err.contains("HINT:"), "{err}");
}

#[test]
fn check_says_why_it_cannot_connect() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    // A wrong password: exit 7, the server's message and a HINT about passwords.
    let (role, _) = PASSWORD_ROLES[0];
    let out = pitr()
        .args([
            "check",
            "--pg",
            &format!(
                "postgresql://{role}:wrong@127.0.0.1:{}/postgres?sslmode=disable",
                pg.port()
            ),
        ])
        .env("PGPASSFILE", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(err.contains("HINT: check the password"), "{err}");

    // Nothing listening: exit 7, naming the socket, with a HINT.
    let dir = tempfile::tempdir().unwrap();
    let out = pitr()
        .args([
            "check",
            "--pg",
            &format!("host={} port=1", dir.path().display()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".s.PGSQL.1"), "{err}");
    assert!(err.contains("HINT: is the server running"), "{err}");

    // A connection string that is not one: bad input.
    let out = pitr().args(["check", "--pg", "host"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn a_server_that_never_answers_is_given_up_after_connect_timeout() {
    // Accepts TCP connections (the kernel does) but never answers the startup.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = mute.local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let out = pitr()
        .args([
            "check",
            "--pg",
            &format!("host=127.0.0.1 port={port} sslmode=disable connect_timeout=2"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{err}"
    );
    assert!(err.contains("connect_timeout"), "{err}");
    assert!(err.contains("HINT:"), "{err}");
    drop(mute);
}

#[test]
fn no_password_is_ever_printed_and_hints_point_to_pgpassword() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    let (role, _) = PASSWORD_ROLES[0];
    let port = pg.port();
    let secret = "Pw-n0t-to-be-seen";
    let closed = testbed::free_port().unwrap();
    // (conninfo, exit code): malformed, refused options, wrong password, nothing there,
    // and the right password (with connect_timeout, which libpq takes) in JSON.
    let cases = [
        (
            format!("postgresql://nobody:{secret}%zz@127.0.0.1:1/postgres"),
            3,
        ),
        (
            format!("postgresql://nobody@127.0.0.1:1/postgres?password={secret}%zz"),
            3,
        ),
        (format!("host=127.0.0.1 password={secret} sslcert=c.pem"), 3),
        (format!("host=127.0.0.1 password=ab {secret}"), 3),
        (
            format!("postgresql://{role}:{secret}@127.0.0.1:{port}/postgres?sslmode=disable"),
            7,
        ),
        (
            format!("host=127.0.0.1 port={closed} password={secret} connect_timeout=2"),
            7,
        ),
        (
            format!(
                "host=127.0.0.1 port={port} user={role} password={PASSWORD} sslmode=disable connect_timeout=2"
            ),
            0,
        ),
    ];
    for (conninfo, code) in cases {
        for json in [false, true] {
            let mut cmd = pitr();
            cmd.arg("check").args(["--pg", &conninfo]);
            if json {
                cmd.arg("--json");
            }
            let out = cmd.env("PGPASSFILE", "/nonexistent").output().unwrap();
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.status.code(), Some(code), "{conninfo}: {all}");
            for password in [secret, PASSWORD] {
                assert!(!all.contains(password), "{conninfo}: {all}");
            }
            assert!(
                !all.contains("password="),
                "a HINT suggests password=: {all}"
            );
            if code == 7 && all.contains("password authentication failed") {
                assert!(all.contains("PGPASSWORD"), "{all}");
            }
        }
    }
}
