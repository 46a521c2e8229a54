//! The simulator's disk data: every VDI's bytes as copy-on-write layers of sparse files,
//! and SM-style changed block tracking logs.
//!
//! A VDI is a chain of layers like a VHD chain on a file SR: a writable leaf over frozen
//! (hidden) parents. Snapshot and clone freeze the leaf and put two new empty overlays on
//! it, so they cost two small files whatever the disk size. Each layer keeps a 64 KiB
//! allocation bitmap; destroying a disk drops its leaf, frees parents no one needs and
//! coalesces a parent left with a single child into it: at once with
//! `DiskStore::destroy`, or in a background thread as SM's GC does after `VDI.destroy`
//! (`DiskStore::destroy_deferring_coalesce`, docs/xapi-notes.md "Simulator data plane:
//! coalesce after VDI.destroy"). CBT logs follow SM's `cbtlog` rules
//! (docs/xapi-notes.md, "Simulator data plane").

mod bitmap;
mod guest;
mod store;

pub use bitmap::BlockBitmap;
pub use guest::{SplitMix64, choose_blocks, fill_guest_block, guest_block_data};
pub use store::{DiskError, DiskInfo, DiskStore, ReadRun};

/// CBT and allocation granularity: 64 KiB (`CBT_BLOCK_SIZE` in sm: libs/sm/VDI.py).
pub const CBT_BLOCK_SIZE: u64 = 65536;

/// SM refuses to snapshot a VHD whose chain is this long (`MAX_CHAIN_SIZE` in
/// sm: libs/sm/vhdutil.py), with `SR_BACKEND_FAILURE_109`.
pub const MAX_CHAIN_DEPTH: usize = 30;

/// Number of 64 KiB blocks covering `size` bytes.
pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(CBT_BLOCK_SIZE)
}
