//! The archive writer, reader and sink: layout, commit/abort/crash,
//! checksums (`sha256sum -c`), a flipped byte, XVA / raw / VHD contents.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use time::macros::datetime;
use xenvault_engine::archive::layout::{COMPLETE_MARKER, LOCK_FILE, MANIFEST};
use xenvault_engine::archive::reader::PointState;
use xenvault_engine::archive::{
    self, ArchiveError, ArchiveTarget, ArchiveWriter, FileCompression, RunInfo, Subject, SubjectKey,
};
use xenvault_engine::sink::{
    ArtifactKind, ArtifactMeta, BackupKind, BackupTarget, Compression, DiskFormat, DiskMeta, VmMeta,
};
use xenvault_formats::xva::{OvaBuilder, XvaDecoder, XvaEvent};
use xenvault_types::{Extent, ExtentData, Value};

const VM_UUID: &str = "11111111-2222-3333-4444-555555555555";
const SIZE: u64 = 4 << 20;

fn run() -> RunInfo {
    RunInfo {
        job: "nightly".into(),
        run_id: "run-1".into(),
        pool: "pool1".into(),
    }
}

/// A disk of 4 MiB: data at 0, a hole, data at 3 MiB + 512, zeros at the end.
fn extents() -> Vec<Extent> {
    vec![
        Extent::data(0, (0..65536u32).map(|i| (i % 251) as u8 + 1).collect()),
        Extent::zero(65536, 1 << 20),
        Extent::data((3 << 20) + 512, vec![0xAB; 4096]),
    ]
}

fn expected_disk() -> Vec<u8> {
    let mut disk = vec![0u8; SIZE as usize];
    for e in extents() {
        if let ExtentData::Data(b) = &e.data {
            disk[e.offset as usize..e.offset as usize + b.len()].copy_from_slice(b);
        }
    }
    disk
}

/// `None` = whole VM (XVA), else per-disk in that format.
fn vm_meta(format: Option<DiskFormat>, compression: Compression) -> VmMeta {
    let records = xenvault_formats::xva::tests_support::one_disk_vm(SIZE);
    let ova = OvaBuilder::default().build(&records).unwrap();
    let disks = ova.disks().unwrap();
    let kind = match format {
        None => BackupKind::Xva { ova: Box::new(ova) },
        Some(format) => BackupKind::Disks { format },
    };
    VmMeta {
        job: "nightly".into(),
        run_id: "run-1".into(),
        pool: "pool1".into(),
        vm_uuid: VM_UUID.into(),
        vm_name: "web/01".into(),
        snapshot_uuid: "snap".into(),
        snapshot_time: datetime!(2026-11-22 01:02:03 UTC),
        kind,
        disks: vec![DiskMeta {
            index: 0,
            vdi_uuid: "00000000-0000-0000-0000-000000000002".into(),
            source_vdi_uuid: "live-vdi".into(),
            name: "root".into(),
            virtual_size: SIZE,
            userdevice: "0".into(),
            bootable: true,
            xva_id: Some(disks[0].id.clone()),
        }],
        records,
        source_vm: Value::record([
            ("name_label", Value::str("web/01")),
            ("power_state", Value::str("Running")),
        ]),
        compression,
    }
}

fn backup(target: &ArchiveTarget, meta: &VmMeta) -> xenvault_engine::sink::Committed {
    let mut sink = target.begin_vm(meta).unwrap();
    sink.begin_disk(&meta.disks[0]).unwrap();
    for e in extents() {
        sink.extent(e).unwrap();
    }
    sink.end_disk().unwrap();
    sink.commit().unwrap()
}

