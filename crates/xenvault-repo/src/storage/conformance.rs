//! The backend conformance suite: checks that a [`Storage`] keeps every promise of the trait.
//!
//! Every backend's tests run [`run_conformance`] (memory and local here, S3 and
//! SFTP against real servers in `tests/backend_*.rs`). The suite works under a
//! fresh random prefix, so it can run on a store that holds other objects, and
//! deletes what it wrote. It returns the first broken promise as an error
//! naming the check, the key and what was expected.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{Storage, StorageError, StorageErrorKind};

/// What the suite may expect of the backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConformanceOptions {
    /// `put_if_absent` is atomic: of several racing writers of one key exactly
    /// one succeeds. `false` only for a documented non-atomic fallback (S3
    /// stat-then-put): then racing writers must still each succeed or see
    /// `AlreadyExists`, and the object must hold one writer's bytes whole.
    pub atomic_put_if_absent: bool,
    /// Size of the large object written and read back (large enough to take
    /// a backend's multipart or chunked path when the caller wants it).
    pub large_object: usize,
    /// Writers in the `put_if_absent` race.
    pub racers: usize,
    /// `stat` of a key that only prefixes other keys (`chunks`) answers
    /// `NotFound`. `false` only for test servers that keep objects as files
    /// and fail such a request (s3s-fs answers 500).
    pub stat_of_prefix_is_not_found: bool,
}

impl Default for ConformanceOptions {
    fn default() -> Self {
        ConformanceOptions {
            atomic_put_if_absent: true,
            large_object: 3 << 20,
            racers: 8,
            stat_of_prefix_is_not_found: true,
        }
    }
}

/// A broken promise: which check, and what went wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage conformance check '{check}' failed: {detail}")]
pub struct ConformanceFailure {
    /// The check's name.
    pub check: &'static str,
    /// What was expected and what happened.
    pub detail: String,
}

fn fail<T>(check: &'static str, detail: impl Into<String>) -> Result<T, ConformanceFailure> {
    Err(ConformanceFailure {
        check,
        detail: detail.into(),
    })
}

fn ok<T>(check: &'static str, r: Result<T, StorageError>) -> Result<T, ConformanceFailure> {
    r.or_else(|e| fail(check, format!("unexpected error: {e}")))
}

