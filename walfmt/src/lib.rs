//! PostgreSQL's WAL formats, sans-IO: bytes in, typed values out. No files, no network, no
//! async; every other pitr crate asks this one what WAL bytes mean.
//!
//! - names and positions: [`Lsn`], [`TimelineId`], [`SegmentName`], [`ArchiveFileKind`],
//!   timeline history ([`TimelineHistory`])
//! - pages: [`page`] headers and their validation, per-version constants in [`PgMajor`]
//! - records: [`WalDecoder`] reassembles and CRC-checks records from bytes fed in any split
//!   and reports where valid WAL ends
//! - meaning: commits, aborts, restore points ([`xact`]) and a whole segment's
//!   [`SegmentSummary`]

pub mod backup_label;
pub mod decoder;
pub mod lsn;
pub mod page;
pub mod record;
pub mod replication;
pub mod segment;
pub mod summary;
pub mod time;
pub mod timeline;
pub mod version;
pub mod xact;

#[cfg(test)]
mod synth;

pub use backup_label::{BackupLabel, BackupLabelError};
pub use decoder::{Decoded, EndOfWal, EndReason, WalDecoder};
pub use lsn::{Lsn, ParseLsnError, WAL_PAGE_SIZE};
pub use record::{Record, RecordHeader};
pub use segment::{ArchiveFileKind, SegmentName, WalSegmentSize};
pub use summary::{
    summarize, summarize_with, RestorePoint, SegmentSummary, Summarizer, SummaryError,
};
pub use time::PgTimestamp;
pub use timeline::{HistoryEntry, TimelineHistory, TimelineId};
pub use version::PgMajor;
pub use xact::{Event, XactKind};
