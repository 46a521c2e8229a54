//! Backups into a deduplicating repository (engine level) against a real
//! `xapi-sim`: restore points that read back bit for bit (plain and
//! encrypted), deduplication on the next run, only allocated data read over
//! NBD, the VHD fallback without NBD, retention, and faults that leave no
//! restore point and no snapshot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup_support;

use std::path::Path;
use std::sync::Arc;

use backup_support::{Sim, write_config};
use futures::StreamExt as _;
use xenvault_engine::job::{self, ExitStatus, RunOptions};
use xenvault_repo::storage::LocalStorage;
use xenvault_repo::{CipherKind, EncryptionInit, InitOptions, KdfParams, Manifest, Repository};
use xenvault_types::ExtentData;
use xenvault_types::config::{Config, RetentionConfig, Secret, TargetKind, VmOverride};
use xenvault_types::report::{Outcome, VmReport};
use xenvault_xapi::http::{HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::tls::TlsPolicy;

const PASSWORD: &str = "correct horse battery staple";

async fn session(sim: &Sim) -> Session {
    Client::connect(
        &sim.s("https_url"),
        Credentials::new(sim.s("user"), sim.s("password")),
        TlsPolicy::Pinned(sim.s("fingerprint").parse().unwrap()),
    )
    .await
    .unwrap()
}

/// (snapshot VMs, snapshot VDIs) on the pool.
async fn temporaries(s: &Session) -> (usize, usize) {
    let vms = s.vm().get_all_records().await.unwrap();
    let vdis = s.vdi().get_all_records().await.unwrap();
    (
        vms.values().filter(|v| v.is_a_snapshot).count(),
        vdis.values().filter(|v| v.is_a_snapshot).count(),
    )
}

async fn init_repo(path: &Path, encrypted: bool) -> Repository {
    let storage = Arc::new(LocalStorage::new(path).unwrap());
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

async fn open_repo(path: &Path, encrypted: bool) -> Repository {
    let storage = Arc::new(LocalStorage::new(path).unwrap());
    Repository::open(storage, encrypted.then_some(PASSWORD.as_bytes()))
        .await
        .unwrap()
}

/// The simulator's configuration with the job's target turned into the
/// repository at `<dir>/repo`.
fn repo_config(sim: &Sim, dir: &Path, job_lines: &str, password: Option<&str>) -> Config {
    let path = write_config(sim, dir, job_lines, "");
    let mut config = xenvault_engine::config::load(&path).unwrap();
    let t = config.targets.get_mut("archive").unwrap();
    t.kind = TargetKind::Repository;
    t.path = dir.join("repo");
    t.password = password.map(Secret::new);
    config
}

/// The whole content of a VDI, as the pool exports it raw.
async fn pool_disk(s: &Session, vdi_uuid: &str) -> Vec<u8> {
    let transfer = HttpTransfer::with_client(s.http_client(), TransferOptions::default());
    let url = handler_url(
        &s.base_url(),
        "/export_raw_vdi",
        s.session_ref().expose(),
        None,
        &[("vdi", vdi_uuid), ("format", "raw")],
    );
    let d = transfer.get(url).await.unwrap();
    let mut body = d.body;
    let mut out = Vec::new();
    while let Some(piece) = body.next().await {
        out.extend_from_slice(&piece.unwrap());
    }
    out
}

/// The whole content of a disk of a restore point.
async fn repo_disk(repo: &Repository, m: &Manifest, key: &str) -> Vec<u8> {
    let size = m.disk(key).unwrap().size;
    let mut out = vec![0u8; size as usize];
    let mut r = repo.read_disk(m, key, 4).await.unwrap();
    while let Some(e) = r.next_extent().await {
        let e = e.unwrap();
        if let ExtentData::Data(bytes) = &e.data {
            out[e.offset as usize..e.offset as usize + bytes.len()].copy_from_slice(bytes);
        }
    }
    out
}

async fn manifests(repo: &Repository, vm_uuid: &str) -> Vec<Manifest> {
    let mut out = Vec::new();
    for (vm, id) in repo.list_restore_points(Some(vm_uuid)).await.unwrap() {
        out.push(repo.load_manifest(&vm, &id).await.unwrap());
    }
    out
}

/// Every disk of the restore point equals the live VDI it names (the disk key
/// is the live VDI's uuid), and the manifest has the contract's layout.
async fn assert_round_trip(s: &Session, repo: &Repository, m: &Manifest, vm: &VmReport) {
    assert_eq!(m.vm_uuid, vm.uuid);
    assert_eq!(m.vm_name, vm.name);
    assert_eq!(m.xva["format"], "xenvault-ova-from-records");
    assert_eq!(m.labels["job"], "nightly");
    assert!(
        m.labels["snapshot_uuid"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );
    assert_eq!(m.vm_records["format"], "xenvault-vm-records");
    assert_eq!(m.vm_records["vm_uuid"], vm.uuid.as_str());
    assert!(!m.disks.is_empty());
    for d in &m.disks {
        assert_eq!(d.meta["disk"]["source_vdi_uuid"], d.key.as_str());
        assert!(d.meta["snapshot_vdi_uuid"].as_str().is_some());
        let live = pool_disk(s, &d.key).await;
        let stored = repo_disk(repo, m, &d.key).await;
        assert_eq!(live.len() as u64, d.size);
        assert!(live == stored, "disk {} of {} differs", d.key, vm.name);
    }
}

async fn stats(sim: &Sim) -> serde_json::Value {
    sim.control_get("stats")
}

fn nbd_bytes(stats: &serde_json::Value) -> u64 {
    stats["nbd"]["bytes"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backups_round_trip_and_the_second_run_deduplicates() {
    let sim = Sim::start(&["--vms", "2", "--disk-size", "4M", "--written", "30%"]);
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), false).await;
    let config = repo_config(&sim, dir.path(), "all-vms = true", None);
    let s = session(&sim).await;

    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
    assert_eq!(run.report.vms.len(), 2);
    // Each VM's snapshot stays as the next incremental's base.
    assert_eq!(temporaries(&s).await, (2, 2));
    for vm in &run.report.vms {
        assert_eq!(vm.outcome, Outcome::Succeeded, "{vm:?}");
        let st = vm.repository.as_ref().unwrap();
        assert!(st.new_chunks > 0, "{st:?}");
        assert!(st.bytes_read > 0 && st.bytes_stored > 0, "{st:?}");
        assert_eq!(st.disks.len(), 1);
        assert_eq!(st.disks[0].method, "nbd-full");
        assert!(!st.disks[0].incremental);
        let ms = manifests(&repo, &vm.uuid).await;
        assert_eq!(ms.len(), 1);
        assert_eq!(st.restore_point, format!("{}/{}", vm.uuid, ms[0].id));
        assert_eq!(ms[0].disks[0].meta["read"], "nbd-full");
        assert_round_trip(&s, &repo, &ms[0], vm).await;
    }
    // The log and JSON report name the repository counters.
    let log = std::fs::read_to_string(run.log_path.unwrap()).unwrap();
    assert!(log.contains("nbd-full"), "{log}");
    let json = std::fs::read_to_string(run.json_path.unwrap()).unwrap();
    assert!(json.contains("\"new_chunks\""), "{json}");

    // Nothing changed on the pool: the second run stores no new chunk
    // (whatever method the incremental logic picks).
    let run2 = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run2.exit, ExitStatus::Success, "{:#?}", run2.report);
    for vm in &run2.report.vms {
        let st = vm.repository.as_ref().unwrap();
        assert_eq!(st.new_chunks, 0, "{st:?}");
        assert_eq!(st.bytes_stored, 0, "{st:?}");
        let ms = manifests(&repo, &vm.uuid).await;
        assert_eq!(ms.len(), 2, "{vm:?}");
        assert!(ms[0].id < ms[1].id);
        assert_round_trip(&s, &repo, &ms[1], vm).await;
    }
    // The superseded bases are gone, the new ones kept.
    assert_eq!(temporaries(&s).await, (2, 2));

    // A full read of the same data (a fresh state directory: no kept base)
    // deduplicates every chunk against the first run's.
    let mut fresh = config.clone();
    fresh.state_dir = Some(dir.path().join("state2"));
    let run3 = job::run_job(&fresh, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run3.exit, ExitStatus::Success, "{:#?}", run3.report);
    for vm in &run3.report.vms {
        let st = vm.repository.as_ref().unwrap();
        assert_eq!(st.disks[0].method, "nbd-full", "{st:?}");
        assert_eq!(st.new_chunks, 0, "{st:?}");
        assert!(st.dedup_chunks > 0, "{st:?}");
        let ms = manifests(&repo, &vm.uuid).await;
        assert_eq!(ms.len(), 3, "{vm:?}");
        assert_round_trip(&s, &repo, &ms[2], vm).await;
    }
    assert!(repo.check().await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_with_tls_reads_the_disk() {
    let sim = Sim::start(&[
        "--vms",
        "1",
        "--disk-size",
        "2M",
        "--written",
        "50%",
        "--nbd-purpose",
        "nbd",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), false).await;
    let config = repo_config(&sim, dir.path(), "all-vms = true", None);
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
    let vm = &run.report.vms[0];
    assert_eq!(vm.repository.as_ref().unwrap().disks[0].method, "nbd-full");
    let s = session(&sim).await;
    let ms = manifests(&repo, &vm.uuid).await;
    assert_round_trip(&s, &repo, &ms[0], vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_of_a_repository_job_opens_the_repository() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "1M"]);
    let dir = tempfile::tempdir().unwrap();
    let today = xenvault_types::config::Weekday::Monday;

    // No repository yet: the check fails with the fix in words.
    let config = repo_config(&sim, dir.path(), "all-vms = true", None);
    let plan = job::plan_job(&config, "nightly", today).await.unwrap();
    assert!(plan.target_failed());
    let text = plan.render();
    assert!(text.contains("repo init"), "{text}");
    assert!(plan.vms.iter().all(|v| !v.will_run()), "{text}");

    init_repo(&dir.path().join("repo"), true).await;
    let wrong = repo_config(&sim, dir.path(), "all-vms = true", Some("nope"));
    let plan = job::plan_job(&wrong, "nightly", today).await.unwrap();
    assert!(plan.target_failed());
    assert!(
        plan.render().contains("wrong password"),
        "{}",
        plan.render()
    );

    let good = repo_config(&sim, dir.path(), "all-vms = true", Some(PASSWORD));
    let plan = job::plan_job(&good, "nightly", today).await.unwrap();
    let text = plan.render();
    assert!(!plan.target_failed(), "{text}");
    assert!(
        text.contains("repository (") && text.contains("encrypted"),
        "{text}"
    );
    assert!(text.contains("target-type = repository"), "{text}");
    assert_eq!(plan.runnable().count(), 1, "{text}");
    // Nothing was created on the pool.
    let s = session(&sim).await;
    assert_eq!(temporaries(&s).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_repository_round_trips_and_a_wrong_password_is_a_config_error() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "3M", "--written", "40%"]);
    let dir = tempfile::tempdir().unwrap();
    init_repo(&dir.path().join("repo"), true).await;
    let s = session(&sim).await;

    let bad = repo_config(&sim, dir.path(), "all-vms = true", Some("wrong"));
    let err = job::run_job(&bad, "nightly", RunOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.exit_status(), ExitStatus::Usage, "{err}");
    assert!(err.to_string().contains("wrong password"), "{err}");
    let none = repo_config(&sim, dir.path(), "all-vms = true", None);
    let err = job::run_job(&none, "nightly", RunOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.exit_status(), ExitStatus::Usage, "{err}");
    assert_eq!(temporaries(&s).await, (0, 0));

    let config = repo_config(&sim, dir.path(), "all-vms = true", Some(PASSWORD));
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
    let repo = open_repo(&dir.path().join("repo"), true).await;
    let vm = &run.report.vms[0];
    let ms = manifests(&repo, &vm.uuid).await;
    assert_eq!(ms.len(), 1);
    assert_round_trip(&s, &repo, &ms[0], vm).await;
    assert_eq!(temporaries(&s).await, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backup_reads_only_allocated_blocks_over_nbd() {
    // 32 MiB disks of which two 2 MiB blocks hold data.
    let sim = Sim::start(&["--vms", "1", "--disk-size", "32M", "--written", "0%"]);
    let vm_uuid = {
        let s = session(&sim).await;
        let vms = s.vm().get_all_records().await.unwrap();
        vms.values()
            .find(|v| !v.is_a_template && !v.is_control_domain && !v.is_a_snapshot)
            .unwrap()
            .uuid
            .clone()
    };
    // 64 KiB blocks 0, 1 (2 MiB block 0) and 200 (12.5 MiB: 2 MiB block 6).
    sim.control(
        "guest-write",
        &serde_json::json!({"vm": vm_uuid, "seed": 5, "block_list": [0, 1, 200]}),
    );
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), false).await;
    let config = repo_config(&sim, dir.path(), "all-vms = true", None);
    sim.control("stats/reset", &serde_json::json!({}));
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
    let served = nbd_bytes(&stats(&sim).await);
    // Exactly the two allocated 2 MiB blocks, not the 32 MiB disk.
    assert_eq!(served, 4 << 20, "NBD served {served} bytes");
    let vm = &run.report.vms[0];
    let st = vm.repository.as_ref().unwrap();
    assert_eq!(st.disks[0].method, "nbd-full");
    let s = session(&sim).await;
    let ms = manifests(&repo, &vm.uuid).await;
    assert_round_trip(&s, &repo, &ms[0], vm).await;
    // Three 64 KiB writes touch two 1 MiB chunks... at most three.
    assert!(st.new_chunks <= 3, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nbd_the_disk_is_read_as_a_vhd_export_and_the_reason_is_reported() {
    let sim = Sim::start(&[
        "--vms",
        "1",
        "--disk-size",
        "4M",
        "--written",
        "25%",
        "--nbd-purpose",
        "none",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), false).await;
    let config = repo_config(&sim, dir.path(), "all-vms = true", None);
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
    let vm = &run.report.vms[0];
    let d = &vm.repository.as_ref().unwrap().disks[0];
    assert_eq!(d.method, "vhd-full");
    assert!(
        d.reason
            .as_deref()
            .unwrap_or("")
            .contains("NBD unreachable"),
        "{d:?}"
    );
    let s = session(&sim).await;
    let ms = manifests(&repo, &vm.uuid).await;
    assert_eq!(ms[0].disks[0].meta["read"], "vhd-full");
    assert!(ms[0].disks[0].meta["reason"].as_str().is_some());
    assert_round_trip(&s, &repo, &ms[0], vm).await;
    let log = std::fs::read_to_string(run.log_path.unwrap()).unwrap();
    assert!(log.contains("NBD unreachable"), "{log}");
    assert_eq!(temporaries(&s).await, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_forgets_old_restore_points_after_a_successful_backup() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "2M", "--written", "50%"]);
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), false).await;
    let mut config = repo_config(&sim, dir.path(), "all-vms = true", None);
    config.jobs.get_mut("nightly").unwrap().retention.keep_last = 2;
    let mut pruned = Vec::new();
    for _ in 0..3 {
        let run = job::run_job(&config, "nightly", RunOptions::default())
            .await
            .unwrap();
        assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
        pruned.extend(run.report.vms[0].pruned.clone());
    }
    let vm_uuid = {
        let s = session(&sim).await;
        let vms = s.vm().get_all_records().await.unwrap();
        vms.values()
            .find(|v| !v.is_a_template && !v.is_control_domain && !v.is_a_snapshot)
            .unwrap()
            .uuid
            .clone()
    };
    let ms = manifests(&repo, &vm_uuid).await;
    assert_eq!(ms.len(), 2);
    assert_eq!(pruned.len(), 1, "{pruned:?}");
    assert!(!ms.iter().any(|m| pruned[0].ends_with(&m.id)));
    // Chunks stay for `xenvault prune`; every remaining point is intact.
    assert!(repo.check().await.unwrap().is_clean());
}

/// A VM's own retention (`[jobs.NAME.vm."vm-02".retention]`) replaces the
/// job's in the forget after each of its backups; other VMs keep the job's.
/// The runs follow each other within a second or so, which dates restore
/// points up to a few seconds ahead of the clock (ids are times to the second):
/// retention still counts them as superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vms_own_retention_replaces_the_jobs() {
    let sim = Sim::start(&["--vms", "2", "--disk-size", "2M", "--written", "50%"]);
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), false).await;
    let mut config = repo_config(&sim, dir.path(), "all-vms = true", None);
    let job = config.jobs.get_mut("nightly").unwrap();
    job.retention.keep_last = 3;
    job.vm_overrides.insert(
        "vm-02".into(),
        VmOverride {
            retention: Some(RetentionConfig {
                keep_last: 1,
                keep_hourly: 0,
                keep_daily: 0,
                keep_weekly: 0,
                keep_monthly: 0,
                keep_yearly: 0,
            }),
            ..Default::default()
        },
    );
    for _ in 0..4 {
        let run = job::run_job(&config, "nightly", RunOptions::default())
            .await
            .unwrap();
        assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
    }
    let s = session(&sim).await;
    let vms = s.vm().get_all_records().await.unwrap();
    for (name, kept) in [("vm-01", 3), ("vm-02", 1)] {
        let uuid = &vms
            .values()
            .find(|v| v.name_label == name && !v.is_a_snapshot)
            .unwrap()
            .uuid;
        assert_eq!(manifests(&repo, uuid).await.len(), kept, "{name}");
    }
    assert!(repo.check().await.unwrap().is_clean());
}

