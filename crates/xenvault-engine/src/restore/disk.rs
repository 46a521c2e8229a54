//! One disk into a new VDI: `VDI.create` on the chosen SR with the saved
//! virtual size and name, then `PUT /import_raw_vdi?vdi=…&format=vhd|raw`
//! inside a task. From an XVA the disk's chunks are extracted (and their
//! checksums verified) and sent raw. A failed restore destroys the new VDI.

use std::str::FromStr;
use std::time::Instant;

use serde::Serialize;
use xenvault_formats::xva::OvaXml;
use xenvault_types::Value;
use xenvault_xapi::http::handler_url;
use xenvault_xapi::records::{VdiCreate, VdiRef, VdiType};

use super::connect::{PoolConnection, settle_transfer};
use super::content::{disk_virtual_size, file_stream, read_ova_xml, xva_disk_stream};
use super::point::{ArchivePoint, DataFile, DataKind};
use super::verify::{VerifiedPoint, verify_point};
use super::{Cancel, ProgressFn, RESTORED_FROM_KEY, RestoreError, RestorePhase, RestoreProgress};
use crate::sink::DiskMeta;

/// Which disk of a restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSelector {
    /// By position in the VM (`userdevice`: `0`, `1`, …).
    Position(String),
    /// By the original VDI's uuid.
    VdiUuid(String),
    /// By data file name (per-disk archives).
    File(String),
}

impl FromStr for DiskSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("a disk is a position (0, 1, …), a VDI uuid or a file name".into());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(DiskSelector::Position(s.to_string()))
        } else if uuid::Uuid::parse_str(s).is_ok() {
            Ok(DiskSelector::VdiUuid(s.to_ascii_lowercase()))
        } else {
            Ok(DiskSelector::File(s.to_string()))
        }
    }
}

impl std::fmt::Display for DiskSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSelector::Position(p) => write!(f, "position {p}"),
            DiskSelector::VdiUuid(u) => write!(f, "VDI {u}"),
            DiskSelector::File(n) => write!(f, "file {n}"),
        }
    }
}

/// How to restore a disk.
#[derive(Debug, Clone)]
pub struct DiskRestoreOptions {
    /// Which disk.
    pub disk: DiskSelector,
    /// SR uuid or ref; `None` = the pool's default SR.
    pub sr: Option<String>,
    /// The new VDI's name (default `"<disk name> (restored <timestamp>)"`).
    pub name: Option<String>,
    /// Check the restore point's SHA-256 sums first (default true).
    pub verify: bool,
    /// Stops the restore when set (see [`Cancel`]).
    pub cancel: Cancel,
}

impl DiskRestoreOptions {
    /// The disk `disk`, default SR and name, checksums checked.
    pub fn new(disk: DiskSelector) -> DiskRestoreOptions {
        DiskRestoreOptions {
            disk,
            sr: None,
            name: None,
            verify: true,
            cancel: Cancel::default(),
        }
    }
}

/// Where a disk's data is in the restore point.
#[derive(Debug, Clone)]
pub enum DiskData {
    /// Inside the XVA, under this `ova.xml` id.
    Xva {
        /// The XVA file.
        file: DataFile,
        /// The disk's id in `ova.xml` (`Ref:…`).
        id: String,
    },
    /// Its own file.
    File(DataFile),
}

/// One disk of a restore point.
#[derive(Debug, Clone)]
pub struct DiskEntry {
    /// Position in the VM, if known.
    pub userdevice: Option<String>,
    /// The backed-up VDI's uuid (the snapshot's disk), if known.
    pub vdi_uuid: Option<String>,
    /// The live VDI it was a snapshot of, if known.
    pub source_vdi_uuid: Option<String>,
    /// The original VDI's name (or the file's stem).
    pub name: String,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Where the data is.
    pub data: DiskData,
}

impl DiskEntry {
    fn matches(&self, selector: &DiskSelector) -> bool {
        match selector {
            DiskSelector::Position(p) => self.userdevice.as_deref() == Some(p.as_str()),
            DiskSelector::VdiUuid(u) => {
                self.vdi_uuid.as_deref() == Some(u.as_str())
                    || self.source_vdi_uuid.as_deref() == Some(u.as_str())
            }
            DiskSelector::File(n) => match &self.data {
                DiskData::File(f) => f.name == *n || f.stem() == n,
                DiskData::Xva { .. } => false,
            },
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} ({}{}, {} MiB)",
            self.userdevice.as_deref().unwrap_or("?"),
            self.name,
            self.source_vdi_uuid
                .as_deref()
                .or(self.vdi_uuid.as_deref())
                .map(|u| format!(", VDI {u}"))
                .unwrap_or_default(),
            self.virtual_size >> 20
        )
    }
}

