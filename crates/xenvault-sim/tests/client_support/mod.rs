//! Shared helpers of the `client_*` tests: OUR client (xenvault-xapi) against the real
//! `xapi-sim` binary. A [`SimProc`] runs `xapi-sim serve` on port 0 in a temporary state
//! directory and is killed on drop; [`Ctx`] is a logged-in session plus an
//! [`HttpTransfer`]; the rest fetches exports inside tasks, decodes them, talks to the
//! control API (`/_sim/…`) and bounds every step with a timeout so nothing can hang.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::{BTreeMap, BTreeSet};
use std::future::IntoFuture;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use xenvault_formats::vhd::{DiskType, ParentInfo, VhdDecoder};
use xenvault_formats::xva::{OvaXml, XvaDecoder, XvaEvent};
use xenvault_types::{Extent, ExtentData};
use xenvault_xapi::error::Error;
use xenvault_xapi::http::{HttpError, HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::nbd::client::{NbdError, NbdMultiReader, NbdOptions, NbdTls};
use xenvault_xapi::records::{NetworkPurpose, Task, VbdType, Vdi, VdiRef, Vm, VmRef};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::task::WaitOptions;
use xenvault_xapi::tls::{Fingerprint, TlsPolicy};

/// 64 KiB: the CBT block.
pub const CBT_BLOCK: u64 = 64 << 10;
/// 2 MiB: the VHD block.
pub const VHD_BLOCK: u64 = 2 << 20;
/// The limit of any single step; a step that takes longer is a hang.
pub const STEP: Duration = Duration::from_secs(30);

/// Runs `fut` and fails the test if it does not finish within `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl IntoFuture<Output = T>) -> T {
    match tokio::time::timeout(limit, fut.into_future()).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}: the client hangs"),
    }
}

/// What the simulator printed on its JSON line.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Info {
    pub url: String,
    pub https_url: String,
    pub fingerprint: String,
    pub nbd: Vec<String>,
    pub user: String,
    pub password: String,
    pub control: String,
}

/// A running `xapi-sim serve` process in a temporary state directory; killed on drop.
pub struct SimProc {
    child: Child,
    pub info: Info,
    pub dir: tempfile::TempDir,
}

impl SimProc {
    /// `xapi-sim serve --state <tmp> <args>` (flags such as `--vms 2 --disk-size 8M`).
    pub fn spawn(args: &[&str]) -> SimProc {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_xapi-sim"))
            .arg("serve")
            .arg("--state")
            .arg(dir.path().join("state"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot spawn xapi-sim");
        let stdout = child.stdout.take().expect("xapi-sim stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        if read.is_err() || line.trim().is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("xapi-sim printed no JSON line ({read:?}); args {args:?}");
        }
        let info: Info = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("xapi-sim JSON line {line:?}: {e}"));
        SimProc { child, info, dir }
    }

    /// Starts with a TOML scenario file (written into the temporary directory).
    pub fn spawn_scenario(toml: &str, extra: &[&str]) -> SimProc {
        let scenario_dir = tempfile::tempdir().unwrap();
        let path = scenario_dir.path().join("scenario.toml");
        std::fs::write(&path, toml).unwrap();
        let path = path.to_str().unwrap().to_string();
        let mut args = vec!["--scenario", path.as_str()];
        args.extend_from_slice(extra);
        SimProc::spawn(&args)
    }

    /// `host:port` of the control API (the coordinator's plain listener at start).
    pub fn control_addr(&self) -> String {
        self.info
            .control
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string()
    }

    /// The certificate fingerprint the simulator presents.
    pub fn fingerprint(&self) -> Fingerprint {
        self.info.fingerprint.parse().unwrap()
    }

    /// A control API call that must answer 200; returns its JSON.
    pub async fn control(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let (status, json) = self.control_status(method, path, body).await;
        assert_eq!(status, 200, "{method} {path}: {json}");
        json
    }

    /// A control API call; returns (status, JSON).
    pub async fn control_status(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let body = body.to_string();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let (status, _, reply) = within(STEP, "control API call", async {
            raw_http(&self.control_addr(), head.as_bytes(), body.as_bytes()).await
        })
        .await;
        let json = if reply.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&reply).unwrap_or_else(|e| {
                panic!(
                    "{path}: not JSON ({e}): {}",
                    String::from_utf8_lossy(&reply)
                )
            })
        };
        (status, json)
    }

    /// Guest writes of `blocks` 64 KiB blocks on a VDI (uuid or ref); returns the blocks.
    pub async fn guest_write(&self, vdi: &str, seed: u64, blocks: u64) -> BTreeSet<u64> {
        let reply = self
            .control(
                "POST",
                "/_sim/guest-write",
                serde_json::json!({"vdi": vdi, "seed": seed, "blocks": blocks}),
            )
            .await;
        let written: BTreeSet<u64> = reply["vdis"][0]["blocks"]
            .as_array()
            .unwrap_or_else(|| panic!("guest-write reply without blocks: {reply}"))
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(written.len() as u64, blocks, "guest-write reply {reply}");
        written
    }

    /// Guest writes of exactly the given 64 KiB blocks.
    pub async fn guest_write_blocks(&self, vdi: &str, seed: u64, blocks: &[u64]) {
        self.control(
            "POST",
            "/_sim/guest-write",
            serde_json::json!({"vdi": vdi, "seed": seed, "block_list": blocks}),
        )
        .await;
    }

    /// A counter of `GET /_sim/stats` (`group`, `name`), 0 if absent.
    pub async fn stat(&self, group: &str, name: &str) -> u64 {
        let stats = self
            .control("GET", "/_sim/stats", serde_json::Value::Null)
            .await;
        stats[group][name].as_u64().unwrap_or(0)
    }
}

