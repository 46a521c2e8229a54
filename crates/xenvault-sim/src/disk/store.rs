//! `DiskStore`: layered copy-on-write disks in sparse files, with persisted allocation
//! bitmaps and CBT logs, in one directory.
//!
//! Layout of the directory:
//! - `store.json`: layers (parent, size, SR, owning disk), disks (leaf layer) and CBT log
//!   metadata (size, parent and child pointers); rewritten atomically on every change of
//!   structure;
//! - `layers/L<id>.data`: the layer's sparse data file, addressed by virtual offset;
//! - `layers/L<id>.map`: its 64 KiB allocation bitmap (little-endian u64 words, updated in
//!   place after each data write);
//! - `cbt/<vdi-uuid>.cbtlog`: the CBT bitmap of that VDI (same word format).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};

use super::bitmap::BlockBitmap;
use super::guest::{choose_blocks, guest_block_data};
use super::{CBT_BLOCK_SIZE, MAX_CHAIN_DEPTH, blocks_for};

const BS: u64 = CBT_BLOCK_SIZE;
const META_FILE: &str = "store.json";
const META_FORMAT: u32 = 1;

/// A disk store failure. [`DiskError::xapi_error`] gives the XAPI error to report.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// No disk with this id.
    #[error("disk store: no disk {0}")]
    NoSuchDisk(String),
    /// A disk with this id exists already.
    #[error("disk store: disk {0} exists already")]
    DiskExists(String),
    /// The id cannot name files.
    #[error("disk store: {0:?} is not a usable disk id (use the VDI uuid: letters, digits, '-')")]
    BadDiskId(String),
    /// The disk's data was destroyed (`VDI.data_destroy`); only its CBT log is left.
    #[error("disk store: disk {0} has no data (data destroyed; it is cbt_metadata only)")]
    NoData(String),
    /// A read or write past the end of the disk.
    #[error(
        "disk store: {op} of {len} bytes at offset {offset} is past the end of disk {vdi} ({size} bytes)"
    )]
    OutOfRange {
        /// The disk.
        vdi: String,
        /// `read` or `write`.
        op: &'static str,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// `data_destroy` of a disk without a CBT log.
    #[error("disk store: disk {0} has no CBT log, so its data cannot be destroyed alone")]
    NoCbtMetadata(String),
    /// Two disks are not in the same layer tree (differencing export against an unrelated base).
    #[error("disk store: disks {0} and {1} do not share a layer tree (not snapshots of one disk)")]
    Unrelated(String, String),
    /// An SM backend error, as `SR_BACKEND_FAILURE_<code>`.
    #[error("SR_BACKEND_FAILURE_{code}: {message}")]
    Backend {
        /// SM error number (sm: libs/sm/core/XE_SR_ERRORCODES.xml).
        code: u32,
        /// SM's message, with `[opterr=…]`.
        message: String,
    },
    /// A file of the store could not be read or written.
    #[error("disk store: cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The metadata file is damaged.
    #[error(
        "disk store: {path} is damaged ({reason}); restore it or move the state directory aside"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl DiskError {
    /// The XAPI error (code, params) this failure surfaces as. Where XAPI puts a VDI ref the
    /// params carry the disk id (the VDI uuid): callers that know the ref should check the
    /// XAPI-level preconditions (`VDI_NO_CBT_METADATA`, `VDI_INCOMPATIBLE_TYPE`…) first.
    pub fn xapi_error(&self) -> (String, Vec<String>) {
        match self {
            DiskError::Backend { code, message } => (
                format!("SR_BACKEND_FAILURE_{code}"),
                vec![String::new(), message.clone(), String::new()],
            ),
            DiskError::NoSuchDisk(id) => (
                "SR_BACKEND_FAILURE_46".into(),
                vec![
                    String::new(),
                    format!("The VDI is not available [opterr=no data for VDI {id}]"),
                    String::new(),
                ],
            ),
            DiskError::NoData(id) => (
                "VDI_INCOMPATIBLE_TYPE".into(),
                vec![id.clone(), "cbt_metadata".into()],
            ),
            DiskError::NoCbtMetadata(id) => ("VDI_NO_CBT_METADATA".into(), vec![id.clone()]),
            DiskError::OutOfRange { .. } | DiskError::Io { .. } => {
                ("VDI_IO_ERROR".into(), vec![self.to_string()])
            }
            DiskError::Unrelated(..)
            | DiskError::DiskExists(_)
            | DiskError::BadDiskId(_)
            | DiskError::Corrupt { .. } => ("INTERNAL_ERROR".into(), vec![self.to_string()]),
        }
    }

    fn unrelated_cbt(what: &str) -> DiskError {
        // sm: libs/sm/VDI.py list_changed_blocks raises CBTChangedBlocksError (460).
        DiskError::Backend {
            code: 460,
            message: format!("Failed to calculate changed blocks for given VDIs. [opterr={what}]"),
        }
    }

    fn inconsistent_cbt() -> DiskError {
        // sm: libs/sm/VDI.py list_changed_blocks raises CBTMetadataInconsistent (459).
        DiskError::Backend {
            code: 459,
            message:
                "Changed Block Tracking metadata is inconsistent [opterr=Inconsistent bitmaps]"
                    .into(),
        }
    }
}

/// What the store knows about one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Virtual size in bytes.
    pub size: u64,
    /// The SR the disk lives on (the uuid given at creation).
    pub sr: String,
    /// False after `data_destroy`.
    pub has_data: bool,
    /// True when the disk has a CBT log.
    pub cbt_enabled: bool,
    /// Bytes allocated in the disk's own (leaf) layer: what `VDI.physical_utilisation`
    /// reports for a VHD file on a file SR.
    pub physical_utilisation: u64,
    /// Layers in the chain, leaf included (0 without data).
    pub chain_depth: usize,
}

/// A run of a disk as [`DiskStore::read_plan`] describes it.
#[derive(Debug)]
pub struct ReadRun {
    /// Virtual offset of the run (also its offset in `file`).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The layer data file holding the run, or `None` for a hole (zeros).
    pub file: Option<File>,
}

struct Layer {
    sr: String,
    parent: Option<u64>,
    size: u64,
    /// The disk whose leaf this is; `None` for a frozen (hidden) layer.
    owner: Option<String>,
    children: u32,
    alloc: BlockBitmap,
    data: File,
    map: File,
}

struct Disk {
    sr: String,
    size: u64,
    leaf: Option<u64>,
}

struct CbtLog {
    size: u64,
    bits: BlockBitmap,
    parent: Option<String>,
    child: Option<String>,
    file: File,
}

#[derive(Default)]
struct Inner {
    layers: BTreeMap<u64, Layer>,
    disks: BTreeMap<String, Disk>,
    cbt: BTreeMap<String, CbtLog>,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    next_layer: u64,
    layers: Vec<LayerMeta>,
    disks: Vec<DiskMeta>,
    cbt: Vec<CbtMeta>,
}

