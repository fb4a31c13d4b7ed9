//! `pitr copy --to TARGET`: brings another repository (another region, another store) in
//! step with this one, every object checked before and after; exit 5 when damage was found
//! (nothing damaged copied, nothing differing overwritten).

use std::sync::Arc;

use repo::codec::Codec;
use repo::repository::Repository;
use repo::url::{RepoUrl, RepoUrlError};
use restore::copy::{copy, CopyError, CopyOptions};

use super::repo_args::{open_failure, RepoArgs};
use super::{mb, Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The repository copied from
    #[command(flatten)]
    repo: RepoArgs,
    /// The repository copied into (made a copy of the source on the first run); S3 URLs
    /// may carry their own endpoint, region, path-style and profile
    #[arg(long, value_name = "URL")]
    to: String,
    /// Objects copied at once
    #[arg(long, value_name = "N", default_value_t = 8)]
    parallel: usize,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let key = args.repo.key()?;
    let to: RepoUrl = args.to.parse().map_err(|e: RepoUrlError| {
        Failure::new(Exit::BadInput, e.to_string()).hint(RepoUrlError::HINT)
    })?;
    if to == url {
        return Err(Failure::new(
            Exit::BadInput,
            "the target is the source repository",
        ));
    }
    let runtime = super::runtime(Exit::Repository)?;
    let options = CopyOptions {
        parallel: args.parallel.max(1),
    };
    let report = runtime.block_on(async {
        let source = Repository::open(&url, &key, None, Arc::new(Codec::with_default_threads()))
            .await
            .map_err(open_failure)?;
        copy(&source, &to, &options).await.map_err(|e| {
            let hint = e.hint();
            let f = Failure::new(
                Exit::Repository,
                match &e {
                    CopyError::NotACopy(_) => format!("{e}"),
                    CopyError::Storage(_) => format!("copy stopped: {e}"),
                },
            );
            match hint {
                Some(h) => f.hint(h),
                None => f,
            }
        })
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        for p in &report.problems {
            println!("DAMAGED: {p}");
        }
        println!(
            "{}copied {} object(s), {} in {:.1} s; {} already there; {} backup(s) now in the target{}{}",
            if report.initialized { "made the target a copy; " } else { "" },
            report.objects,
            mb(report.bytes),
            report.seconds,
            report.present,
            report.backups,
            if report.skipped > 0 {
                format!("; {} object(s) the target's own expire removed left out", report.skipped)
            } else {
                String::new()
            },
            if report.key_sets_removed > 0 {
                format!("; {} key slot set(s) the source removed, removed", report.key_sets_removed)
            } else {
                String::new()
            }
        );
    }
    if !report.problems.is_empty() {
        return Err(Failure::new(
            Exit::Corrupt,
            format!(
                "{} damaged or differing object(s) (listed above); nothing damaged was copied, nothing differing overwritten",
                report.problems.len()
            ),
        )
        .hint("pitr verify on each repository says more"));
    }
    Ok(())
}
