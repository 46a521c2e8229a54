//! Repository locks: shared for backups and prune marks, exclusive for prune sweeps.
//!
//! A lock is an object `locks/<random id>` holding JSON (kind, host, pid, purpose,
//! started, refreshed). To take a lock, a process writes its object, then lists
//! all locks: if a live conflicting lock is there, it removes its own and fails
//! with [`RepoError::Locked`]. Two processes racing both see each other at worst
//! (both back off); never neither. A lock is *stale*, and ignored, when it was not
//! refreshed for `stale_after`, or when it names this host and a pid that no
//! longer runs. Holders refresh it with [`LockGuard::refresh`] (the writer does so
//! in the background every `stale_after / 4`).

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::crypto::random_bytes;
use crate::error::{RepoError, Result};
use crate::manifest::{parse_rfc3339, rfc3339};
use crate::repo::{Repository, now};

/// Default time after which an unrefreshed lock is stale.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(30 * 60);

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// Many at once (backups, prune marks, checks).
    Shared,
    /// Alone (prune sweeps).
    Exclusive,
}

/// The content of a lock object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Lock id (its object name).
    pub id: String,
    /// Shared or exclusive.
    pub kind: LockKind,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// What the holder does (`backup vm …`, `prune sweep`).
    pub purpose: String,
    /// When taken, RFC 3339.
    pub started: String,
    /// Last refresh, RFC 3339.
    pub refreshed: String,
}

/// This machine's host name.
pub fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl LockInfo {
    /// True when the lock no longer protects anything: not refreshed for
    /// `stale_after` at `now`, or held by a dead process of this host.
    pub fn is_stale(
        &self,
        now: time::OffsetDateTime,
        stale_after: Duration,
        this_host: &str,
    ) -> bool {
        let Some(refreshed) = parse_rfc3339(&self.refreshed) else {
            return true;
        };
        if now - refreshed > stale_after {
            return true;
        }
        self.host == this_host && self.pid != std::process::id() && !pid_alive(self.pid)
    }

    fn conflicts_with(&self, mine: LockKind) -> bool {
        mine == LockKind::Exclusive || self.kind == LockKind::Exclusive
    }
}

/// A held lock; release it with [`LockGuard::release`] (dropping leaves it to go stale).
#[derive(Debug)]
pub struct LockGuard {
    repo: Repository,
    info: LockInfo,
    refresher: Option<tokio::task::JoinHandle<()>>,
    released: bool,
}

impl LockGuard {
    /// The lock's content.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    /// Rewrites the lock with a new refresh time.
    pub async fn refresh(&mut self) -> Result<()> {
        self.info.refreshed = rfc3339(now());
        write_lock(&self.repo, &self.info, true).await
    }

    /// Refreshes the lock in the background every `every` until released.
    pub fn keep_fresh(&mut self, every: Duration) {
        let repo = self.repo.clone();
        let mut info = self.info.clone();
        self.refresher = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                info.refreshed = rfc3339(now());
                if let Err(e) = write_lock(&repo, &info, true).await {
                    tracing::warn!(lock = %info.id, error = %e, "could not refresh repository lock");
                }
            }
        }));
    }

    /// Removes the lock.
    pub async fn release(mut self) -> Result<()> {
        if let Some(h) = self.refresher.take() {
            h.abort();
        }
        self.released = true;
        self.repo
            .storage
            .delete(&format!("locks/{}", self.info.id))
            .await?;
        Ok(())
    }
}

impl Drop for LockGuard {
    /// A guard dropped without `release` (an error path) removes its lock in the
    /// background when a runtime is there; after a crash the lock goes stale instead.
    fn drop(&mut self) {
        if let Some(h) = self.refresher.take() {
            h.abort();
        }
        if self.released {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let storage = self.repo.storage.clone();
            let key = format!("locks/{}", self.info.id);
            rt.spawn(async move {
                if let Err(e) = storage.delete(&key).await {
                    tracing::warn!(%key, error = %e, "could not remove a dropped repository lock");
                }
            });
        }
    }
}

async fn write_lock(repo: &Repository, info: &LockInfo, overwrite: bool) -> Result<()> {
    let json = serde_json::to_vec(info).map_err(|e| RepoError::Task(e.to_string()))?;
    let key = format!("locks/{}", info.id);
    if overwrite {
        repo.storage.put(&key, Bytes::from(json)).await?;
    } else {
        repo.storage.put_if_absent(&key, Bytes::from(json)).await?;
    }
    Ok(())
}

