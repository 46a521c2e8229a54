//! `xenvault demo` runs end to end on a clean machine and says what it did.

use std::process::Command;

#[test]
fn demo_backs_up_twice_each_way_restores_bit_for_bit_and_leaves_nothing_behind() {
    let keep = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args([
            "demo",
            "--vms",
            "2",
            "--disk-size",
            "8M",
            "--json",
            "--keep",
        ])
        .arg(keep.path())
        .output()
        .expect("run xenvault demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({:?}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("demo --json prints JSON");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    for run in runs {
        let vms = run["vms"].as_array().expect("vms");
        assert_eq!(vms.len(), 2, "{run}");
        for vm in vms {
            assert_eq!(vm["outcome"]["status"], "succeeded", "{vm}");
        }
    }
    assert_eq!(report["restored"]["identical"], true, "{report}");
    assert_eq!(report["restored"]["disks_compared"], 1);
    assert_eq!(report["leftover_snapshots"], 0);
    // The repository part: a full run, then a forever-incremental one through
    // CBT that reads less; the newest restore point restores bit for bit.
    let repo = &report["repository"];
    let repo_runs = repo["runs"].as_array().expect("repository runs");
    assert_eq!(repo_runs.len(), 2, "{repo}");
    let mut read = Vec::new();
    for (run, method) in repo_runs.iter().zip(["nbd-full", "nbd-cbt"]) {
        let vms = run["vms"].as_array().expect("vms");
        assert_eq!(vms.len(), 2, "only the pool's own VMs: {run}");
        let mut bytes = 0;
        for vm in vms {
            assert_eq!(vm["outcome"]["status"], "succeeded", "{vm}");
            let stats = &vm["repository"];
            assert_eq!(stats["disks"][0]["method"], method, "{vm}");
            bytes += stats["bytes_read"].as_u64().unwrap();
        }
        read.push(bytes);
    }
    assert!(read[1] < read[0], "the incremental reads less: {read:?}");
    assert_eq!(repo["restored"]["identical"], true, "{repo}");
    assert_eq!(repo["restore_points"], 4);
    assert_eq!(repo["kept_bases"], 2, "one base per VM for the next run");
    assert!(keep.path().join("repo/config").is_file());
    // Again into the same directory: refused before anything is touched.
    let again = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(["demo", "--vms", "1", "--disk-size", "8M", "--keep"])
        .arg(keep.path())
        .output()
        .expect("run xenvault demo");
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--keep"));
    // The archive is plain files: two complete restore points per VM, each
    // with its success marker.
    let backups = keep.path().join("backups");
    for vm in ["vm-01", "vm-02"] {
        let points: Vec<_> = std::fs::read_dir(backups.join(vm))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        assert_eq!(points.len(), 2, "{vm}: {points:?}");
        for p in points {
            assert!(p.join("vm.xva").is_file(), "{}", p.display());
        }
    }
}

#[test]
fn demo_refuses_oversized_disks_as_bad_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(["demo", "--disk-size", "8G"])
        .output()
        .expect("run xenvault demo");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--disk-size"));
}
