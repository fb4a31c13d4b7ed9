//! Segment sizes, segment names, and the kinds of file an archive command is handed.

use std::fmt;
use std::str::FromStr;

use crate::lsn::Lsn;
use crate::timeline::TimelineId;

/// A valid `wal_segment_size`: a power of two from 1 MiB to 1 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalSegmentSize(u64);

/// A segment size PostgreSQL cannot have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid WAL segment size {0}: must be a power of two between 1 MiB and 1 GiB")]
pub struct InvalidSegmentSize(pub u64);

impl WalSegmentSize {
    /// 16 MiB, initdb's default.
    pub const DEFAULT: WalSegmentSize = WalSegmentSize(16 << 20);

    /// Checks `bytes` is a size PostgreSQL allows.
    pub fn new(bytes: u64) -> Result<WalSegmentSize, InvalidSegmentSize> {
        if bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes) {
            Ok(WalSegmentSize(bytes))
        } else {
            Err(InvalidSegmentSize(bytes))
        }
    }

    /// Size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Segments per 4 GiB "log id" (the middle 8 hex digits of a segment name).
    pub fn segments_per_xlog_id(self) -> u64 {
        0x1_0000_0000 / self.0
    }
}

/// A WAL segment: timeline and segment number. Displays as its 24-hex-digit file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    /// Timeline the segment belongs to.
    pub timeline: TimelineId,
    /// Segment number (LSN / segment size).
    pub segno: u64,
    /// Segment size the number is counted in (it decides the name's split).
    pub seg_size: WalSegmentSizeOrd,
}

/// [`WalSegmentSize`] ordered by bytes, so [`SegmentName`] sorts by (timeline, segno).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalSegmentSizeOrd(u64);

impl From<WalSegmentSize> for WalSegmentSizeOrd {
    fn from(s: WalSegmentSize) -> Self {
        WalSegmentSizeOrd(s.0)
    }
}

impl SegmentName {
    /// Segment number `segno` of `timeline`.
    pub fn new(timeline: TimelineId, segno: u64, seg_size: WalSegmentSize) -> SegmentName {
        SegmentName {
            timeline,
            segno,
            seg_size: seg_size.into(),
        }
    }

    /// The segment of `timeline` holding `lsn`.
    pub fn of(timeline: TimelineId, lsn: Lsn, seg_size: WalSegmentSize) -> SegmentName {
        SegmentName {
            timeline,
            segno: lsn.segment_number(seg_size),
            seg_size: seg_size.into(),
        }
    }

    /// Parses a 24-hex-digit name (upper case, as PostgreSQL writes it).
    pub fn parse(name: &str, seg_size: WalSegmentSize) -> Result<SegmentName, ParseNameError> {
        let err = || ParseNameError(name.to_owned());
        if name.len() != 24 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) {
            return Err(err());
        }
        let field =
            |r: std::ops::Range<usize>| u64::from_str_radix(&name[r], 16).map_err(|_| err());
        let tli = field(0..8)? as u32;
        let (log, seg) = (field(8..16)?, field(16..24)?);
        if tli == 0 || seg >= seg_size.segments_per_xlog_id() {
            return Err(err());
        }
        Ok(SegmentName {
            timeline: TimelineId(tli),
            segno: log * seg_size.segments_per_xlog_id() + seg,
            seg_size: seg_size.into(),
        })
    }

    fn size(self) -> WalSegmentSize {
        WalSegmentSize(self.seg_size.0)
    }

    /// First LSN in the segment.
    pub fn start_lsn(self) -> Lsn {
        Lsn(self.segno * self.size().bytes())
    }

    /// First LSN after the segment.
    pub fn end_lsn(self) -> Lsn {
        Lsn((self.segno + 1) * self.size().bytes())
    }

    /// The next segment on the same timeline.
    pub fn next(self) -> SegmentName {
        SegmentName {
            segno: self.segno + 1,
            ..self
        }
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_id = self.size().segments_per_xlog_id();
        write!(
            f,
            "{:08X}{:08X}{:08X}",
            self.timeline.0,
            self.segno / per_id,
            self.segno % per_id
        )
    }
}

/// A name that is not a valid segment name for the segment size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid WAL segment name {0:?}")]
pub struct ParseNameError(pub String);

