//! The stock `cvmfs_gateway` wire protocol, as plain functions shared by the publisher's gateway
//! client and the gateway double used in tests (cvmfs-formats.md §4).
//!
//! - Authorization: `<key_id> <base64(lowercase hex(HMAC-SHA1(secret, message)))>` — the HMAC is
//!   hex-encoded *before* base64; the signed message depends on the route (§4.2).
//! - Object packs (`V2` format, §4.5): a text header with one `C <hash+suffix> <size>` line per
//!   object, then the objects' stored bytes back to back; `payload_digest` is the SHA-1 hex of the
//!   header and `header_size` its length, both sent as JSON *strings*.
//! - Lease paths (§4.4): `<fqrn>/<subpath>` without leading slash; two leases conflict when one
//!   path is a string prefix of the other, exactly as the stock gateway's SQL `LIKE` does.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::{Digest, Sha1};

use crate::hash::{Digest20, ObjectId};

type HmacSha1 = Hmac<Sha1>;

/// Lowercase hex of HMAC-SHA1(secret, message).
pub fn hmac_hex(secret: &[u8], message: &[u8]) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <HmacSha1 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(message);
    hex::encode(m.finalize().into_bytes())
}

/// The `Authorization` header value for `message`.
pub fn authorization(key_id: &str, secret: &[u8], message: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(hmac_hex(secret, message));
    format!("{key_id} {b64}")
}

/// Checks an `Authorization` header: returns the key id when the HMAC of `message` made with
/// that key's secret (looked up by `secret_of`) matches, compared in constant time.
pub fn check_authorization(
    header: &str,
    message: &[u8],
    secret_of: impl Fn(&str) -> Option<Vec<u8>>,
) -> Option<String> {
    let mut parts = header.split(' ');
    let (key_id, sig) = (parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let secret = secret_of(key_id)?;
    let given = base64::engine::general_purpose::STANDARD.decode(sig).ok()?;
    let want = hmac_hex(&secret, message);
    use subtle_eq::ct_eq;
    ct_eq(&given, want.as_bytes()).then(|| key_id.to_string())
}

mod subtle_eq {
    /// Constant-time equality of two byte strings (length is not secret).
    pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Builds a `V2` object pack.
#[derive(Debug, Default)]
pub struct PackBuilder {
    index: Vec<(ObjectId, usize)>,
    total: usize,
}

/// A finished pack header and what to send after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackHeader {
    /// The header bytes (everything up to and including the last index line).
    pub header: Vec<u8>,
    /// SHA-1 hex of `header` (the `payload_digest`).
    pub digest: String,
}

impl PackBuilder {
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// Adds an object of `size` stored bytes (sent later, in the same order).
    pub fn add(&mut self, id: ObjectId, size: usize) {
        self.index.push((id, size));
        self.total += size;
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Sum of the objects' sizes.
    pub fn payload_bytes(&self) -> usize {
        self.total
    }

    pub fn header(&self) -> PackHeader {
        let mut h = format!("V2\nS{}\nN{}\n--\n", self.total, self.index.len());
        for (id, size) in &self.index {
            h.push_str(&format!("C {id} {size}\n"));
        }
        let digest = Digest20(Sha1::digest(h.as_bytes()).into()).hex();
        PackHeader {
            header: h.into_bytes(),
            digest,
        }
    }
}

/// Why a pack was refused (the receiver's consumer checks).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    #[error("pack header: {0}")]
    Header(String),
    #[error("pack header digest does not match payload_digest")]
    Digest,
    #[error("object {0} does not match its name")]
    ObjectHash(String),
    #[error("pack body is {got} bytes, the header announces {want}")]
    Length { got: usize, want: usize },
}

/// Parses a pack body (header followed by objects) and verifies the header digest, the counts,
/// the sizes and every object's SHA-1 against its name. Returns `(id, byte range)` per object.
pub fn parse_pack(
    body: &[u8],
    header_size: usize,
    digest: &str,
) -> Result<Vec<(ObjectId, std::ops::Range<usize>)>, PackError> {
    if header_size > body.len() || header_size > 10_000_000 {
        return Err(PackError::Header(format!(
            "header_size {header_size} is out of range"
        )));
    }
    let header = &body[..header_size];
    let actual = Digest20(Sha1::digest(header).into()).hex();
    if !actual.eq_ignore_ascii_case(digest) {
        return Err(PackError::Digest);
    }
    let text = std::str::from_utf8(header).map_err(|_| PackError::Header("not text".into()))?;
    let mut lines = text.split('\n');
    let bad = |m: &str| PackError::Header(m.to_string());
    if lines.next() != Some("V2") {
        return Err(bad("version line is not V2"));
    }
    let total: usize = lines
        .next()
        .and_then(|l| l.strip_prefix('S'))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("missing S line"))?;
    let count: usize = lines
        .next()
        .and_then(|l| l.strip_prefix('N'))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("missing N line"))?;
    if lines.next() != Some("--") {
        return Err(bad("missing -- line"));
    }
    // `N` comes from the client: it bounds nothing until the index lines are counted.
    let mut out = Vec::with_capacity(count.min(text.len() / 44 + 1));
    let mut pos = header_size;
    let mut sum = 0usize;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let mut f = line.split(' ');
        let (kind, id, size) = (f.next(), f.next(), f.next());
        if kind != Some("C") {
            return Err(bad("only C (CAS object) lines are supported"));
        }
        let id = ObjectId::parse(id.unwrap_or("")).map_err(|e| bad(&e.to_string()))?;
        let size: usize = size
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad object size"))?;
        // Sizes come from the client: no arithmetic on them may overflow.
        let Some(end) = pos.checked_add(size).filter(|e| *e <= body.len()) else {
            return Err(PackError::Length {
                got: body.len() - header_size,
                want: total,
            });
        };
        if Digest20(Sha1::digest(&body[pos..end]).into()) != id.digest {
            return Err(PackError::ObjectHash(id.to_string()));
        }
        out.push((id, pos..end));
        pos = end;
        sum = sum
            .checked_add(size)
            .ok_or_else(|| bad("object sizes overflow"))?;
    }
    if out.len() != count {
        return Err(bad("N does not match the number of index lines"));
    }
    if sum != total {
        return Err(bad("S does not match the sum of object sizes"));
    }
    if pos != body.len() {
        return Err(PackError::Length {
            got: body.len() - header_size,
            want: total,
        });
    }
    Ok(out)
}

