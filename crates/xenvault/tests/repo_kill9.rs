//! `kill -9` of `xenvault backup` into a repository and of `xenvault prune`
//! at random moments, through the real binary against a real `xapi-sim`
//! (2 VMs with 4 MiB disks, guest writes between backups): after every
//! kill `xenvault check` is clean, every restore point still listed holds
//! exactly the disk content it was taken from (bit for bit), the newest
//! restore points retention keeps are all there, and the next run of the
//! same command completes. 20 trials of each command, in random order.
//!
//! The seed of the random moments is printed; set `XENVAULT_KILL9_SEED` to
//! replay a run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod backup_support;
mod restore_support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backup_support::{Sim, write_config, xenvault};
use sha2::{Digest as _, Sha256};
use xenvault_engine::restore::PoolConnection;
use xenvault_repo::Repository;
use xenvault_repo::storage::{LocalStorage, Storage};
use xenvault_types::ExtentData;

const REPO_PASSWORD: &str = "kill9-repo-password";
/// The job keeps 3 restore points per VM (its own forget after each run);
/// prune runs with a configuration keeping 2, so that it forgets too.
const KEEP_LAST: usize = 3;
const PRUNE_KEEP_LAST: usize = 2;
const BACKUP_TRIALS: usize = 20;
const PRUNE_TRIALS: usize = 20;

/// A small deterministic generator (xorshift64*), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a kill's delay counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The process's start.
    Start,
    /// Its first change to the repository (a lock, a chunk, a deletion).
    Change,
    /// The first lock it takes (backup: writing; prune: sweep or mark).
    Lock,
}

/// What [`Bench::monitored`] saw.
struct Watched {
    changed: Option<Duration>,
    locked: Option<Duration>,
    /// When its first lock was released again.
    unlocked: Option<Duration>,
    end: Duration,
    killed: bool,
}

/// Disk hashes of one restore point: disk key (source VDI uuid) → SHA-256.
type Hashes = BTreeMap<String, String>;

struct Bench {
    sim: Sim,
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    prune_cfg: PathBuf,
    repo_dir: PathBuf,
    rt: tokio::runtime::Runtime,
    pool: PoolConnection,
    /// Every restore point seen, with the content it must hold.
    recorded: BTreeMap<(String, String), Hashes>,
}

