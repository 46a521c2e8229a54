//! VHD codec without outside tools: round trips, split independence, differencing disks
//! applied over their parent, the batmap, random access, and corrupt inputs.
#![allow(clippy::unwrap_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;
use xenvault_formats::vhd::{
    BatmapHeader, DecoderOptions, DiskType, DynamicHeader, FOOTER_SIZE, Footer, HEADER_SIZE,
    LocatorSpec, ParentSpec, PlatformCode, VhdDecoder, VhdEncoder, VhdError, VhdLayout, VhdSpec,
    blocks_for_extents, coalesce, encode_extents, materialize, overlay,
};
use xenvault_types::extent::is_all_zero;
use xenvault_types::{Extent, ExtentData};

const MIB: u64 = 1 << 20;

fn random_disk(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut raw = vec![0u8; size as usize];
    let mut off = 0usize;
    while off < raw.len() {
        let len = rng.random_range(1..=96usize) * 512;
        let end = (off + len).min(raw.len());
        if rng.random_bool(0.4) {
            rng.fill(&mut raw[off..end]);
        }
        off = end;
    }
    raw
}

fn raw_extents(raw: &[u8]) -> Vec<Extent> {
    raw.chunks(64 << 10)
        .enumerate()
        .map(|(i, c)| {
            let off = i as u64 * (64 << 10);
            if is_all_zero(c) {
                Extent::zero(off, c.len() as u64)
            } else {
                Extent::data(off, c.to_vec())
            }
        })
        .collect()
}

/// Feeds `bytes` split by `sizes` (cycled), then finishes.
fn decode_split(
    bytes: &[u8],
    next_len: &mut dyn FnMut(usize) -> usize,
) -> Result<Vec<Extent>, VhdError> {
    let mut dec = VhdDecoder::new();
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = next_len(rest.len()).clamp(1, rest.len());
        out.extend(dec.feed(&rest[..n])?);
        rest = &rest[n..];
    }
    out.extend(dec.finish()?);
    Ok(out)
}

fn decode_whole(bytes: &[u8]) -> Result<(Vec<Extent>, VhdDecoder), VhdError> {
    let mut dec = VhdDecoder::new();
    let mut out = dec.feed(bytes)?;
    out.extend(dec.finish()?);
    Ok((out, dec))
}

/// A short description of extents that prints well when an assertion fails.
fn shape(extents: &[Extent]) -> Vec<(u64, u64, bool)> {
    extents
        .iter()
        .map(|e| (e.offset, e.len(), matches!(e.data, ExtentData::Data(_))))
        .collect()
}

fn footer_checksum_fix(b: &mut [u8]) {
    b[64..68].fill(0);
    let s: u32 = b[..512]
        .iter()
        .map(|&x| u32::from(x))
        .fold(0, u32::wrapping_add);
    b[64..68].copy_from_slice(&(!s).to_be_bytes());
}

fn header_checksum_fix(b: &mut [u8]) {
    b[36..40].fill(0);
    let s: u32 = b[..1024]
        .iter()
        .map(|&x| u32::from(x))
        .fold(0, u32::wrapping_add);
    b[36..40].copy_from_slice(&(!s).to_be_bytes());
}

fn sample_vhd(size: u64, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let raw = random_disk(size, seed);
    let vhd = encode_extents(
        VhdSpec::dynamic(size, Uuid::from_u128(seed as u128)),
        &raw_extents(&raw),
    )
    .unwrap();
    (raw, vhd)
}

#[test]
fn dynamic_round_trip_covers_the_disk() {
    for (k, size) in [4 * MIB, 5 * MIB + 512, 512, 2 * MIB - 1024]
        .into_iter()
        .enumerate()
    {
        let (raw, vhd) = sample_vhd(size, 10 + k as u64);
        let (ext, dec) = decode_whole(&vhd).unwrap();
        assert_eq!(dec.disk_type(), Some(DiskType::Dynamic));
        assert_eq!(dec.footer().unwrap().creator_application, *b"tap\0");
        assert!(dec.parent().is_none());
        let mut end = 0;
        for e in &ext {
            assert_eq!(e.offset, end);
            end = e.end();
        }
        assert_eq!(end, size);
        assert!(materialize(&ext, size).unwrap() == raw, "size {size}");
        // Zero extents are merged: never two adjacent.
        for w in ext.windows(2) {
            assert!(
                !(matches!(w[0].data, ExtentData::Zero(_))
                    && matches!(w[1].data, ExtentData::Zero(_)))
            );
        }
    }
}

