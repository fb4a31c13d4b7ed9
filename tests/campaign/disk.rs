//! Full disks: a `file://` repository on a small tmpfs that fills while PostgreSQL
//! archives into it, then grows again; a restore into a directory too small for it.
//! Every failure must be a failure (an exit code PostgreSQL retries, a message naming the
//! full disk), and nothing PostgreSQL was told is archived may be missing afterwards.
//! Needs to mount tmpfs (root); otherwise the row says it did not run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testbed::{Cluster, ClusterOptions};

use crate::common::{archived_whole, conninfo, ok, start_and_wait, PITR};
use crate::report::Row;
use crate::Scale;

/// A tmpfs mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u32) -> Option<Tmpfs> {
        Tmpfs::mount_kib(u64::from(mib) * 1024)
    }

    fn mount_kib(kib: u64) -> Option<Tmpfs> {
        let parent = tempfile::tempdir().ok()?;
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs {
            dir,
            _parent: parent,
        })
    }

    fn resize(&self, mib: u32) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m"), "tmpfs"])
            .arg(&self.dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {}", self.dir.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn pitr(url: &str) -> Command {
    let mut c = Command::new(PITR);
    c.env("PITR_REPO", url)
        .env_remove("PITR_CONFIG")
        .env("HOME", "/nonexistent");
    c
}

fn done_and_ready(pg: &Cluster) -> (Vec<String>, usize) {
    let mut done = Vec::new();
    let mut ready = 0;
    for e in std::fs::read_dir(pg.data_dir().join("pg_wal/archive_status"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_suffix(".done") {
            done.push(n.to_owned());
        } else if name.ends_with(".ready") {
            ready += 1;
        }
    }
    (done, ready)
}

pub fn run(_scale: Scale) -> Vec<Row> {
    let started = Instant::now();
    let Some(fs) = Tmpfs::mount(12) else {
        return vec![Row {
            scenario: "full disk: not run (mounting tmpfs needs root)".into(),
            skipped: true,
            ..Row::default()
        }];
    };
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    pg.os_user().give(&fs.dir).unwrap();
    let repo = fs.dir.join("repo");
    let url = format!("file://{}", repo.display());
    std::fs::create_dir(&repo).unwrap();
    pg.os_user().give(&repo).unwrap();
    let bin = pg.expose_binary(Path::new(PITR)).unwrap();
    pg.set_env("PITR_REPO", &url);
    for (name, value) in [
        (
            "archive_command",
            format!("'{}' wal-push %p", bin.display()),
        ),
        ("wal_keep_size", "4GB".into()),
        ("max_wal_size", "4GB".into()),
    ] {
        pg.set_config(name, &value).unwrap();
    }
    // As the server's user (whose archive_command writes there), with its copy of pitr.
    let mut init = Command::new(&bin);
    init.env("PITR_REPO", &url)
        .env_remove("PITR_CONFIG")
        .args(["init", "--data-dir"])
        .arg(pg.data_dir());
    pg.os_user().apply(&mut init);
    ok(&mut init);
    pg.start().unwrap();
    pg.sql("CREATE TABLE t (x text)").unwrap();
    // WAL that does not compress, until the repository's disk is full and archiving fails.
    let deadline = Instant::now() + Duration::from_secs(120);
    let full = loop {
        pg.sql("INSERT INTO t SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 64), generate_series(1, 300) g GROUP BY g")
            .unwrap();
        pg.sql("SELECT pg_switch_wal()").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let log = pg.server_log();
        if log.contains("No space left on device") && log.contains("archive command failed") {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    let log = pg.server_log();
    let said = log
        .lines()
        .find(|l| l.contains("No space left on device"))
        .unwrap_or("")
        .to_owned();
    let codes: Vec<String> = log
        .lines()
        .filter_map(|l| l.split("archive command failed with exit code ").nth(1))
        .map(|c| c.trim().to_owned())
        .collect();
    // The disk grows back: everything waiting is archived.
    fs.resize(512);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let _ = pg.sql("SELECT pg_switch_wal()");
        if done_and_ready(&pg).1 == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "archiving did not resume");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (done, _) = done_and_ready(&pg);
    let fetched = tempfile::tempdir().unwrap();
    let mut lost = 0;
    for name in &done {
        if let Err(why) = archived_whole(pitr(&url), &pg, name, fetched.path()) {
            eprintln!("campaign: {name} marked archived but {why}");
            lost += 1;
        }
    }
    let leftovers = walk(&repo)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
        })
        .count();
    let mut rows = vec![Row {
        scenario: "full disk: a file:// repository fills while PostgreSQL archives, then grows"
            .into(),
        runs: 1,
        faults: if full {
            format!(
                "disk full; wal-push exit codes {}; said: {}",
                dedup(&codes),
                said.split("pitr: ").nth(1).unwrap_or(&said).trim()
            )
        } else {
            "the disk never filled".into()
        },
        checked: format!(
            "{} files marked archived, each fetched back and compared; {leftovers} temp files left",
            done.len()
        ),
        lost: lost + leftovers as u64 + u64::from(!full),
        injected: u64::from(full),
        compared: done.len() as u64,
        secs: started.elapsed().as_secs_f64(),
        ..Row::default()
    }];

    // A restore into a directory too small for it.
    let started = Instant::now();
    let conn = conninfo(&pg);
    ok(pitr(&url).args(["backup", "--fast", "--pg", &conn]));
    let small = Tmpfs::mount(8).expect("a second tmpfs");
    let out = pitr(&url)
        .args(["restore", "--to"])
        .arg(small.dir.join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("pitr: error"))
        .unwrap_or("")
        .to_owned();
    let loud = !out.status.success() && err.contains("No space left on device");
    if !loud {
        eprintln!(
            "campaign: a restore onto a full disk: {:?} {err}",
            out.status.code()
        );
    }
    rows.push(Row {
        scenario: "full disk: a restore into a directory too small for the backup".into(),
        runs: 1,
        faults: "8 MiB for a 30 MB backup".into(),
        checked: format!(
            "exit {}: {}",
            out.status
                .code()
                .map_or_else(|| "by a signal".to_owned(), |c| c.to_string()),
            line.trim().replace('"', "")
        ),
        wrong: u64::from(!loud),
        failed_loudly: u64::from(loud),
        injected: 1,
        compared: 1,
        secs: started.elapsed().as_secs_f64(),
        ..Row::default()
    });
    rows.push(recovery_on_a_full_pg_wal(&pg, &url, &bin));
    rows
}

