//! Markers of running commands (docs/FORMAT.md, "Running commands"): an object
//! `running/<id>` that a backup, stream, restore, verify or expire writes while it runs,
//! naming what it relies on (backups it reads or dedups against, the WAL from a segment on)
//! or, for expire and delete, the backups it is removing. The holder rewrites it every
//! [`REFRESH`]; one whose storage time (LastModified) is older than [`TTL`] is dead. So
//! `expire` knows what it must leave alone without trusting any host's clock, and a reader
//! knows when a backup it chose is being removed under it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::objects::{ObjectError, ObjectStore};
use crate::storage::{list_all, PutMode, StorageError};

/// Where markers live.
pub const RUNNING_PREFIX: &str = "running/";

/// A marker not rewritten for this long (by the storage's clock) is dead: its holder is gone.
pub const TTL: Duration = Duration::from_secs(600);

/// How often a holder rewrites its marker.
pub const REFRESH: Duration = Duration::from_secs(60);

/// A holder whose last successful rewrite is older than this no longer counts on being
/// seen (the marker may be dead by the storage's clock soon): it must not go on relying on
/// what the marker protected.
pub const LAPSE: Duration = Duration::from_secs(360);

/// The most a marker's plaintext may be.
const MARKER_MAX: u64 = 1 << 20;

/// What a marker says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerBody {
    /// The command: `backup`, `stream`, `restore`, `verify`, `expire`, `delete`.
    pub command: String,
    /// The host it runs on (for people).
    #[serde(default)]
    pub host: String,
    /// Its process id (for people).
    #[serde(default)]
    pub pid: u32,
    /// When it started, by the storage's clock (seconds since the Unix epoch): the
    /// LastModified of the marker's first write.
    #[serde(default)]
    pub started: Option<u64>,
    /// The backup id it is writing (a backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writing: Option<String>,
    /// Backups it reads or references (a restore's, a backup's dedup base).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<String>,
    /// It relies on the WAL from this segment on (on every timeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_from: Option<String>,
    /// Backups it is removing (expire, delete).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub condemned: Vec<String>,
    /// The holding process, so that another on the same host can tell it is gone without
    /// waiting for [`TTL`]: `BOOT_ID/PIDNS/PID/START` (see [`process_identity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

impl MarkerBody {
    /// A body for `command` run by this process.
    pub fn new(command: &str) -> MarkerBody {
        MarkerBody {
            command: command.to_owned(),
            host: host_name(),
            pid: std::process::id(),
            process: process_identity(std::process::id()),
            ..MarkerBody::default()
        }
    }
}

/// A process as one string: this boot's id, the PID namespace, the pid, and the process's
/// start time in clock ticks since boot (`/proc/PID/stat`, field 22). None where /proc
/// does not tell.
pub fn process_identity(pid: u32) -> Option<String> {
    let start = start_ticks(pid)?;
    Some(format!("{}/{pid}/{start}", place()?))
}

/// Where pids and start times mean one thing: the boot, the PID namespace and the time
/// namespace (start times are shifted by its offset). None when this process's /proc is
/// not its own PID namespace's (then no pid there can be trusted to be this one's).
fn place() -> Option<String> {
    let own = std::fs::read_link("/proc/self").ok()?;
    if own.to_string_lossy() != std::process::id().to_string() {
        return None;
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let time_ns = std::fs::read_link("/proc/self/ns/time")
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "time:[-]".into());
    Some(format!(
        "{}/{}+{time_ns}",
        boot.trim(),
        pid_ns.to_string_lossy()
    ))
}

/// Field 22 of `/proc/PID/stat` (after the command name, which may hold anything, in
/// parentheses).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `identity` ([`process_identity`]) names a process of this boot and PID
/// namespace that no longer runs (gone, or its pid now another process's). A process
/// elsewhere, or an identity that does not parse, is not known to be gone.
pub fn process_gone(identity: &str) -> bool {
    let mut parts = identity.rsplitn(3, '/');
    let (Some(start), Some(pid), Some(theirs)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(start), Ok(pid)) = (start.parse::<u64>(), pid.parse::<u32>()) else {
        return false;
    };
    if place().as_deref() != Some(theirs) {
        return false;
    }
    // Gone only when the kernel says so: its stat read with another start time (the pid
    // is another process's now), or no such process at all. A stat that cannot be read
    // (another user's process under hidepid, say) is not a process that is gone.
    match start_ticks(pid) {
        Some(now) => now != start,
        None => !process_exists(pid),
    }
}

