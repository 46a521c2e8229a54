//! NBD wire protocol: constants and encoders/decoders of every message, no I/O.
//!
//! Usable by both sides: the client in [`super::client`] and the simulator's NBD
//! server. Fixed-size headers decode from fixed-size arrays; variable payloads
//! decode from slices whose length the header gave. Nothing here panics on bad
//! input. Reference: the NBD protocol document (nbd project, `doc/proto.md`) and
//! docs/xapi-notes.md "NBD" for what xapi-nbd supports.

use std::fmt;

/// `NBDMAGIC`, first 8 bytes of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting magic and option request magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Old-style greeting magic (not supported, recognised for a clear error).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Option reply magic.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Transmission request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options (`NBD_OPT_*`).
pub mod opt {
    /// Select the export and end negotiation (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Select the export and end negotiation (with error reporting).
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Acknowledged.
    pub const ACK: u32 = 1;
    /// An export (LIST).
    pub const SERVER: u32 = 2;
    /// Export information (INFO/GO).
    pub const INFO: u32 = 3;
    /// A metadata context id.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    /// Forbidden by server policy.
    pub const ERR_POLICY: u32 = ERROR_BIT | 2;
    /// Invalid option.
    pub const ERR_INVALID: u32 = ERROR_BIT | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERROR_BIT | 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERROR_BIT | 5;
    /// Unknown export.
    pub const ERR_UNKNOWN: u32 = ERROR_BIT | 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERROR_BIT | 7;
    /// Block size negotiation required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERROR_BIT | 8;
    /// Request too big.
    pub const ERR_TOO_BIG: u32 = ERROR_BIT | 9;
    /// Extended headers required.
    pub const ERR_EXT_HEADER_REQD: u32 = ERROR_BIT | 10;
}

