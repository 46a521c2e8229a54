//! `xenvault prune`: the retention plan of a repository per VM (from the
//! configuration's jobs writing to it: each restore point kept with its
//! reasons, or removed), then forget and the two-phase prune (sweep what an
//! earlier run marked at least `--grace` ago and is still unused, then mark
//! what is unused now). `--dry-run` shows all of it and changes nothing.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use time::OffsetDateTime;
use xenvault_engine::config::repo::{keep_options, retention_for};
use xenvault_repo::lock::{DEFAULT_STALE_AFTER, host_name};
use xenvault_repo::manifest::{parse_rfc3339, rfc3339};
use xenvault_repo::{
    ChunkId, KeepOptions, LockInfo, PruneOptions, PruneReport, Repository, RestorePointInfo,
    RetentionPlan, plan_retention,
};
use xenvault_types::config::{Config, JobConfig, RetentionConfig, TargetKind};

use crate::exit::ExitCode;
use crate::repo::{Chosen, RepoSelect, choose, open, repo_error};

/// Options of `xenvault prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub select: RepoSelect,

    /// Show the plan and what would be deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Time between marking a chunk unused and deleting it, e.g. 24h, 90m,
    /// 7d, 0 (a backup interrupted meanwhile can still reuse what it stored).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub grace: Duration,
}

/// Parses `0`, `90s`, `30m`, `24h`, `7d` (a number alone is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write e.g. 24h, 90m, 7d or 0"))?;
    let secs = match unit.trim() {
        "" | "s" => Some(n),
        "m" | "min" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => {
            return Err(format!(
                "{text:?} is not a duration; write e.g. 24h, 90m, 7d or 0"
            ));
        }
    };
    secs.map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// One VM's part of the plan.
#[derive(Debug, Serialize)]
struct VmPlan {
    vm_uuid: String,
    vm: String,
    /// The job whose retention applies (none: everything kept).
    job: Option<String>,
    /// Why no job applies, when none does.
    note: Option<String>,
    retention: Option<RetentionConfig>,
    points: Vec<PointDecision>,
}

#[derive(Debug, Serialize)]
struct PointDecision {
    id: String,
    time: String,
    keep: bool,
    reasons: Vec<String>,
}

#[derive(Debug, Serialize)]
struct LockNote {
    id: String,
    kind: String,
    holder: String,
    purpose: String,
    refreshed: String,
    stale: bool,
}

/// What a dry run finds would be marked.
#[derive(Debug, Serialize)]
struct WouldMark {
    chunks: u64,
    bytes: u64,
    pending_mark: Option<String>,
}

/// A restore point as prune reads it.
struct Point {
    info: RestorePointInfo,
    vm_name: String,
    job: Option<String>,
    tags: Vec<String>,
}

