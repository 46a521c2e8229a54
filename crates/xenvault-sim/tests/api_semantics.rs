//! API semantics of xapi-facts §2 over real sockets: power states and
//! `VM.destroy`, `blocked_operations`, CBT bitmaps matching guest writes,
//! `data_destroy`, `get_nbd_info`, SR utilisation, events, tasks, and the
//! control interface's faults.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{SimProcess, call, get, jsonrpc, login, post};
use serde_json::{Value, json};

fn control(sim: &SimProcess, path: &str, body: Value) -> Value {
    let (st, _, text) = post(
        &sim.addr(),
        &format!("/_sim{path}"),
        "application/json",
        &body.to_string(),
    );
    assert_eq!(st, 200, "control {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn err(r: &Value) -> (String, Vec<String>) {
    let e = &r["error"];
    (
        e["message"].as_str().unwrap_or_default().to_string(),
        serde_json::from_value(e["data"].clone()).unwrap_or_default(),
    )
}

fn vm_named(addr: &str, s: &str, name: &str) -> String {
    call(
        addr,
        "VM.get_all_where",
        json!([s, format!("field \"name__label\"=\"{name}\"")]),
    )[0]
    .as_str()
    .unwrap()
    .to_string()
}

fn disk_vdi(addr: &str, s: &str, vm: &str) -> String {
    for vbd in call(addr, "VM.get_VBDs", json!([s, vm]))
        .as_array()
        .unwrap()
    {
        if call(addr, "VBD.get_type", json!([s, vbd])) == "Disk" {
            return call(addr, "VBD.get_VDI", json!([s, vbd]))
                .as_str()
                .unwrap()
                .to_string();
        }
    }
    panic!("no disk")
}

#[test]
fn power_states_destroy_and_blocked_operations() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::spawn(dir.path(), &["--vms", "2", "--disk-size", "4M"]);
    let a = sim.addr();
    let s = login(&sim);
    let running = vm_named(&a, &s, "vm-01");
    let vdi = disk_vdi(&a, &s, &running);

    let r = jsonrpc(&a, "VM.destroy", json!([s, running]));
    assert_eq!(
        err(&r),
        (
            "VM_BAD_POWER_STATE".into(),
            vec![
                running.clone(),
                "halted, suspended".into(),
                "running".into()
            ]
        )
    );
    let r = jsonrpc(&a, "VM.start", json!([s, running, false, false]));
    assert_eq!(
        err(&r).1[1..],
        ["halted".to_string(), "running".to_string()]
    );
    let r = jsonrpc(&a, "VDI.destroy", json!([s, vdi]));
    assert_eq!(
        err(&r),
        ("VDI_IN_USE".into(), vec![vdi.clone(), "destroy".into()])
    );

    call(
        &a,
        "VM.add_to_blocked_operations",
        json!([s, running, "snapshot", "backup in progress"]),
    );
    let r = jsonrpc(&a, "VM.snapshot", json!([s, running, "x"]));
    assert_eq!(
        err(&r),
        (
            "OPERATION_BLOCKED".into(),
            vec![running.clone(), "backup in progress".into()]
        )
    );
    let r = jsonrpc(
        &a,
        "VM.add_to_blocked_operations",
        json!([s, running, "snapshot", "again"]),
    );
    assert_eq!(err(&r).0, "MAP_DUPLICATE_KEY");
    let r = jsonrpc(
        &a,
        "VM.add_to_blocked_operations",
        json!([s, running, "fly", "x"]),
    );
    assert!(r.get("error").is_some(), "unknown enum value refused: {r}");
    call(
        &a,
        "VM.remove_from_blocked_operations",
        json!([s, running, "snapshot"]),
    );

    call(&a, "VM.clean_shutdown", json!([s, running]));
    assert_eq!(
        call(&a, "VM.get_power_state", json!([s, running])),
        "Halted"
    );
    let vbds = call(&a, "VM.get_VBDs", json!([s, running]));
    assert_eq!(
        call(&a, "VBD.get_currently_attached", json!([s, vbds[0]])),
        false
    );
    call(&a, "VM.start", json!([s, running, false, false]));
    assert_eq!(
        call(&a, "VM.get_power_state", json!([s, running])),
        "Running"
    );
    call(&a, "VM.hard_shutdown", json!([s, running]));
    call(&a, "VM.destroy", json!([s, running]));
    assert_eq!(
        err(&jsonrpc(&a, "VM.get_record", json!([s, running]))).0,
        "HANDLE_INVALID"
    );
    assert_eq!(
        err(&jsonrpc(&a, "VBD.get_record", json!([s, vbds[0]]))).0,
        "HANDLE_INVALID"
    );
    // The VDI outlives the VM.
    assert_eq!(call(&a, "VDI.get_VBDs", json!([s, vdi])), json!([]));
    call(&a, "VDI.destroy", json!([s, vdi]));
    assert!(sim.stop());
}

