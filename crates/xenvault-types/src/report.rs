//! Run reports as data: what one backup run did, per VM, for pool metadata and
//! hosts, and in total.
//!
//! The engine fills a [`RunReport`] as the run goes (from the same journal
//! that drives the work) and renders it as a text log, JSON and email
//! (`xenvault_engine::report`). This module only holds the data and the pure
//! arithmetic on it: durations, rates, the summary and the overall outcome.
//! Times serialize as RFC 3339 strings ([`rfc3339`]).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Serde helpers writing `OffsetDateTime` as RFC 3339 text
/// (`2026-11-22T03:37:00Z`), for `#[serde(with = "rfc3339")]`.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    /// Formats `t` as RFC 3339 (UTC offsets kept as given).
    pub fn format(t: &OffsetDateTime) -> String {
        t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
    }

    /// Parses RFC 3339 text.
    pub fn parse(s: &str) -> Result<OffsetDateTime, time::error::Parse> {
        OffsetDateTime::parse(s, &Rfc3339)
    }

    /// Serializes as RFC 3339 text.
    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    /// Deserializes RFC 3339 text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
    }

    /// The same for `Option<OffsetDateTime>` (`null` when absent).
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use time::OffsetDateTime;

        /// Serializes as RFC 3339 text or `null`.
        pub fn serialize<S: Serializer>(
            t: &Option<OffsetDateTime>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_str(&super::format(t)),
                None => s.serialize_none(),
            }
        }

        /// Deserializes RFC 3339 text or `null`.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<OffsetDateTime>, D::Error> {
            let text = Option::<String>::deserialize(d)?;
            text.map(|text| {
                super::parse(&text).map_err(|e| {
                    serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}"))
                })
            })
            .transpose()
        }
    }
}

/// What became of one item (a VM, the pool metadata, a host backup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Backed up and committed (a complete restore point exists).
    Succeeded,
    /// Tried and failed; nothing of this run counts as a restore point.
    Failed {
        /// Why, naming the step ("export: VDI_IO_ERROR …").
        reason: String,
    },
    /// Expected tonight but not tried (SR over its threshold, target full…).
    Skipped {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// A failure with this reason.
    pub fn failed(reason: impl Into<String>) -> Outcome {
        Outcome::Failed {
            reason: reason.into(),
        }
    }

    /// A skip with this reason.
    pub fn skipped(reason: impl Into<String>) -> Outcome {
        Outcome::Skipped {
            reason: reason.into(),
        }
    }

    /// "succeeded", "failed" or "skipped".
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed { .. } => "failed",
            Outcome::Skipped { .. } => "skipped",
        }
    }

    /// The reason of a failure or skip.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Succeeded => None,
            Outcome::Failed { reason } | Outcome::Skipped { reason } => Some(reason),
        }
    }
}

/// What became of the temporary objects (snapshot, its VDIs) of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CleanupOutcome {
    /// Nothing was created on the pool (e.g. the VM was skipped).
    #[default]
    NothingToClean,
    /// Everything created was destroyed.
    Cleaned {
        /// Snapshots destroyed.
        snapshots: u32,
        /// VDIs destroyed.
        vdis: u32,
    },
    /// Something could not be destroyed now; the next run's sweep retries.
    Failed {
        /// What is left and why.
        reason: String,
    },
}

impl CleanupOutcome {
    /// One line for logs ("2 snapshot(s), 3 VDI(s) destroyed").
    pub fn describe(&self) -> String {
        match self {
            CleanupOutcome::NothingToClean => "nothing to clean".to_string(),
            CleanupOutcome::Cleaned { snapshots, vdis } => {
                format!("{snapshots} snapshot(s), {vdis} VDI(s) destroyed")
            }
            CleanupOutcome::Failed { reason } => format!("FAILED: {reason}"),
        }
    }
}

