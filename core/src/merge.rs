//! Applying the difference between two catalog trees onto a third, inside one path — what
//! `cvmfs_receiver` does when a gateway lease is committed (cvmfs-formats.md §4.7).
//!
//! In: the tree the publisher started from (`old`, C_O), the tree it built (`new`, C_N), the
//! repository's current head (`head`, C_G, writable) and the lease path. Only paths at or below
//! the lease path change in `head`; everything else stays as the head has it, so publishers on
//! disjoint lease paths merge. Like the receiver: added directories become nested catalogs where
//! C_N has one, hard links are split into independent files, special files are skipped, and an
//! addition of something the head already has (or removal of something it lacks) is a merge
//! error — which is what a publisher building on a lagging manifest runs into.

use std::collections::BTreeSet;

use crate::catalog::tree::{CatalogTree, TreeError};
use crate::catalog::{flags, Entry, Kind};

/// Why a merge failed.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("merge conflict at {path}: {msg}")]
    Conflict { path: String, msg: String },
    #[error(transparent)]
    Tree(#[from] TreeError),
}

fn conflict(path: &str, msg: &str) -> MergeError {
    MergeError::Conflict {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.to_string()
        },
        msg: msg.to_string(),
    }
}

/// Metadata and content equality, ignoring what a catalog derives itself (link counts of
/// directories, nested-catalog transition flags, chunk hash algorithm bits).
pub(crate) fn same(a: &Entry, b: &Entry) -> bool {
    let mask = !(flags::DIR_NESTED_MOUNTPOINT | flags::DIR_NESTED_ROOT);
    let dirs = a.is_dir() && b.is_dir();
    a.name == b.name
        && a.mode == b.mode
        && a.mtime == b.mtime
        && a.mtimens == b.mtimens
        && a.uid == b.uid
        && a.gid == b.gid
        && a.xattrs == b.xattrs
        && (a.flags & mask) == (b.flags & mask)
        && (dirs
            || (a.size == b.size
                && a.hash == b.hash
                && a.chunks == b.chunks
                && a.symlink == b.symlink
                && a.linkcount == b.linkcount))
}

/// Applies `diff(old, new)` below `lease` onto `head`.
pub fn merge(
    old: &mut CatalogTree<'_>,
    new: &mut CatalogTree<'_>,
    head: &mut CatalogTree<'_>,
    lease: &str,
) -> Result<(), MergeError> {
    node(old, new, head, lease)
}

fn node(
    old: &mut CatalogTree<'_>,
    new: &mut CatalogTree<'_>,
    head: &mut CatalogTree<'_>,
    path: &str,
) -> Result<(), MergeError> {
    let o = old.lookup(path)?;
    let n = new.lookup(path)?;
    match (o, n) {
        (None, None) => Ok(()),
        (Some(_), None) => {
            if path.is_empty() {
                return Err(conflict(path, "the repository root cannot be removed"));
            }
            if !head.remove(path)? {
                return Err(conflict(
                    path,
                    "removed by the publisher but absent in the repository",
                ));
            }
            Ok(())
        }
        (None, Some(n)) => {
            if head.lookup(path)?.is_some() {
                return Err(conflict(
                    path,
                    "added by the publisher but already present in the repository",
                ));
            }
            add_subtree(new, head, path, &n)
        }
        (Some(o), Some(n)) => {
            if o.is_dir() && n.is_dir() {
                let Some(h) = head.lookup(path)? else {
                    return Err(conflict(path, "directory missing in the repository"));
                };
                if !h.is_dir() {
                    return Err(conflict(path, "is not a directory in the repository"));
                }
                if !same(&h, &n) {
                    head.touch_dir(path, &n)?;
                }
                if !path.is_empty() {
                    let nested_new = new.is_nested_root(path)?;
                    let nested_head = head.is_nested_root(path)?;
                    if nested_new && !nested_head {
                        head.make_nested(path)?;
                    } else if !nested_new && nested_head {
                        head.remove_nested(path)?;
                    }
                }
                let mut names: BTreeSet<String> = BTreeSet::new();
                names.extend(old.list(path)?.into_iter().map(|e| e.name));
                names.extend(new.list(path)?.into_iter().map(|e| e.name));
                for name in names {
                    node(old, new, head, &format!("{path}/{name}"))?;
                }
                Ok(())
            } else if same(&o, &n) {
                Ok(())
            } else {
                // Changed file, or a type change: replace.
                head.remove(path)?;
                add_subtree(new, head, path, &n)
            }
        }
    }
}

