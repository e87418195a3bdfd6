//! Fuzzes the replica protocol decoders: frame headers, requests and responses of every kind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zebu_engine::proto::{HEADER_LEN, decode_request, decode_response, parse_header};

fuzz_target!(|data: &[u8]| {
    if data.len() >= HEADER_LEN {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&data[..HEADER_LEN]);
        let _ = parse_header(&h);
    }
    if let Some((kind, body)) = data.split_first() {
        let _ = decode_request(*kind, body);
        let _ = decode_response(*kind, bytes::Bytes::copy_from_slice(body));
    }
});
