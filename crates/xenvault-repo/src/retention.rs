//! Retention: which restore points to keep, as a pure plan with a reason per decision.
//!
//! Per VM, newest first, like restic's `forget`: `last` keeps the newest N; each
//! of `hourly`, `daily`, `weekly` (ISO weeks), `monthly`, `yearly` keeps the
//! newest restore point of each of the N most recent periods that have one;
//! `within` keeps everything newer than `now - within`. Periods are UTC. Only
//! complete restore points count; incomplete ones are left alone (never counted,
//! never removed). The newest complete restore point of a VM is always kept, and
//! an empty policy keeps everything. `now` is injected, so plans are testable.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How many restore points to keep.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct KeepOptions {
    /// The newest N.
    pub last: u32,
    /// One per hour, for the N most recent hours that have one.
    pub hourly: u32,
    /// One per day.
    pub daily: u32,
    /// One per ISO week.
    pub weekly: u32,
    /// One per month.
    pub monthly: u32,
    /// One per year.
    pub yearly: u32,
    /// Everything newer than this (seconds).
    pub within_secs: Option<u64>,
}

impl KeepOptions {
    fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.yearly == 0
            && self.within_secs.is_none()
    }
}

/// A restore point as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePointInfo {
    /// VM uuid.
    pub vm_uuid: String,
    /// Restore point id.
    pub id: String,
    /// Its time.
    pub time: OffsetDateTime,
    /// Complete (manifest written; verified when the caller requires it).
    pub complete: bool,
}

/// The decision about one restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The restore point.
    pub point: RestorePointInfo,
    /// Keep it?
    pub keep: bool,
    /// Why (every rule that keeps it, or why it goes).
    pub reasons: Vec<String>,
}

/// Decisions for every restore point, per VM newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// All decisions.
    pub decisions: Vec<Decision>,
}

impl RetentionPlan {
    /// The restore points to remove.
    pub fn to_remove(&self) -> impl Iterator<Item = &RestorePointInfo> {
        self.decisions.iter().filter(|d| !d.keep).map(|d| &d.point)
    }
}

fn period(kind: &str, t: OffsetDateTime) -> (i32, u32) {
    let t = t.to_offset(time::UtcOffset::UTC);
    match kind {
        "hourly" => (t.year(), u32::from(t.ordinal()) * 24 + u32::from(t.hour())),
        "daily" => (t.year(), u32::from(t.ordinal())),
        "weekly" => {
            let (y, w, _) = t.to_iso_week_date();
            (y, u32::from(w))
        }
        "monthly" => (t.year(), u32::from(u8::from(t.month()))),
        _ => (t.year(), 0),
    }
}

fn label(kind: &str, t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    match kind {
        "hourly" => format!(
            "{:04}-{:02}-{:02} {:02}h",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour()
        ),
        "daily" => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
        "weekly" => {
            let (y, w, _) = t.to_iso_week_date();
            format!("{y:04}-W{w:02}")
        }
        "monthly" => format!("{:04}-{:02}", t.year(), u8::from(t.month())),
        _ => format!("{:04}", t.year()),
    }
}

