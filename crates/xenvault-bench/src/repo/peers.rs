//! Running measured child processes: xenvault's steps, restic and borg, each under
//! `/usr/bin/time` for its wall time and peak memory (max RSS).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A finished, measured child.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Wall time, from spawn to exit.
    pub wall: Duration,
    /// Peak resident memory in bytes.
    pub max_rss: u64,
    /// CPU time (user + system) of the child and its children.
    pub cpu: Duration,
    /// The child's stdout.
    pub stdout: String,
}

/// The fastest of `runs` (least wall time), with the largest peak memory of
/// them all. Empty: a zero measurement.
pub fn fastest(runs: Vec<Measured>) -> Measured {
    fastest_with(runs.into_iter().map(|m| (m, ())).collect()).0
}

/// [`fastest`], keeping what the fastest run reported next to its measurement.
pub fn fastest_with<T: Default>(runs: Vec<(Measured, T)>) -> (Measured, T) {
    let max_rss = runs.iter().map(|(m, _)| m.max_rss).max().unwrap_or(0);
    let (mut best, report) = runs
        .into_iter()
        .min_by_key(|(m, _)| m.wall)
        .unwrap_or_default();
    best.max_rss = max_rss;
    (best, report)
}

/// Runs `program args` with `envs` under `/usr/bin/time` (after a `sync`, not
/// measured), fails with its stderr when it fails.
pub fn measure(
    program: &Path,
    args: &[String],
    envs: &[(String, String)],
    cwd: Option<&Path>,
    scratch: &Path,
) -> anyhow::Result<Measured> {
    // Whatever an earlier step left dirty (restic and borg do not sync) is
    // written now, not during this measurement.
    sync_all()?;
    let rss_file = scratch.join(format!("rss-{}.txt", std::process::id()));
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-f")
        .arg("%M %U %S")
        .arg("-o")
        .arg(&rss_file)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let t0 = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run /usr/bin/time {}", program.display()))?;
    let wall = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" ").chars().take(200).collect::<String>(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .chars()
                .rev()
                .take(2000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        );
    }
    let text = std::fs::read_to_string(&rss_file).unwrap_or_default();
    let _ = std::fs::remove_file(&rss_file);
    // GNU time prints "KiB user sys" on the last line (earlier lines may be
    // warnings such as "Command exited with non-zero status").
    let (kib, cpu) = text
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [k, u, s] => Some((
                    k.parse::<u64>().ok()?,
                    u.parse::<f64>().ok()? + s.parse::<f64>().ok()?,
                )),
                _ => None,
            }
        })
        .unwrap_or((0, 0.0));
    Ok(Measured {
        wall,
        max_rss: kib * 1024,
        cpu: Duration::from_secs_f64(cpu),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// Runs a command that is not measured (setup), failing with its stderr.
pub fn run_quiet(program: &str, args: &[&str], envs: &[(String, String)]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Total bytes of the files under `dir` (apparent sizes; what the repository stores).
pub fn dir_bytes(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// The regular files under `dir` (unreadable directories skipped).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => files.push(e.path()),
                _ => {}
            }
        }
    }
    files
}

/// Time to fsync `file` (all its dirty pages written and flushed).
pub fn fsync_file(file: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    std::fs::File::open(file)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", file.display()))?;
    Ok(start.elapsed())
}

/// `sync`: everything dirty is written.
fn sync_all() -> anyhow::Result<()> {
    if !Command::new("sync").status().is_ok_and(|s| s.success()) {
        bail!("`sync` failed");
    }
    Ok(())
}

/// Takes the files under `dir` out of the page cache (after a `sync`, so that
/// none is dirty): a restore long after the backup reads its repository from
/// the disk. Every tool's repository gets this before each measured restore;
/// without it, restic's and borg's would be read from memory while xenvault's
/// chunks are not (its backup drops them from the cache as it writes them).
pub fn evict_from_page_cache(dir: &Path) -> anyhow::Result<()> {
    sync_all()?;
    for path in files_under(dir) {
        let f = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
            .with_context(|| format!("cannot evict {}", path.display()))?;
    }
    Ok(())
}

/// Whether two files have the same bytes (`cmp`, fast on sparse files).
pub fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let status = Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .context("cannot run cmp")?;
    Ok(status.success())
}

