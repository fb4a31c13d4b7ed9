//! WAL page headers: the short header every page has, and the long one that opens a
//! segment. Parsing checks only the bytes; [`validate`] checks a header against where it was
//! read and what came before.

use crate::lsn::{Lsn, WAL_PAGE_SIZE};
use crate::segment::WalSegmentSize;
use crate::timeline::TimelineId;
use crate::version::PgMajor;

/// The page starts with the rest of a record begun on an earlier page.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// The page has a long header (the first page of a segment).
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// Backup blocks on the page are optional (unused since 9.5; still a valid bit).
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
/// A record that was to continue here was abandoned; an OVERWRITE_CONTRECORD follows.
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
const XLP_ALL_FLAGS: u16 = 0x000F;

/// Bytes in a short page header (MAXALIGNed).
pub const SHORT_HEADER_LEN: usize = 24;
/// Bytes in a long page header (MAXALIGNed).
pub const LONG_HEADER_LEN: usize = 40;

/// A parsed page header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageHeader {
    /// XLOG_PAGE_MAGIC.
    pub magic: u16,
    /// Flag bits (`XLP_*`).
    pub info: u16,
    /// Timeline of the WAL on this page.
    pub timeline: TimelineId,
    /// The LSN of the page's first byte, as the writer saw it.
    pub page_addr: Lsn,
    /// Bytes of a continued record still to come (with `XLP_FIRST_IS_CONTRECORD`).
    pub rem_len: u32,
    /// The long header's extra fields, on the first page of a segment.
    pub long: Option<LongHeader>,
}

/// Fields only the first page of a segment has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongHeader {
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// wal_segment_size in bytes, as written.
    pub seg_size: u32,
    /// XLOG_BLCKSZ, as written.
    pub block_size: u32,
}

impl PageHeader {
    /// Length of this header on the page.
    pub fn len(&self) -> usize {
        if self.long.is_some() {
            LONG_HEADER_LEN
        } else {
            SHORT_HEADER_LEN
        }
    }

    /// Never empty; here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Tests a flag bit.
    pub fn has(&self, flag: u16) -> bool {
        self.info & flag != 0
    }
}

/// Why a page header is not valid WAL at the place it was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// Wrong or unknown magic (a zero page, or another version's WAL).
    #[error("invalid magic number {magic:04X} in WAL page at {lsn}")]
    BadMagic { lsn: Lsn, magic: u16 },
    /// Undefined flag bits.
    #[error("invalid info bits {info:04X} in WAL page at {lsn}")]
    BadInfo { lsn: Lsn, info: u16 },
    /// The first page of a segment without a long header.
    #[error("WAL page at {lsn} starts a segment but has no long header")]
    MissingLongHeader { lsn: Lsn },
    /// The page says it belongs elsewhere (a recycled segment's old contents).
    #[error("unexpected page address {found} in WAL page at {lsn}")]
    PageAddrMismatch { lsn: Lsn, found: Lsn },
    /// Timeline went backwards from one page to the next.
    #[error("out-of-sequence timeline {found} (after {previous}) in WAL page at {lsn}")]
    TimelineBackwards {
        lsn: Lsn,
        found: TimelineId,
        previous: TimelineId,
    },
    /// Another cluster's WAL.
    #[error("WAL page at {lsn} is from system {found}, expected {expected}")]
    SystemIdMismatch { lsn: Lsn, found: u64, expected: u64 },
    /// The long header names a segment or block size that cannot be.
    #[error("WAL page at {lsn} has segment size {seg_size} and block size {block_size}")]
    BadSizes {
        lsn: Lsn,
        seg_size: u32,
        block_size: u32,
    },
    /// Magic of a different version than the pages before.
    #[error("WAL page at {lsn} has magic {found:04X}, expected {expected:04X}")]
    VersionChanged { lsn: Lsn, found: u16, expected: u16 },
}

