//! backup_label / .backup parsing on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = walfmt::BackupLabel::parse(data);
});
