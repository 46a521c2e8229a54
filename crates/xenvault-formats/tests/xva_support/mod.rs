//! Shared helpers of the XVA integration tests: records, seeded disks, and
//! whole-archive encode/decode.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xenvault_formats::raw::RawDecoder;
use xenvault_formats::tar::{TarItem, TarParser};
use xenvault_formats::xva::{
    ExportRecords, OvaBuilder, OvaXml, XvaDecoder, XvaEncoder, XvaEncoderOptions, XvaError,
    XvaEvent,
};
use xenvault_types::{ExtentData, Value};

pub const MIB: u64 = 1 << 20;

fn refs(items: &[String]) -> Value {
    Value::Array(items.iter().map(|s| Value::str(s.as_str())).collect())
}

/// A running snapshot-like VM with one VIF, `sizes.len()` disks on one SR,
/// an empty CD drive and a CD with an ISO image. With `first_id` 5 the disk
/// ids are Ref:9, Ref:12, Ref:14 (stream order Ref:12, Ref:14, Ref:9).
pub fn records(sizes: &[u64]) -> ExportRecords {
    let vbd_refs: Vec<String> = (0..sizes.len())
        .map(|i| format!("OpaqueRef:vbd{i}"))
        .chain([
            "OpaqueRef:cd-empty".to_string(),
            "OpaqueRef:cd-iso".to_string(),
        ])
        .collect();
    let vm = Value::record([
        ("uuid", Value::str("11111111-0000-0000-0000-000000000000")),
        ("name_label", Value::str("test vm")),
        ("power_state", Value::str("Running")),
        ("is_a_template", Value::Bool(true)),
        ("is_a_snapshot", Value::Bool(true)),
        ("snapshot_of", Value::str("OpaqueRef:origin")),
        ("snapshots", refs(&["OpaqueRef:s1".to_string()])),
        (
            "snapshot_time",
            Value::DateTime("20260101T01:02:03Z".into()),
        ),
        ("transportable_snapshot_id", Value::str("xyz")),
        ("parent", Value::str("OpaqueRef:parent")),
        (
            "current_operations",
            Value::record([("OpaqueRef:task", Value::str("export"))]),
        ),
        (
            "allowed_operations",
            Value::Array(vec![Value::str("start")]),
        ),
        ("VBDs", refs(&vbd_refs)),
        ("VIFs", refs(&["OpaqueRef:vif0".to_string()])),
        ("VGPUs", Value::Array(vec![])),
        ("VTPMs", Value::Array(vec![])),
        ("crash_dumps", Value::Array(vec![])),
        ("consoles", refs(&["OpaqueRef:console".to_string()])),
        ("resident_on", Value::str("OpaqueRef:host")),
        ("affinity", Value::str("OpaqueRef:host")),
        ("metrics", Value::str("OpaqueRef:metrics")),
        ("guest_metrics", Value::str("OpaqueRef:gm")),
        ("suspend_VDI", Value::str("OpaqueRef:NULL")),
        ("protection_policy", Value::str("OpaqueRef:NULL")),
        (
            "blobs",
            Value::record([("b", Value::str("OpaqueRef:blob"))]),
        ),
        ("memory_static_max", Value::str("1073741824")),
    ]);
    let mut vbds = Vec::new();
    let mut vdis = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        vbds.push((
            format!("OpaqueRef:vbd{i}"),
            Value::record([
                (
                    "uuid",
                    Value::str(format!("22222222-0000-0000-0000-00000000000{i}")),
                ),
                ("VM", Value::str("OpaqueRef:vm")),
                ("VDI", Value::str(format!("OpaqueRef:vdi{i}"))),
                ("type", Value::str("Disk")),
                ("empty", Value::Bool(false)),
                ("userdevice", Value::str(i.to_string())),
                ("currently_attached", Value::Bool(true)),
                ("metrics", Value::str("OpaqueRef:vbdm")),
                ("current_operations", Value::record::<&str>([])),
                (
                    "allowed_operations",
                    Value::Array(vec![Value::str("attach")]),
                ),
            ]),
        ));
        vdis.push((
            format!("OpaqueRef:vdi{i}"),
            Value::record([
                ("uuid", Value::str(vdi_uuid(i))),
                ("name_label", Value::str(format!("disk {i}"))),
                ("SR", Value::str("OpaqueRef:sr")),
                (
                    "VBDs",
                    refs(&[format!("OpaqueRef:vbd{i}"), "OpaqueRef:other".to_string()]),
                ),
                ("virtual_size", Value::str(size.to_string())),
                ("type", Value::str("user")),
                ("snapshot_of", Value::str("OpaqueRef:orig-vdi")),
                ("crash_dumps", Value::Array(vec![])),
                ("current_operations", Value::record::<&str>([])),
                ("allowed_operations", Value::Array(vec![Value::str("copy")])),
            ]),
        ));
    }
    vbds.push((
        "OpaqueRef:cd-empty".into(),
        Value::record([
            ("VM", Value::str("OpaqueRef:vm")),
            ("VDI", Value::str("OpaqueRef:NULL")),
            ("type", Value::str("CD")),
            ("empty", Value::Bool(true)),
            ("currently_attached", Value::Bool(true)),
        ]),
    ));
    vbds.push((
        "OpaqueRef:cd-iso".into(),
        Value::record([
            ("VM", Value::str("OpaqueRef:vm")),
            ("VDI", Value::str("OpaqueRef:iso")),
            ("type", Value::str("CD")),
            ("empty", Value::Bool(false)),
            ("currently_attached", Value::Bool(true)),
        ]),
    ));
    vdis.push((
        "OpaqueRef:iso".into(),
        Value::record([
            ("uuid", Value::str("33333333-0000-0000-0000-000000000000")),
            ("SR", Value::str("OpaqueRef:isosr")),
            ("VBDs", refs(&["OpaqueRef:cd-iso".to_string()])),
            ("virtual_size", Value::str("4096")),
            ("type", Value::str("user")),
        ]),
    ));
    ExportRecords {
        vm: ("OpaqueRef:vm".into(), vm),
        vbds,
        vdis,
        vifs: vec![(
            "OpaqueRef:vif0".into(),
            Value::record([
                ("VM", Value::str("OpaqueRef:vm")),
                ("network", Value::str("OpaqueRef:net")),
                ("device", Value::str("0")),
                ("MAC", Value::str("aa:bb:cc:dd:ee:ff")),
                ("currently_attached", Value::Bool(true)),
                ("metrics", Value::str("OpaqueRef:vifm")),
            ]),
        )],
        networks: vec![(
            "OpaqueRef:net".into(),
            Value::record([
                ("name_label", Value::str("Pool-wide network")),
                ("bridge", Value::str("xenbr0")),
                (
                    "VIFs",
                    refs(&[
                        "OpaqueRef:vif0".to_string(),
                        "OpaqueRef:vif-other".to_string(),
                    ]),
                ),
                ("PIFs", refs(&["OpaqueRef:pif".to_string()])),
            ]),
        )],
        srs: vec![
            (
                "OpaqueRef:sr".into(),
                Value::record([
                    ("name_label", Value::str("Local storage")),
                    ("content_type", Value::str("user")),
                    (
                        "VDIs",
                        refs(&["OpaqueRef:vdi0".to_string(), "OpaqueRef:x".to_string()]),
                    ),
                    ("PBDs", refs(&["OpaqueRef:pbd".to_string()])),
                ]),
            ),
            (
                "OpaqueRef:isosr".into(),
                Value::record([
                    ("name_label", Value::str("ISOs")),
                    ("content_type", Value::str("iso")),
                    ("VDIs", refs(&["OpaqueRef:iso".to_string()])),
                    ("PBDs", Value::Array(vec![])),
                ]),
            ),
        ],
    }
}

