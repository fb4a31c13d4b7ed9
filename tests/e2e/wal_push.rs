//! `pitr wal-push` as PostgreSQL's archive_command, against the test bed's S3 server:
//! segments arrive and read back as the original bytes, re-pushing the same bytes is fine,
//! different bytes under a name are refused, and files that are not this cluster's WAL
//! are refused with the documented exit codes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use repo::codec::Codec;
use repo::envelope::EncodeOptions;
use repo::objects::ObjectStore;
use testbed::{Cluster, ClusterOptions, S3Server};

use crate::pitr;

/// A cluster archiving with `cp` into a dir (for comparison) and `pitr wal-push` to S3.
fn archiving_to(s3: &S3Server, repo_url: &str) -> (Cluster, PathBuf, PathBuf) {
    let options = ClusterOptions::default().wal_segment_size_mb(1);
    let mut pg = Cluster::init(crate::s3_server_env(options, s3, repo_url)).unwrap();
    crate::init_repo(repo_url, &pg, Some(s3));
    let pitr_bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    let copies = pg.server_dir("copies").unwrap();
    pg.set_config(
        "archive_command",
        &format!(
            "cp %p '{}/%f' && '{}' wal-push %p",
            copies.display(),
            pitr_bin.display()
        ),
    )
    .unwrap();
    pg.start().unwrap();
    (pg, copies, pitr_bin)
}

fn objects(s3: &S3Server, prefix: &str) -> ObjectStore {
    ObjectStore::new(
        crate::bed_s3_storage(s3, prefix),
        Arc::new(Codec::new(1, 2)),
        EncodeOptions::default(),
    )
}

fn get(objects: &ObjectStore, key: &str) -> Vec<u8> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(objects.get(key)).unwrap().1.to_vec()
}

pub(crate) fn key(name: &str) -> String {
    format!("wal/{}/{name}", &name[..16])
}

#[test]
fn archived_segments_arrive_whole_and_pushes_are_idempotent() {
    let s3 = S3Server::start().unwrap();
    let prefix = format!("{}/push", s3.prefix());
    let url = format!("s3://{}/{prefix}", s3.bucket());
    let (pg, copies, _) = archiving_to(&s3, &url);
    pg.sql("CREATE TABLE t (v int)").unwrap();
    let segments = pg.generate_wal_segments(4).unwrap();
    for seg in &segments {
        pg.wait_archived(seg, Duration::from_secs(60)).unwrap();
    }
    let store = objects(&s3, &prefix);
    for seg in &segments {
        let original = std::fs::read(copies.join(seg)).unwrap();
        assert_eq!(
            get(&store, &key(seg)),
            original,
            "{seg} reads back as archived"
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&get(&store, &format!("{}.summary", key(seg)))).unwrap();
        assert_eq!(summary["file"], seg.as_str());
        let name =
            walfmt::SegmentName::parse(seg, walfmt::WalSegmentSize::new(1 << 20).unwrap()).unwrap();
        assert_eq!(
            summary["end_lsn"],
            name.end_lsn().to_string(),
            "{seg} is whole"
        );
    }

    // Re-pushing the same bytes succeeds; different bytes under the same name are refused
    // and the stored object stays as it was.
    let last = segments.last().unwrap();
    let envs = s3.env();
    crate::succeeds(
        pitr()
            .args(["wal-push", "--repo", &url])
            .arg(copies.join(last))
            .envs(envs.clone()),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut altered = std::fs::read(copies.join(last)).unwrap();
    let end = altered.len() - 1;
    altered[end] ^= 0xFF; // in the unused tail after the WAL switch: still valid WAL
    std::fs::write(dir.path().join(last), &altered).unwrap();
    let out = pitr()
        .args(["wal-push", "--repo", &url])
        .arg(dir.path().join(last))
        .envs(envs.clone())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "WAL file {last} is already archived with different contents"
        )),
        "{err}"
    );
    assert!(
        err.contains("stored blake3 ") && err.contains("this file "),
        "{err}"
    );
    assert_eq!(
        get(&store, &key(last)),
        std::fs::read(copies.join(last)).unwrap()
    );

    // Another cluster's WAL is refused by the repository (exit 4) with a HINT.
    let other = Cluster::start_new(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let theirs = other.switch_wal().unwrap();
    std::fs::copy(
        other.data_dir().join("pg_wal").join(&theirs),
        dir.path().join(&theirs),
    )
    .unwrap();
    let out = pitr()
        .args(["wal-push", "--repo", &url])
        .arg(dir.path().join(&theirs))
        .envs(envs.clone())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("system identifier") && err.contains("does not match repository"),
        "{err}"
    );
    assert!(
        err.contains("HINT: does archive_command point at the right repository?"),
        "{err}"
    );

    // A file that is not WAL is bad input (exit 3), and nothing is stored for it.
    let junk = dir.path().join("000000010000000000000099");
    std::fs::write(&junk, vec![7u8; 1 << 20]).unwrap();
    let out = pitr()
        .args(["wal-push", "--repo", &url])
        .arg(&junk)
        .envs(envs)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a WAL file"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(rt
        .block_on(store.storage().head(&key("000000010000000000000099")))
        .unwrap()
        .is_none());
}

