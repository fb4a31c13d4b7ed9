//! A throwaway PostgreSQL cluster: initdb'd in a temp dir (or adopted from an existing data
//! dir), started on a free 127.0.0.1 port with a private socket dir, torn down on drop.

mod config;
mod sql;
mod watchdog;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub use config::{PASSWORD, PASSWORD_ROLES, SUPERUSER};

use crate::{port::free_port, temp_dir, OsUser, PgBin};
use watchdog::Watchdog;

/// How `pg_ctl stop` shuts the server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for clients to disconnect.
    Smart,
    /// Roll back and disconnect clients, then a shutdown checkpoint.
    Fast,
    /// No checkpoint: the next start runs crash recovery (the "host is gone" stop).
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// How to make a cluster. `Default` gives archive_mode on with no archive_command.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    archive_command: Option<String>,
    settings: Vec<(String, String)>,
    env: Vec<(String, String)>,
    wal_segment_size_mb: Option<u32>,
    durable: bool,
    bin: Option<PgBin>,
}

impl ClusterOptions {
    /// The server's archive_command (PostgreSQL's `%p`/`%f` apply). Without one, archive_mode
    /// is still on and segments wait as `.ready` in `pg_wal/archive_status`.
    pub fn archive_command(mut self, command: impl Into<String>) -> Self {
        self.archive_command = Some(command.into());
        self
    }

    /// Any other postgresql.conf setting (written after the bed's own, so it wins).
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// An environment variable for the server and so for its archive and restore commands.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// `initdb --wal-segsize` in MiB (a power of two, 1 to 1024).
    pub fn wal_segment_size_mb(mut self, mb: u32) -> Self {
        self.wal_segment_size_mb = Some(mb);
        self
    }

    /// fsync on (off by default: the OS does not crash under a test, and it is much faster).
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// Server binaries to use instead of [`PgBin::locate`].
    pub fn bin(mut self, bin: PgBin) -> Self {
        self.bin = Some(bin);
        self
    }
}

/// A PostgreSQL cluster owned by one test.
#[derive(Debug)]
pub struct Cluster {
    bin: PgBin,
    user: OsUser,
    root: tempfile::TempDir,
    data_dir: PathBuf,
    port: u16,
    env: Vec<(String, String)>,
    running: bool,
    needs_roles: bool,
    watchdog: Option<Watchdog>,
    /// The socket dir of a server the bed did not start ([`Cluster::attach`]).
    socket: Option<PathBuf>,
}

impl Cluster {
    /// initdb (with data checksums) and start a new cluster.
    pub fn start_new(options: ClusterOptions) -> Result<Cluster> {
        let mut cluster = Cluster::init(options)?;
        cluster.start()?;
        Ok(cluster)
    }

    /// initdb and start a cluster whose archive_command copies each file into a dir of the
    /// bed's (PostgreSQL's documented `cp` example), returned beside it: archived WAL for
    /// tests and benches that do not exercise pitr's own archiving.
    pub fn start_copy_archiving(options: ClusterOptions) -> Result<(Cluster, PathBuf)> {
        let mut cluster = Cluster::init(options)?;
        let archive = cluster.server_dir("archive")?;
        cluster.set_config(
            "archive_command",
            &format!("cp %p '{}/%f'", archive.display()),
        )?;
        cluster.start()?;
        Ok((cluster, archive))
    }

