//! What `pitr stream` is doing, as counters the service updates and the Prometheus
//! endpoint (`--metrics-addr`) and `pitr status` read.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// The service's figures. Cheap to update from the streaming loop.
#[derive(Debug, Default)]
pub struct Metrics {
    /// WAL received up to (LSN).
    pub received_lsn: AtomicU64,
    /// WAL durable in the repository up to (LSN): what the slot may advance to.
    pub durable_lsn: AtomicU64,
    /// The server's WAL end, as it last said.
    pub server_lsn: AtomicU64,
    /// The timeline being streamed.
    pub timeline: AtomicU64,
    /// Unix microseconds when received WAL was last all durable (0: never behind yet).
    pub caught_up_at: AtomicI64,
    /// Pieces stored.
    pub pieces: AtomicU64,
    /// Whole segments stored.
    pub segments: AtomicU64,
    /// Bytes of WAL stored (pieces and segments).
    pub bytes: AtomicU64,
    /// Errors (each followed by a reconnect).
    pub errors: AtomicU64,
    /// 1 while connected and streaming.
    pub connected: AtomicU64,
}

fn now_micros() -> i64 {
    walfmt::PgTimestamp::now().unix_micros()
}

impl Metrics {
    /// Records that WAL up to `lsn` is durable.
    pub fn durable(&self, lsn: u64) {
        self.durable_lsn.store(lsn, Ordering::Relaxed);
        if lsn >= self.received_lsn.load(Ordering::Relaxed) {
            self.caught_up_at.store(now_micros(), Ordering::Relaxed);
        }
    }

    /// Bytes received but not yet durable.
    pub fn lag_bytes(&self) -> u64 {
        let server = self
            .server_lsn
            .load(Ordering::Relaxed)
            .max(self.received_lsn.load(Ordering::Relaxed));
        server.saturating_sub(self.durable_lsn.load(Ordering::Relaxed))
    }

    /// Seconds since all received WAL was last durable (0 when it is now).
    pub fn lag_seconds(&self) -> f64 {
        let received = self.received_lsn.load(Ordering::Relaxed);
        if self.durable_lsn.load(Ordering::Relaxed) >= received {
            return 0.0;
        }
        let at = self.caught_up_at.load(Ordering::Relaxed);
        if at == 0 {
            return 0.0;
        }
        (now_micros() - at).max(0) as f64 / 1e6
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, String); 11] = [
            (
                "pitr_stream_received_lsn",
                "gauge",
                "WAL received up to this LSN (as a byte position)",
                g(&self.received_lsn).to_string(),
            ),
            (
                "pitr_stream_durable_lsn",
                "gauge",
                "WAL durable in the repository up to this LSN",
                g(&self.durable_lsn).to_string(),
            ),
            (
                "pitr_stream_server_lsn",
                "gauge",
                "the server's WAL end as it last reported it",
                g(&self.server_lsn).to_string(),
            ),
            (
                "pitr_stream_lag_bytes",
                "gauge",
                "bytes of WAL the server has that are not durable in the repository",
                self.lag_bytes().to_string(),
            ),
            (
                "pitr_stream_lag_seconds",
                "gauge",
                "seconds since all received WAL was last durable",
                format!("{:.3}", self.lag_seconds()),
            ),
            (
                "pitr_stream_timeline",
                "gauge",
                "the timeline being streamed",
                g(&self.timeline).to_string(),
            ),
            (
                "pitr_stream_connected",
                "gauge",
                "1 while streaming from the server",
                g(&self.connected).to_string(),
            ),
            (
                "pitr_stream_pieces_stored_total",
                "counter",
                "pieces of growing segments stored",
                g(&self.pieces).to_string(),
            ),
            (
                "pitr_stream_segments_stored_total",
                "counter",
                "whole segments stored",
                g(&self.segments).to_string(),
            ),
            (
                "pitr_stream_bytes_stored_total",
                "counter",
                "bytes of WAL stored",
                g(&self.bytes).to_string(),
            ),
            (
                "pitr_stream_errors_total",
                "counter",
                "errors, each followed by a reconnect",
                g(&self.errors).to_string(),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}

/// Serves `GET /metrics` (any path) on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    serve_text(listener, std::sync::Arc::new(move || metrics.render())).await;
}

/// Serves what `render` says, as Prometheus text, on `listener` until the task is dropped.
pub async fn serve_text(
    listener: tokio::net::TcpListener,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let body = render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.received_lsn.store(100, Ordering::Relaxed);
        m.server_lsn.store(150, Ordering::Relaxed);
        m.durable(60);
        let text = m.render();
        assert!(text.contains("pitr_stream_durable_lsn 60\n"), "{text}");
        assert!(text.contains("pitr_stream_lag_bytes 90\n"), "{text}");
        assert!(
            text.contains("# TYPE pitr_stream_errors_total counter\n"),
            "{text}"
        );
    }
}
