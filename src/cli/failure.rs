//! How a command fails: a one-line message in PostgreSQL's style (lower case, no final
//! period, naming the object), an optional HINT line, and a documented exit code.

use std::fmt;
use std::io::Write;
use std::process::ExitCode;

/// Exit codes other than 0 (success) and 2 (usage, from clap). README documents each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 1: `wal-fetch` only: the repository has no such file.
    NotFound = 1,
    /// 3: an input is not what it should be (a file that is not WAL, a bad argument value).
    BadInput = 3,
    /// 4: the repository cannot be used: unreachable, not initialized, another cluster's, or
    /// written by a newer pitr.
    Repository = 4,
    /// 5: data in the repository is damaged (a checksum or length does not match).
    Corrupt = 5,
    /// 6: refused: a different file is already stored under this name.
    Conflict = 6,
    /// 7: the database server cannot be reached, or refused the connection or a command.
    Database = 7,
    /// 8: `backup`: the WAL the backup needs did not reach the repository in time.
    WalMissing = 8,
    /// 9: `restore`: no backup and continuous WAL reach the target (nothing was written).
    Unreachable = 9,
    /// 10: `restore --start`: the files are restored, but the server did not come up on
    /// them (its log says why).
    StartFailed = 10,
    /// 11: the repository is encrypted and no key given opens it (missing, wrong, removed
    /// from its slots, or the key source failed), or a key was given for a plaintext one.
    /// Nothing was written.
    Key = 11,
    /// 12: `verify`: WAL a restore needs is missing, and nothing is damaged (damage: 5).
    MissingWal = 12,
    /// 13: `drill`: the drilled server came up, but a check did not pass (or could not
    /// connect).
    DrillFailed = 13,
    /// 14: busy: `delete` of a backup a running command relies on (a restore, a backup
    /// using it as its dedup base), nothing removed; `restore` or `verify` of a backup a
    /// running expire or delete is removing, nothing written.
    Busy = 14,
    /// 70: an internal error (a bug: the command panicked), as sysexits' EX_SOFTWARE.
    /// `wal-fetch` exits 200 instead.
    Internal = 70,
    /// 200: `wal-fetch` could not deliver a file the repository may hold (unreachable,
    /// damaged, misconfigured). Above 125, so PostgreSQL stops recovery.
    FetchFailed = 200,
}

/// A failed command: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub exit: Exit,
    /// One line, PostgreSQL style.
    pub message: String,
    /// What the operator can do about it.
    pub hint: Option<String>,
}

impl Failure {
    /// A failure with a message and no hint.
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a HINT line.
    pub fn hint(mut self, hint: impl Into<String>) -> Failure {
        self.hint = Some(hint.into());
        self
    }

    /// Prints the failure to stderr and returns its exit code.
    pub fn report(self) -> ExitCode {
        eprintln!("{self}");
        ExitCode::from(self.exit as u8)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pitr: error: {}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\nHINT: {hint}")?;
        }
        Ok(())
    }
}

/// Makes a panic anywhere in the process (the main thread, a worker thread, a runtime task)
/// end it at once with `exit` and one line on stderr naming `command` and where it
/// happened: never Rust's default exit 101, which PostgreSQL reads as "not found" from
/// `wal-fetch` (and may end recovery early), and never a process left waiting on a thread
/// that died.
pub fn exit_on_panic(command: &'static str, exit: Exit) {
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("panic");
        let _ = writeln!(
            std::io::stderr(),
            "{}",
            internal_error(command, message, info.location())
        );
        std::process::exit(exit as i32);
    }));
}

/// The line an internal error prints: one line, whatever the panic message holds.
fn internal_error(
    command: &str,
    message: &str,
    location: Option<&std::panic::Location<'_>>,
) -> String {
    let message: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let at = location.map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
    format!(
        "pitr: error: internal error in {command}: {}{at}",
        message.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_error_is_one_line_saying_where() {
        let here = std::panic::Location::caller();
        let line = internal_error(
            "wal-fetch",
            "assertion `left == right` failed\n  left: 1\n right: 2",
            Some(here),
        );
        assert_eq!(
            line,
            format!(
                "pitr: error: internal error in wal-fetch: assertion `left == right` failed; \
                 left: 1; right: 2 at {}:{}",
                here.file(),
                here.line()
            )
        );
        assert!(!line.contains('\n'));
    }
}
