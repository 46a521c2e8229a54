//! Which VMs a job backs up today, with the settings in force for each, and
//! why every other VM is not backed up. Pure: no I/O, no clock.
//!
//! Rules, in order:
//! 1. The control domain (dom0), snapshots and templates are never selected.
//! 2. VMs of pools the job does not name are skipped.
//! 3. A VM is included when an include rule selects it: `all-vms`, `names`
//!    (literal), `regexes` (matched at the start of the name), `tags`,
//!    `[[rule]]`s, or the weekday file's lines for today.
//! 4. Excludes (`exclude-names`, `exclude-regexes`, `exclude-tags`) are applied
//!    after every include, then the `power-states` filter.
//! 5. Two VMs with one name in the job's pools are never backed up (their
//!    archives would mix); that is reported as an error.
//! 6. Settings: the job's, then the LAST matching `[[rule]]`'s (it decides
//!    keep-last, mode and disks, the job's values filling what it leaves out),
//!    then the VM's own override (`[jobs.X.vm."name"]`, by UUID or name).
//!
//! Literal names (in `names`, rules, the weekday file) that match no VM are
//! errors in [`Selection::problems`], with the closest name as a suggestion;
//! patterns and excludes matching nothing are warnings.

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;
use serde::Serialize;
use xenvault_types::config::{
    Compression, DiskSelection, ExportMode, JobConfig, PowerState, RetentionConfig, SelectRule,
    Weekday,
};

use crate::config::closest;
use crate::config::weekday::glob_match;

/// A VM as selection sees it (built from a XAPI VM record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmCandidate {
    /// The VM's UUID: what xenvault tracks VMs by.
    pub uuid: String,
    /// Its name label.
    pub name: String,
    /// Its XAPI tags.
    pub tags: Vec<String>,
    /// Its power state (`None` when XAPI reports one xenvault does not know).
    pub power_state: Option<PowerState>,
    /// dom0 (or a driver domain).
    pub is_control_domain: bool,
    /// A template (snapshots are templates too).
    pub is_a_template: bool,
    /// A snapshot.
    pub is_a_snapshot: bool,
    /// A template shipped with the host.
    pub is_default_template: bool,
    /// A restore is still building it (`xenvault:restoring` in its
    /// `other_config`, see `restore::inflight`): its disks may be half filled.
    pub being_restored: bool,
    /// The configuration name of the pool it lives in.
    pub pool: String,
}

impl VmCandidate {
    /// Builds a candidate from a XAPI VM record of the pool named `pool` in the configuration.
    pub fn from_record(pool: &str, vm: &xenvault_xapi::records::Vm) -> VmCandidate {
        VmCandidate {
            uuid: vm.uuid.clone(),
            name: vm.name_label.clone(),
            tags: vm.tags.clone(),
            power_state: PowerState::parse(&vm.power_state.to_string()),
            is_control_domain: vm.is_control_domain,
            is_a_template: vm.is_a_template,
            is_a_snapshot: vm.is_a_snapshot,
            is_default_template: vm.is_default_template,
            being_restored: vm
                .other_config
                .contains_key(crate::restore::inflight::TAG_RESTORING),
            pool: pool.to_string(),
        }
    }

    fn is_backupable(&self) -> bool {
        !(self.is_control_domain
            || self.is_a_snapshot
            || self.is_a_template
            || self.is_default_template)
    }
}

/// A VM the job backs up today, with its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chosen {
    /// The VM's UUID.
    pub uuid: String,
    /// Its name.
    pub name: String,
    /// Its pool (configuration name).
    pub pool: String,
    /// Every rule that selected it, e.g. `regex "PROD.*" (weekend.cfg:12)`.
    pub why: Vec<String>,
    /// Retention in force for it.
    pub retention: RetentionConfig,
    /// Export mode in force.
    pub mode: ExportMode,
    /// Disks (per-disk modes).
    pub disks: DiskSelection,
    /// Compression in force (the job's).
    pub compression: Compression,
}

