//! Test support for the incremental repository backup tests: a simulator
//! started from a scenario, a repository job configuration, and helpers to
//! read the live disk, restore a disk from the repository and read the
//! simulator's NBD counters.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt as _;
use xenvault_engine::job::{self, RunOptions};
use xenvault_repo::storage::LocalStorage;
use xenvault_repo::{InitOptions, Manifest, Repository};
use xenvault_types::ExtentData;
use xenvault_types::report::{DiskReadReport, RunReport, VmReport};
use xenvault_xapi::http::{HttpTransfer, TransferOptions, handler_url};
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::tls::TlsPolicy;

#[path = "../backup_support/mod.rs"]
pub mod backup_support;
pub use backup_support::Sim;

/// One VM `web01`, halted, with one disk (CBT on or off), 25% written, on
/// a pool whose network has purpose `insecure_nbd`.
pub fn scenario(cbt: bool, disk_size: &str) -> String {
    scenario_with_nbd(cbt, disk_size, true)
}

/// [`scenario`], with or without a network of purpose `insecure_nbd`
/// (without: `VDI.get_nbd_info` answers `[]`, NBD is unreachable).
pub fn scenario_with_nbd(cbt: bool, disk_size: &str, nbd: bool) -> String {
    let purpose = if nbd { r#"["insecure_nbd"]"# } else { "[]" };
    format!(
        r#"[pool]
name = "lab"
seed = 7

[[networks]]
name = "Pool-wide network"
purpose = {purpose}

[[vms]]
name = "web01"
[[vms.disks]]
size = "{disk_size}"
written = "25%"
cbt = {cbt}
"#
    )
}

/// A simulator, a state directory, a repository and a job `nightly`.
pub struct Fixture {
    pub sim: Sim,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub session: Session,
}

impl Fixture {
    /// Starts the simulator with `scenario` (and extra `sim_args`), inits a
    /// plain repository, writes a configuration whose job has `job_lines`.
    pub async fn start(scenario: &str, sim_args: &[&str], job_lines: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let scenario_path = dir.path().join("scenario.toml");
        std::fs::write(&scenario_path, scenario).unwrap();
        let mut args = vec!["--scenario", scenario_path.to_str().unwrap()];
        args.extend_from_slice(sim_args);
        let sim = Sim::start(&args);
        let repo_dir = dir.path().join("repo");
        std::fs::create_dir_all(&repo_dir).unwrap();
        Repository::init(
            Arc::new(LocalStorage::new(&repo_dir).unwrap()),
            InitOptions::default(),
        )
        .await
        .unwrap();
        let config = write_repo_config(&sim, dir.path(), job_lines);
        let session = Client::connect(
            &sim.s("https_url"),
            Credentials::new(sim.s("user"), sim.s("password")),
            TlsPolicy::Pinned(sim.s("fingerprint").parse().unwrap()),
        )
        .await
        .unwrap();
        Fixture {
            sim,
            dir,
            config,
            session,
        }
    }

    /// Rewrites the job's lines.
    pub fn set_job_lines(&mut self, job_lines: &str) {
        self.config = write_repo_config(&self.sim, self.dir.path(), job_lines);
    }

    /// Runs the job; returns the report.
    pub async fn run(&self) -> RunReport {
        let config = xenvault_engine::config::load(&self.config).unwrap();
        let t0 = std::time::Instant::now();
        let report = job::run_job(&config, "nightly", RunOptions::default())
            .await
            .unwrap()
            .report;
        eprintln!("run took {:?}", t0.elapsed());
        report
    }

    /// Opens the repository.
    /// The bytes an incremental reads over NBD after guest writes to
    /// `blocks` (64 KiB) of disk `key`, on top of restore point `parent`:
    /// whole chunks where the parent chunk holds data (ADR 0009), only the
    /// changed blocks where it is the zero chunk.
    pub async fn cbt_read_bytes(&self, parent: &Manifest, key: &str, blocks: &[u64]) -> u64 {
        const BLOCK: u64 = 64 * 1024;
        let repo = self.repo().await;
        let entry = parent.disk(key).unwrap();
        let index = repo.load_index(&entry.index).await.unwrap();
        let cs = u64::from(index.chunk_size);
        let mut whole = std::collections::BTreeSet::new();
        let mut bytes = 0;
        let mut seen = std::collections::BTreeSet::new();
        for &b in blocks {
            if !seen.insert(b) {
                continue;
            }
            let chunk = b * BLOCK / cs;
            if index.ids[chunk as usize].is_zero() {
                bytes += BLOCK.min(entry.size - b * BLOCK);
            } else if whole.insert(chunk) {
                let (_, len) = index.chunk_range(chunk);
                bytes += len;
            }
        }
        bytes
    }

    pub async fn repo(&self) -> Repository {
        Repository::open(
            Arc::new(LocalStorage::new(self.dir.path().join("repo")).unwrap()),
            None,
        )
        .await
        .unwrap()
    }

    /// The VM `web01`: (uuid, its disk's VDI uuid).
    pub async fn vm(&self) -> (String, String) {
        let vms = self.session.vm().get_all_records().await.unwrap();
        let (_, vm) = vms
            .iter()
            .find(|(_, v)| v.name_label == "web01" && !v.is_a_snapshot)
            .unwrap();
        let vbd = self.session.vbd().get_record(&vm.vbds[0]).await.unwrap();
        let vdi = self.session.vdi().get_record(&vbd.vdi).await.unwrap();
        (vm.uuid.clone(), vdi.uuid)
    }

    /// Zeroes the simulator's counters.
    pub fn reset_stats(&self) {
        self.sim.control("stats/reset", &serde_json::json!({}));
    }

    /// Bytes the simulator's NBD servers sent since the last reset.
    pub fn nbd_bytes(&self) -> u64 {
        let stats = self.sim.control_get("stats");
        stats["nbd"]["bytes"].as_u64().unwrap_or(0)
    }

    /// Writes 64 KiB blocks of `vdi` (guest writes, tracked by CBT).
    pub fn guest_write(&self, vdi: &str, seed: u64, blocks: &[u64]) {
        self.sim.control(
            "guest-write",
            &serde_json::json!({"vdi": vdi, "seed": seed, "block_list": blocks}),
        );
    }

    /// The live disk's bytes (`/export_raw_vdi?format=raw`).
    pub async fn live_disk(&self, vdi_uuid: &str) -> Vec<u8> {
        let transfer =
            HttpTransfer::with_client(self.session.http_client(), TransferOptions::default());
        let url = handler_url(
            &self.session.base_url(),
            "/export_raw_vdi",
            self.session.session_ref().expose(),
            None,
            &[("vdi", vdi_uuid), ("format", "raw")],
        );
        let mut body = transfer.get(url).await.unwrap().body;
        let mut out = Vec::new();
        while let Some(piece) = body.next().await {
            out.extend_from_slice(&piece.unwrap());
        }
        out
    }

    /// Every restore point of the VM, oldest first.
    pub async fn points(&self, vm_uuid: &str) -> Vec<Manifest> {
        let repo = self.repo().await;
        let mut out = Vec::new();
        for (vm, id) in repo.list_restore_points(Some(vm_uuid)).await.unwrap() {
            out.push(repo.load_manifest(&vm, &id).await.unwrap());
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The disk `key` of a restore point, read back whole.
    pub async fn restore(&self, manifest: &Manifest, key: &str) -> Vec<u8> {
        let repo = self.repo().await;
        let size = manifest.disk(key).unwrap().size as usize;
        let mut out = vec![0u8; size];
        let mut reader = repo.read_disk(manifest, key, 2).await.unwrap();
        while let Some(e) = reader.next_extent().await {
            let e = e.unwrap();
            if let ExtentData::Data(d) = &e.data {
                let at = e.offset as usize;
                out[at..at + d.len()].copy_from_slice(d);
            }
        }
        out
    }

    /// Snapshot VMs and snapshot VDIs on the pool.
    pub async fn snapshots(&self) -> (usize, usize) {
        let vms = self.session.vm().get_all_records().await.unwrap();
        let vdis = self.session.vdi().get_all_records().await.unwrap();
        (
            vms.values().filter(|v| v.is_a_snapshot).count(),
            vdis.values().filter(|v| v.is_a_snapshot).count(),
        )
    }
}

/// The VM's report of `web01`, asserting success.
pub fn vm_report(report: &RunReport) -> &VmReport {
    let vm = report
        .vms
        .iter()
        .find(|v| v.name == "web01")
        .unwrap_or_else(|| panic!("no web01 in {report:#?}"));
    assert!(
        vm.outcome == xenvault_types::report::Outcome::Succeeded,
        "web01 failed: {:#?}\nproblems: {:?}",
        vm,
        report.problems
    );
    vm
}

/// The (only) disk report of `web01`.
pub fn disk_report(report: &RunReport) -> DiskReadReport {
    let vm = vm_report(report);
    let repo = vm
        .repository
        .as_ref()
        .unwrap_or_else(|| panic!("no repository stats: {vm:#?}"));
    assert_eq!(repo.disks.len(), 1, "{repo:#?}");
    repo.disks[0].clone()
}

/// Writes a configuration: pool `sim`, repository target `repo` at
/// `<dir>/repo`, job `nightly` backing up `web01` with `job_lines`.
pub fn write_repo_config(sim: &Sim, dir: &Path, job_lines: &str) -> PathBuf {
    let pw = dir.join("pool.password");
    std::fs::write(&pw, format!("{}\n", sim.s("password"))).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let text = format!(
        r#"state-dir = "{state}"

[pools.sim]
url = "{url}"
user = "{user}"
password-file = "{pw}"
fingerprint = "{fp}"

[targets.repo]
type = "repository"
path = "{repo}"

[jobs.nightly]
pool = "sim"
target = "repo"
all-vms = true
{job_lines}
"#,
        state = dir.join("state").display(),
        url = sim.s("https_url"),
        user = sim.s("user"),
        pw = pw.display(),
        fp = sim.s("fingerprint"),
        repo = dir.join("repo").display(),
    );
    let path = dir.join("xenvault.toml");
    std::fs::write(&path, text).unwrap();
    path
}
