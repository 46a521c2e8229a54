//! `xenvault list`: the restore points of an archive target per VM (time,
//! size, format, complete or partial, checksum status), or of a repository
//! (time, disks, size, stored bytes, full or incremental), as a table or JSON.

use std::path::PathBuf;

use clap::Args;
use xenvault_engine::restore::repo::{ListedRepoPoint, list_repo_points};
use xenvault_engine::restore::{ChecksumStatus, ListedPoint, RestoreError, list_points};

use crate::config_file::load_config;
use crate::exit::{ExitCode, UsageError};
use crate::repo::{Backups, BackupsWanted, locate};

/// Options of `xenvault list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// A job of the configuration: its target is listed.
    pub job: Option<String>,

    /// The archive or repository directory to list (instead of a job's
    /// target), or the name of a target of the configuration.
    #[arg(long, value_name = "DIR|NAME", conflicts_with = "repo")]
    pub target: Option<PathBuf>,

    /// A repository in a local directory.
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,

    /// Only this VM (name or uuid).
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,

    /// Read every file and check it against SHA256SUMS (archives), or
    /// re-read and re-hash every chunk (repositories). Slow: reads all data.
    #[arg(long)]
    pub verify: bool,

    /// The configuration file (needed with a JOB).
    /// [default: $XENVAULT_CONFIG, else /etc/xenvault/xenvault.toml]
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// A repository's password: first line of this file (chmod 600).
    #[arg(long, value_name = "FILE", conflicts_with = "password_env")]
    pub password_file: Option<PathBuf>,

    /// A repository's password: this environment variable.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
}

/// Runs `xenvault list`.
pub async fn run(args: ListArgs, json: bool) -> anyhow::Result<ExitCode> {
    let wanted = BackupsWanted {
        job: args.job.as_deref(),
        target: args.target.as_deref(),
        repo: args.repo.as_deref(),
        password_file: args.password_file.as_deref(),
        password_env: args.password_env.as_deref(),
    };
    let config = if wanted.needs_config() || (args.config.is_some() && args.repo.is_none()) {
        Some(load_config(args.config.as_deref())?)
    } else {
        None
    };
    let target = match locate(wanted, config.as_ref())? {
        Backups::Archive(dir) => dir,
        Backups::Repository(chosen) => return list_repository(&args, &chosen, json).await,
    };
    let (vm, verify) = (args.vm.clone(), args.verify);
    let listed = tokio::task::spawn_blocking({
        let target = target.clone();
        move || list_points(&target, vm.as_deref(), verify)
    })
    .await?
    .map_err(|e| match e {
        RestoreError::NotFound(m) => anyhow::Error::new(UsageError(m)),
        other => anyhow::Error::new(other),
    })?;
    let damaged = listed
        .iter()
        .any(|p| matches!(p.checksums, ChecksumStatus::Damaged { .. }));
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
    } else {
        print_table(&target, &listed);
    }
    Ok(if damaged {
        ExitCode::Failure
    } else {
        ExitCode::Success
    })
}

/// A repository restore point as `list` shows it.
#[derive(serde::Serialize)]
struct RepoListed<'a> {
    #[serde(flatten)]
    point: &'a ListedRepoPoint,
    /// `verified`, `damaged` (with --verify) or `not_checked`.
    status: &'static str,
}

