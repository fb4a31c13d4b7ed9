//! The repository option shared by every command that opens one, and how repository
//! failures become messages and exit codes.

use std::path::PathBuf;

use repo::envelope::EncodeOptions;
use repo::objects::ObjectError;
use repo::repository::OpenError;
use repo::slots::{KeyError, KeySetting};
use repo::url::{RepoUrl, RepoUrlError};
use zeroize::Zeroizing;

use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct RepoArgs {
    /// Repository: s3://BUCKET/PREFIX, file:///ABSOLUTE/PATH, or a name from the
    /// configuration file ([repo.NAME]) [default: the file's repo]
    #[arg(long, env = "PITR_REPO", value_name = "URL|NAME")]
    pub repo: Option<String>,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// Where the key of an encrypted repository comes from (PITR_PASSPHRASE is read from the
/// environment only: a passphrase on a command line is visible to every local user).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// An encrypted repository's key: a file of at least 32 bytes, used as they are
    #[arg(long, env = "PITR_KEY_FILE", value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// An encrypted repository's key: a shell command that prints it (one trailing newline
    /// is dropped)
    #[arg(long, env = "PITR_KEY_COMMAND", value_name = "CMD")]
    pub key_command: Option<String>,
    /// An encrypted repository's key: only its KMS slots of this KMS key (id or ARN); with no
    /// key setting at all, any KMS slot is tried
    #[arg(long, env = "PITR_KEY_KMS", value_name = "ARN")]
    pub key_kms: Option<String>,
}

/// Whether `value` is what environment variable `var` holds (a setting that came from the
/// environment rather than the command line, as far as anyone can tell).
fn from_env(var: &str, value: &std::ffi::OsStr) -> bool {
    std::env::var_os(var).is_some_and(|v| v == value) && !super::config::injected(var)
}

impl KeyArgs {
    /// The key settings given, each with whether it came from the command line.
    pub fn given(&self) -> Result<Vec<(KeySetting, bool)>, Failure> {
        let mut out = Vec::new();
        if let Some(p) = &self.key_file {
            // Absolute, so the restore_command a restore writes finds it from anywhere.
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            out.push((
                KeySetting::File(abs),
                !from_env("PITR_KEY_FILE", p.as_os_str()),
            ));
        }
        if let Some(c) = &self.key_command {
            out.push((
                KeySetting::Command(c.clone()),
                !from_env("PITR_KEY_COMMAND", c.as_ref()),
            ));
        }
        if let Some(k) = &self.key_kms {
            out.push((
                KeySetting::Kms(k.clone()),
                !from_env("PITR_KEY_KMS", k.as_ref()),
            ));
        }
        if let Some(p) = passphrase_from(PASSPHRASE_ENV)? {
            out.push((KeySetting::Passphrase(p), false));
        }
        Ok(out)
    }

