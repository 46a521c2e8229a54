//! Writing one restore point: [`ArchiveWriter`] creates the hidden
//! `.<ts>.partial` directory (locked), hands out streaming writers that hash
//! as they write, and commits (fsync, `SHA256SUMS`, `COMPLETE` last, rename)
//! or aborts (removes the directory).
//!
//! Writers own their file and share the list of finished files with the
//! [`ArchiveWriter`] through an `Arc`, so several files can be written from
//! several threads at once. Memory is bounded by the I/O buffers (1 MiB per
//! file) and the zstd window.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use xenvault_types::report::rfc3339;
use xenvault_types::{Extent, ExtentData};

use super::layout::{self, COMPLETE_MARKER, LOCK_FILE, MANIFEST, Subject};
use super::manifest::{self, ManifestEntry};
use super::reader::{self, RestorePoint};
use super::{ArchiveError, FileCompression};

/// Format name written into `COMPLETE`.
pub const MARKER_FORMAT: &str = "xenvault-archive";

/// Which run writes the restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The job's name.
    pub job: String,
    /// The run's id.
    pub run_id: String,
    /// The pool's name.
    pub pool: String,
}

/// One stored file, as recorded in `SHA256SUMS` and `COMPLETE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the restore point.
    pub name: String,
    /// Bytes on disk.
    pub bytes: u64,
    /// SHA-256 (hex) of the bytes on disk.
    pub sha256: String,
    /// Bytes before compression (= `bytes` when stored as is).
    pub logical_bytes: u64,
}

/// The success marker's content (`COMPLETE`, JSON), written last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// Always [`MARKER_FORMAT`].
    pub format: String,
    /// Layout version (1).
    pub version: u32,
    /// What the restore point belongs to (kind, UUID or pool name, name).
    pub subject: Subject,
    /// Job, run id, pool.
    pub run: RunInfo,
    /// When the backup started (the snapshot time for VMs).
    #[serde(with = "rfc3339")]
    pub started: OffsetDateTime,
    /// When it was committed.
    #[serde(with = "rfc3339")]
    pub finished: OffsetDateTime,
    /// Every file of the manifest.
    pub files: Vec<FileEntry>,
    /// Total bytes on disk of those files.
    pub bytes: u64,
    /// SHA-256 of `SHA256SUMS` itself.
    pub manifest_sha256: String,
    /// Free-form details from the caller (backup kind, snapshot UUID, disks).
    #[serde(default)]
    pub details: serde_json::Value,
}

#[derive(Debug, Default)]
struct Shared {
    /// Names handed out (open or finished).
    names: BTreeSet<String>,
    /// Names handed out but not finished yet.
    open: BTreeSet<String>,
    finished: Vec<FileEntry>,
}

/// Lock record written into `.lock` (for people; the flock is what counts).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LockInfo {
    pub run_id: String,
    pub job: String,
    pub pid: u32,
    #[serde(with = "rfc3339")]
    pub started: OffsetDateTime,
}

/// A restore point being written. Dropping it without
/// [`commit`](ArchiveWriter::commit) aborts it.
#[derive(Debug)]
pub struct ArchiveWriter {
    subject: Subject,
    run: RunInfo,
    started: OffsetDateTime,
    group_dir: PathBuf,
    timestamp_name: String,
    partial: PathBuf,
    lock: Option<File>,
    shared: Arc<Mutex<Shared>>,
    details: serde_json::Value,
    done: bool,
}