#[test]
fn layout_matches_what_xapi_writes() {
    let (_, vhd) = sample_vhd(6 * MIB, 3);
    let f0 = Footer::parse(&vhd[..512], 0).unwrap();
    let tail = vhd.len() - 512;
    assert_eq!(
        &vhd[..512],
        &vhd[tail..],
        "footer copy equals trailing footer"
    );
    assert_eq!(f0.data_offset, 512);
    assert_eq!(f0.creator_version, 0x0001_0003);
    let h = DynamicHeader::parse(&vhd[512..1536], 512).unwrap();
    assert_eq!(h.table_offset, 2048, "BAT at 2048 as in xapi streams");
    assert_eq!(h.block_size, 2 << 20);
    assert_eq!(h.max_table_entries, 3);
    assert!(
        vhd[1536..2048].iter().all(|&b| b == 0),
        "zero sector at 1536"
    );
    // Blocks ascending in both file and virtual order, bitmaps all ones.
    let bat: Vec<u32> = vhd[2048..2048 + 12]
        .chunks(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let allocated: Vec<u32> = bat.iter().copied().filter(|&e| e != u32::MAX).collect();
    assert!(allocated.windows(2).all(|w| w[0] < w[1]));
    for e in &allocated {
        let at = *e as usize * 512;
        assert!(vhd[at..at + 512].iter().all(|&b| b == 0xFF));
    }
    // blktap batmap after the BAT: valid header, checksum, bits for full blocks.
    let bh = BatmapHeader::parse(&vhd[2560..3072], 2560).unwrap();
    assert_eq!(bh.batmap_offset, 3072);
    assert_eq!(bh.batmap_size, 1);
    let map = &vhd[3072..3072 + 512];
    assert_eq!(BatmapHeader::checksum_of(map), bh.checksum);
    for (i, e) in bat.iter().enumerate() {
        let bit = map[i / 8] & (0x80 >> (i % 8)) != 0;
        assert_eq!(bit, *e != u32::MAX, "batmap bit of block {i}");
    }
    assert_eq!(
        bat.iter()
            .find(|&&e| e != u32::MAX)
            .map(|&e| e as usize * 512),
        Some(3584)
    );
}

#[test]
fn extents_do_not_depend_on_how_the_input_is_split() {
    let (raw, vhd) = sample_vhd(3 * MIB + 1024, 77);
    let (whole, _) = decode_whole(&vhd).unwrap();
    let one = decode_split(&vhd, &mut |_| 1).unwrap();
    assert!(
        one == whole,
        "1-byte feeding: {:?} vs {:?}",
        shape(&one),
        shape(&whole)
    );
    for seed in 0..8 {
        let mut rng = StdRng::seed_from_u64(seed);
        let got = decode_split(&vhd, &mut |left| match rng.random_range(0..4) {
            0 => rng.random_range(1..=7),
            1 => rng.random_range(1..=4096),
            2 => rng.random_range(1..=left),
            _ => 511,
        })
        .unwrap();
        assert!(got == whole, "seed {seed}: {:?}", shape(&got));
    }
    assert!(materialize(&whole, raw.len() as u64).unwrap() == raw);
}

#[test]
fn streaming_encoder_blocks_equal_the_convenience() {
    let size = 6 * MIB;
    let raw = random_disk(size, 5);
    let spec = VhdSpec::dynamic(size, Uuid::from_u128(9));
    let blocks = blocks_for_extents(&spec, &raw_extents(&raw)).unwrap();
    let mut enc = VhdEncoder::new(spec.clone(), blocks.clone()).unwrap();
    let mut out = enc.prologue().to_vec();
    for &b in &blocks {
        let s = (b as usize) << 21;
        out.extend(enc.encode_block(b, &raw[s..s + (2 << 20)]).unwrap());
    }
    out.extend(enc.finish().unwrap());
    assert_eq!(out.len() as u64, enc.total_len());
    assert!(out == encode_extents(spec, &raw_extents(&raw)).unwrap());
}

#[test]
fn encoder_refuses_bad_input() {
    let spec = VhdSpec::dynamic(4 * MIB, Uuid::nil());
    assert!(
        VhdEncoder::new(VhdSpec::dynamic(1000, Uuid::nil()), []).is_err(),
        "not whole sectors"
    );
    assert!(
        VhdEncoder::new(VhdSpec::dynamic(2041 << 30, Uuid::nil()), []).is_err(),
        "too big"
    );
    assert!(
        VhdEncoder::new(spec.clone(), [2]).is_err(),
        "block past the end"
    );
    let mut enc = VhdEncoder::new(spec.clone(), [0, 1]).unwrap();
    assert!(
        enc.encode_block(1, &vec![0; 2 << 20]).is_err(),
        "out of order"
    );
    assert!(enc.encode_block(0, &[0; 100]).is_err(), "wrong length");
    enc.encode_block(0, &vec![1; 2 << 20]).unwrap();
    assert!(enc.finish().is_err(), "block 1 missing");
    let overlapping = [Extent::zero(0, 10), Extent::zero(5, 10)];
    assert!(encode_extents(spec.clone(), &overlapping).is_err());
    assert!(
        encode_extents(spec, &[Extent::zero(4 * MIB - 1, 2)]).is_err(),
        "past the end"
    );
    let parent = ParentSpec {
        unique_id: Uuid::nil(),
        timestamp: 0,
        unicode_name: "p".into(),
        locators: vec![],
    };
    let diff = VhdSpec::differencing(4 * MIB, Uuid::nil(), parent);
    assert!(
        encode_extents(diff, &[Extent::data(100, vec![1; 512])]).is_err(),
        "unaligned delta"
    );
}

/// Parent disk P, newer disk C: C differs from P in some sectors (new data, zeroed
/// sectors, a partial block, a whole block), and the delta VHD carries exactly those.
#[test]
fn differencing_vhd_over_its_parent_gives_the_newer_disk() {
    let size = 8 * MIB + 3 * 512;
    let parent_raw = random_disk(size, 41);
    let parent_vhd = encode_extents(
        VhdSpec::dynamic(size, Uuid::from_u128(0xAAAA)),
        &raw_extents(&parent_raw),
    )
    .unwrap();
    let (parent_ext, pdec) = decode_whole(&parent_vhd).unwrap();
    let parent_uid = pdec.footer().unwrap().unique_id;

    let mut rng = StdRng::seed_from_u64(42);
    let mut child_raw = parent_raw.clone();
    let mut delta: Vec<Extent> = Vec::new();
    let mut changes: Vec<(u64, u64, bool)> = vec![
        (100 * 512, 8 * 512, false),  // new data inside block 0
        (300 * 512, 20 * 512, true),  // sectors zeroed
        (4095 * 512, 2 * 512, false), // across the block 0/1 boundary
        (6 * MIB, 2 * MIB, false),    // a whole block
        (size - 512, 512, false),     // the last sector of the partial last block
    ];
    changes.sort();
    for (off, len, zero) in changes {
        let r = off as usize..(off + len) as usize;
        if zero {
            child_raw[r].fill(0);
            delta.push(Extent::zero(off, len));
        } else {
            let mut d = vec![0u8; len as usize];
            rng.fill(&mut d[..]);
            child_raw[r].copy_from_slice(&d);
            delta.push(Extent::data(off, d));
        }
    }
    let parent_spec = ParentSpec {
        unique_id: parent_uid,
        timestamp: 1234,
        unicode_name: "parent.vhd".into(),
        locators: vec![
            LocatorSpec {
                platform: PlatformCode::MACX,
                path: "./parent.vhd".into(),
            },
            LocatorSpec {
                platform: PlatformCode::W2RU,
                path: ".\\parent.vhd".into(),
            },
        ],
    };
    let child_vhd = encode_extents(
        VhdSpec::differencing(size, Uuid::from_u128(0xBBBB), parent_spec),
        &delta,
    )
    .unwrap();

    for seed in 0..3u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let child_ext =
            decode_split(&child_vhd, &mut |l| rng.random_range(1..=l.min(1 << 20))).unwrap();
        // Only the sectors the delta holds.
        let covered: u64 = child_ext.iter().map(Extent::len).sum();
        assert_eq!(covered, delta.iter().map(Extent::len).sum::<u64>());
        let merged: Vec<Extent> = overlay(parent_ext.clone(), child_ext.clone())
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            materialize(&merged, size).unwrap() == child_raw,
            "seed {seed}"
        );
        let chain = coalesce(vec![parent_ext.clone(), child_ext]).unwrap();
        assert!(materialize(&chain, size).unwrap() == child_raw);
    }

    let (_, dec) = decode_whole(&child_vhd).unwrap();
    assert_eq!(dec.disk_type(), Some(DiskType::Differencing));
    let p = dec.parent().unwrap();
    assert_eq!(p.unique_id, parent_uid);
    assert_eq!(p.timestamp, 1234);
    assert_eq!(p.unicode_name, "parent.vhd");
    assert_eq!(p.locators.len(), 2);
    assert_eq!(p.locators[0].path.as_deref(), Some("./parent.vhd"));
    assert_eq!(
        p.locators[0].data.as_deref(),
        Some(&b"file://./parent.vhd"[..])
    );
    assert_eq!(p.locators[1].path.as_deref(), Some(".\\parent.vhd"));
    // Partial blocks: the bitmap of block 0 marks only the delta's sectors.
    let layout = dec.layout().unwrap();
    assert_eq!(layout.allocated_count(), 4, "blocks 0, 1, 3 and 4");
}

