//! What a restore point in an archive holds, read from its directory
//! `<target>/<vm-name>/<timestamp>/`: the data files (one `.xva`, or one
//! `.vhd`/`.raw` per disk, each maybe compressed), the checksum manifest, the
//! VM's records (`vm.json`) and the success marker.
//!
//! This is restore's view of a [`crate::archive::RestorePoint`] (the archive
//! module owns the layout, the listing and the marker).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::RestoreError;
use crate::archive::{self, PointState, RestorePoint, SubjectKind};
use crate::sink::DiskMeta;

pub use crate::archive::layout::{COMPLETE_MARKER, MANIFEST};
/// The VM's records as JSON.
pub const METADATA: &str = "vm.json";

/// What a data file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// A whole VM as XAPI exports it (tar with `ova.xml`).
    Xva,
    /// One disk as a VHD (dynamic).
    Vhd,
    /// One disk, raw bytes.
    Raw,
}

impl DataKind {
    /// The name used in listings and in `/import_raw_vdi?format=`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataKind::Xva => "xva",
            DataKind::Vhd => "vhd",
            DataKind::Raw => "raw",
        }
    }
}

/// How a data file is compressed, told by its first bytes (not its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Not compressed.
    None,
    /// zstd (ours, or the host's `use_compression=zstd`).
    Zstd,
    /// gzip (the host's `use_compression=true`).
    Gzip,
}

impl Compression {
    /// Detects the compression from a file's first bytes.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
            Compression::Zstd
        } else if head.starts_with(&[0x1F, 0x8B]) {
            Compression::Gzip
        } else {
            Compression::None
        }
    }
}

/// One data file of a restore point.
#[derive(Debug, Clone, Serialize)]
pub struct DataFile {
    /// The file name.
    pub name: String,
    /// The full path.
    pub path: PathBuf,
    /// What it holds.
    pub kind: DataKind,
    /// How it is compressed.
    pub compression: Compression,
    /// Its size on disk.
    pub stored_len: u64,
    /// Its size after decompression, as the archive's marker records it.
    pub content_len: Option<u64>,
}

impl DataFile {
    /// The name without the compression suffix and the format extension
    /// (`0-1234….vhd.zst` → `0-1234…`).
    pub fn stem(&self) -> &str {
        let mut name = self.name.as_str();
        for suffix in [".zst", ".zstd", ".gz"] {
            if let Some(s) = name.strip_suffix(suffix) {
                name = s;
                break;
            }
        }
        for ext in [".xva", ".vhd", ".raw", ".img"] {
            if let Some(s) = name.strip_suffix(ext) {
                return s;
            }
        }
        name
    }
}

/// A restore point as restore sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ArchivePoint {
    /// Its directory.
    pub dir: PathBuf,
    /// The VM's name (from `vm.json`, else the parent directory's name).
    pub vm_name: String,
    /// The VM's uuid, when `vm.json` says it.
    pub vm_uuid: Option<String>,
    /// The directory name (the backup's timestamp).
    pub timestamp: String,
    /// The timestamp's digits (`YYYYMMDDHHMMSS…`), for ordering and `--at`.
    pub sort_key: String,
    /// The success marker is present: the backup finished.
    pub complete: bool,
    /// `SHA256SUMS` is present.
    pub has_manifest: bool,
    /// The data files.
    pub data: Vec<DataFile>,
    /// Why it is partial (empty when complete).
    pub partial_reason: String,
    /// `vm.json`, when present and valid JSON.
    #[serde(skip)]
    pub metadata: Option<serde_json::Value>,
    /// The disks as `vm.json` describes them.
    pub disks: Vec<DiskMeta>,
    /// The archive's own view (marker, verification).
    #[serde(skip)]
    pub archive: Option<RestorePoint>,
}

impl ArchivePoint {
    /// Reads a restore point directory (cheap: names, sizes, 4 bytes per data
    /// file, `vm.json`).
    pub fn read(dir: &Path) -> Result<ArchivePoint, RestoreError> {
        let rp = archive::reader::read_point(dir, SubjectKind::Vm).map_err(archive_error)?;
        ArchivePoint::from_archive(rp)
    }

