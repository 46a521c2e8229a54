//! SR and PBD: utilisation that follows the data in the disk store, the
//! `SR_FULL` check, and the few explicit SR messages a backup tool calls.

use xenvault_types::Value;

use super::{Ctx, Impl, arg_str, void};
use crate::db::{Db, Fields};
use crate::error::{ApiError, ApiResult};
use crate::pool::Pool;

/// The explicit SR/PBD messages.
pub fn lookup(class: &str, msg: &str) -> Option<Impl> {
    Some(match (class, msg) {
        ("SR", "scan") | ("SR", "update") => scan,
        ("PBD", "plug") => |ctx, args| set_attached(ctx, args, true),
        ("PBD", "unplug") => |ctx, args| set_attached(ctx, args, false),
        _ => return None,
    })
}

fn scan(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let sr = arg_str(args, 0);
    let mut db = ctx.pool.db();
    db.get("SR", &sr)?;
    refresh_sr(ctx.pool, &mut db, &sr);
    Ok(void())
}

fn set_attached(ctx: &Ctx<'_>, args: &[Value], on: bool) -> ApiResult<Value> {
    ctx.pool.db().set(
        "PBD",
        &arg_str(args, 0),
        "currently_attached",
        Value::Bool(on),
    )?;
    Ok(void())
}

/// Recomputes an SR's `physical_utilisation` (bytes stored in the disk
/// store), `virtual_allocation`, and each of its VDIs' `physical_utilisation`.
pub fn refresh_sr(pool: &Pool, db: &mut Db, sr: &str) {
    let Ok(rec) = db.get("SR", sr) else { return };
    let sr_uuid = rec.str_of("uuid").to_string();
    let vdis = rec.strs_of("VDIs");
    let mut virtual_allocation = 0i64;
    for v in &vdis {
        let Ok(vr) = db.get("VDI", v) else { continue };
        virtual_allocation += vr.int_of("virtual_size");
        let uuid = vr.str_of("uuid").to_string();
        if let Ok(info) = pool.disks.info(&uuid) {
            let pu = info.physical_utilisation as i64;
            if vr.int_of("physical_utilisation") != pu {
                let _ = db.set("VDI", v, "physical_utilisation", Value::Int(pu));
            }
        }
    }
    let used = pool.disks.sr_physical_utilisation(&sr_uuid) as i64;
    let _ = db.update("SR", sr, |r| {
        r.insert("physical_utilisation".into(), Value::Int(used));
        r.insert("virtual_allocation".into(), Value::Int(virtual_allocation));
    });
}

/// Recomputes every SR (after guest writes or imports).
pub fn refresh_all(pool: &Pool) {
    let mut db = pool.db();
    for sr in db.all("SR") {
        refresh_sr(pool, &mut db, &sr);
    }
}

/// `SR_FULL [requested, maximum]` if `needed` more bytes do not fit on the SR,
/// or nothing fits any more, or the `sr_full` fault is on.
pub fn check_space(pool: &Pool, db: &Db, sr: &str, needed: u64) -> ApiResult<()> {
    let rec = db.get("SR", sr)?;
    let size = rec.int_of("physical_size").max(0) as u64;
    let used = pool.disks.sr_physical_utilisation(rec.str_of("uuid"));
    let free = size.saturating_sub(used);
    if pool.faults.sr_full() || (size > 0 && (needed > free || free == 0)) {
        return Err(ApiError::new(
            "SR_FULL",
            [needed.max(1).to_string(), free.to_string()],
        ));
    }
    Ok(())
}
