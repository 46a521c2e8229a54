//! Restore of restore points written by a real backup run (`job::run_job`,
//! the code behind `xenvault backup`) against a real `xapi-sim`: the archive
//! layout as the backup writes it, restored whole and disk by disk.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod restore_support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use restore_support::{SimProc, raw_sha, vm_by_name, vm_disks, within};
use xenvault_engine::restore::{
    DiskRestoreOptions, DiskSelector, VmIdentity, VmRestoreOptions, find_point, list_points,
    no_progress, restore_disk, restore_vm,
};

/// A configuration with the simulator as pool `sim`, target `arch` and a
/// job `nightly` backing up `vm-01` in `mode` with `compression`.
fn config(
    dir: &Path,
    sim: &SimProc,
    mode: &str,
    compression: &str,
) -> xenvault_types::config::Config {
    let pw = dir.join("sim.password");
    std::fs::write(&pw, format!("{}\n", sim.info.password)).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "state-dir = \"{state}\"\n\n[pools.sim]\nurl = \"{url}\"\nuser = \"{user}\"\npassword-file = \"{pw}\"\nfingerprint = \"{fp}\"\n\n[targets.arch]\npath = \"{target}\"\n\n[jobs.nightly]\npools = [\"sim\"]\ntarget = \"arch\"\nnames = [\"vm-01\"]\nmode = \"{mode}\"\ncompression = \"{compression}\"\n",
        state = dir.join("state").display(),
        url = sim.info.https_url,
        user = sim.info.user,
        pw = pw.display(),
        fp = sim.info.fingerprint,
        target = dir.join("archive").display(),
    );
    let path = dir.join("xenvault.toml");
    std::fs::write(&path, &text).unwrap();
    xenvault_engine::config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_made_by_a_job_restore_identically() {
    let sim = SimProc::spawn(&["--vms", "2", "--disk-size", "8M", "--written", "30%"]);
    let pool = sim.connect().await;
    let (source, source_rec) = vm_by_name(&pool.session, "vm-01").await;
    let source_vifs = source_rec.vifs.len();
    assert!(source_vifs > 0, "the scenario VM has network interfaces");
    let mut want = std::collections::BTreeMap::new();
    for (userdevice, (_, vdi)) in vm_disks(&pool.session, &source).await {
        want.insert(userdevice, raw_sha(&pool, &vdi.uuid).await.0);
    }
    for (mode, compression) in [("xva", "zstd"), ("vhd", "none"), ("raw", "zstd")] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &sim, mode, compression);
        let run = within(
            "backup run",
            xenvault_engine::job::run_job(&cfg, "nightly", Default::default()),
        )
        .await
        .unwrap_or_else(|e| panic!("{mode}: backup run: {e}"));
        let target = dir.path().join("archive");
        let listed = list_points(&target, Some("vm-01"), true).unwrap();
        assert_eq!(listed.len(), 1, "{mode}: {listed:?} ({:?})", run.report);
        assert!(listed[0].complete, "{mode}: {listed:?}");
        assert_eq!(
            listed[0].checksums,
            xenvault_engine::restore::ChecksumStatus::Verified,
            "{mode}"
        );
        assert_eq!(listed[0].format.map(|f| f.as_str()), Some(mode));
        let point = find_point(&target, "vm-01", None).unwrap();

        // The whole VM, from the XVA or rebuilt from the per-disk files.
        {
            let restored = within(
                "restore",
                restore_vm(
                    &pool,
                    &point,
                    &VmRestoreOptions {
                        identity: VmIdentity::New {
                            name: Some(format!("vm-01 copy {mode}")),
                        },
                        ..VmRestoreOptions::default()
                    },
                    no_progress(),
                ),
            )
            .await
            .unwrap();
            assert_eq!(restored.name, format!("vm-01 copy {mode}"));
            assert_eq!(restored.disks.len(), want.len());
            for d in &restored.disks {
                assert_eq!(
                    raw_sha(&pool, &d.vdi_uuid).await.0,
                    want[&d.userdevice],
                    "{mode}"
                );
            }
            let (_, vm) = vm_by_name(&pool.session, &format!("vm-01 copy {mode}")).await;
            assert_eq!(vm.vifs.len(), source_vifs, "{mode}: the VIFs come back too");
            assert!(
                vm.other_config.keys().all(|k| !k.starts_with("xenvault:")),
                "the backup's clean-up tags must not reach a restored VM: {:?}",
                vm.other_config
            );
        }
        let restored = within(
            "disk restore",
            restore_disk(
                &pool,
                &point,
                &DiskRestoreOptions {
                    disk: DiskSelector::Position("0".into()),
                    sr: None,
                    name: None,
                    verify: true,
                    cancel: Default::default(),
                },
                no_progress(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(
            raw_sha(&pool, &restored.vdi_uuid).await.0,
            want["0"],
            "{mode}"
        );
    }
}