#[test]
fn random_access_layout_reads_blocks_in_any_order() {
    let (raw, vhd) = sample_vhd(7 * MIB, 8);
    let footer = Footer::parse(&vhd[vhd.len() - 512..], (vhd.len() - 512) as u64).unwrap();
    let header = DynamicHeader::parse(&vhd[512..], 512).unwrap();
    let n = VhdLayout::bat_bytes_needed(&footer, &header).unwrap();
    let t = header.table_offset as usize;
    let layout = VhdLayout::sparse(footer, header, &vhd[t..t + n]).unwrap();
    let mut got = vec![0u8; raw.len()];
    for i in (0..layout.block_count()).rev() {
        let ext = match layout.block_location(i) {
            None => layout.unallocated_extents(i),
            Some(l) => layout
                .block_extents(
                    i,
                    &vhd[l.file_offset as usize..(l.file_offset + l.file_len()) as usize],
                )
                .unwrap(),
        };
        for e in ext {
            if let ExtentData::Data(d) = e.data {
                got[e.offset as usize..e.offset as usize + d.len()].copy_from_slice(&d);
            }
        }
    }
    assert!(got == raw);
    assert!(
        layout.block_extents(0, &[0; 10]).is_err(),
        "short block bytes"
    );
}

/// Swaps the physical places of blocks so the file stores them out of virtual order.
#[test]
fn blocks_stored_out_of_order_are_reordered_within_the_bound() {
    let size = 8 * MIB;
    let mut raw = random_disk(size, 90);
    raw[..16].fill(1); // every block allocated
    for b in 0..4 {
        raw[(b << 21) + 5] = 9;
    }
    let mut vhd = encode_extents(VhdSpec::dynamic(size, Uuid::nil()), &raw_extents(&raw)).unwrap();
    let bat_at = 2048;
    let entry = |v: &[u8], i: usize| {
        u32::from_be_bytes(v[bat_at + 4 * i..bat_at + 4 * i + 4].try_into().unwrap())
    };
    let (e0, e3) = (entry(&vhd, 0), entry(&vhd, 3));
    let blk = (2 << 20) + 512;
    let (a, b) = (e0 as usize * 512, e3 as usize * 512);
    let block0 = vhd[a..a + blk].to_vec();
    let block3 = vhd[b..b + blk].to_vec();
    vhd[a..a + blk].copy_from_slice(&block3);
    vhd[b..b + blk].copy_from_slice(&block0);
    vhd[bat_at..bat_at + 4].copy_from_slice(&e3.to_be_bytes());
    vhd[bat_at + 12..bat_at + 16].copy_from_slice(&e0.to_be_bytes());
    let (ext, _) = decode_whole(&vhd).unwrap();
    assert!(materialize(&ext, size).unwrap() == raw);
    let one_block = VhdDecoder::with_options(DecoderOptions {
        max_reorder_bytes: 2 << 20,
        ..DecoderOptions::default()
    });
    let mut dec = one_block;
    let err = dec.feed(&vhd).unwrap_err();
    assert!(
        matches!(err, VhdError::NotStreamable(_)),
        "3 blocks held back > 1 allowed: {err}"
    );
}

