//! BASE_BACKUP in both syntaxes, read as one sequence of events whatever the server's
//! version: PostgreSQL 15 and later take parenthesized options and send one COPY whose
//! messages carry a type byte ('n' new archive, 'd' data, 'p' progress, 'm' manifest
//! follows); 13 and 14 take keywords and send one COPY per tablespace (the data directory
//! last), then one with the manifest.

use bytes::Bytes;
use walfmt::Lsn;

use super::conn::{ConnError, ReplicationConn, Reply, ResultSet};

/// How to take the backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The label (in backup_label).
    pub label: String,
    /// Checkpoint at once instead of spread over checkpoint_completion_target.
    pub fast_checkpoint: bool,
    /// Ask for the server's backup_manifest.
    pub manifest: bool,
    /// Include the WAL from start to stop in the data directory's archive (`pg_wal/`).
    pub wal: bool,
    /// Have the server send at most this many kB/s (32..=1048576), to spare its disks.
    pub max_rate_kb: Option<u32>,
}

/// A tablespace the server will send, from its list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablespace {
    /// Its OID; `None` for the data directory itself.
    pub oid: Option<u32>,
    /// Where it lives on the server.
    pub location: Option<String>,
    /// The server's estimate of its size in bytes (sent with PROGRESS).
    pub size: Option<u64>,
}

/// One step of a base backup as it streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// The backup started at this WAL position, on this timeline.
    Started {
        /// Start LSN (the checkpoint's redo pointer).
        lsn: Lsn,
        /// Timeline.
        timeline: u32,
    },
    /// The tablespaces to come.
    Tablespaces(Vec<Tablespace>),
    /// A tar archive starts: `base.tar` for the data directory, `OID.tar` for a tablespace.
    Archive {
        /// The archive's name.
        name: String,
        /// The tablespace it holds (`None`: the data directory).
        tablespace: Option<u32>,
    },
    /// Bytes of the current archive.
    Data(Bytes),
    /// The server's progress counter (15+).
    Progress(u64),
    /// The backup_manifest follows.
    Manifest,
    /// Bytes of the manifest.
    ManifestData(Bytes),
    /// The backup ended at this WAL position.
    Ended {
        /// Stop LSN.
        lsn: Lsn,
        /// Timeline.
        timeline: u32,
    },
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The BASE_BACKUP command for a server of major version `major`.
pub fn command(major: u32, o: &BackupOptions) -> String {
    if major >= 15 {
        format!(
            "BASE_BACKUP (LABEL {}, PROGRESS, CHECKPOINT '{}', WAIT false, MANIFEST '{}'{}{})",
            quote(&o.label),
            if o.fast_checkpoint { "fast" } else { "spread" },
            if o.manifest { "yes" } else { "no" },
            if o.wal { ", WAL true" } else { "" },
            o.max_rate_kb
                .map_or(String::new(), |r| format!(", MAX_RATE {r}")),
        )
    } else {
        format!(
            "BASE_BACKUP LABEL {} PROGRESS{}{} NOWAIT{} MANIFEST '{}'",
            quote(&o.label),
            if o.fast_checkpoint { " FAST" } else { "" },
            if o.wal { " WAL" } else { "" },
            o.max_rate_kb
                .map_or(String::new(), |r| format!(" MAX_RATE {r}")),
            if o.manifest { "yes" } else { "no" },
        )
    }
}

fn position(set: &ResultSet) -> Result<(Lsn, u32), ConnError> {
    let bad = || ConnError::Protocol(format!("unexpected backup position row: {set:?}"));
    let lsn = set
        .text(0, "recptr")
        .ok_or_else(bad)?
        .parse()
        .map_err(|_| bad())?;
    let tli = set
        .text(0, "tli")
        .ok_or_else(bad)?
        .parse()
        .map_err(|_| bad())?;
    Ok((lsn, tli))
}

/// A base backup in progress on a replication connection.
#[derive(Debug)]
pub struct BaseBackup<'c> {
    conn: &'c mut ReplicationConn,
    modern: bool,
    /// 13/14: the tablespaces still to come, data directory last.
    pending: Vec<Tablespace>,
    /// Position results seen (start, then end).
    positions: u32,
    in_manifest: bool,
    done: bool,
}

