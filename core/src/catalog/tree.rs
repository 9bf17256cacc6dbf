//! Editing a repository's tree of catalogs.
//!
//! [`CatalogTree`] opens the root catalog of an existing revision (or starts an empty one) and
//! loads nested catalogs lazily, only along the paths a change touches. Edits — add, replace and
//! remove entries, whole subtrees, nested-catalog creation and removal — are applied to scratch
//! copies of the affected catalogs. [`CatalogTree::commit`] then writes new catalogs for exactly
//! the chain that changed, bottom-up (children are hashed before their parents record them, as
//! upstream's `SnapshotCatalogs` does), with revisions bumped, `previous_revision` set, counters
//! recomputed, and untouched nested catalogs reused by hash.
//!
//! Counter bookkeeping: a catalog's `self_*` counters are recounted from its rows. Its
//! `subtree_*` counters start from the stored values and are corrected for every child catalog
//! that was loaded (which includes every child that was added, removed, moved or changed):
//! minus what the child contributed when loaded, plus what it contributes now. Children that
//! were never loaded are unchanged and already counted.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::db::{CatalogDb, CatalogError, NestedRef};
use super::{flags, is_under, split_path, Counters, Entry, Statistics};
use crate::cas::{Cas, CasError};
use crate::hash::{ObjectId, Suffix};
use crate::object::{compress_metadata_file, decode_object, DecodeError};

/// Errors of catalog editing.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Cas(#[from] CasError),
    #[error("catalog object {0} is corrupt: {1}")]
    CorruptCatalog(ObjectId, DecodeError),
    #[error("scratch file {0}: {1}")]
    Scratch(String, std::io::Error),
    #[error("{path}: parent directory does not exist")]
    NoParent { path: String },
    #[error("{path}: parent '{parent}' is not a directory")]
    ParentNotDir { path: String, parent: String },
    #[error("{path}: already exists")]
    Exists { path: String },
    #[error("{path}: does not exist")]
    Missing { path: String },
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
}

struct Loaded {
    mountpoint: String,
    db: Option<CatalogDb>,
    orig_hash: Option<ObjectId>,
    orig_stats: Statistics,
    orig_revision: u64,
    /// The catalog it was loaded from (None for the root and for new catalogs).
    orig_parent: Option<usize>,
    /// The catalog whose `nested_catalogs` currently lists it.
    parent: Option<usize>,
    new_total: Option<Counters>,
    dirty: bool,
    removed: bool,
    /// For a catalog built anew to replace a stored one (see [`CatalogTree::follow`]): that
    /// one, its `previous_revision`.
    previous: Option<ObjectId>,
}

/// A stored catalog mounted in a tree, as loaded (see [`CatalogTree::mounted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mounted {
    pub catalog: ObjectId,
    pub revision: u64,
    pub stats: Statistics,
    /// How many nested catalogs it lists.
    pub nested: usize,
}

/// What a commit produced.
#[derive(Debug, Clone)]
pub struct CommitResult {
    pub root: ObjectId,
    /// Uncompressed size of the root catalog (manifest `B`).
    pub root_size: u64,
    /// New root catalog revision (manifest `S`).
    pub revision: u64,
    /// The root catalog's `last_modified`.
    pub last_modified: i64,
    /// TTL property of the root catalog (manifest `D`).
    pub ttl: i64,
    /// Every catalog object written (root last).
    pub written: Vec<ObjectId>,
}

/// A writable view of a repository's catalogs.
pub struct CatalogTree<'a> {
    cas: &'a dyn Cas,
    scratch: PathBuf,
    cats: Vec<Loaded>,
    by_mount: HashMap<String, usize>,
    next_file: u64,
    /// Catalog objects written before this edit and grafted into it (see [`CatalogTree::graft`]).
    grafted: Vec<ObjectId>,
}

/// One catalog as [`CatalogTree::write_dirty`] wrote it.
struct Written {
    id: ObjectId,
    /// Uncompressed size.
    size: u64,
    revision: u64,
    ttl: i64,
    stats: Statistics,
}

