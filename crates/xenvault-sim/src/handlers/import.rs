//! `PUT /import`: an XVA (plain, gzip or zstd) becomes a VM with its VBDs, VDIs and VIFs,
//! as xen-api's ocaml/xapi/import.ml does it (xapi-facts §3.2, §4).

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use xenvault_formats::xva::{OvaXml, XvaDecoder, XvaDecoderOptions, XvaError, XvaEvent};
use xenvault_types::{ExtentData, Value};

use super::stream::{BodyEnd, BodyLen, PipeReader, Progress, io_api_error, receive_stream};
use super::{begin_on_srs, fail_early, flag, host_xapi_version, resolve};
use crate::datamodel::{NULL_REF, Type};
use crate::db::Fields;
use crate::error::ApiError;
use crate::http::{Conn, HandlerOutcome, Request};
use crate::pool::Pool;

/// zstd frame magic (xen-api import.ml picks zstd on it, gzip otherwise).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Fields never copied from `ova.xml`: identity, runtime state and back-references,
/// which the database rebuilds.
const SKIPPED_FIELDS: &[&str] = &[
    "uuid",
    "allowed_operations",
    "current_operations",
    "resident_on",
    "scheduled_to_be_resident_on",
    "metrics",
    "guest_metrics",
    "consoles",
    "crash_dumps",
    "VBDs",
    "VIFs",
    "VDIs",
    "PBDs",
    "PIFs",
    "snapshots",
    "children",
    "blobs",
    "attached_PCIs",
    "VGPUs",
    "VUSBs",
    "VTPMs",
    "location",
    "sm_config",
    "is_control_domain",
    "domid",
];

/// What the import created, for the result and for cleaning up after a failure.
#[derive(Default)]
struct Created {
    vms: Vec<(String, bool)>,
    vbds: Vec<String>,
    vifs: Vec<String>,
    vdis: Vec<(String, String)>,
    networks: Vec<String>,
}

impl Created {
    fn cleanup(&self, pool: &Pool) {
        let mut db = pool.db();
        for r in self.vbds.iter().chain(self.vifs.iter()) {
            let class = if self.vbds.contains(r) { "VBD" } else { "VIF" };
            let _ = db.destroy(class, r);
        }
        for (r, _) in &self.vms {
            let _ = db.destroy("VM", r);
        }
        for (r, _) in &self.vdis {
            let _ = db.destroy("VDI", r);
        }
        for r in &self.networks {
            let _ = db.destroy("network", r);
        }
        drop(db);
        for (_, uuid) in &self.vdis {
            let _ = pool.disks.destroy(uuid);
        }
    }

    /// `task.result`: the VM refs, snapshots left out unless only snapshots came.
    fn result_xml(&self) -> String {
        let non_snap: Vec<Value> = self
            .vms
            .iter()
            .filter(|(_, snap)| !snap)
            .map(|(r, _)| Value::str(r))
            .collect();
        let all = if non_snap.is_empty() {
            self.vms.iter().map(|(r, _)| Value::str(r)).collect()
        } else {
            non_snap
        };
        Value::Array(all).to_xml()
    }
}

struct ImportJob {
    pool: Arc<Pool>,
    sr: String,
    sr_uuid: String,
    host: String,
    restore: bool,
    force: bool,
    task: String,
}

fn generic(msg: impl Into<String>) -> ApiError {
    ApiError::new("IMPORT_ERROR_GENERIC", [msg.into()])
}

fn xva_error(e: XvaError) -> ApiError {
    match e {
        XvaError::Truncated(_) => ApiError::new("IMPORT_ERROR_PREMATURE_EOF", [""; 0]),
        // xen-api import.ml: Stream_vdi.Invalid_checksum surfaces as a generic error.
        XvaError::ChecksumMismatch { .. } => generic(format!("checksum failed: {e}")),
        XvaError::NotAnXva { found } => ApiError::new(
            "IMPORT_ERROR_UNEXPECTED_FILE",
            ["ova.xml".to_string(), found],
        ),
        other => generic(other.to_string()),
    }
}

