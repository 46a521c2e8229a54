//! The VHD push decoder: feed the bytes of a VHD stream in file order, receive extents
//! in increasing virtual offset order. No I/O.

use std::collections::BTreeMap;

use uuid::Uuid;
use xenvault_types::extent::is_all_zero;
use xenvault_types::{Extent, ExtentData};

use super::VhdError;
use super::footer::{DiskType, FOOTER_COOKIE, FOOTER_SIZE, Footer};
use super::header::{DynamicHeader, HEADER_SIZE, ParentLocator};
use super::layout::{FIXED_CHUNK, MAX_READ_VIRTUAL_SIZE, VhdLayout};

/// Longest parent locator data the decoder captures (longer ones are reported without data).
pub const MAX_LOCATOR_DATA: u32 = 64 << 10;

/// Settings of a [`VhdDecoder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderOptions {
    /// Accept fixed disks, which have no footer copy at byte 0 (only the trailing footer).
    /// When true, a stream whose first sector is not a footer is decoded as a fixed disk
    /// and only [`VhdDecoder::finish`] can tell that it is no VHD at all. Set it to false
    /// for `export_raw_vdi?format=vhd` streams, which are never fixed, to fail at once.
    pub allow_fixed: bool,
    /// Most bytes of blocks the decoder holds back because they arrive before blocks
    /// with a lower virtual offset (files whose blocks are not in BAT order). Checked
    /// as soon as the BAT is read; beyond it, decoding fails with
    /// [`VhdError::NotStreamable`]. Streams from xapi and our encoder need 0.
    pub max_reorder_bytes: u64,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        DecoderOptions {
            allow_fixed: true,
            max_reorder_bytes: 64 << 20,
        }
    }
}

/// A differencing disk's reference to its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentInfo {
    /// The parent VHD's footer unique id (xapi: the base VHD file's uid, not a VDI uuid).
    pub unique_id: Uuid,
    /// The parent's modification time (seconds since 2000-01-01).
    pub timestamp: u32,
    /// The parent's name from the header (xapi: the base VHD's path on the host).
    pub unicode_name: String,
    /// The used parent locator slots.
    pub locators: Vec<ParentLocatorEntry>,
}

/// One used parent locator slot and its data, when the stream carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocatorEntry {
    /// The header entry.
    pub locator: ParentLocator,
    /// The locator data (`None` when it lies before the header's end, overlaps nothing
    /// readable, exceeds [`MAX_LOCATOR_DATA`] or the stream has not reached it yet).
    pub data: Option<Vec<u8>>,
    /// The decoded path (see [`ParentLocator::decode_path`]).
    pub path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    FooterCopy,
    Header,
    Bat,
    Block,
    Tail,
    Fixed,
    Done,
    Failed,
}

#[derive(Debug)]
struct Capture {
    slot: usize,
    offset: u64,
    data: Vec<u8>,
    filled: usize,
}

/// Push decoder for VHD streams (dynamic, differencing and fixed).
///
/// Feed the bytes in file order with [`feed`](VhdDecoder::feed), in pieces of any
/// size; each call returns the extents it completed. Call
/// [`finish`](VhdDecoder::finish) at the end of the stream: it checks the trailing
/// footer and returns the last extents. The extents do not depend on how the input
/// was split. Until `finish` returns `Ok`, the VHD is not known to be valid.
///
/// Memory: one block (bitmap + 2 MiB), the BAT (4 bytes per block), parent locator
/// data (≤ 8 × 64 KiB), plus at most [`DecoderOptions::max_reorder_bytes`] of blocks
/// that arrive ahead of their turn. Fixed disks: one 2 MiB chunk.
#[derive(Debug)]
pub struct VhdDecoder {
    opts: DecoderOptions,
    stage: Stage,
    pos: u64,
    region: (u64, usize),
    buf: Vec<u8>,
    first_cookie: [u8; 8],
    footer: Option<Footer>,
    header: Option<DynamicHeader>,
    layout: Option<VhdLayout>,
    plan_pos: usize,
    plan: Vec<u32>,
    cursor: u32,
    held: BTreeMap<u32, Vec<Extent>>,
    zero_run: Option<(u64, u64)>,
    ring: Box<[u8; FOOTER_SIZE]>,
    tail_start: u64,
    captures: Vec<Capture>,
    fixed_emitted: u64,
}

impl Default for VhdDecoder {
    fn default() -> Self {
        VhdDecoder::new()
    }
}

