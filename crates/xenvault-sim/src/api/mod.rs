//! The XenAPI messages: name resolution (`Class.method`, `Class_method`,
//! `Async.Class.method`), parameter checks from the datamodel, sessions,
//! fault injection, `Async.*` through tasks, the generic implicit messages
//! (getters, setters, map/set modifiers, `get_all_records_where`…) and the
//! explicit messages of `session`, `task`, `event`, `VM`, `VDI`, `VBD` and
//! friends.

pub mod event;
pub mod generic;
pub mod misc;
pub mod session;
pub mod storage;
pub mod task;
pub mod vbd;
pub mod vdi;
pub mod vm;

use std::sync::Arc;

use xenvault_types::Value;

use crate::datamodel::{Datamodel, Param, Type};
use crate::error::{ApiError, ApiResult};
use crate::pool::Pool;

/// Where a call arrived: which host's listener, over TLS or not.
#[derive(Debug, Clone)]
pub struct CallSite {
    /// The host ref of the listener.
    pub host: String,
    /// Whether the connection was TLS.
    pub tls: bool,
}

/// The context of one call.
pub struct Ctx<'a> {
    /// The pool.
    pub pool: &'a Arc<Pool>,
    /// The caller's session ref (empty for login calls).
    pub session: String,
    /// Where the call arrived.
    pub site: &'a CallSite,
    /// The task running the call, for `Async.*`.
    pub task: Option<String>,
}

