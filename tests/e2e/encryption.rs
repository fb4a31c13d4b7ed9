//! Encrypted repositories end to end: `pitr init --encrypt` with several key slots, a
//! cluster archiving and backed up into the bed's S3 server, and what a reader of the
//! bucket sees (none of the table's contents, file names or WAL); restores with each kind
//! of key, rotation (`pitr key add`, `pitr key remove`), wrong and missing keys (exit 11,
//! nothing written; wal-fetch above 125), and objects moved, flipped or re-sealed under
//! another key (exit 5, never a silent restore).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use repo::crypto::{DataKey, Keys};
use repo::envelope::{self, EncodeOptions, Protection};
use testbed::{Cluster, ClusterOptions, S3Server};

use crate::succeeds;

const MARKER: &str = "pitr-marker-c0ffee-5ecret";
const PASSPHRASE: &str = "a long test passphrase, not a real one";

/// A file of 32 random bytes.
fn key_file(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, repo::crypto::random::<32>()).unwrap();
    p
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn is_empty_or_absent(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// 16-byte runs of a WAL segment's pages that hold something (the first page's header and
/// long header, and record data further in).
fn wal_runs(segment: &[u8]) -> Vec<Vec<u8>> {
    [0usize, 24, 40, 8192 + 64, 3 * 8192 + 200, 7 * 8192 + 1000]
        .iter()
        .map(|&o| segment[o..o + 16].to_vec())
        .filter(|r| r.iter().filter(|b| **b != 0).count() >= 4)
        .collect()
}

fn batches(pg: &Cluster) -> String {
    pg.sql("SELECT string_agg(DISTINCT batch::text, ',' ORDER BY batch::text) FROM t")
        .unwrap()
}

#[test]
fn an_encrypted_repository_shows_nothing_and_restores_with_each_kind_of_key() {
    let s3 = S3Server::start().unwrap();
    let url = s3.repo_url("enc");
    // KMS on moto's server, reached with the S3 server's credentials (moto takes any).
    let kms = testbed::kms::KmsServer::start().unwrap();
    let kms_key = kms.create_key().unwrap();
    let kms_endpoint = kms.endpoint();
    let keys = tempfile::tempdir().unwrap();
    let a = key_file(keys.path(), "a");
    // What a secrets manager's CLI prints: text (hex), one line.
    let b = keys.path().join("b");
    let text: String = repo::crypto::random::<32>()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    std::fs::write(&b, format!("{text}\n")).unwrap();
    let wrong = key_file(keys.path(), "wrong");
    let d = key_file(keys.path(), "d");
    let command = format!("cat '{}'", b.display());

    let options = ClusterOptions::default()
        .wal_segment_size_mb(1)
        .env("PITR_KEY_FILE", a.display().to_string());
    let mut pg = Cluster::init(crate::s3_server_env(options, &s3, &url)).unwrap();
    pg.os_user().give_tree(keys.path()).unwrap();
    let pitr = |key: &[(&str, &str)]| {
        let mut c = crate::pitr();
        c.envs(s3.env()).env("AWS_ENDPOINT_URL_KMS", &kms_endpoint);
        for (k, v) in key {
            c.env(k, v);
        }
        c
    };
    let by_a = [("PITR_KEY_FILE", a.to_str().unwrap())];

    // Four slots at once: a key file, a key command, a passphrase, a KMS key.
    let out = succeeds(
        pitr(&[("TEST_PASSPHRASE", PASSPHRASE)])
            .args(["init", "--json", "--encrypt", "--repo", &url, "--key-file"])
            .arg(&a)
            .args([
                "--key-command",
                &command,
                "--passphrase-env",
                "TEST_PASSPHRASE",
                "--kms-key-id",
                &kms_key,
            ])
            .arg("--data-dir")
            .arg(pg.data_dir()),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["encryption"], "aes-256-gcm-subkey");
    assert_eq!(v["key_slots"], 4);

    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    pg.set_config(
        "archive_command",
        &format!("'{}' wal-push %p", bin.display()),
    )
    .unwrap();
    pg.start().unwrap();
    pg.sql(&format!(
        "CREATE TABLE t AS SELECT 0 AS batch, g, '{MARKER}' AS note FROM generate_series(1, 2000) g"
    ))
    .unwrap();
    succeeds(pitr(&by_a).args([
        "backup",
        "--fast",
        "--repo",
        &url,
        "--pg",
        &crate::socket(&pg),
    ]));
    pg.sql(&format!(
        "INSERT INTO t SELECT 1, g, '{MARKER}' FROM generate_series(1, 100) g"
    ))
    .unwrap();
    let seg = pg.switch_wal().unwrap();
    pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();

    // What the bucket holds says nothing of the contents, the files or the WAL.
    let segment = std::fs::read(pg.data_dir().join("pg_wal").join(&seg)).unwrap();
    let runs = wal_runs(&segment);
    assert!(runs.len() >= 3);
    let stored = files(s3.storage_dir().expect("the bed's own S3 server"));
    assert!(stored.len() > 10, "{stored:?}");
    for f in &stored {
        let bytes = std::fs::read(f).unwrap();
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!has(MARKER.as_bytes()), "{} holds the marker", f.display());
        assert!(!has(b"PG_VERSION"), "{} names PG_VERSION", f.display());
        for r in &runs {
            assert!(!has(r), "{} holds WAL bytes {r:02x?}", f.display());
        }
    }

    // The slots are listed without a key, and without key material.
    let out = succeeds(pitr(&[]).args(["key", "list", "--json", "--repo", &url]));
    let slots: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = slots
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["file", "command", "passphrase", "kms"]);
    assert_eq!(slots[3]["kms_key_id"], kms_key.as_str());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("wrapped"));
    let slot_a = slots[0]["id"].as_str().unwrap().to_owned();

    let dirs = tempfile::tempdir().unwrap();
    // The binary the restored servers' restore_command will name: one they can run.
    let restore = |to: &Path, key: &[(&str, &str)]| -> Output {
        let mut c = std::process::Command::new(&bin);
        c.envs(s3.env())
            .env("AWS_ENDPOINT_URL_KMS", &kms_endpoint)
            .envs(key.iter().copied());
        c.args(["restore", "--repo", &url, "--to"])
            .arg(to)
            .output()
            .unwrap()
    };
    // Each kind of key restores, and the restored server's restore_command fetches WAL
    // with the same key source.
    // (KMS: no key setting at all, the slot names its key.)
    let kinds: [(&str, Vec<(&str, &str)>); 5] = [
        ("file", by_a.to_vec()),
        ("command", vec![("PITR_KEY_COMMAND", command.as_str())]),
        ("passphrase", vec![("PITR_PASSPHRASE", PASSPHRASE)]),
        ("kms", vec![]),
        ("kms-pinned", vec![("PITR_KEY_KMS", kms_key.as_str())]),
    ];
    for (kind, key) in &kinds {
        let to = dirs.path().join(kind);
        let out = restore(&to, key);
        assert!(out.status.success(), "{kind}: {}", stderr(&out));
        let mut options = crate::s3_server_env(
            ClusterOptions::default().setting("archive_mode", "off"),
            &s3,
            &url,
        );
        if *kind == "passphrase" {
            options = options.env("PITR_PASSPHRASE", PASSPHRASE);
        }
        let mut restored = Cluster::adopt(&to, options).unwrap();
        restored.start().unwrap();
        crate::wait_promoted(&restored);
        assert_eq!(batches(&restored), "0,1", "{kind}");
        assert_eq!(
            restored
                .sql(&format!("SELECT count(*) FROM t WHERE note = '{MARKER}'"))
                .unwrap(),
            "2100"
        );
    }

    // verify reads the encrypted repository whole, as a restore does.
    let out = succeeds(pitr(&by_a).args(["verify", "--json", "--repo", &url]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backups"][0]["files_ok"], true, "{v}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");

    // A wrong or missing key: exit 11 with a HINT, nothing written.
    let to = dirs.path().join("wrong");
    let out = restore(&to, &[("PITR_KEY_FILE", wrong.to_str().unwrap())]);
    assert_eq!(code(&out), Some(11), "{}", stderr(&out));
    assert!(stderr(&out).contains("no key slot"), "{}", stderr(&out));
    assert!(stderr(&out).contains("HINT"), "{}", stderr(&out));
    assert!(is_empty_or_absent(&to));
    // No key set and KMS unreachable: the KMS slot cannot open, and says why.
    let out = restore(&to, &[("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:9")]);
    assert_eq!(code(&out), Some(11), "{}", stderr(&out));
    assert!(stderr(&out).contains("KMS"), "{}", stderr(&out));
    assert!(is_empty_or_absent(&to));
    // A KMS key named (pinned) that no slot has: refused, although a KMS slot exists.
    let out = restore(
        &to,
        &[(
            "PITR_KEY_KMS",
            "arn:aws:kms:us-east-1:000000000000:key/other",
        )],
    );
    assert_eq!(code(&out), Some(11), "{}", stderr(&out));
    assert!(stderr(&out).contains("no key slot"), "{}", stderr(&out));
    assert!(is_empty_or_absent(&to));
    // wal-fetch with a wrong key: above 125, never "not found".
    let dest = dirs.path().join("fetched");
    let out = pitr(&[("PITR_KEY_FILE", wrong.to_str().unwrap())])
        .args(["wal-fetch", "--prefetch", "0", "--repo", &url, &seg])
        .arg(&dest)
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(200), "{}", stderr(&out));
    assert!(!dest.exists());

    // Rotation: the new key's slot added with the old key, the old slot removed with the
    // new key. The old key is refused, the new one restores.
    succeeds(
        pitr(&by_a)
            .args(["key", "add", "--repo", &url, "--new-key-file"])
            .arg(&d),
    );
    let by_d = [("PITR_KEY_FILE", d.to_str().unwrap())];
    succeeds(pitr(&by_d).args(["key", "remove", "--repo", &url, &slot_a]));
    let out = pitr(&by_d)
        .args(["key", "remove", "--repo", &url, &slot_a])
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(11), "{}", stderr(&out));
    let to = dirs.path().join("old-key");
    let out = restore(&to, &by_a);
    assert_eq!(code(&out), Some(11), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no key slot") || stderr(&out).contains("was removed"),
        "{}",
        stderr(&out)
    );
    assert!(is_empty_or_absent(&to));
    let to = dirs.path().join("new-key");
    let out = restore(&to, &by_d);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(to.join("PG_VERSION").is_file());
    let out = succeeds(pitr(&[]).args(["key", "list", "--json", "--repo", &url]));
    let slots: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(slots.as_array().unwrap().len(), 4);
    assert!(slots
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["id"] != slot_a.as_str()));
}

