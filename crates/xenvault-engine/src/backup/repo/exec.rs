//! Carries out [`DiskReadPlan`]s: reads each disk of a snapshot over NBD
//! (several connections) or as a VHD export and feeds a repository
//! `DiskWriter`, several disks at once.
//!
//! A full NBD read covers only allocated data: xapi-nbd has no block status
//! (docs/xapi-notes.md "NBD"), so the allocated 2 MiB blocks come from the
//! BAT of a VHD export whose stream is closed right after the BAT (as Xen
//! Orchestra does; docs/xapi-notes.md "Repository backups"); a server with
//! `base:allocation` (qemu-nbd) also turns zero runs into zero extents.
//! When NBD cannot be reached the plan's `nbd_fallback` is used, and the
//! reason goes to the report.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt as _;
use xenvault_formats::vhd::{DecoderOptions, VhdDecoder};
use xenvault_repo::{DiskWriter, RestorePointWriter};
use xenvault_types::report::DiskReadReport;
use xenvault_types::{Extent, ExtentData};
use xenvault_xapi::http::handler_url;
use xenvault_xapi::nbd::client::{NbdMultiReader, NbdOptions, NbdTls};
use xenvault_xapi::records::NetworkPurpose;

use super::{DiskReadPlan, DiskSource, ReadMethod, RepoPipeline, VmContext};
use crate::backup::{Step, StepError};

/// What reading the disks of one VM gave.
#[derive(Debug)]
pub struct DisksRead {
    /// `Ok` when every disk was read and finished.
    pub result: Result<(), StepError>,
    /// A report per finished disk (in the order they finished).
    pub disks: Vec<DiskReadReport>,
}

/// Reads every disk with its plan, `disk_concurrency` at once; stops at the
/// first failure (the other disks' reads are dropped).
pub async fn execute_disks(
    ctx: &VmContext<'_>,
    writer: &RestorePointWriter,
    sources: &[DiskSource],
    plans: Vec<DiskReadPlan>,
) -> DisksRead {
    let done = AtomicU64::new(0);
    let n = ctx.p.settings.disk_concurrency.max(1) as usize;
    // A plain loop over `FuturesUnordered` (a `map` closure over borrowed
    // arguments is not provably `Send` for `tokio::spawn`).
    let mut pending = sources.iter().zip(plans);
    let mut running = futures::stream::FuturesUnordered::new();
    let mut out = DisksRead {
        result: Ok(()),
        disks: Vec::new(),
    };
    loop {
        while running.len() < n {
            let Some((disk, plan)) = pending.next() else {
                break;
            };
            running.push(execute_disk(ctx, writer, disk, plan, &done));
        }
        let Some(r) = running.next().await else {
            break;
        };
        match r {
            Ok(report) => out.disks.push(report),
            Err(e) => {
                out.result = Err(e);
                break;
            }
        }
    }
    drop(running);
    // Report disks in device order.
    out.disks
        .sort_by_key(|d| d.userdevice.parse::<u64>().unwrap_or(u64::MAX));
    out
}

fn read_err(disk: &DiskSource, what: impl std::fmt::Display) -> StepError {
    StepError {
        step: Step::DiskRead,
        detail: format!(
            "disk {} ({}): {what}",
            disk.meta.userdevice, disk.meta.vdi_uuid
        ),
    }
}

fn write_err(disk: &DiskSource, e: xenvault_repo::RepoError) -> StepError {
    StepError {
        step: Step::Write,
        detail: format!(
            "disk {} ({}): {e}",
            disk.meta.userdevice, disk.meta.vdi_uuid
        ),
    }
}

