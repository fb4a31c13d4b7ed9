//! `pitr init`: a repository is created on purpose, for one cluster, in an empty location;
//! every other command refuses a location without one (a typo in the prefix, an unmounted
//! directory) instead of starting a new repository there.

use testbed::{Cluster, ClusterOptions};

use crate::{pitr, succeeds};

#[test]
fn init_creates_a_repository_once_and_nothing_else_creates_one() {
    let pg = Cluster::start_new(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let sysid = pg
        .sql("SELECT system_identifier FROM pg_control_system()")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/r", dir.path().display());
    let seg = pg.switch_wal().unwrap();
    let segment = pg.data_dir().join("pg_wal").join(&seg);

    // Not initialized: wal-push exits 4 with a HINT and creates nothing.
    let out = pitr()
        .args(["wal-push", "--ahead", "0", "--repo", &url])
        .arg(&segment)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("is not initialized"), "{err}");
    assert!(err.contains("HINT") && err.contains("pitr init"), "{err}");
    assert!(!dir.path().join("r").exists(), "nothing created");
    // Nor does a backup.
    let out = pitr()
        .args(["backup", "--fast", "--wal", "--repo", &url, "--pg"])
        .arg(crate::socket(&pg))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(!dir.path().join("r").exists(), "nothing created");

    // A root whose parent does not exist (an unmounted mount point) is refused.
    let unmounted = format!("file://{}/mnt/r", dir.path().display());
    let out = pitr()
        .args(["init", "--repo", &unmounted, "--data-dir"])
        .arg(pg.data_dir())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("mnt").exists());

    // From the server, then the location is taken.
    let out = succeeds(pitr().args([
        "init",
        "--json",
        "--repo",
        &url,
        "--pg",
        &crate::socket(&pg),
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["system_identifier"], sysid.as_str());
    assert_eq!(v["wal_segment_size"], 1 << 20);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("r"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let out = pitr()
        .args(["init", "--repo", &url, "--data-dir"])
        .arg(pg.data_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("is not empty: it holds a repository"), "{err}");

    // Now archiving works, into 0600 files.
    succeeds(
        pitr()
            .args(["wal-push", "--ahead", "0", "--repo", &url])
            .arg(&segment),
    );
    let stored = dir.path().join("r/wal").join(&seg[..16]).join(&seg);
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", stored.display());

    // --data-dir of a directory that is not a cluster's: bad input.
    let out = pitr()
        .args([
            "init",
            "--repo",
            &format!("file://{}/x", dir.path().display()),
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}