impl Repository {
    /// Every lock object (unreadable ones are reported as stale placeholders).
    pub async fn list_locks(&self) -> Result<Vec<LockInfo>> {
        let mut out = Vec::new();
        for meta in self.storage.list("locks/").await? {
            let raw = match self.storage.get(&meta.key).await {
                Ok(r) => r,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            let id = meta.key.trim_start_matches("locks/").to_string();
            match serde_json::from_slice::<LockInfo>(&raw) {
                Ok(info) => out.push(info),
                Err(_) => out.push(LockInfo {
                    id,
                    kind: LockKind::Shared,
                    host: "?".into(),
                    pid: 0,
                    purpose: "unreadable lock object".into(),
                    started: String::new(),
                    refreshed: String::new(),
                }),
            }
        }
        Ok(out)
    }

    /// Takes a lock of `kind`, or fails with [`RepoError::Locked`] naming the holder.
    pub async fn lock(
        &self,
        kind: LockKind,
        purpose: &str,
        stale_after: Duration,
    ) -> Result<LockGuard> {
        let mut idb = [0u8; 8];
        random_bytes(&mut idb)?;
        let t = rfc3339(now());
        let info = LockInfo {
            id: hex::encode(idb),
            kind,
            host: host_name(),
            pid: std::process::id(),
            purpose: purpose.to_string(),
            started: t.clone(),
            refreshed: t,
        };
        write_lock(self, &info, false).await?;
        let host = host_name();
        let n = now();
        let conflict = self.list_locks().await.map(|locks| {
            locks.into_iter().find(|l| {
                l.id != info.id && l.conflicts_with(kind) && !l.is_stale(n, stale_after, &host)
            })
        });
        match conflict {
            Ok(None) => Ok(LockGuard {
                repo: self.clone(),
                info,
                refresher: None,
                released: false,
            }),
            Ok(Some(other)) => {
                self.storage.delete(&format!("locks/{}", info.id)).await?;
                Err(RepoError::Locked {
                    id: other.id,
                    kind: format!("{:?}", other.kind).to_lowercase(),
                    holder: format!("{}:{}", other.host, other.pid),
                    purpose: other.purpose,
                    refreshed: other.refreshed,
                })
            }
            Err(e) => {
                let _ = self.storage.delete(&format!("locks/{}", info.id)).await;
                Err(e)
            }
        }
    }

    /// Removes stale locks; returns them.
    pub async fn remove_stale_locks(&self, stale_after: Duration) -> Result<Vec<LockInfo>> {
        let host = host_name();
        let n = now();
        let mut removed = Vec::new();
        for l in self.list_locks().await? {
            if l.is_stale(n, stale_after, &host) {
                self.storage.delete(&format!("locks/{}", l.id)).await?;
                removed.push(l);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::InitOptions;
    use crate::storage::{MemoryStorage, Storage};
    use std::sync::Arc;

    #[tokio::test]
    async fn shared_and_exclusive_conflict() {
        let mem = MemoryStorage::new();
        let s: Arc<dyn Storage> = Arc::new(mem.clone());
        let repo = Repository::init(s, InitOptions::default()).await.unwrap();
        let a = repo
            .lock(LockKind::Shared, "backup a", DEFAULT_STALE_AFTER)
            .await
            .unwrap();
        let b = repo
            .lock(LockKind::Shared, "backup b", DEFAULT_STALE_AFTER)
            .await
            .unwrap();
        let e = repo
            .lock(LockKind::Exclusive, "prune sweep", DEFAULT_STALE_AFTER)
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("backup"), "{e}");
        assert_eq!(
            repo.list_locks().await.unwrap().len(),
            2,
            "failed attempt left nothing"
        );
        a.release().await.unwrap();
        b.release().await.unwrap();
        let mut x = repo
            .lock(LockKind::Exclusive, "prune sweep", DEFAULT_STALE_AFTER)
            .await
            .unwrap();
        x.refresh().await.unwrap();
        assert!(
            repo.lock(LockKind::Shared, "backup", DEFAULT_STALE_AFTER)
                .await
                .is_err()
        );
        x.release().await.unwrap();
        assert!(mem.keys().iter().all(|k| !k.starts_with("locks/")));
    }

    #[tokio::test]
    async fn stale_locks_are_ignored_and_removed() {
        let mem = MemoryStorage::new();
        let s: Arc<dyn Storage> = Arc::new(mem.clone());
        let repo = Repository::init(s.clone(), InitOptions::default())
            .await
            .unwrap();
        let old = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
        let stale_by_time = LockInfo {
            id: "aaaa".into(),
            kind: LockKind::Shared,
            host: "elsewhere".into(),
            pid: 1,
            purpose: "backup".into(),
            started: rfc3339(old),
            refreshed: rfc3339(old),
        };
        let dead_pid = LockInfo {
            id: "bbbb".into(),
            host: host_name(),
            pid: u32::MAX - 1,
            refreshed: rfc3339(time::OffsetDateTime::now_utc()),
            ..stale_by_time.clone()
        };
        let live_elsewhere = LockInfo {
            id: "cccc".into(),
            host: "elsewhere".into(),
            refreshed: rfc3339(time::OffsetDateTime::now_utc()),
            ..stale_by_time.clone()
        };
        let n = time::OffsetDateTime::now_utc();
        let h = host_name();
        assert!(stale_by_time.is_stale(n, DEFAULT_STALE_AFTER, &h));
        assert!(dead_pid.is_stale(n, DEFAULT_STALE_AFTER, &h));
        assert!(!live_elsewhere.is_stale(n, DEFAULT_STALE_AFTER, &h));
        for l in [&stale_by_time, &dead_pid] {
            write_lock(&repo, l, false).await.unwrap();
        }
        let x = repo
            .lock(LockKind::Exclusive, "prune", DEFAULT_STALE_AFTER)
            .await
            .unwrap();
        x.release().await.unwrap();
        let removed = repo.remove_stale_locks(DEFAULT_STALE_AFTER).await.unwrap();
        assert_eq!(removed.len(), 2);
        write_lock(&repo, &live_elsewhere, false).await.unwrap();
        assert!(
            repo.lock(LockKind::Exclusive, "prune", DEFAULT_STALE_AFTER)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_dropped_guard_removes_its_lock() {
        let mem = MemoryStorage::new();
        let s: Arc<dyn Storage> = Arc::new(mem.clone());
        let repo = Repository::init(s, InitOptions::default()).await.unwrap();
        let g = repo
            .lock(LockKind::Exclusive, "x", DEFAULT_STALE_AFTER)
            .await
            .unwrap();
        drop(g);
        for _ in 0..100 {
            if repo.list_locks().await.unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("lock of a dropped guard still there");
    }
}
