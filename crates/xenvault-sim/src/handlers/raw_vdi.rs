//! `GET /export_raw_vdi` and `PUT /import_raw_vdi`: one disk as raw, VHD (dynamic, or
//! differencing against `base=`) or a tar of XVA-style chunks, as xen-api's
//! ocaml/xapi/export_raw_vdi.ml, import_raw_vdi.ml and vhd-tool serve them
//! (xapi-facts §3.4, §3.5, §5.5, §5.6).

use std::io::{Read, Write};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use xenvault_formats::vhd::{
    LocatorSpec, MAX_WRITE_VIRTUAL_SIZE, ParentSpec, PlatformCode, VhdDecoder, VhdEncoder, VhdSpec,
};
use xenvault_formats::xva::{ChecksumKind, checksum_text};
use xenvault_types::extent::is_all_zero;
use xenvault_types::{ExtentData, Value};

use super::stream::{
    BodyEnd, BodyLen, PipeReader, PipeWriter, Progress, io_api_error, receive_stream, send_stream,
};
use super::{Dom0Vbd, begin_on_srs, fail_early, resolve};
use crate::db::Fields;
use crate::disk::{BlockBitmap, CBT_BLOCK_SIZE, DiskError, DiskStore};
use crate::error::ApiError;
use crate::http::{Conn, HandlerOutcome, Request};
use crate::pool::Pool;

/// VHD block size (2 MiB) in 64 KiB store blocks.
const VHD_BLOCK: u64 = 2 << 20;
const PER_VHD_BLOCK: u64 = VHD_BLOCK / CBT_BLOCK_SIZE;
/// Size of the pieces raw streams are read in.
const RAW_PIECE: u64 = 4 << 20;
/// `format=tar` chunk size and directory (xen-api xapi_globs.ml `vdi_tar_export_dir`).
const TAR_CHUNK: u64 = 1 << 20;
const TAR_DIR: &str = "vdi";

/// The formats of `format=` (case-insensitive, default raw).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Raw,
    Vhd,
    Tar,
    Qcow2,
}

fn parse_format(req: &Request) -> Result<Format, ApiError> {
    let f = req.param("format").unwrap_or_else(|| "raw".into());
    match f.to_ascii_lowercase().as_str() {
        "raw" => Ok(Format::Raw),
        "vhd" => Ok(Format::Vhd),
        "tar" => Ok(Format::Tar),
        "qcow2" => Ok(Format::Qcow2),
        // xen-api ocaml/xapi/importexport.ml `Format.of_req`: 404 + INTERNAL_ERROR.
        _ => Err(ApiError::internal(format!("Unknown format {f}"))),
    }
}

fn disk_error(e: DiskError) -> ApiError {
    let (code, params) = e.xapi_error();
    ApiError::new(&code, params)
}

/// A VDI named by ref or uuid, with its uuid and size.
struct VdiInfo {
    r: String,
    uuid: String,
    sr: String,
    size: u64,
}

fn vdi_info(pool: &Pool, ref_or_uuid: &str) -> Result<VdiInfo, ApiError> {
    let r = resolve(pool, "VDI", ref_or_uuid)?;
    let db = pool.db();
    let rec = db.get("VDI", &r)?;
    if rec.str_of("type") == "cbt_metadata" {
        return Err(ApiError::new(
            "VDI_INCOMPATIBLE_TYPE",
            [r.as_str(), "cbt_metadata"],
        ));
    }
    Ok(VdiInfo {
        uuid: rec.str_of("uuid").to_string(),
        sr: rec.str_of("SR").to_string(),
        size: u64::try_from(rec.int_of("virtual_size")).unwrap_or(0),
        r,
    })
}

/// 2 MiB VHD blocks holding any set 64 KiB block.
fn vhd_blocks(bits: &BlockBitmap) -> Vec<u32> {
    let mut out: Vec<u32> = bits.ones().map(|b| (b / PER_VHD_BLOCK) as u32).collect();
    out.dedup();
    out
}

