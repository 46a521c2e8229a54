//! NBD client (tokio): handshake, optional STARTTLS, pipelined reads, block status,
//! and a multi-connection reader that yields extents in offset order.
//!
//! Made for xapi-nbd first (docs/xapi-notes.md "NBD"): fixed newstyle, STARTTLS
//! with the host certificate from `VDI.get_nbd_info` pinned exactly,
//! `NBD_OPT_EXPORT_NAME` (xapi-nbd answers `NBD_OPT_GO` with `NBD_REP_ERR_UNSUP`),
//! 124 padding bytes after the export info, simple replies, 512-byte aligned reads,
//! at most 16 connections per host. It also speaks `NBD_OPT_GO`, structured replies
//! and `base:allocation` block status, so it reads sparse extents from qemu-nbd.
//!
//! The export name carries the caller's session secret (`/<vdi-uuid>?session_id=…`):
//! it is never logged or shown in errors, and [`NbdOptions`]' `Debug` hides it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use xenvault_types::extent::Extent;

use super::proto::{self, BlockStatusExtent, ExportInfo, ProtoError, alloc, chunk, cmd, opt, rep};
use crate::tls::{self, TlsError};

/// Reads must start and end on this boundary (xapi-nbd answers EINVAL otherwise).
pub const NBD_ALIGNMENT: u64 = 512;
/// Largest number of connections xapi-nbd accepts per host.
pub const XAPI_NBD_MAX_CONNECTIONS: usize = 16;
/// Default size of one read request of the multi-connection reader (XO uses 2 MiB).
pub const DEFAULT_READ_PIECE: u64 = 2 * 1024 * 1024;

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// TCP connect failed.
    #[error("cannot connect to the NBD server at {address}: {source}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Something took longer than its limit.
    #[error("NBD {what} timed out after {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The limit.
        after: Duration,
    },
    /// Reading or writing the socket failed.
    #[error("NBD connection I/O failed during {during}: {source}")]
    Io {
        /// The step.
        during: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// Building the TLS configuration failed.
    #[error("NBD TLS setup failed: {0}")]
    Tls(#[from] TlsError),
    /// The TLS handshake after STARTTLS failed (for a pinned certificate: a different
    /// certificate was presented).
    #[error("NBD TLS handshake with {address} failed: {source}")]
    TlsHandshake {
        /// `host:port`.
        address: String,
        /// The cause (its text names a pin mismatch).
        source: std::io::Error,
    },
    /// The peer broke the protocol.
    #[error("NBD protocol error: {0}")]
    Protocol(#[from] ProtoError),
    /// The peer sent something inconsistent.
    #[error("NBD protocol violation: {0}")]
    Violation(String),
    /// The server refused an option.
    #[error("NBD server refused {option} with {reply}{}{}", if message.is_empty() { String::new() } else { format!(" ({message})") }, if hint.is_empty() { String::new() } else { format!(": {hint}") })]
    OptionRefused {
        /// The option, e.g. `NBD_OPT_STARTTLS`.
        option: String,
        /// The reply name, e.g. `NBD_REP_ERR_POLICY`.
        reply: String,
        /// The server's message, if any.
        message: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The server closed the connection after `NBD_OPT_EXPORT_NAME`.
    #[error(
        "the NBD server closed the connection after NBD_OPT_EXPORT_NAME: unknown export, invalid or expired session in the export name, TLS required, or too many connections (xapi-nbd allows 16 per host)"
    )]
    ExportRefused,
    /// A read was not 512-byte aligned.
    #[error(
        "NBD read of {length} bytes at offset {offset} is not aligned to 512 bytes (xapi-nbd refuses it with EINVAL)"
    )]
    Unaligned {
        /// Offset asked.
        offset: u64,
        /// Length asked.
        length: u64,
    },
    /// A read was past the end of the export.
    #[error("NBD read of {length} bytes at offset {offset} is beyond the export size {size}")]
    OutOfRange {
        /// Offset asked.
        offset: u64,
        /// Length asked.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// A read was larger than one request may be.
    #[error("NBD request of {length} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length asked.
        length: u64,
        /// Limit.
        max: u64,
    },
    /// The server answered a command with an error.
    #[error(
        "NBD server failed {command} of {length} bytes at offset {offset}: {errno}{}",
        if message.is_empty() { String::new() } else { format!(" ({message})") }
    )]
    Command {
        /// E.g. `NBD_CMD_READ`.
        command: String,
        /// E.g. `EIO`.
        errno: String,
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u64,
        /// The server's message (structured replies only).
        message: String,
    },
    /// The connection is gone (closed by the server, or abandoned after an error).
    #[error("NBD connection lost: {0}")]
    ConnectionLost(String),
    /// Block status was asked but not negotiated.
    #[error("the NBD server did not offer base:allocation block status")]
    NoBlockStatus,
    /// A multi-connection reader got no connection.
    #[error("no NBD connection could be opened: {0}")]
    NoConnection(String),
}

impl NbdError {
    /// True when retrying on a new connection may help (lost connections, timeouts,
    /// I/O errors), false for refusals and bad requests.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            NbdError::Connect { .. }
                | NbdError::Timeout { .. }
                | NbdError::Io { .. }
                | NbdError::ConnectionLost(_)
        )
    }
}

