//! Reading an archive: listing restore points (complete or partial),
//! verifying a complete one against its manifest, opening its files.
//!
//! A restore point is complete when its directory has a readable `COMPLETE`
//! marker; [`RestorePoint::verify`] re-hashes every file on demand. Anything
//! else is partial and never counts: a `.partial` directory (being written,
//! or left by a crash), a `.deleting` one (an interrupted removal), or a
//! timestamp directory without a valid marker.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::ArchiveError;
use super::layout::{
    self, COMPLETE_MARKER, DELETING_SUFFIX, HOSTS_DIR, LOCK_FILE, LOGS_DIR, MANIFEST,
    POOL_METADATA_DIR, Subject, SubjectKey, SubjectKind,
};
use super::manifest;
use super::writer::{FileEntry, LockInfo, MARKER_FORMAT, Marker, try_lock};

/// A partial directory without a lock file younger than this may be in the
/// instant between its creation and its lock: it is left alone.
pub const UNLOCKED_PARTIAL_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Complete or not, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum PointState {
    /// `COMPLETE` is present and readable.
    Complete(Box<Marker>),
    /// Anything else.
    Partial {
        /// Why it is not complete.
        reason: String,
        /// A writer still holds its lock (or it is too new to judge): never
        /// removed.
        in_use: bool,
        /// The run that wrote it, from its lock file.
        run_id: Option<String>,
    },
}

/// One restore point directory of an archive.
#[derive(Debug, Clone, PartialEq)]
pub struct RestorePoint {
    /// The directory.
    pub path: PathBuf,
    /// Its name (`20261122-030405`, `.20261122-030405.partial`).
    pub dir_name: String,
    /// VM, pool metadata or host (from where it lies).
    pub kind: SubjectKind,
    /// The time in its name.
    pub time: Option<OffsetDateTime>,
    /// Complete (with its marker) or partial.
    pub state: PointState,
}

/// What [`RestorePoint::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Files whose hash matched.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
}

impl RestorePoint {
    /// True when the marker is present.
    pub fn is_complete(&self) -> bool {
        matches!(self.state, PointState::Complete(_))
    }

    /// The marker of a complete restore point.
    pub fn marker(&self) -> Option<&Marker> {
        match &self.state {
            PointState::Complete(m) => Some(m),
            PointState::Partial { .. } => None,
        }
    }

    /// What it belongs to (complete ones only).
    pub fn subject(&self) -> Option<&Subject> {
        self.marker().map(|m| &m.subject)
    }

    /// The files of a complete restore point (from its marker).
    pub fn files(&self) -> &[FileEntry] {
        self.marker().map(|m| m.files.as_slice()).unwrap_or(&[])
    }

    /// The path of one of its files.
    pub fn file_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Re-hashes every file against `SHA256SUMS` and the marker. A flipped
    /// byte, a missing or truncated file, or an edited manifest is
    /// [`ArchiveError::Corrupt`].
    pub fn verify(&self) -> Result<Verified, ArchiveError> {
        let corrupt = |path: &Path, detail: String| ArchiveError::Corrupt {
            path: path.to_path_buf(),
            detail,
        };
        let marker = self.marker().ok_or_else(|| {
            corrupt(
                &self.path,
                "not a complete restore point (no COMPLETE marker)".into(),
            )
        })?;
        let manifest_path = self.path.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| ArchiveError::io("read", &manifest_path, e))?;
        if hex::encode(Sha256::digest(text.as_bytes())) != marker.manifest_sha256 {
            return Err(corrupt(
                &manifest_path,
                "the manifest does not match the hash recorded in COMPLETE".into(),
            ));
        }
        let entries = manifest::parse(&text, &manifest_path)?;
        let mut listed: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        listed.sort_unstable();
        let mut recorded: Vec<&str> = marker.files.iter().map(|f| f.name.as_str()).collect();
        recorded.sort_unstable();
        if listed != recorded {
            return Err(corrupt(
                &manifest_path,
                format!("the manifest lists {listed:?} but COMPLETE records {recorded:?}"),
            ));
        }
        let mut bytes = 0;
        for entry in &entries {
            let path = self.path.join(&entry.name);
            let (sha, len) = manifest::hash_file(&path)?;
            if sha != entry.sha256 {
                return Err(corrupt(
                    &path,
                    format!(
                        "SHA-256 mismatch: expected {}, found {sha} (the file is damaged)",
                        entry.sha256
                    ),
                ));
            }
            bytes += len;
        }
        Ok(Verified {
            files: entries.len(),
            bytes,
        })
    }

    /// Opens one of its files as stored.
    pub fn open(&self, name: &str) -> Result<File, ArchiveError> {
        let path = self.file_path(name);
        File::open(&path).map_err(|e| ArchiveError::io("open", &path, e))
    }

    /// Opens one of its files, decompressing a `.zst` or `.gz` one.
    pub fn open_decoded(&self, name: &str) -> Result<Box<dyn Read + Send>, ArchiveError> {
        let file = self.open(name)?;
        if name.ends_with(".zst") {
            let path = self.file_path(name);
            let dec = zstd::stream::read::Decoder::new(file)
                .map_err(|e| ArchiveError::io("start zstd for", &path, e))?;
            Ok(Box::new(dec))
        } else if name.ends_with(".gz") {
            Ok(Box::new(flate2::read::MultiGzDecoder::new(file)))
        } else {
            Ok(Box::new(file))
        }
    }
}