    /// initdb a new cluster and write its configuration, without starting it.
    pub fn init(options: ClusterOptions) -> Result<Cluster> {
        let bin = match &options.bin {
            Some(bin) => bin.clone(),
            None => PgBin::locate()?,
        };
        let user = OsUser::for_server()?;
        let root = Cluster::make_root(&user)?;
        let data_dir = root.path().join("data");

        let mut initdb = Command::new(bin.tool("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--data-checksums",
                "--no-sync",
            ])
            .args(["--encoding=UTF8", "--locale=C"]);
        if let Some(mb) = options.wal_segment_size_mb {
            initdb.arg(format!("--wal-segsize={mb}"));
        }
        let out = run_as(&user, root.path(), &[], &mut initdb)?;
        if !out.status.success() {
            bail!("initdb failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }

        let block = config::settings_block(
            options.archive_command.as_deref(),
            options.durable,
            &options.settings,
        );
        append(&data_dir.join("postgresql.conf"), &block)?;
        std::fs::write(data_dir.join("pg_hba.conf"), config::hba()).context("write pg_hba.conf")?;

        let watchdog = Watchdog::arm(&data_dir)?;
        Ok(Cluster {
            bin,
            user,
            root,
            data_dir,
            port: free_port()?,
            env: options.env,
            running: false,
            needs_roles: true,
            watchdog: Some(watchdog),
            socket: None,
        })
    }

    /// Takes charge of an existing data dir (a restored one, say), without starting it. The
    /// dir is handed to the server user; it is not deleted on drop. `options` may add
    /// settings and environment; initdb options are ignored.
    pub fn adopt(data_dir: &Path, options: ClusterOptions) -> Result<Cluster> {
        let bin = match &options.bin {
            Some(bin) => bin.clone(),
            None => PgBin::locate()?,
        };
        let user = OsUser::for_server()?;
        let root = Cluster::make_root(&user)?;
        let data_dir = data_dir
            .canonicalize()
            .with_context(|| format!("data dir {}", data_dir.display()))?;
        if !data_dir.join("PG_VERSION").is_file() {
            bail!(
                "{} is not a PostgreSQL data dir (no PG_VERSION)",
                data_dir.display()
            );
        }
        user.give_tree(&data_dir)?;
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))?;
        make_reachable(&user, &data_dir)?;
        if options.archive_command.is_some() || !options.settings.is_empty() {
            let mut settings = options.settings.clone();
            if let Some(cmd) = &options.archive_command {
                settings.insert(0, ("archive_command".to_owned(), cmd.clone()));
            }
            let mut block = String::from("\n# --- written by the pitr test bed\n");
            for (name, value) in &settings {
                block.push_str(&format!("{name} = {}\n", config::quote(value)));
            }
            append(&data_dir.join("postgresql.conf"), &block)?;
        }
        let watchdog = Watchdog::arm(&data_dir)?;
        Ok(Cluster {
            bin,
            user,
            root,
            data_dir,
            port: free_port()?,
            env: options.env,
            running: false,
            needs_roles: false,
            watchdog: Some(watchdog),
            socket: None,
        })
    }