fn lock_shared(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn fsync_dir(path: &Path) -> Result<(), ArchiveError> {
    let dir = File::open(path).map_err(|e| ArchiveError::io("open", path, e))?;
    dir.sync_all()
        .map_err(|e| ArchiveError::io("fsync", path, e))
}

/// Takes the exclusive lock on an open lock file without waiting.
/// `Ok(false)` = someone else holds it.
pub(crate) fn try_lock(file: &File) -> std::io::Result<bool> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::AGAIN => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl ArchiveWriter {
    /// Starts a restore point of `subject` under `root`, named after
    /// `started` (UTC `YYYYMMDD-HHMMSS`, `-N` added if taken). Creates and
    /// locks `<group>/.<ts>.partial/`.
    pub fn begin(
        root: &Path,
        subject: Subject,
        run: RunInfo,
        started: OffsetDateTime,
    ) -> Result<ArchiveWriter, ArchiveError> {
        let group_dir = subject.group_dir(root);
        std::fs::create_dir_all(&group_dir)
            .map_err(|e| ArchiveError::io("create directory", &group_dir, e))?;
        let base = layout::format_timestamp(started);
        let mut attempt = 0u32;
        let (timestamp_name, partial) = loop {
            let name = if attempt == 0 {
                base.clone()
            } else {
                format!("{base}-{attempt}")
            };
            let partial = group_dir.join(layout::partial_name(&name));
            let taken = group_dir.join(&name).exists()
                || group_dir
                    .join(format!(".{name}{}", layout::DELETING_SUFFIX))
                    .exists();
            if !taken {
                match std::fs::create_dir(&partial) {
                    Ok(()) => break (name, partial),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(ArchiveError::io("create directory", &partial, e)),
                }
            }
            attempt += 1;
            if attempt > 1000 {
                return Err(ArchiveError::Usage(format!(
                    "no free restore point name for {base} in {}",
                    group_dir.display()
                )));
            }
        };
        let lock_path = partial.join(LOCK_FILE);
        let mut writer = ArchiveWriter {
            subject,
            run,
            started,
            group_dir,
            timestamp_name,
            partial,
            lock: None,
            shared: Arc::new(Mutex::new(Shared::default())),
            details: serde_json::Value::Null,
            done: false,
        };
        let mut lock =
            File::create(&lock_path).map_err(|e| ArchiveError::io("create", &lock_path, e))?;
        if !try_lock(&lock).map_err(|e| ArchiveError::io("lock", &lock_path, e))? {
            return Err(ArchiveError::Usage(format!(
                "{} is locked by another writer",
                lock_path.display()
            )));
        }
        let info = LockInfo {
            run_id: writer.run.run_id.clone(),
            job: writer.run.job.clone(),
            pid: std::process::id(),
            started: OffsetDateTime::now_utc(),
        };
        let text = serde_json::to_string(&info).unwrap_or_default();
        lock.write_all(text.as_bytes())
            .map_err(|e| ArchiveError::io("write", &lock_path, e))?;
        writer.lock = Some(lock);
        Ok(writer)
    }

    /// The hidden directory being written.
    pub fn partial_dir(&self) -> &Path {
        &self.partial
    }

    /// Where the restore point will be after commit.
    pub fn final_dir(&self) -> PathBuf {
        self.group_dir.join(&self.timestamp_name)
    }

    /// The subject.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// Sets free-form details recorded in `COMPLETE`.
    pub fn set_details(&mut self, details: serde_json::Value) {
        self.details = details;
    }

    fn claim(&self, name: &str) -> Result<PathBuf, ArchiveError> {
        if !manifest::valid_file_name(name) {
            return Err(ArchiveError::Usage(format!(
                "{name:?} cannot name an archive file (printable ASCII, no '/', not hidden, not {MANIFEST} or {COMPLETE_MARKER})"
            )));
        }
        if self.done {
            return Err(ArchiveError::Usage(format!(
                "{name}: the restore point is already closed"
            )));
        }
        let mut shared = lock_shared(&self.shared);
        if !shared.names.insert(name.to_string()) {
            return Err(ArchiveError::Usage(format!("{name} was already written")));
        }
        shared.open.insert(name.to_string());
        Ok(self.partial.join(name))
    }

    /// A streaming writer for the file `name` (`.zst` is appended when
    /// compressed). Finish it with [`FileWriter::finish`].
    pub fn create_file(
        &self,
        name: &str,
        compression: FileCompression,
    ) -> Result<FileWriter, ArchiveError> {
        let stored = format!("{name}{}", compression.suffix());
        let path = self.claim(&stored)?;
        FileWriter::create(stored, path, compression, self.shared.clone())
    }

    /// Writes a small file in one call (metadata files).
    pub fn put_file(&self, name: &str, bytes: &[u8]) -> Result<FileEntry, ArchiveError> {
        let mut w = self.create_file(name, FileCompression::None)?;
        w.write_all(bytes)
            .map_err(|e| ArchiveError::io("write", &w.path, e))?;
        w.finish()
    }

    /// A raw disk image of `size` bytes written from extents: sparse when
    /// uncompressed (holes are not written), zstd-compressed otherwise.
    pub fn create_raw_disk(
        &self,
        name: &str,
        size: u64,
        compression: FileCompression,
    ) -> Result<RawDiskWriter, ArchiveError> {
        let inner = match compression {
            FileCompression::None => {
                let path = self.claim(name)?;
                let file = File::create(&path).map_err(|e| ArchiveError::io("create", &path, e))?;
                RawInner::Sparse {
                    name: name.to_string(),
                    path,
                    file,
                    hasher: Sha256::new(),
                    shared: self.shared.clone(),
                }
            }
            _ => RawInner::Stream(self.create_file(name, compression)?),
        };
        Ok(RawDiskWriter {
            inner: Some(inner),
            size,
            position: 0,
        })
    }

    /// A scratch file inside the partial directory (not in the manifest,
    /// removed at commit): e.g. a spool for encoders that need two passes.
    pub fn scratch_path(&self, name: &str) -> PathBuf {
        self.partial.join(format!(".scratch-{name}"))
    }

    /// Files finished so far.
    pub fn files(&self) -> Vec<FileEntry> {
        lock_shared(&self.shared).finished.clone()
    }

    /// Makes the restore point complete: every file must be finished; fsyncs,
    /// writes `SHA256SUMS`, then `COMPLETE`, renames the directory into place.
    pub fn commit(mut self) -> Result<RestorePoint, ArchiveError> {
        let (files, open) = {
            let shared = lock_shared(&self.shared);
            (shared.finished.clone(), shared.open.clone())
        };
        if let Some(name) = open.iter().next() {
            return Err(ArchiveError::Usage(format!(
                "cannot commit {}: {name} was never finished",
                self.partial.display()
            )));
        }
        // Scratch files never reach the restore point.
        if let Ok(entries) = std::fs::read_dir(&self.partial) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".scratch-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let entries: Vec<ManifestEntry> = files
            .iter()
            .map(|f| ManifestEntry {
                sha256: f.sha256.clone(),
                name: f.name.clone(),
            })
            .collect();
        let manifest_text = manifest::render(&entries);
        let manifest_path = self.partial.join(MANIFEST);
        write_synced(&manifest_path, manifest_text.as_bytes())?;
        let mut sorted = files;
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let marker = Marker {
            format: MARKER_FORMAT.to_string(),
            version: 1,
            subject: self.subject.clone(),
            run: self.run.clone(),
            started: self.started,
            finished: OffsetDateTime::now_utc(),
            bytes: sorted.iter().map(|f| f.bytes).sum(),
            files: sorted,
            manifest_sha256: hex::encode(Sha256::digest(manifest_text.as_bytes())),
            details: self.details.clone(),
        };
        let marker_text = serde_json::to_string_pretty(&marker)
            .map_err(|e| ArchiveError::Usage(e.to_string()))?;
        write_synced(
            &self.partial.join(COMPLETE_MARKER),
            format!("{marker_text}\n").as_bytes(),
        )?;
        fsync_dir(&self.partial)?;
        let mut final_dir = self.final_dir();
        let mut n = 0u32;
        while final_dir.exists() {
            n += 1;
            self.timestamp_name = format!("{}-{n}", layout::format_timestamp(self.started));
            final_dir = self.final_dir();
        }
        std::fs::rename(&self.partial, &final_dir)
            .map_err(|e| ArchiveError::io("rename into place", &self.partial, e))?;
        self.done = true;
        fsync_dir(&self.group_dir)?;
        let _ = std::fs::remove_file(final_dir.join(LOCK_FILE));
        self.lock = None;
        reader::read_point(&final_dir, self.subject.key.kind)
    }

    /// Gives up: removes the partial directory (nothing counted).
    pub fn abort(mut self) -> Result<(), ArchiveError> {
        self.abort_inner()
    }

    fn abort_inner(&mut self) -> Result<(), ArchiveError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let result = std::fs::remove_dir_all(&self.partial);
        self.lock = None;
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ArchiveError::io("remove", &self.partial, e)),
        }
    }
}

