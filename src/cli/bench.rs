//! `pitr bench wal-push`: archives a directory of real WAL segments the way PostgreSQL's
//! archiver does (one archive_command call per segment, in order, each file marked `.ready`
//! until its call succeeds), with pitr at several push-ahead levels and with any other
//! archive command beside it, and reports segments/s, MB/s, compression and CPU per segment
//! for each, plus the ratio of pitr to each peer measured in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use repo::repository::storage_for;
use repo::storage::list_all;
use repo::url::RepoUrl;
use serde_json::json;

use super::repo_args::{CompressArgs, RepoArgs};
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Archive real WAL segments as PostgreSQL's archiver would, with pitr and with peers
    WalPush(Box<WalPushArgs>),
    /// Make a synthetic file:// repository of many backups and WAL segments, one backup a
    /// day back from now, for timing expire (benches/expire.sh)
    #[command(hide = true)]
    SynthRepo(SynthArgs),
}

#[derive(Debug, clap::Args)]
struct SynthArgs {
    /// The directory to create the repository in (must not exist)
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Backups, one a day
    #[arg(long, default_value_t = 1000)]
    backups: u64,
    /// WAL segments (16 MiB each as named; a few bytes each as stored: expire never reads them)
    #[arg(long, default_value_t = 100_000)]
    segments: u64,
}

#[derive(Debug, clap::Args)]
struct WalPushArgs {
    /// Each pitr run stores into a fresh location below this one, removed afterwards
    #[command(flatten)]
    repo: RepoArgs,
    /// A directory of WAL segments (24-hex-digit names), such as an archive written by cp
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Only the first N segments
    #[arg(long, value_name = "N")]
    segments: Option<usize>,
    /// One pitr run per push-ahead level (wal-push --ahead)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,8",
        value_name = "N,..."
    )]
    ahead: Vec<usize>,
    /// Files pitr reads, compresses and uploads at once [default: twice the cores]
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    #[command(flatten)]
    compress: CompressArgs,
    /// One pitr run per push-ahead level and repository encryption: none (plaintext), file
    /// (a key file), passphrase (PITR_PASSPHRASE, Argon2id at every process that opens the
    /// key); encrypted runs are also reported as a ratio to the plaintext run
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none",
        value_name = "none|file|passphrase,..."
    )]
    encryption: Vec<String>,
    /// Another archive command run over the same segments, as NAME=COMMAND; %p and %f as in
    /// archive_command, run from the staging data directory. May be given several times
    #[arg(long = "peer", value_name = "NAME=COMMAND")]
    peers: Vec<String>,
    /// Staging data directory: each run gets a fresh pg_wal there with the segments marked
    /// ready [default: a temp dir]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Keep what the pitr runs stored
    #[arg(long)]
    keep: bool,
    /// Print the results as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    match args.what {
        What::WalPush(args) => wal_push(*args),
        What::SynthRepo(args) => synth_repo(args),
    }
}

