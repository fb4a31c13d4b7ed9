//! Pack objects: many small envelopes (backup chunks) stored as one object, so a backup
//! of small deduplicated chunks is a few large uploads rather than one request per chunk.
//! A pack ends with an index of what it holds, so it can be checked (and the repository's
//! chunk index rebuilt) without any manifest. Byte layout: docs/FORMAT.md, "Packs".

use bytes::{BufMut, Bytes, BytesMut};

use crate::envelope::{self, chunk_identity, EncodeOptions, EnvelopeError, Protection};

/// The last four bytes of every pack.
pub const PACK_MAGIC: [u8; 4] = *b"PKIX";
/// Bytes of the footer: index envelope length (u32 LE), then the magic.
pub const FOOTER_LEN: usize = 8;
/// Bytes per index entry: blake3 (32), offset (u64), stored length (u32), plain length (u32).
pub const INDEX_ENTRY_LEN: usize = 48;

/// Where one chunk's envelope lies in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// blake3 of the chunk's plaintext.
    pub hash: [u8; 32],
    /// Offset of its envelope in the pack.
    pub offset: u64,
    /// Length of its envelope.
    pub stored_len: u32,
    /// Length of its plaintext.
    pub plain_len: u32,
}

/// The key of the pack whose id is `id` (64 hex digits; manifests are checked for that with
/// [`is_pack_id`] before their ids are used).
pub fn pack_key(id: &str) -> String {
    format!("pack/{}/{id}", id.get(..2).unwrap_or(id))
}

/// Whether `id` has a pack id's shape: 64 lower-case hex digits.
pub fn is_pack_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A pack being filled.
#[derive(Debug, Default)]
pub struct PackBuilder {
    body: BytesMut,
    entries: Vec<PackEntry>,
}

/// A finished pack: its id (blake3 of its index), its bytes, and what it holds.
#[derive(Debug, Clone)]
pub struct Pack {
    /// 64 hex digits.
    pub id: String,
    /// The whole object.
    pub bytes: Bytes,
    /// Its chunks, in order.
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// An empty pack written into `body` (cleared; its memory reused: a writer that
    /// recycles the buffers of packs it has uploaded allocates no large blocks after the
    /// first few, which keeps the allocator from fragmenting).
    pub fn with_body(mut body: BytesMut) -> PackBuilder {
        body.clear();
        PackBuilder {
            body,
            entries: Vec::new(),
        }
    }

    /// Bytes of chunk envelopes so far.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// No chunk yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a chunk's envelope (made by the envelope encoder for plaintext with `hash`)
    /// and returns where it lies.
    pub fn push(&mut self, hash: [u8; 32], plain_len: u32, envelope: &[u8]) -> PackEntry {
        let entry = PackEntry {
            hash,
            offset: self.body.len() as u64,
            stored_len: envelope.len() as u32,
            plain_len,
        };
        self.body.extend_from_slice(envelope);
        self.entries.push(entry);
        entry
    }

    /// Closes the pack: appends the index envelope and the footer. The pack id is the
    /// index's id under `protection` (keyed when encrypted), the index is sealed for the
    /// pack's key.
    pub fn finish(mut self, options: EncodeOptions, protection: &Protection) -> Pack {
        let mut index = Vec::with_capacity(self.entries.len() * INDEX_ENTRY_LEN);
        for e in &self.entries {
            index.put_slice(&e.hash);
            index.put_u64_le(e.offset);
            index.put_u32_le(e.stored_len);
            index.put_u32_le(e.plain_len);
        }
        let id = hex::encode(protection.id(&index));
        let index_env = envelope::encode_as(&index, options, protection, &pack_key(&id));
        self.body.extend_from_slice(&index_env);
        self.body.put_u32_le(index_env.len() as u32);
        self.body.put_slice(&PACK_MAGIC);
        Pack {
            id,
            bytes: self.body.freeze(),
            entries: self.entries,
        }
    }
}

/// Why a pack's index cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// No footer.
    #[error("not a pack (no footer)")]
    NoFooter,
    /// The index envelope is damaged.
    #[error("pack index: {0}")]
    Index(#[from] EnvelopeError),
    /// The index does not describe the pack.
    #[error("pack index is inconsistent: {0}")]
    Inconsistent(String),
}

/// Reads the index of the whole pack stored as `key`, checking every entry lies inside it.
pub fn read_index(
    pack: &[u8],
    key: &str,
    protection: &Protection,
) -> Result<Vec<PackEntry>, PackError> {
    if pack.len() < FOOTER_LEN || pack[pack.len() - 4..] != PACK_MAGIC {
        return Err(PackError::NoFooter);
    }
    let n = pack.len();
    let index_len = u32::from_le_bytes(pack[n - 8..n - 4].try_into().unwrap_or([0; 4])) as usize;
    let Some(index_start) = (n - FOOTER_LEN).checked_sub(index_len) else {
        return Err(PackError::Inconsistent("index longer than the pack".into()));
    };
    // Every entry stands for an envelope of at least a header in the pack: an index that
    // declares more entries than fit is refused before it is decompressed.
    let max_index = (index_start / envelope::FIXED_HEADER_LEN + 1) * INDEX_ENTRY_LEN;
    let (_, index) = envelope::decode_as(
        &pack[index_start..n - FOOTER_LEN],
        max_index as u64,
        protection,
        key,
    )?;
    if index.len() % INDEX_ENTRY_LEN != 0 {
        return Err(PackError::Inconsistent(format!(
            "index of {} bytes",
            index.len()
        )));
    }
    let mut out = Vec::with_capacity(index.len() / INDEX_ENTRY_LEN);
    for e in index.chunks_exact(INDEX_ENTRY_LEN) {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&e[..32]);
        let entry = PackEntry {
            hash,
            offset: u64::from_le_bytes(e[32..40].try_into().unwrap_or([0; 8])),
            stored_len: u32::from_le_bytes(e[40..44].try_into().unwrap_or([0; 4])),
            plain_len: u32::from_le_bytes(e[44..48].try_into().unwrap_or([0; 4])),
        };
        if entry
            .offset
            .checked_add(u64::from(entry.stored_len))
            .is_none_or(|end| end > index_start as u64)
        {
            return Err(PackError::Inconsistent(format!(
                "chunk at {} runs past the data",
                entry.offset
            )));
        }
        out.push(entry);
    }
    Ok(out)
}

