//! `GET /export` (a VM as an XVA, `xe vm-export`) and `GET /export_metadata` (ova.xml
//! only), as xen-api's ocaml/xapi/export.ml serves them (xapi-facts §3.1, §3.3, §4).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;
use xenvault_formats::xva::{
    CHUNK_SIZE, ChecksumKind, ExportRecords, OvaBuilder, OvaVersion, OvaXml, XvaEncoder,
    XvaEncoderOptions,
};
use xenvault_types::{Extent, Value};

use super::stream::{PipeWriter, Progress, io_api_error, send_stream};
use super::{begin, begin_on_srs, fail_early, host_xapi_version, resolve};
use crate::db::{Db, Fields};
use crate::disk::{CBT_BLOCK_SIZE, DiskStore};
use crate::error::ApiError;
use crate::http::{Conn, HandlerOutcome, Request, Response};
use crate::pool::Pool;

/// xapi numbers XVA objects from a process-wide counter (`Ref:<n>`, not zero-based);
/// the simulator does the same.
static NEXT_XVA_ID: AtomicU64 = AtomicU64::new(1);

/// Compression of a whole export, from `use_compression` (`true`/`gzip` → gzip,
/// `zstd` → zstd, anything else → none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// xapi's reading of the `use_compression` parameter.
    pub fn from_param(v: Option<&str>) -> Compression {
        match v {
            Some("true") | Some("gzip") => Compression::Gzip,
            Some("zstd") => Compression::Zstd,
            _ => Compression::None,
        }
    }
}

/// Runs `body` writing into `w`, compressed as asked.
pub(crate) fn with_compression(
    w: &mut PipeWriter,
    c: Compression,
    body: impl FnOnce(&mut dyn Write) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    match c {
        Compression::None => body(w),
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
            body(&mut gz)?;
            gz.finish().map_err(io_api_error)?;
            Ok(())
        }
        Compression::Zstd => {
            let mut z = zstd::stream::write::Encoder::new(w, 3).map_err(io_api_error)?;
            body(&mut z)?;
            z.finish().map_err(io_api_error)?;
            Ok(())
        }
    }
}

/// The records of `vm` the XVA needs: its VBDs and their VDIs and SRs, its VIFs and
/// their networks.
pub(crate) fn export_records(db: &Db, vm: &str) -> Result<ExportRecords, ApiError> {
    let vm_rec = db.get("VM", vm)?;
    let mut out = ExportRecords {
        vm: (vm.to_string(), db.record_value("VM", vm)?),
        vbds: Vec::new(),
        vdis: Vec::new(),
        vifs: Vec::new(),
        networks: Vec::new(),
        srs: Vec::new(),
    };
    for vbd in vm_rec.strs_of("VBDs") {
        let Ok(rec) = db.get("VBD", &vbd) else {
            continue;
        };
        let vdi = rec.str_of("VDI").to_string();
        out.vbds.push((vbd.clone(), db.record_value("VBD", &vbd)?));
        if let Ok(vdi_rec) = db.get("VDI", &vdi)
            && !out.vdis.iter().any(|(r, _)| *r == vdi)
        {
            let sr = vdi_rec.str_of("SR").to_string();
            out.vdis.push((vdi.clone(), db.record_value("VDI", &vdi)?));
            if db.exists("SR", &sr) && !out.srs.iter().any(|(r, _)| *r == sr) {
                out.srs.push((sr.clone(), db.record_value("SR", &sr)?));
            }
        }
    }
    // The suspend image, which `preserve_power_state=true` exports with a suspended VM.
    let suspend = vm_rec.str_of("suspend_VDI").to_string();
    if let Ok(vdi_rec) = db.get("VDI", &suspend)
        && !out.vdis.iter().any(|(r, _)| *r == suspend)
    {
        let sr = vdi_rec.str_of("SR").to_string();
        out.vdis
            .push((suspend.clone(), db.record_value("VDI", &suspend)?));
        if db.exists("SR", &sr) && !out.srs.iter().any(|(r, _)| *r == sr) {
            out.srs.push((sr.clone(), db.record_value("SR", &sr)?));
        }
    }
    for vif in vm_rec.strs_of("VIFs") {
        let Ok(rec) = db.get("VIF", &vif) else {
            continue;
        };
        let net = rec.str_of("network").to_string();
        out.vifs.push((vif.clone(), db.record_value("VIF", &vif)?));
        if db.exists("network", &net) && !out.networks.iter().any(|(r, _)| *r == net) {
            out.networks
                .push((net.clone(), db.record_value("network", &net)?));
        }
    }
    Ok(out)
}

