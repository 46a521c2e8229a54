//! `xenvault list` and `xenvault restore` end to end: the real binary against
//! real `xapi-sim` processes, restoring archive restore points made as a
//! backup run makes them. Also: an archive `.xva` imports through the
//! simulator's `/import` with plain tools, without xenvault.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod restore_support;

use restore_support::{
    Layout, SimProc, backup, object_counts, raw_sha, require_tool, vm_by_name, vm_disks,
    write_config, xenvault, xenvault_json,
};

const SIM_ARGS: &[&str] = &["--vms", "2", "--disk-size", "8M", "--written", "30%"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_then_restore_a_vm_and_a_disk_with_identical_data() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("archive");
    let config = write_config(work.path(), &[&sim], &target);
    let config = config.to_str().unwrap();
    let first = backup(&pool, &target, "vm-01", Layout::Xva, true).await;
    // A second, newer restore point after guest writes: `--at` picks the first.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (vm, _) = vm_by_name(&pool.session, "vm-01").await;
    let disk0 = vm_disks(&pool.session, &vm).await["0"].1.uuid.clone();
    sim.control(
        "POST",
        "/_sim/guest-write",
        serde_json::json!({"vdi": disk0, "seed": 7, "blocks": 20}),
    )
    .await;
    let second = backup(&pool, &target, "vm-01", Layout::Vhd, false).await;
    assert_ne!(
        first.disks["0"].1, second.disks["0"].1,
        "the guest writes changed the disk"
    );

    // list: per VM, time, size, format, state, checksums.
    let target_s = target.to_str().unwrap();
    let listed = xenvault_json(&["list", "--target", target_s, "--json"]);
    let points = listed.as_array().unwrap();
    assert_eq!(points.len(), 2, "{listed}");
    assert_eq!(points[0]["vm"], "vm-01");
    assert_eq!(points[0]["vm_uuid"], first.vm_uuid.as_str());
    assert_eq!(points[0]["format"], "xva");
    assert_eq!(points[0]["compression"], "zstd");
    assert_eq!(points[1]["format"], "vhd");
    assert_eq!(points[0]["complete"], true);
    assert_eq!(points[0]["checksums"]["status"], "not_checked");
    assert!(points[0]["bytes"].as_u64().unwrap() > 0);
    let verified = xenvault_json(&[
        "list", "nightly", "--config", config, "--vm", "vm-01", "--verify", "--json",
    ]);
    assert!(
        verified
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["checksums"]["status"] == "verified"),
        "{verified}"
    );
    let (code, table, _) = xenvault(&["list", "--target", target_s]);
    assert_eq!(code, 0);
    assert!(
        table.contains("VM vm-01") && table.contains("complete"),
        "{table}"
    );
    let first_ts = first.dir.file_name().unwrap().to_str().unwrap().to_string();
    assert!(table.contains(&first_ts), "{table}");

    // The whole VM from the first (XVA) restore point.
    let restored = xenvault_json(&[
        "restore", "nightly", "--config", config, "--vm", "vm-01", "--at", &first_ts, "--json",
    ]);
    assert_eq!(restored["name"], format!("vm-01 (restored {first_ts})"));
    let disks = restored["disks"].as_array().unwrap();
    assert_eq!(disks.len(), first.disks.len());
    for d in disks {
        let (sha, _) = raw_sha(&pool, d["vdi_uuid"].as_str().unwrap()).await;
        assert_eq!(sha, first.disks[d["userdevice"].as_str().unwrap()].1);
    }

    // One disk from the newest (VHD) restore point, into a new VDI.
    let restored = xenvault_json(&[
        "restore",
        "--config",
        config,
        "--target",
        target_s,
        "--vm",
        "vm-01",
        "--disk",
        "0",
        "--name",
        "rescued disk",
        "--json",
    ]);
    assert_eq!(restored["name"], "rescued disk");
    assert_eq!(restored["format"], "vhd");
    let (sha, _) = raw_sha(&pool, restored["vdi_uuid"].as_str().unwrap()).await;
    assert_eq!(sha, second.disks["0"].1);

    // One disk out of the XVA, sent raw.
    let restored = xenvault_json(&[
        "restore", "nightly", "--config", config, "--vm", "vm-01", "--at", &first_ts, "--disk",
        "0", "--json",
    ]);
    assert_eq!(restored["format"], "raw");
    let (sha, _) = raw_sha(&pool, restored["vdi_uuid"].as_str().unwrap()).await;
    assert_eq!(sha, first.disks["0"].1);

    // Every restore finished: nothing is still marked as being restored
    // (a mark left would make the next run remove the restored objects).
    let vms = pool.session.vm().get_all_records().await.unwrap();
    let vdis = pool.session.vdi().get_all_records().await.unwrap();
    let restored_vm = vms
        .values()
        .find(|v| v.name_label == format!("vm-01 (restored {first_ts})"))
        .unwrap();
    assert!(
        restored_vm
            .other_config
            .contains_key("xenvault-restored-from")
    );
    let marked: Vec<&str> = vms
        .values()
        .map(|v| (&v.uuid, &v.other_config))
        .chain(vdis.values().map(|v| (&v.uuid, &v.other_config)))
        .filter(|(_, oc)| oc.contains_key("xenvault:restoring"))
        .map(|(u, _)| u.as_str())
        .collect();
    assert!(marked.is_empty(), "{marked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_is_restored_into_another_pool_with_its_identity_and_started() {
    let source = SimProc::spawn(SIM_ARGS);
    let other = SimProc::spawn(&["--vms", "1", "--disk-size", "4M"]);
    let src = source.connect().await;
    let dst = other.connect().await;
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("archive");
    let config = write_config(work.path(), &[&source, &other], &target);
    let backed = backup(&src, &target, "vm-01", Layout::Xva, false).await;
    let (_, pool_rec) = dst.session.pool_record().await.unwrap();
    let sr = dst
        .session
        .sr()
        .get_record(&pool_rec.default_sr)
        .await
        .unwrap();
    let restored = xenvault_json(&[
        "restore",
        "--config",
        config.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
        "--vm",
        &backed.vm_uuid,
        "--pool",
        "second",
        "--sr",
        &sr.uuid,
        "--preserve-identity",
        "--start",
        "--json",
    ]);
    assert_eq!(restored["uuid"], backed.vm_uuid.as_str());
    assert_eq!(restored["name"], "vm-01");
    assert_eq!(restored["started"], true);
    assert_eq!(restored["sr_uuid"], sr.uuid.as_str());
    // The other pool has a VM called vm-01 of its own: look ours up by uuid.
    let vm = dst.session.vm().get_by_uuid(&backed.vm_uuid).await.unwrap();
    let vm = dst.session.vm().get_record(&vm).await.unwrap();
    assert_eq!(vm.name_label, "vm-01");
    assert_eq!(vm.power_state, xenvault_xapi::records::PowerState::Running);
    for d in restored["disks"].as_array().unwrap() {
        let (sha, _) = raw_sha(&dst, d["vdi_uuid"].as_str().unwrap()).await;
        assert_eq!(sha, backed.disks[d["userdevice"].as_str().unwrap()].1);
    }
    // Into the source pool, where the original still exists: refused (exit 2).
    let (code, _, stderr) = xenvault(&[
        "restore",
        "--config",
        config.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
        "--vm",
        "vm-01",
        "--pool",
        "first",
        "--preserve-identity",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("still exists") && stderr.contains(&backed.vm_uuid),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_archive_is_refused_naming_the_file_and_nothing_is_left() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("archive");
    let config = write_config(work.path(), &[&sim], &target);
    let backed = backup(&pool, &target, "vm-02", Layout::Xva, true).await;
    let file = backed.dir.join("vm.xva.zst");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();
    let before = object_counts(&pool.session).await;
    for extra in [&[][..], &["--disk", "0"][..]] {
        let mut args = vec![
            "restore",
            "--config",
            config.to_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
            "--vm",
            "vm-02",
        ];
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = xenvault(&args);
        assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(
            stderr.contains("damaged") && stderr.contains("vm.xva.zst"),
            "{stderr}"
        );
    }
    assert_eq!(
        object_counts(&pool.session).await,
        before,
        "nothing left on the pool"
    );
    let (code, stdout, _) = xenvault(&["list", "--target", target.to_str().unwrap(), "--verify"]);
    assert_eq!(
        code, 1,
        "a damaged restore point fails the verification: {stdout}"
    );
    assert!(
        stdout.contains("DAMAGED") && stdout.contains("vm.xva.zst"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_xva_imports_with_plain_tools_without_xenvault() {
    if !require_tool("python3", &["-c", "import XenAPI"]) {
        return;
    }
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("archive");
    let backed = backup(&pool, &target, "vm-01", Layout::Xva, false).await;
    let xva = backed.dir.join("vm.xva");
    // The official Python SDK logs in; urllib PUTs the file with a
    // Content-Length inside a task; the task's result names the new VM.
    let script = r#"
import json, os, sys, time, urllib.request, XenAPI
url, user, password, path = sys.argv[1:5]
s = XenAPI.Session(url)
s.xenapi.login_with_password(user, password, "2.0", "plain-import-test")
try:
    pool = s.xenapi.pool.get_all()[0]
    sr = s.xenapi.pool.get_default_SR(pool)
    task = s.xenapi.task.create("plain import", "")
    size = os.path.getsize(path)
    with open(path, "rb") as body:
        req = urllib.request.Request(
            f"{url}/import?session_id={s._session}&task_id={task}&sr_id={sr}",
            data=body, method="PUT",
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
        urllib.request.urlopen(req, timeout=120).read()
    for _ in range(600):
        if s.xenapi.task.get_status(task) != "pending":
            break
        time.sleep(0.1)
    status = s.xenapi.task.get_status(task)
    result = s.xenapi.task.get_result(task)
    error = s.xenapi.task.get_error_info(task)
    s.xenapi.task.destroy(task)
    print(json.dumps({"status": status, "result": result, "error": error}))
finally:
    s.xenapi.session.logout()
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([
            sim.info.url.as_str(),
            sim.info.user.as_str(),
            sim.info.password.as_str(),
            xva.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python import failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(reply["status"], "success", "{reply}");
    let result = reply["result"].as_str().unwrap();
    let vm_ref = result
        .split("OpaqueRef:")
        .nth(1)
        .map(|rest| format!("OpaqueRef:{}", rest.split('<').next().unwrap()))
        .unwrap_or_else(|| panic!("no VM ref in the task result {result}"));
    let vm = xenvault_xapi::records::VmRef::new(vm_ref);
    let disks = vm_disks(&pool.session, &vm).await;
    assert_eq!(disks.len(), backed.disks.len());
    for (userdevice, (_, vdi)) in &disks {
        let (sha, _) = raw_sha(&pool, &vdi.uuid).await;
        assert_eq!(sha, backed.disks[userdevice].1, "disk {userdevice} differs");
    }
}

#[test]
fn help_shows_examples_and_bad_usage_exits_2() {
    for cmd in ["restore", "list"] {
        let (code, stdout, _) = xenvault(&[cmd, "--help"]);
        assert_eq!(code, 0);
        assert!(stdout.contains("Examples:"), "{cmd} --help:\n{stdout}");
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = xenvault(&[
        "list",
        "--target",
        dir.path().to_str().unwrap(),
        "--vm",
        "nope",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
    let (code, _, stderr) = xenvault(&["list"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, _) = xenvault(&["restore", "--vm", "x", "--disk", "0", "--start"]);
    assert_eq!(code, 2, "--start with --disk is bad usage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_restore_leaves_nothing_on_the_pool() {
    let sim = SimProc::spawn(SIM_ARGS);
    let pool = sim.connect().await;
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("archive");
    let config = write_config(work.path(), &[&sim], &target);
    backup(&pool, &target, "vm-01", Layout::Xva, false).await;
    let before = object_counts(&pool.session).await;
    for (handler, extra) in [
        ("import_raw_vdi", &["--disk", "0"][..]),
        ("import", &[][..]),
    ] {
        // A slow link: 8 MiB at 1 MiB/s.
        sim.control(
            "POST",
            "/_sim/faults/stream",
            serde_json::json!({"handler": handler, "bytes_per_sec": 1 << 20}),
        )
        .await;
        let mut args = vec![
            "restore".to_string(),
            "--config".into(),
            config.to_str().unwrap().into(),
            "--target".into(),
            target.to_str().unwrap().into(),
            "--vm".into(),
            "vm-01".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_xenvault"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let status = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{handler}: {stderr}");
        assert!(stderr.contains("interrupted"), "{handler}: {stderr}");
        sim.control("POST", "/_sim/faults/reset", serde_json::json!({}))
            .await;
        // XAPI's own clean-up of a cancelled import may take a moment.
        let mut after = object_counts(&pool.session).await;
        for _ in 0..50 {
            if after == before {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            after = object_counts(&pool.session).await;
        }
        assert_eq!(
            after, before,
            "{handler}: an interrupted restore left objects"
        );
    }
}