/// Whether and how to run TLS (STARTTLS).
#[derive(Clone)]
pub enum NbdTls {
    /// Plain TCP (networks with purpose `insecure_nbd`, or test servers).
    Off,
    /// STARTTLS required, accepting exactly the certificate in this PEM text (the
    /// `cert` field of `VDI.get_nbd_info`).
    PinnedPem(String),
    /// STARTTLS required with this configuration; `server_name` (e.g. the `subject`
    /// of `VDI.get_nbd_info`) defaults to the host of the address.
    Config {
        /// The rustls configuration.
        config: Arc<rustls::ClientConfig>,
        /// The TLS server name.
        server_name: Option<String>,
    },
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdTls::Off => f.write_str("Off"),
            NbdTls::PinnedPem(pem) => match tls::Fingerprint::of_pem(pem) {
                Ok(fp) => write!(f, "PinnedPem({fp})"),
                Err(_) => f.write_str("PinnedPem(<invalid PEM>)"),
            },
            NbdTls::Config { server_name, .. } => write!(f, "Config({server_name:?})"),
        }
    }
}

/// How the export is selected at the end of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportSelect {
    /// `NBD_OPT_EXPORT_NAME`: the only way xapi-nbd supports.
    ExportName,
    /// `NBD_OPT_GO` (qemu-nbd, nbdkit): refusals come with an error code.
    Go,
    /// `NBD_OPT_GO`, falling back to `NBD_OPT_EXPORT_NAME` on `NBD_REP_ERR_UNSUP`.
    Auto,
}

/// Everything needed to open one connection to an export.
#[derive(Clone)]
pub struct NbdOptions {
    /// `host:port` (IPv6 bracketed).
    pub address: String,
    /// The export name; a credential for xapi-nbd (never logged).
    pub export_name: String,
    /// TLS.
    pub tls: NbdTls,
    /// How to select the export.
    pub select: ExportSelect,
    /// Negotiate structured replies and `base:allocation` when the server offers them.
    pub structured_replies: bool,
    /// Limit for TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// Limit for one request's reply.
    pub io_timeout: Duration,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Largest single read request.
    pub max_request: u32,
}

impl std::fmt::Debug for NbdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdOptions")
            .field("address", &self.address)
            .field("export_name", &"<redacted>")
            .field("tls", &self.tls)
            .field("select", &self.select)
            .field("structured_replies", &self.structured_replies)
            .field("connect_timeout", &self.connect_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

impl NbdOptions {
    /// Plain TCP, `NBD_OPT_EXPORT_NAME`, structured replies tried, 60 s timeouts (as
    /// XO), 8 requests in flight, 32 MiB max request.
    pub fn new(address: impl Into<String>, export_name: impl Into<String>) -> NbdOptions {
        NbdOptions {
            address: address.into(),
            export_name: export_name.into(),
            tls: NbdTls::Off,
            select: ExportSelect::ExportName,
            structured_replies: true,
            connect_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(60),
            max_in_flight: 8,
            max_request: proto::MAX_READ_LEN,
        }
    }

    /// Options from one `vdi_nbd_server_info` record of `VDI.get_nbd_info`.
    ///
    /// TLS is required when `cert` is non-empty. Whether xapi-nbd actually uses TLS
    /// depends on the network purpose (`nbd` = TLS, `insecure_nbd` = none), not on
    /// the certificate, so a caller that knows the purpose is `insecure_nbd` should
    /// set `tls` to [`NbdTls::Off`] (docs/xapi-notes.md "NBD").
    pub fn from_nbd_info(address: &str, port: u16, exportname: &str, cert: &str) -> NbdOptions {
        let host = if address.contains(':') && !address.starts_with('[') {
            format!("[{address}]")
        } else {
            address.to_owned()
        };
        let mut options = NbdOptions::new(format!("{host}:{port}"), exportname);
        if !cert.trim().is_empty() {
            options.tls = NbdTls::PinnedPem(cert.to_owned());
        }
        options
    }
}

impl NbdOptions {
    /// Options from a `VDI.get_nbd_info` record (see [`NbdOptions::from_nbd_info`]).
    pub fn from_record(info: &crate::records::NbdInfo) -> Result<NbdOptions, NbdError> {
        let port = u16::try_from(info.port).map_err(|_| {
            NbdError::Violation(format!("VDI.get_nbd_info gave port {}", info.port))
        })?;
        Ok(NbdOptions::from_nbd_info(
            &info.address,
            port,
            &info.exportname,
            &info.cert,
        ))
    }
}

trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncIo for T {}
type BoxedIo = Box<dyn AsyncIo>;

fn io_err(during: &'static str) -> impl FnOnce(std::io::Error) -> NbdError {
    move |source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            NbdError::ConnectionLost(format!("the server closed the connection during {during}"))
        } else {
            NbdError::Io { during, source }
        }
    }
}

async fn read_array<const N: usize, S: AsyncRead + Unpin + ?Sized>(
    io: &mut S,
    during: &'static str,
) -> Result<[u8; N], NbdError> {
    let mut buf = [0u8; N];
    io.read_exact(&mut buf).await.map_err(io_err(during))?;
    Ok(buf)
}

async fn send_option<S: AsyncWrite + Unpin + ?Sized>(
    io: &mut S,
    option: u32,
    data: Vec<u8>,
) -> Result<(), NbdError> {
    let bytes = proto::OptionRequest { option, data }.encode();
    io.write_all(&bytes)
        .await
        .map_err(io_err("option request"))?;
    io.flush().await.map_err(io_err("option request"))
}

async fn read_option_reply<S: AsyncRead + Unpin + ?Sized>(
    io: &mut S,
    option: u32,
) -> Result<(proto::OptionReplyHeader, Vec<u8>), NbdError> {
    let header = proto::decode_option_reply_header(&read_array(io, "option reply").await?)?;
    if header.option != option {
        return Err(NbdError::Violation(format!(
            "reply to {} while {} was asked",
            proto::option_name(header.option),
            proto::option_name(option)
        )));
    }
    let mut payload = vec![0u8; header.len as usize];
    io.read_exact(&mut payload)
        .await
        .map_err(io_err("option reply"))?;
    Ok((header, payload))
}

