//! The backup's data path, with memory bounded whatever the database size: chunks are
//! hashed (and, when the repository does not hold them yet, compressed into envelopes) on
//! plain worker threads fed by a bounded channel; one packer thread appends new envelopes
//! to packs of about `pack_size` bytes; an async task uploads finished packs, a few at a
//! time. At most `2 x threads` chunks, a few envelopes, and `uploads + 2` packs are in
//! memory at once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use repo::envelope::{EncodeOptions, Encoder};
use repo::pack::{pack_key, Pack, PackBuilder, PackEntry};
use repo::storage::{ErrorKind, PutMode, Storage, StorageError};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::chunker::Chunk;

/// How the data path runs.
#[derive(Debug, Clone, Copy)]
pub struct PipelineConfig {
    /// Hashing and compression threads.
    pub threads: usize,
    /// A pack is closed when the next envelope would take it past this many bytes.
    pub pack_size: usize,
    /// Packs uploaded at once.
    pub uploads: usize,
    /// How chunks are compressed.
    pub encode: EncodeOptions,
}

struct Job {
    chunk: Chunk,
    _permit: OwnedSemaphorePermit,
}

struct Done {
    file: u32,
    seq: u32,
    hash: [u8; 32],
    plain_len: u32,
    envelope: Option<Bytes>,
}

/// What the data path stored.
#[derive(Debug, Default)]
pub struct Stored {
    /// Every chunk of every file: (file, place in the file, blake3), in no order.
    pub refs: Vec<(u32, u32, [u8; 32])>,
    /// Chunks this backup stored: where, as (index into `new_packs`, entry).
    pub new: HashMap<[u8; 32], (u32, PackEntry)>,
    /// Ids of the packs this backup stored, in order.
    pub new_packs: Vec<String>,
    /// Bytes of those packs.
    pub stored_new: u64,
}

/// The data path could not store everything.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An upload failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A worker thread died.
    #[error("backup worker threads stopped unexpectedly")]
    Gone,
}

/// A running data path.
pub struct Pipeline {
    slots: Arc<Semaphore>,
    tx: Option<crossbeam_channel::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    packer: Option<JoinHandle<Stored>>,
    uploader: tokio::task::JoinHandle<Result<(), StorageError>>,
    failed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Starts the threads and the uploader (on the current runtime). `known` holds the
    /// hashes of chunks the repository has already, which are referenced, not stored.
    pub fn start(
        storage: Arc<dyn Storage>,
        known: HashSet<[u8; 32]>,
        config: PipelineConfig,
    ) -> Pipeline {
        let threads = config.threads.max(1);
        let queue = 2 * threads;
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<Done>(queue);
        let seen = Arc::new(Mutex::new(known));
        let workers = (0..threads)
            .map(|i| {
                let rx = rx.clone();
                let done_tx = done_tx.clone();
                let seen = seen.clone();
                std::thread::Builder::new()
                    .name(format!("pitr-backup-{i}"))
                    .spawn(move || work(rx, done_tx, seen, config.encode))
                    .expect("spawn backup worker")
            })
            .collect();
        drop(done_tx);
        let (pack_tx, pack_rx) = mpsc::channel::<Pack>(1);
        let packer = std::thread::Builder::new()
            .name("pitr-packer".into())
            .spawn(move || pack(done_rx, pack_tx, config))
            .expect("spawn packer");
        let failed = Arc::new(AtomicBool::new(false));
        let uploader = tokio::spawn(upload(
            storage,
            pack_rx,
            config.uploads.max(1),
            failed.clone(),
        ));
        Pipeline {
            slots: Arc::new(Semaphore::new(queue)),
            tx: Some(tx),
            workers,
            packer: Some(packer),
            uploader,
            failed,
        }
    }

    /// True once an upload has failed: the backup cannot succeed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Hands a chunk to the workers, waiting for room.
    pub async fn submit(&self, chunk: Chunk) -> Result<(), PipelineError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PipelineError::Gone)?;
        let tx = self.tx.as_ref().ok_or(PipelineError::Gone)?;
        // A permit guarantees room, so this never blocks the runtime.
        tx.try_send(Job {
            chunk,
            _permit: permit,
        })
        .map_err(|_| PipelineError::Gone)
    }

    /// Waits until everything submitted is stored.
    pub async fn finish(mut self) -> Result<Stored, PipelineError> {
        self.tx.take();
        let workers = std::mem::take(&mut self.workers);
        let packer = self.packer.take();
        let joined = tokio::task::spawn_blocking(move || {
            let ok = workers.into_iter().all(|w| w.join().is_ok());
            let stored = packer.and_then(|p| p.join().ok());
            stored.filter(|_| ok)
        })
        .await
        .ok()
        .flatten();
        let uploaded = (&mut self.uploader)
            .await
            .map_err(|_| PipelineError::Gone)?;
        uploaded?;
        joined.ok_or(PipelineError::Gone)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // An abandoned backup: let the threads run out; nothing they make is referenced.
        self.tx.take();
        self.uploader.abort();
    }
}

