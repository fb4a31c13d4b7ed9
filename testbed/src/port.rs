//! Free TCP ports on 127.0.0.1.

use std::net::{Ipv4Addr, TcpListener};

/// A port that was free a moment ago. Callers that can lose a race for it retry with another.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
