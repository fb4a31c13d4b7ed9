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
    }
}
