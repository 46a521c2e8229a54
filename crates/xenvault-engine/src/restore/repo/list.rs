//! The restore points of a repository, per VM newest first, for
//! `xenvault list`, and finding the one a restore names.

use futures::StreamExt as _;
use serde::Serialize;
use xenvault_repo::{DiskMode, Manifest, Repository};

use super::{RepoDisk, repo_disks};
use crate::restore::RestoreError;

/// Manifests loaded at once while listing.
const LOAD_PARALLEL: usize = 8;

/// One disk of a listed restore point.
#[derive(Debug, Clone, Serialize)]
pub struct ListedRepoDisk {
    /// The disk's key (the source VDI's uuid for backups).
    pub key: String,
    /// Position in the VM, when known.
    pub userdevice: Option<String>,
    /// The VDI's name at backup time.
    pub name: String,
    /// Size, bytes.
    pub size: u64,
    /// Full or incremental.
    pub mode: DiskMode,
    /// How the backup read it (`nbd-full`, `nbd-cbt`, …), when recorded.
    pub read: Option<String>,
    /// Bytes of new chunks this restore point stored for the disk.
    pub stored: u64,
}

/// One restore point of a repository, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct ListedRepoPoint {
    /// The VM's name at backup time.
    pub vm: String,
    /// The VM's uuid.
    pub vm_uuid: String,
    /// The restore point's id (`YYYYMMDDTHHMMSSZ`).
    pub id: String,
    /// Its time, RFC 3339.
    pub time: String,
    /// The restore point its incremental disks build on.
    pub parent: Option<String>,
    /// The backup job that wrote it.
    pub job: Option<String>,
    /// The run that wrote it.
    pub run_id: Option<String>,
    /// Its disks, by position.
    pub disks: Vec<ListedRepoDisk>,
    /// Sum of the disks' sizes, bytes.
    pub size: u64,
    /// Bytes of new chunks this restore point stored (what it added to the
    /// repository; shared chunks are not counted).
    pub stored: u64,
}

