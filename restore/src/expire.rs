//! `pitr expire` and `pitr delete`: which backups a retention policy keeps, and removing
//! the rest with what only they referenced (their chunk tables, packs no kept backup lists,
//! WAL no kept backup needs), in an order that leaves every kept backup restorable if the
//! command is killed at any point, and beside other commands that run at the same time
//! (docs/FORMAT.md, "Running commands" and "Expiring").

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use repo::manifest::{list_backups, manifest_key, BackupManifest, ManifestError, BACKUP_PREFIX};
use repo::markers::{self, unix_seconds, Marker, MarkerBody, Markers};
use repo::objects::ObjectError;
use repo::pack::is_pack_id;
use repo::repository::Repository;
use repo::storage::{list_all, ObjectMeta, StorageError};
use walfmt::{Lsn, SegmentName, TimelineId, WalSegmentSize};

/// Which backups to keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// The newest N.
    pub keep_last: Option<usize>,
    /// Every point in time in the last DURATION stays restorable.
    pub keep_within: Option<Duration>,
    /// The newest backup of each of the last N days (UTC) that have one.
    pub keep_daily: Option<usize>,
    /// ... weeks (Monday to Sunday, UTC).
    pub keep_weekly: Option<usize>,
    /// ... months (UTC).
    pub keep_monthly: Option<usize>,
    /// Never fewer than this many.
    pub min_backups: usize,
}

impl Policy {
    /// Whether no rule is given (expire refuses to run without one).
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_within.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
    }
}

/// What to remove.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Everything the policy does not keep.
    Policy(Policy),
    /// This one backup (`pitr delete`); `force` allows the last one.
    Delete {
        /// Its id.
        id: String,
        /// Delete it even when it is the only backup.
        force: bool,
    },
}

/// How expire runs.
#[derive(Debug, Clone)]
pub struct ExpireOptions {
    /// What to remove.
    pub mode: Mode,
    /// Only say what would go.
    pub dry_run: bool,
    /// A pack or a leftover of a backup that never finished is removed only once it is
    /// this old (by the storage's clock), on top of what running commands' markers protect.
    pub grace: Duration,
}

/// One backup, and whether it stays.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupDecision {
    /// Its id.
    pub id: String,
    /// When it became consistent (its manifest's `stop_time`).
    pub stop_time: String,
    /// It stays.
    pub kept: bool,
    /// Why (each rule that keeps it); empty when it goes.
    pub reasons: Vec<String>,
    /// A restore may replay from it to the end of the archive (the WAL after its stop is
    /// kept); otherwise only the WAL that makes it consistent is.
    pub wal_to_end: bool,
}

/// What was (or, with `--dry-run`, would be) removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Removed {
    /// Backups.
    pub backups: u64,
    /// WAL files (segments, `.partial`, `.backup` files, summaries).
    pub wal_files: u64,
    /// Pieces of streamed segments.
    pub stream_pieces: u64,
    /// Packs.
    pub packs: u64,
    /// Chunk table pieces, PostgreSQL backup_manifests and leftovers of backups that never
    /// finished.
    pub backup_objects: u64,
    /// Dead markers of commands that are gone.
    pub markers: u64,
    /// Stored bytes of all of them.
    pub bytes: u64,
}

/// What expire decided and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Only said what would go.
    pub dry_run: bool,
    /// Every backup, oldest first.
    pub backups: Vec<BackupDecision>,
    /// WAL from this segment position on (every timeline) is kept whole; None: all WAL is
    /// kept (no backup).
    pub wal_kept_from: Option<String>,
    /// What went.
    pub removed: Removed,
    /// Objects left although unreferenced, because they are newer than the grace period or
    /// a running command may still need them.
    pub deferred: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Why expire did not run (or stopped); what it removed before stopping stays removed,
/// and the next run finishes the rest.
#[derive(Debug, thiserror::Error)]
pub enum ExpireError {
    /// Listing, reading or deleting failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Something could not be read: no verdict on it, nothing decided from it.
    #[error("could not read {0}: {1}")]
    Unreadable(String, String),
    /// A manifest is damaged: which packs it needs is unknown.
    #[error("{0}")]
    Damaged(String),
    /// `delete` of a backup that is not there.
    #[error("backup {0} is not in the repository")]
    NoBackup(String),
    /// `delete` of the only backup.
    #[error("backup {0} is the only backup in the repository")]
    LastBackup(String),
    /// `delete` of a backup a running command relies on.
    #[error("backup {id} is in use by a running {by}")]
    InUse {
        /// The backup.
        id: String,
        /// Who uses it.
        by: String,
    },
    /// A live marker could not be read: what it protects is unknown.
    #[error("the marker {0} of a running command could not be read")]
    MarkerUnreadable(String),
    /// This command's own marker could not be kept fresh: others may not see what it removes.
    #[error("this expire's marker was not rewritten for too long; stopped before removing more")]
    Lapsed,
}