/// `NBD_INFO_*` types in INFO replies and requests.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Export name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`, 16 bits).
pub mod tflag {
    /// Flags field is valid.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// DF (don't fragment) supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see the same data.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Commands (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Cache.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// No hole punching.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// One block status extent is enough.
    pub const REQ_ONE: u16 = 1 << 3;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`) and flags.
pub mod chunk {
    /// Last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
    /// No payload.
    pub const NONE: u16 = 0;
    /// Offset + data.
    pub const OFFSET_DATA: u16 = 1;
    /// Offset + length of zeros.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents.
    pub const BLOCK_STATUS: u16 = 5;
    /// Error type bit.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// Error.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// `base:allocation` state bits.
pub mod alloc {
    /// Unallocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeros.
    pub const ZERO: u32 = 1 << 1;
}

/// The metadata context of allocation status.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// NBD error numbers (Linux values, as the protocol defines).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Bytes of padding after the export info of `NBD_OPT_EXPORT_NAME` (without NO_ZEROES).
pub const EXPORT_NAME_PADDING: usize = 124;
/// Largest option payload a decoder accepts (protects against memory abuse).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest read the client asks for in one request.
pub const MAX_READ_LEN: u32 = 32 * 1024 * 1024;

/// The name of an option number, for errors and logs.
pub fn option_name(option: u32) -> String {
    let name = match option {
        opt::EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        opt::ABORT => "NBD_OPT_ABORT",
        opt::LIST => "NBD_OPT_LIST",
        opt::STARTTLS => "NBD_OPT_STARTTLS",
        opt::INFO => "NBD_OPT_INFO",
        opt::GO => "NBD_OPT_GO",
        opt::STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        other => return format!("NBD option {other}"),
    };
    name.to_owned()
}

/// The name of an option reply type, e.g. `NBD_REP_ERR_POLICY`.
pub fn reply_type_name(reply: u32) -> String {
    let name = match reply {
        rep::ACK => "NBD_REP_ACK",
        rep::SERVER => "NBD_REP_SERVER",
        rep::INFO => "NBD_REP_INFO",
        rep::META_CONTEXT => "NBD_REP_META_CONTEXT",
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY",
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID",
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        rep::ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        other if other & rep::ERROR_BIT != 0 => {
            return format!("NBD_REP_ERR_{}", other & !rep::ERROR_BIT);
        }
        other => return format!("NBD reply type {other}"),
    };
    name.to_owned()
}

/// The name of an NBD errno, e.g. `EINVAL`.
pub fn errno_name(error: u32) -> String {
    let name = match error {
        errno::EPERM => "EPERM",
        errno::EIO => "EIO",
        errno::ENOMEM => "ENOMEM",
        errno::EINVAL => "EINVAL",
        errno::ENOSPC => "ENOSPC",
        errno::EOVERFLOW => "EOVERFLOW",
        errno::ENOTSUP => "ENOTSUP",
        errno::ESHUTDOWN => "ESHUTDOWN",
        other => return format!("errno {other}"),
    };
    name.to_owned()
}

/// The name of a command, e.g. `NBD_CMD_READ`.
pub fn command_name(command: u16) -> String {
    let name = match command {
        cmd::READ => "NBD_CMD_READ",
        cmd::WRITE => "NBD_CMD_WRITE",
        cmd::DISC => "NBD_CMD_DISC",
        cmd::FLUSH => "NBD_CMD_FLUSH",
        cmd::TRIM => "NBD_CMD_TRIM",
        cmd::CACHE => "NBD_CMD_CACHE",
        cmd::WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        cmd::BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        other => return format!("NBD command {other}"),
    };
    name.to_owned()
}

/// A protocol violation found while decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number was wrong.
    #[error(
        "bad {what} magic {found:#x} (expected {expected:#x}): not an NBD peer, or the stream lost sync"
    )]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// Found value.
        found: u64,
        /// Expected value.
        expected: u64,
    },
    /// An old-style server.
    #[error("the NBD server speaks the old-style handshake; only fixed newstyle is supported")]
    OldStyle,
    /// A newstyle server without the fixed-newstyle flag.
    #[error("the NBD server does not offer fixed newstyle negotiation (flags {0:#x})")]
    NotFixedNewstyle(u16),
    /// A payload is shorter or longer than its type requires.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A length is beyond the accepted limit.
    #[error("{what} length {len} exceeds the limit {limit}")]
    TooLong {
        /// Which message.
        what: &'static str,
        /// The length.
        len: u64,
        /// The limit.
        limit: u64,
    },
}

fn malformed(what: &'static str, reason: impl Into<String>) -> ProtoError {
    ProtoError::Malformed {
        what,
        reason: reason.into(),
    }
}

/// A cursor over a payload that never panics.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(malformed(
                self.what,
                format!("needs {n} more bytes, has {}", self.buf.len()),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| malformed(self.what, "string is not UTF-8"))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(
                self.what,
                format!("{} unexpected trailing bytes", self.buf.len()),
            ))
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

// ---------------------------------------------------------------- handshake

/// Length of the newstyle server greeting.
pub const GREETING_LEN: usize = 18;

/// Encodes the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Decodes the server greeting; returns the handshake flags. Requires fixed newstyle.
pub fn decode_greeting(bytes: &[u8; GREETING_LEN]) -> Result<u16, ProtoError> {
    let magic = u64_at(bytes, 0);
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            found: magic,
            expected: NBD_MAGIC,
        });
    }
    let second = u64_at(bytes, 8);
    if second == OLDSTYLE_MAGIC {
        return Err(ProtoError::OldStyle);
    }
    if second != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            found: second,
            expected: IHAVEOPT,
        });
    }
    let flags = u16_at(bytes, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle(flags));
    }
    Ok(flags)
}

/// Length of an option request header.
pub const OPTION_HEADER_LEN: usize = 16;

/// An option request from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// The payload.
    pub data: Vec<u8>,
}

impl OptionRequest {
    /// Encodes header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(OPTION_HEADER_LEN + self.data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.data);
        out
    }
}

/// Decodes an option request header; returns `(option, payload length)`.
/// The payload length is checked against [`MAX_OPTION_LEN`].
pub fn decode_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), ProtoError> {
    let magic = u64_at(bytes, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option request",
            found: magic,
            expected: IHAVEOPT,
        });
    }
    let option = u32_at(bytes, 8);
    let len = u32_at(bytes, 12);
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::TooLong {
            what: "option request",
            len: u64::from(len),
            limit: u64::from(MAX_OPTION_LEN),
        });
    }
    Ok((option, len))
}

/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// An option reply header from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Payload length.
    pub len: u32,
}

impl OptionReplyHeader {
    /// True for `NBD_REP_ERR_*`.
    pub fn is_error(&self) -> bool {
        self.reply & rep::ERROR_BIT != 0
    }
}

/// Encodes an option reply with its payload.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Decodes an option reply header (payload length checked against [`MAX_OPTION_LEN`]).
pub fn decode_option_reply_header(
    bytes: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ProtoError> {
    let magic = u64_at(bytes, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            found: magic,
            expected: OPTION_REPLY_MAGIC,
        });
    }
    let header = OptionReplyHeader {
        option: u32_at(bytes, 8),
        reply: u32_at(bytes, 12),
        len: u32_at(bytes, 16),
    };
    if header.len > MAX_OPTION_LEN {
        return Err(ProtoError::TooLong {
            what: "option reply",
            len: u64::from(header.len),
            limit: u64::from(MAX_OPTION_LEN),
        });
    }
    Ok(header)
}

/// Size and transmission flags of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// `NBD_FLAG_*` transmission flags.
    pub flags: u16,
}

impl ExportInfo {
    /// True when the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & tflag::READ_ONLY != 0
    }
}

/// Encodes the server's answer to `NBD_OPT_EXPORT_NAME`: 8-byte size, 2-byte flags,
/// then 124 zero bytes unless the client negotiated NO_ZEROES (xapi-nbd always
/// sends them: docs/xapi-notes.md "NBD").
pub fn encode_export_name_reply(info: ExportInfo, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    out.extend_from_slice(&info.size.to_be_bytes());
    out.extend_from_slice(&info.flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
    }
    out
}

/// Decodes the 10 bytes of size and flags that answer `NBD_OPT_EXPORT_NAME`.
pub fn decode_export_name_reply(bytes: &[u8; 10]) -> ExportInfo {
    ExportInfo {
        size: u64_at(bytes, 0),
        flags: u16_at(bytes, 8),
    }
}

/// Encodes the payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(info: ExportInfo) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&info::EXPORT.to_be_bytes());
    out.extend_from_slice(&info.size.to_be_bytes());
    out.extend_from_slice(&info.flags.to_be_bytes());
    out
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`.
    Export(ExportInfo),
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        maximum: u32,
    },
    /// Another information type (name, description, ...), kept raw.
    Other {
        /// `NBD_INFO_*`.
        kind: u16,
        /// Payload after the type.
        data: Vec<u8>,
    },
}

