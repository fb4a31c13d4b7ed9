//! `pitr wal-fetch NAME DEST` (restore_command = 'pitr wal-fetch %f %p'): exit 0 with the
//! verified file at DEST; exit 1 only when the repository says it has no such file; any
//! other failure exits 200, above 125, so that PostgreSQL stops recovery instead of
//! treating it as the end of the archive. With prefetch on (the default), segments come
//! from the spool when the background worker has fetched them ahead, and each call makes
//! sure a worker is filling the spool with the segments that follow.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use repo::codec::Codec;
use restore::spool::default_dir;
use restore::wal_fetch::{fetch, from_spool, prefetch, Answer, FetchError, PrefetchOptions};
use walfmt::ArchiveFileKind;

use super::repo_args::{KeyArgs, RepoArgs};
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
    #[command(flatten)]
    prefetch: PrefetchArgs,
}

#[derive(Debug, clap::Args)]
struct PrefetchArgs {
    /// Keep this many segments after the one asked for fetched ahead in the spool (0: off)
    #[arg(
        long = "prefetch",
        env = "PITR_WAL_FETCH_PREFETCH",
        default_value_t = 16,
        value_name = "N"
    )]
    depth: usize,
    /// Segments the prefetch worker fetches at once
    #[arg(
        long = "prefetch-parallel",
        env = "PITR_WAL_FETCH_PARALLEL",
        default_value_t = 4,
        value_name = "N"
    )]
    parallel: usize,
    /// The spool of prefetched segments [default: .pitr/fetch beside DEST, in pg_wal]
    #[arg(long, env = "PITR_WAL_FETCH_SPOOL_DIR", value_name = "DIR")]
    spool_dir: Option<PathBuf>,
}

/// `pitr wal-prefetch`: the background worker wal-fetch starts (not for people).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    prefetch: PrefetchArgs,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url().map_err(|f| Failure {
        exit: Exit::FetchFailed,
        ..f
    })?;
    let spool_dir = (args.prefetch.depth > 0).then(|| {
        args.prefetch
            .spool_dir
            .clone()
            .unwrap_or_else(|| default_dir(&args.dest))
    });
    // Replay waits for this call: a segment already in the spool is handed over before any
    // runtime, thread or connection is set up.
    if let Some(dir) = &spool_dir {
        match from_spool(&url, dir, &args.name, &args.dest) {
            Answer::Delivered => {
                if ArchiveFileKind::of(&args.name) == ArchiveFileKind::Segment {
                    start_worker(&args.repo, dir, &args.prefetch);
                }
                return Ok(());
            }
            Answer::Absent => {
                let e = FetchError::NotFound(args.name.clone());
                return Err(Failure::new(Exit::NotFound, e.to_string()));
            }
            Answer::Ask => {}
        }
    }
    let key = args.repo.key().map_err(|f| Failure {
        exit: Exit::FetchFailed,
        ..f
    })?;
    let runtime = super::runtime(Exit::FetchFailed)?;
    let fetched = runtime.block_on(fetch(
        &url,
        &key,
        &args.name,
        &args.dest,
        Arc::new(Codec::with_default_threads()),
    ));
    match fetched {
        Ok(_) => {
            if let Some(dir) = spool_dir {
                if ArchiveFileKind::of(&args.name) == ArchiveFileKind::Segment {
                    start_worker(&args.repo, &dir, &args.prefetch);
                }
            }
            Ok(())
        }
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

/// Starts the prefetch worker for `dir` in the background unless one is running. The
/// worker is a cache filler: failing to start it is not the fetch's failure.
fn start_worker(repo: &RepoArgs, dir: &std::path::Path, prefetch: &PrefetchArgs) {
    let Ok(url) = repo.url_text() else {
        return;
    };
    start_prefetch(&url, &repo.key, dir, prefetch.depth, prefetch.parallel);
}

/// [`start_worker`] with its settings spelled out: `pitr restore --prefetch-wal` hands the
/// staging of WAL over to it once the files are written.
pub(super) fn start_prefetch(
    repo: &str,
    key: &KeyArgs,
    dir: &std::path::Path,
    depth: usize,
    parallel: usize,
) {
    if repo::worker::running(dir) {
        return;
    }
    let mut worker_args: Vec<std::ffi::OsString> = vec![
        "wal-prefetch".into(),
        "--repo".into(),
        repo.into(),
        "--prefetch".into(),
        depth.to_string().into(),
        "--prefetch-parallel".into(),
        parallel.to_string().into(),
        "--spool-dir".into(),
        dir.into(),
    ];
    worker_args.extend(key.worker_flags());
    let worker_args: Vec<&std::ffi::OsStr> = worker_args.iter().map(|a| a.as_os_str()).collect();
    let _ = super::spawn_worker(&worker_args);
}

pub fn run_worker(args: WorkerArgs) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let Some(spool) = args.prefetch.spool_dir else {
        return Err(Failure::new(
            Exit::BadInput,
            "wal-prefetch needs --spool-dir",
        ));
    };
    let runtime = super::runtime(Exit::FetchFailed)?;
    let options = PrefetchOptions {
        spool,
        depth: args.prefetch.depth,
        parallel: args.prefetch.parallel,
        linger: Duration::from_secs(5),
    };
    let key = args.repo.key().map_err(|f| Failure {
        exit: Exit::FetchFailed,
        ..f
    })?;
    runtime
        .block_on(prefetch(
            &url,
            &key,
            Arc::new(Codec::with_default_threads()),
            &options,
        ))
        .map_err(|e| Failure::new(Exit::FetchFailed, e.to_string()))
}
