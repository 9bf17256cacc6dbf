//! The repository manifest `.cvmfspublished` and the whitelist `.cvmfswhitelist`.
//!
//! Manifest: letter format, one key character per line, written in upstream's order
//! `C B R D S G A` then `L N X H T M Y`, then `--`, the SHA-1 hex of the body, and the raw
//! signature (cvmfs-formats.md §1.5). Whitelist: creation stamp, `E`xpiry, `N`ame, certificate
//! fingerprints, `--`, SHA-1 hex, raw master-key signature (§1.7).

use crate::hash::{Digest20, ObjectId, Suffix};
use crate::keys::{self, KeyError, RepoKeys};
use crate::timefmt;

/// MD5 of the empty root path; clients reject any other `R` (§1.5).
pub const ROOT_PATH_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";

/// Errors parsing or verifying manifests and whitelists.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest: {0}")]
    Malformed(String),
    #[error("whitelist: {0}")]
    BadWhitelist(String),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Parsed `.cvmfspublished`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub root_catalog: ObjectId,
    pub root_size: u64,
    pub ttl: i64,
    pub revision: u64,
    pub garbage_collectable: bool,
    pub alt_paths: bool,
    pub name: String,
    pub certificate: Option<ObjectId>,
    pub history: Option<ObjectId>,
    pub timestamp: i64,
    pub metainfo: Option<ObjectId>,
    pub reflog: Option<Digest20>,
}

/// The signature block of a signed letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureBlock {
    /// The bytes covered by the hash (everything before `--\n`).
    pub body: Vec<u8>,
    /// The hash line text.
    pub hash_text: String,
    pub signature: Vec<u8>,
}

/// Splits a signed letter at the first `\n--\n`.
pub fn split_letter(bytes: &[u8]) -> Option<SignatureBlock> {
    let pos = bytes.windows(4).position(|w| w == b"\n--\n")?;
    let body = bytes[..pos + 1].to_vec();
    let rest = &bytes[pos + 4..];
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let hash_text = String::from_utf8(rest[..nl].to_vec()).ok()?;
    Some(SignatureBlock {
        body,
        hash_text,
        signature: rest[nl + 1..].to_vec(),
    })
}

impl Manifest {
    /// The body text (every line `\n`-terminated).
    pub fn body(&self) -> String {
        let mut s = String::new();
        let yn = |b: bool| if b { "yes" } else { "no" };
        s.push_str(&format!("C{}\n", self.root_catalog.digest.hex()));
        s.push_str(&format!("B{}\n", self.root_size));
        s.push_str(&format!("R{ROOT_PATH_MD5}\n"));
        s.push_str(&format!("D{}\n", self.ttl));
        s.push_str(&format!("S{}\n", self.revision));
        s.push_str(&format!("G{}\n", yn(self.garbage_collectable)));
        s.push_str(&format!("A{}\n", yn(self.alt_paths)));
        s.push_str(&format!("N{}\n", self.name));
        if let Some(x) = &self.certificate {
            s.push_str(&format!("X{}\n", x.digest.hex()));
        }
        if let Some(h) = &self.history {
            s.push_str(&format!("H{}\n", h.digest.hex()));
        }
        s.push_str(&format!("T{}\n", self.timestamp));
        if let Some(m) = &self.metainfo {
            s.push_str(&format!("M{}\n", m.digest.hex()));
        }
        if let Some(y) = &self.reflog {
            s.push_str(&format!("Y{}\n", y.hex()));
        }
        s
    }

