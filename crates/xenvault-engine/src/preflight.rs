//! Checks before any snapshot: the target is reachable and writable (a real
//! test write), has room for the estimated backup, and every SR a VM's disks
//! live on is used below the job's threshold. Results are data with reasons,
//! so `plan`, the run log and the report show the same words.

use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Fine.
    Pass,
    /// Worth a look, nothing is skipped.
    Warn,
    /// The thing checked (a VM, the run) cannot go on.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked ("target writable", "free space", "SR usage", "leftovers").
    pub name: String,
    /// What it applies to (the target path, a VM name, an SR).
    pub subject: String,
    /// The outcome.
    pub status: CheckStatus,
    /// The reason, in words for the log and the report.
    pub detail: String,
}

impl Check {
    /// A passed check.
    pub fn pass(name: &str, subject: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            subject: subject.into(),
            status: CheckStatus::Pass,
            detail: detail.into(),
        }
    }

    /// A failed check.
    pub fn fail(name: &str, subject: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            subject: subject.into(),
            status: CheckStatus::Fail,
            detail: detail.into(),
        }
    }

    /// A warning.
    pub fn warn(name: &str, subject: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            subject: subject.into(),
            status: CheckStatus::Warn,
            detail: detail.into(),
        }
    }

    /// True when it failed.
    pub fn failed(&self) -> bool {
        self.status == CheckStatus::Fail
    }

    /// One line: `name (subject): STATUS — detail`.
    pub fn line(&self) -> String {
        let status = match self.status {
            CheckStatus::Pass => "ok",
            CheckStatus::Warn => "WARNING",
            CheckStatus::Fail => "FAILED",
        };
        format!(
            "{} ({}): {status} — {}",
            self.name, self.subject, self.detail
        )
    }
}

/// Check name: the target directory can be written.
pub const TARGET_WRITABLE: &str = "target writable";
/// Check name: free space on the target.
pub const FREE_SPACE: &str = "free space";
/// Check name: SR usage below the threshold.
pub const SR_USAGE: &str = "SR usage";
/// Check name: leftovers of earlier runs.
pub const LEFTOVERS: &str = "leftovers";
/// Check name: the repository of a repository target opens.
pub const REPOSITORY: &str = "repository";

/// The place a target names, for messages: its URL or its directory.
pub fn target_location(target: &xenvault_types::config::TargetConfig) -> String {
    match &target.url {
        Some(url) => url.clone(),
        None => target.path.display().to_string(),
    }
}

/// True when a repository that cannot be opened is a configuration problem
/// (no repository there, no or a wrong password, a format this version does
/// not read): exit code 2 rather than 1.
pub fn repo_error_is_config(e: &xenvault_repo::RepoError) -> bool {
    use xenvault_repo::RepoError as E;
    matches!(
        e,
        E::NotARepository
            | E::PasswordRequired
            | E::WrongPassword { .. }
            | E::UnsupportedVersion { .. }
            | E::Invalid { .. }
    )
}

/// Opens the repository of a `type = "repository"` target (reachable,
/// initialized, the password right) and says so as a check.
pub async fn check_repository(target: &xenvault_types::config::TargetConfig) -> Check {
    match crate::repository::open_repository(target).await {
        Ok(repo) => repository_opened(target, &repo),
        Err(e) => Check::fail(
            REPOSITORY,
            target_location(target),
            format!("target {}: cannot open the repository: {e}", target.name),
        ),
    }
}

/// The passed check of a repository target that `repo` opened.
pub fn repository_opened(
    target: &xenvault_types::config::TargetConfig,
    repo: &xenvault_repo::Repository,
) -> Check {
    let c = repo.config();
    let detail = format!(
        "repository {} opened ({}, {} chunks)",
        c.id,
        if repo.is_encrypted() {
            "encrypted"
        } else {
            "not encrypted"
        },
        human_bytes(u64::from(c.chunk_size))
    );
    Check::pass(REPOSITORY, target_location(target), detail)
}

/// Writes, syncs, reads back and removes a small file in `dir` (creating
/// `dir` when missing). Any failure means nothing can be backed up there.
pub fn check_target_writable(dir: &Path) -> Check {
    let subject = dir.display().to_string();
    if let Err(e) = std::fs::create_dir_all(dir) {
        return Check::fail(
            TARGET_WRITABLE,
            subject,
            format!("target not reachable: cannot create the directory: {e}"),
        );
    }
    let probe = dir.join(format!(".xenvault-write-test-{}", std::process::id()));
    let payload = b"xenvault write test\n";
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(payload)?;
        f.sync_all()?;
        drop(f);
        let back = std::fs::read(&probe)?;
        if back != payload {
            return Err(std::io::Error::other("the test file read back differently"));
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&probe);
    match result {
        Ok(()) => Check::pass(
            TARGET_WRITABLE,
            subject,
            "a test file was written, read back and removed",
        ),
        Err(e) => Check::fail(
            TARGET_WRITABLE,
            subject,
            format!("target not writable: test write failed: {e}"),
        ),
    }
}

