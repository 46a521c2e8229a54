//! The data producers of repository restores: a disk's extents pulled from
//! a [`DiskReader`] on a blocking thread and turned into raw bytes, a VHD
//! (dynamic, or differencing holding only some chunks) or an XVA (the VM's
//! `ova.xml` rebuilt from the manifest's records, through the archive
//! restore's [`encode_xva`]).

use std::collections::BTreeSet;
use std::io;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::runtime::Handle;
use xenvault_formats::vhd::{DEFAULT_BLOCK_SIZE, ParentSpec, VhdEncoder, VhdSpec};
use xenvault_formats::xva::{ChecksumKind, OvaXml};
use xenvault_repo::{DiskReader, FixedIndex, Manifest, Repository};
use xenvault_types::{Extent, ExtentData};

use super::{RepoDisk, RepoFailure, point_label, repo_disks};
use crate::restore::content::{Sink, blocking_stream, send};
use crate::restore::rebuild::{encode_xva, ova_from_records, records_from_json};
use crate::restore::{Cancel, ProgressFn, RestoreError, RestorePhase, RestoreProgress};

/// Pieces of zeros sent for holes (never copied).
const ZERO_PIECE: usize = 1 << 20;
static ZEROS: [u8; ZERO_PIECE] = [0u8; ZERO_PIECE];

/// A repository disk read from a blocking thread: each extent is awaited on
/// the runtime of `handle`. Repository errors are kept in the restore's
/// [`RepoFailure`] and come out as I/O errors.
pub(crate) struct BlockingDisk {
    handle: Handle,
    reader: DiskReader,
    what: String,
    failure: RepoFailure,
    carry: Option<Extent>,
    pos: u64,
}

impl BlockingDisk {
    /// Opens disk `key` of `manifest` (only the chunks `chunks`, when given).
    pub(crate) fn open(
        handle: Handle,
        repo: &Repository,
        manifest: &Manifest,
        key: &str,
        chunks: Option<Vec<u64>>,
        parallel: usize,
        failure: RepoFailure,
    ) -> io::Result<BlockingDisk> {
        let what = format!(
            "reading disk {key} of restore point {}",
            point_label(manifest)
        );
        let reader = handle
            .block_on(repo.read_disk_chunks(manifest, key, chunks, parallel))
            .map_err(|e| failure.record(&what, e))?;
        Ok(BlockingDisk {
            handle,
            reader,
            what,
            failure,
            carry: None,
            pos: 0,
        })
    }

    /// The next extent, `None` at the end.
    pub(crate) fn next(&mut self) -> io::Result<Option<Extent>> {
        if let Some(e) = self.carry.take() {
            return Ok(Some(e));
        }
        match self.handle.block_on(self.reader.next_extent()) {
            None => Ok(None),
            Some(Ok(e)) => {
                if e.offset < self.pos {
                    return Err(io::Error::other(format!(
                        "{}: extent at {} after {}",
                        self.what, e.offset, self.pos
                    )));
                }
                self.pos = e.end();
                Ok(Some(e))
            }
            Some(Err(e)) => Err(self.failure.record(&self.what, e)),
        }
    }

    /// The next extent if it starts before `end` (cut at `end`; the rest is
    /// kept for the next call), else `None`.
    pub(crate) fn next_before(&mut self, end: u64) -> io::Result<Option<Extent>> {
        match self.next()? {
            None => Ok(None),
            Some(e) if e.offset >= end => {
                self.carry = Some(e);
                Ok(None)
            }
            Some(e) if e.end() > end => {
                let (head, tail) = split_extent(e, end);
                self.carry = Some(tail);
                Ok(Some(head))
            }
            Some(e) => Ok(Some(e)),
        }
    }

    /// The extents (cut at `end`) that start before `end`, collected: for
    /// short ranges only (one VHD block); stream longer ones with
    /// [`BlockingDisk::next_before`].
    pub(crate) fn take_until(&mut self, end: u64) -> io::Result<Vec<Extent>> {
        let mut out = Vec::new();
        while let Some(e) = self.next_before(end)? {
            out.push(e);
        }
        Ok(out)
    }
}

