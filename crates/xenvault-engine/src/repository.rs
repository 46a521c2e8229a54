//! Opening the deduplicating repository a `type = "repository"` target names:
//! its storage (a local directory `path`; S3 or SFTP through `url`, see
//! `docs/backends.md`) and its password.

use std::sync::Arc;

use xenvault_repo::storage::{Storage, open_target};
use xenvault_repo::{RepoError, Repository};
use xenvault_types::config::TargetConfig;

/// The storage a repository target names, behind retries of transient errors.
/// A remote server is contacted by the first operation, not here.
pub async fn open_storage(target: &TargetConfig) -> Result<Arc<dyn Storage>, RepoError> {
    Ok(open_target(target)?)
}

/// Opens the repository of `target` with its configured password (if any).
pub async fn open_repository(target: &TargetConfig) -> Result<Repository, RepoError> {
    let storage = open_storage(target).await?;
    let password = target.password.as_ref().map(|p| p.expose().as_bytes());
    Repository::open(storage, password).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvault_types::config::TargetKind;

    #[tokio::test]
    async fn archive_targets_and_incomplete_remote_targets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = TargetConfig::archive("a", dir.path());
        let e = open_storage(&t).await.err().unwrap();
        assert!(e.to_string().contains("not a repository"), "{e}");
        t.kind = TargetKind::Repository;
        assert!(open_storage(&t).await.is_ok());
        t.url = Some("sftp://backup@127.0.0.1:1/srv/repo".into());
        let e = open_storage(&t).await.err().unwrap();
        assert!(e.to_string().contains("key-file"), "{e}");
        t.url = Some("nfs://x/y".into());
        let e = open_storage(&t).await.err().unwrap();
        assert!(e.to_string().contains("invalid repository url"), "{e}");
    }
}
