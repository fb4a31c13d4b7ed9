//! The recovery configuration of a restored data directory: `recovery.signal`, and in
//! `postgresql.auto.conf` the restore_command and recovery target, replacing any such lines
//! the backup carried. Nothing secret is written here: credentials stay in the server's
//! environment or the AWS configuration.

use std::io;
use std::path::Path;

use crate::target::Target;

/// What recovery should do at the target (`recovery_target_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pause (PostgreSQL's default; needs hot_standby).
    Pause,
    /// Become a primary on a new timeline.
    Promote,
    /// Stop the server.
    Shutdown,
}

/// What becomes of the backup's `archive_mode` in the restored server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArchiveMode {
    /// Kept (a restored server that replaces production archives on its new timeline),
    /// except `always`, which becomes `on`: with `always` the server would archive every
    /// segment recovery fetched all over again.
    #[default]
    Preserve,
    /// Off (a drill, a copy for analysis: nothing goes back to the repository).
    Off,
}

/// The settings to write.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// restore_command, as the shell should run it.
    pub restore_command: String,
    /// Where to stop.
    pub target: Target,
    /// Stop just before the target instead of just after.
    pub exclusive: bool,
    /// `latest`, `current` or a number; None leaves PostgreSQL's default (latest).
    pub timeline: Option<String>,
    /// None leaves PostgreSQL's default (pause).
    pub action: Option<Action>,
    /// Write `standby.signal` instead of `recovery.signal`: the server recovers as a
    /// standby until promoted (what `pitr restore --start` does without a target).
    pub standby: bool,
    /// What becomes of archive_mode.
    pub archive_mode: ArchiveMode,
}

/// A postgresql.conf string literal.
pub fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A word for a POSIX shell, quoted only if it needs to be.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@%,".contains(&b))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Settings pitr replaces: restore_command and every recovery target setting.
fn is_ours(line: &str) -> bool {
    let key = line
        .trim_start()
        .split(|c: char| c == '=' || c.is_whitespace())
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    key == "restore_command"
        || key.starts_with("recovery_target")
        || key == "primary_conninfo"
        || key == "primary_slot_name"
}

/// The key of a setting line (lowercase; empty for a comment or blank line).
fn line_key(line: &str) -> String {
    let line = line.trim_start();
    if line.starts_with('#') {
        return String::new();
    }
    line.split(|c: char| c == '=' || c.is_whitespace())
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// The value of a setting line (`name = value` or `name value`, the value quoted or bare,
/// a `#` comment after it), lowercased unless `keep_case`.
fn line_value(line: &str, name: &str, keep_case: bool) -> Option<String> {
    let rest = line.trim_start().get(name.len()..)?.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim();
    let value = match rest.strip_prefix('\'') {
        Some(quoted) => quoted.split('\'').next()?,
        None => rest.split(|c: char| c == '#' || c.is_whitespace()).next()?,
    };
    Some(if keep_case {
        value.to_owned()
    } else {
        value.to_ascii_lowercase()
    })
}

/// The value of the last `name` line in `text` (postgresql.conf syntax), lowercased.
fn last_setting(text: &str, name: &str) -> Option<String> {
    text.lines()
        .filter(|l| line_key(l) == name)
        .rev()
        .find_map(|l| line_value(l, name, false))
}

/// The value `name` ends up with in the configuration file at `path`, following its
/// `include`, `include_if_exists` and `include_dir` lines in order (relative paths from
/// the including file's directory; at most 10 deep, as PostgreSQL).
fn setting_in_tree(path: &Path, name: &str, depth: u32) -> Option<String> {
    if depth > 10 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let here = path.parent().unwrap_or(Path::new("."));
    let mut value = None;
    for line in text.lines() {
        let key = line_key(line);
        let found = if key == name {
            line_value(line, name, false)
        } else if key == "include" || key == "include_if_exists" {
            line_value(line, &key, true)
                .and_then(|f| setting_in_tree(&here.join(f), name, depth + 1))
        } else if key == "include_dir" {
            line_value(line, &key, true).and_then(|d| {
                let dir = here.join(d);
                let mut files: Vec<_> = std::fs::read_dir(&dir)
                    .ok()?
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".conf") && !n.starts_with('.'))
                    .collect();
                files.sort();
                files
                    .iter()
                    .rev()
                    .find_map(|f| setting_in_tree(&dir.join(f), name, depth + 1))
            })
        } else {
            None
        };
        if found.is_some() {
            value = found;
        }
    }
    value
}

/// The `archive_mode` line to write, given the value the data directory's configuration
/// gives it (postgresql.conf with what it includes, then postgresql.auto.conf, which wins).
fn archive_mode_line(mode: ArchiveMode, effective: Option<&str>) -> Option<String> {
    match mode {
        ArchiveMode::Off => Some("archive_mode = 'off'".to_owned()),
        ArchiveMode::Preserve => {
            (effective == Some("always")).then(|| "archive_mode = 'on'".to_owned())
        }
    }
}

