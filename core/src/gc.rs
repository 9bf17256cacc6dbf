//! Orphan reclaim for a repository storage, as plain synchronous code.
//!
//! An object may go when no kept revision references it — the current revision, the
//! `keep_revisions - 1` revisions before it (the root catalogs' `previous_revision` chain), and
//! every revision a named tag in the current history database points at — and it is older than
//! the grace period. References are collected by reading every catalog of every kept revision
//! (nested ones included) plus the manifest's certificate, history and meta objects; a catalog
//! that cannot be read aborts the plan: the collector never decides on partial knowledge.
//!
//! Objects of jobs that have not committed yet are not referenced by any revision; the daemon
//! therefore runs a sweep only while no job of the repository is in flight and holds new jobs
//! back until it ends (see `JobManager`), and the grace period covers writers it cannot see.
//! Before deleting, the sweep re-reads the manifest and stops if the repository moved on.

use std::collections::HashSet;
use std::io::Write;

use crate::cas::{get_all, Cas, CasError, StoredObject};
use crate::catalog::db::CatalogDb;
use crate::hash::{Digest20, ObjectId, Suffix};
use crate::history::History;
use crate::object::decode_to_vec;
use crate::repo::current_manifest;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("the storage holds no repository (no manifest)")]
    NoRepository,
    #[error("{what} {id} cannot be read: {msg} — nothing is deleted on partial knowledge")]
    Unreadable {
        what: &'static str,
        id: String,
        msg: String,
    },
    #[error(transparent)]
    Cas(#[from] CasError),
    #[error("the repository moved from revision {planned} to {now} since the plan; run again")]
    Moved { planned: u64, now: u64 },
    #[error("audit log: {0}")]
    Audit(std::io::Error),
    #[error("{0} (garbage collection takes the storage's publish lock too)")]
    Locked(String),
}

/// What to keep and how old a deletable object must be.
#[derive(Debug, Clone)]
pub struct GcPolicy {
    /// Revisions kept counting back from the current one (at least 1).
    pub keep_revisions: usize,
    /// Objects stored less than this many seconds ago are never deleted.
    pub grace_secs: i64,
    /// Tag-name globs (`*` wildcards) whose tags are reported as exempt. Every tag the
    /// history lists keeps its revision: expired automatic tags are dropped from the history by
    /// the next publish ([`crate::repo::TagExpiry`]), never left naming collected catalogs.
    pub exempt_tags: Vec<String>,
}

/// The repository's current manifest; no manifest, or an unreadable one, stops the caller.
fn manifest(cas: &dyn Cas) -> Result<crate::manifest::Manifest, GcError> {
    current_manifest(cas)
        .map_err(|e| GcError::Unreadable {
            what: "manifest",
            id: ".cvmfspublished".into(),
            msg: e.to_string(),
        })?
        .map(|(m, _)| m)
        .ok_or(GcError::NoRepository)
}

/// Whether tag `name` matches one of `globs`.
pub fn tag_exempt(globs: &[String], name: &str) -> bool {
    globs
        .iter()
        .any(|g| crate::lifecycle::glob_match(g, name) && !name.contains('/'))
}

/// The tags of the current history that match `globs`, with their root catalogs.
pub fn exempt_tag_roots(
    cas: &dyn Cas,
    globs: &[String],
) -> Result<Vec<(String, ObjectId)>, GcError> {
    if globs.is_empty() {
        return Ok(Vec::new());
    }
    let m = manifest(cas)?;
    let Some(h) = m.history else {
        return Ok(Vec::new());
    };
    let tmp = scratch_copy(cas, &h, "history")?;
    let hist = History::open(tmp.path()).map_err(|e| unreadable("history", &h, e))?;
    let mut out = Vec::new();
    for t in hist.tags().map_err(|e| unreadable("history", &h, e))? {
        if tag_exempt(globs, &t.name) {
            let d = Digest20::from_hex(&t.hash).map_err(|e| unreadable("history", &h, e))?;
            out.push((t.name, ObjectId::new(d, Suffix::Catalog)));
        }
    }
    Ok(out)
}

