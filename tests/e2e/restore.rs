//! `pitr restore` end to end, the "host is gone" story: a cluster archives into the bed's
//! S3 server with `pitr wal-push` and is backed up with `pitr backup`; rows are committed in
//! batches; the cluster is stopped; each restore into a new directory, started by the real
//! server, comes back with exactly the batches its target says. Unreachable targets and
//! damaged chunks are refused with their exit codes, leaving nothing PostgreSQL would start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use testbed::{Cluster, ClusterOptions, S3Server, StopMode};

use crate::succeeds;

/// A cluster archiving into a repository with pitr wal-push, and pitr where its server can
/// run it (the restore_command names the binary that wrote it).
pub(crate) struct Source {
    pub(crate) s3: S3Server,
    pub(crate) url: String,
    pub(crate) pg: Cluster,
    pub(crate) bin: PathBuf,
}

impl Source {
    pub(crate) fn new(name: &str) -> Source {
        let s3 = S3Server::start().unwrap();
        let url = s3.repo_url(name);
        let mut options = ClusterOptions::default()
            .wal_segment_size_mb(1)
            .setting("track_commit_timestamp", "on");
        // 17's WAL summarizer (for incremental backups) on: pitr's backups stay full with
        // dedup, and a cluster that summarizes must back up and restore all the same.
        if testbed::PgBin::locate().is_ok_and(|b| b.major() >= 17) {
            options = options.setting("summarize_wal", "on");
        }
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
        Source { s3, url, pg, bin }
    }

    pub(crate) fn pitr(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.bin);
        c.envs(self.s3.env());
        c
    }

    pub(crate) fn socket(&self) -> String {
        crate::socket(&self.pg)
    }

    pub(crate) fn backup(&self) -> serde_json::Value {
        let out = succeeds(self.pitr().args([
            "backup",
            "--fast",
            "--json",
            "--repo",
            &self.url,
            "--pg",
            &self.socket(),
        ]));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Switches to a new segment and waits until everything so far is archived.
    pub(crate) fn archive_all(&self) {
        let seg = self.pg.switch_wal().unwrap();
        self.pg
            .wait_archived(&seg, Duration::from_secs(60))
            .unwrap();
    }

    pub(crate) fn restore(&self, to: &Path, args: &[&str]) -> Output {
        self.pitr()
            .args(["restore", "--repo", &self.url, "--to"])
            .arg(to)
            .args(args)
            .output()
            .unwrap()
    }
}

/// Starts a restored directory and waits until recovery is over (the target reached and
/// the server promoted).
pub(crate) fn start_restored(src: &Source, dir: &Path, archive: bool) -> Cluster {
    let options =
        ClusterOptions::default().setting("archive_mode", if archive { "on" } else { "off" });
    let mut pg = Cluster::adopt(dir, crate::s3_server_env(options, &src.s3, &src.url)).unwrap();
    pg.start().unwrap();
    crate::wait_promoted(&pg);
    pg
}