/// A synthetic repository: `config` (plaintext), `segments` WAL files spread evenly over
/// `backups` days, one backup a day (its manifest, a chunk table-less file list, a pack of
/// its own), each object's modification time the day it stands for, so that expire sees
/// them as stored then.
fn synth_repo(a: SynthArgs) -> Result<(), Failure> {
    use repo::manifest::{BackupManifest, ChunkTable, CHUNKS_PER_PIECE, MANIFEST_FORMAT};
    use std::sync::Arc;
    let fail = |e: &dyn std::fmt::Display| Failure::new(Exit::BadInput, format!("synth-repo: {e}"));
    let url: RepoUrl = format!("file://{}", a.to.display())
        .parse()
        .map_err(|e: repo::url::RepoUrlError| fail(&e))?;
    let seg = walfmt::WalSegmentSize::new(16 << 20).map_err(|e| fail(&e))?;
    let identity = repo::repository::ClusterIdentity {
        system_identifier: 7_000_000_000_000_000_001,
        pg_version: 15,
        wal_segment_size: 16 << 20,
    };
    let runtime = super::runtime(Exit::Repository)?;
    let day = Duration::from_secs(86_400);
    let now = std::time::SystemTime::now();
    let at = |i: u64| now - day * (a.backups - i) as u32;
    let touch = |path: &Path, t: std::time::SystemTime| -> Result<(), Failure> {
        std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(t))
            .map_err(|e| fail(&e))
    };
    runtime.block_on(async {
        let repo = repo::repository::Repository::init(
            &url,
            &identity,
            &[],
            Arc::new(repo::codec::Codec::with_default_threads()),
        )
        .await
        .map_err(|e| fail(&e))?;
        let per_backup = (a.segments / a.backups.max(1)).max(1);
        // WAL: plain files where wal-push would put them (expire lists, never reads them).
        for n in 0..a.segments {
            let name = walfmt::SegmentName::new(walfmt::TimelineId(1), n + 1, seg).to_string();
            let key = repo::keys::wal_key(&name).unwrap_or_default();
            let path = a.to.join(&key);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
            }
            std::fs::write(&path, b"synthetic").map_err(|e| fail(&e))?;
            touch(&path, at((n / per_backup).min(a.backups - 1)))?;
        }
        for i in 0..a.backups {
            let t = at(i);
            let stop = humantime::format_rfc3339_micros(t).to_string();
            let first = 1 + i * per_backup;
            let lsn = |segno: u64| walfmt::Lsn(segno * (16 << 20) + 40).to_string();
            let pack = format!("{:064x}", u128::from(i) + 1);
            let pack_path = a.to.join(repo::pack::pack_key(&pack));
            if let Some(dir) = pack_path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
            }
            std::fs::write(&pack_path, vec![0u8; 4096]).map_err(|e| fail(&e))?;
            touch(&pack_path, t)?;
            let id = format!("{}", humantime::format_rfc3339_seconds(t)).replace(['-', ':'], "");
            let m = BackupManifest {
                format: MANIFEST_FORMAT,
                id: id.clone(),
                label: "synthetic".into(),
                system_identifier: identity.system_identifier.to_string(),
                pg_version: 15,
                server_version: "15".into(),
                timeline: 1,
                start_lsn: lsn(first),
                stop_lsn: lsn(first),
                stop_timeline: 1,
                start_time: stop.clone(),
                stop_time: stop,
                server_start_time: None,
                checkpoint: "fast".into(),
                wal: "archive".into(),
                chunk_size: 65536,
                compression: "zstd-1".into(),
                size: 0,
                stored_new: 4096,
                stored_total: 4096,
                pg_manifest: None,
                tablespaces: vec![],
                packs: vec![pack],
                chunk_table: ChunkTable {
                    count: 0,
                    per_piece: CHUNKS_PER_PIECE,
                    pieces: vec![],
                },
                generation: 1,
                stored_at: None,
                chunks: Default::default(),
                files: vec![],
                created_by: "pitr bench synth-repo".into(),
            };
            m.store(repo.objects()).await.map_err(|e| fail(&e))?;
            touch(&a.to.join(repo::manifest::manifest_key(&id)), t)?;
        }
        Ok::<_, Failure>(())
    })?;
    println!(
        "{}: {} backups, {} WAL segments",
        a.to.display(),
        a.backups,
        a.segments
    );
    Ok(())
}

/// One archiver run's figures.
#[derive(Debug)]
struct RunResult {
    name: String,
    kind: &'static str,
    /// pitr runs: the repository's encryption (none, file, passphrase).
    encryption: String,
    ahead: Option<usize>,
    seconds: f64,
    /// CPU of the archive commands and what they waited for (not detached helpers).
    command_cpu_seconds: f64,
    /// Share of the machine's CPU busy during the run (everything: servers, helpers).
    machine_busy: f64,
    stored_bytes: Option<u64>,
}

fn bad(message: impl Into<String>) -> Failure {
    Failure::new(Exit::BadInput, message)
}

