//! The writer: a restore point of one VM, disk by disk, from extents to stored chunks.
//!
//! The caller feeds each disk's extents in increasing offset order. The writer cuts
//! them into fixed chunks aligned to disk offsets; each completed chunk goes to a
//! task that hashes it (blocking thread), skips it when all zero or already stored
//! (existence cache, then `stat`), else compresses and encrypts it (blocking
//! thread) and stages it ([`Storage::stage`](crate::storage::Storage::stage)).
//! At most `max_in_flight` chunks are in flight per disk, so memory stays flat
//! whatever the disk size.
//!
//! Staged chunks become durable and visible in one batch
//! ([`Storage::publish`](crate::storage::Storage::publish), ADR 0008): before a
//! disk's index is written ([`DiskWriter::finish`]), before a checkpoint is
//! returned ([`DiskWriter::checkpoint`]: a resumed backup trusts its chunks
//! after a mere `stat`) and when a restore point is aborted (its chunks stay
//! for a later backup to reuse). So a chunk that can be found by name is always
//! whole and durable, and nothing durable ever names a chunk that is not.
//!
//! An incremental disk starts from a copy of its parent's index; only the chunks
//! touched by fed extents are recomputed, and a partly touched chunk is completed
//! from the parent chunk's data. [`RestorePointWriter::commit`] writes the manifest
//! after every disk's index: until then the restore point does not exist.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinSet;
use xenvault_types::{Extent, ExtentData};

use crate::blob::BlobKind;
use crate::crypto::ChunkId;
use crate::error::{RepoError, Result};
use crate::index::FixedIndex;
use crate::lock::{DEFAULT_STALE_AFTER, LockGuard, LockKind};
use crate::manifest::{
    self, DiskEntry, DiskMode, DiskStats, FORMAT_VERSION, Manifest, index_key, manifest_key,
    validate_segment,
};
use crate::repo::Repository;

/// Most chunk ids remembered by the existence cache (32 MiB of ids); beyond it
/// the writer asks the storage (`stat`).
const KNOWN_CACHE_LIMIT: usize = 1 << 20;

/// Largest disk accepted (64 TiB: an index of 2 GiB at 1 MiB chunks).
pub const MAX_DISK_SIZE: u64 = 1 << 46;

/// Writer knobs.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Chunks being hashed, compressed, encrypted or uploaded at once, per disk
    /// (default 12: a chunk's upload, or its local write-back, mostly waits, so more than the
    /// cores; memory is about twice this many chunks). On the 2-core bench
    /// machine, local backend, 1 MiB chunks: 6 → 250-290 MB/s, 12 → 300-450.
    pub max_in_flight: usize,
    /// Staleness limit of the writer's shared lock (refreshed every quarter of it).
    pub lock_stale_after: Duration,
    /// How long to wait for a conflicting lock (a prune sweep) to go away.
    pub lock_wait: Duration,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            max_in_flight: 12,
            lock_stale_after: DEFAULT_STALE_AFTER,
            lock_wait: Duration::from_secs(120),
        }
    }
}

struct Shared {
    known: Mutex<HashSet<ChunkId>>,
    disks: Mutex<Vec<DiskEntry>>,
    open_disks: Mutex<HashSet<String>>,
}

impl Shared {
    fn is_known(&self, id: &ChunkId) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    fn remember(&self, id: ChunkId) {
        let mut k = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if k.len() < KNOWN_CACHE_LIMIT {
            k.insert(id);
        }
    }
}

/// A restore point being written. Create disks with [`full_disk`](Self::full_disk)
/// or [`incremental_disk`](Self::incremental_disk) (several may be written at
/// once, from different tasks), finish each, then [`commit`](Self::commit).
pub struct RestorePointWriter {
    repo: Repository,
    vm_uuid: String,
    vm_name: String,
    id: String,
    time: time::OffsetDateTime,
    parent: Option<Manifest>,
    shared: Arc<Shared>,
    lock: Option<LockGuard>,
    opts: WriteOptions,
}