fn sha256sum_check(dir: &Path) -> bool {
    let out = Command::new("sha256sum")
        .arg("-c")
        .arg("--quiet")
        .arg(MANIFEST)
        .current_dir(dir)
        .output()
        .expect("sha256sum (coreutils) runs");
    out.status.success()
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn xva_backup_has_the_layout_metadata_manifest_and_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let target = ArchiveTarget::new(tmp.path());
    let meta = vm_meta(None, Compression::None);
    let committed = backup(&target, &meta);
    let dir = tmp.path().join("web_01").join("20261122-010203");
    assert_eq!(Path::new(&committed.location), dir);
    let notes = std::fs::read_to_string(dir.join("RESTORE.txt")).unwrap();
    assert!(
        notes.contains("xe vm-import filename=vm.xva sr-uuid="),
        "{notes}"
    );
    for f in [
        "RESTORE.txt",
        "vm.xva",
        "vm.json",
        "vm.cfg",
        "vbd-0.cfg",
        "vdi-0.cfg",
        MANIFEST,
        COMPLETE_MARKER,
    ] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    assert!(!dir.join(LOCK_FILE).exists());
    // No hidden leftovers next to it.
    let names: Vec<String> = std::fs::read_dir(tmp.path().join("web_01"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["20261122-010203"]);
    assert!(sha256sum_check(&dir));
    let manifest = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();
    assert!(
        manifest.contains("  vm.xva\n") && manifest.contains("  vm.json\n"),
        "{manifest}"
    );
    assert!(!manifest.contains(COMPLETE_MARKER));

    let cfg = std::fs::read_to_string(dir.join("vm.cfg")).unwrap();
    assert!(
        cfg.contains("name_label=web/01\n") && cfg.contains(&format!("orig_uuid={VM_UUID}\n")),
        "{cfg}"
    );
    let vdi = std::fs::read_to_string(dir.join("vdi-0.cfg")).unwrap();
    assert!(vdi.contains("orig_uuid=live-vdi\n"), "{vdi}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vm.json")).unwrap()).unwrap();
    assert_eq!(json["vm_uuid"], VM_UUID);
    assert!(json["VDIs"].as_object().unwrap().len() == 1);

    // The XVA decodes back to the disk.
    let xva = std::fs::read(dir.join("vm.xva")).unwrap();
    assert_eq!(committed.bytes_written, {
        let points = archive::list(tmp.path()).unwrap();
        points[0].marker().unwrap().bytes
    });
    let mut dec = XvaDecoder::new();
    let mut disk = vec![0u8; SIZE as usize];
    let mut ended = false;
    for ev in dec.feed(&xva).unwrap() {
        match ev {
            XvaEvent::Extent(e) => {
                if let ExtentData::Data(b) = e.data {
                    disk[e.offset as usize..e.offset as usize + b.len()].copy_from_slice(&b);
                }
            }
            XvaEvent::End => ended = true,
            _ => {}
        }
    }
    dec.finish().unwrap();
    assert!(ended);
    assert_eq!(disk, expected_disk());

    // Listed as complete, grouped by UUID, verified.
    let points = archive::list_subject(tmp.path(), &SubjectKey::vm(VM_UUID)).unwrap();
    assert_eq!(points.len(), 1);
    let p = &points[0];
    assert!(p.is_complete());
    let m = p.marker().unwrap();
    assert_eq!(m.subject.name, "web/01");
    assert_eq!(m.run.run_id, "run-1");
    assert_eq!(m.details["backup_kind"], "xva");
    assert_eq!(m.details["disk_files"][0]["file"], "vm.xva");
    let v = p.verify().unwrap();
    assert_eq!(v.files, m.files.len());
}

