//! The journal of temporary objects: every snapshot (and its VDIs) that
//! xenvault creates on a pool is written here before and after creation,
//! tagged in `other_config`, and destroyed by UUID and tag — never by name.
//!
//! # How a snapshot is made (see [`snapshot_tagged`])
//!
//! 1. A random *token* is drawn and an [`Event::Intent`] line (pool, run, job,
//!    source VM, token) is appended to `journal.jsonl` in the state directory
//!    and synced, before anything happens on the pool.
//! 2. The tags `xenvault:token`, `xenvault:run`, `xenvault:job` are put in the
//!    SOURCE VM's `other_config`; `VM.snapshot` copies `other_config` to the
//!    snapshot, so the snapshot carries the tags from the moment it exists
//!    (no window where an untagged snapshot could leak). The source VM's
//!    tags are removed right after (and by the sweep if that fails).
//! 3. [`Event::SnapshotCreated`] (uuid) and [`Event::VdiCreated`] (uuid of
//!    every snapshot VDI, which also gets the tags) are appended.
//! 4. Cleanup ([`destroy_token`]) destroys the snapshot VM, then its VDIs,
//!    each only when its UUID is journaled AND its tag matches (a VDI is also
//!    accepted when it is a snapshot VDI reached through our tagged snapshot
//!    VM); `HANDLE_INVALID`/`UUID_INVALID` mean "already gone", `VDI_IN_USE` is
//!    retried. When everything is gone, [`Event::Done`] closes the token.
//!
//! # The sweep
//!
//! [`sweep`] runs at the start and at the end of every run: every token of
//! the pool that is not `Done` and whose run is not alive any more (each run
//! holds an exclusive lock on `runs/<run-id>.lock`) is cleaned as above; an
//! intent without a recorded snapshot is resolved by looking at the source
//! VM's snapshots for one whose `xenvault:token` tag equals the token. Then
//! the journal is compacted (closed tokens dropped, atomic rename).
//! Objects whose tag does not match are left alone and reported. Names are
//! never looked at: a VM called "xenvault snapshot …" is never touched.
//!
//! # Kept snapshots (repository targets)
//!
//! A forever-incremental job keeps the snapshot of its last successful
//! backup as the base of the next one (CBT `list_changed_blocks` and VHD
//! `base=` exports need it), and an interrupted backup keeps the snapshot its
//! resume checkpoint was read from. [`keep_snapshot`] tags the snapshot VM
//! and its VDIs (`xenvault:base=<job>` or `xenvault:resume=<job>`) and then
//! appends [`Event::Kept`]: from that line on the token is no longer
//! outstanding, so neither [`destroy_token`] nor the [`sweep`] touches it.
//! [`release_kept`] appends [`Event::Released`] (the token is outstanding
//! again) and destroys it by UUID and token tag as above, so a failed
//! destroy is retried by the next sweep. [`reduce_to_metadata`] destroys
//! the snapshot VM and `VDI.data_destroy`s the VDIs (`base = "metadata"`).
//!
//! Crash safety: a token is kept only once its `Kept` line is synced, and
//! the superseded base is released only after the new one is kept, so a
//! crash leaves either the old base (the new snapshot is swept) or both
//! (the next run uses the newest whose restore point exists and releases
//! the other): at most one extra snapshot, never no base.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use xenvault_xapi::ErrorCode;
use xenvault_xapi::records::{VbdType, Vdi, VdiRef, VdiType, Vm, VmRef};
use xenvault_xapi::session::Session;

/// `other_config` key: the token of the snapshot operation (unique).
pub const TAG_TOKEN: &str = "xenvault:token";
/// `other_config` key: the run id.
pub const TAG_RUN: &str = "xenvault:run";
/// `other_config` key: the job name.
pub const TAG_JOB: &str = "xenvault:job";
/// `other_config` key on a snapshot kept as the base of the next
/// incremental of a job (value: the job name).
pub const TAG_BASE: &str = "xenvault:base";
/// `other_config` key on a snapshot kept because a resume checkpoint of a
/// job reads from it (value: the job name).
pub const TAG_RESUME: &str = "xenvault:resume";
/// The journal's file name in the state directory.
pub const JOURNAL_FILE: &str = "journal.jsonl";

/// How often `VDI.destroy` is retried on `VDI_IN_USE`, and how long apart.
const VDI_IN_USE_RETRIES: u32 = 5;
const VDI_IN_USE_DELAY: Duration = Duration::from_millis(1500);

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When it was written (RFC 3339).
    #[serde(with = "xenvault_types::report::rfc3339")]
    pub at: OffsetDateTime,
    /// The pool (its configuration name).
    pub pool: String,
    /// The run that wrote it.
    pub run_id: String,
    /// The job of that run.
    pub job: String,
    /// The snapshot operation it belongs to.
    pub token: String,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// What a journal line records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A snapshot of `source_vm` (uuid) is about to be taken.
    Intent {
        /// The UUID of the VM being snapshotted.
        source_vm: String,
    },
    /// The snapshot VM exists.
    SnapshotCreated {
        /// Its UUID.
        uuid: String,
    },
    /// A snapshot VDI exists.
    VdiCreated {
        /// Its UUID.
        uuid: String,
    },
    /// Everything of the token is gone (or was never created).
    Done,
    /// The snapshot is kept on the pool (see the module docs): the sweep and
    /// [`destroy_token`] leave it alone until [`Event::Released`].
    Kept {
        /// Why it is kept.
        role: KeepRole,
        /// The job's target name (repository) the snapshot belongs to.
        target: String,
        /// The restore point written from it (`Base`), if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restore_point: Option<String>,
    },
    /// The kept snapshot's VM was destroyed and its VDIs reduced to CBT
    /// metadata (`VDI.data_destroy`, type `cbt_metadata`).
    DataDestroyed,
    /// The kept snapshot is no longer needed: the token is open for cleanup.
    Released,
}

/// Why a snapshot is kept on the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeepRole {
    /// The base of the next incremental backup (CBT or VHD `base=`).
    Base,
    /// A resume checkpoint of an interrupted backup reads from it.
    Resume,
}

impl KeepRole {
    /// The `other_config` key that marks it.
    pub fn tag(self) -> &'static str {
        match self {
            KeepRole::Base => TAG_BASE,
            KeepRole::Resume => TAG_RESUME,
        }
    }
}

/// A snapshot the journal keeps (a token with `Kept` and no `Released`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptSnapshot {
    /// The token, its pool, creating run, job, source VM, snapshot and VDIs.
    pub token: Outstanding,
    /// Why it is kept.
    pub role: KeepRole,
    /// The job's target name.
    pub target: String,
    /// The restore point written from it, if any.
    pub restore_point: Option<String>,
    /// When it was kept.
    pub kept_at: OffsetDateTime,
    /// True once its VDIs were reduced to CBT metadata.
    pub metadata_only: bool,
}

