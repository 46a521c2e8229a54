//! The streaming VHD encoder: dynamic and differencing disks laid out as xapi's
//! `export_raw_vdi?format=vhd` does (footer copy, header, BAT, blocks ascending, footer).

use uuid::Uuid;
use xenvault_types::extent::is_all_zero;
use xenvault_types::{Extent, ExtentData};

use super::VhdError;
use super::decoder::MAX_LOCATOR_DATA;
use super::footer::{DiskType, FOOTER_SIZE, Footer};
use super::header::{
    BATMAP_VERSION_1_2, BatmapHeader, DynamicHeader, HEADER_SIZE, HEADER_VERSION, LOCATOR_SLOTS,
    ParentLocator, PlatformCode, bitmap_len_for,
};
use super::layout::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

/// Largest virtual size the encoder writes (XAPI's `max_vhd_size`, 2040 GiB).
pub const MAX_WRITE_VIRTUAL_SIZE: u64 = 2040 << 30;
/// The block size XAPI, SM and blktap use.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Offset of the dynamic header in what we write.
const HEADER_AT: u64 = FOOTER_SIZE as u64;
/// Where locator data starts (right after the header), as in xapi's streams.
const LOCATORS_AT: u64 = HEADER_AT + HEADER_SIZE as u64;
/// Lowest BAT offset: xapi puts the BAT at 2048 after one zero (or locator) sector.
const MIN_TABLE_OFFSET: u64 = 2048;

/// What to write: size, identity and, for a differencing disk, its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdSpec {
    /// Virtual size in bytes: a multiple of 512, at most [`MAX_WRITE_VIRTUAL_SIZE`].
    pub virtual_size: u64,
    /// The footer unique id (XO writes the VDI uuid here; xapi a random one).
    pub unique_id: Uuid,
    /// Footer timestamp, seconds since 2000-01-01 (xapi writes 0).
    pub timestamp: u32,
    /// Block size; keep [`DEFAULT_BLOCK_SIZE`] for anything XAPI reads.
    pub block_size: u32,
    /// `Some` for a differencing disk.
    pub parent: Option<ParentSpec>,
}

/// The parent reference written into a differencing disk's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    /// The parent VHD's footer unique id.
    pub unique_id: Uuid,
    /// The parent's modification time (seconds since 2000-01-01), or 0.
    pub timestamp: u32,
    /// The parent's name (at most 256 UTF-16 units), e.g. its file name.
    pub unicode_name: String,
    /// Up to 8 locators (e.g. `MacX` with a relative path).
    pub locators: Vec<LocatorSpec>,
}

/// One parent locator to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatorSpec {
    /// `MacX` (UTF-8 `file://` URL), `W2RU` or `W2KU` (UTF-16LE).
    pub platform: PlatformCode,
    /// The path (`MacX` gets a `file://` prefix unless it has one).
    pub path: String,
}

impl VhdSpec {
    /// A dynamic disk with 2 MiB blocks and timestamp 0.
    pub fn dynamic(virtual_size: u64, unique_id: Uuid) -> VhdSpec {
        VhdSpec {
            virtual_size,
            unique_id,
            timestamp: 0,
            block_size: DEFAULT_BLOCK_SIZE,
            parent: None,
        }
    }

    /// A differencing disk over `parent`, with 2 MiB blocks and timestamp 0.
    pub fn differencing(virtual_size: u64, unique_id: Uuid, parent: ParentSpec) -> VhdSpec {
        VhdSpec {
            parent: Some(parent),
            ..VhdSpec::dynamic(virtual_size, unique_id)
        }
    }

    /// Dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        if self.parent.is_some() {
            DiskType::Differencing
        } else {
            DiskType::Dynamic
        }
    }

    /// Number of blocks covering the virtual size.
    pub fn block_count(&self) -> u64 {
        self.virtual_size
            .div_ceil(u64::from(self.block_size.max(1)))
    }
}

/// A piece of a block's content: bytes, or a run of zeros.
enum Piece<'a> {
    Data(&'a [u8]),
    Zero(u64),
}

