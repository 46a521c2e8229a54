//! Changed block tracking: decoding `VDI.list_changed_blocks` bitmaps.
//!
//! `VDI.list_changed_blocks(vdi_from, vdi_to)` answers a base64 bitmap with one bit
//! per 64 KiB block of `vdi_to`, **MSB-first** within each byte: block `i` changed iff
//! `byte[i / 8] & (0x80 >> (i % 8))`. Its length is `ceil(ceil(virtual_size / 64 KiB) / 8)`
//! bytes (docs/xapi-notes.md "CBT"; xapi-facts §2.3, sm `libs/sm/VDI.py`).
//!
//! [`ChangedBlocks`] decodes it (checking the length against the VDI size), iterates
//! the changed byte ranges merged and clipped to the disk, and encodes the same bit
//! order for the simulator.

use std::ops::Range;

use base64::Engine as _;

/// Bytes covered by one bit of a CBT bitmap.
pub const CBT_BLOCK_SIZE: u64 = 64 * 1024;

/// Errors decoding a changed-block bitmap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbtError {
    /// The text is not base64.
    #[error("VDI.list_changed_blocks answer is not valid base64: {0}")]
    Base64(String),
    /// The bitmap does not cover the VDI exactly.
    #[error(
        "CBT bitmap has {actual_bytes} bytes but a VDI of {virtual_size} bytes needs {expected_bytes} (one bit per 64 KiB block); the VDIs passed to list_changed_blocks do not match the disk being read, or its size changed: take a full backup"
    )]
    LengthMismatch {
        /// Bytes in the bitmap.
        actual_bytes: usize,
        /// Bytes the VDI size requires.
        expected_bytes: usize,
        /// The VDI's virtual size.
        virtual_size: u64,
    },
    /// Bits are set for blocks beyond the end of the VDI.
    #[error(
        "CBT bitmap marks block {block} changed, beyond the end of a VDI of {virtual_size} bytes ({blocks} blocks); the bitmap belongs to a larger disk: take a full backup"
    )]
    BitBeyondEnd {
        /// First offending block index.
        block: u64,
        /// Blocks the VDI has.
        blocks: u64,
        /// The VDI's virtual size.
        virtual_size: u64,
    },
}

/// The decoded answer of `VDI.list_changed_blocks` for a VDI of a known size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedBlocks {
    bitmap: Vec<u8>,
    virtual_size: u64,
}

/// Number of 64 KiB blocks of a disk of `virtual_size` bytes.
pub fn block_count_for(virtual_size: u64) -> u64 {
    virtual_size.div_ceil(CBT_BLOCK_SIZE)
}

/// Bitmap bytes for a disk of `virtual_size` bytes.
pub fn bitmap_len_for(virtual_size: u64) -> usize {
    usize::try_from(block_count_for(virtual_size).div_ceil(8)).unwrap_or(usize::MAX)
}

impl ChangedBlocks {
    /// No block changed, for a disk of `virtual_size` bytes.
    pub fn new(virtual_size: u64) -> ChangedBlocks {
        ChangedBlocks {
            bitmap: vec![0; bitmap_len_for(virtual_size)],
            virtual_size,
        }
    }

