//! CBT bitmaps as `VDI.list_changed_blocks` returns them: MSB-first bit order,
//! 64 KiB blocks, merged ranges, and the length check against the VDI size.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use xenvault_xapi::cbt::{CBT_BLOCK_SIZE, CbtError, ChangedBlocks, bitmap_len_for};

const MIB: u64 = 1024 * 1024;

#[test]
fn a_hand_made_xapi_answer_decodes_to_the_written_blocks() {
    // A 4 MiB VDI = 64 blocks = 8 bytes. Blocks written: 0, 1, 2 (first 192 KiB),
    // 15 (last block of the first MiB) and 63 (the last block).
    // Byte 0 = 1110_0000, byte 1 = 0000_0001, byte 7 = 0000_0001.
    let bitmap = [0xe0u8, 0x01, 0, 0, 0, 0, 0, 0x01];
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(bitmap);
    let cb = ChangedBlocks::from_base64(&text, 4 * MIB).unwrap();
    assert_eq!(
        cb.changed_blocks().collect::<Vec<_>>(),
        vec![0, 1, 2, 15, 63]
    );
    assert_eq!(
        cb.ranges().collect::<Vec<_>>(),
        vec![
            0..3 * CBT_BLOCK_SIZE,
            15 * CBT_BLOCK_SIZE..16 * CBT_BLOCK_SIZE,
            63 * CBT_BLOCK_SIZE..4 * MIB,
        ]
    );
    assert_eq!(cb.changed_count(), 5);
    assert_eq!(cb.changed_bytes(), 5 * CBT_BLOCK_SIZE);
    // The encoder gives back exactly the same text (the simulator relies on it).
    assert_eq!(cb.to_base64(), text);
}

#[test]
fn agrees_with_xo_reading_of_2mib_groups() {
    // XO: a 2 MiB block is dirty iff the 4 bytes at 4*i are not all zero.
    let mut cb = ChangedBlocks::new(16 * MIB);
    cb.mark_bytes(5 * MIB + 100, 10); // block 80, in 2 MiB block 2
    cb.mark_bytes(15 * MIB, 1); // block 240, in 2 MiB block 7
    let bytes = cb.bitmap();
    let dirty: Vec<usize> = (0..8)
        .filter(|i| bytes[4 * i..4 * i + 4].iter().any(|b| *b != 0))
        .collect();
    assert_eq!(dirty, vec![2, 7]);
}

#[test]
fn length_must_match_the_vdi_size() {
    let size = 10 * MIB + 1; // 161 blocks -> 21 bytes
    assert_eq!(bitmap_len_for(size), 21);
    let err = ChangedBlocks::from_bitmap(vec![0; 20], size).unwrap_err();
    assert_eq!(
        err,
        CbtError::LengthMismatch {
            actual_bytes: 20,
            expected_bytes: 21,
            virtual_size: size
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("20 bytes") && text.contains("needs 21"),
        "{text}"
    );
    // The last block is a partial one and is clipped to the VDI size.
    let mut bitmap = vec![0u8; 21];
    bitmap[20] = 0x80; // block 160
    let cb = ChangedBlocks::from_bitmap(bitmap, size).unwrap();
    assert_eq!(
        cb.ranges().collect::<Vec<_>>(),
        vec![160 * CBT_BLOCK_SIZE..size]
    );
    // A bit for block 161 does not exist on this VDI.
    let mut bitmap = vec![0u8; 21];
    bitmap[20] = 0x40;
    assert!(matches!(
        ChangedBlocks::from_bitmap(bitmap, size),
        Err(CbtError::BitBeyondEnd { block: 161, .. })
    ));
}

#[test]
fn empty_and_full_bitmaps() {
    let none = ChangedBlocks::new(MIB);
    assert_eq!(none.ranges().count(), 0);
    assert_eq!(none.changed_count(), 0);
    let all = ChangedBlocks::from_bitmap(vec![0xff, 0xff], MIB).unwrap();
    assert_eq!(all.ranges().collect::<Vec<_>>(), vec![0..MIB]);
    assert_eq!(all.ranges_split(2 * CBT_BLOCK_SIZE).count(), 8);
    // A zero-size VDI has an empty bitmap.
    assert!(
        ChangedBlocks::from_base64("", 0)
            .unwrap()
            .bitmap()
            .is_empty()
    );
}
