//! The NBD server of one simulated host, behaving like xapi-nbd: fixed newstyle only,
//! `NBD_OPT_EXPORT_NAME` = `/<vdi-uuid>?session_id=<ref>`, TLS decided by the pool's
//! network purposes, read-only exports with simple replies and 512-byte alignment, a dom0
//! VBD plugged while a client is connected, at most 16 connections.
//!
//! The wire codec is `xenvault_xapi::nbd::proto` (shared with the client). Behaviour and
//! sources: docs/xapi-notes.md "Simulator data plane" and xapi-facts §6.1
//! (xen-api: ocaml/nbd/src/main.ml; nbd: lib/server.ml).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use xenvault_xapi::nbd::proto;

use crate::db::Fields;
use crate::faults::StreamFault;
use crate::handlers::Dom0Vbd;
use crate::http::Conn;
use crate::pool::Pool;

/// xapi-nbd's `connection_limit` (xen-api: ocaml/nbd/src/main.ml).
pub const MAX_CONNECTIONS: usize = 16;

/// Largest read served in one request (the NBD protocol lets servers refuse more than
/// 32 MiB; xapi-nbd's clients read 2 MiB at a time).
pub const MAX_READ: u32 = 32 * 1024 * 1024;

/// Reads and writes must be multiples of this (xapi-nbd answers `EINVAL` otherwise).
pub const ALIGNMENT: u64 = 512;

/// How a connection must be secured, from the network purposes of the whole pool
/// (xen-api: ocaml/nbd/src/main.ml `xapi_says_use_tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdTlsMode {
    /// A network has purpose `nbd`: STARTTLS first, everything else is refused.
    Required,
    /// A network has purpose `insecure_nbd`: plain only, STARTTLS is refused.
    Forbidden,
    /// Both purposes or none: no NBD service.
    Refuse,
}

/// The TLS mode the pool's networks ask for now.
pub fn tls_mode(pool: &Pool) -> NbdTlsMode {
    let db = pool.db();
    let mut secure = false;
    let mut insecure = false;
    for (_, net) in db.rows("network") {
        for p in net.strs_of("purpose") {
            match p.as_str() {
                "nbd" => secure = true,
                "insecure_nbd" => insecure = true,
                _ => {}
            }
        }
    }
    match (secure, insecure) {
        (true, false) => NbdTlsMode::Required,
        (false, true) => NbdTlsMode::Forbidden,
        _ => NbdTlsMode::Refuse,
    }
}

