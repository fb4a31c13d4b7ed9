//! `pitr expire` (remove what a retention policy does not keep) and `pitr delete` (remove
//! one backup): the decisions per backup, what went, and the exit codes of README.

use std::sync::Arc;
use std::time::Duration;

use repo::codec::Codec;
use repo::repository::Repository;
use restore::expire::{expire, ExpireError, ExpireOptions, Mode, Policy, Report};

use super::repo_args::{open_failure, RepoArgs};
use super::{mb, Exit, Failure};

/// Default grace period for unreferenced packs and leftovers of unfinished backups.
const GRACE: &str = "6h";

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// Keep the newest N backups
    #[arg(long, value_name = "N", env = "PITR_EXPIRE_KEEP_LAST")]
    keep_last: Option<usize>,
    /// Keep every point in time of the last DURATION restorable ("30d", "12h")
    #[arg(long, value_name = "DURATION", env = "PITR_EXPIRE_KEEP_WITHIN", value_parser = humantime::parse_duration)]
    keep_within: Option<Duration>,
    /// Keep the newest backup of each of the last N days (UTC) that have one
    #[arg(long, value_name = "N", env = "PITR_EXPIRE_KEEP_DAILY")]
    keep_daily: Option<usize>,
    /// Keep the newest backup of each of the last N weeks (Monday to Sunday, UTC)
    #[arg(long, value_name = "N", env = "PITR_EXPIRE_KEEP_WEEKLY")]
    keep_weekly: Option<usize>,
    /// Keep the newest backup of each of the last N months (UTC)
    #[arg(long, value_name = "N", env = "PITR_EXPIRE_KEEP_MONTHLY")]
    keep_monthly: Option<usize>,
    /// Never keep fewer backups than this
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        env = "PITR_EXPIRE_MIN_BACKUPS"
    )]
    min_backups: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The backup to remove (see pitr list)
    #[arg(value_name = "BACKUP_ID")]
    id: String,
    /// Remove it even when it is the only backup
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Say what would be removed and why each kept backup stays; remove nothing
    #[arg(long)]
    dry_run: bool,
    /// One JSON object
    #[arg(long)]
    json: bool,
    /// Unreferenced packs and leftovers of unfinished backups are removed only once this old
    /// (by the storage's clock)
    #[arg(long, value_name = "DURATION", default_value = GRACE, env = "PITR_EXPIRE_GRACE", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Repack a pack the kept backups use less than this share of (0 to 1; 0: never)
    #[arg(long, value_name = "FRACTION", default_value_t = 0.5, env = "PITR_EXPIRE_REPACK_BELOW", value_parser = fraction)]
    repack_below: f64,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

pub fn run(args: Args) -> Result<(), Failure> {
    let policy = Policy {
        keep_last: args.keep_last,
        keep_within: args.keep_within,
        keep_daily: args.keep_daily,
        keep_weekly: args.keep_weekly,
        keep_monthly: args.keep_monthly,
        min_backups: args.min_backups,
    };
    if policy.is_empty() {
        return Err(Failure::new(Exit::BadInput, "no retention rule given").hint(
            "give at least one of --keep-last, --keep-within, --keep-daily, --keep-weekly, --keep-monthly",
        ));
    }
    if [
        args.keep_last,
        args.keep_daily,
        args.keep_weekly,
        args.keep_monthly,
    ]
    .contains(&Some(0))
    {
        return Err(
            Failure::new(Exit::BadInput, "a --keep-… count must be at least 1")
                .hint("to remove one backup, use pitr delete ID"),
        );
    }
    go(&args.repo, Mode::Policy(policy), &args.common)
}

pub fn run_delete(args: DeleteArgs) -> Result<(), Failure> {
    let mode = Mode::Delete {
        id: args.id.clone(),
        force: args.force,
    };
    go(&args.repo, mode, &args.common)
}

fn go(repo_args: &RepoArgs, mode: Mode, common: &Common) -> Result<(), Failure> {
    let url = repo_args.url()?;
    let key = repo_args.key()?;
    let runtime = super::runtime(Exit::Repository)?;
    let options = ExpireOptions {
        mode,
        dry_run: common.dry_run,
        grace: common.grace,
        repack_below: common.repack_below,
    };
    let report = runtime.block_on(async {
        let repo = Repository::open(&url, &key, None, Arc::new(Codec::with_default_threads()))
            .await
            .map_err(open_failure)?;
        expire(&repo, &options).await.map_err(failure)
    })?;
    if common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print(&report);
    }
    Ok(())
}

fn failure(e: ExpireError) -> Failure {
    let exit = match &e {
        ExpireError::Damaged(_) => Exit::Corrupt,
        ExpireError::NoBackup(_) | ExpireError::LastBackup(_) => Exit::BadInput,
        ExpireError::InUse { .. } => Exit::Busy,
        ExpireError::Storage(_)
        | ExpireError::Unreadable(..)
        | ExpireError::MarkerUnreadable(_)
        | ExpireError::Unsettled
        | ExpireError::Lapsed => Exit::Repository,
    };
    let hint = e.hint();
    let f = Failure::new(exit, format!("{e}: nothing more was removed"));
    match hint {
        Some(h) => f.hint(h),
        None => f,
    }
}

fn print(r: &Report) {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for b in &r.backups {
        if b.kept {
            let wal = if b.wal_to_end {
                "restorable to the end of the archive"
            } else {
                "its WAL to consistency only"
            };
            println!(
                "backup {} ({}): kept by {}; {wal}",
                b.id,
                b.stop_time,
                b.reasons.join(", ")
            );
        } else {
            println!("backup {} ({}): {verb}", b.id, b.stop_time);
        }
    }
    match &r.wal_kept_from {
        Some(p) => println!(
            "WAL kept whole from log {} segment {} on (every timeline)",
            &p[..8],
            &p[8..]
        ),
        None => println!("WAL: all kept"),
    }
    let p = &r.repacked;
    if p.packs > 0 {
        println!(
            "{} {} pack(s) ({} of live chunks into {} new pack(s), freeing {} once the old generations of {} backup(s) go){}",
            if r.dry_run { "would repack" } else { "repacked" },
            p.packs,
            mb(p.bytes_moved),
            p.new_packs,
            mb(p.bytes_freed),
            p.backups,
            if r.generations_retired > 0 {
                format!("; {} old generation(s) removed", r.generations_retired)
            } else {
                String::new()
            }
        );
    }
    for d in &p.damaged {
        eprintln!(
            "pitr: {}: WARNING: not repacked, a chunk in it is damaged: {d}",
            if r.dry_run {
                "expire --dry-run"
            } else {
                "expire"
            }
        );
    }
    let x = &r.removed;
    println!(
        "{verb} {} backup(s), {} WAL file(s), {} stream piece(s), {} pack(s), {} other object(s): {} freed{}",
        x.backups,
        x.wal_files,
        x.stream_pieces,
        x.packs,
        x.backup_objects + x.markers,
        mb(x.bytes),
        if r.deferred > 0 {
            format!("; {} unreferenced object(s) left for a later run (newer than --grace, or a backup is running)", r.deferred)
        } else {
            String::new()
        }
    );
}