/// What the journal says about one snapshot operation still open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outstanding {
    /// The token.
    pub token: String,
    /// The pool.
    pub pool: String,
    /// The run.
    pub run_id: String,
    /// The job.
    pub job: String,
    /// When the intent was written.
    pub at: OffsetDateTime,
    /// The source VM's UUID.
    pub source_vm: String,
    /// The snapshot VM's UUID, when its creation was recorded.
    pub snapshot: Option<String>,
    /// The snapshot VDIs recorded.
    pub vdis: BTreeSet<String>,
}

/// A journal failure (file system).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The state directory or a file in it could not be used.
    #[error(
        "journal: cannot {action} {path}: {source} (check the state directory, `state-dir` in the configuration)"
    )]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// A line could not be encoded.
    #[error("journal: cannot encode an entry: {0}")]
    Encode(String),
    /// Another run of the same job holds its lock.
    #[error(
        "job {job} is already running ({holder}); this run stopped before touching the pool: wait for that run to end or stop it (two runs of one job would snapshot the same VMs twice)"
    )]
    JobBusy {
        /// The job.
        job: String,
        /// Who holds it (pid, run id, start time), as that run wrote it.
        holder: String,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io {
        action,
        path,
        source,
    }
}

/// The default state directory: `$XENVAULT_STATE_DIR`, else
/// `/var/lib/xenvault` for root, else `$XDG_STATE_HOME/xenvault` or
/// `~/.local/state/xenvault`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XENVAULT_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if running_as_root() {
        return PathBuf::from("/var/lib/xenvault");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("xenvault");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/xenvault"),
        None => PathBuf::from("/var/lib/xenvault"),
    }
}

/// True when the process runs as root (`/proc/self` is owned by the
/// effective uid).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The journal file and the run locks in a state directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// Held while a run is alive: other runs' sweeps leave its objects alone.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Held while a run of a job is under way: a second run of the same job
/// (an overlapping cron start) is refused ([`Journal::lock_job`]). The lock
/// is the kernel's (`flock`), so a killed run never leaves it taken.
#[derive(Debug)]
pub struct JobLock {
    _file: File,
}

