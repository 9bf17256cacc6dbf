//! A repository storage as a whole: create it, publish change sets as new signed revisions,
//! and read its current state.
//!
//! In: a [`Cas`] holding the storage, the repository keys, change sets from tar intake.
//! Out: new catalogs, history, reflog, certificate object, and finally the signed
//! `.cvmfspublished` — always written last, so a crash at any point leaves the previous
//! revision intact and readable (everything written before it is unreferenced content).
//! A lock file serialises publishers on one storage.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::cas::{get_all, Cas, CasError};
use crate::catalog::tree::{BuiltSubtree, CatalogTree, CommitResult, Mounted, TreeError};
use crate::catalog::{split_path, Entry, Kind};
use crate::hash::{Digest20, ObjectId, Suffix};
use crate::history::{valid_tag_name, History, HistoryError, RefType, Reflog, Tag};
use crate::intake::{ChangeSet, Node};
use crate::keys::RepoKeys;
use crate::manifest::{make_whitelist, verify_manifest, Manifest, ManifestError, Whitelist};
use crate::object::{
    compress_metadata, decode_to_vec, encode_file, DecodeError, EncodeParams, FileContent,
};

pub const MANIFEST: &str = ".cvmfspublished";
pub const WHITELIST: &str = ".cvmfswhitelist";
pub const REFLOG: &str = ".cvmfsreflog";
pub const MASTER_REPLICA: &str = ".cvmfs_master_replica";
/// Default whitelist validity (upstream: 30 days with a master key).
pub const WHITELIST_DAYS: i64 = 30;

/// Errors of repository operations.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Cas(#[from] CasError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error("{0}")]
    Invalid(String),
    #[error("scratch space: {0}")]
    Scratch(#[from] std::io::Error),
    #[error("publish cancelled before the manifest was written")]
    Cancelled,
    #[error("tag '{0}' exists and is not this token's: a scoped token may name a new tag or move one of its own")]
    TagTaken(String),
}

impl RepoError {
    /// Whether the same publish may succeed if retried (storage trouble, not bad content).
    pub fn is_retryable(&self) -> bool {
        match self {
            RepoError::Cas(e) => e.is_retryable(),
            RepoError::Scratch(_) => true,
            RepoError::Tree(TreeError::Cas(e)) => e.is_retryable(),
            RepoError::Tree(TreeError::Scratch(..)) => true,
            _ => false,
        }
    }
}

/// How a change set is applied at its target path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    /// Everything under the target is replaced by the change set.
    Replace,
    /// Entries of the change set are added or overwrite existing ones; others stay.
    Merge,
}

/// A named tag to add with a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRequest {
    pub name: String,
    pub description: String,
    /// The scoped token the publishing job belongs to: the publish fails
    /// ([`RepoError::TagTaken`]) if the history has this tag already and it is not that
    /// token's (see [`tag_owner`]). `None` (admin jobs, operator commands): any tag may move.
    /// The description should carry [`owner_note`] then, so that the tag is the token's.
    pub owner: Option<String>,
}

const OWNER_NOTE: &str = "[cvmfs-prepub owner ";

/// The note the service appends to the description of a tag a scoped token's job makes or
/// moves (after the client's text; in gateway mode the job marker follows): the token's name.
pub fn owner_note(owner: &str) -> String {
    format!("{OWNER_NOTE}{owner}]")
}

/// The scoped token a tag belongs to: the name in the last [`owner_note`] of its description
/// (the service appends the note after the client's text, so a note a client wrote into its
/// own description never counts).
pub fn tag_owner(description: &str) -> Option<&str> {
    let rest = &description[description.rfind(OWNER_NOTE)? + OWNER_NOTE.len()..];
    Some(&rest[..rest.find(']')?])
}

/// Whether a publish may give its revision the tag `want`, which the history holds as
/// `existing`: always for a new tag or a job without an owner; otherwise only if the tag is the
/// owner's. A scoped token thus never moves a tag that an operator, an admin-token job or
/// another token made.
pub fn may_take_tag(want: &TagRequest, existing: Option<&Tag>) -> Result<(), RepoError> {
    match (&want.owner, existing) {
        (Some(owner), Some(t)) if tag_owner(&t.description) != Some(owner.as_str()) => {
            Err(RepoError::TagTaken(want.name.clone()))
        }
        _ => Ok(()),
    }
}

/// Which automatic tags (`prepub-<job id>`) a publish drops from the history: those older than
/// `span_secs`, unless a glob of `exempt` names them. Dropped at publish, as `cvmfs_server` drops
/// expired automatic tags, so a tag the history lists always names a revision that garbage
/// collection keeps. Given only for a garbage-collected repository: the manifest then says so
/// (`G=yes`), as upstream's for `CVMFS_GARBAGE_COLLECTION=true` — a Stratum 1 replicating the
/// history skips revisions already collected, and may collect its own copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagExpiry {
    pub span_secs: i64,
    pub exempt: Vec<String>,
}

/// The outcome of a publish.
#[derive(Debug, Clone)]
pub struct Published {
    pub manifest: Manifest,
    pub commit: CommitResult,
    /// Expired automatic tags the publish dropped from the history.
    pub expired_tags: Vec<String>,
}

/// Normalises a repository path given by a user (`/a/b/`, `a/b`) to catalog form (`/a/b`,
/// `""` for the root), refusing `..`, `.` and NUL.
pub fn normalize_repo_path(p: &str) -> Result<String, RepoError> {
    let mut out = String::new();
    for c in p.split('/') {
        match c {
            "" => continue,
            "." | ".." => return Err(RepoError::Invalid(format!("path '{p}' contains '{c}'"))),
            c if c.contains('\0') => {
                return Err(RepoError::Invalid(format!("path '{p}' contains NUL")))
            }
            c => {
                out.push('/');
                out.push_str(c);
            }
        }
    }
    if out == "/.cvmfs" || out.starts_with("/.cvmfs/") {
        return Err(RepoError::Invalid(format!(
            "path '{p}' is reserved by CVMFS"
        )));
    }
    Ok(out)
}

/// Joins a catalog path and a relative path.
pub fn join(base: &str, rel: &str) -> String {
    if rel.is_empty() {
        return base.to_string();
    }
    // Pushed, not `format!`ted: the catalog builder joins every entry of a release, and the
    // formatting machinery was 7 % of its time.
    let mut path = String::with_capacity(base.len() + 1 + rel.len());
    path.push_str(base);
    path.push('/');
    path.push_str(rel);
    path
}

/// Holds the publish lock of a storage for its lifetime.
pub struct PublishLock {
    _file: fs::File,
}