/// Streaming VHD encoder.
///
/// Give it the spec and the set of allocated blocks up front (the BAT precedes the
/// data), then write [`prologue`](VhdEncoder::prologue), each allocated block in
/// ascending order ([`encode_block`](VhdEncoder::encode_block) or
/// [`encode_block_extents`](VhdEncoder::encode_block_extents)), and
/// [`finish`](VhdEncoder::finish). The concatenation is a VHD of exactly
/// [`total_len`](VhdEncoder::total_len) bytes, in the order xapi's VHD import reads
/// (metadata first, blocks ascending in both file and virtual order).
///
/// The footer says creator `tap\0` version 1.3, so qemu trusts `current_size`; blktap
/// expects a batmap from that version on, and the prologue carries a valid one
/// (docs/xapi-notes.md `## VHD`).
#[derive(Debug, Clone)]
pub struct VhdEncoder {
    footer: Footer,
    prologue: Vec<u8>,
    allocated: Vec<u32>,
    next: usize,
    block_size: u32,
    bitmap_len: usize,
    first_block_at: u64,
}

impl VhdEncoder {
    /// Prepares an encoder. `allocated_blocks` are block numbers (virtual offset / block
    /// size); duplicates are ignored; each must be below the block count.
    pub fn new(
        spec: VhdSpec,
        allocated_blocks: impl IntoIterator<Item = u32>,
    ) -> Result<VhdEncoder, VhdError> {
        let bad = |m: String| Err(VhdError::InvalidInput(m));
        if !spec.virtual_size.is_multiple_of(512) {
            return bad(format!(
                "virtual size {} is not a whole number of 512-byte sectors; round it up",
                spec.virtual_size
            ));
        }
        if spec.virtual_size > MAX_WRITE_VIRTUAL_SIZE {
            return bad(format!(
                "virtual size {} exceeds the VHD maximum of 2040 GiB",
                spec.virtual_size
            ));
        }
        let bs = spec.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return bad(format!(
                "block size {bs} is not a power of two in 512..16 MiB"
            ));
        }
        let block_count = u32::try_from(spec.block_count())
            .map_err(|_| VhdError::InvalidInput("too many blocks".into()))?;
        let mut allocated: Vec<u32> = allocated_blocks.into_iter().collect();
        allocated.sort_unstable();
        allocated.dedup();
        if let Some(&last) = allocated.last()
            && last >= block_count
        {
            return bad(format!(
                "block {last} is allocated, but a {}-byte disk has only {block_count} blocks",
                spec.virtual_size
            ));
        }

        // Parent locator data right after the header (xapi: one sector at 1536).
        let mut locators = [ParentLocator::default(); LOCATOR_SLOTS];
        let mut locator_data: Vec<u8> = Vec::new();
        let parent = spec.parent.clone();
        if let Some(p) = &parent {
            if p.locators.len() > LOCATOR_SLOTS {
                return bad(format!(
                    "{} parent locators given; a VHD header has {LOCATOR_SLOTS} slots",
                    p.locators.len()
                ));
            }
            for (slot, l) in p.locators.iter().enumerate() {
                let data = ParentLocator::encode_path(l.platform, &l.path)?;
                if data.len() > MAX_LOCATOR_DATA as usize {
                    return bad(format!(
                        "parent locator {slot} is {} bytes long",
                        data.len()
                    ));
                }
                let sectors = data.len().div_ceil(512).max(1);
                locators[slot] = ParentLocator {
                    platform: l.platform,
                    data_space: sectors as u32,
                    data_len: data.len() as u32,
                    data_offset: LOCATORS_AT + locator_data.len() as u64,
                };
                locator_data.extend_from_slice(&data);
                locator_data.resize(locator_data.len().div_ceil(512) * 512, 0);
            }
        }
        let table_offset = (LOCATORS_AT + locator_data.len() as u64).max(MIN_TABLE_OFFSET);
        let bat_padded = (u64::from(block_count) * 4).div_ceil(512) * 512;
        let batmap_header_at = table_offset + bat_padded;
        let batmap_at = batmap_header_at + 512;
        // blktap's batmap size: secs_round_up_no_zero(current_size >> (21 + 3)).
        let batmap_sectors = (spec.virtual_size >> 24).div_ceil(512).max(1);
        let first_block_at = batmap_at + batmap_sectors * 512;
        let bitmap_len = bitmap_len_for(bs) as usize;
        let block_file_len = bitmap_len as u64 + u64::from(bs);
        let blocks_end = first_block_at + allocated.len() as u64 * block_file_len;
        if blocks_end / 512 >= u64::from(u32::MAX) {
            return bad("the blocks would lie beyond the 2 TiB a BAT can address".into());
        }

