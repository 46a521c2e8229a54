//! Restore from the deduplicating repository: listing its restore points,
//! a whole VM into any pool (an XVA rebuilt from the manifest's records,
//! through `PUT /import`), one disk into a new VDI, one disk written into an
//! existing VDI (only the chunks that differ), and a disk or VM to a file
//! (raw, VHD, XVA) without a pool.
//!
//! Disks come from [`Repository::read_disk`], which fetches and verifies
//! chunks several at a time (`parallel`) and hands out extents in disk order;
//! the encoders (XVA, VHD) run on a blocking thread that pulls those
//! extents. A damaged or missing chunk stops the restore with an error naming
//! the chunk's object, and what the restore created (VM, VDI, temporary
//! file) is removed.
//!
//! - [`list`]: restore points per VM, newest first; [`find_repo_point`].
//! - [`pool`]: whole VM ([`restore_repo_vm`]) and one disk into a new VDI
//!   ([`restore_repo_disk`]).
//! - [`into`]: one disk into an existing VDI ([`restore_repo_disk_into`]).
//! - [`file`]: to a file ([`restore_repo_to_file`]).
//! - [`encode`]: the shared raw / VHD / XVA producers.

pub mod encode;
pub mod file;
pub mod into;
pub mod list;
pub mod pool;

use std::sync::{Arc, Mutex};

use serde::Serialize;
use xenvault_repo::{DiskEntry, DiskMode, Manifest, RepoError};

use super::{DiskSelector, RestoreError};

pub use file::{FileFormat, FileRestoreOptions, RestoredFile, restore_repo_to_file};
pub use into::{IntoVdiOptions, ReadMethod, RestoredInto, restore_repo_disk_into};
pub use list::{ListedRepoDisk, ListedRepoPoint, find_repo_point, list_repo_points};
pub use pool::{
    RepoDiskRestoreOptions, RepoVmRestoreOptions, UploadFormat, VmRestoreMethod, restore_repo_disk,
    restore_repo_vm,
};

/// Chunks fetched at once by default (per disk; at most 32 MiB of them,
/// `xenvault_repo::reader::READ_AHEAD_BYTES`). Reads of a repository out of
/// the page cache need this many to keep the disk busy: a cold restore of the
/// benchmark disk took 2.6–3.0 s with 8, 2.2 s with 32.
pub const DEFAULT_PARALLEL: usize = 32;

/// One disk of a repository restore point, with what its manifest says.
#[derive(Debug, Clone, Serialize)]
pub struct RepoDisk {
    /// The disk's key in the restore point (the source VDI's uuid for
    /// backups).
    pub key: String,
    /// Position in the VM (`0`, `1`, …), when known.
    pub userdevice: Option<String>,
    /// The VDI's name at backup time (empty when unknown).
    pub name: String,
    /// Size, bytes.
    pub size: u64,
    /// The snapshot VDI the backup read (its uuid is the VDI's in the
    /// manifest's records).
    pub snapshot_vdi_uuid: Option<String>,
    /// The live VDI backed up.
    pub source_vdi_uuid: Option<String>,
    /// Bootable VBD.
    pub bootable: bool,
    /// Full or incremental.
    pub mode: DiskMode,
    /// How the backup read it (`nbd-full`, `nbd-cbt`, …), when recorded.
    pub read: Option<String>,
}

impl RepoDisk {
    fn of(entry: &DiskEntry) -> RepoDisk {
        let meta = &entry.meta;
        let disk = meta.get("disk");
        let text = |v: Option<&serde_json::Value>, key: &str| {
            v.and_then(|d| d.get(key))
                .and_then(|s| s.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_ascii_lowercase)
        };
        let snapshot_vdi_uuid =
            text(Some(meta), "snapshot_vdi_uuid").or_else(|| text(disk, "vdi_uuid"));
        let source_vdi_uuid = text(disk, "source_vdi_uuid");
        RepoDisk {
            key: entry.key.clone(),
            userdevice: disk
                .and_then(|d| d.get("userdevice"))
                .and_then(|s| s.as_str())
                .map(str::to_owned),
            name: disk
                .and_then(|d| d.get("name"))
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_string(),
            size: entry.size,
            snapshot_vdi_uuid,
            source_vdi_uuid,
            bootable: disk
                .and_then(|d| d.get("bootable"))
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            mode: entry.mode,
            read: meta.get("read").and_then(|s| s.as_str()).map(str::to_owned),
        }
    }

    /// True when `selector` names this disk: its position, the key, the
    /// live or snapshot VDI's uuid, or (as a file name) its key or name.
    pub fn matches(&self, selector: &DiskSelector) -> bool {
        match selector {
            DiskSelector::Position(p) => self.userdevice.as_deref() == Some(p.as_str()),
            DiskSelector::VdiUuid(u) => {
                self.key.eq_ignore_ascii_case(u)
                    || self.source_vdi_uuid.as_deref() == Some(u.as_str())
                    || self.snapshot_vdi_uuid.as_deref() == Some(u.as_str())
            }
            DiskSelector::File(n) => self.key == *n || (!self.name.is_empty() && self.name == *n),
        }
    }

