//! Taking apart the tar streams BASE_BACKUP sends, sans-IO: bytes are fed in as they
//! arrive and come out as entries (path, kind, mode, size, time) and their contents, as
//! slices of what was fed, never collected whole.
//!
//! PostgreSQL writes plain ustar headers (src/port/tar.c): names of at most 99 bytes with
//! no prefix field, regular files, directories and symlinks, sizes in octal or, from 8 GiB,
//! base-256. A stream may end with the two zero blocks or, as BASE_BACKUP sends its
//! archives, without them.

use bytes::{Buf, Bytes, BytesMut};

const BLOCK: usize = 512;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link to the target (tablespaces in pg_tblspc).
    Symlink(String),
}

/// One entry's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// Path inside the archive (no trailing `/` for directories).
    pub path: String,
    /// Kind.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Content length (0 but for files).
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

/// What the reader found next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEvent {
    /// An entry starts; for a file, its contents follow as `Data` events.
    Entry(TarEntry),
    /// A piece of the current file's contents, in order.
    Data(Bytes),
    /// The end-of-archive blocks.
    End,
}

/// A stream that is not a tar archive PostgreSQL would write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tar stream at byte {offset}: {reason}")]
pub struct TarError {
    /// Where in the stream.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

#[derive(Debug)]
enum State {
    Header,
    Data { left: u64, pad: usize },
    Ended,
}

/// The streaming reader.
#[derive(Debug)]
pub struct TarReader {
    buf: BytesMut,
    state: State,
    offset: u64,
}

impl Default for TarReader {
    fn default() -> Self {
        TarReader::new()
    }
}

fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// A NUL-terminated (or full-width) text field.
fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// An octal number field, or base-256 when its first byte has the high bit set.
fn number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let t = text(field);
    let t = t.trim_matches(|c: char| c == ' ' || c == '\0');
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(t, 8).ok()
}

impl TarReader {
    /// A reader at the start of an archive.
    pub fn new() -> TarReader {
        TarReader {
            buf: BytesMut::new(),
            state: State::Header,
            offset: 0,
        }
    }

