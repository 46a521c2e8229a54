//! `VM.*`: snapshot (with `ignore_vdis`), checkpoint, clone, copy, destroy
//! (leaving the VDIs), the power state machine, `blocked_operations`
//! (`OPERATION_BLOCKED`) and `allowed_operations` (xapi-facts §2.2).

use xenvault_types::Value;

use super::vdi::{clone_vdi, copy_vdi, create_vdi, snapshot_vdi};
use super::{Ctx, Impl, arg_str, arg_strs, void};
use crate::datamodel::NULL_REF;
use crate::db::{Db, Fields, Record};
use crate::error::{ApiError, ApiResult};
use crate::pool::{Pool, now_value};

/// The explicit `VM` messages.
pub fn lookup(msg: &str) -> Option<Impl> {
    Some(match msg {
        "snapshot" => snapshot,
        "checkpoint" => checkpoint,
        "clone" => clone,
        "copy" => copy,
        "destroy" => destroy,
        "revert" => revert,
        "start" => |ctx, args| start(ctx, &arg_str(args, 0), None, super::arg_bool(args, 1)),
        "start_on" => |ctx, args| {
            start(
                ctx,
                &arg_str(args, 0),
                Some(arg_str(args, 1)),
                super::arg_bool(args, 2),
            )
        },
        "clean_shutdown" | "shutdown" => {
            |ctx, args| power(ctx, args, "clean_shutdown", &["Running"], "Halted")
        }
        "hard_shutdown" => |ctx, args| {
            power(
                ctx,
                args,
                "hard_shutdown",
                &["Running", "Paused", "Suspended"],
                "Halted",
            )
        },
        "clean_reboot" => |ctx, args| power(ctx, args, "clean_reboot", &["Running"], "Running"),
        "hard_reboot" => {
            |ctx, args| power(ctx, args, "hard_reboot", &["Running", "Paused"], "Running")
        }
        "suspend" => |ctx, args| power(ctx, args, "suspend", &["Running"], "Suspended"),
        "resume" | "resume_on" => |ctx, args| power(ctx, args, "resume", &["Suspended"], "Running"),
        "pause" => |ctx, args| power(ctx, args, "pause", &["Running"], "Paused"),
        "unpause" => |ctx, args| power(ctx, args, "unpause", &["Paused"], "Running"),
        "power_state_reset" => |ctx, args| {
            let vm = arg_str(args, 0);
            let mut db = ctx.pool.db();
            set_power_state(&mut db, &vm, "Halted", None)?;
            Ok(void())
        },
        "update_allowed_operations" => |ctx, args| {
            let mut db = ctx.pool.db();
            refresh_allowed_operations(&mut db, &arg_str(args, 0))?;
            Ok(void())
        },
        "assert_operation_valid" => |ctx, args| {
            let db = ctx.pool.db();
            check_blocked(&db, &arg_str(args, 0), &arg_str(args, 1))?;
            Ok(void())
        },
        "get_allowed_VBD_devices" => |ctx, args| {
            let db = ctx.pool.db();
            let vm = arg_str(args, 0);
            let used: Vec<String> = db
                .get("VM", &vm)?
                .strs_of("VBDs")
                .iter()
                .filter_map(|b| {
                    db.get("VBD", b)
                        .ok()
                        .map(|r| r.str_of("userdevice").to_string())
                })
                .collect();
            Ok(Value::Array(
                (0..16)
                    .map(|i: u32| i.to_string())
                    .filter(|d| !used.contains(d))
                    .map(Value::String)
                    .collect(),
            ))
        },
        "get_allowed_VIF_devices" => |ctx, args| {
            let db = ctx.pool.db();
            let vm = arg_str(args, 0);
            let used: Vec<String> = db
                .get("VM", &vm)?
                .strs_of("VIFs")
                .iter()
                .filter_map(|b| {
                    db.get("VIF", b)
                        .ok()
                        .map(|r| r.str_of("device").to_string())
                })
                .collect();
            Ok(Value::Array(
                (0..7)
                    .map(|i: u32| i.to_string())
                    .filter(|d| !used.contains(d))
                    .map(Value::String)
                    .collect(),
            ))
        },
        _ => return None,
    })
}

