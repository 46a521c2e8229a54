//! A restore point to a file, without a pool: one disk as raw (sparse: the
//! zero chunks are holes) or as a dynamic VHD, or the whole VM as an XVA
//! that `xe vm-import` takes. The file is written under a temporary name
//! in the same directory and renamed at the end; a failure removes it.

use std::fs::File;
use std::io::{self, BufWriter, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use tokio::runtime::Handle;
use xenvault_formats::xva::ChecksumKind;
use xenvault_repo::{Manifest, Repository};
use xenvault_types::ExtentData;

use super::encode::{
    BlockingDisk, VHD_BLOCK_SIZE, dynamic_vhd, manifest_ova, vhd_blocks_of_index, vhd_pieces,
    xva_pieces,
};
use super::{DEFAULT_PARALLEL, RepoFailure, point_label, select_disk};
use crate::restore::rebuild::measure_ova;
use crate::restore::vm::edit_ova;
use crate::restore::{
    Cancel, DiskSelector, ProgressFn, RestoreError, RestorePhase, RestoreProgress,
};

/// The file formats a restore point can be written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// One disk, raw bytes (a sparse file).
    Raw,
    /// One disk, a dynamic VHD.
    Vhd,
    /// The whole VM, an XVA.
    Xva,
}

impl std::str::FromStr for FileFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(FileFormat::Raw),
            "vhd" | "vpc" => Ok(FileFormat::Vhd),
            "xva" => Ok(FileFormat::Xva),
            other => Err(format!(
                "unknown file format {other:?}: use raw, vhd or xva"
            )),
        }
    }
}

/// How to write a restore point to a file.
#[derive(Debug, Clone)]
pub struct FileRestoreOptions {
    /// The file to write.
    pub path: PathBuf,
    /// Its format.
    pub format: FileFormat,
    /// The disk (raw and VHD only).
    pub disk: Option<DiskSelector>,
    /// Replace an existing file.
    pub overwrite: bool,
    /// Flush the file to disk (`fsync`) before renaming it into place
    /// (default true: a crash never leaves a complete-looking but partial
    /// file). Off, the restore is faster and the OS writes the data later.
    pub sync: bool,
    /// Chunks fetched at once.
    pub parallel: usize,
    /// Stops the restore when set (the temporary file is removed).
    pub cancel: Cancel,
}

impl FileRestoreOptions {
    /// `format` to `path` (set `disk` for raw and VHD).
    pub fn new(path: impl Into<PathBuf>, format: FileFormat) -> FileRestoreOptions {
        FileRestoreOptions {
            path: path.into(),
            format,
            disk: None,
            overwrite: false,
            sync: true,
            parallel: DEFAULT_PARALLEL,
            cancel: Cancel::default(),
        }
    }
}

/// What a restore to a file did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredFile {
    /// The restore point (`<vm name>/<id>`).
    pub source: String,
    /// The file written.
    pub path: String,
    /// Its format.
    pub format: FileFormat,
    /// The disk written (raw and VHD).
    pub disk_key: Option<String>,
    /// Bytes of disk data it holds (the disk's size; for an XVA the sum).
    pub size: u64,
    /// The file's length.
    pub bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// `<dir>/.<name>.xenvault-partial`: where the file is written first.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "restore".into());
    path.with_file_name(format!(".{name}.xenvault-partial-{}", std::process::id()))
}

fn cancelled(cancel: &Cancel) -> io::Result<()> {
    if cancel.is_cancelled() {
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "the restore was cancelled",
        ))
    } else {
        Ok(())
    }
}

/// Bytes written between two background syncs ([`WriteBehind`]).
const WRITE_BEHIND_STEP: u64 = 64 << 20;

/// Keeps the disk writing while the restore goes on, when the file is to be
/// fsynced at the end: every [`WRITE_BEHIND_STEP`] bytes written, a thread of
/// its own `fdatasync`s the file (through a duplicate of its descriptor), so
/// the disk writes while the next chunks are fetched and decoded and the final
/// `fsync` finds little left. (A `posix_fadvise(DONTNEED)` kick, tried first,
/// left most of the data to the final `fsync`: ADR 0010.)
///
/// A failed background sync is reported by [`WriteBehind::finish`]: the
/// duplicate shares the file's open description, so the kernel reports a
/// write-back error once, to whichever sync sees it first.
struct WriteBehind {
    kicked_to: u64,
    syncer: Option<(
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<io::Result<()>>,
    )>,
}

