//! One disk written INTO an existing VDI, sending only the chunks that
//! differ: the VDI is read (NBD through `VDI.get_nbd_info`, else
//! `/export_raw_vdi?format=raw`), each chunk hashed with the repository's
//! keyed chunk id and compared with the restore point's index; the differing
//! chunks go to `PUT /import_raw_vdi?format=vhd` as a sparse VHD whose block
//! bitmaps mark only their sectors (zeros written explicitly where the
//! restore point has zeros). XAPI writes only marked sectors, so the rest of
//! the VDI is untouched (docs/xapi-notes.md, "Writing into an existing VDI").
//! A VDI attached to a running VM is refused.

use std::time::Instant;

use futures::StreamExt as _;
use serde::Serialize;
use xenvault_repo::{ChunkId, FixedIndex, Manifest, Repository};
use xenvault_types::ExtentData;
use xenvault_xapi::http::handler_url;
use xenvault_xapi::nbd::client::{NbdMultiReader, NbdOptions, NbdTls};
use xenvault_xapi::records::{NetworkPurpose, PowerState, Vdi, VdiRef, VdiType};
use xenvault_xapi::task::WaitOptions;

use super::encode::{
    DiskBody, VHD_BLOCK_SIZE, chunked_len, chunked_pieces, disk_upload_body, sparse_overlay_vhd,
    vhd_blocks_of_chunks, vhd_pieces,
};
use super::pool::put_raw_vdi;
use super::{DEFAULT_PARALLEL, RepoFailure, point_label, select_disk};
use crate::restore::connect::PoolConnection;
use crate::restore::{
    Cancel, DiskSelector, ProgressFn, RestoreError, RestorePhase, RestoreProgress,
};

/// How the existing VDI is read for the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadMethod {
    /// NBD when the pool offers it, else `/export_raw_vdi`.
    #[default]
    Auto,
    /// NBD only (`VDI.get_nbd_info`).
    Nbd,
    /// `/export_raw_vdi?format=raw` only.
    ExportRawVdi,
}

/// How to write a disk into an existing VDI.
#[derive(Debug, Clone)]
pub struct IntoVdiOptions {
    /// Which disk of the restore point.
    pub disk: DiskSelector,
    /// The existing VDI: uuid or ref.
    pub vdi: String,
    /// How to read it.
    pub read: ReadMethod,
    /// NBD connections for the read.
    pub nbd_connections: usize,
    /// Chunks fetched at once from the repository.
    pub parallel: usize,
    /// Stops the restore when set.
    pub cancel: Cancel,
}

impl IntoVdiOptions {
    /// Disk `disk` into VDI `vdi`, read as the pool allows.
    pub fn new(disk: DiskSelector, vdi: impl Into<String>) -> IntoVdiOptions {
        IntoVdiOptions {
            disk,
            vdi: vdi.into(),
            read: ReadMethod::Auto,
            nbd_connections: 4,
            parallel: DEFAULT_PARALLEL,
            cancel: Cancel::default(),
        }
    }
}

/// What writing into an existing VDI did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredInto {
    /// The restore point (`<vm name>/<id>`).
    pub source: String,
    /// The disk's key in it.
    pub disk_key: String,
    /// The VDI written into.
    pub vdi_ref: String,
    /// Its uuid.
    pub vdi_uuid: String,
    /// Its name.
    pub name: String,
    /// Bytes of the disk restored (the VDI may be larger: the rest is left
    /// as it was).
    pub size: u64,
    /// How the VDI was read: `nbd` or `export_raw_vdi`.
    pub read_method: String,
    /// Why NBD was not used (when `read_method` is not `nbd`).
    pub nbd_unavailable: Option<String>,
    /// Chunks compared.
    pub chunks_compared: u64,
    /// Chunks that differed and were written.
    pub chunks_written: u64,
    /// Of those, chunks written as zeros.
    pub zero_chunks_written: u64,
    /// Disk bytes written (the differing chunks).
    pub bytes_written: u64,
    /// Bytes sent (the VHD, or the `chunked` raw pieces).
    pub bytes_sent: u64,
    /// How the chunks were sent: `vhd` (a sparse VHD), `chunked` (raw
    /// pieces in XAPI's `chunked` framing, for disks XAPI takes no VHD of),
    /// or empty when nothing differed.
    pub upload_format: String,
    /// Bytes read from the VDI for the comparison.
    pub bytes_read: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// The VDI named by `choice` (uuid or ref).