impl VhdDecoder {
    /// A decoder with default options (fixed disks accepted, 64 MiB reorder bound).
    pub fn new() -> VhdDecoder {
        VhdDecoder::with_options(DecoderOptions::default())
    }

    /// A decoder with the given options.
    pub fn with_options(opts: DecoderOptions) -> VhdDecoder {
        VhdDecoder {
            opts,
            stage: Stage::FooterCopy,
            pos: 0,
            region: (0, FOOTER_SIZE),
            buf: Vec::with_capacity(FOOTER_SIZE),
            first_cookie: [0; 8],
            footer: None,
            header: None,
            layout: None,
            plan_pos: 0,
            plan: Vec::new(),
            cursor: 0,
            held: BTreeMap::new(),
            zero_run: None,
            ring: Box::new([0; FOOTER_SIZE]),
            tail_start: 0,
            captures: Vec::new(),
            fixed_emitted: 0,
        }
    }

    /// The footer: the copy at byte 0 for sparse disks (known after 512 bytes), the
    /// trailing footer for fixed disks (known after `finish`).
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    /// The dynamic header, once read.
    pub fn header(&self) -> Option<&DynamicHeader> {
        self.header.as_ref()
    }

    /// The checked layout, once the BAT is read (fixed disks: after `finish`).
    pub fn layout(&self) -> Option<&VhdLayout> {
        self.layout.as_ref()
    }

