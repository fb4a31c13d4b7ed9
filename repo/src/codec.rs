//! Envelope encoding and decoding on a fixed set of plain threads, fed by a bounded
//! crossbeam channel, so compression and hashing never run on the async runtime. A
//! semaphore bounds the jobs in flight, so a send never blocks an async task and memory
//! stays bounded however many callers wait.

use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::envelope::{self, EncodeOptions, EnvelopeError, Header};

enum Job {
    Encode {
        plain: Bytes,
        options: EncodeOptions,
        reply: oneshot::Sender<Bytes>,
        _permit: OwnedSemaphorePermit,
    },
    Decode {
        bytes: Bytes,
        reply: oneshot::Sender<Result<(Header, Bytes), EnvelopeError>>,
        _permit: OwnedSemaphorePermit,
    },
}

/// The codec's worker threads. Cheap to share (`Arc`); dropping the last handle stops them.
#[derive(Debug)]
pub struct Codec {
    tx: Option<crossbeam_channel::Sender<Job>>,
    slots: Arc<Semaphore>,
    workers: Vec<JoinHandle<()>>,
}

/// The codec's threads went away (a worker panicked): nothing was encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("envelope worker threads are gone")]
pub struct CodecGone;

impl Codec {
    /// `threads` workers (at least 1) and at most `queue` jobs waiting or running.
    pub fn new(threads: usize, queue: usize) -> Codec {
        let queue = queue.max(1);
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue);
        let workers = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("pitr-codec-{i}"))
                    .spawn(move || {
                        for job in rx {
                            run(job);
                        }
                    })
                    .expect("spawn codec thread")
            })
            .collect();
        Codec {
            tx: Some(tx),
            slots: Arc::new(Semaphore::new(queue)),
            workers,
        }
    }

    /// One worker per core, twice as many jobs in flight.
    pub fn with_default_threads() -> Codec {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        Codec::new(n, 2 * n)
    }

    async fn submit(
        &self,
        make: impl FnOnce(OwnedSemaphorePermit) -> Job,
    ) -> Result<(), CodecGone> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| CodecGone)?;
        let tx = self.tx.as_ref().ok_or(CodecGone)?;
        // A permit guarantees a free slot, so this never blocks.
        tx.try_send(make(permit)).map_err(|_| CodecGone)
    }

    /// Wraps `plain` in an envelope on a worker thread.
    pub async fn encode(&self, plain: Bytes, options: EncodeOptions) -> Result<Bytes, CodecGone> {
        let (reply, rx) = oneshot::channel();
        self.submit(|permit| Job::Encode {
            plain,
            options,
            reply,
            _permit: permit,
        })
        .await?;
        rx.await.map_err(|_| CodecGone)
    }

    /// Unwraps and verifies an envelope on a worker thread.
    pub async fn decode(
        &self,
        bytes: Bytes,
    ) -> Result<Result<(Header, Bytes), EnvelopeError>, CodecGone> {
        let (reply, rx) = oneshot::channel();
        self.submit(|permit| Job::Decode {
            bytes,
            reply,
            _permit: permit,
        })
        .await?;
        rx.await.map_err(|_| CodecGone)
    }
}

fn run(job: Job) {
    // The slot is freed once the work is done, before the caller hears of it.
    match job {
        Job::Encode {
            plain,
            options,
            reply,
            _permit,
        } => {
            let out = envelope::encode(&plain, options);
            drop(_permit);
            let _ = reply.send(out);
        }
        Job::Decode {
            bytes,
            reply,
            _permit,
        } => {
            let out = envelope::decode(&bytes);
            drop(_permit);
            let _ = reply.send(out);
        }
    }
}

impl Drop for Codec {
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn encodes_and_decodes_off_the_runtime_with_many_callers() {
        let codec = Arc::new(Codec::new(2, 3));
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let codec = codec.clone();
            tasks.push(tokio::spawn(async move {
                let plain = Bytes::from(i.to_le_bytes().repeat(1000));
                let env = codec
                    .encode(plain.clone(), EncodeOptions::default())
                    .await
                    .unwrap();
                let (_, back) = codec.decode(env).await.unwrap().unwrap();
                assert_eq!(back, plain);
                std::thread::current().name().map(str::to_owned)
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // All permits came back.
        assert_eq!(codec.slots.available_permits(), 3);
    }

    #[tokio::test]
    async fn corruption_comes_back_typed() {
        let codec = Codec::new(1, 1);
        let mut env = codec
            .encode(Bytes::from_static(b"abc"), EncodeOptions::default())
            .await
            .unwrap()
            .to_vec();
        let last = env.len() - 1;
        env[last] ^= 0xff;
        assert!(codec.decode(Bytes::from(env)).await.unwrap().is_err());
    }
}
