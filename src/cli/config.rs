//! The configuration file (TOML): `--config PATH`, else `PITR_CONFIG`, else
//! `/etc/pitr/pitr.toml` with the user's `~/.config/pitr/pitr.toml` (XDG) over it. It gives
//! defaults for settings that have an environment twin: a setting the file gives is put
//! into this process's environment at start, before the command line is read, only when the
//! environment does not hold it already; so a flag beats the environment, which beats the
//! file. Named repositories (`[repo.NAME]`) are resolved when a command opens one; their S3
//! settings go into the repository's URL settings where the environment has none.
//!
//! Shape:
//!
//! ```toml
//! [s3]                             # S3 settings for every repository
//! endpoint = "https://host:9000"   # region, path-style, profile
//! [repo]                           # the default repository (alone: repo = "URL")
//! url = "s3://bucket/prefix"
//! [repo.offsite]                   # --repo offsite
//! url = "s3://other/prefix"
//! region = "eu-west-1"
//! [key]                            # file, command or kms (never key material)
//! file = "/etc/pitr/key"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{Exit, Failure};

/// What a setting's value must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string.
    Text,
    /// true or false.
    Bool,
    /// An integer in a range.
    Int(i64, i64),
    /// A string humantime reads ("90s", "6h", "30d").
    Duration,
    /// A number from 0 to 1.
    Fraction,
    /// One of these strings.
    Choice(&'static [&'static str]),
    /// An absolute path.
    Path,
    /// A duration longer than zero.
    NonZeroDuration,
    /// What the repository URL parameter of the key's name takes (the same checks).
    Param,
}

/// A setting the file may give: its key (dotted below a table), environment twin, flag
/// twin ("" when none), default as shown ("" when none) and kind.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub key: &'static str,
    pub env: &'static str,
    pub flag: &'static str,
    pub default: &'static str,
    pub kind: Kind,
}

const fn set(
    key: &'static str,
    env: &'static str,
    flag: &'static str,
    default: &'static str,
    kind: Kind,
) -> Setting {
    Setting {
        key,
        env,
        flag,
        default,
        kind,
    }
}

/// S3 settings of a repository. In `[s3]` they are every repository's (through the
/// environment twin); in `[repo]` or `[repo.NAME]` that repository's (through its URL,
/// whose parameter has the key's name).
pub const S3_KEYS: [Setting; 7] = [
    set("endpoint", "AWS_ENDPOINT_URL", "", "AWS", Kind::Param),
    set("region", "AWS_REGION", "", "the AWS chain's", Kind::Param),
    set("path-style", "PITR_S3_PATH_STYLE", "", "false", Kind::Bool),
    set("profile", "AWS_PROFILE", "", "the AWS chain's", Kind::Param),
    set(
        "storage-class",
        "PITR_S3_STORAGE_CLASS",
        "",
        "STANDARD",
        Kind::Param,
    ),
    set(
        "sse",
        "PITR_S3_SSE",
        "",
        "the bucket's",
        Kind::Choice(&repo::url::SSE_VALUES),
    ),
    set(
        "sse-kms-key-id",
        "PITR_S3_SSE_KMS_KEY_ID",
        "",
        "",
        Kind::Param,
    ),
];

