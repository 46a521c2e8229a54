//! XAPI client: the control plane (JSON-RPC / XML-RPC calls, sessions, tasks,
//! events, typed records) and the data plane (HTTP exports and imports, NBD).
//!
//! Every XAPI quirk handled here is written down in `docs/xapi-notes.md`.
//!
//! Control plane entry points: [`session::Client::connect`] gives a shared
//! [`session::Session`]; typed calls hang off it (`session.vm().snapshot(…)`,
//! see [`api`]); tasks are in [`task`], records and enums in [`records`].

// Control plane.
pub mod api;
pub mod de;
pub mod error;
pub mod event;
pub mod model;
pub mod records;
pub mod session;
pub mod task;
pub mod transport;

pub use error::{Error, ErrorCode, XapiError};
pub use session::{Client, Credentials, Session};

// Data plane.
pub mod cbt;
pub mod http;
pub mod nbd;
pub mod tls;
