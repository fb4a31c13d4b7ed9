//! Page header parsing and validation on arbitrary bytes at an arbitrary LSN.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walfmt::{page, Lsn};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let lsn = Lsn(u64::from_le_bytes(data[..8].try_into().unwrap()) & !0x1FFF);
    if let Some(h) = page::parse(&data[8..]) {
        let _ = page::validate(&h, lsn, &page::Expect::default());
        let _ = h.len();
    }
});
