//! Rendering and delivering run reports: the text run log on the target
//! (`<dir>/_logs/<job>-<YYYYMMDD-HHMMSS>.log`), the JSON report next to it,
//! expiry of old logs, and the email ([`email`]).
//!
//! The data is `xenvault_types::report::RunReport`; everything here is a
//! view of it, so the log, the JSON and the email always agree.

pub mod email;
pub mod log;

pub use email::{EmailError, EmailSettings, SmtpSecurity};
pub use log::{
    DEFAULT_LOG_RETENTION_DAYS, ReportError, expire_logs, format_bytes, format_duration,
    render_json, render_text, subject_line, write_json_report, write_run_log,
};
