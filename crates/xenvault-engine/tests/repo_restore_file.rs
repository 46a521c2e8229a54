//! Repository restores without a pool: listing restore points, one disk to
//! a raw (sparse) file and to a VHD (checked by our decoder and by
//! `qemu-img compare`), the VM to an XVA (decoded, and unpacked by
//! `xva-img`), for plain and encrypted repositories; a damaged chunk is an
//! error naming the chunk, and no file is left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod repo_restore_support;

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;

use repo_restore_support::{
    TestDisk, damage_a_chunk, disk_meta, have_tool, new_repo, open_repo, pattern_disk, write_point,
};
use xenvault_engine::restore::repo::{
    FileFormat, FileRestoreOptions, find_repo_point, list_repo_points, restore_repo_to_file,
};
use xenvault_engine::restore::{DiskSelector, RestoreError, no_progress};
use xenvault_formats::vhd::VhdDecoder;
use xenvault_formats::xva::{XvaDecoder, XvaEvent};
use xenvault_types::ExtentData;

const VM: &str = "11111111-2222-3333-4444-555555555555";
const SNAP_VDI: &str = "00000000-0000-0000-0000-000000000002";
const LIVE_VDI: &str = "aaaaaaaa-0000-0000-0000-00000000000a";
/// 9 MiB + 64 KiB: a partial last chunk.
const SIZE: usize = (9 << 20) + (64 << 10);

/// The records of a one-disk VM as `vm.json` holds them.
fn vm_records(size: u64) -> serde_json::Value {
    let records = xenvault_formats::xva::tests_support::one_disk_vm(size);
    let source = xenvault_types::Value::record([("name_label", xenvault_types::Value::str("web"))]);
    let text = xenvault_engine::archive::meta::vm_json(VM, &records, &source, &[]);
    serde_json::from_str(&text).unwrap()
}

async fn repo_with_two_points(dir: &Path, encrypted: bool) -> (Vec<u8>, Vec<u8>) {
    let repo = new_repo(dir, encrypted).await;
    let old = pattern_disk(SIZE, 1);
    let new = pattern_disk(SIZE, 2);
    for (t, bytes) in [(1_700_000_000i64, &old), (1_700_003_600, &new)] {
        write_point(
            &repo,
            VM,
            "web",
            time::OffsetDateTime::from_unix_timestamp(t).unwrap(),
            &[TestDisk {
                key: LIVE_VDI.into(),
                bytes: bytes.clone(),
                meta: disk_meta("0", SNAP_VDI, LIVE_VDI, "root", SIZE as u64),
            }],
            vm_records(SIZE as u64),
        )
        .await;
    }
    (old, new)
}

fn vhd_bytes(path: &Path, size: usize) -> Vec<u8> {
    let mut dec = VhdDecoder::new();
    let mut out = vec![0u8; size];
    let data = std::fs::read(path).unwrap();
    let mut extents = dec.feed(&data).unwrap();
    extents.extend(dec.finish().unwrap());
    for e in extents {
        if let ExtentData::Data(d) = e.data {
            out[e.offset as usize..e.offset as usize + d.len()].copy_from_slice(&d);
        }
    }
    out
}

fn xva_disk_bytes(path: &Path) -> Vec<u8> {
    let mut dec = XvaDecoder::new();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::new();
    let mut names = None;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for ev in dec.feed(&buf[..n]).unwrap() {
            match ev {
                XvaEvent::OvaXml(ova) => {
                    let vm = ova.objects_of_class("VM").next().unwrap();
                    names = Some(
                        vm.snapshot
                            .get("name_label")
                            .and_then(|v| v.as_str().ok())
                            .unwrap_or_default()
                            .to_string(),
                    );
                }
                XvaEvent::Extent(e) => {
                    let end = e.end() as usize;
                    if out.len() < end {
                        out.resize(end, 0);
                    }
                    if let ExtentData::Data(d) = e.data {
                        out[e.offset as usize..end].copy_from_slice(&d);
                    }
                }
                _ => {}
            }
        }
    }
    dec.finish().unwrap();
    assert_eq!(names.as_deref(), Some("web"), "the XVA's VM keeps its name");
    out
}

