//! Damage and faults, injected: a flipped byte is reported as corruption of that object, a
//! transient fault is retried and succeeds, a permanent one surfaces at once with a clear
//! error, a cut stream is never mistaken for a missing object.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use repo::codec::Codec;
use repo::envelope::EncodeOptions;
use repo::objects::{ObjectError, ObjectStore};
use repo::storage::{
    ErrorKind, Fault, FaultyStorage, MemStorage, PutMode, RetryPolicy, RetryingStorage, Storage,
};

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

/// Objects on faulty memory storage, with retries; returns both handles.
fn setup() -> (Arc<FaultyStorage>, ObjectStore) {
    let faulty = Arc::new(FaultyStorage::new(Arc::new(MemStorage::new())));
    let retrying: Arc<dyn Storage> =
        Arc::new(RetryingStorage::new(faulty.clone(), quick_retries()));
    let objects = ObjectStore::new(
        retrying,
        Arc::new(Codec::new(1, 2)),
        EncodeOptions::default(),
    );
    (faulty, objects)
}

fn wal_like(len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 8192) as u8)
            .collect::<Vec<_>>(),
    )
}

#[tokio::test]
async fn a_flipped_byte_is_reported_as_corruption_of_that_object() {
    let (faulty, objects) = setup();
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
}

#[tokio::test]
async fn a_transient_fault_is_retried_and_succeeds() {
    let (faulty, objects) = setup();
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
}

#[tokio::test]
async fn a_permanent_fault_surfaces_at_once_with_a_clear_error() {
    let (faulty, objects) = setup();
    let before = faulty.calls();
    faulty.inject(Fault::Fail {
        nth: before + 1,
        kind: ErrorKind::Permanent,
    });
    let err = objects
        .put("k", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap_err();
    assert_eq!(faulty.calls(), before + 1, "not retried");
    assert_eq!(
        err.to_string(),
        format!("could not put \"k\": injected fault on call {}", before + 1)
    );
    assert!(!err.is_not_found());
}

#[tokio::test]
async fn a_stream_cut_every_time_is_an_error_not_a_missing_object() {
    let (faulty, objects) = setup();
    objects
        .put("k", wal_like(10_000), PutMode::Overwrite)
        .await
        .unwrap();
    faulty.inject(Fault::CutStream { after: 100 });
    let err = objects.get("k").await.unwrap_err();
    assert!(
        matches!(&err, ObjectError::Storage(e) if e.is_retryable()),
        "{err}"
    );
    assert!(!err.is_not_found());
    faulty.heal();
    assert_eq!(objects.get("k").await.unwrap().1, wal_like(10_000));
}

#[tokio::test]
async fn only_a_really_absent_object_is_not_found() {
    let (_, objects) = setup();
    assert!(objects.get("nope").await.unwrap_err().is_not_found());
}