impl Drop for SimProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One raw HTTP/1.1 exchange over a fresh TCP connection, read until the server closes.
/// Returns (status, head, body).
pub async fn raw_http(addr: &str, head: &[u8], body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    // The server may answer and close before reading the body.
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&buf)))
        + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, head, buf[end..].to_vec())
}

/// Whether an outside tool is installed. Missing with `CI=true` fails the test;
/// otherwise the caller skips loudly.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required (CI=true) but is not installed");
        }
        eprintln!("!!!!! SKIPPING the {tool} part of this test: {tool} is not installed !!!!!");
    }
    found
}

/// Our client logged in to a simulator, with an HTTP transfer of the same TLS policy.
pub struct Ctx {
    pub session: Session,
    pub transfer: HttpTransfer,
    pub policy: TlsPolicy,
}

impl Ctx {
    /// Logs in over HTTPS with the simulator's certificate pinned.
    pub async fn https(sim: &SimProc) -> Ctx {
        Ctx::connect(
            sim,
            &sim.info.https_url,
            TlsPolicy::Pinned(sim.fingerprint()),
            TransferOptions::default(),
        )
        .await
    }

    /// Logs in over plain HTTP.
    pub async fn http(sim: &SimProc) -> Ctx {
        Ctx::connect(
            sim,
            &sim.info.url,
            TlsPolicy::Pinned(sim.fingerprint()),
            TransferOptions::default(),
        )
        .await
    }