/// The catalogs of a new subtree, written and stored ahead of the commit that grafts them
/// ([`CatalogTree::commit_nested`], [`CatalogTree::graft`]).
#[derive(Debug, Clone)]
pub struct BuiltSubtree {
    /// Where it is mounted.
    pub path: String,
    /// The mountpoint's row for the parent catalog (nested-mountpoint flag, link count).
    pub mountpoint: Entry,
    /// The catalog rooted at `path`, its uncompressed size and its statistics.
    pub catalog: ObjectId,
    pub size: u64,
    pub stats: Statistics,
    pub revision: u64,
    /// Every catalog object written for it, children first.
    pub written: Vec<ObjectId>,
}

impl<'a> CatalogTree<'a> {
    /// Starts a brand-new repository whose root directory is `root`.
    pub fn create(cas: &'a dyn Cas, scratch: &Path, root: &Entry) -> Result<Self, TreeError> {
        Self::create_at(cas, scratch, "", root)
    }

    /// Starts a scratch tree whose top catalog is rooted at `prefix` with the directory entry
    /// `root`: a place to build the catalogs of a new subtree below `prefix` apart from the
    /// repository (see [`CatalogTree::commit_nested`]); `""` starts a repository.
    pub fn create_at(
        cas: &'a dyn Cas,
        scratch: &Path,
        prefix: &str,
        root: &Entry,
    ) -> Result<Self, TreeError> {
        let mut t = CatalogTree {
            cas,
            scratch: scratch.to_path_buf(),
            cats: Vec::new(),
            by_mount: HashMap::new(),
            next_file: 0,
            grafted: Vec::new(),
        };
        let file = t.scratch_file();
        let db = CatalogDb::create(&file, prefix, root)?;
        db.scratch_mode()?;
        t.push(Loaded {
            mountpoint: prefix.to_string(),
            db: Some(db),
            orig_hash: None,
            orig_stats: Statistics::default(),
            orig_revision: 0,
            orig_parent: None,
            parent: None,
            new_total: None,
            dirty: true,
            removed: false,
            previous: None,
        });
        Ok(t)
    }

    /// Opens the catalog tree whose root catalog is `root`.
    pub fn open(cas: &'a dyn Cas, scratch: &Path, root: &ObjectId) -> Result<Self, TreeError> {
        let mut t = CatalogTree {
            cas,
            scratch: scratch.to_path_buf(),
            cats: Vec::new(),
            by_mount: HashMap::new(),
            next_file: 0,
            grafted: Vec::new(),
        };
        let db = t.fetch(root)?;
        let prefix = db.root_prefix()?;
        if !prefix.is_empty() {
            return Err(TreeError::Invalid {
                path: String::new(),
                msg: format!(
                    "catalog {root} is a nested catalog (root_prefix {prefix}), not a root catalog"
                ),
            });
        }
        t.push(Loaded {
            mountpoint: String::new(),
            orig_stats: db.read_statistics()?,
            orig_revision: db.revision()?,
            db: Some(db),
            orig_hash: Some(*root),
            orig_parent: None,
            parent: None,
            new_total: None,
            dirty: false,
            removed: false,
            previous: None,
        });
        Ok(t)
    }

    fn push(&mut self, l: Loaded) -> usize {
        let i = self.cats.len();
        self.by_mount.insert(l.mountpoint.clone(), i);
        self.cats.push(l);
        i
    }

    fn scratch_file(&mut self) -> PathBuf {
        self.next_file += 1;
        self.scratch.join(format!("catalog-{}.db", self.next_file))
    }

    /// Downloads, verifies and decompresses a catalog object into a scratch file and opens it.
    fn fetch(&mut self, id: &ObjectId) -> Result<CatalogDb, TreeError> {
        let file = self.scratch_file();
        let mut out = fs::File::create(&file)
            .map_err(|e| TreeError::Scratch(file.display().to_string(), e))?;
        let reader = self.cas.get(id)?;
        decode_object(id, reader, true, &mut out).map_err(|e| TreeError::CorruptCatalog(*id, e))?;
        drop(out);
        let db = CatalogDb::open(&file, true)?;
        db.scratch_mode()?;
        Ok(db)
    }

    fn db(&self, i: usize) -> Result<&CatalogDb, TreeError> {
        // Every loaded catalog keeps its connection until commit closes it.
        self.cats[i].db.as_ref().ok_or_else(|| TreeError::Invalid {
            path: self.cats[i].mountpoint.clone(),
            msg: "catalog already closed".into(),
        })
    }