/// Why a VM is not backed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SkipReason {
    /// The control domain (dom0).
    ControlDomain,
    /// A snapshot.
    Snapshot,
    /// A template.
    Template,
    /// A restore is still building it.
    BeingRestored,
    /// A VM of a pool the job does not name.
    OtherPool,
    /// No include rule selects it.
    NotSelected,
    /// The weekday file lists it on other days only.
    NotToday {
        /// The days it is listed on.
        days: Vec<Weekday>,
        /// Today.
        today: Weekday,
    },
    /// An exclude rule removes it.
    Excluded {
        /// The rule, e.g. `exclude-names "web-test"`.
        by: String,
    },
    /// Its power state is not one the job wants.
    PowerState {
        /// Its state (`None`: unknown to xenvault).
        state: Option<PowerState>,
        /// The states the job wants.
        wanted: Vec<PowerState>,
    },
    /// Another VM of the job's pools has the same name.
    DuplicateName {
        /// The UUIDs of every VM with this name.
        uuids: Vec<String>,
    },
}

impl SkipReason {
    /// True for objects that are never VMs to back up (dom0, snapshots, templates):
    /// a preview may hide them.
    pub fn is_never_a_backup_candidate(&self) -> bool {
        matches!(
            self,
            SkipReason::ControlDomain | SkipReason::Snapshot | SkipReason::Template
        )
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::ControlDomain => {
                f.write_str("the control domain (dom0) is never backed up")
            }
            SkipReason::Snapshot => f.write_str("a snapshot, not a VM"),
            SkipReason::Template => f.write_str("a template, not a VM"),
            SkipReason::BeingRestored => f.write_str(
                "a restore is still building it (xenvault:restoring): backed up once it is whole",
            ),
            SkipReason::OtherPool => f.write_str("in a pool this job does not back up"),
            SkipReason::NotSelected => f.write_str("no rule of the job selects it"),
            SkipReason::NotToday { days, today } => {
                let days: Vec<&str> = days.iter().map(|d| d.name()).collect();
                write!(
                    f,
                    "the weekday file lists it on {} only; today is {today}",
                    days.join(", ")
                )
            }
            SkipReason::Excluded { by } => write!(f, "excluded by {by}"),
            SkipReason::PowerState { state, wanted } => {
                let wanted: Vec<&str> = wanted.iter().map(|s| s.as_str()).collect();
                match state {
                    Some(s) => write!(
                        f,
                        "it is {s}; the job backs up only {} VMs",
                        wanted.join(", ")
                    ),
                    None => write!(
                        f,
                        "its power state is unknown; the job backs up only {} VMs",
                        wanted.join(", ")
                    ),
                }
            }
            SkipReason::DuplicateName { uuids } => write!(
                f,
                "{} VMs have this name ({}): their backups would mix; rename all but one",
                uuids.len(),
                uuids.join(", ")
            ),
        }
    }
}

/// A VM not backed up, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The VM's UUID.
    pub uuid: String,
    /// Its name.
    pub name: String,
    /// Its pool (configuration name).
    pub pool: String,
    /// Why.
    pub reason: SkipReason,
}

/// How serious a selection problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something the operator meant is not happening (a VM name that matches nothing).
    Error,
    /// Worth a look (a pattern matching nothing).
    Warning,
}

/// A problem found while selecting (a typo, a name matching nothing, a duplicate name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// Where the rule is: `jobs.nightly.names`, `weekdays.txt:4`, `weekend.cfg:12`.
    pub origin: String,
    /// What is wrong, with a suggestion when there is one.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}: {}", self.origin, self.message)
    }
}

/// The outcome of selection.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Selection {
    /// The VMs to back up, sorted by name.
    pub chosen: Vec<Chosen>,
    /// Every other candidate with its reason, sorted by name.
    pub skipped: Vec<Skipped>,
    /// Problems found (errors first).
    pub problems: Vec<Problem>,
}

impl Selection {
    /// True when a problem is an error.
    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Error)
    }

    /// The chosen VM with this UUID.
    pub fn chosen_by_uuid(&self, uuid: &str) -> Option<&Chosen> {
        self.chosen.iter().find(|c| c.uuid == uuid)
    }
}

enum Matcher {
    Name(String),
    Regex(Regex),
    Tag(String),
}

impl Matcher {
    fn matches(&self, vm: &VmCandidate) -> bool {
        match self {
            Matcher::Name(n) => vm.name == *n,
            Matcher::Regex(r) => r.is_match(&vm.name),
            Matcher::Tag(t) => vm.tags.iter().any(|x| x == t),
        }
    }
}