impl ExpireError {
    /// What the operator can do.
    pub fn hint(&self) -> Option<String> {
        match self {
            ExpireError::Damaged(_) => Some(
                "pitr verify shows what is damaged; pitr delete ID removes a damaged backup".into(),
            ),
            ExpireError::NoBackup(_) => Some("pitr list shows the backups".into()),
            ExpireError::LastBackup(_) => {
                Some("add --force to delete it anyway: nothing would be left to restore".into())
            }
            ExpireError::InUse { .. } => Some("run it again once that command has finished".into()),
            ExpireError::MarkerUnreadable(_) => Some(format!(
                "a marker dies {} minutes after its last rewrite; if no pitr is running, delete it",
                markers::TTL.as_secs() / 60
            )),
            _ => Some("run expire again: it finishes what was left".into()),
        }
    }
}

/// A backup as the policy sees it.
#[derive(Debug, Clone)]
struct Candidate {
    id: String,
    stop_time: String,
    /// `stop_time` parsed.
    time: SystemTime,
    /// The later of `time` and its manifest's storage time: when it became consistent at
    /// the latest, whichever clock is behind.
    latest: SystemTime,
    /// Segment positions (the name's last 16 digits: log and segment, the same on every
    /// timeline) of its start and of the segment holding the byte before its stop.
    start_pos: String,
    stop_pos: String,
    packs: Vec<String>,
}

fn position(name: &str) -> Option<&str> {
    (name.len() >= 24 && name.as_bytes()[..24].iter().all(u8::is_ascii_hexdigit))
        .then(|| &name[8..24])
}

fn utc_date(secs: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

/// The calendar period (its name) a time in Unix seconds falls in.
type BucketOf = fn(u64) -> String;

/// Which backups the policy keeps, and why: per candidate (sorted oldest first), its
/// reasons (none: it goes); and the index of the oldest backup whose WAL to the end of the
/// archive is kept. Pure: `now` is the storage's time.
fn decide(c: &[Candidate], p: &Policy, now: SystemTime) -> (Vec<Vec<String>>, Option<usize>) {
    let n = c.len();
    let mut reasons = vec![Vec::<String>::new(); n];
    if let Some(k) = p.keep_last {
        for (rank, i) in (0..n).rev().take(k).enumerate() {
            reasons[i].push(format!("keep-last {}", rank + 1));
        }
    }
    let mut anchor = None;
    if let Some(d) = p.keep_within {
        let start = now.checked_sub(d).unwrap_or(UNIX_EPOCH);
        for i in 0..n {
            if c[i].latest > start {
                reasons[i].push("keep-within".into());
            } else {
                anchor = Some(i);
            }
        }
        if let Some(a) = anchor {
            reasons[a]
                .push("keep-within (the newest backup at or before the window's start)".into());
        }
    }
    let buckets: [(Option<usize>, &str, BucketOf); 3] = [
        (p.keep_daily, "keep-daily", |s| utc_date(s)),
        (p.keep_weekly, "keep-weekly", |s| {
            let days = s / 86400;
            format!(
                "week of {}",
                utc_date(days.saturating_sub((days + 3) % 7) * 86400)
            )
        }),
        (p.keep_monthly, "keep-monthly", |s| {
            utc_date(s)[..7].to_owned()
        }),
    ];
    for (count, rule, key) in buckets {
        let Some(count) = count else { continue };
        let mut last: Option<String> = None;
        let mut taken = 0;
        for i in (0..n).rev() {
            if taken == count {
                break;
            }
            let k = key(unix_seconds(c[i].time));
            if last.as_ref() != Some(&k) {
                reasons[i].push(format!("{rule} {k}"));
                last = Some(k);
                taken += 1;
            }
        }
    }
    let mut kept = reasons.iter().filter(|r| !r.is_empty()).count();
    for i in (0..n).rev() {
        if kept >= p.min_backups {
            break;
        }
        if reasons[i].is_empty() {
            reasons[i].push("min-backups".into());
            kept += 1;
        }
    }
    // Without a window, the oldest kept backup restores to any point after it.
    let from = match (p.keep_within, anchor) {
        (Some(_), Some(a)) => Some(a),
        _ => reasons.iter().position(|r| !r.is_empty()),
    };
    (reasons, from)
}

/// Where the last expire says which WAL it keeps (docs/FORMAT.md, "Expiring").
pub const WAL_RETENTION_KEY: &str = "retention";

/// What the last expire kept of the WAL: everything from `wal_kept_from` (a segment
/// position, the name's last 16 digits) on, and below it only `ranges` (inclusive). A
/// segment missing below it and outside the ranges was expired, not lost.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WalRetention {
    /// The position from which all WAL is kept.
    pub wal_kept_from: String,
    /// Older ranges kept (older backups' own WAL).
    #[serde(default)]
    pub ranges: Vec<(String, String)>,
}

