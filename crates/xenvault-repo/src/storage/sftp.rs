//! The SFTP backend: a repository kept in a directory of an SSH server.
//!
//! Logs in with a private key only (no passwords), checks the server against a
//! `known_hosts` file strictly (an unknown or changed host key is refused), and
//! talks SFTP v3 with OpenSSH's extensions over the system `ssh` client's
//! multiplexed connection (crates `openssh` and `openssh-sftp-client`, the ones
//! OpenDAL's sftp service wraps; ADR 0006 says why they are used directly).
//!
//! Writes are atomic as on the local backend: the bytes go to a temporary file
//! `.tmp-<pid>-<random>` beside the object, are fsynced (`fsync@openssh.com`),
//! then `put_if_absent` hard-links it to the final name (`hardlink@openssh.com`,
//! which fails when the name exists) and `put` renames it over the old object
//! (`posix-rename@openssh.com`). Names starting with `.` are never listed.
//! A server without the hard-link extension gets stat-then-rename (not atomic;
//! logged once).
//! Temporaries left by interrupted uploads are removed by a prune sweep once
//! older than its grace period (`remove_stale_temporaries`, ADR 0008). Chunks
//! are not staged here (the trait's default: `stage` is `put_if_absent`).

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use openssh::{KnownHosts, SessionBuilder};
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::{Error as SftpError, Sftp, SftpOptions as ClientOptions};
use tokio::io::AsyncSeek;
use tokio::sync::Mutex;

use super::{
    BoxFuture, ObjectMeta, Storage, StorageError, StorageErrorKind, validate_key, validate_prefix,
};

/// Where and how to reach an SFTP repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpOptions {
    /// The login name (`""`: ssh's default, the local user or `~/.ssh/config`'s).
    pub user: String,
    /// The server's host name or address.
    pub host: String,
    /// The SSH port.
    pub port: u16,
    /// The repository directory: absolute (`/srv/backup/repo`), or relative to
    /// the login directory (`backup/repo`). Created when missing.
    pub dir: String,
    /// The private key to log in with.
    pub key_file: PathBuf,
    /// The `known_hosts` file holding the server's key; `None` for ssh's own
    /// (`~/.ssh/known_hosts` and `/etc/ssh/ssh_known_hosts`).
    pub known_hosts_file: Option<PathBuf>,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

impl SftpOptions {
    /// Options with the defaults (port 22, 10 s connect timeout).
    pub fn new(user: &str, host: &str, dir: &str, key_file: impl Into<PathBuf>) -> SftpOptions {
        SftpOptions {
            user: user.to_string(),
            host: host.to_string(),
            port: 22,
            dir: dir.to_string(),
            key_file: key_file.into(),
            known_hosts_file: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// One SSH connection with its SFTP session.
struct Conn {
    sftp: Sftp,
    /// Directories known to exist (relative paths as sent to the server).
    dirs: std::sync::Mutex<HashSet<String>>,
}

/// A repository on an SFTP server (see the module documentation).
pub struct SftpStorage {
    opts: SftpOptions,
    /// `dir` without trailing `/` (`""` for the login directory).
    root: String,
    conn: Mutex<Option<Arc<Conn>>>,
    warned_no_hardlink: AtomicBool,
}

impl fmt::Debug for SftpStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SftpStorage")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(t.trim());
        }
        cur = c.source();
    }
    s
}

fn random_suffix() -> String {
    let mut rnd = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut rnd).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        rnd = (nanos as u64).to_le_bytes();
    }
    format!("{}-{}", std::process::id(), hex::encode(rnd))
}

fn is_no_such_file(e: &SftpError) -> bool {
    matches!(e, SftpError::SftpError(SftpErrorKind::NoSuchFile, _))
}

