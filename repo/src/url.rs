//! Repository locations: `s3://bucket/prefix` or `file:///absolute/path`, from `--repo` or
//! `PITR_REPO`.

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
    },
    /// A local directory.
    File {
        /// Its absolute path.
        path: PathBuf,
    },
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
            });
        }
        if let Some(rest) = s.strip_prefix("file://") {
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
            RepoUrl::S3 { bucket, prefix } if prefix.is_empty() => RepoUrl::S3 {
                bucket: bucket.clone(),
                prefix: name.to_owned(),
            },
            RepoUrl::S3 { bucket, prefix } => RepoUrl::S3 {
                bucket: bucket.clone(),
                prefix: format!("{prefix}/{name}"),
            },
            RepoUrl::File { path } => RepoUrl::File {
                path: path.join(name),
            },
        }
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RepoUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
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
    fn parses_both_schemes() {
        assert_eq!(
            "s3://my-bucket/pitr/prod/".parse::<RepoUrl>().unwrap(),
            RepoUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "pitr/prod".into()
            }
        );
        assert_eq!(
            "s3://my-bucket".parse::<RepoUrl>().unwrap(),
            RepoUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
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