impl WalRetention {
    /// Whether the segment `name` was expired on purpose.
    pub fn expired(&self, name: &str) -> bool {
        let Some(pos) = position(name) else {
            return false;
        };
        pos < self.wal_kept_from.as_str()
            && !self
                .ranges
                .iter()
                .any(|(a, b)| a.as_str() <= pos && pos <= b.as_str())
    }

    /// Reads the record (None: expire never ran, or it cannot be read).
    pub async fn load(repo: &Repository) -> Option<WalRetention> {
        let (_, plain) = repo
            .objects()
            .get_at_most(WAL_RETENTION_KEY, 16 << 20)
            .await
            .ok()?;
        serde_json::from_slice(&plain).ok()
    }
}

/// What is kept of the WAL.
#[derive(Debug, Clone, Default)]
struct WalKeep {
    /// Everything from this position on; None: everything.
    from: Option<String>,
    /// And these ranges (inclusive).
    ranges: Vec<(String, String)>,
}

impl WalKeep {
    fn keeps(&self, pos: &str) -> bool {
        match &self.from {
            None => true,
            Some(f) => {
                pos >= f.as_str()
                    || self
                        .ranges
                        .iter()
                        .any(|(a, b)| a.as_str() <= pos && pos <= b.as_str())
            }
        }
    }
}

fn segment_pos(lsn: &str, tli: u32, seg: WalSegmentSize, before: bool) -> Option<String> {
    let l: Lsn = lsn.parse().ok()?;
    let l = if before {
        Lsn(l.0.saturating_sub(1))
    } else {
        l
    };
    let name = SegmentName::new(TimelineId(tli), l.segment_number(seg), seg).to_string();
    Some(name[8..24].to_owned())
}

fn candidate(
    m: &BackupManifest,
    stored: Option<SystemTime>,
    seg: WalSegmentSize,
) -> Option<Candidate> {
    let time = humantime::parse_rfc3339_weak(&m.stop_time).ok()?;
    Some(Candidate {
        id: m.id.clone(),
        stop_time: m.stop_time.clone(),
        time,
        latest: stored.map_or(time, |s| s.max(time)),
        start_pos: segment_pos(&m.start_lsn, m.timeline, seg, false)?,
        stop_pos: segment_pos(&m.stop_lsn, m.stop_timeline, seg, true)?,
        packs: m.packs.clone(),
    })
}

/// What the live markers protect.
#[derive(Debug, Default)]
struct Protected {
    /// Backups named (read, or a dedup base), with who names them.
    backups: BTreeMap<String, String>,
    /// Backups being written.
    writing: HashSet<String>,
    /// The lowest `wal_from` position.
    wal_from: Option<String>,
    /// The earliest start (storage seconds) of a running writer.
    writer_started: Option<u64>,
}

fn protected(found: &Markers, own: &str) -> Result<Protected, ExpireError> {
    let mut p = Protected::default();
    for r in &found.live {
        if r.key == own {
            continue;
        }
        let Some(b) = &r.body else {
            return Err(ExpireError::MarkerUnreadable(r.key.clone()));
        };
        let who = format!("{} (pid {} on {})", b.command, b.pid, b.host);
        for id in &b.backups {
            p.backups.entry(id.clone()).or_insert_with(|| who.clone());
        }
        if let Some(w) = &b.writing {
            p.writing.insert(w.clone());
        }
        if let Some(pos) = b.wal_from.as_deref().and_then(position) {
            if p.wal_from.as_deref().is_none_or(|f| pos < f) {
                p.wal_from = Some(pos.to_owned());
            }
        }
        if b.writing.is_some() || b.command == "backup" {
            // A writer whose start is unknown yet (its first write) started about now.
            let s = b
                .started
                .unwrap_or_else(|| r.modified.map_or(0, unix_seconds));
            p.writer_started = Some(p.writer_started.map_or(s, |w| w.min(s)));
        }
    }
    Ok(p)
}

