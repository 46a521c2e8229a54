//! The data plane through the real `xapi-sim` binary: spawn it, read its JSON line, log
//! in over XML-RPC, export a disk over HTTP, read it over NBD with the address
//! `VDI.get_nbd_info` gives, and stop it with SIGTERM.

#![allow(clippy::unwrap_used)] // tests may unwrap (project code rules)

mod handlers_util;

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use handlers_util::*;
use xenvault_types::Value;
use xenvault_xapi::nbd::client::{NbdConnection, NbdOptions};

/// Kills the simulator we started if the test fails before stopping it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_exports_and_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xapi-sim"))
        .args(["serve", "--state"])
        .arg(dir.path().join("state"))
        .args(["--vms", "2", "--disk-size", "8M", "--written", "10%"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut guard = KillOnDrop(Some(child));
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr: SocketAddr = info["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (user, password) = (
        info["user"].as_str().unwrap(),
        info["password"].as_str().unwrap(),
    );

    let session = rpc(
        addr,
        "session.login_with_password",
        vec![s(user), s(password), s("1.0"), s("handlers-binary")],
    )
    .await
    .unwrap();
    let session = session.as_str().unwrap().to_string();
    let call = |m: &'static str, args: Vec<Value>| {
        let mut p = vec![s(&session)];
        p.extend(args);
        rpc(addr, m, p)
    };
    let vm = call("VM.get_by_name_label", vec![s("vm-02")])
        .await
        .unwrap();
    let vm = vm.as_array().unwrap()[0].as_str().unwrap().to_string();
    let vbds = call("VM.get_VBDs", vec![s(&vm)]).await.unwrap();
    let vbd = vbds.as_array().unwrap()[0].as_str().unwrap().to_string();
    let vdi = call("VBD.get_VDI", vec![s(&vbd)])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let size: u64 = call("VDI.get_virtual_size", vec![s(&vdi)])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let task = call("task.create", vec![s("export"), s("")])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();

    let r = get(
        addr,
        &format!("/export_raw_vdi?session_id={session}&vdi={vdi}&task_id={task}"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.body.len() as u64, size);
    let status = call("task.get_status", vec![s(&task)]).await.unwrap();
    assert_eq!(status.as_str().unwrap(), "success");

    // NBD at the address get_nbd_info reports (insecure_nbd by default: no cert needed).
    let infos = call("VDI.get_nbd_info", vec![s(&vdi)]).await.unwrap();
    let rec = &infos.as_array().unwrap()[0];
    let port: u16 = match rec.get("port").unwrap() {
        Value::Int(p) => *p as u16,
        v => v.as_str().unwrap().parse().unwrap(),
    };
    let mut opts = NbdOptions::new(
        format!("{}:{port}", rec.get("address").unwrap().as_str().unwrap()),
        rec.get("exportname").unwrap().as_str().unwrap(),
    );
    opts.structured_replies = false;
    let conn = NbdConnection::connect(&opts).await.unwrap();
    assert_eq!(conn.size(), size);
    let data = conn.read(0, size as u32).await.unwrap();
    assert_eq!(data, r.body);
    conn.disconnect().await.unwrap();

    let mut child = guard.0.take().unwrap();
    let pid = child.id().to_string();
    run(Command::new("kill").args(["-TERM", &pid]));
    let status = child.wait().unwrap();
    assert!(status.success(), "xapi-sim exited with {status}");
}