#[test]
fn cbt_bitmap_matches_guest_writes_and_data_destroy() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::spawn(
        dir.path(),
        &["--vms", "1", "--disk-size", "8M", "--written", "0%"],
    );
    let a = sim.addr();
    let s = login(&sim);
    let vm = vm_named(&a, &s, "vm-01");
    let vdi = disk_vdi(&a, &s, &vm);
    let vdi_uuid = call(&a, "VDI.get_uuid", json!([s, vdi]));
    let sr = call(&a, "VDI.get_SR", json!([s, vdi]));
    let used0 = call(&a, "SR.get_physical_utilisation", json!([s, sr]))
        .as_i64()
        .unwrap();

    call(&a, "VDI.enable_cbt", json!([s, vdi]));
    assert_eq!(call(&a, "VDI.get_cbt_enabled", json!([s, vdi])), true);
    let base = call(&a, "VDI.snapshot", json!([s, vdi, {}]));
    assert_eq!(call(&a, "VDI.get_is_a_snapshot", json!([s, base])), true);
    assert_eq!(
        call(&a, "VDI.get_snapshot_of", json!([s, base])),
        json!(vdi)
    );
    assert_eq!(call(&a, "VDI.get_cbt_enabled", json!([s, base])), true);

    let w = control(
        &sim,
        "/guest-write",
        json!({"vdi": vdi_uuid, "seed": 9, "block_list": [3, 7, 100]}),
    );
    assert_eq!(w["vdis"][0]["blocks"], json!([3, 7, 100]));
    let used1 = call(&a, "SR.get_physical_utilisation", json!([s, sr]))
        .as_i64()
        .unwrap();
    assert!(
        used1 >= used0 + 3 * 65536,
        "SR utilisation follows writes: {used0} → {used1}"
    );

    let next = call(&a, "VDI.snapshot", json!([s, vdi, {}]));
    let b64 = call(&a, "VDI.list_changed_blocks", json!([s, base, next]));
    let bits = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().unwrap())
        .unwrap();
    assert_eq!(bits.len(), 16, "ceil(128 blocks / 8)");
    let set: Vec<usize> = (0..bits.len() * 8)
        .filter(|i| bits[i / 8] & (0x80 >> (i % 8)) != 0)
        .collect();
    assert_eq!(
        set,
        vec![3, 7, 100],
        "MSB-first bitmap of exactly the written blocks"
    );

    // NBD info: one record, this host's NBD port, session in the export name.
    let info = call(&a, "VDI.get_nbd_info", json!([s, next]));
    let rec = &info[0];
    let next_uuid = call(&a, "VDI.get_uuid", json!([s, next]));
    assert_eq!(
        rec["exportname"],
        format!("/{}?session_id={s}", next_uuid.as_str().unwrap())
    );
    assert_eq!(
        format!("{}:{}", rec["address"].as_str().unwrap(), rec["port"]),
        sim.info["nbd"][0].as_str().unwrap()
    );
    assert!(rec["cert"].as_str().unwrap().contains("BEGIN CERTIFICATE"));

    // data_destroy: preconditions, then type cbt_metadata, still usable as vdi_from.
    let r = jsonrpc(&a, "VDI.data_destroy", json!([s, vdi]));
    assert_eq!(
        err(&r),
        (
            "OPERATION_NOT_ALLOWED".into(),
            vec!["VDI is not a snapshot".into()]
        )
    );
    call(&a, "VDI.data_destroy", json!([s, base]));
    assert_eq!(call(&a, "VDI.get_type", json!([s, base])), "cbt_metadata");
    call(&a, "VDI.data_destroy", json!([s, base]));
    let r = jsonrpc(&a, "VDI.get_nbd_info", json!([s, base]));
    assert_eq!(
        err(&r),
        (
            "VDI_INCOMPATIBLE_TYPE".into(),
            vec![base.as_str().unwrap().into(), "cbt_metadata".into()]
        )
    );
    assert_eq!(
        err(&jsonrpc(&a, "VDI.snapshot", json!([s, base, {}]))).0,
        "VDI_INCOMPATIBLE_TYPE"
    );
    control(
        &sim,
        "/guest-write",
        json!({"vm": vm, "seed": 1, "block_list": [5]}),
    );
    let last = call(&a, "VDI.snapshot", json!([s, vdi, {}]));
    let b64 = call(&a, "VDI.list_changed_blocks", json!([s, base, last]));
    let bits = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().unwrap())
        .unwrap();
    let set: Vec<usize> = (0..bits.len() * 8)
        .filter(|i| bits[i / 8] & (0x80 >> (i % 8)) != 0)
        .collect();
    assert_eq!(
        set,
        vec![3, 5, 7, 100],
        "changes since the cbt_metadata base"
    );
    let r = jsonrpc(&a, "VDI.list_changed_blocks", json!([s, base, vdi]));
    assert_eq!(err(&r).0, "VDI_IN_USE", "vdi_to attached to a running VM");
    assert!(sim.stop());
}

