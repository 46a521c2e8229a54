//! Raw codec round trips: seeded disks with holes, any feeding, any granularity.
#![allow(clippy::unwrap_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xenvault_formats::raw::{RawDecoder, RawEncoder};
use xenvault_types::{Extent, ExtentData};

fn seeded_disk(seed: u64, size: usize, block: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = vec![0u8; size];
    for b in d.chunks_mut(block) {
        match rng.random_range(0..10) {
            0..=3 => rng.fill(b),
            4 => {
                // A single non-zero byte somewhere: must not be taken for a hole.
                let i = rng.random_range(0..b.len());
                b[i] = 1;
            }
            _ => {}
        }
    }
    d
}

fn decode(
    disk: &[u8],
    granularity: u64,
    max: usize,
    mut steps: impl FnMut() -> usize,
) -> Vec<Extent> {
    let mut dec = RawDecoder::with_granularity(granularity, max).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < disk.len() {
        let n = steps().clamp(1, disk.len() - pos);
        out.extend(dec.feed(&disk[pos..pos + n]));
        pos += n;
    }
    out.extend(dec.finish());
    out
}

fn encode(extents: &[Extent], size: u64) -> Vec<u8> {
    let mut enc = RawEncoder::new();
    let mut out = Vec::new();
    for e in extents {
        for piece in enc.push(e).unwrap() {
            out.extend_from_slice(piece);
        }
    }
    for piece in enc.finish(size).unwrap() {
        out.extend_from_slice(piece);
    }
    out
}

fn check_shape(extents: &[Extent], granularity: u64, max: usize, size: u64) {
    let mut pos = 0;
    for (i, e) in extents.iter().enumerate() {
        assert_eq!(e.offset, pos, "extents are contiguous");
        assert!(!e.is_empty());
        assert!(
            e.offset.is_multiple_of(granularity),
            "extents start on block boundaries"
        );
        if e.end() != size {
            assert!(
                e.end().is_multiple_of(granularity),
                "extents end on block boundaries"
            );
        }
        match &e.data {
            ExtentData::Data(b) => {
                assert!(b.len() <= max);
                // Every block of a data extent has a non-zero byte.
                for blk in b.chunks(granularity as usize) {
                    assert!(
                        blk.iter().any(|&x| x != 0),
                        "zero block inside a data extent"
                    );
                }
            }
            ExtentData::Zero(_) => {
                if i > 0 {
                    assert!(
                        matches!(extents[i - 1].data, ExtentData::Data(_)),
                        "adjacent zero runs are merged"
                    );
                }
            }
        }
        pos = e.end();
    }
    assert_eq!(pos, size);
}

#[test]
fn default_granularity_round_trip() {
    let size = 4 * 1024 * 1024 + 3000;
    let disk = seeded_disk(1, size, 64 << 10);
    let mut rng = StdRng::seed_from_u64(2);
    let ex = decode(&disk, 64 << 10, 1 << 20, || rng.random_range(1..300_000));
    check_shape(&ex, 64 << 10, 1 << 20, size as u64);
    assert!(ex.iter().any(|e| matches!(e.data, ExtentData::Zero(_))));
    assert!(encode(&ex, size as u64) == disk);
    // Default decoder = 64 KiB granularity.
    let mut dec = RawDecoder::new();
    let mut ex2 = dec.feed(&disk);
    ex2.extend(dec.finish());
    assert_eq!(ex, ex2);
}

#[test]
fn feeding_pattern_does_not_change_the_extents() {
    let size = 1024 * 1024 + 777;
    let disk = seeded_disk(3, size, 4096);
    let bulk = decode(&disk, 4096, 65536, || usize::MAX);
    let bytewise = decode(&disk, 4096, 65536, || 1);
    let mut rng = StdRng::seed_from_u64(4);
    let random = decode(&disk, 4096, 65536, || rng.random_range(1..10_000));
    assert_eq!(bulk, bytewise);
    assert_eq!(bulk, random);
    check_shape(&bulk, 4096, 65536, size as u64);
    assert!(encode(&bulk, size as u64) == disk);
}

#[test]
fn granularities_round_trip() {
    for (g, seed) in [(512u64, 5u64), (1 << 16, 6), (1 << 20, 7)] {
        let size = 3 * 1024 * 1024;
        let disk = seeded_disk(seed, size, 1 << 15);
        let ex = decode(&disk, g, 1 << 20, || 100_000);
        check_shape(&ex, g, 1 << 20, size as u64);
        assert!(encode(&ex, size as u64) == disk, "granularity {g}");
    }
}

#[test]
fn all_zero_and_empty_disks() {
    let disk = vec![0u8; 5 << 20];
    let ex = decode(&disk, 64 << 10, 1 << 20, || 1 << 20);
    assert_eq!(ex, [Extent::zero(0, 5 << 20)]);
    assert!(RawDecoder::new().finish().is_empty());
    // A sparse extent list with gaps encodes with zero fill.
    let ex = [
        Extent::data(10, vec![1, 2]),
        Extent::zero(20, 5),
        Extent::data(30, vec![3]),
    ];
    let bytes = encode(&ex, 40);
    let mut want = vec![0u8; 40];
    want[10] = 1;
    want[11] = 2;
    want[30] = 3;
    assert_eq!(bytes, want);
}
