//! The checksum manifest `SHA256SUMS`: one `<sha256 hex>  <file name>` line
//! per data and metadata file, exactly what `sha256sum -c SHA256SUMS` checks.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::ArchiveError;

/// One manifest line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Lowercase hex SHA-256 of the file as stored.
    pub sha256: String,
    /// The file name, relative to the restore point.
    pub name: String,
}

/// True when `name` may name a file of a restore point: one path component,
/// printable ASCII without `\`, not hidden, not the manifest or the marker.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
        && name != super::layout::MANIFEST
        && name != super::layout::COMPLETE_MARKER
}

/// Renders the manifest, entries sorted by name.
pub fn render(entries: &[ManifestEntry]) -> String {
    let mut sorted: Vec<&ManifestEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted
        .iter()
        .map(|e| format!("{}  {}\n", e.sha256, e.name))
        .collect()
}

/// Parses a manifest (both `sha256sum` modes: `  name` and ` *name`).
pub fn parse(text: &str, path: &Path) -> Result<Vec<ManifestEntry>, ArchiveError> {
    let corrupt = |line_no: usize, what: &str| ArchiveError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("line {line_no}: {what}"),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (hash, rest) = line
            .split_once(' ')
            .ok_or_else(|| corrupt(i + 1, "expected `<sha256>  <name>`"))?;
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .ok_or_else(|| corrupt(i + 1, "expected two spaces or ` *` after the hash"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(corrupt(i + 1, "the hash is not 64 hex digits"));
        }
        if !valid_file_name(name) {
            return Err(corrupt(i + 1, &format!("bad file name {name:?}")));
        }
        out.push(ManifestEntry {
            sha256: hash.to_ascii_lowercase(),
            name: name.to_string(),
        });
    }
    Ok(out)
}

/// SHA-256 (hex) and length of everything `reader` yields.
pub fn hash_reader(mut reader: impl Read, path: &Path) -> Result<(String, u64), ArchiveError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ArchiveError::io("read", path, e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// SHA-256 (hex) and length of a file.
pub fn hash_file(path: &Path) -> Result<(String, u64), ArchiveError> {
    let file = std::fs::File::open(path).map_err(|e| ArchiveError::io("open", path, e))?;
    hash_reader(file, path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn render_parse_round_trip() {
        let entries = vec![
            ManifestEntry {
                sha256: "b".repeat(64),
                name: "vm.xva".into(),
            },
            ManifestEntry {
                sha256: "a".repeat(64),
                name: "vm.cfg".into(),
            },
        ];
        let text = render(&entries);
        assert!(text.starts_with(&format!("{}  vm.cfg\n", "a".repeat(64))));
        let back = parse(&text, Path::new("x")).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].name, "vm.xva");
        let binary = format!("{} *vm.xva\n", "c".repeat(64));
        assert_eq!(parse(&binary, Path::new("x")).unwrap()[0].name, "vm.xva");
        assert!(parse("abc  vm.xva\n", Path::new("x")).is_err());
        assert!(parse(&format!("{}  ../etc\n", "c".repeat(64)), Path::new("x")).is_err());
    }

    #[test]
    fn names() {
        assert!(valid_file_name("disk-0.vhd.zst"));
        assert!(!valid_file_name("a/b"));
        assert!(!valid_file_name(".lock"));
        assert!(!valid_file_name("SHA256SUMS"));
        assert!(!valid_file_name("with space"));
    }
}
