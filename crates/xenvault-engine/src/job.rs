//! One run of a backup job, start to end: connect to the pools (pinned
//! TLS), sweep leftovers, plan, back up the VMs in parallel (a failure of
//! one never stops the others), pool metadata and host backups, retention,
//! the closing sweep, and the [`RunReport`].
//!
//! Also [`plan_job`]: the same plan without touching the pool.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::Semaphore;
use xenvault_types::config::{Config, JobConfig, PoolConfig, SmtpSecurity, TargetKind, Weekday};
use xenvault_types::report::{CleanupOutcome, ItemKind, ItemReport, Outcome, RunReport, VmReport};
use xenvault_xapi::ErrorCode;
use xenvault_xapi::http::{HttpTransfer, TransferOptions};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::task::WaitOptions;
use xenvault_xapi::tls::{Fingerprint, TlsPolicy};

use crate::archive::{self, ArchiveTarget, RetentionRules, SubjectKey};
use crate::backup::extra::{self, ArtifactResult};
use crate::backup::repo::{self as repo_backup, RepoPipeline, RepoSettings};
use crate::backup::{self, NoProgress, Pipeline, Progress, VmResult, VmTask};
use crate::journal::{self, Journal, RunContext};
use crate::plan::{self, BackupPlan, PoolView};
use crate::preflight;
use crate::report::email::{EmailSettings, SmtpSecurity as ReportSmtpSecurity};
use crate::sink::BackupTarget;

/// How a run ends, for the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Everything expected was done (0).
    Success = 0,
    /// Nothing expected succeeded, or the run could not start (1).
    Failure = 1,
    /// Bad usage or configuration (2).
    Usage = 2,
    /// Some succeeded, some failed or were skipped (3).
    Partial = 3,
}

/// A run that could not happen at all.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The configuration is wrong for this run (exit code 2).
    #[error("{0}")]
    Config(String),
    /// A pool refused the login or its certificate (exit code 2).
    #[error("{0}")]
    Credentials(String),
    /// Anything else that stops the run before it starts (exit code 1).
    #[error("{0}")]
    Failed(String),
}

impl JobError {
    /// The exit status it means.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            JobError::Config(_) | JobError::Credentials(_) => ExitStatus::Usage,
            JobError::Failed(_) => ExitStatus::Failure,
        }
    }
}

/// Knobs of a run.
#[derive(Clone)]
pub struct RunOptions {
    /// The day to select for (weekday files).
    pub today: Weekday,
    /// Progress observer.
    pub progress: Arc<dyn Progress>,
    /// Stops the run early when cancelled (the CLI cancels it on SIGINT or
    /// SIGTERM): see [`Cancel`].
    pub cancel: Cancel,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            today: today(),
            progress: Arc::new(NoProgress),
            cancel: Cancel::new(),
        }
    }
}

/// A request to stop a run before its end (e.g. a signal), shared between
/// whoever asks (the CLI's signal handler) and [`run_job`].
///
/// When cancelled, the run starts no more VMs and stops the running ones
/// at their next await point (only once the snapshot they may be creating
/// is journaled); what they created is destroyed by the run's closing sweep
/// as usual, their partial archive or restore point is abandoned (never
/// committed), and they are reported failed with the reason given here.
/// Pool metadata, host backups and retention are skipped; the closing
/// sweep, the run log, the JSON report and the email still happen.
#[derive(Debug, Clone)]
pub struct Cancel {
    reason: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl Default for Cancel {
    fn default() -> Self {
        Cancel::new()
    }
}

impl Cancel {
    /// A request that was not made yet.
    pub fn new() -> Cancel {
        Cancel {
            reason: Arc::new(tokio::sync::watch::Sender::new(None)),
        }
    }

    /// Asks the run to stop, saying why ("interrupted by SIGINT"). Only the
    /// first reason counts.
    pub fn cancel(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.reason.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Why the run was asked to stop, if it was.
    pub fn reason(&self) -> Option<String> {
        self.reason.borrow().clone()
    }

    /// Whether the run was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.reason.borrow().is_some()
    }

    /// Completes once the run is asked to stop (at once if it was).
    pub async fn cancelled(&self) {
        let mut rx = self.reason.subscribe();
        // The sender lives in `self`: `wait_for` cannot see it closed.
        let _ = rx.wait_for(Option::is_some).await;
    }
}

/// The machine's UTC offset, read once by [`init_local_offset`].
static LOCAL_OFFSET: std::sync::OnceLock<time::UtcOffset> = std::sync::OnceLock::new();

/// Reads the machine's UTC offset (from `TZ` or `/etc/localtime`). Call it
/// at the start of `main`, before any thread starts: the `time` crate refuses
/// to read the offset in a multi-threaded process. Without it (or when the
/// offset cannot be read, which is logged) weekdays are taken in UTC.
pub fn init_local_offset() {
    let offset = match time::UtcOffset::current_local_offset() {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("cannot read the local time zone ({e}); weekdays are taken in UTC");
            time::UtcOffset::UTC
        }
    };
    let _ = LOCAL_OFFSET.set(offset);
}

/// Today's weekday in the machine's time zone (what a weekday file means by
/// "Monday"), or in UTC when [`init_local_offset`] was not called.
pub fn today() -> Weekday {
    let offset = LOCAL_OFFSET.get().copied().unwrap_or(time::UtcOffset::UTC);
    weekday_at(OffsetDateTime::now_utc(), offset)
}

/// The weekday of the instant `now` on clocks at `offset` from UTC.
fn weekday_at(now: OffsetDateTime, offset: time::UtcOffset) -> Weekday {
    Weekday::from(now.to_offset(offset).weekday())
}

/// A fresh run id: `YYYYMMDDTHHMMSSZ-xxxxxxxx`.
pub fn new_run_id() -> String {
    let now = OffsetDateTime::now_utc();
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        &rand[..8]
    )
}

/// The state directory of a configuration (journal, run locks).
pub fn state_dir(config: &Config) -> PathBuf {
    config
        .state_dir
        .clone()
        .unwrap_or_else(journal::default_state_dir)
}