/// Decodes an `NBD_REP_INFO` payload.
pub fn decode_info_reply(payload: &[u8]) -> Result<InfoReply, ProtoError> {
    let mut r = Reader::new(payload, "NBD_REP_INFO");
    let kind = r.u16()?;
    let reply = match kind {
        info::EXPORT => InfoReply::Export(ExportInfo {
            size: r.u64()?,
            flags: r.u16()?,
        }),
        info::BLOCK_SIZE => InfoReply::BlockSize {
            minimum: r.u32()?,
            preferred: r.u32()?,
            maximum: r.u32()?,
        },
        kind => {
            return Ok(InfoReply::Other {
                kind,
                data: r.rest().to_vec(),
            });
        }
    };
    r.finish()?;
    Ok(reply)
}

/// Payload of `NBD_OPT_GO` / `NBD_OPT_INFO`: export name and requested info types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name.
    pub name: String,
    /// `NBD_INFO_*` types requested.
    pub info_requests: Vec<u16>,
}

impl GoRequest {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.info_requests.len());
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.info_requests.len() as u16).to_be_bytes());
        for i in &self.info_requests {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }

    /// Decodes the payload (server side).
    pub fn decode(payload: &[u8]) -> Result<GoRequest, ProtoError> {
        let mut r = Reader::new(payload, "NBD_OPT_GO");
        let name_len = r.u32()? as usize;
        let name = r.string(name_len)?;
        let n = r.u16()?;
        let mut info_requests = Vec::with_capacity(usize::from(n).min(64));
        for _ in 0..n {
            info_requests.push(r.u16()?);
        }
        r.finish()?;
        Ok(GoRequest {
            name,
            info_requests,
        })
    }
}

