//! `pitr verify`: every backup read back and checked (each chunk against the hash its chunk
//! table names, each file against PostgreSQL's own backup_manifest), and for each backup the
//! WAL a restore from it would replay, each segment read whole and checked: what each backup
//! can restore to, and every problem with what it breaks. Nothing is written.

use std::collections::HashSet;
use std::time::Instant;

use futures::StreamExt;
use repo::keys::{summary_key, wal_key};
use repo::manifest::{list_backups, BackupManifest};
use repo::objects::ObjectError;
use repo::repository::Repository;
use repo::storage::StorageError;

use crate::backup_files::{check_backup, CheckError};
use crate::plan::{plan, PlanError, TimelineChoice};
use crate::target::Target;
use crate::wal_fetch::{streamed_segment, wal_file_max, FetchError};

/// Segments read and checked at once.
const WAL_READS: usize = 8;

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Only this backup (and its WAL).
    pub backup: Option<String>,
    /// Skip reading the backups' files.
    pub wal_only: bool,
    /// Skip the WAL.
    pub backups_only: bool,
}

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Stored bytes are damaged (or a manifest is inconsistent).
    Damaged,
    /// WAL a restore needs is not in the repository.
    Missing,
}

/// One problem found, and what it breaks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// Damage or missing WAL.
    pub severity: Severity,
    /// The backup concerned, if one.
    pub backup: Option<String>,
    /// What is wrong, one line.
    pub message: String,
}

/// What one backup can restore to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    /// Its id.
    pub id: String,
    /// Its files read back and checked (None when not read: `--wal-only`).
    pub files_ok: Option<bool>,
    /// Files and bytes read.
    pub files: u64,
    /// Plaintext bytes of its files.
    pub bytes: u64,
    /// Its files matched PostgreSQL's backup_manifest (count).
    pub matched_pg_manifest: u64,
    /// The timeline a restore to the end of the WAL recovers along.
    pub timeline: Option<u32>,
    /// Where its WAL begins and ends (segment names), when it can be restored at all.
    pub first_segment: Option<String>,
    /// See `first_segment`.
    pub last_segment: Option<String>,
    /// Restorable from its end (`stop_time`, the backup host's clock) ...
    pub restorable_from: Option<String>,
    /// ... to the last transaction in the WAL it reaches (None: no transaction after it).
    pub restorable_to: Option<String>,
    /// Also restorable along its own timeline, when that is not the newest.
    pub also: Vec<AlsoReach>,
    /// The WAL after its stop ends at a gap that `pitr expire` made on purpose (a backup
    /// kept by a calendar rule keeps its own WAL only): the missing segment. Points after
    /// it are restored from newer backups, or not at all; not a problem.
    pub wal_ends_before: Option<String>,
}

/// How far a backup restores along another timeline (`--target-timeline current`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AlsoReach {
    /// The timeline.
    pub timeline: u32,
    /// Its last segment a restore replays.
    pub last_segment: String,
    /// The last transaction in that WAL.
    pub restorable_to: Option<String>,
}

/// What one plan of a backup's WAL found.
struct Reach {
    ends_before: Option<String>,
    timeline: u32,
    first_segment: String,
    last_segment: String,
    from: String,
    to: Option<String>,
}

/// Everything verify found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Per backup, oldest first.
    pub backups: Vec<BackupReport>,
    /// WAL segments read and checked.
    pub segments: u64,
    /// Their summaries read and checked (a segment without one is not a problem: readers
    /// compute it from the segment).
    pub summaries: u64,
    /// Timeline history files read and checked.
    pub histories: u64,
    /// Plaintext bytes read and checked, backups and WAL.
    pub bytes: u64,
    /// Seconds it took.
    pub seconds: f64,
    /// Every problem.
    pub problems: Vec<Problem>,
}

impl Report {
    /// Whether anything is damaged.
    pub fn damaged(&self) -> bool {
        self.problems
            .iter()
            .any(|p| p.severity == Severity::Damaged)
    }

