//! `pitr info` through the binary: the repository URL from `--repo` or `PITR_REPO`, the S3
//! settings from the environment (endpoint, path style, credentials), and the exit codes
//! for a repository that is not there, not pitr's, or damaged.

use std::sync::Arc;

use repo::codec::Codec;
use repo::repository::{ClusterIdentity, Repository};
use repo::storage::{FsStorage, Storage};

use crate::pitr;

fn identity() -> ClusterIdentity {
    ClusterIdentity {
        system_identifier: 7_311_111_111_111_111_111,
        pg_version: 15,
        wal_segment_size: 16 << 20,
    }
}

/// Creates the repository's config the way `pitr init` does.
fn create(url: &str, storage: Arc<dyn Storage>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(Repository::init_on(
        url.parse().unwrap(),
        storage,
        &identity(),
        &[],
        Arc::new(Codec::new(1, 1)),
    ))
    .unwrap();
}

#[test]
fn info_on_an_s3_repository_named_by_environment() {
    let s3 = testbed::S3Server::start().unwrap();
    let url = s3.repo_url("info");
    let out = pitr()
        .args(["info"])
        .env("PITR_REPO", &url)
        .envs(s3.env())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("repository {url} is not initialized")),
        "{err}"
    );
    assert!(err.contains("\nHINT: "), "{err}");

    create(
        &url,
        crate::bed_s3_storage(&s3, &format!("{}/info", s3.prefix())),
    );
    let out = crate::succeeds(
        pitr()
            .args(["info", "--json"])
            .env("PITR_REPO", &url)
            .envs(s3.env()),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["system_identifier"], "7311111111111111111");
    assert_eq!(v["pg_version"], 15);
    assert_eq!(v["format"], 2);
    assert_eq!(v["encryption"], "none");
}

#[test]
fn info_on_a_local_repository_and_its_failures() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/repo", dir.path().display());
    create(
        &url,
        Arc::new(FsStorage::create(dir.path().join("repo")).unwrap()),
    );
    let out = pitr().args(["info", "--repo", &url]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("system 7311111111111111111 (PostgreSQL 15)"),
        "{text}"
    );

    // A damaged config is corruption (exit 5), named.
    let config = dir.path().join("repo/config");
    let mut bytes = std::fs::read(&config).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&config, bytes).unwrap();
    let out = pitr().args(["info", "--repo", &url]).output().unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("object \"config\" is corrupt"));

    // A URL that is not one is bad input (exit 3) with a HINT.
    let out = pitr()
        .args(["info", "--repo", "/tmp/relative-or-not"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid repository URL") && err.contains("HINT: use s3://"),
        "{err}"
    );
}
