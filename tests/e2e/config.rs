//! The configuration file end to end: `archive_command = 'pitr wal-push %p'` with the
//! repository and its S3 settings only in the file the server's `PITR_CONFIG` names (the
//! credentials alone in its environment); the precedence flag > environment > file shown by
//! `pitr config --json` with each source; a file others can write, and an unknown key,
//! refused with exit 3 naming the file (and line); named repositories; a restore_command
//! that runs with an empty environment.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use testbed::{Cluster, ClusterOptions, S3Server};

use crate::{json, succeeds};

/// Writes `text` as a config file only its owner can write (0644), readable by the server.
fn config_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("pitr.toml");
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// A directory for the config file like /etc/pitr: the bed's (root's when it runs as root:
/// a directory the server's user could write would let it replace root's configuration),
/// readable by the server's user.
fn etc_dir(pg: &Cluster) -> std::path::PathBuf {
    let dir = pg.server_dir("etc").unwrap();
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// pitr with no repository or S3 setting in its environment but the credentials.
fn bare_pitr(s3: &S3Server) -> std::process::Command {
    bare(crate::pitr(), s3)
}

/// `c` (a pitr command) with no repository or S3 setting in its environment but the
/// credentials.
fn bare(mut c: std::process::Command, s3: &S3Server) -> std::process::Command {
    for var in [
        "PITR_REPO",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "PITR_S3_PATH_STYLE",
        "PITR_CONFIG",
    ] {
        c.env_remove(var);
    }
    c.env("AWS_ACCESS_KEY_ID", s3.access_key())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_key());
    c
}

