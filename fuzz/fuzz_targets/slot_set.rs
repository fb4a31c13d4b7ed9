//! An encrypted repository's key slot set as stored (`keys/<generation>`), read before any
//! key is known: parsed without panicking, and whatever it accepts is within the bounds
//! every reader relies on (slot count, Argon2id costs, lengths). The input is tried as the
//! stored bytes and, to reach the JSON behind the envelope's checksum, as its plaintext.
#![no_main]

use libfuzzer_sys::fuzz_target;
use repo::envelope::{encode, EncodeOptions};
use repo::slots::parse_set;

fuzz_target!(|data: &[u8]| {
    let wrapped = encode(data, EncodeOptions { zstd_level: None });
    for stored in [data, &wrapped[..]] {
        if let Ok((set, _)) = parse_set(1, stored) {
            assert!(!set.slots.is_empty() && set.slots.len() <= 64);
            for slot in &set.slots {
                if let Some(kdf) = &slot.kdf {
                    assert!(kdf.params.check().is_ok());
                }
                assert_eq!(slot.id.len(), 8);
                assert_eq!(slot.fingerprint.len(), 16);
            }
        }
    }
});
