//! `pitr check`: can pitr reach this server over a replication connection, and does the
//! repository (if one is named) belong to it? What pgBackRest's `check` answers, before
//! archiving or backing up relies on it.

use std::sync::Arc;

use repo::codec::Codec;
use repo::repository::{ClusterIdentity, OpenError, Repository};
use repo::url::RepoUrl;
use serde_json::json;

use super::pg_args::{connect, PgArgs};
use super::repo_args::open_failure;
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pg: PgArgs,
    /// Also check this repository belongs to the server (s3://... or file:///...)
    #[arg(long, env = "PITR_REPO", value_name = "URL")]
    repo: Option<String>,
    #[command(flatten)]
    key: super::repo_args::KeyArgs,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let settings = args.pg.settings()?;
    let url: Option<RepoUrl> = match &args.repo {
        Some(r) => Some(
            super::repo_args::RepoArgs {
                repo: Some(r.clone()),
                key: args.key.clone(),
            }
            .url()?,
        ),
        None => None,
    };
    let key = args.key.setting()?;
    let runtime = super::runtime(Exit::Database)?;
    runtime.block_on(async {
        let (mut conn, system) = connect(&settings).await?;
        let segment = conn.wal_segment_size().await;
        // How WAL leaves the server.
        let archive_mode = conn.show("archive_mode").await;
        let archive_command = conn.show("archive_command").await;
        let version = conn.server_version().unwrap_or("").to_owned();
        conn.close().await;
        let major: u32 = version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);

        let repository = match &url {
            None => None,
            Some(url) => {
                let identity = ClusterIdentity {
                    system_identifier: system.system_identifier,
                    pg_version: major,
                    wal_segment_size: segment,
                };
                match Repository::open(url, &key, None, Arc::new(Codec::new(1, 2))).await {
                    Ok(repo) => {
                        repo.check_cluster(&identity).map_err(open_failure)?;
                        Some("this cluster's")
                    }
                    Err(OpenError::NotInitialized { .. }) => {
                        Some("not initialized yet (the first wal-push creates it)")
                    }
                    Err(e) => return Err(open_failure(e)),
                }
            }
        };

        let archiving_warning = if archive_mode == "off" {
            Some("archive_mode is off: WAL is not archived (only pitr stream would keep it)")
        } else if !archive_command.contains("wal-push") {
            Some("archive_command does not run pitr wal-push")
        } else {
            None
        };
        if args.json {
            let v = json!({
                "server": settings.describe(),
                "server_version": version,
                "system_identifier": system.system_identifier.to_string(),
                "timeline": system.timeline,
                "wal_position": system.xlogpos.to_string(),
                "wal_segment_size": segment,
                "repository": url.as_ref().map(|u| u.to_string()),
                "repository_state": repository,
                "archive_mode": archive_mode,
                "archive_command": archive_command,
                "archiving_warning": archiving_warning,
            });
            println!("{v}");
        } else {
            println!("server      {} (PostgreSQL {version})", settings.describe());
            println!(
                "cluster     system {}, timeline {}, WAL at {}, segment size {} MiB",
                system.system_identifier,
                system.timeline,
                system.xlogpos,
                segment >> 20
            );
            if let (Some(url), Some(state)) = (&url, repository) {
                println!("repository  {url}: {state}");
            }
            println!(
                "archiving   archive_mode={archive_mode}, archive_command='{archive_command}'"
            );
            if let Some(w) = archiving_warning {
                eprintln!("pitr: warning: {w}");
            }
        }
        Ok(())
    })
}
