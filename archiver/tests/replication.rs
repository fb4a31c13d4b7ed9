//! The replication connection against a real server from the test bed: the socket with
//! trust, TCP with each password method, wrong passwords, and server errors that leave the
//! connection usable.

use archiver::pg::{ConnError, PgSettings, ReplicationConn};
use testbed::{Cluster, ClusterOptions, PASSWORD, PASSWORD_ROLES, SUPERUSER};

fn settings(conninfo: &str) -> PgSettings {
    let mut s = PgSettings::from_env_and(conninfo).unwrap();
    // The machine's libpq environment must not leak into the test.
    s.passfile = None;
    s
}

#[tokio::test]
async fn identifies_the_system_over_the_socket_and_with_every_password_method() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    let sysid: u64 = pg
        .sql("SELECT system_identifier FROM pg_control_system()")
        .unwrap()
        .parse()
        .unwrap();

    let socket = settings(&format!(
        "host={} port={} user={SUPERUSER} password=",
        pg.socket_dir().display(),
        pg.port()
    ));
    let mut conn = ReplicationConn::connect(&socket).await.unwrap();
    assert!(conn
        .server_version()
        .is_some_and(|v| v.starts_with(&pg.bin().major().to_string())));
    let info = conn.identify_system().await.unwrap();
    assert_eq!(info.system_identifier, sysid);
    assert_eq!(info.timeline, 1);
    let current: walfmt::Lsn = pg.current_lsn().unwrap().parse().unwrap();
    assert!(info.xlogpos <= current);

    // A command the server refuses: its error, and the connection still works.
    let err = conn.simple_query("TIMELINE_HISTORY 99").await.unwrap_err();
    let server = err.server().expect("a server error");
    assert_eq!(server.severity, "ERROR");
    assert!(!server.message.is_empty(), "{err}");
    assert_eq!(
        conn.identify_system().await.unwrap().system_identifier,
        sysid
    );
    conn.close().await;

    for (role, method) in PASSWORD_ROLES {
        let uri = format!(
            "postgresql://{role}:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=disable",
            pg.port()
        );
        let mut conn = ReplicationConn::connect(&settings(&uri))
            .await
            .unwrap_or_else(|e| panic!("{role} ({method}): {e}"));
        assert_eq!(
            conn.identify_system().await.unwrap().system_identifier,
            sysid
        );

        let wrong = format!(
            "host=127.0.0.1 port={} user={role} password=wrong sslmode=disable",
            pg.port()
        );
        let err = ReplicationConn::connect(&settings(&wrong))
            .await
            .unwrap_err();
        assert_eq!(
            err.server().map(|e| e.code.as_str()),
            Some("28P01"),
            "{role} ({method}): {err}"
        );

        let none = format!(
            "host=127.0.0.1 port={} user={role} sslmode=disable",
            pg.port()
        );
        let mut s = settings(&none);
        s.password = None;
        let err = ReplicationConn::connect(&s).await.unwrap_err();
        assert!(
            matches!(err, ConnError::Auth(ref m) if m.contains("no password supplied")),
            "{role} ({method}): {err}"
        );
    }
}

#[tokio::test]
async fn a_server_that_is_not_there_is_a_connect_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&format!("host={} port=1", dir.path().display()));
    let err = ReplicationConn::connect(&s).await.unwrap_err();
    assert!(matches!(err, ConnError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(".s.PGSQL.1"), "{err}");
}

