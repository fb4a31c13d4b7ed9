//! `pitr verify` end to end on the bed's S3 server: a cluster archiving with wal-push, two
//! backups with WAL between; verify passes and says what each backup restores to; a flipped
//! byte in a pack is exit 5 naming the backup and file; a segment deleted from the middle is
//! exit 12 naming it and the backup it cuts short, the other backup still whole.

use std::path::Path;
use std::time::Duration;

use testbed::{Cluster, ClusterOptions, S3Server};

use crate::succeeds;

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

#[test]
fn verify_reads_everything_and_names_what_a_problem_breaks() {
    let s3 = S3Server::start().unwrap();
    let url = s3.repo_url("verify");
    let options = ClusterOptions::default()
        .wal_segment_size_mb(1)
        .setting("track_commit_timestamp", "on");
    let mut pg = Cluster::init(crate::s3_server_env(options, &s3, &url)).unwrap();
    crate::init_repo(&url, &pg, Some(&s3));
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    pg.set_config(
        "archive_command",
        &format!("'{}' wal-push %p", bin.display()),
    )
    .unwrap();
    pg.start().unwrap();
    let pitr = || {
        let mut c = crate::pitr();
        c.envs(s3.env());
        c
    };
    let backup = || {
        let out = succeeds(pitr().args([
            "backup",
            "--fast",
            "--json",
            "--repo",
            &url,
            "--pg",
            &crate::socket(&pg),
        ]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["id"].as_str().unwrap().to_owned()
    };
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
        .unwrap();
    let first = backup();
    // WAL between the backups, several segments of it.
    let mut between = Vec::new();
    for _ in 0..3 {
        pg.sql("INSERT INTO t SELECT g FROM generate_series(1, 20000) g")
            .unwrap();
        between.push(pg.switch_wal().unwrap());
    }
    std::thread::sleep(Duration::from_millis(1100));
    let second = backup();
    pg.sql("INSERT INTO t SELECT g FROM generate_series(1, 100) g")
        .unwrap();
    let last = pg.switch_wal().unwrap();
    pg.wait_archived(&last, Duration::from_secs(60)).unwrap();

    let run = || {
        pitr()
            .args(["verify", "--json", "--repo", &url])
            .output()
            .unwrap()
    };
    let out = run();
    assert_eq!(
        code(&out),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let backups = v["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{v}");
    for b in backups {
        assert_eq!(b["files_ok"], true, "{b}");
        assert!(b["matched_pg_manifest"].as_u64().unwrap() > 100, "{b}");
        assert!(b["restorable_to"].is_string(), "{b}");
        assert_eq!(b["timeline"], 1);
    }
    assert!(v["segments"].as_u64().unwrap() >= 5, "{v}");
    assert!(v["summaries"].as_u64().unwrap() >= 4, "{v}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");

    let storage = crate::bed_s3_storage(&s3, &format!("{}/verify", s3.prefix()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let get = |key: &str| {
        rt.block_on(repo::storage::get_bytes(storage.as_ref(), key))
            .unwrap()
    };
    let put = |key: &str, bytes: Vec<u8>| {
        rt.block_on(storage.put(key, bytes.into(), repo::storage::PutMode::Overwrite))
            .unwrap();
    };

    // A flipped byte in the first backup's pack: exit 5, naming the backup and the file.
    let packs = rt
        .block_on(repo::storage::list_all(storage.as_ref(), "pack/"))
        .unwrap();
    let pack = packs[0].key.clone();
    let kept = get(&pack);
    let mut bad = kept.to_vec();
    let quarter = bad.len() / 4;
    bad[quarter] ^= 0x10;
    put(&pack, bad);
    let out = pitr()
        .args(["verify", "--repo", &url, "--backups-only"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), Some(5), "{stdout}");
    assert!(stdout.contains("DAMAGED"), "{stdout}");
    assert!(stdout.contains("file \""), "{stdout}");
    assert!(
        stdout.contains(&format!("backup {first}")) || stdout.contains(&format!("backup {second}")),
        "{stdout}"
    );
    // A pack gone altogether is damage too (exit 5), not an unreachable repository.
    rt.block_on(storage.delete(std::slice::from_ref(&pack)))
        .unwrap();
    let out = pitr()
        .args(["verify", "--repo", &url, "--backups-only"])
        .output()
        .unwrap();
    assert_eq!(
        code(&out),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    put(&pack, kept.to_vec());

    // A damaged segment summary (the restore planner reads them for time targets): exit 5.
    let skey = repo::keys::summary_key(&between[0]).unwrap();
    let kept = get(&skey);
    let mut bad = kept.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    put(&skey, bad);
    let out = pitr()
        .args(["verify", "--repo", &url, "--wal-only"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), Some(5), "{stdout}");
    assert!(stdout.contains(&skey), "{stdout}");
    put(&skey, kept.to_vec());

    // A segment between the backups deleted: exit 12; the first backup is cut short at
    // it, the second (which starts after it) restores to the end.
    let gone = &between[1];
    let key = repo::keys::wal_key(gone).unwrap();
    rt.block_on(storage.delete(std::slice::from_ref(&key)))
        .unwrap();
    let out = run();
    assert_eq!(
        code(&out),
        Some(12),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert_eq!(problems[0]["severity"], "missing");
    assert_eq!(problems[0]["backup"], first.as_str());
    assert!(
        problems[0]["message"]
            .as_str()
            .unwrap()
            .contains(gone.as_str()),
        "{v}"
    );
    // The second backup alone does not need that segment: it checks out.
    let out = pitr()
        .args(["verify", "--json", "--repo", &url, "--backup", &second])
        .output()
        .unwrap();
    assert_eq!(
        code(&out),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backups"].as_array().unwrap().len(), 1);
    // An unknown backup is bad input.
    let out = pitr()
        .args(["verify", "--repo", &url, "--backup", "20000101T000000Z"])
        .output()
        .unwrap();
    assert_eq!(
        code(&out),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Human-readable too.
    let out = pitr().args(["verify", "--repo", &url]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("MISSING: backup {first}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("backup {second}: "))
            && stdout.contains("restorable to any point from"),
        "{stdout}"
    );
}
