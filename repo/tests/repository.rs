//! Opening repositories: the config written at first use, and refusals of what does not
//! belong (another cluster, a newer format), on the filesystem and on the S3 server.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use repo::codec::Codec;
use repo::envelope::EncodeOptions;
use repo::objects::ObjectStore;
use repo::repository::{ClusterIdentity, OpenError, Repository, CONFIG_KEY};
use repo::storage::{PutMode, S3Storage, Storage};
use repo::url::RepoUrl;

fn cluster(sysid: u64) -> ClusterIdentity {
    ClusterIdentity {
        system_identifier: sysid,
        pg_version: 15,
        wal_segment_size: 16 << 20,
    }
}

fn codec() -> Arc<Codec> {
    Arc::new(Codec::new(1, 2))
}

/// `racing`: also create the repository from two tasks at once. Only for backends whose
/// put-if-absent is atomic: the bed's s3s-fs checks then writes, and two racing writers of
/// one key can leave its data and checksum metadata from different writers (AWS S3 cannot).
async fn refusals(url: RepoUrl, storage: Arc<dyn Storage>, racing: bool) {
    let none = Repository::open_on(url.clone(), storage.clone(), None, codec())
        .await
        .unwrap_err();
    assert!(matches!(none, OpenError::NotInitialized { .. }), "{none}");
    assert!(none.hint().is_some());

    let first = cluster(7_301_000_000_000_000_001);
    if racing {
        // Two processes creating it at once agree on one config.
        let (a, b) = tokio::join!(
            Repository::open_on(url.clone(), storage.clone(), Some(&first), codec()),
            Repository::open_on(url.clone(), storage.clone(), Some(&first), codec()),
        );
        assert_eq!(a.unwrap().config(), b.unwrap().config());
    } else {
        Repository::open_on(url.clone(), storage.clone(), Some(&first), codec())
            .await
            .unwrap();
    }

    let repo = Repository::open_on(url.clone(), storage.clone(), None, codec())
        .await
        .unwrap();
    assert_eq!(repo.config().system_identifier, "7301000000000000001");
    assert_eq!(repo.config().format, 1);
    assert_eq!(repo.config().wal_segment_size, 16 << 20);

    let other = Repository::open_on(
        url.clone(),
        storage.clone(),
        Some(&cluster(7_312_000_000_000_000_002)),
        codec(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        other.to_string(),
        "system identifier 7312000000000000002 does not match repository (7301000000000000001)"
    );
    assert!(other.hint().unwrap().contains("archive_command"));

    let mut upgraded = cluster(7_301_000_000_000_000_001);
    upgraded.pg_version = 16;
    let err = Repository::open_on(url.clone(), storage.clone(), Some(&upgraded), codec())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "PostgreSQL version 16 does not match repository (15)"
    );

    // A config from a future pitr.
    let objects = ObjectStore::new(storage.clone(), codec(), EncodeOptions::default());
    let future = br#"{"format": 2, "whatever": "new shape"}"#;
    objects
        .put(CONFIG_KEY, Bytes::from_static(future), PutMode::Overwrite)
        .await
        .unwrap();
    let err = Repository::open_on(url, storage, None, codec())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "repository format version 2 is not supported by this pitr (it reads version 1)"
    );
    assert!(err.hint().unwrap().contains("upgrade pitr"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_repository_config_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let url: RepoUrl = format!("file://{}/repo", dir.path().display())
        .parse()
        .unwrap();
    let storage = repo::repository::storage_for(&url).await.unwrap();
    refusals(url.clone(), storage, true).await;
    // The config is an ordinary enveloped object at the documented key.
    assert!(dir.path().join("repo/config").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_repository_config_and_refusals() {
    let server = testbed::S3Server::start().unwrap();
    let settings = support::s3_settings(&server);
    let url: RepoUrl = format!("s3://{}/{}", server.bucket(), server.prefix())
        .parse()
        .unwrap();
    refusals(url, Arc::new(S3Storage::connect(settings).await), false).await;
}
