//! Test helpers: real archive restore points written with the archive
//! writer, so restore is tested against the layout the backup writes.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::archive::FileCompression;
use crate::archive::layout::parse_timestamp;
use crate::archive::{ArchiveWriter, RunInfo, Subject};

/// Writes a restore point of VM `vm` (`uuid`) at `ts` (`YYYYMMDD-HHMMSS`)
/// holding `files` (name, bytes, zstd?). Committed when `commit`, else left
/// partial. Returns its directory.
#[allow(clippy::unwrap_used)]
pub fn write_point(
    root: &Path,
    vm: &str,
    uuid: &str,
    ts: &str,
    files: &[(&str, &[u8], bool)],
    commit: bool,
) -> PathBuf {
    let writer = ArchiveWriter::begin(
        root,
        Subject::vm(uuid, vm),
        RunInfo {
            job: "test".into(),
            run_id: "run-1".into(),
            pool: "pool".into(),
        },
        parse_timestamp(ts).unwrap(),
    )
    .unwrap();
    for (name, bytes, zstd) in files {
        let compression = if *zstd {
            FileCompression::Zstd(3)
        } else {
            FileCompression::None
        };
        let mut f = writer.create_file(name, compression).unwrap();
        f.write_all(bytes).unwrap();
        f.finish().unwrap();
    }
    if commit {
        writer.commit().unwrap().path
    } else {
        let dir = writer.partial_dir().to_path_buf();
        std::mem::forget(writer);
        dir
    }
}