fn refused(option: u32, header: &proto::OptionReplyHeader, payload: &[u8]) -> NbdError {
    let hint = match (option, header.reply) {
        (_, rep::ERR_TLS_REQD) => {
            "the server requires TLS (an XAPI network has purpose `nbd`): connect with the certificate from VDI.get_nbd_info"
        }
        (opt::STARTTLS, rep::ERR_POLICY) | (opt::STARTTLS, rep::ERR_UNSUP) => {
            "the server does not do TLS (an XAPI network has purpose `insecure_nbd`): connect without TLS"
        }
        (opt::GO, rep::ERR_UNSUP) => {
            "use NBD_OPT_EXPORT_NAME (xapi-nbd does not support NBD_OPT_GO)"
        }
        (_, rep::ERR_UNKNOWN) => "no such export: check the VDI and the session in the export name",
        _ => "",
    };
    NbdError::OptionRefused {
        option: proto::option_name(option),
        reply: proto::reply_type_name(header.reply),
        message: proto::decode_error_message(payload),
        hint,
    }
}

/// What the handshake settled.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    export: ExportInfo,
    structured: bool,
    allocation_context: Option<u32>,
}

async fn negotiate(
    io: &mut BoxedIo,
    options: &NbdOptions,
    no_zeroes: bool,
) -> Result<Negotiated, NbdError> {
    let mut structured = false;
    let mut allocation_context = None;
    if options.structured_replies {
        send_option(io, opt::STRUCTURED_REPLY, Vec::new()).await?;
        let (header, payload) = read_option_reply(io, opt::STRUCTURED_REPLY).await?;
        match header.reply {
            rep::ACK => structured = true,
            rep::ERR_TLS_REQD => return Err(refused(opt::STRUCTURED_REPLY, &header, &payload)),
            _ if header.is_error() => {
                tracing::debug!(reply = %proto::reply_type_name(header.reply), "NBD server has no structured replies")
            }
            other => {
                return Err(NbdError::Violation(format!(
                    "unexpected {} to NBD_OPT_STRUCTURED_REPLY",
                    proto::reply_type_name(other)
                )));
            }
        }
    }
    if structured {
        let request = proto::MetaContextRequest {
            export_name: options.export_name.clone(),
            queries: vec![proto::BASE_ALLOCATION.to_owned()],
        };
        send_option(io, opt::SET_META_CONTEXT, request.encode()).await?;
        loop {
            let (header, payload) = read_option_reply(io, opt::SET_META_CONTEXT).await?;
            match header.reply {
                rep::META_CONTEXT => {
                    let (id, name) = proto::decode_meta_context_reply(&payload)?;
                    if name == proto::BASE_ALLOCATION {
                        allocation_context = Some(id);
                    }
                }
                rep::ACK => break,
                _ if header.is_error() => break,
                other => {
                    return Err(NbdError::Violation(format!(
                        "unexpected {} to NBD_OPT_SET_META_CONTEXT",
                        proto::reply_type_name(other)
                    )));
                }
            }
        }
    }
    let export = match options.select {
        ExportSelect::ExportName => export_name(io, options, no_zeroes).await?,
        ExportSelect::Go | ExportSelect::Auto => match go(io, options).await {
            Ok(export) => export,
            Err(NbdError::OptionRefused { reply, .. })
                if options.select == ExportSelect::Auto
                    && reply == proto::reply_type_name(rep::ERR_UNSUP) =>
            {
                export_name(io, options, no_zeroes).await?
            }
            Err(e) => return Err(e),
        },
    };
    Ok(Negotiated {
        export,
        structured,
        allocation_context,
    })
}

async fn export_name(
    io: &mut BoxedIo,
    options: &NbdOptions,
    no_zeroes: bool,
) -> Result<ExportInfo, NbdError> {
    send_option(
        io,
        opt::EXPORT_NAME,
        options.export_name.as_bytes().to_vec(),
    )
    .await?;
    let mut head = [0u8; 10];
    if let Err(e) = io.read_exact(&mut head).await {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            NbdError::ExportRefused
        } else {
            NbdError::Io {
                during: "NBD_OPT_EXPORT_NAME reply",
                source: e,
            }
        });
    }
    if !no_zeroes {
        // xapi-nbd never offers NO_ZEROES: 124 padding bytes follow (xapi-notes "NBD").
        let mut pad = [0u8; proto::EXPORT_NAME_PADDING];
        io.read_exact(&mut pad)
            .await
            .map_err(io_err("NBD_OPT_EXPORT_NAME padding"))?;
    }
    Ok(proto::decode_export_name_reply(&head))
}

