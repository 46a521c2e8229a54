//! `xenvault-bench`: benchmarks that measure xenvault and its peers in the
//! same run and write the table to `docs/benchmarks.md`.
//!
//! Benchmarks are not tests: nothing here runs in `./scripts/test`. Run them
//! with `cargo run --release -p xenvault-bench -- <benchmark>`.

mod repo;
mod sim;
mod splice;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xenvault-bench", about = "xenvault's benchmarks (not tests)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// How fast the simulator serves raw exports and NBD reads, against `cat`
    /// of the same sparse file (the goal: at least half of cat's rate).
    Sim(sim::SimArgs),
    /// xenvault's repository backups (full, incremental, restore, size, peak
    /// memory, ten clones) against restic and borg on the same disk.
    Repo(repo::RepoArgs),
    /// One measured xenvault operation of `repo` (run by it in a child process).
    #[command(hide = true)]
    RepoStep {
        /// The step as JSON.
        spec: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.bench {
            Bench::Sim(args) => sim::run(args).await,
            Bench::Repo(args) => repo::run(args).await,
            Bench::RepoStep { spec } => repo::step::run(&spec).await,
        }
    })
}

/// Today's date (UTC) for the tables.
pub fn today() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Err(_) => "(date unknown)".into(),
    }
}

/// Replaces the part of `docs/benchmarks.md` between the markers of `section`
/// (adding it at the end if missing), keeping the other sections.
pub fn write_section(path: &PathBuf, section: &str, body: &str) -> anyhow::Result<()> {
    let start = format!("<!-- {section}:start -->");
    let end = format!("<!-- {section}:end -->");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nEach section is written by `xenvault-bench`; peers are measured in the same run.\n".to_string()
    });
    let block = format!("{start}\n{body}{end}\n");
    let new = match (old.find(&start), old.find(&end)) {
        (Some(s), Some(e)) if e > s => {
            format!(
                "{}{}{}",
                &old[..s],
                block,
                &old[e + end.len()..].trim_start_matches('\n')
            )
        }
        _ => format!(
            "{}\n{}",
            old.trim_end_matches('\n').to_string() + "\n",
            block
        ),
    };
    std::fs::write(path, new)?;
    Ok(())
}
