//! A fixed set of plain threads for CPU work (decompressing, hashing, writing restored
//! files), fed by a bounded crossbeam channel. A semaphore bounds the jobs queued or
//! running, so submitting never blocks an async task, and memory stays bounded however
//! many callers wait.

use std::thread::JoinHandle;

use tokio::sync::{oneshot, Semaphore};

type Job = Box<dyn FnOnce() + Send>;

/// The pool's threads. Dropping it lets queued jobs finish and joins the threads.
#[derive(Debug)]
pub struct Pool {
    tx: Option<crossbeam_channel::Sender<Job>>,
    slots: Semaphore,
    workers: Vec<JoinHandle<()>>,
}

/// The pool's threads went away (a job panicked): the job did not run to completion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker threads are gone")]
pub struct PoolGone;

impl Pool {
    /// `threads` threads named `name-N`, at most `queue` jobs waiting or running.
    pub fn new(name: &str, threads: usize, queue: usize) -> Pool {
        let queue = queue.max(1);
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue);
        let workers = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })
                    .expect("spawn pool thread")
            })
            .collect();
        Pool {
            tx: Some(tx),
            slots: Semaphore::new(queue),
            workers,
        }
    }

    /// Job slots not taken now.
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// Runs `f` on a pool thread and returns what it returns.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolGone> {
        let permit = self.slots.acquire().await.map_err(|_| PoolGone)?;
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(PoolGone)?;
        // A permit guarantees a free slot, so this never blocks.
        tx.try_send(Box::new(move || {
            let _ = reply.send(f());
        }))
        .map_err(|_| PoolGone)?;
        let out = rx.await.map_err(|_| PoolGone);
        drop(permit);
        out
    }
}

impl Drop for Pool {
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
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_jobs_off_the_runtime_with_bounded_queue() {
        let pool = Arc::new(Pool::new("test-pool", 2, 3));
        let mut tasks = Vec::new();
        for i in 0..40u64 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.run(move || (i * 2, std::thread::current().name().map(str::to_owned)))
                    .await
                    .unwrap()
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let (v, name) = t.await.unwrap();
            assert_eq!(v, i as u64 * 2);
            assert!(name.unwrap().starts_with("test-pool-"));
        }
        assert_eq!(pool.free_slots(), 3);
    }
}
