//! `pitr copy --to TARGET`: brings another repository (another region, another store) in
//! step with this one, every object checked before and after; exit 5 when damage was found
//! (nothing damaged copied, nothing differing overwritten).

use std::sync::Arc;

use repo::codec::Codec;
use repo::repository::Repository;
use repo::url::RepoUrl;
use restore::copy::{copy, follow, CopyError, CopyMetrics, CopyOptions, CopyReport};

use super::repo_args::{open_failure, RepoArgs};
use super::{mb, Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The repository copied from
    #[command(flatten)]
    repo: RepoArgs,
    /// The repository copied into (made a copy of the source on the first run); S3 URLs
    /// may carry their own endpoint, region, path-style and profile; or a repository named
    /// in the configuration file
    #[arg(long, value_name = "URL|NAME", env = "PITR_COPY_TO")]
    to: String,
    /// Objects copied at once
    #[arg(
        long,
        value_name = "N",
        default_value_t = 8,
        env = "PITR_COPY_PARALLEL"
    )]
    parallel: usize,
    /// Keep copying what appears, a pass every --interval, until SIGTERM (which lets the
    /// objects in flight finish and exits 0)
    #[arg(long)]
    follow: bool,
    /// With --follow: how often a pass starts
    #[arg(long, value_name = "DURATION", default_value = "10s", env = "PITR_COPY_INTERVAL", value_parser = humantime::parse_duration)]
    interval: std::time::Duration,
    /// With --follow: serve Prometheus metrics on this address (host:port)
    #[arg(long, value_name = "ADDR", requires = "follow")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

/// `--follow`: passes until SIGTERM or SIGINT, a status line each (or a JSON line), metrics.
async fn follow_copy(
    args: &Args,
    url: &RepoUrl,
    key: &repo::slots::KeySetting,
    to: &RepoUrl,
    options: &CopyOptions,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), Failure> {
    let source = Repository::open(url, key, None, Arc::new(Codec::with_default_threads()))
        .await
        .map_err(open_failure)?;
    let metrics = Arc::new(CopyMetrics::default());
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Failure::new(Exit::BadInput, format!("could not listen on {addr}: {e}"))
        })?;
        if let Ok(bound) = listener.local_addr() {
            eprintln!("pitr: copy: metrics on http://{bound}/metrics");
        }
        let m = metrics.clone();
        tokio::spawn(archiver::stream::metrics::serve_text(
            listener,
            Arc::new(move || m.render()),
        ));
    }
    super::on_terminate(move || stop.store(true, std::sync::atomic::Ordering::SeqCst));
    eprintln!(
        "pitr: copy: following {url} into {to}, a pass every {:?}",
        args.interval
    );
    let json = args.json;
    let on_pass = move |r: &Result<CopyReport, CopyError>| match r {
        Ok(r) if json => println!("{}", serde_json::to_string(r).unwrap_or_default()),
        Ok(r) => {
            for p in &r.problems {
                println!("DAMAGED: {p}");
            }
            println!(
                "pass: copied {} object(s), {}, {} backup(s); lag {:.1} s{}",
                r.objects,
                mb(r.bytes),
                r.backups,
                r.lag_seconds,
                if r.stopped { "; stopping" } else { "" }
            );
        }
        Err(e) => eprintln!("pitr: copy: pass failed: {e}; trying again at the next"),
    };
    follow(&source, to, options, args.interval, &metrics, &on_pass).await;
    Ok(())
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let key = args.repo.key()?;
    let to: RepoUrl =
        super::repo_args::parse_url(&super::repo_args::resolve_repo(Some(&args.to))?)?;
    if to.overlaps(&url) {
        return Err(Failure::new(
            Exit::BadInput,
            "the target is the source repository, or lies inside it, or holds it",
        )
        .hint("copy into another bucket, or a prefix beside the source's"));
    }
    let runtime = super::runtime(Exit::Repository)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let options = CopyOptions {
        parallel: args.parallel.max(1),
        stop: Some(stop.clone()),
    };
    if args.follow {
        return runtime.block_on(follow_copy(&args, &url, &key, &to, &options, stop));
    }
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
        if let Some(why) = &report.server_side_refused {
            eprintln!("pitr: copy: NOTICE: the server refused to copy objects itself ({why}); their bytes were copied");
        }
        println!(
            "{}copied {} object(s), {} in {:.1} s{}; {} already there; {} backup(s) now in the target{}{}",
            if report.initialized { "made the target a copy; " } else { "" },
            report.objects,
            mb(report.bytes),
            report.seconds,
            if report.server_side > 0 {
                format!(" ({} by the server itself)", report.server_side)
            } else {
                String::new()
            },
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