/// The footer uid xapi would give the base VHD file: stable per base VDI and, like the
/// real one, not the VDI uuid (docs/xapi-notes.md "Simulator data plane").
fn base_vhd_uid(base_uuid: &str) -> uuid::Uuid {
    let h = Sha256::digest(format!("xapi-sim base vhd {base_uuid}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

fn read(disks: &DiskStore, uuid: &str, off: u64, buf: &mut [u8]) -> Result<(), ApiError> {
    disks
        .read_at(uuid, off, buf)
        .map_err(|e| ApiError::new("VDI_IO_ERROR", [e.to_string()]))
}

fn write_raw(
    out: &mut PipeWriter,
    disks: &DiskStore,
    uuid: &str,
    size: u64,
    progress: &mut Progress,
) -> Result<(), ApiError> {
    let alloc = disks.allocated_blocks(uuid).map_err(disk_error)?;
    let mut off = 0;
    while off < size {
        let len = RAW_PIECE.min(size - off);
        let first = off / CBT_BLOCK_SIZE;
        let last = (off + len - 1) / CBT_BLOCK_SIZE;
        // Unallocated runs go out as zeros from a static buffer; others are read into a
        // recycled piece (holes inside it read as zeros) handed over without a copy.
        if (first..=last).any(|b| alloc.get(b)) {
            let mut piece = out.buffer(len as usize);
            read(disks, uuid, off, &mut piece)?;
            out.send_vec(piece).map_err(io_api_error)?;
        } else {
            out.send_zeros(len as usize).map_err(io_api_error)?;
        }
        progress.advance(len)?;
        off += len;
    }
    Ok(())
}

fn write_vhd(
    out: &mut dyn Write,
    disks: &DiskStore,
    vdi: &VdiInfo,
    base: Option<&VdiInfo>,
    progress: &mut Progress,
) -> Result<(), ApiError> {
    let (bits, parent) = match base {
        None => (disks.allocated_blocks(&vdi.uuid).map_err(disk_error)?, None),
        Some(b) => {
            let path = format!("/var/run/sr-mount/{}/{}.vhd", b.sr_uuid_hint(), b.uuid);
            (
                disks
                    .differing_blocks(&vdi.uuid, &b.uuid)
                    .map_err(disk_error)?,
                Some(ParentSpec {
                    unique_id: base_vhd_uid(&b.uuid),
                    timestamp: 0,
                    unicode_name: path.clone(),
                    locators: vec![LocatorSpec {
                        platform: PlatformCode(0x4D61_6358), // MacX
                        path,
                    }],
                }),
            )
        }
    };
    let blocks = vhd_blocks(&bits);
    let uid = uuid::Uuid::new_v4(); // a fresh random footer uid, as xapi
    let spec = match parent {
        None => VhdSpec::dynamic(vdi.size, uid),
        Some(p) => VhdSpec::differencing(vdi.size, uid, p),
    };
    let bad = |e: xenvault_formats::vhd::VhdError| {
        ApiError::new("VDI_IO_ERROR", [format!("VHD encoder: {e}")])
    };
    let mut enc = VhdEncoder::new(spec, blocks.iter().copied()).map_err(bad)?;
    out.write_all(enc.prologue()).map_err(io_api_error)?;
    let total_blocks = blocks.len() as u64;
    let mut buf = vec![0u8; VHD_BLOCK as usize];
    for &b in &blocks {
        let off = u64::from(b) * VHD_BLOCK;
        let len = VHD_BLOCK.min(vdi.size - off) as usize;
        read(disks, &vdi.uuid, off, &mut buf[..len])?;
        let piece = enc.encode_block(b, &buf[..len]).map_err(bad)?;
        out.write_all(&piece).map_err(io_api_error)?;
        // Progress over the blocks sent (vhd-tool reports percent done).
        progress.advance(vdi.size / total_blocks.max(1))?;
    }
    out.write_all(&enc.finish().map_err(bad)?)
        .map_err(io_api_error)
}

impl VdiInfo {
    /// The SR uuid is not needed for data; the parent path only mimics xapi's layout.
    fn sr_uuid_hint(&self) -> &str {
        self.sr.strip_prefix("OpaqueRef:").unwrap_or(&self.sr)
    }
}

fn write_tar(
    out: &mut dyn Write,
    disks: &DiskStore,
    uuid: &str,
    size: u64,
    progress: &mut Progress,
) -> Result<(), ApiError> {
    let tar_err = |e: xenvault_formats::tar::TarError| ApiError::internal(e.to_string());
    let last = size.saturating_sub(1) / TAR_CHUNK;
    let mut buf = vec![0u8; TAR_CHUNK as usize];
    let mut off = 0;
    let mut counter = 0u64;
    while off < size {
        let len = TAR_CHUNK.min(size - off) as usize;
        read(disks, uuid, off, &mut buf[..len])?;
        let data = &buf[..len];
        // All-zero chunks are left out, except the first and the last (stream_vdi.ml).
        if counter == 0 || counter == last || !is_all_zero(data) {
            let name = format!("{TAR_DIR}/{counter:08}");
            out.write_all(&xenvault_formats::tar::header(&name, len as u64, 0).map_err(tar_err)?)
                .map_err(io_api_error)?;
            out.write_all(data).map_err(io_api_error)?;
            out.write_all(xenvault_formats::tar::padding(len as u64))
                .map_err(io_api_error)?;
            let sum = checksum_text(ChecksumKind::XxHash, data);
            let cname = format!("{name}{}", ChecksumKind::XxHash.extension());
            out.write_all(
                &xenvault_formats::tar::header(&cname, sum.len() as u64, 0).map_err(tar_err)?,
            )
            .map_err(io_api_error)?;
            out.write_all(sum.as_bytes()).map_err(io_api_error)?;
            out.write_all(xenvault_formats::tar::padding(sum.len() as u64))
                .map_err(io_api_error)?;
        }
        progress.advance(len as u64)?;
        off += len as u64;
        counter += 1;
    }
    out.write_all(&xenvault_formats::tar::end_of_archive())
        .map_err(io_api_error)
}

/// `GET /export_raw_vdi?vdi=&format=raw|vhd|tar&base=&task_id=`.
pub async fn handle_export(pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let Some(begun) = begin_on_srs(&pool, &req, &mut conn, "VDI.export_raw_vdi", |p| {
        super::sr_of_vdi_param(p, &req, "vdi")
    })
    .await?
    else {
        return Ok(None);
    };
    let task = begun.task.clone();
    let format = match parse_format(&req) {
        Ok(f) => f,
        Err(e) => return fail_early(&pool, &mut conn, &task, e, 404).await,
    };
    let checked = (|| -> Result<(VdiInfo, Option<VdiInfo>), ApiError> {
        let vdi = req
            .param("vdi")
            .ok_or_else(|| ApiError::internal("missing vdi parameter (vdi=<ref or uuid>)"))?;
        let vdi = vdi_info(&pool, &vdi)?;
        if format == Format::Qcow2 {
            return Err(ApiError::internal(
                "format qcow2 is not implemented by xapi-sim (docs/simulator.md)",
            ));
        }
        if format == Format::Vhd && vdi.size > MAX_WRITE_VIRTUAL_SIZE {
            // xen-api ocaml/xapi/export_raw_vdi.ml, Constants.max_vhd_size.
            return Err(ApiError::new(
                "VDI_TOO_LARGE",
                [vdi.r.clone(), MAX_WRITE_VIRTUAL_SIZE.to_string()],
            ));
        }
        let base = match (format, req.param("base")) {
            (Format::Vhd, Some(b)) => Some(vdi_info(&pool, &b)?),
            _ => None,
        };
        if !pool
            .disks
            .info(&vdi.uuid)
            .map(|i| i.has_data)
            .unwrap_or(false)
        {
            return Err(ApiError::new(
                "VDI_MISSING",
                [vdi.sr.clone(), vdi.r.clone()],
            ));
        }
        if let Some(b) = &base {
            pool.disks
                .differing_blocks(&vdi.uuid, &b.uuid)
                .map_err(|e| match e {
                    DiskError::Unrelated(..) => ApiError::new(
                        "VDI_IO_ERROR",
                        [format!(
                            "Cannot compute differences: VDI {} is not in the VHD tree of base {}",
                            vdi.uuid, b.uuid
                        )],
                    ),
                    e => disk_error(e),
                })?;
        }
        Ok((vdi, base))
    })();
    let (vdi, base) = match checked {
        Ok(v) => v,
        Err(e) => return fail_early(&pool, &mut conn, &task, e, 500).await,
    };
    let vbd = Dom0Vbd::plug(&pool, &req.host, &vdi.r, "RO", "export_raw_vdi");
    let (ctype, ext) = match format {
        Format::Raw => ("application/octet-stream", "raw"),
        Format::Vhd => ("application/vhd", "vhd"),
        Format::Tar | Format::Qcow2 => ("application/x-tar", "tar"),
    };
    let disposition = format!("attachment; filename=\"{}.{ext}\"", vdi.uuid);
    conn.write_head(
        "HTTP/1.1",
        200,
        "OK",
        &[
            ("Connection", "close"),
            ("task-id", &task),
            ("Content-Type", ctype),
            ("Content-Disposition", &disposition),
        ],
    )
    .await?;
    if format == Format::Raw && conn.can_send_file() && !pool.faults.has_stream("export_raw_vdi") {
        send_raw_zero_copy(&pool, &task, &mut conn, &vdi.uuid, vdi.size).await?;
        drop(vbd);
        drop(begun);
        return Ok(None);
    }
    let disks = pool.disks.clone();
    let mut progress = Progress::new(pool.clone(), &task, vdi.size);
    send_stream(&pool, &task, "export_raw_vdi", &mut conn, move |w| {
        match format {
            Format::Raw | Format::Qcow2 => {
                write_raw(w, &disks, &vdi.uuid, vdi.size, &mut progress)?
            }
            Format::Vhd => write_vhd(w, &disks, &vdi, base.as_ref(), &mut progress)?,
            Format::Tar => write_tar(w, &disks, &vdi.uuid, vdi.size, &mut progress)?,
        }
        Ok(String::new())
    })
    .await?;
    drop(vbd);
    drop(begun);
    Ok(None)
}

/// A plain-HTTP raw export without stream faults: the layer files' ranges go to
/// the socket with `sendfile` (nothing copied through user space), holes as
/// zeros, so the simulator is not what limits a client's measured speed
/// (`xenvault-bench sim`). Progress, cancellation and the task outcome are the
/// same as [`send_stream`]'s.
async fn send_raw_zero_copy(
    pool: &Arc<Pool>,
    task: &str,
    conn: &mut Conn,
    uuid: &str,
    size: u64,
) -> std::io::Result<()> {
    const PIECE: u64 = 8 << 20;
    let mut progress = Progress::new(pool.clone(), task, size);
    let mut off = 0u64;
    let outcome: Result<(), ApiError> = async {
        while off < size {
            let len = PIECE.min(size - off);
            let runs = pool.disks.read_plan(uuid, off, len).map_err(disk_error)?;
            for run in runs {
                let sent = match &run.file {
                    Some(file) => conn.send_file_range(file, run.offset, run.len).await,
                    None => conn.write_zeros(run.len).await,
                };
                sent.map_err(|e| {
                    ApiError::new(
                        "VDI_IO_ERROR",
                        [format!("the client closed the connection: {e}")],
                    )
                })?;
            }
            pool.stats.add("bytes/export_raw_vdi", len);
            progress.advance(len)?;
            off += len;
        }
        Ok(())
    }
    .await;
    let _ = conn.flush().await;
    match outcome {
        Ok(()) => pool.task_complete(task, ""),
        Err(err) => {
            tracing::info!(code = %err.code, "raw export failed after the 200");
            pool.task_fail(task, &err);
        }
    }
    let _ = conn.shutdown().await;
    Ok(())
}

/// What the consumer of an import needs.
struct ImportTarget {
    disks: Arc<DiskStore>,
    uuid: String,
    size: u64,
}

fn write_sparse(t: &ImportTarget, off: u64, data: &[u8]) -> Result<(), ApiError> {
    t.disks
        .write_at_sparse(&t.uuid, off, data)
        .map_err(|e| match e {
            DiskError::OutOfRange { .. } => ApiError::new(
                "VDI_IO_ERROR",
                [format!(
                    "the data goes past the end of the {}-byte VDI {}: {e}",
                    t.size, t.uuid
                )],
            ),
            e => ApiError::new("VDI_IO_ERROR", [e.to_string()]),
        })
}

fn read_full(r: &mut PipeReader, buf: &mut [u8]) -> Result<usize, ApiError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).map_err(io_api_error)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn import_raw(
    r: &mut PipeReader,
    t: &ImportTarget,
    expect: u64,
    progress: &mut Progress,
) -> Result<(), ApiError> {
    let mut buf = vec![0u8; RAW_PIECE as usize];
    let mut off = 0u64;
    while off < expect {
        let want = RAW_PIECE.min(expect - off) as usize;
        let n = read_full(r, &mut buf[..want])?;
        if n == 0 {
            break;
        }
        write_sparse(t, off, &buf[..n])?;
        progress.advance(n as u64)?;
        off += n as u64;
    }
    if off < expect {
        return Err(ApiError::new(
            "VDI_IO_ERROR",
            [format!("the body ended after {off} of {expect} bytes")],
        ));
    }
    Ok(())
}

/// xapi's `chunked` query framing: `{u64 offset LE, u32 length LE}` headers each followed
/// by that many bytes, ended by `{0, 0}` (xen-api ocaml/vhd-tool/src/chunked.ml).
fn import_chunked(
    r: &mut PipeReader,
    t: &ImportTarget,
    progress: &mut Progress,
) -> Result<(), ApiError> {
    let mut hdr = [0u8; 12];
    let mut buf = Vec::new();
    loop {
        if read_full(r, &mut hdr)? < 12 {
            return Err(ApiError::new(
                "VDI_IO_ERROR",
                ["the chunked body ended without its {0,0} terminator"],
            ));
        }
        let mut o = [0u8; 8];
        o.copy_from_slice(&hdr[..8]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&hdr[8..]);
        let (off, len) = (u64::from_le_bytes(o), u32::from_le_bytes(l) as usize);
        if off == 0 && len == 0 {
            return Ok(());
        }
        if len > 64 << 20 {
            return Err(ApiError::new(
                "VDI_IO_ERROR",
                [format!(
                    "chunk of {len} bytes at {off} is larger than 64 MiB"
                )],
            ));
        }
        buf.resize(len, 0);
        if read_full(r, &mut buf)? < len {
            return Err(ApiError::new(
                "VDI_IO_ERROR",
                [format!("the chunk at {off} ended early")],
            ));
        }
        write_sparse(t, off, &buf)?;
        progress.advance(len as u64)?;
    }
}

fn import_vhd(
    r: &mut PipeReader,
    t: &ImportTarget,
    progress: &mut Progress,
) -> Result<(), ApiError> {
    let bad =
        |e: xenvault_formats::vhd::VhdError| ApiError::new("VDI_IO_ERROR", [format!("VHD: {e}")]);
    let mut dec = VhdDecoder::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size_checked = false;
    let apply = |extents: Vec<xenvault_types::Extent>| -> Result<(), ApiError> {
        for e in extents {
            // Only sectors present in the VHD are written; the target is prezeroed
            // (vhd-tool `serve_vhd_to_raw`), so absent ones are left alone.
            if let ExtentData::Data(d) = &e.data {
                write_sparse(t, e.offset, d)?;
            }
        }
        Ok(())
    };
    loop {
        let n = r.read(&mut buf).map_err(io_api_error)?;
        if n == 0 {
            break;
        }
        let extents = dec.feed(&buf[..n]).map_err(bad)?;
        if !size_checked && let Some(vs) = dec.footer().map(|f| f.current_size) {
            size_checked = true;
            if vs > t.size {
                return Err(ApiError::new(
                    "VDI_IO_ERROR",
                    [format!(
                        "the VHD is {vs} bytes, larger than the {}-byte VDI",
                        t.size
                    )],
                ));
            }
        }
        apply(extents)?;
        progress.advance(n as u64)?;
    }
    apply(dec.finish().map_err(bad)?)
}

/// `PUT /import_raw_vdi?vdi=&format=raw|vhd&chunked&task_id=` (or `sr_id=` + raw +
/// `Content-Length` for a new VDI).
pub async fn handle_import(pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let Some(begun) = begin_on_srs(&pool, &req, &mut conn, "VDI.import_raw_vdi", |p| {
        let mut srs = super::sr_of_vdi_param(p, &req, "vdi");
        if srs.is_empty()
            && let Some(sr) = req.param("sr_id")
            && let Ok(r) = p.db().resolve("SR", &sr)
        {
            srs.push(r);
        }
        srs
    })
    .await?
    else {
        return Ok(None);
    };
    let task = begun.task.clone();
    if req.has_transfer_encoding() {
        // xen-api ocaml/xapi/import_raw_vdi.ml: "Cannot handle encoding" → 404.
        let e = ApiError::internal("Cannot handle encoding");
        return fail_early(&pool, &mut conn, &task, e, 404).await;
    }
    let format = match parse_format(&req) {
        Ok(f) => f,
        Err(e) => return fail_early(&pool, &mut conn, &task, e, 404).await,
    };
    if matches!(format, Format::Tar | Format::Qcow2) {
        let e = ApiError::internal(format!(
            "import format {format:?} is not implemented by xapi-sim (docs/simulator.md)"
        ));
        return fail_early(&pool, &mut conn, &task, e, 500).await;
    }
    let target = match req.param("vdi") {
        Some(v) => vdi_info(&pool, &v).map_err(|e| (e, 500)),
        None => new_import_vdi(&pool, &req, format),
    };
    let vdi = match target {
        Ok(v) => v,
        Err((e, status)) => return fail_early(&pool, &mut conn, &task, e, status).await,
    };
    if !pool.disks.exists(&vdi.uuid) {
        let e = ApiError::new("VDI_MISSING", [vdi.sr.clone(), vdi.r.clone()]);
        return fail_early(&pool, &mut conn, &task, e, 500).await;
    }
    // xapi answers 200 with the task before it reads the body.
    conn.write_head(
        "HTTP/1.1",
        200,
        "OK",
        &[("Connection", "close"), ("task-id", &task)],
    )
    .await?;
    let space = {
        let db = pool.db();
        crate::api::storage::check_space(&pool, &db, &vdi.sr, 0)
    };
    if let Err(e) = space {
        let e = ApiError::new(
            &e.code,
            [
                vdi.size.to_string(),
                e.params.get(1).cloned().unwrap_or_default(),
            ],
        );
        pool.task_fail(&task, &e);
        let _ = conn.shutdown().await;
        return Ok(None);
    }
    let vbd = Dom0Vbd::plug(&pool, &req.host, &vdi.r, "RW", "import_raw_vdi");
    let chunked = req.has_query_key("chunked");
    let len = match (req.content_length(), format, chunked) {
        (Some(n), _, _) => BodyLen::Exactly(n),
        (None, Format::Raw, false) => BodyLen::Exactly(vdi.size),
        _ => BodyLen::UntilEof,
    };
    let expect = match len {
        BodyLen::Exactly(n) => n,
        BodyLen::UntilEof => vdi.size,
    };
    let t = ImportTarget {
        disks: pool.disks.clone(),
        uuid: vdi.uuid.clone(),
        size: vdi.size,
    };
    let mut progress = Progress::new(pool.clone(), &task, expect);
    let (result, end) = receive_stream(&pool, "import_raw_vdi", &mut conn, len, move |r| {
        match (format, chunked) {
            (Format::Raw, true) => import_chunked(r, &t, &mut progress),
            (Format::Raw, false) => import_raw(r, &t, expect, &mut progress),
            _ => import_vhd(r, &t, &mut progress),
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
        (Ok(()), _) => pool.task_complete(&task, &Value::str(&vdi.r).to_xml()),
        (Err(e), _) => pool.task_fail(&task, &e),
    }
    drop(vbd);
    {
        let mut db = pool.db();
        crate::api::storage::refresh_sr(&pool, &mut db, &vdi.sr);
    }
    let _ = conn.shutdown().await;
    drop(begun);
    Ok(None)
}

/// Without `vdi=`: `sr_id` + `format=raw` + `Content-Length` create "Imported VDI".
fn new_import_vdi(
    pool: &Arc<Pool>,
    req: &Request,
    format: Format,
) -> Result<VdiInfo, (ApiError, u16)> {
    if format != Format::Raw {
        return Err((
            ApiError::internal("import of a vhd or qcow2 without vdi= is not yet supported"),
            400,
        ));
    }
    let size = req.content_length().ok_or((
        ApiError::internal("a raw import without vdi= needs a Content-Length"),
        400,
    ))?;
    let sr_param = req
        .param("sr_id")
        .ok_or((ApiError::internal("missing vdi= or sr_id= parameter"), 400))?;
    let sr = resolve(pool, "SR", &sr_param).map_err(|e| (e, 500))?;
    {
        let db = pool.db();
        crate::api::storage::check_space(pool, &db, &sr, size).map_err(|e| (e, 500))?;
    }
    // SM rounds VDI sizes up to 2 MiB on VHD SRs (xapi-facts §5.3).
    let size = crate::api::vdi::round_size(size);
    let uuid = uuid::Uuid::new_v4().to_string();
    let sr_uuid = pool
        .db()
        .get("SR", &sr)
        .map(|r| r.str_of("uuid").to_string())
        .map_err(|e| (e, 500))?;
    pool.disks
        .create(&uuid, &sr_uuid, size)
        .map_err(|e| (disk_error(e), 500))?;
    let r = pool
        .db()
        .create(
            "VDI",
            [
                ("uuid", Value::str(&uuid)),
                ("name_label", Value::str("Imported VDI")),
                ("SR", Value::str(&sr)),
                ("virtual_size", Value::Int(size as i64)),
                ("type", Value::str("user")),
                ("managed", Value::Bool(true)),
                ("location", Value::str(&uuid)),
            ],
        )
        .map_err(|e| (e, 500))?;
    Ok(VdiInfo { r, uuid, sr, size })
}
