//! `xenvault backup JOB`: one run of a job, with progress on stderr (a live
//! line with rate and ETA on a terminal, plain lines otherwise, e.g. under
//! cron) and the summary on stdout (or the JSON report with `--json`).
//!
//! SIGINT and SIGTERM stop a run gracefully (see [`watch_signals`]): the
//! run stops its VMs, cleans up its snapshots, writes its report, and the
//! process exits with 130 or 143; a second signal exits at once.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use xenvault_engine::backup::Progress;
use xenvault_engine::job::{self, Cancel, ExitStatus, RunOptions};
use xenvault_engine::preflight::human_bytes;
use xenvault_types::report::RunReport;

use crate::cli::JobArgs;
use crate::exit::ExitCode;
use crate::plan::{job_error, load_config, today};

/// Runs `xenvault backup`.
pub async fn run(args: JobArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_deref())?;
    let progress: Arc<dyn Progress> =
        Arc::new(StderrProgress::new(std::io::stderr().is_terminal()));
    let cancel = Cancel::new();
    let stopped_by = watch_signals(cancel.clone())?;
    let options = RunOptions {
        today: today(&args),
        progress,
        cancel,
    };
    let run = job::run_job(&config, &args.job, options).await;
    let stop = stopped_by.get().copied();
    let run = match (run, stop) {
        (Ok(run), _) => run,
        (Err(e), Some(signal)) => {
            eprintln!("xenvault: error: {e}");
            return Ok(signal.exit_code());
        }
        (Err(e), None) => return Err(job_error(e)),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&run.report).context("cannot encode the report")?
        );
    } else {
        print!("{}", summary(&run.report));
    }
    if let Some(signal) = stop {
        return Ok(signal.exit_code());
    }
    Ok(match run.exit {
        ExitStatus::Success => ExitCode::Success,
        ExitStatus::Partial => ExitCode::Partial,
        ExitStatus::Usage => ExitCode::Usage,
        ExitStatus::Failure => ExitCode::Failure,
    })
}

/// A signal that stops a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopSignal {
    /// Ctrl-C.
    Interrupt,
    /// `kill`, systemd's stop, a timeout.
    Terminate,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }

    /// 128 + the signal number, as a shell reports a process it stopped.
    fn exit_code(self) -> ExitCode {
        match self {
            StopSignal::Interrupt => ExitCode::InterruptedBySigint,
            StopSignal::Terminate => ExitCode::InterruptedBySigterm,
        }
    }
}

/// Installs the SIGINT and SIGTERM handlers of a run. The first signal
/// says so on stderr and cancels the run (it stops its VMs, removes its
/// snapshots, writes its report; see [`Cancel`]); a second one exits at
/// once with its code (the next run's leftover sweep is the safety net).
/// The cell holds the first signal, once one came.
fn watch_signals(cancel: Cancel) -> anyhow::Result<Arc<OnceLock<StopSignal>>> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let mut interrupt =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    async fn next(interrupt: &mut Signal, terminate: &mut Signal) -> StopSignal {
        tokio::select! {
            Some(()) = interrupt.recv() => StopSignal::Interrupt,
            Some(()) = terminate.recv() => StopSignal::Terminate,
            else => std::future::pending().await,
        }
    }
    let first = Arc::new(OnceLock::new());
    let seen = first.clone();
    tokio::spawn(async move {
        let signal = next(&mut interrupt, &mut terminate).await;
        let _ = seen.set(signal);
        let fresh_line = if std::io::stderr().is_terminal() {
            "\r\x1b[2K"
        } else {
            ""
        };
        eprintln!(
            "{fresh_line}xenvault: interrupted by {}: stopping, cleaning up (send it again to exit at once)",
            signal.name()
        );
        cancel.cancel(format!("interrupted by {}", signal.name()));
        let again = next(&mut interrupt, &mut terminate).await;
        eprintln!(
            "xenvault: {} again: exiting now, without cleaning up (the next run removes this run's snapshots)",
            again.name()
        );
        std::process::exit(again.exit_code() as i32);
    });
    Ok(first)
}

