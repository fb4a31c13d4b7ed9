//! `pitr expire` and `pitr delete`: which backups a retention policy keeps, and removing
//! the rest with what only they referenced (their chunk tables, packs no kept backup lists,
//! WAL no kept backup needs), in an order that leaves every kept backup restorable if the
//! command is killed at any point, and beside other commands that run at the same time
//! (docs/FORMAT.md, "Running commands" and "Expiring").

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use repo::manifest::{
    manifest_key_at, parse_manifest_key, BackupManifest, ManifestError, BACKUP_PREFIX,
};
use repo::markers::{self, unix_seconds, Marker, MarkerBody, Markers};
use repo::objects::ObjectError;
use repo::pack::is_pack_id;
use repo::repository::Repository;
use repo::storage::{list_all, ObjectMeta, StorageError};
use walfmt::{Lsn, SegmentName, TimelineHistory, TimelineId, WalSegmentSize};

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
    /// Packs kept backups use less than this share of are repacked (0: never).
    pub repack_below: f64,
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
    /// Packs whose live chunks were moved, and the new generations written for that.
    pub repacked: crate::repack::Repacked,
    /// Older manifest generations removed (their packs go once no generation lists them).
    pub generations_retired: u64,
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
    /// Concurrent commands kept naming what it meant to remove.
    #[error("running commands kept changing what may be removed; nothing was removed")]
    Unsettled,
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
    /// When it was stored, by the storage's clock (its first manifest's LastModified,
    /// carried into later generations as `stored_at`): orders the backups and dates them
    /// for the calendar rules; no host's clock does.
    time: SystemTime,
    /// The later of `time` and `stop_time`: for the window, whichever clock is ahead, so
    /// a backup never counts as older than it is.
    latest: SystemTime,
    /// Segment positions (the name's last 16 digits: log and segment, the same on every
    /// timeline) of its start and of the segment holding the byte before its stop.
    start_pos: String,
    stop_pos: String,
    /// Where it becomes consistent: which timelines a restore from it can follow.
    stop_timeline: u32,
    stop_lsn: Lsn,
    /// The packs every stored generation of its manifest lists.
    packs: Vec<String>,
    /// Its newest generation, and the packs that one lists.
    generation: u32,
    newest_packs: Vec<String>,
}

fn position(name: &str) -> Option<&str> {
    (name.len() >= 24 && name.as_bytes()[..24].iter().all(u8::is_ascii_hexdigit))
        .then(|| &name[8..24])
}

fn utc_date(secs: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.min(repo::manifest::STORED_AT_MAX));
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

/// The calendar period (its name) a time in Unix seconds falls in.
type BucketOf = fn(u64) -> String;

/// The timelines the policy must look after.
#[derive(Debug, Default)]
struct Timelines {
    /// The newest timeline holding WAL (where a restore goes by default, and where the
    /// server archives now).
    newest: Option<u32>,
    /// Timelines WAL was stored on within the window (by the storage's clock).
    in_window: Vec<u32>,
    /// Their histories; a timeline whose history is unknown counts as reached by every
    /// backup (so keeps more).
    histories: HashMap<u32, TimelineHistory>,
}

impl Timelines {
    fn reaches(&self, b: &Candidate, t: u32) -> bool {
        if t == 1 {
            return b.stop_timeline == 1;
        }
        self.histories
            .get(&t)
            .is_none_or(|h| h.descends_from(TimelineId(b.stop_timeline), b.stop_lsn))
    }
}

