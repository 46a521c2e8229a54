//! Retention: which restore points to keep and which to remove, as a pure
//! plan ([`plan`], [`pre_clean_plan`]) with a reason per decision, and
//! [`apply`] to carry it out.
//!
//! Rules: keep the newest N complete restore points per subject (a VM by
//! UUID with its per-VM override, a pool's metadata, a host); subjects
//! without a rule are left alone (VMs of other jobs, VMs no longer
//! selected). Partial ones never count and are always removed, except one
//! a live writer still holds (its lock) or one of a protected run (the
//! current run's id). N is at least 1: retention never removes the last
//! complete backup of a subject.
//!
//! `pre_clean` (NAUbackup's option) makes room before a new backup: it
//! removes the oldest complete ones down to N-1, and only when N-1 ≥ 1, so
//! the newest good backup survives a failing new one.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::layout::{DELETING_SUFFIX, LOCK_FILE, Subject, SubjectKey};
use super::reader::{PointState, RestorePoint};
use super::writer::try_lock;

/// How many complete restore points to keep, per subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionRules {
    /// Per subject (a VM's UUID with its override already applied, a pool,
    /// a host).
    pub keep: BTreeMap<SubjectKey, u32>,
    /// For subjects not in `keep`; `None` leaves them alone.
    pub default_keep: Option<u32>,
    /// Run ids whose partial directories are never removed (the current run).
    pub protected_runs: Vec<String>,
}

impl RetentionRules {
    /// The number to keep for `key`, if managed.
    pub fn keep_for(&self, key: &SubjectKey) -> Option<u32> {
        self.keep
            .get(key)
            .copied()
            .or(self.default_keep)
            .map(|n| n.max(1))
    }
}

/// Keep or remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneAction {
    /// Leave it.
    Keep,
    /// Delete the directory.
    Remove,
}

/// Why a restore point is kept or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum PruneReason {
    /// Among the newest `keep` complete ones (`rank` 1 = newest).
    WithinRetention {
        /// 1 = newest.
        rank: usize,
        /// How many are kept.
        keep: u32,
    },
    /// Older than the newest `keep` complete ones.
    BeyondRetention {
        /// 1 = newest.
        rank: usize,
        /// How many are kept.
        keep: u32,
    },
    /// `pre_clean`: removed before the new backup to leave `keep - 1`.
    PreClean {
        /// 1 = newest.
        rank: usize,
        /// The subject's retention.
        keep: u32,
    },
    /// No rule for its subject (another job's VM, a VM no longer selected).
    NotManaged,
    /// Not complete: never counted, removed.
    Incomplete {
        /// Why it is not complete.
        detail: String,
    },
    /// Not complete but a writer holds it.
    InUse,
    /// Not complete but written by a protected run.
    ProtectedRun {
        /// The run.
        run_id: String,
    },
}

impl fmt::Display for PruneReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PruneReason::WithinRetention { rank, keep } => {
                write!(f, "complete backup {rank} of the {keep} newest kept")
            }
            PruneReason::BeyondRetention { rank, keep } => write!(
                f,
                "complete backup {rank} (newest = 1) is beyond the {keep} kept"
            ),
            PruneReason::PreClean { rank, keep } => write!(
                f,
                "pre_clean: complete backup {rank} (newest = 1) removed to make room, {} kept before the new backup",
                keep.saturating_sub(1)
            ),
            PruneReason::NotManaged => {
                f.write_str("no retention rule for this subject in this job")
            }
            PruneReason::Incomplete { detail } => write!(f, "incomplete ({detail}); never counted"),
            PruneReason::InUse => f.write_str("incomplete but still being written (locked)"),
            PruneReason::ProtectedRun { run_id } => {
                write!(f, "incomplete but belongs to the running run {run_id}")
            }
        }
    }
}

/// The decision for one restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneDecision {
    /// The restore point's directory.
    pub path: PathBuf,
    /// Its subject, when known (complete ones).
    pub subject: Option<SubjectKey>,
    /// Keep or remove.
    pub action: PruneAction,
    /// Why.
    pub reason: PruneReason,
}

/// Decisions for a set of restore points.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunePlan {
    /// One per restore point considered.
    pub decisions: Vec<PruneDecision>,
}

impl PrunePlan {
    /// The decisions that remove.
    pub fn removals(&self) -> impl Iterator<Item = &PruneDecision> {
        self.decisions
            .iter()
            .filter(|d| d.action == PruneAction::Remove)
    }

    /// The decisions that keep.
    pub fn kept(&self) -> impl Iterator<Item = &PruneDecision> {
        self.decisions
            .iter()
            .filter(|d| d.action == PruneAction::Keep)
    }
}

/// Sort key: time in the name, then the `-N` suffix, then the name.
fn order_key(p: &RestorePoint) -> (Option<time::OffsetDateTime>, u32, String) {
    let stem = super::layout::hidden_stem(&p.dir_name).unwrap_or(&p.dir_name);
    let suffix = stem
        .get(15..)
        .and_then(|s| s.strip_prefix('-'))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (p.time, suffix, p.dir_name.clone())
}

