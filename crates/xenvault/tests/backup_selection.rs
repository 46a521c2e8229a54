//! Selection end to end (real binary, real `xapi-sim` process): a NAUbackup
//! `.cfg` (the README's "Preview Example #2") and the weekday file select, in
//! `xenvault plan` and in `xenvault backup`, exactly the VMs NAUbackup and the
//! file's reader expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup_support;

use std::collections::BTreeSet;
use std::path::Path;

use backup_support::{Sim, backup, plan, write_config, xenvault};

fn scenario(dir: &Path, names: &[&str]) -> Sim {
    let mut text = String::from("templates = false\n[pool]\nname = \"sel\"\n");
    for n in names {
        text.push_str(&format!(
            "[[vms]]\nname = \"{n}\"\n[[vms.disks]]\nsize = \"2M\"\nwritten = \"10%\"\n"
        ));
    }
    let path = dir.join("scenario.toml");
    std::fs::write(&path, text).unwrap();
    Sim::start(&["--scenario", path.to_str().unwrap()])
}

fn will_run(plan_json: &serde_json::Value) -> BTreeSet<String> {
    plan_json["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["skip"].is_null())
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_naubackup_cfg_selects_what_naubackup_would() {
    let dir = tempfile::tempdir().unwrap();
    let sim = scenario(
        dir.path(),
        &[
            "PROD-ubuntu14",
            "PROD-ubuntu12-benchmark",
            "PROD-CentOS7-large-user-disks",
            "DEV-RH6",
            "DEV-RH7",
            "PROD-WinSvr",
            "DEV-web3",
        ],
    );
    let cfg_file = dir.path().join("weekend.cfg");
    std::fs::write(
        &cfg_file,
        "# Weekend VMs - with VM name's fixed\nmax_backups=4\nbackup_dir=/snapshots/BACKUPS\n#\n\
         vdi-export=PROD-CentOS7-large-user-disks\nvm-export=PROD.*\nvm-export=DEV-RH.*:3\n\
         exclude=PROD-ubuntu12-benchmark\n",
    )
    .unwrap();
    let cfg = write_config(
        &sim,
        dir.path(),
        &format!("naubackup-cfg = \"{}\"", cfg_file.display()),
        "",
    );
    let out = plan(&cfg);
    assert_eq!(out.code, 0, "{out:?}");
    let p = out.json();
    assert_eq!(
        will_run(&p),
        set(&[
            "DEV-RH6",
            "DEV-RH7",
            "PROD-CentOS7-large-user-disks",
            "PROD-WinSvr",
            "PROD-ubuntu14"
        ]),
        "{out:?}"
    );
    let by_name = |n: &str| {
        p["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("DEV-RH6")["keep_last"], 3);
    assert_eq!(by_name("PROD-WinSvr")["keep_last"], 4);
    assert_eq!(by_name("PROD-WinSvr")["mode"], "xva");
    assert_ne!(by_name("PROD-CentOS7-large-user-disks")["mode"], "xva");
    let not = p["not_selected"].to_string();
    assert!(
        not.contains("PROD-ubuntu12-benchmark") && not.contains("excluded"),
        "{not}"
    );
    assert!(not.contains("DEV-web3"), "{not}");

    // The run backs up exactly those.
    let out = backup(&cfg);
    assert_eq!(out.code, 0, "{out:?}");
    let report = out.json();
    let done: BTreeSet<String> = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["outcome"]["status"] == "succeeded")
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(done, will_run(&p));
}

#[test]
fn the_weekday_file_selects_the_right_vms_for_each_day() {
    let dir = tempfile::tempdir().unwrap();
    let sim = scenario(
        dir.path(),
        &[
            "web01",
            "web02",
            "db-1",
            "db-2",
            "mail",
            "fileserver",
            "dns1",
            "other",
        ],
    );
    let weekdays = dir.path().join("weekdays.txt");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/weekdays.txt"),
        &weekdays,
    )
    .unwrap();
    let cfg = write_config(
        &sim,
        dir.path(),
        &format!("weekday-file = \"{}\"", weekdays.display()),
        "",
    );
    let expected = [
        ("monday", vec!["web01", "web02", "dns1"]),
        ("tuesday", vec!["db-1", "db-2", "dns1"]),
        ("wednesday", vec!["mail", "dns1"]),
        ("thursday", vec!["web01", "web02", "dns1"]),
        ("friday", vec!["db-1", "db-2", "dns1"]),
        ("saturday", vec!["fileserver", "dns1"]),
        ("sunday", vec!["fileserver", "dns1"]),
    ];
    for (day, names) in &expected {
        let out = xenvault(&[
            "plan",
            "nightly",
            "--config",
            cfg.to_str().unwrap(),
            "--today",
            day,
            "--json",
        ]);
        assert_eq!(out.code, 0, "{day}: {out:?}");
        assert_eq!(will_run(&out.json()), set(names), "{day}: {out:?}");
    }
    // A backup on Saturday takes exactly Saturday's VMs.
    let out = xenvault(&[
        "backup",
        "nightly",
        "--config",
        cfg.to_str().unwrap(),
        "--today",
        "sat",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let names: BTreeSet<String> = out.json()["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, set(&["fileserver", "dns1"]));
}