/// The human summary printed at the end of a run.
pub fn summary(report: &RunReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Job {} run {}: {}\n",
        report.job,
        report.run_id,
        report.headline()
    ));
    for vm in &report.vms {
        let secs = vm.duration().map_or(String::new(), |d| {
            format!(" in {:.1} s", d.as_seconds_f64())
        });
        let rate = vm
            .rate()
            .map_or(String::new(), |r| format!(" ({}/s)", human_bytes(r as u64)));
        out.push_str(&format!(
            "  {:<24} {:<9} {}{secs}{rate}{}\n",
            vm.name,
            vm.outcome.label(),
            human_bytes(vm.bytes),
            vm.outcome
                .reason()
                .map_or(String::new(), |r| format!(" — {r}"))
        ));
    }
    for item in report.pool_metadata.iter().chain(&report.hosts) {
        out.push_str(&format!(
            "  {:<24} {:<9} {}{}\n",
            item.name,
            item.outcome.label(),
            human_bytes(item.bytes),
            item.outcome
                .reason()
                .map_or(String::new(), |r| format!(" — {r}"))
        ));
    }
    for p in &report.problems {
        out.push_str(&format!("  problem: {p}\n"));
    }
    out
}

struct VmProgress {
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
}

/// Progress on stderr: a redrawn status line on a terminal, plain lines
/// (start, every 10 s, end) otherwise.
struct StderrProgress {
    tty: bool,
    vms: Mutex<BTreeMap<String, VmProgress>>,
    last_draw: Mutex<Instant>,
}

impl StderrProgress {
    fn new(tty: bool) -> StderrProgress {
        StderrProgress {
            tty,
            vms: Mutex::new(BTreeMap::new()),
            last_draw: Mutex::new(Instant::now()),
        }
    }

    fn line_of(name: &str, p: &VmProgress) -> String {
        let secs = p.started.elapsed().as_secs_f64().max(0.001);
        let rate = p.done as f64 / secs;
        let pct = if p.total > 0 {
            p.done as f64 * 100.0 / p.total as f64
        } else {
            0.0
        };
        let eta = if rate > 0.0 && p.total > p.done {
            let s = ((p.total - p.done) as f64 / rate) as u64;
            format!("{}:{:02}", s / 60, s % 60)
        } else {
            "-".to_string()
        };
        format!("{name} {pct:.0}% {}/s ETA {eta}", human_bytes(rate as u64))
    }

    fn draw(&self, vms: &BTreeMap<String, VmProgress>) {
        let line: Vec<String> = vms.iter().map(|(n, p)| Self::line_of(n, p)).collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", line.join(" | "));
        let _ = err.flush();
    }
}

impl Progress for StderrProgress {
    fn started(&self, vm: &str, total: u64) {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.insert(
            vm.to_string(),
            VmProgress {
                total,
                done: 0,
                started: Instant::now(),
                last_line: Instant::now(),
            },
        );
        if !self.tty {
            eprintln!("{vm}: export started ({} of disk)", human_bytes(total));
        }
    }

    fn advanced(&self, vm: &str, done: u64) {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = vms.get_mut(vm) else { return };
        p.done = done;
        if self.tty {
            let mut last = self.last_draw.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= Duration::from_millis(200) {
                *last = Instant::now();
                self.draw(&vms);
            }
        } else if p.last_line.elapsed() >= Duration::from_secs(10) {
            p.last_line = Instant::now();
            eprintln!("{}", Self::line_of(vm, p));
        }
    }

    fn finished(&self, vm: &str, result: Result<(), &str>) {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        let p = vms.remove(vm);
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        let took = p.map_or(0.0, |p| p.started.elapsed().as_secs_f64());
        match result {
            Ok(()) => eprintln!("{vm}: done in {took:.1} s"),
            Err(e) => eprintln!("{vm}: FAILED: {e}"),
        }
        if self.tty && !vms.is_empty() {
            self.draw(&vms);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_show_percent_rate_and_eta() {
        let p = VmProgress {
            total: 100 << 20,
            done: 50 << 20,
            started: Instant::now() - Duration::from_secs(10),
            last_line: Instant::now(),
        };
        let line = StderrProgress::line_of("vm-01", &p);
        assert!(line.starts_with("vm-01 50% "), "{line}");
        assert!(line.contains("/s ETA 0:1"), "{line}");
    }
}
