//! The dynamic-disk header (1024 bytes), parent locators and blktap's batmap header.
//!
//! Layout: docs/xapi-notes.md `## VHD` (xapi-facts.md §5.2, §5.3; blktap `include/vhd.h`).

use uuid::Uuid;

use super::VhdError;
use super::footer::{be32, be64, checksum_skipping};

/// Size of the dynamic header in bytes.
pub const HEADER_SIZE: usize = 1024;
/// The dynamic header's magic cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Header version written and accepted (major 1).
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Number of parent locator slots in the header.
pub const LOCATOR_SLOTS: usize = 8;
/// Longest parent unicode name, in UTF-16 code units (512 bytes).
pub const MAX_PARENT_NAME_UNITS: usize = 256;
/// blktap batmap cookie.
pub const BATMAP_COOKIE: &[u8; 8] = b"tdbatmap";
/// Batmap version blktap 1.3 writes (unsigned-byte checksum).
pub const BATMAP_VERSION_1_2: u32 = 0x0001_0002;

const CHECKSUM_AT: usize = 36;

/// A parent locator platform code (`W2RU`, `W2KU`, `MacX`, …); unknown codes are kept as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PlatformCode(pub u32);

impl PlatformCode {
    /// Unused slot.
    pub const NONE: PlatformCode = PlatformCode(0);
    /// Windows relative path, UTF-16LE.
    pub const W2RU: PlatformCode = PlatformCode(0x5732_7275);
    /// Windows absolute path, UTF-16LE.
    pub const W2KU: PlatformCode = PlatformCode(0x5732_6B75);
    /// `file://` URL, UTF-8 (what xapi and blktap write).
    pub const MACX: PlatformCode = PlatformCode(0x4D61_6358);
    /// Deprecated Windows relative path.
    pub const WI2R: PlatformCode = PlatformCode(0x5769_3272);
    /// Deprecated Windows absolute path.
    pub const WI2K: PlatformCode = PlatformCode(0x5769_326B);
    /// Deprecated Mac OS alias blob.
    pub const MAC: PlatformCode = PlatformCode(0x4D61_6320);

    /// The four ASCII letters of the code (`"MacX"`), or hex when not printable.
    pub fn name(self) -> String {
        let b = self.0.to_be_bytes();
        if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
            String::from_utf8_lossy(&b).into_owned()
        } else {
            format!("{:#010x}", self.0)
        }
    }
}

/// One of the header's eight parent locator entries (where to find the parent's path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// How the locator data is encoded.
    pub platform: PlatformCode,
    /// Space reserved for the data: sectors per specification; some writers store
    /// bytes, so values below 512 are read as sectors (blktap `vhd_parent_locator_size`).
    pub data_space: u32,
    /// Length of the locator data in bytes.
    pub data_len: u32,
    /// Absolute offset of the locator data.
    pub data_offset: u64,
}

impl ParentLocator {
    /// True when the slot is unused.
    pub fn is_unused(&self) -> bool {
        self.platform == PlatformCode::NONE
    }

    /// Reserved space in bytes (see [`ParentLocator::data_space`]).
    pub fn data_space_bytes(&self) -> u64 {
        if self.data_space < 512 {
            u64::from(self.data_space) * 512
        } else {
            u64::from(self.data_space)
        }
    }

    /// Decodes locator data into a path: `MacX` is a UTF-8 `file://` URL (the prefix is
    /// removed), `W2RU`/`W2KU` are UTF-16LE. `None` for other codes, undecodable data
    /// or an empty path (xapi's delta exports leave the locator sector zeroed).
    pub fn decode_path(&self, data: &[u8]) -> Option<String> {
        let data = data.get(..self.data_len as usize).unwrap_or(data);
        let path = match self.platform {
            PlatformCode::MACX => {
                let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
                Some(s.strip_prefix("file://").unwrap_or(s).to_owned())
            }
            PlatformCode::W2RU | PlatformCode::W2KU => {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&u| u != 0)
                    .collect();
                String::from_utf16(&units).ok()
            }
            _ => None,
        };
        // xapi's delta exports point locator 0 at a zeroed sector: no path.
        path.filter(|p| !p.is_empty())
    }

    /// Encodes a path for this platform code: `MacX` gets a `file://` prefix unless it
    /// has one; `W2RU`/`W2KU` become UTF-16LE.
    pub fn encode_path(platform: PlatformCode, path: &str) -> Result<Vec<u8>, VhdError> {
        match platform {
            PlatformCode::MACX => Ok(if path.starts_with("file://") {
                path.as_bytes().to_vec()
            } else {
                format!("file://{path}").into_bytes()
            }),
            PlatformCode::W2RU | PlatformCode::W2KU => {
                Ok(path.encode_utf16().flat_map(u16::to_le_bytes).collect())
            }
            other => Err(VhdError::InvalidInput(format!(
                "parent locator platform {} cannot be written; use MacX, W2RU or W2KU",
                other.name()
            ))),
        }
    }
}

