//! Damage and faults, injected over each real backend (filesystem, the test bed's S3
//! server) and memory: a flipped byte is reported as corruption of that object, a transient
//! fault is retried and succeeds, a permanent one surfaces at once with a clear error, a
//! cut stream is never mistaken for a missing object.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use repo::codec::Codec;
use repo::envelope::EncodeOptions;
use repo::objects::{ObjectError, ObjectStore};
use repo::storage::{
    ErrorKind, Fault, FaultyStorage, FsStorage, MemStorage, PutMode, RetryPolicy, RetryingStorage,
    S3Storage, Storage,
};

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

fn wal_like(len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 8192) as u8)
            .collect::<Vec<_>>(),
    )
}

/// Every fault scenario over `backend` (faults injected between the retries and it).
async fn fault_suite(backend: Arc<dyn Storage>) {
    let faulty = Arc::new(FaultyStorage::new(backend));
    let retrying: Arc<dyn Storage> =
        Arc::new(RetryingStorage::new(faulty.clone(), quick_retries()));
    let objects = ObjectStore::new(
        retrying,
        Arc::new(Codec::new(1, 2)),
        EncodeOptions::default(),
    );

    // A flipped byte anywhere in the stored object is corruption of that object.
    objects
        .put("wal/seg", wal_like(100_000), PutMode::IfAbsent)
        .await
        .unwrap();
    for offset in [5, 20, 60, 500] {
        faulty.heal();
        faulty.inject(Fault::FlipByte { offset });
        let err = objects.get("wal/seg").await.unwrap_err();
        assert!(
            matches!(err, ObjectError::Corrupt { ref key, .. } if key == "wal/seg"),
            "{err}"
        );
        assert!(!err.is_not_found());
        assert!(
            err.to_string()
                .starts_with("object \"wal/seg\" is corrupt: "),
            "{err}"
        );
    }
    faulty.heal();
    assert_eq!(objects.get("wal/seg").await.unwrap().1, wal_like(100_000));

    // Transient faults (and a stall) are retried until the call works.
    objects
        .put("k", Bytes::from_static(b"value"), PutMode::Overwrite)
        .await
        .unwrap();
    let before = faulty.calls();
    faulty.inject(Fault::Fail {
        nth: before + 1,
        kind: ErrorKind::Transient,
    });
    faulty.inject(Fault::Fail {
        nth: before + 2,
        kind: ErrorKind::Transient,
    });
    faulty.inject(Fault::Stall {
        nth: before + 3,
        delay: Duration::from_millis(50),
    });
    assert_eq!(&objects.get("k").await.unwrap().1[..], b"value");
    assert_eq!(
        faulty.calls(),
        before + 3,
        "two failures, then the stalled call that worked"
    );
    faulty.heal();

    // A permanent fault surfaces at once, with the operation and the key.
    let before = faulty.calls();
    faulty.inject(Fault::Fail {
        nth: before + 1,
        kind: ErrorKind::Permanent,
    });
    let err = objects
        .put("p", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap_err();
    assert_eq!(faulty.calls(), before + 1, "not retried");
    assert_eq!(
        err.to_string(),
        format!("could not put \"p\": injected fault on call {}", before + 1)
    );
    assert!(!err.is_not_found());
    faulty.heal();

    // A stream cut on every attempt is an error, never "not found".
    objects
        .put("cut", wal_like(10_000), PutMode::Overwrite)
        .await
        .unwrap();
    faulty.inject(Fault::CutStream { after: 100 });
    let err = objects.get("cut").await.unwrap_err();
    assert!(
        matches!(&err, ObjectError::Storage(e) if e.is_retryable()),
        "{err}"
    );
    assert!(!err.is_not_found());
    faulty.heal();
    assert_eq!(objects.get("cut").await.unwrap().1, wal_like(10_000));

    // Only a really absent object is "not found".
    assert!(objects.get("nope").await.unwrap_err().is_not_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_over_memory() {
    fault_suite(Arc::new(MemStorage::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_over_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    fault_suite(Arc::new(FsStorage::new(dir.path()).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_over_s3() {
    let server = testbed::S3Server::start().unwrap();
    let settings = support::s3_settings(&server);
    fault_suite(Arc::new(S3Storage::connect(settings).await)).await;
}
