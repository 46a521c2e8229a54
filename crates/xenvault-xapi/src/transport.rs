//! RPC transport: one XAPI call over HTTP(S), as JSON-RPC at `/jsonrpc` or
//! XML-RPC at `/`, with automatic fallback remembered per transport.
//!
//! JSON-RPC is tried first (v2 request; v1 and v2 replies both parsed). When
//! the reply is not `application/json` (very old hosts answer `/jsonrpc` with
//! the XML-RPC handler, or 404), the transport switches to XML-RPC and keeps
//! that choice. See `docs/xapi-notes.md`, "Wire protocol".
//!
//! The pure codec functions ([`encode_json_request`], [`decode_json_response`],
//! [`encode_xml_request`], [`decode_xml_response`]) do no I/O and are unit
//! tested with canned bodies. Request parameters (session refs, passwords)
//! are never logged.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use xenvault_types::rpc::{Envelope, MethodCall, MethodResponse, Value};

use crate::error::{Error, Result, XapiError};
use crate::tls::TlsPolicy;

/// The RPC protocol a transport speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// JSON-RPC at `<base>/jsonrpc`.
    JsonRpc,
    /// XML-RPC at `<base>` (normally `/`).
    XmlRpc,
}

/// Which protocol to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolChoice {
    /// JSON-RPC first, XML-RPC if the host does not offer it (the default).
    #[default]
    Auto,
    /// JSON-RPC only.
    JsonRpc,
    /// XML-RPC only (what the official Python SDK speaks).
    XmlRpc,
}

/// How the client connects: TLS policy, protocol, originator, timeouts.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How the server certificate is trusted (ignored for `http://` URLs).
    pub tls: TlsPolicy,
    /// Which RPC protocol to speak.
    pub protocol: ProtocolChoice,
    /// The `originator` sent at login: XAPI groups sessions by it (and evicts
    /// the oldest past 500 per originator).
    pub originator: String,
    /// The HTTP timeout of one RPC (not of tasks: long operations should run
    /// as tasks, see `api::Call::run_async`).
    pub rpc_timeout: Duration,
    /// The TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// How many `HOST_IS_SLAVE` redirections a login follows.
    pub max_coordinator_redirects: usize,
}

/// The originator xenvault logs in with.
pub const DEFAULT_ORIGINATOR: &str = "xenvault";

impl ConnectOptions {
    /// Defaults with this TLS policy.
    pub fn new(tls: TlsPolicy) -> ConnectOptions {
        ConnectOptions {
            tls,
            protocol: ProtocolChoice::Auto,
            originator: DEFAULT_ORIGINATOR.to_string(),
            rpc_timeout: Duration::from_secs(30 * 60),
            connect_timeout: Duration::from_secs(30),
            max_coordinator_redirects: 3,
        }
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions::new(TlsPolicy::Verify)
    }
}