async fn target_vdi(pool: &PoolConnection, choice: &str) -> Result<(VdiRef, Vdi), RestoreError> {
    let session = &pool.session;
    let vdi_ref = if choice.starts_with("OpaqueRef:") {
        VdiRef::new(choice)
    } else {
        session.vdi().get_by_uuid(choice).await.map_err(|e| {
            if e.is_code(&xenvault_xapi::error::ErrorCode::UuidInvalid) {
                RestoreError::BadTarget(format!("VDI {choice} does not exist on the pool"))
            } else {
                RestoreError::xapi(format!("cannot look up VDI {choice}"), e)
            }
        })?
    };
    let rec = session.vdi().get_record(&vdi_ref).await.map_err(|e| {
        if e.is_code(&xenvault_xapi::error::ErrorCode::HandleInvalid) {
            RestoreError::BadTarget(format!("VDI {choice} does not exist on the pool"))
        } else {
            RestoreError::xapi(format!("cannot read VDI {choice}"), e)
        }
    })?;
    Ok((vdi_ref, rec))
}

/// Refuses a VDI that must not be written: read-only, a snapshot, without
/// data, too small, or attached to a VM that is not halted.
async fn check_target(pool: &PoolConnection, vdi: &Vdi, size: u64) -> Result<(), RestoreError> {
    let who = format!("VDI {} ({})", vdi.uuid, vdi.name_label);
    if vdi.read_only || vdi.is_a_snapshot {
        return Err(RestoreError::BadTarget(format!(
            "{who} is {}: restore into a writable VDI, or into a new one (leave out --into)",
            if vdi.is_a_snapshot {
                "a snapshot"
            } else {
                "read-only"
            }
        )));
    }
    if vdi.type_ == VdiType::CbtMetadata {
        return Err(RestoreError::BadTarget(format!(
            "{who} holds no data (cbt_metadata): restore into a new VDI instead"
        )));
    }
    let vsize = u64::try_from(vdi.virtual_size).unwrap_or(0);
    if vsize < size {
        return Err(RestoreError::BadTarget(format!(
            "{who} has {vsize} bytes, the disk {size}: resize the VDI first or restore into a new one"
        )));
    }
    let session = &pool.session;
    for vbd_ref in &vdi.vbds {
        let vbd = match session.vbd().get_record(vbd_ref).await {
            Ok(v) => v,
            Err(e) if e.is_code(&xenvault_xapi::error::ErrorCode::HandleInvalid) => continue,
            Err(e) => return Err(RestoreError::xapi(format!("cannot read a VBD of {who}"), e)),
        };
        let vm = session
            .vm()
            .get_record(&vbd.vm)
            .await
            .map_err(|e| RestoreError::xapi(format!("cannot read the VM using {who}"), e))?;
        if vbd.currently_attached || vm.power_state != PowerState::Halted {
            return Err(RestoreError::BadTarget(format!(
                "{who} is attached to VM {} ({}), which is {:?}: shut the VM down first (writing under a running guest would corrupt its disk)",
                vm.uuid, vm.name_label, vm.power_state
            )));
        }
    }
    Ok(())
}

/// Cuts a stream of disk bytes into chunks and ids them.
struct ChunkIds {
    repo: Repository,
    index_len: u64,
    chunk_size: u64,
    size: u64,
    buf: Vec<u8>,
    pos: u64,
    ids: Vec<ChunkId>,
}

impl ChunkIds {
    fn new(repo: &Repository, index: &FixedIndex) -> ChunkIds {
        ChunkIds {
            repo: repo.clone(),
            index_len: index.ids.len() as u64,
            chunk_size: u64::from(index.chunk_size),
            size: index.disk_size,
            buf: Vec::with_capacity(index.chunk_size as usize),
            pos: 0,
            ids: Vec::with_capacity(index.ids.len()),
        }
    }

    fn want(&self) -> u64 {
        let chunk_start = self.ids.len() as u64 * self.chunk_size;
        self.chunk_size.min(self.size - chunk_start) - self.buf.len() as u64
    }

