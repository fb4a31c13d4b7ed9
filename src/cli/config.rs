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

/// S3 settings: config key, environment twin, URL parameter.
pub const S3_KEYS: [(&str, &str, &str); 4] = [
    ("endpoint", "AWS_ENDPOINT_URL", "endpoint"),
    ("region", "AWS_REGION", "region"),
    ("path-style", "PITR_S3_PATH_STYLE", "path-style"),
    ("profile", "AWS_PROFILE", "profile"),
];

/// S3 settings of every repository only ([s3]; not yet per named repository).
pub const S3_GLOBAL_KEYS: [(&str, &str); 3] = [
    ("storage-class", "PITR_S3_STORAGE_CLASS"),
    ("sse", "PITR_S3_SSE"),
    ("sse-kms-key-id", "PITR_S3_SSE_KMS_KEY_ID"),
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
    let value = |item: &toml_edit::Item, line: usize, name: &str| -> Result<String, Failure> {
        match item.as_value() {
            Some(toml_edit::Value::String(s)) if s.value().contains('\0') => {
                Err(bad(line, format!("{name} holds a NUL character")))
            }
            Some(toml_edit::Value::String(s)) => Ok(s.value().clone()),
            Some(toml_edit::Value::Boolean(b)) => Ok(b.value().to_string()),
            Some(toml_edit::Value::Integer(i)) => Ok(i.value().to_string()),
            _ => Err(bad(
                line,
                format!("{name} must be a string, a number or true/false"),
            )),
        }
    };
    let key_line = |table: &dyn toml_edit::TableLike, key: &str, fallback: usize| {
        table
            .get_key_value(key)
            .and_then(|(k, _)| k.span())
            .map_or(fallback, |s| line_of(text, s.start))
    };
    // Settings of one repository (or of every one, [s3]), under `prefix`; with `url` for
    // a repository; tables inside skipped when `tables` (named repositories under [repo]).
    let s3_table = |table: &dyn toml_edit::TableLike,
                    prefix: &str,
                    with_url: bool,
                    tables: bool,
                    fallback: usize,
                    out: &mut Vec<Entry>|
     -> Result<(), Failure> {
        for (key, item) in table.iter() {
            let line = key_line(table, key, fallback);
            let name = format!("{prefix}.{key}");
            if tables && item.is_table_like() {
                continue;
            }
            let global = S3_GLOBAL_KEYS.iter().any(|(k, _)| *k == key);
            if global && prefix != "s3" {
                return Err(bad(
                    line,
                    format!("{name}: {key} is set for every repository, in [s3], not yet per repository"),
                ));
            }
            let known =
                global || S3_KEYS.iter().any(|(k, _, _)| *k == key) || (with_url && key == "url");
            if !known {
                return Err(bad(line, format!("unknown key {name}")));
            }
            out.push(Entry {
                value: value(item, line, &name)?,
                name,
                file: path.to_owned(),
                line,
            });
        }
        Ok(())
    };
    let root = doc.as_table();
    for (key, item) in root.iter() {
        let line = key_line(root, key, 0);
        match key {
            "repo" if item.is_value() => out.push(Entry {
                name: "repo.url".into(),
                value: value(item, line, "repo")?,
                file: path.to_owned(),
                line,
            }),
            "repo" => {
                let table = item
                    .as_table_like()
                    .ok_or_else(|| bad(line, "repo must be a URL or a table".into()))?;
                // [repo] itself: the default repository's url and S3 settings.
                s3_table(table, "repo", true, true, line, &mut out)?;
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
                    s3_table(sub, &format!("repo.{k}"), true, false, sub_line, &mut out)?;
                }
            }
            "s3" => {
                let table = item
                    .as_table()
                    .ok_or_else(|| bad(line, "s3 must be a table".into()))?;
                s3_table(table, "s3", false, false, line, &mut out)?;
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
                    out.push(Entry {
                        name: format!("key.{k}"),
                        value: value(v, l, &format!("key.{k}"))?,
                        file: path.to_owned(),
                        line: l,
                    });
                }
            }
            other => return Err(bad(line, format!("unknown key {other}"))),
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
    for (k, var, _) in S3_KEYS {
        if let Some(e) = c.entries.get(&format!("s3.{k}")) {
            out.push((var, e));
        }
    }
    for (k, var) in S3_GLOBAL_KEYS {
        if let Some(e) = c.entries.get(&format!("s3.{k}")) {
            out.push((var, e));
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
    let paths = paths(explicit_path(args))?;
    let mut config = load(&paths)?;
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
    for (k, var, param) in S3_KEYS {
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
        if env_sets(var) {
            continue;
        }
        params.push(format!("{param}={}", url_escape(&e.value)));
    }
    if params.is_empty() || !url.starts_with("s3://") {
        return Ok(url.to_owned());
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{sep}{}", params.join("&")))
}

/// Percent-escapes what a URL query value cannot hold as it is.
fn url_escape(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
}

/// `pitr config`: the effective settings and where each came from (secrets never shown:
/// a key command is shown, since it names a source, not key material; PITR_PASSPHRASE only
/// as set or not).
pub fn run(args: Args) -> Result<(), Failure> {
    let c = current();
    let mut shown = Vec::new();
    let from = |name: &str, var: &str, flag: Option<&String>, default: Option<&str>| -> Shown {
        if let Some(v) = flag {
            return Shown {
                name: name.into(),
                value: Some(v.clone()),
                source: "flag",
                file: None,
                line: None,
            };
        }
        if env_sets(var) {
            return Shown {
                name: name.into(),
                value: std::env::var(var).ok(),
                source: "env",
                file: None,
                line: None,
            };
        }
        let file_name = if name == "repo" { "repo.url" } else { name };
        if let Some(e) = c.entries.get(file_name) {
            return Shown {
                name: name.into(),
                value: Some(e.value.clone()),
                source: "file",
                file: Some(e.file.display().to_string()),
                line: Some(e.line),
            };
        }
        Shown {
            name: name.into(),
            value: default.map(str::to_owned),
            source: "default",
            file: None,
            line: None,
        }
    };
    shown.push(from("repo", "PITR_REPO", args.repo.as_ref(), None));
    for (k, var, _) in S3_KEYS {
        let default = (k == "path-style").then_some("false");
        shown.push(from(&format!("s3.{k}"), var, None, default));
    }
    for (k, var) in S3_GLOBAL_KEYS {
        shown.push(from(&format!("s3.{k}"), var, None, None));
    }
    for (k, var, _) in KEY_KEYS {
        let mut s = from(&format!("key.{k}"), var, None, None);
        // A key command may carry a token: said to be set, not shown.
        if k == "command" && s.value.is_some() {
            s.value = Some("(set, not shown)".into());
        }
        shown.push(s);
    }
    shown.push(Shown {
        name: "key.passphrase".into(),
        value: std::env::var_os("PITR_PASSPHRASE")
            .filter(|v| !v.is_empty())
            .map(|_| "(set, not shown)".into()),
        source: if std::env::var_os("PITR_PASSPHRASE").is_some_and(|v| !v.is_empty()) {
            "env"
        } else {
            "default"
        },
        file: None,
        line: None,
    });
    for (name, e) in &c.entries {
        if name.starts_with("repo.") && name != "repo.url" && name.matches('.').count() == 2 {
            shown.push(Shown {
                name: name.clone(),
                value: Some(e.value.clone()),
                source: "file",
                file: Some(e.file.display().to_string()),
                line: Some(e.line),
            });
        }
    }
    if args.json {
        let v = serde_json::json!({
            "files": c.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "settings": shown.iter().map(|s| serde_json::json!({
                "name": s.name, "value": s.value, "source": s.source, "file": s.file, "line": s.line,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
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
                "{:<24} {:<48} {}{place}",
                s.name,
                s.value.as_deref().unwrap_or("-"),
                s.source
            );
        }
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
                "[s3]\nendpoint = \"x\"\nendpont = \"y\"\n",
                3,
                "unknown key s3.endpont",
            ),
            (
                "[repo.x]\nurl = \"s3://b/p\"\nsse = \"aws:kms\"\n",
                3,
                "not yet per repository",
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
                "[repo.o]\nurl = \"s3://b/p\"\nregion = \"eu west\"\npath-style = true\n",
            )
            .unwrap()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect(),
            ..Default::default()
        };
        let u = with_settings("s3://b/p", "repo.o", &c).unwrap();
        assert!(u.starts_with("s3://b/p?"), "{u}");
        assert!(u.contains("region=eu%20west"), "{u}");
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