    /// Restore's view of an archive restore point.
    pub fn from_archive(rp: RestorePoint) -> Result<ArchivePoint, RestoreError> {
        let dir = rp.path.clone();
        let mut data = Vec::new();
        if let Some(marker) = rp.marker() {
            for f in &marker.files {
                let Some(kind) = kind_of(&f.name) else {
                    continue;
                };
                let path = dir.join(&f.name);
                data.push(DataFile {
                    name: f.name.clone(),
                    compression: sniff_file(&path).unwrap_or(Compression::None),
                    path,
                    kind,
                    stored_len: f.bytes,
                    content_len: Some(f.logical_bytes),
                });
            }
        } else if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut names: Vec<String> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for name in names {
                let Some(kind) = kind_of(&name) else { continue };
                let path = dir.join(&name);
                let stored_len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                data.push(DataFile {
                    name,
                    compression: sniff_file(&path).unwrap_or(Compression::None),
                    path,
                    kind,
                    stored_len,
                    content_len: None,
                });
            }
        }
        data.sort_by(|a, b| a.name.cmp(&b.name));
        let metadata = std::fs::read(dir.join(METADATA))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let vm_record = metadata.as_ref().and_then(vm_record_of);
        let disks: Vec<DiskMeta> = metadata
            .as_ref()
            .and_then(|m| m.get("disks"))
            .and_then(|d| serde_json::from_value(d.clone()).ok())
            .unwrap_or_default();
        let dir_vm_name = dir
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let vm_name = rp
            .subject()
            .map(|s| s.name.clone())
            .or_else(|| {
                vm_record
                    .and_then(|r| r.get("name_label"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or(dir_vm_name);
        let vm_uuid = rp.subject().map(|s| s.key.id.clone()).or_else(|| {
            metadata
                .as_ref()
                .and_then(|m| m.get("vm_uuid"))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        });
        let timestamp = archive::layout::hidden_stem(&rp.dir_name)
            .unwrap_or(&rp.dir_name)
            .to_string();
        let partial_reason = match &rp.state {
            PointState::Complete(_) => String::new(),
            PointState::Partial { reason, .. } => reason.clone(),
        };
        Ok(ArchivePoint {
            vm_name,
            vm_uuid,
            sort_key: digits_of(&timestamp),
            timestamp,
            complete: rp.is_complete(),
            has_manifest: dir.join(MANIFEST).is_file(),
            dir,
            data,
            partial_reason,
            metadata,
            disks,
            archive: Some(rp),
        })
    }

    /// The restore point's format: `xva` when it holds an XVA, else the disks'.
    pub fn format(&self) -> Option<DataKind> {
        if self.xva().is_some() {
            return Some(DataKind::Xva);
        }
        self.data.first().map(|f| f.kind)
    }

    /// The XVA file, if the point holds a whole VM.
    pub fn xva(&self) -> Option<&DataFile> {
        self.data.iter().find(|f| f.kind == DataKind::Xva)
    }

    /// The per-disk files (`.vhd` / `.raw`), by name.
    pub fn disk_files(&self) -> Vec<&DataFile> {
        self.data
            .iter()
            .filter(|f| f.kind != DataKind::Xva)
            .collect()
    }

    /// Bytes of all data files on disk.
    pub fn stored_len(&self) -> u64 {
        self.data.iter().map(|f| f.stored_len).sum()
    }

    /// The compression of the data files (the first one's).
    pub fn compression(&self) -> Compression {
        self.data
            .first()
            .map(|f| f.compression)
            .unwrap_or(Compression::None)
    }

    /// `<vm name>/<timestamp>`: how restored objects name their origin.
    pub fn label(&self) -> String {
        format!("{}/{}", self.vm_name, self.timestamp)
    }
}

/// The VM record inside `vm.json` (`{"vm": {...}}`, `{"VM": {...}}`, or a
/// record with `ref`/`record` members).
pub fn vm_record_of(
    meta: &serde_json::Value,
) -> Option<&serde_json::Map<String, serde_json::Value>> {
    for key in ["vm", "VM"] {
        if let Some(v) = meta.get(key) {
            let rec = v.get("record").unwrap_or(v);
            if let Some(obj) = rec.as_object()
                && obj.contains_key("uuid")
            {
                return Some(obj);
            }
        }
    }
    None
}

/// The kind of a file by its name, or `None` for files that hold no data.
fn kind_of(name: &str) -> Option<DataKind> {
    let mut base = name;
    for suffix in [".zst", ".zstd", ".gz"] {
        if let Some(s) = base.strip_suffix(suffix) {
            base = s;
            break;
        }
    }
    if base.ends_with(".xva") {
        Some(DataKind::Xva)
    } else if base.ends_with(".vhd") {
        Some(DataKind::Vhd)
    } else if base.ends_with(".raw") || base.ends_with(".img") {
        Some(DataKind::Raw)
    } else {
        None
    }
}

fn sniff_file(path: &Path) -> Result<Compression, RestoreError> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(|e| RestoreError::io(path, e))?;
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RestoreError::io(path, e)),
        }
    }
    Ok(Compression::sniff(&head[..got]))
}