impl std::fmt::Debug for RestorePointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RestorePointWriter({}/{})", self.vm_uuid, self.id)
    }
}

impl Repository {
    /// Starts a restore point of VM `vm_uuid` at `time` (its id is the time to the
    /// second, so one per VM per second). `parent` names the restore point whose
    /// indexes incremental disks start from. Takes a shared lock until commit.
    pub async fn begin_restore_point(
        &self,
        vm_uuid: &str,
        vm_name: &str,
        time: time::OffsetDateTime,
        parent: Option<&str>,
        opts: WriteOptions,
    ) -> Result<RestorePointWriter> {
        validate_segment("VM uuid", vm_uuid)?;
        let id = manifest::restore_point_id(time);
        match self.storage.stat(&manifest_key(vm_uuid, &id)).await {
            Ok(_) => {
                return Err(RepoError::invalid(
                    "restore point",
                    format!("{vm_uuid}/{id} already exists (one restore point per VM per second)"),
                ));
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let parent = match parent {
            Some(p) => Some(self.load_manifest(vm_uuid, p).await?),
            None => None,
        };
        if opts.max_in_flight == 0 {
            return Err(RepoError::invalid("max_in_flight", "must be at least 1"));
        }
        let purpose = format!("backup of VM {vm_uuid} ({vm_name})");
        let waited_since = std::time::Instant::now();
        let mut lock = loop {
            match self
                .lock(LockKind::Shared, &purpose, opts.lock_stale_after)
                .await
            {
                Err(RepoError::Locked { .. }) if waited_since.elapsed() < opts.lock_wait => {
                    tokio::time::sleep(Duration::from_secs(2).min(opts.lock_wait)).await;
                }
                other => break other?,
            }
        };
        lock.keep_fresh(opts.lock_stale_after / 4);
        Ok(RestorePointWriter {
            repo: self.clone(),
            vm_uuid: vm_uuid.to_string(),
            vm_name: vm_name.to_string(),
            id,
            time,
            parent,
            shared: Arc::new(Shared {
                known: Mutex::new(HashSet::new()),
                disks: Mutex::new(Vec::new()),
                open_disks: Mutex::new(HashSet::new()),
            }),
            lock: Some(lock),
            opts,
        })
    }
}

impl RestorePointWriter {
    /// The restore point's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The parent restore point, when one was given.
    pub fn parent(&self) -> Option<&Manifest> {
        self.parent.as_ref()
    }

    fn claim_disk(&self, key: &str) -> Result<()> {
        validate_segment("disk key", key)?;
        let taken = self
            .shared
            .disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|d| d.key == key);
        let mut open = self
            .shared
            .open_disks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if taken || !open.insert(key.to_string()) {
            return Err(RepoError::invalid(
                "disk key",
                format!("'{key}' is used twice in this restore point"),
            ));
        }
        Ok(())
    }

    fn disk_writer(
        &self,
        key: &str,
        index: FixedIndex,
        mode: DiskMode,
        parent_index: Option<String>,
        meta: serde_json::Value,
    ) -> DiskWriter {
        DiskWriter {
            repo: self.repo.clone(),
            shared: self.shared.clone(),
            index_key: index_key(&self.vm_uuid, &self.id, key),
            key: key.to_string(),
            chunk_size: u64::from(index.chunk_size),
            index,
            mode,
            parent_index,
            meta,
            cur: None,
            pos: 0,
            inflight: JoinSet::new(),
            max_in_flight: self.opts.max_in_flight,
            stats: DiskStats::default(),
        }
    }

    /// A disk written in full: feed all its data (ranges never fed read as zero).
    pub fn full_disk(&self, key: &str, size: u64, meta: serde_json::Value) -> Result<DiskWriter> {
        if size > MAX_DISK_SIZE {
            return Err(RepoError::invalid(
                "disk size",
                format!("{size} bytes is more than the 64 TiB this format supports"),
            ));
        }
        self.claim_disk(key)?;
        let index = FixedIndex::zeroed(size, self.repo.chunk_size());
        Ok(self.disk_writer(key, index, DiskMode::Full, None, meta))
    }

    /// A disk written as changes to disk `parent_disk` of the parent restore point:
    /// feed only changed ranges. Fails with [`RepoError::DiskResized`] when the
    /// size differs (write it in full then).
    pub async fn incremental_disk(
        &self,
        key: &str,
        size: u64,
        parent_disk: &str,
        meta: serde_json::Value,
    ) -> Result<DiskWriter> {
        let parent = self.parent.as_ref().ok_or_else(|| {
            RepoError::invalid(
                "incremental disk",
                "the restore point was begun without a parent",
            )
        })?;
        let pdisk = parent.disk(parent_disk)?;
        if pdisk.size != size {
            return Err(RepoError::DiskResized {
                disk: key.to_string(),
                parent: pdisk.size,
                now: size,
            });
        }
        let index = self.repo.load_index(&pdisk.index).await?;
        if index.chunk_size != self.repo.chunk_size() || index.disk_size != size {
            return Err(RepoError::corrupt(
                &pdisk.index,
                "index geometry differs from its manifest",
            ));
        }
        {
            let mut known = self.shared.known.lock().unwrap_or_else(|e| e.into_inner());
            for id in index.ids.iter().filter(|i| !i.is_zero()) {
                if known.len() >= KNOWN_CACHE_LIMIT {
                    break;
                }
                known.insert(*id);
            }
        }
        self.claim_disk(key)?;
        Ok(self.disk_writer(
            key,
            index,
            DiskMode::Incremental,
            Some(pdisk.index.clone()),
            meta,
        ))
    }

    /// A disk written as changes to a caller-supplied starting index: a
    /// resumed disk (an interrupted backup's [`DiskCheckpoint`] entries below
    /// its `done`, the parent's or zero ids above). Chunks partly covered by
    /// fed extents are completed from the starting index's chunk, as for an
    /// incremental disk. The caller makes sure every non-zero id of `start`
    /// is stored (a checkpoint is referenced by no manifest, so a prune sweep
    /// may have removed some of its chunks: `stat` them after this restore
    /// point's shared lock is taken). `parent_index` is what the manifest
    /// entry names as the parent.
    pub fn disk_from_index(
        &self,
        key: &str,
        start: FixedIndex,
        parent_index: Option<String>,
        meta: serde_json::Value,
    ) -> Result<DiskWriter> {
        if start.disk_size > MAX_DISK_SIZE {
            return Err(RepoError::invalid(
                "disk size",
                format!(
                    "{} bytes is more than the 64 TiB this format supports",
                    start.disk_size
                ),
            ));
        }
        if start.chunk_size != self.repo.chunk_size()
            || start.ids.len() as u64
                != crate::index::chunk_count(start.disk_size, start.chunk_size)
        {
            return Err(RepoError::invalid(
                "starting index",
                format!(
                    "{} ids of {} bytes for a disk of {} bytes do not fit this repository's {}-byte chunks",
                    start.ids.len(),
                    start.chunk_size,
                    start.disk_size,
                    self.repo.chunk_size()
                ),
            ));
        }
        self.claim_disk(key)?;
        {
            let mut known = self.shared.known.lock().unwrap_or_else(|e| e.into_inner());
            for id in start.ids.iter().filter(|i| !i.is_zero()) {
                if known.len() >= KNOWN_CACHE_LIMIT {
                    break;
                }
                known.insert(*id);
            }
        }
        Ok(self.disk_writer(key, start, DiskMode::Incremental, parent_index, meta))
    }

    /// Writes the manifest: the restore point now exists. Every disk writer must
    /// have been finished. Releases the lock.
    pub async fn commit(
        mut self,
        vm_records: serde_json::Value,
        xva: serde_json::Value,
        labels: serde_json::Value,
    ) -> Result<Manifest> {
        let open: Vec<String> = self
            .shared
            .open_disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        if !open.is_empty() {
            return Err(RepoError::invalid(
                "commit",
                format!("disk(s) {open:?} were not finished"),
            ));
        }
        let mut disks = self
            .shared
            .disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        disks.sort_by(|a, b| a.key.cmp(&b.key));
        let m = Manifest {
            format: "xenvault-manifest".into(),
            version: FORMAT_VERSION,
            vm_uuid: self.vm_uuid.clone(),
            vm_name: self.vm_name.clone(),
            id: self.id.clone(),
            time: manifest::rfc3339(self.time),
            parent: self.parent.as_ref().map(|p| p.id.clone()),
            vm_records,
            disks,
            xva,
            labels,
        };
        let key = manifest_key(&self.vm_uuid, &self.id);
        let json = serde_json::to_vec(&m).map_err(|e| RepoError::Task(e.to_string()))?;
        let blob = self.repo.encode_meta(BlobKind::Manifest, &key, &json)?;
        self.repo
            .storage
            .put_if_absent(&key, Bytes::from(blob))
            .await?;
        if let Some(lock) = self.lock.take() {
            lock.release().await?;
        }
        Ok(m)
    }

    /// Gives up: publishes the chunks staged so far, then releases the lock.
    /// Stored chunks and indexes stay until prune removes them (a later backup
    /// may reuse the chunks; a resumed one finds them by `stat`).
    ///
    /// Publishing rather than discarding: the backend's staged set is shared by
    /// every writer of the process (other restore points may be running), so a
    /// restore point cannot tell its staged chunks from theirs (ADR 0008).
    /// Disk writers still running should be dropped first.
    pub async fn abort(mut self) -> Result<()> {
        let published = self.repo.storage.publish().await;
        if let Some(lock) = self.lock.take() {
            lock.release().await?;
        }
        published?;
        Ok(())
    }
}

struct Pending {
    idx: u64,
    buf: Vec<u8>,
    /// Covered byte ranges, in order, merged.
    covered: Vec<(usize, usize)>,
}

impl Pending {
    fn cover(&mut self, start: usize, end: usize) {
        if let Some(last) = self.covered.last_mut()
            && last.1 == start
        {
            last.1 = end;
            return;
        }
        self.covered.push((start, end));
    }

