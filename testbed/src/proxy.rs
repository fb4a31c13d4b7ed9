//! A TCP proxy on 127.0.0.1 in front of a real server, for tests of a lost network path.
//! [`Proxy::blackhole`] makes every connection open at that moment stop forwarding in both
//! directions without closing anything: bytes are no longer read, the sockets stay open and
//! the kernel keeps acknowledging, as when a host vanishes behind a stateful firewall. The
//! client sees nothing but silence. Connections made afterwards are forwarded as before (the
//! path is back, or the host reached another way), so a client that notices can reconnect.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; it stops (closing every socket) when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    /// Connections numbered below this are blackholed.
    cut: watch::Sender<u64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// A proxy on a free 127.0.0.1 port forwarding to `target`.
    pub fn start(target: SocketAddr) -> Result<Proxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("start the proxy's runtime")?;
        let listener = runtime
            .block_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .context("bind the proxy")?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let (cut, cut_rx) = watch::channel(0);
        runtime.spawn(accept(listener, target, accepted.clone(), cut_rx));
        Ok(Proxy {
            addr,
            accepted,
            cut,
            runtime: Some(runtime),
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections it has accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Every connection open now stops forwarding, for good, and stays open.
    pub fn blackhole(&self) {
        self.cut.send_replace(self.connections());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    accepted: Arc<AtomicU64>,
    cut: watch::Receiver<u64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        let id = accepted.fetch_add(1, Ordering::SeqCst);
        let cut = cut.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_r, client_w) = client.into_split();
            let (server_r, server_w) = server.into_split();
            tokio::spawn(pump(client_r, server_w, id, cut.clone()));
            pump(server_r, client_w, id, cut).await;
        });
    }
}

/// Copies one direction until EOF, or until the connection is blackholed: then it holds
/// both halves (open, unread) until the proxy stops.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    id: u64,
    mut cut: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if id < *cut.borrow_and_update() {
            let _held = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => {
                    // Read just as the cut came: dropped, as a lost path drops packets.
                    if id < *cut.borrow() {
                        continue;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = cut.changed() => if changed.is_err() {
                return;
            },
        }
    }
}
