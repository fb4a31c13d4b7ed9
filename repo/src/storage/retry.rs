//! Retries transient storage failures with exponential backoff and full jitter, for every
//! backend (the S3 SDK retries its own requests too; this also covers streams cut midway
//! and the filesystem). Streamed puts are not retried: their body cannot be replayed.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ByteStream, CopySource, ListPage, ObjectMeta, PutMode, PutOutcome, Storage, StorageError,
};

/// Retry policy.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total attempts (at least 1).
    pub attempts: u32,
    /// First backoff; doubled each time, up to `max_delay`, then jittered.
    pub base_delay: Duration,
    /// Largest backoff.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails permanently, or attempts run out.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StorageError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_retryable() && attempt < self.attempts.max(1) => {
                    let exp = self.base_delay.saturating_mul(1 << (attempt - 1).min(16));
                    tokio::time::sleep(jitter(exp.min(self.max_delay))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// A uniformly random duration in [0, d] ("full jitter"), from a cheap per-call seed.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(d.as_nanos() as u64);
    let r = h.finish() % 10_001;
    d.mul_f64(r as f64 / 10_000.0)
}

/// Storage whose calls are retried by a [`RetryPolicy`].
#[derive(Debug)]
pub struct RetryingStorage {
    inner: Arc<dyn Storage>,
    policy: RetryPolicy,
}

impl RetryingStorage {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>, policy: RetryPolicy) -> RetryingStorage {
        RetryingStorage { inner, policy }
    }
}

#[async_trait]
impl Storage for RetryingStorage {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StorageError> {
        self.policy
            .run(|| self.inner.put(key, body.clone(), mode))
            .await
    }

    async fn put_stream(
        &self,
        key: &str,
        body: ByteStream,
        size: Option<u64>,
        mode: PutMode,
    ) -> Result<PutOutcome, StorageError> {
        self.inner.put_stream(key, body, size, mode).await
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StorageError> {
        // The whole object, retried as a unit when its stream is cut midway.
        let bytes = self
            .policy
            .run(|| super::get_bytes(self.inner.as_ref(), key))
            .await?;
        Ok(Box::pin(futures::stream::once(async move { Ok(bytes) })))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        self.policy
            .run(|| self.inner.get_range(key, range.clone()))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.policy.run(|| self.inner.head(key)).await
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> Result<ListPage, StorageError> {
        self.policy
            .run(|| self.inner.list_page(prefix, token.clone()))
            .await
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        self.policy.run(|| self.inner.delete(keys)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        self.policy.run(|| self.inner.list(prefix)).await
    }

    async fn copy_source(&self) -> Option<CopySource> {
        self.inner.copy_source().await
    }

    async fn copy_from(
        &self,
        from: &CopySource,
        key: &str,
        mode: PutMode,
    ) -> Result<Option<PutOutcome>, StorageError> {
        self.policy
            .run(|| self.inner.copy_from(from, key, mode))
            .await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        self.policy
            .run(|| self.inner.list_after(prefix, after))
            .await
    }
}
