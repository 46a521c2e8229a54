//! The RPC endpoints: XML-RPC on `POST /` (and every POST path without a more
//! specific handler, e.g. `/RPC2`), JSON-RPC v1/v2 on `POST /jsonrpc`, with
//! xapi's envelopes: API errors are HTTP 200 failure envelopes; only
//! transport and parse errors are HTTP 500 (xapi-facts §1.1–§1.3, see
//! `docs/xapi-notes.md`, "RPC envelopes").

use std::sync::Arc;

use xenvault_types::Value;
use xenvault_types::rpc::{Envelope, MethodCall, MethodResponse};

use crate::api::{self, CallSite};
use crate::error::ApiError;
use crate::http::{Conn, HandlerOutcome, Request, Response};
use crate::pool::Pool;

/// xapi's `http_limit_max_rpc_size`: 300 KiB.
pub const MAX_RPC_BODY: usize = 300 * 1024;

/// Registers the RPC routes.
pub fn register(router: &mut crate::http::Router) {
    router.route("POST", "/", xmlrpc);
    router.route("POST", "/jsonrpc", jsonrpc);
    router.route("OPTIONS", "/", options);
}

async fn read_rpc_body(req: &Request, conn: &mut Conn) -> Result<Vec<u8>, Response> {
    if req.has_transfer_encoding() {
        return Err(Response::error_page(400, "Bad Request"));
    }
    let Some(len) = req.content_length() else {
        return Err(Response::error_page(411, "Length Required"));
    };
    if len > MAX_RPC_BODY as u64 {
        return Err(Response::error_page(413, "Request Entity Too Large"));
    }
    conn.read_body(len, MAX_RPC_BODY)
        .await
        .map_err(|_| Response::error_page(400, "Bad Request"))
}

fn keep_or_close(req: &Request, conn: Conn) -> HandlerOutcome {
    Ok(if req.wants_keep_alive() {
        Some(conn)
    } else {
        None
    })
}

fn site(req: &Request) -> CallSite {
    CallSite {
        host: req.host.clone(),
        tls: req.tls,
    }
}

async fn options(_pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let resp = Response::new(200, "OK")
        .header("Access-Control-Allow-Origin", "*")
        .header("Access-Control-Allow-Headers", "content-type")
        .header("Access-Control-Allow-Methods", "POST, GET, OPTIONS");
    conn.send(&resp).await?;
    keep_or_close(&req, conn)
}

/// `POST /`: XML-RPC.
pub async fn xmlrpc(pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let body = match read_rpc_body(&req, &mut conn).await {
        Ok(b) => b,
        Err(resp) => {
            conn.send(&resp).await?;
            return Ok(None);
        }
    };
    let call = match std::str::from_utf8(&body)
        .map_err(|e| e.to_string())
        .and_then(|t| MethodCall::from_xml(t).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("malformed XML-RPC request: {e}");
            conn.send(&Response::error_page(500, "Internal Server Error"))
                .await?;
            return Ok(None);
        }
    };
    let env = match api::dispatch(&pool, &site(&req), &call.method, call.params).await {
        Ok(v) => Envelope::Success(v),
        Err(e) => Envelope::Failure(e.description()),
    };
    let xml = MethodResponse::Value(env.to_value()).to_xml();
    let resp = Response::new(200, "OK")
        .header("Access-Control-Allow-Origin", "*")
        .body("text/xml", xml);
    conn.send(&resp).await?;
    keep_or_close(&req, conn)
}

/// `POST /jsonrpc`: JSON-RPC v1 and v2.
pub async fn jsonrpc(pool: Arc<Pool>, req: Request, mut conn: Conn) -> HandlerOutcome {
    let body = match read_rpc_body(&req, &mut conn).await {
        Ok(b) => b,
        Err(resp) => {
            conn.send(&resp).await?;
            return Ok(None);
        }
    };
    let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&body);
    let call = parsed.ok().and_then(|j| {
        let id = j.get("id").filter(|id| !id.is_null())?.clone();
        let method = j.get("method")?.as_str()?.to_string();
        let params = match j.get("params") {
            Some(serde_json::Value::Array(a)) => a.iter().map(Value::from_json).collect(),
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(_) => return None,
        };
        let v2 = j.get("jsonrpc").and_then(|v| v.as_str()) == Some("2.0");
        Some((id, method, params, v2))
    });
    // A request without an id (a notification) or malformed JSON is a
    // transport error: HTTP 500, as xapi's `jsoncallback`.
    let Some((id, method, params, v2)) = call else {
        conn.send(&Response::error_page(500, "Internal Server Error"))
            .await?;
        return Ok(None);
    };
    let result = api::dispatch(&pool, &site(&req), &method, params).await;
    let out = json_response(result, id, v2);
    let resp = Response::new(200, "OK")
        .header("Access-Control-Allow-Origin", "*")
        .body("application/json", out.to_string());
    conn.send(&resp).await?;
    keep_or_close(&req, conn)
}

/// The JSON-RPC response object for a result, v1 or v2.
pub fn json_response(
    result: Result<Value, ApiError>,
    id: serde_json::Value,
    v2: bool,
) -> serde_json::Value {
    use serde_json::json;
    match (result, v2) {
        (Ok(v), false) => json!({"result": v.to_json(), "error": null, "id": id}),
        (Err(e), false) => json!({"result": null, "error": e.description(), "id": id}),
        (Ok(v), true) => json!({"jsonrpc": "2.0", "result": v.to_json(), "id": id}),
        (Err(e), true) => json!({
            "jsonrpc": "2.0",
            "error": {"code": 1, "message": e.code, "data": e.params},
            "id": id
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_rpc_shapes_follow_xapi() {
        let ok = json_response(Ok(Value::Int(1 << 40)), json!(3), false);
        assert_eq!(
            ok,
            json!({"result": 1_099_511_627_776_i64, "error": null, "id": 3})
        );
        let e = ApiError::new("HANDLE_INVALID", ["VM", "OpaqueRef:x"]);
        assert_eq!(
            json_response(Err(e.clone()), json!("a"), false),
            json!({"result": null, "error": ["HANDLE_INVALID", "VM", "OpaqueRef:x"], "id": "a"})
        );
        assert_eq!(
            json_response(Err(e), json!(1), true),
            json!({"jsonrpc": "2.0", "error": {"code": 1, "message": "HANDLE_INVALID", "data": ["VM", "OpaqueRef:x"]}, "id": 1})
        );
        assert_eq!(
            json_response(Ok(Value::str("")), json!(1), true),
            json!({"jsonrpc": "2.0", "result": "", "id": 1})
        );
    }

    #[test]
    fn responses_carry_content_length() {
        let r = Response::new(200, "OK").body("text/xml", "<x/>").to_bytes();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Type: text/xml\r\n"));
        assert!(text.ends_with("Content-Length: 4\r\n\r\n<x/>"));
    }
}
