//! S3 storage on aws-sdk-s3: AWS S3 itself or any S3-compatible server. Credentials and
//! region come from the AWS standard chain (environment, profile, instance metadata);
//! `AWS_ENDPOINT_URL` selects another server. The SDK retries transient failures with
//! backoff and jitter; what still fails is classified for the caller. Large objects go up
//! as multipart uploads whose parts are uploaded concurrently as the stream produces them,
//! with at most `part_size * part_concurrency` bytes in memory, aborted on failure.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as AwsBody;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::{Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::StreamExt;

use super::{
    check_key, ByteStream, CopySource, ErrorKind, ListPage, ObjectMeta, PutMode, PutOutcome,
    Storage, StorageError,
};

/// How to reach a bucket. Unset fields come from the AWS standard configuration.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// The bucket.
    pub bucket: String,
    /// Key prefix of the repository inside the bucket (no leading or trailing slash).
    pub prefix: String,
    /// Another endpoint than AWS's (else `AWS_ENDPOINT_URL` or AWS).
    pub endpoint: Option<String>,
    /// Region (else the AWS chain, else `us-east-1` when an endpoint is set).
    pub region: Option<String>,
    /// Path-style addressing (`PITR_S3_PATH_STYLE=true`), for most S3-compatible servers.
    pub path_style: bool,
    /// Static credentials (else the profile, else the AWS chain).
    pub credentials: Option<(String, String)>,
    /// An AWS profile whose credentials and region are used (a repository URL's
    /// `profile=`), rather than the chain's first find.
    pub profile: Option<String>,
    /// Send checksums only when an operation requires them (some servers reject others).
    pub checksums_when_required: bool,
    /// Whether object bodies go up without a SHA-256 in the signature
    /// (`PITR_S3_PAYLOAD_SIGNING`): by default they do over HTTPS while request checksums
    /// are on, where TLS and the CRC the server checks already cover the body.
    pub payload_signing: PayloadSigning,
    /// Total attempts per request for transient failures.
    pub max_attempts: u32,
    /// Per-attempt timeout.
    pub attempt_timeout: Duration,
    /// Multipart part size (objects up to this size go up in one PUT).
    pub part_size: usize,
    /// Parts in flight at once per object.
    pub part_concurrency: usize,
    /// Whether the server honours `If-None-Match: *` (`PITR_S3_CONDITIONAL_PUT`).
    pub conditional_put: ConditionalPut,
    /// Where the outcome of the `If-None-Match` probe is remembered for an hour, so that
    /// one-process-per-file commands do not probe every time (`PITR_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/pitr`, else `~/.cache/pitr`; none: probe once per process).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Storage class of packs and whole WAL segments (`PITR_S3_STORAGE_CLASS`); every
    /// other object stays STANDARD.
    pub storage_class: Option<String>,
    /// Server-side encryption: `AES256` or `aws:kms` (`PITR_S3_SSE`).
    pub sse: Option<String>,
    /// The KMS key of `aws:kms` (`PITR_S3_SSE_KMS_KEY_ID`).
    pub sse_kms_key_id: Option<String>,
}

/// Storage classes whose objects need a restore request before a read: a restore could
/// not read them.
pub const ARCHIVE_CLASSES: [&str; 2] = ["GLACIER", "DEEP_ARCHIVE"];

