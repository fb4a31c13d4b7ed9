//! The server option shared by every command that connects to PostgreSQL, and how
//! connection failures become messages, HINTs and exit code 7.

use archiver::pg::{ConnError, PgSettings, ReplicationConn, SystemInfo};

use super::{Exit, Failure};

#[derive(clap::Args)]
pub struct PgArgs {
    /// The server: a connection string (key=value ... or postgresql://...), on top of the
    /// libpq environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGSSLMODE, ...)
    #[arg(long, value_name = "CONNINFO", default_value = "")]
    pub pg: String,
}

/// The connection string may hold a password: Debug never shows it.
impl std::fmt::Debug for PgArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgArgs").finish_non_exhaustive()
    }
}

impl PgArgs {
    /// The connection settings, or a bad-input failure with a HINT.
    pub fn settings(&self) -> Result<PgSettings, Failure> {
        PgSettings::from_env_and(&self.pg).map_err(|e| {
            Failure::new(Exit::BadInput, e.to_string()).hint(
                "--pg takes key=value pairs (host=... port=... user=...) or a postgresql:// URI",
            )
        })
    }
}

/// A failure to reach or use the server, with a HINT for the usual causes.
pub fn connect_failure(settings: &PgSettings, e: ConnError) -> Failure {
    let hint = match e.server().map(|s| s.code.as_str()) {
        // Never suggest password= in --pg: command lines are visible in ps.
        Some("28P01") => Some(
            "check the password: PGPASSWORD, or the password file (~/.pgpass or PGPASSFILE)"
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
            ConnError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::TimedOut =>
            {
                Some("is the server reachable? connect_timeout=N in --pg (or PGCONNECT_TIMEOUT) sets how long to wait".to_owned())
            }
            ConnError::Connect { .. } => {
                Some("is the server running, and are host and port right?".to_owned())
            }
            ConnError::Auth(m) if m.contains("no password supplied") => Some(
                "set PGPASSWORD, or add the password to the password file (~/.pgpass or PGPASSFILE)"
                    .to_owned(),
            ),
            _ => None,
        },
    };
    let failure = Failure::new(Exit::Database, e.to_string());
    match hint {
        Some(h) => failure.hint(h),
        None => failure,
    }
}

/// A replication connection to the server and what IDENTIFY_SYSTEM says of it; failures
/// exit 7 with a HINT.
pub async fn connect(settings: &PgSettings) -> Result<(ReplicationConn, SystemInfo), Failure> {
    let mut conn = ReplicationConn::connect(settings)
        .await
        .map_err(|e| connect_failure(settings, e))?;
    let system = conn
        .identify_system()
        .await
        .map_err(|e| connect_failure(settings, e))?;
    Ok((conn, system))
}

/// The cluster `conn` is connected to, as a repository records it.
pub async fn cluster_identity(
    conn: &mut ReplicationConn,
    system: &SystemInfo,
) -> repo::repository::ClusterIdentity {
    repo::repository::ClusterIdentity {
        system_identifier: system.system_identifier,
        pg_version: conn.server_major(),
        wal_segment_size: conn.wal_segment_size().await,
    }
}
