//! `xenvault restore`: a VM (or one disk) from an archive restore point into
//! a pool of the configuration, with progress on stderr and the result on
//! stdout (text or `--json`).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use xenvault_engine::restore::{
    Cancel, DiskRestoreOptions, DiskSelector, PoolConnection, ProgressFn, RestoreError,
    RestorePhase, RestoreProgress, VmIdentity, VmRestoreOptions, find_point, restore_disk,
    restore_vm,
};
use xenvault_types::config::Config;

use crate::config_file::{config_path, load_config};
use crate::exit::{ExitCode, UsageError};

/// Options of `xenvault restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A job of the configuration: its target is read and its (first) pool
    /// is restored into, unless --target / --pool say otherwise.
    pub job: Option<String>,

    /// The archive directory to restore from (instead of a job's target).
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,

    /// The VM to restore: its name (or uuid) in the archive.
    #[arg(long, value_name = "NAME")]
    pub vm: String,

    /// Which restore point: its timestamp (`20261122-030405`) or a prefix of
    /// its digits (`20261122`: the newest of that day). Default: the newest
    /// complete one.
    #[arg(long, value_name = "TS")]
    pub at: Option<String>,

    /// The SR (uuid) to restore the disks to. Default: the pool's default SR.
    #[arg(long, value_name = "UUID")]
    pub sr: Option<String>,

    /// The restored VM's (or disk's) name. Default: "<name> (restored <timestamp>)".
    #[arg(long, value_name = "NAME", conflicts_with = "preserve_identity")]
    pub name: Option<String>,

    /// Keep the VM's uuid and MAC addresses (a full restore). Refused while
    /// the original VM exists, unless --force.
    #[arg(long, conflicts_with = "disk")]
    pub preserve_identity: bool,

    /// With --preserve-identity: replace an existing VM with that uuid.
    #[arg(long, requires = "preserve_identity")]
    pub force: bool,

    /// Start the VM once restored.
    #[arg(long, conflicts_with = "disk")]
    pub start: bool,

    /// Restore only this disk into a new VDI: its position (0, 1, …), its
    /// original VDI uuid, or its file name.
    #[arg(long, value_name = "DISK")]
    pub disk: Option<String>,

    /// The pool (a `[pools.NAME]` of the configuration) to restore into.
    #[arg(long, value_name = "NAME")]
    pub pool: Option<String>,

    /// The configuration file.
    /// [default: $XENVAULT_CONFIG, else /etc/xenvault/xenvault.toml]
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Do not check the archive's SHA-256 sums first (a damaged archive may
    /// then fail half-way; XAPI still checks the XVA's own chunk sums).
    #[arg(long)]
    pub no_verify: bool,
}