        let footer = Footer {
            timestamp: spec.timestamp,
            ..Footer::new_sparse(spec.disk_type(), spec.virtual_size, spec.unique_id)
        };
        let header = DynamicHeader {
            data_offset: u64::MAX,
            table_offset,
            header_version: HEADER_VERSION,
            max_table_entries: block_count,
            block_size: bs,
            parent_unique_id: parent.as_ref().map_or(Uuid::nil(), |p| p.unique_id),
            parent_timestamp: parent.as_ref().map_or(0, |p| p.timestamp),
            parent_unicode_name: parent
                .as_ref()
                .map_or(String::new(), |p| p.unicode_name.clone()),
            parent_locators: locators,
        };

        let mut pro = Vec::with_capacity(first_block_at as usize);
        pro.extend_from_slice(&footer.to_bytes());
        pro.extend_from_slice(&header.to_bytes()?);
        pro.extend_from_slice(&locator_data);
        pro.resize(table_offset as usize, 0);
        let mut bat = vec![0xFFu8; bat_padded as usize];
        for (k, &i) in allocated.iter().enumerate() {
            let sector = (first_block_at + k as u64 * block_file_len) / 512;
            bat[i as usize * 4..i as usize * 4 + 4].copy_from_slice(&(sector as u32).to_be_bytes());
        }
        pro.extend_from_slice(&bat);
        // Batmap: a bit per block, set when the block is fully allocated. Dynamic disks
        // are written with full bitmaps; differencing blocks may be partial, so no bits.
        let mut map = vec![0u8; (batmap_sectors * 512) as usize];
        if parent.is_none() {
            let covered = (batmap_sectors * 512 * 8) as u32;
            for &i in allocated.iter().filter(|&&i| i < covered) {
                map[i as usize / 8] |= 0x80 >> (i % 8);
            }
        }
        let batmap = BatmapHeader {
            batmap_offset: batmap_at,
            batmap_size: batmap_sectors as u32,
            version: BATMAP_VERSION_1_2,
            checksum: BatmapHeader::checksum_of(&map),
            marker: 0,
        };
        pro.extend_from_slice(&batmap.to_bytes());
        pro.extend_from_slice(&map);
        debug_assert_eq!(pro.len() as u64, first_block_at);

