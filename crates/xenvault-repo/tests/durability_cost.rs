//! The cost of making chunks durable on the local backend, without the CPU work
//! of a backup: N objects of 600 KiB written with `put_if_absent` (one data
//! sync and one directory sync each, 12 at once, as the writer did before ADR
//! 0008) against `stage` + one `publish`. A measurement, not a check: run with
//! `cargo test -p xenvault-repo --test durability_cost -- --ignored --nocapture`
//! (`DURABILITY_DIR` = where to write, default the system temporary directory).

#![allow(clippy::unwrap_used)] // a measurement; panics are fine

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt as _;
use xenvault_repo::storage::{LocalStorage, Storage};

const OBJECTS: usize = 300;
const SIZE: usize = 600 * 1024;
const IN_FLIGHT: usize = 12;

fn object(i: usize) -> Bytes {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(SIZE);
    while v.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

async fn write_all(s: Arc<LocalStorage>, staged: bool) -> f64 {
    let data: Vec<Bytes> = (0..OBJECTS).map(object).collect();
    let start = Instant::now();
    futures::stream::iter(data.into_iter().enumerate())
        .map(|(i, d)| {
            let s = s.clone();
            async move {
                let key = format!("chunks/{:02x}/{i:08x}", i % 256);
                if staged {
                    s.stage(&key, d).await.unwrap();
                } else {
                    s.put_if_absent(&key, d).await.unwrap();
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    s.publish().await.unwrap();
    start.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it by name with --ignored --nocapture"]
async fn durability_cost_put_if_absent_against_stage_and_publish() {
    let base = std::env::var("DURABILITY_DIR")
        .unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    let mb = (OBJECTS * SIZE) as f64 / 1e6;
    for round in 0..3 {
        for staged in [false, true] {
            let dir = tempfile::tempdir_in(&base).unwrap();
            let s = Arc::new(LocalStorage::new(dir.path()).unwrap());
            let secs = write_all(s.clone(), staged).await;
            assert_eq!(s.list("chunks/").await.unwrap().len(), OBJECTS);
            eprintln!(
                "round {round}: {:<22} {OBJECTS} x {} KiB: {secs:.3} s = {:.0} MB/s",
                if staged {
                    "stage + publish"
                } else {
                    "put_if_absent"
                },
                SIZE / 1024,
                mb / secs
            );
        }
    }
}
