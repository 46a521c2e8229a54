//! Backups into a deduplicating repository (`type = "repository"` targets):
//! the per-VM flow and the seam where the incremental logic plugs in.
//!
//! Per VM: latest complete restore point (the parent candidate) → snapshot
//! through the journal (tagged) → its full records (`archive::meta::vm_json`)
//! → per disk a [`DiskReadPlan`] chosen by [`plan_disk`] (full until the
//! incremental module decides otherwise) → [`exec::execute_disk`] reads it
//! (NBD with several connections, or a VHD export) and feeds a repository
//! `DiskWriter` (full or incremental), `disk_concurrency` disks at once →
//! `RestorePointWriter::commit` with the layout of the lead's contract
//! (/work/coord/ISSUE4.md) → the snapshot is released (destroyed by token,
//! or kept as the next base by the incremental module). A failed VM aborts
//! its restore point: nothing is listed and earlier restore points are
//! never touched.

pub mod base;
pub mod exec;
pub mod incremental;
pub mod resume;
pub mod retention;

use std::ops::Range;
use std::sync::Arc;

use time::OffsetDateTime;
use xenvault_repo::{Manifest, Repository, WriteOptions};
use xenvault_types::Value;
use xenvault_types::config::{BaseKeeping, CbtMode, DiskSelection};
use xenvault_types::report::{DiskReadReport, RepoVmStats};
use xenvault_xapi::http::HttpTransfer;
use xenvault_xapi::records::{Vdi, VdiRef};
use xenvault_xapi::session::Session;
use xenvault_xapi::task::WaitOptions;

use crate::archive::meta;
use crate::backup::{
    Progress, Step, StepError, VmResult, VmTask, disk_metas, export_records, keep_boot_disk,
    non_boot_vdis, snapshot_for_backup,
};
use crate::journal::{self, CleanupReport, RunContext, TaggedSnapshot};
use crate::sink::{Committed, DiskMeta};

/// The job settings a repository backup uses.
#[derive(Debug, Clone)]
pub struct RepoSettings {
    /// NBD connections per disk.
    pub nbd_connections: u32,
    /// Disks of one VM read at once.
    pub disk_concurrency: u32,
    /// Changed block tracking: use, enable, off.
    pub cbt: CbtMode,
    /// What stays on the pool as the next incremental's base.
    pub base: BaseKeeping,
}

impl Default for RepoSettings {
    fn default() -> Self {
        RepoSettings {
            nbd_connections: 4,
            disk_concurrency: 2,
            cbt: CbtMode::default(),
            base: BaseKeeping::default(),
        }
    }
}

/// What the VM runs of one job into one repository share.
#[derive(Clone)]
pub struct RepoPipeline {
    /// The pool session.
    pub session: Session,
    /// HTTP transfers (VHD exports, the allocation probe).
    pub transfer: Arc<HttpTransfer>,
    /// Journal, pool, job, run.
    pub run: RunContext,
    /// The open repository.
    pub repo: Repository,
    /// The pool's name for labels.
    pub pool_label: String,
    /// Progress observer.
    pub progress: Arc<dyn Progress>,
    /// How long to wait for export tasks.
    pub wait: WaitOptions,
    /// Job settings.
    pub settings: RepoSettings,
    /// Repository writer knobs.
    pub write: WriteOptions,
}

/// How one disk is read. Labels are the `read` field of `DiskEntry.meta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMethod {
    /// NBD, allocated data of the whole disk (VHD BAT or NBD block status).
    NbdFull,
    /// NBD, only the ranges CBT says changed since the parent.
    NbdCbt,
    /// `/export_raw_vdi?format=vhd&base=…`: a differencing VHD.
    VhdDiff,
    /// `/export_raw_vdi?format=vhd`: the whole disk (allocated blocks).
    VhdFull,
}

