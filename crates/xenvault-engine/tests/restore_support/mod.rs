//! Helpers of the `restore_*` tests: a real `xapi-sim` process, our client
//! logged in to it, and archive restore points made from its VMs (snapshot,
//! export, archive writer) so restore is tested against real backups.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt as _;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use xenvault_engine::archive::{ArchiveWriter, FileCompression, RunInfo, Subject};
use xenvault_engine::restore::PoolConnection;
use xenvault_engine::sink::DiskMeta;
use xenvault_xapi::http::handler_url;
use xenvault_xapi::records::{VbdType, Vdi, VdiRef, VmRef};
use xenvault_xapi::session::Session;
use xenvault_xapi::task::WaitOptions;
use xenvault_xapi::tls::{Fingerprint, TlsPolicy};

/// What the simulator printed on its JSON line.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Info {
    pub url: String,
    pub https_url: String,
    pub fingerprint: String,
    pub user: String,
    pub password: String,
    pub control: String,
}

// Both support modules include it; a test using both gets two copies.
#[allow(clippy::duplicate_mod)]
#[path = "../sim_bin/mod.rs"]
mod sim_bin;

/// The `xapi-sim` binary (see `sim_bin`).
pub fn xapi_sim_binary() -> PathBuf {
    sim_bin::xapi_sim_binary()
}

/// A running `xapi-sim serve` in a temporary state directory; killed on drop.
pub struct SimProc {
    child: Child,
    pub info: Info,
    pub dir: tempfile::TempDir,
}

