//! Fuzzes the XVA push decoder: any input gives events or an error, never a
//! panic or an unbounded allocation; feeding in two pieces gives the same
//! outcome as feeding at once; a decoded archive's extents cover each disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvault_formats::xva::{XvaDecoder, XvaDecoderOptions, XvaEvent};

fn options() -> XvaDecoderOptions {
    XvaDecoderOptions {
        max_ova_xml_size: 1 << 20,
        max_chunk_size: 2 << 20,
        ..XvaDecoderOptions::default()
    }
}

fn decode(pieces: &[&[u8]]) -> Result<Vec<XvaEvent>, String> {
    let mut dec = XvaDecoder::with_options(options());
    let mut events = Vec::new();
    for p in pieces {
        events.extend(dec.feed(p).map_err(|e| e.to_string())?);
    }
    dec.finish().map_err(|e| e.to_string())?;
    Ok(events)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let at = (usize::from(split) * 97) % (data.len() + 1);
    let whole = decode(&[data]);
    let split = decode(&[&data[..at], &data[at..]]);
    assert_eq!(whole, split, "feeding in pieces changed the outcome");
    if let Ok(events) = whole {
        let mut expected_next = None;
        for e in &events {
            match e {
                XvaEvent::DiskStart(_) => expected_next = Some(0u64),
                XvaEvent::Extent(x) => {
                    assert_eq!(Some(x.offset), expected_next, "extents are contiguous");
                    expected_next = Some(x.end());
                }
                XvaEvent::DiskEnd(d) => {
                    assert_eq!(expected_next, Some(d.virtual_size), "disk fully covered");
                    expected_next = None;
                }
                XvaEvent::OvaXml(_) | XvaEvent::End => {}
            }
        }
        assert!(matches!(events.last(), Some(XvaEvent::End)));
    }
});