/// One VM of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    /// The VM's name label at backup time.
    pub name: String,
    /// The VM's UUID (how xenvault tracks it).
    pub uuid: String,
    /// When its backup started (`None` if skipped before starting).
    #[serde(with = "rfc3339::option", default)]
    pub started: Option<OffsetDateTime>,
    /// When its backup ended.
    #[serde(with = "rfc3339::option", default)]
    pub finished: Option<OffsetDateTime>,
    /// Bytes written to the target.
    #[serde(default)]
    pub bytes: u64,
    /// Succeeded, failed or skipped, with the reason.
    pub outcome: Outcome,
    /// What became of the temporary snapshot and VDIs.
    #[serde(default)]
    pub cleanup: CleanupOutcome,
    /// Where the backup is (the restore point's directory), if committed.
    #[serde(default)]
    pub location: Option<String>,
    /// Old restore points removed by retention for this VM.
    #[serde(default)]
    pub pruned: Vec<String>,
    /// Warnings that did not fail the VM.
    #[serde(default)]
    pub notes: Vec<String>,
    /// Repository targets: what was read and stored (absent for archives
    /// and in reports written before repositories existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepoVmStats>,
}

/// What a VM's backup into a repository read from the pool and stored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RepoVmStats {
    /// The restore point written (`<vm uuid>/<id>`), empty if none.
    #[serde(default)]
    pub restore_point: String,
    /// Bytes read from the pool (NBD reads or VHD export bytes).
    #[serde(default)]
    pub bytes_read: u64,
    /// Bytes of new chunks stored (compressed, encrypted).
    #[serde(default)]
    pub bytes_stored: u64,
    /// Chunks stored by this backup.
    #[serde(default)]
    pub new_chunks: u64,
    /// Chunks already in the repository (deduplicated).
    #[serde(default)]
    pub dedup_chunks: u64,
    /// Per disk: how it was read and what it stored.
    #[serde(default)]
    pub disks: Vec<DiskReadReport>,
}

/// How one disk was read into the repository.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskReadReport {
    /// The repository disk key (the live VDI's uuid).
    #[serde(default)]
    pub key: String,
    /// The VBD's device (`0`, `1`, …).
    #[serde(default)]
    pub userdevice: String,
    /// The VDI's name.
    #[serde(default)]
    pub name: String,
    /// Virtual size in bytes.
    #[serde(default)]
    pub size: u64,
    /// `nbd-full`, `nbd-cbt`, `vhd-diff`, `vhd-full`.
    #[serde(default)]
    pub method: String,
    /// Why not the best method (a fallback's cause), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Incremental on the parent restore point's disk.
    #[serde(default)]
    pub incremental: bool,
    /// Bytes read from the pool for this disk.
    #[serde(default)]
    pub bytes_read: u64,
    /// Bytes of new chunks stored.
    #[serde(default)]
    pub bytes_stored: u64,
    /// New chunks.
    #[serde(default)]
    pub new_chunks: u64,
    /// Deduplicated chunks.
    #[serde(default)]
    pub dedup_chunks: u64,
    /// All-zero chunks (not stored).
    #[serde(default)]
    pub zero_chunks: u64,
}

impl VmReport {
    /// A VM that was expected but skipped before anything started.
    pub fn skipped(
        name: impl Into<String>,
        uuid: impl Into<String>,
        reason: impl Into<String>,
    ) -> VmReport {
        VmReport {
            name: name.into(),
            uuid: uuid.into(),
            started: None,
            finished: None,
            bytes: 0,
            outcome: Outcome::skipped(reason),
            cleanup: CleanupOutcome::NothingToClean,
            location: None,
            pruned: Vec::new(),
            notes: Vec::new(),
            repository: None,
        }
    }

    /// The time the backup took.
    pub fn duration(&self) -> Option<time::Duration> {
        duration(self.started, self.finished)
    }

    /// Bytes per second over the whole VM (`None` without a duration).
    pub fn rate(&self) -> Option<f64> {
        rate(self.bytes, self.duration())
    }
}

/// What kind of non-VM item an [`ItemReport`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// The pool database (`/pool/xmldbdump`).
    PoolMetadata,
    /// A host's dom0 backup (`/host_backup`).
    HostBackup,
}

/// The pool metadata backup or one host backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemReport {
    /// Pool metadata or host backup.
    pub kind: ItemKind,
    /// The pool's or host's name.
    pub name: String,
    /// The pool's or host's UUID, if known.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Start.
    #[serde(with = "rfc3339::option", default)]
    pub started: Option<OffsetDateTime>,
    /// End.
    #[serde(with = "rfc3339::option", default)]
    pub finished: Option<OffsetDateTime>,
    /// Bytes written to the target.
    #[serde(default)]
    pub bytes: u64,
    /// Succeeded, failed or skipped.
    pub outcome: Outcome,
    /// Where it was stored.
    #[serde(default)]
    pub location: Option<String>,
    /// Old copies removed by retention.
    #[serde(default)]
    pub pruned: Vec<String>,
}