#[test]
fn events_and_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::spawn(dir.path(), &["--vms", "2", "--disk-size", "4M"]);
    let a = sim.addr();
    let s = login(&sim);
    let all = call(&a, "event.from", json!([s, ["vm"], "", 1.0]));
    let events = all["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .all(|e| e["operation"] == "add" && e["class"] == "vm")
    );
    assert!(events.len() >= 4, "dom0 + templates + VMs");
    let token = all["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 41, "%020d,%020d: {token}");

    // Nothing new: returns empty after the timeout.
    let t0 = std::time::Instant::now();
    let none = call(&a, "event.from", json!([s, ["vm"], token, 0.3]));
    assert_eq!(none["events"], json!([]));
    assert!(t0.elapsed() >= Duration::from_millis(250));

    // A change made while waiting wakes the call up.
    let vm = vm_named(&a, &s, "vm-02");
    let (a2, s2, vm2) = (a.clone(), s.clone(), vm.clone());
    let waker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        call(&a2, "VM.set_name_description", json!([s2, vm2, "changed"]));
    });
    let got = call(&a, "event.from", json!([s, ["vm"], token, 10.0]));
    waker.join().unwrap();
    let ev = &got["events"][0];
    assert_eq!(ev["operation"], "mod");
    assert_eq!(ev["ref"], json!(vm));
    assert_eq!(ev["snapshot"]["name_description"], "changed");

    // Async call watched through task events; result is an XML-RPC fragment.
    let token = got["token"].as_str().unwrap().to_string();
    let task = call(&a, "Async.VM.clone", json!([s, vm, "clone"]));
    let mut status = String::new();
    let mut tok = token;
    for _ in 0..50 {
        let r = call(
            &a,
            "event.from",
            json!([s, [format!("task/{}", task.as_str().unwrap())], tok, 5.0]),
        );
        tok = r["token"].as_str().unwrap().to_string();
        if let Some(e) = r["events"].as_array().unwrap().last() {
            status = e["snapshot"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if status != "pending" {
                break;
            }
        }
    }
    assert_eq!(status, "success");
    let result = call(&a, "task.get_result", json!([s, task]));
    let clone = result
        .as_str()
        .unwrap()
        .trim_start_matches("<value>")
        .trim_end_matches("</value>")
        .to_string();
    assert!(clone.starts_with("OpaqueRef:"), "{result}");
    assert_eq!(call(&a, "VM.get_name_label", json!([s, clone])), "clone");
    call(&a, "task.destroy", json!([s, task]));

    // Client-created tasks (for HTTP transfers) and cancel.
    let t = call(&a, "task.create", json!([s, "export", "x"]));
    assert_eq!(call(&a, "task.get_status", json!([s, t])), "pending");
    call(&a, "task.set_progress", json!([s, t, 0.5]));
    assert_eq!(call(&a, "task.get_progress", json!([s, t])), 0.5);
    call(&a, "task.cancel", json!([s, t]));
    assert_eq!(call(&a, "task.get_status", json!([s, t])), "cancelled");
    assert_eq!(
        call(&a, "task.get_error_info", json!([s, t]))[0],
        "TASK_CANCELLED"
    );

    // A destroyed object gives `del` without a snapshot.
    let tok = call(&a, "event.from", json!([s, ["vm"], "", 0.0]))["token"].clone();
    call(&a, "VM.destroy", json!([s, clone]));
    let r = call(&a, "event.from", json!([s, ["vm"], tok, 5.0]));
    let del = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ref"] == json!(clone))
        .unwrap()
        .clone();
    assert_eq!(del["operation"], "del");
    assert!(del.get("snapshot").is_none());

    let inj = call(&a, "event.inject", json!([s, "vm", vm]));
    let r = call(&a, "event.from", json!([s, ["vm"], inj, 1.0]));
    assert!(
        r["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["ref"] == json!(vm))
    );
    let m = call(
        &a,
        "message.create",
        json!([s, "BACKUP_OK", 5, "VM", "uuid", "body"]),
    );
    assert_eq!(
        call(&a, "message.get_record", json!([s, m]))["name"],
        "BACKUP_OK"
    );
    assert!(sim.stop());
}

#[test]
fn faults_and_topology_changes() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::spawn(
        dir.path(),
        &["--vms", "1", "--disk-size", "4M", "--hosts", "2"],
    );
    let a = sim.addr();
    let s = login(&sim);
    let vm = vm_named(&a, &s, "vm-01");

    control(
        &sim,
        "/faults/call",
        json!({"method": "VM.snapshot", "nth": 2, "error": ["SR_BACKEND_FAILURE_44", "", "no space", ""]}),
    );
    let ok = call(&a, "VM.snapshot", json!([s, vm, "one"]));
    let r = jsonrpc(&a, "VM.snapshot", json!([s, vm, "two"]));
    assert_eq!(
        err(&r),
        (
            "SR_BACKEND_FAILURE_44".into(),
            vec!["".into(), "no space".into(), "".into()]
        )
    );
    call(&a, "VM.snapshot", json!([s, vm, "three"]));
    let (_, _, stats) = get(&a, "/_sim/stats");
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["calls"]["VM.snapshot"], 3);

    control(&sim, "/faults/sr-full", json!({"on": true}));
    assert_eq!(
        err(&jsonrpc(&a, "VM.snapshot", json!([s, vm, "full"]))).0,
        "SR_FULL"
    );
    control(&sim, "/faults/reset", json!({}));
    call(&a, "VM.destroy", json!([s, ok]));

    control(&sim, "/faults/expire-session", json!({"session": s}));
    assert_eq!(
        err(&jsonrpc(&a, "VM.get_all", json!([s]))).0,
        "SESSION_INVALID"
    );
    let s = login(&sim);

    // The coordinator becomes a member: logins there now get HOST_IS_SLAVE.
    let hosts = serde_json::from_str::<Value>(&get(&a, "/_sim/hosts").2).unwrap();
    let member = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["coordinator"] == false)
        .unwrap()
        .clone();
    control(&sim, "/coordinator", json!({"host": member["uuid"]}));
    let r = jsonrpc(
        &a,
        "session.login_with_password",
        json!(["root", sim.password()]),
    );
    let member_addr = member["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    assert_eq!(err(&r), ("HOST_IS_SLAVE".into(), vec![member_addr.clone()]));
    let r = jsonrpc(
        &member_addr,
        "session.login_with_password",
        json!(["root", sim.password()]),
    );
    assert!(r["result"].as_str().unwrap().starts_with("OpaqueRef:"));
    // Existing sessions keep working.
    call(&a, "VM.get_all", json!([s]));
    assert!(sim.stop());
}

