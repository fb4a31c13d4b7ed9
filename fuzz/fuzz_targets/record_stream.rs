//! The decoder on arbitrary bytes fed in arbitrary pieces: it must never panic, and a length
//! field it has not checked must never make it allocate that much (libFuzzer's
//! -malloc_limit_mb catches that; see fuzz/run).
#![no_main]

use libfuzzer_sys::fuzz_target;
use walfmt::{Decoded, Lsn, WalDecoder};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // First byte: piece size; the rest: WAL starting at a segment boundary.
    let piece = (data[0] as usize + 1) * 37;
    let mut d = WalDecoder::new(Lsn(0x100_0000)).unwrap();
    for chunk in data[1..].chunks(piece) {
        d.feed(chunk);
        loop {
            match d.next() {
                Decoded::Record(r) => {
                    if let Some(v) = d.version() {
                        let _ = r.main_data(v);
                        let _ = walfmt::xact::interpret(&r, v);
                    }
                }
                Decoded::NeedMore | Decoded::End(_) => break,
            }
        }
    }
    let _ = d.valid_until();
});