    /// Body + `--` + hash line + signature made with the repository key.
    pub fn sign(&self, keys: &RepoKeys) -> Vec<u8> {
        let body = self.body();
        let hash_text = Digest20::of(body.as_bytes()).hex();
        let mut out = body.into_bytes();
        out.extend_from_slice(b"--\n");
        out.extend_from_slice(hash_text.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(&keys.sign_manifest(hash_text.as_bytes()));
        out
    }

    /// Parses a manifest (signed or not). Last value wins for repeated keys, as upstream.
    pub fn parse(bytes: &[u8]) -> Result<(Manifest, Option<SignatureBlock>), ManifestError> {
        let block = split_letter(bytes);
        let body: &[u8] = match &block {
            Some(b) => &b.body,
            None => bytes,
        };
        let text = std::str::from_utf8(body)
            .map_err(|_| ManifestError::Malformed("body is not UTF-8".into()))?;
        let mut kv = std::collections::HashMap::new();
        for line in text.lines() {
            if line == "--" {
                break;
            }
            let mut chars = line.chars();
            if let Some(k) = chars.next() {
                let v = chars.as_str();
                // A carriage return or other control character is in no valid value (and a
                // trailing \r would not survive writing the line back).
                if v.chars().any(char::is_control) {
                    return Err(ManifestError::Malformed(format!(
                        "key {k}: control character in the value"
                    )));
                }
                kv.insert(k, v.to_string());
            }
        }
        let need = |k: char| {
            kv.get(&k)
                .cloned()
                .ok_or_else(|| ManifestError::Malformed(format!("missing key {k}")))
        };
        let obj = |k: char, suffix: Suffix| -> Result<Option<ObjectId>, ManifestError> {
            match kv.get(&k) {
                None => Ok(None),
                Some(v) => Digest20::from_hex(v)
                    .map(|d| Some(ObjectId::new(d, suffix)))
                    .map_err(|e| ManifestError::Malformed(format!("key {k}: {e}"))),
            }
        };
        let num = |k: char, v: &str| -> Result<i64, ManifestError> {
            v.parse::<i64>()
                .map_err(|_| ManifestError::Malformed(format!("key {k}: '{v}' is not a number")))
        };
        // Sizes, revisions and TTLs are never negative (a cast would wrap them around).
        let unum = |k: char, v: &str| -> Result<u64, ManifestError> {
            v.parse::<u64>().map_err(|_| {
                ManifestError::Malformed(format!("key {k}: '{v}' is not a non-negative number"))
            })
        };
        let r = need('R')?;
        if r != ROOT_PATH_MD5 {
            return Err(ManifestError::Malformed(format!(
                "root path hash R{r} is not the MD5 of \"\""
            )));
        }
        let m = Manifest {
            root_catalog: obj('C', Suffix::Catalog)?
                .ok_or_else(|| ManifestError::Malformed("missing key C".into()))?,
            root_size: kv.get(&'B').map(|v| unum('B', v)).transpose()?.unwrap_or(0),
            ttl: i64::try_from(unum('D', &need('D')?)?)
                .map_err(|_| ManifestError::Malformed("key D: TTL out of range".into()))?,
            revision: unum('S', &need('S')?)?,
            garbage_collectable: kv.get(&'G').map(|v| v == "yes").unwrap_or(false),
            alt_paths: kv.get(&'A').map(|v| v == "yes").unwrap_or(false),
            name: kv.get(&'N').cloned().unwrap_or_default(),
            certificate: obj('X', Suffix::Certificate)?,
            history: obj('H', Suffix::History)?,
            timestamp: kv.get(&'T').map(|v| num('T', v)).transpose()?.unwrap_or(0),
            metainfo: obj('M', Suffix::Metainfo)?,
            reflog: match kv.get(&'Y') {
                None => None,
                Some(v) => Some(
                    Digest20::from_hex(v)
                        .map_err(|e| ManifestError::Malformed(format!("key Y: {e}")))?,
                ),
            },
        };
        Ok((m, block))
    }
}

/// Verifies a signed manifest against a certificate: body hash and signature.
pub fn verify_manifest(block: &SignatureBlock, cert_pem: &str) -> Result<(), ManifestError> {
    let actual = Digest20::of(&block.body).hex();
    if actual != block.hash_text {
        return Err(ManifestError::Malformed(format!(
            "body hash is {actual} but the signed hash line says {}",
            block.hash_text
        )));
    }
    if !keys::verify_manifest_signature(cert_pem, block.hash_text.as_bytes(), &block.signature)? {
        return Err(ManifestError::Malformed(
            "signature does not verify with the repository certificate".into(),
        ));
    }
    Ok(())
}

/// Parsed `.cvmfswhitelist`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whitelist {
    pub created: i64,
    pub expires: i64,
    pub name: String,
    /// Fingerprints as written (uppercase, `:`-separated).
    pub fingerprints: Vec<String>,
    pub block: SignatureBlock,
}

/// Creates and signs a whitelist for `keys`' certificate.
pub fn make_whitelist(
    keys: &RepoKeys,
    now: i64,
    valid_days: i64,
) -> Result<Vec<u8>, ManifestError> {
    let body = format!(
        "{}\nE{}\nN{}\n{}\n",
        timefmt::stamp(now),
        timefmt::stamp(now + valid_days * 86_400),
        keys.name,
        keys.fingerprint()?
    );
    let hash_text = Digest20::of(body.as_bytes()).hex();
    let sig = keys.sign_whitelist(hash_text.as_bytes())?;
    let mut out = body.into_bytes();
    out.extend_from_slice(b"--\n");
    out.extend_from_slice(hash_text.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&sig);
    Ok(out)
}

impl Whitelist {
    pub fn parse(bytes: &[u8]) -> Result<Whitelist, ManifestError> {
        let block = split_letter(bytes)
            .ok_or_else(|| ManifestError::BadWhitelist("no signature block".into()))?;
        let text = std::str::from_utf8(&block.body)
            .map_err(|_| ManifestError::BadWhitelist("not UTF-8".into()))?;
        let mut lines = text.lines();
        let created = lines
            .next()
            .and_then(timefmt::parse_stamp)
            .ok_or_else(|| ManifestError::BadWhitelist("bad creation stamp".into()))?;
        let expires = lines
            .next()
            .and_then(|l| l.strip_prefix('E'))
            .and_then(timefmt::parse_stamp)
            .ok_or_else(|| ManifestError::BadWhitelist("bad expiry line".into()))?;
        let name = lines
            .next()
            .and_then(|l| l.strip_prefix('N'))
            .ok_or_else(|| ManifestError::BadWhitelist("missing N line".into()))?
            .to_string();
        let fingerprints = lines
            .filter(|l| !l.is_empty() && !l.starts_with('V') && !l.starts_with('W'))
            .map(|l| l.split([' ', '\t', '#']).next().unwrap_or("").to_string())
            .filter(|l| !l.is_empty())
            .collect();
        Ok(Whitelist {
            created,
            expires,
            name,
            fingerprints,
            block,
        })
    }

