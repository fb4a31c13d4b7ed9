//! Backup manifests from a hostile repository: the JSON (first two bytes: its length), then
//! a chunk table. Parsing, checking and placing every entry must never panic or allocate
//! by a number the input declares.
#![no_main]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use repo::manifest::{BackupManifest, ChunkRef, CHUNK_ENTRY_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let (json, table) = rest.split_at(len.min(rest.len()));
    let Ok(mut m) = BackupManifest::parse("backup/x/manifest", json) else {
        return;
    };
    m.chunks = Arc::new(
        table
            .chunks_exact(CHUNK_ENTRY_LEN)
            .filter_map(ChunkRef::decode)
            .collect(),
    );
    m.chunk_table.count = m.chunks.len() as u64;
    if m.check().is_ok() {
        for f in &m.files {
            let _ = f.chunks.indexes().map(|i| m.chunks[i].range()).count();
        }
        for i in 0..m.packs.len() {
            let _ = m.pack_key(i);
        }
        let _ = restore::dest::place(&m, Path::new("/r/data"), &HashMap::new());
    }
});
