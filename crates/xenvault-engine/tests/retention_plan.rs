//! Retention over a real archive directory: N+2 runs keep exactly N complete
//! backups per VM (with a per-VM override), partial ones never count and are
//! removed unless a writer holds them, pre_clean, pool metadata and hosts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use xenvault_engine::archive::layout::LOCK_FILE;
use xenvault_engine::archive::retention::{self, PruneAction, PruneReason, RetentionRules};
use xenvault_engine::archive::{self, ArchiveWriter, RunInfo, Subject, SubjectKey};

fn run(id: &str) -> RunInfo {
    RunInfo {
        job: "nightly".into(),
        run_id: id.into(),
        pool: "pool1".into(),
    }
}

fn night(n: i64) -> OffsetDateTime {
    datetime!(2026-11-01 01:00:00 UTC) + Duration::days(n)
}

fn commit(root: &Path, subject: Subject, n: i64) {
    let w = ArchiveWriter::begin(root, subject, run(&format!("run-{n}")), night(n)).unwrap();
    w.put_file("vm.xva", format!("backup {n}").as_bytes())
        .unwrap();
    w.commit().unwrap();
}

fn complete_count(root: &Path, key: &SubjectKey) -> usize {
    archive::list_subject(root, key).unwrap().len()
}

fn rules(
    default_keep: Option<u32>,
    keep: &[(SubjectKey, u32)],
    protected: &[&str],
) -> RetentionRules {
    RetentionRules {
        keep: keep.iter().cloned().collect::<BTreeMap<_, _>>(),
        default_keep,
        protected_runs: protected.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn after_n_plus_2_runs_each_vm_keeps_exactly_n_with_override() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let n = 3u32;
    let a = Subject::vm("uuid-a", "alpha");
    let b = Subject::vm("uuid-b", "beta");
    let other = Subject::vm("uuid-other", "not-in-this-job");
    let r = rules(None, &[(a.key.clone(), n), (b.key.clone(), 1)], &[]);
    for night_no in 0..(n as i64 + 2) {
        commit(root, a.clone(), night_no);
        commit(root, b.clone(), night_no);
        commit(root, other.clone(), night_no);
        // A failed run of alpha each night leaves a partial behind (crash).
        let failed = ArchiveWriter::begin(
            root,
            a.clone(),
            run("crashed"),
            night(night_no) + Duration::hours(1),
        )
        .unwrap();
        failed.put_file("vm.xva", b"half").unwrap();
        let partial = failed.partial_dir().to_path_buf();
        std::mem::forget(failed); // keeps its lock: "another process is still writing"
        // Simulate the crash: the lock goes away with the process.
        std::fs::remove_file(partial.join(LOCK_FILE)).unwrap();
        std::fs::write(
            partial.join(LOCK_FILE),
            r#"{"run_id":"crashed","job":"nightly","pid":1,"started":"2026-11-01T01:00:00Z"}"#,
        )
        .unwrap();

        let points = archive::list(root).unwrap();
        let plan = retention::plan(&points, &r);
        let outcome = retention::apply(&plan);
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
        assert!(
            !root.join("alpha").read_dir().unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")),
            "partial left after night {night_no}"
        );
    }
    assert_eq!(complete_count(root, &a.key), n as usize);
    assert_eq!(complete_count(root, &b.key), 1);
    assert_eq!(
        complete_count(root, &other.key),
        n as usize + 2,
        "VMs without a rule are left alone"
    );
    // The newest ones survive.
    let kept: Vec<String> = archive::list_subject(root, &a.key)
        .unwrap()
        .iter()
        .map(|p| p.dir_name.clone())
        .collect();
    assert_eq!(
        kept,
        ["20261103-010000", "20261104-010000", "20261105-010000"]
    );
    let b_kept = archive::list_subject(root, &b.key).unwrap();
    assert_eq!(b_kept[0].dir_name, "20261105-010000");
    // Nothing hidden is left anywhere.
    for dir in ["alpha", "beta"] {
        for e in root.join(dir).read_dir().unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "{dir}/{name} left behind");
        }
    }
}

