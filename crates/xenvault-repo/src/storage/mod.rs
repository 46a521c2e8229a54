//! The storage trait: the small set of object operations a repository needs, and its errors.
//!
//! A repository is a flat set of immutable objects named by `/`-separated keys
//! (`chunks/ab/ab12…`, `manifests/<vm>/<id>`). Every backend (local directory,
//! memory, S3 through OpenDAL, SFTP) implements [`Storage`]; behaviour such as
//! retries is stacked as decorators ([`Retrying`]) over a backend.
//! [`open_target`] opens the backend a configured target names, and
//! [`conformance`] checks that a backend keeps the trait's promises
//! (`docs/backends.md`, ADR 0006).
//!
//! Errors are data ([`StorageErrorKind`]): callers decide from the kind whether a
//! retry makes sense (`Transient`) or the object simply is not there (`NotFound`).

mod conformance;
mod local;
mod memory;
mod retry;
mod s3;
mod sftp;
mod target;

pub use conformance::{ConformanceFailure, ConformanceOptions, run_conformance};
pub use local::LocalStorage;
pub use memory::{Fault, MemoryStorage};
pub use retry::{RetryPolicy, Retrying};
pub use s3::{PutIfAbsentStrategy, S3Options, S3Storage};
pub use sftp::{SftpOptions, SftpStorage};
pub use target::{TargetUrl, open_target, parse_target_url, s3_options};

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use bytes::Bytes;

/// A boxed, sendable future: keeps [`Storage`] usable as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What kind of failure a storage operation met; decides what the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageErrorKind {
    /// The object does not exist.
    NotFound,
    /// `put_if_absent` found the object already there.
    AlreadyExists,
    /// A failure that may go away (timeout, connection reset, throttling): retry with backoff.
    Transient,
    /// A failure a retry will not fix (permission denied, disk full, bad key).
    Permanent,
}

/// A failed storage operation: its kind, the operation, the key and the cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage {op} of '{key}' failed ({kind:?}): {message}")]
pub struct StorageError {
    /// What kind of failure this is.
    pub kind: StorageErrorKind,
    /// The operation (`get`, `put_if_absent`, …).
    pub op: &'static str,
    /// The object key (or prefix for `list`).
    pub key: String,
    /// The cause, with guidance where we have some.
    pub message: String,
}

impl StorageError {
    /// A new error.
    pub fn new(
        kind: StorageErrorKind,
        op: &'static str,
        key: &str,
        message: impl Into<String>,
    ) -> Self {
        StorageError {
            kind,
            op,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// A "not found" error.
    pub fn not_found(op: &'static str, key: &str) -> Self {
        Self::new(StorageErrorKind::NotFound, op, key, "no such object")
    }

    /// True when the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == StorageErrorKind::NotFound
    }

    /// True when `put_if_absent` found the object already there.
    pub fn is_already_exists(&self) -> bool {
        self.kind == StorageErrorKind::AlreadyExists
    }

    /// Maps an I/O error to a storage error (kind by `io::ErrorKind`).
    pub fn from_io(op: &'static str, key: &str, err: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let (kind, hint) = match err.kind() {
            K::NotFound => (StorageErrorKind::NotFound, ""),
            K::AlreadyExists => (StorageErrorKind::AlreadyExists, ""),
            K::Interrupted | K::TimedOut | K::WouldBlock | K::ResourceBusy => {
                (StorageErrorKind::Transient, "")
            }
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                (StorageErrorKind::Transient, "")
            }
            K::PermissionDenied | K::ReadOnlyFilesystem => (
                StorageErrorKind::Permanent,
                " (check that the repository directory is writable by this user)",
            ),
            K::StorageFull | K::QuotaExceeded => (
                StorageErrorKind::Permanent,
                " (the repository's filesystem is full: free space or prune old restore points)",
            ),
            _ => (StorageErrorKind::Permanent, ""),
        };
        Self::new(kind, op, key, format!("{err}{hint}"))
    }
}