pub fn vdi_uuid(i: usize) -> String {
    format!("44444444-0000-0000-0000-00000000000{i}")
}

/// `ova.xml` for disks of these sizes, ids starting at Ref:5.
pub fn ova(sizes: &[u64]) -> OvaXml {
    let builder = OvaBuilder {
        first_id: 5,
        ..OvaBuilder::default()
    };
    builder.build(&records(sizes)).unwrap()
}

/// A seeded disk: random 64 KiB blocks with holes, whole-MiB zero chunks at
/// 1 MiB and 2 MiB (so omission happens), and data in the last block.
pub fn disk(seed: u64, size: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = vec![0u8; size as usize];
    for block in d.chunks_mut(64 << 10) {
        if rng.random_bool(0.4) {
            rng.fill(block);
        }
    }
    for range in [MIB..2 * MIB, 2 * MIB..3 * MIB] {
        if range.end <= size.saturating_sub(MIB) {
            d[range.start as usize..range.end as usize].fill(0);
        }
    }
    if let Some(last) = d.last_mut() {
        *last = 0x5a;
    }
    d
}

/// Encodes an XVA: each disk (by VDI uuid order of `disks`) goes through the
/// raw decoder's extents into the XVA encoder.
pub fn encode(ova: &OvaXml, disks: &[Vec<u8>], options: XvaEncoderOptions) -> Vec<u8> {
    encode_with(ova, disks, options, |_, _| {})
}

