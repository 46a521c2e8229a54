//! Retention of a VM's restore points in a repository after a successful
//! backup: `plan_retention` with the VM's `RetentionConfig`, then `forget`.
//! Only committed restore points exist to be counted; chunks are left for
//! `xenvault prune`.

use time::OffsetDateTime;
use xenvault_repo::{KeepOptions, RepoError, Repository, RestorePointInfo, RetentionPlan};
use xenvault_types::config::RetentionConfig;

/// The repository's keep options for a retention configuration (the
/// loader's mapping, so `xenvault prune` plans exactly like the job).
pub fn keep_options(r: &RetentionConfig) -> KeepOptions {
    crate::config::repo::keep_options(r)
}

/// The time of a restore point id (`YYYYMMDDTHHMMSSZ`).
pub fn id_time(id: &str) -> Option<OffsetDateTime> {
    let b = id.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> { id.get(r)?.parse().ok() };
    let date = time::Date::from_calendar_date(
        i32::try_from(num(0..4)?).ok()?,
        time::Month::try_from(u8::try_from(num(4..6)?).ok()?).ok()?,
        u8::try_from(num(6..8)?).ok()?,
    )
    .ok()?;
    let t = time::Time::from_hms(
        u8::try_from(num(9..11)?).ok()?,
        u8::try_from(num(11..13)?).ok()?,
        u8::try_from(num(13..15)?).ok()?,
    )
    .ok()?;
    Some(date.with_time(t).assume_utc())
}

/// The retention plan of one VM's restore points.
pub async fn plan_vm(
    repo: &Repository,
    vm_uuid: &str,
    retention: &RetentionConfig,
    now: OffsetDateTime,
) -> Result<RetentionPlan, RepoError> {
    let mut points = Vec::new();
    for (vm, id) in repo.list_restore_points(Some(vm_uuid)).await? {
        let time = match id_time(&id) {
            Some(t) => t,
            None => match repo.load_manifest(&vm, &id).await {
                Ok(m) => match xenvault_repo::manifest::parse_rfc3339(&m.time) {
                    Some(t) => t,
                    None => continue,
                },
                // Unreadable: never counted, never removed here.
                Err(_) => continue,
            },
        };
        points.push(RestorePointInfo {
            vm_uuid: vm,
            id,
            time,
            complete: true,
        });
    }
    Ok(xenvault_repo::plan_retention(
        &points,
        &keep_options(retention),
        now,
    ))
}

/// Applies the VM's retention: forgets the restore points the plan drops
/// and returns their names (`<vm uuid>/<id>`).
pub async fn apply_vm(
    repo: &Repository,
    vm_uuid: &str,
    retention: &RetentionConfig,
    now: OffsetDateTime,
) -> Result<Vec<String>, RepoError> {
    let plan = plan_vm(repo, vm_uuid, retention, now).await?;
    if plan.to_remove().next().is_none() {
        return Ok(Vec::new());
    }
    repo.forget(&plan).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_as_times() {
        let t = id_time("20261122T035012Z").unwrap();
        assert_eq!(
            xenvault_repo::manifest::restore_point_id(t),
            "20261122T035012Z"
        );
        assert!(id_time("20261122T035012").is_none());
        assert!(id_time("2026112XT035012Z").is_none());
        assert!(id_time("20261340T035012Z").is_none());
    }

    #[test]
    fn keep_options_map_every_field() {
        let r = RetentionConfig {
            keep_last: 3,
            keep_hourly: 1,
            keep_daily: 2,
            keep_weekly: 4,
            keep_monthly: 5,
            keep_yearly: 6,
        };
        let k = keep_options(&r);
        assert_eq!(
            (k.last, k.hourly, k.daily, k.weekly, k.monthly, k.yearly),
            (3, 1, 2, 4, 5, 6)
        );
    }
}
