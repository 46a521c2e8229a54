//! The `xapi-sim` binary the engine's and the CLI's end-to-end tests start:
//! `$XENVAULT_SIM_BIN` when set (`scripts/test` builds it once before the
//! suite), else built by the cargo that runs the tests, once per test process
//! (so `cargo test` alone never runs a stale simulator).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The path of a current `xapi-sim` binary.
pub fn xapi_sim_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("XENVAULT_SIM_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "XENVAULT_SIM_BIN={} is not a file; build it with `cargo build -p xenvault-sim --bin xapi-sim` or unset it",
                bin.display()
            );
            return bin;
        }
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> → target/<profile>/xapi-sim
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "xenvault-sim", "--bin", "xapi-sim"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for xapi-sim");
        assert!(status.success(), "cannot build xapi-sim");
        let bin = profile_dir.join("xapi-sim");
        assert!(bin.exists(), "no {}", bin.display());
        bin
    })
    .clone()
}
