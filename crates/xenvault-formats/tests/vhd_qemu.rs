//! VHD interoperability with qemu-img (the `vpc` driver): our encoder's files compare
//! identical to their raw source, and qemu's dynamic, fixed and out-of-order files decode
//! to the raw bytes. qemu-img is required under CI=true; elsewhere a missing qemu-img
//! skips these tests loudly.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xenvault_formats::vhd::{
    DecoderOptions, DiskType, DynamicHeader, Footer, VhdDecoder, VhdError, VhdLayout, VhdSpec,
    encode_extents, materialize,
};
use xenvault_types::extent::is_all_zero;
use xenvault_types::{Extent, ExtentData};

const MIB: u64 = 1 << 20;

/// The qemu tools, or `None` (with a loud message) when they are missing outside CI.
fn qemu_available() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu-img is required (CI=true) but was not found; apt-get install qemu-utils"
        );
        eprintln!("!!!!! SKIPPING VHD/qemu interop test: qemu-img not found !!!!!");
    }
    ok
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A seeded pseudo-random disk with holes: 64 KiB runs of random data, zeros, and a
/// whole-zero 2 MiB block when the disk is big enough.
fn random_disk(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut raw = vec![0u8; size as usize];
    let mut off = 0usize;
    while off < raw.len() {
        let len = rng.random_range(1..=128usize) * 512;
        let end = (off + len).min(raw.len());
        let in_hole_block = (off as u64 / (2 * MIB)) == 1 && size > 4 * MIB;
        if !in_hole_block && rng.random_bool(0.5) {
            rng.fill(&mut raw[off..end]);
        }
        off = end;
    }
    // Make sure the last sector holds data (the tail of a partial last block).
    let n = raw.len();
    raw[n - 1] = 0xA5;
    raw
}

/// Extents of a raw disk: 64 KiB pieces, zeros as zero extents.
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

/// Decodes a whole VHD with the push decoder, fed in seeded random pieces.
fn decode(bytes: &[u8], seed: u64) -> Result<(Vec<Extent>, VhdDecoder), VhdError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dec = VhdDecoder::new();
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = rng.random_range(1..=rest.len().min(3 << 20));
        out.extend(dec.feed(&rest[..n])?);
        rest = &rest[n..];
    }
    out.extend(dec.finish()?);
    Ok((out, dec))
}

/// Decodes a file through `VhdLayout`, reading blocks in virtual order as a seeking reader would.
fn decode_random_access(bytes: &[u8]) -> Vec<Extent> {
    let tail = bytes.len() - 512;
    let footer = Footer::parse(&bytes[tail..], tail as u64).unwrap();
    let layout = if footer.disk_type == DiskType::Fixed {
        VhdLayout::fixed(footer, tail as u64).unwrap()
    } else {
        let h = footer.data_offset as usize;
        let header = DynamicHeader::parse(&bytes[h..], h as u64).unwrap();
        let n = VhdLayout::bat_bytes_needed(&footer, &header).unwrap();
        let t = header.table_offset as usize;
        let bat = bytes[t..t + n].to_vec();
        VhdLayout::sparse(footer, header, &bat).unwrap()
    };
    let mut out = Vec::new();
    for i in 0..layout.block_count() {
        match layout.block_location(i) {
            None => out.extend(layout.unallocated_extents(i)),
            Some(loc) => {
                let at = loc.file_offset as usize;
                out.extend(
                    layout
                        .block_extents(i, &bytes[at..at + loc.file_len() as usize])
                        .unwrap(),
                );
            }
        }
    }
    out
}

fn assert_covers(extents: &[Extent], size: u64) {
    let mut end = 0;
    for e in extents {
        assert_eq!(e.offset, end, "extents must be contiguous for a full disk");
        end = e.end();
    }
    assert_eq!(end, size);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn our_dynamic_vhd_compares_identical_with_qemu() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Multiples of 2 MiB and not (a partial last block, an odd number of sectors).
    for (k, size) in [6 * MIB, 5 * MIB + 7 * 512, 3 * MIB + 512, 2 * MIB]
        .into_iter()
        .enumerate()
    {
        let raw = random_disk(size, 100 + k as u64);
        let vhd = encode_extents(
            VhdSpec::dynamic(size, uuid::Uuid::from_u128(0x1000 + k as u128)),
            &raw_extents(&raw),
        )
        .unwrap();
        let raw_p = write(dir.path(), &format!("a{k}.raw"), &raw);
        let vhd_p = write(dir.path(), &format!("a{k}.vhd"), &vhd);
        let out =
            run(Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "vpc", &raw_p, &vhd_p]));
        assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
        let info =
            run(Command::new("qemu-img").args(["info", "--output=json", "-f", "vpc", &vhd_p]));
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "qemu must trust current_size ({size}): {info}"
        );
        // The comparison can fail: one changed byte makes qemu report a difference.
        let mut changed = raw.clone();
        changed[(size / 2) as usize] ^= 0x40;
        let changed_p = write(dir.path(), &format!("b{k}.raw"), &changed);
        let status = Command::new("qemu-img")
            .args([
                "compare", "-q", "-f", "raw", "-F", "vpc", &changed_p, &vhd_p,
            ])
            .status()
            .unwrap();
        assert_eq!(
            status.code(),
            Some(1),
            "qemu-img compare must see the change"
        );
        // And our own decoder agrees.
        let (ext, _) = decode(&vhd, k as u64).unwrap();
        assert_covers(&ext, size);
        assert!(materialize(&ext, size).unwrap() == raw);
    }
}

