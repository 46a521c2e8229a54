//! Fault injection at every step of a VM backup (engine level, real
//! `xapi-sim` process): after the run, or at the latest the next one, no
//! snapshot and no snapshot VDI made by xenvault is left on the pool, no
//! partial backup counts, and the report names the failed step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup_support;

use std::path::Path;

use backup_support::{Sim, write_config};
use xenvault_engine::job::{self, ExitStatus, RunOptions};
use xenvault_types::report::{CleanupOutcome, Outcome, RunReport};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::tls::TlsPolicy;

async fn session(sim: &Sim) -> Session {
    Client::connect(
        &sim.s("https_url"),
        Credentials::new(sim.s("user"), sim.s("password")),
        TlsPolicy::Pinned(sim.s("fingerprint").parse().unwrap()),
    )
    .await
    .unwrap()
}

async fn temporaries(s: &Session) -> (usize, usize) {
    let vms = s.vm().get_all_records().await.unwrap();
    let vdis = s.vdi().get_all_records().await.unwrap();
    (
        vms.values().filter(|v| v.is_a_snapshot).count(),
        vdis.values().filter(|v| v.is_a_snapshot).count(),
    )
}

/// (complete, incomplete) restore points in the archive.
fn points(archive: &Path) -> (usize, usize) {
    let all = xenvault_engine::archive::list(archive).unwrap_or_default();
    let complete = all.iter().filter(|p| p.is_complete()).count();
    (complete, all.len() - complete)
}

async fn run(cfg: &Path) -> RunReport {
    let config = xenvault_engine::config::load(cfg).unwrap();
    job::run_job(&config, "nightly", RunOptions::default())
        .await
        .unwrap()
        .report
}

/// The failure the report names for `vm`: its failed outcome, or a failed
/// cleanup (then the backup itself is complete and a run problem says so).
fn failure_of(report: &RunReport, vm: &str) -> String {
    let v = report.vms.iter().find(|v| v.name == vm).unwrap();
    match (&v.outcome, &v.cleanup) {
        (Outcome::Failed { reason }, _) => reason.clone(),
        (Outcome::Succeeded, CleanupOutcome::Failed { reason }) => {
            assert!(
                report.problems.iter().any(|p| p.contains(reason.as_str())),
                "the run's problems do not name the cleanup failure: {report:#?}"
            );
            reason.clone()
        }
        other => panic!("{vm} did not fail: {other:?}\n{report:#?}"),
    }
}

