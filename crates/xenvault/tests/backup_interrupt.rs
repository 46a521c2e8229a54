//! SIGINT and SIGTERM during `xenvault backup` (real binary, real `xapi-sim`
//! process, the export slowed with the simulator's `bytes_per_sec` stream
//! fault): once the VM's snapshot exists the process gets the signal, and
//! then it exits with 130 (SIGINT) or 143 (SIGTERM), no snapshot of the run
//! is left on the pool (a repository VM may keep the one its resume
//! checkpoint reads from, tagged `xenvault:resume`, and the next run resumes
//! from it and releases it), nothing of the run is listed as a backup (no
//! complete archive, no restore point, no repository lock), earlier backups
//! are untouched, the report says the run was interrupted, and the next
//! normal run succeeds. A second signal exits at once; the next run cleans up.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod backup_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backup_support::{Out, PoolCheck, Sim, backup, points_of, vm_entry, write_config};
use xenvault_repo::Repository;
use xenvault_repo::storage::{LocalStorage, Storage};

const VM: &str = "vm-01";
const REPO_PASSWORD: &str = "interrupt-repo-password";

/// Starts `xenvault backup nightly --config <cfg> --json` without waiting.
fn spawn_backup(cfg: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args([
            "backup",
            "nightly",
            "--config",
            cfg.to_str().unwrap(),
            "--json",
        ])
        .env_remove("XENVAULT_CONFIG")
        .env(
            "RUST_LOG",
            std::env::var("BACKUP_INTERRUPT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run xenvault")
}

/// Waits for the process (at most `limit`; killed and failed after that).
fn wait_with_limit(mut child: Child, limit: Duration) -> Out {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "xenvault did not end {} s after the signal\n--- stdout\n{}\n--- stderr\n{}",
                limit.as_secs(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The UUID of the source VM named [`VM`].
fn vm_uuid(pool: &PoolCheck) -> String {
    pool.block_on(async {
        let all = pool.session().vm().get_all_records().await.unwrap();
        all.into_values()
            .find(|v| !v.is_a_snapshot && v.name_label == VM)
            .map(|v| v.uuid)
            .unwrap_or_else(|| panic!("no VM {VM} on the simulator"))
    })
}

/// UUIDs of the snapshots of the VM `uuid` (`is_a_snapshot` and
/// `snapshot_of` = the VM).
fn snapshots_of(pool: &PoolCheck, uuid: &str) -> Vec<String> {
    pool.block_on(async {
        let vm = pool.session().vm().get_by_uuid(uuid).await.unwrap();
        let all = pool.session().vm().get_all_records().await.unwrap();
        all.into_values()
            .filter(|v| v.is_a_snapshot && v.snapshot_of == vm)
            .map(|v| v.uuid)
            .collect()
    })
}

/// Sends `signal` to `child` once a snapshot of the VM (not in `existing`) exists (and its
/// export has had a moment to start), then waits for its end.
fn interrupt_once_snapshotted(
    child: Child,
    pool: &PoolCheck,
    uuid: &str,
    signal: &str,
    existing: &[String],
) -> (Out, Duration) {
    interrupt_once_when(
        child,
        signal,
        "a new snapshot",
        Duration::from_millis(500),
        || {
            snapshots_of(pool, uuid)
                .iter()
                .any(|s| !existing.contains(s))
        },
    )
}

/// Sends `signal` to `child` once `ready` holds (checked every 50 ms, for
/// at most 120 s) and `then` has passed; returns its output and how long
/// it took to exit after the signal.
fn interrupt_once_when(
    child: Child,
    signal: &str,
    what: &str,
    then: Duration,
    ready: impl Fn() -> bool,
) -> (Out, Duration) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no {what} after 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(then);
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal}");
    let signalled = Instant::now();
    let out = wait_with_limit(child, Duration::from_secs(120));
    (out, signalled.elapsed())
}

/// The simulator's streams (XVA export, raw VDI export, NBD) at a crawl.
/// The NBD server paces each reply (1 MiB chunks: 4 s each here), holding
/// its VDI attached meanwhile: short enough for the cleanup's `VDI_IN_USE`
/// retries once the client is gone.
fn slow_streams(sim: &Sim) {
    for (handler, rate) in [
        ("export", 32_768),
        ("export_raw_vdi", 32_768),
        ("nbd", 262_144),
    ] {
        sim.control(
            "faults/stream",
            &serde_json::json!({"handler": handler, "bytes_per_sec": rate}),
        );
    }
}

/// Snapshots of the VM `uuid` with their `other_config`.
fn snapshot_records(
    pool: &PoolCheck,
    uuid: &str,
) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    pool.block_on(async {
        let vm = pool.session().vm().get_by_uuid(uuid).await.unwrap();
        let all = pool.session().vm().get_all_records().await.unwrap();
        all.into_values()
            .filter(|v| v.is_a_snapshot && v.snapshot_of == vm)
            .map(|v| (v.uuid, v.other_config.into_iter().collect()))
            .collect()
    })
}

