//! Whole-VM restore: the restore point's XVA goes through `PUT /import`
//! (Content-Length, never chunked; inside a task whose result is the set of
//! VM refs created) to the chosen SR, as a new VM with a new name or with its
//! original identity, optionally started. XAPI matches networks by name (then
//! bridge) and creates missing ones, in any pool.

use std::time::Instant;

use serde::Serialize;
use xenvault_formats::xva::OvaXml;
use xenvault_types::Value;
use xenvault_xapi::http::handler_url;
use xenvault_xapi::records::{VbdType, VmRef};

use super::connect::{PoolConnection, settle_transfer};
use futures::StreamExt as _;

use super::content::{
    XvaRewrite, prepare_xva, put_map_key, rewritten_xva_stream, set_field, strip_map_keys,
};
use super::point::ArchivePoint;
use super::point::DataFile;
use super::rebuild::{RebuiltXva, measure, rebuild, xva_stream};
use super::verify::verify_point;
use super::{Cancel, ProgressFn, RESTORED_FROM_KEY, RestoreError, RestorePhase, RestoreProgress};

/// Which identity the restored VM gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmIdentity {
    /// A new VM (new uuid and MACs) named `name`, or
    /// `"<original name> (restored <timestamp>)"`.
    New {
        /// The new name.
        name: Option<String>,
    },
    /// The original uuid and MACs (`/import?restore=true`). Refused while the
    /// original VM exists, unless `force` (XAPI then replaces its record).
    Preserve {
        /// Replace an existing VM with that uuid.
        force: bool,
    },
}

/// How to restore a VM.
#[derive(Debug, Clone)]
pub struct VmRestoreOptions {
    /// SR uuid or ref; `None` = the pool's default SR.
    pub sr: Option<String>,
    /// New VM or original identity.
    pub identity: VmIdentity,
    /// Start the VM once restored.
    pub start: bool,
    /// Check the restore point's SHA-256 sums first (default true).
    pub verify: bool,
    /// Stops the restore when set (see [`Cancel`]).
    pub cancel: Cancel,
}

impl Default for VmRestoreOptions {
    fn default() -> Self {
        VmRestoreOptions {
            sr: None,
            identity: VmIdentity::New { name: None },
            start: false,
            verify: true,
            cancel: Cancel::default(),
        }
    }
}

/// One disk of a restored VM.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredVmDisk {
    /// Position (`0`, `1`, …).
    pub userdevice: String,
    /// The new VDI's uuid.
    pub vdi_uuid: String,
    /// Its name.
    pub name: String,
    /// Its size, bytes.
    pub virtual_size: u64,
}

/// What a VM restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredVm {
    /// The restore point (`<vm>/<timestamp>`).
    pub source: String,
    /// The restore point's directory.
    pub source_dir: String,
    /// The new VM's ref.
    pub vm_ref: String,
    /// Its uuid.
    pub uuid: String,
    /// Its name.
    pub name: String,
    /// The original VM's uuid (from the archive).
    pub original_uuid: String,
    /// The identity was kept.
    pub preserved_identity: bool,
    /// The SR its disks went to.
    pub sr_uuid: String,
    /// Its disks.
    pub disks: Vec<RestoredVmDisk>,
    /// Networks of the archive that the pool lacked (XAPI created them).
    pub networks_created: Vec<String>,
    /// Bytes sent to the pool.
    pub bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// The archive's checksums were checked first.
    pub verified: bool,
    /// The VM was started.
    pub started: bool,
    /// Why starting failed (the VM is kept, halted).
    pub start_error: Option<String>,
}