    /// Loads the nested catalog mounted at `mp`, listed in catalog `parent`.
    fn load_child(&mut self, parent: usize, mp: &str) -> Result<usize, TreeError> {
        if let Some(&i) = self.by_mount.get(mp) {
            if !self.cats[i].removed {
                if self.cats[i].db.is_none() {
                    // Grafted unopened: read from the store the first time it is needed.
                    let hash = self.cats[i].orig_hash.ok_or_else(|| TreeError::Invalid {
                        path: mp.to_string(),
                        msg: "catalog already closed".into(),
                    })?;
                    let db = self.fetch(&hash)?;
                    self.cats[i].db = Some(db);
                }
                return Ok(i);
            }
        }
        let nested: Option<NestedRef> = self
            .db(parent)?
            .nested()?
            .into_iter()
            .find(|n| n.path == mp);
        let Some(nested) = nested else {
            return Err(TreeError::Invalid {
                path: mp.to_string(),
                msg: "nested catalog is not registered in its parent".into(),
            });
        };
        let Some(hash) = nested.hash else {
            return Err(TreeError::Invalid {
                path: mp.to_string(),
                msg: "nested catalog has no hash".into(),
            });
        };
        let db = self.fetch(&hash)?;
        let prefix = db.root_prefix()?;
        if prefix != mp {
            return Err(TreeError::Invalid {
                path: mp.to_string(),
                msg: format!("nested catalog {hash} has root_prefix '{prefix}'"),
            });
        }
        let l = Loaded {
            mountpoint: mp.to_string(),
            orig_stats: db.read_statistics()?,
            orig_revision: db.revision()?,
            db: Some(db),
            orig_hash: Some(hash),
            orig_parent: Some(parent),
            parent: Some(parent),
            new_total: None,
            dirty: false,
            removed: false,
            previous: None,
        };
        Ok(self.push(l))
    }

    /// Index of the catalog that holds the entry at `path` (for a mountpoint: the nested
    /// catalog, whose root entry it is).
    fn catalog_for(&mut self, path: &str) -> Result<usize, TreeError> {
        let mut cur = 0usize;
        loop {
            let base = self.cats[cur].mountpoint.as_str();
            let db = self.db(cur)?;
            // Candidate mountpoints are the ancestors of `path` below `base`, nearest first
            // (none in a catalog without nested catalogs).
            let mut found = None;
            let mut probe = if db.any_nested()? { path } else { "" };
            while probe.len() > base.len() && is_under(probe, base) {
                if db.has_nested(probe)? {
                    found = Some(probe);
                }
                probe = split_path(probe).0;
            }
            match found {
                // `found` is the shallowest registered mountpoint on the way down.
                Some(mp) => cur = self.load_child(cur, mp)?,
                None => return Ok(cur),
            }
        }
    }

    /// The entry at `path`, if any.
    pub fn lookup(&mut self, path: &str) -> Result<Option<Entry>, TreeError> {
        let c = self.catalog_for(path)?;
        Ok(self.db(c)?.lookup(path)?)
    }

    /// Whether there is an entry at `path`, without opening a nested catalog mounted there
    /// (its mountpoint row in the parent catalog answers).
    pub fn exists(&mut self, path: &str) -> Result<bool, TreeError> {
        if path.is_empty() {
            return Ok(true);
        }
        let c = self.catalog_for(split_path(path).0)?;
        Ok(self.db(c)?.lookup(path)?.is_some())
    }

    /// The children of the directory at `path`.
    pub fn list(&mut self, path: &str) -> Result<Vec<Entry>, TreeError> {
        let c = self.catalog_for(path)?;
        Ok(self.db(c)?.list(path)?)
    }

    /// Applies `f` to the link count of directory `dir` in every catalog holding a row for it.
    fn adjust_dir_links(&mut self, dir: &str, delta: i64) -> Result<(), TreeError> {
        let c = self.catalog_for(dir)?;
        self.db(c)?.adjust_linkcount(dir, delta)?;
        self.cats[c].dirty = true;
        if self.cats[c].mountpoint == dir && !dir.is_empty() {
            if let Some(p) = self.cats[c].parent {
                self.db(p)?.adjust_linkcount(dir, delta)?;
                self.cats[p].dirty = true;
            }
        }
        Ok(())
    }

    /// A fresh hardlink group id for the catalog that will hold entries of directory `dir`.
    pub fn alloc_hardlink_group(&mut self, dir: &str) -> Result<u32, TreeError> {
        let c = self.catalog_for(dir)?;
        Ok(self.db(c)?.max_hardlink_group()? + 1)
    }

