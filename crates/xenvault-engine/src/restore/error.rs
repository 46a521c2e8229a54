//! The errors of restore: each names the file, object or option at fault and
//! what to do about it.

use std::path::PathBuf;

use xenvault_xapi::error::Error as XapiError;
use xenvault_xapi::http::HttpError;

/// Why a restore (or a listing) failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The restore point's files are damaged or missing: the restore is refused
    /// before anything is created on the pool.
    #[error(
        "the archive is damaged: {file}: {problem}; nothing was restored (pick another restore point with `xenvault list`)"
    )]
    Damaged {
        /// The file at fault.
        file: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The restore point cannot be restored this way.
    #[error("restore point {dir}: {reason}")]
    Unusable {
        /// The restore point's directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// No restore point matches the request.
    #[error("{0}")]
    NotFound(String),
    /// Restoring with the original identity would clash with a VM that exists.
    #[error(
        "VM {uuid} ({name}) still exists on the pool: restoring with its identity would replace it; restore it as a new VM (leave out --preserve-identity) or pass --force to replace it"
    )]
    OriginalExists {
        /// The VM's uuid.
        uuid: String,
        /// Its current name.
        name: String,
    },
    /// The VDI chosen to be written into cannot be: attached to a running
    /// VM, read-only, smaller than the disk, or missing.
    #[error("{0}")]
    BadTarget(String),
    /// The chosen SR does not exist (or is not usable for disks).
    #[error("SR {0}")]
    BadSr(String),
    /// An XAPI call failed.
    #[error("{what}: {source}")]
    Xapi {
        /// What was being done.
        what: String,
        /// The XAPI error (code and parameters kept).
        #[source]
        source: XapiError,
    },
    /// An HTTP transfer failed (and the task did not say more).
    #[error("{what}: {source}")]
    Http {
        /// What was being done.
        what: String,
        /// The transfer error (URLs redacted).
        #[source]
        source: HttpError,
    },
    /// The data could not be decoded (XVA, VHD, compression).
    #[error("{file}: {problem}")]
    Decode {
        /// The archive file.
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The repository failed: a damaged or missing object (named in the
    /// source), a wrong password, a storage error.
    #[error("{what}: {source}")]
    Repo {
        /// What was being done.
        what: String,
        /// The repository's error (names the object at fault).
        #[source]
        source: Box<xenvault_repo::RepoError>,
    },
    /// The restore was cancelled ([`super::Cancel`]); what it created was
    /// removed.
    #[error("the restore was cancelled; what it had created was removed")]
    Cancelled,
    /// The restore failed and removing what it had created failed too: the
    /// objects named are left on the pool.
    #[error("{cause}; cleaning up also failed, remove by hand: {leftovers}")]
    CleanupFailed {
        /// The restore's own error.
        cause: Box<RestoreError>,
        /// The objects left behind and why.
        leftovers: String,
    },
}

impl RestoreError {
    /// Wraps an XAPI error with what was being done.
    pub fn xapi(what: impl Into<String>, source: XapiError) -> RestoreError {
        RestoreError::Xapi {
            what: what.into(),
            source,
        }
    }

    /// Wraps a repository error with what was being done.
    pub fn repo(what: impl Into<String>, source: xenvault_repo::RepoError) -> RestoreError {
        RestoreError::Repo {
            what: what.into(),
            source: Box::new(source),
        }
    }

    /// Wraps an I/O error with the path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> RestoreError {
        RestoreError::Io {
            path: path.into(),
            source,
        }
    }

    /// True when the error is about the archive (bad input), not the pool.
    pub fn is_archive_problem(&self) -> bool {
        matches!(
            self,
            RestoreError::Damaged { .. }
                | RestoreError::Unusable { .. }
                | RestoreError::NotFound(_)
                | RestoreError::Decode { .. }
        ) || matches!(
            self,
            RestoreError::Repo { source, .. } if matches!(
                **source,
                xenvault_repo::RepoError::Corrupt { .. }
                    | xenvault_repo::RepoError::Tampered { .. }
                    | xenvault_repo::RepoError::NotFound(_)
            )
        )
    }
}