/// Whether `key` is an object the storage class applies to: a pack, or a whole WAL
/// segment (24 hex digits), never config, manifests, chunk tables, summaries, histories,
/// markers or stream pieces (small or short-lived: infrequent-access classes bill at least
/// 30 days and 128 KB an object).
fn classed(key: &str) -> bool {
    if key.starts_with("pack/") {
        return true;
    }
    key.strip_prefix("wal/")
        .and_then(|rest| rest.rsplit('/').next())
        .is_some_and(|name| name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether request bodies are hashed into the SigV4 signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadSigning {
    /// Signed over plain HTTP or without request checksums; unsigned over HTTPS with them
    /// (the default).
    Auto,
    /// Always signed: the body's SHA-256, computed here and again by the server.
    On,
    /// Never signed (`UNSIGNED-PAYLOAD`): the request checksum is the body's check.
    Off,
}

/// How put-if-absent is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionalPut {
    /// Find out with a probe object (the default), remembered in `cache_dir` for an hour.
    Auto,
    /// The server honours `If-None-Match: *` (AWS S3 does since 2024).
    On,
    /// It does not (Garage): check with HEAD first, put, then check the stored object is
    /// the one written (ETag), reporting a concurrent writer's object as already there.
    Off,
}

impl S3Settings {
    /// Defaults for a bucket and prefix, with pitr's environment settings applied
    /// (`PITR_S3_PATH_STYLE`, `PITR_S3_CHECKSUMS=when_required`).
    pub fn new(bucket: &str, prefix: &str) -> S3Settings {
        let flag = |name: &str| {
            std::env::var(name).is_ok_and(|v| matches!(v.as_str(), "true" | "1" | "on" | "yes"))
        };
        S3Settings {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: None,
            region: None,
            path_style: flag("PITR_S3_PATH_STYLE"),
            credentials: None,
            profile: None,
            checksums_when_required: std::env::var("PITR_S3_CHECKSUMS")
                .is_ok_and(|v| v == "when_required"),
            payload_signing: match on_off("PITR_S3_PAYLOAD_SIGNING") {
                Some(true) => PayloadSigning::On,
                Some(false) => PayloadSigning::Off,
                None => PayloadSigning::Auto,
            },
            max_attempts: env_max_attempts().ok().flatten().unwrap_or(3),
            attempt_timeout: env_attempt_timeout()
                .ok()
                .flatten()
                .unwrap_or(Duration::from_secs(60)),
            part_size: 16 << 20,
            part_concurrency: 4,
            conditional_put: match on_off("PITR_S3_CONDITIONAL_PUT") {
                Some(true) => ConditionalPut::On,
                Some(false) => ConditionalPut::Off,
                None => ConditionalPut::Auto,
            },
            cache_dir: default_cache_dir(),
            storage_class: env_value("PITR_S3_STORAGE_CLASS"),
            sse: env_value("PITR_S3_SSE"),
            sse_kms_key_id: env_value("PITR_S3_SSE_KMS_KEY_ID"),
        }
    }
}

/// `PITR_S3_MAX_ATTEMPTS`: None when unset, an error when not a number from 1 to 100.
fn env_max_attempts() -> Result<Option<u32>, String> {
    let Some(v) = env_value("PITR_S3_MAX_ATTEMPTS") else {
        return Ok(None);
    };
    match v.parse::<u32>() {
        Ok(n) if (1..=100).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "PITR_S3_MAX_ATTEMPTS={v:?} is not a number from 1 to 100"
        )),
    }
}

/// `PITR_S3_ATTEMPT_TIMEOUT`: None when unset, an error when not a non-zero duration.
fn env_attempt_timeout() -> Result<Option<Duration>, String> {
    let Some(v) = env_value("PITR_S3_ATTEMPT_TIMEOUT") else {
        return Ok(None);
    };
    match humantime::parse_duration(&v) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        _ => Err(format!(
            "PITR_S3_ATTEMPT_TIMEOUT={v:?} is not a duration (\"60s\", \"5m\")"
        )),
    }
}

/// What is wrong with pitr's S3 settings in the environment that [`S3Settings::new`] would
/// otherwise pass over: a count or a duration that does not parse.
pub fn env_problem() -> Option<String> {
    env_max_attempts()
        .err()
        .or_else(|| env_attempt_timeout().err())
}

/// A setting from the environment, if set and not empty.
fn env_value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// An `auto|on|off` setting from the environment: on (`on`, `true`), off (`off`,
/// `false`), or None for auto and anything else.
fn on_off(name: &str) -> Option<bool> {
    match std::env::var(name).as_deref() {
        Ok("on") | Ok("true") => Some(true),
        Ok("off") | Ok("false") => Some(false),
        _ => None,
    }
}

/// `PITR_CACHE_DIR`, else `$XDG_CACHE_HOME/pitr`, else `$HOME/.cache/pitr`.
pub fn default_cache_dir() -> Option<std::path::PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    var("PITR_CACHE_DIR")
        .map(Into::into)
        .or_else(|| var("XDG_CACHE_HOME").map(|d| std::path::Path::new(&d).join("pitr")))
        .or_else(|| var("HOME").map(|d| std::path::Path::new(&d).join(".cache/pitr")))
}

/// What a probe's outcome means: (honour `If-None-Match`, remember it). A probe that could
/// not tell fails closed: check-then-put with the ETag check for this process, and
/// nothing remembered, so the next process probes again.
fn probe_verdict(outcome: Option<bool>) -> (bool, bool) {
    match outcome {
        Some(supported) => (supported, true),
        None => (false, false),
    }
}

/// How long a remembered probe outcome is trusted.
const PROBE_TTL: Duration = Duration::from_secs(3600);

