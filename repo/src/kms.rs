//! AWS KMS for key slots: the repository's data key is encrypted under a customer key
//! (`Encrypt`, with an encryption context binding it to the repository) and opened again
//! with `Decrypt`, naming the same key.
//!
//! Credentials and region come from the AWS standard chain, as for S3; a key ARN's own
//! region wins over the chain's. The endpoint is AWS's unless `AWS_ENDPOINT_URL_KMS` names
//! another: the SDK on its own would also take `AWS_ENDPOINT_URL` (and a profile's
//! `endpoint_url`), which in pitr's setups points at the S3 server, so the endpoint is set
//! here explicitly and nothing else is used. Every call is bounded in time (a few seconds
//! per attempt, the SDK's retries, [`OPERATION_TIMEOUT`] in all), so a dead endpoint is
//! reported as [`KmsError::Unavailable`] rather than waited on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_kms::config::Region;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;

/// The only variable that names a KMS endpoint other than AWS's.
pub const ENDPOINT_VAR: &str = "AWS_ENDPOINT_URL_KMS";
/// Time to open a connection, per attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time for one attempt of a request.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a request, all attempts and the backoff between them.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per request for transient failures.
pub const MAX_ATTEMPTS: u32 = 3;

/// Why a KMS call failed.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// The caller may not use the key, the key is disabled or pending deletion, or the
    /// credentials were refused.
    #[error("permission denied for KMS key \"{key_id}\": {detail}")]
    Denied { key_id: String, detail: String },
    /// No such key (or alias), or a malformed key id.
    #[error("KMS key \"{key_id}\" does not exist: {detail}")]
    NotFound { key_id: String, detail: String },
    /// The key refused the blob: it was made under another key or another encryption
    /// context, or it is damaged.
    #[error("KMS key \"{key_id}\" cannot decrypt this key slot (another key or encryption context, or a damaged slot): {detail}")]
    WrongKey { key_id: String, detail: String },
    /// KMS could not be reached or answered busy (network, timeout, 5xx, throttling):
    /// nothing is known about the key; trying again later may work.
    #[error("KMS is unavailable for key \"{key_id}\" (network, timeout, server error or throttling; try again later): {detail}")]
    Unavailable { key_id: String, detail: String },
    /// Anything else (a bad request, no region, no credentials).
    #[error("KMS request for key \"{key_id}\" failed: {detail}")]
    Other { key_id: String, detail: String },
}

impl KmsError {
    /// True when the failure is about the key or the permission to use it (trying again
    /// will not help); false for transient and unclassified failures.
    pub fn is_key_problem(&self) -> bool {
        matches!(
            self,
            KmsError::Denied { .. } | KmsError::NotFound { .. } | KmsError::WrongKey { .. }
        )
    }

    /// True when KMS could not be reached or was busy.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KmsError::Unavailable { .. })
    }

    /// The key id the failed call named.
    pub fn key_id(&self) -> &str {
        match self {
            KmsError::Denied { key_id, .. }
            | KmsError::NotFound { key_id, .. }
            | KmsError::WrongKey { key_id, .. }
            | KmsError::Unavailable { key_id, .. }
            | KmsError::Other { key_id, .. } => key_id,
        }
    }
}

/// Encrypts `plaintext` (a 32-byte data key) under KMS key `key_id` with encryption context
/// `context`; returns the ciphertext blob.
pub async fn encrypt(
    key_id: &str,
    plaintext: &[u8],
    context: &[(&str, &str)],
) -> Result<Vec<u8>, KmsError> {
    Kms::shared()
        .await
        .encrypt(key_id, plaintext, context)
        .await
}

/// Decrypts a blob made by [`encrypt`], naming the same `key_id` (KeyId in the Decrypt
/// request, so a blob for another key is refused) and the same context.
pub async fn decrypt(
    key_id: &str,
    blob: &[u8],
    context: &[(&str, &str)],
) -> Result<Vec<u8>, KmsError> {
    Kms::shared().await.decrypt(key_id, blob, context).await
}

