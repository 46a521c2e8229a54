//! The sink side of the backup pipeline (source → extents → sink): the traits
//! every backup destination implements, and the metadata it is given.
//!
//! The engine decodes what XAPI sends (an XVA from `/export`, a VHD or raw
//! disk from `/export_raw_vdi`) into [`Extent`]s and feeds them to a sink.
//! The archive writer (plain files) is the first implementation, the
//! deduplicating repository (issue 4) the second; both see the same calls.
//!
//! # Call order
//!
//! For one VM the engine calls, on a blocking thread (sinks do file I/O,
//! hashing and compression; they are synchronous on purpose):
//!
//! 1. [`BackupTarget::begin_vm`] with [`VmMeta`] (full records, the backup
//!    kind, timestamps) → a [`VmSink`];
//! 2. for every disk, in [`VmMeta::disks`] order: [`VmSink::begin_disk`],
//!    [`VmSink::extent`] for each extent in strictly increasing offset order
//!    (a full backup covers `0..virtual_size` with `Data` and `Zero` extents),
//!    [`VmSink::end_disk`];
//! 3. [`VmSink::commit`] — only then does the backup count — or
//!    [`VmSink::abort`] on any failure (source, decode, sink, cleanup of the
//!    run). Dropping a `VmSink` without either must be as safe as `abort`
//!    (nothing counted; the next run's retention removes what is left).
//!
//! Whole files that are not disks (pool database dumps, host backups) go
//! through [`BackupTarget::begin_artifact`] → [`ArtifactSink`]: bytes in
//! order, then commit or abort.
//!
//! # XVA backups
//!
//! A whole-VM backup ([`BackupKind::Xva`]) is exported by XAPI as an XVA and
//! decoded by the engine with `xenvault_formats::xva::XvaDecoder`: the sink
//! receives the decoded `ova.xml` (`BackupKind::Xva { ova }`) in [`VmMeta`],
//! then each disk of `ova.disks()` (in that order; [`DiskMeta::xva_id`] is its
//! `Ref:N`) as extents. The archive sink re-encodes the `.xva` with
//! `xenvault_formats::xva::XvaEncoder::new(&ova, ..)`, `start_disk(xva_id)`,
//! `push(extent)`, `end_disk()`, `finish()`: the result is an XVA that
//! `xe vm-import` reads, while the repository sink stores the same extents
//! (and `ova.xml`) and can rebuild an XVA at restore time. Host compression
//! (`use_compression`) only shrinks the transfer: the engine decompresses
//! before decoding; how the sink stores bytes is [`VmMeta::compression`].
//!
//! # Per-disk backups
//!
//! [`BackupKind::Disks`] exports each disk with `/export_raw_vdi` (VHD or
//! raw) and decodes it; the sink gets the same extents and writes the file
//! format named by [`DiskFormat`] (a VHD writer needs the allocated blocks
//! before the data: buffer or write the BAT at the end, the sink's choice).

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use xenvault_formats::xva::{ExportRecords, OvaXml};
use xenvault_types::{Extent, Value};

/// Where a backup's bytes go: an archive directory, a repository.
///
/// Shared by the parallel VM runs of a job (`Send + Sync`); each VM gets its
/// own [`VmSink`].
pub trait BackupTarget: Send + Sync {
    /// A short human description for logs and reports (e.g. the directory).
    fn describe(&self) -> String;

    /// Starts the backup of one VM. Must not make anything visible as a
    /// complete backup before [`VmSink::commit`].
    fn begin_vm(&self, meta: &VmMeta) -> Result<Box<dyn VmSink>, SinkError>;

    /// Starts storing a whole file that is not a VM disk (pool database,
    /// host backup).
    fn begin_artifact(&self, meta: &ArtifactMeta) -> Result<Box<dyn ArtifactSink>, SinkError>;
}

/// The backup of one VM in progress.
pub trait VmSink: Send {
    /// Starts a disk. Disks come in [`VmMeta::disks`] order.
    fn begin_disk(&mut self, disk: &DiskMeta) -> Result<(), SinkError>;

