//! One xenvault operation of the repository benchmark, run in a child process so
//! its wall time and peak memory are measured like the peers' (`repo-step`).
//!
//! The direct path: NBD reads of a VDI snapshot (`NbdMultiReader`, block status,
//! several connections) into `xenvault_repo`'s `DiskWriter`, CBT for incrementals;
//! restores read the restore point with `Repository::read_disk` into a sparse raw
//! file. It is what the engine's repository job does per disk, without the job's
//! VM snapshot, records and report. The table labels which path was measured.

use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use xenvault_formats::vhd::{DecoderOptions, VhdDecoder};
use xenvault_repo::storage::LocalStorage;
use xenvault_repo::{Repository, WriteOptions};
use xenvault_types::ExtentData;
use xenvault_xapi::cbt::ChangedBlocks;
use xenvault_xapi::http::{HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::nbd::client::{NbdMultiReader, NbdOptions, NbdTls};
use xenvault_xapi::records::{StringMap, VdiRef};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::tls::TlsPolicy;

/// What the child does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StepKind {
    /// Full backup of the VDI.
    Full,
    /// Incremental backup against the state's base snapshot and restore point.
    Incremental,
    /// Restore of the state's latest restore point to `target` (sparse raw).
    Restore {
        /// The raw file to write.
        target: PathBuf,
    },
    /// One run of a backup job of a configuration file (`job::run_job`, the
    /// engine's repository job path: VM snapshot, records, CBT or full, commit).
    Job {
        /// The configuration file.
        config: PathBuf,
        /// The job's name.
        job: String,
        /// Fail unless every disk was read as an incremental.
        expect_incremental: bool,
    },
    /// The newest restore point of the VM in a configured repository target,
    /// restored to a raw file with `restore::repo::restore_repo_to_file`.
    JobRestore {
        /// The configuration file.
        config: PathBuf,
        /// The target's name.
        target_name: String,
        /// The raw file to write.
        target: PathBuf,
        /// fsync the file before renaming it (the engine's default); off,
        /// the restore does what restic and borg do.
        sync: bool,
    },
}

/// The child's input (JSON on the command line; the passwords are the
/// benchmark's throwaway ones).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepSpec {
    /// What to do.
    pub kind: StepKind,
    /// The simulator's plain HTTP URL.
    pub url: String,
    /// Its certificate fingerprint.
    pub fingerprint: String,
    /// XAPI user.
    pub user: String,
    /// XAPI password.
    pub password: String,
    /// The VM (its uuid names the restore points).
    pub vm_uuid: String,
    /// The VDI backed up (its uuid is the disk key).
    pub vdi_uuid: String,
    /// The repository directory.
    pub repo: PathBuf,
    /// The repository password.
    pub repo_password: String,
    /// Where the base snapshot and the last restore point are remembered.
    pub state: PathBuf,
    /// NBD connections.
    pub nbd_connections: usize,
}

/// Remembered between steps of one VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepState {
    /// uuid of the snapshot VDI the last backup read (the next CBT base).
    pub base_snapshot_uuid: Option<String>,
    /// The last restore point's id.
    pub restore_point: Option<String>,
}

/// What the child reports (one JSON line on stdout).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepResult {
    /// Bytes read from the source (NBD) or written to the target (restore).
    pub bytes: u64,
    /// Chunks newly stored.
    pub new_chunks: u64,
    /// Chunks processed (fed) in this step.
    pub processed_chunks: u64,
    /// Chunks in the disk's index.
    pub chunks: u64,
    /// 64 KiB blocks CBT reported changed (incrementals).
    pub changed_blocks: u64,
    /// Seconds spent opening the repository (the Argon2id key derivation).
    pub open_secs: f64,
    /// Seconds from the login to the first byte read: snapshot, allocation map or
    /// changed-block list, NBD connections.
    pub prepare_secs: f64,
    /// Seconds reading, chunking, storing and committing (or restoring).
    pub data_secs: f64,
    /// How the job read the disk (`nbd-full`, `nbd-cbt`, …).
    #[serde(default)]
    pub method: Option<String>,
}

