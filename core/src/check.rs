//! `repo check`: our `cvmfs_server check` plus `scrub`.
//!
//! Verifies, for the current revision: manifest signature and certificate, whitelist (name,
//! expiry, fingerprint, master-key signature when a key is given), history (`trunk` = manifest),
//! reflog, and every reachable catalog (schema, root entry and transition points, md5path keys,
//! link counts, hardlink groups, chunk lists, nested catalog sizes, the 24 counters, dangling
//! rows), and every referenced object (exists, SHA-1 of its bytes matches its name, decompressed
//! size matches the catalog). Every problem becomes one finding; nothing stops at the first.

use std::collections::HashMap;
use std::io;

use crate::cas::{get_all, Cas, CasError};
use crate::catalog::db::CatalogDb;
use crate::catalog::{flags, Counters, Entry, Kind, Statistics};
use crate::hash::{path_key, Digest20, ObjectId, Suffix};
use crate::history::{History, RefType, Reflog};
use crate::manifest::{verify_manifest, Manifest, Whitelist};
use crate::object::{decode_object, decode_to_vec};
use crate::repo::{MANIFEST, REFLOG, WHITELIST};

/// The result of a check.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<String>,
    pub warnings: Vec<String>,
    pub catalogs: u64,
    pub entries: u64,
    pub objects: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }
    fn bad(&mut self, s: impl Into<String>) {
        self.findings.push(s.into());
    }
}

