//! The backup's data path, with memory bounded whatever the database size: chunks are
//! hashed (and, when the repository does not hold them yet, compressed into envelopes) on
//! plain worker threads fed by a bounded channel; one packer thread appends new envelopes
//! to packs of about `pack_size` bytes; an async task uploads finished packs, a few at a
//! time. At most `2 x threads` chunks, a few envelopes, and `uploads + 2` packs are in
//! memory at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};
use repo::envelope::{chunk_identity, EncodeOptions, Encoder, Protection};
use repo::manifest::{chunk_table_key, ChunkRef, ChunkTable, TableWriter};
use repo::objects::{ObjectError, ObjectStore};
use repo::pack::{pack_key, Pack, PackBuilder};
use repo::storage::{ErrorKind, PutMode, StorageError};
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

/// A chunk the repository already holds, where an earlier backup put it: referenced, not
/// stored again, when the new chunk has its hash.
#[derive(Debug, Clone)]
pub struct Known {
    /// Id of its pack.
    pub pack: Arc<str>,
    /// Its entry (the pack index is the earlier manifest's, not used).
    pub entry: ChunkRef,
}

struct Job {
    n: u64,
    chunk: Chunk,
    expect: Option<Known>,
    permit: OwnedSemaphorePermit,
}

struct Done {
    n: u64,
    hash: [u8; 32],
    plain_len: u32,
    /// The new chunk's envelope; `None` when it is `known`.
    envelope: Option<Bytes>,
    known: Option<Known>,
    /// Held until the packer has placed the chunk: at most `2 x threads` chunks are between
    /// submission and the chunk table, however unevenly the workers run.
    _permit: OwnedSemaphorePermit,
}

/// What the data path stored.
#[derive(Debug, Default)]
pub struct Stored {
    /// Pack ids the chunk table's entries index, new and earlier ones.
    pub packs: Vec<String>,
    /// Where the chunk table's pieces are (stored already).
    pub table: ChunkTable,
    /// Packs this backup stored.
    pub new_packs: usize,
    /// Bytes of those packs.
    pub stored_new: u64,
    /// Bytes, as stored, of every chunk the table names.
    pub stored_total: u64,
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

/// What the uploader stores.
enum Upload {
    Pack(Pack),
    /// Piece `n` of the chunk table (plaintext; stored as an envelope).
    Piece(usize, Bytes),
}

/// A running data path.
pub struct Pipeline {
    slots: Arc<Semaphore>,
    tx: Option<crossbeam_channel::Sender<Job>>,
    next: u64,
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
    /// Starts the threads and the uploader (on the current runtime) for backup `id`.
    pub fn start(objects: ObjectStore, id: &str, config: PipelineConfig) -> Pipeline {
        let threads = config.threads.max(1);
        let queue = 2 * threads;
        let protection = objects.protection().clone();
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<Done>(queue);
        let workers = (0..threads)
            .map(|i| {
                let rx = rx.clone();
                let done_tx = done_tx.clone();
                let protection = protection.clone();
                std::thread::Builder::new()
                    .name(format!("pitr-backup-{i}"))
                    .spawn(move || work(rx, done_tx, config.encode, protection))
                    .expect("spawn backup worker")
            })
            .collect();
        drop(done_tx);
        let (up_tx, up_rx) = mpsc::channel::<Upload>(1);
        // Buffers of uploaded packs, back to the packer for the next ones.
        let (spare_tx, spare_rx) = crossbeam_channel::unbounded::<BytesMut>();
        let packer = std::thread::Builder::new()
            .name("pitr-packer".into())
            .spawn(move || pack(done_rx, up_tx, spare_rx, config, protection))
            .expect("spawn packer");
        let failed = Arc::new(AtomicBool::new(false));
        let uploader = tokio::spawn(upload(
            objects,
            id.to_owned(),
            up_rx,
            spare_tx,
            config.uploads.max(1),
            failed.clone(),
        ));
        Pipeline {
            slots: Arc::new(Semaphore::new(queue)),
            tx: Some(tx),
            next: 0,
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

    /// Hands a chunk to the workers, waiting for room; `expect` is what an earlier backup
    /// held at the same place, if anything. Chunks enter the chunk table in the order they
    /// are submitted.
    pub async fn submit(
        &mut self,
        chunk: Chunk,
        expect: Option<Known>,
    ) -> Result<(), PipelineError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PipelineError::Gone)?;
        let tx = self.tx.as_ref().ok_or(PipelineError::Gone)?;
        let n = self.next;
        self.next += 1;
        // A permit guarantees room, so this never blocks the runtime.
        tx.try_send(Job {
            n,
            chunk,
            expect,
            permit,
        })
        .map_err(|_| PipelineError::Gone)
    }