    fn is_full(&self) -> bool {
        self.covered == [(0, self.buf.len())]
    }
}

enum Outcome {
    Zero,
    Dedup,
    New(u64),
}

struct ChunkDone {
    idx: u64,
    id: ChunkId,
    outcome: Outcome,
}

/// A resumable state of a disk being written ([`DiskWriter::checkpoint`]):
/// the chunks wholly below `done` are final and stored, with their ids in
/// `index`; the other entries are still the starting index's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCheckpoint {
    /// Bytes from the disk's start covered by final chunks (a chunk
    /// boundary, or the disk size).
    pub done: u64,
    /// The index as it is now.
    pub index: FixedIndex,
}

/// A checkpoint whose chunks are stored but maybe not yet published
/// ([`DiskWriter::stage_checkpoint`]).
#[must_use = "a staged checkpoint is usable only once published"]
pub struct StagedCheckpoint {
    repo: Repository,
    checkpoint: DiskCheckpoint,
}

impl StagedCheckpoint {
    /// Publishes what the repository's storage has staged (these chunks and
    /// any staged since), then returns the checkpoint: every chunk it names
    /// below `done` is durable and visible.
    pub async fn publish(self) -> Result<DiskCheckpoint> {
        self.repo.storage.publish().await?;
        Ok(self.checkpoint)
    }
}

