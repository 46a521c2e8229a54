//! `xenvault demo`: the main job, end to end, on a built-in simulated pool.
//!
//! The demo starts `xapi-sim` in-process, connects to it over HTTPS with the
//! certificate pinned, and for every VM does what a backup run does at the
//! XAPI level, checking each result bit for bit:
//!
//! 1. enable CBT on the VM's disks, snapshot the VM, clear the snapshot's
//!    template flag;
//! 2. export the snapshot as XVA (`/export`, inside a task) and decode it;
//!    each disk must equal the raw export of the snapshot VDI;
//! 3. let the "guest" write some blocks, snapshot again, and ask XAPI which
//!    64 KiB blocks changed (`VDI.list_changed_blocks`): exactly the written
//!    ones must be listed;
//! 4. read only those blocks over NBD (TLS, pinned to the host certificate)
//!    and apply them to the first image: the result must equal the second
//!    snapshot's raw export;
//! 5. destroy both snapshots and their VDIs, whatever happened before, and
//!    check that nothing is left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use futures::StreamExt as _;
use serde::Serialize;
use xenvault_formats::xva::{XvaDecoder, XvaEvent};
use xenvault_sim::disk::DiskStore;
use xenvault_sim::scenario::{FlagScenario, Scenario};
use xenvault_sim::{SimConfig, Simulator};
use xenvault_types::ExtentData;
use xenvault_xapi::cbt::ChangedBlocks;
use xenvault_xapi::http::{HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::nbd::client::{NbdMultiReader, NbdOptions};
use xenvault_xapi::records::{VbdType, Vdi, VdiRef, Vm, VmRef};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::task::WaitOptions;
use xenvault_xapi::tls::{Fingerprint, TlsPolicy};

use crate::cli::DemoArgs;
use crate::exit::{ExitCode, UsageError};

/// The demo never makes disks larger than this: it holds images in memory.
const MAX_DEMO_DISK: u64 = 256 << 20;
/// Guest writes per disk between the two snapshots (64 KiB blocks).
const GUEST_WRITES: u64 = 24;
/// NBD connections per disk.
const NBD_CONNECTIONS: usize = 2;
/// Name prefix of the demo's snapshots.
const SNAPSHOT_PREFIX: &str = "xenvault-demo";

/// What happened to one VM.
#[derive(Debug, Serialize)]
struct VmReport {
    name: String,
    uuid: String,
    disks: usize,
    xva_bytes: u64,
    changed_blocks: u64,
    nbd_bytes: u64,
    seconds: f64,
    ok: bool,
    error: Option<String>,
}

/// The demo's outcome.
#[derive(Debug, Serialize)]
struct DemoReport {
    vms: Vec<VmReport>,
    leftover_snapshots: usize,
    seconds: f64,
    state_dir: Option<PathBuf>,
}

/// Runs the demo.
pub async fn run(args: DemoArgs, json: bool) -> anyhow::Result<ExitCode> {
    if args.disk_size > MAX_DEMO_DISK {
        return Err(UsageError(format!(
            "--disk-size {} is larger than the demo allows ({} MiB): the demo keeps images in memory",
            args.disk_size,
            MAX_DEMO_DISK >> 20
        ))
        .into());
    }
    let started = Instant::now();
    let temp;
    let root = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir().context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
    };

    say(format!(
        "Starting a simulated XAPI pool: {} VMs, {} MiB disks, 25% written, NBD over TLS",
        args.vms,
        args.disk_size >> 20
    ));
    let mut config = SimConfig::new(root.join("pool"));
    config.scenario = Scenario::from_flags(&FlagScenario {
        vms: args.vms as usize,
        disk_size: args.disk_size,
        written: 0.25,
        hosts: 1,
        nbd_purpose: "nbd".into(),
    });
    let sim = Simulator::start(config)
        .await
        .context("cannot start the simulated pool")?;
    say(format!(
        "  pool at {} (certificate {})",
        sim.info.https_url, sim.info.fingerprint
    ));

    let outcome = run_against(&sim, &say).await;
    let shutdown = sim.shutdown().await;
    let (vms, leftover_snapshots) = outcome?;
    shutdown.context("the simulated pool did not stop cleanly")?;

    let report = DemoReport {
        vms,
        leftover_snapshots,
        seconds: started.elapsed().as_secs_f64(),
        state_dir: args.keep.clone(),
    };
    let failed = report.vms.iter().filter(|v| !v.ok).count();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(if failed == 0 && report.leftover_snapshots == 0 {
        ExitCode::Success
    } else if failed < report.vms.len() {
        ExitCode::Partial
    } else {
        ExitCode::Failure
    })
}

