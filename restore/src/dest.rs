//! Where a path from the repository meets the filesystem: the one place that turns a
//! backup manifest's entries into paths below the restore's directories, and refuses a
//! manifest that would write anywhere else.
//!
//! A manifest is untrusted input (anyone who can write to the bucket can rewrite it), so
//! the whole of it is checked here while planning, before the first write:
//! - every path is relative and plain (no `..`, no root, no empty or `.` component), in the
//!   data directory or in a tablespace the manifest lists (there, inside the version
//!   directory `PG_<major>_<catalog version>` as PostgreSQL lays tablespaces out), and named
//!   once;
//! - tablespace locations are absolute and plain, and no two destinations (the data
//!   directory, each tablespace) lie inside one another;
//! - no entry lies beneath a link or a file entry: nothing is ever written "through" a link;
//! - links are made after every file is written (see [`Places::links`]): `pg_tblspc/<oid>`
//!   (of a listed tablespace) points at that tablespace's destination whatever the manifest
//!   says; any other link (a `log -> /var/log/postgresql` in the data directory, say) is
//!   recreated as it was, but only at the top of the data directory and under a name that
//!   is not PostgreSQL's own (`base`, `global`, `pg_*`, `postmaster.*`, ...), so that
//!   neither the restore nor the restored server writes through one;
//! - the names pitr itself writes (its marker, the pending pg_control, the recovery
//!   settings) are files if they are in the backup at all, `global` and `pg_wal` are
//!   directories and hold no links, and `pg_wal/.pitr` (wal-fetch's spool) is pitr's alone:
//!   pitr writes beneath them, also once the links exist.
//!
//! A violation names the entry; the caller reports it as a damaged repository.

use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};

use repo::manifest::{BackupManifest, FileType, ManifestFile};

/// Present in a data directory while pitr restores into it.
pub const INCOMPLETE_MARKER: &str = "PITR_RESTORE_INCOMPLETE";
/// PostgreSQL's control file: written last, under [`PG_CONTROL_PENDING`] until then.
pub const PG_CONTROL: &str = "global/pg_control";
/// Where pg_control is written until everything else is on disk.
pub const PG_CONTROL_PENDING: &str = "global/pg_control.pitr-restore";

/// Data-directory entries that must be regular files if the backup has them: pitr writes
/// them, or next to them.
const FILES_ONLY: [&str; 8] = [
    INCOMPLETE_MARKER,
    PG_CONTROL,
    PG_CONTROL_PENDING,
    "postgresql.auto.conf",
    "recovery.signal",
    "standby.signal",
    // Where `restore --start` has pg_ctl write the server's log.
    "pitr-start.log",
    "log/pitr-start.log",
];

/// Data-directory entries that must be directories if the backup has them: pitr writes
/// beneath them (pg_control, wal-fetch's spool).
const DIRS_ONLY: [&str; 2] = ["global", "pg_wal"];

/// Where each entry of a manifest goes, checked.
#[derive(Debug, Clone)]
pub struct Places {
    /// The data directory.
    pub to: PathBuf,
    /// Each tablespace's destination, by OID.
    pub spaces: HashMap<u32, PathBuf>,
    /// Per manifest entry, in order: where it goes (pg_control: its pending name). Shared
    /// with the threads that write the files.
    pub paths: std::sync::Arc<[PathBuf]>,
    /// The links to make once every file is written: (where, what it points at).
    pub links: Vec<(PathBuf, PathBuf)>,
}

/// Checks a plain absolute path: a root, then only normal components.
fn plain_absolute(p: &Path) -> bool {
    let mut c = p.components();
    c.next() == Some(Component::RootDir) && c.all(|c| matches!(c, Component::Normal(_)))
}

/// Checks a plain relative path: only normal components, at least one.
fn plain_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\0')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        // `a//b` and `a/./b` are dropped by components(): refuse them by hand.
        && p.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Whether one of `a` and `b` lies inside the other (or they are the same).
fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Plans every entry of `m` below `to` and the tablespaces' destinations (`map`, else
/// where the manifest says each was), refusing the manifest if any entry would leave them.
pub fn place(m: &BackupManifest, to: &Path, map: &HashMap<u32, PathBuf>) -> Result<Places, String> {
    if !plain_absolute(to) {
        return Err(format!(
            "restore directory \"{}\" is not a plain absolute path",
            to.display()
        ));
    }
    let mut spaces: HashMap<u32, PathBuf> = HashMap::new();
    for t in &m.tablespaces {
        let recorded = Path::new(&t.location);
        if !plain_absolute(recorded) {
            return Err(format!(
                "tablespace {} has location \"{}\", which is not a plain absolute path",
                t.oid,
                t.location.escape_debug()
            ));
        }
        let dest = map
            .get(&t.oid)
            .cloned()
            .unwrap_or_else(|| recorded.to_owned());
        if !plain_absolute(&dest) {
            return Err(format!(
                "tablespace {} is mapped to \"{}\", which is not a plain absolute path",
                t.oid,
                dest.display()
            ));
        }
        if nested(&dest, to) {
            return Err(format!(
                "tablespace {} would go to \"{}\", which overlaps the restore directory",
                t.oid,
                dest.display()
            ));
        }
        if let Some((other, _)) = spaces.iter().find(|(_, d)| nested(d, &dest)) {
            return Err(format!(
                "tablespaces {other} and {} would overlap at \"{}\"",
                t.oid,
                dest.display()
            ));
        }
        if spaces.insert(t.oid, dest).is_some() {
            return Err(format!("tablespace {} is listed twice", t.oid));
        }
    }

    let version_dir = format!("PG_{}_", m.pg_version);
    let mut kinds: HashMap<(Option<u32>, &str), FileType> = HashMap::new();
    for f in &m.files {
        if !plain_relative(&f.path) {
            return Err(format!(
                "entry \"{}\" is not a plain relative path",
                f.path.escape_debug()
            ));
        }
        if let Some(oid) = f.tablespace.filter(|o| !spaces.contains_key(o)) {
            return Err(format!(
                "entry \"{}\" is in unknown tablespace {oid}",
                f.path
            ));
        }
        // PostgreSQL keeps a tablespace's files in its version directory (PG_15_202209061):
        // a recorded location that is someone's home directory gets nothing else.
        if let Some(oid) = f.tablespace {
            if !f.path.starts_with(&version_dir) {
                return Err(format!(
                    "entry \"{}\" of tablespace {oid} is outside its {version_dir}* directory",
                    f.path
                ));
            }
        }
        if kinds
            .insert((f.tablespace, f.path.as_str()), f.kind)
            .is_some()
        {
            return Err(format!("entry \"{}\" is listed twice", f.path));
        }
    }

    let mut paths = Vec::with_capacity(m.files.len());
    let mut links = Vec::new();
    for f in &m.files {
        check_entry(f, &kinds)?;
        let root = match f.tablespace {
            None => to,
            Some(oid) => &spaces[&oid],
        };
        let path = if f.tablespace.is_none() && f.path == PG_CONTROL {
            to.join(PG_CONTROL_PENDING)
        } else {
            root.join(&f.path)
        };
        if f.kind == FileType::Symlink {
            if let Some(oid) = tablespace_link(f).filter(|o| !spaces.contains_key(o)) {
                return Err(format!(
                    "link \"{}\" is for tablespace {oid}, which the backup does not list",
                    f.path
                ));
            }
            let target = match tablespace_link(f).and_then(|oid| spaces.get(&oid)) {
                Some(dest) => dest.clone(),
                None => match f.target.as_deref() {
                    Some(t) if !t.is_empty() && !t.contains('\0') => PathBuf::from(t),
                    _ => return Err(format!("link \"{}\" has no target", f.path)),
                },
            };
            links.push((path.clone(), target));
        }
        paths.push(path);
    }
    Ok(Places {
        to: to.to_owned(),
        spaces,
        paths: paths.into(),
        links,
    })
}

