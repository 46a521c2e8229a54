//! Selection with a weekday file (the shipped `examples/weekdays.txt`), for
//! each day of the week, and with tags, power states, overrides and typos.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use xenvault_engine::config;
use xenvault_engine::selection::{Severity, SkipReason, VmCandidate, select};
use xenvault_types::config::{ExportMode, JobConfig, PowerState, Weekday};

fn vm(name: &str) -> VmCandidate {
    VmCandidate {
        uuid: format!("uuid-{name}"),
        name: name.to_string(),
        tags: vec![],
        power_state: Some(PowerState::Running),
        is_control_domain: false,
        is_a_template: false,
        is_a_snapshot: false,
        is_default_template: false,
        being_restored: false,
        pool: "prod".to_string(),
    }
}

/// Loads `job_body` as `[jobs.j]` of a configuration in a temporary directory.
fn load_job(job_body: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, JobConfig) {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    fs::write(&pw, "secret\n").unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    let toml = format!(
        "[pools.prod]\nurl = \"https://pool\"\npassword-file = \"pw\"\n\n[targets.t]\npath = \"/backups\"\n\n[jobs.j]\npool = \"prod\"\ntarget = \"t\"\n{job_body}"
    );
    let path = dir.path().join("xenvault.toml");
    fs::write(&path, toml).unwrap();
    let cfg = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let job = cfg.job("j").unwrap().clone();
    (dir, job)
}

#[test]
fn the_example_weekday_file_selects_the_right_vms_each_day() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/weekdays.txt");
    let (_dir, job) = load_job(
        &format!("weekday-file = {:?}\n", example.display().to_string()),
        &[],
    );
    let candidates: Vec<VmCandidate> = [
        "web01",
        "web02",
        "db-01",
        "db-02",
        "mail",
        "fileserver",
        "dns1",
        "other",
    ]
    .iter()
    .map(|n| vm(n))
    .collect();
    let expected: [(Weekday, &[&str]); 7] = [
        (Weekday::Monday, &["dns1", "web01", "web02"]),
        (Weekday::Tuesday, &["db-01", "db-02", "dns1"]),
        (Weekday::Wednesday, &["dns1", "mail"]),
        (Weekday::Thursday, &["dns1", "web01", "web02"]),
        (Weekday::Friday, &["db-01", "db-02", "dns1"]),
        (Weekday::Saturday, &["dns1", "fileserver"]),
        (Weekday::Sunday, &["dns1", "fileserver"]),
    ];
    for (day, names) in expected {
        let sel = select(&job, &candidates, day);
        let got: Vec<&str> = sel.chosen.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(got, names, "{day}");
        assert!(sel.problems.is_empty(), "{day}: {:?}", sel.problems);
        // Every VM not chosen has a reason.
        assert_eq!(sel.chosen.len() + sel.skipped.len(), candidates.len());
        for c in &sel.chosen {
            assert!(
                c.why[0].starts_with(&format!("weekday file: {day} (weekdays.txt:")),
                "{:?}",
                c.why
            );
        }
    }
    let sel = select(&job, &candidates, Weekday::Tuesday);
    let web01 = sel.skipped.iter().find(|s| s.name == "web01").unwrap();
    assert_eq!(
        web01.reason,
        SkipReason::NotToday {
            days: vec![Weekday::Monday, Weekday::Thursday],
            today: Weekday::Tuesday
        }
    );
    assert_eq!(
        web01.reason.to_string(),
        "the weekday file lists it on Monday, Thursday only; today is Tuesday"
    );
    let other = sel.skipped.iter().find(|s| s.name == "other").unwrap();
    assert_eq!(other.reason, SkipReason::NotSelected);
}

#[test]
fn unknown_names_in_the_weekday_file_are_reported_with_suggestions() {
    let (_dir, job) = load_job(
        "weekday-file = \"w.txt\"\n",
        &[("w.txt", "Monday: web1, Mail, db-*\nfriday: fileserver\n")],
    );
    let sel = select(
        &job,
        &[vm("web01"), vm("mail"), vm("fileserver")],
        Weekday::Monday,
    );
    assert!(sel.chosen.is_empty());
    let shown: Vec<String> = sel.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        shown,
        vec![
            "error: w.txt:1: no VM is named \"web1\"; did you mean \"web01\"?",
            "error: w.txt:1: no VM is named \"Mail\"; did you mean \"mail\"?",
            "warning: w.txt:1: \"db-*\" matches no VM",
        ]
    );
    assert_eq!(sel.problems[0].severity, Severity::Error);
}

#[test]
fn tags_power_states_excludes_and_overrides() {
    let (_dir, job) = load_job(
        "tags = [\"backup\"]\nregexes = [\"db\"]\npower-states = [\"running\", \"halted\"]\nexclude-tags = [\"no-backup\"]\n\
         [jobs.j.retention]\nkeep-last = 5\n\
         [[jobs.j.rule]]\nregex = \"db-\"\nkeep-last = 9\nmode = \"vhd\"\n\
         [jobs.j.vm.\"db-02\"]\nkeep-last = 30\n\
         [jobs.j.vm.\"uuid-app\"]\nmode = \"raw\"\ndisks = \"boot\"\n",
        &[],
    );
    let mut app = vm("app");
    app.tags = vec!["backup".into()];
    let mut paused = vm("db-03");
    paused.power_state = Some(PowerState::Paused);
    let mut opted_out = vm("db-04");
    opted_out.tags = vec!["no-backup".into()];
    let mut halted = vm("dbx");
    halted.power_state = Some(PowerState::Halted);
    let mut other_pool = vm("db-05");
    other_pool.pool = "lab".into();
    let candidates = vec![
        app,
        vm("db-01"),
        vm("db-02"),
        paused,
        opted_out,
        halted,
        other_pool,
    ];
    let sel = select(&job, &candidates, Weekday::Monday);
    let got: Vec<(&str, ExportMode, u32)> = sel
        .chosen
        .iter()
        .map(|c| (c.name.as_str(), c.mode, c.retention.keep_last))
        .collect();
    assert_eq!(
        got,
        vec![
            ("app", ExportMode::Raw, 5),
            ("db-01", ExportMode::Vhd, 9),
            ("db-02", ExportMode::Vhd, 30),
            ("dbx", ExportMode::Xva, 5),
        ]
    );
    let reason = |n: &str| {
        sel.skipped
            .iter()
            .find(|s| s.name == n)
            .unwrap()
            .reason
            .to_string()
    };
    assert_eq!(
        reason("db-03"),
        "it is paused; the job backs up only running, halted VMs"
    );
    assert_eq!(reason("db-04"), "excluded by exclude-tags \"no-backup\"");
    assert_eq!(reason("db-05"), "in a pool this job does not back up");
    assert!(sel.problems.is_empty(), "{:?}", sel.problems);
}
