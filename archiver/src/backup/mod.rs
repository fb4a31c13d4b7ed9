//! `pitr backup`: a base backup over the replication protocol into the repository.
//!
//! BASE_BACKUP's archives are taken apart as they stream ([`chunker`]), file contents cut
//! into fixed chunks that are hashed, compressed and packed on worker threads and uploaded
//! a few packs at a time ([`pipeline`]). A chunk the newest earlier backup already holds is
//! referenced, not stored again, so every backup is a full one that pays only for what
//! changed. Once the data is stored and the WAL from the backup's start to its stop is in
//! the repository (or in the backup itself, with `include_wal`), PostgreSQL's own
//! backup_manifest and then pitr's manifest are written: the backup exists from then on.

pub mod chunker;
pub mod pipeline;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use repo::keys::wal_key;
use repo::manifest::{
    id_taken, list_backups, pg_manifest_key, BackupManifest, ChunkSpan, FileType, ManifestError,
    ManifestFile, TableReader, TablespaceEntry, MANIFEST_FORMAT,
};
use repo::markers::{Marker, MarkerBody};
use repo::objects::ObjectError;
use repo::repository::Repository;
use repo::storage::{PutMode, StorageError};
use walfmt::{Lsn, PgTimestamp, SegmentName, TimelineId, WalSegmentSize};

use crate::pg::base_backup::{BackupEvent, BackupOptions, BaseBackup};
use crate::pg::{ConnError, ReplicationConn};
use crate::tar::TarError;
use chunker::{Chunk, Chunker};
use pipeline::{Known, Pipeline, PipelineConfig, PipelineError};

/// The chunk size: 64 KiB, eight pages (docs/FORMAT.md says why).
pub const DEFAULT_CHUNK_SIZE: usize = 64 << 10;
/// Packs are closed at about this size (one PutObject on S3).
pub const DEFAULT_PACK_SIZE: usize = 8 << 20;

/// How to take the backup.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// BASE_BACKUP's label.
    pub label: String,
    /// Checkpoint at once rather than spread.
    pub fast_checkpoint: bool,
    /// Store the WAL from start to stop in the backup itself instead of waiting for it
    /// to be archived.
    pub include_wal: bool,
    /// Server-side throttling in kB/s (BASE_BACKUP's MAX_RATE).
    pub max_rate_kb: Option<u32>,
    /// Bytes per chunk.
    pub chunk_size: usize,
    /// The data path.
    pub pipeline: PipelineConfig,
    /// How long to wait for the backup's WAL to reach the repository.
    pub wal_timeout: Duration,
}

/// Where the backup is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for BASE_BACKUP's checkpoint.
    Checkpoint,
    /// Receiving and storing files.
    Data,
    /// Waiting for this WAL segment to be archived.
    WaitingForWal(String),
    /// Writing the manifest.
    Manifest,
}

/// A progress report.
#[derive(Debug, Clone)]
pub struct Progress {
    /// What is going on.
    pub phase: Phase,
    /// File bytes received.
    pub bytes: u64,
    /// The server's estimate of the total, if it sent one.
    pub total: Option<u64>,
}

/// Why a backup failed. Nothing it stored is referenced by a manifest.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The server refused or the connection broke.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The server sent an archive pitr cannot read.
    #[error(transparent)]
    Tar(#[from] TarError),
    /// Storing the data failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The repository failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An object could not be written or read.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// A manifest could not be written or read.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The WAL the backup needs did not reach the repository in time.
    #[error("WAL segment {segment} needed by the backup was not archived within {waited:?}")]
    WalMissing {
        /// The first missing segment.
        segment: String,
        /// How long pitr waited.
        waited: Duration,
        /// The backup was taken from a standby (its backup_label says so).
        standby: bool,
    },
    /// Something the server said makes no sense.
    #[error("{0}")]
    Protocol(String),
    /// The backup's marker could not be rewritten for too long: a concurrent expire may
    /// not have seen it, and may have removed what the backup relies on.
    #[error("the backup's marker in the repository was not rewritten for over {} minutes; no manifest was written", repo::markers::LAPSE.as_secs() / 60)]
    MarkerLapsed,
}

impl BackupError {
    /// What the operator can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            BackupError::WalMissing { standby: true, .. } => Some(
                "a standby does not switch WAL segments when its backup ends: its last segment is archived once the primary switches (set archive_timeout on the primary), or held by pitr stream from it as it is written; or take the backup with --wal",
            ),
            BackupError::WalMissing { .. } => Some(
                "is archive_command = 'pitr wal-push %p' archiving into this repository? Or take the backup with --wal",
            ),
            _ => None,
        }
    }
}

