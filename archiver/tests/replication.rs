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
async fn base_backup_in_either_syntax_yields_each_archive_and_the_manifest() {
    use archiver::pg::base_backup::{BackupEvent, BackupOptions, BaseBackup};
    use archiver::tar::{EntryKind, TarEvent, TarReader};
    use std::collections::BTreeMap;
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    pg.create_tablespace("extra").unwrap();
    pg.sql("CREATE TABLE t TABLESPACE extra AS SELECT g FROM generate_series(1, 10000) g")
        .unwrap();
    let oid: u32 = pg
        .sql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
        .unwrap()
        .parse()
        .unwrap();
    let s = settings(&format!(
        "host={} port={} user={SUPERUSER}",
        pg.socket_dir().display(),
        pg.port()
    ));
    let mut conn = ReplicationConn::connect(&s).await.unwrap();
    let options = BackupOptions {
        label: "pitr-test".into(),
        fast_checkpoint: true,
        manifest: true,
        wal: false,
        max_rate_kb: None,
    };
    let mut backup = BaseBackup::start(&mut conn, &options).await.unwrap();
    let (mut start, mut end) = (None, None);
    let mut tablespaces = Vec::new();
    // Each archive taken apart as it streams.
    struct Received {
        name: String,
        tablespace: Option<u32>,
        files: BTreeMap<String, u64>,
        first: Option<String>,
    }
    let mut archives: Vec<Received> = Vec::new();
    let mut reader = TarReader::new();
    let mut current = String::new();
    let mut manifest = Vec::new();
    while let Some(event) = backup.next().await.unwrap() {
        match event {
            BackupEvent::Started { lsn, timeline } => start = Some((lsn, timeline)),
            BackupEvent::Ended { lsn, timeline } => end = Some((lsn, timeline)),
            BackupEvent::Tablespaces(list) => tablespaces = list,
            BackupEvent::Archive { name, tablespace } => {
                reader.finish().unwrap();
                reader = TarReader::new();
                archives.push(Received {
                    name,
                    tablespace,
                    files: BTreeMap::new(),
                    first: None,
                });
            }
            BackupEvent::Data(d) => {
                reader.feed(&d);
                let got = archives.last_mut().unwrap();
                while let Some(e) = reader.next_event().unwrap() {
                    match e {
                        TarEvent::Entry(e) => {
                            got.first.get_or_insert(e.path.clone());
                            if e.kind == EntryKind::File {
                                got.files.insert(e.path.clone(), 0);
                                current = e.path;
                            }
                        }
                        TarEvent::Data(d) => {
                            *got.files.get_mut(&current).unwrap() += d.len() as u64
                        }
                        TarEvent::End => {}
                    }
                }
            }
            BackupEvent::Progress(_) => {}
            BackupEvent::Manifest => reader.finish().unwrap(),
            BackupEvent::ManifestData(d) => manifest.extend_from_slice(&d),
        }
    }
    drop(backup);

    let (start, end) = (start.unwrap(), end.unwrap());
    assert!(
        start.0 < end.0 && start.1 == 1 && end.1 == 1,
        "{start:?} {end:?}"
    );
    assert_eq!(tablespaces.len(), 2, "{tablespaces:?}");
    assert!(tablespaces.iter().any(|t| t.oid == Some(oid)));
    // The tablespace's archive, then base.tar with backup_label first.
    let names: Vec<&str> = archives.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        [format!("{oid}.tar").as_str(), "base.tar"],
        "{names:?}"
    );
    assert_eq!(archives[0].tablespace, Some(oid));
    assert_eq!(archives[1].tablespace, None);
    assert_eq!(archives[1].first.as_deref(), Some("backup_label"));

    // Every file of every archive, at the size the server's own manifest gives it (the
    // manifest names tablespace files pg_tblspc/OID/...).
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let listed: BTreeMap<String, u64> = manifest["Files"]
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
    let mut found = BTreeMap::new();
    for a in &archives {
        for (path, size) in &a.files {
            let path = match a.tablespace {
                Some(oid) => format!("pg_tblspc/{oid}/{path}"),
                None => path.clone(),
            };
            found.insert(path, *size);
        }
    }
    assert!(listed.len() > 100);
    assert_eq!(found, listed);
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
    // Signed by another CA: verify-ca refuses it, and so does require with that root file
    // present (as libpq); without a root file, require does not check.
    let err = ReplicationConn::connect(&tcp("require", &other_ca.path().join("ca.crt")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("SSL connection"), "{err}");
    let conn = ReplicationConn::connect(&tcp("require", &other_ca.path().join("none.crt")))
        .await
        .unwrap();
    conn.close().await;
    // Its walsender goes away too (asynchronously: waited for, or the count below could
    // still see it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while encrypted(&pg) > 0 {
        assert!(std::time::Instant::now() < deadline, "walsenders linger");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
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