/// The whole decision: which backups go, what of the WAL stays.
#[derive(Debug, Default)]
struct Decision {
    backups: Vec<BackupDecision>,
    condemned: Vec<String>,
    wal: WalKeep,
}

fn decision(
    c: &[Candidate],
    mode: &Mode,
    now: SystemTime,
    prot: &Protected,
) -> Result<Decision, ExpireError> {
    let (mut reasons, mut from) = match mode {
        Mode::Policy(p) => decide(c, p, now),
        Mode::Delete { id, force } => {
            let Some(i) = c.iter().position(|b| &b.id == id) else {
                return Err(ExpireError::NoBackup(id.clone()));
            };
            if c.len() == 1 && !force {
                return Err(ExpireError::LastBackup(id.clone()));
            }
            if let Some(by) = prot.backups.get(id) {
                return Err(ExpireError::InUse {
                    id: id.clone(),
                    by: by.clone(),
                });
            }
            let mut r = vec![vec!["not named by delete".to_owned()]; c.len()];
            r[i].clear();
            let from = r.iter().position(|r| !r.is_empty());
            (r, from)
        }
    };
    // A backup a running command relies on stays, and a restore from it may go on to the
    // end of the archive.
    for (i, b) in c.iter().enumerate() {
        if let Some(by) = prot.backups.get(&b.id) {
            reasons[i].push(format!("in use by {by}"));
            from = Some(from.map_or(i, |f| f.min(i)));
        }
    }
    let mut d = Decision::default();
    let mut wal_from: Option<String> = None;
    let mut lower = |pos: &str| {
        if wal_from.as_deref().is_none_or(|w| pos < w) {
            wal_from = Some(pos.to_owned());
        }
    };
    for (i, b) in c.iter().enumerate() {
        let kept = !reasons[i].is_empty();
        // The window: the first backup it needs and every kept one after it.
        let to_end = kept && from.is_some_and(|f| i >= f);
        if to_end {
            lower(&b.start_pos);
        } else if kept {
            d.wal.ranges.push((b.start_pos.clone(), b.stop_pos.clone()));
        } else {
            d.condemned.push(b.id.clone());
        }
        d.backups.push(BackupDecision {
            id: b.id.clone(),
            stop_time: b.stop_time.clone(),
            kept,
            reasons: reasons[i].clone(),
            wal_to_end: to_end,
        });
    }
    if let Some(w) = &prot.wal_from {
        lower(w);
    }
    // No kept backup: nothing says which WAL is needed, so all of it stays.
    d.wal.from = if d.backups.iter().any(|b| b.kept) {
        wal_from
    } else {
        None
    };
    Ok(d)
}