impl ItemReport {
    /// The time it took.
    pub fn duration(&self) -> Option<time::Duration> {
        duration(self.started, self.finished)
    }

    /// Bytes per second.
    pub fn rate(&self) -> Option<f64> {
        rate(self.bytes, self.duration())
    }
}

/// One backup run of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    /// The job's name.
    pub job: String,
    /// The pool's name.
    pub pool: String,
    /// The host the run talked to (the pool coordinator's address).
    pub host: String,
    /// The run's id.
    pub run_id: String,
    /// The target (archive directory).
    pub target: String,
    /// Start of the run.
    #[serde(with = "rfc3339")]
    pub started: OffsetDateTime,
    /// End of the run.
    #[serde(with = "rfc3339")]
    pub finished: OffsetDateTime,
    /// Every VM expected tonight, in the order they were chosen.
    pub vms: Vec<VmReport>,
    /// The pool metadata backup (empty if not configured).
    #[serde(default)]
    pub pool_metadata: Vec<ItemReport>,
    /// Host backups (empty if not configured).
    #[serde(default)]
    pub hosts: Vec<ItemReport>,
    /// Problems of the run as a whole (target not writable, leftovers that
    /// could not be removed, retention errors).
    #[serde(default)]
    pub problems: Vec<String>,
    /// Why the run was stopped before its end ("interrupted by SIGINT"),
    /// when it was: the VMs it did not finish are failed with that reason,
    /// and it is a run-level problem too (absent in complete runs and in
    /// reports written before interruptions were handled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
}

/// A VM (or item) and the reason it failed or was skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reasoned {
    /// Its name.
    pub name: String,
    /// Its UUID (empty for items without one).
    pub uuid: String,
    /// The reason.
    pub reason: String,
}

/// Counts of a run, with the reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// VMs expected tonight.
    pub expected: usize,
    /// VMs backed up.
    pub succeeded: usize,
    /// VMs that failed.
    pub failed: usize,
    /// VMs skipped.
    pub skipped: usize,
    /// Each failed VM with its reason.
    pub failures: Vec<Reasoned>,
    /// Each skipped VM with its reason.
    pub skips: Vec<Reasoned>,
    /// Pool metadata and host backups that failed, with reasons.
    pub other_failures: Vec<Reasoned>,
    /// Run-level problems.
    pub problems: Vec<String>,
}

/// Totals of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Bytes written (VMs, pool metadata, hosts).
    pub bytes: u64,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// Bytes per second over the run's wall-clock time.
    pub rate: Option<f64>,
}

/// The run's overall result (the CLI maps it to an exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// Everything expected was backed up, no problem.
    Succeeded,
    /// Some things were backed up, others failed or were skipped.
    Partial,
    /// Nothing expected was backed up (or the run could not start).
    Failed,
}

impl RunOutcome {
    /// "succeeded", "partial" or "failed".
    pub fn label(self) -> &'static str {
        match self {
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Partial => "partial",
            RunOutcome::Failed => "failed",
        }
    }
}

impl RunReport {
    /// An empty report for a run starting now.
    pub fn new(
        job: impl Into<String>,
        pool: impl Into<String>,
        host: impl Into<String>,
        run_id: impl Into<String>,
        target: impl Into<String>,
        started: OffsetDateTime,
    ) -> RunReport {
        RunReport {
            job: job.into(),
            pool: pool.into(),
            host: host.into(),
            run_id: run_id.into(),
            target: target.into(),
            started,
            finished: started,
            vms: Vec::new(),
            pool_metadata: Vec::new(),
            hosts: Vec::new(),
            problems: Vec::new(),
            interrupted: None,
        }
    }