    /// Adds a new entry at `path`. The parent must exist and be a directory.
    pub fn add(&mut self, path: &str, entry: &Entry) -> Result<(), TreeError> {
        if path.is_empty() {
            return Err(TreeError::Exists { path: "/".into() });
        }
        let name = split_path(path).1;
        if name != entry.name {
            return Err(TreeError::Invalid {
                path: path.to_string(),
                msg: format!("entry name '{}' does not match the path", entry.name),
            });
        }
        let c = self.catalog_for_new(path)?;
        self.insert_entry(c, path, entry)
    }

    /// The catalog that is to hold a new entry at `path`: its parent must exist and be a
    /// directory, and nothing may be at `path` yet.
    fn catalog_for_new(&mut self, path: &str) -> Result<usize, TreeError> {
        let parent = split_path(path).0;
        let c = self.catalog_for(parent)?;
        match self.db(c)?.lookup(parent)? {
            None => return Err(TreeError::NoParent { path: path.into() }),
            Some(p) if !p.is_dir() => {
                return Err(TreeError::ParentNotDir {
                    path: path.into(),
                    parent: parent.into(),
                })
            }
            Some(_) => {}
        }
        if self.db(c)?.lookup(path)?.is_some() {
            return Err(TreeError::Exists { path: path.into() });
        }
        Ok(c)
    }

    /// Writes a new row for `entry` at `path` into catalog `c` (which holds its parent).
    fn insert_entry(&mut self, c: usize, path: &str, entry: &Entry) -> Result<(), TreeError> {
        let mut e = entry.clone();
        e.flags &= !(flags::DIR_NESTED_MOUNTPOINT | flags::DIR_NESTED_ROOT);
        if e.is_dir() {
            e.linkcount = 2;
            e.hardlink_group = 0;
        }
        self.db(c)?.insert(path, &e)?;
        self.cats[c].dirty = true;
        if e.is_dir() {
            self.adjust_dir_links(split_path(path).0, 1)?;
        }
        Ok(())
    }

    /// Like [`add`](Self::add) for a caller that added the parent of `path` as a directory in
    /// this edit and adds nothing twice (building a new subtree): skips the parent and existence
    /// lookups. The catalog's primary key still refuses a duplicate.
    pub fn add_new_child(&mut self, path: &str, entry: &Entry) -> Result<(), TreeError> {
        let (parent, name) = split_path(path);
        if path.is_empty() || name != entry.name {
            return self.add(path, entry);
        }
        let c = self.catalog_for(parent)?;
        self.insert_entry(c, path, entry)
    }

    /// Replaces the metadata of the existing directory at `path`, keeping its children, link
    /// count and nested-catalog flags (in both catalogs if it is a mountpoint).
    pub fn touch_dir(&mut self, path: &str, meta: &Entry) -> Result<(), TreeError> {
        let c = self.catalog_for(path)?;
        let Some(old) = self.db(c)?.lookup(path)? else {
            return Err(TreeError::Missing { path: path.into() });
        };
        let apply = |old: &Entry| {
            let mut e = old.clone();
            e.mode = meta.mode;
            e.uid = meta.uid;
            e.gid = meta.gid;
            e.mtime = meta.mtime;
            e.mtimens = meta.mtimens;
            e.xattrs = meta.xattrs.clone();
            e
        };
        self.db(c)?.update(path, &apply(&old))?;
        self.cats[c].dirty = true;
        if self.cats[c].mountpoint == path && !path.is_empty() {
            if let Some(p) = self.cats[c].parent {
                if let Some(mp) = self.db(p)?.lookup(path)? {
                    self.db(p)?.update(path, &apply(&mp))?;
                    self.cats[p].dirty = true;
                }
            }
        }
        Ok(())
    }

