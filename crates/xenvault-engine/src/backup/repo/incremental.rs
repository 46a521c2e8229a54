//! How each disk of a repository backup is read: the best method the chain
//! allows, and why not a better one (DESIGN.md decision 7).
//!
//! In order of preference, per disk:
//!
//! 1. **CBT + NBD** (`nbd-cbt`): `VDI.list_changed_blocks(base snapshot VDI,
//!    new snapshot VDI)` (older first; xapi-facts §2.3), then only the
//!    changed 64 KiB blocks are read over NBD into an incremental disk whose
//!    index starts from the parent restore point's disk. Needs CBT on the
//!    new snapshot VDI and on the kept base VDI (which may be `cbt_metadata`).
//!    If NBD cannot be reached, the VHD differencing export below is used
//!    (or, with a metadata-only base, the whole disk).
//! 2. **VHD differencing export** (`vhd-diff`):
//!    `/export_raw_vdi?format=vhd&base=<base snapshot VDI>` when CBT cannot
//!    be used (the job says `cbt = "off"`, or the disk or its base has no
//!    CBT), fed to the same incremental disk. Needs the base's data: a
//!    `cbt_metadata` base has no VHD (xapi-facts §5.5).
//! 3. **Full** (`nbd-full`, or `vhd-full` without NBD) when the chain is
//!    broken: no parent restore point or no disk of that key in it, no
//!    kept base for the parent (first run of the job, state directory
//!    lost), the base VDI gone from the pool or not a snapshot of this
//!    disk, a metadata-only base without usable CBT, `list_changed_blocks`
//!    failing (CBT reset, unrelated logs), or the disk resized since the
//!    parent (`RepoError::DiskResized` would refuse the incremental disk).
//!
//! Every plan but the best carries its reason; it goes to the manifest's
//! disk `meta.reason` and the run report.

use std::ops::Range;

use xenvault_repo::{FixedIndex, Manifest};
use xenvault_types::config::CbtMode;
use xenvault_xapi::cbt::ChangedBlocks;
use xenvault_xapi::records::{VdiRef, VdiType};

pub use super::base::{VmPrep, prepare_vm};
use super::{DiskReadPlan, DiskSource, ReadMethod, VmContext, base, resume};

/// What the chain says about one disk's base, once looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseVdi {
    /// Its uuid (the `base=` of a VHD differencing export).
    uuid: String,
    /// Its reference.
    vdi_ref: VdiRef,
    /// Reduced to CBT metadata (no data, no VHD).
    metadata_only: bool,
    /// CBT is on for it.
    cbt_enabled: bool,
}

/// A full read of the disk, with why it is full.
pub fn full_plan(reason: impl Into<String>) -> DiskReadPlan {
    DiskReadPlan::full(Some(reason.into()))
}

/// A VHD differencing export against `base_vdi_uuid`, incremental on the
/// parent's disk `key`.
pub fn vhd_diff_plan(key: &str, base_vdi_uuid: &str, reason: Option<String>) -> DiskReadPlan {
    DiskReadPlan {
        method: ReadMethod::VhdDiff,
        reason,
        parent_disk_key: Some(key.to_string()),
        ranges: None,
        vhd_base: Some(base_vdi_uuid.to_string()),
        nbd_fallback: None,
        start: None,
    }
}

/// The whole disk as a VHD export, written on the parent's disk `key`
/// (every chunk is fed: allocated blocks as data, the rest as zeros), for
/// when NBD is unreachable and the base has no data for a differencing
/// export.
pub fn vhd_whole_on_parent_plan(key: &str, reason: String) -> DiskReadPlan {
    DiskReadPlan {
        method: ReadMethod::VhdFull,
        reason: Some(reason),
        parent_disk_key: Some(key.to_string()),
        ranges: None,
        vhd_base: None,
        nbd_fallback: None,
        start: None,
    }
}

/// The changed ranges of a CBT bitmap, read over NBD onto the parent's disk
/// `key` (widened to whole chunks where the parent holds data, see
/// [`widen_to_chunks`]); `fallback` is used when NBD cannot be reached.
pub fn cbt_plan(
    key: &str,
    changed: &ChangedBlocks,
    parent_index: Option<&FixedIndex>,
    fallback: DiskReadPlan,
) -> DiskReadPlan {
    let ranges = changed_ranges(changed);
    let ranges = match parent_index {
        Some(index) => widen_to_chunks(&ranges, index),
        None => ranges,
    };
    DiskReadPlan {
        method: ReadMethod::NbdCbt,
        reason: None,
        parent_disk_key: Some(key.to_string()),
        ranges: Some(ranges),
        vhd_base: None,
        nbd_fallback: Some(Box::new(fallback)),
        start: None,
    }
}

