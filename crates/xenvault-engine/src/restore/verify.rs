//! The checksum check of a restore point: every file of `SHA256SUMS`
//! (`sha256sum` format, over the bytes as stored) is read and compared, every
//! data file must be listed, and compressed data files are decompressed on the
//! way to learn their content length (an upload needs it up front: XAPI's
//! `/import` refuses chunked transfers). Blocking: call from a blocking thread.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::point::{ArchivePoint, Compression, DataFile, MANIFEST};
use super::{ProgressFn, RestoreError, RestorePhase, RestoreProgress};

/// Read size of the checks.
const BUF: usize = 1 << 20;

/// What is known about a restore point's checksums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ChecksumStatus {
    /// Every file matched `SHA256SUMS`.
    Verified,
    /// A file is missing or does not match.
    Damaged {
        /// The file.
        file: String,
        /// What is wrong.
        problem: String,
    },
    /// There is no `SHA256SUMS`.
    NoManifest,
    /// A manifest exists; the files were not read.
    NotChecked,
}

/// A restore point whose files were checked (or deliberately not).
#[derive(Debug, Clone)]
pub struct VerifiedPoint {
    /// The restore point.
    pub point: ArchivePoint,
    /// Content length (after decompression) of each data file, by name.
    pub content_len: BTreeMap<String, u64>,
    /// Whether the checksums were checked.
    pub checked: bool,
}

impl VerifiedPoint {
    /// The content length of a data file (its stored size if unknown).
    pub fn content_len_of(&self, file: &DataFile) -> u64 {
        self.content_len
            .get(&file.name)
            .copied()
            .unwrap_or(file.stored_len)
    }
}

/// One line of `SHA256SUMS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// File name, relative to the restore point.
    pub name: String,
}

/// Parses `sha256sum` output (`<hex>  <name>` or `<hex> *<name>`).
pub fn parse_manifest(text: &str) -> Result<Vec<ManifestEntry>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (hash, rest) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {}: expected `<sha256>  <file>`", i + 1))?;
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .unwrap_or(rest);
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("line {}: {hash:?} is not a SHA-256", i + 1));
        }
        let path = Path::new(name);
        if name.is_empty()
            || path
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(format!("line {}: bad file name {name:?}", i + 1));
        }
        out.push(ManifestEntry {
            sha256: hash.to_ascii_lowercase(),
            name: name.to_string(),
        });
    }
    Ok(out)
}

/// Checks a restore point: with `check`, every file of `SHA256SUMS` must exist
/// and match, and every data file must be listed; compressed data files are
/// decompressed to learn their length (and prove they decompress). Without
/// `check` only the decompression runs.
pub fn verify_point(
    point: &ArchivePoint,
    check: bool,
    progress: &ProgressFn,
) -> Result<VerifiedPoint, RestoreError> {
    // Complete archive points: the archive's own check (manifest hash in the
    // marker, every file re-hashed); lengths from the marker.
    if let Some(rp) = point.archive.as_ref().filter(|rp| rp.is_complete())
        && (check || point.data.iter().all(|f| f.content_len.is_some()))
    {
        let total: u64 = rp.files().iter().map(|f| f.bytes).sum();
        let report = |done: u64| {
            progress(RestoreProgress {
                phase: RestorePhase::Verifying,
                done,
                total,
            })
        };
        if check {
            report(0);
            rp.verify().map_err(super::point::archive_error)?;
            report(total);
        }
        let mut content_len = BTreeMap::new();
        for file in &point.data {
            let len = match file.content_len {
                Some(n) => n,
                None => read_file(&file.path, file.compression, &mut |_| {})?.1,
            };
            content_len.insert(file.name.clone(), len);
        }
        return Ok(VerifiedPoint {
            point: point.clone(),
            content_len,
            checked: check,
        });
    }
    let manifest_path = point.dir.join(MANIFEST);
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    if check {
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RestoreError::Damaged {
                    file: manifest_path,
                    problem: "missing: without it the data cannot be checked (restore it unchecked with --no-verify)".into(),
                });
            }
            Err(e) => return Err(RestoreError::io(&manifest_path, e)),
        };
        for entry in parse_manifest(&text).map_err(|problem| RestoreError::Damaged {
            file: manifest_path.clone(),
            problem,
        })? {
            expected.insert(entry.name, entry.sha256);
        }
        for file in &point.data {
            if !expected.contains_key(&file.name) {
                return Err(RestoreError::Damaged {
                    file: file.path.clone(),
                    problem: format!("not listed in {MANIFEST}"),
                });
            }
        }
    }
    let total: u64 = if check {
        expected
            .keys()
            .filter_map(|n| std::fs::metadata(point.dir.join(n)).ok())
            .map(|m| m.len())
            .sum()
    } else {
        point
            .data
            .iter()
            .filter(|f| f.compression != Compression::None)
            .map(|f| f.stored_len)
            .sum()
    };
    let mut done = 0u64;
    let mut content_len = BTreeMap::new();
    let report = |done: u64| {
        progress(RestoreProgress {
            phase: RestorePhase::Verifying,
            done,
            total,
        })
    };
    report(0);
    for file in &point.data {
        let want = expected.remove(&file.name);
        if !check && file.compression == Compression::None {
            content_len.insert(file.name.clone(), file.stored_len);
            continue;
        }
        let (sha, len) = read_file(&file.path, file.compression, &mut |n| {
            done += n;
            report(done);
        })?;
        if let Some(want) = want
            && sha != want
        {
            return Err(RestoreError::Damaged {
                file: file.path.clone(),
                problem: format!("SHA-256 is {sha}, {MANIFEST} says {want}"),
            });
        }
        content_len.insert(file.name.clone(), len);
    }
    // The other listed files (vm.json, *.cfg): present and matching.
    for (name, want) in expected {
        let path = point.dir.join(&name);
        if !path.exists() {
            return Err(RestoreError::Damaged {
                file: path,
                problem: format!("missing (listed in {MANIFEST})"),
            });
        }
        let (sha, _) = read_file(&path, Compression::None, &mut |n| {
            done += n;
            report(done);
        })?;
        if sha != want {
            return Err(RestoreError::Damaged {
                file: path,
                problem: format!("SHA-256 is {sha}, {MANIFEST} says {want}"),
            });
        }
    }
    Ok(VerifiedPoint {
        point: point.clone(),
        content_len,
        checked: check,
    })
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    on_read: Box<dyn FnMut(u64)>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        (self.on_read)(n as u64);
        Ok(n)
    }
}