    /// Logs in at `url` with `policy`; transfers use `options`.
    pub async fn connect(
        sim: &SimProc,
        url: &str,
        policy: TlsPolicy,
        options: TransferOptions,
    ) -> Ctx {
        let session = within(
            STEP,
            "login",
            Client::connect(
                url,
                Credentials::new(sim.info.user.clone(), sim.info.password.clone()),
                policy.clone(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("login at {url} failed: {e}"));
        let transfer = HttpTransfer::new(&policy, options).unwrap();
        Ctx {
            session,
            transfer,
            policy,
        }
    }

    /// The VM named `name`.
    pub async fn vm(&self, name: &str) -> (VmRef, Vm) {
        let all = self.session.vm().get_all_records().await.unwrap();
        all.into_iter()
            .find(|(_, vm)| vm.name_label == name && vm.is_regular_vm())
            .unwrap_or_else(|| panic!("no VM named {name}"))
    }

    /// The VM's disks (Disk VBDs with a VDI), in device order.
    pub async fn vm_disks(&self, vm: &VmRef) -> Vec<(VdiRef, Vdi)> {
        let record = self.session.vm().get_record(vm).await.unwrap();
        let mut out = Vec::new();
        for vbd_ref in &record.vbds {
            let vbd = self.session.vbd().get_record(vbd_ref).await.unwrap();
            if vbd.type_ != VbdType::Disk || vbd.empty || vbd.vdi.is_null() {
                continue;
            }
            let vdi = self.session.vdi().get_record(&vbd.vdi).await.unwrap();
            out.push((vbd.userdevice.clone(), vbd.vdi.clone(), vdi));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, r, v)| (r, v)).collect()
    }

    /// Snapshots `vm` and clears the template flag; returns the snapshot.
    pub async fn snapshot(&self, vm: &VmRef, name: &str) -> VmRef {
        let snap = within(
            STEP,
            "VM.snapshot",
            self.session.vm().snapshot(vm, name, &[]),
        )
        .await
        .unwrap();
        self.session
            .vm()
            .set_is_a_template(&snap, false)
            .await
            .unwrap();
        snap
    }

    /// The single disk of a (snapshot) VM.
    pub async fn only_disk(&self, vm: &VmRef) -> (VdiRef, Vdi) {
        let mut disks = self.vm_disks(vm).await;
        assert_eq!(disks.len(), 1, "expected one disk");
        disks.remove(0)
    }

    /// GETs a handler inside a task of ours: the body (or the transfer error) and the
    /// task's outcome, both kept so tests can check each.
    pub async fn fetch(&self, path: &str, params: &[(&str, &str)]) -> Fetched {
        let task = self
            .session
            .create_task(&format!("client test {path}"), "")
            .await
            .unwrap();
        let url = handler_url(
            &self.session.base_url(),
            path,
            self.session.session_ref().expose(),
            Some(task.id()),
            params,
        );
        let body = within(STEP, "HTTP download", async {
            let download = self.transfer.get(url).await?;
            let task_header = download.task_id.clone();
            let mut stream = download.body;
            let mut out = Vec::new();
            while let Some(piece) = stream.next().await {
                out.extend_from_slice(&piece?);
            }
            Ok((out, task_header))
        })
        .await;
        let (body, task_header) = match body {
            Ok((b, t)) => (Ok(b), t),
            Err(e) => (Err(e), None),
        };
        let task_result = within(
            STEP,
            "task wait",
            task.wait(&WaitOptions::with_timeout(STEP)),
        )
        .await;
        Fetched {
            body,
            task_header,
            task: task_result,
        }
    }

    /// A download that must succeed (body and task).
    pub async fn fetch_ok(&self, path: &str, params: &[(&str, &str)]) -> Vec<u8> {
        let f = self.fetch(path, params).await;
        let body = f
            .body
            .unwrap_or_else(|e| panic!("GET {path} {params:?} failed: {e}"));
        f.task
            .unwrap_or_else(|e| panic!("the task of GET {path} {params:?} failed: {e}"));
        body
    }

    /// `/export_raw_vdi?format=raw` of a VDI (uuid), checked to be `virtual_size` long.
    pub async fn export_raw(&self, vdi: &Vdi) -> Vec<u8> {
        let raw = self
            .fetch_ok(
                "/export_raw_vdi",
                &[("vdi", vdi.uuid.as_str()), ("format", "raw")],
            )
            .await;
        assert_eq!(
            raw.len() as i64,
            vdi.virtual_size,
            "raw export length of {}",
            vdi.uuid
        );
        raw
    }
}

impl Ctx {
    /// NBD options of a VDI from `VDI.get_nbd_info` (the first server listed).
    pub async fn nbd_options(&self, vdi: &VdiRef) -> NbdOptions {
        let infos = self.session.vdi().get_nbd_info(vdi).await.unwrap();
        let info = infos
            .first()
            .expect("VDI.get_nbd_info lists no NBD server (network purpose?)");
        let mut options = NbdOptions::from_record(info).unwrap();
        // TLS follows the network purpose, not the presence of `cert`
        // (docs/xapi-notes.md "NBD"): an `insecure_nbd` pool answers STARTTLS with
        // NBD_REP_ERR_POLICY, so a caller that knows the purpose turns TLS off.
        let networks = self.session.network().get_all_records().await.unwrap();
        let purposes: Vec<NetworkPurpose> =
            networks.values().flat_map(|n| n.purpose.clone()).collect();
        if purposes.contains(&NetworkPurpose::InsecureNbd)
            && !purposes.contains(&NetworkPurpose::Nbd)
        {
            options.tls = NbdTls::Off;
        }
        options
    }

