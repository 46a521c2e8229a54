//! `VDI.*`: create, snapshot, clone, copy, resize, destroy, forget,
//! `data_destroy` (→ `cbt_metadata`), `enable_cbt`, `disable_cbt`,
//! `list_changed_blocks` and `get_nbd_info` (xapi-facts §2.2–§2.4), each
//! through the disk store and with xapi's preconditions.

use std::time::{Duration, Instant};

use base64::Engine as _;
use xenvault_types::Value;

use super::storage::{check_space, refresh_sr};
use super::{Ctx, Impl, arg_int, arg_str, disk_err, void};
use crate::datamodel::NULL_REF;
use crate::db::{Db, Fields};
use crate::error::{ApiError, ApiResult};
use crate::pool::{Pool, now_value};

/// The explicit `VDI` messages.
pub fn lookup(msg: &str) -> Option<Impl> {
    Some(match msg {
        "create" => create,
        "snapshot" => snapshot,
        "clone" => clone,
        "copy" => copy,
        "resize" | "resize_online" => resize,
        "destroy" => destroy,
        "forget" => forget,
        "data_destroy" => data_destroy,
        "enable_cbt" => |ctx, args| set_cbt(ctx, args, true),
        "disable_cbt" => |ctx, args| set_cbt(ctx, args, false),
        "list_changed_blocks" => list_changed_blocks,
        "get_nbd_info" => get_nbd_info,
        "update" => |_, _| Ok(void()),
        _ => return None,
    })
}

/// SM rounds sizes up to 2 MiB on VHD-based SRs (xapi-facts §5.3).
pub fn round_size(size: u64) -> u64 {
    const MIB2: u64 = 2 * 1024 * 1024;
    size.div_ceil(MIB2) * MIB2
}

fn incompatible_if_cbt_metadata(db: &Db, vdi: &str) -> ApiResult<()> {
    if db.get("VDI", vdi)?.str_of("type") == "cbt_metadata" {
        return Err(ApiError::new(
            "VDI_INCOMPATIBLE_TYPE",
            [vdi, "cbt_metadata"],
        ));
    }
    Ok(())
}

/// Creates a VDI record and its disk. `fields` may set any VDI field; `SR`
/// and `virtual_size` are required.
pub fn create_vdi(pool: &Pool, db: &mut Db, fields: Vec<(String, Value)>) -> ApiResult<String> {
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    let sr = get("SR")
        .and_then(|v| v.as_str().ok().map(str::to_string))
        .unwrap_or_default();
    let sr_uuid = db.get("SR", &sr)?.str_of("uuid").to_string();
    if get("type")
        .and_then(|v| v.as_str().ok().map(str::to_string))
        .as_deref()
        == Some("cbt_metadata")
    {
        return Err(ApiError::new(
            "VDI_INCOMPATIBLE_TYPE",
            [NULL_REF, "cbt_metadata"],
        ));
    }
    let size = get("virtual_size")
        .and_then(|v| v.as_i64().ok())
        .unwrap_or(0);
    if size < 0 {
        return Err(ApiError::new(
            "INVALID_VALUE",
            ["virtual_size".to_string(), size.to_string()],
        ));
    }
    let size = round_size(size as u64);
    // A new disk must fit in the free space (xapi-sim treats creation as thick).
    check_space(pool, db, &sr, size)?;
    let uuid = uuid::Uuid::new_v4().to_string();
    pool.disks.create(&uuid, &sr_uuid, size).map_err(disk_err)?;
    let mut all: Vec<(String, Value)> = fields
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "uuid" | "virtual_size" | "location" | "VBDs" | "snapshots"
            )
        })
        .collect();
    all.push(("uuid".into(), Value::str(uuid.clone())));
    all.push(("virtual_size".into(), Value::Int(size as i64)));
    all.push(("location".into(), Value::str(uuid)));
    all.push(("managed".into(), Value::Bool(true)));
    let r = db.create("VDI", all.iter().map(|(k, v)| (k.as_str(), v.clone())))?;
    refresh_sr(pool, db, &sr);
    Ok(r)
}

fn create(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let rec = args
        .first()
        .and_then(|v| v.as_struct().ok())
        .unwrap_or(&[])
        .to_vec();
    let mut db = ctx.pool.db();
    create_vdi(ctx.pool, &mut db, rec).map(Value::String)
}

