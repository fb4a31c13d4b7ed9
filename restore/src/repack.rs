//! Repacking, for `pitr expire --repack-below` (docs/FORMAT.md, "Repacking"): a pack that
//! kept backups still list but whose chunks they use make up less than a threshold of it
//! has its live chunks copied into new packs (their envelopes as stored: a chunk's envelope
//! is bound to its content id, not its pack, so nothing is decrypted or re-encrypted; each
//! is checked on the way), and every kept backup that used it gets a new generation of its
//! manifest and chunk table pointing at the new places. The old generation and the old
//! pack go later, once nothing may still read them.
//!
//! Which packs are looked at: those the backups expired in this run listed that kept ones
//! list too (only those lost live chunks), and those a previous run left for later. At most
//! [`MAX_PACKS_PER_RUN`] per run, so memory (a map of the live chunks of those packs) and
//! time stay bounded whatever the repository's size.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use repo::manifest::MANIFEST_FORMAT_GENERATIONS;
use repo::manifest::{chunk_table_key_at, BackupManifest, ChunkRef, TableReader, TableWriter};
use repo::markers::Marker;
use repo::pack::{decode_chunk_of, pack_key, read_index, PackBuilder};
use repo::repository::Repository;
use repo::storage::PutMode;

/// Packs looked at in one run.
pub const MAX_PACKS_PER_RUN: usize = 1024;

/// New packs are closed once they pass this many bytes of chunks (as backups' are).
const PACK_TARGET: usize = 8 << 20;

/// The largest pack read (backups close theirs near 8 MiB; one chunk is at most 16 MiB).
const PACK_READ_MAX: u64 = 64 << 20;

/// What repacking did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Repacked {
    /// Packs whose live chunks were moved (they go once their old generations do).
    pub packs: u64,
    /// Chunks moved.
    pub chunks: u64,
    /// Bytes of chunk envelopes moved.
    pub bytes_moved: u64,
    /// Bytes of the packs moved out of (what goes once they do).
    pub bytes_freed: u64,
    /// New packs written.
    pub new_packs: u64,
    /// Backups given a new generation.
    pub backups: u64,
    /// Packs looked at and left for a later run (over the per-run limit, or in use).
    pub pending: Vec<String>,
    /// Packs not repacked because a live chunk in them is damaged (`pitr verify` says more).
    pub damaged: Vec<String>,
}

/// Why repacking failed (what it wrote is unreferenced and goes with a later expire).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RepackError(pub String);

fn err(what: impl std::fmt::Display) -> RepackError {
    RepackError(what.to_string())
}

/// A kept backup as repacking sees it.
#[derive(Debug, Clone)]
pub struct KeptBackup {
    /// Its id.
    pub id: String,
    /// Its newest generation.
    pub generation: u32,
    /// The packs that generation lists.
    pub packs: Vec<String>,
    /// Its first generation's storage time (Unix seconds).
    pub stored_at: u64,
}

