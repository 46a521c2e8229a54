//! The push XVA decoder: tar bytes in, `ova.xml` and disk extents out.

use xenvault_types::Extent;
use xenvault_types::extent::is_all_zero;

use super::ova::{EXPORT_VSN, OvaXml, XvaDisk};
use super::{CHUNK_SIZE, ChecksumKind, XvaError, checksum_text};
use crate::tar::{TarError, TarHeader, TarItem, TarParser};

/// Decoder limits and switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XvaDecoderOptions {
    /// Largest `ova.xml` accepted (default 64 MiB).
    pub max_ova_xml_size: u64,
    /// Largest chunk accepted (default 16 MiB; writers use 1 MiB). The decoder
    /// holds one chunk in memory to verify it before emitting it.
    pub max_chunk_size: u64,
    /// Verify chunk checksums (default true). Off = xapi's `force=true`.
    pub verify_checksums: bool,
    /// Report all-zero chunks as [`xenvault_types::ExtentData::Zero`] (default
    /// true); `xva-img` and xapi ≥ 26 write such chunks.
    pub detect_zero_chunks: bool,
}

impl Default for XvaDecoderOptions {
    fn default() -> Self {
        XvaDecoderOptions {
            max_ova_xml_size: 64 << 20,
            max_chunk_size: 16 << 20,
            verify_checksums: true,
            detect_zero_chunks: true,
        }
    }
}

/// What the decoder reports, in this order: `OvaXml`, then for each disk of
/// [`OvaXml::disks`] a `DiskStart`, its `Extent`s in increasing offset order
/// covering exactly `0..virtual_size` (zero runs merged), a `DiskEnd`; then `End`.
#[derive(Debug, Clone, PartialEq)]
pub enum XvaEvent {
    /// The parsed `ova.xml` (always first).
    OvaXml(Box<OvaXml>),
    /// The data of this disk follows.
    DiskStart(XvaDisk),
    /// A run of the current disk: a verified chunk, or zeros (omitted or
    /// all-zero chunks, merged).
    Extent(Extent),
    /// The current disk is complete.
    DiskEnd(XvaDisk),
    /// The tar end was read; the archive is complete and valid.
    End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// Waiting for the `ova.xml` header.
    Start,
    /// Reading `ova.xml`.
    OvaXml,
    /// Between entries, after `ova.xml` or a chunk's checksum.
    Between,
    /// Reading a directory entry's data (skipped).
    SkipEntry,
    /// Reading a chunk's data.
    Chunk,
    /// Waiting for the checksum entry of the chunk just read.
    AfterChunk,
    /// Reading the checksum entry.
    Checksum(ChecksumKind),
    /// The tar end was read.
    Done,
}

#[derive(Debug)]
struct Inner {
    options: XvaDecoderOptions,
    stage: Stage,
    ova_buf: Vec<u8>,
    disks: Vec<XvaDisk>,
    /// Index of the disk being read, or of the next one when none is open.
    disk_index: usize,
    disk_open: bool,
    /// Disk offset reached so far (sum of lengths, as xapi's importer).
    offset: u64,
    /// The last chunk's counter text and value in this disk.
    last_chunk: Option<(String, u64)>,
    /// The length of the first chunk of the whole archive: xapi's fill size
    /// for omitted chunks.
    first_chunk_len: Option<u64>,
    /// Current chunk: name, counter text, zeros to emit before it, data.
    chunk_name: String,
    chunk_suffix: String,
    chunk_skip: u64,
    chunk_buf: Vec<u8>,
    sum_buf: Vec<u8>,
    /// A zero run not yet emitted: (offset, length).
    pending_zero: Option<(u64, u64)>,
}