/// What an archived file name says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveFileKind {
    /// `000000010000000000000003`
    Segment,
    /// `000000010000000000000003.partial`: the last, incomplete segment of a timeline.
    Partial,
    /// `00000002.history`
    History(TimelineId),
    /// `000000010000000000000003.00000028.backup`: a base backup's history file.
    BackupHistory,
    /// Anything else.
    Other,
}

impl ArchiveFileKind {
    /// Classifies a file name (no directory part) by its shape alone.
    pub fn of(name: &str) -> ArchiveFileKind {
        let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'));
        match name.len() {
            24 if hex(name) => ArchiveFileKind::Segment,
            32 if hex(&name[..24]) && &name[24..] == ".partial" => ArchiveFileKind::Partial,
            16 if hex(&name[..8]) && &name[8..] == ".history" => {
                match u32::from_str_radix(&name[..8], 16) {
                    Ok(tli) if tli > 0 => ArchiveFileKind::History(TimelineId(tli)),
                    _ => ArchiveFileKind::Other,
                }
            }
            40 if hex(&name[..24])
                && &name[24..25] == "."
                && hex(&name[25..33])
                && &name[33..] == ".backup" =>
            {
                ArchiveFileKind::BackupHistory
            }
            _ => ArchiveFileKind::Other,
        }
    }
}

impl FromStr for WalSegmentSize {
    type Err = InvalidSegmentSize;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.parse().map_err(|_| InvalidSegmentSize(0))?;
        WalSegmentSize::new(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert!(WalSegmentSize::new(1 << 20).is_ok());
        assert!(WalSegmentSize::new(1 << 30).is_ok());
        assert!(WalSegmentSize::new(1 << 19).is_err());
        assert!(WalSegmentSize::new(1 << 31).is_err());
        assert!(WalSegmentSize::new(3 << 20).is_err());
    }

    #[test]
    fn names_for_default_and_other_sizes() {
        let seg = WalSegmentSize::DEFAULT;
        let name = SegmentName::of(TimelineId(1), "1/2003028".parse().unwrap(), seg);
        assert_eq!(name.to_string(), "000000010000000100000002");
        assert_eq!(
            SegmentName::parse("000000010000000100000002", seg).unwrap(),
            name
        );
        assert_eq!(name.start_lsn(), "1/2000000".parse().unwrap());
        assert_eq!(name.end_lsn(), "1/3000000".parse().unwrap());
        assert_eq!(name.next().to_string(), "000000010000000100000003");

        let big = WalSegmentSize::new(1 << 30).unwrap();
        let name = SegmentName::of(TimelineId(3), "5/C0000000".parse().unwrap(), big);
        assert_eq!(name.to_string(), "000000030000000500000003");
        assert!(SegmentName::parse("000000030000000500000004", big).is_err());

        let small = WalSegmentSize::new(1 << 20).unwrap();
        let name = SegmentName::parse("0000000100000000000000FF", small).unwrap();
        assert_eq!(name.next().to_string(), "000000010000000000000100");
        assert!(SegmentName::parse("000000000000000000000001", seg).is_err());
        assert!(SegmentName::parse("00000001000000000000000a", seg).is_err());
    }

    #[test]
    fn classifies_archive_files() {
        use ArchiveFileKind::*;
        assert_eq!(ArchiveFileKind::of("000000010000000000000003"), Segment);
        assert_eq!(
            ArchiveFileKind::of("000000010000000000000003.partial"),
            Partial
        );
        assert_eq!(
            ArchiveFileKind::of("0000000A.history"),
            History(TimelineId(10))
        );
        assert_eq!(ArchiveFileKind::of("00000000.history"), Other);
        assert_eq!(
            ArchiveFileKind::of("000000010000000000000003.00000028.backup"),
            BackupHistory
        );
        for other in [
            "",
            "x",
            "00000001000000000000000",
            "000000010000000000000003.done",
            "0000000a.history",
        ] {
            assert_eq!(ArchiveFileKind::of(other), Other, "{other:?}");
        }
    }

    proptest! {
        #[test]
        fn name_round_trip(tli in 1u32.., segno in 0u64..(1 << 40), shift in 20u32..=30) {
            let seg = WalSegmentSize::new(1 << shift).unwrap();
            let segno = segno % (u64::MAX / seg.bytes());
            let name = SegmentName { timeline: TimelineId(tli), segno, seg_size: seg.into() };
            prop_assert_eq!(SegmentName::parse(&name.to_string(), seg).unwrap(), name);
        }
    }
}
