//! One contract every storage backend meets, run against each: round trips from 0 B to
//! 200 MiB (streamed), put-if-absent, atomic overwrite, ranged gets, pagination past 1000
//! keys, batched idempotent deletes, and NotFound only for what is really absent.

mod support;

use bytes::Bytes;
use futures::StreamExt;
use repo::storage::{self, ErrorKind, FsStorage, MemStorage, PutMode, PutOutcome, Storage};

/// Deterministic, poorly compressible bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn round_trips(s: &dyn Storage) {
    for (i, len) in [0usize, 1, 16 << 20].into_iter().enumerate() {
        let body = data(len, i as u64);
        let key = format!("rt/object-{len}");
        assert_eq!(
            s.put(&key, Bytes::from(body.clone()), PutMode::Overwrite)
                .await
                .unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(
            storage::get_bytes(s, &key).await.unwrap(),
            body,
            "{len} bytes"
        );
        assert_eq!(s.head(&key).await.unwrap().unwrap().size, len as u64);
    }
}

async fn streamed_200_mib(s: &dyn Storage) {
    const CHUNK: usize = 8 << 20;
    const CHUNKS: u64 = 25;
    let chunk = Bytes::from(data(CHUNK, 42));
    let expected = {
        let mut h = blake3::Hasher::new();
        for _ in 0..CHUNKS {
            h.update(&chunk);
        }
        h.finalize()
    };
    let c = chunk.clone();
    let body = futures::stream::iter((0..CHUNKS).map(move |_| Ok(c.clone()))).boxed();
    let key = "big/200MiB";
    s.put_stream(key, body, Some(CHUNK as u64 * CHUNKS), PutMode::IfAbsent)
        .await
        .unwrap();
    let mut h = blake3::Hasher::new();
    let mut got = s.get(key).await.unwrap();
    let mut n = 0u64;
    while let Some(part) = got.next().await {
        let part = part.unwrap();
        n += part.len() as u64;
        h.update(&part);
    }
    assert_eq!(n, CHUNK as u64 * CHUNKS);
    assert_eq!(h.finalize(), expected);
    s.delete(&[key.to_owned()]).await.unwrap();
}

