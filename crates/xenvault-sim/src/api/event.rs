//! `event.from` (blocking, with `%020d,%020d` tokens, add/mod/del and record
//! snapshots), `event.inject`, and the deprecated register/unregister.
//!
//! Like xapi (ocaml/xapi/xapi_event.ml), events are computed from the
//! objects' modification generations, not from a log: a token is the DB
//! generation it was taken at, and `""` yields an `add` for every object.

use std::sync::Arc;
use std::time::Duration;

use xenvault_types::Value;

use super::{Ctx, Impl, arg_str};
use crate::db::DbEvent;
use crate::error::{ApiError, ApiResult};
use crate::pool::Pool;

/// The explicit `event` messages other than `from` (which is async and is
/// called by the dispatcher directly).
pub fn lookup(msg: &str) -> Option<Impl> {
    Some(match msg {
        "inject" => inject,
        "register" | "unregister" => |_, _| Ok(super::void()),
        "get_current_id" => |ctx, _| Ok(Value::Int(ctx.pool.db().generation() as i64)),
        _ => return None,
    })
}

/// Formats a token as xapi does: two zero-padded int64s.
pub fn token(generation: u64) -> String {
    format!("{generation:020},{:020}", 0)
}

fn parse_token(t: &str) -> ApiResult<u64> {
    if t.is_empty() {
        return Ok(0);
    }
    t.split(',')
        .next()
        .and_then(|g| g.trim().parse().ok())
        .ok_or_else(|| ApiError::new("EVENT_FROM_TOKEN_PARSE_FAILURE", [t]))
}

enum Sub {
    All,
    Class(String),
    Object(String, String),
}

fn parse_subs(pool: &Pool, classes: &[String]) -> ApiResult<Vec<Sub>> {
    classes
        .iter()
        .map(|c| {
            if c == "*" {
                return Ok(Sub::All);
            }
            let (name, obj) = match c.split_once('/') {
                Some((n, o)) => (n, Some(o)),
                None => (c.as_str(), None),
            };
            let class = pool
                .dm
                .class_name_ci(name)
                .ok_or_else(|| ApiError::new("EVENT_SUBSCRIPTION_PARSE_FAILURE", [c.as_str()]))?
                .to_string();
            Ok(match obj {
                Some(o) => Sub::Object(class, o.to_string()),
                None => Sub::Class(class),
            })
        })
        .collect()
}

fn event_value(e: &DbEvent) -> Value {
    let mut m = vec![
        ("id".to_string(), Value::str(e.generation.to_string())),
        ("timestamp".to_string(), Value::str("0.0")),
        (
            "class".to_string(),
            Value::str(e.class.to_ascii_lowercase()),
        ),
        ("operation".to_string(), Value::str(e.op)),
        ("ref".to_string(), Value::str(e.r.clone())),
    ];
    if let Some(s) = &e.snapshot {
        m.push(("snapshot".to_string(), s.clone()));
    }
    Value::Struct(m)
}

/// `event.from(classes, token, timeout)`.
pub async fn from(pool: &Arc<Pool>, session: &str, args: &[Value]) -> ApiResult<Value> {
    let classes = super::arg_strs(args, 0);
    let since = parse_token(&arg_str(args, 1))?;
    let timeout = args
        .get(2)
        .and_then(|v| v.as_f64().ok())
        .unwrap_or(0.0)
        .clamp(0.0, 86_400.0);
    let subs = parse_subs(pool, &classes)?;
    let wanted = |class: &str, r: &str| {
        subs.iter().any(|s| match s {
            Sub::All => !matches!(class, "session"),
            Sub::Class(c) => c == class,
            Sub::Object(c, o) => c == class && o == r,
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let mut rx = pool.changed.clone();
    loop {
        rx.borrow_and_update();
        pool.check_session(session)?;
        let (events, generation) = {
            let db = pool.db();
            (db.events_since(since, &wanted)?, db.generation())
        };
        if !events.is_empty() || tokio::time::Instant::now() >= deadline {
            let mut counts: Vec<(String, Value)> = Vec::new();
            {
                let db = pool.db();
                for e in &events {
                    let lc = e.class.to_ascii_lowercase();
                    if !counts.iter().any(|(k, _)| *k == lc) {
                        counts.push((lc, Value::Int(db.all(&e.class).len() as i64)));
                    }
                }
            }
            return Ok(Value::record([
                (
                    "events",
                    Value::Array(events.iter().map(event_value).collect()),
                ),
                ("valid_ref_counts", Value::Struct(counts)),
                ("token", Value::str(token(generation))),
            ]));
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {
                // xapi batches for 50 ms before answering.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(_)) => return Err(ApiError::internal("event source closed")),
            Err(_) => {}
        }
    }
}

fn inject(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let class_lc = arg_str(args, 0);
    let r = arg_str(args, 1);
    let class = ctx
        .pool
        .dm
        .class_name_ci(&class_lc)
        .ok_or_else(|| ApiError::new("EVENT_SUBSCRIPTION_PARSE_FAILURE", [class_lc.as_str()]))?
        .to_string();
    let mut db = ctx.pool.db();
    let before = db.generation();
    db.touch(&class, &r)?;
    Ok(Value::str(token(before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        assert_eq!(token(5), "00000000000000000005,00000000000000000000");
        assert_eq!(parse_token(&token(77)).unwrap(), 77);
        assert_eq!(parse_token("").unwrap(), 0);
        assert_eq!(
            parse_token("zz").unwrap_err().code,
            "EVENT_FROM_TOKEN_PARSE_FAILURE"
        );
    }
}
