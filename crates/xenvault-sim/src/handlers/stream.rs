//! Streaming plumbing of the data handlers: a blocking producer (disk reads, encoders,
//! compressors) feeding the async socket through a bounded channel, or the socket feeding
//! a blocking consumer; task progress and cancellation; byte counting and stream faults.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::faults::StreamFault;
use crate::http::Conn;
use crate::pool::Pool;

/// Pieces in flight between producer and socket (each up to [`PIPE_PIECE`] bytes).
const PIPE_DEPTH: usize = 8;
/// Size of the pieces a [`PipeWriter`] sends.
pub const PIPE_PIECE: usize = 1 << 20;

/// Zeros for holes, written straight from here (no allocation, no copy).
static ZEROS: [u8; ZERO_RUN] = [0; ZERO_RUN];
const ZERO_RUN: usize = 4 << 20;

/// What travels from the producer to the socket.
pub(crate) enum Piece {
    /// These bytes.
    Bytes(Vec<u8>),
    /// This many zero bytes.
    Zeros(usize),
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Bytes(b) => b.len(),
            Piece::Zeros(n) => *n,
        }
    }
}

/// A `std::io::Write` that hands its bytes to the async side in pieces. Writing fails
/// with `BrokenPipe` once the async side is gone (client disconnected, stream cut).
pub struct PipeWriter {
    tx: mpsc::Sender<Piece>,
    buf: Vec<u8>,
    /// Pieces the socket side has written, handed back for reuse.
    spent: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl PipeWriter {
    fn push(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIPE_PIECE));
        self.tx
            .blocking_send(Piece::Bytes(piece))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the HTTP client is gone"))
    }
}

impl PipeWriter {
    /// A buffer of `len` bytes for [`PipeWriter::send_vec`], reused from a piece already
    /// sent when one is back (its old contents remain: overwrite all of it).
    pub fn buffer(&mut self, len: usize) -> Vec<u8> {
        match self.spent.try_recv() {
            Ok(mut b) => {
                b.resize(len, 0);
                b
            }
            Err(_) => vec![0u8; len],
        }
    }

    /// Hands over a whole piece without copying it (after what is buffered).
    pub fn send_vec(&mut self, piece: Vec<u8>) -> io::Result<()> {
        self.push()?;
        self.tx
            .blocking_send(Piece::Bytes(piece))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the HTTP client is gone"))
    }

    /// Sends `len` zero bytes without materialising them.
    pub fn send_zeros(&mut self, len: usize) -> io::Result<()> {
        self.push()?;
        self.tx
            .blocking_send(Piece::Zeros(len))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the HTTP client is gone"))
    }
}

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() && data.len() >= PIPE_PIECE {
            self.tx
                .blocking_send(Piece::Bytes(data.to_vec()))
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::BrokenPipe, "the HTTP client is gone")
                })?;
            return Ok(data.len());
        }
        let n = data.len().min(PIPE_PIECE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= PIPE_PIECE {
            self.push()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push()
    }
}