impl ReadMethod {
    /// `nbd-full`, `nbd-cbt`, `vhd-diff`, `vhd-full`.
    pub fn label(self) -> &'static str {
        match self {
            ReadMethod::NbdFull => "nbd-full",
            ReadMethod::NbdCbt => "nbd-cbt",
            ReadMethod::VhdDiff => "vhd-diff",
            ReadMethod::VhdFull => "vhd-full",
        }
    }

    /// True for the NBD methods.
    pub fn is_nbd(self) -> bool {
        matches!(self, ReadMethod::NbdFull | ReadMethod::NbdCbt)
    }
}

/// How to read one disk: chosen by [`plan_disk`] (the incremental module's
/// `choose_plan`), carried out by [`exec::execute_disk`].
#[derive(Debug, Clone)]
pub struct DiskReadPlan {
    /// The method.
    pub method: ReadMethod,
    /// Why not the best method (`None` when it is the best one); goes to the
    /// report and `DiskEntry.meta.reason`.
    pub reason: Option<String>,
    /// `Some(key)`: write the disk incrementally on disk `key` of the parent
    /// restore point (`RestorePointWriter::incremental_disk`); `None`: full.
    pub parent_disk_key: Option<String>,
    /// NBD methods: the byte ranges to read (512-aligned, the disk end
    /// excepted). `None` = the allocated data of the whole disk.
    pub ranges: Option<Vec<Range<u64>>>,
    /// [`ReadMethod::VhdDiff`]: the `base=` parameter (VDI ref or uuid of
    /// the base snapshot's disk).
    pub vhd_base: Option<String>,
    /// What to do instead when NBD cannot be reached (no NBD network,
    /// every connection refused). Must have the same `parent_disk_key`.
    pub nbd_fallback: Option<Box<DiskReadPlan>>,
    /// A resumed disk: where its index starts (INCREMENTAL's `resume.rs`).
    pub start: Option<resume::ResumeStart>,
}

impl DiskReadPlan {
    /// A full backup over NBD (allocated data only), falling back to a full
    /// VHD export when NBD is unreachable. `reason`: why it is full.
    pub fn full(reason: Option<String>) -> DiskReadPlan {
        DiskReadPlan {
            method: ReadMethod::NbdFull,
            reason: reason.clone(),
            parent_disk_key: None,
            ranges: None,
            vhd_base: None,
            nbd_fallback: Some(Box::new(DiskReadPlan {
                method: ReadMethod::VhdFull,
                reason,
                parent_disk_key: None,
                ranges: None,
                vhd_base: None,
                nbd_fallback: None,
                start: None,
            })),
            start: None,
        }
    }

    /// True when the disk is written on the parent's index.
    pub fn is_incremental(&self) -> bool {
        self.parent_disk_key.is_some()
    }
}

/// One disk of the snapshot, as the plan and the executor see it.
#[derive(Debug, Clone)]
pub struct DiskSource {
    /// Its metadata (snapshot VDI uuid, live VDI uuid, size, device…).
    pub meta: DiskMeta,
    /// The repository disk key: the live (source) VDI's uuid, stable across
    /// runs; the snapshot VDI's uuid when the source is unknown.
    pub key: String,
    /// The snapshot's VDI.
    pub snapshot_vdi: VdiRef,
    /// Its record.
    pub snapshot_record: Option<Vdi>,
    /// The live VDI it is a snapshot of.
    pub source_vdi: Option<VdiRef>,
}

/// Everything about the VM being backed up that a plan may look at.
pub struct VmContext<'a> {
    /// The pipeline.
    pub p: &'a RepoPipeline,
    /// The VM.
    pub task: &'a VmTask,
    /// The new snapshot.
    pub snapshot: &'a TaggedSnapshot,
    /// The VM's newest complete restore point, if any (the parent candidate).
    pub parent: Option<&'a Manifest>,
    /// Checkpoints of the disks for resuming (INCREMENTAL's `resume.rs`).
    pub resume: Option<&'a resume::ResumeRecorder>,
}

