//! `pitr copy` end to end between two instances of the bed's S3 server, each named by a
//! repository URL carrying its own endpoint (and, for the copy, an AWS profile whose name
//! needs a `%` escape): a cluster archives into A and is backed up; the copy in B restores to
//! exact rows after A's server is gone, its restore_command reading B through a URL with `&`
//! and `%` in it. A second copy copies nothing again; damage in A is not copied, an object in
//! B that differs is not overwritten; an encrypted repository's copy is the same ciphertext.

use std::path::Path;
use std::time::Duration;

use testbed::{Cluster, ClusterOptions, S3Server, StopMode};

use crate::{json, succeeds, Reaped};

/// A repository URL on `s3` that names its endpoint itself, and the environment's other
/// settings (credentials, region) without an endpoint.
fn own_url(s3: &S3Server, name: &str, extra: &str) -> String {
    format!(
        "s3://{}/{}/{name}?endpoint={}&path-style=true{extra}",
        s3.bucket(),
        s3.prefix(),
        s3.endpoint()
    )
}

/// Makes the repository at `url` for `pg` (with `pitr`, a command set up for its server)
/// and starts `pg` archiving into it with wal-push (the repository in its PITR_REPO);
/// returns the binary its archive_command and restore_command run.
fn archive_into(
    pg: &mut Cluster,
    url: &str,
    mut pitr: std::process::Command,
) -> std::path::PathBuf {
    succeeds(
        pitr.args(["init", "--repo", url, "--data-dir"])
            .arg(pg.data_dir()),
    );
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    pg.set_config(
        "archive_command",
        &format!("'{}' wal-push %p", bin.display()),
    )
    .unwrap();
    pg.start().unwrap();
    bin
}

