//! Connection settings the way every PostgreSQL tool takes them: the libpq environment
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGPASSFILE`, `PGDATABASE`, `PGAPPNAME`,
//! `PGSSLMODE`, `PGCONNECT_TIMEOUT`, ...), overridden by a connection string (`key=value ...`
//! or a `postgresql://` URI), with the password looked up in the password file when none is
//! given. Keywords pitr does not use are ignored or refused as `keywords` says. No error
//! ever quotes a password.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::keywords;

/// How long a connection may take when `connect_timeout` is not given (libpq waits
/// forever; a replication client that reconnects on its own should not).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// TCP keepalives (libpq's `keepalives`, `keepalives_idle`, `keepalives_interval`,
/// `keepalives_count`). pitr's defaults notice a dead peer of an idle connection in about
/// a minute, where the system's (two hours idle) would not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalives {
    /// `keepalives=0` turns them off.
    pub enabled: bool,
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Probes unanswered before the connection is dropped.
    pub count: u32,
}

impl Default for Keepalives {
    fn default() -> Keepalives {
        Keepalives {
            enabled: true,
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 3,
        }
    }
}

/// Where and as whom to connect.
#[derive(Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// A host name or address, or a socket directory (starts with `/`).
    pub host: String,
    /// Port (also names the socket file).
    pub port: u16,
    /// Role.
    pub user: String,
    /// Password, if any (from the settings, else the password file).
    pub password: Option<String>,
    /// Database (ignored by physical replication connections).
    pub dbname: String,
    /// `application_name` (what `synchronous_standby_names` matches).
    pub application_name: String,
    /// `sslmode`: disable, allow, prefer, require, verify-ca, verify-full.
    pub sslmode: String,
    /// The password file (`PGPASSFILE`, else `~/.pgpass`).
    pub passfile: Option<PathBuf>,
    /// CA certificates (PEM) that verify-ca and verify-full check the server against
    /// (`PGSSLROOTCERT`, else `~/.postgresql/root.crt`).
    pub sslrootcert: Option<PathBuf>,
    /// How long connecting (TCP, TLS, authentication) may take; `None` waits forever
    /// (`connect_timeout`, `PGCONNECT_TIMEOUT`: seconds, 0 or less forever, 1 means 2).
    pub connect_timeout: Option<Duration>,
    /// TCP keepalives.
    pub keepalives: Keepalives,
    /// `tcp_user_timeout` (milliseconds): how long sent data may stay unacknowledged.
    pub tcp_user_timeout: Option<Duration>,
    /// `options` (`PGOPTIONS`): command-line options for the server, sent at startup.
    pub options: Option<String>,
}

impl fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("sslmode", &self.sslmode)
            .field("connect_timeout", &self.connect_timeout)
            .field("keepalives", &self.keepalives)
            .field("tcp_user_timeout", &self.tcp_user_timeout)
            .finish_non_exhaustive()
    }
}

/// A connection string that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid connection string: {0}")]
pub struct SettingsError(pub String);

