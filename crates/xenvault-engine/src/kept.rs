//! Snapshots kept on the pools for repository jobs (bases of the next
//! incremental, resume points): which ones the journal holds, whether their
//! job still wants them, and releasing those of a job.
//!
//! A job keeps one snapshot per VM between runs (`journal::keep_snapshot`)
//! and releases it itself when a newer one supersedes it. When the job is
//! removed from the configuration, or now writes to an archive, nothing
//! would ever release its snapshots: they hold SR space for good. Every run
//! names them as a problem ([`stale_on_pool`]); `xenvault snapshots
//! release` removes them ([`release`]), by UUID and token tag as every
//! cleanup does.

use serde::Serialize;
use xenvault_types::config::{Config, TargetKind};

use crate::job::{JobError, connect_pool, new_run_id, open_journal};
use crate::journal::{self, Journal, KeepRole, KeptSnapshot};

/// Whether the configuration still wants a kept snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    /// Its job exists and writes to a repository: the job uses and releases it.
    InUse,
    /// Its job is not in the configuration: nothing will release it.
    JobGone,
    /// Its job now writes to an archive, which needs no base.
    NotRepository,
    /// Its job no longer backs up the pool it is on.
    PoolNotInJob,
}

impl Standing {
    /// Of a snapshot kept on `pool` for `job`.
    pub fn of(config: &Config, job: &str, pool: &str) -> Standing {
        match config.job(job) {
            None => Standing::JobGone,
            Some(j) => match config.target(&j.target) {
                Some(t) if t.kind == TargetKind::Repository => {
                    if j.pools.iter().any(|p| p == pool) {
                        Standing::InUse
                    } else {
                        Standing::PoolNotInJob
                    }
                }
                _ => Standing::NotRepository,
            },
        }
    }

    /// Words for a listing.
    pub fn describe(self) -> &'static str {
        match self {
            Standing::InUse => "in use by its job",
            Standing::JobGone => "job not in the configuration",
            Standing::NotRepository => "job no longer writes to a repository",
            Standing::PoolNotInJob => "job no longer backs up this pool",
        }
    }
}

/// One kept snapshot, as `xenvault snapshots list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeptEntry {
    /// The pool (its name in the configuration).
    pub pool: String,
    /// The job that kept it.
    pub job: String,
    /// `base` or `resume`.
    pub role: KeepRole,
    /// The VM it is a snapshot of.
    pub source_vm: String,
    /// The snapshot VM (absent once reduced to CBT metadata).
    pub snapshot: Option<String>,
    /// Its VDIs.
    pub vdis: Vec<String>,
    /// The restore point written from it.
    pub restore_point: Option<String>,
    /// When it was kept (RFC 3339, UTC).
    pub kept_at: String,
    /// Its VDIs were reduced to CBT metadata (`base = "metadata"`).
    pub metadata_only: bool,
    /// Whether the configuration still wants it.
    pub standing: Standing,
}

impl KeptEntry {
    fn of(config: &Config, k: &KeptSnapshot) -> KeptEntry {
        KeptEntry {
            pool: k.token.pool.clone(),
            job: k.token.job.clone(),
            role: k.role,
            source_vm: k.token.source_vm.clone(),
            snapshot: k.token.snapshot.clone(),
            vdis: k.token.vdis.iter().cloned().collect(),
            restore_point: k.restore_point.clone(),
            kept_at: xenvault_repo::manifest::rfc3339(k.kept_at),
            metadata_only: k.metadata_only,
            standing: Standing::of(config, &k.token.job, &k.token.pool),
        }
    }
}

/// Every snapshot the journal keeps, on every pool, oldest first.
pub fn list(config: &Config) -> Result<Vec<KeptEntry>, JobError> {
    let journal = open_journal(config)?;
    let kept = journal
        .kept(None)
        .map_err(|e| JobError::Failed(e.to_string()))?;
    Ok(kept.iter().map(|k| KeptEntry::of(config, k)).collect())
}

/// What is wrong with `pool`'s kept snapshots that nothing will release
/// (their job is gone or writes to an archive): one line per job, naming
/// the command that releases them. A run reports each line as a problem,
/// `xenvault plan` as a warning.
pub fn stale_on_pool(config: &Config, journal: &Journal, pool: &str) -> Vec<String> {
    let kept = match journal.kept(Some(pool)) {
        Ok(k) => k,
        Err(e) => return vec![format!("cannot read the kept snapshots: {e}")],
    };
    let mut by_job: std::collections::BTreeMap<&str, (usize, Standing)> = Default::default();
    for k in &kept {
        let standing = Standing::of(config, &k.token.job, pool);
        if standing != Standing::InUse {
            by_job.entry(&k.token.job).or_insert((0, standing)).0 += 1;
        }
    }
    by_job
        .into_iter()
        .map(|(job, (n, standing))| {
            format!(
                "{n} snapshot(s) kept for job {job:?}, whose {}; they hold SR space until released: xenvault snapshots release --job {job}",
                match standing {
                    Standing::JobGone => "name is not in the configuration any more",
                    Standing::PoolNotInJob => "pools do not include this one any more",
                    _ => "target is not a repository any more",
                }
            )
        })
        .collect()
}

