//! The streaming record decoder: feed WAL bytes in any split, pull whole records. It
//! checks every page header and record CRC, reassembles records across pages and segments,
//! follows XLOG_SWITCH to the next segment, and reports where valid WAL ends instead of
//! failing, the way recovery decides it has reached the end of WAL.

use crate::lsn::{Lsn, WAL_PAGE_SIZE};
use crate::page::{self, PageError, XLP_FIRST_IS_CONTRECORD, XLP_FIRST_IS_OVERWRITE_CONTRECORD};
use crate::record::{crc_matches, Record, RecordHeader, MAX_RECORD_LEN, RECORD_HEADER_LEN};
use crate::segment::WalSegmentSize;
use crate::timeline::TimelineId;
use crate::version::PgMajor;

/// What the decoder has next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A complete, CRC-checked record.
    Record(Record),
    /// Feed more bytes.
    NeedMore,
    /// Valid WAL ends here; the decoder yields nothing more.
    End(EndOfWal),
}

/// Where and why valid WAL ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndOfWal {
    /// The first position that is not valid WAL (the start of the record that failed).
    pub lsn: Lsn,
    /// Why.
    pub reason: EndReason,
}

/// Why valid WAL ends where it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndReason {
    /// A page header is wrong (zero page, recycled page, other cluster, ...).
    #[error(transparent)]
    Page(#[from] PageError),
    /// Zeros where the next record's length should be (the usual end of WAL).
    #[error("zero-length record")]
    ZeroLength,
    /// A record length that cannot be.
    #[error("invalid record length {0}")]
    InvalidLength(u32),
    /// A resource manager id that does not exist.
    #[error("invalid resource manager id {0}")]
    InvalidRmid(u8),
    /// The record does not point back at the record before it.
    #[error("record with incorrect prev-link {found} (expected {expected})")]
    PrevLink { found: Lsn, expected: Lsn },
    /// The record's CRC does not match.
    #[error("incorrect resource manager data checksum")]
    CrcMismatch,
    /// A record continues onto a page that does not continue it.
    #[error("there is no contrecord flag at {page}")]
    MissingContrecord { page: Lsn },
    /// The continuation's remaining length disagrees with the record's.
    #[error("invalid contrecord length {found} at {page} (expected {expected})")]
    ContrecordLength {
        page: Lsn,
        found: u32,
        expected: u64,
    },
    /// A page claims to continue a record when none was begun.
    #[error("contrecord is requested by a page at {page} where a record should start")]
    UnexpectedContrecord { page: Lsn },
}

impl std::fmt::Display for EndOfWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid record at {}: {}", self.lsn, self.reason)
    }
}

/// The decoding was set up wrong (not the WAL's fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("WAL decoding must start at a page boundary, not {0}")]
pub struct StartError(pub Lsn);

#[derive(Debug)]
struct Partial {
    lsn: Lsn,
    tot_len: u32,
    bytes: Vec<u8>,
    header_checked: bool,
}

impl Partial {
    fn remaining(&self) -> u64 {
        self.tot_len as u64 - self.bytes.len() as u64
    }
}

/// Feeds on contiguous WAL bytes from a page boundary; yields records.
#[derive(Debug)]
pub struct WalDecoder {
    buf: Vec<u8>,
    buf_lsn: Lsn,
    pos: Lsn,
    page_checked: Option<Lsn>,
    expect: page::Expect,
    version: Option<PgMajor>,
    partial: Option<Partial>,
    skip_contrecord: u64,
    at_start: bool,
    prev: Option<Lsn>,
    end: Option<EndOfWal>,
    aborted: Option<Lsn>,
}

/// Bytes already decoded are dropped from the buffer once this many have piled up.
const COMPACT_AT: usize = 1 << 20;

impl WalDecoder {
    /// A decoder for WAL starting at `start`, a page boundary. The segment size is learnt
    /// from the first long page header; see [`WalDecoder::with_segment_size`] to start
    /// elsewhere than a segment's start.
    pub fn new(start: Lsn) -> Result<WalDecoder, StartError> {
        if start.page_offset() != 0 {
            return Err(StartError(start));
        }
        Ok(WalDecoder {
            buf: Vec::new(),
            buf_lsn: start,
            pos: start,
            page_checked: None,
            expect: page::Expect::default(),
            version: None,
            partial: None,
            skip_contrecord: 0,
            at_start: true,
            prev: None,
            end: None,
            aborted: None,
        })
    }

