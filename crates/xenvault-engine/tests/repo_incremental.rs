//! Forever-incremental backups into a repository against a real `xapi-sim`:
//! after guest writes the incremental reads only the changed 64 KiB blocks
//! over NBD (counted by the simulator) and restores to exactly the new disk;
//! the snapshot of each backup is kept as the next base and the superseded
//! one destroyed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod repo_incremental_support;

use repo_incremental_support::{Fixture, disk_report, scenario, vm_report};

const BLOCK: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_reads_only_changed_blocks_and_restores_exactly() {
    let fx = Fixture::start(&scenario(true, "8M"), &[], "").await;
    let (vm_uuid, vdi) = fx.vm().await;

    // 1. Full.
    let r1 = fx.run().await;
    let d1 = disk_report(&r1);
    assert_eq!(d1.method, "nbd-full", "{d1:?}");
    assert!(!d1.incremental);
    let before = fx.live_disk(&vdi).await;
    // The snapshot stays as the next base: one snapshot VM, one VDI.
    assert_eq!(fx.snapshots().await, (1, 1), "{:?}", vm_report(&r1));

    // 2. Guest writes: blocks 3, 50, 51 and the last one.
    let last = 8 * 1024 * 1024 / BLOCK - 1;
    fx.guest_write(&vdi, 42, &[3, 50, 51, last]);
    let after = fx.live_disk(&vdi).await;
    assert_ne!(before, after);
    let first = fx.points(&vm_uuid).await.remove(0);
    let expected = fx.cbt_read_bytes(&first, &vdi, &[3, 50, 51, last]).await;
    // Reading whole chunks must still be far less than the disk.
    assert!(
        (4 * BLOCK..8 * 1024 * 1024).contains(&expected),
        "{expected}"
    );
    fx.reset_stats();

    // 3. Incremental: only the chunks holding the four changed blocks come
    // over NBD (whole where the parent chunk has data, ADR 0009).
    let r2 = fx.run().await;
    let d2 = disk_report(&r2);
    assert_eq!(d2.method, "nbd-cbt", "{d2:?}");
    assert!(d2.incremental);
    assert_eq!(d2.reason, None);
    assert_eq!(fx.nbd_bytes(), expected, "NBD bytes of the incremental");
    assert_eq!(d2.bytes_read, expected);

    // Both restore points restore bit for bit; the second is incremental.
    let points = fx.points(&vm_uuid).await;
    assert_eq!(points.len(), 2);
    assert_eq!(points[1].parent.as_deref(), Some(points[0].id.as_str()));
    assert!(fx.restore(&points[0], &vdi).await == before, "first point");
    assert!(fx.restore(&points[1], &vdi).await == after, "second point");

    // The first base was destroyed, the second kept.
    assert_eq!(fx.snapshots().await, (1, 1));
    let meta1 = &points[0].disk(&vdi).unwrap().meta;
    let meta2 = &points[1].disk(&vdi).unwrap().meta;
    let snap1 = meta1["snapshot_vdi_uuid"].as_str().unwrap();
    let snap2 = meta2["snapshot_vdi_uuid"].as_str().unwrap();
    assert!(fx.session.vdi().get_by_uuid(snap1).await.is_err());
    let kept = fx.session.vdi().get_by_uuid(snap2).await.unwrap();
    let kept = fx.session.vdi().get_record(&kept).await.unwrap();
    assert_eq!(
        kept.other_config
            .get(xenvault_engine::journal::TAG_BASE)
            .map(String::as_str),
        Some("nightly")
    );
    assert_eq!(meta2["read"], "nbd-cbt");

    // 4. No change: nothing read, the same disk.
    fx.reset_stats();
    let r3 = fx.run().await;
    let d3 = disk_report(&r3);
    assert_eq!(d3.method, "nbd-cbt", "{d3:?}");
    assert_eq!(fx.nbd_bytes(), 0);
    let points = fx.points(&vm_uuid).await;
    assert_eq!(points.len(), 3);
    assert!(fx.restore(&points[2], &vdi).await == after, "third point");
    assert_eq!(fx.snapshots().await, (1, 1));
}

