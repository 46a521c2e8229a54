//! Repository restores into a real `xapi-sim`: restore points are made from
//! the simulator's VMs (snapshot, records, raw disks written with the
//! repository API, as a backup lays them out), then restored bit for bit: the
//! whole VM through `/import`, one disk into a new VDI (raw and VHD), one
//! disk written into an existing VDI sending only the differing chunks
//! (checked with the simulator's byte counters and CBT), and a damaged chunk
//! that fails the restore leaving nothing on the pool.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod repo_restore_support;
mod restore_support;

use std::collections::BTreeMap;

use repo_restore_support::{TestDisk, damage_a_chunk, disk_meta, new_repo, write_point};
use restore_support::{SimProc, download, object_counts, raw_sha, vm_by_name, vm_disks, within};
use sha2::{Digest, Sha256};
use xenvault_engine::restore::repo::{
    IntoVdiOptions, ReadMethod, RepoDiskRestoreOptions, RepoVmRestoreOptions, UploadFormat,
    VmRestoreMethod, restore_repo_disk, restore_repo_disk_into, restore_repo_vm,
};
use xenvault_engine::restore::{
    DiskSelector, PoolConnection, RestoreError, VmIdentity, no_progress,
};
use xenvault_repo::{Manifest, Repository};
use xenvault_types::Value;

const SIM_ARGS: &[&str] = &["--vms", "2", "--disk-size", "8M", "--written", "30%"];
/// Sparse disks: most chunks are zeros.
const SPARSE_ARGS: &[&str] = &["--vms", "2", "--disk-size", "16M", "--written", "2%"];

