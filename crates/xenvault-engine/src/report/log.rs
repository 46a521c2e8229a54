//! The run log (human text) and the JSON report, written to the target's
//! `_logs` directory, and the expiry of old ones.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;
use time::macros::format_description;
use xenvault_types::report::{ItemKind, ItemReport, RunReport, VmReport};

use crate::archive::layout::{LOGS_DIR, format_timestamp, parse_timestamp, sanitize_name};
use crate::preflight::human_bytes;

/// Logs older than this many days are removed by default (Sady-XenBackup's 15).
pub const DEFAULT_LOG_RETENTION_DAYS: u32 = 15;

/// A log or report could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// The JSON could not be produced or parsed.
    #[error("JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> ReportError {
    ReportError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// `1.50 GiB`, `12.0 MiB`, `512 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else if value >= 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// `1h02m03s`, `5m08s`, `42s`, `0.4s`.
pub fn format_duration(d: time::Duration) -> String {
    let secs = d.as_seconds_f64().max(0.0);
    if secs < 10.0 && secs.fract() != 0.0 {
        return format!("{secs:.1}s");
    }
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

fn format_rate(rate: Option<f64>) -> String {
    match rate {
        Some(r) if r.is_finite() => format!("{}/s", format_bytes(r.round() as u64)),
        _ => "-".to_string(),
    }
}

fn format_time(t: Option<OffsetDateTime>) -> String {
    match t {
        Some(t) => t
            .to_offset(time::UtcOffset::UTC)
            .format(format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .unwrap_or_else(|_| t.to_string()),
        None => "-".to_string(),
    }
}

/// The email subject: `[xenvault] nightly on pool1 (host): 5/6 succeeded, 1 failed`.
pub fn subject_line(report: &RunReport) -> String {
    let host = if report.host.is_empty() || report.host == report.pool {
        String::new()
    } else {
        format!(" ({})", report.host)
    };
    let outcome = match report.overall() {
        xenvault_types::report::RunOutcome::Failed => "FAILED: ",
        _ => "",
    };
    format!(
        "[xenvault] {} on {}{host}: {outcome}{}",
        report.job,
        report.pool,
        report.headline()
    )
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from("  ");
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[c] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn vm_row(vm: &VmReport) -> Vec<String> {
    vec![
        vm.name.clone(),
        format_time(vm.started),
        format_time(vm.finished),
        vm.duration()
            .map(format_duration)
            .unwrap_or_else(|| "-".into()),
        format_bytes(vm.bytes),
        format_rate(vm.rate()),
        vm.outcome.label().to_uppercase(),
    ]
}

fn item_row(item: &ItemReport) -> Vec<String> {
    vec![
        match item.kind {
            ItemKind::PoolMetadata => format!("pool metadata {}", item.name),
            ItemKind::HostBackup => format!("host {}", item.name),
        },
        format_time(item.started),
        format_time(item.finished),
        item.duration()
            .map(format_duration)
            .unwrap_or_else(|| "-".into()),
        format_bytes(item.bytes),
        format_rate(item.rate()),
        item.outcome.label().to_uppercase(),
    ]
}

/// The human-readable run log: header, one line per VM with start, end,
/// duration, bytes, rate and result, details (reasons, cleanup, location,
/// pruned backups), pool metadata and hosts, then the summary table.
pub fn render_text(report: &RunReport) -> String {
    let mut out = String::new();
    let totals = report.totals();
    let summary = report.summary();
    let _ = writeln!(out, "xenvault backup run log");
    let _ = writeln!(out, "job:       {}", report.job);
    let _ = writeln!(out, "pool:      {} (host {})", report.pool, report.host);
    let _ = writeln!(out, "run id:    {}", report.run_id);
    let _ = writeln!(out, "target:    {}", report.target);
    let _ = writeln!(out, "started:   {} UTC", format_time(Some(report.started)));
    let _ = writeln!(out, "finished:  {} UTC", format_time(Some(report.finished)));
    let _ = writeln!(
        out,
        "total:     {} in {}, {}",
        format_bytes(totals.bytes),
        format_duration(report.finished - report.started),
        format_rate(totals.rate)
    );
    let _ = writeln!(
        out,
        "outcome:   {} ({})",
        report.overall().label().to_uppercase(),
        report.headline()
    );
    let _ = writeln!(out);

    let header = |first: &str| {
        vec![
            first.to_string(),
            "START (UTC)".into(),
            "END (UTC)".into(),
            "DURATION".into(),
            "BYTES".into(),
            "RATE".into(),
            "RESULT".into(),
        ]
    };
    let _ = writeln!(out, "VMs");
    if report.vms.is_empty() {
        let _ = writeln!(out, "  (none expected)");
    } else {
        let mut rows = vec![header("VM")];
        rows.extend(report.vms.iter().map(vm_row));
        out.push_str(&table(&rows));
    }
    let _ = writeln!(out);
    for vm in &report.vms {
        let _ = writeln!(out, "VM {} ({})", vm.name, vm.uuid);
        let _ = writeln!(out, "  result:   {}", vm.outcome.label());
        if let Some(reason) = vm.outcome.reason() {
            let _ = writeln!(out, "  reason:   {reason}");
        }
        let _ = writeln!(out, "  cleanup:  {}", vm.cleanup.describe());
        if let Some(loc) = &vm.location {
            let _ = writeln!(out, "  stored:   {loc}");
        }
        if let Some(r) = &vm.repository {
            let _ = writeln!(
                out,
                "  repository: read {} from the pool, stored {}: {} new chunk(s), {} deduplicated",
                human_bytes(r.bytes_read),
                human_bytes(r.bytes_stored),
                r.new_chunks,
                r.dedup_chunks
            );
            for d in &r.disks {
                let _ = writeln!(
                    out,
                    "  disk {} ({}): {}{}, read {}, stored {}, {} new / {} dedup / {} zero chunk(s)",
                    d.userdevice,
                    d.key,
                    d.method,
                    if d.incremental { " (incremental)" } else { "" },
                    human_bytes(d.bytes_read),
                    human_bytes(d.bytes_stored),
                    d.new_chunks,
                    d.dedup_chunks,
                    d.zero_chunks
                );
                if let Some(reason) = &d.reason {
                    let _ = writeln!(out, "    why {}: {reason}", d.method);
                }
            }
        }
        for p in &vm.pruned {
            let _ = writeln!(out, "  removed old backup: {p}");
        }
        for n in &vm.notes {
            let _ = writeln!(out, "  note:     {n}");
        }
    }
    if !report.pool_metadata.is_empty() || !report.hosts.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Pool metadata and hosts");
        let mut rows = vec![header("ITEM")];
        rows.extend(
            report
                .pool_metadata
                .iter()
                .chain(&report.hosts)
                .map(item_row),
        );
        out.push_str(&table(&rows));
        for item in report.pool_metadata.iter().chain(&report.hosts) {
            if let Some(reason) = item.outcome.reason() {
                let _ = writeln!(out, "  {}: {reason}", item_row(item)[0]);
            }
            if let Some(loc) = &item.location {
                let _ = writeln!(out, "  {} stored: {loc}", item_row(item)[0]);
            }
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Summary");
    let rows = vec![
        vec!["expected".to_string(), summary.expected.to_string()],
        vec!["succeeded".to_string(), summary.succeeded.to_string()],
        vec!["failed".to_string(), summary.failed.to_string()],
        vec!["skipped".to_string(), summary.skipped.to_string()],
    ];
    out.push_str(&table(&rows));
    for f in &summary.failures {
        let _ = writeln!(out, "  FAILED  {} ({}): {}", f.name, f.uuid, f.reason);
    }
    for s in &summary.skips {
        let _ = writeln!(out, "  SKIPPED {} ({}): {}", s.name, s.uuid, s.reason);
    }
    for f in &summary.other_failures {
        let _ = writeln!(out, "  FAILED  {}: {}", f.name, f.reason);
    }
    for p in &summary.problems {
        let _ = writeln!(out, "  PROBLEM {p}");
    }
    let _ = writeln!(
        out,
        "  total   {} in {}, {}",
        format_bytes(totals.bytes),
        format_duration(report.finished - report.started),
        format_rate(totals.rate)
    );
    out
}

/// The JSON report (pretty, stable field names; parse back with serde).
pub fn render_json(report: &RunReport) -> Result<String, ReportError> {
    let mut value = serde_json::to_value(report)?;
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("summary".into(), serde_json::to_value(report.summary())?);
        map.insert("totals".into(), serde_json::to_value(report.totals())?);
        map.insert("outcome".into(), serde_json::to_value(report.overall())?);
    }
    Ok(serde_json::to_string_pretty(&value)? + "\n")
}

/// `<root>/_logs/<job>-<YYYYMMDD-HHMMSS>.<ext>`; when a run of the same job
/// started in the same second already wrote that name, `<job>-<ts>.<n>.<ext>`
/// with the first free `n`, so no run's log replaces another's.
fn log_path(root: &Path, report: &RunReport, ext: &str) -> PathBuf {
    let dir = root.join(LOGS_DIR);
    let stem = format!(
        "{}-{}",
        sanitize_name(&report.job),
        format_timestamp(report.started)
    );
    let first = dir.join(format!("{stem}.{ext}"));
    if !first.exists() {
        return first;
    }
    (1u32..)
        .map(|n| dir.join(format!("{stem}.{n}.{ext}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

fn write_atomic(path: &Path, text: &str) -> Result<(), ReportError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io("create directory", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| io("write", &tmp, e))?;
    f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("rename", &tmp, e))
}

/// Writes the text log to `<root>/_logs/<job>-<YYYYMMDD-HHMMSS>.log`
/// (the run's start, UTC) and returns its path.
pub fn write_run_log(root: &Path, report: &RunReport) -> Result<PathBuf, ReportError> {
    let path = log_path(root, report, "log");
    write_atomic(&path, &render_text(report))?;
    Ok(path)
}

/// Writes the JSON report next to the log (`.json`) and returns its path.
pub fn write_json_report(root: &Path, report: &RunReport) -> Result<PathBuf, ReportError> {
    let path = log_path(root, report, "json");
    write_atomic(&path, &render_json(report)?)?;
    Ok(path)
}

/// Removes logs and JSON reports in `<root>/_logs` whose name's time
/// (`<job>-YYYYMMDD-HHMMSS.log|.json`) is more than `days` days before
/// `now`. Other files are left alone. Returns what was removed.
pub fn expire_logs(
    root: &Path,
    days: u32,
    now: OffsetDateTime,
) -> Result<Vec<PathBuf>, ReportError> {
    let dir = root.join(LOGS_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list", &dir, e)),
    };
    let cutoff = now - time::Duration::days(i64::from(days));
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io("list", &dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name
            .strip_suffix(".log")
            .or_else(|| name.strip_suffix(".json"))
        else {
            continue;
        };
        // `<job>-<ts>.<n>` when several runs started in the same second.
        let stem = match stem.rsplit_once('.') {
            Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
            _ => stem,
        };
        let Some(ts) = stem.len().checked_sub(15).and_then(|i| stem.get(i..)) else {
            continue;
        };
        if !stem[..stem.len() - 15].ends_with('-') {
            continue;
        }
        let Some(time) = parse_timestamp(ts) else {
            continue;
        };
        if time < cutoff {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| io("remove", &path, e))?;
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(12 << 20), "12.0 MiB");
        assert_eq!(format_bytes(300 << 30), "300 GiB");
        assert_eq!(format_duration(time::Duration::seconds(3723)), "1h02m03s");
        assert_eq!(format_duration(time::Duration::seconds(308)), "5m08s");
        assert_eq!(format_duration(time::Duration::seconds(42)), "42s");
        assert_eq!(format_duration(time::Duration::milliseconds(400)), "0.4s");
    }
}