/// A crash between keeping a new base and releasing the old one leaves two
/// kept snapshots: the next run uses the newest whose restore point exists
/// (here the other names a restore point that was never committed), stays
/// incremental, and releases the extra one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extra_kept_snapshot_is_released_by_the_next_run() {
    use xenvault_engine::journal::{self, Journal, KeepRole, RunContext};
    let fx = Fixture::start(&scenario(true, "8M"), &[], "").await;
    let (vm_uuid, vdi) = fx.vm().await;
    disk_report(&fx.run().await);
    assert_eq!(fx.snapshots().await, (1, 1));

    // What a crashed run leaves: a second kept snapshot, newer, naming a
    // restore point that does not exist.
    let ctx = RunContext {
        journal: Journal::open(&fx.dir.path().join("state")).unwrap(),
        pool: "sim".into(),
        job: "nightly".into(),
        run_id: "crashed-run".into(),
    };
    let vm_ref = fx.session.vm().get_by_uuid(&vm_uuid).await.unwrap();
    let snap = journal::snapshot_tagged(&fx.session, &ctx, &vm_ref, &vm_uuid, "extra", &[])
        .await
        .map_err(|(_, e)| e)
        .unwrap();
    journal::keep_snapshot(
        &fx.session,
        &ctx,
        &snap.token,
        KeepRole::Base,
        "some-repo",
        Some("20000101T000000Z"),
    )
    .await
    .unwrap();
    assert_eq!(fx.snapshots().await, (2, 2));
    assert_eq!(
        ctx.journal
            .kept_for("sim", "nightly", &vm_uuid)
            .unwrap()
            .len(),
        2
    );

    fx.guest_write(&vdi, 4, &[2]);
    let parent = fx.points(&vm_uuid).await.pop().unwrap();
    let expected = fx.cbt_read_bytes(&parent, &vdi, &[2]).await;
    fx.reset_stats();
    let report = fx.run().await;
    let d = disk_report(&report);
    assert_eq!(d.method, "nbd-cbt", "{d:?}");
    assert_eq!(fx.nbd_bytes(), expected);
    assert_eq!(fx.snapshots().await, (1, 1), "{report:#?}");
    assert!(fx.session.vm().get_record(&snap.vm_ref).await.is_err());
    let kept = ctx.journal.kept_for("sim", "nightly", &vm_uuid).unwrap();
    assert_eq!(kept.len(), 1);
    let points = fx.points(&vm_uuid).await;
    assert_eq!(
        kept[0].restore_point.as_deref(),
        Some(points.last().unwrap().id.as_str())
    );
    assert!(fx.restore(points.last().unwrap(), &vdi).await == fx.live_disk(&vdi).await);
}

/// The journal's kept snapshots on a real pool: cleanup and sweeps leave a
/// kept snapshot alone, keeping again swaps the role tag, a VDI whose token
/// tag is not ours is never reduced, and a release destroys everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_snapshots_survive_cleanup_and_sweeps_until_released() {
    use xenvault_engine::journal::{
        self, Journal, KeepRole, RunContext, TAG_BASE, TAG_RESUME, TAG_TOKEN,
    };
    let fx = Fixture::start(&scenario(true, "4M"), &[], "").await;
    let (vm_uuid, _) = fx.vm().await;
    let ctx = RunContext {
        journal: Journal::open(&fx.dir.path().join("state")).unwrap(),
        pool: "sim".into(),
        job: "nightly".into(),
        run_id: "r1".into(),
    };
    let s = &fx.session;
    let vm_ref = s.vm().get_by_uuid(&vm_uuid).await.unwrap();
    let snap = journal::snapshot_tagged(s, &ctx, &vm_ref, &vm_uuid, "kept", &[])
        .await
        .map_err(|(_, e)| e)
        .unwrap();
    let kept = journal::keep_snapshot(s, &ctx, &snap.token, KeepRole::Resume, "repo", None)
        .await
        .unwrap();
    let rec = s.vm().get_record(&snap.vm_ref).await.unwrap();
    assert_eq!(
        rec.other_config.get(TAG_RESUME).map(String::as_str),
        Some("nightly")
    );

    // Neither cleanup nor a sweep (even of its own run) destroys it.
    let report = journal::destroy_token(s, &ctx.journal, &kept.token).await;
    assert!(report.destroyed_vms.is_empty(), "{report:?}");
    assert_eq!(report.left_alone.len(), 1, "{report:?}");
    journal::sweep(s, &ctx.journal, "sim", Some("r1"))
        .await
        .unwrap();
    assert_eq!(fx.snapshots().await, (1, 1));
    assert!(ctx.journal.outstanding(None).unwrap().is_empty());

    // Kept again as a base: the role tag is swapped.
    let kept = journal::keep_snapshot(s, &ctx, &snap.token, KeepRole::Base, "repo", Some("rp"))
        .await
        .unwrap();
    let rec = s.vm().get_record(&snap.vm_ref).await.unwrap();
    assert_eq!(
        rec.other_config.get(TAG_BASE).map(String::as_str),
        Some("nightly")
    );
    assert!(!rec.other_config.contains_key(TAG_RESUME));

    // A VDI whose token tag is not ours is never reduced to metadata.
    let (vdi_ref, _) = &snap.vdis[0];
    s.vdi()
        .put_other_config(vdi_ref, TAG_TOKEN, "someone-else")
        .await
        .unwrap();
    let err = journal::reduce_to_metadata(s, &ctx.journal, &kept)
        .await
        .unwrap_err();
    assert!(err.contains("left alone"), "{err}");
    let vdi = s.vdi().get_record(vdi_ref).await.unwrap();
    assert_ne!(vdi.type_, xenvault_xapi::records::VdiType::CbtMetadata);
    assert!(
        s.vm().get_record(&snap.vm_ref).await.is_ok(),
        "the snapshot VM was destroyed although its VDI is not ours"
    );
    s.vdi()
        .put_other_config(vdi_ref, TAG_TOKEN, &snap.token)
        .await
        .unwrap();

    // Released: destroyed by UUID and tag, the token closed.
    let report = journal::release_kept(s, &ctx.journal, &kept).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.destroyed_vms, vec![snap.vm.uuid.clone()]);
    assert_eq!(report.closed, 1);
    assert_eq!(fx.snapshots().await, (0, 0));
    assert!(ctx.journal.kept(None).unwrap().is_empty());
    assert!(ctx.journal.outstanding(None).unwrap().is_empty());
}
