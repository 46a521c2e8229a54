//! The local-directory backend: one file per object, written atomically.
//!
//! A write goes to a temporary file `.tmp-<pid>-<random>` in the object's
//! directory, is fdatasynced, then moved into place: `put` renames over the old
//! object, `put_if_absent` hard-links (which fails atomically when the name
//! exists) and removes the temporary name. The directory is fsynced afterwards
//! so the new name survives a power cut. Names starting with `.` are never listed.
//!
//! Chunks are *staged* instead (ADR 0008): [`Storage::stage`] writes the
//! temporary file without a sync (Linux: its write-back is started at once, so
//! the disk works while the writer computes the next chunks) and remembers it;
//! [`Storage::publish`] fdatasyncs every staged file (from a few threads at
//! once, in staging order: by then most data is written, and concurrent syncs
//! share journal commits and device cache flushes), hard-links each under its
//! final name, removes the temporary names and fsyncs the touched directories
//! (likewise at once). So a final name still only ever names a complete,
//! durable object, and no chunk waits for its own syncs while the writer has
//! CPU work to do. (Not `syncfs`: it would also flush every other program's
//! dirty data on the repository's filesystem, measured at 1.5 s per call on a
//! busy machine.) Objects staged and never published (a cancelled run) have
//! their temporaries removed when the last clone of the instance is dropped;
//! those of a crashed process stay until a prune sweep removes them.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;

use super::{
    BoxFuture, ObjectMeta, Storage, StorageError, StorageErrorKind, validate_key, validate_prefix,
};

/// A repository kept in a local directory. Clones share the staged objects.
#[derive(Clone)]
pub struct LocalStorage {
    root: PathBuf,
    staging: Arc<Staging>,
}

impl std::fmt::Debug for LocalStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalStorage({})", self.root.display())
    }
}

/// The objects staged through one [`LocalStorage`] (and its clones).
struct Staging {
    state: Mutex<StagedSet>,
    /// One `publish` at a time: a second caller waits until the first has
    /// linked what it took, so its own `Ok` covers objects the first one took.
    /// The guard travels into the blocking task, so a caller that stops
    /// waiting (a cancelled run) does not let a second publish start early.
    publishing: Arc<tokio::sync::Mutex<()>>,
}

/// One staged object: its final path and its temporary file.
struct StagedObject {
    /// Staging order (publish syncs in this order).
    seq: u64,
    path: PathBuf,
    tmp: PathBuf,
}

#[derive(Default)]
struct StagedSet {
    /// Final key -> object, staged and not yet published.
    pending: HashMap<String, StagedObject>,
    /// The next `seq`.
    next_seq: u64,
    /// Set when a publish failed: the objects it held may be lost, and a later
    /// publish must not report success for them (sticky for the instance).
    failed: Option<String>,
}

impl Staging {
    fn lock(&self) -> MutexGuard<'_, StagedSet> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Staging {
    /// Objects still staged when the last clone goes away were never published,
    /// so nothing durable references them: remove their temporary files.
    fn drop(&mut self) {
        let set = self.lock();
        for o in set.pending.values() {
            let _ = fs::remove_file(&o.tmp);
        }
    }
}

impl LocalStorage {
    /// Uses `root` (created when missing) as the repository directory.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        let shown = root.display().to_string();
        fs::create_dir_all(&root).map_err(|e| StorageError::from_io("open", &shown, &e))?;
        Ok(LocalStorage {
            root,
            staging: Arc::new(Staging {
                state: Mutex::new(StagedSet::default()),
                publishing: Arc::new(tokio::sync::Mutex::new(())),
            }),
        })
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of objects staged and not yet published.
    pub fn staged_count(&self) -> usize {
        self.staging.lock().pending.len()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn poisoned(&self, op: &'static str, key: &str) -> Result<(), StorageError> {
        match &self.staging.lock().failed {
            Some(why) => Err(StorageError::new(
                StorageErrorKind::Permanent,
                op,
                key,
                format!(
                    "an earlier publish of staged objects failed ({why}); objects staged \
                     since the previous successful publish may be lost: check the disk \
                     (dmesg), then reopen the repository and run the backup again"
                ),
            )),
            None => Ok(()),
        }
    }
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    key: &str,
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StorageError::new(
            StorageErrorKind::Transient,
            op,
            key,
            format!("blocking task failed: {e}"),
        )),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// How a temporary file is brought towards the disk before it gets a name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TempSync {
    /// fdatasync now: the data and the metadata needed to read it back (the
    /// size of this new file) are durable; only timestamps may lag.
    Now,
    /// No sync: a later `publish` syncs the filesystem. Linux: write-back is
    /// started at once so it overlaps the caller's work.
    Later,
}

