//! `VhdLayout`: a VHD's metadata checked and indexed, for random-access readers and
//! for the push decoder: where each block lives and how to turn it into extents.

use xenvault_types::Extent;
use xenvault_types::extent::is_all_zero;

use super::VhdError;
use super::footer::{DiskType, FOOTER_SIZE, Footer};
use super::header::{DynamicHeader, HEADER_SIZE};

/// Largest virtual size the reader accepts (2 TiB; XAPI's limit is 2040 GiB).
pub const MAX_READ_VIRTUAL_SIZE: u64 = 2 << 40;
/// Smallest block size the reader accepts.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size the reader accepts (bounds the decoder's per-block buffer).
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;
/// Most blocks a virtual disk may have (bounds the BAT held in memory: 8 MiB).
pub const MAX_BLOCKS: u64 = 1 << 21;
/// Chunk size used to split fixed disks into blocks.
pub const FIXED_CHUNK: u32 = 2 << 20;

const UNALLOCATED: u32 = u32::MAX;

/// Where one block of the virtual disk is stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLocation {
    /// Block number (virtual offset / block size).
    pub index: u32,
    /// First virtual byte of the block.
    pub virtual_offset: u64,
    /// Virtual bytes in this block (the last block of a disk may be short).
    pub virtual_len: u64,
    /// File offset of the block: its sector bitmap, then its data.
    pub file_offset: u64,
    /// Bytes of sector bitmap before the data (0 for fixed disks).
    pub bitmap_len: u64,
    /// Bytes of data stored after the bitmap.
    pub data_len: u64,
}

impl BlockLocation {
    /// Bytes to read at `file_offset` to decode the block (bitmap + data).
    pub fn file_len(&self) -> u64 {
        self.bitmap_len + self.data_len
    }
}

/// A VHD's checked metadata: footer, header and BAT, indexed by block.
///
/// Build it with [`VhdLayout::sparse`] (dynamic and differencing disks) or
/// [`VhdLayout::fixed`]. Memory: 4 bytes per block of the BAT plus 4 per allocated
/// block, at most [`MAX_BLOCKS`] blocks (≤ 16 MiB).
#[derive(Debug, Clone)]
pub struct VhdLayout {
    footer: Footer,
    header: Option<DynamicHeader>,
    bat: Vec<u32>,
    file_order: Vec<u32>,
    block_size: u32,
    block_count: u32,
    bitmap_len: u64,
}

impl VhdLayout {
    /// Checks a sparse disk's footer and header and returns how many BAT bytes to read
    /// at `header.table_offset` (4 per block the virtual size needs). Call it before
    /// allocating a buffer for the BAT.
    pub fn bat_bytes_needed(footer: &Footer, header: &DynamicHeader) -> Result<usize, VhdError> {
        let (_, count) = check_sparse(footer, header)?;
        Ok(count as usize * 4)
    }

    /// The layout of a dynamic or differencing disk. `bat` holds at least
    /// [`VhdLayout::bat_bytes_needed`] bytes read at `header.table_offset`.
    ///
    /// Every allocated block must lie after the footer copy and outside the header
    /// and the BAT, and blocks must not overlap one another.
    pub fn sparse(
        footer: Footer,
        header: DynamicHeader,
        bat: &[u8],
    ) -> Result<VhdLayout, VhdError> {
        let (block_size, block_count) = check_sparse(&footer, &header)?;
        let need = block_count as usize * 4;
        if bat.len() < need {
            return Err(VhdError::Truncated(format!(
                "BAT at byte {} needs {need} bytes for {block_count} blocks, got {}",
                header.table_offset,
                bat.len()
            )));
        }
        let bitmap_len = header.bitmap_len();
        let block_file_len = bitmap_len + u64::from(block_size);
        let header_span = (footer.data_offset, footer.data_offset + HEADER_SIZE as u64);
        let bat_span = (
            header.table_offset,
            header.table_offset + u64::from(header.max_table_entries) * 4,
        );
        let mut entries = Vec::with_capacity(block_count as usize);
        let mut placed: Vec<(u64, u32)> = Vec::new();
        for (i, raw) in bat[..need].chunks_exact(4).enumerate() {
            let e = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            entries.push(e);
            if e == UNALLOCATED {
                continue;
            }
            let at = u64::from(e) * 512;
            let span = (at, at + block_file_len);
            let bad = |reason: String| VhdError::BadField {
                structure: "BAT",
                field: "entry",
                offset: header.table_offset + 4 * i as u64,
                reason: format!("block {i} at byte {at}: {reason}"),
            };
            if at < FOOTER_SIZE as u64 {
                return Err(bad("overlaps the footer copy at byte 0".into()));
            }
            if overlaps(span, header_span) {
                return Err(bad("overlaps the dynamic header".into()));
            }
            if overlaps(span, bat_span) {
                return Err(bad("overlaps the BAT".into()));
            }
            placed.push((at, i as u32));
        }
        placed.sort_unstable();
        for w in placed.windows(2) {
            if w[0].0 + block_file_len > w[1].0 {
                return Err(VhdError::BadField {
                    structure: "BAT",
                    field: "entry",
                    offset: header.table_offset + 4 * u64::from(w[1].1),
                    reason: format!(
                        "block {} at byte {} overlaps block {} at byte {}",
                        w[1].1, w[1].0, w[0].1, w[0].0
                    ),
                });
            }
        }
        Ok(VhdLayout {
            footer,
            header: Some(header),
            bat: entries,
            file_order: placed.into_iter().map(|(_, i)| i).collect(),
            block_size,
            block_count,
            bitmap_len,
        })
    }