impl PgSettings {
    /// Settings from the libpq environment, then `conninfo` (may be empty) on top.
    pub fn from_env_and(conninfo: &str) -> Result<PgSettings, SettingsError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut given: HashMap<String, String> = HashMap::new();
        for (var, key) in [
            ("PGHOST", "host"),
            ("PGPORT", "port"),
            ("PGUSER", "user"),
            ("PGPASSWORD", "password"),
            ("PGPASSFILE", "passfile"),
            ("PGDATABASE", "dbname"),
            ("PGAPPNAME", "application_name"),
            ("PGSSLMODE", "sslmode"),
            ("PGSSLROOTCERT", "sslrootcert"),
        ]
        .into_iter()
        .chain(keywords::ENV.iter().copied())
        {
            if let Some(v) = env(var) {
                given.insert(key.into(), v);
            }
        }
        given.extend(parse_conninfo(conninfo)?);
        let home = env("HOME").map(PathBuf::from);
        let os_user = env("USER").or_else(|| env("LOGNAME"));
        PgSettings::resolve(given, home.as_deref(), os_user)
    }

    fn resolve(
        mut given: HashMap<String, String>,
        home: Option<&Path>,
        os_user: Option<String>,
    ) -> Result<PgSettings, SettingsError> {
        let mut take = |k: &str| given.remove(k).filter(|v| !v.is_empty());
        let host = take("host").unwrap_or_else(default_socket_dir);
        let port = match take("port") {
            Some(p) => p
                .parse()
                .map_err(|_| SettingsError(format!("invalid port number: \"{p}\"")))?,
            None => 5432,
        };
        let user = take("user")
            .or(os_user)
            .unwrap_or_else(|| "postgres".into());
        let sslmode = take("sslmode").unwrap_or_else(|| "prefer".into());
        if !matches!(
            sslmode.as_str(),
            "disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full"
        ) {
            return Err(SettingsError(format!(
                "invalid sslmode value: \"{sslmode}\""
            )));
        }
        let passfile = take("passfile")
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".pgpass")));
        let sslrootcert = take("sslrootcert")
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".postgresql/root.crt")));
        let connect_timeout = match take("connect_timeout") {
            None => Some(DEFAULT_CONNECT_TIMEOUT),
            Some(t) => match int_param(&t, "connect_timeout")? {
                ..=0 => None,
                1 => Some(Duration::from_secs(2)),
                n => Some(Duration::from_secs(n as u64)),
            },
        };
        let mut keepalives = Keepalives::default();
        if let Some(v) = take("keepalives") {
            keepalives.enabled = int_param(&v, "keepalives")? != 0;
        }
        for (key, field) in [
            ("keepalives_idle", &mut keepalives.idle),
            ("keepalives_interval", &mut keepalives.interval),
        ] {
            if let Some(v) = take(key) {
                let n = int_param(&v, key)?;
                if n > 0 {
                    *field = Duration::from_secs(n as u64);
                }
            }
        }
        if let Some(v) = take("keepalives_count") {
            let n = int_param(&v, "keepalives_count")?;
            if n > 0 {
                keepalives.count = n as u32;
            }
        }
        let tcp_user_timeout = match take("tcp_user_timeout") {
            Some(v) => Some(int_param(&v, "tcp_user_timeout")?)
                .filter(|ms| *ms > 0)
                .map(|ms| Duration::from_millis(ms as u64)),
            None => None,
        };
        let fallback_name = take("fallback_application_name");
        let mut settings = PgSettings {
            sslrootcert,
            dbname: take("dbname").unwrap_or_else(|| user.clone()),
            application_name: take("application_name")
                .or(fallback_name)
                .unwrap_or_else(|| "pitr".into()),
            password: take("password"),
            options: take("options"),
            host,
            port,
            user,
            sslmode,
            passfile,
            connect_timeout,
            keepalives,
            tcp_user_timeout,
        };
        let mut rest: Vec<(String, String)> = given.into_iter().collect();
        rest.sort();
        for (key, value) in &rest {
            keywords::check_unused(key, value)?;
        }
        if settings.password.is_none() {
            settings.password = settings
                .passfile
                .as_deref()
                .and_then(|f| passfile_lookup(f, &settings, "replication"));
        }
        Ok(settings)
    }

    /// Whether `host` names a Unix socket directory.
    pub fn is_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The socket file for a socket directory host.
    pub fn socket_path(&self) -> PathBuf {
        Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port))
    }

    /// `host:port` (or the socket path), for messages.
    pub fn describe(&self) -> String {
        if self.is_socket() {
            format!("socket \"{}\"", self.socket_path().display())
        } else {
            format!("server \"{}\" port {}", self.host, self.port)
        }
    }
}

/// An integer option as libpq reads one (surrounding blanks allowed, nothing else).
fn int_param(value: &str, key: &str) -> Result<i64, SettingsError> {
    let n: i64 = value.trim().parse().map_err(|_| {
        SettingsError(format!(
            "invalid integer value \"{value}\" for connection option \"{key}\""
        ))
    })?;
    Ok(n.clamp(i64::from(i32::MIN), i64::from(i32::MAX)))
}

/// libpq's compiled-in socket directory differs by distribution: Debian's is
/// /var/run/postgresql, upstream's /tmp.
fn default_socket_dir() -> String {
    if Path::new("/var/run/postgresql").is_dir() {
        "/var/run/postgresql".into()
    } else {
        "/tmp".into()
    }
}

/// `key=value ...` (values optionally single-quoted, with `\` escapes) or a
/// `postgresql://` / `postgres://` URI.
pub fn parse_conninfo(text: &str) -> Result<HashMap<String, String>, SettingsError> {
    let text = text.trim();
    if let Some(rest) = text
        .strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"))
    {
        return parse_uri(rest);
    }
    let mut out = HashMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(SettingsError(if keywords::is_keyword(&key) {
                format!("missing \"=\" after \"{key}\" in connection info string")
            } else {
                "missing \"=\" in connection info string (a value with blanks needs quotes: key='a b')"
                    .into()
            }));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(SettingsError(
                            "unterminated quoted string in connection info string".into(),
                        ))
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.insert(key, value);
    }
}

