//! The simulator as a library (how `xenvault demo` uses it): start in-process,
//! serve real sockets, inject faults through `sim.pool`, shut down, start
//! again from the same state directory.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use serde_json::json;
use xenvault_sim::scenario::{FlagScenario, Scenario};
use xenvault_sim::{SimConfig, Simulator};

fn call_blocking(
    addr: String,
    method: &'static str,
    params: serde_json::Value,
) -> serde_json::Value {
    std::thread::spawn(move || common::jsonrpc(&addr, method, params))
        .join()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_serve_fault_shutdown_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SimConfig::new(dir.path());
    cfg.password = Some("secret".into());
    cfg.scenario = Scenario::from_flags(&FlagScenario {
        vms: 2,
        disk_size: 4 << 20,
        ..Default::default()
    });
    let sim = Simulator::start(cfg.clone()).await.unwrap();
    assert_eq!(sim.info.password, "secret");
    assert!(sim.info.fingerprint.starts_with("sha256:") && sim.info.fingerprint.len() == 71);
    assert_eq!(sim.info.nbd.len(), 1);
    let addr = sim.info.url.trim_start_matches("http://").to_string();
    let r = call_blocking(
        addr.clone(),
        "session.login_with_password",
        json!(["root", "secret"]),
    );
    let s = r["result"].as_str().unwrap().to_string();
    sim.pool
        .faults
        .add_call_fault("VM.get_all", 1, vec!["TOO_MANY_PENDING_TASKS".into()]);
    let r = call_blocking(addr.clone(), "VM.get_all", json!([s]));
    assert_eq!(r["error"]["message"], "TOO_MANY_PENDING_TASKS");
    let r = call_blocking(addr.clone(), "VM.get_all", json!([s]));
    let n = r["result"].as_array().unwrap().len();
    assert_eq!(sim.pool.stats.get("calls/VM.get_all"), 2);
    sim.shutdown().await.unwrap();
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "listener closed"
    );

    let sim = Simulator::start(cfg).await.unwrap();
    let addr = sim.info.url.trim_start_matches("http://").to_string();
    let r = call_blocking(
        addr.clone(),
        "session.login_with_password",
        json!(["root", "secret"]),
    );
    let s = r["result"].as_str().unwrap().to_string();
    let r = call_blocking(addr, "VM.get_all", json!([s]));
    assert_eq!(
        r["result"].as_array().unwrap().len(),
        n,
        "same VMs after a restart"
    );
    sim.shutdown().await.unwrap();
}