/// Reads a whole file: its SHA-256 (stored bytes) and content length
/// (decompressed bytes).
fn read_file(
    path: &Path,
    compression: Compression,
    on_read: &mut dyn FnMut(u64),
) -> Result<(String, u64), RestoreError> {
    let file = std::fs::File::open(path).map_err(|e| RestoreError::io(path, e))?;
    // The callback outlives this call only inside `Hashing`; count locally.
    let counted = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let c = counted.clone();
    let mut hashing = Hashing {
        inner: file,
        hasher: Sha256::new(),
        on_read: Box::new(move |n| c.set(c.get() + n)),
    };
    let mut last_reported = 0u64;
    let mut flush = |on_read: &mut dyn FnMut(u64)| {
        let now = counted.get();
        if now > last_reported {
            on_read(now - last_reported);
            last_reported = now;
        }
    };
    let damaged = |e: io::Error| RestoreError::Damaged {
        file: path.to_path_buf(),
        problem: match compression {
            Compression::Zstd => format!("not valid zstd data: {e}"),
            Compression::Gzip => format!("not valid gzip data: {e}"),
            Compression::None => format!("read error: {e}"),
        },
    };
    let mut buf = vec![0u8; BUF];
    let content_len = match compression {
        Compression::None => {
            let mut len = 0u64;
            loop {
                let n =
                    read_retrying(&mut hashing, &mut buf).map_err(|e| RestoreError::io(path, e))?;
                if n == 0 {
                    break;
                }
                len += n as u64;
                flush(on_read);
            }
            len
        }
        Compression::Zstd | Compression::Gzip => {
            let mut len = 0u64;
            {
                let mut decoder: Box<dyn Read + '_> = match compression {
                    Compression::Zstd => Box::new(
                        zstd::Decoder::with_buffer(io::BufReader::new(&mut hashing))
                            .map_err(damaged)?,
                    ),
                    _ => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(
                        &mut hashing,
                    ))),
                };
                loop {
                    let n = read_retrying(&mut decoder, &mut buf).map_err(damaged)?;
                    if n == 0 {
                        break;
                    }
                    len += n as u64;
                    flush(on_read);
                }
            }
            // Trailing bytes after the last frame still count for the hash.
            loop {
                let n =
                    read_retrying(&mut hashing, &mut buf).map_err(|e| RestoreError::io(path, e))?;
                if n == 0 {
                    break;
                }
            }
            len
        }
    };
    flush(on_read);
    let sha = hex::encode(hashing.hasher.finalize());
    Ok((sha, content_len))
}

fn read_retrying(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The status of a point's checksums without reading its data (listing):
/// `NoManifest`, or `NotChecked`.
pub fn quick_status(point: &ArchivePoint) -> ChecksumStatus {
    if point.has_manifest {
        ChecksumStatus::NotChecked
    } else {
        ChecksumStatus::NoManifest
    }
}

/// The status of a point's checksums after reading everything (`--verify`).
pub fn full_status(point: &ArchivePoint) -> ChecksumStatus {
    if !point.has_manifest {
        return ChecksumStatus::NoManifest;
    }
    match verify_point(point, true, &super::no_progress()) {
        Ok(_) => ChecksumStatus::Verified,
        Err(RestoreError::Damaged { file, problem }) => ChecksumStatus::Damaged {
            file: file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| file.display().to_string()),
            problem,
        },
        Err(e) => ChecksumStatus::Damaged {
            file: String::new(),
            problem: e.to_string(),
        },
    }
}

