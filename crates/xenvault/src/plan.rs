//! `xenvault plan JOB`: what tonight's run would do — settings in force, the
//! VMs that will run, why every other VM will not, every check — without
//! creating anything on the pool.

use anyhow::Context as _;
use xenvault_engine::job::{self, ExitStatus, JobError};
use xenvault_types::config::Weekday;

use crate::cli::JobArgs;
use crate::exit::{ExitCode, UsageError};

pub use crate::config_file::load_config;

/// The day to plan for: `--today`, else today (the machine's time zone).
pub fn today(args: &JobArgs) -> Weekday {
    args.today.unwrap_or_else(job::today)
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
