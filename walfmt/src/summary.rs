//! `SegmentSummary`: what one WAL segment holds, in a few hundred bytes. The archiver stores
//! it beside each segment so restore can find a target time, xid or restore point without
//! downloading WAL.

use crate::decoder::{Decoded, EndOfWal, WalDecoder};
use crate::lsn::Lsn;
use crate::page::{self, PageError};
use crate::record::Record;
use crate::segment::WalSegmentSize;
use crate::time::PgTimestamp;
use crate::timeline::TimelineId;
use crate::version::PgMajor;
use crate::xact::{interpret, Event};

/// A named restore point found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePoint {
    /// The name given to pg_create_restore_point.
    pub name: String,
    /// When it was made.
    pub time: PgTimestamp,
    /// The restore point record's LSN.
    pub lsn: Lsn,
}

/// What one segment holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    /// The cluster's system identifier (from the long page header).
    pub system_identifier: u64,
    /// PostgreSQL major version (from the page magic).
    pub pg_version: PgMajor,
    /// Timeline of the segment's first page.
    pub timeline: TimelineId,
    /// wal_segment_size.
    pub segment_size: WalSegmentSize,
    /// The segment's first LSN.
    pub start_lsn: Lsn,
    /// The first record that starts in this segment.
    pub first_record_lsn: Option<Lsn>,
    /// The last complete record that starts in this segment.
    pub last_record_lsn: Option<Lsn>,
    /// Where valid WAL ends: the segment's end for a complete segment, earlier in a partial
    /// or recycled one.
    pub end_lsn: Lsn,
    /// Why valid WAL ends before the segment's end (None when it reaches it).
    pub end_reason: Option<EndOfWal>,
    /// A record that starts here and continues into the next segment: only a reader of both
    /// segments sees it whole (it may be a commit).
    pub continued_record_lsn: Option<Lsn>,
    /// The segment ends with XLOG_SWITCH.
    pub switched: bool,
    /// Complete records starting in this segment.
    pub records: u64,
    /// Commits (plain and prepared).
    pub commits: u64,
    /// Aborts (plain and prepared).
    pub aborts: u64,
    /// Earliest commit time in the segment.
    pub first_commit_time: Option<PgTimestamp>,
    /// Latest commit time in the segment.
    pub last_commit_time: Option<PgTimestamp>,
    /// Earliest commit or abort time (recovery_target_time stops at either).
    pub first_xact_time: Option<PgTimestamp>,
    /// Latest commit or abort time.
    pub last_xact_time: Option<PgTimestamp>,
    /// Restore points, in WAL order.
    pub restore_points: Vec<RestorePoint>,
}

/// A file that is not a WAL segment at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SummaryError {
    /// Shorter than one page header.
    #[error("file is too short to be a WAL segment ({0} bytes)")]
    TooShort(usize),
    /// The first page is not a valid segment start.
    #[error("not a WAL segment: {0}")]
    NotWal(PageError),
    /// The first page has no long header, so no system identifier or segment size.
    #[error("not the start of a WAL segment: the first page has no long header")]
    NotSegmentStart,
    /// Larger than the segment size its header states.
    #[error("file is {len} bytes, larger than its WAL segment size {seg_size}")]
    TooLong { len: usize, seg_size: u64 },
}

/// A segment summary built as the segment's bytes arrive (from a file read piece by piece,
/// or from replication as it streams): [`Summarizer::start`] with the first page,
/// [`Summarizer::feed`] every byte from the segment's start on, [`Summarizer::finish`].
#[derive(Debug)]
pub struct Summarizer {
    summary: SegmentSummary,
    decoder: WalDecoder,
    version: PgMajor,
    seg_end: Lsn,
    fed: u64,
    done: bool,
}

impl Summarizer {
    /// Checks the first page (at least its long header) is the start of a WAL segment.
    /// The same bytes must then be fed again, from the start.
    pub fn start(first: &[u8]) -> Result<Summarizer, SummaryError> {
        let Some(page) = page::parse(first) else {
            return Err(SummaryError::TooShort(first.len()));
        };
        let start = page.page_addr;
        page::validate(&page, start, &page::Expect::default()).map_err(SummaryError::NotWal)?;
        let long = page.long.ok_or(SummaryError::NotSegmentStart)?;
        let seg_size =
            WalSegmentSize::new(long.seg_size as u64).map_err(|_| SummaryError::NotSegmentStart)?;
        if start.segment_offset(seg_size) != 0 {
            return Err(SummaryError::NotSegmentStart);
        }
        let version = PgMajor::from_page_magic(page.magic).ok_or(SummaryError::NotSegmentStart)?;
        let decoder = WalDecoder::new(start)
            .map_err(|_| SummaryError::NotSegmentStart)?
            .with_segment_size(seg_size);
        Ok(Summarizer {
            summary: SegmentSummary {
                system_identifier: long.system_identifier,
                pg_version: version,
                timeline: page.timeline,
                segment_size: seg_size,
                start_lsn: start,
                first_record_lsn: None,
                last_record_lsn: None,
                end_lsn: start,
                end_reason: None,
                continued_record_lsn: None,
                switched: false,
                records: 0,
                commits: 0,
                aborts: 0,
                first_commit_time: None,
                last_commit_time: None,
                first_xact_time: None,
                last_xact_time: None,
                restore_points: Vec::new(),
            },
            decoder,
            version,
            seg_end: start + seg_size.bytes(),
            fed: 0,
            done: false,
        })
    }