impl Bench {
    fn new() -> Bench {
        let sim = Sim::start(&["--vms", "2", "--disk-size", "4M", "--written", "30%"]);
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(
            &sim,
            dir.path(),
            &format!("all-vms = true\n[jobs.nightly.retention]\nkeep-last = {KEEP_LAST}"),
            "",
        );
        // The target becomes an encrypted repository.
        let pw = dir.path().join("repo.password");
        std::fs::write(&pw, format!("{REPO_PASSWORD}\n")).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            "[targets.archive]\n",
            &format!(
                "[targets.archive]\ntype = \"repository\"\npassword-file = \"{}\"\n",
                pw.display()
            ),
        );
        std::fs::write(&cfg, &text).unwrap();
        let prune_cfg = dir.path().join("prune.toml");
        std::fs::write(
            &prune_cfg,
            text.replace(
                &format!("keep-last = {KEEP_LAST}"),
                &format!("keep-last = {PRUNE_KEEP_LAST}"),
            ),
        )
        .unwrap();
        let repo_dir = dir.path().join("archive");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pool = rt
            .block_on(PoolConnection::connect(
                &sim.s("https_url"),
                &sim.s("user"),
                &sim.s("password"),
                xenvault_xapi::tls::TlsPolicy::Pinned(sim.s("fingerprint").parse().unwrap()),
            ))
            .unwrap();
        Bench {
            sim,
            _dir: dir,
            cfg,
            prune_cfg,
            repo_dir,
            rt,
            pool,
            recorded: BTreeMap::new(),
        }
    }

    fn cfg(&self) -> &str {
        self.cfg.to_str().unwrap()
    }

    /// The arguments of a backup or prune run.
    fn args(&self, prune: bool) -> Vec<String> {
        let v: Vec<&str> = if prune {
            vec![
                "prune",
                "--config",
                self.prune_cfg.to_str().unwrap(),
                "--target",
                "archive",
                "--grace",
                "0",
            ]
        } else {
            vec!["backup", "nightly", "--config", self.cfg()]
        };
        v.into_iter().map(str::to_string).collect()
    }

    /// Runs a command to its end; asserts exit 0.
    fn complete(&self, prune: bool) -> Duration {
        let args = self.args(prune);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let out = xenvault(&args);
        assert_eq!(out.code, 0, "xenvault {args:?} after the kill: {out:?}");
        started.elapsed()
    }

    /// Objects in the repository (every file under its directory): changes
    /// when a lock is taken, a chunk, index or manifest written or deleted.
    fn objects(&self) -> usize {
        fn count(dir: &std::path::Path) -> usize {
            std::fs::read_dir(dir).map_or(0, |d| {
                d.flatten()
                    .map(|e| {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            count(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
        }
        count(&self.repo_dir)
    }

    /// Runs a command, watching the repository every millisecond; with
    /// `kill`, SIGKILLs it the given delay after the trigger. Returns when it
    /// first changed the repository, when it first took a lock, when it
    /// ended or was killed, and whether it was killed while running.
    fn monitored(&self, prune: bool, kill: Option<(Trigger, Duration)>) -> Watched {
        let started = Instant::now();
        let objects_before = self.objects();
        let locks_before = self.locks();
        let mut first_lock: Option<String> = None;
        let mut child = Command::new(env!("CARGO_BIN_EXE_xenvault"))
            .args(self.args(prune))
            .env_remove("XENVAULT_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut w = Watched {
            changed: None,
            locked: None,
            unlocked: None,
            end: Duration::ZERO,
            killed: false,
        };
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                if kill.is_none() {
                    let mut err = String::new();
                    use std::io::Read as _;
                    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                    assert!(status.success(), "{:?}: {status}: {err}", self.args(prune));
                }
                w.end = started.elapsed();
                return w;
            }
            if w.changed.is_none() && self.objects() != objects_before {
                w.changed = Some(started.elapsed());
            }
            // Lock objects are compared by name: a stale lock that a prune
            // removes must not hide the one it takes.
            let locks = self.locks();
            match &first_lock {
                None => {
                    if let Some(new) = locks.difference(&locks_before).next() {
                        first_lock = Some(new.clone());
                        w.locked = Some(started.elapsed());
                    }
                }
                Some(name) if w.unlocked.is_none() && !locks.contains(name) => {
                    w.unlocked = Some(started.elapsed());
                }
                Some(_) => {}
            }
            if let Some((trigger, delay)) = kill {
                let due = match trigger {
                    Trigger::Start => Some(delay),
                    Trigger::Change => w.changed.map(|t| t + delay),
                    Trigger::Lock => w.locked.map(|t| t + delay),
                };
                if due.is_some_and(|d| started.elapsed() >= d) {
                    // SIGKILL: no cleanup, no unlocking, writes cut wherever they are.
                    let _ = child.kill();
                    child.wait().unwrap();
                    w.end = started.elapsed();
                    w.killed = true;
                    return w;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn check_clean(&self, when: &str) {
        let out = xenvault(&[
            "check",
            "--config",
            self.cfg(),
            "--target",
            "archive",
            "--json",
        ]);
        assert_eq!(out.code, 0, "check {when}: {out:?}");
        assert_eq!(out.json()["clean"], true, "check {when}: {out:?}");
    }

    async fn open(&self) -> Repository {
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(&self.repo_dir).unwrap());
        Repository::open(storage, Some(REPO_PASSWORD.as_bytes()))
            .await
            .unwrap()
    }

    /// SHA-256 of every disk of a restore point, read from the repository.
    async fn point_hashes(repo: &Repository, vm: &str, id: &str) -> Hashes {
        let m = repo.load_manifest(vm, id).await.unwrap();
        let mut out = Hashes::new();
        for d in &m.disks {
            let mut reader = repo.read_disk(&m, &d.key, 4).await.unwrap();
            let mut h = Sha256::new();
            let mut at = 0u64;
            while let Some(e) = reader.next_extent().await {
                let e = e.unwrap_or_else(|e| panic!("{vm}/{id} disk {}: {e}", d.key));
                assert_eq!(e.offset, at, "extents cover the disk in order");
                match e.data {
                    ExtentData::Data(b) => {
                        h.update(&b);
                        at += b.len() as u64;
                    }
                    ExtentData::Zero(n) => {
                        let zeros = vec![0u8; 1 << 16];
                        let mut left = n;
                        while left > 0 {
                            let k = left.min(zeros.len() as u64);
                            h.update(&zeros[..k as usize]);
                            left -= k;
                        }
                        at += n;
                    }
                }
            }
            assert_eq!(at, d.size, "{vm}/{id} disk {} is complete", d.key);
            out.insert(d.key.clone(), hex::encode(h.finalize()));
        }
        out
    }

    /// SHA-256 of every source disk as the pool holds it now (disk key =
    /// source VDI uuid).
    fn source_hashes(&self, keys: &BTreeSet<String>) -> BTreeMap<String, String> {
        self.rt.block_on(async {
            let mut out = BTreeMap::new();
            for k in keys {
                let (sha, _) = restore_support::raw_sha(&self.pool, k).await;
                out.insert(k.clone(), sha);
            }
            out
        })
    }

    /// Every listed restore point holds what it must: a known one its
    /// recorded content, a new one (committed before the kill, or by the
    /// completing run) the source content of when it was taken. The newest
    /// `PRUNE_KEEP_LAST` recorded points of each VM are all still listed.
    fn verify_points(&mut self, source: &BTreeMap<String, String>, when: &str) -> usize {
        let listed: Vec<(String, String)> = self.rt.block_on(async {
            let repo = self.open().await;
            repo.list_restore_points(None).await.unwrap()
        });
        let mut new = 0;
        let repo = self.rt.block_on(self.open());
        for (vm, id) in &listed {
            let hashes = self.rt.block_on(Self::point_hashes(&repo, vm, id));
            match self.recorded.get(&(vm.clone(), id.clone())) {
                Some(want) => assert_eq!(&hashes, want, "{when}: {vm}/{id} changed"),
                None => {
                    for (k, h) in &hashes {
                        assert_eq!(
                            Some(h),
                            source.get(k),
                            "{when}: new restore point {vm}/{id} disk {k} differs from the disk it was taken from"
                        );
                    }
                    self.recorded.insert((vm.clone(), id.clone()), hashes);
                    new += 1;
                }
            }
        }
        let listed: BTreeSet<&(String, String)> = listed.iter().collect();
        let mut per_vm: BTreeMap<&str, Vec<&(String, String)>> = BTreeMap::new();
        for key in self.recorded.keys() {
            per_vm.entry(key.0.as_str()).or_default().push(key);
        }
        for (vm, mut keys) in per_vm {
            keys.sort_by(|a, b| b.1.cmp(&a.1));
            for k in keys.iter().take(PRUNE_KEEP_LAST) {
                assert!(
                    listed.contains(k),
                    "{when}: restore point {vm}/{} that retention keeps is gone",
                    k.1
                );
            }
        }
        new
    }

    /// Names of the lock objects in the repository (a killed holder leaves
    /// its own).
    fn locks(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.repo_dir.join("locks")).map_or_else(
            |_| BTreeSet::new(),
            |d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            },
        )
    }

    fn disk_keys(&self) -> BTreeSet<String> {
        self.recorded
            .values()
            .flat_map(|h| h.keys().cloned())
            .collect()
    }

    fn guest_write(&self, seed: u64) {
        for vm in ["vm-01", "vm-02"] {
            let uuid = self.vm_uuid(vm);
            self.sim.control(
                "guest-write",
                &serde_json::json!({"vm": uuid, "seed": seed, "blocks": 4}),
            );
        }
    }

    fn vm_uuid(&self, name: &str) -> String {
        self.rt.block_on(async {
            let vms = self.pool.session.vm().get_all_records().await.unwrap();
            vms.values()
                .find(|v| v.name_label == name && !v.is_a_snapshot)
                .map(|v| v.uuid.clone())
                .unwrap()
        })
    }
}

/// How long a calibration run held its first lock (at least 1 ms).
fn lock_window(w: &Watched) -> Duration {
    let locked = w.locked.expect("the command took a repository lock");
    (w.unlocked.unwrap_or(w.end) - locked).max(Duration::from_millis(1))
}

/// Over how long the kills of one command are spread, per trigger.
#[derive(Debug, Clone, Copy)]
struct Spans {
    /// From its start.
    start: Duration,
    /// From its first change to the repository.
    change: Duration,
    /// From its first lock.
    lock: Duration,
}

impl Spans {
    fn of(&self, trigger: Trigger) -> Duration {
        match trigger {
            Trigger::Start => self.start,
            Trigger::Change => self.change,
            Trigger::Lock => self.lock,
        }
    }

    /// The calibration's spans, shortened to a run of the command that went
    /// to its end: the calibration's runs may have had more to do (or a
    /// busier machine), and kills spread over a longer span than the trials
    /// last would mostly come after the end.
    fn within(&self, w: &Watched, prune: bool) -> Spans {
        let start = match (prune, w.locked) {
            // A prune: until the end of its first lock (what follows is short).
            (true, Some(locked)) => locked + lock_window(w),
            _ => w.end,
        };
        let one_ms = Duration::from_millis(1);
        Spans {
            start: self.start.min(start.max(one_ms)),
            change: w
                .changed
                .map_or(self.change, |c| self.change.min((w.end - c).max(one_ms))),
            lock: w
                .locked
                .map_or(self.lock, |_| self.lock.min(lock_window(w))),
        }
    }
}

#[test]
fn kill_9_of_backup_and_prune_leaves_a_consistent_repository() {
    let seed = std::env::var("XENVAULT_KILL9_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("kill -9 trials: XENVAULT_KILL9_SEED={seed}");
    let mut rng = Rng(seed);
    let mut bench = Bench::new();
    let out = xenvault(&[
        "repo",
        "init",
        "--config",
        bench.cfg(),
        "--target",
        "archive",
        "--encrypt",
    ]);
    assert_eq!(out.code, 0, "{out:?}");

    // Two complete backups first (a full, then an incremental), and the
    // time each command takes, to spread the kills over it.
    let full_backup_time = bench.monitored(false, None).end;
    let keys_after_first: BTreeSet<String> = {
        // The first restore points are recorded against the source.
        let listed = bench.rt.block_on(async {
            let repo = bench.open().await;
            repo.list_restore_points(None).await.unwrap()
        });
        assert_eq!(listed.len(), 2, "one restore point per VM");
        let repo = bench.rt.block_on(bench.open());
        let mut keys = BTreeSet::new();
        for (vm, id) in &listed {
            keys.extend(
                bench
                    .rt
                    .block_on(Bench::point_hashes(&repo, vm, id))
                    .into_keys(),
            );
        }
        let source = bench.source_hashes(&keys);
        assert_eq!(bench.verify_points(&source, "first backup"), 2);
        keys
    };
    assert_eq!(keys_after_first.len(), 2, "one disk per VM");
    bench.guest_write(1);
    std::thread::sleep(Duration::from_millis(1100));
    let source = bench.source_hashes(&bench.disk_keys());
    let w = bench.monitored(false, None);
    // Start kills are spread over the shorter of the two runs: under load one
    // of them can take several times as long as the trials' backups, and
    // kills spread over it would mostly come after the trial has ended.
    let backup_time = full_backup_time.min(w.end);
    // How long a backup works in the repository (lock, chunks, indexes, manifest).
    let backup_window = w.end - w.changed.expect("the backup wrote to the repository");
    let backup_lock_window = lock_window(&w);
    assert_eq!(bench.verify_points(&source, "second backup"), 2);
    bench.monitored(true, None);
    bench.check_clean("after the first prune");
    // A prune with everything to do (forget, sweep, mark), measured.
    bench.guest_write(2);
    std::thread::sleep(Duration::from_millis(1100));
    let source = bench.source_hashes(&bench.disk_keys());
    bench.complete(false);
    assert_eq!(bench.verify_points(&source, "third backup"), 2);
    let w = bench.monitored(true, None);
    let prune_time = w.end;
    let prune_window = w.end - w.changed.expect("prune changed the repository");
    let prune_lock_window = lock_window(&w);
    // Until the end of its first lock: a prune with less to do ends sooner
    // than this calibration run, so later kills are spread over this span.
    let prune_start_span = w.locked.expect("prune took its lock") + prune_lock_window;
    bench.check_clean("after the second prune");
    eprintln!(
        "backup: {} ms, the first (full) one {} ms ({} ms in the repository, {} ms holding its lock); prune: {} ms ({} ms in the repository, {} ms holding its first lock)",
        backup_time.as_millis(),
        full_backup_time.as_millis(),
        backup_window.as_millis(),
        backup_lock_window.as_millis(),
        prune_time.as_millis(),
        prune_window.as_millis(),
        prune_lock_window.as_millis()
    );

    let mut kinds: Vec<bool> = [vec![false; BACKUP_TRIALS], vec![true; PRUNE_TRIALS]].concat();
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let calibration = [
        Spans {
            start: backup_time,
            change: backup_window,
            lock: backup_lock_window,
        },
        Spans {
            start: prune_start_span,
            change: prune_window,
            lock: prune_lock_window,
        },
    ];
    let mut spans = calibration;
    let mut killed_running = [0usize; 2];
    let mut killed_inside = [0usize; 2];
    for (trial, prune) in kinds.iter().copied().enumerate() {
        let what = if prune { "prune" } else { "backup" };
        if !prune {
            bench.guest_write(100 + trial as u64);
        }
        // Restore point ids are per second: keep runs a second apart.
        std::thread::sleep(Duration::from_millis(1100));
        let source = bench.source_hashes(&bench.disk_keys());
        // A third of the kills fall while the command holds its first
        // repository lock, a third after its first change to the repository,
        // a third anywhere from its start.
        let trigger = match rng.below(3) {
            0 => Trigger::Start,
            1 => Trigger::Lock,
            _ => Trigger::Change,
        };
        let span = spans[usize::from(prune)].of(trigger);
        let delay = Duration::from_micros(rng.below(span.as_micros() as u64 + 1));
        let locks_before = bench.locks();
        let w = bench.monitored(prune, Some((trigger, delay)));
        let (at, running) = (w.end, w.killed);
        killed_running[usize::from(prune)] += usize::from(running);
        // A lock left behind: the process died inside the repository's
        // critical section (writing a restore point, marking, sweeping).
        let in_repository = bench.locks().difference(&locks_before).next().is_some();
        killed_inside[usize::from(prune)] += usize::from(in_repository);
        let when = format!(
            "trial {trial} ({what} killed at {} ms{})",
            at.as_millis(),
            if !running {
                ", it had already ended"
            } else if in_repository {
                ", holding its repository lock"
            } else if trigger != Trigger::Start {
                ", after it changed the repository"
            } else {
                ""
            }
        );
        eprintln!("{when}");
        bench.check_clean(&format!("after {when}"));
        bench.verify_points(&source, &when);
        // The next run of the same command completes, and leaves all
        // consistent; the next trial's kills are spread over no more than it
        // took (nor than the calibration's).
        std::thread::sleep(Duration::from_millis(1100));
        let w = bench.monitored(prune, None);
        spans[usize::from(prune)] = calibration[usize::from(prune)].within(&w, prune);
        bench.check_clean(&format!("after the run following {when}"));
        bench.verify_points(&source, &format!("the run following {when}"));
    }
    eprintln!(
        "killed while running: {} backups, {} prunes; of them holding the repository lock: {} backups, {} prunes",
        killed_running[0], killed_running[1], killed_inside[0], killed_inside[1]
    );
    for (k, (what, trials)) in [("backup", BACKUP_TRIALS), ("prune", PRUNE_TRIALS)]
        .into_iter()
        .enumerate()
    {
        assert!(
            killed_inside[k] >= 1,
            "no {what} was killed inside the repository's critical sections (seed {seed}): {killed_inside:?}"
        );
        assert!(
            killed_running[k] >= trials / 3,
            "too few {what} kills hit a running process (seed {seed}): {killed_running:?}"
        );
    }
    assert!(
        killed_running[0] + killed_running[1] >= (BACKUP_TRIALS + PRUNE_TRIALS) / 2,
        "most kills must hit a running process (seed {seed}): {killed_running:?}"
    );

    // The newest restore point of each VM restores bit for bit through the
    // binary too (`restore --to-file`), and equals the disk now.
    let keys = bench.disk_keys();
    let source = bench.source_hashes(&keys);
    let dir = tempfile::tempdir().unwrap();
    for vm in ["vm-01", "vm-02"] {
        let file = dir.path().join(format!("{vm}.raw"));
        let out = xenvault(&[
            "restore",
            "--config",
            bench.cfg(),
            "--target",
            "archive",
            "--vm",
            vm,
            "--disk",
            "0",
            "--to-file",
            file.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(out.code, 0, "{out:?}");
        let key = out.json()["disk_key"].as_str().unwrap().to_string();
        let sha = hex::encode(Sha256::digest(std::fs::read(&file).unwrap()));
        assert_eq!(
            Some(&sha),
            source.get(&key),
            "{vm}: the restored file differs from its disk"
        );
    }
}
