//! Raw disk images: zero detection on decode, zero filling on encode.
//!
//! [`RawDecoder`] turns a stream of raw disk bytes into `Data`/`Zero`
//! extents. It looks at blocks of `granularity` bytes aligned to disk
//! offsets (default 64 KiB, the CBT block size, so a raw export lines up with
//! `VDI.list_changed_blocks`), reports all-zero blocks as zero runs (merged
//! with their neighbours, however long) and merges adjacent data blocks up to
//! `max_data_extent` bytes. Memory: one data extent.
//!
//! [`RawEncoder`] turns extents back into bytes: data as is, zero extents and
//! gaps as zeros taken from a static buffer, so a 1 TiB hole costs no memory.
//!
//! ```
//! use xenvault_formats::raw::{RawDecoder, RawEncoder};
//! let mut dec = RawDecoder::new();
//! let mut extents = dec.feed(&[0u8; 200_000]);
//! extents.extend(dec.finish());
//! let mut enc = RawEncoder::new();
//! let mut bytes = Vec::new();
//! for e in &extents {
//!     for piece in enc.push(e)? { bytes.extend_from_slice(piece); }
//! }
//! assert_eq!(bytes.len(), 200_000);
//! # Ok::<(), xenvault_formats::raw::RawError>(())
//! ```

use xenvault_types::extent::is_all_zero;
use xenvault_types::{Extent, ExtentData};

/// Default zero-detection granularity: 64 KiB, XAPI's CBT block size.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// Default largest data extent the decoder emits: 1 MiB.
pub const DEFAULT_MAX_DATA_EXTENT: usize = 1 << 20;

/// Size of the static zero buffer the encoder hands out.
const ZERO_PIECE: usize = 1 << 20;
static ZEROS: [u8; ZERO_PIECE] = [0; ZERO_PIECE];

/// A raw codec problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RawError {
    /// A granularity that is zero or not a power of two, or larger than the data cap.
    #[error(
        "zero-detection granularity {0} must be a power of two between 512 bytes and the \
         largest data extent"
    )]
    BadGranularity(u64),
    /// Extents given to the encoder overlap or go backwards.
    #[error("extent at {offset} starts before the end of the previous one ({position})")]
    OutOfOrder {
        /// The extent's offset.
        offset: u64,
        /// Where the stream already is.
        position: u64,
    },
    /// The encoder was asked to end the disk before bytes already written.
    #[error("the disk size {size} is smaller than what was already written ({position})")]
    SizeTooSmall {
        /// The requested size.
        size: u64,
        /// Where the stream already is.
        position: u64,
    },
}

/// Raw bytes in, `Data`/`Zero` extents out.
#[derive(Debug)]
pub struct RawDecoder {
    granularity: u64,
    max_data: usize,
    /// Disk offset of the next byte to be fed.
    offset: u64,
    /// The partial block being collected (starts at `offset - block.len()`).
    block: Vec<u8>,
    /// A data extent being grown.
    data: Option<(u64, Vec<u8>)>,
    /// A zero run being grown.
    zero: Option<(u64, u64)>,
}

impl Default for RawDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl RawDecoder {
    /// A decoder with 64 KiB granularity, starting at disk offset 0.
    pub fn new() -> RawDecoder {
        RawDecoder {
            granularity: DEFAULT_GRANULARITY,
            max_data: DEFAULT_MAX_DATA_EXTENT,
            offset: 0,
            block: Vec::new(),
            data: None,
            zero: None,
        }
    }

    /// A decoder with the given granularity (a power of two, 512 B ..= the
    /// largest data extent) and largest data extent.
    pub fn with_granularity(
        granularity: u64,
        max_data_extent: usize,
    ) -> Result<RawDecoder, RawError> {
        if granularity < 512
            || !granularity.is_power_of_two()
            || granularity > max_data_extent as u64
        {
            return Err(RawError::BadGranularity(granularity));
        }
        Ok(RawDecoder {
            granularity,
            max_data: max_data_extent,
            ..RawDecoder::new()
        })
    }