    /// Counts and reasons.
    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            expected: self.vms.len(),
            succeeded: 0,
            failed: 0,
            skipped: 0,
            failures: Vec::new(),
            skips: Vec::new(),
            other_failures: Vec::new(),
            problems: self.problems.clone(),
        };
        for vm in &self.vms {
            let reasoned = |reason: &str| Reasoned {
                name: vm.name.clone(),
                uuid: vm.uuid.clone(),
                reason: reason.to_string(),
            };
            match &vm.outcome {
                Outcome::Succeeded => s.succeeded += 1,
                Outcome::Failed { reason } => {
                    s.failed += 1;
                    s.failures.push(reasoned(reason));
                }
                Outcome::Skipped { reason } => {
                    s.skipped += 1;
                    s.skips.push(reasoned(reason));
                }
            }
        }
        for item in self.pool_metadata.iter().chain(&self.hosts) {
            if let Outcome::Failed { reason } | Outcome::Skipped { reason } = &item.outcome {
                s.other_failures.push(Reasoned {
                    name: match item.kind {
                        ItemKind::PoolMetadata => format!("pool metadata {}", item.name),
                        ItemKind::HostBackup => format!("host {}", item.name),
                    },
                    uuid: item.uuid.clone().unwrap_or_default(),
                    reason: reason.clone(),
                });
            }
        }
        s
    }

    /// Bytes, time and rate of the whole run.
    pub fn totals(&self) -> Totals {
        let bytes = self.vms.iter().map(|v| v.bytes).sum::<u64>()
            + self
                .pool_metadata
                .iter()
                .chain(&self.hosts)
                .map(|i| i.bytes)
                .sum::<u64>();
        let elapsed = self.finished - self.started;
        let seconds = elapsed.as_seconds_f64().max(0.0);
        Totals {
            bytes,
            seconds,
            rate: rate(bytes, Some(elapsed)),
        }
    }

    /// The overall result: `Succeeded` when every expected VM and item
    /// succeeded and there was no run-level problem; `Failed` when nothing
    /// expected succeeded (and something was expected or a problem stopped
    /// the run); `Partial` otherwise.
    pub fn overall(&self) -> RunOutcome {
        let s = self.summary();
        let items_ok = self
            .pool_metadata
            .iter()
            .chain(&self.hosts)
            .filter(|i| i.outcome == Outcome::Succeeded)
            .count();
        let items_total = self.pool_metadata.len() + self.hosts.len();
        let anything_ok = s.succeeded + items_ok > 0;
        let all_ok = s.succeeded == s.expected && items_ok == items_total && s.problems.is_empty();
        if all_ok {
            RunOutcome::Succeeded
        } else if anything_ok {
            RunOutcome::Partial
        } else {
            RunOutcome::Failed
        }
    }

    /// A short line for a subject or a status: "5/6 succeeded, 1 failed",
    /// with skips, other failures and problems when there are any, after
    /// "interrupted by SIGINT: " when the run was interrupted.
    pub fn headline(&self) -> String {
        let s = self.summary();
        let mut line = match &self.interrupted {
            Some(why) => format!("{why}: "),
            None => String::new(),
        };
        line.push_str(&format!("{}/{} succeeded", s.succeeded, s.expected));
        if s.failed > 0 {
            line.push_str(&format!(", {} failed", s.failed));
        }
        if s.skipped > 0 {
            line.push_str(&format!(", {} skipped", s.skipped));
        }
        if !s.other_failures.is_empty() {
            line.push_str(&format!(
                ", {} pool/host backup(s) failed",
                s.other_failures.len()
            ));
        }
        if !s.problems.is_empty() {
            line.push_str(&format!(", {} problem(s)", s.problems.len()));
        }
        line
    }
}

fn duration(
    started: Option<OffsetDateTime>,
    finished: Option<OffsetDateTime>,
) -> Option<time::Duration> {
    match (started, finished) {
        (Some(a), Some(b)) if b >= a => Some(b - a),
        _ => None,
    }
}