/// The 1024-byte dynamic-disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Unused by the format (all ones).
    pub data_offset: u64,
    /// Absolute offset of the BAT.
    pub table_offset: u64,
    /// Header version (0x00010000).
    pub header_version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes (2 MiB everywhere in XAPI).
    pub block_size: u32,
    /// Differencing disks: the parent's footer unique id.
    pub parent_unique_id: Uuid,
    /// Differencing disks: the parent's modification time (seconds since 2000).
    pub parent_timestamp: u32,
    /// Differencing disks: the parent's name (stored UTF-16BE; decoded lossily).
    pub parent_unicode_name: String,
    /// The eight parent locator slots.
    pub parent_locators: [ParentLocator; LOCATOR_SLOTS],
}

impl DynamicHeader {
    /// Parses and checks a header. `at` is its offset in the file, used in errors.
    pub fn parse(bytes: &[u8], at: u64) -> Result<DynamicHeader, VhdError> {
        let b = bytes.get(..HEADER_SIZE).ok_or_else(|| {
            VhdError::Truncated(format!(
                "dynamic header at byte {at} needs {HEADER_SIZE} bytes, only {} present",
                bytes.len()
            ))
        })?;
        if &b[..8] != HEADER_COOKIE {
            return Err(VhdError::BadCookie {
                structure: "dynamic header",
                offset: at,
                found: String::from_utf8_lossy(&b[..8]).into_owned(),
                expected: "cxsparse",
            });
        }
        let stored = be32(b, CHECKSUM_AT);
        let computed = checksum_skipping(b, CHECKSUM_AT);
        if stored != computed {
            return Err(VhdError::BadChecksum {
                structure: "dynamic header",
                offset: at,
                field_offset: at + CHECKSUM_AT as u64,
                stored,
                computed,
            });
        }
        let header_version = be32(b, 24);
        if header_version >> 16 != 1 {
            return Err(VhdError::BadField {
                structure: "dynamic header",
                field: "header_version",
                offset: at + 24,
                reason: format!("{header_version:#010x}: only major version 1 exists"),
            });
        }
        let mut uid = [0u8; 16];
        uid.copy_from_slice(&b[40..56]);
        let mut parent_locators = [ParentLocator::default(); LOCATOR_SLOTS];
        for (i, loc) in parent_locators.iter_mut().enumerate() {
            let o = 576 + 24 * i;
            *loc = ParentLocator {
                platform: PlatformCode(be32(b, o)),
                data_space: be32(b, o + 4),
                data_len: be32(b, o + 8),
                data_offset: be64(b, o + 16),
            };
        }
        Ok(DynamicHeader {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            header_version,
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            parent_unique_id: Uuid::from_bytes(uid),
            parent_timestamp: be32(b, 56),
            parent_unicode_name: decode_utf16be_name(&b[64..576]),
            parent_locators,
        })
    }

    /// Serializes the header with a freshly computed checksum. Fails when the parent
    /// name needs more than [`MAX_PARENT_NAME_UNITS`] UTF-16 code units.
    pub fn to_bytes(&self) -> Result<[u8; HEADER_SIZE], VhdError> {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(self.parent_unique_id.as_bytes());
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        let units: Vec<u16> = self.parent_unicode_name.encode_utf16().collect();
        if units.len() > MAX_PARENT_NAME_UNITS {
            return Err(VhdError::InvalidInput(format!(
                "parent unicode name is {} UTF-16 units long; the header holds at most {MAX_PARENT_NAME_UNITS}",
                units.len()
            )));
        }
        for (i, u) in units.iter().enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, loc) in self.parent_locators.iter().enumerate() {
            let o = 576 + 24 * i;
            b[o..o + 4].copy_from_slice(&loc.platform.0.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&loc.data_space.to_be_bytes());
            b[o + 8..o + 12].copy_from_slice(&loc.data_len.to_be_bytes());
            b[o + 16..o + 24].copy_from_slice(&loc.data_offset.to_be_bytes());
        }
        let sum = checksum_skipping(&b, CHECKSUM_AT);
        b[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&sum.to_be_bytes());
        Ok(b)
    }

    /// Size of the sector bitmap that precedes each block's data: one bit per
    /// sector, rounded up to whole sectors (512 bytes for 2 MiB blocks).
    pub fn bitmap_len(&self) -> u64 {
        bitmap_len_for(self.block_size)
    }

    /// Bytes the BAT occupies, padded to a sector.
    pub fn bat_len_padded(&self) -> u64 {
        (u64::from(self.max_table_entries) * 4).div_ceil(512) * 512
    }
}

/// Sector-bitmap length for a block size: block_size/512 bits, padded to 512 bytes.
pub(crate) fn bitmap_len_for(block_size: u32) -> u64 {
    (u64::from(block_size) / 512)
        .div_ceil(8)
        .div_ceil(512)
        .max(1)
        * 512
}

