//! The repository option shared by every command that opens one, and how repository
//! failures become messages and exit codes.

use repo::envelope::EncodeOptions;
use repo::objects::ObjectError;
use repo::repository::OpenError;
use repo::url::{RepoUrl, RepoUrlError};

use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct RepoArgs {
    /// Repository: s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH
    #[arg(long, env = "PITR_REPO", value_name = "URL")]
    pub repo: String,
}

impl RepoArgs {
    /// The parsed URL, or a bad-input failure with a HINT.
    pub fn url(&self) -> Result<RepoUrl, Failure> {
        self.repo.parse().map_err(|e: RepoUrlError| {
            Failure::new(Exit::BadInput, e.to_string()).hint(RepoUrlError::HINT)
        })
    }
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

/// A repository that cannot be opened: corruption is exit 5, anything else exit 4.
pub fn open_failure(e: OpenError) -> Failure {
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
