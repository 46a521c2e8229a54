//! NAUbackup `.cfg` files, read unchanged through a job's `naubackup-cfg`,
//! select exactly the VMs VmBackup.py would, with the same retention and
//! export kind. The expected sets are written out from NAUbackup's documented
//! rules (README "VM selection and max_backups operations", "Important Details
//! About Python REGEX Syntax"), not computed by our code.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::fs;
use std::os::unix::fs::PermissionsExt as _;

use xenvault_engine::config;
use xenvault_engine::selection::{SkipReason, VmCandidate, select};
use xenvault_types::config::{DiskSelection, ExportMode, PowerState, Weekday};

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

/// Loads a job reading `cfg` through `naubackup-cfg`.
fn job_for(cfg: &str) -> (tempfile::TempDir, xenvault_types::config::JobConfig) {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    fs::write(&pw, "secret\n").unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dir.path().join("weekend.cfg"), cfg).unwrap();
    let toml = "[pools.prod]\nurl = \"https://pool\"\npassword-file = \"pw\"\n\n[jobs.weekend]\npool = \"prod\"\nnaubackup-cfg = \"weekend.cfg\"\n";
    let path = dir.path().join("xenvault.toml");
    fs::write(&path, toml).unwrap();
    let cfg = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let job = cfg.job("weekend").unwrap().clone();
    (dir, job)
}

/// (name, mode, disks, keep-last) of every chosen VM, sorted by name.
fn chosen(
    sel: &xenvault_engine::selection::Selection,
) -> Vec<(String, ExportMode, DiskSelection, u32)> {
    sel.chosen
        .iter()
        .map(|c| (c.name.clone(), c.mode, c.disks, c.retention.keep_last))
        .collect()
}

fn xva(name: &str, keep: u32) -> (String, ExportMode, DiskSelection, u32) {
    (name.to_string(), ExportMode::Xva, DiskSelection::All, keep)
}

fn first_disk(name: &str, mode: ExportMode, keep: u32) -> (String, ExportMode, DiskSelection, u32) {
    (name.to_string(), mode, DiskSelection::Boot, keep)
}

/// The README's "Preview Example #2" (weekend.cfg, errors resolved): NAUbackup
/// printed `vdi-export: PROD-CentOS7-large-user-disks` and
/// `vm-export: PROD-ubuntu14, DEV-RH6:3, DEV-RH7:3, PROD-WinSvr`.
#[test]
fn readme_preview_example_2() {
    let cfg = "\
# Weekend VMs - with VM name's fixed
max_backups=4
backup_dir=/snapshots/BACKUPS
#
vdi-export=PROD-CentOS7-large-user-disks
vm-export=PROD.*
vm-export=DEV-RH.*:3
exclude=PROD-ubuntu12-benchmark
";
    let (_dir, job) = job_for(cfg);
    let mut dom0 = vm("Control domain on host: xs1");
    dom0.is_control_domain = true;
    let mut snap = vm("PROD-ubuntu14");
    snap.uuid = "uuid-snap".into();
    snap.is_a_snapshot = true;
    snap.is_a_template = true;
    let mut template = vm("PROD-template");
    template.is_a_template = true;
    let candidates = vec![
        vm("PROD-ubuntu14"),
        vm("PROD-ubuntu12-benchmark"),
        vm("PROD-CentOS7-large-user-disks"),
        vm("DEV-RH6"),
        vm("DEV-RH7"),
        vm("PROD-WinSvr"),
        vm("DEV-web3"),
        dom0,
        snap,
        template,
    ];
    let sel = select(&job, &candidates, Weekday::Saturday);
    assert_eq!(
        chosen(&sel),
        vec![
            xva("DEV-RH6", 3),
            xva("DEV-RH7", 3),
            first_disk("PROD-CentOS7-large-user-disks", ExportMode::Raw, 4),
            xva("PROD-WinSvr", 4),
            xva("PROD-ubuntu14", 4),
        ]
    );
    let reason = |name: &str| {
        sel.skipped
            .iter()
            .find(|s| s.name == name && !s.reason.is_never_a_backup_candidate())
            .map(|s| s.reason.clone())
    };
    assert!(matches!(
        reason("PROD-ubuntu12-benchmark"),
        Some(SkipReason::Excluded { .. })
    ));
    assert_eq!(reason("DEV-web3"), Some(SkipReason::NotSelected));
    assert_eq!(sel.skipped.len(), 5);
    assert!(sel.problems.is_empty(), "{:?}", sel.problems);
    assert_eq!(job.retention.keep_last, 4);
}