    /// Reads `ranges` of a VDI over NBD with `connections` connections.
    pub async fn nbd_read(
        &self,
        vdi: &VdiRef,
        ranges: Vec<std::ops::Range<u64>>,
        connections: usize,
    ) -> Result<Vec<Extent>, NbdError> {
        let options = self.nbd_options(vdi).await;
        within(STEP, "NBD read", async {
            let reader = NbdMultiReader::connect(&options, connections)
                .await?
                .with_retries(1, Duration::ZERO);
            let mut stream = reader.read_ranges(ranges);
            let mut out = Vec::new();
            while let Some(extent) = stream.next().await {
                out.push(extent?);
            }
            drop(stream);
            reader.disconnect().await;
            Ok(out)
        })
        .await
    }
}

/// A download's outcome.
pub struct Fetched {
    pub body: Result<Vec<u8>, HttpError>,
    pub task_header: Option<String>,
    pub task: Result<Task, Error>,
}

/// A decoded VHD: its type, parent (differencing), and extents.
pub struct DecodedVhd {
    pub disk_type: DiskType,
    pub parent: Option<ParentInfo>,
    pub extents: Vec<Extent>,
    pub virtual_size: u64,
}

/// Decodes a whole VHD stream, fed in uneven pieces.
pub fn decode_vhd(bytes: &[u8]) -> DecodedVhd {
    let mut dec = VhdDecoder::new();
    let mut extents = Vec::new();
    for piece in bytes.chunks(777_777) {
        extents.extend(dec.feed(piece).unwrap());
    }
    extents.extend(dec.finish().unwrap());
    DecodedVhd {
        disk_type: dec.disk_type().unwrap(),
        parent: dec.parent(),
        virtual_size: dec.footer().unwrap().current_size,
        extents,
    }
}

/// Writes extents onto an image (Data copied, Zero filled).
pub fn apply(image: &mut [u8], extents: &[Extent]) {
    for e in extents {
        let at = e.offset as usize;
        let len = e.len() as usize;
        let target = &mut image[at..at + len];
        match &e.data {
            ExtentData::Data(d) => target.copy_from_slice(d),
            ExtentData::Zero(_) => target.fill(0),
        }
    }
}

/// Materializes a dynamic VHD's extents into an image of `size` bytes.
pub fn image_of(extents: &[Extent], size: u64) -> Vec<u8> {
    let mut image = vec![0u8; size as usize];
    apply(&mut image, extents);
    image
}

/// A decoded XVA: `ova.xml` and one image per disk keyed by VDI uuid.
pub struct DecodedXva {
    pub ova: OvaXml,
    pub disks: BTreeMap<String, Vec<u8>>,
}

/// Decodes a whole (uncompressed) XVA stream.
pub fn decode_xva(bytes: &[u8]) -> DecodedXva {
    let mut dec = XvaDecoder::new();
    let mut ova = None;
    let mut disks = BTreeMap::new();
    let mut current: Option<(String, Vec<u8>)> = None;
    let mut ended = false;
    let mut events = Vec::new();
    for piece in bytes.chunks(1_000_003) {
        events.extend(dec.feed(piece).unwrap());
    }
    dec.finish().unwrap();
    for event in events {
        match event {
            XvaEvent::OvaXml(x) => ova = Some(*x),
            XvaEvent::DiskStart(d) => {
                current = Some((d.vdi_uuid.clone(), vec![0u8; d.virtual_size as usize]))
            }
            XvaEvent::Extent(e) => {
                let (_, image) = current.as_mut().expect("extent outside a disk");
                apply(image, std::slice::from_ref(&e));
            }
            XvaEvent::DiskEnd(d) => {
                let (uuid, image) = current.take().expect("disk end without start");
                assert_eq!(uuid, d.vdi_uuid);
                disks.insert(uuid, image);
            }
            XvaEvent::End => ended = true,
        }
    }
    assert!(ended, "the XVA has no end of archive");
    DecodedXva {
        ova: ova.expect("no ova.xml"),
        disks,
    }
}

/// The 2 MiB VHD blocks a set of 64 KiB blocks falls into.
pub fn vhd_blocks_of(cbt_blocks: &BTreeSet<u64>) -> BTreeSet<u64> {
    cbt_blocks
        .iter()
        .map(|b| b * CBT_BLOCK / VHD_BLOCK)
        .collect()
}

/// The 64 KiB blocks an extent list covers (any byte).
pub fn cbt_blocks_covered(extents: &[Extent]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for e in extents.iter().filter(|e| !e.is_empty()) {
        for b in e.offset / CBT_BLOCK..=(e.end() - 1) / CBT_BLOCK {
            out.insert(b);
        }
    }
    out
}

/// The 64 KiB blocks in which two images differ.
pub fn differing_blocks(a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    assert_eq!(a.len(), b.len());
    a.chunks(CBT_BLOCK as usize)
        .zip(b.chunks(CBT_BLOCK as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// Writes bytes to a file in `dir`; returns its path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The text of an error and all its sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
