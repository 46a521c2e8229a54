//! Restore from archive restore points: whole VMs through `PUT /import`, single
//! disks into new VDIs through `PUT /import_raw_vdi`, into any pool, and the
//! listing of what can be restored.
//!
//! The flow is the backup pipeline backwards: archive files → (decompress,
//! decode) → XAPI import. Every restore first verifies the restore point's
//! checksums and refuses a damaged archive naming the file; every object a
//! failed restore created on the pool is removed before the error is returned.
//!
//! - [`point`]: what a restore point holds (data files, format, compression).
//! - [`verify`]: the SHA-256 manifest check (and the decompressed sizes).
//! - [`content`]: file contents as upload streams (decompressed, or one disk
//!   extracted from an XVA as raw bytes).
//! - [`connect`]: a pool connection (session + HTTP transfers).
//! - [`inflight`]: the tag on what a restore is still building, and the
//!   sweep that removes what a restore that died left.
//! - [`vm`]: whole-VM restore; [`rebuild`]: the XVA of a per-disk restore
//!   point, built from `vm.json` and the disk files; [`disk`]: one disk into
//!   a new VDI.
//! - [`list`]: restore points per VM, for `xenvault list`.
//! - [`repo`]: every restore from the deduplicating repository (VM, disk,
//!   into an existing VDI, to a file) and its listing.

pub mod connect;
pub mod content;
pub mod disk;
mod error;
pub mod inflight;
pub mod list;
pub mod point;
pub mod rebuild;
pub mod repo;
#[cfg(test)]
pub(crate) mod testing;
pub mod verify;
pub mod vm;

use std::sync::Arc;

pub use connect::PoolConnection;
pub use disk::{DiskRestoreOptions, DiskSelector, RestoredDisk, restore_disk};
pub use error::RestoreError;
pub use list::{ListedPoint, list_points};
pub use point::{ArchivePoint, Compression, DataFile, DataKind, find_point};
pub use verify::{ChecksumStatus, VerifiedPoint, verify_point};
pub use vm::{RestoredVm, VmIdentity, VmRestoreOptions, restore_vm};

/// The steps of a restore, as reported to a progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestorePhase {
    /// Reading the archive files and checking their SHA-256 sums.
    Verifying,
    /// Sending the data to the pool.
    Uploading,
    /// Waiting for XAPI to finish the import task.
    Finishing,
    /// Renaming, tagging, starting the restored VM.
    Configuring,
}

/// Where a restore is: the phase and the bytes done of the phase's total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RestoreProgress {
    /// The step.
    pub phase: RestorePhase,
    /// Bytes processed in this step.
    pub done: u64,
    /// Bytes this step will process (0 when unknown).
    pub total: u64,
}

/// A progress callback: called from any thread, often (cheap callbacks only).
pub type ProgressFn = Arc<dyn Fn(RestoreProgress) + Send + Sync>;

/// Asks a running restore to stop: the upload ends with an error, the import
/// task is cancelled and what the restore created is removed, as for any
/// failure. Cheap to clone; shared between the caller and the restore.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    /// Requests the stop.
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the stop was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A progress callback that ignores everything.
pub fn no_progress() -> ProgressFn {
    Arc::new(|_| {})
}

/// The `other_config` key set on restored VMs and VDIs: `<vm name>/<timestamp>`
/// of the restore point they come from.
pub const RESTORED_FROM_KEY: &str = "xenvault-restored-from";