/// Reads what expire decides from: each backup's manifest (without its chunk table).
async fn candidates(
    repo: &Repository,
    seg: WalSegmentSize,
    skip_unreadable: Option<&str>,
) -> Result<Vec<Candidate>, ExpireError> {
    let storage = repo.objects().storage();
    let stored: BTreeMap<String, Option<SystemTime>> = list_all(storage.as_ref(), BACKUP_PREFIX)
        .await?
        .into_iter()
        .filter(|o| o.key.ends_with("/manifest"))
        .map(|o| (o.key, o.modified))
        .collect();
    let mut out = Vec::new();
    for id in list_backups(storage.as_ref()).await? {
        let key = manifest_key(&id);
        let m = match BackupManifest::load_header(repo.objects(), &id).await {
            Ok(m) => m,
            Err(e) if skip_unreadable == Some(id.as_str()) => {
                // `delete` of a damaged backup: what it referenced is found from the others.
                let _ = e;
                out.push(Candidate {
                    id: id.clone(),
                    stop_time: String::new(),
                    time: UNIX_EPOCH,
                    latest: UNIX_EPOCH,
                    start_pos: String::new(),
                    stop_pos: String::new(),
                    packs: vec![],
                });
                continue;
            }
            Err(ManifestError::Object(ObjectError::Storage(e))) if e.is_not_found() => continue,
            Err(e @ (ManifestError::Storage(_) | ManifestError::UnknownFormat { .. })) => {
                return Err(ExpireError::Unreadable(key, e.to_string()))
            }
            Err(ManifestError::Object(ObjectError::Storage(e))) => {
                return Err(ExpireError::Unreadable(key, e.to_string()))
            }
            Err(e) => return Err(ExpireError::Damaged(e.to_string())),
        };
        if m.id != id {
            return Err(ExpireError::Damaged(format!(
                "backup manifest \"{key}\" names backup {}",
                m.id
            )));
        }
        let c = candidate(&m, stored.get(&key).copied().flatten(), seg).ok_or_else(|| {
            ExpireError::Damaged(format!(
                "backup manifest \"{key}\" has an unreadable stop time or LSN"
            ))
        })?;
        out.push(c);
    }
    out.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

/// Whether an unreferenced object written at `modified` may go: older than the grace
/// period and than every running writer's start, by the storage's clock.
fn old_enough(
    modified: Option<SystemTime>,
    now: SystemTime,
    grace: Duration,
    prot: &Protected,
) -> bool {
    let Some(m) = modified else { return false };
    let before_grace = now.checked_sub(grace).is_some_and(|limit| m < limit);
    // Storage times may have whole-second resolution: a second's margin.
    let before_writers = prot
        .writer_started
        .is_none_or(|w| unix_seconds(m).saturating_add(1) < w);
    before_grace && before_writers
}

/// Test hooks, not for users: `PITR_DEBUG_EXPIRE_STOP=N` SIGKILLs the process after N
/// batches of deletions; `PITR_DEBUG_EXPIRE_BATCH=N` deletes N keys per batch (default
/// 1000), so that every deletion can be a stopping point.
fn stop_point() -> Option<u64> {
    std::env::var("PITR_DEBUG_EXPIRE_STOP").ok()?.parse().ok()
}

fn batch_size() -> usize {
    std::env::var("PITR_DEBUG_EXPIRE_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1000)
}

struct Deleter<'a> {
    repo: &'a Repository,
    marker: &'a Marker,
    dry_run: bool,
    batches: u64,
    stop: Option<u64>,
}

impl Deleter<'_> {
    async fn delete(
        &mut self,
        objects: &[ObjectMeta],
        removed: &mut Removed,
    ) -> Result<(), ExpireError> {
        for batch in objects.chunks(batch_size()) {
            if !self.dry_run {
                if self.marker.lapsed() {
                    return Err(ExpireError::Lapsed);
                }
                let keys: Vec<String> = batch.iter().map(|o| o.key.clone()).collect();
                self.repo.objects().storage().delete(&keys).await?;
                self.batches += 1;
                if self.stop == Some(self.batches) {
                    let me = rustix::process::getpid();
                    let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
                }
            }
            removed.bytes += batch.iter().map(|o| o.size).sum::<u64>();
        }
        Ok(())
    }
}

/// Runs expire (or delete) on `repo`.
pub async fn expire(repo: &Repository, options: &ExpireOptions) -> Result<Report, ExpireError> {
    let began = Instant::now();
    let seg = WalSegmentSize::new(repo.config().wal_segment_size)
        .map_err(|e| ExpireError::Unreadable("config".into(), e.to_string()))?;
    let objects = repo.objects();
    let command = match options.mode {
        Mode::Policy(_) => "expire",
        Mode::Delete { .. } => "delete",
    };
    let marker = Marker::start(objects, MarkerBody::new(command))
        .await
        .map_err(|e| ExpireError::Unreadable(markers::RUNNING_PREFIX.into(), e.to_string()))?;
    let now = marker.now();
    let result = run(repo, options, seg, &marker, now).await;
    marker.finish().await;
    let mut report = result?;
    report.seconds = began.elapsed().as_secs_f64();
    Ok(report)
}