    async fn complete(&mut self) -> Result<(), RestoreError> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_size as usize));
        let repo = self.repo.clone();
        let id = tokio::task::spawn_blocking(move || repo.chunk_id(&data))
            .await
            .map_err(|e| RestoreError::BadTarget(format!("hashing stopped: {e}")))?;
        self.ids.push(id);
        Ok(())
    }

    /// Takes bytes (data, or `zeros` of them); ignores what is past the disk.
    async fn push(&mut self, mut data: &[u8], mut zeros: u64) -> Result<(), RestoreError> {
        while (self.ids.len() as u64) < self.index_len && (!data.is_empty() || zeros > 0) {
            let want = self.want();
            if !data.is_empty() {
                let n = (want as usize).min(data.len());
                self.buf.extend_from_slice(&data[..n]);
                data = &data[n..];
                self.pos += n as u64;
            } else {
                let n = want.min(zeros);
                self.buf.resize(self.buf.len() + n as usize, 0);
                zeros -= n;
                self.pos += n;
            }
            if self.want() == 0 {
                self.complete().await?;
            }
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.ids.len() as u64 == self.index_len
    }
}

/// True when NBD must run without TLS (the pool's networks say
/// `insecure_nbd` and none says `nbd`; docs/xapi-notes.md "NBD").
async fn nbd_without_tls(pool: &PoolConnection) -> bool {
    match pool.session.network().get_all_records().await {
        Ok(nets) => {
            let purposes: Vec<&NetworkPurpose> = nets.values().flat_map(|n| &n.purpose).collect();
            !purposes.contains(&&NetworkPurpose::Nbd)
                && purposes.contains(&&NetworkPurpose::InsecureNbd)
        }
        Err(_) => false,
    }
}

/// Opens NBD connections to `vdi`; `Err` = why NBD cannot be used.
async fn open_nbd(
    pool: &PoolConnection,
    vdi: &VdiRef,
    connections: usize,
) -> Result<NbdMultiReader, String> {
    let infos = pool
        .session
        .vdi()
        .get_nbd_info(vdi)
        .await
        .map_err(|e| format!("VDI.get_nbd_info failed: {e}"))?;
    if infos.is_empty() {
        return Err("VDI.get_nbd_info gave no address (no network of the pool has purpose nbd or insecure_nbd)".into());
    }
    let plain = nbd_without_tls(pool).await;
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
        match NbdMultiReader::connect(&options, connections.max(1)).await {
            Ok(r) => return Ok(r),
            Err(e) => last = format!("{}: {e}", options.address),
        }
    }
    Err(last)
}

fn report_read(progress: &ProgressFn, done: u64, total: u64) {
    progress(RestoreProgress {
        phase: RestorePhase::Verifying,
        done,
        total,
    });
}

/// Ids of the VDI's chunks, read over NBD.
async fn ids_over_nbd(
    reader: NbdMultiReader,
    hasher: &mut ChunkIds,
    progress: &ProgressFn,
    cancel: &Cancel,
) -> Result<u64, RestoreError> {
    let size = hasher.size;
    let mut read = 0u64;
    {
        // xapi-nbd takes whole sectors only (the export's end excepted).
        let end = size.next_multiple_of(512).min(reader.size().max(size));
        let mut stream = reader.read_ranges(std::iter::once(0..end));
        while let Some(next) = stream.next().await {
            if cancel.is_cancelled() {
                return Err(RestoreError::Cancelled);
            }
            let extent = next.map_err(|e| {
                RestoreError::BadTarget(format!("reading the VDI over NBD failed: {e}"))
            })?;
            match &extent.data {
                ExtentData::Data(d) => {
                    read += d.len() as u64;
                    hasher.push(d, 0).await?;
                }
                ExtentData::Zero(n) => hasher.push(&[], *n).await?,
            }
            report_read(progress, hasher.pos, size);
        }
    }
    reader.disconnect().await;
    Ok(read)
}