/// A VM backed up into the repository by the test.
struct Backed {
    manifest: Manifest,
    vm_uuid: String,
    /// Per userdevice: (live VDI uuid, raw bytes at backup time).
    disks: BTreeMap<String, (String, Vec<u8>)>,
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Backs VM `name` up into `repo` as the repository job lays it out:
/// snapshot, records (`vm_json`), each disk's raw bytes under the live
/// VDI's uuid; the snapshot is removed afterwards.
async fn backup_to_repo(pool: &PoolConnection, repo: &Repository, name: &str) -> Backed {
    let s = &pool.session;
    let (vm, rec) = vm_by_name(s, name).await;
    let snap = s.vm().snapshot(&vm, "xenvault-test", &[]).await.unwrap();
    let records = xenvault_engine::backup::export_records(s, &snap)
        .await
        .unwrap();
    let mut metas = xenvault_engine::backup::disk_metas(&records);
    let snap_disks = vm_disks(s, &snap).await;
    let mut disks = BTreeMap::new();
    let mut test_disks = Vec::new();
    for meta in &mut metas {
        let (_, snap_vdi) = &snap_disks[&meta.userdevice];
        let live = s.vdi().get_record(&snap_vdi.snapshot_of).await.unwrap();
        meta.source_vdi_uuid = live.uuid.clone();
        let bytes = download(
            pool,
            "/export_raw_vdi",
            &[("vdi", &meta.vdi_uuid), ("format", "raw")],
        )
        .await;
        assert_eq!(bytes.len() as u64, meta.virtual_size);
        disks.insert(meta.userdevice.clone(), (live.uuid.clone(), bytes.clone()));
        test_disks.push(TestDisk {
            key: live.uuid.clone(),
            meta: disk_meta(
                &meta.userdevice,
                &meta.vdi_uuid,
                &live.uuid,
                &meta.name,
                meta.virtual_size,
            ),
            bytes,
        });
    }
    let source_vm = s
        .call_value("VM.get_record", vec![Value::str(vm.as_str())])
        .await
        .unwrap();
    let vm_records: serde_json::Value = serde_json::from_str(
        &xenvault_engine::archive::meta::vm_json(&rec.uuid, &records, &source_vm, &metas),
    )
    .unwrap();
    let manifest = write_point(
        repo,
        &rec.uuid,
        &rec.name_label,
        time::OffsetDateTime::now_utc(),
        &test_disks,
        vm_records,
    )
    .await;
    s.vm().destroy(&snap).await.unwrap();
    for (_, (vdi_ref, _)) in snap_disks {
        s.vdi().destroy(&vdi_ref).await.unwrap();
    }
    Backed {
        manifest,
        vm_uuid: rec.uuid,
        disks,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_restored_through_import_has_identical_disks() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    for (encrypted, method) in [
        (false, VmRestoreMethod::Xva),
        (true, VmRestoreMethod::RawVdis),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let repo = new_repo(dir.path(), encrypted).await;
        let backed = within("backup", backup_to_repo(&pool, &repo, "vm-01")).await;
        assert!(!backed.disks.is_empty());

        let options = RepoVmRestoreOptions {
            method,
            ..RepoVmRestoreOptions::default()
        };
        let restored = within(
            "restore",
            restore_repo_vm(&pool, &repo, &backed.manifest, &options, no_progress()),
        )
        .await
        .unwrap();
        assert_ne!(restored.uuid, backed.vm_uuid, "a new VM gets a new uuid");
        assert_eq!(
            restored.name,
            format!("vm-01 (restored {})", backed.manifest.id)
        );
        assert_eq!(restored.disks.len(), backed.disks.len());
        for disk in &restored.disks {
            let (_, want) = &backed.disks[&disk.userdevice];
            let (got, len) = raw_sha(&pool, &disk.vdi_uuid).await;
            assert_eq!(len, want.len() as u64);
            assert_eq!(
                got,
                sha(want),
                "{method:?}: disk {} differs",
                disk.userdevice
            );
        }
        let (_, vm) = vm_by_name(&pool.session, &restored.name).await;
        assert_eq!(
            vm.other_config["xenvault-restored-from"],
            format!("vm-01/{}", backed.manifest.id)
        );
        assert!(!vm.is_a_template && !vm.is_a_snapshot);

        // The original identity is refused while the original exists.
        let preserve = RepoVmRestoreOptions {
            identity: VmIdentity::Preserve { force: false },
            ..RepoVmRestoreOptions::default()
        };
        let e = restore_repo_vm(&pool, &repo, &backed.manifest, &preserve, no_progress())
            .await
            .unwrap_err();
        assert!(matches!(e, RestoreError::OriginalExists { .. }), "{e}");
        pool.destroy_vm_and_disks(&vm_by_name(&pool.session, &restored.name).await.0)
            .await
            .unwrap();
    }

    // Once the original is gone, it comes back with its uuid and name;
    // progress reaches the announced total.
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path(), false).await;
    let backed = within("backup", backup_to_repo(&pool, &repo, "vm-02")).await;
    pool.destroy_vm_and_disks(&vm_by_name(&pool.session, "vm-02").await.0)
        .await
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let progress: xenvault_engine::restore::ProgressFn = {
        let seen = seen.clone();
        std::sync::Arc::new(move |p| seen.lock().unwrap().push(p))
    };
    let preserve = RepoVmRestoreOptions {
        identity: VmIdentity::Preserve { force: false },
        ..RepoVmRestoreOptions::default()
    };
    let restored = within(
        "restore with identity",
        restore_repo_vm(&pool, &repo, &backed.manifest, &preserve, progress),
    )
    .await
    .unwrap();
    assert_eq!(restored.uuid, backed.vm_uuid);
    assert_eq!(restored.name, "vm-02");
    assert!(restored.preserved_identity);
    let uploads: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.phase == xenvault_engine::restore::RestorePhase::Uploading)
        .copied()
        .collect();
    let last = uploads.last().unwrap();
    assert_eq!((last.done, last.total), (restored.bytes, restored.bytes));
    assert!(uploads.windows(2).all(|w| w[0].done <= w[1].done));
    for disk in &restored.disks {
        let (_, want) = &backed.disks[&disk.userdevice];
        assert_eq!(raw_sha(&pool, &disk.vdi_uuid).await.0, sha(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_disk_into_a_new_vdi_raw_and_vhd() {
    let sim = SimProc::spawn(SPARSE_ARGS);
    let pool = sim.connect().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path(), true).await;
    let backed = within("backup", backup_to_repo(&pool, &repo, "vm-02")).await;
    let (userdevice, (live_uuid, want)) = backed.disks.iter().next().unwrap();
    for (format, selector) in [
        (
            UploadFormat::Raw,
            DiskSelector::Position(userdevice.clone()),
        ),
        (
            UploadFormat::Vhd,
            live_uuid.parse::<DiskSelector>().unwrap(),
        ),
    ] {
        let mut options = RepoDiskRestoreOptions::new(selector);
        options.format = format;
        let restored = within(
            "disk restore",
            restore_repo_disk(&pool, &repo, &backed.manifest, &options, no_progress()),
        )
        .await
        .unwrap();
        assert_eq!(restored.virtual_size, want.len() as u64);
        let (got, _) = raw_sha(&pool, &restored.vdi_uuid).await;
        assert_eq!(got, sha(want), "{format:?} disk restore differs");
        if format == UploadFormat::Vhd {
            assert!(
                restored.bytes < want.len() as u64,
                "a VHD of a sparse disk is smaller ({} bytes)",
                restored.bytes
            );
        }
    }
    let e = restore_repo_disk(
        &pool,
        &repo,
        &backed.manifest,
        &RepoDiskRestoreOptions::new(DiskSelector::Position("9".into())),
        no_progress(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RestoreError::NotFound(_)), "{e}");
}

/// The `bytes/import_raw_vdi` counter of the simulator.
async fn imported_bytes(sim: &SimProc) -> u64 {
    let stats = sim
        .control("GET", "/_sim/stats", serde_json::Value::Null)
        .await;
    stats["bytes"]["import_raw_vdi"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn into_an_existing_vdi_only_differing_chunks_are_written() {
    let sim = SimProc::spawn(SPARSE_ARGS);
    let pool = sim.connect().await;
    let s = &pool.session;
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path(), false).await;
    let chunk = repo.chunk_size() as usize;
    let backed = within("backup", backup_to_repo(&pool, &repo, "vm-01")).await;
    let (userdevice, (live_uuid, backed_bytes)) = backed.disks.iter().next().unwrap();
    let live = s.vdi().get_by_uuid(live_uuid).await.unwrap();

    // The guest writes after the backup: a few 64 KiB blocks, one of them in
    // a chunk that was all zeros (zeros must be written back there).
    let zero_chunk = backed_bytes
        .chunks(chunk)
        .position(|c| c.iter().all(|b| *b == 0))
        .expect("a zero chunk in the backed-up disk");
    let per_chunk = (chunk / (64 << 10)) as u64;
    let blocks = vec![1, 2, zero_chunk as u64 * per_chunk + 3, 5 * per_chunk];
    sim.control(
        "POST",
        "/_sim/guest-write",
        serde_json::json!({"vdi": live_uuid, "seed": 7, "block_list": blocks}),
    )
    .await;
    let (changed, _) = raw_sha(&pool, live_uuid).await;
    assert_ne!(changed, sha(backed_bytes));
    let now = download(
        &pool,
        "/export_raw_vdi",
        &[("vdi", live_uuid), ("format", "raw")],
    )
    .await;
    let differing: Vec<usize> = (0..backed_bytes.len().div_ceil(chunk))
        .filter(|&c| {
            let r = c * chunk..((c + 1) * chunk).min(backed_bytes.len());
            backed_bytes[r.clone()] != now[r]
        })
        .collect();
    assert!(differing.contains(&zero_chunk));

    // A VDI under a running VM is refused.
    let (vm, rec) = vm_by_name(s, "vm-01").await;
    if rec.power_state == xenvault_xapi::records::PowerState::Halted {
        s.vm().start(&vm, false, false).await.unwrap();
    }
    let options = IntoVdiOptions::new(DiskSelector::Position(userdevice.clone()), live_uuid);
    let e = restore_repo_disk_into(&pool, &repo, &backed.manifest, &options, no_progress())
        .await
        .unwrap_err();
    assert!(matches!(e, RestoreError::BadTarget(_)), "{e}");
    assert!(e.to_string().contains("shut the VM down"), "{e}");
    s.vm().hard_shutdown(&vm).await.unwrap();

    // CBT shows what the restore writes: a VDI snapshot marks "before".
    s.vdi().enable_cbt(&live).await.unwrap();
    let before = s.vdi().snapshot(&live, &Default::default()).await.unwrap();
    sim.control("POST", "/_sim/stats/reset", serde_json::json!({}))
        .await;

    for read in [ReadMethod::Auto, ReadMethod::ExportRawVdi] {
        let mut options =
            IntoVdiOptions::new(DiskSelector::Position(userdevice.clone()), live_uuid);
        options.read = read;
        let r = within(
            "restore into",
            restore_repo_disk_into(&pool, &repo, &backed.manifest, &options, no_progress()),
        )
        .await
        .unwrap();
        let (got, _) = raw_sha(&pool, live_uuid).await;
        assert_eq!(got, sha(backed_bytes), "{read:?}: the VDI is not restored");
        if read == ReadMethod::Auto {
            assert_eq!(r.read_method, "nbd", "{:?}", r.nbd_unavailable);
            assert_eq!(r.chunks_compared, backed_bytes.len().div_ceil(chunk) as u64);
            assert_eq!(r.chunks_written, differing.len() as u64);
            assert!(r.zero_chunks_written >= 1);
            assert_eq!(r.bytes_written, (differing.len() * chunk) as u64);
            // What went over the wire is the VHD of those chunks only.
            assert_eq!(imported_bytes(&sim).await, r.bytes_sent);
            assert!(
                r.bytes_sent < backed_bytes.len() as u64 / 2,
                "{} bytes sent for {} chunks",
                r.bytes_sent,
                r.chunks_written
            );
            // And only their 64 KiB blocks were written.
            let bitmap = s.vdi().list_changed_blocks(&before, &live).await.unwrap();
            let cbt =
                xenvault_xapi::cbt::ChangedBlocks::from_base64(&bitmap, backed_bytes.len() as u64)
                    .unwrap();
            assert!(cbt.changed_count() > 0);
            for b in cbt.changed_blocks() {
                let c = (b * (64 << 10)) as usize / chunk;
                assert!(
                    differing.contains(&c),
                    "block {b} (chunk {c}) was written but did not differ"
                );
            }
        } else {
            // Already restored: nothing differs, nothing is sent.
            assert_eq!(r.read_method, "export_raw_vdi");
            assert_eq!(r.chunks_written, 0);
            assert_eq!(r.bytes_sent, 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_fails_the_restore_and_leaves_nothing() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path(), true).await;
    let backed = within("backup", backup_to_repo(&pool, &repo, "vm-01")).await;
    let entry = &backed.manifest.disks[0];
    let index = repo.load_index(&entry.index).await.unwrap();
    // The last data chunk: the upload is well under way when it fails.
    let id = index.ids.iter().rev().find(|i| !i.is_zero()).unwrap();
    let key = damage_a_chunk(dir.path(), &id.to_hex());
    let counts = object_counts(&pool.session).await;

    let e = within(
        "vm restore",
        restore_repo_vm(
            &pool,
            &repo,
            &backed.manifest,
            &RepoVmRestoreOptions::default(),
            no_progress(),
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RestoreError::Repo { .. }), "{e}");
    assert!(e.to_string().contains(&key), "{e}");
    assert_eq!(
        object_counts(&pool.session).await,
        counts,
        "the VM was left"
    );

    let mut options = RepoDiskRestoreOptions::new(DiskSelector::VdiUuid(entry.key.clone()));
    options.format = UploadFormat::Raw;
    let e = within(
        "disk restore",
        restore_repo_disk(&pool, &repo, &backed.manifest, &options, no_progress()),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains(&key), "{e}");
    assert_eq!(
        object_counts(&pool.session).await,
        counts,
        "the VDI was left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn into_a_vdi_a_disk_of_odd_size_goes_as_chunked_raw_pieces() {
    let sim = SimProc::spawn(SPARSE_ARGS);
    let pool = sim.connect().await;
    let s = &pool.session;
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path(), true).await;
    // A 3 MiB + 100 bytes disk: no VHD can hold it (whole sectors only).
    let size = (3 << 20) + 100;
    let mut bytes = repo_restore_support::pattern_disk(size - 100, 4);
    bytes.extend_from_slice(&[0xAB; 100]);
    let manifest = write_point(
        &repo,
        "44444444-2222-3333-4444-555555555555",
        "odd",
        time::OffsetDateTime::now_utc(),
        &[TestDisk {
            key: "xvda".into(),
            bytes: bytes.clone(),
            meta: serde_json::Value::Null,
        }],
        serde_json::Value::Null,
    )
    .await;
    // A bigger VDI holding other data everywhere.
    let (sr_ref, _) = pool.choose_sr(None).await.unwrap();
    let vdi = s
        .vdi()
        .create(&xenvault_xapi::records::VdiCreate {
            name_label: "target".into(),
            name_description: String::new(),
            sr: sr_ref,
            virtual_size: 4 << 20,
            type_: xenvault_xapi::records::VdiType::User,
            sharable: false,
            read_only: false,
            other_config: Default::default(),
            xenstore_data: Default::default(),
            sm_config: Default::default(),
            tags: Vec::new(),
        })
        .await
        .unwrap();
    let uuid = s.vdi().get_record(&vdi).await.unwrap().uuid;
    sim.control(
        "POST",
        "/_sim/guest-write",
        serde_json::json!({"vdi": uuid, "seed": 11, "percent": 100}),
    )
    .await;
    let before = download(
        &pool,
        "/export_raw_vdi",
        &[("vdi", &uuid), ("format", "raw")],
    )
    .await;
    let r = restore_repo_disk_into(
        &pool,
        &repo,
        &manifest,
        &IntoVdiOptions::new(DiskSelector::File("xvda".into()), vdi.as_str()),
        no_progress(),
    )
    .await
    .unwrap();
    assert_eq!(r.upload_format, "chunked");
    assert_eq!(r.chunks_compared, 4);
    assert_eq!(r.chunks_written, 4, "{r:?}");
    let after = download(
        &pool,
        "/export_raw_vdi",
        &[("vdi", &uuid), ("format", "raw")],
    )
    .await;
    assert!(after[..size] == bytes[..], "the disk is not restored");
    assert!(
        after[size..] == before[size..],
        "bytes past the disk changed"
    );
}
