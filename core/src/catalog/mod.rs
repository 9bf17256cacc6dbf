//! CVMFS file catalogs: the entry model, flags, statistics counters, the SQLite database layer
//! ([`db`]) and the editor for a tree of nested catalogs ([`tree`]).
//!
//! Format facts: cvmfs-formats.md §3 (schema 2.5, revision 7; r6 catalogs from released servers
//! are read and upgraded on write the way upstream's `LiveSchemaUpgradeIfNecessary` does).

pub mod db;
pub mod tree;
pub mod xattr;

use crate::hash::Digest20;
use crate::object::FileChunk;
pub use xattr::Xattrs;

/// Catalog flag bits (upstream `catalog_sql.h`; see cvmfs-formats.md §3.4).
pub mod flags {
    pub const DIR: i64 = 1;
    pub const DIR_NESTED_MOUNTPOINT: i64 = 2;
    pub const FILE: i64 = 4;
    pub const LINK: i64 = 8;
    pub const FILE_SPECIAL: i64 = 16;
    pub const DIR_NESTED_ROOT: i64 = 32;
    pub const FILE_CHUNK: i64 = 64;
    pub const FILE_EXTERNAL: i64 = 128;
    pub const HASH_ALGO_MASK: i64 = 0x700;
    pub const COMPRESSION_SHIFT: i64 = 11;
    pub const COMPRESSION_MASK: i64 = 0x3800;
    pub const DIR_BIND_MOUNTPOINT: i64 = 0x4000;
    pub const HIDDEN: i64 = 0x8000;
    pub const DIRECT_IO: i64 = 0x10000;
}

/// File-type bits of `st_mode`.
pub mod mode {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFIFO: u32 = 0o010000;
    pub const S_IFSOCK: u32 = 0o140000;
}

/// What kind of thing an entry is (derived from `mode`, as upstream does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    Regular,
    Symlink,
    Special,
}

/// One catalog row, decoded. Serialized (in change sets) without the fields that hold their
/// usual value (no mtime nanoseconds, owner 0, one link, no hard-link group, no hash, no flags,
/// no symlink target, xattrs or chunks), which a change set of a release's files is mostly
/// made of; a missing field reads back as that value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Last path component; `""` for the repository root.
    pub name: String,
    /// Full `st_mode` including the type bits.
    pub mode: u32,
    /// Regular file: uncompressed size. Symlink: target length. Device: `dev_t`. Dir: any.
    pub size: u64,
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtimens: Option<i64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u64,
    #[serde(default = "one_link", skip_serializing_if = "is_one_link")]
    pub linkcount: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hardlink_group: u32,
    /// Content hash of whole-file objects; `None` for everything else (incl. chunked files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<Digest20>,
    /// Full flag word as stored (type bits are recomputed from `mode` on write).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub flags: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub symlink: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xattrs: Option<Xattrs>,
    /// Chunk list of chunked files (filled by lookups that ask for it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<FileChunk>,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn one_link() -> u32 {
    1
}

fn is_one_link(n: &u32) -> bool {
    *n == 1
}

