//! The per-VM backup pipeline: snapshot → clear the template flag → export
//! → decode into extents → sink → commit, then destroy the snapshot and its
//! VDIs by UUID whatever happened before; plus pool metadata and host
//! backups ([`extra`]).
//!
//! Exports run inside a task xenvault creates; the task's outcome decides,
//! never the HTTP stream alone (a cut raw stream looks like a clean EOF).
//! A whole-VM backup is `/export` (XVA, optionally compressed by the host,
//! decompressed here), decoded with `XvaDecoder`; a per-disk backup is
//! `/export_raw_vdi?format=vhd|raw` per disk, decoded with `VhdDecoder` or
//! `RawDecoder`. Either way the sink gets the same extents (see
//! [`crate::sink`]).

pub mod extra;
pub mod repo;
pub(crate) mod stream;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use xenvault_formats::raw::RawDecoder;
use xenvault_formats::vhd::{DecoderOptions, VhdDecoder};
use xenvault_formats::xva::{ExportRecords, OvaXml, XvaDecoder, XvaEvent};
use xenvault_types::config::{Compression as ConfigCompression, DiskSelection, ExportMode};
use xenvault_types::{Extent, Value};
use xenvault_xapi::http::{HttpTransfer, handler_url};
use xenvault_xapi::records::{VdiRef, VmRef};
use xenvault_xapi::session::Session;
use xenvault_xapi::task::WaitOptions;

use crate::journal::{self, CleanupReport, RunContext, TaggedSnapshot};
use crate::sink::{
    BackupKind, BackupTarget, Committed, Compression, DiskFormat, DiskMeta, ExtentOrder, VmMeta,
};
use stream::{Decompressor, SinkMsg, SinkThread};

/// The step of a VM backup that failed (named in reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Reading the VM's records.
    Inspect,
    /// `VM.snapshot` (with the journal and tags).
    Snapshot,
    /// `VM.set_is_a_template(snapshot, false)`.
    TemplateFlag,
    /// Reading the snapshot's records.
    Records,
    /// Starting the export (task, HTTP request, response head).
    ExportStart,
    /// The export stream (body, decoding, the task's outcome).
    ExportStream,
    /// Writing to the target (the sink).
    Write,
    /// Destroying the snapshot VM.
    SnapshotDestroy,
    /// Destroying the snapshot's VDIs.
    VdiDestroy,
    /// Opening or starting a restore point in the repository.
    Repository,
    /// Reading a disk (NBD or VHD export) into the repository.
    DiskRead,
    /// Committing the restore point (its manifest).
    Commit,
}

impl Step {
    /// Words for logs and reports.
    pub fn label(self) -> &'static str {
        match self {
            Step::Inspect => "reading the VM",
            Step::Snapshot => "snapshot",
            Step::TemplateFlag => "clearing the snapshot's template flag",
            Step::Records => "reading the snapshot",
            Step::ExportStart => "export start",
            Step::ExportStream => "export stream",
            Step::Write => "writing to the target",
            Step::SnapshotDestroy => "snapshot destroy",
            Step::VdiDestroy => "snapshot VDI destroy",
            Step::Repository => "repository",
            Step::DiskRead => "disk read",
            Step::Commit => "restore point commit",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A failed step and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    /// Which step.
    pub step: Step,
    /// The cause (XAPI code and params, the I/O error…).
    pub detail: String,
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.step, self.detail)
    }
}

impl std::error::Error for StepError {}

fn step_err(step: Step) -> impl FnOnce(String) -> StepError {
    move |detail| StepError { step, detail }
}

/// Progress of the running backups, for bars or log lines.
pub trait Progress: Send + Sync {
    /// A VM's export begins; `total` = bytes of disk to cover (estimate).
    fn started(&self, vm: &str, total: u64);
    /// `done` bytes of disk covered so far.
    fn advanced(&self, vm: &str, done: u64);
    /// The VM is finished (`ok` or the failure's words).
    fn finished(&self, vm: &str, result: Result<(), &str>);
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn started(&self, _vm: &str, _total: u64) {}
    fn advanced(&self, _vm: &str, _done: u64) {}
    fn finished(&self, _vm: &str, _result: Result<(), &str>) {}
}

