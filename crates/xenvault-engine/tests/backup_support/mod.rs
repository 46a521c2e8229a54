//! Test support for the backup tests: a real `xapi-sim` process (built on
//! first use with the cargo that runs the tests), its control API, and a
//! configuration file pointing at it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

// Both support modules include it; a test using both gets two copies.
#[allow(clippy::duplicate_mod)]
#[path = "../sim_bin/mod.rs"]
mod sim_bin;

/// The `xapi-sim` binary (see `sim_bin`).
pub fn sim_binary() -> PathBuf {
    sim_bin::xapi_sim_binary()
}

/// A running simulator (killed on drop).
pub struct Sim {
    child: Child,
    pub dir: tempfile::TempDir,
    pub info: serde_json::Value,
}

impl Sim {
    pub fn start(args: &[&str]) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(sim_binary())
            .arg("serve")
            .arg("--state")
            .arg(dir.path().join("pool"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn xapi-sim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("xapi-sim line {line:?}: {e}"));
        Sim { child, dir, info }
    }

    pub fn s(&self, key: &str) -> String {
        self.info[key].as_str().unwrap().to_string()
    }

    /// A pool connection over HTTPS, the simulator's certificate pinned.
    pub async fn pool(&self) -> xenvault_engine::restore::PoolConnection {
        xenvault_engine::restore::PoolConnection::connect(
            &self.s("https_url"),
            &self.s("user"),
            &self.s("password"),
            xenvault_xapi::tls::TlsPolicy::Pinned(self.s("fingerprint").parse().unwrap()),
        )
        .await
        .unwrap()
    }

    /// `POST <control>/<path>` with a JSON body; returns the JSON answer.
    pub fn control(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        self.http("POST", path, Some(body))
    }

    pub fn control_get(&self, path: &str) -> serde_json::Value {
        self.http("GET", path, None)
    }

    fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> serde_json::Value {
        let control = self.s("control");
        let rest = control.strip_prefix("http://").unwrap();
        let (addr, prefix) = rest.split_once('/').unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "{method} /{prefix}/{path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, text) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        assert!(head.contains(" 200 "), "{method} {path}: {head}\n{text}");
        serde_json::from_str(text.trim()).unwrap_or(serde_json::Value::Null)
    }

    /// Fails the `nth` next call of `method` with `error`.
    pub fn fail_call(&self, method: &str, nth: u64, error: &[&str]) {
        self.control(
            "faults/call",
            &serde_json::json!({"method": method, "nth": nth, "error": error}),
        );
    }

    /// Cuts the next `handler` stream after `cut_after` bytes (once).
    pub fn cut_stream(&self, handler: &str, cut_after: u64) {
        self.control(
            "faults/stream",
            &serde_json::json!({"handler": handler, "cut_after": cut_after, "times": 1}),
        );
    }

    pub fn reset_faults(&self) {
        self.control("faults/reset", &serde_json::json!({}));
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a configuration for a job `nightly` backing up `selection` (TOML
/// lines inside the job table) of the simulator into `<dir>/archive`.
pub fn write_config(sim: &Sim, dir: &Path, job_lines: &str, extra: &str) -> PathBuf {
    let pw = dir.join("pool.password");
    std::fs::write(&pw, format!("{}\n", sim.s("password"))).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let text = format!(
        r#"state-dir = "{state}"

[pools.sim]
url = "{url}"
user = "{user}"
password-file = "{pw}"
fingerprint = "{fp}"

[targets.archive]
path = "{archive}"

[jobs.nightly]
pool = "sim"
target = "archive"
{job_lines}
{extra}
"#,
        state = dir.join("state").display(),
        url = sim.s("https_url"),
        user = sim.s("user"),
        pw = pw.display(),
        fp = sim.s("fingerprint"),
        archive = dir.join("archive").display(),
    );
    let path = dir.join("xenvault.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The SHA-256 (hex) of a VDI's raw export.
pub async fn vdi_sha(pool: &xenvault_engine::restore::PoolConnection, vdi_uuid: &str) -> String {
    use futures::StreamExt as _;
    use sha2::Digest as _;
    let s = &pool.session;
    let url = xenvault_xapi::http::handler_url(
        &s.base_url(),
        "/export_raw_vdi",
        s.session_ref().expose(),
        None,
        &[("vdi", vdi_uuid), ("format", "raw")],
    );
    let mut body = pool.transfer.get(url).await.unwrap().body;
    let mut h = sha2::Sha256::new();
    while let Some(piece) = body.next().await {
        h.update(piece.unwrap());
    }
    hex::encode(h.finalize())
}
