//! Checks before any snapshot, end to end: an SR over the threshold skips
//! its VM (others go on), a target that cannot be written or is full skips
//! the run — each with the reason in the plan, the log and the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup_support;

use backup_support::{PoolCheck, Sim, backup, plan, vm_entry, write_config};

const TWO_SRS: &str = r#"
templates = false
[pool]
name = "checks"
[[hosts]]
name = "h1"
[[srs]]
name = "Small SR"
size = "16M"
host = 0
[[srs]]
name = "Big SR"
size = "1T"
host = 0
default = true
[[vms]]
name = "on-full-sr"
power_state = "Running"
[[vms.disks]]
size = "8M"
written = "60%"
sr = 0
[[vms]]
name = "on-big-sr"
[[vms.disks]]
size = "4M"
written = "10%"
sr = 1
"#;

#[test]
fn a_vm_on_an_sr_over_the_threshold_is_skipped_and_the_others_run() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(&scenario, TWO_SRS).unwrap();
    let sim = Sim::start(&["--scenario", scenario.to_str().unwrap()]);
    let pool = PoolCheck::new(&sim);
    let cfg = write_config(
        &sim,
        dir.path(),
        "all-vms = true\nsr-usage-threshold = 20",
        "",
    );

    let p = plan(&cfg);
    assert_eq!(p.code, 0, "{p:?}");
    let pj = p.json();
    let full = pj["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "on-full-sr")
        .unwrap();
    let reason = full["skip"].as_str().unwrap();
    assert!(
        reason.contains("Small SR") && reason.contains("20% threshold"),
        "{reason}"
    );
    let big = pj["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "on-big-sr")
        .unwrap();
    assert!(big["skip"].is_null(), "{p:?}");

    let out = backup(&cfg);
    assert_eq!(out.code, 3, "partial: {out:?}");
    let report = out.json();
    let skipped = vm_entry(&report, "on-full-sr");
    assert_eq!(skipped["outcome"]["status"], "skipped", "{out:?}");
    assert!(
        skipped["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("threshold")
    );
    assert_eq!(
        vm_entry(&report, "on-big-sr")["outcome"]["status"],
        "succeeded"
    );
    let log = newest_log(&dir.path().join("archive"));
    assert!(
        log.contains("on-full-sr") && log.contains("threshold"),
        "{log}"
    );
    assert_eq!(pool.temporaries(), (0, 0));
}

#[test]
fn a_target_that_cannot_be_written_skips_the_run() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M"]);
    let pool = PoolCheck::new(&sim);
    let before = pool.counts();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&sim, dir.path(), "all-vms = true", "");
    // The target's parent is a plain file: nothing can be created there.
    std::fs::write(dir.path().join("blocker"), b"x").unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("path = \"{}\"", dir.path().join("archive").display()),
        &format!(
            "path = \"{}\"",
            dir.path().join("blocker/archive").display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();

    let p = plan(&cfg);
    assert_eq!(p.code, 1, "{p:?}");
    let pj = p.json();
    let checks = pj["target_checks"].to_string();
    assert!(
        checks.contains("target not reachable") || checks.contains("not writable"),
        "{checks}"
    );
    assert!(
        pj["vms"][0]["skip"].as_str().unwrap().contains("target"),
        "{p:?}"
    );

    let out = backup(&cfg);
    assert_eq!(out.code, 1, "{out:?}");
    let report = out.json();
    let vm = vm_entry(&report, "vm-01");
    assert_eq!(vm["outcome"]["status"], "skipped");
    assert!(
        vm["outcome"]["reason"].as_str().unwrap().contains("target"),
        "{out:?}"
    );
    assert_eq!(pool.counts(), before, "nothing may be created on the pool");
}

#[test]
fn a_full_target_skips_the_vms_that_do_not_fit() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M", "--written", "50%"]);
    let pool = PoolCheck::new(&sim);
    let before = pool.counts();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&sim, dir.path(), "all-vms = true", "");
    // reserved-space: the room the run must leave free on the target. A huge
    // value makes any target "full" without filling a disk.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[targets.archive]\n",
        "[targets.archive]\nreserved-space = \"1000T\"\n",
    );
    std::fs::write(&cfg, text).unwrap();

    let p = plan(&cfg);
    let pj = p.json();
    assert!(
        pj["vms"][0]["skip"]
            .as_str()
            .unwrap()
            .contains("target full"),
        "{p:?}"
    );

    let out = backup(&cfg);
    assert_ne!(out.code, 0, "{out:?}");
    let report = out.json();
    let vm = vm_entry(&report, "vm-01");
    assert_eq!(vm["outcome"]["status"], "skipped");
    assert!(
        vm["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("target full"),
        "{out:?}"
    );
    let log = newest_log(&dir.path().join("archive"));
    assert!(log.contains("target full"), "{log}");
    assert_eq!(pool.counts(), before, "nothing may be created on the pool");
}

fn newest_log(archive: &std::path::Path) -> String {
    let log = std::fs::read_dir(archive.join("_logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().unwrap() == "log")
        .max()
        .unwrap();
    std::fs::read_to_string(log).unwrap()
}

#[test]
fn a_second_run_of_a_running_job_is_refused_before_touching_the_pool() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M"]);
    let pool = PoolCheck::new(&sim);
    let before = pool.counts();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&sim, dir.path(), "all-vms = true", "");
    // A run of the job is under way (its lock is held, as `run_job` holds it).
    let journal = xenvault_engine::journal::Journal::open(&dir.path().join("state")).unwrap();
    let running = journal
        .lock_job("nightly", "20261122T013000Z-0001")
        .unwrap();

    let out = backup(&cfg);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("job nightly is already running (run 20261122T013000Z-0001, pid "),
        "{out:?}"
    );
    assert_eq!(pool.counts(), before, "nothing may be created on the pool");
    assert_eq!(
        backup_support::points_of(&dir.path().join("archive"), "vm-01").0,
        0
    );

    // Once that run ends, the job runs again.
    drop(running);
    let out = backup(&cfg);
    assert_eq!(out.code, 0, "{out:?}");
}
