//! An object's raw bytes as the tar reader hands them to the encoders: one buffer, or the
//! consecutive pieces of the upload a file body lies in (a body that crosses from one received
//! piece into the next is not copied out of them; see [`crate::intake::Input::take_shared`]).

use std::borrow::Cow;

use bytes::Bytes;

use crate::hash::Digest20;

/// Bytes in one or more consecutive parts, none of them empty (an empty content has none).
#[derive(Clone, Debug, Default)]
pub struct Content {
    parts: Vec<Bytes>,
    len: usize,
}

impl Content {
    /// The content made of `parts`, in order (empty ones are left out).
    pub fn from_parts(parts: impl IntoIterator<Item = Bytes>) -> Content {
        let parts: Vec<Bytes> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        let len = parts.iter().map(Bytes::len).sum();
        Content { parts, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The bytes in one slice: borrowed when there is at most one part, else joined (a copy,
    /// made only where the bytes are compressed).
    pub fn contiguous(&self) -> Cow<'_, [u8]> {
        match self.parts.as_slice() {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(one),
            many => Cow::Owned(many.concat()),
        }
    }

    /// The SHA-1 of the bytes, part after part.
    pub fn sha1(&self) -> Digest20 {
        Digest20::of_parts(self.parts.iter().map(|p| &p[..]))
    }
}

impl From<Bytes> for Content {
    fn from(b: Bytes) -> Content {
        Content::from_parts([b])
    }
}

impl From<Vec<u8>> for Content {
    fn from(v: Vec<u8>) -> Content {
        Content::from(Bytes::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_hash_and_join_as_the_bytes_they_hold_together() {
        let whole: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let b = Bytes::from(whole.clone());
        let split = Content::from_parts([
            b.slice(..1),
            Bytes::new(),
            b.slice(1..4096),
            b.slice(4096..),
        ]);
        assert_eq!(split.parts().len(), 3, "the empty part is left out");
        assert_eq!(split.len(), whole.len());
        assert_eq!(split.sha1(), Digest20::of(&whole));
        assert_eq!(&split.contiguous()[..], &whole[..]);
        // One part is lent as it is, not copied.
        let one = Content::from(b.clone());
        assert!(matches!(one.contiguous(), Cow::Borrowed(s) if s.as_ptr() == b.as_ptr()));
        let empty = Content::from_parts([Bytes::new()]);
        assert!(empty.is_empty() && empty.parts().is_empty());
        assert_eq!(empty.sha1(), Digest20::of(b""));
    }
}
