//! Fuzzes the VHD push decoder: any input gives extents or an error, never a panic
//! or an unbounded allocation; feeding in arbitrary pieces gives the same outcome as
//! feeding at once; decoded extents are in increasing order inside the virtual size.
//!
//! Input: byte 0 = flags (bit 0: repair the footer and header checksums so the fuzzer
//! reaches the BAT and the blocks), byte 1 = split seed, the rest = the VHD stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvault_formats::vhd::{DecoderOptions, VhdDecoder};
use xenvault_types::Extent;

fn options() -> DecoderOptions {
    DecoderOptions {
        max_reorder_bytes: 8 << 20,
        ..DecoderOptions::default()
    }
}

fn checksum_fix(b: &mut [u8], field: usize, len: usize) {
    if b.len() < len {
        return;
    }
    b[field..field + 4].fill(0);
    let s = b[..len]
        .iter()
        .fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
    b[field..field + 4].copy_from_slice(&(!s).to_be_bytes());
}

fn decode(data: &[u8], cuts: &[usize]) -> Result<(Vec<Extent>, u64), String> {
    let mut dec = VhdDecoder::with_options(options());
    let mut out = Vec::new();
    let mut start = 0;
    for &c in cuts.iter().chain(std::iter::once(&data.len())) {
        let c = c.clamp(start, data.len());
        out.extend(dec.feed(&data[start..c]).map_err(|e| e.to_string())?);
        start = c;
    }
    out.extend(dec.finish().map_err(|e| e.to_string())?);
    let size = dec.footer().map_or(0, |f| f.current_size);
    Ok((out, size))
}

fuzz_target!(|input: &[u8]| {
    let [flags, seed, rest @ ..] = input else {
        return;
    };
    let mut data = rest.to_vec();
    if flags & 1 != 0 {
        let n = data.len();
        checksum_fix(&mut data, 64, 512);
        if n >= 512 {
            checksum_fix(&mut data[n - 512..], 64, 512);
        }
        if data.len() >= 512 {
            let h = u64::from_be_bytes(data[16..24].try_into().unwrap_or([0; 8]));
            if let Ok(h) = usize::try_from(h) {
                if h.checked_add(1024).is_some_and(|e| e <= data.len()) {
                    checksum_fix(&mut data[h..], 36, 1024);
                }
            }
        }
    }
    let whole = decode(&data, &[]);
    // Pseudo-random cut points from the seed (including 1-byte pieces).
    let mut cuts = Vec::new();
    let mut x = u64::from(*seed) | 1;
    let mut at = 0usize;
    while at < data.len() && cuts.len() < 64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        at += 1 + (x % 4096) as usize;
        cuts.push(at);
    }
    let split = decode(&data, &cuts);
    match (&whole, &split) {
        (Ok(a), Ok(b)) => assert!(a == b, "split decoding differs"),
        (Err(_), Err(_)) => {}
        _ => panic!(
            "whole: {:?} / split: {:?}",
            whole.as_ref().err(),
            split.as_ref().err()
        ),
    }
    if let Ok((extents, size)) = whole {
        let mut end = 0;
        for e in &extents {
            assert!(e.offset >= end && !e.is_empty());
            end = e.end();
        }
        assert!(end <= size);
    }
});