/// Whether `name` is an automatic tag: `prepub-` followed by a job id (a UUID).
pub fn is_auto_tag(name: &str) -> bool {
    let Some(id) = name.strip_prefix("prepub-") else {
        return false;
    };
    let parts: Vec<&str> = id.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A revision whose objects are kept, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeptRevision {
    pub root_catalog: String,
    pub revision: Option<u64>,
    pub why: String,
}

/// The outcome of the scan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub revision: u64,
    pub kept: Vec<KeptRevision>,
    /// Objects referenced by the kept revisions.
    pub referenced: usize,
    /// Objects in the storage.
    pub stored: usize,
    /// Unreferenced objects younger than the grace period (kept this time).
    pub young: usize,
    /// Unreferenced objects old enough: deleted by a sweep.
    #[serde(skip)]
    pub candidates: Vec<(ObjectId, u64)>,
    pub candidate_count: usize,
    pub candidate_bytes: u64,
}

fn unreadable(what: &'static str, id: &ObjectId, e: impl ToString) -> GcError {
    GcError::Unreadable {
        what,
        id: id.to_string(),
        msg: e.to_string(),
    }
}

/// Decompresses a SQLite object (catalog, history) into a scratch file.
fn scratch_copy(
    cas: &dyn Cas,
    id: &ObjectId,
    what: &'static str,
) -> Result<tempfile::NamedTempFile, GcError> {
    let bytes = get_all(cas, id).map_err(|e| unreadable(what, id, e))?;
    let plain = decode_to_vec(id, &bytes, true).map_err(|e| unreadable(what, id, e))?;
    let tmp = tempfile::NamedTempFile::new().map_err(|e| unreadable(what, id, e))?;
    std::fs::write(tmp.path(), &plain).map_err(|e| unreadable(what, id, e))?;
    Ok(tmp)
}

/// Reads a catalog object into a scratch SQLite file.
fn open_catalog(
    cas: &dyn Cas,
    id: &ObjectId,
) -> Result<(tempfile::NamedTempFile, CatalogDb), GcError> {
    let tmp = scratch_copy(cas, id, "catalog")?;
    let db = CatalogDb::open(tmp.path(), false).map_err(|e| unreadable("catalog", id, e))?;
    Ok((tmp, db))
}

