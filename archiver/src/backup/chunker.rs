//! BASE_BACKUP's archives cut into manifest entries and fixed-size chunks, sans-IO: tar
//! bytes go in as they stream, entries and chunks (slices of what came in, never whole
//! files) come out. A file's chunks start at its first byte, so a chunk holds whole 8 KiB
//! pages and the same page range of an unchanged file is the same chunk in every backup.

use bytes::{Bytes, BytesMut};
use repo::manifest::{FileType, ManifestFile};

use crate::tar::{EntryKind, TarError, TarEvent, TarReader};

/// A piece of a file, to be hashed and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Index of the file in [`Chunker::files`].
    pub file: u32,
    /// Its place among the file's chunks.
    pub seq: u32,
    /// The bytes.
    pub data: Bytes,
}

#[derive(Debug)]
struct Current {
    file: u32,
    left: u64,
    seq: u32,
    pending: BytesMut,
}

/// Takes the archives apart, one after another.
#[derive(Debug)]
pub struct Chunker {
    chunk_size: usize,
    reader: TarReader,
    tablespace: Option<u32>,
    files: Vec<ManifestFile>,
    current: Option<Current>,
    /// File bytes seen so far.
    pub bytes: u64,
}

impl Chunker {
    /// A chunker cutting files into `chunk_size` pieces (the last of a file may be shorter).
    pub fn new(chunk_size: usize) -> Chunker {
        Chunker {
            chunk_size: chunk_size.max(1),
            reader: TarReader::new(),
            tablespace: None,
            files: Vec::new(),
            current: None,
            bytes: 0,
        }
    }

    /// The next archive starts: the data directory (`None`) or a tablespace's.
    pub fn start_archive(&mut self, tablespace: Option<u32>) -> Result<(), TarError> {
        self.end_archive()?;
        self.reader = TarReader::new();
        self.tablespace = tablespace;
        Ok(())
    }

    /// Checks the current archive ended at an entry boundary.
    pub fn end_archive(&mut self) -> Result<(), TarError> {
        self.reader.finish()
    }

    /// The entries so far, in archive order.
    pub fn files(&self) -> &[ManifestFile] {
        &self.files
    }

    /// Ends the last archive and hands over the entries.
    pub fn finish(mut self) -> Result<Vec<ManifestFile>, TarError> {
        self.end_archive()?;
        Ok(self.files)
    }

    /// Feeds bytes of the current archive; whole chunks are appended to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Chunk>) -> Result<(), TarError> {
        self.reader.feed(data);
        while let Some(event) = self.reader.next_event()? {
            match event {
                TarEvent::Entry(e) => self.entry(e.path, e.kind, e.mode, e.size, e.mtime),
                TarEvent::Data(d) => self.data(d, out),
                TarEvent::End => {}
            }
        }
        Ok(())
    }

    fn entry(&mut self, path: String, kind: EntryKind, mode: u32, size: u64, mtime: i64) {
        let (kind, target) = match kind {
            EntryKind::File => (FileType::File, None),
            EntryKind::Directory => (FileType::Directory, None),
            EntryKind::Symlink(t) => (FileType::Symlink, Some(t)),
        };
        let file = self.files.len() as u32;
        // PostgreSQL names some entries "./pg_wal/..."; the manifest keeps clean paths.
        let mut path = path;
        while let Some(rest) = path.strip_prefix("./") {
            path = rest.to_owned();
        }
        self.files.push(ManifestFile {
            path,
            tablespace: self.tablespace,
            kind,
            mode,
            size,
            mtime,
            target,
            chunks: Default::default(),
        });
        self.current = (kind == FileType::File && size > 0).then(|| Current {
            file,
            left: size,
            seq: 0,
            pending: BytesMut::new(),
        });
    }

    fn data(&mut self, mut d: Bytes, out: &mut Vec<Chunk>) {
        let size = self.chunk_size;
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        self.bytes += d.len() as u64;
        cur.left = cur.left.saturating_sub(d.len() as u64);
        let mut emit = |cur: &mut Current, data: Bytes| {
            out.push(Chunk {
                file: cur.file,
                seq: cur.seq,
                data,
            });
            cur.seq += 1;
        };
        if !cur.pending.is_empty() {
            let take = (size - cur.pending.len()).min(d.len());
            cur.pending.extend_from_slice(&d.split_to(take));
            if cur.pending.len() == size {
                let full = cur.pending.split().freeze();
                emit(cur, full);
            }
        }
        // Whole chunks straight from the input, without a copy.
        while d.len() >= size {
            let piece = d.split_to(size);
            emit(cur, piece);
        }
        cur.pending.extend_from_slice(&d);
        if cur.left == 0 {
            if !cur.pending.is_empty() {
                let last = cur.pending.split().freeze();
                emit(cur, last);
            }
            self.current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar archive of `(path, contents)` files.
    fn tar(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, data) in files {
            let mut h = [0u8; 512];
            h[..path.len()].copy_from_slice(path.as_bytes());
            h[100..107].copy_from_slice(b"0000600");
            h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
            h[136..147].copy_from_slice(b"00000000001");
            h[156] = b'0';
            h[257..262].copy_from_slice(b"ustar");
            h[148..156].fill(b' ');
            let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out
    }

    #[test]
    fn files_come_out_as_chunks_at_any_split() {
        let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let b = vec![7u8; 3];
        let archive = tar(&[
            ("a", a.clone()),
            ("empty", vec![]),
            ("./pg_wal/b", b.clone()),
        ]);
        for split in [1usize, 7, 512, 1000, 4096, archive.len()] {
            let mut c = Chunker::new(4096);
            c.start_archive(None).unwrap();
            let mut chunks = Vec::new();
            for piece in archive.chunks(split) {
                c.feed(piece, &mut chunks).unwrap();
            }
            let files = c.finish().unwrap();
            assert_eq!(files.len(), 3);
            assert_eq!(files[0].size, 10_000);
            assert_eq!(files[2].path, "pg_wal/b");
            let of = |f: u32| -> Vec<u8> {
                chunks
                    .iter()
                    .filter(|c| c.file == f)
                    .flat_map(|c| c.data.to_vec())
                    .collect()
            };
            assert_eq!(of(0), a, "split {split}");
            assert_eq!(of(2), b);
            let sizes: Vec<usize> = chunks.iter().map(|c| c.data.len()).collect();
            assert_eq!(sizes, [4096, 4096, 1808, 3], "split {split}");
            let seqs: Vec<u32> = chunks.iter().map(|c| c.seq).collect();
            assert_eq!(seqs, [0, 1, 2, 0]);
        }
    }

    #[test]
    fn a_cut_archive_is_an_error() {
        let archive = tar(&[("a", vec![1u8; 2000])]);
        let mut c = Chunker::new(4096);
        c.start_archive(Some(16384)).unwrap();
        c.feed(&archive[..1000], &mut Vec::new()).unwrap();
        assert_eq!(c.files()[0].tablespace, Some(16384));
        assert!(c.finish().is_err());
    }
}