/// What the VM runs of one job share.
#[derive(Clone)]
pub struct Pipeline {
    /// The pool session.
    pub session: Session,
    /// HTTP transfers (TLS as the session).
    pub transfer: Arc<HttpTransfer>,
    /// Journal, pool, job, run.
    pub run: RunContext,
    /// Where backups go.
    pub target: Arc<dyn BackupTarget>,
    /// The pool's name for the sink.
    pub pool_label: String,
    /// Progress observer.
    pub progress: Arc<dyn Progress>,
    /// How long to wait for export tasks.
    pub wait: WaitOptions,
}

/// One VM to back up and how.
#[derive(Debug, Clone)]
pub struct VmTask {
    /// The live VM.
    pub vm_ref: VmRef,
    /// Its UUID.
    pub vm_uuid: String,
    /// Its name.
    pub name: String,
    /// XVA or per-disk.
    pub mode: ExportMode,
    /// All disks or the boot disk.
    pub disks: DiskSelection,
    /// Compression.
    pub compression: ConfigCompression,
}

/// What became of one VM.
#[derive(Debug, Clone)]
pub struct VmResult {
    /// Start time.
    pub started: OffsetDateTime,
    /// End time (after cleanup).
    pub finished: OffsetDateTime,
    /// Bytes received from the pool.
    pub bytes_received: u64,
    /// The stored backup, or the first failure.
    pub outcome: Result<Committed, StepError>,
    /// What the cleanup did.
    pub cleanup: CleanupReport,
    /// The cleanup's failure, if any (step and detail).
    pub cleanup_error: Option<StepError>,
}

impl VmResult {
    /// True when the backup was stored and everything temporary is gone.
    pub fn is_success(&self) -> bool {
        self.outcome.is_ok() && self.cleanup_error.is_none()
    }
}

/// The sink's compression for a configured one. Host compression only
/// shrinks the transfer; the file is then compressed the same way by the
/// sink (gzip, zstd).
pub fn sink_compression(c: ConfigCompression) -> Compression {
    match c {
        ConfigCompression::None => Compression::None,
        ConfigCompression::Zstd | ConfigCompression::HostZstd => Compression::Zstd { level: 3 },
        ConfigCompression::HostGzip => Compression::Gzip,
    }
}

/// The journaled snapshot a backup reads (without `ignore` VDIs), with the
/// template flag `VM.snapshot` sets cleared, as every backup path does
/// (docs/xapi-notes.md, "VM snapshot records"). `token` is set as soon as the
/// journal knows the snapshot, so the caller's cleanup finds it.
pub(crate) async fn snapshot_for_backup(
    session: &Session,
    run: &RunContext,
    task: &VmTask,
    ignore: &[VdiRef],
    token: &mut Option<String>,
) -> Result<TaggedSnapshot, StepError> {
    let name = snapshot_name(&task.name, &run.run_id);
    let snap =
        match journal::snapshot_tagged(session, run, &task.vm_ref, &task.vm_uuid, &name, ignore)
            .await
        {
            Ok(s) => {
                *token = Some(s.token.clone());
                s
            }
            Err((t, e)) => {
                *token = Some(t);
                return Err(StepError {
                    step: Step::Snapshot,
                    detail: e.to_string(),
                });
            }
        };
    session
        .vm()
        .set_is_a_template(&snap.vm_ref, false)
        .await
        .map_err(|e| e.to_string())
        .map_err(step_err(Step::TemplateFlag))?;
    Ok(snap)
}

/// The snapshot name: says what it is to a human; never used to find it.
pub fn snapshot_name(vm_name: &str, run_id: &str) -> String {
    format!("{vm_name} (xenvault backup {run_id})")
}