impl Entry {
    pub fn kind(&self) -> Kind {
        match self.mode & mode::S_IFMT {
            mode::S_IFDIR => Kind::Directory,
            mode::S_IFREG => Kind::Regular,
            mode::S_IFLNK => Kind::Symlink,
            _ => Kind::Special,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind() == Kind::Directory
    }

    pub fn is_chunked(&self) -> bool {
        self.flags & flags::FILE_CHUNK != 0
    }

    pub fn is_nested_mountpoint(&self) -> bool {
        self.flags & flags::DIR_NESTED_MOUNTPOINT != 0
    }

    pub fn is_nested_root(&self) -> bool {
        self.flags & flags::DIR_NESTED_ROOT != 0
    }

    /// Whether content is stored uncompressed (flag bits 11–13 = 1).
    pub fn is_uncompressed(&self) -> bool {
        (self.flags & flags::COMPRESSION_MASK) >> flags::COMPRESSION_SHIFT == 1
    }

    /// The packed `hardlinks` column: `(group << 32) | linkcount`.
    pub fn hardlinks_column(&self) -> i64 {
        ((self.hardlink_group as i64) << 32) | self.linkcount as i64
    }

    /// A directory entry.
    pub fn directory(name: &str, perm: u32, uid: u64, gid: u64, mtime: i64) -> Entry {
        Entry {
            name: name.to_string(),
            mode: mode::S_IFDIR | (perm & 0o7777),
            size: 4096,
            mtime,
            mtimens: None,
            uid,
            gid,
            linkcount: 2,
            hardlink_group: 0,
            hash: None,
            flags: flags::DIR,
            symlink: String::new(),
            xattrs: None,
            chunks: Vec::new(),
        }
    }

    /// Recomputes the type bits of `flags` from `mode` and the content fields, keeping the
    /// nested/hidden/bind/direct-io bits. Called before every write so rows are always coherent.
    pub fn normalized_flags(&self) -> i64 {
        let keep = self.flags
            & (flags::DIR_NESTED_MOUNTPOINT
                | flags::DIR_NESTED_ROOT
                | flags::DIR_BIND_MOUNTPOINT
                | flags::HIDDEN
                | flags::DIRECT_IO
                | flags::FILE_EXTERNAL
                | flags::COMPRESSION_MASK);
        let mut f = match self.kind() {
            Kind::Directory => {
                flags::DIR
                    | (keep & !(flags::COMPRESSION_MASK | flags::FILE_EXTERNAL | flags::DIRECT_IO))
            }
            Kind::Regular => {
                flags::FILE
                    | (keep
                        & (flags::COMPRESSION_MASK
                            | flags::FILE_EXTERNAL
                            | flags::DIRECT_IO
                            | flags::HIDDEN))
            }
            Kind::Symlink => flags::FILE | flags::LINK | (keep & flags::HIDDEN),
            Kind::Special => flags::FILE | flags::FILE_SPECIAL | (keep & flags::HIDDEN),
        };
        if self.kind() == Kind::Regular && !self.chunks.is_empty() {
            f |= flags::FILE_CHUNK;
        }
        // Hash algorithm bits stay 0: SHA-1 is algorithm 1, stored as algorithm - 1.
        f
    }
}

/// Names of the 12 counter kinds, in upstream's order (`catalog_counters.h`).
pub const COUNTER_NAMES: [&str; 12] = [
    "regular",
    "symlink",
    "special",
    "dir",
    "nested",
    "chunked",
    "chunks",
    "file_size",
    "chunked_size",
    "xattr",
    "external",
    "external_file_size",
];

/// One set of 12 counters (either the `self_` or the `subtree_` half).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters(pub [i64; 12]);

impl Counters {
    pub fn add(&self, o: &Counters) -> Counters {
        let mut r = *self;
        for i in 0..12 {
            r.0[i] += o.0[i];
        }
        r
    }
    pub fn sub(&self, o: &Counters) -> Counters {
        let mut r = *self;
        for i in 0..12 {
            r.0[i] -= o.0[i];
        }
        r
    }
    pub fn get(&self, name: &str) -> i64 {
        COUNTER_NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| self.0[i])
            .unwrap_or(0)
    }
}

/// The full statistics table of a catalog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statistics {
    pub self_: Counters,
    pub subtree: Counters,
}

impl Statistics {
    /// `self_ + subtree`: what this catalog contributes to its parent's `subtree_` counters.
    pub fn total(&self) -> Counters {
        self.self_.add(&self.subtree)
    }
}

/// Splits a repository path into parent and name (`"/a/b"` → `("/a", "b")`, `"/a"` → `("", "a")`).
pub fn split_path(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Whether `path` is `prefix` or lies below it (component-wise).
pub fn is_under(path: &str, prefix: &str) -> bool {
    if prefix.is_empty() {
        return true;
    }
    path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}