/// Takes the exclusive publish lock (`.cvmfs_prepub.lock` beside `data/`), failing at once if
/// another publisher holds it.
pub fn lock_storage(root: &Path) -> Result<PublishLock, RepoError> {
    let p = root.join(".cvmfs_prepub.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)?;
    match f.try_lock() {
        Ok(()) => Ok(PublishLock { _file: f }),
        Err(_) => Err(RepoError::Invalid(format!(
            "another publish holds {}; try again when it finishes",
            p.display()
        ))),
    }
}

/// Reads and verifies the current manifest (signature checked against the stored certificate).
pub fn current_manifest(cas: &dyn Cas) -> Result<Option<(Manifest, String)>, RepoError> {
    let Some(bytes) = cas.get_root_file(MANIFEST)? else {
        return Ok(None);
    };
    let (m, block) = Manifest::parse(&bytes)?;
    let block = block.ok_or_else(|| RepoError::Invalid("manifest is not signed".into()))?;
    let cert_id = m
        .certificate
        .ok_or_else(|| RepoError::Invalid("manifest names no certificate".into()))?;
    let pem_bytes = decode_to_vec(&cert_id, &get_all(cas, &cert_id)?, true)?;
    let pem = String::from_utf8(pem_bytes)
        .map_err(|_| RepoError::Invalid("certificate is not PEM text".into()))?;
    verify_manifest(&block, &pem)?;
    Ok(Some((m, pem)))
}

fn scratch() -> Result<tempfile::TempDir, RepoError> {
    Ok(tempfile::Builder::new().prefix("cvmfs-prepub-").tempdir()?)
}

/// Creates an empty, signed repository in `cas` (revision 1, tag `trunk`).
pub fn init(
    cas: &dyn Cas,
    keys: &RepoKeys,
    uid: u64,
    gid: u64,
    now: i64,
) -> Result<Published, RepoError> {
    if cas.get_root_file(MANIFEST)?.is_some() {
        return Err(RepoError::Invalid(format!(
            "{} already holds a repository",
            cas.describe()
        )));
    }
    let tmp = scratch()?;
    let root = Entry::directory("", 0o755, uid, gid, now);
    let tree = CatalogTree::create(cas, tmp.path(), &root)?;
    let commit = tree.commit(now)?;
    cas.put_root_file(WHITELIST, &make_whitelist(keys, now, WHITELIST_DAYS)?)?;
    cas.put_root_file(MASTER_REPLICA, b"")?;
    finish_publish(cas, keys, None, commit, &[], None, tmp.path(), now, &|| {
        true
    })
}

/// Publishes a new revision: `edit` changes the catalog tree, then catalogs, history, reflog and
/// the signed manifest are written.
pub fn publish<F>(
    cas: &dyn Cas,
    keys: &RepoKeys,
    tags: &[TagRequest],
    now: i64,
    edit: F,
) -> Result<Published, RepoError>
where
    F: FnOnce(&mut CatalogTree<'_>) -> Result<(), RepoError>,
{
    publish_guarded(cas, keys, tags, None, now, &|| true, edit)
}

/// Like [`publish`], but drops the automatic tags `expiry` says have expired, and asks
/// `proceed` just before the manifest is replaced; if it answers `false` nothing is published
/// (what was written so far is unreferenced content) and [`RepoError::Cancelled`] is returned.
pub fn publish_guarded<F>(
    cas: &dyn Cas,
    keys: &RepoKeys,
    tags: &[TagRequest],
    expiry: Option<&TagExpiry>,
    now: i64,
    proceed: &dyn Fn() -> bool,
    edit: F,
) -> Result<Published, RepoError>
where
    F: FnOnce(&mut CatalogTree<'_>) -> Result<(), RepoError>,
{
    let (old, _) = current_manifest(cas)?.ok_or_else(|| {
        RepoError::Invalid(format!(
            "{} holds no repository (run repo init)",
            cas.describe()
        ))
    })?;
    if old.name != keys.name {
        return Err(RepoError::Invalid(format!(
            "storage holds repository '{}', keys are for '{}'",
            old.name, keys.name
        )));
    }
    for t in tags {
        if !valid_tag_name(&t.name) || t.name == "trunk" || t.name == "trunk-previous" {
            return Err(RepoError::Invalid(format!(
                "tag name '{}' is invalid or reserved",
                t.name
            )));
        }
    }
    let tmp = scratch()?;
    // A scoped token's tag that is not its own fails the publish before any work (checked
    // again when the history is written).
    if let (Some(h), true) = (old.history, tags.iter().any(|t| t.owner.is_some())) {
        let history = open_history(cas, &h, &tmp.path().join("history-check.db"))?;
        for t in tags {
            may_take_tag(t, history.tag(&t.name)?.as_ref())?;
        }
    }
    let mut tree = CatalogTree::open(cas, tmp.path(), &old.root_catalog)?;
    edit(&mut tree)?;
    // Catalog timestamps must not run behind the previous manifest (client ordering, §1.5).
    let now = now.max(old.timestamp);
    let commit = tree.commit(now)?;
    finish_publish(
        cas,
        keys,
        Some(&old),
        commit,
        tags,
        expiry,
        tmp.path(),
        now,
        proceed,
    )
}

/// History database `h` of `cas`, decompressed into `file` and opened.
fn open_history(cas: &dyn Cas, h: &ObjectId, file: &Path) -> Result<History, RepoError> {
    fs::write(file, decode_to_vec(h, &get_all(cas, h)?, true)?)?;
    Ok(History::open(file)?)
}

#[allow(clippy::too_many_arguments)]
fn finish_publish(
    cas: &dyn Cas,
    keys: &RepoKeys,
    old: Option<&Manifest>,
    commit: CommitResult,
    tags: &[TagRequest],
    expiry: Option<&TagExpiry>,
    scratch: &Path,
    now: i64,
    proceed: &dyn Fn() -> bool,
) -> Result<Published, RepoError> {
    // Certificate object (idempotent).
    let (cert_id, cert_bytes) =
        compress_metadata(keys.certificate_pem.as_bytes(), Suffix::Certificate);
    cas.put_bytes(&cert_id, &cert_bytes)?;

    // History: previous database or a fresh one.
    let hist_file = scratch.join("history.db");
    let history = match old.and_then(|m| m.history) {
        Some(h) => {
            let history = open_history(cas, &h, &hist_file)?;
            // The chain back through the repository's histories (upstream's GC walks it; a
            // gateway job whose commit answer was lost looks for its tag along it).
            history.set_previous_revision(&h)?;
            history
        }
        None => History::create(&hist_file, &keys.name)?,
    };
    let mut expired_tags = Vec::new();
    if let Some(x) = expiry {
        for t in history.tags()? {
            if crate::gc::is_auto_tag(&t.name)
                && !crate::gc::tag_exempt(&x.exempt, &t.name)
                && now - t.timestamp >= x.span_secs
                && history.remove_tag(&t.name)?
            {
                expired_tags.push(t.name);
            }
        }
    }
    let trunk = Tag {
        name: "trunk".into(),
        hash: commit.root.digest.hex(),
        revision: commit.revision,
        timestamp: now,
        description: "latest published revision".into(),
        size: commit.root_size,
    };
    for t in tags {
        may_take_tag(t, history.tag(&t.name)?.as_ref())?;
    }
    let named: Vec<Tag> = tags
        .iter()
        .filter(|t| t.name != "trunk")
        .map(|t| Tag {
            name: t.name.clone(),
            description: t.description.clone(),
            ..trunk.clone()
        })
        .collect();
    history.record_publish(&trunk, &named)?;
    history.close()?;
    let (hist_id, hist_bytes) = compress_metadata(&fs::read(&hist_file)?, Suffix::History);
    cas.put_bytes(&hist_id, &hist_bytes)?;

    // Last chance to cancel: nothing written so far is referenced by anything.
    if !proceed() {
        return Err(RepoError::Cancelled);
    }
    // Reflog.
    let reflog_file = scratch.join("reflog.db");
    if let Some(b) = cas.get_root_file(REFLOG)? {
        fs::write(&reflog_file, b)?;
    }
    let reflog = Reflog::open_or_create(&reflog_file, &keys.name)?;
    reflog.add(&commit.root, RefType::Catalog, now)?;
    reflog.add(&cert_id, RefType::Certificate, now)?;
    reflog.add(&hist_id, RefType::History, now)?;
    reflog.close()?;
    let reflog_bytes = fs::read(&reflog_file)?;
    cas.put_root_file(REFLOG, &reflog_bytes)?;

    let manifest = Manifest {
        root_catalog: commit.root,
        root_size: commit.root_size,
        ttl: commit.ttl,
        revision: commit.revision,
        // Once collected, always: old revisions may be gone even if collection is off now.
        garbage_collectable: expiry.is_some() || old.is_some_and(|m| m.garbage_collectable),
        alt_paths: false,
        name: keys.name.clone(),
        certificate: Some(cert_id),
        history: Some(hist_id),
        timestamp: now.max(old.map(|m| m.timestamp).unwrap_or(0)),
        metainfo: None,
        reflog: Some(Digest20::of(&reflog_bytes)),
    };
    refresh_whitelist(cas, keys, now)?;
    // The manifest goes last: until it is replaced, readers see the previous revision.
    cas.put_root_file(MANIFEST, &manifest.sign(keys))?;
    Ok(Published {
        manifest,
        commit,
        expired_tags,
    })
}

/// Re-signs the whitelist when it expires within 7 days and the master key is at hand.
fn refresh_whitelist(cas: &dyn Cas, keys: &RepoKeys, now: i64) -> Result<(), RepoError> {
    let Some(_) = &keys.master else { return Ok(()) };
    let fresh = match cas.get_root_file(WHITELIST)? {
        Some(b) => Whitelist::parse(&b)
            .map(|w| {
                w.expires > now + 7 * 86_400 && w.lists(&keys.fingerprint().unwrap_or_default())
            })
            .unwrap_or(false),
        None => false,
    };
    if !fresh {
        cas.put_root_file(WHITELIST, &make_whitelist(keys, now, WHITELIST_DAYS)?)?;
    }
    Ok(())
}

/// Dirtab rules (`/.cvmfsdirtab`): which directories get a nested catalog.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dirtab {
    rules: Vec<(bool, Vec<String>, bool)>,
}

fn glob(pat: &str, s: &str) -> bool {
    // `*` and `?` within one component; wildcards never match a leading dot (hidden dirs).
    if s.starts_with('.') && !pat.starts_with('.') {
        return false;
    }
    fn m(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], s) || (!s.is_empty() && m(p, &s[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &s[1..]),
            _ => false,
        }
    }
    m(pat.as_bytes(), s.as_bytes())
}

impl Dirtab {
    /// Parses dirtab text: one path pattern per line, `#` comments, `!` negation; absolute
    /// patterns match the whole path, relative ones match trailing components.
    pub fn parse(text: &str) -> Dirtab {
        let mut rules = Vec::new();
        for line in text.lines() {
            let l = line.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            let (neg, l) = match l.strip_prefix('!') {
                Some(r) => (true, r.trim()),
                None => (false, l),
            };
            let abs = l.starts_with('/');
            let comps: Vec<String> = l
                .split('/')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect();
            if !comps.is_empty() {
                rules.push((neg, comps, abs));
            }
        }
        Dirtab { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the directory at catalog path `path` should be a nested catalog root.
    pub fn matches(&self, path: &str) -> bool {
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let hit = |pat: &Vec<String>, abs: bool| {
            if abs {
                pat.len() == comps.len() && pat.iter().zip(&comps).all(|(p, c)| glob(p, c))
            } else {
                pat.len() <= comps.len()
                    && pat
                        .iter()
                        .zip(&comps[comps.len() - pat.len()..])
                        .all(|(p, c)| glob(p, c))
            }
        };
        let mut positive = false;
        for (neg, pat, abs) in &self.rules {
            if hit(pat, *abs) {
                if *neg {
                    return false;
                }
                positive = true;
            }
        }
        positive
    }
}

/// Reads the current content of a regular file from the tree (small files such as the dirtab).
fn read_small_file(cas: &dyn Cas, e: &Entry) -> Result<Vec<u8>, RepoError> {
    let mut out = Vec::new();
    let compressed = !e.is_uncompressed();
    if let Some(h) = e.hash {
        let id = ObjectId::new(h, Suffix::None);
        out = decode_to_vec(&id, &get_all(cas, &id)?, compressed)?;
    } else {
        for c in &e.chunks {
            out.extend(decode_to_vec(&c.id, &get_all(cas, &c.id)?, compressed)?);
        }
    }
    Ok(out)
}

/// Applies a change set at `target` (catalog form). Missing ancestors of the target are created
/// as directories; markers and dirtab rules create nested catalogs; hard links inside one
/// directory become a hardlink group, across directories independent copies (as upstream's
/// ingest does).
///
/// `Replace` gives the same tree as removing the target and adding the change set, but touches
/// only what differs: entries the change set lacks are removed, entries equal to what would be
/// added stay as they are, and nested catalogs no longer marked are merged back. A republish
/// that changes a few files thus rewrites a few rows, and catalogs it does not touch keep
/// their hash.
pub fn apply_changeset(
    tree: &mut CatalogTree<'_>,
    cas: &dyn Cas,
    cs: &ChangeSet,
    target: &str,
    mode: ApplyMode,
    params: &EncodeParams,
    now: i64,
) -> Result<(), RepoError> {
    let prebuilt = cs.prebuilt.as_deref();
    apply_changeset_with(tree, cas, cs, target, mode, params, now, prebuilt)
}

/// [`apply_changeset`] with catalogs prebuilt from `cs` elsewhere than in the change set (see
/// [`prebuild_in`]); grafted when they still fit, ignored otherwise.
#[allow(clippy::too_many_arguments)]
pub fn apply_changeset_with(
    tree: &mut CatalogTree<'_>,
    cas: &dyn Cas,
    cs: &ChangeSet,
    target: &str,
    mode: ApplyMode,
    params: &EncodeParams,
    now: i64,
    prebuilt: Option<&Prebuilt>,
) -> Result<(), RepoError> {
    // Ancestors of the target.
    let mut prefix = String::new();
    for comp in target.split('/').filter(|c| !c.is_empty()) {
        let parent = prefix.clone();
        prefix = format!("{prefix}/{comp}");
        if prefix == target {
            break;
        }
        match tree.lookup(&prefix)? {
            Some(e) if e.is_dir() => {}
            Some(_) => {
                return Err(RepoError::Invalid(format!(
                    "cannot publish under {target}: {prefix} exists and is not a directory"
                )))
            }
            None => {
                let _ = parent;
                tree.add(&prefix, &Entry::directory(comp, 0o755, 0, 0, now))?;
            }
        }
    }

    let dirtab = dirtab_for(tree, cas, cs, target, mode)?;

    // Built already while the job was processed, and still what this commit would build: for
    // a new path, or in place of the very catalog it was built to replace (which is not even
    // opened).
    if let Some(pre) = prebuilt.filter(|pre| {
        mode == ApplyMode::Replace && pre.fits(cs, target, &dirtab) && pre.stored(cas)
    }) {
        let mounted = match &pre.built {
            Built::Catalogs {
                sub,
                replaces: None,
            } if !tree.exists(target)? => {
                tree.graft(sub)?;
                true
            }
            Built::Catalogs { replaces: None, .. } => false,
            Built::Catalogs {
                sub,
                replaces: Some(old),
            } => tree.replace_mounted(sub, old)?,
            // The release has the rows of the catalog there: if that is still the one there,
            // the commit keeps it as it is (as an edit changing nothing would), unopened.
            Built::Same(old) => tree.still_mounted(target, old)?,
        };
        if mounted {
            return Ok(());
        }
    }
    // A target that is not a directory yet is built from nothing: its entries need no lookups.
    let existing = if target.is_empty() {
        None
    } else {
        tree.lookup(target)?
    };
    let fresh = !target.is_empty() && !matches!(&existing, Some(e) if e.is_dir());
    fill(tree, cas, cs, target, mode, params, now, &dirtab, fresh)
}

/// The dirtab that applies to a change set at `target`: the one it brings at the repository
/// root, else the tree's (a replaced root without one has none).
fn dirtab_for(
    tree: &mut CatalogTree<'_>,
    cas: &dyn Cas,
    cs: &ChangeSet,
    target: &str,
    mode: ApplyMode,
) -> Result<Dirtab, RepoError> {
    Ok(
        match cs.nodes.get(".cvmfsdirtab").filter(|_| target.is_empty()) {
            Some(n) => Dirtab::parse(&String::from_utf8_lossy(&read_small_file(cas, &n.entry)?)),
            None if target.is_empty() && mode == ApplyMode::Replace => Dirtab::default(),
            None => match tree.lookup("/.cvmfsdirtab")? {
                Some(e) if e.kind() == Kind::Regular => {
                    Dirtab::parse(&String::from_utf8_lossy(&read_small_file(cas, &e)?))
                }
                _ => Dirtab::default(),
            },
        },
    )
}

/// Applies a change set to `target`, whose ancestors exist (`fresh`: the target is not a
/// directory yet, so nothing below it needs looking up).
#[allow(clippy::too_many_arguments)]
fn fill(
    tree: &mut CatalogTree<'_>,
    cas: &dyn Cas,
    cs: &ChangeSet,
    target: &str,
    mode: ApplyMode,
    params: &EncodeParams,
    now: i64,
    dirtab: &Dirtab,
    fresh: bool,
) -> Result<(), RepoError> {
    let mut fresh_dirs: HashSet<String> = HashSet::new();
    if fresh {
        fresh_dirs.insert(target.to_string());
    }

    // The target itself.
    let mut was_nested = Vec::new();
    let mut known = Listed::default();
    if mode == ApplyMode::Replace {
        (was_nested, known) = prune_to(tree, target, cs, dirtab)?;
    }
    if !cs.removals.is_empty() {
        known = Listed::default(); // what the removals take is not tracked there
    }
    let default_meta = || {
        (mode == ApplyMode::Replace)
            .then(|| Entry::directory(split_path(target).1, 0o755, 0, 0, now))
    };
    if target.is_empty() {
        if let Some(meta) = &cs.root {
            tree.touch_dir("", meta)?;
        }
    } else {
        match tree.lookup(target)? {
            Some(e) if e.is_dir() => {
                if let Some(meta) = cs.root.clone().or_else(default_meta) {
                    if !as_stored_equal(
                        &e,
                        &Entry {
                            name: e.name.clone(),
                            ..meta.clone()
                        },
                    ) {
                        tree.touch_dir(target, &meta)?;
                    }
                }
            }
            existing => {
                if existing.is_some() {
                    tree.remove(target)?;
                }
                let name = split_path(target).1;
                let mut meta = cs
                    .root
                    .clone()
                    .unwrap_or_else(|| Entry::directory(name, 0o755, 0, 0, now));
                meta.name = name.to_string();
                tree.add(target, &meta)?;
            }
        }
    }

    // Explicit removals. Removing the marker of a nested catalog merges it back into its parent.
    for rel in &cs.removals {
        let path = join(target, rel);
        if path.is_empty() {
            return Err(RepoError::Invalid(
                "the repository root cannot be removed".into(),
            ));
        }
        let (parent, name) = split_path(&path);
        tree.remove(&path)?;
        if name == ".cvmfscatalog" && tree.is_nested_root(parent)? {
            tree.remove_nested(parent)?;
        }
    }

    let mut empty_marker: Option<crate::object::EncodedFile> = None;
    let mut nest =
        |tree: &mut CatalogTree<'_>, dir: &str, marker_in_cs: bool| -> Result<(), RepoError> {
            if !marker_in_cs {
                // Dirtab-created catalogs get an empty `.cvmfscatalog`, as upstream's dirtab does.
                let marker_path = format!("{dir}/.cvmfscatalog");
                if tree.lookup(&marker_path)?.is_none() {
                    let enc = match &empty_marker {
                        Some(e) => e.clone(),
                        None => {
                            let e = encode_file(&b""[..], params, cas)
                                .map_err(|e| RepoError::Invalid(e.to_string()))?;
                            empty_marker = Some(e.clone());
                            e
                        }
                    };
                    let owner = tree
                        .lookup(dir)?
                        .unwrap_or_else(|| Entry::directory("", 0o755, 0, 0, now));
                    let mut m = Entry::directory(".cvmfscatalog", 0o644, owner.uid, owner.gid, now);
                    m.mode = crate::catalog::mode::S_IFREG | 0o644;
                    m.size = 0;
                    m.linkcount = 1;
                    m.flags =
                        enc.compression.flag_value() << crate::catalog::flags::COMPRESSION_SHIFT;
                    if let FileContent::Whole(id) = enc.content {
                        m.hash = Some(id.digest);
                    }
                    tree.add(&marker_path, &m)?;
                }
            }
            tree.make_nested(dir)?;
            Ok(())
        };
    if !target.is_empty()
        && (cs.markers.contains("") || (!dirtab.is_empty() && dirtab.matches(target)))
    {
        nest(tree, target, cs.markers.contains(""))?;
    }

    // Hardlink groups: members of one group that share a directory keep the group.
    let mut members: HashMap<&str, Vec<&str>> = HashMap::new();
    for (rel, node) in &cs.nodes {
        if let Some(root) = &node.hardlink_of {
            members.entry(root.as_str()).or_default().push(rel.as_str());
        }
    }
    let mut group_of: HashMap<&str, (u32, u32)> = HashMap::new();
    let mut groups_pending: HashMap<&str, u32> = HashMap::new();
    for (root, links) in &members {
        let dir = crate::catalog::split_path(root).0;
        let same_dir = links.iter().all(|l| split_path(l).0 == dir);
        if same_dir {
            groups_pending.insert(root, links.len() as u32 + 1);
        }
    }

    // Parents come before their children in the change set's order.
    let add = |tree: &mut CatalogTree<'_>, fresh_dirs: &HashSet<String>, path: &str, e: &Entry| {
        if fresh_dirs.contains(split_path(path).0) {
            tree.add_new_child(path, e)
        } else {
            tree.add(path, e)
        }
    };
    for (rel, node) in &cs.nodes {
        let path = join(target, rel);
        let existing = if fresh {
            None
        } else if !node.entry.is_dir() && known.dirs.contains(split_path(&path).0) {
            // Its directory was listed while pruning: what it held then is what is there.
            known.files.remove(&path)
        } else {
            tree.lookup(&path)?
        };
        if node.entry.is_dir() {
            match existing {
                Some(e) if e.is_dir() => {
                    // A replaced tree has what the change set says, also for the directories
                    // it only implies; a merge keeps theirs.
                    if (mode == ApplyMode::Replace || !node.synthesized)
                        && !as_stored_equal(&e, &node.entry)
                    {
                        tree.touch_dir(&path, &node.entry)?;
                    }
                }
                Some(_) => {
                    tree.remove(&path)?;
                    tree.add(&path, &node.entry)?;
                }
                None => {
                    add(tree, &fresh_dirs, &path, &node.entry)?;
                    if fresh {
                        fresh_dirs.insert(path.clone());
                    }
                }
            }
            let marked = cs.markers.contains(rel.as_str());
            if marked || (!dirtab.is_empty() && dirtab.matches(&path)) {
                nest(tree, &path, marked)?;
            }
            continue;
        }
        let group_root = node.hardlink_of.as_deref().unwrap_or(rel.as_str());
        if let Some(old) = existing {
            let mut plain = node.entry.clone();
            plain.hardlink_group = 0;
            plain.linkcount = 1;
            if !groups_pending.contains_key(group_root)
                && old.hardlink_group == 0
                && as_stored_equal(&old, &plain)
            {
                continue; // already as it would be added
            }
            tree.remove(&path)?;
        }
        let mut e = node.entry.clone();
        if let Some(&count) = groups_pending.get(group_root) {
            let (gid, _) = match group_of.get(group_root) {
                Some(g) => *g,
                None => {
                    let g = tree.alloc_hardlink_group(split_path(&path).0)?;
                    group_of.insert(group_root, (g, count));
                    (g, count)
                }
            };
            e.hardlink_group = gid;
            e.linkcount = count;
        } else {
            e.hardlink_group = 0;
            e.linkcount = 1;
        }
        add(tree, &fresh_dirs, &path, &e)?;
    }

    // Nested catalogs of the replaced tree that nothing marks any more go back into their
    // parents, deepest first.
    was_nested.sort_by_key(|(p, _)| std::cmp::Reverse(p.matches('/').count()));
    for (path, rel) in was_nested {
        let still =
            cs.markers.contains(rel.as_str()) || (!dirtab.is_empty() && dirtab.matches(&path));
        if !still && tree.is_nested_root(&path)? {
            tree.remove_nested(&path)?;
        }
    }
    Ok(())
}

/// The nested catalog(s) of a new directory, built from its change set while the job was
/// processed (see [`prebuild`]), so that the commit — under the repository lock — only grafts
/// them instead of writing every row.
#[derive(Debug)]
pub struct Prebuilt {
    built: Built,
    /// The path they were built for.
    path: String,
    /// The dirtab it followed.
    dirtab: Dirtab,
    /// Entries of the change set it was built from (a guard against one edited since).
    nodes: usize,
}

/// What a [`Prebuilt`] gives the commit.
#[derive(Debug)]
enum Built {
    /// Catalogs to mount in place of the one mounted at the path when they were built
    /// (`replaces`; `None`: built for a new path).
    Catalogs {
        sub: Box<BuiltSubtree>,
        replaces: Option<Mounted>,
    },
    /// The very rows of the catalog mounted at the path (a release published again
    /// unchanged): the commit keeps that catalog.
    Same(Mounted),
}

impl Prebuilt {
    /// The catalog the commit leaves at the target: the one built, or the stored one it
    /// replaces when that has the same rows (for reports and tests).
    pub fn catalog(&self) -> &ObjectId {
        match &self.built {
            Built::Catalogs { sub, .. } => &sub.catalog,
            Built::Same(old) => &old.catalog,
        }
    }

    /// Whether the release has the rows of the catalog it replaces (nothing to mount: the
    /// commit keeps that catalog).
    pub fn unchanged(&self) -> bool {
        matches!(self.built, Built::Same(_))
    }

    /// The catalog it was built to replace, if any.
    pub fn replaces(&self) -> Option<&ObjectId> {
        match &self.built {
            Built::Catalogs { replaces, .. } => replaces.as_ref().map(|m| &m.catalog),
            Built::Same(old) => Some(&old.catalog),
        }
    }

    /// Whether a commit of `cs` at `target` under `dirtab` would build exactly this.
    fn fits(&self, cs: &ChangeSet, target: &str, dirtab: &Dirtab) -> bool {
        self.path == target
            && self.dirtab == *dirtab
            && self.nodes == cs.nodes.len()
            && cs.removals.is_empty()
    }

    /// Whether every catalog object it wrote is still stored (garbage collection runs only
    /// while no job is in flight, but a store can be edited behind our back).
    fn stored(&self, cas: &dyn Cas) -> bool {
        match &self.built {
            Built::Catalogs { sub, .. } => sub.written.iter().all(|id| cas.size(id).is_ok()),
            Built::Same(_) => true,
        }
    }
}

/// Builds and stores, ahead of the commit, the catalogs that `cs` makes of `target` when that
/// holds a nested catalog (a `.cvmfscatalog` at the top of the change set, or the repository's
/// dirtab says so) — the usual shape of a release — and is either a new directory (the
/// current revision has nothing there) or the root of a nested catalog with none below it (a
/// release published again: its catalog is built anew, as the next revision of the stored one,
/// unless it would have the same rows, when the commit keeps the stored one). The stored
/// catalogs are unreferenced until a commit grafts them; `None` when the change set does not
/// qualify. A commit that finds the repository changed in a way that matters (the path
/// appeared, or its catalog is no longer the one replaced, or the dirtab differs) builds the
/// catalogs itself.
pub fn prebuild(
    cas: &dyn Cas,
    cs: &ChangeSet,
    target: &str,
    params: &EncodeParams,
    now: i64,
) -> Result<Option<Prebuilt>, RepoError> {
    if target.is_empty() || !cs.removals.is_empty() {
        return Ok(None);
    }
    let Some((m, _)) = current_manifest(cas)? else {
        return Ok(None);
    };
    let tmp = scratch()?;
    let mut tree = CatalogTree::open(cas, tmp.path(), &m.root_catalog)?;
    prebuild_in(&mut tree, cas, cs, target, params, now)
}

/// [`prebuild`] against the revision `tree` holds (a commit's base, opened already).
pub fn prebuild_in(
    tree: &mut CatalogTree<'_>,
    cas: &dyn Cas,
    cs: &ChangeSet,
    target: &str,
    params: &EncodeParams,
    now: i64,
) -> Result<Option<Prebuilt>, RepoError> {
    if target.is_empty() || !cs.removals.is_empty() {
        return Ok(None);
    }
    let Some(replaces) = prebuild_base(tree, target)? else {
        return Ok(None);
    };
    let dirtab = dirtab_for(tree, cas, cs, target, ApplyMode::Replace)?;
    let nested = cs.markers.contains("") || (!dirtab.is_empty() && dirtab.matches(target));
    if !nested {
        return Ok(None);
    }
    // A scratch tree rooted at the target's parent: the catalogs below it are the ones the
    // commit would write (rows are keyed by full path, so they are the same rows).
    let tmp = scratch()?;
    let parent = split_path(target).0;
    let top = Entry::directory(split_path(parent).1, 0o755, 0, 0, now);
    let mut built = CatalogTree::create_at(cas, tmp.path(), parent, &top)?;
    fill(
        &mut built,
        cas,
        cs,
        target,
        ApplyMode::Replace,
        params,
        now,
        &dirtab,
        true,
    )?;
    let built = match succeeds(&mut built, target, replaces, tree)? {
        Ok(replaces) => Built::Catalogs {
            sub: Box::new(built.commit_nested(target, now)?),
            replaces,
        },
        Err(same) => Built::Same(same),
    };
    Ok(Some(Prebuilt {
        built,
        path: target.to_string(),
        dirtab,
        nodes: cs.nodes.len(),
    }))
}

/// Where a prebuild of `target` stands in the revision `tree` holds: `Some(None)` for a new
/// path, `Some(Some(m))` for the root of a nested catalog `m` with none below it (which the
/// prebuilt catalog replaces), `None` for anything else (not prebuilt: an edit of a catalog
/// with nested ones keeps those it does not change, a build from nothing would not).
fn prebuild_base(
    tree: &mut CatalogTree<'_>,
    target: &str,
) -> Result<Option<Option<Mounted>>, RepoError> {
    if !tree.exists(target)? {
        return Ok(Some(None));
    }
    Ok(tree.mounted(target)?.filter(|m| m.nested == 0).map(Some))
}

/// What a catalog built at `target` in `built` is to the catalog `old` mounted there in
/// `base` (`None`: a new path): `Ok(old)` when it replaces `old`, as `old`'s next revision
/// (made so here); `Err(old)` when it has the very rows of `old` (not worth a new catalog: the
/// commit keeps `old`).
fn succeeds(
    built: &mut CatalogTree<'_>,
    target: &str,
    old: Option<Mounted>,
    base: &mut CatalogTree<'_>,
) -> Result<Result<Option<Mounted>, Mounted>, RepoError> {
    let Some(old) = old else {
        return Ok(Ok(None));
    };
    built.follow(target, &old)?;
    // A comparison that fails counts as a difference: the new catalog is correct either way.
    Ok(if built.same_rows(target, base).unwrap_or(false) {
        Err(old)
    } else {
        Ok(Some(old))
    })
}

/// A [`prebuild`] that builds while the tar is still read: a thread adds the rows of what the
/// intake tells it ([`crate::intake::Streamed`]) to a scratch tree of the target's catalogs,
/// nested from the start; once the change set is complete, [`PrebuildStream::finish`] merges
/// into that tree what it was not told (hard links, sole chunks, the directories a marker or
/// the dirtab nests), so the result has the rows a prebuild from nothing would have, with
/// most of the work done while the upload arrived.
/// Its catalog files hold the same rows in another order (so another hash) than a prebuild
/// from nothing. Any trouble while streaming falls back to that prebuild; a change set that
/// does not qualify (see [`prebuild`]) gets none.
pub struct PrebuildStream {
    events: Option<crossbeam_channel::Sender<Vec<crate::intake::Streamed>>>,
    end: crossbeam_channel::Sender<std::sync::Arc<ChangeSet>>,
    thread: std::thread::JoinHandle<Option<Prebuilt>>,
}

impl PrebuildStream {
    /// Starts the builder for a tar going to `target` (`None` when that is the repository
    /// root, which is never prebuilt). The checks against the current revision run on its
    /// thread.
    pub fn start(
        cas: std::sync::Arc<dyn Cas>,
        target: &str,
        params: EncodeParams,
        now: i64,
    ) -> Option<PrebuildStream> {
        if target.is_empty() {
            return None;
        }
        let (events, events_rx) = crossbeam_channel::bounded(STREAM_QUEUE);
        let (end, end_rx) = crossbeam_channel::bounded(1);
        let target = target.to_string();
        let thread = std::thread::Builder::new()
            .name("catalog-stream".into())
            .spawn(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    stream_build(cas.as_ref(), &target, &params, now, events_rx, end_rx)
                }))
                .ok()
                .flatten()
            })
            .ok()?;
        Some(PrebuildStream {
            events: Some(events),
            end,
            thread,
        })
    }

    /// Where the intake tells what it reads.
    pub fn sender(&self) -> Option<crossbeam_channel::Sender<Vec<crate::intake::Streamed>>> {
        self.events.clone()
    }

    /// Builds the catalogs of the complete change set `cs` (after everything told was told).
    pub fn finish(self, cs: ChangeSet) -> (ChangeSet, Option<Prebuilt>) {
        let (cs, built, ()) = self.finish_with(cs, |_| ());
        (cs, built)
    }

    /// [`finish`](Self::finish), running `meanwhile` on the change set on this thread while
    /// the builder completes and compresses the catalogs (see
    /// [`crate::object::compress_metadata_file`]); returns what it returned too.
    pub fn finish_with<T>(
        mut self,
        cs: ChangeSet,
        meanwhile: impl FnOnce(&ChangeSet) -> T,
    ) -> (ChangeSet, Option<Prebuilt>, T) {
        self.events = None;
        let cs = std::sync::Arc::new(cs);
        let sent = self.end.send(cs.clone()).is_ok();
        let done = meanwhile(&cs);
        let built = if sent {
            self.thread.join().ok().flatten()
        } else {
            None
        };
        // The builder has dropped its reference (it returned, or it unwound).
        let cs = std::sync::Arc::try_unwrap(cs).unwrap_or_else(|cs| (*cs).clone());
        (cs, built, done)
    }
}

