//! The control interface under `/_sim/` (served only on the coordinator's
//! plain HTTP listener, the `control` URL; no XAPI message reaches it): guest
//! writes, fault injection, counters, and pool topology changes. Every
//! endpoint takes and returns JSON; see docs/simulator.md for each one.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use xenvault_types::Value;

use crate::db::Fields;
use crate::faults::StreamFault;
use crate::http::{Conn, HandlerOutcome, Request, Response};
use crate::pool::Pool;

const MAX_CONTROL_BODY: usize = 1 << 20;

/// Registers `/_sim` for every method.
pub fn register(router: &mut crate::http::Router) {
    for m in ["GET", "POST", "PUT", "DELETE"] {
        router.route(m, "/_sim", handle);
    }
}

struct ControlError(u16, String);

impl ControlError {
    fn bad(msg: impl Into<String>) -> ControlError {
        ControlError(400, msg.into())
    }
    fn not_found(msg: impl Into<String>) -> ControlError {
        ControlError(404, msg.into())
    }
}

impl From<crate::error::ApiError> for ControlError {
    fn from(e: crate::error::ApiError) -> Self {
        ControlError(409, e.to_string())
    }
}

async fn handle(pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let body = match req.content_length() {
        Some(n) if n > 0 => match conn.read_body(n, MAX_CONTROL_BODY).await {
            Ok(b) => b,
            Err(_) => {
                conn.send(&Response::error_page(413, "Request Entity Too Large"))
                    .await?;
                return Ok(None);
            }
        },
        _ => Vec::new(),
    };
    let path = req.path.trim_end_matches('/').to_string();
    let p = pool.clone();
    let method = req.method.clone();
    let result = tokio::task::spawn_blocking(move || route(&p, &method, &path, &body))
        .await
        .unwrap_or_else(|e| Err(ControlError(500, format!("control handler panicked: {e}"))));
    let (status, reason, value) = match result {
        Ok(v) => (200, "OK", v),
        Err(ControlError(code, msg)) => (
            code,
            match code {
                400 => "Bad Request",
                404 => "Not Found",
                409 => "Conflict",
                _ => "Internal Server Error",
            },
            json!({ "error": msg }),
        ),
    };
    let resp = Response::new(status, reason).body("application/json", value.to_string());
    conn.send(&resp).await?;
    Ok(if req.wants_keep_alive() {
        Some(conn)
    } else {
        None
    })
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ControlError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| ControlError::bad(format!("invalid JSON body: {e}")))
}

