//! The plumbing between the async export streams and the synchronous sinks:
//! host decompression (push style) and the blocking sink thread fed through
//! a bounded channel.

use std::io::Write as _;
use std::sync::Arc;

use tokio::sync::mpsc;
use xenvault_types::Extent;

use crate::sink::{
    ArtifactMeta, ArtifactSink, BackupTarget, Committed, DiskMeta, SinkError, VmMeta, VmSink,
};

/// Messages to the VM sink thread.
#[derive(Debug)]
pub(crate) enum SinkMsg {
    Disk(DiskMeta),
    Extent(Extent),
    EndDisk,
    Commit,
    Abort(String),
}

/// Extents in flight between the decoder and the sink (≤ 1 MiB each).
const CHANNEL_DEPTH: usize = 16;

/// A running VM sink on a blocking thread.
pub(crate) struct SinkThread {
    tx: mpsc::Sender<SinkMsg>,
    handle: tokio::task::JoinHandle<Result<Option<Committed>, SinkError>>,
}

impl SinkThread {
    /// Starts `target.begin_vm(meta)` and the loop on a blocking thread.
    pub(crate) fn start(target: Arc<dyn BackupTarget>, meta: VmMeta) -> SinkThread {
        let (tx, mut rx) = mpsc::channel::<SinkMsg>(CHANNEL_DEPTH);
        let handle = tokio::task::spawn_blocking(move || {
            let mut sink: Box<dyn VmSink> = target.begin_vm(&meta)?;
            loop {
                let step = match rx.blocking_recv() {
                    Some(SinkMsg::Disk(d)) => sink.begin_disk(&d),
                    Some(SinkMsg::Extent(e)) => sink.extent(e),
                    Some(SinkMsg::EndDisk) => sink.end_disk(),
                    Some(SinkMsg::Commit) => return sink.commit().map(Some),
                    Some(SinkMsg::Abort(reason)) => {
                        sink.abort(&reason)?;
                        return Ok(None);
                    }
                    None => {
                        sink.abort("the backup stopped before its end")?;
                        return Ok(None);
                    }
                };
                if let Err(e) = step {
                    let _ = sink.abort(&e.to_string());
                    return Err(e);
                }
            }
        });
        SinkThread { tx, handle }
    }

    /// Sends one message; on failure the sink has stopped: its error is
    /// returned by [`SinkThread::finish`].
    pub(crate) async fn send(&self, msg: SinkMsg) -> Result<(), ()> {
        self.tx.send(msg).await.map_err(|_| ())
    }

    /// Sends the last message (commit or abort) and waits for the thread.
    pub(crate) async fn finish(self, last: SinkMsg) -> Result<Option<Committed>, SinkError> {
        let _ = self.tx.send(last).await;
        drop(self.tx);
        match self.handle.await {
            Ok(r) => r,
            Err(e) => Err(SinkError::Other(format!("the sink thread failed: {e}"))),
        }
    }
}

/// Stores a whole byte stream through an [`ArtifactSink`] on a blocking thread.
pub(crate) struct ArtifactThread {
    tx: mpsc::Sender<Option<bytes::Bytes>>,
    handle: tokio::task::JoinHandle<Result<Option<Committed>, SinkError>>,
}

impl ArtifactThread {
    pub(crate) fn start(target: Arc<dyn BackupTarget>, meta: ArtifactMeta) -> ArtifactThread {
        let (tx, mut rx) = mpsc::channel::<Option<bytes::Bytes>>(CHANNEL_DEPTH);
        let handle = tokio::task::spawn_blocking(move || {
            let mut sink: Box<dyn ArtifactSink> = target.begin_artifact(&meta)?;
            loop {
                match rx.blocking_recv() {
                    Some(Some(bytes)) => {
                        if let Err(e) = sink.write(&bytes) {
                            let _ = sink.abort(&e.to_string());
                            return Err(e);
                        }
                    }
                    Some(None) => return sink.commit().map(Some),
                    None => {
                        sink.abort("the transfer stopped before its end")?;
                        return Ok(None);
                    }
                }
            }
        });
        ArtifactThread { tx, handle }
    }

    pub(crate) async fn send(&self, bytes: bytes::Bytes) -> Result<(), ()> {
        self.tx.send(Some(bytes)).await.map_err(|_| ())
    }

    /// Commits (`commit = true`) or aborts, and waits for the thread.
    pub(crate) async fn finish(self, commit: bool) -> Result<Option<Committed>, SinkError> {
        if commit {
            let _ = self.tx.send(None).await;
        }
        drop(self.tx);
        match self.handle.await {
            Ok(r) => r,
            Err(e) => Err(SinkError::Other(format!("the sink thread failed: {e}"))),
        }
    }
}

/// Removes the host's compression of an export, push style.
pub(crate) enum Decompressor {
    None,
    Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Vec<u8>>>),
}

impl Decompressor {
    pub(crate) fn gzip() -> Decompressor {
        Decompressor::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new())))
    }

    pub(crate) fn zstd() -> std::io::Result<Decompressor> {
        Ok(Decompressor::Zstd(Box::new(
            zstd::stream::write::Decoder::new(Vec::new())?,
        )))
    }

    /// Feeds compressed bytes; returns the plain bytes available so far.
    pub(crate) fn feed(&mut self, input: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Decompressor::None => Ok(input.to_vec()),
            Decompressor::Gzip(d) => {
                d.write_all(input)?;
                Ok(std::mem::take(d.get_mut()))
            }
            Decompressor::Zstd(d) => {
                d.write_all(input)?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }

    /// The end of the input: returns what is left.
    pub(crate) fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            Decompressor::None => Ok(Vec::new()),
            Decompressor::Gzip(d) => {
                d.try_finish()?;
                Ok(std::mem::take(d.get_mut()))
            }
            Decompressor::Zstd(d) => {
                d.flush()?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn gzip_and_zstd_round_trip_in_pieces() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&data[..], 3).unwrap();
        for (mut d, packed) in [
            (Decompressor::gzip(), gz),
            (Decompressor::zstd().unwrap(), zs),
            (Decompressor::None, data.clone()),
        ] {
            let mut out = Vec::new();
            for piece in packed.chunks(777) {
                out.extend(d.feed(piece).unwrap());
            }
            out.extend(d.finish().unwrap());
            assert_eq!(out, data);
        }
    }

    #[test]
    fn truncated_gzip_fails_at_finish() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[7u8; 10_000]).unwrap();
        let gz = gz.finish().unwrap();
        let mut d = Decompressor::gzip();
        let _ = d.feed(&gz[..gz.len() / 2]).unwrap();
        assert!(d.finish().is_err());
    }
}
