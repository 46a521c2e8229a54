//! The tar subset XVA uses: ustar header writing and a push parser for reading.
//!
//! XAPI writes XVAs with ocaml-tar (`Tar.Header.make`: mode 0400, uid/gid 0,
//! regular files only); `xva-img package` writes old V7 headers without the
//! `ustar` magic; GNU tar may add directory entries when an XVA is re-packed.
//! The parser accepts all three and refuses the extension headers (pax `x`/`g`,
//! GNU `L`/`K`) rather than risk misreading a size or name they override.
//! See `docs/xapi-notes.md`, "XVA".
//!
//! No I/O: [`TarParser::feed`] takes bytes in arbitrary pieces and reports
//! [`TarItem`]s through a callback; [`header`] and [`padding`] build the
//! bytes of an archive.

/// The tar block size.
pub const BLOCK: usize = 512;

/// The largest size an octal `size` field of 11 digits can hold (8 GiB - 1).
const MAX_OCTAL_SIZE: u64 = 0o77_777_777_777;

/// A tar header or framing problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TarError {
    /// The header's checksum field does not match its bytes.
    #[error(
        "tar header at byte {offset}: checksum {stored} does not match the header bytes \
         ({computed}); the archive is corrupt or not a tar stream"
    )]
    BadChecksum {
        /// Byte offset of the header in the stream.
        offset: u64,
        /// The value the header claims.
        stored: u64,
        /// The unsigned sum of the header bytes.
        computed: u64,
    },
    /// A numeric field holds something other than octal digits.
    #[error("tar header at byte {offset}: field {field} is not a number: {text:?}")]
    BadNumber {
        /// Byte offset of the header in the stream.
        offset: u64,
        /// The field's name.
        field: &'static str,
        /// The field's bytes, lossily decoded.
        text: String,
    },
    /// An entry type this parser does not handle.
    #[error(
        "tar entry {name:?} at byte {offset} has type {typeflag:?}, which an XVA never \
         contains (only regular files and directories are accepted)"
    )]
    UnsupportedType {
        /// Byte offset of the header in the stream.
        offset: u64,
        /// The entry name.
        name: String,
        /// The type flag character.
        typeflag: char,
    },
    /// One zero block followed by a non-zero block.
    #[error("tar stream at byte {offset}: a lone zero block is followed by more data")]
    LoneZeroBlock {
        /// Byte offset of the non-zero block.
        offset: u64,
    },
    /// A name that does not fit a header (writing).
    #[error("tar entry name {0:?} is longer than 100 bytes")]
    NameTooLong(String),
    /// A size that does not fit an octal header field (writing).
    #[error("tar entry size {0} does not fit the 11-digit octal size field")]
    SizeTooLarge(u64),
}

/// One parsed tar header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarHeader {
    /// The entry path (ustar `prefix/name` when a prefix is present).
    pub name: String,
    /// The size of the entry's data in bytes.
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: u64,
    /// True for a directory entry (type `5`).
    pub is_dir: bool,
    /// Byte offset of the header in the stream.
    pub offset: u64,
}

/// What the parser reports while it walks an archive.
#[derive(Debug, PartialEq, Eq)]
pub enum TarItem<'a> {
    /// A new entry starts; its data follows as [`TarItem::Data`] pieces.
    Entry(TarHeader),
    /// A piece of the current entry's data (possibly empty pieces never occur).
    Data(&'a [u8]),
    /// All data of the current entry has been reported.
    EntryEnd,
    /// The end-of-archive marker (two zero blocks) was read. Bytes after it are ignored.
    ArchiveEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a 512-byte header block.
    Header,
    /// Inside an entry's data.
    Data,
    /// Skipping the padding after an entry's data.
    Padding,
    /// One zero block seen; the next must be zero too.
    SecondZero,
    /// The archive has ended.
    Done,
}

/// A push parser for a tar stream: feed bytes, receive [`TarItem`]s.
#[derive(Debug)]
pub struct TarParser {
    state: State,
    block: [u8; BLOCK],
    block_len: usize,
    data_left: u64,
    pad_left: u64,
    /// Bytes consumed so far (for error messages).
    position: u64,
}

impl Default for TarParser {
    fn default() -> Self {
        Self::new()
    }
}

impl TarParser {
    /// A parser at the start of an archive.
    pub fn new() -> TarParser {
        TarParser {
            state: State::Header,
            block: [0; BLOCK],
            block_len: 0,
            data_left: 0,
            pad_left: 0,
            position: 0,
        }
    }

    /// True once the end-of-archive marker has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// True when the parser stands between entries (at a header boundary),
    /// as opposed to inside an entry's data or a header block.
    pub fn at_entry_boundary(&self) -> bool {
        self.state == State::Header && self.block_len == 0
    }