#[derive(Serialize, Deserialize)]
struct LayerMeta {
    id: u64,
    sr: String,
    parent: Option<u64>,
    size: u64,
    owner: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct DiskMeta {
    id: String,
    sr: String,
    size: u64,
    leaf: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct CbtMeta {
    vdi: String,
    size: u64,
    parent: Option<String>,
    child: Option<String>,
}

/// The disks of one simulated pool, in a directory. All methods take `&self` and are safe
/// to call from many threads; reads run in parallel, structural changes and writes are
/// serialised. Every call does blocking file I/O: from async code, use `spawn_blocking`.
pub struct DiskStore {
    root: PathBuf,
    next_layer: AtomicU64,
    inner: RwLock<Inner>,
    /// Bumped whenever a coalesce changes the contents of a frozen layer (the only way
    /// a frozen layer's data changes): a background coalesce that copied a layer's
    /// blocks without the write lock checks it before it commits.
    coalesce_generation: AtomicU64,
    /// The background coalescer ([`DiskStore::start_gc`]).
    gc: Mutex<GcState>,
    /// Signalled when the background coalescer stops.
    gc_idle: Condvar,
}

/// State of the background coalescer.
#[derive(Default)]
struct GcState {
    /// A coalescer thread is running.
    running: bool,
    /// Asked to look again once its pass ends.
    again: bool,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("root", &self.root)
            .finish()
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn check_id(id: &str) -> Result<(), DiskError> {
    let ok = !id.is_empty()
        && id.len() <= 80
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(DiskError::BadDiskId(id.to_string()))
    }
}

/// Reads `buf.len()` bytes at `offset`, zero-filling past the end of the file.
fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl DiskStore {
    /// Opens (or creates) the store in `dir`. Layers left unreferenced by an interrupted
    /// operation are collected, and pending coalesces are finished.
    pub fn open(dir: impl Into<PathBuf>) -> Result<DiskStore, DiskError> {
        let root = dir.into();
        for sub in ["", "layers", "cbt"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        let meta_path = root.join(META_FILE);
        let store = DiskStore {
            root: root.clone(),
            next_layer: AtomicU64::new(1),
            inner: RwLock::new(Inner::default()),
            coalesce_generation: AtomicU64::new(0),
            gc: Mutex::new(GcState::default()),
            gc_idle: Condvar::new(),
        };
        if !meta_path.exists() {
            store.save(&store.write_guard())?;
            return Ok(store);
        }
        let text = fs::read_to_string(&meta_path).map_err(io_err("read", &meta_path))?;
        let meta: Meta = serde_json::from_str(&text).map_err(|e| DiskError::Corrupt {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        if meta.format != META_FORMAT {
            return Err(DiskError::Corrupt {
                path: meta_path,
                reason: format!("format {} is not {META_FORMAT}", meta.format),
            });
        }
        store.next_layer.store(meta.next_layer, Ordering::SeqCst);
        {
            let mut g = store.write_guard();
            for lm in meta.layers {
                let layer = store.open_layer(&lm)?;
                g.layers.insert(lm.id, layer);
            }
            for dm in meta.disks {
                g.disks.insert(
                    dm.id,
                    Disk {
                        sr: dm.sr,
                        size: dm.size,
                        leaf: dm.leaf,
                    },
                );
            }
            for cm in meta.cbt {
                let path = store.cbt_path(&cm.vdi);
                let bytes = match fs::read(&path) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        // A crash between moving a log and saving the metadata: like SM
                        // with an inconsistent log, give up CBT on that disk (the next
                        // incremental falls back to a full read) rather than refuse to start.
                        tracing::warn!(vdi = %cm.vdi, "CBT log file missing; CBT disabled on it");
                        continue;
                    }
                    Err(e) => return Err(io_err("read CBT log", &path)(e)),
                };
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open CBT log", &path))?;
                g.cbt.insert(
                    cm.vdi,
                    CbtLog {
                        size: cm.size,
                        bits: BlockBitmap::from_le_bytes(&bytes, blocks_for(cm.size)),
                        parent: cm.parent,
                        child: cm.child,
                        file,
                    },
                );
            }
            // Drop pointers to logs that are gone.
            let known: BTreeSet<String> = g.cbt.keys().cloned().collect();
            for log in g.cbt.values_mut() {
                if log.parent.as_ref().is_some_and(|p| !known.contains(p)) {
                    log.parent = None;
                }
                if log.child.as_ref().is_some_and(|c| !known.contains(c)) {
                    log.child = None;
                }
            }
            // Validate references and count children.
            let ids: Vec<u64> = g.layers.keys().copied().collect();
            for id in ids {
                if let Some(p) = g.layers[&id].parent {
                    match g.layers.get_mut(&p) {
                        Some(parent) => parent.children += 1,
                        None => {
                            return Err(DiskError::Corrupt {
                                path: store.root.join(META_FILE),
                                reason: format!("layer {id} has missing parent {p}"),
                            });
                        }
                    }
                }
            }
            for (id, d) in &g.disks {
                if let Some(leaf) = d.leaf
                    && !g.layers.contains_key(&leaf)
                {
                    return Err(DiskError::Corrupt {
                        path: store.root.join(META_FILE),
                        reason: format!("disk {id} has missing leaf layer {leaf}"),
                    });
                }
            }
            let mut doomed = Vec::new();
            store.collect_garbage(&mut g, &mut doomed, true)?;
            store.save(&g)?;
            store.remove_files(&doomed);
        }
        store.remove_stray_files();
        Ok(store)
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates an empty (all-zero, nothing allocated) disk of `size` bytes on SR `sr`.
    pub fn create(&self, id: &str, sr: &str, size: u64) -> Result<(), DiskError> {
        check_id(id)?;
        let mut g = self.write_guard();
        if g.disks.contains_key(id) {
            return Err(DiskError::DiskExists(id.to_string()));
        }
        let leaf = self.new_layer(&mut g, sr, None, size, Some(id))?;
        g.disks.insert(
            id.to_string(),
            Disk {
                sr: sr.to_string(),
                size,
                leaf: Some(leaf),
            },
        );
        self.save(&g)
    }

    /// True when a disk with this id exists (with or without data).
    pub fn exists(&self, id: &str) -> bool {
        self.read_guard().disks.contains_key(id)
    }

    /// Ids of all disks, sorted.
    pub fn disk_ids(&self) -> Vec<String> {
        self.read_guard().disks.keys().cloned().collect()
    }

    /// Size, SR, data and CBT state, utilisation and chain depth of a disk.
    pub fn info(&self, id: &str) -> Result<DiskInfo, DiskError> {
        let g = self.read_guard();
        let d = g
            .disks
            .get(id)
            .ok_or_else(|| DiskError::NoSuchDisk(id.to_string()))?;
        let (phys, depth) = match d.leaf {
            Some(leaf) => (
                g.layers[&leaf].alloc.count_ones() * BS,
                chain_ids(&g, leaf).len(),
            ),
            None => (0, 0),
        };
        Ok(DiskInfo {
            size: d.size,
            sr: d.sr.clone(),
            has_data: d.leaf.is_some(),
            cbt_enabled: g.cbt.contains_key(id),
            physical_utilisation: phys,
            chain_depth: depth,
        })
    }

    /// Bytes allocated by all layers of SR `sr` (hidden parents included): what the SR's
    /// `physical_utilisation` follows.
    pub fn sr_physical_utilisation(&self, sr: &str) -> u64 {
        let g = self.read_guard();
        g.layers
            .values()
            .filter(|l| l.sr == sr)
            .map(|l| l.alloc.count_ones() * BS)
            .sum()
    }

    /// Reads `buf.len()` bytes at `offset`. Unallocated ranges read as zeros.
    pub fn read_at(&self, id: &str, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let g = self.read_guard();
        let (leaf, size) = data_of(&g, id)?;
        check_range(id, "read", offset, buf.len() as u64, size)?;
        let chain = chain_layers(&g, leaf);
        self.read_chain(&chain, offset, buf)
    }

    /// Where the bytes `offset..offset + len` of a disk live: runs that are holes
    /// (zeros) or ranges of one layer's sparse data file (layer files are addressed
    /// by virtual offset). Lets a reader hand file ranges to the kernel (`sendfile`)
    /// instead of copying them; the files stay readable even if the disk is
    /// destroyed meanwhile.
    pub fn read_plan(&self, id: &str, offset: u64, len: u64) -> Result<Vec<ReadRun>, DiskError> {
        let g = self.read_guard();
        let (leaf, size) = data_of(&g, id)?;
        check_range(id, "read", offset, len, size)?;
        let chain = chain_layers(&g, leaf);
        let end = offset + len;
        let mut runs: Vec<ReadRun> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let src = source_of(&chain, pos / BS);
            let mut run_end = ((pos / BS + 1) * BS).min(end);
            while run_end < end && source_of(&chain, run_end / BS) == src {
                run_end = (run_end + BS).min(end);
            }
            let file = match src {
                None => None,
                Some(i) => Some(chain[i].data.try_clone().map_err(|source| DiskError::Io {
                    what: "open",
                    path: self.root.join("layers"),
                    source,
                })?),
            };
            runs.push(ReadRun {
                offset: pos,
                len: run_end - pos,
                file,
            });
            pos = run_end;
        }
        Ok(runs)
    }

    /// Writes `data` at `offset` (copy-on-write at 64 KiB granularity) and marks the
    /// touched blocks in the disk's CBT log, if it has one.
    pub fn write_at(&self, id: &str, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let mut g = self.write_guard();
        self.write_locked(&mut g, id, offset, data, false)
    }

    /// Like [`DiskStore::write_at`], but 64 KiB blocks that are all zeros and not allocated
    /// anywhere in the chain are skipped (they already read as zeros), as an importer into
    /// a prezeroed VDI does. CBT still marks them.
    pub fn write_at_sparse(&self, id: &str, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let mut g = self.write_guard();
        self.write_locked(&mut g, id, offset, data, true)
    }

    /// A simulated guest write: `count` distinct 64 KiB blocks chosen from `seed`
    /// ([`super::choose_blocks`]) get the contents [`super::guest_block_data`]`(seed, block)`.
    /// Returns the blocks written, ascending.
    pub fn guest_write(&self, id: &str, seed: u64, count: u64) -> Result<Vec<u64>, DiskError> {
        let size = self.info(id)?.size;
        let blocks = choose_blocks(seed, blocks_for(size), count);
        self.guest_write_blocks(id, seed, &blocks)?;
        Ok(blocks)
    }

    /// A simulated guest write of the given 64 KiB blocks with contents from `seed`.
    pub fn guest_write_blocks(&self, id: &str, seed: u64, blocks: &[u64]) -> Result<(), DiskError> {
        let mut g = self.write_guard();
        let size = g
            .disks
            .get(id)
            .ok_or_else(|| DiskError::NoSuchDisk(id.to_string()))?
            .size;
        for &b in blocks {
            let off = b * BS;
            if off >= size {
                return Err(DiskError::OutOfRange {
                    vdi: id.to_string(),
                    op: "write",
                    offset: off,
                    len: BS,
                    size,
                });
            }
            let mut data = guest_block_data(seed, b);
            data.truncate((size - off).min(BS) as usize);
            self.write_locked(&mut g, id, off, &data, false)?;
        }
        Ok(())
    }

    /// Snapshots disk `id` as the new disk `snap_id` in O(1): the current leaf is frozen
    /// and both disks get an empty overlay on it. A CBT log moves to the snapshot and the
    /// live disk gets a fresh log chained to it (sm: libs/sm/VDI.py `_cbt_snapshot`).
    pub fn snapshot(&self, id: &str, snap_id: &str) -> Result<(), DiskError> {
        self.fork(id, snap_id, true)
    }

    /// Clones disk `id` as the new disk `clone_id` in O(1) (same layering as a snapshot;
    /// the clone gets no CBT log).
    pub fn clone_disk(&self, id: &str, clone_id: &str) -> Result<(), DiskError> {
        self.fork(id, clone_id, false)
    }

    /// Copies disk `id` into a new, independent disk `new_id` on SR `sr`: every allocated
    /// block is copied (zeros stay holes). No CBT log.
    pub fn copy(&self, id: &str, new_id: &str, sr: &str) -> Result<(), DiskError> {
        check_id(new_id)?;
        // Copy under the read lock, so guests and readers go on; insert under the write lock.
        let (layer_id, size) = {
            let g = self.read_guard();
            if g.disks.contains_key(new_id) {
                return Err(DiskError::DiskExists(new_id.to_string()));
            }
            let (leaf, size) = data_of(&g, id)?;
            let chain = chain_layers(&g, leaf);
            let alloc = union_alloc(&chain, blocks_for(size));
            let layer_id = self.next_layer.fetch_add(1, Ordering::SeqCst);
            let mut layer = self.create_layer_files(layer_id, sr, None, size, Some(new_id))?;
            let mut buf = vec![0u8; (16 * BS) as usize];
            for (first, count) in alloc.runs() {
                let mut b = first;
                while b < first + count {
                    let n = (first + count - b).min(16);
                    let off = b * BS;
                    let len = (n * BS).min(size - off) as usize;
                    self.read_chain(&chain, off, &mut buf[..len])?;
                    let path = self.layer_path(layer_id, "data");
                    layer
                        .data
                        .write_all_at(&buf[..len], off)
                        .map_err(io_err("write", &path))?;
                    for i in b..b + n {
                        layer.alloc.set(i);
                    }
                    b += n;
                }
            }
            let map_path = self.layer_path(layer_id, "map");
            layer
                .map
                .write_all_at(&layer.alloc.to_le_bytes(), 0)
                .map_err(io_err("write", &map_path))?;
            drop(layer);
            (layer_id, size)
        };
        let mut g = self.write_guard();
        if g.disks.contains_key(new_id) {
            self.remove_files(&[layer_id]);
            return Err(DiskError::DiskExists(new_id.to_string()));
        }
        let layer = self.open_layer(&LayerMeta {
            id: layer_id,
            sr: sr.to_string(),
            parent: None,
            size,
            owner: Some(new_id.to_string()),
        })?;
        g.layers.insert(layer_id, layer);
        g.disks.insert(
            new_id.to_string(),
            Disk {
                sr: sr.to_string(),
                size,
                leaf: Some(layer_id),
            },
        );
        self.save(&g)
    }

    /// Destroys disk `id`: its data goes (layers no other disk needs are deleted, a parent
    /// left with one child is coalesced into it) and its CBT log is merged into its child's
    /// log, as SM's `VDI.delete` does.
    pub fn destroy(&self, id: &str) -> Result<(), DiskError> {
        self.destroy_with(id, true).map(|_| ())
    }

    /// Like [`DiskStore::destroy`], but a parent left with one child is not coalesced
    /// now: SM deletes the VHD and leaves the coalesce to its background GC, so
    /// `VDI.destroy` does not take as long as copying the child's data
    /// (docs/xapi-notes.md "Simulator data plane: coalesce after VDI.destroy"). Returns
    /// true when a coalesce is pending: run [`DiskStore::start_gc`] (or
    /// [`DiskStore::coalesce_pending`]).
    pub fn destroy_deferring_coalesce(&self, id: &str) -> Result<bool, DiskError> {
        self.destroy_with(id, false)
    }

    fn destroy_with(&self, id: &str, coalesce: bool) -> Result<bool, DiskError> {
        let mut g = self.write_guard();
        let disk = g
            .disks
            .remove(id)
            .ok_or_else(|| DiskError::NoSuchDisk(id.to_string()))?;
        let mut doomed = Vec::new();
        let mut doomed_logs = Vec::new();
        if let Some(log) = g.cbt.remove(id) {
            // sm: libs/sm/VDI.py `delete`: relink parent <-> child, OR this bitmap into the child.
            if let Some(p) = &log.parent
                && let Some(pl) = g.cbt.get_mut(p)
            {
                pl.child = log.child.clone();
            }
            if let Some(c) = &log.child
                && let Some(cl) = g.cbt.get_mut(c)
            {
                cl.parent = log.parent.clone();
                cl.bits.or_with(&log.bits);
                let path = self.cbt_path(c);
                cl.file
                    .write_all_at(&cl.bits.to_le_bytes(), 0)
                    .map_err(io_err("write CBT log", &path))?;
            }
            doomed_logs.push(id.to_string());
        }
        if let Some(leaf) = disk.leaf {
            if let Some(l) = g.layers.get_mut(&leaf) {
                l.owner = None;
            }
            self.collect_garbage(&mut g, &mut doomed, coalesce)?;
        }
        self.save(&g)?;
        let pending = next_coalesce(&g).is_some();
        drop(g);
        self.remove_files(&doomed);
        for l in doomed_logs {
            let _ = fs::remove_file(self.cbt_path(&l));
        }
        Ok(pending)
    }

    /// `VDI.data_destroy`: drops the disk's data but keeps the disk and its CBT log (it
    /// becomes `cbt_metadata`). Idempotent on a disk without data. Needs a CBT log.
    pub fn data_destroy(&self, id: &str) -> Result<(), DiskError> {
        self.data_destroy_with(id, true).map(|_| ())
    }

    /// Like [`DiskStore::data_destroy`], leaving the coalesce of a parent left with one
    /// child to the background (as [`DiskStore::destroy_deferring_coalesce`]). Returns
    /// true when a coalesce is pending.
    pub fn data_destroy_deferring_coalesce(&self, id: &str) -> Result<bool, DiskError> {
        self.data_destroy_with(id, false)
    }

    fn data_destroy_with(&self, id: &str, coalesce: bool) -> Result<bool, DiskError> {
        let mut g = self.write_guard();
        if !g.disks.contains_key(id) {
            return Err(DiskError::NoSuchDisk(id.to_string()));
        }
        if !g.cbt.contains_key(id) {
            return Err(DiskError::NoCbtMetadata(id.to_string()));
        }
        let leaf = g.disks.get_mut(id).and_then(|d| d.leaf.take());
        let mut doomed = Vec::new();
        if let Some(leaf) = leaf {
            if let Some(l) = g.layers.get_mut(&leaf) {
                l.owner = None;
            }
            self.collect_garbage(&mut g, &mut doomed, coalesce)?;
        }
        self.save(&g)?;
        let pending = next_coalesce(&g).is_some();
        drop(g);
        self.remove_files(&doomed);
        Ok(pending)
    }

    /// Starts the background coalescer (a thread, like SM's GC process) unless it runs
    /// already, in which case it looks again once its pass ends. It coalesces every
    /// frozen layer left with a single child ([`DiskStore::coalesce_pending`]).
    pub fn start_gc(self: &Arc<Self>) {
        {
            let mut st = self.gc.lock().unwrap_or_else(|e| e.into_inner());
            if st.running {
                st.again = true;
                return;
            }
            st.running = true;
        }
        let store = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("sim-disk-gc".into())
            .spawn(move || store.gc_loop());
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the disk coalescer thread; coalescing now");
            self.gc_loop();
        }
    }

    /// Waits until the background coalescer is idle (e.g. before the state directory is
    /// reopened or removed).
    pub fn wait_gc_idle(&self) {
        let mut st = self.gc.lock().unwrap_or_else(|e| e.into_inner());
        while st.running {
            st = self.gc_idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn gc_loop(&self) {
        loop {
            match self.coalesce_pending() {
                Ok(0) => {}
                Ok(n) => tracing::debug!(layers = n, "background coalesce done"),
                Err(e) => {
                    tracing::warn!(error = %e, "background coalesce failed; retried at the next destroy or restart")
                }
            }
            let mut st = self.gc.lock().unwrap_or_else(|e| e.into_inner());
            if st.again {
                st.again = false;
                continue;
            }
            st.running = false;
            self.gc_idle.notify_all();
            return;
        }
    }

    /// Coalesces every frozen layer left with a single child into it, one at a time.
    /// The child's blocks are copied while only the read lock is held, in slices (reads,
    /// NBD included, go on meanwhile; a frozen child never changes, and the parent's
    /// copies of those blocks are only ever read through the child, which holds them);
    /// the write lock is taken to swap the layers. Returns how many were coalesced.
    pub fn coalesce_pending(&self) -> Result<usize, DiskError> {
        let mut done = 0;
        // Each round either coalesces one layer or finds the structure changed and
        // looks again; bounded so that a bug can never spin forever.
        for _ in 0..10_000 {
            let found = {
                let g = self.read_guard();
                next_coalesce(&g).map(|(parent, child)| {
                    let frozen = g.layers.get(&child).is_some_and(|c| c.owner.is_none());
                    (parent, child, frozen)
                })
            };
            let Some((parent, child, frozen)) = found else {
                return Ok(done);
            };
            let generation = self.coalesce_generation.load(Ordering::SeqCst);
            let copied = frozen && self.copy_frozen_child(parent, child)?;
            let mut g = self.write_guard();
            if next_coalesce_of(&g, parent) != Some(child) {
                continue; // changed meanwhile: look again
            }
            let child_frozen = g.layers.get(&child).is_some_and(|c| c.owner.is_none());
            let mut doomed = Vec::new();
            if copied
                && child_frozen
                && self.coalesce_generation.load(Ordering::SeqCst) == generation
            {
                self.finish_coalesce(&mut g, parent, child, &mut doomed)?;
            } else {
                self.coalesce_into_parent(&mut g, parent, &mut doomed)?;
            }
            self.collect_garbage(&mut g, &mut doomed, false)?;
            self.save(&g)?;
            drop(g);
            self.remove_files(&doomed);
            done += 1;
        }
        Ok(done)
    }

    /// Copies the allocated blocks of the frozen layer `child` into `parent`'s data file,
    /// 1 MiB at a time, each slice under the read lock. False when the structure changed
    /// (the caller looks again).
    fn copy_frozen_child(&self, parent: u64, child: u64) -> Result<bool, DiskError> {
        let runs: Vec<(u64, u64)> = {
            let g = self.read_guard();
            match g.layers.get(&child) {
                Some(c) => c.alloc.runs(),
                None => return Ok(false),
            }
        };
        let mut buf = vec![0u8; (16 * BS) as usize];
        for (first, count) in runs {
            let mut b = first;
            while b < first + count {
                let n = (first + count - b).min(16);
                let g = self.read_guard();
                let (Some(c), Some(p)) = (g.layers.get(&child), g.layers.get(&parent)) else {
                    return Ok(false);
                };
                if c.owner.is_some() || c.parent != Some(parent) {
                    return Ok(false);
                }
                let off = b * BS;
                let len = (n * BS).min(c.size - off) as usize;
                pread_full(&c.data, &mut buf[..len], off)
                    .map_err(io_err("read", &self.layer_path(child, "data")))?;
                p.data
                    .write_all_at(&buf[..len], off)
                    .map_err(io_err("write", &self.layer_path(parent, "data")))?;
                b += n;
            }
        }
        Ok(true)
    }

    /// Grows disk `id` to `new_size` bytes (and its CBT log). Shrinking fails like SM
    /// (`SR_BACKEND_FAILURE_79`).
    pub fn resize(&self, id: &str, new_size: u64) -> Result<(), DiskError> {
        let mut g = self.write_guard();
        let (leaf, size) = data_of(&g, id)?;
        if new_size < size {
            return Err(DiskError::Backend {
                code: 79,
                message: "VDI Invalid size [opterr=shrinking not allowed]".into(),
            });
        }
        if new_size == size {
            return Ok(());
        }
        {
            let data_path = self.layer_path(leaf, "data");
            let map_path = self.layer_path(leaf, "map");
            let l = g
                .layers
                .get_mut(&leaf)
                .ok_or_else(|| self.corrupt("leaf"))?;
            l.data
                .set_len(new_size)
                .map_err(io_err("resize", &data_path))?;
            l.alloc.grow(blocks_for(new_size));
            l.map
                .set_len(l.alloc.words().len() as u64 * 8)
                .map_err(io_err("resize", &map_path))?;
            l.size = new_size;
        }
        if let Some(d) = g.disks.get_mut(id) {
            d.size = new_size;
        }
        if let Some(log) = g.cbt.get_mut(id) {
            log.size = new_size;
            log.bits.grow(blocks_for(new_size));
            let path = self.cbt_path(id);
            log.file
                .set_len(log.bits.words().len() as u64 * 8)
                .map_err(io_err("resize CBT log", &path))?;
        }
        self.save(&g)
    }

    /// `VDI.enable_cbt`: starts a fresh, empty CBT log. Idempotent.
    pub fn enable_cbt(&self, id: &str) -> Result<(), DiskError> {
        let mut g = self.write_guard();
        let size = g
            .disks
            .get(id)
            .ok_or_else(|| DiskError::NoSuchDisk(id.to_string()))?
            .size;
        if g.cbt.contains_key(id) {
            return Ok(());
        }
        let log = self.new_cbt_log(id, size)?;
        g.cbt.insert(id.to_string(), log);
        self.save(&g)
    }

    /// `VDI.disable_cbt`: deletes the disk's log and clears its parent's child pointer
    /// (sm: libs/sm/VDI.py `configure_blocktracking`). Idempotent.
    pub fn disable_cbt(&self, id: &str) -> Result<(), DiskError> {
        let mut g = self.write_guard();
        if !g.disks.contains_key(id) {
            return Err(DiskError::NoSuchDisk(id.to_string()));
        }
        let Some(log) = g.cbt.remove(id) else {
            return Ok(());
        };
        if let Some(p) = &log.parent
            && let Some(pl) = g.cbt.get_mut(p)
        {
            pl.child = None;
        }
        self.save(&g)?;
        let _ = fs::remove_file(self.cbt_path(id));
        Ok(())
    }

    /// True when the disk has a CBT log.
    pub fn cbt_enabled(&self, id: &str) -> bool {
        self.read_guard().cbt.contains_key(id)
    }

    /// `VDI.list_changed_blocks(from, to)`: ORs the CBT logs on the child-pointer path
    /// after `from` up to and including `to` (sm: libs/sm/VDI.py `list_changed_blocks`).
    /// [`BlockBitmap::to_msb_first_bytes`] gives XAPI's byte layout (before base64).
    /// Errors are SM's: `SR_BACKEND_FAILURE_460` for the same or unrelated disks.
    pub fn list_changed_blocks(&self, from: &str, to: &str) -> Result<BlockBitmap, DiskError> {
        if from == to {
            return Err(DiskError::unrelated_cbt("Source and target VDI are same"));
        }
        let g = self.read_guard();
        if !(g.cbt.contains_key(from) && g.cbt.contains_key(to)) {
            return Err(DiskError::unrelated_cbt(
                "Source and target VDI are unrelated",
            ));
        }
        let mut merged: Option<(BlockBitmap, u64)> = None;
        let mut cur = from.to_string();
        for _ in 0..=g.cbt.len() {
            let Some(next) = g.cbt.get(&cur).and_then(|l| l.child.clone()) else {
                break;
            };
            let Some(log) = g.cbt.get(&next) else {
                break;
            };
            merged = Some(match merged {
                None => (log.bits.clone(), log.size),
                Some((mut acc, acc_size)) => {
                    if log.size < acc_size || log.bits.len() < acc.len() {
                        return Err(DiskError::inconsistent_cbt());
                    }
                    acc.grow(log.bits.len());
                    acc.or_with(&log.bits);
                    (acc, log.size)
                }
            });
            if next == to {
                return Ok(merged.map(|(b, _)| b).unwrap_or_default());
            }
            cur = next;
        }
        Err(DiskError::unrelated_cbt(
            "Source and target VDI are unrelated",
        ))
    }

    /// The CBT chain pointers of a disk's log: `(parent, child)`, for diagnostics.
    pub fn cbt_links(&self, id: &str) -> Option<(Option<String>, Option<String>)> {
        self.read_guard()
            .cbt
            .get(id)
            .map(|l| (l.parent.clone(), l.child.clone()))
    }

    /// The 64 KiB blocks allocated anywhere in the disk's chain (what a VHD export of the
    /// disk includes, at 64 KiB rather than 2 MiB granularity).
    pub fn allocated_blocks(&self, id: &str) -> Result<BlockBitmap, DiskError> {
        let g = self.read_guard();
        let (leaf, size) = data_of(&g, id)?;
        Ok(union_alloc(&chain_layers(&g, leaf), blocks_for(size)))
    }

    /// The 64 KiB blocks a differencing export of `id` against `base` must carry: those
    /// allocated in layers on exactly one of the two chains (the symmetric difference
    /// xapi's vhd-tool computes, docs/xapi-notes.md "Simulator data plane").
    pub fn differing_blocks(&self, id: &str, base: &str) -> Result<BlockBitmap, DiskError> {
        let g = self.read_guard();
        let (leaf, size) = data_of(&g, id)?;
        let (base_leaf, _) = data_of(&g, base)?;
        let a = chain_ids(&g, leaf);
        let b = chain_ids(&g, base_leaf);
        if a.last() != b.last() {
            return Err(DiskError::Unrelated(id.to_string(), base.to_string()));
        }
        let sa: BTreeSet<u64> = a.iter().copied().collect();
        let sb: BTreeSet<u64> = b.iter().copied().collect();
        let mut out = BlockBitmap::new(blocks_for(size));
        for l in sa.symmetric_difference(&sb) {
            out.or_with(&g.layers[l].alloc);
        }
        Ok(out)
    }

    // ---- internals ----

    fn read_guard(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_guard(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn corrupt(&self, what: &str) -> DiskError {
        DiskError::Corrupt {
            path: self.root.join(META_FILE),
            reason: format!("missing {what} layer"),
        }
    }

    fn layer_path(&self, id: u64, ext: &str) -> PathBuf {
        self.root.join("layers").join(format!("L{id}.{ext}"))
    }

    fn cbt_path(&self, vdi: &str) -> PathBuf {
        self.root.join("cbt").join(format!("{vdi}.cbtlog"))
    }

    fn create_layer_files(
        &self,
        id: u64,
        sr: &str,
        parent: Option<u64>,
        size: u64,
        owner: Option<&str>,
    ) -> Result<Layer, DiskError> {
        let data_path = self.layer_path(id, "data");
        let map_path = self.layer_path(id, "map");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(io_err("create", &data_path))?;
        data.set_len(size).map_err(io_err("size", &data_path))?;
        let alloc = BlockBitmap::new(blocks_for(size));
        let map = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&map_path)
            .map_err(io_err("create", &map_path))?;
        map.set_len(alloc.words().len() as u64 * 8)
            .map_err(io_err("size", &map_path))?;
        Ok(Layer {
            sr: sr.to_string(),
            parent,
            size,
            owner: owner.map(str::to_string),
            children: 0,
            alloc,
            data,
            map,
        })
    }

    fn open_layer(&self, lm: &LayerMeta) -> Result<Layer, DiskError> {
        let data_path = self.layer_path(lm.id, "data");
        let map_path = self.layer_path(lm.id, "map");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(io_err("open", &data_path))?;
        let bytes = fs::read(&map_path).map_err(io_err("read", &map_path))?;
        let map = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&map_path)
            .map_err(io_err("open", &map_path))?;
        Ok(Layer {
            sr: lm.sr.clone(),
            parent: lm.parent,
            size: lm.size,
            owner: lm.owner.clone(),
            children: 0,
            alloc: BlockBitmap::from_le_bytes(&bytes, blocks_for(lm.size)),
            data,
            map,
        })
    }

    fn new_layer(
        &self,
        g: &mut Inner,
        sr: &str,
        parent: Option<u64>,
        size: u64,
        owner: Option<&str>,
    ) -> Result<u64, DiskError> {
        let id = self.next_layer.fetch_add(1, Ordering::SeqCst);
        let layer = self.create_layer_files(id, sr, parent, size, owner)?;
        if let Some(p) = parent
            && let Some(pl) = g.layers.get_mut(&p)
        {
            pl.children += 1;
        }
        g.layers.insert(id, layer);
        Ok(id)
    }

    fn new_cbt_log(&self, id: &str, size: u64) -> Result<CbtLog, DiskError> {
        let path = self.cbt_path(id);
        let bits = BlockBitmap::new(blocks_for(size));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("create CBT log", &path))?;
        file.set_len(bits.words().len() as u64 * 8)
            .map_err(io_err("size CBT log", &path))?;
        Ok(CbtLog {
            size,
            bits,
            parent: None,
            child: None,
            file,
        })
    }

    fn fork(&self, id: &str, new_id: &str, move_cbt: bool) -> Result<(), DiskError> {
        check_id(new_id)?;
        let mut g = self.write_guard();
        if g.disks.contains_key(new_id) {
            return Err(DiskError::DiskExists(new_id.to_string()));
        }
        let (leaf, size) = data_of(&g, id)?;
        if chain_ids(&g, leaf).len() >= MAX_CHAIN_DEPTH {
            // sm: libs/sm/vhdutil.py MAX_CHAIN_SIZE; FileSR raises SR_BACKEND_FAILURE_109.
            return Err(DiskError::Backend {
                code: 109,
                message: "The snapshot chain is too long".into(),
            });
        }
        let sr = g.disks[id].sr.clone();
        let live = self.new_layer(&mut g, &sr, Some(leaf), size, Some(id))?;
        let fork = self.new_layer(&mut g, &sr, Some(leaf), size, Some(new_id))?;
        if let Some(l) = g.layers.get_mut(&leaf) {
            l.owner = None;
        }
        if let Some(d) = g.disks.get_mut(id) {
            d.leaf = Some(live);
        }
        g.disks.insert(
            new_id.to_string(),
            Disk {
                sr,
                size,
                leaf: Some(fork),
            },
        );
        if move_cbt && let Some(mut log) = g.cbt.remove(id) {
            // sm: libs/sm/VDI.py `_cbt_snapshot`: the live log becomes the snapshot's, the
            // live disk gets a fresh log; parent/child pointers chain them.
            let (from, to) = (self.cbt_path(id), self.cbt_path(new_id));
            fs::rename(&from, &to).map_err(io_err("rename CBT log", &from))?;
            if let Some(p) = &log.parent
                && let Some(pl) = g.cbt.get_mut(p)
            {
                pl.child = Some(new_id.to_string());
            }
            let mut fresh = self.new_cbt_log(id, size)?;
            fresh.parent = Some(new_id.to_string());
            fresh.child = log.child.take();
            log.child = Some(id.to_string());
            g.cbt.insert(new_id.to_string(), log);
            g.cbt.insert(id.to_string(), fresh);
        }
        self.save(&g)
    }

    fn write_locked(
        &self,
        g: &mut Inner,
        id: &str,
        offset: u64,
        data: &[u8],
        sparse: bool,
    ) -> Result<(), DiskError> {
        let (leaf, size) = data_of(g, id)?;
        check_range(id, "write", offset, data.len() as u64, size)?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let first = offset / BS;
        let last = (end - 1) / BS;
        let data_path = self.layer_path(leaf, "data");
        let mut changed_words: BTreeSet<usize> = BTreeSet::new();
        // Direct writes are gathered into runs so a big write is one pwrite.
        let mut run: Option<(u64, u64)> = None; // (start, end) in disk offsets
        let mut touched = Vec::new();
        for b in first..=last {
            let bstart = b * BS;
            let bend = (bstart + BS).min(size);
            let s = offset.max(bstart);
            let e = end.min(bend);
            let seg = &data[(s - offset) as usize..(e - offset) as usize];
            touched.push(b);
            let allocated_here = g.layers[&leaf].alloc.get(b);
            if sparse
                && !allocated_here
                && s == bstart
                && e == bend
                && xenvault_types::extent::is_all_zero(seg)
                && !chain_layers(g, leaf).iter().any(|l| l.alloc.get(b))
            {
                self.flush_run(g, leaf, &mut run, offset, data, &data_path)?;
                continue;
            }
            if allocated_here || (s == bstart && e == bend) {
                match &mut run {
                    Some((_, re)) if *re == s => *re = e,
                    _ => {
                        self.flush_run(g, leaf, &mut run, offset, data, &data_path)?;
                        run = Some((s, e));
                    }
                }
            } else {
                self.flush_run(g, leaf, &mut run, offset, data, &data_path)?;
                // Partial write of a block the leaf does not own yet: copy it up first.
                let mut buf = vec![0u8; (bend - bstart) as usize];
                let below: Vec<&Layer> = chain_layers(g, leaf).into_iter().skip(1).collect();
                self.read_chain(&below, bstart, &mut buf)?;
                buf[(s - bstart) as usize..(e - bstart) as usize].copy_from_slice(seg);
                g.layers[&leaf]
                    .data
                    .write_all_at(&buf, bstart)
                    .map_err(io_err("write", &data_path))?;
            }
            if let Some(l) = g.layers.get_mut(&leaf)
                && let Some(w) = l.alloc.set(b)
            {
                changed_words.insert(w);
            }
        }
        self.flush_run(g, leaf, &mut run, offset, data, &data_path)?;
        // Data first, then the map: a crash in between leaves the old contents visible.
        let map_path = self.layer_path(leaf, "map");
        let l = &g.layers[&leaf];
        for w in changed_words {
            l.map
                .write_all_at(&l.alloc.words()[w].to_le_bytes(), w as u64 * 8)
                .map_err(io_err("write", &map_path))?;
        }
        if let Some(log) = g.cbt.get_mut(id) {
            let mut changed = BTreeSet::new();
            for b in touched {
                if let Some(w) = log.bits.set(b) {
                    changed.insert(w);
                }
            }
            let path = self.cbt_path(id);
            for w in changed {
                log.file
                    .write_all_at(&log.bits.words()[w].to_le_bytes(), w as u64 * 8)
                    .map_err(io_err("write CBT log", &path))?;
            }
        }
        Ok(())
    }

    fn flush_run(
        &self,
        g: &Inner,
        leaf: u64,
        run: &mut Option<(u64, u64)>,
        offset: u64,
        data: &[u8],
        path: &Path,
    ) -> Result<(), DiskError> {
        if let Some((s, e)) = run.take() {
            g.layers[&leaf]
                .data
                .write_all_at(&data[(s - offset) as usize..(e - offset) as usize], s)
                .map_err(io_err("write", path))?;
        }
        Ok(())
    }

    fn read_chain(&self, chain: &[&Layer], offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let src = source_of(chain, pos / BS);
            let mut run_end = ((pos / BS + 1) * BS).min(end);
            while run_end < end && source_of(chain, run_end / BS) == src {
                run_end = (run_end + BS).min(end);
            }
            let slice = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match src {
                None => slice.fill(0),
                Some(i) => {
                    pread_full(&chain[i].data, slice, pos).map_err(|source| DiskError::Io {
                        what: "read",
                        path: self.root.join("layers"),
                        source,
                    })?
                }
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Deletes ownerless layers without children and (with `coalesce`) coalesces
    /// ownerless layers with exactly one child, until nothing changes. Deleted layer ids
    /// go to `doomed`.
    fn collect_garbage(
        &self,
        g: &mut Inner,
        doomed: &mut Vec<u64>,
        coalesce: bool,
    ) -> Result<(), DiskError> {
        loop {
            let dead: Vec<u64> = g
                .layers
                .iter()
                .filter(|(_, l)| l.owner.is_none() && l.children == 0)
                .map(|(id, _)| *id)
                .collect();
            if let Some(&id) = dead.first() {
                if let Some(l) = g.layers.remove(&id)
                    && let Some(p) = l.parent
                    && let Some(pl) = g.layers.get_mut(&p)
                {
                    pl.children = pl.children.saturating_sub(1);
                }
                doomed.push(id);
                continue;
            }
            if !coalesce {
                return Ok(());
            }
            match next_coalesce(g) {
                Some((p, _)) => self.coalesce_into_parent(g, p, doomed)?,
                None => return Ok(()),
            }
        }
    }

    /// Moves the only child of `parent` into it (like SM's coalesce): the child's blocks
    /// are copied over the parent's, the parent takes the child's place.
    fn coalesce_into_parent(
        &self,
        g: &mut Inner,
        parent: u64,
        doomed: &mut Vec<u64>,
    ) -> Result<(), DiskError> {
        let child = next_coalesce_of(g, parent).ok_or_else(|| self.corrupt("child"))?;
        {
            let c = &g.layers[&child];
            let p = &g.layers[&parent];
            let ppath = self.layer_path(parent, "data");
            let mut buf = vec![0u8; (16 * BS) as usize];
            for (first, count) in c.alloc.runs() {
                let mut b = first;
                while b < first + count {
                    let n = (first + count - b).min(16);
                    let off = b * BS;
                    let len = (n * BS).min(c.size - off) as usize;
                    pread_full(&c.data, &mut buf[..len], off)
                        .map_err(io_err("read", &self.layer_path(child, "data")))?;
                    p.data
                        .write_all_at(&buf[..len], off)
                        .map_err(io_err("write", &ppath))?;
                    b += n;
                }
            }
        }
        self.finish_coalesce(g, parent, child, doomed)
    }

    /// The second half of a coalesce, once the child's blocks are in the parent's data
    /// file: the parent takes the child's allocation, owner, children and place.
    fn finish_coalesce(
        &self,
        g: &mut Inner,
        parent: u64,
        child: u64,
        doomed: &mut Vec<u64>,
    ) -> Result<(), DiskError> {
        self.coalesce_generation.fetch_add(1, Ordering::SeqCst);
        let ppath = self.layer_path(parent, "data");
        {
            let c = g.layers.get(&child).ok_or_else(|| self.corrupt("child"))?;
            let p = g
                .layers
                .get(&parent)
                .ok_or_else(|| self.corrupt("parent"))?;
            if c.size > p.size {
                p.data.set_len(c.size).map_err(io_err("resize", &ppath))?;
            }
        }
        let c = g
            .layers
            .remove(&child)
            .ok_or_else(|| self.corrupt("child"))?;
        let map_path = self.layer_path(parent, "map");
        {
            let p = g
                .layers
                .get_mut(&parent)
                .ok_or_else(|| self.corrupt("parent"))?;
            p.size = p.size.max(c.size);
            p.alloc.grow(blocks_for(p.size));
            p.alloc.or_with(&c.alloc);
            p.map
                .write_all_at(&p.alloc.to_le_bytes(), 0)
                .map_err(io_err("write", &map_path))?;
            p.owner = c.owner.clone();
            p.children = c.children;
        }
        for l in g.layers.values_mut() {
            if l.parent == Some(child) {
                l.parent = Some(parent);
            }
        }
        if let Some(owner) = &c.owner
            && let Some(d) = g.disks.get_mut(owner)
        {
            d.leaf = Some(parent);
        }
        doomed.push(child);
        Ok(())
    }

    fn save(&self, g: &Inner) -> Result<(), DiskError> {
        let meta = Meta {
            format: META_FORMAT,
            next_layer: self.next_layer.load(Ordering::SeqCst),
            layers: g
                .layers
                .iter()
                .map(|(id, l)| LayerMeta {
                    id: *id,
                    sr: l.sr.clone(),
                    parent: l.parent,
                    size: l.size,
                    owner: l.owner.clone(),
                })
                .collect(),
            disks: g
                .disks
                .iter()
                .map(|(id, d)| DiskMeta {
                    id: id.clone(),
                    sr: d.sr.clone(),
                    size: d.size,
                    leaf: d.leaf,
                })
                .collect(),
            cbt: g
                .cbt
                .iter()
                .map(|(vdi, c)| CbtMeta {
                    vdi: vdi.clone(),
                    size: c.size,
                    parent: c.parent.clone(),
                    child: c.child.clone(),
                })
                .collect(),
        };
        let path = self.root.join(META_FILE);
        let tmp = self.root.join(format!("{META_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| DiskError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&tmp, text).map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("replace", &path))
    }

    fn remove_files(&self, layers: &[u64]) {
        for &id in layers {
            for ext in ["data", "map"] {
                let p = self.layer_path(id, ext);
                if let Err(e) = fs::remove_file(&p)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove layer file");
                }
            }
        }
    }

    /// Removes layer and CBT files that the metadata does not mention (left by a crash
    /// between creating files and saving the metadata).
    fn remove_stray_files(&self) {
        let g = self.read_guard();
        let known_layers: BTreeSet<String> = g
            .layers
            .keys()
            .flat_map(|id| [format!("L{id}.data"), format!("L{id}.map")])
            .collect();
        let known_logs: BTreeSet<String> = g.cbt.keys().map(|v| format!("{v}.cbtlog")).collect();
        for (dir, known) in [("layers", &known_layers), ("cbt", &known_logs)] {
            let Ok(rd) = fs::read_dir(self.root.join(dir)) else {
                continue;
            };
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    tracing::info!(file = %name, "removing stray disk store file");
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

fn data_of(g: &Inner, id: &str) -> Result<(u64, u64), DiskError> {
    let d = g
        .disks
        .get(id)
        .ok_or_else(|| DiskError::NoSuchDisk(id.to_string()))?;
    let leaf = d.leaf.ok_or_else(|| DiskError::NoData(id.to_string()))?;
    Ok((leaf, d.size))
}

fn check_range(
    id: &str,
    op: &'static str,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange {
            vdi: id.to_string(),
            op,
            offset,
            len,
            size,
        }),
    }
}

/// Layer ids from `leaf` to the root.
fn chain_ids(g: &Inner, leaf: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut cur = Some(leaf);
    while let Some(id) = cur {
        let Some(l) = g.layers.get(&id) else { break };
        out.push(id);
        cur = l.parent;
        if out.len() > g.layers.len() {
            break; // a cycle would be a bug; never loop forever
        }
    }
    out
}

fn chain_layers(g: &Inner, leaf: u64) -> Vec<&Layer> {
    chain_ids(g, leaf)
        .into_iter()
        .filter_map(|id| g.layers.get(&id))
        .collect()
}

/// The first frozen (ownerless) layer left with exactly one child, and that child: the
/// next coalesce to do.
fn next_coalesce(g: &Inner) -> Option<(u64, u64)> {
    g.layers
        .iter()
        .filter(|(_, l)| l.owner.is_none() && l.children == 1)
        .find_map(|(id, _)| next_coalesce_of(g, *id).map(|c| (*id, c)))
}

/// The only child of `parent` when `parent` is frozen (ownerless) with one child.
fn next_coalesce_of(g: &Inner, parent: u64) -> Option<u64> {
    let p = g.layers.get(&parent)?;
    if p.owner.is_some() || p.children != 1 {
        return None;
    }
    g.layers
        .iter()
        .find(|(_, l)| l.parent == Some(parent))
        .map(|(id, _)| *id)
}

/// Index in `chain` of the first layer that holds block `b`.
fn source_of(chain: &[&Layer], b: u64) -> Option<usize> {
    chain.iter().position(|l| l.alloc.get(b))
}

fn union_alloc(chain: &[&Layer], nblocks: u64) -> BlockBitmap {
    let mut out = BlockBitmap::new(nblocks);
    for l in chain {
        out.or_with(&l.alloc);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn read_all(store: &DiskStore, id: &str) -> Vec<u8> {
        let size = store.info(id).unwrap().size;
        let mut buf = vec![0u8; size as usize];
        store.read_at(id, 0, &mut buf).unwrap();
        buf
    }

    fn layer_files(dir: &Path) -> usize {
        fs::read_dir(dir.join("layers")).unwrap().count()
    }

    /// The backup pattern: a kept base snapshot, guest writes, a new snapshot, then the
    /// old base destroyed. The destroy leaves the coalesce of the frozen layer (its only
    /// child is frozen too) pending; the background coalescer does it without changing
    /// any disk's data.
    #[test]
    fn destroy_leaves_the_coalesce_to_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(DiskStore::open(dir.path()).unwrap());
        s.create("vm", "sr", 4 * MIB).unwrap();
        s.enable_cbt("vm").unwrap();
        s.guest_write_blocks("vm", 1, &[0, 3, 9, 40, 63]).unwrap();
        s.snapshot("vm", "base1").unwrap();
        s.guest_write_blocks("vm", 2, &[3, 10, 41]).unwrap();
        s.snapshot("vm", "base2").unwrap();
        s.guest_write_blocks("vm", 3, &[11]).unwrap();
        let (vm, base2) = (read_all(&s, "vm"), read_all(&s, "base2"));
        assert_eq!(s.info("vm").unwrap().chain_depth, 3);

        assert!(s.destroy_deferring_coalesce("base1").unwrap());
        // Not coalesced yet: the chain is as long, the data the same.
        assert_eq!(s.info("vm").unwrap().chain_depth, 3);
        assert_eq!(read_all(&s, "vm"), vm);
        assert_eq!(read_all(&s, "base2"), base2);
        let changed = s.list_changed_blocks("base2", "vm").unwrap();
        assert_eq!(changed.runs(), vec![(11, 1)]);

        s.start_gc();
        s.wait_gc_idle();
        assert_eq!(s.info("vm").unwrap().chain_depth, 2);
        assert_eq!(s.info("base2").unwrap().chain_depth, 2);
        assert_eq!(read_all(&s, "vm"), vm);
        assert_eq!(read_all(&s, "base2"), base2);
        // Nothing left to do; 3 layers (root, two leaves) of two files each.
        assert_eq!(s.coalesce_pending().unwrap(), 0);
        assert_eq!(layer_files(dir.path()), 6);
        // Reopened, the store has the same layers and data.
        drop(s);
        let s = DiskStore::open(dir.path()).unwrap();
        assert_eq!(s.info("vm").unwrap().chain_depth, 2);
        assert_eq!(read_all(&s, "vm"), vm);
        assert_eq!(read_all(&s, "base2"), base2);
    }

    /// A frozen layer whose only child is a live leaf (guest writes may come) is
    /// coalesced under the write lock; `data_destroy` defers it like `destroy`.
    #[test]
    fn a_leaf_child_is_coalesced_under_the_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStore::open(dir.path()).unwrap();
        s.create("vm", "sr", 2 * MIB).unwrap();
        s.enable_cbt("vm").unwrap();
        s.guest_write_blocks("vm", 1, &[0, 5, 31]).unwrap();
        s.snapshot("vm", "base").unwrap();
        s.guest_write_blocks("vm", 2, &[5, 6]).unwrap();
        let vm = read_all(&s, "vm");
        assert!(s.data_destroy_deferring_coalesce("base").unwrap());
        assert!(!s.info("base").unwrap().has_data);
        assert_eq!(s.info("vm").unwrap().chain_depth, 2);
        assert_eq!(s.coalesce_pending().unwrap(), 1);
        assert_eq!(s.info("vm").unwrap().chain_depth, 1);
        assert_eq!(read_all(&s, "vm"), vm);
        assert_eq!(s.sr_physical_utilisation("sr"), 4 * BS); // blocks 0, 5, 6, 31
        assert_eq!(layer_files(dir.path()), 2);
        // A reopened store finishes a pending coalesce itself.
        s.snapshot("vm", "b2").unwrap();
        assert!(s.destroy_deferring_coalesce("b2").unwrap());
        drop(s);
        let s = DiskStore::open(dir.path()).unwrap();
        assert_eq!(s.info("vm").unwrap().chain_depth, 1);
        assert_eq!(read_all(&s, "vm"), vm);
    }
}
