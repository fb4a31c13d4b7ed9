//! Repository locations: `s3://bucket/prefix` or `file:///absolute/path`, from `--repo` or
//! `PITR_REPO`. An S3 URL may carry its own settings as query parameters
//! (`?endpoint=https://host:port&region=eu-west-1&path-style=true&profile=NAME`, and
//! `storage-class=`, `sse=`, `sse-kms-key-id=` for what it writes), which win over every
//! other source of the same setting; credentials are never taken from a URL.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoUrl {
    /// A bucket and a key prefix (possibly empty).
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix, without leading or trailing slashes.
        prefix: String,
        /// Settings given in the URL.
        options: S3Options,
    },
    /// A local directory.
    File {
        /// Its absolute path.
        path: PathBuf,
    },
}

/// S3 settings a repository URL carries for itself; each wins over the same setting from a
/// flag, the environment or a config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// `endpoint=`: the server (`http://` or `https://`, host, port).
    pub endpoint: Option<String>,
    /// `region=`.
    pub region: Option<String>,
    /// `path-style=true|false`.
    pub path_style: Option<bool>,
    /// `profile=`: the AWS profile whose credentials (and region) are used.
    pub profile: Option<String>,
    /// `storage-class=`: the S3 storage class of packs and whole WAL segments written.
    pub storage_class: Option<String>,
    /// `sse=`: server-side encryption of objects written (`AES256`, `aws:kms`,
    /// `aws:kms:dsse`).
    pub sse: Option<String>,
    /// `sse-kms-key-id=`: the KMS key of `sse=aws:kms`.
    pub sse_kms_key_id: Option<String>,
}

impl S3Options {
    fn parse(query: &str) -> Result<S3Options, &'static str> {
        let mut o = S3Options::default();
        for pair in query.split('&') {
            let (key, value) = pair
                .split_once('=')
                .ok_or("a query parameter needs a value (name=value)")?;
            let value = percent_decode(value)?;
            let set = |slot: &mut Option<String>, v: String| {
                if slot.is_some() {
                    return Err("a query parameter is given twice");
                }
                *slot = Some(v);
                Ok(())
            };
            match key {
                "endpoint" => {
                    let ok = (value.starts_with("http://") || value.starts_with("https://"))
                        && !value.contains(|c: char| c.is_whitespace() || c.is_control());
                    if !ok {
                        return Err("endpoint= must be an http:// or https:// URL");
                    }
                    if value.contains('@') {
                        return Err("credentials are never taken from a URL (no user@ in endpoint=; use profile= or the AWS chain)");
                    }
                    set(&mut o.endpoint, value)?;
                }
                "region" => {
                    let ok = !value.is_empty()
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !ok {
                        return Err("region= must be a region name (letters, digits, -)");
                    }
                    set(&mut o.region, value)?;
                }
                "path-style" => {
                    let v = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err("path-style= must be true or false"),
                    };
                    if o.path_style.replace(v).is_some() {
                        return Err("a query parameter is given twice");
                    }
                }
                "profile" => {
                    let ok = !value.is_empty()
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.+@".contains(&b));
                    if !ok {
                        return Err("profile= must be an AWS profile name");
                    }
                    set(&mut o.profile, value)?;
                }
                "storage-class" => {
                    let ok = !value.is_empty()
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                    if !ok {
                        return Err("storage-class= must be an S3 storage class (STANDARD_IA, INTELLIGENT_TIERING, ...)");
                    }
                    set(&mut o.storage_class, value)?;
                }
                "sse" => {
                    if !SSE_VALUES.contains(&value.as_str()) {
                        return Err("sse= must be AES256, aws:kms or aws:kms:dsse");
                    }
                    set(&mut o.sse, value)?;
                }
                "sse-kms-key-id" => {
                    let ok = !value.is_empty()
                        && !value.contains(|c: char| c.is_whitespace() || c.is_control());
                    if !ok {
                        return Err("sse-kms-key-id= must be a KMS key id, alias or ARN");
                    }
                    set(&mut o.sse_kms_key_id, value)?;
                }
                k if ["key", "secret", "token", "password", "credential"]
                    .iter()
                    .any(|w| k.to_ascii_lowercase().contains(w)) =>
                {
                    return Err(
                        "credentials are never taken from a URL (use profile= or the AWS chain)",
                    )
                }
                _ => return Err("unknown query parameter (endpoint, region, path-style, profile, storage-class, sse, sse-kms-key-id)"),
            }
        }
        Ok(o)
    }
}

/// Whether `value` is valid for the URL parameter `key` (the same rules as in a URL; a
/// configuration file checks its keys with them).
pub fn check_param(key: &str, value: &str) -> Result<(), &'static str> {
    S3Options::parse(&format!("{key}={}", percent_encode(value))).map(|_| ())
}

/// The server-side encryption settings S3 knows.
pub const SSE_VALUES: [&str; 3] = ["AES256", "aws:kms", "aws:kms:dsse"];