/// An explicit message implementation: arguments after the session, already
/// coerced to their datamodel types.
pub type Impl = fn(&Ctx<'_>, &[Value]) -> ApiResult<Value>;

/// The void result (`<value></value>` in XML-RPC).
pub fn void() -> Value {
    Value::str("")
}

/// A resolved message name.
#[derive(Debug, Clone)]
struct Resolved {
    class: String,
    msg: String,
    is_async: bool,
}

/// Hidden generic messages that the datamodel JSON does not list.
const HIDDEN_GENERIC: &[&str] = &["get_all_records_where", "get_all_where"];

fn message_known(dm: &Datamodel, class: &str, msg: &str) -> bool {
    dm.class(class).is_some_and(|c| {
        c.messages.contains_key(msg)
            || (HIDDEN_GENERIC.contains(&msg) && c.messages.contains_key("get_all"))
    })
}

fn resolve(dm: &Datamodel, wire: &str) -> Option<Resolved> {
    let (is_async, name) = match wire.strip_prefix("Async.") {
        Some(rest) => (true, rest),
        None => (false, wire),
    };
    if let Some((class, msg)) = name.split_once('.') {
        return message_known(dm, class, msg).then(|| Resolved {
            class: class.to_string(),
            msg: msg.to_string(),
            is_async,
        });
    }
    // `Class_method`, xen-api ocaml/idl/datamodel_utils.ml `alternative_wire_name`.
    let mut best: Option<Resolved> = None;
    for class in dm.classes.keys() {
        if let Some(msg) = name
            .strip_prefix(class.as_str())
            .and_then(|r| r.strip_prefix('_'))
            && message_known(dm, class, msg)
            && best.as_ref().is_none_or(|b| b.class.len() < class.len())
        {
            best = Some(Resolved {
                class: class.clone(),
                msg: msg.to_string(),
                is_async,
            });
        }
    }
    best
}

/// The wire parameters of a message, and how many trailing ones may be left
/// out (xapi accepts omitted trailing defaulted parameters).
fn signature(dm: &Datamodel, class: &str, msg: &str) -> (Vec<Param>, usize, bool, bool) {
    let session_param = Param {
        name: "session_id".into(),
        ty: Type::Ref("session".into()),
    };
    if HIDDEN_GENERIC.contains(&msg) {
        let params = vec![
            session_param,
            Param {
                name: "expr".into(),
                ty: Type::String,
            },
        ];
        return (params, 2, false, true);
    }
    let Some(m) = dm.class(class).and_then(|c| c.messages.get(msg)) else {
        return (Vec::new(), 0, false, false);
    };
    let min = match (class, msg) {
        // version and originator default (xen-api ocaml/idl/datamodel.ml).
        ("session", "login_with_password") => 2,
        // ignore_vdis defaults to [] (xapi >= 21.4).
        ("VM", "snapshot") => 3,
        _ => m.params.len(),
    };
    (m.params.clone(), min, m.removed, m.implicit)
}

/// Whether `Async.` is offered. The datamodel JSON carries no async flag;
/// the rule here approximates xen-api's (see docs/simulator.md).
fn async_allowed(class: &str, msg: &str, implicit: bool) -> bool {
    if implicit {
        return msg == "create" || msg == "destroy";
    }
    if matches!(class, "session" | "event" | "message") {
        return false;
    }
    if class == "task" && (msg == "create" || msg.starts_with("set_")) {
        return false;
    }
    !(msg.starts_with("get_") || HIDDEN_GENERIC.contains(&msg))
}

/// Runs one call as received on the wire.
pub async fn dispatch(
    pool: &Arc<Pool>,
    site: &CallSite,
    wire: &str,
    params: Vec<Value>,
) -> ApiResult<Value> {
    let dm = pool.dm;
    let Some(res) = resolve(dm, wire) else {
        return Err(ApiError::new("MESSAGE_METHOD_UNKNOWN", [wire]));
    };
    let full = format!("{}.{}", res.class, res.msg);
    pool.stats.add(&format!("calls/{full}"), 1);
    let (sig, min, removed, implicit) = signature(dm, &res.class, &res.msg);
    if removed {
        // xen-api ocaml/idl/ocaml_backend/gen_server.ml: Removed messages.
        return Err(ApiError::new("MESSAGE_REMOVED", Vec::<String>::new()));
    }
    if params.len() < min || params.len() > sig.len() {
        return Err(ApiError::new(
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            [
                full.clone(),
                sig.len().to_string(),
                params.len().to_string(),
            ],
        ));
    }
    let has_session = sig
        .first()
        .is_some_and(|p| p.ty == Type::Ref("session".into()));
    let session = if has_session {
        let s = params
            .first()
            .and_then(|v| v.as_str().ok())
            .unwrap_or_default()
            .to_string();
        pool.check_session(&s)?;
        s
    } else {
        String::new()
    };
    if let Some(err) = pool.faults.on_call(&full) {
        return Err(err);
    }
    let mut args = Vec::with_capacity(params.len());
    for (i, v) in params.iter().enumerate().skip(usize::from(has_session)) {
        let p = &sig[i];
        args.push(dm.coerce(v, &p.ty).map_err(|e| {
            if e.code == "FIELD_TYPE_ERROR" {
                ApiError::field_type(&p.name)
            } else {
                e
            }
        })?);
    }
    // Fill omitted trailing parameters with their defaults.
    for p in sig.iter().skip(params.len()) {
        args.push(p.ty.zero(dm));
    }
    if res.class == "event" && res.msg == "from" && !res.is_async {
        return event::from(pool, &session, &args).await;
    }
    if res.is_async {
        if !async_allowed(&res.class, &res.msg, implicit) {
            return Err(ApiError::new(
                "Fault",
                [format!("No async mode for this operation (rpc: {wire})")],
            ));
        }
        let task = pool.task_create(&format!("Async.{full}"), "");
        pool.task_own(&task);
        let pool2 = pool.clone();
        let site2 = site.clone();
        let task2 = task.clone();
        tokio::spawn(async move {
            let p = pool2.clone();
            let t = task2.clone();
            let out =
                tokio::task::spawn_blocking(move || run(&p, &site2, &res, session, Some(t), &args))
                    .await;
            match out {
                Ok(Ok(v)) => pool2.task_complete(&task2, &v.to_xml()),
                Ok(Err(e)) => pool2.task_fail(&task2, &e),
                Err(e) => {
                    pool2.task_fail(&task2, &ApiError::internal(format!("task panicked: {e}")))
                }
            }
            pool2.task_disown(&task2);
        });
        return Ok(Value::str(task));
    }
    let pool2 = pool.clone();
    let site2 = site.clone();
    match tokio::task::spawn_blocking(move || run(&pool2, &site2, &res, session, None, &args)).await
    {
        Ok(r) => r,
        Err(e) => Err(ApiError::internal(format!("call panicked: {e}"))),
    }
}

fn run(
    pool: &Arc<Pool>,
    site: &CallSite,
    res: &Resolved,
    session: String,
    task: Option<String>,
    args: &[Value],
) -> ApiResult<Value> {
    let ctx = Ctx {
        pool,
        session,
        site,
        task,
    };
    if let Some(f) = explicit(&res.class, &res.msg) {
        return f(&ctx, args);
    }
    generic::call(&ctx, &res.class, &res.msg, args)
}

/// The explicit implementation of a message, if the simulator has one.
fn explicit(class: &str, msg: &str) -> Option<Impl> {
    match class {
        "session" => session::lookup(msg),
        "task" => task::lookup(msg),
        "event" => event::lookup(msg),
        "VM" => vm::lookup(msg),
        "VDI" => vdi::lookup(msg),
        "VBD" => vbd::lookup(msg),
        "SR" | "PBD" => storage::lookup(class, msg),
        _ => misc::lookup(class, msg),
    }
}

/// Reads argument `i` as a string (already coerced).
pub fn arg_str(args: &[Value], i: usize) -> String {
    args.get(i)
        .and_then(|v| v.as_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Reads argument `i` as a bool.
pub fn arg_bool(args: &[Value], i: usize) -> bool {
    matches!(args.get(i), Some(Value::Bool(true)))
}

/// Reads argument `i` as an int.
pub fn arg_int(args: &[Value], i: usize) -> i64 {
    args.get(i).and_then(|v| v.as_i64().ok()).unwrap_or(0)
}

/// Reads argument `i` as a list of strings.
pub fn arg_strs(args: &[Value], i: usize) -> Vec<String> {
    match args.get(i) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().ok().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Converts a disk-store error to the XAPI error it stands for.
pub fn disk_err(e: crate::disk::DiskError) -> ApiError {
    let (code, params) = e.xapi_error();
    ApiError { code, params }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datamodel::datamodel;

    #[test]
    fn names_resolve_in_all_spellings() {
        let dm = datamodel();
        let r = resolve(dm, "VM.get_record").unwrap();
        assert_eq!(
            (r.class.as_str(), r.msg.as_str(), r.is_async),
            ("VM", "get_record", false)
        );
        let r = resolve(dm, "Async.VM.clone").unwrap();
        assert!(r.is_async);
        let r = resolve(dm, "VM_metrics_get_record").unwrap();
        assert_eq!(r.class, "VM_metrics");
        let r = resolve(dm, "VM_get_all_records_where").unwrap();
        assert_eq!(r.class, "VM");
        assert!(resolve(dm, "VM.fly").is_none());
        assert!(resolve(dm, "Nope.get_all").is_none());
    }
}
