//! XVA encoder and decoder against each other, hand-made archives, and every
//! rejection the decoder promises.
#![allow(clippy::unwrap_used)]

mod xva_support;

use xenvault_formats::xva::{
    ChecksumKind, NEVER, NULL_REF, OvaVersion, OvaXml, XvaDecoder, XvaDecoderOptions, XvaEncoder,
    XvaEncoderOptions, XvaError, XvaEvent, checksum_text,
};
use xenvault_types::{Extent, Value};
use xva_support::*;

const SIZES: [u64; 3] = [5 * MIB, 3 * MIB + 12345, 4 * MIB];

fn fixture() -> (OvaXml, Vec<Vec<u8>>) {
    let ova = ova(&SIZES);
    let disks = SIZES
        .iter()
        .enumerate()
        .map(|(i, &s)| disk(i as u64 + 1, s))
        .collect();
    (ova, disks)
}

fn opts() -> XvaEncoderOptions {
    XvaEncoderOptions {
        ova_mtime: Some(1_700_000_000),
        ..XvaEncoderOptions::default()
    }
}

fn assert_same_disks(archive: &[u8], step: usize, disks: &[Vec<u8>]) {
    let ev = events(archive, step).unwrap();
    let got = disks_of(&ev);
    assert_eq!(got.len(), disks.len());
    for (i, d) in disks.iter().enumerate() {
        assert!(got[&vdi_uuid(i)] == *d, "disk {i} differs");
    }
}

#[test]
fn round_trip_three_disks_in_string_order() {
    let (ova, disks) = fixture();
    let ids: Vec<String> = ova.disks().unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(
        ids,
        ["Ref:12", "Ref:14", "Ref:9"],
        "Ref:10-style ids sort as strings"
    );
    let archive = encode(&ova, &disks, opts());
    assert_same_disks(&archive, archive.len(), &disks);
    assert_same_disks(&archive, 65536 + 17, &disks);

    let ents = entries(&archive);
    assert_eq!(ents[0].0, "ova.xml");
    assert_eq!(ents[0].2, 1_700_000_000, "ova.xml mtime is the given time");
    assert!(ents[1..].iter().all(|e| e.2 == 0), "chunk mtime is 0");
    let names: Vec<&str> = ents.iter().map(|e| e.0.as_str()).collect();
    // Disk Ref:9 (5 MiB, chunks 1 and 2 all zero) leaves them out but keeps 0 and 4.
    let ref9: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("Ref:9/") && !n.contains('.'))
        .collect();
    assert_eq!(ref9.first(), Some(&"Ref:9/00000000"));
    assert_eq!(ref9.last(), Some(&"Ref:9/00000004"));
    assert!(!ref9.contains(&"Ref:9/00000001") && !ref9.contains(&"Ref:9/00000002"));
    // Disk order in the stream, each chunk followed by its checksum.
    let first_of = |p: &str| names.iter().position(|n| n.starts_with(p)).unwrap();
    assert!(first_of("Ref:12/") < first_of("Ref:14/") && first_of("Ref:14/") < first_of("Ref:9/"));
    for w in ents[1..].chunks(2) {
        assert_eq!(w[1].0, format!("{}.xxhash", w[0].0));
        assert_eq!(w[1].3.len(), 16);
        assert!(
            w[1].3
                .iter()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
        );
        assert_eq!(
            w[1].3,
            checksum_text(ChecksumKind::XxHash, &w[0].3).as_bytes()
        );
    }
    // The last chunk of the 3 MiB + 12345 disk is short.
    let last12 = ents
        .iter()
        .rfind(|e| e.0.starts_with("Ref:14/") && !e.0.contains('.'));
    assert!(last12.is_some());
    let ref12_last = ents
        .iter()
        .rfind(|e| e.0.starts_with("Ref:12/") && !e.0.contains('.'))
        .unwrap();
    assert_eq!(ref12_last.0, "Ref:12/00000003");
    assert_eq!(ref12_last.1, 12345);
    // The tar end.
    assert!(
        archive.len().is_multiple_of(512)
            && archive[archive.len() - 1024..].iter().all(|&b| b == 0)
    );
}

