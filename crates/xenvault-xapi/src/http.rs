//! HTTP data plane: streaming exports and imports that run inside a task.
//!
//! XAPI's transfer handlers (`/export`, `/export_raw_vdi`, `/pool/xmldbdump`,
//! `/host_backup`, `/import`, `/import_raw_vdi`; docs/xapi-notes.md "HTTP data
//! plane") are plain HTTP with quirks this module handles:
//!
//! - downloads have no Content-Length and may answer `HTTP/1.0`: the body is read
//!   until EOF as a stream ([`BodyStream`]), never buffered whole;
//! - a compressed export of a sparse disk can be silent for a long time, so the only
//!   timeout on a body is an idle timeout ([`TransferOptions::idle_timeout`], 1 h by
//!   default);
//! - a failure after the `200` may write an `HTTP/1.1 500` page *inside* the body:
//!   a body starting with `HTTP/` is reported as [`HttpError::ErrorPageInBody`];
//! - `302 Found` redirects to the host that sees the SR are followed by hand (query
//!   and `task_id` kept, never downgraded from https, optional host remapping for
//!   NAT); a PUT body cannot be replayed, so an empty-body probe without `task_id`
//!   finds the redirect first, as XO does;
//! - uploads always carry an explicit Content-Length (xapi refuses chunked bodies);
//! - the `task-id` response header names the task xapi actually used.
//!
//! The outcome of a transfer is the task's, not the HTTP status: create a task,
//! pass its ref to [`handler_url`], transfer, then wait for the task (the control
//! plane's task helper). URLs carry `session_id`: every URL that reaches a log or an
//! error goes through [`redact_url`].
//!
//! Built on reqwest (rustls, streaming bodies) with its redirect following turned
//! off. hyper alone would not buy anything here: reqwest reads close-delimited
//! HTTP/1.0 bodies, sends a streamed body with the Content-Length we set, and the
//! idle timeout is implemented on the body stream itself so it can name the URL
//! and the bytes received.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::{StatusCode, Url};
use tokio::io::AsyncRead;
use tokio::time::{Instant, Sleep};

use crate::tls::{TlsError, TlsPolicy};

/// Errors of HTTP transfers. URLs in them are redacted.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The TLS configuration could not be built.
    #[error("HTTP transfer TLS setup failed: {0}")]
    Tls(#[from] TlsError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// Sending the request or receiving the response head failed.
    #[error("HTTP {method} {url} failed: {reason}")]
    Request {
        /// GET or PUT.
        method: &'static str,
        /// Redacted URL.
        url: String,
        /// What went wrong (reqwest's error chain, without URL).
        reason: String,
    },
    /// 401: the session is invalid or expired.
    #[error(
        "HTTP {method} {url} was refused with 401 Unauthorized: the session is invalid or expired; log in again"
    )]
    Unauthorized {
        /// GET or PUT.
        method: &'static str,
        /// Redacted URL.
        url: String,
    },
    /// Another non-success status.
    #[error("HTTP {method} {url} answered {status}: {excerpt}")]
    Status {
        /// GET or PUT.
        method: &'static str,
        /// Redacted URL.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the response body (secrets redacted).
        excerpt: String,
        /// The `task-id` header, if any: its `error_info` says more.
        task_id: Option<String>,
    },
    /// The body starts with an HTTP status line: xapi failed after sending `200`.
    #[error(
        "the body of {url} starts with an HTTP error page (xapi failed after answering 200; see the task's error_info): {excerpt}"
    )]
    ErrorPageInBody {
        /// Redacted URL.
        url: String,
        /// The start of the page.
        excerpt: String,
    },
    /// Nothing arrived (or could be sent) for longer than the idle timeout.
    #[error(
        "HTTP transfer {url} was idle for {after:?} after {bytes} bytes; the server or the network stalled (raise the idle timeout for very sparse compressed exports)"
    )]
    IdleTimeout {
        /// Redacted URL.
        url: String,
        /// The limit.
        after: Duration,
        /// Bytes transferred before the stall.
        bytes: u64,
    },
    /// Redirects could not be followed.
    #[error("HTTP redirect from {url} cannot be followed: {reason}")]
    Redirect {
        /// Redacted URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Reading the response body failed.
    #[error("reading the body of {url} failed after {bytes} bytes: {reason}")]
    BodyRead {
        /// Redacted URL.
        url: String,
        /// Bytes received before the failure.
        bytes: u64,
        /// The cause.
        reason: String,
    },
    /// The upload body could not be sent completely.
    #[error("upload to {url} failed after {sent} of {expected} bytes: {reason}")]
    Upload {
        /// Redacted URL.
        url: String,
        /// Bytes handed to the connection.
        sent: u64,
        /// Content-Length announced.
        expected: u64,
        /// The cause.
        reason: String,
    },
}

