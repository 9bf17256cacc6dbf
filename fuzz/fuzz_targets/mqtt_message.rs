//! MQTT control messages: topic and payload (split at the first NUL) through every parser the
//! bridge and the receivers use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prepub_core::control::{parse_announce, parse_presence, parse_ready};

fuzz_target!(|data: &[u8]| {
    let (topic, body) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let topic = String::from_utf8_lossy(topic);
    let _ = parse_announce(&topic, body);
    let _ = parse_ready("publisher-1", &topic, body);
    let _ = parse_presence(&topic, body);
});
