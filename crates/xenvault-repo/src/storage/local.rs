//! The local-directory backend: one file per object, written atomically.
//!
//! A write goes to a temporary file `.tmp-<random>` in the object's directory,
//! is fsynced, then moved into place: `put` renames over the old object,
//! `put_if_absent` hard-links (which fails atomically when the name exists) and
//! removes the temporary name. The directory is fsynced afterwards so the new
//! name survives a power cut. Names starting with `.` are never listed.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{
    BoxFuture, ObjectMeta, Storage, StorageError, StorageErrorKind, validate_key, validate_prefix,
};

/// A repository kept in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Uses `root` (created when missing) as the repository directory.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        fs::create_dir_all(&root)
            .map_err(|e| StorageError::from_io("open", &root.display().to_string(), &e))?;
        Ok(LocalStorage { root })
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
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

/// Writes `data` to a fresh temporary file in `dir`, fsynced; returns its path.
fn write_temp(dir: &Path, data: &[u8]) -> std::io::Result<PathBuf> {
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
    // fdatasync: the data and the metadata needed to read it back (the size of
    // this new file) are made durable; only timestamps may lag.
    let res = f.write_all(data).and_then(|_| f.sync_data());
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn put_blocking(path: &Path, data: &[u8], overwrite: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = write_temp(dir, data)?;
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
}
