//! Talking to PostgreSQL: connection settings as libpq takes them, and the replication
//! connection (base backups and streaming use it).

pub mod base_backup;
pub mod conn;
mod keywords;
pub mod settings;
mod tls;

pub use conn::{ConnError, ReplicationConn, Reply, ResultSet, ServerError, SystemInfo};
pub use settings::{Keepalives, PgSettings, SettingsError, DEFAULT_CONNECT_TIMEOUT};