/// The archive directory: `--target`, else the job's target.
pub fn target_dir(
    target: Option<&PathBuf>,
    job: Option<&str>,
    config: Option<&Config>,
) -> anyhow::Result<PathBuf> {
    if let Some(t) = target {
        return Ok(t.clone());
    }
    let (Some(job), Some(config)) = (job, config) else {
        return Err(UsageError("say where the backups are: a JOB or --target DIR".into()).into());
    };
    let job_cfg = config.job(job).ok_or_else(|| {
        UsageError(format!(
            "no job {job:?} in the configuration; jobs: {}",
            config.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let target = config.target(&job_cfg.target).ok_or_else(|| {
        UsageError(format!(
            "job {job:?} names target {:?}, which the configuration lacks",
            job_cfg.target
        ))
    })?;
    Ok(target.path.clone())
}

/// Connects to the pool to restore into: `--pool`, else the job's first
/// pool, else the configuration's only pool.
async fn connect(args: &RestoreArgs, config: &Config) -> anyhow::Result<PoolConnection> {
    let names: Vec<String> = config.pools.keys().cloned().collect();
    let name = match (&args.pool, &args.job) {
        (Some(p), _) => p.clone(),
        (None, Some(job)) => match config.job(job).map(|j| j.pools.as_slice()) {
            Some([only]) => only.clone(),
            Some(many) if many.len() > 1 => {
                return Err(UsageError(format!(
                    "job {job:?} has several pools ({}): choose one with --pool",
                    many.join(", ")
                ))
                .into());
            }
            _ => return Err(UsageError(format!("job {job:?} names no pool: use --pool")).into()),
        },
        (None, None) if names.len() == 1 => names[0].clone(),
        (None, None) => {
            return Err(UsageError(format!(
                "choose the pool to restore into with --pool (configured: {})",
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            ))
            .into());
        }
    };
    let pool = config.pool(&name).ok_or_else(|| {
        UsageError(format!(
            "no pool {name:?} in {}; pools: {}",
            config_path(args.config.as_deref()).display(),
            names.join(", ")
        ))
    })?;
    let tls = xenvault_engine::config::tls_policy(pool).map_err(UsageError)?;
    let password = pool.password.as_ref().ok_or_else(|| {
        UsageError(format!(
            "pool {name:?} has no password (password-file or password-env)"
        ))
    })?;
    PoolConnection::connect(&pool.url, &pool.user, password.expose(), tls)
        .await
        .with_context(|| format!("pool {name}"))
}

/// Maps restore errors to exit codes: the user's choice was wrong (2) or
/// the restore failed (1).
fn failure(e: RestoreError) -> anyhow::Error {
    match e {
        RestoreError::NotFound(_)
        | RestoreError::BadSr(_)
        | RestoreError::OriginalExists { .. } => UsageError(e.to_string()).into(),
        other => anyhow::Error::new(other),
    }
}

/// Runs a restore to its end. Ctrl-C asks it to stop: the upload ends, the
/// import task is cancelled and what the restore created is removed before
/// it returns its error; a second Ctrl-C exits at once.
async fn interruptible<T>(
    restore: impl std::future::Future<Output = Result<T, RestoreError>>,
    cancel: &Cancel,
) -> anyhow::Result<T> {
    tokio::pin!(restore);
    let mut interrupted = false;
    loop {
        tokio::select! {
            result = &mut restore => {
                return match result {
                    Err(e) if interrupted => Err(anyhow::anyhow!(
                        "interrupted: nothing was restored, what was created is removed ({e})"
                    )),
                    other => other.map_err(failure),
                };
            }
            _ = tokio::signal::ctrl_c() => {
                if interrupted {
                    return Err(anyhow::anyhow!("interrupted twice: stopped without cleaning up"));
                }
                interrupted = true;
                cancel.cancel();
                eprintln!("\ninterrupted: stopping the upload and removing what was created (Ctrl-C again to quit now)…");
            }
        }
    }
}

/// Runs `xenvault restore`.
pub async fn run(args: RestoreArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_deref())?;
    let target = target_dir(args.target.as_ref(), args.job.as_deref(), Some(&config))?;
    let disk: Option<DiskSelector> = args
        .disk
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(UsageError)?;
    let point = {
        let (target, vm, at) = (target.clone(), args.vm.clone(), args.at.clone());
        tokio::task::spawn_blocking(move || find_point(&target, &vm, at.as_deref()))
            .await?
            .map_err(failure)?
    };
    let pool = connect(&args, &config).await?;
    if !json {
        eprintln!(
            "Restoring {} from {} ({}) into {}",
            match &disk {
                Some(d) => format!("disk at {d} of VM {}", point.vm_name),
                None => format!("VM {}", point.vm_name),
            },
            point.timestamp,
            point.dir.display(),
            pool.session.base_url()
        );
    }
    let progress = progress_printer(!json);
    let outcome = match disk {
        Some(disk) => {
            let options = DiskRestoreOptions {
                disk,
                sr: args.sr.clone(),
                name: args.name.clone(),
                verify: !args.no_verify,
                cancel: Cancel::default(),
            };
            let restored = interruptible(
                restore_disk(&pool, &point, &options, progress),
                &options.cancel,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&restored)?);
            } else {
                eprintln!();
                println!(
                    "Restored disk {} ({} MiB, {}) as VDI {} \"{}\" on SR {} in {:.1} s",
                    restored.userdevice.as_deref().unwrap_or("?"),
                    restored.virtual_size >> 20,
                    restored.source,
                    restored.vdi_uuid,
                    restored.name,
                    restored.sr_uuid,
                    restored.seconds
                );
            }
            ExitCode::Success
        }
        None => {
            let options = VmRestoreOptions {
                sr: args.sr.clone(),
                identity: if args.preserve_identity {
                    VmIdentity::Preserve { force: args.force }
                } else {
                    VmIdentity::New {
                        name: args.name.clone(),
                    }
                },
                start: args.start,
                verify: !args.no_verify,
                cancel: Cancel::default(),
            };
            let restored = interruptible(
                restore_vm(&pool, &point, &options, progress),
                &options.cancel,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&restored)?);
            } else {
                eprintln!();
                println!(
                    "Restored VM {} as {} \"{}\" on SR {} ({} disk{}, {} MiB sent, {:.1} s){}",
                    restored.source,
                    restored.uuid,
                    restored.name,
                    restored.sr_uuid,
                    restored.disks.len(),
                    if restored.disks.len() == 1 { "" } else { "s" },
                    restored.bytes >> 20,
                    restored.seconds,
                    if restored.preserved_identity {
                        " with its original identity"
                    } else {
                        ""
                    }
                );
                for d in &restored.disks {
                    println!(
                        "  disk {}: VDI {} \"{}\" ({} MiB)",
                        d.userdevice,
                        d.vdi_uuid,
                        d.name,
                        d.virtual_size >> 20
                    );
                }
                if !restored.networks_created.is_empty() {
                    println!(
                        "  networks missing on this pool, created by XAPI: {}",
                        restored.networks_created.join(", ")
                    );
                }
                if restored.started {
                    println!("  started");
                }
                if let Some(e) = &restored.start_error {
                    println!("  NOT started: {e} (the VM is restored, halted)");
                }
            }
            if restored.start_error.is_some() {
                ExitCode::Partial
            } else {
                ExitCode::Success
            }
        }
    };
    let _ = pool.session.logout().await;
    Ok(outcome)
}