/// Size and modification time of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

/// The object operations a repository needs from a backend.
///
/// Keys are relative, `/`-separated, made of `[A-Za-z0-9._-]` segments (see
/// [`validate_key`]). Objects are written whole: a reader sees either nothing or
/// the complete object, never a prefix.
pub trait Storage: Send + Sync + 'static {
    /// Writes `data` under `key` unless an object is already there
    /// (`AlreadyExists` then). The normal way to write: chunks, indexes, manifests.
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Writes `data` under `key`, replacing any object there. Only for mutable
    /// objects: locks and references (never chunks, indexes or manifests).
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Reads the whole object.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes, StorageError>>;

    /// Reads `len` bytes from `offset` (fewer when the object ends first).
    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StorageError>>;

    /// Every object whose key starts with `prefix`, in no particular order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, StorageError>>;

    /// Removes the object; removing a missing object succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Size and modification time of the object (`NotFound` when absent).
    fn stat<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta, StorageError>>;

    /// Writes an immutable, content-addressed object (a chunk) that becomes
    /// visible under `key` at the latest when the next [`publish`](Self::publish)
    /// returns. `AlreadyExists` when the object exists or is already staged (it
    /// is then visible after the next `publish` too). A backend that batches
    /// (local: one filesystem sync per batch instead of one per object, ADR 0008)
    /// keeps the object invisible until `publish`; the default is
    /// [`put_if_absent`](Self::put_if_absent): durable and visible at once.
    fn stage<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StorageError>> {
        self.put_if_absent(key, data)
    }

    /// Makes every object staged so far (by any user of this backend instance)
    /// durable, then visible under its final name, then the names durable. After
    /// `Ok`, an object staged before the call can be found by `stat`/`get`/`list`
    /// and survives a power cut. An error means some staged objects are lost:
    /// the caller must not reference them. Default: nothing to do.
    fn publish(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async { Ok(()) })
    }

    /// Removes temporary files (of writes or stages interrupted by a crash) last
    /// modified before `older_than`; returns how many. Temporaries are never
    /// listed and never referenced; only a prune sweep (exclusive lock: no
    /// backup runs) calls this. Default: the backend leaves none (returns 0).
    fn remove_stale_temporaries(
        &self,
        older_than: SystemTime,
    ) -> BoxFuture<'_, Result<u64, StorageError>> {
        let _ = older_than;
        Box::pin(async { Ok(0) })
    }
}

/// Checks that `key` is a relative, `/`-separated key of `[A-Za-z0-9._-]` segments,
/// none empty, `.` or `..`, none starting with `.` (reserved for temporary files).
pub fn validate_key(op: &'static str, key: &str) -> Result<(), StorageError> {
    let bad = |why: &str| {
        Err(StorageError::new(
            StorageErrorKind::Permanent,
            op,
            key,
            format!("invalid object key: {why}"),
        ))
    };
    if key.is_empty() {
        return bad("empty");
    }
    for seg in key.split('/') {
        if seg.is_empty() {
            return bad("empty path segment");
        }
        if seg.starts_with('.') {
            return bad("a segment starts with '.'");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return bad("only A-Z a-z 0-9 . _ - are allowed in a segment");
        }
    }
    Ok(())
}

/// Checks a list prefix: empty, or a valid key optionally ending in `/`.
pub fn validate_prefix(prefix: &str) -> Result<(), StorageError> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() {
        return Ok(());
    }
    validate_key("list", trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("get", "chunks/ab/abcdef").is_ok());
        assert!(validate_key("get", "config").is_ok());
        for bad in ["", "/a", "a//b", "a/../b", "a/.tmp", "a b", "a/b/"] {
            assert!(validate_key("get", bad).is_err(), "{bad}");
        }
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("chunks/").is_ok());
        assert!(validate_prefix("../").is_err());
    }
}