/// Whether a process with this pid exists (`kill(pid, 0)`: only "no such process" says no).
fn process_exists(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return true;
    };
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Seconds since the Unix epoch.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

struct Shared {
    body: MarkerBody,
    last_ok: Instant,
    /// The same by the wall clock, which (unlike `Instant`) also counts time the host was
    /// suspended: a lapse by either counts.
    last_ok_wall: SystemTime,
    /// A write once came more than [`LAPSE`] after the one before: the marker may have
    /// been dead for a while, whatever happened since.
    lapsed: bool,
}

impl Shared {
    fn written(&mut self) {
        if self.since() > LAPSE {
            self.lapsed = true;
        }
        self.last_ok = Instant::now();
        self.last_ok_wall = SystemTime::now();
    }

    /// Time since the last successful write, the longer of the two clocks' say.
    fn since(&self) -> Duration {
        let wall = SystemTime::now()
            .duration_since(self.last_ok_wall)
            .unwrap_or_default();
        self.last_ok.elapsed().max(wall)
    }
}

/// This process's marker, rewritten in the background until [`Marker::finish`] (or drop,
/// which leaves it to die by its age).
pub struct Marker {
    key: String,
    objects: ObjectStore,
    shared: Arc<Mutex<Shared>>,
    /// Held across every write, so writes land in the order their bodies were taken (a
    /// rewrite in flight cannot land after a newer update and undo it).
    writing: Arc<tokio::sync::Mutex<()>>,
    now: SystemTime,
    refresher: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Marker").field("key", &self.key).finish()
    }
}