    /// A run of the current disk, at an offset past the previous extent's end.
    fn extent(&mut self, extent: Extent) -> Result<(), SinkError>;

    /// The current disk is complete (its stream was fully decoded and
    /// verified).
    fn end_disk(&mut self) -> Result<(), SinkError>;

    /// Makes the backup complete and counted (e.g. checksums, success marker,
    /// rename into place). Only after every disk ended.
    fn commit(self: Box<Self>) -> Result<Committed, SinkError>;

    /// Gives up: nothing of this backup may count as a restore point.
    /// Best effort; errors are reported, never retried by the engine.
    fn abort(self: Box<Self>, reason: &str) -> Result<(), SinkError>;
}

/// A whole file being stored (pool database dump, host backup).
pub trait ArtifactSink: Send {
    /// The next bytes of the file.
    fn write(&mut self, bytes: &[u8]) -> Result<(), SinkError>;

    /// The file is complete: store it for good.
    fn commit(self: Box<Self>) -> Result<Committed, SinkError>;

    /// Gives up: nothing stored counts.
    fn abort(self: Box<Self>, reason: &str) -> Result<(), SinkError>;
}

/// What a sink stored, for the run report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// Where the backup now is (a directory, a restore-point id).
    pub location: String,
    /// Bytes written to the target (after compression).
    pub bytes_written: u64,
}

/// How a sink compresses what it stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Store as is (an archive `.xva` that `xe vm-import` reads directly).
    #[default]
    None,
    /// zstd on our side (`.zst` files in an archive), at this level (1–19).
    Zstd {
        /// The zstd level (3 is zstd's default).
        level: i32,
    },
    /// gzip (what the host sends with `use_compression=gzip`).
    Gzip,
}

/// The file format of a per-disk backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A dynamic VHD (`.vhd`).
    Vhd,
    /// A raw image (`.raw`).
    Raw,
}

impl DiskFormat {
    /// The file extension without a dot.
    pub fn extension(self) -> &'static str {
        match self {
            DiskFormat::Vhd => "vhd",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Whether the VM is stored whole (XVA) or disk by disk.
#[derive(Debug, Clone)]
pub enum BackupKind {
    /// The whole VM as an XVA: `ova.xml` (as XAPI exported it) plus disks.
    Xva {
        /// The decoded `ova.xml` of the export; the disks of `ova.disks()`
        /// follow in that order.
        ova: Box<OvaXml>,
    },
    /// Each disk on its own, in this format.
    Disks {
        /// The format to write.
        format: DiskFormat,
    },
}

/// Everything a sink knows about the VM being backed up.
#[derive(Debug, Clone)]
pub struct VmMeta {
    /// The job's name.
    pub job: String,
    /// The run's id (also in the `xenvault:run` tag of temporary objects).
    pub run_id: String,
    /// The pool's name (or URL when it has none).
    pub pool: String,
    /// The VM's UUID (the live VM, not the snapshot).
    pub vm_uuid: String,
    /// The VM's name label (archive directory name; sanitized by the sink).
    pub vm_name: String,
    /// The UUID of the snapshot that was exported.
    pub snapshot_uuid: String,
    /// When the snapshot was taken (the restore point's time).
    pub snapshot_time: OffsetDateTime,
    /// Whole VM or disks.
    pub kind: BackupKind,
    /// The disks that will follow, in order.
    pub disks: Vec<DiskMeta>,
    /// The full records of the exported snapshot: VM, VBDs, VDIs, VIFs,
    /// networks, SRs, keyed by reference, as `get_record` returned them
    /// (`Value::to_json` gives `vm.json`).
    pub records: ExportRecords,
    /// The live VM's record at backup time (name, tags, description of the
    /// VM itself rather than its snapshot).
    pub source_vm: Value,
    /// How the sink should compress what it stores.
    pub compression: Compression,
}

/// One disk of a VM backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMeta {
    /// Position in [`VmMeta::disks`] (0-based).
    pub index: usize,
    /// UUID of the exported VDI (the snapshot's disk).
    pub vdi_uuid: String,
    /// UUID of the live VDI it is a snapshot of (empty if unknown).
    pub source_vdi_uuid: String,
    /// The VDI's name label.
    pub name: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// The VBD's `userdevice` ("0", "1", …).
    pub userdevice: String,
    /// Whether the VBD is bootable.
    pub bootable: bool,
    /// The disk's XVA id (`Ref:N`) in an XVA backup, `None` otherwise.
    pub xva_id: Option<String>,
}

/// What kind of whole file an [`ArtifactSink`] stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ArtifactKind {
    /// The pool database (`/pool/xmldbdump`, XML).
    PoolDatabase,
    /// A host's backup (`/host_backup`, a compressed tar of dom0).
    HostBackup {
        /// The host's UUID.
        host_uuid: String,
        /// The host's name label.
        host_name: String,
    },
}