/// Copies `n` (at `path` in `new`) and everything below it into `head`.
fn add_subtree(
    new: &mut CatalogTree<'_>,
    head: &mut CatalogTree<'_>,
    path: &str,
    n: &Entry,
) -> Result<(), MergeError> {
    let mut e = n.clone();
    e.flags &= !(flags::DIR_NESTED_MOUNTPOINT | flags::DIR_NESTED_ROOT);
    match e.kind() {
        // The receiver has no branch for special files: they are dropped.
        Kind::Special => return Ok(()),
        Kind::Regular | Kind::Symlink => {
            // Hard links are split into independent entries.
            e.linkcount = 1;
            e.hardlink_group = 0;
        }
        Kind::Directory => {}
    }
    head.add(path, &e).map_err(|err| match err {
        TreeError::NoParent { .. } | TreeError::ParentNotDir { .. } => {
            conflict(path, "its parent directory is missing in the repository")
        }
        other => MergeError::Tree(other),
    })?;
    if e.is_dir() {
        if new.is_nested_root(path)? {
            head.make_nested(path)?;
        }
        for child in new.list(path)? {
            let cp = format!("{path}/{}", child.name);
            add_subtree(new, head, &cp, &child)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::LocalCas;
    use crate::chunker::ChunkParams;
    use crate::hash::ObjectId;
    use crate::intake::{read_tar, IntakeLimits};
    use crate::keys::RepoKeys;
    use crate::object::{Compression, EncodeParams};
    use crate::repo::{self, ApplyMode};

    fn params() -> EncodeParams {
        EncodeParams {
            chunking: ChunkParams::disabled(),
            compression: Compression::Zlib(6),
        }
    }

    fn tar_of(items: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, d) in items {
            let mut h = tar::Header::new_gnu();
            h.set_path(p).unwrap();
            h.set_size(d.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(7);
            h.set_cksum();
            b.append(&h, *d).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn publish(cas: &LocalCas, keys: &RepoKeys, target: &str, items: &[(&str, &[u8])]) {
        let cs = read_tar(
            &tar_of(items)[..],
            false,
            &params(),
            &IntakeLimits::default(),
            cas,
            1,
        )
        .unwrap();
        repo::publish(cas, keys, &[], 100, |t| {
            repo::apply_changeset(t, cas, &cs, target, ApplyMode::Replace, &params(), 100)
        })
        .unwrap();
    }

    /// Builds C_N from `base` the way a gateway publisher does, without touching the manifest.
    fn build_new(
        cas: &LocalCas,
        base: &ObjectId,
        target: &str,
        items: &[(&str, &[u8])],
    ) -> ObjectId {
        let cs = read_tar(
            &tar_of(items)[..],
            false,
            &params(),
            &IntakeLimits::default(),
            cas,
            1,
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut t = CatalogTree::open(cas, tmp.path(), base).unwrap();
        repo::apply_changeset(&mut t, cas, &cs, target, ApplyMode::Replace, &params(), 100)
            .unwrap();
        t.commit(100).unwrap().root
    }

    fn root(cas: &LocalCas) -> ObjectId {
        repo::current_manifest(cas).unwrap().unwrap().0.root_catalog
    }

    fn merge_onto_head(
        cas: &LocalCas,
        keys: &RepoKeys,
        old: &ObjectId,
        new: &ObjectId,
        lease: &str,
    ) -> Result<(), String> {
        let t1 = tempfile::tempdir().unwrap();
        let t2 = tempfile::tempdir().unwrap();
        let mut o = CatalogTree::open(cas, t1.path(), old).unwrap();
        let mut n = CatalogTree::open(cas, t2.path(), new).unwrap();
        repo::publish(cas, keys, &[], 200, |h| {
            merge(&mut o, &mut n, h, lease).map_err(|e| repo::RepoError::Invalid(e.to_string()))
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    #[test]
    fn disjoint_leases_merge_and_replays_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap().without_fsync();
        let keys = RepoKeys::generate("merge.example.org", 30).unwrap();
        repo::init(&cas, &keys, 0, 0, 1).unwrap();
        publish(&cas, &keys, "/a", &[("x", b"1"), ("gone", b"2")]);
        publish(&cas, &keys, "/b", &[("y", b"3")]);
        let c_o = root(&cas);
        // Publisher A builds its tree for /a from C_O ...
        let c_n = build_new(
            &cas,
            &c_o,
            "/a",
            &[("x", b"changed"), ("n/.cvmfscatalog", b""), ("n/f", b"4")],
        );
        // ... while publisher B moves the head on /b.
        publish(&cas, &keys, "/b", &[("y", b"B2"), ("z", b"5")]);
        merge_onto_head(&cas, &keys, &c_o, &c_n, "/a").unwrap();
        let (x, gone, y, z, nested) = repo::with_current_tree(&cas, |t| {
            Ok((
                t.lookup("/a/x")?,
                t.lookup("/a/gone")?,
                t.lookup("/b/y")?,
                t.lookup("/b/z")?,
                t.is_nested_root("/a/n")?,
            ))
        })
        .unwrap();
        assert_eq!(x.unwrap().size, 7);
        assert!(gone.is_none());
        assert_eq!(y.unwrap().size, 2, "B's change survives");
        assert!(z.is_some());
        assert!(nested, "the nested catalog of C_N is recreated");
        let r = crate::check::check(&cas, Some(&keys.master_pub), 300);
        assert!(r.ok(), "{:?}", r.findings);
        // Replaying the same diff onto the new head conflicts (a lagging base looks like this).
        let e = merge_onto_head(&cas, &keys, &c_o, &c_n, "/a").unwrap_err();
        assert!(
            e.contains(
                "merge conflict at /a/gone: removed by the publisher but absent in the repository"
            ),
            "{e}"
        );
    }

    #[test]
    fn first_publish_into_an_empty_repository_and_at_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap().without_fsync();
        let keys = RepoKeys::generate("merge.example.org", 30).unwrap();
        repo::init(&cas, &keys, 0, 0, 1).unwrap();
        let c_o = root(&cas);
        let c_n = build_new(&cas, &c_o, "", &[("top/f", b"1")]);
        merge_onto_head(&cas, &keys, &c_o, &c_n, "").unwrap();
        let f = repo::with_current_tree(&cas, |t| Ok(t.lookup("/top/f")?)).unwrap();
        assert_eq!(f.unwrap().size, 1);
        let r = crate::check::check(&cas, Some(&keys.master_pub), 300);
        assert!(r.ok(), "{:?}", r.findings);
    }
}