fn rate(bytes: u64, duration: Option<time::Duration>) -> Option<f64> {
    let secs = duration?.as_seconds_f64();
    (secs > 0.0).then(|| bytes as f64 / secs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn vm(name: &str, outcome: Outcome) -> VmReport {
        VmReport {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            started: Some(datetime!(2026-11-22 01:00:00 UTC)),
            finished: Some(datetime!(2026-11-22 01:00:10 UTC)),
            bytes: 1000,
            outcome,
            cleanup: CleanupOutcome::Cleaned {
                snapshots: 1,
                vdis: 1,
            },
            location: None,
            pruned: vec![],
            notes: vec![],
            repository: None,
        }
    }

    #[test]
    fn reports_without_repository_fields_still_parse() {
        let old = r#"{"name":"web","uuid":"u","started":null,"finished":null,"bytes":5,
            "outcome":{"status":"succeeded"},"cleanup":{"status":"nothing_to_clean"},
            "location":"/b/web/1","pruned":[],"notes":[]}"#;
        let vm: VmReport = serde_json::from_str(old).unwrap();
        assert_eq!(vm.repository, None);
        let json = serde_json::to_string(&vm).unwrap();
        assert!(!json.contains("repository"), "{json}");
        let mut with = vm.clone();
        with.repository = Some(RepoVmStats {
            new_chunks: 3,
            disks: vec![DiskReadReport {
                method: "vhd-full".into(),
                reason: Some("NBD unreachable".into()),
                ..DiskReadReport::default()
            }],
            ..RepoVmStats::default()
        });
        let back: VmReport = serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back, with);
        let partial: RepoVmStats = serde_json::from_str(r#"{"new_chunks":1}"#).unwrap();
        assert_eq!(partial.new_chunks, 1);
    }

    fn report(vms: Vec<VmReport>) -> RunReport {
        let mut r = RunReport::new(
            "nightly",
            "pool1",
            "10.0.0.1",
            "run-1",
            "/backup",
            datetime!(2026-11-22 01:00:00 UTC),
        );
        r.finished = datetime!(2026-11-22 01:00:20 UTC);
        r.vms = vms;
        r
    }

    #[test]
    fn summary_counts_and_reasons() {
        let r = report(vec![
            vm("a", Outcome::Succeeded),
            vm("b", Outcome::failed("export: VDI_IO_ERROR")),
            vm("c", Outcome::skipped("SR sr1 at 91% (threshold 80%)")),
        ]);
        let s = r.summary();
        assert_eq!((s.expected, s.succeeded, s.failed, s.skipped), (3, 1, 1, 1));
        assert_eq!(s.failures[0].reason, "export: VDI_IO_ERROR");
        assert_eq!(s.skips[0].name, "c");
        assert_eq!(r.overall(), RunOutcome::Partial);
        assert_eq!(r.headline(), "1/3 succeeded, 1 failed, 1 skipped");
        assert_eq!(r.vms[0].rate(), Some(100.0));
        assert_eq!(r.totals().bytes, 3000);
        assert_eq!(r.totals().rate, Some(150.0));
    }

    #[test]
    fn overall_outcomes() {
        assert_eq!(
            report(vec![vm("a", Outcome::Succeeded)]).overall(),
            RunOutcome::Succeeded
        );
        assert_eq!(
            report(vec![vm("a", Outcome::failed("x"))]).overall(),
            RunOutcome::Failed
        );
        let mut r = report(vec![vm("a", Outcome::Succeeded)]);
        r.problems.push("retention: cannot remove x".into());
        assert_eq!(r.overall(), RunOutcome::Partial);
        assert_eq!(report(vec![]).overall(), RunOutcome::Succeeded);
        let mut r = report(vec![]);
        r.problems.push("target not writable".into());
        assert_eq!(r.overall(), RunOutcome::Failed);
    }

    #[test]
    fn json_round_trip() {
        let mut r = report(vec![
            vm("a", Outcome::Succeeded),
            VmReport::skipped("b", "u", "why"),
        ]);
        r.hosts.push(ItemReport {
            kind: ItemKind::HostBackup,
            name: "host1".into(),
            uuid: Some("h".into()),
            started: None,
            finished: None,
            bytes: 0,
            outcome: Outcome::failed("boom"),
            location: None,
            pruned: vec![],
        });
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            text.contains("\"started\":\"2026-11-22T01:00:00Z\""),
            "{text}"
        );
        assert!(
            text.contains("\"status\":\"skipped\",\"reason\":\"why\""),
            "{text}"
        );
        let back: RunReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.summary().other_failures[0].name, "host host1");
        assert!(!text.contains("interrupted"), "{text}");
    }

    #[test]
    fn interrupted_runs_say_so() {
        let mut r = report(vec![vm("a", Outcome::failed("interrupted by SIGINT"))]);
        r.interrupted = Some("interrupted by SIGINT".into());
        r.problems.push("the run was interrupted by SIGINT".into());
        assert_eq!(
            r.headline(),
            "interrupted by SIGINT: 0/1 succeeded, 1 failed, 1 problem(s)"
        );
        assert_eq!(r.overall(), RunOutcome::Failed);
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            text.contains("\"interrupted\":\"interrupted by SIGINT\""),
            "{text}"
        );
        let back: RunReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }
}
