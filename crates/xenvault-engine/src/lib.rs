//! xenvault's engine: the only place the backup and restore pipelines are
//! wired together (source → extents → sink), with everything around them:
//! configuration, VM selection, checks before touching the pool, the journal
//! of temporary objects, retention, reports and restore.
//!
//! The engine never prints: progress and results reach the caller as values
//! (reports, events); the CLI renders them.

pub mod archive;
pub mod backup;
pub mod config;
pub mod job;
pub mod journal;
pub mod kept;
pub mod plan;
pub mod preflight;
pub mod report;
pub mod repository;
pub mod restore;
pub mod selection;
pub mod sink;