/// Decodes the header's UTF-16BE parent name: stops at the first NUL, skips a
/// big-endian BOM and reads a little-endian one as xapi does (f.ml `UTF16.unmarshal`).
fn decode_utf16be_name(raw: &[u8]) -> String {
    let mut units: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let mut little_endian = false;
    match units.first() {
        Some(0xFEFF) => {
            units.remove(0);
        }
        Some(0xFFFE) => {
            units.remove(0);
            little_endian = true;
        }
        _ => {}
    }
    if little_endian {
        for u in &mut units {
            *u = u.swap_bytes();
        }
    }
    let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    String::from_utf16_lossy(&units[..end])
}

/// blktap's batmap header (512 bytes at `table_offset` + padded BAT size): one bit per
/// block, set when the block is fully allocated. Written by our encoder; ignored on read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatmapHeader {
    /// Absolute offset of the batmap bits.
    pub batmap_offset: u64,
    /// Size of the batmap in sectors.
    pub batmap_size: u32,
    /// Batmap version ([`BATMAP_VERSION_1_2`]).
    pub version: u32,
    /// Ones' complement of the byte sum of the batmap.
    pub checksum: u32,
    /// Generic marker byte (0).
    pub marker: u8,
}

impl BatmapHeader {
    /// Parses a batmap header (cookie checked; the checksum covers the map, not the header).
    pub fn parse(bytes: &[u8], at: u64) -> Result<BatmapHeader, VhdError> {
        let b = bytes.get(..512).ok_or_else(|| {
            VhdError::Truncated(format!("batmap header at byte {at} needs 512 bytes"))
        })?;
        if &b[..8] != BATMAP_COOKIE {
            return Err(VhdError::BadCookie {
                structure: "batmap header",
                offset: at,
                found: String::from_utf8_lossy(&b[..8]).into_owned(),
                expected: "tdbatmap",
            });
        }
        Ok(BatmapHeader {
            batmap_offset: be64(b, 8),
            batmap_size: be32(b, 16),
            version: be32(b, 20),
            checksum: be32(b, 24),
            marker: b[28],
        })
    }

    /// Serializes the header into one sector.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(BATMAP_COOKIE);
        b[8..16].copy_from_slice(&self.batmap_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.batmap_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.version.to_be_bytes());
        b[24..28].copy_from_slice(&self.checksum.to_be_bytes());
        b[28] = self.marker;
        b
    }

    /// The checksum of a batmap (ones' complement of the unsigned byte sum).
    pub fn checksum_of(map: &[u8]) -> u32 {
        !map.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> DynamicHeader {
        let mut locs = [ParentLocator::default(); LOCATOR_SLOTS];
        locs[0] = ParentLocator {
            platform: PlatformCode::MACX,
            data_space: 1,
            data_len: 20,
            data_offset: 1536,
        };
        DynamicHeader {
            data_offset: u64::MAX,
            table_offset: 2048,
            header_version: HEADER_VERSION,
            max_table_entries: 3,
            block_size: 2 << 20,
            parent_unique_id: Uuid::from_u128(42),
            parent_timestamp: 5,
            parent_unicode_name: "päränt.vhd 🦀".into(),
            parent_locators: locs,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = h.to_bytes().unwrap();
        assert_eq!(DynamicHeader::parse(&b, 512).unwrap(), h);
        let mut bad = b;
        bad[700] ^= 4;
        match DynamicHeader::parse(&bad, 512) {
            Err(VhdError::BadChecksum { field_offset, .. }) => assert_eq!(field_offset, 548),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.bitmap_len(), 512);
        assert_eq!(h.bat_len_padded(), 512);
    }

    #[test]
    fn name_too_long_is_refused() {
        let mut h = sample();
        h.parent_unicode_name = "x".repeat(257);
        assert!(h.to_bytes().is_err());
        h.parent_unicode_name = "x".repeat(256);
        let b = h.to_bytes().unwrap();
        assert_eq!(
            DynamicHeader::parse(&b, 0)
                .unwrap()
                .parent_unicode_name
                .len(),
            256
        );
    }

    #[test]
    fn locator_paths() {
        let l = ParentLocator {
            platform: PlatformCode::MACX,
            data_space: 1,
            data_len: 16,
            data_offset: 0,
        };
        let d = ParentLocator::encode_path(PlatformCode::MACX, "./a/b.vhd").unwrap();
        assert_eq!(d, b"file://./a/b.vhd");
        assert_eq!(l.decode_path(&d).unwrap(), "./a/b.vhd");
        let w = ParentLocator::encode_path(PlatformCode::W2RU, ".\\b.vhd").unwrap();
        let lw = ParentLocator {
            platform: PlatformCode::W2RU,
            data_len: w.len() as u32,
            ..l
        };
        assert_eq!(lw.decode_path(&w).unwrap(), ".\\b.vhd");
        assert_eq!(
            ParentLocator {
                data_space: 4096,
                ..l
            }
            .data_space_bytes(),
            4096
        );
        assert_eq!(l.data_space_bytes(), 512);
    }

    #[test]
    fn bitmap_lengths() {
        assert_eq!(bitmap_len_for(2 << 20), 512);
        assert_eq!(bitmap_len_for(4096), 512);
        assert_eq!(bitmap_len_for(16 << 20), 4096);
    }
}
