//! A repository: storage opened from a URL, and its `config` object, written by `pitr init`,
//! that ties it to one PostgreSQL cluster. Opening refuses a location without a config (a
//! typo in the prefix, an unmounted directory: never a new repository by accident), a
//! format this build does not know and a cluster that is not the repository's.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::Codec;
use crate::envelope::{self, EncodeOptions, Encryption, Protection};
use crate::objects::{ObjectError, ObjectStore};
use crate::slots::{self, KeyError, KeySetting, NewSlot};
use crate::storage::{
    FsStorage, PutMode, PutOutcome, RetryPolicy, RetryingStorage, S3Settings, S3Storage, Storage,
    StorageError,
};
use crate::url::RepoUrl;

/// The repository format this build writes. Version 2 added encryption (key slots under
/// `keys/`, encrypted objects); this build reads version 1 (always plaintext) as well.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest repository format this build reads.
pub const FORMAT_OLDEST: u32 = 1;
/// Key of the config object.
pub const CONFIG_KEY: &str = "config";
/// Bytes of the config object read at most: its plaintext is at most 1 MiB (a few hundred
/// bytes in practice), so a larger object is damage, found when the truncated envelope does
/// not check, and is never read whole.
const CONFIG_READ_MAX: u64 = 2 << 20;

/// The cluster a repository belongs to, as read from its WAL or pg_control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterIdentity {
    /// System identifier.
    pub system_identifier: u64,
    /// PostgreSQL major version.
    pub pg_version: u32,
    /// wal_segment_size in bytes.
    pub wal_segment_size: u64,
}

/// The `config` object (JSON inside an envelope). Unknown fields are kept by readers that
/// rewrite nothing, so later versions can add fields without a format break.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Repository format version.
    pub format: u32,
    /// The cluster's system identifier, as a decimal string (JSON numbers lose precision).
    pub system_identifier: String,
    /// PostgreSQL major version.
    pub pg_version: u32,
    /// wal_segment_size in bytes.
    pub wal_segment_size: u64,
    /// Envelope encryption of every object: `none` or `aes-256-gcm-subkey`.
    pub encryption: String,
    /// A random id of this repository (32 hex digits; absent in format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When the repository was created (RFC 3339, UTC).
    pub created: String,
    /// The pitr version that created it.
    pub created_by: String,
}

/// Why a repository cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Reading or writing the config failed.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// Storage could not be set up.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// No config.
    #[error("repository {url} is not initialized (no config object)")]
    NotInitialized {
        /// The repository.
        url: String,
    },
    /// `init` of a location that holds a repository, or anything else.
    #[error("{url} is not empty: {what}")]
    NotEmpty {
        /// The location.
        url: String,
        /// What is there.
        what: String,
    },
    /// The config is not valid JSON of the expected shape.
    #[error("repository config is unreadable: {0}")]
    BadConfig(String),
    /// Written by a newer pitr.
    #[error("repository format version {found} is not supported by this pitr (it reads versions {FORMAT_OLDEST} to {FORMAT_VERSION})")]
    UnknownFormat {
        /// The version found.
        found: u32,
    },
    /// The key could not be had, or does not open the repository.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Another cluster's repository.
    #[error("{what} {found} does not match repository ({expected})")]
    Mismatch {
        /// Which property.
        what: &'static str,
        /// The cluster's.
        found: String,
        /// The repository's.
        expected: String,
    },
}

impl OpenError {
    /// What the operator can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            OpenError::NotInitialized { .. } => {
                Some("check the repository URL; a new repository is created with pitr init")
            }
            OpenError::NotEmpty { .. } => {
                Some("pitr info shows the repository there; initialize a new, empty location")
            }
            OpenError::UnknownFormat { .. } => {
                Some("upgrade pitr to a version that reads this repository")
            }
            OpenError::Mismatch {
                what: "system identifier",
                ..
            } => Some(
                "does archive_command point at the right repository? Each cluster needs its own",
            ),
            OpenError::Mismatch { .. } => {
                Some("a repository holds one cluster; use a new repository after pg_upgrade")
            }
            OpenError::Key(e) => e.hint(),
            _ => None,
        }
    }
}

