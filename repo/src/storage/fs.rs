//! Filesystem storage: the embedded default for local use and demos. A put writes a temp
//! file beside the target, fsyncs it, then renames it into place (or, for put-if-absent,
//! hard-links it, which fails atomically when the name is taken) and fsyncs the directory:
//! after a crash at any point, a key holds the old object or the new one, never a part.

use std::io::{ErrorKind as IoKind, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{
    check_key, page_of, ByteStream, ErrorKind, ListPage, ObjectMeta, PutMode, PutOutcome, Storage,
    StorageError,
};

/// Prefix of temp files; never listed, never a valid object.
const TMP_PREFIX: &str = ".tmp-";
/// Read size of streamed gets.
const READ_CHUNK: usize = 1 << 20;

/// Objects as files under a root directory.
#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
}

fn io_err(op: &'static str, key: &str, e: std::io::Error) -> StorageError {
    let kind = match e.kind() {
        IoKind::NotFound => ErrorKind::NotFound,
        IoKind::Interrupted | IoKind::WouldBlock | IoKind::TimedOut => ErrorKind::Transient,
        _ => ErrorKind::Permanent,
    };
    StorageError::new(kind, op, key, e)
}

fn blocking_err(op: &'static str, key: &str, e: tokio::task::JoinError) -> StorageError {
    StorageError::new(ErrorKind::Permanent, op, key, e)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn temp_name(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        "{TMP_PREFIX}{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Moves a synced temp file into place and syncs the directory.
fn publish(tmp: &Path, path: &Path, mode: PutMode) -> std::io::Result<PutOutcome> {
    let outcome = match mode {
        PutMode::Overwrite => {
            std::fs::rename(tmp, path)?;
            PutOutcome::Stored
        }
        PutMode::IfAbsent => {
            let linked = std::fs::hard_link(tmp, path);
            std::fs::remove_file(tmp)?;
            match linked {
                Ok(()) => PutOutcome::Stored,
                Err(e) if e.kind() == IoKind::AlreadyExists => {
                    return Ok(PutOutcome::AlreadyExists)
                }
                Err(e) => return Err(e),
            }
        }
    };
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(outcome)
}

/// Creates `dir` and any missing parents below `root` (mode 0700 whatever the umask),
/// syncing each parent that gained one. `root` itself is never created here: a missing
/// root (a typo, an unmounted mount point) is an error, not a new repository.
fn make_dirs(root: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if !root.is_dir() {
        return Err(std::io::Error::new(
            IoKind::NotFound,
            format!("repository directory \"{}\" does not exist", root.display()),
        ));
    }
    if let Some(parent) = dir.parent() {
        if parent != root && parent.starts_with(root) {
            make_dirs(root, parent)?;
        }
        match private_dir(dir) {
            Ok(()) => sync_dir(parent)?,
            Err(e) if e.kind() == IoKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes directory `dir`, mode 0700 whatever the umask.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Creates file `path` for writing (truncated), mode 0600 whatever the umask.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

impl FsStorage {
    /// Storage rooted at `root`. Nothing is created: a root that does not exist reads as
    /// empty and refuses writes (only `pitr init` makes one, with [`FsStorage::create`]).
    pub fn new(root: impl Into<PathBuf>) -> Result<FsStorage, StorageError> {
        Ok(FsStorage { root: root.into() })
    }

    /// Storage rooted at `root`, which is created (mode 0700) if missing; its parent must
    /// exist, so a mount point that is not mounted is not papered over.
    pub fn create(root: impl Into<PathBuf>) -> Result<FsStorage, StorageError> {
        let root = root.into();
        let shown = root.display().to_string();
        match private_dir(&root) {
            Ok(()) => {
                if let Some(parent) = root.parent() {
                    sync_dir(parent).map_err(|e| io_err("create", &shown, e))?;
                }
            }
            Err(e) if e.kind() == IoKind::AlreadyExists && root.is_dir() => {}
            Err(e) => return Err(io_err("create", &shown, e)),
        }
        Ok(FsStorage { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf, StorageError> {
        check_key(op, key)?;
        Ok(self.root.join(key))
    }
}

/// Every file below `dir` as a key relative to `root`, skipping temp files.
fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == IoKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let key = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let ty = entry.file_type()?;
        if ty.is_dir() {
            // Only descend where keys can still match the prefix.
            let as_prefix = format!("{key}/");
            if as_prefix.starts_with(prefix) || prefix.starts_with(&as_prefix) {
                walk(root, &path, prefix, out)?;
            }
        } else if ty.is_file() && key.starts_with(prefix) {
            let meta = entry.metadata()?;
            out.push(ObjectMeta {
                key,
                size: meta.len(),
                modified: meta.modified().ok(),
            });
        }
    }
    Ok(())
}

#[async_trait]
impl Storage for FsStorage {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StorageError> {
        let path = self.path("put", key)?;
        let root = self.root.clone();
        let k = key.to_owned();
        tokio::task::spawn_blocking(move || -> std::io::Result<PutOutcome> {
            let dir = path.parent().unwrap_or(&root).to_owned();
            make_dirs(&root, &dir)?;
            let tmp = temp_name(&path);
            let write = (|| {
                let mut f = private_file(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()
            })();
            if let Err(e) = write {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            publish(&tmp, &path, mode)
        })
        .await
        .map_err(|e| blocking_err("put", &k, e))?
        .map_err(|e| io_err("put", key, e))
    }

    async fn put_stream(
        &self,
        key: &str,
        mut body: ByteStream,
        _size: Option<u64>,
        mode: PutMode,
    ) -> Result<PutOutcome, StorageError> {
        let path = self.path("put", key)?;
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        let (root, d) = (self.root.clone(), dir.clone());
        tokio::task::spawn_blocking(move || make_dirs(&root, &d))
            .await
            .map_err(|e| blocking_err("put", key, e))?
            .map_err(|e| io_err("put", key, e))?;
        let tmp = temp_name(&path);
        let written: Result<(), StorageError> = async {
            let t = tmp.clone();
            let f = tokio::task::spawn_blocking(move || private_file(&t))
                .await
                .map_err(|e| blocking_err("put", key, e))?
                .map_err(|e| io_err("put", key, e))?;
            let mut f = tokio::fs::File::from_std(f);
            while let Some(chunk) = body.next().await {
                f.write_all(&chunk?)
                    .await
                    .map_err(|e| io_err("put", key, e))?;
            }
            f.sync_all().await.map_err(|e| io_err("put", key, e))
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::task::spawn_blocking(move || publish(&tmp, &path, mode))
            .await
            .map_err(|e| blocking_err("put", key, e))?
            .map_err(|e| io_err("put", key, e))
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StorageError> {
        let path = self.path("get", key)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_err("get", key, e))?;
        let key = key.to_owned();
        let stream = futures::stream::unfold(Some(file), move |file| {
            let key = key.clone();
            async move {
                let mut file = file?;
                let mut buf = vec![0u8; READ_CHUNK];
                match file.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Bytes::from(buf)), Some(file)))
                    }
                    Err(e) => Some((Err(io_err("get", &key, e)), None)),
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        let path = self.path("get", key)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_err("get", key, e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| io_err("get", key, e))?
            .len();
        let end = range.end.min(size);
        let start = range.start.min(end);
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| io_err("get", key, e))?;
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact(&mut buf)
            .await
            .map_err(|e| io_err("get", key, e))?;
        Ok(Bytes::from(buf))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let path = self.path("head", key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: m.len(),
                modified: m.modified().ok(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == IoKind::NotFound => Ok(None),
            Err(e) => Err(io_err("head", key, e)),
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> Result<ListPage, StorageError> {
        Ok(page_of(self.list(prefix).await?, token.as_deref()))
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let mut paths = Vec::with_capacity(keys.len());
        for key in keys {
            paths.push((key.clone(), self.path("delete", key)?));
        }
        // One blocking task for the batch, not one per file.
        tokio::task::spawn_blocking(move || {
            for (key, path) in paths {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == IoKind::NotFound => {}
                    Err(e) => return Err(io_err("delete", &key, e)),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| blocking_err("delete", keys.first().map_or("", String::as_str), e))?
    }

    /// One walk of the tree, not one per page.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let root = self.root.clone();
        let p = prefix.to_owned();
        let mut objects = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root, &root, &p, &mut out).map(|()| out)
        })
        .await
        .map_err(|e| blocking_err("list", prefix, e))?
        .map_err(|e| io_err("list", prefix, e))?;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }
}
