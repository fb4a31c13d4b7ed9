//! Key slots: an encrypted repository's data key, wrapped once per key source (a key file, a
//! key command, a passphrase, an AWS KMS key), so that any one source opens the repository
//! and losing one store of keys never loses the backups.
//!
//! Slots live in numbered **slot sets**, `keys/<generation>`, each a whole list of slots,
//! authenticated with a key derived from the data key. A change (`pitr key add`, `pitr key
//! remove`) writes the next generation with put-if-absent and then deletes the older ones;
//! the newest authentic set is the one in force. A killed change leaves the old set or both
//! (the newer in force); two changes at once cannot both write one generation, and the one
//! that loses reads the new set and tries again, so no change ever leaves zero slots.
//! Byte layout: docs/FORMAT.md, "Key slots".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{self, Argon2Params, DataKey, Keys, WrappingKey, KEY_LEN};
use crate::envelope::{self, EncodeOptions};
use crate::objects::ObjectError;
use crate::storage::{self, PutMode, PutOutcome, Storage, StorageError};

/// Prefix of the slot-set objects.
pub const SLOTS_PREFIX: &str = "keys/";
/// Largest slot-set object read (a set holds a few slots of a few hundred bytes).
const SET_MAX: u64 = 1 << 20;
/// Largest key file or key command output read.
const MATERIAL_MAX: usize = 64 << 10;
/// Least key material accepted from a file or a command.
pub const MATERIAL_MIN: usize = KEY_LEN;
/// Most slots in one set.
const SLOTS_MAX: usize = 64;
/// How long a key command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The key of slot set `generation`.
pub fn set_key(generation: u64) -> String {
    format!("{SLOTS_PREFIX}{generation:010}")
}

fn generation_of(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(SLOTS_PREFIX)?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Where a command finds the key that opens a repository: `PITR_KEY_FILE` /
/// `--key-file`, `PITR_KEY_COMMAND` / `--key-command`, `PITR_PASSPHRASE`, or nothing (a
/// plaintext repository, or one with an AWS KMS slot, which needs no setting).
#[derive(Clone, Default)]
pub enum KeySetting {
    /// No key setting.
    #[default]
    None,
    /// A file of at least 32 bytes, used as they are.
    File(PathBuf),
    /// A shell command that prints the key material.
    Command(String),
    /// A passphrase (from the environment).
    Passphrase(Zeroizing<String>),
    /// Only KMS slots of this KMS key id or ARN (with nothing set, any KMS slot is tried;
    /// naming the key pins it, and makes a plaintext repository an error like any key).
    Kms(String),
}

impl std::fmt::Debug for KeySetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl KeySetting {
    /// Whether a key was given.
    pub fn is_given(&self) -> bool {
        !matches!(self, KeySetting::None)
    }

    /// How the key is named in messages (never the key).
    pub fn describe(&self) -> String {
        match self {
            KeySetting::None => "no key setting".into(),
            KeySetting::File(p) => format!("key file \"{}\"", p.display()),
            // Not the command's text: it may carry a token, and messages reach server logs.
            KeySetting::Command(_) => "key command (PITR_KEY_COMMAND, --key-command)".into(),
            KeySetting::Passphrase(_) => "the passphrase in PITR_PASSPHRASE".into(),
            KeySetting::Kms(k) => format!("KMS key \"{k}\""),
        }
    }

    fn kind(&self) -> Option<SlotKind> {
        match self {
            KeySetting::None => None,
            KeySetting::File(_) => Some(SlotKind::File),
            KeySetting::Command(_) => Some(SlotKind::Command),
            KeySetting::Passphrase(_) => Some(SlotKind::Passphrase),
            KeySetting::Kms(_) => Some(SlotKind::Kms),
        }
    }
}

/// A key source for a new slot (`pitr init --encrypt`, `pitr key add`).
#[derive(Clone)]
pub enum NewSlot {
    /// A key file.
    File(PathBuf),
    /// A key command.
    Command(String),
    /// A passphrase.
    Passphrase(Zeroizing<String>),
    /// An AWS KMS key id or ARN.
    Kms(String),
}

impl std::fmt::Debug for NewSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NewSlot::File(p) => write!(f, "key file \"{}\"", p.display()),
            NewSlot::Command(_) => f.write_str("key command"),
            NewSlot::Passphrase(_) => f.write_str("passphrase"),
            NewSlot::Kms(k) => write!(f, "KMS key \"{k}\""),
        }
    }
}

/// What kind of source a slot was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    /// A key file.
    File,
    /// A key command.
    Command,
    /// A passphrase stretched with Argon2id.
    Passphrase,
    /// AWS KMS.
    Kms,
}

impl SlotKind {
    /// Its name in listings.
    pub fn name(self) -> &'static str {
        match self {
            SlotKind::File => "file",
            SlotKind::Command => "command",
            SlotKind::Passphrase => "passphrase",
            SlotKind::Kms => "kms",
        }
    }
}

/// Argon2id parameters and salt of a passphrase slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kdf {
    /// `argon2id`.
    pub algorithm: String,
    /// Argon2 version, 19 (0x13).
    pub version: u32,
    /// Cost parameters.
    #[serde(flatten)]
    pub params: Argon2Params,
    /// 16 random bytes, hex.
    pub salt: String,
}

