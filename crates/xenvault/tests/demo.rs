//! `xenvault demo` runs end to end on a clean machine and says what it did.

use std::process::Command;

#[test]
fn demo_passes_and_reports_every_vm() {
    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(["demo", "--vms", "2", "--disk-size", "8M", "--json"])
        .output()
        .expect("run xenvault demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({:?}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("demo --json prints JSON");
    let vms = report["vms"].as_array().expect("vms array");
    assert_eq!(vms.len(), 2);
    for vm in vms {
        assert_eq!(vm["ok"], true, "{vm}");
        assert_eq!(vm["changed_blocks"], 24, "{vm}");
        assert_eq!(vm["nbd_bytes"], 24 * 65536, "{vm}");
    }
    assert_eq!(report["leftover_snapshots"], 0);
}

#[test]
fn demo_refuses_oversized_disks_as_bad_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(["demo", "--disk-size", "8G"])
        .output()
        .expect("run xenvault demo");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--disk-size"));
}
