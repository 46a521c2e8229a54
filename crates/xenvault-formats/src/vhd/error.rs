//! Errors of the VHD codec: every one names the structure, the field and the byte offset.

/// What went wrong while decoding or encoding a VHD.
///
/// Offsets are absolute byte offsets in the VHD file or stream, so a message
/// can be checked with `xxd -s OFFSET`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VhdError {
    /// A structure does not start with its magic cookie.
    #[error(
        "VHD {structure} at byte {offset}: cookie is {found:?}, expected {expected:?} \
         (not a VHD, or the structure is not where the previous one points)"
    )]
    BadCookie {
        /// Which structure (`footer`, `dynamic header`, …).
        structure: &'static str,
        /// Where the structure starts.
        offset: u64,
        /// The bytes found, printed lossily.
        found: String,
        /// The cookie the format requires.
        expected: &'static str,
    },
    /// A structure's checksum field does not match its bytes.
    #[error(
        "VHD {structure} at byte {offset}: checksum field (byte {field_offset}) holds {stored:#010x} \
         but the structure sums to {computed:#010x}; the file is corrupt or was cut"
    )]
    BadChecksum {
        /// Which structure.
        structure: &'static str,
        /// Where the structure starts.
        offset: u64,
        /// Where its checksum field is.
        field_offset: u64,
        /// The value stored in the file.
        stored: u32,
        /// The value computed from the bytes.
        computed: u32,
    },
    /// A field holds a value this codec cannot accept.
    #[error("VHD {structure} field `{field}` at byte {offset}: {reason}")]
    BadField {
        /// Which structure.
        structure: &'static str,
        /// The field's name (as in the VHD specification).
        field: &'static str,
        /// Absolute offset of the field.
        offset: u64,
        /// What is wrong and, where possible, what would be right.
        reason: String,
    },
    /// The stream ended before the structure the metadata announced.
    #[error("VHD stream truncated: {0}")]
    Truncated(String),
    /// The layout is valid but cannot be decoded strictly forward within the memory bound.
    #[error(
        "VHD cannot be decoded as a forward stream: {0}; read it with `VhdLayout` \
         (random access) instead, or raise `DecoderOptions::max_reorder_bytes`"
    )]
    NotStreamable(String),
    /// The caller gave the encoder (or an extent helper) something it cannot encode.
    #[error("VHD encoder input: {0}")]
    InvalidInput(String),
    /// `feed`/`finish` was called after an earlier error or after `finish`.
    #[error("VHD decoder already stopped ({0}); create a new decoder")]
    Stopped(&'static str),
}