    /// Decodes the base64 text `VDI.list_changed_blocks` returns for `vdi_to`, whose
    /// virtual size is `virtual_size`.
    pub fn from_base64(text: &str, virtual_size: u64) -> Result<ChangedBlocks, CbtError> {
        // Whitespace is ignored: some transports wrap long base64 strings.
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bitmap = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| CbtError::Base64(e.to_string()))?;
        ChangedBlocks::from_bitmap(bitmap, virtual_size)
    }

    /// Takes a raw MSB-first bitmap for a disk of `virtual_size` bytes.
    ///
    /// The bitmap must have exactly [`bitmap_len_for`] bytes. As a tolerance for
    /// bitmaps padded to a 64-bit word (tapdisk keeps its log in `unsigned long`
    /// words), a length rounded up to a multiple of 8 bytes is accepted when the
    /// padding is zero. Set bits past
    /// the last block are an error.
    pub fn from_bitmap(mut bitmap: Vec<u8>, virtual_size: u64) -> Result<ChangedBlocks, CbtError> {
        let expected = bitmap_len_for(virtual_size);
        let padded_ok = bitmap.len() > expected
            && bitmap.len() == expected.next_multiple_of(8)
            && bitmap[expected..].iter().all(|b| *b == 0);
        if bitmap.len() != expected && !padded_ok {
            return Err(CbtError::LengthMismatch {
                actual_bytes: bitmap.len(),
                expected_bytes: expected,
                virtual_size,
            });
        }
        bitmap.truncate(expected);
        let blocks = block_count_for(virtual_size);
        let tail_bits = blocks % 8;
        if tail_bits != 0
            && let Some(last) = bitmap.last()
        {
            let beyond_mask = 0xffu8 >> tail_bits;
            if last & beyond_mask != 0 {
                let first = (last & beyond_mask).leading_zeros() as u64;
                return Err(CbtError::BitBeyondEnd {
                    block: (blocks / 8) * 8 + first,
                    blocks,
                    virtual_size,
                });
            }
        }
        Ok(ChangedBlocks {
            bitmap,
            virtual_size,
        })
    }

    /// The VDI size the bitmap covers.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Number of 64 KiB blocks of the disk.
    pub fn block_count(&self) -> u64 {
        block_count_for(self.virtual_size)
    }

    /// The raw MSB-first bitmap.
    pub fn bitmap(&self) -> &[u8] {
        &self.bitmap
    }

    /// True when block `index` changed (false beyond the end).
    pub fn is_changed(&self, index: u64) -> bool {
        usize::try_from(index / 8)
            .ok()
            .and_then(|i| self.bitmap.get(i))
            .is_some_and(|byte| byte & (0x80 >> (index % 8)) != 0)
    }

    /// Marks block `index` changed; indexes beyond the end are ignored.
    pub fn mark_block(&mut self, index: u64) {
        if index < self.block_count()
            && let Some(byte) = usize::try_from(index / 8)
                .ok()
                .and_then(|i| self.bitmap.get_mut(i))
        {
            *byte |= 0x80 >> (index % 8);
        }
    }

    /// Marks every block that `len` bytes written at `offset` touch.
    pub fn mark_bytes(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / CBT_BLOCK_SIZE;
        let last = offset.saturating_add(len - 1) / CBT_BLOCK_SIZE;
        for block in first..=last.min(self.block_count().saturating_sub(1)) {
            self.mark_block(block);
        }
    }

    /// Ors another bitmap of the same disk into this one.
    pub fn union_with(&mut self, other: &ChangedBlocks) {
        for (a, b) in self.bitmap.iter_mut().zip(&other.bitmap) {
            *a |= b;
        }
    }

    /// Number of changed blocks.
    pub fn changed_count(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Bytes of the disk inside changed blocks (the last block clipped to the size).
    pub fn changed_bytes(&self) -> u64 {
        self.ranges().map(|r| r.end - r.start).sum()
    }

    /// Changed blocks by index, ascending.
    pub fn changed_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.iter().enumerate().flat_map(|(i, byte)| {
            let byte = *byte;
            (0..8u64)
                .filter_map(move |bit| (byte & (0x80 >> bit) != 0).then_some(i as u64 * 8 + bit))
        })
    }

    /// Changed byte ranges, ascending, adjacent blocks merged, clipped to the disk.
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let size = self.virtual_size;
        let mut blocks = self.changed_blocks().peekable();
        std::iter::from_fn(move || {
            let first = blocks.next()?;
            let mut last = first;
            while blocks.peek() == Some(&(last + 1)) {
                last += 1;
                blocks.next();
            }
            let start = first * CBT_BLOCK_SIZE;
            let end = ((last + 1) * CBT_BLOCK_SIZE).min(size);
            Some(start..end)
        })
    }

    /// Changed byte ranges split so that none is longer than `max_len` (a multiple of
    /// 64 KiB is best), for reads of bounded size.
    pub fn ranges_split(&self, max_len: u64) -> impl Iterator<Item = Range<u64>> + '_ {
        let max_len = max_len.max(1);
        self.ranges().flat_map(move |r| {
            let mut start = r.start;
            std::iter::from_fn(move || {
                (start < r.end).then(|| {
                    let end = (start + max_len).min(r.end);
                    let piece = start..end;
                    start = end;
                    piece
                })
            })
        })
    }

    /// The base64 text `VDI.list_changed_blocks` would answer.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bitmap)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn msb_first_bit_order() {
        // 16 blocks = 1 MiB: byte 0 = 0b1000_0001 -> blocks 0 and 7; byte 1 = 0x40 -> block 9.
        let cb = ChangedBlocks::from_bitmap(vec![0x81, 0x40], MIB).unwrap();
        assert_eq!(cb.changed_blocks().collect::<Vec<_>>(), vec![0, 7, 9]);
        assert!(cb.is_changed(0) && cb.is_changed(7) && cb.is_changed(9));
        assert!(!cb.is_changed(1) && !cb.is_changed(8) && !cb.is_changed(100));
        assert_eq!(cb.changed_count(), 3);
    }

    #[test]
    fn ranges_merge_and_clip() {
        // 10 blocks + 4 KiB: 11 blocks, 2 bytes.
        let size = 10 * CBT_BLOCK_SIZE + 4096;
        let mut cb = ChangedBlocks::new(size);
        assert_eq!(cb.bitmap().len(), 2);
        for b in [1, 2, 3, 5, 10] {
            cb.mark_block(b);
        }
        let ranges: Vec<_> = cb.ranges().collect();
        assert_eq!(
            ranges,
            vec![
                CBT_BLOCK_SIZE..4 * CBT_BLOCK_SIZE,
                5 * CBT_BLOCK_SIZE..6 * CBT_BLOCK_SIZE,
                10 * CBT_BLOCK_SIZE..size,
            ]
        );
        assert_eq!(cb.changed_bytes(), 4 * CBT_BLOCK_SIZE + 4096);
        let split: Vec<_> = cb.ranges_split(2 * CBT_BLOCK_SIZE).collect();
        assert_eq!(split.len(), 4);
        assert_eq!(split[0], CBT_BLOCK_SIZE..3 * CBT_BLOCK_SIZE);
        assert_eq!(split[1], 3 * CBT_BLOCK_SIZE..4 * CBT_BLOCK_SIZE);
    }

    #[test]
    fn base64_round_trip_and_marking_bytes() {
        let mut cb = ChangedBlocks::new(4 * MIB);
        cb.mark_bytes(CBT_BLOCK_SIZE - 1, 2); // touches blocks 0 and 1
        cb.mark_bytes(3 * MIB, 1);
        cb.mark_bytes(0, 0);
        assert_eq!(cb.changed_blocks().collect::<Vec<_>>(), vec![0, 1, 48]);
        assert_eq!(cb.bitmap()[0], 0xc0);
        let text = cb.to_base64();
        let back = ChangedBlocks::from_base64(&text, 4 * MIB).unwrap();
        assert_eq!(back, cb);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let err = ChangedBlocks::from_bitmap(vec![0; 3], MIB).unwrap_err();
        assert!(matches!(
            err,
            CbtError::LengthMismatch {
                actual_bytes: 3,
                expected_bytes: 2,
                ..
            }
        ));
        assert!(err.to_string().contains("needs 2"));
        assert!(ChangedBlocks::from_bitmap(vec![0; 1], MIB).is_err());
        // Zero word padding is tolerated, non-zero padding is not.
        assert!(ChangedBlocks::from_bitmap(vec![0xff, 0xff, 0, 0, 0, 0, 0, 0], MIB).is_ok());
        assert!(ChangedBlocks::from_bitmap(vec![0xff, 0xff, 0, 0, 0, 0, 0, 1], MIB).is_err());
        assert!(ChangedBlocks::from_bitmap(vec![0; 10], MIB).is_err());
    }

    #[test]
    fn bits_beyond_the_end_are_an_error() {
        // 3 blocks: bits 3..8 of byte 0 must be clear.
        let size = 3 * CBT_BLOCK_SIZE;
        assert!(ChangedBlocks::from_bitmap(vec![0xe0], size).is_ok());
        let err = ChangedBlocks::from_bitmap(vec![0xf0], size).unwrap_err();
        assert_eq!(
            err,
            CbtError::BitBeyondEnd {
                block: 3,
                blocks: 3,
                virtual_size: size
            }
        );
    }

    #[test]
    fn bad_base64() {
        assert!(matches!(
            ChangedBlocks::from_base64("!!", MIB),
            Err(CbtError::Base64(_))
        ));
        let ok = ChangedBlocks::from_base64("gE\nA=", MIB).unwrap();
        assert_eq!(ok.changed_blocks().collect::<Vec<_>>(), vec![0, 9]);
    }
}