/// The decimal digits of a timestamp text, in order.
pub fn digits_of(text: &str) -> String {
    text.chars().filter(char::is_ascii_digit).collect()
}

/// The archive's errors as restore errors.
pub fn archive_error(e: archive::ArchiveError) -> RestoreError {
    match e {
        archive::ArchiveError::Io { path, source, .. } => RestoreError::Io { path, source },
        archive::ArchiveError::Corrupt { path, detail } => RestoreError::Damaged {
            file: path,
            problem: detail,
        },
        other => RestoreError::Unusable {
            dir: PathBuf::new(),
            reason: other.to_string(),
        },
    }
}

/// All VM restore points under `target` (`<target>/<vm dir>/<timestamp>/`),
/// complete or not, ordered by VM directory then time (oldest first).
pub fn scan(target: &Path) -> Result<Vec<ArchivePoint>, RestoreError> {
    let mut out = Vec::new();
    for rp in archive::list(target).map_err(archive_error)? {
        if rp.kind != SubjectKind::Vm {
            continue;
        }
        out.push(ArchivePoint::from_archive(rp)?);
    }
    out.sort_by(|a, b| {
        a.dir
            .parent()
            .cmp(&b.dir.parent())
            .then_with(|| a.sort_key.cmp(&b.sort_key))
            .then_with(|| a.timestamp.cmp(&b.timestamp))
    });
    Ok(out)
}

/// Whether `point` belongs to the VM called `vm` (name, uuid or directory name).
pub fn point_is_of_vm(point: &ArchivePoint, vm: &str) -> bool {
    point.vm_name == vm
        || point.vm_uuid.as_deref() == Some(vm)
        || point
            .dir
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n.to_string_lossy() == vm)
}

