//! Zero-copy consumers for the simulator benchmark: an HTTP GET and NBD
//! reads whose payload is moved from the socket to `/dev/null` with
//! `splice(2)` through a pipe, never copied into user space.
//!
//! They measure what the server can serve: the only copy left on the path is
//! the server's own (page cache into the socket), so the rate is the
//! simulator's, not a client's. The other rows of the table (xenvault's client,
//! curl, nbdcopy) add the client's copy and show what a real reader gets.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::fd::OwnedFd;

use anyhow::{Context as _, bail};
use rustix::pipe::SpliceFlags;

/// Bytes moved per `splice` call (also the pipe's size).
const PIPE_BYTES: usize = 1 << 20;

/// A pipe into `/dev/null`: what comes out of the socket goes through it.
struct NullSink {
    read_end: OwnedFd,
    write_end: OwnedFd,
    null: File,
}

impl NullSink {
    fn new() -> anyhow::Result<NullSink> {
        let (read_end, write_end) = rustix::pipe::pipe().context("pipe")?;
        // Bigger pipes mean fewer calls; the default (64 KiB) still works.
        let _ = rustix::pipe::fcntl_setpipe_size(&write_end, PIPE_BYTES);
        let null = File::options()
            .write(true)
            .open("/dev/null")
            .context("/dev/null")?;
        Ok(NullSink {
            read_end,
            write_end,
            null,
        })
    }

    /// Moves exactly `len` bytes from `socket` to `/dev/null`, or up to the
    /// end of the stream when `len` is `None`; returns the bytes moved.
    fn drain(&self, socket: &TcpStream, len: Option<u64>) -> anyhow::Result<u64> {
        let mut moved = 0u64;
        loop {
            let want = match len {
                Some(l) if moved >= l => break,
                Some(l) => (l - moved).min(PIPE_BYTES as u64) as usize,
                None => PIPE_BYTES,
            };
            let n =
                rustix::pipe::splice(socket, None, &self.write_end, None, want, SpliceFlags::MOVE)
                    .context("splice from the socket")?;
            if n == 0 {
                if len.is_some() {
                    bail!("the server closed the connection after {moved} bytes");
                }
                break;
            }
            let mut left = n;
            while left > 0 {
                let m = rustix::pipe::splice(
                    &self.read_end,
                    None,
                    &self.null,
                    None,
                    left,
                    SpliceFlags::MOVE,
                )
                .context("splice to /dev/null")?;
                left -= m;
            }
            moved += n as u64;
        }
        Ok(moved)
    }
}

/// `GET http://addr/path_and_query` with the body spliced to `/dev/null`;
/// returns the body's length. The status must be 200.
pub fn http_get(addr: &str, path_and_query: &str) -> anyhow::Result<u64> {
    let mut socket = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    write!(
        socket,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    // The head is read a byte at a time so that no byte of the body is
    // copied (and the head is small).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if socket.read(&mut byte)? == 0 {
            bail!("the server closed the connection inside the response head");
        }
        head.push(byte[0]);
        if head.len() > 64 << 10 {
            bail!("response head over 64 KiB");
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("GET {path_and_query}: {status}");
    }
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<u64>().ok())
            .flatten()
    });
    NullSink::new()?.drain(&socket, length)
}

/// NBD protocol constants (the NBD protocol document, "Fixed newstyle negotiation").
const NBD_MAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;

/// Reads `[start, end)` of export `name` at `addr` in requests of
/// `request` bytes, `depth` of them in flight, payloads spliced to
/// `/dev/null`; returns the bytes read.
fn nbd_read_range(
    addr: &str,
    name: &str,
    (start, end): (u64, u64),
    request: u64,
    depth: usize,
) -> anyhow::Result<u64> {
    let mut socket = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    socket.set_nodelay(true)?;
    let mut greeting = [0u8; 18];
    socket.read_exact(&mut greeting)?;
    if &greeting[..8] != NBD_MAGIC || &greeting[8..16] != IHAVEOPT {
        bail!("{addr} is not a newstyle NBD server");
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        bail!("{addr} does not speak fixed newstyle NBD");
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE)
        | if no_zeroes {
            u32::from(FLAG_NO_ZEROES)
        } else {
            0
        };
    let mut option = Vec::with_capacity(16 + name.len());
    option.extend_from_slice(&client_flags.to_be_bytes());
    option.extend_from_slice(IHAVEOPT);
    option.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    option.extend_from_slice(&(name.len() as u32).to_be_bytes());
    option.extend_from_slice(name.as_bytes());
    socket.write_all(&option)?;
    let mut export = vec![0u8; if no_zeroes { 10 } else { 134 }];
    socket
        .read_exact(&mut export)
        .context("the server refused the export")?;
    let size = u64::from_be_bytes(export[..8].try_into()?);
    if end > size {
        bail!("the export has {size} bytes, {end} were asked for");
    }

    let sink = NullSink::new()?;
    let request_of = |handle: u64, offset: u64, len: u32, kind: u16| {
        let mut r = [0u8; 28];
        r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r[6..8].copy_from_slice(&kind.to_be_bytes());
        r[8..16].copy_from_slice(&handle.to_be_bytes());
        r[16..24].copy_from_slice(&offset.to_be_bytes());
        r[24..28].copy_from_slice(&len.to_be_bytes());
        r
    };
    let mut sent = start;
    let mut in_flight = std::collections::VecDeque::new();
    let mut read = 0u64;
    loop {
        while in_flight.len() < depth.max(1) && sent < end {
            let len = request.min(end - sent);
            socket.write_all(&request_of(sent, sent, len as u32, CMD_READ))?;
            in_flight.push_back((sent, len));
            sent += len;
        }
        let Some((offset, len)) = in_flight.pop_front() else {
            break;
        };
        let mut reply = [0u8; 16];
        socket.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[..4].try_into()?);
        let error = u32::from_be_bytes(reply[4..8].try_into()?);
        let handle = u64::from_be_bytes(reply[8..16].try_into()?);
        if magic != SIMPLE_REPLY_MAGIC || error != 0 || handle != offset {
            bail!(
                "bad NBD reply to the read at {offset}: magic {magic:#x}, error {error}, handle {handle}"
            );
        }
        read += sink.drain(&socket, Some(len))?;
    }
    let _ = socket.write_all(&request_of(0, 0, 0, CMD_DISC));
    Ok(read)
}

/// Reads the whole export (`size` bytes) over `connections` connections,
/// each reading one contiguous share; returns the bytes read.
pub fn nbd_read(
    addr: &str,
    name: &str,
    size: u64,
    connections: usize,
    request: u64,
) -> anyhow::Result<u64> {
    let connections = connections.max(1) as u64;
    // NBD servers take 512-byte multiples up to 32 MiB per request.
    let request = (request.clamp(512, 32 << 20) / 512) * 512;
    let share = size.div_ceil(connections).div_ceil(request) * request;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..connections)
            .map(|i| {
                let range = ((i * share).min(size), ((i + 1) * share).min(size));
                scope.spawn(move || nbd_read_range(addr, name, range, request, 4))
            })
            .collect();
        let mut total = 0;
        for w in workers {
            total += w
                .join()
                .map_err(|_| anyhow::anyhow!("an NBD reader panicked"))??;
        }
        Ok(total)
    })
}