/// The tablespace OID of a data-directory entry `pg_tblspc/<oid>`.
fn tablespace_link(f: &ManifestFile) -> Option<u32> {
    if f.tablespace.is_some() {
        return None;
    }
    f.path.strip_prefix("pg_tblspc/")?.parse().ok()
}

/// One entry against the others: nothing beneath a link or a file, pitr's own names of the
/// kind pitr needs them to be.
fn check_entry(
    f: &ManifestFile,
    kinds: &HashMap<(Option<u32>, &str), FileType>,
) -> Result<(), String> {
    let mut parent = f.path.as_str();
    while let Some((up, _)) = parent.rsplit_once('/') {
        match kinds.get(&(f.tablespace, up)) {
            Some(FileType::Symlink) => {
                return Err(format!(
                    "entry \"{}\" lies beneath the link \"{up}\"",
                    f.path
                ))
            }
            Some(FileType::File) => {
                return Err(format!(
                    "entry \"{}\" lies beneath the file \"{up}\"",
                    f.path
                ))
            }
            _ => {}
        }
        parent = up;
    }
    if f.tablespace.is_none() {
        if FILES_ONLY.contains(&f.path.as_str()) && f.kind != FileType::File {
            return Err(format!("entry \"{}\" must be a regular file", f.path));
        }
        if f.path == INCOMPLETE_MARKER || f.path == PG_CONTROL_PENDING {
            return Err(format!("entry \"{}\" is a name pitr reserves", f.path));
        }
        if DIRS_ONLY.contains(&f.path.as_str()) && f.kind != FileType::Directory {
            return Err(format!("entry \"{}\" must be a directory", f.path));
        }
        // wal-fetch's spool lives in pg_wal/.pitr and is written after the links exist.
        if f.path == "pg_wal/.pitr" || f.path.starts_with("pg_wal/.pitr/") {
            return Err(format!("entry \"{}\" is a name pitr reserves", f.path));
        }
    }
    if f.kind == FileType::Symlink {
        check_link(f)?;
    }
    Ok(())
}

/// Names in the data directory that PostgreSQL (or pitr) writes to or beneath: a link
/// there would have the restored server, or pitr, write wherever it points.
fn postgres_writes(name: &str) -> bool {
    name.starts_with("pg_")
        || name.starts_with("postmaster.")
        || FILES_ONLY.contains(&name)
        || matches!(
            name,
            "base"
                | "global"
                | "PG_VERSION"
                | "current_logfiles"
                | "backup_label"
                | "tablespace_map"
                | "pitr-start.log"
        )
}

/// A link the backup holds: only `pg_tblspc/<oid>` (made to point at the tablespace's
/// destination by [`place`]) and links at the top of the data directory under names that
/// are not PostgreSQL's own (a `log` or `postgresql.conf` an administrator linked
/// elsewhere): nothing the restore or the restored server writes goes through one.
fn check_link(f: &ManifestFile) -> Result<(), String> {
    if f.tablespace.is_some() {
        return Err(format!(
            "entry \"{}\" is a link inside a tablespace",
            f.path
        ));
    }
    if tablespace_link(f).is_some() {
        return Ok(());
    }
    if f.path.contains('/') || postgres_writes(&f.path) {
        return Err(format!(
            "entry \"{}\" is a link where PostgreSQL or pitr writes",
            f.path
        ));
    }
    Ok(())
}

/// Makes the links of `places`, once every file is written.
pub fn make_links(places: &Places) -> io::Result<()> {
    for (path, target) in &places.links {
        if let Some(parent) = path.parent() {
            create_dirs_below(&places.to, parent)?;
        }
        std::os::unix::fs::symlink(target, path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("could not create link \"{}\": {e}", path.display()),
            )
        })?;
    }
    Ok(())
}

/// Creates `dir` and its missing parents, refusing to go through a link below `root` (a
/// directory pitr made for the restore). Outside `root` (a tablespace's destination), the
/// path is the operator's or the checked manifest's.
pub fn create_dirs_below(root: &Path, dir: &Path) -> io::Result<()> {
    if let Ok(rel) = dir.strip_prefix(root) {
        let mut at = root.to_owned();
        for c in rel.components() {
            at.push(c);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(io::Error::other(format!(
                        "\"{}\" is a link: pitr does not write through links",
                        at.display()
                    )))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&at).or_else(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })?
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    } else {
        std::fs::create_dir_all(dir)
    }
}

