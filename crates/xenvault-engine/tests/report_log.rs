//! The run log on the target (per-VM times and the summary), the JSON
//! report round trip, and log expiry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use time::macros::datetime;
use xenvault_engine::report::{
    DEFAULT_LOG_RETENTION_DAYS, expire_logs, render_json, render_text, subject_line,
    write_json_report, write_run_log,
};
use xenvault_types::report::{RunOutcome, RunReport};

mod report_support;
use report_support::sample_report;

#[test]
fn the_run_log_has_per_vm_times_and_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let report = sample_report();
    let path = write_run_log(tmp.path(), &report).unwrap();
    assert_eq!(path, tmp.path().join("_logs/nightly-20261122-010000.log"));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, render_text(&report));
    eprintln!("{text}");
    // Per-VM start, end, duration, bytes, rate and result on the VM's line.
    let web = text
        .lines()
        .find(|l| l.trim_start().starts_with("web-01 "))
        .expect("web-01 line");
    for part in [
        "2026-11-22 01:00:05",
        "2026-11-22 01:05:13",
        "5m08s",
        "3.00 GiB",
        "9.97 MiB/s",
        "SUCCEEDED",
    ] {
        assert!(web.contains(part), "{part:?} missing in {web:?}");
    }
    let db = text
        .lines()
        .find(|l| l.trim_start().starts_with("db-02 "))
        .unwrap();
    assert!(db.contains("1m46s") && db.contains("FAILED"), "{db}");
    let big = text
        .lines()
        .find(|l| l.trim_start().starts_with("big-03 "))
        .unwrap();
    assert!(big.contains("SKIPPED"), "{big}");
    // Header and totals.
    assert!(text.contains("job:       nightly\n"));
    assert!(text.contains("pool:      pool1 (host xcp-master.example)\n"));
    assert!(
        text.contains(
            "outcome:   PARTIAL (1/3 succeeded, 1 failed, 1 skipped, 1 pool/host backup(s) failed)"
        ),
        "{text}"
    );
    assert!(text.contains("12m30s"));
    // Summary table with reasons.
    let summary = &text[text.find("\nSummary\n").expect("summary section")..];
    for line in [
        "  expected   3\n",
        "  succeeded  1\n",
        "  failed     1\n",
        "  skipped    1\n",
    ] {
        assert!(summary.contains(line), "{line:?} missing in {summary}");
    }
    assert!(summary.contains(
        "FAILED  db-02 (aaaaaaaa-0000-0000-0000-000000000002): export mid-stream: VDI_IO_ERROR"
    ));
    assert!(summary.contains("SKIPPED big-03 (aaaaaaaa-0000-0000-0000-000000000003): SR Local storage is 91% used (threshold 80%)"));
    assert!(summary.contains("FAILED  host xcp-a: host_backup: HTTP 500"));
    // Details: cleanup, location, pruned.
    assert!(text.contains("cleanup:  1 snapshot(s), 2 VDI(s) destroyed"));
    assert!(text.contains("removed old backup: /mnt/backup/web-01/20261119-010004"));
    assert!(text.contains("pool metadata pool1"));
    // No temporary file left.
    let names: Vec<String> = std::fs::read_dir(tmp.path().join("_logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["nightly-20261122-010000.log"]);
}

#[test]
fn the_json_report_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let report = sample_report();
    let path = write_json_report(tmp.path(), &report).unwrap();
    assert_eq!(path, tmp.path().join("_logs/nightly-20261122-010000.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, render_json(&report).unwrap());
    let back: RunReport = serde_json::from_str(&text).unwrap();
    assert_eq!(back, report);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["outcome"], "partial");
    assert_eq!(v["summary"]["expected"], 3);
    assert_eq!(v["summary"]["failures"][0]["name"], "db-02");
    assert_eq!(v["vms"][0]["started"], "2026-11-22T01:00:05Z");
    assert_eq!(v["vms"][1]["outcome"]["status"], "failed");
    assert_eq!(back.overall(), RunOutcome::Partial);
}

#[test]
fn the_subject_names_job_host_and_outcome() {
    let report = sample_report();
    assert_eq!(
        subject_line(&report),
        "[xenvault] nightly on pool1 (xcp-master.example): 1/3 succeeded, 1 failed, 1 skipped, 1 pool/host backup(s) failed"
    );
    let mut failed = sample_report();
    failed.vms.truncate(2);
    failed.vms.remove(0);
    failed.pool_metadata.clear();
    assert!(
        subject_line(&failed).contains(": FAILED: 0/1 succeeded, 1 failed"),
        "{}",
        subject_line(&failed)
    );
}

#[test]
fn logs_older_than_n_days_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("_logs");
    std::fs::create_dir_all(&logs).unwrap();
    let files = [
        "nightly-20261101-010000.log",  // 21 days old: removed
        "nightly-20261101-010000.json", // removed
        "weekly-20261106-235959.log",   // 15 days + 1 s: removed
        "nightly-20261107-010000.log",  // 15 days minus a bit: kept
        "nightly-20261121-010000.log",  // kept
        "README.txt",                   // not ours: kept
        "notes-1.log",                  // no timestamp: kept
    ];
    for f in files {
        std::fs::write(logs.join(f), "x").unwrap();
    }
    let now = datetime!(2026-11-22 00:00:00 UTC);
    let removed = expire_logs(tmp.path(), DEFAULT_LOG_RETENTION_DAYS, now).unwrap();
    let removed: Vec<String> = removed
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        removed,
        [
            "nightly-20261101-010000.json",
            "nightly-20261101-010000.log",
            "weekly-20261106-235959.log"
        ]
    );
    let mut left: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "README.txt",
            "nightly-20261107-010000.log",
            "nightly-20261121-010000.log",
            "notes-1.log"
        ]
    );
    // A missing _logs directory is fine.
    assert!(
        expire_logs(&tmp.path().join("nowhere"), 15, now)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn runs_started_in_the_same_second_keep_their_own_logs_and_expire_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let first = sample_report();
    let mut second = sample_report();
    second.run_id = format!("{}-again", second.run_id);
    let a = (
        write_run_log(tmp.path(), &first).unwrap(),
        write_json_report(tmp.path(), &first).unwrap(),
    );
    let b = (
        write_run_log(tmp.path(), &second).unwrap(),
        write_json_report(tmp.path(), &second).unwrap(),
    );
    assert_eq!(a.0, tmp.path().join("_logs/nightly-20261122-010000.log"));
    assert_eq!(a.1, tmp.path().join("_logs/nightly-20261122-010000.json"));
    assert_eq!(b.0, tmp.path().join("_logs/nightly-20261122-010000.1.log"));
    assert_eq!(b.1, tmp.path().join("_logs/nightly-20261122-010000.1.json"));
    assert!(
        std::fs::read_to_string(&b.0)
            .unwrap()
            .contains(&second.run_id)
    );
    assert!(
        !std::fs::read_to_string(&a.0)
            .unwrap()
            .contains(&second.run_id)
    );
    // Both runs' files expire together.
    let later = datetime!(2026-12-31 00:00:00 UTC);
    assert_eq!(expire_logs(tmp.path(), 15, later).unwrap().len(), 4);
}