/// `%XX` escapes decoded (UTF-8).
fn percent_decode(s: &str) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or("a % escape needs two hex digits")?;
            let text = std::str::from_utf8(hex).map_err(|_| "a % escape needs two hex digits")?;
            out.push(u8::from_str_radix(text, 16).map_err(|_| "a % escape needs two hex digits")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a % escape is not UTF-8")
}

/// A query value with everything but unreserved characters and `:` `/` escaped.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Display for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = '?';
        let mut put = |f: &mut fmt::Formatter<'_>, k: &str, v: &str| {
            let r = write!(f, "{sep}{k}={}", percent_encode(v));
            sep = '&';
            r
        };
        if let Some(v) = &self.endpoint {
            put(f, "endpoint", v)?;
        }
        if let Some(v) = &self.region {
            put(f, "region", v)?;
        }
        if let Some(v) = self.path_style {
            put(f, "path-style", if v { "true" } else { "false" })?;
        }
        if let Some(v) = &self.profile {
            put(f, "profile", v)?;
        }
        if let Some(v) = &self.storage_class {
            put(f, "storage-class", v)?;
        }
        if let Some(v) = &self.sse {
            put(f, "sse", v)?;
        }
        if let Some(v) = &self.sse_kms_key_id {
            put(f, "sse-kms-key-id", v)?;
        }
        Ok(())
    }
}

/// A repository URL that does not parse; `hint` says what would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid repository URL \"{url}\": {reason}")]
pub struct RepoUrlError {
    /// The text given.
    pub url: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl RepoUrlError {
    /// What a valid URL looks like.
    pub const HINT: &'static str = "use s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH";
}

impl FromStr for RepoUrl {
    type Err = RepoUrlError;

    fn from_str(s: &str) -> Result<RepoUrl, RepoUrlError> {
        let err = |reason| RepoUrlError {
            url: s.to_owned(),
            reason,
        };
        if let Some(rest) = s.strip_prefix("s3://") {
            let (rest, options) = match rest.split_once('?') {
                Some((rest, query)) => (rest, S3Options::parse(query).map_err(err)?),
                None => (rest, S3Options::default()),
            };
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !valid_bucket {
                return Err(err("not a valid bucket name"));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                return Err(err("the prefix must not contain empty, . or .. parts"));
            }
            return Ok(RepoUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
                options,
            });
        }
        if let Some(rest) = s.strip_prefix("file://") {
            if rest.contains('?') {
                return Err(err("file:// URLs take no settings (and no ? in the path)"));
            }
            if !rest.starts_with('/') {
                return Err(err(
                    "the path must be absolute (file:///path has three slashes)",
                ));
            }
            let path = PathBuf::from(rest);
            if path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(err("the path must not contain .."));
            }
            return Ok(RepoUrl::File { path });
        }
        Err(err("unknown scheme"))
    }
}

impl RepoUrl {
    /// The location `name` below this one (a sub-prefix or sub-directory).
    pub fn join(&self, name: &str) -> RepoUrl {
        let name = name.trim_matches('/');
        match self {
            RepoUrl::S3 {
                bucket,
                prefix,
                options,
            } if prefix.is_empty() => RepoUrl::S3 {
                bucket: bucket.clone(),
                prefix: name.to_owned(),
                options: options.clone(),
            },
            RepoUrl::S3 {
                bucket,
                prefix,
                options,
            } => RepoUrl::S3 {
                bucket: bucket.clone(),
                prefix: format!("{prefix}/{name}"),
                options: options.clone(),
            },
            RepoUrl::File { path } => RepoUrl::File {
                path: path.join(name),
            },
        }
    }
}

