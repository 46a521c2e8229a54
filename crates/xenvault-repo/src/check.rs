//! Integrity: `check` (structure) and `verify` (re-read and re-hash chunks).
//!
//! Both name each damaged object and every restore point it breaks. `check`
//! reads every manifest and index and confirms that every referenced chunk is
//! listed in the store; `verify` additionally downloads all chunks, or a
//! deterministic sample of them, decodes (authenticates) and re-hashes them.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use futures::StreamExt;
use serde::Serialize;

use crate::crypto::ChunkId;
use crate::error::Result;
use crate::manifest::manifest_key;
use crate::repo::Repository;

/// One damaged object and what it breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damage {
    /// The object key (`chunks/ab/ab…`, `indexes/…`, `manifests/…`).
    pub object: String,
    /// What is wrong.
    pub problem: String,
    /// Restore points (`<vm uuid>/<id>`) that cannot be restored because of it.
    pub restore_points: Vec<String>,
}

/// Result of `check` or `verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Restore points found.
    pub restore_points: usize,
    /// Disk indexes read.
    pub indexes: usize,
    /// Distinct chunks referenced.
    pub chunks_referenced: usize,
    /// Chunks downloaded and re-hashed (verify only).
    pub chunks_verified: usize,
    /// Everything found damaged.
    pub damage: Vec<Damage>,
}

impl CheckReport {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }

    /// Restore points broken by any damage, sorted.
    pub fn broken_restore_points(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.damage.iter().flat_map(|d| &d.restore_points).collect();
        set.into_iter().cloned().collect()
    }
}

/// What `verify` re-reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifyOptions {
    /// Share of referenced chunks to re-read, 0.0 to 1.0 (1.0 = all).
    pub sample: f64,
    /// Seed of the sample (same seed, same chunks).
    pub seed: u64,
    /// Chunks downloaded at once.
    pub parallel: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            sample: 1.0,
            seed: 0,
            parallel: 4,
        }
    }
}

fn sampled(id: &ChunkId, opts: &VerifyOptions) -> bool {
    if opts.sample >= 1.0 {
        return true;
    }
    let mut h = blake3::Hasher::new();
    h.update(&opts.seed.to_le_bytes());
    h.update(&id.0);
    let mut x = [0u8; 8];
    x.copy_from_slice(&h.finalize().as_bytes()[..8]);
    (u64::from_le_bytes(x) as f64) < opts.sample * (u64::MAX as f64)
}

/// Every chunk referenced by every restore point, with the restore points using it.
pub(crate) struct References {
    pub chunks: BTreeMap<ChunkId, BTreeSet<String>>,
    pub indexes: HashSet<String>,
    pub restore_points: usize,
}

impl Repository {
    /// Reads every manifest and index; collects chunk references and damage.
    pub(crate) async fn collect_references(&self, damage: &mut Vec<Damage>) -> Result<References> {
        let mut refs = References {
            chunks: BTreeMap::new(),
            indexes: HashSet::new(),
            restore_points: 0,
        };
        for (vm, id) in self.list_restore_points(None).await? {
            refs.restore_points += 1;
            let rp = format!("{vm}/{id}");
            let m = match self.load_manifest(&vm, &id).await {
                Ok(m) => m,
                Err(e) => {
                    damage.push(Damage {
                        object: manifest_key(&vm, &id),
                        problem: e.to_string(),
                        restore_points: vec![rp],
                    });
                    continue;
                }
            };
            for d in &m.disks {
                refs.indexes.insert(d.index.clone());
                match self.load_index(&d.index).await {
                    Ok(index) if index.disk_size == d.size => {
                        for cid in index.ids.iter().filter(|c| !c.is_zero()) {
                            refs.chunks.entry(*cid).or_default().insert(rp.clone());
                        }
                    }
                    Ok(_) => damage.push(Damage {
                        object: d.index.clone(),
                        problem: "index size differs from the manifest".into(),
                        restore_points: vec![rp.clone()],
                    }),
                    Err(e) => damage.push(Damage {
                        object: d.index.clone(),
                        problem: e.to_string(),
                        restore_points: vec![rp.clone()],
                    }),
                }
            }
        }
        Ok(refs)
    }

    /// Structure check: every manifest and index readable, every referenced chunk present.
    pub async fn check(&self) -> Result<CheckReport> {
        self.check_inner(None).await
    }

    /// `check`, then re-read, authenticate and re-hash all or a sample of the chunks.
    pub async fn verify(&self, opts: VerifyOptions) -> Result<CheckReport> {
        self.check_inner(Some(opts)).await
    }

    async fn check_inner(&self, verify: Option<VerifyOptions>) -> Result<CheckReport> {
        let mut damage = Vec::new();
        let refs = self.collect_references(&mut damage).await?;
        let stored: HashSet<ChunkId> = self
            .storage
            .list("chunks/")
            .await?
            .into_iter()
            .filter_map(|m| ChunkId::from_hex(m.key.rsplit('/').next().unwrap_or("")))
            .collect();
        let mut to_verify = Vec::new();
        for (id, rps) in &refs.chunks {
            if !stored.contains(id) {
                damage.push(Damage {
                    object: id.object_key(),
                    problem: "chunk is missing".into(),
                    restore_points: rps.iter().cloned().collect(),
                });
            } else if let Some(o) = &verify
                && sampled(id, o)
            {
                to_verify.push(*id);
            }
        }
        let mut verified = 0;
        if let Some(o) = verify {
            let mut results = futures::stream::iter(to_verify)
                .map(|id| {
                    let repo = self.clone();
                    async move { (id, repo.read_chunk(&id).await) }
                })
                .buffer_unordered(o.parallel.max(1));
            while let Some((id, r)) = results.next().await {
                verified += 1;
                if let Err(e) = r {
                    damage.push(Damage {
                        object: id.object_key(),
                        problem: e.to_string(),
                        restore_points: refs
                            .chunks
                            .get(&id)
                            .map(|s| s.iter().cloned().collect())
                            .unwrap_or_default(),
                    });
                }
            }
        }
        damage.sort_by(|a, b| a.object.cmp(&b.object));
        Ok(CheckReport {
            restore_points: refs.restore_points,
            indexes: refs.indexes.len(),
            chunks_referenced: refs.chunks.len(),
            chunks_verified: verified,
            damage,
        })
    }
}
