//! Extended-attribute blobs in upstream's `XattrList` serialisation (cvmfs-formats.md §3.6,
//! `cvmfs/xattr.cc`): `version=1` (u8), `count` (u8), then per attribute `len_key` (u8),
//! `len_value` (u8), key bytes, value bytes, sorted by key. The project docs note that upstream's
//! own documentation claims 8-byte fields; the code uses single bytes, and so do we.

use std::collections::BTreeMap;

/// Attribute limits implied by the one-byte length fields.
pub const MAX_XATTRS: usize = 255;
pub const MAX_KEY_LEN: usize = 255;
pub const MAX_VALUE_LEN: usize = 255;

/// A set of extended attributes, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Xattrs(pub BTreeMap<Vec<u8>, Vec<u8>>);

/// Why an attribute set cannot be stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XattrError {
    #[error("more than {MAX_XATTRS} extended attributes")]
    TooMany,
    #[error("extended attribute name '{0}' is empty, too long (>255 bytes) or contains NUL")]
    BadKey(String),
    #[error("value of extended attribute '{0}' is longer than 255 bytes")]
    ValueTooLong(String),
    #[error("malformed extended attribute blob")]
    Malformed,
}

impl Xattrs {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds one attribute after checking upstream's limits.
    pub fn insert(&mut self, key: &[u8], value: &[u8]) -> Result<(), XattrError> {
        let shown = String::from_utf8_lossy(key).into_owned();
        if key.is_empty() || key.len() > MAX_KEY_LEN || key.contains(&0) {
            return Err(XattrError::BadKey(shown));
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(XattrError::ValueTooLong(shown));
        }
        if !self.0.contains_key(key) && self.0.len() >= MAX_XATTRS {
            return Err(XattrError::TooMany);
        }
        self.0.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    /// Serialises to the catalog blob.
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.0.len() * 16);
        out.push(1);
        out.push(self.0.len() as u8);
        for (k, v) in &self.0 {
            out.push(k.len() as u8);
            out.push(v.len() as u8);
            out.extend_from_slice(k);
            out.extend_from_slice(v);
        }
        out
    }

    /// Parses a catalog blob.
    pub fn deserialize(b: &[u8]) -> Result<Xattrs, XattrError> {
        if b.len() < 2 || b[0] != 1 {
            return Err(XattrError::Malformed);
        }
        let count = b[1] as usize;
        let mut pos = 2;
        let mut map = BTreeMap::new();
        for _ in 0..count {
            if pos + 2 > b.len() {
                return Err(XattrError::Malformed);
            }
            let kl = b[pos] as usize;
            let vl = b[pos + 1] as usize;
            pos += 2;
            if pos + kl + vl > b.len() || kl == 0 {
                return Err(XattrError::Malformed);
            }
            map.insert(
                b[pos..pos + kl].to_vec(),
                b[pos + kl..pos + kl + vl].to_vec(),
            );
            pos += kl + vl;
        }
        if pos != b.len() {
            return Err(XattrError::Malformed);
        }
        Ok(Xattrs(map))
    }
}

// Serialised as the hex of the catalog blob (keys are bytes, which JSON maps cannot hold).
impl serde::Serialize for Xattrs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.serialize()))
    }
}

impl<'de> serde::Deserialize<'de> for Xattrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        let b = hex::decode(s).map_err(serde::de::Error::custom)?;
        Xattrs::deserialize(&b).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_one_byte_fields_sorted_by_key() {
        let mut x = Xattrs::default();
        x.insert(b"user.b", b"2").unwrap();
        x.insert(b"user.a", b"xy").unwrap();
        let blob = x.serialize();
        assert_eq!(
            blob,
            [&[1u8, 2, 6, 2][..], b"user.axy", &[6, 1], b"user.b2"].concat()
        );
        assert_eq!(Xattrs::deserialize(&blob).unwrap(), x);
    }

    #[test]
    fn limits_are_enforced() {
        let mut x = Xattrs::default();
        assert!(matches!(x.insert(b"", b""), Err(XattrError::BadKey(_))));
        assert!(matches!(x.insert(b"a\0b", b""), Err(XattrError::BadKey(_))));
        assert!(matches!(
            x.insert(b"k", &[0u8; 256]),
            Err(XattrError::ValueTooLong(_))
        ));
        assert_eq!(Xattrs::deserialize(&[1, 1, 3]), Err(XattrError::Malformed));
        assert_eq!(Xattrs::deserialize(&[2, 0]), Err(XattrError::Malformed));
    }
}
