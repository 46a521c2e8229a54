//! `task.*`: client-created tasks (for HTTP transfers), cancel, and the
//! status setters (xapi-facts §1.5).

use xenvault_types::Value;

use super::{Ctx, Impl, arg_str, void};
use crate::db::Fields;
use crate::error::{ApiError, ApiResult};
use crate::pool::now_value;

/// The explicit `task` messages.
pub fn lookup(msg: &str) -> Option<Impl> {
    Some(match msg {
        "create" => create,
        "cancel" => cancel,
        "destroy" => destroy,
        "set_status" => set_status,
        _ => return None,
    })
}

fn create(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let t = ctx.pool.task_create(&arg_str(args, 0), &arg_str(args, 1));
    Ok(Value::String(t))
}

/// xen-api ocaml/xapi/taskHelper.ml: a running task is asked to cancel
/// (`cancelling`, its runner then fails it with `TASK_CANCELLED`); a task
/// nobody runs is cancelled at once.
fn cancel(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let t = arg_str(args, 0);
    let status = ctx.pool.db().get("task", &t)?.str_of("status").to_string();
    if status != "pending" {
        return Err(ApiError::not_allowed(format!(
            "task {t} is {status}, not pending"
        )));
    }
    if ctx.pool.task_is_owned(&t) {
        ctx.pool
            .db()
            .set("task", &t, "status", Value::str("cancelling"))?;
    } else {
        ctx.pool
            .db()
            .set("task", &t, "status", Value::str("cancelling"))?;
        ctx.pool
            .task_fail(&t, &ApiError::new("TASK_CANCELLED", [t.as_str()]));
    }
    Ok(void())
}

fn destroy(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let t = arg_str(args, 0);
    ctx.pool.db().destroy("task", &t)?;
    ctx.pool.task_disown(&t);
    Ok(void())
}

fn set_status(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let t = arg_str(args, 0);
    let status = arg_str(args, 1);
    ctx.pool.db().update("task", &t, |r| {
        if status != "pending" && status != "cancelling" {
            r.insert("finished".into(), now_value());
        }
        r.insert("status".into(), Value::str(status));
    })?;
    Ok(void())
}
