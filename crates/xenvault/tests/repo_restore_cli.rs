//! Repository restores into pools through the real binary: `xenvault backup`
//! writes a full and an incremental restore point of a `xapi-sim` VM into an
//! encrypted repository whose password comes from the environment, then
//! `xenvault restore` brings them back as a whole VM (rebuilt XVA, and VDIs
//! into another pool's SR), as one disk into a new VDI and into the live
//! VDI (only the chunks that differ), each compared with the pool's disk at
//! backup time. A wrong password is a usage error that says so.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod restore_support;

use restore_support::{
    SimProc, raw_sha, vm_by_name, vm_disks, write_config, xenvault_env, xenvault_env_json,
};

const PW_VAR: &str = "XENVAULT_TEST_REPO_PASSWORD";
const PW: &str = "repo-cli-password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_restore_points_restore_into_pools_through_the_binary() {
    let sim = SimProc::spawn(&["--vms", "1", "--disk-size", "8M", "--written", "30%"]);
    let other = SimProc::spawn(&["--vms", "1", "--disk-size", "4M"]);
    let pool = sim.connect().await;
    let other_pool = other.connect().await;
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let config = write_config(work.path(), &[&sim, &other], &work.path().join("archive"));
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[targets.vault]\ntype = \"repository\"\npath = \"{}\"\npassword-env = \"{PW_VAR}\"\n\n\
         [jobs.forever]\npools = [\"first\"]\ntarget = \"vault\"\nnames = [\"vm-01\"]\n",
        repo.display()
    ));
    std::fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap();
    let env = [(PW_VAR, PW)];
    let ok = |args: &[&str]| xenvault_env_json(args, &env);

    ok(&[
        "repo",
        "init",
        "--config",
        config,
        "--target",
        "vault",
        "--encrypt",
        "--json",
    ]);
    let (vm, _) = vm_by_name(&pool.session, "vm-01").await;
    let live = vm_disks(&pool.session, &vm).await["0"].1.uuid.clone();
    let (sha_first, _) = raw_sha(&pool, &live).await;
    ok(&["backup", "forever", "--config", config, "--json"]);
    sim.control(
        "POST",
        "/_sim/guest-write",
        serde_json::json!({"vdi": live, "seed": 5, "blocks": 3}),
    )
    .await;
    let (sha_second, _) = raw_sha(&pool, &live).await;
    assert_ne!(sha_first, sha_second);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    ok(&["backup", "forever", "--config", config, "--json"]);
    let listed = ok(&["list", "forever", "--config", config, "--json"]);
    let points = listed.as_array().unwrap();
    assert_eq!(points.len(), 2, "{listed}");
    let ids: Vec<String> = points
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    let first = ids.iter().min().unwrap().clone();

    // The whole VM from the first point, as a rebuilt XVA.
    let restored = ok(&[
        "restore", "forever", "--config", config, "--vm", "vm-01", "--at", &first, "--json",
    ]);
    let disk = restored["disks"][0]["vdi_uuid"].as_str().unwrap();
    assert_eq!(raw_sha(&pool, disk).await.0, sha_first, "{restored}");

    // The newest, as VDIs, into the other pool on a chosen SR.
    let (_, pool_rec) = other_pool.session.pool_record().await.unwrap();
    let sr = other_pool
        .session
        .sr()
        .get_record(&pool_rec.default_sr)
        .await
        .unwrap()
        .uuid;
    let restored = ok(&[
        "restore", "forever", "--config", config, "--vm", "vm-01", "--method", "vdis", "--pool",
        "second", "--sr", &sr, "--json",
    ]);
    assert_eq!(restored["sr_uuid"], sr.as_str(), "{restored}");
    let disk = restored["disks"][0]["vdi_uuid"].as_str().unwrap();
    assert_eq!(raw_sha(&other_pool, disk).await.0, sha_second, "{restored}");

    // The newest disk into a new VDI.
    let restored = ok(&[
        "restore", "forever", "--config", config, "--vm", "vm-01", "--disk", "0", "--json",
    ]);
    let disk = restored["vdi_uuid"].as_str().unwrap();
    assert_eq!(raw_sha(&pool, disk).await.0, sha_second, "{restored}");

    // The first point's disk back into the live VDI (its VM halted):
    // only the chunks the guest changed are sent.
    let rec = pool.session.vm().get_record(&vm).await.unwrap();
    if rec.power_state != xenvault_xapi::records::PowerState::Halted {
        pool.session.vm().hard_shutdown(&vm).await.unwrap();
    }
    let restored = ok(&[
        "restore",
        "forever",
        "--config",
        config,
        "--vm",
        "vm-01",
        "--at",
        &first,
        "--disk",
        "0",
        "--into-vdi",
        &live,
        "--json",
    ]);
    let written = restored["chunks_written"].as_u64().unwrap();
    let compared = restored["chunks_compared"].as_u64().unwrap();
    assert!(
        (1..=3).contains(&written) && written < compared,
        "{restored}"
    );
    assert_eq!(raw_sha(&pool, &live).await.0, sha_first);

    // A wrong password: exit 2, and the message says what is wrong.
    let (code, _, stderr) = xenvault_env(
        &[
            "restore", "forever", "--config", config, "--vm", "vm-01", "--disk", "0",
        ],
        &[(PW_VAR, "not the password")],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.to_lowercase().contains("password"), "{stderr}");
}
