//! Resume of an interrupted repository backup: checkpoints of the disks
//! being written (a local state file, a hint never referenced by the
//! repository) and the plan that continues from them.
//!
//! While a disk is read over NBD, [`ResumeRecorder`] checkpoints its
//! `DiskWriter` (`DiskWriter::checkpoint`: the chunks wholly below `done`
//! are stored, their ids in the index) every `interval` bytes fed, when the
//! read fails, and before the disk is finished. The first checkpoint of a
//! snapshot keeps that snapshot on the pool (journal `kept`, role
//! `resume`, tag `xenvault:resume=<job>`) BEFORE the state names it; the
//! state is then written atomically:
//! `<state dir>/resume/<pool>/<job>/<vm uuid>/state.json` plus one
//! `<disk key>.<token>.fidx` per disk (the index bytes of the repository
//! format, with their own BLAKE3).
//!
//! The next run of the job for that VM ([`resume_plan`]) uses the state
//! when it belongs to the same repository, its snapshot is still kept and
//! has CBT, and the parent restore point is the one the interrupted run
//! wrote against. Per disk: the starting index = the checkpoint's ids below
//! `done`, the parent's (incremental) or zero ids (full) above; the ranges
//! read = what CBT says changed between the checkpoint's snapshot and the
//! new one below `done`, plus what the normal plan reads above `done`. The
//! executor calls [`ResumeStart::prepare`] once the restore point's shared
//! lock is held: every checkpointed chunk is `stat`ed, and a missing one
//! (a prune sweep may remove unreferenced chunks between runs) is read
//! again. VHD methods do not resume (a VHD export cannot start mid-disk).
//!
//! After a commit the state is removed and the snapshot becomes the base
//! (`base.rs`); a superseded resume snapshot is released then.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use xenvault_repo::{ChunkId, DiskCheckpoint, DiskWriter, FixedIndex, Repository};
use xenvault_xapi::cbt::ChangedBlocks;

use super::{DiskReadPlan, DiskSource, RepoPipeline, VmContext};
use crate::journal::{self, KeepRole};

/// Version of the state file.
const STATE_VERSION: u32 = 1;
/// Checkpoint at most this often by time (and at least every
/// [`interval_for`] bytes).
const CHECKPOINT_PERIOD: Duration = Duration::from_secs(30);

/// One disk of a resume state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeDisk {
    /// The snapshot VDI it was read from.
    pub snapshot_vdi_uuid: String,
    /// Disk size.
    pub size: u64,
    /// Chunk size of the index.
    pub chunk_size: u32,
    /// Bytes from the start whose chunks are stored.
    pub done: u64,
    /// The index file (in the VM's state directory).
    pub index_file: String,
}

/// The resume state of one VM of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeState {
    /// Format version (1).
    pub version: u32,
    /// Pool name.
    pub pool: String,
    /// Job name.
    pub job: String,
    /// The VM.
    pub vm_uuid: String,
    /// The repository's id.
    pub repository: String,
    /// The journal token of the snapshot read from.
    pub token: String,
    /// The snapshot VM's uuid.
    pub snapshot_uuid: String,
    /// The parent restore point the interrupted run wrote against.
    pub parent: Option<String>,
    /// Last update.
    #[serde(with = "xenvault_types::report::rfc3339")]
    pub updated: OffsetDateTime,
    /// Checkpointed disks by repository disk key.
    pub disks: BTreeMap<String, ResumeDisk>,
}

/// Checkpoint every `size / 16` bytes, at least 8 chunks, at most 1 GiB.
pub fn interval_for(size: u64, chunk_size: u32) -> u64 {
    (size / 16).clamp(8 * u64::from(chunk_size), 1 << 30)
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The directory of a VM's resume state.
pub fn state_dir(journal_dir: &Path, pool: &str, job: &str, vm_uuid: &str) -> PathBuf {
    journal_dir
        .join("resume")
        .join(safe(pool))
        .join(safe(job))
        .join(safe(vm_uuid))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the state of a VM, if any (an unreadable one is ignored and logged).
pub fn load_state(dir: &Path) -> Option<ResumeState> {
    let text = std::fs::read(dir.join("state.json")).ok()?;
    match serde_json::from_slice::<ResumeState>(&text) {
        Ok(s) if s.version == STATE_VERSION => Some(s),
        Ok(s) => {
            tracing::warn!(
                "resume state {} has version {}; ignored",
                dir.display(),
                s.version
            );
            None
        }
        Err(e) => {
            tracing::warn!("resume state {} unreadable ({e}); ignored", dir.display());
            None
        }
    }
}

/// Reads a checkpoint index file.
pub fn load_index(dir: &Path, file: &str) -> Option<FixedIndex> {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).ok()?;
    FixedIndex::from_bytes(&path.display().to_string(), &bytes).ok()
}

/// Removes a VM's resume state.
pub fn remove_state(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove the resume state {}: {e}", dir.display());
    }
}

