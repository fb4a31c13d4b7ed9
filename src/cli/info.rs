//! `pitr info`: which cluster a repository belongs to, and its format.

use std::sync::Arc;

use repo::codec::Codec;
use repo::repository::Repository;
use serde_json::json;

use super::repo_args::{open_failure, RepoArgs};
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let key = args.repo.key()?;
    let runtime = super::runtime(Exit::Repository)?;
    let repo = runtime
        .block_on(Repository::open(
            &url,
            &key,
            None,
            Arc::new(Codec::new(1, 2)),
        ))
        .map_err(open_failure)?;
    let c = repo.config();
    if args.json {
        let v = json!({
            "repository": url.to_string(),
            "format": c.format,
            "system_identifier": c.system_identifier,
            "pg_version": c.pg_version,
            "wal_segment_size": c.wal_segment_size,
            "encryption": c.encryption,
            "created": c.created,
            "created_by": c.created_by,
        });
        println!("{v}");
    } else {
        println!("repository {url}");
        println!(
            "  cluster       system {} (PostgreSQL {})",
            c.system_identifier, c.pg_version
        );
        println!("  segment size  {} MiB", c.wal_segment_size >> 20);
        println!("  format        {} (encryption {})", c.format, c.encryption);
        println!("  created       {} by {}", c.created, c.created_by);
    }
    Ok(())
}
