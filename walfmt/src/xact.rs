//! What records mean for point-in-time recovery: transaction ends (commit, abort, and their
//! prepared forms) with xid and time, restore points, WAL switches.

use crate::lsn::Lsn;
use crate::record::{
    Record, RM_XACT_ID, RM_XLOG_ID, XLOG_OVERWRITE_CONTRECORD, XLOG_RESTORE_POINT, XLOG_SWITCH,
};
use crate::time::PgTimestamp;
use crate::version::PgMajor;

const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
const XLOG_XACT_HAS_INFO: u8 = 0x80;

const XINFO_HAS_DBINFO: u32 = 1 << 0;
const XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XINFO_HAS_RELFILENODES: u32 = 1 << 2;
const XINFO_HAS_INVALS: u32 = 1 << 3;
const XINFO_HAS_TWOPHASE: u32 = 1 << 4;
const XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XactKind {
    /// COMMIT
    Commit,
    /// ABORT
    Abort,
    /// COMMIT PREPARED
    CommitPrepared,
    /// ROLLBACK PREPARED
    AbortPrepared,
}

impl XactKind {
    /// True for both kinds of commit.
    pub fn is_commit(self) -> bool {
        matches!(self, XactKind::Commit | XactKind::CommitPrepared)
    }

    /// pg_waldump's name for the record.
    pub fn name(self) -> &'static str {
        match self {
            XactKind::Commit => "COMMIT",
            XactKind::Abort => "ABORT",
            XactKind::CommitPrepared => "COMMIT_PREPARED",
            XactKind::AbortPrepared => "ABORT_PREPARED",
        }
    }
}

/// What a record means for recovery targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A transaction ended.
    XactEnd {
        /// How.
        kind: XactKind,
        /// The transaction: the prepared one's xid for the prepared forms.
        xid: u32,
        /// The time recovery_target_time compares against.
        time: PgTimestamp,
    },
    /// `pg_create_restore_point(name)`.
    RestorePoint {
        /// Its name.
        name: String,
        /// When it was made.
        time: PgTimestamp,
    },
    /// XLOG_SWITCH: the rest of the segment is unused.
    Switch,
    /// A record abandoned at a crash was overwritten starting here.
    OverwriteContrecord {
        /// The abandoned record's LSN.
        aborted: Lsn,
    },
}

fn i64_at(b: &[u8], at: usize) -> Option<i64> {
    let x = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(x);
    Some(i64::from_le_bytes(a))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let x = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

/// The record's meaning, if it is one recovery targets care about. Malformed main data of
/// a kind that matters yields None rather than a guess.
pub fn interpret(record: &Record, version: PgMajor) -> Option<Event> {
    let h = &record.header;
    match h.rmid {
        RM_XLOG_ID => match h.rmgr_info() {
            XLOG_SWITCH => Some(Event::Switch),
            XLOG_RESTORE_POINT => {
                let data = record.main_data(version).ok()?;
                let time = PgTimestamp(i64_at(data, 0)?);
                let name = data.get(8..)?;
                let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
                Some(Event::RestorePoint {
                    name: String::from_utf8_lossy(name).into_owned(),
                    time,
                })
            }
            XLOG_OVERWRITE_CONTRECORD => {
                let data = record.main_data(version).ok()?;
                Some(Event::OverwriteContrecord {
                    aborted: Lsn(i64_at(data, 0)? as u64),
                })
            }
            _ => None,
        },
        RM_XACT_ID => {
            let kind = match h.info & XLOG_XACT_OPMASK {
                XLOG_XACT_COMMIT => XactKind::Commit,
                XLOG_XACT_ABORT => XactKind::Abort,
                XLOG_XACT_COMMIT_PREPARED => XactKind::CommitPrepared,
                XLOG_XACT_ABORT_PREPARED => XactKind::AbortPrepared,
                _ => return None,
            };
            let data = record.main_data(version).ok()?;
            let time = PgTimestamp(i64_at(data, 0)?);
            let xid = match kind {
                XactKind::Commit | XactKind::Abort => h.xid,
                _ => twophase_xid(data, h.info, kind, version)?,
            };
            Some(Event::XactEnd { kind, xid, time })
        }
        _ => None,
    }
}

/// The prepared transaction's xid in a COMMIT/ABORT PREPARED record: walks the optional
/// parts that precede it (ParseCommitRecord / ParseAbortRecord).
fn twophase_xid(data: &[u8], info: u8, kind: XactKind, version: PgMajor) -> Option<u32> {
    if info & XLOG_XACT_HAS_INFO == 0 {
        return None;
    }
    let xinfo = u32_at(data, 8)?;
    let mut at = 12;
    let count = |at: usize| u32_at(data, at).map(|n| n as usize);
    if xinfo & XINFO_HAS_DBINFO != 0 {
        at += 8;
    }
    if xinfo & XINFO_HAS_SUBXACTS != 0 {
        at += 4 + count(at)?.checked_mul(4)?;
    }
    if xinfo & XINFO_HAS_RELFILENODES != 0 {
        at += 4 + count(at)?.checked_mul(12)?;
    }
    if version.number() >= 15 && xinfo & XINFO_HAS_DROPPED_STATS != 0 {
        at += 4 + count(at)?.checked_mul(version.dropped_stats_item_size())?;
    }
    if kind.is_commit() && xinfo & XINFO_HAS_INVALS != 0 {
        at += 4 + count(at)?.checked_mul(16)?;
    }
    if xinfo & XINFO_HAS_TWOPHASE == 0 {
        return None;
    }
    u32_at(data, at)
}
