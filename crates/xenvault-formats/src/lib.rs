//! Disk and archive formats XAPI speaks: VHD, XVA and raw.
//!
//! Decoders are push-style (feed bytes, receive [`xenvault_types::Extent`]s),
//! encoders stream (extents in, bytes out). Nothing here does I/O, so every
//! decoder can be fuzzed.

pub mod raw;
pub mod tar;
pub mod vhd;
pub mod xva;
