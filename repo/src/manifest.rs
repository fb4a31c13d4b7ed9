//! Backup manifests: what a base backup holds (files, their modes and sizes, the chunks
//! that make up each file and the packs those lie in), where in the WAL it starts and
//! stops, and how much it stored. A backup exists only once its manifest is stored; the
//! manifest is written last and never changed. Format: docs/FORMAT.md, "Backups".

use serde::{Deserialize, Serialize};

use crate::objects::{ObjectError, ObjectStore};
use crate::pack::pack_key;
use crate::storage::{self, PutMode, PutOutcome, Storage, StorageError};

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Where backups live.
pub const BACKUP_PREFIX: &str = "backup/";

/// The key of a backup's manifest.
pub fn manifest_key(id: &str) -> String {
    format!("{BACKUP_PREFIX}{id}/manifest")
}

/// The key of the copy of PostgreSQL's own backup_manifest.
pub fn pg_manifest_key(id: &str) -> String {
    format!("{BACKUP_PREFIX}{id}/backup_manifest")
}

/// What a manifest entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    /// A regular file; its contents are its chunks, in order.
    File,
    /// A directory.
    Directory,
    /// A symbolic link (`target`).
    Symlink,
}

/// One entry of the backup: a file, directory or symlink of the data directory or of a
/// tablespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the data directory, or to the tablespace's directory.
    pub path: String,
    /// The tablespace's OID; absent for the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace: Option<u32>,
    /// File, directory or symlink.
    #[serde(rename = "type")]
    pub kind: FileType,
    /// Permission bits.
    pub mode: u32,
    /// Bytes (files only).
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Indexes into the manifest's chunk table, in file order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<u32>,
}

/// A chunk: `[pack index, offset, stored length, plain length, blake3 hex]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef(pub u32, pub u64, pub u32, pub u32, pub String);

impl ChunkRef {
    /// Index into the manifest's `packs`.
    pub fn pack(&self) -> usize {
        self.0 as usize
    }
    /// Byte range of the chunk's envelope in its pack.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.1..self.1 + u64::from(self.2)
    }
    /// Plaintext length.
    pub fn plain_len(&self) -> u32 {
        self.3
    }
    /// blake3 of the plaintext.
    pub fn hash(&self) -> Option<[u8; 32]> {
        blake3::Hash::from_hex(&self.4).ok().map(|h| *h.as_bytes())
    }
}

/// A tablespace of the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablespaceEntry {
    /// OID (its `pg_tblspc/OID` link).
    pub oid: u32,
    /// Where it was on the server.
    pub location: String,
}

/// A backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// Manifest format version.
    pub format: u32,
    /// The backup's id (its key under `backup/`): start time, `YYYYMMDDTHHMMSSZ`.
    pub id: String,
    /// The label given to BASE_BACKUP.
    pub label: String,
    /// The cluster's system identifier (decimal string).
    pub system_identifier: String,
    /// PostgreSQL major version.
    pub pg_version: u32,
    /// The server's full version.
    pub server_version: String,
    /// Timeline at the start.
    pub timeline: u32,
    /// WAL position the backup starts from (its checkpoint's redo point).
    pub start_lsn: String,
    /// WAL position where the backup becomes consistent.
    pub stop_lsn: String,
    /// Timeline at the stop.
    pub stop_timeline: u32,
    /// RFC 3339 UTC.
    pub start_time: String,
    /// RFC 3339 UTC.
    pub stop_time: String,
    /// `fast` or `spread`.
    pub checkpoint: String,
    /// `archive`: the WAL from start to stop is in the repository's `wal/`; `included`:
    /// it is in the backup itself, under `pg_wal/`.
    pub wal: String,
    /// Bytes per chunk (a file's last chunk may be shorter).
    pub chunk_size: u32,
    /// How chunks were compressed (`zstd-1`, `none`).
    pub compression: String,
    /// Bytes of all files.
    pub size: u64,
    /// Bytes this backup uploaded (its new packs).
    pub stored_new: u64,
    /// Bytes of the chunks it references, as stored.
    pub stored_total: u64,
    /// Key of PostgreSQL's backup_manifest, if the server sent one.
    #[serde(default)]
    pub pg_manifest: Option<String>,
    /// Tablespaces other than the data directory.
    #[serde(default)]
    pub tablespaces: Vec<TablespaceEntry>,
    /// Ids of the packs its chunks lie in.
    pub packs: Vec<String>,
    /// The chunk table.
    pub chunks: Vec<ChunkRef>,
    /// Every entry.
    pub files: Vec<ManifestFile>,
    /// `pitr <version>`.
    pub created_by: String,
}

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading or writing it failed.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// Listing failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Not JSON of the expected shape, or inconsistent.
    #[error("backup manifest \"{key}\" is unreadable: {reason}")]
    Bad {
        /// The manifest.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Written by a newer pitr.
    #[error("backup manifest \"{key}\" has format {found}, which this pitr does not read")]
    UnknownFormat {
        /// The manifest.
        key: String,
        /// Its format.
        found: u32,
    },
    /// A manifest with this id exists already.
    #[error("backup {0} exists already")]
    Exists(String),
}

