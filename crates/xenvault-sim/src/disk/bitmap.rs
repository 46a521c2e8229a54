//! Block bitmaps: one bit per 64 KiB block, used for layer allocation maps and CBT logs.
//!
//! In memory the bits live in little-endian `u64` words (bit `i` is bit `i % 64` of word
//! `i / 64`); on disk a bitmap file is exactly those words, little-endian, so a changed
//! word can be rewritten in place with one small `pwrite`.

/// A growable bitmap over block indices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockBitmap {
    words: Vec<u64>,
    nbits: u64,
}

impl BlockBitmap {
    /// An all-clear bitmap of `nbits` bits.
    pub fn new(nbits: u64) -> BlockBitmap {
        BlockBitmap {
            words: vec![0; words_for(nbits)],
            nbits,
        }
    }

    /// Number of bits (blocks) covered.
    pub fn len(&self) -> u64 {
        self.nbits
    }

    /// True when the bitmap covers no blocks.
    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    /// Bit `i`; bits past the end read as clear.
    pub fn get(&self, i: u64) -> bool {
        if i >= self.nbits {
            return false;
        }
        self.words[(i / 64) as usize] & (1u64 << (i % 64)) != 0
    }

    /// Sets bit `i` (ignored past the end); returns the index of the word that changed.
    pub fn set(&mut self, i: u64) -> Option<usize> {
        if i >= self.nbits {
            return None;
        }
        let w = (i / 64) as usize;
        let mask = 1u64 << (i % 64);
        if self.words[w] & mask != 0 {
            return None;
        }
        self.words[w] |= mask;
        Some(w)
    }

    /// Grows (never shrinks) the bitmap to `nbits`; new bits are clear.
    pub fn grow(&mut self, nbits: u64) {
        if nbits > self.nbits {
            self.nbits = nbits;
            self.words.resize(words_for(nbits), 0);
        }
    }

    /// ORs `other` into `self`; bits of `other` past `self.len()` are dropped.
    pub fn or_with(&mut self, other: &BlockBitmap) {
        for (a, b) in self.words.iter_mut().zip(other.words.iter()) {
            *a |= *b;
        }
        self.clear_tail();
    }

    /// XORs `other` into `self`; bits of `other` past `self.len()` are dropped.
    pub fn xor_with(&mut self, other: &BlockBitmap) {
        for (a, b) in self.words.iter_mut().zip(other.words.iter()) {
            *a ^= *b;
        }
        self.clear_tail();
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Indices of the set bits, ascending.
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut rest = w;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let b = rest.trailing_zeros();
                rest &= rest - 1;
                Some(wi as u64 * 64 + u64::from(b))
            })
        })
    }

    /// Maximal runs `(first, count)` of set bits, ascending.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in self.ones() {
            match out.last_mut() {
                Some((start, n)) if *start + *n == i => *n += 1,
                _ => out.push((i, 1)),
            }
        }
        out
    }

    /// The bitmap as XAPI's `VDI.list_changed_blocks` returns it: bit `i` is
    /// `byte[i / 8] & (0x80 >> (i % 8))` (MSB-first), `ceil(len / 8)` bytes.
    /// See docs/xapi-notes.md "Simulator data plane" (sm: libs/sm/VDI.py `bytereverse`).
    pub fn to_msb_first_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.nbits.div_ceil(8) as usize];
        for i in self.ones() {
            out[(i / 8) as usize] |= 0x80 >> (i % 8);
        }
        out
    }

    /// The raw words, for persisting.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Rebuilds a bitmap from persisted little-endian words (missing words are clear,
    /// extra bytes are ignored).
    pub fn from_le_bytes(bytes: &[u8], nbits: u64) -> BlockBitmap {
        let mut bm = BlockBitmap::new(nbits);
        for (w, chunk) in bm.words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        bm.clear_tail();
        bm
    }

    /// The whole bitmap as little-endian bytes (the file format).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn clear_tail(&mut self) {
        let rem = self.nbits % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }
}

fn words_for(nbits: u64) -> usize {
    nbits.div_ceil(64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_runs_and_msb_first() {
        let mut b = BlockBitmap::new(20);
        assert_eq!(b.set(0), Some(0));
        assert_eq!(b.set(0), None);
        b.set(1);
        b.set(9);
        b.set(19);
        assert_eq!(b.set(20), None);
        assert!(b.get(9) && !b.get(8) && !b.get(100));
        assert_eq!(b.runs(), vec![(0, 2), (9, 1), (19, 1)]);
        assert_eq!(b.to_msb_first_bytes(), vec![0xC0, 0x40, 0x10]);
        assert_eq!(b.count_ones(), 4);
    }

    #[test]
    fn persist_round_trip_and_grow() {
        let mut b = BlockBitmap::new(130);
        b.set(3);
        b.set(129);
        let bytes = b.to_le_bytes();
        assert_eq!(bytes.len(), 24);
        let c = BlockBitmap::from_le_bytes(&bytes, 130);
        assert_eq!(b, c);
        let mut d = c.clone();
        d.grow(300);
        assert!(d.get(129) && !d.get(200));
        let mut e = BlockBitmap::new(130);
        e.set(3);
        e.xor_with(&d);
        assert_eq!(e.ones().collect::<Vec<_>>(), vec![129]);
    }
}