fn route(
    pool: &Arc<Pool>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<serde_json::Value, ControlError> {
    match (method, path) {
        ("GET", "/_sim" | "/_sim/hosts") => Ok(hosts(pool)),
        ("GET", "/_sim/stats") => Ok(pool.stats.to_json()),
        ("POST", "/_sim/stats/reset") => {
            pool.stats.reset();
            Ok(json!({}))
        }
        ("GET", "/_sim/faults") => Ok(pool.faults.to_json()),
        ("POST", "/_sim/faults/reset") | ("DELETE", "/_sim/faults") => {
            pool.faults.reset();
            Ok(json!({}))
        }
        ("POST", "/_sim/faults/call") => fault_call(pool, body),
        ("POST", "/_sim/faults/stream") => fault_stream(pool, body),
        ("POST", "/_sim/faults/sr-full") => {
            #[derive(Deserialize)]
            struct B {
                #[serde(default = "yes")]
                on: bool,
            }
            let b: B = parse(body)?;
            pool.faults.set_sr_full(b.on);
            Ok(json!({"sr_full": b.on}))
        }
        ("POST", "/_sim/faults/expire-session") => expire_session(pool, body),
        ("POST", "/_sim/guest-write") => guest_write(pool, body),
        ("POST", "/_sim/coordinator") => new_coordinator(pool, body),
        _ => Err(ControlError::not_found(format!(
            "no control endpoint {method} {path}; see docs/simulator.md"
        ))),
    }
}

fn yes() -> bool {
    true
}

fn hosts(pool: &Pool) -> serde_json::Value {
    let coordinator = pool.coordinator();
    let db = pool.db();
    let list: Vec<serde_json::Value> = pool
        .endpoints()
        .iter()
        .map(|ep| {
            let (uuid, name) = db
                .get("host", &ep.host)
                .map(|h| {
                    (
                        h.str_of("uuid").to_string(),
                        h.str_of("name_label").to_string(),
                    )
                })
                .unwrap_or_default();
            json!({
                "ref": ep.host,
                "uuid": uuid,
                "name": name,
                "coordinator": ep.host == coordinator,
                "url": format!("http://{}", ep.http),
                "https_url": format!("https://{}", ep.https),
                "nbd": ep.nbd.to_string(),
            })
        })
        .collect();
    json!({ "hosts": list, "fingerprint": pool.tls.fingerprint })
}

fn fault_call(pool: &Pool, body: &[u8]) -> Result<serde_json::Value, ControlError> {
    #[derive(Deserialize)]
    struct B {
        method: String,
        #[serde(default = "one")]
        nth: u64,
        error: Vec<String>,
    }
    fn one() -> u64 {
        1
    }
    let b: B = parse(body)?;
    if b.error.is_empty() {
        return Err(ControlError::bad(
            "\"error\" must be [code, params…] with at least the code",
        ));
    }
    let method = b
        .method
        .strip_prefix("Async.")
        .unwrap_or(&b.method)
        .to_string();
    pool.faults.add_call_fault(&method, b.nth, b.error);
    Ok(pool.faults.to_json())
}

fn fault_stream(pool: &Pool, body: &[u8]) -> Result<serde_json::Value, ControlError> {
    #[derive(Deserialize)]
    struct B {
        handler: String,
        #[serde(flatten)]
        fault: StreamFault,
    }
    let b: B = parse(body)?;
    const HANDLERS: &[&str] = &[
        "export",
        "import",
        "export_raw_vdi",
        "import_raw_vdi",
        "xmldbdump",
        "host_backup",
        "nbd",
        "export_metadata",
    ];
    if !HANDLERS.contains(&b.handler.as_str()) {
        return Err(ControlError::bad(format!(
            "unknown handler {:?}; one of {HANDLERS:?}",
            b.handler
        )));
    }
    pool.faults.set_stream_fault(&b.handler, b.fault);
    Ok(pool.faults.to_json())
}

fn expire_session(pool: &Pool, body: &[u8]) -> Result<serde_json::Value, ControlError> {
    #[derive(Deserialize)]
    struct B {
        session: Option<String>,
        #[serde(default)]
        all: bool,
    }
    let b: B = parse(body)?;
    let mut db = pool.db();
    let victims: Vec<String> = match (&b.session, b.all) {
        (Some(s), _) => vec![s.clone()],
        (None, true) => db.all("session"),
        (None, false) => {
            return Err(ControlError::bad(
                "give \"session\": \"OpaqueRef:…\" or \"all\": true",
            ));
        }
    };
    let mut expired = Vec::new();
    for s in victims {
        if db.destroy("session", &s).is_ok() {
            expired.push(s);
        }
    }
    Ok(json!({ "expired": expired.len() }))
}

fn guest_write(pool: &Pool, body: &[u8]) -> Result<serde_json::Value, ControlError> {
    #[derive(Deserialize)]
    struct B {
        vm: Option<String>,
        vdi: Option<String>,
        #[serde(default)]
        seed: u64,
        blocks: Option<u64>,
        percent: Option<f64>,
        block_list: Option<Vec<u64>>,
    }
    let b: B = parse(body)?;
    let vdis: Vec<String> = {
        let db = pool.db();
        match (&b.vm, &b.vdi) {
            (_, Some(v)) => {
                let r = db.resolve("VDI", v)?;
                vec![db.get("VDI", &r)?.str_of("uuid").to_string()]
            }
            (Some(vm), None) => {
                let r = db.resolve("VM", vm)?;
                db.get("VM", &r)?
                    .strs_of("VBDs")
                    .iter()
                    .filter_map(|vbd| db.get("VBD", vbd).ok())
                    .filter(|b| b.str_of("type") == "Disk")
                    .filter_map(|b| db.get("VDI", b.str_of("VDI")).ok())
                    .map(|v| v.str_of("uuid").to_string())
                    .collect()
            }
            (None, None) => return Err(ControlError::bad("give \"vm\" or \"vdi\" (uuid or ref)")),
        }
    };
    let mut out = Vec::new();
    for (i, uuid) in vdis.iter().enumerate() {
        let seed = b.seed.wrapping_add(i as u64);
        let blocks = if let Some(list) = &b.block_list {
            pool.disks
                .guest_write_blocks(uuid, seed, list)
                .map_err(|e| ControlError(409, e.to_string()))?;
            list.clone()
        } else {
            let count = match (b.blocks, b.percent) {
                (Some(n), _) => n,
                (None, Some(p)) => {
                    let size = pool
                        .disks
                        .info(uuid)
                        .map_err(|e| ControlError(409, e.to_string()))?
                        .size;
                    (size.div_ceil(crate::disk::CBT_BLOCK_SIZE) as f64 * p / 100.0).round() as u64
                }
                (None, None) => {
                    return Err(ControlError::bad(
                        "give \"blocks\", \"percent\" or \"block_list\"",
                    ));
                }
            };
            pool.disks
                .guest_write(uuid, seed, count)
                .map_err(|e| ControlError(409, e.to_string()))?
        };
        out.push(json!({ "vdi": uuid, "seed": seed, "blocks": blocks }));
    }
    crate::api::storage::refresh_all(pool);
    Ok(json!({ "vdis": out }))
}

fn new_coordinator(pool: &Pool, body: &[u8]) -> Result<serde_json::Value, ControlError> {
    #[derive(Deserialize)]
    struct B {
        host: Option<String>,
    }
    let b: B = parse(body)?;
    let current = pool.coordinator();
    let mut db = pool.db();
    let target = match b.host {
        Some(h) => db.resolve("host", &h)?,
        None => db
            .all("host")
            .into_iter()
            .find(|h| *h != current)
            .ok_or_else(|| ControlError::bad("the pool has a single host; start with --hosts 2"))?,
    };
    let pool_ref = db
        .all("pool")
        .into_iter()
        .next()
        .ok_or_else(|| ControlError(500, "no pool object".into()))?;
    db.set("pool", &pool_ref, "master", Value::str(target.clone()))?;
    Ok(json!({ "coordinator": target, "previous": current }))
}