/// Backs up one VM, then cleans up whatever happened. Never panics on
/// pool or target errors: everything ends in the [`VmResult`].
pub async fn backup_vm(p: &Pipeline, task: &VmTask) -> VmResult {
    let started = OffsetDateTime::now_utc();
    let mut received = 0u64;
    let mut token: Option<String> = None;
    let outcome = run_vm(p, task, &mut token, &mut received).await;

    // Cleanup by UUID and tag, whatever happened.
    let mut cleanup = CleanupReport::default();
    let mut cleanup_error = None;
    if let Some(token) = token {
        match p.run.journal.outstanding(Some(&p.run.pool)) {
            Ok(open) => {
                if let Some(o) = open.into_iter().find(|o| o.token == token) {
                    cleanup = journal::destroy_token(&p.session, &p.run.journal, &o).await;
                }
            }
            Err(e) => cleanup.errors.push(e.to_string()),
        }
        if let Some(first) = cleanup.errors.first() {
            let step = if first.contains("VDI") {
                Step::VdiDestroy
            } else {
                Step::SnapshotDestroy
            };
            cleanup_error = Some(StepError {
                step,
                detail: format!(
                    "{} (left for the next run's sweep)",
                    cleanup.errors.join("; ")
                ),
            });
        }
    }
    let result = VmResult {
        started,
        finished: OffsetDateTime::now_utc(),
        bytes_received: received,
        outcome,
        cleanup,
        cleanup_error,
    };
    let words = match (&result.outcome, &result.cleanup_error) {
        (Err(e), _) | (Ok(_), Some(e)) => Some(e.to_string()),
        _ => None,
    };
    p.progress
        .finished(&task.name, words.as_deref().map_or(Ok(()), Err));
    result
}

async fn run_vm(
    p: &Pipeline,
    task: &VmTask,
    token: &mut Option<String>,
    received: &mut u64,
) -> Result<Committed, StepError> {
    let session = &p.session;
    // The live VM's record (raw, for the sink) and the disks to ignore.
    let source_vm = session
        .call_value("VM.get_record", vec![Value::str(task.vm_ref.as_str())])
        .await
        .map_err(|e| e.to_string())
        .map_err(step_err(Step::Inspect))?;
    let ignore = if task.disks == DiskSelection::Boot {
        non_boot_vdis(session, &source_vm)
            .await
            .map_err(step_err(Step::Inspect))?
    } else {
        Vec::new()
    };

    let snap = snapshot_for_backup(session, &p.run, task, &ignore, token).await?;

    let records = export_records(session, &snap.vm_ref)
        .await
        .map_err(step_err(Step::Records))?;
    let mut disks = disk_metas(&records);
    if task.disks == DiskSelection::Boot {
        keep_boot_disk(&mut disks);
    }
    let total: u64 = disks.iter().map(|d| d.virtual_size).sum();
    p.progress.started(&task.name, total);

    let meta = VmMeta {
        job: p.run.job.clone(),
        run_id: p.run.run_id.clone(),
        pool: p.pool_label.clone(),
        vm_uuid: task.vm_uuid.clone(),
        vm_name: task.name.clone(),
        snapshot_uuid: snap.vm.uuid.clone(),
        snapshot_time: if snap.vm.snapshot_time.0 == OffsetDateTime::UNIX_EPOCH {
            OffsetDateTime::now_utc()
        } else {
            snap.vm.snapshot_time.0
        },
        kind: BackupKind::Disks {
            format: DiskFormat::Raw,
        },
        disks,
        records,
        source_vm,
        compression: sink_compression(task.compression),
    };
    match task.mode {
        ExportMode::Xva => export_xva(p, task, &snap.vm_ref, meta, received).await,
        ExportMode::Vhd | ExportMode::Raw => {
            let format = if task.mode == ExportMode::Vhd {
                DiskFormat::Vhd
            } else {
                DiskFormat::Raw
            };
            let meta = VmMeta {
                kind: BackupKind::Disks { format },
                ..meta
            };
            export_disks(p, task, meta, format, received).await
        }
    }
}

/// The VDIs of the live VM's disks other than the boot disk.
pub(crate) async fn non_boot_vdis(session: &Session, vm: &Value) -> Result<Vec<VdiRef>, String> {
    let mut disks = Vec::new();
    for vbd_ref in str_list(vm, "VBDs") {
        let vbd = session
            .call_value("VBD.get_record", vec![Value::str(vbd_ref.as_str())])
            .await
            .map_err(|e| e.to_string())?;
        if field_str(&vbd, "type") != "Disk" || field_bool(&vbd, "empty") {
            continue;
        }
        let vdi = field_str(&vbd, "VDI");
        if vdi.is_empty() || vdi == xenvault_formats::xva::NULL_REF {
            continue;
        }
        disks.push((
            field_bool(&vbd, "bootable"),
            field_str(&vbd, "userdevice"),
            vdi,
        ));
    }
    let boot = boot_index(
        &disks
            .iter()
            .map(|(b, u, _)| (*b, u.clone()))
            .collect::<Vec<_>>(),
    );
    Ok(disks
        .into_iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != boot)
        .map(|(_, (_, _, vdi))| VdiRef::new(vdi))
        .collect())
}

