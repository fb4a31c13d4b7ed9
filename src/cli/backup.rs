//! `pitr backup`: a base backup of the server into the repository, with progress on a
//! terminal (plain lines otherwise) and a summary at the end.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use archiver::backup::pipeline::PipelineConfig;
use archiver::backup::{self, BackupConfig, BackupError, Phase, Progress};
use repo::codec::Codec;
use repo::manifest::{BackupManifest, ManifestError};
use repo::objects::ObjectError;
use repo::repository::Repository;
use serde_json::json;

use super::pg_args::{cluster_identity, connect, PgArgs};
use super::repo_args::{open_failure, CompressArgs, RepoArgs};
use super::{mb, Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    pg: PgArgs,
    /// The backup's label (in backup_label)
    #[arg(long, default_value = "pitr backup")]
    label: String,
    /// Checkpoint at once instead of spreading it over checkpoint_completion_target
    #[arg(long)]
    fast: bool,
    /// Store the WAL the backup needs in the backup itself, instead of waiting for it to be
    /// archived: the backup can be restored without any archived WAL
    #[arg(long)]
    wal: bool,
    /// Have the server send at most this rate, to spare its disks: kB/s, or with a suffix
    /// k or M (32k to 1024M), as pg_basebackup's --max-rate
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_rate: Option<u32>,
    /// Seconds to wait for the backup's WAL to be archived into the repository
    #[arg(
        long,
        default_value_t = 60,
        value_name = "SECONDS",
        env = "PITR_BACKUP_WAL_TIMEOUT"
    )]
    wal_timeout: u64,
    /// Packs uploaded at once
    #[arg(long, default_value_t = 4, value_name = "N", env = "PITR_BACKUP_PARALLEL",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    #[command(flatten)]
    compress: CompressArgs,
    /// Print the result as one JSON object
    #[arg(long)]
    json: bool,
}

/// `--max-rate` in kB/s: a number of kB/s, or with a suffix `k` or `M`.
fn parse_rate(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let (digits, factor) = match t.strip_suffix(['M', 'm']) {
        Some(d) => (d, 1024),
        None => (t.strip_suffix(['k', 'K']).unwrap_or(t), 1),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {text:?}: a number of kB/s, or with k or M"))?;
    let kb = n * factor;
    if !(32..=1_048_576).contains(&kb) {
        return Err(format!("rate {text:?} is out of range (32k to 1024M)"));
    }
    Ok(kb as u32)
}

fn failure(e: BackupError) -> Failure {
    let hint = e.hint();
    let exit = match &e {
        BackupError::Conn(_) | BackupError::Tar(_) | BackupError::Protocol(_) => Exit::Database,
        BackupError::WalMissing { .. } => Exit::WalMissing,
        BackupError::Object(ObjectError::Corrupt { .. })
        | BackupError::Manifest(ManifestError::Object(ObjectError::Corrupt { .. }))
        | BackupError::Manifest(ManifestError::Bad { .. }) => Exit::Corrupt,
        _ => Exit::Repository,
    };
    let f = Failure::new(exit, format!("backup failed: {e}"));
    match hint {
        Some(h) => f.hint(h),
        None => f,
    }
}

/// Reports progress: a line rewritten in place on a terminal, a line every ten seconds
/// otherwise.
struct Reporter {
    tty: bool,
    /// When the data began to arrive (the rate counts from then).
    data_started: Option<Instant>,
    last: Option<Instant>,
    phase: Option<Phase>,
}

impl Reporter {
    fn report(&mut self, p: &Progress) {
        if p.phase == Phase::Data && self.data_started.is_none() {
            self.data_started = Some(Instant::now());
        }
        let elapsed = self
            .data_started
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
            .max(0.001);
        let rate = p.bytes as f64 / elapsed;
        let phase_changed = self.phase.as_ref() != Some(&p.phase);
        let line = match &p.phase {
            Phase::Checkpoint => "waiting for the checkpoint".to_owned(),
            Phase::Data => {
                // A rate over the first moments says nothing (the first report can come with
                // many megabytes already counted: "96.9 MB at 96916 MB/s" was printed).
                let mut l = if elapsed >= 0.5 {
                    format!("{} at {}/s", mb(p.bytes), mb(rate as u64))
                } else {
                    mb(p.bytes)
                };
                if let Some(total) = p.total.filter(|&t| t > 0) {
                    let pct = (p.bytes as f64 / total as f64 * 100.0).min(100.0);
                    l = format!("{l}, {pct:.0}% of {}", mb(total));
                    if p.bytes > 0 && elapsed >= 0.5 {
                        let eta = (total.saturating_sub(p.bytes) as f64 / rate) as u64;
                        l = format!("{l}, {eta} s left");
                    }
                }
                l
            }
            Phase::WaitingForWal(s) => format!("waiting for WAL segment {s} to be archived"),
            Phase::Manifest => "writing the manifest".to_owned(),
        };
        if self.tty {
            eprint!("\r\x1b[2Kpitr: backup: {line}");
            if p.phase == Phase::Manifest {
                eprintln!();
            }
        } else if phase_changed
            || self
                .last
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            eprintln!("pitr: backup: {line}");
            self.last = Some(Instant::now());
        }
        self.phase = Some(p.phase.clone());
    }
}

