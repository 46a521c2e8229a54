//! Shared helpers of the data-plane tests: an in-process simulator, a raw HTTP/1.x client
//! (so the tests see exactly what goes on the wire), XML-RPC calls, task inspection and
//! outside tools (which must exist when CI=true).

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xenvault_sim::db::Fields;
use xenvault_sim::scenario::{FlagScenario, Scenario};
use xenvault_sim::server::{SimConfig, Simulator};
use xenvault_types::Value;
use xenvault_types::rpc::{Envelope, MethodCall, MethodResponse};

pub const MIB: u64 = 1 << 20;

/// A running simulator in a temporary state directory.
pub struct Sim {
    pub sim: Simulator,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub session: String,
}

impl Sim {
    pub fn pool(&self) -> &std::sync::Arc<xenvault_sim::Pool> {
        &self.sim.pool
    }

    pub async fn stop(self) {
        self.sim.shutdown().await.unwrap();
    }
}

/// Starts a simulator with `vms` VMs of `disk` bytes, 10% written, and the NBD purpose.
pub async fn start(vms: usize, disk: u64, nbd_purpose: &str) -> Sim {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SimConfig::new(dir.path().join("state"));
    cfg.scenario = Scenario::from_flags(&FlagScenario {
        vms,
        disk_size: disk,
        written: 0.10,
        hosts: 1,
        nbd_purpose: nbd_purpose.into(),
    });
    let sim = Simulator::start(cfg).await.unwrap();
    let addr: SocketAddr = sim.info.url.trim_start_matches("http://").parse().unwrap();
    let pool = sim.pool.clone();
    let session = pool.new_session("root", "handlers-test", &pool.coordinator());
    Sim {
        sim,
        dir,
        addr,
        session,
    }
}

/// A raw HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn status(&self) -> u16 {
        self.status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn parse_response(raw: &[u8]) -> Resp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Resp {
        status_line,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

/// Sends a request (head lines given) and reads the whole response until EOF.
pub async fn request(addr: SocketAddr, head: &str, body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (and even close) before the body is read: ignore write errors.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    parse_response(&raw)
}

pub async fn get(addr: SocketAddr, target: &str) -> Resp {
    request(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n"),
        &[],
    )
    .await
}

pub async fn put(addr: SocketAddr, target: &str, body: &[u8]) -> Resp {
    request(
        addr,
        &format!(
            "PUT {target} HTTP/1.1\r\nHost: sim\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ),
        body,
    )
    .await
}

/// An XML-RPC call; `Ok(value)` or `Err(error description)`.
pub async fn rpc(addr: SocketAddr, method: &str, params: Vec<Value>) -> Result<Value, Vec<String>> {
    let body = MethodCall {
        method: method.into(),
        params,
    }
    .to_xml();
    let r = request(
        addr,
        &format!(
            "POST / HTTP/1.1\r\nHost: sim\r\nContent-Type: text/xml\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ),
        body.as_bytes(),
    )
    .await;
    let text = String::from_utf8(r.body).unwrap();
    let MethodResponse::Value(v) = MethodResponse::from_xml(&text).unwrap() else {
        panic!("fault from {method}: {text}");
    };
    match Envelope::from_value(&v).unwrap() {
        Envelope::Success(v) => Ok(v),
        Envelope::Failure(d) => Err(d),
    }
}

pub fn s(v: &str) -> Value {
    Value::str(v)
}

/// The task record: (status, result, error_info).
pub fn task(pool: &xenvault_sim::Pool, task: &str) -> (String, String, Vec<String>) {
    let db = pool.db();
    let r = db.get("task", task).unwrap();
    (
        r.str_of("status").to_string(),
        r.str_of("result").to_string(),
        r.strs_of("error_info"),
    )
}

/// Ref of the VM named `name`.
pub fn vm_by_name(pool: &xenvault_sim::Pool, name: &str) -> String {
    let db = pool.db();
    db.rows("VM")
        .find(|(_, r)| r.str_of("name_label") == name)
        .map(|(r, _)| r.clone())
        .unwrap_or_else(|| panic!("no VM {name}"))
}

/// The (ref, uuid, size) of the first disk VDI of a VM.
pub fn vm_disk(pool: &xenvault_sim::Pool, vm: &str) -> (String, String, u64) {
    let db = pool.db();
    for vbd in db.get("VM", vm).unwrap().strs_of("VBDs") {
        let rec = db.get("VBD", &vbd).unwrap();
        if rec.str_of("type") == "Disk" {
            let vdi = rec.str_of("VDI").to_string();
            let v = db.get("VDI", &vdi).unwrap();
            return (
                vdi.clone(),
                v.str_of("uuid").to_string(),
                v.int_of("virtual_size") as u64,
            );
        }
    }
    panic!("VM {vm} has no disk");
}

/// The whole content of a disk, read from the store.
pub fn disk_bytes(pool: &xenvault_sim::Pool, uuid: &str) -> Vec<u8> {
    let size = pool.disks.info(uuid).unwrap().size;
    let mut buf = vec![0u8; size as usize];
    pool.disks.read_at(uuid, 0, &mut buf).unwrap();
    buf
}

/// True when `tool` runs; when it does not, fails under CI=true, else warns and
/// returns false so the caller skips.
pub fn have_tool(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required under CI=true but is not installed");
        }
        eprintln!("!!! SKIPPING: {tool} is not installed");
    }
    ok
}

/// Runs a command and returns its stdout; panics with its stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}