/// A cluster backed up (WAL included) into an encrypted repository on the bed's S3 server,
/// whose objects the test moves, flips and re-seals through the S3 API, as anyone who can
/// write to the bucket could.
struct Sealed {
    _pg: Cluster,
    s3: S3Server,
    storage: std::sync::Arc<dyn repo::storage::Storage>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    url: String,
    key: PathBuf,
    id: String,
}

impl Sealed {
    fn new() -> Sealed {
        let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
        pg.start().unwrap();
        pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 50000) g")
            .unwrap();
        let s3 = S3Server::start().unwrap();
        let url = s3.repo_url("sealed");
        let storage = crate::bed_s3_storage(&s3, &format!("{}/sealed", s3.prefix()));
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "key");
        succeeds(
            crate::pitr()
                .envs(s3.env())
                .args(["init", "--encrypt", "--repo", &url, "--key-file"])
                .arg(&key)
                .arg("--data-dir")
                .arg(pg.data_dir()),
        );
        let out = succeeds(
            crate::pitr()
                .envs(s3.env())
                .env("PITR_KEY_FILE", &key)
                .args([
                    "backup",
                    "--fast",
                    "--wal",
                    "--json",
                    "--repo",
                    &url,
                    "--pg",
                    &crate::socket(&pg),
                ]),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let id = v["id"].as_str().unwrap().to_owned();
        Sealed {
            _pg: pg,
            s3,
            storage,
            rt: tokio::runtime::Runtime::new().unwrap(),
            _dir: dir,
            url,
            key,
            id,
        }
    }

    fn get(&self, key: &str) -> Vec<u8> {
        self.rt
            .block_on(repo::storage::get_bytes(self.storage.as_ref(), key))
            .unwrap()
            .to_vec()
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        self.rt
            .block_on(
                self.storage
                    .put(key, bytes.into(), repo::storage::PutMode::Overwrite),
            )
            .unwrap();
    }

    fn restore(&self) -> (tempfile::TempDir, PathBuf, Output) {
        let dirs = tempfile::tempdir().unwrap();
        let to = dirs.path().join("r");
        let out = crate::pitr()
            .envs(self.s3.env())
            .env("PITR_KEY_FILE", &self.key)
            .args(["restore", "--repo", &self.url, "--to"])
            .arg(&to)
            .output()
            .unwrap();
        (dirs, to, out)
    }

    /// Stores what `damage` makes of the object at `key` in its place, expects the restore
    /// to fail with exit 5 and a message holding `says`, then puts the object back.
    fn refused(&self, key: &str, says: &str, damage: impl FnOnce(Vec<u8>) -> Vec<u8>) {
        let kept = self.get(key);
        self.put(key, damage(kept.clone()));
        let (_dirs, to, out) = self.restore();
        assert_eq!(code(&out), Some(5), "{key}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{key}: {}", stderr(&out));
        assert!(!to.join("global/pg_control").exists());
        self.put(key, kept);
    }
}