/// One slot: the data key wrapped for one key source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// 8 random hex digits, unique in the repository.
    pub id: String,
    /// Its source's kind.
    pub kind: SlotKind,
    /// When it was made (RFC 3339 UTC).
    pub created: String,
    /// Names the wrapping key (file, command, passphrase) or the KMS key, 16 hex digits.
    pub fingerprint: String,
    /// file, command, passphrase: nonce, sealed data key and tag, hex (72 bytes); kms: the
    /// KMS ciphertext blob, hex.
    pub wrapped: String,
    /// Passphrase slots: how the passphrase is stretched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<Kdf>,
    /// KMS slots: the key id or ARN given to `Encrypt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
}

/// A slot set: every slot in force at one generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSet {
    /// Slot-set format, 1.
    pub format: u32,
    /// Its generation, the number in its key.
    pub generation: u64,
    /// When it was written.
    pub created: String,
    /// Its slots.
    pub slots: Vec<Slot>,
}

/// The stored form: the set's JSON text and its authenticator.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredSet {
    /// The slot set's JSON, as text (what the MAC covers).
    pub set: String,
    /// keyed blake3 of `set` under the slot-set key, hex.
    pub mac: String,
}

/// Why a key could not be had or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key source itself failed (file unreadable, command failed, too short).
    #[error("{0}")]
    Source(String),
    /// The key is not one of the repository's.
    #[error("no key slot of the repository opens with the {0}")]
    NoSlot(String),
    /// No key setting, and no KMS slot opened.
    #[error("the repository is encrypted and no key is set")]
    NotSet,
    /// The key opened a slot that a later change removed.
    #[error("the {0} was removed from the repository's key slots")]
    Removed(String),
    /// A key given for a plaintext repository.
    #[error("a key is set ({0}), but the repository is not encrypted")]
    Plaintext(String),
    /// KMS refused or failed.
    #[error("{0}")]
    Kms(String),
    /// No authentic slot set, or one that cannot be read.
    #[error("the key slots are damaged: {0}")]
    Damaged(String),
    /// Reading or writing slot sets failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// `key remove` of the last slot.
    #[error("slot {0} is the repository's last key slot")]
    LastSlot(String),
    /// `key remove` of a slot that is not there.
    #[error("no key slot \"{0}\"")]
    UnknownSlot(String),
    /// Concurrent changes kept winning.
    #[error("the key slots changed concurrently {0} times; nothing was changed")]
    Busy(u32),
    /// The new slot set is in force, but older ones (which may hold a removed slot) could
    /// not be deleted.
    #[error("the key slots changed, but older slot sets could not be deleted: {0}")]
    Leftover(String),
    /// A new key source that does not give the same key twice.
    #[error("the {0} gave different keys when read twice; no slot was made for it")]
    Unstable(String),
}

impl KeyError {
    /// Whether this is about the key (exit 11) rather than damage or storage.
    pub fn is_key_problem(&self) -> bool {
        !matches!(
            self,
            KeyError::Damaged(_) | KeyError::Storage(_) | KeyError::Leftover(_)
        )
    }

    /// What the operator can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            KeyError::NoSlot(_) | KeyError::NotSet | KeyError::Removed(_) => Some(
                "set PITR_KEY_FILE, PITR_KEY_COMMAND or PITR_PASSPHRASE (or --key-file, --key-command) to a key of one of the repository's slots; pitr key list shows them",
            ),
            KeyError::Plaintext(_) => Some(
                "unset PITR_KEY_FILE, PITR_KEY_COMMAND and PITR_PASSPHRASE for this repository, or check the repository URL",
            ),
            KeyError::LastSlot(_) => Some("add the new key first with pitr key add"),
            KeyError::UnknownSlot(_) => Some("pitr key list shows the slots' ids"),
            KeyError::Busy(_) => Some("run it again once the other change is done"),
            KeyError::Leftover(_) => Some(
                "until they are deleted, a removed key can still unwrap the data key from them; check the storage and delete the keys/ objects older than the newest",
            ),
            KeyError::Unstable(_) => Some("a key source must print the same key every time"),
            _ => None,
        }
    }
}

/// An opened encrypted repository's keys, and the slot set in force.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The derived keys.
    pub keys: Arc<Keys>,
    /// The data key (for wrapping new slots).
    pub data: DataKey,
    /// The slot set in force.
    pub current: SlotSet,
    /// Every generation stored (authentic or not), newest first.
    pub generations: Vec<u64>,
}

fn now() -> String {
    walfmt::PgTimestamp::now().to_string()
}

/// Reads key material from a file: its bytes as they are, at least 32.
fn read_file(path: &std::path::Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    use std::io::Read;
    let what = || format!("key file \"{}\"", path.display());
    let file = std::fs::File::open(path)
        .map_err(|e| KeyError::Source(format!("could not open {}: {e}", what())))?;
    // Room for the largest accepted key up front: a growing buffer would leave copies of
    // the key in freed memory.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MATERIAL_MAX + 1));
    file.take(MATERIAL_MAX as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| KeyError::Source(format!("could not read {}: {e}", what())))?;
    check_material(&bytes, &what())?;
    Ok(bytes)
}

fn check_material(bytes: &[u8], what: &str) -> Result<(), KeyError> {
    if bytes.len() < MATERIAL_MIN {
        return Err(KeyError::Source(format!(
            "{what} holds {} bytes; a key needs at least {MATERIAL_MIN} (for example head -c 32 /dev/urandom)",
            bytes.len()
        )));
    }
    if bytes.len() > MATERIAL_MAX {
        return Err(KeyError::Source(format!(
            "{what} holds more than {MATERIAL_MAX} bytes; is it a key?"
        )));
    }
    Ok(())
}

