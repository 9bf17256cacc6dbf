//! What a receiver parses from a request: inventory bodies, upload tokens, and the HMAC
//! signature check over arbitrary method, path, timestamp, nonce, body digest and signature
//! strings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prepub_core::receiver::{
    body_digest, parse_inventory, sign, sign_digest, verify, verify_digest, UploadTokens,
};

fuzz_target!(|data: &[u8]| {
    let _ = parse_inventory(data);
    let text = String::from_utf8_lossy(data);
    let mut f = text.split('\n');
    let (method, path, ts, nonce, sig, digest) = (
        f.next().unwrap_or(""),
        f.next().unwrap_or(""),
        f.next().unwrap_or(""),
        f.next().unwrap_or(""),
        f.next().unwrap_or(""),
        f.next().unwrap_or(""),
    );
    let ts: i64 = ts.parse().unwrap_or(0);
    let secret = b"fuzz-secret";
    // A forged signature never verifies; the right one always does.
    let right = sign(secret, method, path, data, ts, nonce);
    assert!(verify(secret, method, path, data, ts, nonce, &right));
    if sig != right {
        assert!(!verify(secret, method, path, data, ts, nonce, sig));
    }
    // Signing a body is signing its digest; over a declared digest the same rules hold.
    assert_eq!(
        right,
        sign_digest(secret, method, path, &body_digest(data), ts, nonce)
    );
    let right = sign_digest(secret, method, path, digest, ts, nonce);
    assert!(verify_digest(secret, method, path, digest, ts, nonce, &right));
    if sig != right {
        assert!(!verify_digest(secret, method, path, digest, ts, nonce, sig));
    }
    let tokens = UploadTokens::default();
    assert!(!tokens.check("repo.example.org", sig));
});
