//! xenvault's engine: the only place the backup and restore pipelines are
//! wired together (source → extents → sink), with everything around them:
//! configuration, VM selection, checks before touching the pool, the journal
//! of temporary objects, retention, reports and restore.
//!
//! The engine never prints: progress and results reach the caller as values
//! (reports, events); the CLI renders them.