    /// The key setting: at most one of the key file, the key command, the KMS key and
    /// PITR_PASSPHRASE. One named on the command line wins over the environment's (the
    /// restore_command a restore writes names its key; the server's environment may hold
    /// another, for its archive_command).
    pub fn setting(&self) -> Result<KeySetting, Failure> {
        let all = self.given()?;
        let explicit = all.iter().any(|(_, flag)| *flag);
        let mut given: Vec<KeySetting> = all
            .into_iter()
            .filter(|(_, flag)| *flag || !explicit)
            .map(|(s, _)| s)
            .collect();
        match given.len() {
            0 => Ok(KeySetting::None),
            1 => Ok(given.remove(0)),
            _ => Err(Failure::new(
                Exit::Key,
                format!(
                    "more than one key is set: {}",
                    given
                        .iter()
                        .map(KeySetting::describe)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .hint("set only one of PITR_KEY_FILE (--key-file), PITR_KEY_COMMAND (--key-command), PITR_KEY_KMS (--key-kms), PITR_PASSPHRASE")),
        }
    }

    /// The flags that give a background worker (a process of this binary) the same key
    /// setting: only those given on the command line (the environment's reach it anyway),
    /// and never the key itself.
    pub fn worker_flags(&self) -> Vec<std::ffi::OsString> {
        let mut out = Vec::new();
        if let Ok(given) = self.given() {
            for (setting, flag) in given {
                match (setting, flag) {
                    (KeySetting::File(p), true) => {
                        out.push("--key-file".into());
                        out.push(p.into());
                    }
                    (KeySetting::Command(c), true) => {
                        out.push("--key-command".into());
                        out.push(c.into());
                    }
                    (KeySetting::Kms(k), true) => {
                        out.push("--key-kms".into());
                        out.push(k.into());
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

/// The environment variable holding a passphrase that opens a repository.
pub const PASSPHRASE_ENV: &str = "PITR_PASSPHRASE";

/// A passphrase from the environment variable `var`, if set and not empty.
pub fn passphrase_from(var: &str) -> Result<Option<Zeroizing<String>>, Failure> {
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => Ok(Some(Zeroizing::new(p))),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(Failure::new(Exit::Key, format!("{var} is not valid UTF-8")))
        }
    }
}

/// A key problem: exit 11 with its hint (damaged slots are exit 5, storage exit 4).
pub fn key_failure(e: KeyError) -> Failure {
    let exit = match &e {
        KeyError::Damaged(_) => Exit::Corrupt,
        KeyError::Storage(_) | KeyError::Leftover(_) => Exit::Repository,
        _ => Exit::Key,
    };
    let hint = e.hint();
    let failure = Failure::new(exit, e.to_string());
    match hint {
        Some(h) => failure.hint(h),
        None => failure,
    }
}

impl RepoArgs {
    /// The key setting ([`KeyArgs::setting`]).
    pub fn key(&self) -> Result<KeySetting, Failure> {
        self.key.setting()
    }

    /// The repository's URL as text, a name from the configuration file resolved (with its
    /// S3 settings in the URL where the environment has none).
    pub fn url_text(&self) -> Result<String, Failure> {
        resolve_repo(self.repo.as_deref())
    }

    /// The parsed URL, or a bad-input failure with a HINT.
    pub fn url(&self) -> Result<RepoUrl, Failure> {
        parse_url(&self.url_text()?)
    }
}

/// A repository given as a URL or as a name from the configuration file, or (None) the
/// file's default: the URL to open, as text.
pub fn resolve_repo(given: Option<&str>) -> Result<String, Failure> {
    let is_name = |g: &str| {
        !g.is_empty()
            && g.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    match given {
        Some(name) if is_name(name) => match super::config::named_repo(name) {
            Some(url) => url,
            None => Err(Failure::new(
                Exit::BadInput,
                format!("no repository is named \"{name}\" in the configuration file"),
            )
            .hint("name one in a [repo.NAME] table of the configuration file, or give a URL: s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH")),
        },
        // A URL (or something that is not one: its parse says why).
        Some(g) => super::config::default_repo_with_settings(g),
        None => Err(Failure::new(Exit::BadInput, "no repository given")
            .hint("give --repo URL, set PITR_REPO, or set repo in the configuration file (/etc/pitr/pitr.toml)")),
    }
}

/// A URL's text parsed, or a bad-input failure with a HINT.
pub fn parse_url(text: &str) -> Result<RepoUrl, Failure> {
    text.parse().map_err(|e: RepoUrlError| {
        Failure::new(Exit::BadInput, e.to_string()).hint(RepoUrlError::HINT)
    })
}

/// How objects written by a command are compressed.
#[derive(Debug, clap::Args)]
pub struct CompressArgs {
    /// zstd level of stored objects (1 fastest .. 19; 0 stores them uncompressed)
    #[arg(
        long,
        env = "PITR_COMPRESS_LEVEL",
        default_value_t = DEFAULT_ZSTD_LEVEL,
        value_parser = clap::value_parser!(i32).range(0..=19),
        value_name = "LEVEL"
    )]
    pub compress_level: i32,
}

/// The default zstd level (see README for the measurement behind it).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

impl CompressArgs {
    /// The envelope options for the chosen level.
    pub fn options(&self) -> EncodeOptions {
        EncodeOptions {
            zstd_level: (self.compress_level > 0).then_some(self.compress_level),
        }
    }
}

/// A repository that cannot be opened: a key problem is exit 11, corruption exit 5,
/// anything else exit 4.
pub fn open_failure(e: OpenError) -> Failure {
    if let OpenError::Key(k) = e {
        return key_failure(k);
    }
    let exit = match &e {
        OpenError::Object(ObjectError::Corrupt { .. }) => Exit::Corrupt,
        _ => Exit::Repository,
    };
    let hint = e.hint();
    let failure = Failure::new(exit, e.to_string());
    match hint {
        Some(h) => failure.hint(h),
        None => failure,
    }
}
