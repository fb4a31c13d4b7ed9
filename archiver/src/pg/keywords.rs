//! What pitr does with each libpq connection keyword: the ones it uses are read by
//! `settings`; of the rest, those whose absence cannot change what a connection does or
//! whom it trusts are accepted and ignored, and those that would (another host, a client
//! certificate, a stricter check of the server) are refused by name unless their value is
//! what pitr does anyway. A keyword libpq does not know is refused, as libpq refuses it.

use super::settings::SettingsError;

/// Keywords `settings` reads itself.
pub(crate) const USED: &[&str] = &[
    "host",
    "port",
    "user",
    "password",
    "passfile",
    "dbname",
    "application_name",
    "fallback_application_name",
    "sslmode",
    "sslrootcert",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "options",
];

/// Keywords whose setting makes no difference to what pitr does.
const IGNORED: &[&str] = &[
    "client_encoding",
    "sslcompression",
    "sslsni",
    "sslpassword",
    "sslkeylogfile",
    "ssl_max_protocol_version",
    "max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "load_balance_hosts",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
];

/// Keywords accepted only with these values (what pitr does anyway); any other value
/// asks for something pitr does not do, so it is refused with the reason.
const LIMITED: &[(&str, &[&str], &str)] = &[
    (
        "replication",
        &["true", "on", "yes", "1"],
        "pitr always opens a physical replication connection",
    ),
    (
        "gssencmode",
        &["disable", "prefer"],
        "pitr does not do GSSAPI encryption",
    ),
    (
        "channel_binding",
        &["disable", "prefer"],
        "pitr does not do SCRAM channel binding",
    ),
    (
        "target_session_attrs",
        &["any"],
        "pitr does not check the server's session attributes",
    ),
    (
        "sslnegotiation",
        &["postgres"],
        "pitr asks for TLS the usual way (SSLRequest)",
    ),
    (
        "sslcertmode",
        &["disable", "allow"],
        "pitr does not send client certificates",
    ),
    (
        "ssl_min_protocol_version",
        &["TLSv1", "TLSv1.1", "TLSv1.2"],
        "pitr uses TLS 1.2 or newer",
    ),
    ("min_protocol_version", &["3.0"], "pitr speaks protocol 3.0"),
];

/// Keywords refused whatever their value, and why.
const REFUSED: &[(&str, &str)] = &[
    ("hostaddr", "pitr connects to host (name or address)"),
    ("service", "pitr does not read pg_service.conf"),
    ("servicefile", "pitr does not read pg_service.conf"),
    ("sslcert", "pitr does not send client certificates"),
    ("sslkey", "pitr does not send client certificates"),
    ("sslcrl", "pitr does not check certificate revocation lists"),
    (
        "sslcrldir",
        "pitr does not check certificate revocation lists",
    ),
    (
        "requirepeer",
        "pitr does not check the server process's user",
    ),
    (
        "require_auth",
        "pitr does not restrict the authentication method",
    ),
    ("scram_client_key", "pitr authenticates with the password"),
    ("scram_server_key", "pitr authenticates with the password"),
];

/// Whether `word` is a libpq keyword (errors quote a word only if it is: text that is not
/// may be a piece of a password that held a blank).
pub(crate) fn is_keyword(word: &str) -> bool {
    USED.contains(&word)
        || IGNORED.contains(&word)
        || LIMITED.iter().any(|(k, ..)| *k == word)
        || REFUSED.iter().any(|(k, _)| *k == word)
}

/// Checks a keyword pitr does not use: Ok to ignore it, or why it is refused. Never
/// quotes the value (it may be a secret).
pub(crate) fn check_unused(key: &str, value: &str) -> Result<(), SettingsError> {
    if IGNORED.contains(&key) || value.is_empty() {
        return Ok(());
    }
    if let Some((_, allowed, why)) = LIMITED.iter().find(|(k, ..)| *k == key) {
        if allowed.iter().any(|a| a.eq_ignore_ascii_case(value.trim())) {
            return Ok(());
        }
        return Err(SettingsError(format!(
            "connection option \"{key}\" is not supported with this value: {why}"
        )));
    }
    if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
        return Err(SettingsError(format!(
            "connection option \"{key}\" is not supported: {why}"
        )));
    }
    if key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        Err(SettingsError(format!(
            "invalid connection option \"{key}\""
        )))
    } else {
        Err(SettingsError(
            "invalid connection option (a value with blanks needs quotes: key='a b')".into(),
        ))
    }
}

/// Environment variables libpq reads for the keywords above, beside those `settings`
/// maps itself: set, they are checked like the keyword.
pub(crate) const ENV: &[(&str, &str)] = &[
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGOPTIONS", "options"),
    ("PGCLIENTENCODING", "client_encoding"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGSERVICE", "service"),
    ("PGSERVICEFILE", "servicefile"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGSSLCRL", "sslcrl"),
    ("PGSSLCRLDIR", "sslcrldir"),
    ("PGREQUIREPEER", "requirepeer"),
    ("PGREQUIREAUTH", "require_auth"),
    ("PGGSSENCMODE", "gssencmode"),
    ("PGCHANNELBINDING", "channel_binding"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGSSLNEGOTIATION", "sslnegotiation"),
    ("PGSSLCERTMODE", "sslcertmode"),
    ("PGSSLMINPROTOCOLVERSION", "ssl_min_protocol_version"),
    ("PGMINPROTOCOLVERSION", "min_protocol_version"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_keywords_are_ignored_refused_by_name_or_unknown() {
        assert!(check_unused("client_encoding", "UTF8").is_ok());
        assert!(check_unused("gssencmode", "prefer").is_ok());
        assert!(check_unused("target_session_attrs", "any").is_ok());
        assert!(check_unused("sslcert", "").is_ok());
        let e = check_unused("target_session_attrs", "read-write").unwrap_err();
        assert!(e.0.contains("\"target_session_attrs\""), "{e}");
        assert!(!e.0.contains("read-write"), "{e}");
        let e = check_unused("sslkey", "/secret/key.pem").unwrap_err();
        assert!(e.0.contains("\"sslkey\" is not supported"), "{e}");
        assert!(!e.0.contains("/secret"), "{e}");
        let e = check_unused("hots", "x").unwrap_err();
        assert_eq!(e.0, "invalid connection option \"hots\"");
        // Every keyword has one disposition.
        let mut all: Vec<&str> = USED.to_vec();
        all.extend(IGNORED);
        all.extend(LIMITED.iter().map(|(k, ..)| *k));
        all.extend(REFUSED.iter().map(|(k, _)| *k));
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        for (_, key) in ENV {
            assert!(all.contains(key), "{key}");
        }
    }
}