/// Unwraps one chunk's envelope (CPU work: call it off the async runtime) and checks that
/// it is the chunk with `hash`, not only an intact envelope.
pub fn decode_chunk(
    envelope: &[u8],
    hash: &[u8; 32],
    protection: &Protection,
) -> Result<Bytes, EnvelopeError> {
    decode_chunk_of(envelope, hash, u64::MAX, protection)
}

/// [`decode_chunk`] of a chunk whose table entry says it holds exactly `plain_len` bytes: a
/// header declaring more is refused before anything is decompressed, one declaring another
/// length after.
pub fn decode_chunk_of(
    envelope: &[u8],
    hash: &[u8; 32],
    plain_len: u64,
    protection: &Protection,
) -> Result<Bytes, EnvelopeError> {
    let (header, plain) =
        envelope::decode_as(envelope, plain_len, protection, &chunk_identity(hash))?;
    if plain_len != u64::MAX && header.plain_len != plain_len {
        return Err(EnvelopeError::Length {
            expected: plain_len,
            found: header.plain_len,
        });
    }
    if &header.hash != hash {
        return Err(EnvelopeError::hash_mismatch(hash, &header.hash));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{DataKey, Keys};
    use std::sync::Arc;

    fn protections() -> [Protection; 2] {
        [
            Protection::Plain,
            Protection::Encrypted(Arc::new(Keys::new(&DataKey::generate()))),
        ]
    }

    #[test]
    fn chunks_come_back_from_their_ranges_and_the_index() {
        for p in protections() {
            let mut b = PackBuilder::new();
            let mut enc = envelope::Encoder::new(EncodeOptions::default());
            let plains: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 * i as usize]).collect();
            let mut entries = Vec::new();
            let mut envelopes = Vec::new();
            for plain in &plains {
                let hash = p.id(plain);
                let env = enc.encode_as(plain, hash, &p, &chunk_identity(&hash));
                entries.push(b.push(hash, plain.len() as u32, &env));
                envelopes.push(env);
            }
            let pack = b.finish(EncodeOptions::default(), &p);
            let key = pack_key(&pack.id);
            assert_eq!(pack.entries, entries);
            assert_eq!(read_index(&pack.bytes, &key, &p).unwrap(), entries);
            for (e, plain) in entries.iter().zip(&plains) {
                let range = e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize;
                let back = decode_chunk_of(&pack.bytes[range], &e.hash, u64::from(e.plain_len), &p)
                    .unwrap();
                assert_eq!(&back[..], &plain[..]);
            }
            // The id names the contents; a chunk's envelope moves between packs unchanged.
            let again = {
                let mut b = PackBuilder::new();
                for (e, env) in entries.iter().zip(&envelopes).rev() {
                    b.push(e.hash, e.plain_len, env);
                }
                b.finish(EncodeOptions::default(), &p)
            };
            assert_ne!(again.id, pack.id);
            let moved = again.entries[0];
            let range =
                moved.offset as usize..(moved.offset + u64::from(moved.stored_len)) as usize;
            assert_eq!(
                &decode_chunk(&again.bytes[range], &moved.hash, &p).unwrap()[..],
                &plains[4][..]
            );
            assert_eq!(
                pack_key(&pack.id),
                format!("pack/{}/{}", &pack.id[..2], pack.id)
            );
            // A pack under another pack's name: its index does not open when encrypted.
            if let Protection::Encrypted(_) = p {
                assert!(read_index(&pack.bytes, &pack_key(&again.id), &p).is_err());
                // One chunk in another's place: its id is not the one asked for.
                let e = entries[1];
                let range = e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize;
                assert!(decode_chunk(&pack.bytes[range], &entries[2].hash, &p).is_err());
            }
        }
    }

    #[test]
    fn damage_is_refused() {
        for p in protections() {
            let mut b = PackBuilder::new();
            let hash = p.id(b"abc");
            b.push(
                hash,
                3,
                &envelope::encode_as(b"abc", EncodeOptions::default(), &p, &chunk_identity(&hash)),
            );
            let pack = b.finish(EncodeOptions::default(), &p);
            let key = pack_key(&pack.id);
            assert_eq!(read_index(b"short", &key, &p), Err(PackError::NoFooter));
            let mut bad = pack.bytes.to_vec();
            let n = bad.len();
            bad[n - 10] ^= 1; // inside the index envelope
            assert!(matches!(
                read_index(&bad, &key, &p),
                Err(PackError::Index(_))
            ));
            let mut long = pack.bytes.to_vec();
            long[n - 8..n - 4].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(matches!(
                read_index(&long, &key, &p),
                Err(PackError::Inconsistent(_))
            ));
        }
    }
}
