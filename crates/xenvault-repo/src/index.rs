//! The fixed index: one chunk id per fixed-size chunk of a disk, in disk order.
//!
//! ```text
//! 0   8  magic "XVFIDX\0\x01"
//! 8   8  disk size in bytes, u64 LE
//! 16  4  chunk size in bytes, u32 LE
//! 20  4  reserved, 0
//! 24  8  entry count, u64 LE (= ceil(disk size / chunk size))
//! 32  32 BLAKE3 of the entries (bytes 64..)
//! 64  …  entries: 32-byte chunk ids; all zero = an all-zero chunk (not stored)
//! ```
//! These bytes are the plaintext of a blob of kind 2 (see `blob`). No I/O here.

use crate::crypto::{ChunkId, KEY_LEN};
use crate::error::{RepoError, Result};

/// Length of the index header.
pub const INDEX_HEADER_LEN: usize = 64;
const MAGIC: &[u8; 8] = b"XVFIDX\0\x01";

/// The chunk ids of one disk of one restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// One id per chunk.
    pub ids: Vec<ChunkId>,
}

/// Number of chunks of a disk.
pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
    disk_size.div_ceil(u64::from(chunk_size))
}

impl FixedIndex {
    /// An index of a disk whose chunks are all zero.
    pub fn zeroed(disk_size: u64, chunk_size: u32) -> Self {
        FixedIndex {
            disk_size,
            chunk_size,
            ids: vec![ChunkId::ZERO; chunk_count(disk_size, chunk_size) as usize],
        }
    }

    /// Byte range `(offset, len)` of chunk `i`.
    pub fn chunk_range(&self, i: u64) -> (u64, u64) {
        let cs = u64::from(self.chunk_size);
        let off = i * cs;
        (off, cs.min(self.disk_size.saturating_sub(off)))
    }

    /// Encodes to the byte layout above.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + self.ids.len() * KEY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.ids.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0u8; 32]);
        let mut h = blake3::Hasher::new();
        for id in &self.ids {
            out.extend_from_slice(&id.0);
            h.update(&id.0);
        }
        out[32..64].copy_from_slice(h.finalize().as_bytes());
        out
    }

    /// Decodes and checks the layout above (`key` names the object in errors).
    pub fn from_bytes(key: &str, b: &[u8]) -> Result<Self> {
        if b.len() < INDEX_HEADER_LEN || &b[..8] != MAGIC {
            return Err(RepoError::corrupt(key, "not a fixed index (bad magic)"));
        }
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let disk_size = u64_at(8);
        let mut c4 = [0u8; 4];
        c4.copy_from_slice(&b[16..20]);
        let chunk_size = u32::from_le_bytes(c4);
        let count = u64_at(24);
        if chunk_size == 0 {
            return Err(RepoError::corrupt(key, "chunk size 0"));
        }
        if count != chunk_count(disk_size, chunk_size) {
            return Err(RepoError::corrupt(
                key,
                format!(
                    "entry count {count} does not fit disk size {disk_size} / chunk size {chunk_size}"
                ),
            ));
        }
        let body = &b[INDEX_HEADER_LEN..];
        if Some(body.len() as u64) != count.checked_mul(KEY_LEN as u64) {
            return Err(RepoError::corrupt(
                key,
                format!(
                    "{} entry bytes where {count} entries were declared",
                    body.len()
                ),
            ));
        }
        if blake3::hash(body).as_bytes() != &b[32..64] {
            return Err(RepoError::corrupt(key, "index checksum mismatch"));
        }
        let ids = body
            .chunks_exact(KEY_LEN)
            .map(|c| {
                let mut id = [0u8; KEY_LEN];
                id.copy_from_slice(c);
                ChunkId(id)
            })
            .collect();
        Ok(FixedIndex {
            disk_size,
            chunk_size,
            ids,
        })
    }

    /// Chunk numbers whose ids differ between `self` and `other` (same geometry),
    /// e.g. to write into a disk known to hold `other` only what `self` changes.
    pub fn differing_chunks(&self, other: &FixedIndex) -> Result<Vec<u64>> {
        if self.disk_size != other.disk_size || self.chunk_size != other.chunk_size {
            return Err(RepoError::invalid(
                "index comparison",
                "the two disks differ in size or chunk size",
            ));
        }
        Ok(self
            .ids
            .iter()
            .zip(&other.ids)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trip_and_damage() {
        let mut idx = FixedIndex::zeroed(10 * 1024 + 1, 1024);
        assert_eq!(idx.ids.len(), 11);
        assert_eq!(idx.chunk_range(10), (10240, 1));
        idx.ids[3] = ChunkId([7; 32]);
        let b = idx.to_bytes();
        assert_eq!(b.len(), 64 + 11 * 32);
        assert_eq!(&b[..8], b"XVFIDX\0\x01");
        assert_eq!(FixedIndex::from_bytes("i", &b).unwrap(), idx);
        let mut bad = b.clone();
        bad[64 + 3 * 32] ^= 1;
        assert!(FixedIndex::from_bytes("i", &bad).is_err());
        assert!(FixedIndex::from_bytes("i", &b[..b.len() - 32]).is_err());
        assert!(FixedIndex::from_bytes("i", &b[..10]).is_err());
        // A hostile header (huge count) is refused without overflow or allocation.
        let mut hostile = b[..64].to_vec();
        hostile[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        hostile[16..20].copy_from_slice(&1u32.to_le_bytes());
        hostile[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(FixedIndex::from_bytes("i", &hostile).is_err());
        let other = FixedIndex::zeroed(10 * 1024 + 1, 1024);
        assert_eq!(idx.differing_chunks(&other).unwrap(), vec![3]);
    }
}
