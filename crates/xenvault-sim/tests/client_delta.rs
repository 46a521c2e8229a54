//! Our client against the real `xapi-sim` binary: incremental exports. A VHD delta
//! (`/export_raw_vdi?format=vhd&base=`) between two snapshots is a differencing VHD that
//! carries only the 2 MiB blocks around the guest writes and, laid over the older
//! snapshot, gives the newer one; `VDI.list_changed_blocks` (decoded by
//! xenvault_xapi::cbt) lists exactly the 64 KiB blocks the guest wrote, across two and
//! three snapshots, and still works once the older snapshot was `data_destroy`ed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod client_support;

use std::collections::BTreeSet;

use client_support::{
    CBT_BLOCK, Ctx, SimProc, VHD_BLOCK, apply, cbt_blocks_covered, decode_vhd, differing_blocks,
    vhd_blocks_of,
};
use xenvault_formats::vhd::DiskType;
use xenvault_types::ExtentData;
use xenvault_xapi::cbt::ChangedBlocks;
use xenvault_xapi::records::{VdiRef, VdiType};

const DISK: u64 = 8 << 20;

fn sim() -> SimProc {
    SimProc::spawn(&["--vms", "1", "--disk-size", "8M", "--written", "20%"])
}

/// `VDI.list_changed_blocks(from, to)` decoded, as a set of 64 KiB block numbers.
async fn changed(ctx: &Ctx, from: &VdiRef, to: &VdiRef) -> BTreeSet<u64> {
    let text = ctx
        .session
        .vdi()
        .list_changed_blocks(from, to)
        .await
        .unwrap();
    let bitmap = ChangedBlocks::from_base64(&text, DISK).unwrap();
    assert_eq!(bitmap.block_count(), DISK / CBT_BLOCK);
    bitmap.changed_blocks().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_delta_with_base_overlays_to_the_newer_snapshot() {
    let sim = sim();
    let ctx = Ctx::https(&sim).await;
    let (vm, _) = ctx.vm("vm-01").await;
    let (_, live) = ctx.only_disk(&vm).await;
    assert_eq!(live.virtual_size as u64, DISK);

    let snap_a = ctx.snapshot(&vm, "delta A").await;
    let (_, a) = ctx.only_disk(&snap_a).await;
    let written = sim.guest_write(&live.uuid, 11, 12).await;
    let snap_b = ctx.snapshot(&vm, "delta B").await;
    let (_, b) = ctx.only_disk(&snap_b).await;

    let raw_a = ctx.export_raw(&a).await;
    let raw_b = ctx.export_raw(&b).await;
    // The guest writes are what tells A and B apart (random data: every block differs).
    assert_eq!(differing_blocks(&raw_a, &raw_b), written);

    let delta = ctx
        .fetch_ok(
            "/export_raw_vdi",
            &[
                ("vdi", b.uuid.as_str()),
                ("format", "vhd"),
                ("base", a.uuid.as_str()),
            ],
        )
        .await;
    let decoded = decode_vhd(&delta);
    assert_eq!(decoded.disk_type, DiskType::Differencing);
    assert!(
        decoded.parent.is_some(),
        "a differencing VHD names its parent"
    );
    assert_eq!(decoded.virtual_size, DISK);

    // Only the 2 MiB blocks around the writes are carried …
    let carried: BTreeSet<u64> = cbt_blocks_covered(&decoded.extents)
        .iter()
        .map(|b| b * CBT_BLOCK / VHD_BLOCK)
        .collect();
    let touched = vhd_blocks_of(&written);
    assert!(
        carried.is_subset(&touched),
        "the delta carries VHD blocks {carried:?}, the writes touched {touched:?}"
    );
    assert_eq!(carried, touched, "every touched VHD block is in the delta");
    let carried_bytes: u64 = decoded
        .extents
        .iter()
        .filter(|e| matches!(e.data, ExtentData::Data(_)))
        .map(|e| e.len())
        .sum();
    assert!(carried_bytes <= touched.len() as u64 * VHD_BLOCK);
    assert!(
        (delta.len() as u64) < DISK,
        "a delta of {} blocks is {} bytes",
        touched.len(),
        delta.len()
    );

    // … and laid over A they give B.
    let mut image = raw_a.clone();
    apply(&mut image, &decoded.extents);
    assert!(image == raw_b, "A + delta(B, base=A) differs from B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_lists_exactly_the_written_blocks() {
    let sim = sim();
    let ctx = Ctx::https(&sim).await;
    let (vm, _) = ctx.vm("vm-01").await;
    let (live_ref, live) = ctx.only_disk(&vm).await;
    ctx.session.vdi().enable_cbt(&live_ref).await.unwrap();

    let snap_a = ctx.snapshot(&vm, "cbt A").await;
    let (a_ref, a) = ctx.only_disk(&snap_a).await;
    let w1 = sim.guest_write(&live.uuid, 21, 10).await;
    let snap_b = ctx.snapshot(&vm, "cbt B").await;
    let (b_ref, b) = ctx.only_disk(&snap_b).await;
    // Second round: chosen blocks, including the first and the last block of the disk
    // and one also written in the first round.
    let last = DISK / CBT_BLOCK - 1;
    let overlap = *w1.iter().next().unwrap();
    let w2: BTreeSet<u64> = [0, 3, 64, overlap, last].into_iter().collect();
    sim.guest_write_blocks(&live.uuid, 22, &w2.iter().copied().collect::<Vec<_>>())
        .await;
    let snap_c = ctx.snapshot(&vm, "cbt C").await;
    let (c_ref, c) = ctx.only_disk(&snap_c).await;

    assert_eq!(changed(&ctx, &a_ref, &b_ref).await, w1, "A→B");
    assert_eq!(changed(&ctx, &b_ref, &c_ref).await, w2, "B→C");
    let both: BTreeSet<u64> = w1.union(&w2).copied().collect();
    assert_eq!(
        changed(&ctx, &a_ref, &c_ref).await,
        both,
        "A→C = both rounds"
    );

    // The bitmap agrees with the data.
    let raw_a = ctx.export_raw(&a).await;
    let raw_b = ctx.export_raw(&b).await;
    let raw_c = ctx.export_raw(&c).await;
    assert_eq!(differing_blocks(&raw_a, &raw_b), w1);
    assert_eq!(differing_blocks(&raw_b, &raw_c), w2);

    // data_destroy keeps A's CBT log: A (now cbt_metadata) still works as vdi_from.
    // xapi waits for the VDI's VBDs to go (VDI_IN_USE otherwise): drop the snapshot
    // VM's VBD first, as a backup tool does.
    assert_eq!(a.vbds.len(), 1);
    ctx.session.vbd().destroy(&a.vbds[0]).await.unwrap();
    ctx.session.vdi().data_destroy(&a_ref).await.unwrap();
    let a_after = ctx.session.vdi().get_record(&a_ref).await.unwrap();
    assert_eq!(a_after.type_, VdiType::CbtMetadata);
    assert_eq!(a_after.uuid, a.uuid);
    assert_eq!(
        changed(&ctx, &a_ref, &c_ref).await,
        both,
        "A(cbt_metadata)→C"
    );
    assert_eq!(changed(&ctx, &a_ref, &b_ref).await, w1, "A(cbt_metadata)→B");
    // Its data is gone: NBD access is refused with the typed XAPI error.
    let err = ctx.session.vdi().get_nbd_info(&a_ref).await.unwrap_err();
    assert!(
        err.xapi().is_some_and(|e| e.is("VDI_INCOMPATIBLE_TYPE")),
        "get_nbd_info on a cbt_metadata VDI: {err}"
    );
}