#[test]
fn moved_flipped_and_resealed_objects_of_an_encrypted_repository_are_refused() {
    let s = Sealed::new();
    let manifest = format!("backup/{}/manifest", s.id);
    let piece = format!("backup/{}/chunks/000000", s.id);

    // Another object's bytes under the manifest's name.
    let other = s.get(&piece);
    s.refused(&manifest, "authentication failed", |_| other);

    // A flipped byte in a pack.
    let pack =
        s.rt.block_on(repo::storage::list_all(s.storage.as_ref(), "pack/"))
            .unwrap()
            .remove(0)
            .key;
    s.refused(&pack, "corrupt", |mut bytes| {
        let mid = bytes.len() / 3;
        bytes[mid] ^= 0x40;
        bytes
    });

    // The manifest's plaintext edited and sealed again under a key of the attacker's.
    let repo =
        s.rt.block_on(repo::repository::Repository::open_on(
            s.url.parse().unwrap(),
            s.storage.clone(),
            &repo::slots::KeySetting::File(s.key.clone()),
            None,
            std::sync::Arc::new(repo::codec::Codec::new(1, 2)),
        ))
        .unwrap();
    let (_, plain) = s.rt.block_on(repo.objects().get(&manifest)).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&plain).unwrap();
    m["label"] = "forged".into();
    let edited = serde_json::to_string(&m).unwrap();
    let theirs = Protection::Encrypted(std::sync::Arc::new(Keys::new(&DataKey::generate())));
    let forged = envelope::encode_as(
        edited.as_bytes(),
        EncodeOptions::default(),
        &theirs,
        &manifest,
    );
    s.refused(&manifest, "authentication failed", |_| forged.to_vec());
    // A plaintext manifest in its place: refused too (no downgrade).
    let plain_env = envelope::encode(edited.as_bytes(), EncodeOptions::default());
    s.refused(&manifest, "encryption is none", |_| plain_env.to_vec());

    // And untouched, it restores.
    let (_dirs, to, out) = s.restore();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(to.join("global/pg_control").is_file());
}

