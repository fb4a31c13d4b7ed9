//! The wal-fetch spool: a local directory (by default `pg_wal/.pitr/fetch`) where a
//! background worker keeps the next segments of the timeline PostgreSQL is replaying, fetched
//! from the repository and verified before they appear, so that `wal-fetch` answers from disk
//! instead of waiting on a round trip.
//!
//! What is in it:
//! - `repo`: the URL of the repository the spooled files came from; a spool found holding
//!   another repository's files is emptied before use.
//! - `want`: the name of the segment PostgreSQL asked for last; the worker keeps the window
//!   of segments after it filled.
//! - `worker.lock`: locked (`flock`) by the one running worker for as long as it runs
//!   (see `repo::worker`).
//! - `staged`: present from the moment a restore staged WAL here until PostgreSQL's first
//!   wal-fetch call: until then the segments are waiting for a server not yet started.
//! - `delivered`: the segment wal-fetch handed over from here last, with the identity
//!   (device, inode, size, mtime) of the file it became; PostgreSQL renames a restored
//!   segment into pg_wal under its own name, keeping the inode.
//! - timeline history files a restore found in the repository (`00000002.history`), under
//!   their own names: recovery asks for them as it starts. History files never change once
//!   archived, so they are copied out, as often as asked.
//! - `absent`: the name of the one history file a restore found absent where PostgreSQL's
//!   search for the newest timeline ends, as recovery starts. Answered "not there" once,
//!   and only before the first segment is handed over: the same probe when recovery ends
//!   picks the new timeline's number, and that must see the repository as it is then.
//! - whole segments under their own names, each written to a temp file, fsynced and renamed,
//!   so a name in the spool always means a complete, verified file.
//!
//! A worker that has had no request for a while, once PostgreSQL has called, takes the
//! segments it left ahead with it: recovery is over (or paused), and they are not left to
//! fill `pg_wal`'s disk. A later call fetches again.
//!
//! Only whole segments (`wal/` objects of complete segments) are spooled: a segment that is
//! still being written (by `pitr stream`, later) is never delivered from here.

use std::io::Write;
use std::path::{Path, PathBuf};

use walfmt::{ArchiveFileKind, SegmentName, WalSegmentSize};

const REPO_FILE: &str = "repo";
const STAGED_FILE: &str = "staged";
const DELIVERED_FILE: &str = "delivered";
const ABSENT_FILE: &str = "absent";

/// What the spool can say about a history file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryAnswer {
    /// Delivered (a copy of the one the restore found).
    Delivered,
    /// Not in the repository, as the restore found it, for the probe as recovery starts.
    Absent,
    /// Unknown here: ask the repository.
    Unknown,
}

fn is_history_name(name: &str) -> bool {
    matches!(ArchiveFileKind::of(name), ArchiveFileKind::History(_))
}

/// What tells a file apart from any other: device, inode, size, mtime (ns).
fn identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{} {} {} {}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// A spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

/// The default spool for a restore_command destination (`%p`, normally
/// `pg_wal/RECOVERYXLOG`): `.pitr/fetch` beside it, on the same filesystem so that handing a
/// file over is a rename.
pub fn default_dir(dest: &Path) -> PathBuf {
    dir_of(dest).join(".pitr").join("fetch")
}

/// The directory holding `path` (`.` for a bare name).
pub(crate) fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Copies `src` to `dest` (temp file beside it, fsync, rename) and removes `src`. False when
/// `src` is gone or this user cannot read it.
fn copy_out(src: &Path, dest: &Path) -> std::io::Result<bool> {
    let copied = copy(src, dest)?;
    if copied {
        let _ = std::fs::remove_file(src);
    }
    Ok(copied)
}

/// Copies `src` to `dest` (temp file beside it, fsync, rename). False when `src` is gone or
/// this user cannot read it.
fn copy(src: &Path, dest: &Path) -> std::io::Result<bool> {
    let bytes = match std::fs::read(src) {
        Ok(b) => b,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            return Ok(false)
        }
        Err(e) => return Err(e),
    };
    crate::wal_fetch::write_atomically(dest, &bytes)?;
    Ok(true)
}

