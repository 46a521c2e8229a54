//! Restore point manifests and the repository config: the JSON documents of a repository.
//!
//! A restore point exists exactly when its manifest `manifests/<vm uuid>/<id>` does;
//! it is written last, with `put_if_absent`. The manifest's JSON is the plaintext
//! of a blob of kind 3 (compressed, and encrypted in encrypted repositories).

use serde::{Deserialize, Serialize};

use crate::crypto::CipherKind;
use crate::error::{RepoError, Result};

/// Repository format version written and read by this code.
pub const FORMAT_VERSION: u32 = 1;

/// The `config` object (plain JSON, never encrypted: it says how to open the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Always `xenvault-repository`.
    pub format: String,
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Random repository id; HKDF salt and part of every key slot's associated data.
    pub id: uuid::Uuid,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Chunk size in bytes, a power of two from 1 MiB to 4 MiB; fixed at init.
    pub chunk_size: u32,
    /// Always `zstd`.
    pub compression: String,
    /// zstd level of chunks and metadata.
    pub zstd_level: i32,
    /// `None` for a plain repository.
    pub encryption: Option<EncryptionConfig>,
}

/// How an encrypted repository is encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// AEAD of blobs.
    pub cipher: CipherKind,
    /// Always `blake3-keyed`.
    pub chunk_id: String,
    /// Always `hkdf-sha256`.
    pub subkeys: String,
}

impl RepoConfig {
    /// Checks the fields this version relies on.
    pub fn validate(&self) -> Result<()> {
        if self.format != "xenvault-repository" {
            return Err(RepoError::corrupt(
                "config",
                "not a xenvault repository config",
            ));
        }
        if self.version != FORMAT_VERSION {
            return Err(RepoError::UnsupportedVersion {
                found: self.version,
                supported: FORMAT_VERSION,
            });
        }
        validate_chunk_size(self.chunk_size)?;
        if self.compression != "zstd" {
            return Err(RepoError::corrupt("config", "unknown compression"));
        }
        if let Some(e) = &self.encryption
            && (e.chunk_id != "blake3-keyed" || e.subkeys != "hkdf-sha256")
        {
            return Err(RepoError::corrupt(
                "config",
                "unknown chunk id or subkey scheme",
            ));
        }
        Ok(())
    }
}

/// Checks that `size` is 256 KiB, 512 KiB, 1 MiB, 2 MiB or 4 MiB (all multiples
/// of CBT's 64 KiB blocks; 256 and 512 KiB for the chunk-size benchmark, ADR 0005).
pub fn validate_chunk_size(size: u32) -> Result<()> {
    if [256u32 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20].contains(&size) {
        Ok(())
    } else {
        Err(RepoError::invalid(
            "chunk size",
            format!("{size} bytes; use 256 KiB, 512 KiB, 1 MiB, 2 MiB or 4 MiB"),
        ))
    }
}

/// How a disk of a restore point was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMode {
    /// Every chunk was fed.
    Full,
    /// Started from the parent's index; only changed ranges were fed.
    Incremental,
}

/// Counters of one disk written into a restore point.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// Chunks in the index.
    pub chunks: u64,
    /// Chunks that are all zero (not stored).
    pub zero_chunks: u64,
    /// Chunks processed in this run (fed, or touched by a change).
    pub processed_chunks: u64,
    /// Processed chunks that were new and got stored.
    pub new_chunks: u64,
    /// Processed chunks already in the repository (deduplicated).
    pub dedup_chunks: u64,
    /// Data bytes fed by the caller.
    pub bytes_fed: u64,
    /// Bytes of blobs written for new chunks.
    pub bytes_stored: u64,
}

/// One disk of a restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// The disk's name in this restore point (path-safe: e.g. the VBD userdevice or VDI uuid).
    pub key: String,
    /// Object key of its fixed index.
    pub index: String,
    /// Disk size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Full or incremental.
    pub mode: DiskMode,
    /// Parent disk's index when incremental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_index: Option<String>,
    /// Counters.
    pub stats: DiskStats,
    /// Caller's data about this disk (VDI record, CBT snapshot uuid, …).
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// A restore point's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `xenvault-manifest`.
    pub format: String,
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The VM's uuid.
    pub vm_uuid: String,
    /// The VM's name at backup time.
    pub vm_name: String,
    /// Restore point id: `YYYYMMDDTHHMMSSZ` of its time (unique per VM).
    pub id: String,
    /// Restore point time, RFC 3339 UTC.
    pub time: String,
    /// Parent restore point id (same VM) for incremental disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The VM's full records (VM, VBDs, VDIs, VIFs…), opaque to the repository.
    pub vm_records: serde_json::Value,
    /// The disks.
    pub disks: Vec<DiskEntry>,
    /// Everything needed to rebuild an XVA (opaque to the repository).
    pub xva: serde_json::Value,
    /// Free caller data (job name, run id, host…).
    #[serde(default)]
    pub labels: serde_json::Value,
}

impl Manifest {
    /// The disk named `key`.
    pub fn disk(&self, key: &str) -> Result<&DiskEntry> {
        self.disks.iter().find(|d| d.key == key).ok_or_else(|| {
            RepoError::NotFound(format!(
                "disk '{key}' in restore point {}/{}",
                self.vm_uuid, self.id
            ))
        })
    }

    /// `<vm uuid>/<id>`: how reports name this restore point.
    pub fn name(&self) -> String {
        format!("{}/{}", self.vm_uuid, self.id)
    }
}

/// Checks a name used as one path segment (VM uuid, restore point id, disk key).
pub fn validate_segment(what: &'static str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(RepoError::invalid(
            what,
            format!("'{s}': use 1-128 characters of A-Z a-z 0-9 . _ - (not starting with '.')"),
        ))
    }
}

/// Object key of a manifest.
pub fn manifest_key(vm_uuid: &str, id: &str) -> String {
    format!("manifests/{vm_uuid}/{id}")
}

/// Object key of a disk index.
pub fn index_key(vm_uuid: &str, id: &str, disk: &str) -> String {
    format!("indexes/{vm_uuid}/{id}/{disk}.fidx")
}

/// Restore point id of a time: `YYYYMMDDTHHMMSSZ` (UTC).
pub fn restore_point_id(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// RFC 3339 text of a time (UTC).
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parses RFC 3339.
pub fn parse_rfc3339(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_keys() {
        let t = time::macros::datetime!(2026-11-22 03:37:48 UTC);
        assert_eq!(restore_point_id(t), "20261122T033748Z");
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(manifest_key("vm", "x"), "manifests/vm/x");
        assert!(validate_segment("disk", "xvda").is_ok());
        assert!(validate_segment("disk", "../x").is_err());
        assert!(validate_segment("disk", "").is_err());
        assert!(validate_chunk_size(4 << 20).is_ok());
        assert!(validate_chunk_size(256 << 10).is_ok());
        assert!(validate_chunk_size(512 << 10).is_ok());
        assert!(validate_chunk_size(3 << 20).is_err());
        assert!(validate_chunk_size(128 << 10).is_err());
        assert!(validate_chunk_size(8 << 20).is_err());
    }
}
