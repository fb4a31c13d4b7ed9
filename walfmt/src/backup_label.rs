//! `backup_label` (written into a base backup) and the `.backup` history file (archived at
//! the end of a backup): `KEY: value` lines naming where the backup's WAL starts and stops.

use crate::lsn::Lsn;
use crate::timeline::TimelineId;

/// A parsed backup_label or `.backup` history file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLabel {
    /// START WAL LOCATION: where replay must begin.
    pub start_lsn: Lsn,
    /// The segment named beside the start location.
    pub start_segment: Option<String>,
    /// CHECKPOINT LOCATION: the backup's starting checkpoint record.
    pub checkpoint_lsn: Lsn,
    /// BACKUP METHOD (`streamed`, `pg_start_backup`).
    pub method: Option<String>,
    /// BACKUP FROM (`primary`, `standby`).
    pub from: Option<String>,
    /// START TIME, as the server wrote it (in its log_timezone).
    pub start_time: Option<String>,
    /// LABEL.
    pub label: Option<String>,
    /// START TIMELINE.
    pub start_timeline: Option<TimelineId>,
    /// STOP WAL LOCATION (`.backup` files only): replay must reach it to be consistent.
    pub stop_lsn: Option<Lsn>,
    /// STOP TIME (`.backup` files only).
    pub stop_time: Option<String>,
    /// STOP TIMELINE (`.backup` files only).
    pub stop_timeline: Option<TimelineId>,
    /// INCREMENTAL FROM LSN (17+ incremental backups).
    pub incremental_from_lsn: Option<Lsn>,
    /// Lines this parser does not know, kept in order.
    pub other: Vec<(String, String)>,
}

/// A backup label that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid backup label, line {line}: {reason}")]
pub struct BackupLabelError {
    /// 1-based line number (0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// `0/2000028 (file 000000010000000000000002)` -> LSN and file name.
fn location(value: &str) -> Option<(Lsn, Option<String>)> {
    let (lsn, rest) = value.split_once(' ').unwrap_or((value, ""));
    let lsn = lsn.parse().ok()?;
    let file = rest
        .trim()
        .strip_prefix("(file ")
        .and_then(|r| r.strip_suffix(')'))
        .map(str::to_owned);
    Some((lsn, file))
}

impl BackupLabel {
    /// Parses a backup_label or `.backup` file.
    pub fn parse(text: &[u8]) -> Result<BackupLabel, BackupLabelError> {
        let text = std::str::from_utf8(text).map_err(|_| BackupLabelError {
            line: 0,
            reason: "not UTF-8 text".into(),
        })?;
        let mut start: Option<(Lsn, Option<String>)> = None;
        let mut checkpoint = None;
        let mut label = BackupLabel {
            start_lsn: Lsn::INVALID,
            start_segment: None,
            checkpoint_lsn: Lsn::INVALID,
            method: None,
            from: None,
            start_time: None,
            label: None,
            start_timeline: None,
            stop_lsn: None,
            stop_time: None,
            stop_timeline: None,
            incremental_from_lsn: None,
            other: Vec::new(),
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |reason: &str| BackupLabelError {
                line: i + 1,
                reason: reason.to_owned(),
            };
            let (key, value) = line
                .split_once(": ")
                .ok_or_else(|| err("expected KEY: value"))?;
            let lsn_of = |v: &str| location(v).ok_or_else(|| err("invalid WAL location"));
            let tli_of = |v: &str| {
                v.trim()
                    .parse()
                    .ok()
                    .filter(|&t| t > 0)
                    .map(TimelineId)
                    .ok_or_else(|| err("invalid timeline"))
            };
            match key {
                "START WAL LOCATION" => start = Some(lsn_of(value)?),
                "CHECKPOINT LOCATION" => checkpoint = Some(lsn_of(value)?.0),
                "STOP WAL LOCATION" => label.stop_lsn = Some(lsn_of(value)?.0),
                "BACKUP METHOD" => label.method = Some(value.to_owned()),
                "BACKUP FROM" => label.from = Some(value.to_owned()),
                "START TIME" => label.start_time = Some(value.to_owned()),
                "STOP TIME" => label.stop_time = Some(value.to_owned()),
                "LABEL" => label.label = Some(value.to_owned()),
                "START TIMELINE" => label.start_timeline = Some(tli_of(value)?),
                "STOP TIMELINE" => label.stop_timeline = Some(tli_of(value)?),
                "INCREMENTAL FROM LSN" => label.incremental_from_lsn = Some(lsn_of(value)?.0),
                _ => label.other.push((key.to_owned(), value.to_owned())),
            }
        }
        let missing = |what: &str| BackupLabelError {
            line: 0,
            reason: format!("no {what} line"),
        };
        let (start_lsn, start_segment) = start.ok_or_else(|| missing("START WAL LOCATION"))?;
        label.start_lsn = start_lsn;
        label.start_segment = start_segment;
        label.checkpoint_lsn = checkpoint.ok_or_else(|| missing("CHECKPOINT LOCATION"))?;
        Ok(label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // As PostgreSQL 15 wrote them.
    const HISTORY: &str = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
        STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n\
        CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
        START TIME: 2026-11-23 23:04:33 UTC\nLABEL: my label: with colon\nSTART TIMELINE: 1\n\
        STOP TIME: 2026-11-23 23:04:34 UTC\nSTOP TIMELINE: 1\n";

    #[test]
    fn parses_backup_history_file() {
        let l = BackupLabel::parse(HISTORY.as_bytes()).unwrap();
        assert_eq!(l.start_lsn, "0/2000028".parse().unwrap());
        assert_eq!(l.start_segment.as_deref(), Some("000000010000000000000002"));
        assert_eq!(l.stop_lsn, Some("0/2000100".parse().unwrap()));
        assert_eq!(l.checkpoint_lsn, "0/2000060".parse().unwrap());
        assert_eq!(l.label.as_deref(), Some("my label: with colon"));
        assert_eq!(l.start_timeline, Some(TimelineId(1)));
        assert_eq!(l.stop_time.as_deref(), Some("2026-11-23 23:04:34 UTC"));
        assert!(l.other.is_empty());
    }

    #[test]
    fn backup_label_without_stop_and_unknown_keys() {
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                    CHECKPOINT LOCATION: 0/2000060\nINCREMENTAL FROM TLI: 1\n";
        let l = BackupLabel::parse(text.as_bytes()).unwrap();
        assert_eq!(l.stop_lsn, None);
        assert_eq!(l.other, vec![("INCREMENTAL FROM TLI".into(), "1".into())]);
    }

    #[test]
    fn rejects_broken_labels() {
        assert_eq!(
            BackupLabel::parse(b"CHECKPOINT LOCATION: 0/1\n")
                .unwrap_err()
                .line,
            0
        );
        let bad = "START WAL LOCATION: zz (file x)\nCHECKPOINT LOCATION: 0/1\n";
        assert_eq!(BackupLabel::parse(bad.as_bytes()).unwrap_err().line, 1);
        assert_eq!(BackupLabel::parse(b"garbage\n").unwrap_err().line, 1);
        assert!(BackupLabel::parse(&[0xff, 0xfe]).is_err());
    }
}