/// Builds the HTTP client for RPC (and for the data plane to reuse): the
/// rustls config of the TLS policy with the aws-lc-rs provider, no
/// redirects (XAPI does not redirect RPC; a POST must not turn into a GET).
pub fn build_http_client(options: &ConnectOptions) -> Result<reqwest::Client> {
    let tls = options
        .tls
        .client_config()
        .map_err(|e| Error::Tls(e.to_string()))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(options.connect_timeout)
        .user_agent(concat!("xenvault/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Tls(format!("cannot build the HTTP client: {e}")))
}

/// Parses and checks a pool URL: `http` or `https`, a host, no credentials
/// in it. The path (normally `/`) is the XML-RPC endpoint; JSON-RPC is
/// `jsonrpc` below it.
pub fn parse_pool_url(text: &str) -> Result<Url> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: text.to_string(),
        reason: reason.to_string(),
    };
    let mut url = Url::parse(text.trim())
        .map_err(|e| invalid(&format!("{e}; write e.g. https://pool-master.example")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            "the scheme must be https:// (or http:// for plain HTTP)",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("the URL has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "credentials must not be in the URL; pass the user and password separately",
        ));
    }
    url.set_query(None);
    url.set_fragment(None);
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// The URL of the coordinator named by `HOST_IS_SLAVE [address]`: the same
/// scheme, port and path as `current`, with the host replaced; IPv6
/// addresses are bracketed (`docs/xapi-notes.md`, "Sessions"). xapi sends a
/// bare address; `host:port` and `[v6]:port` (what xapi-sim sends, its hosts
/// sharing one IP) also replace the port.
pub fn coordinator_url(current: &Url, address: &str) -> Result<Url> {
    let address = address.trim();
    let invalid = |reason: String| Error::InvalidUrl {
        url: address.to_string(),
        reason,
    };
    if address.is_empty() {
        return Err(invalid("HOST_IS_SLAVE named no coordinator address".into()));
    }
    let (host, port) = split_host_port(address);
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let mut url = current.clone();
    url.set_host(Some(&host))
        .map_err(|e| invalid(format!("not a usable coordinator address: {e}")))?;
    if let Some(port) = port {
        url.set_port(Some(port))
            .map_err(|()| invalid("cannot set the port".into()))?;
    }
    Ok(url)
}

/// Splits `host:port` (one colon) or `[v6]:port`; anything else is a bare
/// address (including bare IPv6 with several colons).
fn split_host_port(address: &str) -> (&str, Option<u16>) {
    if let Some(rest) = address.strip_prefix('[')
        && let Some((v6, tail)) = rest.split_once(']')
    {
        let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
        return (v6, port);
    }
    if let Some((host, port)) = address.split_once(':')
        && !port.contains(':')
        && let Ok(port) = port.parse::<u16>()
    {
        return (host, Some(port));
    }
    (address, None)
}

/// The URL for messages: no path details beyond scheme, host and port.
pub(crate) fn shown_url(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

// ----- pure codecs -----

/// Encodes a JSON-RPC v2 request.
pub fn encode_json_request(method: &str, params: &[Value], id: u64) -> Vec<u8> {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "method": method,
        "params": params.iter().map(Value::to_json).collect::<Vec<_>>(),
        "id": id,
    });
    body.to_string().into_bytes()
}

/// Decodes a JSON-RPC reply, v1 (`{"result", "error": [code, …]}`) or v2
/// (`{"jsonrpc": "2.0", "error": {"code": 1, "message": CODE, "data": [params…]}}`).
/// Integers beyond 2^53 are kept exactly.
pub fn decode_json_response(body: &[u8]) -> std::result::Result<Envelope, String> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let serde_json::Value::Object(obj) = json else {
        return Err("the JSON-RPC reply is not an object".into());
    };
    match obj.get("error") {
        None | Some(serde_json::Value::Null) => {}
        Some(error) => return Ok(Envelope::Failure(json_error_description(error)?)),
    }
    match obj.get("result") {
        Some(result) => Ok(Envelope::Success(Value::from_json(result))),
        None => Err("the JSON-RPC reply has neither result nor error".into()),
    }
}

fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn json_error_description(error: &serde_json::Value) -> std::result::Result<Vec<String>, String> {
    use serde_json::Value as J;
    match error {
        // v1: ["CODE", "p1", …]
        J::Array(items) => Ok(items.iter().map(json_text).collect()),
        // v2: {"code": 1, "message": "CODE", "data": ["p1", …]}
        J::Object(o) => {
            let code = o
                .get("message")
                .map(json_text)
                .ok_or("the JSON-RPC error object has no message")?;
            let mut out = vec![code];
            match o.get("data") {
                None | Some(J::Null) => {}
                Some(J::Array(items)) => out.extend(items.iter().map(json_text)),
                Some(other) => out.push(json_text(other)),
            }
            Ok(out)
        }
        J::String(s) => Ok(vec![s.clone()]),
        other => Err(format!("unexpected JSON-RPC error value {other}")),
    }
}

/// Encodes an XML-RPC request.
pub fn encode_xml_request(method: &str, params: &[Value]) -> String {
    MethodCall {
        method: method.to_string(),
        params: params.to_vec(),
    }
    .to_xml()
}

/// Decodes an XML-RPC reply carrying XAPI's `Status`/`Value`/`ErrorDescription`
/// envelope.
pub fn decode_xml_response(body: &[u8]) -> std::result::Result<Envelope, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the reply is not UTF-8: {e}"))?;
    match MethodResponse::from_xml(text).map_err(|e| e.to_string())? {
        MethodResponse::Value(v) => {
            Envelope::from_value(&v).map_err(|e| format!("not an XAPI envelope: {e}"))
        }
        MethodResponse::Fault { code, message } => Err(format!("XML-RPC fault {code}: {message}")),
    }
}

