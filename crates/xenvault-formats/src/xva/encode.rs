//! The streaming XVA encoder: `ova.xml` and disk extents in, tar bytes out.

use std::collections::VecDeque;

use sha1::{Digest, Sha1};
use xenvault_types::extent::is_all_zero;
use xenvault_types::{Extent, ExtentData};

use super::ova::{OvaXml, XvaDisk};
use super::{CHUNK_SIZE, ChecksumKind, XvaError};
use crate::tar;

/// Encoder settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XvaEncoderOptions {
    /// `.xxhash` (xapi ≥ 1.170, the default) or legacy `.checksum` (SHA-1).
    pub checksum: ChecksumKind,
    /// The tar mtime of `ova.xml`, seconds since the epoch (xapi writes "now";
    /// chunks always get 0). `None` = the current time.
    pub ova_mtime: Option<u64>,
    /// Leave out all-zero chunks other than each disk's first and last, as
    /// xapi does. Off = write every chunk (what `xva-img` does).
    pub omit_zero_chunks: bool,
}

impl Default for XvaEncoderOptions {
    fn default() -> Self {
        XvaEncoderOptions {
            checksum: ChecksumKind::XxHash,
            ova_mtime: None,
            omit_zero_chunks: true,
        }
    }
}

#[derive(Debug)]
enum Command {
    StartDisk(usize),
    /// Bytes at an offset; the `usize` counts bytes already encoded.
    Data(u64, Vec<u8>, usize),
    /// Zeros up to this disk offset.
    ZeroTo(u64),
    KeepAlive,
    EndDisk,
    Finish,
}

#[derive(Debug)]
struct DiskState {
    id: String,
    size: u64,
    /// Index of the 1 MiB slot being filled.
    slot: u64,
    /// Bytes of that slot covered so far.
    buf: Vec<u8>,
    /// Keep-alive chunks written so far in this disk: each shifts the counter.
    keepalives: u64,
}

impl DiskState {
    fn position(&self) -> u64 {
        self.slot * CHUNK_SIZE + self.buf.len() as u64
    }

    fn chunk_len(&self) -> u64 {
        CHUNK_SIZE.min(self.size.saturating_sub(self.slot * CHUNK_SIZE))
    }

    fn last_slot(&self) -> u64 {
        self.size.saturating_sub(1) / CHUNK_SIZE
    }
}

/// A streaming XVA writer. No I/O: commands go in, byte pieces come out.
///
/// Use: [`XvaEncoder::new`], then for every disk of [`XvaEncoder::disks`] in
/// that order [`start_disk`](XvaEncoder::start_disk), [`push`](XvaEncoder::push)
/// its extents in increasing offset order (gaps read as zeros),
/// [`end_disk`](XvaEncoder::end_disk); then [`finish`](XvaEncoder::finish).
/// After each call, drain [`next_output`](XvaEncoder::next_output) until it
/// returns `None` and write the pieces in order. Each piece is at most one
/// chunk entry (1 MiB plus two headers) or `ova.xml`, so memory stays bounded
/// even for a zero extent of many GiB. [`drain`](XvaEncoder::drain)
/// concatenates the pieces when that is more convenient.
///
/// Output: `ova.xml` (mtime now or as given), then per disk its chunks
/// `Ref:N/%08d` with a checksum entry each (chunk mtime 0), all-zero chunks
/// left out except the first and last of each disk (unless
/// [`XvaEncoderOptions::omit_zero_chunks`] is off), then the tar end. Chunk
/// counters equal `offset / 1 MiB` plus the keep-alive chunks written before,
/// so without keep-alives `xva-img` reads the result too.
#[derive(Debug)]
pub struct XvaEncoder {
    disks: Vec<XvaDisk>,
    options: XvaEncoderOptions,
    ova_entry: Option<Vec<u8>>,
    queue: VecDeque<Command>,
    /// Disk accepting commands (validation side) and the end of its last extent.
    open_disk: Option<(usize, u64)>,
    /// Next disk index that may be started.
    next_disk: usize,
    /// Disk being encoded (output side).
    current: Option<DiskState>,
    /// Length of the first chunk written in the whole archive: xapi's importer
    /// fills omitted chunks with that many zeros, so omission is only safe
    /// when it is a full 1 MiB.
    first_chunk_len: Option<u64>,
    finish_queued: bool,
    finished: bool,
}