    /// The disk type, once the footer copy is read.
    pub fn disk_type(&self) -> Option<DiskType> {
        self.footer.as_ref().map(|f| f.disk_type)
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The parent reference of a differencing disk (after the header is read; locator
    /// data is complete once the stream has passed it, at the latest after `finish`).
    pub fn parent(&self) -> Option<ParentInfo> {
        let f = self.footer.as_ref()?;
        let h = self.header.as_ref()?;
        if f.disk_type != DiskType::Differencing {
            return None;
        }
        let locators = h
            .parent_locators
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_unused())
            .map(|(slot, l)| {
                let data = self
                    .captures
                    .iter()
                    .find(|c| c.slot == slot && c.filled == c.data.len())
                    .map(|c| c.data.clone());
                let path = data.as_deref().and_then(|d| l.decode_path(d));
                ParentLocatorEntry {
                    locator: *l,
                    data,
                    path,
                }
            })
            .collect();
        Some(ParentInfo {
            unique_id: h.parent_unique_id,
            timestamp: h.parent_timestamp,
            unicode_name: h.parent_unicode_name.clone(),
            locators,
        })
    }

    /// Feeds the next bytes of the stream; returns the extents they completed, in
    /// increasing offset order. After an error the decoder refuses further input.
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<Extent>, VhdError> {
        match self.stage {
            Stage::Failed => return Err(VhdError::Stopped("an earlier error")),
            Stage::Done => return Err(VhdError::Stopped("finish was called")),
            _ => {}
        }
        let mut out = Vec::new();
        let r = self.feed_inner(input, &mut out);
        if r.is_err() {
            self.stage = Stage::Failed;
        }
        r.map(|()| out)
    }

    /// Ends the stream: checks that every announced structure arrived and that the
    /// trailing footer is valid and agrees with the copy; returns the last extents.
    pub fn finish(&mut self) -> Result<Vec<Extent>, VhdError> {
        match self.stage {
            Stage::Failed => return Err(VhdError::Stopped("an earlier error")),
            Stage::Done => return Err(VhdError::Stopped("finish was called")),
            _ => {}
        }
        let mut out = Vec::new();
        let r = self.finish_inner(&mut out);
        self.stage = if r.is_ok() {
            Stage::Done
        } else {
            Stage::Failed
        };
        r.map(|()| out)
    }

    fn feed_inner(&mut self, mut input: &[u8], out: &mut Vec<Extent>) -> Result<(), VhdError> {
        while !input.is_empty() {
            let n = match self.stage {
                Stage::Fixed => self.fixed_take(input, out),
                Stage::Tail => input.len(),
                Stage::Done | Stage::Failed => return Err(VhdError::Stopped("internal state")),
                Stage::FooterCopy | Stage::Header | Stage::Bat | Stage::Block => {
                    let (off, len) = self.region;
                    if self.pos < off {
                        (off - self.pos).min(input.len() as u64) as usize
                    } else {
                        let n = (len - self.buf.len()).min(input.len());
                        self.buf.extend_from_slice(&input[..n]);
                        n
                    }
                }
            };
            self.observe(&input[..n]);
            self.pos += n as u64;
            input = &input[n..];
            if matches!(
                self.stage,
                Stage::FooterCopy | Stage::Header | Stage::Bat | Stage::Block
            ) && self.pos == self.region.0 + self.region.1 as u64
                && self.buf.len() == self.region.1
            {
                self.region_done(out)?;
            }
        }
        Ok(())
    }

    /// Keeps the last 512 bytes (the trailing footer) and parent locator data.
    fn observe(&mut self, bytes: &[u8]) {
        let skip = bytes.len().saturating_sub(FOOTER_SIZE);
        for (k, &b) in bytes[skip..].iter().enumerate() {
            self.ring[((self.pos + (skip + k) as u64) % FOOTER_SIZE as u64) as usize] = b;
        }
        let (lo, hi) = (self.pos, self.pos + bytes.len() as u64);
        for c in &mut self.captures {
            let (clo, chi) = (c.offset, c.offset + c.data.len() as u64);
            let (a, b) = (lo.max(clo), hi.min(chi));
            if a < b {
                c.data[(a - clo) as usize..(b - clo) as usize]
                    .copy_from_slice(&bytes[(a - lo) as usize..(b - lo) as usize]);
                c.filled += (b - a) as usize;
            }
        }
    }

    fn set_region(&mut self, stage: Stage, offset: u64, len: usize) {
        self.stage = stage;
        self.region = (offset, len);
        self.buf.clear();
        self.buf.reserve(len);
    }

    fn region_done(&mut self, out: &mut Vec<Extent>) -> Result<(), VhdError> {
        match self.stage {
            Stage::FooterCopy => self.on_footer_copy(),
            Stage::Header => self.on_header(out),
            Stage::Bat => {
                let bat = std::mem::take(&mut self.buf);
                self.on_bat(&bat, out)
            }
            Stage::Block => self.on_block(out),
            _ => Ok(()),
        }
    }

    fn on_footer_copy(&mut self) -> Result<(), VhdError> {
        self.first_cookie.copy_from_slice(&self.buf[..8]);
        if &self.buf[..8] != FOOTER_COOKIE {
            if !self.opts.allow_fixed {
                return Err(VhdError::BadCookie {
                    structure: "footer",
                    offset: 0,
                    found: String::from_utf8_lossy(&self.buf[..8]).into_owned(),
                    expected: "conectix",
                });
            }
            self.enter_fixed();
            return Ok(());
        }
        let footer = Footer::parse(&self.buf, 0)?;
        if footer.disk_type == DiskType::Fixed {
            if !self.opts.allow_fixed {
                return Err(VhdError::BadField {
                    structure: "footer",
                    field: "disk_type",
                    offset: 60,
                    reason: "a fixed disk, but fixed disks are not allowed here".into(),
                });
            }
            // A fixed disk whose first data sector looks like a footer: it is data.
            self.enter_fixed();
            return Ok(());
        }
        let h = footer.data_offset;
        if h < FOOTER_SIZE as u64 || h > MAX_READ_VIRTUAL_SIZE {
            return Err(VhdError::BadField {
                structure: "footer",
                field: "data_offset",
                offset: 16,
                reason: format!("{h} cannot hold the dynamic header (expected 512)"),
            });
        }
        self.footer = Some(footer);
        self.set_region(Stage::Header, h, HEADER_SIZE);
        Ok(())
    }

    fn on_header(&mut self, out: &mut Vec<Extent>) -> Result<(), VhdError> {
        let at = self.region.0;
        let header = DynamicHeader::parse(&self.buf, at)?;
        let footer = self
            .footer
            .as_ref()
            .ok_or(VhdError::Stopped("internal state"))?;
        let bat_len = VhdLayout::bat_bytes_needed(footer, &header)?;
        let header_end = at + HEADER_SIZE as u64;
        if header.table_offset < header_end {
            return Err(VhdError::NotStreamable(format!(
                "the BAT at byte {} comes before the end of the dynamic header at byte {header_end}",
                header.table_offset
            )));
        }
        if footer.disk_type == DiskType::Differencing {
            for (slot, l) in header.parent_locators.iter().enumerate() {
                if !l.is_unused()
                    && l.data_len <= MAX_LOCATOR_DATA
                    && (header_end..=MAX_READ_VIRTUAL_SIZE).contains(&l.data_offset)
                {
                    self.captures.push(Capture {
                        slot,
                        offset: l.data_offset,
                        data: vec![0; l.data_len as usize],
                        filled: 0,
                    });
                }
            }
        }
        let table_offset = header.table_offset;
        self.header = Some(header);
        if bat_len == 0 {
            return self.on_bat(&[], out);
        }
        self.set_region(Stage::Bat, table_offset, bat_len);
        Ok(())
    }

    fn on_bat(&mut self, bat: &[u8], out: &mut Vec<Extent>) -> Result<(), VhdError> {
        let (Some(footer), Some(header)) = (self.footer.clone(), self.header.clone()) else {
            return Err(VhdError::Stopped("internal state"));
        };
        let layout = VhdLayout::sparse(footer, header, bat)?;
        let plan: Vec<u32> = layout.blocks_in_file_order().map(|l| l.index).collect();
        if let Some(first) = plan.first().and_then(|&i| layout.block_location(i))
            && first.file_offset < self.pos
        {
            return Err(VhdError::NotStreamable(format!(
                "block {} at byte {} comes before the end of the BAT at byte {}",
                first.index, first.file_offset, self.pos
            )));
        }
        let held = peak_held_blocks(&layout, &plan);
        let need = held * u64::from(layout.block_size());
        if need > self.opts.max_reorder_bytes {
            return Err(VhdError::NotStreamable(format!(
                "its blocks are stored out of virtual order; decoding forward would hold \
                 {held} blocks ({need} bytes) back, more than the {} allowed",
                self.opts.max_reorder_bytes
            )));
        }
        self.layout = Some(layout);
        self.plan = plan;
        self.plan_pos = 0;
        self.cursor = 0;
        self.advance_cursor(out);
        self.next_block_region();
        Ok(())
    }

    fn next_block_region(&mut self) {
        let next = self
            .plan
            .get(self.plan_pos)
            .and_then(|&i| self.layout.as_ref()?.block_location(i));
        match next {
            Some(loc) => self.set_region(Stage::Block, loc.file_offset, loc.file_len() as usize),
            None => {
                self.stage = Stage::Tail;
                self.tail_start = self.pos;
                self.buf = Vec::new();
            }
        }
    }

    fn on_block(&mut self, out: &mut Vec<Extent>) -> Result<(), VhdError> {
        let layout = self
            .layout
            .as_ref()
            .ok_or(VhdError::Stopped("internal state"))?;
        let index = self.plan[self.plan_pos];
        let extents = layout.block_extents(index, &self.buf)?;
        if index == self.cursor {
            for e in extents {
                self.emit(out, e);
            }
            self.cursor += 1;
            self.advance_cursor(out);
        } else {
            self.held.insert(index, extents);
        }
        self.plan_pos += 1;
        self.next_block_region();
        Ok(())
    }

    /// Emits every block from the cursor on that is unallocated or already held.
    fn advance_cursor(&mut self, out: &mut Vec<Extent>) {
        let Some(layout) = self.layout.take() else {
            return;
        };
        while self.cursor < layout.block_count() {
            let extents = if let Some(held) = self.held.remove(&self.cursor) {
                held
            } else if layout.block_location(self.cursor).is_none() {
                layout.unallocated_extents(self.cursor)
            } else {
                break;
            };
            for e in extents {
                self.emit(out, e);
            }
            self.cursor += 1;
        }
        self.layout = Some(layout);
    }

    /// Pushes an extent, merging adjacent zero extents (deterministically, whatever the input split).
    fn emit(&mut self, out: &mut Vec<Extent>, e: Extent) {
        match e.data {
            ExtentData::Zero(0) => {}
            ExtentData::Zero(n) => match &mut self.zero_run {
                Some((s, l)) if *s + *l == e.offset => *l += n,
                _ => {
                    self.flush_zero(out);
                    self.zero_run = Some((e.offset, n));
                }
            },
            ExtentData::Data(ref d) if d.is_empty() => {}
            ExtentData::Data(_) => {
                self.flush_zero(out);
                out.push(e);
            }
        }
    }

    fn flush_zero(&mut self, out: &mut Vec<Extent>) {
        if let Some((s, l)) = self.zero_run.take() {
            out.push(Extent::zero(s, l));
        }
    }

    fn enter_fixed(&mut self) {
        self.stage = Stage::Fixed;
        // The 512 bytes read so far are data; keep collecting chunk + footer.
        self.buf.reserve(FIXED_CHUNK as usize + FOOTER_SIZE);
    }

    /// Fixed disks: keeps up to one chunk plus 512 bytes (the possible footer) and emits
    /// each chunk once 512 more bytes have followed it. Returns the bytes taken.
    fn fixed_take(&mut self, input: &[u8], out: &mut Vec<Extent>) -> usize {
        let cap = FIXED_CHUNK as usize + FOOTER_SIZE;
        let n = (cap - self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..n]);
        if self.buf.len() == cap {
            let mut rest = Vec::with_capacity(cap);
            rest.extend_from_slice(&self.buf[FIXED_CHUNK as usize..]);
            self.buf.truncate(FIXED_CHUNK as usize);
            let chunk = std::mem::replace(&mut self.buf, rest);
            let off = self.fixed_emitted;
            self.fixed_emitted += u64::from(FIXED_CHUNK);
            self.emit_fixed_chunk(out, off, chunk);
        }
        n
    }

