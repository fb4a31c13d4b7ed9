//! The pieces `pitr stream` stores of a segment while it grows (docs/FORMAT.md, "Streamed
//! WAL"): each an envelope of the segment's bytes `start..end`. The segment's durable
//! prefix is the run of pieces from offset 0 with no gap; anything after a gap is ignored.

use bytes::Bytes;

use crate::keys::{parse_piece_key, stream_prefix};
use crate::objects::{ObjectError, ObjectStore};
use crate::storage::{list_all, Storage, StorageError};

/// One stored piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Its key.
    pub key: String,
    /// First byte (offset in the segment).
    pub start: u32,
    /// Byte after its last.
    pub end: u32,
}

/// The pieces of segment `name`, ordered by offset.
pub async fn list_pieces(storage: &dyn Storage, name: &str) -> Result<Vec<Piece>, StorageError> {
    let Some(prefix) = stream_prefix(name) else {
        return Ok(Vec::new());
    };
    let mut pieces: Vec<Piece> = list_all(storage, &prefix)
        .await?
        .into_iter()
        .filter_map(|o| {
            let (n, start, end) = parse_piece_key(&o.key)?;
            (n == name).then_some(Piece {
                key: o.key,
                start,
                end,
            })
        })
        .collect();
    pieces.sort_by_key(|p| (p.start, p.end));
    Ok(pieces)
}

/// Every segment under `prefix` (`stream/`, or `stream/<timeline>` for one timeline) with a
/// durable prefix, and where that prefix ends, from one listing.
pub async fn streamed_segments(
    storage: &dyn Storage,
    prefix: &str,
) -> Result<std::collections::BTreeMap<String, u32>, StorageError> {
    let mut by_segment: std::collections::BTreeMap<String, Vec<Piece>> = Default::default();
    for o in list_all(storage, prefix).await? {
        if let Some((name, start, end)) = parse_piece_key(&o.key) {
            by_segment.entry(name).or_default().push(Piece {
                key: o.key,
                start,
                end,
            });
        }
    }
    Ok(by_segment
        .into_iter()
        .filter_map(|(name, mut pieces)| {
            pieces.sort_by_key(|p| (p.start, p.end));
            let (_, end) = contiguous(&pieces);
            (end > 0).then_some((name, end))
        })
        .collect())
}

/// The pieces that make the contiguous run from offset 0, and where it ends (0: none).
pub fn contiguous(pieces: &[Piece]) -> (Vec<Piece>, u32) {
    let mut run = Vec::new();
    let mut end = 0u32;
    for p in pieces {
        if p.start == end {
            end = p.end;
            run.push(p.clone());
        } else if p.start > end {
            break;
        }
        // A piece starting before `end` overlaps what the run holds already: skipped.
    }
    (run, end)
}

/// The durable prefix of segment `name` from its pieces, each verified; None when no
/// piece starts at offset 0.
pub async fn read_streamed(
    objects: &ObjectStore,
    name: &str,
) -> Result<Option<Bytes>, ObjectError> {
    let pieces = list_pieces(objects.storage().as_ref(), name).await?;
    let (run, end) = contiguous(&pieces);
    if run.is_empty() {
        return Ok(None);
    }
    // Piece names are read from the repository: the buffer grows with what is read.
    let mut out = Vec::with_capacity((end as usize).min(16 << 20));
    for p in &run {
        let (_, plain) = objects
            .get_at_most(&p.key, u64::from(p.end - p.start))
            .await?;
        if plain.len() as u64 != u64::from(p.end - p.start) {
            return Err(ObjectError::Corrupt {
                key: p.key.clone(),
                source: crate::envelope::EnvelopeError::Length {
                    expected: u64::from(p.end - p.start),
                    found: plain.len() as u64,
                },
            });
        }
        out.extend_from_slice(&plain);
    }
    Ok(Some(Bytes::from(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(start: u32, end: u32) -> Piece {
        Piece {
            key: format!("{start}-{end}"),
            start,
            end,
        }
    }

    #[test]
    fn the_run_stops_at_the_first_gap() {
        let (run, end) = contiguous(&[p(0, 10), p(10, 30), p(40, 50)]);
        assert_eq!((run.len(), end), (2, 30));
        assert_eq!(contiguous(&[p(5, 10)]).1, 0);
        assert_eq!(contiguous(&[]).1, 0);
        // An overlapping piece (a rewrite of the same bytes) is passed over.
        let (run, end) = contiguous(&[p(0, 10), p(0, 10), p(10, 20)]);
        assert_eq!((run.len(), end), (2, 20));
    }
}
