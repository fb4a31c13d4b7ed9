//! `pitr init`: creates a repository for one cluster in an empty location. Every other
//! command refuses a location without one, so a typo in the prefix or an unmounted
//! directory is an error instead of a new repository that "archives" to the wrong place.

use std::path::PathBuf;
use std::sync::Arc;

use repo::codec::Codec;
use repo::repository::Repository;
use serde_json::json;

use super::pg_args::{cluster_identity, connect, PgArgs};
use super::repo_args::{open_failure, RepoArgs};
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("cluster").required(true).multiple(false))]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// Read the cluster's identity from this server (as for pitr backup; PGHOST etc.)
    #[arg(long, group = "cluster", value_name = "CONNINFO")]
    pg: Option<String>,
    /// Read the cluster's identity from this data directory (global/pg_control, PG_VERSION,
    /// pg_wal); the server may be running or stopped
    #[arg(long, group = "cluster", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let runtime = super::runtime(Exit::Repository)?;
    let repo = runtime.block_on(async {
        let identity = match (&args.data_dir, &args.pg) {
            (Some(dir), _) => archiver::data_dir::identity(dir).map_err(|e| {
                Failure::new(Exit::BadInput, e)
                    .hint("--data-dir names the cluster's data directory (where PG_VERSION is)")
            })?,
            (None, pg) => {
                let settings = PgArgs {
                    pg: pg.clone().unwrap_or_default(),
                }
                .settings()?;
                let (mut conn, system) = connect(&settings).await?;
                cluster_identity(&mut conn, &system).await
            }
        };
        Repository::init(&url, &identity, Arc::new(Codec::new(1, 2)))
            .await
            .map_err(open_failure)
    })?;
    let c = repo.config();
    if args.json {
        println!(
            "{}",
            json!({
                "repository": url.to_string(),
                "system_identifier": c.system_identifier,
                "pg_version": c.pg_version,
                "wal_segment_size": c.wal_segment_size,
                "format": c.format,
            })
        );
    } else {
        println!(
            "initialized repository {url} for system {} (PostgreSQL {}, {} MiB segments)",
            c.system_identifier,
            c.pg_version,
            c.wal_segment_size >> 20
        );
    }
    Ok(())
}