    /// `0 (root, key …, 8 MiB)`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}key {}, {} MiB)",
            self.userdevice.as_deref().unwrap_or("?"),
            if self.name.is_empty() {
                String::new()
            } else {
                format!("{}, ", self.name)
            },
            self.key,
            self.size >> 20
        )
    }
}

/// The disks of a restore point, by position.
pub fn repo_disks(manifest: &Manifest) -> Vec<RepoDisk> {
    let mut disks: Vec<RepoDisk> = manifest.disks.iter().map(RepoDisk::of).collect();
    disks.sort_by_key(|d| {
        (
            d.userdevice
                .as_deref()
                .and_then(|u| u.parse::<u64>().ok())
                .unwrap_or(u64::MAX),
            d.key.clone(),
        )
    });
    disks
}

/// The disk of `manifest` that `selector` names, or an error listing them.
pub fn select_disk(manifest: &Manifest, selector: &DiskSelector) -> Result<RepoDisk, RestoreError> {
    let disks = repo_disks(manifest);
    disks
        .iter()
        .find(|d| d.matches(selector))
        .cloned()
        .ok_or_else(|| {
            RestoreError::NotFound(format!(
                "restore point {} has no disk at {selector}; its disks: {}",
                point_label(manifest),
                disks
                    .iter()
                    .map(RepoDisk::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })
}

/// `<vm name>/<id>`: how restored objects are tagged.
pub fn point_label(manifest: &Manifest) -> String {
    format!("{}/{}", manifest.vm_name, manifest.id)
}

/// The first repository error of a restore, kept aside while the data
/// producer reports it to the upload as an I/O error: the restore returns
/// it (naming the damaged chunk) rather than the upload's error.
#[derive(Clone, Default)]
pub(crate) struct RepoFailure(Arc<Mutex<Option<(String, RepoError)>>>);

impl RepoFailure {
    /// Keeps `e` (the first one only) and returns it as an I/O error.
    pub(crate) fn record(&self, what: &str, e: RepoError) -> std::io::Error {
        let text = format!("{what}: {e}");
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((what.to_string(), e));
        }
        std::io::Error::other(text)
    }

    /// The kept error, if any.
    pub(crate) fn take(&self) -> Option<RestoreError> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|(what, source)| RestoreError::repo(what, source))
    }

    /// `e`, or the kept repository error in its place (inside a
    /// `CleanupFailed` when clean-up failed too).
    pub(crate) fn explain(&self, e: RestoreError) -> RestoreError {
        match self.take() {
            None => e,
            Some(repo) => match e {
                RestoreError::CleanupFailed { leftovers, .. } => RestoreError::CleanupFailed {
                    cause: Box::new(repo),
                    leftovers,
                },
                RestoreError::Cancelled => RestoreError::Cancelled,
                _ => repo,
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(key: &str, meta: serde_json::Value) -> DiskEntry {
        DiskEntry {
            key: key.into(),
            index: format!("indexes/vm/x/{key}.fidx"),
            size: 8 << 20,
            chunk_size: 1 << 20,
            mode: DiskMode::Full,
            parent_index: None,
            stats: Default::default(),
            meta,
        }
    }

    #[test]
    fn disks_from_backup_meta() {
        let e = entry(
            "aaaaaaaa-0000-0000-0000-000000000001",
            serde_json::json!({
                "disk": {"index": 0, "vdi_uuid": "BBBBBBBB-0000-0000-0000-000000000002",
                         "source_vdi_uuid": "aaaaaaaa-0000-0000-0000-000000000001",
                         "name": "root", "virtual_size": 8388608, "userdevice": "0",
                         "bootable": true, "xva_id": null},
                "snapshot_vdi_uuid": "bbbbbbbb-0000-0000-0000-000000000002",
                "read": "nbd-full"
            }),
        );
        let d = RepoDisk::of(&e);
        assert_eq!(d.userdevice.as_deref(), Some("0"));
        assert_eq!(d.name, "root");
        assert!(d.bootable);
        assert_eq!(d.read.as_deref(), Some("nbd-full"));
        assert!(d.matches(&DiskSelector::Position("0".into())));
        assert!(d.matches(&"bbbbbbbb-0000-0000-0000-000000000002".parse().unwrap()));
        assert!(d.matches(&"AAAAAAAA-0000-0000-0000-000000000001".parse().unwrap()));
        assert!(d.matches(&DiskSelector::File("root".into())));
        assert!(!d.matches(&DiskSelector::Position("1".into())));
        // A disk written without meta is found by its key.
        let bare = RepoDisk::of(&entry("xvdb", serde_json::Value::Null));
        assert!(bare.matches(&DiskSelector::File("xvdb".into())));
        assert_eq!(bare.userdevice, None);
    }
}
