//! The envelope every stored object is wrapped in: a small header naming the format,
//! compression and encryption, the plaintext's length and blake3 hash, then the body.
//! Decoding always checks length and hash. Byte layout: docs/FORMAT.md, "Envelope".

use std::sync::Arc;

use bytes::{BufMut, Bytes};

use crate::crypto::{self, Keys, NONCE_LEN, TAG_LEN};

/// The first four bytes of every envelope.
pub const MAGIC: [u8; 4] = *b"PITR";
/// Envelope format version written by this build.
pub const VERSION: u8 = 1;
/// Bytes before the encryption parameters.
pub const FIXED_HEADER_LEN: usize = 50;
/// The longest header this build writes or reads (with an encrypted envelope's nonce): a
/// ranged read of this many bytes gets any object's whole header.
pub const HEADER_MAX: usize = FIXED_HEADER_LEN + NONCE_LEN;

/// How the body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is.
    None = 0,
    /// One zstd frame.
    Zstd = 1,
}

/// How the body is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// Plain.
    None = 0,
    /// AES-256-GCM under a per-object subkey: the parameter block is 24 random bytes (the
    /// first 12 pick the subkey, the last 12 are the GCM nonce), the body the ciphertext of
    /// the compressed plaintext followed by the 16-byte tag.
    Aes256GcmSubkey = 1,
}

impl Encryption {
    /// How it is named in messages and in the config.
    pub fn name(self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Aes256GcmSubkey => "aes-256-gcm-subkey",
        }
    }
}

/// How a repository's objects are protected: plaintext with blake3 ids, or encrypted with
/// keyed-blake3 ids. Every object of a repository is one or the other; a reader refuses the
/// other kind (no downgrade, no confusion).
#[derive(Debug, Clone, Default)]
pub enum Protection {
    /// Plaintext objects.
    #[default]
    Plain,
    /// Encrypted objects, with the repository's keys.
    Encrypted(Arc<Keys>),
}

impl Protection {
    /// The id of a plaintext: blake3, or keyed blake3 when encrypted.
    pub fn id(&self, plain: &[u8]) -> [u8; 32] {
        match self {
            Protection::Plain => blake3::hash(plain).into(),
            Protection::Encrypted(keys) => keys.id(plain),
        }
    }

    /// An incremental hasher giving [`Protection::id`].
    pub fn hasher(&self) -> blake3::Hasher {
        match self {
            Protection::Plain => blake3::Hasher::new(),
            Protection::Encrypted(keys) => keys.id_hasher(),
        }
    }

    /// The envelope encryption code this protection writes and expects.
    pub fn encryption(&self) -> Encryption {
        match self {
            Protection::Plain => Encryption::None,
            Protection::Encrypted(_) => Encryption::Aes256GcmSubkey,
        }
    }
}

/// The identity of a chunk inside a pack, bound into its envelope when encrypted: the chunk
/// id, not the pack it lies in, so a chunk can move between packs unchanged.
pub fn chunk_identity(id: &[u8; 32]) -> String {
    format!("chunk/{}", hex::encode(id))
}

/// What [`encode`] does with the plaintext.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    /// zstd level (1..=22; 0 means zstd's default, 3). None stores the body uncompressed.
    pub zstd_level: Option<i32>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            zstd_level: Some(3),
        }
    }
}

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Envelope format version.
    pub version: u8,
    /// Body compression.
    pub compression: Compression,
    /// Body encryption.
    pub encryption: Encryption,
    /// Length of the plaintext.
    pub plain_len: u64,
    /// blake3 of the plaintext (keyed blake3 when encrypted).
    pub hash: [u8; 32],
    /// Total header length (the body starts here).
    pub len: usize,
}

