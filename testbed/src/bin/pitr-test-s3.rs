//! `pitr-test-s3 [--port N] DIR`: the bed's S3-compatible server as a process, for benches
//! and manual runs. Prints the environment a client needs, then serves until killed.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut port = 0u16;
    let mut root: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().unwrap_or_default().parse()?,
            "-h" | "--help" => {
                println!("usage: pitr-test-s3 [--port N] DIR");
                return Ok(());
            }
            dir => root = Some(PathBuf::from(dir)),
        }
    }
    let Some(root) = root else {
        anyhow::bail!("usage: pitr-test-s3 [--port N] DIR");
    };
    std::fs::create_dir_all(root.join("pitr-test"))?;
    let (runtime, addr) = testbed::serve_s3(&root, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    println!("AWS_ENDPOINT_URL=http://{addr}");
    for (k, v) in testbed::S3Server::static_env() {
        println!("{k}={v}");
    }
    println!("# bucket: pitr-test");
    runtime.block_on(std::future::pending::<()>());
    Ok(())
}
