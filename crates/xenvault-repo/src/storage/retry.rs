//! The retry decorator: repeats transient failures with exponential backoff.
//!
//! Only `Transient` errors are retried. A retried `put_if_absent` whose first
//! attempt did land reports `AlreadyExists`; the repository treats that as
//! success for content-addressed objects (chunks); so does a retried `stage`.
//! `stage`, `publish` and `remove_stale_temporaries` are forwarded (not left to
//! the trait's defaults), so a batching backend keeps batching behind retries.

use std::time::Duration;

use bytes::Bytes;

use super::{BoxFuture, ObjectMeta, Storage, StorageError, StorageErrorKind};

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total (1 = no retry).
    pub max_attempts: u32,
    /// Delay before the first retry; doubled each time.
    pub initial_delay: Duration,
    /// Upper bound of one delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based), with up to 25% jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .initial_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_delay);
        let mut r = [0u8; 1];
        let jitter = if aws_lc_rs::rand::fill(&mut r).is_ok() {
            base / 4 * u32::from(r[0]) / 255
        } else {
            Duration::ZERO
        };
        base + jitter
    }
}

/// A [`Storage`] that retries the transient failures of the one it wraps.
#[derive(Debug, Clone)]
pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S: Storage> Retrying<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Retrying { inner, policy }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn run<'a, T, F>(&'a self, mut op: F) -> Result<T, StorageError>
    where
        F: FnMut() -> BoxFuture<'a, Result<T, StorageError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e)
                    if e.kind == StorageErrorKind::Transient
                        && attempt < self.policy.max_attempts =>
                {
                    let delay = self.policy.delay(attempt);
                    tracing::warn!(op = e.op, key = %e.key, attempt, ?delay, error = %e.message,
                        "transient storage error, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(mut e) if e.kind == StorageErrorKind::Transient => {
                    e.message = format!("{} (gave up after {attempt} attempts)", e.message);
                    return Err(e);
                }
                other => return other,
            }
        }
    }
}

impl<S: Storage> Storage for Retrying<S> {
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.run(move || self.inner.put_if_absent(key, data.clone())))
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.run(move || self.inner.put(key, data.clone())))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes, StorageError>> {
        Box::pin(self.run(move || self.inner.get(key)))
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StorageError>> {
        Box::pin(self.run(move || self.inner.get_range(key, offset, len)))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, StorageError>> {
        Box::pin(self.run(move || self.inner.list(prefix)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.run(move || self.inner.delete(key)))
    }

    fn stat<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta, StorageError>> {
        Box::pin(self.run(move || self.inner.stat(key)))
    }

    fn stage<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.run(move || self.inner.stage(key, data.clone())))
    }

    /// Retried as a whole: publishing what is already published does nothing.
    fn publish(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(self.run(move || self.inner.publish()))
    }

    fn remove_stale_temporaries(
        &self,
        older_than: std::time::SystemTime,
    ) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(self.run(move || self.inner.remove_stale_temporaries(older_than)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Fault, MemoryStorage};

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn delays_double_up_to_the_cap_with_at_most_a_quarter_of_jitter() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(1),
        };
        for (attempt, base_ms) in [(1, 200), (2, 400), (3, 800), (4, 1000), (9, 1000)] {
            let base = Duration::from_millis(base_ms);
            for _ in 0..50 {
                let d = p.delay(attempt);
                assert!(
                    d >= base && d <= base + base / 4,
                    "retry {attempt}: {d:?} outside {base:?} + 25%"
                );
            }
        }
        // Jitter spreads retries: 50 draws are not all the same.
        let draws: std::collections::BTreeSet<Duration> = (0..50).map(|_| p.delay(2)).collect();
        assert!(draws.len() > 1, "no jitter");
        // Huge attempt numbers neither overflow nor pass the cap.
        assert!(p.delay(u32::MAX) <= Duration::from_millis(1250));
    }

    #[tokio::test]
    async fn transient_errors_are_retried() {
        let mem = MemoryStorage::new();
        let s = Retrying::new(mem.clone(), fast());
        mem.inject(Fault::Transient(3));
        s.put("k", Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(mem.operations(), 4);
        assert_eq!(&s.get("k").await.unwrap()[..], b"v");
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts_and_never_retries_permanent() {
        let mem = MemoryStorage::new();
        let s = Retrying::new(mem.clone(), fast());
        mem.inject(Fault::Transient(10));
        let e = s.get("k").await.unwrap_err();
        assert_eq!(e.kind, StorageErrorKind::Transient);
        assert!(e.message.contains("gave up after 4 attempts"), "{e}");
        assert_eq!(mem.operations(), 4);

        let mem = MemoryStorage::new();
        let s = Retrying::new(mem.clone(), fast());
        mem.inject(Fault::Permanent(1));
        let e = s.get("k").await.unwrap_err();
        assert_eq!(e.kind, StorageErrorKind::Permanent);
        assert_eq!(mem.operations(), 1);
        // Not found is an answer, not a failure: no retry either.
        assert!(s.get("k").await.unwrap_err().is_not_found());
        assert_eq!(mem.operations(), 2);
    }
}