/// The `version` struct this host writes into ova.xml: its own xapi version, as xapi does.
fn ova_version(pool: &Pool, host: &str) -> OvaVersion {
    let mut v = OvaVersion::default();
    if let Some((major, minor)) = host_xapi_version(pool, host) {
        v.xapi_major = major;
        v.xapi_minor = minor;
    }
    let db = pool.db();
    if let Ok(h) = db.get("host", host) {
        v.hostname = h.str_of("hostname").to_string();
        v.product_brand = h
            .map_get("software_version", "product_brand")
            .unwrap_or_else(|| "xapi-sim".into());
        v.product_version = h
            .map_get("software_version", "product_version")
            .unwrap_or_default();
        v.build_number = h
            .map_get("software_version", "build_number")
            .unwrap_or_default();
        v.date = h.map_get("software_version", "date").unwrap_or_default();
    }
    v
}

fn vm_of_request(pool: &Pool, req: &Request) -> Result<String, ApiError> {
    if let Some(r) = req.param("ref") {
        return resolve(pool, "VM", &r);
    }
    if let Some(u) = req.param("uuid") {
        return pool.db().by_uuid("VM", &u);
    }
    Err(ApiError::internal(
        "missing ref or uuid parameter (export?ref=<VM ref> or ?uuid=<VM uuid>)",
    ))
}

/// The SRs of the VM's disks (xen-api export.ml `check_vm_host_SRs`).
fn srs_of_vm(pool: &Pool, vm: &str) -> Vec<String> {
    let db = pool.db();
    let Ok(rec) = db.get("VM", vm) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for vbd in rec.strs_of("VBDs") {
        let Ok(b) = db.get("VBD", &vbd) else { continue };
        if b.bool_of("empty") {
            continue;
        }
        if let Ok(v) = db.get("VDI", b.str_of("VDI")) {
            let sr = v.str_of("SR").to_string();
            if !out.contains(&sr) {
                out.push(sr);
            }
        }
    }
    out
}

fn check_exportable(pool: &Pool, vm: &str) -> Result<(), ApiError> {
    let db = pool.db();
    let rec = db.get("VM", vm)?;
    if let Some(reason) = rec.map_get("blocked_operations", "export") {
        return Err(ApiError::new("OPERATION_BLOCKED", [vm, reason.as_str()]));
    }
    // xen-api ocaml/xapi/xapi_vm_lifecycle.ml: export needs Halted or Suspended.
    let state = rec.str_of("power_state");
    if !matches!(state, "Halted" | "Suspended") {
        return Err(ApiError::new(
            "VM_BAD_POWER_STATE",
            [
                vm.to_string(),
                "halted, suspended".into(),
                state.to_ascii_lowercase(),
            ],
        ));
    }
    Ok(())
}

