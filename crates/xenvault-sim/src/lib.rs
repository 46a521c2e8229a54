//! xapi-sim: a simulated XAPI pool that speaks the real wire protocols over
//! real sockets (XML-RPC, JSON-RPC, the HTTP data handlers, NBD) and keeps its
//! state, including sparse disk files, in a directory.
//!
//! What it covers and where it differs from real XAPI: `docs/simulator.md`.
pub mod api;
pub mod control;
pub mod datamodel;
pub mod db;
pub mod db_filter;
pub mod disk;
pub mod error;
pub mod faults;
pub mod handlers;
pub mod http;
pub mod nbd_server;
pub mod pool;
pub mod rpc;
pub mod scenario;
pub mod server;
pub mod state;
pub mod tls;

pub use error::{ApiError, ApiResult};
pub use pool::Pool;
pub use server::{SimConfig, SimInfo, Simulator};
