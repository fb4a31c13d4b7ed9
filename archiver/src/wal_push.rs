//! `wal-push`: one WAL file into the repository, as PostgreSQL's archive_command. It
//! checks the file is WAL of the repository's cluster, stores it with put-if-absent, reads
//! back the stored object's checksum before reporting success, and treats the same bytes
//! already stored as success and different bytes under the same name as a refusal.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;

use bytes::Bytes;
use repo::codec::Codec;
use repo::envelope::{self, EncodeOptions, FIXED_HEADER_LEN};
use repo::objects::ObjectError;
use repo::repository::{ClusterIdentity, OpenError, Repository};
use repo::storage::{PutMode, PutOutcome, Storage};
use repo::url::RepoUrl;
use walfmt::{ArchiveFileKind, SegmentName, SegmentSummary};

use crate::ahead::{self, Record, StateDir};
use crate::summary_json::summary_json;
use repo::keys::{summary_key, wal_key};

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Stored now (and checked).
    Stored,
    /// The same bytes were already stored.
    AlreadyStored,
    /// An earlier call stored it ahead; checked against the file and the repository.
    StoredEarlier,
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

/// How a push call works beyond the file it was given.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// How many more `.ready` files to store in the same call (0: none).
    pub ahead: usize,
    /// At most this many files read, compressed and uploaded at once.
    pub parallel: usize,
    /// Where records of files stored ahead are kept; `None`: beside `pg_wal`
    /// ([`ahead::default_state_dir`]).
    pub state_dir: Option<PathBuf>,
    /// Compression of stored objects.
    pub encode: EncodeOptions,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            ahead: 0,
            parallel: 1,
            state_dir: None,
            encode: EncodeOptions::default(),
        }
    }
}

/// What a call did: the outcome for the file asked for, and for each file pushed ahead.
#[derive(Debug)]
pub struct PushReport {
    /// The file asked for.
    pub pushed: Pushed,
    /// Files pushed ahead, each with its outcome (failures are left for PostgreSQL's own
    /// call for that file).
    pub ahead: Vec<(String, Result<Pushed, PushError>)>,
}

