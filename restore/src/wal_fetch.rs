//! `wal-fetch`: one WAL file out of the repository for PostgreSQL's restore_command. The
//! file reaches its destination whole and verified, or not at all: it is written to a temp
//! file beside it, fsynced, renamed into place, and the directory fsynced. Only an object
//! that is really absent is reported as missing; every other failure is an error, so that
//! recovery stops instead of ending early with WAL left behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use repo::codec::Codec;
use repo::keys::wal_key;
use repo::objects::ObjectError;
use repo::repository::{OpenError, Repository};
use repo::url::RepoUrl;

/// Why a fetch did not deliver the file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The repository holds no such file (the only "not found").
    #[error("WAL file {0} is not in the repository")]
    NotFound(String),
    /// The name is not a WAL file name.
    #[error("\"{0}\" is not a WAL file name")]
    BadName(String),
    /// The repository cannot be used.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Reading failed or the object is damaged.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// Writing the destination failed.
    #[error("could not write \"{path}\": {source}")]
    Write {
        /// The destination.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes `bytes` at `dest` atomically and durably.
fn write_atomically(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.pitr-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fetches WAL file `name` from the repository at `url` into `dest`.
pub async fn fetch(
    url: &RepoUrl,
    name: &str,
    dest: &Path,
    codec: Arc<Codec>,
) -> Result<(), FetchError> {
    let key = wal_key(name).ok_or_else(|| FetchError::BadName(name.to_owned()))?;
    let repo = Repository::open(url, None, codec).await?;
    let (_, plain) = match repo.objects().get(&key).await {
        Ok(found) => found,
        Err(e) if e.is_not_found() => return Err(FetchError::NotFound(name.to_owned())),
        Err(e) => return Err(e.into()),
    };
    let dest = dest.to_owned();
    let shown = dest.display().to_string();
    tokio::task::spawn_blocking(move || write_atomically(&dest, &plain))
        .await
        .map_err(|e| FetchError::Write {
            path: shown.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| FetchError::Write {
            path: shown,
            source,
        })
}
