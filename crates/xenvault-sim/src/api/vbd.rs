//! `VBD.*`: create (with `autodetect` userdevice), destroy, plug, unplug.

use xenvault_types::Value;

use super::{Ctx, Impl, arg_str, void};
use crate::datamodel::NULL_REF;
use crate::db::{Db, Fields};
use crate::error::{ApiError, ApiResult};

/// The explicit `VBD` messages.
pub fn lookup(msg: &str) -> Option<Impl> {
    Some(match msg {
        "create" => create,
        "destroy" => destroy,
        "plug" => plug,
        "unplug" | "unplug_force" => unplug,
        _ => return None,
    })
}

/// The first free `userdevice` number of a VM.
pub fn free_userdevice(db: &Db, vm: &str) -> ApiResult<String> {
    let used: Vec<String> = db
        .get("VM", vm)?
        .strs_of("VBDs")
        .iter()
        .filter_map(|b| {
            db.get("VBD", b)
                .ok()
                .map(|r| r.str_of("userdevice").to_string())
        })
        .collect();
    Ok((0..)
        .map(|i: u32| i.to_string())
        .find(|d| !used.contains(d))
        .unwrap_or_else(|| "0".into()))
}

fn create(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let rec = args
        .first()
        .and_then(|v| v.as_struct().ok())
        .unwrap_or(&[])
        .to_vec();
    let get = |k: &str| {
        rec.iter()
            .find(|(f, _)| f == k)
            .and_then(|(_, v)| v.as_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let vm = get("VM");
    let vdi = get("VDI");
    let mut db = ctx.pool.db();
    let vm_rec = db.get("VM", &vm)?.clone();
    if vdi != NULL_REF && !vdi.is_empty() {
        let t = db.get("VDI", &vdi)?.str_of("type").to_string();
        if t == "cbt_metadata" {
            return Err(ApiError::new(
                "VDI_INCOMPATIBLE_TYPE",
                [vdi.as_str(), "cbt_metadata"],
            ));
        }
    }
    let mut userdevice = get("userdevice");
    if userdevice.is_empty() || userdevice == "autodetect" {
        userdevice = free_userdevice(&db, &vm)?;
    } else {
        let taken = vm_rec.strs_of("VBDs").iter().any(|b| {
            db.get("VBD", b)
                .is_ok_and(|r| r.str_of("userdevice") == userdevice)
        });
        if taken {
            return Err(ApiError::new(
                "DEVICE_ALREADY_EXISTS",
                [userdevice.as_str()],
            ));
        }
    }
    let mut fields: Vec<(String, Value)> = rec
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "uuid" | "currently_attached" | "userdevice" | "device"
            )
        })
        .collect();
    fields.push(("userdevice".into(), Value::str(userdevice)));
    fields.push(("currently_attached".into(), Value::Bool(false)));
    let r = db.create("VBD", fields.iter().map(|(k, v)| (k.as_str(), v.clone())))?;
    Ok(Value::String(r))
}

fn destroy(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let vbd = arg_str(args, 0);
    let mut db = ctx.pool.db();
    let rec = db.get("VBD", &vbd)?;
    if rec.bool_of("currently_attached") {
        let vm = rec.str_of("VM").to_string();
        let running = db
            .get("VM", &vm)
            .is_ok_and(|v| v.str_of("power_state") == "Running");
        if running {
            return Err(ApiError::not_allowed(
                "VBD is currently attached; unplug it first",
            ));
        }
    }
    db.destroy("VBD", &vbd)?;
    Ok(void())
}

fn plug(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let vbd = arg_str(args, 0);
    let mut db = ctx.pool.db();
    let rec = db.get("VBD", &vbd)?;
    if rec.bool_of("currently_attached") {
        return Err(ApiError::new("DEVICE_ALREADY_ATTACHED", [vbd.as_str()]));
    }
    let vm = rec.str_of("VM").to_string();
    let ps = db.get("VM", &vm)?.str_of("power_state").to_string();
    if ps != "Running" {
        return Err(ApiError::new(
            "VM_BAD_POWER_STATE",
            [vm, "running".into(), ps.to_ascii_lowercase()],
        ));
    }
    db.set("VBD", &vbd, "currently_attached", Value::Bool(true))?;
    Ok(void())
}

fn unplug(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let vbd = arg_str(args, 0);
    let mut db = ctx.pool.db();
    if !db.get("VBD", &vbd)?.bool_of("currently_attached") {
        return Err(ApiError::new("DEVICE_ALREADY_DETACHED", [vbd.as_str()]));
    }
    db.set("VBD", &vbd, "currently_attached", Value::Bool(false))?;
    Ok(void())
}
