//! `Lsn`: a position in the WAL stream, and the segment and page arithmetic on it.

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

use crate::segment::WalSegmentSize;

/// WAL block (page) size. PostgreSQL builds with another XLOG_BLCKSZ are not supported.
pub const WAL_PAGE_SIZE: u64 = 8192;

/// A WAL position (XLogRecPtr). Displays as `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Text that is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers separated by a slash, such as 16/B374D848")]
pub struct ParseLsnError(pub String);

impl Lsn {
    /// The invalid LSN 0/0 (InvalidXLogRecPtr).
    pub const INVALID: Lsn = Lsn(0);

    /// True unless this is 0/0.
    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// Number of the segment holding this position.
    pub fn segment_number(self, seg_size: WalSegmentSize) -> u64 {
        self.0 / seg_size.bytes()
    }

    /// Offset of this position within its segment.
    pub fn segment_offset(self, seg_size: WalSegmentSize) -> u64 {
        self.0 % seg_size.bytes()
    }

    /// Offset of this position within its page.
    pub fn page_offset(self) -> u64 {
        self.0 % WAL_PAGE_SIZE
    }

    /// Start of the page holding this position.
    pub fn page_start(self) -> Lsn {
        Lsn(self.0 - self.page_offset())
    }

    /// Start of the segment holding this position.
    pub fn segment_start(self, seg_size: WalSegmentSize) -> Lsn {
        Lsn(self.0 - self.segment_offset(seg_size))
    }

    /// Rounds up to a multiple of 8 (MAXALIGN on every platform PostgreSQL ships WAL from).
    pub fn align8(self) -> Lsn {
        Lsn((self.0 + 7) & !7)
    }

    /// `self + n`, or None on overflow.
    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    /// Accepts `16/B374D848` and the zero-padded `16/0B374D848`, in either case.
    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hex = |part: &str| {
            let ok =
                !part.is_empty() && part.len() <= 16 && part.bytes().all(|b| b.is_ascii_hexdigit());
            ok.then(|| u64::from_str_radix(part, 16).ok()).flatten()
        };
        let (hi, lo) = (hex(hi).ok_or_else(err)?, hex(lo).ok_or_else(err)?);
        if hi > 0xFFFF_FFFF || lo > 0xFFFF_FFFF {
            return Err(err());
        }
        Ok(Lsn(hi << 32 | lo))
    }
}

impl Add<u64> for Lsn {
    type Output = Lsn;
    fn add(self, rhs: u64) -> Lsn {
        Lsn(self.0 + rhs)
    }
}

impl Sub<Lsn> for Lsn {
    type Output = u64;
    /// Bytes from `rhs` to `self` (panics if `rhs` is later, like integer subtraction).
    fn sub(self, rhs: Lsn) -> u64 {
        self.0 - rhs.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_plain_and_padded_forms() {
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!("16/0B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::INVALID);
        assert_eq!("ff/ffffffff".parse::<Lsn>().unwrap(), Lsn(0xFF_FFFF_FFFF));
        for bad in [
            "",
            "16",
            "/1",
            "1/",
            "1/2/3",
            "g/1",
            "1/100000000",
            " 1/2",
            "+1/2",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn displays_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0x100).to_string(), "0/100");
    }

    #[test]
    fn segment_and_page_math() {
        let seg = WalSegmentSize::DEFAULT;
        let lsn: Lsn = "1/2003028".parse().unwrap();
        assert_eq!(lsn.segment_number(seg), 0x100 + 2);
        assert_eq!(lsn.segment_offset(seg), 0x3028);
        assert_eq!(lsn.page_offset(), 0x1028);
        assert_eq!(lsn.page_start(), "1/2002000".parse().unwrap());
        assert_eq!(lsn.segment_start(seg), "1/2000000".parse().unwrap());
        assert_eq!(Lsn(9).align8(), Lsn(16));
        assert_eq!(Lsn(16).align8(), Lsn(16));
    }

    proptest! {
        #[test]
        fn text_round_trip(v in any::<u64>()) {
            let lsn = Lsn(v);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }
    }
}
