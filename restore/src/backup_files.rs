//! A backup's files read back from the repository and checked: every chunk against the
//! hash its chunk table names, every file against PostgreSQL's own backup_manifest. verify
//! and the backup tests build on this.

use futures::{StreamExt, TryStreamExt};
use repo::envelope::EnvelopeError;
use repo::manifest::{BackupManifest, FileType, ManifestFile};
use repo::objects::{ObjectError, ObjectStore};

use crate::files::Piece;

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

/// What [`check_backup`] read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Files read back whole.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files also compared with PostgreSQL's backup_manifest (size and checksum).
    pub matched_pg_manifest: u64,
}

/// Why a backup does not check out.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A file could not be read back.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A piece of the chunk table could not be read, or is damaged or inconsistent.
    #[error(transparent)]
    Table(repo::manifest::ManifestError),
    /// PostgreSQL's backup_manifest could not be read.
    #[error("backup_manifest of backup {id}: {reason}")]
    PgManifest {
        /// The backup.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A file is not what PostgreSQL sent.
    #[error("file \"{path}\" {what}")]
    Mismatch {
        /// The file (as backup_manifest names it).
        path: String,
        /// How it differs.
        what: String,
    },
}

/// The path PostgreSQL's backup_manifest gives a file of the backup.
pub fn pg_path(f: &ManifestFile) -> String {
    match f.tablespace {
        Some(oid) => format!("pg_tblspc/{oid}/{}", f.path),
        None => f.path.clone(),
    }
}

struct PgFile {
    size: u64,
    crc32c: Option<String>,
}

/// What is compared of PostgreSQL's backup_manifest (other fields are skipped unread).
#[derive(serde::Deserialize)]
struct PgManifest {
    #[serde(rename = "Files")]
    files: Vec<PgEntry>,
}

