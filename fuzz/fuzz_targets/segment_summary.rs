//! Segment summaries of arbitrary files (wal-push and wal-inspect run this on input files).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = walfmt::summarize(data);
});