#[tokio::test]
async fn base_backup_streams_its_archive_and_manifest_through_copy_out() {
    use archiver::pg::Reply;
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    if pg.bin().major() < 15 {
        return; // the parenthesized syntax and typed CopyData are 15+
    }
    let s = settings(&format!(
        "host={} port={} user={SUPERUSER}",
        pg.socket_dir().display(),
        pg.port()
    ));
    let mut conn = ReplicationConn::connect(&s).await.unwrap();
    conn.start_query(
        "BASE_BACKUP (LABEL 'pitr-test', CHECKPOINT 'fast', WAIT false, MANIFEST 'yes')",
    )
    .await
    .unwrap();
    let mut sets = Vec::new();
    let (mut archives, mut tar, mut manifest) = (Vec::new(), Vec::new(), Vec::new());
    let mut in_manifest = false;
    let (mut copies, mut dones) = (0, 0);
    while let Some(reply) = conn.next_reply().await.unwrap() {
        match reply {
            Reply::Rows(set) => sets.push(set),
            Reply::CopyOut => copies += 1,
            Reply::CopyDone => dones += 1,
            Reply::CopyData(d) => match d[0] {
                b'n' => archives.push(String::from_utf8_lossy(&d[1..]).into_owned()),
                b'm' => in_manifest = true,
                b'd' if in_manifest => manifest.extend_from_slice(&d[1..]),
                b'd' => tar.extend_from_slice(&d[1..]),
                b'p' => {}
                other => panic!("unexpected CopyData type {other}"),
            },
            Reply::CopyBoth => panic!("BASE_BACKUP does not copy both ways"),
        }
    }
    assert_eq!((copies, dones), (1, 1));
    assert!(archives[0].starts_with("base.tar"), "{archives:?}");
    // base.tar taken apart: backup_label first, and every regular file with the size the
    // server's own manifest gives it.
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut reader = archiver::tar::TarReader::new();
    let mut files = std::collections::BTreeMap::new();
    let mut first = None;
    let mut current = String::new();
    for piece in tar.chunks(7919) {
        reader.feed(piece);
        while let Some(event) = reader.next_event().unwrap() {
            match event {
                archiver::tar::TarEvent::Entry(e) => {
                    first.get_or_insert(e.path.clone());
                    if e.kind == archiver::tar::EntryKind::File {
                        files.insert(e.path.clone(), 0u64);
                        current = e.path;
                    }
                }
                archiver::tar::TarEvent::Data(d) => {
                    *files.get_mut(&current).unwrap() += d.len() as u64;
                }
                archiver::tar::TarEvent::End => {}
            }
        }
    }
    reader.finish().unwrap();
    assert_eq!(first.as_deref(), Some("backup_label"));
    let listed: std::collections::BTreeMap<String, u64> = manifest["Files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["Path"].as_str().unwrap().to_owned(),
                f["Size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(listed.len() > 100);
    assert_eq!(files, listed);
    // Start position first, end position last, on timeline 1.
    // Result sets: start position, tablespaces, end position, then the command's own tag.
    let positions: Vec<_> = sets
        .iter()
        .filter(|s| s.columns == ["recptr", "tli"])
        .collect();
    assert_eq!(positions.len(), 2, "{sets:?}");
    let start: walfmt::Lsn = positions[0].text(0, "recptr").unwrap().parse().unwrap();
    let end: walfmt::Lsn = positions[1].text(0, "recptr").unwrap().parse().unwrap();
    assert!(start < end, "{start} .. {end}");
    assert_eq!(positions[1].text(0, "tli").as_deref(), Some("1"));
    assert_eq!(sets.last().unwrap().tag, "BASE_BACKUP");
    // And the connection is ready for the next command.
    assert!(conn.identify_system().await.is_ok());
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for `san` signed by it, in `dir`: ca.crt, server.crt,
/// server.key.
fn make_certs(dir: &std::path::Path, san: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pitr-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=pitr-test-server",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("ext"),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext",
            "-out",
            "server.crt",
        ],
    );
}

#[tokio::test]
async fn tls_as_sslmode_says() {
    use std::os::unix::fs::PermissionsExt;
    let mut pg = Cluster::init(ClusterOptions::default()).unwrap();
    let tls = pg.server_dir("tls").unwrap();
    make_certs(&tls, "DNS:db.example");
    for f in ["server.crt", "server.key"] {
        pg.os_user().give(&tls.join(f)).unwrap();
    }
    std::fs::set_permissions(
        tls.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    pg.set_config("ssl", "on").unwrap();
    pg.set_config("ssl_cert_file", tls.join("server.crt").to_str().unwrap())
        .unwrap();
    pg.set_config("ssl_key_file", tls.join("server.key").to_str().unwrap())
        .unwrap();
    pg.start().unwrap();
    let other_ca = tempfile::tempdir().unwrap();
    make_certs(other_ca.path(), "DNS:db.example");

    let tcp = |mode: &str, root: &std::path::Path| {
        let mut s = settings(&format!(
            "host=127.0.0.1 port={} user={SUPERUSER} sslmode={mode}",
            pg.port()
        ));
        s.sslrootcert = Some(root.to_owned());
        s
    };
    let encrypted = |pg: &Cluster| -> u64 {
        pg.sql("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.backend_type = 'walsender'")
            .unwrap()
            .parse()
            .unwrap()
    };
    let ca = tls.join("ca.crt");
    for mode in ["prefer", "require", "verify-ca"] {
        let mut conn = ReplicationConn::connect(&tcp(mode, &ca))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(conn.identify_system().await.is_ok());
        assert!(encrypted(&pg) >= 1, "{mode} is encrypted");
        conn.close().await;
    }
    // The walsenders of closed connections go away; then none is encrypted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while encrypted(&pg) > 0 {
        assert!(std::time::Instant::now() < deadline, "walsenders linger");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The certificate names db.example, not 127.0.0.1: verify-full refuses it.
    let err = ReplicationConn::connect(&tcp("verify-full", &ca))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("SSL connection"), "{err}");
    // Signed by another CA: verify-ca refuses it.
    let err = ReplicationConn::connect(&tcp("verify-ca", &other_ca.path().join("ca.crt")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("SSL connection"), "{err}");
    // disable: plain text.
    let mut conn = ReplicationConn::connect(&tcp("disable", &ca))
        .await
        .unwrap();
    assert!(conn.identify_system().await.is_ok());
    assert_eq!(encrypted(&pg), 0);
}

#[tokio::test]
async fn a_server_without_tls_is_refused_when_tls_is_required() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    let s = |mode: &str| {
        settings(&format!(
            "host=127.0.0.1 port={} user={SUPERUSER} sslmode={mode}",
            pg.port()
        ))
    };
    let err = ReplicationConn::connect(&s("require")).await.unwrap_err();
    assert!(
        err.to_string().contains("server does not support SSL"),
        "{err}"
    );
    let mut conn = ReplicationConn::connect(&s("prefer")).await.unwrap();
    assert!(conn.identify_system().await.is_ok());
}
