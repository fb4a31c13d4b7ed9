//! A physical replication connection of our own on postgres-protocol (upstream
//! tokio-postgres has no replication mode): startup with `replication=true`, password
//! authentication (cleartext, md5, SCRAM-SHA-256), and the simple query protocol with any
//! number of result sets, which is how replication commands (IDENTIFY_SYSTEM,
//! TIMELINE_HISTORY, BASE_BACKUP, ...) answer, including the COPY streams of BASE_BACKUP and
//! the start of START_REPLICATION's CopyBoth. TCP connections use TLS as `sslmode` says.

use std::fmt;

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use walfmt::Lsn;

use super::settings::PgSettings;

pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An error the server reported (ErrorResponse), with its fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerError {
    /// ERROR, FATAL, PANIC.
    pub severity: String,
    /// SQLSTATE.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// DETAIL, if any.
    pub detail: Option<String>,
    /// HINT, if any.
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; DETAIL: {d}")?;
        }
        Ok(())
    }
}

impl ServerError {
    fn from_fields(mut fields: ErrorFields<'_>) -> ServerError {
        let mut e = ServerError::default();
        while let Ok(Some(field)) = fields.next() {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => e.severity = value,
                b'S' if e.severity.is_empty() => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
        }
        e
    }
}

/// Why a connection or a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The connection could not be made or broke.
    #[error("could not connect to {target}: {source}")]
    Connect {
        /// Where to.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing failed on an established connection.
    #[error("connection to the server was lost: {0}")]
    Io(#[from] std::io::Error),
    /// The server said no.
    #[error("{0}")]
    Server(ServerError),
    /// The server asked for something we cannot give.
    #[error("{0}")]
    Auth(String),
    /// The server sent something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ConnError {
    /// The server's error, if it was one.
    pub fn server(&self) -> Option<&ServerError> {
        match self {
            ConnError::Server(e) => Some(e),
            _ => None,
        }
    }
}

/// `16MB` / `1GB` (SHOW's units) in bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "kB" => n << 10,
        "MB" => n << 20,
        "GB" => n << 30,
        _ => return None,
    })
}

/// One result set of a simple query.
#[derive(Debug, Clone, Default)]
pub struct ResultSet {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows; `None` is NULL.
    pub rows: Vec<Vec<Option<Bytes>>>,
    /// The command tag (`SELECT 1`, `IDENTIFY_SYSTEM`, ...).
    pub tag: String,
}

impl ResultSet {
    /// The text of a column in a row (`None` for NULL or absent).
    pub fn text(&self, row: usize, column: &str) -> Option<String> {
        let i = self.columns.iter().position(|c| c == column)?;
        let value = self.rows.get(row)?.get(i)?.as_ref()?;
        Some(String::from_utf8_lossy(value).into_owned())
    }
}

/// What IDENTIFY_SYSTEM says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush location.
    pub xlogpos: Lsn,
}

/// A replication connection.
pub struct ReplicationConn {
    stream: Box<dyn Stream>,
    read: BytesMut,
    write: BytesMut,
    server_version: Option<String>,
    pending_error: Option<ServerError>,
}

enum Incoming {
    Message(Message),
    CopyBoth,
}

/// A part of a query's answer.
#[derive(Debug)]
pub enum Reply {
    /// A whole result set.
    Rows(ResultSet),
    /// A COPY from the server starts (BASE_BACKUP's archives, its manifest).
    CopyOut,
    /// Both directions copy from now on (START_REPLICATION).
    CopyBoth,
    /// One CopyData message's payload.
    CopyData(Bytes),
    /// The COPY from the server ended.
    CopyDone,
}

impl fmt::Debug for ReplicationConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConn")
            .field("server_version", &self.server_version)
            .finish_non_exhaustive()
    }
}

