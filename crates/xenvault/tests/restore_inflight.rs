//! A restore killed with `kill -9` leaves nothing that looks restored (real
//! binary, real `xapi-sim` process, the upload slowed with the simulator's
//! `bytes_per_sec` stream fault): what it created carries
//! `xenvault:restoring=<host>/<state id>/<run>` from its creation, so the
//! next restore removes a VM whose disks were half filled, and the next
//! backup run a half-written VDI, while a restore still running is left
//! alone and ends with its objects untagged, and a run with another state
//! directory touches neither.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod backup_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backup_support::{PoolCheck, Sim, write_repository_config, xenvault};

const TAG: &str = "xenvault:restoring";

/// (uuid, tag) of each object carrying the restoring tag.
type Tagged = Vec<(String, String)>;

/// VMs (not snapshots) and VDIs carrying the restoring tag.
fn tagged(pool: &PoolCheck) -> (Tagged, Tagged) {
    pool.block_on(async {
        let vms = pool.session().vm().get_all_records().await.unwrap();
        let vdis = pool.session().vdi().get_all_records().await.unwrap();
        (
            vms.into_values()
                .filter(|v| !v.is_a_snapshot)
                .filter_map(|v| Some((v.uuid, v.other_config.get(TAG)?.clone())))
                .collect(),
            vdis.into_values()
                .filter_map(|v| Some((v.uuid, v.other_config.get(TAG)?.clone())))
                .collect(),
        )
    })
}

fn vdi_exists(pool: &PoolCheck, uuid: &str) -> bool {
    pool.block_on(async { pool.session().vdi().get_by_uuid(uuid).await.is_ok() })
}

/// `xenvault restore nightly --vm vm-01 <extra> --json`, not waited for.
fn spawn_restore(cfg: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(["restore", "nightly", "--config", cfg.to_str().unwrap()])
        .args(["--vm", "vm-01"])
        .args(extra)
        .arg("--json")
        .env_remove("XENVAULT_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run xenvault")
}