    /// Starts decoding at disk offset `offset` (for a range of a disk): the
    /// first block then ends at the next multiple of the granularity.
    pub fn starting_at(mut self, offset: u64) -> RawDecoder {
        self.offset = offset;
        self
    }

    /// The disk offset of the next byte to feed.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Bytes until the end of the current aligned block.
    fn block_room(&self) -> usize {
        let start = self.offset - self.block.len() as u64;
        let block_end = (start / self.granularity + 1) * self.granularity;
        (block_end - self.offset) as usize
    }

    /// Decodes the next bytes; returns the extents that are complete.
    pub fn feed(&mut self, mut input: &[u8]) -> Vec<Extent> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let room = self.block_room();
            if self.block.is_empty() && input.len() >= room {
                // A whole block is available in the input: no copy into `block`.
                let (block, rest) = input.split_at(room);
                self.offset += room as u64;
                self.take_block(block, &mut out);
                input = rest;
                continue;
            }
            let n = room.min(input.len());
            self.block.extend_from_slice(&input[..n]);
            self.offset += n as u64;
            input = &input[n..];
            if n == room {
                let block = std::mem::take(&mut self.block);
                self.take_block(&block, &mut out);
                self.block = block;
                self.block.clear();
            }
        }
        out
    }

    /// Ends the stream; returns the remaining extents (a final partial block
    /// counts as a block).
    pub fn finish(mut self) -> Vec<Extent> {
        let mut out = Vec::new();
        let block = std::mem::take(&mut self.block);
        if !block.is_empty() {
            self.take_block(&block, &mut out);
        }
        self.flush_data(&mut out);
        self.flush_zero(&mut out);
        out
    }

    /// Classifies a complete block ending at `self.offset`.
    fn take_block(&mut self, block: &[u8], out: &mut Vec<Extent>) {
        let start = self.offset - block.len() as u64;
        if is_all_zero(block) {
            self.flush_data(out);
            match &mut self.zero {
                Some((_, len)) => *len += block.len() as u64,
                None => self.zero = Some((start, block.len() as u64)),
            }
        } else {
            self.flush_zero(out);
            if let Some((_, buf)) = &self.data
                && buf.len() + block.len() > self.max_data
            {
                self.flush_data(out);
            }
            match &mut self.data {
                Some((_, buf)) => buf.extend_from_slice(block),
                None => {
                    let mut buf = Vec::with_capacity(self.max_data.min(1 << 20));
                    buf.extend_from_slice(block);
                    self.data = Some((start, buf));
                }
            }
        }
    }

    fn flush_data(&mut self, out: &mut Vec<Extent>) {
        if let Some((offset, buf)) = self.data.take() {
            out.push(Extent::data(offset, buf));
        }
    }

    fn flush_zero(&mut self, out: &mut Vec<Extent>) {
        if let Some((offset, len)) = self.zero.take() {
            out.push(Extent::zero(offset, len));
        }
    }
}

/// Extents in, raw bytes out.
#[derive(Debug, Default)]
pub struct RawEncoder {
    position: u64,
}

/// The byte pieces of one extent (gap zeros first), borrowed from the extent
/// or from a static zero buffer.
#[derive(Debug)]
pub struct RawPieces<'a> {
    zeros_left: u64,
    data: Option<&'a [u8]>,
}

impl<'a> Iterator for RawPieces<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.zeros_left > 0 {
            let n = self.zeros_left.min(ZERO_PIECE as u64);
            self.zeros_left -= n;
            return Some(&ZEROS[..n as usize]);
        }
        self.data.take().filter(|d| !d.is_empty())
    }
}

impl RawEncoder {
    /// An encoder at disk offset 0.
    pub fn new() -> RawEncoder {
        RawEncoder { position: 0 }
    }