impl Drop for ArchiveWriter {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.abort_inner()
        {
            tracing::warn!("abandoned restore point not removed (the next retention will): {e}");
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ArchiveError> {
    let mut f = File::create(path).map_err(|e| ArchiveError::io("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| ArchiveError::io("write", path, e))?;
    f.sync_all().map_err(|e| ArchiveError::io("fsync", path, e))
}

/// Counts and hashes what passes through to the file.
#[derive(Debug)]
struct HashingFile {
    inner: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

enum Stack {
    Plain(HashingFile),
    Zstd(zstd::stream::write::Encoder<'static, HashingFile>),
    Gzip(flate2::write::GzEncoder<HashingFile>),
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stack::Plain(_) => "Plain",
            Stack::Zstd(_) => "Zstd",
            Stack::Gzip(_) => "Gzip",
        })
    }
}

/// A file of the restore point being written; `std::io::Write`. Nothing
/// counts until [`finish`](FileWriter::finish) (flush, fsync, record the hash).
#[derive(Debug)]
pub struct FileWriter {
    name: String,
    path: PathBuf,
    stack: Option<Stack>,
    logical: u64,
    shared: Arc<Mutex<Shared>>,
}

impl FileWriter {
    fn create(
        name: String,
        path: PathBuf,
        compression: FileCompression,
        shared: Arc<Mutex<Shared>>,
    ) -> Result<FileWriter, ArchiveError> {
        let file = File::create(&path).map_err(|e| ArchiveError::io("create", &path, e))?;
        let hashing = HashingFile {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let stack = match compression {
            FileCompression::None => Stack::Plain(hashing),
            FileCompression::Zstd(level) => Stack::Zstd(
                zstd::stream::write::Encoder::new(hashing, level)
                    .map_err(|e| ArchiveError::io("start zstd for", &path, e))?,
            ),
            FileCompression::Gzip(level) => Stack::Gzip(flate2::write::GzEncoder::new(
                hashing,
                flate2::Compression::new(level.min(9)),
            )),
        };
        Ok(FileWriter {
            name,
            path,
            stack: Some(stack),
            logical: 0,
            shared,
        })
    }

    /// The stored file name (with `.zst` if compressed).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes accepted so far (before compression).
    pub fn logical_bytes(&self) -> u64 {
        self.logical
    }

    /// Writes all of `buf`, naming the file in the error.
    pub fn write_bytes(&mut self, buf: &[u8]) -> Result<(), ArchiveError> {
        self.write_all(buf)
            .map_err(|e| ArchiveError::io("write", &self.path, e))
    }

    /// Flushes, fsyncs and records the file in the manifest.
    pub fn finish(mut self) -> Result<FileEntry, ArchiveError> {
        let hashing = match self.stack.take() {
            Some(Stack::Plain(h)) => h,
            Some(Stack::Zstd(enc)) => enc
                .finish()
                .map_err(|e| ArchiveError::io("finish zstd for", &self.path, e))?,
            Some(Stack::Gzip(enc)) => enc
                .finish()
                .map_err(|e| ArchiveError::io("finish gzip for", &self.path, e))?,
            None => return Err(ArchiveError::Usage(format!("{} finished twice", self.name))),
        };
        let HashingFile {
            inner,
            hasher,
            bytes,
        } = hashing;
        let file = inner
            .into_inner()
            .map_err(|e| ArchiveError::io("write", &self.path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| ArchiveError::io("fsync", &self.path, e))?;
        let entry = FileEntry {
            name: self.name.clone(),
            bytes,
            sha256: hex::encode(hasher.finalize()),
            logical_bytes: self.logical,
        };
        let mut shared = lock_shared(&self.shared);
        shared.open.remove(&self.name);
        shared.finished.push(entry.clone());
        Ok(entry)
    }
}

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = match self.stack.as_mut() {
            Some(Stack::Plain(h)) => h.write(buf)?,
            Some(Stack::Zstd(z)) => z.write(buf)?,
            Some(Stack::Gzip(g)) => g.write(buf)?,
            None => return Err(std::io::Error::other("write after finish")),
        };
        self.logical += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.stack.as_mut() {
            Some(Stack::Plain(h)) => h.flush(),
            Some(Stack::Zstd(z)) => z.flush(),
            Some(Stack::Gzip(g)) => g.flush(),
            None => Ok(()),
        }
    }
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

#[derive(Debug)]
enum RawInner {
    Sparse {
        name: String,
        path: PathBuf,
        file: File,
        hasher: Sha256,
        shared: Arc<Mutex<Shared>>,
    },
    Stream(FileWriter),
}

/// A raw disk image written from extents in increasing offset order; gaps
/// and zero extents are holes (sparse file) or zeros in the zstd stream.
#[derive(Debug)]
pub struct RawDiskWriter {
    inner: Option<RawInner>,
    size: u64,
    position: u64,
}

impl RawDiskWriter {
    fn zeros_to(&mut self, end: u64) -> Result<(), ArchiveError> {
        let mut pos = self.position;
        match self.inner.as_mut() {
            Some(RawInner::Sparse { hasher, .. }) => {
                while pos < end {
                    let n = (end - pos).min(ZEROS.len() as u64) as usize;
                    hasher.update(&ZEROS[..n]);
                    pos += n as u64;
                }
            }
            Some(RawInner::Stream(w)) => {
                while pos < end {
                    let n = (end - pos).min(ZEROS.len() as u64) as usize;
                    w.write_bytes(&ZEROS[..n])?;
                    pos += n as u64;
                }
            }
            None => return Err(ArchiveError::Usage("raw disk already finished".into())),
        }
        self.position = end;
        Ok(())
    }

    /// Writes one extent; it must start at or after the previous end and end
    /// inside the disk.
    pub fn write_extent(&mut self, extent: &Extent) -> Result<(), ArchiveError> {
        let end = extent.offset.checked_add(extent.len());
        if extent.offset < self.position || end.is_none_or(|e| e > self.size) {
            return Err(ArchiveError::Usage(format!(
                "extent at {} of {} bytes is out of order or past the disk size {} (previous end {})",
                extent.offset,
                extent.len(),
                self.size,
                self.position
            )));
        }
        self.zeros_to(extent.offset)?;
        match &extent.data {
            ExtentData::Zero(n) => self.zeros_to(extent.offset + n),
            ExtentData::Data(bytes) => {
                match self.inner.as_mut() {
                    Some(RawInner::Sparse {
                        path, file, hasher, ..
                    }) => {
                        file.write_all_at(bytes, extent.offset)
                            .map_err(|e| ArchiveError::io("write", &*path, e))?;
                        hasher.update(bytes);
                    }
                    Some(RawInner::Stream(w)) => w.write_bytes(bytes)?,
                    None => return Err(ArchiveError::Usage("raw disk already finished".into())),
                }
                self.position = extent.offset + bytes.len() as u64;
                Ok(())
            }
        }
    }

    /// Zeros up to the disk size, fsync, record in the manifest.
    pub fn finish(mut self) -> Result<FileEntry, ArchiveError> {
        self.zeros_to(self.size)?;
        match self.inner.take() {
            Some(RawInner::Sparse {
                name,
                path,
                file,
                hasher,
                shared,
            }) => {
                file.set_len(self.size)
                    .map_err(|e| ArchiveError::io("set the length of", &path, e))?;
                file.sync_all()
                    .map_err(|e| ArchiveError::io("fsync", &path, e))?;
                let entry = FileEntry {
                    name: name.clone(),
                    bytes: self.size,
                    sha256: hex::encode(hasher.finalize()),
                    logical_bytes: self.size,
                };
                let mut shared = lock_shared(&shared);
                shared.open.remove(&name);
                shared.finished.push(entry.clone());
                Ok(entry)
            }
            Some(RawInner::Stream(w)) => w.finish(),
            None => Err(ArchiveError::Usage("raw disk finished twice".into())),
        }
    }
}
