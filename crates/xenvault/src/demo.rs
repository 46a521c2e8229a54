//! `xenvault demo`: the main job, end to end, on a built-in simulated pool.
//!
//! The demo starts `xapi-sim` in-process (a pool with a few VMs, some running),
//! writes a real configuration file for it (certificate pinned, password in a
//! `chmod 600` file), and then does what an administrator's cron job does:
//!
//! 1. `backup` the job into a local archive folder (snapshot, export, plain
//!    files `xe vm-import` reads, cleanup, report);
//! 2. let the guests write, and run the job again;
//! 3. restore one VM from the newest archive as a new VM, compare its
//!    disks bit for bit with the source VM's disks, and remove the copy;
//! 4. back the same VMs up into an encrypted, deduplicating repository (a
//!    second job, CBT enabled): a full backup, guest writes, then a
//!    forever-incremental one that reads only the changed chunks over NBD;
//! 5. restore one VM from the repository's newest restore point as a new VM
//!    and compare it bit for bit too;
//! 6. check that no snapshot is left on the pool but the repository job's
//!    bases (one kept per VM for its next incremental), and print the
//!    summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, anyhow, bail, ensure};
use serde::Serialize;
use xenvault_engine::config;
use xenvault_engine::job::{self, RunOptions};
use xenvault_engine::restore::{self, PoolConnection, VmRestoreOptions};
use xenvault_sim::scenario::{FlagScenario, Scenario};
use xenvault_sim::{SimConfig, Simulator};
use xenvault_types::report::RunReport;
use xenvault_xapi::records::VbdType;
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::tls::TlsPolicy;

use crate::cli::DemoArgs;
use crate::exit::{ExitCode, UsageError};

/// The demo keeps its disks small: it is a demonstration, not a benchmark.
const MAX_DEMO_DISK: u64 = 256 << 20;
/// Guest writes per disk between the two runs (64 KiB blocks).
const GUEST_WRITES: u64 = 24;
/// The demo job's name.
const JOB: &str = "demo";
/// The repository job's name.
const REPO_JOB: &str = "vault";

/// What the demo did.
#[derive(Debug, Serialize)]
struct DemoReport {
    runs: Vec<RunReport>,
    restored: RestoreCheck,
    repository: RepositoryDemo,
    /// Snapshots on the pool besides the repository job's kept bases.
    leftover_snapshots: usize,
    archive: PathBuf,
    seconds: f64,
    state_dir: Option<PathBuf>,
}

/// The repository part: a full and a forever-incremental run, a restore.
#[derive(Debug, Serialize)]
struct RepositoryDemo {
    path: PathBuf,
    runs: Vec<RunReport>,
    /// Bytes the repository holds at the end (every restore point a full image).
    stored_bytes: u64,
    restore_points: usize,
    /// Snapshots the job keeps on the pool as the bases of its next incrementals.
    kept_bases: usize,
    restored: RestoreCheck,
}

/// The restore and its bit-for-bit check.
#[derive(Debug, Serialize)]
struct RestoreCheck {
    vm: String,
    restored_as: String,
    from: String,
    disks_compared: usize,
    bytes_compared: u64,
    identical: bool,
}