/// What a disk restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredDisk {
    /// The restore point (`<vm>/<timestamp>`).
    pub source: String,
    /// The restore point's directory.
    pub source_dir: String,
    /// The new VDI's ref.
    pub vdi_ref: String,
    /// Its uuid.
    pub vdi_uuid: String,
    /// Its name.
    pub name: String,
    /// The SR it is on.
    pub sr_uuid: String,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Original position in the VM.
    pub userdevice: Option<String>,
    /// The backed-up VDI's uuid (the snapshot's disk).
    pub backed_up_vdi_uuid: Option<String>,
    /// The live VDI it was taken of.
    pub original_vdi_uuid: Option<String>,
    /// The upload format (`raw` or `vhd`).
    pub format: String,
    /// Bytes sent.
    pub bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// The archive's checksums were checked first.
    pub verified: bool,
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(|v| v.as_str().ok()).unwrap_or_default()
}

/// The disks of an XVA's `ova.xml`, with positions from its VBDs.
fn disks_of_ova(
    ova: &OvaXml,
    file: &DataFile,
    metas: &[DiskMeta],
) -> Result<Vec<DiskEntry>, RestoreError> {
    let disks = ova.disks().map_err(|e| RestoreError::Decode {
        file: file.path.clone(),
        problem: e.to_string(),
    })?;
    Ok(disks
        .into_iter()
        .map(|d| {
            let userdevice = ova
                .objects_of_class("VBD")
                .find(|vbd| s(&vbd.snapshot, "VDI") == d.id)
                .map(|vbd| s(&vbd.snapshot, "userdevice").to_string());
            let name = ova
                .object(&d.id)
                .map(|o| s(&o.snapshot, "name_label").to_string())
                .unwrap_or_default();
            let meta = metas
                .iter()
                .find(|m| m.xva_id.as_deref() == Some(d.id.as_str()) || m.vdi_uuid == d.vdi_uuid);
            DiskEntry {
                userdevice: userdevice.or_else(|| meta.map(|m| m.userdevice.clone())),
                source_vdi_uuid: meta
                    .map(|m| m.source_vdi_uuid.to_ascii_lowercase())
                    .filter(|u| !u.is_empty()),
                vdi_uuid: Some(d.vdi_uuid.to_ascii_lowercase()),
                name,
                virtual_size: d.virtual_size,
                data: DiskData::Xva {
                    file: file.clone(),
                    id: d.id,
                },
            }
        })
        .collect())
}