/// The byte ranges of the changed 64 KiB blocks, merged, clipped to the
/// disk's end (64 KiB is a multiple of NBD's 512-byte alignment).
pub fn changed_ranges(changed: &ChangedBlocks) -> Vec<Range<u64>> {
    changed.ranges().collect()
}

/// Widens `ranges` (sorted, disjoint) to whole chunks of `index` wherever the
/// parent chunk holds data: the writer then gets complete chunks from the
/// snapshot (read over NBD, several connections) and never fetches, decrypts
/// and decompresses the parent chunk from the repository, which may be
/// remote (ADR 0009). Where the parent chunk is the zero chunk the writer
/// completes it with zeros, so only the changed blocks are read there.
pub fn widen_to_chunks(ranges: &[Range<u64>], index: &FixedIndex) -> Vec<Range<u64>> {
    let cs = u64::from(index.chunk_size);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    let mut push = |r: Range<u64>| match out.last_mut() {
        Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
        _ => out.push(r),
    };
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let chunk = at / cs;
            let (c_start, c_len) = index.chunk_range(chunk);
            let c_end = c_start + c_len;
            if c_len == 0 {
                // Past the parent's disk end (cannot happen: sizes match).
                push(at..r.end);
                break;
            }
            let piece_end = r.end.min(c_end);
            let parent_has_data = index
                .ids
                .get(chunk as usize)
                .is_some_and(|id| !id.is_zero());
            if parent_has_data {
                push(c_start..c_end);
            } else {
                push(at..piece_end);
            }
            at = piece_end;
        }
    }
    out
}

