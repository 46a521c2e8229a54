//! The HTTP data handlers of xapi's data plane: `/export`, `/import`, `/export_raw_vdi`,
//! `/import_raw_vdi`, `/pool/xmldbdump`, `/host_backup` (and `/export_metadata`).
//!
//! Common rules, as xapi's `Xapi_http` applies them (docs/xapi-notes.md "Simulator data
//! plane", xapi-facts §3): credentials from the `session_id` cookie, then the query, then
//! HTTP Basic (a temporary session), else `401`; the handler runs in the `task_id` task
//! (or a new one), sets its progress to 0.0 first, names it in a `task-id` header,
//! completes it with a result or fails it with `error_info`; once the `200` is sent, an
//! error is reported only through the task. Streams have no `Content-Length` and end by
//! closing the connection. Bytes served are counted in `bytes/<handler>` for
//! `/_sim/stats`; stream faults (`cut_after`, `bytes_per_sec`) and `sr_full` are honoured.

pub mod dbdump;
pub mod export;
pub mod host_backup;
pub mod import;
pub mod raw_vdi;
mod stream;

use std::io;
use std::sync::Arc;

use xenvault_types::Value;

use crate::db::Fields;
use crate::error::ApiError;
use crate::http::{Conn, HandlerOutcome, Request, Response, Router};
use crate::pool::{HttpSession, Pool};

pub use stream::{PipeReader, PipeWriter, Progress};

/// Registers every data handler on `router` (by longest path prefix, as xapi routes).
pub fn register(router: &mut Router) {
    router.route("GET", "/export", export::handle_export);
    router.route("GET", "/export_metadata", export::handle_export_metadata);
    router.route("PUT", "/import", import::handle_import);
    router.route("GET", "/export_raw_vdi", raw_vdi::handle_export);
    router.route("PUT", "/import_raw_vdi", raw_vdi::handle_import);
    router.route("GET", "/pool/xmldbdump", dbdump::handle);
    router.route("GET", "/host_backup", host_backup::handle);
}

/// An authenticated request with the task it runs in.
pub(crate) struct Begun {
    /// Kept alive for the whole transfer (a Basic-auth session is logged out on drop).
    pub _session: HttpSession,
    /// The task ref.
    pub task: String,
}

/// Authenticates the request and takes over its task. On bad credentials the `task_id`
/// task (if any) fails with `SESSION_AUTHENTICATION_FAILED` and a `401` is sent: `None`.
pub(crate) async fn begin(
    pool: &Arc<Pool>,
    req: &Request,
    conn: &mut Conn,
    label: &str,
) -> io::Result<Option<Begun>> {
    begin_on_srs(pool, req, conn, label, |_| Vec::new()).await
}

/// Like [`begin`], for handlers whose data lives on SRs (`srs` lists them, from the
/// request): when the host that got the request cannot see them all (a member's local
/// SR) and another host can, the client is sent there with `302 Found` and `None` is
/// returned; the task is left alone, as xapi does.
/// [xen-api: ocaml/xapi/importexport.ml `return_302_redirect`; export.ml `handler`]
pub(crate) async fn begin_on_srs(
    pool: &Arc<Pool>,
    req: &Request,
    conn: &mut Conn,
    label: &str,
    srs: impl FnOnce(&Pool) -> Vec<String>,
) -> io::Result<Option<Begun>> {
    let Some(session) = pool.authenticate_http(req) else {
        // xen-api ocaml/xapi/xapi_http.ml `with_context`: fail the task, answer 401.
        if let Some(t) = req.param("task_id")
            && pool.db().exists("task", &t)
        {
            pool.task_fail(&t, &ApiError::new("SESSION_AUTHENTICATION_FAILED", [""; 0]));
        }
        pool.stats.add("http/unauthorized", 1);
        conn.send(&Response::unauthorized()).await?;
        return Ok(None);
    };
    let srs = srs(pool);
    if let Some(location) = redirect_location(pool, req, &srs) {
        tracing::info!(path = %req.path, "redirecting to the host that sees the SR");
        pool.stats.add("http/redirects", 1);
        conn.send(
            &Response::new(302, "Found")
                .header("Location", location)
                .header("Connection", "close"),
        )
        .await?;
        drop(session);
        return Ok(None);
    }
    let task = pool.http_task(req, label);
    Ok(Some(Begun {
        _session: session,
        task,
    }))
}

/// Whether `host` has a plugged PBD to `sr`.
fn host_sees(pool: &Pool, host: &str, sr: &str) -> bool {
    pool.db().rows("PBD").any(|(_, p)| {
        p.str_of("host") == host && p.str_of("SR") == sr && p.bool_of("currently_attached")
    })
}