/// Repacks the `candidates` (pack ids, with their stored sizes) that the `kept` backups use
/// less than `threshold` of; with `dry_run`, only says what it would do.
pub async fn repack(
    repo: &Repository,
    kept: &[KeptBackup],
    candidates: &[(String, u64)],
    threshold: f64,
    marker: Option<&Marker>,
) -> Result<Repacked, RepackError> {
    let mut out = Repacked::default();
    let (now, later) = candidates.split_at(candidates.len().min(MAX_PACKS_PER_RUN));
    out.pending = later.iter().map(|(id, _)| id.clone()).collect();
    let index: HashMap<&str, u32> = now
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i as u32))
        .collect();
    if index.is_empty() || threshold <= 0.0 {
        return Ok(out);
    }
    // The live chunks of the candidates: what a kept backup's chunk table names there.
    let users: Vec<&KeptBackup> = kept
        .iter()
        .filter(|k| k.packs.iter().any(|p| index.contains_key(p.as_str())))
        .collect();
    let mut live: HashMap<(u32, u64), u32> = HashMap::new();
    for k in &users {
        // One manifest in memory at a time.
        let m = &BackupManifest::load_header_at(repo.objects(), &k.id, k.generation)
            .await
            .map_err(err)?;
        let mut table = TableReader::new(repo.objects().clone(), m);
        for i in 0..m.chunk_table.count {
            let Some(e) = table.get(i).await.map_err(err)? else {
                break;
            };
            let pack = m.packs.get(e.pack()).ok_or_else(|| {
                err(format!(
                    "backup {}: a chunk table entry names pack {} of {}",
                    m.id,
                    e.pack,
                    m.packs.len()
                ))
            })?;
            if let Some(&c) = index.get(pack.as_str()) {
                live.insert((c, e.offset), e.stored_len);
            }
        }
    }
    // Per candidate: its live chunks (offset, envelope length) in pack order, and bytes.
    let mut by_pack: Vec<Vec<(u64, u32)>> = vec![Vec::new(); now.len()];
    for ((c, off), len) in live {
        by_pack[c as usize].push((off, len));
    }
    for offsets in &mut by_pack {
        offsets.sort_unstable();
    }
    let live_bytes: Vec<u64> = by_pack
        .iter()
        .map(|o| o.iter().map(|&(_, len)| u64::from(len)).sum())
        .collect();
    let chosen: Vec<u32> = (0..now.len() as u32)
        .filter(|&c| {
            let size = now[c as usize].1.max(1);
            live_bytes[c as usize] > 0 && (live_bytes[c as usize] as f64) < threshold * size as f64
        })
        .collect();
    if chosen.is_empty() {
        return Ok(out);
    }
    let mut is_chosen = vec![false; now.len()];
    for &c in &chosen {
        is_chosen[c as usize] = true;
    }
    let rewritten: Vec<&KeptBackup> = users
        .iter()
        .copied()
        .filter(|k| {
            k.packs.iter().any(|p| {
                index
                    .get(p.as_str())
                    .is_some_and(|&c| is_chosen[c as usize])
            })
        })
        .collect();
    let Some(marker) = marker else {
        // Dry run: what it would move.
        for &c in &chosen {
            out.packs += 1;
            out.bytes_moved += live_bytes[c as usize];
            out.bytes_freed += now[c as usize].1;
            out.chunks += by_pack[c as usize].len() as u64;
        }
        out.backups = rewritten.len() as u64;
        return Ok(out);
    };
    // Name the backups about to get a new generation; one a concurrent expire or delete is
    // removing is left alone (a new generation would bring it back half-made).
    let ids: Vec<String> = rewritten.iter().map(|k| k.id.clone()).collect();
    marker.update(|b| b.backups = ids).await.map_err(err)?;
    let condemned = marker.condemned().await.map_err(err)?;
    if !condemned.is_empty() {
        out.pending
            .extend(chosen.iter().map(|&c| now[c as usize].0.clone()));
        return Ok(out);
    }

    // Move the live chunks, a pack at a time, checking each.
    let protection = repo.objects().protection().clone();
    let options = repo.objects().options();
    let storage = repo.objects().storage().clone();
    let mut moved: HashMap<(u32, u64), (usize, repo::pack::PackEntry)> = HashMap::new();
    let mut new_packs: Vec<String> = Vec::new();
    let mut builder = PackBuilder::new();
    // Candidates whose live chunks were moved, by candidate index.
    let mut done = vec![false; now.len()];
    let mut any_done = false;
    for &c in &chosen {
        let (id, size) = &now[c as usize];
        if *size > PACK_READ_MAX {
            // Not a pack pitr writes: left as it is.
            continue;
        }
        let key = pack_key(id);
        // At most the size listed (an object replaced meanwhile by a larger one is not read
        // whole).
        let bytes = storage.get_range(&key, 0..*size).await.map_err(err)?;
        if bytes.len() as u64 != *size {
            out.damaged
                .push(format!("{key}: {} bytes read, {size} listed", bytes.len()));
            continue;
        }
        let offsets = std::mem::take(&mut by_pack[c as usize]);
        let checked = {
            let (protection, key) = (protection.clone(), key.clone());
            tokio::task::spawn_blocking(move || check_live(&bytes, &key, &offsets, &protection))
                .await
                .map_err(err)?
        };
        let chunks = match checked {
            Ok(chunks) => chunks,
            Err(why) => {
                out.damaged.push(format!("{key}: {why}"));
                continue;
            }
        };
        for (entry, envelope) in chunks {
            let at = builder.push(entry.hash, entry.plain_len, &envelope);
            moved.insert((c, entry.offset), (new_packs.len(), at));
            out.chunks += 1;
            out.bytes_moved += envelope.len() as u64;
            if builder.len() >= PACK_TARGET {
                let full = std::mem::take(&mut builder);
                new_packs.push(store_pack(repo, marker, full, options, &protection).await?);
            }
        }
        out.packs += 1;
        out.bytes_freed += size;
        done[c as usize] = true;
        any_done = true;
    }
    if !builder.is_empty() {
        new_packs.push(store_pack(repo, marker, builder, options, &protection).await?);
    }
    out.new_packs = new_packs.len() as u64;
    if !any_done {
        return Ok(out);
    }

    // A new generation of every kept backup that used a pack moved out of.
    for k in rewritten {
        if !k
            .packs
            .iter()
            .any(|p| index.get(p.as_str()).is_some_and(|&c| done[c as usize]))
        {
            continue;
        }
        new_generation(repo, marker, k, &index, &done, &moved, &new_packs).await?;
        out.backups += 1;
    }
    Ok(out)
}