impl<'c> BaseBackup<'c> {
    /// Starts BASE_BACKUP on `conn`.
    pub async fn start(
        conn: &'c mut ReplicationConn,
        options: &BackupOptions,
    ) -> Result<BaseBackup<'c>, ConnError> {
        let major = conn.server_major();
        conn.start_query(&command(major, options)).await?;
        Ok(BaseBackup {
            conn,
            modern: major >= 15,
            pending: Vec::new(),
            positions: 0,
            in_manifest: false,
            done: false,
        })
    }

    /// The next event; `None` when the backup is complete. A server error (the backup was
    /// refused or failed) ends it with `Err`.
    pub async fn next(&mut self) -> Result<Option<BackupEvent>, ConnError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let Some(reply) = self.conn.next_reply().await? else {
                self.done = true;
                return Ok(None);
            };
            match reply {
                Reply::Rows(set) if set.columns == ["recptr", "tli"] => {
                    let (lsn, timeline) = position(&set)?;
                    self.positions += 1;
                    return Ok(Some(if self.positions == 1 {
                        BackupEvent::Started { lsn, timeline }
                    } else {
                        BackupEvent::Ended { lsn, timeline }
                    }));
                }
                Reply::Rows(set) if set.columns.first().map(String::as_str) == Some("spcoid") => {
                    let list: Vec<Tablespace> = (0..set.rows.len())
                        .map(|i| Tablespace {
                            oid: set.text(i, "spcoid").and_then(|t| t.parse().ok()),
                            location: set.text(i, "spclocation"),
                            size: set
                                .text(i, "size")
                                .and_then(|t| t.parse::<u64>().ok())
                                .map(|kb| kb * 1024),
                        })
                        .collect();
                    // 13/14 send the data directory last, whatever its place in the list.
                    let (data_dir, others): (Vec<_>, Vec<_>) =
                        list.iter().cloned().partition(|t| t.oid.is_none());
                    self.pending = others.into_iter().chain(data_dir).collect();
                    return Ok(Some(BackupEvent::Tablespaces(list)));
                }
                Reply::Rows(_) => {} // the command's own completion
                Reply::CopyOut if self.modern => {}
                Reply::CopyOut => {
                    // 13/14: one COPY per tablespace, then the manifest's.
                    if self.pending.is_empty() {
                        self.in_manifest = true;
                        return Ok(Some(BackupEvent::Manifest));
                    }
                    let t = self.pending.remove(0);
                    return Ok(Some(BackupEvent::Archive {
                        name: t.oid.map_or("base.tar".to_owned(), |o| format!("{o}.tar")),
                        tablespace: t.oid,
                    }));
                }
                Reply::CopyDone => {}
                Reply::CopyData(d) if !self.modern => {
                    return Ok(Some(if self.in_manifest {
                        BackupEvent::ManifestData(d)
                    } else {
                        BackupEvent::Data(d)
                    }));
                }
                Reply::CopyData(d) => {
                    let Some((&kind, rest)) = d.split_first() else {
                        continue;
                    };
                    let body = d.slice(1..);
                    match kind {
                        b'n' => {
                            let mut parts = rest.split(|&b| b == 0);
                            let name = String::from_utf8_lossy(parts.next().unwrap_or_default())
                                .into_owned();
                            let tablespace =
                                name.strip_suffix(".tar").and_then(|stem| stem.parse().ok());
                            return Ok(Some(BackupEvent::Archive { name, tablespace }));
                        }
                        b'd' if self.in_manifest => {
                            return Ok(Some(BackupEvent::ManifestData(body)))
                        }
                        b'd' => return Ok(Some(BackupEvent::Data(body))),
                        b'p' if rest.len() >= 8 => {
                            let mut n = [0u8; 8];
                            n.copy_from_slice(&rest[..8]);
                            return Ok(Some(BackupEvent::Progress(u64::from_be_bytes(n))));
                        }
                        b'm' => {
                            self.in_manifest = true;
                            return Ok(Some(BackupEvent::Manifest));
                        }
                        other => {
                            return Err(ConnError::Protocol(format!(
                                "unknown BASE_BACKUP message type {:?}",
                                other as char
                            )))
                        }
                    }
                }
                Reply::CopyBoth => {
                    return Err(ConnError::Protocol(
                        "BASE_BACKUP answered with CopyBoth".into(),
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_syntaxes() {
        let o = BackupOptions {
            label: "it's".into(),
            fast_checkpoint: true,
            manifest: true,
            wal: false,
            max_rate_kb: None,
        };
        assert_eq!(
            command(15, &o),
            "BASE_BACKUP (LABEL 'it''s', PROGRESS, CHECKPOINT 'fast', WAIT false, MANIFEST 'yes')"
        );
        assert_eq!(
            command(13, &o),
            "BASE_BACKUP LABEL 'it''s' PROGRESS FAST NOWAIT MANIFEST 'yes'"
        );
        let with_wal = BackupOptions {
            wal: true,
            max_rate_kb: Some(1024),
            ..o
        };
        assert!(command(16, &with_wal).ends_with("MANIFEST 'yes', WAL true, MAX_RATE 1024)"));
        assert_eq!(
            command(14, &with_wal),
            "BASE_BACKUP LABEL 'it''s' PROGRESS FAST WAL NOWAIT MAX_RATE 1024 MANIFEST 'yes'"
        );
    }
}
