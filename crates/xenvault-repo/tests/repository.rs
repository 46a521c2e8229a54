//! End-to-end tests of the repository on the memory and local backends: round
//! trips, incrementals, dedup, damage detection, crash safety and prune.

#![allow(clippy::unwrap_used)] // test helpers panic on purpose

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use time::macros::datetime;
use xenvault_repo::storage::{LocalStorage, MemoryStorage, Storage};
use xenvault_repo::*;
use xenvault_types::{Extent, ExtentData};

const MIB: u64 = 1 << 20;
const T0: OffsetDateTime = datetime!(2026-11-20 01:00 UTC);

/// A disk image: random, compressible and zero regions, not chunk-aligned.
fn image(size: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    let mut x = seed | 1;
    let mut i = 0usize;
    while i < v.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let run = (x % (700 * 1024)) as usize + 1;
        let end = (i + run).min(v.len());
        match x % 3 {
            0 => {} // zeros
            1 => v[i..end]
                .iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = b"xenvault compressible "[k % 22]),
            _ => {
                let mut y = x;
                for b in &mut v[i..end] {
                    y = y
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *b = (y >> 56) as u8;
                }
            }
        }
        i = end;
    }
    v
}

/// Feeds `img[range]` as extents of `piece` bytes (zero pieces as Zero extents).
async fn feed(w: &mut DiskWriter, img: &[u8], start: u64, end: u64, piece: u64) {
    let mut off = start;
    while off < end {
        let n = piece.min(end - off);
        let s = &img[off as usize..(off + n) as usize];
        let e = if s.iter().all(|&b| b == 0) {
            Extent::zero(off, n)
        } else {
            Extent::data(off, s.to_vec())
        };
        w.write_extent(e).await.unwrap();
        off += n;
    }
}

async fn read_back(repo: &Repository, m: &Manifest, disk: &str) -> Vec<u8> {
    read_back_with(repo, m, disk, 3).await
}

/// [`read_back`] with `parallel` chunks fetched at once.
async fn read_back_with(repo: &Repository, m: &Manifest, disk: &str, parallel: usize) -> Vec<u8> {
    let size = m.disk(disk).unwrap().size;
    let mut out = vec![0xAAu8; size as usize];
    let mut r = repo.read_disk(m, disk, parallel).await.unwrap();
    let mut expect = 0;
    while let Some(e) = r.next_extent().await {
        let e = e.unwrap();
        assert_eq!(e.offset, expect, "extents in order, no gaps");
        expect = e.end();
        match e.data {
            ExtentData::Data(d) => {
                out[e.offset as usize..e.offset as usize + d.len()].copy_from_slice(&d)
            }
            ExtentData::Zero(n) => out[e.offset as usize..(e.offset + n) as usize].fill(0),
        }
    }
    assert_eq!(expect, size);
    out
}

fn opts(encrypted: bool) -> InitOptions {
    InitOptions {
        chunk_size: MIB as u32,
        zstd_level: 1,
        encryption: encrypted.then(|| EncryptionInit {
            password: b"correct horse".to_vec(),
            label: "test".into(),
            cipher: CipherKind::Aes256Gcm,
            kdf: KdfParams::insecure_for_tests(),
        }),
    }
}

fn records() -> serde_json::Value {
    json!({"VM": {"uuid": "vm-1", "name_label": "web"}, "VBDs": [], "VDIs": []})
}

async fn full_backup(
    repo: &Repository,
    vm: &str,
    t: OffsetDateTime,
    disks: &[(&str, &[u8])],
) -> Manifest {
    let rp = repo
        .begin_restore_point(vm, "web", t, None, WriteOptions::default())
        .await
        .unwrap();
    for (key, img) in disks {
        let mut w = rp
            .full_disk(key, img.len() as u64, json!({"vdi": key}))
            .unwrap();
        feed(&mut w, img, 0, img.len() as u64, 300 * 1024 + 7).await;
        w.finish().await.unwrap();
    }
    rp.commit(records(), json!({"ova": "xml"}), json!({"job": "t"}))
        .await
        .unwrap()
}

async fn round_trip(storage: Arc<dyn Storage>, encrypted: bool) {
    let repo = Repository::init(storage.clone(), opts(encrypted))
        .await
        .unwrap();
    let size = 5 * MIB + MIB / 2 + 123;
    let img = image(size, 42);
    let m = full_backup(&repo, "vm-1", T0, &[("xvda", &img)]).await;
    let pw: Option<&[u8]> = encrypted.then_some(b"correct horse");
    let repo = Repository::open(storage.clone(), pw).await.unwrap();
    let listed = repo.list_restore_points(None).await.unwrap();
    assert_eq!(
        listed,
        vec![("vm-1".to_string(), "20261120T010000Z".to_string())]
    );
    let loaded = repo.load_manifest("vm-1", &m.id).await.unwrap();
    assert_eq!(loaded, m);
    assert_eq!(loaded.vm_records, records());
    assert!(
        read_back(&repo, &loaded, "xvda").await == img,
        "bit for bit"
    );
    assert!(repo.check().await.unwrap().is_clean());
    let v = repo.verify(VerifyOptions::default()).await.unwrap();
    assert!(v.is_clean(), "{:?}", v.damage);
    assert_eq!(v.chunks_verified, v.chunks_referenced);
}