/// A WAL file read and checked, ready to store.
struct WalFile {
    name: String,
    key: String,
    bytes: Bytes,
    /// Only when loaded for comparison: a file loaded to store is hashed while encoding.
    hash: Option<[u8; 32]>,
    summary: Option<SegmentSummary>,
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads the file at `path` and, on a blocking thread, checks a segment (`check`, to store
/// it) or hashes it (to compare it with what was stored).
async fn load(path: &Path, check: bool) -> Result<WalFile, PushError> {
    let shown = path.display().to_string();
    let name = file_name(path);
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
    // Checking and hashing are CPU work, done on a blocking thread.
    let (b, p, n) = (bytes.clone(), shown.clone(), name.clone());
    let (hash, summary) = tokio::task::spawn_blocking(move || {
        let hash = (!check).then(|| *blake3::hash(&b).as_bytes());
        let summary = match kind {
            ArchiveFileKind::Segment | ArchiveFileKind::Partial if check => {
                Some(check_segment(&p, &n, &kind, &b)?)
            }
            _ => None,
        };
        Ok::<_, PushError>((hash, summary))
    })
    .await
    .map_err(|e| PushError::NotWal {
        path: shown,
        reason: e.to_string(),
    })??;
    Ok(WalFile {
        name,
        key,
        bytes,
        hash,
        summary,
    })
}

/// Stores a loaded file: put-if-absent, read back its checksum, then its summary. Returns
/// the outcome and the file's blake3.
async fn store(repo: &Repository, file: WalFile) -> Result<(Pushed, [u8; 32]), PushError> {
    if let Some(s) = &file.summary {
        repo.check_cluster(&identity(s))?;
    }
    let objects = repo.objects();
    let WalFile {
        name,
        key,
        bytes,
        summary,
        ..
    } = file;
    let (outcome, pushed) = objects.put_hashed(&key, bytes, PutMode::IfAbsent).await?;
    match outcome {
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
            Ok((Pushed::Stored, pushed))
        }
        PutOutcome::AlreadyExists => {
            let stored = stored_hash(objects.storage().as_ref(), &key).await?;
            if stored == pushed {
                Ok((Pushed::AlreadyStored, pushed))
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

/// The cheap check for a file an earlier call stored ahead: the record is for this
/// repository, the file still hashes to what was stored, and the stored object's header
/// carries that hash (one ranged read). Any doubt (`false`) means a normal push.
async fn stored_earlier(
    storage: &dyn Storage,
    url: &RepoUrl,
    path: &Path,
    record: &Record,
) -> bool {
    if record.repo != url.to_string() {
        return false;
    }
    let name = file_name(path);
    let Some(key) = wal_key(&name) else {
        return false;
    };
    let Ok(WalFile {
        hash: Some(hash), ..
    }) = load(path, false).await
    else {
        return false;
    };
    if hex(&hash) != record.blake3 {
        return false;
    }
    matches!(stored_hash(storage, &key).await, Ok(h) if h == hash)
}

/// Pushes the WAL file at `path` into the repository at `url`, and with
/// `options.ahead`, up to that many more files PostgreSQL has marked ready, concurrently.
pub async fn push(
    url: &RepoUrl,
    path: &Path,
    codec: Arc<Codec>,
    options: &PushOptions,
) -> Result<PushReport, PushError> {
    let name = file_name(path);
    let pg_wal = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let state = (options.ahead > 0).then(|| {
        StateDir::new(
            options
                .state_dir
                .clone()
                .unwrap_or_else(|| ahead::default_state_dir(&pg_wal)),
        )
    });

    // A file stored by an earlier call's push-ahead: check it and answer at once.
    if let Some(record) = state.as_ref().and_then(|s| s.lookup(&name)) {
        let storage = repo::repository::storage_for(url)
            .await
            .map_err(|e| PushError::Open(e.into()))?;
        if stored_earlier(storage.as_ref(), url, path, &record).await {
            if let Some(s) = &state {
                s.forget(&name);
            }
            return Ok(PushReport {
                pushed: Pushed::StoredEarlier,
                ahead: Vec::new(),
            });
        }
    }

    let file = load(path, true).await?;
    let repo = Repository::open(url, file.summary.as_ref().map(identity).as_ref(), codec)
        .await?
        .with_encode_options(options.encode);

    let ready = state
        .as_ref()
        .map(|_| ahead::ready_files(&pg_wal, &name))
        .unwrap_or_default();
    let todo: Vec<String> = ready
        .iter()
        .filter(|n| state.as_ref().is_some_and(|s| s.lookup(n).is_none()))
        .take(options.ahead)
        .cloned()
        .collect();
    if let Some(s) = &state {
        // Records of files no longer waiting are of no use.
        s.prune(&ready.iter().cloned().collect());
    }

    let url_text = url.to_string();
    let one_ahead = |n: String| {
        let (repo, pg_wal, state, url_text) = (&repo, &pg_wal, state.as_ref(), url_text.clone());
        async move {
            let result = async {
                let f = load(&pg_wal.join(&n), true).await?;
                let (pushed, hash) = store(repo, f).await?;
                let hash = hex(&hash);
                if let Some(s) = state {
                    let _ = s.record(
                        &n,
                        &Record {
                            repo: url_text,
                            blake3: hash,
                        },
                    );
                }
                Ok(pushed)
            }
            .await;
            (n, result)
        }
    };
    // The file asked for first; the others share the remaining slots.
    // Memory: each slot holds a file and its envelope; keep the sum near 256 MiB whatever
    // the segment size.
    let by_memory = (256 << 20) / file.bytes.len().max(16 << 20);
    let slots = options.parallel.min(by_memory).max(1);
    let main = store(&repo, file);
    let others = futures::stream::iter(todo.into_iter().map(one_ahead))
        .buffer_unordered(slots.saturating_sub(1).max(1))
        .collect::<Vec<_>>();
    let (pushed, ahead) = tokio::join!(main, others);
    Ok(PushReport {
        pushed: pushed?.0,
        ahead,
    })
}
