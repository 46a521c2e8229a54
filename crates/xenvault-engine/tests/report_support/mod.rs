//! A sample run report shared by the report and email tests.
#![allow(dead_code)]

use time::macros::datetime;
use xenvault_types::report::{CleanupOutcome, ItemKind, ItemReport, Outcome, RunReport, VmReport};

/// A run with one success, one failure, one skip, pool metadata and a failed host.
pub fn sample_report() -> RunReport {
    let mut r = RunReport::new(
        "nightly",
        "pool1",
        "xcp-master.example",
        "run-42",
        "/mnt/backup",
        datetime!(2026-11-22 01:00:00 UTC),
    );
    r.finished = datetime!(2026-11-22 01:12:30 UTC);
    r.vms.push(VmReport {
        name: "web-01".into(),
        uuid: "aaaaaaaa-0000-0000-0000-000000000001".into(),
        started: Some(datetime!(2026-11-22 01:00:05 UTC)),
        finished: Some(datetime!(2026-11-22 01:05:13 UTC)),
        bytes: 3 << 30,
        outcome: Outcome::Succeeded,
        cleanup: CleanupOutcome::Cleaned {
            snapshots: 1,
            vdis: 2,
        },
        location: Some("/mnt/backup/web-01/20261122-010005".into()),
        pruned: vec!["/mnt/backup/web-01/20261119-010004".into()],
        notes: vec![],
        repository: None,
    });
    r.vms.push(VmReport {
        name: "db-02".into(),
        uuid: "aaaaaaaa-0000-0000-0000-000000000002".into(),
        started: Some(datetime!(2026-11-22 01:05:14 UTC)),
        finished: Some(datetime!(2026-11-22 01:07:00 UTC)),
        bytes: 0,
        outcome: Outcome::failed("export mid-stream: VDI_IO_ERROR [Device I/O errors]"),
        cleanup: CleanupOutcome::Cleaned {
            snapshots: 1,
            vdis: 1,
        },
        location: None,
        pruned: vec![],
        notes: vec![],
        repository: None,
    });
    r.vms.push(VmReport::skipped(
        "big-03",
        "aaaaaaaa-0000-0000-0000-000000000003",
        "SR Local storage is 91% used (threshold 80%)",
    ));
    r.pool_metadata.push(ItemReport {
        kind: ItemKind::PoolMetadata,
        name: "pool1".into(),
        uuid: None,
        started: Some(datetime!(2026-11-22 01:10:00 UTC)),
        finished: Some(datetime!(2026-11-22 01:10:02 UTC)),
        bytes: 2 << 20,
        outcome: Outcome::Succeeded,
        location: Some("/mnt/backup/_pool-metadata/pool1/20261122-011000".into()),
        pruned: vec![],
    });
    r.hosts.push(ItemReport {
        kind: ItemKind::HostBackup,
        name: "xcp-a".into(),
        uuid: Some("host-1".into()),
        started: Some(datetime!(2026-11-22 01:10:03 UTC)),
        finished: Some(datetime!(2026-11-22 01:10:04 UTC)),
        bytes: 0,
        outcome: Outcome::failed("host_backup: HTTP 500"),
        location: None,
        pruned: vec![],
    });
    r
}