#[derive(serde::Deserialize)]
struct PgEntry {
    #[serde(rename = "Path")]
    path: Option<String>,
    #[serde(rename = "Size")]
    size: Option<u64>,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

async fn pg_files(
    objects: &ObjectStore,
    m: &BackupManifest,
) -> Result<Option<std::collections::HashMap<String, PgFile>>, CheckError> {
    let Some(key) = &m.pg_manifest else {
        return Ok(None);
    };
    let bad = |reason: String| CheckError::PgManifest {
        id: m.id.clone(),
        reason,
    };
    // Unreadable (the storage) and damaged or gone are told apart by the caller.
    let (_, bytes) = objects.get(key).await.map_err(|source| ReadError::Object {
        path: key.clone(),
        source,
    })?;
    // Only the fields compared are kept: a tree of the whole JSON took about 1 KiB per
    // file (100 MiB for 100,000 relations).
    let pg: PgManifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    drop(bytes);
    let mut out = std::collections::HashMap::with_capacity(pg.files.len());
    for (i, f) in pg.files.into_iter().enumerate() {
        let (Some(path), Some(size)) = (f.path, f.size) else {
            return Err(bad(format!("entry {i} of Files without Path or Size")));
        };
        // CRC-32C is the server's default; other algorithms are compared by size only.
        let crc32c = f
            .checksum
            .filter(|_| f.algorithm.as_deref() == Some("CRC32C"));
        out.insert(path, PgFile { size, crc32c });
    }
    Ok(Some(out))
}

/// Bytes of one ranged read when a backup is checked (as a restore reads it).
const CHECK_RANGE: u64 = 8 << 20;
/// Ranged reads in flight when a backup is checked.
const CHECK_READS: usize = 8;

/// Reads every file of backup `m` back, checking each chunk's hash, and compares each with
/// PostgreSQL's backup_manifest (size and CRC-32C) when the backup holds one: every file
/// the server listed must be there, and nothing else but the WAL under `pg_wal/`. The packs
/// are read as a restore reads them (the chunk table a piece at a time, each piece's chunks
/// in large ranged reads in pack order, several at once, each place fetched once however
/// many of the piece's entries name it); each chunk's CRC-32C is kept for its piece and a
/// file's is combined from its chunks' in order, across pieces: memory stays bounded by a
/// piece, whatever the backup's size. `m` may be its header only
/// ([`BackupManifest::load_header`]).
pub async fn check_backup(
    objects: &ObjectStore,
    m: &BackupManifest,
) -> Result<CheckReport, CheckError> {
    m.check_header()
        .map_err(|reason| CheckError::Table(m.bad(reason)))?;
    let mut files = FileCheck {
        m,
        listed: pg_files(objects, m).await?,
        next: 0,
        len: 0,
        crc: 0,
        report: CheckReport::default(),
    };
    let mut pieces = std::pin::pin!(crate::files::planned(objects, m, CHECK_RANGE));
    while let Some((piece, ranges)) = pieces.try_next().await.map_err(CheckError::Table)? {
        let crcs = check_piece(objects, m, &piece, ranges).await?;
        for (k, (c, crc)) in piece.chunks.iter().zip(crcs).enumerate() {
            files.chunk(piece.first + k as u64, c.plain_len(), crc)?;
        }
    }
    files.end()
}

/// Reads the chunks of one piece of the chunk table and checks them: the CRC-32C of each
/// entry's plaintext, in table order.
async fn check_piece(
    objects: &ObjectStore,
    m: &BackupManifest,
    piece: &Piece,
    ranges: Vec<crate::files::Range>,
) -> Result<Vec<u32>, CheckError> {
    // The chunk read for each entry: its CRC-32C, once checked.
    let mut crcs: Vec<Option<u32>> = vec![None; piece.chunks.len()];
    let uses = &piece.uses;
    // The file a group's first use is in (for messages).
    let file_of = |g: u32| {
        m.files
            .get(uses.group(g)[0].file as usize)
            .map_or_else(String::new, |f| f.path.clone())
    };
    let reads = futures::stream::iter(ranges)
        .map(|r| async move {
            // (group, its bytes in the range, hash, plaintext length)
            let chunks: Vec<(u32, std::ops::Range<usize>, [u8; 32], u64)> = r
                .chunks
                .iter()
                .map(|&g| {
                    let c = piece.read(g);
                    let range = c.range();
                    (
                        g,
                        (range.start - r.start) as usize..(range.end - r.start) as usize,
                        c.hash,
                        u64::from(c.plain_len),
                    )
                })
                .collect();
            let Some(pack) = m.pack_key(r.pack) else {
                return Err((r.chunks[0], None));
            };
            let bytes = match objects.storage().get_range(&pack, r.start..r.end).await {
                Ok(b) => b,
                Err(e) => return Err((r.chunks[0], Some(ObjectError::from(e)))),
            };
            let protection = objects.protection().clone();
            let checked = objects
                .codec()
                .run(move || {
                    let mut out = Vec::with_capacity(chunks.len());
                    for (g, rel, hash, plain_len) in chunks {
                        let env = bytes.get(rel.clone()).ok_or((
                            g,
                            EnvelopeError::Truncated(bytes.len()),
                            rel.start,
                        ))?;
                        let plain = repo::pack::decode_chunk_of(env, &hash, plain_len, &protection)
                            .map_err(|e| (g, e, rel.start))?;
                        out.push((g, crc32c::crc32c(&plain)));
                    }
                    Ok(out)
                })
                .await
                .map_err(|e| (r.chunks[0], Some(ObjectError::from(e))))?;
            checked.map_err(|(g, source, at): (u32, EnvelopeError, usize)| {
                (
                    g,
                    Some(ObjectError::Corrupt {
                        key: format!("{pack}@{}", r.start + at as u64),
                        source,
                    }),
                )
            })
        })
        .buffer_unordered(CHECK_READS);
    let mut reads = std::pin::pin!(reads);
    while let Some(read) = reads.next().await {
        match read {
            Ok(done) => {
                for (g, crc) in done {
                    crcs[uses.read(g) as usize] = Some(crc);
                }
            }
            Err((g, None)) => return Err(ReadError::Manifest(file_of(g)).into()),
            Err((g, Some(source))) => {
                return Err(ReadError::Object {
                    path: file_of(g),
                    source,
                }
                .into())
            }
        }
    }
    // Every entry naming a place another entry was read for must name the same chunk.
    for dests in uses.groups() {
        let read = dests[0].entry;
        let c = &piece.chunks[read as usize];
        for &crate::files::Use {
            file: fi, entry, ..
        } in dests
        {
            let e = &piece.chunks[entry as usize];
            // Same place by construction: the whole entry must be the one checked.
            if e != c {
                return Err(ReadError::Object {
                    path: m.files[fi as usize].path.clone(),
                    source: ObjectError::Corrupt {
                        key: format!("{}@{}", m.pack_key(c.pack()).unwrap_or_default(), c.offset),
                        source: EnvelopeError::hash_mismatch(&e.hash, &c.hash),
                    },
                }
                .into());
            }
            crcs[entry as usize] = crcs[read as usize];
        }
    }
    crcs.into_iter()
        .enumerate()
        .map(|(k, crc)| {
            crc.ok_or_else(|| {
                let file = piece
                    .uses
                    .groups()
                    .flatten()
                    .find(|u| u.entry as usize == k)
                    .map_or(0, |u| u.file as usize);
                ReadError::Manifest(
                    m.files
                        .get(file)
                        .map_or_else(String::new, |f| f.path.clone()),
                )
                .into()
            })
        })
        .collect()
}

/// The files of a backup checked as their chunks' CRC-32Cs come, in table order: each
/// file is compared with PostgreSQL's backup_manifest once its last chunk is in.
struct FileCheck<'m> {
    m: &'m BackupManifest,
    /// What PostgreSQL's backup_manifest lists and no file matched yet.
    listed: Option<std::collections::HashMap<String, PgFile>>,
    /// The first file not checked yet.
    next: usize,
    /// Bytes and CRC-32C of its chunks so far.
    len: u64,
    crc: u32,
    report: CheckReport,
}