/// Payload of `NBD_OPT_SET_META_CONTEXT` / `LIST_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export_name: String,
    /// Context queries, e.g. `base:allocation`.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.export_name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.export_name.as_bytes());
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            out.extend_from_slice(&(q.len() as u32).to_be_bytes());
            out.extend_from_slice(q.as_bytes());
        }
        out
    }

    /// Decodes the payload (server side).
    pub fn decode(payload: &[u8]) -> Result<MetaContextRequest, ProtoError> {
        let mut r = Reader::new(payload, "NBD_OPT_SET_META_CONTEXT");
        let name_len = r.u32()? as usize;
        let export_name = r.string(name_len)?;
        let n = r.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            let len = r.u32()? as usize;
            queries.push(r.string(len)?);
        }
        r.finish()?;
        Ok(MetaContextRequest {
            export_name,
            queries,
        })
    }
}

/// Encodes an `NBD_REP_META_CONTEXT` payload.
pub fn encode_meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Decodes an `NBD_REP_META_CONTEXT` payload into `(context id, name)`.
pub fn decode_meta_context_reply(payload: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut r = Reader::new(payload, "NBD_REP_META_CONTEXT");
    let id = r.u32()?;
    let rest = r.rest();
    let name = String::from_utf8(rest.to_vec())
        .map_err(|_| malformed("NBD_REP_META_CONTEXT", "name is not UTF-8"))?;
    Ok((id, name))
}

/// Decodes the text of an error option reply (the payload is an optional message).
pub fn decode_error_message(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

// ---------------------------------------------------------------- transmission

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// Cookie echoed by the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (payload length for writes).
    pub length: u32,
}

impl Request {
    /// Encodes the 28-byte header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Decodes the 28-byte header (server side).
    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
        let magic = u32_at(bytes, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                found: u64::from(magic),
                expected: u64::from(REQUEST_MAGIC),
            });
        }
        Ok(Request {
            flags: u16_at(bytes, 4),
            command: u16_at(bytes, 6),
            handle: u64_at(bytes, 8),
            offset: u64_at(bytes, 16),
            length: u32_at(bytes, 24),
        })
    }
}

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// Encodes a simple reply header (the read data, if any, follows it).
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
    out
}

/// Encodes a structured reply chunk header (its payload follows it).
pub fn encode_structured_reply(
    flags: u16,
    kind: u16,
    handle: u64,
    length: u32,
) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut out = [0u8; STRUCTURED_REPLY_LEN];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// The kind of reply a 4-byte magic announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A simple reply: 12 more header bytes follow.
    Simple,
    /// A structured reply chunk: 16 more header bytes follow.
    Structured,
}

/// Classifies a reply by its first 4 bytes.
pub fn reply_kind(magic: [u8; 4]) -> Result<ReplyKind, ProtoError> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        found => Err(ProtoError::BadMagic {
            what: "reply",
            found: u64::from(found),
            expected: u64::from(SIMPLE_REPLY_MAGIC),
        }),
    }
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 or an NBD errno.
    pub error: u32,
    /// The request's handle.
    pub handle: u64,
}

/// Decodes a simple reply header from the 12 bytes after its magic.
pub fn decode_simple_reply_rest(bytes: &[u8; 12]) -> SimpleReply {
    SimpleReply {
        error: u32_at(bytes, 0),
        handle: u64_at(bytes, 4),
    }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredReply {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's handle.
    pub handle: u64,
    /// Payload length.
    pub length: u32,
}

impl StructuredReply {
    /// True on the last chunk of a reply.
    pub fn is_done(&self) -> bool {
        self.flags & chunk::FLAG_DONE != 0
    }
}

/// Decodes a structured reply header from the 16 bytes after its magic.
pub fn decode_structured_reply_rest(bytes: &[u8; 16]) -> StructuredReply {
    StructuredReply {
        flags: u16_at(bytes, 0),
        kind: u16_at(bytes, 2),
        handle: u64_at(bytes, 4),
        length: u32_at(bytes, 12),
    }
}

/// One block status extent: a length and `base:allocation` style flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusExtent {
    /// Length in bytes.
    pub length: u32,
    /// State flags (for `base:allocation`: [`alloc::HOLE`], [`alloc::ZERO`]).
    pub flags: u32,
}

/// Encodes an `NBD_REPLY_TYPE_BLOCK_STATUS` payload.
pub fn encode_block_status(context_id: u32, extents: &[BlockStatusExtent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * extents.len());
    out.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.length.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
    out
}