/// The lines pitr appends.
pub fn settings_lines(c: &RecoveryConfig) -> Vec<String> {
    let mut out = vec![
        "# recovery settings written by pitr restore".to_owned(),
        format!("restore_command = {}", conf_quote(&c.restore_command)),
        // A standby's backup carries where it streamed from: the restored server (a
        // standby itself until promoted, with --start) must not connect there.
        "primary_conninfo = ''".to_owned(),
        "primary_slot_name = ''".to_owned(),
    ];
    let target = match &c.target {
        Target::End => None,
        Target::Immediate => Some(("recovery_target", "immediate".to_owned())),
        Target::Time(t) => Some(("recovery_target_time", t.to_pg_utc())),
        Target::Lsn(l) => Some(("recovery_target_lsn", l.to_string())),
        Target::Xid(x) => Some(("recovery_target_xid", x.clone())),
        Target::Name(n) => Some(("recovery_target_name", n.clone())),
    };
    // Every target setting is written, the ones not chosen empty: one left in
    // postgresql.conf or an included file (a standby's, an earlier restore's) would stop
    // recovery early, or clash with the chosen one ("multiple recovery targets"). The empty
    // ones first: PostgreSQL applies them in this order and refuses emptying one once
    // another is set.
    let keys = [
        "recovery_target",
        "recovery_target_lsn",
        "recovery_target_name",
        "recovery_target_time",
        "recovery_target_xid",
    ];
    for key in keys {
        if target.as_ref().is_none_or(|(k, _)| *k != key) {
            out.push(format!("{key} = ''"));
        }
    }
    if let Some((key, value)) = &target {
        out.push(format!("{key} = {}", conf_quote(value)));
    }
    let exclusive =
        target.is_some() && c.exclusive && !matches!(c.target, Target::Immediate | Target::Name(_));
    out.push(format!(
        "recovery_target_inclusive = {}",
        if exclusive { "off" } else { "on" }
    ));
    if let Some(tli) = &c.timeline {
        out.push(format!("recovery_target_timeline = {}", conf_quote(tli)));
    }
    if let Some(a) = c.action {
        let a = match a {
            Action::Pause => "pause",
            Action::Promote => "promote",
            Action::Shutdown => "shutdown",
        };
        out.push(format!("recovery_target_action = {}", conf_quote(a)));
    }
    out
}