/// Which kept snapshots `xenvault snapshots release` removes.
#[derive(Debug, Clone, Default)]
pub struct ReleaseSelection {
    /// The job whose snapshots go (required).
    pub job: String,
    /// Only on this pool.
    pub pool: Option<String>,
    /// Only of this source VM (uuid).
    pub vm: Option<String>,
    /// Also when the job still uses them (its next backup of each VM is
    /// then a full one).
    pub force: bool,
    /// Say what would go; change nothing.
    pub dry_run: bool,
}

/// What a release did.
#[derive(Debug, Default, Serialize)]
pub struct ReleaseReport {
    /// The snapshots selected (all of them, also in a dry run).
    pub selected: Vec<KeptEntry>,
    /// Snapshot VMs destroyed.
    pub destroyed_vms: Vec<String>,
    /// VDIs destroyed.
    pub destroyed_vdis: Vec<String>,
    /// What failed (those snapshots are released in the journal: the next
    /// run's leftover sweep retries them), and objects left alone because
    /// their tag did not match.
    pub errors: Vec<String>,
}

/// Releases the kept snapshots of `sel.job`: holds the job's lock (no run of
/// the job meanwhile), connects to each pool concerned and destroys each
/// snapshot and its VDIs by UUID and token tag.
pub async fn release(config: &Config, sel: &ReleaseSelection) -> Result<ReleaseReport, JobError> {
    let journal = open_journal(config)?;
    // No run of the job meanwhile (a dry run changes nothing: no lock).
    let _job_lock = if sel.dry_run {
        None
    } else {
        Some(
            journal
                .lock_job(&sel.job, &new_run_id())
                .map_err(|e| JobError::Failed(e.to_string()))?,
        )
    };
    let kept: Vec<KeptSnapshot> = journal
        .kept(None)
        .map_err(|e| JobError::Failed(e.to_string()))?
        .into_iter()
        .filter(|k| k.token.job == sel.job)
        .filter(|k| sel.pool.as_ref().is_none_or(|p| &k.token.pool == p))
        .filter(|k| {
            sel.vm
                .as_ref()
                .is_none_or(|v| k.token.source_vm.eq_ignore_ascii_case(v))
        })
        .collect();
    let in_use = kept
        .iter()
        .any(|k| Standing::of(config, &sel.job, &k.token.pool) == Standing::InUse);
    if in_use && !sel.force {
        return Err(JobError::Config(format!(
            "job {:?} still writes to a repository and uses these snapshots as the bases of its next backups; releasing them makes the next backup of each VM a full one. Add --force to release them anyway",
            sel.job
        )));
    }
    let mut report = ReleaseReport {
        selected: kept.iter().map(|k| KeptEntry::of(config, k)).collect(),
        ..ReleaseReport::default()
    };
    if sel.dry_run || kept.is_empty() {
        return Ok(report);
    }
    let pools: std::collections::BTreeSet<&str> =
        kept.iter().map(|k| k.token.pool.as_str()).collect();
    for pool_name in pools {
        let Some(pool) = config.pool(pool_name) else {
            report.errors.push(format!(
                "pool {pool_name} is not in the configuration: cannot connect to release its snapshots (add its [pools.{pool_name}] table back)"
            ));
            continue;
        };
        let session = match connect_pool(pool).await {
            Ok(s) => s,
            Err(e) => {
                report.errors.push(format!(
                    "pool {pool_name}: {e} (its snapshots stay kept; run the release again)"
                ));
                continue;
            }
        };
        for k in kept.iter().filter(|k| k.token.pool == pool_name) {
            let done = journal::release_kept(&session, &journal, k).await;
            report.destroyed_vms.extend(done.destroyed_vms);
            report.destroyed_vdis.extend(done.destroyed_vdis);
            report.errors.extend(done.errors);
            report.errors.extend(done.left_alone);
        }
        let _ = session.logout().await;
    }
    if let Err(e) = journal.compact() {
        report.errors.push(e.to_string());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvault_types::config::{JobConfig, TargetConfig};

    #[test]
    fn standing_follows_the_configuration() {
        let mut config = Config::default();
        config
            .targets
            .insert("plain".into(), TargetConfig::archive("plain", "/a"));
        let mut repo = TargetConfig::archive("vault", "/r");
        repo.kind = TargetKind::Repository;
        config.targets.insert("vault".into(), repo);
        config.jobs.insert(
            "forever".into(),
            JobConfig::new("forever", vec!["p1".into()], "vault"),
        );
        config.jobs.insert(
            "files".into(),
            JobConfig::new("files", vec!["p1".into()], "plain"),
        );
        assert_eq!(Standing::of(&config, "forever", "p1"), Standing::InUse);
        assert_eq!(
            Standing::of(&config, "forever", "p2"),
            Standing::PoolNotInJob
        );
        assert_eq!(
            Standing::of(&config, "files", "p1"),
            Standing::NotRepository
        );
        assert_eq!(Standing::of(&config, "gone", "p1"), Standing::JobGone);
    }
}