/// One disk of a restore point being written. Feed extents with
/// [`write_extent`](Self::write_extent), then [`finish`](Self::finish).
pub struct DiskWriter {
    repo: Repository,
    shared: Arc<Shared>,
    key: String,
    index_key: String,
    chunk_size: u64,
    index: FixedIndex,
    mode: DiskMode,
    parent_index: Option<String>,
    meta: serde_json::Value,
    cur: Option<Pending>,
    pos: u64,
    inflight: JoinSet<Result<ChunkDone>>,
    max_in_flight: usize,
    stats: DiskStats,
}

impl std::fmt::Debug for DiskWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskWriter({})", self.index_key)
    }
}

impl DiskWriter {
    /// The disk's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Counters so far.
    pub fn stats(&self) -> &DiskStats {
        &self.stats
    }

    fn bad(&self, e: &Extent, reason: &'static str) -> RepoError {
        RepoError::BadExtent {
            disk: self.key.clone(),
            offset: e.offset,
            len: e.len(),
            reason,
        }
    }

    /// Feeds one extent. Extents must come in increasing offset order, not
    /// overlapping, within the disk.
    pub async fn write_extent(&mut self, extent: Extent) -> Result<()> {
        let len = extent.len();
        if len == 0 {
            return Ok(());
        }
        if extent.offset < self.pos {
            return Err(self.bad(
                &extent,
                "before the end of the previous one (extents must be in increasing order and not overlap)",
            ));
        }
        if extent.end() > self.index.disk_size {
            return Err(self.bad(&extent, "beyond the end of the disk"));
        }
        self.pos = extent.end();
        match extent.data {
            ExtentData::Zero(n) => self.feed(extent.offset, n, None).await,
            ExtentData::Data(bytes) => {
                self.stats.bytes_fed += len;
                let (ci, cstart, clen) = self.chunk_of(extent.offset);
                let whole = extent.offset == cstart && len == clen;
                if whole && self.cur.as_ref().is_none_or(|c| c.idx != ci) {
                    // An aligned whole chunk: hand the buffer over without a copy.
                    self.flush_cur().await?;
                    let p = Pending {
                        idx: ci,
                        covered: vec![(0, bytes.len())],
                        buf: bytes,
                    };
                    return self.submit(p).await;
                }
                self.feed(extent.offset, len, Some(&bytes)).await
            }
        }
    }