impl PageError {
    /// Where the offending page starts.
    pub fn lsn(&self) -> Lsn {
        match *self {
            PageError::BadMagic { lsn, .. }
            | PageError::BadInfo { lsn, .. }
            | PageError::MissingLongHeader { lsn }
            | PageError::PageAddrMismatch { lsn, .. }
            | PageError::TimelineBackwards { lsn, .. }
            | PageError::SystemIdMismatch { lsn, .. }
            | PageError::BadSizes { lsn, .. }
            | PageError::VersionChanged { lsn, .. } => lsn,
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// How many header bytes the page at the start of `bytes` needs: None until the first
/// 4 bytes are there, then 24 or 40.
pub fn header_len(bytes: &[u8]) -> Option<usize> {
    (bytes.len() >= 4).then(|| {
        if u16_at(bytes, 2) & XLP_LONG_HEADER != 0 {
            LONG_HEADER_LEN
        } else {
            SHORT_HEADER_LEN
        }
    })
}

/// Parses the header at the start of `bytes`; None if fewer bytes than [`header_len`] says.
pub fn parse(bytes: &[u8]) -> Option<PageHeader> {
    let len = header_len(bytes)?;
    if bytes.len() < len {
        return None;
    }
    let info = u16_at(bytes, 2);
    Some(PageHeader {
        magic: u16_at(bytes, 0),
        info,
        timeline: TimelineId(u32_at(bytes, 4)),
        page_addr: Lsn(u64_at(bytes, 8)),
        rem_len: u32_at(bytes, 16),
        long: (len == LONG_HEADER_LEN).then(|| LongHeader {
            system_identifier: u64_at(bytes, 24),
            seg_size: u32_at(bytes, 32),
            block_size: u32_at(bytes, 36),
        }),
    })
}

/// What a page header is checked against.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expect {
    /// Magic of the pages read so far.
    pub magic: Option<u16>,
    /// System identifier of the pages read so far.
    pub system_identifier: Option<u64>,
    /// Segment size (decides which pages must have long headers).
    pub seg_size: Option<WalSegmentSize>,
    /// Timeline of the previous page.
    pub timeline: Option<TimelineId>,
}

/// Checks a header read at `lsn` (a page boundary), as PostgreSQL's reader does.
pub fn validate(h: &PageHeader, lsn: Lsn, expect: &Expect) -> Result<(), PageError> {
    let Some(version) = PgMajor::from_page_magic(h.magic) else {
        return Err(PageError::BadMagic {
            lsn,
            magic: h.magic,
        });
    };
    if let Some(expected) = expect.magic {
        if expected != h.magic {
            return Err(PageError::VersionChanged {
                lsn,
                found: h.magic,
                expected,
            });
        }
    }
    let _ = version;
    if h.info & !XLP_ALL_FLAGS != 0 {
        return Err(PageError::BadInfo { lsn, info: h.info });
    }
    if let Some(long) = &h.long {
        let seg_ok = WalSegmentSize::new(long.seg_size as u64).is_ok();
        if !seg_ok || long.block_size as u64 != WAL_PAGE_SIZE {
            return Err(PageError::BadSizes {
                lsn,
                seg_size: long.seg_size,
                block_size: long.block_size,
            });
        }
        if let Some(expected) = expect.system_identifier {
            if expected != long.system_identifier {
                return Err(PageError::SystemIdMismatch {
                    lsn,
                    found: long.system_identifier,
                    expected,
                });
            }
        }
    }
    let seg_size = h
        .long
        .and_then(|l| WalSegmentSize::new(l.seg_size as u64).ok())
        .or(expect.seg_size);
    if let Some(seg_size) = seg_size {
        if lsn.segment_offset(seg_size) == 0 && h.long.is_none() {
            return Err(PageError::MissingLongHeader { lsn });
        }
    }
    if h.page_addr != lsn {
        return Err(PageError::PageAddrMismatch {
            lsn,
            found: h.page_addr,
        });
    }
    if let Some(previous) = expect.timeline {
        if h.timeline < previous {
            return Err(PageError::TimelineBackwards {
                lsn,
                found: h.timeline,
                previous,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A page header's bytes, for tests here and in the decoder.
    pub(crate) fn header_bytes(
        info: u16,
        tli: u32,
        addr: u64,
        rem_len: u32,
        long: Option<(u64, u32)>,
    ) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0xD110u16.to_le_bytes());
        let info = if long.is_some() {
            info | XLP_LONG_HEADER
        } else {
            info
        };
        b.extend_from_slice(&info.to_le_bytes());
        b.extend_from_slice(&tli.to_le_bytes());
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&rem_len.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        if let Some((sysid, seg)) = long {
            b.extend_from_slice(&sysid.to_le_bytes());
            b.extend_from_slice(&seg.to_le_bytes());
            b.extend_from_slice(&8192u32.to_le_bytes());
        }
        b
    }

    #[test]
    fn parses_long_and_short_headers() {
        let long = header_bytes(0, 1, 0x100_0000, 0, Some((7, 16 << 20)));
        let h = parse(&long).unwrap();
        assert_eq!(h.len(), LONG_HEADER_LEN);
        assert_eq!(h.long.unwrap().system_identifier, 7);
        assert!(validate(&h, Lsn(0x100_0000), &Expect::default()).is_ok());
        assert!(parse(&long[..30]).is_none());

        let short = header_bytes(XLP_FIRST_IS_CONTRECORD, 1, 0x100_2000, 100, None);
        let h = parse(&short).unwrap();
        assert!(h.has(XLP_FIRST_IS_CONTRECORD));
        assert_eq!(h.rem_len, 100);
        assert!(validate(&h, Lsn(0x100_2000), &Expect::default()).is_ok());
    }

    #[test]
    fn invalid_headers_name_their_lsn() {
        let zero = [0u8; 40];
        let err = validate(&parse(&zero).unwrap(), Lsn(0x2000), &Expect::default()).unwrap_err();
        assert_eq!(
            err,
            PageError::BadMagic {
                lsn: Lsn(0x2000),
                magic: 0
            }
        );

        let recycled = header_bytes(0, 1, 0x2000, 0, None);
        let err = validate(
            &parse(&recycled).unwrap(),
            Lsn(0x100_2000),
            &Expect::default(),
        );
        assert!(matches!(
            err,
            Err(PageError::PageAddrMismatch {
                found: Lsn(0x2000),
                ..
            })
        ));

        let short_at_seg_start = header_bytes(0, 1, 0x100_0000, 0, None);
        let expect = Expect {
            seg_size: Some(WalSegmentSize::DEFAULT),
            ..Expect::default()
        };
        let err = validate(
            &parse(&short_at_seg_start).unwrap(),
            Lsn(0x100_0000),
            &expect,
        );
        assert_eq!(
            err,
            Err(PageError::MissingLongHeader {
                lsn: Lsn(0x100_0000)
            })
        );

        let older_tli = header_bytes(0, 1, 0x2000, 0, None);
        let expect = Expect {
            timeline: Some(TimelineId(2)),
            ..Expect::default()
        };
        let err = validate(&parse(&older_tli).unwrap(), Lsn(0x2000), &expect);
        assert!(matches!(err, Err(PageError::TimelineBackwards { .. })));

        let bad_bits = header_bytes(0x40, 1, 0x2000, 0, None);
        let err = validate(&parse(&bad_bits).unwrap(), Lsn(0x2000), &Expect::default());
        assert!(matches!(err, Err(PageError::BadInfo { .. })));
    }
}
