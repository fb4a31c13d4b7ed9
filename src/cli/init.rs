//! `pitr init`: creates a repository for one cluster in an empty location. Every other
//! command refuses a location without one, so a typo in the prefix or an unmounted
//! directory is an error instead of a new repository that "archives" to the wrong place.

use std::path::PathBuf;
use std::sync::Arc;

use repo::codec::Codec;
use repo::repository::Repository;
use repo::slots::{KeySetting, NewSlot};
use serde_json::json;

use super::pg_args::{cluster_identity, connect, PgArgs};
use super::repo_args::{open_failure, passphrase_from, RepoArgs};
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("cluster").required(true).multiple(false))]
pub struct Args {
    #[command(flatten)]
    repo: RepoArgs,
    /// Read the cluster's identity from this server (as for pitr backup; PGHOST etc.)
    #[arg(long, group = "cluster", value_name = "CONNINFO")]
    pg: Option<String>,
    /// Read the cluster's identity from this data directory (global/pg_control, PG_VERSION,
    /// pg_wal); the server may be running or stopped
    #[arg(long, group = "cluster", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Encrypt every object, with a random data key kept in one key slot per key source
    /// given (--key-file, --key-command, --passphrase-env, --kms-key-id; without one, the
    /// settings every command reads: PITR_KEY_FILE, PITR_KEY_COMMAND, PITR_KEY_KMS,
    /// PITR_PASSPHRASE)
    #[arg(long)]
    encrypt: bool,
    /// A key slot for the passphrase held in environment variable VAR (stretched with
    /// Argon2id)
    #[arg(long, value_name = "VAR", requires = "encrypt")]
    passphrase_env: Option<String>,
    /// A key slot wrapped by this AWS KMS key (id or ARN; credentials from the AWS chain,
    /// endpoint from AWS_ENDPOINT_URL_KMS); repeatable
    #[arg(long, value_name = "ARN", requires = "encrypt")]
    kms_key_id: Vec<String>,
    /// One JSON object
    #[arg(long)]
    json: bool,
}

/// The key sources `init --encrypt` makes slots for.
fn sources(args: &Args) -> Result<Vec<NewSlot>, Failure> {
    let slot_of = |setting: KeySetting| match setting {
        KeySetting::File(p) => Some(NewSlot::File(p)),
        KeySetting::Command(c) => Some(NewSlot::Command(c)),
        KeySetting::Passphrase(p) => Some(NewSlot::Passphrase(p)),
        KeySetting::Kms(k) => Some(NewSlot::Kms(k)),
        KeySetting::None => None,
    };
    // The key sources named on the command line, each a slot.
    let mut out: Vec<NewSlot> = args
        .repo
        .key
        .given()?
        .into_iter()
        .filter(|(_, flag)| *flag)
        .filter_map(|(s, _)| slot_of(s))
        .collect();
    if let Some(var) = &args.passphrase_env {
        let p = passphrase_from(var)?.ok_or_else(|| {
            Failure::new(
                Exit::Key,
                format!("--passphrase-env names {var}, which is not set"),
            )
        })?;
        out.push(NewSlot::Passphrase(p));
    }
    out.extend(args.kms_key_id.iter().cloned().map(NewSlot::Kms));
    // None named: the one key setting every command reads (two in the environment are
    // refused, as every command refuses them).
    if out.is_empty() {
        out.extend(slot_of(args.repo.key.setting()?));
    }
    if !args.encrypt {
        if out.is_empty() {
            return Ok(out);
        }
        return Err(Failure::new(
            Exit::Key,
            format!("a key is set ({:?}), but --encrypt is not given", out[0]),
        )
        .hint("add --encrypt for an encrypted repository, or unset PITR_KEY_FILE, PITR_KEY_COMMAND, PITR_KEY_KMS and PITR_PASSPHRASE"));
    }
    if out.is_empty() {
        return Err(Failure::new(Exit::Key, "--encrypt needs at least one key source")
            .hint("give --key-file, --key-command, --passphrase-env or --kms-key-id (several make several slots)"));
    }
    Ok(out)
}

pub fn run(args: Args) -> Result<(), Failure> {
    let url = args.repo.url()?;
    let slots = sources(&args)?;
    let runtime = super::runtime(Exit::Repository)?;
    let repo = runtime.block_on(async {
        let identity = match (&args.data_dir, &args.pg) {
            (Some(dir), _) => archiver::data_dir::identity(dir).map_err(|e| {
                Failure::new(Exit::BadInput, e)
                    .hint("--data-dir names the cluster's data directory (where PG_VERSION is)")
            })?,
            (None, pg) => {
                let settings = PgArgs {
                    pg: pg.clone().unwrap_or_default(),
                }
                .settings()?;
                let (mut conn, system) = connect(&settings).await?;
                cluster_identity(&mut conn, &system).await
            }
        };
        Repository::init(&url, &identity, &slots, Arc::new(Codec::new(1, 2)))
            .await
            .map_err(open_failure)
    })?;
    let c = repo.config();
    if args.json {
        println!(
            "{}",
            json!({
                "repository": url.to_string(),
                "system_identifier": c.system_identifier,
                "pg_version": c.pg_version,
                "wal_segment_size": c.wal_segment_size,
                "format": c.format,
                "encryption": c.encryption,
                "key_slots": slots.len(),
            })
        );
    } else {
        println!(
            "initialized repository {url} for system {} (PostgreSQL {}, {} MiB segments)",
            c.system_identifier,
            c.pg_version,
            c.wal_segment_size >> 20
        );
        if !slots.is_empty() {
            println!(
                "encrypted ({}), {} key slot(s): pitr key list shows them",
                c.encryption,
                slots.len()
            );
        }
    }
    Ok(())
}
