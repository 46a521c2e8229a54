//! The official Python XenAPI SDK drives the simulator over XML-RPC
//! (tests/python/sdk_check.py): login, list VMs, snapshot, is_a_template,
//! destroy the snapshot and its VDIs, an async call with its task,
//! HOST_IS_SLAVE from a member, and errors as XenAPI.Failure.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::process::Command;

fn sdk_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import XenAPI"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("python3 with the XenAPI module is required (pip install XenAPI)");
        }
        eprintln!("SKIPPED: python3 with the XenAPI module is not installed (pip install XenAPI)");
    }
    ok
}

#[test]
fn python_sdk_drives_the_simulator() {
    if !sdk_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sim = common::SimProcess::spawn(
        dir.path(),
        &["--hosts", "2", "--vms", "4", "--disk-size", "4M"],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/sdk_check.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(sim.url())
        .arg(sim.info["control"].as_str().unwrap())
        .arg("root")
        .arg(sim.password())
        .arg(sim.info["https_url"].as_str().unwrap())
        .arg(sim.info["fingerprint"].as_str().unwrap())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "sdk_check.py failed:\n{stdout}\n{stderr}"
    );
    for step in [
        "login",
        "VM.snapshot",
        "set is_a_template false",
        "destroy snapshot and its VDIs",
        "Async.VM.clone + task",
        "HOST_IS_SLAVE from a member",
        "errors as XenAPI.Failure",
        "HTTPS with the announced certificate",
        "logout",
    ] {
        assert!(
            stdout.contains(&format!("OK {step}")),
            "step {step} missing:\n{stdout}"
        );
    }
    assert!(sim.stop(), "xapi-sim did not exit cleanly on SIGTERM");
}
