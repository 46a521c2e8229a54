//! `xenvault`: back up Xen virtual machines.
//!
//! The binary is thin: it parses the command line, sets up logging, runs one
//! command and turns its outcome into an exit code (see [`exit`]).

mod backup;
mod check;
mod cli;
mod config_file;
mod demo;
mod exit;
mod key;
mod list;
mod plan;
mod prune;
mod repo;
mod restore;
mod snapshots;
mod trust;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::exit::ExitCode;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // Before the runtime's threads start (see the function's doc).
    xenvault_engine::job::init_local_offset();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("xenvault: cannot start the async runtime: {err}");
            return ExitCode::Failure.into();
        }
    };

    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args, cli.json).await,
            Command::Trust(args) => trust::run(args, cli.json).await,
            Command::Plan(args) => plan::run(args, cli.json).await,
            Command::Backup(args) => backup::run(args, cli.json).await,
            Command::List(args) => list::run(args, cli.json).await,
            Command::Restore(args) => restore::run(args, cli.json).await,
            Command::Repo(command) => repo::run(command, cli.json).await,
            Command::Key(command) => key::run(command, cli.json).await,
            Command::Check(args) => check::run_check(args, cli.json).await,
            Command::Verify(args) => check::run_verify(args, cli.json).await,
            Command::Prune(args) => prune::run(args, cli.json).await,
            Command::Snapshots(command) => snapshots::run(command, cli.json).await,
        }
    });
    match outcome {
        Ok(code) => code.into(),
        Err(err) => {
            eprintln!("xenvault: error: {err:#}");
            exit::code_of(&err).into()
        }
    }
}

/// Logs go to stderr; `-v` shows info, `-vv` debug; `RUST_LOG` overrides.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info,xenvault=info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