/// Ids of the VDI's chunks, read through `/export_raw_vdi?format=raw`.
async fn ids_over_http(
    pool: &PoolConnection,
    vdi: &VdiRef,
    hasher: &mut ChunkIds,
    progress: &ProgressFn,
    cancel: &Cancel,
) -> Result<u64, RestoreError> {
    let session = &pool.session;
    let size = hasher.size;
    let what = format!("reading VDI {vdi} through /export_raw_vdi");
    let task = session
        .create_task("xenvault restore: read the target VDI", "")
        .await
        .map_err(|e| RestoreError::xapi("cannot create the export task", e))?;
    let url = handler_url(
        &session.base_url(),
        "/export_raw_vdi",
        session.session_ref().expose(),
        Some(task.id()),
        &[("vdi", vdi.as_str()), ("format", "raw")],
    );
    let download = match pool.transfer.get(url).await {
        Ok(d) => d,
        Err(e) => {
            let _ = task.cancel().await;
            return Err(RestoreError::Http { what, source: e });
        }
    };
    let mut body = download.body;
    let mut read = 0u64;
    while let Some(piece) = body.next().await {
        if cancel.is_cancelled() {
            let _ = task.cancel().await;
            return Err(RestoreError::Cancelled);
        }
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                let _ = task.cancel().await;
                return Err(RestoreError::Http { what, source: e });
            }
        };
        read += piece.len() as u64;
        hasher.push(&piece, 0).await?;
        report_read(progress, hasher.pos, size);
    }
    drop(body);
    task.wait(&WaitOptions::default())
        .await
        .map_err(|e| RestoreError::xapi(&what, e))?;
    Ok(read)
}

