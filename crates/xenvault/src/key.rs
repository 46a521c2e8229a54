//! `xenvault key list|add|change|export|import|remove`: the key slots of an
//! encrypted repository (each wraps the master key under one password).

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use xenvault_repo::KdfParams;

use crate::exit::{ExitCode, UsageError};
use crate::repo::{NewPassword, RepoSelect, choose, open, repo_error};

const KEY_HELP: &str = "The repository is opened with its password (the target's, or --password-file /\n--password-env); new passwords come from --new-password-file or --new-password-env,\nnever from the command line. Exit codes: 0 done, 1 failed, 2 bad usage (wrong\npassword, unknown slot, removing the last key).";

/// The key subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the key slots (id, label, creation time).
    #[command(after_help = format!("{KEY_HELP}\n\nExamples:\n  xenvault key list --config /etc/xenvault/xenvault.toml --target local\n  xenvault key list --repo /srv/repo --password-env REPO_PW --json"))]
    List(KeyListArgs),

    /// Add a key slot opening with a new password.
    #[command(after_help = format!("{KEY_HELP}\n\nExamples:\n  xenvault key add --target local --new-password-file /root/second.pw --label 'safe copy'"))]
    Add(KeyAddArgs),

    /// Change the password of the key slot that opens the repository.
    #[command(after_help = format!("{KEY_HELP}\n\nThe old slot is removed once the new one is written: update password-file afterwards.\n\nExamples:\n  xenvault key change --target local --new-password-file /etc/xenvault/repo.password.new"))]
    Change(KeyChangeArgs),

    /// Print (or write to a file) a key slot, still wrapped under its password.
    #[command(after_help = format!("{KEY_HELP}\n\nKeep the exported slot apart from the repository: with its password it opens the\nrepository even if every key slot in the repository is lost.\n\nExamples:\n  xenvault key export --target local --output /root/xenvault-key.json\n  xenvault key export 3f9a0c1d2e4b5a69 --repo /srv/repo --password-env REPO_PW"))]
    Export(KeyExportArgs),

    /// Put back an exported key slot (checked against its password first).
    #[command(after_help = format!("{KEY_HELP}\n\nExamples:\n  xenvault key import /root/xenvault-key.json --target local --new-password-file /root/old.pw"))]
    Import(KeyImportArgs),

    /// Remove a key slot (never the last one).
    #[command(after_help = format!("{KEY_HELP}\n\nExamples:\n  xenvault key remove 3f9a0c1d2e4b5a69 --target local"))]
    Remove(KeyRemoveArgs),
}

/// Options of `xenvault key list`.
#[derive(Debug, Args)]
pub struct KeyListArgs {
    #[command(flatten)]
    pub select: RepoSelect,
}

/// Options of `xenvault key add`.
#[derive(Debug, Args)]
pub struct KeyAddArgs {
    #[command(flatten)]
    pub select: RepoSelect,
    #[command(flatten)]
    pub new: NewPassword,
    /// A label for the new slot (who or what it is for).
    #[arg(long, default_value = "added")]
    pub label: String,
}

/// Options of `xenvault key change`.
#[derive(Debug, Args)]
pub struct KeyChangeArgs {
    #[command(flatten)]
    pub select: RepoSelect,
    #[command(flatten)]
    pub new: NewPassword,
}

