//! `pitr list`: the backups in a repository (oldest first) and the WAL it holds, as
//! contiguous ranges of segments per timeline.

use std::collections::BTreeMap;
use std::sync::Arc;

use repo::codec::Codec;
use repo::manifest::{list_backups, BackupManifest, ManifestError};
use repo::objects::ObjectError;
use repo::repository::Repository;
use repo::storage::list_all;
use serde_json::json;
use walfmt::{SegmentName, WalSegmentSize};

use super::repo_args::{open_failure, RepoArgs};
use super::{mb, Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// The drill records instead (pitr drill --record), oldest first: the evidence of each
    /// rehearsal
    #[arg(long)]
    drills: bool,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

/// How many drill records `--drills` shows at most (the newest).
const DRILLS_SHOWN: usize = 1000;

/// A drill record as list shows it (JSON): the report, and its key; or why it cannot be
/// read.
fn drill_json(key: &str, r: &Result<restore::drill::DrillReport, String>) -> serde_json::Value {
    match r {
        Ok(report) => {
            let mut v = serde_json::to_value(report).unwrap_or_default();
            v["key"] = json!(key);
            v
        }
        Err(e) => json!({"key": key, "unreadable": e}),
    }
}

/// One line for a drill record.
fn drill_line(key: &str, r: &Result<restore::drill::DrillReport, String>) -> String {
    restore::drill::printable(&match r {
        Ok(d) => format!(
            "{}  {:<6} RTO {}  RPO {}  backup {}  {} check(s){}",
            d.started_at,
            if d.passed { "passed" } else { "FAILED" },
            d.rto_seconds.map_or("-".into(), |s| format!("{s:.1} s")),
            d.rpo_seconds.map_or("-".into(), |s| format!("{s:.1} s")),
            d.backup.as_deref().unwrap_or("-"),
            d.checks.len(),
            d.error
                .as_deref()
                .map_or(String::new(), |e| format!("; {e}"))
        ),
        Err(e) => format!("{key}: unreadable: {e}"),
    })
}

async fn show_drills(repo: &Repository, json_out: bool) -> Result<(), Failure> {
    let records = restore::drill::records(repo.objects(), DRILLS_SHOWN)
        .await
        .map_err(|e| Failure::new(Exit::Repository, e.to_string()))?;
    if json_out {
        let v = json!({
            "drills": records.iter().map(|(k, r)| drill_json(k, r)).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else if records.is_empty() {
        println!("no drills recorded (pitr drill --record)");
    } else {
        for (k, r) in &records {
            println!("{}", drill_line(k, r));
        }
    }
    Ok(())
}

/// A run of consecutive segments on one timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRange {
    pub timeline: u32,
    pub first: SegmentName,
    pub last: SegmentName,
}

impl WalRange {
    fn segments(&self) -> u64 {
        self.last.segno - self.first.segno + 1
    }
}

/// Contiguous runs of the segments named in `names` (other files ignored).
pub fn wal_ranges<'a>(names: impl Iterator<Item = &'a str>, seg: WalSegmentSize) -> Vec<WalRange> {
    let mut by_tli: BTreeMap<u32, Vec<SegmentName>> = BTreeMap::new();
    for n in names {
        if let Ok(s) = SegmentName::parse(n, seg) {
            by_tli.entry(s.timeline.0).or_default().push(s);
        }
    }
    let mut out = Vec::new();
    for (tli, mut segs) in by_tli {
        segs.sort();
        segs.dedup();
        for s in segs {
            match out.last_mut() {
                Some(WalRange { timeline, last, .. })
                    if *timeline == tli && last.segno + 1 == s.segno =>
                {
                    *last = s
                }
                _ => out.push(WalRange {
                    timeline: tli,
                    first: s,
                    last: s,
                }),
            }
        }
    }
    out
}

fn failure(e: ManifestError) -> Failure {
    let exit = match &e {
        ManifestError::Object(ObjectError::Corrupt { .. }) | ManifestError::Bad { .. } => {
            Exit::Corrupt
        }
        _ => Exit::Repository,
    };
    Failure::new(exit, e.to_string())
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let key = args.repo.key()?;
    let runtime = super::runtime(Exit::Repository)?;
    runtime.block_on(async {
        let repo = Repository::open(&url, &key, None, Arc::new(Codec::new(2, 4)))
            .await
            .map_err(open_failure)?;
        if args.drills {
            return show_drills(&repo, args.json).await;
        }
        // Best effort: a listing of drills/ that fails (a bucket policy scoped to other
        // prefixes, say) does not stop the listing of backups.
        let last_drill = match restore::drill::records(repo.objects(), 1).await {
            Ok(mut r) => r.pop(),
            Err(e) => Some(("drills/".to_owned(), Err(e.to_string()))),
        };
        let storage = repo.objects().storage().clone();
        let ids = list_backups(storage.as_ref())
            .await
            .map_err(|e| failure(e.into()))?;
        let mut backups = Vec::new();
        for id in &ids {
            backups.push(
                BackupManifest::load_header(repo.objects(), id)
                    .await
                    .map_err(failure)?,
            );
        }
        let seg = WalSegmentSize::new(repo.config().wal_segment_size)
            .map_err(|e| Failure::new(Exit::Corrupt, e.to_string()))?;
        let wal = list_all(storage.as_ref(), "wal/")
            .await
            .map_err(|e| failure(e.into()))?;
        // Segments pitr stream is still writing count from their first piece.
        let streaming: Vec<String> = repo::pieces::streamed_segments(storage.as_ref(), "stream/")
            .await
            .map_err(|e| failure(e.into()))?
            .into_keys()
            .collect();
        let ranges = wal_ranges(
            wal.iter()
                .filter_map(|o| o.key.rsplit('/').next())
                .chain(streaming.iter().map(String::as_str)),
            seg,
        );
        if args.json {
            let v = json!({
                "repository": url.to_string(),
                "backups": backups.iter().map(|m| json!({
                    "id": m.id,
                    "label": m.label,
                    "start_time": m.start_time,
                    "stop_time": m.stop_time,
                    "server_start_time": m.server_start_time,
                    "timeline": m.timeline,
                    "start_lsn": m.start_lsn,
                    "stop_lsn": m.stop_lsn,
                    "size": m.size,
                    "stored_new": m.stored_new,
                    "stored_total": m.stored_total,
                    "files": m.files.iter().filter(|f| f.kind == repo::manifest::FileType::File).count(),
                    "wal": m.wal,
                    "pg_version": m.pg_version,
                })).collect::<Vec<_>>(),
                "wal": ranges.iter().map(|r| json!({
                    "timeline": r.timeline,
                    "first": r.first.to_string(),
                    "last": r.last.to_string(),
                    "segments": r.segments(),
                    "start_lsn": r.first.start_lsn().to_string(),
                    "end_lsn": r.last.end_lsn().to_string(),
                    "streaming": streaming.contains(&r.last.to_string()),
                })).collect::<Vec<_>>(),
                "last_drill": last_drill.as_ref().map(|(k, r)| drill_json(k, r)),
            });
            println!("{v}");
            return Ok(());
        }
        println!("repository {url}");
        if backups.is_empty() {
            println!("  no backups");
        } else {
            println!(
                "  {:<18} {:<27} {:<27} {:>3} {:>12} {:>12} {:>10} {:>10}  label",
                "backup", "start", "stop", "tli", "start lsn", "stop lsn", "size", "new"
            );
        }
        for m in &backups {
            println!(
                "  {:<18} {:<27} {:<27} {:>3} {:>12} {:>12} {:>10} {:>10}  {}{}",
                m.id,
                // The server's clock where the backup says it (backup_label), else pitr's.
                m.server_start_time.as_deref().unwrap_or(&m.start_time),
                m.stop_time,
                m.timeline,
                m.start_lsn,
                m.stop_lsn,
                mb(m.size),
                mb(m.stored_new),
                m.label,
                if m.wal == "included" {
                    " (WAL included)"
                } else {
                    ""
                },
            );
        }
        if ranges.is_empty() {
            println!("  no WAL");
        }
        for r in &ranges {
            println!(
                "  WAL timeline {}: {} .. {} ({} segments, {} .. {}){}",
                r.timeline,
                r.first,
                r.last,
                r.segments(),
                r.first.start_lsn(),
                r.last.end_lsn(),
                if streaming.contains(&r.last.to_string()) {
                    ", the last one still being streamed"
                } else {
                    ""
                }
            );
        }
        if let Some((k, r)) = &last_drill {
            println!("  last drill: {}", drill_line(k, r));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_gaps_and_timelines() {
        let seg = WalSegmentSize::new(16 << 20).unwrap();
        let names = [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000002.summary",
            "000000010000000000000004",
            "000000020000000000000004",
            "00000002.history",
            "000000020000000000000005",
        ];
        let r = wal_ranges(names.into_iter(), seg);
        let shown: Vec<(u32, String, u64)> = r
            .iter()
            .map(|r| (r.timeline, r.first.to_string(), r.segments()))
            .collect();
        assert_eq!(
            shown,
            [
                (1, "000000010000000000000001".to_owned(), 2),
                (1, "000000010000000000000004".to_owned(), 1),
                (2, "000000020000000000000004".to_owned(), 2),
            ]
        );
    }
}
