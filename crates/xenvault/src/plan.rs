//! `xenvault plan JOB`: what tonight's run would do — settings in force, the
//! VMs that will run, why every other VM will not, every check — without
//! creating anything on the pool.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use xenvault_engine::job::{self, ExitStatus, JobError};
use xenvault_types::config::{Config, Weekday};

use crate::cli::JobArgs;
use crate::exit::{ExitCode, UsageError};

/// The configuration file: `--config`, else `$XENVAULT_CONFIG`, else
/// `/etc/xenvault/xenvault.toml`.
pub fn config_path(given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("XENVAULT_CONFIG") {
        return PathBuf::from(p);
    }
    PathBuf::from("/etc/xenvault/xenvault.toml")
}

/// Loads the configuration; errors are usage errors (exit code 2), one line.
pub fn load_config(given: Option<&Path>) -> anyhow::Result<Config> {
    let path = config_path(given);
    xenvault_engine::config::load(&path).map_err(|e| UsageError(e.to_string()).into())
}

/// The day to plan for: `--today`, else today (UTC).
pub fn today(args: &JobArgs) -> Weekday {
    args.today.unwrap_or_else(job::today_utc)
}

/// A job error as the CLI reports it (exit code by kind).
pub fn job_error(e: JobError) -> anyhow::Error {
    match e.exit_status() {
        ExitStatus::Usage => UsageError(e.to_string()).into(),
        _ => anyhow::anyhow!(e.to_string()),
    }
}

/// Runs `xenvault plan`.
pub async fn run(args: JobArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_deref())?;
    let plan = job::plan_job(&config, &args.job, today(&args))
        .await
        .map_err(job_error)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).context("cannot encode the plan")?
        );
    } else {
        print!("{}", plan.render());
    }
    Ok(if plan.has_errors || plan.target_failed() {
        ExitCode::Failure
    } else {
        ExitCode::Success
    })
}
