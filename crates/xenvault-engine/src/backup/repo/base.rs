//! The base of forever-incremental backups: which kept snapshot and which
//! restore point the next incremental starts from, `cbt = "enable"` before
//! the snapshot, and what happens to the snapshot after a VM's backup.
//!
//! After a committed restore point the new snapshot is kept (journal
//! [`KeepRole::Base`], tag `xenvault:base=<job>`), then every other snapshot
//! the journal keeps for the same pool, job and VM (the superseded base, a
//! resume source) is released and destroyed by UUID and token tag, and with
//! `base = "metadata"` the new base is reduced to CBT metadata
//! (`VDI.data_destroy`). The order makes a crash harmless: see
//! [`crate::journal`] ("Kept snapshots").
//!
//! The parent of the next backup is the restore point named by the newest
//! kept base whose manifest is still in the repository, so the CBT bitmap
//! or VHD difference always starts from the data that restore point holds.

use xenvault_repo::Manifest;
use xenvault_types::Value;
use xenvault_types::config::{BaseKeeping, CbtMode, DiskSelection};
use xenvault_xapi::records::{OnBoot, VdiRef, VdiType};

use super::{RepoPipeline, destroy_by_token};
use crate::backup::{Step, StepError, VmTask, non_boot_vdis};
use crate::journal::{self, CleanupReport, KeepRole, KeptSnapshot};

/// What [`prepare_vm`] found before the snapshot.
#[derive(Debug, Clone, Default)]
pub struct VmPrep {
    /// The parent restore point candidate: the one the newest kept base
    /// was written with, else the VM's newest restore point.
    pub parent: Option<Manifest>,
    /// Lines for the VM's report (CBT enabled on disks, bases skipped…).
    pub notes: Vec<String>,
}

/// The journal's kept bases of this job's VM on this pool, newest first.
pub fn kept_bases(p: &RepoPipeline, vm_uuid: &str) -> Vec<KeptSnapshot> {
    match p.run.journal.kept_for(&p.run.pool, &p.run.job, vm_uuid) {
        Ok(mut all) => {
            all.retain(|k| k.role == KeepRole::Base);
            all.reverse();
            all
        }
        Err(e) => {
            tracing::warn!("cannot read the journal for kept bases: {e}");
            Vec::new()
        }
    }
}

/// The kept base written with restore point `parent_id` of `vm_uuid`.
pub fn base_for(p: &RepoPipeline, vm_uuid: &str, parent_id: &str) -> Option<KeptSnapshot> {
    kept_bases(p, vm_uuid)
        .into_iter()
        .find(|k| k.restore_point.as_deref() == Some(parent_id))
}

/// Before the snapshot: turns CBT on where the job asks (`cbt = "enable"`),
/// and picks the parent restore point (see the module docs).
pub async fn prepare_vm(p: &RepoPipeline, task: &VmTask) -> Result<VmPrep, StepError> {
    let mut prep = VmPrep::default();
    if p.settings.cbt == CbtMode::Enable {
        prep.notes.extend(enable_cbt(p, task).await);
    }
    for base in kept_bases(p, &task.vm_uuid) {
        let Some(rp) = &base.restore_point else {
            continue;
        };
        match p.repo.load_manifest(&task.vm_uuid, rp).await {
            Ok(m) => {
                prep.parent = Some(m);
                return Ok(prep);
            }
            Err(e) => {
                tracing::info!(
                    "{}: the kept base {} names restore point {rp}, which cannot be read ({e}); not used",
                    task.name,
                    base.token.snapshot.as_deref().unwrap_or("?")
                );
            }
        }
    }
    prep.parent = p
        .repo
        .latest_restore_point(&task.vm_uuid)
        .await
        .map_err(|e| StepError {
            step: Step::Repository,
            detail: e.to_string(),
        })?;
    Ok(prep)
}

