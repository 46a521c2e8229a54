//! `xenvault backup` end to end (real binary, real `xapi-sim` process):
//! retention over N+2 runs, failed runs never counted and removed later,
//! the run log and JSON report on the target, exit codes, `plan` output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup_support;

use std::time::Duration;

use backup_support::{PoolCheck, Sim, backup, plan, points_of, vm_entry, write_config, xenvault};

#[test]
fn after_n_plus_2_runs_each_vm_has_n_complete_backups() {
    let sim = Sim::start(&["--vms", "2", "--disk-size", "4M", "--written", "20%"]);
    let pool = PoolCheck::new(&sim);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let cfg = write_config(
        &sim,
        dir.path(),
        "all-vms = true\n[jobs.nightly.retention]\nkeep-last = 2",
        "",
    );
    for run in 0..4 {
        let out = backup(&cfg);
        assert_eq!(out.code, 0, "run {run}: {out:?}");
        let report = out.json();
        for vm in ["vm-01", "vm-02"] {
            assert_eq!(
                vm_entry(&report, vm)["outcome"]["status"],
                "succeeded",
                "{out:?}"
            );
        }
        assert_eq!(pool.temporaries(), (0, 0), "run {run}");
        std::thread::sleep(Duration::from_millis(1100)); // distinct timestamps
    }
    for vm in ["vm-01", "vm-02"] {
        assert_eq!(points_of(&archive, vm), (2, 0), "{vm}");
    }

    // An export cut mid-stream: that VM fails (exit 3 = partial), nothing of
    // it counts, and the next run leaves no remains.
    sim.cut_stream("export", 1_500_000);
    let out = backup(&cfg);
    assert_eq!(out.code, 3, "{out:?}");
    let report = out.json();
    let failed: Vec<&serde_json::Value> = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["outcome"]["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{out:?}");
    assert!(
        failed[0]["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("export stream"),
        "{out:?}"
    );
    for vm in ["vm-01", "vm-02"] {
        assert_eq!(points_of(&archive, vm).0, 2, "{vm}");
    }
    assert_eq!(pool.temporaries(), (0, 0));
    std::thread::sleep(Duration::from_millis(1100));
    let out = backup(&cfg);
    assert_eq!(out.code, 0, "{out:?}");
    for vm in ["vm-01", "vm-02"] {
        assert_eq!(points_of(&archive, vm), (2, 0), "{vm}");
    }

    // The run log and the JSON report are on the target, with per-VM lines.
    let logs: Vec<std::path::PathBuf> = std::fs::read_dir(archive.join("_logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        logs.iter()
            .filter(|p| p.extension().unwrap() == "log")
            .count(),
        6
    );
    assert_eq!(
        logs.iter()
            .filter(|p| p.extension().unwrap() == "json")
            .count(),
        6
    );
    let newest = logs
        .iter()
        .filter(|p| p.extension().unwrap() == "log")
        .max()
        .unwrap();
    let text = std::fs::read_to_string(newest).unwrap();
    assert!(text.contains("vm-01") && text.contains("vm-02"), "{text}");
}

#[test]
fn plan_shows_what_will_run_and_why_others_will_not() {
    let sim = Sim::start(&["--vms", "3", "--disk-size", "4M"]);
    let pool = PoolCheck::new(&sim);
    let before = pool.counts();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &sim,
        dir.path(),
        "names = [\"vm-01\", \"vm-03\"]\nexclude-names = [\"vm-03\"]",
        "",
    );
    let out = plan(&cfg);
    assert_eq!(out.code, 0, "{out:?}");
    let p = out.json();
    let will: Vec<&str> = p["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["skip"].is_null())
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(will, ["vm-01"], "{out:?}");
    let not: Vec<(String, String)> = p["not_selected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        not.iter()
            .any(|(n, r)| n == "vm-03" && r.contains("excluded")),
        "{not:?}"
    );
    assert!(not.iter().any(|(n, _)| n == "vm-02"), "{not:?}");
    assert!(p["settings"].as_array().unwrap().len() > 5);
    // Text form.
    let text = xenvault(&["plan", "nightly", "--config", cfg.to_str().unwrap()]);
    assert_eq!(text.code, 0, "{text:?}");
    assert!(
        text.stdout.contains("VMs that will be backed up (1)"),
        "{text:?}"
    );
    assert!(text.stdout.contains("target writable"), "{text:?}");
    // Nothing was created.
    assert_eq!(pool.counts(), before);
    assert_eq!(pool.temporaries(), (0, 0));
}

#[test]
fn xva_archives_import_without_xenvault_and_disk_modes_write_disk_files() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M", "--written", "20%"]);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    for (mode, suffix) in [("vhd", ".vhd"), ("raw", ".raw"), ("xva", ".xva")] {
        let cfg = write_config(
            &sim,
            dir.path(),
            &format!("all-vms = true\nmode = \"{mode}\""),
            "",
        );
        let out = backup(&cfg);
        assert_eq!(out.code, 0, "{mode}: {out:?}");
        let loc = vm_entry(&out.json(), "vm-01")["location"]
            .as_str()
            .unwrap()
            .to_string();
        let names: Vec<String> = std::fs::read_dir(&loc)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.ends_with(suffix)),
            "{mode}: {names:?}"
        );
        assert!(names.iter().any(|n| n == "SHA256SUMS"), "{names:?}");
        // sha256sum -c checks the manifest without xenvault.
        let ok = std::process::Command::new("sha256sum")
            .args(["-c", "--quiet", "SHA256SUMS"])
            .current_dir(&loc)
            .status()
            .unwrap();
        assert!(ok.success(), "{mode}: sha256sum -c failed in {loc}");
        if mode == "xva" {
            // The simulator's /import takes the archived .xva as is.
            let xva = std::path::Path::new(&loc).join("vm.xva");
            let bytes = std::fs::read(&xva).unwrap();
            let pool = PoolCheck::new(&sim);
            let before = pool.counts().0;
            import_xva(&sim, &bytes);
            assert_eq!(pool.counts().0, before + 1);
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    let _ = archive;
}