    /// Removes the entry at `path` and everything below it. Returns whether anything existed.
    pub fn remove(&mut self, path: &str) -> Result<bool, TreeError> {
        if path.is_empty() {
            return Err(TreeError::Invalid {
                path: "/".into(),
                msg: "the repository root cannot be removed".into(),
            });
        }
        let c = self.catalog_for(path)?;
        let Some(e) = self.db(c)?.lookup(path)? else {
            return Ok(false);
        };
        if self.cats[c].mountpoint == path {
            // A nested catalog root: the whole catalog (and everything nested in it) goes.
            for l in self.cats.iter_mut() {
                if is_under(&l.mountpoint, path) {
                    l.removed = true;
                }
            }
            let Some(p) = self.cats[c].parent else {
                return Err(TreeError::Invalid {
                    path: path.into(),
                    msg: "nested catalog without parent".into(),
                });
            };
            self.unmount(p, path)?;
            return Ok(true);
        }
        if e.is_dir() {
            let children = self.db(c)?.list(path)?;
            for ch in children {
                self.remove(&format!("{path}/{}", ch.name))?;
            }
        }
        self.db(c)?.delete(path)?;
        if e.hardlink_group > 0 && e.linkcount > 1 {
            self.db(c)?.adjust_group_linkcount(e.hardlink_group, -1)?;
        }
        self.cats[c].dirty = true;
        if e.is_dir() {
            self.adjust_dir_links(split_path(path).0, -1)?;
        }
        Ok(true)
    }

    /// Takes the mountpoint of the nested catalog at `path` out of catalog `p`, which lists it.
    fn unmount(&mut self, p: usize, path: &str) -> Result<(), TreeError> {
        self.db(p)?.delete(path)?;
        self.db(p)?.remove_nested(path)?;
        self.cats[p].dirty = true;
        self.adjust_dir_links(split_path(path).0, -1)
    }

    /// Whether `path` is the root of a nested catalog.
    pub fn is_nested_root(&mut self, path: &str) -> Result<bool, TreeError> {
        let c = self.catalog_for(path)?;
        Ok(!path.is_empty() && self.cats[c].mountpoint == path)
    }

    /// Turns the existing directory at `path` into the root of a new nested catalog, moving its
    /// subtree (rows, chunks and nested catalogs below it) out of the catalog that holds it.
    pub fn make_nested(&mut self, path: &str) -> Result<(), TreeError> {
        if path.is_empty() {
            return Err(TreeError::Invalid {
                path: "/".into(),
                msg: "the repository root is already the root catalog".into(),
            });
        }
        let c = self.catalog_for(path)?;
        if self.cats[c].mountpoint == path {
            return Ok(());
        }
        let Some(dir) = self.db(c)?.lookup(path)? else {
            return Err(TreeError::Missing { path: path.into() });
        };
        if !dir.is_dir() {
            return Err(TreeError::Invalid {
                path: path.into(),
                msg: "only directories can hold a nested catalog".into(),
            });
        }
        let mut root = dir.clone();
        root.flags = (root.flags & !flags::DIR_NESTED_MOUNTPOINT) | flags::DIR_NESTED_ROOT;
        let file = self.scratch_file();
        let ndb = CatalogDb::create(&file, path, &root)?;
        ndb.scratch_mode()?;
        let n = self.push(Loaded {
            mountpoint: path.to_string(),
            db: Some(ndb),
            orig_hash: None,
            orig_stats: Statistics::default(),
            orig_revision: 0,
            orig_parent: None,
            parent: Some(c),
            new_total: None,
            dirty: true,
            removed: false,
            previous: None,
        });
        let mut stack = vec![path.to_string()];
        while let Some(p) = stack.pop() {
            let children = self.db(c)?.list_with_keys(crate::hash::path_key(&p))?;
            for (child, keys) in children {
                let cp = format!("{p}/{}", child.name);
                if child.is_nested_mountpoint() {
                    let nref = self.db(c)?.nested()?.into_iter().find(|r| r.path == cp);
                    if let Some(r) = nref {
                        let g = self.load_child(c, &cp)?;
                        self.cats[g].parent = Some(n);
                        self.db(n)?
                            .set_nested(&cp, r.hash.as_ref().map(|h| &h.digest), r.size)?;
                        self.db(c)?.remove_nested(&cp)?;
                    }
                } else if child.is_dir() {
                    stack.push(cp.clone());
                }
                self.db(n)?.insert_row(keys.path, keys.parent, &child)?;
                self.db(c)?.delete(&cp)?;
            }
        }
        let mut mp = dir;
        mp.flags = (mp.flags & !flags::DIR_NESTED_ROOT) | flags::DIR_NESTED_MOUNTPOINT;
        self.db(c)?.update(path, &mp)?;
        self.db(c)?.set_nested(path, None, 0)?;
        self.cats[c].dirty = true;
        Ok(())
    }

