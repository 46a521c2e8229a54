//! Archive file contents as upload bodies: a data file decompressed on the
//! fly, or one disk extracted from an XVA as raw bytes. The reading runs on a
//! blocking thread and feeds a small bounded channel, so memory stays flat
//! whatever the file size; dropping the stream stops the reader.

use std::io::{self, Read};

use bytes::Bytes;
use futures::Stream;
use xenvault_formats::vhd::Footer;
use xenvault_formats::xva::{OvaXml, XvaDecoder, XvaEvent};
use xenvault_types::ExtentData;

use super::point::{Compression, DataFile};
use super::{ProgressFn, RestoreError, RestorePhase, RestoreProgress};

/// Size of the pieces sent.
const PIECE: usize = 1 << 20;
/// Pieces in flight between the reader thread and the upload.
const DEPTH: usize = 4;
/// Zeros for the holes of raw disks (never copied).
static ZEROS: [u8; PIECE] = [0u8; PIECE];

/// Opens a data file, decompressing it if needed.
pub fn open_content(file: &DataFile) -> Result<Box<dyn Read + Send>, RestoreError> {
    let f = std::fs::File::open(&file.path).map_err(|e| RestoreError::io(&file.path, e))?;
    let reader = io::BufReader::with_capacity(PIECE, f);
    Ok(match file.compression {
        Compression::None => Box::new(reader),
        Compression::Zstd => {
            Box::new(
                zstd::Decoder::with_buffer(reader).map_err(|e| RestoreError::Decode {
                    file: file.path.clone(),
                    problem: format!("not valid zstd data: {e}"),
                })?,
            )
        }
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
    })
}

