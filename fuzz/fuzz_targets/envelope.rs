//! The envelope every stored object is wrapped in: a header that lies about its length,
//! compression or hash is an error, never a panic or an allocation of the declared size
//! beyond what the reader expects (here 1 MiB).
#![no_main]

use libfuzzer_sys::fuzz_target;
use repo::envelope::decode_at_most;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, plain)) = decode_at_most(data, 1 << 20) {
        assert_eq!(header.plain_len, plain.len() as u64);
    }
});