        Ok(VhdEncoder {
            footer,
            prologue: pro,
            allocated,
            next: 0,
            block_size: bs,
            bitmap_len,
            first_block_at,
        })
    }

    /// The footer written at byte 0 and at the end.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The allocated blocks, ascending: the order to encode them in.
    pub fn allocated_blocks(&self) -> &[u32] {
        &self.allocated
    }

    /// The next block to encode, or `None` when all are done.
    pub fn next_block(&self) -> Option<u32> {
        self.allocated.get(self.next).copied()
    }

    /// Length of the whole VHD (for a `Content-Length`).
    pub fn total_len(&self) -> u64 {
        self.first_block_at
            + self.allocated.len() as u64 * (self.bitmap_len as u64 + u64::from(self.block_size))
            + FOOTER_SIZE as u64
    }

    /// The bytes before the first block: footer copy, dynamic header, parent locator
    /// data, BAT and batmap.
    pub fn prologue(&self) -> &[u8] {
        &self.prologue
    }

    /// Encodes block `index` with every sector present (bitmap all ones, as xapi
    /// writes). `data` is the whole block, or for the last block of a disk whose size is
    /// not a multiple of the block size, just the bytes up to the virtual size.
    pub fn encode_block(&mut self, index: u32, data: &[u8]) -> Result<Vec<u8>, VhdError> {
        let vlen = self.virtual_len(index);
        if data.len() as u64 != vlen && data.len() != self.block_size as usize {
            return Err(VhdError::InvalidInput(format!(
                "block {index} needs {vlen} or {} bytes, got {}",
                self.block_size,
                data.len()
            )));
        }
        let start = u64::from(index) * u64::from(self.block_size);
        let n = (data.len() as u64).min(vlen) as usize;
        self.encode_pieces(index, true, [(start, Piece::Data(&data[..n]))].into_iter())
    }

    /// Encodes block `index` from extents lying inside it (increasing, not overlapping).
    /// Dynamic disks: every sector is marked present, the gaps are zeros. Differencing
    /// disks: only the sectors the extents cover are marked (zero extents included:
    /// they override the parent), so the extents must be 512-byte aligned.
    pub fn encode_block_extents(
        &mut self,
        index: u32,
        extents: &[Extent],
    ) -> Result<Vec<u8>, VhdError> {
        let full = self.footer.disk_type == DiskType::Dynamic;
        let pieces = extents.iter().map(|e| {
            (
                e.offset,
                match &e.data {
                    ExtentData::Data(d) => Piece::Data(d),
                    ExtentData::Zero(n) => Piece::Zero(*n),
                },
            )
        });
        self.encode_pieces(index, full, pieces)
    }

    /// The trailing footer. Fails if some announced block was not encoded.
    pub fn finish(&self) -> Result<[u8; FOOTER_SIZE], VhdError> {
        if let Some(missing) = self.next_block() {
            return Err(VhdError::InvalidInput(format!(
                "block {missing} and {} more were announced in the BAT but not encoded",
                self.allocated.len() - self.next - 1
            )));
        }
        Ok(self.footer.to_bytes())
    }

    fn virtual_len(&self, index: u32) -> u64 {
        let start = u64::from(index) * u64::from(self.block_size);
        self.footer
            .current_size
            .saturating_sub(start)
            .min(u64::from(self.block_size))
    }

    fn encode_pieces<'a>(
        &mut self,
        index: u32,
        full: bool,
        pieces: impl Iterator<Item = (u64, Piece<'a>)>,
    ) -> Result<Vec<u8>, VhdError> {
        match self.next_block() {
            Some(i) if i == index => {}
            Some(i) => {
                return Err(VhdError::InvalidInput(format!(
                    "block {index} given, but block {i} is next (allocated blocks go in ascending order)"
                )));
            }
            None => {
                return Err(VhdError::InvalidInput(format!(
                    "block {index} given, but every allocated block is already encoded"
                )));
            }
        }
        let bs = self.block_size as usize;
        let start = u64::from(index) * bs as u64;
        let end = start + self.virtual_len(index);
        let mut out = vec![0u8; self.bitmap_len + bs];
        let (bitmap, data) = out.split_at_mut(self.bitmap_len);
        let mut cursor = start;
        for (off, piece) in pieces {
            let len = match piece {
                Piece::Data(d) => d.len() as u64,
                Piece::Zero(n) => n,
            };
            if len == 0 {
                continue;
            }
            if off < cursor || off + len > end {
                return Err(VhdError::InvalidInput(format!(
                    "extent {off}..{} is out of order or outside block {index} ({start}..{end})",
                    off + len
                )));
            }
            if !full && (!off.is_multiple_of(512) || !(off + len).is_multiple_of(512)) {
                return Err(VhdError::InvalidInput(format!(
                    "extent {off}..{} of a differencing disk is not 512-byte aligned; \
                     a partial sector cannot be marked present",
                    off + len
                )));
            }
            let a = (off - start) as usize;
            if let Piece::Data(d) = piece {
                data[a..a + d.len()].copy_from_slice(d);
            }
            if !full {
                for s in a / 512..(a + len as usize) / 512 {
                    bitmap[s / 8] |= 0x80 >> (s % 8);
                }
            }
            cursor = off + len;
        }
        if full {
            let sectors = bs / 512;
            bitmap[..sectors / 8].fill(0xFF);
            for s in sectors / 8 * 8..sectors {
                bitmap[s / 8] |= 0x80 >> (s % 8);
            }
        }
        self.next += 1;
        Ok(out)
    }
}

/// The blocks a VHD of `spec` needs to hold `extents`: for a dynamic disk, the blocks
/// holding non-zero data; for a differencing disk, every block an extent touches
/// (zero extents too: they override the parent).
pub fn blocks_for_extents(spec: &VhdSpec, extents: &[Extent]) -> Result<Vec<u32>, VhdError> {
    check_extents(spec, extents)?;
    let bs = u64::from(spec.block_size);
    let mut blocks: Vec<u32> = Vec::new();
    let mut push = |b: u64| {
        if blocks.last() != Some(&(b as u32)) {
            blocks.push(b as u32);
        }
    };
    for e in extents.iter().filter(|e| !e.is_empty()) {
        let (first, last) = (e.offset / bs, (e.end() - 1) / bs);
        for b in first..=last {
            match &e.data {
                ExtentData::Zero(_) if spec.parent.is_none() => {}
                ExtentData::Data(d) if spec.parent.is_none() => {
                    let lo = (b * bs).max(e.offset) - e.offset;
                    let hi = ((b + 1) * bs).min(e.end()) - e.offset;
                    if !is_all_zero(&d[lo as usize..hi as usize]) {
                        push(b);
                    }
                }
                _ => push(b),
            }
        }
    }
    Ok(blocks)
}