async fn put_if_absent_never_overwrites(s: &dyn Storage) {
    let key = "once/key";
    assert_eq!(
        s.put(key, Bytes::from_static(b"first"), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        s.put(key, Bytes::from_static(b"second"), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(&storage::get_bytes(s, key).await.unwrap()[..], b"first");
    let streamed = futures::stream::iter([Ok(Bytes::from_static(b"third"))]).boxed();
    assert_eq!(
        s.put_stream(key, streamed, Some(5), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(&storage::get_bytes(s, key).await.unwrap()[..], b"first");
    s.put(key, Bytes::from_static(b"replaced"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(&storage::get_bytes(s, key).await.unwrap()[..], b"replaced");
}

async fn ranges_and_absence(s: &dyn Storage) {
    s.put("r/k", Bytes::from_static(b"0123456789"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(&s.get_range("r/k", 2..5).await.unwrap()[..], b"234");
    assert_eq!(&s.get_range("r/k", 8..100).await.unwrap()[..], b"89");
    let missing = match s.get("r/missing").await {
        Err(e) => e,
        Ok(_) => panic!("got a missing object"),
    };
    assert!(missing.is_not_found(), "{missing}");
    assert!(!missing.is_retryable());
    assert!(s
        .get_range("r/missing", 0..1)
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(s.head("r/missing").await.unwrap(), None);
    let bad = s
        .put("../escape", Bytes::new(), PutMode::Overwrite)
        .await
        .unwrap_err();
    assert_eq!(bad.kind, ErrorKind::Permanent);
}

async fn pagination_and_deletes(s: &dyn Storage) {
    let keys: Vec<String> = (0..1001).map(|i| format!("page/{i:05}")).collect();
    futures::stream::iter(
        keys.iter()
            .map(|k| s.put(k, Bytes::from_static(b"x"), PutMode::IfAbsent)),
    )
    .buffer_unordered(32)
    .for_each(|r| async move {
        r.unwrap();
    })
    .await;
    s.put("pager/other", Bytes::from_static(b"y"), PutMode::Overwrite)
        .await
        .unwrap();
    let first = s.list_page("page/", None).await.unwrap();
    assert_eq!(first.objects.len(), 1000);
    assert!(first.next.is_some());
    let second = s.list_page("page/", first.next.clone()).await.unwrap();
    assert_eq!(second.objects.len(), 1);
    assert_eq!(second.objects[0].key, "page/01000");
    assert_eq!(second.next, None);
    let all: Vec<String> = storage::list_all(s, "page/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(all, keys);
    let partial = storage::list_all(s, "page/0099").await.unwrap();
    assert_eq!(partial.len(), 10);
    // What sorts after a key, across a page boundary.
    let after: Vec<String> = s
        .list_after("page/", "page/00500")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(after, keys[501..]);
    assert!(s
        .list_after("page/", "page/01000")
        .await
        .unwrap()
        .is_empty());

    let doomed = vec![
        keys[0].clone(),
        keys[500].clone(),
        "page/never-existed".to_owned(),
    ];
    s.delete(&doomed).await.unwrap();
    assert_eq!(s.head(&keys[0]).await.unwrap(), None);
    assert_eq!(storage::list_all(s, "page/").await.unwrap().len(), 999);
}

/// head and list say when an object was last written, by the storage's clock (checked
/// against this host's loosely: the point is that storage time is there to be read).
async fn last_written(s: &dyn Storage) {
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
    s.put("when/a", Bytes::from_static(b"a"), PutMode::Overwrite)
        .await
        .unwrap();
    let head = s.head("when/a").await.unwrap().unwrap();
    let at = head.modified.expect("head gives the last-written time");
    assert!(at > before, "{at:?}");
    assert!(at < std::time::SystemTime::now() + std::time::Duration::from_secs(600));
    let listed = storage::list_all(s, "when/").await.unwrap();
    assert_eq!(listed.len(), 1);
    let listed_at = listed[0]
        .modified
        .expect("listings give the last-written time");
    let apart = listed_at
        .duration_since(at)
        .unwrap_or_else(|e| e.duration());
    assert!(
        apart < std::time::Duration::from_secs(2),
        "{listed_at:?} vs {at:?}"
    );
    s.delete(&["when/a".to_owned()]).await.unwrap();
}

async fn contract(s: &dyn Storage) {
    last_written(s).await;
    round_trips(s).await;
    put_if_absent_never_overwrites(s).await;
    ranges_and_absence(s).await;
    pagination_and_deletes(s).await;
    streamed_200_mib(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_meets_the_contract() {
    contract(&MemStorage::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_backend_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FsStorage::create(dir.path().join("repo")).unwrap();
    contract(&fs).await;
    // Nothing half-written is left behind.
    let leftovers: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

async fn s3_storage(server: &testbed::S3Server) -> repo::storage::S3Storage {
    let mut settings = support::s3_settings(server);
    // Small parts so the 200 MiB object goes up in many concurrent parts.
    settings.part_size = 8 << 20;
    repo::storage::S3Storage::connect(settings).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_meets_the_contract() {
    let server = testbed::S3Server::start().unwrap();
    contract(&s3_storage(&server).await).await;
}

/// What the default does over HTTPS (bodies checked by their CRC, not hashed into the
/// signature), forced on over the bed's plain HTTP: the server takes it, whole objects and
/// multipart alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unsigned_payloads_meet_the_contract() {
    let server = testbed::S3Server::start().unwrap();
    let mut settings = support::s3_settings(&server);
    settings.part_size = 8 << 20;
    settings.payload_signing = repo::storage::PayloadSigning::Off;
    contract(&repo::storage::S3Storage::connect(settings).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_put_if_absent_never_overwrites() {
    let server = testbed::S3Server::start_local().unwrap();
    let s = s3_storage(&server).await;
    let body = Bytes::from(data(20 << 20, 7));
    assert_eq!(
        s.put("mp/k", body.clone(), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    // The conditional complete refuses an existing key: nothing is overwritten.
    assert_eq!(
        s.put("mp/k", Bytes::from(data(20 << 20, 8)), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(storage::get_bytes(&s, "mp/k").await.unwrap(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_is_transient_not_missing() {
    let mut server = testbed::S3Server::start_local().unwrap();
    let mut settings = support::s3_settings(&server);
    settings.max_attempts = 2;
    settings.attempt_timeout = std::time::Duration::from_secs(2);
    let s = repo::storage::S3Storage::connect(settings).await;
    s.put("k", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap();
    server.stop().unwrap();
    // A storage error must never look like "not found".
    let err = match s.get("k").await {
        Err(e) => e,
        Ok(_) => panic!("read from a stopped server"),
    };
    assert!(!err.is_not_found(), "{err}");
    assert!(err.is_retryable(), "{err}");
    assert!(!s.head("k").await.unwrap_err().is_not_found());
    server.restart().unwrap();
    assert_eq!(&storage::get_bytes(&s, "k").await.unwrap()[..], b"v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_wrong_credentials_are_permanent() {
    let server = testbed::S3Server::start_local().unwrap();
    let mut settings = support::s3_settings(&server);
    settings.credentials = Some(("nobody".to_owned(), "wrong".to_owned()));
    let s = repo::storage::S3Storage::connect(settings).await;
    let err = s
        .put("k", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
    assert!(err.to_string().contains("could not put \"k\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_put_if_absent_is_checked_where_the_server_ignores_conditions() {
    // As on Garage, which ignores If-None-Match: pitr checks before and after instead.
    let server = testbed::S3Server::start_local().unwrap();
    let mut settings = support::s3_settings(&server);
    settings.part_size = 8 << 20;
    settings.conditional_put = repo::storage::ConditionalPut::Off;
    let s = repo::storage::S3Storage::connect(settings).await;
    put_if_absent_never_overwrites(&s).await;
    let body = Bytes::from(data(20 << 20, 1));
    assert_eq!(
        s.put("mp/checked", body.clone(), PutMode::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Stored
    );
    let other = Bytes::from(data(20 << 20, 2));
    assert_eq!(
        s.put("mp/checked", other, PutMode::IfAbsent).await.unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(storage::get_bytes(&s, "mp/checked").await.unwrap(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_copies_server_side_on_one_server_and_never_overwrites() {
    let server = testbed::S3Server::start_local().unwrap();
    let at = |name: &str| {
        let mut settings = support::s3_settings(&server);
        settings.prefix = format!("{}/{name}", settings.prefix);
        settings
    };
    let a = repo::storage::S3Storage::connect(at("a")).await;
    let b = repo::storage::S3Storage::connect(at("b")).await;
    let body = Bytes::from(data(3 << 20, 5));
    a.put("wal/x y", body.clone(), PutMode::Overwrite)
        .await
        .unwrap();
    a.put("wal/z", Bytes::from(data(100, 6)), PutMode::Overwrite)
        .await
        .unwrap();
    let from = a.copy_source().await.unwrap();
    assert_eq!(b.copy_source().await.unwrap().server, from.server);
    let before = server.copies();
    assert_eq!(
        b.copy_from(&from, "wal/x y", PutMode::IfAbsent)
            .await
            .unwrap(),
        Some(PutOutcome::Stored)
    );
    assert_eq!(server.copies(), before + 1, "not copied by the server");
    assert_eq!(storage::get_bytes(&b, "wal/x y").await.unwrap(), body);
    // An object already there is not overwritten.
    let theirs = Bytes::from(data(100, 7));
    b.put("wal/z", theirs.clone(), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(
        b.copy_from(&from, "wal/z", PutMode::IfAbsent)
            .await
            .unwrap(),
        Some(PutOutcome::AlreadyExists)
    );
    assert_eq!(storage::get_bytes(&b, "wal/z").await.unwrap(), theirs);
    // A source object that is not there is missing, not copied.
    let err = b
        .copy_from(&from, "wal/none", PutMode::IfAbsent)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    // Other credentials (or another server): not server-side; the caller copies bytes.
    let mut other = at("c");
    other.credentials = Some(("someone-else".into(), "secret".into()));
    let c = repo::storage::S3Storage::connect(other).await;
    assert_ne!(c.copy_source().await.unwrap().server, from.server);
    assert_eq!(
        c.copy_from(&from, "wal/z", PutMode::IfAbsent)
            .await
            .unwrap(),
        None
    );
    // Through the retry layer the same.
    let r = repo::storage::RetryingStorage::new(
        std::sync::Arc::new(repo::storage::S3Storage::connect(at("d")).await),
        repo::storage::RetryPolicy::default(),
    );
    assert_eq!(r.copy_source().await.unwrap().server, from.server);
    assert_eq!(
        r.copy_from(&from, "wal/z", PutMode::IfAbsent)
            .await
            .unwrap(),
        Some(PutOutcome::Stored)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_storage_class_goes_on_packs_and_segments_only_and_sse_on_every_write() {
    let server = testbed::S3Server::start_local().unwrap();
    let mut settings = support::s3_settings(&server);
    settings.part_size = 8 << 20;
    // The one class besides STANDARD the bed's server takes: what matters is the header.
    settings.storage_class = Some("REDUCED_REDUNDANCY".into());
    settings.sse = Some("AES256".into());
    let s = repo::storage::S3Storage::connect(settings).await;
    let small = Bytes::from(data(1000, 3));
    for key in [
        "config",
        "pack/ab/small",
        "wal/0000000100000000/000000010000000000000001",
        "wal/0000000100000000/000000010000000000000001.summary",
        "backup/20260101T000000Z/manifest",
    ] {
        s.put(key, small.clone(), PutMode::IfAbsent).await.unwrap();
    }
    // Multipart: on CreateMultipartUpload.
    s.put(
        "pack/cd/big",
        Bytes::from(data(20 << 20, 4)),
        PutMode::IfAbsent,
    )
    .await
    .unwrap();
    let seen = server.write_headers();
    let of = |suffix: &str| {
        seen.iter()
            .filter(|h| h.path.ends_with(suffix))
            .cloned()
            .collect::<Vec<_>>()
    };
    for key in ["pack/ab/small", "000000010000000000000001", "pack/cd/big"] {
        let h = of(key);
        assert!(!h.is_empty(), "{key}: {seen:?}");
        assert!(
            h.iter()
                .all(|h| h.storage_class.as_deref() == Some("REDUCED_REDUNDANCY")),
            "{key}: {h:?}"
        );
    }
    for key in ["/config", ".summary", "/manifest"] {
        let h = of(key);
        assert!(!h.is_empty(), "{key}: {seen:?}");
        assert!(h.iter().all(|h| h.storage_class.is_none()), "{key}: {h:?}");
    }
    assert!(
        seen.iter().all(|h| h.sse.as_deref() == Some("AES256")),
        "{seen:?}"
    );
}
