//! A real KMS-compatible server for tests: moto's server (from PyPI) on a free 127.0.0.1
//! port, serving KMS offline. moto is installed on first use into a virtualenv under
//! `$HOME/.cache/pitr/moto-venv` (once per machine; concurrent test processes wait for the
//! one installing). The server is killed and reaped on drop, and exits by itself when the
//! test process dies without dropping it (it watches a pipe from the test process).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::temp_dir;

/// What goes into the venv: moto pinned, plus the two packages its server needs (moto's
/// `server` extra would add every other service's dependencies too, twice the download
/// and install time for nothing KMS uses).
const REQUIREMENTS: &[&str] = &["moto==5.2.6", "flask==3.1.3", "flask-cors==6.0.5"];
/// Written last into the venv: present and equal to the requirements means installed.
const MARKER: &str = ".pitr-installed";
const REGION: &str = "us-east-1";
/// moto accepts any credentials.
const ACCESS_KEY: &str = "pitr-test-kms-access";
const SECRET_KEY: &str = "pitr-test-kms-secret";
/// How long the server may take to start (Python imports moto's backends lazily; a second
/// is usual).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs moto's server on an ephemeral port chosen by the kernel (no race for a port), and
/// exits when standard input closes: the test process holds the only writer, so the server
/// goes when the test process does, however it ends.
const LAUNCHER: &str = r#"
import os, sys, threading
def watch():
    try:
        sys.stdin.buffer.read()
    finally:
        os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from moto.server import main
main(["-H", "127.0.0.1", "-p", "0"])
"#;

/// Creates a symmetric KMS key and prints its ARN.
const CREATE_KEY: &str = r#"
import sys, boto3
kms = boto3.client("kms", endpoint_url=sys.argv[1], region_name=sys.argv[2],
                   aws_access_key_id=sys.argv[3], aws_secret_access_key=sys.argv[4])
print(kms.create_key(Description="pitr test key")["KeyMetadata"]["Arn"])
"#;

/// moto's server for one test.
#[derive(Debug)]
pub struct KmsServer {
    child: Child,
    addr: SocketAddr,
    python: PathBuf,
    /// Holds the server's log (`PITR_TEST_KEEP=1` keeps it).
    dir: tempfile::TempDir,
}

impl KmsServer {
    /// Installs moto if needed (fails loudly if it cannot), starts its server and waits
    /// until it answers.
    pub fn start() -> Result<KmsServer> {
        let venv = ensure_moto()?;
        let python = venv.join("bin/python");
        let dir = temp_dir("pitr-bed-kms-")?;
        let log_path = dir.path().join("moto.log");
        let log = std::fs::File::create(&log_path).context("create the moto log")?;
        let mut child = Command::new(&python)
            .arg("-c")
            .arg(LAUNCHER)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start moto's server with {}", python.display()))?;
        let started = Instant::now();
        let port = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(port) = listening_port(&text) {
                break port;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "moto's server exited ({status}) before listening; its log ({}):\n{text}",
                    log_path.display()
                );
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "moto's server did not listen within {START_TIMEOUT:?}; its log ({}):\n{text}",
                    log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let server = KmsServer {
            child,
            addr: (Ipv4Addr::LOCALHOST, port).into(),
            python,
            dir,
        };
        server.wait_answering(started)?;
        Ok(server)
    }

    /// Polls moto's own API until it answers 200.
    fn wait_answering(&self, started: Instant) -> Result<()> {
        let mut last = String::new();
        while started.elapsed() < START_TIMEOUT {
            match http_get(self.addr, "/moto-api/data.json") {
                Ok(200) => return Ok(()),
                Ok(status) => last = format!("HTTP {status}"),
                Err(err) => last = format!("{err:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "moto's server on {} did not answer within {START_TIMEOUT:?} ({last}); its log: {}",
            self.addr,
            self.dir.path().join("moto.log").display()
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a symmetric encryption key; returns its ARN.
    pub fn create_key(&self) -> Result<String> {
        let out = Command::new(&self.python)
            .arg("-c")
            .arg(CREATE_KEY)
            .args([&self.endpoint(), REGION, ACCESS_KEY, SECRET_KEY])
            .stdin(Stdio::null())
            .output()
            .context("run the venv's python to create a KMS key")?;
        let arn = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || !arn.starts_with("arn:aws:kms:") {
            bail!(
                "creating a KMS key on {} failed ({}): {}{}",
                self.endpoint(),
                out.status,
                arn,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(arn)
    }

    /// What a pitr process needs to use this server: `AWS_ENDPOINT_URL_KMS`, the region,
    /// and credentials (moto takes any).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL_KMS", self.endpoint().as_str()),
            ("AWS_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

impl Drop for KmsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port in werkzeug's ` * Running on http://127.0.0.1:PORT` line, once the whole line
/// is there.
fn listening_port(log: &str) -> Option<u16> {
    let rest = log.split("Running on http://127.0.0.1:").nth(1)?;
    let (port, _) = rest.split_once('\n')?;
    port.trim().parse().ok().filter(|&p| p != 0)
}

/// The status of a plain HTTP/1.0 GET (a small, bounded exchange).
fn http_get(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        let n = conn.read(&mut head[len..])?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&head[..len]);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {head:?}"))
}

/// The venv holding moto, installed if it is not yet (under a lock, so that concurrent
/// test processes install once and the others wait for it).
fn ensure_moto() -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set: nowhere to install moto for the KMS tests")?;
    let cache = Path::new(&home).join(".cache/pitr");
    let venv = cache.join("moto-venv");
    let wanted = REQUIREMENTS.join("\n");
    let installed = |venv: &Path| {
        std::fs::read_to_string(venv.join(MARKER)).is_ok_and(|m| m == wanted)
            && venv.join("bin/python").exists()
    };
    if installed(&venv) {
        return Ok(venv);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let lock_path = cache.join("moto-venv.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("lock {}", lock_path.display()))?;
    // Another process may have installed it while this one waited.
    if installed(&venv) {
        return Ok(venv);
    }
    let started = Instant::now();
    eprintln!(
        "testbed: installing {} into {} (first use)",
        REQUIREMENTS.join(" "),
        venv.display()
    );
    install(&venv).with_context(|| {
        format!(
            "cannot install moto for the KMS tests into {} (needs python3 with the venv \
             module, Debian's python3-venv, and PyPI)",
            venv.display()
        )
    })?;
    std::fs::write(venv.join(MARKER), &wanted).context("mark the moto venv installed")?;
    eprintln!("testbed: moto installed in {:.1?}", started.elapsed());
    Ok(venv)
    // The lock is released when `lock` is dropped.
}

/// A fresh venv at `venv` with the requirements in it (a half-made one is removed first).
fn install(venv: &Path) -> Result<()> {
    if venv.exists() {
        std::fs::remove_dir_all(venv).with_context(|| format!("remove {}", venv.display()))?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    run(Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(REQUIREMENTS))?;
    Ok(())
}

/// Runs a command to completion; fails with its output when it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_from_werkzeug_log() {
        let log = "\x1b[31mWARNING: dev server\x1b[0m\n * Running on http://127.0.0.1:45163\n\x1b[33mPress CTRL+C\x1b[0m\n";
        assert_eq!(listening_port(log), Some(45163));
        assert_eq!(listening_port(" * Running on http://127.0.0.1:4"), None);
        assert_eq!(
            listening_port(" * Running on http://127.0.0.1:4\r\n"),
            Some(4)
        );
        assert_eq!(listening_port("starting"), None);
        assert_eq!(listening_port(" * Running on http://127.0.0.1:0\n"), None);
    }
}