/// A name as a file name: `[A-Za-z0-9-]` kept, every other byte as `_xx`
/// (hex), so two different names never share a file.
fn file_safe(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

impl Journal {
    /// Opens (creating, mode 0700) the state directory `dir`.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir.join("runs")).map_err(io_err("create", dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This state directory's identity: a random id written to
    /// `<dir>/instance-id` the first time it is asked for. Run locks live
    /// here, so a tag naming a run is only judged by the directory that
    /// holds its lock (another user's or configuration's state directory,
    /// or another machine, has another id).
    pub fn instance_id(&self) -> Result<String, JournalError> {
        let path = self.dir.join("instance-id");
        let valid = |text: &str| {
            let t = text.trim();
            (!t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit())).then(|| t.to_string())
        };
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Some(id) = valid(&text)
        {
            return Ok(id);
        }
        // Written whole under a temporary name, then linked into place: the
        // first writer wins, and a racing one reads the winner's id.
        let id = uuid::Uuid::new_v4().simple().to_string();
        let tmp = self
            .dir
            .join(format!(".instance-id.{}.{id}", std::process::id()));
        std::fs::write(&tmp, format!("{id}\n")).map_err(io_err("write", &tmp))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(id),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
                valid(&text).ok_or_else(|| JournalError::Io {
                    action: "read",
                    path: path.clone(),
                    source: std::io::Error::other("not a hexadecimal id: remove the file"),
                })
            }
            Err(e) => Err(io_err("create", &path)(e)),
        }
    }

    /// The journal file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("journal.lock")
    }

    fn run_lock_path(&self, run_id: &str) -> PathBuf {
        self.dir
            .join("runs")
            .join(format!("{}.lock", file_safe(run_id)))
    }

    /// Takes the lock of job `job` for run `run_id`, or says who holds it
    /// ([`JournalError::JobBusy`]). The lock file keeps its holder's pid, run
    /// id and start time for that message.
    pub fn lock_job(&self, job: &str, run_id: &str) -> Result<JobLock, JournalError> {
        let dir = self.dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let path = dir.join(format!("{}.lock", file_safe(job)));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = std::io::Read::read_to_string(&mut file, &mut holder);
                let holder = holder.trim();
                return Err(JournalError::JobBusy {
                    job: job.to_string(),
                    holder: if holder.is_empty() {
                        "by a run that has not said who it is yet".to_string()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
        }
        let started = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let about = format!(
            "run {run_id}, pid {}, started {started}",
            std::process::id()
        );
        file.set_len(0)
            .and_then(|()| std::io::Write::write_all(&mut file, about.as_bytes()))
            .map_err(io_err("write", &path))?;
        Ok(JobLock { _file: file })
    }

    /// Takes the exclusive journal lock (short critical sections).
    fn lock(&self) -> Result<File, JournalError> {
        let path = self.lock_path();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        file.lock().map_err(io_err("lock", &path))?;
        Ok(file)
    }

    /// Marks `run_id` alive until the returned lock is dropped.
    pub fn begin_run(&self, run_id: &str) -> Result<RunLock, JournalError> {
        let path = self.run_lock_path(run_id);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        file.lock().map_err(io_err("lock", &path))?;
        Ok(RunLock { _file: file, path })
    }

    /// True while the run that wrote `run_id` still holds its lock.
    pub fn is_run_alive(&self, run_id: &str) -> bool {
        let path = self.run_lock_path(run_id);
        let Ok(file) = OpenOptions::new().write(true).open(&path) else {
            return false;
        };
        match file.try_lock() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(std::fs::TryLockError::Error(_)) => false,
        }
    }

    /// Appends `entry` and syncs it to disk. Async code calls
    /// [`append_async`](Self::append_async).
    pub fn append(&self, entry: &Entry) -> Result<(), JournalError> {
        let mut line =
            serde_json::to_string(entry).map_err(|e| JournalError::Encode(e.to_string()))?;
        line.push('\n');
        let _guard = self.lock()?;
        let path = self.path();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // A crash may have cut the last line: start a fresh one, so this entry
        // is not glued to the torn one (and lost with it).
        if ends_without_newline(&path).map_err(io_err("read", &path))? {
            line.insert(0, '\n');
        }
        file.write_all(line.as_bytes())
            .map_err(io_err("write", &path))?;
        file.sync_data().map_err(io_err("sync", &path))?;
        Ok(())
    }

    /// [`append`](Self::append) on the blocking pool: its sync waits for the
    /// disk, behind whatever else is being written, and a runtime worker
    /// blocked in it would also hold the task it was about to run (with two
    /// workers, a backup's whole pipeline; ADR 0010).
    pub async fn append_async(&self, entry: Entry) -> Result<(), JournalError> {
        let journal = self.clone();
        let path = self.path();
        tokio::task::spawn_blocking(move || journal.append(&entry))
            .await
            .map_err(|e| JournalError::Io {
                action: "append to",
                path,
                source: std::io::Error::other(format!("the writing task failed: {e}")),
            })?
    }

    /// Every readable entry (a torn or unreadable line is skipped with a
    /// warning: a crash may cut the last line).
    pub fn entries(&self) -> Result<Vec<Entry>, JournalError> {
        let path = self.path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let mut out = Vec::new();
        for (n, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(io_err("read", &path))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Entry>(&line) {
                Ok(e) => out.push(e),
                Err(e) => tracing::warn!(
                    "journal {}: line {} unreadable, skipped: {e}",
                    path.display(),
                    n + 1
                ),
            }
        }
        Ok(out)
    }

    /// The open snapshot operations of `pool` (every pool when `None`) that
    /// are not kept: what cleanup and the sweep destroy.
    pub fn outstanding(&self, pool: Option<&str>) -> Result<Vec<Outstanding>, JournalError> {
        Ok(fold(&self.entries()?)
            .into_values()
            .filter(|t| t.kept.is_none())
            .map(|t| t.open)
            .filter(|o| pool.is_none_or(|p| o.pool == p))
            .collect())
    }

    /// The kept snapshots of `pool` (every pool when `None`), oldest first.
    pub fn kept(&self, pool: Option<&str>) -> Result<Vec<KeptSnapshot>, JournalError> {
        let mut out: Vec<KeptSnapshot> = fold(&self.entries()?)
            .into_values()
            .filter_map(TokenState::into_kept)
            .filter(|k| pool.is_none_or(|p| k.token.pool == p))
            .collect();
        out.sort_by(|a, b| a.kept_at.cmp(&b.kept_at).then(a.token.at.cmp(&b.token.at)));
        Ok(out)
    }

    /// The kept snapshots of one job's source VM on one pool, oldest first.
    pub fn kept_for(
        &self,
        pool: &str,
        job: &str,
        source_vm: &str,
    ) -> Result<Vec<KeptSnapshot>, JournalError> {
        Ok(self
            .kept(Some(pool))?
            .into_iter()
            .filter(|k| k.token.job == job && k.token.source_vm == source_vm)
            .collect())
    }

    /// True when `token` is open and kept.
    pub fn is_kept(&self, token: &str) -> Result<bool, JournalError> {
        Ok(fold(&self.entries()?)
            .get(token)
            .is_some_and(|t| t.kept.is_some()))
    }

    /// Every token not closed by `Done` (kept or not), by token.
    fn open_tokens(&self) -> Result<BTreeMap<String, TokenState>, JournalError> {
        Ok(fold(&self.entries()?))
    }

    /// Rewrites the journal without the closed tokens (atomic rename).
    pub fn compact(&self) -> Result<(), JournalError> {
        let _guard = self.lock()?;
        let entries = self.entries()?;
        let open = fold(&entries);
        let keep: Vec<&Entry> = entries
            .iter()
            .filter(|e| open.contains_key(&e.token))
            .collect();
        if keep.len() == entries.len() {
            return Ok(());
        }
        let path = self.path();
        let tmp = self.dir.join(format!("{JOURNAL_FILE}.tmp"));
        let mut text = String::new();
        for e in keep {
            text.push_str(
                &serde_json::to_string(e).map_err(|e| JournalError::Encode(e.to_string()))?,
            );
            text.push('\n');
        }
        {
            let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
            file.write_all(text.as_bytes())
                .map_err(io_err("write", &tmp))?;
            file.sync_all().map_err(io_err("sync", &tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        Ok(())
    }
}

/// What the journal says about one token not closed by `Done`.
#[derive(Debug, Clone)]
struct TokenState {
    open: Outstanding,
    /// `(role, target, restore point, kept at)` while kept.
    kept: Option<(KeepRole, String, Option<String>, OffsetDateTime)>,
    metadata_only: bool,
}

impl TokenState {
    fn into_kept(self) -> Option<KeptSnapshot> {
        let (role, target, restore_point, kept_at) = self.kept?;
        Some(KeptSnapshot {
            token: self.open,
            role,
            target,
            restore_point,
            kept_at,
            metadata_only: self.metadata_only,
        })
    }
}

/// Folds entries into the open tokens (tokens with an intent and no `Done`),
/// each with its kept state (the last `Kept` not followed by `Released`).
fn fold(entries: &[Entry]) -> BTreeMap<String, TokenState> {
    let mut open: BTreeMap<String, TokenState> = BTreeMap::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    for e in entries {
        match &e.event {
            Event::Intent { source_vm } => {
                open.entry(e.token.clone()).or_insert_with(|| TokenState {
                    open: Outstanding {
                        token: e.token.clone(),
                        pool: e.pool.clone(),
                        run_id: e.run_id.clone(),
                        job: e.job.clone(),
                        at: e.at,
                        source_vm: source_vm.clone(),
                        snapshot: None,
                        vdis: BTreeSet::new(),
                    },
                    kept: None,
                    metadata_only: false,
                });
            }
            Event::SnapshotCreated { uuid } => {
                if let Some(t) = open.get_mut(&e.token) {
                    t.open.snapshot = Some(uuid.clone());
                }
            }
            Event::VdiCreated { uuid } => {
                if let Some(t) = open.get_mut(&e.token) {
                    t.open.vdis.insert(uuid.clone());
                }
            }
            Event::Done => {
                done.insert(e.token.clone());
            }
            Event::Kept {
                role,
                target,
                restore_point,
            } => {
                if let Some(t) = open.get_mut(&e.token) {
                    t.kept = Some((*role, target.clone(), restore_point.clone(), e.at));
                }
            }
            Event::DataDestroyed => {
                if let Some(t) = open.get_mut(&e.token) {
                    t.metadata_only = true;
                }
            }
            Event::Released => {
                if let Some(t) = open.get_mut(&e.token) {
                    t.kept = None;
                }
            }
        }
    }
    open.retain(|token, _| !done.contains(token));
    open
}

/// Who is writing journal entries: a pool, a job and a run.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// The journal.
    pub journal: Journal,
    /// The pool's configuration name.
    pub pool: String,
    /// The job.
    pub job: String,
    /// The run id.
    pub run_id: String,
}

impl RunContext {
    fn entry(&self, token: &str, event: Event) -> Entry {
        Entry {
            at: OffsetDateTime::now_utc(),
            pool: self.pool.clone(),
            run_id: self.run_id.clone(),
            job: self.job.clone(),
            token: token.to_string(),
            event,
        }
    }

    /// Appends an event for `token`.
    pub fn record(&self, token: &str, event: Event) -> Result<(), JournalError> {
        self.journal.append(&self.entry(token, event))
    }

    /// [`record`](Self::record) from async code ([`Journal::append_async`]).
    pub async fn record_async(&self, token: &str, event: Event) -> Result<(), JournalError> {
        self.journal.append_async(self.entry(token, event)).await
    }
}

/// A failure while making or destroying temporary objects.
#[derive(Debug, thiserror::Error)]
pub enum TempObjectError {
    /// The journal could not be written: nothing is created without it.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The token cannot be kept (unknown, never snapshotted, or its
    /// snapshot is not the tagged one).
    #[error("cannot keep the snapshot of token {token}: {why}")]
    NotKeepable {
        /// The token.
        token: String,
        /// Why.
        why: String,
    },
    /// A XAPI call failed.
    #[error("{step}: {source}")]
    Xapi {
        /// What was being done ("snapshot of VM x", "destroy VDI y").
        step: String,
        /// The client error (XAPI code and params inside).
        source: xenvault_xapi::Error,
    },
}

impl TempObjectError {
    fn xapi(step: impl Into<String>) -> impl FnOnce(xenvault_xapi::Error) -> TempObjectError {
        let step = step.into();
        move |source| TempObjectError::Xapi { step, source }
    }
}

/// A snapshot made by [`snapshot_tagged`].
#[derive(Debug, Clone)]
pub struct TaggedSnapshot {
    /// The journal token.
    pub token: String,
    /// The snapshot VM.
    pub vm_ref: VmRef,
    /// Its record.
    pub vm: Vm,
    /// Its disks' VDIs (snapshot VDIs), with the VBD's userdevice.
    pub vdis: Vec<(VdiRef, Vdi)>,
}

fn is_gone(err: &xenvault_xapi::Error) -> bool {
    err.is_code(&ErrorCode::HandleInvalid) || err.is_code(&ErrorCode::UuidInvalid)
}

/// Takes a snapshot of `vm` the journaled, tagged way (module docs). On
/// failure the token stays open: call [`destroy_token`] (the backup does so
/// whatever happened) or let the next sweep find it.
pub async fn snapshot_tagged(
    session: &Session,
    ctx: &RunContext,
    vm: &VmRef,
    vm_uuid: &str,
    name: &str,
    ignore_vdis: &[VdiRef],
) -> Result<TaggedSnapshot, (String, TempObjectError)> {
    let token = uuid::Uuid::new_v4().to_string();
    let fail = |e: TempObjectError| (token.clone(), e);
    ctx.record_async(
        &token,
        Event::Intent {
            source_vm: vm_uuid.to_string(),
        },
    )
    .await
    .map_err(|e| fail(e.into()))?;

    let tags = [
        (TAG_TOKEN, token.as_str()),
        (TAG_RUN, ctx.run_id.as_str()),
        (TAG_JOB, ctx.job.as_str()),
    ];
    for (k, v) in tags {
        session
            .vm()
            .put_other_config(vm, k, v)
            .await
            .map_err(TempObjectError::xapi(format!(
                "tag VM {vm_uuid} before its snapshot"
            )))
            .map_err(fail)?;
    }
    let snapshot = session.vm().snapshot(vm, name, ignore_vdis).await;
    // The source VM's tags go whatever happened (the sweep retries).
    let untag = untag_source(session, vm).await;
    let snap_ref = snapshot
        .map_err(TempObjectError::xapi(format!("snapshot of VM {vm_uuid}")))
        .map_err(fail)?;
    if let Err(e) = untag {
        tracing::warn!("cannot remove xenvault tags from VM {vm_uuid}: {e}");
    }
    let snap = session
        .vm()
        .get_record(&snap_ref)
        .await
        .map_err(TempObjectError::xapi(format!(
            "read the snapshot of VM {vm_uuid}"
        )))
        .map_err(fail)?;
    ctx.record_async(
        &token,
        Event::SnapshotCreated {
            uuid: snap.uuid.clone(),
        },
    )
    .await
    .map_err(|e| fail(e.into()))?;
    let vdis = snapshot_vdis(session, &snap)
        .await
        .map_err(TempObjectError::xapi(format!(
            "read the disks of snapshot {}",
            snap.uuid
        )))
        .map_err(fail)?;
    for (vdi_ref, vdi) in &vdis {
        ctx.record_async(
            &token,
            Event::VdiCreated {
                uuid: vdi.uuid.clone(),
            },
        )
        .await
        .map_err(|e| fail(e.into()))?;
        for (k, v) in tags {
            session
                .vdi()
                .put_other_config(vdi_ref, k, v)
                .await
                .map_err(TempObjectError::xapi(format!(
                    "tag snapshot VDI {}",
                    vdi.uuid
                )))
                .map_err(fail)?;
        }
    }
    Ok(TaggedSnapshot {
        token,
        vm_ref: snap_ref,
        vm: snap,
        vdis,
    })
}

async fn untag_source(session: &Session, vm: &VmRef) -> Result<(), xenvault_xapi::Error> {
    for k in [TAG_TOKEN, TAG_RUN, TAG_JOB] {
        session.vm().remove_from_other_config(vm, k).await?;
    }
    Ok(())
}

/// The snapshot VDIs behind a snapshot VM's disk VBDs (only VDIs that are
/// themselves snapshots: anything else is not ours to destroy).
async fn snapshot_vdis(
    session: &Session,
    snap: &Vm,
) -> Result<Vec<(VdiRef, Vdi)>, xenvault_xapi::Error> {
    let mut out = Vec::new();
    for vbd_ref in &snap.vbds {
        let vbd = match session.vbd().get_record(vbd_ref).await {
            Ok(v) => v,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(e),
        };
        if vbd.type_ != VbdType::Disk || vbd.empty || vbd.vdi.is_null() {
            continue;
        }
        let vdi = match session.vdi().get_record(&vbd.vdi).await {
            Ok(v) => v,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(e),
        };
        if vdi.is_a_snapshot {
            out.push((vbd.vdi.clone(), vdi));
        }
    }
    Ok(out)
}

/// What a cleanup did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupReport {
    /// UUIDs of snapshot VMs destroyed.
    pub destroyed_vms: Vec<String>,
    /// UUIDs of VDIs destroyed.
    pub destroyed_vdis: Vec<String>,
    /// Objects left alone because their tag did not match (uuid: why).
    pub left_alone: Vec<String>,
    /// Failures (the token stays open for the next sweep).
    pub errors: Vec<String>,
    /// Tokens skipped because their run is still alive.
    pub skipped_live: usize,
    /// Tokens closed.
    pub closed: usize,
}

impl CleanupReport {
    fn merge(&mut self, other: CleanupReport) {
        self.destroyed_vms.extend(other.destroyed_vms);
        self.destroyed_vdis.extend(other.destroyed_vdis);
        self.left_alone.extend(other.left_alone);
        self.errors.extend(other.errors);
        self.skipped_live += other.skipped_live;
        self.closed += other.closed;
    }

    /// True when nothing failed.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Destroys everything of one open token (snapshot VM, then its VDIs) by
/// UUID and tag; records `Done` when nothing is left.
pub async fn destroy_token(
    session: &Session,
    journal: &Journal,
    open: &Outstanding,
) -> CleanupReport {
    let mut report = CleanupReport::default();
    // A kept snapshot (a base, a resume source) is never destroyed here:
    // release it first (`release_kept`).
    match journal.is_kept(&open.token) {
        Ok(false) => {}
        Ok(true) => {
            report.left_alone.push(format!(
                "snapshot {}: kept by the journal (token {}); not destroyed",
                open.snapshot.as_deref().unwrap_or("?"),
                open.token
            ));
            return report;
        }
        Err(e) => {
            report.errors.push(e.to_string());
            return report;
        }
    }
    let mut vdis: BTreeSet<String> = open.vdis.clone();
    // VDIs reached through our own tagged snapshot VM (not journaled yet).
    let mut reached: BTreeSet<String> = BTreeSet::new();

    // 1. Find the snapshot VM: by the recorded UUID, else among the source
    //    VM's snapshots by token.
    let snapshot = match &open.snapshot {
        Some(uuid) => match session.vm().get_by_uuid(uuid).await {
            Ok(r) => match session.vm().get_record(&r).await {
                Ok(rec) => Some((r, rec)),
                Err(e) if is_gone(&e) => None,
                Err(e) => {
                    report.errors.push(format!("read snapshot {uuid}: {e}"));
                    return report;
                }
            },
            Err(e) if is_gone(&e) => None,
            Err(e) => {
                report.errors.push(format!("find snapshot {uuid}: {e}"));
                return report;
            }
        },
        None => match find_by_token(session, open).await {
            Ok(found) => found,
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        },
    };

    if let Some((snap_ref, snap)) = snapshot {
        let tag = snap.other_config.get(TAG_TOKEN).map(String::as_str);
        if !snap.is_a_snapshot || tag != Some(open.token.as_str()) {
            report.left_alone.push(format!(
                "VM {}: journaled by run {} but its {TAG_TOKEN} tag is {:?}, not {}; left alone",
                snap.uuid, open.run_id, tag, open.token
            ));
        } else {
            match snapshot_vdis(session, &snap).await {
                Ok(found) => {
                    for (_, vdi) in found {
                        reached.insert(vdi.uuid.clone());
                        vdis.insert(vdi.uuid);
                    }
                }
                Err(e) => {
                    report
                        .errors
                        .push(format!("read the disks of snapshot {}: {e}", snap.uuid));
                    return report;
                }
            }
            // Journal them before the VM (and with it the VBDs) goes.
            for uuid in reached.iter().filter(|u| !open.vdis.contains(*u)) {
                let entry = Entry {
                    at: OffsetDateTime::now_utc(),
                    pool: open.pool.clone(),
                    run_id: open.run_id.clone(),
                    job: open.job.clone(),
                    token: open.token.clone(),
                    event: Event::VdiCreated { uuid: uuid.clone() },
                };
                if let Err(e) = journal.append_async(entry).await {
                    report.errors.push(e.to_string());
                    return report;
                }
            }
            match session.vm().destroy(&snap_ref).await {
                Ok(()) => report.destroyed_vms.push(snap.uuid.clone()),
                Err(e) if is_gone(&e) => {}
                Err(e) => {
                    report
                        .errors
                        .push(format!("destroy snapshot VM {}: {e}", snap.uuid));
                    return report;
                }
            }
        }
    }

    // 2. The VDIs.
    for uuid in &vdis {
        match destroy_vdi(session, uuid, &open.token, reached.contains(uuid)).await {
            Ok(VdiFate::Destroyed) => report.destroyed_vdis.push(uuid.clone()),
            Ok(VdiFate::Gone) => {}
            Ok(VdiFate::LeftAlone(why)) => report.left_alone.push(why),
            Err(e) => report.errors.push(e),
        }
    }

    // 3. The source VM's tags, if they are still ours.
    if let Ok(src) = session.vm().get_by_uuid(&open.source_vm).await
        && let Ok(rec) = session.vm().get_record(&src).await
        && rec.other_config.get(TAG_TOKEN) == Some(&open.token)
        && let Err(e) = untag_source(session, &src).await
    {
        report.errors.push(format!(
            "remove xenvault tags from VM {}: {e}",
            open.source_vm
        ));
    }

    if report.errors.is_empty() {
        let entry = Entry {
            at: OffsetDateTime::now_utc(),
            pool: open.pool.clone(),
            run_id: open.run_id.clone(),
            job: open.job.clone(),
            token: open.token.clone(),
            event: Event::Done,
        };
        match journal.append_async(entry).await {
            Ok(()) => report.closed += 1,
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    report
}

enum VdiFate {
    Destroyed,
    Gone,
    LeftAlone(String),
}

async fn destroy_vdi(
    session: &Session,
    uuid: &str,
    token: &str,
    reached_through_our_snapshot: bool,
) -> Result<VdiFate, String> {
    let vdi_ref = match session.vdi().get_by_uuid(uuid).await {
        Ok(r) => r,
        Err(e) if is_gone(&e) => return Ok(VdiFate::Gone),
        Err(e) => return Err(format!("find VDI {uuid}: {e}")),
    };
    let vdi = match session.vdi().get_record(&vdi_ref).await {
        Ok(v) => v,
        Err(e) if is_gone(&e) => return Ok(VdiFate::Gone),
        Err(e) => return Err(format!("read VDI {uuid}: {e}")),
    };
    let tag = vdi.other_config.get(TAG_TOKEN).map(String::as_str);
    let tag_ok = tag == Some(token) || (tag.is_none() && reached_through_our_snapshot);
    if !vdi.is_a_snapshot || !tag_ok {
        return Ok(VdiFate::LeftAlone(format!(
            "VDI {uuid}: journaled but not a snapshot VDI tagged {token} (tag {tag:?}); left alone"
        )));
    }
    let mut attempt = 0;
    loop {
        match session.vdi().destroy(&vdi_ref).await {
            Ok(()) => return Ok(VdiFate::Destroyed),
            Err(e) if is_gone(&e) => return Ok(VdiFate::Gone),
            Err(e) if e.is_code(&ErrorCode::VdiInUse) && attempt < VDI_IN_USE_RETRIES => {
                attempt += 1;
                tracing::info!("VDI {uuid} in use; retry {attempt} of {VDI_IN_USE_RETRIES}");
                tokio::time::sleep(VDI_IN_USE_DELAY).await;
            }
            Err(e) => return Err(format!("destroy VDI {uuid}: {e}")),
        }
    }
}

async fn find_by_token(
    session: &Session,
    open: &Outstanding,
) -> Result<Option<(VmRef, Vm)>, String> {
    let src = match session.vm().get_by_uuid(&open.source_vm).await {
        Ok(r) => r,
        // The source VM is gone: its snapshots may remain; look at all snapshots.
        Err(e) if is_gone(&e) => return find_among_all(session, open).await,
        Err(e) => return Err(format!("find VM {}: {e}", open.source_vm)),
    };
    let rec = match session.vm().get_record(&src).await {
        Ok(r) => r,
        Err(e) if is_gone(&e) => return find_among_all(session, open).await,
        Err(e) => return Err(format!("read VM {}: {e}", open.source_vm)),
    };
    for snap in &rec.snapshots {
        match session.vm().get_record(snap).await {
            Ok(s)
                if s.is_a_snapshot
                    && s.other_config.get(TAG_TOKEN) == Some(&open.token)
                    && near_intent(&s, open) =>
            {
                return Ok(Some((snap.clone(), s)));
            }
            Ok(_) => {}
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(format!("read a snapshot of VM {}: {e}", open.source_vm)),
        }
    }
    Ok(None)
}

/// A snapshot found by token only (its UUID was never journaled) must also
/// have been taken around the intent: a user's snapshot taken much later,
/// while a crashed run's tags were still on the source VM, inherits the
/// token but not the time. The window is wide (clock skew between xenvault's
/// host and the pool).
fn near_intent(snap: &Vm, open: &Outstanding) -> bool {
    let window = time::Duration::hours(1);
    let t = snap.snapshot_time.0;
    t >= open.at - window && t <= open.at + window
}

async fn find_among_all(
    session: &Session,
    open: &Outstanding,
) -> Result<Option<(VmRef, Vm)>, String> {
    let all = session
        .vm()
        .get_all_records()
        .await
        .map_err(|e| format!("list VMs: {e}"))?;
    Ok(all.into_iter().find(|(_, v)| {
        v.is_a_snapshot
            && v.other_config.get(TAG_TOKEN) == Some(&open.token)
            && near_intent(v, open)
    }))
}

/// Keeps the snapshot of `token` (an open token of this journal with a
/// recorded snapshot): tags the snapshot VM and its VDIs with
/// `role.tag() = <job>` (the other role's tag is removed), then appends
/// [`Event::Kept`]. Keeping an already kept token again changes its role,
/// target or restore point. A snapshot VM already destroyed (a base reduced
/// to metadata) is fine: its VDIs carry the tag.
pub async fn keep_snapshot(
    session: &Session,
    ctx: &RunContext,
    token: &str,
    role: KeepRole,
    target: &str,
    restore_point: Option<&str>,
) -> Result<KeptSnapshot, TempObjectError> {
    let state =
        ctx.journal
            .open_tokens()?
            .remove(token)
            .ok_or_else(|| TempObjectError::NotKeepable {
                token: token.to_string(),
                why: "the journal has no open snapshot operation with this token".into(),
            })?;
    let Some(snap_uuid) = state.open.snapshot.clone() else {
        return Err(TempObjectError::NotKeepable {
            token: token.to_string(),
            why: "its snapshot was never recorded".into(),
        });
    };
    let other = match role {
        KeepRole::Base => KeepRole::Resume,
        KeepRole::Resume => KeepRole::Base,
    };
    // The snapshot VM (gone when reduced to metadata).
    match session.vm().get_by_uuid(&snap_uuid).await {
        Ok(vm_ref) => {
            let rec = session
                .vm()
                .get_record(&vm_ref)
                .await
                .map_err(TempObjectError::xapi(format!("read snapshot {snap_uuid}")))?;
            if !rec.is_a_snapshot
                || rec.other_config.get(TAG_TOKEN).map(String::as_str) != Some(token)
            {
                return Err(TempObjectError::NotKeepable {
                    token: token.to_string(),
                    why: format!("VM {snap_uuid} is not a snapshot tagged with this token"),
                });
            }
            session
                .vm()
                .put_other_config(&vm_ref, role.tag(), &ctx.job)
                .await
                .map_err(TempObjectError::xapi(format!("tag snapshot {snap_uuid}")))?;
            session
                .vm()
                .remove_from_other_config(&vm_ref, other.tag())
                .await
                .map_err(TempObjectError::xapi(format!("untag snapshot {snap_uuid}")))?;
        }
        Err(e) if is_gone(&e) && state.metadata_only => {}
        Err(e) => {
            return Err(TempObjectError::Xapi {
                step: format!("find snapshot {snap_uuid}"),
                source: e,
            });
        }
    }
    for uuid in &state.open.vdis {
        let vdi_ref = match session.vdi().get_by_uuid(uuid).await {
            Ok(r) => r,
            // A VDI that is gone (destroyed by hand) is not kept; the caller
            // sees it missing when it uses the base.
            Err(e) if is_gone(&e) => continue,
            Err(e) => {
                return Err(TempObjectError::Xapi {
                    step: format!("find snapshot VDI {uuid}"),
                    source: e,
                });
            }
        };
        session
            .vdi()
            .put_other_config(&vdi_ref, role.tag(), &ctx.job)
            .await
            .map_err(TempObjectError::xapi(format!("tag snapshot VDI {uuid}")))?;
        session
            .vdi()
            .remove_from_other_config(&vdi_ref, other.tag())
            .await
            .map_err(TempObjectError::xapi(format!("untag snapshot VDI {uuid}")))?;
    }
    let entry = Entry {
        at: OffsetDateTime::now_utc(),
        pool: state.open.pool.clone(),
        run_id: ctx.run_id.clone(),
        job: state.open.job.clone(),
        token: token.to_string(),
        event: Event::Kept {
            role,
            target: target.to_string(),
            restore_point: restore_point.map(str::to_string),
        },
    };
    let kept_at = entry.at;
    ctx.journal.append_async(entry).await?;
    Ok(KeptSnapshot {
        token: state.open,
        role,
        target: target.to_string(),
        restore_point: restore_point.map(str::to_string),
        kept_at,
        metadata_only: state.metadata_only,
    })
}

/// Releases a kept snapshot: appends [`Event::Released`] (from then on the
/// token is outstanding, so a failed destroy is retried by the next sweep),
/// then destroys it by UUID and token tag ([`destroy_token`]).
pub async fn release_kept(
    session: &Session,
    journal: &Journal,
    kept: &KeptSnapshot,
) -> CleanupReport {
    let entry = Entry {
        at: OffsetDateTime::now_utc(),
        pool: kept.token.pool.clone(),
        run_id: kept.token.run_id.clone(),
        job: kept.token.job.clone(),
        token: kept.token.token.clone(),
        event: Event::Released,
    };
    if let Err(e) = journal.append_async(entry).await {
        return CleanupReport {
            errors: vec![e.to_string()],
            ..CleanupReport::default()
        };
    }
    destroy_token(session, journal, &kept.token).await
}

/// `base = "metadata"`: checks that every VDI of the kept snapshot carries
/// its token tag (nothing is changed otherwise), destroys the snapshot VM
/// (tag-checked), then reduces each VDI to CBT metadata with `VDI.data_destroy`
/// (retried on `VDI_IN_USE`: xapi waits only 4 s for VBDs, including the
/// dom0 VBDs of NBD connections, to go; docs/xapi-notes.md "CBT metadata
/// bases"), then appends [`Event::DataDestroyed`]. VDIs whose token tag does
/// not match are left alone and named in the error. Returns the VDIs reduced.
pub async fn reduce_to_metadata(
    session: &Session,
    journal: &Journal,
    kept: &KeptSnapshot,
) -> Result<Vec<String>, String> {
    let token = &kept.token.token;
    // 1. Every VDI must be ours before anything is changed.
    let mut vdis: Vec<(String, VdiRef, bool)> = Vec::new();
    for uuid in &kept.token.vdis {
        let vdi_ref = match session.vdi().get_by_uuid(uuid).await {
            Ok(r) => r,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(format!("find VDI {uuid}: {e}")),
        };
        let vdi = session
            .vdi()
            .get_record(&vdi_ref)
            .await
            .map_err(|e| format!("read VDI {uuid}: {e}"))?;
        if !vdi.is_a_snapshot || vdi.other_config.get(TAG_TOKEN) != Some(token) {
            return Err(format!(
                "VDI {uuid} is not a snapshot VDI tagged {token}; left alone"
            ));
        }
        vdis.push((uuid.clone(), vdi_ref, vdi.type_ == VdiType::CbtMetadata));
    }
    // 2. The snapshot VM (data_destroy needs its VBDs gone).
    if let Some(uuid) = &kept.token.snapshot {
        match session.vm().get_by_uuid(uuid).await {
            Ok(vm_ref) => {
                let rec = session
                    .vm()
                    .get_record(&vm_ref)
                    .await
                    .map_err(|e| format!("read snapshot {uuid}: {e}"))?;
                if !rec.is_a_snapshot || rec.other_config.get(TAG_TOKEN) != Some(token) {
                    return Err(format!(
                        "VM {uuid} is not a snapshot tagged {token}; left alone"
                    ));
                }
                match session.vm().destroy(&vm_ref).await {
                    Ok(()) => {}
                    Err(e) if is_gone(&e) => {}
                    Err(e) => return Err(format!("destroy snapshot VM {uuid}: {e}")),
                }
            }
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(format!("find snapshot {uuid}: {e}")),
        }
    }
    // 3. The VDIs.
    let mut reduced = Vec::new();
    for (uuid, vdi_ref, already) in vdis {
        if !already {
            let mut attempt = 0;
            loop {
                match session.vdi().data_destroy(&vdi_ref).await {
                    Ok(()) => break,
                    Err(e) if e.is_code(&ErrorCode::VdiInUse) && attempt < VDI_IN_USE_RETRIES => {
                        attempt += 1;
                        tracing::info!(
                            "VDI {uuid} in use; data_destroy retry {attempt} of {VDI_IN_USE_RETRIES}"
                        );
                        tokio::time::sleep(VDI_IN_USE_DELAY).await;
                    }
                    Err(e) => return Err(format!("VDI.data_destroy of {uuid}: {e}")),
                }
            }
        }
        reduced.push(uuid);
    }
    journal
        .append_async(Entry {
            at: OffsetDateTime::now_utc(),
            pool: kept.token.pool.clone(),
            run_id: kept.token.run_id.clone(),
            job: kept.token.job.clone(),
            token: token.clone(),
            event: Event::DataDestroyed,
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(reduced)
}

/// Cleans every open token of `pool` whose run is not alive (`own_run`
/// counts as not alive: the end-of-run sweep passes its own id), then
/// compacts the journal.
pub async fn sweep(
    session: &Session,
    journal: &Journal,
    pool: &str,
    own_run: Option<&str>,
) -> Result<CleanupReport, JournalError> {
    let mut report = CleanupReport::default();
    for open in journal.outstanding(Some(pool))? {
        if Some(open.run_id.as_str()) != own_run && journal.is_run_alive(&open.run_id) {
            report.skipped_live += 1;
            continue;
        }
        report.merge(destroy_token(session, journal, &open).await);
    }
    if let Err(e) = journal.compact() {
        report.errors.push(e.to_string());
    }
    Ok(report)
}

/// Snapshots on the pool tagged by xenvault for `job` whose token is not
/// open in the journal (e.g. the state directory was lost): reported, never
/// destroyed automatically (their run may live on another machine).
pub async fn tagged_orphans(
    session: &Session,
    journal: &Journal,
    job: &str,
) -> Result<Vec<(String, String)>, String> {
    // Kept tokens are open too: a kept base is not an orphan.
    let open: BTreeSet<String> = journal
        .open_tokens()
        .map_err(|e| e.to_string())?
        .into_keys()
        .collect();
    let all = session
        .vm()
        .get_all_records()
        .await
        .map_err(|e| format!("list VMs: {e}"))?;
    Ok(all
        .into_values()
        .filter(|v| v.is_a_snapshot)
        .filter(|v| v.other_config.get(TAG_JOB).map(String::as_str) == Some(job))
        .filter(|v| {
            v.other_config
                .get(TAG_TOKEN)
                .is_some_and(|t| !open.contains(t))
        })
        .map(|v| (v.uuid, v.name_label))
        .collect())
}

/// True when the file is not empty and its last byte is not a newline.
fn ends_without_newline(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ctx(dir: &Path, run: &str) -> RunContext {
        RunContext {
            journal: Journal::open(dir).unwrap(),
            pool: "p".into(),
            job: "j".into(),
            run_id: run.into(),
        }
    }

    #[test]
    fn intent_created_done_fold_and_compact() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), "r1");
        c.record(
            "t1",
            Event::Intent {
                source_vm: "vm1".into(),
            },
        )
        .unwrap();
        c.record("t1", Event::SnapshotCreated { uuid: "s1".into() })
            .unwrap();
        c.record("t1", Event::VdiCreated { uuid: "d1".into() })
            .unwrap();
        c.record(
            "t2",
            Event::Intent {
                source_vm: "vm2".into(),
            },
        )
        .unwrap();
        let open = c.journal.outstanding(Some("p")).unwrap();
        assert_eq!(open.len(), 2);
        let t1 = open.iter().find(|o| o.token == "t1").unwrap();
        assert_eq!(t1.snapshot.as_deref(), Some("s1"));
        assert!(t1.vdis.contains("d1"));
        assert!(c.journal.outstanding(Some("other")).unwrap().is_empty());

        c.record("t1", Event::Done).unwrap();
        c.journal.compact().unwrap();
        let text = std::fs::read_to_string(c.journal.path()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("\"t2\""));
        let open = c.journal.outstanding(None).unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].source_vm, "vm2");
    }

    #[test]
    fn torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), "r1");
        c.record(
            "t1",
            Event::Intent {
                source_vm: "vm1".into(),
            },
        )
        .unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(c.journal.path())
            .unwrap();
        f.write_all(b"{\"at\":\"2026-").unwrap();
        assert_eq!(c.journal.entries().unwrap().len(), 1);
        // The next entry is not glued to the torn line: it is read back, and
        // its token is outstanding.
        c.record(
            "t2",
            Event::Intent {
                source_vm: "vm2".into(),
            },
        )
        .unwrap();
        assert_eq!(c.journal.entries().unwrap().len(), 2);
        assert!(
            c.journal
                .outstanding(None)
                .unwrap()
                .iter()
                .any(|o| o.source_vm == "vm2")
        );
    }

    fn snapshot_of(c: &RunContext, token: &str, vm: &str, snap: &str, vdis: &[&str]) {
        c.record(
            token,
            Event::Intent {
                source_vm: vm.into(),
            },
        )
        .unwrap();
        c.record(token, Event::SnapshotCreated { uuid: snap.into() })
            .unwrap();
        for v in vdis {
            c.record(token, Event::VdiCreated { uuid: (*v).into() })
                .unwrap();
        }
    }

    fn kept_event(role: KeepRole, rp: Option<&str>) -> Event {
        Event::Kept {
            role,
            target: "repo".into(),
            restore_point: rp.map(str::to_string),
        }
    }

    #[test]
    fn kept_tokens_are_not_outstanding_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), "r1");
        snapshot_of(&c, "t1", "vm1", "s1", &["d1", "d2"]);
        snapshot_of(&c, "t2", "vm1", "s2", &["d3"]);
        assert_eq!(c.journal.outstanding(None).unwrap().len(), 2);

        c.record("t1", kept_event(KeepRole::Base, Some("20260101T000000Z")))
            .unwrap();
        let open = c.journal.outstanding(None).unwrap();
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(open[0].token, "t2");
        assert!(c.journal.is_kept("t1").unwrap());
        assert!(!c.journal.is_kept("t2").unwrap());
        let kept = c.journal.kept_for("p", "j", "vm1").unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].token.snapshot.as_deref(), Some("s1"));
        assert_eq!(kept[0].token.vdis.len(), 2);
        assert_eq!(kept[0].role, KeepRole::Base);
        assert_eq!(kept[0].restore_point.as_deref(), Some("20260101T000000Z"));
        assert!(!kept[0].metadata_only);
        assert!(
            c.journal
                .kept_for("p", "other-job", "vm1")
                .unwrap()
                .is_empty()
        );
        assert!(c.journal.kept_for("p", "j", "vm2").unwrap().is_empty());

        // Compaction keeps every line of a kept token.
        c.record("t2", Event::Done).unwrap();
        c.journal.compact().unwrap();
        let kept = c.journal.kept(None).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].token.vdis.len(), 2);

        c.record("t1", Event::DataDestroyed).unwrap();
        assert!(c.journal.kept(None).unwrap()[0].metadata_only);

        c.record("t1", Event::Released).unwrap();
        assert!(c.journal.kept(None).unwrap().is_empty());
        let open = c.journal.outstanding(None).unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].token, "t1");
        c.record("t1", Event::Done).unwrap();
        c.journal.compact().unwrap();
        assert!(c.journal.entries().unwrap().is_empty());
    }

    #[test]
    fn a_resume_hold_becomes_a_base_and_kept_are_sorted_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), "r1");
        snapshot_of(&c, "t1", "vm1", "s1", &["d1"]);
        snapshot_of(&c, "t2", "vm1", "s2", &["d2"]);
        c.record("t2", kept_event(KeepRole::Resume, None)).unwrap();
        c.record("t1", kept_event(KeepRole::Base, Some("a")))
            .unwrap();
        let kept = c.journal.kept(Some("p")).unwrap();
        assert_eq!(
            kept.iter()
                .map(|k| k.token.token.as_str())
                .collect::<Vec<_>>(),
            vec!["t2", "t1"]
        );
        c.record("t2", kept_event(KeepRole::Base, Some("b")))
            .unwrap();
        let kept = c.journal.kept(Some("p")).unwrap();
        assert_eq!(kept.len(), 2);
        let t2 = kept.iter().find(|k| k.token.token == "t2").unwrap();
        assert_eq!(t2.role, KeepRole::Base);
        assert_eq!(t2.restore_point.as_deref(), Some("b"));
        assert_eq!(kept.last().unwrap().token.token, "t2");
    }

    #[test]
    fn kept_lines_are_json_and_older_lines_still_read() {
        let e = Entry {
            at: OffsetDateTime::UNIX_EPOCH,
            pool: "p".into(),
            run_id: "r".into(),
            job: "j".into(),
            token: "t".into(),
            event: kept_event(KeepRole::Resume, None),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains("\"event\":\"kept\""), "{s}");
        assert!(s.contains("\"role\":\"resume\""), "{s}");
        assert!(!s.contains("restore_point"), "{s}");
        assert_eq!(serde_json::from_str::<Entry>(&s).unwrap(), e);
        let released = r#"{"at":"2026-01-01T00:00:00Z","pool":"p","run_id":"r","job":"j","token":"t","event":"released"}"#;
        assert_eq!(
            serde_json::from_str::<Entry>(released).unwrap().event,
            Event::Released
        );
    }

    #[test]
    fn a_second_run_of_a_job_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let first = j.lock_job("nightly", "r1").unwrap();
        let err = j.lock_job("nightly", "r2").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, JournalError::JobBusy { .. }), "{text}");
        assert!(
            text.contains("job nightly is already running (run r1, pid "),
            "{text}"
        );
        // Another job runs meanwhile; the job is free again after the first run.
        let other = j.lock_job("weekly", "r3").unwrap();
        drop(first);
        let again = j.lock_job("nightly", "r4").unwrap();
        drop((other, again));
    }

    #[test]
    fn run_lock_marks_a_run_alive() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(!j.is_run_alive("r1"));
        let lock = j.begin_run("r1").unwrap();
        assert!(j.is_run_alive("r1"));
        drop(lock);
        assert!(!j.is_run_alive("r1"));
    }

    #[test]
    fn entry_lines_are_json() {
        let e = Entry {
            at: OffsetDateTime::UNIX_EPOCH,
            pool: "p".into(),
            run_id: "r".into(),
            job: "j".into(),
            token: "t".into(),
            event: Event::SnapshotCreated { uuid: "u".into() },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains("\"event\":\"snapshot-created\""), "{s}");
        assert_eq!(serde_json::from_str::<Entry>(&s).unwrap(), e);
    }
}