impl ImportJob {
    /// Copies the importable fields of an `ova.xml` record, mapping references.
    fn fields(
        &self,
        class: &str,
        snapshot: &Value,
        ids: &HashMap<String, String>,
    ) -> Vec<(String, Value)> {
        let Some(c) = self.pool.dm.class(class) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in snapshot.as_struct().unwrap_or(&[]) {
            if SKIPPED_FIELDS.contains(&k.as_str()) {
                continue;
            }
            let Some(f) = c.field(k) else { continue };
            let v = match &f.ty {
                Type::Ref(_) => {
                    let id = v.as_str().unwrap_or(NULL_REF);
                    Value::str(ids.get(id).map_or(NULL_REF, String::as_str))
                }
                Type::Set(inner) if matches!(**inner, Type::Ref(_)) => Value::Array(vec![]),
                _ => v.clone(),
            };
            out.push((k.clone(), v));
        }
        out
    }

    fn create(
        &self,
        db: &mut crate::db::Db,
        class: &str,
        fields: Vec<(String, Value)>,
    ) -> Result<String, ApiError> {
        db.create(class, fields.iter().map(|(k, v)| (k.as_str(), v.clone())))
            .map_err(|e| {
                generic(format!(
                    "cannot create the {class}: {} {:?}",
                    e.code, e.params
                ))
            })
    }