/// The live chunks of a pack (`offsets`: offset and envelope length, in order), each checked: its
/// index entry agrees on the length, and its envelope opens to the chunk the index names.
fn check_live(
    pack: &Bytes,
    key: &str,
    offsets: &[(u64, u32)],
    protection: &repo::envelope::Protection,
) -> Result<Vec<(repo::pack::PackEntry, Bytes)>, String> {
    let entries = read_index(pack, key, protection).map_err(|e| e.to_string())?;
    let by_offset: BTreeMap<u64, repo::pack::PackEntry> =
        entries.into_iter().map(|e| (e.offset, e)).collect();
    let mut out = Vec::with_capacity(offsets.len());
    for &(off, len) in offsets {
        let e = by_offset
            .get(&off)
            .filter(|e| e.stored_len == len)
            .ok_or_else(|| format!("no chunk of {len} bytes at offset {off}"))?;
        let range = off as usize..(off + u64::from(len)) as usize;
        let envelope = pack.slice(range);
        decode_chunk_of(&envelope, &e.hash, u64::from(e.plain_len), protection)
            .map_err(|e| format!("chunk at offset {off}: {e}"))?;
        out.push((*e, envelope));
    }
    Ok(out)
}

/// Stops when the marker may have died unseen: another expire may then have taken what this
/// one writes for garbage.
fn still_marked(marker: &Marker) -> Result<(), RepackError> {
    if marker.lapsed() {
        return Err(err(
            "this expire's marker was not rewritten for too long; stopped before writing more",
        ));
    }
    Ok(())
}

async fn store_pack(
    repo: &Repository,
    marker: &Marker,
    builder: PackBuilder,
    options: repo::envelope::EncodeOptions,
    protection: &repo::envelope::Protection,
) -> Result<String, RepackError> {
    still_marked(marker)?;
    let pack = builder.finish(options, protection);
    // The same id is the same bytes: a pack already there (a repack killed after storing
    // it, run again) is as good.
    repo.objects()
        .storage()
        .put(&pack_key(&pack.id), pack.bytes, PutMode::IfAbsent)
        .await
        .map_err(err)?;
    crate::expire::step();
    Ok(pack.id)
}

