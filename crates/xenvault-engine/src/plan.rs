//! The backup plan: the settings in force, the VMs that will run and why
//! every other VM will not, and the result of every check — built WITHOUT
//! creating (or destroying) anything on the pool. `xenvault plan` prints it;
//! `xenvault backup` builds the same plan (after its leftover sweep) and
//! follows it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use xenvault_types::config::{
    Compression, Config, DiskSelection, ExportMode, JobConfig, RetentionConfig, TargetKind, Weekday,
};
use xenvault_xapi::records::{Sr, SrRef, Vbd, VbdType, Vdi, VdiRef, Vm, VmRef};
use xenvault_xapi::session::Session;

use crate::backup::boot_index;
use crate::journal::{self, Journal};
use crate::preflight::{self, Check, SrUsage};
use crate::selection::{self, VmCandidate};

/// Bytes added to each VM's estimate for metadata files and XVA headers.
const PER_VM_OVERHEAD: u64 = 1 << 20;

/// One pool's session and records, as the plan needs them.
pub struct PoolView {
    /// The pool's configuration name.
    pub name: String,
    /// The session.
    pub session: Session,
}

/// A VM the job selected, with its checks.
#[derive(Debug, Clone, Serialize)]
pub struct VmPlan {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Pool (configuration name).
    pub pool: String,
    /// The VM's ref on its pool.
    #[serde(skip)]
    pub vm_ref: VmRef,
    /// Its power state.
    pub power_state: String,
    /// The host it runs on (or has affinity to), for the per-host limit.
    pub host: Option<String>,
    /// Why it was selected.
    pub why: Vec<String>,
    /// Export mode.
    pub mode: ExportMode,
    /// Disks.
    pub disks: DiskSelection,
    /// Compression.
    pub compression: Compression,
    /// Complete backups to keep.
    pub keep_last: u32,
    /// The VM's whole retention (repository targets use the calendar keys
    /// too); a VM override's `retention` wins over the job's.
    pub retention: RetentionConfig,
    /// Estimated bytes on the target.
    pub estimate: u64,
    /// The SRs of its disks.
    pub srs: Vec<SrUsage>,
    /// Its checks.
    pub checks: Vec<Check>,
    /// Why it will be skipped (a failed check), `None` when it runs.
    pub skip: Option<String>,
}

impl VmPlan {
    /// True when it will be backed up.
    pub fn will_run(&self) -> bool {
        self.skip.is_none()
    }
}

/// A VM of the pools that the job will not back up, and why.
#[derive(Debug, Clone, Serialize)]
pub struct NotSelected {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Pool.
    pub pool: String,
    /// Why.
    pub reason: String,
}

/// Everything `xenvault plan` shows.
#[derive(Debug, Clone, Serialize)]
pub struct BackupPlan {
    /// The job.
    pub job: String,
    /// The day the selection was made for.
    pub today: String,
    /// The settings in force, as `key = value` pairs.
    pub settings: Vec<(String, String)>,
    /// The target directory (a repository target's local path; empty for
    /// a remote repository, see `target_url`).
    pub target: PathBuf,
    /// The target's kind.
    pub target_kind: TargetKind,
    /// A remote repository's URL.
    pub target_url: Option<String>,
    /// Target-level checks (writable, free space in total).
    pub target_checks: Vec<Check>,
    /// Leftovers of earlier runs (journal and tags).
    pub leftover_checks: Vec<Check>,
    /// The selected VMs (will run or skipped by a check).
    pub vms: Vec<VmPlan>,
    /// The other VMs, with reasons (dom0, templates and snapshots left out).
    pub not_selected: Vec<NotSelected>,
    /// Selection problems (typos, names matching nothing, duplicates).
    pub problems: Vec<String>,
    /// True when selection found an error (e.g. a listed VM does not exist).
    pub has_errors: bool,
}

impl BackupPlan {
    /// The VMs that will run.
    pub fn runnable(&self) -> impl Iterator<Item = &VmPlan> {
        self.vms.iter().filter(|v| v.will_run())
    }

