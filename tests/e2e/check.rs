//! `pitr check`: the replication connection from the command line, with the libpq
//! settings, exit codes and HINTs, and the repository's cluster compared with the server's.

use testbed::{Cluster, ClusterOptions, PASSWORD_ROLES};

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
