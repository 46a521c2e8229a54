//! Chunk write/read throughput of the repository for 256 KiB to 4 MiB chunks,
//! plain and encrypted, on the memory backend (CPU only) and the local backend
//! (fsync per object). Not a test: run it to choose the default chunk size.
//!
//! `cargo bench -p xenvault-repo --bench chunk_throughput [-- MiB]`
//! (default corpus 192 MiB: half files from /usr, a quarter random, a quarter zeros).
//! Prints a Markdown table; ADR 0005 records the numbers and the choice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use xenvault_repo::storage::{LocalStorage, MemoryStorage, Storage};
use xenvault_repo::{CipherKind, EncryptionInit, InitOptions, KdfParams, Repository, WriteOptions};
use xenvault_types::{Extent, ExtentData};

const MIB: usize = 1 << 20;

/// Bytes of real files under /usr (compressible, like used VM blocks), then random, then zeros.
fn corpus(total: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(total);
    let want_files = total / 2;
    let mut stack = vec![std::path::PathBuf::from("/usr/lib"), "/usr/share".into()];
    while out.len() < want_files {
        let Some(dir) = stack.pop() else { break };
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && let Ok(b) = std::fs::read(e.path())
            {
                let n = b.len().min(want_files - out.len());
                out.extend_from_slice(&b[..n]);
                if out.len() >= want_files {
                    break;
                }
            }
        }
    }
    let mut x: u64 = 0x9E3779B97F4A7C15;
    while out.len() < total * 3 / 4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.resize(total, 0);
    out
}

struct Row {
    backend: &'static str,
    chunk_kib: u32,
    mode: &'static str,
    write: Duration,
    read: Duration,
    stored: u64,
    incr: Duration,
    incr_stored: u64,
    incr_chunks: u64,
}

/// Marks 1% of the 64 KiB blocks of `data` (uniformly random, seeded) as changed;
/// returns the changed copy and the changed block numbers in order.
fn guest_writes(data: &[u8]) -> (Vec<u8>, Vec<usize>) {
    const BLOCK: usize = 64 * 1024;
    let blocks = data.len() / BLOCK;
    let mut picked = std::collections::BTreeSet::new();
    let mut x: u64 = 0x2545F4914F6CDD1D;
    while picked.len() < blocks / 100 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        picked.insert((x % blocks as u64) as usize);
    }
    let mut new = data.to_vec();
    for &b in &picked {
        for (k, byte) in new[b * BLOCK..(b + 1) * BLOCK].iter_mut().enumerate() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(k as u64 | 1);
            *byte = (x >> 56) as u8;
        }
    }
    (new, picked.into_iter().collect())
}

/// The writer's options: the defaults, or `BENCH_IN_FLIGHT=N` chunks in flight.
fn write_options() -> WriteOptions {
    let mut o = WriteOptions::default();
    if let Some(n) = std::env::var("BENCH_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.max_in_flight = n;
    }
    o
}

async fn run_one(
    storage: Arc<dyn Storage>,
    chunk: u32,
    cipher: Option<CipherKind>,
    data: &[u8],
) -> [u64; 6] {
    let repo = Repository::init(
        storage,
        InitOptions {
            chunk_size: chunk,
            zstd_level: 1,
            encryption: cipher.map(|c| EncryptionInit {
                password: b"bench".to_vec(),
                label: "bench".into(),
                cipher: c,
                kdf: KdfParams::insecure_for_tests(),
            }),
        },
    )
    .await
    .expect("init");
    let t = time::OffsetDateTime::now_utc();
    let start = Instant::now();
    let rp = repo
        .begin_restore_point("bench-vm", "bench", t, None, write_options())
        .await
        .expect("begin");
    let mut w = rp
        .full_disk("xvda", data.len() as u64, json!(null))
        .expect("disk");
    // Feed 2 MiB extents, as an NBD reader would (not chunk-sized on purpose for 4 MiB).
    for (i, piece) in data.chunks(2 * MIB).enumerate() {
        w.write_extent(Extent::data((i * 2 * MIB) as u64, piece.to_vec()))
            .await
            .expect("write");
    }
    let entry = w.finish().await.expect("finish");
    let m = rp
        .commit(json!({}), json!({}), json!({}))
        .await
        .expect("commit");
    let write = start.elapsed();
    let start = Instant::now();
    let mut r = repo.read_disk(&m, "xvda", 4).await.expect("read");
    let mut n = 0u64;
    while let Some(e) = r.next_extent().await {
        let e = e.expect("extent");
        n += match e.data {
            ExtentData::Data(d) => d.len() as u64,
            ExtentData::Zero(z) => z,
        };
    }
    assert_eq!(n, data.len() as u64);
    let read = start.elapsed();

    // Incremental after 1% of the 64 KiB blocks changed (CBT-style feed).
    let (new, blocks) = guest_writes(data);
    let start = Instant::now();
    let rp = repo
        .begin_restore_point(
            "bench-vm",
            "bench",
            t + Duration::from_secs(1),
            Some(&m.id),
            write_options(),
        )
        .await
        .expect("begin incremental");
    let mut w = rp
        .incremental_disk("xvda", data.len() as u64, "xvda", json!(null))
        .await
        .expect("incremental disk");
    for b in blocks {
        let off = b * 64 * 1024;
        w.write_extent(Extent::data(off as u64, new[off..off + 64 * 1024].to_vec()))
            .await
            .expect("write");
    }
    let ientry = w.finish().await.expect("finish");
    rp.commit(json!({}), json!({}), json!({}))
        .await
        .expect("commit");
    let incr = start.elapsed();
    [
        write.as_nanos() as u64,
        read.as_nanos() as u64,
        entry.stats.bytes_stored,
        incr.as_nanos() as u64,
        ientry.stats.bytes_stored,
        ientry.stats.processed_chunks,
    ]
}

