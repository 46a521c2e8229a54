//! The repository benchmark (issue 4): xenvault's backups into its repository
//! against restic and borg on the same bytes in the same run, the chunk-size data,
//! and ten clones of one template.
//!
//! A realistic disk (an ext4 image of OS files and random files, mostly free
//! space) is imported into a simulated VM disk. xenvault reads it from the
//! simulator (NBD, CBT); restic and borg read the raw bytes exported from the
//! simulator (every byte, zeros included, as they would read an image file).
//! Every measured operation runs as a child process under `/usr/bin/time` (wall
//! time, peak memory). See `docs/benchmarks.md` for the table and its notes.

mod image;
mod peers;
pub mod step;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt as _;
use xenvault_repo::storage::LocalStorage;
use xenvault_repo::{CipherKind, EncryptionInit, InitOptions, KdfParams, Repository};
use xenvault_sim::scenario::{Scenario, parse_size};
use xenvault_sim::{SimConfig, Simulator};
use xenvault_xapi::http::{HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::records::{VbdType, VmRef};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::tls::TlsPolicy;

use image::{ImageSpec, XorShift};
use peers::{Measured, Peer, PeerRepo};
use step::{StepKind, StepResult, StepSpec};

const BLOCK: u64 = 64 << 10;
const MIB: f64 = 1048576.0;
const PASSWORD: &str = "xenvault-bench-throwaway-password";

/// Options of `xenvault-bench repo`.
#[derive(Debug, clap::Args)]
pub struct RepoArgs {
    /// Virtual size of the benchmark's disk (e.g. 4G, 16G).
    #[arg(long, default_value = "4G", value_parser = size_arg)]
    disk_size: u64,
    /// Bytes of OS files (from /usr) on the filesystem.
    #[arg(long, default_value = "768M", value_parser = size_arg)]
    os_data: u64,
    /// Bytes of random (incompressible) files on the filesystem.
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    random_data: u64,
    /// Share of the disk's 64 KiB blocks changed before the incremental, in
    /// percent of all blocks; the blocks are chosen among the written ones.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Chunk sizes measured by xenvault; the first is the one compared with the
    /// peers (the repository's default is 1 MiB).
    #[arg(long, value_delimiter = ',', default_values_t = ["1M".to_string(), "256K".to_string()])]
    chunk_sizes: Vec<String>,
    /// NBD connections per disk.
    #[arg(long, default_value_t = 4)]
    nbd_connections: usize,
    /// Clones of the template VM for the dedup rows (0 to skip).
    #[arg(long, default_value_t = 10)]
    clones: usize,
    /// Unique data written into each clone, in percent of the disk's blocks.
    #[arg(long, default_value_t = 5.0)]
    clone_unique_percent: f64,
    /// How the clones' unique data is laid out: `scattered` (single 64 KiB
    /// blocks at random) and/or `runs` (runs of 1 MiB at random 64 KiB offsets).
    #[arg(long, value_delimiter = ',', default_values_t = ["runs".to_string(), "scattered".to_string()])]
    clone_layouts: Vec<String>,
    /// What measures xenvault: `job` (the engine's repository job,
    /// `job::run_job`, and `restore::repo::restore_repo_to_file`) or `direct`
    /// (NBD reads into the repository's `DiskWriter`, without the job around it).
    #[arg(long, value_enum, default_value_t = MeasuredPath::Job)]
    path: MeasuredPath,
    /// Runs of each full backup (each into a new repository) and each
    /// restore, for every tool; the table shows the fastest run and the
    /// largest peak memory of them (this shared machine varies by ±20%).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Skip restic and borg (e.g. for the peak-memory run on a 16 GiB disk).
    #[arg(long)]
    no_peers: bool,
    /// Scratch directory (default: a temporary directory here, removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Where to write the table (`-` for nowhere).
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: String,
    /// The section of `--out` to write (its markers).
    #[arg(long, default_value = "repo-backup")]
    section: String,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// What measures xenvault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MeasuredPath {
    /// The engine's repository job and restore API.
    Job,
    /// NBD reads into `DiskWriter` directly.
    Direct,
}

/// One xenvault variant (chunk size) measured on the main disk.
#[derive(Debug, Default, Clone)]
struct XvRun {
    chunk_size: u64,
    full: Measured,
    full_result: StepResult,
    full_size: u64,
    incr: Measured,
    incr_result: StepResult,
    incr_size: u64,
    restore: Measured,
    restore_result: StepResult,
    /// Job path only: the same restore without the final fsync (as the peers).
    unsynced_restore: Option<Measured>,
}

/// One peer measured on the main disk.
#[derive(Debug, Default, Clone)]
struct PeerRun {
    name: String,
    full: Measured,
    full_size: u64,
    incr: Measured,
    incr_size: u64,
    restore: Measured,
    /// The fastest restore plus the fsync of the file it wrote: the same
    /// end state as xenvault's restore (the bytes on disk).
    durable_restore: Duration,
}

/// One clone layout.
#[derive(Debug, Clone)]
struct CloneRun {
    layout: String,
    clones: usize,
    one_vm: u64,
    unique: u64,
    stored: u64,
    time: Duration,
    max_rss: u64,
}

/// Everything the pool and the disk need to be driven.
struct Bench {
    sim: Simulator,
    session: Session,
    transfer: HttpTransfer,
    work: PathBuf,
    exe: PathBuf,
    args: RepoArgs,
}

/// Runs the benchmark, prints the tables and writes the section.
pub async fn run(args: RepoArgs) -> anyhow::Result<()> {
    check_tools(args.no_peers)?;
    let started = Instant::now();
    let (work, _tmp) = match &args.work {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            (w.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("xenvault-bench-repo")
                .tempdir()
                .context("cannot make a scratch directory here")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let work = std::fs::canonicalize(&work)?;
    eprintln!(
        "scratch directory {} ({})",
        work.display(),
        free_space(&work)
    );

    // 1. The realistic disk.
    let t0 = Instant::now();
    let spec = ImageSpec {
        disk_size: args.disk_size,
        os_bytes: args.os_data,
        random_bytes: args.random_data,
        seed: 7,
    };
    let img = image::build(&spec, &work)?;
    eprintln!(
        "built {} ({} MiB disk: {} OS files, {:.0} MiB; {:.0} MiB random) in {:.1} s",
        img.path.display(),
        args.disk_size >> 20,
        img.os_files,
        img.os_bytes as f64 / MIB,
        img.random_bytes as f64 / MIB,
        t0.elapsed().as_secs_f64()
    );

    // 2. The simulated pool with one VM whose disk holds the image.
    let scenario_path = work.join("scenario.toml");
    std::fs::write(
        &scenario_path,
        format!(
            "templates = false\n[pool]\nname = \"bench\"\n[[vms]]\nname = \"bench-vm\"\npower_state = \"Halted\"\n[[vms.disks]]\nsize = {}\ncbt = true\n",
            args.disk_size
        ),
    )?;
    let mut config = SimConfig::new(work.join("pool"));
    config.scenario = Scenario::from_file(&scenario_path)?;
    let sim = Simulator::start(config).await?;
    let policy = TlsPolicy::Pinned(sim.info.fingerprint.parse()?);
    let session = Client::connect(
        &sim.info.url,
        Credentials::new(sim.info.user.clone(), sim.info.password.clone()),
        policy.clone(),
    )
    .await?;
    let transfer = HttpTransfer::new(&policy, TransferOptions::default())?;
    let bench = Bench {
        sim,
        session,
        transfer,
        work: work.clone(),
        exe: std::env::current_exe()?,
        args,
    };
    let result = bench.run_all(&img.path, &img, started).await;
    let _ = bench.session.logout().await;
    bench.sim.shutdown().await?;
    result
}

fn check_tools(no_peers: bool) -> anyhow::Result<()> {
    let mut tools = vec!["mke2fs", "cmp", "curl", "/usr/bin/time"];
    if !no_peers {
        tools.extend(["restic", "borg"]);
    }
    for t in tools {
        let found = if t.starts_with('/') {
            Path::new(t).exists()
        } else {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !found {
            bail!(
                "{t} is missing: run scripts/bench-deps.sh (installs restic, borgbackup, e2fsprogs, time)"
            );
        }
    }
    Ok(())
}

impl Bench {
    async fn run_all(
        &self,
        image_path: &Path,
        img: &image::ImageInfo,
        started: Instant,
    ) -> anyhow::Result<()> {
        let (vm_ref, vm_uuid) = self.vm_by_name("bench-vm").await?;
        let (vdi_uuid, size) = self.vm_disk(&vm_ref).await?;

        // Import the image, export it back (the bytes the peers read), compare.
        let t0 = Instant::now();
        self.import_raw(&vdi_uuid, image_path)
            .await
            .context("importing the image into the simulator")?;
        let src = self.work.join("src");
        std::fs::create_dir_all(&src)?;
        let raw0 = self.work.join("v0.raw");
        self.export_raw(&vdi_uuid, size, &raw0)
            .await
            .context("exporting the disk before the change")?;
        if !peers::same_bytes(image_path, &raw0)? {
            bail!("the disk exported from the simulator differs from the image imported");
        }
        std::fs::remove_file(image_path)?;
        eprintln!(
            "imported and exported the disk in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let written = image::written_blocks(&raw0)?;
        let total_blocks = size.div_ceil(BLOCK);

        // Clone the template now, before the main disk changes.
        let mut clone_vms = Vec::new();
        for layout in &self.args.clone_layouts {
            for i in 0..self.args.clones {
                let name = format!("clone-{layout}-{i:02}");
                let r = self.session.vm().clone_vm(&vm_ref, &name).await?;
                let uuid = self.session.vm().get_record(&r).await?.uuid;
                let (disk, _) = self.vm_disk(&r).await?;
                clone_vms.push((layout.clone(), uuid, disk));
            }
        }

        // Full backups.
        let chunk_sizes: Vec<u64> = self
            .args
            .chunk_sizes
            .iter()
            .map(|s| parse_size(s).map_err(|e| anyhow!("--chunk-sizes: {e}")))
            .collect::<anyhow::Result<_>>()?;
        self.write_config(&chunk_sizes)?;
        let mut xv = Vec::new();
        for &cs in &chunk_sizes {
            let repo = self.work.join(format!("xv-{}k", cs >> 10));
            init_repo(&repo, cs).await?;
            let spec = self.step_spec(
                self.backup_kind(cs, false),
                &vm_uuid,
                &vdi_uuid,
                &repo,
                "main",
            );
            eprintln!("xenvault full backup, {} KiB chunks", cs >> 10);
            let mut runs = Vec::new();
            for n in 0..self.args.runs {
                if n > 0 {
                    // A full backup again needs a new repository; the former
                    // one is set aside, not deleted (see `image::build` on
                    // freed inodes).
                    std::fs::rename(&repo, self.work.join(format!("xv-{}k.run{n}", cs >> 10)))?;
                    init_repo(&repo, cs).await?;
                }
                let (m, r) = self.run_step(&spec)?;
                eprintln!(
                    "  {:.2} s, {} MiB RSS",
                    m.wall.as_secs_f64(),
                    m.max_rss >> 20
                );
                runs.push((m, r));
            }
            let (full, full_result) = peers::fastest_with(runs);
            xv.push(XvRun {
                chunk_size: cs,
                full,
                full_result,
                full_size: peers::dir_bytes(&repo),
                ..XvRun::default()
            });
        }
        let disk_in_src = src.join("disk.raw");
        let mut peer_repos = Vec::new();
        let mut peer_runs = Vec::new();
        if !self.args.no_peers {
            std::fs::rename(&raw0, &disk_in_src)?;
            for peer in [Peer::Restic, Peer::Borg] {
                eprintln!("{} full backup", peer.name());
                let mut runs = Vec::new();
                let mut kept = None;
                for n in 0..self.args.runs {
                    // Each run into a new repository; the first one goes on.
                    let base = match n {
                        0 => self.work.join(peer.name()),
                        _ => self.work.join(format!("{}.run{n}", peer.name())),
                    };
                    let mut pr = PeerRepo::init(peer, base, PASSWORD)?;
                    let m = pr
                        .backup(&src, &["disk.raw"])
                        .with_context(|| format!("{} full backup", peer.name()))?;
                    eprintln!(
                        "  {:.2} s, {} MiB RSS",
                        m.wall.as_secs_f64(),
                        m.max_rss >> 20
                    );
                    runs.push(m);
                    kept.get_or_insert(pr);
                }
                let pr = kept.ok_or_else(|| anyhow!("no {} run", peer.name()))?;
                peer_runs.push(PeerRun {
                    name: peer.name().into(),
                    full: peers::fastest(runs),
                    full_size: pr.size(),
                    ..PeerRun::default()
                });
                peer_repos.push(pr);
            }
        } else {
            std::fs::rename(&raw0, &disk_in_src)?;
        }

        // The change: 1% of the disk's blocks, among the written ones.
        let want = ((total_blocks as f64) * self.args.change_percent / 100.0).round() as usize;
        let changed = choose(&written, want.min(written.len()), 42);
        let body = serde_json::json!({"vdi": vdi_uuid, "seed": 4242, "block_list": changed});
        self.control_post("guest-write", &body)
            .await
            .context("writing the change")?;
        let raw1 = self.work.join("v1.raw");
        self.export_raw(&vdi_uuid, size, &raw1)
            .await
            .context("exporting the disk after the change")?;
        std::fs::rename(&raw1, &disk_in_src)?;

        // Incrementals.
        for run in &mut xv {
            let repo = self.work.join(format!("xv-{}k", run.chunk_size >> 10));
            let spec = self.step_spec(
                self.backup_kind(run.chunk_size, true),
                &vm_uuid,
                &vdi_uuid,
                &repo,
                "main",
            );
            eprintln!("xenvault incremental, {} KiB chunks", run.chunk_size >> 10);
            let (m, r) = self.run_step(&spec)?;
            eprintln!(
                "  {:.2} s, {} MiB RSS",
                m.wall.as_secs_f64(),
                m.max_rss >> 20
            );
            // Touched chunks are read whole where the parent chunk holds data
            // (ADR 0009): between the changed blocks and one chunk per block.
            let least = changed.len() as u64 * BLOCK;
            let most = changed.len() as u64 * run.chunk_size;
            if r.bytes < least || r.bytes > most {
                bail!(
                    "the incremental read {} bytes; {} blocks of 64 KiB were written \
                     (expected {least}..={most})",
                    r.bytes,
                    changed.len()
                );
            }
            run.incr = m;
            run.incr_result = r;
            run.incr_size = peers::dir_bytes(&repo);
        }
        self.settle_sim();
        for (pr, run) in peer_repos.iter_mut().zip(&mut peer_runs) {
            eprintln!("{} incremental", pr.peer.name());
            let m = pr
                .backup(&src, &["disk.raw"])
                .with_context(|| format!("{} incremental", pr.peer.name()))?;
            eprintln!(
                "  {:.2} s, {} MiB RSS",
                m.wall.as_secs_f64(),
                m.max_rss >> 20
            );
            run.incr = m;
            run.incr_size = pr.size();
        }

        // Restores of the latest restore point (the incremental).
        for run in &mut xv {
            let repo = self.work.join(format!("xv-{}k", run.chunk_size >> 10));
            let target = self.work.join("restored.raw");
            let spec = self.step_spec(
                self.restore_kind(run.chunk_size, &target, true),
                &vm_uuid,
                &vdi_uuid,
                &repo,
                "main",
            );
            eprintln!("xenvault restore, {} KiB chunks", run.chunk_size >> 10);
            let (m, r) = self.restore_runs(&spec, &target, &disk_in_src, "")?;
            run.restore = m;
            run.restore_result = r;
            if self.args.path == MeasuredPath::Job {
                // The same restore without the final fsync: what restic and
                // borg do (neither syncs the files it restores).
                let spec = self.step_spec(
                    self.restore_kind(run.chunk_size, &target, false),
                    &vm_uuid,
                    &vdi_uuid,
                    &repo,
                    "main",
                );
                let (m, _) = self.restore_runs(&spec, &target, &disk_in_src, " without fsync")?;
                run.unsynced_restore = Some(m);
            }
        }
        for (pr, run) in peer_repos.iter().zip(&mut peer_runs) {
            let target = self.work.join(format!("restored-{}", pr.peer.name()));
            let _ = std::fs::remove_dir_all(&target);
            eprintln!("{} restore", pr.peer.name());
            let mut runs = Vec::new();
            let mut durable = Vec::new();
            for _ in 0..self.args.runs {
                peers::evict_from_page_cache(&pr.repo)?;
                let m = pr
                    .restore_latest(&target)
                    .with_context(|| format!("{} restore", pr.peer.name()))?;
                let file = peers::only_file_under(&target)?;
                // What xenvault's restore does before it returns: the bytes
                // on disk. The peers leave that to the kernel.
                let fsync = peers::fsync_file(&file)?;
                eprintln!(
                    "  {:.2} s, {} MiB RSS; fsync of the restored file {:.2} s",
                    m.wall.as_secs_f64(),
                    m.max_rss >> 20,
                    fsync.as_secs_f64()
                );
                durable.push(m.wall + fsync);
                if !peers::same_bytes(&file, &disk_in_src)? {
                    bail!("{}'s restore differs from the disk", pr.peer.name());
                }
                std::fs::remove_dir_all(&target)?;
                runs.push(m);
            }
            run.restore = peers::fastest(runs);
            run.durable_restore = durable.into_iter().min().unwrap_or_default();
        }

        // Clones: one shared repository per layout, default (first) chunk size.
        let mut clone_runs = Vec::new();
        if let Some(first) = xv.first().filter(|_| self.args.clones > 0) {
            for layout in &self.args.clone_layouts {
                let repo = self.work.join(format!("xv-clones-{layout}"));
                init_repo(&repo, first.chunk_size).await?;
                let mut unique = 0u64;
                let mut time = Duration::ZERO;
                let mut max_rss = 0;
                let mut n = 0;
                let mine: Vec<_> = clone_vms.iter().filter(|(l, _, _)| l == layout).collect();
                for (i, (_, _, disk)) in mine.iter().enumerate() {
                    let blocks = clone_blocks(
                        layout,
                        total_blocks,
                        self.args.clone_unique_percent,
                        1000 + i as u64,
                    )?;
                    let body =
                        serde_json::json!({"vdi": disk, "seed": 1000 + i, "block_list": blocks});
                    self.control_post("guest-write", &body).await?;
                    unique += blocks.len() as u64 * BLOCK;
                    n += 1;
                }
                if self.args.path == MeasuredPath::Job {
                    // One run of a job selecting the layout's clones (VMs in parallel
                    // as the job's `concurrency` says).
                    let kind = StepKind::Job {
                        config: self.config_path(),
                        job: format!("clones-{layout}"),
                        expect_incremental: false,
                    };
                    let spec = self.step_spec(kind, "", "", &repo, "clones");
                    let (m, _) = self.run_step(&spec)?;
                    eprintln!(
                        "clones {layout}: {:.2} s, {} MiB RSS",
                        m.wall.as_secs_f64(),
                        m.max_rss >> 20
                    );
                    time += m.wall;
                    max_rss = max_rss.max(m.max_rss);
                } else {
                    for (i, (_, uuid, disk)) in mine.iter().enumerate() {
                        let spec =
                            self.step_spec(StepKind::Full, uuid, disk, &repo, &format!("c{i}"));
                        let (m, _) = self.run_step(&spec)?;
                        eprintln!(
                            "clone {layout} {i}: {:.2} s, {} MiB RSS",
                            m.wall.as_secs_f64(),
                            m.max_rss >> 20
                        );
                        time += m.wall;
                        max_rss = max_rss.max(m.max_rss);
                    }
                }
                clone_runs.push(CloneRun {
                    layout: layout.clone(),
                    clones: n,
                    one_vm: first.full_size,
                    unique,
                    stored: peers::dir_bytes(&repo),
                    time,
                    max_rss,
                });
                let _ = std::fs::remove_dir_all(&repo);
            }
        }

        let body = self.report(
            img,
            &written,
            total_blocks,
            &changed,
            &xv,
            &peer_runs,
            &clone_runs,
            started,
        );
        println!("{body}");
        if self.args.out != "-" {
            crate::write_section(&PathBuf::from(&self.args.out), &self.args.section, &body)?;
            eprintln!("wrote {}", self.args.out);
        }
        Ok(())
    }

    fn config_path(&self) -> PathBuf {
        self.work.join("xenvault.toml")
    }

    fn backup_kind(&self, chunk_size: u64, incremental: bool) -> StepKind {
        match (self.args.path, incremental) {
            (MeasuredPath::Direct, false) => StepKind::Full,
            (MeasuredPath::Direct, true) => StepKind::Incremental,
            (MeasuredPath::Job, _) => StepKind::Job {
                config: self.config_path(),
                job: format!("bench-{}k", chunk_size >> 10),
                expect_incremental: incremental,
            },
        }
    }

    fn restore_kind(&self, chunk_size: u64, target: &Path, sync: bool) -> StepKind {
        match self.args.path {
            MeasuredPath::Direct => StepKind::Restore {
                target: target.to_path_buf(),
            },
            MeasuredPath::Job => StepKind::JobRestore {
                config: self.config_path(),
                target_name: format!("xv-{}k", chunk_size >> 10),
                target: target.to_path_buf(),
                sync,
            },
        }
    }

    /// The configuration of the job path: the simulated pool, one repository
    /// target and job per chunk size (the benchmark VM), one per clone layout.
    fn write_config(&self, chunk_sizes: &[u64]) -> anyhow::Result<()> {
        let pw = self.work.join("pool.password");
        std::fs::write(&pw, format!("{}\n", self.sim.info.password))?;
        let rpw = self.work.join("repo.password");
        std::fs::write(&rpw, format!("{PASSWORD}\n"))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            for f in [&pw, &rpw] {
                std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600))?;
            }
        }
        let mut t = format!(
            "state-dir = \"{}\"\n\n[pools.sim]\nurl = \"{}\"\nuser = \"{}\"\npassword-file = \"{}\"\nfingerprint = \"{}\"\n",
            self.work.join("state").display(),
            self.sim.info.https_url,
            self.sim.info.user,
            pw.display(),
            self.sim.info.fingerprint,
        );
        let n = self.args.nbd_connections;
        for cs in chunk_sizes {
            let k = cs >> 10;
            t.push_str(&format!(
                "\n[targets.xv-{k}k]\ntype = \"repository\"\npath = \"{}\"\npassword-file = \"{}\"\n\n[jobs.bench-{k}k]\npool = \"sim\"\ntarget = \"xv-{k}k\"\nnames = [\"bench-vm\"]\nnbd-connections = {n}\n",
                self.work.join(format!("xv-{k}k")).display(),
                rpw.display(),
            ));
        }
        for layout in &self.args.clone_layouts {
            t.push_str(&format!(
                "\n[targets.clones-{layout}]\ntype = \"repository\"\npath = \"{}\"\npassword-file = \"{}\"\n\n[jobs.clones-{layout}]\npool = \"sim\"\ntarget = \"clones-{layout}\"\nregexes = [\"clone-{layout}-\"]\nnbd-connections = {n}\n",
                self.work.join(format!("xv-clones-{layout}")).display(),
                rpw.display(),
            ));
        }
        std::fs::write(self.config_path(), t)?;
        Ok(())
    }

    fn step_spec(
        &self,
        kind: StepKind,
        vm_uuid: &str,
        vdi_uuid: &str,
        repo: &Path,
        state: &str,
    ) -> StepSpec {
        StepSpec {
            kind,
            url: self.sim.info.url.clone(),
            fingerprint: self.sim.info.fingerprint.clone(),
            user: self.sim.info.user.clone(),
            password: self.sim.info.password.clone(),
            vm_uuid: vm_uuid.to_string(),
            vdi_uuid: vdi_uuid.to_string(),
            repo: repo.to_path_buf(),
            repo_password: PASSWORD.to_string(),
            state: repo.with_extension(format!("{state}.state.json")),
            nbd_connections: self.args.nbd_connections,
        }
    }

    /// Waits until the simulator's background coalescer (started by `VDI.destroy`, as
    /// SM's GC) is idle, so that it never overlaps the next measured operation.
    fn settle_sim(&self) {
        self.sim.pool.disks.wait_gc_idle();
    }

    /// Runs the restore step `spec` `--runs` times, each from a repository out
    /// of the page cache, each time checking the restored `target` against
    /// `disk` and removing it; returns the fastest
    /// run (with the largest peak memory) and its result.
    fn restore_runs(
        &self,
        spec: &StepSpec,
        target: &Path,
        disk: &Path,
        what: &str,
    ) -> anyhow::Result<(Measured, StepResult)> {
        let mut runs = Vec::new();
        for _ in 0..self.args.runs {
            peers::evict_from_page_cache(&spec.repo)?;
            let (m, r) = self.run_step(spec)?;
            eprintln!(
                " {what} {:.2} s, {} MiB RSS",
                m.wall.as_secs_f64(),
                m.max_rss >> 20
            );
            if !peers::same_bytes(target, disk)? {
                bail!("xenvault's restore{what} differs from the disk");
            }
            std::fs::remove_file(target)?;
            runs.push((m, r));
        }
        Ok(peers::fastest_with(runs))
    }

    fn run_step(&self, spec: &StepSpec) -> anyhow::Result<(Measured, StepResult)> {
        self.settle_sim();
        let json = serde_json::to_string(spec)?;
        let what = format!("xenvault step {:?} into {}", spec.kind, spec.repo.display());
        let m = peers::measure(
            &self.exe,
            &["repo-step".to_string(), json],
            &[],
            None,
            &self.work,
        )
        .context(what)?;
        let line = m
            .stdout
            .lines()
            .last()
            .ok_or_else(|| anyhow!("repo-step printed nothing"))?;
        let r: StepResult =
            serde_json::from_str(line).with_context(|| format!("repo-step printed {line:?}"))?;
        Ok((m, r))
    }

    async fn vm_by_name(&self, name: &str) -> anyhow::Result<(VmRef, String)> {
        for (r, vm) in self.session.vm().get_all_records().await? {
            if vm.name_label == name && vm.is_regular_vm() {
                return Ok((r, vm.uuid));
            }
        }
        bail!("the simulated pool has no VM {name}")
    }

    async fn vm_disk(&self, vm_ref: &VmRef) -> anyhow::Result<(String, u64)> {
        let vm = self.session.vm().get_record(vm_ref).await?;
        for vbd_ref in &vm.vbds {
            let vbd = self.session.vbd().get_record(vbd_ref).await?;
            if vbd.type_ == VbdType::Disk && !vbd.vdi.is_null() {
                let vdi = self.session.vdi().get_record(&vbd.vdi).await?;
                return Ok((vdi.uuid, u64::try_from(vdi.virtual_size)?));
            }
        }
        bail!("VM {} has no disk", vm.uuid)
    }

    fn base_url(&self) -> anyhow::Result<reqwest::Url> {
        reqwest::Url::parse(&self.sim.info.url).context("bad simulator URL")
    }

    async fn import_raw(&self, vdi_uuid: &str, image: &Path) -> anyhow::Result<()> {
        let url = handler_url(
            &self.base_url()?,
            "/import_raw_vdi",
            self.session.session_ref().expose(),
            None,
            &[("vdi", vdi_uuid), ("format", "raw")],
        );
        let file = tokio::fs::File::open(image).await?;
        let len = file.metadata().await?.len();
        self.transfer.put_reader(url, file, len).await?;
        Ok(())
    }

    /// Exports the disk as raw into `target`, keeping zero blocks as holes.
    async fn export_raw(&self, vdi_uuid: &str, size: u64, target: &Path) -> anyhow::Result<()> {
        use std::io::{Seek as _, SeekFrom, Write as _};
        let url = handler_url(
            &self.base_url()?,
            "/export_raw_vdi",
            self.session.session_ref().expose(),
            None,
            &[("vdi", vdi_uuid), ("format", "raw")],
        );
        let download = self.transfer.get(url).await?;
        let mut body = download.body;
        let mut file = std::fs::File::create(target)?;
        let mut buf: Vec<u8> = Vec::with_capacity(4 << 20);
        let mut at = 0u64;
        let mut flush = |buf: &mut Vec<u8>, at: &mut u64, all: bool| -> std::io::Result<()> {
            let n = if all {
                buf.len()
            } else {
                buf.len() / BLOCK as usize * BLOCK as usize
            };
            for piece in buf[..n].chunks(BLOCK as usize) {
                if !xenvault_types::extent::is_all_zero(piece) {
                    file.seek(SeekFrom::Start(*at))?;
                    file.write_all(piece)?;
                }
                *at += piece.len() as u64;
            }
            buf.drain(..n);
            Ok(())
        };
        while let Some(piece) = body.next().await {
            buf.extend_from_slice(&piece?);
            if buf.len() >= 4 << 20 {
                flush(&mut buf, &mut at, false)?;
            }
        }
        flush(&mut buf, &mut at, true)?;
        if at != size {
            bail!("the raw export gave {at} bytes, expected {size}");
        }
        let file = std::fs::OpenOptions::new().write(true).open(target)?;
        file.set_len(size)?;
        Ok(())
    }

    async fn control_post(
        &self,
        what: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        // curl: the control API is plain HTTP, and the bench needs no second client.
        let url = format!("{}/{what}", self.sim.info.control.trim_end_matches('/'));
        let body_file = self.work.join("control-body.json");
        std::fs::write(&body_file, serde_json::to_vec(body)?)?;
        let out = std::process::Command::new("curl")
            .args(["-sS", "-X", "POST", "--data-binary"])
            .arg(format!("@{}", body_file.display()))
            .arg(&url)
            .output()
            .context("cannot run curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || text.contains("\"error\"") {
            bail!("POST {url}: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_str(&text)?)
    }
}

async fn init_repo(dir: &Path, chunk_size: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let storage = Arc::new(LocalStorage::new(dir)?);
    Repository::init(
        storage,
        InitOptions {
            chunk_size: u32::try_from(chunk_size)?,
            zstd_level: 1,
            encryption: Some(EncryptionInit {
                password: PASSWORD.as_bytes().to_vec(),
                label: "bench".into(),
                cipher: CipherKind::Aes256Gcm,
                kdf: KdfParams::default(),
            }),
        },
    )
    .await?;
    Ok(())
}

/// `count` distinct items of `from` chosen with a seeded generator, sorted.
fn choose(from: &[u64], count: usize, seed: u64) -> Vec<u64> {
    let mut pool = from.to_vec();
    let mut rng = XorShift::new(seed);
    let count = count.min(pool.len());
    for i in 0..count {
        let j = i + (rng.next_u64() % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(count);
    pool.sort_unstable();
    pool
}

/// The 64 KiB blocks a clone's unique data goes to.
fn clone_blocks(layout: &str, total: u64, percent: f64, seed: u64) -> anyhow::Result<Vec<u64>> {
    let want = ((total as f64) * percent / 100.0).round() as usize;
    let mut rng = XorShift::new(seed);
    let mut set = std::collections::BTreeSet::new();
    match layout {
        "scattered" => {
            while set.len() < want {
                set.insert(rng.next_u64() % total);
            }
        }
        "runs" => {
            while set.len() < want {
                let start = rng.next_u64() % total.saturating_sub(16).max(1);
                for b in start..(start + 16).min(total) {
                    if set.len() < want {
                        set.insert(b);
                    }
                }
            }
        }
        other => bail!("unknown clone layout {other:?}: use runs or scattered"),
    }
    Ok(set.into_iter().collect())
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "**MISS**" }
}

impl Bench {
    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        img: &image::ImageInfo,
        written: &[u64],
        total_blocks: u64,
        changed: &[u64],
        xv: &[XvRun],
        peers: &[PeerRun],
        clones: &[CloneRun],
        started: Instant,
    ) -> String {
        let a = &self.args;
        let mut s = String::new();
        let cmdline: Vec<String> = std::env::args().skip(1).collect();
        if a.no_peers {
            s.push_str(&format!(
                "## Repository backup of a {:.0} GiB disk (xenvault alone)\n\n",
                a.disk_size as f64 / (1u64 << 30) as f64
            ));
        } else {
            s.push_str("## Repository backup against restic and borg\n\n");
        }
        s.push_str(&format!(
            "`cargo run --release -p xenvault-bench -- {}` (after `scripts/bench-deps.sh`), measured {} on this project's machine kind (2 vCPUs shared with other engineers' builds; load average {} at the end; {:.1} min in all). Every measured operation is a child process under `/usr/bin/time` (wall time from start to exit, peak RSS), started after a `sync` so that it does not pay for what earlier steps left to write (restic and borg do not sync). Full backups (each into a new repository) and restores run {} times for every tool: the table shows the fastest run, and the largest peak memory of the runs; incrementals run once. Each restore starts with its repository out of the page cache (`posix_fadvise(DONTNEED)` on every file of it, after a `sync`), as a restore long after the backup finds it.\n\n",
            cmdline.join(" "),
            crate::today(),
            load_average(),
            started.elapsed().as_secs_f64() / 60.0,
            a.runs,
        ));
        s.push_str(&format!(
            "- **Disk**: a {} GiB ext4 filesystem image (`mke2fs -t ext4 -d`) holding {} files from /usr ({}) and random files ({}); {} of its {} 64 KiB blocks ({:.1}%) hold data, the rest is zeros. It is imported into a simulated VM disk (`/import_raw_vdi`) with CBT enabled.\n",
            a.disk_size as f64 / (1u64 << 30) as f64,
            img.os_files,
            mib(img.os_bytes),
            mib(img.random_bytes),
            written.len(),
            total_blocks,
            written.len() as f64 * 100.0 / total_blocks.max(1) as f64,
        ));
        s.push_str(&format!(
            "- **xenvault**: reads a VDI snapshot from the simulator over NBD ({} connections; the full reads only the 2 MiB blocks allocated in the snapshot, from the block table of its VHD export, as the engine does, since xapi-nbd has no block status), CBT (`VDI.list_changed_blocks`) for the incremental, into an encrypted repository (AES-256-GCM, zstd-1, Argon2id key) on the local disk; restores write a sparse raw file. {}\n",
            a.nbd_connections,
            match a.path {
                MeasuredPath::Job => "Measured path: **the engine's repository job** (`xenvault_engine::job::run_job` with a repository target, as `xenvault backup JOB` runs it: VM snapshot, records, CBT or full read, commit, base snapshot kept; one job per chunk size) and `restore::repo::restore_repo_to_file` for restores.",
                MeasuredPath::Direct => "Measured path: **direct** (`--path direct`: `NbdMultiReader` → `xenvault_repo::DiskWriter`, the per-disk core of the repository job, with a VDI snapshot but without the job's VM snapshot, records and report).",
            }
        ));
        if !peers.is_empty() {
            s.push_str(&format!(
                "- **Peers**: {} and {} back up the raw export of the same disk (a sparse file of {} GiB; they read every byte, zeros included, as they read any image file): restic with its defaults (encrypted, repository v2 with zstd); borg `init -e repokey-blake2`, `create -C zstd,1 --chunker-params fixed,4194304` (borg's advice for disk images). Restores: `restic restore` (0.14 has no `--sparse`: it writes the zeros), `borg extract --sparse`; neither fsyncs the files it restores (checked with `strace`: restic syncs only its lock file), while xenvault's restore fsyncs the file before renaming it into place, so the table shows xenvault's restore both ways. All restores are compared with the disk byte for byte.\n",
                tool_version("restic", &["version"]),
                tool_version("borg", &["--version"]),
                a.disk_size as f64 / (1u64 << 30) as f64,
            ));
        }
        s.push_str(&format!(
            "- **Change before the incremental**: {} blocks of 64 KiB = {}% of the disk's {} blocks, chosen uniformly at random among the {} written blocks ({:.1}% of them), rewritten with new random data by `POST /_sim/guest-write` with `block_list`. CBT reports exactly these blocks.\n\n",
            changed.len(),
            a.change_percent,
            total_blocks,
            written.len(),
            changed.len() as f64 * 100.0 / written.len().max(1) as f64,
        ));

        if let Some(x) = xv.first() {
            let restic = peers.iter().find(|p| p.name == "restic");
            let borg = peers.iter().find(|p| p.name == "borg");
            let cell =
                |p: Option<&PeerRun>, f: &dyn Fn(&PeerRun) -> String| p.map_or("–".to_string(), f);
            let speedup =
                |p: Option<&PeerRun>, f: &dyn Fn(&PeerRun) -> Duration, mine: Duration| {
                    p.map(|p| f(p).as_secs_f64() / mine.as_secs_f64().max(1e-9))
                };
            let fmt_x = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}× faster"));
            s.push_str(&format!(
                "| measure | xenvault ({} KiB chunks) | restic | borg | xenvault vs restic | xenvault vs borg | goal | verdict |\n|---|---:|---:|---:|---:|---:|---|---|\n",
                x.chunk_size >> 10
            ));
            // Full.
            let fr = speedup(restic, &|p| p.full.wall, x.full.wall);
            let fb = speedup(borg, &|p| p.full.wall, x.full.wall);
            let full_ok = fr.is_some_and(|v| v >= 2.5) && fb.is_some_and(|v| v >= 2.5);
            s.push_str(&format!(
                "| full backup | {} | {} | {} | {} | {} | ≥ 2.5× faster than both | {} |\n",
                secs(x.full.wall),
                cell(restic, &|p| secs(p.full.wall)),
                cell(borg, &|p| secs(p.full.wall)),
                fmt_x(fr),
                fmt_x(fb),
                if peers.is_empty() {
                    "–"
                } else {
                    verdict(full_ok)
                },
            ));
            // Incremental.
            let share = x.incr.wall.as_secs_f64() / x.full.wall.as_secs_f64().max(1e-9) * 100.0;
            s.push_str(&format!(
                "| incremental after the change | {} ({:.1}% of the full) | {} | {} | {} | {} | ≤ 5% of xenvault's full | {} |\n",
                secs(x.incr.wall),
                share,
                cell(restic, &|p| secs(p.incr.wall)),
                cell(borg, &|p| secs(p.incr.wall)),
                fmt_x(speedup(restic, &|p| p.incr.wall, x.incr.wall)),
                fmt_x(speedup(borg, &|p| p.incr.wall, x.incr.wall)),
                verdict(share <= 5.0),
            ));
            // Restore.
            let rr = speedup(restic, &|p| p.restore.wall, x.restore.wall);
            s.push_str(&format!(
                "| restore of the incremental to a raw file (xenvault fsyncs it; restic and borg leave it in the page cache) | {} | {} | {} | {} | {} | ≥ 2× faster than restic | {} |\n",
                secs(x.restore.wall),
                cell(restic, &|p| secs(p.restore.wall)),
                cell(borg, &|p| secs(p.restore.wall)),
                fmt_x(rr),
                fmt_x(speedup(borg, &|p| p.restore.wall, x.restore.wall)),
                if restic.is_none() { "–" } else { verdict(rr.is_some_and(|v| v >= 2.0)) },
            ));
            let dr = speedup(restic, &|p| p.durable_restore, x.restore.wall);
            s.push_str(&format!(
                "| the same restore, each tool's file on disk at the end (restic and borg timed with an fsync of the file they restored) | {} | {} | {} | {} | {} | ≥ 2× faster than restic | {} |\n",
                secs(x.restore.wall),
                cell(restic, &|p| secs(p.durable_restore)),
                cell(borg, &|p| secs(p.durable_restore)),
                fmt_x(dr),
                fmt_x(speedup(borg, &|p| p.durable_restore, x.restore.wall)),
                if restic.is_none() { "–" } else { verdict(dr.is_some_and(|v| v >= 2.0)) },
            ));
            if let Some(r) = &x.unsynced_restore {
                let rr = speedup(restic, &|p| p.restore.wall, r.wall);
                s.push_str(&format!(
                    "| the same restore without fsync (`FileRestoreOptions.sync = false`), as restic and borg restore | {} | | | {} | {} | ≥ 2× faster than restic | {} |\n",
                    secs(r.wall),
                    fmt_x(rr),
                    fmt_x(speedup(borg, &|p| p.restore.wall, r.wall)),
                    if restic.is_none() { "–" } else { verdict(rr.is_some_and(|v| v >= 2.0)) },
                ));
            }
            // Sizes.
            let ratio = |mine: u64, p: Option<&PeerRun>, f: &dyn Fn(&PeerRun) -> u64| {
                p.map_or("–".to_string(), |p| {
                    format!("{:.2}× the size", mine as f64 / f(p).max(1) as f64)
                })
            };
            s.push_str(&format!(
                "| repository after the full | {} | {} | {} | {} | {} | – | |\n",
                mib(x.full_size),
                cell(restic, &|p| mib(p.full_size)),
                cell(borg, &|p| mib(p.full_size)),
                ratio(x.full_size, restic, &|p| p.full_size),
                ratio(x.full_size, borg, &|p| p.full_size),
            ));
            s.push_str(&format!(
                "| repository growth by the incremental | {} | {} | {} | {} | {} | – | |\n",
                mib(x.incr_size.saturating_sub(x.full_size)),
                cell(restic, &|p| mib(p.incr_size.saturating_sub(p.full_size))),
                cell(borg, &|p| mib(p.incr_size.saturating_sub(p.full_size))),
                ratio(x.incr_size.saturating_sub(x.full_size), restic, &|p| p
                    .incr_size
                    .saturating_sub(p.full_size)),
                ratio(x.incr_size.saturating_sub(x.full_size), borg, &|p| p
                    .incr_size
                    .saturating_sub(p.full_size)),
            ));
            // CPU.
            let cpu3 = |f: &Measured, i: &Measured, r: &Measured| {
                format!(
                    "{:.1} / {:.1} / {:.1} s",
                    f.cpu.as_secs_f64(),
                    i.cpu.as_secs_f64(),
                    r.cpu.as_secs_f64()
                )
            };
            s.push_str(&format!(
                "| CPU time, user + system (full / incremental / restore) | {} | {} | {} | | | – | |\n",
                cpu3(&x.full, &x.incr, &x.restore),
                cell(restic, &|p| cpu3(&p.full, &p.incr, &p.restore)),
                cell(borg, &|p| cpu3(&p.full, &p.incr, &p.restore)),
            ));
            // Memory.
            let peak =
                |f: &Measured, i: &Measured, r: &Measured| f.max_rss.max(i.max_rss).max(r.max_rss);
            let xpeak = peak(&x.full, &x.incr, &x.restore);
            let is16 = a.disk_size >= 16 << 30;
            s.push_str(&format!(
                "| peak memory (max of full, incremental, restore) | {} | {} | {} | {} | {} | < 256 MiB for a 16 GiB disk | {} |\n\n",
                mib(xpeak),
                cell(restic, &|p| mib(peak(&p.full, &p.incr, &p.restore))),
                cell(borg, &|p| mib(peak(&p.full, &p.incr, &p.restore))),
                ratio(xpeak, restic, &|p| peak(&p.full, &p.incr, &p.restore)),
                ratio(xpeak, borg, &|p| peak(&p.full, &p.incr, &p.restore)),
                if is16 {
                    verdict(xpeak < 256 << 20).to_string()
                } else {
                    format!("{} on this {:.0} GiB disk; the goal's 16 GiB disk: `--disk-size 16G`", if xpeak < 256 << 20 { "under" } else { "**over**" }, a.disk_size as f64 / (1u64 << 30) as f64)
                },
            ));
            s.push_str(&format!(
                "xenvault read {} from the simulator for the full backup and {} for the incremental ({} chunks of {} KiB stored by the incremental, method {}).",
                mib(x.full_result.bytes),
                mib(x.incr_result.bytes),
                x.incr_result.new_chunks,
                x.chunk_size >> 10,
                x.incr_result.method.as_deref().unwrap_or("?"),
            ));
            if a.path == MeasuredPath::Direct {
                s.push_str(&format!(
                    " Where xenvault's time goes (seconds: opening the repository with its Argon2id key derivation / login, snapshot, allocation map or CBT list, NBD connections / reading, chunking, storing, committing): full {:.2} / {:.2} / {:.2}; incremental {:.2} / {:.2} / {:.2}; restore {:.2} / – / {:.2}; the rest of the wall time is process start and exit.",
                    x.full_result.open_secs,
                    x.full_result.prepare_secs,
                    x.full_result.data_secs,
                    x.incr_result.open_secs,
                    x.incr_result.prepare_secs,
                    x.incr_result.data_secs,
                    x.restore_result.open_secs,
                    x.restore_result.data_secs,
                ));
            } else {
                s.push_str(&format!(
                    " Inside the child processes: the full job took {:.2} s, the incremental job {:.2} s; the restore {:.2} s to open the repository (Argon2id) and {:.2} s to write the file; the rest of the wall time is process start, configuration loading and exit.",
                    x.full_result.data_secs,
                    x.incr_result.data_secs,
                    x.restore_result.open_secs,
                    x.restore_result.data_secs,
                ));
            }
            s.push_str("\n\n");
        }

        // Chunk sizes.
        if xv.len() > 1 || !xv.is_empty() {
            let p = changed.len() as f64 / written.len().max(1) as f64;
            s.push_str("### Chunk size and the incremental (data for the default's choice)\n\n");
            s.push_str("| chunk | full backup | incremental | incremental ÷ full | chunks written by the incremental | of which new | repository growth | restore | peak memory |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for x in xv {
                s.push_str(&format!(
                    "| {} KiB | {} | {} | {:.1}% | {} of {} | {} | {} | {} | {} |\n",
                    x.chunk_size >> 10,
                    secs(x.full.wall),
                    secs(x.incr.wall),
                    x.incr.wall.as_secs_f64() / x.full.wall.as_secs_f64().max(1e-9) * 100.0,
                    x.incr_result.processed_chunks,
                    a.disk_size.div_ceil(x.chunk_size),
                    x.incr_result.new_chunks,
                    mib(x.incr_size.saturating_sub(x.full_size)),
                    secs(x.restore.wall),
                    mib(x.full.max_rss.max(x.incr.max_rss).max(x.restore.max_rss)),
                ));
            }
            s.push_str(&format!(
                "\nWith a share p = {:.2}% of the written 64 KiB blocks changed at random, a written chunk of k blocks is rewritten with probability 1 − (1 − p)^k: {}.\n\n",
                p * 100.0,
                xv.iter()
                    .map(|x| {
                        let k = (x.chunk_size / BLOCK) as i32;
                        format!("{:.0}% at {} KiB", (1.0 - (1.0 - p).powi(k)) * 100.0, x.chunk_size >> 10)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }

        // Clones.
        if !clones.is_empty() {
            s.push_str(&format!(
                "### {} VMs cloned from one template\n\n`VM.clone` of the benchmark VM before the change (copy-on-write disks), then {}% of each clone's 64 KiB blocks written with data unique to it (`guest-write`): `runs` = runs of 16 blocks (1 MiB, like files) at random 64 KiB offsets; `scattered` = single blocks at random. All clones are backed up in full into one new repository ({} KiB chunks); \"one VM\" is the repository after the template's full backup above; \"unique\" is the raw bytes written into the clones.\n\n",
                clones.first().map_or(0, |c| c.clones),
                a.clone_unique_percent,
                xv.first().map_or(0, |x| x.chunk_size >> 10),
            ));
            s.push_str("| layout | clones | one VM stored | unique data | clones' repository | ÷ (one VM + unique) | goal | verdict | backup time (all clones) | peak memory |\n|---|---:|---:|---:|---:|---:|---|---|---:|---:|\n");
            for c in clones {
                let r = c.stored as f64 / (c.one_vm + c.unique).max(1) as f64;
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {:.2} | ≤ 1.2 | {} | {} | {} |\n",
                    c.layout,
                    c.clones,
                    mib(c.one_vm),
                    mib(c.unique),
                    mib(c.stored),
                    r,
                    verdict(r <= 1.2),
                    secs(c.time),
                    mib(c.max_rss),
                ));
            }
            s.push('\n');
        }
        s
    }
}

fn free_space(dir: &Path) -> String {
    std::process::Command::new("df")
        .args(["-h", "--output=avail"])
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| format!("{} free", l.trim()))
        })
        .unwrap_or_default()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn tool_version(tool: &str, args: &[&str]) -> String {
    std::process::Command::new(tool)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let t = String::from_utf8_lossy(&o.stdout);
            let words: Vec<&str> = t.split_whitespace().take(2).collect();
            words.join(" ")
        })
        .unwrap_or_else(|| tool.to_string())
}