/// Why an envelope cannot be decoded. Every variant means the stored object is damaged
/// or not pitr's (or from a newer pitr); the caller names the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Too short to hold a header.
    #[error("truncated envelope ({0} bytes)")]
    Truncated(usize),
    /// Not an envelope at all.
    #[error("not a pitr object (bad magic)")]
    BadMagic,
    /// A format version this build does not know.
    #[error("envelope format version {0} is not supported by this pitr")]
    UnknownVersion(u8),
    /// A compression code this build does not know.
    #[error("unknown compression {0}")]
    UnknownCompression(u8),
    /// An encryption code this build does not know.
    #[error("unknown encryption {0}")]
    UnknownEncryption(u8),
    /// Reserved flags set.
    #[error("reserved flags {0:#04x} set")]
    ReservedFlags(u8),
    /// The body does not decompress.
    #[error("body does not decompress: {0}")]
    Decompress(String),
    /// The plaintext has another length than the header says.
    #[error("length mismatch: header says {expected} bytes, body holds {found}")]
    Length { expected: u64, found: u64 },
    /// The plaintext has another hash than the header says.
    #[error("checksum mismatch: header says blake3 {expected}, body hashes to {found}")]
    Hash { expected: String, found: String },
    /// The storage's own checksum of the stored bytes failed (S3's response checksum).
    #[error("the storage's checksum of its bytes does not match: {0}")]
    StoredChecksum(String),
    /// The header declares more plaintext than the reader expects of this object.
    #[error("header declares {declared} bytes of plaintext, more than the {max} expected")]
    TooLarge { declared: u64, max: u64 },
    /// An encrypted object in a plaintext repository, or the reverse.
    #[error("the object's encryption is {found}, but the repository's is {expected}")]
    Protection {
        found: &'static str,
        expected: &'static str,
    },
    /// The AEAD did not open: the bytes were altered, or the object was stored under
    /// another name, or sealed with another repository's key.
    #[error(
        "authentication failed (altered, stored under another name, or another repository's key)"
    )]
    Unauthentic,
    /// Encryption parameters of the wrong size.
    #[error("encryption parameters of {0} bytes (expected {NONCE_LEN})")]
    BadParameters(usize),
}

impl EnvelopeError {
    /// [`EnvelopeError::Hash`]: blake3 `expected`, `found` instead.
    pub fn hash_mismatch(expected: &[u8; 32], found: &[u8; 32]) -> EnvelopeError {
        EnvelopeError::Hash {
            expected: blake3::Hash::from_bytes(*expected).to_hex().to_string(),
            found: blake3::Hash::from_bytes(*found).to_hex().to_string(),
        }
    }
}

/// Wraps `plain` in a plaintext envelope.
pub fn encode(plain: &[u8], options: EncodeOptions) -> Bytes {
    Encoder::new(options).encode(plain, blake3::hash(plain).into())
}

/// Wraps `plain` in an envelope protected as `protection` says, for the object `identity`
/// (its key; [`chunk_identity`] for a chunk in a pack).
pub fn encode_as(
    plain: &[u8],
    options: EncodeOptions,
    protection: &Protection,
    identity: &str,
) -> Bytes {
    let id = protection.id(plain);
    Encoder::new(options).encode_as(plain, id, protection, identity)
}

/// Makes envelopes with one reusable compression context: for many small objects (backup
/// chunks) a fresh zstd context per object costs more than compressing it.
pub struct Encoder {
    options: EncodeOptions,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("options", &self.options)
            .finish()
    }
}

impl Encoder {
    /// An encoder for `options`.
    pub fn new(options: EncodeOptions) -> Encoder {
        let compressor = options
            .zstd_level
            .and_then(|level| zstd::bulk::Compressor::new(level).ok());
        Encoder {
            options,
            compressor,
        }
    }

    /// Wraps `plain`, whose blake3 the caller has already taken as `hash`, in a plaintext
    /// envelope.
    pub fn encode(&mut self, plain: &[u8], hash: [u8; 32]) -> Bytes {
        self.encode_as(plain, hash, &Protection::Plain, "")
    }

