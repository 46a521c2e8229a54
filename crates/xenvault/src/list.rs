//! `xenvault list`: the restore points of an archive target per VM (time,
//! size, format, complete or partial, checksum status), as a table or JSON.

use std::path::PathBuf;

use clap::Args;
use xenvault_engine::restore::{ChecksumStatus, ListedPoint, RestoreError, list_points};

use crate::config_file::load_config;
use crate::exit::{ExitCode, UsageError};
use crate::restore::target_dir;

/// Options of `xenvault list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// A job of the configuration: its target is listed.
    pub job: Option<String>,

    /// The archive directory to list (instead of a job's target).
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,

    /// Only this VM (name or uuid).
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,

    /// Read every file and check it against SHA256SUMS (slow: reads all data).
    #[arg(long)]
    pub verify: bool,

    /// The configuration file (needed with a JOB).
    /// [default: $XENVAULT_CONFIG, else /etc/xenvault/xenvault.toml]
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Runs `xenvault list`.
pub async fn run(args: ListArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = match (&args.target, &args.job) {
        (Some(_), _) => None,
        (None, Some(_)) => Some(load_config(args.config.as_deref())?),
        (None, None) => {
            return Err(
                UsageError("say which backups to list: a JOB or --target DIR".into()).into(),
            );
        }
    };
    let target = target_dir(args.target.as_ref(), args.job.as_deref(), config.as_ref())?;
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