/// Options of `xenvault key export`.
#[derive(Debug, Args)]
pub struct KeyExportArgs {
    /// The key slot id (`xenvault key list`); may be left out when there is only one.
    pub slot: Option<String>,
    #[command(flatten)]
    pub select: RepoSelect,
    /// Write it to this new file (mode 600) instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Options of `xenvault key import`.
#[derive(Debug, Args)]
pub struct KeyImportArgs {
    /// The file `xenvault key export` wrote.
    pub file: PathBuf,
    #[command(flatten)]
    pub select: RepoSelect,
    /// The imported slot's password (checked before the slot is written).
    #[command(flatten)]
    pub new: NewPassword,
}

/// Options of `xenvault key remove`.
#[derive(Debug, Args)]
pub struct KeyRemoveArgs {
    /// The key slot id (`xenvault key list`).
    pub slot: String,
    #[command(flatten)]
    pub select: RepoSelect,
}

/// Runs `xenvault key …`.
pub async fn run(command: KeyCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        KeyCommand::List(a) => {
            let chosen = choose(&a.select)?;
            let repo = open(&chosen).await?;
            let keys = repo.list_keys().await.map_err(|e| repo_error(&chosen, e))?;
            if json {
                let v: Vec<_> = keys
                    .iter()
                    .map(
                        |k| serde_json::json!({"id": k.id, "label": k.label, "created": k.created}),
                    )
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("Key slots of {}:", chosen.label);
                println!("  {:<20} {:<22} label", "id", "created");
                for k in &keys {
                    println!("  {:<20} {:<22} {}", k.id, k.created, k.label);
                }
            }
        }
        KeyCommand::Add(a) => {
            let chosen = choose(&a.select)?;
            let new = a.new.read()?;
            let repo = open(&chosen).await?;
            let id = repo
                .add_key(new.expose().as_bytes(), &a.label, KdfParams::default())
                .await
                .map_err(|e| repo_error(&chosen, e))?;
            report(
                json,
                "added",
                &id,
                &format!("Added key slot {id} \"{}\" to {}", a.label, chosen.label),
            )?;
        }
        KeyCommand::Change(a) => {
            let chosen = choose(&a.select)?;
            let new = a.new.read()?;
            let mut repo = open(&chosen).await?;
            let id = repo
                .change_password(new.expose().as_bytes(), KdfParams::default())
                .await
                .map_err(|e| repo_error(&chosen, e))?;
            report(
                json,
                "changed",
                &id,
                &format!(
                    "Changed the password of {}: new key slot {id}, the old one is removed. Update the password file or variable now.",
                    chosen.label
                ),
            )?;
        }
        KeyCommand::Export(a) => {
            let chosen = choose(&a.select)?;
            let repo = open(&chosen).await?;
            let slot = match a.slot {
                Some(s) => s,
                None => {
                    let keys = repo.list_keys().await.map_err(|e| repo_error(&chosen, e))?;
                    match keys.as_slice() {
                        [only] => only.id.clone(),
                        many => {
                            return Err(UsageError(format!(
                                "{} has {} key slots: name the one to export ({})",
                                chosen.label,
                                many.len(),
                                many.iter()
                                    .map(|k| format!("{} \"{}\"", k.id, k.label))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ))
                            .into());
                        }
                    }
                }
            };
            let exported = repo
                .export_key(&slot)
                .await
                .map_err(|e| repo_error(&chosen, e))?;
            match &a.output {
                None => println!("{exported}"),
                Some(path) => {
                    write_new_private(path, exported.as_bytes())?;
                    eprintln!(
                        "Exported key slot {slot} of {} to {}",
                        chosen.label,
                        path.display()
                    );
                }
            }
        }
        KeyCommand::Import(a) => {
            let chosen = choose(&a.select)?;
            let new = a.new.read()?;
            let text = std::fs::read_to_string(&a.file)
                .map_err(|e| UsageError(format!("cannot read {}: {e}", a.file.display())))?;
            let repo = open(&chosen).await?;
            let id = repo
                .import_key(&text, new.expose().as_bytes())
                .await
                .map_err(|e| repo_error(&chosen, e))?;
            report(
                json,
                "imported",
                &id,
                &format!("Imported key slot {id} into {}", chosen.label),
            )?;
        }
        KeyCommand::Remove(a) => {
            let chosen = choose(&a.select)?;
            let repo = open(&chosen).await?;
            repo.remove_key(&a.slot)
                .await
                .map_err(|e| repo_error(&chosen, e))?;
            report(
                json,
                "removed",
                &a.slot,
                &format!("Removed key slot {} from {}", a.slot, chosen.label),
            )?;
        }
    }
    Ok(ExitCode::Success)
}

fn report(json: bool, action: &str, slot: &str, text: &str) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ action: slot }))?
        );
    } else {
        println!("{text}");
    }
    Ok(())
}

/// Creates `path` (refusing an existing file) readable by its owner only.
fn write_new_private(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            UsageError(format!(
                "cannot create {}: {e} (an existing file is never overwritten)",
                path.display()
            ))
        })?;
    f.write_all(data)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}
