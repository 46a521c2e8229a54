//! Restores of restore points written by the real repository backup job
//! (full, then incremental after guest writes) from a `xapi-sim` VM: the
//! listing, the whole VM (both methods), and the older point written back
//! into the live disk sending only the chunks the guest changed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod backup_support;

use std::path::Path;
use std::sync::Arc;

use backup_support::{Sim, vdi_sha, write_config};
use xenvault_engine::job::{self, ExitStatus, RunOptions};
use xenvault_engine::restore::repo::{
    IntoVdiOptions, RepoVmRestoreOptions, VmRestoreMethod, find_repo_point, list_repo_points,
    restore_repo_disk_into, restore_repo_vm,
};
use xenvault_engine::restore::{DiskSelector, no_progress};
use xenvault_repo::storage::LocalStorage;
use xenvault_repo::{InitOptions, Repository};
use xenvault_types::config::{Config, TargetKind};

fn repo_config(sim: &Sim, dir: &Path) -> Config {
    let path = write_config(sim, dir, "all-vms = true", "");
    let mut config = xenvault_engine::config::load(&path).unwrap();
    let t = config.targets.get_mut("archive").unwrap();
    t.kind = TargetKind::Repository;
    t.path = dir.join("repo");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_points_of_the_backup_job_restore_bit_for_bit() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "8M", "--written", "30%"]);
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
    let repo = Repository::init(storage, InitOptions::default())
        .await
        .unwrap();
    let config = repo_config(&sim, dir.path());
    let pool = sim.pool().await;

    // A full backup, guest writes, an incremental.
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);
    let vm = run.report.vms[0].clone();
    let first = find_repo_point(&repo, &vm.name, None).await.unwrap();
    let key = first.disks[0].key.clone();
    let sha_first = vdi_sha(&pool, &key).await;
    sim.control(
        "guest-write",
        &serde_json::json!({"vdi": key, "seed": 3, "blocks": 5}),
    );
    let sha_second = vdi_sha(&pool, &key).await;
    assert_ne!(sha_first, sha_second);
    let run = job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(run.exit, ExitStatus::Success, "{:#?}", run.report);

    // The listing: newest first, the incremental names its parent.
    let listed = list_repo_points(&repo, Some(&vm.uuid)).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].id, first.id);
    assert_eq!(listed[0].parent.as_deref(), Some(first.id.as_str()));
    assert_eq!(listed[0].job.as_deref(), Some("nightly"));
    assert_eq!(listed[0].disks[0].key, key);
    assert!(listed[0].disks[0].read.is_some());
    let second = find_repo_point(&repo, &vm.uuid, Some(&listed[0].id))
        .await
        .unwrap();

    // Each point as a whole VM, each method: the disks are the pool's disk
    // at that time.
    for (point, want, method) in [
        (&first, &sha_first, VmRestoreMethod::Xva),
        (&second, &sha_second, VmRestoreMethod::RawVdis),
    ] {
        let options = RepoVmRestoreOptions {
            method,
            ..RepoVmRestoreOptions::default()
        };
        let restored = restore_repo_vm(&pool, &repo, point, &options, no_progress())
            .await
            .unwrap();
        assert_eq!(restored.disks.len(), 1);
        assert_eq!(
            &vdi_sha(&pool, &restored.disks[0].vdi_uuid).await,
            want,
            "{method:?} restore of {} differs",
            point.id
        );
    }

    // The first point back into the live disk (its VM shut down first):
    // only the changed chunks go.
    let vm_ref = pool.session.vm().get_by_uuid(&vm.uuid).await.unwrap();
    let rec = pool.session.vm().get_record(&vm_ref).await.unwrap();
    if rec.power_state != xenvault_xapi::records::PowerState::Halted {
        pool.session.vm().hard_shutdown(&vm_ref).await.unwrap();
    }
    let options = IntoVdiOptions::new(DiskSelector::Position("0".into()), &key);
    let r = restore_repo_disk_into(&pool, &repo, &first, &options, no_progress())
        .await
        .unwrap();
    assert!(r.chunks_written >= 1 && r.chunks_written <= 5, "{r:?}");
    assert!(r.chunks_written < r.chunks_compared, "{r:?}");
    assert_eq!(vdi_sha(&pool, &key).await, sha_first);
}
