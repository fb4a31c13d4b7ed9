//! `pitr backup` and `pitr list` from the command line: a pgbench database with a
//! tablespace backed up to the bed's S3 server while `pitr wal-push` archives, the backup
//! waiting for its WAL; `--wal` without archiving; a backup killed midway; the exit codes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use repo::codec::Codec;
use repo::envelope::EncodeOptions;
use repo::manifest::BackupManifest;
use repo::objects::ObjectStore;
use repo::storage::{FsStorage, Storage};
use testbed::{Cluster, ClusterOptions, S3Server};

use crate::{json, pitr, socket, succeeds};

/// Every backup in the repository reads back whole and as PostgreSQL listed it.
fn check_all(storage: Arc<dyn Storage>) -> Vec<BackupManifest> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let objects = ObjectStore::new(
            storage.clone(),
            Arc::new(Codec::new(2, 4)),
            EncodeOptions::default(),
        );
        let mut out = Vec::new();
        for id in repo::manifest::list_backups(storage.as_ref())
            .await
            .unwrap()
        {
            let m = BackupManifest::load(&objects, &id).await.unwrap();
            let report = restore::backup_files::check_backup(&objects, &m)
                .await
                .unwrap_or_else(|e| panic!("backup {id}: {e}"));
            assert!(report.matched_pg_manifest > 100, "{report:?}");
            out.push(m);
        }
        out
    })
}