    /// The next bytes of the segment; `on_record` sees every complete record and its
    /// meaning. Bytes after the end of valid WAL (or a WAL switch) are taken and ignored.
    pub fn feed(
        &mut self,
        piece: &[u8],
        on_record: &mut impl FnMut(&Record, Option<&Event>),
    ) -> Result<(), SummaryError> {
        self.fed += piece.len() as u64;
        let seg_size = self.summary.segment_size.bytes();
        if self.fed > seg_size {
            return Err(SummaryError::TooLong {
                len: self.fed as usize,
                seg_size,
            });
        }
        if self.done {
            return Ok(());
        }
        self.decoder.feed(piece);
        loop {
            match self.decoder.next() {
                Decoded::Record(record) => {
                    if record.lsn >= self.seg_end {
                        self.summary.end_lsn = self.seg_end;
                        self.done = true;
                        return Ok(());
                    }
                    let event = interpret(&record, self.version);
                    self.summary.note(&record, event.as_ref());
                    on_record(&record, event.as_ref());
                    if record.header.is_switch() {
                        self.summary.switched = true;
                        self.summary.end_lsn = self.seg_end;
                        self.done = true;
                        return Ok(());
                    }
                }
                Decoded::NeedMore => return Ok(()),
                Decoded::End(end) => {
                    self.summary.end_lsn = end.lsn;
                    self.summary.end_reason = Some(end);
                    self.done = true;
                    return Ok(());
                }
            }
        }
    }

    /// The summary of what was fed: a whole segment, or the first part of one.
    pub fn finish(mut self) -> SegmentSummary {
        if !self.done {
            // Ran out of bytes: valid to the end of what was given, except a record cut
            // short by the end of a partial file.
            let valid = self.decoder.valid_until();
            if self.fed == self.summary.segment_size.bytes() {
                self.summary.end_lsn = self.seg_end;
                self.summary.continued_record_lsn = (valid < self.seg_end).then_some(valid);
            } else {
                self.summary.end_lsn = valid;
            }
        }
        self.summary
    }
}

/// Summarises a segment file's bytes (a whole segment, or the first part of one).
/// `on_record` sees every complete record and its meaning (for `wal-inspect --records`).
pub fn summarize_with(
    bytes: &[u8],
    mut on_record: impl FnMut(&Record, Option<&Event>),
) -> Result<SegmentSummary, SummaryError> {
    let mut summarizer = Summarizer::start(bytes)?;
    // Fed a piece at a time: the decoder's buffer stays small and warm in cache instead of
    // holding a second copy of the whole segment.
    for piece in bytes.chunks(256 << 10) {
        summarizer.feed(piece, &mut on_record)?;
    }
    Ok(summarizer.finish())
}

/// [`summarize_with`] without a record callback.
pub fn summarize(bytes: &[u8]) -> Result<SegmentSummary, SummaryError> {
    summarize_with(bytes, |_, _| {})
}

fn widen(range: &mut (Option<PgTimestamp>, Option<PgTimestamp>), t: PgTimestamp) {
    range.0 = Some(range.0.map_or(t, |x| x.min(t)));
    range.1 = Some(range.1.map_or(t, |x| x.max(t)));
}

impl SegmentSummary {
    fn note(&mut self, record: &Record, event: Option<&Event>) {
        self.records += 1;
        self.first_record_lsn.get_or_insert(record.lsn);
        self.last_record_lsn = Some(record.lsn);
        match event {
            Some(Event::XactEnd { kind, time, .. }) => {
                let mut xact = (self.first_xact_time, self.last_xact_time);
                widen(&mut xact, *time);
                (self.first_xact_time, self.last_xact_time) = xact;
                if kind.is_commit() {
                    self.commits += 1;
                    let mut commit = (self.first_commit_time, self.last_commit_time);
                    widen(&mut commit, *time);
                    (self.first_commit_time, self.last_commit_time) = commit;
                } else {
                    self.aborts += 1;
                }
            }
            Some(Event::RestorePoint { name, time }) => self.restore_points.push(RestorePoint {
                name: name.clone(),
                time: *time,
                lsn: record.lsn,
            }),
            _ => {}
        }
    }
}