/// Reads one disk with `plan` into a new disk of `writer`.
pub async fn execute_disk(
    ctx: &VmContext<'_>,
    writer: &RestorePointWriter,
    disk: &DiskSource,
    plan: DiskReadPlan,
    done: &AtomicU64,
) -> Result<DiskReadReport, StepError> {
    let p = ctx.p;
    let mut plan = plan;
    let mut nbd = None;
    if plan.method.is_nbd() {
        match open_nbd(p, disk).await {
            Ok(r) => nbd = Some(r),
            Err(why) => {
                let Some(fallback) = plan.nbd_fallback.take() else {
                    return Err(read_err(disk, format!("NBD is unreachable: {why}")));
                };
                if fallback.parent_disk_key != plan.parent_disk_key || fallback.method.is_nbd() {
                    return Err(read_err(
                        disk,
                        "the NBD fallback plan is inconsistent (a bug)",
                    ));
                }
                tracing::warn!(
                    "{}: disk {}: NBD is unreachable ({why}); reading it with {} instead",
                    ctx.task.name,
                    disk.meta.userdevice,
                    fallback.method.label()
                );
                let reason = match &fallback.reason {
                    Some(r) => format!("NBD unreachable: {why}; {r}"),
                    None => format!("NBD unreachable: {why}"),
                };
                plan = *fallback;
                plan.reason = Some(reason);
            }
        }
    }
    let mut meta = serde_json::json!({
        "disk": serde_json::to_value(&disk.meta).unwrap_or(serde_json::Value::Null),
        "snapshot_vdi_uuid": disk.meta.vdi_uuid,
        "read": plan.method.label(),
    });
    if let (Some(reason), Some(obj)) = (&plan.reason, meta.as_object_mut()) {
        obj.insert("reason".into(), serde_json::Value::String(reason.clone()));
    }
    let size = disk.meta.virtual_size;
    // A resumed disk (INCREMENTAL's resume.rs) starts from its checkpoint,
    // checked now that the restore point's shared lock is held.
    let resumed = plan.start.is_some();
    let mut dw = match (plan.start.take(), &plan.parent_disk_key) {
        (Some(start), _) => {
            let (index, missing) = start
                .prepare(&p.repo)
                .await
                .map_err(|e| write_err(disk, e))?;
            if let Some(r) = plan.ranges.as_mut() {
                r.extend(missing);
            }
            writer
                .disk_from_index(&disk.key, index, start.parent_index.clone(), meta)
                .map_err(|e| write_err(disk, e))?
        }
        (None, None) => writer
            .full_disk(&disk.key, size, meta)
            .map_err(|e| write_err(disk, e))?,
        (None, Some(parent_key)) => writer
            .incremental_disk(&disk.key, size, parent_key, meta)
            .await
            .map_err(|e| write_err(disk, e))?,
    };
    let incremental = plan.is_incremental();
    // Zero extents must be fed when the starting index is not all zero.
    let feed_zeros = incremental || resumed;
    let mut bytes_read = 0u64;
    match (plan.method, nbd) {
        (ReadMethod::NbdFull | ReadMethod::NbdCbt, Some(reader)) => {
            let ranges = match plan.ranges.take() {
                Some(r) => r,
                None => match allocated_ranges(p, disk, &mut bytes_read).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(
                            "{}: disk {}: cannot read the allocation map ({e}); reading the whole disk",
                            ctx.task.name,
                            disk.meta.userdevice
                        );
                        std::iter::once(0..size).collect()
                    }
                },
            };
            let r = read_nbd(ctx, disk, &reader, ranges, &mut dw, feed_zeros, done).await;
            reader.disconnect().await;
            if r.is_err()
                && let Some(rec) = ctx.resume
            {
                rec.failed(disk, &mut dw).await;
            }
            bytes_read += r?;
            if let Some(rec) = ctx.resume {
                rec.finishing(disk, &mut dw).await;
            }
        }
        (ReadMethod::VhdFull | ReadMethod::VhdDiff, _) => {
            bytes_read += read_vhd(
                ctx,
                disk,
                plan.vhd_base.as_deref(),
                &mut dw,
                incremental,
                done,
            )
            .await?;
        }
        (_, None) => return Err(read_err(disk, "no NBD connection (a bug)")),
    }
    let entry = dw.finish().await.map_err(|e| write_err(disk, e))?;
    Ok(DiskReadReport {
        key: disk.key.clone(),
        userdevice: disk.meta.userdevice.clone(),
        name: disk.meta.name.clone(),
        size,
        method: plan.method.label().to_string(),
        reason: plan.reason.clone(),
        incremental,
        bytes_read,
        bytes_stored: entry.stats.bytes_stored,
        new_chunks: entry.stats.new_chunks,
        dedup_chunks: entry.stats.dedup_chunks,
        zero_chunks: entry.stats.zero_chunks,
    })
}