/// An open repository.
#[derive(Debug, Clone)]
pub struct Repository {
    url: RepoUrl,
    objects: ObjectStore,
    config: RepoConfig,
}

/// Storage for a URL: S3 with the AWS standard configuration plus pitr's settings, or a
/// local directory (which must exist); either way behind retries of transient failures.
pub async fn storage_for(url: &RepoUrl) -> Result<Arc<dyn Storage>, StorageError> {
    backend(url, false).await
}

/// Storage for `init` at a URL: as [`storage_for`], but a `file://` root is created (0700)
/// when its parent exists.
pub async fn storage_to_init(url: &RepoUrl) -> Result<Arc<dyn Storage>, StorageError> {
    backend(url, true).await
}

async fn backend(url: &RepoUrl, create_root: bool) -> Result<Arc<dyn Storage>, StorageError> {
    let inner: Arc<dyn Storage> = match url {
        RepoUrl::S3 {
            bucket,
            prefix,
            options,
        } => {
            // The URL's own settings win over the environment's.
            let mut settings = S3Settings::new(bucket, prefix);
            settings.endpoint = options.endpoint.clone().or(settings.endpoint);
            settings.region = options.region.clone().or(settings.region);
            settings.path_style = options.path_style.unwrap_or(settings.path_style);
            settings.profile = options.profile.clone();
            settings.storage_class = options.storage_class.clone().or(settings.storage_class);
            // Server-side encryption and its KMS key are one pair: a URL that gives `sse`
            // gives its key too, or none (never the environment's key for another sse).
            if options.sse.is_some() {
                settings.sse = options.sse.clone();
                settings.sse_kms_key_id = options.sse_kms_key_id.clone();
            } else if options.sse_kms_key_id.is_some() {
                settings.sse_kms_key_id = options.sse_kms_key_id.clone();
            }
            if let Some(problem) = crate::storage::env_problem() {
                return Err(StorageError::new(
                    crate::storage::ErrorKind::Permanent,
                    "connect",
                    "",
                    problem,
                ));
            }
            let sse_ok = match settings.sse.as_deref() {
                None => settings.sse_kms_key_id.is_none(),
                Some(v) => {
                    crate::url::SSE_VALUES.contains(&v)
                        && (settings.sse_kms_key_id.is_none() || v.starts_with("aws:kms"))
                }
            };
            if !sse_ok {
                return Err(StorageError::new(
                    crate::storage::ErrorKind::Permanent,
                    "connect",
                    "",
                    format!(
                        "server-side encryption {:?} with KMS key {:?}: sse is AES256, aws:kms or aws:kms:dsse, and a KMS key goes with aws:kms only",
                        settings.sse.as_deref().unwrap_or("(none)"),
                        settings.sse_kms_key_id.as_deref().unwrap_or("(none)")
                    ),
                ));
            }
            if let Some(class) = settings
                .storage_class
                .as_deref()
                .filter(|c| crate::storage::ARCHIVE_CLASSES.contains(c))
            {
                return Err(StorageError::new(
                    crate::storage::ErrorKind::Permanent,
                    "connect",
                    "",
                    format!("storage class {class} needs a restore request before every read: a restore could not read the repository (use STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING or GLACIER_IR)"),
                ));
            }
            Arc::new(S3Storage::connect(settings).await)
        }
        RepoUrl::File { path } if create_root => Arc::new(FsStorage::create(path.clone())?),
        RepoUrl::File { path } => Arc::new(FsStorage::new(path.clone())?),
    };
    Ok(with_retries(inner))
}

fn with_retries(inner: Arc<dyn Storage>) -> Arc<dyn Storage> {
    // Few outer attempts: the S3 SDK retries each request itself, and callers such as
    // archive_command must come back in bounded time.
    let policy = RetryPolicy {
        attempts: 3,
        base_delay: std::time::Duration::from_millis(200),
        max_delay: std::time::Duration::from_secs(2),
    };
    Arc::new(RetryingStorage::new(inner, policy))
}

fn now_rfc3339() -> String {
    walfmt::PgTimestamp::now().to_string()
}

