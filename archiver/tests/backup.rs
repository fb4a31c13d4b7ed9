//! Base backups into a repository on the bed's S3 server, against a real cluster with a
//! tablespace: every file PostgreSQL's own backup_manifest lists comes back from the
//! repository with its size and CRC-32C; a second backup after a small change stores only a
//! small fraction of new bytes. Runs on PostgreSQL 14 too (the keyword syntax), from
//! scripts/test.

use std::sync::Arc;
use std::time::Duration;

use archiver::backup::pipeline::PipelineConfig;
use archiver::backup::{self, BackupConfig};
use archiver::pg::{PgSettings, ReplicationConn};
use repo::codec::Codec;
use repo::envelope::EncodeOptions;
use repo::manifest::{BackupManifest, FileType};
use repo::repository::{ClusterIdentity, Repository};
use repo::storage::{S3Settings, S3Storage, Storage};
use repo::url::RepoUrl;
use testbed::{Cluster, ClusterOptions, S3Server, SUPERUSER};

fn config(include_wal: bool) -> BackupConfig {
    BackupConfig {
        label: "pitr-test".into(),
        fast_checkpoint: true,
        include_wal,
        max_rate_kb: None,
        chunk_size: backup::DEFAULT_CHUNK_SIZE,
        pipeline: PipelineConfig {
            threads: 2,
            pack_size: backup::DEFAULT_PACK_SIZE,
            uploads: 4,
            encode: EncodeOptions {
                zstd_level: Some(1),
            },
        },
        wal_timeout: Duration::from_secs(30),
    }
}

async fn connect(pg: &Cluster) -> ReplicationConn {
    let mut s = PgSettings::from_env_and(&format!(
        "host={} port={} user={SUPERUSER}",
        pg.socket_dir().display(),
        pg.port()
    ))
    .unwrap();
    s.passfile = None;
    ReplicationConn::connect(&s).await.unwrap()
}

async fn open(s3: &S3Server, pg: &Cluster, conn: &mut ReplicationConn) -> Repository {
    let mut settings = S3Settings::new(s3.bucket(), &format!("{}/backup", s3.prefix()));
    settings.endpoint = Some(s3.endpoint().to_owned());
    settings.region = Some(s3.region().to_owned());
    settings.path_style = true;
    settings.cache_dir = None;
    settings.credentials = Some((s3.access_key().to_owned(), s3.secret_key().to_owned()));
    let storage: Arc<dyn Storage> = Arc::new(S3Storage::connect(settings).await);
    let identity = ClusterIdentity {
        system_identifier: conn.identify_system().await.unwrap().system_identifier,
        pg_version: pg.bin().major(),
        wal_segment_size: conn.wal_segment_size().await,
    };
    let url: RepoUrl = format!("s3://{}/{}/backup", s3.bucket(), s3.prefix())
        .parse()
        .unwrap();
    match Repository::init_on(
        url.clone(),
        storage.clone(),
        &identity,
        &[],
        Arc::new(Codec::new(2, 4)),
    )
    .await
    {
        Ok(repo) => repo,
        // A second backup into the same repository.
        Err(repo::repository::OpenError::NotEmpty { .. }) => Repository::open_on(
            url,
            storage,
            &repo::slots::KeySetting::None,
            Some(&identity),
            Arc::new(Codec::new(2, 4)),
        )
        .await
        .unwrap(),
        Err(e) => panic!("{e}"),
    }
}

/// Reads every file back and compares it with the server's backup_manifest.
async fn matches_pg_manifest(repo: &Repository, m: &BackupManifest) {
    // What take() returns has no chunk table in memory: read the backup as a restore would.
    let m = BackupManifest::load(repo.objects(), &m.id).await.unwrap();
    assert_eq!(m.chunks.len() as u64, m.chunk_table.count);
    let report = restore::backup_files::check_backup(repo.objects(), &m)
        .await
        .unwrap();
    assert!(report.matched_pg_manifest > 100, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_comes_back_as_postgres_listed_it_and_a_second_backup_stores_little() {
    let pg = Cluster::start_new(ClusterOptions::default()).unwrap();
    pg.create_tablespace("extra").unwrap();
    pg.sql("CREATE TABLE t TABLESPACE extra AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        .unwrap();
    pg.pgbench(&["-i", "-s", "4", "-q"]).unwrap();
    let oid: u32 = pg
        .sql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
        .unwrap()
        .parse()
        .unwrap();
    let s3 = S3Server::start().unwrap();
    let mut conn = connect(&pg).await;
    let repo = open(&s3, &pg, &mut conn).await;

    // The WAL goes into the backup: nothing archives into this repository.
    let first = backup::take(&mut conn, &repo, &config(true), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(first.wal, "included");
    assert_eq!(first.timeline, 1);
    assert!(first.start_lsn.parse::<walfmt::Lsn>().unwrap() < first.stop_lsn.parse().unwrap());
    assert_eq!(first.tablespaces.len(), 1);
    assert_eq!(first.tablespaces[0].oid, oid);
    assert!(first
        .files
        .iter()
        .any(|f| f.path == format!("pg_tblspc/{oid}") && f.kind == FileType::Symlink));
    assert!(first
        .files
        .iter()
        .any(|f| f.tablespace == Some(oid) && f.size > 0));
    assert!(first
        .files
        .iter()
        .any(|f| f.path.starts_with("pg_wal/0000000100") && f.size > 0));
    assert!(first.size > 60 << 20, "{}", first.size);
    // pgbench data compresses well: far fewer bytes stored than backed up.
    assert!(
        first.stored_new < first.size / 3,
        "{} of {}",
        first.stored_new,
        first.size
    );
    matches_pg_manifest(&repo, &first).await;

    // A small change: the second backup references what the first stored.
    pg.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 100")
        .unwrap();
    let second = backup::take(&mut conn, &repo, &config(true), &mut |_| {})
        .await
        .unwrap();
    assert_ne!(second.id, first.id);
    let share = second.stored_new as f64 / second.size as f64;
    eprintln!(
        "second backup stored {} new bytes of {} ({:.2}%)",
        second.stored_new,
        second.size,
        share * 100.0
    );
    assert!(share < 0.05, "{share}");
    assert!(second.packs.iter().any(|p| first.packs.contains(p)));
    matches_pg_manifest(&repo, &second).await;
    let ids = repo::manifest::list_backups(repo.objects().storage().as_ref())
        .await
        .unwrap();
    assert_eq!(ids, [first.id.clone(), second.id.clone()]);
}