/// Runs a key command through `sh -c` and takes what it prints, less one trailing newline.
async fn run_command(command: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    // Not the command's text: it may carry a token, and messages reach server logs.
    let what = "the key command (PITR_KEY_COMMAND, --key-command)".to_owned();
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| KeyError::Source(format!("could not run {what}: {e}")))?;
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            KeyError::Source(format!(
                "{what} did not finish within {} s",
                COMMAND_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| KeyError::Source(format!("could not run {what}: {e}")))?;
    let mut bytes = Zeroizing::new(out.stdout);
    if !out.status.success() {
        return Err(KeyError::Source(format!("{what} failed: {}", out.status)));
    }
    let newline = if bytes.ends_with(b"\r\n") {
        2
    } else {
        usize::from(bytes.ends_with(b"\n"))
    };
    let len = bytes.len() - newline;
    bytes.truncate(len);
    check_material(&bytes, &format!("the output of {what}"))?;
    Ok(bytes)
}

fn check_passphrase(p: &str) -> Result<(), KeyError> {
    if p.chars().count() < 8 {
        return Err(KeyError::Source(
            "the passphrase is shorter than 8 characters".into(),
        ));
    }
    Ok(())
}

/// The wrapping key of a passphrase slot's `kdf` (Argon2id, off the async runtime).
async fn stretch(passphrase: Zeroizing<String>, kdf: &Kdf) -> Result<WrappingKey, KeyError> {
    if kdf.algorithm != "argon2id" || kdf.version != 19 {
        return Err(KeyError::Damaged(format!(
            "unknown key derivation {} version {}",
            kdf.algorithm, kdf.version
        )));
    }
    kdf.params.check().map_err(KeyError::Damaged)?;
    let salt = hex::decode(&kdf.salt)
        .ok()
        .filter(|s| (16..=64).contains(&s.len()))
        .ok_or_else(|| {
            KeyError::Damaged("a passphrase slot's salt is not 16..64 hex bytes".into())
        })?;
    let params = kdf.params;
    tokio::task::spawn_blocking(move || {
        WrappingKey::from_passphrase(passphrase.as_bytes(), &salt, &params)
    })
    .await
    .map_err(|e| KeyError::Source(format!("key derivation failed: {e}")))?
    .map_err(KeyError::Damaged)
}

const KMS_CONTEXT_KEY: &str = "pitr-key-slot";

/// Makes a slot for `source` holding `data`.
pub async fn make_slot(source: &NewSlot, data: &DataKey) -> Result<Slot, KeyError> {
    let id = hex::encode(crypto::random::<4>());
    let (kind, fingerprint, wrapped, kdf, kms_key_id) = match source {
        NewSlot::File(path) => {
            let kek = WrappingKey::from_material(&read_file(path)?);
            if WrappingKey::from_material(&read_file(path)?).fingerprint() != kek.fingerprint() {
                return Err(KeyError::Unstable(format!(
                    "key file \"{}\"",
                    path.display()
                )));
            }
            (
                SlotKind::File,
                kek.fingerprint(),
                kek.wrap(data, &id),
                None,
                None,
            )
        }
        NewSlot::Command(cmd) => {
            let kek = WrappingKey::from_material(&run_command(cmd).await?);
            // A command that prints another key next time (a generator, not a store)
            // would make a slot nothing can open again.
            if WrappingKey::from_material(&run_command(cmd).await?).fingerprint()
                != kek.fingerprint()
            {
                return Err(KeyError::Unstable("key command".into()));
            }
            (
                SlotKind::Command,
                kek.fingerprint(),
                kek.wrap(data, &id),
                None,
                None,
            )
        }
        NewSlot::Passphrase(p) => {
            check_passphrase(p)?;
            let kdf = Kdf {
                algorithm: "argon2id".into(),
                version: 19,
                params: Argon2Params::DEFAULT,
                salt: hex::encode(crypto::random::<16>()),
            };
            let kek = stretch(p.clone(), &kdf).await?;
            (
                SlotKind::Passphrase,
                kek.fingerprint(),
                kek.wrap(data, &id),
                Some(kdf),
                None,
            )
        }
        NewSlot::Kms(key_id) => {
            let blob = crate::kms::encrypt(key_id, data.bytes(), &[(KMS_CONTEXT_KEY, &id)])
                .await
                .map_err(|e| KeyError::Kms(e.to_string()))?;
            let fingerprint = hex::encode(&blake3::hash(key_id.as_bytes()).as_bytes()[..8]);
            (SlotKind::Kms, fingerprint, blob, None, Some(key_id.clone()))
        }
    };
    Ok(Slot {
        id,
        kind,
        created: now(),
        fingerprint,
        wrapped: hex::encode(wrapped),
        kdf,
        kms_key_id,
    })
}

/// Every stored generation, newest first.
async fn generations(storage: &dyn Storage) -> Result<Vec<u64>, KeyError> {
    let mut g: Vec<u64> = storage::list_all(storage, SLOTS_PREFIX)
        .await?
        .iter()
        .filter_map(|o| generation_of(&o.key))
        .collect();
    g.sort_unstable_by(|a, b| b.cmp(a));
    Ok(g)
}

