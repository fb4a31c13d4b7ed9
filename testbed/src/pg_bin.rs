//! Where the PostgreSQL server binaries are, and which major version they are.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A directory of PostgreSQL server binaries (initdb, pg_ctl, postgres, ...).
#[derive(Debug, Clone)]
pub struct PgBin {
    dir: PathBuf,
    major: u32,
}

impl PgBin {
    /// Finds the binaries: `PITR_PG_BINDIR`, else `pg_config --bindir`, else the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn locate() -> Result<PgBin> {
        if let Some(dir) = std::env::var_os("PITR_PG_BINDIR") {
            return PgBin::at(Path::new(&dir)).context("PITR_PG_BINDIR");
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if dir.join("initdb").is_file() {
                    return PgBin::at(&dir);
                }
            }
        }
        let mut newest: Option<(u32, PathBuf)> = None;
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            for entry in entries.flatten() {
                let Ok(major) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let bin = entry.path().join("bin");
                if bin.join("initdb").is_file() && newest.as_ref().is_none_or(|(m, _)| major > *m) {
                    newest = Some((major, bin));
                }
            }
        }
        match newest {
            Some((_, dir)) => PgBin::at(&dir),
            None => bail!(
                "no PostgreSQL server binaries found\n\
                 HINT: install postgresql (the test command does) or set PITR_PG_BINDIR"
            ),
        }
    }

    /// Uses the binaries in `dir`, asking `postgres --version` for the major version.
    pub fn at(dir: &Path) -> Result<PgBin> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("PostgreSQL bin dir {}", dir.display()))?;
        let out = Command::new(dir.join("postgres"))
            .arg("--version")
            .output()
            .with_context(|| format!("run {}/postgres --version", dir.display()))?;
        if !out.status.success() {
            bail!(
                "{}/postgres --version failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let major = parse_major(&text)
            .with_context(|| format!("unexpected `postgres --version` output: {text:?}"))?;
        Ok(PgBin { dir, major })
    }

    /// The directory holding the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PostgreSQL major version (13, 14, ...).
    pub fn major(&self) -> u32 {
        self.major
    }

    /// Path of one binary in this dir.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A client binary (psql, pgbench, ...): from this dir when it has one, else from PATH.
    /// The npm server-only builds ship no psql; a newer psql talks to older servers fine.
    pub fn client(&self, name: &str) -> PathBuf {
        let here = self.dir.join(name);
        if here.is_file() {
            here
        } else {
            PathBuf::from(name)
        }
    }
}

/// Major version from `postgres (PostgreSQL) 15.18 (Debian ...)` or `... 18beta1`.
fn parse_major(version_output: &str) -> Option<u32> {
    let version = version_output.split_whitespace().nth(2)?;
    let digits: String = version.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_major;

    #[test]
    fn major_from_version_lines() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 13.23\n"), Some(13));
        assert_eq!(parse_major("postgres (PostgreSQL) 18beta1\n"), Some(18));
        assert_eq!(parse_major("garbage"), None);
    }
}