/// Cuts `e` at disk offset `at` (inside it).
pub(crate) fn split_extent(e: Extent, at: u64) -> (Extent, Extent) {
    let k = at - e.offset;
    match e.data {
        ExtentData::Data(mut d) => {
            let tail = d.split_off(k as usize);
            (Extent::data(e.offset, d), Extent::data(at, tail))
        }
        ExtentData::Zero(n) => (Extent::zero(e.offset, k), Extent::zero(at, n - k)),
    }
}

/// Sends `len` zero bytes in static pieces.
pub(crate) fn emit_zeros(
    mut len: u64,
    emit: &mut dyn FnMut(Bytes) -> io::Result<()>,
) -> io::Result<()> {
    while len > 0 {
        let step = len.min(ZERO_PIECE as u64) as usize;
        emit(Bytes::from_static(&ZEROS[..step]))?;
        len -= step as u64;
    }
    Ok(())
}

/// The disk an upload sends, and how its body is produced and reported.
pub(crate) struct DiskBody {
    pub repo: Repository,
    pub manifest: Manifest,
    pub key: String,
    /// Only these chunks (by index), or the whole disk.
    pub chunks: Option<Vec<u64>>,
    pub parallel: usize,
    pub failure: RepoFailure,
    pub progress: ProgressFn,
    pub cancel: Cancel,
    /// The bytes the body must hold (announced to XAPI beforehand).
    pub len: u64,
}

/// The HTTP body of one disk's upload: on a blocking thread, `encode`
/// turns the disk's extents into pieces (raw, chunked or VHD), each sent
/// with the restore's progress; a body of any other length than `len` ends
/// with an error rather than an upload XAPI would take short.
pub(crate) fn disk_upload_body<F>(
    body: DiskBody,
    encode: F,
) -> BoxStream<'static, io::Result<Bytes>>
where
    F: FnOnce(&mut BlockingDisk, &mut dyn FnMut(Bytes) -> io::Result<()>) -> io::Result<u64>
        + Send
        + 'static,
{
    let DiskBody {
        repo,
        manifest,
        key,
        chunks,
        parallel,
        failure,
        progress,
        cancel,
        len,
    } = body;
    blocking_stream(cancel, move |tx| {
        let mut reader = BlockingDisk::open(
            Handle::current(),
            &repo,
            &manifest,
            &key,
            chunks,
            parallel.max(1),
            failure,
        )?;
        let produced = encode(&mut reader, &mut sending(tx, &progress, len))?;
        if produced != len {
            return Err(io::Error::other(format!(
                "{produced} bytes produced where {len} were announced"
            )));
        }
        Ok(())
    })
    .boxed()
}

/// An `emit` for the producers below: sends each piece into an upload's
/// body and reports the bytes sent so far against `total`.
pub(crate) fn sending<'a>(
    sink: &'a Sink,
    progress: &'a ProgressFn,
    total: u64,
) -> impl FnMut(Bytes) -> io::Result<()> + 'a {
    let mut done = 0u64;
    move |piece: Bytes| {
        done += piece.len() as u64;
        send(sink, piece)?;
        progress(RestoreProgress {
            phase: RestorePhase::Uploading,
            done,
            total,
        });
        Ok(())
    }
}

/// The whole disk as raw bytes, exactly `size` of them (holes as zeros).
pub(crate) fn raw_pieces(
    disk: &mut BlockingDisk,
    size: u64,
    emit: &mut dyn FnMut(Bytes) -> io::Result<()>,
) -> io::Result<u64> {
    let mut done = 0u64;
    while let Some(e) = disk.next_before(size)? {
        if e.offset > done {
            emit_zeros(e.offset - done, emit)?;
        }
        done = e.end();
        match e.data {
            ExtentData::Data(d) => emit(Bytes::from(d))?,
            ExtentData::Zero(n) => emit_zeros(n, emit)?,
        }
    }
    if done < size {
        emit_zeros(size - done, emit)?;
    }
    Ok(size)
}