/// `OPERATION_BLOCKED [vm, reason]` if `blocked_operations` names `op`.
pub fn check_blocked(db: &Db, vm: &str, op: &str) -> ApiResult<()> {
    let rec = db.get("VM", vm)?;
    if let Some(reason) = rec.map_get("blocked_operations", op) {
        return Err(ApiError::new("OPERATION_BLOCKED", [vm.to_string(), reason]));
    }
    Ok(())
}

fn lower_states(states: &[&str]) -> String {
    states
        .iter()
        .map(|s| s.to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `VM_BAD_POWER_STATE [vm, expected, actual]`, lowercase as in xen-api
/// ocaml/xapi/xapi_vm_lifecycle.ml.
fn check_power(rec: &Record, vm: &str, allowed: &[&str]) -> ApiResult<()> {
    let ps = rec.str_of("power_state");
    if allowed.contains(&ps) {
        return Ok(());
    }
    Err(ApiError::new(
        "VM_BAD_POWER_STATE",
        [
            vm.to_string(),
            lower_states(allowed),
            ps.to_ascii_lowercase(),
        ],
    ))
}

/// Recomputes `allowed_operations` from the power state and flags.
pub fn refresh_allowed_operations(db: &mut Db, vm: &str) -> ApiResult<()> {
    let rec = db.get("VM", vm)?;
    let template = rec.bool_of("is_a_template");
    let ops: &[&str] = if rec.bool_of("is_control_domain") {
        &["changing_memory_live"]
    } else if template {
        &[
            "clone",
            "copy",
            "export",
            "destroy",
            "provision",
            "changing_memory_limits",
            "metadata_export",
        ]
    } else {
        match rec.str_of("power_state") {
            "Halted" => &[
                "start",
                "start_on",
                "clone",
                "copy",
                "snapshot",
                "destroy",
                "export",
                "metadata_export",
                "changing_memory_limits",
                "changing_VCPUs",
                "make_into_template",
            ],
            "Running" => &[
                "snapshot",
                "checkpoint",
                "clean_shutdown",
                "hard_shutdown",
                "clean_reboot",
                "hard_reboot",
                "suspend",
                "pause",
                "pool_migrate",
                "metadata_export",
                "changing_memory_live",
            ],
            "Paused" => &[
                "unpause",
                "hard_shutdown",
                "hard_reboot",
                "snapshot",
                "checkpoint",
            ],
            "Suspended" => &[
                "resume",
                "resume_on",
                "hard_shutdown",
                "snapshot",
                "checkpoint",
                "destroy",
                "export",
            ],
            _ => &[],
        }
    };
    let v = Value::Array(ops.iter().map(|o| Value::str(*o)).collect());
    db.update("VM", vm, |r| {
        r.insert("allowed_operations".into(), v);
    })
}

/// Sets the power state and what follows from it (resident_on, domid, VBD
/// and VIF attachment).
fn set_power_state(db: &mut Db, vm: &str, state: &str, host: Option<&str>) -> ApiResult<()> {
    let rec = db.get("VM", vm)?.clone();
    let live = state == "Running" || state == "Paused";
    let resident = match (live, host) {
        (true, Some(h)) => h.to_string(),
        (true, None) => rec.str_of("resident_on").to_string(),
        _ => NULL_REF.to_string(),
    };
    let was_live = matches!(rec.str_of("power_state"), "Running" | "Paused");
    let domid = if live {
        if was_live {
            rec.int_of("domid")
        } else {
            next_domid(db)
        }
    } else {
        -1
    };
    db.update("VM", vm, |r| {
        r.insert("power_state".into(), Value::str(state));
        r.insert("resident_on".into(), Value::str(resident));
        r.insert("domid".into(), Value::Int(domid));
    })?;
    let attached = state != "Halted";
    for vbd in rec.strs_of("VBDs") {
        let _ = db.set("VBD", &vbd, "currently_attached", Value::Bool(attached));
    }
    for vif in rec.strs_of("VIFs") {
        let _ = db.set("VIF", &vif, "currently_attached", Value::Bool(attached));
    }
    refresh_allowed_operations(db, vm)
}

fn next_domid(db: &Db) -> i64 {
    db.rows("VM")
        .map(|(_, r)| r.int_of("domid"))
        .max()
        .unwrap_or(0)
        .max(0)
        + 1
}

fn start(ctx: &Ctx<'_>, vm: &str, host: Option<String>, paused: bool) -> ApiResult<Value> {
    let mut db = ctx.pool.db();
    let rec = db.get("VM", vm)?.clone();
    if rec.bool_of("is_a_template") || rec.bool_of("is_a_snapshot") {
        return Err(ApiError::new("VM_IS_TEMPLATE", [vm]));
    }
    check_blocked(&db, vm, if host.is_some() { "start_on" } else { "start" })?;
    check_power(&rec, vm, &["Halted"])?;
    let host = match host {
        Some(h) => {
            db.get("host", &h)?;
            h
        }
        None => {
            let aff = rec.str_of("affinity");
            if db.exists("host", aff) {
                aff.to_string()
            } else {
                ctx.pool_coordinator(&db)
            }
        }
    };
    set_power_state(
        &mut db,
        vm,
        if paused { "Paused" } else { "Running" },
        Some(&host),
    )?;
    Ok(void())
}

impl Ctx<'_> {
    fn pool_coordinator(&self, db: &Db) -> String {
        db.rows("pool")
            .next()
            .map(|(_, p)| p.str_of("master").to_string())
            .unwrap_or_else(|| NULL_REF.to_string())
    }
}

fn power(ctx: &Ctx<'_>, args: &[Value], op: &str, from: &[&str], to: &str) -> ApiResult<Value> {
    let vm = arg_str(args, 0);
    let mut db = ctx.pool.db();
    let rec = db.get("VM", &vm)?.clone();
    if rec.bool_of("is_a_template") {
        return Err(ApiError::new("VM_IS_TEMPLATE", [vm.as_str()]));
    }
    check_blocked(&db, &vm, op)?;
    check_power(&rec, &vm, from)?;
    set_power_state(&mut db, &vm, to, None)?;
    Ok(void())
}

/// VM fields that a snapshot/clone/copy does not take from its source
/// (server-maintained sets and per-object identity).
const NOT_COPIED: &[&str] = &[
    "uuid",
    "VBDs",
    "VIFs",
    "VTPMs",
    "VUSBs",
    "VGPUs",
    "consoles",
    "crash_dumps",
    "snapshots",
    "children",
    "attached_PCIs",
    "current_operations",
    "allowed_operations",
    "metrics",
    "guest_metrics",
    "resident_on",
    "scheduled_to_be_resident_on",
    "domid",
    "blobs",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Snapshot,
    Checkpoint,
    Clone,
    Copy,
}

/// Makes the new VM of a snapshot/checkpoint/clone/copy with its disks, VBDs
/// and VIFs. xen-api ocaml/xapi/xapi_vm_clone.ml.
fn derive_vm(
    pool: &Pool,
    db: &mut Db,
    vm: &str,
    new_name: &str,
    kind: Kind,
    ignore_vdis: &[String],
    sr: Option<&str>,
) -> ApiResult<String> {
    let src = db.get("VM", vm)?.clone();
    if src.bool_of("is_control_domain") {
        return Err(ApiError::not_allowed(
            "the control domain cannot be copied or snapshotted",
        ));
    }
    // Disks first, so a failure leaves no half-made VM.
    let mut new_vbds: Vec<(Record, String)> = Vec::new();
    let mut made_vdis: Vec<String> = Vec::new();
    for vbd in src.strs_of("VBDs") {
        let Ok(b) = db.get("VBD", &vbd).cloned() else {
            continue;
        };
        let vdi = b.str_of("VDI").to_string();
        let is_disk = b.str_of("type") == "Disk" && !b.bool_of("empty") && db.exists("VDI", &vdi);
        if is_disk && ignore_vdis.contains(&vdi) {
            continue;
        }
        let new_vdi = if is_disk {
            let r = match kind {
                Kind::Snapshot | Kind::Checkpoint => snapshot_vdi(pool, db, &vdi),
                Kind::Clone => clone_vdi(pool, db, &vdi),
                Kind::Copy => copy_vdi(pool, db, &vdi, sr),
            };
            match r {
                Ok(r) => {
                    made_vdis.push(r.clone());
                    r
                }
                Err(e) => {
                    for v in &made_vdis {
                        let _ = super::vdi::destroy_vdi(pool, db, v);
                    }
                    return Err(e);
                }
            }
        } else {
            vdi
        };
        new_vbds.push((b, new_vdi));
    }
    let snapshotting = matches!(kind, Kind::Snapshot | Kind::Checkpoint);
    let mut fields: Vec<(String, Value)> = src
        .iter()
        .filter(|(k, _)| !NOT_COPIED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut put = |k: &str, v: Value| {
        fields.retain(|(f, _)| f != k);
        fields.push((k.to_string(), v));
    };
    put("name_label", Value::str(new_name));
    put("domid", Value::Int(-1));
    if snapshotting {
        put("is_a_snapshot", Value::Bool(true));
        put("is_a_template", Value::Bool(true));
        put("snapshot_of", Value::str(vm));
        put("snapshot_time", now_value());
        put("transportable_snapshot_id", Value::str(""));
        put(
            "snapshot_info",
            Value::Struct(vec![
                (
                    "power-state-at-snapshot".into(),
                    Value::str(src.str_of("power_state")),
                ),
                ("disk-snapshot-type".into(), Value::str("crash_consistent")),
            ]),
        );
        put("parent", Value::str(src.str_of("parent")));
        put(
            "power_state",
            Value::str(if kind == Kind::Checkpoint {
                "Suspended"
            } else {
                "Halted"
            }),
        );
    } else {
        put("is_a_snapshot", Value::Bool(false));
        put("snapshot_of", Value::str(NULL_REF));
        put(
            "snapshot_time",
            Value::DateTime("19700101T00:00:00Z".into()),
        );
        put("snapshot_info", Value::Struct(vec![]));
        put("power_state", Value::str("Halted"));
        put("parent", Value::str(vm));
        put("is_default_template", Value::Bool(false));
        put("suspend_VDI", Value::str(NULL_REF));
    }
    if kind == Kind::Checkpoint {
        let sr = new_vbds
            .iter()
            .find_map(|(_, vdi)| db.get("VDI", vdi).ok().map(|r| r.str_of("SR").to_string()))
            .unwrap_or_else(|| pool.default_sr());
        let mem = src.int_of("memory_static_max").max(0);
        let suspend = create_vdi(
            pool,
            db,
            vec![
                (
                    "name_label".into(),
                    Value::str(format!("Suspend image of {new_name}")),
                ),
                ("SR".into(), Value::str(sr)),
                ("virtual_size".into(), Value::Int(mem)),
                ("type".into(), Value::str("suspend")),
                ("is_a_snapshot".into(), Value::Bool(true)),
            ],
        )?;
        put("suspend_VDI", Value::str(suspend));
    }
    let new_vm = db.create("VM", fields.iter().map(|(k, v)| (k.as_str(), v.clone())))?;
    for (b, vdi) in new_vbds {
        let copy: Vec<(&str, Value)> = [
            "device",
            "userdevice",
            "bootable",
            "mode",
            "type",
            "unpluggable",
            "empty",
            "other_config",
            "qos_algorithm_type",
            "qos_algorithm_params",
        ]
        .iter()
        .filter_map(|f| b.get(*f).map(|v| (*f, v.clone())))
        .chain([
            ("VM", Value::str(new_vm.clone())),
            ("VDI", Value::str(vdi)),
            ("currently_attached", Value::Bool(false)),
        ])
        .collect();
        db.create("VBD", copy)?;
    }
    for vif in src.strs_of("VIFs") {
        let Ok(v) = db.get("VIF", &vif).cloned() else {
            continue;
        };
        let copy: Vec<(&str, Value)> = [
            "device",
            "network",
            "MAC",
            "MTU",
            "other_config",
            "MAC_autogenerated",
            "locking_mode",
        ]
        .iter()
        .filter_map(|f| v.get(*f).map(|x| (*f, x.clone())))
        .chain([
            ("VM", Value::str(new_vm.clone())),
            ("currently_attached", Value::Bool(false)),
        ])
        .collect();
        db.create("VIF", copy)?;
    }
    if snapshotting {
        // The live VM's parent becomes its newest snapshot.
        db.set("VM", vm, "parent", Value::str(new_vm.clone()))?;
    }
    refresh_allowed_operations(db, &new_vm)?;
    Ok(new_vm)
}

fn snapshot(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (vm, name, ignore) = (arg_str(args, 0), arg_str(args, 1), arg_strs(args, 2));
    let mut db = ctx.pool.db();
    let rec = db.get("VM", &vm)?.clone();
    check_blocked(&db, &vm, "snapshot")?;
    if !rec.strs_of("VUSBs").is_empty() {
        return Err(ApiError::new("VM_HAS_VUSBS", [vm.as_str()]));
    }
    if rec.bool_of("is_a_snapshot") {
        return Err(ApiError::not_allowed("cannot snapshot a snapshot"));
    }
    derive_vm(ctx.pool, &mut db, &vm, &name, Kind::Snapshot, &ignore, None).map(Value::String)
}

fn checkpoint(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (vm, name) = (arg_str(args, 0), arg_str(args, 1));
    let mut db = ctx.pool.db();
    let rec = db.get("VM", &vm)?.clone();
    check_blocked(&db, &vm, "checkpoint")?;
    check_power(&rec, &vm, &["Running", "Paused", "Suspended"])?;
    derive_vm(ctx.pool, &mut db, &vm, &name, Kind::Checkpoint, &[], None).map(Value::String)
}

fn clone(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (vm, name) = (arg_str(args, 0), arg_str(args, 1));
    let mut db = ctx.pool.db();
    let rec = db.get("VM", &vm)?.clone();
    check_blocked(&db, &vm, "clone")?;
    check_power(&rec, &vm, &["Halted"])?;
    derive_vm(ctx.pool, &mut db, &vm, &name, Kind::Clone, &[], None).map(Value::String)
}

fn copy(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (vm, name, sr) = (arg_str(args, 0), arg_str(args, 1), arg_str(args, 2));
    let mut db = ctx.pool.db();
    let rec = db.get("VM", &vm)?.clone();
    check_blocked(&db, &vm, "copy")?;
    check_power(&rec, &vm, &["Halted", "Suspended"])?;
    let sr = if sr == NULL_REF || sr.is_empty() {
        None
    } else {
        db.get("SR", &sr)?;
        Some(sr)
    };
    derive_vm(
        ctx.pool,
        &mut db,
        &vm,
        &name,
        Kind::Copy,
        &[],
        sr.as_deref(),
    )
    .map(Value::String)
}

/// xen-api ocaml/xapi/xapi_vm_helpers.ml `destroy`: the VM and its VBDs,
/// VIFs and other devices go; its VDIs stay.
fn destroy(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let vm = arg_str(args, 0);
    let mut db = ctx.pool.db();
    let rec = db.get("VM", &vm)?.clone();
    if rec.bool_of("is_control_domain") {
        return Err(ApiError::not_allowed(
            "the control domain cannot be destroyed",
        ));
    }
    check_blocked(&db, &vm, "destroy")?;
    check_power(&rec, &vm, &["Halted", "Suspended"])?;
    for (class, field) in [
        ("VBD", "VBDs"),
        ("VIF", "VIFs"),
        ("VTPM", "VTPMs"),
        ("VUSB", "VUSBs"),
        ("VGPU", "VGPUs"),
        ("console", "consoles"),
        ("crashdump", "crash_dumps"),
    ] {
        for r in rec.strs_of(field) {
            let _ = db.destroy(class, &r);
        }
    }
    for (class, field) in [
        ("VM_metrics", "metrics"),
        ("VM_guest_metrics", "guest_metrics"),
    ] {
        let r = rec.str_of(field);
        if db.exists(class, r) {
            let _ = db.destroy(class, r);
        }
    }
    db.destroy("VM", &vm)?;
    Ok(void())
}

/// xen-api ocaml/xapi/xapi_vm_snapshot.ml `revert`: the VM (shut down first)
/// gets clones of the snapshot's disks in place of its own, whose VDIs are
/// destroyed, and the power state the snapshot was taken in (Halted, or
/// Suspended for a checkpoint).
fn revert(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let snap = arg_str(args, 0);
    let pool = ctx.pool;
    let mut db = pool.db();
    let s = db.get("VM", &snap)?.clone();
    if !s.bool_of("is_a_snapshot") {
        return Err(ApiError::not_allowed("VM.revert needs a snapshot"));
    }
    let vm = s.str_of("snapshot_of").to_string();
    let v = db.get("VM", &vm)?.clone();
    check_blocked(&db, &vm, "revert")?;
    if v.str_of("power_state") != "Halted" {
        set_power_state(&mut db, &vm, "Halted", None)?;
    }
    // Clone the snapshot's disks first, so a failure changes nothing.
    let mut new_vbds = Vec::new();
    for vbd in s.strs_of("VBDs") {
        let Ok(b) = db.get("VBD", &vbd).cloned() else {
            continue;
        };
        let vdi = b.str_of("VDI").to_string();
        let vdi = if b.str_of("type") == "Disk" && db.exists("VDI", &vdi) {
            clone_vdi(pool, &mut db, &vdi)?
        } else {
            vdi
        };
        new_vbds.push((b, vdi));
    }
    for vbd in v.strs_of("VBDs") {
        let Ok(b) = db.get("VBD", &vbd).cloned() else {
            continue;
        };
        db.destroy("VBD", &vbd)?;
        let old = b.str_of("VDI");
        if b.str_of("type") == "Disk"
            && db
                .get("VDI", old)
                .is_ok_and(|r| r.strs_of("VBDs").is_empty())
        {
            super::vdi::destroy_vdi(pool, &mut db, old)?;
        }
    }
    for (b, vdi) in new_vbds {
        let fields: Vec<(&str, Value)> = [
            "device",
            "userdevice",
            "bootable",
            "mode",
            "type",
            "unpluggable",
            "empty",
            "other_config",
        ]
        .iter()
        .filter_map(|f| b.get(*f).map(|x| (*f, x.clone())))
        .chain([
            ("VM", Value::str(vm.clone())),
            ("VDI", Value::str(vdi)),
            ("currently_attached", Value::Bool(false)),
        ])
        .collect();
        db.create("VBD", fields)?;
    }
    let state = if s.str_of("power_state") == "Suspended" {
        "Suspended"
    } else {
        "Halted"
    };
    db.update("VM", &vm, |r| {
        r.insert("power_state".into(), Value::str(state));
        r.insert("parent".into(), Value::str(snap.clone()));
        r.insert(
            "suspend_VDI".into(),
            s.get("suspend_VDI")
                .cloned()
                .unwrap_or(Value::str(NULL_REF)),
        );
    })?;
    refresh_allowed_operations(&mut db, &vm)?;
    Ok(void())
}