impl HttpError {
    /// True when the transfer may succeed if retried from scratch (network trouble,
    /// stalls), false for refusals and server-side failures.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HttpError::Request { .. } | HttpError::IdleTimeout { .. } | HttpError::BodyRead { .. }
        )
    }
}

/// Knobs of HTTP transfers.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Longest silence allowed while waiting for a response head or body bytes, or
    /// while the server does not take upload bytes. XO waits 30 min for the first
    /// bytes of a compressed export; the default is 1 h.
    pub idle_timeout: Duration,
    /// TCP + TLS connect limit.
    pub connect_timeout: Duration,
    /// Redirects followed at most.
    pub max_redirects: usize,
    /// Send an empty-body PUT (without `task_id`) first to discover a redirect.
    pub probe_put_redirects: bool,
    /// Host rewriting for redirects behind NAT: `(host in Location, host[:port] to use)`.
    pub redirect_host_map: Vec<(String, String)>,
    /// The hosts a redirect may lead to (names or addresses, compared after
    /// `redirect_host_map`), besides the host of the URL first asked. A
    /// redirect carries the session id in its query, so a pool client sets
    /// this to the pool's host addresses; `None` follows redirects anywhere.
    pub redirect_hosts: Option<Vec<String>>,
}

impl Default for TransferOptions {
    fn default() -> TransferOptions {
        TransferOptions {
            idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(30),
            max_redirects: 5,
            probe_put_redirects: true,
            redirect_host_map: Vec::new(),
            redirect_hosts: None,
        }
    }
}

/// Builds the URL of a handler: `base` (scheme, host, port) + `path`, with
/// `session_id`, `task_id` (when given) and `params` as query parameters.
pub fn handler_url(
    base: &Url,
    path: &str,
    session_id: &str,
    task_id: Option<&str>,
    params: &[(&str, &str)],
) -> Url {
    let mut url = base.clone();
    url.set_path(path);
    url.set_fragment(None);
    url.set_query(None);
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("session_id", session_id);
        if let Some(task) = task_id {
            query.append_pair("task_id", task);
        }
        for (k, v) in params {
            query.append_pair(k, v);
        }
    }
    url
}

/// The URL with secrets (`session_id`, a password) replaced by `<redacted>`.
pub fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("redacted"));
    }
    if shown.query().is_some() {
        let pairs: Vec<(String, String)> = shown
            .query_pairs()
            .map(|(k, v)| {
                let secret =
                    k.eq_ignore_ascii_case("session_id") || k.eq_ignore_ascii_case("password");
                (
                    k.into_owned(),
                    if secret {
                        "<redacted>".to_owned()
                    } else {
                        v.into_owned()
                    },
                )
            })
            .collect();
        shown.set_query(None);
        let mut q = shown.query_pairs_mut();
        for (k, v) in &pairs {
            q.append_pair(k, v);
        }
    }
    shown.to_string().replace("%3Credacted%3E", "<redacted>")
}

/// Replaces `session_id=<value>` and `OpaqueRef:` session-like values in free text
/// (error pages may echo the request line).
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("session_id=") {
        let (head, tail) = rest.split_at(pos + "session_id=".len());
        out.push_str(head);
        out.push_str("<redacted>");
        let end = tail
            .find(|c: char| c == '&' || c == '"' || c == '\'' || c == '<' || c.is_whitespace())
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

const EXCERPT_BYTES: usize = 2048;

fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_BYTES)]);
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let collapsed = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    redact_text(&collapsed)
}

fn reason_of(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    redact_text(&text)
}

