//! Connection settings the way every PostgreSQL tool takes them: the libpq environment
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGPASSFILE`, `PGDATABASE`, `PGAPPNAME`,
//! `PGSSLMODE`), overridden by a connection string (`key=value ...` or a `postgresql://`
//! URI), with the password looked up in the password file when none is given.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        ] {
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
        let mut settings = PgSettings {
            sslrootcert,
            dbname: take("dbname").unwrap_or_else(|| user.clone()),
            application_name: take("application_name").unwrap_or_else(|| "pitr".into()),
            password: take("password"),
            host,
            port,
            user,
            sslmode,
            passfile,
        };
        if let Some(unknown) = given.keys().next() {
            return Err(SettingsError(format!(
                "invalid connection option \"{unknown}\""
            )));
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
            return Err(SettingsError(format!(
                "missing \"=\" after \"{key}\" in connection info string"
            )));
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

fn percent_decode(s: &str) -> Result<String, SettingsError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| SettingsError(format!("invalid percent-encoded token: \"{s}\"")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| SettingsError(format!("invalid UTF-8 in \"{s}\"")))
}

fn parse_uri(rest: &str) -> Result<HashMap<String, String>, SettingsError> {
    let mut out = HashMap::new();
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = main.split_once('/').unwrap_or((main, ""));
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            if !user.is_empty() {
                out.insert("user".into(), percent_decode(user)?);
            }
            if !password.is_empty() {
                out.insert("password".into(), percent_decode(password)?);
            }
            hostport
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| SettingsError(format!("unterminated IPv6 address in \"{rest}\"")))?;
        (addr.to_owned(), after.strip_prefix(':').unwrap_or(""))
    } else {
        let (h, p) = hostport.split_once(':').unwrap_or((hostport, ""));
        (percent_decode(h)?, p)
    };
    if !host.is_empty() {
        out.insert("host".into(), host);
    }
    if !port.is_empty() {
        out.insert("port".into(), port.to_owned());
    }
    if !path.is_empty() {
        out.insert("dbname".into(), percent_decode(path)?);
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| SettingsError(format!("missing \"=\" in URI parameter \"{pair}\"")))?;
        out.insert(percent_decode(k)?, percent_decode(v)?);
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
