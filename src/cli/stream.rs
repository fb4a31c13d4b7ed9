//! `pitr stream`: the streaming service, until SIGTERM or SIGINT (then it makes what it
//! holds durable and exits 0). Prometheus metrics on `--metrics-addr`.

use std::sync::Arc;
use std::time::Duration;

use archiver::stream::metrics::{serve, Metrics};
use archiver::stream::{run as stream, StreamConfig, StreamError};
use archiver::wal_push::PushError;
use tokio::sync::watch;

use super::pg_args::{connect_failure, PgArgs};
use super::repo_args::{open_failure, RepoArgs};
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    pg: PgArgs,
    /// The physical replication slot to stream from
    #[arg(
        long,
        env = "PITR_STREAM_SLOT",
        value_name = "NAME",
        default_value = "pitr"
    )]
    slot: String,
    /// Create the slot if it does not exist (RESERVE_WAL)
    #[arg(long)]
    create_slot: bool,
    /// How often received WAL is made durable in the repository
    #[arg(long, value_name = "DURATION", default_value = "1s", env = "PITR_STREAM_FLUSH_INTERVAL", value_parser = humantime::parse_duration)]
    flush_interval: Duration,
    /// Make WAL durable as soon as it arrives and tell the server at once: with this
    /// connection's application_name in synchronous_standby_names, commits wait for it
    #[arg(long, env = "PITR_STREAM_SYNC", overrides_with = "no_sync")]
    sync: bool,
    /// Not synchronous, whatever the configuration file or PITR_STREAM_SYNC says
    #[arg(long, overrides_with = "sync")]
    no_sync: bool,
    /// A server silent this long is taken for gone and connected to again (asked for a
    /// reply at half of it, as wal_receiver_timeout); 0 waits forever
    #[arg(long, value_name = "DURATION", env = "PITR_STREAM_RECEIVE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    receive_timeout: Duration,
    /// Serve Prometheus metrics on this address (host:port)
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

fn failure(e: StreamError, settings: &archiver::pg::PgSettings) -> Failure {
    let exit = match e {
        StreamError::Conn(c) => return connect_failure(settings, c),
        StreamError::Open(o) => return open_failure(o),
        StreamError::SlotMissing(_)
        | StreamError::SlotNotPhysical(_)
        | StreamError::WalLost { .. } => Exit::Database,
        StreamError::Push(PushError::Conflict { .. }) => Exit::Conflict,
        _ => Exit::Repository,
    };
    let f = Failure::new(exit, format!("stream: {e}"));
    match e.hint() {
        Some(h) => f.hint(h),
        None => f,
    }
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let settings = args.pg.settings()?;
    if args.slot.is_empty()
        || args.slot.len() > 63
        || !args
            .slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Failure::new(
            Exit::BadInput,
            format!("invalid slot name \"{}\"", args.slot),
        )
        .hint("slot names are lower-case letters, digits and underscores, at most 63"));
    }
    let config = StreamConfig {
        key: args.repo.key()?,
        slot: args.slot.clone(),
        create_slot: args.create_slot,
        flush_interval: args.flush_interval.max(Duration::from_millis(10)),
        sync: args.sync && !args.no_sync,
        status_interval: Duration::from_secs(10)
            .min(args.flush_interval.max(Duration::from_millis(100)) * 10),
        receive_timeout: Some(args.receive_timeout).filter(|t| !t.is_zero()),
    };
    let runtime = super::runtime(Exit::Database)?;
    runtime.block_on(async {
        let metrics = Arc::new(Metrics::default());
        if let Some(addr) = args.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Failure::new(Exit::BadInput, format!("could not listen on {addr}: {e}"))
            })?;
            // The address as bound: with port 0, the one the kernel chose.
            if let Ok(bound) = listener.local_addr() {
                eprintln!("pitr: stream: metrics on http://{bound}/metrics");
            }
            tokio::spawn(serve(listener, metrics.clone()));
        }
        let (tx, rx) = watch::channel(false);
        super::on_terminate(move || {
            let _ = tx.send(true);
        });
        eprintln!(
            "pitr: stream: from {} (slot \"{}\") into {url}{}",
            settings.describe(),
            args.slot,
            if args.sync && !args.no_sync {
                ", synchronous"
            } else {
                ""
            }
        );
        stream(&settings, &url, &config, metrics, rx)
            .await
            .map_err(|e| failure(e, &settings))
    })
}
