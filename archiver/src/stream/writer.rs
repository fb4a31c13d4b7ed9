//! The segment `pitr stream` is receiving, made durable as it grows: new bytes go to the
//! repository as a piece (`stream/.../<segment>/<start>-<end>`) at each flush, and once the
//! segment is complete it is stored whole under `wal/` exactly as wal-push would store it,
//! and its pieces are deleted. `durable()` is never ahead of what the repository holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use repo::keys::piece_key;
use repo::pieces::{list_pieces, read_streamed};
use repo::repository::Repository;
use repo::storage::{PutMode, PutOutcome};
use walfmt::{Lsn, SegmentName, TimelineId, WalSegmentSize};

use super::metrics::Metrics;
use super::StreamError;
use crate::wal_push::store_bytes;

/// Writes one timeline's WAL from a start position on.
#[derive(Debug)]
pub struct SegmentWriter {
    repo: Repository,
    timeline: u32,
    seg: WalSegmentSize,
    segno: u64,
    /// Offset in the segment of `buf[0]` (0 unless started in the middle of a segment,
    /// whose first part is in the repository as pieces).
    buf_start: u32,
    /// The segment's bytes from `buf_start` as received.
    buf: Vec<u8>,
    /// Offset up to which the segment is durable.
    durable_off: u32,
    metrics: Arc<Metrics>,
}

impl SegmentWriter {
    /// A writer for `timeline` whose WAL up to `start` is durable already.
    pub fn new(
        repo: Repository,
        timeline: u32,
        start: Lsn,
        seg: WalSegmentSize,
        metrics: Arc<Metrics>,
    ) -> SegmentWriter {
        let off = start.segment_offset(seg) as u32;
        SegmentWriter {
            repo,
            timeline,
            seg,
            segno: start.segment_number(seg),
            buf_start: off,
            buf: Vec::with_capacity(seg.bytes() as usize - off as usize),
            durable_off: off,
            metrics,
        }
    }

    fn name(&self) -> String {
        SegmentName::new(TimelineId(self.timeline), self.segno, self.seg).to_string()
    }

    fn seg_start(&self) -> u64 {
        self.segno * self.seg.bytes()
    }

    /// WAL received up to here.
    pub fn received(&self) -> Lsn {
        Lsn(self.seg_start() + u64::from(self.buf_start) + self.buf.len() as u64)
    }

    /// WAL durable in the repository up to here.
    pub fn durable(&self) -> Lsn {
        Lsn(self.seg_start() + u64::from(self.durable_off))
    }

    /// Bytes received and not yet durable.
    pub fn pending(&self) -> usize {
        (self.received().0 - self.durable().0) as usize
    }

    /// Appends WAL that starts at `start` (which must be where the last ended); a segment
    /// that fills is stored whole at once.
    pub async fn append(&mut self, start: Lsn, mut data: &[u8]) -> Result<(), StreamError> {
        if start != self.received() {
            return Err(StreamError::Protocol(format!(
                "WAL arrived at {start}, expected {}",
                self.received()
            )));
        }
        while !data.is_empty() {
            let room = self.seg.bytes() as usize - self.buf_start as usize - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.metrics
                .received_lsn
                .store(self.received().0, Ordering::Relaxed);
            if take == room {
                self.complete().await?;
            }
        }
        Ok(())
    }