    /// Creates the objects of `ova.xml`; returns XVA disk id → VDI uuid.
    fn create_objects(
        &self,
        ova: &OvaXml,
        created: &mut Created,
    ) -> Result<HashMap<String, String>, ApiError> {
        if let Some((major, minor)) = host_xapi_version(&self.pool, &self.host)
            && !ova.version.importable_by(major, minor)
        {
            // xen-api importexport.ml `assert_compatible`.
            return Err(ApiError::new("IMPORT_INCOMPATIBLE_VERSION", [""; 0]));
        }
        let disks = ova.disks().map_err(xva_error)?;
        {
            let need: u64 = disks.iter().map(|d| d.virtual_size).sum();
            let db = self.pool.db();
            // Thin SRs: only the data written counts, so ask for nothing up front
            // (the `sr_full` fault still fails here).
            crate::api::storage::check_space(&self.pool, &db, &self.sr, 0).map_err(|e| {
                ApiError::new(
                    &e.code,
                    [
                        need.to_string(),
                        e.params.get(1).cloned().unwrap_or_default(),
                    ],
                )
            })?;
        }
        let mut ids: HashMap<String, String> = HashMap::new();
        let mut disk_uuids = HashMap::new();
        let mut db = self.pool.db();
        // SRs: everything goes to the chosen SR.
        for o in ova.objects_of_class("SR") {
            ids.insert(o.id.clone(), self.sr.clone());
        }
        // Networks: by name_label, then bridge, else created.
        for o in ova.objects_of_class("network") {
            let name = o
                .snapshot
                .get("name_label")
                .and_then(|v| v.as_str().ok())
                .unwrap_or("");
            let bridge = o
                .snapshot
                .get("bridge")
                .and_then(|v| v.as_str().ok())
                .unwrap_or("");
            let found = db
                .rows("network")
                .find(|(_, n)| !name.is_empty() && n.str_of("name_label") == name)
                .or_else(|| {
                    db.rows("network")
                        .find(|(_, n)| !bridge.is_empty() && n.str_of("bridge") == bridge)
                })
                .map(|(r, _)| r.clone());
            let r = match found {
                Some(r) => r,
                None => {
                    let f = self.fields("network", &o.snapshot, &ids);
                    let r = self.create(&mut db, "network", f)?;
                    created.networks.push(r.clone());
                    r
                }
            };
            ids.insert(o.id.clone(), r);
        }
        // VDIs, with their disks.
        for o in ova.objects_of_class("VDI") {
            let old_uuid = o
                .snapshot
                .get("uuid")
                .and_then(|v| v.as_str().ok())
                .unwrap_or("");
            let uuid = if self.restore
                && !old_uuid.is_empty()
                && db.find_by_uuid("VDI", old_uuid).is_none()
            {
                old_uuid.to_string()
            } else {
                uuid::Uuid::new_v4().to_string()
            };
            let size = o
                .snapshot
                .get("virtual_size")
                .and_then(|v| v.as_i64().ok())
                .unwrap_or(0)
                .max(0) as u64;
            // SM rounds VDI sizes up to 2 MiB on VHD SRs (xapi-facts §5.3).
            let size = crate::api::vdi::round_size(size);
            let mut f = self.fields("VDI", &o.snapshot, &ids);
            f.retain(|(k, _)| k != "SR" && k != "snapshot_of" && k != "is_a_snapshot");
            f.push(("uuid".into(), Value::str(&uuid)));
            f.push(("SR".into(), Value::str(&self.sr)));
            f.push(("location".into(), Value::str(&uuid)));
            f.push(("managed".into(), Value::Bool(true)));
            f.push(("virtual_size".into(), Value::Int(size as i64)));
            self.pool
                .disks
                .create(&uuid, &self.sr_uuid, size)
                .map_err(|e| generic(e.to_string()))?;
            let r = match self.create(&mut db, "VDI", f) {
                Ok(r) => r,
                Err(e) => {
                    let _ = self.pool.disks.destroy(&uuid);
                    return Err(e);
                }
            };
            created.vdis.push((r.clone(), uuid.clone()));
            ids.insert(o.id.clone(), r);
            disk_uuids.insert(o.id.clone(), uuid);
        }
        // VMs.
        for o in ova.objects_of_class("VM") {
            let old_uuid = o
                .snapshot
                .get("uuid")
                .and_then(|v| v.as_str().ok())
                .unwrap_or("");
            let uuid = if self.restore
                && !old_uuid.is_empty()
                && db.find_by_uuid("VM", old_uuid).is_none()
            {
                old_uuid.to_string()
            } else {
                uuid::Uuid::new_v4().to_string()
            };
            let is_snapshot = o
                .snapshot
                .get("is_a_snapshot")
                .and_then(|v| v.as_bool().ok())
                .unwrap_or(false);
            let mut f = self.fields("VM", &o.snapshot, &ids);
            f.retain(|(k, _)| {
                k != "power_state" && k != "suspend_VDI" && k != "snapshot_of" && k != "parent"
            });
            f.push(("uuid".into(), Value::str(&uuid)));
            f.push(("power_state".into(), Value::str("Halted")));
            f.push(("domid".into(), Value::Int(-1)));
            let r = self.create(&mut db, "VM", f)?;
            created.vms.push((r.clone(), is_snapshot));
            ids.insert(o.id.clone(), r);
        }
        // VBDs and VIFs.
        for o in ova.objects_of_class("VBD") {
            let mut f = self.fields("VBD", &o.snapshot, &ids);
            f.retain(|(k, _)| k != "currently_attached");
            f.push(("currently_attached".into(), Value::Bool(false)));
            let vm = f
                .iter()
                .find(|(k, _)| k == "VM")
                .and_then(|(_, v)| v.as_str().ok());
            if vm.is_none_or(|v| v == NULL_REF) {
                continue;
            }
            let r = self.create(&mut db, "VBD", f)?;
            created.vbds.push(r);
        }
        for o in ova.objects_of_class("VIF") {
            let mut f = self.fields("VIF", &o.snapshot, &ids);
            f.retain(|(k, _)| k != "currently_attached" && (self.restore || k != "MAC"));
            f.push(("currently_attached".into(), Value::Bool(false)));
            if !self.restore {
                f.push(("MAC".into(), Value::str(random_mac())));
                f.push(("MAC_autogenerated".into(), Value::Bool(true)));
            }
            let vm = f
                .iter()
                .find(|(k, _)| k == "VM")
                .and_then(|(_, v)| v.as_str().ok());
            if vm.is_none_or(|v| v == NULL_REF) {
                continue;
            }
            let r = self.create(&mut db, "VIF", f)?;
            created.vifs.push(r);
        }
        drop(db);
        // xapi marks the task once the objects exist, before the data flows.
        let _ = self.pool.db().update("task", &self.task, |rec| {
            if let Some(Value::Struct(m)) = rec.get_mut("other_config") {
                m.retain(|(k, _)| k != "object_creation");
                m.push(("object_creation".into(), Value::str("complete")));
            }
        });
        Ok(disk_uuids)
    }

