//! The test bed every pitr integration and end-to-end test stands on.
//!
//! - [`Cluster`]: a throwaway PostgreSQL cluster, initdb'd in a temp dir (or adopted from an
//!   existing data dir, such as a restored one), run as an unprivileged OS user when the tests
//!   run as root, and torn down on drop, also on panic and when the test process is killed.
//! - [`S3Server`]: a real S3-compatible server (s3s + s3s-fs) speaking HTTP on a free
//!   127.0.0.1 port and storing on disk, or an external endpoint named by the environment.
//!
//! - [`KmsServer`]: a real KMS-compatible server (moto's, from PyPI) on a free 127.0.0.1
//!   port, installed into a venv on first use.
//! - [`Fault`]: storage faults the bed's S3 server injects into its own responses
//!   ([`S3Server::set_faults`]): resets, stalls, cut responses, 503 SlowDown, 500 after the
//!   write.
//! - [`Proxy`]: a TCP proxy in front of a real server that can be told to go silent
//!   without closing anything (a lost network path).
//!
//! Nothing here is a mock: tests talk to the real servers over real sockets.

mod cluster;
mod faults;
pub mod kms;
mod os_user;
mod pg_bin;
mod port;
mod proxy;
mod s3;

pub use cluster::{Cluster, ClusterOptions, StopMode, PASSWORD, PASSWORD_ROLES, SUPERUSER};
pub use faults::{Fault, FaultCounts};
pub use kms::KmsServer;
pub use os_user::OsUser;
pub use pg_bin::PgBin;
pub use port::free_port;
pub use proxy::Proxy;
pub use s3::{serve as serve_s3, S3Server, WriteHeaders};

/// A fresh, unique name for objects, prefixes and dirs made by one test.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// True when the bed keeps its temp dirs for inspection (`PITR_TEST_KEEP=1`).
pub fn keep_dirs() -> bool {
    std::env::var_os("PITR_TEST_KEEP").is_some_and(|v| v != "0" && !v.is_empty())
}

/// A temp dir under the system temp dir (short paths keep Unix socket names legal).
pub(crate) fn temp_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    if keep_dirs() {
        dir.disable_cleanup(true);
        eprintln!("testbed: keeping {}", dir.path().display());
    }
    Ok(dir)
}
