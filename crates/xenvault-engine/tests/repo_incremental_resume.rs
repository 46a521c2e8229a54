//! Resume of an interrupted repository backup against a real `xapi-sim`:
//! the first run is killed mid-disk (a child process, SIGKILL), the next
//! run reads only the
//! ranges the checkpoint lacks plus what CBT says changed since, and
//! restores bit for bit, also when a prune removed a checkpointed chunk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod repo_incremental_support;

use std::path::PathBuf;
use std::time::Duration;

use repo_incremental_support::{Fixture, disk_report, scenario};
use xenvault_engine::backup::repo::resume::{ResumeState, load_index, load_state, state_dir};
use xenvault_engine::job::{self, RunOptions};

const BLOCK: u64 = 64 * 1024;
const SIZE: u64 = 16 << 20;

fn resume_dir(fx: &Fixture, vm_uuid: &str) -> PathBuf {
    state_dir(&fx.dir.path().join("state"), "sim", "nightly", vm_uuid)
}

/// The child process of [`interrupted_run`]: runs the job of the
/// configuration in `XENVAULT_RESUME_CHILD` (does nothing otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the resume tests (killed by them)"]
async fn resume_child_backup() {
    let Ok(path) = std::env::var("XENVAULT_RESUME_CHILD") else {
        return;
    };
    let config = xenvault_engine::config::load(std::path::Path::new(&path)).unwrap();
    let _ = job::run_job(&config, "nightly", RunOptions::default()).await;
}