/// The single VM of a one-VM simulator.
async fn only_vm(sim: &Sim) -> String {
    let s = session(sim).await;
    let vms = s.vm().get_all_records().await.unwrap();
    vms.values()
        .find(|v| !v.is_a_template && !v.is_control_domain && !v.is_a_snapshot)
        .unwrap()
        .uuid
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_at_snapshot_nbd_and_commit_leave_no_restore_point_and_no_snapshot() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M", "--written", "30%"]);
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), false).await;
    let config = repo_config(&sim, dir.path(), "all-vms = true", None);
    let s = session(&sim).await;
    let vm_uuid = only_vm(&sim).await;

    // 1. The snapshot fails.
    sim.fail_call(
        "VM.snapshot",
        1,
        &["SR_BACKEND_FAILURE_44", "", "no space left", ""],
    );
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Failure, "{:#?}", run.report);
    let reason = run.report.vms[0].outcome.reason().unwrap_or("").to_string();
    assert!(reason.contains("snapshot"), "{reason}");
    assert!(manifests(&repo, &vm_uuid).await.is_empty());
    assert_eq!(temporaries(&s).await, (0, 0));
    sim.reset_faults();

    // 2. Every NBD stream is cut: the reads fail after their retries.
    sim.control(
        "faults/stream",
        &serde_json::json!({"handler": "nbd", "cut_after": 300_000}),
    );
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Failure, "{:#?}", run.report);
    let reason = run.report.vms[0].outcome.reason().unwrap_or("").to_string();
    assert!(reason.contains("NBD"), "{reason}");
    assert!(manifests(&repo, &vm_uuid).await.is_empty());
    assert_eq!(temporaries(&s).await, (0, 0));
    sim.reset_faults();

    // 3. The manifest cannot be written: its directory is a dangling
    // symlink (listing it reads as empty, writing into it fails).
    let blocker = dir.path().join("repo/manifests").join(&vm_uuid);
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere/at/all"), &blocker).unwrap();
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Failure, "{:#?}", run.report);
    let reason = run.report.vms[0].outcome.reason().unwrap_or("").to_string();
    assert!(reason.contains("commit"), "{reason}");
    std::fs::remove_file(&blocker).unwrap();
    assert!(manifests(&repo, &vm_uuid).await.is_empty());
    assert_eq!(temporaries(&s).await, (0, 0));

    // The next run completes and reads back bit for bit.
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
    let ms = manifests(&repo, &vm_uuid).await;
    assert_eq!(ms.len(), 1);
    assert_round_trip(&s, &repo, &ms[0], &run.report.vms[0]).await;
    assert!(repo.check().await.unwrap().is_clean());
    assert_eq!(temporaries(&s).await, (1, 1));
}