/// Every other setting: how S3 is spoken to (`[s3]`, every repository's), the commands'
/// settings (a table per command; `compress-level` at the top).
pub const SETTINGS: [Setting; 39] = [
    set(
        "compress-level",
        "PITR_COMPRESS_LEVEL",
        "--compress-level",
        "1",
        Kind::Int(0, 19),
    ),
    set(
        "cache-dir",
        "PITR_CACHE_DIR",
        "",
        "~/.cache/pitr",
        Kind::Path,
    ),
    set(
        "s3.conditional-put",
        "PITR_S3_CONDITIONAL_PUT",
        "",
        "auto",
        Kind::Choice(&["auto", "on", "off"]),
    ),
    set(
        "s3.checksums",
        "PITR_S3_CHECKSUMS",
        "",
        "when_supported",
        Kind::Choice(&["when_supported", "when_required"]),
    ),
    set(
        "s3.payload-signing",
        "PITR_S3_PAYLOAD_SIGNING",
        "",
        "auto",
        Kind::Choice(&["auto", "on", "off"]),
    ),
    set(
        "s3.max-attempts",
        "PITR_S3_MAX_ATTEMPTS",
        "",
        "3",
        Kind::Int(1, 100),
    ),
    set(
        "s3.attempt-timeout",
        "PITR_S3_ATTEMPT_TIMEOUT",
        "",
        "60s",
        Kind::NonZeroDuration,
    ),
    set(
        "wal-push.timeout",
        "PITR_WAL_PUSH_TIMEOUT",
        "--timeout",
        "120",
        Kind::Int(1, 86400),
    ),
    set(
        "wal-push.ahead",
        "PITR_WAL_PUSH_AHEAD",
        "--ahead",
        "8",
        Kind::Int(0, 4096),
    ),
    set(
        "wal-push.parallel",
        "PITR_WAL_PUSH_PARALLEL",
        "--parallel",
        "twice the cores",
        Kind::Int(1, 256),
    ),
    set(
        "wal-push.recheck",
        "PITR_WAL_PUSH_RECHECK",
        "--recheck",
        "false",
        Kind::Bool,
    ),
    set(
        "wal-fetch.prefetch",
        "PITR_WAL_FETCH_PREFETCH",
        "--prefetch",
        "16",
        Kind::Int(0, 4096),
    ),
    set(
        "wal-fetch.prefetch-parallel",
        "PITR_WAL_FETCH_PARALLEL",
        "--prefetch-parallel",
        "4",
        Kind::Int(1, 256),
    ),
    set(
        "backup.parallel",
        "PITR_BACKUP_PARALLEL",
        "--parallel",
        "4",
        Kind::Int(1, 64),
    ),
    set(
        "backup.wal-timeout",
        "PITR_BACKUP_WAL_TIMEOUT",
        "--wal-timeout",
        "60",
        Kind::Int(0, 86400),
    ),
    set(
        "restore.parallel",
        "PITR_RESTORE_PARALLEL",
        "--parallel",
        "8",
        Kind::Int(1, 256),
    ),
    set(
        "restore.pg-bin",
        "PITR_PG_BIN",
        "--pg-bin",
        "the backup's version's",
        Kind::Path,
    ),
    set(
        "stream.slot",
        "PITR_STREAM_SLOT",
        "--slot",
        "pitr",
        Kind::Text,
    ),
    set(
        "stream.flush-interval",
        "PITR_STREAM_FLUSH_INTERVAL",
        "--flush-interval",
        "1s",
        Kind::Duration,
    ),
    set(
        "stream.sync",
        "PITR_STREAM_SYNC",
        "--sync",
        "false",
        Kind::Bool,
    ),
    set(
        "stream.receive-timeout",
        "PITR_STREAM_RECEIVE_TIMEOUT",
        "--receive-timeout",
        "60s",
        Kind::Duration,
    ),
    set("copy.to", "PITR_COPY_TO", "--to", "", Kind::Text),
    set(
        "copy.parallel",
        "PITR_COPY_PARALLEL",
        "--parallel",
        "8",
        Kind::Int(1, 256),
    ),
    set(
        "copy.interval",
        "PITR_COPY_INTERVAL",
        "--interval",
        "10s",
        Kind::Duration,
    ),
    set(
        "expire.keep-last",
        "PITR_EXPIRE_KEEP_LAST",
        "--keep-last",
        "",
        Kind::Int(1, i64::MAX),
    ),
    set(
        "expire.keep-within",
        "PITR_EXPIRE_KEEP_WITHIN",
        "--keep-within",
        "",
        Kind::Duration,
    ),
    set(
        "expire.keep-daily",
        "PITR_EXPIRE_KEEP_DAILY",
        "--keep-daily",
        "",
        Kind::Int(1, i64::MAX),
    ),
    set(
        "expire.keep-weekly",
        "PITR_EXPIRE_KEEP_WEEKLY",
        "--keep-weekly",
        "",
        Kind::Int(1, i64::MAX),
    ),
    set(
        "expire.keep-monthly",
        "PITR_EXPIRE_KEEP_MONTHLY",
        "--keep-monthly",
        "",
        Kind::Int(1, i64::MAX),
    ),
    set(
        "expire.min-backups",
        "PITR_EXPIRE_MIN_BACKUPS",
        "--min-backups",
        "1",
        Kind::Int(0, i64::MAX),
    ),
    set(
        "expire.grace",
        "PITR_EXPIRE_GRACE",
        "--grace",
        "6h",
        Kind::Duration,
    ),
    set(
        "expire.repack-below",
        "PITR_EXPIRE_REPACK_BELOW",
        "--repack-below",
        "0.5",
        Kind::Fraction,
    ),
    set(
        "drill.check-file",
        "PITR_DRILL_CHECK_FILE",
        "--check-file",
        "",
        Kind::Path,
    ),
    set(
        "drill.amcheck",
        "PITR_DRILL_AMCHECK",
        "--amcheck",
        "false",
        Kind::Bool,
    ),
    set(
        "drill.check-timeout",
        "PITR_DRILL_CHECK_TIMEOUT",
        "--check-timeout",
        "1h",
        Kind::Duration,
    ),
    set(
        "drill.work-dir",
        "PITR_DRILL_WORK_DIR",
        "--work-dir",
        "the temp dir",
        Kind::Path,
    ),
    set(
        "drill.user",
        "PITR_DRILL_USER",
        "--user",
        "PGUSER, this user",
        Kind::Text,
    ),
    set(
        "drill.record",
        "PITR_DRILL_RECORD",
        "--record",
        "false",
        Kind::Bool,
    ),
    set(
        "drill.metrics-file",
        "PITR_DRILL_METRICS_FILE",
        "--metrics-file",
        "",
        Kind::Path,
    ),
];

/// Key sources: config key, environment twin, flag.
pub const KEY_KEYS: [(&str, &str, &str); 3] = [
    ("file", "PITR_KEY_FILE", "--key-file"),
    ("command", "PITR_KEY_COMMAND", "--key-command"),
    ("kms", "PITR_KEY_KMS", "--key-kms"),
];

/// One setting the file gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Dotted: `repo`, `s3.endpoint`, `repo.offsite.url`, `key.file`.
    pub name: String,
    pub value: String,
    pub file: PathBuf,
    pub line: usize,
}

/// The files read and what they give (a later file's entry replaces an earlier one's).
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub files: Vec<PathBuf>,
    pub entries: BTreeMap<String, Entry>,
    /// Environment variables this process set from the file (not the real environment's).
    pub injected: Vec<String>,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// The configuration loaded at start (empty before, or in tests).