fn partial_decision(p: &RestorePoint, rules: &RetentionRules) -> Option<PruneDecision> {
    let PointState::Partial {
        reason,
        in_use,
        run_id,
    } = &p.state
    else {
        return None;
    };
    let (action, why) = if *in_use {
        (PruneAction::Keep, PruneReason::InUse)
    } else if let Some(run) = run_id.as_ref().filter(|r| rules.protected_runs.contains(r)) {
        (
            PruneAction::Keep,
            PruneReason::ProtectedRun {
                run_id: run.clone(),
            },
        )
    } else {
        (
            PruneAction::Remove,
            PruneReason::Incomplete {
                detail: reason.clone(),
            },
        )
    };
    Some(PruneDecision {
        path: p.path.clone(),
        subject: None,
        action,
        reason: why,
    })
}

/// The retention plan for `points` (as [`super::list`] returns them). Pure.
pub fn plan(points: &[RestorePoint], rules: &RetentionRules) -> PrunePlan {
    let mut decisions = Vec::new();
    let mut groups: BTreeMap<SubjectKey, Vec<&RestorePoint>> = BTreeMap::new();
    for p in points {
        if let Some(d) = partial_decision(p, rules) {
            decisions.push(d);
        } else if let Some(subject) = p.subject() {
            groups.entry(subject.key.clone()).or_default().push(p);
        }
    }
    for (key, mut list) in groups {
        list.sort_by_key(|p| std::cmp::Reverse(order_key(p)));
        let keep = rules.keep_for(&key);
        for (i, p) in list.iter().enumerate() {
            let rank = i + 1;
            let (action, reason) = match keep {
                None => (PruneAction::Keep, PruneReason::NotManaged),
                Some(keep) if rank <= keep as usize => (
                    PruneAction::Keep,
                    PruneReason::WithinRetention { rank, keep },
                ),
                Some(keep) => (
                    PruneAction::Remove,
                    PruneReason::BeyondRetention { rank, keep },
                ),
            };
            decisions.push(PruneDecision {
                path: p.path.clone(),
                subject: Some(key.clone()),
                action,
                reason,
            });
        }
    }
    decisions.sort_by(|a, b| a.path.cmp(&b.path));
    PrunePlan { decisions }
}

/// NAUbackup's `pre_clean` for one subject before its new backup: removes
/// the oldest complete ones down to `keep - 1` (nothing when `keep - 1 < 1`)
/// and the removable partial ones in the subject's directory
/// (`subject.group_dir(root)`). Pure.
pub fn pre_clean_plan(
    points: &[RestorePoint],
    subject: &Subject,
    root: &Path,
    keep: u32,
    rules: &RetentionRules,
) -> PrunePlan {
    let group_dir = subject.group_dir(root);
    let mut decisions = Vec::new();
    for p in points {
        if p.path.parent() == Some(group_dir.as_path())
            && let Some(d) = partial_decision(p, rules)
        {
            decisions.push(d);
        }
    }
    let mut mine: Vec<&RestorePoint> = points
        .iter()
        .filter(|p| p.subject().is_some_and(|s| s.key == subject.key))
        .collect();
    mine.sort_by_key(|p| std::cmp::Reverse(order_key(p)));
    let keep = keep.max(1);
    let room = keep - 1;
    for (i, p) in mine.iter().enumerate() {
        let rank = i + 1;
        let (action, reason) = if room < 1 || rank <= room as usize {
            (
                PruneAction::Keep,
                PruneReason::WithinRetention { rank, keep },
            )
        } else {
            (PruneAction::Remove, PruneReason::PreClean { rank, keep })
        };
        decisions.push(PruneDecision {
            path: p.path.clone(),
            subject: Some(subject.key.clone()),
            action,
            reason,
        });
    }
    decisions.sort_by(|a, b| a.path.cmp(&b.path));
    PrunePlan { decisions }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneOutcome {
    /// Directories removed.
    pub removed: Vec<PathBuf>,
    /// Directories skipped because a writer took them meanwhile.
    pub skipped_in_use: Vec<PathBuf>,
    /// Directories that could not be removed, with the error.
    pub failed: Vec<(PathBuf, String)>,
}

/// Carries out the removals of `plan`. Each directory is first renamed to
/// `.<name>.deleting` (so it stops counting at once, even if the removal
/// is interrupted), then removed. A partial directory whose lock a writer
/// holds now is skipped.
pub fn apply(plan: &PrunePlan) -> PruneOutcome {
    let mut out = PruneOutcome::default();
    for d in plan.removals() {
        let path = &d.path;
        if !path.exists() {
            continue;
        }
        // Hold the writer's lock (if any) while we rename: a live writer keeps it.
        let lock = File::open(path.join(LOCK_FILE)).ok();
        if let Some(lock) = &lock
            && !try_lock(lock).unwrap_or(false)
        {
            out.skipped_in_use.push(path.clone());
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = if name.ends_with(DELETING_SUFFIX) {
            path.clone()
        } else {
            let stem = super::layout::hidden_stem(&name)
                .unwrap_or(&name)
                .to_string();
            path.with_file_name(format!(".{stem}{DELETING_SUFFIX}"))
        };
        if &target != path
            && let Err(e) = std::fs::rename(path, &target)
        {
            out.failed.push((
                path.clone(),
                format!("cannot rename to {}: {e}", target.display()),
            ));
            continue;
        }
        drop(lock);
        match std::fs::remove_dir_all(&target) {
            Ok(()) => out.removed.push(path.clone()),
            Err(e) => out.failed.push((
                path.clone(),
                format!("cannot remove {}: {e}", target.display()),
            )),
        }
    }
    out
}