    /// The stored catalog mounted at `path`, unless `path` is not the root of a nested
    /// catalog or this edit has changed that catalog (or built it).
    pub fn mounted(&mut self, path: &str) -> Result<Option<Mounted>, TreeError> {
        if path.is_empty() {
            return Ok(None);
        }
        let c = self.catalog_for(path)?;
        let l = &self.cats[c];
        let Some(catalog) = l.orig_hash.filter(|_| l.mountpoint == path && !l.dirty) else {
            return Ok(None);
        };
        let (revision, stats) = (l.orig_revision, l.orig_stats);
        Ok(Some(Mounted {
            catalog,
            revision,
            stats,
            nested: self.db(c)?.nested()?.len(),
        }))
    }

    /// Makes the catalog rooted at `path`, built in this edit, the next revision of the stored
    /// catalog `previous` (revision `revision`): it is written with the revision after that one
    /// and `previous` as its `previous_revision`, as an edit of `previous` would be.
    pub fn follow(&mut self, path: &str, previous: &Mounted) -> Result<(), TreeError> {
        match self.by_mount.get(path) {
            Some(&i) if self.cats[i].orig_hash.is_none() && !self.cats[i].removed => {
                self.cats[i].previous = Some(previous.catalog);
                self.cats[i].orig_revision = previous.revision;
                Ok(())
            }
            _ => Err(TreeError::Invalid {
                path: path.to_string(),
                msg: "not the root of a catalog built in this edit".into(),
            }),
        }
    }

