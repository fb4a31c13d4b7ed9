//! `pitr expire` and `pitr delete` end to end on the bed's S3 server: backups at known
//! points with WAL between; after expiring, the kept backups restore to exact rows, points
//! only expired backups reached are refused, the bucket shrank and verify passes. A
//! file:// repository is expired with the process killed after each deletion in turn:
//! every kept backup still verifies, and the next expire ends where an uninterrupted one does.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use testbed::{Cluster, ClusterOptions};

use crate::restore::{batches, commit_batch, start_restored, Source};
use crate::{json, succeeds, Reaped};

/// Stored bytes and keys under the repository's prefix.
fn bucket(src: &Source, name: &str) -> (u64, Vec<String>) {
    let storage = crate::bed_s3_storage(&src.s3, &format!("{}/{name}", src.s3.prefix()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let all = rt
        .block_on(repo::storage::list_all(storage.as_ref(), ""))
        .unwrap();
    (
        all.iter().map(|o| o.size).sum(),
        all.into_iter().map(|o| o.key).collect(),
    )
}

fn listed(src: &Source) -> Vec<String> {
    let out = succeeds(src.pitr().args(["list", "--json", "--repo", &src.url]));
    json(&out)["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect()
}

fn restored_batches(src: &Source, target: &str) -> Result<Vec<String>, i32> {
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = src.restore(
        &to,
        &["--target-action", "promote", "--target-time", target],
    );
    if !out.status.success() {
        return Err(out.status.code().unwrap_or(-1));
    }
    let pg = start_restored(src, &to, false);
    Ok(batches(&pg))
}

#[test]
fn expire_keeps_the_newest_backups_and_the_wal_they_need() {
    let src = Source::new("expire");
    src.pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    let mut ids = Vec::new();
    let mut commits = Vec::new();
    for k in 1..=4 {
        commits.push(commit_batch(&src.pg, k));
        src.archive_all();
        ids.push(src.backup()["id"].as_str().unwrap().to_owned());
        // Backup ids are start times to the second.
        std::thread::sleep(Duration::from_millis(1100));
    }
    commits.push(commit_batch(&src.pg, 5));
    src.archive_all();
    let (before, _) = bucket(&src, "expire");

    // No rule: refused.
    let out = src
        .pitr()
        .args(["expire", "--repo", &src.url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));

    // A dry run says what would go and why the rest stays, and removes nothing.
    let out = succeeds(src.pitr().args([
        "expire",
        "--repo",
        &src.url,
        "--keep-last",
        "2",
        "--dry-run",
        "--json",
    ]));
    let v = json(&out);
    let kept: Vec<bool> = v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["kept"].as_bool().unwrap())
        .collect();
    assert_eq!(kept, [false, false, true, true], "{v}");
    assert_eq!(v["backups"][3]["reasons"][0], "keep-last 1", "{v}");
    assert_eq!(v["removed"]["backups"], 2, "{v}");
    assert_eq!(bucket(&src, "expire").0, before);
    assert_eq!(listed(&src), ids);

    let out = succeeds(src.pitr().args([
        "expire",
        "--repo",
        &src.url,
        "--keep-last",
        "2",
        "--grace",
        "0s",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("removed 2 backup(s)"), "{text}");
    assert_eq!(listed(&src), ids[2..]);
    let (after, keys) = bucket(&src, "expire");
    assert!(after < before, "{after} >= {before}");
    // Nothing of the expired backups is left, and no WAL older than the third's start.
    for id in &ids[..2] {
        assert!(!keys.iter().any(|k| k.contains(id.as_str())), "{keys:?}");
    }
    assert!(!keys.iter().any(|k| k.starts_with("running/")), "{keys:?}");

    // After the third backup: exact. Only the expired ones reached before it: refused.
    assert_eq!(
        restored_batches(&src, &commits[3].0),
        Ok(vec!["1".into(), "2".into(), "3".into(), "4".into()])
    );
    assert_eq!(restored_batches(&src, &commits[1].0), Err(9));
    succeeds(src.pitr().args(["verify", "--repo", &src.url]));

    // Once more: nothing left to remove.
    let out = succeeds(src.pitr().args([
        "expire",
        "--repo",
        &src.url,
        "--keep-last",
        "2",
        "--grace",
        "0s",
        "--json",
    ]));
    let v = json(&out);
    assert_eq!(v["removed"]["backups"], 0, "{v}");
    assert_eq!(v["removed"]["wal_files"], 0, "{v}");
    assert_eq!(v["removed"]["packs"], 0, "{v}");

    // delete: one backup; the last one only with --force.
    succeeds(src.pitr().args(["delete", "--repo", &src.url, &ids[2]]));
    assert_eq!(listed(&src), ids[3..]);
    let out = src
        .pitr()
        .args(["delete", "--repo", &src.url, &ids[3]])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = src
        .pitr()
        .args(["delete", "--repo", &src.url, "nosuch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    succeeds(src.pitr().args(["verify", "--repo", &src.url]));
    assert_eq!(
        restored_batches(&src, &commits[4].0),
        Ok(vec![
            "1".into(),
            "2".into(),
            "3".into(),
            "4".into(),
            "5".into()
        ])
    );
}

#[test]
fn keep_within_keeps_every_point_of_the_window_restorable() {
    let src = Source::new("within");
    src.pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    commit_batch(&src.pg, 1);
    src.archive_all();
    let first = src.backup()["id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(1100));
    let (early, _) = commit_batch(&src.pg, 2);
    src.archive_all();
    let second = src.backup()["id"].as_str().unwrap().to_owned();
    let second_done = SystemTime::now();
    // The window will start 1 s after the second backup; batch 3, 5 s after it, is the
    // oldest point inside it.
    std::thread::sleep(Duration::from_secs(5));
    let (inside, _) = commit_batch(&src.pg, 3);
    src.archive_all();
    std::thread::sleep(Duration::from_millis(1100));
    let third = src.backup()["id"].as_str().unwrap().to_owned();
    commit_batch(&src.pg, 4);
    src.archive_all();

    // Expires with a window starting 1 s after the second backup, measured at each call
    // (the restores between calls take their time; the start must stay between the second
    // and the third backup).
    let expire_within = |extra: &[&str]| {
        let window = SystemTime::now()
            .duration_since(second_done + Duration::from_secs(1))
            .unwrap();
        let window = format!("{}ms", window.as_millis());
        let mut c = src.pitr();
        c.args(["expire", "--json", "--grace", "0s", "--repo", &src.url])
            .args(["--keep-within", &window])
            .args(extra);
        json(&succeeds(&mut c))
    };

    // keep-last 3 keeps the first backup too, but it is older than the window's start: it
    // keeps only the WAL that makes it consistent.
    let v = expire_within(&["--keep-last", "3"]);
    assert_eq!(listed(&src), [first.clone(), second.clone(), third.clone()]);
    assert_eq!(v["backups"][0]["wal_to_end"], false, "{v}");
    assert_eq!(v["backups"][1]["wal_to_end"], true, "{v}");
    assert!(v["removed"]["wal_files"].as_u64().unwrap() > 0, "{v}");
    // verify: every backup whole; the first one's WAL ends early, which a newer backup
    // covers: not a problem.
    let out = succeeds(src.pitr().args(["verify", "--json", "--repo", &src.url]));
    let v = json(&out);
    assert!(v["backups"][0]["wal_ends_before"].is_string(), "{v}");
    assert!(v["backups"][1]["wal_ends_before"].is_null(), "{v}");
    // The first backup restores to its own end; batch 2, after it, is out of reach.
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = src.restore(
        &to,
        &[
            "--backup",
            &first,
            "--target-immediate",
            "--target-action",
            "promote",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(batches(&start_restored(&src, &to, false)), ["1"]);
    assert_eq!(restored_batches(&src, &early), Err(9));

    // The window alone: the first backup goes.
    let v = expire_within(&[]);
    let reasons: Vec<String> = v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["reasons"].to_string())
        .collect();
    assert_eq!(listed(&src), [second.clone(), third.clone()], "{reasons:?}");
    assert!(reasons[1].contains("window's start"), "{reasons:?}");
    assert_eq!(
        restored_batches(&src, &inside),
        Ok(vec!["1".into(), "2".into(), "3".into()])
    );
    assert_eq!(restored_batches(&src, &early), Err(9));
    succeeds(src.pitr().args(["verify", "--repo", &src.url]));
}

/// A cluster archiving into a file:// repository of its own (handed to the server's user,
/// as pitr init run by it would leave it).
pub(crate) fn file_source() -> (Cluster, String, PathBuf, PathBuf) {
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    let root = pg.server_dir("repo").unwrap();
    let url = format!("file://{}", root.display());
    crate::init_repo(&url, &pg, None);
    pg.os_user().give_tree(&root).unwrap();
    pg.set_config(
        "archive_command",
        &format!("'{}' wal-push --repo '{url}' %p", bin.display()),
    )
    .unwrap();
    pg.start().unwrap();
    (pg, url, root, bin)
}

fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn keys_of(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let k = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                if !k.starts_with("running/") && !k.contains(".tmp-") {
                    out.push(k);
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn expire_killed_after_any_deletion_leaves_kept_backups_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pg, url, root, bin) = file_source();
    pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    let mut ids = Vec::new();
    for k in 1..=4 {
        pg.sql(&format!(
            "INSERT INTO t SELECT {k}, g FROM generate_series(1, 20000) g"
        ))
        .unwrap();
        let seg = pg.switch_wal().unwrap();
        pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
        let out = succeeds(crate::pitr().args([
            "backup",
            "--fast",
            "--json",
            "--repo",
            &url,
            "--pg",
            &crate::socket(&pg),
        ]));
        ids.push(json(&out)["id"].as_str().unwrap().to_owned());
        std::thread::sleep(Duration::from_millis(1100));
    }
    pg.sql("INSERT INTO t SELECT 5, g FROM generate_series(1, 100) g")
        .unwrap();
    let seg = pg.switch_wal().unwrap();
    pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
    pg.stop(testbed::StopMode::Fast).unwrap();

    let policy = ["--keep-last", "2", "--grace", "0s"];
    let expire = |url: &str, stop: Option<u64>| {
        let mut c = crate::pitr();
        c.args(["expire", "--json", "--repo", url]).args(policy);
        c.env("PITR_DEBUG_EXPIRE_BATCH", "1");
        if let Some(k) = stop {
            c.env("PITR_DEBUG_EXPIRE_STOP", k.to_string());
        }
        c.output().unwrap()
    };
    // What an uninterrupted expire leaves, and how many deletions it takes.
    let reference = pg.server_dir("reference").unwrap().join("repo");
    copy_tree(&root, &reference);
    let reference_url = format!("file://{}", reference.display());
    let out = expire(&reference_url, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = &json(&out)["removed"];
    let total = [
        "backups",
        "backup_objects",
        "packs",
        "wal_files",
        "stream_pieces",
    ]
    .iter()
    .map(|k| r[k].as_u64().unwrap())
    .sum::<u64>();
    // The manifests count once each as backups.
    assert!(total > 20, "{r}");
    let expected = keys_of(&reference);

    // 20 stopping points spread over every phase, the first and last deletion included.
    let points: Vec<u64> = (0..20).map(|i| 1 + i * (total - 1) / 19).collect();
    for (n, k) in points.into_iter().enumerate() {
        let copy = dir.path().join(format!("killed-{n}"));
        copy_tree(&root, &copy);
        let copy_url = format!("file://{}", copy.display());
        let out = expire(&copy_url, Some(k));
        assert_eq!(out.status.code(), None, "not killed at {k}");
        // Every backup still listed is whole, its WAL there.
        let out = crate::pitr()
            .args(["verify", "--repo", &copy_url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "killed after deletion {k}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The next expire finishes the job.
        let out = expire(&copy_url, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(keys_of(&copy), expected, "killed after deletion {k}");
        std::fs::remove_dir_all(&copy).unwrap();
    }
    // And the kept backups restore, from the reference: the newest to its end (run by the
    // binary the server can run: the restore_command names it).
    let to = dir.path().join("restored");
    let out = std::process::Command::new(&bin)
        .args(["restore", "--repo", &reference_url, "--to"])
        .arg(&to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let options = ClusterOptions::default().setting("archive_mode", "off");
    let mut restored = Cluster::adopt(&to, options).unwrap();
    restored.os_user().give_tree(&reference).unwrap();
    restored.start().unwrap();
    crate::wait_promoted(&restored);
    assert_eq!(
        restored.sql("SELECT count(DISTINCT batch) FROM t").unwrap(),
        "5"
    );
    assert_eq!(listed_at(&reference_url), ids[2..]);

    // Hostile objects stop expire before it removes anything: a planted marker it cannot
    // read (exit 4: what it protects is unknown), a damaged manifest (exit 5: which packs
    // it needs is unknown).
    let hostile = dir.path().join("hostile");
    copy_tree(&root, &hostile);
    let hostile_url = format!("file://{}", hostile.display());
    let before = keys_of(&hostile);
    std::fs::create_dir_all(hostile.join("running")).unwrap();
    std::fs::write(hostile.join("running/planted"), b"not a marker").unwrap();
    let out = expire(&hostile_url, None);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("marker"));
    assert_eq!(keys_of(&hostile), before);
    std::fs::remove_file(hostile.join("running/planted")).unwrap();
    let manifest = hostile.join(format!("backup/{}/manifest", ids[0]));
    let mut bytes = std::fs::read(&manifest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&manifest, bytes).unwrap();
    let out = expire(&hostile_url, None);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&ids[0]));
    assert_eq!(keys_of(&hostile), before);
}

fn listed_at(url: &str) -> Vec<String> {
    let out = succeeds(crate::pitr().args(["list", "--json", "--repo", url]));
    json(&out)["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn expire_in_a_loop_beside_backups_archiving_and_a_stream_loses_nothing() {
    let src = Source::new("busy");
    src.pg.pgbench(&["-i", "-s", "2", "-q"]).unwrap();
    // Every segment the archiver was told is stored, in a log the server appends to.
    let acks = src.pg.server_dir("acks").unwrap().join("log");
    let command = format!(
        "{} wal-push %p && echo %f >> {}",
        src.bin.display(),
        acks.display()
    );
    src.pg
        .sql(&format!("ALTER SYSTEM SET archive_command = '{command}'"))
        .unwrap();
    src.pg.sql("SELECT pg_reload_conf()").unwrap();
    src.archive_all();
    src.backup();

    let stream = Reaped(Some(
        src.pitr()
            .args([
                "stream",
                "--slot",
                "pitr",
                "--create-slot",
                "--repo",
                &src.url,
                "--pg",
                &src.socket(),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut expired_runs = 0;
    let taken: Vec<String> = std::thread::scope(|s| {
        let load = s.spawn(|| {
            src.pg.pgbench(&["-n", "-c", "2", "-T", "12"]).unwrap();
        });
        let backups = s.spawn(|| {
            let mut ids = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Every backup succeeds though expire runs all along with no grace period:
                // its base and its new packs are protected by its marker.
                let id = src.backup()["id"].as_str().unwrap().to_owned();
                // And checks out, read back whole while the expires run: verify, and a
                // restore of its files (both protected by their markers).
                succeeds(
                    src.pitr()
                        .args(["verify", "--repo", &src.url, "--backup", &id]),
                );
                n += 1;
                let dirs = tempfile::tempdir().unwrap();
                let out = src.restore(&dirs.path().join(format!("r{n}")), &["--backup", &id]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                ids.push(id);
                std::thread::sleep(Duration::from_millis(1100));
            }
            ids
        });
        // Another expire with another policy at the same time.
        let other = s.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                succeeds(src.pitr().args([
                    "expire",
                    "--repo",
                    &src.url,
                    "--keep-last",
                    "2",
                    "--grace",
                    "0s",
                ]));
                runs += 1;
            }
            runs
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(14);
        while std::time::Instant::now() < deadline {
            succeeds(src.pitr().args([
                "expire",
                "--repo",
                &src.url,
                "--keep-last",
                "1",
                "--grace",
                "0s",
            ]));
            expired_runs += 1;
        }
        load.join().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        expired_runs += other.join().unwrap();
        backups.join().unwrap()
    });
    assert!(taken.len() >= 2, "{taken:?}");
    assert!(expired_runs >= 3, "{expired_runs}");
    src.archive_all();
    drop(stream);

    // One more expire, then: the backup kept is whole with its WAL, and every segment the
    // archiver was told is stored from its start on is in the repository.
    let out = succeeds(src.pitr().args([
        "expire",
        "--repo",
        &src.url,
        "--keep-last",
        "1",
        "--grace",
        "0s",
        "--json",
    ]));
    let kept_from = json(&out)["wal_kept_from"].as_str().unwrap().to_owned();
    assert_eq!(listed(&src), [taken.last().unwrap().clone()]);
    succeeds(src.pitr().args(["verify", "--repo", &src.url]));
    let (_, keys) = bucket(&src, "busy");
    let acked = std::fs::read_to_string(&acks).unwrap();
    let mut checked = 0;
    for name in acked.lines().filter(|n| n.len() == 24) {
        if name[8..] >= *kept_from {
            let key = repo::keys::wal_key(name).unwrap();
            assert!(
                keys.contains(&key),
                "{name} acknowledged, not in the repository"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{acked}");
    // And it restores: every pgbench transaction that committed is there.
    let history = src.pg.sql("SELECT count(*) FROM pgbench_history").unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = src.restore(&to, &["--target-action", "promote"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = start_restored(&src, &to, false);
    assert_eq!(
        restored
            .sql("SELECT count(*) FROM pgbench_history")
            .unwrap(),
        history
    );
}

/// Sums the stored bytes of the packs in a file:// repository.
fn pack_bytes(root: &Path) -> u64 {
    keys_of(root)
        .iter()
        .filter(|k| k.starts_with("pack/"))
        .map(|k| std::fs::metadata(root.join(k)).unwrap().len())
        .sum()
}

#[test]
fn repacking_moves_live_chunks_out_of_mostly_dead_packs_and_survives_a_kill_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pg, url, root, bin) = file_source();
    pg.pgbench(&["-i", "-s", "4", "-q"]).unwrap();
    let backup = |pg: &Cluster| {
        let seg = pg.switch_wal().unwrap();
        pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
        let out = succeeds(crate::pitr().args([
            "backup",
            "--fast",
            "--json",
            "--repo",
            &url,
            "--pg",
            &crate::socket(pg),
        ]));
        json(&out)["id"].as_str().unwrap().to_owned()
    };
    let first = backup(&pg);
    // Every page of the big table changes; the catalogs and small tables do not: the
    // first backup's packs end up mostly dead, a few chunks in each still used.
    pg.sql("UPDATE pgbench_accounts SET abalance = abalance + 7")
        .unwrap();
    pg.sql("VACUUM FULL pgbench_accounts").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let second = backup(&pg);
    let sum = pg
        .sql("SELECT sum(abalance) FROM pgbench_accounts")
        .unwrap();
    let seg = pg.switch_wal().unwrap();
    pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
    pg.stop(testbed::StopMode::Fast).unwrap();

    let expire = |url: &str, stop: Option<u64>, extra: &[&str]| {
        let mut c = crate::pitr();
        c.args([
            "expire",
            "--json",
            "--repo",
            url,
            "--keep-last",
            "1",
            "--grace",
            "0s",
        ])
        .args(extra);
        if let Some(k) = stop {
            c.env("PITR_DEBUG_EXPIRE_STOP", k.to_string());
        }
        c.output().unwrap()
    };
    // What it would do, changing nothing.
    let before = keys_of(&root);
    let out = expire(&url, None, &["--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert!(v["repacked"]["packs"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(keys_of(&root), before);

    // Killed after each step in turn (deletions, and every object repacking writes), on
    // copies: the kept backup always verifies, and a later expire gets it repacked.
    let mut k = 1;
    loop {
        let copy = dir.path().join(format!("killed-{k}"));
        copy_tree(&root, &copy);
        let copy_url = format!("file://{}", copy.display());
        let out = expire(&copy_url, Some(k), &[]);
        if out.status.success() {
            break;
        }
        assert_eq!(out.status.code(), None, "not killed at step {k}");
        let out = crate::pitr()
            .args(["verify", "--repo", &copy_url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "killed after step {k}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = expire(&copy_url, None, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        succeeds(crate::pitr().args(["verify", "--repo", &copy_url]));
        assert_eq!(listed_at(&copy_url), std::slice::from_ref(&second));
        std::fs::remove_dir_all(&copy).unwrap();
        k += 1;
        assert!(k < 200, "expire never finished");
    }
    assert!(k > 3, "only {k} steps");

    // The real thing.
    let packs_before = pack_bytes(&root);
    let out = expire(&url, None, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["removed"]["backups"], 1, "{v}");
    assert_eq!(v["repacked"]["backups"], 1, "{v}");
    assert_eq!(v["generations_retired"], 1, "{v}");
    let keys = keys_of(&root);
    let id = &second;
    assert!(
        keys.contains(&format!("backup/{id}/manifest.0000000002")),
        "{keys:?}"
    );
    assert!(!keys.contains(&format!("backup/{id}/manifest")), "{keys:?}");
    assert!(!keys
        .iter()
        .any(|k| k.starts_with(&format!("backup/{id}/chunks/"))));
    assert!(!keys.iter().any(|k| k.contains(first.as_str())));
    let packs_after = pack_bytes(&root);
    assert!(
        packs_after < packs_before,
        "{packs_after} >= {packs_before}"
    );
    // Every pack left is mostly used: once more finds nothing to repack.
    let v = json(&expire(&url, None, &[]));
    assert_eq!(v["repacked"]["packs"], 0, "{v}");
    succeeds(crate::pitr().args(["verify", "--repo", &url]));

    // And it restores, from its new generation.
    let to = dir.path().join("restored");
    let out = std::process::Command::new(&bin)
        .args([
            "restore",
            "--target-immediate",
            "--target-action",
            "promote",
            "--repo",
            &url,
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
    let mut restored = Cluster::adopt(
        &to,
        ClusterOptions::default().setting("archive_mode", "off"),
    )
    .unwrap();
    restored.os_user().give_tree(&root).unwrap();
    restored.start().unwrap();
    crate::wait_promoted(&restored);
    assert_eq!(
        restored
            .sql("SELECT sum(abalance) FROM pgbench_accounts")
            .unwrap(),
        sum
    );
}

#[test]
fn an_encrypted_repository_repacks_without_decrypting_and_stays_sealed() {
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    let keys = pg.server_dir("keys").unwrap();
    let key = keys.join("k");
    std::fs::write(&key, repo::crypto::random::<32>()).unwrap();
    let root = pg.server_dir("repo").unwrap();
    let url = format!("file://{}", root.display());
    let key_arg = key.display().to_string();
    succeeds(
        crate::pitr()
            .args([
                "init",
                "--encrypt",
                "--key-file",
                &key_arg,
                "--repo",
                &url,
                "--data-dir",
            ])
            .arg(pg.data_dir()),
    );
    pg.os_user().give_tree(&root).unwrap();
    pg.os_user().give_tree(&keys).unwrap();
    pg.set_config(
        "archive_command",
        &format!(
            "'{}' wal-push --repo '{url}' --key-file '{key_arg}' %p",
            bin.display()
        ),
    )
    .unwrap();
    pg.start().unwrap();
    pg.pgbench(&["-i", "-s", "2", "-q"]).unwrap();
    let pitr = |args: &[&str]| {
        let mut c = crate::pitr();
        c.args(args).args(["--repo", &url, "--key-file", &key_arg]);
        c
    };
    let backup = |pg: &Cluster| {
        let seg = pg.switch_wal().unwrap();
        pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
        succeeds(&mut pitr(&["backup", "--fast", "--pg", &crate::socket(pg)]));
    };
    backup(&pg);
    pg.sql("UPDATE pgbench_accounts SET abalance = abalance + 3")
        .unwrap();
    pg.sql("VACUUM FULL pgbench_accounts").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    backup(&pg);
    let seg = pg.switch_wal().unwrap();
    pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();

    let out = succeeds(&mut pitr(&[
        "expire",
        "--json",
        "--keep-last",
        "1",
        "--grace",
        "0s",
    ]));
    let v = json(&out);
    assert!(v["repacked"]["packs"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["generations_retired"], 1, "{v}");
    // Every byte checks out under the key, and nothing opens without it.
    succeeds(&mut pitr(&["verify"]));
    let out = crate::pitr()
        .args(["verify", "--repo", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(11));
    let dir = tempfile::tempdir().unwrap();
    let out = pitr(&["restore"])
        .arg("--to")
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
