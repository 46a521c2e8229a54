//! Names and places in an archive: directory names, timestamps, the
//! reserved directories, and what a restore point belongs to.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::macros::format_description;

/// The success marker: present = the restore point is complete.
pub const COMPLETE_MARKER: &str = "COMPLETE";
/// The checksum manifest (`sha256sum -c` format).
pub const MANIFEST: &str = "SHA256SUMS";
/// The writer's lock file inside a directory being written.
pub const LOCK_FILE: &str = ".lock";
/// Pool database dumps: `<root>/_pool-metadata/<pool>/<ts>/`.
pub const POOL_METADATA_DIR: &str = "_pool-metadata";
/// Host backups: `<root>/_hosts/<host>/<ts>/`.
pub const HOSTS_DIR: &str = "_hosts";
/// Run logs and JSON reports: `<root>/_logs/`.
pub const LOGS_DIR: &str = "_logs";
/// Suffix of a directory being written: `.<ts>.partial`.
pub const PARTIAL_SUFFIX: &str = ".partial";
/// Suffix of a directory being removed by retention: `.<ts>.deleting`.
pub const DELETING_SUFFIX: &str = ".deleting";

/// What kind of thing a restore point holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectKind {
    /// A VM (XVA or per-disk files).
    Vm,
    /// The pool database.
    PoolMetadata,
    /// A host's dom0 backup.
    Host,
}

/// What a restore point belongs to: retention keeps N per subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SubjectKey {
    /// VM, pool metadata or host.
    pub kind: SubjectKind,
    /// The VM's or host's UUID; the pool's name for pool metadata.
    pub id: String,
}

impl SubjectKey {
    /// The key of a VM.
    pub fn vm(uuid: impl Into<String>) -> SubjectKey {
        SubjectKey {
            kind: SubjectKind::Vm,
            id: uuid.into(),
        }
    }

    /// The key of a pool's metadata.
    pub fn pool_metadata(pool: impl Into<String>) -> SubjectKey {
        SubjectKey {
            kind: SubjectKind::PoolMetadata,
            id: pool.into(),
        }
    }

    /// The key of a host's backups.
    pub fn host(uuid: impl Into<String>) -> SubjectKey {
        SubjectKey {
            kind: SubjectKind::Host,
            id: uuid.into(),
        }
    }
}

/// The thing being backed up, with the name its directory is made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// Kind and id.
    pub key: SubjectKey,
    /// Human name (VM or host name label, pool name).
    pub name: String,
}

impl Subject {
    /// A VM.
    pub fn vm(uuid: impl Into<String>, name: impl Into<String>) -> Subject {
        Subject {
            key: SubjectKey::vm(uuid),
            name: name.into(),
        }
    }

    /// A pool's metadata.
    pub fn pool_metadata(pool: impl Into<String>) -> Subject {
        let pool = pool.into();
        Subject {
            key: SubjectKey::pool_metadata(pool.clone()),
            name: pool,
        }
    }

    /// A host.
    pub fn host(uuid: impl Into<String>, name: impl Into<String>) -> Subject {
        Subject {
            key: SubjectKey::host(uuid),
            name: name.into(),
        }
    }

    /// The directory holding this subject's restore points.
    pub fn group_dir(&self, root: &Path) -> PathBuf {
        let name = sanitize_name(&self.name);
        match self.key.kind {
            SubjectKind::Vm => root.join(name),
            SubjectKind::PoolMetadata => root.join(POOL_METADATA_DIR).join(name),
            SubjectKind::Host => root.join(HOSTS_DIR).join(name),
        }
    }
}

/// A VM, pool or host name made safe as one directory name: path
/// separators, control characters and anything outside printable ASCII
/// letters, digits and ` .-_+@=,()[]` become `_`; a leading `.` or `_`
/// becomes `-` (those prefixes are reserved for partial directories and
/// `_logs`, `_hosts`, `_pool-metadata`); empty or `.`/`..` names become
/// `unnamed`; at most 100 bytes.
pub fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " .-_+@=,()[]".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if out.starts_with('.') || out.starts_with('_') {
        out.replace_range(0..1, "-");
    }
    let trimmed = out.trim_end_matches([' ', '.']).to_string();
    if trimmed.is_empty() {
        return "unnamed".to_string();
    }
    trimmed
}

/// A restore point's directory name: UTC `YYYYMMDD-HHMMSS` (sorts by time).
pub fn format_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.format(format_description!(
        "[year][month][day]-[hour][minute][second]"
    ))
    .unwrap_or_else(|_| "19700101-000000".to_string())
}

/// Parses a restore point's directory name: `YYYYMMDD-HHMMSS`, optionally
/// followed by `-N` (added when two backups of one directory start in the
/// same second). Returns the time and the name's stem without the `-N`.
pub fn parse_timestamp(name: &str) -> Option<OffsetDateTime> {
    let stem = name.get(..15)?;
    let rest = &name[15..];
    if !(rest.is_empty()
        || rest
            .strip_prefix('-')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
    {
        return None;
    }
    let fmt = format_description!("[year][month][day]-[hour][minute][second]");
    time::PrimitiveDateTime::parse(stem, fmt)
        .ok()
        .map(|t| t.assume_utc())
}

/// The hidden name a restore point is written under: `.<ts>.partial`.
pub fn partial_name(timestamp_name: &str) -> String {
    format!(".{timestamp_name}{PARTIAL_SUFFIX}")
}

/// For `.<ts>.partial` or `.<ts>.deleting`, the `<ts>` inside.
pub fn hidden_stem(name: &str) -> Option<&str> {
    let inner = name.strip_prefix('.')?;
    inner
        .strip_suffix(PARTIAL_SUFFIX)
        .or_else(|| inner.strip_suffix(DELETING_SUFFIX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn sanitize() {
        assert_eq!(sanitize_name("web-01"), "web-01");
        assert_eq!(sanitize_name("a/b\\c\0d"), "a_b_c_d");
        assert_eq!(sanitize_name("_logs"), "-logs");
        assert_eq!(sanitize_name(".hidden"), "-hidden");
        assert_eq!(sanitize_name(".."), "-");
        assert_eq!(sanitize_name(""), "unnamed");
        assert_eq!(sanitize_name("   "), "unnamed");
        assert_eq!(
            sanitize_name("Windows Server (2019)"),
            "Windows Server (2019)"
        );
        assert_eq!(sanitize_name("café"), "caf_");
        assert_eq!(sanitize_name(&"x".repeat(300)).len(), 100);
    }

    #[test]
    fn timestamps() {
        let t = datetime!(2026-11-22 03:04:05 UTC);
        assert_eq!(format_timestamp(t), "20261122-030405");
        assert_eq!(
            format_timestamp(datetime!(2026-11-22 04:04:05 +1)),
            "20261122-030405"
        );
        assert_eq!(parse_timestamp("20261122-030405"), Some(t));
        assert_eq!(parse_timestamp("20261122-030405-2"), Some(t));
        assert_eq!(parse_timestamp("20261122-030405-"), None);
        assert_eq!(parse_timestamp("20261122-030405x"), None);
        assert_eq!(parse_timestamp("notes"), None);
        assert_eq!(
            hidden_stem(".20261122-030405.partial"),
            Some("20261122-030405")
        );
        assert_eq!(
            hidden_stem(".20261122-030405.deleting"),
            Some("20261122-030405")
        );
        assert_eq!(hidden_stem("20261122-030405"), None);
    }
}