async fn list_repository(
    args: &ListArgs,
    chosen: &crate::repo::Chosen,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = crate::repo::open(chosen).await?;
    let listed = list_repo_points(&repo, args.vm.as_deref())
        .await
        .map_err(|e| match e {
            RestoreError::NotFound(m) => anyhow::Error::new(UsageError(m)),
            other => anyhow::anyhow!("{}: {other}", chosen.label),
        })?;
    let broken: Vec<String> = if args.verify {
        repo.verify(xenvault_repo::VerifyOptions::default())
            .await
            .map_err(|e| crate::repo::repo_error(chosen, e))?
            .broken_restore_points()
    } else {
        Vec::new()
    };
    let status = |p: &ListedRepoPoint| {
        if !args.verify {
            "not_checked"
        } else if broken.contains(&format!("{}/{}", p.vm_uuid, p.id)) {
            "damaged"
        } else {
            "verified"
        }
    };
    let rows: Vec<RepoListed<'_>> = listed
        .iter()
        .map(|p| RepoListed {
            point: p,
            status: status(p),
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("No restore points in {}", chosen.label);
    } else {
        let mut current: Option<&str> = None;
        for r in &rows {
            let p = r.point;
            if current != Some(p.vm_uuid.as_str()) {
                if current.is_some() {
                    println!();
                }
                println!("VM {} ({})", p.vm, p.vm_uuid);
                println!(
                    "  {:<17} {:<21} {:>5} {:>10} {:>10} {:<12} {:<11} job",
                    "restore point", "time (UTC)", "disks", "MiB", "stored MiB", "kind", "check"
                );
                current = Some(p.vm_uuid.as_str());
            }
            let kind = if p.parent.is_some() {
                "incremental"
            } else {
                "full"
            };
            println!(
                "  {:<17} {:<21} {:>5} {:>10.1} {:>10.1} {:<12} {:<11} {}",
                p.id,
                p.time.replace('T', " ").trim_end_matches('Z'),
                p.disks.len(),
                p.size as f64 / f64::from(1 << 20),
                p.stored as f64 / f64::from(1 << 20),
                kind,
                match r.status {
                    "verified" => "verified",
                    "damaged" => "DAMAGED",
                    _ => "-",
                },
                p.job.as_deref().unwrap_or("-")
            );
        }
        if args.verify && !broken.is_empty() {
            println!();
            println!("Damaged restore points: run `xenvault verify` for the damaged chunks.");
        } else if !args.verify {
            println!();
            println!(
                "Every listed restore point is complete. Check the data with --verify or `xenvault verify`."
            );
        }
    }
    Ok(if broken.is_empty() {
        ExitCode::Success
    } else {
        ExitCode::Failure
    })
}

fn print_table(target: &std::path::Path, points: &[ListedPoint]) {
    if points.is_empty() {
        println!("No restore points in {}", target.display());
        return;
    }
    // One group per VM directory (partial points have no uuid yet).
    let mut current: Option<&std::path::Path> = None;
    for p in points {
        let key = std::path::Path::new(&p.dir)
            .parent()
            .unwrap_or(std::path::Path::new(""));
        if current != Some(key) {
            if current.is_some() {
                println!();
            }
            let uuid = points
                .iter()
                .filter(|q| std::path::Path::new(&q.dir).parent() == Some(key))
                .find_map(|q| q.vm_uuid.as_deref());
            println!(
                "VM {}{}",
                p.vm,
                uuid.map(|u| format!(" ({u})")).unwrap_or_default()
            );
            println!(
                "  {:<18} {:<21} {:>10} {:<9} {:<8} checksums",
                "restore point", "time (UTC)", "MiB", "format", "state"
            );
            current = Some(key);
        }
        let format = match (p.format, p.compression) {
            (Some(f), xenvault_engine::restore::Compression::None) => f.as_str().to_string(),
            (Some(f), c) => format!(
                "{}+{}",
                f.as_str(),
                match c {
                    xenvault_engine::restore::Compression::Zstd => "zst",
                    _ => "gz",
                }
            ),
            (None, _) => "-".into(),
        };
        let checks = match &p.checksums {
            ChecksumStatus::Verified => "verified".to_string(),
            ChecksumStatus::NotChecked => "present (not checked; --verify)".to_string(),
            ChecksumStatus::NoManifest => "none".to_string(),
            ChecksumStatus::Damaged { file, problem } => format!("DAMAGED: {file}: {problem}"),
        };
        println!(
            "  {:<18} {:<21} {:>10.1} {:<9} {:<8} {}",
            p.timestamp,
            p.time.as_deref().unwrap_or("-"),
            p.bytes as f64 / f64::from(1 << 20),
            format,
            if p.complete { "complete" } else { "partial" },
            checks
        );
    }
}