    /// True when the target itself failed a check (nothing can run).
    pub fn target_failed(&self) -> bool {
        self.target_checks.iter().any(Check::failed)
    }

    /// Human-readable text (what `xenvault plan` prints).
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("Plan of job {} for {}\n\n", self.job, self.today));
        out.push_str("Settings in force:\n");
        for (k, v) in &self.settings {
            out.push_str(&format!("  {k} = {v}\n"));
        }
        out.push_str("\nChecks:\n");
        for c in self.target_checks.iter().chain(&self.leftover_checks) {
            out.push_str(&format!("  {}\n", c.line()));
        }
        let run: Vec<&VmPlan> = self.runnable().collect();
        out.push_str(&format!("\nVMs that will be backed up ({}):\n", run.len()));
        for v in &run {
            let what = if v.mode.is_disks() {
                format!("{} ({} disks)", v.mode, v.disks.as_str())
            } else {
                v.mode.to_string()
            };
            let (what, keep) = if self.target_kind == TargetKind::Repository {
                (
                    "repository restore point (NBD, CBT when possible)".to_string(),
                    retention_words(&v.retention),
                )
            } else {
                (what, v.keep_last.to_string())
            };
            out.push_str(&format!(
                "  {} ({}) — {what}, keep {keep}, about {}; selected by {}\n",
                v.name,
                v.uuid,
                preflight::human_bytes(v.estimate),
                v.why.join(", ")
            ));
            for c in &v.checks {
                out.push_str(&format!("      {}\n", c.line()));
            }
        }
        let skipped: Vec<&VmPlan> = self.vms.iter().filter(|v| !v.will_run()).collect();
        if !skipped.is_empty() {
            out.push_str(&format!(
                "\nSelected VMs that will be SKIPPED ({}):\n",
                skipped.len()
            ));
            for v in skipped {
                out.push_str(&format!(
                    "  {} ({}): {}\n",
                    v.name,
                    v.uuid,
                    v.skip.as_deref().unwrap_or("")
                ));
            }
        }
        if !self.not_selected.is_empty() {
            out.push_str(&format!(
                "\nVMs that will not run ({}):\n",
                self.not_selected.len()
            ));
            for v in &self.not_selected {
                out.push_str(&format!("  {} ({}): {}\n", v.name, v.uuid, v.reason));
            }
        }
        if !self.problems.is_empty() {
            out.push_str("\nProblems:\n");
            for p in &self.problems {
                out.push_str(&format!("  {p}\n"));
            }
        }
        out
    }
}

/// `last 7, daily 14` — the keep rules of a retention in words.
pub fn retention_words(r: &RetentionConfig) -> String {
    let mut parts = vec![format!("last {}", r.keep_last)];
    for (name, n) in [
        ("hourly", r.keep_hourly),
        ("daily", r.keep_daily),
        ("weekly", r.keep_weekly),
        ("monthly", r.keep_monthly),
        ("yearly", r.keep_yearly),
    ] {
        if n > 0 {
            parts.push(format!("{name} {n}"));
        }
    }
    parts.join(", ")
}

/// The retention of one VM: the job's, the deciding rule's `keep-last`,
/// then the VM override's `keep-last` / `retention` (the loader's
/// `config::repo::retention_for`, so `xenvault prune` plans the same).
pub fn vm_retention(job: &JobConfig, name: &str, uuid: &str, tags: &[String]) -> RetentionConfig {
    crate::config::repo::retention_for(job, name, uuid, tags)
}

/// The reserved free space of a target (bytes the run must leave free:
/// the target's `reserved-space`).
pub fn reserved_space(config: &Config, job: &JobConfig) -> u64 {
    config.target(&job.target).map_or(0, |t| t.reserved_space)
}