/// Batches of entries a [`PrebuildStream`] holds for its builder; an intake that finds the
/// queue full stops telling (what it did not tell is added at the end), so a builder slow to
/// start (opening the current revision from S3) neither holds the change set twice nor slows
/// the intake down.
pub const STREAM_QUEUE: usize = 256;

/// Change sets of at least this many nodes are compared with what was told in two halves on
/// two threads (the Python tree's 46,000: 40 ms on one).
const SPLIT_PASS_MIN: usize = 4096;

/// The builder thread of a [`PrebuildStream`].
fn stream_build(
    cas: &dyn Cas,
    target: &str,
    params: &EncodeParams,
    now: i64,
    events: crossbeam_channel::Receiver<Vec<crate::intake::Streamed>>,
    end: crossbeam_channel::Receiver<std::sync::Arc<ChangeSet>>,
) -> Option<Prebuilt> {
    use crate::intake::Streamed;
    // As `prebuild`: a target new in the current revision, or a catalog of its own that the
    // build replaces (kept open to compare the result with), built under its dirtab.
    let base_dir = scratch().ok();
    let base = (|| -> Result<Option<_>, RepoError> {
        let (Some(dir), Some((m, _))) = (&base_dir, current_manifest(cas)?) else {
            return Ok(None);
        };
        let mut tree = CatalogTree::open(cas, dir.path(), &m.root_catalog)?;
        let Some(replaces) = prebuild_base(&mut tree, target)? else {
            return Ok(None);
        };
        let none = ChangeSet::default();
        let dirtab = dirtab_for(&mut tree, cas, &none, target, ApplyMode::Replace)?;
        Ok(Some((tree, replaces, dirtab)))
    })();
    let (mut base, replaces, dirtab) = match base {
        Ok(Some(b)) => b,
        _ => {
            drop(events);
            let _ = end.recv();
            return None;
        }
    };
    let tmp = scratch().ok();
    let parent = split_path(target).0;
    let top = Entry::directory(split_path(parent).1, 0o755, 0, 0, now);
    let mut tree = tmp.as_ref().and_then(|tmp| {
        let mut tree = CatalogTree::create_at(cas, tmp.path(), parent, &top).ok()?;
        let name = split_path(target).1;
        tree.add(target, &Entry::directory(name, 0o755, 0, 0, now))
            .ok()?;
        // Nested, as it must be to be prebuilt (the change set says at its end).
        tree.make_nested(target).ok()?;
        Some(tree)
    });
    let nests = |path: &str| !dirtab.is_empty() && dirtab.matches(path);
    // Directories added so far: a row goes in only below one of them (rows are added without
    // looking their parents up).
    let mut dirs: foldhash::HashSet<String> = [target.to_string()].into_iter().collect();
    // What has its row already, by path relative to the target.
    let mut told: foldhash::HashSet<String> = foldhash::HashSet::default();
    let orphan = |path: &str| TreeError::NoParent { path: path.into() };
    for ev in events.iter().flatten() {
        let Some(t) = tree.as_mut() else { continue };
        let done = match ev {
            Streamed::Root(e) => {
                let mut meta = e;
                meta.name = split_path(target).1.to_string();
                t.touch_dir(target, &meta)
            }
            Streamed::Dir {
                rel,
                entry,
                replaces,
            } => {
                let path = join(target, &rel);
                if replaces {
                    t.touch_dir(&path, &entry)
                } else if !dirs.contains(split_path(&path).0) {
                    Err(orphan(&path))
                } else {
                    let added = t.add_new_child(&path, &entry).and_then(|()| {
                        if nests(&path) {
                            t.make_nested(&path)
                        } else {
                            Ok(())
                        }
                    });
                    dirs.insert(path);
                    told.insert(rel);
                    added
                }
            }
            Streamed::Leaf { rel, mut entry } => {
                let path = join(target, &rel);
                entry.hardlink_group = 0;
                entry.linkcount = 1;
                if !dirs.contains(split_path(&path).0) || entry.is_dir() {
                    tree = None;
                    continue;
                }
                told.insert(rel);
                t.add_new_child(&path, &entry).and_then(|()| {
                    let (dir, name) = split_path(&path);
                    if name == ".cvmfscatalog" && dir != target && entry.kind() == Kind::Regular {
                        t.make_nested(dir)
                    } else {
                        Ok(())
                    }
                })
            }
        };
        if done.is_err() {
            tree = None; // built from nothing below
        }
    }
    let cs = end.recv().ok()?;
    let nested = cs.markers.contains("") || nests(target);
    if !nested || !cs.removals.is_empty() {
        return None;
    }
    // What the rows told lack: the entries not told (hard links, sole chunks), every member
    // of a hardlink group (told as plain files), and the directories a marker or the dirtab
    // nests (their catalogs exist; a dirtab one may lack its empty marker). Merged into the
    // tree as `fill` merges, they give the rows a build from nothing has. A told path the
    // change set lacks would be a row too many: then the tree is built from nothing.
    let streamed = tree.and_then(|mut tree| {
        let mut grouped: foldhash::HashSet<&str> = foldhash::HashSet::default();
        for (rel, n) in &cs.nodes {
            if let Some(root) = &n.hardlink_of {
                grouped.insert(root);
                grouped.insert(rel);
            }
        }
        // The told paths found in the change set, and the nodes to merge: one pass, by hash,
        // in two halves at once (it is on the way to the commit, and the intake that kept the
        // other core busy has ended).
        let keep = |rel: &str, n: &Node| {
            let was_told = told.contains(rel);
            let merge = !was_told
                || grouped.contains(rel)
                || (n.entry.is_dir() && (cs.markers.contains(rel) || nests(&join(target, rel))));
            (was_told, merge)
        };
        let pass = |nodes: &mut dyn Iterator<Item = (&String, &Node)>| {
            let (mut found, mut merged) = (0usize, Vec::new());
            for (rel, n) in nodes {
                let (was_told, merge) = keep(rel, n);
                found += usize::from(was_told);
                if merge {
                    merged.push((rel.clone(), n.clone()));
                }
            }
            (found, merged)
        };
        let mid = (cs.nodes.len() >= SPLIT_PASS_MIN)
            .then(|| cs.nodes.keys().nth(cs.nodes.len() / 2))
            .flatten();
        let ((found_a, a), (found_b, b)) = match mid {
            Some(mid) => std::thread::scope(|sc| {
                let upper = sc.spawn(|| pass(&mut cs.nodes.range::<String, _>(mid..)));
                let lower = pass(&mut cs.nodes.range::<String, _>(..mid));
                // A half lost (its thread panicked): built from nothing.
                upper.join().ok().map(|upper| (lower, upper))
            })?,
            _ => (pass(&mut cs.nodes.iter()), Default::default()),
        };
        let rest = ChangeSet {
            root: cs.root.clone(),
            markers: cs.markers.clone(),
            // In order already: the lower half, then the upper.
            nodes: a.into_iter().chain(b).collect(),
            ..ChangeSet::default()
        };
        if found_a + found_b != told.len() {
            return None;
        }
        fill(
            &mut tree,
            cas,
            &rest,
            target,
            ApplyMode::Merge,
            params,
            now,
            &dirtab,
            false,
        )
        .ok()?;
        Some(
            match succeeds(&mut tree, target, replaces, &mut base).ok()? {
                Ok(replaces) => Built::Catalogs {
                    sub: Box::new(tree.commit_nested(target, now).ok()?),
                    replaces,
                },
                // The same rows as the catalog there: none to graft.
                Err(same) => Built::Same(same),
            },
        )
    });
    drop(tmp);
    // Tens of thousands of paths: freed while the commit goes on.
    crate::drop_aside((told, dirs));
    match streamed {
        Some(built) => Some(Prebuilt {
            built,
            path: target.to_string(),
            dirtab,
            nodes: cs.nodes.len(),
        }),
        None => {
            drop(base);
            prebuild(cas, &cs, target, params, now).ok().flatten()
        }
    }
}

