//! Content hashes and object names.
//!
//! CVMFS names every stored object by the hash of its *stored* bytes (compressed when the object is
//! zlib-compressed), rendered as lowercase hex plus a one-character object suffix
//! (cvmfs-formats.md §1.1–§1.3, upstream `cvmfs/crypto/hash.h`). This module owns that naming: the
//! [`ObjectId`] type, its text form, and its storage path `data/XX/<rest><suffix>`. Only SHA-1 is
//! written (the upstream default); text carrying another algorithm suffix is rejected with a clear
//! error rather than misread.

use std::fmt;
use std::str::FromStr;

use sha1::{Digest, Sha1};

/// Length of a SHA-1 digest in bytes.
pub const DIGEST_LEN: usize = 20;

/// The object suffix appended to the hex digest (`shash::Suffix` upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Suffix {
    /// A whole regular file ("bulk" object).
    None,
    /// A file catalog (`C`).
    Catalog,
    /// One chunk of a chunked file (`P`).
    Partial,
    /// The history (tag) database (`H`).
    History,
    /// The repository certificate (`X`).
    Certificate,
    /// Repository meta-info JSON (`M`).
    Metainfo,
}

impl Suffix {
    /// The character written after the hex digest, if any.
    pub fn as_char(self) -> Option<char> {
        match self {
            Suffix::None => None,
            Suffix::Catalog => Some('C'),
            Suffix::Partial => Some('P'),
            Suffix::History => Some('H'),
            Suffix::Certificate => Some('X'),
            Suffix::Metainfo => Some('M'),
        }
    }

    /// Parses a suffix character.
    pub fn from_char(c: char) -> Option<Suffix> {
        Some(match c {
            'C' => Suffix::Catalog,
            'P' => Suffix::Partial,
            'H' => Suffix::History,
            'X' => Suffix::Certificate,
            'M' => Suffix::Metainfo,
            _ => return None,
        })
    }

    /// Data objects (whole files and chunks) may be stored uncompressed; metadata objects
    /// (catalogs, history, certificate, meta-info) are always zlib (cvmfs-formats.md §1.2).
    pub fn is_data(self) -> bool {
        matches!(self, Suffix::None | Suffix::Partial)
    }
}

/// A SHA-1 digest without suffix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest20(pub [u8; DIGEST_LEN]);

impl Digest20 {
    /// SHA-1 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest20::of_parts([data])
    }

    /// The SHA-1 of `parts` one after the other.
    pub fn of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut h = Sha1::new();
        for p in parts {
            h.update(p);
        }
        Digest20(h.finalize().into())
    }

    /// Lowercase hex text (40 chars).
    pub fn hex(&self) -> String {
        self.hex_str(&mut [0; 2 * DIGEST_LEN]).to_string()
    }

    /// Lowercase hex text in `buf`, without an allocation (a change set writes one per file).
    pub fn hex_str<'a>(&self, buf: &'a mut [u8; 2 * DIGEST_LEN]) -> &'a str {
        // The buffer's length is twice the digest's, so neither step can fail.
        let _ = hex::encode_to_slice(self.0, buf);
        std::str::from_utf8(buf).unwrap_or_default()
    }

    /// Parses 40 hex characters (either case).
    pub fn from_hex(s: &str) -> Result<Self, HashError> {
        if s.len() != 2 * DIGEST_LEN {
            return Err(HashError::BadLength(s.to_string()));
        }
        let mut out = [0u8; DIGEST_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| HashError::NotHex(s.to_string()))?;
        Ok(Digest20(out))
    }

    /// Builds from a raw 20-byte blob (as stored in catalog `hash` columns).
    pub fn from_slice(b: &[u8]) -> Result<Self, HashError> {
        let arr: [u8; DIGEST_LEN] = b.try_into().map_err(|_| HashError::BadBlob(b.len()))?;
        Ok(Digest20(arr))
    }
}

impl fmt::Debug for Digest20 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex_str(&mut [0; 2 * DIGEST_LEN]))
    }
}

impl fmt::Display for Digest20 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex_str(&mut [0; 2 * DIGEST_LEN]))
    }
}

/// Errors from parsing hash text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error(
        "hash '{0}' has the wrong length for SHA-1 (40 hex characters plus an optional suffix)"
    )]
    BadLength(String),
    #[error("hash '{0}' is not hexadecimal")]
    NotHex(String),
    #[error("hash '{0}' uses an algorithm other than SHA-1, which this tool does not support")]
    UnsupportedAlgorithm(String),
    #[error("hash '{0}' has an unknown object suffix")]
    BadSuffix(String),
    #[error("hash blob has {0} bytes, expected 20")]
    BadBlob(usize),
}

/// The name of one stored object: digest plus object suffix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    pub digest: Digest20,
    pub suffix: Suffix,
}

impl ObjectId {
    pub fn new(digest: Digest20, suffix: Suffix) -> Self {
        ObjectId { digest, suffix }
    }

    /// Relative storage path: `data/` + 2 hex + `/` + 38 hex + suffix (upstream `MakePath`).
    pub fn path(&self) -> String {
        let hex = self.digest.hex();
        let mut p = String::with_capacity(48);
        p.push_str("data/");
        p.push_str(&hex[..2]);
        p.push('/');
        p.push_str(&hex[2..]);
        if let Some(c) = self.suffix.as_char() {
            p.push(c);
        }
        p
    }