#[tokio::test]
async fn round_trip_plain_memory() {
    round_trip(Arc::new(MemoryStorage::new()), false).await;
}

#[tokio::test]
async fn round_trip_encrypted_memory() {
    round_trip(Arc::new(MemoryStorage::new()), true).await;
}

#[tokio::test]
async fn round_trip_plain_and_encrypted_local() {
    for enc in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        round_trip(Arc::new(LocalStorage::new(dir.path()).unwrap()), enc).await;
    }
}

#[tokio::test]
async fn chacha_repositories_round_trip() {
    let mem: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let mut o = opts(true);
    if let Some(e) = o.encryption.as_mut() {
        e.cipher = CipherKind::ChaCha20Poly1305;
    }
    let repo = Repository::init(mem, o).await.unwrap();
    let img = image(2 * MIB + 5, 7);
    let m = full_backup(&repo, "vm-c", T0, &[("d", &img)]).await;
    assert!(read_back(&repo, &m, "d").await == img);
}

#[tokio::test]
async fn zero_chunks_are_not_stored_and_sparse_feeds_read_as_zero() {
    let mem = MemoryStorage::new();
    let repo = Repository::init(Arc::new(mem.clone()), opts(false))
        .await
        .unwrap();
    let size = 8 * MIB;
    let mut img = vec![0u8; size as usize];
    img[3 * MIB as usize + 10] = 1; // one byte of data in chunk 3
    let rp = repo
        .begin_restore_point("vm-z", "z", T0, None, WriteOptions::default())
        .await
        .unwrap();
    let mut w = rp.full_disk("d", size, json!(null)).unwrap();
    // Zero extent over chunks 0-1, data at chunk 3, nothing fed for the rest,
    // an explicit zero extent of data bytes (zeros given as Data) in chunk 6.
    w.write_extent(Extent::zero(0, 2 * MIB)).await.unwrap();
    w.write_extent(Extent::data(
        3 * MIB,
        img[3 * MIB as usize..4 * MIB as usize].to_vec(),
    ))
    .await
    .unwrap();
    w.write_extent(Extent::data(6 * MIB, vec![0; MIB as usize]))
        .await
        .unwrap();
    let entry = w.finish().await.unwrap();
    assert_eq!(entry.stats.chunks, 8);
    assert_eq!(entry.stats.zero_chunks, 7);
    assert_eq!(entry.stats.new_chunks, 1);
    let m = rp.commit(json!({}), json!({}), json!({})).await.unwrap();
    let chunks = mem
        .keys()
        .iter()
        .filter(|k| k.starts_with("chunks/"))
        .count();
    assert_eq!(chunks, 1, "only the one non-zero chunk is stored");
    assert!(read_back(&repo, &m, "d").await == img);
    // The reader coalesces zero runs.
    let mut r = repo.read_disk(&m, "d", 2).await.unwrap();
    let mut n = 0;
    while let Some(e) = r.next_extent().await {
        e.unwrap();
        n += 1;
    }
    assert_eq!(n, 3);
}

#[tokio::test]
async fn dedup_across_disks_and_vms() {
    let mem = MemoryStorage::new();
    let repo = Repository::init(Arc::new(mem.clone()), opts(true))
        .await
        .unwrap();
    let img = image(4 * MIB, 99);
    let m1 = full_backup(&repo, "vm-a", T0, &[("xvda", &img), ("xvdb", &img)]).await;
    let stored_after_first = mem
        .keys()
        .iter()
        .filter(|k| k.starts_with("chunks/"))
        .count();
    let a = &m1.disk("xvda").unwrap().stats;
    let b = &m1.disk("xvdb").unwrap().stats;
    let nonzero = a.chunks - a.zero_chunks;
    assert_eq!(stored_after_first as u64, nonzero);
    assert_eq!(
        a.new_chunks + b.new_chunks,
        nonzero,
        "each distinct chunk stored once"
    );
    assert_eq!(a.dedup_chunks + b.dedup_chunks, nonzero);
    let m2 = full_backup(&repo, "vm-b", T0, &[("xvda", &img)]).await;
    assert_eq!(m2.disks[0].stats.new_chunks, 0);
    assert_eq!(
        mem.keys()
            .iter()
            .filter(|k| k.starts_with("chunks/"))
            .count(),
        stored_after_first
    );
    assert!(read_back(&repo, &m2, "xvda").await == img);
}