async fn go(io: &mut BoxedIo, options: &NbdOptions) -> Result<ExportInfo, NbdError> {
    let request = proto::GoRequest {
        name: options.export_name.clone(),
        info_requests: vec![proto::info::BLOCK_SIZE],
    };
    send_option(io, opt::GO, request.encode()).await?;
    let mut export = None;
    loop {
        let (header, payload) = read_option_reply(io, opt::GO).await?;
        match header.reply {
            rep::INFO => {
                if let proto::InfoReply::Export(info) = proto::decode_info_reply(&payload)? {
                    export = Some(info);
                }
            }
            rep::ACK => break,
            _ if header.is_error() => return Err(refused(opt::GO, &header, &payload)),
            other => {
                return Err(NbdError::Violation(format!(
                    "unexpected {} to NBD_OPT_GO",
                    proto::reply_type_name(other)
                )));
            }
        }
    }
    export.ok_or_else(|| {
        NbdError::Violation("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
    })
}

/// The result of one request, as the reader task delivers it.
enum Reply {
    Data(Vec<u8>),
    BlockStatus(Vec<BlockStatusExtent>),
}

/// A request waiting for its reply.
struct Pending {
    command: u16,
    offset: u64,
    length: u32,
    /// Read buffer (structured replies fill it chunk by chunk).
    buf: Vec<u8>,
    covered: u64,
    extents: Vec<BlockStatusExtent>,
    error: Option<NbdError>,
    reply: oneshot::Sender<Result<Reply, NbdError>>,
}

impl Pending {
    fn command_error(&self, error: u32, message: String) -> NbdError {
        NbdError::Command {
            command: proto::command_name(self.command),
            errno: proto::errno_name(error),
            offset: self.offset,
            length: u64::from(self.length),
            message,
        }
    }
}

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Why the connection cannot be used any more.
    dead: Mutex<Option<String>>,
}

impl Shared {
    fn kill(&self, reason: String) {
        if let Ok(mut dead) = self.dead.lock()
            && dead.is_none()
        {
            *dead = Some(reason.clone());
        }
        let drained: Vec<Pending> = match self.pending.lock() {
            Ok(mut map) => map.drain().map(|(_, p)| p).collect(),
            Err(_) => Vec::new(),
        };
        for p in drained {
            let _ = p.reply.send(Err(NbdError::ConnectionLost(reason.clone())));
        }
    }

    fn dead_reason(&self) -> Option<String> {
        self.dead.lock().ok().and_then(|d| d.clone())
    }

    fn take(&self, handle: u64) -> Option<Pending> {
        self.pending.lock().ok()?.remove(&handle)
    }

    fn put_back(&self, handle: u64, pending: Pending) {
        if let Ok(mut map) = self.pending.lock() {
            map.insert(handle, pending);
        }
    }
}

/// One open NBD connection in transmission phase. Requests may be issued
/// concurrently from several tasks (`&self`); they are pipelined on the socket.
pub struct NbdConnection {
    address: String,
    negotiated: Negotiated,
    writer: tokio::sync::Mutex<WriteHalf<BoxedIo>>,
    shared: Arc<Shared>,
    in_flight: Semaphore,
    next_handle: AtomicU64,
    reader: JoinHandle<()>,
    io_timeout: Duration,
    max_request: u32,
}

impl std::fmt::Debug for NbdConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdConnection")
            .field("address", &self.address)
            .field("export", &self.negotiated.export)
            .field("structured", &self.negotiated.structured)
            .finish()
    }
}

impl Drop for NbdConnection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl NbdConnection {
    /// Connects, negotiates and enters transmission.
    pub async fn connect(options: &NbdOptions) -> Result<NbdConnection, NbdError> {
        match tokio::time::timeout(options.connect_timeout, Self::connect_inner(options)).await {
            Ok(result) => result,
            Err(_) => Err(NbdError::Timeout {
                what: format!("connect and handshake with {}", options.address),
                after: options.connect_timeout,
            }),
        }
    }

    async fn connect_inner(options: &NbdOptions) -> Result<NbdConnection, NbdError> {
        let address = options.address.clone();
        let mut tcp = TcpStream::connect(&address)
            .await
            .map_err(|source| NbdError::Connect {
                address: address.clone(),
                source,
            })?;
        tcp.set_nodelay(true).map_err(io_err("socket setup"))?;
        let flags = proto::decode_greeting(&read_array(&mut tcp, "greeting").await?)?;
        let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
        let client_flags = proto::CLIENT_FIXED_NEWSTYLE
            | if no_zeroes {
                proto::CLIENT_NO_ZEROES
            } else {
                0
            };
        tcp.write_all(&client_flags.to_be_bytes())
            .await
            .map_err(io_err("client flags"))?;

        let tls = match &options.tls {
            NbdTls::Off => None,
            NbdTls::PinnedPem(pem) => Some((
                Arc::new(tls::pinned_pem_config(pem)?),
                tls::server_name_of(&address)?,
            )),
            NbdTls::Config {
                config,
                server_name,
            } => {
                let name = match server_name {
                    Some(name) => tls::server_name_of(name)?,
                    None => tls::server_name_of(&address)?,
                };
                Some((config.clone(), name))
            }
        };
        let mut io: BoxedIo = match tls {
            None => Box::new(tcp),
            Some((config, server_name)) => {
                send_option(&mut tcp, opt::STARTTLS, Vec::new()).await?;
                let (header, payload) = read_option_reply(&mut tcp, opt::STARTTLS).await?;
                if header.reply != rep::ACK {
                    return Err(refused(opt::STARTTLS, &header, &payload));
                }
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(server_name, tcp)
                    .await
                    .map_err(|source| NbdError::TlsHandshake {
                        address: address.clone(),
                        source,
                    })?;
                Box::new(stream)
            }
        };
        let negotiated = negotiate(&mut io, options, no_zeroes).await?;
        tracing::debug!(
            address = %address,
            size = negotiated.export.size,
            flags = negotiated.export.flags,
            structured = negotiated.structured,
            block_status = negotiated.allocation_context.is_some(),
            "NBD connection ready"
        );
        let (read_half, write_half) = tokio::io::split(io);
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(reader_task(read_half, shared.clone(), negotiated));
        Ok(NbdConnection {
            address,
            negotiated,
            writer: tokio::sync::Mutex::new(write_half),
            shared,
            in_flight: Semaphore::new(options.max_in_flight.max(1)),
            next_handle: AtomicU64::new(1),
            reader,
            io_timeout: options.io_timeout,
            max_request: options.max_request.clamp(512, proto::MAX_READ_LEN),
        })
    }

