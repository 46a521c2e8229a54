//! Shared data types of xenvault: ids, disk extents, and the XAPI value model.
//!
//! This crate does no I/O. Every other crate of the workspace may use it; it
//! uses none of them.

pub mod config;
pub mod extent;
pub mod report;
pub mod rpc;

pub use extent::{Extent, ExtentData};
pub use rpc::Value;