    fn emit_fixed_chunk(&mut self, out: &mut Vec<Extent>, off: u64, chunk: Vec<u8>) {
        let e = if is_all_zero(&chunk) {
            Extent::zero(off, chunk.len() as u64)
        } else {
            Extent::data(off, chunk)
        };
        self.emit(out, e);
    }

    fn finish_inner(&mut self, out: &mut Vec<Extent>) -> Result<(), VhdError> {
        match self.stage {
            Stage::FooterCopy => Err(VhdError::Truncated(format!(
                "stream ended after {} bytes; a VHD is at least one 512-byte footer",
                self.pos
            ))),
            Stage::Header | Stage::Bat | Stage::Block => {
                let what = match self.stage {
                    Stage::Header => "the dynamic header".to_owned(),
                    Stage::Bat => "the BAT".to_owned(),
                    _ => format!(
                        "block {} ({} of {} allocated)",
                        self.plan[self.plan_pos],
                        self.plan_pos + 1,
                        self.plan.len()
                    ),
                };
                let (off, len) = self.region;
                Err(VhdError::Truncated(format!(
                    "stream ended at byte {} but {what} occupies bytes {off}..{}",
                    self.pos,
                    off + len as u64
                )))
            }
            Stage::Tail => self.finish_sparse(out),
            Stage::Fixed => self.finish_fixed(out),
            Stage::Done | Stage::Failed => Err(VhdError::Stopped("internal state")),
        }
    }