/// The checks common to both targets, on the interrupted run's output.
/// With `resume`, the snapshot may stay when a resume checkpoint reads from
/// it (repository targets): then it must be tagged for resuming and named in
/// the VM's notes. The snapshots in `existing` (kept bases) must stay.
/// Returns the snapshot kept for resuming, if any.
fn assert_interrupted(
    out: &Out,
    code: i32,
    signal: &str,
    pool: &PoolCheck,
    uuid: &str,
    resume: bool,
    existing: &[String],
) -> Option<String> {
    assert_eq!(out.code, code, "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("interrupted by {signal}: stopping, cleaning up")),
        "{out:?}"
    );
    let report = out.json();
    let why = format!("interrupted by {signal}");
    assert_eq!(report["interrupted"], why.as_str(), "{report:#}");
    let vm = vm_entry(&report, VM);
    assert_eq!(vm["outcome"]["status"], "failed", "{report:#}");
    assert!(
        vm["outcome"]["reason"].as_str().unwrap().starts_with(&why),
        "{report:#}"
    );
    assert!(vm["location"].is_null(), "{report:#}");
    assert!(
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains(&why)),
        "{report:#}"
    );
    let all = snapshot_records(pool, uuid);
    for e in existing {
        assert!(all.iter().any(|(s, _)| s == e), "{e} is gone: {out:?}");
    }
    let left: Vec<_> = all
        .into_iter()
        .filter(|(s, _)| !existing.contains(s))
        .collect();
    assert!(left.len() <= 1, "{left:?}\n{out:?}");
    let n = existing.len();
    match left.into_iter().next() {
        None => {
            assert_eq!(vm["cleanup"]["status"], "cleaned", "{report:#}");
            assert_eq!(vm["cleanup"]["snapshots"], 1, "{report:#}");
            assert_eq!(pool.temporaries(), (n, n), "snapshot VMs, VDIs: {out:?}");
            None
        }
        Some((snapshot, other_config)) => {
            assert!(resume, "snapshot {snapshot} left on the pool: {out:?}");
            assert_eq!(
                other_config.get("xenvault:resume").map(String::as_str),
                Some("nightly"),
                "snapshot {snapshot} left but not kept for resuming: {other_config:?}"
            );
            assert_eq!(
                pool.temporaries(),
                (n + 1, n + 1),
                "snapshot VMs, VDIs: {out:?}"
            );
            let notes = vm["notes"].to_string();
            assert!(
                notes.contains(&snapshot) && notes.contains("resume"),
                "{report:#}"
            );
            Some(snapshot)
        }
    }
}

/// The text of the run log under `dir` of the run `run_id`.
fn run_log(dir: &Path, run_id: &str) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .find(|text| text.contains(run_id))
        .unwrap_or_else(|| panic!("no run log of {run_id} in {}", dir.display()))
}