/// Where `restore --start` writes the server's log: `log/pitr-start.log`, or, when the
/// backup's `log` is a link (written through it, the log would land outside the restore),
/// `pitr-start.log` in the data directory itself.
pub fn start_log(to: &Path) -> PathBuf {
    let log = to.join("log");
    match std::fs::symlink_metadata(&log) {
        Ok(m) if m.file_type().is_symlink() => to.join("pitr-start.log"),
        _ => log.join("pitr-start.log"),
    }
}

/// Names of every entry of `m` (what [`place`] saw), for tests.
#[cfg(test)]
fn names(p: &Places) -> std::collections::HashSet<PathBuf> {
    p.paths.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use repo::manifest::{ChunkSpan, TablespaceEntry};

    fn entry(path: &str, kind: FileType, target: Option<&str>) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            tablespace: None,
            kind,
            mode: 0o700,
            size: 0,
            mtime: 0,
            target: target.map(str::to_owned),
            chunks: ChunkSpan::default(),
        }
    }

    fn manifest(files: Vec<ManifestFile>, spaces: Vec<(u32, &str)>) -> BackupManifest {
        let json = serde_json::json!({
            "format": 2, "id": "x", "label": "", "system_identifier": "1", "pg_version": 15,
            "server_version": "15", "timeline": 1, "start_lsn": "0/0", "stop_lsn": "0/0",
            "stop_timeline": 1, "start_time": "", "stop_time": "", "checkpoint": "fast",
            "wal": "archive", "chunk_size": 65536, "compression": "none", "size": 0,
            "stored_new": 0, "stored_total": 0, "packs": [],
            "chunk_table": {"count": 0, "per_piece": 65536, "pieces": []},
            "files": [], "created_by": "test",
        });
        let mut m: BackupManifest = serde_json::from_value(json).unwrap();
        m.files = files;
        m.tablespaces = spaces
            .into_iter()
            .map(|(oid, l)| TablespaceEntry {
                oid,
                location: l.into(),
            })
            .collect();
        m
    }

    fn refused(m: &BackupManifest) -> String {
        place(m, Path::new("/r/data"), &HashMap::new()).unwrap_err()
    }

    #[test]
    fn a_file_through_a_link_is_refused_naming_the_entry() {
        let m = manifest(
            vec![
                entry("evil", FileType::Symlink, Some("/etc")),
                entry("evil/pwned", FileType::File, None),
            ],
            vec![],
        );
        let e = refused(&m);
        assert!(
            e.contains("\"evil/pwned\" lies beneath the link \"evil\""),
            "{e}"
        );
        let m = manifest(
            vec![
                entry("f", FileType::File, None),
                entry("f/g/h", FileType::Directory, None),
            ],
            vec![],
        );
        assert!(refused(&m).contains("beneath the file \"f\""));
    }

    #[test]
    fn paths_that_leave_or_repeat_are_refused() {
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../x",
            "",
            "a//b",
            "./a",
            "a/.",
            "a/\0",
        ] {
            let m = manifest(vec![entry(bad, FileType::File, None)], vec![]);
            assert!(refused(&m).contains("not a plain relative path"), "{bad:?}");
        }
        let m = manifest(
            vec![
                entry("a", FileType::File, None),
                entry("a", FileType::Directory, None),
            ],
            vec![],
        );
        assert!(refused(&m).contains("listed twice"));
        let mut f = entry("x", FileType::File, None);
        f.tablespace = Some(7);
        assert!(refused(&manifest(vec![f], vec![])).contains("unknown tablespace 7"));
    }

    #[test]
    fn tablespace_locations_must_be_absolute_and_apart() {
        for (loc, why) in [
            ("rel/dir", "not a plain absolute path"),
            ("/a/../etc", "not a plain absolute path"),
            ("/r/data/base", "overlaps the restore directory"),
            ("/r", "overlaps the restore directory"),
        ] {
            let m = manifest(vec![], vec![(16384, loc)]);
            assert!(refused(&m).contains(why), "{loc}: {}", refused(&m));
        }
        let m = manifest(vec![], vec![(1, "/t/a"), (2, "/t/a/b")]);
        assert!(refused(&m).contains("would overlap"));
        // A map puts it elsewhere: what the manifest said does not matter then, but the
        // recorded location must still be sane.
        let m = manifest(vec![], vec![(1, "/r/data/x")]);
        let map = HashMap::from([(1, PathBuf::from("/t/one"))]);
        assert!(place(&m, Path::new("/r/data"), &map).is_ok());
    }

    #[test]
    fn links_point_where_the_restore_puts_things_and_come_last() {
        let mut outside = entry(".ssh/authorized_keys", FileType::File, None);
        outside.tablespace = Some(16384);
        let m = manifest(vec![outside], vec![(16384, "/root")]);
        let e = refused(&m);
        assert!(e.contains("outside its PG_15_* directory"), "{e}");
        let mut ts = entry("PG_15_1/1/100", FileType::File, None);
        ts.tablespace = Some(16384);
        let m = manifest(
            vec![
                entry("pg_tblspc", FileType::Directory, None),
                entry(
                    "pg_tblspc/16384",
                    FileType::Symlink,
                    Some("/somewhere/else"),
                ),
                entry("log", FileType::Symlink, Some("/var/log/postgresql")),
                ts,
                entry("global", FileType::Directory, None),
                entry("global/pg_control", FileType::File, None),
            ],
            vec![(16384, "/old/ts")],
        );
        let map = HashMap::from([(16384, PathBuf::from("/new/ts"))]);
        let p = place(&m, Path::new("/r/data"), &map).unwrap();
        assert_eq!(
            p.links,
            vec![
                (
                    PathBuf::from("/r/data/pg_tblspc/16384"),
                    PathBuf::from("/new/ts")
                ),
                (
                    PathBuf::from("/r/data/log"),
                    PathBuf::from("/var/log/postgresql")
                ),
            ]
        );
        let names = names(&p);
        assert!(names.contains(Path::new("/new/ts/PG_15_1/1/100")));
        assert!(names.contains(Path::new("/r/data/global/pg_control.pitr-restore")));
    }

    #[test]
    fn pitrs_own_names_keep_their_kinds() {
        for (path, kind) in [
            ("postgresql.auto.conf", FileType::Symlink),
            ("global/pg_control", FileType::Directory),
            ("pg_wal", FileType::Symlink),
            ("global", FileType::File),
            ("pg_wal/.pitr", FileType::Directory),
            ("pg_wal/x", FileType::Symlink),
            ("postmaster.opts", FileType::Symlink),
            ("base", FileType::Symlink),
            ("global/x", FileType::Symlink),
            ("log/pitr-start.log", FileType::Symlink),
            ("pg_tblspc/99", FileType::Symlink),
            (INCOMPLETE_MARKER, FileType::File),
        ] {
            let m = manifest(vec![entry(path, kind, Some("/etc/x"))], vec![]);
            assert!(
                place(&m, Path::new("/r/data"), &HashMap::new()).is_err(),
                "{path}"
            );
        }
    }

    #[test]
    fn directories_are_made_without_going_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir(&root).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("l")).unwrap();
        create_dirs_below(&root, &root.join("a/b")).unwrap();
        assert!(root.join("a/b").is_dir());
        let e = create_dirs_below(&root, &root.join("l/x")).unwrap_err();
        assert!(e.to_string().contains("is a link"), "{e}");
        assert!(!outside.join("x").exists());
        assert_eq!(start_log(&root), root.join("log/pitr-start.log"));
        std::os::unix::fs::symlink(&outside, root.join("log")).unwrap();
        assert_eq!(start_log(&root), root.join("pitr-start.log"));
    }
}
