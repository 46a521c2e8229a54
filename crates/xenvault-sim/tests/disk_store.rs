//! DiskStore: copy-on-write correctness, snapshot cost, CBT bitmaps, GC, persistence.

#![allow(clippy::unwrap_used)] // tests may unwrap (project code rules)

use std::time::Instant;

use xenvault_sim::disk::{
    BlockBitmap, CBT_BLOCK_SIZE, DiskError, DiskStore, blocks_for, guest_block_data,
};

const MIB: u64 = 1024 * 1024;
const BS: u64 = CBT_BLOCK_SIZE;

fn read_all(store: &DiskStore, id: &str) -> Vec<u8> {
    let size = store.info(id).unwrap().size;
    let mut buf = vec![0u8; size as usize];
    store.read_at(id, 0, &mut buf).unwrap();
    buf
}

/// A model disk: plain bytes, for comparing against the store.
fn apply(model: &mut [u8], off: u64, data: &[u8]) {
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn ones(b: &BlockBitmap) -> Vec<u64> {
    b.ones().collect()
}

#[test]
fn writes_reads_and_unaligned_cow() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    let size = 4 * MIB + 1000; // not block aligned
    s.create("a", "sr1", size).unwrap();
    let mut model = vec![0u8; size as usize];
    assert_eq!(read_all(&s, "a"), model);

    let w1: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
    s.write_at("a", 12_345, &w1).unwrap();
    apply(&mut model, 12_345, &w1);
    assert_eq!(read_all(&s, "a"), model);

    s.snapshot("a", "snap1").unwrap();
    let snap_model = model.clone();
    // Partial writes into blocks the new leaf does not own must copy up the old data.
    s.write_at("a", 70_000, b"hello").unwrap();
    apply(&mut model, 70_000, b"hello");
    s.write_at("a", size - 10, &[9u8; 10]).unwrap();
    apply(&mut model, size - 10, &[9u8; 10]);
    assert_eq!(read_all(&s, "a"), model);
    assert_eq!(read_all(&s, "snap1"), snap_model);

    // Writing into the snapshot does not touch the live disk (snapshots are writable overlays).
    s.write_at("snap1", 0, &[7u8; 3]).unwrap();
    assert_eq!(read_all(&s, "a"), model);

    // Out of range.
    let mut b = [0u8; 2];
    assert!(matches!(
        s.read_at("a", size - 1, &mut b),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.write_at("a", size, &[1]),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.read_at("nope", 0, &mut b),
        Err(DiskError::NoSuchDisk(_))
    ));
}

#[test]
fn snapshot_is_cheap_on_a_sparse_disk() {
    // 1 GiB virtual, 64 MiB written: the snapshot must not copy data. Speed belongs in
    // benchmarks; this only guards against an accidental full copy (loose bound), and
    // checks that no data moved (physical utilisation of the new layers is zero).
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    s.create("big", "sr", 1024 * MIB).unwrap();
    let chunk = vec![0xABu8; (4 * MIB) as usize];
    for i in 0..16u64 {
        s.write_at("big", i * 64 * MIB, &chunk).unwrap();
    }
    let before = s.sr_physical_utilisation("sr");
    assert_eq!(before, 64 * MIB);
    let t = Instant::now();
    s.snapshot("big", "big-snap").unwrap();
    let took = t.elapsed();
    assert!(took.as_secs_f64() < 5.0, "snapshot took {took:?}");
    assert_eq!(s.sr_physical_utilisation("sr"), before);
    assert_eq!(s.info("big").unwrap().physical_utilisation, 0);
    assert_eq!(s.info("big-snap").unwrap().physical_utilisation, 0);
    let mut buf = vec![0u8; 4096];
    s.read_at("big-snap", 5 * 64 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xAB));
    // On-disk footprint: sparse files, not 2 GiB of copies.
    let used = du_bytes(dir.path());
    assert!(used < 200 * MIB, "store uses {used} bytes on disk");
}

fn du_bytes(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let m = e.metadata().unwrap();
        if m.is_dir() {
            total += du_bytes(&e.path());
        } else {
            total += m.blocks() * 512;
        }
    }
    total
}