/// The boot disk among `(bootable, userdevice)`: the bootable one with the
/// lowest device, else device "0", else the lowest device.
pub fn boot_index(disks: &[(bool, String)]) -> Option<usize> {
    let dev = |u: &String| u.parse::<u64>().unwrap_or(u64::MAX);
    disks
        .iter()
        .enumerate()
        .filter(|(_, (b, _))| *b)
        .min_by_key(|(_, (_, u))| dev(u))
        .or_else(|| disks.iter().enumerate().find(|(_, (_, u))| u == "0"))
        .or_else(|| disks.iter().enumerate().min_by_key(|(_, (_, u))| dev(u)))
        .map(|(i, _)| i)
}

pub(crate) fn keep_boot_disk(disks: &mut Vec<DiskMeta>) {
    let keys: Vec<(bool, String)> = disks
        .iter()
        .map(|d| (d.bootable, d.userdevice.clone()))
        .collect();
    if let Some(i) = boot_index(&keys) {
        let d = disks.swap_remove(i);
        disks.clear();
        disks.push(DiskMeta { index: 0, ..d });
    }
}

fn field_str(v: &Value, name: &str) -> String {
    v.get(name)
        .and_then(|f| f.as_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn field_bool(v: &Value, name: &str) -> bool {
    matches!(v.get(name), Some(Value::Bool(true)))
}

fn field_u64(v: &Value, name: &str) -> u64 {
    match v.get(name) {
        Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn str_list(v: &Value, name: &str) -> Vec<String> {
    v.get(name)
        .and_then(|f| f.as_array().ok())
        .unwrap_or(&[])
        .iter()
        .filter_map(|x| x.as_str().ok().map(str::to_string))
        .collect()
}

/// The full records of a VM (a snapshot): VBDs, VDIs, SRs, VIFs, networks.
pub async fn export_records(session: &Session, vm: &VmRef) -> Result<ExportRecords, String> {
    async fn get(session: &Session, class: &str, r: &str) -> Result<Value, String> {
        session
            .call_value(&format!("{class}.get_record"), vec![Value::str(r)])
            .await
            .map_err(|e| format!("{class}.get_record {r}: {e}"))
    }
    let vm_rec = get(session, "VM", vm.as_str()).await?;
    let mut out = ExportRecords {
        vm: (vm.as_str().to_string(), vm_rec.clone()),
        vbds: Vec::new(),
        vdis: Vec::new(),
        vifs: Vec::new(),
        networks: Vec::new(),
        srs: Vec::new(),
    };
    let null = xenvault_formats::xva::NULL_REF;
    for vbd_ref in str_list(&vm_rec, "VBDs") {
        let vbd = get(session, "VBD", &vbd_ref).await?;
        let vdi_ref = field_str(&vbd, "VDI");
        out.vbds.push((vbd_ref, vbd));
        if vdi_ref.is_empty() || vdi_ref == null || out.vdis.iter().any(|(r, _)| *r == vdi_ref) {
            continue;
        }
        let vdi = get(session, "VDI", &vdi_ref).await?;
        let sr_ref = field_str(&vdi, "SR");
        out.vdis.push((vdi_ref, vdi));
        if !sr_ref.is_empty() && sr_ref != null && !out.srs.iter().any(|(r, _)| *r == sr_ref) {
            let sr = get(session, "SR", &sr_ref).await?;
            out.srs.push((sr_ref, sr));
        }
    }
    for vif_ref in str_list(&vm_rec, "VIFs") {
        let vif = get(session, "VIF", &vif_ref).await?;
        let net_ref = field_str(&vif, "network");
        out.vifs.push((vif_ref, vif));
        if !net_ref.is_empty()
            && net_ref != null
            && !out.networks.iter().any(|(r, _)| *r == net_ref)
        {
            let net = get(session, "network", &net_ref).await?;
            out.networks.push((net_ref, net));
        }
    }
    Ok(out)
}

/// The disks (VBDs of type Disk with a VDI) of `records`, by device number.
pub fn disk_metas(records: &ExportRecords) -> Vec<DiskMeta> {
    let vdis: BTreeMap<&str, &Value> = records.vdis.iter().map(|(r, v)| (r.as_str(), v)).collect();
    let mut disks: Vec<DiskMeta> = Vec::new();
    for (_, vbd) in &records.vbds {
        if field_str(vbd, "type") != "Disk" || field_bool(vbd, "empty") {
            continue;
        }
        let Some(vdi) = vdis.get(field_str(vbd, "VDI").as_str()) else {
            continue;
        };
        let source = field_str(vdi, "snapshot_of");
        disks.push(DiskMeta {
            index: 0,
            vdi_uuid: field_str(vdi, "uuid"),
            source_vdi_uuid: String::new(),
            name: field_str(vdi, "name_label"),
            virtual_size: field_u64(vdi, "virtual_size"),
            userdevice: field_str(vbd, "userdevice"),
            bootable: field_bool(vbd, "bootable"),
            xva_id: None,
        });
        // The live VDI's uuid is resolved by the caller when needed; keep
        // the ref out of the metadata.
        let _ = source;
    }
    disks.sort_by_key(|d| d.userdevice.parse::<u64>().unwrap_or(u64::MAX));
    for (i, d) in disks.iter_mut().enumerate() {
        d.index = i;
    }
    disks
}

/// Runs an HTTP export of `path` with `params` in a task and feeds the body
/// to `on_bytes`; returns the bytes received. The task's outcome decides.
async fn run_export<F>(
    p: &Pipeline,
    label: &str,
    path: &str,
    params: &[(&str, &str)],
    received: &mut u64,
    mut on_bytes: F,
) -> Result<(), StepError>
where
    F: AsyncBytes,
{
    let session = &p.session;
    let guard = session
        .create_task(label, "xenvault backup")
        .await
        .map_err(|e| e.to_string())
        .map_err(step_err(Step::ExportStart))?;
    let url = handler_url(
        &session.base_url(),
        path,
        session.session_ref().expose(),
        Some(guard.id()),
        params,
    );
    let download = match p.transfer.get(url).await {
        Ok(d) => d,
        Err(e) => {
            // The task holds the real cause when there is one.
            let waited = guard.wait(&p.wait).await;
            let detail = match waited {
                Err(task_err) => format!("{task_err} ({e})"),
                Ok(_) => e.to_string(),
            };
            return Err(StepError {
                step: Step::ExportStart,
                detail,
            });
        }
    };
    let mut body = download.body;
    let mut streamed: Result<(), StepError> = Ok(());
    while let Some(piece) = body.next().await {
        match piece {
            Ok(bytes) => {
                *received += bytes.len() as u64;
                if let Err(e) = on_bytes.bytes(&bytes).await {
                    streamed = Err(e);
                    break;
                }
            }
            Err(e) => {
                streamed = Err(StepError {
                    step: Step::ExportStream,
                    detail: e.to_string(),
                });
                break;
            }
        }
    }
    if streamed.is_ok() {
        streamed = on_bytes.end().await;
    }
    drop(body);
    match streamed {
        Ok(()) => guard
            .wait(&p.wait)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
            .map_err(step_err(Step::ExportStream)),
        Err(err) => {
            // A sink failure stops reading: cancel the export.
            if err.step == Step::Write {
                let _ = guard.cancel().await;
                guard.abandon().await;
                return Err(err);
            }
            match guard.wait(&p.wait).await {
                Err(task_err) => Err(StepError {
                    step: Step::ExportStream,
                    detail: format!("{task_err} ({})", err.detail),
                }),
                Ok(_) => Err(err),
            }
        }
    }
}

/// A consumer of export bytes.
trait AsyncBytes {
    /// The next bytes.
    async fn bytes(&mut self, bytes: &[u8]) -> Result<(), StepError>;
    /// The stream ended (EOF): check completeness.
    async fn end(&mut self) -> Result<(), StepError>;
}

fn sink_stopped() -> StepError {
    StepError {
        step: Step::Write,
        detail: "the target stopped taking data".into(),
    }
}

/// XVA: decompress, decode; begin the sink at `ova.xml`, then the disks.
struct XvaConsumer<'a> {
    p: &'a Pipeline,
    vm_name: String,
    decompress: Decompressor,
    decoder: XvaDecoder,
    meta: Option<VmMeta>,
    sink: Option<SinkThread>,
    order: Option<ExtentOrder>,
    done_before: u64,
    ended: bool,
}

impl XvaConsumer<'_> {
    async fn handle(&mut self, plain: &[u8]) -> Result<(), StepError> {
        if plain.is_empty() {
            return Ok(());
        }
        let events = self
            .decoder
            .feed(plain)
            .map_err(|e| format!("the XVA is invalid: {e}"))
            .map_err(step_err(Step::ExportStream))?;
        for ev in events {
            match ev {
                XvaEvent::OvaXml(ova) => self.begin(*ova)?,
                XvaEvent::DiskStart(d) => {
                    let meta = self.meta.as_ref().ok_or_else(|| StepError {
                        step: Step::ExportStream,
                        detail: "disk data before ova.xml".into(),
                    })?;
                    let disk = meta
                        .disks
                        .iter()
                        .find(|m| m.xva_id.as_deref() == Some(d.id.as_str()))
                        .cloned()
                        .ok_or_else(|| StepError {
                            step: Step::ExportStream,
                            detail: format!("the XVA has an unexpected disk {}", d.id),
                        })?;
                    self.order = Some(ExtentOrder::new(d.virtual_size));
                    self.send(SinkMsg::Disk(disk)).await?;
                }
                XvaEvent::Extent(e) => {
                    if let Some(o) = self.order.as_mut() {
                        o.check(&e)
                            .map_err(|e| e.to_string())
                            .map_err(step_err(Step::ExportStream))?;
                        self.p
                            .progress
                            .advanced(&self.vm_name, self.done_before + o.position());
                    }
                    self.send(SinkMsg::Extent(e)).await?;
                }
                XvaEvent::DiskEnd(_) => {
                    if let Some(o) = self.order.take() {
                        self.done_before += o.position();
                    }
                    self.send(SinkMsg::EndDisk).await?;
                }
                XvaEvent::End => self.ended = true,
            }
        }
        Ok(())
    }

    fn begin(&mut self, ova: OvaXml) -> Result<(), StepError> {
        let Some(mut meta) = self.meta.take() else {
            return Err(StepError {
                step: Step::ExportStream,
                detail: "two ova.xml in one XVA".into(),
            });
        };
        let xva_disks = ova
            .disks()
            .map_err(|e| e.to_string())
            .map_err(step_err(Step::ExportStream))?;
        let mut disks = Vec::new();
        for (i, xd) in xva_disks.iter().enumerate() {
            let known = meta.disks.iter().find(|d| d.vdi_uuid == xd.vdi_uuid);
            disks.push(DiskMeta {
                index: i,
                vdi_uuid: xd.vdi_uuid.clone(),
                source_vdi_uuid: known.map(|d| d.source_vdi_uuid.clone()).unwrap_or_default(),
                name: known.map(|d| d.name.clone()).unwrap_or_default(),
                virtual_size: xd.virtual_size,
                userdevice: known.map(|d| d.userdevice.clone()).unwrap_or_default(),
                bootable: known.is_some_and(|d| d.bootable),
                xva_id: Some(xd.id.clone()),
            });
        }
        meta.disks = disks;
        meta.kind = BackupKind::Xva { ova: Box::new(ova) };
        self.sink = Some(SinkThread::start(self.p.target.clone(), meta.clone()));
        self.meta = Some(meta);
        Ok(())
    }

    async fn send(&mut self, msg: SinkMsg) -> Result<(), StepError> {
        match &self.sink {
            Some(s) => s.send(msg).await.map_err(|()| sink_stopped()),
            None => Err(StepError {
                step: Step::ExportStream,
                detail: "disk data before ova.xml".into(),
            }),
        }
    }
}

impl AsyncBytes for XvaConsumer<'_> {
    async fn bytes(&mut self, bytes: &[u8]) -> Result<(), StepError> {
        let plain = self
            .decompress
            .feed(bytes)
            .map_err(|e| format!("cannot decompress the export: {e}"))
            .map_err(step_err(Step::ExportStream))?;
        self.handle(&plain).await
    }

    async fn end(&mut self) -> Result<(), StepError> {
        let rest = self
            .decompress
            .finish()
            .map_err(|e| format!("the compressed export ended early: {e}"))
            .map_err(step_err(Step::ExportStream))?;
        self.handle(&rest).await?;
        self.decoder
            .finish()
            .map_err(|e| format!("the XVA ended early: {e}"))
            .map_err(step_err(Step::ExportStream))?;
        if !self.ended {
            return Err(StepError {
                step: Step::ExportStream,
                detail: "the XVA ended before its tar end".into(),
            });
        }
        Ok(())
    }
}

async fn export_xva(
    p: &Pipeline,
    task: &VmTask,
    snap: &VmRef,
    meta: VmMeta,
    received: &mut u64,
) -> Result<Committed, StepError> {
    let (decompress, use_compression) = match task.compression {
        ConfigCompression::HostGzip => (Decompressor::gzip(), Some("true")),
        ConfigCompression::HostZstd => (
            Decompressor::zstd()
                .map_err(|e| e.to_string())
                .map_err(step_err(Step::ExportStream))?,
            Some("zstd"),
        ),
        ConfigCompression::None | ConfigCompression::Zstd => (Decompressor::None, None),
    };
    let mut params: Vec<(&str, &str)> = vec![("ref", snap.as_str())];
    if let Some(c) = use_compression {
        params.push(("use_compression", c));
    }
    let mut consumer = XvaConsumer {
        p,
        vm_name: task.name.clone(),
        decompress,
        decoder: XvaDecoder::new(),
        meta: Some(meta),
        sink: None,
        order: None,
        done_before: 0,
        ended: false,
    };
    let label = format!("xenvault: export of {}", task.name);
    let exported = run_export(p, &label, "/export", &params, received, &mut consumer).await;
    finish_sink(consumer.sink.take(), exported).await
}

/// Commits the sink when the export succeeded, aborts it otherwise; a sink
/// failure is a `Write` failure.
async fn finish_sink(
    sink: Option<SinkThread>,
    exported: Result<(), StepError>,
) -> Result<Committed, StepError> {
    let Some(sink) = sink else {
        return Err(exported.err().unwrap_or(StepError {
            step: Step::ExportStream,
            detail: "the export held no VM".into(),
        }));
    };
    if exported.is_ok() {
        crate::job::committing();
    }
    match exported {
        Ok(()) => match sink.finish(SinkMsg::Commit).await {
            Ok(Some(c)) => Ok(c),
            Ok(None) => Err(StepError {
                step: Step::Write,
                detail: "the target did not commit the backup".into(),
            }),
            Err(e) => Err(StepError {
                step: Step::Write,
                detail: e.to_string(),
            }),
        },
        Err(err) => {
            let sink_result = sink.finish(SinkMsg::Abort(err.to_string())).await;
            match (err.step, sink_result) {
                // The sink stopped first: its own error is the cause.
                (Step::Write, Err(e)) => Err(StepError {
                    step: Step::Write,
                    detail: e.to_string(),
                }),
                _ => Err(err),
            }
        }
    }
}

impl<T: AsyncBytes> AsyncBytes for &mut T {
    async fn bytes(&mut self, bytes: &[u8]) -> Result<(), StepError> {
        (**self).bytes(bytes).await
    }
    async fn end(&mut self) -> Result<(), StepError> {
        (**self).end().await
    }
}

/// One disk of a per-disk export: VHD or raw decoder into the sink.
struct DiskConsumer<'a> {
    p: &'a Pipeline,
    vm_name: String,
    sink: &'a SinkThread,
    vhd: Option<VhdDecoder>,
    raw: Option<RawDecoder>,
    order: ExtentOrder,
    done_before: u64,
    size: u64,
}