    fn last_sector(&self) -> [u8; FOOTER_SIZE] {
        let mut t = [0u8; FOOTER_SIZE];
        for (k, b) in t.iter_mut().enumerate() {
            let p = self.pos - FOOTER_SIZE as u64 + k as u64;
            *b = self.ring[(p % FOOTER_SIZE as u64) as usize];
        }
        t
    }

    fn finish_sparse(&mut self, out: &mut Vec<Extent>) -> Result<(), VhdError> {
        let after = self.pos - self.tail_start;
        if after < FOOTER_SIZE as u64 {
            return Err(VhdError::Truncated(format!(
                "stream ended at byte {}, {after} bytes after the last block or table (byte {}); \
                 a VHD ends with a 512-byte footer",
                self.pos, self.tail_start
            )));
        }
        let at = self.pos - FOOTER_SIZE as u64;
        let trailing = Footer::parse(&self.last_sector(), at)?;
        let copy = self
            .footer
            .as_ref()
            .ok_or(VhdError::Stopped("internal state"))?;
        let differs =
            |field: &'static str, rel: u64, ours: String, theirs: String| VhdError::BadField {
                structure: "trailing footer",
                field,
                offset: at + rel,
                reason: format!("{ours} here, but {theirs} in the footer copy at byte 0"),
            };
        if trailing.current_size != copy.current_size {
            return Err(differs(
                "current_size",
                48,
                trailing.current_size.to_string(),
                copy.current_size.to_string(),
            ));
        }
        if trailing.disk_type != copy.disk_type {
            return Err(differs(
                "disk_type",
                60,
                format!("{:?}", trailing.disk_type),
                format!("{:?}", copy.disk_type),
            ));
        }
        if trailing.data_offset != copy.data_offset {
            return Err(differs(
                "data_offset",
                16,
                trailing.data_offset.to_string(),
                copy.data_offset.to_string(),
            ));
        }
        if trailing.unique_id != copy.unique_id {
            return Err(differs(
                "unique_id",
                68,
                trailing.unique_id.to_string(),
                copy.unique_id.to_string(),
            ));
        }
        self.flush_zero(out);
        Ok(())
    }

    fn finish_fixed(&mut self, out: &mut Vec<Extent>) -> Result<(), VhdError> {
        let held = self.buf.len();
        let total = self.fixed_emitted + held as u64;
        let not_a_vhd = || VhdError::BadCookie {
            structure: "footer",
            offset: 0,
            found: String::from_utf8_lossy(&self.first_cookie).into_owned(),
            expected: "conectix",
        };
        if held < FOOTER_SIZE {
            return Err(not_a_vhd());
        }
        let at = total - FOOTER_SIZE as u64;
        let footer = match Footer::parse(&self.buf[held - FOOTER_SIZE..], at) {
            Err(VhdError::BadCookie { .. }) => return Err(not_a_vhd()),
            Err(e) => return Err(e),
            // The trailing footer of a sparse disk whose copy at byte 0 is damaged.
            Ok(f) if f.disk_type != DiskType::Fixed => return Err(not_a_vhd()),
            Ok(f) => f,
        };
        if footer.current_size != at {
            return Err(VhdError::BadField {
                structure: "footer",
                field: "current_size",
                offset: at + 48,
                reason: format!(
                    "a fixed disk of {} bytes, but {at} bytes of data precede the footer",
                    footer.current_size
                ),
            });
        }
        let layout = VhdLayout::fixed(footer.clone(), at)?;
        let mut data = std::mem::take(&mut self.buf);
        data.truncate(held - FOOTER_SIZE);
        let off = self.fixed_emitted;
        self.emit_fixed_chunk(out, off, data);
        self.flush_zero(out);
        self.footer = Some(footer);
        self.layout = Some(layout);
        Ok(())
    }
}

