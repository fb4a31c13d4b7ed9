//! `pitr verify`: reads every backup and the WAL each needs, checks every byte, and says what
//! each backup can restore to and what any problem breaks. Exit 0 only when all is well;
//! damage is exit 5, missing WAL (and no damage) exit 12.

use std::sync::Arc;

use repo::codec::Codec;
use repo::repository::Repository;
use restore::verify::{verify, BackupReport, Report, Severity, VerifyError, VerifyOptions};

use super::repo_args::{open_failure, RepoArgs};
use super::{mb, Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// Only this backup (and the WAL it needs)
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Only the WAL (each backup's, from its start to the end of the archive)
    #[arg(long, conflicts_with = "backups_only")]
    wal_only: bool,
    /// Only the backups' files
    #[arg(long)]
    backups_only: bool,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

fn line(b: &BackupReport) -> String {
    let files = match b.files_ok {
        Some(true) => format!(
            "{} files, {} checked{}",
            b.files,
            mb(b.bytes),
            if b.matched_pg_manifest > 0 {
                ", matching PostgreSQL's backup_manifest"
            } else {
                ""
            }
        ),
        Some(false) => "files DAMAGED".into(),
        None => "files not read".into(),
    };
    let range = match (&b.timeline, &b.restorable_from) {
        (Some(tli), Some(from)) => format!(
            "restorable to any point from {from} to {} on timeline {tli}",
            b.restorable_to
                .as_deref()
                .unwrap_or("its end (no transaction after it)")
        ),
        _ => "WAL not checked".into(),
    };
    let also: String = b
        .also
        .iter()
        .map(|a| {
            format!(
                "; along its own timeline {}: to {}",
                a.timeline,
                a.restorable_to
                    .as_deref()
                    .unwrap_or("its end (no transaction after it)")
            )
        })
        .collect();
    let gap = match &b.wal_ends_before {
        Some(s) => format!(
            "; its WAL ends before segment {s}, expired on purpose (later points restore from newer backups)"
        ),
        None => String::new(),
    };
    format!("backup {}: {files}; {range}{gap}{also}", b.id)
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let key = args.repo.key()?;
    let runtime = super::runtime(Exit::Repository)?;
    let options = VerifyOptions {
        backup: args.backup.clone(),
        wal_only: args.wal_only,
        backups_only: args.backups_only,
    };
    let json = args.json;
    let report: Report = runtime.block_on(async {
        let repo = Repository::open(&url, &key, None, Arc::new(Codec::with_default_threads()))
            .await
            .map_err(open_failure)?;
        let progress = |b: &BackupReport| {
            if !json {
                println!("{}", line(b));
            }
        };
        verify(&repo, &options, &progress)
            .await
            .map_err(|e| match e {
                VerifyError::Busy(_) => Failure::new(Exit::Busy, e.to_string()),
                VerifyError::NoBackup(_) => {
                    Failure::new(Exit::BadInput, e.to_string()).hint("pitr list shows the backups")
                }
                VerifyError::Storage(_) | VerifyError::Unreadable(..) => {
                    Failure::new(Exit::Repository, e.to_string()).hint(
                        "the repository could not be read; nothing was judged: run verify again",
                    )
                }
            })
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        for p in &report.problems {
            let what = match p.severity {
                Severity::Damaged => "DAMAGED",
                Severity::Missing => "MISSING",
            };
            match &p.backup {
                Some(b) => println!("{what}: backup {b}: {}", p.message),
                None => println!("{what}: {}", p.message),
            }
        }
        println!(
            "verified {} backup(s), {} WAL segment(s) ({} summaries), {} history file(s), {} in {:.1} s ({:.0} MB/s); {} problem(s)",
            report.backups.len(),
            report.segments,
            report.summaries,
            report.histories,
            mb(report.bytes),
            report.seconds,
            report.bytes as f64 / 1e6 / report.seconds.max(1e-6),
            report.problems.len()
        );
    }
    if report.damaged() {
        return Err(Failure::new(
            Exit::Corrupt,
            "the repository holds damaged data (listed above)",
        ));
    }
    if report.missing() {
        return Err(Failure::new(
            Exit::MissingWal,
            "WAL a restore needs is missing (listed above)",
        ));
    }
    Ok(())
}