    /// Size and flags of the export.
    pub fn export(&self) -> ExportInfo {
        self.negotiated.export
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.negotiated.export.size
    }

    /// True when structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.negotiated.structured
    }

    /// True when `base:allocation` block status is available.
    pub fn has_block_status(&self) -> bool {
        self.negotiated.allocation_context.is_some()
    }

    /// The largest read one request may ask.
    pub fn max_request(&self) -> u32 {
        self.max_request
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), NbdError> {
        let size = self.size();
        let end = offset.checked_add(length);
        if end.is_none_or(|end| end > size) {
            return Err(NbdError::OutOfRange {
                offset,
                length,
                size,
            });
        }
        let end_ok = end.is_some_and(|end| end.is_multiple_of(NBD_ALIGNMENT) || end == size);
        if !offset.is_multiple_of(NBD_ALIGNMENT) || !end_ok {
            return Err(NbdError::Unaligned { offset, length });
        }
        if length > u64::from(self.max_request) {
            return Err(NbdError::TooLarge {
                length,
                max: u64::from(self.max_request),
            });
        }
        Ok(())
    }

    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<Reply, NbdError> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| NbdError::ConnectionLost("connection closed".into()))?;
        if let Some(reason) = self.shared.dead_reason() {
            return Err(NbdError::ConnectionLost(reason));
        }
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let buf = if command == cmd::READ {
            // Filled by the reply: a simple one reads into the spare capacity
            // (no zeroing first), a structured one zero-fills it first.
            Vec::with_capacity(length as usize)
        } else {
            Vec::new()
        };
        self.shared.put_back(
            handle,
            Pending {
                command,
                offset,
                length,
                buf,
                covered: 0,
                extents: Vec::new(),
                error: None,
                reply: tx,
            },
        );
        let header = proto::Request {
            flags,
            command,
            handle,
            offset,
            length,
        }
        .encode();
        let write = async {
            let mut writer = self.writer.lock().await;
            writer.write_all(&header).await?;
            writer.flush().await
        };
        match tokio::time::timeout(self.io_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let err = io_err("request")(e);
                self.shared.kill(err.to_string());
                return Err(err);
            }
            Err(_) => {
                self.shared
                    .kill("a request could not be sent in time".into());
                return Err(self.timeout_error(command, offset, length));
            }
        }
        match tokio::time::timeout(self.io_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NbdError::ConnectionLost(
                self.shared
                    .dead_reason()
                    .unwrap_or_else(|| "reply channel closed".into()),
            )),
            Err(_) => {
                // The reply may still come; the stream is out of step for us, so the
                // connection is abandoned.
                self.shared.take(handle);
                self.shared
                    .kill("an earlier request timed out; connection abandoned".into());
                Err(self.timeout_error(command, offset, length))
            }
        }
    }

    fn timeout_error(&self, command: u16, offset: u64, length: u32) -> NbdError {
        NbdError::Timeout {
            what: format!(
                "{} of {length} bytes at offset {offset} on {}",
                proto::command_name(command),
                self.address
            ),
            after: self.io_timeout,
        }
    }

    /// Reads `length` bytes at `offset`; both must be multiples of 512 (the end may
    /// also be the export's end) and `length` at most [`Self::max_request`].
    pub async fn read(&self, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        self.check_range(offset, u64::from(length))?;
        if length == 0 {
            return Ok(Vec::new());
        }
        match self.request(cmd::READ, 0, offset, length).await? {
            Reply::Data(data) => Ok(data),
            Reply::BlockStatus(_) => {
                Err(NbdError::Violation("block status answer to a read".into()))
            }
        }
    }

    /// `base:allocation` status from `offset`, as `(offset, length, flags)` runs
    /// clipped to the asked range; the server may describe less than asked, never
    /// nothing.
    pub async fn block_status(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Vec<(u64, u64, u32)>, NbdError> {
        if !self.has_block_status() {
            return Err(NbdError::NoBlockStatus);
        }
        let end = offset.saturating_add(u64::from(length));
        if end > self.size() {
            return Err(NbdError::OutOfRange {
                offset,
                length: u64::from(length),
                size: self.size(),
            });
        }
        if length == 0 {
            return Ok(Vec::new());
        }
        let extents = match self.request(cmd::BLOCK_STATUS, 0, offset, length).await? {
            Reply::BlockStatus(extents) => extents,
            Reply::Data(_) => {
                return Err(NbdError::Violation("data answer to block status".into()));
            }
        };
        let mut runs = Vec::with_capacity(extents.len());
        let mut at = offset;
        for e in extents {
            if at >= end {
                break;
            }
            if e.length == 0 {
                return Err(NbdError::Violation(
                    "zero-length block status extent".into(),
                ));
            }
            let len = u64::from(e.length).min(end - at);
            runs.push((at, len, e.flags));
            at += len;
        }
        if runs.is_empty() {
            return Err(NbdError::Violation("empty block status reply".into()));
        }
        Ok(runs)
    }

    /// Reads `range` as extents: when block status is available, runs that read as
    /// zeros become `Zero` extents and only the rest is read (rounded out to 512
    /// bytes); otherwise the whole range is read as `Data`.
    pub async fn read_extents(&self, range: Range<u64>) -> Result<Vec<Extent>, NbdError> {
        let length = range.end.saturating_sub(range.start);
        self.check_range(range.start, length)?;
        let len32 = u32::try_from(length).map_err(|_| NbdError::TooLarge {
            length,
            max: u64::from(self.max_request),
        })?;
        if !self.has_block_status() || length == 0 {
            return Ok(vec![Extent::data(
                range.start,
                self.read(range.start, len32).await?,
            )]);
        }
        // Data runs of the range (zero runs are the gaps), aligned outward.
        let mut data_runs: Vec<Range<u64>> = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let runs = self.block_status(at, (range.end - at) as u32).await?;
            for (offset, len, flags) in runs {
                if flags & alloc::ZERO == 0 {
                    let start = offset / NBD_ALIGNMENT * NBD_ALIGNMENT;
                    let end = (offset + len)
                        .next_multiple_of(NBD_ALIGNMENT)
                        .min(range.end);
                    match data_runs.last_mut() {
                        Some(last) if last.end >= start => last.end = last.end.max(end),
                        _ => data_runs.push(start.max(range.start)..end),
                    }
                }
                at = offset + len;
            }
        }
        let mut extents = Vec::new();
        let mut at = range.start;
        for run in data_runs {
            if run.start > at {
                extents.push(Extent::zero(at, run.start - at));
            }
            let bytes = self.read(run.start, (run.end - run.start) as u32).await?;
            extents.push(Extent::data(run.start, bytes));
            at = run.end;
        }
        if at < range.end {
            extents.push(Extent::zero(at, range.end - at));
        }
        Ok(extents)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection (xapi-nbd then unplugs its
    /// dom0 VBD).
    pub async fn disconnect(self) -> Result<(), NbdError> {
        let header = proto::Request {
            flags: 0,
            command: cmd::DISC,
            handle: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        let mut writer = self.writer.lock().await;
        let result = async {
            writer.write_all(&header).await?;
            writer.flush().await?;
            writer.shutdown().await
        };
        let outcome = tokio::time::timeout(self.io_timeout, result).await;
        drop(writer);
        self.shared.kill("disconnected".into());
        match outcome {
            Ok(Ok(())) => Ok(()),
            // The server may close first; a disconnect that cannot be sent is harmless.
            Ok(Err(_)) | Err(_) => Ok(()),
        }
    }
}

/// Upper bound on a structured chunk that is not read data.
const MAX_METADATA_CHUNK: u32 = 16 * 1024 * 1024;

async fn reader_task(mut io: ReadHalf<BoxedIo>, shared: Arc<Shared>, negotiated: Negotiated) {
    let reason = match read_replies(&mut io, &shared, negotiated).await {
        Ok(()) => "the server closed the connection".to_owned(),
        Err(e) => e.to_string(),
    };
    shared.kill(reason);
}

async fn read_replies(
    io: &mut ReadHalf<BoxedIo>,
    shared: &Shared,
    negotiated: Negotiated,
) -> Result<(), NbdError> {
    loop {
        let mut magic = [0u8; 4];
        match io.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_err("reply")(e)),
        }
        match proto::reply_kind(magic)? {
            proto::ReplyKind::Simple => {
                let reply = proto::decode_simple_reply_rest(&read_array(io, "reply").await?);
                let Some(mut pending) = shared.take(reply.handle) else {
                    return Err(NbdError::Violation(format!(
                        "simple reply for unknown handle {}",
                        reply.handle
                    )));
                };
                let result = if reply.error != 0 {
                    Err(pending.command_error(reply.error, String::new()))
                } else if pending.command == cmd::READ {
                    read_exact_into(io, &mut pending.buf, pending.length as usize)
                        .await
                        .map_err(io_err("read reply data"))?;
                    Ok(Reply::Data(std::mem::take(&mut pending.buf)))
                } else {
                    Err(NbdError::Violation(format!(
                        "simple reply to {}",
                        proto::command_name(pending.command)
                    )))
                };
                let _ = pending.reply.send(result);
            }
            proto::ReplyKind::Structured => {
                if !negotiated.structured {
                    return Err(NbdError::Violation(
                        "structured reply without negotiation".into(),
                    ));
                }
                let header = proto::decode_structured_reply_rest(&read_array(io, "reply").await?);
                let Some(mut pending) = shared.take(header.handle) else {
                    return Err(NbdError::Violation(format!(
                        "structured reply for unknown handle {}",
                        header.handle
                    )));
                };
                read_chunk(io, &mut pending, header, negotiated).await?;
                if header.is_done() {
                    let result = match pending.error.take() {
                        Some(e) => Err(e),
                        None if pending.command == cmd::READ => {
                            if pending.covered != u64::from(pending.length) {
                                Err(NbdError::Violation(format!(
                                    "structured read reply covered {} of {} bytes",
                                    pending.covered, pending.length
                                )))
                            } else {
                                Ok(Reply::Data(std::mem::take(&mut pending.buf)))
                            }
                        }
                        None => Ok(Reply::BlockStatus(std::mem::take(&mut pending.extents))),
                    };
                    let _ = pending.reply.send(result);
                } else {
                    shared.put_back(header.handle, pending);
                }
            }
        }
    }
}