/// Progress on stderr: a line redrawn in place on a terminal (rate, ETA),
/// plain lines at each step and every 10% otherwise (cron logs).
fn progress_printer(enabled: bool) -> ProgressFn {
    if !enabled {
        return xenvault_engine::restore::no_progress();
    }
    let tty = std::io::stderr().is_terminal();
    struct State {
        phase: Option<RestorePhase>,
        phase_start: Instant,
        last_print: Instant,
        last_tenth: u64,
    }
    let state = Arc::new(Mutex::new(State {
        phase: None,
        phase_start: Instant::now(),
        last_print: Instant::now() - Duration::from_secs(1),
        last_tenth: 0,
    }));
    Arc::new(move |p: RestoreProgress| {
        let Ok(mut s) = state.lock() else { return };
        let new_phase = s.phase != Some(p.phase);
        if new_phase {
            if tty && s.phase.is_some() {
                eprintln!();
            }
            s.phase = Some(p.phase);
            s.phase_start = Instant::now();
            s.last_tenth = 0;
        }
        let name = match p.phase {
            RestorePhase::Verifying => "checking the archive",
            RestorePhase::Uploading => "sending",
            RestorePhase::Finishing => "waiting for XAPI to finish",
            RestorePhase::Configuring => "configuring the restored VM",
        };
        let elapsed = s.phase_start.elapsed().as_secs_f64().max(0.001);
        let rate = p.done as f64 / elapsed;
        let counted = matches!(p.phase, RestorePhase::Verifying | RestorePhase::Uploading);
        let line = if counted && p.total > 0 {
            let pct = (p.done as f64 * 100.0 / p.total as f64).min(100.0);
            let eta = if rate > 0.0 && p.done < p.total {
                format!(", ETA {:.0} s", (p.total - p.done) as f64 / rate)
            } else {
                String::new()
            };
            format!(
                "{name}: {:.1}/{:.1} MiB ({pct:.0}%), {:.1} MiB/s{eta}",
                mib(p.done),
                mib(p.total),
                rate / f64::from(1 << 20)
            )
        } else {
            format!("{name}…")
        };
        if tty {
            if new_phase || s.last_print.elapsed() >= Duration::from_millis(200) {
                eprint!("\r\x1b[2K{line}");
                s.last_print = Instant::now();
            }
        } else {
            let tenth = (p.done * 10).checked_div(p.total).unwrap_or(0);
            if new_phase || tenth > s.last_tenth {
                s.last_tenth = tenth;
                eprintln!("{line}");
            }
        }
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}