    /// Parses `input`, calling `sink` for every item. Stops at the first error
    /// from the parser or from `sink`. Input after the end of the archive is ignored.
    pub fn feed<E: From<TarError>>(
        &mut self,
        mut input: &[u8],
        sink: &mut dyn FnMut(TarItem<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !input.is_empty() {
            match self.state {
                State::Done => return Ok(()),
                State::Header | State::SecondZero => {
                    let n = (BLOCK - self.block_len).min(input.len());
                    self.block[self.block_len..self.block_len + n].copy_from_slice(&input[..n]);
                    self.block_len += n;
                    input = &input[n..];
                    if self.block_len < BLOCK {
                        continue;
                    }
                    self.block_len = 0;
                    let offset = self.position;
                    self.position += BLOCK as u64;
                    let zero = self.block.iter().all(|&b| b == 0);
                    if self.state == State::SecondZero {
                        if !zero {
                            return Err(TarError::LoneZeroBlock { offset }.into());
                        }
                        self.state = State::Done;
                        sink(TarItem::ArchiveEnd)?;
                        return Ok(());
                    }
                    if zero {
                        self.state = State::SecondZero;
                        continue;
                    }
                    let header = parse_header(&self.block, offset)?;
                    self.data_left = header.size;
                    self.pad_left = padding_len(header.size) as u64;
                    let empty = header.size == 0;
                    sink(TarItem::Entry(header))?;
                    if empty {
                        sink(TarItem::EntryEnd)?;
                        self.state = State::Header;
                    } else {
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let n = usize::try_from(self.data_left)
                        .unwrap_or(usize::MAX)
                        .min(input.len());
                    let (piece, rest) = input.split_at(n);
                    input = rest;
                    self.data_left -= n as u64;
                    self.position += n as u64;
                    sink(TarItem::Data(piece))?;
                    if self.data_left == 0 {
                        sink(TarItem::EntryEnd)?;
                        self.state = if self.pad_left > 0 {
                            State::Padding
                        } else {
                            State::Header
                        };
                    }
                }
                State::Padding => {
                    let n = usize::try_from(self.pad_left)
                        .unwrap_or(usize::MAX)
                        .min(input.len());
                    input = &input[n..];
                    self.pad_left -= n as u64;
                    self.position += n as u64;
                    if self.pad_left == 0 {
                        self.state = State::Header;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Parses one non-zero header block.
fn parse_header(block: &[u8; BLOCK], offset: u64) -> Result<TarHeader, TarError> {
    let stored = parse_number(&block[148..156], offset, "chksum")?;
    let unsigned: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    // Some old writers summed signed chars; GNU tar accepts both.
    let signed: i64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                i64::from(b as i8)
            }
        })
        .sum();
    if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
        return Err(TarError::BadChecksum {
            offset,
            stored,
            computed: unsigned,
        });
    }
    let name = c_string(&block[0..100]);
    let magic = &block[257..263];
    let name = if magic == b"ustar\0" && block[345] != 0 {
        format!("{}/{}", c_string(&block[345..500]), name)
    } else {
        name
    };
    let size = parse_number(&block[124..136], offset, "size")?;
    let mtime = parse_number(&block[136..148], offset, "mtime")?;
    let typeflag = block[156];
    let is_dir = match typeflag {
        b'0' | 0 | b'7' => false,
        b'5' => true,
        other => {
            return Err(TarError::UnsupportedType {
                offset,
                name,
                typeflag: char::from(other),
            });
        }
    };
    Ok(TarHeader {
        name,
        size,
        mtime,
        is_dir,
        offset,
    })
}

/// A NUL-terminated field as text (lossy).
fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// An octal field (leading spaces, terminated by NUL or space), or GNU base-256.
fn parse_number(field: &[u8], offset: u64, name: &'static str) -> Result<u64, TarError> {
    let bad = || TarError::BadNumber {
        offset,
        field: name,
        text: String::from_utf8_lossy(field).into_owned(),
    };
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        // Base-256: big-endian binary after the marker bit; negative values are refused.
        if field[0] & 0x40 != 0 {
            return Err(bad());
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            v = v.checked_mul(256).ok_or_else(bad)? | u64::from(b);
        }
        return Ok(v);
    }
    let mut v: u64 = 0;
    let mut seen_digit = false;
    for &b in field {
        match b {
            b' ' if !seen_digit => continue,
            b'0'..=b'7' => {
                seen_digit = true;
                v = v
                    .checked_mul(8)
                    .and_then(|v| v.checked_add(u64::from(b - b'0')))
                    .ok_or_else(bad)?;
            }
            0 | b' ' => break,
            _ => return Err(bad()),
        }
    }
    Ok(v)
}

/// Bytes of zero padding after `size` bytes of data.
pub fn padding_len(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// The zero padding after `size` bytes of data.
pub fn padding(size: u64) -> &'static [u8] {
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    &ZEROS[..padding_len(size)]
}

/// The end-of-archive marker: two zero blocks.
pub fn end_of_archive() -> [u8; 2 * BLOCK] {
    [0; 2 * BLOCK]
}

/// Writes `value` as zero-padded octal into `field`, NUL-terminated.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

/// A ustar header for a regular file, as ocaml-tar's `Header.make` would write
/// it for XAPI: mode 0400, uid and gid 0, empty user and group names.
pub fn header(name: &str, size: u64, mtime: u64) -> Result<[u8; BLOCK], TarError> {
    if name.len() > 100 {
        return Err(TarError::NameTooLong(name.to_string()));
    }
    if size > MAX_OCTAL_SIZE {
        return Err(TarError::SizeTooLarge(size));
    }
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[100..108], 0o400);
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    put_octal(&mut h[124..136], size);
    put_octal(&mut h[136..148], mtime.min(MAX_OCTAL_SIZE));
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    put_octal(&mut h[329..337], 0);
    put_octal(&mut h[337..345], 0);
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    Ok(h)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn collect(bytes: &[u8], step: usize) -> Result<Vec<String>, TarError> {
        let mut p = TarParser::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(step.max(1)) {
            p.feed(piece, &mut |item: TarItem<'_>| -> Result<(), TarError> {
                out.push(match item {
                    TarItem::Entry(h) => format!("E {} {}", h.name, h.size),
                    TarItem::Data(d) => format!("D {}", d.len()),
                    TarItem::EntryEnd => "/".to_string(),
                    TarItem::ArchiveEnd => "END".to_string(),
                });
                Ok(())
            })?;
        }
        Ok(out)
    }

    fn archive() -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&header("ova.xml", 3, 1234).unwrap());
        a.extend_from_slice(b"abc");
        a.extend_from_slice(padding(3));
        a.extend_from_slice(&header("Ref:1/00000000", 0, 0).unwrap());
        a.extend_from_slice(&end_of_archive());
        a
    }

    #[test]
    fn round_trip_and_split_feeding() {
        let a = archive();
        let bulk = collect(&a, a.len()).unwrap();
        assert_eq!(
            bulk,
            ["E ova.xml 3", "D 3", "/", "E Ref:1/00000000 0", "/", "END"]
        );
        let bytewise = collect(&a, 1).unwrap();
        let joined: Vec<String> = bytewise
            .into_iter()
            .filter(|s| !s.starts_with('D'))
            .collect();
        assert_eq!(
            joined,
            ["E ova.xml 3", "/", "E Ref:1/00000000 0", "/", "END"]
        );
    }

    #[test]
    fn header_checksum_field_is_the_byte_sum() {
        let h = header("Ref:10/00000001.xxhash", 16, 0).unwrap();
        let parsed = parse_header(&h, 0).unwrap();
        assert_eq!(parsed.name, "Ref:10/00000001.xxhash");
        assert_eq!(parsed.size, 16);
        assert_eq!(
            &h[148..156],
            format!("{:06o}\0 ", {
                let mut c = h;
                c[148..156].fill(b' ');
                c.iter().map(|&b| u64::from(b)).sum::<u64>()
            })
            .as_bytes()
        );
    }

    #[test]
    fn corrupt_header_is_an_error() {
        let mut a = archive();
        a[10] ^= 0x40;
        assert!(matches!(
            collect(&a, 7),
            Err(TarError::BadChecksum { offset: 0, .. })
        ));
    }

    #[test]
    fn lone_zero_block_then_data_is_an_error() {
        let mut a = vec![0u8; BLOCK];
        a.extend_from_slice(&header("x", 0, 0).unwrap());
        assert!(matches!(
            collect(&a, 100),
            Err(TarError::LoneZeroBlock { offset: 512 })
        ));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"  0017 \0", 0, "f").unwrap(), 15);
        assert_eq!(parse_number(b"\0\0\0\0", 0, "f").unwrap(), 0);
        assert_eq!(parse_number(&[0x80, 0, 0, 1, 0], 0, "f").unwrap(), 256);
        assert!(parse_number(b"12x4", 0, "f").is_err());
        assert!(parse_number(&[0xff; 12], 0, "f").is_err());
    }

    #[test]
    fn extension_headers_are_refused() {
        let mut h = header("PaxHeaders/x", 0, 0).unwrap();
        h[156] = b'x';
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert!(matches!(
            parse_header(&h, 0),
            Err(TarError::UnsupportedType { typeflag: 'x', .. })
        ));
    }
}