fn is_segment_name(name: &str) -> bool {
    ArchiveFileKind::of(name) == ArchiveFileKind::Segment
}

/// Writes `bytes` to `dir/name` through a temp file, fsynced before the rename.
pub(crate) fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.pitr-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl Spool {
    /// Opens (creating) the spool at `dir` for the repository `repo_url`, emptying it if it
    /// holds another repository's files.
    pub fn open(dir: &Path, repo_url: &str) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let spool = Spool {
            dir: dir.to_owned(),
        };
        let marker = std::fs::read_to_string(dir.join(REPO_FILE)).ok();
        if marker.as_deref() != Some(repo_url) {
            spool.drop_segments()?;
            for name in [repo::worker::WANT_FILE, ABSENT_FILE, DELIVERED_FILE] {
                let _ = std::fs::remove_file(dir.join(name));
            }
            write_durably(dir, REPO_FILE, repo_url.as_bytes())?;
        }
        Ok(spool)
    }

    /// The spool at `dir` as it is, for reading (nothing created or emptied).
    pub fn at(dir: &Path) -> Spool {
        Spool {
            dir: dir.to_owned(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segments held, in name order.
    pub fn segments(&self) -> std::io::Result<Vec<String>> {
        let mut out: Vec<String> = std::fs::read_dir(&self.dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_segment_name(n))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Whether the spool holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.dir.join(name).is_file()
    }

    /// Moves spooled `name` to `dest` (rename, or copy across filesystems or owners) and
    /// makes it durable there. False when the spool does not hold it (or this user cannot
    /// read it).
    pub fn take(&self, name: &str, dest: &Path) -> std::io::Result<bool> {
        if !is_segment_name(name) || !self.move_out(name, dest)? {
            return Ok(false);
        }
        if let Some(id) = identity(dest) {
            let _ = std::fs::write(self.dir.join(DELIVERED_FILE), format!("{name} {id}"));
        }
        // Replay has begun: a history probe from now on is not the one at the start.
        let _ = std::fs::remove_file(self.dir.join(ABSENT_FILE));
        Ok(true)
    }

    /// Keeps history file `name` (found in the repository) for recovery's first calls, and
    /// notes that `absent` was not there (see the module notes).
    pub fn stage_history(
        &self,
        files: &[(String, Vec<u8>)],
        absent: Option<&str>,
    ) -> std::io::Result<()> {
        for (name, bytes) in files {
            if is_history_name(name) {
                write_durably(&self.dir, name, bytes)?;
            }
        }
        match absent {
            Some(name) if is_history_name(name) => {
                write_durably(&self.dir, ABSENT_FILE, name.as_bytes())
            }
            _ => Ok(()),
        }
    }

    /// Answers a request for history file `name` from what a restore staged.
    pub fn history(&self, name: &str, dest: &Path) -> std::io::Result<HistoryAnswer> {
        if !is_history_name(name) {
            return Ok(HistoryAnswer::Unknown);
        }
        if copy(&self.dir.join(name), dest)? {
            return Ok(HistoryAnswer::Delivered);
        }
        let marker = self.dir.join(ABSENT_FILE);
        if std::fs::read_to_string(&marker).is_ok_and(|n| n == name)
            && std::fs::remove_file(&marker).is_ok()
        {
            return Ok(HistoryAnswer::Absent);
        }
        Ok(HistoryAnswer::Unknown)
    }

    /// Hands `name` over again when PostgreSQL asks for the segment this spool delivered
    /// last (it re-reads the last one when recovery ends) and still holds it unchanged in
    /// pg_wal under its own name, where it renamed it: copied from there instead of
    /// fetched again. Only whole archived segments pass through the spool, and an archived
    /// segment never changes, so the file is what the repository would send.
    pub fn again(&self, name: &str, dest: &Path) -> std::io::Result<bool> {
        let kept = dir_of(dest).join(name);
        let Ok(record) = std::fs::read_to_string(self.dir.join(DELIVERED_FILE)) else {
            return Ok(false);
        };
        match identity(&kept) {
            // A second name for the same file, no copy: PostgreSQL's rename of dest over
            // `kept` is then a no-op, and it removes RECOVERYXLOG when recovery ends.
            Some(id) if is_segment_name(name) && record == format!("{name} {id}") => {
                let _ = std::fs::remove_file(dest);
                match std::fs::hard_link(&kept, dest) {
                    Ok(()) => Ok(true),
                    Err(_) => copy(&kept, dest),
                }
            }
            _ => Ok(false),
        }
    }

    fn move_out(&self, name: &str, dest: &Path) -> std::io::Result<bool> {
        let src = self.dir.join(name);
        // A file another user wrote (a worker that a restore run as root started, say) is
        // copied: renamed, it would keep that owner and mode, which the server may not be
        // able to read. One this user cannot read is not there for it.
        let dest_dir = dir_of(dest);
        let foreign = {
            use std::os::unix::fs::MetadataExt;
            match (std::fs::metadata(&src), std::fs::metadata(dest_dir)) {
                (Ok(f), Ok(d)) => f.uid() != d.uid(),
                (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                _ => true,
            }
        };
        if foreign {
            return copy_out(&src, dest);
        }
        match std::fs::rename(&src, dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            // Another filesystem: copy through a temp file beside dest instead.
            Err(_) => return copy_out(&src, dest),
        }
        std::fs::File::open(dest_dir)?.sync_all()?;
        Ok(true)
    }

    /// Stores a verified segment.
    pub fn put(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        write_durably(&self.dir, name, bytes)
    }

    /// Records that PostgreSQL asked for `name`.
    pub fn set_wanted(&self, name: &str) -> std::io::Result<()> {
        repo::worker::set_wanted(&self.dir, name)
    }

    /// The segment PostgreSQL asked for last.
    pub fn wanted(&self) -> Option<String> {
        repo::worker::wanted(&self.dir).filter(|n| is_segment_name(n))
    }

    /// Removes spooled segments behind `name` (on any timeline): recovery has passed them.
    /// Segments ahead stay, however far (a restore may have staged them all).
    pub fn prune_behind(&self, name: &str, seg_size: WalSegmentSize) -> std::io::Result<()> {
        let Ok(wanted) = SegmentName::parse(name, seg_size) else {
            return Ok(());
        };
        for n in self.segments()? {
            if SegmentName::parse(&n, seg_size).is_ok_and(|s| s.segno < wanted.segno) {
                let _ = std::fs::remove_file(self.dir.join(n));
            }
        }
        Ok(())
    }

    /// Says the segments here were staged by a restore for a server not yet started.
    pub fn mark_staged(&self) -> std::io::Result<()> {
        std::fs::write(self.dir.join(STAGED_FILE), b"")
    }

    /// PostgreSQL is recovering: the staged segments are now in its hands.
    pub fn clear_staged(&self) {
        let _ = std::fs::remove_file(self.dir.join(STAGED_FILE));
    }

    /// Whether a restore staged segments here for a server that has not called yet.
    pub fn is_staged(&self) -> bool {
        self.dir.join(STAGED_FILE).exists()
    }

    /// Removes every spooled segment and history file.
    pub fn drop_segments(&self) -> std::io::Result<()> {
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_segment_name(&name) || is_history_name(&name) {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
        }
        Ok(())
    }

    /// Becomes the spool's one worker; None if another one is running.
    pub fn lock_worker(&self) -> std::io::Result<Option<repo::worker::WorkerLock>> {
        repo::worker::lock(&self.dir)
    }
}

/// The `depth` segments after `name` on its timeline.
pub fn window(name: &str, depth: usize, seg_size: WalSegmentSize) -> Vec<String> {
    let Ok(mut seg) = SegmentName::parse(name, seg_size) else {
        return Vec::new();
    };
    (0..depth)
        .map(|_| {
            seg = seg.next();
            seg.to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "000000010000000000000001";
    const B: &str = "000000010000000000000002";

    #[test]
    fn the_window_follows_the_timeline_across_log_ids() {
        let seg = WalSegmentSize::new(16 << 20).unwrap();
        assert_eq!(
            window("0000000200000000000000FE", 3, seg),
            [
                "0000000200000000000000FF",
                "000000020000000100000000",
                "000000020000000100000001"
            ]
        );
        assert!(window("00000002.history", 3, seg).is_empty());
    }

    #[test]
    fn takes_what_it_holds_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), "file:///r").unwrap();
        spool.put(A, b"one").unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        assert!(spool.take(A, &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"one");
        assert!(!spool.take(A, &dest).unwrap());
        assert!(!spool.take(B, &dest).unwrap());
    }

    #[test]
    fn the_last_delivered_segment_is_handed_over_again_from_pg_wal_while_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), "file:///r").unwrap();
        spool.put(A, b"one").unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        assert!(!spool.again(A, &dest).unwrap(), "nothing delivered yet");
        assert!(spool.take(A, &dest).unwrap());
        // PostgreSQL keeps what it restored under the segment's own name.
        std::fs::rename(&dest, dir.path().join(A)).unwrap();
        assert!(!spool.again(B, &dest).unwrap(), "not the one delivered");
        assert!(spool.again(A, &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"one");
        assert!(dir.path().join(A).exists(), "pg_wal's copy stays");
        // Another file under that name (removed and written again): fetched, not copied.
        std::fs::remove_file(dir.path().join(A)).unwrap();
        std::fs::write(dir.path().join(A), b"other").unwrap();
        std::fs::remove_file(&dest).unwrap();
        assert!(!spool.again(A, &dest).unwrap());
        assert!(!dest.exists());
    }

    #[test]
    fn staged_history_answers_the_start_of_recovery_only() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), "file:///r").unwrap();
        let dest = dir.path().join("RECOVERYHISTORY");
        assert_eq!(
            spool.history("00000002.history", &dest).unwrap(),
            HistoryAnswer::Unknown
        );
        spool
            .stage_history(
                &[(
                    "00000002.history".into(),
                    b"1\t0/3000000\tno recovery target\n".to_vec(),
                )],
                Some("00000003.history"),
            )
            .unwrap();
        for _ in 0..2 {
            assert_eq!(
                spool.history("00000002.history", &dest).unwrap(),
                HistoryAnswer::Delivered
            );
            assert!(std::fs::read(&dest).unwrap().starts_with(b"1\t0/3000000"));
        }
        assert_eq!(
            spool.history("00000003.history", &dest).unwrap(),
            HistoryAnswer::Absent
        );
        // Once: the probe when recovery ends (the new timeline's number) asks the repository.
        assert_eq!(
            spool.history("00000003.history", &dest).unwrap(),
            HistoryAnswer::Unknown
        );
        // And never once replay has begun.
        spool.stage_history(&[], Some("00000003.history")).unwrap();
        spool.put(A, b"one").unwrap();
        assert!(spool.take(A, &dir.path().join("RECOVERYXLOG")).unwrap());
        assert_eq!(
            spool.history("00000003.history", &dest).unwrap(),
            HistoryAnswer::Unknown
        );
        spool.drop_segments().unwrap();
        assert_eq!(
            spool.history("00000002.history", &dest).unwrap(),
            HistoryAnswer::Unknown
        );
    }

    #[test]
    fn another_repositorys_files_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "file:///r").unwrap();
        spool.put(A, b"one").unwrap();
        spool.set_wanted(A).unwrap();
        assert!(Spool::open(dir.path(), "file:///r").unwrap().has(A));
        let other = Spool::open(dir.path(), "s3://b/p").unwrap();
        assert!(!other.has(A));
        assert_eq!(other.wanted(), None);
    }

    #[test]
    fn prunes_and_records_what_was_wanted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), "file:///r").unwrap();
        spool.put(A, b"one").unwrap();
        spool.put(B, b"two").unwrap();
        spool.set_wanted(A).unwrap();
        assert_eq!(spool.wanted().as_deref(), Some(A));
        let seg = WalSegmentSize::new(16 << 20).unwrap();
        spool.put("000000020000000000000009", b"ahead").unwrap();
        spool.prune_behind(B, seg).unwrap();
        assert_eq!(spool.segments().unwrap(), [B, "000000020000000000000009"]);
    }
}
