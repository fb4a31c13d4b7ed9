//! One background worker at a time per local state directory (the wal-push state
//! directory, the wal-fetch spool): a lock file created exclusively, holding the worker's
//! process id, removed when the worker's guard drops. A lock left by a worker that died is
//! taken over. Beside it, a `want` file in which the foreground command tells the worker
//! which file PostgreSQL is asking for.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The lock file's name inside a state directory.
pub const LOCK_FILE: &str = "worker.pid";

/// The name of the file telling the worker what PostgreSQL asks for.
pub const WANT_FILE: &str = "want";

/// Tells the worker in `dir` that PostgreSQL asks for `name` (written whole: temp, rename).
pub fn set_wanted(dir: &Path, name: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{WANT_FILE}.{}.tmp", std::process::id()));
    let result =
        std::fs::write(&tmp, name).and_then(|()| std::fs::rename(&tmp, dir.join(WANT_FILE)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What PostgreSQL asked for last, as told in `dir` (unchecked text, trimmed).
pub fn wanted(dir: &Path) -> Option<String> {
    let name = std::fs::read_to_string(dir.join(WANT_FILE)).ok()?;
    Some(name.trim().to_owned()).filter(|n| !n.is_empty())
}

/// Clears the `want` file if it still names `name`.
pub fn unwant(dir: &Path, name: &str) {
    if wanted(dir).as_deref() == Some(name) {
        let _ = std::fs::remove_file(dir.join(WANT_FILE));
    }
}

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

    #[test]
    fn the_wanted_file_is_told_read_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        assert_eq!(wanted(&d), None);
        set_wanted(&d, "A").unwrap();
        set_wanted(&d, "B").unwrap();
        assert_eq!(wanted(&d).as_deref(), Some("B"));
        unwant(&d, "A");
        assert_eq!(wanted(&d).as_deref(), Some("B"));
        unwant(&d, "B");
        assert_eq!(wanted(&d), None);
    }
}