async fn round_trips(encrypted: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = repo_with_two_points(dir.path(), encrypted).await;
    let repo = open_repo(dir.path()).await;

    // Listing: newest first, with the disk, sizes and job.
    let listed = list_repo_points(&repo, Some("web")).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0].id > listed[1].id, "newest first");
    assert_eq!(listed[0].job.as_deref(), Some("test-job"));
    assert_eq!(listed[0].size, SIZE as u64);
    assert_eq!(listed[0].disks[0].userdevice.as_deref(), Some("0"));
    assert!(listed[1].stored > 0);
    assert_eq!(list_repo_points(&repo, Some(VM)).await.unwrap().len(), 2);
    assert!(matches!(
        list_repo_points(&repo, Some("nope")).await,
        Err(RestoreError::NotFound(_))
    ));
    let newest = find_repo_point(&repo, "web", None).await.unwrap();
    assert_eq!(newest.id, listed[0].id);
    let oldest = find_repo_point(&repo, VM, Some(&listed[1].id))
        .await
        .unwrap();
    assert_eq!(oldest.id, listed[1].id);

    let out = tempfile::tempdir().unwrap();
    for (point, want) in [(&newest, &new), (&oldest, &old)] {
        // Raw: bit for bit, and sparse (zero chunks are holes).
        let raw = out.path().join(format!("{}.raw", point.id));
        let mut o = FileRestoreOptions::new(&raw, FileFormat::Raw);
        o.disk = Some(DiskSelector::Position("0".into()));
        let r = restore_repo_to_file(&repo, point, &o, no_progress())
            .await
            .unwrap();
        assert_eq!(r.bytes, SIZE as u64);
        let got = std::fs::read(&raw).unwrap();
        assert!(got == *want, "raw restore of {} differs", point.id);
        let allocated = std::fs::metadata(&raw).unwrap().blocks() * 512;
        assert!(
            allocated < SIZE as u64,
            "the raw file is not sparse ({allocated} bytes allocated)"
        );

        // VHD: our decoder and qemu-img agree with the raw.
        let vhd = out.path().join(format!("{}.vhd", point.id));
        let mut o = FileRestoreOptions::new(&vhd, FileFormat::Vhd);
        o.disk = Some(LIVE_VDI.parse().unwrap());
        restore_repo_to_file(&repo, point, &o, no_progress())
            .await
            .unwrap();
        assert!(vhd_bytes(&vhd, SIZE) == *want, "VHD restore differs");
        if have_tool("qemu-img") {
            let st = Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "vpc"])
                .arg(&raw)
                .arg(&vhd)
                .status()
                .unwrap();
            assert!(
                st.success(),
                "qemu-img compare: the VHD differs from the raw"
            );
        }

        // XVA: the VM with its disk.
        let xva = out.path().join(format!("{}.xva", point.id));
        let o = FileRestoreOptions::new(&xva, FileFormat::Xva);
        restore_repo_to_file(&repo, point, &o, no_progress())
            .await
            .unwrap();
        assert!(xva_disk_bytes(&xva) == *want, "XVA restore differs");
    }

    // xva-img unpacks what we wrote into the same bytes.
    if have_tool("xva-img") && have_tool("tar") {
        let xva = out.path().join(format!("{}.xva", newest.id));
        let unpacked = out.path().join("unpacked");
        std::fs::create_dir(&unpacked).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&xva)
            .arg("-C")
            .arg(&unpacked)
            .status()
            .unwrap();
        assert!(st.success());
        let disk_dir = std::fs::read_dir(&unpacked)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.is_dir())
            .expect("a Ref:N directory in the XVA");
        let img = out.path().join("xva-img.raw");
        let st = Command::new("xva-img")
            .arg("disk-export")
            .arg(format!("{}/", disk_dir.display()))
            .arg(&img)
            .status()
            .unwrap();
        assert!(st.success(), "xva-img disk-export failed");
        assert!(
            std::fs::read(&img).unwrap() == new,
            "xva-img reads other bytes"
        );
    }

    // An existing file is not replaced unless asked.
    let raw = out.path().join(format!("{}.raw", newest.id));
    let mut o = FileRestoreOptions::new(&raw, FileFormat::Raw);
    o.disk = Some(DiskSelector::Position("0".into()));
    assert!(matches!(
        restore_repo_to_file(&repo, &newest, &o, no_progress()).await,
        Err(RestoreError::BadTarget(_))
    ));
    o.overwrite = true;
    restore_repo_to_file(&repo, &newest, &o, no_progress())
        .await
        .unwrap();
    // A raw or VHD file needs a disk.
    let o = FileRestoreOptions::new(out.path().join("x.raw"), FileFormat::Raw);
    assert!(matches!(
        restore_repo_to_file(&repo, &newest, &o, no_progress()).await,
        Err(RestoreError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_repository_round_trips_to_raw_vhd_and_xva() {
    round_trips(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_repository_round_trips_to_raw_vhd_and_xva() {
    round_trips(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_is_named_and_no_file_is_left() {
    for encrypted in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        repo_with_two_points(dir.path(), encrypted).await;
        let repo = open_repo(dir.path()).await;
        let point = find_repo_point(&repo, "web", None).await.unwrap();
        let index = repo.load_index(&point.disks[0].index).await.unwrap();
        let id = index.ids.iter().find(|i| !i.is_zero()).unwrap();
        let key = damage_a_chunk(dir.path(), &id.to_hex());
        let out = tempfile::tempdir().unwrap();
        for format in [FileFormat::Raw, FileFormat::Vhd, FileFormat::Xva] {
            let path = out.path().join("restored");
            let mut o = FileRestoreOptions::new(&path, format);
            o.disk = Some(DiskSelector::Position("0".into()));
            let e = restore_repo_to_file(&repo, &point, &o, no_progress())
                .await
                .unwrap_err();
            assert!(
                matches!(e, RestoreError::Repo { .. }),
                "{format:?}: not a repository error: {e}"
            );
            assert!(e.to_string().contains(&key), "{format:?}: {e}");
            assert!(e.is_archive_problem());
            let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
            assert!(left.is_empty(), "{format:?}: files left: {left:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_groups_vms_follows_renames_and_refuses_ambiguous_names() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path(), false).await;
    let other = "22222222-2222-3333-4444-555555555555";
    let twin = "33333333-2222-3333-4444-555555555555";
    let disk = |seed| TestDisk {
        key: LIVE_VDI.into(),
        bytes: pattern_disk(2 << 20, seed),
        meta: disk_meta("0", SNAP_VDI, LIVE_VDI, "root", 2 << 20),
    };
    let at = |t: i64| time::OffsetDateTime::from_unix_timestamp(1_700_000_000 + t).unwrap();
    for (vm, name, t) in [
        (VM, "web", 0),
        (other, "db", 10),
        (VM, "web", 20),
        (VM, "web2", 30),
        (twin, "db", 40),
    ] {
        write_point(
            &repo,
            vm,
            name,
            at(t),
            &[disk(t as u64)],
            vm_records(2 << 20),
        )
        .await;
    }
    let all = list_repo_points(&repo, None).await.unwrap();
    let order: Vec<(&str, &str)> = all
        .iter()
        .map(|p| (p.vm.as_str(), p.vm_uuid.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            ("db", other),
            ("db", twin),
            ("web2", VM),
            ("web", VM),
            ("web", VM)
        ],
        "grouped per VM under its newest name, newest first"
    );
    assert!(all[2].id > all[3].id && all[3].id > all[4].id);
    // The old name still finds the renamed VM; the new one too.
    let by_old = list_repo_points(&repo, Some("web")).await.unwrap();
    assert_eq!(by_old.len(), 3);
    assert_eq!(
        find_repo_point(&repo, "web2", None).await.unwrap().vm_name,
        "web2"
    );
    let oldest = find_repo_point(&repo, "web", Some(&all[4].id))
        .await
        .unwrap();
    assert_eq!(oldest.id, all[4].id);
    // A day prefix picks the newest of that day.
    let day = &all[2].id[..8];
    assert_eq!(
        find_repo_point(&repo, VM, Some(day)).await.unwrap().id,
        all[2].id
    );
    // Two VMs called "db": the uuid is needed.
    let e = find_repo_point(&repo, "db", None).await.unwrap_err();
    assert!(e.to_string().contains("by its uuid"), "{e}");
    assert_eq!(
        find_repo_point(&repo, twin, None).await.unwrap().vm_uuid,
        twin
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_restore_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    repo_with_two_points(dir.path(), false).await;
    let repo = open_repo(dir.path()).await;
    let point = find_repo_point(&repo, "web", None).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    for format in [FileFormat::Raw, FileFormat::Vhd, FileFormat::Xva] {
        let mut o = FileRestoreOptions::new(out.path().join("x"), format);
        o.disk = Some(DiskSelector::Position("0".into()));
        o.cancel.cancel();
        let e = restore_repo_to_file(&repo, &point, &o, no_progress())
            .await
            .unwrap_err();
        assert!(matches!(e, RestoreError::Cancelled), "{format:?}: {e}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }
}
