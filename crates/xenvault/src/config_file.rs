//! Which configuration file a command reads, and loading it.

use std::path::{Path, PathBuf};

use xenvault_types::config::Config;

use crate::exit::UsageError;

/// Where the configuration lives when neither `--config` nor
/// `$XENVAULT_CONFIG` says otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/xenvault/xenvault.toml";

/// The configuration file: `--config`, else `$XENVAULT_CONFIG`, else
/// [`DEFAULT_CONFIG`].
pub fn config_path(given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("XENVAULT_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// Loads the configuration; its errors are usage errors (exit code 2), one line.
pub fn load_config(given: Option<&Path>) -> anyhow::Result<Config> {
    xenvault_engine::config::load(&config_path(given)).map_err(|e| UsageError(e.to_string()).into())
}
