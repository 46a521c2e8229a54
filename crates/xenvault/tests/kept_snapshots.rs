//! `xenvault snapshots list|release` and the run-level problem about kept
//! snapshots nothing will release (real binary, real `xapi-sim` process):
//! a repository job keeps one base snapshot per VM; once the job is renamed
//! in the configuration its bases are named by every run and by `list`,
//! and `release --job` removes exactly them (snapshot VMs and VDIs), while
//! the bases of a job still in use are refused without `--force`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod backup_support;

use std::collections::BTreeMap;
use std::path::Path;

use backup_support::{Out, PoolCheck, Sim, write_repository_config, xenvault};

/// Every snapshot VM on the pool: uuid → its `xenvault:base` tag.
fn bases(pool: &PoolCheck) -> BTreeMap<String, Option<String>> {
    pool.block_on(async {
        let all = pool.session().vm().get_all_records().await.unwrap();
        all.into_values()
            .filter(|v| v.is_a_snapshot)
            .map(|v| (v.uuid, v.other_config.get("xenvault:base").cloned()))
            .collect()
    })
}

fn run_job(cfg: &Path, job: &str) -> Out {
    xenvault(&["backup", job, "--config", cfg.to_str().unwrap(), "--json"])
}

fn snapshots(cfg: &Path, args: &[&str]) -> Out {
    let mut all = vec!["snapshots"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", cfg.to_str().unwrap()]);
    xenvault(&all)
}

fn listed(cfg: &Path) -> Vec<serde_json::Value> {
    let out = snapshots(cfg, &["list", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    out.json().as_array().unwrap().clone()
}

#[test]
fn bases_of_a_removed_job_are_named_and_released() {
    let sim = Sim::start(&["--vms", "2", "--disk-size", "8M", "--written", "40%"]);
    let pool = PoolCheck::new(&sim);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_repository_config(&sim, dir.path(), "all-vms = true\ncbt = \"enable\"", None);
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert_eq!(
        snapshots(&cfg, &["list"]).stdout.trim(),
        "No snapshots are kept on any pool."
    );

    // The job keeps one base per VM; they are in use.
    let first = run_job(&cfg, "nightly");
    assert_eq!(first.code, 0, "{first:?}");
    let old: BTreeMap<_, _> = bases(&pool);
    assert_eq!(old.len(), 2, "{old:?}");
    assert!(
        old.values().all(|b| b.as_deref() == Some("nightly")),
        "{old:?}"
    );
    let list = listed(&cfg);
    assert_eq!(list.len(), 2, "{list:#?}");
    for e in &list {
        assert_eq!(e["job"], "nightly", "{e:#}");
        assert_eq!(e["role"], "base", "{e:#}");
        assert_eq!(e["standing"], "in-use", "{e:#}");
        assert!(old.contains_key(e["snapshot"].as_str().unwrap()), "{e:#}");
    }

    // A job still using its bases: refused without --force, nothing touched.
    let refused = snapshots(&cfg, &["release", "--job", "nightly"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("--force") && refused.stderr.contains("full"),
        "{refused:?}"
    );
    assert_eq!(bases(&pool), old);

    // The job is renamed: its bases are left behind. Every run names them.
    std::fs::write(&cfg, text.replace("[jobs.nightly]", "[jobs.weekly]")).unwrap();
    let plan = xenvault(&[
        "plan",
        "weekly",
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(plan.code, 0, "a warning, not an error: {plan:?}");
    let warned: Vec<String> = plan.json()["leftover_checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.to_string().contains("release --job nightly"))
        .map(|c| c.to_string())
        .collect();
    assert_eq!(warned.len(), 1, "{plan:?}");
    assert!(warned[0].contains("warn"), "{warned:?}");
    let second = run_job(&cfg, "weekly");
    assert_eq!(
        second.code, 3,
        "a problem makes the run partial: {second:?}"
    );
    let report = second.json();
    let problems: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("2 snapshot(s) kept for job \"nightly\"")
            && problems[0].contains("not in the configuration")
            && problems[0].contains("xenvault snapshots release --job nightly"),
        "{problems:?}"
    );
    let both = bases(&pool);
    assert_eq!(both.len(), 4, "{both:?}");
    let list = listed(&cfg);
    let standing = |job: &str| -> Vec<String> {
        list.iter()
            .filter(|e| e["job"] == job)
            .map(|e| e["standing"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(standing("nightly"), ["job-gone", "job-gone"], "{list:#?}");
    assert_eq!(standing("weekly"), ["in-use", "in-use"], "{list:#?}");
    let text_list = snapshots(&cfg, &["list"]);
    assert!(
        text_list
            .stdout
            .contains("Nothing will release the snapshots of job nightly: xenvault snapshots release --job nightly"),
        "{text_list:?}"
    );

    // A dry run names them and changes nothing.
    let dry = snapshots(
        &cfg,
        &["release", "--job", "nightly", "--dry-run", "--json"],
    );
    assert_eq!(dry.code, 0, "{dry:?}");
    let dry = dry.json();
    assert_eq!(dry["selected"].as_array().unwrap().len(), 2, "{dry:#}");
    assert_eq!(dry["destroyed_vms"].as_array().unwrap().len(), 0, "{dry:#}");
    assert_eq!(bases(&pool), both);

    // The release removes exactly the old job's snapshots and their VDIs.
    let (vms_before, vdis_before) = pool.counts();
    let released = snapshots(&cfg, &["release", "--job", "nightly", "--json"]);
    assert_eq!(released.code, 0, "{released:?}");
    let released = released.json();
    let mut gone: Vec<&str> = released["destroyed_vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    gone.sort_unstable();
    let old_uuids: Vec<&str> = old.keys().map(String::as_str).collect();
    assert_eq!(gone, old_uuids, "{released:#}");
    assert_eq!(
        released["destroyed_vdis"].as_array().unwrap().len(),
        2,
        "one disk per VM: {released:#}"
    );
    assert!(
        released["errors"].as_array().unwrap().is_empty(),
        "{released:#}"
    );
    assert_eq!(pool.counts(), (vms_before - 2, vdis_before - 2));
    let left = bases(&pool);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.keys().all(|u| !old.contains_key(u)), "{left:?}");
    assert!(
        left.values().all(|b| b.as_deref() == Some("weekly")),
        "{left:?}"
    );
    assert!(listed(&cfg).iter().all(|e| e["job"] == "weekly"));

    // Nothing is left to name: the next run is clean, and incremental.
    let third = run_job(&cfg, "weekly");
    assert_eq!(third.code, 0, "{third:?}");
    assert!(
        third.json()["problems"].as_array().unwrap().is_empty(),
        "{third:?}"
    );
    let again = snapshots(&cfg, &["release", "--job", "nightly"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again
            .stdout
            .contains("No snapshots are kept for job nightly"),
        "{again:?}"
    );

    // --force releases the bases of a job in use; its next backup is full.
    let forced = snapshots(&cfg, &["release", "--job", "weekly", "--force", "--json"]);
    assert_eq!(forced.code, 0, "{forced:?}");
    assert_eq!(forced.json()["destroyed_vms"].as_array().unwrap().len(), 2);
    assert!(bases(&pool).is_empty(), "{:?}", bases(&pool));
    let fourth = run_job(&cfg, "weekly");
    assert_eq!(fourth.code, 0, "{fourth:?}");
    assert_eq!(bases(&pool).len(), 2);

    // The job now writes to an archive: its bases are of no use any more
    // and go without --force.
    let archive = dir.path().join("plain-archive");
    std::fs::create_dir(&archive).unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("target = \"archive\"", "target = \"plain\"")
        .replace("cbt = \"enable\"", "")
        + &format!("\n[targets.plain]\npath = \"{}\"\n", archive.display());
    std::fs::write(&cfg, text).unwrap();
    let list = listed(&cfg);
    assert_eq!(list.len(), 2, "{list:#?}");
    assert!(
        list.iter().all(|e| e["standing"] == "not-repository"),
        "{list:#?}"
    );
    let released = snapshots(&cfg, &["release", "--job", "weekly"]);
    assert_eq!(released.code, 0, "{released:?}");
    assert!(
        released
            .stdout
            .contains("Removed 2 snapshot VM(s) and 2 VDI(s)."),
        "{released:?}"
    );
    assert!(bases(&pool).is_empty(), "{:?}", bases(&pool));
}