#[test]
fn corrupt_inputs_give_errors() {
    let (_, good) = sample_vhd(4 * MIB, 21);
    let bat_at = 2048usize;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();

    let mut v = good.clone();
    v[0] = b'X';
    cases.push(("bad footer cookie", v));
    let mut v = good.clone();
    v[40] ^= 1;
    cases.push(("bad footer checksum", v));
    let mut v = good.clone();
    v[512] = b'X';
    cases.push(("bad header cookie", v));
    let mut v = good.clone();
    v[512 + 600] ^= 1;
    cases.push(("bad header checksum", v));
    let mut v = good.clone();
    v[48..56].copy_from_slice(&(1u64 << 62).to_be_bytes());
    footer_checksum_fix(&mut v);
    cases.push(("absurd current_size", v));
    let mut v = good.clone();
    v[16..24].copy_from_slice(&(1u64 << 60).to_be_bytes());
    footer_checksum_fix(&mut v);
    cases.push(("absurd data_offset", v));
    let mut v = good.clone();
    v[60..64].copy_from_slice(&9u32.to_be_bytes());
    footer_checksum_fix(&mut v);
    cases.push(("unknown disk type", v));
    let mut v = good.clone();
    v[512 + 28..512 + 32].copy_from_slice(&1u32.to_be_bytes());
    header_checksum_fix(&mut v[512..]);
    cases.push(("max_table_entries too small", v));
    let mut v = good.clone();
    v[512 + 32..512 + 36].copy_from_slice(&3_000_000u32.to_be_bytes());
    header_checksum_fix(&mut v[512..]);
    cases.push(("block size not a power of two", v));
    let mut v = good.clone();
    v[512 + 32..512 + 36].copy_from_slice(&(1u32 << 31).to_be_bytes());
    header_checksum_fix(&mut v[512..]);
    cases.push(("absurd block size", v));
    let mut v = good.clone();
    v[512 + 16..512 + 24].copy_from_slice(&u64::MAX.to_be_bytes());
    header_checksum_fix(&mut v[512..]);
    cases.push(("absurd table offset", v));
    let mut v = good.clone();
    v[512 + 16..512 + 24].copy_from_slice(&512u64.to_be_bytes());
    header_checksum_fix(&mut v[512..]);
    cases.push(("BAT over the header", v));
    let mut v = good.clone();
    v[bat_at..bat_at + 4].copy_from_slice(&0x00FF_FFFFu32.to_be_bytes());
    cases.push(("BAT entry past the end", v));
    let mut v = good.clone();
    v[bat_at..bat_at + 4].copy_from_slice(&2u32.to_be_bytes());
    cases.push(("BAT entry into the header", v));
    let mut v = good.clone();
    v[bat_at..bat_at + 4].copy_from_slice(&0u32.to_be_bytes());
    cases.push(("BAT entry on the footer copy", v));
    let mut v = good.clone();
    let e0 = v[bat_at..bat_at + 4].to_vec();
    v[bat_at + 4..bat_at + 8].copy_from_slice(&e0);
    cases.push(("two blocks at one place", v));
    let mut v = good.clone();
    let e0 = u32::from_be_bytes(v[bat_at..bat_at + 4].try_into().unwrap());
    v[bat_at + 4..bat_at + 8].copy_from_slice(&(e0 + 1).to_be_bytes());
    cases.push(("overlapping blocks", v));
    let mut v = good.clone();
    let n = v.len();
    v[n - 512 + 48..n - 512 + 56].copy_from_slice(&(8 * MIB).to_be_bytes());
    footer_checksum_fix(&mut v[n - 512..]);
    cases.push(("trailing footer disagrees", v));
    let mut v = good.clone();
    let n = v.len();
    v[n - 500] ^= 1;
    cases.push(("trailing footer checksum", v));
    for cut in [
        0,
        1,
        511,
        512,
        1000,
        1536,
        2100,
        4000,
        good.len() / 2,
        good.len() - 513,
        good.len() - 1,
    ] {
        cases.push(("truncated", good[..cut].to_vec()));
    }
    cases.push(("garbage", vec![0x5Au8; 10_000]));
    cases.push(("zeros", vec![0u8; 3 * 512]));

    for (what, bytes) in cases {
        let r = decode_whole(&bytes);
        match r {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.len() > 20, "{what}: message too terse: {msg}");
            }
            Ok((ext, _)) => panic!("{what}: decoded to {:?}", &shape(&ext)[..ext.len().min(4)]),
        }
        // Split feeding gives an error too, never a panic.
        let mut rng = StdRng::seed_from_u64(bytes.len() as u64);
        assert!(
            decode_split(&bytes, &mut |l| rng.random_range(1..=l.min(70_000))).is_err(),
            "{what}"
        );
    }
}

