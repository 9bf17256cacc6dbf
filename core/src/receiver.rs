//! The Stratum 1 side of pre-warming, as plain synchronous code: per-repository storages, an
//! in-memory Bloom filter of the objects each holds (built at start-up from a listing, updated on
//! every write), inventory answers confirmed on disk (a false positive of the filter never makes
//! a missing object look present), verified object writes (SHA-1 of the bytes must equal the name;
//! catalog objects are refused, because a Stratum 1 that already has a catalog skips its whole
//! subtree on the next replication — cvmfs-formats.md §6.3), and request signatures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

use crate::cas::{Cas, CasError, PutOutcome};
use crate::hash::{Digest20, ObjectId, Suffix};

/// A Bloom filter over object digests (which are uniformly random, so slices of the digest
/// serve as the hash functions).
pub struct Bloom {
    bits: Vec<u64>,
    m: u64,
}

impl Bloom {
    /// A filter for about `n` objects at ~1 % false positives (10 bits and 7 probes per object).
    pub fn with_capacity(n: usize) -> Bloom {
        let m = ((n.max(1024) as u64) * 10).next_power_of_two();
        Bloom {
            bits: vec![0; (m / 64) as usize],
            m,
        }
    }

    fn probes(d: &Digest20) -> [u64; 7] {
        let b = &d.0;
        let h1 = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let h2 = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]) | 1;
        let mut out = [0u64; 7];
        for (i, o) in out.iter_mut().enumerate() {
            *o = h1.wrapping_add((i as u64).wrapping_mul(h2));
        }
        out
    }

    pub fn insert(&mut self, d: &Digest20) {
        for p in Self::probes(d) {
            let bit = p & (self.m - 1);
            self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    pub fn maybe_contains(&self, d: &Digest20) -> bool {
        Self::probes(d).iter().all(|p| {
            let bit = p & (self.m - 1);
            self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("repository {0} is not served here")]
    UnknownRepo(String),
    #[error("catalog objects are never pre-placed on a Stratum 1 (they are replicated)")]
    Catalog,
    #[error("object {id}: content hash is {actual}")]
    Tampered { id: ObjectId, actual: Digest20 },
    #[error(transparent)]
    Cas(#[from] CasError),
}

/// One repository's storage on this Stratum 1.
pub struct Store {
    pub cas: Arc<dyn Cas>,
    filter: Mutex<Bloom>,
}

/// All repositories of this receiver.
pub struct Receiver {
    stores: HashMap<String, Store>,
}

impl Receiver {
    /// Builds the filters by listing every storage.
    pub fn new(stores: Vec<(String, Arc<dyn Cas>)>) -> Result<Receiver, CasError> {
        let mut map = HashMap::new();
        for (name, cas) in stores {
            let ids = cas.list()?;
            let mut f = Bloom::with_capacity(ids.len() * 2);
            for id in &ids {
                f.insert(&id.digest);
            }
            map.insert(
                name,
                Store {
                    cas,
                    filter: Mutex::new(f),
                },
            );
        }
        Ok(Receiver { stores: map })
    }

    pub fn store(&self, repo: &str) -> Result<&Store, ReceiveError> {
        self.stores
            .get(repo)
            .ok_or_else(|| ReceiveError::UnknownRepo(repo.to_string()))
    }

    pub fn repos(&self) -> Vec<String> {
        let mut v: Vec<String> = self.stores.keys().cloned().collect();
        v.sort();
        v
    }

    /// Which of `ids` this repository lacks. The filter answers "absent" for sure; "present"
    /// is confirmed on disk.
    pub fn missing(&self, repo: &str, ids: &[ObjectId]) -> Result<Vec<ObjectId>, ReceiveError> {
        let s = self.store(repo)?;
        let mut out = Vec::new();
        for id in ids {
            let maybe = s
                .filter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .maybe_contains(&id.digest);
            if !maybe || !s.cas.exists(id)? {
                out.push(*id);
            }
        }
        Ok(out)
    }

    /// Verifies and stores one object.
    pub fn put(&self, repo: &str, id: &ObjectId, bytes: &[u8]) -> Result<PutOutcome, ReceiveError> {
        Ok(self.put_all(repo, &[(*id, bytes)])?[0])
    }

    /// Verifies every object against its name, then stores them together: the storage's batch
    /// (one filesystem sync shared with the batches written meanwhile, instead of an fsync of
    /// each object and its directory). Nothing is stored when one of them is refused; when
    /// the storage fails one, the first failure is the answer (the others may be stored).
    pub fn put_all(
        &self,
        repo: &str,
        objects: &[(ObjectId, &[u8])],
    ) -> Result<Vec<PutOutcome>, ReceiveError> {
        let s = self.store(repo)?;
        for (id, bytes) in objects {
            if id.suffix == Suffix::Catalog {
                return Err(ReceiveError::Catalog);
            }
            let actual = Digest20::of(bytes);
            if actual != id.digest {
                return Err(ReceiveError::Tampered { id: *id, actual });
            }
        }
        let stored = s.cas.put_many(objects);
        // The filter learns every object stored, also when another one failed.
        let mut filter = s.filter.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(stored.len());
        let mut failed = None;
        for ((id, _), r) in objects.iter().zip(stored) {
            match r {
                Ok(o) => {
                    filter.insert(&id.digest);
                    out.push(o);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(out),
        }
    }
}

/// Most object names one inventory request may ask about (a publisher asks in batches of
/// 5,000), and the most bytes its body may have: a receiver holds the request whole while it
/// answers, so this, not `server.max_body_size`, bounds what one request costs it.
pub const INVENTORY_MAX: usize = 50_000;
pub const INVENTORY_BODY_MAX: usize = INVENTORY_MAX * 64;

/// The body of an inventory request (`{"objects": ["<hash>[suffix]", …]}`): the object names,
/// or why the body is refused.
pub fn parse_inventory(body: &[u8]) -> Result<Vec<ObjectId>, String> {
    #[derive(serde::Deserialize)]
    struct Inventory {
        objects: Names,
    }
    let inv: Inventory = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    Ok(inv.objects.0)
}

/// The names of an inventory, parsed one by one: a list longer than [`INVENTORY_MAX`] is
/// refused at the name past it, before more is held.
struct Names(Vec<ObjectId>);

impl<'de> serde::Deserialize<'de> for Names {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Names, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Names;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a list of at most {INVENTORY_MAX} object names")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Names, A::Error> {
                use serde::de::Error;
                let mut out = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    if out.len() == INVENTORY_MAX {
                        return Err(A::Error::custom(format!(
                            "more than {INVENTORY_MAX} object names in one inventory"
                        )));
                    }
                    let id = ObjectId::parse(&name)
                        .map_err(|_| A::Error::custom("an object name is not a hash"))?;
                    out.push(id);
                }
                Ok(Names(out))
            }
        }
        d.deserialize_seq(Visit)
    }
}

/// The string a receiver request signature covers: method, path, SHA-256 of the body (hex), the
/// timestamp and a per-request nonce (which makes every request unique, so a replay within the
/// time window is recognised), one per line.
pub fn signing_string(
    method: &str,
    path: &str,
    body_sha256_hex: &str,
    timestamp: i64,
    nonce: &str,
) -> String {
    format!("{method}\n{path}\n{body_sha256_hex}\n{timestamp}\n{nonce}")
}

/// The header a signed request carries with the hex SHA-256 of its body. The signature covers
/// that digest, so the receiver checks the signature before it reads the body (a forged request
/// is refused without being read), then the body against the digest as it arrives.
pub const BODY_DIGEST_HEADER: &str = "X-Prepub-Content-Sha256";

/// Hex SHA-256 of a request body, as signed and sent in [`BODY_DIGEST_HEADER`].
pub fn body_digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// HMAC-SHA256 (hex) of the signing string.
pub fn sign(
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
    timestamp: i64,
    nonce: &str,
) -> String {
    sign_digest(secret, method, path, &body_digest(body), timestamp, nonce)
}

/// [`sign`] given the body's digest ([`body_digest`]) instead of the body.
pub fn sign_digest(
    secret: &[u8],
    method: &str,
    path: &str,
    body_sha256_hex: &str,
    timestamp: i64,
    nonce: &str,
) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(signing_string(method, path, body_sha256_hex, timestamp, nonce).as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// Checks a signature in constant time.
pub fn verify(
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
    timestamp: i64,
    nonce: &str,
    given_hex: &str,
) -> bool {
    verify_digest(
        secret,
        method,
        path,
        &body_digest(body),
        timestamp,
        nonce,
        given_hex,
    )
}

/// [`verify`] given the body's digest instead of the body.
pub fn verify_digest(
    secret: &[u8],
    method: &str,
    path: &str,
    body_sha256_hex: &str,
    timestamp: i64,
    nonce: &str,
    given_hex: &str,
) -> bool {
    let want = sign_digest(secret, method, path, body_sha256_hex, timestamp, nonce);
    want.len() == given_hex.len()
        && want
            .bytes()
            .zip(given_hex.bytes())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0
}

/// Short-lived bearer tokens for the data channel, handed to a publisher in an MQTT ready
/// answer. Each is scoped to one repository; only the SHA-256 of a token is kept.
#[derive(Default)]
pub struct UploadTokens {
    held: Mutex<HashMap<[u8; 32], (String, std::time::Instant)>>,
}

impl UploadTokens {
    /// A new random token (43 alphanumeric characters, ~256 bits) for `repo`, valid for `ttl`.
    pub fn issue(&self, repo: &str, ttl: std::time::Duration) -> String {
        use rand::Rng;
        let token: String = rand::rngs::OsRng
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(43)
            .map(char::from)
            .collect();
        let now = std::time::Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|_, (_, until)| *until > now);
        held.insert(
            Sha256::digest(token.as_bytes()).into(),
            (repo.to_string(), now + ttl),
        );
        token
    }

    /// Whether `token` is a live token for `repo`.
    pub fn check(&self, repo: &str, token: &str) -> bool {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        matches!(held.get(&key), Some((r, until)) if r == repo && *until > std::time::Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::LocalCas;
    use crate::hash::Suffix;

    #[test]
    fn an_inventory_is_refused_at_the_name_past_the_most_it_may_hold() {
        let names = |n: usize, bad: Option<usize>| {
            let list: Vec<String> = (0..n)
                .map(|i| match bad {
                    Some(b) if b == i => "not-a-hash".to_string(),
                    _ => {
                        let mut d = [0u8; 20];
                        d[..8].copy_from_slice(&(i as u64).to_be_bytes());
                        ObjectId::new(Digest20(d), Suffix::Partial).to_string()
                    }
                })
                .collect();
            serde_json::to_vec(&serde_json::json!({ "objects": list })).unwrap()
        };
        let ids = parse_inventory(&names(INVENTORY_MAX, None)).unwrap();
        assert_eq!(ids.len(), INVENTORY_MAX);
        assert_eq!(ids[5].suffix, Suffix::Partial);
        let e = parse_inventory(&names(INVENTORY_MAX + 1, None)).unwrap_err();
        assert!(e.contains("more than 50000 object names"), "{e}");
        let e = parse_inventory(&names(3, Some(1))).unwrap_err();
        assert!(e.contains("not a hash"), "{e}");
        assert!(parse_inventory(b"{}").is_err());
        assert!(parse_inventory(br#"{"objects": "x"}"#).is_err());
    }

    #[test]
    fn bloom_has_no_false_negatives() {
        let mut b = Bloom::with_capacity(1000);
        let ds: Vec<Digest20> = (0..1000u32)
            .map(|i| Digest20::of(&i.to_le_bytes()))
            .collect();
        for d in &ds {
            b.insert(d);
        }
        assert!(ds.iter().all(|d| b.maybe_contains(d)));
        let fp = (1000..11000u32)
            .filter(|i| b.maybe_contains(&Digest20::of(&i.to_le_bytes())))
            .count();
        assert!(fp < 300, "false positive rate too high: {fp}/10000");
    }

    #[test]
    fn receiver_verifies_refuses_catalogs_and_confirms_presence() {
        let dir = tempfile::tempdir().unwrap();
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::create(dir.path()).unwrap().without_fsync());
        let present = ObjectId::new(Digest20::of(b"old"), Suffix::None);
        cas.put_bytes(&present, b"old").unwrap();
        let r = Receiver::new(vec![("r.org".into(), cas.clone())]).unwrap();
        let new = ObjectId::new(Digest20::of(b"new"), Suffix::Partial);
        assert_eq!(r.missing("r.org", &[present, new]).unwrap(), vec![new]);
        assert!(matches!(
            r.put("r.org", &new, b"NEW"),
            Err(ReceiveError::Tampered { .. })
        ));
        assert!(matches!(
            r.put(
                "r.org",
                &ObjectId::new(Digest20::of(b"c"), Suffix::Catalog),
                b"c"
            ),
            Err(ReceiveError::Catalog)
        ));
        assert_eq!(r.put("r.org", &new, b"new").unwrap(), PutOutcome::Stored);
        assert!(r.missing("r.org", &[new]).unwrap().is_empty());
        // Removed behind the filter's back: the disk check catches it.
        std::fs::remove_file(dir.path().join(new.path())).unwrap();
        assert_eq!(r.missing("r.org", &[new]).unwrap(), vec![new]);
        assert!(matches!(
            r.missing("other", &[new]),
            Err(ReceiveError::UnknownRepo(_))
        ));
    }

    #[test]
    fn a_batch_is_verified_whole_before_any_of_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::create(dir.path()).unwrap());
        let r = Receiver::new(vec![("r.org".into(), cas.clone())]).unwrap();
        let obj = |b: &'static [u8]| (ObjectId::new(Digest20::of(b), Suffix::None), b);
        let (a, b, c) = (obj(b"a"), obj(b"b"), obj(b"c"));
        // One object that does not match its name: none of the batch is stored.
        let tampered = (c.0, &b"not c"[..]);
        assert!(matches!(
            r.put_all("r.org", &[(a.0, a.1), (b.0, b.1), tampered]),
            Err(ReceiveError::Tampered { id, .. }) if id == c.0
        ));
        assert!(!cas.exists(&a.0).unwrap() && !cas.exists(&b.0).unwrap());
        let catalog = ObjectId::new(Digest20::of(b"d"), Suffix::Catalog);
        assert!(matches!(
            r.put_all("r.org", &[(a.0, a.1), (catalog, &b"d"[..])]),
            Err(ReceiveError::Catalog)
        ));
        assert!(!cas.exists(&a.0).unwrap());
        // A sound batch is stored whole (durably: the store syncs before it answers), an
        // object already there reported as such, and the filter learns them.
        assert_eq!(r.put("r.org", &b.0, b.1).unwrap(), PutOutcome::Stored);
        let all = [(a.0, a.1), (b.0, b.1), (c.0, c.1)];
        assert_eq!(
            r.put_all("r.org", &all).unwrap(),
            vec![
                PutOutcome::Stored,
                PutOutcome::AlreadyPresent,
                PutOutcome::Stored
            ]
        );
        for (id, bytes) in all {
            assert_eq!(std::fs::read(dir.path().join(id.path())).unwrap(), bytes);
        }
        assert!(r.missing("r.org", &[a.0, b.0, c.0]).unwrap().is_empty());
    }

    /// A local store that refuses to store one object.
    struct Refusing {
        inner: LocalCas,
        refused: ObjectId,
    }

    impl Cas for Refusing {
        fn exists(&self, id: &ObjectId) -> Result<bool, CasError> {
            self.inner.exists(id)
        }
        fn put_bytes(&self, id: &ObjectId, data: &[u8]) -> Result<PutOutcome, CasError> {
            if *id == self.refused {
                return Err(CasError::Unsupported("this object"));
            }
            self.inner.put_bytes(id, data)
        }
        fn begin(&self) -> Result<Box<dyn crate::cas::PendingObject>, CasError> {
            self.inner.begin()
        }
        fn get(&self, id: &ObjectId) -> Result<Box<dyn std::io::Read + Send>, CasError> {
            self.inner.get(id)
        }
        fn size(&self, id: &ObjectId) -> Result<u64, CasError> {
            self.inner.size(id)
        }
        fn list(&self) -> Result<Vec<ObjectId>, CasError> {
            self.inner.list()
        }
        fn put_root_file(&self, name: &str, data: &[u8]) -> Result<(), CasError> {
            self.inner.put_root_file(name, data)
        }
        fn get_root_file(&self, name: &str) -> Result<Option<Vec<u8>>, CasError> {
            self.inner.get_root_file(name)
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    #[test]
    fn a_store_failure_fails_the_batch_but_the_objects_stored_are_known_present() {
        let dir = tempfile::tempdir().unwrap();
        let id = |b: &[u8]| ObjectId::new(Digest20::of(b), Suffix::None);
        let cas: Arc<dyn Cas> = Arc::new(Refusing {
            inner: LocalCas::create(dir.path()).unwrap().without_fsync(),
            refused: id(b"b"),
        });
        let r = Receiver::new(vec![("r.org".into(), cas)]).unwrap();
        let batch = [(id(b"a"), &b"a"[..]), (id(b"b"), b"b"), (id(b"c"), b"c")];
        assert!(matches!(
            r.put_all("r.org", &batch),
            Err(ReceiveError::Cas(CasError::Unsupported(_)))
        ));
        // The inventory asks for the refused one only: the filter learned the others, also
        // the one after the failure.
        assert_eq!(
            r.missing("r.org", &[id(b"a"), id(b"b"), id(b"c")]).unwrap(),
            vec![id(b"b")]
        );
    }

    #[test]
    fn signatures_cover_method_path_body_and_time() {
        let s = sign(b"k", "PUT", "/p", b"body", 100, "n1");
        assert!(verify(b"k", "PUT", "/p", b"body", 100, "n1", &s));
        assert!(!verify(b"k", "POST", "/p", b"body", 100, "n1", &s));
        assert!(!verify(b"k", "PUT", "/q", b"body", 100, "n1", &s));
        assert!(!verify(b"k", "PUT", "/p", b"bodx", 100, "n1", &s));
        assert!(!verify(b"k", "PUT", "/p", b"body", 101, "n1", &s));
        assert!(!verify(b"k", "PUT", "/p", b"body", 100, "n2", &s));
        assert!(!verify(b"x", "PUT", "/p", b"body", 100, "n1", &s));
    }

    #[test]
    fn upload_tokens_are_scoped_and_expire() {
        let t = UploadTokens::default();
        let a = t.issue("a.org", std::time::Duration::from_secs(60));
        assert_eq!(a.len(), 43);
        assert!(t.check("a.org", &a));
        assert!(!t.check("b.org", &a));
        assert!(!t.check("a.org", "nope"));
        let short = t.issue("a.org", std::time::Duration::from_millis(1));
        assert_ne!(short, a);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(!t.check("a.org", &short));
        assert!(t.check("a.org", &a));
    }
}
