//! Timeline history parsing and queries on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walfmt::{Lsn, TimelineHistory, TimelineId};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = TimelineHistory::parse(TimelineId(7), data) {
        let _ = h.timeline_at(Lsn(0x1234_5678));
        let _ = h.descends_from(TimelineId(3), Lsn(0x1000));
        let _ = h.branch_point();
    }
});
