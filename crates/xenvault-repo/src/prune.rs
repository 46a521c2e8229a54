//! Forget and prune: remove restore points, then unreferenced chunks in two phases.
//!
//! `forget` deletes a restore point's manifest (it disappears at once), then its
//! indexes. `prune` frees chunks no manifest references:
//!
//! 1. **mark** (shared lock, runs beside backups): read every manifest and index,
//!    list the chunks, and record the unreferenced chunks and indexes with the
//!    mark time in `prune/mark`. Nothing is deleted.
//! 2. **sweep** (exclusive lock, so no backup runs meanwhile; it is short), at
//!    least `grace` after the mark: read the manifests again and delete the
//!    marked objects that are still unreferenced.
//!
//! The sweep also removes temporary files older than the grace period
//! ([`Storage::remove_stale_temporaries`](crate::storage::Storage::remove_stale_temporaries)):
//! what crashed writes and unpublished chunk stages left behind (ADR 0008).
//! They are never listed nor referenced, and no backup runs during the sweep.
//!
//! A backup that reused a marked chunk and committed before the sweep references
//! it, so the sweep keeps it; a backup still running holds a shared lock, so the
//! sweep waits. The grace period lets an interrupted backup resume and reuse what
//! it already stored. Both phases refuse to run when a manifest or index cannot be
//! read (its chunks would look unreferenced): run `check` first.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::blob::BlobKind;
use crate::crypto::ChunkId;
use crate::error::{RepoError, Result};
use crate::lock::LockKind;
use crate::manifest::{index_key, manifest_key, parse_rfc3339, rfc3339};
use crate::repo::Repository;
use crate::retention::RetentionPlan;

const MARK_KEY: &str = "prune/mark";

/// Prune knobs.
#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    /// Time between mark and sweep.
    pub grace: Duration,
    /// Staleness limit of locks.
    pub stale_after: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: Duration::from_secs(24 * 3600),
            stale_after: crate::lock::DEFAULT_STALE_AFTER,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Mark {
    version: u32,
    time: String,
    chunks: Vec<String>,
    indexes: Vec<String>,
}

/// What a prune run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Chunks deleted by the sweep.
    pub deleted_chunks: u64,
    /// Bytes of those chunks.
    pub deleted_bytes: u64,
    /// Orphan indexes deleted by the sweep.
    pub deleted_indexes: u64,
    /// Marked chunks found referenced again at sweep time (kept).
    pub rescued_chunks: u64,
    /// Temporary files of interrupted writes, older than the grace period,
    /// removed by the sweep.
    pub deleted_temporaries: u64,
    /// Why the sweep did not run, when it did not.
    pub sweep_deferred: Option<String>,
    /// Chunks recorded by the new mark.
    pub marked_chunks: u64,
    /// Orphan indexes recorded by the new mark.
    pub marked_indexes: u64,
}

impl Repository {
    /// Deletes the restore points the plan removes (manifest first, then indexes);
    /// returns their names.
    pub async fn forget(&self, plan: &RetentionPlan) -> Result<Vec<String>> {
        let mut gone = Vec::new();
        for p in plan.to_remove() {
            let m = match self.load_manifest(&p.vm_uuid, &p.id).await {
                Ok(m) => Some(m),
                Err(RepoError::NotFound(_)) => continue,
                Err(_) => None, // unreadable: remove it all the same
            };
            self.storage
                .delete(&manifest_key(&p.vm_uuid, &p.id))
                .await?;
            if let Some(m) = m {
                for d in &m.disks {
                    if d.index == index_key(&p.vm_uuid, &p.id, &d.key) {
                        self.storage.delete(&d.index).await?;
                    }
                }
            }
            gone.push(format!("{}/{}", p.vm_uuid, p.id));
        }
        Ok(gone)
    }

    async fn references_or_refuse(&self) -> Result<(HashSet<ChunkId>, HashSet<String>)> {
        let mut damage = Vec::new();
        let refs = self.collect_references(&mut damage).await?;
        if let Some(d) = damage.first() {
            return Err(RepoError::corrupt(
                &d.object,
                format!(
                    "{}; prune refuses to run while metadata is unreadable (its chunks would look unused): run `xenvault check`",
                    d.problem
                ),
            ));
        }
        Ok((refs.chunks.into_keys().collect(), refs.indexes))
    }