/// Every object under a server's prefix, with its bytes, as stored.
fn stored(s3: &S3Server, name: &str) -> Vec<(String, Vec<u8>)> {
    let storage = crate::bed_s3_storage(s3, &format!("{}/{name}", s3.prefix()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let all = rt
        .block_on(repo::storage::list_all(storage.as_ref(), ""))
        .unwrap();
    all.into_iter()
        .filter(|o| !o.key.starts_with("running/"))
        .map(|o| {
            let b = rt
                .block_on(repo::storage::get_bytes(storage.as_ref(), &o.key))
                .unwrap();
            (o.key, b.to_vec())
        })
        .collect()
}

fn put(s3: &S3Server, name: &str, key: &str, bytes: Vec<u8>) {
    let storage = crate::bed_s3_storage(s3, &format!("{}/{name}", s3.prefix()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(storage.put(key, bytes.into(), repo::storage::PutMode::Overwrite))
        .unwrap();
}

#[test]
fn a_copy_in_another_store_restores_when_the_first_is_gone() {
    let mut a = S3Server::start_local().unwrap();
    let b = S3Server::start_local().unwrap();
    // The copy's server is reached with a profile of its own (named with a `+`, which its
    // URL escapes as %2B), in files the server's user can read.
    let url_a = own_url(&a, "a", "");
    let url_b = own_url(&b, "b", "&profile=pitr%2Bcopy");
    let mut options = ClusterOptions::default()
        .wal_segment_size_mb(1)
        .setting("track_commit_timestamp", "on")
        .env("PITR_REPO", &url_a);
    for (k, v) in S3Server::static_env() {
        options = options.env(k, v);
    }
    let mut pg = Cluster::init(options).unwrap();
    let aws = pg.server_dir("aws").unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[pitr+copy]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            b.access_key(),
            b.secret_key()
        ),
    )
    .unwrap();
    std::fs::write(
        aws.join("config"),
        "[profile pitr+copy]\nregion = us-east-1\n",
    )
    .unwrap();
    pg.os_user().give_tree(&aws).unwrap();
    let aws_env = [
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            aws.join("credentials").display().to_string(),
        ),
        ("AWS_CONFIG_FILE", aws.join("config").display().to_string()),
    ];
    let pitr = || {
        let mut c = crate::pitr();
        c.envs(S3Server::static_env()).envs(aws_env.clone());
        c
    };
    let bin = archive_into(&mut pg, &url_a, pitr());
    pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    let commit = |k: u32| {
        pg.sql(&format!(
            "INSERT INTO t SELECT {k}, g FROM generate_series(1, 100) g"
        ))
        .unwrap();
        pg.sql(&format!(
            "SELECT to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00' FROM t WHERE batch = {k} LIMIT 1"
        ))
        .unwrap()
    };
    commit(1);
    succeeds(pitr().args([
        "backup",
        "--fast",
        "--repo",
        &url_a,
        "--pg",
        &crate::socket(&pg),
    ]));
    commit(2);
    let target = commit(3);
    commit(4);
    let seg = pg.switch_wal().unwrap();
    pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();

    let copy = || {
        pitr()
            .args(["copy", "--json", "--repo", &url_a, "--to", &url_b])
            .output()
            .unwrap()
    };
    // Killed after 7 objects (one at a time), then run again: it continues, and copies
    // each object once.
    let out = pitr()
        .args(["copy", "--parallel", "1", "--repo", &url_a, "--to", &url_b])
        .env("PITR_DEBUG_COPY_STOP", "7")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "not killed");
    let out = copy();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["initialized"], false, "{v}");
    assert_eq!(v["backups"], 1, "{v}");
    let rest = v["objects"].as_u64().unwrap();
    assert!(rest > 0, "{v}");
    assert_eq!(rest + 7, stored(&a, "a").len() as u64, "{v}");
    // Again: nothing is copied twice.
    let v = json(&copy());
    assert_eq!(v["objects"], 0, "{v}");
    assert_eq!(v["initialized"], false, "{v}");
    // What B holds is what A holds, byte for byte (markers aside).
    assert_eq!(stored(&a, "a"), stored(&b, "b"));

    // Damage in A is not copied; an object in B that differs is not overwritten.
    let seg = pg.switch_wal().unwrap();
    pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
    let key = repo::keys::wal_key(&seg).unwrap();
    let (_, good) = stored(&a, "a")
        .into_iter()
        .find(|(k, _)| *k == key)
        .unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    put(&a, "a", &key, bad);
    let out = copy();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert!(v["problems"][0].as_str().unwrap().contains(&key), "{v}");
    assert!(!stored(&b, "b").iter().any(|(k, _)| *k == key));
    put(&a, "a", &key, good.clone());
    let mut other = good.clone();
    other.push(0);
    put(&b, "b", &key, other.clone());
    let out = copy();
    assert_eq!(out.status.code(), Some(5));
    assert!(json(&out)["problems"][0]
        .as_str()
        .unwrap()
        .contains("differs"));
    let theirs = stored(&b, "b")
        .into_iter()
        .find(|(k, _)| *k == key)
        .unwrap()
        .1;
    assert_eq!(theirs, other, "overwritten");
    put(&b, "b", &key, good);
    succeeds(&mut copy_cmd(&pitr, &url_a, &url_b));

    // A's server is gone: the copy restores to the target, its restore_command reading B.
    pg.stop(StopMode::Immediate).unwrap();
    a.stop().unwrap();
    succeeds(pitr().args(["verify", "--repo", &url_b]));
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = std::process::Command::new(&bin)
        .envs(S3Server::static_env())
        .envs(aws_env.clone())
        .args([
            "restore",
            "--repo",
            &url_b,
            "--target-time",
            &target,
            "--target-action",
            "promote",
            "--to",
        ])
        .arg(&to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = std::fs::read_to_string(to.join("postgresql.auto.conf")).unwrap();
    assert!(conf.contains("%%2B"), "{conf}");
    let mut options = ClusterOptions::default().setting("archive_mode", "off");
    for (k, v) in S3Server::static_env()
        .into_iter()
        .chain(aws_env.iter().map(|(k, v)| (k.to_string(), v.clone())))
    {
        options = options.env(k, v);
    }
    let mut restored = Cluster::adopt(&to, options).unwrap();
    restored.start().unwrap();
    crate::wait_promoted(&restored);
    assert_eq!(
        restored
            .sql("SELECT string_agg(DISTINCT batch::text, ',' ORDER BY batch::text) FROM t")
            .unwrap(),
        "1,2,3"
    );
    assert!(
        restored.server_log().contains("restored log file"),
        "{}",
        restored.server_log()
    );
}

fn copy_cmd(
    pitr: &dyn Fn() -> std::process::Command,
    from: &str,
    to: &str,
) -> std::process::Command {
    let mut c = pitr();
    c.args(["copy", "--repo", from, "--to", to]);
    c
}