/// Bytes available to this user on the file system holding `dir`.
pub fn free_space(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether `needed` bytes fit on the target holding `dir` while leaving
/// `reserved` bytes free. `free` is the measured free space.
pub fn check_free_space(subject: &str, free: u64, needed: u64, reserved: u64) -> Check {
    let usable = free.saturating_sub(reserved);
    let detail = format!(
        "needs about {} (estimate), {} free on the target, {} reserved",
        human_bytes(needed),
        human_bytes(free),
        human_bytes(reserved)
    );
    if needed > usable {
        Check::fail(FREE_SPACE, subject, format!("target full: {detail}"))
    } else {
        Check::pass(FREE_SPACE, subject, detail)
    }
}

/// An SR's size and use, as XAPI reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrUsage {
    /// The SR's UUID.
    pub uuid: String,
    /// Its name.
    pub name: String,
    /// `physical_size` in bytes.
    pub physical_size: i64,
    /// `physical_utilisation` in bytes.
    pub physical_utilisation: i64,
}

impl SrUsage {
    /// Used percentage, `None` when the SR reports no size (ISO, udev SRs).
    pub fn percent(&self) -> Option<f64> {
        (self.physical_size > 0)
            .then(|| self.physical_utilisation as f64 * 100.0 / self.physical_size as f64)
    }
}

/// Checks every SR a VM's disks live on against `threshold` percent. A
/// snapshot grows the SR, so an SR over the threshold skips the VM.
pub fn check_sr_usage(vm_name: &str, srs: &[SrUsage], threshold: u8) -> Check {
    let mut over = Vec::new();
    let mut seen = Vec::new();
    for sr in srs {
        let Some(pct) = sr.percent() else { continue };
        seen.push(format!("{} {pct:.1}%", sr.name));
        if pct > f64::from(threshold) {
            over.push(format!(
                "SR {} ({}) is {pct:.1}% used, over the {threshold}% threshold",
                sr.name, sr.uuid
            ));
        }
    }
    if !over.is_empty() {
        Check::fail(SR_USAGE, vm_name, over.join("; "))
    } else if seen.is_empty() {
        Check::pass(SR_USAGE, vm_name, "no SR with a size to check")
    } else {
        Check::pass(
            SR_USAGE,
            vm_name,
            format!("{} (threshold {threshold}%)", seen.join(", ")),
        )
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn writable_directory_passes_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("new/sub");
        let c = check_target_writable(&target);
        assert_eq!(c.status, CheckStatus::Pass, "{}", c.line());
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    }

    #[test]
    fn read_only_directory_fails_with_a_reason() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("ro");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o555)).unwrap();
        let c = check_target_writable(&target);
        // root ignores permissions: then the write works and the check passes.
        let is_root = {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata("/proc/self").unwrap().uid() == 0
        };
        if is_root {
            assert_eq!(c.status, CheckStatus::Pass);
        } else {
            assert!(c.failed());
            assert!(c.detail.contains("not writable"), "{}", c.detail);
        }
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn a_file_in_place_of_the_directory_fails() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let c = check_target_writable(&file.join("sub"));
        assert!(c.failed());
        assert!(c.detail.contains("not reachable"), "{}", c.detail);
    }

    #[test]
    fn free_space_is_measured_and_compared() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_space(dir.path()).unwrap();
        assert!(free > 0);
        assert!(!check_free_space("t", free, 1, 0).failed());
        let full = check_free_space("t", free, 1, free);
        assert!(full.failed());
        assert!(full.detail.starts_with("target full"), "{}", full.detail);
        assert!(check_free_space("t", 100, 101, 0).failed());
    }

    #[test]
    fn sr_over_threshold_fails() {
        let sr = |used| SrUsage {
            uuid: "u".into(),
            name: "Local storage".into(),
            physical_size: 1000,
            physical_utilisation: used,
        };
        assert!(!check_sr_usage("vm", &[sr(800)], 80).failed());
        let c = check_sr_usage("vm", &[sr(801)], 80);
        assert!(c.failed());
        assert!(c.detail.contains("80% threshold"), "{}", c.detail);
        let iso = SrUsage {
            physical_size: 0,
            ..sr(0)
        };
        assert!(!check_sr_usage("vm", &[iso], 80).failed());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
