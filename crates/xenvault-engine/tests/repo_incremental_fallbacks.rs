//! Each fallback of the incremental repository backup happens when its
//! cause is injected into a real `xapi-sim`, is named in the report (and the
//! manifest's disk meta), and the restore point still restores bit for bit:
//! CBT off on the disk or in the job → VHD differencing export; NBD
//! unreachable → VHD; a destroyed base, a resized disk, a failing
//! `list_changed_blocks` → full; `cbt = "enable"`; `base = "metadata"`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod repo_incremental_support;

use repo_incremental_support::{Fixture, disk_report, scenario, scenario_with_nbd, vm_report};
use xenvault_types::report::DiskReadReport;
use xenvault_xapi::records::VdiType;

fn reason(d: &DiskReadReport) -> String {
    d.reason.clone().unwrap_or_default()
}

/// Full backup, guest writes, second backup; checks that the second
/// restore point restores to exactly the new disk. Returns the second
/// run's disk report.
async fn full_then_changed(fx: &Fixture) -> (DiskReadReport, DiskReadReport) {
    let (vm_uuid, vdi) = fx.vm().await;
    let d1 = disk_report(&fx.run().await);
    fx.guest_write(&vdi, 9, &[1, 2, 30]);
    fx.reset_stats();
    let d2 = disk_report(&fx.run().await);
    let points = fx.points(&vm_uuid).await;
    let last = points.last().unwrap();
    let live = fx.live_disk(&vdi).await;
    assert!(
        fx.restore(last, &vdi).await == live,
        "the restore point {} does not restore to the live disk ({d2:?})",
        last.id
    );
    // The reason is in the manifest too.
    let meta = &last.disk(&vdi).unwrap().meta;
    assert_eq!(meta["read"].as_str(), Some(d2.method.as_str()));
    assert_eq!(meta["reason"].as_str(), d2.reason.as_deref());
    (d1, d2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_off_on_the_disk_uses_a_vhd_differencing_export() {
    let fx = Fixture::start(&scenario(false, "8M"), &[], "").await;
    let (d1, d2) = full_then_changed(&fx).await;
    assert_eq!(d1.method, "nbd-full");
    assert!(reason(&d1).contains("first backup"), "{d1:?}");
    assert_eq!(d2.method, "vhd-diff", "{d2:?}");
    assert!(d2.incremental);
    assert!(reason(&d2).contains("CBT is off on disk"), "{d2:?}");
    assert_eq!(fx.nbd_bytes(), 0);
    // The differencing export carries the changed 2 MiB blocks only.
    assert!(d2.bytes_read < 4 * 1024 * 1024 + 64 * 1024, "{d2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_off_in_the_job_uses_a_vhd_differencing_export() {
    let fx = Fixture::start(&scenario(true, "8M"), &[], "cbt = \"off\"").await;
    let (_, d2) = full_then_changed(&fx).await;
    assert_eq!(d2.method, "vhd-diff", "{d2:?}");
    assert!(reason(&d2).contains("cbt = \"off\""), "{d2:?}");
    assert_eq!(fx.nbd_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_unreachable_uses_vhd_exports() {
    let fx = Fixture::start(&scenario_with_nbd(true, "8M", false), &[], "").await;
    let (d1, d2) = full_then_changed(&fx).await;
    assert_eq!(d1.method, "vhd-full", "{d1:?}");
    assert!(reason(&d1).contains("NBD unreachable"), "{d1:?}");
    assert_eq!(d2.method, "vhd-diff", "{d2:?}");
    assert!(d2.incremental);
    assert!(reason(&d2).contains("NBD unreachable"), "{d2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_base_means_a_full_backup() {
    let fx = Fixture::start(&scenario(true, "8M"), &[], "").await;
    let (vm_uuid, vdi) = fx.vm().await;
    disk_report(&fx.run().await);
    // Someone removes the kept base snapshot by hand.
    let vms = fx.session.vm().get_all_records().await.unwrap();
    for (r, v) in vms.iter().filter(|(_, v)| v.is_a_snapshot) {
        let _ = v;
        fx.session.vm().destroy(r).await.unwrap();
    }
    let vdis = fx.session.vdi().get_all_records().await.unwrap();
    for (r, _) in vdis.iter().filter(|(_, v)| v.is_a_snapshot) {
        fx.session.vdi().destroy(r).await.unwrap();
    }
    fx.guest_write(&vdi, 5, &[7]);
    let report = fx.run().await;
    let d2 = disk_report(&report);
    assert_eq!(d2.method, "nbd-full", "{d2:?}");
    assert!(!d2.incremental);
    assert!(reason(&d2).contains("gone from the pool"), "{d2:?}");
    let points = fx.points(&vm_uuid).await;
    assert!(fx.restore(points.last().unwrap(), &vdi).await == fx.live_disk(&vdi).await);
    // The lost base's journal entry is closed; the new base is kept.
    assert_eq!(fx.snapshots().await, (1, 1));
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resized_disk_means_a_full_backup() {
    let fx = Fixture::start(&scenario(true, "8M"), &[], "").await;
    let (vm_uuid, vdi) = fx.vm().await;
    disk_report(&fx.run().await);
    let vdi_ref = fx.session.vdi().get_by_uuid(&vdi).await.unwrap();
    fx.session
        .call_value(
            "VDI.resize",
            vec![
                xenvault_types::Value::str(vdi_ref.as_str()),
                xenvault_types::Value::String((12u64 << 20).to_string()),
            ],
        )
        .await
        .unwrap();
    fx.guest_write(&vdi, 5, &[7, 150]);
    let d2 = disk_report(&fx.run().await);
    assert_eq!(d2.method, "nbd-full", "{d2:?}");
    assert!(reason(&d2).contains("resized"), "{d2:?}");
    assert_eq!(d2.size, 12 << 20);
    let points = fx.points(&vm_uuid).await;
    let live = fx.live_disk(&vdi).await;
    assert_eq!(live.len(), 12 << 20);
    assert!(fx.restore(points.last().unwrap(), &vdi).await == live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_list_changed_blocks_means_a_full_backup() {
    let fx = Fixture::start(&scenario(true, "8M"), &[], "").await;
    let (vm_uuid, vdi) = fx.vm().await;
    disk_report(&fx.run().await);
    fx.guest_write(&vdi, 5, &[7]);
    fx.sim.fail_call(
        "VDI.list_changed_blocks",
        1,
        &[
            "SR_BACKEND_FAILURE_460",
            "",
            "Source and target VDI are unrelated",
            "",
        ],
    );
    let d2 = disk_report(&fx.run().await);
    assert_eq!(d2.method, "nbd-full", "{d2:?}");
    assert!(reason(&d2).contains("list_changed_blocks"), "{d2:?}");
    assert!(reason(&d2).contains("SR_BACKEND_FAILURE_460"), "{d2:?}");
    let points = fx.points(&vm_uuid).await;
    assert!(fx.restore(points.last().unwrap(), &vdi).await == fx.live_disk(&vdi).await);
}

/// A real CBT reset: the administrator turns CBT off and on again on the
/// disk between backups, which starts a new log unrelated to the base
/// snapshot's. The next backup is full, says why, and restores exactly; the
/// one after is incremental again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cbt_reset_between_backups_means_one_full_backup() {
    let fx = Fixture::start(&scenario(true, "8M"), &[], "").await;
    let (vm_uuid, vdi) = fx.vm().await;
    disk_report(&fx.run().await);
    let vdi_ref = fx.session.vdi().get_by_uuid(&vdi).await.unwrap();
    fx.session.vdi().disable_cbt(&vdi_ref).await.unwrap();
    fx.guest_write(&vdi, 5, &[7]);
    fx.session.vdi().enable_cbt(&vdi_ref).await.unwrap();
    fx.guest_write(&vdi, 6, &[9]);
    let d2 = disk_report(&fx.run().await);
    assert_eq!(d2.method, "nbd-full", "{d2:?}");
    // The pool's own answer (SM's), not only the engine's wording.
    assert!(reason(&d2).contains("list_changed_blocks"), "{d2:?}");
    assert!(reason(&d2).contains("SR_BACKEND_FAILURE_460"), "{d2:?}");
    assert!(
        reason(&d2).contains("Source and target VDI are unrelated"),
        "{d2:?}"
    );
    let points = fx.points(&vm_uuid).await;
    assert!(fx.restore(points.last().unwrap(), &vdi).await == fx.live_disk(&vdi).await);

    fx.guest_write(&vdi, 7, &[3]);
    let d3 = disk_report(&fx.run().await);
    assert_eq!(d3.method, "nbd-cbt", "{d3:?}");
    let points = fx.points(&vm_uuid).await;
    assert!(fx.restore(points.last().unwrap(), &vdi).await == fx.live_disk(&vdi).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_enable_turns_cbt_on_and_the_next_incremental_uses_it() {
    let fx = Fixture::start(&scenario(false, "8M"), &[], "cbt = \"enable\"").await;
    let (vm_uuid, vdi) = fx.vm().await;
    let r1 = fx.run().await;
    let notes = vm_report(&r1).notes.join("\n");
    assert!(notes.contains("CBT enabled on disk"), "{notes}");
    let vdi_ref = fx.session.vdi().get_by_uuid(&vdi).await.unwrap();
    assert!(
        fx.session
            .vdi()
            .get_record(&vdi_ref)
            .await
            .unwrap()
            .cbt_enabled
    );
    fx.guest_write(&vdi, 3, &[10, 11]);
    let parent = fx.points(&vm_uuid).await.pop().unwrap();
    let expected = fx.cbt_read_bytes(&parent, &vdi, &[10, 11]).await;
    fx.reset_stats();
    let r2 = fx.run().await;
    let d2 = disk_report(&r2);
    assert_eq!(d2.method, "nbd-cbt", "{d2:?}");
    assert_eq!(fx.nbd_bytes(), expected);
    assert!(
        !vm_report(&r2).notes.join("\n").contains("CBT enabled"),
        "enabled twice"
    );
    let points = fx.points(&vm_uuid).await;
    assert!(fx.restore(points.last().unwrap(), &vdi).await == fx.live_disk(&vdi).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_base_keeps_only_cbt_and_still_gives_incrementals() {
    let fx = Fixture::start(&scenario(true, "8M"), &[], "base = \"metadata\"").await;
    let (vm_uuid, vdi) = fx.vm().await;
    let r1 = fx.run().await;
    vm_report(&r1);
    // No snapshot VM left, one snapshot VDI reduced to CBT metadata.
    assert_eq!(fx.snapshots().await, (0, 1));
    let vdis = fx.session.vdi().get_all_records().await.unwrap();
    let base = vdis.values().find(|v| v.is_a_snapshot).unwrap();
    assert_eq!(base.type_, VdiType::CbtMetadata);

    fx.guest_write(&vdi, 8, &[4, 5, 6]);
    let parent = fx.points(&vm_uuid).await.pop().unwrap();
    let expected = fx.cbt_read_bytes(&parent, &vdi, &[4, 5, 6]).await;
    fx.reset_stats();
    let d2 = disk_report(&fx.run().await);
    assert_eq!(d2.method, "nbd-cbt", "{d2:?}");
    assert_eq!(fx.nbd_bytes(), expected);
    let points = fx.points(&vm_uuid).await;
    assert!(fx.restore(points.last().unwrap(), &vdi).await == fx.live_disk(&vdi).await);
    // The old metadata base is gone, the new one reduced.
    assert_eq!(fx.snapshots().await, (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_base_without_nbd_reads_the_whole_disk() {
    let fx = Fixture::start(
        &scenario_with_nbd(true, "8M", false),
        &[],
        "base = \"metadata\"",
    )
    .await;
    let (vm_uuid, vdi) = fx.vm().await;
    vm_report(&fx.run().await);
    assert_eq!(fx.snapshots().await, (0, 1));
    fx.guest_write(&vdi, 8, &[4]);
    let d2 = disk_report(&fx.run().await);
    assert_eq!(d2.method, "vhd-full", "{d2:?}");
    assert!(reason(&d2).contains("NBD unreachable"), "{d2:?}");
    assert!(reason(&d2).contains("CBT metadata only"), "{d2:?}");
    let points = fx.points(&vm_uuid).await;
    assert!(fx.restore(points.last().unwrap(), &vdi).await == fx.live_disk(&vdi).await);
}