/// Records of one class in `vm.json`, whatever its shape (a list of records,
/// a map ref → record, or `{ref, record}` pairs): (ref if known, record).
fn json_records<'a>(
    meta: &'a serde_json::Value,
    keys: &[&str],
) -> Vec<(
    Option<String>,
    &'a serde_json::Map<String, serde_json::Value>,
)> {
    let mut out = Vec::new();
    for key in keys {
        let Some(v) = meta.get(*key) else { continue };
        match v {
            serde_json::Value::Array(items) => {
                for item in items {
                    let r = item.get("ref").and_then(|r| r.as_str()).map(str::to_owned);
                    if let Some(rec) = item.get("record").unwrap_or(item).as_object() {
                        out.push((r, rec));
                    }
                }
            }
            serde_json::Value::Object(map) => {
                for (r, item) in map {
                    if let Some(rec) = item.as_object() {
                        out.push((Some(r.clone()), rec));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn jstr<'a>(rec: &'a serde_json::Map<String, serde_json::Value>, key: &str) -> Option<&'a str> {
    rec.get(key).and_then(|v| v.as_str())
}

fn jint(rec: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<u64> {
    match rec.get(key)? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The disks of a per-disk restore point: files matched to `vm.json`'s VDI
/// records by the VDI uuid in the file name.
fn disks_of_files(
    point: &ArchivePoint,
    verified: &VerifiedPoint,
) -> Result<Vec<DiskEntry>, RestoreError> {
    let (vdis, vbds) = match &point.metadata {
        Some(meta) => (
            json_records(meta, &["vdis", "VDIs", "vdi"]),
            json_records(meta, &["vbds", "VBDs", "vbd"]),
        ),
        None => (Vec::new(), Vec::new()),
    };
    let mut out = Vec::new();
    for file in point.disk_files() {
        let stem = file.stem().to_ascii_lowercase();
        // The archive's own names: `disk-<userdevice>` or `disk-i<index>`.
        let slot = stem.strip_prefix("disk-");
        let meta = slot.and_then(|slot| {
            point.disks.iter().find(|m| {
                m.userdevice.eq_ignore_ascii_case(slot) || format!("i{}", m.index) == slot
            })
        });
        if let Some(m) = meta {
            out.push(DiskEntry {
                userdevice: Some(m.userdevice.clone()),
                vdi_uuid: Some(m.vdi_uuid.to_ascii_lowercase()),
                source_vdi_uuid: Some(m.source_vdi_uuid.to_ascii_lowercase())
                    .filter(|u| !u.is_empty()),
                name: m.name.clone(),
                virtual_size: m.virtual_size,
                data: DiskData::File(file.clone()),
            });
            continue;
        }
        let vdi = vdis.iter().find(|(_, rec)| {
            jstr(rec, "uuid")
                .is_some_and(|u| !u.is_empty() && stem.contains(&u.to_ascii_lowercase()))
        });
        let vdi_uuid = vdi
            .and_then(|(_, rec)| jstr(rec, "uuid"))
            .map(str::to_ascii_lowercase);
        let userdevice = vdi
            .and_then(|(vdi_ref, rec)| {
                vbds.iter().find(|(_, vbd)| {
                    let target = jstr(vbd, "VDI");
                    target.is_some()
                        && (target == vdi_ref.as_deref() || target == jstr(rec, "uuid"))
                })
            })
            .and_then(|(_, vbd)| jstr(vbd, "userdevice"))
            .map(str::to_owned)
            // `<userdevice>-…` file names.
            .or_else(|| {
                let digits: String = stem.chars().take_while(char::is_ascii_digit).collect();
                (!digits.is_empty() && stem[digits.len()..].starts_with(['-', '_']))
                    .then_some(digits)
            });
        let name = vdi
            .and_then(|(_, rec)| jstr(rec, "name_label"))
            .map(str::to_owned)
            .unwrap_or_else(|| file.stem().to_string());
        let size = match vdi.and_then(|(_, rec)| jint(rec, "virtual_size")) {
            Some(n) => n,
            None => disk_virtual_size(file, verified.content_len_of(file))?,
        };
        out.push(DiskEntry {
            userdevice,
            vdi_uuid,
            source_vdi_uuid: None,
            name,
            virtual_size: size,
            data: DiskData::File(file.clone()),
        });
    }
    out.sort_by(|a, b| a.userdevice.cmp(&b.userdevice));
    Ok(out)
}

/// The disks of a restore point (blocking: reads `ova.xml` or VHD footers).
pub fn disks_of(
    point: &ArchivePoint,
    verified: &VerifiedPoint,
) -> Result<Vec<DiskEntry>, RestoreError> {
    match point.xva() {
        Some(xva) => disks_of_ova(&read_ova_xml(xva)?, xva, &point.disks),
        None => disks_of_files(point, verified),
    }
}

/// Restores one disk of `point` into a new VDI.
pub async fn restore_disk(
    pool: &PoolConnection,
    point: &ArchivePoint,
    options: &DiskRestoreOptions,
    progress: ProgressFn,
) -> Result<RestoredDisk, RestoreError> {
    let started_at = Instant::now();
    if !point.complete {
        return Err(RestoreError::Unusable {
            dir: point.dir.clone(),
            reason: "the backup did not finish (no success marker): it cannot be restored".into(),
        });
    }
    // 1. The archive first: checksums, then the disk list.
    let (verified, disks) = {
        let owned = point.clone();
        let progress = progress.clone();
        let check = options.verify;
        tokio::task::spawn_blocking(move || {
            let verified = verify_point(&owned, check, &progress)?;
            let disks = disks_of(&owned, &verified)?;
            Ok::<_, RestoreError>((verified, disks))
        })
        .await
        .map_err(|e| RestoreError::Unusable {
            dir: point.dir.clone(),
            reason: format!("the check stopped: {e}"),
        })??
    };
    let entry = disks
        .iter()
        .find(|d| d.matches(&options.disk))
        .cloned()
        .ok_or_else(|| {
            RestoreError::NotFound(format!(
                "restore point {} has no disk at {}; its disks: {}",
                point.label(),
                options.disk,
                disks
                    .iter()
                    .map(DiskEntry::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })?;

    // 2. The new VDI.
    let (sr_ref, sr) = pool.choose_sr(options.sr.as_deref()).await?;
    let name = options.name.clone().unwrap_or_else(|| {
        let base = if entry.name.is_empty() {
            format!(
                "{} disk {}",
                point.vm_name,
                entry.userdevice.as_deref().unwrap_or("?")
            )
        } else {
            entry.name.clone()
        };
        super::vm::default_name(&base, &point.timestamp)
    });
    let session = &pool.session;
    let vdi_ref = create_vdi(
        pool,
        &sr_ref,
        &sr.uuid,
        &name,
        &point.label(),
        entry.virtual_size,
    )
    .await?;
    // Dropped before the end (the caller gave up, e.g. Ctrl-C): the VDI is
    // removed in the background.
    let mut guard = VdiGuard {
        pool: pool.clone(),
        vdi: Some(vdi_ref.clone()),
    };

    // 3. The data; any failure removes the VDI.
    let content_len = match &entry.data {
        DiskData::File(f) => verified.content_len_of(f),
        DiskData::Xva { .. } => entry.virtual_size,
    };
    let uploaded = upload(
        pool,
        point,
        &entry,
        &vdi_ref,
        content_len,
        progress,
        options.cancel.clone(),
    )
    .await;
    let uploaded = match uploaded {
        Ok(v) => pool.finish_vdi(&vdi_ref).await.map(|()| v),
        Err(e) => Err(e),
    };
    let (format, bytes) = match uploaded {
        Ok(v) => v,
        Err(e) => {
            guard.vdi = None;
            return Err(match pool.destroy_vdi(&vdi_ref).await {
                Ok(()) => e,
                Err(leftovers) => RestoreError::CleanupFailed {
                    cause: Box::new(e),
                    leftovers,
                },
            });
        }
    };
    let vdi_uuid = match session.vdi().get_record(&vdi_ref).await {
        Ok(r) => r.uuid,
        Err(e) => {
            guard.vdi = None;
            let e = RestoreError::xapi("cannot read the restored VDI", e);
            return Err(match pool.destroy_vdi(&vdi_ref).await {
                Ok(()) => e,
                Err(leftovers) => RestoreError::CleanupFailed {
                    cause: Box::new(e),
                    leftovers,
                },
            });
        }
    };
    guard.vdi = None;
    Ok(RestoredDisk {
        source: point.label(),
        source_dir: point.dir.display().to_string(),
        vdi_ref: vdi_ref.as_str().to_string(),
        vdi_uuid,
        name,
        sr_uuid: sr.uuid,
        virtual_size: entry.virtual_size,
        userdevice: entry.userdevice,
        backed_up_vdi_uuid: entry.vdi_uuid,
        original_vdi_uuid: entry.source_vdi_uuid,
        format: format.to_string(),
        bytes,
        seconds: started_at.elapsed().as_secs_f64(),
        verified: verified.checked,
    })
}

/// Creates the VDI a disk is restored into: on SR `sr_ref`, named `name`,
/// tagged with the restore point `label`, of `size` bytes.
pub(crate) async fn create_vdi(
    pool: &PoolConnection,
    sr_ref: &xenvault_xapi::records::SrRef,
    sr_uuid: &str,
    name: &str,
    label: &str,
    size: u64,
) -> Result<VdiRef, RestoreError> {
    let mut other_config = xenvault_xapi::records::StringMap::new();
    other_config.insert(RESTORED_FROM_KEY.to_string(), label.to_string());
    if let Some(tag) = pool.restoring_tag() {
        other_config.insert(super::inflight::TAG_RESTORING.to_string(), tag.to_string());
    }
    let create = VdiCreate {
        name_label: name.to_string(),
        name_description: format!("Restored by xenvault from {label}"),
        sr: sr_ref.clone(),
        virtual_size: i64::try_from(size).map_err(|_| RestoreError::Decode {
            file: label.into(),
            problem: format!("disk size {size} is too large"),
        })?,
        type_: VdiType::User,
        sharable: false,
        read_only: false,
        other_config,
        xenstore_data: Default::default(),
        sm_config: Default::default(),
        tags: Vec::new(),
    };
    pool.session
        .vdi()
        .create(&create)
        .await
        .map_err(|e| RestoreError::xapi(format!("cannot create a VDI on SR {sr_uuid}"), e))
}

/// Destroys a VDI in the background when dropped armed.
pub(crate) struct VdiGuard {
    pub(crate) pool: PoolConnection,
    pub(crate) vdi: Option<VdiRef>,
}

impl Drop for VdiGuard {
    fn drop(&mut self) {
        if let Some(vdi) = self.vdi.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let pool = self.pool.clone();
            tracing::warn!(%vdi, "disk restore abandoned: removing the new VDI");
            runtime.spawn(async move {
                if let Err(e) = pool.destroy_vdi(&vdi).await {
                    tracing::warn!("cannot remove the abandoned VDI: {e}");
                }
            });
        }
    }
}

/// Sends the disk's data into `vdi`; returns the format and bytes sent.
async fn upload(
    pool: &PoolConnection,
    point: &ArchivePoint,
    entry: &DiskEntry,
    vdi: &VdiRef,
    content_len: u64,
    progress: ProgressFn,
    cancel: Cancel,
) -> Result<(&'static str, u64), RestoreError> {
    let session = &pool.session;
    let (format, len, body): (&'static str, u64, _) = match &entry.data {
        DiskData::Xva { file, id } => (
            "raw",
            entry.virtual_size,
            futures::future::Either::Left(xva_disk_stream(
                file.clone(),
                id.clone(),
                entry.virtual_size,
                progress.clone(),
                cancel.clone(),
            )),
        ),
        DiskData::File(file) => {
            let len = content_len;
            let format = if file.kind == DataKind::Vhd {
                "vhd"
            } else {
                "raw"
            };
            (
                format,
                len,
                futures::future::Either::Right(file_stream(
                    file.clone(),
                    len,
                    progress.clone(),
                    cancel.clone(),
                )),
            )
        }
    };
    let what = format!("upload of disk {} into VDI {vdi}", entry.describe());
    let task = session
        .create_task(&format!("xenvault restore disk {}", point.label()), "")
        .await
        .map_err(|e| RestoreError::xapi("cannot create the import task", e))?;
    let url = handler_url(
        &session.base_url(),
        "/import_raw_vdi",
        session.session_ref().expose(),
        Some(task.id()),
        &[("vdi", vdi.as_str()), ("format", format)],
    );
    let body = futures::StreamExt::boxed(body);
    let sent = pool.transfer.put(url, body, len).await;
    progress(RestoreProgress {
        phase: RestorePhase::Finishing,
        done: len,
        total: len,
    });
    settle_transfer(task, sent, &what, &cancel).await?;
    if cancel.is_cancelled() {
        // Cancelled too late for XAPI to stop: the caller removes the VDI.
        return Err(RestoreError::Cancelled);
    }
    Ok((format, len))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert_eq!(
            "1".parse::<DiskSelector>().unwrap(),
            DiskSelector::Position("1".into())
        );
        assert_eq!(
            "3F2504E0-4F89-11D3-9A0C-0305E82C3301"
                .parse::<DiskSelector>()
                .unwrap(),
            DiskSelector::VdiUuid("3f2504e0-4f89-11d3-9a0c-0305e82c3301".into())
        );
        assert_eq!(
            "0-disk.vhd".parse::<DiskSelector>().unwrap(),
            DiskSelector::File("0-disk.vhd".into())
        );
        assert!("".parse::<DiskSelector>().is_err());
    }

    #[test]
    fn json_record_shapes() {
        let list = serde_json::json!({"vdis": [{"ref": "OpaqueRef:1", "record": {"uuid": "u1"}}]});
        let map = serde_json::json!({"VDIs": {"OpaqueRef:2": {"uuid": "u2"}}});
        let r = json_records(&list, &["vdis", "VDIs"]);
        assert_eq!(r[0].0.as_deref(), Some("OpaqueRef:1"));
        assert_eq!(jstr(r[0].1, "uuid"), Some("u1"));
        let r = json_records(&map, &["vdis", "VDIs"]);
        assert_eq!(r[0].0.as_deref(), Some("OpaqueRef:2"));
    }
}
