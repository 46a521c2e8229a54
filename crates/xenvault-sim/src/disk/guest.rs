//! Simulated guest writes: deterministic pseudo-random block choices and contents.
//!
//! Everything here is a pure function of a seed, so a test can recompute the exact bytes
//! a guest write produced without asking the simulator.

use super::CBT_BLOCK_SIZE;

/// A small, fast, well-mixed generator (SplitMix64). Stable across releases, unlike
/// `rand`'s `StdRng`, so seeds written in test fixtures keep meaning the same bytes.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift keeps the bias negligible for disk-sized n.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The contents a guest write with `seed` puts in 64 KiB block `block`:
/// `CBT_BLOCK_SIZE` bytes, never all zero.
pub fn guest_block_data(seed: u64, block: u64) -> Vec<u8> {
    let mut out = vec![0u8; CBT_BLOCK_SIZE as usize];
    fill_guest_block(seed, block, &mut out);
    out
}

/// Fills `buf` (any length) with the bytes `guest_block_data(seed, block)` starts with.
pub fn fill_guest_block(seed: u64, block: u64, buf: &mut [u8]) {
    let mut rng = SplitMix64::new(seed ^ block.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    for chunk in buf.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    // Make the first 8 bytes a readable, never-zero tag (seed and block), so a
    // hexdump of a disk shows which write a block came from.
    let tag = format!("G{:03x}B{:03x}", seed & 0xFFF, block & 0xFFF);
    let n = tag.len().min(buf.len());
    buf[..n].copy_from_slice(&tag.as_bytes()[..n]);
}

/// Picks `count` distinct block indices in `0..nblocks` from `seed`, ascending.
/// Asking for at least `nblocks` blocks gives every block.
pub fn choose_blocks(seed: u64, nblocks: u64, count: u64) -> Vec<u64> {
    if count >= nblocks {
        return (0..nblocks).collect();
    }
    let mut rng = SplitMix64::new(seed.rotate_left(17) ^ 0xA5A5_5A5A_C3C3_3C3C);
    let mut chosen = std::collections::BTreeSet::new();
    if count * 2 <= nblocks {
        while (chosen.len() as u64) < count {
            chosen.insert(rng.below(nblocks));
        }
        chosen.into_iter().collect()
    } else {
        // Dense: choose the blocks to leave out instead.
        let mut skipped = std::collections::BTreeSet::new();
        while (skipped.len() as u64) < nblocks - count {
            skipped.insert(rng.below(nblocks));
        }
        (0..nblocks).filter(|b| !skipped.contains(b)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_distinct() {
        assert_eq!(guest_block_data(7, 3), guest_block_data(7, 3));
        assert_ne!(guest_block_data(7, 3), guest_block_data(7, 4));
        assert_ne!(guest_block_data(7, 3), guest_block_data(8, 3));
        let b = choose_blocks(42, 1000, 50);
        assert_eq!(b.len(), 50);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(b, choose_blocks(42, 1000, 50));
        let dense = choose_blocks(42, 100, 90);
        assert_eq!(dense.len(), 90);
        assert_eq!(choose_blocks(1, 5, 10), vec![0, 1, 2, 3, 4]);
    }
}
