//! `wal-fetch`: one WAL file out of the repository for PostgreSQL's restore_command. The
//! file reaches its destination whole and verified, or not at all: it is written to a temp
//! file beside it, fsynced, renamed into place, and the directory fsynced. Only an object
//! that is really absent is reported as missing; every other failure is an error, so that
//! recovery stops instead of ending early with WAL left behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use repo::codec::Codec;
use repo::keys::wal_key;
use repo::objects::ObjectError;
use repo::repository::{storage_for, OpenError, Repository};
use repo::slots::KeySetting;
use repo::storage::{get_bytes, StorageError};
use repo::url::RepoUrl;
use walfmt::{ArchiveFileKind, SegmentName, WalSegmentSize};

use crate::spool::{window, HistoryAnswer, Spool};

/// Why a fetch did not deliver the file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The repository holds no such file (the only "not found").
    #[error("WAL file {0} is not in the repository")]
    NotFound(String),
    /// The name is not a WAL file name.
    #[error("\"{0}\" is not a WAL file name")]
    BadName(String),
    /// The repository cannot be used.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Reading failed or the object is damaged.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// Writing the destination failed.
    #[error("could not write \"{path}\": {source}")]
    Write {
        /// The destination.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes `bytes` at `dest` atomically and durably.
pub(crate) fn write_atomically(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = crate::spool::dir_of(dest);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::spool::write_durably(dir, &name, bytes)
}

/// What the spool (or what is known without the repository) says of a requested file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The file is at its destination.
    Delivered,
    /// It is not in the repository: `00000001.history` (timeline 1 has no history file;
    /// PostgreSQL asks for one when it promotes off it), or the history probe a restore
    /// answered ahead as recovery starts.
    Absent,
    /// Ask the repository.
    Ask,
}

/// Answers a request from the spool at `dir` (of the repository at `url`) when it can: a
/// segment the prefetch worker has (the request is recorded there so the worker fetches
/// what follows), the last segment handed over asked again, a history file a restore staged.
/// Blocking, and cheap: no runtime, threads or network, which is all a restore_command
/// call needs when replay is not waiting on the repository. The spool is a cache: when it
/// cannot answer, or is unusable, the repository is asked.
pub fn from_spool(url: &RepoUrl, dir: &Path, name: &str, dest: &Path) -> Answer {
    let kind = ArchiveFileKind::of(name);
    if kind == ArchiveFileKind::History(walfmt::TimelineId(1)) {
        return Answer::Absent;
    }
    let history = matches!(kind, ArchiveFileKind::History(_));
    if !history && kind != ArchiveFileKind::Segment {
        return Answer::Ask;
    }
    let Ok(spool) = Spool::open(dir, &url.to_string()) else {
        return Answer::Ask;
    };
    if history {
        return match spool.history(name, dest) {
            Ok(HistoryAnswer::Delivered) => Answer::Delivered,
            Ok(HistoryAnswer::Absent) => Answer::Absent,
            _ => Answer::Ask,
        };
    }
    spool.clear_staged();
    let _ = spool.set_wanted(name);
    if matches!(spool.take(name, dest), Ok(true)) || matches!(spool.again(name, dest), Ok(true)) {
        Answer::Delivered
    } else {
        Answer::Ask
    }
}