/// Writes one disk of `manifest` into the existing VDI `options.vdi`,
/// sending only the chunks whose content differs from the restore point's.
/// Nothing is created on the pool. A failure while writing leaves the VDI
/// partly restored: the error says so; running the restore again finishes
/// it (only what still differs is sent).
pub async fn restore_repo_disk_into(
    pool: &PoolConnection,
    repo: &Repository,
    manifest: &Manifest,
    options: &IntoVdiOptions,
    progress: ProgressFn,
) -> Result<RestoredInto, RestoreError> {
    let started_at = Instant::now();
    let label = point_label(manifest);
    let disk = select_disk(manifest, &options.disk)?;
    let entry = manifest
        .disk(&disk.key)
        .map_err(|e| RestoreError::repo(format!("restore point {label}"), e))?;
    let index = repo
        .load_index(&entry.index)
        .await
        .map_err(|e| RestoreError::repo(format!("reading disk {} of {label}", disk.key), e))?;
    if index.disk_size != disk.size {
        return Err(RestoreError::repo(
            format!("reading disk {} of {label}", disk.key),
            xenvault_repo::RepoError::corrupt(&entry.index, "index size differs from the manifest"),
        ));
    }

    // 1. The target, checked.
    let (vdi_ref, vdi) = target_vdi(pool, &options.vdi).await?;
    check_target(pool, &vdi, disk.size).await?;

    // 2. Its chunks, hashed and compared.
    let mut hasher = ChunkIds::new(repo, &index);
    let mut nbd_unavailable = None;
    let nbd = match options.read {
        ReadMethod::ExportRawVdi => None,
        ReadMethod::Auto | ReadMethod::Nbd => {
            match open_nbd(pool, &vdi_ref, options.nbd_connections).await {
                Ok(r) => Some(r),
                Err(reason) if options.read == ReadMethod::Auto => {
                    tracing::info!(vdi = %vdi.uuid, "NBD unavailable ({reason}): reading through /export_raw_vdi");
                    nbd_unavailable = Some(reason);
                    None
                }
                Err(reason) => {
                    return Err(RestoreError::BadTarget(format!(
                        "VDI {} cannot be read over NBD: {reason}",
                        vdi.uuid
                    )));
                }
            }
        }
    };
    let read_method = if nbd.is_some() {
        "nbd"
    } else {
        "export_raw_vdi"
    };
    let bytes_read = match nbd {
        Some(reader) => ids_over_nbd(reader, &mut hasher, &progress, &options.cancel).await?,
        None => ids_over_http(pool, &vdi_ref, &mut hasher, &progress, &options.cancel).await?,
    };
    if !hasher.done() {
        return Err(RestoreError::BadTarget(format!(
            "VDI {} gave {} bytes where {} were expected",
            vdi.uuid, hasher.pos, disk.size
        )));
    }
    let differing = repo
        .chunks_differing(&index, &hasher.ids)
        .map_err(|e| RestoreError::repo("comparing the VDI's chunks", e))?;
    let zero_chunks_written = differing
        .iter()
        .filter(|&&c| index.ids[c as usize].is_zero())
        .count() as u64;
    let bytes_written: u64 = differing.iter().map(|&c| index.chunk_range(c).1).sum();
    let mut result = RestoredInto {
        source: label.clone(),
        disk_key: disk.key.clone(),
        vdi_ref: vdi_ref.as_str().to_string(),
        vdi_uuid: vdi.uuid.clone(),
        name: vdi.name_label.clone(),
        size: disk.size,
        read_method: read_method.to_string(),
        nbd_unavailable,
        chunks_compared: index.ids.len() as u64,
        chunks_written: differing.len() as u64,
        zero_chunks_written,
        bytes_written,
        bytes_sent: 0,
        upload_format: String::new(),
        bytes_read,
        seconds: 0.0,
    };
    if differing.is_empty() {
        result.seconds = started_at.elapsed().as_secs_f64();
        return Ok(result);
    }

    // 3. The differing chunks, as a sparse VHD; where XAPI takes no VHD
    // (over 2040 GiB, or a size that is not whole sectors) as raw pieces
    // in XAPI's `chunked` framing.
    let vhd_possible =
        disk.size.is_multiple_of(512) && disk.size <= xenvault_formats::vhd::MAX_WRITE_VIRTUAL_SIZE;
    let (enc, len) = if vhd_possible {
        let blocks = vhd_blocks_of_chunks(&index, differing.iter().copied(), VHD_BLOCK_SIZE);
        let enc =
            sparse_overlay_vhd(disk.size, &blocks).map_err(|reason| RestoreError::Unusable {
                dir: label.clone().into(),
                reason,
            })?;
        let len = enc.total_len();
        (Some(enc), len)
    } else {
        (None, chunked_len(&index, &differing))
    };
    let upload_format = if enc.is_some() { "vhd" } else { "chunked" };
    let chunk_size = u64::from(index.chunk_size);
    let failure = RepoFailure::default();
    let body = disk_upload_body(
        DiskBody {
            repo: repo.clone(),
            manifest: manifest.clone(),
            key: disk.key.clone(),
            chunks: Some(differing.clone()),
            parallel: options.parallel,
            failure: failure.clone(),
            progress: progress.clone(),
            cancel: options.cancel.clone(),
            len,
        },
        move |reader, emit| match enc {
            Some(enc) => vhd_pieces(reader, enc, emit),
            None => chunked_pieces(reader, chunk_size, emit),
        },
    );
    let what = format!(
        "writing {} differing chunks of disk {} of {label} into VDI {}",
        differing.len(),
        disk.describe(),
        vdi.uuid
    );
    put_raw_vdi(
        pool,
        &label,
        &vdi_ref,
        if upload_format == "vhd" {
            &[("format", "vhd")]
        } else {
            &[("format", "raw"), ("chunked", "true")]
        },
        body,
        len,
        &what,
        &progress,
        &options.cancel,
    )
    .await
    .map_err(|e| {
        let e = failure.explain(e);
        tracing::warn!(vdi = %vdi.uuid, "the write into the VDI failed: it may be partly restored");
        e
    })?;
    result.bytes_sent = len;
    result.upload_format = upload_format.to_string();
    result.seconds = started_at.elapsed().as_secs_f64();
    Ok(result)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use xenvault_repo::InitOptions;
    use xenvault_repo::storage::MemoryStorage;

    #[tokio::test]
    async fn chunk_ids_of_a_byte_stream() {
        let repo = Repository::init(
            std::sync::Arc::new(MemoryStorage::new()),
            InitOptions::default(),
        )
        .await
        .unwrap();
        let cs = 1u64 << 20;
        let size = 2 * cs + 4096;
        let index = FixedIndex::zeroed(size, cs as u32);
        let mut data = vec![0u8; size as usize];
        data[cs as usize + 5] = 7;
        data[size as usize - 1] = 9;
        let mut h = ChunkIds::new(&repo, &index);
        // Odd piece sizes, zeros as a run, and bytes past the disk ignored.
        h.push(&data[..1000], 0).await.unwrap();
        h.push(&[], cs - 1000).await.unwrap();
        h.push(&data[cs as usize..cs as usize + 77], 0)
            .await
            .unwrap();
        h.push(&data[cs as usize + 77..], 0).await.unwrap();
        h.push(&[1, 2, 3], 0).await.unwrap();
        assert!(h.done());
        assert_eq!(h.ids[0], ChunkId::ZERO);
        assert_eq!(h.ids[1], repo.chunk_id(&data[cs as usize..2 * cs as usize]));
        assert_eq!(h.ids[2], repo.chunk_id(&data[2 * cs as usize..]));
    }
}