#[test]
fn errors_name_the_field_and_offset() {
    let (_, good) = sample_vhd(2 * MIB, 22);
    let mut v = good.clone();
    v[512 + 600] ^= 1;
    let e = decode_whole(&v).unwrap_err();
    assert_eq!(
        e,
        VhdError::BadChecksum {
            structure: "dynamic header",
            offset: 512,
            field_offset: 548,
            stored: u32::from_be_bytes(v[548..552].try_into().unwrap()),
            computed: u32::from_be_bytes(v[548..552].try_into().unwrap()).wrapping_sub(1),
        }
    );
    let mut v = good.clone();
    v[2048..2052].copy_from_slice(&2u32.to_be_bytes());
    match decode_whole(&v).unwrap_err() {
        VhdError::BadField {
            structure: "BAT",
            offset: 2048,
            reason,
            ..
        } => {
            assert!(reason.contains("header"), "{reason}")
        }
        other => panic!("{other}"),
    }
    // A stream cut inside a block says which block and where.
    let e = decode_whole(&good[..good.len() - 4096]).unwrap_err();
    assert!(e.to_string().contains("block 0"), "{e}");
    // After an error the decoder refuses more input.
    let mut dec = VhdDecoder::new();
    let mut bad = good.clone();
    bad[40] ^= 1;
    assert!(dec.feed(&bad[..600]).is_err());
    assert!(matches!(
        dec.feed(&bad[600..700]),
        Err(VhdError::Stopped(_))
    ));
}