/// Writes `data` to a fresh temporary file in `dir`; returns its path.
fn write_temp(dir: &Path, data: &[u8], sync: TempSync) -> std::io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let mut rnd = [0u8; 8];
    // Falls back to time-based names only if the system RNG fails.
    if aws_lc_rs::rand::fill(&mut rnd).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        rnd = (nanos as u64).to_le_bytes();
    }
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), hex::encode(rnd)));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let res = f.write_all(data).and_then(|_| match sync {
        TempSync::Now => f.sync_data(),
        TempSync::Later => start_write_back(&f),
    });
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Starts writing the file's dirty pages to the disk without waiting.
///
/// Linux: `posix_fadvise(POSIX_FADV_DONTNEED)` first starts asynchronous
/// write-back of the range (the kernel's `generic_fadvise` calls
/// `__filemap_fdatawrite_range(.., WB_SYNC_NONE)`, as `sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE` does, which would need `unsafe` libc here), then
/// drops the clean pages (a chunk is written once and rarely read back soon).
/// It guarantees nothing: `publish`'s fdatasync does. Elsewhere: nothing.
fn start_write_back(f: &fs::File) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed).map_err(std::io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = f;
        Ok(())
    }
}

fn put_blocking(path: &Path, data: &[u8], overwrite: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = write_temp(dir, data, TempSync::Now)?;
    let res = if overwrite {
        fs::rename(&tmp, path)
    } else {
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        linked
    };
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res?;
    sync_dir(dir)
}

/// Threads syncing at once in `publish`: concurrent syncs share journal
/// commits and device cache flushes, sequential ones each wait for their own.
const PUBLISH_THREADS: usize = 8;

