//! One background worker at a time per local state directory (the wal-push state
//! directory, the wal-fetch spool): the worker holds an exclusive `flock` on `worker.lock`
//! for as long as it runs. The kernel drops that lock with the worker's open file however
//! the worker ends (exit, panic, SIGKILL, a reboot), and no process id is ever read, so a
//! dead worker's lock cannot make anyone wait, nor can a recycled process id make a call
//! wait on a process that is not a worker. The file itself stays when the worker ends:
//! removing it would let a second worker lock a new file while the first still holds the
//! old one. A `worker.pid` left by an older pitr is never looked at, and the next worker
//! removes it. Beside the lock, a `want` file in which the foreground command tells the
//! worker which file PostgreSQL is asking for.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// The lock file's name inside a state directory.
pub const LOCK_FILE: &str = "worker.lock";

/// The lock file of pitr before the kernel held the lock (it named a process id): removed,
/// never read.
const OLD_LOCK_FILE: &str = "worker.pid";

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

/// Whether a worker holds the lock in `dir` now. Asked with a shared lock, taken and
/// dropped at once; any doubt (no such file, no permission to open it) means no worker, so
/// that nobody ever waits on one that may not exist.
pub fn running(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock))
}

/// How often, and how far apart, [`lock`] tries a lock it finds taken before it leaves
/// the work to the holder: a [`running`] probe holds it for microseconds, a worker for its
/// lifetime.
const LOCK_TRIES: u32 = 10;
const LOCK_RETRY: Duration = Duration::from_millis(2);

/// Becomes `dir`'s one worker; `None` if another one is running. The lock goes with the
/// returned guard, or with the process.
pub fn lock(dir: &Path) -> std::io::Result<Option<WorkerLock>> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(LOCK_FILE);
    // Read-only is enough for flock, and lets a worker lock the file another user (a
    // restore run as root) created; so it is made readable to all, whatever the umask.
    let file = match File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            let _ = file.set_permissions(std::fs::Permissions::from_mode(0o644));
            file
        }
        opened => opened?,
    };
    for _ in 0..LOCK_TRIES {
        match file.try_lock() {
            Ok(()) => {
                let _ = std::fs::remove_file(dir.join(OLD_LOCK_FILE));
                return Ok(Some(WorkerLock { _file: file }));
            }
            Err(TryLockError::WouldBlock) => std::thread::sleep(LOCK_RETRY),
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
    Ok(None)
}

/// Held by the running worker; dropping it (or the process ending in any way) releases
/// the lock.
#[derive(Debug)]
pub struct WorkerLock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_at_a_time_and_the_lock_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        assert!(!running(&d));
        let held = lock(&d).unwrap().expect("first worker");
        assert!(running(&d));
        assert!(lock(&d).unwrap().is_none());
        drop(held);
        // The file stays, readable to other users' workers; the lock does not.
        let mode = std::fs::metadata(d.join(LOCK_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(!running(&d));
        assert!(lock(&d).unwrap().is_some());
    }

    #[test]
    fn an_old_pid_file_naming_a_live_process_is_not_a_worker() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        std::fs::create_dir_all(&d).unwrap();
        // This very process is alive, and is no worker.
        std::fs::write(d.join(OLD_LOCK_FILE), std::process::id().to_string()).unwrap();
        assert!(!running(&d));
        let held = lock(&d)
            .unwrap()
            .expect("the old file does not hold the lock");
        assert!(!d.join(OLD_LOCK_FILE).exists(), "the old file is cleared");
        drop(held);
    }

    #[test]
    fn a_read_only_lock_file_still_locks() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(LOCK_FILE), b"").unwrap();
        std::fs::set_permissions(d.join(LOCK_FILE), std::fs::Permissions::from_mode(0o444))
            .unwrap();
        let held = lock(&d).unwrap().expect("locked through a read-only open");
        assert!(running(&d));
        drop(held);
        assert!(!running(&d));
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