    /// Whether `fingerprint` is listed (compared as upstream does: `:` stripped, case-folded).
    pub fn lists(&self, fingerprint: &str) -> bool {
        let norm = |s: &str| s.replace(':', "").to_ascii_lowercase();
        let want = norm(fingerprint);
        self.fingerprints.iter().any(|f| norm(f) == want)
    }

    /// Checks the body hash and the master-key signature.
    pub fn verify(&self, master: &rsa::RsaPublicKey) -> Result<(), ManifestError> {
        let actual = Digest20::of(&self.block.body).hex();
        if actual != self.block.hash_text {
            return Err(ManifestError::BadWhitelist(format!(
                "body hash is {actual} but the hash line says {}",
                self.block.hash_text
            )));
        }
        if !keys::verify_whitelist_signature(
            master,
            self.block.hash_text.as_bytes(),
            &self.block.signature,
        ) {
            return Err(ManifestError::BadWhitelist(
                "signature does not verify with the master public key".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            root_catalog: ObjectId::new(Digest20::of(b"c"), Suffix::Catalog),
            root_size: 12288,
            ttl: 240,
            revision: 3,
            garbage_collectable: false,
            alt_paths: false,
            name: "test.example.org".into(),
            certificate: Some(ObjectId::new(Digest20::of(b"x"), Suffix::Certificate)),
            history: Some(ObjectId::new(Digest20::of(b"h"), Suffix::History)),
            timestamp: 1_700_000_000,
            metainfo: None,
            reflog: Some(Digest20::of(b"y")),
        }
    }

    #[test]
    fn body_order_and_round_trip() {
        let m = sample();
        let body = m.body();
        let keys: String = body.lines().map(|l| l.chars().next().unwrap()).collect();
        assert_eq!(keys, "CBRDSGANXHTY");
        let (parsed, block) = Manifest::parse(body.as_bytes()).unwrap();
        assert!(block.is_none());
        assert_eq!(parsed, m);
    }

    #[test]
    fn control_characters_in_values_are_refused() {
        // Found by fuzzing (fuzz/regressions/manifest_whitelist/crash-7f96…): a name ending in
        // \r parsed, but lost the \r when written back (a manifest that does not round-trip).
        let crash = include_bytes!(
            "../../fuzz/regressions/manifest_whitelist/crash-7f965c82564314dd40e171930d295941f2350788"
        );
        let e = Manifest::parse(crash).unwrap_err();
        assert!(e.to_string().contains("control character"), "{e}");
        let body = sample().body().replace("\nN", "\nNname\r");
        let e = Manifest::parse(body.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("key N: control character"), "{e}");
        // CRLF line endings are still line endings.
        let crlf = sample().body().replace('\n', "\r\n");
        assert_eq!(Manifest::parse(crlf.as_bytes()).unwrap().0, sample());
    }

    #[test]
    fn negative_sizes_revisions_and_ttls_are_refused() {
        // Found by fuzzing (fuzz/regressions/manifest_whitelist): `B-7344` parsed and wrapped
        // around to a huge size that did not survive a round trip.
        let body = sample().body();
        for (key, bad) in [('B', "B-7344"), ('S', "S-1"), ('D', "D-240")] {
            let text: String = body
                .lines()
                .map(|l| {
                    if l.starts_with(key) {
                        bad.to_string()
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let e = Manifest::parse(text.as_bytes()).unwrap_err();
            assert!(e.to_string().contains("non-negative"), "{bad}: {e}");
        }
    }

    #[test]
    fn signed_manifest_and_whitelist_verify() {
        let k = RepoKeys::generate("test.example.org", 30).unwrap();
        let signed = sample().sign(&k);
        let (m, block) = Manifest::parse(&signed).unwrap();
        assert_eq!(m, sample());
        let block = block.unwrap();
        verify_manifest(&block, &k.certificate_pem).unwrap();
        let mut bad = signed.clone();
        bad[1] ^= 1; // flip a bit of the root hash
        let (_, bb) = Manifest::parse(&bad).unwrap();
        assert!(verify_manifest(&bb.unwrap(), &k.certificate_pem).is_err());

        let w = make_whitelist(&k, 1_700_000_000, 30).unwrap();
        let wl = Whitelist::parse(&w).unwrap();
        assert_eq!(wl.name, "test.example.org");
        assert_eq!(wl.expires - wl.created, 30 * 86_400);
        assert!(wl.lists(&k.fingerprint().unwrap()));
        wl.verify(&k.master_pub).unwrap();
        let other = RepoKeys::generate("x", 1).unwrap();
        assert!(wl.verify(&other.master_pub).is_err());
    }
}