    /// Stores what was received since the last flush as a piece. Returns whether anything
    /// was stored.
    pub async fn flush(&mut self) -> Result<bool, StreamError> {
        let from = (self.durable_off - self.buf_start) as usize;
        if from == self.buf.len() {
            return Ok(false);
        }
        let end = self.buf_start + self.buf.len() as u32;
        let name = self.name();
        let key = piece_key(&name, self.durable_off, end)
            .ok_or_else(|| StreamError::Protocol(format!("no piece key for {name}")))?;
        let bytes = Bytes::copy_from_slice(&self.buf[from..]);
        let len = bytes.len() as u64;
        match self
            .repo
            .objects()
            .put(&key, bytes.clone(), PutMode::IfAbsent)
            .await?
        {
            PutOutcome::Stored => {}
            PutOutcome::AlreadyExists => {
                // Stored by an earlier run that stopped before it could say so: only the
                // same bytes will do.
                let (_, stored) = self.repo.objects().get(&key).await?;
                if stored != bytes {
                    return Err(StreamError::Protocol(format!(
                        "piece {key} is stored with other bytes than the server sent"
                    )));
                }
            }
        }
        self.durable_off = end;
        self.metrics.pieces.fetch_add(1, Ordering::Relaxed);
        self.metrics.bytes.fetch_add(len, Ordering::Relaxed);
        self.metrics.durable(self.durable().0);
        Ok(true)
    }

    /// The writer for the next timeline, which starts at `start` (the switch point, where
    /// this one's WAL ends). PostgreSQL begins a new timeline's first segment with the old
    /// timeline's WAL up to the switch point: that prefix is stored at once as the first
    /// piece of the new timeline's segment, so the segment can be rebuilt from its pieces.
    pub async fn next_timeline(
        mut self,
        timeline: u32,
        start: Lsn,
    ) -> Result<SegmentWriter, StreamError> {
        self.flush().await?;
        if start != self.received() {
            return Err(StreamError::Protocol(format!(
                "timeline {timeline} starts at {start}, but WAL was received up to {}",
                self.received()
            )));
        }
        let mut next = SegmentWriter::new(
            self.repo.clone(),
            timeline,
            start,
            self.seg,
            self.metrics.clone(),
        );
        let off = next.durable_off as usize;
        if off == 0 {
            return Ok(next);
        }
        let prefix = if self.buf_start == 0 {
            self.buf[..off].to_vec()
        } else {
            let head = read_streamed(self.repo.objects(), &self.name())
                .await?
                .unwrap_or_default();
            if head.len() < off {
                return Err(StreamError::Protocol(format!(
                    "the pieces of {} end at {}, before the switch to timeline {timeline} at {start}",
                    self.name(),
                    head.len()
                )));
            }
            head[..off].to_vec()
        };
        next.buf_start = 0;
        next.buf = prefix;
        next.durable_off = 0;
        next.flush().await?;
        Ok(next)
    }

    /// The segment is full: store it whole (checked, as wal-push does), drop its pieces,
    /// move on to the next.
    async fn complete(&mut self) -> Result<(), StreamError> {
        let name = self.name();
        let whole = if self.buf_start == 0 {
            Bytes::from(std::mem::take(&mut self.buf))
        } else {
            // Started in the middle: the first part is in the repository.
            let head = read_streamed(self.repo.objects(), &name)
                .await?
                .unwrap_or_default();
            if head.len() < self.buf_start as usize {
                return Err(StreamError::Protocol(format!(
                    "the pieces of {name} end at {}, before {} where streaming resumed",
                    head.len(),
                    self.buf_start
                )));
            }
            let mut all = head[..self.buf_start as usize].to_vec();
            all.extend_from_slice(&self.buf);
            self.buf.clear();
            Bytes::from(all)
        };
        let len = whole.len() as u64;
        store_bytes(&self.repo, &name, whole).await?;
        self.metrics.segments.fetch_add(1, Ordering::Relaxed);
        self.metrics.bytes.fetch_add(len, Ordering::Relaxed);
        // The whole segment is the copy readers take; its pieces are no longer needed.
        let storage = self.repo.objects().storage().clone();
        if let Ok(pieces) = list_pieces(storage.as_ref(), &name).await {
            let keys: Vec<String> = pieces.into_iter().map(|p| p.key).collect();
            let _ = storage.delete(&keys).await;
        }
        self.segno += 1;
        self.buf_start = 0;
        self.durable_off = 0;
        self.buf = Vec::with_capacity(self.seg.bytes() as usize);
        self.metrics.durable(self.durable().0);
        Ok(())
    }
}
