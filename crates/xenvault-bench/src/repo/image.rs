//! The benchmark's realistic disk: an ext4 filesystem image with OS files (hard
//! links to, or copies of, files under /usr) and random files, mostly free space.
//!
//! `mke2fs -t ext4 -d DIR` fills the filesystem from a directory without mounting
//! it or needing root, so the image is the bytes a real guest disk would hold.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// What to put on the disk.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Virtual size of the disk.
    pub disk_size: u64,
    /// Bytes of OS files taken from /usr.
    pub os_bytes: u64,
    /// Bytes of random (incompressible) files.
    pub random_bytes: u64,
    /// Seed of the random files.
    pub seed: u64,
}

/// What ended up on the disk.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// The image file (sparse).
    pub path: PathBuf,
    /// Bytes of OS files.
    pub os_bytes: u64,
    /// Number of OS files.
    pub os_files: u64,
    /// Bytes of random files.
    pub random_bytes: u64,
}

/// A small xorshift generator: the bytes only need to be incompressible and
/// reproducible, not secure.
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for piece in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            piece.copy_from_slice(&v[..piece.len()]);
        }
    }
}

/// Builds the staging directory and the image in `work`.
pub fn build(spec: &ImageSpec, work: &Path) -> anyhow::Result<ImageInfo> {
    let staging = work.join("rootfs");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    let (os_bytes, os_files) = stage_os_files(&staging, spec.os_bytes)?;
    let random_bytes = stage_random_files(&staging, spec.random_bytes, spec.seed)?;

    let path = work.join("disk.img");
    let _ = std::fs::remove_file(&path);
    let file = std::fs::File::create(&path)?;
    file.set_len(spec.disk_size)?;
    drop(file);
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-E"])
        .arg("root_owner=0:0,lazy_itable_init=1,nodiscard")
        .arg("-L")
        .arg("bench")
        .arg("-d")
        .arg(&staging)
        .arg(&path)
        .output()
        .context("cannot run mke2fs (install e2fsprogs: scripts/bench-deps.sh)")?;
    if !out.status.success() {
        bail!(
            "mke2fs -d {} {} failed: {}",
            staging.display(),
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The staging directory stays until the work directory is removed: on an
    // ext4 without a journal (this machine's root), the inode allocator skips
    // inodes freed in the last 30 s, reading their inode blocks one by one,
    // so deleting ~10,000 entries here would slow whichever tool creates
    // files next (about 15% of xenvault's CPU time in its full backup).
    Ok(ImageInfo {
        path,
        os_bytes,
        os_files,
        random_bytes,
    })
}

/// Hard-links (or copies) regular files from /usr into `staging/usr`, in sorted
/// order, until `budget` bytes. Returns bytes and files.
fn stage_os_files(staging: &Path, budget: u64) -> anyhow::Result<(u64, u64)> {
    let mut total = 0u64;
    let mut files = 0u64;
    let mut stack = vec![PathBuf::from("/usr")];
    while let Some(dir) = stack.pop() {
        if total >= budget {
            break;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        // Directories are visited in name order: push them reversed.
        let mut subdirs = Vec::new();
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            let src = e.path();
            if ft.is_dir() {
                subdirs.push(src);
            } else if ft.is_file() {
                let Ok(meta) = e.metadata() else { continue };
                let len = meta.len();
                if len == 0 || total + len > budget {
                    continue;
                }
                let Ok(rel) = src.strip_prefix("/") else {
                    continue;
                };
                let dst = staging.join(rel);
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if std::fs::hard_link(&src, &dst).is_err() && std::fs::copy(&src, &dst).is_err() {
                    continue;
                }
                total += len;
                files += 1;
            }
        }
        subdirs.reverse();
        stack.extend(subdirs);
    }
    Ok((total, files))
}

/// Writes random files of 1–32 MiB into `staging/data` until `budget` bytes.
fn stage_random_files(staging: &Path, budget: u64, seed: u64) -> anyhow::Result<u64> {
    let dir = staging.join("data");
    std::fs::create_dir_all(&dir)?;
    let mut rng = XorShift::new(seed);
    let mut total = 0u64;
    let mut n = 0u32;
    let mut buf = vec![0u8; 1 << 20];
    while total < budget {
        let mib = 1 + rng.next_u64() % 32;
        let len = (mib << 20).min(budget - total);
        let path = dir.join(format!("blob-{n:04}.bin"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut left = len;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..k]);
            std::io::Write::write_all(&mut f, &buf[..k])?;
            left -= k as u64;
        }
        std::io::Write::flush(&mut f)?;
        total += len;
        n += 1;
    }
    Ok(total)
}

/// The 64 KiB blocks of `path` that hold any non-zero byte.
pub fn written_blocks(path: &Path) -> anyhow::Result<Vec<u64>> {
    use std::io::Read as _;
    const BLOCK: usize = 64 << 10;
    let mut f = std::io::BufReader::with_capacity(4 << 20, std::fs::File::open(path)?);
    let mut buf = vec![0u8; BLOCK];
    let mut out = Vec::new();
    let mut i = 0u64;
    loop {
        let mut n = 0;
        while n < BLOCK {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        if !xenvault_types::extent::is_all_zero(&buf[..n]) {
            out.push(i);
        }
        i += 1;
        if n < BLOCK {
            break;
        }
    }
    Ok(out)
}