/// Random byte flips in a small VHD (4 KiB blocks keep it tiny) never panic, whether
/// or not the checksums are repaired afterwards.
#[test]
fn mutated_vhds_never_panic() {
    let size = 64 << 10;
    let raw = random_disk(size, 3);
    let mut spec = VhdSpec::dynamic(size, Uuid::from_u128(5));
    spec.block_size = 4096;
    let good = encode_extents(spec, &raw_extents(&raw)).unwrap();
    let (ext, _) = decode_whole(&good).unwrap();
    assert!(
        materialize(&ext, size).unwrap() == raw,
        "small blocks decode"
    );
    let mut rng = StdRng::seed_from_u64(1);
    for i in 0..3000 {
        let mut v = good.clone();
        let meta = 8192.min(v.len());
        for _ in 0..rng.random_range(1..4) {
            let at = if rng.random_bool(0.8) {
                rng.random_range(0..meta)
            } else {
                rng.random_range(0..v.len())
            };
            v[at] = rng.random();
        }
        if i % 2 == 0 {
            footer_checksum_fix(&mut v[..FOOTER_SIZE]);
            let n = v.len();
            footer_checksum_fix(&mut v[n - FOOTER_SIZE..]);
            header_checksum_fix(&mut v[512..512 + HEADER_SIZE]);
        }
        if rng.random_bool(0.2) {
            let cut = rng.random_range(0..v.len());
            v.truncate(cut);
        }
        let _ = decode_whole(&v);
        let _ = decode_split(&v, &mut |l| rng.random_range(1..=l.min(3000)));
    }
}

