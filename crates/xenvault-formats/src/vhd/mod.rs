//! VHD (dynamic, differencing, fixed): footer, header, BAT, bitmaps; push decoder and
//! streaming encoder, as XAPI, blktap and qemu write them. No I/O.
//!
//! # Reading a stream (e.g. `GET /export_raw_vdi?format=vhd[&base=]`)
//!
//! Feed the body to a [`VhdDecoder`] in pieces of any size; each call returns the
//! [`Extent`](xenvault_types::Extent)s it completed, in increasing virtual offset order.
//! A dynamic disk is covered entirely by data and zero extents (an unallocated block or
//! a sector absent from its block's bitmap is zero). A differencing disk yields only the
//! sectors it holds; the rest belongs to its parent, named by [`VhdDecoder::parent`].
//! [`VhdDecoder::finish`] checks the trailing footer; until it returns `Ok` the
//! extents are unverified. Data extents are not zero-detected: xapi writes whole
//! 2 MiB blocks with every sector present, zeros included, so a caller that stores
//! sparsely should test them with
//! [`is_all_zero`](xenvault_types::extent::is_all_zero). Zero extents never touch:
//! adjacent ones are merged.
//!
//! ```
//! use xenvault_formats::vhd::{VhdDecoder, VhdSpec, encode_extents};
//! use xenvault_types::Extent;
//!
//! let spec = VhdSpec::dynamic(4 << 20, uuid::Uuid::from_u128(1));
//! let vhd = encode_extents(spec, &[Extent::data(2 << 20, vec![7; 4096])]).unwrap();
//! let mut dec = VhdDecoder::new();
//! let mut extents = Vec::new();
//! for piece in vhd.chunks(65536) {
//!     extents.extend(dec.feed(piece).unwrap());
//! }
//! extents.extend(dec.finish().unwrap());
//! assert_eq!(extents[0], Extent::zero(0, 2 << 20));
//! // A dynamic block is written whole (all sectors present), as xapi does.
//! assert_eq!((extents[1].offset, extents[1].len()), (2 << 20, 2 << 20));
//! assert_eq!(extents.len(), 2);
//! ```
//!
//! The decoder needs the blocks in an order it can emit: streams from xapi and from
//! [`VhdEncoder`] store them ascending. Files from other tools may not; the decoder
//! holds early blocks back up to [`DecoderOptions::max_reorder_bytes`] (64 MiB by
//! default, checked as soon as the BAT is read). A caller that can seek should use
//! [`VhdLayout`] instead: read the footer, the header and the BAT, then read each block
//! at its [`BlockLocation`] in any order and decode it with
//! [`VhdLayout::block_extents`]. Fixed disks are supported by both (their only footer
//! is the last 512 bytes).
//!
//! # Writing (e.g. the simulator's `export_raw_vdi?format=vhd`, restores, deltas)
//!
//! A [`VhdEncoder`] needs the allocated blocks up front, because the BAT precedes the
//! data: write [`VhdEncoder::prologue`], then each allocated block in ascending order,
//! then [`VhdEncoder::finish`]. The layout is xapi's (footer copy at 0, header at 512,
//! BAT at 2048 or after the parent locator data, blocks ascending, footer); we add
//! blktap's batmap after the BAT. [`encode_extents`] / [`encode_extents_to`] do all of
//! this for a list of extents.
//!
//! # Differencing disks
//!
//! [`overlay`] lays a child's extents over its parent's; [`coalesce`] folds a chain.
//! XAPI quirks handled here are listed in docs/xapi-notes.md under `## VHD`.

mod decoder;
mod encoder;
mod error;
mod footer;
mod header;
mod layout;
mod overlay;

pub use decoder::{DecoderOptions, MAX_LOCATOR_DATA, ParentInfo, ParentLocatorEntry, VhdDecoder};
pub use encoder::{
    DEFAULT_BLOCK_SIZE, LocatorSpec, MAX_WRITE_VIRTUAL_SIZE, ParentSpec, VhdEncoder, VhdSpec,
    blocks_for_extents, encode_extents, encode_extents_to,
};
pub use error::VhdError;
pub use footer::{
    CREATOR_TAP, CREATOR_VERSION_TAP_1_3, DiskType, FEATURE_RESERVED, FOOTER_COOKIE, FOOTER_SIZE,
    FORMAT_VERSION, Footer, Geometry, NO_DATA_OFFSET,
};
pub use header::{
    BATMAP_COOKIE, BATMAP_VERSION_1_2, BatmapHeader, DynamicHeader, HEADER_COOKIE, HEADER_SIZE,
    HEADER_VERSION, LOCATOR_SLOTS, MAX_PARENT_NAME_UNITS, ParentLocator, PlatformCode,
};
pub use layout::{
    BlockLocation, FIXED_CHUNK, MAX_BLOCK_SIZE, MAX_BLOCKS, MAX_READ_VIRTUAL_SIZE, MIN_BLOCK_SIZE,
    VhdLayout,
};
pub use overlay::{Overlay, coalesce, materialize, overlay};