#[tokio::test]
async fn incremental_is_parent_plus_changes() {
    for encrypted in [false, true] {
        let mem = MemoryStorage::new();
        let repo = Repository::init(Arc::new(mem.clone()), opts(encrypted))
            .await
            .unwrap();
        let size = 6 * MIB + 4096;
        let base = image(size, 5);
        let m1 = full_backup(&repo, "vm-i", T0, &[("xvda", &base)]).await;

        // Guest writes: 64 KiB inside chunk 1, a range across chunks 3-4, the tail.
        let mut new = base.clone();
        let changes: [(u64, u64); 3] = [
            (MIB + 64 * 1024, 64 * 1024),
            (4 * MIB - 1000, 3000),
            (size - 100, 100),
        ];
        let mut x = 1u8;
        for (off, len) in changes {
            for b in &mut new[off as usize..(off + len) as usize] {
                x = x.wrapping_mul(31).wrapping_add(7);
                *b = x;
            }
        }
        let t1 = T0 + Duration::from_secs(86400);
        let rp = repo
            .begin_restore_point("vm-i", "web", t1, Some(&m1.id), WriteOptions::default())
            .await
            .unwrap();
        let mut w = rp
            .incremental_disk("xvda", size, "xvda", json!(null))
            .await
            .unwrap();
        for (off, len) in changes {
            w.write_extent(Extent::data(
                off,
                new[off as usize..(off + len) as usize].to_vec(),
            ))
            .await
            .unwrap();
        }
        let entry = w.finish().await.unwrap();
        assert_eq!(entry.mode, DiskMode::Incremental);
        assert_eq!(
            entry.stats.processed_chunks, 4,
            "chunks 1, 3, 4 and the last"
        );
        let m2 = rp.commit(records(), json!({}), json!({})).await.unwrap();
        assert_eq!(m2.parent.as_deref(), Some(m1.id.as_str()));
        assert!(
            read_back(&repo, &m2, "xvda").await == new,
            "encrypted={encrypted}"
        );
        assert!(
            read_back(&repo, &m1, "xvda").await == base,
            "parent untouched"
        );
        // Write-only-what-differs: restoring m2 onto a disk holding m1.
        let i1 = repo.load_index(&m1.disks[0].index).await.unwrap();
        let i2 = repo.load_index(&m2.disks[0].index).await.unwrap();
        let diff = i2.differing_chunks(&i1).unwrap();
        assert_eq!(diff, vec![1, 3, 4, 6]);
        let existing: Vec<ChunkId> = (0..i1.ids.len() as u64)
            .map(|c| {
                let (o, l) = i1.chunk_range(c);
                repo.chunk_id(&base[o as usize..(o + l) as usize])
            })
            .collect();
        assert_eq!(repo.chunks_differing(&i2, &existing).unwrap(), diff);
        let mut target = base.clone();
        let mut r = repo
            .read_disk_chunks(&m2, "xvda", Some(diff), 2)
            .await
            .unwrap();
        while let Some(e) = r.next_extent().await {
            let e = e.unwrap();
            if let ExtentData::Data(d) = e.data {
                target[e.offset as usize..e.offset as usize + d.len()].copy_from_slice(&d);
            }
        }
        assert!(target == new);
        // A resized disk must be written in full.
        let rp = repo
            .begin_restore_point(
                "vm-i",
                "web",
                t1 + Duration::from_secs(1),
                Some(&m2.id),
                WriteOptions::default(),
            )
            .await
            .unwrap();
        assert!(matches!(
            rp.incremental_disk("xvda", size + MIB, "xvda", json!(null))
                .await,
            Err(RepoError::DiskResized { .. })
        ));
        rp.abort().await.unwrap();
    }
}

