//! Before a restore writes anything: which backup to restore, and proof that the repository
//! holds continuous WAL from that backup to the target, on the target's timeline. Segment
//! summaries (computed from the segment where one is missing) tell where transactions and
//! restore points are, so an unreachable target is refused with what is reachable instead.

use std::collections::{BTreeSet, HashMap};

use futures::{StreamExt, TryStreamExt};
use repo::keys::{summary_key, wal_key};
use repo::manifest::{list_backups, BackupManifest, ManifestError};
use repo::objects::ObjectError;
use repo::repository::Repository;
use repo::storage::{list_all, StorageError};
use serde::Deserialize;
use walfmt::{Lsn, SegmentName, TimelineHistory, TimelineId, WalSegmentSize};

use crate::target::Target;

/// Which timeline to recover along.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimelineChoice {
    /// The newest timeline in the repository (PostgreSQL's default).
    Latest,
    /// The backup's own timeline.
    Current,
    /// This one.
    Id(u32),
}

/// What the restore will do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The backup to restore: its manifest without the chunk table (`chunks` is empty; a
    /// restore reads the table a piece at a time).
    pub backup: std::sync::Arc<BackupManifest>,
    /// The timeline recovery ends on.
    pub timeline: u32,
    /// The first and last segment recovery needs.
    pub first_segment: String,
    /// See `first_segment`.
    pub last_segment: String,
    /// Segments from first to last.
    pub segments: u64,
    /// Their names, in replay order, as the repository holds them (when recovery reads
    /// them from the archive).
    pub wal: Vec<String>,
    /// The latest transaction time in that WAL, if any.
    pub last_xact_time: Option<String>,
    /// When recovery replays to the end of the WAL and the repository holds WAL of the
    /// timeline beyond a missing segment: (the missing segment, the newest one after it).
    /// That WAL cannot be replayed; recovery stops before the missing segment.
    pub stranded: Option<(String, String)>,
    /// The timelines with a history file in the repository, ascending.
    pub histories: Vec<u32>,
    /// The history file of `timeline`, as read (None on timeline 1).
    pub history_file: Option<Vec<u8>>,
}

/// Why no restore can reach the target; nothing has been written.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Listing or reading failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An object could not be read or is damaged.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// A manifest could not be read.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// No backup fits.
    #[error("{0}")]
    NoBackup(String),
    /// The target is out of reach.
    #[error("{message}")]
    Unreachable {
        /// What is wrong.
        message: String,
        /// What is reachable.
        hint: String,
    },
    /// Something stored does not parse.
    #[error("{0}")]
    Bad(String),
}

impl PlanError {
    /// What the operator can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            PlanError::Unreachable { hint, .. } => Some(hint.clone()),
            PlanError::NoBackup(_) => {
                Some("pitr list shows the backups and the WAL the repository holds".into())
            }
            _ => None,
        }
    }
}

/// The parts of a segment summary a restore needs (docs/FORMAT.md, "Segment summaries").
#[derive(Debug, Clone, Deserialize)]
struct Summary {
    end_lsn: String,
    #[serde(default)]
    first_xact_time: Option<String>,
    #[serde(default)]
    last_xact_time: Option<String>,
    #[serde(default)]
    restore_points: Vec<RestorePointJson>,
}

#[derive(Debug, Clone, Deserialize)]
struct RestorePointJson {
    name: String,
    lsn: String,
}

fn bad(what: impl std::fmt::Display) -> PlanError {
    PlanError::Bad(what.to_string())
}

/// The time of the newest commit (or abort) in `wal` (segment file names in order), looking back from
/// the last segment through at most `look_back` of them for one holding a commit (the last
/// segments often hold none: a switch, a checkpoint). None if none of them does, or their
/// summaries cannot be read.
pub async fn newest_commit(
    repo: &Repository,
    wal: &[String],
    look_back: usize,
) -> Option<walfmt::PgTimestamp> {
    let seg = WalSegmentSize::new(repo.config().wal_segment_size).ok()?;
    for file in wal.iter().rev().take(look_back) {
        let name = SegmentName::parse(file, seg).ok()?;
        if let Some(t) = summary_of(repo, &name).await.ok()?.last_xact_time {
            return crate::target::parse_time(&t).ok();
        }
    }
    None
}