#[test]
fn one_byte_feeding_equals_bulk() {
    let sizes = [2 * MIB, MIB + 100];
    let ova = ova(&sizes);
    let disks: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| disk(9 + i as u64, s))
        .collect();
    let archive = encode(&ova, &disks, opts());
    let bulk = events(&archive, archive.len()).unwrap();
    let bytewise = events(&archive, 1).unwrap();
    assert!(
        bulk == bytewise,
        "events differ between 1-byte and bulk feeding"
    );
    let odd = events(&archive, 511).unwrap();
    assert!(bulk == odd);
}

#[test]
fn legacy_sha1_checksums() {
    let (ova, disks) = fixture();
    let o = XvaEncoderOptions {
        checksum: ChecksumKind::Sha1,
        ..opts()
    };
    let archive = encode(&ova, &disks, o);
    for (name, _, _, data) in entries(&archive).iter().skip(1) {
        if name.contains('.') {
            assert!(name.ends_with(".checksum"));
            assert_eq!(data.len(), 40);
            assert!(
                data.iter()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
            );
        }
    }
    assert_same_disks(&archive, 4096, &disks);
}

#[test]
fn keep_alive_chunks_shift_counters_but_not_offsets() {
    let (ova, disks) = fixture();
    let archive = encode_with(&ova, &disks, opts(), |enc, n| {
        if n % 3 == 1 {
            enc.keep_alive();
        }
    });
    let ents = entries(&archive);
    let empties = ents.iter().filter(|e| e.1 == 0).count();
    assert!(empties >= 3, "keep-alive chunks were written ({empties})");
    assert_same_disks(&archive, archive.len(), &disks);
    // Without keep-alives the counters are offset / 1 MiB, so the archives differ.
    assert_ne!(archive, encode(&ova, &disks, opts()));
}

/// A stream laid out as xapi < 26 writes it: chunk 0, chunks 1-2 omitted,
/// a keep-alive taking counter 3, then data at 3 MiB under counter 4.
#[test]
fn xapi_style_keep_alive_and_omission_by_hand() {
    let ova = ova(&[4 * MIB]);
    let xml = ova.to_xml();
    let c0 = vec![1u8; MIB as usize];
    let c4 = vec![2u8; MIB as usize];
    let sum = |d: &[u8]| checksum_text(ChecksumKind::XxHash, d);
    let (s0, se, s4) = (sum(&c0), sum(&[]), sum(&c4));
    let archive = tar(&[
        ("ova.xml", xml.as_bytes()),
        ("Ref:9/00000000", &c0),
        ("Ref:9/00000000.xxhash", s0.as_bytes()),
        ("Ref:9/00000003", &[]),
        ("Ref:9/00000003.xxhash", se.as_bytes()),
        ("Ref:9/00000004", &c4),
        ("Ref:9/00000004.xxhash", s4.as_bytes()),
    ]);
    let ev = events(&archive, 1000).unwrap();
    let extents: Vec<&Extent> = ev
        .iter()
        .filter_map(|e| match e {
            XvaEvent::Extent(x) => Some(x),
            _ => None,
        })
        .collect();
    assert_eq!(extents.len(), 3);
    assert_eq!(*extents[1], Extent::zero(MIB, 2 * MIB));
    assert_eq!(extents[2].offset, 3 * MIB);
    let disk = disks_of(&ev).remove(&vdi_uuid(0)).unwrap();
    assert_eq!(&disk[3 * MIB as usize..], &c4[..]);
}

