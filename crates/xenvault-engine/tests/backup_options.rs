//! Backup options against a real `xapi-sim` process: the boot disk only
//! (the snapshot ignores the other VDIs through `VM.snapshot`'s
//! `ignore_vdis`), the per-host limit, and the NAUbackup-style status log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup_support;

use backup_support::{Sim, write_config};
use xenvault_engine::job::{self, RunOptions};
use xenvault_types::report::{CleanupOutcome, Outcome, RunReport};

const TWO_VMS_TWO_DISKS: &str = r#"
templates = false
[pool]
name = "options"
[[hosts]]
name = "h1"
[[vms]]
name = "a"
power_state = "Running"
host = 0
[[vms.disks]]
size = "4M"
written = "20%"
[[vms.disks]]
size = "2M"
written = "20%"
[[vms]]
name = "b"
power_state = "Running"
host = 0
[[vms.disks]]
size = "4M"
written = "20%"
[[vms.disks]]
size = "2M"
written = "20%"
"#;

async fn run(cfg: &std::path::Path) -> RunReport {
    let config = xenvault_engine::config::load(cfg).unwrap();
    job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap()
        .report
}

fn start(dir: &std::path::Path) -> Sim {
    let scenario = dir.join("scenario.toml");
    std::fs::write(&scenario, TWO_VMS_TWO_DISKS).unwrap();
    Sim::start(&["--scenario", scenario.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_disk_only_snapshots_and_stores_one_disk() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(dir.path());
    // Per-disk raw, boot disk only: one file.
    let cfg = write_config(
        &sim,
        dir.path(),
        "names = [\"a\"]\ndisks = \"boot\"\nmode = \"raw\"",
        "",
    );
    let report = run(&cfg).await;
    assert_eq!(report.vms[0].outcome, Outcome::Succeeded, "{report:#?}");
    let loc = report.vms[0].location.clone().unwrap();
    let raws: Vec<u64> = std::fs::read_dir(&loc)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "raw"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(raws, [4 << 20]);
    // The snapshot itself had only the boot disk: one snapshot VDI destroyed.
    assert_eq!(
        report.vms[0].cleanup,
        CleanupOutcome::Cleaned {
            snapshots: 1,
            vdis: 1
        },
        "{report:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_host_limit_serialises_vms_of_one_host_and_the_status_log_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(dir.path());
    // Slow exports so that two parallel ones would surely overlap.
    sim.control(
        "faults/stream",
        &serde_json::json!({"handler": "export", "bytes_per_sec": 8_000_000}),
    );
    let status = dir.path().join("status.log");
    let cfg = write_config(
        &sim,
        dir.path(),
        &format!(
            "all-vms = true\nconcurrency = 2\nper-host-limit = 1\nstatus-log = \"{}\"",
            status.display()
        ),
        "",
    );
    let report = run(&cfg).await;
    assert!(
        report.vms.iter().all(|v| v.outcome == Outcome::Succeeded),
        "{report:#?}"
    );
    let mut spans: Vec<_> = report
        .vms
        .iter()
        .map(|v| (v.started.unwrap(), v.finished.unwrap()))
        .collect();
    spans.sort();
    assert!(
        spans[0].1 <= spans[1].0,
        "VMs of one host overlapped: {spans:?}"
    );
    let text = std::fs::read_to_string(&status).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("running") && lines[1].contains("succeeded"),
        "{text}"
    );
}