#[test]
fn a_flipped_byte_is_detected_by_verify_and_sha256sum() {
    let tmp = tempfile::tempdir().unwrap();
    let target = ArchiveTarget::new(tmp.path());
    let meta = vm_meta(Some(DiskFormat::Raw), Compression::None);
    let committed = backup(&target, &meta);
    let dir = Path::new(&committed.location);
    let point = &archive::list(tmp.path()).unwrap()[0];
    point.verify().unwrap();
    assert!(sha256sum_check(dir));

    let disk = dir.join("disk-0.raw");
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[(3 << 20) + 600] ^= 0x01;
    std::fs::write(&disk, &bytes).unwrap();
    let err = point.verify().unwrap_err();
    assert!(matches!(err, ArchiveError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("disk-0.raw"), "{err}");
    assert!(!sha256sum_check(dir));

    // An edited manifest is caught too (its hash is in COMPLETE).
    bytes[(3 << 20) + 600] ^= 0x01;
    std::fs::write(&disk, &bytes).unwrap();
    point.verify().unwrap();
    let manifest = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("  vm.cfg\n", "  vm.cfg\n\n")).unwrap();
    assert!(point.verify().unwrap_err().to_string().contains("manifest"));
}

#[test]
fn raw_disks_are_sparse_or_compressed_and_read_back() {
    for (compression, name) in [
        (Compression::None, "disk-0.raw"),
        (Compression::Zstd { level: 3 }, "disk-0.raw.zst"),
        (Compression::Gzip, "disk-0.raw.gz"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let target = ArchiveTarget::new(tmp.path());
        let meta = vm_meta(Some(DiskFormat::Raw), compression);
        let committed = backup(&target, &meta);
        let point = &archive::list(tmp.path()).unwrap()[0];
        point.verify().unwrap();
        assert!(sha256sum_check(Path::new(&committed.location)), "{name}");
        assert_eq!(
            point.marker().unwrap().details["disk_files"][0]["file"],
            name
        );
        assert_eq!(
            read_all(point.open_decoded(name).unwrap()),
            expected_disk(),
            "{name}"
        );
        let notes = std::fs::read_to_string(point.file_path("RESTORE.txt")).unwrap();
        assert!(
            notes.contains("xe vdi-import uuid=<the new VDI uuid> filename=disk-0.raw format=raw"),
            "{notes}"
        );
        if compression == Compression::None {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(point.file_path(name)).unwrap();
            assert_eq!(md.len(), SIZE);
            assert!(
                md.blocks() * 512 < SIZE,
                "the raw file should be sparse: {} blocks",
                md.blocks()
            );
        } else {
            assert!(point.files().iter().find(|f| f.name == name).unwrap().bytes < SIZE / 4);
        }
    }
}

#[test]
fn vhd_disks_decode_to_the_same_content_and_pass_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let target = ArchiveTarget::new(tmp.path());
    let meta = vm_meta(Some(DiskFormat::Vhd), Compression::None);
    let committed = backup(&target, &meta);
    let dir = Path::new(&committed.location);
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".scratch")),
        "{names:?}"
    );
    let vhd = std::fs::read(dir.join("disk-0.vhd")).unwrap();
    let mut dec = xenvault_formats::vhd::VhdDecoder::new();
    let mut disk = vec![0u8; SIZE as usize];
    for e in dec.feed(&vhd).unwrap() {
        if let ExtentData::Data(b) = e.data {
            disk[e.offset as usize..e.offset as usize + b.len()].copy_from_slice(&b);
        }
    }
    dec.finish().unwrap();
    assert_eq!(disk, expected_disk());
    // Two of the two 2 MiB blocks hold data.
    assert!(
        vhd.len() > (4 << 20) && vhd.len() < (5 << 20),
        "{}",
        vhd.len()
    );

    let qemu = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(dir.join("disk-0.vhd"))
        .arg(tmp.path().join("out.raw"))
        .status();
    match qemu {
        Ok(status) => {
            assert!(status.success());
            assert_eq!(
                std::fs::read(tmp.path().join("out.raw")).unwrap(),
                expected_disk()
            );
        }
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "qemu-img is required under CI=true: {e}"
            );
            eprintln!("SKIPPING the qemu-img check: qemu-img not found ({e})");
        }
    }
}

