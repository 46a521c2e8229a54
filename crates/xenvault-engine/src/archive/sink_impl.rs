//! The archive as a backup target: [`ArchiveTarget`] implements the
//! pipeline's [`BackupTarget`] (crate::sink) on top of
//! [`ArchiveWriter`].
//!
//! - Whole VM: the extents of each disk are re-encoded with
//!   `xenvault_formats::xva::XvaEncoder` into `vm.xva` (plus `.zst`/`.gz`
//!   when compressed), which `xe vm-import` reads.
//! - Per disk: `disk-<userdevice>.raw` (sparse, or streamed through zstd /
//!   gzip) or `disk-<userdevice>.vhd` (a dynamic VHD: the extents are
//!   spooled to a sparse scratch file first, because a VHD's block table
//!   comes before the data; the scratch file is removed at the end).
//! - Always: `vm.json`, `vm.cfg`, `vbd-N.cfg`, `vdi-N.cfg`, `vif-N.cfg`
//!   (see [`super::meta`]); `COMPLETE`'s `details` lists the backup kind and
//!   which file holds which disk (`disk_files`).
//! - Pool database: `_pool-metadata/<pool>/<ts>/pool-database.xml`; host
//!   backup: `_hosts/<host>/<ts>/host-backup.tgz`.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use xenvault_formats::vhd::{VhdEncoder, VhdSpec};
use xenvault_formats::xva::{XvaEncoder, XvaEncoderOptions};
use xenvault_types::extent::is_all_zero;
use xenvault_types::{Extent, ExtentData};

use super::layout::Subject;
use super::meta;
use super::writer::{ArchiveWriter, FileWriter, RawDiskWriter, RunInfo};
use super::{ArchiveError, FileCompression};
use crate::sink::{
    ArtifactKind, ArtifactMeta, ArtifactSink, BackupKind, BackupTarget, Committed, Compression,
    DiskFormat, DiskMeta, ExtentOrder, SinkError, VmMeta, VmSink,
};

/// File name of a pool database dump in its restore point.
pub const POOL_DATABASE_FILE: &str = "pool-database.xml";
/// File name of a host backup in its restore point.
pub const HOST_BACKUP_FILE: &str = "host-backup.tgz";
/// Plain-text restore instructions in every VM restore point.
pub const RESTORE_NOTES_FILE: &str = "RESTORE.txt";
/// File name of a whole-VM backup.
pub const XVA_FILE: &str = "vm.xva";

impl From<ArchiveError> for SinkError {
    fn from(e: ArchiveError) -> SinkError {
        match e {
            ArchiveError::Io {
                action,
                path,
                source,
            } => SinkError::Io {
                action: format!("cannot {action}"),
                path: path.display().to_string(),
                source,
            },
            ArchiveError::Full { path, source } => {
                SinkError::Full(format!("{}: {source}", path.display()))
            }
            ArchiveError::Usage(m) => SinkError::Order(m),
            ArchiveError::Encode { what, detail } => SinkError::Encode { what, detail },
            e @ ArchiveError::Corrupt { .. } => SinkError::Other(e.to_string()),
        }
    }
}

/// An archive directory as a backup target.
#[derive(Debug, Clone)]
pub struct ArchiveTarget {
    root: PathBuf,
}

impl ArchiveTarget {
    /// The archive rooted at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> ArchiveTarget {
        ArchiveTarget { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file_compression(c: Compression) -> FileCompression {
        match c {
            Compression::None => FileCompression::None,
            Compression::Zstd { level } => FileCompression::Zstd(level),
            Compression::Gzip => FileCompression::Gzip(6),
        }
    }
}

/// The file name of a per-disk backup (before any compression suffix).
pub fn disk_file_name(disk: &DiskMeta, format: DiskFormat) -> String {
    let slot = if !disk.userdevice.is_empty()
        && disk.userdevice.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        disk.userdevice.clone()
    } else {
        format!("i{}", disk.index)
    };
    format!("disk-{slot}.{}", format.extension())
}

impl BackupTarget for ArchiveTarget {
    fn describe(&self) -> String {
        format!("archive {}", self.root.display())
    }