struct Sink;
impl io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks the repository in `cas`. `master` verifies the whitelist signature when given.
pub fn check(cas: &dyn Cas, master: Option<&rsa::RsaPublicKey>, now: i64) -> Report {
    let mut r = Report::default();
    let manifest_bytes = match cas.get_root_file(MANIFEST) {
        Ok(Some(b)) => b,
        Ok(None) => {
            r.bad("manifest .cvmfspublished is missing");
            return r;
        }
        Err(e) => {
            r.bad(format!("manifest: {e}"));
            return r;
        }
    };
    let (m, block) = match Manifest::parse(&manifest_bytes) {
        Ok(x) => x,
        Err(e) => {
            r.bad(e.to_string());
            return r;
        }
    };
    // Certificate and manifest signature.
    let mut cert_pem = None;
    match m.certificate {
        None => r.bad("manifest has no certificate (X)"),
        Some(x) => match get_all(cas, &x)
            .map_err(|e| e.to_string())
            .and_then(|b| decode_to_vec(&x, &b, true).map_err(|e| e.to_string()))
        {
            Ok(pem) => cert_pem = Some(String::from_utf8_lossy(&pem).into_owned()),
            Err(e) => r.bad(format!("certificate {x}: {e}")),
        },
    }
    match (&block, &cert_pem) {
        (None, _) => r.bad("manifest is not signed"),
        (Some(b), Some(pem)) => {
            if let Err(e) = verify_manifest(b, pem) {
                r.bad(format!("bad manifest signature: {e}"));
            }
        }
        _ => {}
    }
    // Whitelist.
    match cas.get_root_file(WHITELIST) {
        Ok(Some(b)) => match Whitelist::parse(&b) {
            Ok(w) => {
                if w.name != m.name {
                    r.bad(format!(
                        "whitelist is for '{}', manifest for '{}'",
                        w.name, m.name
                    ));
                }
                if w.expires <= now {
                    r.bad(format!(
                        "whitelist expired at {} UTC",
                        crate::timefmt::stamp(w.expires)
                    ));
                }
                if let Some(pem) = &cert_pem {
                    match crate::keys::certificate_fingerprint(pem) {
                        Ok(fp) if !w.lists(&fp) => {
                            r.bad("whitelist does not list the repository certificate")
                        }
                        Err(e) => r.bad(format!("certificate: {e}")),
                        _ => {}
                    }
                }
                match master {
                    Some(k) => {
                        if let Err(e) = w.verify(k) {
                            r.bad(e.to_string());
                        }
                    }
                    None => r.warnings.push(
                        "whitelist signature not verified: no master public key given".into(),
                    ),
                }
            }
            Err(e) => r.bad(e.to_string()),
        },
        Ok(None) => r.bad("whitelist .cvmfswhitelist is missing"),
        Err(e) => r.bad(format!("whitelist: {e}")),
    }
    // History.
    match m.history {
        None => r
            .warnings
            .push("manifest has no history database (H)".into()),
        Some(h) => match get_all(cas, &h)
            .map_err(|e| e.to_string())
            .and_then(|b| decode_to_vec(&h, &b, true).map_err(|e| e.to_string()))
        {
            Err(e) => r.bad(format!("history {h}: {e}")),
            Ok(bytes) => {
                let res = (|| -> Result<(), String> {
                    let tmp = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
                    std::fs::write(tmp.path(), &bytes).map_err(|e| e.to_string())?;
                    let hist = History::open(tmp.path()).map_err(|e| e.to_string())?;
                    match hist.tag("trunk").map_err(|e| e.to_string())? {
                        None => Err("history has no 'trunk' tag".into()),
                        Some(t)
                            if t.hash != m.root_catalog.digest.hex()
                                || t.revision != m.revision =>
                        {
                            Err(format!(
                                "history tag trunk points at {} r{}, manifest at {} r{}",
                                t.hash,
                                t.revision,
                                m.root_catalog.digest.hex(),
                                m.revision
                            ))
                        }
                        Some(_) => Ok(()),
                    }
                })();
                if let Err(e) = res {
                    r.bad(e);
                }
            }
        },
    }
    // Reflog.
    if let Ok(Some(b)) = cas.get_root_file(REFLOG) {
        match m.reflog {
            None => r.bad(".cvmfsreflog exists but the manifest has no reflog hash (Y)"),
            Some(y) if y != Digest20::of(&b) => {
                r.bad("reflog hash in the manifest does not match .cvmfsreflog")
            }
            Some(_) => {
                let res = (|| -> Result<Vec<String>, String> {
                    let tmp = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
                    std::fs::write(tmp.path(), &b).map_err(|e| e.to_string())?;
                    let rl =
                        Reflog::open_or_create(tmp.path(), &m.name).map_err(|e| e.to_string())?;
                    let mut missing = Vec::new();
                    let mut want = vec![(m.root_catalog, RefType::Catalog)];
                    want.extend(m.certificate.map(|x| (x, RefType::Certificate)));
                    want.extend(m.history.map(|h| (h, RefType::History)));
                    for (id, t) in want {
                        if !rl.contains(&id, t).map_err(|e| e.to_string())? {
                            missing.push(format!("reflog does not list {id}"));
                        }
                    }
                    Ok(missing)
                })();
                match res {
                    Ok(v) => r.findings.extend(v),
                    Err(e) => r.bad(format!("reflog: {e}")),
                }
            }
        }
    }
    // Catalogs and objects.
    let mut objects: HashMap<ObjectId, (bool, u64, String)> = HashMap::new();
    let root_stats = check_catalog(
        cas,
        &m.root_catalog,
        "",
        Some(m.root_size),
        None,
        &mut r,
        &mut objects,
        Some(m.revision),
    );
    let _ = root_stats;
    for (id, (compressed, size, path)) in objects {
        r.objects += 1;
        match cas.get(&id) {
            Err(CasError::NotFound(_)) => r.bad(format!("object {id} of {path} is missing")),
            Err(e) => r.bad(format!("object {id} of {path}: {e}")),
            Ok(reader) => match decode_object(&id, reader, compressed, &mut Sink) {
                Err(e) => r.bad(format!("{e} (referenced by {path})")),
                Ok(n) if n != size => r.bad(format!(
                    "object {id} of {path} decompresses to {n} bytes, the catalog says {size}"
                )),
                Ok(_) => {}
            },
        }
    }
    r
}