#[tokio::test]
async fn extents_out_of_order_or_past_the_end_are_refused() {
    let repo = Repository::init(Arc::new(MemoryStorage::new()), opts(false))
        .await
        .unwrap();
    let rp = repo
        .begin_restore_point("vm", "n", T0, None, WriteOptions::default())
        .await
        .unwrap();
    let mut w = rp.full_disk("d", 2 * MIB, json!(null)).unwrap();
    w.write_extent(Extent::data(MIB, vec![1; 10]))
        .await
        .unwrap();
    let e = w
        .write_extent(Extent::data(MIB + 5, vec![1; 10]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("increasing order"), "{e}");
    let e = w
        .write_extent(Extent::data(2 * MIB - 1, vec![1; 2]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("beyond the end"), "{e}");
    assert!(
        rp.full_disk("d", MIB, json!(null)).is_err(),
        "disk key used twice"
    );
    let e = rp.full_disk("huge", u64::MAX, json!(null)).unwrap_err();
    assert!(e.to_string().contains("64 TiB"), "{e}");
    drop(w);
    let e = rp
        .commit(json!({}), json!({}), json!({}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not finished"), "{e}");
}

#[tokio::test]
async fn flipped_bytes_are_found_and_the_restore_points_named() {
    for encrypted in [false, true] {
        let mem = MemoryStorage::new();
        let repo = Repository::init(Arc::new(mem.clone()), opts(encrypted))
            .await
            .unwrap();
        let shared = image(MIB, 1);
        let other = image(MIB, 2);
        let m1 = full_backup(&repo, "vm-1", T0, &[("a", &shared)]).await;
        let m2 = full_backup(&repo, "vm-2", T0, &[("a", &shared), ("b", &other)]).await;
        let m3 = full_backup(&repo, "vm-3", T0, &[("b", &other)]).await;
        let id = repo.load_index(&m1.disks[0].index).await.unwrap().ids[0];
        assert!(!id.is_zero());
        assert!(mem.tamper(&id.object_key(), |b| {
            let n = b.len();
            b[n / 2] ^= 0x10;
        }));
        // Structure is intact; verify finds the damage.
        assert!(repo.check().await.unwrap().is_clean());
        let v = repo.verify(VerifyOptions::default()).await.unwrap();
        assert_eq!(v.damage.len(), 1, "{:?}", v.damage);
        assert_eq!(v.damage[0].object, id.object_key());
        assert_eq!(v.broken_restore_points(), vec![m1.name(), m2.name()]);
        assert!(!v.broken_restore_points().contains(&m3.name()));
        // Reading the disk fails; refused, not returned.
        let mut r = repo.read_disk(&m1, "a", 1).await.unwrap();
        let err = r.next_extent().await.unwrap().unwrap_err();
        if encrypted {
            assert!(matches!(err, RepoError::Tampered { .. }), "{err}");
        } else {
            assert!(err.to_string().contains("CRC32"), "{err}");
        }
        // A missing chunk is found by check.
        mem.tamper(&id.object_key(), |_| {});
        repo.storage().delete(&id.object_key()).await.unwrap();
        let c = repo.check().await.unwrap();
        assert_eq!(c.damage.len(), 1);
        assert_eq!(c.damage[0].problem, "chunk is missing");
        assert_eq!(c.damage[0].restore_points, vec![m1.name(), m2.name()]);
    }
}

#[tokio::test]
async fn a_swapped_encrypted_blob_is_refused() {
    let mem = MemoryStorage::new();
    let repo = Repository::init(Arc::new(mem.clone()), opts(true))
        .await
        .unwrap();
    let a = image(MIB, 11);
    let b = image(MIB, 12);
    let m = full_backup(&repo, "vm", T0, &[("a", &a), ("b", &b)]).await;
    let ia = repo
        .load_index(&m.disk("a").unwrap().index)
        .await
        .unwrap()
        .ids[0];
    let ib = repo
        .load_index(&m.disk("b").unwrap().index)
        .await
        .unwrap()
        .ids[0];
    let blob_b = repo.storage().get(&ib.object_key()).await.unwrap();
    mem.tamper(&ia.object_key(), |v| *v = blob_b.to_vec());
    let mut r = repo.read_disk(&m, "a", 1).await.unwrap();
    assert!(matches!(
        r.next_extent().await.unwrap(),
        Err(RepoError::Tampered { .. })
    ));
    // Manifests cannot be swapped between restore points either.
    let m2 = full_backup(&repo, "vm", T0 + Duration::from_secs(5), &[("a", &a)]).await;
    let blob = repo
        .storage()
        .get(&format!("manifests/vm/{}", m2.id))
        .await
        .unwrap();
    mem.tamper(&format!("manifests/vm/{}", m.id), |v| *v = blob.to_vec());
    assert!(matches!(
        repo.load_manifest("vm", &m.id).await,
        Err(RepoError::Tampered { .. })
    ));
}

#[tokio::test]
async fn wrong_password_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
    Repository::init(s.clone(), opts(true)).await.unwrap();
    let e = Repository::open(s.clone(), Some(b"Correct horse"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "wrong password: none of the repository's 1 key slot(s) opens with it"
    );
    let e = Repository::open(s, None).await.unwrap_err();
    assert!(e.to_string().contains("encrypted"), "{e}");
}

#[tokio::test]
async fn a_restore_point_without_manifest_is_invisible() {
    let mem = MemoryStorage::new();
    let repo = Repository::init(Arc::new(mem.clone()), opts(false))
        .await
        .unwrap();
    let img = image(3 * MIB, 3);
    let good = full_backup(&repo, "vm", T0, &[("a", &img)]).await;
    // A backup that dies after writing chunks and an index, before the manifest.
    let rp = repo
        .begin_restore_point(
            "vm",
            "n",
            T0 + Duration::from_secs(60),
            None,
            WriteOptions::default(),
        )
        .await
        .unwrap();
    let mut w = rp.full_disk("a", img.len() as u64, json!(null)).unwrap();
    feed(&mut w, &image(3 * MIB, 4), 0, 3 * MIB, MIB).await;
    w.finish().await.unwrap();
    drop(rp); // crash: no commit, lock left behind
    assert_eq!(
        repo.list_restore_points(Some("vm")).await.unwrap(),
        vec![("vm".to_string(), good.id.clone())]
    );
    assert_eq!(
        repo.latest_restore_point("vm").await.unwrap().unwrap().id,
        good.id
    );
    assert!(
        mem.keys()
            .iter()
            .any(|k| k.starts_with("indexes/vm/20261120T010100Z/"))
    );
    let c = repo.check().await.unwrap();
    assert!(c.is_clean());
    assert_eq!(c.restore_points, 1);
}

#[tokio::test]
async fn prune_keeps_everything_referenced_and_frees_the_rest() {
    let mem = MemoryStorage::new();
    let repo = Repository::init(Arc::new(mem.clone()), opts(true))
        .await
        .unwrap();
    let imgs: Vec<Vec<u8>> = (0..4).map(|i| image(2 * MIB + 77, 100 + i)).collect();
    let mut ms = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        let t = T0 + Duration::from_secs(86400 * i as u64);
        ms.push(full_backup(&repo, "vm", t, &[("a", img)]).await);
    }
    // An interrupted backup leaves unreferenced chunks and an orphan index.
    let rp = repo
        .begin_restore_point(
            "vm",
            "n",
            T0 + Duration::from_secs(9 * 86400),
            None,
            WriteOptions::default(),
        )
        .await
        .unwrap();
    let mut w = rp.full_disk("a", 2 * MIB, json!(null)).unwrap();
    feed(&mut w, &image(2 * MIB, 555), 0, 2 * MIB, MIB).await;
    w.finish().await.unwrap();
    rp.abort().await.unwrap();

    let opts = PruneOptions {
        grace: Duration::from_secs(3600),
        ..PruneOptions::default()
    };
    let now = OffsetDateTime::now_utc();
    // Nothing unreferenced by a manifest goes before the grace period.
    let r = repo.prune(now, opts).await.unwrap();
    assert_eq!(r.deleted_chunks, 0);
    assert!(r.marked_chunks >= 1);
    assert_eq!(r.marked_indexes, 1);
    let r = repo
        .prune(now + Duration::from_secs(60), opts)
        .await
        .unwrap();
    assert!(r.sweep_deferred.unwrap().contains("grace"));

    // Forget the two oldest; keep the two newest.
    let points: Vec<RestorePointInfo> = ms
        .iter()
        .map(|m| RestorePointInfo {
            vm_uuid: m.vm_uuid.clone(),
            id: m.id.clone(),
            time: xenvault_repo::manifest::parse_rfc3339(&m.time).unwrap(),
            complete: true,
        })
        .collect();
    let plan = plan_retention(
        &points,
        &KeepOptions {
            last: 2,
            ..Default::default()
        },
        now,
    );
    let mut gone = repo.forget(&plan).await.unwrap();
    gone.sort();
    assert_eq!(gone, vec![ms[0].name(), ms[1].name()]);

    // A backup running at sweep time defers the sweep.
    let running = repo
        .begin_restore_point(
            "vm",
            "n",
            T0 + Duration::from_secs(10 * 86400),
            None,
            WriteOptions::default(),
        )
        .await
        .unwrap();
    let r = repo
        .prune_sweep(now + Duration::from_secs(7200), opts)
        .await
        .unwrap();
    assert!(
        r.sweep_deferred.unwrap().contains("locked"),
        "sweep waits for backups"
    );
    running.abort().await.unwrap();

    // After the grace period: the interrupted backup's chunks and index go.
    let r = repo
        .prune(now + Duration::from_secs(7200), opts)
        .await
        .unwrap();
    assert!(r.deleted_chunks >= 1);
    assert_eq!(r.deleted_indexes, 1);
    // The forgotten restore points' chunks were marked anew; sweep them later.
    assert!(r.marked_chunks >= 1);
    let r = repo
        .prune(now + Duration::from_secs(4 * 3600), opts)
        .await
        .unwrap();
    assert!(r.deleted_chunks >= 1);
    assert_eq!(r.rescued_chunks, 0);

    // Everything still referenced is intact and restores bit for bit.
    let v = repo.verify(VerifyOptions::default()).await.unwrap();
    assert!(v.is_clean(), "{:?}", v.damage);
    assert_eq!(v.restore_points, 2);
    for (m, img) in ms.iter().zip(&imgs).skip(2) {
        assert!(read_back(&repo, m, "a").await == *img);
    }
    // Only chunks of the two kept restore points remain.
    let mut referenced = std::collections::HashSet::new();
    for m in &ms[2..] {
        for id in repo.load_index(&m.disks[0].index).await.unwrap().ids {
            if !id.is_zero() {
                referenced.insert(id.object_key());
            }
        }
    }
    let stored: std::collections::HashSet<String> = mem
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("chunks/"))
        .collect();
    assert_eq!(stored, referenced);
}

#[tokio::test]
async fn a_marked_chunk_reused_before_the_sweep_is_kept() {
    let mem = MemoryStorage::new();
    let repo = Repository::init(Arc::new(mem.clone()), opts(false))
        .await
        .unwrap();
    let img = image(2 * MIB, 77);
    // Interrupted backup stores the chunks without a manifest.
    let rp = repo
        .begin_restore_point("vm", "n", T0, None, WriteOptions::default())
        .await
        .unwrap();
    let mut w = rp.full_disk("a", 2 * MIB, json!(null)).unwrap();
    feed(&mut w, &img, 0, 2 * MIB, MIB).await;
    w.finish().await.unwrap();
    rp.abort().await.unwrap();
    let opts = PruneOptions {
        grace: Duration::from_secs(60),
        ..PruneOptions::default()
    };
    let now = OffsetDateTime::now_utc();
    let (marked, _) = repo.prune_mark(now, opts).await.unwrap();
    assert!(marked >= 1);
    // The resumed backup reuses them (nothing new stored) and commits.
    let m = full_backup(&repo, "vm", T0 + Duration::from_secs(1), &[("a", &img)]).await;
    assert_eq!(m.disks[0].stats.new_chunks, 0);
    let r = repo
        .prune_sweep(now + Duration::from_secs(120), opts)
        .await
        .unwrap();
    assert_eq!(r.deleted_chunks, 0);
    assert_eq!(r.rescued_chunks, marked);
    assert!(read_back(&repo, &m, "a").await == img);
}

#[tokio::test]
async fn disks_are_written_concurrently_with_transient_storage_faults() {
    use xenvault_repo::storage::{Fault, RetryPolicy, Retrying};
    let mem = MemoryStorage::new();
    let retrying = Retrying::new(
        mem.clone(),
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        },
    );
    let repo = Repository::init(Arc::new(retrying), opts(true))
        .await
        .unwrap();
    let a = image(3 * MIB, 21);
    let b = image(4 * MIB + 3, 22);
    let rp = repo
        .begin_restore_point("vm", "n", T0, None, WriteOptions::default())
        .await
        .unwrap();
    let wa = rp.full_disk("a", a.len() as u64, json!(null)).unwrap();
    let wb = rp.full_disk("b", b.len() as u64, json!(null)).unwrap();
    mem.inject(Fault::Transient(3));
    let (a2, b2) = (a.clone(), b.clone());
    let ta = tokio::spawn(async move {
        let mut w = wa;
        feed(&mut w, &a2, 0, a2.len() as u64, 100_000).await;
        w.finish().await.unwrap()
    });
    let tb = tokio::spawn(async move {
        let mut w = wb;
        feed(&mut w, &b2, 0, b2.len() as u64, 256 * 1024).await;
        w.finish().await.unwrap()
    });
    ta.await.unwrap();
    tb.await.unwrap();
    let m = rp.commit(json!({}), json!({}), json!({})).await.unwrap();
    assert!(read_back(&repo, &m, "a").await == a);
    assert!(read_back(&repo, &m, "b").await == b);
}

#[tokio::test]
async fn verify_reads_a_deterministic_sample() {
    let mem = MemoryStorage::new();
    let repo = Repository::init(Arc::new(mem.clone()), opts(false))
        .await
        .unwrap();
    let img = image(12 * MIB, 31);
    full_backup(&repo, "vm", T0, &[("a", &img)]).await;
    let all = repo.verify(VerifyOptions::default()).await.unwrap();
    assert!(all.chunks_referenced >= 6, "{}", all.chunks_referenced);
    assert_eq!(all.chunks_verified, all.chunks_referenced);
    let half = VerifyOptions {
        sample: 0.5,
        seed: 7,
        parallel: 2,
    };
    let a = repo.verify(half).await.unwrap();
    let b = repo.verify(half).await.unwrap();
    assert_eq!(
        a.chunks_verified, b.chunks_verified,
        "same seed, same sample"
    );
    assert!(a.chunks_verified > 0 && a.chunks_verified < all.chunks_referenced);
    let none = repo
        .verify(VerifyOptions {
            sample: 0.0,
            ..half
        })
        .await
        .unwrap();
    assert_eq!(none.chunks_verified, 0);
}

#[tokio::test]
async fn a_backup_waits_for_a_prune_sweep_or_fails_naming_it() {
    let repo = Repository::init(Arc::new(MemoryStorage::new()), opts(false))
        .await
        .unwrap();
    let sweep = repo
        .lock(LockKind::Exclusive, "prune sweep", Duration::from_secs(600))
        .await
        .unwrap();
    let no_wait = WriteOptions {
        lock_wait: Duration::ZERO,
        ..WriteOptions::default()
    };
    let e = repo
        .begin_restore_point("vm", "n", T0, None, no_wait)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("prune sweep"), "{e}");
    let r2 = repo.clone();
    let waiting = tokio::spawn(async move {
        let wait = WriteOptions {
            lock_wait: Duration::from_secs(20),
            ..WriteOptions::default()
        };
        r2.begin_restore_point("vm", "n", T0, None, wait).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the backup waits while the sweep runs"
    );
    sweep.release().await.unwrap();
    let rp = waiting.await.unwrap().unwrap();
    rp.abort().await.unwrap();
}

/// `.tmp-*` files anywhere under `dir`.
fn temporaries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(temporaries(&e.path()));
        } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
            out.push(e.path());
        }
    }
    out
}