/// Waits (at most 60 s) until `ready` gives something.
fn wait_for<T>(what: &str, ready: impl Fn() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no {what} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pool's pending tasks (uuids). A killed client's upload task stays
/// pending until the simulator has read what it had sent (its throttle
/// drains the socket slowly, where XAPI would at disk speed) and let go of
/// the VDI.
fn pending_tasks(pool: &PoolCheck) -> std::collections::BTreeSet<String> {
    let tasks = pool.block_on(async {
        pool.session()
            .api::<xenvault_xapi::records::Task>()
            .get_all_records()
            .await
            .unwrap()
    });
    tasks
        .into_values()
        .filter(|t| t.status == xenvault_xapi::records::TaskStatus::Pending)
        .map(|t| t.uuid)
        .collect()
}

/// Bytes the simulator has received through `import_raw_vdi` so far.
fn uploaded(sim: &Sim) -> u64 {
    sim.control_get("stats")["bytes"]["import_raw_vdi"]
        .as_u64()
        .unwrap_or(0)
}

/// The next `import_raw_vdi` upload at `rate` bytes per second.
fn slow_next_upload(sim: &Sim, rate: u64) {
    sim.control(
        "faults/stream",
        &serde_json::json!({"handler": "import_raw_vdi", "bytes_per_sec": rate, "times": 1}),
    );
}

#[test]
fn what_a_killed_restore_made_is_removed_by_the_next_run_and_a_live_one_is_left_alone() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M", "--written", "50%"]);
    let pool = PoolCheck::new(&sim);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_repository_config(&sim, dir.path(), "names = [\"vm-01\"]", None);
    let c = cfg.to_str().unwrap();
    let backup = xenvault(&["backup", "nightly", "--config", c, "--json"]);
    assert_eq!(backup.code, 0, "{backup:?}");
    let host = String::from_utf8(Command::new("uname").arg("-n").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let (vms_at_start, vdis_at_start) = pool.counts();

    // 1. A whole VM as VDIs: the blank VM is imported, then its disk is
    //    filled slowly; kill -9 in the middle. The VM stays, marked.
    slow_next_upload(&sim, 1_048_576);
    let mut child = spawn_restore(&cfg, &["--method", "vdis"]);
    let (dead_vm, tag) = wait_for("VM being restored", || tagged(&pool).0.into_iter().next());
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("end of the killed upload", || {
        pending_tasks(&pool).is_empty().then_some(())
    });
    assert!(tag.starts_with(&format!("{host}/")), "{tag}");
    assert_eq!(tagged(&pool).0, [(dead_vm.clone(), tag.clone())]);
    assert_eq!(pool.counts(), (vms_at_start + 1, vdis_at_start + 1));

    // The next restore removes it (and its disk) before it starts, and
    // ends with an untagged VM.
    sim.reset_faults();
    let again = xenvault(&[
        "restore", "nightly", "--config", c, "--vm", "vm-01", "--method", "vdis", "--json",
    ]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stderr.contains(&format!(
            "removed VM {dead_vm} (and its disks), left by a restore that died"
        )),
        "{again:?}"
    );
    let restored = again.json()["uuid"].as_str().unwrap().to_string();
    assert_ne!(restored, dead_vm);
    assert_eq!(tagged(&pool), (vec![], vec![]), "{again:?}");
    assert_eq!(pool.counts(), (vms_at_start + 1, vdis_at_start + 1));

    // A whole VM as an XVA: imported with the mark, which goes once the
    // import has succeeded. The restore point's default name is taken by
    // the restore above: this one gets "(2)".
    let first_name = again.json()["name"].as_str().unwrap().to_string();
    let xva = xenvault(&[
        "restore", "nightly", "--config", c, "--vm", "vm-01", "--json",
    ]);
    assert_eq!(xva.code, 0, "{xva:?}");
    assert_eq!(
        xva.json()["name"],
        format!("{first_name} (2)").as_str(),
        "{xva:?}"
    );
    assert!(
        !xva.stderr.contains("left by a restore that died"),
        "{xva:?}"
    );
    assert_eq!(tagged(&pool), (vec![], vec![]), "{xva:?}");
    assert_eq!(pool.counts(), (vms_at_start + 2, vdis_at_start + 2));

    // 2. A restore still running (its own slow upload: 2 MiB at 96 KiB/s,
    //    about 21 s), started first: its own opening sweep finds nothing.
    //    Its upload must have taken its fault before the next one is set
    //    (a stream fault is taken when the stream starts).
    let uploaded_before = uploaded(&sim);
    assert!(uploaded_before > 0, "the uploads above are counted");
    slow_next_upload(&sim, 98_304);
    let live = spawn_restore(&cfg, &["--disk", "0"]);
    let (live_vdi, _) = wait_for("VDI being restored", || tagged(&pool).1.into_iter().next());
    wait_for("the live upload to start", || {
        (uploaded(&sim) > uploaded_before).then_some(())
    });

    // One disk into a new VDI, killed while it is written: the VDI stays,
    // marked.
    let pending_before = pending_tasks(&pool);
    slow_next_upload(&sim, 1_048_576);
    let mut child = spawn_restore(&cfg, &["--disk", "0"]);
    let (dead_vdi, _) = wait_for("second VDI being restored", || {
        tagged(&pool).1.into_iter().find(|(u, _)| *u != live_vdi)
    });
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("end of the killed upload", || {
        pending_tasks(&pool)
            .is_subset(&pending_before)
            .then_some(())
    });
    assert!(vdi_exists(&pool, &dead_vdi));

    // A backup run from another state directory leaves both alone: neither
    // run lock is its to judge.
    let elsewhere = dir.path().join("elsewhere.toml");
    std::fs::write(
        &elsewhere,
        std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("state-dir = \"{}\"", dir.path().join("state").display()),
            &format!("state-dir = \"{}\"", dir.path().join("state-2").display()),
        ),
    )
    .unwrap();
    let other = xenvault(&[
        "backup",
        "nightly",
        "--config",
        elsewhere.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(other.code, 0, "{other:?}");
    assert!(vdi_exists(&pool, &dead_vdi), "{other:?}");
    assert!(vdi_exists(&pool, &live_vdi), "{other:?}");

    // A backup run of this state directory removes the dead restore's VDI
    // only, while the live restore goes on.
    let backup = xenvault(&["backup", "nightly", "--config", c, "--json"]);
    assert_eq!(backup.code, 0, "{backup:?}");
    assert!(
        backup
            .stderr
            .contains("removed what restores that died left: 0 VM(s), 1 VDI(s)"),
        "{backup:?}"
    );
    assert!(!vdi_exists(&pool, &dead_vdi), "{backup:?}");
    assert!(vdi_exists(&pool, &live_vdi), "{backup:?}");
    let mut live = live;
    assert!(
        live.try_wait().unwrap().is_none(),
        "the second restore ended before the backup's sweep: the overlap this test needs did not happen"
    );
    let out = live.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["vdi_uuid"], live_vdi.as_str(), "{done}");
    assert_eq!(tagged(&pool), (vec![], vec![]));
}