/// Checks one catalog and everything below it; returns its recomputed totals.
#[allow(clippy::too_many_arguments)]
fn check_catalog(
    cas: &dyn Cas,
    id: &ObjectId,
    mountpoint: &str,
    expected_size: Option<u64>,
    parent_mp_entry: Option<&Entry>,
    r: &mut Report,
    objects: &mut HashMap<ObjectId, (bool, u64, String)>,
    expected_revision: Option<u64>,
) -> Option<Counters> {
    let where_ = if mountpoint.is_empty() {
        "root catalog".to_string()
    } else {
        format!("catalog of {mountpoint}")
    };
    let bytes = match get_all(cas, id)
        .map_err(|e| e.to_string())
        .and_then(|b| decode_to_vec(id, &b, true).map_err(|e| e.to_string()))
    {
        Ok(b) => b,
        Err(e) => {
            r.bad(format!("{where_} {id}: {e}"));
            return None;
        }
    };
    r.catalogs += 1;
    if let Some(s) = expected_size {
        if s != bytes.len() as u64 {
            r.bad(format!(
                "{where_} {id}: size is {} bytes, its parent (or manifest B) says {s}",
                bytes.len()
            ));
        }
    }
    let tmp = match tempfile::NamedTempFile::new() {
        Ok(t) => t,
        Err(e) => {
            r.bad(format!("scratch: {e}"));
            return None;
        }
    };
    if let Err(e) = std::fs::write(tmp.path(), &bytes) {
        r.bad(format!("scratch: {e}"));
        return None;
    }
    let db = match CatalogDb::open(tmp.path(), false) {
        Ok(d) => d,
        Err(e) => {
            r.bad(format!("{where_} {id}: {e}"));
            return None;
        }
    };
    let mut bad = |s: String| r.findings.push(format!("{where_}: {s}"));
    match db.root_prefix() {
        Ok(p) if p != mountpoint => bad(format!("root_prefix is '{p}', expected '{mountpoint}'")),
        Err(e) => bad(e.to_string()),
        _ => {}
    }
    if let Some(rev) = expected_revision {
        match db.revision() {
            Ok(v) if v != rev => bad(format!("revision {v} differs from manifest S{rev}")),
            _ => {}
        }
    }
    // Root entry.
    let root = match db.lookup(mountpoint) {
        Ok(Some(e)) => e,
        Ok(None) => {
            bad("root entry is missing".into());
            return None;
        }
        Err(e) => {
            bad(e.to_string());
            return None;
        }
    };
    if !root.is_dir() {
        bad("root entry is not a directory".into());
    }
    if mountpoint.is_empty() == root.is_nested_root() {
        bad("root entry nested-root flag is wrong".into());
    }
    if let Some(mp) = parent_mp_entry {
        let strip = |e: &Entry| {
            let mut e = e.clone();
            e.flags &= !(flags::DIR_NESTED_MOUNTPOINT | flags::DIR_NESTED_ROOT);
            e.chunks.clear();
            e
        };
        if strip(mp) != strip(&root) {
            bad(format!(
                "transition point {mountpoint} differs between parent and nested root"
            ));
        }
    }
    let nested: HashMap<String, (Option<ObjectId>, u64)> = match db.nested() {
        Ok(v) => v.into_iter().map(|n| (n.path, (n.hash, n.size))).collect(),
        Err(e) => {
            bad(e.to_string());
            HashMap::new()
        }
    };
    // Walk the tree by parent keys, recomputing each path's key.
    let mut visited = 1i64;
    let mut found_mountpoints: Vec<(String, Entry)> = Vec::new();
    let mut groups: HashMap<u32, (u32, u32, String)> = HashMap::new();
    let mut stack = vec![(mountpoint.to_string(), path_key(mountpoint))];
    let mut marker_seen = false;
    while let Some((dir, key)) = stack.pop() {
        let children = match db.list_with_keys(key) {
            Ok(c) => c,
            Err(e) => {
                bad(e.to_string());
                continue;
            }
        };
        let subdirs = children.iter().filter(|(e, _)| e.is_dir()).count() as u32;
        let dir_entry = db.lookup_key(key).ok().flatten();
        if let Some(de) = &dir_entry {
            if !de.is_nested_mountpoint() && de.linkcount != subdirs + 2 {
                bad(format!(
                    "{}: directory link count {} but {} subdirectories",
                    if dir.is_empty() { "/" } else { &dir },
                    de.linkcount,
                    subdirs
                ));
            }
        }
        for (e, keys) in children {
            visited += 1;
            r.entries += 1;
            let path = format!("{dir}/{}", e.name);
            if e.name.is_empty() {
                bad(format!("{dir}: entry with empty name"));
            }
            if keys.path != path_key(&path) {
                bad(format!(
                    "{path}: wrong md5path (stored key does not hash the path)"
                ));
            }
            if keys.xattr_corrupt {
                bad(format!("{path}: malformed xattr blob"));
            }
            if dir == mountpoint && e.name == ".cvmfscatalog" {
                marker_seen = true;
            }
            if e.linkcount == 0 {
                bad(format!("{path}: link count 0"));
            }
            match e.kind() {
                Kind::Directory => {
                    if e.hardlink_group != 0 {
                        bad(format!("{path}: directory in a hardlink group"));
                    }
                    if e.is_nested_mountpoint() {
                        if !nested.contains_key(&path) {
                            bad(format!(
                                "{path}: nested mountpoint not registered in nested_catalogs"
                            ));
                        }
                        match db.list_with_keys(keys.path) {
                            Ok(c) if !c.is_empty() => bad(format!(
                                "{path}: nested catalog mountpoint is not empty in the parent"
                            )),
                            _ => {}
                        }
                        found_mountpoints.push((path.clone(), e.clone()));
                    } else {
                        stack.push((path.clone(), keys.path));
                    }
                }
                Kind::Regular => {
                    let compressed = !e.is_uncompressed();
                    if e.is_chunked() {
                        if e.hash.is_some() {
                            r.warnings
                                .push(format!("{path}: chunked file carries a bulk hash"));
                        }
                        let mut off = 0u64;
                        if e.chunks.is_empty() {
                            bad(format!("{path}: chunked file without chunks"));
                        }
                        for c in &e.chunks {
                            if c.offset != off {
                                bad(format!(
                                    "{path}: chunk list has a gap or overlap at offset {}",
                                    c.offset
                                ));
                            }
                            off = c.offset + c.size;
                            objects
                                .entry(c.id)
                                .or_insert((compressed, c.size, path.clone()));
                        }
                        if off != e.size {
                            bad(format!(
                                "{path}: chunks cover {off} bytes, file size is {}",
                                e.size
                            ));
                        }
                    } else {
                        match e.hash {
                            None => bad(format!("{path}: regular file without content hash")),
                            Some(h) => {
                                objects.entry(ObjectId::new(h, Suffix::None)).or_insert((
                                    compressed,
                                    e.size,
                                    path.clone(),
                                ));
                            }
                        }
                    }
                    if e.hardlink_group > 0 {
                        let g =
                            groups
                                .entry(e.hardlink_group)
                                .or_insert((0, e.linkcount, dir.clone()));
                        g.0 += 1;
                        if g.1 != e.linkcount || g.2 != dir {
                            bad(format!(
                                "{path}: inconsistent hardlink group {}",
                                e.hardlink_group
                            ));
                        }
                    }
                }
                Kind::Symlink => {
                    if e.hash.is_some() {
                        bad(format!("{path}: symlink with a content hash"));
                    }
                }
                Kind::Special => {
                    if e.hash.is_some() {
                        bad(format!("{path}: special file with a content hash"));
                    }
                }
            }
        }
    }
    for (g, (count, linkcount, dir)) in &groups {
        if count != linkcount {
            bad(format!(
                "{dir}: hardlink group {g} has {count} members but link count {linkcount}"
            ));
        }
    }
    if !mountpoint.is_empty() && !marker_seen {
        r.warnings.push(format!(
            "{where_}: nested catalog without .cvmfscatalog marker"
        ));
    }
    match db.row_count() {
        Ok(n) if n != visited => bad(format!(
            "{} dangling rows (rows not reachable from the root entry)",
            n - visited
        )),
        Err(e) => bad(e.to_string()),
        _ => {}
    }
    for p in nested.keys() {
        if !found_mountpoints.iter().any(|(mp, _)| mp == p) {
            bad(format!(
                "nested catalog {p} registered but its mountpoint entry is missing"
            ));
        }
    }
    // Counters.
    let stored = db.read_statistics();
    let self_c = db.compute_self_counters();
    let mut subtree = Counters::default();
    for (mp, mp_entry) in &found_mountpoints {
        if let Some((Some(h), size)) = nested.get(mp) {
            if *size == 0 {
                r.findings
                    .push(format!("{where_}: nested catalog {mp} has size 0"));
            }
            if let Some(t) =
                check_catalog(cas, h, mp, Some(*size), Some(mp_entry), r, objects, None)
            {
                subtree = subtree.add(&t);
            }
        } else {
            r.findings
                .push(format!("{where_}: nested catalog {mp} has no hash"));
        }
    }
    let mut bad = |s: String| r.findings.push(format!("{where_}: {s}"));
    match (stored, self_c) {
        (Ok(stored), Ok(self_c)) => {
            let computed = Statistics {
                self_: self_c,
                subtree,
            };
            for (i, name) in crate::catalog::COUNTER_NAMES.iter().enumerate() {
                if stored.self_.0[i] != computed.self_.0[i] {
                    bad(format!(
                        "counter self_{name} is {} but the rows give {}",
                        stored.self_.0[i], computed.self_.0[i]
                    ));
                }
                if stored.subtree.0[i] != computed.subtree.0[i] {
                    bad(format!(
                        "counter subtree_{name} is {} but nested catalogs give {}",
                        stored.subtree.0[i], computed.subtree.0[i]
                    ));
                }
            }
            Some(computed.total())
        }
        (Err(e), _) | (_, Err(e)) => {
            bad(e.to_string());
            None
        }
    }
}
