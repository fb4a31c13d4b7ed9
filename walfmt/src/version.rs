//! PostgreSQL major versions and the per-version constants of the WAL format, in one place.

use std::fmt;

/// A PostgreSQL major version whose WAL pitr reads (13 to 18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgMajor(u32);

/// (major, XLOG_PAGE_MAGIC) for every supported version.
const PAGE_MAGIC: [(u32, u16); 6] = [
    (13, 0xD106),
    (14, 0xD10D),
    (15, 0xD110),
    (16, 0xD113),
    (17, 0xD116),
    (18, 0xD118),
];

impl PgMajor {
    /// The version whose WAL pages carry `magic`, if it is one pitr supports.
    pub fn from_page_magic(magic: u16) -> Option<PgMajor> {
        PAGE_MAGIC
            .iter()
            .find(|(_, m)| *m == magic)
            .map(|(v, _)| PgMajor(*v))
    }

    /// A supported major version by number.
    pub fn new(major: u32) -> Option<PgMajor> {
        PAGE_MAGIC
            .iter()
            .any(|(v, _)| *v == major)
            .then_some(PgMajor(major))
    }

    /// The major version number.
    pub fn number(self) -> u32 {
        self.0
    }

    /// XLOG_PAGE_MAGIC of this version.
    pub fn page_magic(self) -> u16 {
        PAGE_MAGIC
            .iter()
            .find(|(v, _)| *v == self.0)
            .map(|(_, m)| *m)
            .unwrap_or(0)
    }

    /// Whether a record's resource manager id is valid: the built-in ones (0..=21 in every
    /// supported version) and, from 15 on, custom ones (128..=255).
    pub fn rmid_is_valid(self, rmid: u8) -> bool {
        rmid <= 21 || (self.0 >= 15 && rmid >= 128)
    }

    /// Whether a block image with these `bimg_info` bits is compressed (and so carries a
    /// hole-length header when it has a hole). The bits moved in 15.
    pub fn block_image_is_compressed(self, bimg_info: u8) -> bool {
        if self.0 <= 14 {
            bimg_info & 0x02 != 0
        } else {
            bimg_info & (0x04 | 0x08 | 0x10) != 0
        }
    }

    /// Size of one dropped-statistics item in a commit or abort record (15+; 18 widened it).
    pub fn dropped_stats_item_size(self) -> usize {
        if self.0 >= 18 {
            16
        } else {
            12
        }
    }
}

impl fmt::Display for PgMajor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_table() {
        assert_eq!(PgMajor::from_page_magic(0xD110), Some(PgMajor(15)));
        assert_eq!(PgMajor::from_page_magic(0xD118).unwrap().number(), 18);
        assert_eq!(PgMajor::from_page_magic(0xD101), None);
        assert_eq!(PgMajor::new(13).unwrap().page_magic(), 0xD106);
        assert!(PgMajor::new(12).is_none());
    }
}
