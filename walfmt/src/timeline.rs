//! Timelines and `.history` files: which timeline holds an LSN, and whether one timeline
//! descends from another at a point.

use std::fmt;

use crate::lsn::Lsn;

/// A timeline id (TimeLineID). Displays as a decimal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl TimelineId {
    /// The file name of this timeline's history file (`00000002.history`).
    pub fn history_file_name(self) -> String {
        format!("{:08X}.history", self.0)
    }
}

/// One ancestor in a history file: `timeline` held WAL up to (not including) `switch_lsn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub timeline: TimelineId,
    /// Where its child branched off: the first LSN that is not on `timeline`.
    pub switch_lsn: Lsn,
    /// The free-text reason PostgreSQL wrote.
    pub reason: String,
}

/// A timeline's ancestry, from its `.history` file (timeline 1 has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistory {
    /// The timeline this history is of.
    pub timeline: TimelineId,
    /// Ancestors, oldest first.
    pub ancestors: Vec<HistoryEntry>,
}

/// A `.history` file that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid timeline history for timeline {timeline}, line {line}: {reason}")]
pub struct HistoryError {
    /// The timeline whose history it is.
    pub timeline: TimelineId,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl TimelineHistory {
    /// The history of a timeline with no ancestors (timeline 1, or one without a file).
    pub fn root(timeline: TimelineId) -> TimelineHistory {
        TimelineHistory {
            timeline,
            ancestors: Vec::new(),
        }
    }

    /// Parses the contents of `timeline`'s history file. Ancestors must have increasing
    /// timeline ids below `timeline` and non-decreasing switch points.
    pub fn parse(timeline: TimelineId, text: &[u8]) -> Result<TimelineHistory, HistoryError> {
        let mut ancestors: Vec<HistoryEntry> = Vec::new();
        let text = String::from_utf8_lossy(text);
        for (i, line) in text.lines().enumerate() {
            let err = |reason: &str| HistoryError {
                timeline,
                line: i + 1,
                reason: reason.to_owned(),
            };
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(3, ['\t', ' ']);
            let tli: u32 = fields
                .next()
                .and_then(|f| f.trim().parse().ok())
                .ok_or_else(|| err("expected a timeline id"))?;
            let lsn: Lsn = fields
                .next()
                .and_then(|f| f.trim().parse().ok())
                .ok_or_else(|| err("expected a switch point LSN"))?;
            let reason = fields.next().unwrap_or("").trim().to_owned();
            if tli == 0 || tli >= timeline.0 {
                return Err(err(
                    "ancestor timeline id must be between 1 and the timeline itself",
                ));
            }
            if let Some(prev) = ancestors.last() {
                if tli <= prev.timeline.0 {
                    return Err(err("timeline ids must increase"));
                }
                if lsn < prev.switch_lsn {
                    return Err(err("switch points must not go backwards"));
                }
            }
            ancestors.push(HistoryEntry {
                timeline: TimelineId(tli),
                switch_lsn: lsn,
                reason,
            });
        }
        Ok(TimelineHistory {
            timeline,
            ancestors,
        })
    }

    /// The timeline in this history that holds the WAL at `lsn`.
    pub fn timeline_at(&self, lsn: Lsn) -> TimelineId {
        self.ancestors
            .iter()
            .find(|e| lsn < e.switch_lsn)
            .map_or(self.timeline, |e| e.timeline)
    }

    /// True when WAL on `ancestor` up to `lsn` is part of this timeline's past, so recovery
    /// that reached `lsn` on `ancestor` can continue onto this timeline.
    pub fn descends_from(&self, ancestor: TimelineId, lsn: Lsn) -> bool {
        ancestor == self.timeline
            || self
                .ancestors
                .iter()
                .any(|e| e.timeline == ancestor && lsn <= e.switch_lsn)
    }

    /// Where this timeline branched off its parent (None for a root timeline).
    pub fn branch_point(&self) -> Option<Lsn> {
        self.ancestors.last().map(|e| e.switch_lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HISTORY_3: &str = "1\t0/3000000\tno recovery target specified\n\n\
                             2\t0/5000158\tbefore 2026-05-14 03:00:00+00\n";

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_answers_which_timeline() {
        let h = TimelineHistory::parse(TimelineId(3), HISTORY_3.as_bytes()).unwrap();
        assert_eq!(h.ancestors.len(), 2);
        assert_eq!(h.ancestors[1].reason, "before 2026-05-14 03:00:00+00");
        assert_eq!(h.timeline_at(lsn("0/2FFFFFF")), TimelineId(1));
        assert_eq!(h.timeline_at(lsn("0/3000000")), TimelineId(2));
        assert_eq!(h.timeline_at(lsn("0/5000157")), TimelineId(2));
        assert_eq!(h.timeline_at(lsn("0/5000158")), TimelineId(3));
        assert_eq!(h.branch_point(), Some(lsn("0/5000158")));
    }

    #[test]
    fn descent() {
        let h = TimelineHistory::parse(TimelineId(3), HISTORY_3.as_bytes()).unwrap();
        assert!(h.descends_from(TimelineId(1), lsn("0/3000000")));
        assert!(!h.descends_from(TimelineId(1), lsn("0/3000001")));
        assert!(h.descends_from(TimelineId(2), lsn("0/4000000")));
        assert!(h.descends_from(TimelineId(3), lsn("9/0")));
        assert!(!h.descends_from(TimelineId(4), lsn("0/1")));
    }

    #[test]
    fn rejects_bad_histories() {
        for bad in [
            "x\t0/1\n",
            "1\tnope\n",
            "3\t0/1\n",
            "2\t0/5\n1\t0/6\n",
            "1\t0/5\n2\t0/4\n",
        ] {
            let err = TimelineHistory::parse(TimelineId(3), bad.as_bytes()).unwrap_err();
            assert_eq!(err.timeline, TimelineId(3), "{bad:?}");
        }
        let ok = TimelineHistory::parse(TimelineId(2), b"# comment\n1\t0/3000000\n").unwrap();
        assert_eq!(ok.ancestors[0].reason, "");
    }
}
