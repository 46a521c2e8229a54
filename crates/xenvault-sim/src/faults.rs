//! Fault injection and counters: the state the control interface (`/_sim/`)
//! sets and the RPC layer, the data handlers and the NBD server honour.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::error::ApiError;

/// Fail the `nth` call (1-based, counted from when the fault was set) of
/// `method` with `error`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CallFault {
    /// `Class.method` (without `Async.`; also matches the async form).
    pub method: String,
    /// Which call fails (1 = the next one).
    pub nth: u64,
    /// `[code, params…]`.
    pub error: Vec<String>,
    /// How many calls of the method were seen since the fault was set.
    #[serde(default)]
    pub seen: u64,
    /// Whether it fired already.
    #[serde(default)]
    pub fired: bool,
}

/// A fault on a data stream (a handler such as `export`, `import`,
/// `export_raw_vdi`, `import_raw_vdi`, `xmldbdump`, `host_backup`, or `nbd`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamFault {
    /// Cut the stream (close the connection) after this many body bytes.
    pub cut_after: Option<u64>,
    /// Throttle the stream to this many bytes per second.
    pub bytes_per_sec: Option<u64>,
    /// Apply to this many streams, then forget it (`None` = until reset).
    #[serde(default)]
    pub times: Option<u64>,
}

#[derive(Debug, Default)]
struct FaultState {
    calls: Vec<CallFault>,
    streams: BTreeMap<String, StreamFault>,
    sr_full: bool,
}

/// All injected faults.
#[derive(Debug, Default)]
pub struct Faults {
    inner: Mutex<FaultState>,
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a call fault.
    pub fn add_call_fault(&self, method: &str, nth: u64, error: Vec<String>) {
        self.lock().calls.push(CallFault {
            method: method.to_string(),
            nth: nth.max(1),
            error,
            seen: 0,
            fired: false,
        });
    }

    /// Counts a call of `method` and returns the error to fail it with, if a
    /// fault says so.
    pub fn on_call(&self, method: &str) -> Option<ApiError> {
        let mut st = self.lock();
        let mut out = None;
        for f in st
            .calls
            .iter_mut()
            .filter(|f| !f.fired && f.method == method)
        {
            f.seen += 1;
            if f.seen == f.nth && out.is_none() {
                f.fired = true;
                out = Some(ApiError::from_description(&f.error));
            }
        }
        out
    }

    /// Sets the fault of a stream kind.
    pub fn set_stream_fault(&self, handler: &str, fault: StreamFault) {
        self.lock().streams.insert(handler.to_string(), fault);
    }

    /// True when a stream fault is set for `handler` (without using it up).
    pub fn has_stream(&self, handler: &str) -> bool {
        self.lock().streams.contains_key(handler)
    }

    /// The fault to apply to a stream that starts now (consumes one use of a
    /// fault with `times`). Handlers call it once per stream: `pool.faults.stream("export")`.
    pub fn stream(&self, handler: &str) -> StreamFault {
        let mut st = self.lock();
        let Some(f) = st.streams.get_mut(handler) else {
            return StreamFault::default();
        };
        let out = f.clone();
        if let Some(t) = f.times.as_mut() {
            *t = t.saturating_sub(1);
            if *t == 0 {
                st.streams.remove(handler);
            }
        }
        out
    }

    /// Makes every SR report itself full (`SR_FULL` on snapshot/create).
    pub fn set_sr_full(&self, on: bool) {
        self.lock().sr_full = on;
    }

    /// Whether SRs are forced full.
    pub fn sr_full(&self) -> bool {
        self.lock().sr_full
    }

    /// Clears every fault.
    pub fn reset(&self) {
        *self.lock() = FaultState::default();
    }

    /// The faults, for `GET /_sim/faults`.
    pub fn to_json(&self) -> serde_json::Value {
        let st = self.lock();
        serde_json::json!({
            "calls": st.calls,
            "streams": st.streams,
            "sr_full": st.sr_full,
        })
    }
}

