//! `xenvault restore`: a VM (or one disk) from an archive or repository
//! restore point into a pool of the configuration; from a repository also
//! one disk into an existing VDI (only the chunks that differ) or to a file
//! (raw, VHD, XVA). Progress on stderr, the result on stdout (text or `--json`).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use xenvault_engine::restore::repo::{
    DEFAULT_PARALLEL, FileFormat, FileRestoreOptions, IntoVdiOptions, RepoDiskRestoreOptions,
    RepoVmRestoreOptions, VmRestoreMethod, find_repo_point, restore_repo_disk,
    restore_repo_disk_into, restore_repo_to_file, restore_repo_vm,
};
use xenvault_engine::restore::{
    Cancel, DiskRestoreOptions, DiskSelector, PoolConnection, ProgressFn, RestoreError,
    RestorePhase, RestoreProgress, VmIdentity, VmRestoreOptions, find_point, inflight,
    restore_disk, restore_vm,
};
use xenvault_engine::restore::{RestoredDisk, RestoredVm};
use xenvault_types::config::Config;

use crate::config_file::{config_path, load_config};
use crate::exit::{ExitCode, UsageError};
use crate::repo::{Backups, BackupsWanted, Chosen, locate};

/// Options of `xenvault restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A job of the configuration: its target is read and its (first) pool
    /// is restored into, unless --target / --pool say otherwise.
    pub job: Option<String>,

    /// The archive or repository directory to restore from (instead of a
    /// job's target), or the name of a target of the configuration.
    #[arg(long, value_name = "DIR|NAME", conflicts_with = "repo")]
    pub target: Option<PathBuf>,

    /// A repository in a local directory.
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,

    /// The VM to restore: its name (or uuid) in the archive.
    #[arg(long, value_name = "NAME")]
    pub vm: String,

    /// Which restore point: its timestamp (`20261122-030405`; in a
    /// repository its id `20261122T030405Z`) or a prefix (`20261122`: the
    /// newest of that day). Default: the newest complete one.
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

    /// Repositories: write to this file instead of a pool: one disk (--disk;
    /// raw or vhd) or the whole VM (xva). No pool or configuration needed.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["sr", "start", "preserve_identity", "pool", "into_vdi", "name"])]
    pub to_file: Option<PathBuf>,

    /// The file's format: raw, vhd or xva. Default: from the file's
    /// extension, else raw with --disk and xva without.
    #[arg(long, value_name = "FORMAT", requires = "to_file")]
    pub format: Option<FileFormat>,

    /// With --to-file: replace an existing file.
    #[arg(long, requires = "to_file")]
    pub overwrite: bool,

    /// Repositories: write the disk (--disk) into this existing VDI (uuid),
    /// sending only the chunks whose content differs.
    #[arg(long, value_name = "UUID", requires = "disk", conflicts_with_all = ["sr", "name"])]
    pub into_vdi: Option<String>,

    /// Repositories, a whole VM: `xva` (one rebuilt XVA through /import) or
    /// `vdis` (the VM, then each disk's allocated blocks through
    /// /import_raw_vdi: less to send for sparse disks).
    #[arg(long, value_name = "HOW", default_value = "xva", value_parser = ["xva", "vdis"], conflicts_with_all = ["disk", "to_file"])]
    pub method: String,

    /// Repositories: chunks fetched at once per disk (at most 32 MiB of them).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PARALLEL as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,

    /// A repository's password: first line of this file (chmod 600).
    #[arg(long, value_name = "FILE", conflicts_with = "password_env")]
    pub password_file: Option<PathBuf>,

    /// A repository's password: this environment variable.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
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
    let mut connection = PoolConnection::connect(&pool.url, &pool.user, password.expose(), tls)
        .await
        .with_context(|| format!("pool {name}"))?;
    mark_restore(&mut connection, config).await;
    Ok(connection)
}