/// Generations a reader looks at, newest first. Every change deletes the older ones, so
/// more than a couple means someone else wrote them; each costs a reader a read (and for
/// passphrase and KMS slots, a derivation or a call), so their number is bounded.
const GENERATIONS_READ: usize = 8;
/// The largest generation a key can name (ten digits).
const GENERATION_MAX: u64 = 9_999_999_999;

/// What reading one stored set gave.
enum ReadSet {
    /// Deleted between the listing and the read (a concurrent change).
    Gone,
    /// Not a slot set pitr wrote (unreadable, unknown format, malformed slots): ignored.
    Unreadable(String),
    /// A well-formed set, not yet authenticated.
    Set(SlotSet, StoredSet),
}

/// Reads generation `generation`. Only a storage failure is an error: a set that does not
/// parse is reported as [`ReadSet::Unreadable`] and skipped by readers, so a set planted by
/// someone without the key cannot stop a repository from opening.
async fn read_set(storage: &dyn Storage, generation: u64) -> Result<ReadSet, KeyError> {
    let key = set_key(generation);
    let bytes = match storage.get_range(&key, 0..SET_MAX + 4096).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(ReadSet::Gone),
        Err(e) => {
            return match ObjectError::from(e) {
                ObjectError::Storage(e) => Err(KeyError::Storage(e)),
                other => Ok(ReadSet::Unreadable(other.to_string())),
            }
        }
    };
    Ok(match parse_set(generation, &bytes) {
        Ok((set, stored)) => ReadSet::Set(set, stored),
        Err(why) => ReadSet::Unreadable(format!("\"{key}\": {why}")),
    })
}

/// Parses and checks the stored bytes of slot set `generation` (sans-IO; not yet
/// authenticated): every field of every slot is what pitr writes, so nothing later trusts a
/// length, a cost or a string it was told.
pub fn parse_set(generation: u64, bytes: &[u8]) -> Result<(SlotSet, StoredSet), String> {
    let (_, plain) = envelope::decode_at_most(bytes, SET_MAX).map_err(|e| e.to_string())?;
    let stored: StoredSet = serde_json::from_slice(&plain).map_err(|e| e.to_string())?;
    let set: SlotSet = serde_json::from_str(&stored.set).map_err(|e| e.to_string())?;
    if set.format != 1 {
        return Err(format!(
            "slot set format {} is not supported by this pitr",
            set.format
        ));
    }
    if set.generation != generation {
        return Err(format!("it says generation {}", set.generation));
    }
    if set.slots.is_empty() || set.slots.len() > SLOTS_MAX {
        return Err(format!("{} slots", set.slots.len()));
    }
    let hex_of = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    for slot in &set.slots {
        let bad = |what: &str| format!("slot \"{}\": {what}", slot.id.escape_debug());
        if !hex_of(&slot.id, 8) {
            return Err(bad("its id is not 8 hex digits"));
        }
        if !hex_of(&slot.fingerprint, 16) {
            return Err(bad("its fingerprint is not 16 hex digits"));
        }
        let wrapped_len = slot.wrapped.len() / 2;
        if slot.wrapped.len() % 2 != 0 || hex::decode(&slot.wrapped).is_err() {
            return Err(bad("its wrapped key is not hex"));
        }
        match slot.kind {
            SlotKind::File | SlotKind::Command | SlotKind::Passphrase => {
                if wrapped_len != crypto::NONCE_LEN + KEY_LEN + crypto::TAG_LEN {
                    return Err(bad("its wrapped key has the wrong length"));
                }
            }
            SlotKind::Kms => {
                if wrapped_len > 8192 {
                    return Err(bad("its KMS blob is too long"));
                }
            }
        }
        match (slot.kind, &slot.kdf, &slot.kms_key_id) {
            (SlotKind::Passphrase, Some(kdf), None) => {
                if kdf.algorithm != "argon2id" || kdf.version != 19 {
                    return Err(bad("an unknown key derivation"));
                }
                kdf.params.check().map_err(|e| bad(&e))?;
                if !(32..=128).contains(&kdf.salt.len()) || !hex_of(&kdf.salt, kdf.salt.len()) {
                    return Err(bad("its salt is not 16..64 hex bytes"));
                }
            }
            (SlotKind::Kms, None, Some(id)) => {
                if id.is_empty() || id.len() > 2048 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(bad("its KMS key id is not printable"));
                }
            }
            (SlotKind::File | SlotKind::Command, None, None) => {}
            _ => return Err(bad("fields that do not belong to its kind")),
        }
    }
    Ok((set, stored))
}