fn modified_recently(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|age| age < UNLOCKED_PARTIAL_GRACE)
}

/// Whether a partial directory's writer is alive, and its run id.
fn lock_state(dir: &Path) -> (bool, Option<String>) {
    let lock_path = dir.join(LOCK_FILE);
    match File::open(&lock_path) {
        Ok(file) => {
            let run_id = std::fs::read_to_string(&lock_path)
                .ok()
                .and_then(|t| serde_json::from_str::<LockInfo>(&t).ok())
                .map(|i| i.run_id);
            let in_use = match try_lock(&file) {
                Ok(got) => !got,
                // Cannot tell (e.g. a file system without flock): be careful.
                Err(_) => true,
            };
            (in_use, run_id)
        }
        Err(_) => (modified_recently(dir), None),
    }
}

/// Reads one restore point directory (`kind` says where it lies).
pub fn read_point(path: &Path, kind: SubjectKind) -> Result<RestorePoint, ArchiveError> {
    let dir_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(stem) = layout::hidden_stem(&dir_name) {
        let time = layout::parse_timestamp(stem);
        let state = if dir_name.ends_with(DELETING_SUFFIX) {
            PointState::Partial {
                reason: "left by an interrupted removal".into(),
                in_use: false,
                run_id: None,
            }
        } else {
            let (in_use, run_id) = lock_state(path);
            PointState::Partial {
                reason: if in_use {
                    "being written".into()
                } else {
                    "never committed (the run failed or was interrupted)".into()
                },
                in_use,
                run_id,
            }
        };
        return Ok(RestorePoint {
            path: path.to_path_buf(),
            dir_name,
            kind,
            time,
            state,
        });
    }
    let time = layout::parse_timestamp(&dir_name);
    let marker_path = path.join(COMPLETE_MARKER);
    let state = match std::fs::read_to_string(&marker_path) {
        Ok(text) => match serde_json::from_str::<Marker>(&text) {
            Ok(m) if m.format == MARKER_FORMAT && m.subject.key.kind == kind => {
                PointState::Complete(Box::new(m))
            }
            Ok(m) => PointState::Partial {
                reason: format!(
                    "COMPLETE marker of format {:?} / kind {:?} does not belong here",
                    m.format, m.subject.key.kind
                ),
                in_use: false,
                run_id: Some(m.run.run_id),
            },
            Err(e) => PointState::Partial {
                reason: format!("COMPLETE marker unreadable: {e}"),
                in_use: false,
                run_id: None,
            },
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PointState::Partial {
            reason: "no COMPLETE marker".into(),
            in_use: false,
            run_id: None,
        },
        Err(e) => return Err(ArchiveError::io("read", &marker_path, e)),
    };
    Ok(RestorePoint {
        path: path.to_path_buf(),
        dir_name,
        kind,
        time,
        state,
    })
}

/// True for names of restore point directories (timestamps, partial,
/// deleting); other entries are left alone.
fn is_point_name(name: &str) -> bool {
    match layout::hidden_stem(name) {
        Some(stem) => layout::parse_timestamp(stem).is_some(),
        None => layout::parse_timestamp(name).is_some(),
    }
}

fn read_group(
    dir: &Path,
    kind: SubjectKind,
    out: &mut Vec<RestorePoint>,
) -> Result<(), ArchiveError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ArchiveError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ArchiveError::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_point_name(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        out.push(read_point(&entry.path(), kind)?);
    }
    Ok(())
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, ArchiveError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(ArchiveError::io("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| ArchiveError::io("list", dir, e))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Every restore point under `root` (VMs, pool metadata, hosts), complete
/// or partial, sorted by directory then name. A missing root lists nothing.
pub fn list(root: &Path) -> Result<Vec<RestorePoint>, ArchiveError> {
    let mut out = Vec::new();
    for dir in subdirs(root)? {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match name.as_str() {
            POOL_METADATA_DIR => {
                for g in subdirs(&dir)? {
                    read_group(&g, SubjectKind::PoolMetadata, &mut out)?;
                }
            }
            HOSTS_DIR => {
                for g in subdirs(&dir)? {
                    read_group(&g, SubjectKind::Host, &mut out)?;
                }
            }
            LOGS_DIR => {}
            n if n.starts_with('.') || n.starts_with('_') => {}
            _ => read_group(&dir, SubjectKind::Vm, &mut out)?,
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The complete restore points of one subject (a VM by UUID, wherever its
/// directory name), oldest first.
pub fn list_subject(root: &Path, key: &SubjectKey) -> Result<Vec<RestorePoint>, ArchiveError> {
    let mut points: Vec<RestorePoint> = list(root)?
        .into_iter()
        .filter(|p| p.subject().is_some_and(|s| &s.key == key))
        .collect();
    points.sort_by(|a, b| (a.time, &a.dir_name).cmp(&(b.time, &b.dir_name)));
    Ok(points)
}
