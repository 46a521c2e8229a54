//! The other explicit messages a backup tool meets: `network.add_purpose`
//! (`NETWORK_INCOMPATIBLE_PURPOSES`), `message.*`, `pool.sync_database`,
//! `host.get_server_certificate`, `VIF.plug/unplug`.

use xenvault_types::Value;
use xenvault_types::rpc::parse_datetime;

use super::{Ctx, Impl, arg_int, arg_str, void};
use crate::db::Fields;
use crate::error::{ApiError, ApiResult};
use crate::pool::now_value;

/// The explicit messages of the remaining classes.
pub fn lookup(class: &str, msg: &str) -> Option<Impl> {
    Some(match (class, msg) {
        ("network", "add_purpose") => add_purpose,
        ("network", "remove_purpose") => remove_purpose,
        ("message", "create") => message_create,
        ("message", "get_since") => message_get_since,
        ("message", "get_all_records") => {
            |ctx, _| message_get_since(ctx, &[Value::DateTime("19700101T00:00:00Z".into())])
        }
        ("message", "get") => |ctx, args| {
            // get(cls, obj_uuid, since)
            let uuid = arg_str(args, 1);
            let all = message_get_since(ctx, args.get(2..).unwrap_or(&[]))?;
            Ok(Value::Struct(
                all.as_struct()
                    .unwrap_or(&[])
                    .iter()
                    .filter(|(_, r)| {
                        r.get("obj_uuid").and_then(|v| v.as_str().ok()) == Some(uuid.as_str())
                    })
                    .cloned()
                    .collect(),
            ))
        },
        ("message", "destroy") => |ctx, args| {
            ctx.pool.db().destroy("message", &arg_str(args, 0))?;
            Ok(void())
        },
        ("pool", "sync_database") => |_, _| Ok(void()),
        ("host", "get_server_certificate") => {
            |ctx, _| Ok(Value::str(ctx.pool.tls.cert_pem.clone()))
        }
        ("VIF", "plug") => |ctx, args| {
            ctx.pool.db().set(
                "VIF",
                &arg_str(args, 0),
                "currently_attached",
                Value::Bool(true),
            )?;
            Ok(void())
        },
        ("VIF", "unplug") | ("VIF", "unplug_force") => |ctx, args| {
            ctx.pool.db().set(
                "VIF",
                &arg_str(args, 0),
                "currently_attached",
                Value::Bool(false),
            )?;
            Ok(void())
        },
        _ => return None,
    })
}

fn add_purpose(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (net, purpose) = (arg_str(args, 0), arg_str(args, 1));
    let mut db = ctx.pool.db();
    db.get("network", &net)?;
    // xen-api ocaml/xapi/xapi_network.ml: nbd and insecure_nbd exclude each
    // other across the pool.
    let other = if purpose == "nbd" {
        "insecure_nbd"
    } else {
        "nbd"
    };
    if purpose == "nbd" || purpose == "insecure_nbd" {
        let clash = db
            .rows("network")
            .any(|(_, n)| n.strs_of("purpose").iter().any(|p| p == other));
        if clash {
            return Err(ApiError::new(
                "NETWORK_INCOMPATIBLE_PURPOSES",
                [purpose.as_str(), other],
            ));
        }
    }
    db.update("network", &net, |r| {
        if let Some(Value::Array(p)) = r.get_mut("purpose")
            && !p.iter().any(|x| x.as_str().ok() == Some(purpose.as_str()))
        {
            p.push(Value::str(purpose.clone()));
        }
    })?;
    Ok(void())
}

fn remove_purpose(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (net, purpose) = (arg_str(args, 0), arg_str(args, 1));
    ctx.pool.db().update("network", &net, |r| {
        if let Some(Value::Array(p)) = r.get_mut("purpose") {
            p.retain(|x| x.as_str().ok() != Some(purpose.as_str()));
        }
    })?;
    Ok(void())
}

fn message_create(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (name, priority, cls, obj_uuid, body) = (
        arg_str(args, 0),
        arg_int(args, 1),
        arg_str(args, 2),
        arg_str(args, 3),
        arg_str(args, 4),
    );
    let mut db = ctx.pool.db();
    let r = db.create(
        "message",
        [
            ("name", Value::str(name)),
            ("priority", Value::Int(priority)),
            ("cls", Value::str(cls)),
            ("obj_uuid", Value::str(obj_uuid)),
            ("timestamp", now_value()),
            ("body", Value::str(body)),
        ],
    )?;
    Ok(Value::String(r))
}

fn message_get_since(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let since = args
        .first()
        .and_then(|v| v.as_str().ok())
        .and_then(|s| parse_datetime(s).ok())
        .map(|t| t.unix_timestamp())
        .unwrap_or(0);
    let db = ctx.pool.db();
    let mut out = Vec::new();
    for (r, rec) in db.rows("message") {
        let t = parse_datetime(rec.str_of("timestamp"))
            .map(|t| t.unix_timestamp())
            .unwrap_or(0);
        if t >= since {
            out.push((r.clone(), db.record_value("message", r)?));
        }
    }
    Ok(Value::Struct(out))
}