impl SftpStorage {
    /// Prepares the backend. Does not connect: the first operation does.
    pub fn new(opts: SftpOptions) -> Result<SftpStorage, StorageError> {
        let place = format!(
            "sftp://{}@{}:{}/{}",
            opts.user, opts.host, opts.port, opts.dir
        );
        let bad = |msg: String| StorageError::new(StorageErrorKind::Permanent, "open", &place, msg);
        if opts.host.is_empty() || opts.user.is_empty() {
            return Err(bad(
                "a user and a host are needed: sftp://USER@HOST:PORT/DIR".into(),
            ));
        }
        if !opts.key_file.is_file() {
            return Err(bad(format!(
                "private key {} is not a readable file: set key-file in [targets.NAME.sftp]",
                opts.key_file.display()
            )));
        }
        if let Some(kh) = &opts.known_hosts_file
            && !kh.is_file()
        {
            return Err(bad(format!(
                "known_hosts file {} does not exist: create it with the server's key \
                 (ssh-keyscan -p {} {} > FILE, then check the fingerprint)",
                kh.display(),
                opts.port,
                opts.host
            )));
        }
        let root = opts.dir.trim_end_matches('/').to_string();
        let root = if root.is_empty() && opts.dir.starts_with('/') {
            "/".to_string()
        } else {
            root
        };
        Ok(SftpStorage {
            opts,
            root,
            conn: Mutex::new(None),
            warned_no_hardlink: AtomicBool::new(false),
        })
    }

    /// The options this backend was built with.
    pub fn options(&self) -> &SftpOptions {
        &self.opts
    }

    fn server(&self) -> String {
        if self.opts.user.is_empty() {
            format!("{}:{}", self.opts.host, self.opts.port)
        } else {
            format!("{}@{}:{}", self.opts.user, self.opts.host, self.opts.port)
        }
    }

    /// The server path of `key`.
    fn path(&self, key: &str) -> String {
        match self.root.as_str() {
            "" => key.to_string(),
            "/" => format!("/{key}"),
            r => format!("{r}/{key}"),
        }
    }