impl WriteBehind {
    /// Starts the syncing thread for `file` when `enabled` (the restore
    /// fsyncs); otherwise does nothing.
    fn new(file: &File, enabled: bool) -> io::Result<WriteBehind> {
        let syncer = if enabled {
            let dup = file.try_clone()?;
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("restore-sync".into())
                .spawn(move || -> io::Result<()> {
                    while rx.recv().is_ok() {
                        // Requests that queued up meanwhile are served by this sync.
                        while rx.try_recv().is_ok() {}
                        dup.sync_data()?;
                    }
                    Ok(())
                })?;
            Some((tx, thread))
        } else {
            None
        };
        Ok(WriteBehind {
            kicked_to: 0,
            syncer,
        })
    }

    /// Everything below `end` has been handed to the kernel.
    fn written_to(&mut self, end: u64) {
        if let Some((tx, _)) = &self.syncer
            && end >= self.kicked_to + WRITE_BEHIND_STEP
        {
            // A stopped thread (a failed sync) reports its error at `finish`.
            let _ = tx.send(());
            self.kicked_to = end;
        }
    }

    /// Waits for the syncing thread (its error, if any, is the restore's),
    /// then, when the restore fsyncs, syncs what is left of `file`.
    fn finish(self, file: &File) -> io::Result<()> {
        let Some((tx, thread)) = self.syncer else {
            return Ok(());
        };
        drop(tx);
        thread
            .join()
            .map_err(|_| io::Error::other("the background sync thread panicked"))??;
        file.sync_all()
    }
}

/// What the blocking writer does.
enum Plan {
    Raw {
        key: String,
        size: u64,
    },
    Vhd {
        key: String,
        size: u64,
        enc: xenvault_formats::vhd::VhdEncoder,
    },
    Xva {
        ova: Box<xenvault_formats::xva::OvaXml>,
        disks: Vec<super::RepoDisk>,
    },
}