/// Chooses how to read one disk. Until the incremental module exists, every
/// disk is read in full.
///
/// INCREMENTAL: replace the body with `incremental::choose_plan(ctx, disk).await`
/// (same signature).
pub async fn plan_disk(ctx: &VmContext<'_>, disk: &DiskSource) -> DiskReadPlan {
    incremental::choose_plan(ctx, disk).await
}

/// Releases the snapshot after the VM's backup (committed or not): destroys
/// everything of its journal token.
///
/// INCREMENTAL: the base-keeping policy goes here (keep the snapshot of a
/// committed restore point as the next base, destroy the superseded base).
pub async fn release_snapshot(
    p: &RepoPipeline,
    token: &str,
    committed: Option<&Manifest>,
) -> CleanupReport {
    base::release_snapshot(p, token, committed).await
}

/// Destroys everything the journal token `token` created.
pub async fn destroy_by_token(p: &RepoPipeline, token: &str) -> CleanupReport {
    let mut cleanup = CleanupReport::default();
    match p.run.journal.outstanding(Some(&p.run.pool)) {
        Ok(open) => {
            if let Some(o) = open.into_iter().find(|o| o.token == token) {
                cleanup = journal::destroy_token(&p.session, &p.run.journal, &o).await;
            }
        }
        Err(e) => cleanup.errors.push(e.to_string()),
    }
    cleanup
}

/// What became of one VM backed up into the repository.
#[derive(Debug, Clone)]
pub struct RepoVmResult {
    /// Outcome, cleanup, times (as for archives).
    pub vm: VmResult,
    /// Repository counters and per-disk read methods.
    pub stats: RepoVmStats,
    /// The committed manifest.
    pub manifest: Option<Manifest>,
    /// Lines for the VM's report (CBT enabled on a disk, a base not used…).
    pub notes: Vec<String>,
}

/// `vm_uuid/id`: how a restore point is named in reports.
pub fn restore_point_name(vm_uuid: &str, id: &str) -> String {
    format!("{vm_uuid}/{id}")
}