/// The KMS endpoint from an environment lookup: `AWS_ENDPOINT_URL_KMS` when set and not
/// empty, else none (AWS's own). `AWS_ENDPOINT_URL` is deliberately not consulted.
pub fn endpoint_from_env(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    var(ENDPOINT_VAR)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The region in a KMS key ARN (`arn:PARTITION:kms:REGION:ACCOUNT:key/ID` or `.../alias/NAME`),
/// None for a bare key id or alias name.
pub fn arn_region(key_id: &str) -> Option<&str> {
    let mut parts = key_id.splitn(6, ':');
    let (arn, _partition, service, region) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (arn == "arn" && service == "kms" && !region.is_empty() && parts.next().is_some())
        .then_some(region)
}

/// KMS clients of one configuration: one per region used, made on first use.
#[derive(Debug)]
pub struct Kms {
    /// The configuration with the chain's region (or none).
    base: aws_sdk_kms::Config,
    clients: Mutex<HashMap<Option<String>, aws_sdk_kms::Client>>,
}

impl Kms {
    /// The process's clients, configured from the environment on first use.
    pub async fn shared() -> &'static Kms {
        static SHARED: tokio::sync::OnceCell<Kms> = tokio::sync::OnceCell::const_new();
        SHARED.get_or_init(Kms::from_env).await
    }

    /// Clients configured from the environment now (the standard chain, and the endpoint
    /// from `AWS_ENDPOINT_URL_KMS` only).
    pub async fn from_env() -> Kms {
        Kms::with_endpoint(endpoint_from_env(|name| std::env::var(name).ok())).await
    }

    /// Clients for `endpoint` (None: AWS's), credentials and region from the standard chain.
    pub async fn with_endpoint(endpoint: Option<String>) -> Kms {
        let env_keys = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
            .iter()
            .all(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
        // As for S3: no TLS configuration to build for a plain-HTTP endpoint with static
        // credentials (nothing else would need one).
        let http = match &endpoint {
            Some(e) if e.starts_with("http://") && env_keys => {
                aws_smithy_http_client::Builder::new().build_http()
            }
            _ => crate::storage::https_client(),
        };
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
        if env_keys {
            loader = loader.credentials_provider(
                aws_config::environment::credentials::EnvironmentVariableCredentialsProvider::new(),
            );
        }
        let shared = loader.load().await;
        Kms {
            base: kms_config(&shared, endpoint),
            clients: Mutex::default(),
        }
    }

    /// The client for `key_id`: its ARN's region, else the chain's.
    fn client(&self, key_id: &str) -> Result<aws_sdk_kms::Client, KmsError> {
        let region = arn_region(key_id).map(str::to_owned);
        if region.is_none() && self.base.region().is_none() {
            return Err(KmsError::Other {
                key_id: key_id.to_owned(),
                detail: "no AWS region: set AWS_REGION or name the key by its ARN".into(),
            });
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let client = clients.entry(region.clone()).or_insert_with(|| {
            let mut config = self.base.to_builder();
            if let Some(region) = region {
                config = config.region(Region::new(region));
            }
            aws_sdk_kms::Client::from_conf(config.build())
        });
        Ok(client.clone())
    }

    /// [`encrypt`] with these clients.
    pub async fn encrypt(
        &self,
        key_id: &str,
        plaintext: &[u8],
        context: &[(&str, &str)],
    ) -> Result<Vec<u8>, KmsError> {
        let out = self
            .client(key_id)?
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(plaintext))
            .set_encryption_context(context_map(context))
            .send()
            .await
            .map_err(|e| classify(key_id, e))?;
        match out.ciphertext_blob {
            Some(blob) if !blob.as_ref().is_empty() => Ok(blob.into_inner()),
            _ => Err(KmsError::Other {
                key_id: key_id.to_owned(),
                detail: "Encrypt returned no ciphertext".into(),
            }),
        }
    }

    /// [`decrypt`] with these clients.
    pub async fn decrypt(
        &self,
        key_id: &str,
        blob: &[u8],
        context: &[(&str, &str)],
    ) -> Result<Vec<u8>, KmsError> {
        let out = self
            .client(key_id)?
            .decrypt()
            .key_id(key_id)
            .ciphertext_blob(Blob::new(blob))
            .set_encryption_context(context_map(context))
            .send()
            .await
            .map_err(|e| classify(key_id, e))?;
        // KMS refuses a blob of another key when KeyId is given; check what it says it used
        // too, for servers that do not (an alias cannot be checked this way).
        if let Some(used) = out.key_id.as_deref() {
            if !same_key(key_id, used) {
                return Err(KmsError::WrongKey {
                    key_id: key_id.to_owned(),
                    detail: format!("the slot was encrypted under key \"{used}\""),
                });
            }
        }
        match out.plaintext {
            Some(plain) => Ok(plain.into_inner()),
            None => Err(KmsError::Other {
                key_id: key_id.to_owned(),
                detail: "Decrypt returned no plaintext".into(),
            }),
        }
    }
}

/// The KMS client configuration from the shared one, with `endpoint` as the only endpoint
/// override: the SDK's own conversion would take `AWS_ENDPOINT_URL_KMS`, then
/// `AWS_ENDPOINT_URL`, then the profile's `endpoint_url` (and the shared config's, which is
/// `AWS_ENDPOINT_URL` again), so it is overwritten here either way.
fn kms_config(shared: &aws_types::SdkConfig, endpoint: Option<String>) -> aws_sdk_kms::Config {
    let mut b = aws_sdk_kms::config::Builder::from(shared)
        .retry_config(
            aws_sdk_kms::config::retry::RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS),
        )
        .timeout_config(
            aws_sdk_kms::config::timeout::TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
    b.set_endpoint_url(endpoint);
    b.build()
}

fn context_map(context: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    (!context.is_empty()).then(|| {
        context
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    })
}

/// Whether `used` (the key ARN KMS reports) is the key `asked` names: the same ARN, or a
/// bare key id that is the ARN's. Aliases are not resolved here and pass.
fn same_key(asked: &str, used: &str) -> bool {
    if asked == used || asked.starts_with("alias/") || asked.contains(":alias/") {
        return true;
    }
    let id = |k: &str| k.rsplit_once(":key/").map_or(k, |(_, id)| id).to_owned();
    if asked.starts_with("arn:") && used.starts_with("arn:") {
        return false;
    }
    id(asked) == id(used)
}

/// One line: a multi-line server message would break the PostgreSQL-style one-line report.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error and its sources, one line: `dispatch failure: io error: ...: connection refused`.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut at = err.source();
    while let Some(e) = at {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        at = e.source();
    }
    one_line(&text)
}