impl DiskConsumer<'_> {
    async fn push(&mut self, extents: Vec<Extent>) -> Result<(), StepError> {
        for e in extents {
            self.order
                .check(&e)
                .map_err(|e| e.to_string())
                .map_err(step_err(Step::ExportStream))?;
            self.p
                .progress
                .advanced(&self.vm_name, self.done_before + self.order.position());
            self.sink
                .send(SinkMsg::Extent(e))
                .await
                .map_err(|()| sink_stopped())?;
        }
        Ok(())
    }
}

impl AsyncBytes for DiskConsumer<'_> {
    async fn bytes(&mut self, bytes: &[u8]) -> Result<(), StepError> {
        let extents = if let Some(d) = self.vhd.as_mut() {
            d.feed(bytes)
                .map_err(|e| format!("the VHD is invalid: {e}"))
                .map_err(step_err(Step::ExportStream))?
        } else if let Some(d) = self.raw.as_mut() {
            d.feed(bytes)
        } else {
            Vec::new()
        };
        self.push(extents).await
    }

    async fn end(&mut self) -> Result<(), StepError> {
        let extents = if let Some(d) = self.vhd.as_mut() {
            d.finish()
                .map_err(|e| format!("the VHD ended early: {e}"))
                .map_err(step_err(Step::ExportStream))?
        } else if let Some(d) = self.raw.take() {
            d.finish()
        } else {
            Vec::new()
        };
        self.push(extents).await?;
        if self.order.position() != self.size {
            return Err(StepError {
                step: Step::ExportStream,
                detail: format!(
                    "the disk export ended at {} of {} bytes",
                    self.order.position(),
                    self.size
                ),
            });
        }
        Ok(())
    }
}

