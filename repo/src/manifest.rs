//! Backup manifests: what a base backup holds (files, their modes and sizes, the chunks
//! that make up each file and the packs those lie in), where in the WAL it starts and
//! stops, and how much it stored. A backup exists only once its manifest is stored; the
//! manifest is written last and never changed. Format: docs/FORMAT.md, "Backups".
//!
//! The chunk table is not in the manifest's JSON but in binary pieces beside it (52 bytes
//! a chunk, in file order), written while the backup runs: neither writer nor reader has to
//! hold a whole database's worth of chunk entries as text.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::objects::{ObjectError, ObjectStore};
use crate::pack::pack_key;
use crate::storage::{self, PutMode, PutOutcome, Storage, StorageError};

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 2;

/// The format of a manifest of generation 2 or later (written by expire's repacking: the
/// same fields, and `generation`).
pub const MANIFEST_FORMAT_GENERATIONS: u32 = 3;

/// The highest generation a manifest may have (ten digits in its key, with room to spare).
pub const GENERATION_MAX: u32 = 1_000_000_000;

/// The latest `stored_at` a manifest may say: 9999-12-31T23:59:59Z.
pub const STORED_AT_MAX: u64 = 253_402_300_799;

/// Chunk entries per piece of the chunk table (a piece is then about 3.4 MB).
pub const CHUNKS_PER_PIECE: u32 = 65536;

/// Bytes of one chunk table entry.
pub const CHUNK_ENTRY_LEN: usize = 52;

/// The largest chunk size a manifest may name (backups cut 64 KiB chunks).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// The most plaintext a manifest's JSON may hold (about 200 bytes a file: some million
/// files); a larger one is damage, refused before it is decompressed.
pub const MANIFEST_MAX: u64 = 1 << 30;

/// Where backups live.
pub const BACKUP_PREFIX: &str = "backup/";

/// The key of a backup's manifest.
pub fn manifest_key(id: &str) -> String {
    format!("{BACKUP_PREFIX}{id}/manifest")
}

/// The key of piece `n` of a backup's chunk table.
pub fn chunk_table_key(id: &str, n: usize) -> String {
    format!("{BACKUP_PREFIX}{id}/chunks/{n:06}")
}

/// The key of generation `generation` of a backup's manifest: the first is
/// [`manifest_key`], later ones `manifest.<ten digits>`.
pub fn manifest_key_at(id: &str, generation: u32) -> String {
    if generation <= 1 {
        manifest_key(id)
    } else {
        format!("{BACKUP_PREFIX}{id}/manifest.{generation:010}")
    }
}

/// The key of piece `n` of generation `generation` of a backup's chunk table: the first is
/// [`chunk_table_key`], later ones under `chunks.<ten digits>/`.
pub fn chunk_table_key_at(id: &str, generation: u32, n: usize) -> String {
    if generation <= 1 {
        chunk_table_key(id, n)
    } else {
        format!("{BACKUP_PREFIX}{id}/chunks.{generation:010}/{n:06}")
    }
}

/// The backup id and generation a manifest's key names (None: not a manifest's key).
pub fn parse_manifest_key(key: &str) -> Option<(&str, u32)> {
    let (id, name) = key.strip_prefix(BACKUP_PREFIX)?.split_once('/')?;
    if id.is_empty() || name.contains('/') {
        return None;
    }
    if name == "manifest" {
        return Some((id, 1));
    }
    let digits = name.strip_prefix("manifest.")?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let g: u32 = digits.parse().ok()?;
    (g >= 2).then_some((id, g))
}

/// The generations of backup `id`'s manifest that are stored, ascending.
pub async fn generations(storage: &dyn Storage, id: &str) -> Result<Vec<u32>, StorageError> {
    let prefix = format!("{BACKUP_PREFIX}{id}/manifest");
    let mut g: Vec<u32> = storage::list_all(storage, &prefix)
        .await?
        .iter()
        .filter_map(|o| {
            parse_manifest_key(&o.key)
                .filter(|(i, _)| *i == id)
                .map(|(_, g)| g)
        })
        .collect();
    g.sort_unstable();
    Ok(g)
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
    /// The file's chunks: entries `first..first + count` of the chunk table, in order.
    #[serde(default, skip_serializing_if = "ChunkSpan::is_empty")]
    pub chunks: ChunkSpan,
}

/// A file's run of chunk table entries, `[first, count]` in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "[u64; 2]", into = "[u64; 2]")]
pub struct ChunkSpan {
    /// Index of the file's first chunk.
    pub first: u64,
    /// How many chunks.
    pub count: u64,
}

impl From<[u64; 2]> for ChunkSpan {
    fn from([first, count]: [u64; 2]) -> ChunkSpan {
        ChunkSpan { first, count }
    }
}

impl From<ChunkSpan> for [u64; 2] {
    fn from(s: ChunkSpan) -> [u64; 2] {
        [s.first, s.count]
    }
}

