//! Key wrapping with KMS against a real KMS-compatible server (moto's, from the test bed):
//! a data key goes in and comes back out, the wrong context or key is refused as a key
//! problem, the S3 endpoint variable is not used for KMS, and a dead or silent KMS
//! endpoint fails as unavailable within bounded time.
//!
//! One test function: it sets the process environment as a pitr process would have it,
//! which other tests running at the same time in this process must not see half-changed.

use std::time::{Duration, Instant};

use repo::kms::{self, Kms, KmsError};
use testbed::KmsServer;

/// Where `AWS_ENDPOINT_URL` (the S3 server's, in pitr's setups) points: nothing listens.
const DEAD: &str = "http://127.0.0.1:9";

#[tokio::test]
async fn kms_wraps_and_opens_the_data_key() {
    let server = KmsServer::start().expect("start moto's KMS server");
    let key = server.create_key().expect("create a key");
    let other = server.create_key().expect("create another key");
    for (name, value) in server.env() {
        std::env::set_var(name, value);
    }
    std::env::set_var("AWS_ENDPOINT_URL", DEAD);

    let data_key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let context = [("pitr-repository", "0f3c9a"), ("pitr-slot", "kms-1")];

    // Round trip, with AWS_ENDPOINT_URL dead: only AWS_ENDPOINT_URL_KMS is used.
    let blob = kms::encrypt(&key, &data_key, &context)
        .await
        .expect("encrypt under moto's key");
    assert!(blob.len() > data_key.len(), "blob of {} bytes", blob.len());
    assert!(!blob.windows(32).any(|w| w == data_key.as_slice()));
    let opened = kms::decrypt(&key, &blob, &context)
        .await
        .expect("decrypt with the same key and context");
    assert_eq!(opened, data_key);

    // The same key named by its bare id (region from AWS_REGION).
    let bare = key.rsplit_once(":key/").unwrap().1;
    assert_eq!(kms::decrypt(bare, &blob, &context).await.unwrap(), data_key);

    // How long one Decrypt round trip takes (the client and connection are warm).
    let rounds = 20;
    let started = Instant::now();
    for _ in 0..rounds {
        kms::decrypt(&key, &blob, &context).await.unwrap();
    }
    eprintln!(
        "one KMS decrypt round trip against moto: {:.1?}",
        started.elapsed() / rounds
    );

    // Another encryption context: refused, a key problem naming the key.
    let err = kms::decrypt(&key, &blob, &[("pitr-repository", "another")])
        .await
        .expect_err("another context must not open the blob");
    assert!(err.is_key_problem(), "{err}");
    assert!(err.to_string().contains(&key), "{err}");
    assert!(!err.to_string().contains('\n'), "{err}");
    eprintln!("wrong context: {err}");
    let err = kms::decrypt(&key, &blob, &[])
        .await
        .expect_err("no context must not open the blob");
    assert!(err.is_key_problem(), "{err}");

    // Another key: refused.
    let err = kms::decrypt(&other, &blob, &context)
        .await
        .expect_err("another key must not open the blob");
    assert!(err.is_key_problem(), "{err}");
    assert!(err.to_string().contains(&other), "{err}");
    eprintln!("wrong key: {err}");

    // A key that does not exist.
    let missing = format!(
        "{}:key/00000000-0000-4000-8000-000000000000",
        key.rsplit_once(":key/").unwrap().0
    );
    let err = kms::encrypt(&missing, &data_key, &context)
        .await
        .expect_err("no such key");
    assert!(matches!(err, KmsError::NotFound { .. }), "{err}");
    eprintln!("missing key: {err}");

    // KMS endpoint dead (nothing listens): unavailable, quickly, not a key problem.
    std::env::set_var("AWS_ENDPOINT_URL_KMS", DEAD);
    std::env::set_var("AWS_ENDPOINT_URL", server.endpoint());
    let dead = Kms::from_env().await;
    let started = Instant::now();
    let err = dead
        .decrypt(&key, &blob, &context)
        .await
        .expect_err("nothing listens there");
    let took = started.elapsed();
    assert!(matches!(err, KmsError::Unavailable { .. }), "{err}");
    assert!(!err.is_key_problem(), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    eprintln!("dead endpoint after {took:.1?}: {err}");

    // KMS endpoint silent (accepts, never answers): unavailable within the overall bound.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_kms =
        Kms::with_endpoint(Some(format!("http://{}", silent.local_addr().unwrap()))).await;
    let started = Instant::now();
    let err = silent_kms
        .decrypt(&key, &blob, &context)
        .await
        .expect_err("nothing answers there");
    let took = started.elapsed();
    assert!(matches!(err, KmsError::Unavailable { .. }), "{err}");
    assert!(
        took < kms::OPERATION_TIMEOUT + Duration::from_secs(5),
        "took {took:?}"
    );
    eprintln!("silent endpoint after {took:.1?}: {err}");
}