/// A `std::io::Read` over body pieces the async side receives from the socket.
/// A premature end of the body reads as EOF; the async side reports why it ended.
pub struct PipeReader {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.cur.len() {
            match self.rx.blocking_recv() {
                Some(piece) => {
                    self.cur = piece;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Task progress of a transfer (`done / total`, updated at each whole percent) and
/// cancellation: [`Progress::advance`] fails with `TASK_CANCELLED` once a client asked
/// to cancel the task.
pub struct Progress {
    pool: Arc<Pool>,
    task: String,
    total: u64,
    done: u64,
    last_percent: u64,
    last_check: Instant,
}

impl Progress {
    /// Progress of `task` over `total` bytes (0 = unknown: progress stays put).
    pub fn new(pool: Arc<Pool>, task: &str, total: u64) -> Progress {
        Progress {
            pool,
            task: task.to_string(),
            total,
            done: 0,
            last_percent: 0,
            last_check: Instant::now(),
        }
    }

    /// Counts `n` more bytes done. The task's progress moves by whole percents, at most
    /// every 200 ms (each update is a database change that event.from watchers see; xapi
    /// itself updates export progress at most every 10 s).
    pub fn advance(&mut self, n: u64) -> Result<(), ApiError> {
        self.done += n;
        if self.last_check.elapsed() < Duration::from_millis(200) {
            return Ok(());
        }
        self.last_check = Instant::now();
        if let Some(pct) = (self.done.min(self.total) * 100).checked_div(self.total)
            && pct > self.last_percent
        {
            self.last_percent = pct;
            // Leave 1.0 to the completion, as xapi does.
            self.pool
                .task_set_progress(&self.task, (pct as f64 / 100.0).min(0.99));
        }
        if self.pool.task_is_cancelling(&self.task) {
            return Err(ApiError::new("TASK_CANCELLED", [self.task.as_str()]));
        }
        Ok(())
    }

    /// Sets a synthetic progress value.
    pub fn set(&self, p: f64) {
        self.pool.task_set_progress(&self.task, p);
    }
}

/// Converts an I/O error of a producer or consumer into the task's error.
pub(crate) fn io_api_error(e: io::Error) -> ApiError {
    ApiError::new("VDI_IO_ERROR", [e.to_string()])
}

/// Paces a stream to `bytes_per_sec` (a fault) and cuts it after `cut_after` bytes.
struct Pacer {
    fault: StreamFault,
    started: Instant,
    bytes: u64,
}

impl Pacer {
    fn new(fault: StreamFault) -> Pacer {
        Pacer {
            fault,
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// How many of the next `len` bytes may pass before the cut (`len` if no cut).
    fn allowance(&self, len: usize) -> usize {
        match self.fault.cut_after {
            Some(cut) => (cut.saturating_sub(self.bytes) as usize).min(len),
            None => len,
        }
    }

    fn is_cut(&self) -> bool {
        self.fault.cut_after.is_some_and(|c| self.bytes >= c)
    }

    async fn passed(&mut self, n: usize) {
        self.bytes += n as u64;
        if let Some(rate) = self.fault.bytes_per_sec.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
}

/// Sends what `produce` writes (on a blocking thread) to the client, then completes the
/// task with the result `produce` returns (an XML-RPC fragment) or fails it. The response
/// head must already be sent. The connection is to be closed afterwards.
pub(crate) async fn send_stream<F>(
    pool: &Arc<Pool>,
    task: &str,
    handler: &'static str,
    conn: &mut Conn,
    produce: F,
) -> io::Result<()>
where
    F: FnOnce(&mut PipeWriter) -> Result<String, ApiError> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Piece>(PIPE_DEPTH);
    let (spent_tx, spent) = std::sync::mpsc::channel::<Vec<u8>>();
    let producer = tokio::task::spawn_blocking(move || {
        let mut w = PipeWriter {
            tx,
            buf: Vec::with_capacity(PIPE_PIECE),
            spent,
        };
        let r = produce(&mut w);
        match r {
            Ok(result) => w.flush().map(|_| result).map_err(io_api_error),
            Err(e) => Err(e),
        }
    });
    let mut pacer = Pacer::new(pool.faults.stream(handler));
    let mut client_error: Option<io::Error> = None;
    let mut cancelled = false;
    let counter = format!("bytes/{handler}");
    // Throttled streams go out in small slices, so the rate is smooth and a cancel or a
    // cut lands between slices.
    let slice = if pacer.fault.bytes_per_sec.is_some() {
        64 * 1024
    } else {
        usize::MAX
    };
    'pieces: while let Some(piece) = rx.recv().await {
        let allowed = pacer.allowance(piece.len());
        let mut at = 0;
        while at < allowed {
            // `task.cancel` sets `cancelling`; the producer may be done already while
            // the socket still drains, so look here too.
            if pool.task_is_cancelling(task) {
                cancelled = true;
                break 'pieces;
            }
            let n = (allowed - at).min(slice);
            let written = match &piece {
                Piece::Bytes(b) => conn.write_all(&b[at..at + n]).await,
                Piece::Zeros(_) => {
                    let mut left = n;
                    let mut r = Ok(());
                    while left > 0 && r.is_ok() {
                        let k = left.min(ZERO_RUN);
                        r = conn.write_all(&ZEROS[..k]).await;
                        left -= k;
                    }
                    r
                }
            };
            if let Err(e) = written {
                client_error = Some(e);
                break 'pieces;
            }
            pool.stats.add(&counter, n as u64);
            pacer.passed(n).await;
            at += n;
        }
        if let Piece::Bytes(b) = piece {
            let _ = spent_tx.send(b);
        }
        if pacer.is_cut() {
            break;
        }
    }
    let _ = conn.flush().await;
    // Stop the producer if we stopped reading.
    drop(rx);
    let outcome = producer.await.unwrap_or_else(|e| {
        Err(ApiError::internal(format!(
            "the {handler} producer failed: {e}"
        )))
    });
    if cancelled {
        tracing::info!(handler, task, "transfer cancelled through its task");
        pool.task_fail(task, &ApiError::new("TASK_CANCELLED", [task]));
        let _ = conn.shutdown().await;
        return Ok(());
    }
    if pacer.is_cut() {
        let cut = pacer.fault.cut_after.unwrap_or(0);
        tracing::info!(handler, cut, "fault injection: stream cut");
        pool.task_fail(
            task,
            &ApiError::new(
                "VDI_IO_ERROR",
                [format!(
                    "stream cut after {cut} bytes (xapi-sim fault injection)"
                )],
            ),
        );
        let _ = conn.shutdown().await;
        return Ok(());
    }
    match (outcome, client_error) {
        (Ok(result), None) => pool.task_complete(task, &result),
        (_, Some(e)) => {
            tracing::info!(handler, "client went away: {e}");
            pool.task_fail(
                task,
                &ApiError::new(
                    "VDI_IO_ERROR",
                    [format!("the client closed the connection: {e}")],
                ),
            );
        }
        (Err(err), None) => {
            tracing::info!(handler, code = %err.code, "stream failed after the 200");
            pool.task_fail(task, &err);
        }
    }
    let _ = conn.shutdown().await;
    Ok(())
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BodyLen {
    /// Exactly this many bytes (`Content-Length`).
    Exactly(u64),
    /// Until the client closes its side.
    UntilEof,
}

/// Why reading the body stopped short.
#[derive(Debug)]
pub(crate) enum BodyEnd {
    /// All of it was read (or EOF for `UntilEof`).
    Complete,
    /// The client closed before `Content-Length` bytes.
    Premature(u64),
    /// A stream fault cut it.
    Cut(u64),
    /// A socket error.
    Error(io::Error),
    /// The consumer stopped reading (it failed or needed no more).
    ConsumerDone,
}

/// Feeds the request body to `consume` (on a blocking thread, reading a [`PipeReader`])
/// and returns what it returned and how the body ended. The task is not touched.
pub(crate) async fn receive_stream<F, T>(
    pool: &Arc<Pool>,
    handler: &'static str,
    conn: &mut Conn,
    len: BodyLen,
    consume: F,
) -> (Result<T, ApiError>, BodyEnd)
where
    F: FnOnce(&mut PipeReader) -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Vec<u8>>(PIPE_DEPTH);
    let mut consumer = tokio::task::spawn_blocking(move || {
        let mut r = PipeReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        };
        consume(&mut r)
    });
    let joined = |r: Result<Result<T, ApiError>, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| {
            Err(ApiError::internal(format!(
                "the {handler} consumer failed: {e}"
            )))
        })
    };
    // An empty body (a client's redirect probe, as XO and xenvault send before a PUT)
    // does not use up a one-shot fault meant for the real upload.
    let fault = match len {
        BodyLen::Exactly(0) => StreamFault::default(),
        _ => pool.faults.stream(handler),
    };
    let mut pacer = Pacer::new(fault);
    let mut read: u64 = 0;
    let mut early: Option<Result<T, ApiError>> = None;
    let end = loop {
        let want = match len {
            BodyLen::Exactly(n) if read >= n => break BodyEnd::Complete,
            BodyLen::Exactly(n) => ((n - read) as usize).min(256 * 1024),
            BodyLen::UntilEof => 256 * 1024,
        };
        let want = pacer.allowance(want);
        if want == 0 {
            break BodyEnd::Cut(read);
        }
        let mut buf = vec![0u8; want];
        // The consumer may finish before the body does (an XVA's tar end arrives while
        // XO's fake 1 PiB Content-Length is far away): stop reading then, or we would
        // wait for bytes the client never sends.
        let n = tokio::select! {
            r = conn.read(&mut buf) => match r {
                Ok(0) => {
                    break match len {
                        BodyLen::Exactly(_) => BodyEnd::Premature(read),
                        BodyLen::UntilEof => BodyEnd::Complete,
                    };
                }
                Ok(n) => n,
                Err(e) => break BodyEnd::Error(e),
            },
            r = &mut consumer => {
                early = Some(joined(r));
                break BodyEnd::ConsumerDone;
            }
        };
        buf.truncate(n);
        read += n as u64;
        pool.stats.add(&format!("bytes/{handler}"), n as u64);
        if tx.send(buf).await.is_err() {
            break BodyEnd::ConsumerDone;
        }
        pacer.passed(n).await;
    };
    drop(tx);
    let result = match early {
        Some(r) => r,
        None => joined(consumer.await),
    };
    (result, end)
}