/// Removes what restores of this host that died left on the pool, then
/// marks this restore's objects until they are whole (see
/// `xenvault_engine::restore::inflight`). Without a usable state directory
/// the restore goes on unmarked, and says so.
async fn mark_restore(pool: &mut PoolConnection, config: &Config) {
    let marked = xenvault_engine::job::open_journal(config).and_then(|journal| {
        let mark = inflight::RestoreMark::begin(&journal)
            .map_err(|e| xenvault_engine::job::JobError::Failed(e.to_string()))?;
        Ok((journal, mark))
    });
    let (journal, mark) = match marked {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "warning: {e}: this restore is not marked on the pool, so if it dies what it created is not removed by the next run (set state-dir to a writable directory)"
            );
            return;
        }
    };
    let swept = inflight::sweep(&pool.session, &journal).await;
    for uuid in &swept.removed_vms {
        eprintln!("removed VM {uuid} (and its disks), left by a restore that died");
    }
    for uuid in &swept.removed_vdis {
        eprintln!("removed VDI {uuid}, left by a restore that died");
    }
    for e in &swept.errors {
        eprintln!("warning: leftovers of a restore that died: {e}");
    }
    for other in &swept.left_alone {
        tracing::info!("{other}");
    }
    pool.restoring = Some(mark);
}

/// Maps restore errors to exit codes: the user's choice was wrong (2) or
/// the restore failed (1).
fn failure(e: RestoreError) -> anyhow::Error {
    match e {
        RestoreError::NotFound(_)
        | RestoreError::BadSr(_)
        | RestoreError::BadTarget(_)
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
    let wanted = BackupsWanted {
        job: args.job.as_deref(),
        target: args.target.as_deref(),
        repo: args.repo.as_deref(),
        password_file: args.password_file.as_deref(),
        password_env: args.password_env.as_deref(),
    };
    let config = if wanted.needs_config() || args.to_file.is_none() || args.config.is_some() {
        Some(load_config(args.config.as_deref())?)
    } else {
        None
    };
    let disk: Option<DiskSelector> = args
        .disk
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(UsageError)?;
    match locate(wanted, config.as_ref())? {
        Backups::Repository(chosen) => {
            restore_repository(&args, &chosen, config.as_ref(), disk, json).await
        }
        Backups::Archive(target) => {
            if args.to_file.is_some() || args.into_vdi.is_some() {
                return Err(UsageError(format!(
                    "--to-file and --into-vdi restore from repositories; {} is an archive (its files are already plain XVA/VHD/raw files)",
                    target.display()
                ))
                .into());
            }
            let config = config.ok_or_else(|| {
                UsageError("restoring into a pool needs the configuration".into())
            })?;
            restore_archive(&args, &config, target, disk, json).await
        }
    }
}

/// Restores from an archive directory into a pool.
async fn restore_archive(
    args: &RestoreArgs,
    config: &Config,
    target: PathBuf,
    disk: Option<DiskSelector>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let point = {
        let (target, vm, at) = (target.clone(), args.vm.clone(), args.at.clone());
        tokio::task::spawn_blocking(move || find_point(&target, &vm, at.as_deref()))
            .await?
            .map_err(failure)?
    };
    let pool = connect(args, config).await?;
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
            print_disk(&restored, json)?;
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
            print_vm(&restored, json)?;
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

fn print_disk(restored: &RestoredDisk, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(restored)?);
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
    Ok(())
}

fn print_vm(restored: &RestoredVm, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(restored)?);
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
    Ok(())
}