/// `PUT /import` of an XVA with plain HTTP and basic auth (no xenvault code).
fn import_xva(sim: &Sim, bytes: &[u8]) {
    use std::io::{Read as _, Write as _};
    let url = sim.s("url");
    let addr = url.strip_prefix("http://").unwrap().trim_end_matches('/');
    let auth = base64_encode(format!("{}:{}", sim.s("user"), sim.s("password")).as_bytes());
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "PUT /import HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        bytes.len()
    )
    .unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
        "{text}"
    );
    // The import runs in a task; give it a moment to finish.
    std::thread::sleep(Duration::from_millis(500));
}

fn base64_encode(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[test]
fn pool_metadata_and_host_backups_are_kept_with_their_own_retention() {
    let sim = Sim::start(&["--vms", "1", "--disk-size", "4M", "--hosts", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let cfg = write_config(
        &sim,
        dir.path(),
        "all-vms = true\n[jobs.nightly.pool-metadata]\nkeep-last = 1\n[jobs.nightly.host-backup]\nkeep-last = 2",
        "",
    );
    for _ in 0..3 {
        let out = backup(&cfg);
        assert_eq!(out.code, 0, "{out:?}");
        let report = out.json();
        let pm = report["pool_metadata"].as_array().unwrap();
        assert_eq!(pm.len(), 1, "{out:?}");
        assert_eq!(pm[0]["outcome"]["status"], "succeeded", "{out:?}");
        let hosts = report["hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 2, "{out:?}");
        assert!(
            hosts.iter().all(|h| h["outcome"]["status"] == "succeeded"),
            "{out:?}"
        );
        std::thread::sleep(Duration::from_millis(1100));
    }
    let complete_under = |dir: &std::path::Path| -> usize {
        walk(dir).iter().filter(|p| p.ends_with("COMPLETE")).count()
    };
    assert_eq!(complete_under(&archive.join("_pool-metadata")), 1);
    assert_eq!(
        complete_under(&archive.join("_hosts")),
        4,
        "2 hosts × keep 2"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn help_of_plan_and_backup_has_examples_and_exit_codes() {
    for cmd in ["plan", "backup"] {
        let out = xenvault(&[cmd, "--help"]);
        assert_eq!(out.code, 0, "{out:?}");
        assert!(out.stdout.contains("Examples:"), "{out:?}");
        assert!(
            out.stdout.contains(&format!("xenvault {cmd} nightly")),
            "{out:?}"
        );
        assert!(
            out.stdout.contains("--config") && out.stdout.contains("--today"),
            "{out:?}"
        );
    }
    let out = xenvault(&["backup", "--help"]);
    assert!(out.stdout.contains("3 partial"), "{out:?}");
    // Plain progress lines on a non-terminal stderr are covered by every run
    // above; a missing job is a configuration error.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("x.toml");
    std::fs::write(&cfg, "").unwrap();
    let out = xenvault(&["backup", "nope", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
}