async fn run(
    repo: &Repository,
    options: &ExpireOptions,
    seg: WalSegmentSize,
    marker: &Marker,
    now: SystemTime,
) -> Result<Report, ExpireError> {
    let objects = repo.objects();
    let storage = objects.storage().clone();
    let skip = match &options.mode {
        Mode::Delete { id, .. } => Some(id.as_str()),
        Mode::Policy(_) => None,
    };
    let c = candidates(repo, seg, skip).await?;

    // Decide, say what goes in the marker, then look at the markers again: a command that
    // wrote its marker before ours was written is seen now and what it names is spared;
    // one that writes after sees ours and stays away from what it names.
    let mut found = markers::live(objects, now).await?;
    let mut prot = protected(&found, marker.key())?;
    let mut d = decision(&c, &options.mode, now, &prot)?;
    if !options.dry_run {
        for _ in 0..5 {
            let condemned = d.condemned.clone();
            marker
                .update(|b| b.condemned = condemned)
                .await
                .map_err(|e| ExpireError::Unreadable(marker.key().into(), e.to_string()))?;
            found = markers::live(objects, now).await?;
            prot = protected(&found, marker.key())?;
            let again = decision(&c, &options.mode, now, &prot)?;
            let same = again.condemned == d.condemned && again.wal.from == d.wal.from;
            d = again;
            if same {
                break;
            }
        }
    }

    let mut report = Report {
        dry_run: options.dry_run,
        backups: d.backups.clone(),
        wal_kept_from: d.wal.from.clone(),
        ..Report::default()
    };
    let mut del = Deleter {
        repo,
        marker,
        dry_run: options.dry_run,
        batches: 0,
        stop: stop_point(),
    };
    let mut removed = Removed::default();

    // 1. Manifests: a backup ceases to exist before anything it names goes.
    let condemned: HashSet<&str> = d.condemned.iter().map(String::as_str).collect();
    let manifests: Vec<ObjectMeta> = list_all(storage.as_ref(), BACKUP_PREFIX)
        .await?
        .into_iter()
        .filter(|o| {
            o.key
                .strip_prefix(BACKUP_PREFIX)
                .and_then(|k| k.strip_suffix("/manifest"))
                .is_some_and(|id| condemned.contains(id))
        })
        .collect();
    del.delete(&manifests, &mut removed).await?;
    removed.backups = d.condemned.len() as u64;

    // 2. What lies under backups without a manifest: those just expired, and leftovers of
    // backups that never finished (unless one is still being written).
    let mut dirs: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    let mut with_manifest = HashSet::new();
    for o in list_all(storage.as_ref(), BACKUP_PREFIX).await? {
        let Some((id, rest)) = o
            .key
            .strip_prefix(BACKUP_PREFIX)
            .and_then(|k| k.split_once('/'))
        else {
            continue;
        };
        let id = id.to_owned();
        if rest == "manifest" && !condemned.contains(id.as_str()) {
            with_manifest.insert(id);
            continue;
        }
        dirs.entry(id).or_default().push(o);
    }
    let mut leftovers = Vec::new();
    for (id, objs) in dirs {
        if with_manifest.contains(&id) {
            continue;
        }
        let expired = condemned.contains(id.as_str());
        let abandoned = !prot.writing.contains(&id)
            && objs
                .iter()
                .all(|o| old_enough(o.modified, now, options.grace, &prot));
        if expired || abandoned {
            leftovers.extend(objs);
        } else {
            report.deferred += objs.len() as u64;
        }
    }
    removed.backup_objects = leftovers.len() as u64;
    del.delete(&leftovers, &mut removed).await?;

    // 3. Packs no kept backup lists.
    let mut referenced: HashSet<&str> = HashSet::new();
    for b in &c {
        if !condemned.contains(b.id.as_str()) {
            referenced.extend(b.packs.iter().map(String::as_str));
        }
    }
    let mut packs = Vec::new();
    for o in list_all(storage.as_ref(), "pack/").await? {
        let id = o.key.rsplit('/').next().unwrap_or("");
        if !is_pack_id(id) || referenced.contains(id) {
            continue;
        }
        if old_enough(o.modified, now, options.grace, &prot) {
            packs.push(o);
        } else {
            report.deferred += 1;
        }
    }
    removed.packs = packs.len() as u64;
    del.delete(&packs, &mut removed).await?;

    // 4. Say what of the WAL is kept on purpose (verify reads it: a gap there is expired
    // WAL, not lost WAL), then remove the WAL no kept backup needs, oldest first (what is left is always a run to the end);
    // streamed pieces with it. History files stay: they are small and say how timelines
    // descend.
    if let (Some(from), false) = (&d.wal.from, options.dry_run) {
        let record = WalRetention {
            wal_kept_from: from.clone(),
            ranges: d.wal.ranges.clone(),
        };
        objects
            .put(
                WAL_RETENTION_KEY,
                bytes::Bytes::from(serde_json::to_vec(&record).unwrap_or_default()),
                repo::storage::PutMode::Overwrite,
            )
            .await
            .map_err(|e| ExpireError::Unreadable(WAL_RETENTION_KEY.into(), e.to_string()))?;
    }
    let mut wal = Vec::new();
    for o in list_all(storage.as_ref(), "wal/").await? {
        let name = o.key.rsplit('/').next().unwrap_or("");
        if o.key.starts_with("wal/history/") {
            continue;
        }
        if position(name).is_some_and(|p| !d.wal.keeps(p)) {
            wal.push(o);
        }
    }
    removed.wal_files = wal.len() as u64;
    del.delete(&wal, &mut removed).await?;
    let mut pieces = Vec::new();
    for o in list_all(storage.as_ref(), "stream/").await? {
        let name = o.key.split('/').nth(2).unwrap_or("");
        if position(name).is_some_and(|p| !d.wal.keeps(p)) {
            pieces.push(o);
        }
    }
    removed.stream_pieces = pieces.len() as u64;
    del.delete(&pieces, &mut removed).await?;

    // 5. Markers of commands long gone.
    let dead: Vec<ObjectMeta> = found
        .dead
        .iter()
        .map(|k| ObjectMeta {
            key: k.clone(),
            size: 0,
            modified: None,
        })
        .collect();
    removed.markers = dead.len() as u64;
    del.delete(&dead, &mut removed).await?;

    report.removed = removed;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86400;

    fn cand(id: &str, secs: u64, start: u64, stop: u64) -> Candidate {
        let t = UNIX_EPOCH + Duration::from_secs(secs);
        Candidate {
            id: id.into(),
            stop_time: humantime::format_rfc3339_micros(t).to_string(),
            time: t,
            latest: t,
            start_pos: format!("{:016X}", start),
            stop_pos: format!("{:016X}", stop),
            packs: vec![],
        }
    }

    fn kept(r: &[Vec<String>]) -> Vec<bool> {
        r.iter().map(|r| !r.is_empty()).collect()
    }

    // 2026-12-01T00:00:00Z
    const T0: u64 = 1_796_083_200;

    #[test]
    fn keep_last_keeps_the_newest_and_wal_from_the_oldest_kept() {
        let c: Vec<_> = (0..4)
            .map(|i| cand(&format!("B{i}"), T0 + i * 3600, i * 10, i * 10 + 1))
            .collect();
        let p = Policy {
            keep_last: Some(2),
            min_backups: 1,
            ..Policy::default()
        };
        let (r, from) = decide(&c, &p, UNIX_EPOCH + Duration::from_secs(T0 + 5 * 3600));
        assert_eq!(kept(&r), vec![false, false, true, true]);
        assert_eq!(from, Some(2));
        let d = decision(&c, &Mode::Policy(p), UNIX_EPOCH, &Protected::default()).unwrap();
        assert_eq!(d.condemned, vec!["B0", "B1"]);
        assert_eq!(d.wal.from.as_deref(), Some("0000000000000014"));
    }

    #[test]
    fn keep_within_keeps_the_backup_at_the_window_start() {
        let c: Vec<_> = (0..4)
            .map(|i| cand(&format!("B{i}"), T0 + i * DAY, i * 10, i * 10 + 1))
            .collect();
        let p = Policy {
            keep_within: Some(Duration::from_secs(DAY + 3600)),
            min_backups: 1,
            ..Policy::default()
        };
        // Now is 2 h after B3: the window starts 23 h before B3, after B2.
        let now = UNIX_EPOCH + Duration::from_secs(T0 + 3 * DAY + 7200);
        let (r, from) = decide(&c, &p, now);
        assert_eq!(kept(&r), vec![false, false, true, true]);
        assert_eq!(from, Some(2));
        assert!(r[2][0].contains("window"));
    }

    #[test]
    fn calendar_rules_keep_the_newest_of_each_period_with_older_ones_consistent_only() {
        // Two backups a day for 70 days.
        let c: Vec<_> = (0..140)
            .map(|i| {
                cand(
                    &format!("B{i:03}"),
                    T0 + i * DAY / 2 + 3600,
                    i * 4,
                    i * 4 + 1,
                )
            })
            .collect();
        let p = Policy {
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_monthly: Some(3),
            keep_within: Some(Duration::from_secs(2 * DAY)),
            min_backups: 1,
            ..Policy::default()
        };
        let now = UNIX_EPOCH + Duration::from_secs(T0 + 70 * DAY);
        let (r, from) = decide(&c, &p, now);
        let daily: Vec<_> = r
            .iter()
            .enumerate()
            .filter(|(_, r)| r.iter().any(|x| x.starts_with("keep-daily")))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(daily, (127..140).filter(|i| i % 2 == 1).collect::<Vec<_>>());
        let monthly: Vec<_> = r
            .iter()
            .filter_map(|r| r.iter().find(|x| x.starts_with("keep-monthly")))
            .cloned()
            .collect();
        assert_eq!(
            monthly,
            vec![
                "keep-monthly 2026-12",
                "keep-monthly 2027-01",
                "keep-monthly 2027-02"
            ]
        );
        let weekly = r
            .iter()
            .filter(|r| r.iter().any(|x| x.starts_with("keep-weekly")))
            .count();
        assert_eq!(weekly, 4);
        // The window: 2 days back, the backup at its start and after.
        let from = from.unwrap();
        assert_eq!(from, 135);
        let d = decision(&c, &Mode::Policy(p), now, &Protected::default()).unwrap();
        // The monthly of 2026-12 keeps only its own WAL.
        let dec = d
            .backups
            .iter()
            .position(|b| b.reasons.iter().any(|x| x == "keep-monthly 2026-12"))
            .unwrap();
        assert!(!d.backups[dec].wal_to_end);
        assert!(d.wal.keeps(&c[dec].start_pos) && d.wal.keeps(&c[dec].stop_pos));
        assert!(!d.wal.keeps(&format!("{:016X}", dec as u64 * 4 + 2)));
        assert!(d.wal.keeps(&c[from].start_pos));
    }

    #[test]
    fn min_backups_and_running_commands_keep_more() {
        let c: Vec<_> = (0..3)
            .map(|i| cand(&format!("B{i}"), T0 + i * DAY, i * 10, i * 10 + 1))
            .collect();
        let p = Policy {
            keep_within: Some(Duration::from_secs(60)),
            min_backups: 2,
            ..Policy::default()
        };
        let now = UNIX_EPOCH + Duration::from_secs(T0 + 10 * DAY);
        let mut prot = Protected::default();
        prot.backups
            .insert("B0".into(), "restore (pid 1 on h)".into());
        let d = decision(&c, &Mode::Policy(p), now, &prot).unwrap();
        let kept: Vec<_> = d.backups.iter().map(|b| b.kept).collect();
        assert_eq!(kept, vec![true, true, true]);
        assert!(d.condemned.is_empty());
        // The restore from B0 may replay to the end.
        assert_eq!(d.wal.from.as_deref(), Some("0000000000000000"));
    }

    #[test]
    fn delete_refuses_the_last_and_a_backup_in_use() {
        let one = vec![cand("B0", T0, 0, 1)];
        let m = Mode::Delete {
            id: "B0".into(),
            force: false,
        };
        assert!(matches!(
            decision(&one, &m, UNIX_EPOCH, &Protected::default()),
            Err(ExpireError::LastBackup(_))
        ));
        let forced = Mode::Delete {
            id: "B0".into(),
            force: true,
        };
        let d = decision(&one, &forced, UNIX_EPOCH, &Protected::default()).unwrap();
        assert_eq!(d.condemned, vec!["B0"]);
        assert!(d.wal.from.is_none(), "with no backup left, all WAL stays");
        let two = vec![cand("B0", T0, 0, 1), cand("B1", T0 + 1, 5, 6)];
        let mut prot = Protected::default();
        prot.backups.insert("B0".into(), "restore".into());
        assert!(matches!(
            decision(&two, &m, UNIX_EPOCH, &prot),
            Err(ExpireError::InUse { .. })
        ));
        let d = decision(&two, &m, UNIX_EPOCH, &Protected::default()).unwrap();
        assert_eq!(d.wal.from.as_deref(), Some("0000000000000005"));
        assert!(matches!(
            decision(
                &two,
                &Mode::Delete {
                    id: "B9".into(),
                    force: false
                },
                UNIX_EPOCH,
                &Protected::default()
            ),
            Err(ExpireError::NoBackup(_))
        ));
    }

    #[test]
    fn unreferenced_objects_wait_for_the_grace_period_and_running_writers() {
        let now = UNIX_EPOCH + Duration::from_secs(T0);
        let grace = Duration::from_secs(3600);
        let old = Some(now - Duration::from_secs(7200));
        let new = Some(now - Duration::from_secs(60));
        let none = Protected::default();
        assert!(old_enough(old, now, grace, &none));
        assert!(!old_enough(new, now, grace, &none));
        assert!(!old_enough(None, now, grace, &none));
        let writer = Protected {
            writer_started: Some(T0 - 7200),
            ..Protected::default()
        };
        assert!(!old_enough(old, now, grace, &writer));
    }
}