    /// Wraps `plain`, whose id under `protection` the caller has already taken as `hash`,
    /// for the object `identity` (bound into the ciphertext when encrypted).
    pub fn encode_as(
        &mut self,
        plain: &[u8],
        hash: [u8; 32],
        protection: &Protection,
        identity: &str,
    ) -> Bytes {
        let keys = match protection {
            Protection::Plain => None,
            Protection::Encrypted(keys) => Some(keys.as_ref()),
        };
        let params = if keys.is_some() { NONCE_LEN } else { 0 };
        let head = FIXED_HEADER_LEN + params;
        let tail = if keys.is_some() { TAG_LEN } else { 0 };
        // The body is compressed straight into place after the header: no second buffer,
        // no copy. The room past the header is not zeroed first (a 16 MiB memset, and its
        // page faults, when the allocator hands back heap memory) and pages past the
        // compressed size are never touched.
        let compressed = self.compressor.as_mut().and_then(|c| {
            let mut out = std::io::Cursor::new(Vec::with_capacity(
                head + zstd::zstd_safe::compress_bound(plain.len()) + tail,
            ));
            out.get_mut().resize(head, 0);
            out.set_position(head as u64);
            // Compressing into memory cannot fail for in-range levels; fall back to storing
            // the bytes plain rather than losing them if it ever does.
            c.compress_to_buffer(plain, &mut out).ok()?;
            Some(out.into_inner())
        });
        let (compression, mut out) = match compressed {
            Some(out) => (Compression::Zstd, out),
            None => {
                let mut out = Vec::with_capacity(head + plain.len() + tail);
                out.resize(head, 0);
                out.extend_from_slice(plain);
                (Compression::None, out)
            }
        };
        let mut header = &mut out[..FIXED_HEADER_LEN];
        header.put_slice(&MAGIC);
        header.put_u8(VERSION);
        header.put_u8(compression as u8);
        header.put_u8(protection.encryption() as u8);
        header.put_u8(0); // flags
        header.put_u64_le(plain.len() as u64);
        header.put_slice(&hash);
        header.put_u16_le(params as u16); // encryption parameters length
        if let Some(keys) = keys {
            let nonce: [u8; NONCE_LEN] = crypto::random();
            out[FIXED_HEADER_LEN..head].copy_from_slice(&nonce);
            let aad = associated_data(&out[..head], identity);
            let tag = keys.seal(&nonce, &aad, &mut out[head..]);
            out.extend_from_slice(&tag);
        }
        Bytes::from(out)
    }
}

/// Reads and checks the header.
pub fn header(bytes: &[u8]) -> Result<Header, EnvelopeError> {
    if bytes.len() < FIXED_HEADER_LEN {
        return Err(EnvelopeError::Truncated(bytes.len()));
    }
    if bytes[..4] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(EnvelopeError::UnknownVersion(bytes[4]));
    }
    let compression = match bytes[5] {
        0 => Compression::None,
        1 => Compression::Zstd,
        c => return Err(EnvelopeError::UnknownCompression(c)),
    };
    let encryption = match bytes[6] {
        0 => Encryption::None,
        1 => Encryption::Aes256GcmSubkey,
        e => return Err(EnvelopeError::UnknownEncryption(e)),
    };
    if bytes[7] != 0 {
        return Err(EnvelopeError::ReservedFlags(bytes[7]));
    }
    let plain_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or([0; 8]));
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&bytes[16..48]);
    let params = u16::from_le_bytes([bytes[48], bytes[49]]) as usize;
    if encryption == Encryption::Aes256GcmSubkey && params != NONCE_LEN {
        return Err(EnvelopeError::BadParameters(params));
    }
    let len = FIXED_HEADER_LEN + params;
    if bytes.len() < len {
        return Err(EnvelopeError::Truncated(bytes.len()));
    }
    Ok(Header {
        version: bytes[4],
        compression,
        encryption,
        plain_len,
        hash,
        len,
    })
}

/// Objects up to this size are decompressed in one pass into a buffer of their declared
/// size (backup chunks, WAL segments); larger ones are streamed.
const BULK_DECODE_MAX: u64 = 64 << 20;

/// Decompresses a frame by streaming: memory grows with what the frame really holds and
/// stops one byte past the declared length, so a lying header can neither make us allocate
/// its number nor hide extra output. (A one-shot buffer bounded by a ratio would refuse
/// legitimate objects: a zero-filled WAL tail compresses far beyond 1000:1.)
fn stream_decode(body: &[u8], plain_len: u64) -> Result<Bytes, EnvelopeError> {
    use std::io::Read;
    let mut out = Vec::with_capacity(plain_len.min(body.len() as u64 * 4 + 4096) as usize);
    let decoder = zstd::stream::read::Decoder::with_buffer(body)
        .map_err(|e| EnvelopeError::Decompress(e.to_string()))?;
    decoder
        .take(plain_len.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| EnvelopeError::Decompress(e.to_string()))?;
    Ok(Bytes::from(out))
}

thread_local! {
    /// Each thread's decompression context, made on its first frame: a restore decodes
    /// tens of thousands of 64 KiB chunks, and a fresh context for each cost more than a
    /// tenth of the decompression itself.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses `body` into `out`'s spare room with this thread's context.
fn bulk_decompress(body: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress_to_buffer(body, out)
    })
}