/// Length of the `chunked` upload of the chunks `chunks` (see
/// [`chunked_pieces`]).
pub fn chunked_len(index: &FixedIndex, chunks: &[u64]) -> u64 {
    chunks
        .iter()
        .map(|&c| CHUNKED_HEADER + index.chunk_range(c).1)
        .sum::<u64>()
        + CHUNKED_HEADER
}

/// Bytes of a `chunked` piece header.
const CHUNKED_HEADER: u64 = 12;

/// XAPI's `chunked` framing of raw data for `/import_raw_vdi?chunked`:
/// per piece `{u64 offset LE, u32 length LE}` then the bytes, and `{0, 0}`
/// at the end (xapi-facts §3.5; xen-api `ocaml/vhd-tool/src/chunked.ml`).
/// One piece per chunk of `chunk_size` (zeros written out), so the length
/// is [`chunked_len`]. Returns the bytes produced.
pub(crate) fn chunked_pieces(
    disk: &mut BlockingDisk,
    chunk_size: u64,
    emit: &mut dyn FnMut(Bytes) -> io::Result<()>,
) -> io::Result<u64> {
    let mut done = 0u64;
    while let Some(mut e) = disk.next()? {
        loop {
            let boundary = (e.offset / chunk_size + 1) * chunk_size;
            let (piece, rest) = if e.end() > boundary {
                let (a, b) = split_extent(e, boundary);
                (a, Some(b))
            } else {
                (e, None)
            };
            let len = u32::try_from(piece.len())
                .map_err(|_| io::Error::other("a chunk larger than 4 GiB"))?;
            let mut header = Vec::with_capacity(CHUNKED_HEADER as usize);
            header.extend_from_slice(&piece.offset.to_le_bytes());
            header.extend_from_slice(&len.to_le_bytes());
            emit(Bytes::from(header))?;
            match piece.data {
                ExtentData::Data(d) => emit(Bytes::from(d))?,
                ExtentData::Zero(n) => emit_zeros(n, emit)?,
            }
            done += CHUNKED_HEADER + u64::from(len);
            match rest {
                Some(r) => e = r,
                None => break,
            }
        }
    }
    emit(Bytes::from_static(&[0u8; CHUNKED_HEADER as usize]))?;
    Ok(done + CHUNKED_HEADER)
}

/// The VHD blocks of `block_size` holding a chunk with data (a non-zero id).
pub fn vhd_blocks_of_index(index: &FixedIndex, block_size: u32) -> Vec<u32> {
    vhd_blocks_of_chunks(
        index,
        (0..index.ids.len() as u64).filter(|&c| !index.ids[c as usize].is_zero()),
        block_size,
    )
}

/// The VHD blocks of `block_size` the chunks `chunks` lie in, ascending.
pub fn vhd_blocks_of_chunks(
    index: &FixedIndex,
    chunks: impl IntoIterator<Item = u64>,
    block_size: u32,
) -> Vec<u32> {
    let bs = u64::from(block_size);
    let mut blocks = BTreeSet::new();
    for c in chunks {
        let (off, len) = index.chunk_range(c);
        if len == 0 {
            continue;
        }
        for b in off / bs..=(off + len - 1) / bs {
            blocks.insert(b as u32);
        }
    }
    blocks.into_iter().collect()
}

fn vhd_error(e: xenvault_formats::vhd::VhdError) -> io::Error {
    io::Error::other(format!("VHD encoder: {e}"))
}

/// A dynamic VHD of a disk of `size` bytes holding the blocks `blocks`.
pub(crate) fn dynamic_vhd(size: u64, blocks: &[u32]) -> Result<VhdEncoder, String> {
    if !size.is_multiple_of(512) {
        return Err(format!(
            "the disk's size {size} is not a multiple of 512 bytes: it cannot be written as a VHD; use raw"
        ));
    }
    VhdEncoder::new(
        VhdSpec::dynamic(size, uuid::Uuid::new_v4()),
        blocks.iter().copied(),
    )
    .map_err(|e| format!("cannot write a VHD of this disk: {e}"))
}