fn locked(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

async fn write(objects: &ObjectStore, key: &str, body: &MarkerBody) -> Result<(), ObjectError> {
    let json = serde_json::to_vec(body).unwrap_or_default();
    objects
        .put(key, Bytes::from(json), PutMode::Overwrite)
        .await
        .map(|_| ())
}

impl Marker {
    /// Writes a new marker, learns the storage's time from it, and starts rewriting it
    /// every [`REFRESH`].
    pub async fn start(objects: &ObjectStore, mut body: MarkerBody) -> Result<Marker, ObjectError> {
        let key = format!(
            "{RUNNING_PREFIX}{}",
            hex::encode(crate::crypto::random::<16>())
        );
        write(objects, &key, &body).await?;
        let now = objects
            .storage()
            .head(&key)
            .await?
            .and_then(|m| m.modified)
            .ok_or_else(|| {
                ObjectError::Storage(StorageError::new(
                    crate::storage::ErrorKind::Permanent,
                    "head",
                    &key,
                    "the storage gave no time for an object just written",
                ))
            })?;
        body.started = Some(unix_seconds(now));
        write(objects, &key, &body).await?;
        let shared = Arc::new(Mutex::new(Shared {
            body,
            last_ok: Instant::now(),
            last_ok_wall: SystemTime::now(),
            lapsed: false,
        }));
        let writing = Arc::new(tokio::sync::Mutex::new(()));
        let refresher = tokio::spawn({
            let (objects, key, shared, writing) = (
                objects.clone(),
                key.clone(),
                shared.clone(),
                writing.clone(),
            );
            async move {
                loop {
                    tokio::time::sleep(REFRESH).await;
                    let _turn = writing.lock().await;
                    let body = locked(&shared).body.clone();
                    if write(&objects, &key, &body).await.is_ok() {
                        locked(&shared).written();
                    }
                }
            }
        });
        Ok(Marker {
            key,
            objects: objects.clone(),
            shared,
            writing,
            now,
            refresher,
        })
    }

    /// The storage's time when the marker was first written.
    pub fn now(&self) -> SystemTime {
        self.now
    }

    /// Its key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Changes what the marker says, and writes it now.
    pub async fn update(&self, change: impl FnOnce(&mut MarkerBody)) -> Result<(), ObjectError> {
        let _turn = self.writing.lock().await;
        let body = {
            let mut s = locked(&self.shared);
            change(&mut s.body);
            s.body.clone()
        };
        write(&self.objects, &self.key, &body).await?;
        locked(&self.shared).written();
        Ok(())
    }

    /// A handle that changes what the marker says, written with the next rewrite (within
    /// [`REFRESH`]): for what may lag (a stream's position), from another task.
    pub fn handle(&self) -> MarkerHandle {
        MarkerHandle(self.shared.clone())
    }

    /// Whether the marker may have died unseen: its last successful write is older than
    /// [`LAPSE`], or once was. What it protected may be gone.
    pub fn lapsed(&self) -> bool {
        let s = locked(&self.shared);
        s.lapsed || s.since() > LAPSE
    }

    /// The storage's time now: the LastModified of this marker, rewritten for the purpose.
    pub async fn storage_now(&self) -> Result<SystemTime, ObjectError> {
        self.update(|_| {}).await?;
        let now = self
            .objects
            .storage()
            .head(&self.key)
            .await?
            .and_then(|m| m.modified)
            .unwrap_or(self.now);
        Ok(now.max(self.now))
    }

    /// The backups this marker relies on that a live expire or delete is removing (marker
    /// ages judged by the storage's clock, not this host's).
    pub async fn condemned(&self) -> Result<Vec<String>, StorageError> {
        let body = locked(&self.shared).body.clone();
        let now = match self.storage_now().await {
            Ok(t) => t,
            Err(ObjectError::Storage(e)) => return Err(e),
            Err(_) => self.now,
        };
        let running = live(&self.objects, now).await?;
        let mut out = Vec::new();
        for r in running.live {
            if r.key == self.key {
                continue;
            }
            let Some(other) = r.body else { continue };
            for c in other.condemned {
                let named = body.backups.contains(&c) || body.writing.as_ref() == Some(&c);
                if named && !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    /// Stops rewriting the marker and deletes it (after any rewrite in flight has landed,
    /// so none brings it back).
    pub async fn finish(self) {
        let _turn = self.writing.lock().await;
        self.refresher.abort();
        let _ = self
            .objects
            .storage()
            .delete(std::slice::from_ref(&self.key))
            .await;
    }
}

/// See [`Marker::handle`].
#[derive(Clone)]
pub struct MarkerHandle(Arc<Mutex<Shared>>);

impl MarkerHandle {
    /// Changes what the marker says from its next rewrite on.
    pub fn set(&self, change: impl FnOnce(&mut MarkerBody)) {
        change(&mut locked(&self.0).body);
    }
}

impl std::fmt::Debug for MarkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MarkerHandle")
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// A reader's marker (restore, verify), written before the reader looks at anything, so
/// that what it reads is protected from the moment it could have read it (an expire keeps
/// the manifest generations a command that started before their successor may be reading).
/// None when it cannot be written (read-only credentials, say): the reader goes on
/// unprotected.
pub async fn reader(objects: &ObjectStore, command: &str) -> Option<Marker> {
    Marker::start(objects, MarkerBody::new(command)).await.ok()
}

impl Marker {
    /// Names what this reader relies on, then checks no live expire or delete is removing
    /// those backups: `Err` names the ones it is.
    pub async fn rely_on(
        &self,
        backups: Vec<String>,
        wal_from: Option<String>,
    ) -> Result<(), Vec<String>> {
        if self
            .update(|b| {
                b.backups = backups;
                b.wal_from = wal_from;
            })
            .await
            .is_err()
        {
            // Not written: as unprotected as a reader without a marker.
            return Ok(());
        }
        match self.condemned().await {
            Ok(c) if !c.is_empty() => Err(c),
            _ => Ok(()),
        }
    }
}

/// A marker found in the repository.
#[derive(Debug, Clone)]
pub struct Running {
    /// Its key.
    pub key: String,
    /// Its storage time.
    pub modified: Option<SystemTime>,
    /// What it says; None when it could not be read (damaged, or not ours).
    pub body: Option<MarkerBody>,
}

/// The markers in the repository, as of storage time `now`.
#[derive(Debug, Clone, Default)]
pub struct Markers {
    /// Rewritten within [`TTL`] (or of unknown age).
    pub live: Vec<Running>,
    /// Older: their holders are gone.
    pub dead: Vec<String>,
}

/// Lists and reads the markers; `now` is the storage's time (a marker's own LastModified).
pub async fn live(objects: &ObjectStore, now: SystemTime) -> Result<Markers, StorageError> {
    let mut out = Markers::default();
    for meta in list_all(objects.storage().as_ref(), RUNNING_PREFIX).await? {
        let dead = meta
            .modified
            .is_some_and(|m| now.duration_since(m).is_ok_and(|age| age > TTL));
        if dead {
            out.dead.push(meta.key);
            continue;
        }
        let body = match objects.get_at_most(&meta.key, MARKER_MAX).await {
            Ok((_, plain)) => serde_json::from_slice::<MarkerBody>(&plain).ok(),
            // Finished (deleted) between the listing and the read.
            Err(e) if e.is_not_found() => continue,
            Err(ObjectError::Storage(e)) => return Err(e),
            Err(_) => None,
        };
        // Its holder ran on this host and is gone (killed, say): dead now, not in 10 min.
        if body
            .as_ref()
            .and_then(|b| b.process.as_deref())
            .is_some_and(process_gone)
        {
            out.dead.push(meta.key);
            continue;
        }
        out.live.push(Running {
            key: meta.key,
            modified: meta.modified,
            body,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::envelope::EncodeOptions;
    use crate::storage::FsStorage;

    fn store(dir: &std::path::Path) -> ObjectStore {
        ObjectStore::new(
            Arc::new(FsStorage::new(dir.to_path_buf()).unwrap()),
            Arc::new(Codec::new(1, 4)),
            EncodeOptions::default(),
        )
    }

    #[tokio::test]
    async fn a_marker_is_seen_updated_and_gone_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let objects = store(dir.path());
        let mut body = MarkerBody::new("restore");
        body.backups = vec!["B1".into()];
        let m = Marker::start(&objects, body).await.unwrap();
        let found = live(&objects, m.now()).await.unwrap();
        assert_eq!(found.live.len(), 1);
        let b = found.live[0].body.clone().unwrap();
        assert_eq!(b.backups, vec!["B1".to_string()]);
        assert_eq!(b.started, Some(unix_seconds(m.now())));
        assert!(m.condemned().await.unwrap().is_empty());

        let mut expire = MarkerBody::new("expire");
        expire.condemned = vec!["B0".into(), "B1".into()];
        let e = Marker::start(&objects, expire).await.unwrap();
        assert_eq!(m.condemned().await.unwrap(), vec!["B1".to_string()]);
        e.update(|b| b.condemned.retain(|c| c != "B1"))
            .await
            .unwrap();
        assert!(m.condemned().await.unwrap().is_empty());

        // Seen from an hour later, both are dead.
        let later = live(&objects, m.now() + Duration::from_secs(3600))
            .await
            .unwrap();
        assert!(later.live.is_empty());
        assert_eq!(later.dead.len(), 2);
        m.finish().await;
        e.finish().await;
        assert!(live(&objects, SystemTime::now())
            .await
            .unwrap()
            .live
            .is_empty());
    }

    #[test]
    fn a_process_of_this_host_that_is_gone_is_known_to_be() {
        let me = process_identity(std::process::id()).expect("/proc");
        assert!(!process_gone(&me), "{me}");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let alive = process_identity(pid);
        child.wait().unwrap();
        // Its identity while it ran (or a made-up start time if it was already gone).
        let place = place().unwrap();
        let gone = alive.unwrap_or_else(|| format!("{place}/{pid}/1"));
        assert!(process_gone(&gone), "{gone}");
        // Another boot (or PID namespace) is not known to be gone.
        let elsewhere = format!("ffffffff{}", &gone[8..]);
        assert!(!process_gone(&elsewhere), "{elsewhere}");
        assert!(!process_gone("not an identity"));
    }

    #[tokio::test]
    async fn an_unreadable_marker_is_live_but_says_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let objects = store(dir.path());
        objects
            .storage()
            .put(
                "running/planted",
                Bytes::from_static(b"junk"),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        let found = live(&objects, SystemTime::now()).await.unwrap();
        assert_eq!(found.live.len(), 1);
        assert!(found.live[0].body.is_none());
    }
}