/// Local backend, ADR 0008: chunks are staged, then published in one batch at
/// a checkpoint, before a disk's index, and when a restore point is aborted;
/// another instance on the same directory (as after a crash) sees a chunk's name
/// only once it is published, and a prune sweep removes stale temporaries.
#[tokio::test]
async fn local_chunks_are_published_at_checkpoints_finish_and_abort() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStorage::new(dir.path()).unwrap();
    let other = LocalStorage::new(dir.path()).unwrap();
    let repo = Repository::init(Arc::new(local.clone()), opts(true))
        .await
        .unwrap();
    let size = 6 * MIB;
    let img: Vec<u8> = (0..size)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect();
    let chunks = |s: &LocalStorage| {
        let s = s.clone();
        async move { s.list("chunks/").await.unwrap().len() }
    };

    let rp = repo
        .begin_restore_point("vm", "n", T0, None, WriteOptions::default())
        .await
        .unwrap();
    let mut w = rp.full_disk("a", size, json!(null)).unwrap();
    feed(&mut w, &img, 0, 3 * MIB, MIB).await;
    let cp = w.checkpoint().await.unwrap();
    assert_eq!(cp.done, 3 * MIB);
    // Published: durable names, seen by any instance; nothing left staged.
    assert_eq!(chunks(&other).await, 3);
    assert_eq!(local.staged_count(), 0);
    assert!(temporaries(dir.path()).is_empty());
    for id in &cp.index.ids[..3] {
        other.stat(&id.object_key()).await.unwrap();
    }
    feed(&mut w, &img, 3 * MIB, size, MIB).await;
    let entry = w.finish().await.unwrap();
    assert_eq!(entry.stats.new_chunks, 6);
    assert_eq!(chunks(&other).await, 6, "published before the index");
    let m = rp.commit(records(), json!({}), json!({})).await.unwrap();
    assert!(read_back(&repo, &m, "a").await == img);

    // An aborted restore point: its staged chunks are published (kept for reuse).
    let img2: Vec<u8> = img.iter().map(|b| b ^ 0x5A).collect();
    let rp = repo
        .begin_restore_point(
            "vm",
            "n",
            T0 + Duration::from_secs(60),
            None,
            WriteOptions::default(),
        )
        .await
        .unwrap();
    let mut w = rp.full_disk("a", size, json!(null)).unwrap();
    feed(&mut w, &img2, 0, 2 * MIB, MIB).await;
    // Let the writer's tasks stage both chunks (they run in the background).
    for _ in 0..500 {
        if local.staged_count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(local.staged_count(), 2, "two chunks staged");
    assert_eq!(temporaries(dir.path()).len(), 2);
    assert_eq!(chunks(&other).await, 6, "staged chunks have no name yet");
    drop(w);
    rp.abort().await.unwrap();
    assert_eq!(chunks(&other).await, 8);
    assert!(temporaries(dir.path()).is_empty());

    // A crashed run's temporaries: removed by the sweep once older than the grace.
    std::fs::write(dir.path().join("chunks/.tmp-999-dead"), b"torn").unwrap();
    let popts = PruneOptions {
        grace: Duration::from_secs(3600),
        ..PruneOptions::default()
    };
    let now = OffsetDateTime::now_utc();
    repo.prune(now, popts).await.unwrap();
    let r = repo
        .prune(now + Duration::from_secs(60), popts)
        .await
        .unwrap();
    assert!(r.sweep_deferred.is_some());
    assert_eq!(temporaries(dir.path()).len(), 1, "no sweep yet: kept");
    let r = repo
        .prune(now + Duration::from_secs(7200), popts)
        .await
        .unwrap();
    assert!(r.sweep_deferred.is_none(), "{:?}", r.sweep_deferred);
    assert_eq!(r.deleted_temporaries, 1);
    assert_eq!(r.deleted_chunks, 2, "the aborted run's chunks");
    assert!(temporaries(dir.path()).is_empty());
    assert!(read_back(&repo, &m, "a").await == img);
}