    fn chunk_of(&self, off: u64) -> (u64, u64, u64) {
        let ci = off / self.chunk_size;
        let cstart = ci * self.chunk_size;
        let clen = self.chunk_size.min(self.index.disk_size - cstart);
        (ci, cstart, clen)
    }

    async fn feed(&mut self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let (ci, cstart, clen) = self.chunk_of(off);
            let cend = cstart + clen;
            let n = end.min(cend) - off;
            let in_cur = self.cur.as_ref().is_some_and(|c| c.idx == ci);
            if data.is_none() && !in_cur && off == cstart && n == clen {
                // A whole zero chunk: no buffer, no hashing.
                self.flush_cur().await?;
                self.index.ids[ci as usize] = ChunkId::ZERO;
                self.stats.processed_chunks += 1;
                off = cend;
                continue;
            }
            if let Some(d) = data
                && !in_cur
                && off == cstart
                && n == clen
            {
                // A whole chunk inside a larger extent: one copy, no zero-fill.
                self.flush_cur().await?;
                let ds = (off - offset) as usize;
                let p = Pending {
                    idx: ci,
                    buf: d[ds..ds + n as usize].to_vec(),
                    covered: vec![(0, n as usize)],
                };
                self.submit(p).await?;
                off = cend;
                continue;
            }
            if !in_cur {
                self.flush_cur().await?;
                self.cur = Some(Pending {
                    idx: ci,
                    buf: vec![0u8; clen as usize],
                    covered: Vec::new(),
                });
            }
            let full = {
                let Some(p) = self.cur.as_mut() else {
                    return Err(RepoError::Task("chunk buffer vanished".into()));
                };
                let s = (off - cstart) as usize;
                let e = s + n as usize;
                match data {
                    Some(d) => {
                        let ds = (off - offset) as usize;
                        p.buf[s..e].copy_from_slice(&d[ds..ds + n as usize]);
                    }
                    None => p.buf[s..e].fill(0),
                }
                p.cover(s, e);
                p.is_full()
            };
            if full {
                self.flush_cur().await?;
            }
            off += n;
        }
        Ok(())
    }

    async fn flush_cur(&mut self) -> Result<()> {
        match self.cur.take() {
            Some(p) => self.submit(p).await,
            None => Ok(()),
        }
    }

    fn apply(&mut self, done: ChunkDone) {
        self.index.ids[done.idx as usize] = done.id;
        self.stats.processed_chunks += 1;
        match done.outcome {
            Outcome::Zero => {}
            Outcome::Dedup => self.stats.dedup_chunks += 1,
            Outcome::New(n) => {
                self.stats.new_chunks += 1;
                self.stats.bytes_stored += n;
            }
        }
    }

    async fn reap_one(&mut self) -> Result<()> {
        if let Some(joined) = self.inflight.join_next().await {
            let done = joined.map_err(|e| RepoError::Task(e.to_string()))??;
            self.apply(done);
        }
        Ok(())
    }

    async fn submit(&mut self, p: Pending) -> Result<()> {
        while self.inflight.len() >= self.max_in_flight {
            self.reap_one().await?;
        }
        let parent_id = if !p.is_full() && self.mode == DiskMode::Incremental {
            Some(self.index.ids[p.idx as usize]).filter(|id| !id.is_zero())
        } else {
            None
        };
        let repo = self.repo.clone();
        let shared = self.shared.clone();
        self.inflight
            .spawn(process_chunk(repo, shared, p, parent_id));
        Ok(())
    }

    /// Waits until every chunk handed over so far is stored and published
    /// (durable, visible by name), then returns a checkpoint (for resuming an
    /// interrupted backup). The chunk being filled, if any, is not part of it.
    /// Writing continues normally after.
    pub async fn checkpoint(&mut self) -> Result<DiskCheckpoint> {
        self.stage_checkpoint().await?.publish().await
    }

    /// Waits until every chunk handed over so far is stored, and returns the
    /// checkpoint they make, not yet usable: its chunks may still be staged
    /// (ADR 0008). [`StagedCheckpoint::publish`] makes them durable and
    /// visible, and can run while this writer goes on (ADR 0010), so a
    /// checkpoint costs the pipeline a drain, not a disk flush.
    pub async fn stage_checkpoint(&mut self) -> Result<StagedCheckpoint> {
        while !self.inflight.is_empty() {
            self.reap_one().await?;
        }
        let done = match &self.cur {
            Some(p) => p.idx * self.chunk_size,
            None if self.pos >= self.index.disk_size => self.index.disk_size,
            None => self.pos / self.chunk_size * self.chunk_size,
        };
        Ok(StagedCheckpoint {
            repo: self.repo.clone(),
            checkpoint: DiskCheckpoint {
                done,
                index: self.index.clone(),
            },
        })
    }

    /// Completes the disk: waits for its chunks, publishes them (durable, then
    /// visible), writes its index, and registers it with the restore point.
    /// Returns its manifest entry.
    pub async fn finish(mut self) -> Result<DiskEntry> {
        self.flush_cur().await?;
        while !self.inflight.is_empty() {
            self.reap_one().await?;
        }
        // The index names these chunks: they must be durable first.
        self.repo.storage.publish().await?;
        self.stats.chunks = self.index.ids.len() as u64;
        self.stats.zero_chunks = self.index.ids.iter().filter(|i| i.is_zero()).count() as u64;
        self.repo.write_index(&self.index_key, &self.index).await?;
        let entry = DiskEntry {
            key: self.key.clone(),
            index: self.index_key.clone(),
            size: self.index.disk_size,
            chunk_size: self.index.chunk_size,
            mode: self.mode,
            parent_index: self.parent_index.clone(),
            stats: self.stats.clone(),
            meta: std::mem::take(&mut self.meta),
        };
        self.shared
            .disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry.clone());
        self.shared
            .open_disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        Ok(entry)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RepoError::Task(e.to_string()))
}