    /// Takes charge of a server something else started on `data_dir` (`pitr restore
    /// --start`, say): port and socket dir come from its `postmaster.pid`. The bed stops it
    /// on drop like its own.
    pub fn attach(data_dir: &Path, options: ClusterOptions) -> Result<Cluster> {
        let text = std::fs::read_to_string(data_dir.join("postmaster.pid"))
            .with_context(|| format!("no running server on {}", data_dir.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        let (Some(port), Some(socket)) = (lines.get(3), lines.get(4)) else {
            bail!("postmaster.pid of {} is too short", data_dir.display());
        };
        let port = port.trim().parse().context("port in postmaster.pid")?;
        let mut cluster = Cluster::adopt(data_dir, options)?;
        cluster.port = port;
        cluster.socket = Some(PathBuf::from(socket.trim()));
        cluster.running = true;
        Ok(cluster)
    }

    /// The bed's own dir for this cluster: socket, log, exposed binaries, server dirs.
    fn make_root(user: &OsUser) -> Result<tempfile::TempDir> {
        let root = temp_dir("pitr-bed-pg-")?;
        user.give(root.path())?;
        let sock = root.path().join("sock");
        std::fs::create_dir(&sock)?;
        user.give(&sock)?;
        Ok(root)
    }

    /// Starts the server and waits until it accepts connections. A lost race for the port
    /// is retried on another one.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("cluster {} is already running", self.data_dir.display());
        }
        // Started once and gone by itself since (a FATAL in recovery, say).
        self.running = false;
        for attempt in 0.. {
            let log_len_before = std::fs::metadata(self.log_path()).map_or(0, |m| m.len());
            let options = format!(
                "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
                self.port,
                config::quote(&self.socket_dir().display().to_string())
            );
            let mut pg_ctl = Command::new(self.bin.tool("pg_ctl"));
            pg_ctl
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "120", "-o", &options, "start"]);
            let out = run_as(
                &self.user,
                self.root.path(),
                &self.server_env(),
                &mut pg_ctl,
            )?;
            if out.status.success() {
                self.running = true;
                break;
            }
            let log = self.server_log();
            let new_lines = log.get(log_len_before as usize..).unwrap_or(&log);
            if attempt < 5 && new_lines.contains("could not bind") {
                self.port = free_port()?;
                continue;
            }
            bail!(
                "pg_ctl start failed: {}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                tail(new_lines, 30)
            );
        }
        if self.needs_roles {
            self.sql(&config::roles_sql())
                .context("create the password roles")?;
            self.needs_roles = false;
        }
        Ok(())
    }

    /// Stops the server and waits for it to be gone.
    pub fn stop(&mut self, mode: StopMode) -> Result<()> {
        // Never started, or stopped by itself since (nothing left to stop).
        if !self.is_running() {
            self.running = false;
            return Ok(());
        }
        let postmaster = self.postmaster_pid();
        let mut pg_ctl = Command::new(self.bin.tool("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode.as_arg(), "-w", "-t", "120", "stop"]);
        let out = run_as(
            &self.user,
            self.root.path(),
            &self.server_env(),
            &mut pg_ctl,
        )?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.running = false;
        // pg_ctl -w returns once postmaster.pid is gone, which the postmaster removes on
        // its way out, a moment before it has exited: wait for the process itself, so that
        // a stopped cluster has no process left (a test found one alive right after).
        if let Some(pid) = postmaster {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while process_running(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// A fast stop, then a start on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop(StopMode::Fast)?;
        self.start()
    }

    /// Whether the bed started the server and its postmaster still runs (a server can stop
    /// by itself: a FATAL in the startup process, say).
    pub fn is_running(&self) -> bool {
        self.running && self.postmaster_pid().is_some_and(process_running)
    }

    /// Pid of the postmaster, from `postmaster.pid`, while one is there.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Appends a setting to postgresql.conf (takes effect at the next start or reload).
    pub fn set_config(&self, name: &str, value: &str) -> Result<()> {
        append(
            &self.data_dir.join("postgresql.conf"),
            &format!("{name} = {}\n", config::quote(value)),
        )
    }

    /// Sets an environment variable for the server from its next start on.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// Copies an executable (the `pitr` binary, say) to where the server user can run it;
    /// returns its new path for use in archive_command or restore_command.
    pub fn expose_binary(&self, src: &Path) -> Result<PathBuf> {
        let dir = self.root.path().join("bin");
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let name = src.file_name().context("binary path has no file name")?;
        let dest = dir.join(name);
        // Copied by another process: a file this (multi-threaded) process held open for
        // writing would be inherited by any child another thread forks meanwhile, until
        // that child's exec, and running the copy then fails with ETXTBSY ("Text file
        // busy"; a test met it). cp's own descriptor goes when cp exits.
        let status = std::process::Command::new("cp")
            .arg("--")
            .arg(src)
            .arg(&dest)
            .status()
            .with_context(|| format!("run cp {} {}", src.display(), dest.display()))?;
        anyhow::ensure!(
            status.success(),
            "cp {} {}: {status}",
            src.display(),
            dest.display()
        );
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
        Ok(dest)
    }

    /// A dir the server user owns, for archive_command targets and the like.
    pub fn server_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir)?;
        self.user.give(&dir)?;
        Ok(dir)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The private Unix socket dir.
    pub fn socket_dir(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.root.path().join("sock"))
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// libpq key=value connection string for the superuser over TCP.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres",
            self.port
        )
    }

    /// The server binaries in use.
    pub fn bin(&self) -> &PgBin {
        &self.bin
    }

    /// The OS user the server runs as.
    pub fn os_user(&self) -> &OsUser {
        &self.user
    }

    /// Path of the server log.
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    /// The whole server log so far.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until `pg_wal/archive_status/<file>.done` exists: the server's archive_command
    /// returned 0 for that file.
    pub fn wait_archived(&self, file: &str, timeout: Duration) -> Result<()> {
        let done = self
            .data_dir
            .join("pg_wal/archive_status")
            .join(format!("{file}.done"));
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if done.exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let archiver = self
            .sql("SELECT archived_count, last_archived_wal, failed_count, last_failed_wal FROM pg_stat_archiver")
            .unwrap_or_else(|e| e.to_string());
        bail!(
            "{file} was not archived within {timeout:?} (pg_stat_archiver: {archiver})\nserver log:\n{}",
            tail(&self.server_log(), 30)
        )
    }

    /// Waits until this server (a standby) has replayed `primary`'s WAL up to where the
    /// primary is now.
    pub fn wait_replayed(&self, primary: &Cluster, timeout: Duration) -> Result<()> {
        let lsn = primary.current_lsn()?;
        let deadline = std::time::Instant::now() + timeout;
        while self.sql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'"))? != "t" {
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the standby did not replay up to {lsn} within {timeout:?}\nserver log:\n{}",
                    tail(&self.server_log(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Environment of server-side commands: the caller's, a private HOME, no PG* variables
    /// that would point pg_ctl or the archive command elsewhere.
    fn server_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("HOME".to_owned(), self.root.path().display().to_string())];
        env.extend(self.env.iter().cloned());
        env
    }
}

/// Whether process `pid` exists and is not a zombie.
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            if let Err(err) = self.stop(StopMode::Immediate) {
                eprintln!("testbed: stopping {}: {err:#}", self.data_dir.display());
            }
        }
        // After a failed stop the watchdog stays armed and fires when the process ends.
        if !self.running {
            if let Some(watchdog) = self.watchdog.take() {
                watchdog.disarm();
            }
        }
    }
}