/// Writes a disk of `manifest` (raw or VHD) or its whole VM (XVA) to
/// `options.path`.
pub async fn restore_repo_to_file(
    repo: &Repository,
    manifest: &Manifest,
    options: &FileRestoreOptions,
    progress: ProgressFn,
) -> Result<RestoredFile, RestoreError> {
    let started_at = Instant::now();
    let label = point_label(manifest);
    let path = options.path.clone();
    if !options.overwrite && std::fs::symlink_metadata(&path).is_ok() {
        return Err(RestoreError::BadTarget(format!(
            "{} exists: choose another file or allow overwriting it",
            path.display()
        )));
    }
    let (plan, total, disk_key) = match options.format {
        FileFormat::Raw | FileFormat::Vhd => {
            let selector = options.disk.as_ref().ok_or_else(|| {
                RestoreError::NotFound(format!(
                    "a {} file holds one disk: say which disk of {label} (position, VDI uuid or key)",
                    if options.format == FileFormat::Raw { "raw" } else { "VHD" }
                ))
            })?;
            let disk = select_disk(manifest, selector)?;
            if options.format == FileFormat::Raw {
                (
                    Plan::Raw {
                        key: disk.key.clone(),
                        size: disk.size,
                    },
                    disk.size,
                    Some(disk.key),
                )
            } else {
                let entry = manifest
                    .disk(&disk.key)
                    .map_err(|e| RestoreError::repo(format!("restore point {label}"), e))?;
                let index = repo.load_index(&entry.index).await.map_err(|e| {
                    RestoreError::repo(format!("reading disk {} of {label}", disk.key), e)
                })?;
                let blocks = vhd_blocks_of_index(&index, VHD_BLOCK_SIZE);
                let enc =
                    dynamic_vhd(disk.size, &blocks).map_err(|reason| RestoreError::Unusable {
                        dir: label.clone().into(),
                        reason,
                    })?;
                let total = enc.total_len();
                (
                    Plan::Vhd {
                        key: disk.key.clone(),
                        size: disk.size,
                        enc,
                    },
                    total,
                    Some(disk.key),
                )
            }
        }
        FileFormat::Xva => {
            let (mut ova, disks) = manifest_ova(manifest)?;
            // A plain VM named as the original, without xenvault's tags.
            edit_ova(&mut ova, &manifest.vm_name, None, None);
            let total = measure_ova(&ova).map_err(|reason| RestoreError::Unusable {
                dir: label.clone().into(),
                reason,
            })?;
            (
                Plan::Xva {
                    ova: Box::new(ova),
                    disks,
                },
                total,
                None,
            )
        }
    };
    let size = match &plan {
        Plan::Raw { size, .. } | Plan::Vhd { size, .. } => *size,
        Plan::Xva { disks, .. } => disks.iter().map(|d| d.size).sum(),
    };

    let tmp = temp_path(&path);
    let failure = RepoFailure::default();
    let written = {
        let (repo, manifest) = (repo.clone(), manifest.clone());
        let (failure, progress, cancel) =
            (failure.clone(), progress.clone(), options.cancel.clone());
        let (tmp, path) = (tmp.clone(), path.clone());
        let parallel = options.parallel.max(1);
        let sync = options.sync;
        let handle = Handle::current();
        tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let file = File::create(&tmp)?;
            let mut behind = WriteBehind::new(&file, sync)?;
            let report = |done: u64| {
                progress(RestoreProgress {
                    phase: RestorePhase::Uploading,
                    done,
                    total,
                })
            };
            let len = match plan {
                Plan::Raw { key, size } => {
                    file.set_len(size)?;
                    let mut disk = BlockingDisk::open(
                        handle, &repo, &manifest, &key, None, parallel, failure,
                    )?;
                    while let Some(e) = disk.next_before(size)? {
                        cancelled(&cancel)?;
                        // Zero chunks stay holes of the sparse file.
                        if let ExtentData::Data(d) = &e.data {
                            file.write_all_at(d, e.offset)?;
                            behind.written_to(e.end());
                        }
                        report(e.end());
                    }
                    behind.finish(&file)?;
                    size
                }
                Plan::Vhd { key, enc, .. } => {
                    let mut disk = BlockingDisk::open(
                        handle, &repo, &manifest, &key, None, parallel, failure,
                    )?;
                    let mut out = BufWriter::with_capacity(1 << 20, &file);
                    let mut done = 0u64;
                    let n = vhd_pieces(&mut disk, enc, &mut |piece: Bytes| {
                        cancelled(&cancel)?;
                        out.write_all(&piece)?;
                        done += piece.len() as u64;
                        // What the buffer still holds is not in the file yet.
                        let in_file = done - out.buffer().len() as u64;
                        behind.written_to(in_file);
                        report(done);
                        Ok(())
                    })?;
                    out.flush()?;
                    drop(out);
                    behind.finish(&file)?;
                    n
                }
                Plan::Xva { ova, disks } => {
                    let mut out = BufWriter::with_capacity(1 << 20, &file);
                    let mut done = 0u64;
                    let n = xva_pieces(
                        &handle,
                        &repo,
                        &manifest,
                        &ova,
                        &disks,
                        parallel,
                        &failure,
                        // SHA-1: read by every XAPI version and by xva-img.
                        ChecksumKind::Sha1,
                        &mut |piece: Bytes| {
                            cancelled(&cancel)?;
                            out.write_all(&piece)?;
                            done += piece.len() as u64;
                            let in_file = done - out.buffer().len() as u64;
                            behind.written_to(in_file);
                            report(done);
                            Ok(())
                        },
                    )?;
                    out.flush()?;
                    drop(out);
                    behind.finish(&file)?;
                    n
                }
            };
            std::fs::rename(&tmp, &path)?;
            if sync
                && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                && let Ok(d) = File::open(dir)
            {
                let _ = d.sync_all();
            }
            Ok(len)
        })
        .await
        .map_err(|e| io::Error::other(format!("the writer stopped: {e}")))
        .and_then(|r| r)
    };
    let bytes = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            if options.cancel.is_cancelled() {
                return Err(RestoreError::Cancelled);
            }
            return Err(failure.explain(RestoreError::BadTarget(format!(
                "cannot write {}: {e}",
                path.display()
            ))));
        }
    };
    Ok(RestoredFile {
        source: label,
        path: path.display().to_string(),
        format: options.format,
        disk_key,
        size,
        bytes,
        seconds: started_at.elapsed().as_secs_f64(),
    })
}