#[test]
fn abort_and_drop_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let target = ArchiveTarget::new(tmp.path());
    let meta = vm_meta(Some(DiskFormat::Raw), Compression::None);

    let mut sink = target.begin_vm(&meta).unwrap();
    sink.begin_disk(&meta.disks[0]).unwrap();
    sink.extent(extents()[0].clone()).unwrap();
    // While it is being written: listed as partial and in use.
    let points = archive::list(tmp.path()).unwrap();
    assert_eq!(points.len(), 1);
    assert!(
        matches!(points[0].state, PointState::Partial { in_use: true, .. }),
        "{:?}",
        points[0].state
    );
    assert!(points[0].dir_name.ends_with(".partial"));
    sink.abort("test").unwrap();
    assert!(archive::list(tmp.path()).unwrap().is_empty());

    let sink = target.begin_vm(&meta).unwrap();
    drop(sink);
    assert!(archive::list(tmp.path()).unwrap().is_empty());

    // A VHD of a size VHD cannot express is refused before any data.
    let mut odd = vm_meta(Some(DiskFormat::Vhd), Compression::None);
    odd.disks[0].virtual_size = SIZE + 100;
    let mut sink = target.begin_vm(&odd).unwrap();
    let err = sink.begin_disk(&odd.disks[0]).unwrap_err();
    assert!(err.to_string().contains("multiple of 512"), "{err}");
    drop(sink);
    assert!(archive::list(tmp.path()).unwrap().is_empty());

    // A VM sink refuses out-of-order extents.
    let mut sink = target.begin_vm(&meta).unwrap();
    sink.begin_disk(&meta.disks[0]).unwrap();
    sink.extent(Extent::zero(4096, 10)).unwrap();
    assert!(sink.extent(Extent::zero(0, 10)).is_err());
    assert!(sink.extent(Extent::zero(SIZE - 1, 10)).is_err());
}