impl ReplicationConn {
    /// Connects and authenticates as a physical replication client, all within
    /// `connect_timeout`; TCP connections get keepalives (and `tcp_user_timeout`).
    pub async fn connect(s: &PgSettings) -> Result<ReplicationConn, ConnError> {
        match s.connect_timeout {
            None => ReplicationConn::connect_now(s).await,
            Some(limit) => tokio::time::timeout(limit, ReplicationConn::connect_now(s))
                .await
                .unwrap_or_else(|_| {
                    Err(ConnError::Connect {
                        target: s.describe(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "timeout expired after {} s (connect_timeout)",
                                limit.as_secs()
                            ),
                        ),
                    })
                }),
        }
    }

    async fn connect_now(s: &PgSettings) -> Result<ReplicationConn, ConnError> {
        let target = s.describe();
        let connect_err = |source| ConnError::Connect {
            target: target.clone(),
            source,
        };
        let stream: Box<dyn Stream> = if s.is_socket() {
            Box::new(
                tokio::net::UnixStream::connect(s.socket_path())
                    .await
                    .map_err(connect_err)?,
            )
        } else {
            let mut tcp = tokio::net::TcpStream::connect((s.host.as_str(), s.port))
                .await
                .map_err(connect_err)?;
            let _ = tcp.set_nodelay(true);
            tcp_options(&tcp, s).map_err(connect_err)?;
            match s.sslmode.as_str() {
                "disable" | "allow" => Box::new(tcp),
                _ => match super::tls::negotiate(&mut tcp, s).await? {
                    Some(config) => Box::new(super::tls::handshake(tcp, s, config).await?),
                    None => Box::new(tcp),
                },
            }
        };
        let mut conn = ReplicationConn {
            stream,
            read: BytesMut::with_capacity(8192),
            write: BytesMut::new(),
            server_version: None,
            pending_error: None,
        };
        conn.startup(s).await?;
        Ok(conn)
    }

    /// The server's major version (15 from "15.18 (Debian 15.18-0+deb12u1)"), 0 if unknown.
    pub fn server_major(&self) -> u32 {
        self.server_version
            .as_deref()
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }

    /// `server_version` as the server reported it.
    pub fn server_version(&self) -> Option<&str> {
        self.server_version.as_deref()
    }

    async fn send(&mut self) -> Result<(), ConnError> {
        self.stream.write_all(&self.write).await?;
        self.stream.flush().await?;
        self.write.clear();
        Ok(())
    }

    async fn next_message(&mut self) -> Result<Message, ConnError> {
        match self.next_incoming().await? {
            Incoming::Message(m) => Ok(m),
            Incoming::CopyBoth => Err(ConnError::Protocol("unexpected CopyBothResponse".into())),
        }
    }

    /// The next message. postgres-protocol does not know CopyBothResponse ('W'), so that
    /// one is recognised here before the rest are parsed.
    async fn next_incoming(&mut self) -> Result<Incoming, ConnError> {
        loop {
            if self.read.len() >= 5 && self.read[0] == b'W' {
                let len =
                    u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]);
                let total = 1 + len as usize;
                if self.read.len() >= total {
                    let _ = self.read.split_to(total);
                    return Ok(Incoming::CopyBoth);
                }
            } else if let Some(m) = Message::parse(&mut self.read)? {
                return Ok(Incoming::Message(m));
            }
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    async fn startup(&mut self, s: &PgSettings) -> Result<(), ConnError> {
        let mut params = vec![
            ("user", s.user.as_str()),
            ("database", s.dbname.as_str()),
            ("application_name", s.application_name.as_str()),
            ("replication", "true"),
        ];
        if let Some(options) = &s.options {
            params.push(("options", options.as_str()));
        }
        frontend::startup_message(params, &mut self.write)?;
        self.send().await?;
        let password = || {
            s.password.clone().ok_or_else(|| {
                ConnError::Auth(format!(
                    "password authentication failed for user \"{}\": no password supplied",
                    s.user
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_message().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.write)?;
                    self.send().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(s.user.as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                    self.send().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Some(m) = mechanisms.next()? {
                        offered |= m == SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(ConnError::Auth(
                            "the server offers no SASL mechanism pitr supports".into(),
                        ));
                    }
                    let state =
                        ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        state.message(),
                        &mut self.write,
                    )?;
                    self.send().await?;
                    scram = Some(state);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("unexpected SASL continue".into()))?;
                    state.update(body.data())?;
                    frontend::sasl_response(state.message(), &mut self.write)?;
                    self.send().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("unexpected SASL final".into()))?;
                    state.finish(body.data())?;
                }
                Message::ParameterStatus(p) => {
                    if p.name()? == "server_version" {
                        self.server_version = Some(p.value()?.to_owned());
                    }
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ErrorResponse(e) => {
                    return Err(ConnError::Server(ServerError::from_fields(e.fields())))
                }
                Message::ReadyForQuery(_) => return Ok(()),
                _ => {
                    return Err(ConnError::Protocol(
                        "unexpected message during authentication".into(),
                    ))
                }
            }
        }
    }

    /// Sends `sql` with the simple query protocol; read the answer with
    /// [`ReplicationConn::next_reply`] until it returns `None`.
    pub async fn start_query(&mut self, sql: &str) -> Result<(), ConnError> {
        frontend::query(sql, &mut self.write)?;
        self.send().await?;
        self.pending_error = None;
        Ok(())
    }

    /// The next part of the answer to the query started last: a whole result set, the
    /// start of a COPY, a piece of its data, its end; `None` once the server is ready for
    /// the next query. A server error is returned then (not before), so the connection
    /// stays usable.
    pub async fn next_reply(&mut self) -> Result<Option<Reply>, ConnError> {
        let mut current: Option<ResultSet> = None;
        loop {
            let message = match self.next_incoming().await? {
                Incoming::CopyBoth => return Ok(Some(Reply::CopyBoth)),
                Incoming::Message(m) => m,
            };
            match message {
                Message::RowDescription(body) => {
                    let mut names = Vec::new();
                    let mut fields = body.fields();
                    while let Some(f) = fields.next()? {
                        names.push(f.name().to_owned());
                    }
                    current = Some(ResultSet {
                        columns: names,
                        ..ResultSet::default()
                    });
                }
                Message::DataRow(body) => {
                    let buf = body.buffer_bytes().clone();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(r) = ranges.next()? {
                        row.push(r.map(|r| buf.slice(r)));
                    }
                    current
                        .get_or_insert_with(ResultSet::default)
                        .rows
                        .push(row);
                }
                Message::CommandComplete(body) => {
                    let mut set = current.take().unwrap_or_default();
                    set.tag = body.tag()?.to_owned();
                    return Ok(Some(Reply::Rows(set)));
                }
                Message::CopyOutResponse(_) => return Ok(Some(Reply::CopyOut)),
                Message::CopyData(body) => return Ok(Some(Reply::CopyData(body.into_bytes()))),
                Message::CopyDone => return Ok(Some(Reply::CopyDone)),
                Message::EmptyQueryResponse
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_) => {}
                Message::ErrorResponse(e) => {
                    self.pending_error = Some(ServerError::from_fields(e.fields()));
                }
                Message::ReadyForQuery(_) => {
                    return match self.pending_error.take() {
                        Some(e) => Err(ConnError::Server(e)),
                        None => Ok(None),
                    };
                }
                _ => {
                    return Err(ConnError::Protocol(
                        "unexpected message in a query's answer".into(),
                    ))
                }
            }
        }
    }

    /// Runs `sql` and returns every result set (a query without COPY).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<ResultSet>, ConnError> {
        self.start_query(sql).await?;
        let mut sets = Vec::new();
        let mut unexpected = false;
        while let Some(reply) = self.next_reply().await? {
            match reply {
                Reply::Rows(set) => sets.push(set),
                _ => unexpected = true,
            }
        }
        if unexpected {
            return Err(ConnError::Protocol(format!("\"{sql}\" started a COPY")));
        }
        Ok(sets)
    }

    /// IDENTIFY_SYSTEM: which cluster, timeline and WAL position the server is at.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ConnError> {
        let sets = self.simple_query("IDENTIFY_SYSTEM").await?;
        let set = sets
            .first()
            .ok_or_else(|| ConnError::Protocol("IDENTIFY_SYSTEM returned nothing".into()))?;
        let field = |name: &str| {
            set.text(0, name)
                .ok_or_else(|| ConnError::Protocol(format!("IDENTIFY_SYSTEM returned no {name}")))
        };
        let bad =
            |what: &str, v: &str| ConnError::Protocol(format!("IDENTIFY_SYSTEM {what}: {v:?}"));
        let systemid = field("systemid")?;
        let timeline = field("timeline")?;
        let xlogpos = field("xlogpos")?;
        Ok(SystemInfo {
            system_identifier: systemid.parse().map_err(|_| bad("systemid", &systemid))?,
            timeline: timeline.parse().map_err(|_| bad("timeline", &timeline))?,
            xlogpos: xlogpos.parse().map_err(|_| bad("xlogpos", &xlogpos))?,
        })
    }

    /// Sends one CopyData message (in CopyBoth: a standby status update).
    pub async fn send_copy_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        frontend::CopyData::new(data)?.write(&mut self.write);
        self.send().await
    }

    /// Ends our side of a COPY.
    pub async fn send_copy_done(&mut self) -> Result<(), ConnError> {
        frontend::copy_done(&mut self.write);
        self.send().await
    }

    /// A setting's value as SHOW prints it (walsenders answer SHOW for any setting); empty
    /// if it cannot be read.
    pub async fn show(&mut self, name: &str) -> String {
        self.simple_query(&format!("SHOW {name}"))
            .await
            .ok()
            .and_then(|sets| sets.first().and_then(|s| s.text(0, name)))
            .unwrap_or_default()
    }

    /// `wal_segment_size` in bytes (16 MiB if it cannot be read).
    pub async fn wal_segment_size(&mut self) -> u64 {
        parse_size(&self.show("wal_segment_size").await).unwrap_or(16 << 20)
    }

    /// Says goodbye (best effort).
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write);
        let _ = self.send().await;
    }
}

/// Keepalives and `tcp_user_timeout` on a TCP connection, as the settings say.
fn tcp_options(tcp: &tokio::net::TcpStream, s: &PgSettings) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(tcp);
    let k = &s.keepalives;
    if k.enabled {
        sock.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count),
        )?;
    } else {
        sock.set_keepalive(false)?;
    }
    if let Some(t) = s.tcp_user_timeout {
        sock.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes_as_show_prints_them() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("64kB"), Some(64 << 10));
        assert_eq!(parse_size("16"), None);
    }
}
