//! `pitr wal-fetch` exit codes as PostgreSQL's restore_command reads them: 0 with the
//! verified file in place; 1 only when the repository has no such file; above 125 for
//! everything else (S3 down, a damaged object, no repository), and never a file at %p then.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use testbed::{Cluster, ClusterOptions, S3Server};

use crate::pitr;

fn fetch(s3: &S3Server, url: &str, name: &str, dest: &Path) -> Output {
    pitr()
        .args(["wal-fetch", "--repo", url, name])
        .arg(dest)
        .envs(s3.env())
        .output()
        .unwrap()
}

#[test]
fn fetch_exit_codes_follow_the_restore_command_contract() {
    let mut s3 = S3Server::start_local().unwrap();
    let url = s3.repo_url("fetch");
    let (pg, archive) =
        Cluster::start_copy_archiving(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let segment = pg.switch_wal().unwrap();
    pg.wait_archived(&segment, Duration::from_secs(30)).unwrap();
    let original = std::fs::read(archive.join(&segment)).unwrap();
    crate::succeeds(
        pitr()
            .args(["wal-push", "--repo", &url])
            .arg(archive.join(&segment))
            .envs(s3.env()),
    );

    let out_dir = tempfile::tempdir().unwrap();
    let dest = out_dir.path().join("RECOVERYXLOG");

    // Present: exit 0, the same bytes, nothing else left in the directory.
    let out = fetch(&s3, &url, &segment, &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&dest).unwrap(), original);
    assert_eq!(
        std::fs::read_dir(out_dir.path()).unwrap().count(),
        1,
        "temp files left behind"
    );
    std::fs::remove_file(&dest).unwrap();

    // Absent: exit 1, for segments and for the .history probes of recovery_target_timeline.
    for missing in ["0000000100000000000000F0", "00000002.history"] {
        let out = fetch(&s3, &url, missing, &dest);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{missing}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!dest.exists());
    }

    // A damaged object: above 125, naming it, nothing at %p.
    let key = format!("wal/{}/{segment}", &segment[..16]);
    let stored = s3
        .storage_dir()
        .unwrap()
        .join(s3.bucket())
        .join(s3.prefix())
        .join("fetch")
        .join(&key);
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&stored, &bytes).unwrap();
    let out = fetch(&s3, &url, &segment, &dest);
    assert_eq!(
        out.status.code(),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&key),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dest.exists());

    // S3 down: above 125 (never "not found"), nothing at %p.
    s3.stop().unwrap();
    let out = fetch(&s3, &url, "0000000100000000000000F0", &dest);
    assert_eq!(
        out.status.code(),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dest.exists());
    s3.restart().unwrap();

    // A repository that does not exist (a wrong PITR_REPO) is an error, not an empty archive.
    let out = fetch(&s3, &s3.repo_url("nothing-here"), &segment, &dest);
    assert_eq!(out.status.code(), Some(200));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not initialized"));
    assert!(!dest.exists());
}
