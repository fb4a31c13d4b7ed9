//! `pitr key list|add|remove`: an encrypted repository's key slots. Rotation is `add` of
//! the new key's slot and `remove` of the old one; no data is rewritten (the data key stays:
//! see README, "Encryption").

use repo::envelope::Encryption;
use repo::repository::{storage_for, CONFIG_KEY};
use repo::slots::{self, NewSlot, Slot};
use serde_json::json;

use super::repo_args::{key_failure, passphrase_from, RepoArgs};
use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeyCommand {
    /// List the key slots (needs no key; shows no key material; with a key set, the slots
    /// in force, authenticated)
    List {
        #[command(flatten)]
        repo: RepoArgs,
        /// One JSON array
        #[arg(long)]
        json: bool,
    },
    /// Add a key slot for a new key source, opening the repository with a current key
    #[command(group = clap::ArgGroup::new("new").required(true).multiple(false))]
    Add {
        #[command(flatten)]
        repo: RepoArgs,
        /// The new slot's key: a file of at least 32 bytes
        #[arg(long, group = "new", value_name = "PATH")]
        new_key_file: Option<std::path::PathBuf>,
        /// The new slot's key: a command that prints it
        #[arg(long, group = "new", value_name = "CMD")]
        new_key_command: Option<String>,
        /// The new slot's key: the passphrase in environment variable VAR
        #[arg(long, group = "new", value_name = "VAR")]
        new_passphrase_env: Option<String>,
        /// The new slot's key: this AWS KMS key (id or ARN)
        #[arg(long, group = "new", value_name = "ARN")]
        new_kms_key_id: Option<String>,
        /// One JSON object
        #[arg(long)]
        json: bool,
    },
    /// Remove a key slot (by the id pitr key list shows); never the last one
    Remove {
        #[command(flatten)]
        repo: RepoArgs,
        /// The slot's id
        slot: String,
    },
}

pub fn run(args: Args) -> Result<(), Failure> {
    match args.command {
        KeyCommand::List { repo, json } => list(&repo, json),
        KeyCommand::Add {
            repo,
            new_key_file,
            new_key_command,
            new_passphrase_env,
            new_kms_key_id,
            json,
        } => {
            let source = if let Some(p) = new_key_file {
                NewSlot::File(std::path::absolute(&p).unwrap_or(p))
            } else if let Some(c) = new_key_command {
                NewSlot::Command(c)
            } else if let Some(var) = new_passphrase_env {
                NewSlot::Passphrase(passphrase_from(&var)?.ok_or_else(|| {
                    Failure::new(
                        Exit::Key,
                        format!("--new-passphrase-env names {var}, which is not set"),
                    )
                })?)
            } else if let Some(k) = new_kms_key_id {
                NewSlot::Kms(k)
            } else {
                unreachable!("clap requires one")
            };
            add(&repo, &source, json)
        }
        KeyCommand::Remove { repo, slot } => remove(&repo, &slot),
    }
}

/// The repository's storage, refusing a plaintext repository (no slots to change).
async fn encrypted_storage(
    repo: &RepoArgs,
) -> Result<Option<std::sync::Arc<dyn repo::storage::Storage>>, Failure> {
    let url = repo.url()?;
    let storage = storage_for(&url)
        .await
        .map_err(|e| Failure::new(Exit::Repository, e.to_string()))?;
    let head = storage
        .get_range(CONFIG_KEY, 0..repo::envelope::HEADER_MAX as u64)
        .await
        .map_err(|e| {
            if e.is_not_found() {
                Failure::new(
                    Exit::Repository,
                    format!("repository {url} is not initialized (no config object)"),
                )
            } else {
                Failure::new(Exit::Repository, e.to_string())
            }
        })?;
    let header = repo::envelope::header(&head)
        .map_err(|e| Failure::new(Exit::Corrupt, format!("object \"config\" is corrupt: {e}")))?;
    Ok((header.encryption != Encryption::None).then_some(storage))
}

fn row(s: &Slot) -> serde_json::Value {
    let mut v = json!({
        "id": s.id,
        "kind": s.kind.name(),
        "created": s.created,
        "fingerprint": s.fingerprint,
    });
    if let Some(k) = &s.kms_key_id {
        v["kms_key_id"] = json!(k);
    }
    v
}

fn list(repo: &RepoArgs, json: bool) -> Result<(), Failure> {
    let runtime = super::runtime(Exit::Repository)?;
    // With a key set, the set in force (authenticated); without one, the newest stored set
    // as it reads (no key is needed to list, and none can check it).
    let key = repo.key()?;
    let set = runtime.block_on(async {
        match encrypted_storage(repo).await? {
            None => Ok(None),
            Some(storage) if key.is_given() => slots::open(storage.as_ref(), &key)
                .await
                .map(|o| Some(o.current))
                .map_err(key_failure),
            Some(storage) => slots::list(storage.as_ref())
                .await
                .map(Some)
                .map_err(key_failure),
        }
    })?;
    let slots = set.map(|s| s.slots).unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::Value::from(slots.iter().map(row).collect::<Vec<_>>())
        );
    } else if slots.is_empty() {
        println!("the repository is not encrypted: no key slots");
    } else {
        println!(
            "{:<10} {:<11} {:<18} created",
            "slot", "kind", "fingerprint"
        );
        for s in &slots {
            let extra = s
                .kms_key_id
                .as_deref()
                .map(|k| format!("  ({k})"))
                .unwrap_or_default();
            println!(
                "{:<10} {:<11} {:<18} {}{extra}",
                s.id,
                s.kind.name(),
                s.fingerprint,
                s.created
            );
        }
    }
    Ok(())
}

fn not_encrypted() -> Failure {
    Failure::new(
        Exit::Key,
        "the repository is not encrypted: it has no key slots",
    )
    .hint("key slots exist in repositories made with pitr init --encrypt")
}

fn add(repo: &RepoArgs, source: &NewSlot, json: bool) -> Result<(), Failure> {
    let key = repo.key()?;
    let runtime = super::runtime(Exit::Repository)?;
    let slot = runtime.block_on(async {
        let storage = encrypted_storage(repo).await?.ok_or_else(not_encrypted)?;
        slots::add(storage.as_ref(), &key, source)
            .await
            .map_err(key_failure)
    })?;
    if json {
        println!("{}", row(&slot));
    } else {
        println!("added key slot {} ({})", slot.id, slot.kind.name());
    }
    Ok(())
}

fn remove(repo: &RepoArgs, id: &str) -> Result<(), Failure> {
    let key = repo.key()?;
    let runtime = super::runtime(Exit::Repository)?;
    let set = runtime.block_on(async {
        let storage = encrypted_storage(repo).await?.ok_or_else(not_encrypted)?;
        slots::remove(storage.as_ref(), &key, id)
            .await
            .map_err(key_failure)
    })?;
    println!("removed key slot {id}; {} slot(s) left", set.slots.len());
    Ok(())
}