/// Writes a `SHA256SUMS` for the given files of `dir` (tests and tools).
pub fn write_manifest(dir: &Path, names: &[&str]) -> Result<PathBuf, RestoreError> {
    let mut text = String::new();
    for name in names {
        let path = dir.join(name);
        let (sha, _) = read_file(&path, Compression::None, &mut |_| {})?;
        text.push_str(&format!("{sha}  {name}\n"));
    }
    let path = dir.join(MANIFEST);
    std::fs::write(&path, text).map_err(|e| RestoreError::io(&path, e))?;
    Ok(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::restore::point::ArchivePoint;

    #[test]
    fn manifest_lines() {
        let h = "a".repeat(64);
        let m = parse_manifest(&format!("{h}  vm.xva\n{h} *vm.json\n\n")).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].name, "vm.json");
        assert!(parse_manifest("abc  x").is_err());
        assert!(parse_manifest(&format!("{h}  ../etc/passwd")).is_err());
        assert!(parse_manifest(&format!("{h}  /abs")).is_err());
    }

    #[test]
    fn verifies_and_measures_compressed_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm").join("20261122-010000");
        std::fs::create_dir_all(&p).unwrap();
        let content = vec![7u8; 3 << 20];
        let zst = zstd::encode_all(&content[..], 3).unwrap();
        std::fs::write(p.join("0-disk.raw.zst"), &zst).unwrap();
        std::fs::write(p.join("vm.json"), b"{}").unwrap();
        write_manifest(&p, &["0-disk.raw.zst", "vm.json"]).unwrap();
        let point = ArchivePoint::read(&p).unwrap();
        assert_eq!(point.data[0].compression, Compression::Zstd);
        let v = verify_point(&point, true, &crate::restore::no_progress()).unwrap();
        assert_eq!(v.content_len_of(&point.data[0]), 3 << 20);
        assert_eq!(full_status(&point), ChecksumStatus::Verified);

        // One flipped byte is found and the file named.
        let mut bad = zst.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        std::fs::write(p.join("0-disk.raw.zst"), &bad).unwrap();
        let e = verify_point(&point, true, &crate::restore::no_progress()).unwrap_err();
        assert!(e.to_string().contains("0-disk.raw.zst"), "{e}");
        assert!(matches!(
            full_status(&point),
            ChecksumStatus::Damaged { .. }
        ));

        // A missing listed file is named too.
        std::fs::write(p.join("0-disk.raw.zst"), &zst).unwrap();
        std::fs::remove_file(p.join("vm.json")).unwrap();
        let e = verify_point(&point, true, &crate::restore::no_progress()).unwrap_err();
        assert!(e.to_string().contains("vm.json"), "{e}");
    }

    #[test]
    fn archive_points_are_checked_by_the_archive() {
        use crate::restore::testing::write_point;
        let dir = tempfile::tempdir().unwrap();
        let content = vec![9u8; 2 << 20];
        let p = write_point(
            dir.path(),
            "vm",
            "cccccccc-0000-0000-0000-000000000003",
            "20261122-010000",
            &[("disk-0.raw", &content, true), ("vm.json", b"{}", false)],
            true,
        );
        let point = ArchivePoint::read(&p).unwrap();
        assert!(point.complete);
        let v = verify_point(&point, true, &crate::restore::no_progress()).unwrap();
        assert_eq!(v.content_len_of(&point.data[0]), 2 << 20);
        let path = p.join("disk-0.raw.zst");
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let e = verify_point(&point, true, &crate::restore::no_progress()).unwrap_err();
        assert!(matches!(e, RestoreError::Damaged { .. }), "{e:?}");
        assert!(e.to_string().contains("disk-0.raw.zst"), "{e}");
    }

    #[test]
    fn unlisted_data_and_missing_manifest_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm").join("t1");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("vm.xva"), b"data").unwrap();
        let point = ArchivePoint::read(&p).unwrap();
        let e = verify_point(&point, true, &crate::restore::no_progress()).unwrap_err();
        assert!(e.to_string().contains(MANIFEST), "{e}");
        std::fs::write(p.join("vm.json"), b"{}").unwrap();
        write_manifest(&p, &["vm.json"]).unwrap();
        let point = ArchivePoint::read(&p).unwrap();
        let e = verify_point(&point, true, &crate::restore::no_progress()).unwrap_err();
        assert!(
            e.to_string().contains("vm.xva") && e.to_string().contains("not listed"),
            "{e}"
        );
        // Unchecked: allowed.
        let v = verify_point(&point, false, &crate::restore::no_progress()).unwrap();
        assert_eq!(v.content_len_of(&point.data[0]), 4);
    }
}