/// Writes `recovery.signal` (or `standby.signal`) and the settings into `data_dir`,
/// replacing stale ones.
pub fn write(data_dir: &Path, c: &RecoveryConfig) -> io::Result<()> {
    let auto = data_dir.join("postgresql.auto.conf");
    let old = match std::fs::read_to_string(&auto) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let effective = last_setting(&old, "archive_mode")
        .or_else(|| setting_in_tree(&data_dir.join("postgresql.conf"), "archive_mode", 0));
    let archive_mode = archive_mode_line(c.archive_mode, effective.as_deref());
    let mut text: String = old
        .lines()
        .filter(|l| !is_ours(l) && l.trim() != "# recovery settings written by pitr restore")
        .filter(|l| archive_mode.is_none() || line_key(l) != "archive_mode")
        .map(|l| format!("{l}\n"))
        .collect();
    for l in settings_lines(c).into_iter().chain(archive_mode) {
        text.push_str(&l);
        text.push('\n');
    }
    crate::spool::write_durably(data_dir, "postgresql.auto.conf", text.as_bytes())?;
    let (signal, other) = if c.standby {
        ("standby.signal", "recovery.signal")
    } else {
        ("recovery.signal", "standby.signal")
    };
    // A backup of a standby may carry its standby.signal: with both, PostgreSQL would be
    // a standby whatever was asked.
    match std::fs::remove_file(data_dir.join(other)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crate::spool::write_durably(data_dir, signal, b"")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walfmt::PgTimestamp;

    #[test]
    fn stale_recovery_lines_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("postgresql.auto.conf"),
            "# Do not edit this file manually!\nwork_mem = '8MB'\nrestore_command = 'cp x %p'\nrecovery_target_time = '2020-01-01 00:00:00+00'\n",
        )
        .unwrap();
        let c = RecoveryConfig {
            restore_command: "/usr/bin/pitr wal-fetch --repo 's3://b/it''s' %f %p".into(),
            target: Target::Time(PgTimestamp::from_unix_micros(1_778_727_600_000_000)),
            exclusive: true,
            timeline: Some("latest".into()),
            action: Some(Action::Promote),
            standby: false,
            archive_mode: ArchiveMode::Preserve,
        };
        write(dir.path(), &c).unwrap();
        write(dir.path(), &c).unwrap(); // twice: still one set of lines
        let text = std::fs::read_to_string(dir.path().join("postgresql.auto.conf")).unwrap();
        assert_eq!(
            text,
            "# Do not edit this file manually!\nwork_mem = '8MB'\n\
             # recovery settings written by pitr restore\n\
             restore_command = '/usr/bin/pitr wal-fetch --repo ''s3://b/it''''s'' %f %p'\n\
             primary_conninfo = ''\n\
             primary_slot_name = ''\n\
             recovery_target = ''\n\
             recovery_target_lsn = ''\n\
             recovery_target_name = ''\n\
             recovery_target_xid = ''\n\
             recovery_target_time = '2026-05-14 03:00:00.000000+00'\n\
             recovery_target_inclusive = off\n\
             recovery_target_timeline = 'latest'\n\
             recovery_target_action = 'promote'\n"
        );
        assert!(dir.path().join("recovery.signal").exists());
        // A standby restore swaps the signal files, whichever the backup carried.
        write(dir.path(), &RecoveryConfig { standby: true, ..c }).unwrap();
        assert!(dir.path().join("standby.signal").exists());
        assert!(!dir.path().join("recovery.signal").exists());
    }

    #[test]
    fn archive_mode_always_becomes_on_and_off_is_off() {
        let p = ArchiveMode::Preserve;
        let on = Some("archive_mode = 'on'".to_owned());
        let effective = |conf: &str, auto: &str| {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("postgresql.conf"), conf).unwrap();
            last_setting(auto, "archive_mode")
                .or_else(|| setting_in_tree(&d.path().join("postgresql.conf"), "archive_mode", 0))
        };
        let line = |conf: &str, auto: &str| archive_mode_line(p, effective(conf, auto).as_deref());
        assert_eq!(line("archive_mode = on\n", ""), None);
        assert_eq!(line("", ""), None);
        assert_eq!(line("archive_mode = always # standby\n", ""), on);
        assert_eq!(line("archive_mode='always'\n", ""), on);
        assert_eq!(line("#archive_mode = always\n", ""), None);
        // postgresql.auto.conf wins; the last line wins.
        assert_eq!(
            line("archive_mode = always\n", "archive_mode = 'on'\n"),
            None
        );
        assert_eq!(line("archive_mode on\narchive_mode ALWAYS\n", ""), on);
        assert_eq!(line("archive_mode_x = always\n", ""), None);
        assert_eq!(
            archive_mode_line(ArchiveMode::Off, Some("on")),
            Some("archive_mode = 'off'".to_owned())
        );
        // Included files count, in order.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("conf.d")).unwrap();
        std::fs::write(d.path().join("conf.d/10-a.conf"), "archive_mode = on\n").unwrap();
        std::fs::write(d.path().join("conf.d/20-b.conf"), "archive_mode = always\n").unwrap();
        std::fs::write(d.path().join("extra.conf"), "archive_mode = 'on'\n").unwrap();
        let conf = d.path().join("postgresql.conf");
        std::fs::write(&conf, "archive_mode = off\ninclude_dir 'conf.d'\n").unwrap();
        assert_eq!(
            setting_in_tree(&conf, "archive_mode", 0).as_deref(),
            Some("always")
        );
        std::fs::write(&conf, "include_dir = 'conf.d'\ninclude 'extra.conf'\n").unwrap();
        assert_eq!(
            setting_in_tree(&conf, "archive_mode", 0).as_deref(),
            Some("on")
        );
        std::fs::write(
            &conf,
            "include_if_exists 'none.conf'\ninclude 'postgresql.conf'\n",
        )
        .unwrap();
        assert_eq!(
            setting_in_tree(&conf, "archive_mode", 0),
            None,
            "a loop ends"
        );
        // Written after the recovery settings, replacing the backup's line in auto.conf.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("postgresql.conf"), "archive_mode = on\n").unwrap();
        std::fs::write(
            dir.path().join("postgresql.auto.conf"),
            "archive_mode = 'always'\nwork_mem = '8MB'\n",
        )
        .unwrap();
        let c = RecoveryConfig {
            restore_command: "pitr wal-fetch %f %p".into(),
            target: Target::End,
            exclusive: false,
            timeline: None,
            action: None,
            standby: false,
            archive_mode: ArchiveMode::Preserve,
        };
        write(dir.path(), &c).unwrap();
        let text = std::fs::read_to_string(dir.path().join("postgresql.auto.conf")).unwrap();
        assert!(text.starts_with("work_mem = '8MB'\n"), "{text}");
        assert!(text.ends_with("\narchive_mode = 'on'\n"), "{text}");
        assert_eq!(text.matches("archive_mode").count(), 1, "{text}");
        write(
            dir.path(),
            &RecoveryConfig {
                archive_mode: ArchiveMode::Off,
                ..c
            },
        )
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("postgresql.auto.conf")).unwrap();
        assert!(text.ends_with("\narchive_mode = 'off'\n"), "{text}");
        assert_eq!(text.matches("archive_mode").count(), 1, "{text}");
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_quote("/usr/bin/pitr"), "/usr/bin/pitr");
        assert_eq!(shell_quote("s3://bucket/p"), "s3://bucket/p");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
