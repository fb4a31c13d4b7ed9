//! `pitr stream`: WAL from a replication slot into the repository, durable within a flush
//! interval (at once with `sync`), the slot advanced only past WAL the repository holds.
//!
//! A session connects, checks (or creates) the slot, stores the timeline's history, and
//! starts replication where the repository's WAL ends (complete segments under `wal/`, then
//! the pieces of the segment being written under `stream/`), or for an empty repository at
//! the start of the segment holding the slot's restart point. Standby status updates report
//! as written, flushed and applied only what is durable, so the server keeps (and with
//! synchronous replication, whatever `synchronous_commit` says, commits wait for) everything
//! that is not. A server silent for the receive timeout is taken for gone, as PostgreSQL's
//! walreceiver does with `wal_receiver_timeout`, and asked for a reply at half of it so an
//! idle one is not. A broken connection is retried with backoff; a stop request flushes
//! what is held and ends cleanly.

pub mod metrics;
pub mod writer;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use repo::codec::Codec;
use repo::markers::{Marker, MarkerBody};
use repo::objects::ObjectError;
use repo::repository::{ClusterIdentity, OpenError, Repository};
use repo::slots::KeySetting;
use repo::storage::{list_all, StorageError};
use repo::url::RepoUrl;
use tokio::sync::watch;
use tokio::time::Instant;
use walfmt::replication::{parse_server_message, standby_status, ServerMessage};
use walfmt::{Lsn, PgTimestamp, SegmentName, TimelineId, WalSegmentSize};

use crate::pg::{ConnError, PgSettings, ReplicationConn, Reply};
use crate::wal_push::{store_bytes, PushError};
use metrics::Metrics;
use writer::SegmentWriter;

/// How the service runs.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// The repository's key, when it is encrypted.
    pub key: KeySetting,
    /// The physical replication slot.
    pub slot: String,
    /// Create the slot if it does not exist.
    pub create_slot: bool,
    /// How often new WAL is made durable (ignored with `sync`).
    pub flush_interval: Duration,
    /// Make WAL durable as soon as it arrives and say so at once.
    pub sync: bool,
    /// Status updates at least this often.
    pub status_interval: Duration,
    /// A server silent this long is taken for gone and connected to again; it is asked
    /// for a reply at half of it. Also bounds each command and send. None: wait forever.
    pub receive_timeout: Option<Duration>,
}

/// Why streaming stopped or a session failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed or the server refused a command.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The repository cannot be used.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Storing failed.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// Listing failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Storing a segment failed (a different segment under its name, say).
    #[error(transparent)]
    Push(#[from] PushError),
    /// The slot does not exist.
    #[error("replication slot \"{0}\" does not exist")]
    SlotMissing(String),
    /// The slot is not a physical one.
    #[error("replication slot \"{0}\" is not a physical slot")]
    SlotNotPhysical(String),
    /// The server no longer has WAL the repository needs.
    #[error("the server no longer has the WAL at {lsn} that the repository needs next: {message}")]
    WalLost {
        /// Where streaming had to start.
        lsn: Lsn,
        /// The server's words.
        message: String,
    },
    /// The server said something unexpected.
    #[error("{0}")]
    Protocol(String),
    /// The server (or the network to it) went silent.
    #[error("{what} for {} s (receive timeout)", .after.as_secs_f64())]
    Timeout {
        /// What did not happen.
        what: &'static str,
        /// For how long.
        after: Duration,
    },
}

impl StreamError {
    /// Retrying will not help: stop the service.
    pub fn is_fatal(&self) -> bool {
        match self {
            StreamError::SlotMissing(_)
            | StreamError::SlotNotPhysical(_)
            | StreamError::WalLost { .. } => true,
            StreamError::Open(OpenError::Mismatch { .. } | OpenError::UnknownFormat { .. }) => true,
            StreamError::Push(PushError::Conflict { .. } | PushError::Open(_)) => true,
            StreamError::Conn(e) => e
                .server()
                .is_some_and(|s| matches!(s.code.as_str(), "28P01" | "28000" | "42501" | "42704")),
            _ => false,
        }
    }