#[test]
fn init_takes_its_key_sources_from_flags_first_and_refuses_keys_without_encrypt() {
    let pg = Cluster::init(ClusterOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key");
    let init = |name: &str, args: &[&str], env: &[(&str, &str)]| {
        let url = format!("file://{}/{name}", dir.path().display());
        let out = crate::pitr()
            .args(["init", "--json", "--repo", &url, "--data-dir"])
            .arg(pg.data_dir())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (url, out)
    };
    // --encrypt with no key source anywhere.
    let (_, out) = init("none", &["--encrypt"], &[]);
    assert_eq!(code(&out), Some(11), "{}", stderr(&out));
    assert!(stderr(&out).contains("HINT"), "{}", stderr(&out));
    // A key set without --encrypt: a plaintext repository with a key is refused.
    let (_, out) = init("plain", &[], &[("PITR_KEY_FILE", key.to_str().unwrap())]);
    assert_eq!(code(&out), Some(11), "{}", stderr(&out));
    // A source named on the command line: the environment's is not also made a slot.
    let (url, out) = init(
        "named",
        &["--encrypt", "--passphrase-env", "P"],
        &[("P", PASSPHRASE), ("PITR_KEY_FILE", key.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = succeeds(crate::pitr().args(["key", "list", "--json", "--repo", &url]));
    let slots: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(slots.as_array().unwrap().len(), 1);
    assert_eq!(slots[0]["kind"], "passphrase");
    // None named: the one key setting every command reads.
    let (url, out) = init(
        "from-env",
        &["--encrypt"],
        &[("PITR_KEY_FILE", key.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = succeeds(crate::pitr().args(["key", "list", "--json", "--repo", &url]));
    let slots: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(slots[0]["kind"], "file");
    // A plaintext repository has no slots to list, and no key opens it.
    let (url, out) = init("plaintext", &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = succeeds(crate::pitr().args(["key", "list", "--json", "--repo", &url]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let out = crate::pitr()
        .env("PITR_KEY_FILE", &key)
        .args(["info", "--repo", &url])
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(11), "{}", stderr(&out));
    assert!(stderr(&out).contains("not encrypted"), "{}", stderr(&out));
}
