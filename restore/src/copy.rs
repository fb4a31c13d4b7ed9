//! `pitr copy`: keeps a second repository (another region, another store) in step with this
//! one. Objects are copied as they are stored (an encrypted repository's stay sealed: the
//! copy has the same key slots and opens with the same keys), each checked before it is
//! copied (its envelope opened and verified, a pack's index and every chunk in it) and read
//! back from the target after, with put-if-absent: a target object that differs is damage,
//! reported, never overwritten. A backup appears in the target only once whole: its packs,
//! then its chunk table and PostgreSQL's backup_manifest, then its manifest (docs/FORMAT.md,
//! "Copies").

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use repo::envelope::Protection;
use repo::manifest::{parse_manifest_key, BackupManifest, BACKUP_PREFIX, MANIFEST_MAX};
use repo::markers::{Marker, MarkerBody};
use repo::pack::{decode_chunk_of, is_pack_id, pack_key, read_index};
use repo::repository::{storage_to_init, Repository, CONFIG_KEY};
use repo::slots::SLOTS_PREFIX;
use repo::storage::{get_bytes, list_all, ObjectMeta, PutMode, PutOutcome, Storage, StorageError};
use repo::url::RepoUrl;

use crate::expire::{WalRetention, WAL_RETENTION_KEY};

/// How copy runs.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Objects copied at once.
    pub parallel: usize,
    /// Set (by SIGTERM): no new object is started; those in flight finish.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// What a copy did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CopyReport {
    /// The target was made a copy of the source by this run.
    pub initialized: bool,
    /// Objects copied.
    pub objects: u64,
    /// Their stored bytes.
    pub bytes: u64,
    /// Of the objects copied, those the server copied itself (source and target on one
    /// server, reached with the same credentials): their bytes did not go up from here.
    pub server_side: u64,
    /// Why the server refused to copy an object itself, when it did (the bytes were copied
    /// instead, that object's and every later one's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_side_refused: Option<String>,
    /// Objects already in the target.
    pub present: u64,
    /// Backup (manifest generations) that appeared in the target.
    pub backups: u64,
    /// Objects not copied because the target's own expire removed them (backups older than
    /// its oldest, WAL its retention record says it expired).
    pub skipped: u64,
    /// Key slot sets removed from the target because the source removed them.
    pub key_sets_removed: u64,
    /// Damage found: objects of the source that do not check out, target objects that
    /// differ from the source's (by their bytes when both were written at once, else by
    /// their size). None of them was copied or overwritten.
    pub problems: Vec<String>,
    /// How far the target was behind when this pass looked: the age (by the source's
    /// storage clock against this host's) of the oldest WAL object or streamed piece the
    /// target lacked; 0 when it lacked none.
    pub lag_seconds: f64,
    /// Streamed pieces removed from the target because it holds their segment whole.
    pub pieces_removed: u64,
    /// Stopped early (SIGTERM).
    pub stopped: bool,
    /// Seconds it took.
    pub seconds: f64,
}

/// Counters of `pitr copy --follow`, for its Prometheus metrics.
#[derive(Debug, Default)]
pub struct CopyMetrics {
    /// Objects copied.
    pub objects: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// Passes that failed or found damage.
    pub errors: AtomicU64,
    /// Passes done.
    pub passes: AtomicU64,
    /// The last pass's lag, in milliseconds.
    pub lag_millis: AtomicU64,
}

impl CopyMetrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, kind, help, value) in [
            (
                "pitr_copy_lag_seconds",
                "gauge",
                "how far the target was behind at the last pass",
                format!("{:.3}", g(&self.lag_millis) as f64 / 1000.0),
            ),
            (
                "pitr_copy_objects_total",
                "counter",
                "objects copied",
                g(&self.objects).to_string(),
            ),
            (
                "pitr_copy_bytes_total",
                "counter",
                "bytes copied",
                g(&self.bytes).to_string(),
            ),
            (
                "pitr_copy_errors_total",
                "counter",
                "passes that failed or found damage",
                g(&self.errors).to_string(),
            ),
            (
                "pitr_copy_passes_total",
                "counter",
                "passes done",
                g(&self.passes).to_string(),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}

/// `pitr copy --follow`: a pass every `interval` until `o.stop` is set, each reported to
/// `on_pass` (its report, or why it failed: a failed pass is retried at the next).
pub async fn follow(
    source: &Repository,
    target: &RepoUrl,
    o: &CopyOptions,
    interval: std::time::Duration,
    metrics: &CopyMetrics,
    on_pass: &(dyn Fn(&Result<CopyReport, CopyError>) + Sync),
) {
    let stopped = || o.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    let mut state = FollowState::default();
    while !stopped() {
        let started = Instant::now();
        let result = copy_pass(source, target, o, Some(&mut state)).await;
        metrics.passes.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(r) => {
                metrics.objects.fetch_add(r.objects, Ordering::Relaxed);
                metrics.bytes.fetch_add(r.bytes, Ordering::Relaxed);
                metrics
                    .lag_millis
                    .store((r.lag_seconds * 1000.0) as u64, Ordering::Relaxed);
                if !r.problems.is_empty() {
                    metrics.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        on_pass(&result);
        // The next pass starts `interval` after this one did (at once if it took longer),
        // or when stopped.
        let until = started + interval;
        while !stopped() && Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(100).min(until - Instant::now()))
                .await;
        }
    }
}

/// Why a copy could not run (as opposed to damage it found and reported).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Listing, reading or writing failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The target is something else.
    #[error("{0}")]
    NotACopy(String),
}