/// Fetches WAL file `name` from the repository at `url` into `dest` (wal-fetch asks the
/// spool first, with [`from_spool`]).
pub async fn fetch(
    url: &RepoUrl,
    key_setting: &KeySetting,
    name: &str,
    dest: &Path,
    codec: Arc<Codec>,
) -> Result<(), FetchError> {
    let key = wal_key(name).ok_or_else(|| FetchError::BadName(name.to_owned()))?;
    // One round trip: the repository's config and the object are read at once.
    let storage = storage_for(url)
        .await
        .map_err(|e| FetchError::Open(OpenError::from(e)))?;
    let (repo, stored) = tokio::join!(
        Repository::open_on(url.clone(), storage.clone(), key_setting, None, codec),
        get_bytes(storage.as_ref(), &key)
    );
    let repo = repo?;
    let plain = match stored {
        Ok(bytes) => {
            let max = wal_file_max(&repo);
            repo.objects().decode_at_most(&key, bytes, max).await?.1
        }
        Err(e) if e.is_not_found() => {
            // Not archived whole: the segment `pitr stream` is still writing, if any.
            match streamed_segment(&repo, name).await? {
                Some(bytes) => bytes,
                None => return Err(FetchError::NotFound(name.to_owned())),
            }
        }
        Err(e) => return Err(FetchError::Object(e.into())),
    };
    let dest = dest.to_owned();
    let shown = dest.display().to_string();
    tokio::task::spawn_blocking(move || write_atomically(&dest, &plain))
        .await
        .map_err(|e| FetchError::Write {
            path: shown.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| FetchError::Write {
            path: shown,
            source,
        })?;
    Ok(())
}

/// The most plaintext a WAL file of `repo` holds: a segment (or `.partial`) its segment
/// size; `.history` and `.backup` files are far smaller.
pub fn wal_file_max(repo: &Repository) -> u64 {
    repo.config().wal_segment_size.max(16 << 20)
}

/// The segment `name` as `pitr stream` has made it durable so far: its pieces from offset 0,
/// then zeros to the segment's size (PostgreSQL reads a restored segment only at its full
/// size, and stops at the first byte that is not valid WAL). None when there are no pieces.
pub async fn streamed_segment(
    repo: &Repository,
    name: &str,
) -> Result<Option<bytes::Bytes>, FetchError> {
    if ArchiveFileKind::of(name) != ArchiveFileKind::Segment {
        return Ok(None);
    }
    let Some(prefix) = repo::pieces::read_streamed(repo.objects(), name).await? else {
        return Ok(None);
    };
    let mut full = prefix.to_vec();
    full.resize(repo.config().wal_segment_size as usize, 0);
    Ok(Some(full.into()))
}

/// How the prefetch worker runs.
#[derive(Debug, Clone)]
pub struct PrefetchOptions {
    /// The spool it fills.
    pub spool: PathBuf,
    /// How many segments after the one asked for last it keeps there.
    pub depth: usize,
    /// How many it fetches at once.
    pub parallel: usize,
    /// How long it waits for the next request once the window is full, before exiting.
    pub linger: Duration,
}

/// Whether the server whose pg_wal holds the spool at `spool` (`<data>/pg_wal/.pitr/fetch`,
/// relative to the data directory as restore_command runs there, or absolute) has left
/// recovery: its data directory has neither recovery.signal nor standby.signal. False
/// when the spool is not in a data directory's pg_wal.
fn recovery_over(spool: &Path) -> bool {
    let Some(data) = spool.parent().and_then(Path::parent).and_then(Path::parent) else {
        return false;
    };
    let at = |name: &str| {
        if data.as_os_str().is_empty() {
            PathBuf::from(name)
        } else {
            data.join(name)
        }
    };
    at("PG_VERSION").is_file() && !at("recovery.signal").exists() && !at("standby.signal").exists()
}

/// The prefetch worker: keeps the `depth` segments after the one PostgreSQL asked for last
/// in the spool, fetched `parallel` at once, each verified before it appears there. It stops
/// at the first segment the repository does not hold (the end of the archive, for now) or
/// cannot deliver (the foreground fetch then reports the error), and exits once no request
/// has come for `linger`. Only one worker runs per spool; a second returns at once.
pub async fn prefetch(
    url: &RepoUrl,
    key: &KeySetting,
    codec: Arc<Codec>,
    options: &PrefetchOptions,
) -> Result<(), FetchError> {
    let io = |path: &Path, source: std::io::Error| FetchError::Write {
        path: path.display().to_string(),
        source,
    };
    let spool = Spool::open(&options.spool, &url.to_string()).map_err(|e| io(&options.spool, e))?;
    let Some(_lock) = spool.lock_worker().map_err(|e| io(&options.spool, e))? else {
        return Ok(());
    };
    let repo = Repository::open(url, key, None, codec).await?;
    let seg_size = WalSegmentSize::new(repo.config().wal_segment_size)
        .map_err(|e| FetchError::Open(OpenError::BadConfig(e.to_string())))?;
    let mut filled_for: Option<String> = None;
    let mut idle_since = Instant::now();
    let mut at_end = false;
    loop {
        let wanted = spool.wanted();
        if wanted.is_none() || wanted == filled_for {
            // At the end of the archive and the server out of recovery (promoted): nothing
            // more will be asked; what was fetched ahead goes now, and so does the worker
            // (a drill removes the server's directory soon after).
            if at_end && recovery_over(&options.spool) {
                if !spool.is_staged() {
                    let _ = spool.drop_segments();
                }
                return Ok(());
            }
            if idle_since.elapsed() >= options.linger {
                // Nothing asked for a while: recovery is over or paused. What is left
                // ahead goes, unless it waits for a server not started yet, or, at the
                // end of the archive, for the requests of a recovery still going on.
                // (Returning at once at the end of the archive left the segments fetched
                // ahead of a recovery that then stopped at its target in pg_wal for good.)
                if !spool.is_staged() && (!at_end || recovery_over(&options.spool)) {
                    let _ = spool.drop_segments();
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let want = wanted.unwrap_or_default();
        let window = window(&want, options.depth, seg_size);
        let _ = spool.prune_behind(&want, seg_size);
        let missing: Vec<String> = window.into_iter().filter(|n| !spool.has(n)).collect();
        let wanted = missing.len();
        // Short of the window at the end of the archive (or on a failure the foreground
        // fetch will report): what was fetched ahead stays for the requests to come.
        at_end = fill(&repo, &spool, missing, options.parallel).await != wanted;
        filled_for = Some(want);
        idle_since = Instant::now();
    }
}

/// Stages the WAL segments `names` into the spool at `dir` before recovery starts (a
/// restore does this while it writes the data files), `parallel` at once, each verified;
/// wal-fetch then serves them by a rename. Stops quietly at the first that cannot be
/// fetched: staging only saves time, wal-fetch fetches whatever is not there. Returns how
/// many were staged.
pub async fn stage(
    repo: &Repository,
    dir: &Path,
    names: &[String],
    parallel: usize,
) -> Result<usize, FetchError> {
    let io = |source: std::io::Error| FetchError::Write {
        path: dir.display().to_string(),
        source,
    };
    let spool = Spool::open(dir, &repo.url().to_string()).map_err(io)?;
    Ok(fill(repo, &spool, names.to_vec(), parallel).await)
}

/// After [`stage`] of `names` was cut short (or staged only the first of them): how many
/// of `names` the spool at `dir` holds, and when not all, the spool is set so that the
/// prefetch worker, started next, fills it from the first segment on (it keeps the
/// segments after the one last asked for: this asks for the one before the first),
/// skipping what is there and following PostgreSQL's calls from then. Blocking.
pub fn hand_over(
    dir: &Path,
    repo_url: &str,
    names: &[String],
    seg: WalSegmentSize,
) -> std::io::Result<(usize, bool)> {
    let spool = Spool::open(dir, repo_url)?;
    spool.mark_staged()?;
    let held = spool.segments()?;
    let done = names.iter().filter(|n| held.contains(n)).count();
    let before_first = names.first().and_then(|n| {
        let s = SegmentName::parse(n, seg).ok()?;
        Some(SegmentName::new(s.timeline, s.segno.checked_sub(1)?, seg).to_string())
    });
    match before_first {
        Some(asked) if done < names.len() => {
            spool.set_wanted(&asked)?;
            Ok((done, true))
        }
        _ => Ok((done, false)),
    }
}

/// The history files recovery asks for first, as a restore found them, for
/// [`Spool::stage_history`]: those of the timelines after `start` (pg_control's, the
/// backup's) up to the plan's timeline, which PostgreSQL's search for the newest timeline
/// and its reading of that timeline's history fetch (the plan has read the last one
/// already); and, with `latest` (that search happens), the absent one where it ends.
pub async fn history_answers(
    repo: &Repository,
    plan: &crate::plan::Plan,
    start: u32,
    latest: bool,
) -> Result<(Vec<(String, Vec<u8>)>, Option<String>), ObjectError> {
    let timeline = plan.timeline;
    let name_of = |t: u32| walfmt::TimelineId(t).history_file_name();
    let wanted: Vec<u32> = plan
        .histories
        .iter()
        .copied()
        .filter(|&t| t > 1 && t > start && t < timeline)
        .collect();
    let mut files = futures::stream::iter(wanted)
        .map(|t| async move {
            let key = wal_key(&name_of(t)).unwrap_or_default();
            repo.objects()
                .get_at_most(&key, wal_file_max(repo))
                .await
                .map(|(_, b)| (name_of(t), b.to_vec()))
        })
        .buffered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(bytes) = &plan.history_file {
        files.push((name_of(timeline), bytes.clone()));
    }
    let next = timeline + 1;
    let absent = (latest && !plan.histories.contains(&next)).then(|| name_of(next));
    Ok((files, absent))
}

/// Fetches the segments `names` into `spool`, `parallel` at once, each verified; stops at
/// the first that cannot be fetched or kept (absent: the end of the archive, or a failure
/// the foreground fetch will report). Returns how many are now in the spool.
async fn fill(repo: &Repository, spool: &Spool, names: Vec<String>, parallel: usize) -> usize {
    let mut fetches = futures::stream::iter(names)
        .map(|name| async move {
            let got = match wal_key(&name) {
                Some(key) => repo
                    .objects()
                    .get_at_most(&key, wal_file_max(repo))
                    .await
                    .map(|(_, plain)| plain),
                None => Err(ObjectError::Storage(StorageError::not_found("get", &name))),
            };
            (name, got)
        })
        .buffered(parallel.max(1));
    let mut filled = 0;
    while let Some((name, got)) = fetches.next().await {
        let Ok(plain) = got else { break };
        let s = spool.clone();
        match tokio::task::spawn_blocking(move || s.put(&name, &plain)).await {
            Ok(Ok(())) => filled += 1,
            _ => break,
        }
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_is_over_when_the_data_directory_has_no_signal_file_left() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("pg_wal/.pitr/fetch");
        std::fs::create_dir_all(&spool).unwrap();
        // Not a data directory: never said over (the spool of a fetch into any directory).
        assert!(!recovery_over(&spool));
        std::fs::write(dir.path().join("PG_VERSION"), "17\n").unwrap();
        std::fs::write(dir.path().join("recovery.signal"), "").unwrap();
        assert!(!recovery_over(&spool));
        std::fs::remove_file(dir.path().join("recovery.signal")).unwrap();
        std::fs::write(dir.path().join("standby.signal"), "").unwrap();
        assert!(!recovery_over(&spool));
        std::fs::remove_file(dir.path().join("standby.signal")).unwrap();
        assert!(recovery_over(&spool));
    }
}