#[test]
fn clone_copy_destroy_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    s.create("a", "sr1", 2 * MIB).unwrap();
    s.guest_write_blocks("a", 1, &[0, 5, 31]).unwrap();
    let a0 = read_all(&s, "a");
    s.clone_disk("a", "c").unwrap();
    s.copy("a", "cp", "sr2").unwrap();
    s.guest_write_blocks("a", 2, &[5, 6]).unwrap();
    assert_eq!(read_all(&s, "c"), a0);
    assert_eq!(read_all(&s, "cp"), a0);
    assert_eq!(s.info("cp").unwrap().sr, "sr2");
    assert_eq!(s.info("cp").unwrap().chain_depth, 1);
    assert_eq!(s.sr_physical_utilisation("sr2"), 3 * BS);
    assert!(!s.cbt_enabled("c"));

    // Destroying the clone leaves the frozen parent with one child: it is coalesced
    // back, so the chain shrinks again and the data is unchanged.
    let a1 = read_all(&s, "a");
    assert_eq!(s.info("a").unwrap().chain_depth, 2);
    s.destroy("c").unwrap();
    assert_eq!(s.info("a").unwrap().chain_depth, 1);
    assert_eq!(read_all(&s, "a"), a1);
    assert_eq!(s.sr_physical_utilisation("sr1"), 4 * BS); // blocks 0,5,6,31
    s.destroy("a").unwrap();
    assert_eq!(s.sr_physical_utilisation("sr1"), 0);
    let layers = std::fs::read_dir(dir.path().join("layers"))
        .unwrap()
        .count();
    assert_eq!(layers, 2, "only the copy's data and map files remain");
    assert!(matches!(s.destroy("a"), Err(DiskError::NoSuchDisk(_))));
}

#[test]
fn long_snapshot_series_keeps_chains_short_and_data_right() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    s.create("vm", "sr", 4 * MIB).unwrap();
    s.enable_cbt("vm").unwrap();
    let mut prev: Option<String> = None;
    for round in 0..40u64 {
        s.guest_write("vm", round, 3).unwrap();
        let snap = format!("snap{round}");
        s.snapshot("vm", &snap).unwrap();
        assert_eq!(read_all(&s, &snap), read_all(&s, "vm"));
        // Backup-style retention: keep only the latest snapshot.
        if let Some(p) = prev.take() {
            s.destroy(&p).unwrap();
        }
        prev = Some(snap);
        assert!(s.info("vm").unwrap().chain_depth <= 3);
    }
}