    /// Whether WAL is missing.
    pub fn missing(&self) -> bool {
        self.problems
            .iter()
            .any(|p| p.severity == Severity::Missing)
    }
}

/// Why verify could not run at all (as opposed to problems it found).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Listing failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The backup asked for is not there.
    #[error("backup {0} is not in the repository")]
    NoBackup(String),
    /// The backup asked for is being removed by a running expire or delete.
    #[error("backup {0} is being removed by a running pitr expire or delete")]
    Busy(String),
    /// Something could not be read (the storage failed, or it is in a format this pitr
    /// does not read): no verdict on it.
    #[error("could not read {0}: {1}")]
    Unreadable(String, String),
}

fn unreadable(what: &str, e: impl std::fmt::Display) -> VerifyError {
    VerifyError::Unreadable(what.to_owned(), e.to_string())
}

/// Whether an error means stored data is damaged or gone (rather than unreachable storage):
/// an object a manifest names that is not there is damage to the repository.
fn object_damage(e: &ObjectError) -> bool {
    matches!(e, ObjectError::Corrupt { .. }) || e.is_not_found()
}

/// Whether a problem is already on record for backup `id`.
fn report_has(report: &Report, id: &str) -> bool {
    report
        .problems
        .iter()
        .any(|p| p.backup.as_deref() == Some(id))
}

/// What a manifest that cannot be read means: damage (bad, corrupt, gone), or a verdict
/// verify cannot give (storage unreachable, a newer pitr's format).
fn manifest_verdict(e: repo::manifest::ManifestError) -> Result<String, VerifyError> {
    use repo::manifest::ManifestError as M;
    match e {
        M::Object(o) if object_damage(&o) => Ok(o.to_string()),
        e @ M::Bad { .. } => Ok(e.to_string()),
        M::Storage(s) => Err(VerifyError::Storage(s)),
        other => Err(unreadable("a backup manifest", other)),
    }
}

/// Verifies the repository as `o` says, reporting each backup as it is done to `progress`.
pub async fn verify(
    repo: &Repository,
    o: &VerifyOptions,
    progress: &(dyn Fn(&BackupReport) + Sync),
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let report = Report::default();
    let marker = repo::markers::reader(repo.objects(), "verify").await;
    let listed = list_backups(repo.objects().storage().as_ref()).await;
    let mut ids = match listed {
        Ok(ids) => ids,
        Err(e) => {
            if let Some(m) = marker {
                m.finish().await;
            }
            return Err(e.into());
        }
    };
    if let Some(only) = &o.backup {
        if !ids.contains(only) {
            if let Some(m) = marker {
                m.finish().await;
            }
            return Err(VerifyError::NoBackup(only.clone()));
        }
        ids.retain(|i| i == only);
    }
    // The marker names every backup read (and so the WAL from the oldest one's start); a
    // backup a running expire is removing is left out rather than reported missing.
    if let Some(m) = &marker {
        for _ in 0..3 {
            match m.rely_on(ids.clone(), None).await {
                Ok(()) => break,
                Err(condemned) => {
                    if o.backup.as_ref().is_some_and(|b| condemned.contains(b)) {
                        if let Some(m) = marker {
                            m.finish().await;
                        }
                        return Err(VerifyError::Busy(condemned.join(", ")));
                    }
                    ids.retain(|i| !condemned.contains(i));
                }
            }
        }
        // What an expire removed before this marker was seen is gone: not damage.
        if let Ok(now) = list_backups(repo.objects().storage().as_ref()).await {
            if let Some(only) = o.backup.as_ref().filter(|b| !now.contains(b)) {
                m_finish(marker).await;
                return Err(VerifyError::Busy(only.clone()));
            }
            ids.retain(|i| now.contains(i));
        }
    }
    let result = verify_ids(repo, o, progress, ids, started, report).await;
    if let Some(m) = marker {
        m.finish().await;
    }
    result
}

