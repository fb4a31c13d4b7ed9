//! A real S3-compatible server for tests: s3s + s3s-fs serving HTTP on a free 127.0.0.1
//! port from its own temp dir, in a runtime of its own inside the test process (so it dies
//! with the test, whatever happens). With `PITR_TEST_S3_ENDPOINT` set, the same tests use
//! that endpoint instead (AWS S3, Garage, MinIO elsewhere): see [`S3Server::start`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpSocket;

use crate::{temp_dir, unique_name};

const ACCESS_KEY: &str = "pitr-test-access";
const SECRET_KEY: &str = "pitr-test-secret";
const REGION: &str = "us-east-1";
const BUCKET: &str = "pitr-test";

/// An S3 endpoint for one test: the bed's own server, or an external one.
#[derive(Debug)]
pub struct S3Server {
    endpoint: String,
    access_key: String,
    secret_key: String,
    region: String,
    bucket: String,
    /// Every key a test writes goes under this prefix (unique per server, so tests sharing
    /// an external bucket do not see each other).
    prefix: String,
    local: Option<Local>,
}

#[derive(Debug)]
struct Local {
    root: tempfile::TempDir,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    /// While stopped: a socket bound to the port but not listening, so connections are
    /// refused (the outage) and no other process can take the port before the restart.
    held: Option<TcpSocket>,
    counters: Arc<Counters>,
}

/// What the local server counts.
#[derive(Debug, Default)]
struct Counters {
    /// Objects written (PutObject, CompleteMultipartUpload, CopyObject) since it started.
    writes: AtomicU64,
    /// Of those, server-side copies (CopyObject).
    copies: AtomicU64,
    /// Each object-creating request's path with its `x-amz-storage-class` and
    /// `x-amz-server-side-encryption` headers.
    headers: std::sync::Mutex<Vec<WriteHeaders>>,
    /// Storage faults injected into responses.
    faults: crate::faults::Injector,
    /// One lock per object key a request has named: requests on one key are served one
    /// after another.
    keys: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Counters {
    /// The lock of object `path` (`/bucket/key`).
    fn key_lock(&self, path: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.entry(path.to_owned()).or_default().clone()
    }
}

/// The storage headers of one object-creating request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteHeaders {
    /// The request path (`/bucket/key`, percent-encoded as sent).
    pub path: String,
    pub storage_class: Option<String>,
    pub sse: Option<String>,
}

impl S3Server {
    /// The endpoint tests use: external when `PITR_TEST_S3_ENDPOINT` is set (with
    /// `PITR_TEST_S3_BUCKET`, and credentials in `PITR_TEST_S3_ACCESS_KEY` /
    /// `PITR_TEST_S3_SECRET_KEY` or the usual `AWS_*` variables, region in
    /// `PITR_TEST_S3_REGION`), else a local server. Fails loudly if neither can be had.
    pub fn start() -> Result<S3Server> {
        match std::env::var("PITR_TEST_S3_ENDPOINT") {
            Ok(endpoint) if !endpoint.is_empty() => S3Server::external(endpoint),
            _ => S3Server::start_local(),
        }
    }

    /// Always the bed's own server, with bucket `pitr-test` created.
    pub fn start_local() -> Result<S3Server> {
        let root = temp_dir("pitr-bed-s3-")?;
        std::fs::create_dir(root.path().join(BUCKET)).context("create the test bucket")?;
        let counters = Arc::new(Counters::default());
        let (runtime, addr) = serve_socket(
            root.path(),
            hold((Ipv4Addr::LOCALHOST, 0).into())?,
            counters.clone(),
        )?;
        Ok(S3Server {
            endpoint: format!("http://{addr}"),
            access_key: ACCESS_KEY.to_owned(),
            secret_key: SECRET_KEY.to_owned(),
            region: REGION.to_owned(),
            bucket: BUCKET.to_owned(),
            prefix: unique_name("t"),
            local: Some(Local {
                root,
                addr,
                runtime: Some(runtime),
                held: None,
                counters,
            }),
        })
    }

