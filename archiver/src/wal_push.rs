//! `wal-push`: one WAL file into the repository, as PostgreSQL's archive_command. It
//! checks the file is WAL of the repository's cluster, stores it with put-if-absent, reads
//! back the stored object's checksum before reporting success, and treats the same bytes
//! already stored as success and different bytes under the same name as a refusal.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use bytes::Bytes;
use repo::codec::Codec;
use repo::envelope::{self, EncodeOptions, HEADER_MAX};
use repo::objects::ObjectError;
use repo::repository::{ClusterIdentity, OpenError, Repository};
use repo::slots::KeySetting;
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
pub fn identity(s: &SegmentSummary) -> ClusterIdentity {
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

/// The hash field of a stored envelope (blake3, or the content id when encrypted), from a
/// ranged read of its header.
async fn stored_hash(storage: &dyn Storage, key: &str) -> Result<[u8; 32], PushError> {
    let head = storage
        .get_range(key, 0..HEADER_MAX as u64)
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
    /// How many `.ready` files the background worker may have stored ahead of PostgreSQL's
    /// calls for them (0: no worker; each call stores only its own file).
    pub ahead: usize,
    /// At most this many files read, compressed and uploaded at once by the worker.
    pub parallel: usize,
    /// Where records of files stored ahead are kept; `None`: beside `pg_wal`
    /// ([`ahead::default_state_dir`]).
    pub state_dir: Option<PathBuf>,
    /// Compression of stored objects.
    pub encode: EncodeOptions,
    /// How long the worker waits for more `.ready` files before it exits.
    pub linger: Duration,
    /// A call answered from the worker's record also reads the stored object's header
    /// back (the worker already did, before recording it).
    pub recheck: bool,
    /// The repository's key, when it is encrypted.
    pub key: KeySetting,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            ahead: 0,
            parallel: 1,
            state_dir: None,
            encode: EncodeOptions::default(),
            linger: Duration::from_secs(5),
            recheck: false,
            key: KeySetting::None,
        }
    }
}

impl PushOptions {
    /// The state directory for files in `pg_wal`, when pushing ahead is on.
    pub fn state(&self, pg_wal: &Path) -> Option<StateDir> {
        (self.ahead > 0).then(|| {
            StateDir::new(
                self.state_dir
                    .clone()
                    .unwrap_or_else(|| ahead::default_state_dir(pg_wal)),
            )
        })
    }
}

/// The directory holding `path` (`pg_wal` when PostgreSQL calls).
pub fn pg_wal_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned()
}

/// A file's bytes, shared by the `Bytes` handed to storage: once those are gone, the
/// buffer comes back whole for the next file (`Bytes` would give it back only by copying it
/// onto itself, 16 MiB a segment).
#[derive(Debug)]
struct Buffer(Arc<Vec<u8>>);

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A WAL file read and checked, ready to store.
struct WalFile {
    name: String,
    key: String,
    bytes: Bytes,
    /// The memory behind `bytes`, when read from a file.
    buffer: Option<Arc<Vec<u8>>>,
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
    load_into(path, check, Vec::new()).await
}