/// A configuration file as a user writes it for a repository target (the
/// loader reads the password file).
fn repo_config_file(sim: &Sim, dir: &Path, job_lines: &str) -> Config {
    let pw = dir.join("pool.password");
    std::fs::write(&pw, format!("{}\n", sim.s("password"))).unwrap();
    let repo_pw = dir.join("repo.password");
    std::fs::write(&repo_pw, format!("{PASSWORD}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        for f in [&pw, &repo_pw] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    let text = format!(
        r#"state-dir = "{state}"

[pools.sim]
url = "{url}"
user = "{user}"
password-file = "{pw}"
fingerprint = "{fp}"

[targets.vault]
type = "repository"
path = "{repo}"
password-file = "{repo_pw}"

[jobs.nightly]
pool = "sim"
target = "vault"
{job_lines}
"#,
        state = dir.join("state").display(),
        url = sim.s("https_url"),
        user = sim.s("user"),
        pw = pw.display(),
        fp = sim.s("fingerprint"),
        repo = dir.join("repo").display(),
        repo_pw = repo_pw.display(),
    );
    let path = dir.join("xenvault.toml");
    std::fs::write(&path, text).unwrap();
    xenvault_engine::config::load(&path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_several_disks_is_read_disk_by_disk_from_a_configured_repository() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(
        &scenario,
        r#"
[[vms]]
name = "multi"
[[vms.disks]]
size = "3M"
written = "30%"
[[vms.disks]]
size = "5M"
written = "10%"
[[vms.disks]]
size = "1M"
written = "0%"
"#,
    )
    .unwrap();
    let sim = Sim::start(&["--scenario", scenario.to_str().unwrap()]);
    let repo = init_repo(&dir.path().join("repo"), true).await;
    let config = repo_config_file(
        &sim,
        dir.path(),
        "all-vms = true\nnbd-connections = 3\ndisk-concurrency = 2\n",
    );
    // NBD at 2 MiB/s per connection, so that each disk's reading lasts long
    // enough (two thirds of a second or more) to see whether two overlap.
    sim.control(
        "faults/stream",
        &serde_json::json!({"handler": "nbd", "bytes_per_sec": 2 << 20}),
    );
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
    // Three NBD connections per disk, two disks at a time: one at a time
    // never has more than three open (checked with `disk-concurrency = 1`);
    // the next disk's may open a moment before the simulator has seen the
    // last one's close.
    let nbd = &sim.control_get("stats")["nbd"];
    assert_eq!(nbd["connections"], 9, "{nbd}");
    let open_max = nbd["open_max"].as_u64().unwrap();
    assert!(open_max > 3 && open_max <= 9, "{nbd}");
    // And every connection is closed (the simulator sees the last ones
    // close a moment after the job returns).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sim.control_get("stats")["nbd"]["open"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "NBD connections left open"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let vm = &run.report.vms[0];
    let st = vm.repository.as_ref().unwrap();
    assert_eq!(st.disks.len(), 3, "{st:?}");
    assert!(st.disks.iter().all(|d| d.method == "nbd-full"), "{st:?}");
    let s = session(&sim).await;
    let ms = manifests(&repo, &vm.uuid).await;
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0].disks.len(), 3);
    assert_round_trip(&s, &repo, &ms[0], vm).await;
    // The run log is kept in the state directory, not in the repository.
    let log = run.log_path.unwrap();
    assert!(
        log.starts_with(dir.path().join("state")),
        "{}",
        log.display()
    );
    assert!(!dir.path().join("repo/_logs").exists());
}