/// An error and its sources as one line, without repeats.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// The start of a reply body for an error message, with session secrets masked
/// (`crate::http::redact_text`): a server may echo the request back.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    crate::http::redact_text(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}

// ----- the transport -----

/// One endpoint (a pool coordinator) and the protocol it speaks.
#[derive(Debug)]
pub struct Transport {
    http: reqwest::Client,
    base: Url,
    choice: ProtocolChoice,
    chosen: Mutex<Option<Protocol>>,
    rpc_timeout: Duration,
    next_id: AtomicU64,
}

enum JsonAttempt {
    Reply(Envelope),
    NotOffered(String),
}

impl Transport {
    /// A transport to `base` (a URL from [`parse_pool_url`]).
    pub fn new(
        http: reqwest::Client,
        base: Url,
        choice: ProtocolChoice,
        rpc_timeout: Duration,
    ) -> Transport {
        Transport {
            http,
            base,
            choice,
            chosen: Mutex::new(None),
            rpc_timeout,
            next_id: AtomicU64::new(1),
        }
    }

    /// The endpoint's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// The protocol in use, once known.
    pub fn protocol(&self) -> Option<Protocol> {
        match self.choice {
            ProtocolChoice::JsonRpc => Some(Protocol::JsonRpc),
            ProtocolChoice::XmlRpc => Some(Protocol::XmlRpc),
            ProtocolChoice::Auto => *self.chosen.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    fn remember(&self, protocol: Protocol) {
        let mut chosen = self.chosen.lock().unwrap_or_else(|p| p.into_inner());
        if chosen.is_none() {
            tracing::debug!(url = %shown_url(&self.base), ?protocol, "XAPI protocol chosen");
            *chosen = Some(protocol);
        }
    }

    /// Makes one call. `params` are complete (the session ref first where
    /// needed). An XAPI failure envelope becomes [`Error::Xapi`].
    pub async fn call(
        &self,
        method: &str,
        params: &[Value],
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let started = Instant::now();
        let timeout = timeout.unwrap_or(self.rpc_timeout);
        let envelope = match self.protocol() {
            Some(Protocol::XmlRpc) => self.call_xml(method, params, timeout).await?,
            Some(Protocol::JsonRpc) => match self.call_json(method, params, timeout).await? {
                JsonAttempt::Reply(env) => env,
                JsonAttempt::NotOffered(why) => {
                    return Err(Error::Protocol {
                        method: method.to_string(),
                        url: shown_url(&self.json_url()),
                        detail: why,
                    });
                }
            },
            None => match self.call_json(method, params, timeout).await? {
                JsonAttempt::Reply(env) => {
                    self.remember(Protocol::JsonRpc);
                    env
                }
                JsonAttempt::NotOffered(why) => {
                    // docs/xapi-notes.md, "Wire protocol": fall back to XML-RPC.
                    tracing::info!(url = %shown_url(&self.base), reason = %why, "JSON-RPC not offered; using XML-RPC");
                    let env = self.call_xml(method, params, timeout).await?;
                    self.remember(Protocol::XmlRpc);
                    env
                }
            },
        };
        tracing::debug!(
            method,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "XAPI call done"
        );
        match envelope {
            Envelope::Success(v) => Ok(v),
            Envelope::Failure(description) => Err(Error::Xapi {
                method: method.to_string(),
                error: XapiError::from_description(description),
            }),
        }
    }

    fn json_url(&self) -> Url {
        self.base
            .join("jsonrpc")
            .unwrap_or_else(|_| self.base.clone())
    }

    fn transport_error(&self, method: &str, url: &Url, e: reqwest::Error) -> Error {
        let cause = e.without_url();
        Error::Transport {
            method: method.to_string(),
            url: shown_url(url),
            detail: error_chain(&cause),
            cause,
        }
    }

    async fn call_json(
        &self,
        method: &str,
        params: &[Value],
        timeout: Duration,
    ) -> Result<JsonAttempt> {
        let url = self.json_url();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let response = self
            .http
            .post(url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .timeout(timeout)
            .body(encode_json_request(method, params, id))
            .send()
            .await
            .map_err(|e| self.transport_error(method, &url, e))?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(method, &url, e))?;
        if !content_type.starts_with("application/json") {
            return Ok(JsonAttempt::NotOffered(format!(
                "HTTP {} with content type {content_type:?} instead of application/json",
                status.as_u16()
            )));
        }
        match decode_json_response(&body) {
            Ok(env) => Ok(JsonAttempt::Reply(env)),
            Err(_) if !status.is_success() => Err(Error::HttpStatus {
                method: method.to_string(),
                url: shown_url(&url),
                status: status.as_u16(),
                excerpt: excerpt(&body),
            }),
            Err(detail) => Err(Error::Protocol {
                method: method.to_string(),
                url: shown_url(&url),
                detail,
            }),
        }
    }

    async fn call_xml(
        &self,
        method: &str,
        params: &[Value],
        timeout: Duration,
    ) -> Result<Envelope> {
        let url = self.base.clone();
        let response = self
            .http
            .post(url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("text/xml"))
            .timeout(timeout)
            .body(encode_xml_request(method, params))
            .send()
            .await
            .map_err(|e| self.transport_error(method, &url, e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(method, &url, e))?;
        if !status.is_success() {
            return Err(Error::HttpStatus {
                method: method.to_string(),
                url: shown_url(&url),
                status: status.as_u16(),
                excerpt: excerpt(&body),
            });
        }
        decode_xml_response(&body).map_err(|detail| Error::Protocol {
            method: method.to_string(),
            url: shown_url(&url),
            detail,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_pool_url("https://10.0.0.1").unwrap();
        assert_eq!(u.as_str(), "https://10.0.0.1/");
        assert_eq!(
            u.join("jsonrpc").unwrap().as_str(),
            "https://10.0.0.1/jsonrpc"
        );
        let proxied = parse_pool_url("https://proxy:8443/xapi?x=1").unwrap();
        assert_eq!(
            proxied.join("jsonrpc").unwrap().as_str(),
            "https://proxy:8443/xapi/jsonrpc"
        );
        assert!(parse_pool_url("ftp://h/").is_err());
        assert!(parse_pool_url("https://root:pw@h/").is_err());
        assert!(parse_pool_url("not a url").is_err());

        let c = coordinator_url(
            &parse_pool_url("https://10.0.0.2:8443/").unwrap(),
            "fd00::1",
        )
        .unwrap();
        assert_eq!(c.as_str(), "https://[fd00::1]:8443/");
        let c = coordinator_url(&parse_pool_url("http://[::1]:80/").unwrap(), "10.0.0.9").unwrap();
        assert_eq!(c.as_str(), "http://10.0.0.9/");
        let c = coordinator_url(&parse_pool_url("http://a:81/").unwrap(), "[fe80::2]").unwrap();
        assert_eq!(c.as_str(), "http://[fe80::2]:81/");
        assert!(coordinator_url(&parse_pool_url("http://a/").unwrap(), " ").is_err());
        let c =
            coordinator_url(&parse_pool_url("https://a:1/").unwrap(), "127.0.0.1:4443").unwrap();
        assert_eq!(c.as_str(), "https://127.0.0.1:4443/");
        let c = coordinator_url(&parse_pool_url("https://a:1/").unwrap(), "[::1]:4443").unwrap();
        assert_eq!(c.as_str(), "https://[::1]:4443/");
        let c = coordinator_url(&parse_pool_url("https://a:1/").unwrap(), "fd00::1:4443").unwrap();
        assert_eq!(c.as_str(), "https://[fd00::1:4443]:1/");
    }

    #[test]
    fn json_request_is_v2_with_id() {
        let body =
            encode_json_request("VM.get_all", &[Value::str("OpaqueRef:s"), Value::Int(5)], 7);
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["jsonrpc"], "2.0");
        assert_eq!(j["method"], "VM.get_all");
        assert_eq!(j["id"], 7);
        assert_eq!(j["params"], serde_json::json!(["OpaqueRef:s", 5]));
    }
}