    /// The live connection, opening one when there is none.
    async fn conn(&self, op: &'static str, key: &str) -> Result<Arc<Conn>, StorageError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = Arc::new(self.connect(op, key).await?);
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Forgets `c` after a connection-level failure so the next attempt reconnects.
    async fn reset(&self, c: &Arc<Conn>) {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, c)) {
            *guard = None;
        }
    }

    async fn connect(&self, op: &'static str, key: &str) -> Result<Conn, StorageError> {
        let mut b = SessionBuilder::default();
        if !self.opts.user.is_empty() {
            b.user(self.opts.user.clone());
        }
        b.port(self.opts.port)
            .keyfile(&self.opts.key_file)
            .known_hosts_check(KnownHosts::Strict)
            .connect_timeout(self.opts.connect_timeout)
            .server_alive_interval(Duration::from_secs(30))
            // The control socket goes to the temporary directory, not the cwd.
            .control_directory(std::env::temp_dir());
        if let Some(kh) = &self.opts.known_hosts_file {
            b.user_known_hosts_file(kh);
        }
        let session = b
            .connect(&self.opts.host)
            .await
            .map_err(|e| self.connect_error(op, key, &chain(&e)))?;
        let sftp = Sftp::from_session(session, ClientOptions::default())
            .await
            .map_err(|e| {
                StorageError::new(
                    StorageErrorKind::Transient,
                    op,
                    key,
                    format!(
                        "{}: cannot start the SFTP subsystem ({}): check that the server \
                         offers 'Subsystem sftp'",
                        self.server(),
                        chain(&e)
                    ),
                )
            })?;
        let conn = Conn {
            sftp,
            dirs: std::sync::Mutex::new(HashSet::new()),
        };
        if !matches!(self.root.as_str(), "" | "/") {
            self.mkdirs(&conn, &self.root.clone())
                .await
                .map_err(|e| self.error(op, key, &e))?;
        }
        tracing::debug!(server = %self.server(), dir = %self.root, "SFTP connection open");
        Ok(conn)
    }

    /// A failed login, with the fix for the usual causes.
    fn connect_error(&self, op: &'static str, key: &str, text: &str) -> StorageError {
        let server = self.server();
        let (kind, hint) = if text.contains("Host key verification failed")
            || text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || text.contains("No ED25519 host key is known")
            || text.contains("host key for")
        {
            let file = self
                .opts
                .known_hosts_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "~/.ssh/known_hosts".to_string());
            (
                StorageErrorKind::Permanent,
                format!(
                    "the server's host key is not the one in {file}: add it \
                     (ssh-keyscan -p {} {} >> {file}, after checking its fingerprint)",
                    self.opts.port, self.opts.host
                ),
            )
        } else if text.contains("Permission denied") {
            (
                StorageErrorKind::Permanent,
                format!(
                    "the server refused key {} for user {}: add its public key to that \
                     user's ~/.ssh/authorized_keys on the server",
                    self.opts.key_file.display(),
                    if self.opts.user.is_empty() {
                        "(ssh's default)"
                    } else {
                        &self.opts.user
                    }
                ),
            )
        } else if text.contains("Could not resolve hostname") {
            (
                StorageErrorKind::Permanent,
                format!("unknown host {}: correct the url", self.opts.host),
            )
        } else {
            (
                StorageErrorKind::Transient,
                format!(
                    "cannot reach {}:{}: check the host, the port and that sshd runs",
                    self.opts.host, self.opts.port
                ),
            )
        };
        StorageError::new(kind, op, key, format!("{server}: {hint} ({})", text.trim()))
    }

    /// Maps an SFTP error to a storage error.
    fn error(&self, op: &'static str, key: &str, e: &SftpError) -> StorageError {
        let path = self.path(key);
        let (kind, hint) = match e {
            SftpError::SftpError(SftpErrorKind::NoSuchFile, _) => {
                (StorageErrorKind::NotFound, String::new())
            }
            SftpError::SftpError(SftpErrorKind::PermDenied, _) => (
                StorageErrorKind::Permanent,
                "permission denied: the repository directory must be writable by the \
                 login user"
                    .to_string(),
            ),
            SftpError::SftpError(..) | SftpError::UnsupportedExtension(_) => {
                (StorageErrorKind::Permanent, String::new())
            }
            // The connection broke or the server misbehaved: a new connection may work.
            _ => (
                StorageErrorKind::Transient,
                "the SFTP connection failed".to_string(),
            ),
        };
        let text = chain(e);
        let message = if hint.is_empty() {
            format!("{}:{path}: {text}", self.server())
        } else {
            format!("{}:{path}: {hint} ({text})", self.server())
        };
        StorageError::new(kind, op, key, message)
    }

    /// Runs `f` on the connection; a transient failure drops the connection.
    async fn with_conn<T>(
        &self,
        op: &'static str,
        key: &str,
        f: impl AsyncFnOnce(&Conn) -> Result<T, SftpError>,
    ) -> Result<T, StorageError> {
        let c = self.conn(op, key).await?;
        match f(&c).await {
            Ok(v) => Ok(v),
            Err(e) => {
                let err = self.error(op, key, &e);
                if err.kind == StorageErrorKind::Transient {
                    self.reset(&c).await;
                }
                Err(err)
            }
        }
    }

    /// Creates `dir` and its parents (those not known to exist).
    async fn mkdirs(&self, c: &Conn, dir: &str) -> Result<(), SftpError> {
        if dir.is_empty() || dir == "/" || c.dirs.lock().is_ok_and(|d| d.contains(dir)) {
            return Ok(());
        }
        let mut fs = c.sftp.fs();
        // Walk up to the deepest existing ancestor, then create downwards.
        let mut missing = Vec::new();
        let mut cur = dir.to_string();
        loop {
            match fs.metadata(&cur).await {
                Ok(_) => break,
                Err(e) if is_no_such_file(&e) => {
                    missing.push(cur.clone());
                    match cur.rsplit_once('/') {
                        Some((parent, _)) if !parent.is_empty() => cur = parent.to_string(),
                        _ => break,
                    }
                }
                Err(e) => return Err(e),
            }
        }
        for d in missing.iter().rev() {
            if let Err(e) = fs.create_dir(d).await {
                // Another writer may have created it meanwhile.
                match fs.metadata(d).await {
                    Ok(md) if md.file_type().is_some_and(|t| t.is_dir()) => {}
                    _ => return Err(e),
                }
            }
        }
        if let Ok(mut known) = c.dirs.lock() {
            known.insert(dir.to_string());
        }
        Ok(())
    }

    /// Writes `data` to a new, fsynced temporary file beside `path`; returns its path.
    async fn write_temp(&self, c: &Conn, path: &str, data: &[u8]) -> Result<String, SftpError> {
        let dir = match path.rsplit_once('/') {
            Some((d, _)) => d,
            None => "",
        };
        self.mkdirs(c, dir).await?;
        let tmp = if dir.is_empty() {
            format!(".tmp-{}", random_suffix())
        } else {
            format!("{dir}/.tmp-{}", random_suffix())
        };
        let mut f = c
            .sftp
            .options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await?;
        let written = async {
            f.write_all(data).await?;
            if c.sftp.support_fsync() {
                f.sync_all().await?;
            }
            f.close().await
        }
        .await;
        if let Err(e) = written {
            let _ = c.sftp.fs().remove_file(&tmp).await;
            return Err(e);
        }
        Ok(tmp)
    }

    /// Reads up to `len` bytes of `path` from `offset`.
    async fn read_range(c: &Conn, path: &str, offset: u64, len: u64) -> Result<Bytes, SftpError> {
        let mut f = c.sftp.open(path).await?;
        let size = f.metadata().await?.len().unwrap_or(0);
        let start = offset.min(size);
        let want = len.min(size - start);
        let mut out = BytesMut::with_capacity(want as usize);
        let mut pos = start;
        while (out.len() as u64) < want {
            // Position explicitly each time: the client advances its offset by
            // the length asked for, not the length received.
            Pin::new(&mut f).start_seek(std::io::SeekFrom::Start(pos))?;
            let ask = (want - out.len() as u64).min(u64::from(u32::MAX)) as u32;
            match f.read(ask, BytesMut::new()).await? {
                Some(b) if !b.is_empty() => {
                    pos += b.len() as u64;
                    out.extend_from_slice(&b);
                }
                _ => break,
            }
        }
        let _ = f.close().await;
        Ok(out.freeze())
    }

    /// Lists the files under `dir` (a server path) whose key starts with `prefix`.
    async fn walk(&self, c: &Conn, prefix: &str) -> Result<Vec<ObjectMeta>, SftpError> {
        let start = match prefix.rfind('/') {
            Some(i) => prefix[..i].to_string(),
            None => String::new(),
        };
        let mut out = Vec::new();
        let mut stack = vec![start];
        let mut fs = c.sftp.fs();
        while let Some(rel) = stack.pop() {
            let server_dir = if rel.is_empty() {
                if self.root.is_empty() {
                    ".".to_string()
                } else {
                    self.root.clone()
                }
            } else {
                self.path(&rel)
            };
            let dir = match fs.open_dir(&server_dir).await {
                Ok(d) => d,
                Err(e) if is_no_such_file(&e) => continue,
                Err(e) => return Err(e),
            };
            let mut entries = std::pin::pin!(dir.read_dir());
            while let Some(entry) = entries.next().await {
                let entry = entry?;
                let Some(name) = entry.filename().to_str() else {
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                let key = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                let md = entry.metadata();
                match md.file_type() {
                    Some(t) if t.is_dir() => {
                        let as_dir = format!("{key}/");
                        if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                            stack.push(key);
                        }
                    }
                    Some(t) if t.is_file() && key.starts_with(prefix) => out.push(ObjectMeta {
                        key,
                        size: md.len().unwrap_or(0),
                        modified: md
                            .modified()
                            .map(|t| t.as_system_time())
                            .unwrap_or(SystemTime::UNIX_EPOCH),
                    }),
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Removes the `.tmp-*` files (of interrupted writes) under the root last
    /// modified before `older_than`; returns how many.
    async fn remove_temps(&self, c: &Conn, older_than: SystemTime) -> Result<u64, SftpError> {
        let mut removed = 0;
        let mut stack = vec![String::new()];
        let mut fs = c.sftp.fs();
        while let Some(rel) = stack.pop() {
            let server_dir = if rel.is_empty() {
                if self.root.is_empty() {
                    ".".to_string()
                } else {
                    self.root.clone()
                }
            } else {
                self.path(&rel)
            };
            let dir = match fs.open_dir(&server_dir).await {
                Ok(d) => d,
                Err(e) if is_no_such_file(&e) => continue,
                Err(e) => return Err(e),
            };
            let mut stale = Vec::new();
            let mut entries = std::pin::pin!(dir.read_dir());
            while let Some(entry) = entries.next().await {
                let entry = entry?;
                let Some(name) = entry.filename().to_str() else {
                    continue;
                };
                let key = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                let md = entry.metadata();
                match md.file_type() {
                    Some(t) if t.is_dir() && !name.starts_with('.') => stack.push(key),
                    Some(t) if t.is_file() && name.starts_with(".tmp-") => {
                        let modified = md
                            .modified()
                            .map(|t| t.as_system_time())
                            .unwrap_or(SystemTime::UNIX_EPOCH);
                        if modified < older_than {
                            stale.push(key);
                        }
                    }
                    _ => {}
                }
            }
            for key in stale {
                match fs.remove_file(self.path(&key)).await {
                    Ok(()) => removed += 1,
                    Err(e) if is_no_such_file(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }

    async fn exists(c: &Conn, path: &str) -> Result<bool, SftpError> {
        match c.sftp.fs().metadata(path).await {
            Ok(_) => Ok(true),
            Err(e) if is_no_such_file(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// What `put_if_absent` found.
enum Placed {
    Done,
    Exists,
}

impl Storage for SftpStorage {
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            const OP: &str = "put_if_absent";
            validate_key(OP, key)?;
            let path = self.path(key);
            let placed = self
                .with_conn(OP, key, async |c: &Conn| {
                    let tmp = self.write_temp(c, &path, &data).await?;
                    let mut fs = c.sftp.fs();
                    let res = if c.sftp.support_hardlink() {
                        // link(2) on the server: fails when the name exists.
                        match fs.hard_link(&tmp, &path).await {
                            Ok(()) => Ok(Placed::Done),
                            Err(e) => match Self::exists(c, &path).await {
                                Ok(true) => Ok(Placed::Exists),
                                _ => Err(e),
                            },
                        }
                    } else {
                        if !self.warned_no_hardlink.swap(true, Ordering::Relaxed) {
                            tracing::warn!(server = %self.server(),
                                "SFTP server lacks hardlink@openssh.com: put-if-absent \
                                 falls back to stat-then-rename (not atomic)");
                        }
                        match Self::exists(c, &path).await {
                            Ok(true) => Ok(Placed::Exists),
                            Ok(false) => fs.rename(&tmp, &path).await.map(|()| Placed::Done),
                            Err(e) => Err(e),
                        }
                    };
                    let _ = fs.remove_file(&tmp).await;
                    res
                })
                .await?;
            match placed {
                Placed::Done => Ok(()),
                Placed::Exists => Err(StorageError::new(
                    StorageErrorKind::AlreadyExists,
                    OP,
                    key,
                    format!("{}:{path}: object already exists", self.server()),
                )),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("put", key)?;
            let path = self.path(key);
            self.with_conn("put", key, async |c: &Conn| {
                let tmp = self.write_temp(c, &path, &data).await?;
                let mut fs = c.sftp.fs();
                // posix-rename@openssh.com (used when offered) replaces atomically;
                // plain SFTP rename refuses an existing target: remove it first.
                let mut res = fs.rename(&tmp, &path).await;
                if res.is_err() && !c.sftp.support_posix_rename() {
                    let _ = fs.remove_file(&path).await;
                    res = fs.rename(&tmp, &path).await;
                }
                if res.is_err() {
                    let _ = fs.remove_file(&tmp).await;
                }
                res
            })
            .await
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes, StorageError>> {
        Box::pin(async move {
            validate_key("get", key)?;
            let path = self.path(key);
            self.with_conn("get", key, async |c: &Conn| {
                Self::read_range(c, &path, 0, u64::MAX).await
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
            self.with_conn("get_range", key, async |c: &Conn| {
                Self::read_range(c, &path, offset, len).await
            })
            .await
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, StorageError>> {
        Box::pin(async move {
            validate_prefix(prefix)?;
            self.with_conn("list", prefix, async |c: &Conn| self.walk(c, prefix).await)
                .await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("delete", key)?;
            let path = self.path(key);
            self.with_conn("delete", key, async |c: &Conn| {
                match c.sftp.fs().remove_file(&path).await {
                    Err(e) if is_no_such_file(&e) => Ok(()),
                    other => other,
                }
            })
            .await
        })
    }

    fn remove_stale_temporaries(
        &self,
        older_than: SystemTime,
    ) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(async move {
            self.with_conn("remove_stale_temporaries", "", async |c: &Conn| {
                self.remove_temps(c, older_than).await
            })
            .await
        })
    }

    fn stat<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            validate_key("stat", key)?;
            let path = self.path(key);
            let md = self
                .with_conn("stat", key, async |c: &Conn| {
                    c.sftp.fs().metadata(&path).await
                })
                .await?;
            if !md.file_type().is_some_and(|t| t.is_file()) {
                return Err(StorageError::not_found("stat", key));
            }
            Ok(ObjectMeta {
                key: key.to_string(),
                size: md.len().unwrap_or(0),
                modified: md
                    .modified()
                    .map(|t| t.as_system_time())
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            })
        })
    }
}