    /// Reads the (decompressed) XVA and imports it.
    fn run(
        &self,
        body: &mut PipeReader,
        progress: &mut Progress,
        created: &mut Created,
    ) -> Result<(), ApiError> {
        let mut reader = open_decompressed(body)?;
        let mut dec = XvaDecoder::with_options(XvaDecoderOptions {
            verify_checksums: !self.force,
            ..XvaDecoderOptions::default()
        });
        let mut buf = vec![0u8; 1 << 20];
        let mut disk_uuids: HashMap<String, String> = HashMap::new();
        let mut current: Option<String> = None;
        let mut ended = false;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(ApiError::new("IMPORT_ERROR_PREMATURE_EOF", [""; 0]));
                }
                Err(e) => return Err(generic(format!("cannot read the XVA: {e}"))),
            };
            progress.advance(n as u64)?;
            for ev in dec.feed(&buf[..n]).map_err(xva_error)? {
                match ev {
                    XvaEvent::OvaXml(ova) => disk_uuids = self.create_objects(&ova, created)?,
                    XvaEvent::DiskStart(d) => current = disk_uuids.get(&d.id).cloned(),
                    XvaEvent::Extent(e) => {
                        if let (Some(uuid), ExtentData::Data(data)) = (&current, &e.data) {
                            self.pool
                                .disks
                                .write_at_sparse(uuid, e.offset, data)
                                .map_err(|err| ApiError::new("VDI_IO_ERROR", [err.to_string()]))?;
                        }
                    }
                    XvaEvent::DiskEnd(_) => current = None,
                    XvaEvent::End => ended = true,
                }
            }
            if ended {
                break;
            }
        }
        dec.finish().map_err(xva_error)
    }
}

/// Detects the compression the way xapi does: a tar whose first entry is `ova.xml` is
/// plain; zstd magic means zstd; anything else is taken as gzip.
fn open_decompressed(body: &mut PipeReader) -> Result<Box<dyn Read + '_>, ApiError> {
    let mut head = vec![0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match body.read(&mut head[n..]).map_err(io_api_error)? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    if n == 0 {
        return Err(ApiError::new("IMPORT_ERROR_PREMATURE_EOF", [""; 0]));
    }
    let is_tar_ova = n == 512 && head.starts_with(b"ova.xml\0");
    let chained = Cursor::new(head.clone()).chain(body);
    if is_tar_ova {
        Ok(Box::new(chained))
    } else if head.starts_with(&ZSTD_MAGIC) {
        let z =
            zstd::stream::read::Decoder::new(chained).map_err(|e| generic(format!("zstd: {e}")))?;
        Ok(Box::new(z))
    } else {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(chained)))
    }
}

fn random_mac() -> String {
    let b: [u8; 6] = rand::random();
    // Locally administered, unicast (xapi's Record_util.random_mac_local).
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        (b[0] & 0xFC) | 0x02,
        b[1],
        b[2],
        b[3],
        b[4],
        b[5]
    )
}