/// True when NBD must run without TLS: the pool's networks say
/// `insecure_nbd` and none says `nbd` (xapi-nbd decides TLS from the network
/// purposes, not from the `cert` of `VDI.get_nbd_info`; docs/xapi-notes.md "NBD").
async fn nbd_without_tls(p: &RepoPipeline) -> bool {
    match p.session.network().get_all_records().await {
        Ok(nets) => {
            let purposes: Vec<&NetworkPurpose> = nets.values().flat_map(|n| &n.purpose).collect();
            !purposes.contains(&&NetworkPurpose::Nbd)
                && purposes.contains(&&NetworkPurpose::InsecureNbd)
        }
        Err(e) => {
            tracing::warn!("cannot read the pool's networks to choose NBD TLS: {e}");
            false
        }
    }
}

/// Opens `nbd_connections` connections to the snapshot VDI, trying each
/// address of `VDI.get_nbd_info`. `Err` = NBD unreachable, with the reason.
async fn open_nbd(p: &RepoPipeline, disk: &DiskSource) -> Result<NbdMultiReader, String> {
    let infos = p
        .session
        .vdi()
        .get_nbd_info(&disk.snapshot_vdi)
        .await
        .map_err(|e| format!("VDI.get_nbd_info failed: {e}"))?;
    if infos.is_empty() {
        return Err(
            "VDI.get_nbd_info gave no address (no network of the pool has purpose nbd or insecure_nbd, or no host sees the SR)"
                .into(),
        );
    }
    let plain = nbd_without_tls(p).await;
    let count = p.settings.nbd_connections.max(1) as usize;
    let mut last = String::new();
    for info in &infos {
        let mut options = match NbdOptions::from_record(info) {
            Ok(o) => o,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        if plain {
            options.tls = NbdTls::Off;
        }
        match NbdMultiReader::connect(&options, count).await {
            // Pieces of one chunk, aligned with the chunks wherever the ranges
            // are: the writer takes each whole chunk's buffer without a copy.
            Ok(r) => return Ok(r.with_piece_size(u64::from(p.repo.chunk_size()))),
            Err(e) => last = format!("{}: {e}", options.address),
        }
    }
    Err(last)
}

/// Reads `ranges` over NBD into `dw`; returns the data bytes read. Zero
/// extents are skipped on full disks (unfed ranges read as zero) and fed on
/// incremental ones (the range changed to zeros).
async fn read_nbd(
    ctx: &VmContext<'_>,
    disk: &DiskSource,
    reader: &NbdMultiReader,
    ranges: Vec<Range<u64>>,
    dw: &mut DiskWriter,
    incremental: bool,
    done: &AtomicU64,
) -> Result<u64, StepError> {
    let mut read = 0u64;
    let mut stream = reader.read_ranges(ranges);
    while let Some(next) = stream.next().await {
        let extent = next.map_err(|e| read_err(disk, format!("NBD read: {e}")))?;
        let len = extent.len();
        let is_zero = matches!(extent.data, ExtentData::Zero(_));
        if !is_zero {
            read += len;
        }
        advance(ctx, done, len);
        if is_zero && !incremental {
            continue;
        }
        dw.write_extent(extent)
            .await
            .map_err(|e| write_err(disk, e))?;
        if let Some(rec) = ctx.resume {
            rec.fed(disk, dw, len).await;
        }
    }
    Ok(read)
}

fn advance(ctx: &VmContext<'_>, done: &AtomicU64, len: u64) {
    let now = done.fetch_add(len, Ordering::Relaxed) + len;
    ctx.p.progress.advanced(&ctx.task.name, now);
}

fn vhd_decoder() -> VhdDecoder {
    VhdDecoder::with_options(DecoderOptions {
        allow_fixed: false,
        ..DecoderOptions::default()
    })
}

/// Starts `/export_raw_vdi?format=vhd[&base=]` of the snapshot VDI in a task.
async fn start_vhd_export(
    p: &RepoPipeline,
    disk: &DiskSource,
    base: Option<&str>,
    label: &str,
) -> Result<
    (
        xenvault_xapi::task::TaskGuard,
        xenvault_xapi::http::Download,
    ),
    String,
> {
    let session = &p.session;
    let guard = session
        .create_task(label, "xenvault backup")
        .await
        .map_err(|e| e.to_string())?;
    let mut params = vec![("vdi", disk.meta.vdi_uuid.as_str()), ("format", "vhd")];
    if let Some(b) = base {
        params.push(("base", b));
    }
    let url = handler_url(
        &session.base_url(),
        "/export_raw_vdi",
        session.session_ref().expose(),
        Some(guard.id()),
        &params,
    );
    match p.transfer.get(url).await {
        Ok(d) => Ok((guard, d)),
        Err(e) => {
            let detail = match guard.wait(&p.wait).await {
                Err(task_err) => format!("{task_err} ({e})"),
                Ok(_) => e.to_string(),
            };
            Err(detail)
        }
    }
}

/// The allocated 2 MiB blocks of the disk, from the BAT of a VHD export
/// (the stream is closed once the BAT is read). `received` counts the bytes.
async fn allocated_ranges(
    p: &RepoPipeline,
    disk: &DiskSource,
    received: &mut u64,
) -> Result<Vec<Range<u64>>, String> {
    let label = format!("xenvault: allocation map of VDI {}", disk.meta.vdi_uuid);
    let (guard, download) = start_vhd_export(p, disk, None, &label).await?;
    let mut body = download.body;
    let mut decoder = vhd_decoder();
    let mut ranges: Option<Vec<Range<u64>>> = None;
    let size = disk.meta.virtual_size;
    while let Some(piece) = body.next().await {
        let bytes = piece.map_err(|e| e.to_string())?;
        *received += bytes.len() as u64;
        decoder
            .feed(&bytes)
            .map_err(|e| format!("the VHD is invalid: {e}"))?;
        if let Some(layout) = decoder.layout() {
            let bs = u64::from(layout.block_size());
            let mut out: Vec<Range<u64>> = Vec::new();
            for i in 0..layout.block_count() {
                if layout.block_location(i).is_none() {
                    continue;
                }
                let start = u64::from(i) * bs;
                let end = (start + bs).min(size);
                if start >= end {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => out.push(start..end),
                }
            }
            ranges = Some(out);
            break;
        }
    }
    drop(body);
    guard.abandon().await;
    ranges.ok_or_else(|| "the VHD export ended before its block table".to_string())
}

/// Reads the disk as a VHD export (`base=` for a differencing one) into
/// `dw`; returns the bytes received. The task's outcome decides.
async fn read_vhd(
    ctx: &VmContext<'_>,
    disk: &DiskSource,
    base: Option<&str>,
    dw: &mut DiskWriter,
    incremental: bool,
    done: &AtomicU64,
) -> Result<u64, StepError> {
    let p = ctx.p;
    let label = format!(
        "xenvault: export of {} disk {}",
        ctx.task.name, disk.meta.userdevice
    );
    let (guard, download) = start_vhd_export(p, disk, base, &label)
        .await
        .map_err(|e| read_err(disk, format!("VHD export start: {e}")))?;
    let mut body = download.body;
    let mut decoder = vhd_decoder();
    let mut received = 0u64;
    let mut failed: Option<StepError> = None;
    'stream: while let Some(piece) = body.next().await {
        let bytes = match piece {
            Ok(b) => b,
            Err(e) => {
                failed = Some(read_err(disk, format!("VHD export stream: {e}")));
                break;
            }
        };
        received += bytes.len() as u64;
        let extents = match decoder.feed(&bytes) {
            Ok(x) => x,
            Err(e) => {
                failed = Some(read_err(disk, format!("the VHD is invalid: {e}")));
                break;
            }
        };
        for e in extents {
            if let Err(err) = feed(ctx, dw, e, incremental, done).await {
                failed = Some(write_err(disk, err));
                break 'stream;
            }
        }
    }
    if failed.is_none() {
        match decoder.finish() {
            Ok(rest) => {
                for e in rest {
                    if let Err(err) = feed(ctx, dw, e, incremental, done).await {
                        failed = Some(write_err(disk, err));
                        break;
                    }
                }
            }
            Err(e) => failed = Some(read_err(disk, format!("the VHD ended early: {e}"))),
        }
    }
    drop(body);
    match failed {
        None => guard
            .wait(&p.wait)
            .await
            .map(|_| received)
            .map_err(|e| read_err(disk, format!("VHD export: {e}"))),
        Some(err) => {
            guard.abandon().await;
            Err(err)
        }
    }
}

async fn feed(
    ctx: &VmContext<'_>,
    dw: &mut DiskWriter,
    e: Extent,
    incremental: bool,
    done: &AtomicU64,
) -> Result<(), xenvault_repo::RepoError> {
    advance(ctx, done, e.len());
    if !incremental && matches!(e.data, ExtentData::Zero(_)) {
        return Ok(());
    }
    dw.write_extent(e).await
}