/// Prune beside running backups, on the local backend: a pruner forgets every
/// restore point but the newest and prunes with no grace period, round after
/// round, while a writer commits restore points whose chunks recur from
/// forgotten ones (so backups reuse chunks that marks list as unreferenced).
/// Sweeps that meet a running backup wait for it; nothing any restore point
/// references is ever deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_runs_safely_beside_running_backups() {
    const POINTS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let repo = Repository::init(storage, opts(true)).await.unwrap();
    // Point i's chunk j is piece (i + j) % 7: chunks come back after their
    // restore point was forgotten.
    let pieces: Vec<Vec<u8>> = (0..7).map(|s| image(MIB, 900 + s)).collect();
    let disk = |i: usize| -> Vec<u8> {
        let mut d: Vec<u8> = (0..4).flat_map(|j| pieces[(i + j) % 7].clone()).collect();
        d.extend(image(77, 5000 + i as u64));
        d
    };
    let images: Vec<Vec<u8>> = (0..POINTS).map(disk).collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let writer = {
        let (repo, done, images, rounds) =
            (repo.clone(), done.clone(), images.clone(), rounds.clone());
        tokio::spawn(async move {
            let mut committed = std::collections::BTreeMap::new();
            for (i, img) in images.iter().enumerate() {
                let t = T0 + Duration::from_secs(i as u64);
                let m = if i == POINTS / 2 {
                    // Held open until the pruner has run two rounds beside
                    // it: a sweep meets this running backup for sure.
                    let rp = repo
                        .begin_restore_point("vm", "web", t, None, WriteOptions::default())
                        .await
                        .unwrap();
                    let size = img.len() as u64;
                    let mut w = rp.full_disk("a", size, json!({"vdi": "a"})).unwrap();
                    feed(&mut w, img, 0, size, 300 * 1024 + 7).await;
                    let seen = rounds.load(std::sync::atomic::Ordering::SeqCst);
                    while rounds.load(std::sync::atomic::Ordering::SeqCst) < seen + 2 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    w.finish().await.unwrap();
                    rp.commit(records(), json!({"ova": "xml"}), json!({"job": "t"}))
                        .await
                        .unwrap()
                } else {
                    full_backup(&repo, "vm", t, &[("a", img)]).await
                };
                committed.insert(m.id.clone(), i);
                // A gap between backups, where sweeps can run.
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            committed
        })
    };
    let no_grace = PruneOptions {
        grace: Duration::ZERO,
        ..PruneOptions::default()
    };
    let (mut deleted, mut waited_for_backup) = (0, 0);
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        forget_all_but_the_newest(&repo).await;
        let r = repo
            .prune(OffsetDateTime::now_utc(), no_grace)
            .await
            .unwrap();
        rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        deleted += r.deleted_chunks;
        waited_for_backup += usize::from(
            r.sweep_deferred
                .as_deref()
                .is_some_and(|why| why.contains("locked")),
        );
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let committed = writer.await.unwrap();
    assert_eq!(committed.len(), POINTS);
    assert!(
        waited_for_backup > 0,
        "a sweep met the backup held open ({rounds:?} rounds)"
    );

    // Everything still listed is whole; rounds after the backups (the last
    // forgotten points' chunks go) leave it so.
    forget_all_but_the_newest(&repo).await;
    for round in 0..3 {
        let report = repo.check().await.unwrap();
        assert!(report.is_clean(), "round {round}: {:?}", report.damage);
        let listed = repo.list_restore_points(Some("vm")).await.unwrap();
        assert!(!listed.is_empty());
        assert!(listed.iter().any(|(_, id)| committed[id] == POINTS - 1));
        for (vm, id) in listed {
            let m = repo.load_manifest(&vm, &id).await.unwrap();
            let want = &images[committed[&id]];
            assert!(
                &read_back(&repo, &m, "a").await == want,
                "round {round}: restore point {id} changed"
            );
        }
        deleted += repo
            .prune(OffsetDateTime::now_utc(), no_grace)
            .await
            .unwrap()
            .deleted_chunks;
    }
    assert!(deleted > 0, "forgotten chunks were freed");
}