#[test]
fn sigint_stops_an_archive_backup_cleanly_and_exits_130() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "8M", "--written", "40%"]);
    let pool = PoolCheck::new(&sim);
    let uuid = vm_uuid(&pool);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let cfg = write_config(
        &sim,
        dir.path(),
        "all-vms = true\n[jobs.nightly.retention]\nkeep-last = 5",
        "",
    );
    // An earlier backup, which the stopped run must not touch.
    let first = backup(&cfg);
    assert_eq!(first.code, 0, "{first:?}");
    let before = dirs_of(&archive.join(VM));
    assert_eq!(before.len(), 1, "{before:?}");

    slow_streams(&sim);
    let child = spawn_backup(&cfg);
    let (out, took) = interrupt_once_snapshotted(child, &pool, &uuid, "-INT", &[]);
    assert_eq!(
        assert_interrupted(&out, 130, "SIGINT", &pool, &uuid, false, &[]),
        None
    );
    assert!(
        took < Duration::from_secs(30),
        "the stop took {took:?}: {out:?}"
    );
    // No complete-looking archive, the partial one is gone, the earlier
    // one is untouched.
    assert_eq!(points_of(&archive, VM), (1, 0), "{out:?}");
    assert_eq!(dirs_of(&archive.join(VM)), before, "{out:?}");
    // The run log on the target says so.
    let run_id = out.json()["run_id"].as_str().unwrap().to_string();
    let text = run_log(&archive.join("_logs"), &run_id);
    assert!(text.contains("interrupted by SIGINT"), "{text}");

    // The next run, at full speed, succeeds.
    sim.reset_faults();
    let next = backup(&cfg);
    assert_eq!(next.code, 0, "{next:?}");
    assert_eq!(points_of(&archive, VM), (2, 0), "{next:?}");
    assert_eq!(pool.temporaries(), (0, 0));
}

/// The entries of a directory, with their modification times.
fn dirs_of(dir: &Path) -> Vec<(String, std::time::SystemTime)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let modified = e.metadata().unwrap().modified().unwrap();
                    (e.file_name().to_string_lossy().into_owned(), modified)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The restore points of the repository in `dir`.
fn restore_points(rt: &tokio::runtime::Runtime, dir: &Path) -> Vec<(String, String)> {
    rt.block_on(async {
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir).unwrap());
        let repo = Repository::open(storage, Some(REPO_PASSWORD.as_bytes()))
            .await
            .unwrap();
        repo.list_restore_points(None).await.unwrap()
    })
}