#[test]
fn while_s3_is_down_nothing_is_marked_archived_and_everything_arrives_after() {
    let mut s3 = S3Server::start_local().unwrap();
    let prefix = format!("{}/outage", s3.prefix());
    let url = format!("s3://{}/{prefix}", s3.bucket());
    let (pg, _copies, _) = archiving_to(&s3, &url);
    let first = pg.switch_wal().unwrap();
    pg.wait_archived(&first, Duration::from_secs(60)).unwrap();

    s3.stop().unwrap();
    let during = pg.switch_wal().unwrap();
    let failed = |pg: &Cluster| -> u64 {
        pg.sql("SELECT failed_count FROM pg_stat_archiver")
            .unwrap()
            .parse()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while failed(&pg) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "archiving never failed while S3 was down"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let done = pg
        .data_dir()
        .join("pg_wal/archive_status")
        .join(format!("{during}.done"));
    assert!(!done.exists(), "{during} marked archived while S3 was down");
    assert_eq!(
        pg.sql("SELECT last_failed_wal FROM pg_stat_archiver")
            .unwrap(),
        during
    );

    s3.restart().unwrap();
    // A new segment wakes the archiver, which retries the failed one first.
    let after = pg.switch_wal().unwrap();
    pg.wait_archived(&during, Duration::from_secs(120)).unwrap();
    pg.wait_archived(&after, Duration::from_secs(60)).unwrap();
    let store = objects(&s3, &prefix);
    for seg in [&first, &during, &after] {
        let stored = get(&store, &key(seg));
        assert_eq!(stored.len(), 1 << 20, "{seg}");
        assert!(walfmt::summarize(&stored).is_ok(), "{seg} is WAL");
    }
}

#[test]
fn segments_stored_ahead_arrive_and_their_records_stay_bounded() {
    let s3 = S3Server::start().unwrap();
    let prefix = format!("{}/ahead", s3.prefix());
    let url = format!("s3://{}/{prefix}", s3.bucket());
    let mut options = ClusterOptions::default()
        .wal_segment_size_mb(1)
        .env("PITR_REPO", &url)
        .env("PITR_WAL_PUSH_AHEAD", "3");
    for (k, v) in s3.env() {
        options = options.env(k, v);
    }
    // No archive_command yet: segments wait as .ready, as behind a slow archiver.
    let mut pg = Cluster::init(options).unwrap();
    crate::init_repo(&url, &pg, Some(&s3));
    pg.start().unwrap();
    let segments = pg.generate_wal_segments(8).unwrap();
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    // After each call, note the records of files stored ahead and still to be asked for.
    let calls = pg.server_dir("calls").unwrap();
    pg.set_config(
        "archive_command",
        &format!(
            "'{}' wal-push %p && ls pg_wal/.pitr/push > '{}/%f'",
            bin.display(),
            calls.display()
        ),
    )
    .unwrap();
    pg.sql("SELECT pg_reload_conf()").unwrap();
    // PostgreSQL 13's archiver tries again only when told a segment is ready (or a minute
    // later), not on the reload: a switch tells it.
    pg.switch_wal().unwrap();
    for seg in &segments {
        pg.wait_archived(seg, Duration::from_secs(60)).unwrap();
    }

    let store = objects(&s3, &prefix);
    for seg in &segments {
        let original = std::fs::read(pg.data_dir().join("pg_wal").join(seg)).unwrap();
        assert_eq!(get(&store, &key(seg)), original, "{seg} reads back");
    }
    // Which calls find a record depends on how far the background worker got, so this
    // checks only what always holds; that the worker stores the next segment ahead is
    // checked in a_record_is_trusted_only_when_the_repository_holds_the_bytes.
    for seg in &segments {
        let records = std::fs::read_to_string(calls.join(seg)).unwrap();
        // At most --ahead stored ahead, plus the one a call waited for.
        let held = records.lines().filter(|l| l.ends_with(".ok")).count();
        assert!(held <= 4, "{seg}: {records}");
        assert!(
            !records.contains(&format!("{seg}.ok")),
            "{seg}'s record outlived its call"
        );
    }
}

/// `pitr wal-push` of `file` into `url` with the push-ahead worker on (up to 4 ahead).
fn push_with_worker(url: &str, file: &std::path::Path, extra: &[&str]) -> std::process::Output {
    pitr()
        .args(["wal-push", "--repo", url, "--ahead", "4"])
        .args(extra)
        .arg(file)
        .output()
        .unwrap()
}

/// Waits until the push-ahead worker has recorded each of `segments` as stored.
fn wait_for_records(pg_wal: &std::path::Path, segments: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !segments
        .iter()
        .all(|s| pg_wal.join(format!(".pitr/push/{s}.ok")).exists())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{segments:?} were not pushed ahead"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pg_wal directory of its own (in the returned temp dir) holding `n` real segments, all
/// marked ready, as PostgreSQL leaves them for an archiver that is behind; the repository at
/// `url` is initialized for the cluster that wrote them.
pub(crate) fn ready_segments(url: &str, n: u64) -> (tempfile::TempDir, Vec<String>) {
    let (pg, archive) =
        Cluster::start_copy_archiving(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    crate::init_repo(url, &pg, None);
    let segments = pg.generate_wal_segments(n).unwrap();
    for seg in &segments {
        pg.wait_archived(seg, Duration::from_secs(60)).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let pg_wal = work.path().join("pg_wal");
    std::fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
    for seg in &segments {
        std::fs::copy(archive.join(seg), pg_wal.join(seg)).unwrap();
        std::fs::write(pg_wal.join(format!("archive_status/{seg}.ready")), b"").unwrap();
    }
    (work, segments)
}

#[test]
fn a_call_for_a_file_stored_ahead_is_answered_locally_and_rechecked_on_request() {
    let repo_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", repo_dir.path().display());
    // A pg_wal of our own, with three segments ready.
    let (work, segments) = ready_segments(&url, 3);
    let pg_wal = work.path().join("pg_wal");
    let push = |seg: &str, extra: &[&str]| {
        let out = push_with_worker(&url, &pg_wal.join(seg), extra);
        assert!(out.status.success(), "{out:?}");
    };
    push(&segments[0], &[]);
    let record = |seg: &str| pg_wal.join(format!(".pitr/push/{seg}.ok"));
    wait_for_records(&pg_wal, &segments[1..]);
    for seg in &segments[1..] {
        assert!(repo_dir.path().join(key(seg)).exists());
    }

    // The worker read each object back before recording it: the call itself needs no
    // round trip (the repository is out of reach for it here).
    let away = repo_dir.path().with_extension("away");
    std::fs::rename(repo_dir.path(), &away).unwrap();
    push(&segments[1], &[]);
    std::fs::rename(&away, repo_dir.path()).unwrap();
    assert!(!record(&segments[1]).exists());

    // With --recheck, an object that disappeared behind the record's back is uploaded again.
    let stored = repo_dir.path().join(key(&segments[2]));
    std::fs::remove_file(&stored).unwrap();
    push(&segments[2], &["--recheck"]);
    assert!(stored.exists(), "a record without its object was trusted");
    assert!(!record(&segments[2]).exists());
}

#[test]
fn a_record_is_not_trusted_for_a_file_that_changed() {
    let repo_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", repo_dir.path().display());
    let (work, segments) = ready_segments(&url, 2);
    let pg_wal = work.path().join("pg_wal");
    let push = |seg: &str| push_with_worker(&url, &pg_wal.join(seg), &[]);
    assert!(push(&segments[0]).status.success());
    wait_for_records(&pg_wal, &segments[1..]);
    // Another file under the same name (other bytes, so another identity): the record is
    // not the answer, the file is pushed and refused as a conflict.
    let file = pg_wal.join(&segments[1]);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, &bytes).unwrap();
    let out = push(&segments[1]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
}

#[test]
fn a_file_the_worker_cannot_store_is_refused_by_its_own_call() {
    let repo_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", repo_dir.path().display());
    let (work, segments) = ready_segments(&url, 2);
    let pg_wal = work.path().join("pg_wal");
    // The second segment is damaged in pg_wal: its page headers no longer say which
    // segment it is.
    let damaged = pg_wal.join(&segments[1]);
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes[8..16].copy_from_slice(&[0xFF; 8]);
    std::fs::write(&damaged, &bytes).unwrap();

    let push = |seg: &str| push_with_worker(&url, &pg_wal.join(seg), &[]);
    assert!(push(&segments[0]).status.success());
    // The worker could not store it; the call for it says why, with the bad-input code.
    let out = push(&segments[1]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&segments[1]), "{stderr}");
    assert!(!repo_dir.path().join(key(&segments[1])).exists());
    assert!(!pg_wal
        .join(format!(".pitr/push/{}.ok", segments[1]))
        .exists());
}

#[test]
fn fifty_segments_of_pgbench_wal_arrive_through_the_worker_each_as_written() {
    let s3 = S3Server::start().unwrap();
    let prefix = format!("{}/pgbench", s3.prefix());
    let url = format!("s3://{}/{prefix}", s3.bucket());
    // The default push-ahead worker is on: most calls are answered from its records.
    let (pg, copies, _) = archiving_to(&s3, &url);
    let first: u64 = pg
        .sql("SELECT pg_current_wal_lsn() - '0/0'")
        .unwrap()
        .parse()
        .unwrap();
    while pg
        .sql("SELECT pg_current_wal_lsn() - '0/0'")
        .unwrap()
        .parse::<u64>()
        .unwrap()
        < first + (50 << 20)
    {
        pg.pgbench(&["-i", "-s", "2", "-q"]).unwrap();
    }
    let last = pg.switch_wal().unwrap();
    pg.wait_archived(&last, Duration::from_secs(300)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&copies)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    names.sort();
    assert!(names.len() >= 50, "only {} segments archived", names.len());
    let store = objects(&s3, &prefix);
    for seg in &names {
        assert_eq!(
            get(&store, &key(seg)),
            std::fs::read(copies.join(seg)).unwrap(),
            "{seg} reads back as written"
        );
    }
    let failed: u64 = pg
        .sql("SELECT failed_count FROM pg_stat_archiver")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(failed, 0, "{}", pg.server_log());
}