/// [`load`] into `buf` (its memory reused: a fresh 16 MiB buffer costs thousands of page
/// faults, more than reading the file).
async fn load_into(path: &Path, check: bool, mut buf: Vec<u8>) -> Result<WalFile, PushError> {
    let shown = path.display().to_string();
    let name = file_name(path);
    let kind = ArchiveFileKind::of(&name);
    let key = wal_key(&name).ok_or_else(|| PushError::NotWal {
        path: shown.clone(),
        reason: "its name is not a WAL segment, .partial, .history or .backup file name".into(),
    })?;
    // Reading, checking and hashing, on one trip to a blocking thread.
    let (p, n, file) = (shown.clone(), name.clone(), path.to_owned());
    let (buffer, hash, summary) = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        buf.clear();
        std::fs::File::open(&file)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .map_err(|source| PushError::Read {
                path: p.clone(),
                source,
            })?;
        let hash = (!check).then(|| *blake3::hash(&buf).as_bytes());
        let summary = match kind {
            ArchiveFileKind::Segment | ArchiveFileKind::Partial if check => {
                Some(check_segment(&p, &n, &kind, &buf)?)
            }
            _ => None,
        };
        Ok::<_, PushError>((Arc::new(buf), hash, summary))
    })
    .await
    .map_err(|e| PushError::NotWal {
        path: shown,
        reason: e.to_string(),
    })??;
    Ok(WalFile {
        name,
        key,
        bytes: Bytes::from_owner(Buffer(buffer.clone())),
        buffer: Some(buffer),
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

/// Stores WAL file `name` from memory (what `pitr stream` received) exactly as `wal-push`
/// stores a file: a segment is checked first (on a blocking thread), then put-if-absent,
/// the checksum read back, and its summary written. The same bytes already stored (by
/// archive_command, say) are success; different bytes are refused.
pub async fn store_bytes(repo: &Repository, name: &str, bytes: Bytes) -> Result<Pushed, PushError> {
    let key = wal_key(name).ok_or_else(|| PushError::NotWal {
        path: name.to_owned(),
        reason: "not a WAL file name".into(),
    })?;
    let kind = ArchiveFileKind::of(name);
    let (n, b) = (name.to_owned(), bytes.clone());
    let summary = match kind {
        ArchiveFileKind::Segment | ArchiveFileKind::Partial => Some(
            tokio::task::spawn_blocking(move || check_segment(&n, &n, &kind, &b))
                .await
                .map_err(|e| PushError::NotWal {
                    path: name.to_owned(),
                    reason: e.to_string(),
                })??,
        ),
        _ => None,
    };
    let file = WalFile {
        name: name.to_owned(),
        key,
        bytes,
        buffer: None,
        hash: None,
        summary,
    };
    Ok(store(repo, file).await?.0)
}

/// The cheap check for a file the worker stored ahead: the record is for this repository
/// and the file is the one it hashed (same identity, or else the same hash now). The worker
/// wrote the record only after the stored object read back with that hash. With
/// `options.recheck`, the stored object's header must also carry that hash now (one ranged
/// read). Any doubt (`false`) means a normal push.
async fn stored_earlier(
    url: &RepoUrl,
    path: &Path,
    record: &Record,
    options: &PushOptions,
) -> bool {
    if answered_locally(url, path, record, options) {
        return true;
    }
    if !record_matches(url, path, record) {
        return false;
    }
    if record.file.is_none() {
        let same = matches!(
            load(path, false).await,
            Ok(WalFile { hash: Some(h), .. }) if hex(&h) == record.blake3
        );
        if !same {
            return false;
        }
    }
    if !options.recheck {
        return true;
    }
    let Some(key) = wal_key(&file_name(path)) else {
        return false;
    };
    let Ok(storage) = repo::repository::storage_for(url).await else {
        return false;
    };
    matches!(stored_hash(storage.as_ref(), &key).await, Ok(h) if hex(&h) == record.blake3)
}

/// The record is for this repository and, when it carries the file's identity, the file
/// still has it (a record without one needs the file hashed again).
fn record_matches(url: &RepoUrl, path: &Path, record: &Record) -> bool {
    record.repo == url.to_string()
        && wal_key(&file_name(path)).is_some()
        && record
            .file
            .is_none_or(|id| ahead::FileIdentity::of(path).is_ok_and(|now| now == id))
}

/// What a call learns from the push-ahead worker's state for the file at `path`, waiting
/// while the worker is busy with it. Blocking (it polls the state directory): the CLI asks
/// before it starts a runtime.
#[derive(Debug)]
pub enum Ahead {
    /// No worker state to use (pushing ahead is off, no record, or the worker gave up on
    /// the file or is gone): push the file here.
    PushHere,
    /// The worker stored it; this record says with which hash.
    Recorded(Record),
    /// The worker was still busy with the file when the call's time ran out (the
    /// repository may be slow for it too): the call gives up, and PostgreSQL calls again.
    StillBusy,
}

/// See [`Ahead`]. The record found is taken out of the state directory (the call answers
/// for it now). Waits no later than `deadline`: a worker that holds its lock but never
/// gets to the file must not hold PostgreSQL's archiver.
pub fn await_worker(path: &Path, options: &PushOptions, deadline: Instant) -> Ahead {
    let Some(state) = options.state(&pg_wal_of(path)) else {
        return Ahead::PushHere;
    };
    let name = file_name(path);
    let mut asked = false;
    loop {
        if let Some(record) = state.lookup(&name) {
            state.forget(&name);
            if asked {
                state.unwant(&name);
            }
            return Ahead::Recorded(record);
        }
        // The worker could not store it (or is gone): push it here, which reports why.
        if state.take_failure(&name).is_some() || !state.worker_running() {
            return Ahead::PushHere;
        }
        if Instant::now() >= deadline {
            return Ahead::StillBusy;
        }
        if !asked {
            state.want(&name);
            asked = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Answers the call for `path` from the worker's record without the repository, when the
/// record is enough (see [`stored_earlier`]): `true` means stored. Blocking.
pub fn answered_locally(
    url: &RepoUrl,
    path: &Path,
    record: &Record,
    options: &PushOptions,
) -> bool {
    !options.recheck && record.file.is_some() && record_matches(url, path, record)
}

/// Pushes the WAL file at `path` into the repository at `url`, once [`await_worker`] has
/// answered for it (`ahead`): a file the background worker ([`push_ahead`]) stored is
/// answered from its record after a cheap check; the file is pushed here when there is no
/// record or it will not do. The caller starts the worker first when [`worker_needed`]
/// says so.
pub async fn push_after(
    url: &RepoUrl,
    path: &Path,
    codec: Arc<Codec>,
    options: &PushOptions,
    ahead: Ahead,
) -> Result<Pushed, PushError> {
    if let Ahead::Recorded(record) = ahead {
        if stored_earlier(url, path, &record, options).await {
            return Ok(Pushed::StoredEarlier);
        }
    }
    let file = load(path, true).await?;
    let cluster = file.summary.as_ref().map(identity);
    let repo = Repository::open(url, &options.key, cluster.as_ref(), codec)
        .await?
        .with_encode_options(options.encode);
    Ok(store(&repo, file).await?.0)
}

/// Whether a call for the file at `path` should start the background worker first: pushing
/// ahead is on, no worker runs, and a ready file (this one included) has no record.
pub fn worker_needed(path: &Path, options: &PushOptions) -> bool {
    let pg_wal = pg_wal_of(path);
    let Some(state) = options.state(&pg_wal) else {
        return false;
    };
    let name = file_name(path);
    !state.worker_running()
        && (state.lookup(&name).is_none()
            || ahead::ready_files(&pg_wal, &name)
                .iter()
                .any(|n| state.lookup(n).is_none()))
}

/// How long the worker leaves a file it could not store before trying it again.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(10);

/// The background push worker for the `pg_wal` directory `pg_wal`: while PostgreSQL has
/// files marked `.ready`, stores them in archiving order (the one PostgreSQL waits for
/// first), `options.parallel` at a time, keeping at most `options.ahead` stored but not yet
/// asked for, and records each one stored (or why not). Returns when nothing new has been
/// ready for `options.linger`, or at once if another worker is running.
pub async fn push_ahead(
    url: &RepoUrl,
    pg_wal: &Path,
    codec: Arc<Codec>,
    options: &PushOptions,
) -> Result<(), PushError> {
    let Some(state) = options.state(pg_wal) else {
        return Ok(());
    };
    let Ok(Some(_lock)) = repo::worker::lock(state.dir()) else {
        return Ok(());
    };
    let url_text = url.to_string();
    let repo: tokio::sync::OnceCell<Repository> = tokio::sync::OnceCell::new();
    // Files this worker could not store, with why and when: tried again after a while (the
    // repository may have come back), told to a call waiting for them meanwhile.
    let mut failed: HashMap<String, (String, Instant)> = HashMap::new();
    let mut busy: HashSet<String> = HashSet::new();
    // Stored by this worker: never again while still ready (PostgreSQL's call for it takes
    // the record away before the file stops being ready).
    let mut done: HashSet<String> = HashSet::new();
    // File buffers handed back after each push, reused by the next.
    let buffers: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut idle_since = Instant::now();
    let mut parallel = options.parallel.max(1);
    let mut sized = false;
    // Idle, the directories are only looked at again when they changed (or every 200 ms,
    // since a change within the filesystem's clock tick keeps the same time).
    let stamp = || {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (mtime(&pg_wal.join("archive_status")), mtime(state.dir()))
    };
    let mut listed: Option<(_, Instant)> = None;
    loop {
        let unchanged = listed.as_ref().is_some_and(|(seen, at)| {
            inflight.is_empty() && *seen == stamp() && at.elapsed() < Duration::from_millis(200)
        });
        if inflight.len() < parallel && !unchanged {
            listed = Some((stamp(), Instant::now()));
            let ready = ahead::ready_files(pg_wal, "");
            if !sized {
                // Memory: each file in flight and its envelope; keep the sum near 256 MiB
                // whatever the segment size.
                if let Some(len) = ready
                    .iter()
                    .filter_map(|n| std::fs::metadata(pg_wal.join(n)).ok().map(|m| m.len()))
                    .max()
                {
                    parallel = parallel
                        .min(((256 << 20) / len.max(16 << 20)) as usize)
                        .max(1);
                    sized = true;
                }
            }
            let ready_set: HashSet<String> = ready.iter().cloned().collect();
            state.prune(&ready_set);
            done.retain(|n| ready_set.contains(n));
            failed.retain(|n, _| ready_set.contains(n));
            let wanted = state.wanted().filter(|w| ready.contains(w));
            if let Some(w) = &wanted {
                // A call waits for a file this worker will not record (it failed, or its
                // record could not be kept): tell it, and it pushes the file itself.
                if let Some((message, at)) = failed.get(w) {
                    if at.elapsed() < RETRY_FAILED_AFTER {
                        state.fail(w, message);
                    }
                } else if done.contains(w) && state.lookup(w).is_none() {
                    state.fail(w, "stored, but no record of it was kept");
                }
            }
            let room = options
                .ahead
                .saturating_sub(state.outstanding() + inflight.len());
            let open = |n: &String| {
                !busy.contains(n)
                    && !done.contains(n)
                    && failed
                        .get(n)
                        .is_none_or(|(_, at)| at.elapsed() >= RETRY_FAILED_AFTER)
                    && state.lookup(n).is_none()
            };
            // The file PostgreSQL waits for goes first, whatever the room ahead.
            let first: Vec<String> = wanted.into_iter().filter(|n| open(n)).collect();
            let todo: Vec<String> = ready
                .into_iter()
                .filter(|n| open(n) && !first.contains(n))
                .take(room.saturating_sub(first.len()))
                .chain(first.iter().cloned())
                .collect();
            let mut todo = todo;
            todo.rotate_right(first.len());
            todo.truncate(parallel - inflight.len());
            for n in todo {
                if busy.insert(n.clone()) {
                    inflight.push(push_one(
                        &repo, url, &codec, options, &state, pg_wal, n, &url_text, &buffers,
                    ));
                }
            }
        }
        if inflight.is_empty() {
            if idle_since.elapsed() >= options.linger {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        idle_since = Instant::now();
        tokio::select! {
            Some((n, result)) = inflight.next() => {
                busy.remove(&n);
                match result {
                    Ok(()) => {
                        failed.remove(&n);
                        done.insert(n);
                    }
                    Err(e) => {
                        let message = e.to_string();
                        state.fail(&n, &message);
                        failed.insert(n, (message, Instant::now()));
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// The worker's push of one ready file: load, store, and record it if the file did not
/// change meanwhile.
#[allow(clippy::too_many_arguments)]
async fn push_one(
    repo: &tokio::sync::OnceCell<Repository>,
    url: &RepoUrl,
    codec: &Arc<Codec>,
    options: &PushOptions,
    state: &StateDir,
    pg_wal: &Path,
    name: String,
    url_text: &str,
    buffers: &std::sync::Mutex<Vec<Vec<u8>>>,
) -> (String, Result<(), PushError>) {
    let path = pg_wal.join(&name);
    let result = async {
        let id = ahead::FileIdentity::of(&path).map_err(|source| PushError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let buf = buffers
            .lock()
            .ok()
            .and_then(|mut b| b.pop())
            .unwrap_or_default();
        let f = load_into(&path, true, buf).await?;
        let kept = f.buffer.clone();
        let identity = f.summary.as_ref().map(identity);
        let repo = repo
            .get_or_try_init(|| async {
                Repository::open(url, &options.key, identity.as_ref(), codec.clone())
                    .await
                    .map(|r| r.with_encode_options(options.encode))
            })
            .await?;
        let stored = store(repo, f).await;
        // The last holder of the file's bytes gives the buffer back.
        if let Some(Ok(buf)) = kept.map(Arc::try_unwrap) {
            if let Ok(mut b) = buffers.lock() {
                b.push(buf);
            }
        }
        let (_, hash) = stored?;
        // The identity is the file's before it was read: if it changed since, no record.
        if ahead::FileIdentity::of(&path).is_ok_and(|now| now == id) {
            let record = Record {
                repo: url_text.to_owned(),
                blake3: hex(&hash),
                file: Some(id),
            };
            let _ = state.record(&name, &record);
        }
        Ok(())
    }
    .await;
    (name, result)
}