async fn read_payload(io: &mut ReadHalf<BoxedIo>, length: u32) -> Result<Vec<u8>, NbdError> {
    if length > MAX_METADATA_CHUNK {
        return Err(ProtoError::TooLong {
            what: "structured reply chunk",
            len: u64::from(length),
            limit: u64::from(MAX_METADATA_CHUNK),
        }
        .into());
    }
    let mut payload = vec![0u8; length as usize];
    io.read_exact(&mut payload)
        .await
        .map_err(io_err("structured reply"))?;
    Ok(payload)
}

/// Reads exactly `len` bytes into `buf` (cleared first), straight into its
/// spare capacity: the buffer is not zero-filled before being overwritten.
async fn read_exact_into<S: AsyncRead + Unpin + ?Sized>(
    io: &mut S,
    buf: &mut Vec<u8>,
    len: usize,
) -> std::io::Result<()> {
    buf.clear();
    buf.reserve_exact(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        if (&mut *io).take(want).read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

async fn read_chunk(
    io: &mut ReadHalf<BoxedIo>,
    pending: &mut Pending,
    header: proto::StructuredReply,
    negotiated: Negotiated,
) -> Result<(), NbdError> {
    if pending.command == cmd::READ && pending.buf.len() < pending.length as usize {
        // Chunks fill it piece by piece, at any offset.
        pending.buf.resize(pending.length as usize, 0);
    }
    match header.kind {
        chunk::NONE => {
            if header.length != 0 {
                return Err(NbdError::Violation("NONE chunk with a payload".into()));
            }
        }
        chunk::OFFSET_DATA => {
            if pending.command != cmd::READ || header.length < 8 {
                return Err(NbdError::Violation("misplaced or short data chunk".into()));
            }
            let offset = u64::from_be_bytes(read_array(io, "data chunk").await?);
            let len = u64::from(header.length - 8);
            let start = offset.checked_sub(pending.offset);
            let within = start.filter(|s| s + len <= u64::from(pending.length));
            let Some(start) = within else {
                return Err(NbdError::Violation(format!(
                    "data chunk at {offset}+{len} outside the read at {}+{}",
                    pending.offset, pending.length
                )));
            };
            let slice = &mut pending.buf[start as usize..(start + len) as usize];
            io.read_exact(slice).await.map_err(io_err("data chunk"))?;
            pending.covered += len;
        }
        chunk::OFFSET_HOLE => {
            let payload = read_payload(io, header.length).await?;
            let (offset, len) = proto::decode_offset_hole(&payload)?;
            let len = u64::from(len);
            let within = offset
                .checked_sub(pending.offset)
                .filter(|s| s + len <= u64::from(pending.length));
            let Some(start) = within.filter(|_| pending.command == cmd::READ) else {
                return Err(NbdError::Violation(format!(
                    "hole chunk at {offset}+{len} outside the read"
                )));
            };
            pending.buf[start as usize..(start + len) as usize].fill(0);
            pending.covered += len;
        }
        chunk::BLOCK_STATUS => {
            let payload = read_payload(io, header.length).await?;
            let (id, extents) = proto::decode_block_status(&payload)?;
            if pending.command != cmd::BLOCK_STATUS {
                return Err(NbdError::Violation("block status chunk for a read".into()));
            }
            if Some(id) == negotiated.allocation_context {
                pending.extents = extents;
            }
        }
        kind if kind & chunk::ERROR_BIT != 0 => {
            let payload = read_payload(io, header.length).await?;
            let error = proto::decode_error_chunk(kind, &payload)?;
            if pending.error.is_none() {
                pending.error = Some(pending.command_error(error.error, error.message));
            }
        }
        other => {
            return Err(NbdError::Violation(format!(
                "unknown structured reply type {other}"
            )));
        }
    }
    Ok(())
}

/// One connection position of a multi-connection reader; a dead connection is
/// replaced in place.
#[derive(Debug)]
struct Slot {
    current: Mutex<Arc<NbdConnection>>,
    reconnecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(connection: Arc<NbdConnection>) -> Slot {
        Slot {
            current: Mutex::new(connection),
            reconnecting: tokio::sync::Mutex::new(()),
        }
    }

    fn get(&self) -> Option<Arc<NbdConnection>> {
        self.current.lock().ok().map(|c| c.clone())
    }

    /// Replaces `dead` by a new connection, unless another task already did.
    async fn replace(&self, dead: &Arc<NbdConnection>, retry: &RetryPolicy) {
        let Some(options) = &retry.reconnect else {
            return;
        };
        let _guard = self.reconnecting.lock().await;
        if self.get().is_some_and(|c| !Arc::ptr_eq(&c, dead)) {
            return;
        }
        tokio::time::sleep(retry.delay).await;
        match NbdConnection::connect(options).await {
            Ok(fresh) => {
                if let Ok(mut current) = self.current.lock() {
                    *current = Arc::new(fresh);
                }
                tracing::info!(address = %options.address, "NBD connection re-established");
            }
            Err(e) => {
                tracing::warn!(address = %options.address, error = %e, "NBD reconnection failed");
            }
        }
    }
}

/// How a multi-connection reader retries pieces.
#[derive(Debug, Clone)]
struct RetryPolicy {
    /// Options to open replacement connections with (none: no reconnection).
    reconnect: Option<NbdOptions>,
    /// Tries per piece (at least one per connection).
    attempts: usize,
    /// Wait before reconnecting.
    delay: Duration,
}

/// Reads one piece on slot `first % n`. On a transient failure (lost connection,
/// timeout) the dead connection is replaced and the piece is tried again on the
/// next slot, up to the policy's number of attempts (XO: 5 tries, 1 s apart).
async fn read_piece(
    slots: &[Slot],
    retry: &RetryPolicy,
    first: usize,
    range: Range<u64>,
) -> Result<Vec<Extent>, NbdError> {
    let n = slots.len();
    let mut last_error = NbdError::NoConnection("reader has no connection".into());
    for attempt in 0..retry.attempts.max(n) {
        let Some(slot) = slots.get((first + attempt) % n.max(1)) else {
            break;
        };
        let Some(connection) = slot.get() else {
            continue;
        };
        match connection.read_extents(range.clone()).await {
            Ok(extents) => return Ok(extents),
            Err(e) if e.is_transient() => {
                tracing::warn!(
                    address = %connection.address,
                    offset = range.start,
                    attempt,
                    error = %e,
                    "NBD read failed; retrying"
                );
                last_error = e;
                slot.replace(&connection, retry).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_error)
}

/// Several connections to one export; reads are spread over them, and a piece
/// whose connection dies is read again on another (reconnected) connection.
#[derive(Debug, Clone)]
pub struct NbdMultiReader {
    slots: Arc<Vec<Slot>>,
    retry: Arc<RetryPolicy>,
    in_flight_per_connection: usize,
    piece: u64,
}

impl NbdMultiReader {
    /// Opens `count` connections one after the other (XO does the same to avoid
    /// races in xapi; xapi-nbd allows [`XAPI_NBD_MAX_CONNECTIONS`] per host).
    /// Connections that fail are skipped as long as one succeeds; dead connections
    /// are later re-opened with the same options.
    pub async fn connect(options: &NbdOptions, count: usize) -> Result<NbdMultiReader, NbdError> {
        let count = count.max(1);
        let mut connections = Vec::with_capacity(count);
        let mut last_error = None;
        for _ in 0..count {
            match NbdConnection::connect(options).await {
                Ok(c) => connections.push(Arc::new(c)),
                Err(e) => {
                    tracing::warn!(address = %options.address, error = %e, "NBD connection failed");
                    if !e.is_transient() && connections.is_empty() {
                        return Err(e);
                    }
                    last_error = Some(e);
                }
            }
        }
        if connections.is_empty() {
            return Err(NbdError::NoConnection(
                last_error.map(|e| e.to_string()).unwrap_or_default(),
            ));
        }
        let mut reader = NbdMultiReader::from_connections(connections, options.max_in_flight);
        reader.retry = Arc::new(RetryPolicy {
            reconnect: Some(options.clone()),
            attempts: 5,
            delay: Duration::from_secs(1),
        });
        Ok(reader)
    }

    /// Wraps open connections to the same export (failed pieces move to another
    /// connection; no reconnection).
    pub fn from_connections(
        connections: Vec<Arc<NbdConnection>>,
        in_flight_per_connection: usize,
    ) -> NbdMultiReader {
        NbdMultiReader {
            slots: Arc::new(connections.into_iter().map(Slot::new).collect()),
            retry: Arc::new(RetryPolicy {
                reconnect: None,
                attempts: 1,
                delay: Duration::ZERO,
            }),
            in_flight_per_connection: in_flight_per_connection.max(1),
            piece: DEFAULT_READ_PIECE,
        }
    }

    /// Sets the size of one read request (rounded to 512 bytes, at least 512).
    pub fn with_piece_size(mut self, piece: u64) -> NbdMultiReader {
        self.piece = piece.next_multiple_of(NBD_ALIGNMENT).max(NBD_ALIGNMENT);
        self
    }

    /// Sets the tries per piece and the wait before a reconnection (default 5 and
    /// 1 s, as XO).
    pub fn with_retries(mut self, attempts: usize, delay: Duration) -> NbdMultiReader {
        let mut retry = (*self.retry).clone();
        retry.attempts = attempts.max(1);
        retry.delay = delay;
        self.retry = Arc::new(retry);
        self
    }

    /// Number of connections.
    pub fn connection_count(&self) -> usize {
        self.slots.len()
    }

    /// Size of the export.
    pub fn size(&self) -> u64 {
        self.slots
            .first()
            .and_then(Slot::get)
            .map_or(0, |c| c.size())
    }

    /// Reads the given byte ranges and yields extents in offset order.
    ///
    /// Ranges are sorted and merged first; each is cut into pieces of the piece size
    /// and the pieces are read round-robin over the connections, with at most
    /// `connections × in-flight` pieces buffered, so memory stays bounded whatever
    /// the disk size. Ranges must be 512-aligned (the end of the export excepted).
    pub fn read_ranges(
        &self,
        ranges: impl IntoIterator<Item = Range<u64>>,
    ) -> BoxStream<'static, Result<Extent, NbdError>> {
        let mut ranges: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.end > r.start).collect();
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let max_request = self
            .slots
            .iter()
            .filter_map(Slot::get)
            .map(|c| c.max_request())
            .min()
            .unwrap_or(proto::MAX_READ_LEN);
        let piece = self.piece.min(u64::from(max_request));
        let pieces = merged.into_iter().flat_map(move |r| {
            let mut start = r.start;
            std::iter::from_fn(move || {
                (start < r.end).then(|| {
                    let end = (start + piece).min(r.end);
                    let p = start..end;
                    start = end;
                    p
                })
            })
        });
        let slots = self.slots.clone();
        let retry = self.retry.clone();
        let depth = slots.len() * self.in_flight_per_connection;
        let next = Arc::new(AtomicUsize::new(0));
        stream::iter(pieces)
            .map(move |range| {
                let first = next.fetch_add(1, Ordering::Relaxed);
                let slots = slots.clone();
                let retry = retry.clone();
                async move { read_piece(&slots, &retry, first, range).await }
            })
            .buffered(depth.max(1))
            .flat_map(|result| match result {
                Ok(extents) => stream::iter(extents.into_iter().map(Ok).collect::<Vec<_>>()),
                Err(e) => stream::iter(vec![Err(e)]),
            })
            .boxed()
    }

    /// Disconnects every connection (streams from [`Self::read_ranges`] should be
    /// dropped first; connections they still hold close when they are dropped).
    pub async fn disconnect(self) {
        if let Ok(slots) = Arc::try_unwrap(self.slots) {
            for slot in slots {
                if let Ok(current) = slot.current.into_inner()
                    && let Ok(c) = Arc::try_unwrap(current)
                {
                    let _ = c.disconnect().await;
                }
            }
        }
    }
}
