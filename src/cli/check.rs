//! `pitr check`: can pitr reach this server over a replication connection, and does the
//! repository (if one is named) belong to it? What pgBackRest's `check` answers, before
//! archiving or backing up relies on it.

use std::sync::Arc;

use archiver::pg::{ConnError, PgSettings, ReplicationConn};
use repo::codec::Codec;
use repo::repository::{ClusterIdentity, OpenError, Repository};
use repo::url::RepoUrl;
use serde_json::json;

use super::repo_args::open_failure;
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The server: a connection string (key=value ... or postgresql://...), on top of the
    /// libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGSSLMODE, ...)
    #[arg(long, value_name = "CONNINFO", default_value = "")]
    pg: String,
    /// Also check this repository belongs to the server (s3://... or file:///...)
    #[arg(long, env = "PITR_REPO", value_name = "URL")]
    repo: Option<String>,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

/// A failure to reach or use the server, with a HINT for the usual causes.
fn connect_failure(settings: &PgSettings, e: ConnError) -> Failure {
    let hint = match e.server().map(|s| s.code.as_str()) {
        Some("28P01") => Some(
            "check the password: PGPASSWORD, password= in --pg, or the password file (~/.pgpass)"
                .to_owned(),
        ),
        Some("28000") => Some(format!(
            "pg_hba.conf needs a line for the \"replication\" database and user \"{}\"",
            settings.user
        )),
        Some("42501") => Some(format!(
            "user \"{}\" needs the REPLICATION attribute",
            settings.user
        )),
        Some(_) => None,
        None => match &e {
            ConnError::Connect { .. } => {
                Some("is the server running, and are host and port right?".to_owned())
            }
            _ => None,
        },
    };
    let failure = Failure::new(Exit::Database, e.to_string());
    match hint {
        Some(h) => failure.hint(h),
        None => failure,
    }
}

/// `16MB` / `1GB` (SHOW's units) in bytes.
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "kB" => n << 10,
        "MB" => n << 20,
        "GB" => n << 30,
        _ => return None,
    })
}

/// A setting's value as SHOW prints it (empty if it cannot be read).
async fn show(conn: &mut ReplicationConn, name: &str) -> String {
    conn.simple_query(&format!("SHOW {name}"))
        .await
        .ok()
        .and_then(|sets| sets.first().and_then(|s| s.text(0, name)))
        .unwrap_or_default()
}

pub fn run(args: Args) -> Result<(), Failure> {
    let settings = PgSettings::from_env_and(&args.pg).map_err(|e| {
        Failure::new(Exit::BadInput, e.to_string())
            .hint("--pg takes key=value pairs (host=... port=... user=...) or a postgresql:// URI")
    })?;
    let url: Option<RepoUrl> = match &args.repo {
        Some(r) => Some(super::repo_args::RepoArgs { repo: r.clone() }.url()?),
        None => None,
    };
    let runtime = super::runtime(Exit::Database)?;
    runtime.block_on(async {
        let mut conn = ReplicationConn::connect(&settings)
            .await
            .map_err(|e| connect_failure(&settings, e))?;
        let system = conn
            .identify_system()
            .await
            .map_err(|e| connect_failure(&settings, e))?;
        let segment = parse_size(&show(&mut conn, "wal_segment_size").await).unwrap_or(16 << 20);
        // How WAL leaves the server (walsenders answer SHOW for any setting).
        let archive_mode = show(&mut conn, "archive_mode").await;
        let archive_command = show(&mut conn, "archive_command").await;
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
                match Repository::open(url, None, Arc::new(Codec::new(1, 2))).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_show_prints_them() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("64kB"), Some(64 << 10));
        assert_eq!(parse_size("16"), None);
    }
}
