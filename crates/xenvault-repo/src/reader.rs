//! The reader: a disk of a restore point as extents, chunks fetched in parallel and verified.
//!
//! Chunks are fetched `parallel` at a time and handed out in disk order through a
//! bounded channel; runs of zero chunks come out as one `Zero` extent. Every chunk
//! is authenticated (encrypted) or CRC-checked (plain) and re-hashed against its id.
//! For "write only what differs" into an existing disk, compare ids
//! ([`FixedIndex::differing_chunks`] against a restore point the disk is known to
//! hold, or [`Repository::chunks_differing`] against ids of its current content)
//! and read just those chunks with [`Repository::read_disk_chunks`].

use futures::StreamExt;
use tokio::sync::mpsc;
use xenvault_types::Extent;

use crate::crypto::ChunkId;
use crate::error::{RepoError, Result};
use crate::index::FixedIndex;
use crate::manifest::Manifest;
use crate::repo::Repository;

/// A stream of a disk's extents in increasing offset order.
#[derive(Debug)]
pub struct DiskReader {
    rx: mpsc::Receiver<Result<Extent>>,
    index: std::sync::Arc<FixedIndex>,
    task: tokio::task::JoinHandle<()>,
}

/// Most chunk bytes a disk reader fetches ahead ([`Repository::read_disk_chunks`]).
pub const READ_AHEAD_BYTES: u64 = 32 << 20;

impl DiskReader {
    /// The next extent; `None` at the end. After an error nothing more comes.
    pub async fn next_extent(&mut self) -> Option<Result<Extent>> {
        self.rx.recv().await
    }

    /// The disk's index.
    pub fn index(&self) -> &FixedIndex {
        &self.index
    }
}

impl Drop for DiskReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Repository {
    /// Reads a whole disk of a restore point.
    pub async fn read_disk(
        &self,
        manifest: &Manifest,
        disk: &str,
        parallel: usize,
    ) -> Result<DiskReader> {
        self.read_disk_chunks(manifest, disk, None, parallel).await
    }

    /// Reads only the listed chunk numbers of a disk (all when `None`), as extents.
    pub async fn read_disk_chunks(
        &self,
        manifest: &Manifest,
        disk: &str,
        chunks: Option<Vec<u64>>,
        parallel: usize,
    ) -> Result<DiskReader> {
        let entry = manifest.disk(disk)?;
        let index = self.load_index(&entry.index).await?;
        if index.disk_size != entry.size {
            return Err(RepoError::corrupt(
                &entry.index,
                "index size differs from the manifest",
            ));
        }
        let index = std::sync::Arc::new(index);
        let list: Vec<u64> = match chunks {
            Some(mut l) => {
                l.sort_unstable();
                l.dedup();
                if l.last().is_some_and(|&c| c >= index.ids.len() as u64) {
                    return Err(RepoError::invalid(
                        "chunk list",
                        "a chunk number is beyond the disk",
                    ));
                }
                l
            }
            None => (0..index.ids.len() as u64).collect(),
        };
        // Chunks in flight hold their blob and their plain bytes: at most
        // READ_AHEAD_BYTES of chunks at once, whatever `parallel` asks.
        let cap = (READ_AHEAD_BYTES / u64::from(index.chunk_size).max(1)).max(4) as usize;
        let parallel = parallel.clamp(1, cap);
        let (tx, rx) = mpsc::channel(parallel);
        let repo = self.clone();
        let idx2 = index.clone();
        let task = tokio::spawn(async move {
            let fetches = futures::stream::iter(list).map(|c| {
                let repo = repo.clone();
                let index = idx2.clone();
                async move {
                    let (off, len) = index.chunk_range(c);
                    let id = index.ids[c as usize];
                    if id.is_zero() {
                        return Ok(Extent::zero(off, len));
                    }
                    let data = repo.read_chunk(&id).await?;
                    if data.len() as u64 != len {
                        return Err(RepoError::corrupt(
                            &id.object_key(),
                            format!("chunk has {} bytes where the disk needs {len}", data.len()),
                        ));
                    }
                    Ok(Extent::data(off, data))
                }
            });
            let mut fetches = fetches.buffered(parallel);
            let mut zero_run: Option<Extent> = None;
            while let Some(item) = fetches.next().await {
                match item {
                    Ok(Extent {
                        offset,
                        data: xenvault_types::ExtentData::Zero(n),
                    }) => match &mut zero_run {
                        Some(z) if z.end() == offset => {
                            z.data = xenvault_types::ExtentData::Zero(z.len() + n);
                        }
                        _ => {
                            if let Some(z) = zero_run.replace(Extent::zero(offset, n))
                                && tx.send(Ok(z)).await.is_err()
                            {
                                return;
                            }
                        }
                    },
                    other => {
                        if let Some(z) = zero_run.take()
                            && tx.send(Ok(z)).await.is_err()
                        {
                            return;
                        }
                        let stop = other.is_err();
                        if tx.send(other).await.is_err() || stop {
                            return;
                        }
                    }
                }
            }
            if let Some(z) = zero_run.take() {
                let _ = tx.send(Ok(z)).await;
            }
        });
        Ok(DiskReader { rx, index, task })
    }

    /// Chunk numbers whose stored id differs from `existing` (ids of a target
    /// disk's current chunks, computed with [`Repository::chunk_id`]).
    pub fn chunks_differing(&self, index: &FixedIndex, existing: &[ChunkId]) -> Result<Vec<u64>> {
        if existing.len() != index.ids.len() {
            return Err(RepoError::invalid(
                "existing disk",
                format!(
                    "{} chunk ids where the disk has {}",
                    existing.len(),
                    index.ids.len()
                ),
            ));
        }
        Ok(index
            .ids
            .iter()
            .zip(existing)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64)
            .collect())
    }
}
