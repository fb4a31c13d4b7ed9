//! Objects as the repository stores them: plaintext in, an envelope (compressed, hashed,
//! later encrypted) on storage; every read is verified and a damaged object comes back as
//! a typed corruption error naming it.

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{Codec, CodecGone};
use crate::envelope::{EncodeOptions, EnvelopeError, Header, Protection};
use crate::storage::{self, PutMode, PutOutcome, Storage, StorageError};

/// Why an object could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The storage failed (see whether a retry can help).
    #[error(transparent)]
    Storage(StorageError),
    /// The object is there but its bytes are not what was stored.
    #[error("object \"{key}\" is corrupt: {source}")]
    Corrupt {
        /// The object.
        key: String,
        /// What the envelope check found.
        source: EnvelopeError,
    },
    /// The codec threads are gone.
    #[error(transparent)]
    Codec(#[from] CodecGone),
}

impl From<StorageError> for ObjectError {
    /// A storage failure; one whose own checksum of the bytes kept failing is damage of the
    /// object, reported by key as every other damage is.
    fn from(e: StorageError) -> ObjectError {
        if e.kind == crate::storage::ErrorKind::Damaged {
            ObjectError::Corrupt {
                key: e.key.clone(),
                source: EnvelopeError::StoredChecksum(e.source.to_string()),
            }
        } else {
            ObjectError::Storage(e)
        }
    }
}

impl ObjectError {
    /// True only when the storage says the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ObjectError::Storage(e) if e.is_not_found())
    }
}

/// Envelope-wrapped objects on a storage backend.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    storage: Arc<dyn Storage>,
    codec: Arc<Codec>,
    options: EncodeOptions,
    protection: Protection,
}

impl ObjectStore {
    /// Objects on `storage`, encoded by `codec` with `options`.
    pub fn new(
        storage: Arc<dyn Storage>,
        codec: Arc<Codec>,
        options: EncodeOptions,
    ) -> ObjectStore {
        ObjectStore {
            storage,
            codec,
            options,
            protection: Protection::Plain,
        }
    }

    /// The same objects, protected as `protection` says (an encrypted repository's keys).
    pub fn with_protection(mut self, protection: Protection) -> ObjectStore {
        self.protection = protection;
        self
    }

    /// How objects are protected.
    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    /// How objects are encoded.
    pub fn options(&self) -> EncodeOptions {
        self.options
    }

    /// The same objects, encoded with `options` from now on.
    pub fn with_options(mut self, options: EncodeOptions) -> ObjectStore {
        self.options = options;
        self
    }

    /// The codec's worker threads.
    pub fn codec(&self) -> &Arc<Codec> {
        &self.codec
    }

    /// The storage underneath.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Encodes and stores `plain` under `key`.
    pub async fn put(
        &self,
        key: &str,
        plain: Bytes,
        mode: PutMode,
    ) -> Result<PutOutcome, ObjectError> {
        let envelope = self.encode(key, plain).await?;
        Ok(self.storage.put(key, envelope, mode).await?)
    }

    /// Like `put`, and also returns the blake3 of `plain`, taken from the envelope the
    /// codec made (so the caller need not hash the bytes a second time).
    pub async fn put_hashed(
        &self,
        key: &str,
        plain: Bytes,
        mode: PutMode,
    ) -> Result<(PutOutcome, [u8; 32]), ObjectError> {
        let envelope = self.encode(key, plain).await?;
        let hash = crate::envelope::header(&envelope)
            .map_err(|source| ObjectError::Corrupt {
                key: key.to_owned(),
                source,
            })?
            .hash;
        Ok((self.storage.put(key, envelope, mode).await?, hash))
    }

    /// The envelope of `plain` stored as `key`, made on a codec thread.
    pub async fn encode(&self, key: &str, plain: Bytes) -> Result<Bytes, ObjectError> {
        Ok(self
            .codec
            .encode_as(plain, self.options, self.protection.clone(), key.to_owned())
            .await?)
    }

    /// Reads, verifies and decodes the object at `key`.
    pub async fn get(&self, key: &str) -> Result<(Header, Bytes), ObjectError> {
        let bytes = storage::get_bytes(self.storage.as_ref(), key).await?;
        self.decode(key, bytes).await
    }

    /// [`ObjectStore::get`] for an object of at most `max` bytes of plaintext: a header
    /// declaring more is damage, refused before anything is decompressed.
    pub async fn get_at_most(&self, key: &str, max: u64) -> Result<(Header, Bytes), ObjectError> {
        let bytes = storage::get_bytes(self.storage.as_ref(), key).await?;
        self.decode_at_most(key, bytes, max).await
    }

    /// Decodes and verifies the stored bytes of the object at `key` (read by the caller).
    pub async fn decode(&self, key: &str, bytes: Bytes) -> Result<(Header, Bytes), ObjectError> {
        self.decode_at_most(key, bytes, u64::MAX).await
    }

    /// [`ObjectStore::decode`] of at most `max` bytes of plaintext.
    pub async fn decode_at_most(
        &self,
        key: &str,
        bytes: Bytes,
        max: u64,
    ) -> Result<(Header, Bytes), ObjectError> {
        self.codec
            .decode_as(bytes, max, self.protection.clone(), key.to_owned())
            .await?
            .map_err(|source| ObjectError::Corrupt {
                key: key.to_owned(),
                source,
            })
    }
}
