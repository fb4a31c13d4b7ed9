//! Full disks: a `file://` repository on a small tmpfs that fills while PostgreSQL
//! archives into it, then grows again; a restore into a directory too small for it.
//! Every failure must be a failure (an exit code PostgreSQL retries, a message naming the
//! full disk), and nothing PostgreSQL was told is archived may be missing afterwards.
//! Needs to mount tmpfs (root); otherwise the row says it did not run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testbed::{Cluster, ClusterOptions};

use crate::common::{archived_whole, conninfo, ok, PITR};
use crate::report::Row;
use crate::Scale;

/// A tmpfs mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u32) -> Option<Tmpfs> {
        let parent = tempfile::tempdir().ok()?;
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
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
        checked: format!("exit {:?}: {}", out.status.code(), line.trim()),
        wrong: u64::from(!loud),
        failed_loudly: u64::from(loud),
        injected: 1,
        compared: 1,
        secs: started.elapsed().as_secs_f64(),
        ..Row::default()
    });
    rows
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
