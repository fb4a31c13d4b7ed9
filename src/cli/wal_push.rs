//! `pitr wal-push FILE` (archive_command = 'pitr wal-push %p'): exit 0 only once the file
//! is stored and read back with its checksum, or the same bytes were already stored.

use std::path::PathBuf;
use std::sync::Arc;

use archiver::wal_push::{push, PushError, PushOptions};
use repo::codec::Codec;
use repo::objects::ObjectError;

use super::repo_args::{open_failure, CompressArgs, RepoArgs};
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// The WAL file to archive (PostgreSQL's %p)
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Give up (exit 4; PostgreSQL retries later) after this many seconds
    #[arg(
        long,
        env = "PITR_WAL_PUSH_TIMEOUT",
        default_value_t = 120,
        value_name = "SECONDS"
    )]
    timeout: u64,
    /// Also archive up to this many more files PostgreSQL has marked ready, in the same
    /// call; its calls for them then return after a cheap check (0: off)
    #[arg(
        long,
        env = "PITR_WAL_PUSH_AHEAD",
        default_value_t = 8,
        value_name = "N"
    )]
    ahead: usize,
    /// Files read, compressed and uploaded at once [default: twice the cores]
    #[arg(long, env = "PITR_WAL_PUSH_PARALLEL", value_name = "N")]
    parallel: Option<usize>,
    /// Where records of files archived ahead are kept [default: pg_wal/.pitr/push]
    #[arg(long, env = "PITR_WAL_PUSH_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    compress: CompressArgs,
}

fn failure(e: PushError) -> Failure {
    match e {
        PushError::Open(e) => open_failure(e),
        PushError::Read { .. } | PushError::NotWal { .. } => Failure::new(Exit::BadInput, e.to_string())
            .hint("archive_command should be 'pitr wal-push %p', run by the server whose WAL it is"),
        PushError::Conflict { .. } => Failure::new(Exit::Conflict, e.to_string()).hint(
            "the repository holds another cluster's or timeline's WAL under this name; check which server archives here",
        ),
        PushError::Object(ObjectError::Corrupt { .. }) | PushError::Unverified { .. } => {
            Failure::new(Exit::Corrupt, e.to_string())
        }
        PushError::Object(_) => Failure::new(Exit::Repository, e.to_string())
            .hint("PostgreSQL retries archiving; the file stays in pg_wal until it succeeds"),
    }
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let runtime = super::runtime(Exit::Repository)?;
    let limit = std::time::Duration::from_secs(args.timeout);
    let codec = Arc::new(Codec::with_default_threads());
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let options = PushOptions {
        ahead: args.ahead,
        parallel: args.parallel.unwrap_or(2 * cores),
        state_dir: args.state_dir,
        encode: args.compress.options(),
    };
    let pushed = runtime.block_on(async {
        tokio::time::timeout(limit, push(&url, &args.file, codec, &options)).await
    });
    match pushed {
        Ok(Ok(report)) => {
            for (name, result) in report.ahead {
                if let Err(e) = result {
                    // PostgreSQL's own call for that file will try again and report it.
                    eprintln!("pitr: warning: could not archive {name} ahead: {e}");
                }
            }
            Ok(())
        }
        Ok(Err(e)) => Err(failure(e)),
        Err(_) => Err(Failure::new(
            Exit::Repository,
            format!(
                "could not archive \"{}\": no answer from the repository within {} s",
                args.file.display(),
                args.timeout
            ),
        )
        .hint("PostgreSQL retries archiving; the file stays in pg_wal until it succeeds")),
    }
}