    /// Parses `hex[suffix]`. Text with an algorithm suffix (`-rmd160`, `-shake128`) is refused.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        if s.contains('-') {
            return Err(HashError::UnsupportedAlgorithm(s.to_string()));
        }
        // Names are ASCII; anything else would also make the byte slicing below split a
        // character (found by fuzzing: fuzz/regressions/object_pack).
        if !s.is_ascii() {
            return Err(HashError::NotHex(s.to_string()));
        }
        match s.len() {
            40 => Ok(ObjectId::new(Digest20::from_hex(s)?, Suffix::None)),
            41 => {
                let c = s[40..].chars().next().unwrap_or(' ');
                let suffix =
                    Suffix::from_char(c).ok_or_else(|| HashError::BadSuffix(s.to_string()))?;
                Ok(ObjectId::new(Digest20::from_hex(&s[..40])?, suffix))
            }
            _ => Err(HashError::BadLength(s.to_string())),
        }
    }

    /// Parses a storage path `data/XX/<rest>[suffix]` back into an id.
    pub fn from_path(p: &str) -> Option<Self> {
        let rest = p.strip_prefix("data/")?;
        let (dir, file) = rest.split_once('/')?;
        if dir.len() != 2 {
            return None;
        }
        ObjectId::parse(&format!("{dir}{file}")).ok()
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.digest.hex_str(&mut [0; 2 * DIGEST_LEN]))?;
        if let Some(c) = self.suffix.as_char() {
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for ObjectId {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ObjectId::parse(s)
    }
}

/// MD5 of a repository path, as used for catalog `md5path`/`parent` keys.
pub fn md5_path(path: &str) -> [u8; 16] {
    use md5::Md5;
    let mut h = Md5::new();
    h.update(path.as_bytes());
    h.finalize().into()
}

/// Splits an MD5 digest into the two little-endian signed integers stored in catalogs
/// (cvmfs-formats.md §3.2, upstream `Md5::ToIntPair`).
pub fn md5_pair(d: &[u8; 16]) -> (i64, i64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    b.copy_from_slice(&d[8..]);
    (i64::from_le_bytes(a), i64::from_le_bytes(b))
}

/// `(md5path_1, md5path_2)` of a path.
pub fn path_key(path: &str) -> (i64, i64) {
    md5_pair(&md5_path(path))
}

impl serde::Serialize for Digest20 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.hex_str(&mut [0; 2 * DIGEST_LEN]))
    }
}

impl<'de> serde::Deserialize<'de> for Digest20 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Parses the text where the deserializer holds it, without a `String` of its own.
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Digest20;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("40 hex characters")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Digest20, E> {
                Digest20::from_hex(v).map_err(E::custom)
            }
        }
        d.deserialize_str(Hex)
    }
}

impl serde::Serialize for ObjectId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for ObjectId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ObjectId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_split_matches_upstream_examples() {
        // cvmfs-formats.md §3.2
        assert_eq!(path_key(""), (338333539836370388, 9098107892288553193));
        assert_eq!(
            path_key("/foo"),
            (5745132282796244766, -5819618580357280866)
        );
    }

    #[test]
    fn hex_text_is_lowercase_and_round_trips_for_every_byte() {
        for b in 0..=255u8 {
            let mut raw = [b; DIGEST_LEN];
            raw[0] = b.wrapping_mul(7);
            let d = Digest20(raw);
            assert_eq!(d.hex(), hex::encode(raw));
            assert_eq!(d.to_string(), d.hex());
            assert_eq!(format!("{d:?}"), d.hex());
            assert_eq!(Digest20::from_hex(&d.hex()).unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.hex()));
            assert_eq!(serde_json::from_str::<Digest20>(&json).unwrap(), d);
        }
        assert!(serde_json::from_str::<Digest20>("\"zz\"").is_err());
        assert!(serde_json::from_str::<Digest20>("7").is_err());
    }

    #[test]
    fn object_path_and_parse_round_trip() {
        let id = ObjectId::parse("e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78").unwrap();
        assert_eq!(id.path(), "data/e8/ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78");
        let c = ObjectId::parse("e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78C").unwrap();
        assert_eq!(c.suffix, Suffix::Catalog);
        assert_eq!(c.path(), "data/e8/ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78C");
        assert_eq!(ObjectId::from_path(&c.path()), Some(c));
        assert_eq!(c.to_string(), "e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78C");
    }

    #[test]
    fn parse_rejects_other_algorithms_and_garbage() {
        // A character spanning bytes 39..41 (41 bytes in all): an error, not a panic.
        let s = format!("{}\u{51b}", "a".repeat(39));
        assert_eq!(s.len(), 41);
        assert!(matches!(ObjectId::parse(&s), Err(HashError::NotHex(_))));
        assert!(matches!(
            ObjectId::parse("28d94b83b7229b331fc601362b8e272e02665122-shake128"),
            Err(HashError::UnsupportedAlgorithm(_))
        ));
        assert!(matches!(
            ObjectId::parse("abc"),
            Err(HashError::BadLength(_))
        ));
        assert!(matches!(
            ObjectId::parse("e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78Q"),
            Err(HashError::BadSuffix(_))
        ));
        assert!(matches!(
            ObjectId::parse("z8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78"),
            Err(HashError::NotHex(_))
        ));
    }
}
