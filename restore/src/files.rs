//! A backup's files written into a new data directory and its tablespaces, fast and
//! verified: the chunks are read pack by pack in large ranged reads, several at a time,
//! and on worker threads each chunk's envelope is checked (length, blake3, and that it is
//! the chunk the manifest names) and its plaintext written at its place in every file that
//! holds it. Memory stays bounded: at most `fetches` ranges of `range_size` bytes are in
//! memory at once.
//!
//! PostgreSQL must never start on a half-restored directory: `global/pg_control` is
//! written under another name and renamed into place only after every other file, the
//! recovery settings included, is written and flushed to disk, and a marker file says a
//! restore is in progress until then. Where each entry goes is checked first, by
//! [`crate::dest`]: nothing is written outside the restore's directories or through a link.
//!
//! Only the restore's own files are flushed (each file, then each directory), never the
//! whole filesystem: a syncfs would also wait for whatever else the host has written and
//! not yet flushed, which on a busy host can be more than the restore itself.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use repo::envelope::EnvelopeError;
use repo::manifest::{BackupManifest, ChunkRef, FileType, ManifestError, ManifestFile, TableWalk};
use repo::objects::{ObjectError, ObjectStore};
use repo::pool::{Pool, PoolGone};

pub use crate::dest::INCOMPLETE_MARKER;
use crate::dest::{create_dirs_below, make_links, place, Places, PG_CONTROL, PG_CONTROL_PENDING};

/// Where and how to write.
#[derive(Debug, Clone)]
pub struct FilesOptions {
    /// The new data directory (absent or empty).
    pub to: PathBuf,
    /// Where each tablespace goes (by OID); others go where they were on the server.
    pub tablespace_map: HashMap<u32, PathBuf>,
    /// Ranged reads at once.
    pub fetches: usize,
    /// Threads that check and write chunks.
    pub threads: usize,
    /// Adjacent chunks of a pack are read together up to this many bytes.
    pub range_size: u64,
    /// Called just before pg_control goes in place (a test hook: a kill at that moment).
    pub before_pg_control: Option<fn()>,
}

