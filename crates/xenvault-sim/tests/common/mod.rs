//! Test helpers: spawn the real `xapi-sim` binary on port 0, read its JSON
//! line, talk raw HTTP to it, stop it with SIGTERM.
#![allow(dead_code, clippy::unwrap_used)] // tests may unwrap

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `xapi-sim serve`.
pub struct SimProcess {
    pub child: Child,
    pub info: serde_json::Value,
}

impl SimProcess {
    /// Starts `xapi-sim serve --state DIR <extra>` and waits for its JSON line.
    pub fn spawn(state: &std::path::Path, extra: &[&str]) -> SimProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xapi-sim"))
            .arg("serve")
            .arg("--state")
            .arg(state)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn xapi-sim");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the JSON line");
        let info: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
        SimProcess { child, info }
    }

    pub fn url(&self) -> String {
        self.info["url"].as_str().unwrap().to_string()
    }

    pub fn addr(&self) -> String {
        self.url().trim_start_matches("http://").to_string()
    }

    pub fn password(&self) -> String {
        self.info["password"].as_str().unwrap().to_string()
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        false
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A raw HTTP exchange: sends `request` bytes, reads until close.
/// Returns (status, head, body).
pub fn raw(addr: &str, request: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, head, buf[end..].to_vec())
}

/// POSTs a body with `Connection: close`.
pub fn post(addr: &str, path: &str, content_type: &str, body: &str) -> (u16, String, String) {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (st, head, body) = raw(addr, req.as_bytes());
    (st, head, String::from_utf8_lossy(&body).into_owned())
}

/// GET with `Connection: close`.
pub fn get(addr: &str, path: &str) -> (u16, String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (st, head, body) = raw(addr, req.as_bytes());
    (st, head, String::from_utf8_lossy(&body).into_owned())
}

/// One JSON-RPC v2 call; returns the whole response object.
pub fn jsonrpc(addr: &str, method: &str, params: serde_json::Value) -> serde_json::Value {
    let body = serde_json::json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        .to_string();
    let (st, _, text) = post(addr, "/jsonrpc", "application/json", &body);
    assert_eq!(st, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// A JSON-RPC call that must succeed; returns `result`.
pub fn call(addr: &str, method: &str, params: serde_json::Value) -> serde_json::Value {
    let r = jsonrpc(addr, method, params);
    assert!(r.get("error").is_none(), "{method} failed: {r}");
    r["result"].clone()
}

/// Logs in over JSON-RPC.
pub fn login(sim: &SimProcess) -> String {
    call(
        &sim.addr(),
        "session.login_with_password",
        serde_json::json!(["root", sim.password(), "2.21", "test"]),
    )
    .as_str()
    .unwrap()
    .to_string()
}
