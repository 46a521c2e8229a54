//! The state directory: `db.json` (the persistent tables), `config.json`
//! (credentials), `tls/` (the certificate) and `disks/` (the disk store).
//! Files are written atomically (temporary file, fsync, rename).

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Writes a file atomically: a sibling temporary file, fsync, then rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StatePaths {
    /// The directory itself.
    pub root: PathBuf,
}

impl StatePaths {
    /// Paths under `root`.
    pub fn new(root: impl Into<PathBuf>) -> StatePaths {
        StatePaths { root: root.into() }
    }
    /// The DB file.
    pub fn db(&self) -> PathBuf {
        self.root.join("db.json")
    }
    /// The credentials file.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.json")
    }
    /// The TLS directory.
    pub fn tls(&self) -> PathBuf {
        self.root.join("tls")
    }
    /// The disk store directory.
    pub fn disks(&self) -> PathBuf {
        self.root.join("disks")
    }
}

/// Saves the pool's persistent tables to `db.json` (saves are serialised, so
/// the newest state always lands last).
pub fn save_db(pool: &crate::pool::Pool) -> std::io::Result<()> {
    static SAVING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = SAVING.lock().unwrap_or_else(|e| e.into_inner());
    let j = pool.db().to_json();
    let text = serde_json::to_vec(&j).map_err(std::io::Error::other)?;
    write_atomic(&StatePaths::new(&pool.config.state_dir).db(), &text)
}