/// Metadata of a whole file to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactMeta {
    /// The job's name.
    pub job: String,
    /// The run's id.
    pub run_id: String,
    /// The pool's name (or URL when it has none).
    pub pool: String,
    /// What it is.
    pub kind: ArtifactKind,
    /// When the transfer started.
    pub started: OffsetDateTime,
    /// How the sink should compress it.
    pub compression: Compression,
}

/// A sink failure.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file or directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot write", "cannot rename").
        action: String,
        /// The path concerned.
        path: String,
        /// The system error.
        source: std::io::Error,
    },
    /// The calls did not follow the contract (a bug in the caller).
    #[error("sink misuse: {0}")]
    Order(String),
    /// An encoder refused the data.
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// What was being encoded ("the XVA", "disk 0 as VHD").
        what: String,
        /// The encoder's message.
        detail: String,
    },
    /// The target has no room left.
    #[error("the target is full: {0}")]
    Full(String),
    /// Anything else, with a message that names the place.
    #[error("{0}")]
    Other(String),
}

impl SinkError {
    /// An I/O error on `path`.
    pub fn io(action: impl Into<String>, path: impl fmt::Display, source: std::io::Error) -> Self {
        SinkError::Io {
            action: action.into(),
            path: path.to_string(),
            source,
        }
    }
}

/// Checks that extents of one disk follow the contract (increasing, inside
/// the disk). The engine runs every extent through it before the sink; sinks
/// may use it too.
#[derive(Debug, Clone)]
pub struct ExtentOrder {
    size: u64,
    next: u64,
}

impl ExtentOrder {
    /// A checker for a disk of `size` bytes.
    pub fn new(size: u64) -> ExtentOrder {
        ExtentOrder { size, next: 0 }
    }

    /// Accepts `extent` if it starts at or after the previous end and ends
    /// inside the disk.
    pub fn check(&mut self, extent: &Extent) -> Result<(), SinkError> {
        if extent.offset < self.next {
            return Err(SinkError::Order(format!(
                "extent at {} overlaps or precedes the previous end {}",
                extent.offset, self.next
            )));
        }
        let end = extent
            .offset
            .checked_add(extent.len())
            .ok_or_else(|| SinkError::Order(format!("extent at {} overflows", extent.offset)))?;
        if end > self.size {
            return Err(SinkError::Order(format!(
                "extent {}..{} passes the disk end {}",
                extent.offset, end, self.size
            )));
        }
        self.next = end;
        Ok(())
    }

    /// The end of the last accepted extent.
    pub fn position(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_order_accepts_increasing_and_refuses_overlap() {
        let mut order = ExtentOrder::new(100);
        assert!(order.check(&Extent::data(0, vec![1; 10])).is_ok());
        assert!(order.check(&Extent::zero(20, 10)).is_ok());
        assert_eq!(order.position(), 30);
        assert!(order.check(&Extent::zero(25, 1)).is_err());
        assert!(order.check(&Extent::zero(90, 11)).is_err());
        assert!(order.check(&Extent::zero(90, 10)).is_ok());
    }

    #[test]
    fn disk_format_extensions() {
        assert_eq!(DiskFormat::Vhd.extension(), "vhd");
        assert_eq!(DiskFormat::Raw.extension(), "raw");
    }
}
