//! `.cvmfspublished` and `.cvmfswhitelist` parsing, and the signature-block split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prepub_core::manifest::{split_letter, Manifest, Whitelist};

fuzz_target!(|data: &[u8]| {
    if let Ok((m, _)) = Manifest::parse(data) {
        // What parses serialises and parses again to the same manifest.
        let again = Manifest::parse(m.body().as_bytes()).map(|(m2, _)| m2);
        assert_eq!(again.ok().as_ref(), Some(&m));
    }
    let _ = Whitelist::parse(data);
    let _ = split_letter(data);
});
