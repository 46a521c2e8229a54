//! XVA: the tar stream of `ova.xml` and 1 MiB disk chunks that `/export` writes.
//!
//! An XVA is a tar archive (see `docs/xapi-notes.md`, "XVA", and xapi's
//! `ocaml/xapi/export.ml`, `stream_vdi.ml`, `import.ml`):
//!
//! 1. `ova.xml`: one XML-RPC value describing the VM, its VBDs, VDIs, VIFs,
//!    networks and SRs ([`OvaXml`]); objects refer to each other by XVA ids
//!    `Ref:<n>`.
//! 2. For each disk, in the order of its id compared as a string (`Ref:10`
//!    before `Ref:9`), chunks `Ref:<n>/%08d` of 1 MiB (the last one shorter
//!    when the size is not a multiple), each followed by `Ref:<n>/%08d.xxhash`
//!    (16 uppercase hex digits of XXH64, seed 0) or, from older xapi,
//!    `.checksum` (40 lowercase hex digits of SHA-1). All-zero chunks may be
//!    left out, except each disk's first and last; xapi < 26 also writes
//!    zero-length keep-alive chunks, which take a counter value but cover no
//!    bytes, so a reader must add up lengths instead of multiplying counters.
//! 3. The tar end: two zero blocks.
//!
//! Compression (gzip, zstd) wraps the whole stream and is the caller's job.
//!
//! # Writing (the simulator's `/export`, restores to a file)
//!
//! ```
//! use xenvault_formats::xva::{OvaXml, XvaEncoder, XvaEncoderOptions};
//! use xenvault_types::Extent;
//! # fn records() -> xenvault_formats::xva::ExportRecords { xenvault_formats::xva::tests_support::one_disk_vm(2 << 20) }
//! let ova: OvaXml = xenvault_formats::xva::OvaBuilder::default().build(&records())?;
//! let mut enc = XvaEncoder::new(&ova, XvaEncoderOptions::default())?;
//! let mut archive = Vec::new();
//! for disk in enc.disks().to_vec() {
//!     enc.start_disk(&disk.id)?;
//!     enc.push(Extent::data(4096, vec![7; 512]))?; // any extents, increasing offsets
//!     while let Some(piece) = enc.next_output()? { archive.extend_from_slice(&piece); }
//!     enc.end_disk()?;
//!     while let Some(piece) = enc.next_output()? { archive.extend_from_slice(&piece); }
//! }
//! enc.finish()?;
//! archive.extend_from_slice(&enc.drain()?);
//! # Ok::<(), xenvault_formats::xva::XvaError>(())
//! ```
//!
//! # Reading (the simulator's `/import`, backups of `/export`)
//!
//! ```
//! # use xenvault_formats::xva::{XvaDecoder, XvaEvent};
//! # let archive: Vec<u8> = Vec::new();
//! let mut dec = XvaDecoder::new();
//! for piece in archive.chunks(65536) {          // bytes as they arrive
//!     for event in dec.feed(piece)? {
//!         match event {
//!             XvaEvent::OvaXml(ova) => { /* create the objects; check ova.version */ }
//!             XvaEvent::DiskStart(disk) => { /* open the VDI of disk.id */ }
//!             XvaEvent::Extent(extent) => { /* write it; zero extents are holes */ }
//!             XvaEvent::DiskEnd(_) => {}
//!             XvaEvent::End => {}
//!         }
//!     }
//! }
//! # let _ =
//! dec.finish() // errors if the stream stopped early
//! # ;
//! # Ok::<(), xenvault_formats::xva::XvaError>(())
//! ```

mod decode;
mod encode;
mod ova;

pub use decode::{XvaDecoder, XvaDecoderOptions, XvaEvent};
pub use encode::{XvaEncoder, XvaEncoderOptions, checksum_text};
pub use ova::{
    EXPORT_VSN, ExportRecords, NEVER, NULL_REF, OvaBuilder, OvaObject, OvaVersion, OvaXml, XvaDisk,
};

use crate::tar::TarError;

/// The chunk size of XVA disks (xapi's `Stream_vdi.chunk_size`).
pub const CHUNK_SIZE: u64 = 1 << 20;

/// The checksum written after each chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumKind {
    /// `.xxhash`: 16 uppercase hex digits of XXH64 with seed 0 (xapi ≥ 1.170).
    XxHash,
    /// `.checksum`: 40 lowercase hex digits of SHA-1 (older xapi, `xva-img`).
    Sha1,
}

impl ChecksumKind {
    /// The file name extension, with its dot.
    pub fn extension(self) -> &'static str {
        match self {
            ChecksumKind::XxHash => ".xxhash",
            ChecksumKind::Sha1 => ".checksum",
        }
    }
}