/// The restore point of `vm` to restore: the newest complete one, or the one
/// whose timestamp is `at` (the directory name, or a prefix of its digits such
/// as `20261122` or `20261122-0340`; the newest match wins).
pub fn find_point(target: &Path, vm: &str, at: Option<&str>) -> Result<ArchivePoint, RestoreError> {
    let all: Vec<ArchivePoint> = scan(target)?
        .into_iter()
        .filter(|p| point_is_of_vm(p, vm))
        .collect();
    if all.is_empty() {
        let names: Vec<String> = {
            let mut n: Vec<String> = scan(target)?.into_iter().map(|p| p.vm_name).collect();
            n.dedup();
            n
        };
        return Err(RestoreError::NotFound(format!(
            "no restore point of VM {vm:?} in {}; VMs there: {}",
            target.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    // Two VMs with one name: the name alone does not say which.
    let mut uuids: Vec<&str> = all.iter().filter_map(|p| p.vm_uuid.as_deref()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    if uuids.len() > 1 {
        return Err(RestoreError::NotFound(format!(
            "{} VMs called {vm:?} have restore points in {} ({}): name one by its uuid",
            uuids.len(),
            target.display(),
            uuids.join(", ")
        )));
    }
    let matching: Vec<&ArchivePoint> = match at {
        None => all.iter().collect(),
        Some(at) => {
            let digits = digits_of(at);
            all.iter()
                .filter(|p| {
                    p.timestamp == at || (!digits.is_empty() && p.sort_key.starts_with(&digits))
                })
                .collect()
        }
    };
    let complete = matching.iter().rev().find(|p| p.complete);
    match (complete, matching.last()) {
        (Some(p), _) => Ok((*p).clone()),
        (None, Some(p)) => Err(RestoreError::Unusable {
            dir: p.dir.clone(),
            reason: format!(
                "partial ({}): only complete backups can be restored",
                p.partial_reason
            ),
        }),
        (None, None) => Err(RestoreError::NotFound(format!(
            "VM {vm:?} has no restore point at {:?}; it has: {}",
            at.unwrap_or_default(),
            all.iter()
                .map(|p| p.timestamp.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_stems() {
        assert_eq!(kind_of("vm.xva"), Some(DataKind::Xva));
        assert_eq!(kind_of("vm.xva.zst"), Some(DataKind::Xva));
        assert_eq!(kind_of("0-abc.vhd.gz"), Some(DataKind::Vhd));
        assert_eq!(kind_of("1-abc.raw"), Some(DataKind::Raw));
        assert_eq!(kind_of("vm.json"), None);
        assert_eq!(kind_of("SHA256SUMS"), None);
        let f = DataFile {
            name: "0-abc.vhd.zst".into(),
            path: PathBuf::new(),
            kind: DataKind::Vhd,
            compression: Compression::Zstd,
            stored_len: 0,
            content_len: None,
        };
        assert_eq!(f.stem(), "0-abc");
    }

    #[test]
    fn compression_by_magic() {
        assert_eq!(
            Compression::sniff(&[0x28, 0xB5, 0x2F, 0xFD, 1]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(&[0x1F, 0x8B, 8]), Compression::Gzip);
        assert_eq!(Compression::sniff(b"ova.xml"), Compression::None);
        assert_eq!(Compression::sniff(&[]), Compression::None);
    }

    #[test]
    fn find_newest_complete_and_at() {
        use crate::restore::testing::write_point;
        let dir = tempfile::tempdir().unwrap();
        let uuid = "11111111-2222-3333-4444-555555555555";
        write_point(
            dir.path(),
            "web",
            uuid,
            "20261120-010000",
            &[("vm.xva", b"x", false)],
            true,
        );
        write_point(
            dir.path(),
            "web",
            uuid,
            "20261121-010000",
            &[("vm.xva", b"y", true)],
            true,
        );
        write_point(
            dir.path(),
            "web",
            uuid,
            "20261122-010000",
            &[("vm.xva", b"z", false)],
            false,
        );
        let p = find_point(dir.path(), "web", None).unwrap();
        assert_eq!(p.timestamp, "20261121-010000");
        assert_eq!(p.vm_uuid.as_deref(), Some(uuid));
        assert_eq!(p.data[0].name, "vm.xva.zst");
        assert_eq!(p.data[0].compression, Compression::Zstd);
        assert_eq!(p.data[0].content_len, Some(1));
        let p = find_point(dir.path(), uuid, Some("20261120")).unwrap();
        assert_eq!(p.timestamp, "20261120-010000");
        let e = find_point(dir.path(), "web", Some("20261122-010000")).unwrap_err();
        assert!(e.to_string().contains("partial"), "{e}");
        let e = find_point(dir.path(), "db", None).unwrap_err();
        assert!(e.to_string().contains("web"), "{e}");
        let e = find_point(dir.path(), "web", Some("1999")).unwrap_err();
        assert!(e.to_string().contains("20261121-010000"), "{e}");
        // Another VM called "web": the name is ambiguous, the uuid is not.
        let other = "99999999-2222-3333-4444-555555555555";
        write_point(
            dir.path(),
            "web",
            other,
            "20261123-010000",
            &[("vm.xva", b"w", false)],
            true,
        );
        let e = find_point(dir.path(), "web", None).unwrap_err();
        assert!(
            e.to_string().contains(other) && e.to_string().contains(uuid),
            "{e}"
        );
        assert_eq!(
            find_point(dir.path(), other, None).unwrap().timestamp,
            "20261123-010000"
        );
        assert_eq!(
            find_point(dir.path(), uuid, None).unwrap().timestamp,
            "20261121-010000"
        );
    }
}
