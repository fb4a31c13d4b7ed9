//! A fault-injecting wrapper for tests: fail the Nth call, stall a call, flip a byte in what
//! a get returns, or cut a get's stream short. Faults are armed by call number (1-based,
//! counting every operation on this wrapper).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{
    ByteStream, ErrorKind, ListPage, ObjectMeta, PutMode, PutOutcome, Storage, StorageError,
};

/// One fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Call `nth` fails with `kind` without reaching the inner storage.
    Fail { nth: u64, kind: ErrorKind },
    /// Call `nth` waits `delay` first.
    Stall { nth: u64, delay: Duration },
    /// Every get (and ranged get) returns the byte at `offset` flipped.
    FlipByte { offset: usize },
    /// Every get's stream fails (transiently) after `after` bytes.
    CutStream { after: usize },
}

/// Wraps another storage and misbehaves on purpose.
#[derive(Debug)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    faults: Mutex<Vec<Fault>>,
    calls: AtomicU64,
}

impl FaultyStorage {
    /// A well-behaved wrapper until faults are armed.
    pub fn new(inner: Arc<dyn Storage>) -> FaultyStorage {
        FaultyStorage {
            inner,
            faults: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
        }
    }

    /// Arms a fault.
    pub fn inject(&self, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fault);
    }

    /// Disarms every fault.
    pub fn heal(&self) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn faults(&self) -> Vec<Fault> {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts the call and applies call-numbered faults.
    async fn enter(&self, op: &'static str, key: &str) -> Result<(), StorageError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        for fault in self.faults() {
            match fault {
                Fault::Stall { nth, delay } if nth == n => tokio::time::sleep(delay).await,
                Fault::Fail { nth, kind } if nth == n => {
                    return Err(StorageError::new(
                        kind,
                        op,
                        key,
                        format!("injected fault on call {n}"),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn mangle(&self, mut data: Vec<u8>, start: usize) -> Vec<u8> {
        for fault in self.faults() {
            if let Fault::FlipByte { offset } = fault {
                if offset >= start && offset - start < data.len() {
                    data[offset - start] ^= 0x01;
                }
            }
        }
        data
    }
}

#[async_trait]
impl Storage for FaultyStorage {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StorageError> {
        self.enter("put", key).await?;
        self.inner.put(key, body, mode).await
    }

    async fn put_stream(
        &self,
        key: &str,
        body: ByteStream,
        size: Option<u64>,
        mode: PutMode,
    ) -> Result<PutOutcome, StorageError> {
        self.enter("put", key).await?;
        self.inner.put_stream(key, body, size, mode).await
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StorageError> {
        self.enter("get", key).await?;
        let whole = super::get_bytes(self.inner.as_ref(), key).await?;
        let mut data = self.mangle(whole.to_vec(), 0);
        let cut = self.faults().iter().find_map(|f| match f {
            Fault::CutStream { after } => Some(*after),
            _ => None,
        });
        let key = key.to_owned();
        Ok(match cut {
            Some(after) if after < data.len() => {
                data.truncate(after);
                let err = StorageError::new(
                    ErrorKind::Transient,
                    "get",
                    &key,
                    "injected: connection cut",
                );
                futures::stream::iter([Ok(Bytes::from(data)), Err(err)]).boxed()
            }
            _ => futures::stream::iter([Ok(Bytes::from(data))]).boxed(),
        })
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        self.enter("get", key).await?;
        let start = range.start as usize;
        let data = self.inner.get_range(key, range).await?;
        Ok(Bytes::from(self.mangle(data.to_vec(), start)))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.enter("head", key).await?;
        self.inner.head(key).await
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> Result<ListPage, StorageError> {
        self.enter("list", prefix).await?;
        self.inner.list_page(prefix, token).await
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        self.enter("delete", keys.first().map_or("", String::as_str))
            .await?;
        self.inner.delete(keys).await
    }
}
