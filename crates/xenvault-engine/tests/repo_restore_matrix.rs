//! Every repository restore path, bit for bit, for plain and encrypted
//! repositories on every backend: the local directory, S3 (s3s-fs on
//! 127.0.0.1) and SFTP (OpenSSH `sshd` on 127.0.0.1).
//!
//! For each backend and each of plain and encrypted, the real repository job
//! backs a `xapi-sim` VM up in full, the guest writes, and the job backs it
//! up again through CBT. Both restore points are then restored:
//! - to a file, as raw, VHD (read back by `qemu-img`) and XVA;
//! - as a whole VM, rebuilt as an XVA through `/import` and as VDIs through
//!   `/import_raw_vdi`, into the same pool and into another pool on a chosen
//!   SR;
//! - as one disk into a new VDI, raw and VHD;
//! - written into the existing live VDI, which sends only the chunks that
//!   differ.
//!
//! Each result is compared with the pool's disk at the time of its backup.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

#[path = "../../xenvault-repo/tests/backend_support/mod.rs"]
mod backend_support;
mod backup_support;
mod repo_restore_support;

use std::io::Read as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use backend_support::{Server, free_port, sshd, tool, user_tool_dirs};
use backup_support::{Sim, vdi_sha, write_config};
use repo_restore_support::{PASSWORD, init_repo};
use sha2::{Digest, Sha256};
use xenvault_engine::job::{self, ExitStatus, RunOptions};
use xenvault_engine::restore::repo::{
    FileFormat, FileRestoreOptions, IntoVdiOptions, RepoDiskRestoreOptions, RepoVmRestoreOptions,
    UploadFormat, VmRestoreMethod, find_repo_point, list_repo_points, restore_repo_disk,
    restore_repo_disk_into, restore_repo_to_file, restore_repo_vm,
};
use xenvault_engine::restore::{DiskSelector, PoolConnection, no_progress};
use xenvault_repo::{Manifest, Repository};
use xenvault_types::config::{CbtMode, S3Config, Secret, TargetConfig, TargetKind};

const SIM_ARGS: &[&str] = &["--vms", "1", "--disk-size", "8M", "--written", "30%"];
const ACCESS: &str = "xenvaulttest";
const SECRET: &str = "xenvault-test-secret-key";

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The default SR's uuid of a pool.
async fn default_sr(pool: &PoolConnection) -> String {
    let (_, rec) = pool.session.pool_record().await.unwrap();
    pool.session
        .sr()
        .get_record(&rec.default_sr)
        .await
        .unwrap()
        .uuid
}

/// The disk of a one-disk XVA, decoded.
fn xva_disk(path: &Path) -> Vec<u8> {
    use xenvault_formats::xva::{XvaDecoder, XvaEvent};
    use xenvault_types::ExtentData;
    let mut dec = XvaDecoder::new();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::new();
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for ev in dec.feed(&buf[..n]).unwrap() {
            if let XvaEvent::Extent(e) = ev {
                let end = e.end() as usize;
                out.resize(out.len().max(end), 0);
                if let ExtentData::Data(d) = e.data {
                    out[e.offset as usize..end].copy_from_slice(&d);
                }
            }
        }
    }
    dec.finish().unwrap();
    out
}

/// A file restore of `point`'s disk, read back as raw bytes.
async fn file_bytes(
    repo: &Repository,
    point: &Manifest,
    format: FileFormat,
    dir: &Path,
) -> Vec<u8> {
    let path = dir.join(format!("{}.{format:?}", point.id));
    let mut o = FileRestoreOptions::new(&path, format);
    o.disk = Some(DiskSelector::Position("0".into()));
    restore_repo_to_file(repo, point, &o, no_progress())
        .await
        .unwrap();
    let bytes = match format {
        FileFormat::Raw => std::fs::read(&path).unwrap(),
        FileFormat::Vhd => {
            let raw = dir.join("from-vhd.raw");
            let st = Command::new("qemu-img")
                .args(["convert", "-f", "vpc", "-O", "raw"])
                .arg(&path)
                .arg(&raw)
                .status()
                .expect("qemu-img");
            assert!(st.success(), "qemu-img cannot read the VHD restore");
            let bytes = std::fs::read(&raw).unwrap();
            std::fs::remove_file(&raw).unwrap();
            bytes
        }
        FileFormat::Xva => xva_disk(&path),
    };
    std::fs::remove_file(&path).unwrap();
    bytes
}