/// The README's configuration and regex examples together: excludes first
/// (plain and regex), vdi-exports winning over vm-exports, `:N` overrides,
/// "the last valid definition takes precedence", front-anchored matching.
#[test]
fn readme_regex_examples() {
    let cfg = "\
pool_db_backup=0
max_backups=3
backup_dir=/snapshots/BACKUPS
vdi_export_format=vhd

# exclude simple names, then regexes
exclude=PROD-WinDomainController
exclude=DEV-DestructiveTest
exclude=TEMP-.*
exclude=PRD-PRINT$
exclude=PRD-a.*
exclude=DEV-V.*TEMP$

vdi-export=my-vm-name
vdi-export=DEV-web3:7
vdi-export=DEV-.*[Tt]est.*

vm-export=my-vm-name
vm-export=my-second-vm
vm-export=my-third-vm:3
vm-export=PROD.*
vm-export=DEV.*:2
vm-export=.*SAVE$:5
vm-export=PRD-.*
vm-export=PRD-.*print[4-5]$:5
vm-export=PRD-.*print[6-8]$:10
";
    let (_dir, job) = job_for(cfg);
    let names = [
        "my-vm-name",
        "my-second-vm",
        "my-third-vm",
        "PROD-web1",
        "PROD-WinDomainController",
        "DEV-DestructiveTest",
        "DEV-mySql",
        "DEV-web3",
        "DEV-unit-test",
        "DEV-V1-TEMP",
        "DEV-V1-TEMPx",
        "TEMP-SAVE",
        "archive-SAVE",
        "archive-SAVEx",
        "PRD-office-print4",
        "PRD-office-print7",
        "PRD-office-print9",
        "PRD-PRINT",
        "PRD-alpha",
        "PRD-Alpha",
        "xPROD-web",
    ];
    let candidates: Vec<VmCandidate> = names.iter().map(|n| vm(n)).collect();
    let sel = select(&job, &candidates, Weekday::Sunday);
    let mut expected = vec![
        // vm-export=DEV.*:2 (front-anchored: "DEV" then anything).
        xva("DEV-V1-TEMPx", 2), // DEV-V.*TEMP$ needs TEMP at the end
        xva("DEV-mySql", 2),
        // vdi-export=DEV-.*[Tt]est.* wins over DEV.*:2; global max_backups.
        first_disk("DEV-unit-test", ExportMode::Vhd, 3),
        // vdi-export=DEV-web3:7 wins over DEV.*:2.
        first_disk("DEV-web3", ExportMode::Vhd, 7),
        // vm-export=PRD-.* then the later print rules replace it.
        xva("PRD-Alpha", 3), // exclude=PRD-a.* is case-sensitive
        xva("PRD-office-print4", 5),
        xva("PRD-office-print7", 10),
        xva("PRD-office-print9", 3),
        xva("PROD-web1", 3),
        xva("archive-SAVE", 5),
        // vdi-export=my-vm-name wins over vm-export=my-vm-name.
        first_disk("my-vm-name", ExportMode::Vhd, 3),
        xva("my-second-vm", 3),
        xva("my-third-vm", 3),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(chosen(&sel), expected);
    let excluded: Vec<&str> = sel
        .skipped
        .iter()
        .filter(|s| matches!(s.reason, SkipReason::Excluded { .. }))
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        excluded,
        vec![
            "DEV-DestructiveTest",
            "DEV-V1-TEMP",
            "PRD-PRINT",
            "PRD-alpha",
            "PROD-WinDomainController",
            "TEMP-SAVE",
        ]
    );
    let not_selected: Vec<&str> = sel
        .skipped
        .iter()
        .filter(|s| s.reason == SkipReason::NotSelected)
        .map(|s| s.name.as_str())
        .collect();
    // `.*SAVE$` needs SAVE at the end; `PROD.*` is anchored at the start.
    assert_eq!(not_selected, vec!["archive-SAVEx", "xPROD-web"]);
    assert!(!sel.has_errors(), "{:?}", sel.problems);
}

/// VmBackup.py stops with "vm(s) List does not exist" for a plain name that
/// matches no VM, and warns for a regex or an exclude matching nothing.
#[test]
fn missing_names_are_errors_and_empty_regexes_warnings() {
    let cfg = "exclude=nothing-like-this\nvm-export=my-vm-nmae\nvm-export=ZZZ.*\n";
    let (_dir, job) = job_for(cfg);
    let sel = select(&job, &[vm("my-vm-name")], Weekday::Monday);
    assert!(sel.chosen.is_empty());
    assert!(sel.has_errors());
    let shown: Vec<String> = sel.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(shown.len(), 3, "{shown:?}");
    assert!(
        shown[0].starts_with(
            "error: weekend.cfg:2: no VM is named \"my-vm-nmae\"; did you mean \"my-vm-name\"?"
        ),
        "{shown:?}"
    );
    assert!(
        shown
            .iter()
            .any(|s| s.starts_with("warning: weekend.cfg:3: regex \"ZZZ.*\" matches no VM")),
        "{shown:?}"
    );
    assert!(
        shown
            .iter()
            .any(|s| s.contains("exclude-names \"nothing-like-this\" matches no VM")),
        "{shown:?}"
    );
}

/// An empty `vm-export=` is the empty regex: every VM, as in VmBackup.py.
#[test]
fn empty_vm_export_selects_every_vm() {
    let (_dir, job) = job_for("vm-export=\nexclude=b\n");
    let sel = select(&job, &[vm("a"), vm("b"), vm("c")], Weekday::Monday);
    let names: Vec<&str> = sel.chosen.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, vec!["a", "c"]);
}