/// Runs `f` on every item, from up to [`PUBLISH_THREADS`] threads (item `i` on
/// thread `i % n`, so each thread goes in staging order); the first error wins.
fn in_parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> Result<(), (String, std::io::Error)> + Sync,
) -> Result<(), (String, std::io::Error)> {
    let n = PUBLISH_THREADS.min(items.len());
    if n <= 1 {
        return items.iter().try_for_each(&f);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..n)
            .map(|t| scope.spawn(move || items.iter().skip(t).step_by(n).try_for_each(f)))
            .collect();
        let mut first = Ok(());
        for w in workers {
            let r = w.join().unwrap_or_else(|_| {
                Err((
                    "(publish)".to_string(),
                    std::io::Error::other("a sync thread panicked"),
                ))
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

/// The blocking part of `publish`: sync each staged file, link, unlink, sync
/// the directories. Returns the first failure with the key it concerns.
fn publish_blocking(
    root: &Path,
    batch: &[(String, PathBuf, PathBuf)],
) -> Result<(), (String, std::io::Error)> {
    // 1. The staged files' data and sizes become durable (no name yet). A
    //    reopened file reports write-back errors no one has seen yet, and no
    //    one else syncs our temporaries.
    //    A temporary already gone while its final name exists was published
    //    by an earlier publish whose caller stopped waiting (a cancelled task):
    //    that one synced it before linking.
    let gone_but_named = |e: &std::io::Error, path: &Path| {
        e.kind() == std::io::ErrorKind::NotFound && fs::symlink_metadata(path).is_ok()
    };
    in_parallel(batch, |(key, path, tmp)| {
        match fs::File::open(tmp).and_then(|f| f.sync_data()) {
            Err(e) if !gone_but_named(&e, path) => Err((key.clone(), e)),
            _ => Ok(()),
        }
    })?;
    // 2. Each gets its final name; an existing name holds the same content
    //    (content-addressed, written by another writer): keep it.
    let mut dirs = std::collections::BTreeSet::new();
    for (key, path, tmp) in batch {
        match fs::hard_link(tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) if gone_but_named(&e, path) => {}
            Err(e) => return Err((key.clone(), e)),
        }
        let _ = fs::remove_file(tmp);
        // The object's directory and those above it (staging may have created them).
        let mut d = path.parent();
        while let Some(dir) = d {
            if !dirs.insert(dir.to_path_buf()) || dir == root {
                break;
            }
            d = dir.parent();
        }
    }
    // 3. The names become durable (deepest first; after the first, the
    //    journal is usually committed already and the rest return at once).
    let dirs: Vec<PathBuf> = dirs.into_iter().rev().collect();
    in_parallel(&dirs, |d| {
        sync_dir(d).map_err(|e| (d.display().to_string(), e))
    })?;
    Ok(())
}

/// Removes `.tmp-*` files under `dir` modified before `older_than`, except
/// those in `keep`; returns how many were removed.
fn remove_temporaries(
    dir: &Path,
    older_than: SystemTime,
    keep: &std::collections::HashSet<PathBuf>,
) -> std::io::Result<u64> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        // A directory xenvault did not make and may not read (`lost+found`
        // when the repository is a file system's root): no temporaries of
        // ours are in it, and it must not stop the sweep.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(
                "prune: cannot look for temporaries in {}: {e}",
                dir.display()
            );
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let ft = entry.file_type()?;
        let path = entry.path();
        if ft.is_dir() {
            removed += remove_temporaries(&path, older_than, keep)?;
            continue;
        }
        let is_temp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".tmp-"));
        if !ft.is_file() || !is_temp || keep.contains(&path) {
            continue;
        }
        let modified = match entry.metadata().and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if modified < older_than {
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

fn meta_of(key: &str, md: &fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        key: key.to_string(),
        size: md.len(),
        modified: md.modified().unwrap_or(std::time::UNIX_EPOCH),
    }
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let Some(key) = rel.to_str() else { continue };
        let ft = entry.file_type()?;
        if ft.is_dir() {
            let as_dir = format!("{key}/");
            if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                walk(root, &path, prefix, out)?;
            }
        } else if ft.is_file() && key.starts_with(prefix) {
            match entry.metadata() {
                Ok(md) => out.push(meta_of(key, &md)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

impl Storage for LocalStorage {
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("put_if_absent", key)?;
            let path = self.path(key);
            let k = key.to_string();
            blocking("put_if_absent", key, move || {
                put_blocking(&path, &data, false)
                    .map_err(|e| StorageError::from_io("put_if_absent", &k, &e))
            })
            .await
        })
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("put", key)?;
            let path = self.path(key);
            let k = key.to_string();
            blocking("put", key, move || {
                put_blocking(&path, &data, true).map_err(|e| StorageError::from_io("put", &k, &e))
            })
            .await
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes, StorageError>> {
        Box::pin(async move {
            validate_key("get", key)?;
            let path = self.path(key);
            let k = key.to_string();
            blocking("get", key, move || {
                fs::read(&path)
                    .map(Bytes::from)
                    .map_err(|e| StorageError::from_io("get", &k, &e))
            })
            .await
        })
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StorageError>> {
        Box::pin(async move {
            validate_key("get_range", key)?;
            let path = self.path(key);
            let k = key.to_string();
            blocking("get_range", key, move || {
                let io = || -> std::io::Result<Vec<u8>> {
                    let mut f = fs::File::open(&path)?;
                    let size = f.metadata()?.len();
                    let start = offset.min(size);
                    let n = len.min(size - start);
                    f.seek(SeekFrom::Start(start))?;
                    let mut buf = Vec::with_capacity(n as usize);
                    f.take(n).read_to_end(&mut buf)?;
                    Ok(buf)
                };
                io().map(Bytes::from)
                    .map_err(|e| StorageError::from_io("get_range", &k, &e))
            })
            .await
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, StorageError>> {
        Box::pin(async move {
            validate_prefix(prefix)?;
            let root = self.root.clone();
            let p = prefix.to_string();
            blocking("list", prefix, move || {
                // Start at the deepest directory the prefix names.
                let start_dir = match p.rfind('/') {
                    Some(i) => root.join(&p[..i]),
                    None => root.clone(),
                };
                let mut out = Vec::new();
                walk(&root, &start_dir, &p, &mut out)
                    .map_err(|e| StorageError::from_io("list", &p, &e))?;
                Ok(out)
            })
            .await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("delete", key)?;
            let path = self.path(key);
            let k = key.to_string();
            blocking("delete", key, move || match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StorageError::from_io("delete", &k, &e)),
            })
            .await
        })
    }

    fn stat<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            validate_key("stat", key)?;
            let path = self.path(key);
            let k = key.to_string();
            blocking("stat", key, move || match fs::metadata(&path) {
                Ok(md) if md.is_file() => Ok(meta_of(&k, &md)),
                Ok(_) => Err(StorageError::not_found("stat", &k)),
                Err(e) => Err(StorageError::from_io("stat", &k, &e)),
            })
            .await
        })
    }

    fn stage<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("stage", key)?;
            self.poisoned("stage", key)?;
            let already = || {
                StorageError::new(
                    StorageErrorKind::AlreadyExists,
                    "stage",
                    key,
                    "object already exists or is staged",
                )
            };
            if self.staging.lock().pending.contains_key(key) {
                return Err(already());
            }
            let path = self.path(key);
            let k = key.to_string();
            let p = path.clone();
            let tmp = blocking("stage", key, move || {
                let io = || -> std::io::Result<PathBuf> {
                    if fs::symlink_metadata(&p).is_ok() {
                        return Err(std::io::ErrorKind::AlreadyExists.into());
                    }
                    let dir = p.parent().unwrap_or(Path::new("."));
                    write_temp(dir, &data, TempSync::Later)
                };
                io().map_err(|e| StorageError::from_io("stage", &k, &e))
            })
            .await?;
            let mut set = self.staging.lock();
            if set.pending.contains_key(key) {
                // Staged meanwhile by another writer (same content): keep theirs.
                drop(set);
                let _ = fs::remove_file(&tmp);
                return Err(already());
            }
            let seq = set.next_seq;
            set.next_seq += 1;
            set.pending
                .insert(key.to_string(), StagedObject { seq, path, tmp });
            Ok(())
        })
    }

    fn publish(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let one_at_a_time = self.staging.publishing.clone().lock_owned().await;
            self.poisoned("publish", "(staged objects)")?;
            let mut batch: Vec<(u64, String, PathBuf, PathBuf)> = self
                .staging
                .lock()
                .pending
                .iter()
                .map(|(k, o)| (o.seq, k.clone(), o.path.clone(), o.tmp.clone()))
                .collect();
            batch.sort_unstable_by_key(|b| b.0);
            let batch: Vec<(String, PathBuf, PathBuf)> =
                batch.into_iter().map(|(_, k, p, t)| (k, p, t)).collect();
            if batch.is_empty() {
                return Ok(());
            }
            let root = self.root.clone();
            let staging = self.staging.clone();
            // The whole publish, its bookkeeping included, runs to its end even
            // when the caller stops waiting: a failure always poisons the
            // instance, and the next publish starts only after this one.
            let res = tokio::task::spawn_blocking(move || {
                let outcome = publish_blocking(&root, &batch);
                let mut set = staging.lock();
                let result = match outcome {
                    Ok(()) => {
                        for (key, _, tmp) in &batch {
                            if set.pending.get(key).is_some_and(|o| &o.tmp == tmp) {
                                set.pending.remove(key);
                            }
                        }
                        Ok(())
                    }
                    Err((key, e)) => {
                        // The staged files' durability is unknown (a failed fsync
                        // is not reported twice): never give them a name. Every
                        // publish after this one fails too, for the objects it
                        // took were staged by other writers as well.
                        let why = e.to_string();
                        let lost = std::mem::take(&mut set.pending);
                        set.failed = Some(format!("{key}: {why}"));
                        drop(set);
                        for o in lost.values() {
                            let _ = fs::remove_file(&o.tmp);
                        }
                        Err((key, why, lost.len()))
                    }
                };
                drop(one_at_a_time);
                result
            })
            .await;
            match res {
                Ok(Ok(())) => Ok(()),
                Ok(Err((key, why, lost))) => Err(StorageError::new(
                    StorageErrorKind::Permanent,
                    "publish",
                    &key,
                    format!(
                        "making {lost} staged objects durable failed: {why} (check the disk and \
                         free space, then run the backup again)"
                    ),
                )),
                Err(e) => {
                    // It stopped midway (a panic): what it synced is unknown.
                    let why = format!("blocking task failed: {e}");
                    let lost = {
                        let mut set = self.staging.lock();
                        set.failed = Some(format!("(staged objects): {why}"));
                        std::mem::take(&mut set.pending)
                    };
                    for o in lost.values() {
                        let _ = fs::remove_file(&o.tmp);
                    }
                    Err(StorageError::new(
                        StorageErrorKind::Permanent,
                        "publish",
                        "(staged objects)",
                        why,
                    ))
                }
            }
        })
    }

    fn remove_stale_temporaries(
        &self,
        older_than: SystemTime,
    ) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(async move {
            // Never remove what this instance staged and will still publish.
            let keep: std::collections::HashSet<PathBuf> = self
                .staging
                .lock()
                .pending
                .values()
                .map(|o| o.tmp.clone())
                .collect();
            let root = self.root.clone();
            blocking("remove_stale_temporaries", "", move || {
                remove_temporaries(&root, older_than, &keep)
                    .map_err(|e| StorageError::from_io("remove_stale_temporaries", "", &e))
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_semantics_and_atomic_names() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path()).unwrap();
        s.put_if_absent("chunks/ab/abcd", Bytes::from_static(b"data"))
            .await
            .unwrap();
        let e = s
            .put_if_absent("chunks/ab/abcd", Bytes::from_static(b"other"))
            .await
            .unwrap_err();
        assert!(e.is_already_exists(), "{e}");
        assert_eq!(&s.get("chunks/ab/abcd").await.unwrap()[..], b"data");
        assert_eq!(
            &s.get_range("chunks/ab/abcd", 2, 100).await.unwrap()[..],
            b"ta"
        );
        s.put("locks/x", Bytes::from_static(b"1")).await.unwrap();
        s.put("locks/x", Bytes::from_static(b"22")).await.unwrap();
        assert_eq!(s.stat("locks/x").await.unwrap().size, 2);
        // A leftover temporary file is never listed.
        fs::write(dir.path().join("locks/.tmp-1-00"), b"junk").unwrap();
        let mut keys: Vec<String> = s
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        keys.sort();
        assert_eq!(keys, vec!["chunks/ab/abcd", "locks/x"]);
        assert_eq!(s.list("chunks/a").await.unwrap().len(), 1);
        assert_eq!(s.list("chunks/b").await.unwrap().len(), 0);
        assert_eq!(s.list("nothing/").await.unwrap().len(), 0);
        s.delete("locks/x").await.unwrap();
        s.delete("locks/x").await.unwrap();
        assert!(s.get("locks/x").await.unwrap_err().is_not_found());
        assert!(s.stat("chunks").await.unwrap_err().is_not_found());
        // No temporary files remain next to written objects.
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("chunks/ab"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1);
    }

    fn temps_in(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(dir) else {
            return out;
        };
        for e in rd {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.extend(temps_in(&e.path()));
            } else if e.file_name().to_str().unwrap().starts_with(".tmp-") {
                out.push(e.path());
            }
        }
        out
    }

    #[tokio::test]
    async fn a_staged_object_is_invisible_until_published() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path()).unwrap();
        let other = LocalStorage::new(dir.path()).unwrap();
        s.stage("chunks/ab/ab01", Bytes::from_static(b"one"))
            .await
            .unwrap();
        s.stage("chunks/cd/cd01", Bytes::from_static(b"two"))
            .await
            .unwrap();
        assert_eq!(s.staged_count(), 2);
        // Written (as a temporary file) but under no name, for anyone.
        assert_eq!(temps_in(dir.path()).len(), 2);
        for st in [&s, &other] {
            assert!(st.stat("chunks/ab/ab01").await.unwrap_err().is_not_found());
            assert!(st.get("chunks/cd/cd01").await.unwrap_err().is_not_found());
            assert!(st.list("").await.unwrap().is_empty());
        }
        // Staging it again, here or through a clone, says it is (to be) there.
        let e = s
            .clone()
            .stage("chunks/ab/ab01", Bytes::from_static(b"one"))
            .await
            .unwrap_err();
        assert!(e.is_already_exists(), "{e}");
        // Another instance neither sees nor publishes this one's staged objects.
        other.publish().await.unwrap();
        assert!(
            other
                .stat("chunks/ab/ab01")
                .await
                .unwrap_err()
                .is_not_found()
        );

        s.publish().await.unwrap();
        assert_eq!(s.staged_count(), 0);
        assert_eq!(&other.get("chunks/ab/ab01").await.unwrap()[..], b"one");
        assert_eq!(&s.get("chunks/cd/cd01").await.unwrap()[..], b"two");
        assert_eq!(s.list("chunks/").await.unwrap().len(), 2);
        assert!(temps_in(dir.path()).is_empty(), "temporaries left");
        // Publishing again (nothing staged) is a no-op.
        s.publish().await.unwrap();

        // An existing final name: AlreadyExists, nothing written.
        let e = s
            .stage("chunks/ab/ab01", Bytes::from_static(b"one"))
            .await
            .unwrap_err();
        assert!(e.is_already_exists(), "{e}");
        assert!(temps_in(dir.path()).is_empty());
        // A name that appeared meanwhile (another process) is kept at publish.
        s.stage("chunks/ef/ef01", Bytes::from_static(b"mine"))
            .await
            .unwrap();
        other
            .put_if_absent("chunks/ef/ef01", Bytes::from_static(b"theirs"))
            .await
            .unwrap();
        s.publish().await.unwrap();
        assert_eq!(&s.get("chunks/ef/ef01").await.unwrap()[..], b"theirs");
        assert!(temps_in(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn unpublished_temporaries_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path()).unwrap();
        // Dropping the last clone discards what is still staged.
        s.stage("chunks/ab/ab03", Bytes::from_static(b"three"))
            .await
            .unwrap();
        let clone = s.clone();
        drop(s);
        assert_eq!(temps_in(dir.path()).len(), 1, "a clone still holds it");
        drop(clone);
        assert!(temps_in(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_failed_publish_names_nothing_and_poisons_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path()).unwrap();
        s.stage("chunks/ab/ab01", Bytes::from_static(b"one"))
            .await
            .unwrap();
        s.stage("chunks/ab/ab02", Bytes::from_static(b"two"))
            .await
            .unwrap();
        // A temporary vanishes (as if removed by a careless sweep).
        let temps = temps_in(dir.path());
        fs::remove_file(&temps[0]).unwrap();
        let e = s.publish().await.unwrap_err();
        assert_eq!(e.kind, StorageErrorKind::Permanent, "{e}");
        assert!(e.message.contains("staged objects durable failed"), "{e}");
        assert!(temps_in(dir.path()).is_empty(), "the lost batch is removed");
        // Later publishes and stages fail too: their callers' objects may be lost.
        let e = s.publish().await.unwrap_err();
        assert!(e.message.contains("an earlier publish"), "{e}");
        let e = s
            .stage("chunks/ab/ab03", Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(e.message.contains("reopen the repository"), "{e}");
        // A fresh instance works.
        let fresh = LocalStorage::new(dir.path()).unwrap();
        fresh
            .stage("chunks/ab/ab03", Bytes::from_static(b"x"))
            .await
            .unwrap();
        fresh.publish().await.unwrap();
        assert_eq!(&fresh.get("chunks/ab/ab03").await.unwrap()[..], b"x");
    }

    #[tokio::test]
    async fn a_publish_finishes_what_a_cancelled_one_began() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path()).unwrap();
        s.stage("chunks/ab/ab01", Bytes::from_static(b"one"))
            .await
            .unwrap();
        s.stage("chunks/ab/ab02", Bytes::from_static(b"two"))
            .await
            .unwrap();
        // A publish whose caller was cancelled got as far as linking one object
        // (its blocking part runs on; the staged set was not updated).
        let tmp = {
            let set = s.staging.lock();
            set.pending["chunks/ab/ab01"].tmp.clone()
        };
        fs::hard_link(&tmp, dir.path().join("chunks/ab/ab01")).unwrap();
        fs::remove_file(&tmp).unwrap();
        s.publish().await.unwrap();
        assert_eq!(&s.get("chunks/ab/ab01").await.unwrap()[..], b"one");
        assert_eq!(&s.get("chunks/ab/ab02").await.unwrap()[..], b"two");
        assert_eq!(s.staged_count(), 0);
        assert!(temps_in(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn stale_temporaries_are_removed_but_not_staged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path()).unwrap();
        s.put("chunks/ab/ab01", Bytes::from_static(b"kept"))
            .await
            .unwrap();
        // Two crashed writes: one old, one recent.
        let old = dir.path().join("chunks/ab/.tmp-1-old");
        let recent = dir.path().join("chunks/.tmp-1-recent");
        fs::write(&old, b"junk").unwrap();
        fs::write(&recent, b"junk").unwrap();
        let hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(hour_ago - std::time::Duration::from_secs(60))
            .unwrap();
        // And one staged by this instance, to be published later.
        s.stage("chunks/cd/cd01", Bytes::from_static(b"staged"))
            .await
            .unwrap();
        assert_eq!(s.remove_stale_temporaries(hour_ago).await.unwrap(), 1);
        assert!(!old.exists() && recent.exists());
        let future = SystemTime::now() + std::time::Duration::from_secs(60);
        assert_eq!(s.remove_stale_temporaries(future).await.unwrap(), 1);
        assert!(!recent.exists());
        s.publish().await.unwrap();
        assert_eq!(&s.get("chunks/cd/cd01").await.unwrap()[..], b"staged");
        assert_eq!(&s.get("chunks/ab/ab01").await.unwrap()[..], b"kept");
        assert_eq!(s.remove_stale_temporaries(future).await.unwrap(), 0);
    }
}