/// Decodes `%XX` escapes in the URI's `part`; an error names the part and quotes its text
/// only when `quote` (never for a password).
fn percent_decode(s: &str, part: &str, quote: bool) -> Result<String, SettingsError> {
    let bad = |what: &str| {
        SettingsError(if quote {
            format!("{what} in the URI's {part}: \"{s}\"")
        } else {
            format!("{what} in the URI's {part}")
        })
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("invalid percent-encoded token"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("invalid UTF-8"))
}

fn parse_uri(rest: &str) -> Result<HashMap<String, String>, SettingsError> {
    let mut out = HashMap::new();
    // A "/" or "?" inside the user name or password (not percent-encoded) ends the
    // authority early: what follows would be quoted as a host, port or database name.
    // Refused without quoting any of it.
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    if !rest[..end].contains('@') && rest[end..].contains('@') {
        return Err(SettingsError(
            "the URI has an \"@\" after its host part: percent-encode \"/\", \"?\" and \"@\" in a user name or password (%2F, %3F, %40)".into(),
        ));
    }
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = main.split_once('/').unwrap_or((main, ""));
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            if !user.is_empty() {
                out.insert("user".into(), percent_decode(user, "user name", true)?);
            }
            if !password.is_empty() {
                out.insert(
                    "password".into(),
                    percent_decode(password, "password", false)?,
                );
            }
            hostport
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or_else(|| {
            SettingsError(format!(
                "unterminated IPv6 address in the URI: \"{hostport}\""
            ))
        })?;
        (addr.to_owned(), after.strip_prefix(':').unwrap_or(""))
    } else {
        let (h, p) = hostport.split_once(':').unwrap_or((hostport, ""));
        (percent_decode(h, "host", true)?, p)
    };
    if !host.is_empty() {
        out.insert("host".into(), host);
    }
    if !port.is_empty() {
        out.insert("port".into(), port.to_owned());
    }
    if !path.is_empty() {
        out.insert(
            "dbname".into(),
            percent_decode(path, "database name", true)?,
        );
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            SettingsError(if keywords::is_keyword(pair) {
                format!("missing \"=\" in URI parameter \"{pair}\"")
            } else {
                "missing \"=\" in a URI parameter".into()
            })
        })?;
        let key = percent_decode(k, "parameters", true)?;
        // The value may be a password (?password=...): never quoted.
        let value = percent_decode(v, &format!("parameter \"{key}\""), false)?;
        out.insert(key, value);
    }
    Ok(out)
}

/// The password for `s` in a password file (`host:port:database:user:password`, `*`
/// matching anything, `\` escaping `:` and `\`). Like libpq, a file that group or others
/// can read is ignored, and a socket host matches `localhost`.
pub fn passfile_lookup(file: &Path, s: &PgSettings, database: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() || meta.permissions().mode() & 0o077 != 0 {
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    let host = if s.is_socket() { "localhost" } else { &s.host };
    let port = s.port.to_string();
    let wanted = [host, port.as_str(), database, s.user.as_str()];
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = split_passfile_line(line);
            if fields.len() < 5 {
                return None;
            }
            let matches = fields[..4]
                .iter()
                .zip(wanted)
                .all(|(f, w)| f == "*" || f == w);
            matches.then(|| fields[4..].join(":"))
        })
}

fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().expect("one field").extend(chars.next()),
            ':' => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(pairs: &[(&str, &str)]) -> Result<PgSettings, SettingsError> {
        let given = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PgSettings::resolve(given, None, Some("alice".into()))
    }

    #[test]
    fn key_value_strings_with_quotes_and_escapes() {
        let m = parse_conninfo(r"host=/tmp port = 5433 password='x\'y z' user=a\ b").unwrap();
        assert_eq!(m["host"], "/tmp");
        assert_eq!(m["port"], "5433");
        assert_eq!(m["password"], "x'y z");
        assert_eq!(m["user"], "a b");
        assert!(parse_conninfo("host").is_err());
        assert!(parse_conninfo("password='open").is_err());
    }

    #[test]
    fn uris_with_percent_encoding_and_parameters() {
        let m = parse_conninfo(
            "postgresql://rep%40l:p%3Ass@db.example:6543/app?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(m["user"], "rep@l");
        assert_eq!(m["password"], "p:ss");
        assert_eq!(m["host"], "db.example");
        assert_eq!(m["port"], "6543");
        assert_eq!(m["dbname"], "app");
        assert_eq!(m["sslmode"], "require");
        assert_eq!(m["application_name"], "x");
        let m = parse_conninfo("postgres://%2Fvar%2Frun%2Fpostgresql/").unwrap();
        assert_eq!(m["host"], "/var/run/postgresql");
        let m = parse_conninfo("postgresql://[::1]:5432").unwrap();
        assert_eq!(m["host"], "::1");
        assert_eq!(m["port"], "5432");
    }

    #[test]
    fn defaults_and_refusals() {
        let s = resolve(&[("host", "127.0.0.1")]).unwrap();
        assert_eq!((s.port, s.user.as_str()), (5432, "alice"));
        assert_eq!((s.sslmode.as_str(), s.dbname.as_str()), ("prefer", "alice"));
        assert!(!s.is_socket());
        let s = resolve(&[("host", "/run/pg"), ("port", "5433")]).unwrap();
        assert_eq!(s.socket_path(), Path::new("/run/pg/.s.PGSQL.5433"));
        assert!(resolve(&[("port", "x")]).is_err());
        assert!(resolve(&[("sslmode", "sometimes")]).is_err());
        assert!(resolve(&[("hots", "x")]).unwrap_err().0.contains("hots"));
    }

    #[test]
    fn timeouts_and_keepalives_as_libpq_reads_them() {
        let s = resolve(&[]).unwrap();
        assert_eq!(s.connect_timeout, Some(DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(s.keepalives, Keepalives::default());
        assert_eq!(s.tcp_user_timeout, None);
        let t = |v: &str| resolve(&[("connect_timeout", v)]).map(|s| s.connect_timeout);
        assert_eq!(t("2").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(t(" 10 ").unwrap(), Some(Duration::from_secs(10)));
        assert_eq!(t("1").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(t("0").unwrap(), None);
        assert_eq!(t("-5").unwrap(), None);
        assert!(t("2s").unwrap_err().0.contains("\"connect_timeout\""));
        let s = resolve(&[
            ("keepalives", "1"),
            ("keepalives_idle", "5"),
            ("keepalives_interval", "2"),
            ("keepalives_count", "4"),
            ("tcp_user_timeout", "9000"),
            ("options", "-c wal_sender_timeout=10s"),
            ("fallback_application_name", "fb"),
        ])
        .unwrap();
        assert_eq!(
            s.keepalives,
            Keepalives {
                enabled: true,
                idle: Duration::from_secs(5),
                interval: Duration::from_secs(2),
                count: 4
            }
        );
        assert_eq!(s.tcp_user_timeout, Some(Duration::from_millis(9000)));
        assert_eq!(s.options.as_deref(), Some("-c wal_sender_timeout=10s"));
        assert_eq!(s.application_name, "fb");
        assert!(!resolve(&[("keepalives", "0")]).unwrap().keepalives.enabled);
        // Keywords pitr does not use: ignored, or refused by name.
        assert!(resolve(&[("client_encoding", "UTF8"), ("sslsni", "0")]).is_ok());
        let e = resolve(&[("sslcert", "c.pem")]).unwrap_err();
        assert!(e.0.contains("\"sslcert\""), "{e}");
    }

    #[test]
    fn no_error_quotes_a_password() {
        let secret = "S3cr3t";
        let cases = [
            format!("postgresql://nobody:{secret}%zz@127.0.0.1:1/postgres"),
            format!("postgresql://nobody:{secret}%C3%28@127.0.0.1:1/postgres"),
            format!("postgresql://nobody:{secret}@[::1:5432/postgres"),
            format!("postgresql://127.0.0.1/postgres?password={secret}%zz"),
            format!("postgresql://127.0.0.1/postgres?password=ab&{secret}"),
            format!("host=x password=ab {secret}"),
            format!("host=x password=ab {secret}=1"),
            format!("postgresql://u:ab/{secret}@db/x"),
            format!("postgresql://u:1234/{secret}@db/x"),
            format!("postgresql://u:{secret}?x@db/x"),
        ];
        for conninfo in cases {
            let err = parse_conninfo(&conninfo)
                .map(HashMap::into_iter)
                .and_then(|m| PgSettings::resolve(m.collect(), None, None))
                .expect_err(&conninfo);
            assert!(!err.to_string().contains(secret), "{conninfo}: {err}");
        }
        let e = parse_conninfo("postgresql://u:p@h/db%zz").unwrap_err();
        assert!(
            e.0.contains("database name") && e.0.contains("db%zz"),
            "{e}"
        );
        let s = resolve(&[("password", secret)]).unwrap();
        assert!(!format!("{s:?}").contains(secret));
    }

    #[test]
    fn the_password_file_matches_like_libpq() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:*:*:*:no\nlocalhost:5433:replication:rep:sock\\:et\n*:*:*:rep:any\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut s = resolve(&[("host", "/run/pg"), ("port", "5433"), ("user", "rep")]).unwrap();
        assert_eq!(
            passfile_lookup(&file, &s, "replication").as_deref(),
            Some("sock:et")
        );
        s.host = "db".into();
        assert_eq!(
            passfile_lookup(&file, &s, "replication").as_deref(),
            Some("any")
        );
        s.user = "nobody".into();
        assert_eq!(passfile_lookup(&file, &s, "replication"), None);
        // Readable by others: ignored, as libpq does.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        s.user = "rep".into();
        assert_eq!(passfile_lookup(&file, &s, "replication"), None);
    }
}
