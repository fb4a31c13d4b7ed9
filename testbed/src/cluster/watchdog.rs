//! A watchdog that stops the postmaster if the test process dies without dropping its
//! [`Cluster`](super::Cluster) (killed by a test runner's timeout, SIGKILL, abort).
//!
//! pg_ctl detaches the postmaster, so it outlives the test process unless someone stops it.
//! The watchdog is a small shell reading a pipe whose only writer is the test process: when
//! that process dies, the kernel closes the pipe, the read ends, and the watchdog sends the
//! postmaster SIGQUIT (immediate shutdown), then SIGKILL if it is still there.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

const SCRIPT: &str = r#"trap '' INT TERM HUP
while read -r _; do :; done
pidfile="$1/postmaster.pid"
[ -f "$pidfile" ] || exit 0
pid=$(head -n 1 "$pidfile")
kill -QUIT "$pid" 2>/dev/null || exit 0
for _ in 1 2 3 4 5 6 7 8 9 10; do
  kill -0 "$pid" 2>/dev/null || exit 0
  sleep 0.5
done
kill -KILL "$pid" 2>/dev/null
exit 0
"#;

/// The running watchdog; dropping it without [`Watchdog::disarm`] leaves it armed.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
}

impl Watchdog {
    /// Starts a watchdog for the cluster whose data dir is `data_dir`.
    pub(crate) fn arm(data_dir: &Path) -> Result<Watchdog> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("pitr-bed-watchdog")
            .arg(data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the postmaster watchdog (sh)")?;
        Ok(Watchdog { child })
    }

    /// Ends the watchdog without it touching the server (after an orderly stop).
    pub(crate) fn disarm(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
