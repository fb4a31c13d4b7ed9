//! `pitr wal-push FILE` (archive_command = 'pitr wal-push %p'): exit 0 only once the file
//! is stored and read back with its checksum, or the same bytes were already stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use archiver::wal_push::{
    answered_locally, await_worker, pg_wal_of, push_after, push_ahead, worker_needed, Ahead,
    PushError, PushOptions,
};
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
    #[command(flatten)]
    ahead: AheadArgs,
}

/// How files PostgreSQL has marked ready are stored ahead of its calls.
#[derive(Debug, clap::Args)]
pub struct AheadArgs {
    /// A background worker stores the files PostgreSQL has marked ready, up to this many
    /// ahead of its calls for them, which then return after a cheap check (0: off)
    #[arg(
        long,
        env = "PITR_WAL_PUSH_AHEAD",
        default_value_t = 8,
        value_name = "N"
    )]
    ahead: usize,
    /// Files the worker reads, compresses and uploads at once [default: twice the cores]
    #[arg(long, env = "PITR_WAL_PUSH_PARALLEL", value_name = "N")]
    parallel: Option<usize>,
    /// Where records of files archived ahead are kept [default: pg_wal/.pitr/push]
    #[arg(long, env = "PITR_WAL_PUSH_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A call answered from the worker's record also reads the stored object's header
    /// back from the repository (the worker did before recording it; off: a local check)
    #[arg(long, env = "PITR_WAL_PUSH_RECHECK")]
    recheck: bool,
    #[command(flatten)]
    compress: CompressArgs,
}

impl AheadArgs {
    fn options(&self) -> PushOptions {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        PushOptions {
            ahead: self.ahead,
            parallel: self.parallel.unwrap_or(2 * cores),
            state_dir: self.state_dir.clone(),
            encode: self.compress.options(),
            recheck: self.recheck,
            ..PushOptions::default()
        }
    }
}

/// The hidden `wal-push-worker` command: the background worker a push starts.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The pg_wal directory whose ready files to store
    #[arg(long, value_name = "DIR")]
    pg_wal: PathBuf,
    #[command(flatten)]
    ahead: AheadArgs,
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

/// Starts the background worker for `pg_wal` and waits briefly (a second at most, never
/// past `deadline`) until it holds its lock, so that this call waits for it instead of
/// racing it.
fn start_worker(
    repo: &str,
    key: &super::repo_args::KeyArgs,
    pg_wal: &Path,
    args: &AheadArgs,
    options: &PushOptions,
    deadline: Instant,
) {
    let Some(state) = options.state(pg_wal) else {
        return;
    };
    let (ahead, parallel) = (options.ahead.to_string(), options.parallel.to_string());
    let level = args.compress.compress_level.to_string();
    let mut worker_args: Vec<std::ffi::OsString> = vec![
        "wal-push-worker".into(),
        "--repo".into(),
        repo.into(),
        "--pg-wal".into(),
        pg_wal.into(),
        "--ahead".into(),
        ahead.into(),
        "--parallel".into(),
        parallel.into(),
        "--compress-level".into(),
        level.into(),
        "--state-dir".into(),
        state.dir().into(),
    ];
    worker_args.extend(key.worker_flags());
    let worker_args: Vec<&std::ffi::OsStr> = worker_args.iter().map(|a| a.as_os_str()).collect();
    let Some(mut child) = super::spawn_worker(&worker_args) else {
        return;
    };
    let deadline = deadline.min(Instant::now() + Duration::from_secs(1));
    while !state.worker_running() && Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn run(args: Args) -> Result<(), Failure> {
    // The whole call, waiting for the worker included, answers within --timeout.
    let deadline = Instant::now() + Duration::from_secs(args.timeout.min(u64::from(u32::MAX)));
    let url = args.repo.url()?;
    let mut options = args.ahead.options();
    options.key = args.repo.key()?;
    let timed_out = |what: &str| {
        Failure::new(
            Exit::Repository,
            format!(
                "could not archive \"{}\": {what} within {} s",
                args.file.display(),
                args.timeout
            ),
        )
        .hint("PostgreSQL retries archiving; the file stays in pg_wal until it succeeds")
    };
    // Decided and done before the runtime starts: starting waits (briefly) on the process.
    let pg_wal = pg_wal_of(&args.file);
    if worker_needed(&args.file, &options) {
        start_worker(
            &url.to_string(),
            &args.repo.key,
            &pg_wal,
            &args.ahead,
            &options,
            deadline,
        );
    }
    // A file the worker stored is most often answered here, with no runtime, no threads
    // and no connection.
    let ahead = await_worker(&args.file, &options, deadline);
    match &ahead {
        Ahead::Recorded(record) if answered_locally(&url, &args.file, record, &options) => {
            return Ok(())
        }
        Ahead::StillBusy => return Err(timed_out("the background worker did not store it")),
        _ => {}
    }
    let runtime = super::runtime(Exit::Repository)?;
    let codec = Arc::new(Codec::with_default_threads());
    let limit = deadline.saturating_duration_since(Instant::now());
    let pushed = runtime.block_on(async {
        tokio::time::timeout(limit, push_after(&url, &args.file, codec, &options, ahead)).await
    });
    match pushed {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(failure(e)),
        Err(_) => Err(timed_out("no answer from the repository")),
    }
}

pub fn run_worker(args: WorkerArgs) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let mut options = args.ahead.options();
    options.key = args.repo.key()?;
    let runtime = super::runtime(Exit::Repository)?;
    runtime
        .block_on(push_ahead(
            &url,
            &args.pg_wal,
            Arc::new(Codec::with_default_threads()),
            &options,
        ))
        .map_err(failure)
}