impl CopyError {
    /// What the operator can do.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            CopyError::NotACopy(_) => Some(
                "copy into an empty location, or into one an earlier pitr copy made from this repository",
            ),
            CopyError::Storage(_) => Some("run copy again: it continues where it stopped"),
        }
    }
}

/// The largest pack copied (pitr closes packs near 8 MiB; one chunk is at most 16 MiB).
const PACK_MAX: u64 = 64 << 20;

/// What one object is, for the check before copying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An envelope of at most this much plaintext.
    Envelope(u64),
    /// A key slot set: a plaintext envelope whatever the repository's protection.
    SlotSet,
    /// A pack: its index and every chunk.
    Pack,
}

/// What `--follow` remembers between passes: the WAL is listed only past a key some way
/// before the end of the last listing (segments may arrive a little out of order, pushed
/// ahead in parallel), with a full listing every [`FULL_EVERY`] passes.
#[derive(Debug, Default)]
pub struct FollowState {
    wal_after: Option<String>,
    passes: u64,
}

/// Keys of the WAL listing looked at again by the next pass (`PITR_DEBUG_COPY_WINDOW`
/// overrides it for tests).
const WAL_WINDOW: usize = 2000;

/// Every so many passes, the WAL is listed whole.
pub const FULL_EVERY: u64 = 60;