/// `PUT /import?sr_id=|sr_uuid=&restore=&force=&task_id=`.
pub async fn handle_import(pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let Some(begun) = begin_on_srs(&pool, &req, &mut conn, "VM.import", |p| {
        let sr = if let Some(s) = req.param("sr_id") {
            p.db().resolve("SR", &s).ok()
        } else if let Some(u) = req.param("sr_uuid") {
            p.db().find_by_uuid("SR", &u)
        } else {
            Some(p.default_sr())
        };
        sr.into_iter().collect()
    })
    .await?
    else {
        return Ok(None);
    };
    let task = begun.task.clone();
    if req.has_transfer_encoding() {
        // xen-api import.ml: chunked uploads are refused with 403.
        let e = ApiError::new("IMPORT_ERROR_CANNOT_HANDLE_CHUNKED", [""; 0]);
        return fail_early(&pool, &mut conn, &task, e, 403).await;
    }
    let sr = if let Some(s) = req.param("sr_id") {
        resolve(&pool, "SR", &s)
    } else if let Some(u) = req.param("sr_uuid") {
        pool.db().by_uuid("SR", &u)
    } else {
        let d = pool.default_sr();
        if d == NULL_REF {
            Err(ApiError::new("DEFAULT_SR_NOT_FOUND", [""; 0]))
        } else {
            Ok(d)
        }
    };
    let sr = match sr {
        Ok(s) => s,
        Err(e) => return fail_early(&pool, &mut conn, &task, e, 500).await,
    };
    let sr_uuid = {
        let db = pool.db();
        db.get("SR", &sr).map(|r| {
            (
                r.str_of("uuid").to_string(),
                r.str_of("content_type") == "iso",
            )
        })
    };
    let sr_uuid = match sr_uuid {
        Ok((_, true)) => {
            let e = ApiError::new("SR_OPERATION_NOT_SUPPORTED", [sr.as_str()]);
            return fail_early(&pool, &mut conn, &task, e, 400).await;
        }
        Ok((u, false)) => u,
        Err(e) => return fail_early(&pool, &mut conn, &task, e, 500).await,
    };
    // xapi answers 200 with the task before it reads the body.
    conn.write_head(
        "HTTP/1.1",
        200,
        "OK",
        &[
            ("Connection", "close"),
            ("task-id", &task),
            ("Content-Type", "text/plain"),
        ],
    )
    .await?;
    let len = match req.content_length() {
        Some(n) => BodyLen::Exactly(n),
        None => BodyLen::UntilEof,
    };
    let job = ImportJob {
        pool: pool.clone(),
        sr,
        sr_uuid,
        host: req.host.clone(),
        restore: flag(&req, "restore"),
        force: flag(&req, "force"),
        task: task.clone(),
    };
    let total = req.content_length().filter(|n| *n < (1 << 50)).unwrap_or(0);
    let mut progress = Progress::new(pool.clone(), &task, total);
    let (result, end) = receive_stream(&pool, "import", &mut conn, len, move |r| {
        let mut created = Created::default();
        let outcome = job.run(r, &mut progress, &mut created);
        match outcome {
            Ok(()) => Ok(created.result_xml()),
            Err(e) => {
                if !job.force {
                    created.cleanup(&job.pool);
                }
                Err(e)
            }
        }
    })
    .await;
    match (result, end) {
        (_, BodyEnd::Cut(n)) => pool.task_fail(
            &task,
            &ApiError::new(
                "VDI_IO_ERROR",
                [format!(
                    "upload cut after {n} bytes (xapi-sim fault injection)"
                )],
            ),
        ),
        (Ok(xml), end) => {
            // The archive was complete: a client that drops the socket after the data
            // (XO sends a fake length) still succeeds, as with xapi.
            if let BodyEnd::Premature(n) = end {
                tracing::debug!("import: the client closed after {n} bytes, after the tar end");
            }
            if let BodyEnd::Error(e) = end {
                tracing::debug!("import: socket error after the tar end: {e}");
            }
            pool.task_complete(&task, &xml)
        }
        (Err(e), _) => pool.task_fail(&task, &e),
    }
    crate::api::storage::refresh_all(&pool);
    let _ = conn.shutdown().await;
    drop(begun);
    Ok(None)
}