    /// The disk offset of the next byte it will produce.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The bytes for `extent`: zeros for any gap since the previous extent,
    /// then the extent's bytes. Extents must come in increasing offset order.
    pub fn push<'a>(&mut self, extent: &'a Extent) -> Result<RawPieces<'a>, RawError> {
        if extent.offset < self.position {
            return Err(RawError::OutOfOrder {
                offset: extent.offset,
                position: self.position,
            });
        }
        let gap = extent.offset - self.position;
        self.position = extent.end();
        Ok(match &extent.data {
            ExtentData::Data(bytes) => RawPieces {
                zeros_left: gap,
                data: Some(bytes),
            },
            ExtentData::Zero(len) => RawPieces {
                zeros_left: gap + len,
                data: None,
            },
        })
    }

    /// Zeros from the current position up to `size`, the disk's virtual size.
    pub fn finish(&mut self, size: u64) -> Result<RawPieces<'static>, RawError> {
        if size < self.position {
            return Err(RawError::SizeTooSmall {
                size,
                position: self.position,
            });
        }
        let gap = size - self.position;
        self.position = size;
        Ok(RawPieces {
            zeros_left: gap,
            data: None,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8], step: usize, dec: RawDecoder) -> Vec<Extent> {
        let mut dec = dec;
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            out.extend(dec.feed(piece));
        }
        out.extend(dec.finish());
        out
    }

    fn encode(extents: &[Extent], size: u64) -> Vec<u8> {
        let mut enc = RawEncoder::new();
        let mut out = Vec::new();
        for e in extents {
            for p in enc.push(e).unwrap() {
                out.extend_from_slice(p);
            }
        }
        for p in enc.finish(size).unwrap() {
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn zero_runs_merge_and_blocks_align() {
        let g = 4096usize;
        let mut disk = vec![0u8; 10 * g + 100];
        disk[g + 5] = 1; // block 1
        disk[2 * g] = 2; // block 2 (merged with 1)
        disk[7 * g + g - 1] = 3; // block 7
        let dec = RawDecoder::with_granularity(g as u64, 1 << 20).unwrap();
        let ex = decode(&disk, 1000, dec);
        let shape: Vec<(u64, u64, bool)> = ex
            .iter()
            .map(|e| (e.offset, e.len(), matches!(e.data, ExtentData::Zero(_))))
            .collect();
        let g = g as u64;
        assert_eq!(
            shape,
            [
                (0, g, true),
                (g, 2 * g, false),
                (3 * g, 4 * g, true),
                (7 * g, g, false),
                (8 * g, 2 * g + 100, true)
            ]
        );
        assert_eq!(encode(&ex, disk.len() as u64), disk);
    }

    #[test]
    fn data_extents_are_capped() {
        let disk = vec![9u8; 5 * 4096];
        let dec = RawDecoder::with_granularity(4096, 8192).unwrap();
        let ex = decode(&disk, disk.len(), dec);
        assert_eq!(ex.len(), 3);
        assert!(ex.iter().all(|e| e.len() <= 8192));
        assert_eq!(encode(&ex, disk.len() as u64), disk);
    }

    #[test]
    fn unaligned_start_aligns_to_disk_offsets() {
        let dec = RawDecoder::with_granularity(4096, 1 << 20)
            .unwrap()
            .starting_at(4000);
        let mut bytes = vec![0u8; 96 + 4096];
        bytes[100] = 1;
        let ex = decode(&bytes, 7, dec);
        assert_eq!(ex[0], Extent::zero(4000, 96));
        assert_eq!(ex[1].offset, 4096);
        assert_eq!(ex[1].len(), 4096);
    }

    #[test]
    fn bad_granularity_and_order() {
        assert!(RawDecoder::with_granularity(1000, 1 << 20).is_err());
        assert!(RawDecoder::with_granularity(1 << 21, 1 << 20).is_err());
        let mut enc = RawEncoder::new();
        let e = Extent::zero(10, 10);
        assert!(enc.push(&e).is_ok());
        let back = Extent::data(5, vec![1]);
        assert!(matches!(enc.push(&back), Err(RawError::OutOfOrder { .. })));
        assert!(enc.finish(3).is_err());
    }

    #[test]
    fn huge_zero_extent_streams_in_pieces() {
        let mut enc = RawEncoder::new();
        let e = Extent::zero(0, 1 << 40);
        let mut pieces = enc.push(&e).unwrap();
        assert_eq!(pieces.next().map(<[u8]>::len), Some(ZERO_PIECE));
    }
}
