//! The repository's keys and the primitives every encrypted object uses: AES-256-GCM under a
//! key of its own for every object, picked by 192 random bits (a subkey from 96 of them, the
//! GCM nonce from the other 96: a repeat needs about 2^96 objects, far past any repository's
//! life), keyed blake3 for content ids, and key derivation with blake3's `derive_key`. Byte
//! layout: docs/FORMAT.md, "Encryption".

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

/// Bytes of a data key, a key-encryption key and every derived key.
pub const KEY_LEN: usize = 32;
/// Random bytes that seal one message: the first 12 pick its subkey, the last 12 are its GCM
/// nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes of a GCM tag.
pub const TAG_LEN: usize = 16;

/// blake3 `derive_key` contexts (docs/FORMAT.md lists them).
const CONTEXT_OBJECTS: &str = "pitr 2026-12-05 object encryption key";
const CONTEXT_IDS: &str = "pitr 2026-12-05 content id key";
const CONTEXT_SLOT_SETS: &str = "pitr 2026-12-05 key slot set authentication key";
const CONTEXT_WRAP: &str = "pitr 2026-12-05 key slot wrapping key";
const CONTEXT_FINGERPRINT: &str = "pitr 2026-12-05 key fingerprint";

/// The AEAD failed to open: wrong key, or the bytes or what they were bound to changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct Unauthentic;

/// `n` random bytes from the operating system.
pub fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The OS random source does not fail on Linux once booted; a failure here means no
    // key can be made safely, so it is not papered over.
    getrandom::fill(&mut out).expect("the operating system's random source failed");
    out
}

/// A repository's data key: 32 random bytes made by `pitr init --encrypt`, stored only
/// wrapped in key slots. Zeroed when dropped.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A new random data key.
    pub fn generate() -> DataKey {
        DataKey(Zeroizing::new(random()))
    }

    /// A data key from its bytes (unwrapped from a slot).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> DataKey {
        DataKey(Zeroizing::new(bytes))
    }

    /// Its bytes, to be wrapped.
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// The keys derived from a data key, held by every command that opened an encrypted
/// repository.
pub struct Keys {
    objects: Zeroizing<[u8; KEY_LEN]>,
    ids: Zeroizing<[u8; KEY_LEN]>,
    slot_sets: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// Derives the object, id and slot-set keys from `data`.
    pub fn new(data: &DataKey) -> Keys {
        Keys {
            objects: Zeroizing::new(blake3::derive_key(CONTEXT_OBJECTS, data.bytes())),
            ids: Zeroizing::new(blake3::derive_key(CONTEXT_IDS, data.bytes())),
            slot_sets: Zeroizing::new(blake3::derive_key(CONTEXT_SLOT_SETS, data.bytes())),
        }
    }

    /// The keyed content id of `plain` (what an encrypted envelope's hash field holds).
    pub fn id(&self, plain: &[u8]) -> [u8; 32] {
        blake3::keyed_hash(&self.ids, plain).into()
    }

    /// An incremental hasher for [`Keys::id`].
    pub fn id_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.ids)
    }

    /// The authenticator of a key slot set's text.
    pub fn slot_set_mac(&self, text: &[u8]) -> [u8; 32] {
        blake3::keyed_hash(&self.slot_sets, text).into()
    }

    /// Encrypts `buf` in place with `nonce`, binding `aad`; returns the tag.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        seal_with(&self.objects, nonce, aad, buf)
    }

    /// Decrypts `buf` in place, checking `tag` over it and `aad`.
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Unauthentic> {
        open_with(&self.objects, nonce, aad, buf, tag)
    }
}

/// The AES-256-GCM key and nonce of one message under `key`: the subkey is
/// `blake3::keyed_hash(key, nonce[..12])`, the GCM nonce `nonce[12..]`.
fn message_key(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
    let sub = Zeroizing::new(<[u8; KEY_LEN]>::from(blake3::keyed_hash(key, &nonce[..12])));
    let cipher = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &sub[..]).expect("AES-256 takes a 32-byte key"),
    );
    let mut gcm = [0u8; 12];
    gcm.copy_from_slice(&nonce[12..]);
    (cipher, Nonce::assume_unique_for_key(gcm))
}

