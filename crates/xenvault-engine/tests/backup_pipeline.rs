//! The backup run (engine level) against a real `xapi-sim` process: XVA and
//! per-disk backups land in the archive, nothing temporary stays on the pool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup_support;

use backup_support::{Sim, write_config};
use xenvault_engine::job::{self, ExitStatus, RunOptions};
use xenvault_types::report::Outcome;
use xenvault_xapi::session::{Client, Credentials, Session};
use xenvault_xapi::tls::TlsPolicy;

async fn session(sim: &Sim) -> Session {
    Client::connect(
        &sim.s("https_url"),
        Credentials::new(sim.s("user"), sim.s("password")),
        TlsPolicy::Pinned(sim.s("fingerprint").parse().unwrap()),
    )
    .await
    .unwrap()
}

/// (snapshot VMs, snapshot VDIs) on the pool.
async fn temporaries(s: &Session) -> (usize, usize) {
    let vms = s.vm().get_all_records().await.unwrap();
    let vdis = s.vdi().get_all_records().await.unwrap();
    (
        vms.values().filter(|v| v.is_a_snapshot).count(),
        vdis.values().filter(|v| v.is_a_snapshot).count(),
    )
}

fn complete_points(archive: &std::path::Path) -> usize {
    xenvault_engine::archive::list(archive)
        .unwrap()
        .iter()
        .filter(|p| p.is_complete())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xva_and_disk_backups_end_in_the_archive_and_leave_nothing_on_the_pool() {
    let sim = Sim::start(&["--vms", "2", "--disk-size", "4M", "--written", "20%"]);
    let dir = tempfile::tempdir().unwrap();
    for (mode, files) in [("xva", "vm.xva"), ("vhd", ".vhd"), ("raw", ".raw")] {
        let cfg_path = write_config(
            &sim,
            dir.path(),
            &format!("all-vms = true\nmode = \"{mode}\""),
            "",
        );
        let config = xenvault_engine::config::load(&cfg_path).unwrap();
        let t0 = std::time::Instant::now();
        let run = job::run_job(&config, "nightly", RunOptions::default())
            .await
            .unwrap();
        for vm in &run.report.vms {
            assert_eq!(vm.outcome, Outcome::Succeeded, "{mode}: {vm:?}");
            let loc = vm.location.clone().unwrap();
            let names: Vec<String> = std::fs::read_dir(&loc)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(names.iter().any(|n| n.contains(files)), "{mode}: {names:?}");
        }
        eprintln!("{mode}: {:?}", t0.elapsed());
        for vm in &run.report.vms {
            eprintln!("  {} {:?}", vm.name, vm.duration());
        }
        assert_eq!(run.report.vms.len(), 2, "{mode}: {:?}", run.report);
        assert_eq!(run.exit, ExitStatus::Success, "{mode}: {:?}", run.report);
        let s = session(&sim).await;
        assert_eq!(temporaries(&s).await, (0, 0), "{mode}");
    }
    assert_eq!(complete_points(&dir.path().join("archive")), 6);
}