/// Computes the plan. Pure: same input, same plan.
pub fn plan_retention(
    points: &[RestorePointInfo],
    opts: &KeepOptions,
    now: OffsetDateTime,
) -> RetentionPlan {
    let mut by_vm: BTreeMap<&str, Vec<&RestorePointInfo>> = BTreeMap::new();
    for p in points {
        by_vm.entry(&p.vm_uuid).or_default().push(p);
    }
    let mut decisions = Vec::new();
    for (_, mut pts) in by_vm {
        pts.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.cmp(&a.id)));
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); pts.len()];
        let complete: Vec<usize> = (0..pts.len()).filter(|&i| pts[i].complete).collect();
        if let Some(&newest) = complete.first() {
            reasons[newest].push("newest complete restore point of the VM".into());
        }
        if opts.is_empty() {
            for &i in &complete {
                reasons[i].push("no retention rule set: everything is kept".into());
            }
        }
        for (n, &i) in complete.iter().enumerate() {
            if (n as u64) < u64::from(opts.last) {
                reasons[i].push(format!("last {} (#{})", opts.last, n + 1));
            }
            if pts[i].time > now {
                reasons[i].push("newer than now (clock skew?)".into());
            } else if let Some(w) = opts.within_secs
                && now - pts[i].time <= Duration::from_secs(w)
            {
                reasons[i].push(format!("within {w} s of now"));
            }
        }
        for (kind, n) in [
            ("hourly", opts.hourly),
            ("daily", opts.daily),
            ("weekly", opts.weekly),
            ("monthly", opts.monthly),
            ("yearly", opts.yearly),
        ] {
            let mut last_period = None;
            let mut count = 0u32;
            for &i in &complete {
                if count >= n {
                    break;
                }
                let p = period(kind, pts[i].time);
                if last_period != Some(p) {
                    last_period = Some(p);
                    count += 1;
                    reasons[i].push(format!("{kind} #{count} ({})", label(kind, pts[i].time)));
                }
            }
        }
        for (i, p) in pts.iter().enumerate() {
            let (keep, why) = if !p.complete {
                (
                    true,
                    vec!["incomplete: not counted and left alone".to_string()],
                )
            } else if reasons[i].is_empty() {
                (false, vec!["matched no keep rule".to_string()])
            } else {
                (true, std::mem::take(&mut reasons[i]))
            };
            decisions.push(Decision {
                point: (*p).clone(),
                keep,
                reasons: why,
            });
        }
    }
    RetentionPlan { decisions }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn rp(vm: &str, t: OffsetDateTime) -> RestorePointInfo {
        RestorePointInfo {
            vm_uuid: vm.into(),
            id: crate::manifest::restore_point_id(t),
            time: t,
            complete: true,
        }
    }

    fn kept(plan: &RetentionPlan) -> Vec<String> {
        let mut v: Vec<String> = plan
            .decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| format!("{}/{}", d.point.vm_uuid, d.point.id))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn last_and_daily_per_vm() {
        let now = datetime!(2026-11-22 12:00 UTC);
        let mut pts = Vec::new();
        for d in 0..10i64 {
            // Two backups a day for ten days.
            pts.push(rp(
                "a",
                now - time::Duration::days(d) - time::Duration::hours(1),
            ));
            pts.push(rp(
                "a",
                now - time::Duration::days(d) - time::Duration::hours(5),
            ));
        }
        pts.push(rp("b", now - time::Duration::days(30)));
        let opts = KeepOptions {
            last: 2,
            daily: 3,
            ..Default::default()
        };
        let plan = plan_retention(&pts, &opts, now);
        let k = kept(&plan);
        // a: newest two (same day), daily for days 0,1,2 (newest of each), b: its only one.
        assert_eq!(k.len(), 2 + 2 + 1, "{k:?}");
        assert!(k.contains(&"b/20261023T120000Z".to_string()));
        let d = plan
            .decisions
            .iter()
            .find(|d| d.point.id == "20261122T110000Z")
            .unwrap();
        assert!(d.reasons.iter().any(|r| r.starts_with("last 2")));
        assert!(
            d.reasons
                .iter()
                .any(|r| r.starts_with("daily #1 (2026-11-22)"))
        );
        assert!(d.reasons.iter().any(|r| r.starts_with("newest")));
        let gone = plan.decisions.iter().filter(|d| !d.keep).count();
        assert_eq!(gone, 16);
        assert!(plan.to_remove().all(|p| p.vm_uuid == "a"));
        assert!(
            plan.decisions
                .iter()
                .filter(|d| !d.keep)
                .all(|d| d.reasons == ["matched no keep rule"])
        );
    }

    #[test]
    fn weekly_monthly_yearly_and_within() {
        let now = datetime!(2026-11-22 12:00 UTC);
        let pts: Vec<_> = (0..800i64)
            .map(|d| rp("v", now - time::Duration::days(d)))
            .collect();
        let plan = plan_retention(
            &pts,
            &KeepOptions {
                weekly: 4,
                monthly: 6,
                yearly: 3,
                ..Default::default()
            },
            now,
        );
        // The newest point of each of the 4 newest ISO weeks (2026-11-22 is a
        // Sunday, the last day of its week), of the 6 newest months and of the
        // 3 newest years; the newest point is kept by all three.
        let want: Vec<String> = [
            "20241231T120000Z",
            "20251231T120000Z",
            "20260630T120000Z",
            "20260731T120000Z",
            "20260831T120000Z",
            "20260930T120000Z",
            "20261031T120000Z",
            "20261101T120000Z",
            "20261108T120000Z",
            "20261115T120000Z",
            "20261122T120000Z",
        ]
        .iter()
        .map(|id| format!("v/{id}"))
        .collect();
        assert_eq!(kept(&plan), want);
        let within = plan_retention(
            &pts,
            &KeepOptions {
                within_secs: Some(3 * 86400),
                ..Default::default()
            },
            now,
        );
        assert_eq!(kept(&within).len(), 4);
    }

    #[test]
    fn hourly_keeps_the_newest_point_of_each_hour() {
        let now = datetime!(2026-11-22 12:00 UTC);
        // A backup every 20 minutes for 10 hours: 11:40, 11:20, 11:00, 10:40, …
        let pts: Vec<_> = (1..=30i64)
            .map(|k| rp("v", now - time::Duration::minutes(20 * k)))
            .collect();
        let plan = plan_retention(
            &pts,
            &KeepOptions {
                hourly: 3,
                ..Default::default()
            },
            now,
        );
        assert_eq!(
            kept(&plan),
            vec![
                "v/20261122T094000Z",
                "v/20261122T104000Z",
                "v/20261122T114000Z",
            ]
        );
        let d = plan
            .decisions
            .iter()
            .find(|d| d.point.id == "20261122T104000Z")
            .unwrap();
        assert!(
            d.reasons.iter().any(|r| r.starts_with("hourly #2")),
            "{:?}",
            d.reasons
        );
    }

    #[test]
    fn incomplete_points_neither_count_nor_go_and_empty_policy_keeps_all() {
        let now = datetime!(2026-11-22 12:00 UTC);
        let mut newest = rp("v", now);
        newest.complete = false;
        let older = rp("v", now - time::Duration::hours(1));
        let oldest = rp("v", now - time::Duration::hours(2));
        let pts = vec![newest.clone(), older.clone(), oldest.clone()];
        let plan = plan_retention(
            &pts,
            &KeepOptions {
                last: 1,
                ..Default::default()
            },
            now,
        );
        let k = kept(&plan);
        assert_eq!(
            k,
            vec![format!("v/{}", older.id), format!("v/{}", newest.id)]
        );
        let all = plan_retention(&pts, &KeepOptions::default(), now);
        assert_eq!(kept(&all).len(), 3);
        // The newest complete point survives even a policy that matches nothing.
        let p = plan_retention(
            std::slice::from_ref(&oldest),
            &KeepOptions {
                within_secs: Some(1),
                ..Default::default()
            },
            now,
        );
        assert_eq!(kept(&p).len(), 1);
    }
}