impl XvaEncoder {
    /// An encoder for `ova`, whose disks ([`OvaXml::disks`]) it will expect.
    pub fn new(ova: &OvaXml, options: XvaEncoderOptions) -> Result<XvaEncoder, XvaError> {
        let disks = ova.disks()?;
        for d in &disks {
            // `<id>/<8 digits>.checksum` must fit a 100-byte tar name.
            if d.id.is_empty() || d.id.contains('/') || d.id.len() > 80 || !d.id.is_ascii() {
                return Err(XvaError::OvaXml(format!(
                    "disk id {:?} cannot name a tar directory (ASCII, no '/', at most 80 bytes)",
                    d.id
                )));
            }
        }
        let mtime = options.ova_mtime.unwrap_or_else(|| {
            u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0)
        });
        let xml = ova.to_xml();
        let mut entry = Vec::with_capacity(xml.len() + 2 * tar::BLOCK);
        entry.extend_from_slice(&tar::header("ova.xml", xml.len() as u64, mtime)?);
        entry.extend_from_slice(xml.as_bytes());
        entry.extend_from_slice(tar::padding(xml.len() as u64));
        Ok(XvaEncoder {
            disks,
            options,
            ova_entry: Some(entry),
            queue: VecDeque::new(),
            open_disk: None,
            next_disk: 0,
            current: None,
            first_chunk_len: None,
            finish_queued: false,
            finished: false,
        })
    }

    /// The disks to write, in the order they must be written.
    pub fn disks(&self) -> &[XvaDisk] {
        &self.disks
    }

    /// Starts the next disk; `id` must be the next one of [`XvaEncoder::disks`].
    pub fn start_disk(&mut self, id: &str) -> Result<(), XvaError> {
        if let Some((open, _)) = self.open_disk {
            return Err(XvaError::Usage(format!(
                "start_disk({id}) while disk {} is open: call end_disk first",
                self.disks[open].id
            )));
        }
        let expected = self.disks.get(self.next_disk).map(|d| d.id.as_str());
        if expected != Some(id) {
            return Err(XvaError::Usage(format!(
                "start_disk({id}): the next disk to write is {}",
                expected.unwrap_or("none (all disks written)")
            )));
        }
        self.open_disk = Some((self.next_disk, 0));
        self.queue.push_back(Command::StartDisk(self.next_disk));
        self.next_disk += 1;
        Ok(())
    }

    /// Queues an extent of the open disk. Extents must not overlap and must
    /// come in increasing offset order; ranges between them are zeros.
    pub fn push(&mut self, extent: Extent) -> Result<(), XvaError> {
        let Some((index, queued_end)) = self.open_disk else {
            return Err(XvaError::Usage(
                "push outside start_disk/end_disk".to_string(),
            ));
        };
        let disk = &self.disks[index];
        let end = extent.offset.checked_add(extent.len());
        if extent.offset < queued_end || end.is_none_or(|e| e > disk.virtual_size) {
            return Err(XvaError::Usage(format!(
                "disk {}: extent at {} of {} bytes is out of order or past the virtual size {} \
                 (the previous extent ended at {queued_end})",
                disk.id,
                extent.offset,
                extent.len(),
                disk.virtual_size
            )));
        }
        if extent.is_empty() {
            return Ok(());
        }
        let end = extent.end();
        if extent.offset > queued_end {
            self.queue.push_back(Command::ZeroTo(extent.offset));
        }
        self.queue.push_back(match extent.data {
            ExtentData::Data(bytes) => Command::Data(extent.offset, bytes, 0),
            ExtentData::Zero(_) => Command::ZeroTo(end),
        });
        self.open_disk = Some((index, end));
        Ok(())
    }

    /// Queues a zero-length keep-alive chunk, as xapi < 26 writes after 5 s
    /// of silence: it takes a counter value and covers no bytes. Ignored where
    /// xapi would not write one: outside a disk, before the archive's first
    /// chunk, and once the open disk's data is complete.
    pub fn keep_alive(&mut self) {
        if self.open_disk.is_some() {
            self.queue.push_back(Command::KeepAlive);
        }
    }

    /// Ends the open disk: the rest up to its virtual size is zeros, and the
    /// last chunk is written.
    pub fn end_disk(&mut self) -> Result<(), XvaError> {
        if self.open_disk.take().is_none() {
            return Err(XvaError::Usage("end_disk without start_disk".to_string()));
        }
        self.queue.push_back(Command::EndDisk);
        Ok(())
    }

    /// Ends the archive. Every disk must have been written.
    pub fn finish(&mut self) -> Result<(), XvaError> {
        if let Some((open, _)) = self.open_disk {
            return Err(XvaError::Usage(format!(
                "finish while disk {} is open: call end_disk first",
                self.disks[open].id
            )));
        }
        if let Some(missing) = self.disks.get(self.next_disk) {
            return Err(XvaError::Usage(format!(
                "finish before disk {} was written",
                missing.id
            )));
        }
        if !self.finish_queued {
            self.finish_queued = true;
            self.queue.push_back(Command::Finish);
        }
        Ok(())
    }

    /// True once the tar end has been returned by `next_output`.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The next piece of the archive, or `None` when everything queued so
    /// far has been encoded.
    pub fn next_output(&mut self) -> Result<Option<Vec<u8>>, XvaError> {
        if let Some(entry) = self.ova_entry.take() {
            return Ok(Some(entry));
        }
        let mut out = Vec::new();
        while out.is_empty() {
            let Some(cmd) = self.queue.pop_front() else {
                return Ok(None);
            };
            match cmd {
                Command::StartDisk(index) => {
                    self.current = Some(DiskState {
                        id: self.disks[index].id.clone(),
                        size: self.disks[index].virtual_size,
                        slot: 0,
                        buf: Vec::new(),
                        keepalives: 0,
                    });
                }
                Command::Data(offset, bytes, mut done) => {
                    while done < bytes.len() && out.is_empty() {
                        done += self.fill(&bytes[done..], &mut out)?;
                    }
                    if done < bytes.len() {
                        self.queue.push_front(Command::Data(offset, bytes, done));
                    }
                }
                Command::ZeroTo(end) => {
                    if self.zero_step(end, &mut out)? < end {
                        self.queue.push_front(Command::ZeroTo(end));
                    }
                }
                Command::KeepAlive => self.write_keep_alive(&mut out)?,
                Command::EndDisk => {
                    let size = self.disk()?.size;
                    if self.zero_step(size, &mut out)? < size {
                        self.queue.push_front(Command::EndDisk);
                    } else {
                        self.current = None;
                    }
                }
                Command::Finish => {
                    out.extend_from_slice(&tar::end_of_archive());
                    self.finished = true;
                }
            }
        }
        Ok(Some(out))
    }

    /// Encodes everything queued and returns it as one buffer.
    pub fn drain(&mut self) -> Result<Vec<u8>, XvaError> {
        let mut all = Vec::new();
        while let Some(piece) = self.next_output()? {
            all.extend_from_slice(&piece);
        }
        Ok(all)
    }

    fn disk(&mut self) -> Result<&mut DiskState, XvaError> {
        self.current
            .as_mut()
            .ok_or_else(|| XvaError::Usage("no disk is being encoded".to_string()))
    }

    /// True when an all-zero chunk in the current slot may be left out.
    fn omissible(&self, d: &DiskState) -> bool {
        omissible(self.options.omit_zero_chunks, self.first_chunk_len, d)
    }

    /// Copies the start of `data` into the current slot; writes the slot when
    /// it is full. Returns the bytes taken.
    fn fill(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, XvaError> {
        let d = self.disk()?;
        let room = usize::try_from(d.chunk_len() - d.buf.len() as u64).unwrap_or(usize::MAX);
        let n = room.min(data.len());
        d.buf.extend_from_slice(&data[..n]);
        if d.buf.len() as u64 == d.chunk_len() {
            self.emit_slot(out)?;
        }
        Ok(n)
    }

    /// Advances the current disk towards `end` with zeros, stopping after one
    /// chunk entry has been written. Returns the new position.
    fn zero_step(&mut self, end: u64, out: &mut Vec<u8>) -> Result<u64, XvaError> {
        loop {
            let Some(d) = self.current.as_ref() else {
                return Err(XvaError::Usage("no disk is being encoded".to_string()));
            };
            let pos = d.position();
            if pos >= end || !out.is_empty() {
                return Ok(pos);
            }
            let chunk_len = d.chunk_len();
            let slot_end = d.slot * CHUNK_SIZE + chunk_len;
            if d.buf.is_empty() && end >= slot_end && self.omissible(d) {
                // Skip every whole zero slot before `end`, never the last one.
                let last = d.last_slot();
                let d = self.disk()?;
                d.slot = (end / CHUNK_SIZE).min(last).max(d.slot + 1);
                continue;
            }
            let n = (end.min(slot_end) - pos) as usize;
            let d = self.disk()?;
            d.buf.resize(d.buf.len() + n, 0);
            if d.buf.len() as u64 == chunk_len {
                self.emit_slot(out)?;
            }
        }
    }

    /// Writes (or, when all zero and allowed, leaves out) the full current slot.
    fn emit_slot(&mut self, out: &mut Vec<u8>) -> Result<(), XvaError> {
        let (allowed, first) = (self.options.omit_zero_chunks, self.first_chunk_len);
        let checksum = self.options.checksum;
        let d = self.disk()?;
        let omit = omissible(allowed, first, d) && is_all_zero(&d.buf);
        let len = d.buf.len() as u64;
        if !omit {
            let name = format!("{}/{:08}", d.id, d.slot + d.keepalives);
            write_chunk(out, &name, &d.buf, checksum)?;
        }
        d.buf.clear();
        d.slot += 1;
        if !omit && self.first_chunk_len.is_none() {
            self.first_chunk_len = Some(len);
        }
        Ok(())
    }

    fn write_keep_alive(&mut self, out: &mut Vec<u8>) -> Result<(), XvaError> {
        let checksum = self.options.checksum;
        let started = self.first_chunk_len.is_some();
        let Some(d) = self.current.as_mut() else {
            return Ok(());
        };
        if !started || d.position() >= d.size {
            return Ok(());
        }
        let name = format!("{}/{:08}", d.id, d.slot + d.keepalives);
        write_chunk(out, &name, &[], checksum)?;
        d.keepalives += 1;
        Ok(())
    }
}