fn authentic(keys: &Keys, generation: u64, set: &SlotSet, stored: &StoredSet) -> bool {
    let mac = keys.slot_set_mac(stored.set.as_bytes());
    set.generation == generation && hex::decode(&stored.mac).is_ok_and(|m| constant_eq(&m, &mac))
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The newest [`GENERATIONS_READ`] sets that parse, newest first, and every generation
/// listed. A listing whose sets all vanished before they were read (a concurrent change
/// deleted them after writing a newer one) is listed again rather than taken for damage.
async fn read_sets(
    storage: &dyn Storage,
) -> Result<(Vec<u64>, Vec<(u64, SlotSet, StoredSet)>, Vec<String>), KeyError> {
    let mut attempt = 0;
    loop {
        let gens = generations(storage).await?;
        let (mut sets, mut unreadable, mut gone) = (Vec::new(), Vec::new(), false);
        for &g in gens.iter().take(GENERATIONS_READ) {
            match read_set(storage, g).await? {
                ReadSet::Set(set, stored) => sets.push((g, set, stored)),
                ReadSet::Unreadable(why) => unreadable.push(why),
                ReadSet::Gone => gone = true,
            }
        }
        attempt += 1;
        if !sets.is_empty() || !gone || attempt == 4 {
            return Ok((gens, sets, unreadable));
        }
        tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
    }
}

/// Wrapping keys already made while opening, so that no derivation runs twice.
#[derive(Default)]
struct Derived {
    /// From the key file or command (one per setting).
    material: Option<WrappingKey>,
    /// From the passphrase, by (salt, parameters).
    stretched: Vec<(String, Argon2Params, WrappingKey)>,
}

/// Tries to unwrap `slot` with the setting's key.
async fn try_slot(
    slot: &Slot,
    setting: &KeySetting,
    derived: &mut Derived,
) -> Result<Option<DataKey>, KeyError> {
    // parse_set checked the hex and the lengths.
    let wrapped = hex::decode(&slot.wrapped).unwrap_or_default();
    match (slot.kind, setting) {
        (SlotKind::File, KeySetting::File(_)) | (SlotKind::Command, KeySetting::Command(_)) => {
            if derived.material.is_none() {
                let material = match setting {
                    KeySetting::File(p) => read_file(p)?,
                    KeySetting::Command(c) => run_command(c).await?,
                    _ => unreachable!("matched above"),
                };
                derived.material = Some(WrappingKey::from_material(&material));
            }
            let kek = derived.material.as_ref().expect("set above");
            if kek.fingerprint() != slot.fingerprint {
                return Ok(None);
            }
            Ok(kek.unwrap(&wrapped, &slot.id).ok())
        }
        (SlotKind::Passphrase, KeySetting::Passphrase(p)) => {
            let Some(kdf) = &slot.kdf else {
                return Ok(None);
            };
            let known = derived
                .stretched
                .iter()
                .position(|(salt, params, _)| *salt == kdf.salt && *params == kdf.params);
            let i = match known {
                Some(i) => i,
                None => {
                    let kek = stretch(p.clone(), kdf).await?;
                    derived.stretched.push((kdf.salt.clone(), kdf.params, kek));
                    derived.stretched.len() - 1
                }
            };
            let kek = &derived.stretched[i].2;
            // The fingerprint first: the AEAD does not commit to its key, so a planted
            // blob must not be what tells one passphrase from another.
            if kek.fingerprint() != slot.fingerprint {
                return Ok(None);
            }
            Ok(kek.unwrap(&wrapped, &slot.id).ok())
        }
        (SlotKind::Kms, KeySetting::None | KeySetting::Kms(_)) => {
            let Some(key_id) = &slot.kms_key_id else {
                return Ok(None);
            };
            if matches!(setting, KeySetting::Kms(pinned) if pinned != key_id) {
                return Ok(None);
            }
            let plain = Zeroizing::new(
                crate::kms::decrypt(key_id, &wrapped, &[(KMS_CONTEXT_KEY, &slot.id)])
                    .await
                    .map_err(|e| KeyError::Kms(e.to_string()))?,
            );
            Ok(<[u8; KEY_LEN]>::try_from(&plain[..])
                .ok()
                .map(DataKey::from_bytes))
        }
        _ => Ok(None),
    }
}

/// Opens the repository's data key with `setting` (KMS slots when nothing is set): a slot
/// it opens in any of the newest stored sets, whose data key authenticates a set (the
/// newest such set is the one in force), which must still hold that slot.
pub async fn open(storage: &dyn Storage, setting: &KeySetting) -> Result<Opened, KeyError> {
    let (gens, sets, unreadable) = read_sets(storage).await?;
    if sets.is_empty() {
        return Err(KeyError::Damaged(match unreadable.first() {
            Some(why) => format!("no key slot set can be read: {why}"),
            None => "the repository is encrypted but holds no key slot set".into(),
        }));
    }
    let wanted = setting.kind().unwrap_or(SlotKind::Kms);
    let mut derived = Derived::default();
    let mut tried = std::collections::HashSet::new();
    let mut kms_error = None;
    let mut foreign = false;
    for (_, set, _) in &sets {
        for slot in &set.slots {
            if slot.kind != wanted || !tried.insert((slot.id.clone(), slot.wrapped.clone())) {
                continue;
            }
            let data = match try_slot(slot, setting, &mut derived).await {
                Ok(Some(data)) => data,
                Ok(None) => continue,
                Err(KeyError::Kms(e)) => {
                    kms_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let keys = Keys::new(&data);
            // A slot whose data key authenticates no set is not this repository's (a
            // planted one): keep looking.
            let Some((_, current, _)) = sets
                .iter()
                .find(|(g, set, stored)| authentic(&keys, *g, set, stored))
            else {
                foreign = true;
                continue;
            };
            if !current
                .slots
                .iter()
                .any(|s| s.id == slot.id && s.wrapped == slot.wrapped)
            {
                let what = match setting {
                    KeySetting::None => format!("KMS key of slot {}", slot.id),
                    s => s.describe(),
                };
                return Err(KeyError::Removed(what));
            }
            return Ok(Opened {
                keys: Arc::new(keys),
                data,
                current: current.clone(),
                generations: gens,
            });
        }
    }
    if foreign {
        return Err(KeyError::Damaged(
            "a key slot opened, but no key slot set is authentic under its data key".into(),
        ));
    }
    Err(match (setting, kms_error) {
        (KeySetting::None | KeySetting::Kms(_), Some(e)) => KeyError::Kms(e),
        (KeySetting::None, None) => KeyError::NotSet,
        (s, _) => KeyError::NoSlot(s.describe()),
    })
}

/// The newest slot set that parses (`pitr key list` needs no key), not authenticated:
/// [`open`] gives the set in force.
pub async fn list(storage: &dyn Storage) -> Result<SlotSet, KeyError> {
    let (_, sets, unreadable) = read_sets(storage).await?;
    match sets.into_iter().next() {
        Some((_, set, _)) => Ok(set),
        None => Err(KeyError::Damaged(match unreadable.first() {
            Some(why) => format!("no key slot set can be read: {why}"),
            None => "the repository holds no key slot set".into(),
        })),
    }
}

/// Stores a new set: put-if-absent of `keys/<generation>`; true when stored (also when a
/// retried request finds the set it wrote itself there).
async fn put_set(storage: &dyn Storage, keys: &Keys, set: &SlotSet) -> Result<bool, KeyError> {
    let text = serde_json::to_string(set).map_err(|e| KeyError::Damaged(e.to_string()))?;
    let mac = hex::encode(keys.slot_set_mac(text.as_bytes()));
    let stored = serde_json::to_vec_pretty(&StoredSet {
        set: text.clone(),
        mac: mac.clone(),
    })
    .map_err(|e| KeyError::Damaged(e.to_string()))?;
    let env = envelope::encode(&stored, EncodeOptions { zstd_level: None });
    let outcome = storage
        .put(&set_key(set.generation), env, PutMode::IfAbsent)
        .await?;
    if outcome == PutOutcome::Stored {
        return Ok(true);
    }
    // Taken: by a concurrent change, or by this one (a request that landed but whose
    // answer was lost, then retried). The set's text names its creation time to the
    // microsecond, so only our own write has our text.
    Ok(matches!(
        read_set(storage, set.generation).await?,
        ReadSet::Set(_, theirs) if theirs.set == text && theirs.mac == mac
    ))
}

/// The first slot set of a new encrypted repository (`pitr init --encrypt`): false when a
/// concurrent init wrote one first.
pub async fn create(
    storage: &dyn Storage,
    data: &DataKey,
    slots: Vec<Slot>,
) -> Result<bool, KeyError> {
    let set = SlotSet {
        format: 1,
        generation: 1,
        created: now(),
        slots,
    };
    put_set(storage, &Keys::new(data), &set).await
}

/// Applies `change` to the set in force and stores the result as the next generation,
/// again from the newer set if a concurrent change got there first. Once the new set reads
/// back as the one in force, the older generations are deleted (they may hold a removed
/// slot); a failure to delete them is reported. Returns the new set.
async fn change(
    storage: &dyn Storage,
    setting: &KeySetting,
    mut change: impl FnMut(&mut SlotSet) -> Result<(), KeyError>,
) -> Result<SlotSet, KeyError> {
    const ATTEMPTS: u32 = 5;
    for _ in 0..ATTEMPTS {
        let opened = open(storage, setting).await?;
        let mut next = opened.current.clone();
        change(&mut next)?;
        if next.slots.is_empty() {
            return Err(KeyError::LastSlot(String::new()));
        }
        // The generation after the one in force, not after the newest listed: a planted
        // set with a huge number must not push the next one past what keys can name.
        next.generation = opened.current.generation + 1;
        if next.generation > GENERATION_MAX {
            return Err(KeyError::Damaged(
                "the key slot sets' generations are used up".into(),
            ));
        }
        next.created = now();
        if !put_set(storage, &opened.keys, &next).await? {
            continue;
        }
        let after = open(storage, setting).await;
        let in_force = match &after {
            Ok(o) => o.current.generation == next.generation,
            // Opened with a key that the change itself removed: the new set is read back
            // by its generation instead.
            Err(KeyError::Removed(_)) => true,
            Err(_) => false,
        };
        if !in_force {
            return Err(KeyError::Leftover(format!(
                "the new set {} did not read back as the one in force",
                set_key(next.generation)
            )));
        }
        // The older generations go (they may hold a removed slot). Newer ones are left
        // alone, even the ones found not authentic above: a concurrent change may have
        // written one since, and deleting it could leave no set at all.
        let others: Vec<String> = generations(storage)
            .await?
            .into_iter()
            .filter(|g| *g < next.generation)
            .map(set_key)
            .collect();
        if let Err(e) = storage.delete(&others).await {
            return Err(KeyError::Leftover(e.to_string()));
        }
        return Ok(next);
    }
    Err(KeyError::Busy(ATTEMPTS))
}

/// `pitr key add`: a slot for `source`, opened with `setting`.
pub async fn add(
    storage: &dyn Storage,
    setting: &KeySetting,
    source: &NewSlot,
) -> Result<Slot, KeyError> {
    let opened = open(storage, setting).await?;
    let slot = make_slot(source, &opened.data).await?;
    let added = slot.clone();
    change(storage, setting, move |set| {
        if set.slots.len() >= SLOTS_MAX {
            return Err(KeyError::Source(format!(
                "the repository already has {SLOTS_MAX} key slots"
            )));
        }
        // A retried change that got its set stored already holds the slot.
        if !set.slots.iter().any(|s| s.id == added.id) {
            set.slots.push(added.clone());
        }
        Ok(())
    })
    .await?;
    Ok(slot)
}

/// `pitr key remove ID`, opened with `setting`; refuses the last slot.
pub async fn remove(
    storage: &dyn Storage,
    setting: &KeySetting,
    id: &str,
) -> Result<SlotSet, KeyError> {
    change(storage, setting, |set| {
        let before = set.slots.len();
        set.slots.retain(|s| s.id != id);
        if set.slots.len() == before {
            return Err(KeyError::UnknownSlot(id.to_owned()));
        }
        if set.slots.is_empty() {
            return Err(KeyError::LastSlot(id.to_owned()));
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn key_file(dir: &std::path::Path, name: &str, byte: u8) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, [byte; 32]).unwrap();
        p
    }

    #[tokio::test]
    async fn slots_open_rotate_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let storage = MemStorage::new();
        let a = key_file(dir.path(), "a", 1);
        let b = key_file(dir.path(), "b", 2);
        let data = DataKey::generate();
        let slot_a = make_slot(&NewSlot::File(a.clone()), &data).await.unwrap();
        assert!(create(&storage, &data, vec![slot_a.clone()]).await.unwrap());
        assert!(!create(&storage, &data, vec![slot_a.clone()]).await.unwrap());

        let opened = open(&storage, &KeySetting::File(a.clone())).await.unwrap();
        assert_eq!(opened.data.bytes(), data.bytes());
        assert!(matches!(
            open(&storage, &KeySetting::File(b.clone())).await,
            Err(KeyError::NoSlot(_))
        ));
        assert!(matches!(
            open(&storage, &KeySetting::None).await,
            Err(KeyError::NotSet)
        ));

        // Rotation: add b with a, remove a with b; a is refused, b opens the same data key.
        let slot_b = add(
            &storage,
            &KeySetting::File(a.clone()),
            &NewSlot::File(b.clone()),
        )
        .await
        .unwrap();
        assert_eq!(list(&storage).await.unwrap().slots.len(), 2);
        remove(&storage, &KeySetting::File(b.clone()), &slot_a.id)
            .await
            .unwrap();
        assert!(open(&storage, &KeySetting::File(a.clone())).await.is_err());
        let opened = open(&storage, &KeySetting::File(b.clone())).await.unwrap();
        assert_eq!(opened.data.bytes(), data.bytes());
        assert_eq!(opened.current.generation, 3);
        assert_eq!(generations(&storage).await.unwrap(), vec![3]);
        assert!(matches!(
            remove(&storage, &KeySetting::File(b.clone()), &slot_b.id).await,
            Err(KeyError::LastSlot(_))
        ));
        assert!(matches!(
            remove(&storage, &KeySetting::File(b.clone()), "nope").await,
            Err(KeyError::UnknownSlot(_))
        ));
    }

    #[tokio::test]
    async fn a_killed_change_leaves_a_usable_set_and_old_keys_stay_out() {
        let dir = tempfile::tempdir().unwrap();
        let storage = MemStorage::new();
        let a = key_file(dir.path(), "a", 1);
        let b = key_file(dir.path(), "b", 2);
        let data = DataKey::generate();
        let slot_a = make_slot(&NewSlot::File(a.clone()), &data).await.unwrap();
        let slot_b = make_slot(&NewSlot::File(b.clone()), &data).await.unwrap();
        create(&storage, &data, vec![slot_a.clone(), slot_b.clone()])
            .await
            .unwrap();
        // Generation 2 without a, written but the old one not deleted (killed in between).
        let keys = Keys::new(&data);
        let mut next = list(&storage).await.unwrap();
        next.generation = 2;
        next.slots.retain(|s| s.id != slot_a.id);
        assert!(put_set(&storage, &keys, &next).await.unwrap());
        assert_eq!(generations(&storage).await.unwrap(), vec![2, 1]);
        assert!(matches!(
            open(&storage, &KeySetting::File(a.clone())).await,
            Err(KeyError::Removed(_))
        ));
        open(&storage, &KeySetting::File(b.clone())).await.unwrap();
        // A forged newer set (not authentic) is not in force.
        let forged = SlotSet {
            generation: 9,
            ..next.clone()
        };
        assert!(put_set(&storage, &Keys::new(&DataKey::generate()), &forged)
            .await
            .unwrap());
        assert_eq!(
            open(&storage, &KeySetting::File(b.clone()))
                .await
                .unwrap()
                .current
                .generation,
            2
        );
        // A set replayed under another generation's name is not either.
        let replay = storage::get_bytes(&storage, &set_key(1)).await.unwrap();
        storage
            .put(&set_key(5), replay, PutMode::Overwrite)
            .await
            .unwrap();
        assert!(matches!(
            open(&storage, &KeySetting::File(a.clone())).await,
            Err(KeyError::Removed(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_removals_never_leave_zero_slots() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..10 {
            let storage = std::sync::Arc::new(MemStorage::new());
            let a = key_file(dir.path(), "a", 1);
            let b = key_file(dir.path(), "b", 2);
            let data = DataKey::generate();
            let slot_a = make_slot(&NewSlot::File(a.clone()), &data).await.unwrap();
            let slot_b = make_slot(&NewSlot::File(b.clone()), &data).await.unwrap();
            create(
                storage.as_ref(),
                &data,
                vec![slot_a.clone(), slot_b.clone()],
            )
            .await
            .unwrap();
            // Each removes the other's slot, opening with its own key: one wins, the other
            // finds its own slot gone or would leave none, and changes nothing.
            let (sa, sb) = (storage.clone(), storage.clone());
            let (ka, kb) = (KeySetting::File(a.clone()), KeySetting::File(b.clone()));
            let (ida, idb) = (slot_b.id.clone(), slot_a.id.clone());
            let (x, y) = tokio::join!(
                tokio::spawn(async move { remove(sa.as_ref(), &ka, &ida).await }),
                tokio::spawn(async move { remove(sb.as_ref(), &kb, &idb).await }),
            );
            let (x, y) = (x.unwrap(), y.unwrap());
            assert!(x.is_ok() != y.is_ok(), "{x:?} {y:?}");
            let left = list(storage.as_ref()).await.unwrap();
            assert_eq!(left.slots.len(), 1);
            let survivor = if x.is_ok() { &a } else { &b };
            open(storage.as_ref(), &KeySetting::File(survivor.clone()))
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn planted_sets_neither_block_opening_nor_brick_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let storage = MemStorage::new();
        let a = key_file(dir.path(), "a", 1);
        let b = key_file(dir.path(), "b", 2);
        let data = DataKey::generate();
        let slot_a = make_slot(&NewSlot::File(a.clone()), &data).await.unwrap();
        create(&storage, &data, vec![slot_a.clone()]).await.unwrap();
        let by_a = KeySetting::File(a.clone());
        // Garbage at the highest generation a key can name, and a well-formed set below it,
        // authentic under someone else's data key, with a slot for their own key.
        storage
            .put(
                &set_key(GENERATION_MAX),
                bytes::Bytes::from_static(b"junk"),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        let theirs = DataKey::generate();
        let forged = SlotSet {
            format: 1,
            generation: GENERATION_MAX - 1,
            created: now(),
            slots: vec![
                make_slot(&NewSlot::File(key_file(dir.path(), "c", 3)), &theirs)
                    .await
                    .unwrap(),
            ],
        };
        assert!(put_set(&storage, &Keys::new(&theirs), &forged)
            .await
            .unwrap());
        let opened = open(&storage, &by_a).await.unwrap();
        assert_eq!(opened.data.bytes(), data.bytes());
        assert_eq!(opened.current.generation, 1);
        // A change goes to the generation after the one in force, and deletes the older.
        add(&storage, &by_a, &NewSlot::File(b.clone()))
            .await
            .unwrap();
        assert_eq!(
            generations(&storage).await.unwrap(),
            vec![GENERATION_MAX, GENERATION_MAX - 1, 2]
        );
        assert_eq!(
            open(&storage, &KeySetting::File(b))
                .await
                .unwrap()
                .data
                .bytes(),
            data.bytes()
        );
        // A set with hostile fields is skipped, not trusted: here, Argon2 at 4 GiB.
        let mut costly = list(&storage).await.unwrap();
        costly.generation = 3;
        costly.slots[0].kind = SlotKind::Passphrase;
        costly.slots[0].kdf = Some(Kdf {
            algorithm: "argon2id".into(),
            version: 19,
            params: Argon2Params {
                m_kib: 4 << 20,
                t: 64,
                p: 16,
            },
            salt: "00".repeat(16),
        });
        assert!(put_set(&storage, &Keys::new(&data), &costly).await.unwrap());
        let pass = KeySetting::Passphrase(Zeroizing::new("whatever it is".into()));
        assert!(matches!(
            open(&storage, &pass).await,
            Err(KeyError::NoSlot(_))
        ));
        assert_eq!(open(&storage, &by_a).await.unwrap().current.generation, 2);
    }

    #[tokio::test]
    async fn passphrase_and_command_slots() {
        let storage = MemStorage::new();
        let data = DataKey::generate();
        let pass = NewSlot::Passphrase(Zeroizing::new("correct horse battery".into()));
        let cmd = NewSlot::Command("printf '%s\\n' 0123456789abcdef0123456789abcdef".into());
        let slots = vec![
            make_slot(&pass, &data).await.unwrap(),
            make_slot(&cmd, &data).await.unwrap(),
        ];
        create(&storage, &data, slots).await.unwrap();
        let by_pass = KeySetting::Passphrase(Zeroizing::new("correct horse battery".into()));
        assert_eq!(
            open(&storage, &by_pass).await.unwrap().data.bytes(),
            data.bytes()
        );
        let wrong = KeySetting::Passphrase(Zeroizing::new("wrong horse battery".into()));
        assert!(matches!(
            open(&storage, &wrong).await,
            Err(KeyError::NoSlot(_))
        ));
        // The trailing newline is not part of the key.
        let by_cmd = KeySetting::Command("printf 0123456789abcdef0123456789abcdef".into());
        assert_eq!(
            open(&storage, &by_cmd).await.unwrap().data.bytes(),
            data.bytes()
        );
        let short = KeySetting::Command("echo short".into());
        assert!(matches!(
            open(&storage, &short).await,
            Err(KeyError::Source(_))
        ));
        let failing = KeySetting::Command("exit 3".into());
        assert!(matches!(
            open(&storage, &failing).await,
            Err(KeyError::Source(_))
        ));
    }
}