/// Runs the job in a child process with NBD throttled, waits until a
/// checkpoint is written, then kills the child (SIGKILL: no cleanup code
/// runs). Returns the checkpoint state.
async fn interrupted_run(fx: &Fixture, vm_uuid: &str) -> ResumeState {
    fx.sim.control(
        "faults/stream",
        &serde_json::json!({"handler": "nbd", "bytes_per_sec": 1 << 20}),
    );
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "resume_child_backup", "--ignored", "--nocapture"])
        .env("XENVAULT_RESUME_CHILD", &fx.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dir = resume_dir(fx, vm_uuid);
    let t0 = std::time::Instant::now();
    let mut state = None;
    for _ in 0..1200 {
        if let Some(s) = load_state(&dir) {
            state = Some(s);
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before any checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("checkpoint after {:?}", t0.elapsed());
    child.kill().unwrap();
    child.wait().unwrap();
    fx.sim.reset_faults();
    let state = state.expect("no checkpoint within a minute");
    let d = state.disks.values().next().unwrap();
    assert!(d.done > 0 && d.done < SIZE, "{state:?}");
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backup_resumes_without_reading_again_what_was_stored() {
    let fx = Fixture::start(&scenario(true, "16M").replace("25%", "50%"), &[], "").await;
    let (vm_uuid, vdi) = fx.vm().await;
    let state = interrupted_run(&fx, &vm_uuid).await;
    let done = state.disks[&vdi].done;
    // The checkpoint's snapshot is kept on the pool.
    assert_eq!(fx.snapshots().await, (1, 1));

    // The guest writes below and above the checkpoint.
    let above = SIZE / BLOCK - 1;
    fx.guest_write(&vdi, 77, &[1, above]);
    fx.reset_stats();
    let report = fx.run().await;
    let d = disk_report(&report);
    assert_eq!(d.method, "nbd-full", "{d:?}");
    assert!(
        d.reason.as_deref().unwrap_or("").contains("resumed"),
        "{d:?}"
    );
    // Only the changed block below the checkpoint and everything above it.
    assert_eq!(fx.nbd_bytes(), BLOCK + (SIZE - done), "done = {done}");

    let points = fx.points(&vm_uuid).await;
    assert_eq!(points.len(), 1);
    assert!(fx.restore(&points[0], &vdi).await == fx.live_disk(&vdi).await);
    // The resume snapshot is gone, the new base kept, the state removed.
    assert_eq!(fx.snapshots().await, (1, 1));
    assert!(!resume_dir(&fx, &vm_uuid).exists());

    // And the next incremental starts from the resumed restore point.
    fx.guest_write(&vdi, 78, &[5]);
    let expected = fx.cbt_read_bytes(&points[0], &vdi, &[5]).await;
    fx.reset_stats();
    let d = disk_report(&fx.run().await);
    assert_eq!(d.method, "nbd-cbt", "{d:?}");
    assert_eq!(fx.nbd_bytes(), expected);
    let points = fx.points(&vm_uuid).await;
    assert!(fx.restore(points.last().unwrap(), &vdi).await == fx.live_disk(&vdi).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpointed_chunk_removed_by_prune_is_read_again() {
    let fx = Fixture::start(&scenario(true, "16M").replace("25%", "50%"), &[], "").await;
    let (vm_uuid, vdi) = fx.vm().await;
    let state = interrupted_run(&fx, &vm_uuid).await;
    let d = &state.disks[&vdi];
    let index = load_index(&resume_dir(&fx, &vm_uuid), &d.index_file).unwrap();
    // What a prune sweep does to an unreferenced chunk.
    let victim = index.ids[0];
    assert!(!victim.is_zero());
    let path = fx.dir.path().join("repo").join(victim.object_key());
    std::fs::remove_file(&path).unwrap();

    fx.reset_stats();
    let d2 = disk_report(&fx.run().await);
    assert!(
        d2.reason.as_deref().unwrap_or("").contains("resumed"),
        "{d2:?}"
    );
    let cs = u64::from(index.chunk_size);
    assert_eq!(fx.nbd_bytes(), cs + (SIZE - d.done));
    let points = fx.points(&vm_uuid).await;
    assert!(fx.restore(&points[0], &vdi).await == fx.live_disk(&vdi).await);
    assert!(path.exists(), "the missing chunk was stored again");
}

/// A VM of two disks read one after the other, killed while its second
/// disk is read: the next run reads nothing of the finished first disk and
/// only the rest of the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_disk_of_an_interrupted_backup_is_not_read_again() {
    let scenario = r#"[pool]
name = "lab"
seed = 7

[[vms]]
name = "web01"
[[vms.disks]]
size = "8M"
written = "50%"
cbt = true
[[vms.disks]]
size = "8M"
written = "50%"
cbt = true
"#;
    let fx = Fixture::start(scenario, &[], "disk-concurrency = 1").await;
    let (vm_uuid, _) = fx.vm().await;
    fx.sim.control(
        "faults/stream",
        &serde_json::json!({"handler": "nbd", "bytes_per_sec": 1 << 20}),
    );
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "resume_child_backup", "--ignored", "--nocapture"])
        .env("XENVAULT_RESUME_CHILD", &fx.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dir = resume_dir(&fx, &vm_uuid);
    let mut state = None;
    for _ in 0..1200 {
        if let Some(s) = load_state(&dir)
            && s.disks.values().any(|d| d.done == d.size)
        {
            state = Some(s);
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended first");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    fx.sim.reset_faults();
    let state = state.expect("no finished disk within a minute");
    let second_done: u64 = state
        .disks
        .values()
        .filter(|d| d.done < d.size)
        .map(|d| d.done)
        .sum();

    fx.reset_stats();
    let report = fx.run().await;
    let vm = repo_incremental_support::vm_report(&report);
    let disks = &vm.repository.as_ref().unwrap().disks;
    assert_eq!(disks.len(), 2, "{disks:?}");
    assert!(
        disks
            .iter()
            .all(|d| d.reason.as_deref().unwrap_or("").contains("resumed")
                || !state.disks.contains_key(&d.key)),
        "{disks:?}"
    );
    assert_eq!(fx.nbd_bytes(), (8 << 20) - second_done, "{state:?}");
    let points = fx.points(&vm_uuid).await;
    for d in disks {
        assert!(
            fx.restore(&points[0], &d.key).await == fx.live_disk(&d.key).await,
            "disk {}",
            d.key
        );
    }
}