fn task_id_of(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("task-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A download in progress: the response head and the body stream.
pub struct Download {
    /// The `task-id` header: the task xapi runs the handler in.
    pub task_id: Option<String>,
    /// HTTP status (2xx).
    pub status: u16,
    /// The final URL after redirects, redacted.
    pub url: String,
    /// The body.
    pub body: BodyStream,
}

impl Download {
    /// The body as an `AsyncRead` (errors become `io::Error::other(HttpError)`).
    pub fn into_async_read(self) -> impl AsyncRead + Send + Unpin {
        tokio_util::io::StreamReader::new(self.body.map_err(io::Error::other))
    }
}

/// The result of an upload whose body was fully sent.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The `task-id` header.
    pub task_id: Option<String>,
    /// HTTP status (2xx).
    pub status: u16,
    /// Bytes sent (equals the Content-Length).
    pub bytes_sent: u64,
    /// The start of the response body, if any (redacted).
    pub response_excerpt: String,
    /// The final URL after redirects, redacted.
    pub url: String,
}

enum BodyState {
    /// Collecting the first bytes to look for `HTTP/`.
    Probing,
    /// An error page was found; collecting its start.
    ErrorPage,
    /// Passing bytes through.
    Passing,
    /// Finished (EOF or error given).
    Done,
}

/// A response body read until EOF, with an idle timeout and the error-page check.
pub struct BodyStream {
    inner: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    url: String,
    received: u64,
    head: BytesMut,
    state: BodyState,
    /// True while a poll is waiting for the server (the idle clock runs only then,
    /// so a slow consumer never counts as server silence).
    waiting: bool,
}

impl BodyStream {
    fn new(response: reqwest::Response, idle: Duration, url: String) -> BodyStream {
        BodyStream {
            inner: response.bytes_stream().boxed(),
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            url,
            received: 0,
            head: BytesMut::new(),
            state: BodyState::Probing,
            waiting: false,
        }
    }

    /// Bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    fn error_page(&mut self) -> HttpError {
        self.state = BodyState::Done;
        HttpError::ErrorPageInBody {
            url: self.url.clone(),
            excerpt: excerpt(&self.head),
        }
    }
}

impl Stream for BodyStream {
    type Item = Result<Bytes, HttpError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !this.waiting {
            this.waiting = true;
            let deadline = Instant::now() + this.idle;
            this.sleep.as_mut().reset(deadline);
        }
        let result = this.poll_inner(cx);
        if result.is_ready() {
            this.waiting = false;
        }
        result
    }
}

