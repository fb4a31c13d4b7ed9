//! `pitr wal-fetch NAME DEST` (restore_command = 'pitr wal-fetch %f %p'): exit 0 with the
//! verified file at DEST; exit 1 only when the repository says it has no such file; any
//! other failure exits 200, above 125, so that PostgreSQL stops recovery instead of
//! treating it as the end of the archive.

use std::path::PathBuf;
use std::sync::Arc;

use repo::codec::Codec;
use restore::wal_fetch::{fetch, FetchError};

use super::repo_args::RepoArgs;
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// The WAL file's name (PostgreSQL's %f)
    #[arg(value_name = "NAME")]
    name: String,
    /// Where to put it (PostgreSQL's %p)
    #[arg(value_name = "DEST")]
    dest: PathBuf,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url().map_err(|f| Failure {
        exit: Exit::FetchFailed,
        ..f
    })?;
    let runtime = super::runtime(Exit::FetchFailed)?;
    let fetched = runtime.block_on(fetch(
        &url,
        &args.name,
        &args.dest,
        Arc::new(Codec::with_default_threads()),
    ));
    match fetched {
        Ok(()) => Ok(()),
        Err(e @ FetchError::NotFound(_)) => Err(Failure::new(Exit::NotFound, e.to_string())),
        Err(e) => {
            let hint = match &e {
                FetchError::Open(o) => o.hint(),
                _ => Some("recovery stops here rather than end early; fix the cause and start the server again"),
            };
            let failure = Failure::new(Exit::FetchFailed, e.to_string());
            Err(match hint {
                Some(h) => failure.hint(h),
                None => failure,
            })
        }
    }
}