/// Runs the demo.
pub async fn run(args: DemoArgs, json: bool) -> anyhow::Result<ExitCode> {
    if args.disk_size > MAX_DEMO_DISK {
        return Err(UsageError(format!(
            "--disk-size {} is larger than the demo allows ({} MiB); the demo is a demonstration, not a benchmark",
            args.disk_size,
            MAX_DEMO_DISK >> 20
        ))
        .into());
    }
    let started = Instant::now();
    let temp;
    let root = match &args.keep {
        Some(dir) => {
            if dir.join("repo").exists() {
                return Err(UsageError(format!(
                    "{} already holds a demo's repository (repo/): give --keep an empty or new directory",
                    dir.display()
                ))
                .into());
            }
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir().context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
    };

    say(format!(
        "Starting a simulated XAPI pool: {} VMs with {} MiB disks, 25% written",
        args.vms,
        args.disk_size >> 20
    ));
    let mut sim_config = SimConfig::new(root.join("pool"));
    sim_config.scenario = Scenario::from_flags(&FlagScenario {
        vms: args.vms as usize,
        disk_size: args.disk_size,
        written: 0.25,
        hosts: 1,
        nbd_purpose: "insecure_nbd".into(),
    });
    let sim = Simulator::start(sim_config)
        .await
        .context("cannot start the simulated pool")?;
    say(format!(
        "  pool at {} (certificate {})",
        sim.info.https_url, sim.info.fingerprint
    ));

    let outcome = demo_against(&sim, &root, &say).await;
    let shutdown = sim.shutdown().await;
    let (runs, restored, repository, leftover_snapshots) = outcome?;
    shutdown.context("the simulated pool did not stop cleanly")?;

    let report = DemoReport {
        runs,
        restored,
        repository,
        leftover_snapshots,
        archive: root.join("backups"),
        seconds: started.elapsed().as_secs_f64(),
        state_dir: args.keep.clone(),
    };
    let all_ok = report
        .runs
        .iter()
        .chain(&report.repository.runs)
        .all(|r| r.summary().failed == 0 && r.summary().skipped == 0)
        && report.restored.identical
        && report.repository.restored.identical
        && report.leftover_snapshots == 0;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(if all_ok {
        ExitCode::Success
    } else {
        ExitCode::Failure
    })
}

fn print_summary(report: &DemoReport) {
    println!();
    for (i, run) in report.runs.iter().enumerate() {
        println!("Run {}: {}", i + 1, run.headline());
        print_vms(run);
    }
    print_restore(&report.restored);
    let repo = &report.repository;
    for (i, run) in repo.runs.iter().enumerate() {
        let stats = run.vms.iter().filter_map(|vm| vm.repository.as_ref());
        let (read, stored) = stats.fold((0, 0), |(r, s), st| {
            (r + st.bytes_read, s + st.bytes_stored)
        });
        println!(
            "Run {}: {} into the repository; read {:.1} MiB from the pool, {:.1} MiB of new chunks stored",
            report.runs.len() + i + 1,
            run.headline(),
            mib(read),
            mib(stored)
        );
        print_vms(run);
    }
    print_restore(&repo.restored);
    println!(
        "Repository {}: {} restore points, each a full image, in {:.1} MiB",
        repo.path.display(),
        repo.restore_points,
        mib(repo.stored_bytes)
    );
    println!(
        "Leftover snapshots on the pool: {} (besides the {} bases the repository job keeps for its next incrementals); archive: {}; {:.1} s in all",
        report.leftover_snapshots,
        repo.kept_bases,
        report.archive.display(),
        report.seconds
    );
    if let Some(dir) = &report.state_dir {
        println!(
            "Kept in {}: the configuration (xenvault.toml), the archive (backups/), the repository (repo/, its password in repo.password), the pool (pool/)",
            dir.display()
        );
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn print_vms(run: &RunReport) {
    for vm in &run.vms {
        let secs = match (vm.started, vm.finished) {
            (Some(s), Some(f)) => (f - s).as_seconds_f64(),
            _ => 0.0,
        };
        let (size, how) = match &vm.repository {
            // Repository runs: how each disk was read, what was new.
            Some(st) => {
                let methods: Vec<&str> = st.disks.iter().map(|d| d.method.as_str()).collect();
                (
                    format!("read {:>5.1} MiB", mib(st.bytes_read)),
                    format!(
                        " ({}; {:.1} MiB of new chunks stored)",
                        methods.join(", "),
                        mib(st.bytes_stored)
                    ),
                )
            }
            None => (format!("{:>8.1} MiB", mib(vm.bytes)), String::new()),
        };
        println!(
            "  {:<10} {size} {:>6.2} s  {}{}{how}",
            vm.name,
            secs,
            vm.outcome.label(),
            vm.outcome
                .reason()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
}

fn print_restore(r: &RestoreCheck) {
    println!(
        "Restore: {} from {} as {:?}: {} disk(s), {:.1} MiB compared, {}",
        r.vm,
        r.from,
        r.restored_as,
        r.disks_compared,
        mib(r.bytes_compared),
        if r.identical {
            "identical to the source, bit for bit"
        } else {
            "DIFFERENT from the source"
        }
    );
}

/// Writes the demo's configuration, runs the archive job twice and restores
/// one VM, then does the same with the repository job.
async fn demo_against(
    sim: &Simulator,
    root: &Path,
    say: &impl Fn(String),
) -> anyhow::Result<(Vec<RunReport>, RestoreCheck, RepositoryDemo, usize)> {
    let config_path = write_config(sim, root)?;
    say(format!(
        "Configuration written to {}",
        config_path.display()
    ));
    let config = config::load(&config_path).map_err(|e| anyhow!("{e}"))?;

    let mut runs = Vec::new();
    say(format!("Run 1: xenvault backup {JOB}"));
    runs.push(run_once(&config, JOB).await?);

    let session = Client::connect(
        &sim.info.https_url,
        Credentials::new(sim.info.user.clone(), sim.info.password.clone()),
        TlsPolicy::Pinned(sim.info.fingerprint.parse()?),
    )
    .await
    .context("cannot log in to the simulated pool")?;
    let vms = regular_vms(&session).await?;
    guest_writes(sim, &vms, 1000, say).await?;

    say(format!("Run 2: xenvault backup {JOB}"));
    runs.push(run_once(&config, JOB).await?);

    let (vm_uuid, vm_name, source_disks) = vms
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the simulated pool has no VM"))?;
    let pool = PoolConnection::from_session(session.clone()).await;
    let target = root.join("backups");
    let point = restore::find_point(&target, &vm_uuid, None)?;
    say(format!(
        "Restoring {vm_name} from {} as a new VM",
        point.dir.display()
    ));
    let restored = restore::restore_vm(
        &pool,
        &point,
        &VmRestoreOptions::default(),
        restore::no_progress(),
    )
    .await?;
    let check = compare_vm(
        sim,
        &vm_name,
        &restored,
        point.dir.display().to_string(),
        &source_disks,
    )
    .await?;
    // Checked: the copy goes again (the repository job backs up every VM).
    let copy = session.vm().get_by_uuid(&restored.uuid).await?;
    pool.destroy_vm_and_disks(&copy)
        .await
        .map_err(|e| anyhow!("cannot remove the restored copy of {vm_name}: {e}"))?;
    say(format!("  compared with {vm_name}, then removed again"));

    // The same VMs into an encrypted, deduplicating repository.
    let repo_dir = root.join("repo");
    let repo_target = config
        .targets
        .get("vault")
        .ok_or_else(|| anyhow!("the demo configuration has no [targets.vault]"))?;
    say(format!(
        "Creating an encrypted repository in {} (password in {})",
        repo_dir.display(),
        root.join("repo.password").display()
    ));
    init_repository(repo_target).await?;
    let mut repo_runs = Vec::new();
    say(format!(
        "Run 3: xenvault backup {REPO_JOB} (full: the allocated blocks over NBD; CBT turned on for the next run)"
    ));
    repo_runs.push(run_once(&config, REPO_JOB).await?);
    guest_writes(sim, &vms, 2000, say).await?;
    say(format!(
        "Run 4: xenvault backup {REPO_JOB} (forever-incremental: CBT says what changed, only those chunks are read)"
    ));
    repo_runs.push(run_once(&config, REPO_JOB).await?);

    let repo = xenvault_engine::repository::open_repository(repo_target)
        .await
        .context("cannot open the demo repository")?;
    let newest = restore::repo::find_repo_point(&repo, &vm_uuid, None).await?;
    say(format!(
        "Restoring {vm_name} from the repository's restore point {} as a new VM",
        newest.id
    ));
    let restored = restore::repo::restore_repo_vm(
        &pool,
        &repo,
        &newest,
        &restore::repo::RepoVmRestoreOptions::default(),
        restore::no_progress(),
    )
    .await?;
    let repo_check = compare_vm(
        sim,
        &vm_name,
        &restored,
        format!("{} (restore point {})", repo_dir.display(), newest.id),
        &source_disks,
    )
    .await?;
    let restore_points = repo.list_restore_points(None).await?.len();

    let snapshots: Vec<_> = session
        .vm()
        .get_all_records()
        .await?
        .into_values()
        .filter(|vm| vm.is_a_snapshot)
        .collect();
    let kept_bases = snapshots
        .iter()
        .filter(|vm| {
            vm.other_config
                .get(xenvault_engine::journal::TAG_BASE)
                .is_some_and(|job| job == REPO_JOB)
        })
        .count();
    let _ = session.logout().await;
    let repository = RepositoryDemo {
        stored_bytes: dir_bytes(&repo_dir),
        path: repo_dir,
        runs: repo_runs,
        restore_points,
        kept_bases,
        restored: repo_check,
    };
    Ok((runs, check, repository, snapshots.len() - kept_bases))
}

/// The guests of `vms` write [`GUEST_WRITES`] blocks to each of their disks.
async fn guest_writes(
    sim: &Simulator,
    vms: &[(String, String, Vec<String>)],
    seed: u64,
    say: &impl Fn(String),
) -> anyhow::Result<()> {
    say(format!(
        "Guests write {GUEST_WRITES} blocks of 64 KiB to each disk"
    ));
    for (index, (_, name, disks)) in vms.iter().enumerate() {
        for disk in disks {
            let store = sim.pool.disks.clone();
            let uuid = disk.clone();
            let seed = seed + index as u64;
            tokio::task::spawn_blocking(move || store.guest_write(&uuid, seed, GUEST_WRITES))
                .await?
                .with_context(|| format!("guest write to {name}"))?;
        }
    }
    Ok(())
}

/// Compares a restored VM's disks with its source's, bit for bit.
async fn compare_vm(
    sim: &Simulator,
    vm: &str,
    restored: &restore::RestoredVm,
    from: String,
    source_disks: &[String],
) -> anyhow::Result<RestoreCheck> {
    let restored_disks: Vec<&str> = restored.disks.iter().map(|d| d.vdi_uuid.as_str()).collect();
    ensure!(
        restored_disks.len() == source_disks.len(),
        "the restored VM has {} disks, the source {}",
        restored_disks.len(),
        source_disks.len()
    );
    let mut bytes_compared = 0;
    let mut identical = true;
    for (source, copy) in source_disks.iter().zip(&restored_disks) {
        let store = sim.pool.disks.clone();
        let (a, b) = (source.clone(), copy.to_string());
        let (same, bytes) =
            tokio::task::spawn_blocking(move || compare_disks(&store, &a, &b)).await??;
        identical &= same;
        bytes_compared += bytes;
    }
    Ok(RestoreCheck {
        vm: vm.to_string(),
        restored_as: restored.name.clone(),
        from,
        disks_compared: restored_disks.len(),
        bytes_compared,
        identical,
    })
}

/// Creates the demo's encrypted repository where its target says, with the
/// target's password (as `xenvault repo init --target vault --encrypt`).
async fn init_repository(target: &xenvault_types::config::TargetConfig) -> anyhow::Result<()> {
    let password = target
        .password
        .as_ref()
        .ok_or_else(|| anyhow!("the demo's repository target has no password"))?;
    let storage = xenvault_engine::repository::open_storage(target).await?;
    xenvault_repo::Repository::init(
        storage,
        xenvault_repo::InitOptions {
            encryption: Some(xenvault_repo::EncryptionInit {
                password: password.expose().as_bytes().to_vec(),
                label: "demo".into(),
                cipher: xenvault_repo::CipherKind::Aes256Gcm,
                kdf: xenvault_repo::KdfParams::default(),
            }),
            ..xenvault_repo::InitOptions::default()
        },
    )
    .await
    .context("cannot create the demo repository")?;
    Ok(())
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                _ => e.metadata().map_or(0, |m| m.len()),
            })
            .sum()
    })
}

/// One run of job `name`; a run that cannot start is an error.
async fn run_once(
    config: &xenvault_types::config::Config,
    name: &str,
) -> anyhow::Result<RunReport> {
    let run = job::run_job(config, name, RunOptions::default())
        .await
        .map_err(|e| anyhow!("the backup run failed: {e}"))?;
    Ok(run.report)
}

/// The configuration an administrator would write for this pool.
fn write_config(sim: &Simulator, root: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let password_file = root.join("pool.password");
    std::fs::write(&password_file, format!("{}\n", sim.info.password))?;
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))?;
    // The repository's password: 122 random bits (a version 4 UUID's).
    let repo_password = root.join("repo.password");
    std::fs::write(
        &repo_password,
        format!("{}\n", uuid::Uuid::new_v4().simple()),
    )?;
    std::fs::set_permissions(&repo_password, std::fs::Permissions::from_mode(0o600))?;
    let text = format!(
        r#"# Written by `xenvault demo` for its simulated pool.
state-dir = {state:?}

[pools.demo]
url = {url:?}
user = {user:?}
password-file = {password:?}
fingerprint = {fingerprint:?}

[targets.local]
path = {backups:?}

[jobs.{JOB}]
pools = ["demo"]
target = "local"
all-vms = true

[jobs.{JOB}.retention]
keep-last = 2

# Forever-incremental backups of the same VMs into an encrypted,
# deduplicating repository (created by `xenvault repo init --encrypt`).
[targets.vault]
type = "repository"
path = {repo:?}
password-file = {repo_password:?}

[jobs.{REPO_JOB}]
pools = ["demo"]
target = "vault"
all-vms = true
cbt = "enable"

[jobs.{REPO_JOB}.retention]
keep-last = 7
"#,
        state = root.join("state").display().to_string(),
        url = sim.info.https_url,
        user = sim.info.user,
        password = password_file.display().to_string(),
        fingerprint = sim.info.fingerprint,
        backups = root.join("backups").display().to_string(),
        repo = root.join("repo").display().to_string(),
        repo_password = repo_password.display().to_string(),
    );
    let path = root.join("xenvault.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Regular VMs (not dom0, templates or snapshots) by name: uuid, name and the
/// uuids of their disks in device order.
async fn regular_vms(session: &Session) -> anyhow::Result<Vec<(String, String, Vec<String>)>> {
    let mut out = Vec::new();
    for (_, vm) in session.vm().get_all_records().await? {
        if !vm.is_regular_vm() {
            continue;
        }
        let mut disks = Vec::new();
        for vbd_ref in &vm.vbds {
            let vbd = session.vbd().get_record(vbd_ref).await?;
            if vbd.type_ == VbdType::Disk && !vbd.empty && !vbd.vdi.is_null() {
                let uuid = session.vdi().get_record(&vbd.vdi).await?.uuid;
                disks.push((vbd.userdevice.clone(), uuid));
            }
        }
        disks.sort();
        out.push((
            vm.uuid.clone(),
            vm.name_label.clone(),
            disks.into_iter().map(|(_, u)| u).collect(),
        ));
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// Compares two disks of the simulator byte for byte; returns (equal, bytes compared).
fn compare_disks(
    store: &xenvault_sim::disk::DiskStore,
    a: &str,
    b: &str,
) -> anyhow::Result<(bool, u64)> {
    let size = store.info(a)?.size;
    if store.info(b)?.size != size {
        return Ok((false, 0));
    }
    let piece = 1u64 << 20;
    let (mut x, mut y) = (vec![0u8; piece as usize], vec![0u8; piece as usize]);
    let mut off = 0;
    while off < size {
        let n = piece.min(size - off) as usize;
        store.read_at(a, off, &mut x[..n])?;
        store.read_at(b, off, &mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok((false, off));
        }
        off += n as u64;
    }
    if off != size {
        bail!("compared {off} of {size} bytes");
    }
    Ok((true, size))
}