fn work(
    rx: crossbeam_channel::Receiver<Job>,
    done: crossbeam_channel::Sender<Done>,
    seen: Arc<Mutex<HashSet<[u8; 32]>>>,
    options: EncodeOptions,
) {
    let mut encoder = Encoder::new(options);
    for job in rx {
        let data = &job.chunk.data;
        let hash: [u8; 32] = blake3::hash(data).into();
        let new = seen.lock().map(|mut s| s.insert(hash)).unwrap_or(true);
        let envelope = new.then(|| encoder.encode(data, hash));
        let out = Done {
            file: job.chunk.file,
            seq: job.chunk.seq,
            hash,
            plain_len: data.len() as u32,
            envelope,
        };
        drop(job);
        if done.send(out).is_err() {
            return;
        }
    }
}

fn pack(
    rx: crossbeam_channel::Receiver<Done>,
    tx: mpsc::Sender<Pack>,
    config: PipelineConfig,
) -> Stored {
    let mut stored = Stored::default();
    let mut builder = PackBuilder::new();
    let close = |builder: PackBuilder, stored: &mut Stored| {
        let pack = builder.finish(config.encode);
        stored.stored_new += pack.bytes.len() as u64;
        stored.new_packs.push(pack.id.clone());
        // If the uploader is gone the backup has failed already; the pack is dropped.
        let _ = tx.blocking_send(pack);
    };
    for d in rx {
        stored.refs.push((d.file, d.seq, d.hash));
        let Some(env) = d.envelope else { continue };
        if !builder.is_empty() && builder.len() + env.len() > config.pack_size {
            close(std::mem::take(&mut builder), &mut stored);
        }
        let entry = builder.push(d.hash, d.plain_len, &env);
        let pack_no = stored.new_packs.len() as u32;
        stored.new.insert(d.hash, (pack_no, entry));
    }
    if !builder.is_empty() {
        close(builder, &mut stored);
    }
    stored
}

async fn upload(
    storage: Arc<dyn Storage>,
    mut rx: mpsc::Receiver<Pack>,
    parallel: usize,
    failed: Arc<AtomicBool>,
) -> Result<(), StorageError> {
    let mut running = tokio::task::JoinSet::new();
    let mut first_error: Option<StorageError> = None;
    let note = |r: Result<Result<(), StorageError>, tokio::task::JoinError>,
                first: &mut Option<StorageError>| {
        let e = match r {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(e) => StorageError::new(ErrorKind::Permanent, "put", "pack/", e.to_string()),
        };
        failed.store(true, Ordering::Relaxed);
        first.get_or_insert(e);
    };
    while let Some(pack) = rx.recv().await {
        if first_error.is_some() {
            continue; // drain, so the packer is never stuck
        }
        while running.len() >= parallel {
            if let Some(r) = running.join_next().await {
                note(r, &mut first_error);
            }
        }
        let storage = storage.clone();
        running.spawn(async move {
            storage
                .put(&pack_key(&pack.id), pack.bytes, PutMode::IfAbsent)
                .await
                .map(|_| ())
        });
    }
    while let Some(r) = running.join_next().await {
        note(r, &mut first_error);
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use repo::storage::MemStorage;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_each_new_chunk_once_in_packs() {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let known: HashSet<[u8; 32]> = [blake3::hash(&[9u8; 100]).into()].into();
        let p = Pipeline::start(
            storage.clone(),
            known,
            PipelineConfig {
                threads: 2,
                pack_size: 3000,
                uploads: 2,
                encode: EncodeOptions { zstd_level: None },
            },
        );
        // Ten distinct chunks, each twice, and one the repository has.
        for seq in 0..20u32 {
            let data = Bytes::from(vec![(seq % 10) as u8; 1000]);
            p.submit(Chunk { file: 0, seq, data }).await.unwrap();
        }
        let data = Bytes::from(vec![9u8; 100]);
        p.submit(Chunk {
            file: 1,
            seq: 0,
            data,
        })
        .await
        .unwrap();
        let s = p.finish().await.unwrap();
        assert_eq!(s.refs.len(), 21);
        assert_eq!(s.new.len(), 10);
        // About two uncompressed 1050-byte envelopes per pack.
        assert!(s.new_packs.len() >= 4, "{:?}", s.new_packs);
        for id in &s.new_packs {
            let bytes = repo::storage::get_bytes(storage.as_ref(), &pack_key(id))
                .await
                .unwrap();
            assert!(!repo::pack::read_index(&bytes).unwrap().is_empty());
        }
    }
}