impl BodyStream {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, HttpError>>> {
        let this = self;
        loop {
            if matches!(this.state, BodyState::Done) {
                return Poll::Ready(None);
            }
            match this.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let deadline = Instant::now() + this.idle;
                    this.sleep.as_mut().reset(deadline);
                    this.received += chunk.len() as u64;
                    match this.state {
                        BodyState::Passing => {
                            if chunk.is_empty() {
                                continue;
                            }
                            return Poll::Ready(Some(Ok(chunk)));
                        }
                        BodyState::Probing => {
                            this.head.extend_from_slice(&chunk);
                            if this.head.len() < 5 {
                                continue;
                            }
                            // xapi may write an error page into a 200 body
                            // (docs/xapi-notes.md "HTTP data plane").
                            if this.head.starts_with(b"HTTP/") {
                                this.state = BodyState::ErrorPage;
                                continue;
                            }
                            this.state = BodyState::Passing;
                            return Poll::Ready(Some(Ok(this.head.split().freeze())));
                        }
                        BodyState::ErrorPage => {
                            this.head.extend_from_slice(&chunk);
                            if this.head.len() >= EXCERPT_BYTES {
                                return Poll::Ready(Some(Err(this.error_page())));
                            }
                        }
                        BodyState::Done => return Poll::Ready(None),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.state = BodyState::Done;
                    return Poll::Ready(Some(Err(HttpError::BodyRead {
                        url: this.url.clone(),
                        bytes: this.received,
                        reason: reason_of(e),
                    })));
                }
                Poll::Ready(None) => match this.state {
                    BodyState::ErrorPage => return Poll::Ready(Some(Err(this.error_page()))),
                    BodyState::Probing if !this.head.is_empty() => {
                        this.state = BodyState::Done;
                        return Poll::Ready(Some(Ok(this.head.split().freeze())));
                    }
                    _ => {
                        this.state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                },
                Poll::Pending => {
                    if this.sleep.as_mut().poll(cx).is_ready() {
                        this.state = BodyState::Done;
                        return Poll::Ready(Some(Err(HttpError::IdleTimeout {
                            url: this.url.clone(),
                            after: this.idle,
                            bytes: this.received,
                        })));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The HTTP data-plane client.
#[derive(Debug, Clone)]
pub struct HttpTransfer {
    client: reqwest::Client,
    options: TransferOptions,
}

impl HttpTransfer {
    /// A client with TLS per `policy` (https URLs) and plain HTTP for http URLs.
    pub fn new(policy: &TlsPolicy, options: TransferOptions) -> Result<HttpTransfer, HttpError> {
        let tls = policy.client_config()?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(options.connect_timeout)
            .http1_only()
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| HttpError::Client(reason_of(e)))?;
        Ok(HttpTransfer { client, options })
    }

    /// Uses a prepared reqwest client; it must not follow redirects itself.
    pub fn with_client(client: reqwest::Client, options: TransferOptions) -> HttpTransfer {
        HttpTransfer { client, options }
    }

    /// The options in force.
    pub fn options(&self) -> &TransferOptions {
        &self.options
    }

    /// Where a redirect from `current` to `location` leads: relative locations are
    /// resolved, the query is kept when the location has none, https is never
    /// downgraded, and hosts are remapped per `redirect_host_map`.
    fn follow(
        &self,
        current: &Url,
        location: &str,
        keep_query: Option<&str>,
    ) -> Result<Url, HttpError> {
        let bad = |reason: String| HttpError::Redirect {
            url: redact_url(current),
            reason,
        };
        let mut next = current
            .join(location)
            .map_err(|e| bad(format!("invalid Location: {e}")))?;
        if current.scheme() == "https" && next.scheme() == "http" {
            next.set_scheme("https")
                .map_err(|_| bad("cannot keep https".into()))?;
        }
        if let Some(query) = keep_query {
            next.set_query(Some(query));
        } else if next.query().is_none() {
            next.set_query(current.query());
        }
        let host = next.host_str().unwrap_or_default().to_owned();
        if let Some((_, to)) = self
            .options
            .redirect_host_map
            .iter()
            .find(|(from, _)| from.trim_matches(['[', ']']) == host.trim_matches(['[', ']']))
        {
            let (to_host, to_port) = match to.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(':') && p.parse::<u16>().is_ok() => {
                    (h, p.parse().ok())
                }
                _ => (to.as_str(), None),
            };
            next.set_host(Some(to_host))
                .map_err(|e| bad(format!("cannot remap to {to}: {e}")))?;
            if to_port.is_some() {
                let _ = next.set_port(to_port);
            }
        }
        if let Some(allowed) = &self.options.redirect_hosts {
            let bare = |h: &str| h.trim_matches(['[', ']']).to_ascii_lowercase();
            let to = bare(next.host_str().unwrap_or_default());
            let same = bare(current.host_str().unwrap_or_default()) == to;
            if !same && !allowed.iter().any(|h| bare(h) == to) {
                return Err(bad(format!(
                    "the server redirects to {to}, which is not a host of the pool \
                     (known: {}); the session id is not sent there. If the pool is \
                     reached through NAT, map the address with a redirect host map",
                    allowed.join(", ")
                )));
            }
        }
        Ok(next)
    }

    async fn error_for_status(
        &self,
        method: &'static str,
        url: &Url,
        response: reqwest::Response,
    ) -> HttpError {
        let status = response.status();
        let task_id = task_id_of(&response);
        if status == StatusCode::UNAUTHORIZED {
            return HttpError::Unauthorized {
                method,
                url: redact_url(url),
            };
        }
        let mut head = Vec::new();
        let mut body = response.bytes_stream();
        let read = async {
            while let Some(Ok(chunk)) = body.next().await {
                head.extend_from_slice(&chunk);
                if head.len() >= EXCERPT_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10).min(self.options.idle_timeout), read)
            .await;
        HttpError::Status {
            method,
            url: redact_url(url),
            status: status.as_u16(),
            excerpt: excerpt(&head),
            task_id,
        }
    }

    /// GETs a handler URL and returns the body as a stream, following redirects.
    pub async fn get(&self, url: Url) -> Result<Download, HttpError> {
        let mut current = url;
        let mut redirects = 0;
        loop {
            tracing::debug!(url = %redact_url(&current), "HTTP GET");
            let send = self.client.get(current.clone()).send();
            let response = match tokio::time::timeout(self.options.idle_timeout, send).await {
                Err(_) => {
                    return Err(HttpError::IdleTimeout {
                        url: redact_url(&current),
                        after: self.options.idle_timeout,
                        bytes: 0,
                    });
                }
                Ok(Err(e)) => {
                    return Err(HttpError::Request {
                        method: "GET",
                        url: redact_url(&current),
                        reason: reason_of(e),
                    });
                }
                Ok(Ok(r)) => r,
            };
            let status = response.status();
            if status.is_redirection() {
                redirects += 1;
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let Some(location) = location else {
                    return Err(HttpError::Redirect {
                        url: redact_url(&current),
                        reason: format!("{status} without a Location header"),
                    });
                };
                if redirects > self.options.max_redirects {
                    return Err(HttpError::Redirect {
                        url: redact_url(&current),
                        reason: format!("more than {} redirects", self.options.max_redirects),
                    });
                }
                current = self.follow(&current, &location, None)?;
                continue;
            }
            if !status.is_success() {
                return Err(self.error_for_status("GET", &current, response).await);
            }
            let url = redact_url(&current);
            return Ok(Download {
                task_id: task_id_of(&response),
                status: status.as_u16(),
                body: BodyStream::new(response, self.options.idle_timeout, url.clone()),
                url,
            });
        }
    }

    /// Finds where a PUT to `url` ends up: an empty-body PUT without `task_id`
    /// (it fails on purpose and must not touch the caller's task), repeated while
    /// the answer is a redirect. Returns the final URL with the original query.
    pub async fn probe_put_target(&self, url: &Url) -> Result<Url, HttpError> {
        let original_query = url.query().map(str::to_owned);
        let without_task = |u: &Url| {
            let mut probe = u.clone();
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .filter(|(k, _)| k != "task_id")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            probe.set_query(None);
            if !pairs.is_empty() {
                probe.query_pairs_mut().extend_pairs(pairs);
            }
            probe
        };
        let mut current = url.clone();
        for _ in 0..=self.options.max_redirects {
            let probe = without_task(&current);
            tracing::debug!(url = %redact_url(&probe), "HTTP PUT redirect probe");
            let send = self
                .client
                .put(probe)
                .header(reqwest::header::CONTENT_LENGTH, "0")
                .body(Vec::new())
                .send();
            let response = match tokio::time::timeout(self.options.idle_timeout, send).await {
                Err(_) => {
                    return Err(HttpError::IdleTimeout {
                        url: redact_url(&current),
                        after: self.options.idle_timeout,
                        bytes: 0,
                    });
                }
                Ok(Err(e)) => {
                    return Err(HttpError::Request {
                        method: "PUT",
                        url: redact_url(&current),
                        reason: reason_of(e),
                    });
                }
                Ok(Ok(r)) => r,
            };
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED {
                return Err(HttpError::Unauthorized {
                    method: "PUT",
                    url: redact_url(&current),
                });
            }
            if !status.is_redirection() {
                return Ok(current);
            }
            let Some(location) = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
            else {
                return Err(HttpError::Redirect {
                    url: redact_url(&current),
                    reason: format!("{status} without a Location header"),
                });
            };
            current = self.follow(&current, &location, original_query.as_deref())?;
        }
        Err(HttpError::Redirect {
            url: redact_url(url),
            reason: format!("more than {} redirects", self.options.max_redirects),
        })
    }

    /// PUTs `content_length` bytes from `body` to a handler URL with an explicit
    /// Content-Length (never chunked). With `probe_put_redirects` (default) the
    /// redirect target is found first by [`Self::probe_put_target`].
    ///
    /// Returns once the whole body was sent and the response read to its end.
    /// A body that yields more or fewer bytes than `content_length` is an error.
    pub async fn put<S>(&self, url: Url, body: S, content_length: u64) -> Result<Upload, HttpError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        let target = if self.options.probe_put_redirects {
            self.probe_put_target(&url).await?
        } else {
            url
        };
        let shown = redact_url(&target);
        tracing::debug!(url = %shown, content_length, "HTTP PUT");
        let sent = Arc::new(AtomicU64::new(0));
        // An empty body may never be polled: it is complete from the start.
        let initial = (content_length == 0).then_some(Ok(()));
        let (done_tx, mut done_rx) =
            tokio::sync::watch::channel::<Option<Result<(), String>>>(initial);
        let counted = counting_body(body, content_length, sent.clone(), done_tx);
        let request = self
            .client
            .put(target.clone())
            .header(reqwest::header::CONTENT_LENGTH, content_length.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(counted))
            .send();
        let upload_error = |reason: String, sent: &AtomicU64| HttpError::Upload {
            url: shown.clone(),
            sent: sent.load(Ordering::Relaxed),
            expected: content_length,
            reason,
        };

        // Wait for the response head; the server may answer before or after
        // reading the body, so only a stall of the upload counts as a timeout.
        let response = {
            tokio::pin!(request);
            let mut last = 0;
            loop {
                tokio::select! {
                    result = &mut request => break result,
                    _ = tokio::time::sleep(self.options.idle_timeout) => {
                        let now = sent.load(Ordering::Relaxed);
                        if now == last {
                            return Err(HttpError::IdleTimeout { url: shown.clone(), after: self.options.idle_timeout, bytes: now });
                        }
                        last = now;
                    }
                }
            }
        };
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                // Our own body failing shows up here too: prefer its reason.
                if let Some(Err(reason)) = done_rx.borrow().clone() {
                    return Err(upload_error(reason, &sent));
                }
                return Err(HttpError::Request {
                    method: "PUT",
                    url: shown.clone(),
                    reason: reason_of(e),
                });
            }
        };
        let status = response.status();
        if status.is_redirection() {
            return Err(HttpError::Redirect {
                url: shown.clone(),
                reason: format!(
                    "{status} after the body was sent; enable the redirect probe (probe_put_redirects)"
                ),
            });
        }
        if !status.is_success() {
            return Err(self.error_for_status("PUT", &target, response).await);
        }
        let task_id = task_id_of(&response);

        // The server answered 2xx (xapi does so before reading the body): wait for
        // the body to be sent, then read the response to its end.
        let mut last = sent.load(Ordering::Relaxed);
        loop {
            if let Some(outcome) = done_rx.borrow().clone() {
                match outcome {
                    Ok(()) => break,
                    Err(reason) => return Err(upload_error(reason, &sent)),
                }
            }
            match tokio::time::timeout(self.options.idle_timeout, done_rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    // The connection dropped our body before its end.
                    if let Some(Ok(())) = done_rx.borrow().clone() {
                        break;
                    }
                    return Err(upload_error(
                        "the server closed the connection before the whole body was sent".into(),
                        &sent,
                    ));
                }
                Err(_) => {
                    let now = sent.load(Ordering::Relaxed);
                    if now == last {
                        return Err(HttpError::IdleTimeout {
                            url: shown.clone(),
                            after: self.options.idle_timeout,
                            bytes: now,
                        });
                    }
                    last = now;
                }
            }
        }
        let mut body = BodyStream::new(response, self.options.idle_timeout, shown.clone());
        body.state = BodyState::Passing;
        let mut head = Vec::new();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    if head.len() < EXCERPT_BYTES {
                        head.extend_from_slice(&bytes);
                    }
                }
                // The body was sent in full; a connection closed abruptly at the end
                // is the norm for xapi. The task has the outcome.
                Err(HttpError::BodyRead { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Upload {
            task_id,
            status: status.as_u16(),
            bytes_sent: sent.load(Ordering::Relaxed),
            response_excerpt: excerpt(&head),
            url: shown,
        })
    }

