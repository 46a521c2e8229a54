//! The in-memory backend: a map of keys to bytes, with fault injection for tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;

use super::{
    BoxFuture, ObjectMeta, Storage, StorageError, StorageErrorKind, validate_key, validate_prefix,
};

/// A fault to inject into the next operations of a [`MemoryStorage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next `n` operations fail with a transient error.
    Transient(u32),
    /// The next `n` operations fail with a permanent error.
    Permanent(u32),
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, (Bytes, SystemTime)>,
    fault: Option<Fault>,
    ops: u64,
    /// Delay of every `get` (a remote store's latency).
    get_latency: std::time::Duration,
    gets_in_flight: u64,
    most_gets_in_flight: u64,
}

/// Objects kept in memory; cheap to clone (clones share the objects).
#[derive(Clone, Default)]
pub struct MemoryStorage {
    state: Arc<Mutex<State>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next operations fail (see [`Fault`]).
    pub fn inject(&self, fault: Fault) {
        self.lock().fault = Some(fault);
    }

    /// Number of operations served so far (including failed ones).
    pub fn operations(&self) -> u64 {
        self.lock().ops
    }

    /// Replaces the stored bytes of `key` with `f(bytes)` (for damage tests).
    pub fn tamper(&self, key: &str, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut st = self.lock();
        match st.objects.get_mut(key) {
            Some((data, _)) => {
                let mut v = data.to_vec();
                f(&mut v);
                *data = Bytes::from(v);
                true
            }
            None => false,
        }
    }

    /// Sets the modification time of `key` (for grace-period tests).
    pub fn set_modified(&self, key: &str, when: SystemTime) -> bool {
        match self.lock().objects.get_mut(key) {
            Some(entry) => {
                entry.1 = when;
                true
            }
            None => false,
        }
    }

    /// Makes every `get` take `latency` (as a remote store would), so that
    /// a reader's parallelism shows in [`Self::take_most_gets_in_flight`].
    pub fn set_get_latency(&self, latency: std::time::Duration) {
        self.lock().get_latency = latency;
    }

    /// The most `get`s that were in progress at once since the last call;
    /// counting starts again from those in progress now.
    pub fn take_most_gets_in_flight(&self) -> u64 {
        let mut st = self.lock();
        let most = st.most_gets_in_flight;
        st.most_gets_in_flight = st.gets_in_flight;
        most
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.lock().objects.keys().cloned().collect()
    }

    fn begin(&self, op: &'static str, key: &str) -> Result<MutexGuard<'_, State>, StorageError> {
        let mut st = self.lock();
        st.ops += 1;
        let (kind, left) = match st.fault {
            Some(Fault::Transient(n)) => (StorageErrorKind::Transient, n),
            Some(Fault::Permanent(n)) => (StorageErrorKind::Permanent, n),
            None => return Ok(st),
        };
        st.fault = match (left.saturating_sub(1), kind) {
            (0, _) => None,
            (n, StorageErrorKind::Transient) => Some(Fault::Transient(n)),
            (n, _) => Some(Fault::Permanent(n)),
        };
        if left == 0 {
            return Ok(st);
        }
        Err(StorageError::new(kind, op, key, "injected fault"))
    }
}

/// One `get` in progress (counted until dropped, even when cancelled).
struct GetInFlight<'a>(&'a MemoryStorage);

impl<'a> GetInFlight<'a> {
    /// Counts one more `get` in flight; returns it with the store's latency.
    fn enter(store: &'a MemoryStorage) -> (Self, std::time::Duration) {
        let mut st = store.lock();
        st.gets_in_flight += 1;
        st.most_gets_in_flight = st.most_gets_in_flight.max(st.gets_in_flight);
        (GetInFlight(store), st.get_latency)
    }
}

impl Drop for GetInFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().gets_in_flight -= 1;
    }
}

impl Storage for MemoryStorage {
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("put_if_absent", key)?;
            let mut st = self.begin("put_if_absent", key)?;
            if st.objects.contains_key(key) {
                return Err(StorageError::new(
                    StorageErrorKind::AlreadyExists,
                    "put_if_absent",
                    key,
                    "object already exists",
                ));
            }
            st.objects
                .insert(key.to_string(), (data, SystemTime::now()));
            Ok(())
        })
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("put", key)?;
            let mut st = self.begin("put", key)?;
            st.objects
                .insert(key.to_string(), (data, SystemTime::now()));
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes, StorageError>> {
        Box::pin(async move {
            validate_key("get", key)?;
            let (_in_flight, latency) = GetInFlight::enter(self);
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let st = self.begin("get", key)?;
            st.objects
                .get(key)
                .map(|(d, _)| d.clone())
                .ok_or_else(|| StorageError::not_found("get", key))
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
            let st = self.begin("get_range", key)?;
            let (data, _) = st
                .objects
                .get(key)
                .ok_or_else(|| StorageError::not_found("get_range", key))?;
            let size = data.len() as u64;
            let start = offset.min(size) as usize;
            let end = offset.saturating_add(len).min(size) as usize;
            Ok(data.slice(start..end))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, StorageError>> {
        Box::pin(async move {
            validate_prefix(prefix)?;
            let st = self.begin("list", prefix)?;
            Ok(st
                .objects
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, (d, t))| ObjectMeta {
                    key: k.clone(),
                    size: d.len() as u64,
                    modified: *t,
                })
                .collect())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            validate_key("delete", key)?;
            let mut st = self.begin("delete", key)?;
            st.objects.remove(key);
            Ok(())
        })
    }

    fn stat<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(async move {
            validate_key("stat", key)?;
            let st = self.begin("stat", key)?;
            st.objects
                .get(key)
                .map(|(d, t)| ObjectMeta {
                    key: key.to_string(),
                    size: d.len() as u64,
                    modified: *t,
                })
                .ok_or_else(|| StorageError::not_found("stat", key))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_semantics() {
        let s = MemoryStorage::new();
        s.put_if_absent("a/b", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let e = s
            .put_if_absent("a/b", Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(e.is_already_exists());
        assert_eq!(&s.get("a/b").await.unwrap()[..], b"hello");
        assert_eq!(&s.get_range("a/b", 1, 3).await.unwrap()[..], b"ell");
        assert_eq!(&s.get_range("a/b", 4, 10).await.unwrap()[..], b"o");
        s.put("a/b", Bytes::from_static(b"bye")).await.unwrap();
        assert_eq!(s.stat("a/b").await.unwrap().size, 3);
        s.put("a/c", Bytes::new()).await.unwrap();
        s.put("ab", Bytes::new()).await.unwrap();
        assert_eq!(s.list("a/").await.unwrap().len(), 2);
        s.delete("a/b").await.unwrap();
        s.delete("a/b").await.unwrap();
        assert!(s.get("a/b").await.unwrap_err().is_not_found());
        assert!(s.stat("a/b").await.unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn faults_are_injected_then_cleared() {
        let s = MemoryStorage::new();
        s.inject(Fault::Transient(2));
        for _ in 0..2 {
            let e = s.put("k", Bytes::new()).await.unwrap_err();
            assert_eq!(e.kind, StorageErrorKind::Transient);
        }
        s.put("k", Bytes::new()).await.unwrap();
    }
}