/// The file remembering whether `endpoint` honours `If-None-Match` for `bucket`.
fn probe_cache_file(dir: &std::path::Path, endpoint: &str, bucket: &str) -> std::path::PathBuf {
    let id = blake3::hash(format!("{endpoint}\n{bucket}").as_bytes()).to_hex();
    dir.join("s3-conditional-put").join(&id.as_str()[..32])
}

/// A remembered outcome younger than the TTL.
fn read_probe_cache(file: &std::path::Path) -> Option<bool> {
    let meta = std::fs::metadata(file).ok()?;
    if meta.modified().ok()?.elapsed().ok()? > PROBE_TTL {
        return None;
    }
    match std::fs::read_to_string(file).ok()?.trim() {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// Remembers an outcome (temp file and rename: readers see all or nothing). Best effort.
fn write_probe_cache(file: &std::path::Path, supported: bool) {
    let Some(dir) = file.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    let text = if supported { "on\n" } else { "off\n" };
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, file).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// A bucket (and prefix) as storage.
#[derive(Debug, Clone)]
pub struct S3Storage {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    part_size: usize,
    part_concurrency: usize,
    conditional: ConditionalPut,
    /// Bodies go up as `UNSIGNED-PAYLOAD` (see [`PayloadSigning`]).
    unsigned_payload: bool,
    probed: std::sync::Arc<tokio::sync::OnceCell<bool>>,
    probe_cache: Option<std::path::PathBuf>,
    /// The endpoint URL ("aws" for AWS's own).
    endpoint: String,
    /// Storage class of packs and whole segments.
    storage_class: Option<aws_sdk_s3::types::StorageClass>,
    /// Server-side encryption of every object written.
    sse: Option<aws_sdk_s3::types::ServerSideEncryption>,
    sse_kms_key_id: Option<String>,
    /// What signs requests (for [`Storage::copy_source`]).
    credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
    /// The server and identity, once resolved (`None`: no credentials).
    identity: std::sync::Arc<tokio::sync::OnceCell<Option<String>>>,
    /// Whether CopyObject honours `If-None-Match: *` here (probed once, when first needed).
    copy_probed: std::sync::Arc<tokio::sync::OnceCell<bool>>,
}

/// Classifies an SDK failure: NotFound, Transient (timeouts, connection faults, throttling,
/// 5xx, conflicting concurrent writes) or Permanent (everything a retry cannot change).
fn classify<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    op: &'static str,
    key: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StorageError {
    let kind = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ErrorKind::Transient
        }
        SdkError::ServiceError(e) => {
            let status = e.raw().status().as_u16();
            let code = e.err().code().unwrap_or_default();
            if status == 404 || code == "NoSuchKey" || code == "NotFound" {
                ErrorKind::NotFound
            } else if status >= 500
                || status == 429
                || status == 409
                || code == "SlowDown"
                || code == "RequestTimeout"
            {
                ErrorKind::Transient
            } else {
                ErrorKind::Permanent
            }
        }
        _ => ErrorKind::Permanent,
    };
    let detail = match &err {
        SdkError::ServiceError(e) => format!(
            "{} (HTTP {}{})",
            e.err().message().unwrap_or("service error"),
            e.raw().status().as_u16(),
            e.err().code().map(|c| format!(", {c}")).unwrap_or_default()
        ),
        other => format!("{}", aws_sdk_s3::error::DisplayErrorContext(other)),
    };
    StorageError::new(kind, op, key, detail)
}

/// A failure while reading a response body: `Damaged` when the SDK's check of the response
/// checksum failed (the bytes the server holds do not match the checksum it stored with
/// them; the message is that check's), `Transient` otherwise (a cut connection).
fn body_error<E: std::error::Error + Send + Sync + 'static>(key: &str, e: E) -> StorageError {
    let mut at: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = at {
        let text = err.to_string();
        if text.contains("checksum mismatch") {
            return StorageError::new(ErrorKind::Damaged, "get", key, text);
        }
        at = err.source();
    }
    StorageError::new(ErrorKind::Transient, "get", key, e)
}

fn status_of<E>(err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    match err {
        SdkError::ServiceError(e) => Some(e.raw().status().as_u16()),
        _ => None,
    }
}

/// The HTTPS client for S3 and the credential providers: rustls on ring, trusting the
/// system's CA bundle file (or `SSL_CERT_FILE`).
pub fn https_client() -> aws_sdk_s3::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider, TlsContext};
    let builder =
        aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring));
    match ca_bundles().and_then(|bundles| {
        let mut store = aws_smithy_http_client::tls::TrustStore::empty();
        for pem in bundles {
            store.add_pem_certificate(pem);
        }
        TlsContext::builder().with_trust_store(store).build().ok()
    }) {
        Some(context) => builder.tls_context(context).build_https(),
        None => builder.build_https(),
    }
}

