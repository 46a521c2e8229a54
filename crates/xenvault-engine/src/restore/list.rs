//! The restore points of an archive target, per VM, for `xenvault list`:
//! time, size, format, complete or partial, checksum status.

use std::path::Path;

use serde::Serialize;

use super::RestoreError;
use super::point::{ArchivePoint, Compression, DataKind, point_is_of_vm, scan};
use super::verify::{ChecksumStatus, full_status, quick_status};

/// One restore point as listed.
#[derive(Debug, Clone, Serialize)]
pub struct ListedPoint {
    /// The VM's name.
    pub vm: String,
    /// The VM's uuid, when the archive says it.
    pub vm_uuid: Option<String>,
    /// The restore point's name (its timestamp directory).
    pub timestamp: String,
    /// The time as `YYYY-MM-DDTHH:MM:SSZ` when the name holds one.
    pub time: Option<String>,
    /// Its directory.
    pub dir: String,
    /// `xva`, `vhd` or `raw` (none: no data file).
    pub format: Option<DataKind>,
    /// Compression of the data files.
    pub compression: Compression,
    /// Bytes of data files on disk.
    pub bytes: u64,
    /// Data files.
    pub files: Vec<String>,
    /// The backup finished (success marker present).
    pub complete: bool,
    /// What is known of the checksums.
    pub checksums: ChecksumStatus,
}

/// Lists the restore points under `target` (of the VM `vm` only, if given:
/// name, uuid or directory name), oldest first per VM. With `verify`, every
/// point's files are read and checked (slow); otherwise the checksum status
/// only says whether a manifest exists.
pub fn list_points(
    target: &Path,
    vm: Option<&str>,
    verify: bool,
) -> Result<Vec<ListedPoint>, RestoreError> {
    if !target.is_dir() {
        return Err(RestoreError::NotFound(format!(
            "{} is not a directory (the archive target)",
            target.display()
        )));
    }
    let points = scan(target)?;
    let mut out = Vec::new();
    for point in points {
        if let Some(vm) = vm
            && !point_is_of_vm(&point, vm)
        {
            continue;
        }
        out.push(listed(&point, verify));
    }
    if let Some(vm) = vm
        && out.is_empty()
    {
        return Err(RestoreError::NotFound(format!(
            "no restore point of VM {vm:?} in {}",
            target.display()
        )));
    }
    Ok(out)
}

fn listed(point: &ArchivePoint, verify: bool) -> ListedPoint {
    ListedPoint {
        vm: point.vm_name.clone(),
        vm_uuid: point.vm_uuid.clone(),
        timestamp: point.timestamp.clone(),
        time: iso_time(&point.sort_key),
        dir: point.dir.display().to_string(),
        format: point.format(),
        compression: point.compression(),
        bytes: point.stored_len(),
        files: point.data.iter().map(|f| f.name.clone()).collect(),
        complete: point.complete,
        checksums: if verify {
            full_status(point)
        } else {
            quick_status(point)
        },
    }
}

/// `YYYYMMDDHHMMSS…` digits → `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso_time(digits: &str) -> Option<String> {
    if digits.len() < 14 {
        return None;
    }
    let d = &digits[..14];
    let n = |a: usize, b: usize| d[a..b].parse::<u32>().ok();
    let (mo, da, h, mi, se) = (n(4, 6)?, n(6, 8)?, n(8, 10)?, n(10, 12)?, n(12, 14)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(format!(
        "{}-{}-{}T{}:{}:{}Z",
        &d[0..4],
        &d[4..6],
        &d[6..8],
        &d[8..10],
        &d[10..12],
        &d[12..14]
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(
            iso_time("20261122034000").as_deref(),
            Some("2026-11-22T03:40:00Z")
        );
        assert_eq!(iso_time("2026112203"), None);
        assert_eq!(iso_time("20261322034000"), None);
    }

    #[test]
    fn lists_complete_and_partial() {
        use crate::restore::testing::write_point;
        let dir = tempfile::tempdir().unwrap();
        let (ua, ub) = (
            "aaaaaaaa-0000-0000-0000-000000000001",
            "bbbbbbbb-0000-0000-0000-000000000002",
        );
        write_point(
            dir.path(),
            "a",
            ua,
            "20261120-010000",
            &[("vm.xva", b"xyz", false)],
            true,
        );
        write_point(
            dir.path(),
            "a",
            ua,
            "20261121-010000",
            &[("vm.xva", b"xyz", false)],
            false,
        );
        write_point(
            dir.path(),
            "b",
            ub,
            "20261121-020000",
            &[("disk-0.raw", b"xyz", true)],
            true,
        );
        let all = list_points(dir.path(), None, true).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all[0].complete && !all[1].complete);
        assert_eq!(all[0].checksums, ChecksumStatus::Verified);
        assert_eq!(all[0].time.as_deref(), Some("2026-11-20T01:00:00Z"));
        assert_eq!(all[0].format, Some(DataKind::Xva));
        let b = list_points(dir.path(), Some("b"), false).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].checksums, ChecksumStatus::NotChecked);
        assert_eq!(b[0].format, Some(DataKind::Raw));
        assert_eq!(b[0].compression, Compression::Zstd);
        assert!(list_points(dir.path(), Some("zzz"), false).is_err());
    }
}
