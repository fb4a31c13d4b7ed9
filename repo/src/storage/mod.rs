//! Storage backends: plain bytes by key, nothing more. Compression, checksums and
//! encryption sit above, in the envelope. Every backend has the same semantics (checked by
//! one contract test suite): atomic puts, a put-if-absent that never overwrites, streaming
//! and ranged gets, paginated listing in key order, idempotent batched deletes.

mod faulty;
mod fs;
mod memory;
mod retry;
mod s3;

use std::fmt;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

pub use faulty::{Fault, FaultyStorage};
pub use fs::FsStorage;
pub use memory::MemStorage;
pub use retry::{RetryPolicy, RetryingStorage};
pub(crate) use s3::https_client;
pub use s3::{env_problem, ConditionalPut, PayloadSigning, S3Settings, S3Storage, ARCHIVE_CLASSES};

/// An object's bytes, as a stream of chunks.
pub type ByteStream = BoxStream<'static, Result<Bytes, StorageError>>;

/// Keys per listing page (S3's maximum).
pub const LIST_PAGE_SIZE: usize = 1000;

/// What a put does when the key exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace it (atomically: readers see the old or the new object, never a mix).
    Overwrite,
    /// Leave it and report [`PutOutcome::AlreadyExists`].
    IfAbsent,
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object is stored.
    Stored,
    /// `IfAbsent` and the key was taken: nothing was written.
    AlreadyExists,
}

/// A stored object's key, size and when it was last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, by the storage's clock (S3's LastModified, the file's
    /// mtime), not the reader's; None where the storage does not say.
    pub modified: Option<std::time::SystemTime>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Objects in key order.
    pub objects: Vec<ObjectMeta>,
    /// Pass this back to get the next page; None on the last one.
    pub next: Option<String>,
}

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object does not exist.
    NotFound,
    /// A passing fault (network, throttling, timeout): retrying can help.
    Transient,
    /// Retrying will not help (permissions, bad bucket, invalid key, a full disk).
    Permanent,
    /// The storage's own checksum of the object's bytes failed (S3's response checksum).
    /// Retried, since the transfer may be at fault; if it persists, the stored object is
    /// damaged, and reported as such ([`crate::objects::ObjectError::Corrupt`]).
    Damaged,
}

/// A storage failure, naming the operation and the key.
#[derive(Debug)]
pub struct StorageError {
    /// Retryable or not.
    pub kind: ErrorKind,
    /// `put`, `get`, `list`, ...
    pub op: &'static str,
    /// The key (or prefix) concerned.
    pub key: String,
    /// What went wrong underneath.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl StorageError {
    /// A new error.
    pub fn new(
        kind: ErrorKind,
        op: &'static str,
        key: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StorageError {
        StorageError {
            kind,
            op,
            key: key.to_owned(),
            source: source.into(),
        }
    }

    /// The object does not exist.
    pub fn not_found(op: &'static str, key: &str) -> StorageError {
        StorageError::new(ErrorKind::NotFound, op, key, "no such object")
    }

    /// True when the object does not exist (and only then).
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// True when trying again can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Transient | ErrorKind::Damaged)
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "could not {} \"{}\": {}", self.op, self.key, self.source)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Where a storage's objects can be copied from by the server itself (S3 CopyObject): to a
/// storage on the same server that signs its requests as the same identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySource {
    /// The server and who is asking: endpoint, region and access key id. Copies go
    /// server-side only between storages whose `server` is the same.
    pub server: String,
    pub bucket: String,
    /// Keys are under this prefix (no leading or trailing `/`; empty for none).
    pub prefix: String,
}

/// A place objects live. Keys are `/`-separated relative paths without `.` or `..` parts.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Stores `body` under `key`.
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StorageError>;

    /// Stores a streamed body under `key` without holding it whole in memory where the
    /// backend can (S3 multipart, filesystem); `size` is the total length if known.
    async fn put_stream(
        &self,
        key: &str,
        mut body: ByteStream,
        size: Option<u64>,
        mode: PutMode,
    ) -> Result<PutOutcome, StorageError> {
        let mut all = Vec::with_capacity(size.unwrap_or(0).min(64 << 20) as usize);
        while let Some(chunk) = body.next().await {
            all.extend_from_slice(&chunk?);
        }
        self.put(key, Bytes::from(all), mode).await
    }

    /// The object's bytes as a stream; a NotFound error if there is none.
    async fn get(&self, key: &str) -> Result<ByteStream, StorageError>;

    /// Bytes `range` of the object (the end is clipped to its size).
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError>;

    /// The object's metadata, or None if there is none.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError>;

    /// A page of the keys starting with `prefix`, in key order, after `token`.
    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> Result<ListPage, StorageError>;

    /// Deletes the keys; absent ones are not an error.
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError>;

    /// Where this storage's objects can be copied from server-side, if anywhere: a storage
    /// whose [`Storage::copy_from`] takes them.
    async fn copy_source(&self) -> Option<CopySource> {
        None
    }

    /// Copies `from`'s object `key` to the same key here without its bytes passing through
    /// this process. `Ok(None)`: this storage cannot (another server, other credentials, a
    /// server that copies but cannot be told not to overwrite): the caller copies the bytes.
    async fn copy_from(
        &self,
        _from: &CopySource,
        _key: &str,
        _mode: PutMode,
    ) -> Result<Option<PutOutcome>, StorageError> {
        Ok(None)
    }

    /// The objects under `prefix` whose keys sort after `after`, in key order (S3's
    /// StartAfter): what is new past a key already seen, without listing what is before it
    /// where the backend can.
    async fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let mut all = self.list(prefix).await?;
        all.retain(|o| o.key.as_str() > after);
        Ok(all)
    }

    /// Every object under `prefix`, in key order: the pages one after another, or (a
    /// backend that can) everything in one pass.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self.list_page(prefix, token).await?;
            out.extend(page.objects);
            match page.next {
                Some(next) => token = Some(next),
                None => return Ok(out),
            }
        }
    }
}

/// Reads a whole object into memory.
pub async fn get_bytes(storage: &dyn Storage, key: &str) -> Result<Bytes, StorageError> {
    let mut stream = storage.get(key).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(Bytes::from(out))
}

/// Every object under `prefix`, following pages.
pub async fn list_all(
    storage: &dyn Storage,
    prefix: &str,
) -> Result<Vec<ObjectMeta>, StorageError> {
    storage.list(prefix).await
}

/// Checks a key is a clean relative path: no empty, `.` or `..` parts, no backslash or NUL.
pub fn check_key(op: &'static str, key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && !key.contains(['\\', '\0'])
        && key
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..");
    if ok {
        Ok(())
    } else {
        Err(StorageError::new(
            ErrorKind::Permanent,
            op,
            key,
            "invalid object key",
        ))
    }
}

/// A page of `keys` (sorted, all matching the prefix) after `token`.
pub(crate) fn page_of(mut objects: Vec<ObjectMeta>, token: Option<&str>) -> ListPage {
    if let Some(token) = token {
        objects.retain(|o| o.key.as_str() > token);
    }
    let next = (objects.len() > LIST_PAGE_SIZE).then(|| objects[LIST_PAGE_SIZE - 1].key.clone());
    objects.truncate(LIST_PAGE_SIZE);
    ListPage { objects, next }
}