#[test]
fn an_encrypted_repository_is_copied_as_ciphertext_and_opens_with_the_same_key() {
    // One server, one identity: the server copies the objects itself.
    let a = S3Server::start_local().unwrap();
    let b = &a;
    let url_a = own_url(&a, "a", "");
    let url_b = own_url(b, "b", "");
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let keys = pg.server_dir("keys").unwrap();
    let key = keys.join("k");
    std::fs::write(&key, repo::crypto::random::<32>()).unwrap();
    let key_arg = key.display().to_string();
    let pitr = || {
        let mut c = crate::pitr();
        c.envs(S3Server::static_env())
            .env("PITR_KEY_FILE", &key_arg);
        c
    };
    succeeds(
        pitr()
            .args(["init", "--encrypt", "--repo", &url_a, "--data-dir"])
            .arg(pg.data_dir()),
    );
    pg.os_user().give_tree(&keys).unwrap();
    pg.start().unwrap();
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g")
        .unwrap();
    succeeds(pitr().args([
        "backup",
        "--fast",
        "--wal",
        "--repo",
        &url_a,
        "--pg",
        &crate::socket(&pg),
    ]));
    let copies = a.copies();
    let report = json(&succeeds(
        pitr().args(["copy", "--json", "--repo", &url_a, "--to", &url_b]),
    ));
    let (ours, theirs) = (stored(&a, "a"), stored(b, "b"));
    assert!(ours.len() > 5);
    assert_eq!(ours, theirs, "not the same ciphertext");
    assert_eq!(report["server_side"], report["objects"], "{report}");
    assert_eq!(a.copies() - copies, report["objects"].as_u64().unwrap());
    // The copy opens with the same key, and not without one.
    succeeds(pitr().args(["verify", "--backups-only", "--repo", &url_b]));
    let out = crate::pitr()
        .envs(S3Server::static_env())
        .args(["verify", "--repo", &url_b])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(11));
    // A target inside the source, or the source under other settings, is refused.
    for nested in [
        own_url(&a, "a/copy", ""),
        format!("{url_a}&region=us-east-1"),
    ] {
        let out = pitr()
            .args(["copy", "--repo", &url_a, "--to", &nested])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{nested}");
    }
    // A target holding another repository is refused.
    let other = own_url(b, "other", "");
    let mut pg2 = Cluster::init(ClusterOptions::default()).unwrap();
    succeeds(
        crate::pitr()
            .envs(S3Server::static_env())
            .args(["init", "--repo", &other, "--data-dir"])
            .arg(pg2.data_dir()),
    );
    let out = pitr()
        .args(["copy", "--repo", &url_a, "--to", &other])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another repository"));
    let _ = pg2.stop(StopMode::Fast);
}