/// Counters: `group/name → n`, e.g. `calls/VM.snapshot`, `bytes/export`,
/// `nbd/bytes_read`.
#[derive(Debug, Default)]
pub struct Stats {
    counters: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    /// Adds `n` to a counter (`group/name`).
    pub fn add(&self, key: &str, n: u64) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry(key.to_string()).or_default() += n;
    }

    /// Counts one more `key` open (an NBD connection, say) until the guard
    /// drops: `key` is how many are open now, `key_max` the most open at once
    /// since the last reset.
    pub fn open(&self, key: &str) -> OpenGuard<'_> {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let now = {
            let open = c.entry(key.to_string()).or_default();
            *open += 1;
            *open
        };
        let max = c.entry(format!("{key}_max")).or_default();
        *max = (*max).max(now);
        OpenGuard {
            stats: self,
            key: key.to_string(),
        }
    }

    /// A counter's value.
    pub fn get(&self, key: &str) -> u64 {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.get(key).copied().unwrap_or(0)
    }

    /// The counters grouped by the part before `/`:
    /// `{"calls": {"VM.snapshot": 2}, "bytes": {"export": 123}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut groups: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (k, v) in c.iter() {
            let (g, n) = k.split_once('/').unwrap_or(("other", k));
            groups
                .entry(g.to_string())
                .or_default()
                .insert(n.to_string(), *v);
        }
        serde_json::to_value(groups).unwrap_or_default()
    }

    /// Zeroes every counter. What is open stays counted (its guard will
    /// close it), and the most open at once starts again from it.
    pub fn reset(&self) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        // Gauges ([`Stats::open`]) are the counters with a `_max` companion.
        let open: Vec<(String, u64)> = c
            .iter()
            .filter(|(k, v)| **v > 0 && c.contains_key(&format!("{k}_max")))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        c.clear();
        for (k, v) in open {
            c.insert(format!("{k}_max"), v);
            c.insert(k, v);
        }
    }
}

/// One thing counted open by [`Stats::open`]; dropping it closes it.
#[derive(Debug)]
pub struct OpenGuard<'a> {
    stats: &'a Stats,
    key: String,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        let mut c = self
            .stats
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(open) = c.get_mut(&self.key) {
            *open = open.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_counts_now_and_the_most_at_once() {
        let s = Stats::default();
        let a = s.open("nbd/open");
        let b = s.open("nbd/open");
        drop(a);
        let c = s.open("nbd/open");
        assert_eq!((s.get("nbd/open"), s.get("nbd/open_max")), (2, 2));
        drop((b, c));
        assert_eq!((s.get("nbd/open"), s.get("nbd/open_max")), (0, 2));
        // A reset while open keeps counting what is open.
        let d = s.open("nbd/open");
        s.reset();
        assert_eq!((s.get("nbd/open"), s.get("nbd/open_max")), (1, 1));
        let e = s.open("nbd/open");
        drop(d);
        assert_eq!((s.get("nbd/open"), s.get("nbd/open_max")), (1, 2));
        drop(e);
        assert_eq!(s.get("nbd/open"), 0);
        s.reset();
        assert_eq!(s.get("nbd/open_max"), 0);
    }

    #[test]
    fn nth_call_fails_once() {
        let f = Faults::default();
        f.add_call_fault(
            "VM.snapshot",
            2,
            vec!["SR_FULL".into(), "1".into(), "2".into()],
        );
        assert!(f.on_call("VM.snapshot").is_none());
        assert_eq!(f.on_call("VM.snapshot").unwrap().code, "SR_FULL");
        assert!(f.on_call("VM.snapshot").is_none());
    }

    #[test]
    fn stream_fault_with_times_expires() {
        let f = Faults::default();
        f.set_stream_fault(
            "export",
            StreamFault {
                cut_after: Some(10),
                bytes_per_sec: None,
                times: Some(1),
            },
        );
        assert_eq!(f.stream("export").cut_after, Some(10));
        assert_eq!(f.stream("export"), StreamFault::default());
    }
}