struct Case {
    name: &'static str,
    inject: fn(&Sim, &Path),
    /// Words the failure reason must contain.
    words: &'static [&'static str],
    /// Whether the temporaries may survive the failing run (then the next run removes them).
    may_linger: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_any_step_leaves_nothing_behind() {
    let cases = [
        Case {
            name: "snapshot",
            inject: |s, _| s.fail_call("VM.snapshot", 1, &["SR_FULL", "0", "0"]),
            words: &["snapshot failed", "SR_FULL"],
            may_linger: false,
        },
        Case {
            name: "template flag",
            inject: |s, _| s.fail_call("VM.set_is_a_template", 1, &["INTERNAL_ERROR", "injected"]),
            words: &["template flag", "INTERNAL_ERROR"],
            may_linger: false,
        },
        Case {
            name: "export start",
            inject: |s, _| s.cut_stream("export", 0),
            words: &["export"],
            may_linger: false,
        },
        Case {
            name: "export mid-stream",
            inject: |s, _| s.cut_stream("export", 1_500_000),
            words: &["export stream"],
            may_linger: false,
        },
        Case {
            name: "write",
            // A file where the VM's archive directory must go.
            inject: |_, archive| {
                std::fs::create_dir_all(archive).unwrap();
                std::fs::write(archive.join("vm-01"), b"in the way").unwrap();
            },
            words: &["writing to the target"],
            may_linger: false,
        },
        Case {
            name: "snapshot destroy",
            inject: |s, _| s.fail_call("VM.destroy", 1, &["INTERNAL_ERROR", "injected"]),
            words: &["snapshot destroy", "INTERNAL_ERROR"],
            may_linger: true,
        },
        Case {
            name: "VDI destroy",
            inject: |s, _| s.fail_call("VDI.destroy", 1, &["INTERNAL_ERROR", "injected"]),
            words: &["VDI destroy", "INTERNAL_ERROR"],
            may_linger: true,
        },
    ];
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M", "--written", "30%"]);
    let s = session(&sim).await;
    for case in &cases {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        let cfg = write_config(&sim, dir.path(), "all-vms = true", "");
        sim.reset_faults();
        (case.inject)(&sim, &archive);
        let report = run(&cfg).await;
        let reason = failure_of(&report, "vm-01");
        for w in case.words {
            assert!(reason.contains(w), "{}: {reason:?} lacks {w:?}", case.name);
        }
        let left = temporaries(&s).await;
        if !case.may_linger {
            assert_eq!(left, (0, 0), "{}: left after the failing run", case.name);
        }
        // A cleanup failure comes after a complete backup, which counts.
        let stored = usize::from(case.may_linger);
        assert_eq!(
            points(&archive),
            (stored, 0),
            "{}: a failed backup counts",
            case.name
        );

        // The next run (no fault) removes what is left and succeeds.
        sim.reset_faults();
        let _ = std::fs::remove_file(archive.join("vm-01"));
        let report = run(&cfg).await;
        assert_eq!(
            report.vms[0].outcome,
            Outcome::Succeeded,
            "{}: {report:#?}",
            case.name
        );
        assert_eq!(
            temporaries(&s).await,
            (0, 0),
            "{}: after the next run",
            case.name
        );
        assert_eq!(points(&archive), (stored + 1, 0), "{}", case.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_named_like_leftovers_and_user_snapshots_survive() {
    let sim = Sim::start(&["--vms", "2", "--disk-size", "4M"]);
    let s = session(&sim).await;
    let vms = s.vm().get_all_records().await.unwrap();
    let (vm2, _) = vms.iter().find(|(_, v)| v.name_label == "vm-02").unwrap();
    // A VM and a user's snapshot named exactly like xenvault's snapshots.
    let lookalike = s
        .vm()
        .clone_vm(vm2, "vm-02 (xenvault backup 20260101T000000Z-deadbeef)")
        .await
        .unwrap();
    let user_snap = s
        .vm()
        .snapshot(
            vm2,
            "vm-01 (xenvault backup 20260101T000000Z-deadbeef)",
            &[],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&sim, dir.path(), "names = [\"vm-01\", \"vm-02\"]", "");
    // A leftover of a "crashed" run: the snapshot-destroy fault leaves one behind.
    sim.fail_call("VM.destroy", 1, &["INTERNAL_ERROR", "injected"]);
    sim.fail_call("VM.destroy", 2, &["INTERNAL_ERROR", "injected"]);
    let _ = run(&cfg).await;
    sim.reset_faults();
    let report = run(&cfg).await;
    assert!(
        report.vms.iter().all(|v| v.outcome == Outcome::Succeeded),
        "{report:#?}"
    );
    let all = s.vm().get_all_records().await.unwrap();
    assert!(
        all.contains_key(&lookalike),
        "the look-alike VM was destroyed"
    );
    assert!(
        all.contains_key(&user_snap),
        "the user's snapshot was destroyed"
    );
    // Only the user's snapshot remains.
    assert_eq!(all.values().filter(|v| v.is_a_snapshot).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_n_plus_2_runs_each_vm_has_n_backups_and_failures_never_count() {
    let sim = Sim::start(&["--vms", "2", "--disk-size", "4M"]);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let cfg = write_config(
        &sim,
        dir.path(),
        "all-vms = true\n[jobs.nightly.retention]\nkeep-last = 2",
        "",
    );
    for i in 0..4 {
        let report = run(&cfg).await;
        assert!(
            report.vms.iter().all(|v| v.outcome == Outcome::Succeeded),
            "run {i}: {report:#?}"
        );
        // Distinct timestamps (second resolution).
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    assert_eq!(points(&archive), (4, 0));
    let list = xenvault_engine::archive::list(&archive).unwrap();
    let mut per_vm = std::collections::BTreeMap::new();
    for p in list.iter().filter(|p| p.is_complete()) {
        *per_vm.entry(p.subject().unwrap().key.clone()).or_insert(0) += 1;
    }
    assert_eq!(per_vm.len(), 2);
    assert!(per_vm.values().all(|n| *n == 2), "{per_vm:?}");

    // A run cut mid-stream leaves nothing counted; the next run removes its remains.
    sim.cut_stream("export", 1_500_000);
    let report = run(&cfg).await;
    assert_eq!(
        report
            .vms
            .iter()
            .filter(|v| matches!(v.outcome, Outcome::Failed { .. }))
            .count(),
        1,
        "{report:#?}"
    );
    assert_eq!(points(&archive).0, 4);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let report = run(&cfg).await;
    assert!(report.vms.iter().all(|v| v.outcome == Outcome::Succeeded));
    assert_eq!(points(&archive), (4, 0));
    let s = session(&sim).await;
    assert_eq!(temporaries(&s).await, (0, 0));
    let _ = ExitStatus::Success;
}

/// A run that died between `VM.snapshot` and journaling the snapshot's UUID
/// left a tagged snapshot known only by its intent: the next run's sweep finds
/// it among the source VM's snapshots by its token and destroys it with its
/// VDIs; the tags on the source VM go too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_known_only_by_its_intent_is_swept() {
    use xenvault_engine::journal::{Event, Journal, RunContext, TAG_JOB, TAG_RUN, TAG_TOKEN};
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M"]);
    let s = session(&sim).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&sim, dir.path(), "all-vms = true", "");
    let vms = s.vm().get_all_records().await.unwrap();
    let (vm_ref, vm) = vms.iter().find(|(_, v)| v.name_label == "vm-01").unwrap();
    // What a crashed run leaves: the intent, tags on the source VM, a tagged snapshot.
    let ctx = RunContext {
        journal: Journal::open(&dir.path().join("state")).unwrap(),
        pool: "sim".into(),
        job: "nightly".into(),
        run_id: "crashed-run".into(),
    };
    ctx.record(
        "tok-1",
        Event::Intent {
            source_vm: vm.uuid.clone(),
        },
    )
    .unwrap();
    for (k, v) in [
        (TAG_TOKEN, "tok-1"),
        (TAG_RUN, "crashed-run"),
        (TAG_JOB, "nightly"),
    ] {
        s.vm().put_other_config(vm_ref, k, v).await.unwrap();
    }
    let snap = s.vm().snapshot(vm_ref, "whatever name", &[]).await.unwrap();
    assert_eq!(temporaries(&s).await, (1, 1));

    let report = run(&cfg).await;
    assert_eq!(report.vms[0].outcome, Outcome::Succeeded, "{report:#?}");
    assert!(report.problems.is_empty(), "{report:#?}");
    assert_eq!(temporaries(&s).await, (0, 0));
    assert!(
        s.vm().get_record(&snap).await.is_err(),
        "the crashed run's snapshot is still there"
    );
    let src = s.vm().get_record(vm_ref).await.unwrap();
    assert!(
        !src.other_config.keys().any(|k| k.starts_with("xenvault:")),
        "{:?}",
        src.other_config
    );
    assert!(ctx.journal.outstanding(None).unwrap().is_empty());
}

/// A snapshot that inherited a crashed run's token from the source VM long
/// after that run's intent is a user's snapshot: the sweep leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_snapshot_with_an_inherited_token_survives() {
    use xenvault_engine::journal::{Entry, Event, Journal, TAG_JOB, TAG_RUN, TAG_TOKEN};
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M"]);
    let s = session(&sim).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&sim, dir.path(), "all-vms = true", "");
    let vms = s.vm().get_all_records().await.unwrap();
    let (vm_ref, vm) = vms.iter().find(|(_, v)| v.name_label == "vm-01").unwrap();
    let journal = Journal::open(&dir.path().join("state")).unwrap();
    journal
        .append(&Entry {
            at: time::OffsetDateTime::now_utc() - time::Duration::hours(3),
            pool: "sim".into(),
            run_id: "crashed-long-ago".into(),
            job: "nightly".into(),
            token: "tok-old".into(),
            event: Event::Intent {
                source_vm: vm.uuid.clone(),
            },
        })
        .unwrap();
    for (k, v) in [
        (TAG_TOKEN, "tok-old"),
        (TAG_RUN, "crashed-long-ago"),
        (TAG_JOB, "nightly"),
    ] {
        s.vm().put_other_config(vm_ref, k, v).await.unwrap();
    }
    let user_snap = s
        .vm()
        .snapshot(vm_ref, "user's snapshot", &[])
        .await
        .unwrap();

    let report = run(&cfg).await;
    assert_eq!(report.vms[0].outcome, Outcome::Succeeded, "{report:#?}");
    assert!(
        s.vm().get_record(&user_snap).await.is_ok(),
        "the user's snapshot was destroyed"
    );
    let src = s.vm().get_record(vm_ref).await.unwrap();
    assert!(
        !src.other_config.contains_key(TAG_TOKEN),
        "{:?}",
        src.other_config
    );
    assert!(journal.outstanding(None).unwrap().is_empty());
}