/// Checkpoints the disks of one VM backup (see the module docs).
///
/// A checkpoint that falls due while a disk is read is published and
/// recorded by a background task (ADR 0010): the reader drains its chunks in
/// flight and goes on while the disk flushes them. One such task runs at a
/// time (the next due checkpoint, a failed read and the end of a disk wait
/// for it), so states are written in order; dropping the recorder (a stopped
/// run) cancels a task still running.
pub struct ResumeRecorder {
    shared: Arc<RecorderShared>,
    background: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct RecorderShared {
    dir: PathBuf,
    pipeline: RepoPipeline,
    token: String,
    snapshot_uuid: String,
    vm_uuid: String,
    disk_count: usize,
    parent: Mutex<Option<String>>,
    inner: tokio::sync::Mutex<RecorderState>,
    since: Mutex<BTreeMap<String, (u64, Instant)>>,
}

#[derive(Default)]
struct RecorderState {
    /// The snapshot is kept (role resume) and the state names it.
    kept: bool,
    /// Disks checkpointed so far.
    disks: BTreeMap<String, ResumeDisk>,
    /// Checkpoints are off after a failure to keep or write.
    broken: bool,
}

impl Drop for ResumeRecorder {
    fn drop(&mut self) {
        let task = self
            .background
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

impl ResumeRecorder {
    /// A recorder for the VM backup of `vm_uuid` (with `disk_count` disks)
    /// from the snapshot of journal `token`.
    pub fn new(
        p: &RepoPipeline,
        vm_uuid: &str,
        token: &str,
        snapshot_uuid: &str,
        disk_count: usize,
    ) -> ResumeRecorder {
        ResumeRecorder {
            shared: Arc::new(RecorderShared {
                dir: state_dir(p.run.journal.dir(), &p.run.pool, &p.run.job, vm_uuid),
                pipeline: p.clone(),
                token: token.to_string(),
                snapshot_uuid: snapshot_uuid.to_string(),
                vm_uuid: vm_uuid.to_string(),
                disk_count,
                parent: Mutex::new(None),
                inner: tokio::sync::Mutex::new(RecorderState::default()),
                since: Mutex::new(BTreeMap::new()),
            }),
            background: Mutex::new(None),
        }
    }

    /// The restore point the writer was begun against (its parent).
    pub fn set_parent(&self, parent: Option<&str>) {
        *self.shared.parent.lock().unwrap_or_else(|e| e.into_inner()) = parent.map(str::to_string);
    }

    /// `len` bytes were fed to `dw`: checkpoints when due, the publishing
    /// and recording in the background.
    pub async fn fed(&self, disk: &DiskSource, dw: &mut DiskWriter, len: u64) {
        let interval = interval_for(
            disk.meta.virtual_size,
            self.shared.pipeline.repo.chunk_size(),
        );
        let due = {
            let mut since = self.shared.since.lock().unwrap_or_else(|e| e.into_inner());
            let entry = since
                .entry(disk.key.clone())
                .or_insert_with(|| (0, Instant::now()));
            entry.0 += len;
            if entry.0 >= interval || (entry.0 > 0 && entry.1.elapsed() >= CHECKPOINT_PERIOD) {
                *entry = (0, Instant::now());
                true
            } else {
                false
            }
        };
        if !due {
            return;
        }
        let staged = match dw.stage_checkpoint().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("disk {}: no checkpoint ({e})", disk.key);
                return;
            }
        };
        // The previous one first: states are written in order.
        self.settle().await;
        let shared = self.shared.clone();
        let (key, vdi_uuid) = (disk.key.clone(), disk.meta.vdi_uuid.clone());
        let task = tokio::spawn(async move {
            match staged.publish().await {
                Ok(cp) => shared.record(&key, &vdi_uuid, cp).await,
                Err(e) => tracing::warn!("disk {key}: no checkpoint ({e})"),
            }
        });
        *self.background.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Waits for the checkpoint being recorded in the background, if any.
    pub async fn settle(&self) {
        let task = self
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::warn!("VM {}: a checkpoint task failed: {e}", self.shared.vm_uuid);
        }
    }