/// Runs `xenvault prune`.
pub async fn run(args: PruneArgs, json: bool) -> anyhow::Result<ExitCode> {
    let chosen = choose(&args.select)?;
    let repo = open(&chosen).await?;
    let now = OffsetDateTime::now_utc();
    let points = read_points(&chosen, &repo).await?;
    let jobs = jobs_writing_here(&chosen);
    let (plans, plan) = plan_all(&points, &jobs, chosen.config.as_ref(), now);

    let locks = repo
        .list_locks()
        .await
        .map_err(|e| repo_error(&chosen, e))?;
    let host = host_name();
    let lock_notes: Vec<LockNote> = locks
        .iter()
        .map(|l: &LockInfo| LockNote {
            id: l.id.clone(),
            kind: format!("{:?}", l.kind).to_lowercase(),
            holder: format!("{}:{}", l.host, l.pid),
            purpose: l.purpose.clone(),
            refreshed: l.refreshed.clone(),
            stale: l.is_stale(now, DEFAULT_STALE_AFTER, &host),
        })
        .collect();

    if !json {
        print_plan(&chosen, &plans, now);
        print_locks(&lock_notes, args.dry_run);
    }
    let to_forget: Vec<String> = plan
        .to_remove()
        .map(|p| format!("{}/{}", p.vm_uuid, p.id))
        .collect();

    if args.dry_run {
        let would = would_mark(&chosen, &repo, &plan).await?;
        if json {
            let doc = serde_json::json!({
                "repository": chosen.location(),
                "dry_run": true,
                "plan": plans,
                "would_forget": to_forget,
                "would_mark": would,
                "locks": lock_notes,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!(
                "Dry run: would forget {} restore point{}, then mark {} chunk{} ({}) no remaining restore point uses; a prune at least {} later deletes them.",
                to_forget.len(),
                plural(to_forget.len()),
                would.chunks,
                plural(would.chunks as usize),
                human(would.bytes),
                human_duration(args.grace)
            );
            if let Some(p) = &would.pending_mark {
                println!(
                    "A mark of {p} is pending: this prune would first sweep it if at least {} old.",
                    human_duration(args.grace)
                );
            }
            println!("Nothing was changed.");
        }
        return Ok(ExitCode::Success);
    }

    let removed_locks = if lock_notes.iter().any(|l| l.stale) {
        repo.remove_stale_locks(DEFAULT_STALE_AFTER)
            .await
            .map_err(|e| repo_error(&chosen, e))?
    } else {
        Vec::new()
    };
    let forgotten = repo
        .forget(&plan)
        .await
        .map_err(|e| repo_error(&chosen, e))?;
    let options = PruneOptions {
        grace: args.grace,
        ..PruneOptions::default()
    };
    let report = repo
        .prune(now, options)
        .await
        .map_err(|e| repo_error(&chosen, e))?;
    if json {
        let doc = serde_json::json!({
            "repository": chosen.location(),
            "dry_run": false,
            "plan": plans,
            "forgotten": forgotten,
            "prune": report,
            "locks": lock_notes,
            "stale_locks_removed": removed_locks.iter().map(|l| l.id.clone()).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_done(&forgotten, &report, args.grace);
    }
    Ok(ExitCode::Success)
}

/// Every restore point with its time, VM name, job label and tags. An
/// unreadable manifest stops prune (its chunks would look unused).
async fn read_points(chosen: &Chosen, repo: &Repository) -> anyhow::Result<Vec<Point>> {
    let mut out = Vec::new();
    for (vm, id) in repo
        .list_restore_points(None)
        .await
        .map_err(|e| repo_error(chosen, e))?
    {
        let m = repo
            .load_manifest(&vm, &id)
            .await
            .map_err(|e| repo_error(chosen, e))?;
        let time = parse_rfc3339(&m.time).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: manifests/{vm}/{id} has an invalid time {:?}; run `xenvault check`",
                chosen.label,
                m.time
            )
        })?;
        let tags = ["source_VM", "VM"]
            .iter()
            .find_map(|k| {
                let v = &m.vm_records[k];
                let v = if v.get("record").is_some() {
                    &v["record"]
                } else {
                    v
                };
                v["tags"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_string))
                        .collect::<Vec<_>>()
                })
            })
            .unwrap_or_default();
        out.push(Point {
            info: RestorePointInfo {
                vm_uuid: vm,
                id,
                time,
                complete: true,
            },
            vm_name: m.vm_name.clone(),
            job: m.labels["job"].as_str().map(str::to_string),
            tags,
        });
    }
    Ok(out)
}

/// The jobs of the configuration that write to the chosen repository.
fn jobs_writing_here(chosen: &Chosen) -> BTreeMap<String, JobConfig> {
    let Some(config) = &chosen.config else {
        return BTreeMap::new();
    };
    config
        .jobs
        .values()
        .filter(|j| {
            config.target(&j.target).is_some_and(|t| {
                t.kind == TargetKind::Repository
                    && (t.name == chosen.target.name
                        || (t.url.is_none()
                            && chosen.target.url.is_none()
                            && same_dir(&t.path, &chosen.target.path)))
            })
        })
        .map(|j| (j.name.clone(), j.clone()))
        .collect()
}

fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The plan per VM: the job named by the VM's newest restore point decides.
fn plan_all(
    points: &[Point],
    jobs: &BTreeMap<String, JobConfig>,
    config: Option<&Config>,
    now: OffsetDateTime,
) -> (Vec<VmPlan>, RetentionPlan) {
    let mut by_vm: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
    for p in points {
        by_vm.entry(p.info.vm_uuid.as_str()).or_default().push(p);
    }
    let mut plans = Vec::new();
    let mut all = RetentionPlan::default();
    for (uuid, mut pts) in by_vm {
        pts.sort_by(|a, b| {
            b.info
                .time
                .cmp(&a.info.time)
                .then(b.info.id.cmp(&a.info.id))
        });
        let newest = pts[0];
        let (job, note, retention, keep) = match &newest.job {
            Some(name) => match jobs.get(name) {
                Some(job) => {
                    let r = retention_for(job, &newest.vm_name, uuid, &newest.tags);
                    let k = keep_options(&r);
                    (Some(name.clone()), None, Some(r), k)
                }
                None => (
                    Some(name.clone()),
                    Some(if config.is_some_and(|c| c.job(name).is_some()) {
                        format!("job {name} now writes elsewhere: everything kept")
                    } else if config.is_some() {
                        format!("job {name} is not in the configuration: everything kept")
                    } else {
                        "no configuration read (give --config): everything kept".to_string()
                    }),
                    None,
                    KeepOptions::default(),
                ),
            },
            None => (
                None,
                Some("written by no job: everything kept".to_string()),
                None,
                KeepOptions::default(),
            ),
        };
        let infos: Vec<RestorePointInfo> = pts.iter().map(|p| p.info.clone()).collect();
        let plan = plan_retention(&infos, &keep, now);
        plans.push(VmPlan {
            vm_uuid: uuid.to_string(),
            vm: newest.vm_name.clone(),
            job,
            note,
            retention,
            points: plan
                .decisions
                .iter()
                .map(|d| PointDecision {
                    id: d.point.id.clone(),
                    time: rfc3339(d.point.time),
                    keep: d.keep,
                    reasons: d.reasons.clone(),
                })
                .collect(),
        });
        all.decisions.extend(plan.decisions);
    }
    plans.sort_by(|a, b| a.vm.cmp(&b.vm).then(a.vm_uuid.cmp(&b.vm_uuid)));
    (plans, all)
}

/// Chunks no restore point the plan keeps uses (what the mark would record).
async fn would_mark(
    chosen: &Chosen,
    repo: &Repository,
    plan: &RetentionPlan,
) -> anyhow::Result<WouldMark> {
    let mut used: HashSet<ChunkId> = HashSet::new();
    for d in plan.decisions.iter().filter(|d| d.keep) {
        let m = repo
            .load_manifest(&d.point.vm_uuid, &d.point.id)
            .await
            .map_err(|e| repo_error(chosen, e))?;
        for disk in &m.disks {
            let index = repo
                .load_index(&disk.index)
                .await
                .map_err(|e| repo_error(chosen, e))?;
            used.extend(index.ids.iter().copied());
        }
    }
    let mut chunks = 0;
    let mut bytes = 0;
    for o in repo
        .storage()
        .list("chunks/")
        .await
        .map_err(|e| repo_error(chosen, e.into()))?
    {
        let Some(id) = ChunkId::from_hex(o.key.rsplit('/').next().unwrap_or("")) else {
            continue;
        };
        if !used.contains(&id) {
            chunks += 1;
            bytes += o.size;
        }
    }
    let pending_mark = match repo.storage().stat("prune/mark").await {
        Ok(m) => Some(rfc3339(OffsetDateTime::from(m.modified))),
        Err(_) => None,
    };
    Ok(WouldMark {
        chunks,
        bytes,
        pending_mark,
    })
}