/// Runs `produce` on a blocking thread; what it sends comes out of the stream.
pub(crate) fn blocking_stream<F>(
    cancel: super::Cancel,
    produce: F,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static
where
    F: FnOnce(&Sink) -> io::Result<()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(DEPTH);
    tokio::task::spawn_blocking(move || {
        let sink = Sink { tx, cancel };
        if let Err(e) = produce(&sink) {
            let _ = sink.tx.blocking_send(Err(e));
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The sending end of a body stream, with the restore's cancel flag.
pub(crate) struct Sink {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    cancel: super::Cancel,
}

/// Sends one piece; an error means the receiver is gone (upload stopped) or
/// the restore was cancelled.
pub(crate) fn send(sink: &Sink, piece: Bytes) -> io::Result<()> {
    if sink.cancel.is_cancelled() {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "the restore was cancelled",
        ));
    }
    sink.tx
        .blocking_send(Ok(piece))
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
}

/// The content of a data file (decompressed), exactly `expected_len` bytes,
/// reporting `Uploading` progress.
pub fn file_stream(
    file: DataFile,
    expected_len: u64,
    progress: ProgressFn,
    cancel: super::Cancel,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    blocking_stream(cancel, move |tx| {
        let mut reader = open_content(&file).map_err(io::Error::other)?;
        let mut done = 0u64;
        loop {
            let mut buf = vec![0u8; PIECE];
            let n = read_full(&mut reader, &mut buf)
                .map_err(|e| io::Error::other(format!("{}: {e}", file.path.display())))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            done += n as u64;
            send(tx, Bytes::from(buf))?;
            progress(RestoreProgress {
                phase: RestorePhase::Uploading,
                done,
                total: expected_len,
            });
        }
        if done != expected_len {
            return Err(io::Error::other(format!(
                "{}: {done} bytes read, {expected_len} expected (the file changed since it was checked)",
                file.path.display()
            )));
        }
        Ok(())
    })
}

/// Reads until `buf` is full or the end.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// One disk of an XVA (by its `ova.xml` id) as raw bytes, `0..size`. Chunk
/// checksums are verified on the way; a damaged chunk ends the stream with an
/// error naming the file.
pub fn xva_disk_stream(
    file: DataFile,
    disk_id: String,
    size: u64,
    progress: ProgressFn,
    cancel: super::Cancel,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    blocking_stream(cancel, move |tx| {
        let path = file.path.clone();
        let bad = |what: String| io::Error::other(format!("{}: {what}", path.display()));
        let mut reader = open_content(&file).map_err(io::Error::other)?;
        let mut decoder = XvaDecoder::new();
        let mut active = false;
        let mut done = 0u64;
        let mut buf = vec![0u8; PIECE];
        loop {
            let n = read_full(&mut reader, &mut buf).map_err(|e| bad(e.to_string()))?;
            if n == 0 {
                decoder.finish().map_err(|e| bad(e.to_string()))?;
                return Err(bad(format!(
                    "the XVA ended before disk {disk_id} was complete"
                )));
            }
            let events = decoder.feed(&buf[..n]).map_err(|e| bad(e.to_string()))?;
            for event in events {
                match event {
                    XvaEvent::DiskStart(d) if d.id == disk_id => active = true,
                    XvaEvent::Extent(extent) if active => {
                        if extent.offset != done {
                            return Err(bad(format!(
                                "disk {disk_id}: data at {} where {done} was expected",
                                extent.offset
                            )));
                        }
                        match extent.data {
                            ExtentData::Data(bytes) => {
                                done += bytes.len() as u64;
                                send(tx, Bytes::from(bytes))?;
                            }
                            ExtentData::Zero(mut len) => {
                                while len > 0 {
                                    let step = len.min(PIECE as u64);
                                    send(tx, Bytes::from_static(&ZEROS[..step as usize]))?;
                                    len -= step;
                                    done += step;
                                }
                            }
                        }
                        progress(RestoreProgress {
                            phase: RestorePhase::Uploading,
                            done,
                            total: size,
                        });
                    }
                    XvaEvent::DiskEnd(d) if d.id == disk_id => {
                        if done != size {
                            return Err(bad(format!(
                                "disk {disk_id} holds {done} bytes, {size} expected"
                            )));
                        }
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
    })
}

/// Reads `ova.xml` from the start of an XVA file (decompressing as needed).
pub fn read_ova_xml(file: &DataFile) -> Result<OvaXml, RestoreError> {
    let bad = |problem: String| RestoreError::Decode {
        file: file.path.clone(),
        problem,
    };
    let mut reader = open_content(file)?;
    let mut decoder = XvaDecoder::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = read_full(&mut reader, &mut buf).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            return Err(bad("the XVA ends before its ova.xml".into()));
        }
        for event in decoder.feed(&buf[..n]).map_err(|e| bad(e.to_string()))? {
            if let XvaEvent::OvaXml(ova) = event {
                return Ok(*ova);
            }
        }
    }
}

/// The virtual size of a disk file: a raw file's content length, or the size
/// in a VHD's leading footer copy.
pub fn disk_virtual_size(file: &DataFile, content_len: u64) -> Result<u64, RestoreError> {
    match file.kind {
        super::point::DataKind::Vhd => {
            let mut reader = open_content(file)?;
            let mut head = [0u8; 512];
            let n =
                read_full(&mut reader, &mut head).map_err(|e| RestoreError::io(&file.path, e))?;
            let footer = Footer::parse(&head[..n], 0).map_err(|e| RestoreError::Decode {
                file: file.path.clone(),
                problem: format!("not a VHD: {e}"),
            })?;
            Ok(footer.current_size)
        }
        _ => Ok(content_len),
    }
}

/// An XVA whose `ova.xml` is rewritten on the way (the rest passes
/// untouched): what [`prepare_xva`] found and made.
#[derive(Debug, Clone)]
pub struct XvaRewrite {
    /// The decoded (and edited) `ova.xml`.
    pub ova: OvaXml,
    /// Bytes of the original `ova.xml` entry (header + data + padding).
    pub old_entry_len: u64,
    /// The new entry (header + data + padding).
    pub new_entry: Vec<u8>,
}

impl XvaRewrite {
    /// The length of the rewritten XVA, given the original's.
    pub fn new_len(&self, content_len: u64) -> u64 {
        content_len - self.old_entry_len + self.new_entry.len() as u64
    }
}

/// Reads the first entry of an XVA (it must be `ova.xml`), applies `edit`
/// to it, and prepares the replacement entry.
pub fn prepare_xva(
    file: &DataFile,
    edit: impl FnOnce(&mut OvaXml),
) -> Result<XvaRewrite, RestoreError> {
    use xenvault_formats::tar;
    let bad = |problem: String| RestoreError::Decode {
        file: file.path.clone(),
        problem,
    };
    let mut reader = open_content(file)?;
    let mut head = [0u8; 512];
    let n = read_full(&mut reader, &mut head).map_err(|e| bad(e.to_string()))?;
    if n < head.len() {
        return Err(bad("shorter than one tar header: not an XVA".into()));
    }
    let name_end = head[..100].iter().position(|b| *b == 0).unwrap_or(100);
    if &head[..name_end] != b"ova.xml" {
        return Err(bad(format!(
            "the first entry is {:?}, not ova.xml: not an XVA",
            String::from_utf8_lossy(&head[..name_end])
        )));
    }
    let size_field = String::from_utf8_lossy(&head[124..136]);
    let size = u64::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
        .map_err(|_| bad(format!("bad ova.xml size field {size_field:?}")))?;
    if size > 64 << 20 {
        return Err(bad(format!("ova.xml of {size} bytes is too large")));
    }
    let mut data = vec![0u8; usize::try_from(size).map_err(|_| bad("ova.xml too large".into()))?];
    let got = read_full(&mut reader, &mut data).map_err(|e| bad(e.to_string()))?;
    if got < data.len() {
        return Err(bad("the XVA ends inside ova.xml".into()));
    }
    let text = String::from_utf8(data).map_err(|_| bad("ova.xml is not UTF-8".into()))?;
    let mut ova = OvaXml::from_xml(&text).map_err(|e| bad(format!("ova.xml: {e}")))?;
    edit(&mut ova);
    let xml = ova.to_xml();
    let mut new_entry = Vec::with_capacity(xml.len() + 1024);
    let mtime = u64::from_str_radix(
        String::from_utf8_lossy(&head[136..148]).trim_matches(|c: char| c == '\0' || c == ' '),
        8,
    )
    .unwrap_or(0);
    new_entry.extend_from_slice(
        &tar::header("ova.xml", xml.len() as u64, mtime).map_err(|e| bad(e.to_string()))?,
    );
    new_entry.extend_from_slice(xml.as_bytes());
    new_entry.extend_from_slice(tar::padding(xml.len() as u64));
    Ok(XvaRewrite {
        ova,
        old_entry_len: 512 + size + tar::padding_len(size) as u64,
        new_entry,
    })
}

/// The XVA with its `ova.xml` entry replaced (see [`prepare_xva`]), exactly
/// `rewrite.new_len(content_len)` bytes.
pub fn rewritten_xva_stream(
    file: DataFile,
    content_len: u64,
    rewrite: &XvaRewrite,
    progress: ProgressFn,
    cancel: super::Cancel,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let new_entry = Bytes::from(rewrite.new_entry.clone());
    let skip = rewrite.old_entry_len;
    let total = rewrite.new_len(content_len);
    blocking_stream(cancel, move |tx| {
        let mut reader = open_content(&file).map_err(io::Error::other)?;
        let mut done = new_entry.len() as u64;
        send(tx, new_entry)?;
        // Skip the original entry.
        let mut left = skip;
        let mut buf = vec![0u8; PIECE];
        while left > 0 {
            let want = left.min(PIECE as u64) as usize;
            let n = read_full(&mut reader, &mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::other(format!(
                    "{}: ended inside ova.xml",
                    file.path.display()
                )));
            }
            left -= n as u64;
        }
        loop {
            let mut piece = vec![0u8; PIECE];
            let n = read_full(&mut reader, &mut piece)
                .map_err(|e| io::Error::other(format!("{}: {e}", file.path.display())))?;
            if n == 0 {
                break;
            }
            piece.truncate(n);
            done += n as u64;
            send(tx, Bytes::from(piece))?;
            progress(RestoreProgress {
                phase: RestorePhase::Uploading,
                done,
                total,
            });
        }
        if done != total {
            return Err(io::Error::other(format!(
                "{}: {done} bytes sent, {total} expected (the file changed since it was checked)",
                file.path.display()
            )));
        }
        Ok(())
    })
}

/// Sets `key` of a struct value (replacing or appending).
pub fn set_field(record: &mut xenvault_types::Value, key: &str, value: xenvault_types::Value) {
    if let xenvault_types::Value::Struct(members) = record {
        match members.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => members.push((key.to_string(), value)),
        }
    }
}

/// Sets `key` to `value` in the map field `field` (created when absent).
pub fn put_map_key(record: &mut xenvault_types::Value, field: &str, key: &str, value: &str) {
    let xenvault_types::Value::Struct(members) = record else {
        return;
    };
    if !members.iter().any(|(k, _)| k == field) {
        members.push((field.to_string(), xenvault_types::Value::Struct(Vec::new())));
    }
    if let Some((_, xenvault_types::Value::Struct(map))) =
        members.iter_mut().find(|(k, _)| k == field)
    {
        map.retain(|(k, _)| k != key);
        map.push((key.to_string(), xenvault_types::Value::str(value)));
    }
}

/// Removes the keys starting with `prefix` from the map field `field`.
pub fn strip_map_keys(record: &mut xenvault_types::Value, field: &str, prefix: &str) {
    if let xenvault_types::Value::Struct(members) = record
        && let Some((_, xenvault_types::Value::Struct(map))) =
            members.iter_mut().find(|(k, _)| k == field)
    {
        map.retain(|(k, _)| !k.starts_with(prefix));
    }
}
