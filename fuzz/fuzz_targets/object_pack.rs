//! Object-pack parsing as the gateway double and the receivers do it. The first two bytes
//! choose the header size; the digest is the right one, so the fuzzer gets past it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prepub_core::gateway::parse_pack;
use prepub_core::hash::Digest20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let body = &data[2..];
    let header_size = u16::from_le_bytes([data[0], data[1]]) as usize % (body.len() + 2);
    let digest = if header_size <= body.len() {
        Digest20::of(&body[..header_size]).hex()
    } else {
        "0".repeat(40)
    };
    if let Ok(objects) = parse_pack(body, header_size, &digest) {
        for (id, range) in objects {
            assert!(range.end <= body.len());
            assert_eq!(Digest20::of(&body[range]), id.digest);
        }
    }
});