/// As [`encode`], calling `between(encoder, extent index)` after each extent.
pub fn encode_with(
    ova: &OvaXml,
    disks: &[Vec<u8>],
    options: XvaEncoderOptions,
    mut between: impl FnMut(&mut XvaEncoder, usize),
) -> Vec<u8> {
    let mut enc = XvaEncoder::new(ova, options).unwrap();
    let mut out = Vec::new();
    for d in enc.disks().to_vec() {
        let i = (0..disks.len())
            .find(|&i| vdi_uuid(i) == d.vdi_uuid)
            .unwrap();
        enc.start_disk(&d.id).unwrap();
        let mut raw = RawDecoder::new();
        let mut extents = raw.feed(&disks[i]);
        extents.extend(raw.finish());
        for (n, e) in extents.into_iter().enumerate() {
            enc.push(e).unwrap();
            while let Some(piece) = enc.next_output().unwrap() {
                assert!(piece.len() <= (MIB as usize) + 4096 || piece.starts_with(b"ova.xml"));
                out.extend_from_slice(&piece);
            }
            between(&mut enc, n);
        }
        enc.end_disk().unwrap();
        out.extend_from_slice(&enc.drain().unwrap());
    }
    enc.finish().unwrap();
    out.extend_from_slice(&enc.drain().unwrap());
    assert!(enc.is_finished());
    out
}

/// Decodes an archive fed in pieces of `step` bytes; returns all events.
pub fn events(archive: &[u8], step: usize) -> Result<Vec<XvaEvent>, XvaError> {
    let mut dec = XvaDecoder::new();
    let mut all = Vec::new();
    for piece in archive.chunks(step) {
        all.extend(dec.feed(piece)?);
    }
    dec.finish()?;
    Ok(all)
}

/// Rebuilds every disk from the events, checking that extents are in order
/// and cover exactly `0..virtual_size`. Keyed by VDI uuid.
pub fn disks_of(events: &[XvaEvent]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, u64, Vec<u8>)> = None;
    let mut saw_ova = false;
    for e in events {
        match e {
            XvaEvent::OvaXml(_) => saw_ova = true,
            XvaEvent::DiskStart(d) => {
                assert!(saw_ova && current.is_none());
                current = Some((d.vdi_uuid.clone(), d.virtual_size, Vec::new()));
            }
            XvaEvent::Extent(x) => {
                let (_, _, buf) = current.as_mut().unwrap();
                assert_eq!(x.offset, buf.len() as u64, "extents must be contiguous");
                match &x.data {
                    ExtentData::Data(b) => buf.extend_from_slice(b),
                    ExtentData::Zero(n) => buf.resize(buf.len() + *n as usize, 0),
                }
            }
            XvaEvent::DiskEnd(d) => {
                let (uuid, size, buf) = current.take().unwrap();
                assert_eq!(uuid, d.vdi_uuid);
                assert_eq!(buf.len() as u64, size, "disk must cover its virtual size");
                out.insert(uuid, buf);
            }
            XvaEvent::End => assert!(current.is_none()),
        }
    }
    assert!(matches!(events.last(), Some(XvaEvent::End)));
    out
}

/// The tar entries of an archive: (name, size, mtime, data).
pub fn entries(archive: &[u8]) -> Vec<(String, u64, u64, Vec<u8>)> {
    let mut p = TarParser::new();
    let mut out: Vec<(String, u64, u64, Vec<u8>)> = Vec::new();
    p.feed(archive, &mut |item: TarItem<'_>| -> Result<
        (),
        xenvault_formats::tar::TarError,
    > {
        match item {
            TarItem::Entry(h) => out.push((h.name, h.size, h.mtime, Vec::new())),
            TarItem::Data(d) => out.last_mut().unwrap().3.extend_from_slice(d),
            _ => {}
        }
        Ok(())
    })
    .unwrap();
    assert!(p.is_done());
    out
}

/// Builds a tar archive from (name, data) entries, with the tar end.
pub fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        out.extend_from_slice(&xenvault_formats::tar::header(name, data.len() as u64, 0).unwrap());
        out.extend_from_slice(data);
        out.extend_from_slice(xenvault_formats::tar::padding(data.len() as u64));
    }
    out.extend_from_slice(&xenvault_formats::tar::end_of_archive());
    out
}

/// A test that needs an outside tool: true when present; when missing, fails
/// under CI=true and skips loudly otherwise.
pub fn tool_available(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required (CI=true) but is not installed");
        }
        eprintln!("!!! SKIPPING: {tool} is not installed; install it to run this test");
    }
    found
}