    /// The disk's read failed: checkpoints what is stored.
    pub async fn failed(&self, disk: &DiskSource, dw: &mut DiskWriter) {
        self.checkpoint(disk, dw).await;
    }

    /// Before `DiskWriter::finish`: waits for a checkpoint still being
    /// recorded; then, for VMs of several disks (a later disk may still
    /// fail), records the whole disk as stored.
    pub async fn finishing(&self, disk: &DiskSource, dw: &mut DiskWriter) {
        self.settle().await;
        if self.shared.disk_count > 1 {
            self.checkpoint(disk, dw).await;
        }
    }

    /// Checkpoints `dw` now, after the one in the background (failures are
    /// logged: a checkpoint is a hint).
    pub async fn checkpoint(&self, disk: &DiskSource, dw: &mut DiskWriter) {
        self.settle().await;
        match dw.checkpoint().await {
            Ok(cp) => self.shared.record(&disk.key, &disk.meta.vdi_uuid, cp).await,
            Err(e) => tracing::warn!("disk {}: no checkpoint ({e})", disk.key),
        }
    }
}

impl RecorderShared {
    /// Records the published checkpoint `cp` of disk `key` (read from the
    /// snapshot VDI `vdi_uuid`): keeps the snapshot the first time, before
    /// any state names it, then writes the state atomically.
    async fn record(&self, key: &str, vdi_uuid: &str, cp: DiskCheckpoint) {
        if cp.done == 0 {
            return;
        }
        let mut st = self.inner.lock().await;
        if st.broken {
            return;
        }
        if !st.kept {
            // Keep the snapshot BEFORE any state names it.
            let target = self.pipeline.repo.config().id.to_string();
            if let Err(e) = journal::keep_snapshot(
                &self.pipeline.session,
                &self.pipeline.run,
                &self.token,
                KeepRole::Resume,
                &target,
                None,
            )
            .await
            {
                tracing::warn!(
                    "VM {}: cannot keep snapshot {} for resuming ({e}); no checkpoints",
                    self.vm_uuid,
                    self.snapshot_uuid
                );
                st.broken = true;
                return;
            }
            st.kept = true;
        }
        let index_file = format!("{}.{}.fidx", safe(key), safe(&self.token));
        st.disks.insert(
            key.to_string(),
            ResumeDisk {
                snapshot_vdi_uuid: vdi_uuid.to_string(),
                size: cp.index.disk_size,
                chunk_size: cp.index.chunk_size,
                done: cp.done,
                index_file: index_file.clone(),
            },
        );
        let state = ResumeState {
            version: STATE_VERSION,
            pool: self.pipeline.run.pool.clone(),
            job: self.pipeline.run.job.clone(),
            vm_uuid: self.vm_uuid.clone(),
            repository: self.pipeline.repo.config().id.to_string(),
            token: self.token.clone(),
            snapshot_uuid: self.snapshot_uuid.clone(),
            parent: self
                .parent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            updated: OffsetDateTime::now_utc(),
            disks: st.disks.clone(),
        };
        let (dir, index_bytes) = (self.dir.clone(), cp.index.to_bytes());
        // Files are synced: off the runtime's threads.
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            write_atomic(&dir.join(&index_file), &index_bytes)?;
            let json = serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?;
            write_atomic(&dir.join("state.json"), &json)?;
            // Index files of other snapshots are no longer named.
            for entry in std::fs::read_dir(&dir)?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".fidx") && !state.disks.values().any(|d| d.index_file == name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| {
            Err(std::io::Error::other(format!(
                "the writing task failed: {e}"
            )))
        });
        match written {
            Ok(()) => tracing::debug!(
                "VM {}: disk {} checkpointed at {} of {} bytes",
                self.vm_uuid,
                key,
                cp.done,
                cp.index.disk_size
            ),
            Err(e) => {
                tracing::warn!(
                    "VM {}: cannot write the resume state in {} ({e}); no checkpoints",
                    self.vm_uuid,
                    self.dir.display()
                );
                st.broken = true;
            }
        }
    }
}

/// Where a resumed disk starts: its checkpoint, completed by the parent's
/// index or zeros, once the stored chunks are checked
/// ([`ResumeStart::prepare`]).
#[derive(Debug, Clone)]
pub struct ResumeStart {
    /// The checkpoint index (entries below `done` are stored chunks).
    pub checkpoint: FixedIndex,
    /// Bytes covered by the checkpoint.
    pub done: u64,
    /// The parent disk's index key (incremental), named in the manifest.
    pub parent_index: Option<String>,
}

