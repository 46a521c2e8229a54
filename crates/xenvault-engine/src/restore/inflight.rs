//! Restores still being built: what a restore creates on a pool carries
//! `xenvault:restoring=<host>/<run id>` in its `other_config` until it is
//! whole, so that the objects of a restore that died (`kill -9`, a power
//! cut) are found and removed by the next restore or backup run on that
//! host, instead of a VM with half-written disks looking restored.
//!
//! The tag is on the object from its creation: a new VDI gets it in
//! `VDI.create`, an imported VM in the `ova.xml` it is imported from. It is
//! removed once the data is in (before the VM is started). While the
//! restore runs it holds its run lock in the state directory
//! ([`Journal::begin_run`]); [`sweep`] removes only objects tagged by this
//! host whose run no longer holds its lock, and leaves the tags of other
//! hosts alone (their restores may still be running).

use std::sync::Arc;

use xenvault_xapi::records::{VdiRef, VmRef};

use super::connect::PoolConnection;
use crate::journal::{Journal, JournalError, RunLock};

/// `other_config` key on an object a restore is still building (value:
/// `<host>/<run id>`).
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
        let run_id = crate::job::new_run_id();
        let lock = journal.begin_run(&run_id)?;
        Ok(Arc::new(RestoreMark {
            value: format!("{}/{run_id}", xenvault_repo::lock::host_name()),
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
    /// Objects tagged by other hosts, left alone (uuid: tag).
    pub other_hosts: Vec<String>,
    /// What could not be removed (retried by the next sweep).
    pub errors: Vec<String>,
}

/// Whether a tag names a restore of this host that is not running.
fn is_dead_here(value: &str, host: &str, journal: &Journal) -> Option<bool> {
    let (tag_host, run_id) = value.split_once('/')?;
    (tag_host == host).then(|| !journal.is_run_alive(run_id))
}

/// Removes what restores of this host that died left on the pool: VMs (with
/// their disks) and VDIs tagged [`TAG_RESTORING`] by a run whose lock in
/// `journal`'s directory is free.
pub async fn sweep(pool: &PoolConnection, journal: &Journal) -> InflightSweep {
    let host = xenvault_repo::lock::host_name();
    let mut out = InflightSweep::default();
    let session = &pool.session;
    match session.vm().get_all_records().await {
        Ok(vms) => {
            for (vm_ref, vm) in vms {
                let Some(value) = vm.other_config.get(TAG_RESTORING) else {
                    continue;
                };
                match is_dead_here(value, &host, journal) {
                    Some(true) => {
                        tracing::warn!(vm = %vm.uuid, "removing a VM left by a restore that died ({value})");
                        match pool.destroy_vm_and_disks(&vm_ref).await {
                            Ok(()) => out.removed_vms.push(vm.uuid),
                            Err(e) => out.errors.push(e),
                        }
                    }
                    Some(false) => {}
                    None => out.other_hosts.push(format!("VM {}: {value}", vm.uuid)),
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
                match is_dead_here(value, &host, journal) {
                    Some(true) => {
                        tracing::warn!(vdi = %vdi.uuid, "removing a VDI left by a restore that died ({value})");
                        match pool.destroy_vdi(&vdi_ref).await {
                            Ok(()) => out.removed_vdis.push(vdi.uuid),
                            Err(e) => out.errors.push(e),
                        }
                    }
                    Some(false) => {}
                    None => out.other_hosts.push(format!("VDI {}: {value}", vdi.uuid)),
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