pub(crate) fn batches(pg: &Cluster) -> Vec<String> {
    pg.sql("SELECT coalesce(string_agg(DISTINCT batch::text, ',' ORDER BY batch::text), '') FROM t")
        .unwrap()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Commits batch `k` (100 rows) and returns its commit time and the WAL position after it.
pub(crate) fn commit_batch(pg: &Cluster, k: u32) -> (String, String) {
    pg.sql(&format!(
        "INSERT INTO t SELECT {k}, g FROM generate_series(1, 100) g"
    ))
    .unwrap();
    let time = pg
        .sql(&format!(
            "SELECT to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00' FROM t WHERE batch = {k} LIMIT 1"
        ))
        .unwrap();
    let lsn = pg.current_lsn().unwrap();
    (time, lsn)
}

/// `pitr restore` of the latest state of the repository at `url` into a new directory.
fn restore_latest(url: &str) -> (tempfile::TempDir, PathBuf, Output) {
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = crate::pitr()
        .args(["restore", "--repo", url, "--to"])
        .arg(&to)
        .output()
        .unwrap();
    (dirs, to, out)
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

#[test]
fn each_target_brings_back_exactly_the_batches_before_it() {
    let src = Source::new("targets");
    src.pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    src.backup();
    let mut commits = Vec::new();
    for k in 1..=4 {
        std::thread::sleep(Duration::from_millis(300));
        commits.push(commit_batch(&src.pg, k));
        if k == 2 {
            src.pg
                .sql("SELECT pg_create_restore_point('after-2')")
                .unwrap();
        }
    }
    let xid3 = src
        .pg
        .sql("SELECT xmin FROM t WHERE batch = 3 LIMIT 1")
        .unwrap();
    src.archive_all();
    // The host is gone.
    let mut pg = src.pg;
    pg.stop(StopMode::Immediate).unwrap();
    let src = Source { pg, ..src };

    let dirs = tempfile::tempdir().unwrap();
    let mut n = 0;
    let mut restore_and_count = |args: &[&str]| -> Vec<String> {
        n += 1;
        let to = dirs.path().join(format!("r{n}"));
        let mut all = vec!["--target-action", "promote"];
        all.extend_from_slice(args);
        let out = src.restore(&to, &all);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {err}");
        let spool = to.join("pg_wal/.pitr/fetch");
        if !args.contains(&"--prefetch-wal") {
            // Nothing staged while the files were written (the prefetch worker, started
            // once they are done, may be filling the spool already).
            assert!(!err.contains("pitr: restore: staged"), "{err}");
        } else {
            // Staged while the files were written, no longer (then the prefetch worker
            // carries on): how many depends on which finishes first, so the test only
            // checks what was said is what the spool holds. (It asked for all of them
            // once, and failed when the files of this small database won the race.)
            let staged = err
                .lines()
                .find_map(|l| l.strip_prefix("pitr: restore: staged "))
                .unwrap_or_else(|| panic!("{err}"));
            let (n, rest) = staged.split_once(" of ").unwrap();
            let of: usize = rest.split(' ').next().unwrap().parse().unwrap();
            let n: usize = n.parse().unwrap();
            assert!(n <= of && of > 0, "{staged}");
            assert!(std::fs::read_dir(&spool).unwrap().count() > n);
        }
        let pg = start_restored(&src, &to, false);
        batches(&pg)
    };
    // Between the commit of batch 2 and that of batch 3.
    let t2: walfmt::PgTimestamp = restore::target::parse_time(&commits[1].0).unwrap();
    let between = walfmt::PgTimestamp::from_unix_micros(t2.unix_micros() + 100_000).to_pg_utc();
    assert_eq!(
        restore_and_count(&["--target-time", &between, "--prefetch-wal"]),
        ["1", "2"]
    );
    // Recovery stopped at the target with staged and prefetched segments left ahead: once
    // nothing more is asked, the prefetch worker removes them.
    let spool = dirs.path().join("r1/pg_wal/.pitr/fetch");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<String> = std::fs::read_dir(&spool)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.len() == 24)
            .collect();
        if left.is_empty() && !repo::worker::running(&spool) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left in the spool: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // At batch 3's exact commit time: inclusive keeps it, exclusive stops just before.
    assert_eq!(
        restore_and_count(&["--target-time", &commits[2].0]),
        ["1", "2", "3"]
    );
    assert_eq!(
        restore_and_count(&["--target-time", &commits[2].0, "--target-exclusive"]),
        ["1", "2"]
    );
    assert_eq!(
        restore_and_count(&["--target-lsn", &commits[2].1]),
        ["1", "2", "3"]
    );
    assert_eq!(restore_and_count(&["--target-name", "after-2"]), ["1", "2"]);
    assert_eq!(restore_and_count(&["--target-xid", &xid3]), ["1", "2", "3"]);
    assert!(restore_and_count(&["--target-immediate"]).is_empty());
    // No target: everything archived; with the WAL staged while the files were written.
    assert_eq!(restore_and_count(&["--prefetch-wal"]), ["1", "2", "3", "4"]);
}

#[test]
fn a_backup_is_chosen_by_wal_position_whatever_the_backup_hosts_clock_said() {
    let src = Source::new("clock");
    src.pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    // Backups dated by a pitr host whose clock is behind: 20, then 10 minutes.
    let backup_skewed = |offset: &str| -> String {
        let out = succeeds(
            src.pitr()
                .args(["backup", "--fast", "--json", "--repo", &src.url, "--pg"])
                .arg(src.socket())
                .env("PITR_DEBUG_CLOCK_OFFSET", offset),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["id"].as_str().unwrap().to_owned()
    };
    let first = backup_skewed("-1200");
    let (t1, _) = commit_batch(&src.pg, 1);
    std::thread::sleep(Duration::from_millis(300));
    commit_batch(&src.pg, 2);
    // After batch 2, but its stop time (10 minutes behind) reads as before batch 1's commit.
    let second = backup_skewed("-600");
    assert!(first < second);
    src.archive_all();

    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = src.restore(
        &to,
        &["--target-time", &t1, "--target-action", "promote", "--json"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["backup"],
        first.as_str(),
        "the backup that ends before batch 2 in the WAL"
    );
    let restored = start_restored(&src, &to, false);
    assert_eq!(batches(&restored), ["1"]);
}

#[test]
fn unreachable_targets_and_bad_input_are_refused_before_anything_is_written() {
    let src = Source::new("refusals");
    src.pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    let before_backup = src.pg.sql("SELECT now()").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A transaction between the target and the backup: the backup holds it, so it cannot
    // be restored to a time before it (the WAL says so, whatever any clock says).
    src.pg.sql("INSERT INTO t VALUES (0, 0)").unwrap();
    src.backup();
    let (last_commit, _) = commit_batch(&src.pg, 1);
    src.archive_all();
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");

    let out = src.restore(&to, &["--target-time", &before_backup]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(9), "{err}");
    assert!(err.contains("before the end of the first backup"), "{err}");
    assert!(!to.exists(), "nothing written");

    let out = src.restore(&to, &["--target-time", "2099-01-01 00:00:00+00"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(9), "{err}");
    assert!(
        err.contains("after the latest archived transaction"),
        "{err}"
    );
    // The latest archived transaction: batch 1's commit, or one after it (autovacuum's
    // analyze of the new table commits too).
    let ours = last_commit
        .replace(' ', "T")
        .trim_end_matches("+00")
        .to_owned();
    let latest = err
        .split("HINT: the latest archived commit is ")
        .nth(1)
        .and_then(|rest| rest.split("Z:").next())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        latest >= &ours[..26],
        "{latest} is before batch 1's commit {ours}"
    );
    assert!(!to.exists());

    let out = src.restore(&to, &["--target-lsn", "FF/0"]);
    assert_eq!(
        code(&out),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = src.restore(&to, &["--target-time", "2026-05-14 03:00:00"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(3), "{err}");
    assert!(
        err.contains("has no time zone") && err.contains("HINT:"),
        "{err}"
    );

    let out = src.restore(&to, &["--target-name", "never-made"]);
    assert_eq!(
        code(&out),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = src.restore(&to, &["--backup", "20000101T000000Z"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(9), "{err}");
    assert!(
        err.contains("backup 20000101T000000Z is not in the repository"),
        "{err}"
    );

    std::fs::create_dir_all(&to).unwrap();
    std::fs::write(to.join("something"), b"x").unwrap();
    let out = src.restore(&to, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(3), "{err}");
    assert!(err.contains("is not empty"), "{err}");
    assert!(!to.join("PG_VERSION").exists());
}

#[test]
fn wal_stranded_behind_a_missing_segment_is_warned_of() {
    let src = Source::new("stranded");
    src.pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    src.backup();
    commit_batch(&src.pg, 1);
    src.archive_all();
    commit_batch(&src.pg, 2);
    // The segment batch 2 is in (past its first byte, so this names it, not the one before).
    let lost = src
        .pg
        .sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        .unwrap();
    src.archive_all();
    commit_batch(&src.pg, 3);
    src.archive_all();
    // The segment holding batch 2 disappears from the repository; later WAL stays.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for (k, v) in src.s3.env() {
            std::env::set_var(k, v);
        }
        let storage = repo::repository::storage_for(&src.url.parse().unwrap())
            .await
            .unwrap();
        let key = repo::keys::wal_key(&lost).unwrap();
        storage.delete(&[key]).await.unwrap();
    });
    let dirs = tempfile::tempdir().unwrap();
    let to = dirs.path().join("r");
    let out = src.restore(&to, &["--target-action", "promote"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "warning: WAL segment {lost} is not in the repository, but later WAL"
        )),
        "{err}"
    );
    let restored = start_restored(&src, &to, false);
    assert_eq!(
        batches(&restored),
        ["1"],
        "recovery stops before the gap: {err}\n{}",
        restored.server_log()
    );
}

#[test]
fn a_flipped_byte_in_a_chunk_fails_the_restore_naming_the_file_and_leaves_it_unstartable() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    pg.pgbench(&["-i", "-s", "2", "-q"]).unwrap();
    let repo = tempfile::tempdir().unwrap();
    let url = format!("file://{}/r", repo.path().display());
    crate::init_repo(&url, &pg, None);
    let socket = crate::socket(&pg);
    succeeds(crate::pitr().args(["backup", "--fast", "--wal", "--repo", &url, "--pg", &socket]));
    // Damage the middle of the largest pack.
    let mut packs: Vec<PathBuf> = walk(&repo.path().join("r/pack"));
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let pack = packs.last().unwrap();
    let mut bytes = std::fs::read(pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(pack, &bytes).unwrap();

    let (_dirs, to, out) = restore_latest(&url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(5), "{err}");
    assert!(err.contains("restore failed: file \""), "{err}");
    assert!(err.contains("is corrupt"), "{err}");
    assert!(err.contains("PostgreSQL will not start on it"), "{err}");
    assert!(to.join(restore::files::INCOMPLETE_MARKER).exists());
    assert!(!to.join("global/pg_control").exists());
    let mut broken = Cluster::adopt(&to, ClusterOptions::default()).unwrap();
    assert!(
        broken.start().is_err(),
        "PostgreSQL started on a damaged restore"
    );
}

#[test]
fn a_damaged_piece_of_the_chunk_table_is_named_and_nothing_is_written() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    let repo = tempfile::tempdir().unwrap();
    let url = format!("file://{}/r", repo.path().display());
    crate::init_repo(&url, &pg, None);
    let socket = crate::socket(&pg);
    succeeds(crate::pitr().args(["backup", "--fast", "--wal", "--repo", &url, "--pg", &socket]));
    let pieces: Vec<PathBuf> = walk(&repo.path().join("r/backup"))
        .into_iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("chunks")))
        .collect();
    assert_eq!(pieces.len(), 1, "{pieces:?}");
    let mut bytes = std::fs::read(&pieces[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&pieces[0], &bytes).unwrap();

    let (_dirs, to, out) = restore_latest(&url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(5), "{err}");
    assert!(err.contains("/chunks/000000"), "the piece is named: {err}");
    assert!(
        !to.exists(),
        "nothing is written before the backup is read whole"
    );
}

#[test]
fn a_tablespace_comes_back_where_the_map_puts_it() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    pg.create_tablespace("extra").unwrap();
    pg.sql("CREATE TABLE far TABLESPACE extra AS SELECT g FROM generate_series(1, 5000) g")
        .unwrap();
    let oid = pg
        .sql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
        .unwrap();
    let repo = tempfile::tempdir().unwrap();
    let url = format!("file://{}/r", repo.path().display());
    crate::init_repo(&url, &pg, None);
    let socket = crate::socket(&pg);
    succeeds(crate::pitr().args(["backup", "--fast", "--wal", "--repo", &url, "--pg", &socket]));

    let dirs = tempfile::tempdir().unwrap();
    let (to, moved) = (dirs.path().join("data"), dirs.path().join("moved-space"));
    // The restore_command names the pitr that wrote it: one the server's user can run.
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    let out = succeeds(
        std::process::Command::new(&bin)
            .args([
                "restore",
                "--target-immediate",
                "--target-action",
                "promote",
                "--repo",
                &url,
            ])
            .arg("--to")
            .arg(&to)
            .arg("--tablespace-map")
            .arg(format!("{oid}={}", moved.display())),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored backup"));
    let link = std::fs::read_link(to.join("pg_tblspc").join(&oid)).unwrap();
    assert_eq!(link, moved);
    assert_eq!(
        std::fs::metadata(&moved).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut restored = Cluster::adopt(&to, ClusterOptions::default()).unwrap();
    restored.os_user().give_tree(&moved).unwrap();
    // The repository's files are its owner's alone (0600): the server's user reads them.
    restored.os_user().give_tree(repo.path()).unwrap();
    restored.start().unwrap();
    crate::wait_promoted(&restored);
    assert_eq!(restored.sql("SELECT count(*) FROM far").unwrap(), "5000");
    assert_eq!(
        restored
            .sql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'extra'")
            .unwrap(),
        moved.display().to_string()
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn after_a_promote_a_restore_to_a_time_on_the_new_timeline_gets_its_writes() {
    let src = Source::new("timelines");
    src.pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    let id = src.backup()["id"].as_str().unwrap().to_owned();
    commit_batch(&src.pg, 1);
    src.archive_all();
    let mut old = src.pg;
    old.stop(StopMode::Immediate).unwrap();
    let src = Source { pg: old, ..src };

    // Restored and promoted: timeline 2, archiving into the same repository.
    let dirs = tempfile::tempdir().unwrap();
    let first = dirs.path().join("first");
    let out = src.restore(&first, &["--target-action", "promote"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let promoted = start_restored(&src, &first, true);
    promoted
        .sql(&format!(
            "ALTER SYSTEM SET archive_command = '''{}'' wal-push %p'",
            src.bin.display()
        ))
        .unwrap();
    promoted.sql("SELECT pg_reload_conf()").unwrap();
    assert_eq!(
        promoted
            .sql("SELECT timeline_id FROM pg_control_checkpoint()")
            .unwrap(),
        "2"
    );
    let (t2, _) = commit_batch(&promoted, 2);
    std::thread::sleep(Duration::from_millis(300));
    commit_batch(&promoted, 3);
    let seg = promoted.switch_wal().unwrap();
    promoted
        .wait_archived(&seg, Duration::from_secs(60))
        .unwrap();
    drop(promoted);

    let t2: walfmt::PgTimestamp = restore::target::parse_time(&t2).unwrap();
    let between = walfmt::PgTimestamp::from_unix_micros(t2.unix_micros() + 100_000).to_pg_utc();
    let second = dirs.path().join("second");
    let out = src.restore(
        &second,
        &["--target-time", &between, "--target-action", "promote"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("on timeline 2"), "{err}");

    // Along timeline 1 instead, the backup named: only what it held before the promote.
    // Started and archiving while `second` waits to be started, it makes timeline 3.
    let third = dirs.path().join("third");
    let out = src.restore(
        &third,
        &[
            "--target-timeline",
            "1",
            "--backup",
            &id,
            "--target-action",
            "promote",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("on timeline 1") && err.contains(&id), "{err}");
    let pg = start_restored(&src, &third, true);
    assert_eq!(batches(&pg), ["1"]);
    let timeline = |pg: &Cluster| {
        pg.sql("SELECT timeline_id FROM pg_control_checkpoint()")
            .unwrap()
    };
    assert_eq!(timeline(&pg), "3");
    pg.sql(&format!(
        "ALTER SYSTEM SET archive_command = '''{}'' wal-push %p'",
        src.bin.display()
    ))
    .unwrap();
    pg.sql("SELECT pg_reload_conf()").unwrap();
    pg.wait_archived("00000003.history", Duration::from_secs(60))
        .unwrap();
    drop(pg);

    // `second` recovers along timeline 2 as its restore planned (the history probes as
    // recovery starts are answered as the restore found the repository), and promotes to
    // timeline 4: the probe that numbers the new timeline sees timeline 3.
    let pg = start_restored(&src, &second, false);
    assert_eq!(batches(&pg), ["1", "2"]);
    assert_eq!(timeline(&pg), "4");

    // verify follows the newest timeline and reports the backup's own beside it.
    let out = src
        .pitr()
        .args(["verify", "--json", "--repo", &src.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = &v["backups"][0];
    assert_eq!(b["timeline"], 3, "{v}");
    assert_eq!(b["also"][0]["timeline"], 1, "{v}");
    assert_eq!(v["histories"], 2, "{v}");
}

/// `pitr restore --start`, run as the server's OS user: the restore starts PostgreSQL on
/// its directory and returns once the server has recovered and accepts writes, promoted
/// as a standby is (no waited end-of-recovery checkpoint), to a target and to the end of
/// the archive alike.
#[test]
fn restore_start_brings_the_server_up_at_the_target_without_the_waited_checkpoint() {
    let src = Source::new("start");
    src.pg.sql("CREATE TABLE t (batch int, n int)").unwrap();
    src.backup();
    commit_batch(&src.pg, 1);
    let (t2, _) = commit_batch(&src.pg, 2);
    std::thread::sleep(Duration::from_millis(300));
    commit_batch(&src.pg, 3);
    src.archive_all();
    let t2: walfmt::PgTimestamp = restore::target::parse_time(&t2).unwrap();
    let between = walfmt::PgTimestamp::from_unix_micros(t2.unix_micros() + 100_000).to_pg_utc();

    let user = src.pg.os_user().clone();
    let home = src.pg.server_dir("start-home").unwrap();
    let sock = src.pg.server_dir("start-sock").unwrap();
    let run = |name: &str, target: &[&str]| {
        let to = home.join(name);
        let port = testbed::free_port().unwrap().to_string(); // names the socket only
        let mut cmd = src.pitr();
        cmd.env("HOME", &home)
            .args(["restore", "--json", "--start", "--repo", &src.url, "--to"])
            .arg(&to)
            .arg("--pg-bin")
            .arg(src.pg.bin().dir())
            .args(target);
        for o in [
            format!("port={port}"),
            "listen_addresses=".to_owned(),
            format!("unix_socket_directories={}", sock.display()),
            "archive_mode=off".to_owned(),
            "log_checkpoints=on".to_owned(),
        ] {
            cmd.args(["--server-option", &o]);
        }
        user.apply(&mut cmd);
        let out = cmd.output().unwrap();
        let log = std::fs::read_to_string(to.join("log/pitr-start.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "{}\nserver log:\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["server"]["promoted_without_checkpoint_wait"], true,
            "{report}"
        );
        assert!(report["rto_seconds"].as_f64().unwrap() > 0.0, "{report}");
        // Up and writable the moment pitr returns; promoted, not paused or a standby.
        let pg = Cluster::attach(&to, ClusterOptions::default()).unwrap();
        assert_eq!(pg.sql("SELECT pg_is_in_recovery()").unwrap(), "f");
        pg.sql("CREATE TABLE written_after (x int); INSERT INTO written_after VALUES (1)")
            .unwrap();
        assert!(log.contains("received promote request"), "{log}");
        assert!(!log.contains("end-of-recovery"), "{log}");
        assert!(!to.join("standby.signal").exists() && !to.join("recovery.signal").exists());
        pg
    };

    let pg = run("at-target", &["--target-time", &between]);
    assert_eq!(batches(&pg), ["1", "2"]);
    drop(pg);
    let pg = run("at-end", &[]);
    assert_eq!(batches(&pg), ["1", "2", "3"]);
    drop(pg);

    // No pg_ctl where --pg-bin says: refused before anything is written.
    let to = home.join("no-pg-ctl");
    let mut cmd = src.pitr();
    cmd.env("HOME", &home)
        .args([
            "restore",
            "--start",
            "--pg-bin",
            "/nonexistent",
            "--repo",
            &src.url,
            "--to",
        ])
        .arg(&to);
    user.apply(&mut cmd);
    let out = cmd.output().unwrap();
    assert_eq!(
        code(&out),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pg_ctl"));
    assert!(!to.exists());

    // PostgreSQL will not run as root: refused before anything is written.
    if user.switches() {
        let to = home.join("as-root");
        let out = src.restore(&to, &["--start"]);
        assert_eq!(code(&out), Some(3));
        assert!(String::from_utf8_lossy(&out.stderr).contains("as root"));
        assert!(!to.exists());
    }
}
