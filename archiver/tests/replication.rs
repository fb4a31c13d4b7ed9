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
