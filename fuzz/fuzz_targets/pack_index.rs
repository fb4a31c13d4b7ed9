//! A pack's footer and index from a hostile repository: read without panicking, without an
//! index envelope declaring more than the pack can hold, every entry inside the pack; the
//! same for an encrypted repository's packs (whose index must also open under its key).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use repo::crypto::{DataKey, Keys};
use repo::envelope::Protection;
use repo::pack::read_index;

fn encrypted() -> &'static Protection {
    static P: OnceLock<Protection> = OnceLock::new();
    P.get_or_init(|| Protection::Encrypted(Arc::new(Keys::new(&DataKey::from_bytes([7; 32])))))
}

fuzz_target!(|data: &[u8]| {
    for p in [&Protection::Plain, encrypted()] {
        if let Ok(entries) = read_index(data, "pack/00/00", p) {
            for e in entries {
                assert!(e.offset + u64::from(e.stored_len) <= data.len() as u64);
            }
        }
    }
});