/// Whether `new` written into a catalog would give the row `old` has (type flags are derived
/// on write, so they are compared as they would be stored).
fn as_stored_equal(old: &Entry, new: &Entry) -> bool {
    let (mut a, mut b) = (old.clone(), new.clone());
    a.flags = a.normalized_flags();
    b.flags = b.normalized_flags();
    crate::merge::same(&a, &b)
}

/// What pruning saw of the replaced tree: the directories it listed and the files (every
/// non-directory) it kept in them, so the change set's entries are compared without a lookup
/// each. Only an entry's own step changes it afterwards (each is taken once); members of a
/// hardlink group see their link counts change, but a grouped entry is never kept as it is.
#[derive(Default)]
struct Listed {
    dirs: HashSet<String>,
    files: HashMap<String, Entry>,
}

/// For `Replace`: removes what the change set does not have under `target` (an entry whose kind
/// changes goes too, to be added anew) and returns the nested catalog roots found there, with
/// their paths relative to the target, and what it listed. Empty `.cvmfscatalog` markers that
/// the dirtab creates are kept where it still applies, so those catalogs stay unchanged.
fn prune_to(
    tree: &mut CatalogTree<'_>,
    target: &str,
    cs: &ChangeSet,
    dirtab: &Dirtab,
) -> Result<(Vec<(String, String)>, Listed), RepoError> {
    let mut nested = Vec::new();
    let mut listed = Listed::default();
    match tree.lookup(target)? {
        Some(e) if e.is_dir() => {}
        _ => return Ok((nested, listed)),
    }
    let mut stack = vec![(target.to_string(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        if tree.is_nested_root(&path)? {
            nested.push((path.clone(), rel.clone()));
        }
        for ch in tree.list(&path)? {
            if path.is_empty() && ch.name == ".cvmfs" {
                continue;
            }
            let crel = if rel.is_empty() {
                ch.name.clone()
            } else {
                format!("{rel}/{}", ch.name)
            };
            let cpath = format!("{path}/{}", ch.name);
            match cs.nodes.get(&crel) {
                Some(n) if n.entry.is_dir() && ch.is_dir() => stack.push((cpath, crel)),
                Some(n) if !n.entry.is_dir() && !ch.is_dir() => {
                    listed.files.insert(cpath, ch);
                }
                None if ch.name == ".cvmfscatalog"
                    && !ch.is_dir()
                    && !dirtab.is_empty()
                    && dirtab.matches(&path) => {}
                _ => {
                    tree.remove(&cpath)?;
                }
            }
        }
        listed.dirs.insert(path);
    }
    Ok((nested, listed))
}

/// A directory listing line for `repo ls`.
pub fn describe_entry(e: &Entry) -> String {
    let t = match e.kind() {
        Kind::Directory => 'd',
        Kind::Regular => '-',
        Kind::Symlink => 'l',
        Kind::Special => 'c',
    };
    let mut s = format!(
        "{t}{:04o} {:>6} {:>6} {:>12} {}",
        e.mode & 0o7777,
        e.uid,
        e.gid,
        e.size,
        e.name
    );
    if e.kind() == Kind::Symlink {
        s.push_str(&format!(" -> {}", e.symlink));
    }
    if e.is_nested_mountpoint() || e.is_nested_root() {
        s.push_str("  [nested catalog]");
    }
    s
}

/// Opens the current tree read-only (for `ls`); edits made through it are never committed.
pub fn with_current_tree<T>(
    cas: &dyn Cas,
    f: impl FnOnce(&mut CatalogTree<'_>) -> Result<T, RepoError>,
) -> Result<T, RepoError> {
    let (m, _) =
        current_manifest(cas)?.ok_or_else(|| RepoError::Invalid("no repository here".into()))?;
    let tmp = scratch()?;
    let mut tree = CatalogTree::open(cas, tmp.path(), &m.root_catalog)?;
    f(&mut tree)
}

/// Runs `f` on the catalog tree of the revision rooted at `root` (read-only use).
pub fn with_tree_at<T>(
    cas: &dyn Cas,
    root: &ObjectId,
    f: impl FnOnce(&mut CatalogTree<'_>) -> Result<T, RepoError>,
) -> Result<T, RepoError> {
    let tmp = scratch()?;
    let mut tree = CatalogTree::open(cas, tmp.path(), root)?;
    f(&mut tree)
}

/// The default keys directory for a storage: a sibling `<storage>.keys`, never inside the
/// served storage.
pub fn default_keys_dir(storage: &Path) -> PathBuf {
    let name = storage
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "repo".into());
    storage.with_file_name(format!("{name}.keys"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::LocalCas;
    use crate::catalog::db::CatalogDb;
    use crate::chunker::ChunkParams;
    use crate::intake::{read_tar, read_tar_streamed, IntakeLimits, Streamed};
    use crate::object::Compression;
    use crate::pipeline::Pipeline;
    use std::sync::Arc;

    fn params() -> EncodeParams {
        EncodeParams {
            chunking: ChunkParams::disabled(),
            compression: Compression::Zlib(6),
        }
    }

    /// A tar of directories (`None`) and files (`Some(content)`).
    fn tar_of(items: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, body) in items {
            let mut h = tar::Header::new_gnu();
            h.set_path(p).unwrap();
            h.set_mtime(1_700_000_000);
            match body {
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    h.set_cksum();
                    b.append(&h, &[][..]).unwrap();
                }
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(d.len() as u64);
                    h.set_cksum();
                    b.append(&h, *d).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        cas: LocalCas,
        keys: RepoKeys,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap().without_fsync();
        let keys = RepoKeys::generate("unit.example.org", 30).unwrap();
        init(&cas, &keys, 0, 0, 1_700_000_000).unwrap();
        Fixture {
            _dir: dir,
            cas,
            keys,
        }
    }

    fn ingest(
        f: &Fixture,
        target: &str,
        tar: &[u8],
        mode: ApplyMode,
        removals: &[&str],
    ) -> Published {
        let target = normalize_repo_path(target).unwrap();
        let mut cs = read_tar(
            tar,
            target.is_empty(),
            &params(),
            &IntakeLimits::default(),
            &f.cas,
            1,
        )
        .unwrap();
        cs.removals = removals.iter().map(|s| s.to_string()).collect();
        let p = publish(&f.cas, &f.keys, &[], 1_700_000_100, |t| {
            apply_changeset(t, &f.cas, &cs, &target, mode, &params(), 1_700_000_100)
        })
        .unwrap();
        let report = crate::check::check(&f.cas, Some(&f.keys.master_pub), 1_700_000_200);
        assert!(report.ok(), "check findings: {:#?}", report.findings);
        p
    }

    /// Object `id` decoded into a scratch file (kept while the directory lives).
    fn scratch_copy(f: &Fixture, id: &ObjectId) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("object.db");
        std::fs::write(
            &file,
            decode_to_vec(id, &get_all(&f.cas, id).unwrap(), true).unwrap(),
        )
        .unwrap();
        (tmp, file)
    }

    fn nested_of(f: &Fixture, root: &ObjectId) -> Vec<(String, Option<ObjectId>)> {
        let (_tmp, file) = scratch_copy(f, root);
        let db = CatalogDb::open(&file, false).unwrap();
        db.nested()
            .unwrap()
            .into_iter()
            .map(|n| (n.path, n.hash))
            .collect()
    }

    fn stats_of(f: &Fixture, id: &ObjectId) -> crate::catalog::Statistics {
        let (_tmp, file) = scratch_copy(f, id);
        CatalogDb::open(&file, false)
            .unwrap()
            .read_statistics()
            .unwrap()
    }

    /// The tag names of the current history.
    fn tag_names(f: &Fixture) -> Vec<String> {
        let (m, _) = current_manifest(&f.cas).unwrap().unwrap();
        let (_tmp, file) = scratch_copy(f, &m.history.unwrap());
        let mut v: Vec<String> = History::open(&file)
            .unwrap()
            .tags()
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn join_puts_one_slash_between_and_keeps_the_base_for_nothing() {
        assert_eq!(join("/sw/1.0", "lib/x.so"), "/sw/1.0/lib/x.so");
        assert_eq!(join("/sw/1.0", ""), "/sw/1.0");
        assert_eq!(join("", "sw"), "/sw");
        assert_eq!(join("", ""), "");
    }

    #[test]
    fn a_tag_is_the_token_whose_note_the_service_appended_last() {
        assert_eq!(tag_owner("nightly [cvmfs-prepub owner ci]"), Some("ci"));
        // A note a client wrote into its text comes before the one appended for its token.
        let forged = format!("x {} {}", owner_note("victim"), owner_note("ci"));
        assert_eq!(tag_owner(&forged), Some("ci"));
        // Gateway descriptions end with the job marker after the note.
        assert_eq!(
            tag_owner("x [cvmfs-prepub owner ci] [cvmfs-prepub job 1]"),
            Some("ci")
        );
        assert_eq!(tag_owner("made by an operator"), None);
        assert_eq!(tag_owner("[cvmfs-prepub owner unterminated"), None);
        let had = |description: &str| Tag {
            name: "n".into(),
            hash: "00".repeat(20),
            revision: 2,
            timestamp: 0,
            description: description.into(),
            size: 0,
        };
        let want = |owner: Option<&str>| TagRequest {
            name: "n".into(),
            description: String::new(),
            owner: owner.map(Into::into),
        };
        let ci = want(Some("ci"));
        assert!(may_take_tag(&ci, None).is_ok());
        assert!(may_take_tag(&ci, Some(&had(&owner_note("ci")))).is_ok());
        for other in [owner_note("other"), "made by an operator".into()] {
            let refused = may_take_tag(&ci, Some(&had(&other)));
            assert!(
                matches!(&refused, Err(RepoError::TagTaken(n)) if n == "n"),
                "{refused:?}"
            );
            assert!(may_take_tag(&want(None), Some(&had(&other))).is_ok());
        }
    }

    #[test]
    fn each_history_names_the_one_it_was_made_from() {
        let f = fixture();
        let history_of = |m: &Manifest| {
            let (tmp, file) = scratch_copy(&f, &m.history.unwrap());
            let prev = History::open(&file).unwrap().previous_revision().unwrap();
            drop(tmp);
            prev
        };
        let first = current_manifest(&f.cas).unwrap().unwrap().0;
        assert_eq!(history_of(&first), None);
        let mut before = first;
        for now in [1_700_000_100, 1_700_000_200] {
            publish(&f.cas, &f.keys, &[], now, |_| Ok(())).unwrap();
            let m = current_manifest(&f.cas).unwrap().unwrap().0;
            assert_ne!(m.history, before.history);
            assert_eq!(history_of(&m), before.history);
            before = m;
        }
    }

    #[test]
    fn a_publish_drops_expired_automatic_tags_only() {
        let f = fixture();
        let auto = |n: u32| format!("prepub-{n:08x}-0000-4000-8000-000000000000");
        let tag = |name: &str| TagRequest {
            name: name.into(),
            description: "d".into(),
            owner: None,
        };
        let expiry = TagExpiry {
            span_secs: 100,
            exempt: vec!["prepub-00000002-*".into()],
        };
        let step = |n: u32, now: i64, extra: Option<&str>| {
            let mut tags = vec![tag(&auto(n))];
            tags.extend(extra.map(tag));
            publish_guarded(&f.cas, &f.keys, &tags, Some(&expiry), now, &|| true, |_| {
                Ok(())
            })
            .unwrap()
        };
        // Three automatic tags (the second exempt) and a named one, within 100 s.
        assert!(step(1, 1_700_001_000, Some("release-1"))
            .expired_tags
            .is_empty());
        assert!(step(2, 1_700_001_050, None).expired_tags.is_empty());
        assert!(step(3, 1_700_001_099, None).expired_tags.is_empty());
        // 150 s after the first: it has expired; the second (100 s old) is exempt, the third
        // younger; named tags and the new one stay.
        let p = step(4, 1_700_001_100 + 50, None);
        assert_eq!(p.expired_tags, [auto(1)]);
        assert_eq!(
            tag_names(&f),
            [
                auto(2),
                auto(3),
                auto(4),
                "release-1".into(),
                "trunk".into(),
                "trunk-previous".into()
            ]
        );
        // A collected repository says so in its manifest, and keeps saying so.
        let gc_flag = || {
            current_manifest(&f.cas)
                .unwrap()
                .unwrap()
                .0
                .garbage_collectable
        };
        assert!(gc_flag());
        // Without an expiry nothing is dropped, however old.
        publish(&f.cas, &f.keys, &[tag(&auto(5))], 1_800_000_000, |_| Ok(())).unwrap();
        assert_eq!(tag_names(&f).len(), 7);
        assert!(gc_flag());
        let report = crate::check::check(&f.cas, Some(&f.keys.master_pub), 1_800_000_100);
        assert!(report.ok(), "check findings: {:#?}", report.findings);
    }

    #[test]
    fn markers_create_nested_catalogs_and_untouched_ones_are_reused() {
        let f = fixture();
        let t = tar_of(&[
            ("y/.cvmfscatalog", Some(b"")),
            ("y/f", Some(b"1")),
            ("y/d/g", Some(b"22")),
        ]);
        let p1 = ingest(&f, "/", &t, ApplyMode::Replace, &[]);
        let n1 = nested_of(&f, &p1.commit.root);
        assert_eq!(n1.len(), 1);
        assert_eq!(n1[0].0, "/y");
        let root_stats = stats_of(&f, &p1.commit.root);
        assert_eq!(root_stats.self_.get("nested"), 1);
        assert_eq!(root_stats.subtree.get("regular"), 3);
        assert_eq!(root_stats.subtree.get("dir"), 2);
        // A change elsewhere keeps /y's catalog object as it was.
        let p2 = ingest(
            &f,
            "/x",
            &tar_of(&[("z", Some(b"333"))]),
            ApplyMode::Replace,
            &[],
        );
        assert_eq!(nested_of(&f, &p2.commit.root), n1);
        assert_eq!(
            p2.commit.written.len(),
            1,
            "only the root catalog is rewritten"
        );
        // A change inside /y rewrites exactly /y and the root.
        let p3 = ingest(
            &f,
            "/y/d",
            &tar_of(&[("h", Some(b"4444"))]),
            ApplyMode::Merge,
            &[],
        );
        assert_eq!(p3.commit.written.len(), 2);
        assert_ne!(nested_of(&f, &p3.commit.root), n1);
        let s3 = stats_of(&f, &p3.commit.root);
        assert_eq!(s3.self_.get("regular"), 1);
        assert_eq!(s3.subtree.get("regular"), 4);
        assert_eq!(s3.subtree.get("file_size"), 1 + 2 + 4);
    }

    #[test]
    fn marker_added_to_existing_directory_moves_its_subtree_and_removal_merges_back() {
        let f = fixture();
        let t = tar_of(&[
            ("a/b/.cvmfscatalog", Some(b"")),
            ("a/b/f", Some(b"x")),
            ("a/c/g", Some(b"yy")),
        ]);
        ingest(&f, "/", &t, ApplyMode::Replace, &[]);
        // /a becomes a nested catalog; /a/b (already nested) moves under it.
        let p = ingest(
            &f,
            "/a",
            &tar_of(&[(".cvmfscatalog", Some(b""))]),
            ApplyMode::Merge,
            &[],
        );
        let n = nested_of(&f, &p.commit.root);
        assert_eq!(
            n.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            vec!["/a"]
        );
        let a = n[0].1.unwrap();
        assert_eq!(
            nested_of(&f, &a)
                .iter()
                .map(|x| x.0.clone())
                .collect::<Vec<_>>(),
            vec!["/a/b".to_string()]
        );
        let root = stats_of(&f, &p.commit.root);
        assert_eq!(root.subtree.get("regular"), 4); // f, g and two markers
                                                    // Removing the marker merges /a back into the root; /a/b stays nested, now under the root.
        let p = ingest(&f, "/a", &tar_of(&[]), ApplyMode::Merge, &[".cvmfscatalog"]);
        let n = nested_of(&f, &p.commit.root);
        assert_eq!(
            n.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            vec!["/a/b"]
        );
        // Removing a whole nested subtree drops its catalog.
        let p = ingest(&f, "/", &tar_of(&[]), ApplyMode::Merge, &["a/b"]);
        assert!(nested_of(&f, &p.commit.root).is_empty());
        assert_eq!(
            stats_of(&f, &p.commit.root).subtree,
            crate::catalog::Counters::default()
        );
    }

    /// Every entry below `base` with what a reader sees of it (hardlink groups as "grouped",
    /// not their ids), and the nested catalog roots.
    fn dump(f: &Fixture, base: &str) -> (Vec<String>, Vec<String>) {
        with_current_tree(&f.cas, |t| {
            let (mut rows, mut nested) = (Vec::new(), Vec::new());
            let mut stack = vec![base.to_string()];
            while let Some(dir) = stack.pop() {
                if t.is_nested_root(&dir)? {
                    nested.push(dir.clone());
                }
                for e in t.list(&dir)? {
                    let p = format!("{dir}/{}", e.name);
                    rows.push(format!(
                        "{p} mode={:o} size={} hash={:?} chunks={:?} link={} mtime={} owner={}:{} nlink={} grouped={} xattrs={:?}",
                        e.mode, e.size, e.hash, e.chunks, e.symlink, e.mtime, e.uid, e.gid,
                        e.linkcount, e.hardlink_group > 0, e.xattrs
                    ));
                    if e.is_dir() {
                        stack.push(p);
                    }
                }
            }
            rows.sort();
            nested.sort();
            Ok((rows, nested))
        })
        .unwrap()
    }

    /// A file's content, or (`Err`) the name of the file it is a hard link to.
    type Item<'a> = (&'a str, Result<&'a [u8], &'a str>);

    /// A tar of files and hard links in one directory `d`.
    fn tar_with_links(items: &[Item]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, what) in items {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_mode(0o644);
            match what {
                Ok(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_path(format!("d/{p}")).unwrap();
                    h.set_cksum();
                    b.append(&h, *d).unwrap();
                }
                Err(to) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    h.set_path(format!("d/{p}")).unwrap();
                    h.set_link_name(format!("d/{to}")).unwrap();
                    h.set_cksum();
                    b.append(&h, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn replacing_keeps_hardlink_groups_and_chunks_as_a_fresh_publish_has_them() {
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let chunked = EncodeParams::small_chunks();
        let steps: [&[Item]; 3] = [
            &[
                ("a", Ok(b"one")),
                ("a2", Err("a")),
                ("b", Ok(b"two")),
                ("big", Ok(&big)),
            ],
            // The group's content changes; b and the chunked file stay.
            &[
                ("a", Ok(b"one, edited")),
                ("a2", Err("a")),
                ("b", Ok(b"two")),
                ("big", Ok(&big)),
            ],
            // The group dissolves, b joins a new one, the chunked file changes.
            &[
                ("a", Ok(b"one, edited")),
                ("b", Ok(b"two")),
                ("b2", Err("b")),
                ("big", Ok(b"small now")),
            ],
        ];
        let publish_tar = |f: &Fixture, tar: &[u8]| {
            let cs = read_tar(tar, false, &chunked, &IntakeLimits::default(), &f.cas, 1).unwrap();
            publish(&f.cas, &f.keys, &[], 1_700_000_100, |t| {
                apply_changeset(
                    t,
                    &f.cas,
                    &cs,
                    "/sw",
                    ApplyMode::Replace,
                    &chunked,
                    1_700_000_100,
                )
            })
            .unwrap();
            let report = crate::check::check(&f.cas, Some(&f.keys.master_pub), 1_700_000_200);
            assert!(report.ok(), "check findings: {:#?}", report.findings);
        };
        let f = fixture();
        for (i, step) in steps.iter().enumerate() {
            let tar = tar_with_links(step);
            publish_tar(&f, &tar);
            let fresh = fixture();
            publish_tar(&fresh, &tar);
            assert_eq!(dump(&f, "/sw"), dump(&fresh, "/sw"), "step {i}");
            if i == 1 {
                let rows = dump(&f, "/sw").0;
                let big = rows.iter().find(|r| r.starts_with("/sw/d/big ")).unwrap();
                assert!(
                    big.contains("offset: 0") && big.contains("hash=None"),
                    "{big}"
                );
            }
        }
        let rows = dump(&f, "/sw").0;
        let row = |name: &str| {
            rows.iter()
                .find(|r| r.starts_with(&format!("/sw/d/{name} ")))
                .unwrap()
                .clone()
        };
        assert!(row("b").contains("nlink=2 grouped=true"), "{rows:#?}");
        assert!(row("a").contains("nlink=1 grouped=false"), "{rows:#?}");
    }

    #[test]
    fn replacing_a_path_touches_only_what_differs_and_equals_a_fresh_publish() {
        let before = tar_of(&[
            ("keep.txt", Some(b"unchanged")),
            ("edit.txt", Some(b"old text")),
            ("gone.txt", Some(b"removed later")),
            ("becomes_dir", Some(b"a file first")),
            ("becomes_file/inner", Some(b"in a dir first")),
            ("n1/.cvmfscatalog", Some(b"")),
            ("n1/a", Some(b"in n1")),
            ("n1/deep/.cvmfscatalog", Some(b"")),
            ("n1/deep/b", Some(b"in n1/deep")),
            ("still/.cvmfscatalog", Some(b"")),
            ("still/c", Some(b"a nested catalog nothing changes")),
        ]);
        let after = tar_of(&[
            ("keep.txt", Some(b"unchanged")),
            ("edit.txt", Some(b"new text, longer")),
            ("becomes_dir/now", Some(b"a dir now")),
            ("becomes_file", Some(b"a file now")),
            ("n1/a", Some(b"in n1")),
            ("n1/deep/.cvmfscatalog", Some(b"")),
            ("n1/deep/b", Some(b"in n1/deep")),
            ("n2/.cvmfscatalog", Some(b"")),
            ("n2/d", Some(b"newly nested")),
            ("still/.cvmfscatalog", Some(b"")),
            ("still/c", Some(b"a nested catalog nothing changes")),
        ]);
        let f = fixture();
        ingest(&f, "/sw", &before, ApplyMode::Replace, &[]);
        let before_nested = nested_of(
            &f,
            &current_manifest(&f.cas).unwrap().unwrap().0.root_catalog,
        );
        let still = before_nested.iter().find(|n| n.0 == "/sw/still").cloned();
        assert!(still.is_some(), "{before_nested:?}");
        ingest(&f, "/sw", &after, ApplyMode::Replace, &[]);
        let fresh = fixture();
        ingest(&fresh, "/sw", &after, ApplyMode::Replace, &[]);
        let (rows, nested) = dump(&f, "/sw");
        assert_eq!((rows, nested.clone()), dump(&fresh, "/sw"));
        assert_eq!(nested, vec!["/sw/n1/deep", "/sw/n2", "/sw/still"]);
        // The untouched nested catalog is the same object; republishing the same tar rewrites
        // only the root catalog.
        let (m, _) = current_manifest(&f.cas).unwrap().unwrap();
        assert!(nested_of(&f, &m.root_catalog).contains(&still.unwrap()));
        let again = ingest(&f, "/sw", &after, ApplyMode::Replace, &[]);
        assert_eq!(
            again.commit.written.len(),
            1,
            "only the root catalog is rewritten"
        );
        assert_eq!(dump(&f, "/sw"), dump(&fresh, "/sw"));
    }

    #[test]
    fn replacing_under_a_dirtab_keeps_its_catalogs_and_follows_rule_changes() {
        let f = fixture();
        let fresh = fixture();
        for fx in [&f, &fresh] {
            ingest(
                fx,
                "/",
                &tar_of(&[(".cvmfsdirtab", Some(b"/sw/*\n"))]),
                ApplyMode::Merge,
                &[],
            );
        }
        let t = tar_of(&[("1.0/t", Some(b"a")), ("2.0/u", Some(b"b"))]);
        ingest(&f, "/sw", &t, ApplyMode::Replace, &[]);
        let again = ingest(&f, "/sw", &t, ApplyMode::Replace, &[]);
        assert_eq!(
            again.commit.written.len(),
            1,
            "dirtab catalogs stay as they were"
        );
        ingest(&fresh, "/sw", &t, ApplyMode::Replace, &[]);
        assert_eq!(dump(&f, "/sw"), dump(&fresh, "/sw"));
        // A root republish without the dirtab drops its catalogs, as a fresh publish has none.
        let root = tar_of(&[("sw/1.0/t", Some(b"a")), ("sw/2.0/u", Some(b"b"))]);
        ingest(&f, "/", &root, ApplyMode::Replace, &[]);
        let (_, nested) = dump(&f, "");
        assert!(nested.is_empty(), "{nested:?}");
        let other = fixture();
        ingest(&other, "/", &root, ApplyMode::Replace, &[]);
        assert_eq!(dump(&f, ""), dump(&other, ""));
    }

    #[test]
    fn dirtab_rules_make_nested_catalogs_with_markers() {
        let f = fixture();
        ingest(
            &f,
            "/",
            &tar_of(&[(".cvmfsdirtab", Some(b"# releases\n/sw/*\n!/sw/skip\n"))]),
            ApplyMode::Merge,
            &[],
        );
        let t = tar_of(&[
            ("1.0/bin/t", Some(b"a")),
            ("skip/x", Some(b"b")),
            ("2.0", None),
        ]);
        let p = ingest(&f, "/sw", &t, ApplyMode::Replace, &[]);
        let n: Vec<String> = nested_of(&f, &p.commit.root)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(n, vec!["/sw/1.0".to_string(), "/sw/2.0".to_string()]);
        let marker = with_current_tree(&f.cas, |t| Ok(t.lookup("/sw/1.0/.cvmfscatalog")?)).unwrap();
        assert_eq!(marker.unwrap().size, 0);
        let d = Dirtab::parse("/a/*/c\nlib\n!*/tmp\n");
        assert!(d.matches("/a/b/c"));
        assert!(!d.matches("/a/.hidden/c"));
        assert!(d.matches("/x/y/lib"));
        assert!(!d.matches("/a/b"));
        assert!(!d.matches("/q/tmp"));
    }

    #[test]
    fn revision_6_catalogs_are_upgraded_when_edited() {
        let f = fixture();
        ingest(
            &f,
            "/",
            &tar_of(&[("keep/f", Some(b"1"))]),
            ApplyMode::Replace,
            &[],
        );
        // Turn the current root catalog into what a 2.11 server writes: revision 6, no mtimens.
        let (mut m, _) = current_manifest(&f.cas).unwrap().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("r6.db");
        std::fs::write(
            &file,
            decode_to_vec(
                &m.root_catalog,
                &get_all(&f.cas, &m.root_catalog).unwrap(),
                true,
            )
            .unwrap(),
        )
        .unwrap();
        {
            let c = rusqlite::Connection::open(&file).unwrap();
            c.execute_batch("ALTER TABLE catalog DROP COLUMN mtimens; UPDATE properties SET value = '6' WHERE key = 'schema_revision';").unwrap();
        }
        let bytes = std::fs::read(&file).unwrap();
        let (id, stored) = compress_metadata(&bytes, Suffix::Catalog);
        f.cas.put_bytes(&id, &stored).unwrap();
        m.root_catalog = id;
        m.root_size = bytes.len() as u64;
        f.cas.put_root_file(MANIFEST, &m.sign(&f.keys)).unwrap();
        let listing = with_current_tree(&f.cas, |t| Ok(t.list("/keep")?)).unwrap();
        assert_eq!(listing.len(), 1);
        let p = ingest(
            &f,
            "/new",
            &tar_of(&[("g", Some(b"2"))]),
            ApplyMode::Replace,
            &[],
        );
        let tmp2 = tempfile::tempdir().unwrap();
        let f2 = tmp2.path().join("c.db");
        std::fs::write(
            &f2,
            decode_to_vec(
                &p.commit.root,
                &get_all(&f.cas, &p.commit.root).unwrap(),
                true,
            )
            .unwrap(),
        )
        .unwrap();
        let db = CatalogDb::open(&f2, false).unwrap();
        assert_eq!(db.schema_revision(), 7);
        assert!(db.lookup("/keep/f").unwrap().is_some());
    }

    #[test]
    fn publish_refuses_foreign_keys_and_bad_paths() {
        let f = fixture();
        let other = RepoKeys::generate("other.example.org", 1).unwrap();
        let e = publish(&f.cas, &other, &[], 1, |_| Ok(())).unwrap_err();
        assert!(
            e.to_string()
                .contains("storage holds repository 'unit.example.org'"),
            "{e}"
        );
        assert!(normalize_repo_path("/a/../b").is_err());
        assert!(normalize_repo_path("/.cvmfs/x").is_err());
        assert_eq!(normalize_repo_path("a//b/").unwrap(), "/a/b");
        assert_eq!(normalize_repo_path("/").unwrap(), "");
    }

    #[test]
    fn publishing_under_a_file_is_refused() {
        let f = fixture();
        ingest(
            &f,
            "/",
            &tar_of(&[("file", Some(b"1"))]),
            ApplyMode::Replace,
            &[],
        );
        let cs = read_tar(
            &tar_of(&[("x", Some(b"2"))])[..],
            false,
            &params(),
            &IntakeLimits::default(),
            &f.cas,
            1,
        )
        .unwrap();
        let e = publish(&f.cas, &f.keys, &[], 5, |t| {
            apply_changeset(
                t,
                &f.cas,
                &cs,
                "/file/sub",
                ApplyMode::Replace,
                &params(),
                5,
            )
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot publish under /file/sub: /file exists and is not a directory"
        );
    }

    /// A release tar: a nested catalog at its top, another one below, files in both.
    fn release_tar(v: &str) -> Vec<u8> {
        let big = format!("{v} ").repeat(400);
        tar_of(&[
            (".cvmfscatalog", Some(b"")),
            ("bin", None),
            ("bin/tool", Some(big.as_bytes())),
            ("bin/sub", None),
            ("bin/sub/x", Some(b"x")),
            ("lib", None),
            ("lib/.cvmfscatalog", Some(b"")),
            ("lib/libz.so", Some(v.as_bytes())),
            ("README", Some(b"read me")),
        ])
    }

    /// A catalog's rows (with their keys) and properties, in key order.
    fn rows_of(f: &Fixture, id: &ObjectId) -> Vec<String> {
        let (_tmp, file) = scratch_copy(f, id);
        let db = CatalogDb::open(&file, false).unwrap();
        let mut rows: Vec<String> = db
            .all_rows()
            .unwrap()
            .into_iter()
            .map(|(e, k)| format!("{:?} {:?} {e:?}", k.path, k.parent))
            .collect();
        for p in [
            "revision",
            "last_modified",
            "previous_revision",
            "root_prefix",
            "TTL",
        ] {
            rows.push(format!("{p}={:?}", db.property(p).unwrap()));
        }
        rows.sort();
        rows
    }

    fn changeset_of(f: &Fixture, tar: &[u8]) -> ChangeSet {
        read_tar(tar, false, &params(), &IntakeLimits::default(), &f.cas, 1).unwrap()
    }

    fn publish_cs(f: &Fixture, target: &str, cs: &ChangeSet, now: i64) -> Published {
        let p = publish(&f.cas, &f.keys, &[], now, |t| {
            apply_changeset(t, &f.cas, cs, target, ApplyMode::Replace, &params(), now)
        })
        .unwrap();
        let report = crate::check::check(&f.cas, Some(&f.keys.master_pub), now + 100);
        assert!(report.ok(), "check findings: {:#?}", report.findings);
        p
    }

    /// Two repositories with the same tree, root catalog rows and counters after publishes
    /// `a.1` and `b.1`.
    fn assert_same_repository(a: (&Fixture, &Published), b: (&Fixture, &Published)) {
        assert_eq!(
            rows_of(a.0, &a.1.commit.root),
            rows_of(b.0, &b.1.commit.root)
        );
        assert_eq!(
            stats_of(a.0, &a.1.commit.root),
            stats_of(b.0, &b.1.commit.root)
        );
        assert_eq!(dump(a.0, ""), dump(b.0, ""));
    }

    #[test]
    fn a_prebuilt_release_is_grafted_and_gives_the_catalogs_a_full_commit_writes() {
        let (plain, early) = (fixture(), fixture());
        let now = 1_700_000_100;
        for f in [&plain, &early] {
            publish_cs(f, "/sw/0.9", &changeset_of(f, &release_tar("old")), now);
        }
        let tar = release_tar("new");
        let want = publish_cs(&plain, "/sw/1.0", &changeset_of(&plain, &tar), now);

        let mut cs = changeset_of(&early, &tar);
        let pre = prebuild(&early.cas, &cs, "/sw/1.0", &params(), now)
            .unwrap()
            .expect("a new release with a marker is prebuilt");
        let built = *pre.catalog();
        // Stored ahead of the commit, not yet referenced.
        assert!(early.cas.size(&built).is_ok());
        assert!(dump(&early, "/sw").0.iter().all(|r| !r.contains("1.0")));
        cs.prebuilt = Some(Arc::new(pre));
        let got = publish_cs(&early, "/sw/1.0", &cs, now);

        // The same catalogs: the release's own byte for byte (the root catalog refers to them
        // by hash), and a root that mounts them with the same rows, counters and properties
        // (its file differs: the same rows were written in another order of operations).
        assert_eq!(
            nested_of(&early, &got.commit.root),
            nested_of(&plain, &want.commit.root)
        );
        assert_same_repository((&early, &got), (&plain, &want));
        assert_eq!(got.commit.written.len(), want.commit.written.len());
        assert!(got.commit.written.contains(&built));

        // Built earlier than committed: the commit mounts the prebuilt catalog as it is (one
        // built by the commit would carry the commit's time, and another hash).
        let later = fixture();
        publish_cs(
            &later,
            "/sw/0.9",
            &changeset_of(&later, &release_tar("old")),
            now,
        );
        let mut cs = changeset_of(&later, &tar);
        let pre = prebuild(&later.cas, &cs, "/sw/1.0", &params(), now - 50)
            .unwrap()
            .unwrap();
        let built = *pre.catalog();
        cs.prebuilt = Some(Arc::new(pre));
        let got = publish(&later.cas, &later.keys, &[], now, |t| {
            apply_changeset(
                t,
                &later.cas,
                &cs,
                "/sw/1.0",
                ApplyMode::Replace,
                &params(),
                now,
            )?;
            // The grafted catalog opens when an edit reaches into it.
            assert_eq!(t.lookup("/sw/1.0/lib/libz.so")?.unwrap().size, 3);
            Ok(())
        })
        .unwrap();
        let mounted: Vec<_> = nested_of(&later, &got.commit.root)
            .into_iter()
            .filter(|(p, _)| p == "/sw/1.0")
            .collect();
        assert_eq!(mounted, vec![("/sw/1.0".to_string(), Some(built))]);
        assert_eq!(
            rows_of(&later, &built)
                .iter()
                .find(|r| r.starts_with("last_modified="))
                .unwrap(),
            &format!("last_modified=Some(\"{}\")", now - 50)
        );
    }

    #[test]
    fn a_prebuilt_release_that_no_longer_fits_is_built_by_the_commit() {
        let now = 1_700_000_100;
        let tar = release_tar("new");
        // A target that is not new, or a change set without a marker, is not prebuilt.
        let f = fixture();
        publish_cs(&f, "/sw/1.0", &changeset_of(&f, &release_tar("old")), now);
        assert!(
            prebuild(&f.cas, &changeset_of(&f, &tar), "/sw/1.0", &params(), now)
                .unwrap()
                .is_none()
        );
        let flat = tar_of(&[("a", Some(b"a"))]);
        assert!(
            prebuild(&f.cas, &changeset_of(&f, &flat), "/sw/2.0", &params(), now)
                .unwrap()
                .is_none()
        );

        // The path appeared between processing and commit: replaced as without a prebuild.
        let (plain, raced) = (fixture(), fixture());
        let mut cs = changeset_of(&raced, &tar);
        cs.prebuilt = prebuild(&raced.cas, &cs, "/sw/1.0", &params(), now)
            .unwrap()
            .map(Arc::new);
        assert!(cs.prebuilt.is_some());
        for f in [&plain, &raced] {
            publish_cs(f, "/sw/1.0", &changeset_of(f, &release_tar("old")), now);
        }
        let want = publish_cs(&plain, "/sw/1.0", &changeset_of(&plain, &tar), now);
        let got = publish_cs(&raced, "/sw/1.0", &cs, now);
        assert_eq!(dump(&raced, ""), dump(&plain, ""));
        assert_eq!(
            rows_of(&raced, &got.commit.root),
            rows_of(&plain, &want.commit.root)
        );

        // A prebuilt catalog that vanished from the store is not grafted.
        let (plain, lost) = (fixture(), fixture());
        let mut cs = changeset_of(&lost, &tar);
        let pre = prebuild(&lost.cas, &cs, "/sw/1.0", &params(), now)
            .unwrap()
            .unwrap();
        let pre_id = &pre.catalog().clone();
        std::fs::remove_file(lost._dir.path().join(pre.catalog().path())).unwrap();
        cs.prebuilt = Some(Arc::new(pre));
        let want = publish_cs(&plain, "/sw/1.0", &changeset_of(&plain, &tar), now);
        let got = publish_cs(&lost, "/sw/1.0", &cs, now);
        assert_eq!(
            rows_of(&lost, &got.commit.root),
            rows_of(&plain, &want.commit.root)
        );
        // Written again by the commit (the check above read every catalog).
        assert!(got.commit.written.contains(pre_id));

        // The dirtab changed meanwhile: the commit follows the new one.
        let (plain, moved) = (fixture(), fixture());
        let mut cs = changeset_of(&moved, &tar);
        cs.prebuilt = prebuild(&moved.cas, &cs, "/sw/1.0", &params(), now)
            .unwrap()
            .map(Arc::new);
        let dirtab = tar_of(&[(".cvmfsdirtab", Some(b"/sw/*/bin\n"))]);
        for f in [&plain, &moved] {
            let d = read_tar(
                &dirtab[..],
                true,
                &params(),
                &IntakeLimits::default(),
                &f.cas,
                1,
            )
            .unwrap();
            publish(&f.cas, &f.keys, &[], now, |t| {
                apply_changeset(t, &f.cas, &d, "", ApplyMode::Merge, &params(), now)
            })
            .unwrap();
        }
        let want = publish_cs(&plain, "/sw/1.0", &changeset_of(&plain, &tar), now);
        let got = publish_cs(&moved, "/sw/1.0", &cs, now);
        assert_eq!(
            rows_of(&moved, &got.commit.root),
            rows_of(&plain, &want.commit.root)
        );
        assert_eq!(dump(&moved, ""), dump(&plain, ""));
        let nested = dump(&moved, "").1;
        assert!(nested.contains(&"/sw/1.0/bin".to_string()), "{nested:?}");
    }

    fn publish_with(
        f: &Fixture,
        target: &str,
        cs: &ChangeSet,
        params: &EncodeParams,
        now: i64,
    ) -> Published {
        let p = publish(&f.cas, &f.keys, &[], now, |t| {
            apply_changeset(t, &f.cas, cs, target, ApplyMode::Replace, params, now)
        })
        .unwrap();
        let report = crate::check::check(&f.cas, Some(&f.keys.master_pub), now + 100);
        assert!(report.ok(), "check findings: {:#?}", report.findings);
        p
    }

    /// A release whose order makes the streamed build correct itself: files before the
    /// directory entry that holds them, a marker after the rows it moves, hard links (one
    /// group, one copy across directories), a symlink, a chunked file, the `.` entry last.
    fn awkward_release(v: &str) -> Vec<u8> {
        awkward_release_with(v, 0)
    }

    /// [`awkward_release`] with `filler` more files in `m/` (sorted between its hard links
    /// and markers in `bin` and `lib` and those in `share` and `zz`).
    fn awkward_release_with(v: &str, filler: usize) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut put = |path: &str, kind: tar::EntryType, mode: u32, body: &[u8], link: &str| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_mtime(1_700_000_000);
            h.set_size(body.len() as u64);
            if link.is_empty() {
                h.set_path(path).unwrap();
                h.set_cksum();
                b.append(&h, body).unwrap();
            } else {
                b.append_link(&mut h, path, link).unwrap();
            }
        };
        use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        put(".cvmfscatalog", F, 0o644, b"", "");
        put("bin/tool", F, 0o755, format!("tool {v}").as_bytes(), "");
        put("bin", D, 0o750, b"", "");
        put("bin/tool2", H, 0o755, b"", "bin/tool");
        put("bin/latest", S, 0o777, b"", "tool");
        put("lib/a.so", F, 0o644, &big, "");
        put("lib/sub/b.so", F, 0o644, b"same", "");
        put("lib/c.so", F, 0o644, b"same", "");
        put("lib/.cvmfscatalog", F, 0o644, b"", "");
        put("share", D, 0o755, b"", "");
        put("share/tool3", H, 0o755, b"", "bin/tool");
        put("share/doc/README", F, 0o644, v.as_bytes(), "");
        put("bin/x", F, 0o755, format!("x {v}").as_bytes(), "");
        put("bin/y", H, 0o755, b"", "bin/x");
        for i in 0..filler {
            put(
                &format!("m/f{i:05}"),
                F,
                0o644,
                format!("{v} {i}").as_bytes(),
                "",
            );
        }
        if filler > 0 {
            put("zz/.cvmfscatalog", F, 0o644, b"", "");
            put("zz/z", F, 0o644, b"z", "");
            put("zz/tool4", H, 0o755, b"", "bin/tool");
        }
        put(".", D, 0o700, b"", "");
        b.into_inner().unwrap()
    }

    /// Every catalog below `id` (by mount point, from `at`), with its rows.
    fn catalogs(f: &Fixture, at: &str, id: &ObjectId, out: &mut Vec<(String, Vec<String>)>) {
        out.push((at.to_string(), rows_of(f, id)));
        for (path, hash) in nested_of(f, id) {
            catalogs(f, &path, &hash.unwrap(), out);
        }
    }

    /// Each catalog's mount point and rows.
    type Rows = Vec<(String, Vec<String>)>;

    /// Rows of every catalog of the streamed prebuild `pre` and of one built from nothing for
    /// `cs`, and the latter's build.
    fn against_nothing(
        f: &Fixture,
        pre: &Prebuilt,
        cs: &ChangeSet,
        target: &str,
        params: &EncodeParams,
        now: i64,
    ) -> (Rows, Rows, Prebuilt) {
        let want = prebuild(&f.cas, cs, target, params, now).unwrap().unwrap();
        let (mut got_rows, mut want_rows) = (Vec::new(), Vec::new());
        catalogs(f, target, pre.catalog(), &mut got_rows);
        catalogs(f, target, want.catalog(), &mut want_rows);
        (got_rows, want_rows, want)
    }

    fn streamed(
        f: &Fixture,
        tar: &[u8],
        target: &str,
        params: &EncodeParams,
        now: i64,
        before: &[Streamed],
    ) -> (ChangeSet, Option<Prebuilt>) {
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::open(f._dir.path()).unwrap());
        let stream = PrebuildStream::start(cas.clone(), target, *params, now).unwrap();
        let tell = stream.sender().unwrap();
        // A builder that found nothing to prebuild has stopped listening already (or will):
        // like the intake, telling it then is not an error.
        let _ = tell.send(before.to_vec());
        let pipeline = Pipeline::new(2, 2, 64 << 20);
        let cs = read_tar_streamed(
            tar,
            false,
            params,
            &IntakeLimits::default(),
            cas,
            &crate::pipeline::Batcher::new(&pipeline),
            now,
            Some(tell),
        )
        .unwrap();
        stream.finish(cs)
    }

    #[test]
    fn a_streamed_prebuild_has_the_rows_of_one_built_from_nothing() {
        let now = 1_700_000_100;
        let params = EncodeParams::small_chunks();
        // A dirtab rule makes `share` a nested catalog (with an empty marker) as well.
        let with_dirtab = || {
            let f = fixture();
            let dirtab = tar_of(&[(".cvmfsdirtab", Some(b"/sw/*/share\n"))]);
            let d = read_tar(
                &dirtab[..],
                true,
                &params,
                &IntakeLimits::default(),
                &f.cas,
                1,
            )
            .unwrap();
            publish(&f.cas, &f.keys, &[], now, |t| {
                apply_changeset(t, &f.cas, &d, "", ApplyMode::Merge, &params, now)
            })
            .unwrap();
            f
        };
        let f = with_dirtab();
        let tar = awkward_release("1");

        let (cs, pre) = streamed(&f, &tar, "/sw/1.0", &params, now, &[]);
        let pre = pre.expect("a new release with a marker is prebuilt");
        let (got_rows, want_rows, want) = against_nothing(&f, &pre, &cs, "/sw/1.0", &params, now);
        let mounts: Vec<&str> = want_rows.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            mounts,
            ["/sw/1.0", "/sw/1.0/lib", "/sw/1.0/share"],
            "the release has its three catalogs"
        );
        assert_eq!(got_rows, want_rows);
        // Built as told (the same rows written in another order), not from nothing.
        assert_ne!(pre.catalog(), want.catalog());
        // What the stream could not know was corrected: the group, the moved rows, the root.
        let all = format!("{got_rows:?}");
        assert!(all.contains("hardlink_group: 1,"), "{all}");
        assert!(pre.fits(&cs, "/sw/1.0", &pre.dirtab));

        // Grafted by the commit: the same tree as a commit that builds it.
        let plain = with_dirtab();
        let mut cs = cs;
        let built = *pre.catalog();
        cs.prebuilt = Some(Arc::new(pre));
        let got = publish_with(&f, "/sw/1.0", &cs, &params, now);
        let cs_plain = read_tar(
            &tar[..],
            false,
            &params,
            &IntakeLimits::default(),
            &plain.cas,
            now,
        )
        .unwrap();
        publish_with(&plain, "/sw/1.0", &cs_plain, &params, now);
        assert_eq!(dump(&f, ""), dump(&plain, ""));
        assert!(got.commit.written.contains(&built));
    }

    #[test]
    fn a_large_streamed_prebuild_compares_its_halves_on_two_threads_and_matches() {
        let now = 1_700_000_100;
        let params = EncodeParams::small_chunks();
        let f = fixture();
        // Hard links, markers and untold rows on both sides of the middle node.
        let tar = awkward_release_with("5", SPLIT_PASS_MIN + 500);
        let (cs, pre) = streamed(&f, &tar, "/sw/5.0", &params, now, &[]);
        assert!(cs.nodes.len() > SPLIT_PASS_MIN);
        let mid = cs.nodes.keys().nth(cs.nodes.len() / 2).unwrap();
        assert!(mid.starts_with("m/"), "{mid}");
        let pre = pre.expect("prebuilt");
        let (got_rows, want_rows, want) = against_nothing(&f, &pre, &cs, "/sw/5.0", &params, now);
        let mounts: Vec<&str> = want_rows.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(mounts, ["/sw/5.0", "/sw/5.0/lib", "/sw/5.0/zz"]);
        assert_eq!(got_rows, want_rows);
        // Built as told, not from nothing.
        assert_ne!(pre.catalog(), want.catalog());
        let all = format!("{got_rows:?}");
        assert!(
            all.contains("tool4") && all.contains("hardlink_group: 1,"),
            "{all}"
        );
    }

    #[test]
    fn a_stream_that_goes_wrong_falls_back_and_one_that_does_not_qualify_builds_nothing() {
        let now = 1_700_000_100;
        let params = EncodeParams::small_chunks();
        let f = fixture();
        let tar = awkward_release("2");
        // A row the tree cannot take (no parent): the stream is given up, the prebuild made
        // from the change set.
        let bogus = Streamed::Leaf {
            rel: "nowhere/x".into(),
            entry: Entry::directory("x", 0o755, 0, 0, now),
        };
        let (cs, pre) = streamed(&f, &tar, "/sw/2.0", &params, now, &[bogus]);
        let want = prebuild(&f.cas, &cs, "/sw/2.0", &params, now)
            .unwrap()
            .unwrap();
        // Built from nothing both times, at the same time: the same bytes.
        assert_eq!(pre.unwrap().catalog(), want.catalog());

        // No marker and no dirtab rule: not nested, so not prebuilt.
        let flat = tar_of(&[("a", Some(b"a")), ("d", None), ("d/b", Some(b"b"))]);
        assert!(streamed(&f, &flat, "/sw/3.0", &params, now, &[])
            .1
            .is_none());
        // A target the current revision has already: not prebuilt.
        let cs = read_tar(
            &tar[..],
            false,
            &params,
            &IntakeLimits::default(),
            &f.cas,
            now,
        )
        .unwrap();
        publish_with(&f, "/sw/4.0", &cs, &params, now);
        let (cs2, pre) = streamed(&f, &tar, "/sw/4.0", &params, now, &[]);
        assert!(pre.is_none());
        assert_eq!(cs2.nodes.len(), cs.nodes.len());
        // And the root is never prebuilt.
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::open(f._dir.path()).unwrap());
        assert!(PrebuildStream::start(cas, "", params, now).is_none());
    }

    /// A release with a catalog of its own and none below it (the shape of the harness's
    /// tree), with its `.` entry: `v` changes a file, `newer` adds one and drops another.
    fn own_catalog_release(v: &str, newer: bool) -> Vec<u8> {
        let tool = format!("tool {v}");
        let mut items: Vec<(&str, Option<&[u8]>)> = vec![
            (".", None),
            (".cvmfscatalog", Some(b"")),
            ("bin", None),
            ("bin/tool", Some(tool.as_bytes())),
            ("lib", None),
            ("lib/libz.so", Some(b"zlib")),
            ("share", None),
        ];
        items.push(if newer {
            ("share/NEWS", Some(b"news"))
        } else {
            ("share/OLD", Some(b"old"))
        });
        tar_of(&items)
    }

    /// The catalog mounted at `path` in the root catalog of the current revision.
    fn mounted_at(f: &Fixture, path: &str) -> Option<ObjectId> {
        let (m, _) = current_manifest(&f.cas).unwrap().unwrap();
        nested_of(f, &m.root_catalog)
            .into_iter()
            .find(|(p, _)| p == path)
            .and_then(|(_, h)| h)
    }

    #[test]
    fn a_release_published_again_is_prebuilt_as_the_next_revision_of_its_catalog() {
        let now = 1_700_000_100;
        let (plain, early) = (fixture(), fixture());
        for f in [&plain, &early] {
            let cs = changeset_of(f, &own_catalog_release("1", false));
            publish_cs(f, "/sw/a", &cs, now);
        }
        let old = mounted_at(&early, "/sw/a").unwrap();
        let tar = own_catalog_release("2", true);
        let want = publish_cs(&plain, "/sw/a", &changeset_of(&plain, &tar), now + 10);

        // Built while the tar is read (as the daemon does) and from nothing: the same rows,
        // both to replace the catalog there.
        let (mut cs, pre) = streamed(&early, &tar, "/sw/a", &params(), now + 10, &[]);
        let pre = pre.expect("a release published again over its own catalog is prebuilt");
        assert_eq!(pre.replaces(), Some(&old));
        let from_nothing = prebuild(&early.cas, &cs, "/sw/a", &params(), now + 10)
            .unwrap()
            .unwrap();
        assert_eq!(from_nothing.replaces(), Some(&old));
        assert_eq!(
            rows_of(&early, pre.catalog()),
            rows_of(&early, from_nothing.catalog())
        );

        // The commit mounts it in place of the old one: the rows, revision, previous revision
        // and counters that a commit editing the old catalog gives, and the same tree.
        let built = *pre.catalog();
        cs.prebuilt = Some(Arc::new(pre));
        let got = publish_cs(&early, "/sw/a", &cs, now + 10);
        assert_eq!(mounted_at(&early, "/sw/a"), Some(built));
        assert!(got.commit.written.contains(&built));
        let edited = mounted_at(&plain, "/sw/a").unwrap();
        let rows = rows_of(&early, &built);
        assert_eq!(rows, rows_of(&plain, &edited));
        assert!(
            rows.contains(&format!("previous_revision=Some(\"{}\")", old.digest.hex())),
            "{rows:#?}"
        );
        assert_same_repository((&early, &got), (&plain, &want));
        assert!(dump(&early, "/sw/a")
            .0
            .iter()
            .any(|r| r.starts_with("/sw/a/share/NEWS ")));
        assert!(!dump(&early, "/sw/a").0.iter().any(|r| r.contains("OLD")));
    }

    #[test]
    fn a_prebuilt_replacement_is_mounted_only_over_the_catalog_it_replaces() {
        let now = 1_700_000_100;
        let (plain, raced) = (fixture(), fixture());
        for f in [&plain, &raced] {
            let cs = changeset_of(f, &own_catalog_release("1", false));
            publish_cs(f, "/sw/a", &cs, now);
        }
        let tar = own_catalog_release("2", true);
        let mut cs = changeset_of(&raced, &tar);
        cs.prebuilt = prebuild(&raced.cas, &cs, "/sw/a", &params(), now)
            .unwrap()
            .map(Arc::new);
        let pre = *cs.prebuilt.as_ref().unwrap().catalog();
        // Another publish of the path before this commit: the commit edits that revision's
        // catalog instead, so the history of revisions stays a chain.
        for f in [&plain, &raced] {
            let cs = changeset_of(f, &own_catalog_release("3", false));
            publish_cs(f, "/sw/a", &cs, now + 5);
        }
        let meanwhile = mounted_at(&raced, "/sw/a").unwrap();
        let want = publish_cs(&plain, "/sw/a", &changeset_of(&plain, &tar), now + 10);
        let got = publish_cs(&raced, "/sw/a", &cs, now + 10);
        let mounted = mounted_at(&raced, "/sw/a").unwrap();
        assert_ne!(mounted, pre);
        assert!(!got.commit.written.contains(&pre));
        let rows = rows_of(&raced, &mounted);
        assert_eq!(rows, rows_of(&plain, &mounted_at(&plain, "/sw/a").unwrap()));
        assert!(rows.contains(&format!(
            "previous_revision=Some(\"{}\")",
            meanwhile.digest.hex()
        )));
        assert_eq!(
            rows_of(&raced, &got.commit.root),
            rows_of(&plain, &want.commit.root)
        );
        assert_eq!(dump(&raced, ""), dump(&plain, ""));
    }

    #[test]
    fn a_release_published_again_unchanged_keeps_its_catalog_unopened_unless_it_changed_since() {
        let now = 1_700_000_100;
        let (f, raced, plain) = (fixture(), fixture(), fixture());
        let tar = own_catalog_release("1", false);
        for x in [&f, &raced, &plain] {
            publish_cs(x, "/sw/a", &changeset_of(x, &tar), now);
        }
        let old = mounted_at(&f, "/sw/a").unwrap();
        // The same release again: a new catalog would have the rows of the one there, which
        // the commit keeps, streamed or from nothing.
        let (mut cs, pre) = streamed(&f, &tar, "/sw/a", &params(), now + 10, &[]);
        let pre = pre.expect("an unchanged release is recognised while it is read");
        assert!(pre.unchanged());
        assert_eq!((pre.catalog(), pre.replaces()), (&old, Some(&old)));
        let again = prebuild(&f.cas, &cs, "/sw/a", &params(), now + 10)
            .unwrap()
            .unwrap();
        assert!(again.unchanged());
        assert_eq!(again.catalog(), &old);

        // Its commit does not even open that catalog (here: cannot, it is away meanwhile).
        cs.prebuilt = Some(Arc::new(pre));
        let file = f._dir.path().join(old.path());
        let kept = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        let got = publish(&f.cas, &f.keys, &[], now + 10, |t| {
            apply_changeset(
                t,
                &f.cas,
                &cs,
                "/sw/a",
                ApplyMode::Replace,
                &params(),
                now + 10,
            )
        })
        .unwrap();
        std::fs::write(&file, kept).unwrap();
        assert!(crate::check::check(&f.cas, Some(&f.keys.master_pub), now + 100).ok());
        assert_eq!(mounted_at(&f, "/sw/a"), Some(old));
        assert!(!got.commit.written.contains(&old));
        let want = publish_cs(&plain, "/sw/a", &changeset_of(&plain, &tar), now + 10);
        assert_eq!(mounted_at(&plain, "/sw/a"), Some(old));
        assert_same_repository((&f, &got), (&plain, &want));

        // Another release published there between the prebuild and the commit: the commit
        // puts this one back by editing, as without the prebuild.
        let plain = fixture();
        publish_cs(&plain, "/sw/a", &changeset_of(&plain, &tar), now);
        let mut cs = changeset_of(&raced, &tar);
        cs.prebuilt = prebuild(&raced.cas, &cs, "/sw/a", &params(), now + 10)
            .unwrap()
            .map(Arc::new);
        assert!(cs.prebuilt.as_ref().unwrap().unchanged());
        let other = own_catalog_release("3", false);
        for x in [&raced, &plain] {
            publish_cs(x, "/sw/a", &changeset_of(x, &other), now + 20);
        }
        let got = publish_cs(&raced, "/sw/a", &cs, now + 30);
        let want = publish_cs(&plain, "/sw/a", &changeset_of(&plain, &tar), now + 30);
        assert_same_repository((&raced, &got), (&plain, &want));
        assert_eq!(dump(&raced, "/sw/a"), dump(&f, "/sw/a"));
    }

    #[test]
    fn a_release_with_catalogs_below_its_own_is_not_prebuilt() {
        let now = 1_700_000_100;
        let f = fixture();
        let tar = own_catalog_release("1", false);
        publish_cs(&f, "/sw/a", &changeset_of(&f, &tar), now);
        let old = mounted_at(&f, "/sw/a").unwrap();
        // Changed, it is.
        let (_, pre) = streamed(
            &f,
            &own_catalog_release("2", false),
            "/sw/a",
            &params(),
            now,
            &[],
        );
        assert_eq!(pre.unwrap().replaces(), Some(&old));

        // A release with a catalog below its own: an edit keeps the catalogs it does not
        // change, a build from nothing would not, so the commit edits.
        publish_cs(&f, "/sw/b", &changeset_of(&f, &release_tar("1")), now);
        let (cs, pre) = streamed(&f, &release_tar("2"), "/sw/b", &params(), now, &[]);
        assert!(pre.is_none());
        assert!(prebuild(&f.cas, &cs, "/sw/b", &params(), now)
            .unwrap()
            .is_none());
        // A directory that is not a catalog's root is not replaced by one built apart either.
        publish_cs(
            &f,
            "/sw/c",
            &changeset_of(&f, &tar_of(&[("x", Some(b"x"))])),
            now,
        );
        assert!(streamed(&f, &tar, "/sw/c", &params(), now, &[]).1.is_none());
    }

    #[test]
    fn a_replacement_is_mounted_over_its_catalog_read_in_the_commit_not_over_one_changed_there() {
        let now = 1_700_000_100;
        let tar = own_catalog_release("2", true);
        let (plain, read, changed) = (fixture(), fixture(), fixture());
        for f in [&plain, &read, &changed] {
            let cs = changeset_of(f, &own_catalog_release("1", false));
            publish_cs(f, "/sw/a", &cs, now);
        }
        let want = publish_cs(&plain, "/sw/a", &changeset_of(&plain, &tar), now);
        for (f, edit) in [(&read, false), (&changed, true)] {
            let mut cs = changeset_of(f, &tar);
            cs.prebuilt = prebuild(&f.cas, &cs, "/sw/a", &params(), now)
                .unwrap()
                .map(Arc::new);
            let pre = *cs.prebuilt.as_ref().unwrap().catalog();
            // The commit opens the old catalog (and edits it) before the change set comes.
            let got = publish(&f.cas, &f.keys, &[], now, |t| {
                assert!(t.lookup("/sw/a/bin/tool")?.is_some());
                if edit {
                    t.add("/sw/a/x", &Entry::directory("x", 0o755, 0, 0, now))?;
                }
                apply_changeset(t, &f.cas, &cs, "/sw/a", ApplyMode::Replace, &params(), now)
            })
            .unwrap();
            assert_eq!(mounted_at(f, "/sw/a") == Some(pre), !edit);
            assert_eq!(
                stats_of(f, &got.commit.root),
                stats_of(&plain, &want.commit.root)
            );
            assert_eq!(
                rows_of(f, &mounted_at(f, "/sw/a").unwrap()),
                rows_of(&plain, &mounted_at(&plain, "/sw/a").unwrap())
            );
            assert_eq!(dump(f, ""), dump(&plain, ""));
        }
    }
}
