//! The repository's error type: every failure names the object and says what to do.

use crate::storage::StorageError;

/// Result of repository operations.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// A repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The storage backend failed (see its kind for whether a retry helps).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// `init` found a repository already there.
    #[error(
        "a repository already exists at this location (its 'config' object is present); open it instead of initialising"
    )]
    AlreadyInitialized,
    /// `open` found no repository.
    #[error("no repository here (no 'config' object); create one with `xenvault repo init`")]
    NotARepository,
    /// The repository uses a format this program does not know.
    #[error(
        "repository format version {found} is not supported (this xenvault reads version {supported}); upgrade xenvault"
    )]
    UnsupportedVersion {
        /// Version found in `config`.
        found: u32,
        /// Version this code supports.
        supported: u32,
    },
    /// The repository is encrypted and no password was given.
    #[error("the repository is encrypted: give its password (from a file or the environment)")]
    PasswordRequired,
    /// No key slot opens with the given password.
    #[error("wrong password: none of the repository's {slots} key slot(s) opens with it")]
    WrongPassword {
        /// Number of key slots tried.
        slots: usize,
    },
    /// A key operation needs an encrypted repository.
    #[error("the repository is not encrypted: it has no keys to {0}")]
    NotEncrypted(&'static str),
    /// Removing the last key slot would lock everyone out.
    #[error("refusing to remove the last key slot '{0}': add another key first")]
    LastKey(String),
    /// No such key slot.
    #[error("no key slot '{0}' in this repository (see `xenvault repo key list`)")]
    NoSuchKey(String),
    /// A stored object does not decode: damaged or tampered with.
    #[error("object '{key}' is damaged: {reason}; run `xenvault verify` to see what it affects")]
    Corrupt {
        /// The object's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An encrypted object failed authentication: damaged, tampered or swapped.
    #[error(
        "object '{key}' failed authentication (damaged, tampered with, or moved from another place): refused"
    )]
    Tampered {
        /// The object's key.
        key: String,
    },
    /// A caller-supplied value is not acceptable.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Extents were fed out of order or beyond the disk.
    #[error("disk '{disk}': extent at offset {offset} (length {len}) is {reason}")]
    BadExtent {
        /// The disk key.
        disk: String,
        /// Extent offset.
        offset: u64,
        /// Extent length.
        len: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An incremental disk's size differs from its parent's.
    #[error(
        "disk '{disk}' changed size ({parent} → {now} bytes) since the parent restore point: take a full backup of it"
    )]
    DiskResized {
        /// The disk key.
        disk: String,
        /// Size in the parent.
        parent: u64,
        /// Size now.
        now: u64,
    },
    /// No such restore point or disk.
    #[error("not found: {0}")]
    NotFound(String),
    /// Another process holds a conflicting lock.
    #[error(
        "repository is locked by {holder} ({kind} lock '{id}' for {purpose}, refreshed {refreshed}); wait for it to finish, or remove the lock if that process is gone"
    )]
    Locked {
        /// Lock id.
        id: String,
        /// `shared` or `exclusive`.
        kind: String,
        /// `host:pid`.
        holder: String,
        /// What the holder is doing.
        purpose: String,
        /// Last refresh time (RFC 3339).
        refreshed: String,
    },
    /// A background task failed.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl RepoError {
    /// A `Corrupt` error.
    pub fn corrupt(key: &str, reason: impl Into<String>) -> Self {
        RepoError::Corrupt {
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// An `Invalid` error.
    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        RepoError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}
