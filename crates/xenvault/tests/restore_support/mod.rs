//! Helpers of the `restore_*` end-to-end tests: a real `xapi-sim` process,
//! our client logged in to it (to prepare and check), archive restore points
//! made from its VMs (snapshot, export, archive writer — as `xenvault backup`
//! writes them), a configuration file, and the real `xenvault` binary.
//!
//! The simulator, client and archive helpers are the engine tests' own
//! (`xenvault-engine/tests/restore_support/mod.rs`), shared here by path; this file adds
//! what only the CLI tests need.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[path = "../../../xenvault-engine/tests/restore_support/mod.rs"]
mod shared;
pub use shared::*;

/// A configuration file naming each simulator as a pool (`first`, `second`,
/// …), an archive target `arch` at `target`, and a job `nightly` on the
/// first pool. The password files are private (0600), as the loader wants.
pub fn write_config(dir: &Path, sims: &[&SimProc], target: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let names = ["first", "second", "third"];
    let mut text = String::new();
    for (i, sim) in sims.iter().enumerate() {
        let pw = dir.join(format!("{}.password", names[i]));
        std::fs::write(&pw, format!("{}\n", sim.info.password)).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        text.push_str(&format!(
            "[pools.{}]\nurl = \"{}\"\nuser = \"{}\"\npassword-file = \"{}\"\nfingerprint = \"{}\"\n\n",
            names[i],
            sim.info.https_url,
            sim.info.user,
            pw.display(),
            sim.info.fingerprint
        ));
    }
    text.push_str(&format!(
        "[targets.arch]\npath = \"{}\"\n\n[jobs.nightly]\npools = [\"first\"]\ntarget = \"arch\"\nnames = [\"vm-01\"]\n",
        target.display()
    ));
    text.insert_str(
        0,
        &format!("state-dir = \"{}\"\n\n", dir.join("state").display()),
    );
    let path = dir.join("xenvault.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Appends a job `name` to a configuration written by [`write_config`].
pub fn add_job(config: &Path, name: &str, body: &str) {
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&format!(
        "\n[jobs.{name}]\npools = [\"first\"]\ntarget = \"arch\"\n{body}\n"
    ));
    std::fs::write(config, text).unwrap();
}

/// Runs the real `xenvault` binary; returns (exit code, stdout, stderr).
pub fn xenvault(args: &[&str]) -> (i32, String, String) {
    xenvault_env(args, &[])
}

/// [`xenvault`] with `env` set in its environment.
pub fn xenvault_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xenvault"))
        .args(args)
        .env_remove("XENVAULT_CONFIG")
        .envs(env.iter().copied())
        .output()
        .expect("run xenvault");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `xenvault` and parses its JSON stdout; the exit code must be 0.
pub fn xenvault_json(args: &[&str]) -> serde_json::Value {
    xenvault_env_json(args, &[])
}

/// [`xenvault_json`] with `env` set in its environment.
pub fn xenvault_env_json(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let (code, stdout, stderr) = xenvault_env(args, env);
    assert_eq!(
        code, 0,
        "xenvault {args:?} failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("xenvault {args:?}: not JSON ({e}):\n{stdout}"))
}

/// Whether an outside tool is installed. Missing with `CI=true` fails the
/// test; otherwise the caller skips loudly.
pub fn require_tool(tool: &str, probe: &[&str]) -> bool {
    let found = Command::new(tool)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required (CI=true) but is not usable");
        }
        eprintln!("!!!!! SKIPPING this test: {tool} {probe:?} does not work here !!!!!");
    }
    found
}