    /// Sets the segment size in advance.
    pub fn with_segment_size(mut self, seg_size: WalSegmentSize) -> WalDecoder {
        self.expect.seg_size = Some(seg_size);
        self
    }

    /// The version the pages say they are from, once a page has been read.
    pub fn version(&self) -> Option<PgMajor> {
        self.version
    }

    /// The system identifier, once a long page header has been read.
    pub fn system_identifier(&self) -> Option<u64> {
        self.expect.system_identifier
    }

    /// The segment size, once known.
    pub fn segment_size(&self) -> Option<WalSegmentSize> {
        self.expect.seg_size
    }

    /// The timeline of the last page read.
    pub fn timeline(&self) -> Option<TimelineId> {
        self.expect.timeline
    }

    /// The LSN of a record abandoned at a page marked OVERWRITE_CONTRECORD, if one was met.
    pub fn aborted_record(&self) -> Option<Lsn> {
        self.aborted
    }

    /// Where valid WAL is known to reach: the start of a record still being assembled, or
    /// the position after the last one.
    pub fn valid_until(&self) -> Lsn {
        match (&self.end, &self.partial) {
            (Some(end), _) => end.lsn,
            (None, Some(p)) => p.lsn,
            (None, None) => self.pos,
        }
    }

    /// The next position the decoder will read.
    pub fn position(&self) -> Lsn {
        self.pos
    }