fn seal_with(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> [u8; TAG_LEN] {
    let (cipher, gcm) = message_key(key, nonce);
    // Only messages past 64 GiB can fail; objects are far smaller.
    let tag = cipher
        .seal_in_place_separate_tag(gcm, Aad::from(aad), buf)
        .expect("an object within AES-GCM's length limit");
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

fn open_with(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), Unauthentic> {
    let (cipher, gcm) = message_key(key, nonce);
    cipher
        .open_in_place_separate_tag(gcm, Aad::from(aad), Tag::from(*tag), buf, 0..)
        .map(|_| ())
        .map_err(|_| Unauthentic)
}

/// A key-encryption key: what a key file, a key command or a stretched passphrase gives,
/// used only to wrap and unwrap the data key in one slot.
pub struct WrappingKey(Zeroizing<[u8; KEY_LEN]>);

impl WrappingKey {
    /// From key material of at least 32 bytes (a key file, a command's output).
    pub fn from_material(material: &[u8]) -> WrappingKey {
        WrappingKey(Zeroizing::new(blake3::derive_key(CONTEXT_WRAP, material)))
    }

    /// From a passphrase stretched with Argon2id (`params`, `salt`).
    pub fn from_passphrase(
        passphrase: &[u8],
        salt: &[u8],
        params: &Argon2Params,
    ) -> Result<WrappingKey, String> {
        let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN))
            .map_err(|e| format!("invalid Argon2id parameters: {e}"))?;
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        a.hash_password_into(passphrase, salt, &mut out[..])
            .map_err(|e| format!("Argon2id failed: {e}"))?;
        Ok(WrappingKey(out))
    }

    /// Short hex that names this key (not secret: it cannot be turned back into the key).
    pub fn fingerprint(&self) -> String {
        hex::encode(&blake3::derive_key(CONTEXT_FINGERPRINT, &self.0[..])[..8])
    }

    /// The data key sealed for slot `slot_id`: nonce, ciphertext, tag (72 bytes).
    pub fn wrap(&self, data: &DataKey, slot_id: &str) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = random();
        let mut buf = Zeroizing::new(*data.bytes());
        let tag = seal_with(&self.0, &nonce, &wrap_aad(slot_id), &mut buf[..]);
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf[..]);
        out.extend_from_slice(&tag);
        out
    }

    /// The data key from a slot's wrapped bytes, if this key sealed them for `slot_id`.
    pub fn unwrap(&self, wrapped: &[u8], slot_id: &str) -> Result<DataKey, Unauthentic> {
        if wrapped.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
            return Err(Unauthentic);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&wrapped[..NONCE_LEN]);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&wrapped[NONCE_LEN..NONCE_LEN + KEY_LEN]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&wrapped[NONCE_LEN + KEY_LEN..]);
        open_with(&self.0, &nonce, &wrap_aad(slot_id), &mut key[..], &tag)?;
        Ok(DataKey(key))
    }
}

/// Associated data of a wrapped data key: the slot's id, so a wrapped key moved to another
/// slot does not open.
fn wrap_aad(slot_id: &str) -> Vec<u8> {
    format!("pitr key slot {slot_id}").into_bytes()
}

/// Argon2id cost parameters of a passphrase slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Argon2Params {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Argon2Params {
    /// What new passphrase slots use: 64 MiB, 3 passes, 1 lane (RFC 9106's second
    /// recommended option, with one lane: the cost is paid once per process that opens the
    /// repository, see README).
    pub const DEFAULT: Argon2Params = Argon2Params {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };

    /// Parameters a reader accepts from a slot: enough to mean something, and bounded (at
    /// most 1 GiB, 16 passes, 4 lanes), so a planted slot cannot make archive_command on a
    /// database host allocate gigabytes or run for minutes.
    pub fn check(&self) -> Result<(), String> {
        let ok = (8 * 1024..=1024 * 1024).contains(&self.m_kib)
            && (1..=16).contains(&self.t)
            && (1..=4).contains(&self.p);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "Argon2id parameters m={} KiB t={} p={} are outside what pitr accepts",
                self.m_kib, self.t, self.p
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open() {
        let keys = Keys::new(&DataKey::generate());
        let nonce = random();
        let mut buf = b"attack at dawn".to_vec();
        let tag = keys.seal(&nonce, b"wal/x", &mut buf);
        assert_ne!(&buf[..], b"attack at dawn");
        let mut back = buf.clone();
        keys.open(&nonce, b"wal/x", &mut back, &tag).unwrap();
        assert_eq!(&back[..], b"attack at dawn");
        let mut moved = buf.clone();
        assert_eq!(
            keys.open(&nonce, b"wal/y", &mut moved, &tag),
            Err(Unauthentic)
        );
        let other = Keys::new(&DataKey::generate());
        let mut wrong = buf.clone();
        assert_eq!(
            other.open(&nonce, b"wal/x", &mut wrong, &tag),
            Err(Unauthentic)
        );
    }

    #[test]
    fn ids_are_keyed() {
        let a = Keys::new(&DataKey::generate());
        let b = Keys::new(&DataKey::generate());
        assert_eq!(a.id(b"x"), a.id(b"x"));
        assert_ne!(a.id(b"x"), b.id(b"x"));
        assert_ne!(a.id(b"x"), *blake3::hash(b"x").as_bytes());
        let mut h = a.id_hasher();
        h.update(b"x");
        assert_eq!(<[u8; 32]>::from(h.finalize()), a.id(b"x"));
    }

    #[test]
    fn wrapping() {
        let data = DataKey::generate();
        let kek = WrappingKey::from_material(&[7u8; 32]);
        let wrapped = kek.wrap(&data, "s1");
        assert_eq!(wrapped.len(), 72);
        assert_eq!(kek.unwrap(&wrapped, "s1").unwrap().bytes(), data.bytes());
        assert!(kek.unwrap(&wrapped, "s2").is_err());
        assert!(WrappingKey::from_material(&[8u8; 32])
            .unwrap(&wrapped, "s1")
            .is_err());
        assert_eq!(
            kek.fingerprint(),
            WrappingKey::from_material(&[7u8; 32]).fingerprint()
        );
        assert_eq!(kek.fingerprint().len(), 16);
    }

    #[test]
    fn passphrase_stretching() {
        let small = Argon2Params {
            m_kib: 8 * 1024,
            t: 1,
            p: 1,
        };
        let a =
            WrappingKey::from_passphrase(b"correct horse", b"saltsaltsaltsalt", &small).unwrap();
        let b =
            WrappingKey::from_passphrase(b"correct horse", b"saltsaltsaltsalt", &small).unwrap();
        let c =
            WrappingKey::from_passphrase(b"correct horse", b"othersaltothersa", &small).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert!(Argon2Params {
            m_kib: 1 << 30,
            t: 1,
            p: 1
        }
        .check()
        .is_err());
        Argon2Params::DEFAULT.check().unwrap();
    }
}