impl FilesOptions {
    /// Defaults for restoring into `to`.
    pub fn new(to: PathBuf) -> FilesOptions {
        FilesOptions {
            to,
            tablespace_map: HashMap::new(),
            fetches: 8,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            range_size: 8 << 20,
            before_pg_control: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FilesReport {
    /// Regular files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes read from the repository.
    pub fetched: u64,
    /// Ranged reads made.
    pub requests: u64,
    /// Seconds spent fetching, checking and writing the chunks.
    pub write_seconds: f64,
    /// Seconds spent flushing everything to disk at the end (and putting pg_control in
    /// place).
    pub flush_seconds: f64,
}

/// Why files could not be written. The directory is then left without `global/pg_control`
/// and with the marker, so PostgreSQL will not start on it.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The target is not empty.
    #[error("directory \"{0}\" exists and is not empty")]
    NotEmpty(PathBuf),
    /// Writing failed.
    #[error("could not write \"{path}\": {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A chunk could not be read, or is damaged.
    #[error("file \"{path}\": {source}")]
    Object {
        /// The file (as the backup names it).
        path: String,
        /// What failed.
        source: ObjectError,
    },
    /// The manifest points outside itself or outside the directory.
    #[error("backup manifest: {0}")]
    Manifest(String),
    /// A piece of the chunk table could not be read, or is damaged or inconsistent.
    #[error(transparent)]
    Table(ManifestError),
    /// The worker threads died.
    #[error(transparent)]
    Pool(#[from] PoolGone),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (mode 0700) or checks it is an empty directory.
fn fresh_dir(dir: &Path) -> Result<(), FilesError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(FilesError::NotEmpty(dir.to_owned()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        Err(e) => return Err(io_err(dir)(e)),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Directories and empty files of their full size, with their modes, where `places` says
/// (checked by [`crate::dest::place`]); links come after the files ([`finish_files`]).
fn lay_out(m: &BackupManifest, places: &Places) -> Result<(), FilesError> {
    fresh_dir(&places.to)?;
    for dir in places.spaces.values() {
        fresh_dir(dir)?;
    }
    let marker = places.to.join(INCOMPLETE_MARKER);
    fs::write(
        &marker,
        format!(
            "pitr is restoring backup {} here; do not start PostgreSQL on this directory until it is done\n",
            m.id
        ),
    )
    .map_err(io_err(&marker))?;
    for (f, path) in m.files.iter().zip(places.paths.iter()) {
        let root = match f.tablespace {
            None => &places.to,
            Some(oid) => &places.spaces[&oid],
        };
        match f.kind {
            FileType::Directory => {
                create_dirs_below(root, path).map_err(io_err(path))?;
                // PostgreSQL's own modes at most (0750 with group access): no setuid,
                // setgid or sticky bit, nothing for others, whatever the manifest says.
                fs::set_permissions(path, fs::Permissions::from_mode(f.mode & 0o750))
                    .map_err(io_err(path))?;
            }
            FileType::Symlink => {}
            FileType::File => {
                if let Some(parent) = path.parent() {
                    create_dirs_below(root, parent).map_err(io_err(parent))?;
                }
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(f.mode & 0o640)
                    .open(path)
                    .map_err(io_err(path))?;
                file.set_len(f.size).map_err(io_err(path))?;
            }
        }
    }
    Ok(())
}

/// One ranged read: chunks that lie together in a pack.
#[derive(Debug)]
pub(crate) struct Range {
    pub(crate) pack: usize,
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// The groups of [`Uses`] (one per place in the pack) it reads.
    pub(crate) chunks: Vec<u32>,
}

/// One use of a chunk: file `file` (an index into the manifest's files) holds entry
/// `entry` of a [`Piece`] at `offset`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Use {
    pub(crate) file: u32,
    pub(crate) entry: u32,
    pub(crate) offset: u64,
}

/// Every use of every chunk of a piece of the chunk table, grouped by place (pack and
/// offset), the groups in pack order: a place several entries name is fetched once and
/// checked against every entry that names it. The first use of a group, in file order,
/// names the entry read for it. 20 bytes or so per chunk, in two flat arrays (a map of
/// lists took over 100).
#[derive(Debug, Default)]
pub(crate) struct Uses {
    uses: Vec<Use>,
    /// Where each group starts in `uses`.
    starts: Vec<u32>,
}

impl Uses {
    /// The uses of group `g` (never empty).
    pub(crate) fn group(&self, g: u32) -> &[Use] {
        let g = g as usize;
        let start = self.starts[g] as usize;
        let end = self
            .starts
            .get(g + 1)
            .map_or(self.uses.len(), |&e| e as usize);
        &self.uses[start..end]
    }

    /// The entry read for group `g`.
    pub(crate) fn read(&self, g: u32) -> u32 {
        self.uses[self.starts[g as usize] as usize].entry
    }

    /// Every group, in order.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &[Use]> {
        (0..self.starts.len() as u32).map(|g| self.group(g))
    }
}

/// A piece of a backup's chunk table (at most [`repo::manifest::CHUNKS_PER_PIECE`]
/// entries) with its uses: what the ranged reads planned from it fetch and check. A
/// restore or a verify holds the pieces in flight only, whatever the backup's size; a
/// place named in two pieces is fetched once for each.
#[derive(Debug)]
pub(crate) struct Piece {
    /// The table index of its first entry.
    pub(crate) first: u64,
    /// Its entries.
    pub(crate) chunks: Vec<ChunkRef>,
    pub(crate) uses: Uses,
}

impl Piece {
    /// The entry read for group `g`.
    pub(crate) fn read(&self, g: u32) -> &ChunkRef {
        &self.chunks[self.uses.read(g) as usize]
    }
}

/// Walks entries `first..` of the chunk table (checking them, [`TableWalk`]) and plans the
/// ranged reads that fetch each of their chunks once, in pack order, at most `range_size`
/// bytes each (restore and verify read a backup this way).
pub(crate) fn plan_piece(
    walk: &mut TableWalk,
    first: u64,
    chunks: Vec<ChunkRef>,
    range_size: u64,
) -> Result<(Piece, Vec<Range>), String> {
    let mut uses = Vec::with_capacity(chunks.len());
    walk.walk(first, &chunks, |k, file, offset| {
        uses.push(Use {
            file: file as u32,
            entry: k as u32,
            offset,
        })
    })?;
    // By place; within a place, in file order (the first names the entry read).
    uses.sort_unstable_by_key(|u| {
        let c = &chunks[u.entry as usize];
        (c.pack(), c.range().start, u.file, u.offset)
    });
    let mut starts: Vec<u32> = Vec::new();
    let mut ranges: Vec<Range> = Vec::new();
    let mut last_place = None;
    for (i, u) in uses.iter().enumerate() {
        let c = &chunks[u.entry as usize];
        let place = (c.pack(), c.range().start);
        if last_place == Some(place) {
            continue;
        }
        last_place = Some(place);
        let g = starts.len() as u32;
        starts.push(i as u32);
        let r = c.range();
        match ranges.last_mut() {
            // Read through small gaps (chunks another backup no longer uses) rather than
            // making another request.
            Some(last)
                if last.pack == c.pack()
                    && r.start >= last.end
                    && r.start - last.end <= 64 << 10
                    && r.end - last.start <= range_size =>
            {
                last.end = r.end;
                last.chunks.push(g);
            }
            _ => ranges.push(Range {
                pack: c.pack(),
                start: r.start,
                end: r.end,
                chunks: vec![g],
            }),
        }
    }
    let piece = Piece {
        first,
        chunks,
        uses: Uses { uses, starts },
    };
    Ok((piece, ranges))
}

/// Backup `m`'s chunk table read a piece at a time, each piece checked and planned
/// ([`plan_piece`]); `m`'s header ([`BackupManifest::check_header`]) must be checked.
pub(crate) fn planned<'a>(
    objects: &'a ObjectStore,
    m: &'a BackupManifest,
    range_size: u64,
) -> impl futures::Stream<Item = Result<(Arc<Piece>, Vec<Range>), ManifestError>> + 'a {
    let count = m.chunk_table.count;
    m.table_pieces(objects, 1)
        .scan(TableWalk::new(m), move |walk, piece| {
            let bad = |reason| m.bad(reason);
            let planned = piece.and_then(|(first, chunks)| {
                let end = first + chunks.len() as u64;
                let (piece, ranges) = plan_piece(walk, first, chunks, range_size).map_err(bad)?;
                if end >= count {
                    walk.finish().map_err(bad)?;
                }
                Ok((Arc::new(piece), ranges))
            });
            futures::future::ready(Some(planned))
        })
}

struct Shared {
    manifest: Arc<BackupManifest>,
    protection: repo::envelope::Protection,
    paths: Arc<[PathBuf]>,
    written: Arc<AtomicU64>,
    /// Per file: written to since the flusher last flushed it.
    dirty: Vec<AtomicBool>,
}

/// Plaintext bytes a job checks and writes at most (unless one chunk is larger).
const JOB_PLAIN_BYTES: u64 = 16 << 20;

/// Range `r` of `piece` as parts of at most [`JOB_PLAIN_BYTES`] of plaintext each, all
/// with `r`'s start (offsets stay relative to the bytes read for `r`).
fn split_by_plain(piece: &Piece, r: Range) -> Vec<Range> {
    let mut parts = Vec::new();
    let mut chunks = Vec::new();
    let mut plain = 0u64;
    for g in r.chunks {
        let len = u64::from(piece.read(g).plain_len);
        if plain + len > JOB_PLAIN_BYTES && !chunks.is_empty() {
            parts.push(std::mem::take(&mut chunks));
            plain = 0;
        }
        plain += len;
        chunks.push(g);
    }
    if !chunks.is_empty() {
        parts.push(chunks);
    }
    parts
        .into_iter()
        .map(|chunks| Range {
            pack: r.pack,
            start: r.start,
            end: r.end,
            chunks,
        })
        .collect()
}

/// Checks the chunks of one range and writes them where they belong.
fn write_range(s: &Shared, piece: &Piece, r: &Range, bytes: &[u8]) -> Result<(), FilesError> {
    let mut open: Option<(u32, fs::File)> = None;
    for &g in &r.chunks {
        let dests = piece.uses.group(g);
        let c = &piece.chunks[dests[0].entry as usize];
        let corrupt_in = |fi: u32, source: EnvelopeError| FilesError::Object {
            path: s.manifest.files[fi as usize].path.clone(),
            source: ObjectError::Corrupt {
                key: format!(
                    "{}@{}",
                    s.manifest.pack_key(r.pack).unwrap_or_default(),
                    c.offset
                ),
                source,
            },
        };
        let corrupt = |source| corrupt_in(dests[0].file, source);
        let range = c.range();
        let rel = (range.start - r.start) as usize..(range.end - r.start) as usize;
        let env = bytes
            .get(rel)
            .ok_or_else(|| corrupt(EnvelopeError::Truncated(bytes.len())))?;
        let plain =
            repo::pack::decode_chunk_of(env, &c.hash, u64::from(c.plain_len), &s.protection)
                .map_err(corrupt)?;
        for &Use {
            file: fi,
            entry,
            offset,
        } in dests
        {
            // Another entry naming the same place in the same pack must name the same
            // chunk: the whole entry (hash and lengths; the place is the same by
            // construction) is compared with the one checked.
            let e = &piece.chunks[entry as usize];
            if entry != dests[0].entry && e != c {
                return Err(corrupt_in(
                    fi,
                    EnvelopeError::hash_mismatch(&e.hash, &c.hash),
                ));
            }
            let path = &s.paths[fi as usize];
            // A range's chunks are mostly one file's, in order: opened once for them.
            let file = match &open {
                Some((i, f)) if *i == fi => f,
                _ => {
                    let f = OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(path)
                        .map_err(io_err(path))?;
                    &open.insert((fi, f)).1
                }
            };
            file.write_all_at(&plain, offset).map_err(io_err(path))?;
            s.dirty[fi as usize].store(true, Ordering::Relaxed);
            s.written.fetch_add(plain.len() as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Flushes file `path` (data and size) to disk.
fn sync_file(path: &Path) -> Result<(), FilesError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// Flushes directory `dir` (its entries) to disk.
fn sync_dir(dir: &Path) -> Result<(), FilesError> {
    sync_file(dir)
}

/// Bytes written between early flushes.
const EARLY_FLUSH_BYTES: u64 = 64 << 20;

/// The directories and (empty) files of a restore, made by [`lay_out_files`], and where
/// everything of it goes.
#[derive(Debug)]
pub struct LaidOut {
    places: Places,
}

/// Checks the targets are empty and makes the directories and files (empty, at their
/// sizes) of backup `m` where `places` ([`check_manifest`]) says, with the marker that a
/// restore is in progress.
pub async fn lay_out_files(m: &Arc<BackupManifest>, places: Places) -> Result<LaidOut, FilesError> {
    let m = m.clone();
    tokio::task::spawn_blocking(move || lay_out(&m, &places).map(|()| LaidOut { places }))
        .await
        .map_err(|_| PoolGone)?
}

/// What a restore checks before it writes anything: the manifest's numbers and where each
/// of its entries goes ([`crate::dest::place`]: a manifest that would write outside the
/// restore's directories is refused here). The chunk table is checked next
/// ([`check_table`]), and each piece again as it is read to be used ([`write_files`]).
pub fn check_manifest(m: &BackupManifest, options: &FilesOptions) -> Result<Places, FilesError> {
    m.check_header().map_err(FilesError::Manifest)?;
    place(m, &options.to, &options.tablespace_map).map_err(FilesError::Manifest)
}

/// Reads backup `m`'s whole chunk table and checks it (each piece's hash and length, every
/// entry against the files, [`TableWalk`]) without keeping it: a restore does this before
/// it writes anything, so that a damaged or inconsistent table leaves nothing behind. The
/// pieces are read again as the files are fetched ([`write_files`]): 52 bytes a chunk of
/// 64 KiB, under a thousandth of what is restored. `m`'s header must be checked.
pub async fn check_table(objects: &ObjectStore, m: &BackupManifest) -> Result<(), FilesError> {
    m.check_table(objects).await.map_err(FilesError::Table)
}

/// Fills the files [`lay_out_files`] made, each chunk checked against every chunk table
/// entry that names it. Nothing is final yet: [`finish_files`] follows.
pub async fn write_files(
    objects: &ObjectStore,
    m: &Arc<BackupManifest>,
    options: &FilesOptions,
    laid_out: &LaidOut,
    written: Arc<AtomicU64>,
) -> Result<FilesReport, FilesError> {
    let started = std::time::Instant::now();
    let paths = laid_out.places.paths.clone();
    let shared = Arc::new(Shared {
        manifest: m.clone(),
        protection: objects.protection().clone(),
        dirty: paths.iter().map(|_| AtomicBool::new(false)).collect(),
        paths,
        written,
    });
    let pool = Arc::new(Pool::new(
        "pitr-restore",
        options.threads,
        options.threads * 2,
    ));
    // Written files are flushed while the rest is still arriving, so that the final flush
    // finds little left to write: the disk works alongside the network and the codecs
    // instead of after them. A flush that fails here is only early; the final one counts.
    let flusher = {
        let shared = shared.clone();
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let handle = std::thread::Builder::new()
            .name("pitr-flusher".into())
            .spawn(move || {
                let mut flushed = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    let now = shared.written.load(Ordering::Relaxed);
                    if now - flushed >= EARLY_FLUSH_BYTES {
                        for (i, dirty) in shared.dirty.iter().enumerate() {
                            if dirty.swap(false, Ordering::Relaxed) {
                                let _ =
                                    fs::File::open(&shared.paths[i]).and_then(|f| f.sync_data());
                            }
                        }
                        flushed = now;
                    }
                }
            })
            .ok();
        (done, handle)
    };
    // The chunk table a piece at a time: the next piece is read and planned once every
    // range of this one is under way (a pause of one piece's read per 4 GiB or so).
    let (mut requests, mut fetched) = (0u64, 0u64);
    let fetched_all = planned(objects, m, options.range_size)
        .map_err(FilesError::Table)
        .map_ok(|(piece, ranges)| {
            futures::stream::iter(ranges.into_iter().map(move |r| Ok((piece.clone(), r))))
        })
        .try_flatten()
        .inspect_ok(|(_, r)| {
            requests += 1;
            fetched += r.end - r.start;
        })
        .map_ok(|(piece, r)| {
            let shared = shared.clone();
            let pool = pool.clone();
            async move {
                let key = shared.manifest.pack_key(r.pack).unwrap_or_default();
                let first = &shared.manifest.files[piece.uses.group(r.chunks[0])[0].file as usize];
                let object = |source: ObjectError| FilesError::Object {
                    path: first.path.clone(),
                    source,
                };
                let bytes = objects
                    .storage()
                    .get_range(&key, r.start..r.end)
                    .await
                    .map_err(|e| object(e.into()))?;
                if bytes.len() as u64 != r.end - r.start {
                    return Err(object(ObjectError::Corrupt {
                        key,
                        source: EnvelopeError::Truncated(bytes.len()),
                    }));
                }
                // A well-compressed range holds far more plaintext than its size: its
                // chunks are checked and written in several jobs, so that the last ranges
                // do not leave all but one thread idle.
                let jobs = split_by_plain(&piece, r).into_iter().map(|part| {
                    let (s, piece, bytes) = (shared.clone(), piece.clone(), bytes.clone());
                    pool.run(move || write_range(&s, &piece, &part, &bytes))
                });
                for done in futures::future::join_all(jobs).await {
                    done??;
                }
                Ok(())
            }
        })
        .try_buffer_unordered(options.fetches.max(1))
        .try_collect::<()>()
        .await;
    flusher.0.store(true, Ordering::Relaxed);
    if let Some(h) = flusher.1 {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
    fetched_all?;
    let files: Vec<&ManifestFile> = m
        .files
        .iter()
        .filter(|f| f.kind == FileType::File)
        .collect();
    Ok(FilesReport {
        files: files.len() as u64,
        bytes: files.iter().map(|f| f.size).sum(),
        fetched,
        requests,
        write_seconds: started.elapsed().as_secs_f64(),
        flush_seconds: 0.0,
    })
}

/// Makes the restore final, in the order that keeps a directory PostgreSQL would start on
/// complete whenever the process is killed: `settings` first (the recovery settings, written
/// and flushed by the caller), then the backup's links (no file is written after them),
/// every file and directory flushed, then pg_control put in place, then the marker removed.
/// Killed before pg_control is in place, the directory has none, and PostgreSQL refuses it.
/// Returns the seconds spent.
pub async fn finish_files(
    m: &BackupManifest,
    options: &FilesOptions,
    laid_out: LaidOut,
    settings: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> Result<f64, FilesError> {
    let started = std::time::Instant::now();
    let places = Arc::new(laid_out.places);
    let to = places.to.clone();
    {
        let (places, to) = (places.clone(), to.clone());
        tokio::task::spawn_blocking(move || -> Result<(), FilesError> {
            settings().map_err(io_err(&to))?;
            make_links(&places).map_err(io_err(&to))
        })
        .await
        .map_err(|_| PoolGone)??;
    }
    // Everything on disk: every file (several at once: the filesystem's journal takes
    // concurrent flushes together), then every directory.
    let mut files = Vec::new();
    let mut dirs: Vec<PathBuf> = places.spaces.values().cloned().collect();
    dirs.push(to.clone());
    // The backup of a standby carries its standby.signal (and one of a server in recovery
    // its recovery.signal): the recovery settings just replaced it with the one this
    // restore wants, which they flushed themselves.
    let signals = [to.join("standby.signal"), to.join("recovery.signal")];
    for (f, p) in m.files.iter().zip(places.paths.iter()) {
        match f.kind {
            FileType::Directory => dirs.push(p.clone()),
            FileType::File if signals.contains(p) => {}
            FileType::File => files.push(p.clone()),
            FileType::Symlink => {}
        }
        if f.kind != FileType::Directory {
            dirs.extend(p.parent().map(Path::to_owned));
        }
    }
    dirs.sort();
    dirs.dedup();
    let pool = Pool::new("pitr-flush", options.threads, options.threads * 2);
    futures::stream::iter(files.into_iter().chain(dirs))
        .map(|path| pool.run(move || sync_file(&path)))
        .buffer_unordered(options.threads.max(1) * 2)
        .map(|r| r.map_err(FilesError::from).and_then(|r| r))
        .try_collect::<()>()
        .await?;
    let stop = options.before_pg_control;
    tokio::task::spawn_blocking(move || -> Result<(), FilesError> {
        if let Some(stop) = stop {
            stop();
        }
        let pending = to.join(PG_CONTROL_PENDING);
        if pending.exists() {
            let control = to.join(PG_CONTROL);
            fs::rename(&pending, &control).map_err(io_err(&control))?;
            sync_dir(&to.join("global"))?;
        }
        let marker = to.join(INCOMPLETE_MARKER);
        fs::remove_file(&marker).map_err(io_err(&marker))?;
        sync_dir(&to)
    })
    .await
    .map_err(|_| PoolGone)??;
    Ok(started.elapsed().as_secs_f64())
}