    fn begin_vm(&self, m: &VmMeta) -> Result<Box<dyn VmSink>, SinkError> {
        let compression = Self::file_compression(m.compression);
        let mut writer = ArchiveWriter::begin(
            &self.root,
            Subject::vm(&m.vm_uuid, &m.vm_name),
            RunInfo {
                job: m.job.clone(),
                run_id: m.run_id.clone(),
                pool: m.pool.clone(),
            },
            m.snapshot_time,
        )?;
        writer.put_file(
            "vm.json",
            meta::vm_json(&m.vm_uuid, &m.records, &m.source_vm, &m.disks).as_bytes(),
        )?;
        writer.put_file(
            "vm.cfg",
            meta::vm_cfg(&m.vm_uuid, &m.records, &m.source_vm).as_bytes(),
        )?;
        for (name, text) in meta::device_cfgs(&m.records, &m.disks) {
            writer.put_file(&name, text.as_bytes())?;
        }
        let (mode, kind_name, disk_files) = match &m.kind {
            BackupKind::Xva { ova } => {
                let enc = XvaEncoder::new(ova, XvaEncoderOptions::default()).map_err(|e| SinkError::Encode {
                    what: "the XVA".into(),
                    detail: e.to_string(),
                })?;
                let file = writer.create_file(XVA_FILE, compression)?;
                let name = file.name().to_string();
                (
                    Mode::Xva {
                        enc: Box::new(enc),
                        file: Some(Box::new(file)),
                    },
                    "xva",
                    m.disks
                        .iter()
                        .map(|d| json!({"index": d.index, "file": name, "xva_id": d.xva_id, "vdi_uuid": d.vdi_uuid,
                            "source_vdi_uuid": d.source_vdi_uuid, "userdevice": d.userdevice, "virtual_size": d.virtual_size}))
                        .collect::<Vec<_>>(),
                )
            }
            BackupKind::Disks { format } => (
                Mode::Disks { format: *format },
                format.extension(),
                m.disks
                    .iter()
                    .map(|d| {
                        json!({"index": d.index, "file": format!("{}{}", disk_file_name(d, *format), compression.suffix()),
                            "vdi_uuid": d.vdi_uuid, "source_vdi_uuid": d.source_vdi_uuid, "userdevice": d.userdevice,
                            "virtual_size": d.virtual_size, "bootable": d.bootable})
                    })
                    .collect(),
            ),
        };
        let files: Vec<String> = disk_files
            .iter()
            .filter_map(|d| d["file"].as_str().map(str::to_string))
            .collect();
        writer.put_file(
            RESTORE_NOTES_FILE,
            meta::restore_notes(m, kind_name, &files).as_bytes(),
        )?;
        writer.set_details(json!({
            "backup_kind": kind_name,
            "compression": m.compression,
            "snapshot_uuid": m.snapshot_uuid,
            "snapshot_time": xenvault_types::report::rfc3339::format(&m.snapshot_time),
            "vm_name": m.vm_name,
            "disk_files": disk_files,
        }));
        Ok(Box::new(ArchiveVmSink {
            writer: Some(writer),
            mode,
            compression,
            current: None,
        }))
    }

    fn begin_artifact(&self, m: &ArtifactMeta) -> Result<Box<dyn ArtifactSink>, SinkError> {
        let (subject, file) = match &m.kind {
            ArtifactKind::PoolDatabase => (Subject::pool_metadata(&m.pool), POOL_DATABASE_FILE),
            ArtifactKind::HostBackup {
                host_uuid,
                host_name,
            } => (Subject::host(host_uuid, host_name), HOST_BACKUP_FILE),
        };
        let mut writer = ArchiveWriter::begin(
            &self.root,
            subject,
            RunInfo {
                job: m.job.clone(),
                run_id: m.run_id.clone(),
                pool: m.pool.clone(),
            },
            m.started,
        )?;
        writer.set_details(json!({ "kind": m.kind, "compression": m.compression }));
        let file = writer.create_file(file, Self::file_compression(m.compression))?;
        Ok(Box::new(ArchiveArtifactSink {
            writer: Some(writer),
            file: Some(file),
        }))
    }
}

enum Mode {
    Xva {
        enc: Box<XvaEncoder>,
        file: Option<Box<FileWriter>>,
    },
    Disks {
        format: DiskFormat,
    },
}

struct VhdSpool {
    name: String,
    path: PathBuf,
    file: File,
    size: u64,
    vdi_uuid: String,
    blocks: BTreeSet<u32>,
}

enum Current {
    Xva(ExtentOrder),
    Raw(Box<RawDiskWriter>),
    Vhd(Box<VhdSpool>, ExtentOrder),
}

struct ArchiveVmSink {
    writer: Option<ArchiveWriter>,
    mode: Mode,
    compression: FileCompression,
    current: Option<Current>,
}

fn drain(enc: &mut XvaEncoder, file: &mut Option<Box<FileWriter>>) -> Result<(), SinkError> {
    let file = file
        .as_mut()
        .ok_or_else(|| SinkError::Order("the XVA file is already closed".into()))?;
    while let Some(piece) = enc.next_output().map_err(xva_err)? {
        file.write_bytes(&piece)?;
    }
    Ok(())
}

