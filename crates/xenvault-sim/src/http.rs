//! The HTTP/1.x server framework: listeners, request heads, routing by longest
//! path prefix per method, and the raw connection handed to handlers.
//!
//! Framing is hand-rolled over `httparse` (not hyper) so that every handler can
//! answer exactly as xapi does: RPC answers with `Content-Length` and keeps the
//! connection alive; data handlers may send `HTTP/1.0 200 OK` with no length and
//! close, or refuse chunked uploads. Routing follows xapi's `Http_svr`: the
//! handler registered for the longest prefix of the path, per method, wins
//! (see `docs/xapi-notes.md`, "HTTP routing").
//!
//! A handler gets the parsed [`Request`] and owns the [`Conn`]: it reads the body
//! from it, writes whatever it wants to it, and returns `Some(conn)` to keep the
//! connection open for the next request (only if it consumed exactly the body
//! and answered with a length), or `None` to close it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::os::fd::AsFd;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpListener;

use crate::pool::Pool;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What a handler future yields: the connection back to keep it alive, or
/// `None` to close it.
pub type HandlerOutcome = io::Result<Option<Conn>>;

/// The boxed future a [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerOutcome> + Send>>;

/// A request handler: `(pool, request head, connection) → outcome`.
pub type Handler = Arc<dyn Fn(Arc<Pool>, Request, Conn) -> HandlerFuture + Send + Sync>;

/// Any byte stream a connection runs over (TCP or TLS over TCP).
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}

/// A parsed request head. The body, if any, is still in the [`Conn`].
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `PUT`, `POST`, … as sent.
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    /// The percent-decoded path, without the query.
    pub path: String,
    /// The query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    /// The HTTP minor version (0 for HTTP/1.0, 1 for HTTP/1.1).
    pub version_minor: u8,
    /// Headers in order; names as sent (compare case-insensitively).
    pub headers: Vec<(String, String)>,
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The ref of the host whose listener accepted the connection.
    pub host: String,
}

impl Request {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first query parameter with this name.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the query has this key at all (e.g. `chunked` for `/import_raw_vdi`).
    pub fn has_query_key(&self, name: &str) -> bool {
        self.query.iter().any(|(k, _)| k == name)
    }

    /// A cookie's value.
    pub fn cookie(&self, name: &str) -> Option<String> {
        for (k, v) in &self.headers {
            if !k.eq_ignore_ascii_case("cookie") {
                continue;
            }
            for part in v.split(';') {
                if let Some((ck, cv)) = part.trim().split_once('=')
                    && ck.trim() == name
                {
                    return Some(percent_decode(cv.trim()));
                }
            }
        }
        None
    }

    /// A parameter the way xapi's `lookup_param_of_req` finds it: cookie first,
    /// then the query string.
    pub fn param(&self, name: &str) -> Option<String> {
        self.cookie(name)
            .or_else(|| self.query_param(name).map(str::to_string))
    }

    /// `Content-Length`, if present and valid.
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }

    /// Whether a `Transfer-Encoding` header is present (xapi refuses chunked
    /// uploads; see `docs/xapi-notes.md`, "Imports refuse chunked bodies").
    pub fn has_transfer_encoding(&self) -> bool {
        self.header("transfer-encoding").is_some()
    }

    /// The HTTP Basic credentials, if an `Authorization: Basic` header is present.
    pub fn basic_auth(&self) -> Option<(String, String)> {
        use base64::Engine as _;
        let v = self.header("authorization")?;
        let (scheme, rest) = v.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    }

    /// Whether the client asked to keep the connection open after this request.
    pub fn wants_keep_alive(&self) -> bool {
        let conn = self.header("connection").map(str::to_ascii_lowercase);
        match self.version_minor {
            0 => conn.is_some_and(|c| c.contains("keep-alive")),
            _ => !conn.is_some_and(|c| c.contains("close")),
        }
    }
}

/// A client connection: the bytes already read past the request head, then the
/// socket. Read the request body from it; write the raw response to it.
pub struct Conn {
    io: ConnIo,
    buf: Vec<u8>,
    pos: usize,
}

