//! Test-only: writes well-formed WAL (page headers, records spanning pages, CRCs) so the
//! decoder can be driven through cases a real server rarely produces on demand.

use crate::lsn::{Lsn, WAL_PAGE_SIZE};
use crate::page::{XLP_FIRST_IS_CONTRECORD, XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER};
use crate::record::RECORD_HEADER_LEN;

pub(crate) const SYSID: u64 = 7_312_345_678_901_234_567;

pub(crate) struct WalWriter {
    pub bytes: Vec<u8>,
    start: Lsn,
    seg_size: u64,
    prev: Lsn,
    /// Flag for the next page header (OVERWRITE_CONTRECORD tests).
    pub next_page_flags: u16,
}

impl WalWriter {
    pub(crate) fn new(start: Lsn, seg_size: u64) -> WalWriter {
        WalWriter {
            bytes: Vec::new(),
            start,
            seg_size,
            prev: Lsn::INVALID,
            next_page_flags: 0,
        }
    }

    pub(crate) fn pos(&self) -> Lsn {
        self.start + self.bytes.len() as u64
    }

    fn page_header(&mut self, rem_len: u32) {
        let pos = self.pos();
        let long = pos.0.is_multiple_of(self.seg_size);
        let mut info = std::mem::take(&mut self.next_page_flags);
        if rem_len > 0 {
            info |= XLP_FIRST_IS_CONTRECORD;
        }
        if long {
            info |= XLP_LONG_HEADER;
        }
        let b = &mut self.bytes;
        b.extend_from_slice(&0xD110u16.to_le_bytes());
        b.extend_from_slice(&info.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&pos.0.to_le_bytes());
        b.extend_from_slice(&rem_len.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        if long {
            b.extend_from_slice(&SYSID.to_le_bytes());
            b.extend_from_slice(&(self.seg_size as u32).to_le_bytes());
            b.extend_from_slice(&(WAL_PAGE_SIZE as u32).to_le_bytes());
        }
    }

    /// Pads to the next record position.
    fn align(&mut self) {
        while !self.pos().0.is_multiple_of(8) {
            self.bytes.push(0);
        }
    }

    /// The bytes of a record (not yet placed).
    pub(crate) fn record(&self, rmid: u8, info: u8, xid: u32, main: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        if main.len() < 256 {
            body.push(255);
            body.push(main.len() as u8);
        } else {
            body.push(254);
            body.extend_from_slice(&(main.len() as u32).to_le_bytes());
        }
        body.extend_from_slice(main);
        let tot_len = (RECORD_HEADER_LEN + body.len()) as u32;
        let mut rec = Vec::new();
        rec.extend_from_slice(&tot_len.to_le_bytes());
        rec.extend_from_slice(&xid.to_le_bytes());
        rec.extend_from_slice(&self.prev.0.to_le_bytes());
        rec.push(info);
        rec.push(rmid);
        rec.extend_from_slice(&[0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&body), &rec[..20]);
        rec.extend_from_slice(&crc.to_le_bytes());
        rec.extend_from_slice(&body);
        rec
    }

    /// Writes `rec` at the next record position, spanning pages as needed; returns its LSN.
    /// With `cut_after`, stops after that many bytes of it (a torn write).
    pub(crate) fn place(&mut self, rec: &[u8], cut_after: Option<usize>) -> Lsn {
        self.align();
        if self.pos().page_offset() == 0 {
            self.page_header(0);
        }
        let lsn = self.pos();
        let mut written = 0;
        let limit = cut_after.unwrap_or(rec.len());
        while written < limit {
            if self.pos().page_offset() == 0 {
                self.page_header((rec.len() - written) as u32);
            }
            let room = (WAL_PAGE_SIZE - self.pos().page_offset()) as usize;
            let n = room.min(limit - written);
            self.bytes.extend_from_slice(&rec[written..written + n]);
            written += n;
        }
        if cut_after.is_none() {
            self.prev = lsn;
        }
        lsn
    }

    /// Appends a record with `main` as its main data; returns its LSN.
    pub(crate) fn append(&mut self, rmid: u8, info: u8, xid: u32, main: &[u8]) -> Lsn {
        let rec = self.record(rmid, info, xid, main);
        self.place(&rec, None)
    }

    /// Zero-fills to the next page boundary.
    pub(crate) fn pad_to_page(&mut self) {
        while self.pos().page_offset() != 0 {
            self.bytes.push(0);
        }
    }

    /// Marks the next page as overwriting an abandoned continuation.
    pub(crate) fn overwrite_next_page(&mut self) {
        self.next_page_flags = XLP_FIRST_IS_OVERWRITE_CONTRECORD;
    }
}