/// Writes every disk of `ova` into `enc`'s output, reading the disks from `disks`.
fn write_xva(
    out: &mut dyn Write,
    disks: &DiskStore,
    ova: &OvaXml,
    progress: &mut Progress,
) -> Result<(), ApiError> {
    let bad = |e: xenvault_formats::xva::XvaError| ApiError::internal(format!("XVA encoder: {e}"));
    // xapi ≥ 1.170 writes `.xxhash`, older ones SHA-1 `.checksum` (xapi-facts §4.4): the
    // simulated host's version decides.
    let legacy = (ova.version.xapi_major, ova.version.xapi_minor) < (1, 170);
    let options = XvaEncoderOptions {
        checksum: if legacy {
            ChecksumKind::Sha1
        } else {
            ChecksumKind::XxHash
        },
        ..XvaEncoderOptions::default()
    };
    let mut enc = XvaEncoder::new(ova, options).map_err(bad)?;
    let drain = |enc: &mut XvaEncoder, out: &mut dyn Write| -> Result<(), ApiError> {
        while let Some(piece) = enc.next_output().map_err(bad)? {
            out.write_all(&piece).map_err(io_api_error)?;
        }
        Ok(())
    };
    drain(&mut enc, out)?;
    for disk in enc.disks().to_vec() {
        enc.start_disk(&disk.id).map_err(bad)?;
        drain(&mut enc, out)?;
        let alloc = disks.allocated_blocks(&disk.vdi_uuid).map_err(|e| {
            let (code, params) = e.xapi_error();
            ApiError::new(&code, params)
        })?;
        let stored = disks
            .info(&disk.vdi_uuid)
            .map(|i| i.size)
            .unwrap_or(disk.virtual_size);
        let per_chunk = CHUNK_SIZE / CBT_BLOCK_SIZE;
        let mut off = 0u64;
        while off < disk.virtual_size {
            let len = CHUNK_SIZE.min(disk.virtual_size - off);
            let first = off / CBT_BLOCK_SIZE;
            let any = (first..first + per_chunk).any(|b| alloc.get(b));
            if any && off < stored {
                let readable = len.min(stored - off);
                let mut buf = vec![0u8; len as usize];
                disks
                    .read_at(&disk.vdi_uuid, off, &mut buf[..readable as usize])
                    .map_err(|e| ApiError::new("VDI_IO_ERROR", [e.to_string()]))?;
                enc.push(Extent::data(off, buf)).map_err(bad)?;
            } else {
                enc.push(Extent::zero(off, len)).map_err(bad)?;
            }
            drain(&mut enc, out)?;
            progress.advance(len)?;
            off += len;
        }
        enc.end_disk().map_err(bad)?;
        drain(&mut enc, out)?;
    }
    enc.finish().map_err(bad)?;
    drain(&mut enc, out)
}

/// `GET /export?ref=|uuid=&use_compression=&preserve_power_state=&task_id=`.
pub async fn handle_export(pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let Some(begun) = begin_on_srs(&pool, &req, &mut conn, "VM.export", |p| {
        vm_of_request(p, &req)
            .map(|vm| srs_of_vm(p, &vm))
            .unwrap_or_default()
    })
    .await?
    else {
        return Ok(None);
    };
    let task = begun.task.clone();
    let vm =
        match vm_of_request(&pool, &req).and_then(|vm| check_exportable(&pool, &vm).map(|_| vm)) {
            Ok(vm) => vm,
            Err(e) => return fail_early(&pool, &mut conn, &task, e, 500).await,
        };
    let compression = Compression::from_param(req.param("use_compression").as_deref());
    let builder = OvaBuilder {
        version: ova_version(&pool, &req.host),
        first_id: NEXT_XVA_ID.fetch_add(1000, Ordering::SeqCst),
        preserve_power_state: super::flag(&req, "preserve_power_state"),
        with_snapshot_metadata: false,
    };
    let built = {
        let db = pool.db();
        export_records(&db, &vm)
    }
    .and_then(|recs| {
        builder
            .build(&recs)
            .map_err(|e| ApiError::internal(format!("cannot build ova.xml: {e}")))
    });
    let ova = match built {
        Ok(o) => o,
        Err(e) => return fail_early(&pool, &mut conn, &task, e, 500).await,
    };
    let total: u64 = ova
        .disks()
        .map(|d| d.iter().map(|d| d.virtual_size).sum())
        .unwrap_or(0);
    // The VM is locked with current operation `export` while the stream runs.
    let op_key = task.clone();
    let _ = pool.db().update("VM", &vm, |rec| {
        if let Some(Value::Struct(m)) = rec.get_mut("current_operations") {
            m.push((op_key.clone(), Value::str("export")));
        }
    });
    // xen-api ocaml/xapi/export.ml: HTTP/1.0, no Content-Length, Connection: close.
    conn.write_head(
        "HTTP/1.0",
        200,
        "OK",
        &[
            ("Connection", "close"),
            ("task-id", &task),
            ("Server", "xapi-sim"),
            ("Content-Type", "application/octet-stream"),
            ("Content-Disposition", "attachment; filename=\"export.xva\""),
        ],
    )
    .await?;
    let disks = pool.disks.clone();
    let mut progress = Progress::new(pool.clone(), &task, total);
    send_stream(&pool, &task, "export", &mut conn, move |w| {
        with_compression(w, compression, |out| {
            write_xva(out, &disks, &ova, &mut progress)
        })?;
        Ok(String::new())
    })
    .await?;
    let _ = pool.db().update("VM", &vm, |rec| {
        if let Some(Value::Struct(m)) = rec.get_mut("current_operations") {
            m.retain(|(k, _)| *k != op_key);
        }
    });
    drop(begun);
    Ok(None)
}