/// Anything wrong with an XVA, or with how the encoder was driven.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XvaError {
    /// The tar framing is broken.
    #[error("XVA tar stream: {0}")]
    Tar(#[from] TarError),
    /// The archive does not start with `ova.xml`.
    #[error(
        "the first entry of an XVA must be ova.xml, found {found:?}: this is not an XVA \
         (or it is compressed: decompress gzip/zstd first)"
    )]
    NotAnXva {
        /// The first entry's name.
        found: String,
    },
    /// `ova.xml` is malformed or inconsistent.
    #[error("ova.xml: {0}")]
    OvaXml(String),
    /// An archive format this decoder does not read.
    #[error(
        "ova.xml says export_vsn {0}: pre-Miami XVAs (export_vsn < 2, with an end-of-tar \
         checksum table) are not supported"
    )]
    UnsupportedExportVsn(i64),
    /// An entry that does not belong where it is.
    #[error("unexpected tar entry {found:?}: expected {expected}")]
    UnexpectedEntry {
        /// What the decoder was waiting for.
        expected: String,
        /// The entry's name.
        found: String,
    },
    /// Chunk names must strictly increase.
    #[error(
        "disk {disk}: chunk {found} follows chunk {previous}; chunk names must strictly increase"
    )]
    ChunkOrder {
        /// The disk's XVA id.
        disk: String,
        /// The previous chunk's name.
        previous: String,
        /// The offending chunk's name.
        found: String,
    },
    /// A checksum entry with an extension other than `.xxhash` or `.checksum`.
    #[error(
        "disk {disk}: chunk {chunk}: unknown checksum file {entry:?} (expected .xxhash or .checksum)"
    )]
    UnknownChecksum {
        /// The disk's XVA id.
        disk: String,
        /// The chunk's counter text.
        chunk: String,
        /// The entry's name.
        entry: String,
    },
    /// The checksum does not match the chunk.
    #[error(
        "disk {disk}: chunk {chunk}: {kind} checksum mismatch: the archive says {stored:?}, \
         the data hashes to {computed:?}; the XVA is corrupt"
    )]
    ChecksumMismatch {
        /// The disk's XVA id.
        disk: String,
        /// The chunk's counter text.
        chunk: String,
        /// `xxhash` or `sha1`.
        kind: &'static str,
        /// The stored checksum text (truncated to 64 characters).
        stored: String,
        /// What the data hashes to.
        computed: String,
    },
    /// A size beyond the decoder's limits or the disk.
    #[error("{0}")]
    TooLarge(String),
    /// The stream ended before the tar end.
    #[error("the XVA stream ended early: {0}")]
    Truncated(String),
    /// A record the builder needs was not given.
    #[error("the VM references {class} {reference}, but no such record was given")]
    MissingRecord {
        /// The class of the missing record.
        class: &'static str,
        /// Its reference.
        reference: String,
    },
    /// The encoder was driven out of order.
    #[error("XVA encoder misuse: {0}")]
    Usage(String),
}

#[doc(hidden)]
pub mod tests_support {
    //! Records for documentation examples and tests.
    use xenvault_types::Value;

    use super::ExportRecords;

    /// A halted VM with one disk of `size` bytes on an `ext` SR.
    pub fn one_disk_vm(size: u64) -> ExportRecords {
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        ExportRecords {
            vm: (
                "OpaqueRef:vm".into(),
                Value::record([
                    ("uuid", Value::str("00000000-0000-0000-0000-000000000001")),
                    ("name_label", Value::str("vm")),
                    ("power_state", Value::str("Halted")),
                    ("VBDs", Value::Array(vec![Value::str("OpaqueRef:vbd")])),
                    ("VIFs", Value::Array(vec![])),
                ]),
            ),
            vbds: vec![(
                "OpaqueRef:vbd".into(),
                Value::record([
                    ("VM", Value::str("OpaqueRef:vm")),
                    ("VDI", Value::str("OpaqueRef:vdi")),
                    ("type", Value::str("Disk")),
                    ("empty", Value::Bool(false)),
                ]),
            )],
            vdis: vec![(
                "OpaqueRef:vdi".into(),
                Value::record([
                    ("uuid", Value::str("00000000-0000-0000-0000-000000000002")),
                    ("SR", Value::str("OpaqueRef:sr")),
                    ("virtual_size", Value::Int(size)),
                    ("type", Value::str("system")),
                    ("VBDs", Value::Array(vec![Value::str("OpaqueRef:vbd")])),
                ]),
            )],
            vifs: vec![],
            networks: vec![],
            srs: vec![(
                "OpaqueRef:sr".into(),
                Value::record([
                    ("content_type", Value::str("")),
                    ("VDIs", Value::Array(vec![Value::str("OpaqueRef:vdi")])),
                    ("PBDs", Value::Array(vec![Value::str("OpaqueRef:pbd")])),
                ]),
            )],
        }
    }
}
