//! NBD: the protocol codec (no I/O) and the tokio client.
//!
//! - [`proto`]: constants, handshake/option/request/reply encoders and decoders,
//!   shared by the client and the simulator's server.
//! - [`client`]: a tokio client for xapi-nbd (fixed newstyle, STARTTLS pinned to the
//!   certificate of `VDI.get_nbd_info`, `NBD_OPT_EXPORT_NAME`) and for qemu-nbd
//!   (`NBD_OPT_GO`, structured replies, `base:allocation`), with pipelined reads and
//!   a multi-connection reader.

pub mod client;
pub mod proto;