fn wal_window() -> usize {
    std::env::var("PITR_DEBUG_COPY_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(WAL_WINDOW)
}

async fn list_after(
    s: &dyn Storage,
    prefix: &str,
    after: Option<&str>,
) -> Result<Vec<ObjectMeta>, StorageError> {
    match after {
        Some(a) => s.list_after(prefix, a).await,
        None => list_all(s, prefix).await,
    }
}

/// Copies `source` into the repository at `target`.
pub async fn copy(
    source: &Repository,
    target: &RepoUrl,
    o: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    copy_pass(source, target, o, None).await
}

async fn copy_pass(
    source: &Repository,
    target: &RepoUrl,
    o: &CopyOptions,
    mut state: Option<&mut FollowState>,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let mut report = CopyReport::default();
    let from = source.objects().storage().clone();
    let to = storage_to_init(target).await?;

    // The target is this repository's copy (the same config, byte for byte), or empty.
    let config = get_bytes(from.as_ref(), CONFIG_KEY).await?;
    match to.head(CONFIG_KEY).await? {
        Some(_) => {
            let theirs = get_bytes(to.as_ref(), CONFIG_KEY).await?;
            if theirs != config {
                return Err(CopyError::NotACopy(format!(
                    "{target} holds another repository (its config differs from this one's)"
                )));
            }
        }
        None => {
            // Empty, or holding only key slot sets: a first copy killed before it wrote the
            // config, or another one under way (the sets are compared with the source's
            // below); the markers of running commands and S3 probe objects aside.
            let there = list_all(to.as_ref(), "").await?;
            if there.iter().any(|o| {
                !o.key.starts_with(SLOTS_PREFIX)
                    && !o.key.starts_with(repo::markers::RUNNING_PREFIX)
                    && !o.key.starts_with(".conditional-probe/")
            }) {
                return Err(CopyError::NotACopy(format!(
                    "{target} is not empty and holds no pitr repository"
                )));
            }
            report.initialized = true;
        }
    }

    let marker = repo::markers::reader(source.objects(), "copy").await;
    // One server and one identity on both sides: the server copies (each object is still
    // read here to be checked, and read back after).
    let server_side = match (from.copy_source().await, to.copy_source().await) {
        (Some(ours), Some(theirs)) if ours.server == theirs.server => Some(ours),
        _ => None,
    };
    let copier = Copier {
        stop: o.stop.clone(),
        source,
        from: from.as_ref(),
        to: to.as_ref(),
        server_side,
        server_side_refused: Default::default(),
        refusal: Default::default(),
        copied: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        by_server: AtomicU64::new(0),
        present: AtomicU64::new(0),
    };
    let mut problems = Vec::new();

    // 1. Key slot sets (before the config, as init writes them), then the config.
    let source_sets = list_all(from.as_ref(), SLOTS_PREFIX).await?;
    if copier
        .all(&source_sets, Kind::SlotSet, o.parallel, &mut problems)
        .await?
        > 0
    {
        return Err(CopyError::NotACopy(
            "the source's key slots changed while they were copied; run copy again".into(),
        ));
    }
    let stopped = o.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    if !problems.is_empty() || stopped {
        // The config only once every slot set is there as the source has it.
        report.problems = problems;
        report.stopped = stopped;
        report.seconds = started.elapsed().as_secs_f64();
        if let Some(m) = marker {
            m.finish().await;
        }
        return Ok(report);
    }
    if report.initialized {
        copier
            .one(
                &ObjectMeta {
                    key: CONFIG_KEY.to_owned(),
                    size: config.len() as u64,
                    modified: None,
                },
                Kind::Envelope(MANIFEST_MAX),
            )
            .await
            .map_err(|e| match e {
                Problem::Storage(e) => CopyError::Storage(e),
                Problem::Damage(d) | Problem::Vanished(d) => CopyError::NotACopy(d),
            })?;
    }
    // Sets the source no longer has are gone from it on purpose (a removed key must not
    // unwrap the data key from an old set in the copy).
    let kept: HashSet<&str> = source_sets.iter().map(|o| o.key.as_str()).collect();
    let newest = source_sets.iter().map(|o| o.key.as_str()).max();
    let stale: Vec<String> = list_all(to.as_ref(), SLOTS_PREFIX)
        .await?
        .into_iter()
        .filter(|o| !kept.contains(o.key.as_str()) && newest.is_some_and(|n| o.key.as_str() < n))
        .map(|o| o.key)
        .collect();
    if !stale.is_empty() {
        to.delete(&stale).await?;
        report.key_sets_removed = stale.len() as u64;
    }

    // The backups are listed before the WAL is copied: a backup's WAL is in the source
    // before its manifest, so every backup listed here has its WAL copied below (one that
    // appears later is copied by the next run, after its WAL).
    let listing = list_all(from.as_ref(), BACKUP_PREFIX).await?;

    let theirs: HashSet<String> = list_all(to.as_ref(), BACKUP_PREFIX)
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();

    // 2. WAL and streamed pieces the target lacks, except what its own expire removed.
    let retention = match target_retention(source, to.as_ref(), &theirs).await? {
        Ok(r) => r,
        Err(why) => {
            problems.push(why);
            None
        }
    };
    // With --follow, past a key the last pass listed (all of it every FULL_EVERY passes).
    let after = state
        .as_ref()
        .filter(|s| s.passes % FULL_EVERY != 0)
        .and_then(|s| s.wal_after.clone());
    let listed = list_after(from.as_ref(), "wal/", after.as_deref()).await?;
    // Where the next pass lists from, once this one has copied everything (a pass that
    // fails leaves it where it was).
    let window = wal_window();
    let next_after = if listed.len() > window {
        Some(listed[listed.len() - window].key.clone())
    } else {
        after.clone()
    };
    if let Some(s) = state.as_mut() {
        s.passes += 1;
    }
    let mut wal = Vec::new();
    for o in listed {
        let name = o.key.rsplit('/').next().unwrap_or("");
        let expired = !o.key.starts_with("wal/history/")
            && retention.as_ref().is_some_and(|r| r.expired(name));
        if expired {
            report.skipped += 1;
        } else {
            wal.push(o);
        }
    }
    let max = crate::wal_fetch::wal_file_max(source);
    let pieces = list_all(from.as_ref(), "stream/").await?;
    // The lag: the oldest WAL object or piece the target lacks.
    let theirs_listed: std::collections::HashMap<String, u64> =
        list_after(to.as_ref(), "wal/", after.as_deref())
            .await?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
    let theirs_pieces: std::collections::HashMap<String, u64> = list_all(to.as_ref(), "stream/")
        .await?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    let mut theirs_wal: HashSet<String> = theirs_listed.keys().cloned().collect();
    theirs_wal.extend(theirs_pieces.keys().cloned());
    let oldest_missing = wal
        .iter()
        .chain(pieces.iter())
        .filter(|o| !theirs_wal.contains(&o.key))
        .filter_map(|o| o.modified)
        .min();
    report.lag_seconds = oldest_missing.map_or(0.0, |t| {
        std::time::SystemTime::now()
            .duration_since(t)
            .map_or(0.0, |d| d.as_secs_f64())
    });
    copier
        .all_known(
            &wal,
            Kind::Envelope(max),
            o.parallel,
            &mut problems,
            Some(&theirs_listed),
        )
        .await?;
    // Pieces of a segment the target holds whole are of no use there.
    let whole_there: HashSet<&str> = theirs_wal
        .iter()
        .filter(|k| k.starts_with("wal/"))
        .filter_map(|k| k.rsplit('/').next())
        .collect();
    let pieces: Vec<ObjectMeta> = pieces
        .into_iter()
        .filter(|o| {
            o.key
                .split('/')
                .nth(2)
                .is_none_or(|seg| !whole_there.contains(seg))
        })
        .collect();
    copier
        .all_known(
            &pieces,
            Kind::Envelope(max),
            o.parallel,
            &mut problems,
            Some(&theirs_pieces),
        )
        .await?;

    // 3. Backups, oldest first, each generation whole before its manifest: the packs it
    // lists, its chunk table pieces and PostgreSQL's backup_manifest, then the manifest.
    // Backups older than the target's oldest (its own expire removed them) are not brought
    // back.
    let target_oldest = theirs
        .iter()
        .filter_map(|k| parse_manifest_key(k).map(|(id, _)| id.to_owned()))
        .min();
    let expired_there = retention.is_some();
    let mut by_backup: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    for o in listing {
        if let Some((id, _)) = o
            .key
            .strip_prefix(BACKUP_PREFIX)
            .and_then(|k| k.split_once('/'))
        {
            by_backup.entry(id.to_owned()).or_default().push(o);
        }
    }
    // Both sides' packs, listed when a backup is to be copied (not on a pass with none).
    let mut packs_listed: Option<(
        BTreeMap<String, ObjectMeta>,
        std::collections::HashMap<String, u64>,
    )> = None;
    // This copy's marker in the target (a writer there), and which target backups list
    // each pack the target holds (read with the source's keys: the copy has the same).
    let target_objects = repo::objects::ObjectStore::new(
        to.clone(),
        source.objects().codec().clone(),
        source.objects().options(),
    )
    .with_protection(source.objects().protection().clone());
    // Made when a backup is to be copied (a pass with none writes nothing to the target).
    let mut writer: Option<Marker> = None;
    let mut owners: Option<std::collections::HashMap<String, Vec<String>>> = None;
    for (id, objects) in by_backup {
        let manifests: Vec<&ObjectMeta> = objects
            .iter()
            .filter(|o| parse_manifest_key(&o.key).is_some())
            .collect();
        if manifests.is_empty() {
            // Not a backup (yet): a running or failed one's pieces.
            continue;
        }
        if expired_there
            && target_oldest
                .as_ref()
                .is_some_and(|t| id.as_str() < t.as_str())
        {
            report.skipped += objects.len() as u64;
            continue;
        }
        // Generations newer than the target's newest of this backup (the target may have
        // repacked it itself: its older generations, retired there, are not brought back).
        let target_newest = theirs
            .iter()
            .filter_map(|k| {
                parse_manifest_key(k)
                    .filter(|(i, _)| *i == id)
                    .map(|(_, g)| g)
            })
            .max();
        let missing: Vec<&ObjectMeta> = manifests
            .iter()
            .copied()
            .filter(|o| !theirs.contains(&o.key))
            .filter(|o| {
                let g = parse_manifest_key(&o.key).map_or(0, |(_, g)| g);
                target_newest.is_none_or(|t| g > t)
            })
            .collect();
        let missing_gens: HashSet<u32> = missing
            .iter()
            .filter_map(|o| parse_manifest_key(&o.key).map(|(_, g)| g))
            .collect();
        if missing.is_empty() {
            copier
                .present
                .fetch_add(objects.len() as u64, Ordering::Relaxed);
            continue;
        }
        if packs_listed.is_none() {
            let here = list_all(from.as_ref(), "pack/")
                .await?
                .into_iter()
                .map(|o| (o.key.clone(), o))
                .collect();
            let there = list_all(to.as_ref(), "pack/")
                .await?
                .into_iter()
                .map(|o| (o.key, o.size))
                .collect();
            packs_listed = Some((here, there));
        }
        let Some((packs_here, packs_there)) = packs_listed.as_mut() else {
            continue;
        };
        // The packs every missing generation lists.
        let mut packs = Vec::new();
        let mut manifest_packs: Vec<String> = Vec::new();
        let mut bad = false;
        for m in &missing {
            let Some((_, g)) = parse_manifest_key(&m.key) else {
                continue;
            };
            match BackupManifest::load_header_at(source.objects(), &id, g).await {
                Ok(manifest) => {
                    manifest_packs.extend(manifest.packs.iter().cloned());
                    for p in &manifest.packs {
                        let key = pack_key(p);
                        if !is_pack_id(p) {
                            bad = true;
                            problems.push(format!("backup {id}: its manifest names pack {p:?}"));
                        } else if !packs_there.contains_key(&key) {
                            match packs_here.get(&key) {
                                Some(meta) => packs.push(meta.clone()),
                                None => {
                                    bad = true;
                                    problems.push(format!(
                                        "backup {id}: pack {key} it lists is not in the source"
                                    ));
                                }
                            }
                        }
                    }
                }
                Err(repo::manifest::ManifestError::Storage(e))
                | Err(repo::manifest::ManifestError::Object(
                    repo::objects::ObjectError::Storage(e),
                )) if !e.is_not_found() => return Err(e.into()),
                Err(e) => {
                    bad = true;
                    problems.push(format!("backup {id}: {e}"));
                }
            }
        }
        if bad {
            continue;
        }
        // Named while it is copied: in the source's markers (its expire leaves it alone
        // meanwhile; one it is removing already is not copied), and in the target's as the
        // backup being written, with the target's backups whose packs it uses too (the
        // target's expire leaves those, and what is copied ahead of the manifest, alone).
        if let Some(m) = &marker {
            if m.rely_on(vec![id.clone()], None).await.is_err() {
                continue;
            }
        }
        if writer.is_none() {
            writer = Marker::start(&target_objects, MarkerBody::new("copy"))
                .await
                .ok();
        }
        if owners.is_none() {
            let mut map: std::collections::HashMap<String, Vec<String>> =
                std::collections::HashMap::new();
            for k in &theirs {
                if let Some((tid, g)) = parse_manifest_key(k) {
                    if let Ok(m) = BackupManifest::load_header_at(&target_objects, tid, g).await {
                        for p in m.packs {
                            map.entry(p).or_default().push(tid.to_owned());
                        }
                    }
                }
            }
            owners = Some(map);
        }
        let owners_of = |p: &str| -> Vec<String> {
            owners
                .as_ref()
                .and_then(|o| o.get(p))
                .cloned()
                .unwrap_or_default()
        };
        if let Some(t) = &writer {
            let reused: Vec<String> = manifest_packs
                .iter()
                .filter(|p| packs_there.contains_key(&pack_key(p)))
                .flat_map(|p| owners_of(p))
                .collect::<std::collections::BTreeSet<String>>()
                .into_iter()
                .collect();
            let named = t
                .update(|b| {
                    b.writing = Some(id.clone());
                    b.backups = reused;
                })
                .await;
            if named.is_err() || !t.condemned().await.unwrap_or_default().is_empty() {
                continue;
            }
        }
        packs.sort_by(|a, b| a.key.cmp(&b.key));
        packs.dedup_by(|a, b| a.key == b.key);
        let before = problems.len();
        let mut gone = copier
            .all_known(
                &packs,
                Kind::Pack,
                o.parallel,
                &mut problems,
                Some(packs_there),
            )
            .await?;
        // There now (or reported): a later backup sharing one does not copy it again.
        packs_there.extend(packs.iter().map(|o| (o.key.clone(), o.size)));
        // Chunk table pieces of the generations copied, and PostgreSQL's backup_manifest.
        let rest: Vec<ObjectMeta> = objects
            .iter()
            .filter(|o| parse_manifest_key(&o.key).is_none())
            .filter(|o| {
                let rest = o
                    .key
                    .strip_prefix(BACKUP_PREFIX)
                    .and_then(|k| k.split_once('/'))
                    .map_or("", |(_, r)| r);
                crate::expire::piece_generation(rest).is_none_or(|g| missing_gens.contains(&g))
            })
            .cloned()
            .collect();
        gone += copier
            .all(
                &rest,
                Kind::Envelope(MANIFEST_MAX),
                o.parallel,
                &mut problems,
            )
            .await?;
        if problems.len() > before || gone > 0 {
            // Something of it is damaged, differs, or was removed from the source meanwhile
            // (its expire): its manifest is not copied, so the backup does not appear
            // half-made.
            continue;
        }
        // Every pack it lists is in the target now (listed again: the target's expire may
        // have run meanwhile), and the target's marker has not lapsed.
        let now_there: HashSet<String> = list_all(to.as_ref(), "pack/")
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect();
        let whole = manifest_packs
            .iter()
            .all(|p| now_there.contains(&pack_key(p)));
        if !whole || writer.as_ref().is_some_and(Marker::lapsed) {
            continue;
        }
        let mut manifests: Vec<ObjectMeta> = missing.into_iter().cloned().collect();
        manifests.sort_by_key(|o| parse_manifest_key(&o.key).map(|(_, g)| g));
        copier
            .all(&manifests, Kind::Envelope(MANIFEST_MAX), 1, &mut problems)
            .await?;
        if problems.len() == before {
            report.backups += manifests.len() as u64;
        }
    }

    // Pieces of segments the target now holds whole are of no more use there (readers
    // take the whole segment), as in the source once its stream completed them. (The
    // pieces listed at the start; segments past the same key as the WAL above.)
    let whole: HashSet<String> = list_after(to.as_ref(), "wal/", after.as_deref())
        .await?
        .into_iter()
        .filter_map(|o| o.key.rsplit('/').next().map(str::to_owned))
        .collect();
    let done: Vec<String> = theirs_pieces
        .into_keys()
        .filter(|k| k.split('/').nth(2).is_some_and(|seg| whole.contains(seg)))
        .collect();
    if !done.is_empty() {
        to.delete(&done).await?;
        report.pieces_removed = done.len() as u64;
    }
    if let Some(m) = marker {
        m.finish().await;
    }
    if let Some(w) = writer {
        w.finish().await;
    }
    report.stopped = o.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    if let Some(s) = state {
        if !report.stopped {
            s.wal_after = next_after;
        }
    }
    report.objects = copier.copied.load(Ordering::Relaxed);
    report.bytes = copier.bytes.load(Ordering::Relaxed);
    report.server_side = copier.by_server.load(Ordering::Relaxed);
    report.server_side_refused = copier.refusal.lock().ok().and_then(|mut r| r.take());
    report.present = copier.present.load(Ordering::Relaxed);
    report.problems = problems;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The target's retention record, read with the source's keys (the copy has the same):
/// `Ok(None)` when it has none; the inner `Err` says why one that is there cannot be used
/// (then nothing is left out on its word).
async fn target_retention(
    source: &Repository,
    to: &dyn Storage,
    theirs: &HashSet<String>,
) -> Result<Result<Option<WalRetention>, String>, CopyError> {
    let bytes = match get_bytes(to, WAL_RETENTION_KEY).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(Ok(None)),
        Err(e) => return Err(e.into()),
    };
    let record = match source
        .objects()
        .decode_at_most(WAL_RETENTION_KEY, bytes, 16 << 20)
        .await
    {
        Ok((_, plain)) => serde_json::from_slice::<WalRetention>(&plain).map_err(|e| e.to_string()),
        Err(repo::objects::ObjectError::Storage(e)) => return Err(e.into()),
        Err(e) => Err(e.to_string()),
    };
    let record = match record {
        Ok(r) => r,
        Err(e) => {
            return Ok(Err(format!(
                "the target's retention record cannot be used ({e}): all WAL copied"
            )))
        }
    };
    // An expire keeps all WAL from its newest backup's start on: a record saying otherwise
    // (or one in a copy with no backup) is not the target's expire's, and is not followed.
    let newest = theirs
        .iter()
        .filter_map(|k| parse_manifest_key(k).map(|(id, _)| id.to_owned()))
        .max();
    let start = match &newest {
        Some(id) => newest_start(source, to, id).await?,
        None => None,
    };
    match start {
        Some(pos) if record.wal_kept_from.as_str() <= pos.as_str() => Ok(Ok(Some(record))),
        _ => Ok(Err(
            "the target's retention record does not fit its backups: all WAL copied".into(),
        )),
    }
}

/// The segment position where the newest generation of backup `id` in the target starts.
async fn newest_start(
    source: &Repository,
    to: &dyn Storage,
    id: &str,
) -> Result<Option<String>, CopyError> {
    let g = match repo::manifest::generations(to, id).await?.pop() {
        Some(g) => g,
        None => return Ok(None),
    };
    let key = repo::manifest::manifest_key_at(id, g);
    let bytes = match get_bytes(to, &key).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Ok((_, plain)) = source
        .objects()
        .decode_at_most(&key, bytes, MANIFEST_MAX)
        .await
    else {
        return Ok(None);
    };
    let Ok(m) = BackupManifest::parse(&key, &plain) else {
        return Ok(None);
    };
    let seg = walfmt::WalSegmentSize::new(source.config().wal_segment_size).ok();
    let lsn: Option<walfmt::Lsn> = m.start_lsn.parse().ok();
    Ok(seg.zip(lsn).map(|(seg, lsn)| {
        walfmt::SegmentName::new(walfmt::TimelineId(m.timeline), lsn.segment_number(seg), seg)
            .to_string()[8..24]
            .to_owned()
    }))
}

enum Problem {
    Storage(StorageError),
    Damage(String),
    /// Removed from the source meanwhile (by its expire).
    Vanished(String),
}

struct Copier<'a> {
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    source: &'a Repository,
    from: &'a dyn Storage,
    to: &'a dyn Storage,
    /// Where the target's server can copy the source's objects from itself.
    server_side: Option<repo::storage::CopySource>,
    /// Set once the server refused a copy of its own.
    server_side_refused: std::sync::atomic::AtomicBool,
    refusal: std::sync::Mutex<Option<String>>,
    copied: AtomicU64,
    bytes: AtomicU64,
    by_server: AtomicU64,
    present: AtomicU64,
}