#[test]
fn snapshot_chain_limit_is_sm_error_109() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    s.create("vm", "sr", MIB).unwrap();
    let mut err = None;
    for i in 0..40 {
        match s.snapshot("vm", &format!("s{i}")) {
            Ok(()) => {}
            Err(e) => {
                err = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = err.expect("the chain limit must stop snapshots");
    assert_eq!(i, 29);
    assert_eq!(e.xapi_error().0, "SR_BACKEND_FAILURE_109");
}

#[test]
fn cbt_bitmaps_equal_the_written_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    let size = 64 * MIB + 3 * BS / 2; // 1025.5 blocks -> 1026 bits -> 129 bytes
    s.create("vdi", "sr", size).unwrap();
    s.enable_cbt("vdi").unwrap();
    s.enable_cbt("vdi").unwrap(); // idempotent
    s.guest_write("vdi", 100, 20).unwrap();
    s.snapshot("vdi", "s1").unwrap();
    let w2 = s.guest_write("vdi", 200, 37).unwrap();
    // A small unaligned write straddling two blocks, and one in the partial last block.
    s.write_at("vdi", 10 * BS - 3, &[1u8; 6]).unwrap();
    s.write_at("vdi", size - 1, &[1u8]).unwrap();
    s.snapshot("vdi", "s2").unwrap();
    let w3 = s.guest_write("vdi", 300, 5).unwrap();
    s.snapshot("vdi", "s3").unwrap();

    let mut expect12: Vec<u64> = w2.clone();
    expect12.extend([9, 10, blocks_for(size) - 1]);
    expect12.sort();
    expect12.dedup();
    let b12 = s.list_changed_blocks("s1", "s2").unwrap();
    assert_eq!(ones(&b12), expect12);
    assert_eq!(b12.len(), 1026);
    assert_eq!(b12.to_msb_first_bytes().len(), 129);
    assert_eq!(ones(&s.list_changed_blocks("s2", "s3").unwrap()), w3);
    let mut expect13 = expect12.clone();
    expect13.extend(&w3);
    expect13.sort();
    expect13.dedup();
    assert_eq!(ones(&s.list_changed_blocks("s1", "s3").unwrap()), expect13);
    // Up to the live disk: nothing written since s3.
    assert_eq!(s.list_changed_blocks("s3", "vdi").unwrap().count_ones(), 0);

    // MSB-first bytes.
    let bytes = b12.to_msb_first_bytes();
    for i in 0..b12.len() {
        let bit = bytes[(i / 8) as usize] & (0x80 >> (i % 8)) != 0;
        assert_eq!(bit, expect12.contains(&i), "bit {i}");
    }

    // SM errors: same, wrong direction, unrelated.
    let code = |r: Result<BlockBitmap, DiskError>| r.unwrap_err().xapi_error();
    let (c, p) = code(s.list_changed_blocks("s1", "s1"));
    assert_eq!(c, "SR_BACKEND_FAILURE_460");
    assert!(p[1].contains("same"), "{p:?}");
    assert_eq!(
        code(s.list_changed_blocks("s3", "s1")).0,
        "SR_BACKEND_FAILURE_460"
    );
    s.create("other", "sr", MIB).unwrap();
    s.enable_cbt("other").unwrap();
    let (c, p) = code(s.list_changed_blocks("s1", "other"));
    assert_eq!(c, "SR_BACKEND_FAILURE_460");
    assert!(p[1].contains("unrelated"), "{p:?}");

    // data_destroy keeps the log: s1 still works as vdi_from.
    s.data_destroy("s1").unwrap();
    s.data_destroy("s1").unwrap(); // idempotent
    assert!(!s.info("s1").unwrap().has_data);
    assert!(matches!(
        s.read_at("s1", 0, &mut [0u8; 1]),
        Err(DiskError::NoData(_))
    ));
    assert_eq!(ones(&s.list_changed_blocks("s1", "s3").unwrap()), expect13);

    // Destroying a middle snapshot merges its log into its child: s1 -> s3 is unchanged.
    s.destroy("s2").unwrap();
    assert_eq!(ones(&s.list_changed_blocks("s1", "s3").unwrap()), expect13);
    assert_eq!(
        s.cbt_links("s3"),
        Some((Some("s1".to_string()), Some("vdi".to_string())))
    );

    // disable_cbt cuts the live disk off the chain.
    s.disable_cbt("vdi").unwrap();
    assert!(!s.cbt_enabled("vdi"));
    assert_eq!(s.cbt_links("s3"), Some((Some("s1".to_string()), None)));
    assert_eq!(
        code(s.list_changed_blocks("s3", "vdi")).0,
        "SR_BACKEND_FAILURE_460"
    );
    // data_destroy without CBT.
    s.snapshot("vdi", "nocbt").unwrap();
    assert!(matches!(
        s.data_destroy("nocbt"),
        Err(DiskError::NoCbtMetadata(_))
    ));
}

#[test]
fn resize_grows_disk_and_cbt_and_refuses_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    s.create("v", "sr", MIB).unwrap();
    s.enable_cbt("v").unwrap();
    s.guest_write_blocks("v", 1, &[15]).unwrap();
    s.snapshot("v", "s1").unwrap();
    s.resize("v", 2 * MIB).unwrap();
    s.guest_write_blocks("v", 2, &[31]).unwrap();
    let mut buf = vec![0u8; BS as usize];
    s.read_at("v", 15 * BS, &mut buf).unwrap();
    assert_eq!(buf, guest_block_data(1, 15));
    s.read_at("v", 20 * BS, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    s.snapshot("v", "s2").unwrap();
    let b = s.list_changed_blocks("s1", "s2").unwrap();
    assert_eq!(b.len(), 32);
    assert_eq!(ones(&b), vec![31]);
    let e = s.resize("v", MIB).unwrap_err();
    assert_eq!(e.xapi_error().0, "SR_BACKEND_FAILURE_79");
}

#[test]
fn differing_blocks_is_the_symmetric_difference() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    s.create("v", "sr", 4 * MIB).unwrap();
    s.guest_write_blocks("v", 1, &[0, 1, 2]).unwrap();
    s.snapshot("v", "base").unwrap();
    s.guest_write_blocks("v", 2, &[2, 10]).unwrap();
    // A write into the base after the snapshot (base-only change) must be reverted by the delta.
    s.write_at("base", 40 * BS, &[5u8; 10]).unwrap();
    s.snapshot("v", "new").unwrap();
    assert_eq!(ones(&s.allocated_blocks("new").unwrap()), vec![0, 1, 2, 10]);
    assert_eq!(
        ones(&s.differing_blocks("new", "base").unwrap()),
        vec![2, 10, 40]
    );
    s.create("x", "sr", 4 * MIB).unwrap();
    assert!(matches!(
        s.differing_blocks("new", "x"),
        Err(DiskError::Unrelated(..))
    ));
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (a, snap, bits) = {
        let s = DiskStore::open(dir.path()).unwrap();
        s.create("v", "sr", 3 * MIB).unwrap();
        s.enable_cbt("v").unwrap();
        s.guest_write("v", 9, 10).unwrap();
        s.snapshot("v", "s1").unwrap();
        s.guest_write("v", 10, 4).unwrap();
        s.write_at("v", 12345, b"persist me").unwrap();
        s.snapshot("v", "s2").unwrap();
        s.guest_write("v", 11, 2).unwrap();
        (
            read_all(&s, "v"),
            read_all(&s, "s1"),
            s.list_changed_blocks("s1", "v").unwrap(),
        )
    };
    let s = DiskStore::open(dir.path()).unwrap();
    assert_eq!(read_all(&s, "v"), a);
    assert_eq!(read_all(&s, "s1"), snap);
    assert_eq!(s.list_changed_blocks("s1", "v").unwrap(), bits);
    assert_eq!(s.disk_ids(), vec!["s1", "s2", "v"]);
    // And it keeps working after the reopen.
    s.destroy("s1").unwrap();
    s.guest_write("v", 12, 1).unwrap();
    drop(s);
    let s = DiskStore::open(dir.path()).unwrap();
    assert!(!s.exists("s1"));
    assert!(s.cbt_enabled("v"));
}