/// Forgets every restore point of the VM `vm` but the newest.
async fn forget_all_but_the_newest(repo: &Repository) {
    let mut points = Vec::new();
    for (vm, id) in repo.list_restore_points(Some("vm")).await.unwrap() {
        let m = repo.load_manifest(&vm, &id).await.unwrap();
        points.push(RestorePointInfo {
            vm_uuid: vm,
            id,
            time: xenvault_repo::manifest::parse_rfc3339(&m.time).unwrap(),
            complete: true,
        });
    }
    let keep_newest = KeepOptions {
        last: 1,
        ..Default::default()
    };
    let plan = plan_retention(&points, &keep_newest, OffsetDateTime::now_utc());
    repo.forget(&plan).await.unwrap();
}

/// Replaces the object `key` of `mem` with `bytes`.
async fn overwrite(mem: &MemoryStorage, key: &str, bytes: Vec<u8>) {
    mem.delete(key).await.unwrap();
    mem.put_if_absent(key, bytes.into()).await.unwrap();
}

/// `check` reads every manifest and index: an unreadable manifest, a missing
/// index and an index of another size each break their restore point, named
/// with the object; the untouched restore point stays restorable.
#[tokio::test]
async fn check_names_damaged_manifests_and_indexes() {
    let mem = MemoryStorage::new();
    let repo = Repository::init(Arc::new(mem.clone()), opts(false))
        .await
        .unwrap();
    let garbled = full_backup(&repo, "vm-a", T0, &[("a", &image(2 * MIB, 1))]).await;
    let missing = full_backup(&repo, "vm-b", T0, &[("b", &image(2 * MIB, 2))]).await;
    let resized = full_backup(&repo, "vm-c", T0, &[("c", &image(2 * MIB, 3))]).await;
    let intact_img = image(MIB, 4);
    let intact = full_backup(&repo, "vm-d", T0, &[("d", &intact_img)]).await;
    assert!(repo.check().await.unwrap().is_clean());

    let manifest = xenvault_repo::manifest::manifest_key("vm-a", &garbled.id);
    overwrite(&mem, &manifest, b"{not json".to_vec()).await;
    mem.delete(&missing.disks[0].index).await.unwrap();
    // vm-d's index (a 1 MiB disk) where vm-c's (2 MiB) was.
    let other = mem.get(&intact.disks[0].index).await.unwrap();
    overwrite(&mem, &resized.disks[0].index, other.to_vec()).await;

    let report = repo.check().await.unwrap();
    assert_eq!(report.restore_points, 4);
    let damage_of = |object: &str| {
        report
            .damage
            .iter()
            .find(|d| d.object == object)
            .unwrap_or_else(|| panic!("{object} not named in {:#?}", report.damage))
    };
    let d = damage_of(&manifest);
    assert_eq!(d.restore_points, vec![format!("vm-a/{}", garbled.id)]);
    let d = damage_of(&missing.disks[0].index);
    assert_eq!(d.restore_points, vec![format!("vm-b/{}", missing.id)]);
    let d = damage_of(&resized.disks[0].index);
    assert_eq!(d.restore_points, vec![format!("vm-c/{}", resized.id)]);
    assert_eq!(d.problem, "index size differs from the manifest");
    assert_eq!(
        report.broken_restore_points(),
        vec![
            format!("vm-a/{}", garbled.id),
            format!("vm-b/{}", missing.id),
            format!("vm-c/{}", resized.id),
        ]
    );
    assert!(read_back(&repo, &intact, "d").await == intact_img);
}