impl ListedRepoPoint {
    /// The listing of a manifest.
    pub fn of(m: &Manifest) -> ListedRepoPoint {
        let label = |k: &str| {
            m.labels
                .get(k)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let disks: Vec<ListedRepoDisk> = repo_disks(m)
            .into_iter()
            .map(|d: RepoDisk| ListedRepoDisk {
                stored: m
                    .disks
                    .iter()
                    .find(|e| e.key == d.key)
                    .map_or(0, |e| e.stats.bytes_stored),
                key: d.key,
                userdevice: d.userdevice,
                name: d.name,
                size: d.size,
                mode: d.mode,
                read: d.read,
            })
            .collect();
        ListedRepoPoint {
            vm: m.vm_name.clone(),
            vm_uuid: m.vm_uuid.clone(),
            id: m.id.clone(),
            time: m.time.clone(),
            parent: m.parent.clone(),
            job: label("job"),
            run_id: label("run_id"),
            size: disks.iter().map(|d| d.size).sum(),
            stored: disks.iter().map(|d| d.stored).sum(),
            disks,
        }
    }
}

fn repo_err(what: impl Into<String>) -> impl FnOnce(xenvault_repo::RepoError) -> RestoreError {
    let what = what.into();
    move |e| RestoreError::repo(what, e)
}

/// Loads every manifest (of VM `vm_uuid` only, when given).
async fn load_all(repo: &Repository, vm_uuid: Option<&str>) -> Result<Vec<Manifest>, RestoreError> {
    let ids = repo
        .list_restore_points(vm_uuid)
        .await
        .map_err(repo_err("cannot list the repository's restore points"))?;
    let loads = futures::stream::iter(ids)
        .map(|(vm, id)| async move {
            repo.load_manifest(&vm, &id)
                .await
                .map_err(repo_err(format!("cannot read restore point {vm}/{id}")))
        })
        .buffered(LOAD_PARALLEL);
    loads
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
}

/// True when `s` can be a VM uuid (a path segment the repository accepts).
fn looks_like_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

/// The manifests of the VM named `vm` (uuid or name), or of every VM. A
/// name is matched against each VM's newest restore point first (one
/// manifest per VM is read), and against every restore point only when no
/// VM is called so now (a VM renamed since): every restore point of the
/// matching VMs is returned, whatever name each was taken under.
async fn manifests_of(repo: &Repository, vm: Option<&str>) -> Result<Vec<Manifest>, RestoreError> {
    let Some(v) = vm else {
        return load_all(repo, None).await;
    };
    if looks_like_uuid(v) {
        let of_uuid = load_all(repo, Some(&v.to_ascii_lowercase())).await?;
        if !of_uuid.is_empty() {
            return Ok(of_uuid);
        }
    }
    let ids = repo
        .list_restore_points(None)
        .await
        .map_err(repo_err("cannot list the repository's restore points"))?;
    // The newest restore point of each VM (ids sort by time).
    let mut newest: Vec<(String, String)> = Vec::new();
    for (vm_uuid, id) in ids {
        match newest.last_mut() {
            Some((u, last)) if *u == vm_uuid => *last = id,
            _ => newest.push((vm_uuid, id)),
        }
    }
    let heads = futures::stream::iter(newest)
        .map(|(vm_uuid, id)| async move {
            repo.load_manifest(&vm_uuid, &id)
                .await
                .map_err(repo_err(format!(
                    "cannot read restore point {vm_uuid}/{id}"
                )))
        })
        .buffered(LOAD_PARALLEL)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let named: Vec<String> = heads
        .iter()
        .filter(|m| m.vm_name == v)
        .map(|m| m.vm_uuid.clone())
        .collect();
    if named.is_empty() {
        // A former name: every restore point of the VMs that had it.
        let all = load_all(repo, None).await?;
        let had: Vec<String> = all
            .iter()
            .filter(|m| m.vm_name == v)
            .map(|m| m.vm_uuid.clone())
            .collect();
        return Ok(all
            .into_iter()
            .filter(|m| had.contains(&m.vm_uuid))
            .collect());
    }
    let mut out = Vec::new();
    for uuid in &named {
        out.extend(load_all(repo, Some(uuid)).await?);
    }
    Ok(out)
}

/// Lists the restore points of the repository (of VM `vm` only, by name or
/// uuid, if given): grouped per VM (by name, then uuid), newest first.
/// Every listed point is complete: a restore point exists only once its
/// manifest is written.
pub async fn list_repo_points(
    repo: &Repository,
    vm: Option<&str>,
) -> Result<Vec<ListedRepoPoint>, RestoreError> {
    let manifests = manifests_of(repo, vm).await?;
    if let Some(v) = vm
        && manifests.is_empty()
    {
        return Err(RestoreError::NotFound(format!(
            "no restore point of VM {v:?} in the repository (see `xenvault list` for the VMs it holds)"
        )));
    }
    let mut out: Vec<ListedRepoPoint> = manifests.iter().map(ListedRepoPoint::of).collect();
    // Grouped by VM under its newest name (a renamed VM stays one group).
    let mut current: std::collections::BTreeMap<String, (String, String)> = Default::default();
    for p in &out {
        let e = current
            .entry(p.vm_uuid.clone())
            .or_insert_with(|| (p.id.clone(), p.vm.clone()));
        if p.id > e.0 {
            *e = (p.id.clone(), p.vm.clone());
        }
    }
    let name_of = |p: &ListedRepoPoint| {
        current
            .get(&p.vm_uuid)
            .map(|e| e.1.clone())
            .unwrap_or_default()
    };
    out.sort_by(|a, b| {
        name_of(a)
            .cmp(&name_of(b))
            .then_with(|| a.vm_uuid.cmp(&b.vm_uuid))
            .then_with(|| b.id.cmp(&a.id))
    });
    Ok(out)
}

/// The restore point of VM `vm` (name or uuid) to restore: the one whose id
/// is `at` (or, failing that, the newest whose id starts with `at`, e.g.
/// `20261122` for a day), or the newest when `at` is `None`.
pub async fn find_repo_point(
    repo: &Repository,
    vm: &str,
    at: Option<&str>,
) -> Result<Manifest, RestoreError> {
    let mut manifests = manifests_of(repo, Some(vm)).await?;
    if manifests.is_empty() {
        return Err(RestoreError::NotFound(format!(
            "no restore point of VM {vm:?} in the repository (see `xenvault list`)"
        )));
    }
    let mut uuids: Vec<&str> = manifests.iter().map(|m| m.vm_uuid.as_str()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    if uuids.len() > 1 {
        return Err(RestoreError::NotFound(format!(
            "{} VMs called {vm:?} have restore points ({}): name the VM by its uuid",
            uuids.len(),
            uuids.join(", ")
        )));
    }
    manifests.sort_by(|a, b| b.id.cmp(&a.id));
    let found = match at {
        None => manifests.into_iter().next(),
        Some(at) => {
            let at = at.trim();
            match manifests.iter().position(|m| m.id == at) {
                Some(i) => Some(manifests.swap_remove(i)),
                None => manifests
                    .into_iter()
                    .find(|m| !at.is_empty() && (m.id.starts_with(at) || m.time.starts_with(at))),
            }
        }
    };
    found.ok_or_else(|| {
        RestoreError::NotFound(format!(
            "VM {vm:?} has no restore point {:?} in the repository (see `xenvault list --vm {vm}`)",
            at.unwrap_or_default()
        ))
    })
}