/// A push decoder for XVA streams (uncompressed tar). Feed bytes in pieces
/// of any size; get [`XvaEvent`]s. Memory: `ova.xml` plus one chunk.
///
/// Chunk offsets are computed as xapi's importer does
/// (`Stream_vdi.recv_all_vdi`): every chunk adds its length, every gap in
/// the counter adds as many zeros as the archive's first chunk was long, so
/// zero-length keep-alive chunks and omitted chunks both work. Each chunk
/// is verified against its `.xxhash` (uppercase) or `.checksum` (lowercase)
/// entry, compared as exact text like xapi. Every problem is an
/// [`XvaError`]; after an error the decoder keeps returning it.
#[derive(Debug)]
pub struct XvaDecoder {
    tar: TarParser,
    inner: Inner,
    failed: Option<XvaError>,
    /// The first bytes of the stream, to recognise compressed input.
    head: Vec<u8>,
}

impl Default for XvaDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl XvaDecoder {
    /// A decoder with default options.
    pub fn new() -> XvaDecoder {
        Self::with_options(XvaDecoderOptions::default())
    }

    /// A decoder with the given options.
    pub fn with_options(options: XvaDecoderOptions) -> XvaDecoder {
        XvaDecoder {
            tar: TarParser::new(),
            inner: Inner {
                options,
                stage: Stage::Start,
                ova_buf: Vec::new(),
                disks: Vec::new(),
                disk_index: 0,
                disk_open: false,
                offset: 0,
                last_chunk: None,
                first_chunk_len: None,
                chunk_name: String::new(),
                chunk_suffix: String::new(),
                chunk_skip: 0,
                chunk_buf: Vec::new(),
                sum_buf: Vec::new(),
                pending_zero: None,
            },
            failed: None,
            head: Vec::new(),
        }
    }

    /// Decodes the next piece of the stream. Bytes after the tar end are ignored.
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<XvaEvent>, XvaError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.head.len() < 4 {
            let n = (4 - self.head.len()).min(input.len());
            self.head.extend_from_slice(&input[..n]);
        }
        let mut events = Vec::new();
        let inner = &mut self.inner;
        let result = self
            .tar
            .feed(input, &mut |item: TarItem<'_>| -> Result<(), XvaError> {
                inner.on_item(item, &mut events)
            });
        match result {
            Ok(()) => Ok(events),
            Err(e) => {
                let e = match e {
                    XvaError::Tar(
                        TarError::BadChecksum { offset: 0, .. }
                        | TarError::BadNumber { offset: 0, .. },
                    ) => compressed_input(&self.head).map_or(e, |what| XvaError::NotAnXva {
                        found: format!("{what}-compressed data"),
                    }),
                    e => e,
                };
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// True once [`XvaEvent::End`] has been produced.
    pub fn is_done(&self) -> bool {
        self.inner.stage == Stage::Done
    }

    /// Call at the end of the input: an error unless the archive was complete.
    pub fn finish(&self) -> Result<(), XvaError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let i = &self.inner;
        let disk = i.disks.get(i.disk_index).map_or("", |d| d.id.as_str());
        let at = match &i.stage {
            Stage::Done => return Ok(()),
            Stage::Start => "before ova.xml".to_string(),
            Stage::OvaXml => format!("inside ova.xml ({} bytes read)", i.ova_buf.len()),
            Stage::SkipEntry => "inside a directory entry".to_string(),
            Stage::Chunk => format!("inside chunk {}", i.chunk_name),
            Stage::AfterChunk | Stage::Checksum(_) => {
                format!("before the checksum of chunk {} was complete", i.chunk_name)
            }
            Stage::Between if i.disk_open => format!(
                "disk {disk} has {} of its {} bytes",
                i.offset,
                i.disks.get(i.disk_index).map_or(0, |d| d.virtual_size)
            ),
            Stage::Between if i.disk_index < i.disks.len() => {
                format!("disk {disk} and those after it are missing")
            }
            Stage::Between => "the tar end (two zero blocks) is missing".to_string(),
        };
        Err(XvaError::Truncated(at))
    }
}

/// Names the compression of a stream that starts with `head`, if recognised.
fn compressed_input(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some("gzip")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd")
    } else {
        None
    }
}

