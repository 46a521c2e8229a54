//! Restore from archive restore points into a real `xapi-sim` process,
//! through the engine's API: whole VMs (XVA, zstd), single disks (from an
//! XVA, from VHD and raw files), identity, damaged archives, failures.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod restore_support;

use restore_support::{Layout, SimProc, backup, object_counts, raw_sha, vm_by_name, within};
use xenvault_engine::restore::{
    ArchivePoint, DiskRestoreOptions, DiskSelector, RestoreError, VmIdentity, VmRestoreOptions,
    find_point, no_progress, restore_disk, restore_vm,
};

const SIM_ARGS: &[&str] = &["--vms", "2", "--disk-size", "8M", "--written", "30%"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_restored_from_a_zstd_xva_has_identical_disks() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    let root = tempfile::tempdir().unwrap();
    // A backup's snapshot carries xenvault's clean-up tags (VM.snapshot
    // copies other_config): the restored VM must not.
    let (source, _) = vm_by_name(&pool.session, "vm-01").await;
    pool.session
        .vm()
        .put_other_config(&source, "xenvault:job", "nightly")
        .await
        .unwrap();
    let backed = within(
        "backup",
        backup(&pool, root.path(), "vm-01", Layout::Xva, true),
    )
    .await;
    let point = find_point(root.path(), "vm-01", None).unwrap();
    assert_eq!(point.dir, backed.dir);

    let restored = within(
        "restore",
        restore_vm(&pool, &point, &VmRestoreOptions::default(), no_progress()),
    )
    .await
    .unwrap();
    assert!(restored.verified);
    assert_ne!(restored.uuid, backed.vm_uuid, "a new VM gets a new uuid");
    assert_eq!(
        restored.name,
        format!("vm-01 (restored {})", point.timestamp)
    );
    assert_eq!(restored.disks.len(), backed.disks.len());
    for disk in &restored.disks {
        let (_, want_sha, want_len) = &backed.disks[&disk.userdevice];
        let (sha, len) = raw_sha(&pool, &disk.vdi_uuid).await;
        assert_eq!(len, *want_len);
        assert_eq!(
            &sha, want_sha,
            "disk {} differs from the backup",
            disk.userdevice
        );
    }
    let (_, vm) = vm_by_name(&pool.session, &restored.name).await;
    assert_eq!(vm.other_config["xenvault-restored-from"], point.label());
    assert!(
        vm.other_config.keys().all(|k| !k.starts_with("xenvault:")),
        "{:?}",
        vm.other_config
    );
    assert!(!vm.is_a_template);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_is_preserved_only_when_the_original_is_gone_or_forced() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    let root = tempfile::tempdir().unwrap();
    let backed = backup(&pool, root.path(), "vm-02", Layout::Xva, false).await;
    let point = find_point(root.path(), "vm-02", None).unwrap();
    let preserve = VmRestoreOptions {
        identity: VmIdentity::Preserve { force: false },
        start: true,
        ..VmRestoreOptions::default()
    };
    let before = object_counts(&pool.session).await;
    let e = restore_vm(&pool, &point, &preserve, no_progress())
        .await
        .unwrap_err();
    assert!(matches!(e, RestoreError::OriginalExists { .. }), "{e}");
    assert!(e.to_string().contains(&backed.vm_uuid), "{e}");
    assert_eq!(
        object_counts(&pool.session).await,
        before,
        "a refused restore creates nothing"
    );

    // The original is gone: the restore keeps its uuid (and MACs) and starts it.
    let (vm, _) = vm_by_name(&pool.session, "vm-02").await;
    pool.destroy_vm_and_disks(&vm).await.unwrap();
    let restored = within(
        "restore",
        restore_vm(&pool, &point, &preserve, no_progress()),
    )
    .await
    .unwrap();
    assert_eq!(restored.uuid, backed.vm_uuid);
    assert_eq!(restored.name, "vm-02");
    assert!(restored.started, "{:?}", restored.start_error);
    for disk in &restored.disks {
        let (sha, _) = raw_sha(&pool, &disk.vdi_uuid).await;
        assert_eq!(sha, backed.disks[&disk.userdevice].1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_disks_are_restored_into_new_vdis_from_every_layout() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    for (layout, zstd) in [
        (Layout::Xva, true),
        (Layout::Vhd, false),
        (Layout::Raw, true),
    ] {
        let root = tempfile::tempdir().unwrap();
        let backed = backup(&pool, root.path(), "vm-01", layout, zstd).await;
        let point = ArchivePoint::read(&backed.dir).unwrap();
        let (snap_vdi, want_sha, want_len) = backed.disks["0"].clone();
        for selector in [
            DiskSelector::Position("0".into()),
            DiskSelector::VdiUuid(snap_vdi.clone()),
        ] {
            let options = DiskRestoreOptions {
                disk: selector,
                sr: None,
                name: Some(format!("restored {layout:?}")),
                verify: true,
                cancel: Default::default(),
            };
            let restored = within(
                "disk restore",
                restore_disk(&pool, &point, &options, no_progress()),
            )
            .await
            .unwrap_or_else(|e| panic!("{layout:?}: {e}"));
            assert_eq!(restored.virtual_size, want_len);
            assert_eq!(
                restored.format,
                if layout == Layout::Vhd { "vhd" } else { "raw" }
            );
            let (sha, len) = raw_sha(&pool, &restored.vdi_uuid).await;
            assert!(len >= want_len);
            assert_eq!(sha, want_sha, "{layout:?}: the restored disk differs");
            let vdi = pool
                .session
                .vdi()
                .get_by_uuid(&restored.vdi_uuid)
                .await
                .unwrap();
            let rec = pool.session.vdi().get_record(&vdi).await.unwrap();
            assert_eq!(rec.name_label, format!("restored {layout:?}"));
        }
        let options = DiskRestoreOptions {
            disk: DiskSelector::Position("7".into()),
            sr: None,
            name: None,
            verify: true,
            cancel: Default::default(),
        };
        let e = restore_disk(&pool, &point, &options, no_progress())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no disk at position 7"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_archive_is_refused_naming_the_file_and_nothing_is_left() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    let root = tempfile::tempdir().unwrap();
    let backed = backup(&pool, root.path(), "vm-01", Layout::Xva, false).await;
    let xva = backed.dir.join("vm.xva");
    let mut bytes = std::fs::read(&xva).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xFF;
    std::fs::write(&xva, &bytes).unwrap();
    let point = find_point(root.path(), "vm-01", None).unwrap();
    let before = object_counts(&pool.session).await;
    let e = restore_vm(&pool, &point, &VmRestoreOptions::default(), no_progress())
        .await
        .unwrap_err();
    assert!(matches!(e, RestoreError::Damaged { .. }), "{e}");
    assert!(e.to_string().contains("vm.xva"), "{e}");
    let options = DiskRestoreOptions {
        disk: DiskSelector::Position("0".into()),
        sr: None,
        name: None,
        verify: true,
        cancel: Default::default(),
    };
    let e = restore_disk(&pool, &point, &options, no_progress())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("vm.xva"), "{e}");

    // Unchecked, the damaged chunk is still found (XAPI verifies the XVA's
    // own checksums; the disk extraction does too) and nothing is left.
    let unchecked = VmRestoreOptions {
        verify: false,
        ..VmRestoreOptions::default()
    };
    assert!(
        restore_vm(&pool, &point, &unchecked, no_progress())
            .await
            .is_err()
    );
    let options = DiskRestoreOptions {
        verify: false,
        ..options
    };
    assert!(
        restore_disk(&pool, &point, &options, no_progress())
            .await
            .is_err()
    );
    assert_eq!(
        object_counts(&pool.session).await,
        before,
        "nothing left on the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_cut_mid_stream_leaves_nothing_on_the_pool() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    let root = tempfile::tempdir().unwrap();
    backup(&pool, root.path(), "vm-01", Layout::Xva, false).await;
    let point = find_point(root.path(), "vm-01", None).unwrap();
    let before = object_counts(&pool.session).await;
    for handler in ["import", "import_raw_vdi"] {
        sim.control(
            "POST",
            "/_sim/faults/stream",
            serde_json::json!({"handler": handler, "cut_after": 1_000_000, "times": 1}),
        )
        .await;
    }
    let e = within(
        "cut restore",
        restore_vm(&pool, &point, &VmRestoreOptions::default(), no_progress()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, RestoreError::Xapi { .. } | RestoreError::Http { .. }),
        "{e}"
    );
    let options = DiskRestoreOptions {
        disk: DiskSelector::Position("0".into()),
        sr: None,
        name: None,
        verify: true,
        cancel: Default::default(),
    };
    let e = within(
        "cut disk restore",
        restore_disk(&pool, &point, &options, no_progress()),
    )
    .await
    .unwrap_err();
    assert!(!e.to_string().is_empty());
    assert_eq!(
        object_counts(&pool.session).await,
        before,
        "nothing left on the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_is_restored_into_another_pool_on_a_chosen_sr() {
    let source = SimProc::spawn(SIM_ARGS);
    let other = SimProc::spawn(&["--vms", "1", "--disk-size", "4M"]);
    let src = source.connect().await;
    let dst = other.connect().await;
    let root = tempfile::tempdir().unwrap();
    let backed = backup(&src, root.path(), "vm-01", Layout::Xva, true).await;
    let point = find_point(root.path(), &backed.vm_uuid, None).unwrap();
    let (_, pool_rec) = dst.session.pool_record().await.unwrap();
    let sr = dst
        .session
        .sr()
        .get_record(&pool_rec.default_sr)
        .await
        .unwrap();
    let options = VmRestoreOptions {
        sr: Some(sr.uuid.clone()),
        identity: VmIdentity::Preserve { force: false },
        ..VmRestoreOptions::default()
    };
    let restored = within(
        "cross-pool restore",
        restore_vm(&dst, &point, &options, no_progress()),
    )
    .await
    .unwrap();
    assert_eq!(
        restored.uuid, backed.vm_uuid,
        "the other pool lacks the VM: identity kept"
    );
    assert_eq!(restored.sr_uuid, sr.uuid);
    for disk in &restored.disks {
        let (sha, _) = raw_sha(&dst, &disk.vdi_uuid).await;
        assert_eq!(sha, backed.disks[&disk.userdevice].1);
    }
    let e = restore_vm(
        &dst,
        &point,
        &VmRestoreOptions {
            sr: Some("00000000-0000-0000-0000-000000000000".into()),
            ..VmRestoreOptions::default()
        },
        no_progress(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RestoreError::BadSr(_)), "{e}");
}