/// How many blocks a forward decoder must hold at most when blocks arrive in `plan` order.
fn peak_held_blocks(layout: &VhdLayout, plan: &[u32]) -> u64 {
    let n = layout.block_count() as usize;
    let mut arrived = vec![false; n];
    let (mut cursor, mut held, mut peak) = (0usize, 0u64, 0u64);
    for &i in plan {
        arrived[i as usize] = true;
        held += 1;
        while cursor < n {
            let allocated = layout.block_location(cursor as u32).is_some();
            if allocated && !arrived[cursor] {
                break;
            }
            if allocated {
                held -= 1;
            }
            cursor += 1;
        }
        peak = peak.max(held);
    }
    peak
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vhd::{VhdSpec, encode_extents};

    fn layout_with_order(order: &[u32], blocks: u32) -> (VhdLayout, Vec<u32>) {
        let size = u64::from(blocks) * (2 << 20);
        let v = encode_extents(
            VhdSpec::dynamic(size, Uuid::nil()),
            &(0..blocks)
                .map(|b| Extent::data(u64::from(b) << 21, vec![1; 512]))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let f = Footer::parse(&v[..512], 0).unwrap();
        let h = DynamicHeader::parse(&v[512..1536], 512).unwrap();
        let n = VhdLayout::bat_bytes_needed(&f, &h).unwrap();
        let l = VhdLayout::sparse(f, h, &v[2048..2048 + n]).unwrap();
        (l, order.to_vec())
    }

    #[test]
    fn held_blocks_peak() {
        let (l, plan) = layout_with_order(&[0, 1, 2, 3], 4);
        assert_eq!(peak_held_blocks(&l, &plan), 0);
        let (l, plan) = layout_with_order(&[3, 2, 1, 0], 4);
        assert_eq!(peak_held_blocks(&l, &plan), 3);
        let (l, plan) = layout_with_order(&[1, 0, 3, 2], 4);
        assert_eq!(peak_held_blocks(&l, &plan), 1);
    }

    #[test]
    fn short_and_empty_streams() {
        let mut d = VhdDecoder::new();
        assert!(matches!(d.finish(), Err(VhdError::Truncated(_))));
        assert!(matches!(d.finish(), Err(VhdError::Stopped(_))));
        let v = encode_extents(VhdSpec::dynamic(0, Uuid::nil()), &[]).unwrap();
        let mut d = VhdDecoder::new();
        assert!(d.feed(&v).unwrap().is_empty());
        assert!(d.finish().unwrap().is_empty());
        assert!(matches!(d.feed(&[0]), Err(VhdError::Stopped(_))));
    }
}