/// What an encrypted envelope's AEAD binds besides its body: the whole header (fixed part
/// and nonce), then the object's identity.
fn associated_data(header: &[u8], identity: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + identity.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(identity.as_bytes());
    aad
}

/// Unwraps a plaintext envelope, checking the plaintext's length and hash.
pub fn decode(bytes: &[u8]) -> Result<(Header, Bytes), EnvelopeError> {
    decode_at_most(bytes, u64::MAX)
}

/// [`decode`] for an object of at most `max` bytes of plaintext (a WAL segment, a chunk of
/// known length, a manifest below its cap): a header declaring more is refused before
/// anything is decompressed or allocated.
pub fn decode_at_most(bytes: &[u8], max: u64) -> Result<(Header, Bytes), EnvelopeError> {
    decode_as(bytes, max, &Protection::Plain, "")
}

/// [`decode_at_most`] of an object protected as `protection` says, stored as `identity`:
/// an envelope of the other protection is refused, and an encrypted one must open with the
/// repository's key for that identity.
pub fn decode_as(
    bytes: &[u8],
    max: u64,
    protection: &Protection,
    identity: &str,
) -> Result<(Header, Bytes), EnvelopeError> {
    let h = header(bytes)?;
    if h.encryption != protection.encryption() {
        return Err(EnvelopeError::Protection {
            found: h.encryption.name(),
            expected: protection.encryption().name(),
        });
    }
    if h.plain_len > max {
        return Err(EnvelopeError::TooLarge {
            declared: h.plain_len,
            max,
        });
    }
    // Encrypted: the body is opened in a buffer of its own, which an uncompressed object
    // then keeps as its plaintext (no second copy).
    let opened: Option<Vec<u8>> = match protection {
        Protection::Plain => None,
        Protection::Encrypted(keys) => {
            let sealed = &bytes[h.len..];
            if sealed.len() < TAG_LEN {
                return Err(EnvelopeError::Truncated(bytes.len()));
            }
            let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&bytes[FIXED_HEADER_LEN..h.len]);
            let mut tag_bytes = [0u8; TAG_LEN];
            tag_bytes.copy_from_slice(tag);
            let mut buf = ciphertext.to_vec();
            keys.open(
                &nonce,
                &associated_data(&bytes[..h.len], identity),
                &mut buf,
                &tag_bytes,
            )
            .map_err(|_| EnvelopeError::Unauthentic)?;
            Some(buf)
        }
    };
    let body = opened.as_deref().unwrap_or(&bytes[h.len..]);
    let plain = match h.compression {
        Compression::None => match opened {
            Some(buf) => Bytes::from(buf),
            None => Bytes::copy_from_slice(body),
        },
        // The declared size is trusted for the buffer only when the reader bounded it.
        Compression::Zstd if h.plain_len <= BULK_DECODE_MAX.min(max) => {
            // One pass into a buffer of the declared size (bounded, so a lying header
            // cannot make it large); a frame that does not fit is read again below to say
            // exactly what it holds.
            let mut out = Vec::with_capacity(h.plain_len as usize);
            match bulk_decompress(body, &mut out) {
                Ok(_) => Bytes::from(out),
                Err(_) => stream_decode(body, h.plain_len)?,
            }
        }
        Compression::Zstd => stream_decode(body, h.plain_len)?,
    };
    if plain.len() as u64 != h.plain_len {
        return Err(EnvelopeError::Length {
            expected: h.plain_len,
            found: plain.len() as u64,
        });
    }
    let found = protection.id(&plain);
    if found != h.hash {
        return Err(EnvelopeError::hash_mismatch(&h.hash, &found));
    }
    Ok((h, plain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_and_compresses() {
        let plain = b"hello ".repeat(1000);
        let env = encode(&plain, EncodeOptions::default());
        assert!(env.len() < plain.len() / 10);
        let (h, back) = decode(&env).unwrap();
        assert_eq!(&back[..], &plain[..]);
        assert_eq!(h.compression, Compression::Zstd);
        assert_eq!(h.plain_len, 6000);
        let raw = encode(&plain, EncodeOptions { zstd_level: None });
        assert_eq!(raw.len(), FIXED_HEADER_LEN + plain.len());
        assert_eq!(&decode(&raw).unwrap().1[..], &plain[..]);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let plain: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let env = encode(&plain, EncodeOptions::default());
        for i in 0..env.len() {
            let mut bad = env.to_vec();
            bad[i] ^= 0x01;
            assert!(decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn empty_and_garbage() {
        let env = encode(b"", EncodeOptions::default());
        assert_eq!(decode(&env).unwrap().1.len(), 0);
        assert_eq!(decode(b"PIT").unwrap_err(), EnvelopeError::Truncated(3));
        assert_eq!(decode(&[0u8; 60]).unwrap_err(), EnvelopeError::BadMagic);
        let mut newer = env.to_vec();
        newer[4] = 9;
        assert_eq!(
            decode(&newer).unwrap_err(),
            EnvelopeError::UnknownVersion(9)
        );
    }

    #[test]
    fn zero_filled_segment_round_trips() {
        // Regression: a switched segment is mostly zeros and compresses over 1000:1; a
        // decompression buffer bounded by a ratio refused to read it back.
        for len in [1usize << 20, 16 << 20] {
            let mut plain = vec![0u8; len];
            plain[..100].copy_from_slice(&[7u8; 100]);
            let env = encode(&plain, EncodeOptions::default());
            assert!(
                env.len() * 1000 < len,
                "{} bytes compressed to {}",
                len,
                env.len()
            );
            assert_eq!(&decode(&env).unwrap().1[..], &plain[..]);
        }
    }

    #[test]
    fn a_lying_length_does_not_allocate_it() {
        let mut env = encode(b"small", EncodeOptions::default()).to_vec();
        env[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            decode(&env),
            Err(EnvelopeError::Length { .. } | EnvelopeError::Decompress(_))
        ));
        // And a header that claims less than the frame holds is caught too.
        let mut short = encode(&[1u8; 5000], EncodeOptions::default()).to_vec();
        short[8..16].copy_from_slice(&10u64.to_le_bytes());
        assert!(matches!(
            decode(&short),
            Err(EnvelopeError::Length {
                expected: 10,
                found: 11
            })
        ));
    }

    fn encrypted() -> Protection {
        Protection::Encrypted(Arc::new(Keys::new(&crypto::DataKey::generate())))
    }

    #[test]
    fn encrypted_round_trip_and_binding() {
        let p = encrypted();
        let plain = b"the marker string 0123456789".repeat(100);
        for level in [Some(1), None] {
            let env = encode_as(&plain, EncodeOptions { zstd_level: level }, &p, "wal/a");
            assert!(!env.windows(17).any(|w| w == b"the marker string"));
            let (h, back) = decode_as(&env, u64::MAX, &p, "wal/a").unwrap();
            assert_eq!(&back[..], &plain[..]);
            assert_eq!(h.encryption, Encryption::Aes256GcmSubkey);
            assert_eq!(h.hash, p.id(&plain));
            assert_ne!(h.hash, *blake3::hash(&plain).as_bytes());
            // Another name, another key, plaintext expected: each refused.
            assert_eq!(
                decode_as(&env, u64::MAX, &p, "wal/b").unwrap_err(),
                EnvelopeError::Unauthentic
            );
            assert_eq!(
                decode_as(&env, u64::MAX, &encrypted(), "wal/a").unwrap_err(),
                EnvelopeError::Unauthentic
            );
            assert!(matches!(
                decode(&env).unwrap_err(),
                EnvelopeError::Protection { .. }
            ));
        }
        let plain_env = encode(b"abc", EncodeOptions::default());
        assert!(matches!(
            decode_as(&plain_env, u64::MAX, &p, "wal/a").unwrap_err(),
            EnvelopeError::Protection { .. }
        ));
    }

    #[test]
    fn every_flipped_byte_of_an_encrypted_envelope_is_detected() {
        let p = encrypted();
        let plain: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let env = encode_as(&plain, EncodeOptions::default(), &p, "k");
        for i in 0..env.len() {
            let mut bad = env.to_vec();
            bad[i] ^= 0x01;
            assert!(
                decode_as(&bad, u64::MAX, &p, "k").is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..20_000), level in proptest::option::of(1i32..6)) {
            let env = encode(&data, EncodeOptions { zstd_level: level });
            prop_assert_eq!(&decode(&env).unwrap().1[..], &data[..]);
        }
    }
}