/// A rule ready to match: what it is called in messages and its origin.
struct Compiled<'a> {
    matcher: Matcher,
    label: String,
    origin: String,
    rule: Option<&'a SelectRule>,
    literal: bool,
}

fn front_anchored(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})"))
}

/// Selects the VMs of `job` among `candidates` for the day `today`.
pub fn select(job: &JobConfig, candidates: &[VmCandidate], today: Weekday) -> Selection {
    let mut problems = Vec::new();
    let job_key = format!("jobs.{}", job.name);
    let compile_regex =
        |pattern: &str, origin: &str, problems: &mut Vec<Problem>| match front_anchored(pattern) {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(Problem {
                    severity: Severity::Error,
                    origin: origin.to_string(),
                    message: format!(
                        "invalid regex `{pattern}`: {}; the rule is ignored",
                        crate::config::one_line(&e.to_string())
                    ),
                });
                None
            }
        };

    // Include rules.
    let mut includes: Vec<Compiled<'_>> = Vec::new();
    for n in &job.names {
        includes.push(Compiled {
            matcher: Matcher::Name(n.clone()),
            label: format!("name {n:?}"),
            origin: format!("{job_key}.names"),
            rule: None,
            literal: true,
        });
    }
    for r in &job.regexes {
        let origin = format!("{job_key}.regexes");
        if let Some(re) = compile_regex(r, &origin, &mut problems) {
            includes.push(Compiled {
                matcher: Matcher::Regex(re),
                label: format!("regex {r:?}"),
                origin,
                rule: None,
                literal: false,
            });
        }
    }
    for t in &job.tags {
        includes.push(Compiled {
            matcher: Matcher::Tag(t.clone()),
            label: format!("tag {t:?}"),
            origin: format!("{job_key}.tags"),
            rule: None,
            literal: false,
        });
    }
    for (i, rule) in job.rules.iter().enumerate() {
        let origin = rule
            .origin
            .clone()
            .unwrap_or_else(|| format!("{job_key}.rule[{i}]"));
        let (matcher, label, literal) = if let Some(n) = &rule.name {
            (Matcher::Name(n.clone()), format!("name {n:?}"), true)
        } else if let Some(r) = &rule.regex {
            match compile_regex(r, &origin, &mut problems) {
                Some(re) => (Matcher::Regex(re), format!("regex {r:?}"), false),
                None => continue,
            }
        } else if let Some(t) = &rule.tag {
            (Matcher::Tag(t.clone()), format!("tag {t:?}"), false)
        } else {
            continue;
        };
        includes.push(Compiled {
            matcher,
            label,
            origin,
            rule: Some(rule),
            literal,
        });
    }

    // Excludes.
    let mut excludes: Vec<Compiled<'_>> = Vec::new();
    for n in &job.exclude_names {
        excludes.push(Compiled {
            matcher: Matcher::Name(n.clone()),
            label: format!("exclude-names {n:?}"),
            origin: format!("{job_key}.exclude-names"),
            rule: None,
            literal: false,
        });
    }
    for r in &job.exclude_regexes {
        let origin = format!("{job_key}.exclude-regexes");
        if let Some(re) = compile_regex(r, &origin, &mut problems) {
            excludes.push(Compiled {
                matcher: Matcher::Regex(re),
                label: format!("exclude-regexes {r:?}"),
                origin,
                rule: None,
                literal: false,
            });
        }
    }
    for t in &job.exclude_tags {
        excludes.push(Compiled {
            matcher: Matcher::Tag(t.clone()),
            label: format!("exclude-tags {t:?}"),
            origin: format!("{job_key}.exclude-tags"),
            rule: None,
            literal: false,
        });
    }

    // The VMs that can be backed up at all, in the job's pools.
    let real: Vec<&VmCandidate> = candidates
        .iter()
        .filter(|c| c.is_backupable() && job.pools.contains(&c.pool))
        .collect();
    let real_names: Vec<&str> = {
        let mut v: Vec<&str> = real.iter().map(|c| c.name.as_str()).collect();
        v.sort_unstable();
        v.dedup();
        v
    };

    let weekday_file = job
        .weekday_schedule
        .as_ref()
        .map(|s| {
            s.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| s.path.display().to_string())
        })
        .unwrap_or_default();

    // Report rules that match nothing.
    for inc in &includes {
        if !real.iter().any(|vm| inc.matcher.matches(vm)) {
            problems.push(no_match_problem(
                inc,
                candidates,
                &real_names,
                job,
                inc.literal,
            ));
        }
    }
    for exc in &excludes {
        if !real.iter().any(|vm| exc.matcher.matches(vm)) {
            problems.push(Problem {
                severity: Severity::Warning,
                origin: exc.origin.clone(),
                message: format!("{} matches no VM", exc.label),
            });
        }
    }
    if let Some(schedule) = &job.weekday_schedule {
        for entry in &schedule.entries {
            for pattern in &entry.vms {
                if !real.iter().any(|vm| glob_match(pattern, &vm.name)) {
                    let literal = !pattern.contains('*');
                    let origin = format!("{weekday_file}:{}", entry.line);
                    let mut message = if literal {
                        format!("no VM is named {pattern:?}")
                    } else {
                        format!("{pattern:?} matches no VM")
                    };
                    if literal && let Some(s) = closest(pattern, real_names.iter().copied()) {
                        message.push_str(&format!("; did you mean {s:?}?"));
                    }
                    problems.push(Problem {
                        severity: if literal {
                            Severity::Error
                        } else {
                            Severity::Warning
                        },
                        origin,
                        message,
                    });
                }
            }
        }
    }
    for key in job.vm_overrides.keys() {
        if !real.iter().any(|vm| vm.uuid == *key || vm.name == *key) {
            let mut message = format!("settings for {key:?}, but no VM has this name or UUID");
            if let Some(s) = closest(key, real_names.iter().copied()) {
                message.push_str(&format!("; did you mean {s:?}?"));
            }
            problems.push(Problem {
                severity: Severity::Warning,
                origin: format!("{job_key}.vm.{key}"),
                message,
            });
        }
    }

    // Duplicate names among the backupable VMs of the job's pools.
    let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for vm in &real {
        by_name
            .entry(vm.name.as_str())
            .or_default()
            .push(vm.uuid.as_str());
    }

    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    let skip = |vm: &VmCandidate, reason: SkipReason| Skipped {
        uuid: vm.uuid.clone(),
        name: vm.name.clone(),
        pool: vm.pool.clone(),
        reason,
    };
    let mut duplicate_chosen: BTreeMap<String, Vec<String>> = BTreeMap::new();

    for vm in candidates {
        if vm.is_control_domain {
            skipped.push(skip(vm, SkipReason::ControlDomain));
            continue;
        }
        if vm.is_a_snapshot {
            skipped.push(skip(vm, SkipReason::Snapshot));
            continue;
        }
        if vm.is_a_template || vm.is_default_template {
            skipped.push(skip(vm, SkipReason::Template));
            continue;
        }
        if vm.being_restored {
            skipped.push(skip(vm, SkipReason::BeingRestored));
            continue;
        }
        if !job.pools.contains(&vm.pool) {
            skipped.push(skip(vm, SkipReason::OtherPool));
            continue;
        }

        let mut why = Vec::new();
        let mut deciding_rule: Option<&SelectRule> = None;
        if job.all_vms {
            why.push("all-vms".to_string());
        }
        for inc in &includes {
            if inc.matcher.matches(vm) {
                why.push(if inc.origin.starts_with(&job_key) {
                    inc.label.clone()
                } else {
                    format!("{} ({})", inc.label, inc.origin)
                });
                if let Some(rule) = inc.rule {
                    deciding_rule = Some(rule);
                }
            }
        }
        let mut other_days: Vec<Weekday> = Vec::new();
        if let Some(schedule) = &job.weekday_schedule {
            for entry in &schedule.entries {
                if entry.vms.iter().any(|p| glob_match(p, &vm.name)) {
                    if entry.days.contains(&today) {
                        why.push(format!(
                            "weekday file: {today} ({weekday_file}:{})",
                            entry.line
                        ));
                    } else {
                        other_days.extend(entry.days.iter().copied());
                    }
                }
            }
        }
        if why.is_empty() {
            if other_days.is_empty() {
                skipped.push(skip(vm, SkipReason::NotSelected));
            } else {
                other_days.sort();
                other_days.dedup();
                skipped.push(skip(
                    vm,
                    SkipReason::NotToday {
                        days: other_days,
                        today,
                    },
                ));
            }
            continue;
        }
        if let Some(exc) = excludes.iter().find(|e| e.matcher.matches(vm)) {
            let by = if exc.origin.starts_with(&job_key) {
                exc.label.clone()
            } else {
                format!("{} ({})", exc.label, exc.origin)
            };
            skipped.push(skip(vm, SkipReason::Excluded { by }));
            continue;
        }
        if !job.power_states.is_empty()
            && !vm
                .power_state
                .is_some_and(|s| job.power_states.contains(&s))
        {
            skipped.push(skip(
                vm,
                SkipReason::PowerState {
                    state: vm.power_state,
                    wanted: job.power_states.clone(),
                },
            ));
            continue;
        }
        if let Some(uuids) = by_name.get(vm.name.as_str()).filter(|u| u.len() > 1) {
            let uuids: Vec<String> = uuids.iter().map(|u| u.to_string()).collect();
            duplicate_chosen.insert(vm.name.clone(), uuids.clone());
            skipped.push(skip(vm, SkipReason::DuplicateName { uuids }));
            continue;
        }

        // Settings: job, then the deciding rule, then the VM's override.
        let mut keep_last = job.retention.keep_last;
        let mut mode = job.mode;
        let mut disks = job.disks;
        if let Some(rule) = deciding_rule {
            keep_last = rule.keep_last.unwrap_or(job.retention.keep_last);
            mode = rule.mode.unwrap_or(job.mode);
            disks = rule.disks.unwrap_or(job.disks);
        }
        for key in [&vm.name, &vm.uuid] {
            if let Some(o) = job.vm_overrides.get(key) {
                keep_last = o.keep_last.unwrap_or(keep_last);
                mode = o.mode.unwrap_or(mode);
                disks = o.disks.unwrap_or(disks);
            }
        }
        if !mode.is_disks() {
            disks = DiskSelection::All;
        }
        chosen.push(Chosen {
            uuid: vm.uuid.clone(),
            name: vm.name.clone(),
            pool: vm.pool.clone(),
            why,
            retention: RetentionConfig {
                keep_last,
                ..job.retention.clone()
            },
            mode,
            disks,
            compression: job.compression,
        });
    }

    for (name, uuids) in &by_name {
        if uuids.len() < 2 {
            continue;
        }
        let selected = duplicate_chosen.contains_key(*name);
        problems.push(Problem {
            severity: if selected {
                Severity::Error
            } else {
                Severity::Warning
            },
            origin: job_key.clone(),
            message: if selected {
                format!(
                    "{} VMs are named {name:?} ({}): none of them is backed up; rename all but one",
                    uuids.len(),
                    uuids.join(", ")
                )
            } else {
                format!(
                    "{} VMs are named {name:?} ({}); rename all but one before selecting them",
                    uuids.len(),
                    uuids.join(", ")
                )
            },
        });
    }

    chosen.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
    skipped.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
    problems.sort_by_key(|p| p.severity);
    Selection {
        chosen,
        skipped,
        problems,
    }
}