#[test]
fn partial_ones_never_count_and_live_ones_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let a = Subject::vm("uuid-a", "alpha");
    commit(root, a.clone(), 0);
    commit(root, a.clone(), 1);
    // A newer partial, still being written (lock held by a live writer).
    let live = ArchiveWriter::begin(root, a.clone(), run("other-run"), night(2)).unwrap();
    // A partial of the current run whose lock cannot be seen (e.g. NFS): protected by run id.
    let current = root.join("alpha/.20261104-010000.partial");
    std::fs::create_dir_all(&current).unwrap();
    std::fs::write(
        current.join(LOCK_FILE),
        r#"{"run_id":"me","job":"nightly","pid":1,"started":"2026-11-04T01:00:00Z"}"#,
    )
    .unwrap();

    let points = archive::list(root).unwrap();
    let plan = retention::plan(&points, &rules(None, &[(a.key.clone(), 1)], &["me"]));
    let by_name = |suffix: &str| {
        plan.decisions
            .iter()
            .find(|d| d.path.ends_with(suffix))
            .unwrap()
    };
    // The partial does not count: of the two complete ones, the newest is kept.
    assert_eq!(by_name("20261102-010000").action, PruneAction::Keep);
    assert_eq!(by_name("20261101-010000").action, PruneAction::Remove);
    assert!(matches!(
        by_name("20261101-010000").reason,
        PruneReason::BeyondRetention { rank: 2, keep: 1 }
    ));
    assert_eq!(
        by_name(".20261103-010000.partial").reason,
        PruneReason::InUse
    );
    assert_eq!(
        by_name(".20261103-010000.partial").action,
        PruneAction::Keep
    );
    assert!(
        matches!(&by_name(".20261104-010000.partial").reason, PruneReason::ProtectedRun { run_id } if run_id == "me")
    );
    for d in &plan.decisions {
        assert!(!d.reason.to_string().is_empty());
    }
    let out = retention::apply(&plan);
    assert_eq!(out.removed.len(), 1);
    assert!(live.partial_dir().exists());
    assert!(current.exists());
    // The writer finishes later: now it counts.
    live.put_file("vm.xva", b"late").unwrap();
    live.commit().unwrap();
    assert_eq!(complete_count(root, &a.key), 2);

    // Without protection the current run's leftover goes.
    let points = archive::list(root).unwrap();
    let out = retention::apply(&retention::plan(
        &points,
        &rules(None, &[(a.key.clone(), 5)], &[]),
    ));
    assert_eq!(out.removed, vec![current.clone()]);
    assert!(!current.exists());
}

#[test]
fn a_removal_is_rechecked_against_the_lock_when_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let a = Subject::vm("uuid-a", "alpha");
    let w = ArchiveWriter::begin(root, a.clone(), run("r"), night(0)).unwrap();
    // A stale plan says "remove" (as if made before the writer started).
    let plan = retention::PrunePlan {
        decisions: vec![retention::PruneDecision {
            path: w.partial_dir().to_path_buf(),
            subject: None,
            action: PruneAction::Remove,
            reason: PruneReason::Incomplete {
                detail: "stale".into(),
            },
        }],
    };
    let out = retention::apply(&plan);
    assert_eq!(out.skipped_in_use.len(), 1);
    assert!(w.partial_dir().exists());
    w.abort().unwrap();
}

#[test]
fn pre_clean_makes_room_down_to_n_minus_1_first() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let a = Subject::vm("uuid-a", "alpha");
    for i in 0..4 {
        commit(root, a.clone(), i);
    }
    let points = archive::list(root).unwrap();
    let plan = retention::pre_clean_plan(&points, &a, root, 3, &RetentionRules::default());
    let removed: Vec<String> = plan
        .removals()
        .map(|d| d.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(removed, ["20261101-010000", "20261102-010000"]);
    assert!(
        plan.removals()
            .all(|d| matches!(d.reason, PruneReason::PreClean { keep: 3, .. }))
    );
    retention::apply(&plan);
    assert_eq!(complete_count(root, &a.key), 2);
    // Then the new backup, and normal retention: exactly 3.
    commit(root, a.clone(), 10);
    let points = archive::list(root).unwrap();
    retention::apply(&retention::plan(
        &points,
        &rules(None, &[(a.key.clone(), 3)], &[]),
    ));
    assert_eq!(complete_count(root, &a.key), 3);

    // keep = 1: pre_clean never removes the only good backup.
    let points = archive::list(root).unwrap();
    let plan = retention::pre_clean_plan(&points, &a, root, 1, &RetentionRules::default());
    assert_eq!(plan.removals().count(), 0);
}

#[test]
fn pool_metadata_and_hosts_have_their_own_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let pool = Subject::pool_metadata("pool1");
    let host = Subject::host("host-uuid", "xcp-a");
    let vm = Subject::vm("uuid-a", "alpha");
    for i in 0..5 {
        commit(root, pool.clone(), i);
        commit(root, host.clone(), i);
        commit(root, vm.clone(), i);
    }
    assert!(root.join("_pool-metadata/pool1/20261101-010000").is_dir());
    assert!(root.join("_hosts/xcp-a/20261101-010000").is_dir());
    let r = rules(
        None,
        &[
            (pool.key.clone(), 2),
            (host.key.clone(), 4),
            (vm.key.clone(), 3),
        ],
        &[],
    );
    retention::apply(&retention::plan(&archive::list(root).unwrap(), &r));
    assert_eq!(complete_count(root, &pool.key), 2);
    assert_eq!(complete_count(root, &host.key), 4);
    assert_eq!(complete_count(root, &vm.key), 3);
    // default_keep manages every subject; keep 0 is treated as 1.
    retention::apply(&retention::plan(
        &archive::list(root).unwrap(),
        &rules(Some(0), &[], &[]),
    ));
    for key in [&pool.key, &host.key, &vm.key] {
        assert_eq!(complete_count(root, key), 1);
    }
}