/// Parses a chunk counter: decimal digits only.
fn parse_counter(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl Inner {
    fn disk(&self) -> Option<&XvaDisk> {
        self.disks.get(self.disk_index)
    }

    fn on_item(&mut self, item: TarItem<'_>, events: &mut Vec<XvaEvent>) -> Result<(), XvaError> {
        match item {
            TarItem::Entry(h) => self.on_header(h, events),
            TarItem::Data(piece) => {
                match self.stage {
                    Stage::OvaXml => self.ova_buf.extend_from_slice(piece),
                    Stage::Chunk => self.chunk_buf.extend_from_slice(piece),
                    Stage::Checksum(_) => self.sum_buf.extend_from_slice(piece),
                    _ => {}
                }
                Ok(())
            }
            TarItem::EntryEnd => self.on_entry_end(events),
            TarItem::ArchiveEnd => self.on_archive_end(events),
        }
    }

    fn on_header(&mut self, h: TarHeader, events: &mut Vec<XvaEvent>) -> Result<(), XvaError> {
        match self.stage {
            Stage::Start => {
                if h.is_dir || h.name != "ova.xml" {
                    return Err(XvaError::NotAnXva { found: h.name });
                }
                if h.size > self.options.max_ova_xml_size {
                    return Err(XvaError::TooLarge(format!(
                        "ova.xml is {} bytes, over the limit of {} bytes",
                        h.size, self.options.max_ova_xml_size
                    )));
                }
                self.ova_buf = Vec::with_capacity(h.size.min(1 << 20) as usize);
                self.stage = Stage::OvaXml;
                Ok(())
            }
            Stage::Between if h.is_dir => {
                self.stage = Stage::SkipEntry;
                Ok(())
            }
            Stage::Between => self.on_chunk_header(h, events),
            Stage::AfterChunk => {
                let kind = match h.name.strip_prefix(self.chunk_name.as_str()) {
                    Some(".xxhash") => ChecksumKind::XxHash,
                    Some(".checksum") => ChecksumKind::Sha1,
                    Some(ext) if ext.starts_with('.') => {
                        return Err(XvaError::UnknownChecksum {
                            disk: self.disk().map(|d| d.id.clone()).unwrap_or_default(),
                            chunk: self.chunk_suffix.clone(),
                            entry: h.name,
                        });
                    }
                    _ => {
                        return Err(XvaError::UnexpectedEntry {
                            expected: format!(
                                "{}.xxhash or {}.checksum",
                                self.chunk_name, self.chunk_name
                            ),
                            found: h.name,
                        });
                    }
                };
                if h.is_dir || h.size > 128 {
                    return Err(XvaError::TooLarge(format!(
                        "checksum entry {} is {} bytes; a checksum is at most 40",
                        h.name, h.size
                    )));
                }
                self.sum_buf.clear();
                self.stage = Stage::Checksum(kind);
                Ok(())
            }
            // The tar parser reports an entry's end before the next header.
            Stage::OvaXml | Stage::SkipEntry | Stage::Chunk | Stage::Checksum(_) | Stage::Done => {
                Err(XvaError::UnexpectedEntry {
                    expected: "nothing (internal state)".to_string(),
                    found: h.name,
                })
            }
        }
    }

    /// Opens disks until one that has data to read; false when none is left.
    fn open_next_disk(&mut self, events: &mut Vec<XvaEvent>) -> bool {
        while !self.disk_open {
            let Some(disk) = self.disks.get(self.disk_index) else {
                return false;
            };
            events.push(XvaEvent::DiskStart(disk.clone()));
            if disk.virtual_size == 0 {
                events.push(XvaEvent::DiskEnd(disk.clone()));
                self.disk_index += 1;
                continue;
            }
            self.disk_open = true;
            self.offset = 0;
            self.last_chunk = None;
        }
        true
    }

    fn on_chunk_header(
        &mut self,
        h: TarHeader,
        events: &mut Vec<XvaEvent>,
    ) -> Result<(), XvaError> {
        if !self.open_next_disk(events) {
            return Err(XvaError::UnexpectedEntry {
                expected: "the tar end: every disk of ova.xml is complete".to_string(),
                found: h.name,
            });
        }
        let (id, size) = match self.disk() {
            Some(d) => (d.id.clone(), d.virtual_size),
            None => return Ok(()),
        };
        let unexpected = |name: String| XvaError::UnexpectedEntry {
            expected: format!(
                "a chunk {id}/NNNNNNNN (disk {id} has {} of its {size} bytes)",
                self.offset
            ),
            found: name,
        };
        let Some(suffix) = h
            .name
            .strip_prefix(id.as_str())
            .and_then(|s| s.strip_prefix('/'))
        else {
            return Err(unexpected(h.name));
        };
        let Some(counter) = parse_counter(suffix) else {
            return Err(unexpected(h.name.clone()));
        };
        let suffix = suffix.to_string();
        // xapi compares names as strings; counters must also grow as numbers
        // or the zero-fill arithmetic would go backwards.
        let gap = match &self.last_chunk {
            None => counter,
            Some((last_text, last)) => {
                if suffix.as_str() <= last_text.as_str() || counter <= *last {
                    return Err(XvaError::ChunkOrder {
                        disk: id,
                        previous: last_text.clone(),
                        found: suffix,
                    });
                }
                counter - last - 1
            }
        };
        if h.size > self.options.max_chunk_size {
            return Err(XvaError::TooLarge(format!(
                "disk {id}: chunk {suffix} is {} bytes, over the limit of {} bytes",
                h.size, self.options.max_chunk_size
            )));
        }
        // xapi takes the fill size from the first chunk of the whole import,
        // this one if it is the first (docs/xapi-notes.md, "XVA").
        let fill = self.first_chunk_len.unwrap_or(h.size);
        if gap > 0 && fill == 0 {
            return Err(XvaError::UnexpectedEntry {
                expected: format!(
                    "no omitted chunks: the archive's first chunk is empty, so the size of \
                     omitted chunks is unknown (disk {id})"
                ),
                found: h.name,
            });
        }
        let skip = gap.checked_mul(fill);
        let end = skip
            .and_then(|s| s.checked_add(self.offset))
            .and_then(|o| o.checked_add(h.size));
        match end {
            Some(end) if end <= size => {}
            _ => {
                return Err(XvaError::TooLarge(format!(
                    "disk {id}: chunk {suffix} ({} bytes after {gap} omitted chunks) ends past \
                     the virtual size {size} (the disk has {} bytes so far)",
                    h.size, self.offset
                )));
            }
        }
        self.first_chunk_len.get_or_insert(h.size);
        self.chunk_skip = skip.unwrap_or(0);
        self.chunk_name = h.name;
        self.chunk_suffix = suffix.clone();
        self.last_chunk = Some((suffix, counter));
        self.chunk_buf = Vec::with_capacity(h.size.min(CHUNK_SIZE) as usize);
        self.stage = Stage::Chunk;
        Ok(())
    }

    fn on_entry_end(&mut self, events: &mut Vec<XvaEvent>) -> Result<(), XvaError> {
        match self.stage {
            Stage::OvaXml => {
                let text = std::str::from_utf8(&self.ova_buf)
                    .map_err(|e| XvaError::OvaXml(format!("not UTF-8: {e}")))?;
                let ova = OvaXml::from_xml(text)?;
                if ova.version.export_vsn < EXPORT_VSN {
                    return Err(XvaError::UnsupportedExportVsn(ova.version.export_vsn));
                }
                self.disks = ova.disks()?;
                self.ova_buf = Vec::new();
                events.push(XvaEvent::OvaXml(Box::new(ova)));
                self.stage = Stage::Between;
            }
            Stage::SkipEntry => self.stage = Stage::Between,
            Stage::Chunk => self.stage = Stage::AfterChunk,
            Stage::Checksum(kind) => {
                self.verify(kind)?;
                self.emit_chunk(events);
                self.stage = Stage::Between;
            }
            Stage::Start | Stage::Between | Stage::AfterChunk | Stage::Done => {}
        }
        Ok(())
    }

    fn verify(&self, kind: ChecksumKind) -> Result<(), XvaError> {
        if !self.options.verify_checksums {
            return Ok(());
        }
        let computed = checksum_text(kind, &self.chunk_buf);
        if self.sum_buf != computed.as_bytes() {
            let stored = String::from_utf8_lossy(&self.sum_buf);
            return Err(XvaError::ChecksumMismatch {
                disk: self.disk().map(|d| d.id.clone()).unwrap_or_default(),
                chunk: self.chunk_suffix.clone(),
                kind: match kind {
                    ChecksumKind::XxHash => "xxhash",
                    ChecksumKind::Sha1 => "sha1",
                },
                stored: stored.chars().take(64).collect(),
                computed,
            });
        }
        Ok(())
    }

    fn add_zero(&mut self, offset: u64, len: u64, events: &mut Vec<XvaEvent>) {
        if len == 0 {
            return;
        }
        match &mut self.pending_zero {
            Some((start, run)) if *start + *run == offset => *run += len,
            _ => {
                self.flush_zero(events);
                self.pending_zero = Some((offset, len));
            }
        }
    }

    fn flush_zero(&mut self, events: &mut Vec<XvaEvent>) {
        if let Some((offset, len)) = self.pending_zero.take() {
            events.push(XvaEvent::Extent(Extent::zero(offset, len)));
        }
    }

    fn emit_chunk(&mut self, events: &mut Vec<XvaEvent>) {
        self.add_zero(self.offset, self.chunk_skip, events);
        self.offset += self.chunk_skip;
        let data = std::mem::take(&mut self.chunk_buf);
        let len = data.len() as u64;
        if len > 0 {
            if self.options.detect_zero_chunks && is_all_zero(&data) {
                self.add_zero(self.offset, len, events);
            } else {
                self.flush_zero(events);
                events.push(XvaEvent::Extent(Extent::data(self.offset, data)));
            }
        }
        self.offset += len;
        if let Some(disk) = self.disks.get(self.disk_index)
            && self.offset >= disk.virtual_size
        {
            let disk = disk.clone();
            self.flush_zero(events);
            events.push(XvaEvent::DiskEnd(disk));
            self.disk_open = false;
            self.disk_index += 1;
        }
    }

    fn on_archive_end(&mut self, events: &mut Vec<XvaEvent>) -> Result<(), XvaError> {
        match self.stage {
            Stage::Start => {
                return Err(XvaError::NotAnXva {
                    found: "(an empty archive)".to_string(),
                });
            }
            Stage::Between => {}
            _ => {
                return Err(XvaError::Truncated(
                    "the tar end came inside an entry".into(),
                ));
            }
        }
        if self.disk_open {
            let d = self
                .disk()
                .map(|d| (d.id.clone(), d.virtual_size))
                .unwrap_or_default();
            return Err(XvaError::Truncated(format!(
                "the tar end came when disk {} had {} of its {} bytes (a writer must always \
                 write the last chunk)",
                d.0, self.offset, d.1
            )));
        }
        // Zero-size disks have no entries; report them.
        while let Some(disk) = self.disks.get(self.disk_index) {
            if disk.virtual_size != 0 {
                return Err(XvaError::Truncated(format!(
                    "the tar end came before any chunk of disk {}",
                    disk.id
                )));
            }
            events.push(XvaEvent::DiskStart(disk.clone()));
            events.push(XvaEvent::DiskEnd(disk.clone()));
            self.disk_index += 1;
        }
        events.push(XvaEvent::End);
        self.stage = Stage::Done;
        Ok(())
    }
}