/// Classifies an SDK failure for `key_id`.
fn classify<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    key_id: &str,
    err: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
) -> KmsError {
    let key_id = key_id.to_owned();
    match &err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => KmsError::Unavailable {
            key_id,
            detail: chain(&err),
        },
        SdkError::DispatchFailure(failure) => {
            let detail = chain(&err);
            if failure.is_io() || failure.is_timeout() {
                KmsError::Unavailable { key_id, detail }
            } else {
                KmsError::Other { key_id, detail }
            }
        }
        SdkError::ServiceError(e) => {
            let status = e.raw().status().as_u16();
            let code = e.err().code().unwrap_or_default();
            let detail = one_line(&format!(
                "{} (HTTP {status}{})",
                e.err().message().unwrap_or("service error"),
                if code.is_empty() {
                    String::new()
                } else {
                    format!(", {code}")
                }
            ));
            match code {
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "IncompleteSignature"
                | "ExpiredTokenException"
                | "DisabledException"
                | "KMSInvalidStateException"
                | "InvalidKeyUsageException"
                | "InvalidGrantTokenException" => KmsError::Denied { key_id, detail },
                "NotFoundException" | "InvalidArnException" => {
                    KmsError::NotFound { key_id, detail }
                }
                "InvalidCiphertextException" | "IncorrectKeyException" => {
                    KmsError::WrongKey { key_id, detail }
                }
                "DependencyTimeoutException"
                | "KMSInternalException"
                | "KeyUnavailableException"
                | "ThrottlingException"
                | "LimitExceededException"
                | "ServiceUnavailableException"
                | "InternalFailure" => KmsError::Unavailable { key_id, detail },
                _ if status >= 500 || status == 429 => KmsError::Unavailable { key_id, detail },
                _ if status == 403 => KmsError::Denied { key_id, detail },
                _ => KmsError::Other { key_id, detail },
            }
        }
        _ => KmsError::Other {
            key_id,
            detail: chain(&err),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use aws_sdk_kms::config::interceptors::BeforeTransmitInterceptorContextRef;
    use aws_sdk_kms::config::{ConfigBag, Credentials, Intercept, RuntimeComponents};

    const DEAD_S3: &str = "http://127.0.0.1:9";
    const MOTO: &str = "http://127.0.0.1:5000";

    #[test]
    fn endpoint_only_from_the_kms_variable() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            endpoint_from_env(env(&[("AWS_ENDPOINT_URL", DEAD_S3)])),
            None
        );
        assert_eq!(
            endpoint_from_env(env(&[
                ("AWS_ENDPOINT_URL", DEAD_S3),
                ("AWS_ENDPOINT_URL_KMS", MOTO)
            ])),
            Some(MOTO.to_owned())
        );
        assert_eq!(
            endpoint_from_env(env(&[
                ("AWS_ENDPOINT_URL", DEAD_S3),
                ("AWS_ENDPOINT_URL_KMS", " ")
            ])),
            None
        );
        assert_eq!(
            endpoint_from_env(env(&[("AWS_ENDPOINT_URL_S3", DEAD_S3)])),
            None
        );
    }

    #[test]
    fn region_from_an_arn() {
        assert_eq!(
            arn_region(
                "arn:aws:kms:eu-west-3:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
            ),
            Some("eu-west-3")
        );
        assert_eq!(
            arn_region("arn:aws-us-gov:kms:us-gov-west-1:123456789012:alias/pitr"),
            Some("us-gov-west-1")
        );
        assert_eq!(arn_region("1234abcd-12ab-34cd-56ef-1234567890ab"), None);
        assert_eq!(arn_region("alias/pitr"), None);
        assert_eq!(arn_region("arn:aws:s3:::bucket"), None);
        assert_eq!(arn_region("arn:aws:kms::123:key/x"), None);
    }

    #[test]
    fn the_key_kms_used_is_the_one_asked_for() {
        let arn = "arn:aws:kms:us-east-1:123456789012:key/aaaa";
        assert!(same_key(arn, arn));
        assert!(same_key("aaaa", arn));
        assert!(!same_key("bbbb", arn));
        assert!(!same_key(
            "arn:aws:kms:us-east-1:123456789012:key/bbbb",
            arn
        ));
        assert!(same_key("alias/pitr", arn));
        assert!(same_key(
            "arn:aws:kms:us-east-1:123456789012:alias/pitr",
            arn
        ));
    }

    #[test]
    fn errors_are_one_line_and_name_the_key() {
        let e = KmsError::Unavailable {
            key_id: "k1".into(),
            detail: one_line("connection refused\n  at line 2"),
        };
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("\"k1\""), "{text}");
        assert!(e.is_unavailable() && !e.is_key_problem());
        for e in [
            KmsError::Denied {
                key_id: "k".into(),
                detail: String::new(),
            },
            KmsError::NotFound {
                key_id: "k".into(),
                detail: String::new(),
            },
            KmsError::WrongKey {
                key_id: "k".into(),
                detail: String::new(),
            },
        ] {
            assert!(e.is_key_problem(), "{e}");
            assert_eq!(e.key_id(), "k");
        }
    }

    /// Loads a config value as aws-config's environment service config does, from a fixed
    /// set of variables: `AWS_ENDPOINT_URL_<SERVICE>` first, then the global variable.
    #[derive(Debug)]
    struct FakeEnv(Vec<(&'static str, &'static str)>);

    impl aws_types::service_config::LoadServiceConfig for FakeEnv {
        fn load_config(
            &self,
            key: aws_types::service_config::ServiceConfigKey<'_>,
        ) -> Option<String> {
            let specific = format!("{}_{}", key.env(), key.service_id().to_uppercase());
            [specific.as_str(), key.env()].iter().find_map(|name| {
                self.0
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| (*v).to_owned())
            })
        }
    }

    /// Records the URI of the request about to be sent, and stops it there.
    #[derive(Debug, Default, Clone)]
    struct CaptureUri(Arc<Mutex<Option<String>>>);

    impl Intercept for CaptureUri {
        fn name(&self) -> &'static str {
            "CaptureUri"
        }
        fn read_before_transmit(
            &self,
            context: &BeforeTransmitInterceptorContextRef<'_>,
            _: &RuntimeComponents,
            _: &mut ConfigBag,
        ) -> Result<(), aws_sdk_kms::error::BoxError> {
            *self.0.lock().unwrap() = Some(context.request().uri().to_owned());
            Err("request captured".into())
        }
    }

    /// Where a Decrypt made with `config` would go.
    async fn target(config: aws_sdk_kms::Config) -> String {
        let capture = CaptureUri::default();
        let config = config.to_builder().interceptor(capture.clone()).build();
        let err = aws_sdk_kms::Client::from_conf(config)
            .decrypt()
            .key_id("k")
            .ciphertext_blob(Blob::new(b"x".to_vec()))
            .send()
            .await
            .expect_err("the interceptor stops every request");
        let uri = capture.0.lock().unwrap().clone();
        uri.unwrap_or_else(|| panic!("no request was made: {err:?}"))
    }

    /// A shared config as aws-config loads it with `vars` in the environment: the global
    /// endpoint in the shared config, service-specific ones through the service config.
    fn shared_config(vars: Vec<(&'static str, &'static str)>) -> aws_types::SdkConfig {
        let global = vars
            .iter()
            .find(|(k, _)| *k == "AWS_ENDPOINT_URL")
            .map(|(_, v)| (*v).to_owned());
        let mut b = aws_types::SdkConfig::builder()
            .region(Region::new("us-east-1"))
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .credentials_provider(aws_sdk_kms::config::SharedCredentialsProvider::new(
                Credentials::new("id", "secret", None, None, "test"),
            ))
            .service_config(FakeEnv(vars));
        b.set_endpoint_url(global);
        b.build()
    }

    #[tokio::test]
    async fn aws_endpoint_url_is_not_used_for_kms() {
        let shared = shared_config(vec![("AWS_ENDPOINT_URL", DEAD_S3)]);
        // What the SDK does by itself: the S3 server's endpoint would get the KMS calls.
        let sdk_own = target(aws_sdk_kms::Config::from(&shared)).await;
        assert!(sdk_own.starts_with(DEAD_S3), "{sdk_own}");
        // Ours: AWS's own KMS endpoint for the region.
        let ours = target(kms_config(&shared, None)).await;
        assert!(
            ours.starts_with("https://kms.us-east-1.amazonaws.com"),
            "{ours}"
        );

        let vars = vec![
            ("AWS_ENDPOINT_URL", DEAD_S3),
            ("AWS_ENDPOINT_URL_KMS", MOTO),
        ];
        let shared = shared_config(vars.clone());
        let endpoint = endpoint_from_env(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        });
        let ours = target(kms_config(&shared, endpoint)).await;
        assert!(ours.starts_with(MOTO), "{ours}");
    }
}