/// The socket under a [`Conn`]: plain TCP is kept as such so file ranges can go
/// out with `sendfile` (no copy through user space); TLS and others are boxed.
enum ConnIo {
    Plain(tokio::net::TcpStream),
    Other(Box<dyn ByteStream>),
}

/// Zeros for [`Conn::write_zeros`]: 1 MiB, so a hole costs one write call
/// per MiB (a static of zeros takes no room in the binary).
static ZERO_BLOCK: [u8; 1 << 20] = [0; 1 << 20];

impl Conn {
    /// Wraps a stream.
    pub fn new(io: Box<dyn ByteStream>) -> Conn {
        Conn {
            io: ConnIo::Other(io),
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Wraps a plain TCP stream, keeping a way to `sendfile` into it.
    pub fn plain(tcp: tokio::net::TcpStream) -> Conn {
        Conn {
            io: ConnIo::Plain(tcp),
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// True when [`Conn::send_file_range`] copies nothing through user space.
    pub fn can_send_file(&self) -> bool {
        matches!(self.io, ConnIo::Plain(_))
    }

    /// Sends `len` bytes of `file` from `offset` (bytes past the file's end are
    /// sent as zeros, as a sparse file reads). Uses `sendfile` on plain TCP, a
    /// buffered copy otherwise.
    pub async fn send_file_range(
        &mut self,
        file: &std::fs::File,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let end = offset + len;
        let mut pos = offset;
        if let ConnIo::Plain(tcp) = &self.io {
            while pos < end {
                tcp.writable().await?;
                let want = usize::try_from(end - pos)
                    .unwrap_or(usize::MAX)
                    .min(1 << 30);
                match tcp.try_io(Interest::WRITABLE, || {
                    rustix::fs::sendfile(tcp.as_fd(), file, Some(&mut pos), want)
                        .map_err(io::Error::from)
                }) {
                    Ok(0) => break, // past the end of the file: the rest is zeros
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        } else {
            let mut buf = vec![0u8; (1 << 20).min(len as usize)];
            while pos < end {
                let n = buf.len().min((end - pos) as usize);
                let got = std::os::unix::fs::FileExt::read_at(file, &mut buf[..n], pos)?;
                if got == 0 {
                    break;
                }
                self.io.write_all(&buf[..got]).await?;
                pos += got as u64;
            }
        }
        self.write_zeros(end - pos).await
    }

    /// Sends `len` zero bytes.
    pub async fn write_zeros(&mut self, mut len: u64) -> io::Result<()> {
        while len > 0 {
            let n = len.min(ZERO_BLOCK.len() as u64) as usize;
            self.io.write_all(&ZERO_BLOCK[..n]).await?;
            len -= n as u64;
        }
        Ok(())
    }

    /// Reads exactly `len` body bytes, refusing more than `limit`.
    pub async fn read_body(&mut self, len: u64, limit: usize) -> io::Result<Vec<u8>> {
        if len > limit as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request body of {len} bytes exceeds the limit of {limit}"),
            ));
        }
        let mut body = vec![0u8; len as usize];
        self.read_exact(&mut body).await?;
        Ok(body)
    }

    /// Writes a complete response and flushes.
    pub async fn send(&mut self, resp: &Response) -> io::Result<()> {
        let bytes = resp.to_bytes();
        self.write_all(&bytes).await?;
        self.flush().await
    }

    /// Writes a status line and headers with no `Content-Length` (a streamed
    /// body follows, ended by closing the connection), e.g.
    /// `write_head("HTTP/1.0", 200, "OK", &[("task-id", r)])`.
    pub async fn write_head(
        &mut self,
        version: &str,
        status: u16,
        reason: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<()> {
        let mut head = format!("{version} {status} {reason}\r\n");
        for (k, v) in headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        self.write_all(head.as_bytes()).await?;
        self.flush().await
    }

    /// Reads the next request head. `Ok(None)` on a clean EOF before any byte.
    async fn read_head(
        &mut self,
        peer: SocketAddr,
        tls: bool,
        host: &str,
    ) -> io::Result<Option<Request>> {
        // Compact the buffer.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        loop {
            if let Some(end) = find_head_end(&self.buf) {
                let req = parse_head(&self.buf[..end], peer, tls, host)?;
                self.pos = end;
                return Ok(Some(req));
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request head too large",
                ));
            }
            let mut chunk = [0u8; 8192];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a request head",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.buf.len() {
            let n = (this.buf.len() - this.pos).min(out.remaining());
            out.put_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.buf.len() {
                this.buf.clear();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, out)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A complete response with a body and `Content-Length`.
#[derive(Debug, Clone)]
pub struct Response {
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: &'static str,
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// Headers other than `Content-Length`.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// An HTTP/1.1 response with an empty body.
    pub fn new(status: u16, reason: &str) -> Response {
        Response {
            version: "HTTP/1.1",
            status,
            reason: reason.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// Sets the body and its `Content-Type`.
    pub fn body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        self.headers
            .push(("Content-Type".into(), content_type.into()));
        self.body = body.into();
        self
    }

    /// A small HTML error page, as xapi's `Http_svr` sends them.
    pub fn error_page(status: u16, reason: &str) -> Response {
        let html = format!("<html><body><h1>HTTP {status} {reason}</h1></body></html>");
        Response::new(status, reason)
            .header("Connection", "close")
            .body("text/html", html)
    }

    /// `401 Unauthorized` with `WWW-Authenticate: Basic realm="xapi"`.
    pub fn unauthorized() -> Response {
        Response::error_page(401, "Unauthorized").header("WWW-Authenticate", "Basic realm=\"xapi\"")
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!("{} {} {}\r\n", self.version, self.status, self.reason);
        for (k, v) in &self.headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", self.body.len()));
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// The routing table: per method, the handler of the longest matching prefix.
#[derive(Default, Clone)]
pub struct Router {
    routes: Vec<(String, String, Handler)>,
}

impl Router {
    /// An empty table.
    pub fn new() -> Router {
        Router::default()
    }

    /// Registers `handler` for `method` (e.g. `"GET"`) on every path starting
    /// with `prefix`. Example: `router.route("GET", "/export", export::handle)`
    /// with `async fn handle(pool: Arc<Pool>, req: Request, conn: Conn) -> HandlerOutcome`.
    pub fn route<F, Fut>(&mut self, method: &str, prefix: &str, handler: F)
    where
        F: Fn(Arc<Pool>, Request, Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerOutcome> + Send + 'static,
    {
        let h: Handler = Arc::new(move |p, r, c| Box::pin(handler(p, r, c)));
        self.routes
            .retain(|(m, p, _)| !(m == method && p == prefix));
        self.routes
            .push((method.to_string(), prefix.to_string(), h));
    }

    /// The handler for a request, by longest prefix among those of its method.
    pub fn find(&self, method: &str, path: &str) -> Option<Handler> {
        self.routes
            .iter()
            .filter(|(m, p, _)| m == method && path.starts_with(p.as_str()))
            .max_by_key(|(_, p, _)| p.len())
            .map(|(_, _, h)| h.clone())
    }
}

/// How one listener serves: which host it belongs to and whether it is TLS.
#[derive(Clone)]
pub struct ListenerSpec {
    /// The ref of the host this listener is.
    pub host: String,
    /// TLS acceptor for an HTTPS listener.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Accepts connections until `shutdown` fires, serving each on its own task.
pub async fn serve(
    listener: TcpListener,
    spec: ListenerSpec,
    router: Arc<Router>,
    pool: Arc<Pool>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let spec = spec.clone();
        let router = router.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let io: Box<dyn ByteStream> = match &spec.tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(e) => {
                        tracing::debug!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                },
                None => {
                    if let Err(e) = serve_conn(Conn::plain(tcp), peer, spec, router, pool).await {
                        tracing::debug!("connection from {peer}: {e}");
                    }
                    return;
                }
            };
            if let Err(e) = serve_conn(Conn::new(io), peer, spec, router, pool).await {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
}

async fn serve_conn(
    mut conn: Conn,
    peer: SocketAddr,
    spec: ListenerSpec,
    router: Arc<Router>,
    pool: Arc<Pool>,
) -> io::Result<()> {
    let tls = spec.tls.is_some();
    loop {
        let req = match conn.read_head(peer, tls, &spec.host).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = conn.send(&Response::error_page(400, "Bad Request")).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(method = %req.method, target = %redact(&req.target), "request");
        let Some(handler) = router.find(&req.method, &req.path) else {
            // Drain nothing: answer and close, as the body length is unknown to us.
            conn.send(&Response::error_page(404, "Not Found")).await?;
            return Ok(());
        };
        match handler(pool.clone(), req, conn).await? {
            Some(c) => conn = c,
            None => return Ok(()),
        }
    }
}

/// The target with `session_id` values hidden, for logs.
pub fn redact(target: &str) -> String {
    match target.split_once('?') {
        None => target.to_string(),
        Some((path, q)) => {
            let parts: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k == "session_id" => format!("{k}=…"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", parts.join("&"))
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn parse_head(head: &[u8], peer: SocketAddr, tls: bool, host: &str) -> io::Result<Request> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete request head".into())),
        Err(e) => return Err(bad(format!("malformed request head: {e}"))),
    }
    let method = parsed.method.unwrap_or("GET").to_string();
    let target = parsed.path.unwrap_or("/").to_string();
    let version_minor = parsed.version.unwrap_or(1);
    let headers = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((&target, ""));
    let query = parse_query(raw_query);
    Ok(Request {
        method,
        path: percent_decode(raw_path),
        target,
        query,
        version_minor,
        headers,
        peer,
        tls,
        host: host.to_string(),
    })
}

/// Parses `a=b&c=d` with percent-decoding (`+` is a space).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

/// Decodes `%XX` escapes; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnIo::Plain(t) => Pin::new(t).poll_read(cx, out),
            ConnIo::Other(o) => Pin::new(o).poll_read(cx, out),
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnIo::Plain(t) => Pin::new(t).poll_write(cx, data),
            ConnIo::Other(o) => Pin::new(o).poll_write(cx, data),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnIo::Plain(t) => Pin::new(t).poll_flush(cx),
            ConnIo::Other(o) => Pin::new(o).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnIo::Plain(t) => Pin::new(t).poll_shutdown(cx),
            ConnIo::Other(o) => Pin::new(o).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_cookies_are_decoded() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let head = b"GET /export?ref=OpaqueRef%3Aabc&use_compression=zstd&chunked HTTP/1.1\r\nCookie: session_id=OpaqueRef:s; x=y\r\nHost: h\r\n\r\n";
        let r = parse_head(head, peer, false, "OpaqueRef:h").unwrap();
        assert_eq!(r.path, "/export");
        assert_eq!(r.query_param("ref"), Some("OpaqueRef:abc"));
        assert!(r.has_query_key("chunked"));
        assert_eq!(r.param("session_id").as_deref(), Some("OpaqueRef:s"));
        assert_eq!(r.cookie("x").as_deref(), Some("y"));
        assert!(r.wants_keep_alive());
    }

    #[test]
    fn longest_prefix_wins_per_method() {
        async fn a(_: Arc<Pool>, _: Request, _: Conn) -> HandlerOutcome {
            Ok(None)
        }
        let mut r = Router::new();
        r.route("POST", "/", a);
        r.route("POST", "/jsonrpc", a);
        r.route("GET", "/export", a);
        assert!(r.find("POST", "/xmlrpc").is_some());
        assert!(r.find("GET", "/exportfoo").is_some());
        assert!(r.find("GET", "/import").is_none());
        assert!(r.find("PUT", "/export").is_none());
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
        assert_eq!(
            redact("/x?session_id=OpaqueRef:1&a=b"),
            "/x?session_id=…&a=b"
        );
    }
}
