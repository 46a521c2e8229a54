//! Fuzzes the XML-RPC decoders: any input gives a value or an error, never a
//! panic, and what decodes re-encodes to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvault_types::rpc::{MethodCall, MethodResponse, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = Value::from_xml(text) {
        let again = Value::from_xml(&v.to_xml()).expect("re-encoded value must decode");
        // NaN never equals itself; compare the encodings instead.
        assert_eq!(again.to_xml(), v.to_xml());
    }
    let _ = MethodCall::from_xml(text);
    let _ = MethodResponse::from_xml(text);
});
