//! Opening the deduplicating repository a `type = "repository"` target names:
//! its storage (a local directory; S3 and SFTP through `url`) and its password.

use std::sync::Arc;

use xenvault_repo::storage::{LocalStorage, Storage};
use xenvault_repo::{RepoError, Repository};
use xenvault_types::config::{TargetConfig, TargetKind};

/// The storage a repository target names.
pub async fn open_storage(target: &TargetConfig) -> Result<Arc<dyn Storage>, RepoError> {
    if target.kind != TargetKind::Repository {
        return Err(RepoError::invalid(
            "target",
            format!(
                "target {} is an archive, not a repository; set type = \"repository\"",
                target.name
            ),
        ));
    }
    match &target.url {
        None => {
            let local = LocalStorage::new(&target.path)?;
            Ok(Arc::new(local))
        }
        Some(url) => Err(RepoError::invalid(
            "target url",
            format!("{url}: remote repositories are not supported yet"),
        )),
    }
}

/// Opens the repository of `target` with its configured password (if any).
pub async fn open_repository(target: &TargetConfig) -> Result<Repository, RepoError> {
    let storage = open_storage(target).await?;
    let password = target.password.as_ref().map(|p| p.expose().as_bytes());
    Repository::open(storage, password).await
}
