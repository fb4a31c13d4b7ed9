//! Where WAL files live in the repository (docs/FORMAT.md, "Layout").

use walfmt::ArchiveFileKind;

/// The key of an archived WAL file: segments, `.partial` and `.backup` files under
/// `wal/<timeline and log id>/`, `.history` files under `wal/history/`. None for names that
/// are not WAL files.
pub fn wal_key(name: &str) -> Option<String> {
    match ArchiveFileKind::of(name) {
        ArchiveFileKind::Segment | ArchiveFileKind::Partial | ArchiveFileKind::BackupHistory => {
            Some(format!("wal/{}/{name}", &name[..16]))
        }
        ArchiveFileKind::History(_) => Some(format!("wal/history/{name}")),
        ArchiveFileKind::Other => None,
    }
}

/// The key of a segment's summary, beside it.
pub fn summary_key(name: &str) -> Option<String> {
    wal_key(name).map(|k| format!("{k}.summary"))
}

/// Where `pitr stream` keeps the pieces of segment `name` while it grows:
/// `stream/<timeline and log id>/<segment name>/`.
pub fn stream_prefix(name: &str) -> Option<String> {
    (ArchiveFileKind::of(name) == ArchiveFileKind::Segment)
        .then(|| format!("stream/{}/{name}/", &name[..16]))
}

/// The key of the piece of segment `name` holding its bytes `start..end` (offsets in the
/// segment, eight hex digits each, so pieces list in order).
pub fn piece_key(name: &str, start: u32, end: u32) -> Option<String> {
    stream_prefix(name).map(|p| format!("{p}{start:08X}-{end:08X}"))
}

/// The segment name and byte range of a piece's key.
pub fn parse_piece_key(key: &str) -> Option<(String, u32, u32)> {
    let rest = key.strip_prefix("stream/")?;
    let mut parts = rest.split('/');
    let (_dir, name, range) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || ArchiveFileKind::of(name) != ArchiveFileKind::Segment {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    if a.len() != 8 || b.len() != 8 {
        return None;
    }
    let (start, end) = (
        u32::from_str_radix(a, 16).ok()?,
        u32::from_str_radix(b, 16).ok()?,
    );
    (start < end).then(|| (name.to_owned(), start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(
            wal_key("000000010000000A000000FE").unwrap(),
            "wal/000000010000000A/000000010000000A000000FE"
        );
        assert_eq!(
            wal_key("000000020000000000000003.partial").unwrap(),
            "wal/0000000200000000/000000020000000000000003.partial"
        );
        assert_eq!(
            wal_key("00000002.history").unwrap(),
            "wal/history/00000002.history"
        );
        assert_eq!(
            summary_key("000000010000000000000003").unwrap(),
            "wal/0000000100000000/000000010000000000000003.summary"
        );
        assert_eq!(wal_key("pg_wal"), None);
        let piece = piece_key("000000010000000A000000FE", 0x2000, 0x10000).unwrap();
        assert_eq!(
            piece,
            "stream/000000010000000A/000000010000000A000000FE/00002000-00010000"
        );
        assert_eq!(
            parse_piece_key(&piece),
            Some(("000000010000000A000000FE".to_owned(), 0x2000, 0x10000))
        );
        assert_eq!(parse_piece_key("stream/x/y/z"), None);
        assert_eq!(stream_prefix("00000002.history"), None);
    }
}