    /// Waits until everything submitted is stored, the chunk table included.
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
    options: EncodeOptions,
    protection: Protection,
) {
    let mut encoder = Encoder::new(options);
    for job in rx {
        let data = &job.chunk.data;
        // Chunk ids are keyed in an encrypted repository: they say nothing of the contents
        // to whoever reads the bucket, and equal chunks still have equal ids.
        let hash = protection.id(data);
        let known = job.expect.filter(|k| k.entry.hash == hash);
        let envelope = known
            .is_none()
            .then(|| encoder.encode_as(data, hash, &protection, &chunk_identity(&hash)));
        let out = Done {
            n: job.n,
            hash,
            plain_len: data.len() as u32,
            envelope,
            known,
            _permit: job.permit,
        };
        if done.send(out).is_err() {
            return;
        }
    }
}

/// Chunks this backup stored, remembered so that the same chunk again (zero pages, most
/// often) is referenced rather than stored twice; forgotten when full, to bound memory.
const RECENT: usize = 32768;

fn pack(
    rx: crossbeam_channel::Receiver<Done>,
    tx: mpsc::Sender<Upload>,
    spare: crossbeam_channel::Receiver<BytesMut>,
    config: PipelineConfig,
    protection: Protection,
) -> Stored {
    // A pack's envelopes, index and footer fit without growing the buffer.
    let fresh = || {
        let body = spare
            .try_recv()
            .unwrap_or_else(|_| BytesMut::with_capacity(config.pack_size + config.pack_size / 8));
        PackBuilder::with_body(body)
    };
    let mut stored = Stored::default();
    let mut pack_index: HashMap<Arc<str>, u32> = HashMap::new();
    let mut recent: HashMap<[u8; 32], ChunkRef> = HashMap::new();
    let mut table = TableWriter::new(protection.clone());
    let mut builder = fresh();
    // The packs list slot of the pack being built, once it holds a chunk.
    let mut open: Option<u32> = None;
    let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    // If the uploader is gone the backup has failed already; what it is sent is dropped.
    let send = |u: Upload| {
        let _ = tx.blocking_send(u);
    };
    let close = |builder: PackBuilder, slot: u32, stored: &mut Stored| {
        let pack = builder.finish(config.encode, &protection);
        stored.stored_new += pack.bytes.len() as u64;
        stored.new_packs += 1;
        stored.packs[slot as usize] = pack.id.clone();
        send(Upload::Pack(pack));
    };
    for d in rx {
        waiting.insert(d.n, d);
        while let Some(d) = waiting.remove(&next) {
            next += 1;
            let entry = if let Some(k) = d.known {
                let pack = *pack_index.entry(k.pack.clone()).or_insert_with(|| {
                    stored.packs.push(k.pack.to_string());
                    stored.packs.len() as u32 - 1
                });
                ChunkRef { pack, ..k.entry }
            } else if let Some(c) = recent.get(&d.hash) {
                *c
            } else if let Some(env) = d.envelope {
                if let Some(slot) = open.filter(|_| builder.len() + env.len() > config.pack_size) {
                    close(std::mem::replace(&mut builder, fresh()), slot, &mut stored);
                    open = None;
                }
                let slot = *open.get_or_insert_with(|| {
                    stored.packs.push(String::new());
                    stored.packs.len() as u32 - 1
                });
                let e = builder.push(d.hash, d.plain_len, &env);
                let c = ChunkRef {
                    pack: slot,
                    offset: e.offset,
                    stored_len: e.stored_len,
                    plain_len: e.plain_len,
                    hash: d.hash,
                };
                if recent.len() >= RECENT {
                    recent.clear();
                }
                recent.insert(d.hash, c);
                c
            } else {
                continue; // a worker always sends an envelope or a known chunk
            };
            stored.stored_total += u64::from(entry.stored_len);
            if let Some((n, piece)) = table.push(&entry) {
                send(Upload::Piece(n, piece));
            }
        }
    }
    if let Some(slot) = open {
        close(builder, slot, &mut stored);
    }
    let (last, t) = table.finish();
    if let Some((n, piece)) = last {
        send(Upload::Piece(n, piece));
    }
    stored.table = t;
    stored
}

async fn upload(
    objects: ObjectStore,
    id: String,
    mut rx: mpsc::Receiver<Upload>,
    spare: crossbeam_channel::Sender<BytesMut>,
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
    while let Some(u) = rx.recv().await {
        if first_error.is_some() {
            continue; // drain, so the packer is never stuck
        }
        while running.len() >= parallel {
            if let Some(r) = running.join_next().await {
                note(r, &mut first_error);
            }
        }
        let objects = objects.clone();
        let id = id.clone();
        let spare = spare.clone();
        running.spawn(async move {
            match u {
                Upload::Pack(pack) => {
                    let put = objects
                        .storage()
                        .put(&pack_key(&pack.id), pack.bytes.clone(), PutMode::IfAbsent)
                        .await
                        .map(|_| ());
                    // Stored and no longer referenced: its memory makes the next pack.
                    if let Ok(body) = pack.bytes.try_into_mut() {
                        let _ = spare.send(body);
                    }
                    put
                }
                Upload::Piece(n, plain) => {
                    let key = chunk_table_key(&id, n);
                    objects
                        .put(&key, plain, PutMode::IfAbsent)
                        .await
                        .map(|_| ())
                        .map_err(|e| match e {
                            ObjectError::Storage(e) => e,
                            other => StorageError::new(
                                ErrorKind::Permanent,
                                "put",
                                &key,
                                other.to_string(),
                            ),
                        })
                }
            }
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
    use repo::codec::Codec;
    use repo::storage::{MemStorage, Storage};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_each_new_chunk_once_and_lists_every_chunk_in_order() {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let objects = ObjectStore::new(
            storage.clone(),
            Arc::new(Codec::new(1, 4)),
            EncodeOptions { zstd_level: None },
        );
        let mut p = Pipeline::start(
            objects.clone(),
            "b1",
            PipelineConfig {
                threads: 2,
                pack_size: 3000,
                uploads: 2,
                encode: EncodeOptions { zstd_level: None },
            },
        );
        // Ten distinct chunks, each twice; then one an earlier backup holds where it was,
        // and one that changed since.
        for seq in 0..20u32 {
            let data = Bytes::from(vec![(seq % 10) as u8; 1000]);
            p.submit(Chunk { file: 0, seq, data }, None).await.unwrap();
        }
        let held = |data: &[u8]| Known {
            pack: Arc::from("ee".repeat(32).as_str()),
            entry: ChunkRef {
                pack: 9,
                offset: 4242,
                stored_len: 150,
                plain_len: data.len() as u32,
                hash: blake3::hash(data).into(),
            },
        };
        let same = Bytes::from(vec![9u8; 100]);
        let expect = held(&same);
        p.submit(
            Chunk {
                file: 1,
                seq: 0,
                data: same,
            },
            Some(expect),
        )
        .await
        .unwrap();
        let changed = Bytes::from(vec![8u8; 100]);
        let expect = held(&[7u8; 100]);
        p.submit(
            Chunk {
                file: 1,
                seq: 1,
                data: changed,
            },
            Some(expect),
        )
        .await
        .unwrap();
        let s = p.finish().await.unwrap();
        assert_eq!(s.table.count, 22);
        // About two uncompressed 1050-byte envelopes per pack, and the earlier one.
        assert!(s.new_packs >= 4, "{s:?}");
        assert_eq!(s.packs.len(), s.new_packs + 1);
        let (_, piece) = objects.get(&chunk_table_key("b1", 0)).await.unwrap();
        let table: Vec<ChunkRef> = piece
            .chunks_exact(52)
            .filter_map(ChunkRef::decode)
            .collect();
        assert_eq!(table.len(), 22);
        for (i, c) in table.iter().enumerate().take(20) {
            assert_eq!(c.hash, *blake3::hash(&[(i % 10) as u8; 1000]).as_bytes());
            // The second of each pair is where the first was stored.
            if i >= 10 {
                assert_eq!(table[i - 10], *c);
            }
        }
        let earlier = &table[20];
        assert_eq!(
            (earlier.offset, &s.packs[earlier.pack()][..2]),
            (4242, "ee")
        );
        assert_ne!(table[21].offset, 4242, "a changed chunk is stored anew");
        let mut seen_pack_bytes = 0;
        for id in s.packs.iter().filter(|id| **id != "ee".repeat(32)) {
            let bytes = repo::storage::get_bytes(storage.as_ref(), &pack_key(id))
                .await
                .unwrap();
            seen_pack_bytes += bytes.len() as u64;
            assert!(
                !repo::pack::read_index(&bytes, &pack_key(id), &Protection::Plain)
                    .unwrap()
                    .is_empty()
            );
        }
        assert_eq!(seen_pack_bytes, s.stored_new);
    }
}
