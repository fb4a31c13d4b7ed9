//! AWS KMS for key slots (placeholder until the client lands).

/// Why a KMS call failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KmsError(String);

/// Encrypts `plaintext` under `key_id`.
pub async fn encrypt(
    key_id: &str,
    _plaintext: &[u8],
    _context: &[(&str, &str)],
) -> Result<Vec<u8>, KmsError> {
    Err(KmsError(format!("KMS key \"{key_id}\": not built yet")))
}

/// Decrypts a blob made by `encrypt`.
pub async fn decrypt(
    key_id: &str,
    _blob: &[u8],
    _context: &[(&str, &str)],
) -> Result<Vec<u8>, KmsError> {
    Err(KmsError(format!("KMS key \"{key_id}\": not built yet")))
}
