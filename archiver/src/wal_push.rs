//! `wal-push`: one WAL file into the repository, as PostgreSQL's archive_command. It
//! checks the file is WAL of the repository's cluster, stores it with put-if-absent, reads
//! back the stored object's checksum before reporting success, and treats the same bytes
//! already stored as success and different bytes under the same name as a refusal.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use repo::codec::Codec;
use repo::envelope::{self, FIXED_HEADER_LEN};
use repo::objects::ObjectError;
use repo::repository::{ClusterIdentity, OpenError, Repository};
use repo::storage::{PutMode, PutOutcome, Storage};
use repo::url::RepoUrl;
use walfmt::{ArchiveFileKind, SegmentName, SegmentSummary};

use crate::summary_json::summary_json;
use repo::keys::{summary_key, wal_key};

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Stored now (and checked).
    Stored,
    /// The same bytes were already stored.
    AlreadyStored,
}

/// Why a push failed. Every failure leaves PostgreSQL to retry the file later.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The file cannot be read.
    #[error("could not read file \"{path}\": {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a WAL file pitr archives, or not valid WAL.
    #[error("file \"{path}\" is not a WAL file: {reason}")]
    NotWal {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The repository cannot be used (another cluster's, unreachable, ...).
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Storing or reading back failed.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// Different bytes are already stored under this name.
    #[error("WAL file {name} is already archived with different contents (stored blake3 {stored}, this file {pushed})")]
    Conflict {
        /// The file name.
        name: String,
        /// blake3 of the stored plaintext.
        stored: String,
        /// blake3 of the file pushed.
        pushed: String,
    },
    /// The object stored is not the one written.
    #[error(
        "WAL file {name} did not read back as written (stored blake3 {stored}, written {pushed})"
    )]
    Unverified {
        /// The file name.
        name: String,
        /// What came back.
        stored: String,
        /// What was written.
        pushed: String,
    },
}

/// The cluster a segment belongs to, from its summary.
fn identity(s: &SegmentSummary) -> ClusterIdentity {
    ClusterIdentity {
        system_identifier: s.system_identifier,
        pg_version: s.pg_version.number(),
        wal_segment_size: s.segment_size.bytes(),
    }
}

/// Checks a segment (or `.partial`) is WAL, is the segment its name says, and for a whole
/// segment, is whole. CPU work: run off the async runtime.
fn check_segment(
    path: &str,
    name: &str,
    kind: &ArchiveFileKind,
    bytes: &[u8],
) -> Result<SegmentSummary, PushError> {
    let not_wal = |reason: String| PushError::NotWal {
        path: path.to_owned(),
        reason,
    };
    let summary = walfmt::summarize(bytes).map_err(|e| not_wal(e.to_string()))?;
    let seg = summary.segment_size;
    let named = SegmentName::parse(&name[..24], seg).map_err(|e| not_wal(e.to_string()))?;
    if named.start_lsn() != summary.start_lsn {
        return Err(not_wal(format!(
            "its pages are for the segment starting at {}, not {}",
            summary.start_lsn, name
        )));
    }
    if *kind == ArchiveFileKind::Segment && bytes.len() as u64 != seg.bytes() {
        return Err(not_wal(format!(
            "it is {} bytes, not the {} of a whole segment",
            bytes.len(),
            seg.bytes()
        )));
    }
    Ok(summary)
}

/// blake3 of an envelope's plaintext, from its header (a ranged read of 50 bytes).
async fn stored_hash(storage: &dyn Storage, key: &str) -> Result<[u8; 32], PushError> {
    let head = storage
        .get_range(key, 0..FIXED_HEADER_LEN as u64)
        .await
        .map_err(ObjectError::from)?;
    let header = envelope::header(&head).map_err(|source| ObjectError::Corrupt {
        key: key.to_owned(),
        source,
    })?;
    Ok(header.hash)
}

fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Pushes the WAL file at `path` into the repository at `url`.
pub async fn push(url: &RepoUrl, path: &Path, codec: Arc<Codec>) -> Result<Pushed, PushError> {
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let kind = ArchiveFileKind::of(&name);
    let key = wal_key(&name).ok_or_else(|| PushError::NotWal {
        path: shown.clone(),
        reason: "its name is not a WAL segment, .partial, .history or .backup file name".into(),
    })?;
    let bytes = Bytes::from(
        tokio::fs::read(path)
            .await
            .map_err(|source| PushError::Read {
                path: shown.clone(),
                source,
            })?,
    );

    // Checking and hashing are CPU work: one trip to a blocking thread for both.
    let (b, p, n) = (bytes.clone(), shown.clone(), name.clone());
    let (pushed, summary) = tokio::task::spawn_blocking(move || {
        let pushed = *blake3::hash(&b).as_bytes();
        let summary = match kind {
            ArchiveFileKind::Segment | ArchiveFileKind::Partial => {
                Some(check_segment(&p, &n, &kind, &b)?)
            }
            _ => None,
        };
        Ok::<_, PushError>((pushed, summary))
    })
    .await
    .map_err(|e| PushError::NotWal {
        path: shown.clone(),
        reason: e.to_string(),
    })??;
    let repo = Repository::open(url, summary.as_ref().map(identity).as_ref(), codec).await?;
    let objects = repo.objects();

    match objects.put(&key, bytes, PutMode::IfAbsent).await? {
        PutOutcome::Stored => {
            // Success only once the stored object reads back with this file's checksum.
            let stored = stored_hash(objects.storage().as_ref(), &key).await?;
            if stored != pushed {
                return Err(PushError::Unverified {
                    name,
                    stored: hex(&stored),
                    pushed: hex(&pushed),
                });
            }
            if let (Some(s), Some(skey)) = (&summary, summary_key(&name)) {
                let json = summary_json(&name, s).to_string();
                objects
                    .put(&skey, Bytes::from(json), PutMode::Overwrite)
                    .await?;
            }
            Ok(Pushed::Stored)
        }
        PutOutcome::AlreadyExists => {
            let stored = stored_hash(objects.storage().as_ref(), &key).await?;
            if stored == pushed {
                Ok(Pushed::AlreadyStored)
            } else {
                Err(PushError::Conflict {
                    name,
                    stored: hex(&stored),
                    pushed: hex(&pushed),
                })
            }
        }
    }
}