/// How many chunk objects (`<repo>/chunks/<xx>/<id>`) the repository holds
/// (not counting `.tmp-*` files being written).
fn chunk_objects(repo: &Path) -> usize {
    std::fs::read_dir(repo.join("chunks")).map_or(0, |d| {
        d.flatten()
            .filter_map(|e| std::fs::read_dir(e.path()).ok())
            .map(|files| {
                files
                    .flatten()
                    .filter(|f| !f.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .sum()
    })
}

/// Files under `<repo>/locks`.
fn locks(repo: &Path) -> Vec<String> {
    std::fs::read_dir(repo.join("locks")).map_or(Vec::new(), |d| {
        d.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    })
}

#[test]
fn sigterm_stops_a_repository_backup_cleanly_and_exits_143() {
    // The NBD pacing holds each reply back: a disk of many 1 MiB chunks
    // keeps each connection waiting.
    let sim = Sim::start(&["--vms", "1", "--disk-size", "32M", "--written", "40%"]);
    let pool = PoolCheck::new(&sim);
    let uuid = vm_uuid(&pool);
    let dir = tempfile::tempdir().unwrap();
    // CBT on: the next run can resume from a checkpoint of the stopped one.
    let cfg = backup_support::write_repository_config(
        &sim,
        dir.path(),
        "all-vms = true\ncbt = \"enable\"",
        Some(REPO_PASSWORD),
    );
    let repo_dir = dir.path().join("archive");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // An earlier restore point, which the stopped run must not touch; the
    // stopped run is an incremental against it. Its base snapshot stays.
    let first = backup(&cfg);
    assert_eq!(first.code, 0, "{first:?}");
    let before = restore_points(&rt, &repo_dir);
    assert_eq!(before.len(), 1, "{before:?}");
    let base = snapshots_of(&pool, &uuid);
    assert_eq!(base.len(), 1, "the kept base: {base:?}");
    sim.control(
        "guest-write",
        &serde_json::json!({"vm": uuid, "seed": 7, "percent": 50.0}),
    );
    std::thread::sleep(Duration::from_millis(1100));

    slow_streams(&sim);
    let chunks_before = chunk_objects(&repo_dir);
    let child = spawn_backup(&cfg);
    // Stopped once the run has recorded a resume checkpoint (after storing
    // chunks of its own; the state is written once its snapshot is kept):
    // the snapshot stays for resuming. A stop drops the VM's work where it
    // is, so what was stored after the last checkpoint is read again.
    let state = dir
        .path()
        .join("state/resume/sim/nightly")
        .join(&uuid)
        .join("state.json");
    let (out, took) =
        interrupt_once_when(child, "-TERM", "resume checkpoint", Duration::ZERO, || {
            state.exists()
        });
    assert!(chunk_objects(&repo_dir) > chunks_before, "{out:?}");
    let kept = assert_interrupted(&out, 143, "SIGTERM", &pool, &uuid, true, &base)
        .unwrap_or_else(|| panic!("stopped after a checkpoint, no snapshot kept: {out:?}"));
    assert!(
        took < Duration::from_secs(30),
        "the stop took {took:?}: {out:?}"
    );
    // No restore point committed, the writer's lock released.
    assert_eq!(restore_points(&rt, &repo_dir), before, "{out:?}");
    assert_eq!(locks(&repo_dir), Vec::<String>::new(), "{out:?}");

    // The next run, at full speed, succeeds.
    sim.reset_faults();
    let next = backup(&cfg);
    assert_eq!(next.code, 0, "{next:?}");
    let points = restore_points(&rt, &repo_dir);
    assert_eq!(points.len(), 2, "{points:?}\n{next:?}");
    assert!(points.contains(&before[0]), "{points:?}");
    assert!(points.iter().all(|(vm, _)| *vm == uuid), "{points:?}");
    assert_eq!(locks(&repo_dir), Vec::<String>::new(), "{next:?}");
    // Only the base of the committed restore point remains: a snapshot kept
    // for resuming was used and released.
    let left = snapshot_records(&pool, &uuid);
    assert_eq!(left.len(), 1, "{left:?}\n{next:?}");
    assert_eq!(
        left[0].1.get("xenvault:base").map(String::as_str),
        Some("nightly"),
        "{left:?}"
    );
    assert_ne!(left[0].0, base[0], "the old base is released: {next:?}");
    assert_ne!(left[0].0, kept, "{next:?}");
    assert!(
        next.stdout.contains("resumed the interrupted backup"),
        "{next:?}"
    );
}

#[test]
fn a_second_signal_exits_at_once_and_the_next_run_cleans_up() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "8M", "--written", "40%"]);
    let pool = PoolCheck::new(&sim);
    let uuid = vm_uuid(&pool);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let cfg = write_config(&sim, dir.path(), "all-vms = true", "");
    // The cleanup after the first signal is held up: the first three
    // `VDI.destroy` calls answer VDI_IN_USE, each retried after 1.5 s.
    slow_streams(&sim);
    for nth in 1..=3 {
        sim.fail_call(
            "VDI.destroy",
            nth,
            &["VDI_IN_USE", "OpaqueRef:held", "destroy"],
        );
    }
    let child = spawn_backup(&cfg);
    let started = Instant::now();
    while snapshots_of(&pool, &uuid).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(120), "no snapshot");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let second = Instant::now();
    let out = wait_with_limit(child, Duration::from_secs(60));
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "took {:?} after the second signal: {out:?}",
        second.elapsed()
    );
    assert_eq!(out.code, 143, "the second signal's code: {out:?}");
    assert!(
        out.stderr.contains("interrupted by SIGINT: stopping"),
        "{out:?}"
    );
    assert!(out.stderr.contains("SIGTERM again: exiting now"), "{out:?}");
    assert_eq!(points_of(&archive, VM).0, 0, "{out:?}");
    // Left for the next run: the snapshot's VDI at least.
    assert_ne!(pool.temporaries(), (0, 0), "{out:?}");

    // Whatever was left, the next run sweeps it and succeeds.
    sim.reset_faults();
    let next = backup(&cfg);
    assert_eq!(next.code, 0, "{next:?}");
    assert_eq!(points_of(&archive, VM), (1, 0), "{next:?}");
    assert_eq!(pool.temporaries(), (0, 0), "{next:?}");
}