fn xva_err(e: xenvault_formats::xva::XvaError) -> SinkError {
    SinkError::Encode {
        what: "the XVA".into(),
        detail: e.to_string(),
    }
}

const VHD_BLOCK: u64 = xenvault_formats::vhd::DEFAULT_BLOCK_SIZE as u64;

impl VhdSpool {
    fn write(&mut self, extent: &Extent) -> Result<(), SinkError> {
        let ExtentData::Data(bytes) = &extent.data else {
            return Ok(());
        };
        self.file
            .write_all_at(bytes, extent.offset)
            .map_err(|e| SinkError::from(ArchiveError::io("write", &self.path, e)))?;
        let mut pos = extent.offset;
        let end = extent.end();
        while pos < end {
            let block = pos / VHD_BLOCK;
            let block_end = ((block + 1) * VHD_BLOCK).min(end);
            let slice =
                &bytes[(pos - extent.offset) as usize..(block_end - extent.offset) as usize];
            if !is_all_zero(slice) {
                self.blocks
                    .insert(u32::try_from(block).map_err(|_| SinkError::Encode {
                        what: format!("{} as VHD", self.name),
                        detail: "disk too large".into(),
                    })?);
            }
            pos = block_end;
        }
        Ok(())
    }

    fn encode(self, writer: &ArchiveWriter, compression: FileCompression) -> Result<(), SinkError> {
        let what = || format!("{} as VHD", self.name);
        let uid = uuid::Uuid::parse_str(&self.vdi_uuid).unwrap_or_else(|_| uuid::Uuid::new_v4());
        let mut enc = VhdEncoder::new(
            VhdSpec::dynamic(self.size, uid),
            self.blocks.iter().copied(),
        )
        .map_err(|e| SinkError::Encode {
            what: what(),
            detail: e.to_string(),
        })?;
        self.file
            .set_len(self.size)
            .map_err(|e| SinkError::from(ArchiveError::io("extend", &self.path, e)))?;
        let mut out = writer.create_file(&self.name, compression)?;
        out.write_bytes(enc.prologue())?;
        let mut buf = vec![0u8; VHD_BLOCK as usize];
        let blocks: Vec<u32> = enc.allocated_blocks().to_vec();
        for b in blocks {
            let start = u64::from(b) * VHD_BLOCK;
            let len = VHD_BLOCK.min(self.size - start) as usize;
            self.file
                .read_exact_at(&mut buf[..len], start)
                .map_err(|e| SinkError::from(ArchiveError::io("read", &self.path, e)))?;
            let piece = enc
                .encode_block(b, &buf[..len])
                .map_err(|e| SinkError::Encode {
                    what: what(),
                    detail: e.to_string(),
                })?;
            out.write_bytes(&piece)?;
        }
        let footer = enc.finish().map_err(|e| SinkError::Encode {
            what: what(),
            detail: e.to_string(),
        })?;
        out.write_bytes(&footer)?;
        out.finish()?;
        drop(self.file);
        let _ = std::fs::remove_file(&self.path);
        Ok(())
    }
}

impl ArchiveVmSink {
    fn writer(&self) -> Result<&ArchiveWriter, SinkError> {
        self.writer
            .as_ref()
            .ok_or_else(|| SinkError::Order("the backup is already closed".into()))
    }
}