/// Writes a whole VHD for `extents` (increasing, not overlapping, inside the virtual
/// size) to `sink`, piece by piece. Two passes over the extents, no copy of the disk.
pub fn encode_extents_to(
    spec: VhdSpec,
    extents: &[Extent],
    sink: &mut dyn FnMut(&[u8]),
) -> Result<(), VhdError> {
    let blocks = blocks_for_extents(&spec, extents)?;
    let bs = u64::from(spec.block_size);
    let full = spec.parent.is_none();
    let mut enc = VhdEncoder::new(spec, blocks.iter().copied())?;
    sink(enc.prologue());
    let mut first = 0usize;
    for &b in &blocks {
        let (lo, hi) = (u64::from(b) * bs, (u64::from(b) + 1) * bs);
        while first < extents.len() && extents[first].end() <= lo {
            first += 1;
        }
        let pieces = extents[first..]
            .iter()
            .take_while(|e| e.offset < hi)
            .filter(|e| !e.is_empty())
            .map(|e| {
                let a = e.offset.max(lo);
                let z = e.end().min(hi);
                let piece = match &e.data {
                    ExtentData::Data(d) => {
                        Piece::Data(&d[(a - e.offset) as usize..(z - e.offset) as usize])
                    }
                    ExtentData::Zero(_) => Piece::Zero(z - a),
                };
                (a, piece)
            });
        let bytes = enc.encode_pieces(b, full, pieces)?;
        sink(&bytes);
    }
    sink(&enc.finish()?);
    Ok(())
}

/// Encodes a whole VHD for `extents` into memory (for files and tests).
pub fn encode_extents(spec: VhdSpec, extents: &[Extent]) -> Result<Vec<u8>, VhdError> {
    let mut out = Vec::new();
    encode_extents_to(spec, extents, &mut |b: &[u8]| out.extend_from_slice(b))?;
    Ok(out)
}

fn check_extents(spec: &VhdSpec, extents: &[Extent]) -> Result<(), VhdError> {
    let mut end = 0;
    for e in extents {
        if e.offset < end {
            return Err(VhdError::InvalidInput(format!(
                "extent at {} overlaps or precedes the one ending at {end}",
                e.offset
            )));
        }
        end = e
            .offset
            .checked_add(e.len())
            .filter(|&x| x <= spec.virtual_size)
            .ok_or_else(|| {
                VhdError::InvalidInput(format!(
                    "extent at {} of {} bytes ends past the virtual size {}",
                    e.offset,
                    e.len(),
                    spec.virtual_size
                ))
            })?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prologue_and_total_length() {
        let enc = VhdEncoder::new(VhdSpec::dynamic(6 << 20, Uuid::nil()), [2, 0]).unwrap();
        // footer 512 + header 1024 + zero sector 512 + BAT 512 + batmap 512 + 512
        assert_eq!(enc.prologue().len(), 3584);
        assert_eq!(enc.allocated_blocks(), &[0, 2]);
        assert_eq!(enc.total_len(), 3584 + 2 * ((2 << 20) + 512) + 512);
        assert_eq!(enc.next_block(), Some(0));
    }

    #[test]
    fn long_locators_move_the_bat() {
        let parent = ParentSpec {
            unique_id: Uuid::from_u128(3),
            timestamp: 0,
            unicode_name: "p".into(),
            locators: vec![LocatorSpec {
                platform: PlatformCode::MACX,
                path: "x".repeat(700),
            }],
        };
        let enc = VhdEncoder::new(VhdSpec::differencing(2 << 20, Uuid::nil(), parent), []).unwrap();
        let h = DynamicHeader::parse(&enc.prologue()[512..1536], 512).unwrap();
        assert_eq!(h.table_offset, 1536 + 1024);
        assert_eq!(h.parent_locators[0].data_space, 2);
        assert_eq!(h.parent_locators[0].data_len, 707);
    }

    #[test]
    fn differencing_bitmap_marks_only_given_sectors() {
        let parent = ParentSpec {
            unique_id: Uuid::nil(),
            timestamp: 0,
            unicode_name: String::new(),
            locators: vec![],
        };
        let mut enc =
            VhdEncoder::new(VhdSpec::differencing(4 << 20, Uuid::nil(), parent), [1]).unwrap();
        let off = 2 << 20;
        let b = enc
            .encode_block_extents(
                1,
                &[
                    Extent::data(off + 512, vec![5; 1024]),
                    Extent::zero(off + 4096, 512),
                ],
            )
            .unwrap();
        assert_eq!(&b[..2], &[0b0110_0000, 0b1000_0000]);
        assert!(b[2..512].iter().all(|&x| x == 0));
        assert!(b[512 + 512..512 + 1536].iter().all(|&x| x == 5));
        assert!(enc.finish().is_ok());
    }
}