/// The lease path of `repo` + catalog path (`""` = whole repository): `repo/` or `repo/a/b`.
pub fn lease_path(repo: &str, path: &str) -> String {
    format!("{repo}/{}", path.trim_start_matches('/'))
}

/// Whether two lease sub-paths of one repository conflict (string prefix either way, like the
/// stock gateway — `/sub` also conflicts with `/subway`).
pub fn leases_conflict(a: &str, b: &str) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// A duration as Go's `time.Duration.String()` prints it (`1h59m2.5s`, `300ms`, `0s`) — the
/// stock gateway's `time_remaining`.
pub fn go_duration(d: std::time::Duration) -> String {
    let total_ns = d.as_nanos();
    if total_ns == 0 {
        return "0s".into();
    }
    if total_ns < 1_000_000_000 {
        let (v, unit) = if total_ns < 1_000 {
            (total_ns as f64, "ns")
        } else if total_ns < 1_000_000 {
            (total_ns as f64 / 1e3, "µs")
        } else {
            (total_ns as f64 / 1e6, "ms")
        };
        return format!("{}{unit}", trim_float(v));
    }
    let secs_total = d.as_secs();
    let h = secs_total / 3600;
    let m = (secs_total % 3600) / 60;
    let s = (secs_total % 60) as f64 + f64::from(d.subsec_nanos()) / 1e9;
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{}s", trim_float(s)));
    out
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.9}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Suffix;
    use crate::object::compress_metadata;
    use std::time::Duration;

    #[test]
    fn authorization_matches_the_documented_example() {
        // cvmfs-formats.md §4.2: secret "secret", message "tok".
        assert_eq!(
            hmac_hex(b"secret", b"tok"),
            "a4e5f38c10d93c1c41b7f0265a8b6ebf7bd692ff"
        );
        assert_eq!(
            authorization("key1", b"secret", b"tok"),
            "key1 YTRlNWYzOGMxMGQ5M2MxYzQxYjdmMDI2NWE4YjZlYmY3YmQ2OTJmZg=="
        );
        let secret = |k: &str| (k == "key1").then(|| b"secret".to_vec());
        assert_eq!(
            check_authorization(&authorization("key1", b"secret", b"tok"), b"tok", secret),
            Some("key1".into())
        );
        assert_eq!(
            check_authorization(&authorization("key1", b"secret", b"tok"), b"tok2", secret),
            None
        );
        assert_eq!(
            check_authorization(&authorization("key2", b"secret", b"tok"), b"tok", secret),
            None
        );
        assert_eq!(check_authorization("key1", b"tok", secret), None);
        assert_eq!(check_authorization("key1  x", b"tok", secret), None);
    }

    #[test]
    fn packs_round_trip_and_are_checked() {
        let (a, ab) = compress_metadata(b"first object", Suffix::Catalog);
        let (b, bb) = compress_metadata(b"second", Suffix::Partial);
        let mut p = PackBuilder::new();
        p.add(a, ab.len());
        p.add(b, bb.len());
        let h = p.header();
        let text = String::from_utf8(h.header.clone()).unwrap();
        assert!(text.starts_with(&format!(
            "V2\nS{}\nN2\n--\nC {a} {}\n",
            ab.len() + bb.len(),
            ab.len()
        )));
        let mut body = h.header.clone();
        body.extend_from_slice(&ab);
        body.extend_from_slice(&bb);
        let parsed = parse_pack(&body, h.header.len(), &h.digest).unwrap();
        assert_eq!(parsed[0].0, a);
        assert_eq!(&body[parsed[1].1.clone()], &bb[..]);
        assert_eq!(
            parse_pack(&body, h.header.len(), &"0".repeat(40)),
            Err(PackError::Digest)
        );
        let mut tampered = body.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            parse_pack(&tampered, h.header.len(), &h.digest),
            Err(PackError::ObjectHash(_))
        ));
        let mut long = body.clone();
        long.push(0);
        assert!(matches!(
            parse_pack(&long, h.header.len(), &h.digest),
            Err(PackError::Length { .. })
        ));
        let empty = PackBuilder::new().header();
        assert_eq!(
            parse_pack(&empty.header, empty.header.len(), &empty.digest).unwrap(),
            vec![]
        );
    }

    #[test]
    fn hostile_counts_and_sizes_are_errors_not_panics() {
        // Found by fuzzing (fuzz/regressions/object_pack): a huge N made the index allocation
        // overflow; huge sizes must not overflow the offset arithmetic either.
        let h = |text: &str| {
            let header = text.as_bytes().to_vec();
            let digest = Digest20(Sha1::digest(&header).into()).hex();
            (header, digest)
        };
        let (header, digest) = h("V2\nS3\nN18446744073709551615\n--\n");
        assert!(parse_pack(&header, header.len(), &digest).is_err());
        let id = Digest20(Sha1::digest(b"abc").into()).hex();
        let (mut body, digest) = h(&format!(
            "V2\nS3\nN2\n--\nC {id} 3\nC {id} 18446744073709551615\n"
        ));
        let n = body.len();
        body.extend_from_slice(b"abc");
        assert!(matches!(
            parse_pack(&body, n, &digest),
            Err(PackError::Length { .. })
        ));
    }

    #[test]
    fn lease_paths_and_durations() {
        assert_eq!(lease_path("repo.org", ""), "repo.org/");
        assert_eq!(lease_path("repo.org", "/sub/dir"), "repo.org/sub/dir");
        assert!(leases_conflict("/sub", "/subway"));
        assert!(leases_conflict("/", "/a"));
        assert!(!leases_conflict("/a", "/b"));
        assert_eq!(go_duration(Duration::from_millis(7_142_500)), "1h59m2.5s");
        assert_eq!(go_duration(Duration::from_secs(120)), "2m0s");
        assert_eq!(go_duration(Duration::from_millis(300)), "300ms");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }
}
