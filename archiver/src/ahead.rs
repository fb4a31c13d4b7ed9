//! Push-ahead bookkeeping: which files PostgreSQL has marked ready to archive, and a local
//! state directory where the background push worker records the files it stored, so that
//! PostgreSQL's own call for such a file is answered after a cheap check instead of a
//! second upload.
//!
//! A record only ever claims something that was true when it was written (the object was
//! stored and read back with this hash, from a file with this identity), and the call that
//! uses it checks again against the file and the repository, so a stale, torn or foreign
//! record can cost a re-upload but never report a file archived that is not stored.
//!
//! In the directory: `NAME.ok` records, `NAME.error` (the worker could not store NAME: its
//! message; PostgreSQL's own call then pushes NAME itself and reports what happens), and
//! the worker's lock, `worker.lock` (see `repo::worker`), and `want`: the file PostgreSQL's
//! current call waits for.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use walfmt::ArchiveFileKind;

/// The default state directory for WAL files in `pg_wal`: a directory inside `pg_wal`,
/// which PostgreSQL's base backups leave out and its WAL recycling ignores.
pub fn default_state_dir(pg_wal: &Path) -> PathBuf {
    pg_wal.join(".pitr").join("push")
}

/// Names of the WAL files marked `.ready` in `pg_wal/archive_status`, in the order
/// PostgreSQL archives them (timeline history files first, then by name), leaving out
/// `except`. Empty when there is no such directory (a file pushed by hand from elsewhere).
pub fn ready_files(pg_wal: &Path, except: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pg_wal.join("archive_status")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let wal = name.strip_suffix(".ready")?.to_owned();
            (wal != except && ArchiveFileKind::of(&wal) != ArchiveFileKind::Other).then_some(wal)
        })
        .collect();
    names.sort_by_key(|n| {
        let history = matches!(ArchiveFileKind::of(n), ArchiveFileKind::History(_));
        (!history, n.clone())
    });
    names
}

/// What a record says: this repository holds this file's bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The repository (its URL as given).
    pub repo: String,
    /// The stored envelope's hash of the file, hex: blake3, or its keyed content id in an
    /// encrypted repository.
    pub blake3: String,
    /// The file as it was when hashed; the same identity now means the same bytes (a
    /// segment is never rewritten in place once ready, and a recycled one is renamed and
    /// rewritten). Without it, the file is hashed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileIdentity>,
}

/// Device, inode, size and modification time of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileIdentity {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl FileIdentity {
    /// The identity of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The state directory at `dir` (created on first write).
    pub fn new(dir: PathBuf) -> StateDir {
        StateDir { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.ok"))
    }

    /// The record for `name`, if there is a readable one.
    pub fn lookup(&self, name: &str) -> Option<Record> {
        let bytes = std::fs::read(self.path(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records that `name` is stored. Written whole (temp file, rename) so a reader never
    /// sees half a record; not fsynced, since a lost record only costs a re-upload.
    pub fn record(&self, name: &str, record: &Record) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(record).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, self.path(name))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Drops the record for `name`.
    pub fn forget(&self, name: &str) {
        let _ = std::fs::remove_file(self.path(name));
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Notes that the worker could not store `name` (best effort).
    pub fn fail(&self, name: &str, message: &str) {
        let _ = std::fs::create_dir_all(&self.dir);
        let _ = std::fs::write(self.dir.join(format!("{name}.error")), message);
    }

    /// What the worker said when it could not store `name`, if it said so; taken once.
    pub fn take_failure(&self, name: &str) -> Option<String> {
        let path = self.dir.join(format!("{name}.error"));
        let message = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        Some(message)
    }

    /// Records not yet asked for, i.e. files stored ahead of PostgreSQL.
    pub fn outstanding(&self) -> usize {
        std::fs::read_dir(&self.dir).map_or(0, |entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".ok"))
                .count()
        })
    }

    /// Tells the worker which file PostgreSQL is waiting for (best effort).
    pub fn want(&self, name: &str) {
        let _ = repo::worker::set_wanted(&self.dir, name);
    }

    /// No call waits for `name` any more.
    pub fn unwant(&self, name: &str) {
        repo::worker::unwant(&self.dir, name);
    }

    /// The file PostgreSQL waits for, as last told.
    pub fn wanted(&self) -> Option<String> {
        repo::worker::wanted(&self.dir).filter(|n| ArchiveFileKind::of(n) != ArchiveFileKind::Other)
    }

    /// Whether a push worker is running for this directory.
    pub fn worker_running(&self) -> bool {
        repo::worker::running(&self.dir)
    }

    /// Drops every record whose file is not in `keep` (PostgreSQL has archived or removed
    /// it), and leftover temp files.
    pub fn prune(&self, keep: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let file = e.file_name().to_string_lossy().into_owned();
            let stale = match file
                .strip_suffix(".ok")
                .or_else(|| file.strip_suffix(".error"))
            {
                Some(name) => !keep.contains(name),
                None => file.ends_with(".tmp"),
            };
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_files_come_in_archiving_order() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("archive_status");
        std::fs::create_dir(&status).unwrap();
        for f in [
            "000000010000000000000003.ready",
            "000000010000000000000001.done",
            "000000010000000000000002.ready",
            "00000002.history.ready",
            "000000010000000000000004.ready",
            "junk.ready",
        ] {
            std::fs::write(status.join(f), b"").unwrap();
        }
        assert_eq!(
            ready_files(dir.path(), "000000010000000000000004"),
            [
                "00000002.history",
                "000000010000000000000002",
                "000000010000000000000003"
            ]
        );
        assert!(ready_files(&dir.path().join("nowhere"), "x").is_empty());
    }

    #[test]
    fn records_round_trip_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("push"));
        assert_eq!(state.lookup("A"), None);
        let r = Record {
            repo: "file:///r".into(),
            blake3: "ab".into(),
            file: None,
        };
        state.record("A", &r).unwrap();
        state.record("B", &r).unwrap();
        std::fs::write(dir.path().join("push/C.ok"), b"{torn").unwrap();
        assert_eq!(state.lookup("A"), Some(r.clone()));
        assert_eq!(state.lookup("C"), None, "a torn record is no record");
        state.prune(&HashSet::from(["B".to_owned()]));
        assert_eq!(state.lookup("A"), None);
        assert_eq!(state.lookup("B"), Some(r));
        state.forget("B");
        assert_eq!(state.lookup("B"), None);
    }

    #[test]
    fn failures_are_told_once_and_identity_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("push"));
        state.fail("A", "no space");
        assert_eq!(state.take_failure("A").as_deref(), Some("no space"));
        assert_eq!(state.take_failure("A"), None);
        let f = dir.path().join("seg");
        std::fs::write(&f, b"one").unwrap();
        let before = FileIdentity::of(&f).unwrap();
        assert_eq!(FileIdentity::of(&f).unwrap(), before);
        std::fs::write(&f, b"other").unwrap();
        assert_ne!(FileIdentity::of(&f).unwrap(), before);
    }
}