/// `VDI.enable_cbt` on the VM's selected disks that lack it (user or
/// system disks with `on_boot = persist`, not snapshots: what xapi
/// allows, xapi-facts §2.3). Returns one report line per disk changed or
/// refused; a refusal never fails the backup (the disk is then read
/// without CBT and the report says why).
pub async fn enable_cbt(p: &RepoPipeline, task: &VmTask) -> Vec<String> {
    let session = &p.session;
    let mut notes = Vec::new();
    let vm = match session
        .call_value("VM.get_record", vec![Value::str(task.vm_ref.as_str())])
        .await
    {
        Ok(v) => v,
        Err(e) => return vec![format!("cbt = \"enable\": cannot read the VM: {e}")],
    };
    let skip: Vec<VdiRef> = if task.disks == DiskSelection::Boot {
        non_boot_vdis(session, &vm).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let vm_rec = match session.vm().get_record(&task.vm_ref).await {
        Ok(r) => r,
        Err(e) => return vec![format!("cbt = \"enable\": cannot read the VM: {e}")],
    };
    for vbd_ref in &vm_rec.vbds {
        let Ok(vbd) = session.vbd().get_record(vbd_ref).await else {
            continue;
        };
        if vbd.vdi.is_null() || vbd.empty || skip.contains(&vbd.vdi) {
            continue;
        }
        let Ok(vdi) = session.vdi().get_record(&vbd.vdi).await else {
            continue;
        };
        if vdi.cbt_enabled
            || vdi.is_a_snapshot
            || !matches!(vdi.type_, VdiType::User | VdiType::System)
            || vdi.on_boot != OnBoot::Persist
        {
            continue;
        }
        match session.vdi().enable_cbt(&vbd.vdi).await {
            Ok(()) => notes.push(format!(
                "CBT enabled on disk {} ({} {:?}); incrementals use it from the next run",
                vbd.userdevice, vdi.uuid, vdi.name_label
            )),
            Err(e) => notes.push(format!(
                "cbt = \"enable\": VDI.enable_cbt refused on disk {} ({}): {e}",
                vbd.userdevice, vdi.uuid
            )),
        }
    }
    notes
}

/// After a VM's backup: keeps the snapshot of a committed restore point as
/// the next base (releasing the superseded ones), or destroys it.
pub async fn release_snapshot(
    p: &RepoPipeline,
    token: &str,
    committed: Option<&Manifest>,
) -> CleanupReport {
    let Some(manifest) = committed else {
        // A snapshot a resume checkpoint reads from stays (journal: kept).
        if p.run.journal.is_kept(token).unwrap_or(false) {
            return CleanupReport {
                left_alone: vec![format!(
                    "snapshot kept on the pool: the next run resumes this backup from its checkpoint (token {token})"
                )],
                ..CleanupReport::default()
            };
        }
        return destroy_by_token(p, token).await;
    };
    let target = p.repo.config().id.to_string();
    let kept = match journal::keep_snapshot(
        &p.session,
        &p.run,
        token,
        KeepRole::Base,
        &target,
        Some(&manifest.id),
    )
    .await
    {
        Ok(k) => k,
        Err(e) => {
            // Not kept: destroy it; the next backup of this VM is full.
            let mut report = destroy_by_token(p, token).await;
            report.errors.push(format!(
                "the snapshot could not be kept as the next incremental's base ({e}); the next backup of this VM reads it in full"
            ));
            return report;
        }
    };
    let mut report = CleanupReport::default();
    // A resume state of this VM is spent (it named this run's snapshot or
    // an older one, released below).
    super::resume::remove_state(&super::resume::state_dir(
        p.run.journal.dir(),
        &p.run.pool,
        &p.run.job,
        &manifest.vm_uuid,
    ));
    // The new base is kept: release every other snapshot kept for this
    // job's VM (the superseded base, resume sources).
    let others: Vec<KeptSnapshot> = p
        .run
        .journal
        .kept_for(&p.run.pool, &p.run.job, &manifest.vm_uuid)
        .unwrap_or_default()
        .into_iter()
        .filter(|k| k.token.token != token)
        .collect();
    for old in &others {
        let r = journal::release_kept(&p.session, &p.run.journal, old).await;
        merge(&mut report, r);
    }
    if p.settings.base == BaseKeeping::Metadata {
        if p.settings.cbt == CbtMode::Off {
            report.left_alone.push(format!(
                "base snapshot {} kept with its data: base = \"metadata\" needs CBT, and the job says cbt = \"off\"",
                kept.token.snapshot.as_deref().unwrap_or("?")
            ));
        } else if let Err(e) = journal::reduce_to_metadata(&p.session, &p.run.journal, &kept).await
        {
            report.left_alone.push(format!(
                "base snapshot {} kept with its data (base = \"metadata\" failed: {e})",
                kept.token.snapshot.as_deref().unwrap_or("?")
            ));
        }
    }
    report
}

fn merge(into: &mut CleanupReport, other: CleanupReport) {
    into.destroyed_vms.extend(other.destroyed_vms);
    into.destroyed_vdis.extend(other.destroyed_vdis);
    into.left_alone.extend(other.left_alone);
    into.errors.extend(other.errors);
    into.skipped_live += other.skipped_live;
    into.closed += other.closed;
}