#[test]
fn a_crashed_writer_leaves_a_partial_that_never_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let group = tmp.path().join("web");
    // What a killed process leaves: a .partial with an unlocked .lock and some data.
    let crashed = group.join(".20261121-010000.partial");
    std::fs::create_dir_all(&crashed).unwrap();
    std::fs::write(
        crashed.join(LOCK_FILE),
        r#"{"run_id":"old-run","job":"nightly","pid":1,"started":"2026-11-21T01:00:00Z"}"#,
    )
    .unwrap();
    std::fs::write(crashed.join("vm.xva"), b"half").unwrap();
    // A timestamp dir without marker (a crash during an old tool's write) is partial too.
    std::fs::create_dir_all(group.join("20261120-010000")).unwrap();
    // Foreign entries are ignored.
    std::fs::create_dir_all(group.join("notes")).unwrap();

    let points = archive::list(tmp.path()).unwrap();
    assert_eq!(points.len(), 2, "{points:?}");
    for p in &points {
        assert!(!p.is_complete());
        assert!(p.verify().is_err());
        if let PointState::Partial { in_use, run_id, .. } = &p.state {
            assert!(!in_use, "{p:?}");
            if p.dir_name.ends_with(".partial") {
                assert_eq!(run_id.as_deref(), Some("old-run"));
            }
        }
    }
    assert!(
        archive::list_subject(tmp.path(), &SubjectKey::vm(VM_UUID))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn writer_api_names_collisions_and_same_named_vms() {
    let tmp = tempfile::tempdir().unwrap();
    let t = datetime!(2026-11-22 05:00:00 UTC);
    let a = ArchiveWriter::begin(tmp.path(), Subject::vm("uuid-a", "twin"), run(), t).unwrap();
    let b = ArchiveWriter::begin(tmp.path(), Subject::vm("uuid-b", "twin"), run(), t).unwrap();
    assert_ne!(a.partial_dir(), b.partial_dir());
    let mut f = a.create_file("data.bin", FileCompression::Zstd(3)).unwrap();
    assert_eq!(f.name(), "data.bin.zst");
    f.write_all(b"hello").unwrap();
    // Commit refuses while a file is open.
    let open = a.create_file("other.bin", FileCompression::None).unwrap();
    f.finish().unwrap();
    assert!(
        a.put_file("data.bin.zst", b"x").is_err(),
        "a name is written once"
    );
    assert!(a.put_file("../escape", b"x").is_err());
    assert!(a.put_file(COMPLETE_MARKER, b"x").is_err());
    drop(open);
    let err = a.commit().unwrap_err();
    assert!(err.to_string().contains("other.bin"), "{err}");
    // (the failed commit dropped the writer: aborted)
    b.put_file("x.txt", b"b").unwrap();
    let pb = b.commit().unwrap();
    assert_eq!(pb.dir_name, "20261122-050000-1");

    let a2 = ArchiveWriter::begin(tmp.path(), Subject::vm("uuid-a", "twin"), run(), t).unwrap();
    a2.put_file("x.txt", b"a").unwrap();
    let pa = a2.commit().unwrap();
    assert_eq!(pa.dir_name, "20261122-050000");
    let only_a = archive::list_subject(tmp.path(), &SubjectKey::vm("uuid-a")).unwrap();
    assert_eq!(only_a.len(), 1);
    assert_eq!(only_a[0].path, pa.path);
    // Renamed VM: same UUID, another directory, still one subject.
    let a3 = ArchiveWriter::begin(
        tmp.path(),
        Subject::vm("uuid-a", "twin-renamed"),
        run(),
        datetime!(2026-11-23 05:00:00 UTC),
    )
    .unwrap();
    a3.put_file("x.txt", b"a").unwrap();
    a3.commit().unwrap();
    let a_points = archive::list_subject(tmp.path(), &SubjectKey::vm("uuid-a")).unwrap();
    assert_eq!(a_points.len(), 2);
    assert!(
        a_points[1]
            .path
            .starts_with(tmp.path().join("twin-renamed"))
    );
}

#[test]
fn artifacts_go_to_their_own_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let target = ArchiveTarget::new(tmp.path());
    let meta = ArtifactMeta {
        job: "nightly".into(),
        run_id: "run-1".into(),
        pool: "pool1".into(),
        kind: ArtifactKind::PoolDatabase,
        started: datetime!(2026-11-22 01:00:00 UTC),
        compression: Compression::None,
    };
    let mut sink = target.begin_artifact(&meta).unwrap();
    sink.write(b"<database/>").unwrap();
    let c = sink.commit().unwrap();
    assert_eq!(
        Path::new(&c.location),
        tmp.path().join("_pool-metadata/pool1/20261122-010000")
    );
    assert_eq!(
        std::fs::read(Path::new(&c.location).join("pool-database.xml")).unwrap(),
        b"<database/>"
    );

    let host = ArtifactMeta {
        kind: ArtifactKind::HostBackup {
            host_uuid: "h-1".into(),
            host_name: "xcp-a".into(),
        },
        compression: Compression::Zstd { level: 1 },
        ..meta
    };
    let mut sink = target.begin_artifact(&host).unwrap();
    sink.write(b"tgz bytes").unwrap();
    let c = sink.commit().unwrap();
    assert_eq!(
        Path::new(&c.location),
        tmp.path().join("_hosts/xcp-a/20261122-010000")
    );
    let points = archive::list_subject(tmp.path(), &SubjectKey::host("h-1")).unwrap();
    assert_eq!(
        read_all(points[0].open_decoded("host-backup.tgz.zst").unwrap()),
        b"tgz bytes"
    );
    points[0].verify().unwrap();
    let mut sink = target.begin_artifact(&host).unwrap();
    sink.write(b"x").unwrap();
    sink.abort("test").unwrap();
    assert_eq!(archive::list(tmp.path()).unwrap().len(), 2);
}
