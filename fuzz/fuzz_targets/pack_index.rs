//! A pack's footer and index from a hostile repository: read without panicking, without an
//! index envelope declaring more than the pack can hold, every entry inside the pack.
#![no_main]

use libfuzzer_sys::fuzz_target;
use repo::pack::read_index;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = read_index(data) {
        for e in entries {
            assert!(e.offset + u64::from(e.stored_len) <= data.len() as u64);
        }
    }
});