    /// The layout of a fixed disk: data at bytes `0..current_size`, the footer after it.
    /// `footer_at` is where the footer was read (for error messages).
    pub fn fixed(footer: Footer, footer_at: u64) -> Result<VhdLayout, VhdError> {
        if footer.disk_type != DiskType::Fixed {
            return Err(VhdError::BadField {
                structure: "footer",
                field: "disk_type",
                offset: footer_at + 60,
                reason: format!("{:?} disk given to VhdLayout::fixed", footer.disk_type),
            });
        }
        check_size(&footer, footer_at)?;
        let block_count = footer.current_size.div_ceil(u64::from(FIXED_CHUNK));
        Ok(VhdLayout {
            footer,
            header: None,
            bat: Vec::new(),
            file_order: Vec::new(),
            block_size: FIXED_CHUNK,
            block_count: block_count as u32,
            bitmap_len: 0,
        })
    }

    /// The footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The dynamic header (`None` for fixed disks).
    pub fn header(&self) -> Option<&DynamicHeader> {
        self.header.as_ref()
    }

    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.footer.current_size
    }

    /// Block size in bytes (2 MiB chunks for fixed disks).
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks covering the virtual size.
    pub fn block_count(&self) -> u32 {
        self.block_count
    }

    /// Number of allocated blocks (all blocks for fixed disks).
    pub fn allocated_count(&self) -> usize {
        if self.header.is_some() {
            self.file_order.len()
        } else {
            self.block_count as usize
        }
    }

    /// Where block `index` is stored; `None` when it is unallocated or out of range.
    pub fn block_location(&self, index: u32) -> Option<BlockLocation> {
        if index >= self.block_count {
            return None;
        }
        let virtual_offset = u64::from(index) * u64::from(self.block_size);
        let virtual_len =
            (self.footer.current_size - virtual_offset).min(u64::from(self.block_size));
        if self.header.is_none() {
            return Some(BlockLocation {
                index,
                virtual_offset,
                virtual_len,
                file_offset: virtual_offset,
                bitmap_len: 0,
                data_len: virtual_len,
            });
        }
        let e = *self.bat.get(index as usize)?;
        (e != UNALLOCATED).then(|| BlockLocation {
            index,
            virtual_offset,
            virtual_len,
            file_offset: u64::from(e) * 512,
            bitmap_len: self.bitmap_len,
            data_len: u64::from(self.block_size),
        })
    }

    /// Allocated blocks in increasing file offset (the order a forward stream carries them).
    pub fn blocks_in_file_order(&self) -> impl Iterator<Item = BlockLocation> + '_ {
        let fixed = self.header.is_none();
        let n = if fixed { self.block_count } else { 0 };
        (0..n)
            .chain(self.file_order.iter().copied())
            .filter_map(|i| self.block_location(i))
    }

    /// File offset just past the last allocated block (or past the metadata when none is).
    pub fn data_end(&self) -> u64 {
        match &self.header {
            None => self.footer.current_size,
            Some(h) => {
                let meta = (self.footer.data_offset + HEADER_SIZE as u64)
                    .max(h.table_offset + h.bat_len_padded());
                self.file_order
                    .last()
                    .and_then(|&i| self.block_location(i))
                    .map_or(meta, |l| (l.file_offset + l.file_len()).max(meta))
            }
        }
    }

    /// The extents of an unallocated block: one zero extent for a dynamic disk, none for a
    /// differencing disk (those sectors belong to the parent).
    pub fn unallocated_extents(&self, index: u32) -> Vec<Extent> {
        if index >= self.block_count || self.footer.disk_type == DiskType::Differencing {
            return Vec::new();
        }
        let off = u64::from(index) * u64::from(self.block_size);
        let len = (self.footer.current_size - off).min(u64::from(self.block_size));
        vec![Extent::zero(off, len)]
    }

    /// Decodes block `index` from the bytes stored at its [`BlockLocation`] (bitmap then
    /// data; at least `file_len()` bytes). Dynamic disks: sectors not set in the bitmap
    /// become zero extents. Differencing disks: they are left out. Fixed disks: one data
    /// extent, or a zero extent when the chunk is all zeros.
    pub fn block_extents(&self, index: u32, stored: &[u8]) -> Result<Vec<Extent>, VhdError> {
        let loc = self.block_location(index).ok_or_else(|| {
            VhdError::InvalidInput(format!(
                "block {index} is unallocated or beyond the {} blocks of this disk",
                self.block_count
            ))
        })?;
        if (stored.len() as u64) < loc.file_len() {
            return Err(VhdError::Truncated(format!(
                "block {index} at byte {} needs {} bytes, got {}",
                loc.file_offset,
                loc.file_len(),
                stored.len()
            )));
        }
        let vlen = loc.virtual_len as usize;
        if self.header.is_none() {
            let data = &stored[..vlen];
            return Ok(vec![if is_all_zero(data) {
                Extent::zero(loc.virtual_offset, loc.virtual_len)
            } else {
                Extent::data(loc.virtual_offset, data.to_vec())
            }]);
        }
        let (bitmap, data) = stored.split_at(loc.bitmap_len as usize);
        let lsb = self.footer.legacy_lsb_bitmaps();
        let differencing = self.footer.disk_type == DiskType::Differencing;
        let sectors = vlen.div_ceil(512);
        let mut out = Vec::new();
        let mut s = 0;
        while s < sectors {
            let present = sector_present(bitmap, s, lsb);
            let mut e = s + 1;
            while e < sectors && sector_present(bitmap, e, lsb) == present {
                e += 1;
            }
            let (a, b) = (s * 512, (e * 512).min(vlen));
            let off = loc.virtual_offset + a as u64;
            if present {
                out.push(Extent::data(off, data[a..b].to_vec()));
            } else if !differencing {
                out.push(Extent::zero(off, (b - a) as u64));
            }
            s = e;
        }
        Ok(out)
    }
}