impl Repository {
    /// Opens the repository at `url` (its config must exist) with the key `key` names when
    /// it is encrypted; with `cluster`, checks the cluster is the repository's.
    pub async fn open(
        url: &RepoUrl,
        key: &KeySetting,
        cluster: Option<&ClusterIdentity>,
        codec: Arc<Codec>,
    ) -> Result<Repository, OpenError> {
        let storage = storage_for(url).await?;
        Repository::open_on(url.clone(), storage, key, cluster, codec).await
    }

    /// [`Repository::open`] on storage already set up (tests, fault injection).
    pub async fn open_on(
        url: RepoUrl,
        storage: Arc<dyn Storage>,
        key: &KeySetting,
        cluster: Option<&ClusterIdentity>,
        codec: Arc<Codec>,
    ) -> Result<Repository, OpenError> {
        let stored = match storage.get_range(CONFIG_KEY, 0..CONFIG_READ_MAX).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(OpenError::NotInitialized {
                    url: url.to_string(),
                })
            }
            Err(e) => return Err(ObjectError::from(e).into()),
        };
        let header = envelope::header(&stored).map_err(|source| ObjectError::Corrupt {
            key: CONFIG_KEY.into(),
            source,
        })?;
        // The config's own envelope says whether the repository is encrypted; an encrypted
        // config opens only with the repository's key, and says so again inside.
        let protection = match header.encryption {
            Encryption::None if key.is_given() => {
                return Err(KeyError::Plaintext(key.describe()).into())
            }
            Encryption::None => Protection::Plain,
            Encryption::Aes256GcmSubkey => {
                Protection::Encrypted(slots::open(storage.as_ref(), key).await?.keys)
            }
        };
        let objects =
            ObjectStore::new(storage, codec, EncodeOptions::default()).with_protection(protection);
        Repository::finish_open(url, objects, stored, cluster).await
    }

    async fn finish_open(
        url: RepoUrl,
        objects: ObjectStore,
        stored: Bytes,
        cluster: Option<&ClusterIdentity>,
    ) -> Result<Repository, OpenError> {
        let (_, plain) = objects.decode_at_most(CONFIG_KEY, stored, 1 << 20).await?;
        let config = parse_config(&plain)?;
        let encryption = objects.protection().encryption().name();
        if config.encryption != encryption || (config.format < 2 && encryption != "none") {
            return Err(OpenError::BadConfig(format!(
                "it says encryption \"{}\" in an object of encryption \"{encryption}\"",
                config.encryption
            )));
        }
        let repo = Repository {
            url,
            objects,
            config,
        };
        if let Some(cluster) = cluster {
            repo.check_cluster(cluster)?;
        }
        Ok(repo)
    }

    /// Creates a repository for `cluster` at `url`, which must be empty (`pitr init`);
    /// encrypted, with one key slot per source in `encrypt`, when that is not empty.
    pub async fn init(
        url: &RepoUrl,
        cluster: &ClusterIdentity,
        encrypt: &[NewSlot],
        codec: Arc<Codec>,
    ) -> Result<Repository, OpenError> {
        let storage = storage_to_init(url).await?;
        Repository::init_on(url.clone(), storage, cluster, encrypt, codec).await
    }

    /// [`Repository::init`] on storage already set up (tests).
    pub async fn init_on(
        url: RepoUrl,
        storage: Arc<dyn Storage>,
        cluster: &ClusterIdentity,
        encrypt: &[NewSlot],
        codec: Arc<Codec>,
    ) -> Result<Repository, OpenError> {
        let page = storage.list_page("", None).await?;
        if let Some(first) = page.objects.first() {
            let what = if page.objects.iter().any(|o| o.key == CONFIG_KEY) {
                "it holds a repository".to_owned()
            } else if page
                .objects
                .iter()
                .all(|o| o.key.starts_with(slots::SLOTS_PREFIX))
            {
                format!(
                    "it holds only key slots (\"{}\"), left by a pitr init --encrypt that did not finish; delete them and run pitr init again",
                    first.key
                )
            } else {
                format!("it holds \"{}\"", first.key)
            };
            return Err(OpenError::NotEmpty {
                url: url.to_string(),
                what,
            });
        }
        // Encrypted: the data key and its slots first (every source is asked before anything
        // is written), then the first slot set, with put-if-absent like the config (of two
        // inits at once, one fails here), then the config sealed with the new key.
        let protection = if encrypt.is_empty() {
            Protection::Plain
        } else {
            let data = crate::crypto::DataKey::generate();
            let mut made = Vec::new();
            for source in encrypt {
                made.push(slots::make_slot(source, &data).await?);
            }
            if !slots::create(storage.as_ref(), &data, made).await? {
                return Err(OpenError::NotEmpty {
                    url: url.to_string(),
                    what: "another pitr init created a repository there first".into(),
                });
            }
            Protection::Encrypted(Arc::new(crate::crypto::Keys::new(&data)))
        };
        let fresh = RepoConfig {
            format: FORMAT_VERSION,
            system_identifier: cluster.system_identifier.to_string(),
            pg_version: cluster.pg_version,
            wal_segment_size: cluster.wal_segment_size,
            encryption: protection.encryption().name().to_owned(),
            id: Some(hex::encode(crate::crypto::random::<16>())),
            created: now_rfc3339(),
            created_by: format!("pitr {}", env!("CARGO_PKG_VERSION")),
        };
        let json =
            serde_json::to_vec_pretty(&fresh).map_err(|e| OpenError::BadConfig(e.to_string()))?;
        let objects = ObjectStore::new(storage.clone(), codec.clone(), EncodeOptions::default())
            .with_protection(protection);
        let stored = objects
            .put(CONFIG_KEY, Bytes::from(json), PutMode::IfAbsent)
            .await?;
        if stored == PutOutcome::AlreadyExists {
            return Err(OpenError::NotEmpty {
                url: url.to_string(),
                what: "another pitr init created a repository there first".into(),
            });
        }
        // Read back: the stored config is the one that counts, and reading it back narrows
        // the window on servers whose If-None-Match is not atomic.
        let stored = storage
            .get_range(CONFIG_KEY, 0..CONFIG_READ_MAX)
            .await
            .map_err(ObjectError::from)?;
        Repository::finish_open(url, objects, stored, Some(cluster)).await
    }

    /// Checks that `cluster` is the repository's cluster.
    pub fn check_cluster(&self, cluster: &ClusterIdentity) -> Result<(), OpenError> {
        check(
            self.config.system_identifier.clone(),
            cluster.system_identifier.to_string(),
            "system identifier",
        )?;
        check(
            self.config.pg_version.to_string(),
            cluster.pg_version.to_string(),
            "PostgreSQL version",
        )?;
        check(
            self.config.wal_segment_size.to_string(),
            cluster.wal_segment_size.to_string(),
            "WAL segment size",
        )
    }

    /// The same repository, writing objects with `options` (compression level).
    pub fn with_encode_options(mut self, options: EncodeOptions) -> Repository {
        self.objects = self.objects.with_options(options);
        self
    }

    /// The repository's config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Where it is.
    pub fn url(&self) -> &RepoUrl {
        &self.url
    }

    /// Its objects.
    pub fn objects(&self) -> &ObjectStore {
        &self.objects
    }
}

fn check(expected: String, found: String, what: &'static str) -> Result<(), OpenError> {
    if expected == found {
        Ok(())
    } else {
        Err(OpenError::Mismatch {
            what,
            found,
            expected,
        })
    }
}

fn parse_config(plain: &[u8]) -> Result<RepoConfig, OpenError> {
    // Read the version first, so a newer format with another shape is reported as such.
    let value: serde_json::Value =
        serde_json::from_slice(plain).map_err(|e| OpenError::BadConfig(e.to_string()))?;
    let format = value
        .get("format")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0) as u32;
    if !(FORMAT_OLDEST..=FORMAT_VERSION).contains(&format) {
        return Err(OpenError::UnknownFormat { found: format });
    }
    serde_json::from_value(value).map_err(|e| OpenError::BadConfig(e.to_string()))
}