/// A restore fetches chunks in parallel: with a store whose every `get`
/// takes 20 ms, reading a disk of 12 chunks with `parallel = 4` has 4 gets in
/// flight at once (and 1 with `parallel = 1`), and returns the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_are_fetched_in_parallel() {
    let mem = MemoryStorage::new();
    let repo = Repository::init(Arc::new(mem.clone()), opts(true))
        .await
        .unwrap();
    let img = image(12 * MIB, 31);
    let m = full_backup(&repo, "vm", T0, &[("a", &img)]).await;
    let data_chunks = repo
        .load_index(&m.disks[0].index)
        .await
        .unwrap()
        .ids
        .iter()
        .filter(|c| !c.is_zero())
        .count();
    assert!(data_chunks >= 8, "{data_chunks} data chunks");
    mem.set_get_latency(Duration::from_millis(20));
    for parallel in [1, 4] {
        let repo = Repository::open(Arc::new(mem.clone()), Some(b"correct horse"))
            .await
            .unwrap();
        mem.take_most_gets_in_flight();
        assert!(read_back_with(&repo, &m, "a", parallel).await == img);
        let most = mem.take_most_gets_in_flight();
        if parallel == 1 {
            assert_eq!(most, 1, "one chunk at a time");
        } else {
            assert_eq!(most, 4, "four chunks at a time");
        }
    }
}