/// Bytes the files under `dir` take on disk (a restored file can be sparse).
fn used(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walk(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// A restored server whose pg_wal (where `pitr wal-fetch` writes each segment and its
/// prefetch spool) is on a disk without room for the next segment: recovery must stop
/// (wal-fetch fails above 125, PostgreSQL stops), not end early as if the archive ended
/// there; once the disk grows it must finish where the source was.
fn recovery_on_a_full_pg_wal(pg: &Cluster, url: &str, bin: &Path) -> Row {
    let started = Instant::now();
    // WAL the recovery will need, archived.
    for _ in 0..8 {
        pg.sql("INSERT INTO t SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 64), generate_series(1, 100) g GROUP BY g")
            .unwrap();
        pg.sql("SELECT pg_switch_wal()").unwrap();
    }
    let held = pg
        .sql("SELECT count(*) || '/' || sum(hashtext(x)) FROM t")
        .unwrap();
    let _ = pg.sql("SELECT pg_switch_wal()");
    let deadline = Instant::now() + Duration::from_secs(120);
    while done_and_ready(pg).1 > 0 {
        assert!(Instant::now() < deadline, "archiving did not finish");
        let _ = pg.sql("SELECT pg_switch_wal()");
        std::thread::sleep(Duration::from_millis(300));
    }
    // wal-fetch itself onto a full disk: an error that stops recovery (above 125), never
    // "not found" (1), and nothing half-written left where PostgreSQL reads.
    let seg = done_and_ready(pg)
        .0
        .into_iter()
        .max()
        .expect("an archived segment");
    let full = Tmpfs::mount_kib(512).expect("a tmpfs for wal-fetch");
    let _ = std::fs::write(full.dir.join("ballast"), vec![0u8; 1 << 20]);
    let fetched = pitr(url)
        .env("PITR_WAL_FETCH_PREFETCH", "0")
        .args(["wal-fetch", &seg])
        .arg(full.dir.join("RECOVERYXLOG"))
        .output()
        .unwrap();
    let fetch_code = fetched.status.code();
    let fetch_left: Vec<PathBuf> = walk(&full.dir)
        .into_iter()
        .filter(|p| !p.ends_with("ballast"))
        .collect();
    let fetch_loud = fetch_code.is_some_and(|c| c > 125)
        && String::from_utf8_lossy(&fetched.stderr).contains("No space left on device")
        && fetch_left.is_empty();
    if !fetch_loud {
        eprintln!(
            "campaign: wal-fetch onto a full disk: exit {fetch_code:?}, left {fetch_left:?}: {}",
            String::from_utf8_lossy(&fetched.stderr)
        );
    }
    drop(full);

    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("data");
    let mut restore = Command::new(bin);
    restore
        .env("PITR_REPO", url)
        .env_remove("PITR_CONFIG")
        .env("HOME", "/nonexistent")
        .args([
            "restore",
            "--archive-mode",
            "off",
            "--target-action",
            "promote",
            "--to",
        ])
        .arg(&to);
    ok(&mut restore);
    let mut restored =
        Cluster::adopt(&to, ClusterOptions::default().env("PITR_REPO", url)).unwrap();
    // pg_wal moved onto a tmpfs with 64 KiB to spare (a segment is 1 MiB): the first of
    // wal-fetch and PostgreSQL to write a segment there meets the full disk.
    let wal = to.join("pg_wal");
    let need = used(&wal) / 1024 + 64;
    let walfs = Tmpfs::mount_kib(need).expect("a tmpfs for pg_wal");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(wal.join("."))
        .arg(&walfs.dir)
        .status()
        .unwrap();
    assert!(copied.success(), "copy pg_wal");
    std::fs::remove_dir_all(&wal).unwrap();
    std::os::unix::fs::symlink(&walfs.dir, &wal).unwrap();
    restored.os_user().give_tree(&walfs.dir).unwrap();
    restored.os_user().give_tree(&wal).unwrap();

    let promoted_full = start_and_wait(&mut restored);
    let log = restored.server_log();
    let said = log
        .lines()
        .find(|l| l.contains("No space left on device"))
        .map(|l| match (l.split_once("pitr: "), l.split_once(":  ")) {
            (Some((_, said)), _) => format!("pitr wal-fetch: {}", said.trim()),
            (None, Some((_, said))) => format!("PostgreSQL: {}", said.trim().replace('"', "")),
            _ => l.trim().to_owned(),
        })
        .unwrap_or_default();
    let stopped_loudly = !promoted_full && !said.is_empty();
    if !stopped_loudly {
        eprintln!(
            "campaign: recovery with a full pg_wal {}: {}",
            if promoted_full {
                "ended and promoted"
            } else {
                "stopped, not for the full disk"
            },
            crate::common::tail(&log)
        );
    }
    // The disk grows: recovery goes on to the end.
    walfs.resize(512);
    let finished = !promoted_full && start_and_wait(&mut restored);
    let got = if finished {
        restored
            .sql("SELECT count(*) || '/' || sum(hashtext(x)) FROM t")
            .unwrap_or_default()
    } else {
        String::new()
    };
    let exact = finished && got == held;
    if !exact {
        eprintln!(
            "campaign: recovery after the disk grew: {got}, held {held}: {}",
            crate::common::tail(&restored.server_log())
        );
    }
    let _ = restored.stop(testbed::StopMode::Immediate);
    Row {
        scenario: "full disk: recovery with pg_wal (where wal-fetch and its prefetch spool write) on a disk without room for a segment, then grown".into(),
        runs: 1,
        faults: format!("{need} KiB for pg_wal; said: {said}"),
        checked: format!(
            "recovery stopped instead of ending early: {}; after the disk grew it finished where the source was: {}; wal-fetch alone onto a full disk: exit {}, nothing left: {}",
            if stopped_loudly { "yes" } else { "no" },
            if exact { "yes" } else { "no" },
            fetch_code.map_or_else(|| "by a signal".to_owned(), |c| c.to_string()),
            if fetch_left.is_empty() { "yes" } else { "no" }
        ),
        wrong: u64::from(!stopped_loudly) + u64::from(!exact) + u64::from(!fetch_loud),
        failed_loudly: u64::from(stopped_loudly) + u64::from(fetch_loud),
        injected: 2,
        compared: u64::from(exact),
        secs: started.elapsed().as_secs_f64(),
        ..Row::default()
    }
}

fn dedup(codes: &[String]) -> String {
    let mut c: Vec<&String> = codes.iter().collect();
    c.sort();
    c.dedup();
    c.into_iter().cloned().collect::<Vec<_>>().join(", ")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