/// Backs up one VM into the repository, then releases its snapshot whatever
/// happened. Never panics on pool or repository errors.
pub async fn backup_vm(p: &RepoPipeline, task: &VmTask) -> RepoVmResult {
    let started = OffsetDateTime::now_utc();
    let mut token: Option<String> = None;
    let mut stats = RepoVmStats::default();
    let mut notes = Vec::new();
    let outcome = run_vm(p, task, &mut token, &mut stats, &mut notes).await;

    let mut cleanup = CleanupReport::default();
    let mut cleanup_error = None;
    if let Some(token) = &token {
        cleanup = release_snapshot(p, token, outcome.as_ref().ok()).await;
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
    let (outcome, manifest) = match outcome {
        Ok(m) => (
            Ok(Committed {
                location: format!("repository {}", restore_point_name(&m.vm_uuid, &m.id)),
                bytes_written: stats.bytes_stored,
            }),
            Some(m),
        ),
        Err(e) => (Err(e), None),
    };
    let vm = VmResult {
        started,
        finished: OffsetDateTime::now_utc(),
        bytes_received: stats.bytes_read,
        outcome,
        cleanup,
        cleanup_error,
    };
    let words = match (&vm.outcome, &vm.cleanup_error) {
        (Err(e), _) | (Ok(_), Some(e)) => Some(e.to_string()),
        _ => None,
    };
    p.progress
        .finished(&task.name, words.as_deref().map_or(Ok(()), Err));
    RepoVmResult {
        vm,
        stats,
        manifest,
        notes,
    }
}

fn repo_err(step: Step) -> impl FnOnce(xenvault_repo::RepoError) -> StepError {
    move |e| StepError {
        step,
        detail: e.to_string(),
    }
}

async fn run_vm(
    p: &RepoPipeline,
    task: &VmTask,
    token: &mut Option<String>,
    stats: &mut RepoVmStats,
    notes: &mut Vec<String>,
) -> Result<Manifest, StepError> {
    let session = &p.session;
    let source_vm = session
        .call_value("VM.get_record", vec![Value::str(task.vm_ref.as_str())])
        .await
        .map_err(|e| StepError {
            step: Step::Inspect,
            detail: e.to_string(),
        })?;
    let ignore = if task.disks == DiskSelection::Boot {
        non_boot_vdis(session, &source_vm)
            .await
            .map_err(|detail| StepError {
                step: Step::Inspect,
                detail,
            })?
    } else {
        Vec::new()
    };
    // CBT enabled where asked (before the snapshot) and the parent
    // candidate: only committed restore points are listed.
    let prep = base::prepare_vm(p, task).await?;
    notes.extend(prep.notes);
    let parent = prep.parent;

    let snap = snapshot_for_backup(session, &p.run, task, &ignore, token).await?;
    let records = export_records(session, &snap.vm_ref)
        .await
        .map_err(|detail| StepError {
            step: Step::Records,
            detail,
        })?;
    let mut disks = disk_metas(&records);
    if task.disks == DiskSelection::Boot {
        keep_boot_disk(&mut disks);
    }
    let sources = disk_sources(session, &snap, &mut disks).await?;
    let total: u64 = disks.iter().map(|d| d.virtual_size).sum();
    p.progress.started(&task.name, total);

    let recorder =
        resume::ResumeRecorder::new(p, &task.vm_uuid, &snap.token, &snap.vm.uuid, sources.len());
    let ctx = VmContext {
        p,
        task,
        snapshot: &snap,
        parent: parent.as_ref(),
        resume: Some(&recorder),
    };
    let mut plans = Vec::new();
    for d in &sources {
        plans.push(plan_disk(&ctx, d).await);
    }
    let parent_id = plans
        .iter()
        .any(DiskReadPlan::is_incremental)
        .then(|| parent.as_ref().map(|m| m.id.clone()))
        .flatten();
    recorder.set_parent(parent_id.as_deref());

    let snapshot_time = if snap.vm.snapshot_time.0 == OffsetDateTime::UNIX_EPOCH {
        OffsetDateTime::now_utc()
    } else {
        snap.vm.snapshot_time.0
    };
    let time = free_restore_point_time(
        &p.repo,
        &task.vm_uuid,
        restore_point_time(snapshot_time, parent.as_ref()),
    )
    .await
    .map_err(repo_err(Step::Repository))?;
    let writer = p
        .repo
        .begin_restore_point(
            &task.vm_uuid,
            &task.name,
            time,
            parent_id.as_deref(),
            p.write.clone(),
        )
        .await
        .map_err(repo_err(Step::Repository))?;

    let read = exec::execute_disks(&ctx, &writer, &sources, plans).await;
    for d in &read.disks {
        add_disk(stats, d);
    }
    if let Err(e) = read.result {
        if let Err(abort) = writer.abort().await {
            tracing::warn!("{}: cannot release the repository lock: {abort}", task.name);
        }
        return Err(e);
    }
    let vm_records: serde_json::Value =
        serde_json::from_str(&meta::vm_json(&task.vm_uuid, &records, &source_vm, &disks)).map_err(
            |e| StepError {
                step: Step::Commit,
                detail: format!("the VM records do not serialize: {e}"),
            },
        )?;
    let labels = serde_json::json!({
        "job": p.run.job,
        "run_id": p.run.run_id,
        "pool": p.pool_label,
        "snapshot_uuid": snap.vm.uuid,
        "snapshot_time": xenvault_types::report::rfc3339::format(&snapshot_time),
    });
    let xva = serde_json::json!({"format": "xenvault-ova-from-records", "version": 1});
    crate::job::committing();
    let manifest = writer
        .commit(vm_records, xva, labels)
        .await
        .map_err(repo_err(Step::Commit))?;
    stats.restore_point = restore_point_name(&manifest.vm_uuid, &manifest.id);
    Ok(manifest)
}

fn add_disk(stats: &mut RepoVmStats, d: &DiskReadReport) {
    stats.bytes_read += d.bytes_read;
    stats.bytes_stored += d.bytes_stored;
    stats.new_chunks += d.new_chunks;
    stats.dedup_chunks += d.dedup_chunks;
    stats.disks.push(d.clone());
}

/// The restore point's time: the snapshot's, moved one second past the
/// parent when it would not sort after it (ids are times to the second).
pub fn restore_point_time(
    snapshot_time: OffsetDateTime,
    parent: Option<&Manifest>,
) -> OffsetDateTime {
    let snapshot_time = snapshot_time.replace_nanosecond(0).unwrap_or(snapshot_time);
    let Some(prev) = parent.and_then(|m| xenvault_repo::manifest::parse_rfc3339(&m.time)) else {
        return snapshot_time;
    };
    if snapshot_time <= prev {
        prev + time::Duration::seconds(1)
    } else {
        snapshot_time
    }
}

/// The first time from `t` on (second by second) whose restore point id is
/// unused: no manifest, and no index left by an attempt that failed before
/// its commit (ids are times to the second, so two runs within one second,
/// or a retry right after a failed commit, would collide).
pub async fn free_restore_point_time(
    repo: &Repository,
    vm_uuid: &str,
    t: OffsetDateTime,
) -> Result<OffsetDateTime, xenvault_repo::RepoError> {
    let mut t = t;
    for _ in 0..120 {
        let id = xenvault_repo::manifest::restore_point_id(t);
        let manifest = xenvault_repo::manifest::manifest_key(vm_uuid, &id);
        let taken = match repo.storage().stat(&manifest).await {
            Ok(_) => true,
            Err(e) if e.is_not_found() => !repo
                .storage()
                .list(&format!("indexes/{vm_uuid}/{id}/"))
                .await?
                .is_empty(),
            Err(e) => return Err(e.into()),
        };
        if !taken {
            return Ok(t);
        }
        t += time::Duration::seconds(1);
    }
    Ok(t)
}

/// Pairs the selected disks with the snapshot's VDIs and their live VDIs;
/// fills `source_vdi_uuid` in `disks`.
async fn disk_sources(
    session: &Session,
    snap: &TaggedSnapshot,
    disks: &mut [DiskMeta],
) -> Result<Vec<DiskSource>, StepError> {
    let mut out = Vec::new();
    for d in disks.iter_mut() {
        let found = snap.vdis.iter().find(|(_, v)| v.uuid == d.vdi_uuid);
        let (snapshot_vdi, record) = match found {
            Some((r, v)) => (r.clone(), Some(v.clone())),
            None => {
                let r = session
                    .vdi()
                    .get_by_uuid(&d.vdi_uuid)
                    .await
                    .map_err(|e| StepError {
                        step: Step::Records,
                        detail: format!("VDI {}: {e}", d.vdi_uuid),
                    })?;
                (r, None)
            }
        };
        let source_vdi = record
            .as_ref()
            .map(|v| v.snapshot_of.clone())
            .filter(|r| !r.is_null());
        if let Some(src) = &source_vdi
            && d.source_vdi_uuid.is_empty()
        {
            match session
                .call::<String>("VDI.get_uuid", vec![Value::str(src.as_str())])
                .await
            {
                Ok(u) => d.source_vdi_uuid = u,
                Err(e) => tracing::warn!("VDI.get_uuid {src}: {e}"),
            }
        }
        let key = if d.source_vdi_uuid.is_empty() {
            d.vdi_uuid.clone()
        } else {
            d.source_vdi_uuid.clone()
        };
        out.push(DiskSource {
            meta: d.clone(),
            key,
            snapshot_vdi,
            snapshot_record: record,
            source_vdi,
        });
    }
    Ok(out)
}