/// Decodes an `NBD_REPLY_TYPE_BLOCK_STATUS` payload into `(context id, extents)`.
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<BlockStatusExtent>), ProtoError> {
    if payload.len() < 4 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(malformed(
            "block status reply",
            format!("payload of {} bytes is not 4 + 8*n", payload.len()),
        ));
    }
    let mut r = Reader::new(payload, "block status reply");
    let id = r.u32()?;
    let mut extents = Vec::with_capacity((payload.len() - 4) / 8);
    while !r.buf.is_empty() {
        extents.push(BlockStatusExtent {
            length: r.u32()?,
            flags: r.u32()?,
        });
    }
    Ok((id, extents))
}

/// Decodes an `NBD_REPLY_TYPE_OFFSET_HOLE` payload into `(offset, length)`.
pub fn decode_offset_hole(payload: &[u8]) -> Result<(u64, u32), ProtoError> {
    let mut r = Reader::new(payload, "hole chunk");
    let offset = r.u64()?;
    let len = r.u32()?;
    r.finish()?;
    Ok((offset, len))
}

/// An error chunk's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// NBD errno.
    pub error: u32,
    /// Human-readable message (may be empty).
    pub message: String,
    /// The offset, for `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub offset: Option<u64>,
}

/// Decodes an `NBD_REPLY_TYPE_ERROR` / `ERROR_OFFSET` payload.
pub fn decode_error_chunk(kind: u16, payload: &[u8]) -> Result<ErrorChunk, ProtoError> {
    let mut r = Reader::new(payload, "error chunk");
    let error = r.u32()?;
    let len = r.u16()? as usize;
    let message = String::from_utf8_lossy(r.take(len)?).into_owned();
    let offset = if kind == chunk::ERROR_OFFSET {
        Some(r.u64()?)
    } else {
        None
    };
    Ok(ErrorChunk {
        error,
        message,
        offset,
    })
}

/// Encodes an `NBD_REPLY_TYPE_ERROR` payload.
pub fn encode_error_chunk(error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(6 + msg.len());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Client handshake flags a server received, described.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    /// Decodes the 4 bytes the client sends after the greeting.
    pub fn decode(bytes: [u8; 4]) -> ClientFlags {
        ClientFlags(u32::from_be_bytes(bytes))
    }

    /// Client supports fixed newstyle.
    pub fn fixed_newstyle(&self) -> bool {
        self.0 & CLIENT_FIXED_NEWSTYLE != 0
    }

    /// Client asks for no 124-byte padding.
    pub fn no_zeroes(&self) -> bool {
        self.0 & CLIENT_NO_ZEROES != 0
    }
}