impl Copier<'_> {
    /// Copies `objects` (`parallel` at once); damage goes to `problems`, a storage failure
    /// stops the copy.
    async fn all(
        &self,
        objects: &[ObjectMeta],
        kind: Kind,
        parallel: usize,
        problems: &mut Vec<String>,
    ) -> Result<u64, CopyError> {
        self.all_known(objects, kind, parallel, problems, None)
            .await
    }

    /// [`Copier::all`] with what the target holds of them already listed (`known`).
    async fn all_known(
        &self,
        objects: &[ObjectMeta],
        kind: Kind,
        parallel: usize,
        problems: &mut Vec<String>,
        known: Option<&std::collections::HashMap<String, u64>>,
    ) -> Result<u64, CopyError> {
        let theirs: std::borrow::Cow<'_, std::collections::HashMap<String, u64>> =
            match (objects.first(), known) {
                (None, _) => return Ok(0),
                (Some(_), Some(k)) => std::borrow::Cow::Borrowed(k),
                (Some(_), None) => std::borrow::Cow::Owned({
                    // One listing of the target per kind of object, not a HEAD each.
                    let prefix = common_prefix(objects);
                    list_all(self.to, &prefix)
                        .await?
                        .into_iter()
                        .map(|o| (o.key, o.size))
                        .collect()
                }),
            };
        // An object already there was read back when it was copied; one of another size
        // than the source's is not the same object. (Other differences are for verify on
        // the target.)
        let mut todo: Vec<&ObjectMeta> = Vec::new();
        for o in objects {
            match theirs.get(&o.key) {
                None => todo.push(o),
                Some(&size) if size == o.size => {
                    self.present.fetch_add(1, Ordering::Relaxed);
                }
                Some(&size) => problems.push(format!(
                    "object \"{}\" in the target differs from the source's ({size} bytes there, {} here); not overwritten",
                    o.key, o.size
                )),
            }
        }
        let stop = self.stop.clone();
        let mut results = futures::stream::iter(todo)
            .take_while(move |_| {
                std::future::ready(!stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)))
            })
            .map(|o| self.one(o, kind))
            .buffer_unordered(parallel.max(1));
        let mut vanished = 0;
        while let Some(r) = results.next().await {
            match r {
                Ok(()) => {}
                Err(Problem::Damage(d)) => problems.push(d),
                Err(Problem::Vanished(_)) => vanished += 1,
                Err(Problem::Storage(e)) => return Err(e.into()),
            }
        }
        Ok(vanished)
    }

    /// Copies one object: read, checked, stored if absent, read back.
    async fn one(&self, o: &ObjectMeta, kind: Kind) -> Result<(), Problem> {
        let key = o.key.as_str();
        // Read no more than the object may hold, and what the listing said it holds.
        let limit = match kind {
            Kind::Envelope(max) => max.saturating_add(max / 64).saturating_add(64 << 10),
            Kind::SlotSet => 1 << 20,
            Kind::Pack => PACK_MAX,
        };
        if o.size > limit {
            return Err(Problem::Damage(format!(
                "object \"{key}\" in the source is {} bytes, more than such an object can be; not copied",
                o.size
            )));
        }
        let read = match self.from.get_range(key, 0..o.size.saturating_add(1)).await {
            Ok(b) if b.len() as u64 == o.size => Ok(b),
            // Rewritten since the listing (a marker's kind of object): read whole next pass.
            Ok(b) => Err(Problem::Damage(format!(
                "object \"{key}\" in the source changed size while it was copied ({} bytes listed, {} read); not copied",
                o.size,
                b.len()
            ))),
            Err(e) => Err(Problem::Storage(e)),
        };
        let bytes = match read {
            Ok(b) => b,
            Err(Problem::Storage(e)) if e.is_not_found() => {
                // Gone from the source since the listing (an expire there): nothing to copy
                // of it; a backup that needed it is not copied (see `all`).
                return Err(Problem::Vanished(o.key.clone()));
            }
            Err(p) => return Err(p),
        };
        self.check(key, &bytes, kind).await?;
        let by_server = match &self.server_side {
            Some(from) if !self.server_side_refused.load(Ordering::Relaxed) => {
                match self.to.copy_from(from, key, PutMode::IfAbsent).await {
                    Ok(done) => done,
                    Err(e) if e.is_not_found() => return Err(Problem::Vanished(o.key.clone())),
                    // Refused (a bucket policy that lets this identity read and write but
                    // not copy): the bytes are copied, for the rest of the pass too.
                    Err(e) if e.kind == repo::storage::ErrorKind::Permanent => {
                        if !self.server_side_refused.swap(true, Ordering::Relaxed) {
                            if let Ok(mut why) = self.refusal.lock() {
                                *why = Some(e.to_string());
                            }
                        }
                        None
                    }
                    Err(e) => return Err(Problem::Storage(e)),
                }
            }
            _ => None,
        };
        let stored = match by_server {
            Some(outcome) => Ok(outcome),
            None => self.to.put(key, bytes.clone(), PutMode::IfAbsent).await,
        };
        match stored {
            Ok(PutOutcome::Stored) => {}
            Ok(PutOutcome::AlreadyExists) => {
                let theirs = self
                    .to
                    .get_range(key, 0..bytes.len() as u64 + 1)
                    .await
                    .map_err(Problem::Storage)?;
                if theirs != bytes {
                    return Err(Problem::Damage(format!(
                        "object \"{key}\" in the target differs from the source's; not overwritten"
                    )));
                }
                self.present.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => return Err(Problem::Storage(e)),
        }
        let back = self
            .to
            .get_range(key, 0..bytes.len() as u64 + 1)
            .await
            .map_err(Problem::Storage)?;
        if back != bytes {
            // This run stored it (put-if-absent said so): not what was checked (the source
            // object changed between the read and a server-side copy, or the target
            // mangled it), so it goes, and the next pass copies it again.
            let _ = self.to.delete(&[key.to_owned()]).await;
            return Err(Problem::Damage(format!(
                "object \"{key}\" reads back from the target other than it was written (removed again)"
            )));
        }
        let n = self.copied.fetch_add(1, Ordering::SeqCst) + 1;
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if by_server.is_some() {
            self.by_server.fetch_add(1, Ordering::Relaxed);
        }
        // Test hook, not for users: `PITR_DEBUG_COPY_STOP=N` SIGKILLs the process once N
        // objects are copied.
        if std::env::var("PITR_DEBUG_COPY_STOP").is_ok_and(|v| v == n.to_string()) {
            let me = rustix::process::getpid();
            let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
        }
        Ok(())
    }

    /// Checks an object of the source before it is copied: an envelope opens (with the
    /// source's keys when encrypted) to the plaintext its header names; a pack's index and
    /// every chunk in it do.
    async fn check(&self, key: &str, bytes: &Bytes, kind: Kind) -> Result<(), Problem> {
        let damage = |e: &dyn std::fmt::Display| {
            Problem::Damage(format!(
                "object \"{key}\" in the source is damaged: {e}; not copied"
            ))
        };
        match kind {
            Kind::Envelope(max) => {
                match self
                    .source
                    .objects()
                    .decode_at_most(key, bytes.clone(), max)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(repo::objects::ObjectError::Storage(e)) => Err(Problem::Storage(e)),
                    Err(e) => Err(damage(&e)),
                }
            }
            Kind::SlotSet => repo::envelope::decode_at_most(bytes, 1 << 20)
                .map(|_| ())
                .map_err(|e| damage(&e)),
            Kind::Pack => {
                let protection: Protection = self.source.objects().protection().clone();
                let (bytes, key) = (bytes.clone(), key.to_owned());
                let checked = tokio::task::spawn_blocking(move || {
                    let entries =
                        read_index(&bytes, &key, &protection).map_err(|e| e.to_string())?;
                    for e in entries {
                        let range =
                            e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize;
                        decode_chunk_of(
                            &bytes[range],
                            &e.hash,
                            u64::from(e.plain_len),
                            &protection,
                        )
                        .map_err(|x| format!("chunk at offset {}: {x}", e.offset))?;
                    }
                    Ok::<(), String>(())
                })
                .await
                .map_err(|e| damage(&e))?;
                checked.map_err(|e| damage(&e))
            }
        }
    }
}

/// The longest `/`-ending prefix all keys share (for one listing of the target).
fn common_prefix(objects: &[ObjectMeta]) -> String {
    let first = objects.first().map(|o| o.key.as_str()).unwrap_or("");
    let mut prefix = first.rsplit_once('/').map_or("", |(p, _)| p).to_owned();
    for o in objects {
        while !o.key.starts_with(&format!("{prefix}/")) && !prefix.is_empty() {
            prefix = prefix.rsplit_once('/').map_or("", |(p, _)| p).to_owned();
        }
    }
    if prefix.is_empty() {
        prefix
    } else {
        format!("{prefix}/")
    }
}