/// The VM of an `ova.xml`: (uuid, name).
pub(crate) fn ova_vm(ova: &OvaXml) -> Option<(String, String)> {
    ova.objects_of_class("VM")
        .find(|o| {
            o.snapshot
                .get("is_a_snapshot")
                .and_then(|v| v.as_bool().ok())
                != Some(true)
        })
        .or_else(|| ova.objects_of_class("VM").next())
        .map(|o| {
            let s = |k: &str| {
                o.snapshot
                    .get(k)
                    .and_then(|v| v.as_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            (s("uuid"), s("name_label"))
        })
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(|v| v.as_str().ok()).unwrap_or_default()
}

/// Where the uploaded XVA comes from.
enum Source {
    /// The archive's XVA (file, content length, `ova.xml` rewrite).
    Xva(DataFile, u64, XvaRewrite),
    /// Rebuilt from per-disk files.
    Rebuilt(RebuiltXva),
}

/// Restores the VM of `point` into the pool of `pool`: from its XVA, or
/// from its per-disk files and `vm.json` (rebuilt into an XVA on the way).
pub async fn restore_vm(
    pool: &PoolConnection,
    point: &ArchivePoint,
    options: &VmRestoreOptions,
    progress: ProgressFn,
) -> Result<RestoredVm, RestoreError> {
    let started_at = Instant::now();
    let xva = point.xva().cloned();
    if !point.complete {
        return Err(RestoreError::Unusable {
            dir: point.dir.clone(),
            reason: "the backup did not finish (no success marker): it cannot be restored".into(),
        });
    }

    // 1. The archive, before anything touches the pool.
    let verified = {
        let owned = point.clone();
        let progress = progress.clone();
        let check = options.verify;
        tokio::task::spawn_blocking(move || verify_point(&owned, check, &progress))
            .await
            .map_err(|e| RestoreError::Unusable {
                dir: point.dir.clone(),
                reason: format!("the check stopped: {e}"),
            })??
    };

    // 2. The pool side: SR, identity clash.
    let (sr_ref, sr) = pool.choose_sr(options.sr.as_deref()).await?;
    let preserve = matches!(options.identity, VmIdentity::Preserve { .. });
    // The archive holds a snapshot's export: its uuid and name are the
    // snapshot's. The original VM's come from the restore point.
    let original_name = point.vm_name.clone();
    let original_uuid = point.vm_uuid.clone();
    if let Some(uuid) = &original_uuid {
        check_identity(pool, &options.identity, uuid).await?;
    }
    let name = match &options.identity {
        VmIdentity::New { name: Some(n) } => n.clone(),
        VmIdentity::New { name: None } => {
            free_name(pool, default_name(&original_name, &point.timestamp)).await?
        }
        VmIdentity::Preserve { .. } => original_name.clone(),
    };

    // The XVA's ova.xml, rewritten on the way (docs/xapi-notes.md, "Restore
    // through /import and /import_raw_vdi"): the VM's name (and uuid when
    // the identity is kept), no template/snapshot flags, and no xenvault
    // tags (`xenvault:*` in other_config mark temporary objects for the
    // backup's clean-up: a restored VM must never look like one).
    // A per-disk restore point is rebuilt into an XVA from vm.json and the
    // disk files (see `rebuild`).
    let uuid = if preserve {
        original_uuid.clone()
    } else {
        None
    };
    let (source, ova, upload_len) = {
        let owned = point.clone();
        let (xva, name) = (xva.clone(), name.clone());
        let verified = verified.clone();
        let restoring = pool.restoring_tag().map(str::to_string);
        tokio::task::spawn_blocking(move || -> Result<_, RestoreError> {
            match xva {
                Some(xva) => {
                    let content_len = verified.content_len_of(&xva);
                    let rewrite = prepare_xva(&xva, |ova| {
                        edit_ova(ova, &name, uuid.as_deref(), restoring.as_deref())
                    })?;
                    let ova = rewrite.ova.clone();
                    let len = rewrite.new_len(content_len);
                    Ok((Source::Xva(xva, content_len, rewrite), ova, len))
                }
                None => {
                    let mut rebuilt = rebuild(&owned)?;
                    edit_ova(
                        &mut rebuilt.ova,
                        &name,
                        uuid.as_deref(),
                        restoring.as_deref(),
                    );
                    let len = measure(&rebuilt)?;
                    let ova = rebuilt.ova.clone();
                    Ok((Source::Rebuilt(rebuilt), ova, len))
                }
            }
        })
        .await
        .map_err(|e| RestoreError::Unusable {
            dir: point.dir.clone(),
            reason: format!("reading the archive stopped: {e}"),
        })??
    };
    let (archived_uuid, _) = ova_vm(&ova).ok_or_else(|| RestoreError::Unusable {
        dir: point.dir.clone(),
        reason: "its ova.xml holds no VM".into(),
    })?;
    let original_uuid = original_uuid.unwrap_or(archived_uuid);
    let networks_created = missing_networks(pool, &ova).await?;

    // 3.-5. The upload and what follows.
    let what = format!(
        "import of {} into SR {} ({})",
        match &source {
            Source::Xva(xva, ..) => xva.path.display().to_string(),
            Source::Rebuilt(_) => format!("the disks of {}", point.dir.display()),
        },
        sr.uuid,
        sr.name_label
    );
    let body = match source {
        Source::Xva(xva, content_len, rewrite) => rewritten_xva_stream(
            xva,
            content_len,
            &rewrite,
            progress.clone(),
            options.cancel.clone(),
        )
        .boxed(),
        Source::Rebuilt(rebuilt) => xva_stream(
            rebuilt,
            upload_len,
            progress.clone(),
            options.cancel.clone(),
        )
        .boxed(),
    };
    let mut restored = import_xva(
        pool,
        XvaImport {
            label: point.label(),
            what,
            sr_ref,
            sr,
            preserve,
            name,
            body,
            upload_len,
            start: options.start,
            cancel: options.cancel.clone(),
            completes: true,
        },
        progress,
    )
    .await?;
    restored.source_dir = point.dir.display().to_string();
    restored.original_uuid = original_uuid;
    restored.networks_created = networks_created;
    restored.verified = verified.checked;
    restored.seconds = started_at.elapsed().as_secs_f64();
    Ok(restored)
}

/// Refuses to restore with the identity of VM `uuid` while it exists,
/// unless forced.
pub(crate) async fn check_identity(
    pool: &PoolConnection,
    identity: &VmIdentity,
    uuid: &str,
) -> Result<(), RestoreError> {
    let session = &pool.session;
    if let VmIdentity::Preserve { force } = identity
        && let Ok(existing) = session.vm().get_by_uuid(uuid).await
    {
        let name = session
            .vm()
            .get_record(&existing)
            .await
            .map(|r| r.name_label)
            .unwrap_or_default();
        if !force {
            return Err(RestoreError::OriginalExists {
                uuid: uuid.to_string(),
                name,
            });
        }
        tracing::warn!(vm = %uuid, "--force: XAPI replaces the existing VM record");
    }
    Ok(())
}

/// An XVA to send to `PUT /import`, and what to do with the VM it makes.
pub(crate) struct XvaImport {
    /// The restore point (`<vm>/<time>`): task name and tag.
    pub label: String,
    /// What is imported, for errors.
    pub what: String,
    /// The SR.
    pub sr_ref: xenvault_xapi::records::SrRef,
    /// Its record.
    pub sr: xenvault_xapi::records::Sr,
    /// `restore=true` (original uuid and MACs).
    pub preserve: bool,
    /// The VM's name.
    pub name: String,
    /// The XVA, exactly `upload_len` bytes.
    pub body: futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
    /// The import completes the restore: the VM's `restoring` tag goes
    /// after it (false: its disks are filled afterwards, which removes it).
    pub completes: bool,
    /// Its length.
    pub upload_len: u64,
    /// Start the VM afterwards.
    pub start: bool,
    /// Stops the import.
    pub cancel: Cancel,
}

/// Sends an XVA to `PUT /import` inside a task, then names, tags and
/// optionally starts the VM; a failure removes what the import made.
/// `source_dir`, `original_uuid`, `networks_created`, `verified` and
/// `seconds` of the result are left for the caller.
pub(crate) async fn import_xva(
    pool: &PoolConnection,
    import: XvaImport,
    progress: ProgressFn,
) -> Result<RestoredVm, RestoreError> {
    let session = &pool.session;
    let XvaImport {
        label,
        what,
        sr_ref,
        sr,
        preserve,
        name,
        body,
        upload_len,
        start,
        cancel,
        completes,
    } = import;
    let task = session
        .create_task(&format!("xenvault restore {label}"), "")
        .await
        .map_err(|e| RestoreError::xapi("cannot create the import task", e))?;
    let task_id = task.id().to_string();
    let mut params = vec![("sr_id", sr_ref.as_str())];
    if preserve {
        params.push(("restore", "true"));
    }
    let url = handler_url(
        &session.base_url(),
        "/import",
        session.session_ref().expose(),
        Some(task.id()),
        &params,
    );
    let sent = pool.transfer.put(url, body, upload_len).await;
    progress(RestoreProgress {
        phase: RestorePhase::Finishing,
        done: upload_len,
        total: upload_len,
    });
    let record = match settle_transfer(task, sent, &what, &cancel).await {
        Ok(r) => r,
        Err(e) => {
            // XAPI removes what a failed import made; check it did.
            return Err(match pool.sweep_import_leftovers(&task_id).await {
                Ok(()) => e,
                Err(leftovers) => RestoreError::CleanupFailed {
                    cause: Box::new(e),
                    leftovers,
                },
            });
        }
    };
    let vms: Vec<VmRef> = xenvault_xapi::task::parse_task_result(&what, &record.result)
        .map_err(|e| RestoreError::xapi(&what, e))?;
    if cancel.is_cancelled() {
        // Cancelled too late for XAPI to stop: remove what it made.
        let mut leftovers = Vec::new();
        for vm in &vms {
            if let Err(problem) = pool.destroy_vm_and_disks(vm).await {
                leftovers.push(problem);
            }
        }
        return Err(if leftovers.is_empty() {
            RestoreError::Cancelled
        } else {
            RestoreError::CleanupFailed {
                cause: Box::new(RestoreError::Cancelled),
                leftovers: leftovers.join("; "),
            }
        });
    }

    // Name, tag, describe; anything failing here removes what was made.
    progress(RestoreProgress {
        phase: RestorePhase::Configuring,
        done: 0,
        total: 0,
    });
    let configured = match configure(pool, &label, &vms, &name).await {
        Ok((vm_ref, restored)) if completes => {
            pool.finish_vm(&vm_ref).await.map(|()| (vm_ref, restored))
        }
        other => other,
    };
    let (vm_ref, mut restored) = match configured {
        Ok(v) => v,
        Err(e) => {
            let mut leftovers = Vec::new();
            for vm in &vms {
                if let Err(problem) = pool.destroy_vm_and_disks(vm).await {
                    leftovers.push(problem);
                }
            }
            return Err(if leftovers.is_empty() {
                e
            } else {
                RestoreError::CleanupFailed {
                    cause: Box::new(e),
                    leftovers: leftovers.join("; "),
                }
            });
        }
    };
    restored.source = label;
    restored.preserved_identity = preserve;
    restored.sr_uuid = sr.uuid.clone();
    restored.bytes = upload_len;

    // Start: a failure keeps the restored VM (halted) and is reported.
    if start {
        match session.vm().start(&vm_ref, false, false).await {
            Ok(()) => restored.started = true,
            Err(e) => restored.start_error = Some(e.to_string()),
        }
    }
    Ok(restored)
}

/// Renames and tags the imported VM; returns it and its description.
async fn configure(
    pool: &PoolConnection,
    label: &str,
    vms: &[VmRef],
    name: &str,
) -> Result<(VmRef, RestoredVm), RestoreError> {
    let session = &pool.session;
    let mut main = None;
    for vm in vms {
        let rec = session
            .vm()
            .get_record(vm)
            .await
            .map_err(|e| RestoreError::xapi("cannot read the imported VM", e))?;
        if !rec.is_a_snapshot {
            main = Some((vm.clone(), rec));
            break;
        }
    }
    let (vm_ref, rec) = main.ok_or_else(|| RestoreError::Unusable {
        dir: label.into(),
        reason: format!("the import created no VM (task result: {} refs)", vms.len()),
    })?;
    let name = name.to_string();
    if name != rec.name_label {
        session
            .vm()
            .set_name_label(&vm_ref, &name)
            .await
            .map_err(|e| RestoreError::xapi("cannot rename the restored VM", e))?;
    }
    // Restored VMs come in as plain VMs even from a snapshot's export.
    if rec.is_a_template {
        session
            .vm()
            .set_is_a_template(&vm_ref, false)
            .await
            .map_err(|e| RestoreError::xapi("cannot clear the template flag", e))?;
    }
    session
        .vm()
        .put_other_config(&vm_ref, RESTORED_FROM_KEY, label)
        .await
        .map_err(|e| RestoreError::xapi("cannot tag the restored VM", e))?;
    let mut disks = Vec::new();
    for vbd_ref in &rec.vbds {
        let vbd = session
            .vbd()
            .get_record(vbd_ref)
            .await
            .map_err(|e| RestoreError::xapi("cannot read a VBD of the restored VM", e))?;
        if vbd.type_ != VbdType::Disk || vbd.empty || vbd.vdi.is_null() {
            continue;
        }
        let vdi = session
            .vdi()
            .get_record(&vbd.vdi)
            .await
            .map_err(|e| RestoreError::xapi("cannot read a disk of the restored VM", e))?;
        disks.push(RestoredVmDisk {
            userdevice: vbd.userdevice.clone(),
            vdi_uuid: vdi.uuid.clone(),
            name: vdi.name_label.clone(),
            virtual_size: u64::try_from(vdi.virtual_size).unwrap_or(0),
        });
    }
    disks.sort_by(|a, b| a.userdevice.cmp(&b.userdevice));
    Ok((
        vm_ref.clone(),
        RestoredVm {
            source: String::new(),
            source_dir: String::new(),
            vm_ref: vm_ref.as_str().to_string(),
            uuid: rec.uuid.clone(),
            name,
            original_uuid: String::new(),
            preserved_identity: false,
            sr_uuid: String::new(),
            disks,
            networks_created: Vec::new(),
            bytes: 0,
            seconds: 0.0,
            verified: false,
            started: false,
            start_error: None,
        },
    ))
}

/// The `ova.xml` edits of a restore: the VM's name (and uuid when given),
/// not a template or snapshot; no `xenvault:*` tags on any object but
/// `restoring` ([`super::inflight::TAG_RESTORING`]) on the VM when given.
pub(crate) fn edit_ova(ova: &mut OvaXml, name: &str, uuid: Option<&str>, restoring: Option<&str>) {
    let main_id = ova
        .objects_of_class("VM")
        .find(|o| {
            o.snapshot
                .get("is_a_snapshot")
                .and_then(|v| v.as_bool().ok())
                != Some(true)
        })
        .or_else(|| ova.objects_of_class("VM").next())
        .map(|o| o.id.clone());
    for object in &mut ova.objects {
        strip_map_keys(&mut object.snapshot, "other_config", TEMPORARY_TAG_PREFIX);
        if object.class == "VM" && Some(&object.id) == main_id.as_ref() {
            set_field(&mut object.snapshot, "name_label", Value::str(name));
            set_field(&mut object.snapshot, "is_a_template", Value::Bool(false));
            set_field(&mut object.snapshot, "is_a_snapshot", Value::Bool(false));
            if let Some(uuid) = uuid {
                set_field(&mut object.snapshot, "uuid", Value::str(uuid));
            }
            if let Some(tag) = restoring {
                put_map_key(
                    &mut object.snapshot,
                    "other_config",
                    super::inflight::TAG_RESTORING,
                    tag,
                );
            }
        }
    }
}

/// The prefix of the `other_config` keys that mark xenvault's temporary
/// objects (see `crate::journal`).
pub const TEMPORARY_TAG_PREFIX: &str = "xenvault:";

/// `"<name> (restored <timestamp>)"`.
pub fn default_name(original: &str, timestamp: &str) -> String {
    format!("{original} (restored {timestamp})")
}

/// `name`, or `"<name> (2)"`, `"<name> (3)"`, … when a VM of the pool has it
/// already: a second restore of the same restore point gets a name of its
/// own (backup jobs refuse to tell apart VMs of one name).
pub(crate) async fn free_name(pool: &PoolConnection, name: String) -> Result<String, RestoreError> {
    let taken: std::collections::BTreeSet<String> = pool
        .session
        .vm()
        .get_all_records()
        .await
        .map_err(|e| RestoreError::xapi("cannot list the pool's VMs", e))?
        .into_values()
        .filter(|v| !v.is_a_snapshot)
        .map(|v| v.name_label)
        .collect();
    Ok(next_free_name(&taken, name))
}

fn next_free_name(taken: &std::collections::BTreeSet<String>, name: String) -> String {
    if !taken.contains(&name) {
        return name;
    }
    (2u32..)
        .map(|n| format!("{name} ({n})"))
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or(name)
}

/// Networks of the archive that the pool lacks, matched as XAPI's import
/// does: by `name_label`, then by `bridge` (xen-api `import.ml`, `Net`).
pub(crate) async fn missing_networks(
    pool: &PoolConnection,
    ova: &OvaXml,
) -> Result<Vec<String>, RestoreError> {
    let existing = pool
        .session
        .network()
        .get_all_records()
        .await
        .map_err(|e| RestoreError::xapi("cannot list the pool's networks", e))?;
    let mut missing = Vec::new();
    for net in ova.objects_of_class("network") {
        let name = str_field(&net.snapshot, "name_label");
        let bridge = str_field(&net.snapshot, "bridge");
        let found = existing.values().any(|n| {
            (!name.is_empty() && n.name_label == name) || (!bridge.is_empty() && n.bridge == bridge)
        });
        if !found {
            missing.push(name.to_string());
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_names_get_a_number() {
        let taken: std::collections::BTreeSet<String> =
            ["web (restored t)", "web (restored t) (2)"]
                .into_iter()
                .map(String::from)
                .collect();
        assert_eq!(next_free_name(&taken, "db".into()), "db");
        assert_eq!(
            next_free_name(&taken, "web (restored t)".into()),
            "web (restored t) (3)"
        );
    }

    #[test]
    fn default_names() {
        assert_eq!(
            default_name("web", "20261122-010000"),
            "web (restored 20261122-010000)"
        );
    }
}
