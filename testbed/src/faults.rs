//! Storage faults the bed's S3 server injects into its own responses, for the fault
//! campaign and its smoke test: per request, with a set probability, one of a connection
//! reset before any response, a stall, a response cut off midway, a `503 SlowDown` (the
//! request not performed) or a `500 InternalError` after the request was performed (the
//! write done, the client told it failed). Taking the whole server down and up is
//! [`crate::S3Server::stop`] and [`crate::S3Server::restart`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection is reset (an RST) before any response; the request is not
    /// performed.
    Reset,
    /// The response is held back this long, then the request is performed and answered;
    /// performed even when the client gave up meanwhile (a late write, as S3 can make).
    Stall(Duration),
    /// The request is performed; its response's body stops halfway and the connection is
    /// closed (a response without a body: closed before it completes).
    Cut,
    /// `503 SlowDown`; the request is not performed.
    SlowDown,
    /// The request is performed, then answered `500 InternalError`.
    ErrorAfter,
}

impl Fault {
    fn index(self) -> usize {
        match self {
            Fault::Reset => 0,
            Fault::Stall(_) => 1,
            Fault::Cut => 2,
            Fault::SlowDown => 3,
            Fault::ErrorAfter => 4,
        }
    }

    /// Every kind, with stalls of `stall`.
    pub fn all(stall: Duration) -> Vec<Fault> {
        vec![
            Fault::Reset,
            Fault::Stall(stall),
            Fault::Cut,
            Fault::SlowDown,
            Fault::ErrorAfter,
        ]
    }
}

/// How many faults of each kind were injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub reset: u64,
    pub stall: u64,
    pub cut: u64,
    pub slow_down: u64,
    pub error_after: u64,
}

impl FaultCounts {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.reset + self.stall + self.cut + self.slow_down + self.error_after
    }
}

/// The plan in force and what it has done.
#[derive(Debug, Default)]
pub(crate) struct Injector {
    plan: Mutex<(f64, Vec<Fault>)>,
    rng: AtomicU64,
    counts: [AtomicU64; 5],
    requests: AtomicU64,
}

impl Injector {
    /// From now on each request meets one of `kinds` (chosen evenly) with probability
    /// `rate` (0 or no kinds: none).
    pub(crate) fn set(&self, rate: f64, kinds: &[Fault], seed: u64) {
        if let Ok(mut p) = self.plan.lock() {
            *p = (rate.clamp(0.0, 1.0), kinds.to_vec());
        }
        self.rng.store(seed, Ordering::SeqCst);
    }

    /// The fault for the next request, if any.
    pub(crate) fn draw(&self) -> Option<Fault> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (rate, kinds) = self.plan.lock().ok()?.clone();
        if rate <= 0.0 || kinds.is_empty() {
            return None;
        }
        let r = splitmix(self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed));
        // 53 random bits as a fraction in [0, 1).
        if ((r >> 11) as f64) / ((1u64 << 53) as f64) >= rate {
            return None;
        }
        let fault = kinds[(splitmix(r) % kinds.len() as u64) as usize];
        self.counts[fault.index()].fetch_add(1, Ordering::SeqCst);
        Some(fault)
    }

    pub(crate) fn counts(&self) -> FaultCounts {
        let c = |i: usize| self.counts[i].load(Ordering::SeqCst);
        FaultCounts {
            reset: c(0),
            stall: c(1),
            cut: c(2),
            slow_down: c(3),
            error_after: c(4),
        }
    }

    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An S3 error response as a server sends it.
pub(crate) fn error_response(status: u16, code: &str, message: &str) -> hyper::Response<s3s::Body> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    let mut r = hyper::Response::new(s3s::Body::from(xml));
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    r
}

/// A body that yields the first half of what it was given, waits a moment (so that the
/// server sends the head and that half), then fails: the server closes the connection
/// with the response incomplete. With nothing to send (an empty body, a HEAD) it fails at
/// once: the request was performed, the connection closed before the response completed.
pub(crate) struct CutBody {
    first: Option<Bytes>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl CutBody {
    pub(crate) fn new(whole: Bytes) -> CutBody {
        let half = whole.slice(..whole.len() / 2);
        let sent = !half.is_empty();
        CutBody {
            first: sent.then_some(half),
            pause: sent.then(|| Box::pin(tokio::time::sleep(Duration::from_millis(50)))),
        }
    }
}

impl http_body::Body for CutBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
        }
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        Poll::Ready(Some(Err(std::io::Error::other("fault: response cut"))))
    }
}