/// Serves NBD for `host` (a host ref) on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    host: String,
    pool: Arc<Pool>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("NBD accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            // xapi-nbd drops the connection ("Server busy").
            tracing::info!("NBD: refusing {peer}: {MAX_CONNECTIONS} connections already");
            pool.stats.add("nbd/refused_busy", 1);
            drop(tcp);
            continue;
        }
        let pool = pool.clone();
        let host = host.clone();
        let active = active.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let conn = Connection {
                pool: pool.clone(),
                host,
                export: None,
            };
            tokio::select! {
                r = conn.run(Conn::plain(tcp)) => {
                    if let Err(e) = r {
                        tracing::debug!("NBD connection from {peer}: {e}");
                    }
                }
                _ = shutdown.changed() => {}
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// The export a connection opened, and the dom0 VBD that stands for it.
struct OpenExport {
    vdi_uuid: String,
    size: u64,
    /// Unplugged and destroyed when the connection ends (dropped with it).
    _vbd: Dom0Vbd,
}

struct Connection {
    pool: Arc<Pool>,
    host: String,
    export: Option<OpenExport>,
}

fn proto_err(e: proto::ProtoError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Connection {
    async fn run(mut self, stream: Conn) -> io::Result<()> {
        let mode = tls_mode(&self.pool);
        if mode == NbdTlsMode::Refuse {
            // xapi-nbd: both purposes or neither → no service.
            tracing::info!("NBD: refusing a connection: no network has exactly one NBD purpose");
            self.pool.stats.add("nbd/refused_purpose", 1);
            return Ok(());
        }
        self.pool.stats.add("nbd/connections", 1);
        let pool = self.pool.clone();
        let _open = pool.stats.open("nbd/open");
        let mut s = stream;
        // Fixed newstyle only, no NO_ZEROES (so 124 bytes of padding always follow).
        s.write_all(&proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE))
            .await?;
        s.flush().await?;
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).await?;
        let client_flags = u32::from_be_bytes(flags);
        if client_flags & proto::CLIENT_FIXED_NEWSTYLE == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "client does not speak fixed newstyle",
            ));
        }
        let mut tls_done = false;
        loop {
            let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
            s.read_exact(&mut hdr).await?;
            let (option, len) = proto::decode_option_header(&hdr).map_err(proto_err)?;
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await?;
            let reply = |r: u32, msg: &str| proto::encode_option_reply(option, r, msg.as_bytes());
            if mode == NbdTlsMode::Required && !tls_done {
                match option {
                    proto::opt::STARTTLS => {
                        s.write_all(&reply(proto::rep::ACK, "")).await?;
                        s.flush().await?;
                        let acceptor =
                            tokio_rustls::TlsAcceptor::from(self.pool.tls.server_config.clone());
                        let tls = acceptor.accept(s).await?;
                        s = Conn::new(Box::new(tls));
                        tls_done = true;
                    }
                    proto::opt::EXPORT_NAME | proto::opt::ABORT => {
                        // EXPORT_NAME cannot carry an error: xapi-nbd closes.
                        return Ok(());
                    }
                    _ => {
                        s.write_all(&reply(proto::rep::ERR_TLS_REQD, "TLS is required"))
                            .await?;
                    }
                }
                s.flush().await?;
                continue;
            }
            match option {
                proto::opt::EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(export) = self.open_export(&name) else {
                        return Ok(());
                    };
                    let info = proto::ExportInfo {
                        size: export.size,
                        flags: proto::tflag::HAS_FLAGS | proto::tflag::READ_ONLY,
                    };
                    self.export = Some(export);
                    s.write_all(&proto::encode_export_name_reply(info, false))
                        .await?;
                    s.flush().await?;
                    return self.transmission(s).await;
                }
                proto::opt::ABORT => return Ok(()),
                proto::opt::STARTTLS => {
                    let r = if tls_done {
                        proto::rep::ERR_INVALID
                    } else {
                        proto::rep::ERR_POLICY
                    };
                    s.write_all(&reply(r, "TLS is not available on this server"))
                        .await?;
                }
                proto::opt::LIST => {
                    s.write_all(&reply(proto::rep::ERR_POLICY, "listing is not allowed"))
                        .await?;
                }
                _ => {
                    s.write_all(&reply(proto::rep::ERR_UNSUP, "unsupported option"))
                        .await?;
                }
            }
            s.flush().await?;
        }
    }

    /// Validates `/<vdi-uuid>?session_id=<ref>` and plugs a RO dom0 VBD for it.
    fn open_export(&mut self, name: &str) -> Option<OpenExport> {
        let name = name.strip_prefix('/').unwrap_or(name);
        let (uuid, query) = name.split_once('?').unwrap_or((name, ""));
        let session = crate::http::parse_query(query)
            .into_iter()
            .find(|(k, _)| k == "session_id")
            .map(|(_, v)| v);
        let Some(session) = session else {
            tracing::info!("NBD: export name without session_id");
            return None;
        };
        if self.pool.check_session(&session).is_err() {
            tracing::info!("NBD: export name with an invalid session");
            return None;
        }
        let size = match self.pool.disks.info(uuid) {
            Ok(i) if i.has_data => i.size,
            _ => {
                tracing::info!("NBD: no readable VDI {uuid}");
                return None;
            }
        };
        let vdi = self.pool.db().find_by_uuid("VDI", uuid)?;
        let vbd = Dom0Vbd::plug(&self.pool, &self.host, &vdi, "RO", "xapi-nbd");
        Some(OpenExport {
            vdi_uuid: uuid.to_string(),
            size,
            _vbd: vbd,
        })
    }

    /// Counts one served read of `len` bytes (for `/_sim/stats`).
    fn count_read(&self, len: u64, reads_key: &str, bytes_key: &str) {
        self.pool.stats.add("nbd/reads", 1);
        self.pool.stats.add("nbd/bytes", len);
        self.pool.stats.add("bytes/nbd", len);
        self.pool.stats.add(reads_key, 1);
        self.pool.stats.add(bytes_key, len);
    }

    async fn transmission(&mut self, mut s: Conn) -> io::Result<()> {
        let Some(export) = self.export.as_ref() else {
            return Ok(());
        };
        let uuid = export.vdi_uuid.clone();
        let size = export.size;
        let fault: StreamFault = self.pool.faults.stream("nbd");
        let started = Instant::now();
        let mut served: u64 = 0;
        let mut reply_buf: Vec<u8> = Vec::new();
        let (reads_key, bytes_key) = (format!("nbd_reads/{uuid}"), format!("nbd_bytes/{uuid}"));
        loop {
            let mut hdr = [0u8; proto::REQUEST_LEN];
            s.read_exact(&mut hdr).await?;
            let req = proto::Request::decode(&hdr).map_err(proto_err)?;
            match req.command {
                proto::cmd::READ => {
                    let (off, len) = (req.offset, u64::from(req.length));
                    let bad = off % ALIGNMENT != 0
                        || len % ALIGNMENT != 0
                        || req.length > MAX_READ
                        || off.checked_add(len).is_none_or(|e| e > size);
                    if bad {
                        s.write_all(&proto::encode_simple_reply(
                            proto::errno::EINVAL,
                            req.handle,
                        ))
                        .await?;
                        s.flush().await?;
                        continue;
                    }
                    // Plain TCP without stream faults: the reply header, then the layer
                    // files' ranges straight from the page cache (`sendfile`), holes as
                    // zeros; nothing is copied through user space.
                    if fault.cut_after.is_none()
                        && fault.bytes_per_sec.is_none()
                        && s.can_send_file()
                    {
                        let runs = match self.pool.disks.read_plan(&uuid, off, len) {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::warn!("NBD read of {uuid} failed: {e}");
                                s.write_all(&proto::encode_simple_reply(
                                    proto::errno::EIO,
                                    req.handle,
                                ))
                                .await?;
                                s.flush().await?;
                                continue;
                            }
                        };
                        s.write_all(&proto::encode_simple_reply(0, req.handle))
                            .await?;
                        for run in runs {
                            match &run.file {
                                Some(file) => s.send_file_range(file, run.offset, run.len).await?,
                                None => s.write_zeros(run.len).await?,
                            }
                        }
                        s.flush().await?;
                        served += len;
                        self.count_read(len, &reads_key, &bytes_key);
                        continue;
                    }
                    // One buffer per connection, reused: the reply header and the data
                    // go out in a single write.
                    let mut buf = std::mem::take(&mut reply_buf);
                    buf.resize(proto::SIMPLE_REPLY_LEN + len as usize, 0);
                    let disks = self.pool.disks.clone();
                    let id = uuid.clone();
                    let (buf, read) = tokio::task::spawn_blocking(move || {
                        let r = disks.read_at(&id, off, &mut buf[proto::SIMPLE_REPLY_LEN..]);
                        (buf, r)
                    })
                    .await
                    .map_err(io::Error::other)?;
                    let mut buf = buf;
                    if let Err(e) = read {
                        // xapi-nbd drops the connection on a read error mid-reply; before
                        // any data an error reply is fine.
                        tracing::warn!("NBD read of {uuid} failed: {e}");
                        s.write_all(&proto::encode_simple_reply(proto::errno::EIO, req.handle))
                            .await?;
                        s.flush().await?;
                        reply_buf = buf;
                        continue;
                    }
                    buf[..proto::SIMPLE_REPLY_LEN]
                        .copy_from_slice(&proto::encode_simple_reply(0, req.handle));
                    if let Some(cut) = fault.cut_after
                        && served + len > cut
                    {
                        let keep = cut.saturating_sub(served) as usize;
                        s.write_all(&buf[..proto::SIMPLE_REPLY_LEN + keep]).await?;
                        s.flush().await?;
                        tracing::info!("NBD: fault injection cut the stream after {cut} bytes");
                        return Ok(());
                    }
                    // A throttled reply goes out when the link would have
                    // delivered it, not at once and then a pause: the connection
                    // ends as soon as its client is done with it.
                    if let Some(rate) = fault.bytes_per_sec.filter(|r| *r > 0) {
                        let due = Duration::from_secs_f64((served + len) as f64 / rate as f64);
                        let elapsed = started.elapsed();
                        if due > elapsed {
                            tokio::time::sleep(due - elapsed).await;
                        }
                    }
                    s.write_all(&buf).await?;
                    s.flush().await?;
                    reply_buf = buf;
                    served += len;
                    self.count_read(len, &reads_key, &bytes_key);
                }
                proto::cmd::DISC => return Ok(()),
                proto::cmd::WRITE => {
                    // Read-only export: swallow the payload to stay in sync, refuse.
                    let mut left = u64::from(req.length);
                    let mut sink = vec![0u8; 64 * 1024];
                    while left > 0 {
                        let n = left.min(sink.len() as u64) as usize;
                        s.read_exact(&mut sink[..n]).await?;
                        left -= n as u64;
                    }
                    s.write_all(&proto::encode_simple_reply(
                        proto::errno::EINVAL,
                        req.handle,
                    ))
                    .await?;
                    s.flush().await?;
                }
                _ => {
                    s.write_all(&proto::encode_simple_reply(
                        proto::errno::EINVAL,
                        req.handle,
                    ))
                    .await?;
                    s.flush().await?;
                }
            }
        }
    }
}