    fn external(endpoint: String) -> Result<S3Server> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        let bucket = var(&["PITR_TEST_S3_BUCKET"])
            .context("PITR_TEST_S3_ENDPOINT is set but PITR_TEST_S3_BUCKET is not")?;
        Ok(S3Server {
            endpoint,
            access_key: var(&["PITR_TEST_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
                .context("no access key for PITR_TEST_S3_ENDPOINT")?,
            secret_key: var(&["PITR_TEST_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"])
                .context("no secret key for PITR_TEST_S3_ENDPOINT")?,
            region: var(&["PITR_TEST_S3_REGION", "AWS_REGION"]).unwrap_or_else(|| REGION.into()),
            bucket,
            prefix: unique_name("pitr-test"),
            local: None,
        })
    }

    /// `http://127.0.0.1:PORT` (or the external endpoint).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The static access key id.
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// The static secret key.
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The region to sign for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The bucket tests write into.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix owned by this server handle (no trailing slash).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A repository URL under this handle's prefix: `s3://bucket/prefix/name`.
    pub fn repo_url(&self, name: &str) -> String {
        format!("s3://{}/{}/{name}", self.bucket, self.prefix)
    }

    /// The environment a `pitr` process needs to reach this endpoint: the AWS standard
    /// variables plus path-style addressing.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", &self.access_key),
            ("AWS_SECRET_ACCESS_KEY", &self.secret_key),
            ("AWS_REGION", &self.region),
            ("PITR_S3_PATH_STYLE", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Credentials, region and addressing of the bed's local server (all but the endpoint).
    pub fn static_env() -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", REGION),
            ("PITR_S3_PATH_STYLE", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Objects written to the bed's own server since it started (PutObject, completed
    /// multipart uploads and CopyObject that succeeded, pitr's conditional-put probes and
    /// markers aside; 0 for an external endpoint).
    pub fn writes(&self) -> u64 {
        self.local
            .as_ref()
            .map_or(0, |l| l.counters.writes.load(Ordering::SeqCst))
    }

    /// The storage headers of every PutObject, CreateMultipartUpload and CopyObject so far.
    pub fn write_headers(&self) -> Vec<WriteHeaders> {
        self.local.as_ref().map_or(Vec::new(), |l| {
            l.counters
                .headers
                .lock()
                .map(|h| h.clone())
                .unwrap_or_default()
        })
    }

    /// Of [`S3Server::writes`], the server-side copies (CopyObject).
    pub fn copies(&self) -> u64 {
        self.local
            .as_ref()
            .map_or(0, |l| l.counters.copies.load(Ordering::SeqCst))
    }

    /// From now on each request to the local server meets one of `kinds` (chosen evenly)
    /// with probability `rate`; `rate` 0 ends the faults. `seed` makes a run repeatable.
    /// (Nothing for an external endpoint.)
    pub fn set_faults(&self, rate: f64, kinds: &[crate::Fault], seed: u64) {
        if let Some(l) = &self.local {
            l.counters.faults.set(rate, kinds, seed);
        }
    }

    /// The faults injected so far, by kind.
    pub fn faults_injected(&self) -> crate::FaultCounts {
        self.local
            .as_ref()
            .map_or_else(Default::default, |l| l.counters.faults.counts())
    }

    /// Requests the local server has received so far (0 for an external endpoint).
    pub fn requests(&self) -> u64 {
        self.local
            .as_ref()
            .map_or(0, |l| l.counters.faults.requests())
    }

    /// Where the local server keeps its bucket dirs (None for an external endpoint).
    pub fn storage_dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.root.path())
    }

    /// Takes the local server down: the port refuses connections and open connections are
    /// cut (for outage tests). Data stays.
    pub fn stop(&mut self) -> Result<()> {
        let Some(local) = self.local.as_mut() else {
            bail!("an external S3 endpoint cannot be stopped by the bed");
        };
        if let Some(rt) = local.runtime.take() {
            shut_down(rt);
            // The port stays ours while stopped (a test that restarts the server once lost
            // it to another process's connection in between).
            for _ in 0..50 {
                match hold(local.addr) {
                    Ok(socket) => {
                        local.held = Some(socket);
                        break;
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
        Ok(())
    }

    /// Brings a stopped local server back on the same port with the same data.
    pub fn restart(&mut self) -> Result<()> {
        let Some(local) = self.local.as_mut() else {
            bail!("an external S3 endpoint cannot be restarted by the bed");
        };
        if local.runtime.is_some() {
            return Ok(());
        }
        if let Some(socket) = local.held.take() {
            let (rt, _) = serve_socket(local.root.path(), socket, local.counters.clone())?;
            local.runtime = Some(rt);
            return Ok(());
        }
        // The port was ours a moment ago; give the kernel a few tries to release it.
        let mut last_err = None;
        for _ in 0..50 {
            let socket = hold(local.addr);
            match socket.and_then(|s| serve_socket(local.root.path(), s, local.counters.clone())) {
                Ok((rt, _)) => {
                    local.runtime = Some(rt);
                    return Ok(());
                }
                Err(err) => last_err = Some(err),
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("restart failed")))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.local.as_mut().and_then(|l| l.runtime.take()) {
            shut_down(rt);
        }
    }
}

/// Stops the server's runtime and waits until its listener and connections are closed. A
/// runtime cannot be dropped from async code (the test's own runtime), so a plain thread
/// does it.
fn shut_down(runtime: tokio::runtime::Runtime) {
    let stopper = std::thread::spawn(move || {
        runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    });
    let _ = stopper.join();
}

/// A socket bound to `addr` (with SO_REUSEADDR), not listening yet.
fn hold(addr: SocketAddr) -> Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("bind the S3 server to {addr}"))?;
    Ok(socket)
}

/// Serves the s3s-fs tree at `root` on `addr` from a new runtime; returns it and the bound
/// address. The S3 server binary (`pitr-test-s3`) runs the same code.
pub fn serve(root: &Path, addr: SocketAddr) -> Result<(tokio::runtime::Runtime, SocketAddr)> {
    serve_socket(root, hold(addr)?, Arc::new(Counters::default()))
}

/// The S3 service, counting the requests that write an object, and refusing a CopyObject
/// with `If-None-Match: *` onto an existing key as AWS S3 does (s3s-fs 0.14 ignores that
/// header on CopyObject; it honours it on PutObject and CompleteMultipartUpload).
#[derive(Clone)]
struct Counting {
    inner: s3s::service::S3Service,
    counters: Arc<Counters>,
    root: std::path::PathBuf,
    /// The connection's socket (each connection has its own copy of the service).
    conn: Option<Arc<std::os::fd::OwnedFd>>,
}

/// Makes the connection's close a reset (SO_LINGER of 0): what a client of a server that
/// crashed, or of a balancer that dropped it, sees.
fn reset_on_close(socket: &std::os::fd::OwnedFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
}

/// Percent-decodes a request path (`None` if it is not UTF-8 once decoded).
fn decode_path(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A 412 as S3 sends it.
fn precondition_failed() -> hyper::Response<s3s::Body> {
    let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>PreconditionFailed</Code>\
               <Message>At least one of the pre-conditions you specified did not hold</Message></Error>";
    let mut r = hyper::Response::new(s3s::Body::from(xml.to_owned()));
    *r.status_mut() = hyper::StatusCode::PRECONDITION_FAILED;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    r
}

type Incoming = hyper::Request<hyper::body::Incoming>;

impl hyper::service::Service<Incoming> for Counting {
    type Response = <s3s::service::S3Service as hyper::service::Service<Incoming>>::Response;
    type Error = <s3s::service::S3Service as hyper::service::Service<Incoming>>::Error;
    type Future = <s3s::service::S3Service as hyper::service::Service<Incoming>>::Future;

    fn call(&self, req: Incoming) -> Self::Future {
        // Run to its end even when the client goes away (hyper drops a request's future
        // when its connection closes): s3s-fs renames a body into place and then writes
        // its checksum and ETag beside it, and a drop in between left an object whose
        // every later GET failed its checksum. S3 stores a write whole or not at all.
        let task = tokio::spawn(self.handle(req));
        Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Err(s3s::HttpError::new(Box::new(e))))
        })
    }
}

impl Counting {
    /// The request, with the fault drawn for it if any.
    fn handle(&self, req: Incoming) -> <Self as hyper::service::Service<Incoming>>::Future {
        use crate::faults::{error_response, CutBody};
        use crate::Fault;
        let Some(fault) = self.counters.faults.draw() else {
            return self.serve(req);
        };
        match fault {
            Fault::Reset => {
                if let Some(socket) = &self.conn {
                    reset_on_close(socket);
                }
                Box::pin(async { Err(s3s::HttpError::new("fault: connection reset".into())) })
            }
            Fault::SlowDown => Box::pin(async {
                Ok(error_response(
                    503,
                    "SlowDown",
                    "Please reduce your request rate.",
                ))
            }),
            Fault::Stall(d) => {
                let call = self.serve(req);
                Box::pin(async move {
                    tokio::time::sleep(d).await;
                    call.await
                })
            }
            Fault::ErrorAfter => {
                let call = self.serve(req);
                Box::pin(async move {
                    let _ = call.await;
                    Ok(error_response(
                        500,
                        "InternalError",
                        "We encountered an internal error. Please try again.",
                    ))
                })
            }
            Fault::Cut => {
                let call = self.serve(req);
                Box::pin(async move {
                    let (parts, body) = call.await?.into_parts();
                    let whole = http_body_util::BodyExt::collect(body)
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    Ok(hyper::Response::from_parts(
                        parts,
                        s3s::Body::http_body(CutBody::new(whole)),
                    ))
                })
            }
        }
    }