impl FileCheck<'_> {
    /// Table entry `i`'s chunk: `plain_len` bytes with CRC-32C `crc`. The files before the
    /// one holding it are complete: they are checked.
    fn chunk(&mut self, i: u64, plain_len: u32, crc: u32) -> Result<(), CheckError> {
        loop {
            let Some(f) = self.m.files.get(self.next) else {
                return Err(ReadError::Manifest(format!("chunk {i}")).into());
            };
            if f.chunks.count > 0 && i < f.chunks.first.saturating_add(f.chunks.count) {
                break;
            }
            self.file_done()?;
        }
        self.crc = crc32c::crc32c_combine(self.crc, crc, plain_len as usize);
        self.len += u64::from(plain_len);
        Ok(())
    }

    /// Every chunk is in: the last files are checked, and nothing PostgreSQL listed may be
    /// left.
    fn end(mut self) -> Result<CheckReport, CheckError> {
        while self.next < self.m.files.len() {
            self.file_done()?;
        }
        if let Some(missing) = self.listed.and_then(|l| l.into_keys().min()) {
            return Err(CheckError::Mismatch {
                path: missing,
                what: "is in PostgreSQL's backup_manifest but not in the backup".into(),
            });
        }
        Ok(self.report)
    }

    /// File `next` has all its chunks in: compared with what its manifests say.
    fn file_done(&mut self) -> Result<(), CheckError> {
        let f = &self.m.files[self.next];
        let (len, crc) = (self.len, self.crc);
        self.next += 1;
        (self.len, self.crc) = (0, 0);
        if f.kind != FileType::File {
            return Ok(());
        }
        let path = pg_path(f);
        if len != f.size {
            return Err(CheckError::Mismatch {
                path,
                what: format!("has {len} bytes, the manifest says {}", f.size),
            });
        }
        self.report.files += 1;
        self.report.bytes += f.size;
        let Some(listed) = self.listed.as_mut() else {
            return Ok(());
        };
        let Some(pg) = listed.remove(&path) else {
            if path.starts_with("pg_wal/") {
                return Ok(());
            }
            return Err(CheckError::Mismatch {
                path,
                what: "is not in PostgreSQL's backup_manifest".into(),
            });
        };
        if pg.size != f.size {
            return Err(CheckError::Mismatch {
                path,
                what: format!("has {} bytes, backup_manifest says {}", f.size, pg.size),
            });
        }
        if let Some(want) = pg.crc32c {
            let found: String = crc
                .to_le_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if !want.eq_ignore_ascii_case(&found) {
                return Err(CheckError::Mismatch {
                    path,
                    what: format!("has CRC-32C {found}, backup_manifest says {want}"),
                });
            }
        }
        self.report.matched_pg_manifest += 1;
        Ok(())
    }
}
