//! `xenvault demo`: the main job, end to end, on a built-in simulated pool.
//!
//! The demo starts `xapi-sim` in-process (a pool with a few VMs, some running),
//! writes a real configuration file for it (certificate pinned, password in a
//! `chmod 600` file), and then does what an administrator's cron job does:
//!
//! 1. `backup` the job into a local archive folder (snapshot, export, plain
//!    files `xe vm-import` reads, cleanup, report);
//! 2. let the guests write, and run the job again;
//! 3. restore one VM from the newest archive as a new VM, and compare its
//!    disks bit for bit with the source VM's disks;
//! 4. check that no snapshot or temporary disk is left on the pool, and print
//!    the summary.

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

/// What the demo did.
#[derive(Debug, Serialize)]
struct DemoReport {
    runs: Vec<RunReport>,
    restored: RestoreCheck,
    leftover_snapshots: usize,
    archive: PathBuf,
    seconds: f64,
    state_dir: Option<PathBuf>,
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
    let (runs, restored, leftover_snapshots) = outcome?;
    shutdown.context("the simulated pool did not stop cleanly")?;

    let report = DemoReport {
        runs,
        restored,
        leftover_snapshots,
        archive: root.join("backups"),
        seconds: started.elapsed().as_secs_f64(),
        state_dir: args.keep.clone(),
    };
    let all_ok = report
        .runs
        .iter()
        .all(|r| r.summary().failed == 0 && r.summary().skipped == 0)
        && report.restored.identical
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
        for vm in &run.vms {
            let secs = match (vm.started, vm.finished) {
                (Some(s), Some(f)) => (f - s).as_seconds_f64(),
                _ => 0.0,
            };
            println!(
                "  {:<10} {:>8.1} MiB {:>6.2} s  {}{}",
                vm.name,
                vm.bytes as f64 / (1u64 << 20) as f64,
                secs,
                vm.outcome.label(),
                vm.outcome
                    .reason()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
    }
    let r = &report.restored;
    println!(
        "Restore: {} from {} as {:?}: {} disk(s), {:.1} MiB compared, {}",
        r.vm,
        r.from,
        r.restored_as,
        r.disks_compared,
        r.bytes_compared as f64 / (1u64 << 20) as f64,
        if r.identical {
            "identical to the source, bit for bit"
        } else {
            "DIFFERENT from the source"
        }
    );
    println!(
        "Leftover snapshots on the pool: {}; archive: {}; {:.1} s in all",
        report.leftover_snapshots,
        report.archive.display(),
        report.seconds
    );
    if let Some(dir) = &report.state_dir {
        println!(
            "Kept in {}: the configuration (xenvault.toml), the archive (backups/), the pool (pool/)",
            dir.display()
        );
    }
}

/// Writes the demo's configuration, runs the job twice, restores one VM.
async fn demo_against(
    sim: &Simulator,
    root: &Path,
    say: &impl Fn(String),
) -> anyhow::Result<(Vec<RunReport>, RestoreCheck, usize)> {
    let config_path = write_config(sim, root)?;
    say(format!(
        "Configuration written to {}",
        config_path.display()
    ));
    let config = config::load(&config_path).map_err(|e| anyhow!("{e}"))?;

    let mut runs = Vec::new();
    say(format!("Run 1: xenvault backup {JOB}"));
    runs.push(run_once(&config).await?);

    say(format!(
        "Guests write {GUEST_WRITES} blocks of 64 KiB to each disk"
    ));
    let session = Client::connect(
        &sim.info.https_url,
        Credentials::new(sim.info.user.clone(), sim.info.password.clone()),
        TlsPolicy::Pinned(sim.info.fingerprint.parse()?),
    )
    .await
    .context("cannot log in to the simulated pool")?;
    let vms = regular_vms(&session).await?;
    for (index, (_, name, disks)) in vms.iter().enumerate() {
        for disk in disks {
            let store = sim.pool.disks.clone();
            let uuid = disk.clone();
            let seed = 1000 + index as u64;
            tokio::task::spawn_blocking(move || store.guest_write(&uuid, seed, GUEST_WRITES))
                .await?
                .with_context(|| format!("guest write to {name}"))?;
        }
    }

    say(format!("Run 2: xenvault backup {JOB}"));
    runs.push(run_once(&config).await?);

    let (vm_uuid, vm_name, source_disks) = vms
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the simulated pool has no VM"))?;
    let target = root.join("backups");
    let point = restore::find_point(&target, &vm_uuid, None)?;
    say(format!(
        "Restoring {vm_name} from {} as a new VM",
        point.dir.display()
    ));
    let restored = restore::restore_vm(
        &PoolConnection::from_session(session.clone()).await,
        &point,
        &VmRestoreOptions::default(),
        restore::no_progress(),
    )
    .await?;
    let restored_disks: Vec<String> = restored.disks.iter().map(|d| d.vdi_uuid.clone()).collect();
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
        let (a, b) = (source.clone(), copy.clone());
        let (same, bytes) =
            tokio::task::spawn_blocking(move || compare_disks(&store, &a, &b)).await??;
        identical &= same;
        bytes_compared += bytes;
    }
    let check = RestoreCheck {
        vm: vm_name,
        restored_as: restored.name.clone(),
        from: point.dir.display().to_string(),
        disks_compared: restored_disks.len(),
        bytes_compared,
        identical,
    };

    let leftovers = session
        .vm()
        .get_all_records()
        .await?
        .values()
        .filter(|vm| vm.is_a_snapshot)
        .count();
    let _ = session.logout().await;
    Ok((runs, check, leftovers))
}

/// One run of the demo job; a run that cannot start is an error.
async fn run_once(config: &xenvault_types::config::Config) -> anyhow::Result<RunReport> {
    let run = job::run_job(config, JOB, RunOptions::default())
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
"#,
        state = root.join("state").display().to_string(),
        url = sim.info.https_url,
        user = sim.info.user,
        password = password_file.display().to_string(),
        fingerprint = sim.info.fingerprint,
        backups = root.join("backups").display().to_string(),
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