/// Initialises `target`'s repository, runs the whole matrix against it.
async fn matrix(mut target: TargetConfig, encrypted: bool) {
    let what = format!(
        "{} ({})",
        target.url.clone().unwrap_or_default(),
        if encrypted { "encrypted" } else { "plain" }
    );
    let storage = xenvault_engine::repository::open_storage(&target)
        .await
        .unwrap();
    init_repo(storage, encrypted).await;
    target.password = encrypted.then(|| Secret::new(PASSWORD));

    let sim = Sim::start(SIM_ARGS);
    let other = Sim::start(&["--vms", "1", "--disk-size", "4M"]);
    let pool = sim.pool().await;
    let other_pool = other.pool().await;
    let other_sr = default_sr(&other_pool).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&sim, dir.path(), "all-vms = true", "");
    let mut config = xenvault_engine::config::load(&path).unwrap();
    config.targets.insert("archive".into(), target.clone());
    config.jobs.get_mut("nightly").unwrap().cbt = CbtMode::Enable;

    // A full backup, guest writes, an incremental through CBT.
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{what}: {:#?}", run.report);
    let repo = xenvault_engine::repository::open_repository(&target)
        .await
        .unwrap();
    let vm = run.report.vms[0].clone();
    let first = find_repo_point(&repo, &vm.uuid, None).await.unwrap();
    let key = first.disks[0].key.clone();
    let sha_first = vdi_sha(&pool, &key).await;
    sim.control(
        "guest-write",
        &serde_json::json!({"vdi": key, "seed": 11, "blocks": 3}),
    );
    let sha_second = vdi_sha(&pool, &key).await;
    assert_ne!(sha_first, sha_second);
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{what}: {:#?}", run.report);
    let listed = list_repo_points(&repo, Some(&vm.uuid)).await.unwrap();
    assert_eq!(listed.len(), 2, "{what}");
    assert_eq!(listed[0].parent.as_deref(), Some(first.id.as_str()));
    assert_eq!(
        listed[0].disks[0].read.as_deref(),
        Some("nbd-cbt"),
        "{what}"
    );
    let second = find_repo_point(&repo, &vm.uuid, Some(&listed[0].id))
        .await
        .unwrap();
    let points = [(&first, &sha_first), (&second, &sha_second)];

    // To a file, each format.
    let out = tempfile::tempdir().unwrap();
    for (point, want) in points {
        for format in [FileFormat::Raw, FileFormat::Vhd, FileFormat::Xva] {
            let got = file_bytes(&repo, point, format, out.path()).await;
            assert!(
                &sha(&got) == want,
                "{what}: {format:?} file restore of {} differs",
                point.id
            );
        }
    }

    // Whole VMs: each method, into this pool and into another pool's SR.
    for (point, want, method, into_other) in [
        (&first, &sha_first, VmRestoreMethod::Xva, false),
        (&first, &sha_first, VmRestoreMethod::RawVdis, true),
        (&second, &sha_second, VmRestoreMethod::Xva, true),
        (&second, &sha_second, VmRestoreMethod::RawVdis, false),
    ] {
        let (dest, sr) = if into_other {
            (&other_pool, Some(other_sr.clone()))
        } else {
            (&pool, None)
        };
        let options = RepoVmRestoreOptions {
            method,
            sr: sr.clone(),
            ..RepoVmRestoreOptions::default()
        };
        let restored = restore_repo_vm(dest, &repo, point, &options, no_progress())
            .await
            .unwrap();
        if let Some(sr) = &sr {
            assert_eq!(&restored.sr_uuid, sr, "{what}: {method:?} SR");
        }
        assert_eq!(restored.disks.len(), 1);
        assert_eq!(
            &vdi_sha(dest, &restored.disks[0].vdi_uuid).await,
            want,
            "{what}: {method:?} VM restore of {} differs",
            point.id
        );
    }

    // One disk into a new VDI, each upload format.
    for (point, want, format) in [
        (&first, &sha_first, UploadFormat::Vhd),
        (&second, &sha_second, UploadFormat::Raw),
    ] {
        let mut options = RepoDiskRestoreOptions::new(DiskSelector::Position("0".into()));
        options.format = format;
        let restored = restore_repo_disk(&pool, &repo, point, &options, no_progress())
            .await
            .unwrap();
        assert_eq!(
            &vdi_sha(&pool, &restored.vdi_uuid).await,
            want,
            "{what}: {format:?} disk restore of {} differs",
            point.id
        );
    }

    // Into the live VDI (its VM halted first): the older point sends only
    // the chunks the guest changed, the newer one brings them back.
    let vm_ref = pool.session.vm().get_by_uuid(&vm.uuid).await.unwrap();
    let rec = pool.session.vm().get_record(&vm_ref).await.unwrap();
    if rec.power_state != xenvault_xapi::records::PowerState::Halted {
        pool.session.vm().hard_shutdown(&vm_ref).await.unwrap();
    }
    for (point, want) in points {
        let options = IntoVdiOptions::new(DiskSelector::Position("0".into()), &key);
        let r = restore_repo_disk_into(&pool, &repo, point, &options, no_progress())
            .await
            .unwrap();
        assert!(
            r.chunks_written >= 1 && r.chunks_written <= 3,
            "{what}: 3 guest blocks change 1 to 3 chunks: {r:?}"
        );
        assert!(r.chunks_written < r.chunks_compared, "{what}: {r:?}");
        assert_eq!(
            &vdi_sha(&pool, &key).await,
            want,
            "{what}: restore of {} into the live VDI differs",
            point.id
        );
    }
}

/// Runs the matrix for `target` plain and encrypted, each under a deadline.
async fn plain_and_encrypted(make: impl Fn(&str) -> TargetConfig) {
    for (encrypted, sub) in [(false, "plain"), (true, "encrypted")] {
        tokio::time::timeout(Duration::from_secs(240), matrix(make(sub), encrypted))
            .await
            .unwrap_or_else(|_| panic!("the {sub} matrix hung"));
    }
}

fn repository_target() -> TargetConfig {
    let mut t = TargetConfig::archive("archive", "");
    t.kind = TargetKind::Repository;
    t
}

fn qemu_img_or_skip() -> bool {
    tool("qemu-img", &[], "apt-get install qemu-utils").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_restore_path_from_a_local_repository() {
    if !qemu_img_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    plain_and_encrypted(|sub| {
        let mut t = repository_target();
        t.path = dir.path().join(sub);
        t
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_restore_path_from_an_s3_repository() {
    let Some(bin) = tool(
        "s3s-fs",
        &user_tool_dirs(),
        "cargo install s3s-fs --version 0.14.1 --features binary --locked",
    ) else {
        return;
    };
    if !qemu_img_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("matrixbucket")).unwrap();
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS, "--secret-key", SECRET])
        .arg(&data);
    let _server = Server::start("s3s-fs", cmd, port, &dir.path().join("s3s-fs.log"));
    plain_and_encrypted(|sub| {
        let mut t = repository_target();
        t.url = Some(format!("s3://matrixbucket/{sub}"));
        t.s3 = Some(S3Config {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            region: "us-east-1".into(),
            virtual_host_style: false,
            access_key_id: Some(ACCESS.into()),
            secret_access_key_file: None,
            secret_access_key_env: None,
            secret_access_key: Some(Secret::new(SECRET)),
        });
        t
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_restore_path_from_an_sftp_repository() {
    let Some(sshd) = sshd() else {
        return;
    };
    if !qemu_img_or_skip() {
        return;
    }
    plain_and_encrypted(|sub| sshd.target(sub)).await;
}