/// Opens the journal in the configuration's state directory.
pub fn open_journal(config: &Config) -> Result<Journal, JobError> {
    Journal::open(&state_dir(config)).map_err(|e| JobError::Failed(e.to_string()))
}

/// The job, its target and its pools, or a configuration error.
pub fn resolve<'c>(
    config: &'c Config,
    job: &str,
) -> Result<(&'c JobConfig, Vec<&'c PoolConfig>), JobError> {
    let job_cfg = config.job(job).ok_or_else(|| {
        let known: Vec<&str> = config.jobs.keys().map(String::as_str).collect();
        JobError::Config(format!(
            "no job {job:?} in the configuration (jobs: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })?;
    if config.target(&job_cfg.target).is_none() {
        return Err(JobError::Config(format!(
            "job {job}: target {:?} is not defined",
            job_cfg.target
        )));
    }
    let mut pools = Vec::new();
    for name in &job_cfg.pools {
        pools.push(
            config.pool(name).ok_or_else(|| {
                JobError::Config(format!("job {job}: pool {name:?} is not defined"))
            })?,
        );
    }
    Ok((job_cfg, pools))
}

/// Logs in to a pool with its configured TLS policy and password.
pub async fn connect_pool(pool: &PoolConfig) -> Result<Session, JobError> {
    let policy = crate::config::tls_policy(pool).map_err(JobError::Config)?;
    if pool.insecure_skip_verify {
        tracing::warn!(
            "pool {}: TLS verification is OFF (insecure-skip-verify): anyone on the path can read the password and the backups",
            pool.name
        );
    }
    let password = pool.password.as_ref().ok_or_else(|| {
        JobError::Config(format!(
            "pool {}: no password (set password-file or password-env)",
            pool.name
        ))
    })?;
    Client::connect(
        &pool.url,
        Credentials::new(pool.user.clone(), password.expose().to_string()),
        policy,
    )
    .await
    .map_err(|e| classify_connect_error(&pool.name, &pool.url, &e))
}

fn classify_connect_error(pool: &str, url: &str, e: &xenvault_xapi::Error) -> JobError {
    let text = crate::config::one_line(&e.to_string());
    if e.is_code(&ErrorCode::SessionAuthenticationFailed) {
        return JobError::Credentials(format!(
            "pool {pool}: the login was refused (wrong user or password; check password-file / password-env): {text}"
        ));
    }
    if text.contains("certificate") || text.contains("pinned") || text.contains("fingerprint") {
        return JobError::Credentials(format!(
            "pool {pool}: the TLS certificate of {url} is not the trusted one (run `xenvault trust {url}` and set fingerprint): {text}"
        ));
    }
    JobError::Failed(format!("pool {pool}: cannot connect to {url}: {text}"))
}

/// The HTTP transfer client of a pool. With a pinned coordinator
/// certificate, every host's certificate (`host.get_server_certificate`,
/// read over the pinned session) is pinned too, so transfers redirected to a
/// member (302 for a member's local SR) are accepted; otherwise, or if the
/// certificates cannot be read, the session's own client.
pub async fn transfer_for(
    session: &Session,
    pool: Option<&PoolConfig>,
    options: &TransferOptions,
) -> HttpTransfer {
    let mut options = options.clone();
    if options.redirect_hosts.is_none() {
        options.redirect_hosts = Some(pool_host_addresses(session).await);
    }
    let options = &options;
    let fallback = || HttpTransfer::with_client(session.http_client(), options.clone());
    let Some(pool) = pool else {
        return fallback();
    };
    let Ok(TlsPolicy::Pinned(coordinator)) = crate::config::tls_policy(pool) else {
        return fallback();
    };
    let hosts = match session.host().get_all().await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(
                "pool {}: cannot list hosts to pin their certificates: {e}",
                pool.name
            );
            return fallback();
        }
    };
    let mut pins = vec![coordinator];
    for h in hosts {
        let pem = session
            .call::<String>(
                "host.get_server_certificate",
                vec![xenvault_types::Value::str(h.as_str())],
            )
            .await;
        match pem.map(|p| Fingerprint::of_pem(&p)) {
            Ok(Ok(fp)) => {
                if !pins.contains(&fp) {
                    pins.push(fp);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("pool {}: a host certificate is unreadable: {e}", pool.name)
            }
            Err(e) => tracing::warn!("pool {}: host.get_server_certificate: {e}", pool.name),
        }
    }
    match HttpTransfer::new(&TlsPolicy::PinnedAny(pins), options.clone()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("pool {}: {e}", pool.name);
            fallback()
        }
    }
}

/// The management addresses of the pool's hosts: the only hosts an HTTP
/// redirect may lead to (it carries the session id). Empty when they cannot
/// be listed (then only the coordinator's own host is followed).
pub async fn pool_host_addresses(session: &Session) -> Vec<String> {
    match session.host().get_all_records().await {
        Ok(hosts) => hosts.into_values().map(|h| h.address).collect(),
        Err(e) => {
            tracing::warn!(
                "cannot list the pool's hosts ({e}); HTTP redirects to other hosts will be refused"
            );
            Vec::new()
        }
    }
}

/// Connects to every pool of a job.
async fn connect_all(pools: &[&PoolConfig]) -> Result<Vec<PoolView>, JobError> {
    let mut out = Vec::new();
    for p in pools {
        out.push(PoolView {
            name: p.name.clone(),
            session: connect_pool(p).await?,
        });
    }
    Ok(out)
}

/// `xenvault plan JOB`: the plan, creating nothing on the pool.
pub async fn plan_job(config: &Config, job: &str, today: Weekday) -> Result<BackupPlan, JobError> {
    let (job_cfg, pools) = resolve(config, job)?;
    let journal = open_journal(config)?;
    let views = connect_all(&pools).await?;
    let plan = plan::build(config, job_cfg, &views, &journal, today, None)
        .await
        .map_err(|e| JobError::Failed(e.to_string()));
    for v in &views {
        let _ = v.session.logout().await;
    }
    plan
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct JobRun {
    /// The plan it followed.
    pub plan: BackupPlan,
    /// The report.
    pub report: RunReport,
    /// The exit status it means.
    pub exit: ExitStatus,
    /// The run log on the target, when written.
    pub log_path: Option<PathBuf>,
    /// The JSON report on the target, when written.
    pub json_path: Option<PathBuf>,
}

/// The exit status of a finished report.
pub fn exit_status_of(report: &RunReport) -> ExitStatus {
    match report.overall() {
        xenvault_types::report::RunOutcome::Succeeded => ExitStatus::Success,
        xenvault_types::report::RunOutcome::Partial => ExitStatus::Partial,
        xenvault_types::report::RunOutcome::Failed => ExitStatus::Failure,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// Where the run logs and JSON reports of a job go: the archive directory,
/// or for a repository target `<state-dir>/reports/<target>` (a repository
/// holds only repository objects, and may be remote).
pub fn report_root(config: &Config, job: &JobConfig) -> PathBuf {
    match config.target(&job.target) {
        Some(t) if t.kind == TargetKind::Repository => {
            state_dir(config).join("reports").join(&t.name)
        }
        Some(t) => t.path.clone(),
        None => PathBuf::new(),
    }
}

/// Opens the repository of a repository target, or says why not: a missing
/// repository, a missing or wrong password are configuration errors (exit
/// code 2), an unreachable storage a failure (1).
pub async fn open_target_repository(
    target: &xenvault_types::config::TargetConfig,
) -> Result<xenvault_repo::Repository, JobError> {
    crate::repository::open_repository(target)
        .await
        .map_err(|e| {
            let text = format!(
                "target {} ({}): cannot open the repository: {e}",
                target.name,
                preflight::target_location(target)
            );
            if preflight::repo_error_is_config(&e) {
                JobError::Config(text)
            } else {
                JobError::Failed(text)
            }
        })
}

/// `xenvault backup JOB`: the whole run.
pub async fn run_job(config: &Config, job: &str, options: RunOptions) -> Result<JobRun, JobError> {
    let (job_cfg, pools) = resolve(config, job)?;
    let target_cfg = config.target(&job_cfg.target);
    // The repository opens (Argon2id) while the pools are connected; it is
    // awaited before anything touches a pool.
    let opening = match target_cfg {
        Some(t) if t.kind == TargetKind::Repository => {
            let t = t.clone();
            Some(tokio::spawn(
                async move { open_target_repository(&t).await },
            ))
        }
        _ => None,
    };
    let target_dir = match target_cfg {
        Some(t) if t.kind == TargetKind::Repository && t.url.is_some() => PathBuf::new(),
        Some(t) => t.path.clone(),
        None => PathBuf::new(),
    };
    let target_text = match target_cfg {
        Some(t) if t.kind == TargetKind::Repository => {
            format!("repository {}", preflight::target_location(t))
        }
        _ => target_dir.display().to_string(),
    };
    let report_dir = report_root(config, job_cfg);
    let journal = open_journal(config)?;
    let run_id = new_run_id();
    let _job_lock = journal
        .lock_job(&job_cfg.name, &run_id)
        .map_err(|e| JobError::Failed(e.to_string()))?;
    let _run_lock = journal
        .begin_run(&run_id)
        .map_err(|e| JobError::Failed(e.to_string()))?;
    let views = connect_all(&pools).await?;
    let repository = match opening {
        Some(task) => {
            let opened = task.await.unwrap_or_else(|e| {
                Err(JobError::Failed(format!(
                    "opening the repository failed: {e}"
                )))
            });
            match opened {
                Ok(repo) => Some(repo),
                Err(e) => {
                    for v in &views {
                        let _ = v.session.logout().await;
                    }
                    return Err(e);
                }
            }
        }
        None => None,
    };

    let started = OffsetDateTime::now_utc();
    if let Some(path) = &job_cfg.status_log {
        append_status_line(path, &format!("job {} run {run_id} running", job_cfg.name));
    }
    let mut report = RunReport::new(
        &job_cfg.name,
        job_cfg.pools.join(", "),
        host_name(),
        &run_id,
        target_text,
        started,
    );

    // 1. Sweep leftovers of earlier runs, pool by pool.
    for v in &views {
        match journal::sweep(&v.session, &journal, &v.name, None).await {
            Ok(r) => {
                if !r.destroyed_vms.is_empty() || !r.destroyed_vdis.is_empty() {
                    tracing::info!(
                        "pool {}: removed leftovers of earlier runs: {} snapshot(s), {} VDI(s)",
                        v.name,
                        r.destroyed_vms.len(),
                        r.destroyed_vdis.len()
                    );
                }
                for e in r.errors.iter().chain(&r.left_alone) {
                    report
                        .problems
                        .push(format!("pool {}: leftover sweep: {e}", v.name));
                }
            }
            Err(e) => report
                .problems
                .push(format!("pool {}: leftover sweep: {e}", v.name)),
        }
        // What restores of this host that died left (restore::inflight).
        let swept = crate::restore::inflight::sweep(&v.session, &journal).await;
        if !swept.removed_vms.is_empty() || !swept.removed_vdis.is_empty() {
            tracing::warn!(
                "pool {}: removed what restores that died left: {} VM(s), {} VDI(s)",
                v.name,
                swept.removed_vms.len(),
                swept.removed_vdis.len()
            );
        }
        for e in &swept.errors {
            report.problems.push(format!(
                "pool {}: leftovers of a restore that died: {e}",
                v.name
            ));
        }
        for other in &swept.left_alone {
            tracing::info!("pool {}: {other}", v.name);
        }
        for stale in crate::kept::stale_on_pool(config, &journal, &v.name) {
            report.problems.push(format!("pool {}: {stale}", v.name));
        }
    }

    // 2. The plan.
    let plan = match plan::build(
        config,
        job_cfg,
        &views,
        &journal,
        options.today,
        repository.as_ref(),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            for v in &views {
                let _ = v.session.logout().await;
            }
            return Err(JobError::Failed(e.to_string()));
        }
    };
    report.problems.extend(plan.problems.iter().cloned());
    for c in plan.target_checks.iter().filter(|c| c.failed()) {
        report.problems.push(c.line());
    }

    // 3. The VMs.
    let target: Arc<dyn BackupTarget> = Arc::new(ArchiveTarget::new(&target_dir));
    let transfer_opts = TransferOptions::default();
    let mut pipelines: BTreeMap<String, Pipeline> = BTreeMap::new();
    for v in &views {
        pipelines.insert(
            v.name.clone(),
            Pipeline {
                session: v.session.clone(),
                transfer: Arc::new(
                    transfer_for(
                        &v.session,
                        pools.iter().find(|p| p.name == v.name).copied(),
                        &transfer_opts,
                    )
                    .await,
                ),
                run: RunContext {
                    journal: journal.clone(),
                    pool: v.name.clone(),
                    job: job_cfg.name.clone(),
                    run_id: run_id.clone(),
                },
                target: target.clone(),
                pool_label: v.name.clone(),
                progress: options.progress.clone(),
                wait: WaitOptions::default(),
            },
        );
    }
    let mut repo_pipelines: BTreeMap<String, RepoPipeline> = BTreeMap::new();
    if let Some(repo) = &repository {
        for (name, p) in &pipelines {
            repo_pipelines.insert(
                name.clone(),
                RepoPipeline {
                    session: p.session.clone(),
                    transfer: p.transfer.clone(),
                    run: p.run.clone(),
                    repo: repo.clone(),
                    pool_label: p.pool_label.clone(),
                    progress: p.progress.clone(),
                    wait: p.wait.clone(),
                    settings: RepoSettings {
                        nbd_connections: job_cfg.nbd_connections,
                        disk_concurrency: job_cfg.disk_concurrency,
                        cbt: job_cfg.cbt,
                        base: job_cfg.base,
                    },
                    write: xenvault_repo::WriteOptions::default(),
                },
            );
        }
    }
    let reserved = plan::reserved_space(config, job_cfg);
    let concurrency = Arc::new(Semaphore::new(job_cfg.concurrency.max(1) as usize));
    let per_host: Arc<BTreeMap<String, Arc<Semaphore>>> = Arc::new(
        plan.vms
            .iter()
            .filter_map(|v| v.host.clone())
            .map(|h| {
                (
                    h,
                    Arc::new(Semaphore::new(
                        job_cfg.per_host_limit.unwrap_or(u32::MAX / 2).max(1) as usize,
                    )),
                )
            })
            .collect(),
    );
    let mut handles = Vec::new();
    let mut vm_reports: Vec<Option<VmReport>> = Vec::new();
    for (i, vm) in plan.vms.iter().enumerate() {
        if let Some(reason) = &vm.skip {
            vm_reports.push(Some(VmReport::skipped(&vm.name, &vm.uuid, reason)));
            continue;
        }
        vm_reports.push(None);
        let Some(p) = pipelines.get(&vm.pool).cloned() else {
            continue;
        };
        let repo_p = repo_pipelines.get(&vm.pool).cloned();
        let vm = vm.clone();
        let concurrency = concurrency.clone();
        let per_host = per_host.clone();
        let target_dir = target_dir.clone();
        let pre_clean = job_cfg.pre_clean;
        let run_id = run_id.clone();
        let cancel = options.cancel.clone();
        let progress = options.progress.clone();
        handles.push((
            i,
            tokio::spawn(async move {
                let slots = async {
                    let slot = concurrency.acquire_owned().await;
                    let host_slot = match vm.host.as_ref().and_then(|h| per_host.get(h)) {
                        Some(s) => Some(s.clone().acquire_owned().await),
                        None => None,
                    };
                    (slot, host_slot)
                };
                let (_slot, _host_slot) = tokio::select! {
                    biased;
                    () = cancel.cancelled() => {
                        return (interrupted_vm(&vm, None, &cancel, progress.as_ref()), true);
                    }
                    slots = slots => slots,
                };
                if cancel.is_cancelled() {
                    return (interrupted_vm(&vm, None, &cancel, progress.as_ref()), true);
                }
                let started = OffsetDateTime::now_utc();
                let run = p.run.clone();
                let work = async {
                    // Make room first when asked (NAUbackup's pre_clean).
                    let mut notes = Vec::new();
                    if pre_clean && repo_p.is_none() {
                        notes.extend(pre_clean_vm(&target_dir, &vm, &run_id).await);
                    }
                    // Free space, measured now (local targets).
                    if !target_dir.as_os_str().is_empty()
                        && let Ok(free) = preflight::free_space(&target_dir)
                    {
                        let c = preflight::check_free_space(&vm.name, free, vm.estimate, reserved);
                        if c.failed() {
                            let mut r = VmReport::skipped(&vm.name, &vm.uuid, c.detail);
                            r.notes = notes;
                            return r;
                        }
                    }
                    let task = VmTask {
                        vm_ref: vm.vm_ref.clone(),
                        vm_uuid: vm.uuid.clone(),
                        name: vm.name.clone(),
                        mode: vm.mode,
                        disks: vm.disks,
                        compression: vm.compression,
                    };
                    if let Some(rp) = repo_p {
                        let mut r = repo_vm(&rp, &task, &vm).await;
                        r.notes.extend(notes);
                        return r;
                    }
                    let result = backup::backup_vm(&p, &task).await;
                    let mut r = vm_report(&vm.name, &vm.uuid, &result);
                    r.notes.extend(notes);
                    r
                };
                let commit_started = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let work = COMMITTING.scope(commit_started.clone(), work);
                let mut work = std::pin::pin!(work);
                tokio::select! {
                    r = &mut work => return (r, false),
                    () = cancel.cancelled() => {}
                }
                // A VM that started to commit is let finish.
                if commit_started.load(std::sync::atomic::Ordering::SeqCst) {
                    tracing::info!(
                        "VM {}: committing when the run was stopped; letting it finish",
                        vm.name
                    );
                    return (work.await, false);
                }
                // Stopped: the work is dropped at its current await point,
                // once a snapshot it may be creating is journaled (the
                // closing sweep finds only journaled snapshots).
                if let Some(r) =
                    until_snapshot_journaled(work.as_mut(), &run, &vm.uuid, &commit_started).await
                {
                    return (r, false);
                }
                (
                    interrupted_vm(&vm, Some(started), &cancel, progress.as_ref()),
                    true,
                )
            }),
        ));
    }
    let mut interrupted_vms = Vec::new();
    for (i, h) in handles {
        let r = match h.await {
            Ok((r, interrupted)) => {
                if interrupted {
                    interrupted_vms.push(i);
                }
                r
            }
            Err(e) => {
                let vm = &plan.vms[i];
                let mut r = VmReport::skipped(&vm.name, &vm.uuid, "");
                r.outcome = Outcome::failed(format!("internal error: {e}"));
                r
            }
        };
        vm_reports[i] = Some(r);
    }
    // The temporaries of the stopped VMs, destroyed now (by journal token,
    // as the closing sweep would) so that each VM's report says what
    // became of its own.
    for i in interrupted_vms {
        let vm = &plan.vms[i];
        let Some(view) = views.iter().find(|v| v.name == vm.pool) else {
            continue;
        };
        let (cleanup, notes) =
            cleanup_stopped_vm(&view.session, &journal, &view.name, &run_id, &vm.uuid).await;
        if let Some(Some(r)) = vm_reports.get_mut(i) {
            r.cleanup = cleanup;
            r.notes.extend(notes);
        }
    }
    report.vms = vm_reports.into_iter().flatten().collect();
    for vm in &report.vms {
        if let CleanupOutcome::Failed { reason } = &vm.cleanup {
            report.problems.push(format!("{}: {reason}", vm.name));
        }
    }

    // 4. Pool metadata and host backups (archive targets); not after a stop.
    let cancel = &options.cancel;
    let mut skipped_steps: Vec<&str> = Vec::new();
    if cancel.is_cancelled() {
        if job_cfg.pool_metadata.is_some() || job_cfg.host_backup.is_some() {
            skipped_steps.push("pool metadata and host backups");
        }
    } else if repository.is_some()
        && (job_cfg.pool_metadata.is_some() || job_cfg.host_backup.is_some())
    {
        report.problems.push(format!(
            "target {}: pool metadata and host backups are not stored in repository targets; back them up with a job whose target is an archive",
            job_cfg.target
        ));
    } else if !plan.target_failed() {
        for v in &views {
            let Some(p) = pipelines.get(&v.name) else {
                continue;
            };
            if job_cfg.pool_metadata.is_some() {
                let item = tokio::select! {
                    r = extra::pool_metadata(p) => item_report(ItemKind::PoolMetadata, &v.name, None, &r),
                    () = cancel.cancelled() => interrupted_item(ItemKind::PoolMetadata, &v.name, None, cancel),
                };
                report.pool_metadata.push(item);
            }
            if job_cfg.host_backup.is_some() {
                match v.session.host().get_all_records().await {
                    Ok(hosts) => {
                        for host in hosts.values() {
                            let uuid = Some(host.uuid.clone());
                            let item = tokio::select! {
                                r = extra::host_backup(p, host) => item_report(ItemKind::HostBackup, &host.name_label, uuid, &r),
                                () = cancel.cancelled() => interrupted_item(ItemKind::HostBackup, &host.name_label, uuid, cancel),
                            };
                            report.hosts.push(item);
                        }
                    }
                    Err(e) => report
                        .problems
                        .push(format!("pool {}: cannot list hosts: {e}", v.name)),
                }
            }
        }
    }

    // 5. Retention (repository targets: after each VM, see `repo_vm`); not
    //    after a stop.
    if !plan.target_failed() && repository.is_none() {
        if cancel.is_cancelled() {
            skipped_steps.push("retention");
        } else {
            apply_retention(&target_dir, job_cfg, &plan, &run_id, &views, &mut report).await;
        }
    }
    if let Some(why) = cancel.reason() {
        let stopped = report
            .vms
            .iter()
            .filter(|v| v.outcome.reason().is_some_and(|r| r.starts_with(&why)))
            .count();
        let mut line = format!("the run was {why}: {stopped} VM(s) stopped or not started");
        if !skipped_steps.is_empty() {
            line.push_str(&format!("; skipped: {}", skipped_steps.join(", ")));
        }
        report.problems.push(line);
        report.interrupted = Some(why);
    }

    // 6. Closing sweep (this run's own leftovers included).
    for v in &views {
        match journal::sweep(&v.session, &journal, &v.name, Some(&run_id)).await {
            Ok(r) => {
                for e in &r.errors {
                    report.problems.push(format!(
                        "pool {}: cleanup left something for the next run: {e}",
                        v.name
                    ));
                }
            }
            Err(e) => report
                .problems
                .push(format!("pool {}: closing sweep: {e}", v.name)),
        }
        let _ = v.session.logout().await;
    }

    report.finished = OffsetDateTime::now_utc();
    let exit = if plan.target_failed() {
        ExitStatus::Failure
    } else {
        exit_status_of(&report)
    };
    let can_write = repository.is_some() || !plan.target_failed();
    let (log_path, json_path) =
        write_outputs(config, job_cfg, &report_dir, can_write, &mut report).await;
    if let Some(path) = &job_cfg.status_log {
        append_status_line(
            path,
            &format!(
                "job {} run {run_id} {}: {}",
                job_cfg.name,
                report.overall().label(),
                report.headline()
            ),
        );
    }
    Ok(JobRun {
        plan,
        report,
        exit,
        log_path,
        json_path,
    })
}

/// Appends `<time> xenvault <text>` to a NAUbackup-style status log (the
/// job's `status-log`); a failure is logged, never fatal.
fn append_status_line(path: &std::path::Path, text: &str) {
    use std::io::Write as _;
    let now = OffsetDateTime::now_utc();
    let line = format!(
        "{:04}-{:02}-{:02}-({:02}:{:02}:{:02}) xenvault {text}\n",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        tracing::warn!("cannot append to the status log {}: {e}", path.display());
    }
}

/// The email settings of a configuration (`[email]`), if any.
pub fn email_settings(config: &Config) -> Option<EmailSettings> {
    let e = config.email.as_ref()?;
    let mut s = EmailSettings::new(e.server.clone(), e.from.clone(), e.to.clone());
    s.port = e.port;
    s.security = match e.security {
        SmtpSecurity::Starttls => ReportSmtpSecurity::Starttls,
        SmtpSecurity::Tls => ReportSmtpSecurity::Tls,
        SmtpSecurity::None => ReportSmtpSecurity::Plain,
    };
    s.username = e.user.clone();
    s.password = e.password.as_ref().map(|p| p.expose().to_string());
    s.attempts = e.retries.max(1);
    Some(s)
}

/// The run log and JSON report on the target (old logs expired first), and
/// the email. Failures become problems of the report (the log is rewritten
/// when the email fails, so it says so).
async fn write_outputs(
    config: &Config,
    job: &JobConfig,
    target_dir: &std::path::Path,
    can_write: bool,
    report: &mut RunReport,
) -> (Option<PathBuf>, Option<PathBuf>) {
    let write = |report: &RunReport| -> (Option<PathBuf>, Option<PathBuf>, Vec<String>) {
        let mut problems = Vec::new();
        if !can_write {
            return (None, None, problems);
        }
        let log = crate::report::log::write_run_log(target_dir, report)
            .map_err(|e| problems.push(format!("run log: {e}")))
            .ok();
        let json = crate::report::log::write_json_report(target_dir, report)
            .map_err(|e| problems.push(format!("JSON report: {e}")))
            .ok();
        (log, json, problems)
    };
    if can_write
        && let Err(e) = crate::report::log::expire_logs(
            target_dir,
            job.log_retention_days,
            OffsetDateTime::now_utc(),
        )
    {
        report.problems.push(format!("log expiry: {e}"));
    }
    let (mut log, mut json, problems) = write(report);
    report.problems.extend(problems);
    if job.email
        && let Some(settings) = email_settings(config)
        && let Err(e) = crate::report::email::send_report(&settings, report).await
    {
        tracing::warn!("{e}");
        report
            .problems
            .push(format!("the report email was not sent: {e}"));
        let (l, j, problems) = write(report);
        (log, json) = (l.or(log), j.or(json));
        report.problems.extend(problems);
    }
    (log, json)
}

/// NAUbackup's `pre_clean`: before a VM's backup, remove its oldest complete
/// backups so that, with the new one, `keep_last` remain.
async fn pre_clean_vm(
    target_dir: &std::path::Path,
    vm: &plan::VmPlan,
    run_id: &str,
) -> Vec<String> {
    let root = target_dir.to_path_buf();
    let subject = archive::Subject::vm(vm.uuid.clone(), vm.name.clone());
    let keep = vm.keep_last;
    let run_id = run_id.to_string();
    let joined = tokio::task::spawn_blocking(move || -> Result<Vec<String>, String> {
        let points = archive::list_subject(&root, &subject.key).map_err(|e| e.to_string())?;
        let rules = RetentionRules {
            keep: BTreeMap::new(),
            default_keep: None,
            protected_runs: vec![run_id],
        };
        let plan = archive::retention::pre_clean_plan(&points, &subject, &root, keep, &rules);
        let outcome = archive::retention::apply(&plan);
        Ok(outcome
            .removed
            .iter()
            .map(|p| format!("pre-clean removed {}", p.display()))
            .collect())
    })
    .await;
    match joined {
        Ok(Ok(notes)) => notes,
        Ok(Err(e)) => vec![format!("pre-clean failed: {e}")],
        Err(e) => vec![format!("pre-clean failed: {e}")],
    }
}

async fn apply_retention(
    target_dir: &std::path::Path,
    job: &JobConfig,
    plan: &BackupPlan,
    run_id: &str,
    views: &[PoolView],
    report: &mut RunReport,
) {
    let mut keep = BTreeMap::new();
    for vm in &plan.vms {
        keep.insert(SubjectKey::vm(vm.uuid.clone()), vm.keep_last);
    }
    if let Some(pm) = &job.pool_metadata {
        for v in views {
            keep.insert(SubjectKey::pool_metadata(v.name.clone()), pm.keep_last);
        }
    }
    if let Some(hb) = &job.host_backup {
        for h in &report.hosts {
            if let Some(uuid) = &h.uuid {
                keep.insert(SubjectKey::host(uuid.clone()), hb.keep_last);
            }
        }
    }
    let rules = RetentionRules {
        keep,
        default_keep: None,
        protected_runs: vec![run_id.to_string()],
    };
    let root = target_dir.to_path_buf();
    let joined = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let points = archive::list(&root).map_err(|e| e.to_string())?;
        let plan = archive::retention::plan(&points, &rules);
        let outcome = archive::retention::apply(&plan);
        Ok((plan, outcome))
    })
    .await;
    match joined {
        Ok(Ok((plan, outcome))) => {
            for d in plan.removals() {
                let path = d.path.display().to_string();
                if let Some(key) = &d.subject
                    && let Some(vm) = report
                        .vms
                        .iter_mut()
                        .find(|v| SubjectKey::vm(v.uuid.clone()) == *key)
                {
                    vm.pruned.push(path);
                }
            }
            for (path, e) in &outcome.failed {
                report
                    .problems
                    .push(format!("retention: cannot remove {}: {e}", path.display()));
            }
        }
        Ok(Err(e)) => report.problems.push(format!("retention: {e}")),
        Err(e) => report.problems.push(format!("retention: {e}")),
    }
}

/// One VM into the repository, then its retention (only after a committed
/// restore point; chunks are left for `xenvault prune`).
async fn repo_vm(rp: &RepoPipeline, task: &VmTask, vm: &plan::VmPlan) -> VmReport {
    let result = repo_backup::backup_vm(rp, task).await;
    let mut r = vm_report(&vm.name, &vm.uuid, &result.vm);
    r.repository = Some(result.stats);
    r.notes.extend(result.notes);
    if let Some(manifest) = &result.manifest {
        // Ids are times to the second, so a point made less than a second
        // after the previous one is dated a second later (see
        // `free_restore_point_time`), possibly past the clock. Retention
        // counts from the newest point at least, so that the points it has
        // just superseded are not kept as "newer than now".
        let now = OffsetDateTime::now_utc();
        let now =
            xenvault_repo::manifest::parse_rfc3339(&manifest.time).map_or(now, |t| t.max(now));
        match repo_backup::retention::apply_vm(&rp.repo, &vm.uuid, &vm.retention, now).await {
            Ok(gone) => r.pruned = gone,
            Err(e) => r.notes.push(format!("retention: {e}")),
        }
    }
    r
}

/// How long a stopped VM's work may go on so that a snapshot it is
/// creating (`VM.snapshot` in flight) gets journaled.
const SNAPSHOT_JOURNAL_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Whether this run's journal holds an intent for `vm_uuid` whose snapshot
/// is not recorded yet (its `VM.snapshot` may be in flight). A journal that
/// cannot be read counts as "no" (logged).
fn snapshot_in_flight(run: &RunContext, vm_uuid: &str) -> bool {
    match run.journal.outstanding(Some(&run.pool)) {
        Ok(open) => open
            .iter()
            .any(|o| o.run_id == run.run_id && o.source_vm == vm_uuid && o.snapshot.is_none()),
        Err(e) => {
            tracing::warn!("VM {vm_uuid}: cannot read the journal while stopping: {e}");
            false
        }
    }
}

tokio::task_local! {
    /// Set by a VM's backup when it starts to commit (see [`committing`]).
    static COMMITTING: Arc<std::sync::atomic::AtomicBool>;
}

/// Called by a VM's backup right before it commits its restore point or
/// archive: from then on a stop of the run lets the VM's work finish
/// (commit, keeping the new base, releasing the old one, retention) instead
/// of dropping it, so a committed backup is never reported as not committed
/// and the base it names is never destroyed by the stop's cleanup. Outside a
/// run (tests, tools) it does nothing.
pub(crate) fn committing() {
    let _ = COMMITTING.try_with(|flag| flag.store(true, std::sync::atomic::Ordering::SeqCst));
}

/// Goes on with a stopped VM's `work` while a snapshot it is creating is
/// not journaled yet (a snapshot created after the closing sweep would be
/// left on the pool), at most [`SNAPSHOT_JOURNAL_LIMIT`]. `Some` when the
/// work ended meanwhile (its own report stands).
async fn until_snapshot_journaled<F: std::future::Future<Output = VmReport>>(
    mut work: std::pin::Pin<&mut F>,
    run: &RunContext,
    vm_uuid: &str,
    commit_started: &std::sync::atomic::AtomicBool,
) -> Option<VmReport> {
    let deadline = tokio::time::Instant::now() + SNAPSHOT_JOURNAL_LIMIT;
    while snapshot_in_flight(run, vm_uuid) {
        if commit_started.load(std::sync::atomic::Ordering::SeqCst) {
            return Some(work.await);
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "VM {vm_uuid}: its snapshot was still being created {} s after the stop; the next run's sweep removes it",
                SNAPSHOT_JOURNAL_LIMIT.as_secs()
            );
            return None;
        }
        tokio::select! {
            r = work.as_mut() => return Some(r),
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
        }
    }
    None
}

/// The report of a VM stopped by a [`Cancel`] (`started`: when its backup
/// had started), told to the progress observer too.
fn interrupted_vm(
    vm: &plan::VmPlan,
    started: Option<OffsetDateTime>,
    cancel: &Cancel,
    progress: &dyn Progress,
) -> VmReport {
    let why = cancel.reason().unwrap_or_else(|| "interrupted".to_string());
    let reason = match started {
        Some(_) => format!("{why}: stopped before its end, nothing of it was committed"),
        None => format!("{why}: not started"),
    };
    let mut r = VmReport::skipped(&vm.name, &vm.uuid, "");
    r.outcome = Outcome::failed(reason.clone());
    r.started = started;
    r.finished = Some(OffsetDateTime::now_utc());
    progress.finished(&vm.name, Err(&reason));
    r
}

/// Destroys what a stopped VM created on its pool during this run (its
/// open journal tokens, as the closing sweep would) and says what became of
/// it, with notes. Kept snapshots are not open tokens and stay: bases of
/// committed restore points, and the snapshot a resume checkpoint of this
/// run reads from (repository targets: the next run resumes from it
/// without re-reading what was stored, then releases it), which a note
/// names.
async fn cleanup_stopped_vm(
    session: &Session,
    journal: &Journal,
    pool: &str,
    run_id: &str,
    vm_uuid: &str,
) -> (CleanupOutcome, Vec<String>) {
    let mut notes = Vec::new();
    match journal.kept(Some(pool)) {
        Ok(kept) => {
            for k in kept.iter().filter(|k| {
                k.role == journal::KeepRole::Resume
                    && k.token.run_id == run_id
                    && k.token.source_vm == vm_uuid
            }) {
                notes.push(format!(
                    "snapshot {} kept for the next run to resume from ({}); it is released once that run has committed",
                    k.token.snapshot.as_deref().unwrap_or("?"),
                    journal::TAG_RESUME
                ));
            }
        }
        Err(e) => notes.push(format!("cannot read the kept snapshots: {e}")),
    }
    let open = match journal.outstanding(Some(pool)) {
        Ok(o) => o,
        Err(e) => {
            let failed = CleanupOutcome::Failed {
                reason: format!("{e} (the closing sweep retries)"),
            };
            return (failed, notes);
        }
    };
    let mut done = journal::CleanupReport::default();
    for o in open
        .iter()
        .filter(|o| o.run_id == run_id && o.source_vm == vm_uuid)
    {
        let r = journal::destroy_token(session, journal, o).await;
        done.destroyed_vms.extend(r.destroyed_vms);
        done.destroyed_vdis.extend(r.destroyed_vdis);
        done.errors.extend(r.errors);
    }
    let cleanup = if !done.errors.is_empty() {
        CleanupOutcome::Failed {
            reason: format!("{} (left for the next run's sweep)", done.errors.join("; ")),
        }
    } else if done.destroyed_vms.is_empty() && done.destroyed_vdis.is_empty() {
        CleanupOutcome::NothingToClean
    } else {
        CleanupOutcome::Cleaned {
            snapshots: done.destroyed_vms.len() as u32,
            vdis: done.destroyed_vdis.len() as u32,
        }
    };
    (cleanup, notes)
}

fn vm_report(name: &str, uuid: &str, r: &VmResult) -> VmReport {
    let cleanup = match &r.cleanup_error {
        Some(e) => CleanupOutcome::Failed {
            reason: e.to_string(),
        },
        None if r.cleanup.destroyed_vms.is_empty() && r.cleanup.destroyed_vdis.is_empty() => {
            CleanupOutcome::NothingToClean
        }
        None => CleanupOutcome::Cleaned {
            snapshots: r.cleanup.destroyed_vms.len() as u32,
            vdis: r.cleanup.destroyed_vdis.len() as u32,
        },
    };
    let (outcome, location, bytes) = match (&r.outcome, &r.cleanup_error) {
        (Ok(c), None) => (
            Outcome::Succeeded,
            Some(c.location.clone()),
            c.bytes_written,
        ),
        // Stored and complete, but the pool kept a temporary object: the
        // cleanup outcome and a run-level problem name it (see `run_job`).
        (Ok(c), Some(_)) => (
            Outcome::Succeeded,
            Some(c.location.clone()),
            c.bytes_written,
        ),
        (Err(e), _) => (Outcome::failed(e.to_string()), None, r.bytes_received),
    };
    VmReport {
        name: name.to_string(),
        uuid: uuid.to_string(),
        started: Some(r.started),
        finished: Some(r.finished),
        bytes,
        outcome,
        cleanup,
        location,
        pruned: Vec::new(),
        notes: r.cleanup.left_alone.clone(),
        repository: None,
    }
}

/// The report of a pool metadata or host backup stopped by a [`Cancel`]
/// (its partial file is abandoned, never committed).
fn interrupted_item(
    kind: ItemKind,
    name: &str,
    uuid: Option<String>,
    cancel: &Cancel,
) -> ItemReport {
    let why = cancel.reason().unwrap_or_else(|| "interrupted".to_string());
    let now = OffsetDateTime::now_utc();
    ItemReport {
        kind,
        name: name.to_string(),
        uuid,
        started: None,
        finished: Some(now),
        bytes: 0,
        outcome: Outcome::failed(format!("{why}: stopped before its end")),
        location: None,
        pruned: Vec::new(),
    }
}

fn item_report(kind: ItemKind, name: &str, uuid: Option<String>, r: &ArtifactResult) -> ItemReport {
    let (outcome, location, bytes) = match &r.outcome {
        Ok(c) => (
            Outcome::Succeeded,
            Some(c.location.clone()),
            c.bytes_written,
        ),
        Err(e) => (Outcome::failed(e.to_string()), None, r.bytes_received),
    };
    ItemReport {
        kind,
        name: name.to_string(),
        uuid,
        started: Some(r.started),
        finished: Some(r.finished),
        bytes,
        outcome,
        location,
        pruned: Vec::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_unique_and_sortable() {
        let a = new_run_id();
        let b = new_run_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), "20261122T035012Z-abcdef01".len());
        assert!(a.contains('T') && a.contains("Z-"));
    }

    #[test]
    fn weekdays_follow_the_local_clock() {
        // Sunday 23:30 UTC is already Monday in Sydney and still Sunday in New York.
        let now = time::macros::datetime!(2026-11-22 23:30 UTC);
        assert_eq!(weekday_at(now, time::UtcOffset::UTC), Weekday::Sunday);
        assert_eq!(weekday_at(now, time::macros::offset!(+10)), Weekday::Monday);
        assert_eq!(weekday_at(now, time::macros::offset!(-5)), Weekday::Sunday);
    }

    #[tokio::test]
    async fn cancel_keeps_the_first_reason_and_wakes_waiters() {
        let cancel = Cancel::new();
        assert!(!cancel.is_cancelled());
        assert_eq!(cancel.reason(), None);
        let waiter = {
            let c = cancel.clone();
            tokio::spawn(async move { c.cancelled().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        cancel.cancel("interrupted by SIGINT");
        cancel.cancel("interrupted by SIGTERM");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(cancel.is_cancelled());
        assert_eq!(cancel.reason().as_deref(), Some("interrupted by SIGINT"));
        // Already cancelled: completes at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), cancel.cancelled())
            .await
            .unwrap();
        assert!(RunOptions::default().cancel.reason().is_none());
    }

    #[tokio::test]
    async fn a_commit_is_seen_by_the_run_of_its_vm_only() {
        // Outside a VM's work (tools, tests) it does nothing and never panics.
        committing();
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = Arc::new(std::sync::atomic::AtomicBool::new(false));
        COMMITTING
            .scope(flag.clone(), async {
                tokio::task::yield_now().await;
                committing();
            })
            .await;
        COMMITTING.scope(other.clone(), async {}).await;
        assert!(flag.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!other.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn missing_job_is_a_config_error() {
        let config = Config::default();
        let err = resolve(&config, "nightly").unwrap_err();
        assert_eq!(err.exit_status(), ExitStatus::Usage);
        assert!(err.to_string().contains("no job \"nightly\""));
    }
}