async fn m_finish(marker: Option<repo::markers::Marker>) {
    if let Some(m) = marker {
        m.finish().await;
    }
}

async fn verify_ids(
    repo: &Repository,
    o: &VerifyOptions,
    progress: &(dyn Fn(&BackupReport) + Sync),
    ids: Vec<String>,
    started: Instant,
    mut report: Report,
) -> Result<Report, VerifyError> {
    if !o.backups_only {
        check_histories(repo, &mut report).await?;
    }
    let mut wal_checked: HashSet<String> = HashSet::new();
    // What the last expire removed of the WAL on purpose: a gap there is not a problem.
    let retention = crate::expire::WalRetention::load(repo).await;
    for id in ids {
        let mut b = BackupReport {
            id: id.clone(),
            files_ok: None,
            files: 0,
            bytes: 0,
            matched_pg_manifest: 0,
            timeline: None,
            first_segment: None,
            last_segment: None,
            restorable_from: None,
            restorable_to: None,
            also: Vec::new(),
            wal_ends_before: None,
        };
        let problem = |severity, message: String| Problem {
            severity,
            backup: Some(id.clone()),
            message,
        };
        // The backup's own timeline, from its manifest when the files were checked.
        let mut own_timeline = None;
        if !o.wal_only {
            // Its header: the chunk table is read a piece at a time as the files are.
            let loaded = BackupManifest::load_header(repo.objects(), &id).await;
            if let Ok(m) = &loaded {
                own_timeline = Some(m.timeline);
            }
            match loaded {
                Err(e) => {
                    let why = manifest_verdict(e)?;
                    b.files_ok = Some(false);
                    report.problems.push(problem(
                        Severity::Damaged,
                        format!("its manifest cannot be read: {why}"),
                    ));
                }
                Ok(m) => match check_backup(repo.objects(), &m).await {
                    Ok(r) => {
                        b.files_ok = Some(true);
                        b.files = r.files;
                        b.bytes = r.bytes;
                        b.matched_pg_manifest = r.matched_pg_manifest;
                        report.bytes += r.bytes;
                    }
                    Err(CheckError::Table(e)) => {
                        let why = manifest_verdict(e)?;
                        b.files_ok = Some(false);
                        report.problems.push(problem(
                            Severity::Damaged,
                            // The manifest's numbers or a piece of its chunk table (the
                            // reason names which object).
                            format!("its manifest cannot be used: {why}"),
                        ));
                    }
                    Err(e) => {
                        let storage = matches!(
                            &e,
                            CheckError::Read(crate::backup_files::ReadError::Object { source, .. })
                                if !object_damage(source)
                        );
                        if storage {
                            // Unreachable storage is not a verdict on the data.
                            return Err(unreadable(&format!("backup {id}"), e));
                        }
                        b.files_ok = Some(false);
                        report
                            .problems
                            .push(problem(Severity::Damaged, e.to_string()));
                    }
                },
            }
        }
        if !o.backups_only {
            // Along the newest timeline (what a restore does by default), and along the
            // backup's own when that is another (`--target-timeline current`). A newest
            // timeline that branched off before this backup ended is not one it can be
            // restored along: no problem, its own timeline is what counts then.
            let newest = check_wal(
                repo,
                &id,
                &TimelineChoice::Latest,
                &mut wal_checked,
                &retention,
                &mut report,
            )
            .await?;
            let own = match own_timeline {
                Some(t) => Some(t),
                None => match BackupManifest::load_header(repo.objects(), &id).await {
                    Ok(m) => Some(m.timeline),
                    Err(e) => {
                        manifest_verdict(e)?;
                        None
                    }
                },
            };
            let along_own = if own.is_some() && own != newest.as_ref().map(|r| r.timeline) {
                check_wal(
                    repo,
                    &id,
                    &TimelineChoice::Current,
                    &mut wal_checked,
                    &retention,
                    &mut report,
                )
                .await?
            } else {
                None
            };
            if newest.is_none() && along_own.is_none() && !report_has(&report, &id) {
                report.problems.push(problem(
                    Severity::Missing,
                    "it cannot be restored along any timeline the repository holds".into(),
                ));
            }
            let (primary, also) = match (newest, along_own) {
                (Some(n), o) => (Some(n), o),
                (None, o) => (o, None),
            };
            if let Some(r) = primary {
                b.timeline = Some(r.timeline);
                b.first_segment = Some(r.first_segment.clone());
                b.last_segment = Some(r.last_segment.clone());
                b.restorable_from = Some(r.from.clone());
                b.restorable_to = r.to.clone();
                b.wal_ends_before = r.ends_before.clone();
            }
            if let Some(r) = also {
                b.also.push(AlsoReach {
                    timeline: r.timeline,
                    last_segment: r.last_segment,
                    restorable_to: r.to,
                });
            }
        }
        progress(&b);
        report.backups.push(b);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Plans a restore of backup `id` to the end of the WAL along `timeline`, and reads and
/// checks every segment it would replay that no earlier plan covered: how far it reaches
/// (None when it cannot be restored that way; the problem is in `report`).
async fn check_wal(
    repo: &Repository,
    id: &str,
    timeline: &TimelineChoice,
    wal_checked: &mut HashSet<String>,
    retention: &Option<crate::expire::WalRetention>,
    report: &mut Report,
) -> Result<Option<Reach>, VerifyError> {
    let along = match timeline {
        TimelineChoice::Current => " along its own timeline",
        _ => "",
    };
    let problem = |severity, message: String| Problem {
        severity,
        backup: Some(id.to_owned()),
        message,
    };
    let p = match plan(repo, &Target::End, false, timeline, Some(id)).await {
        Ok(p) => p,
        Err(PlanError::Unreachable { message, hint }) => {
            report.problems.push(problem(
                Severity::Missing,
                format!("it cannot be restored{along}: {message} ({hint})"),
            ));
            return Ok(None);
        }
        Err(PlanError::Object(e)) if object_damage(&e) => {
            report
                .problems
                .push(problem(Severity::Damaged, e.to_string()));
            return Ok(None);
        }
        Err(PlanError::Manifest(e)) => {
            let why = manifest_verdict(e)?;
            report.problems.push(problem(Severity::Damaged, why));
            return Ok(None);
        }
        Err(PlanError::Bad(e)) => {
            report.problems.push(problem(Severity::Damaged, e));
            return Ok(None);
        }
        // Not restorable along this timeline (it branched off before the backup ended):
        // the caller decides whether that is a problem.
        Err(PlanError::NoBackup(_)) => return Ok(None),
        Err(PlanError::Storage(e)) => return Err(VerifyError::Storage(e)),
        Err(PlanError::Object(e)) => return Err(unreadable(&format!("backup {id}"), e)),
    };
    let mut ends_before = None;
    if let Some((missing, _)) = &p.stranded {
        // Expired on purpose (an older backup kept with its own WAL only).
        if retention.as_ref().is_some_and(|r| r.expired(missing)) {
            ends_before = Some(missing.clone());
        }
    }
    if let (Some((missing, newest)), None) = (&p.stranded, &ends_before) {
        report.problems.push(problem(
            Severity::Missing,
            format!(
                "segment {missing} is missing: WAL after it (up to {newest}) cannot be replayed from this backup{along}; it restores only to points before {missing}"
            ),
        ));
    }
    let todo: Vec<String> = p
        .wal
        .iter()
        .filter(|n| wal_checked.insert((*n).clone()))
        .cloned()
        .collect();
    let checked: Vec<SegmentChecked> = futures::stream::iter(todo)
        .map(|name| async move { check_segment(repo, &name).await.map_err(|e| (name, e)) })
        .buffered(WAL_READS)
        .collect()
        .await;
    for c in checked {
        match c {
            Ok((bytes, summary)) => {
                report.segments += 1;
                report.bytes += bytes;
                match summary {
                    Ok(true) => report.summaries += 1,
                    Ok(false) => {}
                    Err(message) => report.problems.push(problem(Severity::Damaged, message)),
                }
            }
            Err((name, e)) => {
                let damaged = matches!(&e, FetchError::Object(o) if object_damage(o));
                let missing = matches!(&e, FetchError::NotFound(_));
                if !damaged && !missing {
                    return Err(unreadable(&format!("WAL segment {name}"), e));
                }
                report.problems.push(problem(
                    if damaged {
                        Severity::Damaged
                    } else {
                        Severity::Missing
                    },
                    format!("WAL segment {name}: {e}"),
                ));
            }
        }
    }
    Ok(Some(Reach {
        timeline: p.timeline,
        first_segment: p.first_segment,
        last_segment: p.last_segment,
        from: p.backup.stop_time.clone(),
        to: p.last_xact_time,
        ends_before,
    }))
}

/// A segment checked: its plaintext bytes and how its summary fared (checked, absent, or
/// damaged: the message), or why the segment itself failed.
type SegmentChecked = Result<(u64, Result<bool, String>), (String, FetchError)>;

/// Reads WAL file `name` whole and checks it (its envelope; a streamed segment's pieces),
/// and its summary when there is one: the segment's plaintext bytes, and whether a summary
/// was checked (a damaged one: why).
async fn check_segment(
    repo: &Repository,
    name: &str,
) -> Result<(u64, Result<bool, String>), FetchError> {
    let key = wal_key(name).ok_or_else(|| FetchError::BadName(name.to_owned()))?;
    let bytes = match repo.objects().get_at_most(&key, wal_file_max(repo)).await {
        Ok((_, plain)) => plain.len() as u64,
        // Streamed: no summary until the segment is stored whole.
        Err(e) if e.is_not_found() => {
            return match streamed_segment(repo, name).await? {
                Some(bytes) => Ok((bytes.len() as u64, Ok(false))),
                None => Err(FetchError::NotFound(name.to_owned())),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let Some(skey) = summary_key(name) else {
        return Ok((bytes, Ok(false)));
    };
    let summary = match repo.objects().get_at_most(&skey, 64 << 20).await {
        Ok((_, plain)) => match serde_json::from_slice::<serde_json::Value>(&plain) {
            Ok(v) if v.get("end_lsn").is_some_and(|e| e.is_string()) => Ok(true),
            _ => Err(format!(
                "the summary of WAL segment {name} (\"{skey}\") is not a summary"
            )),
        },
        Err(e) if e.is_not_found() => Ok(false),
        Err(e @ ObjectError::Corrupt { .. }) => Err(e.to_string()),
        Err(e) => return Err(e.into()),
    };
    Ok((bytes, summary))
}

/// Reads every timeline history file and checks it parses.
async fn check_histories(repo: &Repository, report: &mut Report) -> Result<(), VerifyError> {
    let listed = repo::storage::list_all(repo.objects().storage().as_ref(), "wal/history/").await?;
    for o in listed {
        let name = o.key.rsplit('/').next().unwrap_or_default().to_owned();
        let walfmt::ArchiveFileKind::History(tli) = walfmt::ArchiveFileKind::of(&name) else {
            continue;
        };
        let problem = |message: String| Problem {
            severity: Severity::Damaged,
            backup: None,
            message,
        };
        match repo.objects().get_at_most(&o.key, wal_file_max(repo)).await {
            Ok((_, text)) => match walfmt::TimelineHistory::parse(tli, &text) {
                Ok(_) => report.histories += 1,
                Err(e) => report
                    .problems
                    .push(problem(format!("history file {name} does not parse: {e}"))),
            },
            Err(e @ ObjectError::Corrupt { .. }) => report.problems.push(problem(e.to_string())),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(unreadable(&format!("\"{}\"", o.key), e)),
        }
    }
    Ok(())
}