impl RepoUrl {
    /// Whether the two locations are the same, or one lies inside the other (same server,
    /// bucket, and a prefix that contains the other's; the same or a nested directory),
    /// whatever other settings their URLs carry.
    pub fn overlaps(&self, other: &RepoUrl) -> bool {
        let nested = |a: &str, b: &str| {
            a.is_empty()
                || b.is_empty()
                || a == b
                || b.starts_with(&format!("{a}/"))
                || a.starts_with(&format!("{b}/"))
        };
        match (self, other) {
            (
                RepoUrl::S3 {
                    bucket: b1,
                    prefix: p1,
                    options: o1,
                },
                RepoUrl::S3 {
                    bucket: b2,
                    prefix: p2,
                    options: o2,
                },
            ) => b1 == b2 && o1.endpoint == o2.endpoint && nested(p1, p2),
            (RepoUrl::File { path: a }, RepoUrl::File { path: b }) => {
                let real = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                let (a, b) = (real(a), real(b));
                a.starts_with(&b) || b.starts_with(&a)
            }
            _ => false,
        }
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoUrl::S3 {
                bucket,
                prefix,
                options,
            } if prefix.is_empty() => write!(f, "s3://{bucket}{options}"),
            RepoUrl::S3 {
                bucket,
                prefix,
                options,
            } => write!(f, "s3://{bucket}/{prefix}{options}"),
            RepoUrl::File { path } => write!(f, "file://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_a_name_below() {
        let s3: RepoUrl = "s3://bkt".parse().unwrap();
        assert_eq!(s3.join("x").to_string(), "s3://bkt/x");
        assert_eq!(s3.join("x").join("y/").to_string(), "s3://bkt/x/y");
        let file: RepoUrl = "file:///r".parse().unwrap();
        assert_eq!(file.join("x").to_string(), "file:///r/x");
    }

    #[test]
    fn s3_urls_carry_their_own_settings() {
        let text = "s3://b-1/x?endpoint=https://h.example:9000&region=eu-west-1&path-style=true&profile=off%2Bsite";
        let url: RepoUrl = text.parse().unwrap();
        let RepoUrl::S3 {
            options, prefix, ..
        } = &url
        else {
            panic!()
        };
        assert_eq!(prefix, "x");
        assert_eq!(options.endpoint.as_deref(), Some("https://h.example:9000"));
        assert_eq!(options.region.as_deref(), Some("eu-west-1"));
        assert_eq!(options.path_style, Some(true));
        assert_eq!(options.profile.as_deref(), Some("off+site"));
        // Written back the same (what a restore_command names), and kept below it.
        assert_eq!(url.to_string(), text);
        let writes = "s3://b-1/x?storage-class=STANDARD_IA&sse=aws:kms&sse-kms-key-id=alias/pitr";
        let written: RepoUrl = writes.parse().unwrap();
        let RepoUrl::S3 { options, .. } = &written else {
            panic!()
        };
        assert_eq!(options.storage_class.as_deref(), Some("STANDARD_IA"));
        assert_eq!(options.sse.as_deref(), Some("aws:kms"));
        assert_eq!(options.sse_kms_key_id.as_deref(), Some("alias/pitr"));
        assert_eq!(written.to_string(), writes);
        for bad in [
            "s3://b-1/x?sse=aes",
            "s3://b-1/x?storage-class=standard",
            "s3://b-1/x?sse-kms-key-id=",
        ] {
            assert!(bad.parse::<RepoUrl>().is_err(), "{bad}");
        }
        assert_eq!(url.to_string().parse::<RepoUrl>().unwrap(), url);
        assert!(url
            .join("sub")
            .to_string()
            .starts_with("s3://b-1/x/sub?endpoint="));
        for bad in [
            "s3://b-1/x?endpoint=ftp://h",
            "s3://b-1/x?endpoint=https://AKIA:secret@h",
            "s3://b-1/x?region=eu west",
            "s3://b-1/x?path-style=yes",
            "s3://b-1/x?secret_access_key=abc",
            "s3://b-1/x?aws_access_key_id=abc",
            "s3://b-1/x?colour=blue",
            "s3://b-1/x?region=a&region=b",
            "s3://b-1/x?region",
            "s3://b-1/x?profile=%zz",
            "file:///r?endpoint=http://h",
        ] {
            assert!(bad.parse::<RepoUrl>().is_err(), "{bad}");
        }
        let e = "s3://b-1/x?aws_secret=1".parse::<RepoUrl>().unwrap_err();
        assert!(e.to_string().contains("credentials"), "{e}");
    }

    #[test]
    fn overlapping_locations_are_told_whatever_their_settings() {
        let u = |s: &str| s.parse::<RepoUrl>().unwrap();
        assert!(u("s3://b-1/x").overlaps(&u("s3://b-1/x?region=us-east-1")));
        assert!(u("s3://b-1/x").overlaps(&u("s3://b-1/x/wal")));
        assert!(u("s3://b-1").overlaps(&u("s3://b-1/y")));
        assert!(!u("s3://b-1/x").overlaps(&u("s3://b-1/xy")));
        assert!(!u("s3://b-1/x").overlaps(&u("s3://b-2/x")));
        assert!(!u("s3://b-1/x?endpoint=http://a:1").overlaps(&u("s3://b-1/x?endpoint=http://b:1")));
        assert!(u("file:///r/a").overlaps(&u("file:///r/a/b")));
        assert!(!u("file:///r/a").overlaps(&u("file:///r/ab")));
    }

    #[test]
    fn parses_both_schemes() {
        assert_eq!(
            "s3://my-bucket/pitr/prod/".parse::<RepoUrl>().unwrap(),
            RepoUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "pitr/prod".into(),
                options: S3Options::default(),
            }
        );
        assert_eq!(
            "s3://my-bucket".parse::<RepoUrl>().unwrap(),
            RepoUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new(),
                options: S3Options::default(),
            }
        );
        assert_eq!(
            "file:///var/lib/pitr".parse::<RepoUrl>().unwrap(),
            RepoUrl::File {
                path: "/var/lib/pitr".into()
            }
        );
        assert_eq!(
            "s3://b-1/x/y".parse::<RepoUrl>().unwrap().to_string(),
            "s3://b-1/x/y"
        );
    }

    #[test]
    fn rejects_what_would_surprise() {
        for bad in [
            "",
            "/tmp/x",
            "file://relative/x",
            "file:///a/../b",
            "s3://",
            "s3://UPPER/x",
            "s3://b/../x",
            "gs://b/x",
        ] {
            assert!(bad.parse::<RepoUrl>().is_err(), "{bad:?}");
        }
    }
}