/// The only regular file under `dir` (where restic and borg restored the disk).
pub fn only_file_under(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                found.push(e.path());
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!(
            "expected one restored file under {}, found {n}",
            dir.display()
        ),
    }
}

/// Which peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// restic (Debian package).
    Restic,
    /// borg 1.x (Debian package).
    Borg,
}

impl Peer {
    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Restic => "restic",
            Peer::Borg => "borg",
        }
    }
}

/// One peer's repository and the environment its commands need.
pub struct PeerRepo {
    /// Which peer.
    pub peer: Peer,
    /// The repository directory.
    pub repo: PathBuf,
    envs: Vec<(String, String)>,
    scratch: PathBuf,
    archives: u32,
}

impl PeerRepo {
    /// Creates the repository (not measured): restic's default (AES-256 + Poly1305,
    /// repository format 2 with zstd), borg `repokey-blake2`.
    /// Its repository, cache and home are in `base`.
    pub fn init(peer: Peer, base: PathBuf, password: &str) -> anyhow::Result<PeerRepo> {
        std::fs::create_dir_all(&base)?;
        let repo = base.join("repo");
        let cache = base.join("cache");
        let mut envs = vec![("HOME".to_string(), base.display().to_string())];
        match peer {
            Peer::Restic => {
                envs.push(("RESTIC_PASSWORD".into(), password.into()));
                envs.push(("RESTIC_CACHE_DIR".into(), cache.display().to_string()));
                envs.push(("RESTIC_PROGRESS_FPS".into(), "0.1".into()));
                run_quiet(
                    "restic",
                    &["init", "--repo", &repo.display().to_string()],
                    &envs,
                )?;
            }
            Peer::Borg => {
                envs.push(("BORG_PASSPHRASE".into(), password.into()));
                envs.push(("BORG_BASE_DIR".into(), base.display().to_string()));
                envs.push((
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK".into(),
                    "yes".into(),
                ));
                envs.push(("BORG_RELOCATED_REPO_ACCESS_IS_OK".into(), "yes".into()));
                run_quiet(
                    "borg",
                    &[
                        "init",
                        "--encryption",
                        "repokey-blake2",
                        &repo.display().to_string(),
                    ],
                    &envs,
                )?;
            }
        }
        Ok(PeerRepo {
            peer,
            repo,
            envs,
            scratch: base,
            archives: 0,
        })
    }

    /// Backs up the files `paths` (run from `cwd`, so the stored names are relative).
    pub fn backup(&mut self, cwd: &Path, paths: &[&str]) -> anyhow::Result<Measured> {
        self.archives += 1;
        let repo = self.repo.display().to_string();
        let mut args: Vec<String> = match self.peer {
            Peer::Restic => vec![
                "backup".into(),
                "--repo".into(),
                repo,
                "--host".into(),
                "bench".into(),
            ],
            Peer::Borg => vec![
                "create".into(),
                // zstd level 1 like xenvault; borg's fixed chunker with 4 MiB blocks is
                // what its documentation recommends for disk images.
                "--compression".into(),
                "zstd,1".into(),
                "--chunker-params".into(),
                "fixed,4194304".into(),
                format!("{repo}::a{}", self.archives),
            ],
        };
        args.extend(paths.iter().map(|p| p.to_string()));
        measure(
            Path::new(self.peer.name()),
            &args,
            &self.envs,
            Some(cwd),
            &self.scratch,
        )
    }

    /// Restores the latest backup into the empty directory `target`.
    pub fn restore_latest(&self, target: &Path) -> anyhow::Result<Measured> {
        std::fs::create_dir_all(target)?;
        let repo = self.repo.display().to_string();
        let args: Vec<String> = match self.peer {
            Peer::Restic => vec![
                "restore".into(),
                "latest".into(),
                "--repo".into(),
                repo,
                // restic 0.14 has no --sparse: it writes the zeros too.
                "--target".into(),
                target.display().to_string(),
            ],
            Peer::Borg => vec![
                "extract".into(),
                "--sparse".into(),
                format!("{repo}::a{}", self.archives),
            ],
        };
        measure(
            Path::new(self.peer.name()),
            &args,
            &self.envs,
            Some(target),
            &self.scratch,
        )
    }

    /// Bytes of the repository.
    pub fn size(&self) -> u64 {
        dir_bytes(&self.repo)
    }
}
