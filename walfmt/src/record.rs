//! WAL records: the 24-byte header, CRC-32C, and the block-reference headers that lead to
//! a record's main data.

use crate::lsn::Lsn;
use crate::version::PgMajor;

/// Bytes in an XLogRecord header.
pub const RECORD_HEADER_LEN: usize = 24;
/// Largest record a reader accepts (PostgreSQL's readers refuse 1 GiB and more).
pub const MAX_RECORD_LEN: u32 = 0x3FFF_FFFF;

/// Resource manager of WAL-internal records (checkpoints, switches, restore points).
pub const RM_XLOG_ID: u8 = 0;
/// Resource manager of transaction commit and abort records.
pub const RM_XACT_ID: u8 = 1;
/// XLOG: the rest of the segment is unused.
pub const XLOG_SWITCH: u8 = 0x40;
/// XLOG: a named restore point.
pub const XLOG_RESTORE_POINT: u8 = 0x70;
/// XLOG: marks where an abandoned record was overwritten.
pub const XLOG_OVERWRITE_CONTRECORD: u8 = 0xD0;

/// pg_waldump's name of each built-in resource manager, by id (the same in 13..18).
pub const RMGR_NAMES: [&str; 22] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// The name of a resource manager (`custom###` for extension ones).
pub fn rmgr_name(rmid: u8) -> String {
    RMGR_NAMES
        .get(rmid as usize)
        .map_or_else(|| format!("custom{rmid:03}"), |n| (*n).to_owned())
}

/// A record's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Total length including this header.
    pub tot_len: u32,
    /// Transaction id (0 when none).
    pub xid: u32,
    /// Start of the previous record.
    pub prev: Lsn,
    /// Resource-manager-specific flag bits (high 4) and WAL-internal bits (low 4).
    pub info: u8,
    /// Resource manager id.
    pub rmid: u8,
    /// CRC-32C of the record.
    pub crc: u32,
}

impl RecordHeader {
    /// Parses the first 24 bytes; None if fewer are given.
    pub fn parse(b: &[u8]) -> Option<RecordHeader> {
        let b = b.get(..RECORD_HEADER_LEN)?;
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut prev = [0u8; 8];
        prev.copy_from_slice(&b[8..16]);
        Some(RecordHeader {
            tot_len: u32_at(0),
            xid: u32_at(4),
            prev: Lsn(u64::from_le_bytes(prev)),
            info: b[16],
            rmid: b[17],
            crc: u32_at(20),
        })
    }

    /// The rmgr-specific part of `info`.
    pub fn rmgr_info(&self) -> u8 {
        self.info & 0xF0
    }

    /// True for XLOG_SWITCH.
    pub fn is_switch(&self) -> bool {
        self.rmid == RM_XLOG_ID && self.rmgr_info() == XLOG_SWITCH
    }
}

/// A whole record, reassembled from the pages it spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where the record starts.
    pub lsn: Lsn,
    /// The first position after its last byte (page headers it spans included).
    pub end: Lsn,
    /// Its header.
    pub header: RecordHeader,
    /// All `tot_len` bytes, header first.
    pub bytes: Vec<u8>,
}

/// A record whose block headers do not add up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed WAL record at {lsn}: {reason}")]
pub struct MalformedRecord {
    /// The record's LSN.
    pub lsn: Lsn,
    /// What does not add up.
    pub reason: &'static str,
}

/// Whether the stored CRC matches the record: CRC-32C over the body, then the header up to
/// the CRC field.
pub fn crc_matches(bytes: &[u8]) -> bool {
    let Some(header) = RecordHeader::parse(bytes) else {
        return false;
    };
    let body = crc32c::crc32c(&bytes[RECORD_HEADER_LEN..]);
    crc32c::crc32c_append(body, &bytes[..20]) == header.crc
}

impl Record {
    /// The record's main data (the rmgr's own struct), found by walking the block
    /// reference headers; its layout depends on `version` only in the image flags.
    pub fn main_data(&self, version: PgMajor) -> Result<&[u8], MalformedRecord> {
        let err = |reason| MalformedRecord {
            lsn: self.lsn,
            reason,
        };
        let b = &self.bytes;
        let total = b.len();
        let mut at = RECORD_HEADER_LEN;
        let mut datatotal: usize = 0;
        let mut main_len: usize = 0;
        let byte = |at: usize| b.get(at).copied().ok_or(err("header runs past the record"));
        let u16_at = |at: usize| {
            Ok::<usize, MalformedRecord>(u16::from_le_bytes([byte(at)?, byte(at + 1)?]) as usize)
        };
        while total - at.min(total) > datatotal {
            let id = byte(at)?;
            at += 1;
            match id {
                255 => {
                    main_len = byte(at)? as usize;
                    at += 1;
                    datatotal += main_len;
                    break;
                }
                254 => {
                    let x = b
                        .get(at..at + 4)
                        .ok_or(err("header runs past the record"))?;
                    main_len = u32::from_le_bytes([x[0], x[1], x[2], x[3]]) as usize;
                    at += 4;
                    datatotal = datatotal.saturating_add(main_len);
                    break;
                }
                253 => at += 2,
                252 => at += 4,
                0..=32 => {
                    let fork_flags = byte(at)?;
                    datatotal += u16_at(at + 1)?;
                    at += 3;
                    if fork_flags & 0x10 != 0 {
                        datatotal += u16_at(at)?;
                        let bimg_info = byte(at + 4)?;
                        at += 5;
                        if bimg_info & 0x01 != 0 && version.block_image_is_compressed(bimg_info) {
                            at += 2;
                        }
                    }
                    if fork_flags & 0x80 == 0 {
                        at += 12;
                    }
                    at += 4;
                }
                _ => return Err(err("invalid block id")),
            }
        }
        if at > total || total - at < datatotal || main_len > total {
            return Err(err("lengths exceed the record"));
        }
        Ok(&b[total - main_len..])
    }
}