impl SimProc {
    /// `xapi-sim serve --state <tmp> <args>`.
    pub fn spawn(args: &[&str]) -> SimProc {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(xapi_sim_binary())
            .arg("serve")
            .arg("--state")
            .arg(dir.path().join("state"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot spawn xapi-sim");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        if read.is_err() || line.trim().is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("xapi-sim printed no JSON line ({read:?})");
        }
        let info: Info = serde_json::from_str(&line).unwrap();
        SimProc { child, info, dir }
    }

    pub fn policy(&self) -> TlsPolicy {
        TlsPolicy::Pinned(self.info.fingerprint.parse::<Fingerprint>().unwrap())
    }

    pub async fn connect(&self) -> PoolConnection {
        PoolConnection::connect(
            &self.info.https_url,
            &self.info.user,
            &self.info.password,
            self.policy(),
        )
        .await
        .unwrap()
    }

    /// A control API call (`/_sim/...`) that must answer 200.
    pub async fn control(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let addr = self
            .info
            .control
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let body = body.to_string();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let status_line = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(status_line.contains(" 200 "), "{path}: {status_line}");
        serde_json::from_slice(&buf[end..]).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for SimProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `fut` with a limit: a restore step that takes longer is a hang.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 120 s"))
}

/// The regular VM called `name`.
pub async fn vm_by_name(session: &Session, name: &str) -> (VmRef, xenvault_xapi::records::Vm) {
    session
        .vm()
        .get_all_records()
        .await
        .unwrap()
        .into_iter()
        .find(|(_, v)| v.is_regular_vm() && v.name_label == name)
        .unwrap_or_else(|| panic!("no VM {name}"))
}

/// The disks of a VM by userdevice.
pub async fn vm_disks(session: &Session, vm: &VmRef) -> BTreeMap<String, (VdiRef, Vdi)> {
    let rec = session.vm().get_record(vm).await.unwrap();
    let mut out = BTreeMap::new();
    for vbd_ref in &rec.vbds {
        let vbd = session.vbd().get_record(vbd_ref).await.unwrap();
        if vbd.type_ != VbdType::Disk || vbd.empty || vbd.vdi.is_null() {
            continue;
        }
        let vdi = session.vdi().get_record(&vbd.vdi).await.unwrap();
        out.insert(vbd.userdevice.clone(), (vbd.vdi.clone(), vdi));
    }
    out
}

/// Downloads a handler's body inside a task; returns the bytes.
pub async fn download(pool: &PoolConnection, path: &str, params: &[(&str, &str)]) -> Vec<u8> {
    let s = &pool.session;
    let task = s.create_task("test download", "").await.unwrap();
    let url = handler_url(
        &s.base_url(),
        path,
        s.session_ref().expose(),
        Some(task.id()),
        params,
    );
    let dl = pool.transfer.get(url).await.unwrap();
    let mut body = dl.body;
    let mut out = Vec::new();
    while let Some(piece) = body.next().await {
        out.extend_from_slice(&piece.unwrap());
    }
    task.wait(&WaitOptions::default()).await.unwrap();
    out
}

/// SHA-256 (hex) of a VDI's raw export, and its length.
pub async fn raw_sha(pool: &PoolConnection, vdi_uuid: &str) -> (String, u64) {
    let bytes = download(
        pool,
        "/export_raw_vdi",
        &[("vdi", vdi_uuid), ("format", "raw")],
    )
    .await;
    (hex::encode(Sha256::digest(&bytes)), bytes.len() as u64)
}

/// Counts of the pool's objects: (VMs that are not dom0, VDIs).
pub async fn object_counts(session: &Session) -> (usize, usize) {
    let vms = session
        .vm()
        .get_all_records()
        .await
        .unwrap()
        .values()
        .filter(|v| !v.is_control_domain)
        .count();
    let vdis = session.vdi().get_all_records().await.unwrap().len();
    (vms, vdis)
}

/// A backup made for the tests.
pub struct BackedUp {
    /// The restore point's directory.
    pub dir: PathBuf,
    pub vm_uuid: String,
    pub vm_name: String,
    /// Per userdevice: (snapshot VDI uuid, raw SHA-256, virtual size).
    pub disks: BTreeMap<String, (String, String, u64)>,
}

/// How the test backup stores the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `vm.xva` (maybe `.zst`).
    Xva,
    /// `disk-N.vhd` per disk.
    Vhd,
    /// `disk-N.raw` per disk.
    Raw,
}

/// Backs up VM `name` into the archive at `root` as a backup run would:
/// snapshot, clear the template flag, export, write through the archive
/// writer, commit, destroy the snapshot and its VDIs.
pub async fn backup(
    pool: &PoolConnection,
    root: &Path,
    name: &str,
    layout: Layout,
    zstd: bool,
) -> BackedUp {
    let s = &pool.session;
    let (vm, rec) = vm_by_name(s, name).await;
    let snap = s
        .vm()
        .snapshot(&vm, "xenvault-test backup", &[])
        .await
        .unwrap();
    s.vm().set_is_a_template(&snap, false).await.unwrap();
    let snap_disks = vm_disks(s, &snap).await;
    let mut disks = BTreeMap::new();
    let mut metas = Vec::new();
    for (i, (userdevice, (_, vdi))) in snap_disks.iter().enumerate() {
        let (sha, len) = raw_sha(pool, &vdi.uuid).await;
        assert_eq!(len as i64, vdi.virtual_size);
        disks.insert(userdevice.clone(), (vdi.uuid.clone(), sha, len));
        metas.push(DiskMeta {
            index: i,
            vdi_uuid: vdi.uuid.clone(),
            source_vdi_uuid: s
                .vdi()
                .get_record(&vdi.snapshot_of)
                .await
                .map(|v| v.uuid)
                .unwrap_or_default(),
            name: vdi.name_label.clone(),
            virtual_size: len,
            userdevice: userdevice.clone(),
            bootable: userdevice == "0",
            xva_id: None,
        });
    }
    let compression = if zstd {
        FileCompression::Zstd(3)
    } else {
        FileCompression::None
    };
    let writer = ArchiveWriter::begin(
        root,
        Subject::vm(&rec.uuid, &rec.name_label),
        RunInfo {
            job: "test".into(),
            run_id: uuid::Uuid::new_v4().to_string(),
            pool: "sim".into(),
        },
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    match layout {
        Layout::Xva => {
            let bytes = download(pool, "/export", &[("ref", snap.as_str())]).await;
            let mut f = writer.create_file("vm.xva", compression).unwrap();
            f.write_all(&bytes).unwrap();
            f.finish().unwrap();
        }
        Layout::Vhd | Layout::Raw => {
            let (format, ext) = if layout == Layout::Vhd {
                ("vhd", "vhd")
            } else {
                ("raw", "raw")
            };
            for (userdevice, (snap_vdi, _, _)) in &disks {
                let bytes = download(
                    pool,
                    "/export_raw_vdi",
                    &[("vdi", snap_vdi), ("format", format)],
                )
                .await;
                let mut f = writer
                    .create_file(&format!("disk-{userdevice}.{ext}"), compression)
                    .unwrap();
                f.write_all(&bytes).unwrap();
                f.finish().unwrap();
            }
        }
    }
    let doc = serde_json::json!({
        "format": "xenvault-vm-records",
        "version": 1,
        "vm_uuid": rec.uuid,
        "disks": metas,
    });
    writer
        .put_file(
            "vm.json",
            serde_json::to_string_pretty(&doc).unwrap().as_bytes(),
        )
        .unwrap();
    let point = writer.commit().unwrap();
    // Clean-up as a backup does: the snapshot and its disks.
    s.vm().destroy(&snap).await.unwrap();
    for (_, (vdi_ref, _)) in snap_disks {
        s.vdi().destroy(&vdi_ref).await.unwrap();
    }
    BackedUp {
        dir: point.path,
        vm_uuid: rec.uuid,
        vm_name: rec.name_label,
        disks,
    }
}