    /// What the operator can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            StreamError::SlotMissing(_) => Some("create it with --create-slot, or name an existing physical slot with --slot"),
            StreamError::WalLost { .. } => Some("the repository has a gap the server cannot fill: take a new backup (pitr backup) and stream from a new slot"),
            _ => None,
        }
    }
}

/// Runs until `stop` says true: sessions, reconnecting with backoff after failures that a
/// retry can mend; a fatal one ends it with the error.
pub async fn run(
    settings: &PgSettings,
    url: &RepoUrl,
    config: &StreamConfig,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = session(settings, url, config, &metrics, &mut stop, &mut backoff).await;
        metrics.connected.store(0, Ordering::Relaxed);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                metrics.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "pitr: stream: {e}; connecting again in {:.1} s",
                    backoff.as_secs_f64()
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
        if *stop.borrow() {
            return Ok(());
        }
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Checks or creates the slot; its restart point if the server says.
async fn ensure_slot(
    conn: &mut ReplicationConn,
    config: &StreamConfig,
) -> Result<Option<Lsn>, StreamError> {
    let slot = &config.slot;
    let create_sql = format!(
        "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
        quote_ident(slot)
    );
    if conn.server_major() >= 15 {
        let sets = conn
            .simple_query(&format!("READ_REPLICATION_SLOT {}", quote_ident(slot)))
            .await?;
        let set = sets.first();
        let kind = set.and_then(|s| s.text(0, "slot_type"));
        match kind.as_deref() {
            None if config.create_slot => {
                conn.simple_query(&create_sql).await?;
                // A physical slot's consistent point is 0/0: read its restart point.
                let sets = conn
                    .simple_query(&format!("READ_REPLICATION_SLOT {}", quote_ident(slot)))
                    .await?;
                return Ok(restart_lsn(sets.first()));
            }
            None => return Err(StreamError::SlotMissing(slot.clone())),
            Some("physical") => {}
            Some(_) => return Err(StreamError::SlotNotPhysical(slot.clone())),
        }
        return Ok(restart_lsn(set));
    }
    if config.create_slot {
        match conn.simple_query(&create_sql).await {
            Ok(_) => {}
            Err(e) if e.server().is_some_and(|s| s.code == "42710") => {} // exists
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

fn restart_lsn(set: Option<&crate::pg::ResultSet>) -> Option<Lsn> {
    set.and_then(|s| s.text(0, "restart_lsn"))
        .and_then(|l| l.parse::<Lsn>().ok())
        .filter(|l| l.0 != 0)
}

/// Stores timeline `tli`'s history file from the server if the repository lacks it (the
/// server's answer bounded by `limit`, the repository's write not).
async fn store_history(
    conn: &mut ReplicationConn,
    repo: &Repository,
    tli: u32,
    limit: Option<Duration>,
) -> Result<(), StreamError> {
    if tli <= 1 {
        return Ok(());
    }
    let sets = answered(limit, conn.simple_query(&format!("TIMELINE_HISTORY {tli}"))).await?;
    let set = sets
        .first()
        .ok_or_else(|| StreamError::Protocol("TIMELINE_HISTORY returned nothing".into()))?;
    let name = set
        .text(0, "filename")
        .unwrap_or_else(|| TimelineId(tli).history_file_name());
    let content = set
        .rows
        .first()
        .and_then(|r| r.get(1).cloned().flatten())
        .unwrap_or_default();
    store_bytes(repo, &name, content).await?;
    Ok(())
}

/// Where the repository's WAL on `tli` ends: after its newest whole segment, or after
/// the pieces of a newer segment that start at its first byte. None: it holds none.
pub async fn durable_end(
    repo: &Repository,
    tli: u32,
    seg: WalSegmentSize,
) -> Result<Option<Lsn>, StreamError> {
    let storage = repo.objects().storage();
    let tli_hex = format!("{tli:08X}");
    let mut end: Option<Lsn> = None;
    for o in list_all(storage.as_ref(), &format!("wal/{tli_hex}")).await? {
        let name = o.key.rsplit('/').next().unwrap_or("");
        if let Ok(s) = SegmentName::parse(name, seg) {
            end = end.max(Some(s.end_lsn()));
        }
    }
    let streamed =
        repo::pieces::streamed_segments(storage.as_ref(), &format!("stream/{tli_hex}")).await?;
    for (name, off) in streamed {
        let Ok(s) = SegmentName::parse(&name, seg) else {
            continue;
        };
        if end.is_none_or(|e| s.start_lsn() >= e) {
            end = end.max(Some(Lsn(s.start_lsn().0 + u64::from(off))));
        }
    }
    Ok(end)
}

async fn session(
    settings: &PgSettings,
    url: &RepoUrl,
    config: &StreamConfig,
    metrics: &Arc<Metrics>,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<(), StreamError> {
    let limit = config.receive_timeout;
    let mut conn = ReplicationConn::connect(settings).await?;
    let system = answered(limit, conn.identify_system()).await?;
    let seg_bytes = answered(limit, async {
        Ok::<_, StreamError>(conn.wal_segment_size().await)
    })
    .await?;
    let seg = WalSegmentSize::new(seg_bytes).map_err(|e| StreamError::Protocol(e.to_string()))?;
    let identity = ClusterIdentity {
        system_identifier: system.system_identifier,
        pg_version: conn.server_major(),
        wal_segment_size: seg_bytes,
    };
    let repo = Repository::open(
        url,
        &config.key,
        Some(&identity),
        Arc::new(Codec::new(2, 4)),
    )
    .await?
    .with_encode_options(repo::envelope::EncodeOptions {
        zstd_level: Some(1),
    });
    let restart = answered(limit, ensure_slot(&mut conn, config)).await?;
    store_history(&mut conn, &repo, system.timeline, limit).await?;
    let tli = system.timeline;
    let start = match durable_end(&repo, tli, seg).await? {
        Some(end) => end,
        // Nothing yet: from the start of the segment holding the slot's restart point (or
        // the server's position), so the first segment is stored from its first byte.
        None => restart.unwrap_or(system.xlogpos).segment_start(seg),
    };
    metrics.durable(start.0);
    metrics.received_lsn.store(start.0, Ordering::Relaxed);
    // The marker names the segment the stream writes (moved on as it goes), so an expire
    // leaves its pieces alone even when it lags behind the newest backup.
    let segment_of = move |tli: u64, lsn: u64| {
        SegmentName::new(TimelineId(tli as u32), Lsn(lsn).segment_number(seg), seg).to_string()
    };
    let mut body = MarkerBody::new("stream");
    body.wal_from = Some(segment_of(u64::from(tli), start.0));
    let marker = Marker::start(repo.objects(), body).await?;
    let follow = tokio::spawn({
        let (handle, metrics) = (marker.handle(), metrics.clone());
        async move {
            loop {
                tokio::time::sleep(repo::markers::REFRESH / 2).await;
                let at = segment_of(
                    metrics.timeline.load(Ordering::Relaxed),
                    metrics.durable_lsn.load(Ordering::Relaxed),
                );
                handle.set(|b| b.wal_from = Some(at));
            }
        }
    });
    let result = stream_session(
        &mut conn, &repo, config, metrics, stop, backoff, tli, start, seg, limit,
    )
    .await;
    follow.abort();
    marker.finish().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn stream_session(
    conn: &mut ReplicationConn,
    repo: &Repository,
    config: &StreamConfig,
    metrics: &Arc<Metrics>,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
    mut tli: u32,
    mut start: Lsn,
    seg: WalSegmentSize,
    limit: Option<Duration>,
) -> Result<(), StreamError> {
    let mut writer = SegmentWriter::new(repo.clone(), tli, start, seg, metrics.clone());
    loop {
        metrics.timeline.store(u64::from(tli), Ordering::Relaxed);
        let sql = format!(
            "START_REPLICATION SLOT {} PHYSICAL {start} TIMELINE {tli}",
            quote_ident(&config.slot)
        );
        answered(limit, conn.start_query(&sql)).await?;
        match answered(limit, conn.next_reply()).await {
            Ok(Some(Reply::CopyBoth)) => {}
            Ok(other) => {
                return Err(StreamError::Protocol(format!(
                    "START_REPLICATION answered {other:?}"
                )))
            }
            Err(StreamError::Conn(e)) => {
                // Before 15 there is no READ_REPLICATION_SLOT: a missing slot shows here.
                if e.server().is_some_and(|s| s.code == "42704") {
                    return Err(StreamError::SlotMissing(config.slot.clone()));
                }
                if let Some(s) = e
                    .server()
                    .filter(|s| s.code == "58P01" || s.message.contains("has already been removed"))
                {
                    return Err(StreamError::WalLost {
                        lsn: start,
                        message: s.message.clone(),
                    });
                }
                return Err(e.into());
            }
            Err(e) => return Err(e),
        }
        metrics.connected.store(1, Ordering::Relaxed);
        match stream_timeline(conn, &mut writer, config, metrics, stop, backoff).await? {
            None => return Ok(()),
            Some((next_tli, next_start)) => {
                eprintln!("pitr: stream: timeline {tli} ends at {next_start}; following timeline {next_tli}");
                store_history(conn, repo, next_tli, limit).await?;
                writer = writer.next_timeline(next_tli, next_start).await?;
                tli = next_tli;
                start = next_start;
            }
        }
    }
}

/// `fut` (a command to the server, or a send), given up after `limit`: a server that stops
/// answering is as good as gone.
async fn answered<T, E>(
    limit: Option<Duration>,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, StreamError>
where
    StreamError: From<E>,
{
    match limit {
        None => Ok(fut.await?),
        Some(after) => match tokio::time::timeout(after, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(StreamError::Timeout {
                what: "the server did not answer",
                after,
            }),
        },
    }
}

/// A standby status update: written, flushed and applied are all where the repository's
/// WAL ends, so neither `remote_write` nor `remote_apply` takes WAL held only in memory for
/// safe (and `remote_apply` does not wait for a replay that never comes).
async fn send_status(
    conn: &mut ReplicationConn,
    writer: &SegmentWriter,
    reply: bool,
    limit: Option<Duration>,
) -> Result<(), StreamError> {
    let d = writer.durable();
    let msg = standby_status(d, d, d, PgTimestamp::now().0, reply);
    answered(limit, conn.send_copy_data(&msg)).await
}

/// When the silence timer next needs a look: at half the receive timeout after the last
/// message (to ask for a reply), then at the whole of it.
fn silence_check(last_recv: Instant, ping_sent: bool, limit: Option<Duration>) -> Option<Instant> {
    let limit = limit?;
    Some(if ping_sent {
        last_recv + limit
    } else {
        last_recv + limit / 2
    })
}

/// Streams one timeline. None: stopped on request; Some: the server ended the timeline
/// and the next one starts there.
async fn stream_timeline(
    conn: &mut ReplicationConn,
    writer: &mut SegmentWriter,
    config: &StreamConfig,
    metrics: &Arc<Metrics>,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<Option<(u32, Lsn)>, StreamError> {
    let limit = config.receive_timeout;
    let mut flush_tick = tokio::time::interval(config.flush_interval);
    let mut status_tick = tokio::time::interval(config.status_interval);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_recv = Instant::now();
    let mut ping_sent = false;
    loop {
        let check = silence_check(last_recv, ping_sent, limit);
        tokio::select! {
            biased;
            _ = stop.changed() => {
                writer.flush().await?;
                send_status(conn, writer, false, limit).await?;
                answered(limit, conn.send_copy_done()).await?;
                return Ok(None);
            }
            reply = conn.next_reply() => {
                let reply = match reply {
                    Err(e) if e.server().is_some_and(|s| s.code == "58P01") => {
                        let message = e.server().map(|s| s.message.clone()).unwrap_or_default();
                        return Err(StreamError::WalLost { lsn: writer.received(), message });
                    }
                    Err(e) => {
                        // The server (or its host) is gone: what it sent is still WAL it had
                        // flushed, so keep it before reconnecting rather than lose up to a
                        // flush interval of it.
                        let _ = writer.flush().await;
                        return Err(e.into());
                    }
                    Ok(r) => r,
                };
                last_recv = Instant::now();
                ping_sent = false;
                let reply = match reply {
                    Some(Reply::Rows(_)) | None => {
                        // CommandComplete without CopyDone: the walsender is done (a server
                        // shutting down, once everything sent was confirmed durable).
                        writer.flush().await?;
                        return Err(StreamError::Protocol(
                            "the server ended streaming (shutting down?)".into(),
                        ));
                    }
                    Some(r) => r,
                };
                match reply {
                    Reply::CopyData(d) => {
                        let mut report = false;
                        let mut msg = d;
                        loop {
                            match parse_server_message(&msg).map_err(|e| StreamError::Protocol(e.to_string()))? {
                                ServerMessage::XLogData { start, wal_end, data, .. } => {
                                    metrics.server_lsn.store(wal_end.0, Ordering::Relaxed);
                                    writer.append(start, &msg[data]).await?;
                                    *backoff = Duration::from_millis(500);
                                }
                                ServerMessage::Keepalive { wal_end, reply_requested, .. } => {
                                    metrics.server_lsn.store(wal_end.0, Ordering::Relaxed);
                                    report |= reply_requested;
                                }
                            }
                            if !config.sync {
                                break;
                            }
                            // Sync: take what has already arrived, then flush it all at once.
                            match tokio::time::timeout(Duration::ZERO, conn.next_reply()).await {
                                Ok(Ok(Some(Reply::CopyData(next)))) => msg = next,
                                Ok(Ok(Some(Reply::CopyDone))) => {
                                    writer.flush().await?;
                                    return end_of_timeline(conn, limit).await.map(Some);
                                }
                                Ok(Ok(Some(_))) => break,
                                Ok(Ok(None)) => return Err(StreamError::Protocol("the server ended replication".into())),
                                Ok(Err(e)) => return Err(e.into()),
                                Err(_) => break,
                            }
                        }
                        if config.sync && writer.pending() > 0 {
                            writer.flush().await?;
                            report = true;
                        }
                        if report {
                            send_status(conn, writer, false, limit).await?;
                        }
                    }
                    Reply::CopyDone => {
                        writer.flush().await?;
                        return end_of_timeline(conn, limit).await.map(Some);
                    }
                    _ => {}
                }
            }
            _ = flush_tick.tick() => {
                if writer.flush().await? {
                    send_status(conn, writer, false, limit).await?;
                }
            }
            _ = status_tick.tick() => {
                send_status(conn, writer, false, limit).await?;
            }
            _ = sleep_until(check) => {
                let after = limit.unwrap_or_default();
                if last_recv.elapsed() >= after {
                    // As if the connection broke: keep what arrived, then connect again.
                    let _ = writer.flush().await;
                    return Err(StreamError::Timeout { what: "no message from the server", after });
                }
                // Half the timeout without a word: ask for one, as walreceiver does.
                send_status(conn, writer, true, limit).await?;
                ping_sent = true;
            }
        }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// After the server's CopyDone at the end of a timeline: ours, then the next timeline and
/// where it starts.
async fn end_of_timeline(
    conn: &mut ReplicationConn,
    limit: Option<Duration>,
) -> Result<(u32, Lsn), StreamError> {
    answered(limit, conn.send_copy_done()).await?;
    let mut next = None;
    while let Some(reply) = answered(limit, conn.next_reply()).await? {
        if let Reply::Rows(set) = reply {
            if let (Some(t), Some(l)) = (set.text(0, "next_tli"), set.text(0, "next_tli_startpos"))
            {
                next = t.parse::<u32>().ok().zip(l.parse::<Lsn>().ok());
            }
        }
    }
    next.ok_or_else(|| StreamError::Protocol("the timeline ended without naming the next".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_checked_at_half_the_receive_timeout_then_at_all_of_it() {
        let t = Instant::now();
        let limit = Some(Duration::from_secs(60));
        assert_eq!(
            silence_check(t, false, limit),
            Some(t + Duration::from_secs(30))
        );
        assert_eq!(
            silence_check(t, true, limit),
            Some(t + Duration::from_secs(60))
        );
        assert_eq!(silence_check(t, false, None), None);
    }
}
