//! The implicit messages every class has, derived from the datamodel:
//! `get_record`, `get_by_uuid`, `get_by_name_label`, `get_all`,
//! `get_all_records`, `get_all_records_where`, `get_all_where`, `create`,
//! `destroy`, and per field `get_`, `set_`, `add_to_`, `remove_from_`,
//! `add_`, `remove_`.

use xenvault_types::Value;

use super::{Ctx, arg_str, void};
use crate::db::Fields;
use crate::error::{ApiError, ApiResult};

/// Runs an implicit message, or an explicit one whose name is a field
/// operation (`task.set_progress`, `VM.set_memory_static_max`…), as a plain
/// field update; other explicit messages without an implementation answer
/// `NOT_IMPLEMENTED [Class.method]`.
pub fn call(ctx: &Ctx<'_>, class: &str, msg: &str, args: &[Value]) -> ApiResult<Value> {
    let pool = ctx.pool;
    let dm = pool.dm;
    let Some(c) = dm.class(class) else {
        return Err(ApiError::new(
            "MESSAGE_METHOD_UNKNOWN",
            [format!("{class}.{msg}")],
        ));
    };
    match msg {
        "get_record" => return pool.db().record_value(class, &arg_str(args, 0)),
        "get_by_uuid" => {
            return pool
                .db()
                .by_uuid(class, &arg_str(args, 0))
                .map(Value::String);
        }
        "get_by_name_label" => {
            let label = arg_str(args, 0);
            let db = pool.db();
            return Ok(Value::Array(
                db.rows(class)
                    .filter(|(_, r)| r.str_of("name_label") == label)
                    .map(|(r, _)| Value::str(r.clone()))
                    .collect(),
            ));
        }
        "get_all" => {
            return Ok(Value::Array(
                pool.db()
                    .all(class)
                    .into_iter()
                    .map(Value::String)
                    .collect(),
            ));
        }
        "get_all_records" => {
            let db = pool.db();
            let mut out = Vec::new();
            for r in db.all(class) {
                out.push((r.clone(), db.record_value(class, &r)?));
            }
            return Ok(Value::Struct(out));
        }
        "get_all_records_where" => {
            let db = pool.db();
            let mut out = Vec::new();
            for r in db.where_refs(class, &arg_str(args, 0))? {
                out.push((r.clone(), db.record_value(class, &r)?));
            }
            return Ok(Value::Struct(out));
        }
        "get_all_where" => {
            let db = pool.db();
            return Ok(Value::Array(
                db.where_refs(class, &arg_str(args, 0))?
                    .into_iter()
                    .map(Value::String)
                    .collect(),
            ));
        }
        "create" => {
            let rec = args.first().cloned().unwrap_or(Value::Struct(vec![]));
            let fields: Vec<(String, Value)> = rec
                .as_struct()
                .map_err(|_| ApiError::field_type("args"))?
                .iter()
                .filter(|(k, _)| c.field(k).is_some())
                .cloned()
                .collect();
            let mut db = pool.db();
            return db
                .create(class, fields.iter().map(|(k, v)| (k.as_str(), v.clone())))
                .map(Value::String);
        }
        "destroy" => {
            pool.db().destroy(class, &arg_str(args, 0))?;
            return Ok(void());
        }
        _ => {}
    }
    let self_ref = arg_str(args, 0);
    let field_of = |prefix: &str| msg.strip_prefix(prefix).and_then(|f| c.field(f));
    if let Some(f) = field_of("get_") {
        return pool.db().field(class, &self_ref, &f.name);
    }
    if let Some(f) = field_of("set_") {
        let v = args.get(1).cloned().unwrap_or(Value::Nil);
        pool.db().set(class, &self_ref, &f.name, v)?;
        return Ok(void());
    }
    if let Some(f) = field_of("add_to_") {
        let key = arg_str(args, 1);
        let val = args.get(2).cloned().unwrap_or(Value::str(""));
        let mut db = pool.db();
        let rec = db.get(class, &self_ref)?;
        if rec.get(&f.name).and_then(|m| m.get(&key)).is_some() {
            // xen-api ocaml/xapi/exnHelper.ml: Duplicate_key → MAP_DUPLICATE_KEY.
            return Err(ApiError::new(
                "MAP_DUPLICATE_KEY",
                [class, f.name.as_str(), rec.str_of("uuid"), key.as_str()],
            ));
        }
        let name = f.name.clone();
        db.update(class, &self_ref, |r| {
            if let Some(Value::Struct(m)) = r.get_mut(&name) {
                m.push((key, val));
            }
        })?;
        return Ok(void());
    }
    if let Some(f) = field_of("remove_from_") {
        let key = arg_str(args, 1);
        let name = f.name.clone();
        pool.db().update(class, &self_ref, |r| {
            if let Some(Value::Struct(m)) = r.get_mut(&name) {
                m.retain(|(k, _)| *k != key);
            }
        })?;
        return Ok(void());
    }
    if let Some(f) = field_of("add_") {
        let v = args.get(1).cloned().unwrap_or(Value::str(""));
        let name = f.name.clone();
        pool.db().update(class, &self_ref, |r| {
            if let Some(Value::Array(items)) = r.get_mut(&name)
                && !items.contains(&v)
            {
                items.push(v);
            }
        })?;
        return Ok(void());
    }
    if let Some(f) = field_of("remove_") {
        let v = args.get(1).cloned().unwrap_or(Value::str(""));
        let name = f.name.clone();
        pool.db().update(class, &self_ref, |r| {
            if let Some(Value::Array(items)) = r.get_mut(&name) {
                items.retain(|x| *x != v);
            }
        })?;
        return Ok(void());
    }
    Err(ApiError::new("NOT_IMPLEMENTED", [format!("{class}.{msg}")]))
}
