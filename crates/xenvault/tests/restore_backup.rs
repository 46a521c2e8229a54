//! The whole cycle with the real binary: `xenvault backup` writes the
//! archive, `xenvault list` shows it, `xenvault restore` brings the VM and a
//! disk back bit for bit; and the archive's `.xva` written by the backup
//! imports through the simulator's `/import` with curl alone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod restore_support;

use restore_support::{
    SimProc, add_job, object_counts, raw_sha, require_tool, vm_by_name, vm_disks, write_config,
    xenvault, xenvault_json,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_list_restore_cycle_and_a_plain_curl_import() {
    let sim = SimProc::spawn(&["--vms", "2", "--disk-size", "8M", "--written", "30%"]);
    let pool = sim.connect().await;
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("archive");
    let config = write_config(work.path(), &[&sim], &target);
    add_job(
        &config,
        "plainxva",
        "names = [\"vm-02\"]\nmode = \"xva\"\ncompression = \"none\"",
    );
    add_job(
        &config,
        "disks",
        "names = [\"vm-01\"]\nmode = \"vhd\"\ncompression = \"zstd\"",
    );
    let config = config.to_str().unwrap();

    // What the disks hold now (nothing writes to them during the test).
    let mut want = std::collections::BTreeMap::new();
    for name in ["vm-01", "vm-02"] {
        let (vm, _) = vm_by_name(&pool.session, name).await;
        for (userdevice, (_, vdi)) in vm_disks(&pool.session, &vm).await {
            want.insert((name, userdevice), raw_sha(&pool, &vdi.uuid).await.0);
        }
    }
    for job in ["nightly", "plainxva", "disks"] {
        let (code, stdout, stderr) = xenvault(&["backup", job, "--config", config]);
        assert_eq!(
            code, 0,
            "backup {job}:\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    }

    let listed = xenvault_json(&["list", "nightly", "--config", config, "--verify", "--json"]);
    let points = listed.as_array().unwrap();
    assert_eq!(points.len(), 3, "{listed}");
    assert!(
        points
            .iter()
            .all(|p| p["complete"] == true && p["checksums"]["status"] == "verified")
    );

    // The VM from the XVA, as a new VM; then one disk of the VHD backup.
    let restored = xenvault_json(&[
        "restore", "nightly", "--config", config, "--vm", "vm-02", "--json",
    ]);
    for d in restored["disks"].as_array().unwrap() {
        let key = ("vm-02", d["userdevice"].as_str().unwrap().to_string());
        assert_eq!(
            raw_sha(&pool, d["vdi_uuid"].as_str().unwrap()).await.0,
            want[&key]
        );
    }
    let restored = xenvault_json(&[
        "restore", "disks", "--config", config, "--vm", "vm-01", "--disk", "0", "--json",
    ]);
    assert_eq!(restored["format"], "vhd");
    let key = ("vm-01", "0".to_string());
    assert_eq!(
        raw_sha(&pool, restored["vdi_uuid"].as_str().unwrap())
            .await
            .0,
        want[&key]
    );
    // The whole VM from the per-disk VHD backup: rebuilt from vm.json.
    let restored = xenvault_json(&[
        "restore", "disks", "--config", config, "--vm", "vm-01", "--json",
    ]);
    assert_eq!(
        restored["name"]
            .as_str()
            .unwrap()
            .split(" (restored")
            .next(),
        Some("vm-01")
    );
    for d in restored["disks"].as_array().unwrap() {
        let key = ("vm-01", d["userdevice"].as_str().unwrap().to_string());
        assert_eq!(
            raw_sha(&pool, d["vdi_uuid"].as_str().unwrap()).await.0,
            want[&key]
        );
    }

    // Without xenvault: curl PUTs the backup's vm.xva (Content-Length from the
    // file, HTTP Basic auth) to /import; the task in the reply finishes the
    // import, and the new VM's disks equal the originals.
    if !require_tool("curl", &["--version"]) {
        return;
    }
    let xva = points
        .iter()
        .find(|p| {
            p["vm"] == "vm-02" && p["files"].as_array().unwrap().iter().any(|f| f == "vm.xva")
        })
        .map(|p| std::path::Path::new(p["dir"].as_str().unwrap()).join("vm.xva"))
        .unwrap_or_else(|| panic!("no plain vm.xva in {listed}"));
    let (vms_before, _) = object_counts(&pool.session).await;
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "-D", "-", "-o", "/dev/null", "-u"])
        .arg(format!("{}:{}", sim.info.user, sim.info.password))
        .arg("-T")
        .arg(&xva)
        .arg(format!("{}/import", sim.info.url))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl: {head}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let task = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("task-id:")
                .then(|| l[8..].trim().to_string())
        })
        .unwrap_or_else(|| panic!("no task-id in {head}"));
    let task = xenvault_xapi::records::TaskRef::new(task);
    let record = pool
        .session
        .wait_task(
            &task,
            "plain import",
            &xenvault_xapi::task::WaitOptions::default(),
        )
        .await
        .unwrap();
    let vms: Vec<xenvault_xapi::records::VmRef> =
        xenvault_xapi::task::parse_task_result("plain import", &record.result).unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(object_counts(&pool.session).await.0, vms_before + 1);
    for (userdevice, (_, vdi)) in vm_disks(&pool.session, &vms[0]).await {
        assert_eq!(
            raw_sha(&pool, &vdi.uuid).await.0,
            want[&("vm-02", userdevice)]
        );
    }
}