async fn summary_of(repo: &Repository, name: &SegmentName) -> Result<Summary, PlanError> {
    let file = name.to_string();
    let key = summary_key(&file).unwrap_or_default();
    let max = crate::wal_fetch::wal_file_max(repo);
    match repo.objects().get_at_most(&key, max).await {
        Ok((_, plain)) => serde_json::from_slice(&plain).map_err(|e| bad(format!("{key}: {e}"))),
        Err(e) if e.is_not_found() => {
            // Archived, but its summary was never written (or not whole yet: the segment
            // `pitr stream` is writing): read the segment itself.
            let bytes = segment_bytes(repo, &file).await?;
            // Decoding a whole segment is CPU work: off the async runtime.
            let s = tokio::task::spawn_blocking(move || walfmt::summarize(&bytes))
                .await
                .map_err(bad)?
                .map_err(|e| bad(format!("{}: {e}", wal_key(&file).unwrap_or_default())))?;
            Ok(Summary {
                end_lsn: s.end_lsn.to_string(),
                first_xact_time: s.first_xact_time.map(|t| t.to_string()),
                last_xact_time: s.last_xact_time.map(|t| t.to_string()),
                restore_points: s
                    .restore_points
                    .iter()
                    .map(|r| RestorePointJson {
                        name: r.name.clone(),
                        lsn: r.lsn.to_string(),
                    })
                    .collect(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn lsn(text: &str) -> Result<Lsn, PlanError> {
    text.parse()
        .map_err(|_| bad(format!("invalid LSN {text:?} in the repository")))
}

/// Segments looked at before a backup's start for the last transaction before it.
const WITNESS_SEGMENTS: u64 = 64;

/// Whether backup `b` can be recovered to time `t`: recovery stops at the first transaction
/// (in WAL order) that ended past `t` (at or past it with `exclusive`), so none may lie
/// before the backup is consistent. Between its start and stop that is checked record by
/// record (segments whose summary has a transaction past `t` are read); before its start,
/// every transaction must have ended at or before `t`, which (commit times following WAL
/// order, as the server's clock does) one transaction shows: one at or after the start
/// that ended at or before `t`, or else the latest before the start, found in the
/// repository's WAL within [`WITNESS_SEGMENTS`] segments. With none found, it cannot be
/// shown, and the backup is not used. Nothing here reads a clock.
async fn reaches_time(
    repo: &Repository,
    b: &BackupManifest,
    present: &dyn Fn(u64) -> bool,
    tli_for: &dyn Fn(u64) -> u32,
    seg: WalSegmentSize,
    t: walfmt::PgTimestamp,
    exclusive: bool,
) -> Result<bool, PlanError> {
    let is_past = move |x: walfmt::PgTimestamp| if exclusive { x >= t } else { x > t };
    let text = t.to_string();
    let past_text = |x: &str| {
        if exclusive {
            x >= text.as_str()
        } else {
            x > text.as_str()
        }
    };
    let (start, stop) = (lsn(&b.start_lsn)?, lsn(&b.stop_lsn)?);
    let name = |s: u64| SegmentName::new(TimelineId(tli_for(s)), s, seg);
    let first = start.segment_number(seg);
    let last = Lsn(stop.0.saturating_sub(1)).segment_number(seg);
    // Transactions before `start` must all have ended at or before `t`. Commit times
    // follow WAL order as the server's clock does, so either is enough: one at or after
    // `start` that ended at or before `t` (`witness`), or the latest before `start`
    // (`before`: the most recent time among the start segment's records before it, else
    // the last segment before it holding any).
    let mut before: Option<walfmt::PgTimestamp> = None;
    let mut witness = false;
    for s in first..=last {
        if !present(s) {
            return Ok(false);
        }
        let summary = summary_of(repo, &name(s)).await?;
        let needs_records = s == first || summary.last_xact_time.as_deref().is_some_and(past_text);
        if !needs_records {
            witness |= summary
                .first_xact_time
                .as_deref()
                .is_some_and(|x| !past_text(x));
            continue;
        }
        let bytes = segment_bytes(repo, &name(s).to_string()).await?;
        // Decoding a segment is CPU work: off the async runtime.
        let shown = name(s).to_string();
        let (seg_before, hit, seg_witness) = tokio::task::spawn_blocking(move || {
            let (mut before, mut hit, mut witness) = (None::<walfmt::PgTimestamp>, false, false);
            walfmt::summary::summarize_with(&bytes, |record, event| {
                if let Some(walfmt::Event::XactEnd { time, .. }) = event {
                    if record.lsn < start {
                        before = Some(before.map_or(*time, |b| b.max(*time)));
                    } else if record.lsn < stop && is_past(*time) {
                        hit = true;
                    } else if !is_past(*time) {
                        witness = true;
                    }
                }
            })
            .map(|_| (before, hit, witness))
        })
        .await
        .map_err(bad)?
        .map_err(|e| bad(format!("WAL segment {shown}: {e}")))?;
        if seg_before.is_some() {
            before = seg_before;
        }
        witness |= seg_witness;
        if hit {
            return Ok(false);
        }
    }
    if witness {
        return Ok(true);
    }
    if let Some(x) = before {
        return Ok(!is_past(x));
    }
    // After the stop: the first segment holding transactions (a quiet cluster's backup
    // starts in a fresh segment, with none before it).
    let mut s = last;
    while s - last < WITNESS_SEGMENTS {
        s += 1;
        if !present(s) {
            break;
        }
        let summary = summary_of(repo, &name(s)).await?;
        if let Some(x) = summary.first_xact_time {
            if !past_text(&x) {
                return Ok(true);
            }
            break;
        }
    }
    // Before the start: the last segment holding transactions.
    let mut s = first;
    while s > 0 && first - s < WITNESS_SEGMENTS {
        s -= 1;
        if !present(s) {
            break;
        }
        let summary = summary_of(repo, &name(s)).await?;
        if let Some(x) = summary.last_xact_time {
            return Ok(!past_text(&x));
        }
    }
    Ok(false)
}

/// A WAL segment's bytes: archived whole, or what `pitr stream` made durable of it.
async fn segment_bytes(repo: &Repository, file: &str) -> Result<bytes::Bytes, PlanError> {
    let key = wal_key(file).unwrap_or_default();
    match repo
        .objects()
        .get_at_most(&key, crate::wal_fetch::wal_file_max(repo))
        .await
    {
        Ok((_, b)) => Ok(b),
        Err(e) if e.is_not_found() => match crate::wal_fetch::streamed_segment(repo, file).await {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(bad(format!("WAL segment {file} is not in the repository"))),
            Err(crate::wal_fetch::FetchError::Object(o)) => Err(o.into()),
            Err(e) => Err(bad(e)),
        },
        Err(e) => Err(e.into()),
    }
}

/// What the repository holds of the WAL.
struct Inventory {
    segments: BTreeSet<(u32, u64)>,
    histories: BTreeSet<u32>,
}

async fn inventory(repo: &Repository, seg: WalSegmentSize) -> Result<Inventory, PlanError> {
    let mut inv = Inventory {
        segments: BTreeSet::new(),
        histories: BTreeSet::new(),
    };
    // Segments `pitr stream` is still writing count from their first piece at offset 0.
    for name in repo::pieces::streamed_segments(repo.objects().storage().as_ref(), "stream/")
        .await?
        .into_keys()
    {
        if let Ok(s) = SegmentName::parse(&name, seg) {
            inv.segments.insert((s.timeline.0, s.segno));
        }
    }
    for o in list_all(repo.objects().storage().as_ref(), "wal/").await? {
        let name = o.key.rsplit('/').next().unwrap_or("");
        if let Ok(s) = SegmentName::parse(name, seg) {
            inv.segments.insert((s.timeline.0, s.segno));
        } else if let Some(t) = name.strip_suffix(".history") {
            if let Ok(t) = u32::from_str_radix(t, 16) {
                inv.histories.insert(t);
            }
        }
    }
    Ok(inv)
}

/// Timeline `tli`'s history, and the file's bytes (None for timeline 1, which has none).
async fn history(
    repo: &Repository,
    tli: u32,
) -> Result<(TimelineHistory, Option<Vec<u8>>), PlanError> {
    if tli == 1 {
        return Ok((TimelineHistory::root(TimelineId(1)), None));
    }
    let name = TimelineId(tli).history_file_name();
    let key = wal_key(&name).unwrap_or_default();
    match repo
        .objects()
        .get_at_most(&key, crate::wal_fetch::wal_file_max(repo))
        .await
    {
        Ok((_, text)) => {
            let parsed = TimelineHistory::parse(TimelineId(tli), &text).map_err(bad)?;
            Ok((parsed, Some(text.to_vec())))
        }
        Err(e) if e.is_not_found() => Err(PlanError::Unreachable {
            message: format!("timeline {tli} has no history file ({name}) in the repository"),
            hint: "choose a timeline the repository holds (--target-timeline), see pitr list"
                .into(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Chooses the backup and checks the WAL for a restore to `target`.
pub async fn plan(
    repo: &Repository,
    target: &Target,
    exclusive: bool,
    timeline: &TimelineChoice,
    backup: Option<&str>,
) -> Result<Plan, PlanError> {
    let seg = WalSegmentSize::new(repo.config().wal_segment_size).map_err(bad)?;
    let ids = list_backups(repo.objects().storage().as_ref()).await?;
    if ids.is_empty() {
        return Err(PlanError::NoBackup("the repository holds no backup".into()));
    }
    let chosen_ids: Vec<String> = match backup {
        None | Some("latest") => ids.clone(),
        Some(id) if ids.iter().any(|i| i == id) => vec![id.to_owned()],
        Some(id) => {
            return Err(PlanError::NoBackup(format!(
                "backup {id} is not in the repository"
            )))
        }
    };
    let mut backups: Vec<BackupManifest> = futures::stream::iter(chosen_ids)
        .map(|id| async move { BackupManifest::load_header(repo.objects(), &id).await })
        .buffered(8)
        .try_collect()
        .await?;
    // Oldest first by where they stop in the WAL: ids are the backup host's clock, which
    // may be wrong; positions are not.
    let mut keyed = Vec::with_capacity(backups.len());
    for b in backups.drain(..) {
        keyed.push(((lsn(&b.stop_lsn)?, lsn(&b.start_lsn)?), b));
    }
    keyed.sort_by_key(|(k, _)| *k);
    let backups: Vec<BackupManifest> = keyed.into_iter().map(|(_, b)| b).collect();
    let inv = inventory(repo, seg).await?;
    let tli = match timeline {
        TimelineChoice::Id(n) => *n,
        TimelineChoice::Current => backups.last().map_or(1, |b| b.timeline),
        TimelineChoice::Latest => inv
            .histories
            .iter()
            .copied()
            .chain(inv.segments.iter().map(|s| s.0))
            .max()
            .unwrap_or(1),
    };
    let (hist, history_file) = history(repo, tli).await?;
    let tli_for = |segno: u64| hist.timeline_at(Lsn((segno + 1) * seg.bytes() - 1)).0;
    let present = |segno: u64| inv.segments.contains(&(tli_for(segno), segno));

    // Summaries are needed to place time and name targets.
    let summaries = |from: u64, to: u64| {
        let names: Vec<SegmentName> = (from..=to)
            .map(|s| SegmentName::new(TimelineId(tli_for(s)), s, seg))
            .collect();
        async move {
            futures::stream::iter(names)
                .map(|n| async move { summary_of(repo, &n).await.map(|s| (n.segno, s)) })
                .buffered(16)
                .try_collect::<HashMap<u64, Summary>>()
                .await
        }
    };

    // Backups on the target timeline's path, oldest first.
    let on_path: Vec<&BackupManifest> = backups
        .iter()
        .filter(|b| {
            b.stop_lsn
                .parse()
                .is_ok_and(|l| hist.descends_from(TimelineId(b.stop_timeline), l))
        })
        .collect();
    let Some(newest) = on_path.last() else {
        return Err(PlanError::NoBackup(format!(
            "no backup is on timeline {tli} or its ancestors"
        )));
    };

    // The newest backup before the target, given the newest backup's WAL run.
    let run_from = |b: &BackupManifest| -> Result<(u64, u64), PlanError> {
        let first = lsn(&b.start_lsn)?.segment_number(seg);
        let mut last = first;
        if !present(first) {
            return Ok((first, first.wrapping_sub(1)));
        }
        while present(last + 1) {
            last += 1;
        }
        Ok((first, last))
    };
    let stop_segment = |b: &BackupManifest| -> Result<u64, PlanError> {
        Ok(Lsn(lsn(&b.stop_lsn)?.0.saturating_sub(1)).segment_number(seg))
    };
    let pick = |ok: &dyn Fn(&BackupManifest) -> Result<bool, PlanError>| -> Result<&BackupManifest, PlanError> {
        for b in on_path.iter().rev() {
            if ok(b)? {
                return Ok(b);
            }
        }
        let first = on_path[0];
        Err(PlanError::NoBackup(format!(
            "the target is before the end of the first backup on its timeline ({} ended at {}, WAL {})",
            first.id, first.stop_time, first.stop_lsn
        )))
    };
    let chosen = match target {
        // By WAL positions and the WAL's own times, never by the clock of the host that
        // took the backup ([`reaches_time`]).
        Target::Time(t) => {
            let mut found = None;
            for b in on_path.iter().rev() {
                if reaches_time(repo, b, &present, &tli_for, seg, *t, exclusive).await? {
                    found = Some(*b);
                    break;
                }
            }
            match found {
                Some(b) => b,
                None => pick(&|_| Ok(false))?,
            }
        }
        Target::Lsn(l) => pick(&|b| Ok(lsn(&b.stop_lsn)? <= *l))?,
        _ => newest,
    };
    let (first, run_end) = run_from(chosen)?;
    let stop = stop_segment(chosen)?;
    let name_of = |s: u64| SegmentName::new(TimelineId(tli_for(s)), s, seg);
    let uses_archive = chosen.wal == "archive";
    if uses_archive && (run_end == first.wrapping_sub(1) || run_end < stop) {
        let missing = if run_end == first.wrapping_sub(1) {
            first
        } else {
            run_end + 1
        };
        return Err(PlanError::Unreachable {
            message: format!(
                "WAL segment {} needed to make backup {} consistent is not in the repository",
                name_of(missing),
                chosen.id
            ),
            hint: "is archive_command = 'pitr wal-push %p' archiving into this repository?".into(),
        });
    }
    let have_wal = run_end != first.wrapping_sub(1);
    let last_time = |sums: &HashMap<u64, Summary>| -> Option<String> {
        sums.values().filter_map(|s| s.last_xact_time.clone()).max()
    };
    let end = match target {
        Target::Immediate => stop,
        Target::End | Target::Xid(_) => run_end.max(stop),
        Target::Lsn(l) => {
            let want = l.segment_number(seg);
            let reached = have_wal && want <= run_end && {
                let s = summary_of(repo, &name_of(want)).await?;
                lsn(&s.end_lsn)? > *l
            };
            if !reached {
                let end_lsn = if have_wal {
                    summary_of(repo, &name_of(run_end)).await?.end_lsn
                } else {
                    chosen.stop_lsn.clone()
                };
                return Err(PlanError::Unreachable {
                    message: format!("recovery target LSN {l} is beyond the archived WAL"),
                    hint: format!(
                        "the WAL from backup {} is continuous to {end_lsn} (segment {})",
                        chosen.id,
                        name_of(run_end.max(stop))
                    ),
                });
            }
            want
        }
        Target::Time(t) => {
            let sums = if have_wal {
                summaries(first, run_end).await?
            } else {
                HashMap::new()
            };
            let past = |s: &Summary| {
                s.last_xact_time.as_deref().is_some_and(|x| {
                    let t = t.to_string();
                    if exclusive {
                        x >= t.as_str()
                    } else {
                        x > t.as_str()
                    }
                })
            };
            match (first..=run_end).find(|s| sums.get(s).is_some_and(past)) {
                Some(s) => s.max(stop),
                None => {
                    let latest = last_time(&sums);
                    return Err(PlanError::Unreachable {
                        message: format!(
                            "recovery target time {t} is after the latest archived transaction{}",
                            latest.as_ref().map_or(String::new(), |l| format!(" ({l})"))
                        ),
                        hint: match latest {
                            Some(l) => format!("the latest archived commit is {l}: choose a time before it, or restore without a target to replay all archived WAL"),
                            None => "no transaction is archived after the backup: restore without a target, or archive more WAL first".into(),
                        },
                    });
                }
            }
        }
        Target::Name(n) => {
            let sums = if have_wal {
                summaries(first, run_end).await?
            } else {
                HashMap::new()
            };
            let mut found = None;
            for s in first..=run_end {
                if let Some(sum) = sums.get(&s) {
                    if sum.restore_points.iter().any(|r| {
                        &r.name == n
                            && lsn(&r.lsn)
                                .is_ok_and(|l| l >= lsn(&chosen.stop_lsn).unwrap_or(Lsn(0)))
                    }) {
                        found = Some(s);
                        break;
                    }
                }
            }
            match found {
                Some(s) => s,
                None => {
                    return Err(PlanError::Unreachable {
                        message: format!("restore point \"{n}\" is not in the archived WAL after backup {}", chosen.id),
                        hint: "restore points are made with SELECT pg_create_restore_point('name'); choose a backup before it with --backup".into(),
                    })
                }
            }
        }
    };
    let last_xact_time = if have_wal && matches!(target, Target::End | Target::Xid(_)) {
        summary_of(repo, &name_of(run_end))
            .await
            .ok()
            .and_then(|s| s.last_xact_time)
    } else {
        None
    };
    let stranded = (matches!(target, Target::End | Target::Xid(_)) && have_wal)
        .then(|| {
            inv.segments
                .iter()
                .filter(|&&(t, s)| s > run_end + 1 && t == tli_for(s))
                .map(|&(_, s)| s)
                .max()
        })
        .flatten()
        .map(|newest| {
            (
                name_of(run_end + 1).to_string(),
                name_of(newest).to_string(),
            )
        });
    // Headers only: a restore reads the chosen backup's chunk table a piece at a time as
    // it fetches the files.
    let backup = std::sync::Arc::new(chosen.clone());
    Ok(Plan {
        backup,
        timeline: tli,
        first_segment: name_of(first).to_string(),
        last_segment: name_of(end).to_string(),
        segments: end.saturating_sub(first) + 1,
        wal: if have_wal {
            (first..=end.min(run_end))
                .map(|s| name_of(s).to_string())
                .collect()
        } else {
            Vec::new()
        },
        last_xact_time,
        stranded,
        histories: inv.histories.iter().copied().collect(),
        history_file,
    })
}