impl VmSink for ArchiveVmSink {
    fn begin_disk(&mut self, disk: &DiskMeta) -> Result<(), SinkError> {
        if self.current.is_some() {
            return Err(SinkError::Order(format!(
                "begin_disk({}) while another disk is open",
                disk.index
            )));
        }
        let compression = self.compression;
        let current = match &mut self.mode {
            Mode::Xva { enc, file } => {
                let id = disk.xva_id.as_deref().ok_or_else(|| {
                    SinkError::Order(format!(
                        "disk {} of an XVA backup has no xva_id",
                        disk.index
                    ))
                })?;
                enc.start_disk(id).map_err(xva_err)?;
                drain(enc, file)?;
                Current::Xva(ExtentOrder::new(disk.virtual_size))
            }
            Mode::Disks { format } => {
                let name = disk_file_name(disk, *format);
                let format = *format;
                let writer = self.writer()?;
                match format {
                    DiskFormat::Raw => Current::Raw(Box::new(writer.create_raw_disk(
                        &name,
                        disk.virtual_size,
                        compression,
                    )?)),
                    DiskFormat::Vhd => {
                        // Refuse before any data is spooled what the encoder
                        // would refuse at the end.
                        if !disk.virtual_size.is_multiple_of(512)
                            || disk.virtual_size > xenvault_formats::vhd::MAX_WRITE_VIRTUAL_SIZE
                        {
                            return Err(SinkError::Encode {
                                what: format!("{name} as VHD"),
                                detail: format!(
                                    "virtual size {} is not a multiple of 512 or exceeds the VHD limit of 2040 GiB; use raw",
                                    disk.virtual_size
                                ),
                            });
                        }
                        let path = writer.scratch_path(&name);
                        let file = File::options()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .open(&path)
                            .map_err(|e| SinkError::from(ArchiveError::io("create", &path, e)))?;
                        Current::Vhd(
                            Box::new(VhdSpool {
                                name,
                                path,
                                file,
                                size: disk.virtual_size,
                                vdi_uuid: disk.vdi_uuid.clone(),
                                blocks: BTreeSet::new(),
                            }),
                            ExtentOrder::new(disk.virtual_size),
                        )
                    }
                }
            }
        };
        self.current = Some(current);
        Ok(())
    }

    fn extent(&mut self, extent: Extent) -> Result<(), SinkError> {
        match (&mut self.current, &mut self.mode) {
            (Some(Current::Xva(order)), Mode::Xva { enc, file }) => {
                order.check(&extent)?;
                enc.push(extent).map_err(xva_err)?;
                drain(enc, file)
            }
            (Some(Current::Raw(w)), _) => Ok(w.write_extent(&extent)?),
            (Some(Current::Vhd(spool, order)), _) => {
                order.check(&extent)?;
                spool.write(&extent)
            }
            _ => Err(SinkError::Order(
                "extent outside begin_disk/end_disk".into(),
            )),
        }
    }

    fn end_disk(&mut self) -> Result<(), SinkError> {
        let compression = self.compression;
        match (self.current.take(), &mut self.mode) {
            (Some(Current::Xva(_)), Mode::Xva { enc, file }) => {
                enc.end_disk().map_err(xva_err)?;
                drain(enc, file)
            }
            (Some(Current::Raw(w)), _) => {
                w.finish()?;
                Ok(())
            }
            (Some(Current::Vhd(spool, _)), _) => spool.encode(self.writer()?, compression),
            _ => Err(SinkError::Order("end_disk without begin_disk".into())),
        }
    }

    fn commit(mut self: Box<Self>) -> Result<Committed, SinkError> {
        if self.current.is_some() {
            return Err(SinkError::Order("commit while a disk is open".into()));
        }
        if let Mode::Xva { enc, file } = &mut self.mode {
            enc.finish().map_err(xva_err)?;
            drain(enc, file)?;
            if let Some(f) = file.take() {
                f.finish()?;
            }
        }
        let writer = self
            .writer
            .take()
            .ok_or_else(|| SinkError::Order("commit twice".into()))?;
        let point = writer.commit()?;
        Ok(Committed {
            location: point.path.display().to_string(),
            bytes_written: point.marker().map(|m| m.bytes).unwrap_or(0),
        })
    }

    fn abort(mut self: Box<Self>, reason: &str) -> Result<(), SinkError> {
        tracing::info!("aborting archive backup: {reason}");
        self.current = None;
        if let Mode::Xva { file, .. } = &mut self.mode {
            file.take();
        }
        match self.writer.take() {
            Some(w) => Ok(w.abort()?),
            None => Ok(()),
        }
    }
}

struct ArchiveArtifactSink {
    writer: Option<ArchiveWriter>,
    file: Option<FileWriter>,
}

impl ArtifactSink for ArchiveArtifactSink {
    fn write(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| SinkError::Order("write after commit".into()))?;
        Ok(file.write_bytes(bytes)?)
    }

    fn commit(mut self: Box<Self>) -> Result<Committed, SinkError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| SinkError::Order("commit twice".into()))?;
        file.finish()?;
        let writer = self
            .writer
            .take()
            .ok_or_else(|| SinkError::Order("commit twice".into()))?;
        let point = writer.commit()?;
        Ok(Committed {
            location: point.path.display().to_string(),
            bytes_written: point.marker().map(|m| m.bytes).unwrap_or(0),
        })
    }

    fn abort(mut self: Box<Self>, reason: &str) -> Result<(), SinkError> {
        tracing::info!("aborting archive artifact: {reason}");
        self.file.take();
        match self.writer.take() {
            Some(w) => Ok(w.abort()?),
            None => Ok(()),
        }
    }
}