fn expect_kind<T: std::fmt::Debug>(
    check: &'static str,
    r: Result<T, StorageError>,
    kind: StorageErrorKind,
) -> Result<(), ConformanceFailure> {
    match r {
        Err(e) if e.kind == kind => Ok(()),
        Err(e) => fail(check, format!("expected {kind:?}, got error {e}")),
        Ok(v) => fail(check, format!("expected {kind:?}, got success {v:?}")),
    }
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

async fn keys(
    s: &dyn Storage,
    check: &'static str,
    prefix: &str,
) -> Result<Vec<String>, ConformanceFailure> {
    let mut k: Vec<String> = ok(check, s.list(prefix).await)?
        .into_iter()
        .map(|m| m.key)
        .collect();
    k.sort();
    Ok(k)
}

/// Runs every check on `storage` (see the module documentation).
pub async fn run_conformance(
    storage: Arc<dyn Storage>,
    opts: ConformanceOptions,
) -> Result<(), ConformanceFailure> {
    let s = storage.as_ref();
    let mut rnd = [0u8; 6];
    let _ = aws_lc_rs::rand::fill(&mut rnd);
    let base = format!("conformance-{}", hex::encode(rnd));
    let k = |rest: &str| format!("{base}/{rest}");
    let before = SystemTime::now() - Duration::from_secs(3600);

    // Missing objects.
    let missing = k("missing/object");
    expect_kind(
        "get missing",
        s.get(&missing).await,
        StorageErrorKind::NotFound,
    )?;
    expect_kind(
        "get_range missing",
        s.get_range(&missing, 0, 10).await,
        StorageErrorKind::NotFound,
    )?;
    expect_kind(
        "stat missing",
        s.stat(&missing).await,
        StorageErrorKind::NotFound,
    )?;
    ok("delete missing", s.delete(&missing).await)?;
    if !keys(s, "list missing prefix", &k("missing/"))
        .await?
        .is_empty()
    {
        return fail(
            "list missing prefix",
            "objects listed under an unused prefix",
        );
    }

    // put_if_absent, get, stat.
    let obj = k("chunks/ab/ab01-x_y.z");
    let data = pattern(100_000, 1);
    ok(
        "put_if_absent new",
        s.put_if_absent(&obj, data.clone()).await,
    )?;
    if ok("get", s.get(&obj).await)? != data {
        return fail("get", format!("{obj}: bytes differ from those written"));
    }
    let meta = ok("stat", s.stat(&obj).await)?;
    if meta.size != data.len() as u64 || meta.key != obj {
        return fail("stat", format!("{obj}: got {meta:?}, size {}", data.len()));
    }
    if meta.modified < before {
        return fail(
            "stat",
            format!("{obj}: modification time {:?} is not recent", meta.modified),
        );
    }
    expect_kind(
        "put_if_absent existing",
        s.put_if_absent(&obj, pattern(10, 2)).await,
        StorageErrorKind::AlreadyExists,
    )?;
    if ok("get after refused put_if_absent", s.get(&obj).await)? != data {
        return fail(
            "put_if_absent existing",
            format!("{obj}: a refused put_if_absent changed the object"),
        );
    }

    // Ranges.
    let ranges: [(u64, u64, std::ops::Range<usize>); 6] = [
        (0, 10, 0..10),
        (12_345, 1000, 12_345..13_345),
        (99_990, 100, 99_990..100_000),
        (100_000, 10, 100_000..100_000),
        (250_000, 10, 100_000..100_000),
        (5, 0, 5..5),
    ];
    for (off, len, want) in ranges {
        let got = ok("get_range", s.get_range(&obj, off, len).await)?;
        if got != data.slice(want.clone()) {
            return fail(
                "get_range",
                format!(
                    "{obj} [{off}, +{len}): got {} bytes, want bytes {want:?}",
                    got.len()
                ),
            );
        }
    }
    let whole = ok("get_range whole", s.get_range(&obj, 0, u64::MAX).await)?;
    if whole != data {
        return fail(
            "get_range whole",
            format!("{obj}: [0, +max) is not the object"),
        );
    }

    // An empty object.
    let empty = k("empty");
    ok(
        "put_if_absent empty",
        s.put_if_absent(&empty, Bytes::new()).await,
    )?;
    if !ok("get empty", s.get(&empty).await)?.is_empty()
        || ok("stat empty", s.stat(&empty).await)?.size != 0
    {
        return fail("empty object", format!("{empty}: not empty when read back"));
    }

    // put replaces; put creates.
    let lock = k("locks/writer-1");
    ok("put new", s.put(&lock, pattern(40, 3)).await)?;
    ok("put replace", s.put(&lock, pattern(7, 4)).await)?;
    if ok("get replaced", s.get(&lock).await)? != pattern(7, 4) {
        return fail("put replace", format!("{lock}: old bytes after put"));
    }

    // A large object.
    let large = k("indexes/large");
    let big = pattern(opts.large_object, 5);
    ok(
        "put_if_absent large",
        s.put_if_absent(&large, big.clone()).await,
    )?;
    if ok("get large", s.get(&large).await)? != big {
        return fail("large object", format!("{large}: bytes differ"));
    }
    let mid = (opts.large_object / 2) as u64;
    let got = ok("get_range large", s.get_range(&large, mid, 70_000).await)?;
    let end = (mid as usize + 70_000).min(big.len());
    if got != big.slice(mid as usize..end) {
        return fail("large object", format!("{large}: range at {mid} differs"));
    }
    expect_kind(
        "put_if_absent existing large",
        s.put_if_absent(&large, big.clone()).await,
        StorageErrorKind::AlreadyExists,
    )?;

    // Listing is by key prefix, not by directory, and skips nothing.
    for name in ["chunks/ab/ab02", "chunks/cd/cd01", "idx/x", "idxfoo"] {
        ok(
            "put for list",
            s.put_if_absent(&k(name), pattern(3, 6)).await,
        )?;
    }
    let all = keys(s, "list all", &format!("{base}/")).await?;
    let want_all: Vec<String> = [
        "chunks/ab/ab01-x_y.z",
        "chunks/ab/ab02",
        "chunks/cd/cd01",
        "empty",
        "idx/x",
        "idxfoo",
        "indexes/large",
        "locks/writer-1",
    ]
    .iter()
    .map(|n| k(n))
    .collect();
    if all != want_all {
        return fail("list all", format!("got {all:?}, want {want_all:?}"));
    }
    for (prefix, want) in [
        ("chunks/", 3usize),
        ("chunks/a", 2),
        ("chunks/ab/", 2),
        ("chunks/ab/ab0", 2),
        ("chunks/ab/ab01", 1),
        ("idx", 2),
        ("idx/", 1),
        ("chunks/zz/", 0),
    ] {
        let got = keys(s, "list prefix", &k(prefix)).await?;
        if got.len() != want || !got.iter().all(|g| g.starts_with(&k(prefix))) {
            return fail(
                "list prefix",
                format!("prefix {}: got {got:?}, want {want} keys", k(prefix)),
            );
        }
    }
    let listed = ok("list sizes", s.list(&k("indexes/")).await)?;
    if listed.len() != 1 || listed[0].size != big.len() as u64 || listed[0].modified < before {
        return fail("list sizes", format!("{listed:?}: size or time wrong"));
    }
    let root = keys(s, "list root", "").await?;
    if !want_all.iter().all(|w| root.contains(w)) {
        return fail("list root", "list(\"\") misses objects");
    }

    // Delete.
    ok("delete", s.delete(&k("idxfoo")).await)?;
    expect_kind(
        "get deleted",
        s.get(&k("idxfoo")).await,
        StorageErrorKind::NotFound,
    )?;
    expect_kind(
        "stat deleted",
        s.stat(&k("idxfoo")).await,
        StorageErrorKind::NotFound,
    )?;
    ok("delete deleted again", s.delete(&k("idxfoo")).await)?;
    if keys(s, "list after delete", &k("idx")).await? != vec![k("idx/x")] {
        return fail("list after delete", "a deleted object is still listed");
    }
    // A key that is a "directory" of other keys is no object.
    if opts.stat_of_prefix_is_not_found {
        expect_kind(
            "stat of a prefix",
            s.stat(&k("chunks")).await,
            StorageErrorKind::NotFound,
        )?;
    }

    // Staged objects (chunks): visible with their bytes once published;
    // staging an existing or already staged key says `AlreadyExists`.
    let staged = k("staged/ab/ab01");
    let staged_data = pattern(70_000, 7);
    ok("stage new", s.stage(&staged, staged_data.clone()).await)?;
    expect_kind(
        "stage staged again",
        s.stage(&staged, staged_data.clone()).await,
        StorageErrorKind::AlreadyExists,
    )?;
    let many_staged: Vec<_> = (0..16)
        .map(|i| {
            let st = storage.clone();
            let key = k(&format!("staged/many/{i:02}"));
            tokio::spawn(async move { st.stage(&key, pattern(2000, 200 + i)).await })
        })
        .collect();
    for r in futures::future::join_all(many_staged).await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return fail("concurrent stage", format!("{e}")),
            Err(e) => return fail("concurrent stage", format!("a stager panicked: {e}")),
        }
    }
    ok("publish", s.publish().await)?;
    if ok("get published", s.get(&staged).await)? != staged_data {
        return fail(
            "publish",
            format!("{staged}: bytes differ from those staged"),
        );
    }
    let meta = ok("stat published", s.stat(&staged).await)?;
    if meta.size != staged_data.len() as u64 || meta.modified < before {
        return fail("publish", format!("{staged}: got {meta:?}"));
    }
    let published = keys(s, "list published", &k("staged/many/")).await?;
    if published.len() != 16 {
        return fail(
            "publish",
            format!(
                "{} of 16 concurrently staged objects listed",
                published.len()
            ),
        );
    }
    for (i, key) in published.iter().enumerate() {
        if ok("get published", s.get(key).await)? != pattern(2000, 200 + i as u64) {
            return fail("publish", format!("{key}: bytes differ from those staged"));
        }
    }
    expect_kind(
        "stage existing",
        s.stage(&obj, pattern(10, 2)).await,
        StorageErrorKind::AlreadyExists,
    )?;
    ok("publish nothing new", s.publish().await)?;
    if ok("get after refused stage", s.get(&obj).await)? != data {
        return fail(
            "stage existing",
            format!("{obj}: a refused stage changed the object"),
        );
    }

    // Racing put_if_absent writers of one key.
    let raced = k("race/object");
    let racers: Vec<_> = (0..opts.racers)
        .map(|i| {
            let st = storage.clone();
            let key = raced.clone();
            let body = pattern(50_000 + i, 100 + i as u64);
            tokio::spawn(async move { st.put_if_absent(&key, body).await })
        })
        .collect();
    let mut winners = 0;
    for r in futures::future::join_all(racers).await {
        match r {
            Ok(Ok(())) => winners += 1,
            Ok(Err(e)) if e.is_already_exists() => {}
            Ok(Err(e)) => return fail("put_if_absent race", format!("a racer failed: {e}")),
            Err(e) => return fail("put_if_absent race", format!("a racer panicked: {e}")),
        }
    }
    let stored = ok("get raced", s.get(&raced).await)?;
    let whole_of = (0..opts.racers).find(|&i| stored == pattern(50_000 + i, 100 + i as u64));
    if whole_of.is_none() {
        return fail(
            "put_if_absent race",
            "the stored object is no racer's bytes whole",
        );
    }
    if opts.atomic_put_if_absent && winners != 1 {
        return fail(
            "put_if_absent race",
            format!(
                "{winners} of {} racers succeeded; exactly one must",
                opts.racers
            ),
        );
    }
    if winners == 0 {
        return fail("put_if_absent race", "no racer succeeded");
    }

    // Many writers of distinct keys at once.
    let many: Vec<_> = (0..16)
        .map(|i| {
            let st = storage.clone();
            let key = k(&format!("many/{i:02}"));
            tokio::spawn(async move { st.put_if_absent(&key, pattern(1000, i)).await })
        })
        .collect();
    for r in futures::future::join_all(many).await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return fail("concurrent writers", format!("{e}")),
            Err(e) => return fail("concurrent writers", format!("a writer panicked: {e}")),
        }
    }
    if keys(s, "concurrent writers", &k("many/")).await?.len() != 16 {
        return fail("concurrent writers", "not every object is listed");
    }

    // Clean up, and nothing is left.
    for key in keys(s, "cleanup", &format!("{base}/")).await? {
        ok("cleanup", s.delete(&key).await)?;
    }
    let left = keys(s, "cleanup", &format!("{base}/")).await?;
    if !left.is_empty() {
        return fail("cleanup", format!("still listed after delete: {left:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{LocalStorage, MemoryStorage, RetryPolicy, Retrying};

    #[tokio::test]
    async fn memory_conforms() {
        run_conformance(
            Arc::new(MemoryStorage::new()),
            ConformanceOptions::default(),
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn local_conforms_also_behind_retrying() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStorage::new(dir.path()).unwrap();
        run_conformance(Arc::new(local.clone()), ConformanceOptions::default())
            .await
            .unwrap();
        let retrying = Retrying::new(local, RetryPolicy::default());
        run_conformance(Arc::new(retrying), ConformanceOptions::default())
            .await
            .unwrap();
    }

    /// The suite itself catches a backend that overwrites in `put_if_absent`.
    #[tokio::test]
    async fn a_broken_backend_fails_the_suite() {
        struct Overwriting(MemoryStorage);
        impl Storage for Overwriting {
            fn put_if_absent<'a>(
                &'a self,
                key: &'a str,
                data: Bytes,
            ) -> super::super::BoxFuture<'a, Result<(), StorageError>> {
                self.0.put(key, data)
            }
            fn put<'a>(
                &'a self,
                key: &'a str,
                data: Bytes,
            ) -> super::super::BoxFuture<'a, Result<(), StorageError>> {
                self.0.put(key, data)
            }
            fn get<'a>(
                &'a self,
                key: &'a str,
            ) -> super::super::BoxFuture<'a, Result<Bytes, StorageError>> {
                self.0.get(key)
            }
            fn get_range<'a>(
                &'a self,
                key: &'a str,
                offset: u64,
                len: u64,
            ) -> super::super::BoxFuture<'a, Result<Bytes, StorageError>> {
                self.0.get_range(key, offset, len)
            }
            fn list<'a>(
                &'a self,
                prefix: &'a str,
            ) -> super::super::BoxFuture<'a, Result<Vec<super::super::ObjectMeta>, StorageError>>
            {
                self.0.list(prefix)
            }
            fn delete<'a>(
                &'a self,
                key: &'a str,
            ) -> super::super::BoxFuture<'a, Result<(), StorageError>> {
                self.0.delete(key)
            }
            fn stat<'a>(
                &'a self,
                key: &'a str,
            ) -> super::super::BoxFuture<'a, Result<super::super::ObjectMeta, StorageError>>
            {
                self.0.stat(key)
            }
        }
        let e = run_conformance(
            Arc::new(Overwriting(MemoryStorage::new())),
            ConformanceOptions::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.check, "put_if_absent existing", "{e}");
    }
}
