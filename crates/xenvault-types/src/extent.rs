//! Extents: the one currency every disk source yields and every sink consumes.
//!
//! A disk stream is a sequence of extents in strictly increasing offset order.
//! Ranges not covered by any extent are unknown to the stream (a differencing
//! source leaves them to its parent); a full-disk source covers the whole disk
//! with `Data` and `Zero` extents.

/// What an extent holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    /// These bytes, starting at the extent's offset.
    Data(Vec<u8>),
    /// `len` bytes of zeros (a hole, an unallocated block, an all-zero chunk).
    Zero(u64),
}

/// A run of a virtual disk: `(offset, Data(bytes) | Zero(len))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset in the virtual disk.
    pub offset: u64,
    /// The content of the run.
    pub data: ExtentData,
}

impl Extent {
    /// A data extent.
    pub fn data(offset: u64, bytes: Vec<u8>) -> Extent {
        Extent {
            offset,
            data: ExtentData::Data(bytes),
        }
    }

    /// A zero extent.
    pub fn zero(offset: u64, len: u64) -> Extent {
        Extent {
            offset,
            data: ExtentData::Zero(len),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match &self.data {
            ExtentData::Data(b) => b.len() as u64,
            ExtentData::Zero(n) => *n,
        }
    }

    /// True when the extent covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The offset just past the extent.
    pub fn end(&self) -> u64 {
        self.offset + self.len()
    }
}

/// True when every byte of `buf` is zero (word-wise, fast enough for 4 MiB chunks).
pub fn is_all_zero(buf: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        let mid = buf.len() / 8 * 8;
        let (a, rest) = buf.split_at(0);
        (a, &rest[..mid], &rest[mid..])
    };
    prefix.iter().all(|&b| b == 0)
        && words
            .chunks_exact(8)
            .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && suffix.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_all_zero(&v));
        v[4098] = 0;
        v[3] = 1;
        assert!(!is_all_zero(&v));
    }

    #[test]
    fn extent_lengths() {
        assert_eq!(Extent::zero(10, 5).end(), 15);
        assert_eq!(Extent::data(0, vec![1, 2]).len(), 2);
    }
}