#[test]
fn qemu_dynamic_vhds_decode_to_the_raw_bytes() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (k, size) in [8 * MIB, 5 * MIB + 3 * 512].into_iter().enumerate() {
        let raw = random_disk(size, 200 + k as u64);
        let raw_p = write(dir.path(), &format!("r{k}.raw"), &raw);
        let vhd_p = dir.path().join(format!("q{k}.vhd"));
        run(Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                "subformat=dynamic,force_size=on",
                &raw_p,
            ])
            .arg(&vhd_p));
        let vhd = std::fs::read(&vhd_p).unwrap();
        for seed in 0..3 {
            let (ext, dec) = decode(&vhd, seed).unwrap();
            assert_eq!(dec.disk_type(), Some(DiskType::Dynamic));
            assert_covers(&ext, size);
            assert!(
                materialize(&ext, size).unwrap() == raw,
                "size {size} seed {seed}"
            );
        }
        let ext = decode_random_access(&vhd);
        assert!(materialize(&ext, size).unwrap() == raw);
    }
}

#[test]
fn qemu_created_empty_dynamic_vhd_is_all_zero() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.vhd");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
        ])
        .arg(&p)
        .arg("6M"));
    let vhd = std::fs::read(&p).unwrap();
    let (ext, _) = decode(&vhd, 1).unwrap();
    assert_eq!(ext, vec![Extent::zero(0, 6 * MIB)]);
}

#[test]
fn qemu_fixed_vhds_decode_to_the_raw_bytes() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (k, size) in [4 * MIB, 3 * MIB + 5 * 512].into_iter().enumerate() {
        let raw = random_disk(size, 300 + k as u64);
        let raw_p = write(dir.path(), &format!("f{k}.raw"), &raw);
        let vhd_p = dir.path().join(format!("f{k}.vhd"));
        run(Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                "subformat=fixed,force_size=on",
                &raw_p,
            ])
            .arg(&vhd_p));
        let vhd = std::fs::read(&vhd_p).unwrap();
        assert_eq!(vhd.len() as u64, size + 512);
        for seed in 0..3 {
            let (ext, dec) = decode(&vhd, seed).unwrap();
            assert_eq!(dec.disk_type(), Some(DiskType::Fixed));
            assert_covers(&ext, size);
            assert!(materialize(&ext, size).unwrap() == raw);
        }
        let ext = decode_random_access(&vhd);
        assert!(materialize(&ext, size).unwrap() == raw);
        // Without fixed disks allowed, the first sector is refused at once.
        let mut strict = VhdDecoder::with_options(DecoderOptions {
            allow_fixed: false,
            ..DecoderOptions::default()
        });
        assert!(matches!(
            strict.feed(&vhd[..4096]),
            Err(VhdError::BadCookie { offset: 0, .. })
        ));
    }
}

#[test]
fn qemu_blocks_out_of_virtual_order_are_reordered() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ooo.vhd");
    let ps = p.to_str().unwrap();
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic,force_size=on",
        ps,
        "8M",
    ]));
    // Allocation order 3, 0, 1: the file stores block 3 first.
    run(Command::new("qemu-io").args([
        "-f",
        "vpc",
        "-c",
        "write -P 0x11 6M 64k",
        "-c",
        "write -P 0x22 0 64k",
        "-c",
        "write -P 0x33 2M 4k",
        ps,
    ]));
    let vhd = std::fs::read(&p).unwrap();
    let mut raw = vec![0u8; 8 << 20];
    raw[6 << 20..(6 << 20) + (64 << 10)].fill(0x11);
    raw[..64 << 10].fill(0x22);
    raw[2 << 20..(2 << 20) + 4096].fill(0x33);

    let mut seen_order = Vec::new();
    for seed in 0..3 {
        let (ext, dec) = decode(&vhd, seed).unwrap();
        assert_covers(&ext, 8 * MIB);
        assert!(materialize(&ext, 8 * MIB).unwrap() == raw);
        seen_order = dec
            .layout()
            .unwrap()
            .blocks_in_file_order()
            .map(|l| l.index)
            .collect::<Vec<_>>();
    }
    assert_eq!(seen_order, vec![3, 0, 1], "qemu allocated in write order");
    assert!(materialize(&decode_random_access(&vhd), 8 * MIB).unwrap() == raw);

    // With no room to hold blocks back the decoder says so as soon as it has the BAT.
    let mut dec = VhdDecoder::with_options(DecoderOptions {
        max_reorder_bytes: 0,
        ..DecoderOptions::default()
    });
    let err = dec.feed(&vhd[..64 << 10]).unwrap_err();
    assert!(matches!(err, VhdError::NotStreamable(_)), "{err}");
    assert!(err.to_string().contains("VhdLayout"));
}

#[test]
fn qemu_data_extents_only_where_qemu_allocated() {
    if !qemu_available() {
        return;
    }
    // A sanity check of the extents' kinds: qemu's empty blocks are zero extents.
    let dir = tempfile::tempdir().unwrap();
    let size = 6 * MIB;
    let mut raw = vec![0u8; size as usize];
    raw[(4 * MIB) as usize..(4 * MIB + 512) as usize].fill(9);
    let raw_p = write(dir.path(), "s.raw", &raw);
    let vhd_p = dir.path().join("s.vhd");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            &raw_p,
        ])
        .arg(&vhd_p));
    let (ext, _) = decode(&std::fs::read(&vhd_p).unwrap(), 5).unwrap();
    assert_eq!(ext[0], Extent::zero(0, 4 * MIB));
    assert!(matches!(ext[1].data, ExtentData::Data(_)));
    assert_eq!(ext[1].offset, 4 * MIB);
}
