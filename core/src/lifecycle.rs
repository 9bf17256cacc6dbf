//! Content lifecycle, as plain synchronous code: which published paths have not been seen for
//! `access_ttl` and may leave the namespace.
//!
//! Candidates are the paths the access store tracks (every publish records its path, so each
//! release directory is one) whose last-seen time is older than the cutoff, that still exist in
//! the current revision, that no exemption glob matches (neither the path nor anything in its
//! subtree), under which no tracked path was seen since the cutoff, and none of whose files'
//! objects was seen since the cutoff (the subtree is read from the catalogs). A candidate inside
//! another candidate is left to the outer one.

use crate::access::AccessStore;
use crate::cas::Cas;
use crate::catalog::{Entry, Kind};
use crate::hash::{ObjectId, Suffix};
use crate::repo::{with_current_tree, with_tree_at, RepoError};

/// Whether `path` matches `glob`: `*` matches within one path component, `**` across any
/// number of them, everything else literally.
pub fn glob_match(glob: &str, path: &str) -> bool {
    fn m(g: &[&str], p: &[&str]) -> bool {
        match (g.first(), p.first()) {
            (None, None) => true,
            (Some(&"**"), _) => m(&g[1..], p) || (!p.is_empty() && m(g, &p[1..])),
            (Some(gc), Some(pc)) => comp(gc, pc) && m(&g[1..], &p[1..]),
            _ => false,
        }
    }
    fn comp(g: &str, p: &str) -> bool {
        match g.split_once('*') {
            None => g == p,
            Some((pre, rest)) => {
                p.starts_with(pre)
                    && (0..=p.len() - pre.len()).any(|i| comp(rest, &p[pre.len() + i..]))
            }
        }
    }
    let split = |s: &str| -> Vec<String> {
        s.split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (g, p) = (split(glob), split(path));
    let g: Vec<&str> = g.iter().map(String::as_str).collect();
    let p: Vec<&str> = p.iter().map(String::as_str).collect();
    m(&g, &p)
}

/// A path the policy would remove.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Expired {
    pub path: String,
    pub last_seen: i64,
}

fn under(path: &str, parent: &str) -> bool {
    path.len() > parent.len() && path.starts_with(parent) && path.as_bytes()[parent.len()] == b'/'
}

/// The paths not seen since `cutoff` (UNIX seconds), per the rules above; `exempt_roots` are
/// the root catalogs of the revisions exempt tags name.
pub fn expired(
    cas: &dyn Cas,
    store: &AccessStore,
    cutoff: i64,
    exempt: &[String],
    exempt_roots: &[ObjectId],
) -> Result<Vec<Expired>, RepoError> {
    let tracked = store
        .paths()
        .map_err(|e| RepoError::Invalid(e.to_string()))?;
    let fresh: Vec<&String> = tracked
        .iter()
        .filter(|(_, t)| *t >= cutoff)
        .map(|(p, _)| p)
        .collect();
    let mut old: Vec<&(String, i64)> = tracked
        .iter()
        .filter(|(p, t)| {
            *t < cutoff
                && p != "/"
                && !p.is_empty()
                && !exempt.iter().any(|g| glob_match(g, p))
                && !fresh.iter().any(|f| under(f, p) || *f == p)
        })
        .collect();
    old.sort();
    // Outermost first; a candidate inside a kept candidate goes with it.
    let mut picked: Vec<&(String, i64)> = Vec::new();
    for c in old {
        if !picked.iter().any(|p| under(&c.0, &p.0)) {
            picked.push(c);
        }
    }
    with_current_tree(cas, |tree| {
        let mut out = Vec::new();
        'next: for (path, last) in picked {
            let Some(root) = tree.lookup(path)? else {
                continue; // already gone
            };
            // Every object of the subtree must be unseen since the cutoff, and no path in it
            // exempt (an exempt release inside a published tree keeps the tree).
            let mut todo: Vec<(String, Entry)> = vec![(path.clone(), root)];
            while let Some((p, e)) = todo.pop() {
                if exempt.iter().any(|g| glob_match(g, &p)) {
                    continue 'next;
                }
                match e.kind() {
                    Kind::Directory => {
                        for ch in tree.list(&p)? {
                            todo.push((format!("{p}/{}", ch.name), ch));
                        }
                    }
                    Kind::Regular => {
                        // Listings leave chunk rows out; a lookup brings them.
                        let e = if e.is_chunked() {
                            tree.lookup(&p)?.unwrap_or(e)
                        } else {
                            e
                        };
                        let mut ids: Vec<ObjectId> = e.chunks.iter().map(|c| c.id).collect();
                        ids.extend(e.hash.map(|h| ObjectId::new(h, Suffix::None)));
                        for id in ids {
                            let seen = store
                                .object_seen(&id)
                                .map_err(|e| RepoError::Invalid(e.to_string()))?;
                            if seen.is_some_and(|t| t >= cutoff) {
                                continue 'next;
                            }
                        }
                    }
                    _ => {}
                }
            }
            out.push(Expired {
                path: path.clone(),
                last_seen: *last,
            });
        }
        Ok(out)
    })
    .and_then(|mut out| {
        for root in exempt_roots {
            if out.is_empty() {
                break;
            }
            out = with_tree_at(cas, root, |tree| {
                let mut keep = Vec::new();
                for e in out {
                    if tree.lookup(&e.path)?.is_none() {
                        keep.push(e);
                    }
                }
                Ok(keep)
            })?;
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("/sw/*/stable", "/sw/app/stable"));
        assert!(!glob_match("/sw/*/stable", "/sw/app/x/stable"));
        assert!(glob_match("/sw/**/stable", "/sw/app/x/stable"));
        assert!(glob_match("/sw/**", "/sw/a/b"));
        assert!(glob_match("/sw/lts-*", "/sw/lts-2024"));
        assert!(!glob_match("/sw/lts-*", "/sw/dev-2024"));
        assert!(glob_match("/sw/*-2024*", "/sw/release-2024.1"));
        assert!(!glob_match("/sw/a", "/sw/a/b"));
    }
}
