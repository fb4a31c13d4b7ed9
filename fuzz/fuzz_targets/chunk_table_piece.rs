//! A piece of a backup's chunk table as stored: an envelope (checked, bounded by the piece's
//! size) whose plaintext is checked against the table's description and decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use repo::envelope;
use repo::manifest::{check_piece, ChunkRef, ChunkTable, CHUNK_ENTRY_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&count, stored)) = data.split_first() else {
        return;
    };
    let count = u64::from(count);
    let max = count * CHUNK_ENTRY_LEN as u64;
    let Ok((header, plain)) = envelope::decode_at_most(stored, max) else {
        return;
    };
    let table = ChunkTable {
        count,
        per_piece: 65536,
        pieces: vec![blake3::Hash::from_bytes(header.hash).to_hex().to_string()],
    };
    if check_piece("backup/x/chunks/000000", &table, 0, &header.hash, &plain).is_ok() {
        let n = plain
            .chunks_exact(CHUNK_ENTRY_LEN)
            .filter_map(ChunkRef::decode)
            .map(|c| c.range())
            .count();
        assert_eq!(n as u64, count);
    }
});