/// `https://<address>:<https port><path>?<query>` of a host that sees every SR in `srs`,
/// when the request's host does not. The port is added because every simulated host is
/// 127.0.0.1 (xapi sends the bare address; docs/simulator.md).
fn redirect_location(pool: &Pool, req: &Request, srs: &[String]) -> Option<String> {
    let srs: Vec<&String> = srs.iter().filter(|s| pool.db().exists("SR", s)).collect();
    if srs.is_empty() || srs.iter().all(|sr| host_sees(pool, &req.host, sr)) {
        return None;
    }
    let hosts = pool.db().all("host");
    let target = hosts
        .into_iter()
        .find(|h| *h != req.host && srs.iter().all(|sr| host_sees(pool, h, sr)))?;
    let ep = pool.endpoint(&target)?;
    let address = pool
        .db()
        .get("host", &target)
        .map(|r| r.str_of("address").to_string())
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| ep.https.ip().to_string());
    let address = if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]")
    } else {
        address
    };
    Some(format!(
        "https://{address}:{}{}",
        ep.https.port(),
        req.target
    ))
}

/// The SR of the VDI a parameter names (ref or uuid), if any.
pub(crate) fn sr_of_vdi_param(pool: &Pool, req: &Request, name: &str) -> Vec<String> {
    let Some(v) = req.param(name) else {
        return Vec::new();
    };
    let db = pool.db();
    db.resolve("VDI", &v)
        .ok()
        .and_then(|r| {
            db.get("VDI", &r)
                .ok()
                .map(|rec| rec.str_of("SR").to_string())
        })
        .into_iter()
        .collect()
}

/// Fails the task and answers `status` before any `200` was sent (xapi's `Http_svr`
/// answers an unhandled API error with `500`). The connection is closed.
pub(crate) async fn fail_early(
    pool: &Arc<Pool>,
    conn: &mut Conn,
    task: &str,
    err: ApiError,
    status: u16,
) -> HandlerOutcome {
    tracing::info!(task, code = %err.code, "HTTP handler refused the request");
    pool.task_fail(task, &err);
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Internal Error",
    };
    conn.send(&Response::error_page(status, reason).header("task-id", task))
        .await?;
    Ok(None)
}

/// Finds the object a handler parameter names: a ref or a uuid.
pub(crate) fn resolve(pool: &Pool, class: &str, ref_or_uuid: &str) -> Result<String, ApiError> {
    pool.db().resolve(class, ref_or_uuid)
}

/// A VBD plugged in dom0 for as long as a transfer or NBD connection lasts, as xapi does
/// (so `VDI.destroy` / `data_destroy` meanwhile fail with `VDI_IN_USE`); destroyed on drop.
pub(crate) struct Dom0Vbd {
    pool: Arc<Pool>,
    vbd: Option<String>,
}

impl Dom0Vbd {
    /// Plugs a `mode` (`RO`/`RW`) VBD of `vdi` (a ref) into the control domain of `host`
    /// (a host ref; any control domain if that host has none).
    pub fn plug(pool: &Arc<Pool>, host: &str, vdi: &str, mode: &str, owner: &str) -> Dom0Vbd {
        let mut db = pool.db();
        let dom0 = db
            .rows("VM")
            .find(|(_, vm)| vm.bool_of("is_control_domain") && vm.str_of("resident_on") == host)
            .or_else(|| {
                db.rows("VM")
                    .find(|(_, vm)| vm.bool_of("is_control_domain"))
            })
            .map(|(r, _)| r.clone());
        let vbd = dom0.and_then(|vm| {
            db.create(
                "VBD",
                [
                    ("VM", Value::str(vm)),
                    ("VDI", Value::str(vdi)),
                    ("mode", Value::str(mode)),
                    ("type", Value::str("Disk")),
                    ("userdevice", Value::str("autodetect")),
                    ("bootable", Value::Bool(false)),
                    ("currently_attached", Value::Bool(true)),
                    ("empty", Value::Bool(false)),
                    (
                        "other_config",
                        Value::record([("owner", Value::str(owner))]),
                    ),
                ],
            )
            .ok()
        });
        Dom0Vbd {
            pool: pool.clone(),
            vbd,
        }
    }
}

impl Drop for Dom0Vbd {
    fn drop(&mut self) {
        if let Some(vbd) = self.vbd.take() {
            let _ = self.pool.db().destroy("VBD", &vbd);
        }
    }
}

/// The `xapi` version a host reports (`software_version["xapi"]`, e.g. `25.6.0`) as
/// `(major, minor)`, if it has one.
pub(crate) fn host_xapi_version(pool: &Pool, host: &str) -> Option<(i64, i64)> {
    let db = pool.db();
    let rec = db.get("host", host).ok()?;
    let v = rec.map_get("software_version", "xapi")?;
    let mut parts = v.split('.');
    let major = parts.next()?.trim().parse().ok()?;
    let minor = parts.next().unwrap_or("0").trim().parse().unwrap_or(0);
    Some((major, minor))
}

/// The value of a boolean query flag as xapi compares it: exactly `"true"`.
pub(crate) fn flag(req: &Request, name: &str) -> bool {
    req.param(name).as_deref() == Some("true")
}