/// Restores from a repository: to a file, into an existing VDI, one disk
/// into a new VDI, or the whole VM.
async fn restore_repository(
    args: &RestoreArgs,
    chosen: &Chosen,
    config: Option<&Config>,
    disk: Option<DiskSelector>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let repo = crate::repo::open(chosen).await?;
    let manifest = find_repo_point(&repo, &args.vm, args.at.as_deref())
        .await
        .map_err(failure)?;
    let parallel = usize::from(args.parallel);
    let progress = progress_printer(!json);
    if let Some(path) = &args.to_file {
        let format = args.format.unwrap_or_else(|| {
            match path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::parse::<FileFormat>)
            {
                Some(Ok(f)) => f,
                _ if disk.is_some() => FileFormat::Raw,
                _ => FileFormat::Xva,
            }
        });
        if format != FileFormat::Xva && disk.is_none() {
            return Err(UsageError(format!(
                "a {} file holds one disk: choose it with --disk (position, VDI uuid or key), or write the whole VM as --format xva",
                if format == FileFormat::Raw { "raw" } else { "VHD" }
            ))
            .into());
        }
        let mut options = FileRestoreOptions::new(path, format);
        options.disk = disk;
        options.overwrite = args.overwrite;
        options.parallel = parallel;
        if !json {
            eprintln!("Restoring {} to {}", manifest.name(), path.display());
        }
        let restored = interruptible(
            restore_repo_to_file(&repo, &manifest, &options, progress),
            &options.cancel,
        )
        .await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&restored)?);
        } else {
            eprintln!();
            println!(
                "Restored {}{} to {} ({}, {} MiB of disk data, {} MiB file) in {:.1} s",
                restored.source,
                restored
                    .disk_key
                    .as_deref()
                    .map(|k| format!(" disk {k}"))
                    .unwrap_or_default(),
                restored.path,
                format!("{:?}", restored.format).to_lowercase(),
                restored.size >> 20,
                restored.bytes >> 20,
                restored.seconds
            );
        }
        return Ok(ExitCode::Success);
    }
    let config =
        config.ok_or_else(|| UsageError("restoring into a pool needs the configuration".into()))?;
    let pool = connect(args, config).await?;
    if !json {
        eprintln!(
            "Restoring {} of {} from {} into {}",
            match &disk {
                Some(d) => format!("disk at {d}"),
                None => "VM".to_string(),
            },
            manifest.vm_name,
            manifest.name(),
            pool.session.base_url()
        );
    }
    let outcome = match (disk, &args.into_vdi) {
        (Some(disk), Some(vdi)) => {
            let mut options = IntoVdiOptions::new(disk, vdi.clone());
            options.parallel = parallel;
            let done = interruptible(
                restore_repo_disk_into(&pool, &repo, &manifest, &options, progress),
                &options.cancel,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                eprintln!();
                println!(
                    "Wrote disk {} of {} into VDI {} \"{}\": {} of {} chunks differed and were written ({} MiB sent; read by {}) in {:.1} s",
                    done.disk_key,
                    done.source,
                    done.vdi_uuid,
                    done.name,
                    done.chunks_written,
                    done.chunks_compared,
                    done.bytes_sent >> 20,
                    done.read_method,
                    done.seconds
                );
            }
            ExitCode::Success
        }
        (Some(disk), None) => {
            let mut options = RepoDiskRestoreOptions::new(disk);
            options.sr = args.sr.clone();
            options.name = args.name.clone();
            options.parallel = parallel;
            let restored = interruptible(
                restore_repo_disk(&pool, &repo, &manifest, &options, progress),
                &options.cancel,
            )
            .await?;
            print_disk(&restored, json)?;
            ExitCode::Success
        }
        (None, _) => {
            let options = RepoVmRestoreOptions {
                sr: args.sr.clone(),
                identity: if args.preserve_identity {
                    VmIdentity::Preserve { force: args.force }
                } else {
                    VmIdentity::New {
                        name: args.name.clone(),
                    }
                },
                start: args.start,
                parallel,
                method: if args.method == "vdis" {
                    VmRestoreMethod::RawVdis
                } else {
                    VmRestoreMethod::Xva
                },
                ..RepoVmRestoreOptions::default()
            };
            let restored = interruptible(
                restore_repo_vm(&pool, &repo, &manifest, &options, progress),
                &options.cancel,
            )
            .await?;
            print_vm(&restored, json)?;
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