/// Runs the step described by `json` and prints its result.
pub async fn run(json: &str) -> anyhow::Result<()> {
    let spec: StepSpec = serde_json::from_str(json).context("bad repo-step spec")?;
    let result = match &spec.kind {
        StepKind::Full | StepKind::Incremental => backup(&spec).await?,
        StepKind::Restore { target } => restore(&spec, target).await?,
        StepKind::Job {
            config,
            job,
            expect_incremental,
        } => job_backup(config, job, *expect_incremental).await?,
        StepKind::JobRestore {
            config,
            target_name,
            target,
            sync,
        } => job_restore(&spec, config, target_name, target, *sync).await?,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

async fn open_repo(spec: &StepSpec) -> anyhow::Result<Repository> {
    let storage = Arc::new(LocalStorage::new(&spec.repo)?);
    Ok(Repository::open(storage, Some(spec.repo_password.as_bytes())).await?)
}

fn load_state(spec: &StepSpec) -> anyhow::Result<StepState> {
    match std::fs::read(&spec.state) {
        Ok(b) => Ok(serde_json::from_slice(&b)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StepState::default()),
        Err(e) => Err(e.into()),
    }
}

async fn connect(spec: &StepSpec) -> anyhow::Result<Session> {
    let policy = TlsPolicy::Pinned(spec.fingerprint.parse()?);
    Ok(Client::connect(
        &spec.url,
        Credentials::new(spec.user.clone(), spec.password.clone()),
        policy,
    )
    .await?)
}

async fn nbd_reader(
    session: &Session,
    vdi: &VdiRef,
    connections: usize,
) -> anyhow::Result<NbdMultiReader> {
    let infos = session.vdi().get_nbd_info(vdi).await?;
    let info = infos
        .first()
        .ok_or_else(|| anyhow!("no NBD server listed for the snapshot"))?;
    let mut options = NbdOptions::from_record(info)?;
    options.tls = NbdTls::Off; // the simulated pool's network is insecure_nbd
    Ok(NbdMultiReader::connect(&options, connections).await?)
}

async fn backup(spec: &StepSpec) -> anyhow::Result<StepResult> {
    let mut state = load_state(spec)?;
    let t_open = std::time::Instant::now();
    let repo = open_repo(spec).await?;
    let open_secs = t_open.elapsed().as_secs_f64();
    let t_prepare = std::time::Instant::now();
    let session = connect(spec).await?;
    let vdi = session.vdi().get_by_uuid(&spec.vdi_uuid).await?;
    let size = u64::try_from(session.vdi().get_record(&vdi).await?.virtual_size)?;
    let snap = session.vdi().snapshot(&vdi, &StringMap::new()).await?;
    let snap_uuid = session.vdi().get_record(&snap).await?.uuid;

    let incremental = matches!(spec.kind, StepKind::Incremental);
    let (parent, ranges, changed_blocks) = if incremental {
        let base_uuid = state
            .base_snapshot_uuid
            .clone()
            .ok_or_else(|| anyhow!("no base snapshot: run the full backup first"))?;
        let base = session.vdi().get_by_uuid(&base_uuid).await?;
        let text = session.vdi().list_changed_blocks(&base, &snap).await?;
        let changed = ChangedBlocks::from_base64(&text, size)?;
        let ranges: Vec<_> = changed.ranges_split(8 << 20).collect();
        (state.restore_point.clone(), ranges, changed.changed_count())
    } else {
        (
            None,
            allocated_ranges(&session, &spec.fingerprint, &snap_uuid, size).await?,
            0,
        )
    };

    let reader = nbd_reader(&session, &snap, spec.nbd_connections).await?;
    let writer = repo
        .begin_restore_point(
            &spec.vm_uuid,
            "bench",
            time::OffsetDateTime::now_utc(),
            parent.as_deref(),
            WriteOptions::default(),
        )
        .await?;
    let meta = serde_json::json!({ "snapshot_vdi_uuid": snap_uuid });
    let mut disk = if incremental {
        writer
            .incremental_disk(&spec.vdi_uuid, size, &spec.vdi_uuid, meta)
            .await?
    } else {
        writer.full_disk(&spec.vdi_uuid, size, meta)?
    };
    let prepare_secs = t_prepare.elapsed().as_secs_f64();
    let t_data = std::time::Instant::now();
    let mut extents = reader.read_ranges(ranges);
    let mut bytes = 0u64;
    while let Some(extent) = extents.next().await {
        let extent = extent?;
        if let ExtentData::Data(d) = &extent.data {
            bytes += d.len() as u64;
        }
        disk.write_extent(extent).await?;
    }
    drop(extents);
    let entry = disk.finish().await?;
    let manifest = writer
        .commit(
            serde_json::json!({}),
            serde_json::json!({"format": "xenvault-bench-direct", "version": 1}),
            serde_json::json!({"job": "bench"}),
        )
        .await?;
    reader.disconnect().await;
    let data_secs = t_data.elapsed().as_secs_f64();

    if let Some(old) = state.base_snapshot_uuid.take()
        && let Ok(old_ref) = session.vdi().get_by_uuid(&old).await
    {
        let _ = session.vdi().destroy(&old_ref).await;
    }
    state.base_snapshot_uuid = Some(snap_uuid);
    state.restore_point = Some(manifest.id.clone());
    std::fs::write(&spec.state, serde_json::to_vec(&state)?)?;
    let _ = session.logout().await;
    Ok(StepResult {
        bytes,
        new_chunks: entry.stats.new_chunks,
        processed_chunks: entry.stats.processed_chunks,
        chunks: entry.stats.chunks,
        changed_blocks,
        open_secs,
        prepare_secs,
        data_secs,
        method: Some(if incremental { "nbd-cbt" } else { "nbd-full" }.to_string()),
    })
}

async fn job_backup(
    config: &std::path::Path,
    job: &str,
    expect_incremental: bool,
) -> anyhow::Result<StepResult> {
    use xenvault_engine::job::{self, ExitStatus, RunOptions};
    let config = xenvault_engine::config::load(config)?;
    let t0 = std::time::Instant::now();
    let run = job::run_job(&config, job, RunOptions::default())
        .await
        .map_err(|e| anyhow!("job {job}: {e}"))?;
    let data_secs = t0.elapsed().as_secs_f64();
    if run.exit != ExitStatus::Success {
        bail!(
            "job {job} ended {:?}: {}",
            run.exit,
            serde_json::to_string(&run.report).unwrap_or_default()
        );
    }
    let mut result = StepResult {
        data_secs,
        ..StepResult::default()
    };
    for vm in &run.report.vms {
        let Some(repo) = &vm.repository else {
            bail!("job {job}: VM {} has no repository statistics", vm.name);
        };
        result.bytes += repo.bytes_read;
        result.new_chunks += repo.new_chunks;
        for d in &repo.disks {
            result.processed_chunks += d.new_chunks + d.dedup_chunks;
            if expect_incremental && !d.incremental {
                bail!(
                    "job {job}: disk {} was read in full ({:?})",
                    d.key,
                    d.reason
                );
            }
            result.method = Some(d.method.clone());
        }
    }
    Ok(result)
}

async fn job_restore(
    spec: &StepSpec,
    config: &std::path::Path,
    target_name: &str,
    file: &std::path::Path,
    sync: bool,
) -> anyhow::Result<StepResult> {
    use xenvault_engine::restore::DiskSelector;
    use xenvault_engine::restore::repo::{
        FileFormat, FileRestoreOptions, find_repo_point, restore_repo_to_file,
    };
    let config = xenvault_engine::config::load(config)?;
    let target = config
        .target(target_name)
        .ok_or_else(|| anyhow!("no target {target_name} in the configuration"))?;
    let t_open = std::time::Instant::now();
    let repo = xenvault_engine::repository::open_repository(target).await?;
    let open_secs = t_open.elapsed().as_secs_f64();
    let t_data = std::time::Instant::now();
    let manifest = find_repo_point(&repo, &spec.vm_uuid, None).await?;
    let mut options = FileRestoreOptions::new(file, FileFormat::Raw);
    options.disk = Some(DiskSelector::VdiUuid(spec.vdi_uuid.clone()));
    options.overwrite = true;
    options.sync = sync;
    let restored = restore_repo_to_file(&repo, &manifest, &options, Arc::new(|_| {})).await?;
    Ok(StepResult {
        bytes: restored.bytes,
        open_secs,
        data_secs: t_data.elapsed().as_secs_f64(),
        ..StepResult::default()
    })
}

/// The allocated 2 MiB blocks of the snapshot, from the block table of its VHD
/// export (closed once the table is read): xapi-nbd, like the simulator, offers
/// no NBD block status, so this is how xenvault's full backup finds the data
/// (the engine's `backup/repo/exec.rs` does the same).
async fn allocated_ranges(
    session: &Session,
    fingerprint: &str,
    snap_uuid: &str,
    size: u64,
) -> anyhow::Result<Vec<std::ops::Range<u64>>> {
    let policy = TlsPolicy::Pinned(fingerprint.parse()?);
    let transfer = HttpTransfer::new(&policy, TransferOptions::default())?;
    let url = handler_url(
        &session.base_url(),
        "/export_raw_vdi",
        session.session_ref().expose(),
        None,
        &[("vdi", snap_uuid), ("format", "vhd")],
    );
    let download = transfer.get(url).await?;
    let mut body = download.body;
    let mut decoder = VhdDecoder::with_options(DecoderOptions {
        allow_fixed: false,
        ..DecoderOptions::default()
    });
    while let Some(piece) = body.next().await {
        decoder.feed(&piece?)?;
        if let Some(layout) = decoder.layout() {
            let bs = u64::from(layout.block_size());
            let mut out: Vec<std::ops::Range<u64>> = Vec::new();
            for i in 0..layout.block_count() {
                if layout.block_location(i).is_none() {
                    continue;
                }
                let start = u64::from(i) * bs;
                let end = (start + bs).min(size);
                if start >= end {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => out.push(start..end),
                }
            }
            return Ok(out);
        }
    }
    bail!("the VHD export ended before its block table")
}

async fn restore(spec: &StepSpec, target: &PathBuf) -> anyhow::Result<StepResult> {
    let state = load_state(spec)?;
    let t_open = std::time::Instant::now();
    let repo = open_repo(spec).await?;
    let open_secs = t_open.elapsed().as_secs_f64();
    let t_data = std::time::Instant::now();
    let manifest = match state.restore_point {
        Some(id) => repo.load_manifest(&spec.vm_uuid, &id).await?,
        None => repo
            .latest_restore_point(&spec.vm_uuid)
            .await?
            .ok_or_else(|| anyhow!("nothing backed up yet"))?,
    };
    let entry = manifest.disk(&spec.vdi_uuid)?;
    let size = entry.size;
    let mut reader = repo.read_disk(&manifest, &spec.vdi_uuid, 8).await?;
    let mut file = std::fs::File::create(target)?;
    let mut bytes = 0u64;
    let mut pos = 0u64;
    while let Some(extent) = reader.next_extent().await {
        let extent = extent?;
        if let ExtentData::Data(d) = &extent.data {
            if extent.offset != pos {
                file.seek(SeekFrom::Start(extent.offset))?;
            }
            file.write_all(d)?;
            bytes += d.len() as u64;
            pos = extent.offset + d.len() as u64;
        }
    }
    // No fsync: restic and borg do not sync restored files either.
    file.set_len(size)?;
    if bytes > size {
        bail!("restore wrote {bytes} bytes for a {size}-byte disk");
    }
    Ok(StepResult {
        bytes,
        chunks: entry.stats.chunks,
        open_secs,
        data_secs: t_data.elapsed().as_secs_f64(),
        ..StepResult::default()
    })
}