/// Writes the next generation of `k`: its chunk table with the moved chunks repointed, a
/// piece at a time, then the manifest (put-if-absent: a generation another expire wrote
/// first stands, and what this one wrote is left to be collected).
async fn new_generation(
    repo: &Repository,
    marker: &Marker,
    k: &KeptBackup,
    index: &HashMap<&str, u32>,
    done: &[bool],
    moved: &HashMap<(u32, u64), (usize, repo::pack::PackEntry)>,
    new_packs: &[String],
) -> Result<(), RepackError> {
    let m = &BackupManifest::load_header_at(repo.objects(), &k.id, k.generation)
        .await
        .map_err(err)?;
    // The next generation number nothing is stored under yet (a repack killed before its
    // manifest left pieces under the one after this one's).
    let storage = repo.objects().storage();
    let newer = |gens: &[u32]| gens.iter().any(|&g| g > k.generation);
    let stored = repo::manifest::generations(storage.as_ref(), &m.id)
        .await
        .map_err(err)?;
    if newer(&stored) {
        return Err(err(format!(
            "backup {} got a newer generation meanwhile (another expire)",
            m.id
        )));
    }
    let next = |g: u32| {
        g.checked_add(1)
            .filter(|&g| g <= repo::manifest::GENERATION_MAX)
            .ok_or_else(|| err(format!("backup {}: no generation after {g}", m.id)))
    };
    let mut generation = next(m.generation)?;
    loop {
        let pieces = format!(
            "{}{}/chunks.{generation:010}/",
            repo::manifest::BACKUP_PREFIX,
            m.id
        );
        let taken = !storage
            .list_page(&pieces, None)
            .await
            .map_err(err)?
            .objects
            .is_empty()
            || storage
                .head(&repo::manifest::manifest_key_at(&m.id, generation))
                .await
                .map_err(err)?
                .is_some();
        if !taken {
            break;
        }
        generation = next(generation)?;
    }
    // The packs it keeps, in their order, then the new ones as they are used.
    let mut packs: Vec<String> = Vec::new();
    let mut renumber: HashMap<usize, u32> = HashMap::new();
    for (i, p) in m.packs.iter().enumerate() {
        let gone = index.get(p.as_str()).is_some_and(|&c| done[c as usize]);
        if !gone {
            renumber.insert(i, packs.len() as u32);
            packs.push(p.clone());
        }
    }
    let mut new_index: HashMap<usize, u32> = HashMap::new();
    let mut table = TableReader::new(repo.objects().clone(), m);
    let mut writer = TableWriter::new(repo.objects().protection().clone());
    let put_piece = |n: usize, piece: Bytes| {
        let key = chunk_table_key_at(&m.id, generation, n);
        async move {
            still_marked(marker)?;
            match repo.objects().put(&key, piece, PutMode::IfAbsent).await {
                Ok(repo::storage::PutOutcome::Stored) => {
                    crate::expire::step();
                    Ok(())
                }
                Ok(repo::storage::PutOutcome::AlreadyExists) => Err(err(format!(
                    "\"{key}\" was written meanwhile by another expire"
                ))),
                Err(e) => Err(err(e)),
            }
        }
    };
    for i in 0..m.chunk_table.count {
        let Some(e) = table.get(i).await.map_err(err)? else {
            return Err(err(format!("backup {}: its chunk table ends early", m.id)));
        };
        let old = m.packs.get(e.pack()).map(String::as_str).unwrap_or("");
        let entry = match index.get(old).filter(|&&c| done[c as usize]) {
            Some(&c) => {
                let (n, at) = moved.get(&(c, e.offset)).ok_or_else(|| {
                    err(format!(
                        "backup {}: chunk at {} of pack {old} was not moved",
                        m.id, e.offset
                    ))
                })?;
                // The chunk moved is the one this entry names (the pack's index was checked
                // against the chunk; this checks the index against the table).
                if at.hash != e.hash || at.plain_len != e.plain_len || at.stored_len != e.stored_len
                {
                    return Err(err(format!(
                        "backup {}: its chunk table entry {i} disagrees with pack {old}'s index; not repacked (pitr verify says more)",
                        m.id
                    )));
                }
                let pack = match new_index.get(n) {
                    Some(&p) => p,
                    None => {
                        let p = packs.len() as u32;
                        packs.push(new_packs[*n].clone());
                        new_index.insert(*n, p);
                        p
                    }
                };
                ChunkRef {
                    pack,
                    offset: at.offset,
                    stored_len: at.stored_len,
                    plain_len: at.plain_len,
                    hash: at.hash,
                }
            }
            None => ChunkRef {
                pack: *renumber
                    .get(&e.pack())
                    .ok_or_else(|| err(format!("backup {}: a pack index out of range", m.id)))?,
                ..e
            },
        };
        if let Some((n, piece)) = writer.push(&entry) {
            put_piece(n, piece).await?;
        }
    }
    let (last, chunk_table) = writer.finish();
    if let Some((n, piece)) = last {
        put_piece(n, piece).await?;
    }
    let mut next = m.clone();
    next.format = MANIFEST_FORMAT_GENERATIONS;
    next.generation = generation;
    next.stored_at = Some(k.stored_at);
    next.packs = packs;
    next.chunk_table = chunk_table;
    still_marked(marker)?;
    let stored = repo::manifest::generations(storage.as_ref(), &m.id)
        .await
        .map_err(err)?;
    if stored.iter().any(|&g| g > k.generation) {
        return Err(err(format!(
            "backup {} got a newer generation meanwhile (another expire)",
            m.id
        )));
    }
    next.store(repo.objects()).await.map_err(err)?;
    crate::expire::step();
    Ok(())
}