/// `20261201T104312Z` from a time.
fn id_of(t: PgTimestamp) -> String {
    let s = t.to_string(); // 2026-12-01T10:43:12.123456Z
    let digits: String = s[..19].chars().filter(|c| c.is_ascii_digit()).collect();
    format!("{}T{}Z", &digits[..8], &digits[8..])
}

/// What the newest earlier backup holds, to reference instead of storing again: its
/// files' places in its chunk table, read a piece at a time. PostgreSQL rewrites pages in
/// place, so a chunk is compared with the one at the same place of the same file.
struct Previous {
    files: HashMap<(Option<u32>, String), ChunkSpan>,
    packs: Vec<Arc<str>>,
    table: TableReader,
    /// The new backup's file being chunked (its index) and its span in the earlier one.
    current: Option<(u32, Option<ChunkSpan>)>,
}

impl Previous {
    /// The newest backup, to compare with; the marker names it first, and it is not used
    /// when a running expire or delete is removing it.
    async fn load(repo: &Repository, marker: &Marker) -> Result<Option<Previous>, BackupError> {
        let ids = list_backups(repo.objects().storage().as_ref()).await?;
        let Some(last) = ids.last() else {
            return Ok(None);
        };
        marker.update(|b| b.backups = vec![last.clone()]).await?;
        if !marker.condemned().await?.is_empty() {
            marker.update(|b| b.backups.clear()).await?;
            return Ok(None);
        }
        let m = match BackupManifest::load_header(repo.objects(), last).await {
            Ok(m) => m,
            // Removed by a delete that came first.
            Err(ManifestError::Object(ObjectError::Storage(e))) if e.is_not_found() => {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Some(Previous {
            files: m
                .files
                .iter()
                .filter(|f| !f.chunks.is_empty())
                .map(|f| ((f.tablespace, f.path.clone()), f.chunks))
                .collect(),
            packs: m.packs.iter().map(|p| Arc::from(p.as_str())).collect(),
            table: TableReader::new(repo.objects().clone(), &m),
            current: None,
        }))
    }

    /// What the earlier backup held where chunk `c` of the new one is (`files`: the new
    /// backup's files so far, which `c.file` indexes).
    async fn at(
        &mut self,
        files: &[ManifestFile],
        c: &Chunk,
    ) -> Result<Option<Known>, BackupError> {
        if self.current.is_none_or(|(f, _)| f != c.file) {
            let span = files
                .get(c.file as usize)
                .and_then(|f| self.files.get(&(f.tablespace, f.path.clone())).copied());
            self.current = Some((c.file, span));
        }
        let seq = c.seq;
        let span = self.current.and_then(|(_, s)| s);
        let Some(span) = span.filter(|s| u64::from(seq) < s.count) else {
            return Ok(None);
        };
        let Some(entry) = self.table.get(span.first + u64::from(seq)).await? else {
            return Ok(None);
        };
        let pack = self.packs.get(entry.pack()).cloned().ok_or_else(|| {
            BackupError::Protocol("the earlier manifest names a pack it does not list".into())
        })?;
        Ok(Some(Known { pack, entry }))
    }
}

/// This host's clock, which names the backup and dates it for people; nothing decides by
/// it (a restore compares WAL positions). `PITR_DEBUG_CLOCK_OFFSET=SECONDS` shifts it: a
/// test hook for a host whose clock is wrong.
fn host_now() -> PgTimestamp {
    let now = PgTimestamp::now();
    match std::env::var("PITR_DEBUG_CLOCK_OFFSET")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    {
        Some(offset) => PgTimestamp::from_unix_micros(now.unix_micros() + offset * 1_000_000),
        None => now,
    }
}

/// Takes a base backup of the server on `conn` into `repo` and returns its manifest, once
/// stored. `server_version` is the server's full version string.
pub async fn take(
    conn: &mut ReplicationConn,
    repo: &Repository,
    config: &BackupConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BackupManifest, BackupError> {
    let storage = repo.objects().storage().clone();
    let start_time = host_now();
    let mut id = id_of(start_time);
    let mut n = 2;
    while id_taken(storage.as_ref(), &id).await? {
        id = format!("{}-{n}", id_of(start_time));
        n += 1;
    }
    // The marker says what this backup relies on (the id it writes, the backup it
    // compares with, the WAL from its start), so a concurrent expire leaves those alone.
    let mut body = MarkerBody::new("backup");
    body.writing = Some(id.clone());
    let marker = Marker::start(repo.objects(), body).await?;
    let result = take_marked(conn, repo, config, progress, id, start_time, &marker).await;
    marker.finish().await;
    result
}

async fn take_marked(
    conn: &mut ReplicationConn,
    repo: &Repository,
    config: &BackupConfig,
    progress: &mut dyn FnMut(&Progress),
    id: String,
    start_time: PgTimestamp,
    marker: &Marker,
) -> Result<BackupManifest, BackupError> {
    let server_version = conn.server_version().unwrap_or("").to_owned();
    let seg = WalSegmentSize::new(repo.config().wal_segment_size)
        .map_err(|e| BackupError::Protocol(e.to_string()))?;
    let mut prev = Previous::load(repo, marker).await?;
    let mut pipeline = Pipeline::start(repo.objects().clone(), &id, config.pipeline);
    let options = BackupOptions {
        label: config.label.clone(),
        fast_checkpoint: config.fast_checkpoint,
        manifest: true,
        wal: config.include_wal,
        max_rate_kb: config.max_rate_kb,
    };
    let mut report = Progress {
        phase: Phase::Checkpoint,
        bytes: 0,
        total: None,
    };
    progress(&report);
    let mut backup = BaseBackup::start(conn, &options).await?;
    let mut chunker = Chunker::new(config.chunk_size);
    let mut chunks = Vec::new();
    let (mut start, mut stop) = (None, None);
    let mut tablespaces = Vec::new();
    let mut pg_manifest = Vec::new();
    let mut label: Option<bytes::Bytes> = None;
    let mut last_report = Instant::now();
    while let Some(event) = backup.next().await? {
        match event {
            BackupEvent::Started { lsn, timeline } => {
                start = Some((lsn, timeline));
                let first = SegmentName::new(TimelineId(timeline), lsn.segment_number(seg), seg);
                marker
                    .update(|b| b.wal_from = Some(first.to_string()))
                    .await?;
            }
            BackupEvent::Ended { lsn, timeline } => stop = Some((lsn, timeline)),
            BackupEvent::Tablespaces(list) => {
                report.total = list.iter().map(|t| t.size).sum();
                report.phase = Phase::Data;
                tablespaces = list;
            }
            BackupEvent::Archive { tablespace, .. } => chunker.start_archive(tablespace)?,
            BackupEvent::Data(d) => {
                chunker.feed(&d, &mut chunks)?;
                for c in chunks.drain(..) {
                    // The server's backup_label (one chunk): its START TIME is the server's.
                    let f = &chunker.files()[c.file as usize];
                    if c.seq == 0 && f.tablespace.is_none() && f.path == "backup_label" {
                        label = Some(c.data.clone());
                    }
                    let expect = match prev.as_mut() {
                        Some(p) => p.at(chunker.files(), &c).await?,
                        None => None,
                    };
                    pipeline.submit(c, expect).await?;
                }
                if pipeline.failed() {
                    break;
                }
                if last_report.elapsed() >= Duration::from_millis(200) {
                    report.bytes = chunker.bytes;
                    progress(&report);
                    last_report = Instant::now();
                }
            }
            BackupEvent::Progress(_) => {}
            BackupEvent::Manifest => chunker.end_archive()?,
            BackupEvent::ManifestData(d) => pg_manifest.extend_from_slice(&d),
        }
    }
    drop(backup);
    report.bytes = chunker.bytes;
    progress(&report);
    let stored = pipeline.finish().await?;
    let mut files = chunker.finish()?;
    let stop_time = host_now();
    let ((start_lsn, timeline), (stop_lsn, stop_timeline)) = match (start, stop) {
        (Some(a), Some(b)) => (a, b),
        _ => {
            return Err(BackupError::Protocol(
                "BASE_BACKUP ended without its start and stop positions".into(),
            ))
        }
    };

    if !config.include_wal {
        let standby = label
            .as_deref()
            .and_then(|b| walfmt::BackupLabel::parse(b).ok())
            .and_then(|l| l.from)
            .is_some_and(|f| f == "standby");
        wait_for_wal(
            repo,
            (timeline, stop_timeline),
            (start_lsn, stop_lsn),
            seg,
            config.wal_timeout,
            standby,
            &mut |segment| {
                report.phase = Phase::WaitingForWal(segment);
                progress(&report);
            },
        )
        .await?;
    }
    report.phase = Phase::Manifest;
    progress(&report);

    let pg_manifest_key = if pg_manifest.is_empty() {
        None
    } else {
        let key = pg_manifest_key(&id);
        repo.objects()
            .put(&key, pg_manifest.into(), PutMode::IfAbsent)
            .await?;
        Some(key)
    };

    // The chunk table holds every file's chunks in file order: each file's run follows
    // the one before.
    let mut first = 0u64;
    for f in files.iter_mut().filter(|f| f.kind == FileType::File) {
        let count = f.size.div_ceil(config.chunk_size as u64);
        f.chunks = ChunkSpan { first, count };
        first += count;
    }
    if first != stored.table.count {
        return Err(BackupError::Protocol(format!(
            "the chunk table holds {} entries for {first} chunks of files",
            stored.table.count
        )));
    }

    let manifest = BackupManifest {
        format: MANIFEST_FORMAT,
        id,
        label: config.label.clone(),
        system_identifier: repo.config().system_identifier.clone(),
        pg_version: repo.config().pg_version,
        server_version,
        timeline,
        start_lsn: start_lsn.to_string(),
        stop_lsn: stop_lsn.to_string(),
        stop_timeline,
        start_time: start_time.to_string(),
        stop_time: stop_time.to_string(),
        checkpoint: if config.fast_checkpoint {
            "fast"
        } else {
            "spread"
        }
        .to_owned(),
        wal: if config.include_wal {
            "included"
        } else {
            "archive"
        }
        .to_owned(),
        chunk_size: config.chunk_size as u32,
        compression: match config.pipeline.encode.zstd_level {
            Some(l) => format!("zstd-{l}"),
            None => "none".to_owned(),
        },
        size: files.iter().map(|f| f.size).sum(),
        stored_new: stored.stored_new,
        stored_total: stored.stored_total,
        pg_manifest: pg_manifest_key,
        server_start_time: label
            .as_deref()
            .and_then(|b| walfmt::BackupLabel::parse(b).ok())
            .and_then(|l| l.start_time),
        tablespaces: tablespaces
            .into_iter()
            .filter_map(|t| {
                Some(TablespaceEntry {
                    oid: t.oid?,
                    location: t.location.unwrap_or_default(),
                })
            })
            .collect(),
        packs: stored.packs,
        chunk_table: stored.table,
        generation: 1,
        stored_at: None,
        chunks: Default::default(),
        files,
        created_by: format!("pitr {}", env!("CARGO_PKG_VERSION")),
    };
    if marker.lapsed() {
        return Err(BackupError::MarkerLapsed);
    }
    manifest.store(repo.objects()).await?;
    Ok(manifest)
}

/// Waits until every segment from `lsns.0` up to the one holding the byte before `lsns.1`
/// is in the repository (on the start or stop timeline). The last one may also be there as
/// the durable prefix `pitr stream` holds of it (pieces under `stream/`) reaching `lsns.1`:
/// a standby's backup ends inside a segment no one switches away from.
async fn wait_for_wal(
    repo: &Repository,
    timelines: (u32, u32),
    lsns: (Lsn, Lsn),
    seg: WalSegmentSize,
    timeout: Duration,
    standby: bool,
    waiting: &mut dyn FnMut(String),
) -> Result<(), BackupError> {
    let storage = repo.objects().storage();
    let first = SegmentName::of(TimelineId(timelines.0), lsns.0, seg);
    let last = lsns.1 .0.saturating_sub(1).max(lsns.0 .0) / seg.bytes();
    let started = Instant::now();
    let mut name = first;
    let mut told = false;
    while name.segno <= last {
        let candidates = [
            name,
            SegmentName {
                timeline: TimelineId(timelines.1),
                ..name
            },
        ];
        let mut found = false;
        // The stop segment on the stop timeline only: after a switch within it, its bytes
        // past the switch are the new timeline's.
        let candidates = if name.segno == last {
            &candidates[1..]
        } else {
            &candidates[..]
        };
        for &c in candidates {
            let key = wal_key(&c.to_string()).unwrap_or_default();
            if storage.head(&key).await?.is_some() {
                found = true;
                break;
            }
            if name.segno == last {
                // Bytes of this segment the backup needs: up to its stop position.
                let needed = lsns.1 .0.saturating_sub(c.start_lsn().0);
                let pieces = repo::pieces::list_pieces(storage.as_ref(), &c.to_string()).await?;
                let end = u64::from(repo::pieces::contiguous(&pieces).1);
                if end > 0 && end >= needed {
                    found = true;
                    break;
                }
            }
        }
        if found {
            name = name.next();
            told = false;
            continue;
        }
        if started.elapsed() >= timeout {
            return Err(BackupError::WalMissing {
                segment: name.to_string(),
                waited: timeout,
                standby,
            });
        }
        if !told {
            waiting(name.to_string());
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_as_times() {
        let t = PgTimestamp::from_unix_micros(1_778_727_600_123_456);
        assert_eq!(id_of(t), "20260514T030000Z");
    }
}