/// The settings in force for `job`.
pub fn settings_of(config: &Config, job: &JobConfig, state_dir: &Path) -> Vec<(String, String)> {
    let mut s = vec![
        ("pools".to_string(), job.pools.join(", ")),
        (
            "target".to_string(),
            config
                .target(&job.target)
                .map(|t| format!("{} ({})", t.name, t.path.display()))
                .unwrap_or_else(|| job.target.clone()),
        ),
        (
            "target-type".to_string(),
            match config.target(&job.target).map(|t| t.kind) {
                Some(TargetKind::Repository) => "repository".to_string(),
                _ => "archive".to_string(),
            },
        ),
        ("mode".to_string(), job.mode.to_string()),
        ("disks".to_string(), job.disks.as_str().to_string()),
        (
            "compression".to_string(),
            job.compression.as_str().to_string(),
        ),
        ("keep-last".to_string(), job.retention.keep_last.to_string()),
        ("concurrency".to_string(), job.concurrency.to_string()),
        (
            "per-host-limit".to_string(),
            job.per_host_limit
                .map_or("none".to_string(), |n| n.to_string()),
        ),
        (
            "sr-usage-threshold".to_string(),
            format!("{}%", job.sr_usage_threshold),
        ),
        (
            "reserved-space".to_string(),
            preflight::human_bytes(reserved_space(config, job)),
        ),
        ("pre-clean".to_string(), job.pre_clean.to_string()),
        (
            "pool-metadata".to_string(),
            job.pool_metadata
                .as_ref()
                .map_or("no".to_string(), |e| format!("yes, keep {}", e.keep_last)),
        ),
        (
            "host-backup".to_string(),
            job.host_backup
                .as_ref()
                .map_or("no".to_string(), |e| format!("yes, keep {}", e.keep_last)),
        ),
        (
            "log-retention-days".to_string(),
            job.log_retention_days.to_string(),
        ),
        ("state-dir".to_string(), state_dir.display().to_string()),
    ];
    if let Some(w) = &job.weekday_schedule {
        s.push(("weekday-file".to_string(), w.path.display().to_string()));
    }
    if let Some(t) = config.target(&job.target)
        && t.kind == TargetKind::Repository
    {
        if let Some(url) = &t.url {
            s.push(("repository-url".to_string(), url.clone()));
        }
        s.push(("retention".to_string(), retention_words(&job.retention)));
        s.push(("cbt".to_string(), format!("{:?}", job.cbt).to_lowercase()));
        s.push(("base".to_string(), format!("{:?}", job.base).to_lowercase()));
        s.push((
            "nbd-connections".to_string(),
            job.nbd_connections.to_string(),
        ));
        s.push((
            "disk-concurrency".to_string(),
            job.disk_concurrency.to_string(),
        ));
    }
    s
}

/// What the plan reads from one pool.
struct PoolRecords {
    vms: BTreeMap<VmRef, Vm>,
    vbds: BTreeMap<xenvault_xapi::records::VbdRef, Vbd>,
    vdis: BTreeMap<VdiRef, Vdi>,
    srs: BTreeMap<SrRef, Sr>,
    hosts: BTreeMap<xenvault_xapi::records::HostRef, xenvault_xapi::records::Host>,
}

async fn read_pool(session: &Session) -> Result<PoolRecords, xenvault_xapi::Error> {
    Ok(PoolRecords {
        vms: session.vm().get_all_records().await?,
        vbds: session.vbd().get_all_records().await?,
        vdis: session.vdi().get_all_records().await?,
        srs: session.sr().get_all_records().await?,
        hosts: session.host().get_all_records().await?,
    })
}

/// A plan failure: a pool could not be read.
#[derive(Debug, thiserror::Error)]
#[error("pool {pool}: cannot read its VMs: {source}")]
pub struct PlanError {
    /// The pool.
    pub pool: String,
    /// The client error.
    pub source: xenvault_xapi::Error,
}