fn print_summary(report: &DemoReport) {
    println!();
    println!(
        "{:<12} {:>5} {:>10} {:>8} {:>10} {:>7}  result",
        "VM", "disks", "XVA MiB", "changed", "NBD MiB", "secs"
    );
    for vm in &report.vms {
        println!(
            "{:<12} {:>5} {:>10.1} {:>8} {:>10.2} {:>7.2}  {}",
            vm.name,
            vm.disks,
            mib(vm.xva_bytes),
            vm.changed_blocks,
            mib(vm.nbd_bytes),
            vm.seconds,
            match &vm.error {
                None =>
                    "ok: XVA = raw disk; CBT = written blocks; NBD delta = new disk".to_string(),
                Some(e) => format!("FAILED: {e}"),
            }
        );
    }
    let ok = report.vms.iter().filter(|v| v.ok).count();
    println!();
    println!(
        "Summary: {} VMs expected, {} succeeded, {} failed; {} leftover snapshots; {:.1} s",
        report.vms.len(),
        ok,
        report.vms.len() - ok,
        report.leftover_snapshots,
        report.seconds
    );
    if let Some(dir) = &report.state_dir {
        println!("Simulator state kept in {}", dir.join("pool").display());
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Everything the demo does against a running simulator.
async fn run_against(
    sim: &Simulator,
    say: &impl Fn(String),
) -> anyhow::Result<(Vec<VmReport>, usize)> {
    let fingerprint: Fingerprint = sim
        .info
        .fingerprint
        .parse()
        .context("the simulator printed an invalid fingerprint")?;
    let policy = TlsPolicy::Pinned(fingerprint);
    let session = Client::connect(
        &sim.info.https_url,
        Credentials::new(sim.info.user.clone(), sim.info.password.clone()),
        policy.clone(),
    )
    .await
    .context("cannot log in to the simulated pool")?;
    let transfer = HttpTransfer::new(&policy, TransferOptions::default())
        .context("cannot set up HTTP transfers")?;
    let ctx = Ctx {
        session: session.clone(),
        transfer,
        disks: sim.pool.disks.clone(),
    };

    let mut vms: Vec<(VmRef, Vm)> = session
        .vm()
        .get_all_records()
        .await?
        .into_iter()
        .filter(|(_, vm)| vm.is_regular_vm())
        .collect();
    vms.sort_by(|a, b| a.1.name_label.cmp(&b.1.name_label));
    say(format!("Backing up {} VMs", vms.len()));

    let mut reports = Vec::new();
    for (index, (vm_ref, vm)) in vms.iter().enumerate() {
        let t0 = Instant::now();
        say(format!(
            "  {} ({:?}): snapshot, XVA export, guest writes, CBT, NBD delta",
            vm.name_label, vm.power_state
        ));
        let mut report = VmReport {
            name: vm.name_label.clone(),
            uuid: vm.uuid.clone(),
            disks: 0,
            xva_bytes: 0,
            changed_blocks: 0,
            nbd_bytes: 0,
            seconds: 0.0,
            ok: false,
            error: None,
        };
        let mut snapshots = Vec::new();
        let result = ctx
            .one_vm(vm_ref, index as u64 + 1, &mut report, &mut snapshots)
            .await;
        // Cleanup runs whatever happened before.
        let cleanup = ctx.destroy_snapshots(&snapshots).await;
        match (result, cleanup) {
            (Ok(()), Ok(())) => report.ok = true,
            (Err(e), _) | (Ok(()), Err(e)) => report.error = Some(format!("{e:#}")),
        }
        report.seconds = t0.elapsed().as_secs_f64();
        reports.push(report);
    }

    let leftovers = session
        .vm()
        .get_all_records()
        .await?
        .values()
        .filter(|vm| vm.is_a_snapshot && vm.name_label.starts_with(SNAPSHOT_PREFIX))
        .count();
    let _ = session.logout().await;
    Ok((reports, leftovers))
}

struct Ctx {
    session: Session,
    transfer: HttpTransfer,
    disks: Arc<DiskStore>,
}

impl Ctx {
    async fn one_vm(
        &self,
        vm: &VmRef,
        seed: u64,
        report: &mut VmReport,
        snapshots: &mut Vec<VmRef>,
    ) -> anyhow::Result<()> {
        let disks = self.vm_disks(vm).await?;
        report.disks = disks.len();
        for (vdi, _) in &disks {
            self.session.vdi().enable_cbt(vdi).await?;
        }

        // 1. First snapshot, exported as XVA; each disk checked against a raw export.
        let snap1 = self.snapshot(vm, "first", snapshots).await?;
        let (images, xva_bytes) = self.export_xva(&snap1).await?;
        report.xva_bytes = xva_bytes;
        let snap1_disks = self.vm_disks(&snap1).await?;
        ensure!(
            images.len() == snap1_disks.len(),
            "the XVA holds {} disks, the snapshot has {}",
            images.len(),
            snap1_disks.len()
        );
        for (_, vdi) in &snap1_disks {
            let image = images
                .get(&vdi.uuid)
                .ok_or_else(|| anyhow!("the XVA lacks disk {}", vdi.uuid))?;
            let raw = self.export_raw(vdi).await?;
            ensure!(
                *image == raw,
                "disk {} differs between the XVA and the raw export",
                vdi.uuid
            );
        }

        // 2. Guest writes, second snapshot, changed blocks.
        let mut written: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        for (_, vdi) in &disks {
            let store = self.disks.clone();
            let uuid = vdi.uuid.clone();
            let blocks = tokio::task::spawn_blocking(move || {
                store.guest_write(&uuid, seed * 1000 + 7, GUEST_WRITES)
            })
            .await??;
            written.insert(vdi.uuid.clone(), blocks.into_iter().collect());
        }
        let snap2 = self.snapshot(vm, "second", snapshots).await?;
        let snap2_disks = self.vm_disks(&snap2).await?;

        for (old_ref, old) in &snap1_disks {
            let source = self.session.vdi().get_record(&old.snapshot_of).await?;
            let (new_ref, new) = snap2_disks
                .iter()
                .find(|(_, d)| d.snapshot_of == old.snapshot_of)
                .ok_or_else(|| anyhow!("the second snapshot lacks disk {}", source.uuid))?;
            let size = u64::try_from(new.virtual_size)?;
            let bitmap = self
                .session
                .vdi()
                .list_changed_blocks(old_ref, new_ref)
                .await?;
            let changed = ChangedBlocks::from_base64(&bitmap, size)?;
            let listed: BTreeSet<u64> = changed.changed_blocks().collect();
            let expected = written.get(&source.uuid).cloned().unwrap_or_default();
            ensure!(
                listed == expected,
                "CBT lists {} changed blocks on {}, the guest wrote {}",
                listed.len(),
                source.uuid,
                expected.len()
            );
            report.changed_blocks += listed.len() as u64;

            // 3. Only the changed blocks, over NBD, applied to the first image.
            let mut image = images
                .get(&old.uuid)
                .cloned()
                .ok_or_else(|| anyhow!("no first image of {}", old.uuid))?;
            report.nbd_bytes += self.apply_over_nbd(new_ref, &changed, &mut image).await?;
            let raw = self.export_raw(new).await?;
            ensure!(
                image == raw,
                "disk {}: first image + NBD delta differs from the second snapshot",
                source.uuid
            );
        }
        Ok(())
    }

    /// The VM's disks (VBDs of type Disk that hold a VDI), in device order.
    async fn vm_disks(&self, vm: &VmRef) -> anyhow::Result<Vec<(VdiRef, Vdi)>> {
        let record = self.session.vm().get_record(vm).await?;
        let mut out = Vec::new();
        for vbd_ref in &record.vbds {
            let vbd = self.session.vbd().get_record(vbd_ref).await?;
            if vbd.type_ != VbdType::Disk || vbd.empty || vbd.vdi.is_null() {
                continue;
            }
            let vdi = self.session.vdi().get_record(&vbd.vdi).await?;
            out.push((vbd.userdevice.clone(), vbd.vdi.clone(), vdi));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out.into_iter().map(|(_, r, v)| (r, v)).collect())
    }

    async fn snapshot(
        &self,
        vm: &VmRef,
        label: &str,
        snapshots: &mut Vec<VmRef>,
    ) -> anyhow::Result<VmRef> {
        let name = format!("{SNAPSHOT_PREFIX} {label}");
        let snap = self.session.vm().snapshot(vm, &name, &[]).await?;
        snapshots.push(snap.clone());
        self.session.vm().set_is_a_template(&snap, false).await?;
        Ok(snap)
    }

    /// Exports a VM as XVA and decodes it into one image per disk (by VDI uuid).
    async fn export_xva(&self, vm: &VmRef) -> anyhow::Result<(BTreeMap<String, Vec<u8>>, u64)> {
        let task = self
            .session
            .create_task("xenvault demo: XVA export", "")
            .await?;
        let url = handler_url(
            &self.session.base_url(),
            "/export",
            self.session.session_ref().expose(),
            Some(task.id()),
            &[("ref", vm.as_str())],
        );
        let mut images = BTreeMap::new();
        let mut bytes = 0u64;
        let streamed: anyhow::Result<()> = async {
            let download = self.transfer.get(url).await?;
            let mut body = download.body;
            let mut decoder = XvaDecoder::new();
            let mut current: Option<(String, Vec<u8>)> = None;
            let mut ended = false;
            let mut handle = |events: Vec<XvaEvent>, ended: &mut bool| -> anyhow::Result<()> {
                for event in events {
                    match event {
                        XvaEvent::DiskStart(disk) => {
                            let size = usize::try_from(disk.virtual_size)?;
                            ensure!(disk.virtual_size <= MAX_DEMO_DISK, "disk too large");
                            current = Some((disk.vdi_uuid.clone(), vec![0u8; size]));
                        }
                        XvaEvent::Extent(extent) => {
                            let (_, image) = current
                                .as_mut()
                                .ok_or_else(|| anyhow!("disk data outside a disk"))?;
                            if let ExtentData::Data(data) = &extent.data {
                                let at = usize::try_from(extent.offset)?;
                                image
                                    .get_mut(at..at + data.len())
                                    .ok_or_else(|| anyhow!("extent past the disk end"))?
                                    .copy_from_slice(data);
                            }
                        }
                        XvaEvent::DiskEnd(_) => {
                            if let Some((uuid, image)) = current.take() {
                                images.insert(uuid, image);
                            }
                        }
                        XvaEvent::End => *ended = true,
                        XvaEvent::OvaXml(_) => {}
                    }
                }
                Ok(())
            };
            while let Some(piece) = body.next().await {
                let piece = piece?;
                bytes += piece.len() as u64;
                handle(decoder.feed(&piece)?, &mut ended)?;
            }
            decoder.finish()?;
            ensure!(ended, "the XVA stream ended early");
            Ok(())
        }
        .await;
        let waited = task.wait(&WaitOptions::default()).await;
        match (streamed, waited) {
            (Ok(()), Ok(_)) => Ok((images, bytes)),
            // The task holds the real cause when the stream broke.
            (Err(_), Err(task_error)) => Err(task_error).context("the XVA export failed"),
            (Err(e), Ok(_)) => Err(e).context("the XVA export stream is invalid"),
            (Ok(()), Err(e)) => Err(e).context("the XVA export task failed"),
        }
    }

    /// The raw bytes of a VDI (`/export_raw_vdi?format=raw`).
    async fn export_raw(&self, vdi: &Vdi) -> anyhow::Result<Vec<u8>> {
        let task = self
            .session
            .create_task("xenvault demo: raw export", "")
            .await?;
        let url = handler_url(
            &self.session.base_url(),
            "/export_raw_vdi",
            self.session.session_ref().expose(),
            Some(task.id()),
            &[("vdi", vdi.uuid.as_str()), ("format", "raw")],
        );
        let streamed: anyhow::Result<Vec<u8>> = async {
            let download = self.transfer.get(url).await?;
            let mut body = download.body;
            let mut out = Vec::new();
            while let Some(piece) = body.next().await {
                let piece = piece?;
                ensure!(
                    (out.len() + piece.len()) as u64 <= MAX_DEMO_DISK,
                    "raw export larger than the disk"
                );
                out.extend_from_slice(&piece);
            }
            Ok(out)
        }
        .await;
        let waited = task.wait(&WaitOptions::default()).await;
        match (streamed, waited) {
            (Ok(bytes), Ok(_)) => {
                ensure!(
                    bytes.len() as i64 == vdi.virtual_size,
                    "raw export of {} has {} bytes, the disk {}",
                    vdi.uuid,
                    bytes.len(),
                    vdi.virtual_size
                );
                Ok(bytes)
            }
            (Err(_), Err(task_error)) => Err(task_error).context("the raw export failed"),
            (Err(e), Ok(_)) => Err(e).context("the raw export stream broke"),
            (Ok(_), Err(e)) => Err(e).context("the raw export task failed"),
        }
    }

    /// Reads the changed ranges of `vdi` over NBD into `image`; returns the bytes read.
    async fn apply_over_nbd(
        &self,
        vdi: &VdiRef,
        changed: &ChangedBlocks,
        image: &mut [u8],
    ) -> anyhow::Result<u64> {
        let infos = self.session.vdi().get_nbd_info(vdi).await?;
        let info = infos
            .first()
            .ok_or_else(|| anyhow!("VDI.get_nbd_info lists no NBD server (no NBD network?)"))?;
        let options = NbdOptions::from_record(info)?;
        let reader = tokio::time::timeout(
            Duration::from_secs(60),
            NbdMultiReader::connect(&options, NBD_CONNECTIONS),
        )
        .await
        .map_err(|_| anyhow!("NBD connect timed out"))??;
        let mut extents = reader.read_ranges(changed.ranges());
        let mut read = 0u64;
        while let Some(extent) = extents.next().await {
            let extent = extent?;
            let at = usize::try_from(extent.offset)?;
            let len = usize::try_from(extent.len())?;
            let target = image
                .get_mut(at..at + len)
                .ok_or_else(|| anyhow!("NBD extent past the disk end"))?;
            match &extent.data {
                ExtentData::Data(data) => target.copy_from_slice(data),
                ExtentData::Zero(_) => target.fill(0),
            }
            read += len as u64;
        }
        drop(extents);
        drop(reader);
        Ok(read)
    }

    /// Destroys snapshot VMs and their VDIs by ref, tolerating ones already gone.
    async fn destroy_snapshots(&self, snapshots: &[VmRef]) -> anyhow::Result<()> {
        let mut first_error = None;
        for snap in snapshots {
            let vdis = match self.vm_disks(snap).await {
                Ok(d) => d,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            if let Err(e) = self.session.vm().destroy(snap).await {
                first_error.get_or_insert(e.into());
            }
            for (vdi, _) in vdis {
                if let Err(e) = self.session.vdi().destroy(&vdi).await {
                    first_error.get_or_insert(e.into());
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => bail!("cleanup failed: {e:#}"),
        }
    }
}
