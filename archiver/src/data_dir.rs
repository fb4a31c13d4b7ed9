//! What a stopped or running data directory says about its cluster, for `pitr init
//! --data-dir`: the system identifier from `global/pg_control` (its first eight bytes in
//! every version, in the machine's byte order, as PostgreSQL writes it), the major version
//! from `PG_VERSION`, and the WAL segment size from the segments in `pg_wal` (every one has
//! exactly that size; initdb leaves at least one).

use std::path::Path;

use repo::repository::ClusterIdentity;
use walfmt::ArchiveFileKind;

/// The identity of the cluster whose data directory is `dir`.
pub fn identity(dir: &Path) -> Result<ClusterIdentity, String> {
    let control = dir.join("global/pg_control");
    let bytes = std::fs::read(&control)
        .map_err(|e| format!("could not read \"{}\": {e}", control.display()))?;
    let system_identifier = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .filter(|&id| id != 0)
        .ok_or_else(|| format!("\"{}\" is not a pg_control file", control.display()))?;
    let version_file = dir.join("PG_VERSION");
    let pg_version = std::fs::read_to_string(&version_file)
        .map_err(|e| format!("could not read \"{}\": {e}", version_file.display()))?
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("\"{}\" holds no major version", version_file.display()))?;
    let wal = dir.join("pg_wal");
    let entries = std::fs::read_dir(&wal)
        .map_err(|e| format!("could not read \"{}\": {e}", wal.display()))?;
    let mut size = None;
    for e in entries.flatten() {
        let name = e.file_name();
        if ArchiveFileKind::of(&name.to_string_lossy()) == ArchiveFileKind::Segment {
            let len = e.metadata().map_err(|e| e.to_string())?.len();
            if walfmt::WalSegmentSize::new(len).is_ok() {
                size = Some(len);
                break;
            }
        }
    }
    let wal_segment_size =
        size.ok_or_else(|| format!("\"{}\" holds no WAL segment to size", wal.display()))?;
    Ok(ClusterIdentity {
        system_identifier,
        pg_version,
        wal_segment_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_identifier_version_and_segment_size() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("global")).unwrap();
        std::fs::create_dir_all(d.join("pg_wal")).unwrap();
        let mut control = 7_312_345_678_901_234_567u64.to_ne_bytes().to_vec();
        control.resize(8192, 0);
        std::fs::write(d.join("global/pg_control"), &control).unwrap();
        std::fs::write(d.join("PG_VERSION"), "15\n").unwrap();
        assert!(identity(d).unwrap_err().contains("no WAL segment"));
        let seg = std::fs::File::create(d.join("pg_wal/000000010000000000000001")).unwrap();
        seg.set_len(16 << 20).unwrap();
        let id = identity(d).unwrap();
        assert_eq!(id.system_identifier, 7_312_345_678_901_234_567);
        assert_eq!(id.pg_version, 15);
        assert_eq!(id.wal_segment_size, 16 << 20);
        assert!(identity(&d.join("nope"))
            .unwrap_err()
            .contains("pg_control"));
    }
}