/// Writes small fuzz seeds (4 KiB blocks) for `fuzz/fuzz_targets/vhd_decoder.rs` into
/// `$XENVAULT_VHD_SEEDS`: `XENVAULT_VHD_SEEDS=$PWD/fuzz/seeds/vhd_decoder cargo test -p
/// xenvault-formats --test vhd_codec -- --ignored write_vhd_fuzz_seeds`.
/// Each seed starts with the target's two control bytes (flags, split seed).
#[test]
#[ignore = "generates fuzz corpus files on request"]
fn write_vhd_fuzz_seeds() {
    let Ok(dir) = std::env::var("XENVAULT_VHD_SEEDS") else {
        eprintln!("set XENVAULT_VHD_SEEDS to a directory");
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    let size = 48 << 10;
    let mut raw = random_disk(size, 12);
    for at in [0, 5000, 13000, 30000, 47000] {
        raw[at] = 0x42;
    }
    let mut dynamic = VhdSpec::dynamic(size, Uuid::from_u128(1));
    dynamic.block_size = 4096;
    let parent = ParentSpec {
        unique_id: Uuid::from_u128(1),
        timestamp: 0,
        unicode_name: "p.vhd".into(),
        locators: vec![LocatorSpec {
            platform: PlatformCode::MACX,
            path: "./p.vhd".into(),
        }],
    };
    let mut diff = VhdSpec::differencing(size, Uuid::from_u128(2), parent);
    diff.block_size = 4096;
    let delta = [Extent::data(4096, vec![7; 1024]), Extent::zero(20480, 512)];
    let mut fixed = raw[..8192].to_vec();
    let mut f = Footer::parse(
        &encode_extents(VhdSpec::dynamic(8192, Uuid::nil()), &[]).unwrap()[..512],
        0,
    )
    .unwrap();
    f.disk_type = DiskType::Fixed;
    f.data_offset = u64::MAX;
    f.current_size = 8192;
    fixed.extend_from_slice(&f.to_bytes());
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "dynamic",
            encode_extents(dynamic.clone(), &raw_extents(&raw)).unwrap(),
        ),
        ("empty", encode_extents(dynamic, &[]).unwrap()),
        ("differencing", encode_extents(diff, &delta).unwrap()),
        ("fixed", fixed),
    ];
    for (name, vhd) in seeds {
        for flags in [0u8, 1] {
            let mut seed = vec![flags, 0x5D];
            seed.extend_from_slice(&vhd);
            std::fs::write(format!("{dir}/{name}-{flags}"), seed).unwrap();
        }
    }
}

/// Found by the fuzzer: a parent locator offset near u64::MAX must be ignored, not overflow.
#[test]
fn absurd_locator_offset_is_ignored() {
    let parent = ParentSpec {
        unique_id: Uuid::from_u128(1),
        timestamp: 0,
        unicode_name: "p.vhd".into(),
        locators: vec![LocatorSpec {
            platform: PlatformCode::MACX,
            path: "./p.vhd".into(),
        }],
    };
    let mut v = encode_extents(
        VhdSpec::differencing(2 * MIB, Uuid::from_u128(2), parent),
        &[Extent::data(0, vec![3; 512])],
    )
    .unwrap();
    let loc0 = 512 + 576;
    v[loc0 + 16..loc0 + 24].copy_from_slice(&(u64::MAX - 10).to_be_bytes());
    header_checksum_fix(&mut v[512..512 + HEADER_SIZE]);
    let (ext, dec) = decode_whole(&v).unwrap();
    assert_eq!(shape(&ext), vec![(0, 512, true)]);
    let p = dec.parent().unwrap();
    assert_eq!(p.locators.len(), 1);
    assert_eq!(p.locators[0].data, None);
}

/// A stream shaped like xapi's `export_raw_vdi?format=vhd&base=`: creator `caml` 1,
/// no batmap, locator 0 pointing at the zeroed sector 1536.
#[test]
fn xapi_style_delta_stream_decodes() {
    let parent = ParentSpec {
        unique_id: Uuid::from_u128(0x77),
        timestamp: 0,
        unicode_name: "/var/run/sr-mount/sr/base.vhd".into(),
        locators: vec![LocatorSpec {
            platform: PlatformCode::MACX,
            path: "/var/run/sr-mount/sr/base.vhd".into(),
        }],
    };
    let delta = [Extent::data(2 * MIB, vec![0xEE; 4096])];
    let mut v = encode_extents(
        VhdSpec::differencing(4 * MIB, Uuid::from_u128(0x78), parent),
        &delta,
    )
    .unwrap();
    let n = v.len();
    for at in [0, n - 512] {
        v[at + 28..at + 32].copy_from_slice(b"caml");
        v[at + 32..at + 36].copy_from_slice(&1u32.to_be_bytes());
        footer_checksum_fix(&mut v[at..at + 512]);
    }
    v[1536..2048].fill(0); // xapi leaves the locator sector empty
    v[2560..3584].fill(0); // and writes no batmap
    let (ext, dec) = decode_whole(&v).unwrap();
    assert_eq!(shape(&ext), vec![(2 * MIB, 4096, true)]);
    let p = dec.parent().unwrap();
    assert_eq!(p.unique_id, Uuid::from_u128(0x77));
    assert_eq!(p.unicode_name, "/var/run/sr-mount/sr/base.vhd");
    assert_eq!(p.locators.len(), 1);
    assert_eq!(p.locators[0].path, None, "zeroed locator sector: no path");
    assert!(!dec.footer().unwrap().claims_batmap());
}