/// The disk meta's `snapshot_vdi_uuid` of the parent's disk `key`.
fn parent_snapshot_vdi(parent: &Manifest, key: &str) -> Option<String> {
    let disk = parent.disk(key).ok()?;
    disk.meta
        .get("snapshot_vdi_uuid")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

/// Chooses how to read `disk` (see the module docs), resuming an
/// interrupted backup of it when a checkpoint allows (`resume.rs`). Never
/// fails: anything unexpected gives a full read with the reason.
pub async fn choose_plan(ctx: &VmContext<'_>, disk: &DiskSource) -> DiskReadPlan {
    let mut plan = choose_best(ctx, disk).await;
    if let Some(parts) = resume::resume_parts(ctx, disk, &plan).await {
        plan.reason = Some(match plan.reason.take() {
            Some(r) => format!("{r}; {}", parts.note),
            None => parts.note,
        });
        plan.ranges = Some(parts.ranges);
        plan.start = Some(parts.start);
    }
    plan
}

/// The best method the chain allows for `disk`, without resume.
async fn choose_best(ctx: &VmContext<'_>, disk: &DiskSource) -> DiskReadPlan {
    let p = ctx.p;
    let size = disk.meta.virtual_size;
    let Some(parent) = ctx.parent else {
        return full_plan("first backup of this VM in the repository (no earlier restore point)");
    };
    let Ok(pdisk) = parent.disk(&disk.key) else {
        return full_plan(format!(
            "restore point {} has no disk {} (a disk added since)",
            parent.id, disk.key
        ));
    };
    if pdisk.size != size {
        return full_plan(format!(
            "disk resized from {} to {size} bytes since restore point {}",
            pdisk.size, parent.id
        ));
    }
    if pdisk.chunk_size != p.repo.chunk_size() {
        return full_plan(format!(
            "restore point {} uses {}-byte chunks, the repository {}",
            parent.id,
            pdisk.chunk_size,
            p.repo.chunk_size()
        ));
    }
    let Some(kept) = base::base_for(p, &ctx.task.vm_uuid, &parent.id) else {
        return full_plan(format!(
            "no base snapshot of restore point {} is kept on the pool (first run of job {}, or the state directory {} lost its journal)",
            parent.id,
            p.run.job,
            p.run.journal.dir().display()
        ));
    };
    let Some(base_uuid) = parent_snapshot_vdi(parent, &disk.key) else {
        return full_plan(format!(
            "restore point {} does not name the snapshot VDI of disk {}",
            parent.id, disk.key
        ));
    };
    if !kept.token.vdis.contains(&base_uuid) {
        return full_plan(format!(
            "the base snapshot VDI {base_uuid} of restore point {} is not one the journal keeps",
            parent.id
        ));
    }
    let base = match look_at_base(ctx, disk, &base_uuid).await {
        Ok(b) => b,
        Err(why) => return full_plan(why),
    };

    // The new snapshot VDI's CBT state.
    let new_cbt = match &disk.snapshot_record {
        Some(r) => r.cbt_enabled,
        None => p
            .session
            .vdi()
            .get_record(&disk.snapshot_vdi)
            .await
            .is_ok_and(|r| r.cbt_enabled),
    };
    let cbt_unusable: Option<String> = if p.settings.cbt == CbtMode::Off {
        Some("the job says cbt = \"off\"".into())
    } else if !new_cbt {
        Some(format!(
            "CBT is off on disk {} ({}){}",
            disk.meta.userdevice,
            disk.key,
            if p.settings.cbt == CbtMode::Use {
                "; set cbt = \"enable\" in the job to turn it on"
            } else {
                ""
            }
        ))
    } else if !base.cbt_enabled {
        Some(format!(
            "CBT was off on the base snapshot VDI {} (enabled since)",
            base.uuid
        ))
    } else {
        None
    };

    if let Some(why) = cbt_unusable {
        if base.metadata_only {
            return full_plan(format!(
                "{why}, and the base {} is CBT metadata only (base = \"metadata\"), so no VHD differencing export is possible",
                base.uuid
            ));
        }
        return vhd_diff_plan(&disk.key, &base.uuid, Some(why));
    }

    // CBT between the base and the new snapshot (older first).
    let text = match p
        .session
        .vdi()
        .list_changed_blocks(&base.vdi_ref, &disk.snapshot_vdi)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            return full_plan(format!(
                "VDI.list_changed_blocks({}, {}) failed: {e} (CBT reset or its logs unrelated)",
                base.uuid, disk.meta.vdi_uuid
            ));
        }
    };
    let changed = match ChangedBlocks::from_base64(&text, size) {
        Ok(c) => c,
        Err(e) => return full_plan(e.to_string()),
    };
    let fallback = if base.metadata_only {
        vhd_whole_on_parent_plan(
            &disk.key,
            format!(
                "the base {} is CBT metadata only, so the whole disk is read as VHD",
                base.uuid
            ),
        )
    } else {
        vhd_diff_plan(&disk.key, &base.uuid, None)
    };
    // The parent's index tells which touched chunks hold data (read whole).
    let parent_index = match ctx.parent.map(|m| m.disk(&disk.key)) {
        Some(Ok(entry)) => match p.repo.load_index(&entry.index).await {
            Ok(index) => Some(index),
            Err(e) => return full_plan(format!("the parent's index is unreadable: {e}")),
        },
        _ => None,
    };
    cbt_plan(&disk.key, &changed, parent_index.as_ref(), fallback)
}