fn main() {
    let mib: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(192);
    let data = corpus(mib * MIB);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Optional filters (comma-separated): BENCH_BACKENDS=memory,local,
    // BENCH_CHUNKS_KIB=1024, BENCH_MODES=plain,aes-256-gcm; BENCH_RUNS=N (best of N, default 2).
    let wanted = |var: &str, name: &str| {
        std::env::var(var)
            .map(|v| v.split(',').any(|w| w.trim() == name))
            .unwrap_or(true)
    };
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let mut rows = Vec::new();
    for backend in ["memory", "local"] {
        if !wanted("BENCH_BACKENDS", backend) {
            continue;
        }
        for chunk_kib in [256u32, 512, 1024, 2048, 4096] {
            if !wanted("BENCH_CHUNKS_KIB", &chunk_kib.to_string()) {
                continue;
            }
            for (mode, cipher) in [
                ("plain", None),
                ("aes-256-gcm", Some(CipherKind::Aes256Gcm)),
                ("chacha20-poly1305", Some(CipherKind::ChaCha20Poly1305)),
            ] {
                if !wanted("BENCH_MODES", mode) {
                    continue;
                }
                let mut best: Option<[u64; 6]> = None;
                for _ in 0..runs {
                    let dir = tempfile::tempdir_in(
                        std::env::var("BENCH_DIR").unwrap_or("/var/tmp".into()),
                    )
                    .expect("tempdir");
                    let storage: Arc<dyn Storage> = match backend {
                        "memory" => Arc::new(MemoryStorage::new()),
                        _ => Arc::new(LocalStorage::new(dir.path()).expect("local")),
                    };
                    let r = rt.block_on(run_one(storage, chunk_kib << 10, cipher, &data));
                    best = Some(match best {
                        Some(b) => [
                            b[0].min(r[0]),
                            b[1].min(r[1]),
                            r[2],
                            b[3].min(r[3]),
                            r[4],
                            r[5],
                        ],
                        None => r,
                    });
                }
                let b = best.expect("ran");
                rows.push(Row {
                    backend,
                    chunk_kib,
                    mode,
                    write: Duration::from_nanos(b[0]),
                    read: Duration::from_nanos(b[1]),
                    stored: b[2],
                    incr: Duration::from_nanos(b[3]),
                    incr_stored: b[4],
                    incr_chunks: b[5],
                });
            }
        }
    }
    let mbs = |d: Duration| data.len() as f64 / 1e6 / d.as_secs_f64();
    println!(
        "corpus {mib} MiB (1/2 /usr files, 1/4 random, 1/4 zeros), best of {runs}, MB/s = 10^6 B/s of disk\n"
    );
    println!(
        "| backend | chunk | mode | full write MB/s | read MB/s | stored MiB | incr. 1% time (% of full) | incr. chunks rewritten | incr. stored MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} KiB | {} | {:.0} | {:.0} | {:.1} | {:.3} s ({:.0}%) | {} of {} | {:.1} |",
            r.backend,
            r.chunk_kib,
            r.mode,
            mbs(r.write),
            mbs(r.read),
            r.stored as f64 / MIB as f64,
            r.incr.as_secs_f64(),
            100.0 * r.incr.as_secs_f64() / r.write.as_secs_f64(),
            r.incr_chunks,
            data.len() / (r.chunk_kib as usize * 1024),
            r.incr_stored as f64 / MIB as f64
        );
    }
}
