//! The envelope every stored object is wrapped in: a header that lies about its length,
//! compression, hash or encryption is an error, never a panic or an allocation of the
//! declared size beyond what the reader expects (here 1 MiB); plaintext and encrypted
//! readers alike.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use repo::crypto::{DataKey, Keys};
use repo::envelope::{decode_as, decode_at_most, Protection};

fn encrypted() -> &'static Protection {
    static P: OnceLock<Protection> = OnceLock::new();
    P.get_or_init(|| Protection::Encrypted(Arc::new(Keys::new(&DataKey::from_bytes([7; 32])))))
}

fuzz_target!(|data: &[u8]| {
    if let Ok((header, plain)) = decode_at_most(data, 1 << 20) {
        assert_eq!(header.plain_len, plain.len() as u64);
    }
    if let Ok((header, plain)) = decode_as(data, 1 << 20, encrypted(), "wal/x") {
        assert_eq!(header.plain_len, plain.len() as u64);
    }
});