    /// Phase 1: records unreferenced chunks and indexes as of `now`.
    pub async fn prune_mark(&self, now: OffsetDateTime, opts: PruneOptions) -> Result<(u64, u64)> {
        let lock = self
            .lock(LockKind::Shared, "prune mark", opts.stale_after)
            .await?;
        let res = async {
            let (chunks, indexes) = self.references_or_refuse().await?;
            let cand_chunks: Vec<String> = self
                .storage
                .list("chunks/")
                .await?
                .into_iter()
                .filter_map(|m| ChunkId::from_hex(m.key.rsplit('/').next().unwrap_or("")))
                .filter(|id| !chunks.contains(id))
                .map(|id| id.to_hex())
                .collect();
            let cand_indexes: Vec<String> = self
                .storage
                .list("indexes/")
                .await?
                .into_iter()
                .map(|m| m.key)
                .filter(|k| !indexes.contains(k))
                .collect();
            let mark = Mark {
                version: 1,
                time: rfc3339(now),
                chunks: cand_chunks,
                indexes: cand_indexes,
            };
            let json = serde_json::to_vec(&mark).map_err(|e| RepoError::Task(e.to_string()))?;
            let blob = self.encode_meta(BlobKind::Meta, MARK_KEY, &json)?;
            self.storage.put(MARK_KEY, Bytes::from(blob)).await?;
            Ok((mark.chunks.len() as u64, mark.indexes.len() as u64))
        }
        .await;
        lock.release().await?;
        res
    }

    /// Phase 2: deletes what the last mark recorded, if it is at least `grace` old
    /// at `now` and still unreferenced. Needs the exclusive lock.
    pub async fn prune_sweep(
        &self,
        now: OffsetDateTime,
        opts: PruneOptions,
    ) -> Result<PruneReport> {
        let mut report = PruneReport::default();
        let mark: Mark = match self.read_meta(BlobKind::Meta, MARK_KEY).await {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| RepoError::corrupt(MARK_KEY, e.to_string()))?,
            Err(RepoError::Storage(e)) if e.is_not_found() => {
                report.sweep_deferred = Some("no mark yet".into());
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        let marked_at = parse_rfc3339(&mark.time)
            .ok_or_else(|| RepoError::corrupt(MARK_KEY, "bad mark time"))?;
        if now - marked_at < opts.grace {
            report.sweep_deferred = Some(format!(
                "the mark of {} is younger than the grace period of {} s",
                mark.time,
                opts.grace.as_secs()
            ));
            return Ok(report);
        }
        let lock = match self
            .lock(LockKind::Exclusive, "prune sweep", opts.stale_after)
            .await
        {
            Ok(l) => l,
            Err(e @ RepoError::Locked { .. }) => {
                report.sweep_deferred = Some(e.to_string());
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        let res = async {
            let (chunks, indexes) = self.references_or_refuse().await?;
            for hex in &mark.chunks {
                let Some(id) = ChunkId::from_hex(hex) else {
                    continue;
                };
                if chunks.contains(&id) {
                    report.rescued_chunks += 1;
                    continue;
                }
                let key = id.object_key();
                match self.storage.stat(&key).await {
                    Ok(m) => {
                        self.storage.delete(&key).await?;
                        report.deleted_chunks += 1;
                        report.deleted_bytes += m.size;
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            for key in &mark.indexes {
                if !indexes.contains(key) {
                    self.storage.delete(key).await?;
                    report.deleted_indexes += 1;
                }
            }
            // Leftovers of crashed runs: the exclusive lock keeps live writers
            // away, the grace period is a second margin (a clock-skewed or
            // lock-ignoring writer keeps its recent temporaries).
            let older_than = std::time::SystemTime::from(now - opts.grace);
            report.deleted_temporaries = self.storage.remove_stale_temporaries(older_than).await?;
            self.storage.delete(MARK_KEY).await?;
            Ok(())
        }
        .await;
        lock.release().await?;
        res.map(|()| report)
    }

    /// One prune run: sweep the previous mark when due, then mark anew. While a
    /// mark is still pending (too young, or the sweep had to wait for a backup) it
    /// is kept as it is, so its grace period is not restarted.
    pub async fn prune(&self, now: OffsetDateTime, opts: PruneOptions) -> Result<PruneReport> {
        let mut report = self.prune_sweep(now, opts).await?;
        let mark_pending = report
            .sweep_deferred
            .as_deref()
            .is_some_and(|r| r != "no mark yet");
        if !mark_pending {
            let (c, i) = self.prune_mark(now, opts).await?;
            report.marked_chunks = c;
            report.marked_indexes = i;
        }
        Ok(report)
    }
}