/// The WAL segments in `dir`, in name order, with their sizes.
fn segments_in(dir: &Path) -> Result<Vec<(String, u64)>, Failure> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        bad(format!(
            "could not open directory \"{}\": {e}",
            dir.display()
        ))
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((name, size));
        }
    }
    out.sort();
    Ok(out)
}

/// Makes this process the reaper of its orphaned descendants: helpers that archive
/// commands detach are re-parented here instead of to init, and their CPU time joins ours
/// once reaped.
fn become_subreaper() {
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
}

/// Waits (up to `limit`) until every descendant has exited, reaping each.
fn reap_orphans(limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
            Ok(Some(_)) => continue,
            Err(_) => return, // ECHILD: none left
            Ok(None) if Instant::now() >= deadline => return,
            Ok(None) => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU seconds used by waited-for children (cutime + cstime of /proc/self/stat).
fn children_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name in parentheses; field 3 (state) is index 0.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // USER_HZ is 100 in Linux's user-space ABI.
    (ticks(13) + ticks(14)) as f64 / 100.0
}

/// (busy, total) jiffies of all CPUs from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Fills `stage/pg_wal` with the segments, each marked ready, as PostgreSQL leaves them for
/// an archiver that is behind.
fn stage(stage: &Path, from: &Path, segments: &[(String, u64)]) -> Result<(), Failure> {
    let pg_wal = stage.join("pg_wal");
    let io = |what: &str, e: std::io::Error| bad(format!("could not {what}: {e}"));
    if pg_wal.exists() {
        std::fs::remove_dir_all(&pg_wal).map_err(|e| io("empty the staging pg_wal", e))?;
    }
    std::fs::create_dir_all(pg_wal.join("archive_status"))
        .map_err(|e| io("create the staging pg_wal", e))?;
    for (name, _) in segments {
        let src = from.join(name);
        let dst = pg_wal.join(name);
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(|e| io(&format!("stage {name}"), e))?;
        }
        std::fs::write(
            pg_wal.join("archive_status").join(format!("{name}.ready")),
            b"",
        )
        .map_err(|e| io("mark a segment ready", e))?;
    }
    Ok(())
}