/// A differencing VHD of a disk of `size` bytes holding exactly the
/// sectors of the extents given to it later (block bitmaps mark only those;
/// XAPI writes only marked sectors: docs/xapi-notes.md "Writing into an
/// existing VDI").
pub(crate) fn sparse_overlay_vhd(size: u64, blocks: &[u32]) -> Result<VhdEncoder, String> {
    if !size.is_multiple_of(512) {
        return Err(format!(
            "the disk's size {size} is not a multiple of 512 bytes: it cannot be written as a VHD"
        ));
    }
    let parent = ParentSpec {
        unique_id: uuid::Uuid::nil(),
        timestamp: 0,
        unicode_name: "xenvault-restore-target".into(),
        locators: Vec::new(),
    };
    VhdEncoder::new(
        VhdSpec::differencing(size, uuid::Uuid::new_v4(), parent),
        blocks.iter().copied(),
    )
    .map_err(|e| format!("cannot write a VHD of these chunks: {e}"))
}

/// Writes the VHD of `enc` with the disk's extents: the prologue, each
/// allocated block from the extents inside it, the footer. Extents outside
/// the allocated blocks must be zeros. Returns the bytes produced.
pub(crate) fn vhd_pieces(
    disk: &mut BlockingDisk,
    mut enc: VhdEncoder,
    emit: &mut dyn FnMut(Bytes) -> io::Result<()>,
) -> io::Result<u64> {
    let bs = u64::from(enc.block_size());
    let mut done = 0u64;
    let prologue = enc.prologue().to_vec();
    done += prologue.len() as u64;
    emit(Bytes::from(prologue))?;
    while let Some(b) = enc.next_block() {
        let start = u64::from(b) * bs;
        while let Some(skipped) = disk.next_before(start)? {
            if let ExtentData::Data(d) = &skipped.data
                && !xenvault_types::extent::is_all_zero(d)
            {
                return Err(io::Error::other(format!(
                    "data at {} lies outside the VHD's allocated blocks",
                    skipped.offset
                )));
            }
        }
        let extents = disk.take_until(start + bs)?;
        let piece = enc.encode_block_extents(b, &extents).map_err(vhd_error)?;
        done += piece.len() as u64;
        emit(Bytes::from(piece))?;
    }
    let footer = enc.finish().map_err(vhd_error)?;
    done += footer.len() as u64;
    emit(Bytes::copy_from_slice(&footer))?;
    Ok(done)
}

/// The block size of the VHDs written.
pub const VHD_BLOCK_SIZE: u32 = DEFAULT_BLOCK_SIZE;