async fn export_disks(
    p: &Pipeline,
    task: &VmTask,
    meta: VmMeta,
    format: DiskFormat,
    received: &mut u64,
) -> Result<Committed, StepError> {
    let disks = meta.disks.clone();
    let sink = SinkThread::start(p.target.clone(), meta);
    let mut done_before = 0u64;
    let mut exported: Result<(), StepError> = Ok(());
    for disk in &disks {
        if sink.send(SinkMsg::Disk(disk.clone())).await.is_err() {
            exported = Err(sink_stopped());
            break;
        }
        let mut consumer = DiskConsumer {
            p,
            vm_name: task.name.clone(),
            sink: &sink,
            vhd: (format == DiskFormat::Vhd).then(|| {
                VhdDecoder::with_options(DecoderOptions {
                    allow_fixed: false,
                    ..DecoderOptions::default()
                })
            }),
            raw: (format == DiskFormat::Raw).then(RawDecoder::new),
            order: ExtentOrder::new(disk.virtual_size),
            done_before,
            size: disk.virtual_size,
        };
        let label = format!("xenvault: export of {} disk {}", task.name, disk.userdevice);
        let params = [
            ("vdi", disk.vdi_uuid.as_str()),
            ("format", format.extension()),
        ];
        let r = run_export(
            p,
            &label,
            "/export_raw_vdi",
            &params,
            received,
            &mut consumer,
        )
        .await;
        if let Err(e) = r {
            exported = Err(e);
            break;
        }
        done_before += disk.virtual_size;
        if sink.send(SinkMsg::EndDisk).await.is_err() {
            exported = Err(sink_stopped());
            break;
        }
    }
    finish_sink(Some(sink), exported).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn boot_disk_choice() {
        let d = |b, u: &str| (b, u.to_string());
        assert_eq!(boot_index(&[d(false, "1"), d(true, "2")]), Some(1));
        assert_eq!(boot_index(&[d(false, "1"), d(false, "0")]), Some(1));
        assert_eq!(boot_index(&[d(false, "3"), d(false, "2")]), Some(1));
        assert_eq!(boot_index(&[]), None);
    }

    #[test]
    fn compression_mapping() {
        assert_eq!(sink_compression(ConfigCompression::None), Compression::None);
        assert_eq!(
            sink_compression(ConfigCompression::HostGzip),
            Compression::Gzip
        );
        assert!(matches!(
            sink_compression(ConfigCompression::Zstd),
            Compression::Zstd { .. }
        ));
    }

    #[test]
    fn step_errors_read_well() {
        let e = StepError {
            step: Step::Snapshot,
            detail: "SR_FULL".into(),
        };
        assert_eq!(e.to_string(), "snapshot failed: SR_FULL");
    }
}