    /// Appends the next bytes of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    fn error(&self, reason: impl Into<String>) -> TarError {
        TarError {
            offset: self.offset,
            reason: reason.into(),
        }
    }

    fn consume(&mut self, n: usize) -> Bytes {
        self.offset += n as u64;
        self.buf.split_to(n).freeze()
    }

    /// The next event, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<TarEvent>, TarError> {
        loop {
            match self.state {
                State::Ended => return Ok(None),
                State::Data { left: 0, pad } => {
                    if self.buf.len() < pad {
                        return Ok(None);
                    }
                    self.consume(pad);
                    self.state = State::Header;
                }
                State::Data { left, pad } => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (left.min(self.buf.len() as u64)) as usize;
                    let data = self.consume(n);
                    self.state = State::Data {
                        left: left - n as u64,
                        pad,
                    };
                    return Ok(Some(TarEvent::Data(data)));
                }
                State::Header => {
                    if self.buf.len() < BLOCK {
                        return Ok(None);
                    }
                    if self.buf[..BLOCK].iter().all(|&b| b == 0) {
                        self.consume(BLOCK);
                        self.state = State::Ended;
                        // The second zero block, if it came, is part of the end.
                        if self.buf.len() >= BLOCK && self.buf[..BLOCK].iter().all(|&b| b == 0) {
                            self.consume(BLOCK);
                        }
                        return Ok(Some(TarEvent::End));
                    }
                    let entry = self.header()?;
                    self.consume(BLOCK);
                    self.state = State::Data {
                        left: entry.size,
                        pad: padding(entry.size),
                    };
                    return Ok(Some(TarEvent::Entry(entry)));
                }
            }
        }
    }

    fn header(&self) -> Result<TarEntry, TarError> {
        let h = &self.buf[..BLOCK];
        let stored = number(&h[148..156]).ok_or_else(|| self.error("bad header checksum field"))?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if sum != stored {
            return Err(self.error(format!(
                "header checksum {stored} does not match its bytes ({sum})"
            )));
        }
        let mut path = text(&h[0..100]);
        if &h[257..262] == b"ustar" {
            let prefix = text(&h[345..500]);
            if !prefix.is_empty() {
                path = format!("{prefix}/{path}");
            }
        }
        let field = |range: std::ops::Range<usize>, what: &str| {
            number(&h[range]).ok_or_else(|| self.error(format!("bad {what} field in \"{path}\"")))
        };
        let mode = field(100..108, "mode")? as u32;
        let size = field(124..136, "size")?;
        let mtime = field(136..148, "mtime")? as i64;
        let kind = match h[156] {
            b'0' | 0 => EntryKind::File,
            b'5' => EntryKind::Directory,
            b'2' => EntryKind::Symlink(text(&h[157..257])),
            other => {
                return Err(self.error(format!(
                    "entry \"{path}\" has type {:?}, which PostgreSQL does not write",
                    other as char
                )))
            }
        };
        let size = if kind == EntryKind::File { size } else { 0 };
        let path = path.trim_end_matches('/').to_owned();
        Ok(TarEntry {
            path,
            kind,
            mode: mode & 0o7777,
            size,
            mtime,
        })
    }

    /// Checks the stream ended at an entry boundary (with or without the end blocks).
    pub fn finish(&mut self) -> Result<(), TarError> {
        match self.state {
            State::Header if self.buf.is_empty() => Ok(()),
            State::Ended => {
                // Anything after the end blocks must be zero padding.
                if self.buf.iter().all(|&b| b == 0) {
                    self.buf.advance(self.buf.len());
                    Ok(())
                } else {
                    Err(self.error("data after the end of the archive"))
                }
            }
            _ => Err(self.error("the stream ends inside an entry")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar header as PostgreSQL writes one.
    pub(crate) fn header(path: &str, kind: u8, size: u64, link: &str) -> Vec<u8> {
        let mut h = vec![0u8; BLOCK];
        h[..path.len()].copy_from_slice(path.as_bytes());
        h[100..108].copy_from_slice(b"0000600\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"14500000000\0");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn archive(end_blocks: bool) -> Vec<u8> {
        let mut a = header("backup_label", b'0', 5, "");
        a.extend_from_slice(b"hello");
        a.extend_from_slice(&[0; BLOCK - 5]);
        a.extend(header("base/1/", b'5', 0, ""));
        a.extend(header("pg_tblspc/16384", b'2', 0, "/srv/ts"));
        a.extend(header("global/pg_control", b'0', 1024, ""));
        a.extend((0..1024).map(|i| (i % 251) as u8));
        if end_blocks {
            a.extend_from_slice(&[0; 2 * BLOCK]);
        }
        a
    }

    fn read_all(bytes: &[u8], piece: usize) -> Result<Vec<(TarEntry, Vec<u8>)>, TarError> {
        let mut r = TarReader::new();
        let mut out: Vec<(TarEntry, Vec<u8>)> = Vec::new();
        for chunk in bytes.chunks(piece) {
            r.feed(chunk);
            while let Some(e) = r.next_event()? {
                match e {
                    TarEvent::Entry(entry) => out.push((entry, Vec::new())),
                    TarEvent::Data(d) => out.last_mut().unwrap().1.extend_from_slice(&d),
                    TarEvent::End => {}
                }
            }
        }
        r.finish()?;
        Ok(out)
    }

    #[test]
    fn entries_and_contents_in_any_split() {
        for end_blocks in [true, false] {
            let a = archive(end_blocks);
            for piece in [1, 7, 512, 513, 100_000] {
                let got = read_all(&a, piece).unwrap();
                assert_eq!(got.len(), 4);
                assert_eq!(got[0].0.path, "backup_label");
                assert_eq!(got[0].1, b"hello");
                assert_eq!(got[0].0.mode, 0o600);
                assert_eq!(got[1].0.kind, EntryKind::Directory);
                assert_eq!(got[1].0.path, "base/1");
                assert_eq!(got[2].0.kind, EntryKind::Symlink("/srv/ts".into()));
                assert_eq!(got[3].0.size, 1024);
                assert_eq!(got[3].1.len(), 1024);
                assert_eq!(got[3].1[300], (300 % 251) as u8);
            }
        }
    }

    #[test]
    fn damage_is_an_error_with_its_place() {
        let mut a = archive(true);
        a[10] ^= 1; // inside the first header: its checksum no longer matches
        let err = read_all(&a, 4096).unwrap_err();
        assert_eq!(err.offset, 0);
        assert!(err.reason.contains("checksum"), "{err}");
        let a = archive(false);
        let err = read_all(&a[..a.len() - 10], 4096).unwrap_err();
        assert!(err.reason.contains("inside an entry"), "{err}");
    }

    #[test]
    fn base_256_sizes() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[7] = 0x02; // 2 << 32 = 8 GiB
        assert_eq!(number(&field), Some(8 << 30));
        assert_eq!(number(b"00000001750\0"), Some(1000));
        assert_eq!(number(b"   \0"), Some(0));
    }
}
