//! `xenvault snapshots list|release`: the snapshots repository jobs keep on
//! the pools between runs, and releasing those of a job that no longer
//! needs them (removed from the configuration, or writing to an archive).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use xenvault_engine::kept::{self, KeptEntry, ReleaseSelection, Standing};

use crate::config_file::load_config;
use crate::exit::ExitCode;
use crate::plan::job_error;

/// `xenvault snapshots …`.
#[derive(Debug, Subcommand)]
pub enum SnapshotsCommand {
    /// List the kept snapshots (per pool, job and VM) and whether their job still uses them.
    #[command(
        after_help = "Read from the journal in the state directory; the pools are not contacted.\nExit code 0, also when some snapshots are not used any more (their state says so).\n\nExamples:\n  xenvault snapshots list\n  xenvault snapshots list --config /etc/xenvault/xenvault.toml --json"
    )]
    List(ListArgs),

    /// Remove the snapshots kept for a job (and their VDIs) from the pools.
    #[command(
        after_help = "Only snapshots the journal keeps for that job are touched, each by UUID and only\nwhen its xenvault tag matches. A job that still writes to a repository needs its\nsnapshots as bases: releasing them makes its next backup of each VM a full one,\nso that takes --force.\nExit codes: 0 released (or nothing to release), 1 some could not be removed (the\nnext backup run's leftover sweep retries them), 2 bad usage.\n\nExamples:\n  xenvault snapshots release --job old-nightly --dry-run\n  xenvault snapshots release --job old-nightly\n  xenvault snapshots release --job nightly --vm 7c1e… --force"
    )]
    Release(ReleaseArgs),
}

/// Options of `xenvault snapshots list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The configuration file [default: $XENVAULT_CONFIG, else /etc/xenvault/xenvault.toml].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Options of `xenvault snapshots release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The job whose kept snapshots go.
    #[arg(long, value_name = "NAME")]
    pub job: String,

    /// Only those on this pool (its name in the configuration).
    #[arg(long, value_name = "NAME")]
    pub pool: Option<String>,

    /// Only those of this VM (its UUID).
    #[arg(long, value_name = "UUID")]
    pub vm: Option<String>,

    /// Also when the job still uses them as bases (its next backups are full).
    #[arg(long)]
    pub force: bool,

    /// Show what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// The configuration file [default: $XENVAULT_CONFIG, else /etc/xenvault/xenvault.toml].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Runs `xenvault snapshots …`.
pub async fn run(command: SnapshotsCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        SnapshotsCommand::List(args) => list(args, json),
        SnapshotsCommand::Release(args) => release(args, json).await,
    }
}

fn line(e: &KeptEntry) -> String {
    format!(
        "  {:<12} {:<16} {:<6} {:<36} {:<36} {:<20} {}{}",
        e.pool,
        e.job,
        match e.role {
            xenvault_engine::journal::KeepRole::Base => "base",
            xenvault_engine::journal::KeepRole::Resume => "resume",
        },
        e.source_vm,
        e.snapshot.as_deref().unwrap_or(if e.metadata_only {
            "(CBT metadata)"
        } else {
            "?"
        }),
        e.kept_at,
        e.standing.describe(),
        if e.metadata_only {
            format!(", {} VDI(s) of CBT metadata", e.vdis.len())
        } else {
            String::new()
        }
    )
}

const HEADER: &str = "  POOL         JOB              ROLE   VM                                   SNAPSHOT                             KEPT AT              STATE";

fn list(args: ListArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_deref())?;
    let entries = kept::list(&config).map_err(job_error)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).context("cannot encode the list")?
        );
        return Ok(ExitCode::Success);
    }
    if entries.is_empty() {
        println!("No snapshots are kept on any pool.");
        return Ok(ExitCode::Success);
    }
    println!("{} snapshot(s) kept:", entries.len());
    println!("{HEADER}");
    for e in &entries {
        println!("{}", line(e));
    }
    let mut unused: Vec<&str> = entries
        .iter()
        .filter(|e| e.standing != Standing::InUse)
        .map(|e| e.job.as_str())
        .collect();
    unused.sort_unstable();
    unused.dedup();
    for job in unused {
        println!(
            "Nothing will release the snapshots of job {job}: xenvault snapshots release --job {job}"
        );
    }
    Ok(ExitCode::Success)
}

async fn release(args: ReleaseArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_deref())?;
    let sel = ReleaseSelection {
        job: args.job.clone(),
        pool: args.pool,
        vm: args.vm,
        force: args.force,
        dry_run: args.dry_run,
    };
    let report = kept::release(&config, &sel).await.map_err(job_error)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot encode the report")?
        );
    } else if report.selected.is_empty() {
        println!("No snapshots are kept for job {}.", args.job);
    } else {
        let verb = if args.dry_run {
            "would be released"
        } else {
            "released"
        };
        println!(
            "{} snapshot(s) of job {} {verb}:",
            report.selected.len(),
            args.job
        );
        println!("{HEADER}");
        for e in &report.selected {
            println!("{}", line(e));
        }
        if !args.dry_run {
            println!(
                "Removed {} snapshot VM(s) and {} VDI(s).",
                report.destroyed_vms.len(),
                report.destroyed_vdis.len()
            );
        }
        for e in &report.errors {
            println!("  problem: {e}");
        }
    }
    Ok(if report.errors.is_empty() {
        ExitCode::Success
    } else {
        ExitCode::Failure
    })
}
