//! xenvault's deduplicating repository: format, keys, blob codec, fixed index,
//! manifests, writer and reader, locks, check/verify, retention and prune, and
//! the storage backends it is kept on.
//!
//! The on-disk format is described byte by byte in `docs/repo-format.md`; the
//! reasons behind it in `docs/design/0005-repository-format.md`.
//!
//! Flow: [`Repository::init`] / [`Repository::open`] → [`Repository::begin_restore_point`]
//! → per disk a [`DiskWriter`] fed with [`xenvault_types::Extent`]s → commit writes the
//! indexes, then the manifest. Restore: [`Repository::list_restore_points`] →
//! [`Repository::read_disk`].

pub mod blob;
pub mod check;
pub mod crypto;
pub mod error;
pub mod index;
pub mod lock;
pub mod manifest;
pub mod prune;
pub mod reader;
pub mod repo;
pub mod retention;
pub mod storage;
pub mod writer;

pub use check::{CheckReport, Damage, VerifyOptions};
pub use crypto::{ChunkId, CipherKind, KdfParams};
pub use error::{RepoError, Result};
pub use index::FixedIndex;
pub use lock::{LockGuard, LockInfo, LockKind};
pub use manifest::{DiskEntry, DiskMode, DiskStats, Manifest, RepoConfig};
pub use prune::{PruneOptions, PruneReport};
pub use reader::DiskReader;
pub use repo::{EncryptionInit, InitOptions, KeyInfo, Repository};
pub use retention::{Decision, KeepOptions, RestorePointInfo, RetentionPlan, plan_retention};
pub use writer::{DiskCheckpoint, DiskWriter, RestorePointWriter, StagedCheckpoint, WriteOptions};
