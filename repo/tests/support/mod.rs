//! Shared by the repo crate's test binaries.

use repo::storage::S3Settings;

/// Settings that reach the test bed's S3 server (or the external one it names).
pub fn s3_settings(server: &testbed::S3Server) -> S3Settings {
    let mut settings = S3Settings::new(server.bucket(), server.prefix());
    settings.endpoint = Some(server.endpoint().to_owned());
    settings.region = Some(server.region().to_owned());
    settings.path_style = true;
    settings.cache_dir = None;
    settings.credentials = Some((
        server.access_key().to_owned(),
        server.secret_key().to_owned(),
    ));
    settings
}