/// Builds the plan of `job` for `today`. Reads the pools, the target and
/// the journal; creates nothing anywhere (the target check writes and
/// removes one small test file).
pub async fn build(
    config: &Config,
    job: &JobConfig,
    pools: &[PoolView],
    journal: &Journal,
    today: Weekday,
    opened: Option<&xenvault_repo::Repository>,
) -> Result<BackupPlan, PlanError> {
    let target = config.target(&job.target);
    let target_kind = target.map(|t| t.kind).unwrap_or_default();
    let target_url = target
        .filter(|t| t.kind == TargetKind::Repository)
        .and_then(|t| t.url.clone());
    let target_dir = if target_url.is_some() {
        PathBuf::new()
    } else {
        target.map(|t| t.path.clone()).unwrap_or_default()
    };
    let reserved = reserved_space(config, job);

    let mut candidates = Vec::new();
    let mut records = BTreeMap::new();
    for p in pools {
        let r = read_pool(&p.session).await.map_err(|source| PlanError {
            pool: p.name.clone(),
            source,
        })?;
        candidates.extend(
            r.vms
                .values()
                .map(|vm| VmCandidate::from_record(&p.name, vm)),
        );
        records.insert(p.name.clone(), r);
    }
    let selection = selection::select(job, &candidates, today);

    // Target checks: a local directory must be writable with room; a
    // repository must open (reachable, initialized, password right).
    let mut target_checks = Vec::new();
    let writable = if target_url.is_none() {
        preflight::check_target_writable(&target_dir)
    } else {
        Check::pass(
            preflight::TARGET_WRITABLE,
            target_url.clone().unwrap_or_default(),
            "remote repository: checked by opening it",
        )
    };
    let free = if writable.failed() || target_url.is_some() {
        None
    } else {
        preflight::free_space(&target_dir).ok()
    };
    if target_url.is_none() {
        target_checks.push(writable.clone());
    }
    let mut target_failure = writable.failed().then(|| writable.detail.clone());
    if let Some(t) = target.filter(|t| t.kind == TargetKind::Repository)
        && target_failure.is_none()
    {
        // A run has opened it already: no second key derivation.
        let c = match opened {
            Some(repo) => preflight::repository_opened(t, repo),
            None => preflight::check_repository(t).await,
        };
        if c.failed() {
            target_failure = Some(c.detail.clone());
        }
        target_checks.push(c);
    }

    // Leftovers: what the journal and the tags say (the sweep acts at run time).
    let mut leftover_checks = Vec::new();
    for p in pools {
        let open = journal.outstanding(Some(&p.name)).unwrap_or_default();
        leftover_checks.push(if open.is_empty() {
            Check::pass(
                preflight::LEFTOVERS,
                &p.name,
                format!("no open snapshot in the journal {}", journal.path().display()),
            )
        } else {
            Check::warn(
                preflight::LEFTOVERS,
                &p.name,
                format!(
                    "{} snapshot operation(s) of earlier runs are open in the journal; the next backup run removes them first (by UUID and tag)",
                    open.len()
                ),
            )
        });
        for stale in crate::kept::stale_on_pool(config, journal, &p.name) {
            leftover_checks.push(Check::warn(preflight::LEFTOVERS, &p.name, stale));
        }
        if let Ok(orphans) = journal::tagged_orphans(&p.session, journal, &job.name).await
            && !orphans.is_empty()
        {
            let list: Vec<String> = orphans.iter().map(|(u, n)| format!("{n} ({u})")).collect();
            leftover_checks.push(Check::warn(
                preflight::LEFTOVERS,
                &p.name,
                format!(
                    "snapshots tagged for this job but absent from the journal (left alone; remove them by hand if no run is active): {}",
                    list.join(", ")
                ),
            ));
        }
    }

    let mut vms = Vec::new();
    let mut total_estimate = 0u64;
    for chosen in &selection.chosen {
        let Some(r) = records.get(&chosen.pool) else {
            continue;
        };
        let Some((vm_ref, vm)) = r.vms.iter().find(|(_, v)| v.uuid == chosen.uuid) else {
            continue;
        };
        // The VM's disks (VBDs of type Disk with a VDI).
        let mut disks: Vec<(bool, String, &Vdi)> = Vec::new();
        for vbd_ref in &vm.vbds {
            let Some(vbd) = r.vbds.get(vbd_ref) else {
                continue;
            };
            if vbd.type_ != VbdType::Disk || vbd.empty || vbd.vdi.is_null() {
                continue;
            }
            if let Some(vdi) = r.vdis.get(&vbd.vdi) {
                disks.push((vbd.bootable, vbd.userdevice.clone(), vdi));
            }
        }
        if chosen.disks == DiskSelection::Boot
            && let Some(i) = boot_index(
                &disks
                    .iter()
                    .map(|(b, u, _)| (*b, u.clone()))
                    .collect::<Vec<_>>(),
            )
        {
            disks = vec![disks.swap_remove(i)];
        }
        let estimate = PER_VM_OVERHEAD
            + disks
                .iter()
                .map(|(_, _, vdi)| {
                    let used = u64::try_from(vdi.physical_utilisation).unwrap_or(0);
                    let size = u64::try_from(vdi.virtual_size).unwrap_or(0);
                    if used == 0 { size.min(1 << 20) } else { used }
                })
                .sum::<u64>();
        total_estimate += estimate;
        let mut srs: Vec<SrUsage> = Vec::new();
        for (_, _, vdi) in &disks {
            if let Some(sr) = r.srs.get(&vdi.sr)
                && !srs.iter().any(|s| s.uuid == sr.uuid)
            {
                srs.push(SrUsage {
                    uuid: sr.uuid.clone(),
                    name: sr.name_label.clone(),
                    physical_size: sr.physical_size,
                    physical_utilisation: sr.physical_utilisation,
                });
            }
        }
        let host_ref = if !vm.resident_on.is_null() {
            Some(&vm.resident_on)
        } else if !vm.affinity.is_null() {
            Some(&vm.affinity)
        } else {
            None
        };
        let host = host_ref
            .and_then(|h| r.hosts.get(h))
            .map(|h| h.uuid.clone());

        let mut checks = Vec::new();
        let mut skip = target_failure.clone();
        let sr_check = preflight::check_sr_usage(&vm.name_label, &srs, job.sr_usage_threshold);
        if sr_check.failed() && skip.is_none() {
            skip = Some(sr_check.detail.clone());
        }
        checks.push(sr_check);
        if let Some(free) = free {
            let c = preflight::check_free_space(&vm.name_label, free, estimate, reserved);
            if c.failed() && skip.is_none() {
                skip = Some(c.detail.clone());
            }
            checks.push(c);
        }
        vms.push(VmPlan {
            uuid: vm.uuid.clone(),
            name: vm.name_label.clone(),
            pool: chosen.pool.clone(),
            vm_ref: vm_ref.clone(),
            power_state: vm.power_state.to_string(),
            host,
            why: chosen.why.clone(),
            mode: chosen.mode,
            disks: chosen.disks,
            compression: chosen.compression,
            keep_last: chosen.retention.keep_last,
            retention: vm_retention(job, &vm.name_label, &vm.uuid, &vm.tags),
            estimate,
            srs,
            checks,
            skip,
        });
    }
    if let Some(free) = free {
        let mut c = preflight::check_free_space(
            &target_dir.display().to_string(),
            free,
            total_estimate,
            reserved,
        );
        if c.failed() {
            // Retention frees room as the run goes: a warning, not a skip.
            c.status = preflight::CheckStatus::Warn;
            c.detail = format!("all VMs together may not fit: {}", c.detail);
        }
        target_checks.push(c);
    }

    let not_selected = selection
        .skipped
        .iter()
        .filter(|s| !s.reason.is_never_a_backup_candidate())
        .map(|s| NotSelected {
            uuid: s.uuid.clone(),
            name: s.name.clone(),
            pool: s.pool.clone(),
            reason: s.reason.to_string(),
        })
        .collect();

    Ok(BackupPlan {
        job: job.name.clone(),
        today: today.name().to_string(),
        settings: settings_of(config, job, journal.dir()),
        target: target_dir,
        target_kind,
        target_url,
        target_checks,
        leftover_checks,
        vms,
        not_selected,
        problems: selection.problems.iter().map(|p| p.to_string()).collect(),
        has_errors: selection.has_errors(),
    })
}