#[test]
fn revert_replaces_the_disks_with_the_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::spawn(dir.path(), &["--vms", "1", "--disk-size", "4M"]);
    let a = sim.addr();
    let s = login(&sim);
    let vm = vm_named(&a, &s, "vm-01");
    let old = disk_vdi(&a, &s, &vm);
    let snap = call(&a, "VM.snapshot", json!([s, vm, "before"]));
    call(&a, "VM.revert", json!([s, snap]));
    assert_eq!(call(&a, "VM.get_power_state", json!([s, vm])), "Halted");
    assert_eq!(call(&a, "VM.get_parent", json!([s, vm])), snap);
    let new = disk_vdi(&a, &s, &vm);
    assert_ne!(new, old);
    assert_eq!(
        err(&jsonrpc(&a, "VDI.get_record", json!([s, old]))).0,
        "HANDLE_INVALID"
    );
    assert_eq!(call(&a, "VDI.get_is_a_snapshot", json!([s, new])), false);
    let r = jsonrpc(&a, "VM.revert", json!([s, vm]));
    assert_eq!(err(&r).0, "OPERATION_NOT_ALLOWED");
    assert!(sim.stop());
}

#[test]
fn scenario_file_vbds_and_network_purposes() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("lab.toml");
    std::fs::write(
        &scenario,
        r#"
        [pool]
        name = "lab"
        [[hosts]]
        name = "xcp1"
        [[hosts]]
        name = "xcp2"
        [[srs]]
        name = "sr1"
        size = "1G"
        [[srs]]
        name = "sr2"
        size = "1G"
        host = 1
        [[networks]]
        name = "storage"
        purpose = ["nbd"]
        [[vms]]
        name = "db"
        power_state = "Running"
        tags = ["prod"]
        host = 1
        [[vms.disks]]
        size = "4M"
        written = "50%"
        cbt = true
        [[vms.disks]]
        size = "2M"
        [[vms.vifs]]
        network = 0
        [[vms]]
        name = "idle"
        "#,
    )
    .unwrap();
    let state = dir.path().join("state");
    let sim = SimProcess::spawn(&state, &["--scenario", scenario.to_str().unwrap()]);
    assert_eq!(sim.info["nbd"].as_array().unwrap().len(), 2);
    let a = sim.addr();
    let s = login(&sim);
    let pool = call(&a, "pool.get_all", json!([s]))[0].clone();
    assert_eq!(call(&a, "pool.get_name_label", json!([s, pool])), "lab");
    let db = vm_named(&a, &s, "db");
    assert_eq!(call(&a, "VM.get_tags", json!([s, db])), json!(["prod"]));
    assert_eq!(
        call(&a, "VM.get_VBDs", json!([s, db]))
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let vdi = disk_vdi(&a, &s, &db);
    assert_eq!(call(&a, "VDI.get_cbt_enabled", json!([s, vdi])), true);
    let sr = call(&a, "VDI.get_SR", json!([s, vdi]));
    assert_eq!(
        call(&a, "SR.get_name_label", json!([s, sr])),
        "sr2",
        "local SR of the VM's host"
    );
    assert!(
        call(&a, "SR.get_physical_utilisation", json!([s, sr]))
            .as_i64()
            .unwrap()
            >= 2 << 20
    );
    // get_nbd_info: only the host with the SR's PBD, its own NBD port.
    let info = call(&a, "VDI.get_nbd_info", json!([s, vdi]));
    assert_eq!(info.as_array().unwrap().len(), 1);
    assert_eq!(
        format!("127.0.0.1:{}", info[0]["port"]),
        sim.info["nbd"][1].as_str().unwrap()
    );

    // A disk larger than the SR's free space: SR_FULL [requested, maximum].
    let r = jsonrpc(
        &a,
        "VDI.create",
        json!([s, {"SR": sr, "virtual_size": 2i64 << 30, "type": "user",
        "name_label": "big", "sharable": false, "read_only": false, "other_config": {}}]),
    );
    let (code, params) = err(&r);
    assert_eq!(code, "SR_FULL");
    assert_eq!(params[0], (2i64 << 30).to_string());
    let small = call(
        &a,
        "VDI.create",
        json!([s, {"SR": sr, "virtual_size": 1000, "type": "user"}]),
    );
    assert_eq!(
        call(&a, "VDI.get_virtual_size", json!([s, small])),
        2 << 20,
        "rounded up to 2 MiB"
    );
    call(&a, "VDI.destroy", json!([s, small]));

    // network purposes exclude each other.
    let net = call(&a, "network.get_all", json!([s]))[0].clone();
    let r = jsonrpc(&a, "network.add_purpose", json!([s, net, "insecure_nbd"]));
    assert_eq!(err(&r).0, "NETWORK_INCOMPATIBLE_PURPOSES");
    call(&a, "network.remove_purpose", json!([s, net, "nbd"]));
    assert_eq!(
        call(&a, "VDI.get_nbd_info", json!([s, vdi])),
        json!([]),
        "no NBD network, no records"
    );
    call(&a, "network.add_purpose", json!([s, net, "insecure_nbd"]));

    // VBD life cycle on a halted VM.
    let idle = vm_named(&a, &s, "idle");
    let vbd = call(
        &a,
        "VBD.create",
        json!([s, {"VM": idle, "VDI": vdi, "userdevice": "autodetect", "bootable": false,
        "mode": "RO", "type": "Disk", "empty": false, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}]),
    );
    assert_eq!(call(&a, "VBD.get_userdevice", json!([s, vbd])), "0");
    let r = jsonrpc(&a, "VBD.plug", json!([s, vbd]));
    assert_eq!(
        err(&r),
        (
            "VM_BAD_POWER_STATE".into(),
            vec![idle.clone(), "running".into(), "halted".into()]
        )
    );
    assert!(
        call(&a, "VDI.get_VBDs", json!([s, vdi]))
            .as_array()
            .unwrap()
            .contains(&vbd)
    );
    call(&a, "VBD.destroy", json!([s, vbd]));
    assert!(
        !call(&a, "VDI.get_VBDs", json!([s, vdi]))
            .as_array()
            .unwrap()
            .contains(&vbd)
    );
    assert!(sim.stop());
}