/// Runs a server-side command as the server user, in `cwd`, with the server environment.
fn run_as(
    user: &OsUser,
    cwd: &Path,
    env: &[(String, String)],
    cmd: &mut Command,
) -> Result<Output> {
    for var in [
        "PGDATA",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGOPTIONS",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(cwd).envs(env.iter().map(|(k, v)| (k, v)));
    user.apply(cmd);
    cmd.output()
        .with_context(|| format!("run {:?}", cmd.get_program()))
}

/// Appends text to a file, keeping its owner.
fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

/// The server user must traverse every parent of an adopted data dir. Dirs the bed or a test
/// made under the temp dir get o+x; anything else is left alone and reported.
fn make_reachable(user: &OsUser, data_dir: &Path) -> Result<()> {
    if !user.switches() {
        return Ok(());
    }
    let tmp = std::env::temp_dir().canonicalize()?;
    let mut dir = data_dir.parent();
    while let Some(d) = dir {
        let mode = std::fs::metadata(d)?.permissions().mode();
        if mode & 0o001 == 0 {
            if d.starts_with(&tmp) && d != tmp {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o711))?;
            } else {
                bail!(
                    "the server user cannot reach {} (mode {:o} on {})\n\
                     HINT: put data dirs for the bed under {}",
                    data_dir.display(),
                    mode & 0o777,
                    d.display(),
                    tmp.display()
                );
            }
        }
        dir = d.parent();
    }
    Ok(())
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
