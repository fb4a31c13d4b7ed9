//! Creating and opening repositories: the config written by init in an empty location only,
//! and refusals of what does not belong (no repository, another cluster, a newer format),
//! on the filesystem and on the S3 server.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use repo::codec::Codec;
use repo::envelope::EncodeOptions;
use repo::objects::ObjectStore;
use repo::repository::{ClusterIdentity, OpenError, Repository, CONFIG_KEY};
use repo::slots::{KeyError, KeySetting, NewSlot};
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
    let none = Repository::open_on(
        url.clone(),
        storage.clone(),
        &KeySetting::None,
        None,
        codec(),
    )
    .await
    .unwrap_err();
    assert!(matches!(none, OpenError::NotInitialized { .. }), "{none}");
    assert!(none.hint().is_some());

    let first = cluster(7_301_000_000_000_000_001);
    // Opening with a cluster never creates one.
    let none = Repository::open_on(
        url.clone(),
        storage.clone(),
        &KeySetting::None,
        Some(&first),
        codec(),
    )
    .await
    .unwrap_err();
    assert!(matches!(none, OpenError::NotInitialized { .. }), "{none}");
    assert!(none.hint().unwrap().contains("pitr init"));
    if racing {
        // Two inits at once: one creates it, the other is refused.
        let (a, b) = tokio::join!(
            Repository::init_on(url.clone(), storage.clone(), &first, &[], codec()),
            Repository::init_on(url.clone(), storage.clone(), &first, &[], codec()),
        );
        assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    } else {
        Repository::init_on(url.clone(), storage.clone(), &first, &[], codec())
            .await
            .unwrap();
    }
    let again = Repository::init_on(url.clone(), storage.clone(), &first, &[], codec())
        .await
        .unwrap_err();
    assert!(matches!(again, OpenError::NotEmpty { .. }), "{again}");
    assert!(
        again.to_string().contains("it holds a repository"),
        "{again}"
    );

    let repo = Repository::open_on(
        url.clone(),
        storage.clone(),
        &KeySetting::None,
        None,
        codec(),
    )
    .await
    .unwrap();
    assert_eq!(repo.config().system_identifier, "7301000000000000001");
    assert_eq!(repo.config().format, 2);
    assert_eq!(repo.config().wal_segment_size, 16 << 20);

    let other = Repository::open_on(
        url.clone(),
        storage.clone(),
        &KeySetting::None,
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
    let err = Repository::open_on(
        url.clone(),
        storage.clone(),
        &KeySetting::None,
        Some(&upgraded),
        codec(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "PostgreSQL version 16 does not match repository (15)"
    );

    // A config from a future pitr.
    let objects = ObjectStore::new(storage.clone(), codec(), EncodeOptions::default());
    let future = br#"{"format": 3, "whatever": "new shape"}"#;
    objects
        .put(CONFIG_KEY, Bytes::from_static(future), PutMode::Overwrite)
        .await
        .unwrap();
    let err = Repository::open_on(url, storage, &KeySetting::None, None, codec())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "repository format version 3 is not supported by this pitr (it reads versions 1 to 2)"
    );
    assert!(err.hint().unwrap().contains("upgrade pitr"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_repository_config_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let url: RepoUrl = format!("file://{}/repo", dir.path().display())
        .parse()
        .unwrap();
    // Opening storage creates nothing; only init makes the root.
    let storage = repo::repository::storage_for(&url).await.unwrap();
    assert!(storage
        .put("x", Bytes::from_static(b"x"), PutMode::IfAbsent)
        .await
        .is_err());
    assert!(!dir.path().join("repo").exists());
    let storage = repo::repository::storage_to_init(&url).await.unwrap();
    refusals(url.clone(), storage, true).await;
    // The config is an ordinary enveloped object at the documented key; directories are
    // 0700 and files 0600 whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert!(dir.path().join("repo/config").is_file());
    assert_eq!(mode("repo"), 0o700);
    assert_eq!(mode("repo/config"), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_needs_an_empty_location_whose_parent_exists() {
    let dir = tempfile::tempdir().unwrap();
    let nested: RepoUrl = format!("file://{}/not-mounted/repo", dir.path().display())
        .parse()
        .unwrap();
    let first = cluster(7_301_000_000_000_000_001);
    let err = Repository::init(&nested, &first, &[], codec())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not-mounted"), "{err}");
    assert!(!dir.path().join("not-mounted").exists());

    let url: RepoUrl = format!("file://{}", dir.path().display()).parse().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a repository").unwrap();
    let err = Repository::init(&url, &first, &[], codec())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{url} is not empty: it holds \"notes.txt\"")
    );
    assert!(!dir.path().join("config").exists());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_repository_opens_only_with_its_key_and_refuses_downgrades() {
    let dir = tempfile::tempdir().unwrap();
    let url: RepoUrl = format!("file://{}/repo", dir.path().display())
        .parse()
        .unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    let other = dir.path().join("other-key");
    std::fs::write(&other, [43u8; 32]).unwrap();
    let storage = repo::repository::storage_to_init(&url).await.unwrap();
    let first = cluster(7_301_000_000_000_000_001);
    let repo = Repository::init_on(
        url.clone(),
        storage.clone(),
        &first,
        &[NewSlot::File(key.clone())],
        codec(),
    )
    .await
    .unwrap();
    assert_eq!(repo.config().encryption, "aes-256-gcm-subkey");
    // Nothing stored names the cluster in plaintext.
    let config = std::fs::read(dir.path().join("repo/config")).unwrap();
    assert!(!config.windows(19).any(|w| w == b"7301000000000000001"));

    let by_key = KeySetting::File(key.clone());
    let repo = Repository::open_on(url.clone(), storage.clone(), &by_key, Some(&first), codec())
        .await
        .unwrap();
    repo.objects()
        .put("wal/x", Bytes::from_static(b"secret"), PutMode::IfAbsent)
        .await
        .unwrap();
    assert_eq!(&repo.objects().get("wal/x").await.unwrap().1[..], b"secret");

    let err = |setting: KeySetting| {
        let (url, storage) = (url.clone(), storage.clone());
        async move {
            Repository::open_on(url, storage, &setting, None, codec())
                .await
                .unwrap_err()
        }
    };
    let none = err(KeySetting::None).await;
    assert!(matches!(none, OpenError::Key(KeyError::NotSet)), "{none}");
    assert!(none.hint().unwrap().contains("PITR_KEY_FILE"));
    let wrong = err(KeySetting::File(other.clone())).await;
    assert!(
        matches!(wrong, OpenError::Key(KeyError::NoSlot(_))),
        "{wrong}"
    );

    // An object moved under another name does not open; nor does a plaintext object.
    let stored = std::fs::read(dir.path().join("repo/wal/x")).unwrap();
    storage
        .put("wal/y", Bytes::from(stored), PutMode::IfAbsent)
        .await
        .unwrap();
    let moved = repo.objects().get("wal/y").await.unwrap_err();
    assert!(
        moved.to_string().contains("authentication failed"),
        "{moved}"
    );
    let plain = ObjectStore::new(storage.clone(), codec(), EncodeOptions::default());
    plain
        .put("wal/z", Bytes::from_static(b"forged"), PutMode::IfAbsent)
        .await
        .unwrap();
    let forged = repo.objects().get("wal/z").await.unwrap_err();
    assert!(
        forged.to_string().contains("encryption is none"),
        "{forged}"
    );

    // A plaintext config put in place of the encrypted one: a key given is refused.
    let fake = br#"{"format": 2, "system_identifier": "7301000000000000001", "pg_version": 15, "wal_segment_size": 16777216, "encryption": "none", "created": "x", "created_by": "x"}"#;
    plain
        .put(CONFIG_KEY, Bytes::from_static(fake), PutMode::Overwrite)
        .await
        .unwrap();
    let downgraded = err(by_key.clone()).await;
    assert!(
        matches!(downgraded, OpenError::Key(KeyError::Plaintext(_))),
        "{downgraded}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_repository_written_before_encryption_is_read_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let url: RepoUrl = format!("file://{}/repo", dir.path().display())
        .parse()
        .unwrap();
    let storage = repo::repository::storage_to_init(&url).await.unwrap();
    // The config exactly as the previous release wrote it.
    let v1 = br#"{
  "format": 1,
  "system_identifier": "7301000000000000001",
  "pg_version": 15,
  "wal_segment_size": 16777216,
  "encryption": "none",
  "created": "2026-11-01T00:00:00.000000Z",
  "created_by": "pitr 0.1.0"
}"#;
    ObjectStore::new(storage.clone(), codec(), EncodeOptions::default())
        .put(CONFIG_KEY, Bytes::from_static(v1), PutMode::IfAbsent)
        .await
        .unwrap();
    let first = cluster(7_301_000_000_000_000_001);
    let repo = Repository::open_on(
        url.clone(),
        storage.clone(),
        &KeySetting::None,
        Some(&first),
        codec(),
    )
    .await
    .unwrap();
    assert_eq!(repo.config().format, 1);
    assert_eq!(repo.config().id, None);
    assert_eq!(repo.config().encryption, "none");
    // A key given for it is refused, as for any plaintext repository.
    let dir_key = dir.path().join("key");
    std::fs::write(&dir_key, [1u8; 32]).unwrap();
    let err = Repository::open_on(url, storage, &KeySetting::File(dir_key), None, codec())
        .await
        .unwrap_err();
    assert!(
        matches!(err, OpenError::Key(KeyError::Plaintext(_))),
        "{err}"
    );
}