impl fmt::Display for ExportInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes, flags {:#06x}", self.size, self.flags)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(decode_greeting(&g).unwrap(), 3);
        assert_eq!(
            decode_greeting(&encode_greeting(0)),
            Err(ProtoError::NotFixedNewstyle(0))
        );
        let mut old = g;
        old[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert_eq!(decode_greeting(&old), Err(ProtoError::OldStyle));
        let garbage = [0x41u8; GREETING_LEN];
        assert!(matches!(
            decode_greeting(&garbage),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_round_trip() {
        let req = OptionRequest {
            option: opt::EXPORT_NAME,
            data: b"/uuid?session_id=x".to_vec(),
        };
        let bytes = req.encode();
        let header: [u8; 16] = bytes[..16].try_into().unwrap();
        assert_eq!(
            decode_option_header(&header).unwrap(),
            (opt::EXPORT_NAME, 18)
        );
        let reply = encode_option_reply(opt::GO, rep::ERR_UNSUP, b"no");
        let h = decode_option_reply_header(reply[..20].try_into().unwrap()).unwrap();
        assert!(h.is_error());
        assert_eq!(reply_type_name(h.reply), "NBD_REP_ERR_UNSUP");
        assert_eq!(h.len, 2);
        let mut huge = header;
        huge[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_option_header(&huge),
            Err(ProtoError::TooLong { .. })
        ));
    }

    #[test]
    fn export_name_reply_has_124_zeroes() {
        let info = ExportInfo {
            size: 1 << 30,
            flags: tflag::HAS_FLAGS | tflag::READ_ONLY,
        };
        let bytes = encode_export_name_reply(info, false);
        assert_eq!(bytes.len(), 134);
        assert!(bytes[10..].iter().all(|b| *b == 0));
        assert_eq!(
            decode_export_name_reply(bytes[..10].try_into().unwrap()),
            info
        );
        assert_eq!(encode_export_name_reply(info, true).len(), 10);
        assert!(info.read_only());
    }

    #[test]
    fn go_and_meta_context_round_trip() {
        let go = GoRequest {
            name: "disk".into(),
            info_requests: vec![info::BLOCK_SIZE],
        };
        assert_eq!(GoRequest::decode(&go.encode()).unwrap(), go);
        assert!(GoRequest::decode(&go.encode()[..5]).is_err());
        let meta = MetaContextRequest {
            export_name: "".into(),
            queries: vec![BASE_ALLOCATION.into()],
        };
        assert_eq!(MetaContextRequest::decode(&meta.encode()).unwrap(), meta);
        let r = encode_meta_context_reply(7, BASE_ALLOCATION);
        assert_eq!(
            decode_meta_context_reply(&r).unwrap(),
            (7, BASE_ALLOCATION.to_owned())
        );
        let info = ExportInfo { size: 5, flags: 1 };
        assert_eq!(
            decode_info_reply(&encode_info_export(info)).unwrap(),
            InfoReply::Export(info)
        );
        assert!(decode_info_reply(&[0, 0, 1]).is_err());
    }

    #[test]
    fn request_and_replies_round_trip() {
        let req = Request {
            flags: 0,
            command: cmd::READ,
            handle: 42,
            offset: 4096,
            length: 512,
        };
        assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        let mut bad = req.encode();
        bad[0] = 0;
        assert!(Request::decode(&bad).is_err());

        let s = encode_simple_reply(errno::EINVAL, 9);
        assert_eq!(
            reply_kind(s[..4].try_into().unwrap()).unwrap(),
            ReplyKind::Simple
        );
        assert_eq!(
            decode_simple_reply_rest(s[4..].try_into().unwrap()),
            SimpleReply {
                error: 22,
                handle: 9
            }
        );
        let c = encode_structured_reply(chunk::FLAG_DONE, chunk::OFFSET_HOLE, 3, 12);
        assert_eq!(
            reply_kind(c[..4].try_into().unwrap()).unwrap(),
            ReplyKind::Structured
        );
        let h = decode_structured_reply_rest(c[4..].try_into().unwrap());
        assert!(h.is_done());
        assert_eq!((h.kind, h.handle, h.length), (chunk::OFFSET_HOLE, 3, 12));
        assert!(reply_kind([1, 2, 3, 4]).is_err());
    }

    #[test]
    fn payload_decoders() {
        let ext = [
            BlockStatusExtent {
                length: 65536,
                flags: 0,
            },
            BlockStatusExtent {
                length: 512,
                flags: alloc::HOLE | alloc::ZERO,
            },
        ];
        let p = encode_block_status(1, &ext);
        assert_eq!(decode_block_status(&p).unwrap(), (1, ext.to_vec()));
        assert!(decode_block_status(&p[..7]).is_err());
        assert!(decode_block_status(&[]).is_err());
        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(decode_offset_hole(&hole).unwrap(), (4096, 512));
        assert!(decode_offset_hole(&hole[..11]).is_err());
        let e = encode_error_chunk(errno::EIO, "disk gone");
        let d = decode_error_chunk(chunk::ERROR, &e).unwrap();
        assert_eq!(
            (d.error, d.message.as_str(), d.offset),
            (5, "disk gone", None)
        );
        assert!(decode_error_chunk(chunk::ERROR_OFFSET, &e).is_err());
        assert!(decode_error_chunk(chunk::ERROR, &[0, 0, 0, 5, 0, 9]).is_err());
        assert_eq!(errno_name(22), "EINVAL");
        assert_eq!(option_name(opt::GO), "NBD_OPT_GO");
        assert_eq!(command_name(cmd::READ), "NBD_CMD_READ");
        assert_eq!(reply_type_name(rep::ERROR_BIT | 77), "NBD_REP_ERR_77");
    }
}