    /// Appends the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        let buf_end = self.buf_lsn + self.buf.len() as u64;
        if self.pos > buf_end {
            // Skipping the unused rest of a segment after XLOG_SWITCH.
            let skip = (self.pos - buf_end).min(data.len() as u64) as usize;
            self.buf.clear();
            self.buf_lsn = buf_end + skip as u64;
            data = &data[skip..];
        } else {
            let consumed = (self.pos - self.buf_lsn) as usize;
            if consumed >= COMPACT_AT {
                self.buf.drain(..consumed);
                self.buf_lsn = self.pos;
            }
        }
        self.buf.extend_from_slice(data);
    }

    fn avail(&self) -> &[u8] {
        if self.pos < self.buf_lsn {
            return &[];
        }
        let off = (self.pos - self.buf_lsn) as usize;
        self.buf.get(off..).unwrap_or(&[])
    }

    fn finish(&mut self, lsn: Lsn, reason: EndReason) -> Decoded {
        let end = EndOfWal { lsn, reason };
        self.end = Some(end.clone());
        self.partial = None;
        Decoded::End(end)
    }

    /// The next record, a request for more bytes, or the end of valid WAL.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Decoded {
        loop {
            if let Some(end) = &self.end {
                return Decoded::End(end.clone());
            }
            if self.pos.page_offset() == 0 && self.page_checked != Some(self.pos) {
                match self.read_page_header() {
                    Some(Ok(())) => continue,
                    Some(Err(decoded)) => return decoded,
                    None => return Decoded::NeedMore,
                }
            }
            let page_left = WAL_PAGE_SIZE - self.pos.page_offset();
            let avail = self.avail().len() as u64;
            if self.skip_contrecord > 0 {
                if avail == 0 {
                    return Decoded::NeedMore;
                }
                let n = self.skip_contrecord.min(page_left).min(avail);
                self.pos = self.pos + n;
                self.skip_contrecord -= n;
                if self.skip_contrecord == 0 {
                    self.pos = self.pos.align8();
                }
                continue;
            }
            if self.partial.is_none() {
                if avail < 4 {
                    return Decoded::NeedMore;
                }
                let a = self.avail();
                let tot_len = u32::from_le_bytes([a[0], a[1], a[2], a[3]]);
                if tot_len == 0 {
                    return self.finish(self.pos, EndReason::ZeroLength);
                }
                if tot_len < RECORD_HEADER_LEN as u32 || tot_len > MAX_RECORD_LEN {
                    return self.finish(self.pos, EndReason::InvalidLength(tot_len));
                }
                self.partial = Some(Partial {
                    lsn: self.pos,
                    tot_len,
                    // Grown as bytes arrive, never sized by the untrusted length alone.
                    bytes: Vec::with_capacity((tot_len as usize).min(WAL_PAGE_SIZE as usize)),
                    header_checked: false,
                });
            }
            if avail == 0 {
                return Decoded::NeedMore;
            }
            let partial = self.partial.as_ref().map_or(0, Partial::remaining);
            let n = partial.min(page_left).min(avail) as usize;
            let start = (self.pos - self.buf_lsn) as usize;
            let chunk = &self.buf[start..start + n];
            if let Some(p) = self.partial.as_mut() {
                p.bytes.extend_from_slice(chunk);
            }
            self.pos = self.pos + n as u64;
            if let Some(decoded) = self.check_partial() {
                return decoded;
            }
        }
    }

    /// Validates the header once it is whole, and completes the record once it is whole.
    fn check_partial(&mut self) -> Option<Decoded> {
        let p = self.partial.as_mut()?;
        if !p.header_checked && p.bytes.len() >= RECORD_HEADER_LEN {
            p.header_checked = true;
            let h = RecordHeader::parse(&p.bytes)?;
            let lsn = p.lsn;
            if let Some(version) = self.version {
                if !version.rmid_is_valid(h.rmid) {
                    return Some(self.finish(lsn, EndReason::InvalidRmid(h.rmid)));
                }
            }
            if let Some(expected) = self.prev {
                if h.prev != expected {
                    return Some(self.finish(
                        lsn,
                        EndReason::PrevLink {
                            found: h.prev,
                            expected,
                        },
                    ));
                }
            }
        }
        if p.remaining() > 0 {
            return None;
        }
        let p = self.partial.take()?;
        if !crc_matches(&p.bytes) {
            return Some(self.finish(p.lsn, EndReason::CrcMismatch));
        }
        let header = RecordHeader::parse(&p.bytes)?;
        let end = self.pos;
        self.prev = Some(p.lsn);
        self.pos = self.pos.align8();
        if header.is_switch() {
            if let Some(seg) = self.expect.seg_size {
                if self.pos.segment_offset(seg) != 0 {
                    self.pos = self.pos.segment_start(seg) + seg.bytes();
                }
            }
        }
        Some(Decoded::Record(Record {
            lsn: p.lsn,
            end,
            header,
            bytes: p.bytes,
        }))
    }

    /// Reads and checks the header of the page at `pos`. None: more bytes needed.
    fn read_page_header(&mut self) -> Option<Result<(), Decoded>> {
        let avail = self.avail();
        let len = page::header_len(avail)?;
        let h = page::parse(avail)?;
        let page_start = self.pos;
        let failed_at = self.partial.as_ref().map_or(page_start, |p| p.lsn);
        if let Err(e) = page::validate(&h, page_start, &self.expect) {
            return Some(Err(self.finish(failed_at, EndReason::Page(e))));
        }
        self.version = PgMajor::from_page_magic(h.magic);
        self.expect.magic = Some(h.magic);
        self.expect.timeline = Some(h.timeline);
        if let Some(long) = h.long {
            self.expect.system_identifier = Some(long.system_identifier);
            self.expect.seg_size = WalSegmentSize::new(long.seg_size as u64).ok();
        }
        self.page_checked = Some(page_start);
        self.pos = page_start + len as u64;
        let at_start = std::mem::replace(&mut self.at_start, false);

        if let Some(p) = &self.partial {
            if h.has(XLP_FIRST_IS_OVERWRITE_CONTRECORD) {
                // The record was abandoned after a crash; what follows replaces it.
                self.aborted = Some(p.lsn);
                self.partial = None;
                self.prev = None;
            } else if !h.has(XLP_FIRST_IS_CONTRECORD) {
                let lsn = p.lsn;
                return Some(Err(
                    self.finish(lsn, EndReason::MissingContrecord { page: page_start })
                ));
            } else if h.rem_len as u64 != p.remaining() {
                let (lsn, expected) = (p.lsn, p.remaining());
                return Some(Err(self.finish(
                    lsn,
                    EndReason::ContrecordLength {
                        page: page_start,
                        found: h.rem_len,
                        expected,
                    },
                )));
            }
        } else if h.has(XLP_FIRST_IS_CONTRECORD) {
            if at_start {
                // Decoding began in the middle of a record: skip its tail.
                self.skip_contrecord = h.rem_len as u64;
            } else if self.skip_contrecord == 0 {
                return Some(Err(self.finish(
                    page_start,
                    EndReason::UnexpectedContrecord { page: page_start },
                )));
            } else if h.rem_len as u64 != self.skip_contrecord {
                let expected = self.skip_contrecord;
                return Some(Err(self.finish(
                    page_start,
                    EndReason::ContrecordLength {
                        page: page_start,
                        found: h.rem_len,
                        expected,
                    },
                )));
            }
        } else if self.skip_contrecord > 0 {
            return Some(Err(self.finish(
                page_start,
                EndReason::MissingContrecord { page: page_start },
            )));
        }
        Some(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RM_XACT_ID, RM_XLOG_ID, XLOG_OVERWRITE_CONTRECORD, XLOG_SWITCH};
    use crate::synth::WalWriter;
    use proptest::prelude::*;

    const SEG: u64 = 1 << 20;

    fn decode_all(bytes: &[u8], start: Lsn, splits: &[usize]) -> (Vec<Record>, Option<EndOfWal>) {
        let mut d = WalDecoder::new(start).unwrap();
        let mut records = Vec::new();
        let mut rest = bytes;
        let mut sizes = splits.iter().cycle();
        loop {
            let n = sizes
                .next()
                .copied()
                .unwrap_or(rest.len())
                .max(1)
                .min(rest.len());
            d.feed(&rest[..n]);
            rest = &rest[n..];
            loop {
                match d.next() {
                    Decoded::Record(r) => records.push(r),
                    Decoded::NeedMore => break,
                    Decoded::End(end) => return (records, Some(end)),
                }
            }
            if rest.is_empty() {
                return (records, None);
            }
        }
    }

    /// A segment and a half of records of many sizes, some spanning pages and the segment
    /// boundary, ending in zeros.
    fn sample_wal(sizes: &[usize]) -> (Vec<u8>, Vec<Lsn>) {
        let mut w = WalWriter::new(Lsn(SEG), SEG);
        let mut lsns = Vec::new();
        for (i, &size) in sizes.iter().cycle().enumerate() {
            if w.pos() > Lsn(SEG * 2 + SEG / 2) {
                break;
            }
            lsns.push(w.append(RM_XACT_ID, 0, i as u32, &vec![i as u8; size]));
        }
        w.pad_to_page();
        w.bytes.extend_from_slice(&[0; 8192]);
        (w.bytes, lsns)
    }

    #[test]
    fn records_across_pages_and_segments_then_zero_end() {
        let (bytes, lsns) = sample_wal(&[10, 9000, 100, 40_000, 3]);
        let (records, end) = decode_all(&bytes, Lsn(SEG), &[bytes.len()]);
        assert_eq!(records.iter().map(|r| r.lsn).collect::<Vec<_>>(), lsns);
        assert!(records
            .iter()
            .any(|r| r.lsn.0 < 2 * SEG && r.end.0 > 2 * SEG));
        let end = end.unwrap();
        assert_eq!(end.reason, EndReason::ZeroLength);
    }

    #[test]
    fn a_flipped_byte_ends_valid_wal_at_that_record() {
        let (mut bytes, lsns) = sample_wal(&[200]);
        let victim = lsns[10];
        bytes[(victim.0 - SEG) as usize + 30] ^= 0x40;
        let (records, end) = decode_all(&bytes, Lsn(SEG), &[4096]);
        assert_eq!(records.len(), 10);
        assert_eq!(
            end.unwrap(),
            EndOfWal {
                lsn: victim,
                reason: EndReason::CrcMismatch
            }
        );
    }

    #[test]
    fn xlog_switch_skips_to_the_next_segment() {
        let mut w = WalWriter::new(Lsn(SEG), SEG);
        w.append(RM_XACT_ID, 0, 1, b"a");
        w.append(RM_XLOG_ID, XLOG_SWITCH, 0, b"");
        // Garbage after the switch, up to the segment end, is never read.
        while w.pos().0 < 2 * SEG {
            w.bytes.push(0xAB);
        }
        let after = w.append(RM_XACT_ID, 0, 2, b"b");
        assert_eq!(after, Lsn(2 * SEG + 40));
        let (records, _) = decode_all(&w.bytes, Lsn(SEG), &[1000]);
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].lsn, after);
    }

    #[test]
    fn overwrite_contrecord_abandons_the_torn_record() {
        let mut w = WalWriter::new(Lsn(SEG), SEG);
        w.append(RM_XACT_ID, 0, 1, &[1; 8000]);
        let torn = w.record(RM_XACT_ID, 0, 2, &[2; 9000]);
        let torn_lsn = w.place(&torn, Some(200));
        w.pad_to_page();
        w.overwrite_next_page();
        let overwrite = w.record(
            RM_XLOG_ID,
            XLOG_OVERWRITE_CONTRECORD,
            0,
            &torn_lsn.0.to_le_bytes(),
        );
        let next = w.place(&overwrite, None);
        let after = w.append(RM_XACT_ID, 0, 3, b"after");

        let mut d = WalDecoder::new(Lsn(SEG)).unwrap();
        d.feed(&w.bytes);
        let mut lsns = Vec::new();
        while let Decoded::Record(r) = d.next() {
            lsns.push(r.lsn);
        }
        assert_eq!(lsns, [Lsn(SEG + 40), next, after]);
        assert_eq!(d.aborted_record(), Some(torn_lsn));
    }

    #[test]
    fn torn_record_without_overwrite_marker_ends_wal() {
        let mut w = WalWriter::new(Lsn(SEG), SEG);
        w.append(RM_XACT_ID, 0, 1, b"x");
        let torn = w.record(RM_XACT_ID, 0, 2, &[2; 9000]);
        let torn_lsn = w.place(&torn, Some(500));
        w.pad_to_page();
        w.append(RM_XACT_ID, 0, 3, b"y");
        let (_, end) = decode_all(&w.bytes, Lsn(SEG), &[w.bytes.len()]);
        let end = end.unwrap();
        assert_eq!(end.lsn, torn_lsn);
        assert!(matches!(end.reason, EndReason::MissingContrecord { .. }));
    }

    #[test]
    fn starting_mid_record_skips_its_tail() {
        let (bytes, lsns) = sample_wal(&[30_000, 50]);
        // Start at the second page: the first record's tail continues there.
        let (records, _) = decode_all(&bytes[8192..], Lsn(SEG + 8192), &[bytes.len()]);
        let first_whole = lsns.iter().find(|l| l.0 > SEG + 8192).copied();
        assert_eq!(records.first().map(|r| r.lsn), first_whole);
    }

    #[test]
    fn huge_length_field_does_not_allocate_it() {
        let mut w = WalWriter::new(Lsn(SEG), SEG);
        let first = w.append(RM_XACT_ID, 0, 1, b"x");
        let at = (w.pos().align8().0 - SEG) as usize;
        w.bytes.resize(at, 0);
        // A plausible header (right prev-link and rmgr) claiming ~1 GiB.
        w.bytes.extend_from_slice(&0x3FFF_0000u32.to_le_bytes());
        w.bytes.extend_from_slice(&2u32.to_le_bytes());
        w.bytes.extend_from_slice(&first.0.to_le_bytes());
        w.bytes
            .extend_from_slice(&[0, RM_XACT_ID, 0, 0, 0, 0, 0, 0]);
        w.bytes.resize(at + 64, 0xEE);
        let mut d = WalDecoder::new(Lsn(SEG)).unwrap();
        d.feed(&w.bytes);
        assert!(matches!(d.next(), Decoded::Record(_)));
        // A record claiming ~1 GiB waits for bytes instead of reserving them.
        assert_eq!(d.next(), Decoded::NeedMore);
        assert!(d.partial.as_ref().unwrap().bytes.capacity() <= 8192);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn same_records_however_the_input_is_split(
            sizes in proptest::collection::vec(1usize..20_000, 1..6),
            splits in proptest::collection::vec(1usize..30_000, 1..8),
        ) {
            let (bytes, lsns) = sample_wal(&sizes);
            let (whole, whole_end) = decode_all(&bytes, Lsn(SEG), &[bytes.len()]);
            let (split, split_end) = decode_all(&bytes, Lsn(SEG), &splits);
            prop_assert_eq!(whole.iter().map(|r| r.lsn).collect::<Vec<_>>(), lsns);
            prop_assert_eq!(whole, split);
            prop_assert_eq!(whole_end, split_end);
        }
    }
}