    /// The request served (counted, conditional copies refused), no fault injected.
    fn serve(&self, req: Incoming) -> <Self as hyper::service::Service<Incoming>>::Future {
        let query = req.uri().query().unwrap_or("");
        let object_put = req.method() == hyper::Method::PUT && !query.contains("partNumber=");
        let completed = req.method() == hyper::Method::POST && query.contains("uploadId=");
        // pitr's conditional-put probe and its markers of running commands are not data.
        let path = req.uri().path();
        let probe = path.contains("/.conditional-probe/") || path.contains("/running/");
        let creates = req.method() == hyper::Method::POST && query.contains("uploads");
        if (object_put || creates) && !probe {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            if let Ok(mut h) = self.counters.headers.lock() {
                h.push(WriteHeaders {
                    path: path.to_owned(),
                    storage_class: header("x-amz-storage-class"),
                    sse: header("x-amz-server-side-encryption"),
                });
            }
        }
        let copy = object_put && req.headers().contains_key("x-amz-copy-source");
        if copy
            && req
                .headers()
                .get(hyper::header::IF_NONE_MATCH)
                .is_some_and(|v| v.as_bytes() == b"*")
        {
            // Path-style: /bucket/key, stored by s3s-fs at root/bucket/key.
            let target = decode_path(path.trim_start_matches('/'))
                .filter(|p| !p.split('/').any(|part| part == ".." || part == "."))
                .map(|p| self.root.join(p));
            if target.is_some_and(|t| t.is_file()) {
                return Box::pin(async { Ok(precondition_failed()) });
            }
        }
        // Requests on one object are served one at a time, as S3 makes each write atomic
        // and each read see one version: s3s-fs renames a body into place and then writes
        // its checksum beside it, so two writes of one key at once (a killed client's,
        // still running here, and the next) could leave one's body with the other's
        // checksum, which every later GET fails (a test met it); a GET between the two
        // steps would pair them too. Parts of a multipart upload and bucket-wide requests
        // (listings, batch deletes) are not held.
        let on_object = path.trim_start_matches('/').contains('/')
            && !query.contains("partNumber=")
            && !query.contains("uploads")
            && !query.contains("list-type");
        let lock = on_object.then(|| self.counters.key_lock(path));
        let counted = (object_put || completed) && !probe;
        let inner = self.inner.clone();
        // Counted once the object is stored: a refused conditional write (412) or an
        // upload cut off midway (its writer killed) wrote nothing.
        let counters = self.counters.clone();
        Box::pin(async move {
            let _held = match &lock {
                Some(l) => Some(l.lock().await),
                None => None,
            };
            let response = hyper::service::Service::call(&inner, req).await;
            if !counted {
                return response;
            }
            if response.as_ref().is_ok_and(|r| r.status().is_success()) {
                counters.writes.fetch_add(1, Ordering::SeqCst);
                if copy {
                    counters.copies.fetch_add(1, Ordering::SeqCst);
                }
            }
            response
        })
    }
}

/// [`serve`] on a socket already bound.
fn serve_socket(
    root: &Path,
    socket: TcpSocket,
    counters: Arc<Counters>,
) -> Result<(tokio::runtime::Runtime, SocketAddr)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("testbed-s3")
        .enable_all()
        .build()?;
    let fs = s3s_fs::FileSystem::new(root)
        .map_err(|e| anyhow::anyhow!("s3s-fs on {}: {e:?}", root.display()))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        Counting {
            inner: b.build(),
            counters,
            root: root.to_owned(),
            conn: None,
        }
    };
    // No block_on: this may be called from inside a test's own runtime.
    let listener = {
        let _context = runtime.enter();
        socket.listen(1024)?
    };
    let bound = listener.local_addr()?;
    runtime.spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            // Without TCP_NODELAY small responses wait ~40 ms on delayed ACKs, which would
            // falsify every latency figure measured against this server.
            let _ = socket.set_nodelay(true);
            let mut own = service.clone();
            own.conn = std::os::fd::AsFd::as_fd(&socket)
                .try_clone_to_owned()
                .ok()
                .map(Arc::new);
            let conn = http
                .serve_connection(TokioIo::new(socket), own)
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    Ok((runtime, bound))
}
