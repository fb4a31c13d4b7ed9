//! The command line itself: version, help, usage errors and their exit codes.

use crate::pitr;

#[test]
fn version_names_the_program_and_version() {
    let out = pitr().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("pitr {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_describes_the_tool() {
    let out = pitr().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("point-in-time restore"), "{text}");
    assert!(text.contains("Usage: pitr"), "{text}");
}

/// Completion scripts and manual pages come from the command definitions: every visible
/// command is in them, the background workers are not.
#[test]
fn completions_and_manual_pages_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = pitr().args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        for cmd in [
            "wal-push",
            "wal-fetch",
            "restore",
            "drill",
            "copy",
            "config",
        ] {
            assert!(text.contains(cmd), "{shell}: {cmd}");
        }
    }
    let out = pitr().arg("man").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(".TH pitr 1"));
    let dir = tempfile::tempdir().unwrap();
    let out = pitr()
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert!(pages.contains(&"pitr.1".to_owned()), "{pages:?}");
    assert!(pages.contains(&"pitr-drill.1".to_owned()), "{pages:?}");
    assert!(
        !pages
            .iter()
            .any(|p| p.contains("worker") || p.contains("watchdog")),
        "{pages:?}"
    );
    let drill = std::fs::read_to_string(dir.path().join("pitr-drill.1")).unwrap();
    assert!(drill.contains("amcheck"), "{drill}");
}

#[test]
fn no_arguments_prints_usage_and_exits_2() {
    let out = pitr().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage: pitr"));
}

#[test]
fn unknown_argument_exits_2() {
    let out = pitr().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--no-such-flag"), "{err}");
    // As restore_command, a command line pitr does not take stops recovery (above 125)
    // rather than reading as "not found" (1..125).
    let out = pitr()
        .args([
            "wal-fetch",
            "--no-such-flag",
            "000000010000000000000001",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(200));
}

#[test]
fn server_user_can_run_pitr_from_archive_command() {
    // The bed copies the binary where the unprivileged server user can run it; a failing
    // `pitr --version` would leave the segment unarchived.
    let mut pg = testbed::Cluster::init(testbed::ClusterOptions::default()).unwrap();
    let bin = pg
        .expose_binary(std::path::Path::new(env!("CARGO_BIN_EXE_pitr")))
        .unwrap();
    let archive = pg.server_dir("archive").unwrap();
    pg.set_config(
        "archive_command",
        &format!(
            "'{}' --version > '{}/%f.version' && cp %p '{}/%f'",
            bin.display(),
            archive.display(),
            archive.display()
        ),
    )
    .unwrap();
    pg.start().unwrap();
    let segment = pg.switch_wal().unwrap();
    pg.wait_archived(&segment, std::time::Duration::from_secs(30))
        .unwrap();
    let version = std::fs::read_to_string(archive.join(format!("{segment}.version"))).unwrap();
    assert_eq!(
        version.trim(),
        format!("pitr {}", env!("CARGO_PKG_VERSION"))
    );
}

/// An option that only means something beside another is refused on the command line
/// without it (a usage error, exit 2), and ignored when it comes from the environment.
#[test]
fn options_that_need_another_are_refused_without_it() {
    for (args, says) in [
        (
            &["copy", "--to", "file:///nonexistent/b", "--interval", "5s"][..],
            "--interval applies only with --follow",
        ),
        (
            &["restore", "--to", "/nonexistent/r", "--pg-bin", "/usr/bin"][..],
            "--pg-bin applies only with --start",
        ),
    ] {
        let out = pitr()
            .args(args)
            .env("PITR_REPO", "file:///nonexistent/a")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // From the environment (a service's settings, say): not a usage error.
    let out = pitr()
        .args(["restore", "--to", "/nonexistent/r"])
        .env("PITR_REPO", "file:///nonexistent/a")
        .env("PITR_PG_BIN", "/usr/bin")
        .output()
        .unwrap();
    assert_ne!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