impl BackupManifest {
    /// The key of pack `i`.
    pub fn pack_key(&self, i: usize) -> Option<String> {
        self.packs.get(i).map(|id| pack_key(id))
    }

    /// Checks that every index points inside its table.
    pub fn check(&self) -> Result<(), String> {
        for c in &self.chunks {
            if c.pack() >= self.packs.len() {
                return Err(format!(
                    "chunk {} names pack {} of {}",
                    c.4,
                    c.0,
                    self.packs.len()
                ));
            }
            if c.hash().is_none() {
                return Err(format!("chunk hash {:?} is not 64 hex digits", c.4));
            }
        }
        for f in &self.files {
            if let Some(&bad) = f.chunks.iter().find(|&&i| i as usize >= self.chunks.len()) {
                return Err(format!(
                    "file {} names chunk {bad} of {}",
                    f.path,
                    self.chunks.len()
                ));
            }
            let sum: u64 = f
                .chunks
                .iter()
                .map(|&i| u64::from(self.chunks[i as usize].plain_len()))
                .sum();
            if f.kind == FileType::File && sum != f.size {
                return Err(format!(
                    "file {} has {} bytes of chunks for size {}",
                    f.path, sum, f.size
                ));
            }
        }
        Ok(())
    }

    /// Stores the manifest (put-if-absent): from now on the backup exists.
    pub async fn store(&self, objects: &ObjectStore) -> Result<(), ManifestError> {
        let json = serde_json::to_vec(self).map_err(|e| ManifestError::Bad {
            key: manifest_key(&self.id),
            reason: e.to_string(),
        })?;
        match objects
            .put(&manifest_key(&self.id), json.into(), PutMode::IfAbsent)
            .await?
        {
            PutOutcome::Stored => Ok(()),
            PutOutcome::AlreadyExists => Err(ManifestError::Exists(self.id.clone())),
        }
    }

    /// Reads and checks the manifest of backup `id`.
    pub async fn load(objects: &ObjectStore, id: &str) -> Result<BackupManifest, ManifestError> {
        let key = manifest_key(id);
        let (_, plain) = objects.get(&key).await?;
        let bad = |reason: String| ManifestError::Bad {
            key: key.clone(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&plain).map_err(|e| bad(e.to_string()))?;
        let format = value
            .get("format")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32;
        if format != MANIFEST_FORMAT {
            return Err(ManifestError::UnknownFormat { key, found: format });
        }
        let m: BackupManifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        m.check().map_err(bad)?;
        Ok(m)
    }
}

/// The ids of the backups in the repository (those with a manifest), oldest first.
pub async fn list_backups(storage: &dyn Storage) -> Result<Vec<String>, StorageError> {
    let mut ids: Vec<String> = storage::list_all(storage, BACKUP_PREFIX)
        .await?
        .into_iter()
        .filter_map(|o| {
            o.key
                .strip_prefix(BACKUP_PREFIX)?
                .strip_suffix("/manifest")
                .filter(|id| !id.contains('/'))
                .map(str::to_owned)
        })
        .collect();
    ids.sort();
    Ok(ids)
}

/// Whether anything is stored under backup `id` (a manifest, or parts of a failed run).
pub async fn id_taken(storage: &dyn Storage, id: &str) -> Result<bool, StorageError> {
    let page = storage
        .list_page(&format!("{BACKUP_PREFIX}{id}/"), None)
        .await?;
    Ok(!page.objects.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BackupManifest {
        BackupManifest {
            format: MANIFEST_FORMAT,
            id: "20261201T104312Z".into(),
            label: "l".into(),
            system_identifier: "7311111111111111111".into(),
            pg_version: 15,
            server_version: "15.10".into(),
            timeline: 1,
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            stop_timeline: 1,
            start_time: "2026-12-01T10:43:12.000000Z".into(),
            stop_time: "2026-12-01T10:43:13.000000Z".into(),
            checkpoint: "fast".into(),
            wal: "archive".into(),
            chunk_size: 65536,
            compression: "zstd-1".into(),
            size: 5,
            stored_new: 100,
            stored_total: 100,
            pg_manifest: None,
            tablespaces: vec![],
            packs: vec!["ab".repeat(32)],
            chunks: vec![ChunkRef(0, 0, 60, 5, "cd".repeat(32))],
            files: vec![ManifestFile {
                path: "PG_VERSION".into(),
                tablespace: None,
                kind: FileType::File,
                mode: 0o600,
                size: 5,
                mtime: 1,
                target: None,
                chunks: vec![0],
            }],
            created_by: "pitr test".into(),
        }
    }

    #[test]
    fn checks_what_it_points_at() {
        let m = sample();
        m.check().unwrap();
        assert_eq!(m.chunks[0].hash(), Some([0xcd; 32]));
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""chunks":[[0,0,60,5,"cdcd"#), "{json}");
        let mut bad = m.clone();
        bad.files[0].chunks = vec![3];
        assert!(bad.check().is_err());
        let mut bad = m.clone();
        bad.files[0].size = 6;
        assert!(bad.check().is_err());
        let mut bad = m;
        bad.chunks[0].0 = 1;
        assert!(bad.check().is_err());
    }
}
