//! A scripted XAPI endpoint for the client's wire tests: a tiny HTTP/1.1
//! server on loopback (port 0 unless a test needs a given port) that decodes
//! JSON-RPC and XML-RPC requests, records them, and answers with what the
//! test's handler returns, encoded the way xapi encodes it. It stops when
//! dropped.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xenvault_types::rpc::{Envelope, MethodCall, MethodResponse, Value};

/// How the endpoint answers `POST /jsonrpc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonMode {
    /// JSON-RPC v2 replies.
    V2,
    /// JSON-RPC v1 replies (`{"result", "error": [..]}`).
    V1,
    /// An old host: `/jsonrpc` falls to the XML-RPC handler, which answers
    /// `text/xml` (a parse failure of the JSON body).
    XmlOnly,
    /// No such path: 404 with an HTML body.
    NotFound,
}

/// One request the endpoint received.
#[derive(Clone, Debug)]
pub struct Received {
    /// `/jsonrpc` or `/`.
    pub path: String,
    /// The protocol of the body.
    pub json: bool,
    /// The method.
    pub method: String,
    /// The parameters (session first where the client sends one).
    pub params: Vec<Value>,
    /// For JSON requests, the `jsonrpc` member.
    pub jsonrpc_version: Option<String>,
}

/// What the handler answers.
pub enum Reply {
    /// Success with this value.
    Ok(Value),
    /// An XAPI failure `[code, params…]`.
    Fail(Vec<String>),
}

/// Shorthand for a failure reply.
pub fn fail(parts: &[&str]) -> Reply {
    Reply::Fail(parts.iter().map(|s| s.to_string()).collect())
}

type Handler = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// A running mock endpoint.
pub struct MockXapi {
    pub addr: SocketAddr,
    pub url: String,
    log: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockXapi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockXapi {
    /// Starts on 127.0.0.1, port 0.
    pub async fn start(
        mode: JsonMode,
        handler: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> MockXapi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        MockXapi::serve(listener, mode, Arc::new(handler))
    }

    fn serve(listener: TcpListener, mode: JsonMode, handler: Handler) -> MockXapi {
        let addr = listener.local_addr().expect("local addr");
        let url = match addr {
            SocketAddr::V4(a) => format!("http://{}:{}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("http://[{}]:{}", a.ip(), a.port()),
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let log = task_log.clone();
                tokio::spawn(async move {
                    let _ = serve_connection(stream, mode, handler, log).await;
                });
            }
        });
        MockXapi {
            addr,
            url,
            log,
            task,
        }
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// The methods called so far, in order.
    pub fn methods(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.method).collect()
    }

    /// How many times `method` was called.
    pub fn count(&self, method: &str) -> usize {
        self.received()
            .iter()
            .filter(|r| r.method == method)
            .count()
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    mode: JsonMode,
    handler: Handler,
    log: Arc<Mutex<Vec<Received>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.first() == Some(&0x16) {
            // A TLS ClientHello on this plain-HTTP endpoint: answer as a plain
            // server would, so the client's handshake fails at once.
            stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                .await?;
            return stream.shutdown().await;
        }
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[header_end..(header_end + length).min(buf.len())];
    let (status, content_type, out) = respond(&path, body, mode, &handler, &log);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        out.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&out).await?;
    stream.shutdown().await
}

fn respond(
    path: &str,
    body: &[u8],
    mode: JsonMode,
    handler: &Handler,
    log: &Arc<Mutex<Vec<Received>>>,
) -> (&'static str, &'static str, Vec<u8>) {
    if path == "/jsonrpc" {
        match mode {
            JsonMode::NotFound => {
                return (
                    "404 Not Found",
                    "text/html",
                    b"<html><body>Not found</body></html>".to_vec(),
                );
            }
            JsonMode::XmlOnly => {
                let reply = MethodResponse::Value(
                    Envelope::Failure(vec!["XMLRPC_UNMARSHAL_FAILURE".into(), "bad xml".into()])
                        .to_value(),
                );
                return ("200 OK", "text/xml", reply.to_xml().into_bytes());
            }
            JsonMode::V1 | JsonMode::V2 => {}
        }
        let request: serde_json::Value = match serde_json::from_slice(body) {
            Ok(j) => j,
            Err(_) => {
                return (
                    "500 Internal Server Error",
                    "text/html",
                    b"<html>bad json</html>".to_vec(),
                );
            }
        };
        let received = Received {
            path: path.to_string(),
            json: true,
            method: request["method"].as_str().unwrap_or_default().to_string(),
            params: request["params"]
                .as_array()
                .map(|a| a.iter().map(Value::from_json).collect())
                .unwrap_or_default(),
            jsonrpc_version: request["jsonrpc"].as_str().map(str::to_string),
        };
        log.lock().unwrap().push(received.clone());
        let id = request["id"].clone();
        let reply = handler(&received);
        let json = match (mode, reply) {
            (JsonMode::V2, Reply::Ok(v)) => {
                serde_json::json!({"jsonrpc": "2.0", "result": v.to_json(), "id": id})
            }
            (JsonMode::V2, Reply::Fail(mut d)) => {
                let code = d.remove(0);
                serde_json::json!({"jsonrpc": "2.0", "error": {"code": 1, "message": code, "data": d}, "id": id})
            }
            (_, Reply::Ok(v)) => {
                serde_json::json!({"result": v.to_json(), "error": null, "id": id})
            }
            (_, Reply::Fail(d)) => serde_json::json!({"result": null, "error": d, "id": id}),
        };
        return ("200 OK", "application/json", json.to_string().into_bytes());
    }
    let text = String::from_utf8_lossy(body);
    let call = match MethodCall::from_xml(&text) {
        Ok(c) => c,
        Err(_) => {
            return (
                "500 Internal Server Error",
                "text/html",
                b"<html>bad xml</html>".to_vec(),
            );
        }
    };
    let received = Received {
        path: path.to_string(),
        json: false,
        method: call.method.clone(),
        params: call.params.clone(),
        jsonrpc_version: None,
    };
    log.lock().unwrap().push(received.clone());
    let envelope = match handler(&received) {
        Reply::Ok(v) => Envelope::Success(v),
        Reply::Fail(d) => Envelope::Failure(d),
    };
    let xml = MethodResponse::Value(envelope.to_value()).to_xml();
    ("200 OK", "text/xml", xml.into_bytes())
}

/// The first parameter as a string (the session ref for most calls).
pub fn session_of(r: &Received) -> String {
    r.params
        .first()
        .and_then(|v| v.as_str().ok())
        .unwrap_or_default()
        .to_string()
}