/// The `ova.xml` of the restore point's VM (from `vm_records`, the same
/// document as an archive's `vm.json`) and, per disk of it in order, the
/// repository disk holding its data.
pub fn manifest_ova(manifest: &Manifest) -> Result<(OvaXml, Vec<RepoDisk>), RestoreError> {
    let unusable = |reason: String| RestoreError::Unusable {
        dir: point_label(manifest).into(),
        reason,
    };
    let records = records_from_json(&manifest.vm_records).map_err(|e| {
        unusable(format!(
            "{e}: the VM cannot be rebuilt; restore its disks one by one instead"
        ))
    })?;
    let disks = repo_disks(manifest);
    let record_uuids: BTreeSet<String> = records
        .vdis
        .iter()
        .filter_map(|(_, v)| v.get("uuid").and_then(|u| u.as_str().ok()))
        .map(str::to_ascii_lowercase)
        .collect();
    // The records hold the snapshot's VDIs; a disk is matched by the
    // snapshot VDI it was read from (or, for restore points written
    // without one, by its key or live VDI's uuid).
    let uuid_of = |d: &RepoDisk| -> Option<String> {
        [
            d.snapshot_vdi_uuid.clone(),
            Some(d.key.to_ascii_lowercase()),
            d.source_vdi_uuid.clone(),
        ]
        .into_iter()
        .flatten()
        .find(|u| record_uuids.contains(u))
    };
    let mut kept = BTreeSet::new();
    for d in &disks {
        match uuid_of(d) {
            Some(u) => {
                kept.insert(u);
            }
            None => {
                return Err(unusable(format!(
                    "disk {} has no VDI record among the VM's records: restore it on its own",
                    d.describe()
                )));
            }
        }
    }
    let ova = ova_from_records(records, &kept).map_err(unusable)?;
    let ova_disks = ova
        .disks()
        .map_err(|e| unusable(format!("the rebuilt ova.xml: {e}")))?;
    let mut order = Vec::new();
    for od in &ova_disks {
        let d = disks
            .iter()
            .find(|d| uuid_of(d).as_deref() == Some(&od.vdi_uuid.to_ascii_lowercase()))
            .ok_or_else(|| {
                unusable(format!(
                    "disk {} of the VM's records is not in the restore point",
                    od.vdi_uuid
                ))
            })?;
        if d.size != od.virtual_size {
            return Err(unusable(format!(
                "disk {} holds {} bytes but its VDI record says {}",
                d.describe(),
                d.size,
                od.virtual_size
            )));
        }
        order.push(d.clone());
    }
    Ok((ova, order))
}

/// Writes the XVA of `ova` with the data of `disks` (one per `ova.xml`
/// disk, in order), piece by piece to `emit`. Blocking.
#[allow(clippy::too_many_arguments)] // the reading context and the sink
pub(crate) fn xva_pieces(
    handle: &Handle,
    repo: &Repository,
    manifest: &Manifest,
    ova: &OvaXml,
    disks: &[RepoDisk],
    parallel: usize,
    failure: &RepoFailure,
    checksum: ChecksumKind,
    emit: &mut dyn FnMut(Bytes) -> io::Result<()>,
) -> io::Result<u64> {
    encode_xva(
        ova,
        checksum,
        &mut |i, xdisk, sink| {
            let d = disks.get(i).ok_or_else(|| {
                io::Error::other(format!("no repository disk for {}", xdisk.vdi_uuid))
            })?;
            let mut disk = BlockingDisk::open(
                handle.clone(),
                repo,
                manifest,
                &d.key,
                None,
                parallel,
                failure.clone(),
            )?;
            while let Some(e) = disk.next_before(xdisk.virtual_size)? {
                sink(e)?;
            }
            Ok(())
        },
        &mut |piece| emit(Bytes::from(piece)),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use xenvault_repo::ChunkId;

    #[test]
    fn blocks_of_chunks() {
        let mut idx = FixedIndex::zeroed(10 << 20, 1 << 20);
        idx.ids[0] = ChunkId([1; 32]);
        idx.ids[3] = ChunkId([2; 32]);
        idx.ids[9] = ChunkId([3; 32]);
        assert_eq!(vhd_blocks_of_index(&idx, 2 << 20), vec![0, 1, 4]);
        assert_eq!(vhd_blocks_of_chunks(&idx, [2, 3, 4], 2 << 20), vec![1, 2]);
        let big = FixedIndex::zeroed(9 << 20, 4 << 20);
        assert_eq!(vhd_blocks_of_chunks(&big, [1, 2], 2 << 20), vec![2, 3, 4]);
    }

    #[test]
    fn split() {
        let (a, b) = split_extent(Extent::data(10, vec![1, 2, 3, 4]), 12);
        assert_eq!(a, Extent::data(10, vec![1, 2]));
        assert_eq!(b, Extent::data(12, vec![3, 4]));
        let (a, b) = split_extent(Extent::zero(0, 10), 4);
        assert_eq!((a.len(), b.offset, b.len()), (4, 4, 6));
    }
}
