//! `pitr restore` from a repository someone else wrote to: a backup's manifest or chunk
//! table rewritten by hand (as anyone with write access to the bucket could) is refused as
//! damage (exit 5) naming the entry, without a panic and without a byte written outside
//! `--to`; and a restore killed just before pg_control goes in place leaves a directory
//! PostgreSQL refuses to start, with its recovery settings already there.

use std::path::{Path, PathBuf};
use std::process::Output;

use repo::envelope::{self, EncodeOptions};
use testbed::{Cluster, ClusterOptions};

use crate::succeeds;

/// A file:// repository holding one backup (WAL included) of a small fresh cluster.
struct Backed {
    dir: tempfile::TempDir,
    url: String,
    id: String,
}

impl Backed {
    fn new() -> Backed {
        let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
        pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 50000) g")
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/r", dir.path().display());
        crate::init_repo(&url, &pg, None);
        let out = succeeds(crate::pitr().args([
            "backup",
            "--fast",
            "--wal",
            "--json",
            "--repo",
            &url,
            "--pg",
            &crate::socket(&pg),
        ]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let id = v["id"].as_str().unwrap().to_owned();
        Backed { dir, url, id }
    }

    fn object(&self, rel: &str) -> PathBuf {
        self.dir.path().join("r/backup").join(&self.id).join(rel)
    }

    /// Rewrites a stored object's plaintext, re-wrapped in a valid envelope (what a writer
    /// to the bucket can do); returns the new plaintext's blake3, hex.
    fn rewrite(&self, rel: &str, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) -> String {
        let path = self.object(rel);
        let (_, plain) = envelope::decode(&std::fs::read(&path).unwrap()).unwrap();
        let new = edit(plain.to_vec());
        let env = envelope::encode(&new, EncodeOptions::default());
        let hash = envelope::header(&env).unwrap().hash;
        std::fs::write(&path, &env).unwrap();
        hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn edit_manifest(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        self.rewrite("manifest", |plain| {
            let mut m: serde_json::Value = serde_json::from_slice(&plain).unwrap();
            edit(&mut m);
            serde_json::to_vec(&m).unwrap()
        });
    }

    fn restore(&self, to: &Path) -> Output {
        crate::pitr()
            .args(["restore", "--repo", &self.url, "--to"])
            .arg(to)
            .output()
            .unwrap()
    }
}

fn refused_as_damage(out: &Output, names: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains(names), "the error names {names}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("pitr: error")).count(),
        1,
        "{err}"
    );
}

/// A manifest entry for a link at `path` to `target`.
fn link_entry(path: &str, target: &str) -> serde_json::Value {
    serde_json::json!({
        "path": path, "type": "symlink", "mode": 0o777, "size": 0, "mtime": 0,
        "target": target,
    })
}

#[test]
fn a_symlink_escape_in_the_manifest_is_refused_and_nothing_is_written_outside() {
    let b = Backed::new();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().display().to_string();
    b.edit_manifest(|m| {
        let files = m["files"].as_array_mut().unwrap();
        files.push(link_entry("evil", &target));
        files.push(serde_json::json!({
            "path": "evil/pwned", "type": "file", "mode": 0o600, "size": 0, "mtime": 0,
        }));
    });
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = b.restore(&to);
    refused_as_damage(&out, "\"evil/pwned\" lies beneath the link \"evil\"");
    assert!(!outside.path().join("pwned").exists());
    assert!(
        !to.exists(),
        "the manifest is checked before anything is written"
    );
}

#[test]
fn a_link_the_backup_had_is_made_after_the_files_and_nothing_goes_through_it() {
    let b = Backed::new();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().display().to_string();
    b.edit_manifest(|m| {
        let files = m["files"].as_array_mut().unwrap();
        files.push(link_entry("log", &target));
        // A setuid bit asked for: never given (restoring as root, it would be root's), nor
        // more than PostgreSQL's own modes (0640 with group access).
        let version = files
            .iter_mut()
            .find(|f| f["path"] == "PG_VERSION")
            .unwrap();
        version["mode"] = (0o4755).into();
    });
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    succeeds(
        crate::pitr()
            .args(["restore", "--repo", &b.url, "--to"])
            .arg(&to),
    );
    assert_eq!(std::fs::read_link(to.join("log")).unwrap(), outside.path());
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing written through the link"
    );
    assert!(to.join("global/pg_control").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(to.join("PG_VERSION"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
}

#[test]
fn chunk_table_entries_sharing_a_place_are_each_checked() {
    let b = Backed::new();
    // One full chunk's entry is made to name another's place in a pack while keeping its
    // own hash and lengths: the chunk read there is checked against both entries.
    let piece = b.rewrite("chunks/000000", |mut t| {
        let plain = |e: &[u8]| u32::from_le_bytes(e[16..20].try_into().unwrap());
        let full: Vec<usize> = t
            .chunks_exact(52)
            .enumerate()
            .filter(|(_, e)| plain(e) == 65536)
            .map(|(i, _)| i)
            .collect();
        let (i, j) = (full[0] * 52, full[full.len() - 1] * 52);
        assert_ne!(t[i + 20..i + 52], t[j + 20..j + 52]);
        // pack, offset, stored length: the first 16 bytes of an entry.
        let place: Vec<u8> = t[i..i + 16].to_vec();
        t[j..j + 16].copy_from_slice(&place);
        t
    });
    b.edit_manifest(|m| m["chunk_table"]["pieces"][0] = piece.into());
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = b.restore(&to);
    refused_as_damage(&out, "checksum mismatch");
    assert!(!to.join("global/pg_control").exists());
}

#[test]
fn overflowing_counts_and_short_pack_ids_are_damage_not_a_panic() {
    let b = Backed::new();
    b.edit_manifest(|m| {
        let files = m["files"].as_array_mut().unwrap();
        let f = files.iter_mut().find(|f| f["chunks"].is_array()).unwrap();
        f["chunks"] = serde_json::json!([u64::MAX, 2]);
    });
    let dirs = tempfile::tempdir().unwrap();
    let out = b.restore(&dirs.path().join("a"));
    refused_as_damage(&out, "starts at chunk 18446744073709551615");

    let b = Backed::new();
    b.edit_manifest(|m| m["packs"][0] = "a".into());
    let out = b.restore(&dirs.path().join("b"));
    refused_as_damage(&out, "pack id \"a\" is not 64 hex digits");

    let b = Backed::new();
    b.edit_manifest(|m| m["chunk_table"]["count"] = (u64::MAX / 2).into());
    let out = b.restore(&dirs.path().join("c"));
    refused_as_damage(&out, "cannot be in 1 pieces");
}

#[test]
fn a_restore_killed_before_pg_control_is_in_place_is_not_startable() {
    let b = Backed::new();
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = crate::pitr()
        .args(["restore", "--repo", &b.url, "--to"])
        .arg(&to)
        .env("PITR_DEBUG_STOP", "before-pg-control")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The recovery settings are in place and on disk before pg_control goes in.
    let auto = std::fs::read_to_string(to.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("restore_command"), "{auto}");
    assert!(to.join("recovery.signal").exists());
    assert!(!to.join("global/pg_control").exists());
    assert!(to.join(restore::files::INCOMPLETE_MARKER).exists());
    let mut broken = Cluster::adopt(&to, ClusterOptions::default()).unwrap();
    assert!(
        broken.start().is_err(),
        "PostgreSQL started on an unfinished restore"
    );
}

/// Every regular file under `dir`, by relative path, with its bytes.
fn files_under(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                let rel = e.path().strip_prefix(dir).unwrap().to_owned();
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_chunk_table_in_many_pieces_restores_and_verifies_piece_by_piece() {
    // A backup's table re-cut into pieces of 97 entries (a real one has 65,536 a piece, so
    // only a database of over 4 GiB has two): restore and verify go through it a piece at a
    // time, files straddle piece ends, and the result is the one-piece backup's, exactly.
    let b = Backed::new();
    let dirs = tempfile::tempdir().unwrap();
    let whole = dirs.path().join("whole");
    succeeds(
        crate::pitr()
            .args(["restore", "--repo", &b.url, "--to"])
            .arg(&whole),
    );
    let table = {
        let (_, plain) =
            envelope::decode(&std::fs::read(b.object("chunks/000000")).unwrap()).unwrap();
        plain.to_vec()
    };
    let mut pieces: Vec<&[u8]> = Vec::new();
    // One entry a piece puts every file's end (and every file without chunks, and every
    // directory) at a piece's end; 97 a piece, most files straddle one.
    for per in [1, 97] {
        pieces = table.chunks(per * 52).collect();
        assert!(pieces.len() >= 5, "{} entries", table.len() / 52);
        let mut names = Vec::new();
        for (n, piece) in pieces.iter().enumerate() {
            let env = envelope::encode(piece, EncodeOptions::default());
            let hash = envelope::header(&env).unwrap().hash;
            std::fs::write(b.object(&format!("chunks/{n:06}")), &env).unwrap();
            names.push(hash.iter().map(|b| format!("{b:02x}")).collect::<String>());
        }
        b.edit_manifest(|m| {
            m["chunk_table"]["per_piece"] = per.into();
            m["chunk_table"]["pieces"] = names.clone().into();
        });
        let cut = dirs.path().join(format!("cut{per}"));
        succeeds(
            crate::pitr()
                .args(["restore", "--repo", &b.url, "--to"])
                .arg(&cut),
        );
        let (mut a, mut c) = (files_under(&whole), files_under(&cut));
        // The recovery settings name the directory restored into.
        let auto = PathBuf::from("postgresql.auto.conf");
        assert!(a.remove(&auto).is_some() && c.remove(&auto).is_some());
        assert_eq!(a.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>());
        for (path, bytes) in &a {
            assert!(
                &c[path] == bytes,
                "{} differs ({per} a piece)",
                path.display()
            );
        }
        // verify compares every file with PostgreSQL's backup_manifest: CRCs carried over
        // the piece ends.
        let out =
            succeeds(crate::pitr().args(["verify", "--backups-only", "--json", "--repo", &b.url]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let backup = &v["backups"][0];
        assert_eq!(backup["files_ok"], true, "{per} a piece: {v}");
        assert!(backup["matched_pg_manifest"].as_u64().unwrap() > 500, "{v}");
    }

    // An entry of a later piece made one byte longer: refused as damage naming the file,
    // before anything is written; and verify calls the backup damaged.
    let len = |e: &[u8]| u32::from_le_bytes(e[16..20].try_into().unwrap());
    let last = (1..pieces.len())
        .rev()
        .find(|&n| pieces[n].chunks_exact(52).any(|e| len(e) < 65536))
        .unwrap();
    let name = b.rewrite(&format!("chunks/{last:06}"), |mut t| {
        let at = t.chunks_exact(52).position(|e| len(e) < 65536).unwrap() * 52;
        let longer = len(&t[at..]) + 1;
        t[at + 16..at + 20].copy_from_slice(&longer.to_le_bytes());
        t
    });
    b.edit_manifest(|m| m["chunk_table"]["pieces"][last] = name.into());
    let bad = dirs.path().join("bad");
    let out = b.restore(&bad);
    refused_as_damage(&out, "bytes of chunks for size");
    assert!(
        !bad.exists(),
        "the table is checked before anything is written"
    );
    let out = crate::pitr()
        .args(["verify", "--backups-only", "--repo", &b.url])
        .output()
        .unwrap();
    let err =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("bytes of chunks for size"), "{err}");
}
