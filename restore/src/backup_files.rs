//! A backup's files read back from the repository: each chunk fetched from its pack with a
//! ranged read and checked against the hash the manifest names, several at a time. Restore
//! and verify build on this.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use repo::manifest::{BackupManifest, ManifestFile};
use repo::objects::{ObjectError, ObjectStore};
use repo::pack::fetch_chunk;

/// Chunks of one file fetched at once.
pub const CHUNK_READS: usize = 16;

/// Why a file could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A chunk could not be fetched, or is damaged.
    #[error("file \"{path}\": {source}")]
    Object {
        /// The file.
        path: String,
        /// What failed.
        source: ObjectError,
    },
    /// The manifest points outside itself.
    #[error("file \"{0}\": the manifest names a chunk or pack it does not hold")]
    Manifest(String),
}

/// The contents of `file` of backup `m`, verified chunk by chunk.
pub async fn read_file(
    objects: &ObjectStore,
    m: &BackupManifest,
    file: &ManifestFile,
) -> Result<Vec<u8>, ReadError> {
    let bad = || ReadError::Manifest(file.path.clone());
    let mut wanted = Vec::with_capacity(file.chunks.len());
    for &i in &file.chunks {
        let c = m.chunks.get(i as usize).ok_or_else(bad)?;
        let pack = m.pack_key(c.pack()).ok_or_else(bad)?;
        let hash = c.hash().ok_or_else(bad)?;
        wanted.push((pack, c.range(), hash));
    }
    let pieces: Vec<Bytes> = futures::stream::iter(wanted)
        .map(|(pack, range, hash)| async move { fetch_chunk(objects, &pack, range, &hash).await })
        .buffered(CHUNK_READS)
        .try_collect()
        .await
        .map_err(|source| ReadError::Object {
            path: file.path.clone(),
            source,
        })?;
    let mut out = Vec::with_capacity(file.size as usize);
    for p in pieces {
        out.extend_from_slice(&p);
    }
    Ok(out)
}