fn print_plan(chosen: &Chosen, plans: &[VmPlan], now: OffsetDateTime) {
    println!("Retention plan of {} at {}:", chosen.label, rfc3339(now));
    if plans.is_empty() {
        println!("  no restore points");
    }
    for p in plans {
        let rules = p.retention.as_ref().map(describe).unwrap_or_default();
        println!(
            "VM {} ({}){}{}",
            p.vm,
            p.vm_uuid,
            p.job
                .as_ref()
                .map(|j| format!(" — job {j}"))
                .unwrap_or_default(),
            if rules.is_empty() {
                String::new()
            } else {
                format!(": {rules}")
            }
        );
        if let Some(n) = &p.note {
            println!("  ({n})");
        }
        for d in &p.points {
            println!(
                "  {:<6} {} {}",
                if d.keep { "keep" } else { "remove" },
                d.id,
                d.reasons.join("; ")
            );
        }
    }
}

fn describe(r: &RetentionConfig) -> String {
    let mut parts = Vec::new();
    for (name, n) in [
        ("keep-last", r.keep_last),
        ("keep-hourly", r.keep_hourly),
        ("keep-daily", r.keep_daily),
        ("keep-weekly", r.keep_weekly),
        ("keep-monthly", r.keep_monthly),
        ("keep-yearly", r.keep_yearly),
    ] {
        if n > 0 {
            parts.push(format!("{name} {n}"));
        }
    }
    parts.join(", ")
}

fn print_locks(locks: &[LockNote], dry_run: bool) {
    for l in locks {
        if l.stale {
            println!(
                "Stale lock {}: {} lock of {} for {}, last refreshed {} (its process is gone or stopped refreshing){}",
                l.id,
                l.kind,
                l.holder,
                l.purpose,
                l.refreshed,
                if dry_run {
                    "; prune would remove it"
                } else {
                    "; removed"
                }
            );
        } else {
            println!(
                "Lock held: {} lock {} of {} for {} (refreshed {})",
                l.kind, l.id, l.holder, l.purpose, l.refreshed
            );
        }
    }
}

fn print_done(forgotten: &[String], report: &PruneReport, grace: Duration) {
    println!(
        "Forgot {} restore point{}{}",
        forgotten.len(),
        plural(forgotten.len()),
        if forgotten.is_empty() { "." } else { ":" }
    );
    for f in forgotten {
        println!("  {f}");
    }
    match &report.sweep_deferred {
        Some(why) => println!("Sweep not run: {why}."),
        None => println!(
            "Swept: deleted {} chunk{} ({}) and {} orphan index{} marked earlier; {} marked chunk{} in use again kept.",
            report.deleted_chunks,
            plural(report.deleted_chunks as usize),
            human(report.deleted_bytes),
            report.deleted_indexes,
            if report.deleted_indexes == 1 {
                ""
            } else {
                "es"
            },
            report.rescued_chunks,
            plural(report.rescued_chunks as usize)
        ),
    }
    if report.deleted_temporaries > 0 {
        println!(
            "Removed {} temporary file{} left by interrupted writes (older than the grace period).",
            report.deleted_temporaries,
            plural(report.deleted_temporaries as usize)
        );
    }
    let pending = report
        .sweep_deferred
        .as_deref()
        .is_some_and(|r| r != "no mark yet");
    if pending {
        println!("The pending mark is kept (its grace period is not restarted).");
    } else {
        println!(
            "Marked {} unused chunk{} and {} orphan index{}: the first prune at least {} from now deletes those still unused.",
            report.marked_chunks,
            plural(report.marked_chunks as usize),
            report.marked_indexes,
            if report.marked_indexes == 1 { "" } else { "es" },
            human_duration(grace)
        );
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn human(bytes: u64) -> String {
    xenvault_engine::preflight::human_bytes(bytes)
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        "0 s".into()
    } else if s.is_multiple_of(86_400) {
        format!("{} d", s / 86_400)
    } else if s.is_multiple_of(3600) {
        format!("{} h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(human_duration(Duration::from_secs(86_400)), "1 d");
    }
}