/// True when an all-zero chunk in `d`'s current slot may be left out: never
/// the first or last slot of a disk (xapi always writes them), and only when
/// the archive's first chunk was a full 1 MiB, since xapi's importer fills
/// each omitted chunk with as many zeros as the first chunk of the whole
/// import had bytes (`docs/xapi-notes.md`, "XVA").
fn omissible(allowed: bool, first_chunk_len: Option<u64>, d: &DiskState) -> bool {
    allowed && d.slot != 0 && d.slot != d.last_slot() && first_chunk_len == Some(CHUNK_SIZE)
}

/// The checksum file content xapi writes for `data`.
pub fn checksum_text(kind: ChecksumKind, data: &[u8]) -> String {
    match kind {
        // `%016LX` of XXH64 seed 0 (xapi's stream_vdi.ml).
        ChecksumKind::XxHash => format!("{:016X}", xxhash_rust::xxh64::xxh64(data, 0)),
        // `Sha1.to_hex`: lowercase.
        ChecksumKind::Sha1 => hex::encode(Sha1::digest(data)),
    }
}

/// Appends a chunk entry and its checksum entry (mtime 0, as xapi writes them).
fn write_chunk(
    out: &mut Vec<u8>,
    name: &str,
    data: &[u8],
    kind: ChecksumKind,
) -> Result<(), XvaError> {
    let sum = checksum_text(kind, data);
    out.reserve(data.len() + sum.len() + 4 * tar::BLOCK);
    out.extend_from_slice(&tar::header(name, data.len() as u64, 0)?);
    out.extend_from_slice(data);
    out.extend_from_slice(tar::padding(data.len() as u64));
    let sum_name = format!("{name}{}", kind.extension());
    out.extend_from_slice(&tar::header(&sum_name, sum.len() as u64, 0)?);
    out.extend_from_slice(sum.as_bytes());
    out.extend_from_slice(tar::padding(sum.len() as u64));
    Ok(())
}