/// Adds every object of the revision rooted at `root` (catalogs and data) to `refs`.
fn collect_revision(
    cas: &dyn Cas,
    root: &ObjectId,
    refs: &mut HashSet<ObjectId>,
) -> Result<(), GcError> {
    let mut todo = vec![*root];
    while let Some(cat) = todo.pop() {
        if !refs.insert(cat) {
            continue; // a catalog shared with a revision already walked
        }
        let (_tmp, db) = open_catalog(cas, &cat)?;
        refs.extend(
            db.object_refs()
                .map_err(|e| unreadable("catalog", &cat, e))?,
        );
        for n in db.nested().map_err(|e| unreadable("catalog", &cat, e))? {
            match n.hash {
                Some(h) => todo.push(h),
                None => {
                    return Err(unreadable(
                        "catalog",
                        &cat,
                        format!("nested catalog {} has no hash", n.path),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// The revisions to keep and everything they reference.
pub fn references(
    cas: &dyn Cas,
    policy: &GcPolicy,
) -> Result<(u64, Vec<KeptRevision>, HashSet<ObjectId>), GcError> {
    let m = manifest(cas)?;
    let mut refs: HashSet<ObjectId> = HashSet::new();
    refs.extend(m.certificate);
    refs.extend(m.history);
    refs.extend(m.metainfo);
    let mut kept = Vec::new();
    // The current revision and the ones before it.
    let mut root = Some(m.root_catalog);
    let mut revision = Some(m.revision);
    for i in 0..policy.keep_revisions.max(1) {
        let Some(r) = root else { break };
        collect_revision(cas, &r, &mut refs)?;
        kept.push(KeptRevision {
            root_catalog: r.digest.hex(),
            revision,
            why: if i == 0 {
                "current".into()
            } else {
                format!("{i} before current")
            },
        });
        let (_tmp, db) = open_catalog(cas, &r)?;
        root = match db
            .property("previous_revision")
            .map_err(|e| unreadable("catalog", &r, e))?
        {
            Some(h) if !h.is_empty() => Some(ObjectId::new(
                Digest20::from_hex(&h).map_err(|e| unreadable("catalog", &r, e))?,
                Suffix::Catalog,
            )),
            _ => None,
        };
        revision = revision.and_then(|v| v.checked_sub(1));
    }
    // Every named tag.
    if let Some(h) = m.history {
        let tmp = scratch_copy(cas, &h, "history")?;
        let hist = History::open(tmp.path()).map_err(|e| unreadable("history", &h, e))?;
        for t in hist.tags().map_err(|e| unreadable("history", &h, e))? {
            let exempt = tag_exempt(&policy.exempt_tags, &t.name);
            let d = Digest20::from_hex(&t.hash).map_err(|e| unreadable("history", &h, e))?;
            let root = ObjectId::new(d, Suffix::Catalog);
            if kept.iter().any(|k| k.root_catalog == t.hash) {
                continue;
            }
            collect_revision(cas, &root, &mut refs)?;
            kept.push(KeptRevision {
                root_catalog: t.hash.clone(),
                revision: Some(t.revision),
                why: if exempt {
                    format!("tag {} (exempt)", t.name)
                } else {
                    format!("tag {}", t.name)
                },
            });
        }
    }
    Ok((m.revision, kept, refs))
}

/// Scans the storage: what is referenced, what is not, and what of that is old enough to go.
pub fn plan(cas: &dyn Cas, policy: &GcPolicy, now: i64) -> Result<Plan, GcError> {
    let (revision, kept, refs) = references(cas, policy)?;
    // Sizes and times from the listing when it has them (S3: no request per object), else
    // asked per unreferenced object.
    let stored: Vec<(ObjectId, Option<StoredObject>)> = match cas.list_stat()? {
        Some(v) => v.into_iter().map(|o| (o.id, Some(o))).collect(),
        None => cas.list()?.into_iter().map(|id| (id, None)).collect(),
    };
    let mut young = 0;
    let mut candidates = Vec::new();
    for (id, listed) in &stored {
        if refs.contains(id) {
            continue;
        }
        let t = match listed.map_or_else(|| cas.modified(id), |o| Ok(o.modified)) {
            Ok(t) => t,
            Err(CasError::NotFound(_)) => continue, // gone meanwhile
            Err(e) => return Err(e.into()),
        };
        if now - t < policy.grace_secs {
            young += 1;
            continue;
        }
        let size = match listed.map_or_else(|| cas.size(id), |o| Ok(o.size)) {
            Ok(s) => s,
            Err(CasError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        candidates.push((*id, size));
    }
    candidates.sort();
    Ok(Plan {
        revision,
        kept,
        referenced: refs.len(),
        stored: stored.len(),
        young,
        candidate_count: candidates.len(),
        candidate_bytes: candidates.iter().map(|(_, s)| s).sum(),
        candidates,
    })
}

/// What a sweep did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Swept {
    pub deleted: usize,
    pub bytes: u64,
    /// `proceed` said stop before every candidate was deleted.
    pub stopped: bool,
}

/// Deletes the plan's candidates, at most `max_per_sec` per second (0: unlimited), appending one
/// line per deletion to `audit` (`<unix time> <repo> deleted <object> <bytes>`). Stops with
/// [`GcError::Moved`] if the repository's revision changed since the plan. `proceed` is asked
/// before each deletion; when it says no the sweep stops there (`stopped`).
pub fn sweep(
    cas: &dyn Cas,
    repo: &str,
    plan: &Plan,
    max_per_sec: u64,
    audit: &mut dyn Write,
    now: impl Fn() -> i64,
    proceed: &mut dyn FnMut() -> bool,
) -> Result<Swept, GcError> {
    let current = current_manifest(cas)
        .ok()
        .flatten()
        .map(|(m, _)| m.revision)
        .unwrap_or(0);
    if current != plan.revision {
        return Err(GcError::Moved {
            planned: plan.revision,
            now: current,
        });
    }
    let mut out = Swept::default();
    let start = std::time::Instant::now();
    for (i, (id, size)) in plan.candidates.iter().enumerate() {
        if max_per_sec > 0 {
            let due = std::time::Duration::from_secs_f64(i as f64 / max_per_sec as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if !proceed() {
            out.stopped = true;
            break;
        }
        cas.delete(id)?;
        writeln!(audit, "{} {repo} deleted {id} {size}", now()).map_err(GcError::Audit)?;
        out.deleted += 1;
        out.bytes += size;
    }
    audit.flush().map_err(GcError::Audit)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::LocalCas;

    #[test]
    fn automatic_tags_are_recognised() {
        assert!(is_auto_tag("prepub-0b8f52b4-8a0e-4b7e-9d35-6f0a3c1e2d4f"));
        assert!(!is_auto_tag("prepub-release"));
        assert!(!is_auto_tag("app-1.0"));
        assert!(!is_auto_tag("prepub-0b8f52b4-8a0e-4b7e-9d35-6f0a3c1e2d4"));
    }

    #[test]
    fn exempt_tag_globs() {
        let g = vec!["lts-*".to_string(), "prepub-0b8f52b4-*".to_string()];
        assert!(tag_exempt(&g, "lts-2024"));
        assert!(tag_exempt(
            &g,
            "prepub-0b8f52b4-8a0e-4b7e-9d35-6f0a3c1e2d4f"
        ));
        assert!(!tag_exempt(&g, "nightly-2024"));
        assert!(!tag_exempt(&g, "lts-2024/x"));
        assert!(!tag_exempt(&[], "lts-2024"));
    }

    #[test]
    fn unreadable_catalogs_abort_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("repo");
        let cas = LocalCas::create(&storage).unwrap();
        let keys = crate::keys::RepoKeys::generate("gc.example.org", 30).unwrap();
        crate::repo::init(&cas, &keys, 0, 0, crate::timefmt::now()).unwrap();
        let policy = GcPolicy {
            keep_revisions: 2,
            grace_secs: 0,
            exempt_tags: Vec::new(),
        };
        let p = plan(&cas, &policy, crate::timefmt::now()).unwrap();
        assert_eq!(p.candidate_count, 0, "a fresh repository has no orphans");
        assert_eq!(p.kept[0].why, "current");
        // An orphan, old enough.
        let orphan = ObjectId::new(Digest20::of(b"orphan"), Suffix::None);
        cas.put_bytes(&orphan, b"orphan").unwrap();
        let p = plan(&cas, &policy, crate::timefmt::now() + 10).unwrap();
        assert_eq!(p.candidates, vec![(orphan, 6)]);
        // Inside the grace period it stays.
        let strict = GcPolicy {
            keep_revisions: 2,
            grace_secs: 3600,
            exempt_tags: Vec::new(),
        };
        let p = plan(&cas, &strict, crate::timefmt::now()).unwrap();
        assert_eq!((p.candidate_count, p.young), (0, 1));
        // A damaged root catalog: no plan at all.
        let (m, _) = current_manifest(&cas).unwrap().unwrap();
        std::fs::write(storage.join(m.root_catalog.path()), b"garbage").unwrap();
        let e = plan(&cas, &policy, crate::timefmt::now()).unwrap_err();
        assert!(
            e.to_string()
                .contains("nothing is deleted on partial knowledge"),
            "{e}"
        );
    }
}
