//! The OS user the PostgreSQL server runs as.
//!
//! PostgreSQL refuses to run as root, and development machines and CI run the tests as root.
//! Then the bed runs every server-side binary as an unprivileged user (`postgres`, or the one
//! named by `PITR_TEST_OS_USER`) and hands that user the directories it needs. Run as anyone
//! else, the bed runs the server as the current user.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Who server-side processes run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    /// Set when the tests run as root and must drop to this user.
    switch_to: Option<(u32, u32)>,
    name: String,
}

impl OsUser {
    /// The user to run PostgreSQL as, resolved from the current process and `/etc/passwd`.
    pub fn for_server() -> Result<OsUser> {
        let euid = std::fs::metadata("/proc/self")
            .context("read /proc/self to learn the effective user")?
            .uid();
        if euid != 0 {
            let name = std::env::var("USER").unwrap_or_else(|_| euid.to_string());
            return Ok(OsUser {
                switch_to: None,
                name,
            });
        }
        let name = std::env::var("PITR_TEST_OS_USER").unwrap_or_else(|_| "postgres".to_owned());
        let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4 && fields[0] == name {
                let uid = fields[2].parse().context("uid in /etc/passwd")?;
                let gid = fields[3].parse().context("gid in /etc/passwd")?;
                return Ok(OsUser {
                    switch_to: Some((uid, gid)),
                    name,
                });
            }
        }
        bail!(
            "tests run as root and there is no OS user {name:?} to run PostgreSQL as\n\
             HINT: install the postgresql package (it creates the user) or set PITR_TEST_OS_USER"
        )
    }

    /// The user's login name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when server-side commands run as another user than the tests.
    pub fn switches(&self) -> bool {
        self.switch_to.is_some()
    }

    /// Makes `cmd` run as this user.
    pub fn apply(&self, cmd: &mut Command) {
        if let Some((uid, gid)) = self.switch_to {
            cmd.uid(uid).gid(gid);
        }
    }

    /// Hands `path` (not recursively) to this user.
    pub fn give(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.switch_to {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }

    /// Hands `path` and everything below it to this user (symlinks themselves, not targets).
    /// An entry that is gone by the time it is reached is skipped: a restored directory may
    /// still have pitr's background workers renaming temporary files in it (the wal-fetch
    /// spool), and a file that no longer exists needs no owner.
    pub fn give_tree(&self, path: &Path) -> Result<()> {
        let Some((uid, gid)) = self.switch_to else {
            return Ok(());
        };
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
            Err(e) if gone(&e) => return Ok(()),
            r => r.with_context(|| format!("chown {}", path.display()))?,
        }
        let meta = match std::fs::symlink_metadata(path) {
            Err(e) if gone(&e) => return Ok(()),
            r => r?,
        };
        if meta.is_dir() {
            let entries = match std::fs::read_dir(path) {
                Err(e) if gone(&e) => return Ok(()),
                r => r?,
            };
            for entry in entries {
                match entry {
                    Err(e) if gone(&e) => {}
                    e => self.give_tree(&e?.path())?,
                }
            }
        }
        Ok(())
    }
}
