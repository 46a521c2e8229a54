//! Exit codes: 0 success, 1 failure, 2 bad usage or configuration, 3 partial;
//! `backup` stopped by a signal: 130 (SIGINT), 143 (SIGTERM), the shell's
//! 128 + signal number.

/// What the process tells its caller (cron, a script) when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// Everything asked for was done.
    Success = 0,
    /// The command failed.
    Failure = 1,
    /// The command line or the configuration is wrong; nothing was done.
    Usage = 2,
    /// Some VMs failed, others succeeded.
    Partial = 3,
    /// Stopped by SIGINT (Ctrl-C) after cleaning up (128 + 2).
    InterruptedBySigint = 130,
    /// Stopped by SIGTERM (systemd stop, a timeout) after cleaning up
    /// (128 + 15).
    InterruptedBySigterm = 143,
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> Self {
        std::process::ExitCode::from(code as u8)
    }
}

/// An error that means "bad usage or configuration" (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error: 2 for usage errors, 1 otherwise.
pub fn code_of(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<UsageError>().is_some() {
        ExitCode::Usage
    } else {
        ExitCode::Failure
    }
}