    /// Whether the catalog rooted at `path` here has the rows of the one rooted there in
    /// `other` (see [`CatalogDb::same_rows_as`]); both must be loaded roots of nested catalogs.
    pub fn same_rows(
        &mut self,
        path: &str,
        other: &mut CatalogTree<'_>,
    ) -> Result<bool, TreeError> {
        let root = |t: &mut CatalogTree<'_>| -> Result<usize, TreeError> {
            let c = t.catalog_for(path)?;
            if t.cats[c].mountpoint != path {
                return Err(TreeError::Invalid {
                    path: path.to_string(),
                    msg: "not the root of a nested catalog".into(),
                });
            }
            Ok(c)
        };
        let (a, b) = (root(self)?, root(other)?);
        let file = other.db(b)?.file().to_path_buf();
        Ok(self.db(a)?.same_rows_as(&file)?)
    }

    /// Merges the nested catalog rooted at `path` back into its parent catalog.
    pub fn remove_nested(&mut self, path: &str) -> Result<(), TreeError> {
        let n = self.catalog_for(path)?;
        if path.is_empty() || self.cats[n].mountpoint != path {
            return Ok(());
        }
        let Some(c) = self.cats[n].parent else {
            return Ok(());
        };
        for r in self.db(n)?.nested()? {
            let g = self.load_child(n, &r.path)?;
            self.cats[g].parent = Some(c);
            self.db(c)?
                .set_nested(&r.path, r.hash.as_ref().map(|h| &h.digest), r.size)?;
        }
        let offset = self.db(c)?.max_hardlink_group()?;
        let root_key = crate::hash::path_key(path);
        for (mut e, keys) in self.db(n)?.all_rows()? {
            if keys.path == root_key {
                continue;
            }
            if e.is_chunked() {
                e.chunks = self.db(n)?.chunks(keys.path)?;
            }
            if e.hardlink_group > 0 {
                e.hardlink_group += offset;
            }
            self.db(c)?.insert_row(keys.path, keys.parent, &e)?;
        }
        if let Some(mut mp) = self.db(c)?.lookup(path)? {
            mp.flags &= !(flags::DIR_NESTED_MOUNTPOINT | flags::DIR_NESTED_ROOT);
            self.db(c)?.update(path, &mp)?;
        }
        self.db(c)?.remove_nested(path)?;
        self.cats[n].removed = true;
        self.cats[c].dirty = true;
        Ok(())
    }

    /// Mounts `sub` — catalogs built apart for a new directory at `sub.path` and already
    /// stored — at that path: its mountpoint row goes into the catalog holding the parent
    /// (which must exist and be a directory; the path must not exist) and the parent registers
    /// the nested catalog, whose counters join the parent's subtree counters at commit. The
    /// grafted catalogs are not rewritten; they are opened only if a later edit reaches them.
    pub fn graft(&mut self, sub: &BuiltSubtree) -> Result<(), TreeError> {
        let path = sub.path.as_str();
        let name = split_path(path).1;
        if path.is_empty() || name != sub.mountpoint.name || !sub.mountpoint.is_dir() {
            return Err(TreeError::Invalid {
                path: path.to_string(),
                msg: "not a directory that can be grafted".into(),
            });
        }
        let c = self.catalog_for_new(path)?;
        self.insert_entry(c, path, &sub.mountpoint)?;
        // The row as built: mountpoint flag, and the link count its subdirectories give it.
        self.db(c)?.update(path, &sub.mountpoint)?;
        self.db(c)?
            .set_nested(path, Some(&sub.catalog.digest), sub.size)?;
        self.push(Loaded {
            mountpoint: path.to_string(),
            db: None,
            orig_hash: Some(sub.catalog),
            orig_stats: sub.stats,
            orig_revision: sub.revision,
            orig_parent: None,
            parent: Some(c),
            new_total: None,
            dirty: false,
            removed: false,
            previous: None,
        });
        self.grafted.extend(sub.written.iter().copied());
        Ok(())
    }

    /// Whether the catalog mounted at `path` is still the stored catalog `old`: the parent
    /// catalog lists exactly that catalog there and, if this edit opened it, left it unchanged.
    pub fn still_mounted(&mut self, path: &str, old: &Mounted) -> Result<bool, TreeError> {
        if path.is_empty() {
            return Ok(false);
        }
        let c = self.catalog_for(split_path(path).0)?;
        let listed = self
            .db(c)?
            .nested()?
            .into_iter()
            .any(|n| n.path == path && n.hash == Some(old.catalog));
        Ok(listed
            && match self.by_mount.get(path) {
                Some(&i) if !self.cats[i].removed => {
                    !self.cats[i].dirty && self.cats[i].orig_hash == Some(old.catalog)
                }
                _ => true,
            })
    }

    /// Mounts `sub` (as [`CatalogTree::graft`] does) in place of the stored catalog `old`, if
    /// that is still the one there ([`CatalogTree::still_mounted`]); returns whether it was.
    /// `old` need not be opened: its statistics, which leave the parent's subtree counters,
    /// are `old.stats`.
    pub fn replace_mounted(
        &mut self,
        sub: &BuiltSubtree,
        old: &Mounted,
    ) -> Result<bool, TreeError> {
        let path = sub.path.as_str();
        if !self.still_mounted(path, old)? {
            return Ok(false);
        }
        match self.by_mount.get(path) {
            Some(&i) if !self.cats[i].removed => {
                self.remove(path)?;
            }
            _ => {
                // As `remove` takes a nested catalog's root, with the catalog left unopened.
                let c = self.catalog_for(split_path(path).0)?;
                self.unmount(c, path)?;
                self.push(Loaded {
                    mountpoint: path.to_string(),
                    db: None,
                    orig_hash: Some(old.catalog),
                    orig_stats: old.stats,
                    orig_revision: old.revision,
                    orig_parent: Some(c),
                    parent: Some(c),
                    new_total: None,
                    dirty: false,
                    removed: true,
                    previous: None,
                });
            }
        }
        self.graft(sub)?;
        Ok(true)
    }

    /// Writes every changed catalog bottom-up and returns the new root. The root catalog is
    /// always rewritten, so every commit is a new revision.
    pub fn commit(mut self, now: i64) -> Result<CommitResult, TreeError> {
        self.cats[0].dirty = true;
        let (mut written, top) = self.write_dirty(0, now)?;
        let top = top.ok_or_else(|| TreeError::Invalid {
            path: "/".into(),
            msg: "root catalog was not written".into(),
        })?;
        let mut all = std::mem::take(&mut self.grafted);
        all.append(&mut written);
        Ok(CommitResult {
            root: top.id,
            root_size: top.size,
            revision: top.revision,
            last_modified: now,
            ttl: top.ttl,
            written: all,
        })
    }

    /// Writes the catalogs of the new directory at `path`, a nested catalog's root in this
    /// scratch tree (see [`CatalogTree::create_at`]), bottom-up into the store, for a later
    /// [`CatalogTree::graft`] into the repository. The tree's own top catalog is not written.
    pub fn commit_nested(mut self, path: &str, now: i64) -> Result<BuiltSubtree, TreeError> {
        let Some(&top) = self
            .by_mount
            .get(path)
            .filter(|&&i| self.cats[i].parent.is_some() && !self.cats[i].removed)
        else {
            return Err(TreeError::Invalid {
                path: path.to_string(),
                msg: "not the root of a nested catalog of this tree".into(),
            });
        };
        let (written, built) = self.write_dirty(top, now)?;
        let built = built.ok_or_else(|| TreeError::Invalid {
            path: path.to_string(),
            msg: "nested catalog was not written".into(),
        })?;
        let parent = self.cats[top].parent.unwrap_or(0);
        let mountpoint = self
            .db(parent)?
            .lookup(path)?
            .ok_or_else(|| TreeError::Missing { path: path.into() })?;
        Ok(BuiltSubtree {
            path: path.to_string(),
            mountpoint,
            catalog: built.id,
            size: built.size,
            stats: built.stats,
            revision: built.revision,
            written,
        })
    }

    /// Writes the changed catalogs at and below catalog `top`, deepest first, each recording
    /// its new hash in its parent. Returns the objects written and what became of `top`.
    fn write_dirty(
        &mut self,
        top: usize,
        now: i64,
    ) -> Result<(Vec<ObjectId>, Option<Written>), TreeError> {
        let base = self.cats[top].mountpoint.clone();
        let mut order: Vec<usize> = (0..self.cats.len())
            .filter(|&i| !self.cats[i].removed && is_under(&self.cats[i].mountpoint, &base))
            .collect();
        let depth = |m: &str| m.matches('/').count();
        order.sort_by_key(|&i| std::cmp::Reverse(depth(&self.cats[i].mountpoint)));
        let mut written = Vec::new();
        let mut result = None;
        for i in order {
            if !self.cats[i].dirty {
                self.cats[i].new_total = Some(self.cats[i].orig_stats.total());
                continue;
            }
            let mut subtree = self.cats[i].orig_stats.subtree;
            for (j, ch) in self.cats.iter().enumerate() {
                if j == i {
                    continue;
                }
                if ch.orig_parent == Some(i) {
                    subtree = subtree.sub(&ch.orig_stats.total());
                }
                if !ch.removed && ch.parent == Some(i) {
                    let t = ch.new_total.unwrap_or_else(|| ch.orig_stats.total());
                    subtree = subtree.add(&t);
                }
            }
            let db = self.cats[i].db.take().ok_or_else(|| TreeError::Invalid {
                path: self.cats[i].mountpoint.clone(),
                msg: "catalog closed twice".into(),
            })?;
            let self_c = db.compute_self_counters()?;
            let stats = Statistics {
                self_: self_c,
                subtree,
            };
            db.write_statistics(&stats)?;
            let revision = self.cats[i].orig_revision + 1;
            db.set_property("revision", &revision.to_string())?;
            db.set_property("last_modified", &now.to_string())?;
            match self.cats[i].orig_hash.or(self.cats[i].previous) {
                Some(h) => db.set_property("previous_revision", &h.digest.hex())?,
                None => db.remove_property("previous_revision")?,
            }
            let ttl: i64 = db
                .property("TTL")?
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(super::db::DEFAULT_TTL);
            db.commit()?;
            db.compact()?;
            let file = db.close()?;
            let (id, stored, raw_len) = compress_metadata_file(&file, Suffix::Catalog)
                .map_err(|e| TreeError::Scratch(file.display().to_string(), e))?;
            self.cas.put_bytes(&id, &stored)?;
            let _ = fs::remove_file(&file);
            written.push(id);
            self.cats[i].new_total = Some(stats.total());
            if i == top {
                result = Some(Written {
                    id,
                    size: raw_len,
                    revision,
                    ttl,
                    stats,
                });
            }
            if let Some(p) = self.cats[i].parent {
                let mp = self.cats[i].mountpoint.clone();
                self.db(p)?.set_nested(&mp, Some(&id.digest), raw_len)?;
                self.cats[p].dirty = true;
            }
        }
        Ok((written, result))
    }
}

impl Drop for CatalogTree<'_> {
    fn drop(&mut self) {
        for l in self.cats.iter_mut() {
            if let Some(db) = l.db.take() {
                if let Ok(f) = db.close() {
                    let _ = fs::remove_file(f);
                }
            }
        }
    }
}
