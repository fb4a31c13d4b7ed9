//! The payloads of the physical replication protocol's CopyData messages (PostgreSQL's
//! protocol-replication docs; src/backend/replication/walsender.c): the server's XLogData
//! ('w') and keepalive ('k'), and the client's standby status update ('r'). All integers
//! are big-endian; times are microseconds since 2000-01-01 UTC.

use crate::lsn::Lsn;

/// A message from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// WAL bytes: they start at `start`; `data` is their range in the message.
    XLogData {
        /// LSN of the first byte.
        start: Lsn,
        /// The server's WAL end (flush position) when it sent this.
        wal_end: Lsn,
        /// When it sent this (PostgreSQL timestamp).
        time: i64,
        /// Where the WAL bytes lie in the message.
        data: std::ops::Range<usize>,
    },
    /// A keepalive.
    Keepalive {
        /// The server's WAL end.
        wal_end: Lsn,
        /// When it sent this.
        time: i64,
        /// The server wants a status update at once.
        reply_requested: bool,
    },
}

/// A CopyData message that is not one the walsender sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replication message: {0}")]
pub struct ReplicationError(pub String);

fn be_u64(b: &[u8], at: usize) -> Result<u64, ReplicationError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| ReplicationError(format!("message of {} bytes is too short", b.len())))
}

/// Parses one CopyData payload from the walsender.
pub fn parse_server_message(msg: &[u8]) -> Result<ServerMessage, ReplicationError> {
    match msg.first() {
        Some(b'w') => {
            let start = Lsn(be_u64(msg, 1)?);
            let wal_end = Lsn(be_u64(msg, 9)?);
            let time = be_u64(msg, 17)? as i64;
            Ok(ServerMessage::XLogData {
                start,
                wal_end,
                time,
                data: 25..msg.len(),
            })
        }
        Some(b'k') => {
            let wal_end = Lsn(be_u64(msg, 1)?);
            let time = be_u64(msg, 9)? as i64;
            let reply = *msg
                .get(17)
                .ok_or_else(|| ReplicationError("keepalive too short".into()))?;
            Ok(ServerMessage::Keepalive {
                wal_end,
                time,
                reply_requested: reply != 0,
            })
        }
        Some(&t) => Err(ReplicationError(format!("unknown type {:?}", t as char))),
        None => Err(ReplicationError("empty message".into())),
    }
}

/// A standby status update: WAL received up to `write`, durable up to `flush` (the slot
/// advances to it), applied up to `apply`; `time` now; `reply` asks the server to answer.
pub fn standby_status(write: Lsn, flush: Lsn, apply: Lsn, time: i64, reply: bool) -> [u8; 34] {
    let mut out = [0u8; 34];
    out[0] = b'r';
    out[1..9].copy_from_slice(&write.0.to_be_bytes());
    out[9..17].copy_from_slice(&flush.0.to_be_bytes());
    out[17..25].copy_from_slice(&apply.0.to_be_bytes());
    out[25..33].copy_from_slice(&time.to_be_bytes());
    out[33] = u8::from(reply);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlogdata_keepalive_and_status() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x1_0000_0028u64.to_be_bytes());
        w.extend_from_slice(&0x1_0000_1000u64.to_be_bytes());
        w.extend_from_slice(&42u64.to_be_bytes());
        w.extend_from_slice(b"wal!");
        match parse_server_message(&w).unwrap() {
            ServerMessage::XLogData {
                start,
                wal_end,
                time,
                data,
            } => {
                assert_eq!(
                    (start, wal_end, time),
                    (Lsn(0x1_0000_0028), Lsn(0x1_0000_1000), 42)
                );
                assert_eq!(&w[data], b"wal!");
            }
            other => panic!("{other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&9u64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_server_message(&k).unwrap(),
            ServerMessage::Keepalive {
                wal_end: Lsn(7),
                time: 9,
                reply_requested: true
            }
        );
        assert!(parse_server_message(&k[..10]).is_err());
        assert!(parse_server_message(b"x").is_err());
        let r = standby_status(Lsn(1), Lsn(2), Lsn(0), 5, true);
        assert_eq!(r[0], b'r');
        assert_eq!(u64::from_be_bytes(r[9..17].try_into().unwrap()), 2);
        assert_eq!(r[33], 1);
    }
}