/// Runs `command` once per segment, in order, as PostgreSQL's archiver does: from the data
/// directory, %p relative to it, `.ready` renamed to `.done` after each success, up to three
/// tries per segment. Returns (seconds, command CPU seconds, machine busy share).
fn drive(
    stage_dir: &Path,
    command: &str,
    segments: &[(String, u64)],
) -> Result<(f64, f64, f64), Failure> {
    let status = stage_dir.join("pg_wal").join("archive_status");
    let cpu0 = children_cpu_seconds();
    let (busy0, total0) = machine_jiffies();
    let started = Instant::now();
    for (name, _) in segments {
        let cmd = command
            .replace("%p", &format!("pg_wal/{name}"))
            .replace("%f", name);
        let mut tries = 0;
        loop {
            tries += 1;
            let out = Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .current_dir(stage_dir)
                .output()
                .map_err(|e| bad(format!("could not run sh: {e}")))?;
            if out.status.success() {
                break;
            }
            if tries == 3 {
                return Err(Failure::new(
                    Exit::Repository,
                    format!(
                        "archive command failed three times for {name} ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ));
            }
        }
        let _ = std::fs::rename(
            status.join(format!("{name}.ready")),
            status.join(format!("{name}.done")),
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let (busy1, total1) = machine_jiffies();
    // Background helpers the commands left running (pitr's push worker, pgBackRest's async
    // process) finish their work and are reaped, so that their CPU counts as well.
    reap_orphans(Duration::from_secs(120));
    let cpu = children_cpu_seconds() - cpu0;
    let busy = if total1 > total0 {
        (busy1 - busy0) as f64 / (total1 - total0) as f64
    } else {
        0.0
    };
    Ok((seconds, cpu, busy))
}

/// Quotes `s` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Initializes the scratch repository at `url` for the cluster that wrote WAL segment
/// `first`, encrypted with `slots` when there are any.
async fn init_scratch(
    url: &RepoUrl,
    first: &std::path::Path,
    slots: &[repo::slots::NewSlot],
) -> Result<(), Failure> {
    let bytes = std::fs::read(first)
        .map_err(|e| bad(format!("could not read \"{}\": {e}", first.display())))?;
    let s = walfmt::summary::summarize(&bytes)
        .map_err(|e| bad(format!("\"{}\" is not WAL: {e}", first.display())))?;
    // The bench's root is scratch too: made if missing (file://).
    if let RepoUrl::File { path } = url {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| bad(format!("could not create \"{}\": {e}", parent.display())))?;
        }
    }
    let identity = archiver::wal_push::identity(&s);
    repo::repository::Repository::init(
        url,
        &identity,
        slots,
        std::sync::Arc::new(repo::codec::Codec::new(1, 2)),
    )
    .await
    .map(|_| ())
    .map_err(|e| Failure::new(Exit::Repository, e.to_string()))
}

async fn stored_wal_bytes(url: &RepoUrl) -> Result<u64, Failure> {
    let storage = storage_for(url)
        .await
        .map_err(|e| Failure::new(Exit::Repository, e.to_string()))?;
    let objects = list_all(storage.as_ref(), "wal/")
        .await
        .map_err(|e| Failure::new(Exit::Repository, e.to_string()))?;
    Ok(objects
        .iter()
        .filter(|o| !o.key.ends_with(".summary"))
        .map(|o| o.size)
        .sum())
}

async fn remove_all(url: &RepoUrl) -> Result<(), Failure> {
    let fail = |e: repo::storage::StorageError| Failure::new(Exit::Repository, e.to_string());
    if let RepoUrl::File { path } = url {
        let _ = std::fs::remove_dir_all(path);
        return Ok(());
    }
    let storage = storage_for(url).await.map_err(fail)?;
    let keys: Vec<String> = list_all(storage.as_ref(), "")
        .await
        .map_err(fail)?
        .into_iter()
        .map(|o| o.key)
        .collect();
    // The storage batches deletes itself.
    storage.delete(&keys).await.map_err(fail)
}

fn wal_push(args: WalPushArgs) -> Result<(), Failure> {
    become_subreaper();
    let url = args.repo.url()?;
    let mut segments = segments_in(&args.from)?;
    if let Some(n) = args.segments {
        segments.truncate(n);
    }
    if segments.is_empty() {
        return Err(
            bad(format!("no WAL segments in \"{}\"", args.from.display())).hint(
                "--from names a directory of WAL segments, such as one archive_command copied into",
            ),
        );
    }
    let from = std::fs::canonicalize(&args.from)
        .map_err(|e| bad(format!("could not open \"{}\": {e}", args.from.display())))?;
    let mut peers = Vec::new();
    for peer in &args.peers {
        let Some((name, command)) = peer.split_once('=') else {
            return Err(bad(format!("peer \"{peer}\" is not NAME=COMMAND"))
                .hint("for example --peer 'pgbackrest=pgbackrest --stanza=demo archive-push %p'"));
        };
        peers.push((name.to_owned(), command.to_owned()));
    }
    let temp;
    let stage_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir()
                .map_err(|e| bad(format!("could not create a temp dir: {e}")))?;
            temp.path().to_owned()
        }
    };
    std::fs::create_dir_all(&stage_dir)
        .map_err(|e| bad(format!("could not create \"{}\": {e}", stage_dir.display())))?;
    let exe =
        std::env::current_exe().map_err(|e| bad(format!("could not find the pitr binary: {e}")))?;
    let runtime = super::runtime(Exit::Repository)?;
    let input_bytes: u64 = segments.iter().map(|(_, s)| s).sum();
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let level = args.compress.compress_level;

    // Key material for encrypted runs, made here and removed with the staging directory.
    let key_file = stage_dir.join("bench-key");
    const PASSPHRASE: &str = "pitr bench passphrase, not a secret";
    let mut runs = Vec::new();
    for &ahead in &args.ahead {
        for enc in &args.encryption {
            runs.push((ahead, enc.as_str()));
        }
    }
    let mut results = Vec::new();
    for (ahead, enc) in runs {
        let (slots, key_words) = match enc {
            "none" => (Vec::new(), String::new()),
            "file" => {
                std::fs::write(&key_file, repo::crypto::random::<32>())
                    .map_err(|e| bad(format!("could not write the bench key: {e}")))?;
                (
                    vec![repo::slots::NewSlot::File(key_file.clone())],
                    format!(" --key-file {}", sh_quote(&key_file.to_string_lossy())),
                )
            }
            "passphrase" => (
                vec![repo::slots::NewSlot::Passphrase(zeroize::Zeroizing::new(
                    PASSPHRASE.to_owned(),
                ))],
                String::new(),
            ),
            other => {
                return Err(bad(format!("unknown --encryption \"{other}\""))
                    .hint("none, file or passphrase"))
            }
        };
        let target = url.join(&format!("bench-{run_id}-ahead{ahead}-{enc}"));
        let env = if enc == "passphrase" {
            format!("PITR_PASSPHRASE={} ", sh_quote(PASSPHRASE))
        } else {
            String::new()
        };
        let mut command = format!(
            "{env}{} wal-push --repo {} --ahead {ahead} --compress-level {level}{key_words}",
            sh_quote(&exe.to_string_lossy()),
            sh_quote(&target.to_string()),
        );
        if let Some(p) = args.parallel {
            command.push_str(&format!(" --parallel {p}"));
        }
        command.push_str(" %p");
        stage(&stage_dir, &from, &segments)?;
        // The bench's own scratch location: initialized here, like pitr init would.
        runtime.block_on(init_scratch(&target, &from.join(&segments[0].0), &slots))?;
        if !args.json {
            eprintln!("running pitr with --ahead {ahead}, encryption {enc} ...");
        }
        let outcome = drive(&stage_dir, &command, &segments);
        let stored = match &outcome {
            Ok(_) => Some(runtime.block_on(stored_wal_bytes(&target))?),
            Err(_) => None,
        };
        if !args.keep {
            let removed = runtime.block_on(remove_all(&target));
            if outcome.is_ok() {
                removed?;
            }
        }
        let (seconds, cpu, busy) = outcome?;
        let name = if enc == "none" {
            format!("pitr ahead={ahead}")
        } else {
            format!("pitr ahead={ahead} {enc}")
        };
        results.push(RunResult {
            name,
            kind: "pitr",
            encryption: enc.to_owned(),
            ahead: Some(ahead),
            seconds,
            command_cpu_seconds: cpu,
            machine_busy: busy,
            stored_bytes: stored,
        });
    }
    for (name, command) in &peers {
        stage(&stage_dir, &from, &segments)?;
        if !args.json {
            eprintln!("running {name} ...");
        }
        let (seconds, cpu, busy) = drive(&stage_dir, command, &segments)?;
        results.push(RunResult {
            name: name.clone(),
            kind: "peer",
            encryption: String::new(),
            ahead: None,
            seconds,
            command_cpu_seconds: cpu,
            machine_busy: busy,
            stored_bytes: None,
        });
    }
    let _ = std::fs::remove_dir_all(stage_dir.join("pg_wal"));
    let _ = std::fs::remove_file(&key_file);

    let n = segments.len() as f64;
    let rate = |r: &RunResult| n / r.seconds.max(1e-9);
    let best_pitr = results
        .iter()
        .filter(|r| r.kind == "pitr")
        .max_by(|a, b| rate(a).total_cmp(&rate(b)));
    // Encrypted against plaintext at the same push-ahead level, from the same run.
    let encryption_ratios: Vec<(String, String, f64)> = results
        .iter()
        .filter(|r| r.kind == "pitr" && r.encryption != "none")
        .filter_map(|e| {
            let plain = results
                .iter()
                .find(|p| p.kind == "pitr" && p.encryption == "none" && p.ahead == e.ahead)?;
            Some((e.name.clone(), plain.name.clone(), rate(e) / rate(plain)))
        })
        .collect();
    let ratios: Vec<(String, String, f64)> = match best_pitr {
        Some(best) => results
            .iter()
            .filter(|r| r.kind == "peer")
            .map(|peer| {
                (
                    best.name.clone(),
                    peer.name.clone(),
                    rate(best) / rate(peer),
                )
            })
            .collect(),
        None => Vec::new(),
    };

    if args.json {
        let runs: Vec<_> = results
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "kind": r.kind,
                    "encryption": (r.kind == "pitr").then_some(r.encryption.as_str()),
                    "ahead": r.ahead,
                    "seconds": r.seconds,
                    "segments_per_second": rate(r),
                    "mb_per_second": input_bytes as f64 / 1e6 / r.seconds.max(1e-9),
                    "compression_ratio": r.stored_bytes.map(|s| input_bytes as f64 / s.max(1) as f64),
                    "stored_bytes": r.stored_bytes,
                    "command_cpu_seconds_per_segment": r.command_cpu_seconds / n,
                    "machine_busy": r.machine_busy,
                })
            })
            .collect();
        let ratios: Vec<_> = ratios
            .iter()
            .map(|(p, q, x)| json!({"pitr": p, "peer": q, "segments_per_second_ratio": x}))
            .collect();
        let doc = json!({
            "bench": "wal-push",
            "segments": segments.len(),
            "input_bytes": input_bytes,
            "from": from.display().to_string(),
            "repo": url.to_string(),
            "compress_level": level,
            "cores": std::thread::available_parallelism().map_or(1, |c| c.get()),
            "runs": runs,
            "ratios": ratios,
            "encryption_ratios": encryption_ratios
                .iter()
                .map(|(e, p, x)| json!({"encrypted": e, "plain": p, "segments_per_second_ratio": x}))
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Ok(());
    }
    println!(
        "pitr bench wal-push: {} segments, {:.0} MB, from {} to {} (zstd level {level})",
        segments.len(),
        input_bytes as f64 / 1e6,
        from.display(),
        url
    );
    println!(
        "{:<30} {:>8} {:>8} {:>8} {:>13} {:>6}",
        "run", "seg/s", "MB/s", "ratio", "cpu ms/seg", "busy"
    );
    for r in &results {
        println!(
            "{:<30} {:>8.2} {:>8.1} {:>8} {:>13.1} {:>5.0}%",
            r.name,
            rate(r),
            input_bytes as f64 / 1e6 / r.seconds.max(1e-9),
            r.stored_bytes.map_or("-".to_owned(), |s| format!(
                "{:.2}",
                input_bytes as f64 / s.max(1) as f64
            )),
            r.command_cpu_seconds / n * 1000.0,
            r.machine_busy * 100.0
        );
    }
    for (p, q, x) in &ratios {
        println!("{p} vs {q}: {x:.2}x segments/s");
    }
    for (e, p, x) in &encryption_ratios {
        println!("{e} vs {p}: {x:.2}x segments/s");
    }
    println!("cpu ms/seg counts the archive commands and every helper they start (reaped after the run); busy is the whole machine, servers too");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn finds_only_segments_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "000000010000000000000002",
            "000000010000000000000001",
            "00000002.history",
            "000000010000000000000003.partial",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let found: Vec<String> = segments_in(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            found,
            ["000000010000000000000001", "000000010000000000000002"]
        );
    }

    #[test]
    fn reads_cpu_counters() {
        assert!(children_cpu_seconds() >= 0.0);
        let (busy, total) = machine_jiffies();
        assert!(total >= busy && total > 0);
    }
}