    /// [`Self::put`] with an `AsyncRead` body.
    pub async fn put_reader<R>(
        &self,
        url: Url,
        reader: R,
        content_length: u64,
    ) -> Result<Upload, HttpError>
    where
        R: AsyncRead + Send + 'static,
    {
        let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
        self.put(url, stream, content_length).await
    }
}

/// Wraps an upload body: counts bytes, enforces the announced length, and reports
/// the end (or the failure) through `done`.
fn counting_body<S>(
    body: S,
    expected: u64,
    sent: Arc<AtomicU64>,
    done: tokio::sync::watch::Sender<Option<Result<(), String>>>,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let done = Arc::new(done);
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tail_done = done.clone();
    let tail_sent = sent.clone();
    let tail_finished = finished.clone();
    body.map(move |item| {
        if finished.load(Ordering::Relaxed) {
            return Err(io::Error::other("upload body used after its end"));
        }
        match item {
            Ok(chunk) => {
                let total = sent.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
                if total > expected {
                    let reason = format!("the body is longer than the announced Content-Length {expected}");
                    finished.store(true, Ordering::Relaxed);
                    let _ = done.send(Some(Err(reason.clone())));
                    return Err(io::Error::other(reason));
                }
                if total == expected {
                    // hyper stops polling once Content-Length bytes were taken,
                    // so the end is signalled here, not at the source's end.
                    let _ = done.send(Some(Ok(())));
                }
                Ok(chunk)
            }
            Err(e) => {
                let reason = format!("reading the upload source failed: {e}");
                finished.store(true, Ordering::Relaxed);
                let _ = done.send(Some(Err(reason.clone())));
                Err(io::Error::other(reason))
            }
        }
    })
    .chain(futures::stream::once(async move {
        // Reached when the source ended.
        let total = tail_sent.load(Ordering::Relaxed);
        if tail_finished.load(Ordering::Relaxed) {
            return Err(io::Error::other("upload aborted"));
        }
        if total != expected {
            let reason = format!("the body ended after {total} bytes, short of the announced Content-Length {expected}");
            let _ = tail_done.send(Some(Err(reason.clone())));
            return Err(io::Error::other(reason));
        }
        if expected == 0 {
            let _ = tail_done.send(Some(Ok(())));
        }
        Ok(Bytes::new())
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_built_and_redacted() {
        let base: Url = "https://pool.example:8443/".parse().unwrap();
        let url = handler_url(
            &base,
            "/export_raw_vdi",
            "OpaqueRef:secret-1",
            Some("OpaqueRef:task-2"),
            &[("vdi", "uuid-3"), ("format", "vhd")],
        );
        assert_eq!(url.path(), "/export_raw_vdi");
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        assert_eq!(pairs[0], ("session_id".into(), "OpaqueRef:secret-1".into()));
        assert_eq!(pairs[1], ("task_id".into(), "OpaqueRef:task-2".into()));
        let shown = redact_url(&url);
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("session_id=<redacted>"), "{shown}");
        assert!(
            shown.contains("task-2") && shown.contains("format=vhd"),
            "{shown}"
        );
        let with_password: Url = "https://root:hunter2@h/x".parse().unwrap();
        assert!(!redact_url(&with_password).contains("hunter2"));
    }

    #[test]
    fn text_redaction() {
        assert_eq!(
            redact_text("GET /export?session_id=OpaqueRef:abc&ref=x HTTP/1.1"),
            "GET /export?session_id=<redacted>&ref=x HTTP/1.1"
        );
        assert_eq!(redact_text("no secrets"), "no secrets");
        assert_eq!(redact_text("session_id="), "session_id=<redacted>");
    }

    #[test]
    fn redirect_resolution() {
        let t = HttpTransfer::new(
            &TlsPolicy::InsecureNoVerify,
            TransferOptions {
                redirect_host_map: vec![("10.0.0.2".into(), "gw.example:8443".into())],
                ..TransferOptions::default()
            },
        )
        .unwrap();
        let cur: Url = "https://10.0.0.1/export?session_id=s&task_id=t"
            .parse()
            .unwrap();
        let next = t
            .follow(&cur, "http://10.0.0.3/export?session_id=s&task_id=t", None)
            .unwrap();
        assert_eq!(next.scheme(), "https");
        let next = t.follow(&cur, "https://10.0.0.3/export", None).unwrap();
        assert_eq!(next.query(), Some("session_id=s&task_id=t"));
        let next = t
            .follow(&cur, "https://10.0.0.2/export?x=1", Some("a=b"))
            .unwrap();
        assert_eq!(next.as_str(), "https://gw.example:8443/export?a=b");
    }
}