#[test]
fn xva_img_style_zero_chunks_become_zero_extents() {
    let ova = ova(&[3 * MIB]);
    let xml = ova.to_xml();
    let z = vec![0u8; MIB as usize];
    let d = vec![3u8; MIB as usize];
    let s = |b: &[u8]| checksum_text(ChecksumKind::Sha1, b);
    let (sz, sd) = (s(&z), s(&d));
    let archive = tar(&[
        ("ova.xml", xml.as_bytes()),
        ("Ref:9/00000000", &z),
        ("Ref:9/00000000.checksum", sz.as_bytes()),
        ("Ref:9/00000001", &z),
        ("Ref:9/00000001.checksum", sz.as_bytes()),
        ("Ref:9/00000002", &d),
        ("Ref:9/00000002.checksum", sd.as_bytes()),
    ]);
    let ev = events(&archive, archive.len()).unwrap();
    let ext: Vec<&Extent> = ev
        .iter()
        .filter_map(|e| {
            if let XvaEvent::Extent(x) = e {
                Some(x)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(*ext[0], Extent::zero(0, 2 * MIB), "zero chunks merged");
    assert_eq!(*ext[1], Extent::data(2 * MIB, d));
}

#[test]
fn small_first_disk_disables_omission_and_decoder_fills_with_first_chunk_len() {
    // The first disk in stream order (Ref:12) is 512 KiB: xapi's importer
    // would fill omitted chunks with 512 KiB, so nothing may be omitted after it.
    let sizes = [3 * MIB, MIB / 2];
    let ova = ova(&sizes);
    assert_eq!(ova.disks().unwrap()[0].virtual_size, MIB / 2);
    let disks = vec![vec![0u8; 3 * MIB as usize], disk(4, MIB / 2)];
    let archive = encode(&ova, &disks, opts());
    let chunks = entries(&archive)
        .into_iter()
        .filter(|e| e.0.starts_with("Ref:9/") && !e.0.contains('.'))
        .count();
    assert_eq!(chunks, 3, "every chunk of the later disk is written");
    assert_same_disks(&archive, 777, &disks);

    // Decoder: after a 512 KiB first chunk, one omitted counter means 512 KiB.
    let xml = ova.to_xml();
    let a = vec![7u8; MIB as usize / 2];
    let full = vec![8u8; MIB as usize];
    let rest = vec![9u8; MIB as usize + MIB as usize / 2];
    let s = |b: &[u8]| checksum_text(ChecksumKind::XxHash, b);
    let (sa, sf, sr) = (s(&a), s(&full), s(&rest));
    let archive = tar(&[
        ("ova.xml", xml.as_bytes()),
        ("Ref:12/00000000", &a),
        ("Ref:12/00000000.xxhash", sa.as_bytes()),
        ("Ref:9/00000000", &full),
        ("Ref:9/00000000.xxhash", sf.as_bytes()),
        ("Ref:9/00000002", &rest),
        ("Ref:9/00000002.xxhash", sr.as_bytes()),
    ]);
    let ev = events(&archive, archive.len()).unwrap();
    assert!(ev.contains(&XvaEvent::Extent(Extent::zero(MIB, MIB / 2))));
    assert_eq!(disks_of(&ev)[&vdi_uuid(0)].len() as u64, 3 * MIB);
}

#[test]
fn flipped_data_byte_is_a_checksum_error_naming_disk_and_chunk() {
    let (ova, disks) = fixture();
    let archive = encode(&ova, &disks, opts());
    let ents = entries(&archive);
    // Find the data of Ref:14/00000003 in the archive and flip one byte.
    let target = ents.iter().find(|e| e.0 == "Ref:14/00000003").unwrap();
    let k = (0..target.3.len())
        .step_by(64)
        .find(|&k| target.3[k..k + 64].iter().any(|&b| b != 0))
        .unwrap();
    let pos = archive
        .windows(64)
        .position(|w| w == &target.3[k..k + 64])
        .unwrap();
    let mut bad = archive.clone();
    bad[pos + 10] ^= 1;
    match events(&bad, 10_000) {
        Err(XvaError::ChecksumMismatch {
            disk, chunk, kind, ..
        }) => {
            assert_eq!(
                (disk.as_str(), chunk.as_str(), kind),
                ("Ref:14", "00000003", "xxhash")
            );
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    // With verification off (xapi's force=true) it decodes.
    let mut dec = XvaDecoder::with_options(XvaDecoderOptions {
        verify_checksums: false,
        ..XvaDecoderOptions::default()
    });
    dec.feed(&bad).unwrap();
    dec.finish().unwrap();
}

#[test]
fn checksums_compare_case_sensitively() {
    let ova = ova(&[MIB]);
    let xml = ova.to_xml();
    let d = vec![0xabu8; MIB as usize];
    let upper = checksum_text(ChecksumKind::XxHash, &d);
    assert_eq!(upper, upper.to_uppercase());
    let lower = upper.to_lowercase();
    assert_ne!(upper, lower, "the fixture's hash must contain letters");
    let mk = |s: &str| {
        tar(&[
            ("ova.xml", xml.as_bytes()),
            ("Ref:9/00000000", &d),
            ("Ref:9/00000000.xxhash", s.as_bytes()),
        ])
    };
    assert!(events(&mk(&upper), 100_000).is_ok());
    assert!(matches!(
        events(&mk(&lower), 100_000),
        Err(XvaError::ChecksumMismatch { .. })
    ));
    let sha = checksum_text(ChecksumKind::Sha1, &d);
    let mk = |s: &str| {
        tar(&[
            ("ova.xml", xml.as_bytes()),
            ("Ref:9/00000000", &d),
            ("Ref:9/00000000.checksum", s.as_bytes()),
        ])
    };
    assert!(events(&mk(&sha), 100_000).is_ok());
    assert!(matches!(
        events(&mk(&sha.to_uppercase()), 100_000),
        Err(XvaError::ChecksumMismatch { kind: "sha1", .. })
    ));
}

fn one_chunk_archive(entries_after_ova: &[(&str, &[u8])]) -> Vec<u8> {
    let xml = ova(&[MIB]).to_xml();
    let mut all: Vec<(&str, &[u8])> = vec![("ova.xml", xml.as_bytes())];
    all.extend_from_slice(entries_after_ova);
    tar(&all)
}

#[test]
fn rejections() {
    let d = vec![1u8; MIB as usize];
    let s = checksum_text(ChecksumKind::XxHash, &d);
    let good = one_chunk_archive(&[
        ("Ref:9/00000000", &d),
        ("Ref:9/00000000.xxhash", s.as_bytes()),
    ]);
    assert!(events(&good, 4096).is_ok());

    // First entry not ova.xml.
    let a = tar(&[("Ref:9/00000000", &d)]);
    assert!(matches!(events(&a, 4096), Err(XvaError::NotAnXva { .. })));
    // Compressed input gets a clear error.
    let mut gz = vec![0x1f, 0x8b, 8, 0];
    gz.extend_from_slice(&[0x55; 600]);
    match events(&gz, 1) {
        Err(XvaError::NotAnXva { found }) => assert_eq!(found, "gzip-compressed data"),
        other => panic!("{other:?}"),
    }
    // Unknown checksum extension.
    let a = one_chunk_archive(&[("Ref:9/00000000", &d), ("Ref:9/00000000.md5", b"x")]);
    assert!(matches!(
        events(&a, 4096),
        Err(XvaError::UnknownChecksum { .. })
    ));
    // Chunk without a checksum.
    let a = one_chunk_archive(&[("Ref:9/00000000", &d[..10]), ("Ref:9/00000001", &d)]);
    assert!(matches!(
        events(&a, 4096),
        Err(XvaError::UnexpectedEntry { .. })
    ));
    // Names not strictly increasing.
    let h = checksum_text(ChecksumKind::XxHash, &d[..10]);
    let e = checksum_text(ChecksumKind::XxHash, &[]);
    let a = one_chunk_archive(&[
        ("Ref:9/00000001", &d[..10]),
        ("Ref:9/00000001.xxhash", h.as_bytes()),
        ("Ref:9/00000001", &[]),
        ("Ref:9/00000001.xxhash", e.as_bytes()),
    ]);
    assert!(matches!(events(&a, 4096), Err(XvaError::ChunkOrder { .. })));
    // A chunk of another disk.
    let a = one_chunk_archive(&[("Ref:99/00000000", &d)]);
    assert!(matches!(
        events(&a, 4096),
        Err(XvaError::UnexpectedEntry { .. })
    ));
    // Chunk past the virtual size.
    let big = vec![1u8; MIB as usize + 1];
    let a = one_chunk_archive(&[("Ref:9/00000000", &big)]);
    assert!(matches!(events(&a, 4096), Err(XvaError::TooLarge(_))));
    // Last chunk missing: tar end while the disk is incomplete.
    let a = one_chunk_archive(&[
        ("Ref:9/00000000", &d[..10]),
        ("Ref:9/00000000.xxhash", h.as_bytes()),
    ]);
    assert!(matches!(events(&a, 4096), Err(XvaError::Truncated(_))));
    // An entry after the last disk.
    let mut extra = good[..good.len() - 1024].to_vec();
    extra.extend_from_slice(&tar(&[("Ref:9/00000001", &[])]));
    assert!(matches!(
        events(&extra, 4096),
        Err(XvaError::UnexpectedEntry { .. })
    ));
    // Pre-Miami export_vsn.
    let mut old = ova(&[MIB]);
    old.version.export_vsn = 1;
    let a = tar(&[("ova.xml", old.to_xml().as_bytes())]);
    assert!(matches!(
        events(&a, 4096),
        Err(XvaError::UnsupportedExportVsn(1))
    ));
    // Broken ova.xml.
    let a = tar(&[("ova.xml", b"<value><struct>")]);
    assert!(matches!(events(&a, 4096), Err(XvaError::OvaXml(_))));
    // Tar header checksum.
    let hdr_pos = good.len() - 1024 - 512 - 512; // the .xxhash header
    let mut b = good.clone();
    b[hdr_pos + 1] ^= 1;
    assert!(matches!(events(&b, 4096), Err(XvaError::Tar(_))));
}

#[test]
fn absurd_sizes_are_refused_before_allocation() {
    // A chunk header claiming 1 TiB: refused at the header, nothing allocated.
    let xml = ova(&[1 << 41]).to_xml();
    let mut a = tar(&[("ova.xml", xml.as_bytes())]);
    a.truncate(a.len() - 1024);
    let mut h = xenvault_formats::tar::header("Ref:9/00000000", 0, 0).unwrap();
    // Rewrite the size field to 1 TiB (GNU base-256) and fix the checksum.
    h[124..136].fill(0);
    h[124] = 0x80;
    h[128..136].copy_from_slice(&(1u64 << 40).to_be_bytes());
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    a.extend_from_slice(&h);
    assert!(matches!(events(&a, 4096), Err(XvaError::TooLarge(_))));
    // ova.xml over the limit.
    let mut dec = XvaDecoder::with_options(XvaDecoderOptions {
        max_ova_xml_size: 100,
        ..XvaDecoderOptions::default()
    });
    assert!(matches!(
        dec.feed(&tar(&[("ova.xml", xml.as_bytes())])),
        Err(XvaError::TooLarge(_))
    ));
    // The error sticks.
    assert!(dec.feed(b"more").is_err());
}

#[test]
fn truncation_anywhere_is_an_error_never_a_panic() {
    let sizes = [2 * MIB];
    let ova = ova(&sizes);
    let disks = vec![disk(5, 2 * MIB)];
    let archive = encode(&ova, &disks, opts());
    let mut cut = 0;
    while cut < archive.len() {
        let mut dec = XvaDecoder::new();
        let r = dec.feed(&archive[..cut]).and_then(|_| dec.finish());
        assert!(
            r.is_err(),
            "a stream cut at {cut} of {} must not decode",
            archive.len()
        );
        cut += 509;
    }
    // Trailing bytes after the tar end (GNU tar pads records) are ignored.
    let mut padded = archive.clone();
    padded.extend_from_slice(&[0u8; 8192]);
    assert!(events(&padded, 4096).is_ok());
}

#[test]
fn random_mutations_never_panic() {
    use rand::{Rng, SeedableRng};
    let ova = ova(&[MIB + 5000]);
    let archive = encode(&ova, &[disk(6, MIB + 5000)], opts());
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for _ in 0..300 {
        let mut a = archive.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..a.len());
            a[i] = rng.random();
        }
        if rng.random_bool(0.3) {
            a.truncate(rng.random_range(0..a.len()));
        }
        let _ = events(&a, rng.random_range(1..100_000));
    }
}

#[test]
fn ova_xml_builder_rewrites_like_xapi_export() {
    let ova = ova(&[MIB, 2 * MIB]);
    let classes: Vec<(&str, &str)> = ova
        .objects
        .iter()
        .map(|o| (o.class.as_str(), o.id.as_str()))
        .collect();
    assert_eq!(
        classes,
        [
            ("VM", "Ref:5"),
            ("VBD", "Ref:8"),
            ("VBD", "Ref:11"),
            ("VBD", "Ref:13"),
            ("VBD", "Ref:14"),
            ("VIF", "Ref:6"),
            ("network", "Ref:7"),
            ("VDI", "Ref:9"),
            ("VDI", "Ref:12"),
            ("VDI", "Ref:15"),
            ("SR", "Ref:10"),
            ("SR", "Ref:16"),
        ]
    );
    let vm = &ova.object("Ref:5").unwrap().snapshot;
    let s = |v: &Value, f: &str| v.get(f).cloned().unwrap();
    assert_eq!(s(vm, "power_state"), Value::str("Halted"));
    assert_eq!(s(vm, "is_a_snapshot"), Value::Bool(false));
    assert_eq!(
        s(vm, "is_a_template"),
        Value::Bool(true),
        "is_a_template is kept"
    );
    assert_eq!(s(vm, "snapshot_of"), Value::str(NULL_REF));
    assert_eq!(s(vm, "parent"), Value::str(NULL_REF));
    assert_eq!(s(vm, "snapshots"), Value::Array(vec![]));
    assert_eq!(s(vm, "snapshot_time"), Value::DateTime(NEVER.into()));
    assert_eq!(s(vm, "transportable_snapshot_id"), Value::str(""));
    assert_eq!(s(vm, "current_operations"), Value::Struct(vec![]));
    assert_eq!(s(vm, "allowed_operations"), Value::Array(vec![]));
    assert_eq!(s(vm, "consoles"), Value::Array(vec![]));
    assert_eq!(s(vm, "blobs"), Value::Struct(vec![]));
    assert_eq!(s(vm, "resident_on"), Value::str(NULL_REF));
    assert_eq!(s(vm, "metrics"), Value::str(NULL_REF));
    assert_eq!(s(vm, "memory_static_max"), Value::str("1073741824"));
    assert_eq!(
        s(vm, "VBDs"),
        Value::Array(
            ["Ref:8", "Ref:11", "Ref:13", "Ref:14"]
                .map(Value::str)
                .to_vec()
        )
    );
    assert_eq!(s(vm, "VIFs"), Value::Array(vec![Value::str("Ref:6")]));
    let vbd = &ova.object("Ref:8").unwrap().snapshot;
    assert_eq!(s(vbd, "currently_attached"), Value::Bool(false));
    assert_eq!(s(vbd, "VDI"), Value::str("Ref:9"));
    assert_eq!(s(vbd, "VM"), Value::str("Ref:5"));
    assert_eq!(s(vbd, "metrics"), Value::str(NULL_REF));
    assert_eq!(s(vbd, "allowed_operations"), Value::Array(vec![]));
    let cd = &ova.object("Ref:13").unwrap().snapshot;
    assert_eq!(s(cd, "VDI"), Value::str(NULL_REF));
    let vdi = &ova.object("Ref:9").unwrap().snapshot;
    assert_eq!(s(vdi, "SR"), Value::str("Ref:10"));
    assert_eq!(
        s(vdi, "VBDs"),
        Value::Array(vec![Value::str("Ref:8")]),
        "unexported refs dropped"
    );
    assert_eq!(
        s(vdi, "snapshot_of"),
        Value::str("OpaqueRef:orig-vdi"),
        "xapi keeps it verbatim"
    );
    let sr = &ova.object("Ref:10").unwrap().snapshot;
    assert_eq!(s(sr, "PBDs"), Value::Array(vec![]));
    assert_eq!(s(sr, "VDIs"), Value::Array(vec![Value::str("Ref:9")]));
    let net = &ova.object("Ref:7").unwrap().snapshot;
    assert_eq!(s(net, "VIFs"), Value::Array(vec![Value::str("Ref:6")]));
    assert_eq!(s(net, "PIFs"), Value::Array(vec![]));
    let vif = &ova.object("Ref:6").unwrap().snapshot;
    assert_eq!(s(vif, "network"), Value::str("Ref:7"));
    assert_eq!(s(vif, "currently_attached"), Value::Bool(false));

    // Disks: not the CD, not the ISO; sorted as strings.
    let disks = ova.disks().unwrap();
    let ids: Vec<&str> = disks.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["Ref:12", "Ref:9"]);
    assert_eq!(disks[0].virtual_size, 2 * MIB);

    // Version and text round trip.
    assert_eq!(ova.version, OvaVersion::default());
    assert_eq!(
        (
            ova.version.xapi_major,
            ova.version.xapi_minor,
            ova.version.export_vsn
        ),
        (1, 20, 2)
    );
    assert!(ova.version.importable_by(1, 249) && ova.version.importable_by(25, 0));
    assert!(
        !OvaVersion {
            xapi_major: 25,
            ..OvaVersion::default()
        }
        .importable_by(1, 249)
    );
    let xml = ova.to_xml();
    assert!(xml.starts_with("<value><struct><member><name>version</name>"));
    assert!(xml.contains("<name>export_vsn</name><value>2</value>"));
    assert_eq!(OvaXml::from_xml(&xml).unwrap(), ova);
}

#[test]
fn builder_preserve_power_state_and_missing_records() {
    use xenvault_formats::xva::OvaBuilder;
    let mut rec = records(&[MIB]);
    let b = OvaBuilder {
        preserve_power_state: true,
        with_snapshot_metadata: true,
        ..OvaBuilder::default()
    };
    let ova = b.build(&rec).unwrap();
    let vm = &ova.objects[0].snapshot;
    assert_eq!(vm.get("power_state"), Some(&Value::str("Running")));
    assert_eq!(vm.get("is_a_snapshot"), Some(&Value::Bool(true)));
    assert_eq!(
        vm.get("snapshot_of"),
        Some(&Value::str(NULL_REF)),
        "not exported"
    );
    rec.vdis.remove(0);
    assert!(matches!(
        b.build(&rec),
        Err(XvaError::MissingRecord { class: "VDI", .. })
    ));
}

#[test]
fn encoder_misuse_is_an_error() {
    let ova = ova(&[MIB, MIB]);
    let mut enc = XvaEncoder::new(&ova, opts()).unwrap();
    assert!(enc.start_disk("Ref:9").is_err(), "Ref:12 comes first");
    assert!(enc.push(Extent::zero(0, 1)).is_err(), "no disk open");
    enc.start_disk("Ref:12").unwrap();
    enc.push(Extent::data(100, vec![1; 10])).unwrap();
    assert!(enc.push(Extent::data(50, vec![1])).is_err(), "backwards");
    assert!(enc.push(Extent::zero(MIB - 1, 2)).is_err(), "past the end");
    assert!(enc.finish().is_err(), "disk open");
    enc.end_disk().unwrap();
    assert!(enc.finish().is_err(), "Ref:9 not written");
    // Huge zero runs come out in bounded pieces.
    let big = ova_with_size(1 << 40);
    let mut enc = XvaEncoder::new(
        &big,
        XvaEncoderOptions {
            omit_zero_chunks: false,
            ..opts()
        },
    )
    .unwrap();
    let id = enc.disks()[0].id.clone();
    enc.start_disk(&id).unwrap();
    enc.push(Extent::zero(0, 1 << 40)).unwrap();
    let mut pieces = 0;
    while let Some(p) = enc.next_output().unwrap() {
        assert!(p.len() < 2 * MIB as usize);
        pieces += 1;
        if pieces == 5 {
            break;
        }
    }
    // With omission (the default), a 1 TiB hole costs two chunks.
    let mut enc = XvaEncoder::new(&big, opts()).unwrap();
    enc.start_disk(&id).unwrap();
    enc.end_disk().unwrap();
    enc.finish().unwrap();
    let bytes = enc.drain().unwrap();
    assert!(bytes.len() < 3 * MIB as usize);
    let names: Vec<String> = entries(&bytes).into_iter().map(|e| e.0).collect();
    assert_eq!(names.len(), 5);
    assert_eq!(names[3], format!("{id}/{:08}", (1u64 << 40) / MIB - 1));
    assert_same_disk_sizes(&bytes);
}

fn ova_with_size(size: u64) -> OvaXml {
    ova(&[size])
}

fn assert_same_disk_sizes(archive: &[u8]) {
    let ev = events(archive, 1 << 16).unwrap();
    let mut covered = 0;
    for e in &ev {
        if let XvaEvent::Extent(x) = e {
            covered += x.len();
        }
    }
    assert_eq!(covered, 1 << 40);
}

#[test]
fn zero_size_disk_has_no_entries_but_is_reported() {
    let sizes = [0, MIB];
    let ova = ova(&sizes);
    let disks = vec![Vec::new(), disk(8, MIB)];
    let archive = encode(&ova, &disks, opts());
    assert!(entries(&archive).iter().all(|e| !e.0.starts_with("Ref:9/")));
    let ev = events(&archive, 1000).unwrap();
    assert!(
        ev.iter()
            .any(|e| matches!(e, XvaEvent::DiskEnd(d) if d.id == "Ref:9"))
    );
    assert_same_disks(&archive, 1000, &disks);
}