/// The CA certificates to trust, from bundle files: those `AWS_CA_BUNDLE` and
/// `SSL_CERT_FILE` name, if set, else the distribution's bundle unless `SSL_CERT_DIR` names a
/// directory to use instead. `None` means the whole native store (`SSL_CERT_DIR`, a
/// directory of files that takes a wal-push process longer to read than the rest of its
/// work), also when no bundle is found.
fn ca_bundles() -> Option<Vec<Vec<u8>>> {
    let named: Vec<Vec<u8>> = ["AWS_CA_BUNDLE", "SSL_CERT_FILE"]
        .iter()
        .filter_map(|var| std::env::var_os(var).filter(|v| !v.is_empty()))
        .filter_map(|file| std::fs::read(file).ok())
        .collect();
    if !named.is_empty() {
        return Some(named);
    }
    if std::env::var_os("SSL_CERT_DIR").is_some() {
        return None;
    }
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/ssl/cert.pem",
    ]
    .iter()
    .find_map(|path| std::fs::read(path).ok())
    .filter(|pem| !pem.is_empty())
    .map(|pem| vec![pem])
}

impl S3Storage {
    /// Connects to the bucket (nothing is sent until the first request).
    pub async fn connect(settings: S3Settings) -> S3Storage {
        let endpoint_url = settings
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .filter(|e| !e.is_empty());
        let env_keys = settings.profile.is_none()
            && ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
                .iter()
                .all(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
        let own_credentials = settings.credentials.is_some() || env_keys;
        // Building a TLS configuration parses every trusted certificate; a wal-push call is a
        // process of its own, so build none for a plain-HTTP endpoint and only one otherwise.
        let http = match &endpoint_url {
            Some(e) if e.starts_with("http://") && own_credentials => {
                aws_smithy_http_client::Builder::new().build_http()
            }
            _ => https_client(),
        };
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http.clone());
        if let Some((id, secret)) = &settings.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id,
                secret,
                None,
                None,
                "pitr-settings",
            ));
        } else if let Some(profile) = &settings.profile {
            // The profile's, whatever else the environment holds.
            let config = aws_config::provider_config::ProviderConfig::default()
                .with_http_client(http.clone());
            loader = loader.profile_name(profile).credentials_provider(
                aws_config::profile::ProfileFileCredentialsProvider::builder()
                    .configure(&config)
                    .profile_name(profile)
                    .build(),
            );
            // And the profile's region, whatever AWS_REGION says (a region= in the URL
            // still wins, below).
            if settings.region.is_none() {
                loader = loader.region(
                    aws_config::profile::region::ProfileFileRegionProvider::builder()
                        .configure(&config)
                        .profile_name(profile)
                        .build(),
                );
            }
        } else if env_keys {
            // What the default chain would find first, without building the rest of it
            // (its web-identity provider makes an STS client, with a TLS configuration).
            loader = loader.credentials_provider(
                aws_config::environment::credentials::EnvironmentVariableCredentialsProvider::new(),
            );
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.path_style)
            .retry_config(
                aws_sdk_s3::config::retry::RetryConfig::standard()
                    .with_max_attempts(settings.max_attempts),
            )
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(settings.attempt_timeout)
                    .build(),
            );
        if shared.region().is_none() {
            // S3-compatible servers rarely care, but the SDK must sign for some region.
            b = b.region(Region::new("us-east-1"));
        }
        if settings.checksums_when_required {
            b = b
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        let tls = endpoint_url
            .as_deref()
            .is_none_or(|e| e.starts_with("https://"));
        let unsigned_payload = match settings.payload_signing {
            PayloadSigning::On => false,
            PayloadSigning::Off => true,
            PayloadSigning::Auto => tls && !settings.checksums_when_required,
        };
        let endpoint = endpoint_url.unwrap_or_else(|| "aws".into());
        let probe_cache = settings
            .cache_dir
            .as_deref()
            .map(|d| probe_cache_file(d, &endpoint, &settings.bucket));
        S3Storage {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            probe_cache,
            credentials: shared.credentials_provider(),
            identity: Default::default(),
            storage_class: settings
                .storage_class
                .as_deref()
                .map(aws_sdk_s3::types::StorageClass::from),
            sse: settings
                .sse
                .as_deref()
                .map(aws_sdk_s3::types::ServerSideEncryption::from),
            sse_kms_key_id: settings.sse_kms_key_id.clone(),
            endpoint,
            copy_probed: Default::default(),
            bucket: settings.bucket,
            prefix: settings.prefix,
            part_size: settings.part_size.max(5 << 20),
            part_concurrency: settings.part_concurrency.max(1),
            conditional: settings.conditional_put,
            unsigned_payload,
            probed: Default::default(),
        }
    }

    /// Whether `If-None-Match: *` is honoured: by setting, or by a probe made once.
    async fn conditional_supported(&self) -> bool {
        match self.conditional {
            ConditionalPut::On => true,
            ConditionalPut::Off => false,
            ConditionalPut::Auto => {
                *self
                    .probed
                    .get_or_init(|| async {
                        if let Some(known) = self.probe_cache.as_deref().and_then(read_probe_cache)
                        {
                            return known;
                        }
                        let (supported, remember) = probe_verdict(self.probe_conditional().await);
                        if let (Some(file), true) = (&self.probe_cache, remember) {
                            write_probe_cache(file, supported);
                        }
                        supported
                    })
                    .await
            }
        }
    }

    /// Writes a probe object twice, the second time conditionally: a 412 means the server
    /// honours the condition, a success that it does not. `None` when the probe itself
    /// failed: the caller then never assumes the condition is honoured (it checks before
    /// and after each put instead) and remembers nothing.
    async fn probe_conditional(&self) -> Option<bool> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let key = format!(".conditional-probe/{}-{nanos}", std::process::id());
        let full = self.full_key("put", &key).ok()?;
        let put = || {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .body(AwsBody::from_static(b"probe"))
        };
        put().send().await.ok()?;
        let supported = match put().if_none_match("*").send().await {
            Err(e) if status_of(&e) == Some(412) => Some(true),
            // The server answered but refused the condition (501 and the like).
            Err(SdkError::ServiceError(_)) => Some(false),
            Err(_) => None,
            Ok(_) => Some(false),
        };
        let _ = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await;
        supported
    }

    /// Whether a server-side copy can be told not to overwrite: copies a probe object onto a
    /// new key, then again with `If-None-Match: *` (a 412 means yes). A server that cannot
    /// copy at all, or ignores the condition, or a probe that fails: no (bytes are copied
    /// instead, with put-if-absent as usual).
    async fn copy_conditional_supported(&self) -> bool {
        *self
            .copy_probed
            .get_or_init(|| async {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let base = format!(".conditional-probe/{}-{nanos}", std::process::id());
                let (Ok(from), Ok(to)) = (
                    self.full_key("put", &format!("{base}-a")),
                    self.full_key("put", &format!("{base}-b")),
                ) else {
                    return false;
                };
                let copy = || {
                    self.client
                        .copy_object()
                        .bucket(&self.bucket)
                        .key(&to)
                        .copy_source(copy_source_header(&self.bucket, &from))
                };
                let put = self
                    .client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&from)
                    .body(AwsBody::from_static(b"probe"))
                    .send()
                    .await;
                let supported = put.is_ok()
                    && copy().send().await.is_ok()
                    && matches!(
                        copy().if_none_match("*").send().await,
                        Err(e) if status_of(&e) == Some(412)
                    );
                for key in [&from, &to] {
                    let _ = self
                        .client
                        .delete_object()
                        .bucket(&self.bucket)
                        .key(key)
                        .send()
                        .await;
                }
                supported
            })
            .await
    }

    /// After an unconditional write: is the stored object the one with the ETag we got back?
    /// (Without an ETag there is nothing to compare; the write is taken as ours.)
    async fn still_ours(
        &self,
        key: &str,
        full: &str,
        written: Option<&str>,
    ) -> Result<bool, StorageError> {
        let Some(written) = written else {
            return Ok(true);
        };
        let stored = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| classify("put", key, e))?;
        Ok(stored.e_tag() == Some(written))
    }

    /// Put-if-absent on a server that ignores the condition: HEAD, put, then make sure the
    /// object stored is the one written (a concurrent writer's wins and is reported).
    async fn put_checked(
        &self,
        key: &str,
        full: &str,
        body: Bytes,
    ) -> Result<PutOutcome, StorageError> {
        if self.head(key).await?.is_some() {
            return Ok(PutOutcome::AlreadyExists);
        }
        let written = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(AwsBody::from(body))
            .set_storage_class(self.class_for(key))
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.sse_kms_key_id.clone())
            .send()
            .await
            .map_err(|e| classify("put", key, e))?;
        if !self.still_ours(key, full, written.e_tag()).await? {
            return Ok(PutOutcome::AlreadyExists);
        }
        Ok(PutOutcome::Stored)
    }

    /// The storage class for `key` (packs and whole segments only).
    fn class_for(&self, key: &str) -> Option<aws_sdk_s3::types::StorageClass> {
        self.storage_class.clone().filter(|_| classed(key))
    }

    fn full_key(&self, op: &'static str, key: &str) -> Result<String, StorageError> {
        check_key(op, key)?;
        Ok(if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }

    fn list_prefix(&self, prefix: &str) -> String {
        if self.prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{}/{prefix}", self.prefix)
        }
    }

    async fn put_once(
        &self,
        key: &str,
        full: &str,
        body: Bytes,
        mode: PutMode,
    ) -> Result<PutOutcome, StorageError> {
        if mode == PutMode::IfAbsent && !self.conditional_supported().await {
            return self.put_checked(key, full, body).await;
        }
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(AwsBody::from(body))
            .set_storage_class(self.class_for(key))
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.sse_kms_key_id.clone());
        if mode == PutMode::IfAbsent {
            req = req.if_none_match("*");
        }
        let sent = if self.unsigned_payload {
            req.customize().disable_payload_signing().send().await
        } else {
            req.send().await
        };
        match sent {
            Ok(_) => Ok(PutOutcome::Stored),
            Err(e) if mode == PutMode::IfAbsent && status_of(&e) == Some(412) => {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(e) => Err(classify("put", key, e)),
        }
    }

    async fn multipart(
        &self,
        key: &str,
        full: &str,
        first: Bytes,
        mut body: ByteStream,
        mode: PutMode,
    ) -> Result<PutOutcome, StorageError> {
        let conditional = mode == PutMode::IfAbsent && self.conditional_supported().await;
        let checked = mode == PutMode::IfAbsent && !conditional;
        if checked && self.head(key).await?.is_some() {
            return Ok(PutOutcome::AlreadyExists);
        }
        let mode = if checked { PutMode::Overwrite } else { mode };
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .set_storage_class(self.class_for(key))
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.sse_kms_key_id.clone())
            .send()
            .await
            .map_err(|e| classify("put", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let result = self
            .upload_parts(key, full, &upload_id, first, &mut body, mode)
            .await;
        if let (true, Ok((PutOutcome::Stored, written))) = (checked, &result) {
            // Without a server-side condition: is the stored object still ours?
            if !self.still_ours(key, full, written.as_deref()).await? {
                return Ok(PutOutcome::AlreadyExists);
            }
        }
        let result = result.map(|(outcome, _)| outcome);
        if !matches!(result, Ok(PutOutcome::Stored)) {
            // Leave nothing billed behind; an abort that fails is expired by lifecycle rules.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        first: Bytes,
        body: &mut ByteStream,
        mode: PutMode,
    ) -> Result<(PutOutcome, Option<String>), StorageError> {
        let mut in_flight = FuturesOrdered::new();
        let mut done: Vec<CompletedPart> = Vec::new();
        let mut next_part = Some(first);
        let mut number = 0i32;
        loop {
            while in_flight.len() < self.part_concurrency {
                let Some(part) = next_part.take() else { break };
                number += 1;
                let req = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(AwsBody::from(part));
                let unsigned = self.unsigned_payload;
                in_flight.push_back(async move {
                    let sent = if unsigned {
                        req.customize().disable_payload_signing().send().await
                    } else {
                        req.send().await
                    };
                    (number, sent)
                });
                next_part = read_part(body, self.part_size).await?;
            }
            let Some((n, result)) = in_flight.next().await else {
                break;
            };
            let out = result.map_err(|e| classify("put", key, e))?;
            done.push(
                CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build(),
            );
        }
        let mut complete = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            );
        if mode == PutMode::IfAbsent {
            complete = complete.if_none_match("*");
        }
        match complete.send().await {
            Ok(out) => Ok((PutOutcome::Stored, out.e_tag().map(str::to_owned))),
            Err(e) if mode == PutMode::IfAbsent && status_of(&e) == Some(412) => {
                Ok((PutOutcome::AlreadyExists, None))
            }
            Err(e) => Err(classify("put", key, e)),
        }
    }
}

