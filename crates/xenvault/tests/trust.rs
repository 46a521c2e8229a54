//! `xenvault trust URL` shows a pool's certificate fingerprint and records it.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::process::Command;

use xenvault_sim::scenario::{FlagScenario, Scenario};
use xenvault_sim::{SimConfig, Simulator};

fn start_pool(dir: &std::path::Path) -> (tokio::runtime::Runtime, Simulator) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = SimConfig::new(dir.join("pool"));
    cfg.scenario = Scenario::from_flags(&FlagScenario {
        vms: 1,
        disk_size: 2 << 20,
        written: 0.1,
        hosts: 1,
        nbd_purpose: "insecure_nbd".into(),
    });
    let sim = rt.block_on(Simulator::start(cfg)).unwrap();
    (rt, sim)
}

#[test]
fn trust_prints_and_records_the_pin_keeping_comments_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (rt, sim) = start_pool(dir.path());

    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(["trust", &sim.info.https_url, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["fingerprint"], sim.info.fingerprint);

    let config = dir.path().join("xenvault.toml");
    std::fs::write(
        &config,
        format!(
            "# my pools\n[pools.lab]\nurl = \"{}\"  # the coordinator\nuser = \"root\"\npassword-env = \"LAB_PW\"\n",
            sim.info.https_url
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(["trust", &sim.info.https_url, "--config"])
        .arg(&config)
        .args(["--pool", "lab"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains(&format!("fingerprint = \"{}\"", sim.info.fingerprint)),
        "{text}"
    );
    assert!(
        text.contains("# my pools") && text.contains("# the coordinator"),
        "{text}"
    );
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // An unknown pool is bad usage (exit 2) and leaves the file alone.
    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(["trust", &sim.info.https_url, "--config"])
        .arg(&config)
        .args(["--pool", "nope"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);

    rt.block_on(sim.shutdown()).unwrap();
}

#[test]
fn trust_refuses_plain_http_as_bad_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(["trust", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plain HTTP"));
}