impl ResumeStart {
    /// Builds the starting index: checkpoint ids below `done` whose chunk is
    /// still stored, the parent's ids (or zeros) above. Returns it with the
    /// byte ranges of checkpointed chunks that are missing (to read again).
    /// Call it with the restore point's shared lock held.
    pub async fn prepare(
        &self,
        repo: &Repository,
    ) -> Result<(FixedIndex, Vec<Range<u64>>), xenvault_repo::RepoError> {
        let mut index = self.checkpoint.clone();
        let cs = u64::from(index.chunk_size);
        let done_chunks = (self.done.div_ceil(cs)) as usize;
        match &self.parent_index {
            Some(key) => {
                let parent = repo.load_index(key).await?;
                if parent.ids.len() != index.ids.len() || parent.chunk_size != index.chunk_size {
                    return Err(xenvault_repo::RepoError::invalid(
                        "resume",
                        format!("the parent index {key} does not match the checkpoint"),
                    ));
                }
                index.ids[done_chunks.min(parent.ids.len())..]
                    .copy_from_slice(&parent.ids[done_chunks.min(parent.ids.len())..]);
            }
            None => {
                for id in index.ids.iter_mut().skip(done_chunks) {
                    *id = ChunkId::ZERO;
                }
            }
        }
        let mut missing = Vec::new();
        for i in 0..done_chunks.min(index.ids.len()) {
            let id = index.ids[i];
            if id.is_zero() {
                continue;
            }
            match repo.storage().stat(&id.object_key()).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    index.ids[i] = ChunkId::ZERO;
                    let (off, len) = index.chunk_range(i as u64);
                    match missing.last_mut() {
                        Some(Range { end, .. }) if *end == off => *end = off + len,
                        _ => missing.push(off..off + len),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok((index, missing))
    }
}

/// Ranges of `cb` below `limit`, then `above` clipped to start at `limit`.
pub fn resume_ranges(cb: &ChangedBlocks, limit: u64, above: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = cb
        .ranges()
        .filter(|r| r.start < limit)
        .map(|r| r.start..r.end.min(limit))
        .collect();
    out.extend(
        above
            .iter()
            .filter(|r| r.end > limit)
            .map(|r| r.start.max(limit)..r.end),
    );
    out
}

/// How a resumed disk is read instead of the normal plan.
#[derive(Debug, Clone)]
pub struct ResumeParts {
    /// The ranges to read (before [`ResumeStart::prepare`] adds missing chunks).
    pub ranges: Vec<Range<u64>>,
    /// Where the disk starts.
    pub start: ResumeStart,
    /// Words for the plan's reason.
    pub note: String,
}

/// What turns `normal` into a resumed plan, when a valid checkpoint of this
/// VM and disk exists (see the module docs).
pub async fn resume_parts(
    ctx: &VmContext<'_>,
    disk: &DiskSource,
    normal: &DiskReadPlan,
) -> Option<ResumeParts> {
    let p = ctx.p;
    let dir = state_dir(
        p.run.journal.dir(),
        &p.run.pool,
        &p.run.job,
        &ctx.task.vm_uuid,
    );
    let state = load_state(&dir)?;
    let d = state.disks.get(&disk.key)?;
    let size = disk.meta.virtual_size;
    if state.repository != p.repo.config().id.to_string()
        || d.size != size
        || d.chunk_size != p.repo.chunk_size()
        || !normal.method.is_nbd()
    {
        return None;
    }
    // The interrupted run's parent must be this run's parent (its ids
    // complete the index above `done`), or it was full.
    let parent_index = match (&state.parent, ctx.parent) {
        (None, _) if !normal.is_incremental() => None,
        (Some(id), Some(m)) if *id == m.id && normal.is_incremental() => match m.disk(&disk.key) {
            Ok(pd) => Some(pd.index.clone()),
            Err(_) => return None,
        },
        _ => return None,
    };
    // Its snapshot must still be kept.
    let kept = p
        .run
        .journal
        .kept_for(&p.run.pool, &p.run.job, &ctx.task.vm_uuid)
        .unwrap_or_default()
        .into_iter()
        .any(|k| k.token.token == state.token);
    if !kept {
        return None;
    }
    let checkpoint = load_index(&dir, &d.index_file)?;
    if checkpoint.disk_size != size || checkpoint.chunk_size != d.chunk_size {
        return None;
    }
    // What changed between the checkpoint's snapshot and the new one.
    let session = &p.session;
    let Ok(old_ref) = session.vdi().get_by_uuid(&d.snapshot_vdi_uuid).await else {
        return None;
    };
    let changed = match session
        .vdi()
        .list_changed_blocks(&old_ref, &disk.snapshot_vdi)
        .await
    {
        Ok(text) => match ChangedBlocks::from_base64(&text, size) {
            Ok(c) => c,
            Err(_) => return None,
        },
        Err(e) => {
            tracing::info!(
                "{}: disk {}: no resume ({e}); reading as planned",
                ctx.task.name,
                disk.key
            );
            return None;
        }
    };
    let above: Vec<Range<u64>> = match &normal.ranges {
        Some(r) => r.clone(),
        None => std::iter::once(d.done..size).collect(),
    };
    let done = d.done.min(size);
    let ranges = resume_ranges(&changed, done, &above);
    let note = format!(
        "resumed the interrupted backup of {}: {done} of {size} bytes were already stored",
        state.updated.date()
    );
    Some(ResumeParts {
        ranges,
        start: ResumeStart {
            checkpoint,
            done,
            parent_index,
        },
        note,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use xenvault_xapi::cbt::CBT_BLOCK_SIZE;

    #[test]
    fn intervals_scale_with_the_disk() {
        assert_eq!(interval_for(8 << 20, 1 << 20), 8 << 20);
        assert_eq!(interval_for(16 << 30, 1 << 20), 1 << 30);
        assert_eq!(interval_for(4 << 30, 1 << 20), 256 << 20);
    }

    #[test]
    fn resumed_ranges_are_cbt_below_and_the_plan_above() {
        let size = 64 * CBT_BLOCK_SIZE;
        let mut cb = ChangedBlocks::new(size);
        for b in [0, 15, 16, 40] {
            cb.mark_block(b);
        }
        let limit = 16 * CBT_BLOCK_SIZE;
        let whole: Vec<Range<u64>> = std::iter::once(0..size).collect();
        let r = resume_ranges(&cb, limit, &whole);
        assert_eq!(
            r,
            vec![0..CBT_BLOCK_SIZE, 15 * CBT_BLOCK_SIZE..limit, limit..size]
        );
        let above = [
            2 * CBT_BLOCK_SIZE..3 * CBT_BLOCK_SIZE,
            40 * CBT_BLOCK_SIZE..41 * CBT_BLOCK_SIZE,
        ];
        let r = resume_ranges(&cb, limit, &above);
        assert_eq!(
            r,
            vec![
                0..CBT_BLOCK_SIZE,
                15 * CBT_BLOCK_SIZE..limit,
                40 * CBT_BLOCK_SIZE..41 * CBT_BLOCK_SIZE
            ]
        );
    }

    #[test]
    fn state_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let d = state_dir(dir.path(), "pool a", "job/b", "vm-1");
        assert!(d.ends_with("resume/pool_a/job_b/vm-1"));
        std::fs::create_dir_all(&d).unwrap();
        let state = ResumeState {
            version: STATE_VERSION,
            pool: "pool a".into(),
            job: "job/b".into(),
            vm_uuid: "vm-1".into(),
            repository: "r".into(),
            token: "t".into(),
            snapshot_uuid: "s".into(),
            parent: None,
            updated: OffsetDateTime::UNIX_EPOCH,
            disks: BTreeMap::from([(
                "k".to_string(),
                ResumeDisk {
                    snapshot_vdi_uuid: "v".into(),
                    size: 4 << 20,
                    chunk_size: 1 << 20,
                    done: 2 << 20,
                    index_file: "k.t.fidx".into(),
                },
            )]),
        };
        write_atomic(&d.join("state.json"), &serde_json::to_vec(&state).unwrap()).unwrap();
        let idx = FixedIndex::zeroed(4 << 20, 1 << 20);
        write_atomic(&d.join("k.t.fidx"), &idx.to_bytes()).unwrap();
        assert_eq!(load_state(&d).unwrap(), state);
        assert_eq!(load_index(&d, "k.t.fidx").unwrap(), idx);
        std::fs::write(d.join("state.json"), b"{not json").unwrap();
        assert!(load_state(&d).is_none());
        remove_state(&d);
        assert!(!d.exists());
    }
}