/// Fields a VDI snapshot/clone/copy takes from its source.
const COPIED_FIELDS: &[&str] = &[
    "name_label",
    "name_description",
    "virtual_size",
    "type",
    "sharable",
    "read_only",
    "other_config",
    "xenstore_data",
    "sm_config",
    "on_boot",
    "allow_caching",
    "metadata_of_pool",
    "tags",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum CopyKind {
    Snapshot,
    Clone,
    Copy,
}

fn derive_vdi(
    pool: &Pool,
    db: &mut Db,
    vdi: &str,
    kind: CopyKind,
    target_sr: Option<&str>,
) -> ApiResult<String> {
    incompatible_if_cbt_metadata(db, vdi)?;
    let src = db.get("VDI", vdi)?.clone();
    if kind == CopyKind::Snapshot {
        if src.bool_of("sharable") {
            return Err(ApiError::new("VDI_IS_SHARABLE", [vdi]));
        }
        if src.str_of("on_boot") == "reset" {
            return Err(ApiError::new(
                "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
                Vec::<String>::new(),
            ));
        }
    }
    let sr = target_sr.unwrap_or(src.str_of("SR")).to_string();
    let sr_uuid = db.get("SR", &sr)?.str_of("uuid").to_string();
    let src_uuid = src.str_of("uuid").to_string();
    let needed = match kind {
        CopyKind::Copy => pool
            .disks
            .info(&src_uuid)
            .map(|i| i.physical_utilisation)
            .unwrap_or(0),
        _ => 0,
    };
    check_space(pool, db, &sr, needed)?;
    let uuid = uuid::Uuid::new_v4().to_string();
    if pool.disks.exists(&src_uuid) {
        match kind {
            CopyKind::Snapshot => pool.disks.snapshot(&src_uuid, &uuid),
            CopyKind::Clone => pool.disks.clone_disk(&src_uuid, &uuid),
            CopyKind::Copy => pool.disks.copy(&src_uuid, &uuid, &sr_uuid),
        }
        .map_err(disk_err)?;
    }
    let mut fields: Vec<(&str, Value)> = COPIED_FIELDS
        .iter()
        .filter_map(|f| src.get(*f).map(|v| (*f, v.clone())))
        .collect();
    fields.push(("uuid", Value::str(uuid.clone())));
    fields.push(("location", Value::str(uuid.clone())));
    fields.push(("SR", Value::str(sr.clone())));
    fields.push(("managed", Value::Bool(true)));
    if kind == CopyKind::Snapshot {
        fields.push(("is_a_snapshot", Value::Bool(true)));
        fields.push(("snapshot_of", Value::str(vdi)));
        fields.push(("snapshot_time", now_value()));
        fields.push(("cbt_enabled", Value::Bool(src.bool_of("cbt_enabled"))));
    }
    let r = db.create("VDI", fields)?;
    refresh_sr(pool, db, &sr);
    Ok(r)
}

/// `VDI.snapshot` as used by `VM.snapshot`.
pub fn snapshot_vdi(pool: &Pool, db: &mut Db, vdi: &str) -> ApiResult<String> {
    derive_vdi(pool, db, vdi, CopyKind::Snapshot, None)
}

/// `VDI.clone` as used by `VM.clone`.
pub fn clone_vdi(pool: &Pool, db: &mut Db, vdi: &str) -> ApiResult<String> {
    derive_vdi(pool, db, vdi, CopyKind::Clone, None)
}

/// `VDI.copy` to an SR, as used by `VM.copy`.
pub fn copy_vdi(pool: &Pool, db: &mut Db, vdi: &str, sr: Option<&str>) -> ApiResult<String> {
    derive_vdi(pool, db, vdi, CopyKind::Copy, sr)
}

fn snapshot(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let mut db = ctx.pool.db();
    snapshot_vdi(ctx.pool, &mut db, &arg_str(args, 0)).map(Value::String)
}

fn clone(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let mut db = ctx.pool.db();
    clone_vdi(ctx.pool, &mut db, &arg_str(args, 0)).map(Value::String)
}

fn copy(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (vdi, sr, into) = (arg_str(args, 0), arg_str(args, 1), arg_str(args, 3));
    let mut db = ctx.pool.db();
    if into != NULL_REF && !into.is_empty() {
        return Err(ApiError::new("NOT_IMPLEMENTED", ["VDI.copy into_vdi"]));
    }
    let sr = (sr != NULL_REF && !sr.is_empty()).then_some(sr);
    copy_vdi(ctx.pool, &mut db, &vdi, sr.as_deref()).map(Value::String)
}

fn resize(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let vdi = arg_str(args, 0);
    let size = round_size(arg_int(args, 1).max(0) as u64);
    let mut db = ctx.pool.db();
    incompatible_if_cbt_metadata(&db, &vdi)?;
    let uuid = db.get("VDI", &vdi)?.str_of("uuid").to_string();
    ctx.pool.disks.resize(&uuid, size).map_err(disk_err)?;
    db.set("VDI", &vdi, "virtual_size", Value::Int(size as i64))?;
    Ok(void())
}

/// Whether any VBD of the VDI is attached.
fn attached_vbds(db: &Db, vdi: &str) -> ApiResult<Vec<String>> {
    Ok(db
        .get("VDI", vdi)?
        .strs_of("VBDs")
        .into_iter()
        .filter(|b| {
            db.get("VBD", b)
                .is_ok_and(|r| r.bool_of("currently_attached"))
        })
        .collect())
}

/// Destroys a VDI: its disk and record, and the unattached VBDs naming it.
pub fn destroy_vdi(pool: &Pool, db: &mut Db, vdi: &str) -> ApiResult<()> {
    if !attached_vbds(db, vdi)?.is_empty() {
        return Err(ApiError::new("VDI_IN_USE", [vdi, "destroy"]));
    }
    let rec = db.get("VDI", vdi)?.clone();
    let uuid = rec.str_of("uuid");
    if pool.disks.exists(uuid) {
        // SM deletes the VHD and leaves the coalesce of a parent left with one child to
        // its background GC (docs/xapi-notes.md "Simulator data plane: coalesce after
        // VDI.destroy"): the call does not wait for the copy.
        if pool
            .disks
            .destroy_deferring_coalesce(uuid)
            .map_err(disk_err)?
        {
            pool.disks.start_gc();
        }
    }
    for vbd in rec.strs_of("VBDs") {
        let _ = db.destroy("VBD", &vbd);
    }
    db.destroy("VDI", vdi)?;
    refresh_sr(pool, db, rec.str_of("SR"));
    Ok(())
}

fn destroy(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let mut db = ctx.pool.db();
    destroy_vdi(ctx.pool, &mut db, &arg_str(args, 0))?;
    Ok(void())
}

fn forget(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    ctx.pool.db().destroy("VDI", &arg_str(args, 0))?;
    Ok(void())
}

/// xen-api ocaml/xapi/xapi_vdi.ml `_data_destroy`: a CBT-enabled snapshot
/// keeps only its CBT log and becomes `cbt_metadata`; it waits up to 4 s for
/// its VBDs to go, then fails with `VDI_IN_USE`.
fn data_destroy(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let vdi = arg_str(args, 0);
    {
        let db = ctx.pool.db();
        let rec = db.get("VDI", &vdi)?;
        if rec.str_of("type") == "cbt_metadata" {
            return Ok(void());
        }
        if !rec.bool_of("is_a_snapshot") {
            return Err(ApiError::not_allowed("VDI is not a snapshot"));
        }
        if !rec.bool_of("cbt_enabled") {
            return Err(ApiError::new("VDI_NO_CBT_METADATA", [vdi.as_str()]));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let has_vbds = !ctx.pool.db().get("VDI", &vdi)?.strs_of("VBDs").is_empty();
        if !has_vbds {
            break;
        }
        if Instant::now() >= deadline {
            return Err(ApiError::new("VDI_IN_USE", [vdi.as_str(), "data_destroy"]));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut db = ctx.pool.db();
    let rec = db.get("VDI", &vdi)?.clone();
    // Coalescing in the background, as for VDI.destroy.
    if ctx
        .pool
        .disks
        .data_destroy_deferring_coalesce(rec.str_of("uuid"))
        .map_err(disk_err)?
    {
        ctx.pool.disks.start_gc();
    }
    db.update("VDI", &vdi, |r| {
        r.insert("type".into(), Value::str("cbt_metadata"));
        r.insert("physical_utilisation".into(), Value::Int(0));
    })?;
    refresh_sr(ctx.pool, &mut db, rec.str_of("SR"));
    Ok(void())
}

fn set_cbt(ctx: &Ctx<'_>, args: &[Value], on: bool) -> ApiResult<Value> {
    let vdi = arg_str(args, 0);
    let mut db = ctx.pool.db();
    let rec = db.get("VDI", &vdi)?.clone();
    let ty = rec.str_of("type");
    if on {
        if rec.bool_of("is_a_snapshot") {
            return Err(ApiError::not_allowed("VDI is a snapshot"));
        }
        if ty != "user" && ty != "system" {
            return Err(ApiError::new("VDI_INCOMPATIBLE_TYPE", [vdi.as_str(), ty]));
        }
        if rec.str_of("on_boot") == "reset" {
            return Err(ApiError::new(
                "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
                Vec::<String>::new(),
            ));
        }
    }
    let uuid = rec.str_of("uuid");
    if on {
        ctx.pool.disks.enable_cbt(uuid).map_err(disk_err)?;
    } else {
        ctx.pool.disks.disable_cbt(uuid).map_err(disk_err)?;
    }
    db.set("VDI", &vdi, "cbt_enabled", Value::Bool(on))?;
    Ok(void())
}

fn list_changed_blocks(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (from, to) = (arg_str(args, 0), arg_str(args, 1));
    let (from_uuid, to_uuid) = {
        let db = ctx.pool.db();
        let f = db.get("VDI", &from)?.str_of("uuid").to_string();
        let t_rec = db.get("VDI", &to)?;
        let t = t_rec.str_of("uuid").to_string();
        // xen-api ocaml/xapi/xapi_vdi.ml: not while vdi_to is attached to a
        // non-snapshot VM.
        for vbd in t_rec.strs_of("VBDs") {
            let Ok(b) = db.get("VBD", &vbd) else { continue };
            let vm = b.str_of("VM");
            if b.bool_of("currently_attached")
                && db
                    .get("VM", vm)
                    .is_ok_and(|v| !v.bool_of("is_a_snapshot") && !v.bool_of("is_control_domain"))
            {
                return Err(ApiError::new(
                    "VDI_IN_USE",
                    [to.as_str(), "list_changed_blocks"],
                ));
            }
        }
        (f, t)
    };
    let bitmap = ctx
        .pool
        .disks
        .list_changed_blocks(&from_uuid, &to_uuid)
        .map_err(disk_err)?;
    Ok(Value::String(
        base64::engine::general_purpose::STANDARD.encode(bitmap.to_msb_first_bytes()),
    ))
}

/// xen-api ocaml/xapi/xapi_vdi.ml `_get_nbd_info`: one record per host with
/// an attached PBD to the SR and a PIF on a network with an NBD purpose.
fn get_nbd_info(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let vdi = arg_str(args, 0);
    let db = ctx.pool.db();
    incompatible_if_cbt_metadata(&db, &vdi)?;
    let rec = db.get("VDI", &vdi)?;
    let uuid = rec.str_of("uuid").to_string();
    let sr = rec.str_of("SR").to_string();
    let nbd_networks: Vec<String> = db
        .rows("network")
        .filter(|(_, n)| {
            n.strs_of("purpose")
                .iter()
                .any(|p| p == "nbd" || p == "insecure_nbd")
        })
        .map(|(r, _)| r.clone())
        .collect();
    let mut out = Vec::new();
    let Ok(sr_rec) = db.get("SR", &sr) else {
        return Ok(Value::Array(out));
    };
    for pbd in sr_rec.strs_of("PBDs") {
        let Ok(p) = db.get("PBD", &pbd) else { continue };
        if !p.bool_of("currently_attached") {
            continue;
        }
        let host = p.str_of("host").to_string();
        let Ok(h) = db.get("host", &host) else {
            continue;
        };
        let on_nbd_network = h
            .strs_of("PIFs")
            .iter()
            .filter_map(|pif| db.get("PIF", pif).ok())
            .any(|pif| nbd_networks.iter().any(|n| n == pif.str_of("network")));
        if !on_nbd_network {
            continue;
        }
        let Some(ep) = ctx.pool.endpoint(&host) else {
            continue;
        };
        out.push(Value::record([
            (
                "exportname",
                Value::str(format!("/{uuid}?session_id={}", ctx.session)),
            ),
            ("address", Value::str(ep.nbd.ip().to_string())),
            ("port", Value::Int(i64::from(ep.nbd.port()))),
            ("cert", Value::str(ctx.pool.tls.cert_pem.clone())),
            ("subject", Value::str(ctx.pool.tls.subject.clone())),
        ]));
    }
    Ok(Value::Array(out))
}
