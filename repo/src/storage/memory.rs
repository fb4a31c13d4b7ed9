//! In-memory storage for unit tests.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    check_key, page_of, ByteStream, ListPage, ObjectMeta, PutMode, PutOutcome, Storage,
    StorageError,
};

/// Objects in a map; never hold the lock across an await (there is none inside).
#[derive(Debug, Default)]
pub struct MemStorage {
    objects: Mutex<BTreeMap<String, (Bytes, std::time::SystemTime)>>,
}

impl MemStorage {
    /// An empty store.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Bytes, std::time::SystemTime)>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Storage for MemStorage {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StorageError> {
        check_key("put", key)?;
        let mut map = self.map();
        if mode == PutMode::IfAbsent && map.contains_key(key) {
            return Ok(PutOutcome::AlreadyExists);
        }
        map.insert(key.to_owned(), (body, std::time::SystemTime::now()));
        Ok(PutOutcome::Stored)
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StorageError> {
        let body = self
            .map()
            .get(key)
            .map(|(b, _)| b.clone())
            .ok_or_else(|| StorageError::not_found("get", key))?;
        Ok(Box::pin(futures::stream::once(async move { Ok(body) })))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        let body = self
            .map()
            .get(key)
            .map(|(b, _)| b.clone())
            .ok_or_else(|| StorageError::not_found("get", key))?;
        let end = (range.end as usize).min(body.len());
        let start = (range.start as usize).min(end);
        Ok(body.slice(start..end))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        Ok(self.map().get(key).map(|(b, t)| ObjectMeta {
            key: key.to_owned(),
            size: b.len() as u64,
            modified: Some(*t),
        }))
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> Result<ListPage, StorageError> {
        let objects = self
            .map()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, t))| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
                modified: Some(*t),
            })
            .collect();
        Ok(page_of(objects, token.as_deref()))
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let mut map = self.map();
        for k in keys {
            map.remove(k);
        }
        Ok(())
    }
}