pub fn current() -> &'static Config {
    CONFIG.get_or_init(Config::default)
}

/// Whether the real environment (not the config file) sets `var`.
pub fn env_sets(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
        && !current().injected.iter().any(|i| i == var)
}

/// `--config PATH` or `--config=PATH` anywhere on the command line (read before clap, so
/// the file can give the defaults clap reads from the environment).
pub fn explicit_path(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// The files to read: the one named by `--config` or `PITR_CONFIG` alone (it must exist),
/// else `/etc/pitr/pitr.toml` and the user's file, those that exist.
pub fn paths(explicit: Option<PathBuf>) -> Result<Vec<PathBuf>, Failure> {
    let named = explicit.or_else(|| {
        std::env::var_os("PITR_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(p) = named {
        if !p.is_file() {
            return Err(Failure::new(
                Exit::BadInput,
                format!("configuration file \"{}\" does not exist", p.display()),
            )
            .hint("--config and PITR_CONFIG name a TOML file; leave both unset to use /etc/pitr/pitr.toml"));
        }
        return Ok(vec![p]);
    }
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("pitr/pitr.toml"));
    Ok([Some(PathBuf::from("/etc/pitr/pitr.toml")), user]
        .into_iter()
        .flatten()
        .filter(|p| p.is_file())
        .collect())
}

/// Reads a configuration file, refusing one (or a directory holding it) that someone other
/// than its owner and root could rewrite: a `repo =` line there would redirect archiving.
/// The checks are made on the file opened, and it is read from that same handle.
fn read_safe(path: &Path) -> Result<String, Failure> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let unsafe_file = |what: &str| {
        Failure::new(
            Exit::BadInput,
            format!("configuration file \"{}\" is unsafe: {what}", path.display()),
        )
        .hint(format!(
            "make it and its directory writable by their owner only (chmod go-w), owned by root or the user running pitr: \"{}\"",
            path.display()
        ))
    };
    let unreadable = |e: std::io::Error| {
        Failure::new(
            Exit::BadInput,
            format!(
                "could not read configuration file \"{}\": {e}",
                path.display()
            ),
        )
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(unreadable(std::io::Error::other("not a file")));
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(unsafe_file(&format!("it belongs to uid {}", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_file("others than its owner can write it"));
    }
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    if let Some(dir) = real.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::metadata(dir) {
            let sticky = d.mode() & 0o1000 != 0;
            if (d.mode() & 0o022 != 0 && !sticky) || (d.uid() != me && d.uid() != 0) {
                return Err(unsafe_file(&format!(
                    "others can replace it in \"{}\"",
                    dir.display()
                )));
            }
        }
    }
    let mut text = String::new();
    file.take(1 << 20)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    Ok(text)
}

/// Reads and checks the files; a later file's repository tables replace an earlier one's
/// whole, other keys one by one.
pub fn load(paths: &[PathBuf]) -> Result<Config, Failure> {
    let mut config = Config::default();
    for path in paths {
        let text = read_safe(path)?;
        let entries = parse(path, &text)?;
        let repos: Vec<String> = entries
            .iter()
            .filter_map(|e| {
                let rest = e.name.strip_prefix("repo.")?;
                Some(match rest.split_once('.') {
                    Some((name, _)) => format!("repo.{name}."),
                    None => "repo.".to_owned(),
                })
            })
            .collect();
        config.entries.retain(|k, _| {
            !repos.iter().any(|r| {
                // The default repository ([repo] keys): only its own keys, not named ones.
                if r == "repo." {
                    k.strip_prefix("repo.")
                        .is_some_and(|rest| !rest.contains('.'))
                } else {
                    k.starts_with(r.as_str())
                }
            })
        });
        for entry in entries {
            config.entries.insert(entry.name.clone(), entry);
        }
        config.files.push(path.clone());
    }
    Ok(config)
}

/// The 1-based line of byte `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// The settings one file gives; an unknown key, a value of the wrong type or a setting
/// given twice for one repository is an error naming the file and line.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, Failure> {
    let doc = toml_edit::Document::parse(text).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(text, s.start));
        Failure::new(
            Exit::BadInput,
            format!(
                "{}:{line}: invalid TOML: {}",
                path.display(),
                e.message().trim()
            ),
        )
    })?;
    let mut out = Vec::new();
    let bad = |line: usize, what: String| {
        Failure::new(Exit::BadInput, format!("{}:{line}: {what}", path.display()))
            .hint("see \"Configuration file\" in README for every key")
    };
    // A value of the kind a setting takes, as the text its environment twin would hold.
    let typed = |item: &toml_edit::Item,
                 line: usize,
                 name: &str,
                 kind: Kind|
     -> Result<String, Failure> {
        use toml_edit::Value as V;
        let v = item.as_value();
        let text = match (kind, v) {
            (_, Some(V::String(s))) if s.value().contains('\0') => {
                return Err(bad(line, format!("{name} holds a NUL character")))
            }
            (Kind::Text, Some(V::String(s))) if !s.value().is_empty() => s.value().clone(),
            (Kind::Path, Some(V::String(s))) if s.value().starts_with('/') => s.value().clone(),
            (Kind::Path, _) => return Err(bad(line, format!("{name} must be an absolute path"))),
            (Kind::NonZeroDuration, Some(V::String(s)))
                if humantime::parse_duration(s.value()).is_ok_and(|d| !d.is_zero()) =>
            {
                s.value().clone()
            }
            (Kind::NonZeroDuration, _) => {
                return Err(bad(
                    line,
                    format!("{name} must be a duration longer than zero, in quotes (\"60s\")"),
                ))
            }
            (Kind::Param, Some(V::String(s))) => {
                let param = name.rsplit('.').next().unwrap_or(name);
                if let Err(why) = repo::url::check_param(param, s.value()) {
                    return Err(bad(line, format!("{name}: {why}")));
                }
                if param == "storage-class"
                    && repo::storage::ARCHIVE_CLASSES.contains(&s.value().as_str())
                {
                    return Err(bad(line, format!("{name}: {} needs a restore request before every read: a restore could not read the repository (use STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING or GLACIER_IR)", s.value())));
                }
                s.value().clone()
            }
            (Kind::Param, _) => return Err(bad(line, format!("{name} must be a string"))),
            (Kind::Bool, Some(V::Boolean(b))) => b.value().to_string(),
            (Kind::Int(lo, hi), Some(V::Integer(i))) if (lo..=hi).contains(i.value()) => {
                i.value().to_string()
            }
            (Kind::Int(lo, hi), _) => {
                let range = if hi == i64::MAX {
                    format!("at least {lo}")
                } else {
                    format!("from {lo} to {hi}")
                };
                return Err(bad(line, format!("{name} must be a whole number {range}")));
            }
            (Kind::Duration, Some(V::String(s)))
                if humantime::parse_duration(s.value()).is_ok() =>
            {
                s.value().clone()
            }
            (Kind::Duration, _) => {
                return Err(bad(
                    line,
                    format!("{name} must be a duration in quotes (\"90s\", \"6h\", \"30d\")"),
                ))
            }
            (Kind::Fraction, Some(V::Float(f))) if (0.0..=1.0).contains(f.value()) => {
                f.value().to_string()
            }
            (Kind::Fraction, Some(V::Integer(i))) if (0..=1).contains(i.value()) => {
                i.value().to_string()
            }
            (Kind::Fraction, _) => {
                return Err(bad(line, format!("{name} must be a number from 0 to 1")))
            }
            (Kind::Choice(options), Some(V::String(s)))
                if options.contains(&s.value().as_str()) =>
            {
                s.value().clone()
            }
            (Kind::Choice(options), _) => {
                return Err(bad(
                    line,
                    format!("{name} must be one of \"{}\"", options.join("\", \"")),
                ))
            }
            (Kind::Text, _) => {
                return Err(bad(line, format!("{name} must be a string, not empty")))
            }
            (Kind::Bool, _) => return Err(bad(line, format!("{name} must be true or false"))),
        };
        Ok(text)
    };
    let key_line = |table: &dyn toml_edit::TableLike, key: &str, fallback: usize| {
        table
            .get_key_value(key)
            .and_then(|(k, _)| k.span())
            .map_or(fallback, |s| line_of(text, s.start))
    };
    let entry = |name: String, value: String, line: usize| Entry {
        name,
        value,
        file: path.to_owned(),
        line,
    };
    // Settings of one repository ([repo], [repo.NAME]: with its url; tables inside [repo]
    // are named repositories, read apart) or of every one ([s3]: also how S3 is spoken to).
    let s3_table = |table: &dyn toml_edit::TableLike,
                    prefix: &str,
                    fallback: usize,
                    out: &mut Vec<Entry>|
     -> Result<(), Failure> {
        let every = prefix == "s3";
        for (key, item) in table.iter() {
            let line = key_line(table, key, fallback);
            let name = format!("{prefix}.{key}");
            if prefix == "repo" && item.is_table_like() {
                continue;
            }
            let kind = if !every && key == "url" {
                Some(Kind::Text)
            } else if let Some(s) = S3_KEYS.iter().find(|s| s.key == key) {
                Some(s.kind)
            } else if let Some(s) = SETTINGS.iter().find(|s| s.key == format!("s3.{key}")) {
                if !every {
                    return Err(bad(
                        line,
                        format!("{name}: {key} is set for every repository, in [s3]"),
                    ));
                }
                Some(s.kind)
            } else {
                None
            };
            let Some(kind) = kind else {
                return Err(bad(line, format!("unknown key {name}")));
            };
            out.push(entry(name.clone(), typed(item, line, &name, kind)?, line));
        }
        // A KMS key goes with KMS encryption.
        let sse = table.get("sse").and_then(|i| i.as_str());
        if let Some((k, _)) = table.get_key_value("sse-kms-key-id") {
            if sse.is_some_and(|v| !v.starts_with("aws:kms")) {
                let line = k.span().map_or(fallback, |s| line_of(text, s.start));
                return Err(bad(
                    line,
                    format!(
                        "{prefix}.sse-kms-key-id goes with sse = \"aws:kms\", not {:?}",
                        sse.unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(())
    };
    let root = doc.as_table();
    for (key, item) in root.iter() {
        let line = key_line(root, key, 0);
        match key {
            "repo" if item.is_value() => out.push(entry(
                "repo.url".into(),
                typed(item, line, "repo", Kind::Text)?,
                line,
            )),
            "repo" => {
                let table = item
                    .as_table_like()
                    .ok_or_else(|| bad(line, "repo must be a URL or a table".into()))?;
                // [repo] itself: the default repository's url and S3 settings.
                s3_table(table, "repo", line, &mut out)?;
                for (k, v) in table.iter() {
                    let Some(sub) = v.as_table_like() else {
                        continue;
                    };
                    let sub_line = key_line(table, k, line);
                    if !k
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    {
                        return Err(bad(
                            sub_line,
                            format!(
                                "repository name \"{k}\" may hold only letters, digits, - and _"
                            ),
                        ));
                    }
                    s3_table(sub, &format!("repo.{k}"), sub_line, &mut out)?;
                }
            }
            "s3" => {
                let table = item
                    .as_table()
                    .ok_or_else(|| bad(line, "s3 must be a table".into()))?;
                s3_table(table, "s3", line, &mut out)?;
            }
            "key" => {
                let table = item
                    .as_table()
                    .ok_or_else(|| bad(line, "key must be a table".into()))?;
                for (k, v) in table.iter() {
                    let l = key_line(table, k, line);
                    if !KEY_KEYS.iter().any(|(n, _, _)| *n == k) {
                        return Err(bad(l, format!("unknown key key.{k} (file, command or kms: a key's source, never the key)")));
                    }
                    let name = format!("key.{k}");
                    let kind = if k == "file" { Kind::Path } else { Kind::Text };
                    out.push(entry(name.clone(), typed(v, l, &name, kind)?, l));
                }
            }
            table_name if item.is_table() => {
                let table = item.as_table().unwrap_or_else(|| unreachable!());
                let known = SETTINGS
                    .iter()
                    .any(|s| s.key.split_once('.').is_some_and(|(t, _)| t == table_name));
                if !known || table_name == "s3" {
                    return Err(bad(line, format!("unknown table [{table_name}]")));
                }
                for (k, v) in table.iter() {
                    let l = key_line(table, k, line);
                    let name = format!("{table_name}.{k}");
                    let Some(s) = SETTINGS.iter().find(|s| s.key == name) else {
                        return Err(bad(l, format!("unknown key {name}")));
                    };
                    out.push(entry(name.clone(), typed(v, l, &name, s.kind)?, l));
                }
            }
            other => {
                let Some(s) = SETTINGS.iter().find(|s| s.key == other) else {
                    return Err(bad(line, format!("unknown key {other}")));
                };
                out.push(entry(
                    other.to_owned(),
                    typed(item, line, other, s.kind)?,
                    line,
                ));
            }
        }
    }
    Ok(out)
}

/// The environment twins of what the file gives for every repository.
fn env_twins(c: &Config) -> Vec<(&'static str, &Entry)> {
    let mut out = Vec::new();
    if let Some(e) = c.entries.get("repo.url") {
        out.push(("PITR_REPO", e));
    }
    for k in S3_KEYS {
        if let Some(e) = c.entries.get(&format!("s3.{}", k.key)) {
            out.push((k.env, e));
        }
    }
    for k in SETTINGS {
        if let Some(e) = c.entries.get(k.key) {
            out.push((k.env, e));
        }
    }
    for (k, var, _) in KEY_KEYS {
        if let Some(e) = c.entries.get(&format!("key.{k}")) {
            out.push((var, e));
        }
    }
    out
}

/// The variable that tells a child process (a worker, a server's archive_command) which
/// of its environment variables came from a configuration file, not from a person.
const INJECTED_VAR: &str = "PITR_CONFIG_INJECTED";

/// The key source variables (one key source at most: the file's [key] is used only when
/// none of them, and no key flag, is given).
const KEY_VARS: [&str; 4] = [
    "PITR_KEY_FILE",
    "PITR_KEY_COMMAND",
    "PITR_KEY_KMS",
    "PITR_PASSPHRASE",
];

/// Loads the configuration for this process and puts what it gives into the environment
/// where the environment does not hold it. Call once, first, while the process has one
/// thread.
pub fn init(args: &[std::ffi::OsString]) -> Result<(), Failure> {
    // What a parent pitr put into the environment from its file is not the environment's:
    // this process reads its own file afresh.
    if let Some(list) = std::env::var_os(INJECTED_VAR) {
        for var in list.to_string_lossy().split(',').filter(|v| !v.is_empty()) {
            std::env::remove_var(var);
        }
        std::env::remove_var(INJECTED_VAR);
    }
    let explicit = explicit_path(args);
    let paths = paths(explicit.clone())?;
    let mut config = load(&paths)?;
    // The processes pitr starts (its workers, a server's archive_command and
    // restore_command) read the same file.
    if let Some(p) = explicit {
        std::env::set_var("PITR_CONFIG", std::path::absolute(&p).unwrap_or(p));
    }
    let key_given = KEY_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
        || args.iter().any(|a| {
            let a = a.to_string_lossy();
            ["--key-file", "--key-command", "--key-kms"]
                .iter()
                .any(|f| a == *f || a.starts_with(&format!("{f}=")))
        });
    let mut injected = Vec::new();
    for (var, e) in env_twins(&config) {
        if key_given && e.name.starts_with("key.") {
            continue;
        }
        if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
            std::env::set_var(var, &e.value);
            injected.push(var.to_owned());
        }
    }
    if !injected.is_empty() {
        std::env::set_var(INJECTED_VAR, injected.join(","));
    }
    config.injected = injected;
    let _ = CONFIG.set(config);
    Ok(())
}

/// Whether `var` was set from the configuration file (so a flag with the same value is
/// still a flag).
pub fn injected(var: &str) -> bool {
    current().injected.iter().any(|i| i == var)
}

/// A named repository's URL with its S3 settings where neither its URL nor the real
/// environment gives them; None when `name` names none.
pub fn named_repo(name: &str) -> Option<Result<String, Failure>> {
    let c = current();
    let url = c.entries.get(&format!("repo.{name}.url"))?;
    Some(with_settings(&url.value, &format!("repo.{name}"), c))
}

/// The default repository from the `[repo]` table: its URL with its S3 settings.
pub fn default_repo_with_settings(url: &str) -> Result<String, Failure> {
    let c = current();
    if c.entries.get("repo.url").is_some_and(|e| e.value == url) {
        with_settings(url, "repo", c)
    } else {
        Ok(url.to_owned())
    }
}

fn with_settings(url: &str, table: &str, c: &Config) -> Result<String, Failure> {
    let mut params = Vec::new();
    for Setting {
        key: k, env: var, ..
    } in S3_KEYS
    {
        let param = k;
        let Some(e) = c.entries.get(&format!("{table}.{k}")) else {
            continue;
        };
        if url.contains(&format!("?{param}=")) || url.contains(&format!("&{param}=")) {
            return Err(Failure::new(
                Exit::BadInput,
                format!(
                    "{}:{}: {table}.{k} is also given in its url",
                    e.file.display(),
                    e.line
                ),
            )
            .hint("give each setting of a repository once: in its url or as a key"));
        }
        // Server-side encryption and its key are one pair: either from the environment or
        // from the file, never one of each.
        let sse_pair = ["PITR_S3_SSE", "PITR_S3_SSE_KMS_KEY_ID"];
        if env_sets(var) || (sse_pair.contains(&var) && sse_pair.iter().any(|v| env_sets(v))) {
            continue;
        }
        params.push(format!("{param}={}", repo::url::percent_encode(&e.value)));
    }
    if params.is_empty() || !url.starts_with("s3://") {
        return Ok(url.to_owned());
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{sep}{}", params.join("&")))
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A repository (URL or a name from the file) to show the settings of
    #[arg(long, value_name = "URL|NAME")]
    repo: Option<String>,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

/// One effective setting and where it came from.
struct Shown {
    name: String,
    value: Option<String>,
    source: &'static str,
    file: Option<String>,
    line: Option<usize>,
    env: &'static str,
    flag: &'static str,
}

/// `pitr config`: the effective settings and where each came from (secrets never shown:
/// a key command may carry a token and is shown only as set; PITR_PASSPHRASE likewise).
pub fn run(args: Args) -> Result<(), Failure> {
    let c = current();
    let from = |name: &str,
                env: &'static str,
                flag: &'static str,
                given: Option<&String>,
                default: &str| {
        let mut s = Shown {
            name: name.into(),
            value: None,
            source: "default",
            file: None,
            line: None,
            env,
            flag,
        };
        let file_name = if name == "repo" { "repo.url" } else { name };
        if let Some(v) = given {
            s.value = Some(v.clone());
            s.source = "flag";
        } else if env_sets(env) {
            s.value = std::env::var(env).ok();
            s.source = "env";
        } else if let Some(e) = c.entries.get(file_name) {
            s.value = Some(e.value.clone());
            s.source = "file";
            s.file = Some(e.file.display().to_string());
            s.line = Some(e.line);
        } else if !default.is_empty() {
            s.value = Some(default.to_owned());
        }
        s
    };
    let mut shown = vec![from("repo", "PITR_REPO", "--repo", args.repo.as_ref(), "")];
    for k in S3_KEYS {
        shown.push(from(
            &format!("s3.{}", k.key),
            k.env,
            k.flag,
            None,
            k.default,
        ));
    }
    for k in SETTINGS {
        shown.push(from(k.key, k.env, k.flag, None, k.default));
    }
    for (k, env, flag) in KEY_KEYS {
        let mut s = from(&format!("key.{k}"), env, flag, None, "");
        if k == "command" && s.value.is_some() {
            s.value = Some("(set, not shown)".into());
        }
        shown.push(s);
    }
    let mut passphrase = from("key.passphrase", "PITR_PASSPHRASE", "", None, "");
    if passphrase.value.is_some() {
        passphrase.value = Some("(set, not shown)".into());
    }
    shown.push(passphrase);
    for (name, e) in &c.entries {
        if name.starts_with("repo.") && name != "repo.url" {
            shown.push(Shown {
                name: name.clone(),
                value: Some(e.value.clone()),
                source: "file",
                file: Some(e.file.display().to_string()),
                line: Some(e.line),
                env: "",
                flag: "",
            });
        }
    }
    if args.json {
        let v = serde_json::json!({
            "files": c.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "settings": shown.iter().map(|s| serde_json::json!({
                "name": s.name, "value": s.value, "source": s.source, "file": s.file, "line": s.line,
                "env": (!s.env.is_empty()).then_some(s.env),
                "flag": (!s.flag.is_empty()).then_some(s.flag),
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    if c.files.is_empty() {
        println!("no configuration file (--config, PITR_CONFIG, /etc/pitr/pitr.toml, ~/.config/pitr/pitr.toml)");
    }
    for f in &c.files {
        println!("file {}", f.display());
    }
    for s in &shown {
        let place = match (&s.file, s.line) {
            (Some(f), Some(l)) => format!(" ({f}:{l})"),
            _ => String::new(),
        };
        println!(
            "{:<28} {:<40} {}{place}",
            s.name,
            s.value.as_deref().unwrap_or("-"),
            s.source
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> Result<Vec<Entry>, Failure> {
        parse(Path::new("/etc/pitr/pitr.toml"), text)
    }

    #[test]
    fn every_shape_parses_with_its_lines() {
        let e = entries(
            "repo = \"s3://b/p\"\n[s3]\nendpoint = \"http://h:9000\"\npath-style = true\n[key]\nfile = \"/k\"\n",
        )
        .unwrap();
        let got: Vec<(String, String, usize)> =
            e.into_iter().map(|e| (e.name, e.value, e.line)).collect();
        assert_eq!(
            got,
            [
                ("repo.url".to_owned(), "s3://b/p".to_owned(), 1),
                ("s3.endpoint".into(), "http://h:9000".into(), 3),
                ("s3.path-style".into(), "true".into(), 4),
                ("key.file".into(), "/k".into(), 6),
            ]
        );
        let e = entries(
            "[repo]\nurl = \"s3://b/main\"\nregion = \"r1\"\n\n[repo.offsite]\nurl = \"s3://o/p\"\nprofile = \"off\"\n",
        )
        .unwrap();
        let got: Vec<(String, usize)> = e.into_iter().map(|e| (e.name, e.line)).collect();
        assert!(got.contains(&("repo.offsite.url".into(), 6)), "{got:?}");
        assert!(got.contains(&("repo.offsite.profile".into(), 7)), "{got:?}");
        assert!(got.contains(&("repo.url".into(), 2)), "{got:?}");
        assert!(got.contains(&("repo.region".into(), 3)), "{got:?}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_line() {
        for (text, line, what) in [
            (
                "repo = \"s3://b/p\"\nrepository = 1\n",
                2,
                "unknown key repository",
            ),
            (
                "[s3]\nendpoint = \"http://x\"\nendpont = \"y\"\n",
                3,
                "unknown key s3.endpont",
            ),
            (
                "[repo.x]\nurl = \"s3://b/p\"\nconditional-put = \"off\"\n",
                3,
                "is set for every repository, in [s3]",
            ),
            (
                "[expire]\nkeep-last = \"7\"\n",
                2,
                "must be a whole number at least 1",
            ),
            (
                "[expire]\nkeep-last = 0\n",
                2,
                "must be a whole number at least 1",
            ),
            ("[expire]\ngrace = 6\n", 2, "must be a duration"),
            ("[expire]\nrepack-below = 2.0\n", 2, "from 0 to 1"),
            (
                "[expire]\nkeep-hourly = 2\n",
                2,
                "unknown key expire.keep-hourly",
            ),
            ("compress-level = 30\n", 1, "from 0 to 19"),
            ("[s3]\nconditional-put = \"maybe\"\n", 2, "must be one of"),
            ("[s3]\nsse = \"aes\"\n", 2, "must be one of"),
            ("\n[backups]\nparallel = 2\n", 2, "unknown table [backups]"),
            ("[drill]\namcheck = \"yes\"\n", 2, "must be true or false"),
            ("[s3]\nattempt-timeout = \"0s\"\n", 2, "longer than zero"),
            (
                "[s3]\nstorage-class = \"GLACIER\"\n",
                2,
                "needs a restore request",
            ),
            (
                "[s3]\nstorage-class = \"standard_ia\"\n",
                2,
                "storage-class= must be",
            ),
            ("[s3]\nregion = \"eu west\"\n", 2, "region= must be"),
            (
                "[repo.x]\nurl = \"s3://b/p\"\nsse = \"AES256\"\nsse-kms-key-id = \"k\"\n",
                4,
                "goes with sse",
            ),
            ("[drill]\nwork-dir = \"tmp\"\n", 2, "absolute path"),
            ("[key]\nfile = \"key\"\n", 2, "absolute path"),
            ("[stream]\nslot = \"\"\n", 2, "not empty"),
            (
                "[wal-fetch]\nspool-dir = \"/x\"\n",
                2,
                "unknown key wal-fetch.spool-dir",
            ),
            ("[key]\nkey = \"secret\"\n", 2, "unknown key key.key"),
            (
                "[repo.x]\nurl = \"s3://b/p\"\nbucket = 1\n",
                3,
                "unknown key repo.x.bucket",
            ),
            ("repo = [1]\n", 1, "must be a string"),
            ("repo = \"a\"\nrepo = \"b\"\n", 2, "invalid TOML"),
        ] {
            let e = entries(text).unwrap_err();
            assert!(
                e.message
                    .starts_with(&format!("/etc/pitr/pitr.toml:{line}: ")),
                "{text:?}: {}",
                e.message
            );
            assert!(e.message.contains(what), "{text:?}: {}", e.message);
        }
    }

    #[test]
    fn command_tables_give_their_environment_twins() {
        let c = Config {
            entries: entries(
                "compress-level = 3\n[expire]\nkeep-last = 7\nkeep-within = \"30d\"\nrepack-below = 0.25\n[drill]\namcheck = true\n[s3]\nmax-attempts = 5\nstorage-class = \"STANDARD_IA\"\n[repo.o]\nurl = \"s3://bkt/p\"\nsse = \"aws:kms\"\nsse-kms-key-id = \"alias/x\"\n",
            )
            .unwrap()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect(),
            ..Default::default()
        };
        let twins: Vec<(&str, &str)> = env_twins(&c)
            .into_iter()
            .map(|(v, e)| (v, e.value.as_str()))
            .collect();
        for want in [
            ("PITR_COMPRESS_LEVEL", "3"),
            ("PITR_EXPIRE_KEEP_LAST", "7"),
            ("PITR_EXPIRE_KEEP_WITHIN", "30d"),
            ("PITR_EXPIRE_REPACK_BELOW", "0.25"),
            ("PITR_DRILL_AMCHECK", "true"),
            ("PITR_S3_MAX_ATTEMPTS", "5"),
            ("PITR_S3_STORAGE_CLASS", "STANDARD_IA"),
        ] {
            assert!(twins.contains(&want), "{want:?} in {twins:?}");
        }
        // A named repository's write settings go into its URL, not the environment.
        assert!(!twins.iter().any(|(v, _)| *v == "PITR_S3_SSE"), "{twins:?}");
        let u = with_settings("s3://bkt/p", "repo.o", &c).unwrap();
        assert_eq!(u, "s3://bkt/p?sse=aws:kms&sse-kms-key-id=alias/x");
        let parsed: repo::url::RepoUrl = u.parse().unwrap();
        assert_eq!(parsed.to_string(), u);
    }

    #[test]
    fn the_example_file_in_contrib_parses() {
        let text = include_str!("../../contrib/pitr.toml");
        let e = parse(Path::new("contrib/pitr.toml"), text).unwrap();
        let names: Vec<&str> = e.iter().map(|e| e.name.as_str()).collect();
        for want in [
            "repo.url",
            "repo.offsite.storage-class",
            "copy.to",
            "expire.keep-within",
            "drill.check-file",
        ] {
            assert!(names.contains(&want), "{want} in {names:?}");
        }
    }

    #[test]
    fn readme_lists_every_key_with_its_twins() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n## Configuration file")
            .nth(1)
            .and_then(|r| r.split("\n## ").next())
            .expect("README has a Configuration file section");
        // Each key's row names its environment twin and its flag twin.
        let mut wrong = Vec::new();
        let mut check = |key: String, env: &str, flag: &str| {
            let row = section.lines().find(|l| l.starts_with(&format!("| {key}")));
            let ok = row.is_some_and(|r| {
                r.contains(&format!("`{env}`"))
                    && (flag.is_empty() || r.contains(&format!("`{flag}")))
            });
            if !ok {
                wrong.push(format!("{key} {env} {flag}: {row:?}"));
            }
        };
        for k in S3_KEYS {
            check(format!("`[s3] {}`", k.key), k.env, k.flag);
        }
        for k in SETTINGS {
            let key = match k.key.split_once('.') {
                Some((table, key)) => format!("`[{table}] {key}`"),
                None => format!("`{}`", k.key),
            };
            check(key, k.env, k.flag);
        }
        for (k, env, flag) in KEY_KEYS {
            check(format!("`[key] {k}`"), env, flag);
        }
        assert!(
            wrong.is_empty(),
            "README's Configuration file table: {wrong:#?}"
        );
    }

    #[test]
    fn explicit_config_is_found_on_the_command_line() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            explicit_path(&args(&["pitr", "list", "--config", "/x.toml"])),
            Some(PathBuf::from("/x.toml"))
        );
        assert_eq!(
            explicit_path(&args(&["pitr", "--config=/y.toml", "list"])),
            Some(PathBuf::from("/y.toml"))
        );
        assert_eq!(
            explicit_path(&args(&["pitr", "list", "--", "--config"])),
            None
        );
    }

    #[test]
    fn named_settings_go_into_the_url_unless_given_there() {
        let c = Config {
            entries: entries(
                "[repo.o]\nurl = \"s3://b/p\"\nregion = \"eu-west-9\"\nprofile = \"off+site\"\npath-style = true\n",
            )
            .unwrap()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect(),
            ..Default::default()
        };
        let u = with_settings("s3://b/p", "repo.o", &c).unwrap();
        assert!(u.starts_with("s3://b/p?"), "{u}");
        assert!(u.contains("region=eu-west-9"), "{u}");
        assert!(u.contains("profile=off%2Bsite"), "{u}");
        let e = with_settings("s3://b/p?region=x", "repo.o", &c).unwrap_err();
        assert!(e.message.contains("also given in its url"), "{}", e.message);
    }

    #[test]
    fn a_later_file_replaces_repository_tables_whole() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let f = d.path().join(name);
            std::fs::write(&f, text).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
            f
        };
        let system = write(
            "system.toml",
            "[s3]\nregion = \"r1\"\n[repo]\nurl = \"s3://a/p\"\n[repo.x]\nurl = \"s3://x/p\"\nregion = \"rx\"\n",
        );
        let user = write(
            "user.toml",
            "[repo]\nurl = \"s3://b/p\"\n[repo.x]\nurl = \"s3://y/p\"\n",
        );
        let c = load(&[system, user]).unwrap();
        assert_eq!(c.entries["repo.url"].value, "s3://b/p");
        assert_eq!(c.entries["repo.x.url"].value, "s3://y/p");
        assert!(
            !c.entries.contains_key("repo.x.region"),
            "{:?}",
            c.entries.keys()
        );
        assert_eq!(c.entries["s3.region"].value, "r1");
    }

    #[test]
    fn a_file_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pitr.toml");
        std::fs::write(&f, "repo = \"file:///x\"\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(std::slice::from_ref(&f)).is_ok());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = load(std::slice::from_ref(&f)).unwrap_err();
        assert!(e.message.contains("unsafe"), "{}", e.message);
        assert_eq!(e.exit, Exit::BadInput);
    }
}
