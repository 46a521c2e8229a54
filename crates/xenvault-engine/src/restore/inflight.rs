//! Restores still being built: what a restore creates on a pool carries
//! `xenvault:restoring=<host>/<state id>/<run id>` in its `other_config`
//! until it is whole, so that the objects of a restore that died (`kill -9`,
//! a power cut) are found and removed by the next restore or backup run
//! that uses the same state directory, instead of a VM with half-written
//! disks looking restored.
//!
//! The tag is on the object from its creation: a new VDI gets it in
//! `VDI.create`, an imported VM in the `ova.xml` it is imported from. It is
//! removed once the data is in (before the VM is started). While the
//! restore runs it holds its run lock in its state directory
//! ([`Journal::begin_run`]), whose id ([`Journal::instance_id`]) the tag
//! names. [`sweep`] removes only objects whose tag names this host and this
//! state directory and whose run no longer holds its lock; it leaves alone
//! the tags of other state directories and hosts (their restores may still
//! be running), snapshots (restores make none; a backup's snapshot of a VM
//! being restored copies the tag) and VMs that are not halted.

use std::sync::Arc;

use xenvault_xapi::records::{PowerState, VdiRef, VmRef};

use xenvault_xapi::session::Session;

use super::connect::{PoolConnection, destroy_vdi, destroy_vm_and_disks};
use crate::journal::{Journal, JournalError, RunLock};

/// `other_config` key on an object a restore is still building (value:
/// `<host>/<state id>/<run id>`).
pub const TAG_RESTORING: &str = "xenvault:restoring";

/// A running restore's mark: the tag value, and its run lock (held while
/// this lives, in every clone of the pool connection).
#[derive(Debug)]
pub struct RestoreMark {
    value: String,
    _lock: RunLock,
}

impl RestoreMark {
    /// Starts a restore run: takes its run lock in `journal`'s directory.
    pub fn begin(journal: &Journal) -> Result<Arc<RestoreMark>, JournalError> {
        let instance = journal.instance_id()?;
        let run_id = crate::job::new_run_id();
        let lock = journal.begin_run(&run_id)?;
        Ok(Arc::new(RestoreMark {
            value: format!("{}/{instance}/{run_id}", xenvault_repo::lock::host_name()),
            _lock: lock,
        }))
    }

    /// The tag's value.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// What [`sweep`] did.
#[derive(Debug, Default)]
pub struct InflightSweep {
    /// VMs of dead restores removed (uuid), with their disks.
    pub removed_vms: Vec<String>,
    /// VDIs of dead restores removed (uuid).
    pub removed_vdis: Vec<String>,
    /// Tagged objects of other hosts or state directories, left alone.
    pub left_alone: Vec<String>,
    /// What could not be removed (retried by the next sweep), and leftovers
    /// left alone because their VM runs.
    pub errors: Vec<String>,
}

/// Whether a tag names a restore of this host and state directory
/// (`Some`), and then whether it is not running any more (`Some(true)`).
fn is_dead_here(value: &str, host: &str, instance: &str, journal: &Journal) -> Option<bool> {
    let mut parts = value.splitn(3, '/');
    let (tag_host, tag_instance, run_id) = (parts.next()?, parts.next()?, parts.next()?);
    (tag_host == host && tag_instance == instance).then(|| !journal.is_run_alive(run_id))
}

/// Removes what restores of this host that died left on the pool: VMs (with
/// their disks) and VDIs tagged [`TAG_RESTORING`] by a run whose lock in
/// `journal`'s directory is free.
pub async fn sweep(session: &Session, journal: &Journal) -> InflightSweep {
    let host = xenvault_repo::lock::host_name();
    let mut out = InflightSweep::default();
    let instance = match journal.instance_id() {
        Ok(id) => id,
        Err(e) => {
            out.errors.push(e.to_string());
            return out;
        }
    };
    match session.vm().get_all_records().await {
        Ok(vms) => {
            for (vm_ref, vm) in vms {
                let Some(value) = vm.other_config.get(TAG_RESTORING) else {
                    continue;
                };
                if vm.is_a_snapshot {
                    continue;
                }
                match is_dead_here(value, &host, &instance, journal) {
                    Some(true) if vm.power_state != PowerState::Halted => {
                        out.errors.push(format!(
                            "VM {} ({}): left by a restore that died, but it is {:?}: stop it and remove it by hand if it is not wanted",
                            vm.uuid, vm.name_label, vm.power_state
                        ));
                    }
                    Some(true) => {
                        tracing::warn!(vm = %vm.uuid, "removing a VM left by a restore that died ({value})");
                        match destroy_vm_and_disks(session, &vm_ref).await {
                            Ok(()) => out.removed_vms.push(vm.uuid),
                            Err(e) => out.errors.push(e),
                        }
                    }
                    Some(false) => {}
                    None => out.left_alone.push(format!(
                        "VM {}: being restored by another host or state directory ({value})",
                        vm.uuid
                    )),
                }
            }
        }
        Err(e) => out.errors.push(format!("cannot list VMs: {e}")),
    }
    match session.vdi().get_all_records().await {
        Ok(vdis) => {
            for (vdi_ref, vdi) in vdis {
                let Some(value) = vdi.other_config.get(TAG_RESTORING) else {
                    continue;
                };
                if vdi.is_a_snapshot {
                    continue;
                }
                match is_dead_here(value, &host, &instance, journal) {
                    Some(true) => {
                        tracing::warn!(vdi = %vdi.uuid, "removing a VDI left by a restore that died ({value})");
                        match destroy_vdi(session, &vdi_ref).await {
                            Ok(()) => out.removed_vdis.push(vdi.uuid),
                            Err(e) => out.errors.push(e),
                        }
                    }
                    Some(false) => {}
                    None => out.left_alone.push(format!(
                        "VDI {}: being restored by another host or state directory ({value})",
                        vdi.uuid
                    )),
                }
            }
        }
        Err(e) => out.errors.push(format!("cannot list VDIs: {e}")),
    }
    out
}

impl PoolConnection {
    /// The tag value restores through this connection put on what they
    /// create, when they have a run lock.
    pub fn restoring_tag(&self) -> Option<&str> {
        self.restoring.as_deref().map(RestoreMark::value)
    }

    /// The restored VM is whole: its tag goes.
    pub(crate) async fn finish_vm(&self, vm: &VmRef) -> Result<(), super::RestoreError> {
        if self.restoring.is_none() {
            return Ok(());
        }
        self.session
            .vm()
            .remove_from_other_config(vm, TAG_RESTORING)
            .await
            .map_err(|e| super::RestoreError::xapi("cannot mark the restored VM complete", e))
    }

    /// The restored VDI is whole: its tag goes.
    pub(crate) async fn finish_vdi(&self, vdi: &VdiRef) -> Result<(), super::RestoreError> {
        if self.restoring.is_none() {
            return Ok(());
        }
        self.session
            .vdi()
            .remove_from_other_config(vdi, TAG_RESTORING)
            .await
            .map_err(|e| super::RestoreError::xapi("cannot mark the restored VDI complete", e))
    }
}
