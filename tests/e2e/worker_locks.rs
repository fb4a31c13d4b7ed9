//! The background workers of `wal-push` and `wal-fetch` are one per directory by a kernel
//! lock held for the worker's lifetime: PostgreSQL's archiver is never held by a lock file
//! naming a process that is not a worker (an older pitr's `worker.pid`, a recycled process
//! id), a call waiting for a worker answers within its `--timeout`, and a worker killed
//! with SIGKILL takes its lock with it.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::pitr;
use crate::wal_push::{key, ready_segments};

/// A process the test started, killed (if still running) and reaped when dropped, so that
/// none outlives the test, stopped or not.
struct Process(Child);

impl Process {
    /// A live process that is not a pitr worker.
    fn bystander() -> Process {
        Process(Command::new("sleep").arg("600").spawn().unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd`, failing the test (and killing it) if it has not exited after `limit`.
fn answers_within(cmd: &mut Command, limit: Duration) -> Output {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no answer within {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Waits until no worker holds the lock in `dir` (each lingers a few seconds after its
/// last file), so that none outlives the test.
fn wait_no_worker(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while repo::worker::running(dir) {
        assert!(
            Instant::now() < deadline,
            "a worker in {dir:?} did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads `name` back from the repository at `url` with `wal-fetch` (no prefetch).
fn fetched(url: &str, name: &str, into: &Path) -> Vec<u8> {
    let dest = into.join(name);
    crate::succeeds(
        pitr()
            .args(["wal-fetch", "--prefetch", "0", "--repo", url, name])
            .arg(&dest),
    );
    std::fs::read(dest).unwrap()
}

#[test]
fn an_old_worker_pid_naming_a_live_process_holds_neither_wal_push_nor_wal_fetch() {
    let repo_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", repo_dir.path().display());
    let (work, segments) = ready_segments(&url, 3);
    let pg_wal = work.path().join("pg_wal");
    let state = pg_wal.join(".pitr/push");
    std::fs::create_dir_all(&state).unwrap();
    let mut bystander = Process::bystander();
    std::fs::write(state.join("worker.pid"), bystander.pid().to_string()).unwrap();

    // Reproduced before the kernel held the lock: the call waited on `sleep` for good.
    let out = answers_within(
        pitr()
            .args(["wal-push", "--timeout", "10", "--repo", &url])
            .arg(pg_wal.join(&segments[0])),
        Duration::from_secs(10 + 20),
    );
    assert!(out.status.success(), "{out:?}");
    // The call started a worker all the same, which stores the files ready after it.
    for seg in &segments {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !repo_dir.path().join(key(seg)).exists() {
            assert!(Instant::now() < deadline, "{seg} was not stored");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    wait_no_worker(&state);
    assert!(
        !state.join("worker.pid").exists(),
        "the old file is cleared"
    );
    assert!(
        bystander.alive(),
        "a process that is not a worker was touched"
    );

    // The same in a wal-fetch spool: the prefetch worker still starts and fills it.
    let restore_dir = tempfile::tempdir().unwrap();
    let to_wal = restore_dir.path().join("pg_wal");
    let spool = to_wal.join(".pitr/fetch");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("worker.pid"), bystander.pid().to_string()).unwrap();
    let out = answers_within(
        pitr()
            .args(["wal-fetch", "--repo", &url, &segments[0]])
            .arg(to_wal.join("RECOVERYXLOG")),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !segments[1..].iter().all(|s| spool.join(s).exists()) {
        assert!(Instant::now() < deadline, "the spool was not filled");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing more is asked: the worker exits.
    wait_no_worker(&spool);
    assert!(bystander.alive());
}

#[test]
fn a_call_waiting_on_a_stuck_worker_answers_in_time_and_a_killed_worker_holds_nothing() {
    let repo_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", repo_dir.path().display());
    let (work, segments) = ready_segments(&url, 1);
    let pg_wal = work.path().join("pg_wal");
    let seg = &segments[0];
    let file = pg_wal.join(seg);
    let state = pg_wal.join(".pitr/push");
    // A worker with nothing ready yet, stopped (SIGSTOP) while it holds its lock: as stuck
    // as a worker can be.
    let ready = pg_wal.join(format!("archive_status/{seg}.ready"));
    std::fs::remove_file(&ready).unwrap();
    let mut worker = Process(
        pitr()
            .args(["wal-push-worker", "--repo", &url, "--pg-wal"])
            .arg(&pg_wal)
            .spawn()
            .unwrap(),
    );
    let pid = rustix::process::Pid::from_child(&worker.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !repo::worker::running(&state) {
        assert!(
            Instant::now() < deadline,
            "the worker did not take its lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    std::fs::write(&ready, b"").unwrap();

    // PostgreSQL's call waits for the worker, but no longer than its --timeout.
    let out = answers_within(
        pitr()
            .args(["wal-push", "--timeout", "3", "--repo", &url])
            .arg(&file),
        Duration::from_secs(3 + 20),
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the background worker did not store it within 3 s"),
        "{stderr}"
    );
    assert!(!repo_dir.path().join(key(seg)).exists());

    // Killed, the worker leaves its lock file but not its lock: the next call stores the
    // file.
    worker.0.kill().unwrap();
    worker.0.wait().unwrap();
    assert!(state.join(repo::worker::LOCK_FILE).exists());
    let out = answers_within(
        pitr()
            .args(["wal-push", "--timeout", "30", "--repo", &url])
            .arg(&file),
        Duration::from_secs(30 + 20),
    );
    assert!(out.status.success(), "{out:?}");
    wait_no_worker(&state);
    let back = tempfile::tempdir().unwrap();
    assert_eq!(
        fetched(&url, seg, back.path()),
        std::fs::read(&file).unwrap()
    );
}
