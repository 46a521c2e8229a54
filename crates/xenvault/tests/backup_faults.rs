//! Fault injection at every step of `xenvault backup` (real binary, real
//! `xapi-sim` process, faults through `/_sim/faults`): after the failing
//! run, or at the latest the next one, no snapshot and no snapshot VDI made
//! by xenvault is left on the pool, the report names the failed step, and
//! a VM named like a leftover survives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup_support;

use std::path::Path;

use backup_support::{PoolCheck, Sim, backup, points_of, vm_entry, write_config};

struct Case {
    name: &'static str,
    inject: fn(&Sim, &Path),
    /// Words the failure must contain (the VM's outcome, or its cleanup).
    words: &'static [&'static str],
    /// Cleanup faults: the backup is complete, the temporaries may stay
    /// until the next run.
    cleanup: bool,
}

#[test]
fn a_fault_at_any_step_leaves_no_snapshot_and_no_vdi_behind() {
    let cases = [
        Case {
            name: "snapshot",
            inject: |s, _| s.fail_call("VM.snapshot", 1, &["SR_FULL", "0", "0"]),
            words: &["snapshot failed", "SR_FULL"],
            cleanup: false,
        },
        Case {
            name: "template flag",
            inject: |s, _| s.fail_call("VM.set_is_a_template", 1, &["INTERNAL_ERROR", "injected"]),
            words: &["template flag", "INTERNAL_ERROR"],
            cleanup: false,
        },
        Case {
            name: "export start",
            inject: |s, _| s.cut_stream("export", 0),
            words: &["export"],
            cleanup: false,
        },
        Case {
            name: "export mid-stream",
            inject: |s, _| s.cut_stream("export", 1_500_000),
            words: &["export stream"],
            cleanup: false,
        },
        Case {
            name: "write",
            // A plain file where the VM's archive directory must be created.
            inject: |_, archive| {
                std::fs::create_dir_all(archive).unwrap();
                std::fs::write(archive.join("vm-01"), b"in the way").unwrap();
            },
            words: &["writing to the target"],
            cleanup: false,
        },
        Case {
            name: "snapshot destroy",
            inject: |s, _| s.fail_call("VM.destroy", 1, &["INTERNAL_ERROR", "injected"]),
            words: &["snapshot destroy", "INTERNAL_ERROR"],
            cleanup: true,
        },
        Case {
            name: "VDI destroy",
            inject: |s, _| s.fail_call("VDI.destroy", 1, &["INTERNAL_ERROR", "injected"]),
            words: &["VDI destroy", "INTERNAL_ERROR"],
            cleanup: true,
        },
    ];
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M", "--written", "30%"]);
    let pool = PoolCheck::new(&sim);
    for case in &cases {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        let cfg = write_config(&sim, dir.path(), "all-vms = true", "");
        sim.reset_faults();
        (case.inject)(&sim, &archive);
        let out = backup(&cfg);
        assert_ne!(out.code, 0, "{}: {out:?}", case.name);
        let report = out.json();
        let vm = vm_entry(&report, "vm-01");
        let named = if case.cleanup {
            assert_eq!(
                vm["outcome"]["status"], "succeeded",
                "{}: {out:?}",
                case.name
            );
            assert_eq!(vm["cleanup"]["status"], "failed", "{}: {out:?}", case.name);
            let problems = report["problems"].to_string();
            assert!(problems.contains("destroy"), "{}: {out:?}", case.name);
            vm["cleanup"]["reason"].as_str().unwrap().to_string()
        } else {
            assert_eq!(vm["outcome"]["status"], "failed", "{}: {out:?}", case.name);
            vm["outcome"]["reason"].as_str().unwrap().to_string()
        };
        for w in case.words {
            assert!(named.contains(w), "{}: {named:?} lacks {w:?}", case.name);
        }
        // The run log names it too.
        let log = std::fs::read_dir(archive.join("_logs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().unwrap() == "log")
            .unwrap();
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            text.contains(case.words[0]),
            "{}: log lacks the failure:\n{text}",
            case.name
        );
        if !case.cleanup {
            assert_eq!(
                pool.temporaries(),
                (0, 0),
                "{}: left after the run",
                case.name
            );
            assert_eq!(points_of(&archive, "vm-01").0, 0, "{}", case.name);
        }

        // The next run without fault: nothing left, one more complete backup.
        sim.reset_faults();
        let _ = std::fs::remove_file(archive.join("vm-01"));
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let out = backup(&cfg);
        assert_eq!(out.code, 0, "{}: next run: {out:?}", case.name);
        assert_eq!(
            pool.temporaries(),
            (0, 0),
            "{}: after the next run",
            case.name
        );
        let stored = usize::from(case.cleanup);
        assert_eq!(
            points_of(&archive, "vm-01"),
            (stored + 1, 0),
            "{}",
            case.name
        );
    }
}

#[test]
fn vms_named_like_leftover_snapshots_survive() {
    let sim = Sim::start(&["--vms", "2", "--disk-size", "4M"]);
    let pool = PoolCheck::new(&sim);
    let s = pool.session().clone();
    let (lookalike, user_snap) = pool.block_on(async {
        let vms = s.vm().get_all_records().await.unwrap();
        let (vm2, _) = vms.iter().find(|(_, v)| v.name_label == "vm-02").unwrap();
        let a = s
            .vm()
            .clone_vm(vm2, "vm-01 (xenvault backup 20260101T000000Z-deadbeef)")
            .await
            .unwrap();
        let b = s
            .vm()
            .snapshot(
                vm2,
                "vm-02 (xenvault backup 20260101T000000Z-deadbeef)",
                &[],
            )
            .await
            .unwrap();
        (a, b)
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&sim, dir.path(), "names = [\"vm-01\", \"vm-02\"]", "");
    // Leave a real leftover behind (snapshot destroy fails twice in a row).
    sim.fail_call("VM.destroy", 1, &["INTERNAL_ERROR", "injected"]);
    sim.fail_call("VM.destroy", 2, &["INTERNAL_ERROR", "injected"]);
    let _ = backup(&cfg);
    sim.reset_faults();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = backup(&cfg);
    assert_eq!(out.code, 0, "{out:?}");
    let all = pool.block_on(async { s.vm().get_all_records().await.unwrap() });
    assert!(
        all.contains_key(&lookalike),
        "the look-alike VM was destroyed"
    );
    assert!(
        all.contains_key(&user_snap),
        "the user's snapshot was destroyed"
    );
    assert_eq!(
        all.values().filter(|v| v.is_a_snapshot).count(),
        1,
        "only the user's snapshot stays"
    );
}
