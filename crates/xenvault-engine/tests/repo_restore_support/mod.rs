//! Helpers of the `repo_restore_*` tests: repositories (plain or
//! encrypted) on a local directory, restore points written directly with
//! the repository API from known bytes, outside tools.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use xenvault_repo::storage::{LocalStorage, Storage};
use xenvault_repo::{
    CipherKind, EncryptionInit, InitOptions, KdfParams, Manifest, Repository, WriteOptions,
};
use xenvault_types::Extent;

/// The password of the encrypted repositories these helpers make.
pub const PASSWORD: &str = "pw";

/// A repository in `dir` (plain, or encrypted with [`PASSWORD`]).
pub async fn new_repo(dir: &Path, encrypted: bool) -> Repository {
    init_repo(Arc::new(LocalStorage::new(dir).unwrap()), encrypted).await
}

/// A repository on `storage` (plain, or encrypted with [`PASSWORD`], with
/// the fast test key derivation).
pub async fn init_repo(storage: Arc<dyn Storage>, encrypted: bool) -> Repository {
    let encryption = encrypted.then(|| EncryptionInit {
        password: PASSWORD.as_bytes().to_vec(),
        label: "test".into(),
        cipher: CipherKind::Aes256Gcm,
        kdf: KdfParams::insecure_for_tests(),
    });
    Repository::init(
        storage,
        InitOptions {
            encryption,
            ..InitOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Reopens the repository in `dir` (the password of [`new_repo`]).
pub async fn open_repo(dir: &Path) -> Repository {
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir).unwrap());
    Repository::open(storage, Some(PASSWORD.as_bytes()))
        .await
        .unwrap()
}

/// Deterministic bytes that do not compress to nothing.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A disk of `size` bytes (a multiple of 512): per MiB, data, zeros, or
/// half and half, with a data tail.
pub fn pattern_disk(size: usize, seed: u64) -> Vec<u8> {
    let mib = 1 << 20;
    let mut d = vec![0u8; size];
    let mut off = 0;
    let mut i = 0u64;
    while off < size {
        let end = (off + mib).min(size);
        match i % 4 {
            0 | 3 => d[off..end].copy_from_slice(&noise(seed * 1000 + i, end - off)),
            2 => {
                let half = off + (end - off) / 2;
                d[half..end].copy_from_slice(&noise(seed * 1000 + i, end - half));
            }
            _ => {}
        }
        off = end;
        i += 1;
    }
    let tail = size.saturating_sub(4096);
    d[tail..].copy_from_slice(&noise(seed + 77, size - tail));
    d
}

/// One disk to write into a restore point.
pub struct TestDisk {
    /// Its key.
    pub key: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its `DiskEntry.meta`.
    pub meta: serde_json::Value,
}

/// Writes a restore point of VM `vm_uuid` from whole disks (fed in 1 MiB
/// extents, zero pieces left out as a backup reading allocation does).
pub async fn write_point(
    repo: &Repository,
    vm_uuid: &str,
    vm_name: &str,
    time: time::OffsetDateTime,
    disks: &[TestDisk],
    vm_records: serde_json::Value,
) -> Manifest {
    let w = repo
        .begin_restore_point(vm_uuid, vm_name, time, None, WriteOptions::default())
        .await
        .unwrap();
    for d in disks {
        let mut dw = w
            .full_disk(&d.key, d.bytes.len() as u64, d.meta.clone())
            .unwrap();
        for (i, piece) in d.bytes.chunks(1 << 20).enumerate() {
            if piece.iter().all(|b| *b == 0) {
                continue;
            }
            dw.write_extent(Extent::data((i << 20) as u64, piece.to_vec()))
                .await
                .unwrap();
        }
        dw.finish().await.unwrap();
    }
    w.commit(
        vm_records,
        serde_json::json!({"format": "xenvault-ova-from-records", "version": 1}),
        serde_json::json!({"job": "test-job", "run_id": "run-1", "pool": "test"}),
    )
    .await
    .unwrap()
}

/// The `meta` a backup writes for a disk.
pub fn disk_meta(
    userdevice: &str,
    snapshot_vdi_uuid: &str,
    source_vdi_uuid: &str,
    name: &str,
    size: u64,
) -> serde_json::Value {
    serde_json::json!({
        "disk": {
            "index": userdevice.parse::<usize>().unwrap_or(0),
            "vdi_uuid": snapshot_vdi_uuid,
            "source_vdi_uuid": source_vdi_uuid,
            "name": name,
            "virtual_size": size,
            "userdevice": userdevice,
            "bootable": userdevice == "0",
            "xva_id": null,
        },
        "snapshot_vdi_uuid": snapshot_vdi_uuid,
        "read": "test",
    })
}

/// True when `tool` runs; false (loudly) when it is missing and CI is not
/// set; a panic when it is missing under `CI=true`.
pub fn have_tool(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required (CI=true) but missing: run scripts/install-test-deps.sh");
        }
        eprintln!("!!! {tool} is missing: this part of the test is SKIPPED");
    }
    ok
}

/// Flips a byte in the middle of a stored chunk object (plain or
/// encrypted): the object is found under `<dir>/chunks/`. Returns its key.
pub fn damage_a_chunk(dir: &Path, id_hex: &str) -> String {
    let key = format!("chunks/{}/{}", &id_hex[..2], id_hex);
    let path = dir.join(&key);
    let mut bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("no chunk object {}: {e}", path.display()));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5A;
    std::fs::write(&path, bytes).unwrap();
    key
}