#[test]
fn backup_to_s3_waits_for_archived_wal_and_is_listed() {
    let s3 = S3Server::start().unwrap();
    let prefix = format!("{}/backup", s3.prefix());
    let url = format!("s3://{}/{prefix}", s3.bucket());
    let options = ClusterOptions::default().archive_command("true");
    let mut pg = Cluster::init(crate::s3_server_env(options, &s3, &url)).unwrap();
    crate::init_repo(&url, &pg, Some(&s3));
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    pg.start().unwrap();
    pg.create_tablespace("extra").unwrap();
    pg.sql("CREATE TABLE t TABLESPACE extra AS SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
        .unwrap();
    pg.pgbench(&["-i", "-s", "16", "-q"]).unwrap();
    // From here on pitr archives (the load's WAL went to `true`).
    pg.set_config(
        "archive_command",
        &format!("'{}' wal-push %p", bin.display()),
    )
    .unwrap();
    pg.sql("SELECT pg_reload_conf()").unwrap();

    let backup = |label: &str| {
        let out = succeeds(
            pitr()
                .args(["backup", "--fast", "--json", "--label", label])
                .args(["--repo", &url, "--pg", &socket(&pg)])
                .envs(s3.env()),
        );
        json(&out)
    };
    let started = Instant::now();
    let first = backup("first");
    eprintln!("first backup: {first} in {:?}", started.elapsed());
    assert!(first["size"].as_u64().unwrap() > 250_000_000, "{first}");
    assert_eq!(first["wal"], "archive");
    assert_eq!(first["timeline"], 1);

    pg.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 50000 = 0")
        .unwrap();
    let second = backup("second");
    let (size, new) = (
        second["size"].as_u64().unwrap(),
        second["stored_new"].as_u64().unwrap(),
    );
    eprintln!("second backup: {new} new bytes of {size}");
    assert!(new * 100 < size, "{second}");

    // Both listed, with the WAL that makes them consistent.
    let out = succeeds(
        pitr()
            .args(["list", "--json", "--repo", &url])
            .envs(s3.env()),
    );
    let list = json(&out);
    let backups = list["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{list}");
    assert_eq!(backups[0]["id"], first["id"]);
    assert_eq!(backups[0]["label"], "first");
    assert_eq!(backups[1]["id"], second["id"]);
    assert_eq!(backups[1]["stored_new"], second["stored_new"]);
    // Dated by the server's own clock too (backup_label's START TIME), in the server's words.
    let server_start = backups[0]["server_start_time"].as_str().unwrap();
    assert!(
        server_start.starts_with("20") && server_start.len() >= 19,
        "{list}"
    );
    let lsn = |v: &serde_json::Value| v.as_str().unwrap().parse::<walfmt::Lsn>().unwrap();
    let wal = list["wal"].as_array().unwrap();
    assert!(
        wal.iter().any(|r| r["timeline"] == 1
            && lsn(&r["start_lsn"]) <= lsn(&first["start_lsn"])
            && lsn(&r["end_lsn"]) >= lsn(&second["stop_lsn"])),
        "{list}"
    );
    let out = succeeds(pitr().args(["list", "--repo", &url]).envs(s3.env()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(first["id"].as_str().unwrap()), "{text}");
    assert!(text.contains("WAL timeline 1:"), "{text}");

    let manifests = check_all(crate::bed_s3_storage(&s3, &prefix));
    assert_eq!(manifests.len(), 2);
    assert!(manifests[0].tablespaces.len() == 1);
}

#[test]
fn a_killed_backup_leaves_nothing_listed_and_the_next_one_works() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    pg.pgbench(&["-i", "-s", "12", "-q"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("r");
    let url = format!("file://{}", root.display());
    crate::init_repo(&url, &pg, None);

    let mut child = pitr()
        .args(["backup", "--wal", "--fast", "--max-rate", "20M"])
        .args(["--repo", &url, "--pg", &socket(&pg)])
        // Uncompressed, so that packs fill while the server sends 20 MB/s.
        .env("PITR_COMPRESS_LEVEL", "0")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let packs = root.join("pack");
    while std::fs::read_dir(&packs).map_or(0, |d| d.count()) == 0 {
        assert!(Instant::now() < deadline, "no pack was stored");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended too soon"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let out = succeeds(pitr().args(["list", "--json", "--repo", &url]));
    assert_eq!(json(&out)["backups"], serde_json::json!([]));

    let out = succeeds(pitr().args(["backup", "--wal", "--fast", "--json"]).args([
        "--repo",
        &url,
        "--pg",
        &socket(&pg),
    ]));
    let v = json(&out);
    assert_eq!(v["wal"], "included");
    let out = succeeds(pitr().args(["list", "--json", "--repo", &url]));
    assert_eq!(json(&out)["backups"][0]["id"], v["id"]);
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new(root.clone()).unwrap());
    assert_eq!(check_all(storage).len(), 1);
}

#[test]
fn without_archived_wal_the_backup_fails_with_exit_8_and_no_manifest() {
    // The bed's cluster has archive_mode on and no archive_command: nothing is archived.
    let pg = Cluster::start_new(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/r", dir.path().display());
    crate::init_repo(&url, &pg, None);
    let out = pitr()
        .args(["backup", "--fast", "--wal-timeout", "2"])
        .args(["--repo", &url, "--pg", &socket(&pg)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("was not archived within"), "{stderr}");
    assert!(
        stderr.contains("HINT:") && stderr.contains("--wal"),
        "{stderr}"
    );
    let out = succeeds(pitr().args(["list", "--json", "--repo", &url]));
    assert_eq!(json(&out)["backups"], serde_json::json!([]));

    // No server there: exit 7 with a HINT, as for every command that connects.
    let out = pitr()
        .args(["backup", "--repo", &url, "--pg"])
        .arg(format!("host={} port=1 user=x", pg.socket_dir().display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("HINT:"), "{stderr}");
}

/// Waits until `standby` has replayed everything `primary` wrote so far.
fn caught_up(primary: &Cluster, standby: &Cluster) {
    standby
        .wait_replayed(primary, Duration::from_secs(60))
        .unwrap();
}

/// `pitr backup` pointed at a streaming standby (itself archiving into the same repository
/// with archive_mode = always): it completes once the primary switches WAL, or at once when
/// `pitr stream` holds the durable prefix of its last segment; without either it exits 8
/// with a HINT for standbys. The backup restores to a time after it with exact rows.
#[test]
fn a_backup_from_a_standby_completes_when_its_last_segment_arrives() {
    let src = crate::restore::Source::new("standby");
    let pg = &src.pg;
    pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let sdir = dirs.path().join("standby");
    pg.make_standby(&sdir).unwrap();
    let options = ClusterOptions::default()
        .setting("archive_mode", "always")
        .setting(
            "archive_command",
            format!("'{}' wal-push %p", src.bin.display()),
        );
    let mut standby =
        Cluster::adopt(&sdir, crate::s3_server_env(options, &src.s3, &src.url)).unwrap();
    standby.start().unwrap();
    // Written after the primary's last switch: the standby's backups end inside a segment
    // no one has archived yet.
    crate::restore::commit_batch(pg, 1);
    caught_up(pg, &standby);
    let backup = |timeout: &str| {
        src.pitr()
            .args([
                "backup",
                "--json",
                "--repo",
                &src.url,
                "--wal-timeout",
                timeout,
                "--pg",
                &socket(&standby),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Nothing switches: exit 8, with the standby's HINT.
    let out = backup("3").wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("standby") && err.contains("archive_timeout"),
        "{err}"
    );

    // The primary switches while the backup waits: it completes.
    let child = backup("120");
    std::thread::sleep(Duration::from_secs(2));
    src.archive_all();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = json(&out)["id"].as_str().unwrap().to_owned();

    // pitr stream from the primary holds the last segment's durable prefix: no switch
    // needed.
    let mut stream = crate::Reaped(Some(
        src.pitr()
            .args([
                "stream",
                "--repo",
                &src.url,
                "--slot",
                "standby_test",
                "--create-slot",
                "--flush-interval",
                "200ms",
                "--pg",
                &socket(pg),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ));
    std::thread::sleep(Duration::from_secs(2));
    crate::restore::commit_batch(pg, 2);
    caught_up(pg, &standby);
    let out = backup("60").wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(json(&out)["id"], first);
    stream.signal("-TERM");

    // A time after the backups: rows exact.
    let (t3, _) = crate::restore::commit_batch(pg, 3);
    std::thread::sleep(Duration::from_millis(300));
    crate::restore::commit_batch(pg, 4);
    src.archive_all();
    // The standby archived what it received into the same repository, without a failure.
    caught_up(pg, &standby);
    let failed = standby
        .sql("SELECT failed_count FROM pg_stat_archiver")
        .unwrap();
    assert_eq!(failed, "0", "{}", standby.server_log());
    let to = dirs.path().join("restored");
    let out = src.restore(&to, &["--target-time", &t3, "--target-action", "promote"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = crate::restore::start_restored(&src, &to, false);
    assert_eq!(crate::restore::batches(&restored), ["1", "2", "3"]);
}
