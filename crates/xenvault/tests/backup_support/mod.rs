//! Support of the `xenvault backup`/`plan` end-to-end tests: a real `xapi-sim` process (built on
//! first use with the cargo that runs the tests), its control API, and a
//! configuration file pointing at it.
//!
//! The simulator, client and archive helpers are the engine tests' own
//! (`xenvault-engine/tests/backup_support/mod.rs`), shared here by path; this file adds
//! what only the CLI tests need.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;
use std::process::Command;

#[path = "../../../xenvault-engine/tests/backup_support/mod.rs"]
mod shared;
pub use shared::*;

/// What a `xenvault` invocation did.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}); code {}\nstdout:\n{}\nstderr:\n{}",
                self.code, self.stdout, self.stderr
            )
        })
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the real `xenvault` binary.
pub fn xenvault(args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(args)
        .env_remove("XENVAULT_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run xenvault");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A configuration (see [`write_config`]) whose target `archive` is a
/// repository, created with `xenvault repo init`: encrypted with `password`
/// (in `repo.password`, chmod 600) when given, else plain.
pub fn write_repository_config(
    sim: &Sim,
    dir: &Path,
    job_lines: &str,
    password: Option<&str>,
) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let cfg = write_config(sim, dir, job_lines, "");
    let mut target = "[targets.archive]\ntype = \"repository\"\n".to_string();
    if let Some(password) = password {
        let pw = dir.join("repo.password");
        std::fs::write(&pw, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        target.push_str(&format!("password-file = \"{}\"\n", pw.display()));
    }
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[targets.archive]\n", &target);
    std::fs::write(&cfg, text).unwrap();
    let mut init = vec![
        "repo",
        "init",
        "--config",
        cfg.to_str().unwrap(),
        "--target",
        "archive",
    ];
    if password.is_some() {
        init.push("--encrypt");
    }
    let init = xenvault(&init);
    assert_eq!(init.code, 0, "{init:?}");
    cfg
}

/// `xenvault backup nightly --config <cfg> --json`.
pub fn backup(cfg: &Path) -> Out {
    xenvault(&[
        "backup",
        "nightly",
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ])
}

/// `xenvault plan nightly --config <cfg> --json`.
pub fn plan(cfg: &Path) -> Out {
    xenvault(&[
        "plan",
        "nightly",
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ])
}

/// The pool as a test sees it, over the XAPI client (pinned TLS).
pub struct PoolCheck {
    rt: tokio::runtime::Runtime,
    session: xenvault_xapi::Session,
}

impl PoolCheck {
    pub fn new(sim: &Sim) -> PoolCheck {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let session = rt
            .block_on(xenvault_xapi::Client::connect(
                &sim.s("https_url"),
                xenvault_xapi::Credentials::new(sim.s("user"), sim.s("password")),
                xenvault_xapi::tls::TlsPolicy::Pinned(sim.s("fingerprint").parse().unwrap()),
            ))
            .unwrap();
        PoolCheck { rt, session }
    }

    /// (snapshot VMs, snapshot VDIs) on the pool.
    pub fn temporaries(&self) -> (usize, usize) {
        self.rt.block_on(async {
            let vms = self.session.vm().get_all_records().await.unwrap();
            let vdis = self.session.vdi().get_all_records().await.unwrap();
            (
                vms.values().filter(|v| v.is_a_snapshot).count(),
                vdis.values().filter(|v| v.is_a_snapshot).count(),
            )
        })
    }

    /// (VMs, VDIs) of any kind.
    pub fn counts(&self) -> (usize, usize) {
        self.rt.block_on(async {
            (
                self.session.vm().get_all().await.unwrap().len(),
                self.session.vdi().get_all().await.unwrap().len(),
            )
        })
    }

    pub fn session(&self) -> &xenvault_xapi::Session {
        &self.session
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// Restore points under `<archive>/<vm>/`: (complete, other entries).
pub fn points_of(archive: &Path, vm: &str) -> (usize, usize) {
    let Ok(entries) = std::fs::read_dir(archive.join(vm)) else {
        return (0, 0);
    };
    let mut complete = 0;
    let mut other = 0;
    for e in entries {
        let p = e.unwrap().path();
        if p.join("COMPLETE").exists() && !p.file_name().unwrap().to_string_lossy().starts_with('.')
        {
            complete += 1;
        } else {
            other += 1;
        }
    }
    (complete, other)
}

/// The VM entries of a JSON report.
pub fn vm_entry<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no VM {name} in {report:#}"))
}
