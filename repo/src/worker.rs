//! One background worker at a time per local state directory (the wal-push state
//! directory, the wal-fetch spool): a lock file created exclusively, holding the worker's
//! process id, removed when the worker's guard drops. A lock left by a worker that died is
//! taken over.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The lock file's name inside a state directory.
pub const LOCK_FILE: &str = "worker.pid";

/// Whether a live process holds the lock in `dir`.
pub fn running(dir: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(dir.join(LOCK_FILE)) else {
        return false;
    };
    pid_alive(pid.trim())
}

/// Becomes `dir`'s one worker; `None` if another one is running. The lock goes with the
/// returned guard.
pub fn lock(dir: &Path) -> std::io::Result<Option<WorkerLock>> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(LOCK_FILE);
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(std::process::id().to_string().as_bytes())?;
                return Ok(Some(WorkerLock { path }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if running(dir) {
                    return Ok(None);
                }
                // Left by a worker that died: take it over.
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

fn pid_alive(pid: &str) -> bool {
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && Path::new("/proc").join(pid).exists()
}

/// Held by the running worker; dropping it releases the lock.
#[derive(Debug)]
pub struct WorkerLock {
    path: PathBuf,
}

impl Drop for WorkerLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_at_a_time_and_a_dead_ones_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        assert!(!running(&d));
        let held = lock(&d).unwrap().expect("first worker");
        assert!(running(&d));
        assert!(lock(&d).unwrap().is_none());
        drop(held);
        assert!(!running(&d));
        std::fs::write(d.join(LOCK_FILE), "999999999").unwrap();
        assert!(!running(&d));
        assert!(lock(&d).unwrap().is_some());
    }
}
