//! End-to-end tests: the real `pitr` binary against real PostgreSQL clusters and a real S3
//! server from the test bed. One test binary; one module per command.

mod backup;
mod bench;
mod check;
mod cli;
mod config;
mod copy;
mod drill;
mod encryption;
pub(crate) mod expire;
mod info;
mod init;
mod internal_errors;
mod restore;
mod restore_hostile;
mod stream;
mod verify;
mod wal_fetch;
mod wal_inspect;
mod wal_push;
mod worker_locks;

use std::process::{Command, Output};
use std::sync::Arc;

use repo::storage::{S3Settings, S3Storage, Storage};

/// The `pitr` binary under test.
pub fn pitr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pitr"))
}

/// A libpq connection string for `pg`'s socket as the bed's superuser.
pub fn socket(pg: &testbed::Cluster) -> String {
    format!(
        "host={} port={} user={}",
        pg.socket_dir().display(),
        pg.port(),
        testbed::SUPERUSER
    )
}

/// `pitr init` of the repository at `url` for cluster `pg` (read from its data directory),
/// with the bed's S3 settings when `s3` is given.
pub fn init_repo(url: &str, pg: &testbed::Cluster, s3: Option<&testbed::S3Server>) {
    let mut c = pitr();
    c.args(["init", "--repo", url, "--data-dir"])
        .arg(pg.data_dir());
    if let Some(s3) = s3 {
        c.envs(s3.env());
    }
    succeeds(&mut c);
}

/// Runs a command that must succeed, showing its stderr if it does not.
pub fn succeeds(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run the command");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `options` with the environment a server needs to archive into (and restore from)
/// repository `url` on the bed's S3 server: `PITR_REPO` and the S3 settings.
pub fn s3_server_env(
    mut options: testbed::ClusterOptions,
    s3: &testbed::S3Server,
    url: &str,
) -> testbed::ClusterOptions {
    options = options.env("PITR_REPO", url);
    for (k, v) in s3.env() {
        options = options.env(k, v);
    }
    options
}

/// Waits until `pg` (a restored cluster) has finished recovery and promoted.
pub fn wait_promoted(pg: &testbed::Cluster) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while pg.sql("SELECT pg_is_in_recovery()").unwrap() != "f" {
        assert!(
            std::time::Instant::now() < deadline,
            "still in recovery:\n{}",
            pg.server_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Storage on the test bed's S3 server at `prefix`, for checking what the binary stored.
pub fn bed_s3_storage(s3: &testbed::S3Server, prefix: &str) -> Arc<dyn Storage> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut settings = S3Settings::new(s3.bucket(), prefix);
    settings.endpoint = Some(s3.endpoint().to_owned());
    settings.region = Some(s3.region().to_owned());
    settings.path_style = true;
    settings.cache_dir = None;
    settings.credentials = Some((s3.access_key().to_owned(), s3.secret_key().to_owned()));
    Arc::new(rt.block_on(S3Storage::connect(settings)))
}

/// The command's stdout as JSON (a panic quoting it and stderr when it is not).
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A child process killed when dropped (a test that fails must not leave it running).
pub struct Reaped(pub Option<std::process::Child>);

impl Reaped {
    /// Sends `sig` (`-TERM`, `-KILL`) and waits for it to exit.
    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        let _ = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status();
        child.wait().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