/// Which backups the policy keeps, and why: per candidate (sorted oldest first), its
/// reasons (none: it goes); and the index of the oldest backup whose WAL to the end of the
/// archive is kept. Pure: `now` is the storage's time.
fn decide(
    c: &[Candidate],
    p: &Policy,
    now: SystemTime,
    tl: &Timelines,
) -> (Vec<Vec<String>>, Option<usize>) {
    let n = c.len();
    let mut reasons = vec![Vec::<String>::new(); n];
    if let Some(k) = p.keep_last {
        for (rank, i) in (0..n).rev().take(k).enumerate() {
            reasons[i].push(format!("keep-last {}", rank + 1));
        }
    }
    let mut anchors = Vec::new();
    if let Some(d) = p.keep_within {
        let start = now.checked_sub(d).unwrap_or(UNIX_EPOCH);
        for i in 0..n {
            if c[i].latest > start {
                reasons[i].push("keep-within".into());
            }
        }
        // On every timeline written within the window, the newest backup that reaches it
        // at or before the window's start: a restore to the window's first moment there
        // replays from it.
        let timelines: Vec<Option<u32>> = if tl.in_window.is_empty() {
            vec![None]
        } else {
            tl.in_window.iter().copied().map(Some).collect()
        };
        for t in &timelines {
            let found = (0..n)
                .rev()
                .find(|&i| c[i].latest <= start && t.is_none_or(|t| tl.reaches(&c[i], t)));
            let Some(a) = found else { continue };
            let why = match t {
                Some(t) if timelines.len() > 1 => format!(
                    "keep-within (the newest backup at or before the window's start, on timeline {t})"
                ),
                _ => "keep-within (the newest backup at or before the window's start)".to_owned(),
            };
            if !reasons[a].contains(&why) {
                reasons[a].push(why);
            }
            anchors.push(a);
        }
    }
    let buckets: [(Option<usize>, &str, BucketOf); 3] = [
        (p.keep_daily, "keep-daily", utc_date),
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
    // Whatever the rules say, the newest backup a restore of the newest timeline can start
    // from stays (after a point-in-time restore onto a new timeline, the newest backups
    // may all lie on the abandoned one).
    let mut guard = None;
    if let Some(t) = tl.newest {
        if let Some(i) = (0..n).rev().find(|&i| tl.reaches(&c[i], t)) {
            if reasons[i].is_empty() {
                reasons[i].push(format!(
                    "the newest backup reaching timeline {t}, the newest"
                ));
            }
            guard = Some(i);
        }
        // Its history unknown (missing, damaged): any timeline's newest backup may be the
        // one that reaches it.
        if t > 1 && !tl.histories.contains_key(&t) {
            let mut seen = HashSet::new();
            for i in (0..n).rev() {
                if seen.insert(c[i].stop_timeline) {
                    if reasons[i].is_empty() {
                        reasons[i].push(format!(
                            "the newest backup of timeline {}, which may reach timeline {t} (its history is not readable)",
                            c[i].stop_timeline
                        ));
                    }
                    guard = Some(guard.map_or(i, |g: usize| g.min(i)));
                }
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
    let from = match (p.keep_within, anchors.iter().min()) {
        (Some(_), Some(&a)) => Some(a),
        _ => reasons.iter().position(|r| !r.is_empty()),
    };
    let from = match (from, guard) {
        (Some(f), Some(g)) => Some(f.min(g)),
        (f, g) => f.or(g),
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
    /// Packs to look at again for repacking (over the last run's limit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_repack: Vec<String>,
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
    packs: Vec<String>,
    seg: WalSegmentSize,
) -> Option<Candidate> {
    let stop = humantime::parse_rfc3339_weak(&m.stop_time).ok()?;
    let time = stored
        .or_else(|| {
            m.stored_at
                .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        })
        .unwrap_or(stop);
    Some(Candidate {
        id: m.id.clone(),
        stop_time: m.stop_time.clone(),
        time,
        latest: time.max(stop),
        start_pos: segment_pos(&m.start_lsn, m.timeline, seg, false)?,
        stop_pos: segment_pos(&m.stop_lsn, m.stop_timeline, seg, true)?,
        stop_timeline: m.stop_timeline,
        stop_lsn: m.stop_lsn.parse().ok()?,
        packs,
        generation: m.generation,
        newest_packs: m.packs.clone(),
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
    /// The earliest start (storage seconds) of a running writer (a backup writing packs
    /// and chunk table pieces, an expire writing repacked ones).
    writer_started: Option<u64>,
    /// The earliest start of any running command (one that began before a manifest
    /// generation's successor may still be reading it).
    any_started: Option<u64>,
}

impl Protected {
    fn merge(&mut self, o: Protected) {
        for (k, v) in o.backups {
            self.backups.entry(k).or_insert(v);
        }
        self.writing.extend(o.writing);
        if let Some(w) = o.wal_from {
            if self.wal_from.as_deref().is_none_or(|f| w.as_str() < f) {
                self.wal_from = Some(w);
            }
        }
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.writer_started = min(self.writer_started, o.writer_started);
        self.any_started = min(self.any_started, o.any_started);
    }
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
        // A marker whose start is not written yet (its first write) started about now.
        let s = b
            .started
            .unwrap_or_else(|| r.modified.map_or(0, unix_seconds));
        // A stream reads no manifest.
        if b.command != "stream" {
            p.any_started = Some(p.any_started.map_or(s, |w| w.min(s)));
        }
        // Commands that write objects no manifest lists yet: a backup (packs, pieces), an
        // expire or delete repacking (packs, a generation's pieces).
        if b.writing.is_some()
            || matches!(b.command.as_str(), "backup" | "expire" | "delete" | "copy")
        {
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
    tl: &Timelines,
) -> Result<Decision, ExpireError> {
    let (mut reasons, mut from) = match mode {
        Mode::Policy(p) => decide(c, p, now, tl),
        Mode::Delete { id, force } => {
            let mut r = vec![vec!["not named by delete".to_owned()]; c.len()];
            // A backup whose manifest a killed delete removed already: only its leftovers
            // go (see `run`).
            if let Some(i) = c.iter().position(|b| &b.id == id) {
                if c.len() == 1 && !force {
                    return Err(ExpireError::LastBackup(id.clone()));
                }
                if let Some(by) = prot.backups.get(id) {
                    return Err(ExpireError::InUse {
                        id: id.clone(),
                        by: by.clone(),
                    });
                }
                r[i].clear();
            }
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

/// The manifests stored: (backup id, generation) -> LastModified.
async fn manifests(
    storage: &dyn repo::storage::Storage,
) -> Result<BTreeMap<(String, u32), Option<SystemTime>>, StorageError> {
    Ok(list_all(storage, BACKUP_PREFIX)
        .await?
        .into_iter()
        .filter_map(|o| {
            let (id, g) = parse_manifest_key(&o.key)?;
            Some(((id.to_owned(), g), o.modified))
        })
        .collect())
}

fn manifest_failure(key: String, e: ManifestError) -> ExpireError {
    match e {
        ManifestError::Storage(e) | ManifestError::Object(ObjectError::Storage(e)) => {
            ExpireError::Unreadable(key, e.to_string())
        }
        e @ ManifestError::UnknownFormat { .. } => ExpireError::Unreadable(key, e.to_string()),
        e => ExpireError::Damaged(e.to_string()),
    }
}

/// Reads what expire decides from: every generation of each backup's manifest (without
/// its chunk table); `skip_unreadable` (a delete's backup) may be damaged. Also returns
/// which manifests were read.
async fn candidates(
    repo: &Repository,
    seg: WalSegmentSize,
    skip_unreadable: Option<&str>,
) -> Result<(Vec<Candidate>, HashMap<(String, u32), Vec<String>>), ExpireError> {
    let stored = manifests(repo.objects().storage().as_ref()).await?;
    let mut by_id: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (id, g) in stored.keys() {
        by_id.entry(id.clone()).or_default().push(*g);
    }
    let mut out = Vec::new();
    let mut read = HashMap::new();
    for (id, gens) in by_id {
        let mut packs: Vec<String> = Vec::new();
        let mut newest = None;
        let mut damaged = None;
        for &g in &gens {
            match BackupManifest::load_header_at(repo.objects(), &id, g).await {
                Ok(m) => {
                    packs.extend(m.packs.iter().cloned());
                    read.insert((id.clone(), g), m.packs.clone());
                    newest = Some(m);
                }
                // Removed since the listing (by a concurrent expire or delete).
                Err(ManifestError::Object(ObjectError::Storage(e))) if e.is_not_found() => {}
                Err(e) => damaged = Some(manifest_failure(manifest_key_at(&id, g), e)),
            }
        }
        if let Some(e) = damaged {
            if skip_unreadable != Some(id.as_str()) {
                return Err(e);
            }
            // `delete` of a damaged backup: what it referenced is found from the others.
            out.push(Candidate {
                id: id.clone(),
                stop_time: String::new(),
                time: UNIX_EPOCH,
                latest: UNIX_EPOCH,
                start_pos: String::new(),
                stop_pos: String::new(),
                stop_timeline: 0,
                stop_lsn: Lsn(0),
                packs: vec![],
                generation: 0,
                newest_packs: vec![],
            });
            continue;
        }
        let Some(m) = newest else { continue };
        packs.sort();
        packs.dedup();
        let first = stored.get(&(id.clone(), 1)).copied().flatten();
        let c = candidate(&m, first, packs, seg).ok_or_else(|| {
            ExpireError::Damaged(format!(
                "backup manifest \"{}\" has an unreadable stop time or LSN",
                manifest_key_at(&id, m.generation)
            ))
        })?;
        out.push(c);
    }
    out.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)));
    Ok((out, read))
}

/// Which timelines hold WAL, which were written within the window, and their histories.
async fn timelines(
    repo: &Repository,
    window_start: Option<SystemTime>,
    wal: impl Iterator<Item = &ObjectMeta>,
) -> Result<Timelines, ExpireError> {
    let mut tl = Timelines::default();
    let mut in_window = std::collections::BTreeSet::new();
    for o in wal {
        if o.key.starts_with("wal/history/") {
            continue;
        }
        let name = if o.key.starts_with("stream/") {
            o.key.split('/').nth(2).unwrap_or("")
        } else {
            o.key.rsplit('/').next().unwrap_or("")
        };
        if position(name).is_none() {
            continue;
        }
        let Ok(t) = u32::from_str_radix(&name[..8], 16) else {
            continue;
        };
        tl.newest = Some(tl.newest.map_or(t, |n| n.max(t)));
        if let Some(ws) = window_start {
            if o.modified.is_none_or(|m| m >= ws) {
                in_window.insert(t);
            }
        }
    }
    tl.in_window = in_window.into_iter().collect();
    let mut wanted: Vec<u32> = tl.in_window.clone();
    wanted.extend(tl.newest);
    for t in wanted {
        if t <= 1 || tl.histories.contains_key(&t) {
            continue;
        }
        let name = TimelineId(t).history_file_name();
        let key = repo::keys::wal_key(&name).unwrap_or_default();
        match repo.objects().get_at_most(&key, 1 << 20).await {
            Ok((_, text)) => {
                if let Ok(h) = TimelineHistory::parse(TimelineId(t), &text) {
                    tl.histories.insert(t, h);
                }
            }
            Err(e) if e.is_not_found() => {}
            Err(ObjectError::Storage(e)) => return Err(e.into()),
            // A damaged history: unknown, so every backup counts as reaching it.
            Err(_) => {}
        }
    }
    Ok(tl)
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
/// steps (batches of deletions, objects repacking wrote); `PITR_DEBUG_EXPIRE_BATCH=N`
/// deletes N keys per batch (default 1000), so that every deletion can be a stopping point.
fn stop_point() -> Option<u64> {
    std::env::var("PITR_DEBUG_EXPIRE_STOP").ok()?.parse().ok()
}

static STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One step of expire's changes done (a batch of deletions, an object repacking wrote):
/// with `PITR_DEBUG_EXPIRE_STOP=N`, the Nth ends the process as a SIGKILL would.
pub(crate) fn step() {
    let n = STEPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    if stop_point() == Some(n) {
        let me = rustix::process::getpid();
        let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
    }
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
    marker: Option<&'a Marker>,
}

impl Deleter<'_> {
    /// Deletes `objects` (with `--dry-run`, no marker: only counts them).
    async fn delete(
        &mut self,
        objects: &[ObjectMeta],
        removed: &mut Removed,
    ) -> Result<(), ExpireError> {
        for batch in objects.chunks(batch_size()) {
            if let Some(marker) = self.marker {
                if marker.lapsed() {
                    return Err(ExpireError::Lapsed);
                }
                let keys: Vec<String> = batch.iter().map(|o| o.key.clone()).collect();
                self.repo.objects().storage().delete(&keys).await?;
                step();
            }
            removed.bytes += batch.iter().map(|o| o.size).sum::<u64>();
        }
        Ok(())
    }
}

/// Runs expire (or delete) on `repo`. With `--dry-run` nothing is written, not even a
/// marker: "now" is this host's clock then.
pub async fn expire(repo: &Repository, options: &ExpireOptions) -> Result<Report, ExpireError> {
    let began = Instant::now();
    let seg = WalSegmentSize::new(repo.config().wal_segment_size)
        .map_err(|e| ExpireError::Unreadable("config".into(), e.to_string()))?;
    let objects = repo.objects();
    let command = match options.mode {
        Mode::Policy(_) => "expire",
        Mode::Delete { .. } => "delete",
    };
    let marker = if options.dry_run {
        None
    } else {
        Some(
            Marker::start(objects, MarkerBody::new(command))
                .await
                .map_err(|e| {
                    ExpireError::Unreadable(markers::RUNNING_PREFIX.into(), e.to_string())
                })?,
        )
    };
    let now = marker.as_ref().map_or_else(SystemTime::now, Marker::now);
    let result = run(repo, options, seg, marker.as_ref(), now).await;
    if let Some(m) = marker {
        m.finish().await;
    }
    let mut report = result?;
    report.seconds = began.elapsed().as_secs_f64();
    Ok(report)
}

async fn run(
    repo: &Repository,
    options: &ExpireOptions,
    seg: WalSegmentSize,
    marker: Option<&Marker>,
    now: SystemTime,
) -> Result<Report, ExpireError> {
    let objects = repo.objects();
    let storage = objects.storage().clone();
    let own = marker.map_or("", Marker::key);
    // The markers first: a command that ends before the manifests are read has left its
    // manifest there; one still running is seen here.
    let mut found = markers::live(objects, now).await?;
    let mut prot = protected(&found, own)?;
    let skip = match &options.mode {
        Mode::Delete { id, .. } => Some(id.as_str()),
        Mode::Policy(_) => None,
    };
    let (c, mut read) = candidates(repo, seg, skip).await?;
    // `delete` of a backup that has no manifest (a killed delete removed it): its leftovers.
    let mut leftover_of = None;
    if let Mode::Delete { id, .. } = &options.mode {
        if !c.iter().any(|b| &b.id == id) {
            let page = storage
                .list_page(&format!("{BACKUP_PREFIX}{id}/"), None)
                .await?;
            if page.objects.is_empty() {
                return Err(ExpireError::NoBackup(id.clone()));
            }
            leftover_of = Some(id.clone());
        }
    }
    let window_start = match &options.mode {
        Mode::Policy(p) => p
            .keep_within
            .map(|d| now.checked_sub(d).unwrap_or(UNIX_EPOCH)),
        Mode::Delete { .. } => None,
    };
    // The WAL and streamed pieces, listed once: for the timelines, and for what goes in
    // step 4 (what is stored after this listing is newer, and never goes).
    let wal_listing = list_all(storage.as_ref(), "wal/").await?;
    let pieces_listing = list_all(storage.as_ref(), "stream/").await?;
    let tl = timelines(
        repo,
        window_start,
        wal_listing.iter().chain(pieces_listing.iter()),
    )
    .await?;
    let mut d = decision(&c, &options.mode, now, &prot, &tl)?;

    // Say what goes in the marker, then look at the markers again: a command that wrote
    // its marker before ours was written is seen now and what it names is spared; one
    // that writes after sees ours and stays away from what it names. Protection only
    // grows, so the decision settles; one that does not settle in a few rounds stops.
    if let Some(marker) = marker {
        let mut settled = false;
        for _ in 0..5 {
            let condemned = d.condemned.clone();
            marker
                .update(|b| b.condemned = condemned)
                .await
                .map_err(|e| ExpireError::Unreadable(marker.key().into(), e.to_string()))?;
            found = markers::live(objects, now).await?;
            prot.merge(protected(&found, own)?);
            let again = decision(&c, &options.mode, now, &prot, &tl)?;
            let same = again.condemned == d.condemned && again.wal.from == d.wal.from;
            d = again;
            if same {
                settled = true;
                break;
            }
        }
        if !settled {
            return Err(ExpireError::Unsettled);
        }
    }

    let mut report = Report {
        dry_run: options.dry_run,
        backups: d.backups.clone(),
        wal_kept_from: d.wal.from.clone(),
        ..Report::default()
    };
    let mut del = Deleter { repo, marker };
    let mut removed = Removed::default();

    // 1. Manifests, every generation: a backup ceases to exist before anything it names
    // goes.
    let condemned: HashSet<&str> = d.condemned.iter().map(String::as_str).collect();
    let listing = list_all(storage.as_ref(), BACKUP_PREFIX).await?;
    let doomed: Vec<ObjectMeta> = listing
        .iter()
        .filter(|o| parse_manifest_key(&o.key).is_some_and(|(id, _)| condemned.contains(id)))
        .cloned()
        .collect();
    del.delete(&doomed, &mut removed).await?;
    removed.backups = d.condemned.len() as u64;

    // Repack: the packs the expired backups listed that kept ones list too lost live
    // chunks; with those a previous run left for later, the ones kept backups use less
    // than `repack_below` of have their live chunks moved and the kept backups a new
    // generation (the old one and the old packs go below, once nothing may read them).
    let previous = WalRetention::load(repo).await.unwrap_or_default();
    if options.repack_below > 0.0 {
        let kept: Vec<crate::repack::KeptBackup> = c
            .iter()
            .filter(|b| !condemned.contains(b.id.as_str()) && b.generation > 0)
            .map(|b| crate::repack::KeptBackup {
                id: b.id.clone(),
                generation: b.generation,
                packs: b.newest_packs.clone(),
                stored_at: unix_seconds(b.time),
            })
            .collect();
        let live: HashSet<&str> = kept
            .iter()
            .flat_map(|k| k.packs.iter().map(String::as_str))
            .collect();
        // The packs expired backups listed, those the last run left for later, and those an
        // older generation of a kept backup lists but its newest does not (a repack killed
        // before it rewrote every backup using them).
        let moved_out = c
            .iter()
            .filter(|b| !condemned.contains(b.id.as_str()))
            .flat_map(|b| {
                b.packs
                    .iter()
                    .filter(|p| !b.newest_packs.contains(p))
                    .map(String::as_str)
            });
        let mut wanted: Vec<&str> = c
            .iter()
            .filter(|b| condemned.contains(b.id.as_str()))
            .flat_map(|b| b.packs.iter().map(String::as_str))
            .chain(previous.pending_repack.iter().map(String::as_str))
            .chain(moved_out)
            .filter(|p| live.contains(p))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let wanted: HashSet<&str> = wanted.into_iter().collect();
        let sizes: Vec<(String, u64)> = list_all(storage.as_ref(), "pack/")
            .await?
            .into_iter()
            .filter_map(|o| {
                let id = o.key.rsplit('/').next()?.to_owned();
                wanted.contains(id.as_str()).then_some((id, o.size))
            })
            .collect();
        report.repacked = crate::repack::repack(repo, &kept, &sizes, options.repack_below, marker)
            .await
            .map_err(|e| ExpireError::Unreadable("packs to repack".into(), e.0))?;
    }
    // Older generations go once no running command that started before their successor
    // was stored may be reading them (the markers looked at again, by the storage's time).
    if let Some(marker) = marker {
        let now = marker
            .storage_now()
            .await
            .map_err(|e| ExpireError::Unreadable(marker.key().into(), e.to_string()))?;
        prot.merge(protected(&markers::live(objects, now).await?, own)?);
        let mut gens: BTreeMap<String, Vec<(u32, Option<SystemTime>)>> = BTreeMap::new();
        for ((id, g), modified) in manifests(storage.as_ref()).await? {
            if !condemned.contains(id.as_str()) {
                gens.entry(id).or_default().push((g, modified));
            }
        }
        let mut retired = Vec::new();
        for (id, list) in gens {
            if prot.backups.contains_key(&id) {
                continue;
            }
            let Some(&(newest, successor)) = list.last() else {
                continue;
            };
            if list.len() < 2 {
                continue;
            }
            // No running command may have started reading before the newest generation
            // was visible (a minute's margin: a large manifest becomes visible some time
            // after its LastModified), and the newest is whole: its chunk table as its
            // manifest says and every pack it lists there. Then every older one goes.
            let unread = successor.is_some_and(|s| {
                prot.any_started
                    .is_none_or(|a| a > unix_seconds(s).saturating_add(RETIRE_MARGIN))
            });
            if !unread || !generation_whole(repo, &id, newest).await? {
                continue;
            }
            for &(g, _) in &list[..list.len() - 1] {
                retired.push(ObjectMeta {
                    key: manifest_key_at(&id, g),
                    size: 0,
                    modified: None,
                });
            }
        }
        report.generations_retired = retired.len() as u64;
        del.delete(&retired, &mut removed).await?;
    }

    // 2. What lies under backups without a manifest (those just expired, leftovers of
    // backups that never finished unless one is still being written), and chunk table
    // pieces of a generation without a manifest (a repack that never finished).
    let listing = list_all(storage.as_ref(), BACKUP_PREFIX).await?;
    let mut generations: HashSet<(String, u32)> = HashSet::new();
    for o in &listing {
        if let Some((id, g)) = parse_manifest_key(&o.key) {
            if !condemned.contains(id) {
                generations.insert((id.to_owned(), g));
            }
        }
    }
    let has_manifest: HashSet<&str> = generations.iter().map(|(id, _)| id.as_str()).collect();
    let mut leftovers = Vec::new();
    for o in listing {
        let Some((id, rest)) = o
            .key
            .strip_prefix(BACKUP_PREFIX)
            .and_then(|k| k.split_once('/'))
        else {
            continue;
        };
        if parse_manifest_key(&o.key).is_some() {
            continue;
        }
        let (id, rest) = (id.to_owned(), rest.to_owned());
        let expired = condemned.contains(id.as_str()) || leftover_of.as_deref() == Some(&id);
        let belongs = has_manifest.contains(id.as_str())
            && match piece_generation(&rest) {
                Some(g) => generations.contains(&(id.clone(), g)),
                None => true,
            };
        if expired && !prot.writing.contains(&id) {
            leftovers.push(o);
        } else if belongs || prot.writing.contains(&id) {
            continue;
        } else if old_enough(o.modified, now, options.grace, &prot) {
            leftovers.push(o);
        } else {
            report.deferred += 1;
        }
    }
    removed.backup_objects = leftovers.len() as u64;
    del.delete(&leftovers, &mut removed).await?;

    // 3. Packs no remaining manifest lists: any generation stored now (the manifests are
    // listed again: a backup that finished meanwhile lists its new packs and its base's).
    let mut referenced: HashSet<String> = HashSet::new();
    for ((id, g), _) in manifests(storage.as_ref()).await? {
        if condemned.contains(id.as_str()) {
            continue;
        }
        if let Some(p) = read.get(&(id.clone(), g)) {
            referenced.extend(p.iter().cloned());
            continue;
        }
        match BackupManifest::load_header_at(objects, &id, g).await {
            Ok(m) => {
                referenced.extend(m.packs.iter().cloned());
                read.insert((id, g), m.packs);
            }
            Err(ManifestError::Object(ObjectError::Storage(e))) if e.is_not_found() => {}
            Err(e) => return Err(manifest_failure(manifest_key_at(&id, g), e)),
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
    // WAL, not lost WAL), then remove the WAL no kept backup needs, in key order (oldest
    // first on each timeline, so what remains of one is a run to its end), streamed
    // pieces with it. History files stay: they are small and say how timelines descend.
    if let (Some(from), Some(_)) = (&d.wal.from, marker) {
        let record = WalRetention {
            wal_kept_from: from.clone(),
            ranges: d.wal.ranges.clone(),
            pending_repack: report.repacked.pending.clone(),
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
    for o in wal_listing {
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
    for o in pieces_listing {
        let name = o.key.split('/').nth(2).unwrap_or("");
        if position(name).is_some_and(|p| !d.wal.keeps(p)) {
            pieces.push(o);
        }
    }
    removed.stream_pieces = pieces.len() as u64;
    del.delete(&pieces, &mut removed).await?;

    // 5. Markers of commands long gone, judged again by the storage's time now.
    if let Some(marker) = marker {
        let now = marker
            .storage_now()
            .await
            .map_err(|e| ExpireError::Unreadable(marker.key().into(), e.to_string()))?;
        let dead: Vec<ObjectMeta> = markers::live(objects, now)
            .await?
            .dead
            .into_iter()
            .map(|key| ObjectMeta {
                key,
                size: 0,
                modified: None,
            })
            .collect();
        removed.markers = dead.len() as u64;
        del.delete(&dead, &mut removed).await?;
    }

    report.removed = removed;
    Ok(report)
}

/// Seconds after a generation's LastModified during which a command that started may still
/// have listed only the generation before it.
const RETIRE_MARGIN: u64 = 60;

/// Whether generation `g` of backup `id` is whole: its manifest reads, its chunk table
/// pieces are there with the hashes it names and agree with it, and every pack it lists is
/// stored. Only then do older generations go.
async fn generation_whole(repo: &Repository, id: &str, g: u32) -> Result<bool, ExpireError> {
    let objects = repo.objects();
    let m = match BackupManifest::load_header_at(objects, id, g).await {
        Ok(m) => m,
        Err(ManifestError::Storage(e) | ManifestError::Object(ObjectError::Storage(e)))
            if !e.is_not_found() =>
        {
            return Err(e.into())
        }
        Err(_) => return Ok(false),
    };
    // A piece at a time: memory stays bounded by a piece.
    let mut table = repo::manifest::TableReader::new(objects.clone(), &m);
    for i in 0..m.chunk_table.count {
        match table.get(i).await {
            Ok(Some(e)) if e.pack() < m.packs.len() => {}
            Ok(_) => return Ok(false),
            Err(ManifestError::Storage(e) | ManifestError::Object(ObjectError::Storage(e)))
                if !e.is_not_found() =>
            {
                return Err(e.into())
            }
            Err(_) => return Ok(false),
        }
    }
    for p in &m.packs {
        if !is_pack_id(p)
            || objects
                .storage()
                .head(&repo::pack::pack_key(p))
                .await?
                .is_none()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The generation whose chunk table a key under `backup/<id>/` belongs to: `chunks/…` the
/// first, `chunks.<g>/…` later ones; None for anything else (PostgreSQL's backup_manifest).
pub(crate) fn piece_generation(rest: &str) -> Option<u32> {
    let (dir, _) = rest.split_once('/')?;
    if dir == "chunks" {
        return Some(1);
    }
    let digits = dir.strip_prefix("chunks.")?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
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
            stop_timeline: 1,
            stop_lsn: Lsn(stop << 24),
            packs: vec![],
            generation: 1,
            newest_packs: vec![],
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
        let (r, from) = decide(
            &c,
            &p,
            UNIX_EPOCH + Duration::from_secs(T0 + 5 * 3600),
            &Timelines::default(),
        );
        assert_eq!(kept(&r), vec![false, false, true, true]);
        assert_eq!(from, Some(2));
        let d = decision(
            &c,
            &Mode::Policy(p),
            UNIX_EPOCH,
            &Protected::default(),
            &Timelines::default(),
        )
        .unwrap();
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
        let (r, from) = decide(&c, &p, now, &Timelines::default());
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
        let (r, from) = decide(&c, &p, now, &Timelines::default());
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
        let d = decision(
            &c,
            &Mode::Policy(p),
            now,
            &Protected::default(),
            &Timelines::default(),
        )
        .unwrap();
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
        let d = decision(&c, &Mode::Policy(p), now, &prot, &Timelines::default()).unwrap();
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
            decision(
                &one,
                &m,
                UNIX_EPOCH,
                &Protected::default(),
                &Timelines::default()
            ),
            Err(ExpireError::LastBackup(_))
        ));
        let forced = Mode::Delete {
            id: "B0".into(),
            force: true,
        };
        let d = decision(
            &one,
            &forced,
            UNIX_EPOCH,
            &Protected::default(),
            &Timelines::default(),
        )
        .unwrap();
        assert_eq!(d.condemned, vec!["B0"]);
        assert!(d.wal.from.is_none(), "with no backup left, all WAL stays");
        let two = vec![cand("B0", T0, 0, 1), cand("B1", T0 + 1, 5, 6)];
        let mut prot = Protected::default();
        prot.backups.insert("B0".into(), "restore".into());
        assert!(matches!(
            decision(&two, &m, UNIX_EPOCH, &prot, &Timelines::default()),
            Err(ExpireError::InUse { .. })
        ));
        let d = decision(
            &two,
            &m,
            UNIX_EPOCH,
            &Protected::default(),
            &Timelines::default(),
        )
        .unwrap();
        assert_eq!(d.wal.from.as_deref(), Some("0000000000000005"));
        // An id without a manifest (its leftovers, see `run`): every backup stays.
        let d = decision(
            &two,
            &Mode::Delete {
                id: "B9".into(),
                force: false,
            },
            UNIX_EPOCH,
            &Protected::default(),
            &Timelines::default(),
        )
        .unwrap();
        assert!(d.condemned.is_empty());
    }

    #[test]
    fn a_new_timeline_keeps_the_backups_that_reach_it() {
        // B1 on timeline 1; a restore from it to 0x30 made timeline 2; B2 was taken on
        // timeline 1 after that point (on the abandoned branch), B3 not yet.
        let mut b1 = cand("B1", T0, 0x10, 0x11);
        b1.stop_lsn = Lsn(0x11 << 24);
        let mut b2 = cand("B2", T0 + DAY, 0x90, 0x91);
        b2.stop_lsn = Lsn(0x91 << 24);
        let c = vec![b1, b2];
        let history = TimelineHistory::parse(TimelineId(2), b"1\t0/30000000\tpoint\n").unwrap();
        let mut tl = Timelines {
            newest: Some(2),
            in_window: vec![2],
            histories: HashMap::new(),
        };
        tl.histories.insert(2, history);
        assert!(tl.reaches(&c[0], 2) && !tl.reaches(&c[1], 2));
        // keep-last 1 alone would keep only B2: the newest timeline keeps B1, and its WAL.
        let p = Policy {
            keep_last: Some(1),
            min_backups: 1,
            ..Policy::default()
        };
        let now = UNIX_EPOCH + Duration::from_secs(T0 + 2 * DAY);
        let d = decision(&c, &Mode::Policy(p), now, &Protected::default(), &tl).unwrap();
        assert!(d.condemned.is_empty(), "{:?}", d.backups);
        assert!(
            d.backups[0].reasons[0].contains("timeline 2"),
            "{:?}",
            d.backups
        );
        assert_eq!(d.wal.from.as_deref(), Some("0000000000000010"));
        // A window on timeline 2 starting after B2: B1 is what reaches the window there.
        let p = Policy {
            keep_within: Some(Duration::from_secs(DAY / 2)),
            min_backups: 1,
            ..Policy::default()
        };
        let (r, from) = decide(&c, &p, now, &tl);
        assert!(r[0].iter().any(|x| x.contains("window")), "{r:?}");
        assert_eq!(from, Some(0));
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