async fn process_chunk(
    repo: Repository,
    shared: Arc<Shared>,
    p: Pending,
    parent_id: Option<ChunkId>,
) -> Result<ChunkDone> {
    let Pending {
        idx,
        mut buf,
        covered,
    } = p;
    if let Some(pid) = parent_id {
        let old = repo.read_chunk(&pid).await?;
        if old.len() != buf.len() {
            return Err(RepoError::corrupt(
                &pid.object_key(),
                format!(
                    "parent chunk has {} bytes where {} were expected",
                    old.len(),
                    buf.len()
                ),
            ));
        }
        let mut at = 0;
        for (s, e) in covered
            .iter()
            .copied()
            .chain(std::iter::once((buf.len(), buf.len())))
        {
            buf[at..s].copy_from_slice(&old[at..s]);
            at = e;
        }
    }
    let r = repo.clone();
    let (id, buf) = blocking(move || (r.chunk_id(&buf), buf)).await?;
    if id.is_zero() {
        return Ok(ChunkDone {
            idx,
            id,
            outcome: Outcome::Zero,
        });
    }
    if shared.is_known(&id) {
        return Ok(ChunkDone {
            idx,
            id,
            outcome: Outcome::Dedup,
        });
    }
    let key = id.object_key();
    match repo.storage.stat(&key).await {
        Ok(_) => {
            shared.remember(id);
            return Ok(ChunkDone {
                idx,
                id,
                outcome: Outcome::Dedup,
            });
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    let r = repo.clone();
    let blob = blocking(move || r.encode_chunk(&id, &buf)).await??;
    let n = blob.len() as u64;
    let outcome = match repo.storage.stage(&key, Bytes::from(blob)).await {
        Ok(()) => Outcome::New(n),
        Err(e) if e.is_already_exists() => Outcome::Dedup,
        Err(e) => return Err(e.into()),
    };
    shared.remember(id);
    Ok(ChunkDone { idx, id, outcome })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::repo::InitOptions;
    use crate::storage::MemoryStorage;

    fn pattern(size: usize, seed: u8) -> Vec<u8> {
        (0..size)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    async fn read_back(repo: &Repository, m: &Manifest, key: &str) -> Vec<u8> {
        let size = m.disk(key).unwrap().size as usize;
        let mut out = vec![0u8; size];
        let mut r = repo.read_disk(m, key, 2).await.unwrap();
        while let Some(e) = r.next_extent().await {
            let e = e.unwrap();
            if let ExtentData::Data(d) = e.data {
                out[e.offset as usize..e.offset as usize + d.len()].copy_from_slice(&d);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_checkpointed_disk_resumes_from_its_index() {
        let repo = Repository::init(Arc::new(MemoryStorage::new()), InitOptions::default())
            .await
            .unwrap();
        let cs = u64::from(repo.chunk_size());
        let size = 5 * cs + cs / 2;
        let img = pattern(size as usize, 7);
        let t0 = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20000);

        // An interrupted backup: 2.7 chunks fed, checkpointed, aborted.
        let rp = repo
            .begin_restore_point("vm", "vm", t0, None, WriteOptions::default())
            .await
            .unwrap();
        let mut dw = rp.full_disk("d", size, serde_json::Value::Null).unwrap();
        let fed = 2 * cs + cs * 7 / 10;
        dw.write_extent(Extent::data(0, img[..fed as usize].to_vec()))
            .await
            .unwrap();
        let cp = dw.checkpoint().await.unwrap();
        assert_eq!(
            cp.done,
            2 * cs,
            "the partly filled third chunk is not final"
        );
        assert!(cp.index.ids[..2].iter().all(|i| !i.is_zero()));
        assert!(cp.index.ids[2..].iter().all(|i| i.is_zero()));
        for id in &cp.index.ids[..2] {
            assert_eq!(repo.read_chunk(id).await.unwrap().len() as u64, cs);
        }
        drop(dw);
        rp.abort().await.unwrap();

        // The resumed backup feeds only what the checkpoint lacks.
        let rp = repo
            .begin_restore_point("vm", "vm", t0, None, WriteOptions::default())
            .await
            .unwrap();
        let mut dw = rp
            .disk_from_index("d", cp.index.clone(), None, serde_json::Value::Null)
            .unwrap();
        dw.write_extent(Extent::data(cp.done, img[cp.done as usize..].to_vec()))
            .await
            .unwrap();
        let end = dw.checkpoint().await.unwrap();
        assert_eq!(end.done, size);
        let entry = dw.finish().await.unwrap();
        assert_eq!(entry.stats.bytes_fed, size - cp.done);
        let m = rp
            .commit(
                serde_json::json!({}),
                serde_json::json!({}),
                serde_json::json!({}),
            )
            .await
            .unwrap();
        assert!(read_back(&repo, &m, "d").await == img);
    }

    #[tokio::test]
    async fn a_partly_fed_chunk_is_completed_from_the_starting_index() {
        let repo = Repository::init(Arc::new(MemoryStorage::new()), InitOptions::default())
            .await
            .unwrap();
        let cs = u64::from(repo.chunk_size());
        let size = 3 * cs;
        let old = pattern(size as usize, 3);
        let t0 = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20000);
        let rp = repo
            .begin_restore_point("vm", "vm", t0, None, WriteOptions::default())
            .await
            .unwrap();
        let mut dw = rp.full_disk("d", size, serde_json::Value::Null).unwrap();
        dw.write_extent(Extent::data(0, old.clone())).await.unwrap();
        let cp = dw.checkpoint().await.unwrap();
        assert_eq!(cp.done, size);
        drop(dw);
        rp.abort().await.unwrap();

        let mut new = old.clone();
        let at = (cs + 4096) as usize;
        new[at..at + 512].fill(0xAB);
        let rp = repo
            .begin_restore_point("vm", "vm", t0, None, WriteOptions::default())
            .await
            .unwrap();
        let mut dw = rp
            .disk_from_index("d", cp.index, Some("x".into()), serde_json::Value::Null)
            .unwrap();
        dw.write_extent(Extent::data(at as u64, new[at..at + 512].to_vec()))
            .await
            .unwrap();
        let entry = dw.finish().await.unwrap();
        assert_eq!(entry.mode, DiskMode::Incremental);
        assert_eq!(entry.parent_index.as_deref(), Some("x"));
        let m = rp
            .commit(
                serde_json::json!({}),
                serde_json::json!({}),
                serde_json::json!({}),
            )
            .await
            .unwrap();
        assert!(read_back(&repo, &m, "d").await == new);
    }

    #[tokio::test]
    async fn a_starting_index_of_another_geometry_is_refused() {
        let repo = Repository::init(Arc::new(MemoryStorage::new()), InitOptions::default())
            .await
            .unwrap();
        let t0 = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20000);
        let rp = repo
            .begin_restore_point("vm", "vm", t0, None, WriteOptions::default())
            .await
            .unwrap();
        let cs = repo.chunk_size();
        let mut bad = FixedIndex::zeroed(4 * u64::from(cs), cs);
        bad.ids.pop();
        let err = rp
            .disk_from_index("d", bad, None, serde_json::Value::Null)
            .unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        let other = FixedIndex::zeroed(4 * u64::from(cs), cs / 2);
        assert!(
            rp.disk_from_index("d", other, None, serde_json::Value::Null)
                .is_err()
        );
        rp.abort().await.unwrap();
    }
}
