//! HTTP data plane against tiny raw-TCP servers that answer the way xapi's handlers
//! do: HTTP/1.0 without Content-Length, 302 redirects, 401, an error page inside a
//! 200 body, PUT bodies checked for Content-Length and no chunking, and silence.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use xenvault_xapi::http::{HttpError, HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::tls::TlsPolicy;

const SECRET: &str = "OpaqueRef:very-secret-session";

/// A request as the test server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the request head; the body is left in the reader.
async fn read_head(reader: &mut BufReader<TcpStream>) -> Option<Seen> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Some(Seen {
        method,
        target,
        headers,
        body: Vec::new(),
    })
}

type Handler = Arc<
    dyn Fn(
            Seen,
            BufReader<TcpStream>,
            u16,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Seen> + Send>>
        + Send
        + Sync,
>;

/// Starts a server on 127.0.0.1:0; every request seen is recorded.
async fn server(handler: Handler) -> (u16, Arc<Mutex<Vec<Seen>>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                if let Some(head) = read_head(&mut reader).await {
                    let seen = handler(head, reader, port).await;
                    log.lock().await.push(seen);
                }
            });
        }
    });
    (port, seen, task)
}

fn transfer(idle: Duration) -> HttpTransfer {
    HttpTransfer::new(
        &TlsPolicy::InsecureNoVerify,
        TransferOptions {
            idle_timeout: idle,
            ..TransferOptions::default()
        },
    )
    .unwrap()
}