impl ChunkSpan {
    /// No chunks.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The table indexes, in file order ([`BackupManifest::check`] makes sure they fit).
    pub fn indexes(&self) -> std::ops::Range<usize> {
        self.first as usize..self.first.saturating_add(self.count) as usize
    }
}

/// A chunk table entry: where a chunk's envelope lies and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Index into the manifest's `packs`.
    pub pack: u32,
    /// Offset of the envelope in the pack.
    pub offset: u64,
    /// Bytes of the envelope.
    pub stored_len: u32,
    /// Bytes of the plaintext.
    pub plain_len: u32,
    /// blake3 of the plaintext.
    pub hash: [u8; 32],
}

impl ChunkRef {
    /// Index into the manifest's `packs`.
    pub fn pack(&self) -> usize {
        self.pack as usize
    }
    /// Byte range of the chunk's envelope in its pack ([`BackupManifest::check`] makes sure
    /// it does not overflow).
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset.saturating_add(u64::from(self.stored_len))
    }
    /// Plaintext length.
    pub fn plain_len(&self) -> u32 {
        self.plain_len
    }
    /// The entry's 52 bytes: pack, offset, stored length, plain length (little-endian),
    /// then the hash.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u32_le(self.pack);
        out.put_u64_le(self.offset);
        out.put_u32_le(self.stored_len);
        out.put_u32_le(self.plain_len);
        out.put_slice(&self.hash);
    }
    /// Reads one entry; `None` if fewer than 52 bytes are given.
    pub fn decode(mut b: &[u8]) -> Option<ChunkRef> {
        if b.len() < CHUNK_ENTRY_LEN {
            return None;
        }
        let pack = b.get_u32_le();
        let offset = b.get_u64_le();
        let stored_len = b.get_u32_le();
        let plain_len = b.get_u32_le();
        let mut hash = [0u8; 32];
        b.copy_to_slice(&mut hash);
        Some(ChunkRef {
            pack,
            offset,
            stored_len,
            plain_len,
            hash,
        })
    }
}

/// Where a backup's chunk table is: `pieces` objects ([`chunk_table_key`]) of
/// [`CHUNKS_PER_PIECE`] entries each (the last one fewer), `count` in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkTable {
    /// Entries in all.
    pub count: u64,
    /// Entries per piece.
    pub per_piece: u32,
    /// blake3 of each piece's plaintext (its content id when encrypted), hex, in order.
    pub pieces: Vec<String>,
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
    /// RFC 3339 UTC, by the clock of the host pitr ran on (names and dates the backup for
    /// people; nothing decides by it).
    pub start_time: String,
    /// RFC 3339 UTC, the same clock.
    pub stop_time: String,
    /// backup_label's START TIME, as the server wrote it (its clock, its log_timezone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_start_time: Option<String>,
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
    /// Where the chunk table is.
    pub chunk_table: ChunkTable,
    /// Which generation of the backup's manifest this is: 1 as the backup wrote it, more
    /// once expire repacked its chunks (absent in the JSON when 1).
    #[serde(
        default = "first_generation",
        skip_serializing_if = "is_first_generation"
    )]
    pub generation: u32,
    /// Later generations: when the first was stored, by the storage's clock (its
    /// LastModified, Unix seconds), which dates the backup for retention once the first
    /// generation is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_at: Option<u64>,
    /// The chunk table, once read ([`BackupManifest::load`]); not part of the JSON.
    #[serde(skip)]
    pub chunks: Arc<Vec<ChunkRef>>,
    /// Every entry.
    pub files: Vec<ManifestFile>,
    /// `pitr <version>`.
    pub created_by: String,
}

fn first_generation() -> u32 {
    1
}

