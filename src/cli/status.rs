//! `pitr status`: what a running `pitr stream` is doing, read from its metrics endpoint,
//! for a person (or `--json`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::json;
use walfmt::Lsn;

use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where `pitr stream --metrics-addr` serves its metrics
    #[arg(
        long,
        env = "PITR_METRICS_ADDR",
        value_name = "ADDR",
        default_value = "127.0.0.1:9187"
    )]
    metrics_addr: SocketAddr,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

/// The samples of a Prometheus text exposition, by metric name.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: pitr\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    sock.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned()))
}

pub fn run(args: Args) -> Result<(), Failure> {
    let body = fetch(args.metrics_addr).map_err(|e| {
        Failure::new(
            Exit::BadInput,
            format!("could not read metrics from {}: {e}", args.metrics_addr),
        )
        .hint("is pitr stream running with --metrics-addr at that address?")
    })?;
    let m = parse(&body);
    let get = |k: &str| m.get(&format!("pitr_stream_{k}")).copied().unwrap_or(0.0);
    let lsn = |k: &str| Lsn(get(k) as u64).to_string();
    let connected = get("connected") >= 1.0;
    if args.json {
        println!(
            "{}",
            json!({
                "connected": connected,
                "timeline": get("timeline") as u64,
                "received_lsn": lsn("received_lsn"),
                "durable_lsn": lsn("durable_lsn"),
                "server_lsn": lsn("server_lsn"),
                "lag_bytes": get("lag_bytes") as u64,
                "lag_seconds": get("lag_seconds"),
                "pieces_stored": get("pieces_stored_total") as u64,
                "segments_stored": get("segments_stored_total") as u64,
                "bytes_stored": get("bytes_stored_total") as u64,
                "errors": get("errors_total") as u64,
            })
        );
        return Ok(());
    }
    println!(
        "stream     {}, timeline {}",
        if connected {
            "streaming"
        } else {
            "not connected (retrying)"
        },
        get("timeline") as u64
    );
    println!("server     WAL at {}", lsn("server_lsn"));
    println!("received   up to {}", lsn("received_lsn"));
    println!(
        "durable    up to {} (behind the server by {} bytes, {:.1} s)",
        lsn("durable_lsn"),
        get("lag_bytes") as u64,
        get("lag_seconds")
    );
    println!(
        "stored     {} pieces, {} whole segments, {:.1} MB; {} errors",
        get("pieces_stored_total") as u64,
        get("segments_stored_total") as u64,
        get("bytes_stored_total") / 1e6,
        get("errors_total") as u64
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_exposition() {
        let m = parse("# HELP x y\n# TYPE x gauge\npitr_stream_durable_lsn 4096\npitr_stream_lag_seconds 0.250\n");
        assert_eq!(m["pitr_stream_durable_lsn"], 4096.0);
        assert_eq!(m["pitr_stream_lag_seconds"], 0.25);
    }
}