#[test]
fn concurrent_readers_and_writers() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(DiskStore::open(dir.path()).unwrap());
    s.create("v", "sr", 8 * MIB).unwrap();
    s.guest_write("v", 1, 64).unwrap();
    s.snapshot("v", "snap").unwrap();
    let expect = read_all(&s, "snap");
    let mut handles = Vec::new();
    for t in 0..4u64 {
        let s = s.clone();
        let expect = expect.clone();
        handles.push(std::thread::spawn(move || {
            for i in 0..20u64 {
                if t == 0 {
                    s.guest_write("v", 100 + i, 8).unwrap();
                } else {
                    let mut buf = vec![0u8; MIB as usize];
                    let off = ((i + t) % 8) * MIB;
                    s.read_at("snap", off, &mut buf).unwrap();
                    assert_eq!(buf, expect[off as usize..(off + MIB) as usize]);
                }
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn cbt_bitmap_decodes_with_the_client_codec() {
    // The client's decoder (xenvault-xapi) must read our bytes as the same blocks.
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    let size = 10 * MIB + 512;
    s.create("v", "sr", size).unwrap();
    s.enable_cbt("v").unwrap();
    s.snapshot("v", "s0").unwrap();
    let written = s.guest_write("v", 77, 40).unwrap();
    s.snapshot("v", "s1").unwrap();
    let bytes = s
        .list_changed_blocks("s0", "s1")
        .unwrap()
        .to_msb_first_bytes();
    let mut client = xenvault_xapi::cbt::ChangedBlocks::new(size);
    for &b in &written {
        client.mark_block(b);
    }
    assert_eq!(client.bitmap(), bytes.as_slice());
    let decoded = xenvault_xapi::cbt::ChangedBlocks::from_bitmap(bytes, size).unwrap();
    let mut blocks = Vec::new();
    for i in 0..decoded.block_count() {
        if decoded.is_changed(i) {
            blocks.push(i);
        }
    }
    assert_eq!(blocks, written);
}

#[test]
fn a_lost_cbt_log_disables_cbt_instead_of_failing_the_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.create("v", "sr", MIB).unwrap();
        s.enable_cbt("v").unwrap();
        s.snapshot("v", "s1").unwrap();
    }
    std::fs::remove_file(dir.path().join("cbt").join("s1.cbtlog")).unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    assert!(!s.cbt_enabled("s1"));
    assert!(s.cbt_enabled("v"));
    assert_eq!(s.cbt_links("v"), Some((None, None)));
    assert_eq!(
        s.list_changed_blocks("s1", "v").unwrap_err().xapi_error().0,
        "SR_BACKEND_FAILURE_460"
    );
    // A damaged metadata file is a clear error, not a panic.
    std::fs::write(dir.path().join("store.json"), b"{ not json").unwrap();
    let e = DiskStore::open(dir.path()).unwrap_err();
    assert!(matches!(e, DiskError::Corrupt { .. }), "{e}");
}
