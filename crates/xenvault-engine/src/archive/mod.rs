//! The archive target: plain-file backups that `xe vm-import` and `sha256sum`
//! read without xenvault.
//!
//! # Layout
//!
//! ```text
//! <root>/<vm-name>/<YYYYMMDD-HHMMSS>/        one restore point of a VM (UTC time)
//!     vm.xva | disk-<userdevice>.vhd|.raw    the data (optionally `.zst`)
//!     vm.json                                full XAPI records: VM, VBDs, VDIs, VIFs, networks, SRs
//!     vm.cfg, vbd-N.cfg, vdi-N.cfg, vif-N.cfg NAUbackup-style `key=value` files
//!     SHA256SUMS                             `sha256sum -c SHA256SUMS` checks every file above
//!     COMPLETE                               success marker (JSON summary), written last
//! <root>/<vm-name>/.<YYYYMMDD-HHMMSS>.partial/   being written (or left by a crash)
//! <root>/_pool-metadata/<pool>/<ts>/         pool database dumps (same files, marker, manifest)
//! <root>/_hosts/<host>/<ts>/                 host backups
//! <root>/_logs/<job>-<ts>.log|.json          run logs and JSON reports
//! ```
//!
//! VM directory names are sanitised names ([`layout::sanitize_name`]); the
//! VM's UUID is recorded in `COMPLETE` and `vm.json`, and listing and
//! retention group restore points by that UUID, so renamed VMs and two VMs
//! with one name stay apart.
//!
//! A restore point is written under a hidden `.partial` name holding an
//! exclusive lock ([`writer::ArchiveWriter`]); commit fsyncs every file,
//! writes `SHA256SUMS`, then `COMPLETE`, then renames the directory. Anything
//! without the marker is partial: never counted, removed by the next
//! retention unless its writer still holds the lock.
//!
//! Everything here is synchronous file I/O with bounded memory; async callers
//! use `spawn_blocking`.

pub mod layout;
pub mod manifest;
pub mod meta;
pub mod reader;
pub mod retention;
pub mod sink_impl;
pub mod writer;

use std::path::{Path, PathBuf};

pub use layout::{Subject, SubjectKey, SubjectKind};
pub use reader::{PointState, RestorePoint, list, list_subject};
pub use retention::{PruneAction, PruneDecision, PrunePlan, PruneReason, RetentionRules};
pub use sink_impl::ArchiveTarget;
pub use writer::{ArchiveWriter, FileEntry, FileWriter, RawDiskWriter, RunInfo};

/// Anything that went wrong reading or writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A file system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "write", "rename").
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// A file of a restore point is not what its manifest or marker says.
    #[error("{}: {detail}", path.display())]
    Corrupt {
        /// The restore point or file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The writer was used out of order (a bug in the caller).
    #[error("archive writer misuse: {0}")]
    Usage(String),
    /// An encoder refused the data.
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// The encoder's message.
        detail: String,
    },
    /// The target file system is full.
    #[error("the target is full while writing {}: {source}", path.display())]
    Full {
        /// The file being written.
        path: PathBuf,
        /// The system error (ENOSPC / EDQUOT).
        source: std::io::Error,
    },
}

impl ArchiveError {
    /// An I/O error on `path`; ENOSPC and EDQUOT become [`ArchiveError::Full`].
    pub fn io(
        action: &'static str,
        path: impl AsRef<Path>,
        source: std::io::Error,
    ) -> ArchiveError {
        let path = path.as_ref().to_path_buf();
        if matches!(source.raw_os_error(), Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error() || code == rustix::io::Errno::DQUOT.raw_os_error())
            || source.kind() == std::io::ErrorKind::StorageFull
        {
            return ArchiveError::Full { path, source };
        }
        ArchiveError::Io {
            action,
            path,
            source,
        }
    }
}

/// How a file is stored in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileCompression {
    /// As is.
    #[default]
    None,
    /// zstd at this level (the file name gets `.zst`).
    Zstd(i32),
    /// gzip at this level, 0..=9 (the file name gets `.gz`).
    Gzip(u32),
}

impl FileCompression {
    /// The default zstd level for archives (fast, good on disk images).
    pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

    /// The suffix added to file names (`""`, `".zst"` or `".gz"`).
    pub fn suffix(self) -> &'static str {
        match self {
            FileCompression::None => "",
            FileCompression::Zstd(_) => ".zst",
            FileCompression::Gzip(_) => ".gz",
        }
    }
}