fn no_match_problem(
    inc: &Compiled<'_>,
    candidates: &[VmCandidate],
    real_names: &[&str],
    job: &JobConfig,
    literal: bool,
) -> Problem {
    let mut message = format!("{} matches no VM", inc.label);
    if let Matcher::Name(n) = &inc.matcher {
        message = format!("no VM is named {n:?}");
        if let Some(other) = candidates.iter().find(|c| c.name == *n) {
            if !other.is_backupable() {
                message.push_str(
                    " (only a template, snapshot or dom0 has this name: never backed up)",
                );
            } else if !job.pools.contains(&other.pool) {
                message.push_str(&format!(
                    " in the job's pools (it is in pool {:?})",
                    other.pool
                ));
            }
        } else if let Some(s) = closest(n, real_names.iter().copied()) {
            message.push_str(&format!("; did you mean {s:?}?"));
        }
    }
    Problem {
        severity: if literal {
            Severity::Error
        } else {
            Severity::Warning
        },
        origin: inc.origin.clone(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, uuid: &str) -> VmCandidate {
        VmCandidate {
            uuid: uuid.into(),
            name: name.into(),
            tags: vec![],
            power_state: Some(PowerState::Running),
            is_control_domain: false,
            is_a_template: false,
            is_a_snapshot: false,
            is_default_template: false,
            being_restored: false,
            pool: "p".into(),
        }
    }

    #[test]
    fn candidate_from_a_xapi_record() {
        let mut rec = xenvault_xapi::records::Vm {
            uuid: "u1".into(),
            name_label: "web01".into(),
            tags: vec!["backup".into()],
            is_a_snapshot: true,
            ..Default::default()
        };
        rec.power_state = xenvault_xapi::records::PowerState::Halted;
        let c = VmCandidate::from_record("prod", &rec);
        assert_eq!(c.uuid, "u1");
        assert_eq!(c.name, "web01");
        assert_eq!(c.tags, vec!["backup"]);
        assert_eq!(c.power_state, Some(PowerState::Halted));
        assert!(c.is_a_snapshot && !c.is_control_domain);
        assert_eq!(c.pool, "prod");
        rec.power_state = xenvault_xapi::records::PowerState::Unknown("Migrating".into());
        assert_eq!(VmCandidate::from_record("prod", &rec).power_state, None);
    }

    #[test]
    fn never_dom0_templates_snapshots() {
        let mut job = JobConfig::new("j", vec!["p".into()], "t");
        job.all_vms = true;
        let mut dom0 = vm("Control domain on host: h", "d");
        dom0.is_control_domain = true;
        let mut tpl = vm("Debian 12", "t");
        tpl.is_a_template = true;
        tpl.is_default_template = true;
        let mut snap = vm("web01", "s");
        snap.is_a_snapshot = true;
        snap.is_a_template = true;
        let cands = vec![dom0, tpl, snap, vm("web01", "w")];
        let sel = select(&job, &cands, Weekday::Monday);
        assert_eq!(sel.chosen.len(), 1);
        assert_eq!(sel.chosen[0].uuid, "w");
        assert_eq!(sel.skipped.len(), 3);
        assert!(
            sel.skipped
                .iter()
                .all(|s| s.reason.is_never_a_backup_candidate())
        );
        assert!(sel.problems.is_empty(), "{:?}", sel.problems);
    }

    #[test]
    fn a_vm_being_restored_is_skipped_until_whole() {
        let mut job = JobConfig::new("j", vec!["p".into()], "t");
        job.all_vms = true;
        let mut building = vm("web01 (restored 20261122T010000Z)", "r");
        building.being_restored = true;
        let sel = select(&job, &[building, vm("web01", "w")], Weekday::Monday);
        assert_eq!(sel.chosen.len(), 1);
        assert_eq!(sel.chosen[0].uuid, "w");
        assert_eq!(sel.skipped.len(), 1);
        assert_eq!(sel.skipped[0].reason, SkipReason::BeingRestored);
        assert!(
            sel.skipped[0]
                .reason
                .to_string()
                .contains("xenvault:restoring")
        );
        assert!(sel.problems.is_empty(), "{:?}", sel.problems);

        let mut rec = xenvault_xapi::records::Vm::default();
        assert!(!VmCandidate::from_record("p", &rec).being_restored);
        rec.other_config
            .insert("xenvault:restoring".into(), "h/i/r".into());
        assert!(VmCandidate::from_record("p", &rec).being_restored);
    }

    #[test]
    fn duplicates_are_skipped_and_reported() {
        let mut job = JobConfig::new("j", vec!["p".into()], "t");
        job.regexes = vec!["web".into()];
        let cands = vec![vm("web01", "a"), vm("web01", "b"), vm("web02", "c")];
        let sel = select(&job, &cands, Weekday::Monday);
        assert_eq!(sel.chosen.len(), 1);
        assert_eq!(sel.chosen[0].name, "web02");
        assert!(sel.has_errors());
        assert!(
            sel.problems[0]
                .message
                .contains("2 VMs are named \"web01\"")
        );
        assert!(matches!(
            sel.skipped[0].reason,
            SkipReason::DuplicateName { .. }
        ));
    }

    #[test]
    fn typo_suggestion() {
        let mut job = JobConfig::new("j", vec!["p".into()], "t");
        job.names = vec!["web1".into()];
        let sel = select(&job, &[vm("web01", "a")], Weekday::Monday);
        assert!(sel.chosen.is_empty());
        assert_eq!(sel.problems.len(), 1);
        assert_eq!(sel.problems[0].severity, Severity::Error);
        assert!(
            sel.problems[0].message.contains("did you mean \"web01\"?"),
            "{}",
            sel.problems[0]
        );
        assert_eq!(sel.skipped[0].reason, SkipReason::NotSelected);
    }
}