#[test]
fn copy_follow_keeps_up_and_a_restart_copies_nothing_twice() {
    let a = S3Server::start_local().unwrap();
    let b = S3Server::start_local().unwrap();
    let url_a = own_url(&a, "a", "");
    let url_b = own_url(&b, "b", "");
    let mut options = ClusterOptions::default()
        .wal_segment_size_mb(1)
        .env("PITR_REPO", &url_a);
    for (k, v) in S3Server::static_env() {
        options = options.env(k, v);
    }
    let mut pg = Cluster::init(options).unwrap();
    let pitr = || {
        let mut c = crate::pitr();
        c.envs(S3Server::static_env());
        c
    };
    archive_into(&mut pg, &url_a, pitr());
    pg.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    succeeds(pitr().args([
        "backup",
        "--fast",
        "--repo",
        &url_a,
        "--pg",
        &crate::socket(&pg),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let follow = |log: &str| {
        Reaped(Some(
            pitr()
                .args([
                    "copy",
                    "--follow",
                    "--interval",
                    "1s",
                    "--json",
                    "--repo",
                    &url_a,
                    "--to",
                    &url_b,
                ])
                // A small window, so that most passes list only the newest WAL.
                .env("PITR_DEBUG_COPY_WINDOW", "12")
                .stdout(std::fs::File::create(dir.path().join(log)).unwrap())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ))
    };
    let mut first = follow("first.log");
    // Load while it follows; it is killed midway and started again.
    let load = std::thread::scope(|s| {
        let load = s.spawn(|| pg.pgbench(&["-n", "-c", "2", "-T", "6"]).unwrap());
        std::thread::sleep(Duration::from_secs(3));
        assert!(first.signal("-KILL").code().is_none());
        let second = follow("second.log");
        load.join().unwrap();
        second
    });
    let mut second = load;
    // The newest segment reaches the copy within a few passes.
    let seg = pg.switch_wal().unwrap();
    pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
    let key = repo::keys::wal_key(&seg).unwrap();
    let archived = std::time::Instant::now();
    let keys_b = || -> Vec<String> { stored(&b, "b").into_iter().map(|(k, _)| k).collect() };
    while !keys_b().contains(&key) {
        assert!(
            archived.elapsed() < Duration::from_secs(30),
            "{seg} not in the copy after 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "the copy had segment {seg} {:.1} s after it was archived",
        archived.elapsed().as_secs_f64()
    );
    // Let a pass end with nothing to do, then SIGTERM: it exits 0.
    std::thread::sleep(Duration::from_secs(2));
    assert!(second.signal("-TERM").success());
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["problems"].as_array().unwrap().len(), 0, "{last}");
    // Everything A holds is in B, and each object was written to B once.
    let ours: Vec<String> = stored(&a, "a").into_iter().map(|(k, _)| k).collect();
    let theirs = keys_b();
    for k in &ours {
        assert!(theirs.contains(k), "{k} not copied");
    }
    assert_eq!(b.writes(), theirs.len() as u64, "an object written twice");
}

#[test]
fn generations_an_expire_wrote_are_copied_and_neither_side_brings_back_what_the_other_retired() {
    let (mut pg, url_a, _root, _bin) = crate::expire::file_source();
    let b_dir = tempfile::tempdir().unwrap();
    let url_b = format!("file://{}", b_dir.path().join("b").display());
    let backup = |pg: &Cluster| {
        let seg = pg.switch_wal().unwrap();
        pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
        succeeds(crate::pitr().args([
            "backup",
            "--fast",
            "--repo",
            &url_a,
            "--pg",
            &crate::socket(pg),
        ]));
    };
    pg.pgbench(&["-i", "-s", "2", "-q"]).unwrap();
    backup(&pg);
    pg.sql("UPDATE pgbench_accounts SET abalance = abalance + 1")
        .unwrap();
    pg.sql("VACUUM FULL pgbench_accounts").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    backup(&pg);
    let seg = pg.switch_wal().unwrap();
    pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
    pg.stop(StopMode::Fast).unwrap();
    let copy = || {
        json(&succeeds(
            crate::pitr().args(["copy", "--json", "--repo", &url_a, "--to", &url_b]),
        ))
    };
    let expire = |url: &str| {
        json(&succeeds(crate::pitr().args([
            "expire",
            "--json",
            "--keep-last",
            "1",
            "--grace",
            "0s",
            "--repo",
            url,
        ])))
    };
    assert_eq!(copy()["backups"], 2);
    // The source repacks the kept backup: its new generation is copied.
    let v = expire(&url_a);
    assert!(v["repacked"]["backups"].as_u64().unwrap() > 0, "{v}");
    let v = copy();
    assert_eq!(v["backups"], 1, "{v}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    succeeds(crate::pitr().args(["verify", "--repo", &url_b]));
    // The copy's own expire, then copies again: nothing comes back, nothing differs.
    expire(&url_b);
    succeeds(crate::pitr().args(["verify", "--repo", &url_b]));
    for _ in 0..2 {
        let v = copy();
        assert_eq!(v["objects"], 0, "{v}");
        assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    }
    let listed = |url: &str| {
        json(&succeeds(
            crate::pitr().args(["list", "--json", "--repo", url]),
        ))["backups"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(listed(&url_b), 1);
    assert_eq!(listed(&url_a), 1);
    // A retention record in the copy that does not fit its backups (planted: it would make
    // copy leave every WAL file out) is not followed, and said.
    let objects = repo::objects::ObjectStore::new(
        std::sync::Arc::new(repo::storage::FsStorage::new(b_dir.path().join("b")).unwrap()),
        std::sync::Arc::new(repo::codec::Codec::new(1, 4)),
        repo::envelope::EncodeOptions::default(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(
        objects.put(
            "retention",
            br#"{"wal_kept_from":"FFFFFFFFFFFFFFFF","ranges":[]}"#
                .to_vec()
                .into(),
            repo::storage::PutMode::Overwrite,
        ),
    )
    .unwrap();
    let out = crate::pitr()
        .args(["copy", "--json", "--repo", &url_a, "--to", &url_b])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let v = json(&out);
    assert!(
        v["problems"][0].as_str().unwrap().contains("does not fit"),
        "{v}"
    );
    assert_eq!(v["skipped"], 0, "{v}");

    // Two copies into one new target at once: both finish, with nothing damaged or
    // differing, and the target verifies.
    let url_c = format!("file://{}", b_dir.path().join("c").display());
    let two: Vec<_> = (0..2)
        .map(|_| {
            crate::pitr()
                .args([
                    "copy",
                    "--json",
                    "--parallel",
                    "2",
                    "--repo",
                    &url_a,
                    "--to",
                    &url_c,
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut objects = 0;
    for child in two {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = json(&out);
        assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
        objects += v["objects"].as_u64().unwrap();
    }
    assert!(objects > 0);
    succeeds(crate::pitr().args(["verify", "--repo", &url_c]));
    assert_eq!(listed(&url_c), 1);
}
