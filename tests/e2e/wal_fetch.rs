//! `pitr wal-fetch` exit codes as PostgreSQL's restore_command reads them: 0 with the
//! verified file in place; 1 only when the repository has no such file; above 125 for
//! everything else (S3 down, a damaged object, no repository), and never a file at %p then.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use testbed::{Cluster, ClusterOptions, S3Server};

use crate::pitr;

/// A delivery that failed the way recovery must stop on: exit 200, with the reason shown.
fn exits_200(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

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
    crate::init_repo(&url, &pg, Some(&s3));
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
    let left: Vec<String> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".pitr") // the prefetch spool
        .collect();
    assert_eq!(left, ["RECOVERYXLOG"], "temp files left behind");
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
    exits_200(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&key),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dest.exists());

    // S3 down: above 125 (never "not found"), nothing at %p.
    s3.stop().unwrap();
    let out = fetch(&s3, &url, "0000000100000000000000F0", &dest);
    exits_200(&out);
    assert!(!dest.exists());
    // Timeline 1 has no history file in any repository (PostgreSQL asks for one when it
    // promotes off timeline 1): not found without asking.
    let out = fetch(&s3, &url, "00000001.history", &dest);
    assert_eq!(out.status.code(), Some(1));
    s3.restart().unwrap();

    // A repository that does not exist (a wrong PITR_REPO) is an error, not an empty archive.
    let out = fetch(&s3, &s3.repo_url("nothing-here"), &segment, &dest);
    assert_eq!(out.status.code(), Some(200));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not initialized"));
    assert!(!dest.exists());
}

#[test]
fn prefetched_segments_are_served_from_the_spool_verified_and_whole() {
    let mut s3 = S3Server::start_local().unwrap();
    let url = s3.repo_url("prefetch");
    let (pg, archive) =
        Cluster::start_copy_archiving(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    crate::init_repo(&url, &pg, Some(&s3));
    pg.sql("CREATE TABLE t (v int)").unwrap();
    let segments = pg.generate_wal_segments(5).unwrap();
    for seg in &segments {
        pg.wait_archived(seg, Duration::from_secs(60)).unwrap();
        crate::succeeds(
            pitr()
                .args(["wal-push", "--ahead", "0", "--repo", &url])
                .arg(archive.join(seg))
                .envs(s3.env()),
        );
    }

    // Recovery asks for the first segment: it comes from the repository, and a background
    // worker fills the spool (pg_wal/.pitr/fetch beside %p) with those that follow.
    let data = tempfile::tempdir().unwrap();
    let pg_wal = data.path().join("pg_wal");
    std::fs::create_dir(&pg_wal).unwrap();
    let dest = pg_wal.join("RECOVERYXLOG");
    let spool = pg_wal.join(".pitr").join("fetch");
    let out = fetch(&s3, &url, &segments[0], &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rest = &segments[1..];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !rest.iter().all(|s| spool.join(s).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the spool was not filled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The worker stops at the end of the archive and exits once nothing more is asked.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while repo::worker::running(&spool) {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // With S3 down, the spooled segments are still delivered, whole, from the spool, and
    // leave it as they are taken; a segment the spool does not hold is an error, never
    // "not found".
    s3.stop().unwrap();
    for seg in rest {
        let out = fetch(&s3, &url, seg, &dest);
        assert!(
            out.status.success(),
            "{seg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(archive.join(seg)).unwrap()
        );
        assert!(!spool.join(seg).exists(), "{seg} stays in the spool");
    }
    std::fs::remove_file(&dest).unwrap();
    let out = fetch(&s3, &url, &segments[0], &dest);
    exits_200(&out);
    assert!(!dest.exists());
    s3.restart().unwrap();

    // A spool filled from another repository is not trusted: its files are dropped.
    std::fs::write(spool.join(&segments[1]), b"not this repository's").unwrap();
    let other = s3.repo_url("prefetch-other");
    let out = fetch(&s3, &other, &segments[1], &dest);
    exits_200(&out);
    assert!(!spool.join(&segments[1]).exists());
    assert!(!dest.exists());
}

/// The file under the local S3 server's storage that holds the object whose key ends with
/// `suffix`.
fn stored_file(s3: &S3Server, suffix: &str) -> std::path::PathBuf {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(s3.storage_dir().unwrap(), &mut files);
    files
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .unwrap_or_else(|| panic!("no stored file for {suffix}"))
}

#[test]
fn bytes_changed_under_the_storage_are_damage_by_key_not_an_unreachable_repository() {
    let s3 = S3Server::start_local().unwrap();
    let url = s3.repo_url("damaged");
    let (pg, archive) =
        Cluster::start_copy_archiving(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    crate::init_repo(&url, &pg, Some(&s3));
    let segment = pg.switch_wal().unwrap();
    pg.wait_archived(&segment, Duration::from_secs(30)).unwrap();
    crate::succeeds(
        pitr()
            .args(["wal-push", "--ahead", "0", "--repo", &url])
            .arg(archive.join(&segment))
            .envs(s3.env()),
    );
    let flip = |path: &std::path::Path| {
        let mut bytes = std::fs::read(path).unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 0x40;
        std::fs::write(path, &bytes).unwrap();
    };
    flip(&stored_file(&s3, &format!("/{segment}")));
    let out_dir = tempfile::tempdir().unwrap();
    let dest = out_dir.path().join("RECOVERYXLOG");
    let out = fetch(&s3, &url, &segment, &dest);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(200), "{err}");
    assert!(
        err.contains("is corrupt") && err.contains(&segment),
        "{err}"
    );
    assert!(!dest.exists());

    flip(&stored_file(&s3, "/config"));
    let out = pitr()
        .args(["info", "--repo", &url])
        .envs(s3.env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("\"config\" is corrupt"), "{err}");
    assert!(err.contains("checksum"), "{err}");
}
