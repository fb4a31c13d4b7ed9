//! Envelope encoding and decoding on a fixed set of plain threads (a [`Pool`]), so
//! compression and hashing never run on the async runtime, with a bound on the jobs in
//! flight so memory stays bounded however many callers wait.

use bytes::Bytes;

use crate::envelope::{self, EncodeOptions, EnvelopeError, Header, Protection};
use crate::pool::Pool;

/// The codec's worker threads. Cheap to share (`Arc`); dropping the last handle stops them.
#[derive(Debug)]
pub struct Codec {
    pool: Pool,
}

/// The codec's threads went away (a worker panicked): nothing was encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("envelope worker threads are gone")]
pub struct CodecGone;

impl Codec {
    /// `threads` workers (at least 1) and at most `queue` jobs waiting or running.
    pub fn new(threads: usize, queue: usize) -> Codec {
        Codec {
            pool: Pool::new("pitr-codec", threads, queue),
        }
    }

    /// One worker per core, twice as many jobs in flight.
    pub fn with_default_threads() -> Codec {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        Codec::new(n, 2 * n)
    }

    /// Runs other envelope work (a chunk's check, say) on a worker thread.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CodecGone> {
        self.pool.run(f).await.map_err(|_| CodecGone)
    }

    /// Wraps `plain` in a plaintext envelope on a worker thread.
    pub async fn encode(&self, plain: Bytes, options: EncodeOptions) -> Result<Bytes, CodecGone> {
        self.encode_as(plain, options, Protection::Plain, String::new())
            .await
    }

    /// Wraps `plain` in an envelope protected as `protection` says for the object
    /// `identity`, on a worker thread.
    pub async fn encode_as(
        &self,
        plain: Bytes,
        options: EncodeOptions,
        protection: Protection,
        identity: String,
    ) -> Result<Bytes, CodecGone> {
        self.pool
            .run(move || envelope::encode_as(&plain, options, &protection, &identity))
            .await
            .map_err(|_| CodecGone)
    }

    /// Unwraps and verifies an envelope on a worker thread.
    pub async fn decode(
        &self,
        bytes: Bytes,
    ) -> Result<Result<(Header, Bytes), EnvelopeError>, CodecGone> {
        self.decode_at_most(bytes, u64::MAX).await
    }

    /// [`Codec::decode`] of at most `max` bytes of plaintext ([`envelope::decode_at_most`]).
    pub async fn decode_at_most(
        &self,
        bytes: Bytes,
        max: u64,
    ) -> Result<Result<(Header, Bytes), EnvelopeError>, CodecGone> {
        self.decode_as(bytes, max, Protection::Plain, String::new())
            .await
    }

    /// [`Codec::decode_at_most`] of an object protected as `protection` says, stored as
    /// `identity` ([`envelope::decode_as`]).
    pub async fn decode_as(
        &self,
        bytes: Bytes,
        max: u64,
        protection: Protection,
        identity: String,
    ) -> Result<Result<(Header, Bytes), EnvelopeError>, CodecGone> {
        self.pool
            .run(move || envelope::decode_as(&bytes, max, &protection, &identity))
            .await
            .map_err(|_| CodecGone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
        // All slots came back.
        assert_eq!(codec.pool.free_slots(), 3);
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