/// CopyObject's `x-amz-copy-source`: `bucket/key`, URL-encoded (`/` kept).
fn copy_source_header(bucket: &str, key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + key.len() + 1);
    for b in format!("{bucket}/{key}").bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads up to `size` bytes from the stream (None at its end).
async fn read_part(body: &mut ByteStream, size: usize) -> Result<Option<Bytes>, StorageError> {
    let mut buf = BytesMut::new();
    while buf.len() < size {
        match body.next().await {
            Some(chunk) => buf.extend_from_slice(&chunk?),
            None => break,
        }
    }
    // A chunk may overshoot a part; parts only need to be at least 5 MiB, so that is fine.
    Ok((!buf.is_empty()).then(|| buf.freeze()))
}

#[async_trait]
impl Storage for S3Storage {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StorageError> {
        let full = self.full_key("put", key)?;
        if body.len() > self.part_size {
            let rest = futures::stream::iter(
                body.chunks(self.part_size)
                    .skip(1)
                    .map(|c| Ok(body.slice_ref(c)))
                    .collect::<Vec<_>>(),
            )
            .boxed();
            let first = body.slice(..self.part_size);
            return self.multipart(key, &full, first, rest, mode).await;
        }
        self.put_once(key, &full, body, mode).await
    }

    async fn put_stream(
        &self,
        key: &str,
        mut body: ByteStream,
        _size: Option<u64>,
        mode: PutMode,
    ) -> Result<PutOutcome, StorageError> {
        let full = self.full_key("put", key)?;
        let first = read_part(&mut body, self.part_size)
            .await?
            .unwrap_or_default();
        let second = read_part(&mut body, self.part_size).await?;
        match second {
            None => self.put_once(key, &full, first, mode).await,
            Some(second) => {
                let rest = futures::stream::once(async move { Ok(second) })
                    .chain(body)
                    .boxed();
                self.multipart(key, &full, first, rest, mode).await
            }
        }
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StorageError> {
        let full = self.full_key("get", key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| classify("get", key, e))?;
        let key = key.to_owned();
        let stream = futures::stream::unfold(Some(out.body), move |body| {
            let key = key.clone();
            async move {
                let mut body = body?;
                match body.next().await {
                    None => None,
                    Some(Ok(chunk)) => Some((Ok(chunk), Some(body))),
                    // A cut connection mid-object: retrying the whole get can help. A
                    // response checksum that fails says the bytes are damaged.
                    Some(Err(e)) => Some((Err(body_error(&key, e)), None)),
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        let full = self.full_key("get", key)?;
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .range(format!("bytes={}-{}", range.start, range.end - 1));
        let out = match req.send().await {
            Ok(out) => out,
            // Past the end: nothing there, like a clipped read.
            Err(e) if status_of(&e) == Some(416) => return Ok(Bytes::new()),
            Err(e) => return Err(classify("get", key, e)),
        };
        // A server (or proxy) that ignores Range answers 200 with the whole object: refused
        // before its body is read, as it would be read whole and taken for the range.
        let want = range.end - range.start;
        let ignored = |len: u64| {
            StorageError::new(
                ErrorKind::Permanent,
                "get",
                key,
                format!("the server ignored the Range header: at least {len} bytes for a range of {want}"),
            )
        };
        if out.content_range().is_none() {
            if let Some(len) = out.content_length().filter(|&l| l > 0 && l as u64 > want) {
                return Err(ignored(len as u64));
            }
        }
        // Copied frame by frame into one buffer of the size asked for (our own request's,
        // not the server's word): collecting the frames first and then joining them held
        // each range twice over, and a restore's eight ranges in flight were most of its
        // peak memory.
        let mut body = out.body;
        let mut data = Vec::with_capacity(want as usize);
        while let Some(frame) = body.next().await {
            let frame = frame.map_err(|e| body_error(key, e))?;
            if (data.len() + frame.len()) as u64 > want {
                return Err(ignored((data.len() + frame.len()) as u64));
            }
            data.extend_from_slice(&frame);
        }
        // A short read (the object ends first) does not keep the room asked for.
        if data.len() < data.capacity() {
            data.shrink_to_fit();
        }
        Ok(Bytes::from(data))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let full = self.full_key("head", key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
                modified: out
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
            })),
            Err(e) => {
                let e = classify("head", key, e);
                if e.is_not_found() {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self.list_page_from(prefix, token, Some(after)).await?;
            out.extend(page.objects);
            match page.next {
                Some(next) => token = Some(next),
                None => return Ok(out),
            }
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> Result<ListPage, StorageError> {
        self.list_page_from(prefix, token, None).await
    }

    async fn copy_source(&self) -> Option<CopySource> {
        use aws_sdk_s3::config::ProvideCredentials;
        let server = self
            .identity
            .get_or_init(|| async {
                let credentials = self
                    .credentials
                    .as_ref()?
                    .provide_credentials()
                    .await
                    .ok()?;
                Some(format!(
                    "{}\n{}\n{}",
                    self.endpoint,
                    self.client.config().region().map_or("", |r| r.as_ref()),
                    credentials.access_key_id()
                ))
            })
            .await
            .clone()?;
        Some(CopySource {
            server,
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
        })
    }

    async fn copy_from(
        &self,
        from: &CopySource,
        key: &str,
        mode: PutMode,
    ) -> Result<Option<PutOutcome>, StorageError> {
        let full = self.full_key("copy", key)?;
        if self
            .copy_source()
            .await
            .is_none_or(|me| me.server != from.server)
        {
            return Ok(None);
        }
        if mode == PutMode::IfAbsent && !self.copy_conditional_supported().await {
            return Ok(None);
        }
        let source = if from.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", from.prefix)
        };
        let mut req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(&full)
            .copy_source(copy_source_header(&from.bucket, &source))
            .set_storage_class(self.class_for(key))
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.sse_kms_key_id.clone());
        if mode == PutMode::IfAbsent {
            req = req.if_none_match("*");
        }
        match req.send().await {
            Ok(_) => Ok(Some(PutOutcome::Stored)),
            Err(e) if mode == PutMode::IfAbsent && status_of(&e) == Some(412) => {
                Ok(Some(PutOutcome::AlreadyExists))
            }
            Err(e) => Err(classify("copy", key, e)),
        }
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        for batch in keys.chunks(1000) {
            let mut ids = Vec::with_capacity(batch.len());
            for k in batch {
                let full = self.full_key("delete", k)?;
                ids.push(
                    ObjectIdentifier::builder()
                        .key(full)
                        .build()
                        .map_err(|e| StorageError::new(ErrorKind::Permanent, "delete", k, e))?,
                );
            }
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StorageError::new(ErrorKind::Permanent, "delete", &batch[0], e))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| classify("delete", &batch[0], e))?;
            if let Some(err) = out.errors().first() {
                let key = err.key().unwrap_or_default();
                return Err(StorageError::new(
                    ErrorKind::Permanent,
                    "delete",
                    key,
                    err.message().unwrap_or("delete refused").to_owned(),
                ));
            }
        }
        Ok(())
    }
}

impl S3Storage {
    /// One page of a listing, after a continuation token, or from `start_after` (a key,
    /// relative to the repository) on the first page.
    async fn list_page_from(
        &self,
        prefix: &str,
        token: Option<String>,
        start_after: Option<&str>,
    ) -> Result<ListPage, StorageError> {
        let mut req = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.list_prefix(prefix))
            .set_continuation_token(token.clone())
            .max_keys(super::LIST_PAGE_SIZE as i32);
        if let (None, Some(after)) = (&token, start_after) {
            req = req.start_after(self.list_prefix(after));
        }
        let out = req.send().await.map_err(|e| classify("list", prefix, e))?;
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                let key = o.key()?.get(strip..)?.to_owned();
                Some(ObjectMeta {
                    key,
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified: o
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                })
            })
            .collect();
        let next = if out.is_truncated() == Some(true) {
            out.next_continuation_token().map(str::to_owned)
        } else {
            None
        };
        Ok(ListPage { objects, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_that_cannot_tell_fails_closed_and_is_not_remembered() {
        assert_eq!(probe_verdict(None), (false, false));
        assert_eq!(probe_verdict(Some(true)), (true, true));
        assert_eq!(probe_verdict(Some(false)), (false, true));
    }

    #[test]
    fn a_probe_outcome_is_remembered_per_endpoint_and_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let a = probe_cache_file(dir.path(), "http://127.0.0.1:9000", "b1");
        let b = probe_cache_file(dir.path(), "http://127.0.0.1:9000", "b2");
        assert_ne!(a, b);
        assert_eq!(read_probe_cache(&a), None);
        write_probe_cache(&a, false);
        write_probe_cache(&b, true);
        assert_eq!(read_probe_cache(&a), Some(false));
        assert_eq!(read_probe_cache(&b), Some(true));
        // Garbage is no answer.
        std::fs::write(&a, "maybe").unwrap();
        assert_eq!(read_probe_cache(&a), None);
    }

    #[test]
    fn a_stale_outcome_is_probed_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = probe_cache_file(dir.path(), "aws", "b");
        write_probe_cache(&a, true);
        let old = std::time::SystemTime::now() - PROBE_TTL - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(read_probe_cache(&a), None);
    }
}