fn is_first_generation(g: &u32) -> bool {
    *g == 1
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

    /// Checks that every index points inside its table (the chunk table as read), every
    /// pack id has a pack id's shape, and no number overflows where it is used: what a
    /// reader relies on before it trusts the manifest's numbers. The table is walked whole
    /// here; a reader going through it a piece at a time checks [`check_header`] first and
    /// each piece with a [`TableWalk`].
    ///
    /// [`check_header`]: BackupManifest::check_header
    pub fn check(&self) -> Result<(), String> {
        self.check_header()?;
        if self.chunks.len() as u64 != self.chunk_table.count {
            return Err(format!(
                "its chunk table holds {} entries, not {}",
                self.chunks.len(),
                self.chunk_table.count
            ));
        }
        let mut walk = TableWalk::new(self);
        walk.walk(0, &self.chunks, |_, _, _| {})?;
        walk.finish()
    }

    /// What [`BackupManifest::check`] checks without the chunk table: the chunk size, the
    /// pack ids, and that the files' runs of entries follow one another and cover the
    /// table's `count` exactly (so no two files share entries, and the table is walked in
    /// one pass, file after file).
    pub fn check_header(&self) -> Result<(), String> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(format!("chunk size {} is out of range", self.chunk_size));
        }
        if let Some(bad) = self.packs.iter().find(|p| !crate::pack::is_pack_id(p)) {
            return Err(format!(
                "pack id \"{}\" is not 64 hex digits",
                bad.escape_debug()
            ));
        }
        let mut next = 0u64;
        for f in &self.files {
            if f.chunks.count > 0 {
                if f.chunks.first != next {
                    return Err(format!(
                        "file {} starts at chunk {}, not {next}",
                        f.path, f.chunks.first
                    ));
                }
                next = next.saturating_add(f.chunks.count);
            }
            let end = f.chunks.first.checked_add(f.chunks.count);
            if end.is_none_or(|end| end > self.chunk_table.count) {
                return Err(format!(
                    "file {} names {} chunks from {} of {}",
                    f.path, f.chunks.count, f.chunks.first, self.chunk_table.count
                ));
            }
            if f.kind != FileType::File && f.chunks.count > 0 {
                return Err(format!("{} is not a file but has chunks", f.path));
            }
            if f.kind == FileType::File && f.chunks.count == 0 && f.size != 0 {
                return Err(format!(
                    "file {} has 0 bytes of chunks for size {}",
                    f.path, f.size
                ));
            }
        }
        if next != self.chunk_table.count {
            return Err(format!(
                "its files use {next} chunk table entries of {}",
                self.chunk_table.count
            ));
        }
        Ok(())
    }

    /// Stores the manifest (put-if-absent): from now on the backup exists.
    pub async fn store(&self, objects: &ObjectStore) -> Result<(), ManifestError> {
        let key = self.key();
        let json = serde_json::to_vec(self).map_err(|e| ManifestError::Bad {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        let json = Bytes::from(json);
        match objects.put(&key, json.clone(), PutMode::IfAbsent).await? {
            PutOutcome::Stored => Ok(()),
            // A write retried after its first attempt was performed but not answered (a
            // 500 after the fact, a cut response) finds itself: the same manifest is ours.
            PutOutcome::AlreadyExists => {
                let (_, there) = objects.get_at_most(&key, MANIFEST_MAX).await?;
                if there == json {
                    Ok(())
                } else {
                    Err(ManifestError::Exists(self.id.clone()))
                }
            }
        }
    }

    /// Reads and checks the manifest of backup `id` and its whole chunk table.
    pub async fn load(objects: &ObjectStore, id: &str) -> Result<BackupManifest, ManifestError> {
        BackupManifest::load_header(objects, id)
            .await?
            .with_table(objects)
            .await
    }

    /// This manifest (as [`BackupManifest::load_header`] read it) with its whole chunk
    /// table read and checked; each piece is decoded as it arrives.
    pub async fn with_table(
        mut self,
        objects: &ObjectStore,
    ) -> Result<BackupManifest, ManifestError> {
        let mut chunks = Vec::new();
        {
            let mut pieces = std::pin::pin!(self.table_pieces(objects, 4));
            while let Some((_, piece)) = pieces.try_next().await? {
                // The count is the manifest's word: room grows with the pieces really read.
                chunks.extend(piece);
            }
        }
        // Room grew by doubling: what was not filled goes back (a large block is remapped,
        // not copied).
        chunks.shrink_to_fit();
        self.chunks = Arc::new(chunks);
        self.check().map_err(|reason| self.bad(reason))?;
        Ok(self)
    }

    /// Reads the manifest of backup `id` without its chunk table (`chunks` stays empty):
    /// what a reader needs that goes through the table a piece at a time ([`TableReader`]).
    /// Its newest generation is read (the older ones stay only until no running command
    /// may still be reading them; see docs/FORMAT.md, "Repacking").
    pub async fn load_header(
        objects: &ObjectStore,
        id: &str,
    ) -> Result<BackupManifest, ManifestError> {
        let gens = generations(objects.storage().as_ref(), id).await?;
        let mut first_error = None;
        // The newest readable one: a damaged newest generation leaves the one before it
        // (whose packs stay as long as it does) usable.
        for &g in gens.iter().rev() {
            match BackupManifest::load_header_at(objects, id, g).await {
                Ok(m) => return Ok(m),
                Err(
                    e
                    @ (ManifestError::Storage(_) | ManifestError::Object(ObjectError::Storage(_))),
                ) => {
                    if first_error.is_none() {
                        return Err(e);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| {
            ManifestError::Object(ObjectError::Storage(StorageError::not_found(
                "get",
                &manifest_key(id),
            )))
        }))
    }

    /// Reads generation `generation` of backup `id`'s manifest without its chunk table.
    pub async fn load_header_at(
        objects: &ObjectStore,
        id: &str,
        generation: u32,
    ) -> Result<BackupManifest, ManifestError> {
        let key = manifest_key_at(id, generation);
        let (_, plain) = objects.get_at_most(&key, MANIFEST_MAX).await?;
        let m = BackupManifest::parse(&key, &plain)?;
        if m.generation != generation || m.id != id {
            return Err(ManifestError::Bad {
                key,
                reason: format!(
                    "it says it is generation {} of backup {}",
                    m.generation, m.id
                ),
            });
        }
        Ok(m)
    }

    /// Parses a manifest's JSON, as read from `key` (sans-IO: what [`BackupManifest::load_header`]
    /// does once the object is read): its format, its shape, and a chunk table description
    /// that can hold its count. Checking the rest needs the table ([`BackupManifest::check`]).
    pub fn parse(key: &str, plain: &[u8]) -> Result<BackupManifest, ManifestError> {
        let key = key.to_owned();
        let bad = |reason: String| ManifestError::Bad {
            key: key.clone(),
            reason,
        };
        // The format first, so a newer shape is reported as such; both passes parse the
        // text directly (no tree of JSON values as large as the text says).
        #[derive(Deserialize)]
        struct Format {
            #[serde(default)]
            format: u64,
        }
        let format = serde_json::from_slice::<Format>(plain)
            .map_err(|e| bad(e.to_string()))?
            .format;
        if format != u64::from(MANIFEST_FORMAT) && format != u64::from(MANIFEST_FORMAT_GENERATIONS)
        {
            return Err(ManifestError::UnknownFormat {
                key,
                found: u32::try_from(format).unwrap_or(u32::MAX),
            });
        }
        let m: BackupManifest = serde_json::from_slice(plain).map_err(|e| bad(e.to_string()))?;
        // Format 2 is the first generation; later generations are format 3, numbered
        // from 2 to GENERATION_MAX.
        let later = format == u64::from(MANIFEST_FORMAT_GENERATIONS);
        let ok = if later {
            (2..=GENERATION_MAX).contains(&m.generation)
        } else {
            m.generation == 1
        };
        if !ok {
            return Err(bad(format!(
                "generation {} in a manifest of format {format}",
                m.generation
            )));
        }
        if m.stored_at.is_some_and(|t| t > STORED_AT_MAX) {
            return Err(bad(format!(
                "stored_at {:?} is past the year 9999",
                m.stored_at
            )));
        }
        let t = &m.chunk_table;
        let per = u64::from(t.per_piece);
        if per == 0
            || per > u64::from(CHUNKS_PER_PIECE)
            || t.pieces.len() as u64 != t.count.div_ceil(per)
        {
            return Err(bad(format!(
                "its chunk table of {} entries, {} a piece, cannot be in {} pieces",
                t.count,
                t.per_piece,
                t.pieces.len()
            )));
        }
        Ok(m)
    }
}

/// Piece `n` of the chunk table of backup `id`, checked: the hash the manifest names, and
/// whole entries, as many as the piece must hold.
async fn read_piece(
    objects: &ObjectStore,
    id: &str,
    generation: u32,
    table: &ChunkTable,
    n: usize,
) -> Result<Bytes, ManifestError> {
    let key = chunk_table_key_at(id, generation, n);
    let (header, plain) = objects
        .get_at_most(&key, piece_len(table, n) as u64)
        .await?;
    check_piece(&key, table, n, &header.hash, &plain)?;
    Ok(plain)
}

/// Bytes piece `n` of `table` holds.
fn piece_len(table: &ChunkTable, n: usize) -> usize {
    let per = u64::from(table.per_piece);
    per.min(table.count.saturating_sub((n as u64).saturating_mul(per))) as usize * CHUNK_ENTRY_LEN
}

/// Checks piece `n` of `table`, read from `key` (sans-IO): the hash the manifest names for
/// it (`hash` is its plaintext's blake3, from the envelope's verified header), and whole
/// entries, as many as the piece must hold.
pub fn check_piece(
    key: &str,
    table: &ChunkTable,
    n: usize,
    hash: &[u8; 32],
    plain: &[u8],
) -> Result<(), ManifestError> {
    let want = piece_len(table, n);
    let named = table.pieces.get(n).map(String::as_str).unwrap_or("");
    if blake3::Hash::from_bytes(*hash).to_hex().as_str() != named || plain.len() != want {
        return Err(ManifestError::Bad {
            key: key.to_owned(),
            reason: format!(
                "it holds {} bytes with blake3 {}, the manifest says {want} bytes with {named}",
                plain.len(),
                blake3::Hash::from_bytes(*hash).to_hex()
            ),
        });
    }
    Ok(())
}

/// A walk through a backup's chunk table in order, a run of entries at a time, with the
/// files that use it: each entry is checked (its pack, its lengths) and named with the
/// file that holds it and its offset there, and each file's entries must add up to its
/// size. With [`BackupManifest::check_header`] passed first, a table walked whole is
/// checked as [`BackupManifest::check`] checks it, holding only the run at hand.
#[derive(Debug)]
pub struct TableWalk<'m> {
    m: &'m BackupManifest,
    /// The entry expected next.
    next: u64,
    /// The file holding it, or one before it (files without chunks are passed over).
    file: usize,
    /// Plaintext bytes of `file` before entry `next`.
    offset: u64,
}

impl<'m> TableWalk<'m> {
    /// A walk from entry 0 of `m`'s table (whose header is checked).
    pub fn new(m: &'m BackupManifest) -> TableWalk<'m> {
        TableWalk {
            m,
            next: 0,
            file: 0,
            offset: 0,
        }
    }

    /// Entries `first..first + chunks.len()`, which must follow those walked before: each
    /// is checked and handed to `each` as (its index in `chunks`, the index of its file in
    /// the manifest's files, its offset in that file).
    pub fn walk(
        &mut self,
        first: u64,
        chunks: &[ChunkRef],
        mut each: impl FnMut(usize, usize, u64),
    ) -> Result<(), String> {
        let m = self.m;
        if first != self.next {
            return Err(format!(
                "its chunk table is read from entry {first}, not {}",
                self.next
            ));
        }
        for (k, c) in chunks.iter().enumerate() {
            let i = first + k as u64;
            if c.pack() >= m.packs.len() {
                return Err(format!(
                    "chunk {i} names pack {} of {}",
                    c.pack,
                    m.packs.len()
                ));
            }
            // An envelope is its header and at most a little more than the plaintext.
            let stored_max = u64::from(c.plain_len) + u64::from(c.plain_len) / 64 + 4096;
            if c.plain_len > m.chunk_size
                || u64::from(c.stored_len) > stored_max
                || c.offset.checked_add(u64::from(c.stored_len)).is_none()
            {
                return Err(format!(
                    "chunk {i} ({} bytes stored at {} for {} bytes) does not fit chunks of {} bytes",
                    c.stored_len, c.offset, c.plain_len, m.chunk_size
                ));
            }
            // The file holding entry i: the header check made the files' runs follow one
            // another, so it is this one or a later one (checked again here: a walk of a
            // manifest whose header was not checked refuses, never misplaces).
            let f = loop {
                let Some(f) = m.files.get(self.file) else {
                    return Err(format!("chunk {i} is in no file"));
                };
                if f.chunks.count > 0 && i < f.chunks.first.saturating_add(f.chunks.count) {
                    if i < f.chunks.first {
                        return Err(format!(
                            "chunk {i} is in no file (the next starts at {})",
                            f.chunks.first
                        ));
                    }
                    break f;
                }
                self.file += 1;
                self.offset = 0;
            };
            let end = self.offset.saturating_add(u64::from(c.plain_len));
            let last = i + 1 == f.chunks.first.saturating_add(f.chunks.count);
            if end > f.size || (last && end != f.size) {
                return Err(format!(
                    "file {} has {}{end} bytes of chunks for size {}",
                    f.path,
                    if last { "" } else { "at least " },
                    f.size
                ));
            }
            each(k, self.file, self.offset);
            self.offset = end;
        }
        self.next = first + chunks.len() as u64;
        Ok(())
    }

    /// Checks that the whole table was walked.
    pub fn finish(&self) -> Result<(), String> {
        if self.next != self.m.chunk_table.count {
            return Err(format!(
                "its chunk table holds {} entries, not {}",
                self.next, self.m.chunk_table.count
            ));
        }
        Ok(())
    }
}

impl BackupManifest {
    /// The chunk table a piece at a time, in order: each piece read, checked (the hash the
    /// manifest names, its length) and decoded, as (the index of its first entry, its
    /// entries), up to `ahead` pieces read at once. Only those are in memory; walk them
    /// with a [`TableWalk`].
    pub fn table_pieces<'a>(
        &'a self,
        objects: &'a ObjectStore,
        ahead: usize,
    ) -> impl futures::Stream<Item = Result<(u64, Vec<ChunkRef>), ManifestError>> + 'a {
        let per = u64::from(self.chunk_table.per_piece);
        futures::stream::iter(0..self.chunk_table.pieces.len())
            .map(move |n| async move {
                let piece =
                    read_piece(objects, &self.id, self.generation, &self.chunk_table, n).await?;
                let chunks = piece
                    .chunks_exact(CHUNK_ENTRY_LEN)
                    .filter_map(ChunkRef::decode)
                    .collect();
                Ok((n as u64 * per, chunks))
            })
            .buffered(ahead.max(1))
    }

    /// The key of the manifest (this generation's).
    pub fn key(&self) -> String {
        manifest_key_at(&self.id, self.generation)
    }

    /// This manifest, or its chunk table, is inconsistent: `reason`.
    pub fn bad(&self, reason: String) -> ManifestError {
        ManifestError::Bad {
            key: self.key(),
            reason,
        }
    }

    /// Reads the whole chunk table, a few pieces at a time, and walks it ([`TableWalk`])
    /// without keeping it: what [`BackupManifest::check`] checks, for a manifest loaded
    /// without its table (whose header is checked).
    pub async fn check_table(&self, objects: &ObjectStore) -> Result<(), ManifestError> {
        let mut walk = TableWalk::new(self);
        let mut pieces = std::pin::pin!(self.table_pieces(objects, 4));
        while let Some((first, chunks)) = pieces.try_next().await? {
            walk.walk(first, &chunks, |_, _, _| {})
                .map_err(|r| self.bad(r))?;
        }
        walk.finish().map_err(|r| self.bad(r))
    }
}

/// Random access to a backup's chunk table a piece at a time, keeping the last few pieces
/// read: memory stays bounded whatever the table's size.
#[derive(Debug)]
pub struct TableReader {
    objects: ObjectStore,
    id: String,
    generation: u32,
    table: ChunkTable,
    cache: Vec<(usize, Bytes)>,
}

impl TableReader {
    /// Pieces kept.
    const KEEP: usize = 4;

    /// A reader of `m`'s chunk table.
    pub fn new(objects: ObjectStore, m: &BackupManifest) -> TableReader {
        TableReader {
            objects,
            id: m.id.clone(),
            generation: m.generation,
            table: m.chunk_table.clone(),
            cache: Vec::new(),
        }
    }

    /// Entry `i`, or `None` past the end.
    pub async fn get(&mut self, i: u64) -> Result<Option<ChunkRef>, ManifestError> {
        if i >= self.table.count {
            return Ok(None);
        }
        let per = u64::from(self.table.per_piece);
        let n = (i / per) as usize;
        let at = (i % per) as usize * CHUNK_ENTRY_LEN;
        if let Some(pos) = self.cache.iter().position(|(k, _)| *k == n) {
            let hit = self.cache.remove(pos);
            self.cache.push(hit);
        } else {
            let piece =
                read_piece(&self.objects, &self.id, self.generation, &self.table, n).await?;
            if self.cache.len() >= Self::KEEP {
                self.cache.remove(0);
            }
            self.cache.push((n, piece));
        }
        let piece = &self
            .cache
            .last()
            .map(|(_, b)| b.clone())
            .unwrap_or_default();
        Ok(piece.get(at..).and_then(ChunkRef::decode))
    }
}

/// Builds a chunk table's pieces as entries come, in order: each full piece is handed
/// out to be stored at once, so only one piece is ever in memory.
#[derive(Debug)]
pub struct TableWriter {
    piece: Vec<u8>,
    table: ChunkTable,
    protection: crate::envelope::Protection,
}

impl TableWriter {
    /// An empty table, its pieces named by their ids under `protection` (blake3, keyed
    /// when encrypted: what their envelopes' headers will say).
    pub fn new(protection: crate::envelope::Protection) -> TableWriter {
        TableWriter {
            protection,
            piece: Vec::new(),
            table: ChunkTable {
                count: 0,
                per_piece: CHUNKS_PER_PIECE,
                pieces: Vec::new(),
            },
        }
    }

    /// Appends an entry; a piece that is now full is returned, with its number, to store.
    pub fn push(&mut self, c: &ChunkRef) -> Option<(usize, Bytes)> {
        c.encode_into(&mut self.piece);
        self.table.count += 1;
        self.table
            .count
            .is_multiple_of(u64::from(CHUNKS_PER_PIECE))
            .then(|| self.cut())
    }

    fn cut(&mut self) -> (usize, Bytes) {
        let piece = Bytes::from(std::mem::take(&mut self.piece));
        self.table
            .pieces
            .push(hex::encode(self.protection.id(&piece)));
        (self.table.pieces.len() - 1, piece)
    }

    /// The last piece (if it holds entries) and the table's description.
    pub fn finish(mut self) -> (Option<(usize, Bytes)>, ChunkTable) {
        let last = (!self.piece.is_empty()).then(|| self.cut());
        (last, self.table)
    }
}

/// The ids of the backups in the repository (those with a manifest), oldest first.
pub async fn list_backups(storage: &dyn Storage) -> Result<Vec<String>, StorageError> {
    let mut ids: Vec<String> = storage::list_all(storage, BACKUP_PREFIX)
        .await?
        .iter()
        .filter_map(|o| parse_manifest_key(&o.key).map(|(id, _)| id.to_owned()))
        .collect();
    ids.sort();
    ids.dedup();
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
            server_start_time: None,
            tablespaces: vec![],
            packs: vec!["ab".repeat(32)],
            generation: 1,
            stored_at: None,
            chunk_table: ChunkTable {
                count: 1,
                per_piece: CHUNKS_PER_PIECE,
                pieces: vec![],
            },
            chunks: Arc::new(vec![ChunkRef {
                pack: 0,
                offset: 0,
                stored_len: 60,
                plain_len: 5,
                hash: [0xcd; 32],
            }]),
            files: vec![ManifestFile {
                path: "PG_VERSION".into(),
                tablespace: None,
                kind: FileType::File,
                mode: 0o600,
                size: 5,
                mtime: 1,
                target: None,
                chunks: ChunkSpan { first: 0, count: 1 },
            }],
            created_by: "pitr test".into(),
        }
    }

    #[test]
    fn manifest_keys_name_their_backup_and_generation() {
        assert_eq!(parse_manifest_key("backup/B1/manifest"), Some(("B1", 1)));
        assert_eq!(
            parse_manifest_key(&manifest_key_at("B1", 7)),
            Some(("B1", 7))
        );
        assert_eq!(manifest_key_at("B1", 1), manifest_key("B1"));
        assert_eq!(
            chunk_table_key_at("B1", 12, 3),
            "backup/B1/chunks.0000000012/000003"
        );
        for bad in [
            "backup/B1/manifest.0000000001",
            "backup/B1/manifest.12",
            "backup/B1/manifest.00000000x2",
            "backup//manifest",
            "backup/B1/chunks/manifest",
            "backup/B1/backup_manifest",
        ] {
            assert_eq!(parse_manifest_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_generation_must_match_its_format() {
        let mut m = sample();
        m.chunk_table.pieces = vec!["00".repeat(32)];
        m.generation = 2;
        let json = serde_json::to_vec(&m).unwrap();
        assert!(matches!(
            BackupManifest::parse("k", &json),
            Err(ManifestError::Bad { .. })
        ));
        m.format = MANIFEST_FORMAT_GENERATIONS;
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(BackupManifest::parse("k", &json).unwrap().generation, 2);
        // Hostile numbers: a generation 0 (or past the cap) in format 3, a stored_at past
        // the year 9999 (which date arithmetic would panic on).
        for g in [0, 1, GENERATION_MAX + 1, u32::MAX] {
            m.generation = g;
            let json = serde_json::to_vec(&m).unwrap();
            assert!(BackupManifest::parse("k", &json).is_err(), "{g}");
        }
        m.generation = 2;
        m.stored_at = Some(u64::MAX);
        let json = serde_json::to_vec(&m).unwrap();
        assert!(BackupManifest::parse("k", &json).is_err());
        // The first generation is written as before (no `generation` field).
        let first = serde_json::to_string(&sample()).unwrap();
        assert!(!first.contains("generation"));
    }

    #[test]
    fn checks_what_it_points_at() {
        let m = sample();
        m.check().unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""chunks":[0,1]"#), "{json}");
        assert!(
            !json.contains("cdcd"),
            "the table is not in the JSON: {json}"
        );
        let mut bad = m.clone();
        bad.files[0].chunks = ChunkSpan { first: 1, count: 1 };
        assert!(bad.check().is_err());
        let mut bad = m.clone();
        bad.files[0].size = 6;
        assert!(bad.check().is_err());
        let mut bad = m;
        Arc::make_mut(&mut bad.chunks)[0].pack = 1;
        assert!(bad.check().is_err());
    }

    #[test]
    fn a_table_walked_in_runs_names_each_entry_s_file_and_offset_and_finds_damage_where_it_is() {
        // Three files of 3, 0 and 2 chunks (sizes 5, 0, 3), a directory between them.
        let mut m = sample();
        let c = |plain_len| ChunkRef {
            pack: 0,
            offset: 0,
            stored_len: 10,
            plain_len,
            hash: [0; 32],
        };
        let file = |path: &str, size, first, count| ManifestFile {
            path: path.into(),
            tablespace: None,
            kind: FileType::File,
            mode: 0o600,
            size,
            mtime: 0,
            target: None,
            chunks: ChunkSpan { first, count },
        };
        let mut dir = file("d", 0, 0, 0);
        dir.kind = FileType::Directory;
        m.files = vec![
            file("a", 5, 0, 3),
            dir,
            file("b", 0, 0, 0),
            file("c", 3, 3, 2),
        ];
        let chunks = vec![c(2), c(2), c(1), c(1), c(2)];
        m.chunk_table.count = 5;
        m.chunks = Arc::new(chunks.clone());
        m.check().unwrap();
        let mut seen = Vec::new();
        let mut walk = TableWalk::new(&m);
        for (first, run) in [(0, &chunks[..2]), (2, &chunks[2..4]), (4, &chunks[4..])] {
            walk.walk(first, run, |k, f, at| seen.push((first + k as u64, f, at)))
                .unwrap();
        }
        walk.finish().unwrap();
        assert_eq!(
            seen,
            [(0, 0, 0), (1, 0, 2), (2, 0, 4), (3, 3, 0), (4, 3, 1)]
        );

        // Runs out of order, or the table cut short.
        let mut walk = TableWalk::new(&m);
        assert!(walk.walk(2, &chunks[2..], |_, _, _| {}).is_err());
        walk.walk(0, &chunks[..4], |_, _, _| {}).unwrap();
        assert!(walk.finish().is_err());
        // An entry that takes a file past its size is refused at that entry, before the
        // entries after it are handed out; one that leaves it short, at its last entry.
        let mut long = chunks.clone();
        long[1].plain_len = 4;
        let mut walk = TableWalk::new(&m);
        let mut handed = 0;
        let e = walk.walk(0, &long, |_, _, _| handed += 1).unwrap_err();
        assert_eq!(handed, 1);
        assert!(e.contains("file a has at least 6 bytes"), "{e}");
        let mut short = chunks.clone();
        short[4].plain_len = 1;
        let e = TableWalk::new(&m)
            .walk(0, &short, |_, _, _| {})
            .unwrap_err();
        assert!(e.contains("file c has 2 bytes of chunks for size 3"), "{e}");
        // An empty file given a size, a run that skips entries: refused by the header.
        let mut bad = m.clone();
        bad.files[2].size = 1;
        assert!(bad.check_header().is_err());
        let mut bad = m.clone();
        bad.files[3].chunks.first = 4;
        assert!(bad.check_header().is_err());
    }

    #[test]
    fn table_entries_round_trip_and_pieces_are_cut_when_full() {
        let entry = |i: u64| ChunkRef {
            pack: i as u32 % 7,
            offset: i * 1000,
            stored_len: 70_000,
            plain_len: 65_536,
            hash: *blake3::hash(&i.to_le_bytes()).as_bytes(),
        };
        let mut bytes = Vec::new();
        entry(3).encode_into(&mut bytes);
        assert_eq!(bytes.len(), CHUNK_ENTRY_LEN);
        assert_eq!(ChunkRef::decode(&bytes), Some(entry(3)));
        assert_eq!(ChunkRef::decode(&bytes[1..]), None);

        let mut w = TableWriter::new(crate::envelope::Protection::Plain);
        let n = u64::from(CHUNKS_PER_PIECE) + 5;
        let mut pieces = Vec::new();
        for i in 0..n {
            pieces.extend(w.push(&entry(i)));
        }
        assert_eq!(pieces.len(), 1);
        let (last, table) = w.finish();
        pieces.extend(last);
        assert_eq!(table.count, n);
        assert_eq!(table.pieces.len(), 2);
        assert_eq!(pieces[1].1.len(), 5 * CHUNK_ENTRY_LEN);
        assert_eq!(
            ChunkRef::decode(&pieces[1].1[CHUNK_ENTRY_LEN..]),
            Some(entry(n - 4))
        );
    }

    #[tokio::test]
    async fn a_stored_table_reads_back_whole_or_a_piece_at_a_time_and_damage_is_named() {
        use crate::codec::Codec;
        use crate::envelope::EncodeOptions;
        use crate::storage::MemStorage;
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let objects = ObjectStore::new(
            storage.clone(),
            Arc::new(Codec::new(1, 4)),
            EncodeOptions::default(),
        );
        let n = u64::from(CHUNKS_PER_PIECE) * 2 + 10;
        let entry = |i: u64| ChunkRef {
            pack: 0,
            offset: i * 100,
            stored_len: 100,
            plain_len: 1,
            hash: *blake3::hash(&i.to_le_bytes()).as_bytes(),
        };
        let mut m = sample();
        let mut w = TableWriter::new(crate::envelope::Protection::Plain);
        let mut pieces = Vec::new();
        for i in 0..n {
            pieces.extend(w.push(&entry(i)));
        }
        let (last, table) = w.finish();
        pieces.extend(last);
        for (k, piece) in pieces {
            objects
                .put(&chunk_table_key(&m.id, k), piece, PutMode::IfAbsent)
                .await
                .unwrap();
        }
        m.chunk_table = table;
        m.size = n;
        m.files[0].size = n;
        m.files[0].chunks = ChunkSpan { first: 0, count: n };
        m.chunks = Arc::new(Vec::new());
        m.store(&objects).await.unwrap();
        // Stored again as it is (a retried write that was performed): ours, fine; another
        // manifest under the same id is refused.
        m.store(&objects).await.unwrap();
        let mut other = m.clone();
        other.label = "another".into();
        assert!(matches!(
            other.store(&objects).await,
            Err(ManifestError::Exists(_))
        ));

        let whole = BackupManifest::load(&objects, &m.id).await.unwrap();
        assert_eq!(whole.chunks.len() as u64, n);
        assert_eq!(whole.chunks[70_000], entry(70_000));
        let header = BackupManifest::load_header(&objects, &m.id).await.unwrap();
        assert!(header.chunks.is_empty());
        let mut reader = TableReader::new(objects.clone(), &header);
        for i in [5, n - 1, 65_536, 3, n - 2] {
            assert_eq!(reader.get(i).await.unwrap(), Some(entry(i)), "entry {i}");
        }
        assert_eq!(reader.get(n).await.unwrap(), None);

        // A piece replaced by another valid envelope: refused, by key.
        let key = chunk_table_key(&m.id, 1);
        let other = crate::envelope::encode(&[0u8; 52], EncodeOptions::default());
        storage.put(&key, other, PutMode::Overwrite).await.unwrap();
        let e = BackupManifest::load(&objects, &m.id).await.unwrap_err();
        assert!(e.to_string().contains(&key), "{e}");
    }
}