#[test]
fn archive_command_needs_only_the_config_file_and_precedence_is_flag_env_file() {
    let s3 = S3Server::start_local().unwrap();
    let url = s3.repo_url("cfg");
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let dir = etc_dir(&pg);
    let file = config_file(
        &dir,
        &format!(
            "[s3]\nendpoint = \"{}\"\nregion = \"{}\"\npath-style = true\n\n[repo]\nurl = \"{url}\"\n\n[repo.other]\nurl = \"file:///nonexistent/other\"\n",
            s3.endpoint(),
            s3.region()
        ),
    );
    // Owned by root (the bed), readable by the server's user: as /etc/pitr/pitr.toml.
    succeeds(
        bare_pitr(&s3)
            .env("PITR_CONFIG", &file)
            .args(["init", "--data-dir"])
            .arg(pg.data_dir()),
    );
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    pg.set_env("PITR_CONFIG", file.to_str().unwrap());
    pg.set_env("AWS_ACCESS_KEY_ID", s3.access_key());
    pg.set_env("AWS_SECRET_ACCESS_KEY", s3.secret_key());
    pg.set_config(
        "archive_command",
        &format!("'{}' wal-push %p", bin.display()),
    )
    .unwrap();
    pg.start().unwrap();
    let seg = pg.switch_wal().unwrap();
    pg.wait_archived(&seg, Duration::from_secs(60)).unwrap();
    let listed = json(&succeeds(
        bare_pitr(&s3)
            .env("PITR_CONFIG", &file)
            .args(["list", "--json"]),
    ));
    assert!(!listed["wal"].as_array().unwrap().is_empty(), "{listed}");

    // Where each setting comes from.
    let shown = |cmd: &mut std::process::Command, extra: &[&str]| {
        let v = json(&succeeds(cmd.args(["config", "--json"]).args(extra)));
        let repo = v["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "repo")
            .unwrap()
            .clone();
        (repo, v)
    };
    let (repo, v) = shown(bare_pitr(&s3).env("PITR_CONFIG", &file), &[]);
    assert_eq!(repo["source"], "file", "{v}");
    assert_eq!(repo["value"], url.as_str(), "{v}");
    assert_eq!(repo["line"], 7, "{v}");
    assert_eq!(repo["file"], file.to_str().unwrap(), "{v}");
    let endpoint = v["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "s3.endpoint")
        .unwrap();
    assert_eq!(endpoint["line"], 2, "{v}");
    let (repo, v) = shown(
        bare_pitr(&s3)
            .env("PITR_CONFIG", &file)
            .env("PITR_REPO", "file:///from/env"),
        &[],
    );
    assert_eq!(repo["source"], "env", "{v}");
    assert_eq!(repo["value"], "file:///from/env", "{v}");
    let (repo, v) = shown(
        bare_pitr(&s3)
            .env("PITR_CONFIG", &file)
            .env("PITR_REPO", "file:///from/env"),
        &["--repo", "file:///from/flag"],
    );
    assert_eq!(repo["source"], "flag", "{v}");
    // The flag beats the environment for a command too: a named repository from the file.
    let out = bare_pitr(&s3)
        .env("PITR_CONFIG", &file)
        .env("PITR_REPO", url.as_str())
        .args(["list", "--repo", "other"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/other"));

    // A file others can write is refused, naming it; so is an unknown key, with its line.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = bare_pitr(&s3)
        .env("PITR_CONFIG", &file)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unsafe") && err.contains(file.to_str().unwrap()) && err.contains("HINT"),
        "{err}"
    );
    // wal-fetch reports it above 125, never as "not found".
    let out = bare_pitr(&s3)
        .env("PITR_CONFIG", &file)
        .args(["wal-fetch", "000000010000000000000001", "/tmp/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(200));
    // A storage class a restore could not read from is refused.
    let out = bare_pitr(&s3)
        .env("PITR_S3_STORAGE_CLASS", "DEEP_ARCHIVE")
        .args(["info", "--repo", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DEEP_ARCHIVE needs a restore request"));
    // A KMS key without KMS encryption, or a count that is not one, likewise.
    for (var, value, says) in [
        (
            "PITR_S3_SSE_KMS_KEY_ID",
            "alias/x",
            "a KMS key goes with aws:kms only",
        ),
        ("PITR_S3_MAX_ATTEMPTS", "many", "PITR_S3_MAX_ATTEMPTS"),
    ] {
        let out = bare_pitr(&s3)
            .env(var, value)
            .args(["info", "--repo", &url])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4), "{var}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{var}");
    }
    let bad = config_file(&dir, "repo = \"file:///x\"\n[s3]\nendpont = \"x\"\n");
    let out = bare_pitr(&s3)
        .env("PITR_CONFIG", &bad)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3: unknown key s3.endpont", bad.display())),
        "{err}"
    );
}

/// A restore with everything from the configuration file writes a restore_command that
/// fetches WAL with an empty environment (`env -i`): the repository and the key file it
/// names are in the command itself.
#[test]
fn a_restore_command_from_a_configured_restore_runs_with_an_empty_environment() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let etc = etc_dir(&pg);
    let key = etc.join("key");
    std::fs::write(&key, repo::crypto::random::<32>()).unwrap();
    let file = config_file(
        &etc,
        &format!(
            "repo = \"file://{}\"\n[key]\nfile = \"{}\"\n",
            repo.display(),
            key.display()
        ),
    );
    let pitr = || {
        let mut c = crate::pitr();
        for var in [
            "PITR_REPO",
            "PITR_KEY_FILE",
            "PITR_KEY_COMMAND",
            "PITR_PASSPHRASE",
        ] {
            c.env_remove(var);
        }
        c.env("PITR_CONFIG", &file);
        c
    };
    succeeds(
        pitr()
            .args(["init", "--encrypt", "--data-dir"])
            .arg(pg.data_dir()),
    );
    pg.start().unwrap();
    pg.sql("CREATE TABLE t AS SELECT 1 AS x").unwrap();
    succeeds(pitr().args(["backup", "--wal", "--fast", "--pg", &crate::socket(&pg)]));
    let seg = pg.switch_wal().unwrap();
    // The segment reaches the repository by a push from the command line.
    succeeds(
        pitr()
            .arg("wal-push")
            .arg(pg.data_dir().join("pg_wal").join(&seg)),
    );
    let to = dir.path().join("restored");
    succeeds(pitr().args(["restore", "--to"]).arg(&to));
    let auto = std::fs::read_to_string(to.join("postgresql.auto.conf")).unwrap();
    let line = auto
        .lines()
        .find(|l| l.starts_with("restore_command = "))
        .unwrap();
    let command = line
        .trim_start_matches("restore_command = '")
        .trim_end_matches('\'')
        .replace("''", "'")
        .replace("%%", "%");
    assert!(command.contains("--key-file"), "{command}");
    let dest = dir.path().join("fetched");
    let command = command
        .replace(" %f ", &format!(" {seg} "))
        .replace(" %p", &format!(" {}", dest.display()));
    let out = std::process::Command::new("env")
        .args(["-i", "/bin/sh", "-c", &command])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(pg.data_dir().join("pg_wal").join(&seg)).unwrap()
    );
}

/// A named repository's own write settings (storage class, server-side encryption) reach
/// the objects written there and only there; the command tables give `expire` its policy
/// (a flag or the environment still wins, key by key) and `restore` its settings.
#[test]
fn named_repository_write_settings_and_command_tables_come_from_the_file() {
    let s3 = S3Server::start_local().unwrap();
    let main = s3.repo_url("main");
    let off = s3.repo_url("off");
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let dir = etc_dir(&pg);
    let text = format!(
        "compress-level = 3\n[s3]\nendpoint = \"{}\"\nregion = \"{}\"\npath-style = true\n[repo]\nurl = \"{main}\"\n[repo.off]\nurl = \"{off}\"\nstorage-class = \"REDUCED_REDUNDANCY\"\nsse = \"AES256\"\n[copy]\nto = \"off\"\n[expire]\nkeep-last = 1\ngrace = \"0s\"\n[restore]\npg-bin = \"/nonexistent/bin\"\n",
        s3.endpoint(),
        s3.region()
    );
    let file = config_file(&dir, &text);
    let keep_last_line = text.lines().position(|l| l == "keep-last = 1").unwrap() + 1;
    let pitr = || {
        let mut c = bare_pitr(&s3);
        c.env("PITR_CONFIG", &file);
        c
    };
    succeeds(pitr().args(["init", "--data-dir"]).arg(pg.data_dir()));
    pg.start().unwrap();
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
        .unwrap();
    for _ in 0..2 {
        succeeds(pitr().args(["backup", "--wal", "--fast", "--pg", &crate::socket(&pg)]));
        // Backup ids are start times to the second.
        std::thread::sleep(Duration::from_millis(1100));
    }

    // The copy writes the off-site repository with its own class and encryption.
    // The target from the file's [copy] to.
    succeeds(pitr().arg("copy"));
    let seen = s3.write_headers();
    let (in_off, in_main): (Vec<_>, Vec<_>) = seen.iter().partition(|h| h.path.contains("/off/"));
    assert!(in_off.iter().any(|h| h.path.contains("/pack/")), "{seen:?}");
    assert!(
        in_off.iter().all(|h| h.sse.as_deref() == Some("AES256")),
        "{in_off:?}"
    );
    for h in &in_off {
        let name = h.path.rsplit('/').next().unwrap_or("");
        let classed = h.path.contains("/pack/")
            || (name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()));
        let want = classed.then_some("REDUCED_REDUNDANCY");
        assert_eq!(h.storage_class.as_deref(), want, "{h:?}");
    }
    assert!(!in_main.is_empty());
    assert!(
        in_main
            .iter()
            .all(|h| h.sse.is_none() && h.storage_class.is_none()),
        "{in_main:?}"
    );
    succeeds(pitr().args(["verify", "--repo", "off"]));

    // expire's policy from the file; a flag or the environment beats it.
    let kept = |extra: &[&str], env: Option<(&str, &str)>| {
        let mut c = pitr();
        c.args(["expire", "--dry-run", "--json"]).args(extra);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let v = json(&succeeds(&mut c));
        let kept: Vec<bool> = v["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["kept"].as_bool().unwrap())
            .collect();
        (kept, v)
    };
    let (k, v) = kept(&[], None);
    assert_eq!(k, [false, true], "{v}");
    assert_eq!(v["backups"][1]["reasons"][0], "keep-last 1", "{v}");
    assert_eq!(kept(&["--keep-last", "2"], None).0, [true, true]);
    assert_eq!(
        kept(&[], Some(("PITR_EXPIRE_KEEP_LAST", "2"))).0,
        [true, true]
    );

    // pitr config names the file and line, and each setting's twins.
    let v = json(&succeeds(pitr().args(["config", "--json"])));
    let setting = |name: &str| {
        v["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {v}"))
            .clone()
    };
    let k = setting("expire.keep-last");
    assert_eq!(k["source"], "file", "{k}");
    assert_eq!(k["line"], keep_last_line, "{k}");
    assert_eq!(k["env"], "PITR_EXPIRE_KEEP_LAST", "{k}");
    assert_eq!(k["flag"], "--keep-last", "{k}");
    assert_eq!(setting("compress-level")["value"], "3");
    assert_eq!(setting("backup.parallel")["source"], "default");
    assert_eq!(
        setting("repo.off.storage-class")["value"],
        "REDUCED_REDUNDANCY"
    );

    // The file's pg-bin is for restore --start: a restore without it does not need it.
    let to = tempfile::tempdir().unwrap();
    succeeds(pitr().args(["restore", "--to"]).arg(to.path().join("data")));
    assert!(to.path().join("data/PG_VERSION").is_file());
}

/// A file named by `--config` alone (no PITR_CONFIG) reaches every process pitr starts: the
/// archive_command's push-ahead worker, and a server `restore --start` starts, whose
/// restore_command fetches from the S3 server the file names.
#[test]
fn a_file_named_by_the_flag_reaches_workers_and_started_servers() {
    let s3 = S3Server::start_local().unwrap();
    let url = s3.repo_url("flag");
    let mut pg = Cluster::init(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let dir = etc_dir(&pg);
    let file = config_file(
        &dir,
        &format!(
            "repo = \"{url}\"\n[s3]\nendpoint = \"{}\"\nregion = \"{}\"\npath-style = true\n[wal-push]\nahead = 4\n",
            s3.endpoint(),
            s3.region()
        ),
    );
    let bin = pg
        .expose_binary(Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    pg.set_env("AWS_ACCESS_KEY_ID", s3.access_key());
    pg.set_env("AWS_SECRET_ACCESS_KEY", s3.secret_key());
    pg.set_config(
        "archive_command",
        &format!(
            "'{}' --config '{}' wal-push %p",
            bin.display(),
            file.display()
        ),
    )
    .unwrap();
    succeeds(
        bare_pitr(&s3)
            .args(["--config"])
            .arg(&file)
            .args(["init", "--data-dir"])
            .arg(pg.data_dir()),
    );
    pg.start().unwrap();
    pg.sql("CREATE TABLE t AS SELECT 1 AS x").unwrap();
    succeeds(bare_pitr(&s3).arg("--config").arg(&file).args([
        "backup",
        "--fast",
        "--pg",
        &crate::socket(&pg),
    ]));
    pg.sql("INSERT INTO t SELECT 2").unwrap();
    // Several segments at once: the worker stores them ahead of the calls.
    let mut last = String::new();
    for _ in 0..4 {
        pg.sql("INSERT INTO t SELECT 3").unwrap();
        last = pg.switch_wal().unwrap();
    }
    pg.wait_archived(&last, Duration::from_secs(60)).unwrap();
    let log = pg.server_log();
    assert!(!log.contains("failed"), "{log}");

    // A server started by restore --start fetches with the file's S3 settings.
    let user = pg.os_user().clone();
    let home = pg.server_dir("flag-home").unwrap();
    let sock = pg.server_dir("flag-sock").unwrap();
    let to = home.join("restored");
    let port = testbed::free_port().unwrap().to_string();
    // The binary the server's user can run (the restore_command names this one).
    let mut cmd = bare(std::process::Command::new(&bin), &s3);
    cmd.env("HOME", &home)
        .arg("--config")
        .arg(&file)
        .args(["restore", "--start", "--archive-mode", "off", "--to"])
        .arg(&to)
        .arg("--pg-bin")
        .arg(pg.bin().dir());
    for o in [
        format!("port={port}"),
        "listen_addresses=".to_owned(),
        format!("unix_socket_directories={}", sock.display()),
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
    let restored = Cluster::attach(&to, ClusterOptions::default()).unwrap();
    assert_eq!(
        restored.sql("SELECT count(*) FROM t").unwrap(),
        "6",
        "{log}"
    );
}