fn url(port: u16, path: &str, task: Option<&str>) -> reqwest::Url {
    let base: reqwest::Url = format!("http://127.0.0.1:{port}").parse().unwrap();
    handler_url(
        &base,
        path,
        SECRET,
        task,
        &[("vdi", "uuid-1"), ("format", "raw")],
    )
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

async fn collect(download: xenvault_xapi::http::Download) -> Result<Vec<u8>, HttpError> {
    let mut body = download.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[tokio::test]
async fn http10_body_without_content_length_is_read_to_eof() {
    let handler: Handler = Arc::new(|seen, mut reader, _| {
        Box::pin(async move {
            let s = reader.get_mut();
            s.write_all(b"HTTP/1.0 200 OK\r\nConnection: close\r\ntask-id: OpaqueRef:task-7\r\nContent-Type: application/octet-stream\r\n\r\n").await.unwrap();
            let data = pattern(3 * 1024 * 1024 + 17);
            for piece in data.chunks(100_000) {
                s.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            s.shutdown().await.unwrap();
            seen
        })
    });
    let (port, seen, server) = server(handler).await;
    let download = transfer(Duration::from_secs(30))
        .get(url(port, "/export_raw_vdi", Some("OpaqueRef:task-7")))
        .await
        .unwrap();
    assert_eq!(download.task_id.as_deref(), Some("OpaqueRef:task-7"));
    assert!(!download.url.contains("very-secret"), "{}", download.url);
    let body = collect(download).await.unwrap();
    assert_eq!(body.len(), 3 * 1024 * 1024 + 17);
    assert!(body == pattern(body.len()));
    let seen = seen.lock().await;
    assert!(
        seen[0].target.contains("task_id=OpaqueRef%3Atask-7"),
        "{:?}",
        seen[0]
    );
    server.abort();
}

#[tokio::test]
async fn as_async_read_too() {
    let handler: Handler = Arc::new(|seen, mut reader, _| {
        Box::pin(async move {
            let s = reader.get_mut();
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nabc").await.unwrap();
            s.write_all(b"defgh").await.unwrap();
            seen
        })
    });
    let (port, _, server) = server(handler).await;
    let download = transfer(Duration::from_secs(30))
        .get(url(port, "/pool/xmldbdump", None))
        .await
        .unwrap();
    let mut text = String::new();
    download
        .into_async_read()
        .read_to_string(&mut text)
        .await
        .unwrap();
    assert_eq!(text, "abcdefgh");
    server.abort();
}

#[tokio::test]
async fn redirect_302_is_followed_with_the_query() {
    // /export answers 302 to /export_on_member (absolute, with query) and
    // /relative answers 302 with a location without query: the query is kept.
    let handler: Handler = Arc::new(|seen, mut reader, port| {
        Box::pin(async move {
            let s = reader.get_mut();
            let path = seen.target.split('?').next().unwrap().to_owned();
            let query = seen
                .target
                .split_once('?')
                .map(|x| x.1)
                .unwrap_or("")
                .to_owned();
            let reply = match path.as_str() {
                "/export" => format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/export_on_member?{query}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ),
                "/relative" => "HTTP/1.1 302 Found\r\nLocation: /export_on_member\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
                "/loop" => "HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
                _ => "HTTP/1.0 200 OK\r\ntask-id: OpaqueRef:t\r\n\r\nmember data".to_owned(),
            };
            s.write_all(reply.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            seen
        })
    });
    let (port, seen, server) = server(handler).await;
    let t = transfer(Duration::from_secs(30));
    for start in ["/export", "/relative"] {
        let download = t.get(url(port, start, Some("OpaqueRef:t"))).await.unwrap();
        assert!(
            download.url.contains("/export_on_member"),
            "{}",
            download.url
        );
        assert_eq!(collect(download).await.unwrap(), b"member data");
    }
    {
        let seen = seen.lock().await;
        let member: Vec<_> = seen
            .iter()
            .filter(|s| s.target.starts_with("/export_on_member"))
            .collect();
        assert_eq!(member.len(), 2);
        for m in member {
            assert!(m.target.contains("task_id=OpaqueRef%3At"), "{}", m.target);
            assert!(m.target.contains("session_id="), "{}", m.target);
            assert!(m.target.contains("vdi=uuid-1"), "{}", m.target);
        }
    }
    let err = t.get(url(port, "/loop", None)).await.err().unwrap();
    assert!(matches!(err, HttpError::Redirect { .. }), "{err}");
    assert!(!err.to_string().contains("very-secret"), "{err}");
    server.abort();
}

#[tokio::test]
async fn unauthorized_and_error_statuses() {
    let handler: Handler = Arc::new(|seen, mut reader, _| {
        Box::pin(async move {
            let s = reader.get_mut();
            let reply: &[u8] = if seen.target.starts_with("/denied") {
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"xapi\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            } else {
                b"HTTP/1.1 404 Not Found\r\ntask-id: OpaqueRef:failed\r\nConnection: close\r\n\r\n<html><body>Unknown format x for session_id=OpaqueRef:very-secret-session</body></html>"
            };
            s.write_all(reply).await.unwrap();
            s.shutdown().await.unwrap();
            seen
        })
    });
    let (port, _, server) = server(handler).await;
    let t = transfer(Duration::from_secs(30));
    let err = t.get(url(port, "/denied", None)).await.err().unwrap();
    assert!(matches!(err, HttpError::Unauthorized { .. }), "{err}");
    assert!(!err.to_string().contains("very-secret"), "{err}");
    let err = t
        .get(url(port, "/export_raw_vdi", None))
        .await
        .err()
        .unwrap();
    match &err {
        HttpError::Status {
            status,
            excerpt,
            task_id,
            ..
        } => {
            assert_eq!(*status, 404);
            assert!(excerpt.contains("Unknown format x"), "{excerpt}");
            assert_eq!(task_id.as_deref(), Some("OpaqueRef:failed"));
        }
        other => panic!("unexpected {other}"),
    }
    assert!(!err.to_string().contains("very-secret"), "{err}");
    server.abort();
}

#[tokio::test]
async fn error_page_inside_a_200_body_is_detected() {
    let handler: Handler = Arc::new(|seen, mut reader, _| {
        Box::pin(async move {
            let s = reader.get_mut();
            s.write_all(b"HTTP/1.0 200 OK\r\ntask-id: OpaqueRef:x\r\n\r\n")
                .await
                .unwrap();
            // The error page arrives in pieces smaller than the 5-byte probe.
            for piece in [
                &b"HT"[..],
                b"TP/1.1 500 Internal Error\r\n\r\n<html>VDI_IO_ERROR</html>",
            ] {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s.shutdown().await.unwrap();
            seen
        })
    });
    let (port, _, server) = server(handler).await;
    let download = transfer(Duration::from_secs(30))
        .get(url(port, "/export", None))
        .await
        .unwrap();
    let err = collect(download).await.err().unwrap();
    match &err {
        HttpError::ErrorPageInBody { excerpt, .. } => {
            assert!(excerpt.contains("500 Internal Error"), "{excerpt}");
            assert!(excerpt.contains("VDI_IO_ERROR"), "{excerpt}");
        }
        other => panic!("unexpected {other}"),
    }
    server.abort();
}

#[tokio::test]
async fn short_body_that_is_not_an_error_page_passes() {
    let handler: Handler = Arc::new(|seen, mut reader, _| {
        Box::pin(async move {
            let s = reader.get_mut();
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nHTT").await.unwrap();
            s.shutdown().await.unwrap();
            seen
        })
    });
    let (port, _, server) = server(handler).await;
    let download = transfer(Duration::from_secs(30))
        .get(url(port, "/export", None))
        .await
        .unwrap();
    assert_eq!(collect(download).await.unwrap(), b"HTT");
    server.abort();
}

/// An import handler like xapi's: 200 + task-id first, then it reads the body.
fn import_handler() -> Handler {
    Arc::new(|mut seen, mut reader, port| {
        Box::pin(async move {
            let has_task = seen.target.contains("task_id=");
            let path = seen.target.split('?').next().unwrap().to_owned();
            if path == "/import_raw_vdi" {
                // The coordinator redirects to the member that sees the SR.
                let reply = format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://localhost:{port}/import_raw_vdi_member?probe-location=1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                reader.get_mut().write_all(reply.as_bytes()).await.unwrap();
                return seen;
            }
            if seen.header("transfer-encoding").is_some() {
                reader
                    .get_mut()
                    .write_all(
                        b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\nchunked refused",
                    )
                    .await
                    .unwrap();
                return seen;
            }
            let len: usize = seen
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if has_task {
                reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\ntask-id: OpaqueRef:import-task\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
            }
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).await.is_ok() {
                seen.body = body;
            }
            if !has_task {
                // A probe without task: xapi would fail its own task.
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 500 Internal Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            }
            let _ = reader.get_mut().shutdown().await;
            seen
        })
    })
}

#[tokio::test]
async fn put_probes_for_the_redirect_then_streams_with_content_length() {
    let (port, seen, server) = server(import_handler()).await;
    let data = pattern(1024 * 1024 + 3);
    let chunks: Vec<std::io::Result<Bytes>> = data
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let upload = transfer(Duration::from_secs(30))
        .put(
            url(port, "/import_raw_vdi", Some("OpaqueRef:import-task")),
            futures::stream::iter(chunks),
            data.len() as u64,
        )
        .await
        .unwrap();
    assert_eq!(upload.task_id.as_deref(), Some("OpaqueRef:import-task"));
    assert_eq!(upload.bytes_sent, data.len() as u64);
    assert!(upload.url.contains("localhost") && upload.url.contains("_member"));
    assert!(!upload.url.contains("very-secret"));

    let seen = seen.lock().await;
    let probes: Vec<_> = seen
        .iter()
        .filter(|s| !s.target.contains("task_id="))
        .collect();
    let real: Vec<_> = seen
        .iter()
        .filter(|s| s.target.contains("task_id="))
        .collect();
    assert_eq!(
        probes.len(),
        2,
        "probe at the coordinator and at the member: {seen:?}"
    );
    for p in &probes {
        assert_eq!(p.method, "PUT");
        assert_eq!(p.header("content-length"), Some("0"));
    }
    assert_eq!(real.len(), 1, "{seen:?}");
    let real = real[0];
    assert!(
        real.target.starts_with("/import_raw_vdi_member?"),
        "{}",
        real.target
    );
    // The original query, not the probe's Location query, goes to the final URL.
    assert!(!real.target.contains("probe-location"), "{}", real.target);
    assert!(real.target.contains("vdi=uuid-1"), "{}", real.target);
    assert_eq!(real.header("transfer-encoding"), None);
    assert_eq!(
        real.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    assert!(
        real.body == data,
        "body differs ({} bytes)",
        real.body.len()
    );
    server.abort();
}

#[tokio::test]
async fn put_body_shorter_than_announced_is_an_error() {
    let (port, _, server) = server(import_handler()).await;
    let mut options = TransferOptions {
        idle_timeout: Duration::from_secs(10),
        ..TransferOptions::default()
    };
    options.probe_put_redirects = false;
    let t = HttpTransfer::new(&TlsPolicy::InsecureNoVerify, options).unwrap();
    let body = futures::stream::iter(vec![Ok(Bytes::from_static(b"only this"))]);
    let err = t
        .put(url(port, "/import_member", Some("OpaqueRef:t")), body, 1000)
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("short of the announced Content-Length 1000"),
        "{err}"
    );
    assert!(!err.to_string().contains("very-secret"), "{err}");
    server.abort();
}

#[tokio::test]
async fn silent_servers_time_out_instead_of_hanging() {
    let handler: Handler = Arc::new(|seen, mut reader, _| {
        Box::pin(async move {
            if seen.target.starts_with("/after_head") {
                reader
                    .get_mut()
                    .write_all(b"HTTP/1.0 200 OK\r\n\r\nfirst bytes")
                    .await
                    .unwrap();
            }
            // Then silence, connection held open.
            tokio::time::sleep(Duration::from_secs(30)).await;
            seen
        })
    });
    let (port, _, server) = server(handler).await;
    let t = transfer(Duration::from_millis(400));
    let started = std::time::Instant::now();
    let download = t.get(url(port, "/after_head", None)).await.unwrap();
    let err = collect(download).await.err().unwrap();
    match &err {
        HttpError::IdleTimeout { bytes, .. } => assert_eq!(*bytes, 11),
        other => panic!("unexpected {other}"),
    }
    let err = t.get(url(port, "/no_head", None)).await.err().unwrap();
    assert!(
        matches!(err, HttpError::IdleTimeout { bytes: 0, .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!err.to_string().contains("very-secret"), "{err}");
    server.abort();
}

#[tokio::test]
async fn a_slow_consumer_is_not_server_silence() {
    // Server: a chunk at t=0, the next at t=1.0 s. Consumer: pauses 0.7 s after the
    // first chunk. The idle limit (0.5 s) must count only the time spent waiting
    // for the server (0.7 → 1.0 s), not the consumer's pause.
    let handler: Handler = Arc::new(|seen, mut reader, _| {
        Box::pin(async move {
            let s = reader.get_mut();
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nfirst-").await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1000)).await;
            s.write_all(b"second").await.unwrap();
            s.shutdown().await.unwrap();
            seen
        })
    });
    let (port, _, server) = server(handler).await;
    let download = transfer(Duration::from_millis(500))
        .get(url(port, "/export", None))
        .await
        .unwrap();
    let mut body = download.body;
    let first = body.next().await.unwrap().unwrap();
    assert_eq!(&first[..], b"first-");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, b"second");
    server.abort();
}

#[tokio::test]
async fn redirect_to_a_host_outside_the_pool_is_refused_before_connecting() {
    // The session id travels in the query: a redirect to a host that is not
    // one of the pool's must not be followed. 192.0.2.1 (TEST-NET-1) is never
    // contacted: the check happens before any connection.
    let handler: Handler = Arc::new(|seen, mut reader, _port| {
        Box::pin(async move {
            let s = reader.get_mut();
            let reply = "HTTP/1.1 302 Found\r\nLocation: http://192.0.2.1:9/export\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            s.write_all(reply.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            seen
        })
    });
    let (port, seen, server) = server(handler).await;
    let t = HttpTransfer::new(
        &TlsPolicy::InsecureNoVerify,
        TransferOptions {
            redirect_hosts: Some(vec!["127.0.0.1".into(), "10.0.0.7".into()]),
            ..TransferOptions::default()
        },
    )
    .unwrap();
    let err = t
        .get(url(port, "/export", Some("OpaqueRef:t")))
        .await
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(matches!(err, HttpError::Redirect { .. }), "{text}");
    assert!(
        text.contains("192.0.2.1") && text.contains("not a host of the pool"),
        "{text}"
    );
    assert!(!text.contains(SECRET), "{text}");
    assert_eq!(seen.lock().await.len(), 1);
    server.abort();
}