/// `GET /export_metadata?ref=|uuid=`: a tar with only `ova.xml` (snapshot fields kept),
/// with a `Content-Length` (xen-api ocaml/xapi/export.ml `metadata_handler`).
pub async fn handle_export_metadata(
    pool: Arc<Pool>,
    req: Request,
    mut conn: Conn,
) -> HandlerOutcome {
    let Some(begun) = begin(&pool, &req, &mut conn, "VM.export_metadata").await? else {
        return Ok(None);
    };
    let task = begun.task.clone();
    let vm = match vm_of_request(&pool, &req) {
        Ok(vm) => vm,
        Err(e) => return fail_early(&pool, &mut conn, &task, e, 500).await,
    };
    let builder = OvaBuilder {
        version: ova_version(&pool, &req.host),
        first_id: NEXT_XVA_ID.fetch_add(1000, Ordering::SeqCst),
        preserve_power_state: true,
        with_snapshot_metadata: req.param("export_snapshots").as_deref() != Some("false"),
    };
    let built = {
        let db = pool.db();
        export_records(&db, &vm)
    }
    .and_then(|recs| {
        builder
            .build(&recs)
            .map_err(|e| ApiError::internal(format!("cannot build ova.xml: {e}")))
    });
    let ova = match built {
        Ok(o) => o,
        Err(e) => return fail_early(&pool, &mut conn, &task, e, 500).await,
    };
    let xml = ova.to_xml();
    let mtime = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
    let mut body = Vec::with_capacity(xml.len() + 2048);
    match xenvault_formats::tar::header("ova.xml", xml.len() as u64, mtime) {
        Ok(h) => body.extend_from_slice(&h),
        Err(e) => {
            return fail_early(
                &pool,
                &mut conn,
                &task,
                ApiError::internal(e.to_string()),
                500,
            )
            .await;
        }
    }
    body.extend_from_slice(xml.as_bytes());
    body.extend_from_slice(xenvault_formats::tar::padding(xml.len() as u64));
    body.extend_from_slice(&xenvault_formats::tar::end_of_archive());
    pool.stats.add("bytes/export_metadata", body.len() as u64);
    let resp = Response::new(200, "OK")
        .header("Connection", "close")
        .header("task-id", &task)
        .header("Content-Disposition", "attachment; filename=\"export.xva\"")
        .body("application/octet-stream", body);
    pool.task_complete(&task, "");
    conn.send(&resp).await?;
    let _ = conn.shutdown().await;
    Ok(None)
}