fn regular_files(m: &BackupManifest) -> usize {
    m.files
        .iter()
        .filter(|f| f.kind == repo::manifest::FileType::File)
        .count()
}

fn summary(m: &BackupManifest, seconds: f64) -> String {
    let share = if m.size > 0 {
        m.stored_new as f64 / m.size as f64 * 100.0
    } else {
        0.0
    };
    format!(
        "backup {} done: {} in {seconds:.1} s ({}/s), {} files, {} stored new ({share:.1}% of the size), WAL {}..{} on timeline {}{}",
        m.id,
        mb(m.size),
        mb((m.size as f64 / seconds.max(0.001)) as u64),
        regular_files(m),
        mb(m.stored_new),
        m.start_lsn,
        m.stop_lsn,
        m.timeline,
        if m.wal == "included" { " (included in the backup)" } else { "" },
    )
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let key = args.repo.key()?;
    let settings = args.pg.settings()?;
    let runtime = super::runtime(Exit::Database)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let config = BackupConfig {
        label: args.label.clone(),
        fast_checkpoint: args.fast,
        include_wal: args.wal,
        max_rate_kb: args.max_rate,
        chunk_size: backup::DEFAULT_CHUNK_SIZE,
        pipeline: PipelineConfig {
            threads,
            pack_size: backup::DEFAULT_PACK_SIZE,
            uploads: usize::from(args.parallel),
            encode: args.compress.options(),
        },
        wal_timeout: Duration::from_secs(args.wal_timeout),
    };
    let started = Instant::now();
    let manifest = runtime.block_on(async {
        let (mut conn, system) = connect(&settings).await?;
        let identity = cluster_identity(&mut conn, &system).await;
        let repo = Repository::open(&url, &key, Some(&identity), Arc::new(Codec::new(1, 4)))
            .await
            .map_err(open_failure)?
            .with_encode_options(args.compress.options());
        let mut reporter = Reporter {
            tty: std::io::stderr().is_terminal() && !args.json,
            data_started: None,
            last: None,
            phase: None,
        };
        let result = backup::take(&mut conn, &repo, &config, &mut |p| reporter.report(p)).await;
        if reporter.tty && reporter.phase != Some(Phase::Manifest) {
            eprintln!();
        }
        conn.close().await;
        result.map_err(failure)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let v = json!({
            "id": manifest.id,
            "label": manifest.label,
            "timeline": manifest.timeline,
            "start_lsn": manifest.start_lsn,
            "stop_lsn": manifest.stop_lsn,
            "start_time": manifest.start_time,
            "stop_time": manifest.stop_time,
            "size": manifest.size,
            "files": regular_files(&manifest),
            "stored_new": manifest.stored_new,
            "stored_total": manifest.stored_total,
            "chunks": manifest.chunk_table.count,
            "packs": manifest.packs.len(),
            "wal": manifest.wal,
            "seconds": seconds,
        });
        println!("{v}");
    } else {
        println!("{}", summary(&manifest, seconds));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_as_pg_basebackup_takes_them() {
        assert_eq!(parse_rate("100"), Ok(100));
        assert_eq!(parse_rate("100k"), Ok(100));
        assert_eq!(parse_rate("10M"), Ok(10240));
        assert!(parse_rate("10").is_err());
        assert!(parse_rate("2000M").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