/// True when sector `s` is set in a block bitmap: MSB-first (xapi-facts.md §5.3), or
/// LSB-first for tapdisk 0.1 files.
pub(crate) fn sector_present(bitmap: &[u8], s: usize, lsb_first: bool) -> bool {
    let byte = bitmap[s / 8];
    let bit = s % 8;
    if lsb_first {
        byte & (1 << bit) != 0
    } else {
        byte & (0x80 >> bit) != 0
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn check_size(footer: &Footer, footer_at: u64) -> Result<(), VhdError> {
    if footer.current_size > MAX_READ_VIRTUAL_SIZE {
        return Err(VhdError::BadField {
            structure: "footer",
            field: "current_size",
            offset: footer_at + 48,
            reason: format!(
                "{} bytes is larger than the 2 TiB a VHD can hold",
                footer.current_size
            ),
        });
    }
    Ok(())
}

/// Checks the footer and header of a sparse disk; returns (block size, block count).
fn check_sparse(footer: &Footer, header: &DynamicHeader) -> Result<(u32, u32), VhdError> {
    if !footer.disk_type.is_sparse() {
        return Err(VhdError::BadField {
            structure: "footer",
            field: "disk_type",
            offset: 60,
            reason: "a fixed disk has no dynamic header or BAT".into(),
        });
    }
    check_size(footer, 0)?;
    let h = footer.data_offset;
    if h < FOOTER_SIZE as u64 || h > MAX_READ_VIRTUAL_SIZE {
        return Err(VhdError::BadField {
            structure: "footer",
            field: "data_offset",
            offset: 16,
            reason: format!("{h} cannot hold the dynamic header (expected 512)"),
        });
    }
    let bs = header.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(VhdError::BadField {
            structure: "dynamic header",
            field: "block_size",
            offset: h + 32,
            reason: format!(
                "{bs} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} (XAPI uses 2 MiB)"
            ),
        });
    }
    let count = footer.current_size.div_ceil(u64::from(bs));
    if count > MAX_BLOCKS {
        return Err(VhdError::BadField {
            structure: "dynamic header",
            field: "block_size",
            offset: h + 32,
            reason: format!(
                "{count} blocks of {bs} bytes exceed the reader's limit of {MAX_BLOCKS}"
            ),
        });
    }
    if count > u64::from(header.max_table_entries) {
        return Err(VhdError::BadField {
            structure: "dynamic header",
            field: "max_table_entries",
            offset: h + 28,
            reason: format!(
                "{} entries cannot map {} bytes in {bs}-byte blocks ({count} needed)",
                header.max_table_entries, footer.current_size
            ),
        });
    }
    let t = header.table_offset;
    if t < FOOTER_SIZE as u64 || t > MAX_READ_VIRTUAL_SIZE {
        return Err(VhdError::BadField {
            structure: "dynamic header",
            field: "table_offset",
            offset: h + 16,
            reason: format!("{t} is not an offset after the footer copy"),
        });
    }
    if overlaps(
        (t, t + u64::from(header.max_table_entries) * 4),
        (h, h + HEADER_SIZE as u64),
    ) {
        return Err(VhdError::BadField {
            structure: "dynamic header",
            field: "table_offset",
            offset: h + 16,
            reason: format!("the BAT at {t} overlaps the dynamic header at {h}"),
        });
    }
    Ok((bs, count as u32))
}