/// Finds the base VDI on the pool and checks it is a snapshot of the same
/// disk. `Err` = why the chain is broken.
async fn look_at_base(
    ctx: &VmContext<'_>,
    disk: &DiskSource,
    base_uuid: &str,
) -> Result<BaseVdi, String> {
    let session = &ctx.p.session;
    let vdi_ref =
        session.vdi().get_by_uuid(base_uuid).await.map_err(|e| {
            format!("the base snapshot VDI {base_uuid} is gone from the pool ({e})")
        })?;
    let rec =
        session.vdi().get_record(&vdi_ref).await.map_err(|e| {
            format!("the base snapshot VDI {base_uuid} is gone from the pool ({e})")
        })?;
    if !rec.is_a_snapshot {
        return Err(format!("the base VDI {base_uuid} is not a snapshot"));
    }
    if let Some(src) = &disk.source_vdi
        && rec.snapshot_of != *src
    {
        return Err(format!(
            "the base VDI {base_uuid} is not a snapshot of disk {} (VDI {})",
            disk.meta.userdevice, disk.key
        ));
    }
    Ok(BaseVdi {
        uuid: base_uuid.to_string(),
        vdi_ref,
        metadata_only: rec.type_ == VdiType::CbtMetadata,
        cbt_enabled: rec.cbt_enabled,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use xenvault_xapi::cbt::CBT_BLOCK_SIZE;

    #[test]
    fn cbt_plan_reads_only_changed_blocks_and_falls_back_to_vhd_diff() {
        let size = 40 * CBT_BLOCK_SIZE + 4096;
        let mut cb = ChangedBlocks::new(size);
        for b in [0, 1, 7, 40] {
            cb.mark_block(b);
        }
        let plan = cbt_plan(
            "disk-a",
            &cb,
            None,
            vhd_diff_plan("disk-a", "base-vdi", None),
        );
        assert_eq!(plan.method, ReadMethod::NbdCbt);
        assert!(plan.reason.is_none());
        assert_eq!(plan.parent_disk_key.as_deref(), Some("disk-a"));
        assert_eq!(
            plan.ranges.clone().unwrap(),
            vec![
                0..2 * CBT_BLOCK_SIZE,
                7 * CBT_BLOCK_SIZE..8 * CBT_BLOCK_SIZE,
                40 * CBT_BLOCK_SIZE..size
            ]
        );
        let fb = plan.nbd_fallback.unwrap();
        assert_eq!(fb.method, ReadMethod::VhdDiff);
        assert_eq!(fb.vhd_base.as_deref(), Some("base-vdi"));
        assert_eq!(fb.parent_disk_key.as_deref(), Some("disk-a"));
    }

    #[test]
    fn no_change_reads_nothing() {
        let cb = ChangedBlocks::new(8 * CBT_BLOCK_SIZE);
        let plan = cbt_plan("k", &cb, None, vhd_diff_plan("k", "b", None));
        assert_eq!(plan.ranges, Some(Vec::new()));
    }

    #[test]
    fn full_plans_say_why_and_fall_back_to_a_whole_vhd() {
        let plan = full_plan("disk resized");
        assert_eq!(plan.method, ReadMethod::NbdFull);
        assert_eq!(plan.reason.as_deref(), Some("disk resized"));
        assert!(!plan.is_incremental());
        let fb = plan.nbd_fallback.unwrap();
        assert_eq!(fb.method, ReadMethod::VhdFull);
        assert!(!fb.is_incremental());
    }

    #[test]
    fn metadata_base_fallback_keeps_the_parent_disk() {
        let plan = vhd_whole_on_parent_plan("k", "metadata only".into());
        assert_eq!(plan.method, ReadMethod::VhdFull);
        assert_eq!(plan.parent_disk_key.as_deref(), Some("k"));
        assert!(plan.vhd_base.is_none());
        let cb = ChangedBlocks::new(CBT_BLOCK_SIZE);
        let cbt = cbt_plan("k", &cb, None, plan);
        // The executor requires a fallback on the same parent disk.
        assert_eq!(
            cbt.nbd_fallback.as_ref().unwrap().parent_disk_key,
            cbt.parent_disk_key
        );
    }

    #[test]
    fn touched_chunks_with_parent_data_are_read_whole() {
        const MIB: u64 = 1 << 20;
        // 3.5 MiB disk of 1 MiB chunks: chunk 1 and 3 hold data in the parent.
        let mut index = FixedIndex::zeroed(3 * MIB + MIB / 2, MIB as u32);
        index.ids[1] = xenvault_repo::ChunkId([7; 32]);
        index.ids[3] = xenvault_repo::ChunkId([9; 32]);
        let k = 64 * 1024;
        let ranges = vec![
            k..2 * k,                     // chunk 0 (zero parent): as is
            MIB + 3 * k..MIB + 4 * k,     // chunk 1: whole
            MIB + 8 * k..2 * MIB + k,     // chunk 1 (whole) then chunk 2 (zero parent)
            3 * MIB + k..3 * MIB + 2 * k, // chunk 3 (last, short): whole
        ];
        assert_eq!(
            widen_to_chunks(&ranges, &index),
            vec![k..2 * k, MIB..2 * MIB + k, 3 * MIB..3 * MIB + MIB / 2]
        );
        // Without data anywhere in the parent nothing is widened.
        let empty = FixedIndex::zeroed(4 * MIB, MIB as u32);
        assert_eq!(widen_to_chunks(&ranges, &empty), ranges);
    }
}
