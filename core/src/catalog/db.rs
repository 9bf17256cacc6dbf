//! One catalog database file: schema creation, row I/O, properties, statistics.
//!
//! Owns a SQLite connection to an *uncompressed* catalog file on local scratch disk. Catalogs are
//! created as schema 2.5 revision 7 with every table, index, property and counter upstream has
//! (cvmfs-formats.md §3.1, §3.9, §3.10). Existing catalogs of revision 6 (what released servers
//! write) and 7 are read; opening one for writing upgrades r6 to r7 by adding `mtimens`, as
//! upstream does. Catalogs stay in rollback-journal mode because clients refuse WAL (§3.12).

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{flags, Counters, Entry, Statistics, Xattrs, COUNTER_NAMES};
use crate::hash::{path_key, Digest20, ObjectId, Suffix};
use crate::object::FileChunk;

/// Latest schema we write.
pub const SCHEMA_VERSION: f64 = 2.5;
pub const SCHEMA_REVISION: i64 = 7;
/// Default catalog TTL in seconds (upstream `kDefaultTTL`).
pub const DEFAULT_TTL: i64 = 240;

/// Errors of the catalog database layer.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {file}: {source}")]
    Sql {
        file: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog {file}: unsupported schema {schema} revision {revision} (supported: 2.5 revisions 6 and 7)")]
    Unsupported {
        file: String,
        schema: String,
        revision: i64,
    },
    #[error("catalog {file}: {msg}")]
    Invalid { file: String, msg: String },
}

/// An open catalog database.
pub struct CatalogDb {
    conn: Connection,
    file: PathBuf,
    revision_schema: i64,
    /// The `nested_catalogs` paths, read on first use and kept in step by
    /// [`CatalogDb::set_nested`] and [`CatalogDb::remove_nested`] (the only writers): finding
    /// the catalog of a path asks about every ancestor, and a query each was a tenth of a
    /// commit.
    nested: std::cell::RefCell<Option<foldhash::HashSet<String>>>,
    /// The `catalog` table's part of the self counters (§3.9), kept up to date as rows are
    /// inserted and deleted, for a catalog this connection created (so every row went
    /// through it): a release's catalog then needs no scan of its rows at the commit (a
    /// tenth of a second on the tail of a publish of a large release). `None` for an opened
    /// file, or once a write failed: the rows are counted by a scan.
    tally: std::cell::Cell<Option<Counters>>,
    /// The parent of the last path inserted and its key: entries come directory by
    /// directory, and the MD5 of the parent's path was half of the hashing per row.
    parent_key: std::cell::RefCell<Option<(String, (i64, i64))>>,
}

/// What one `catalog` row adds to the self counters (the `nested_catalogs` and `chunks`
/// counters are not the catalog table's), as the scan in
/// [`CatalogDb::compute_self_counters`] counts it.
fn row_counters(mode: i64, flags_word: i64, size: i64, has_xattr: bool) -> Counters {
    let t = mode & super::mode::S_IFMT as i64;
    let (reg, dir, lnk) = (
        t == super::mode::S_IFREG as i64,
        t == super::mode::S_IFDIR as i64,
        t == super::mode::S_IFLNK as i64,
    );
    let chunked = reg && flags_word & flags::FILE_CHUNK != 0;
    let external = reg && flags_word & flags::FILE_EXTERNAL != 0;
    let mut c = Counters::default();
    c.0[0] = i64::from(reg);
    c.0[1] = i64::from(lnk);
    c.0[2] = i64::from(!reg && !dir && !lnk);
    c.0[3] = i64::from(dir);
    c.0[5] = i64::from(chunked);
    c.0[7] = if reg { size } else { 0 };
    c.0[8] = if chunked { size } else { 0 };
    c.0[9] = i64::from(has_xattr);
    c.0[10] = i64::from(external);
    c.0[11] = if external { size } else { 0 };
    c
}

const DDL: &str = "
CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key));
CREATE TABLE catalog (md5path_1 INTEGER, md5path_2 INTEGER, parent_1 INTEGER, parent_2 INTEGER,
  hardlinks INTEGER, hash BLOB, size INTEGER, mode INTEGER, mtime INTEGER, mtimens INTEGER,
  flags INTEGER, name TEXT, symlink TEXT, uid INTEGER, gid INTEGER, xattr BLOB,
  CONSTRAINT pk_catalog PRIMARY KEY (md5path_1, md5path_2));
CREATE INDEX idx_catalog_parent ON catalog (parent_1, parent_2);
CREATE TABLE chunks (md5path_1 INTEGER, md5path_2 INTEGER, offset INTEGER, size INTEGER, hash BLOB,
  CONSTRAINT pk_chunks PRIMARY KEY (md5path_1, md5path_2, offset, size),
  FOREIGN KEY (md5path_1, md5path_2) REFERENCES catalog(md5path_1, md5path_2));
CREATE TABLE nested_catalogs (path TEXT, sha1 TEXT, size INTEGER,
  CONSTRAINT pk_nested_catalogs PRIMARY KEY (path));
CREATE TABLE bind_mountpoints (path TEXT, sha1 TEXT, size INTEGER,
  CONSTRAINT pk_bind_mountpoints PRIMARY KEY (path));
CREATE TABLE statistics (counter TEXT, value INTEGER, CONSTRAINT pk_statistics PRIMARY KEY (counter));
";

/// A `nested_catalogs` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedRef {
    pub path: String,
    pub hash: Option<ObjectId>,
    pub size: u64,
}

impl CatalogDb {
    fn err(&self, source: rusqlite::Error) -> CatalogError {
        CatalogError::Sql {
            file: self.file.display().to_string(),
            source,
        }
    }

    fn invalid(&self, msg: impl Into<String>) -> CatalogError {
        CatalogError::Invalid {
            file: self.file.display().to_string(),
            msg: msg.into(),
        }
    }

    /// Creates a new catalog file whose root entry is `root` at `root_path` (`""` for the
    /// repository root catalog, the mountpoint path for a nested catalog).
    pub fn create(file: &Path, root_path: &str, root: &Entry) -> Result<CatalogDb, CatalogError> {
        let _ = std::fs::remove_file(file);
        let conn = Connection::open(file).map_err(|source| CatalogError::Sql {
            file: file.display().to_string(),
            source,
        })?;
        let db = CatalogDb {
            conn,
            file: file.to_path_buf(),
            revision_schema: SCHEMA_REVISION,
            nested: Default::default(),
            tally: std::cell::Cell::new(Some(Counters::default())),
            parent_key: Default::default(),
        };
        // A new catalog is a scratch file until it is compressed into the store (which makes
        // that durable): its creation is one transaction without fsync. (Statement by
        // statement, with SQLite's default journal and syncs, it was some eighty fsyncs —
        // seconds on a disk busy with an upload.)
        // Its pages stay in memory until the commit writes them once (SQLite's default cache
        // of 2 MiB wrote and reread the pages of a release's catalog while it was built).
        db.conn
            .execute_batch(
                "PRAGMA synchronous = OFF; PRAGMA journal_mode = MEMORY; PRAGMA cache_size = -65536; BEGIN;",
            )
            .map_err(|e| db.err(e))?;
        db.conn.execute_batch(DDL).map_err(|e| db.err(e))?;
        db.conn
            .execute(
                "INSERT INTO properties (key, value) VALUES ('schema', ?1)",
                params![SCHEMA_VERSION],
            )
            .map_err(|e| db.err(e))?;
        db.set_property("schema_revision", &SCHEMA_REVISION.to_string())?;
        db.set_property("revision", "0")?;
        if !root_path.is_empty() {
            db.set_property("root_prefix", root_path)?;
        }
        for (i, name) in COUNTER_NAMES.iter().enumerate() {
            let _ = i;
            for half in ["self_", "subtree_"] {
                db.conn
                    .execute(
                        "INSERT INTO statistics (counter, value) VALUES (?1, 0)",
                        params![format!("{half}{name}")],
                    )
                    .map_err(|e| db.err(e))?;
            }
        }
        db.conn
            .execute(
                "UPDATE statistics SET value = 1 WHERE counter = 'self_dir'",
                [],
            )
            .map_err(|e| db.err(e))?;
        // The root entry of the root catalog has an all-zero parent (§3.2).
        let parent = if root_path.is_empty() {
            (0, 0)
        } else {
            path_key(super::split_path(root_path).0)
        };
        db.insert_row(path_key(root_path), parent, root)?;
        db.commit()?;
        Ok(db)
    }

    /// Opens an existing catalog file. `writable` upgrades an r6 catalog to r7.
    pub fn open(file: &Path, writable: bool) -> Result<CatalogDb, CatalogError> {
        let flags = if writable {
            OpenFlags::SQLITE_OPEN_READ_WRITE
        } else {
            OpenFlags::SQLITE_OPEN_READ_ONLY
        };
        let conn =
            Connection::open_with_flags(file, flags).map_err(|source| CatalogError::Sql {
                file: file.display().to_string(),
                source,
            })?;
        let mut db = CatalogDb {
            conn,
            file: file.to_path_buf(),
            revision_schema: 0,
            nested: Default::default(),
            tally: std::cell::Cell::new(None),
            parent_key: Default::default(),
        };
        let schema = db.property("schema")?.unwrap_or_default();
        let rev: i64 = db
            .property("schema_revision")?
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let schema_ok = schema
            .trim()
            .parse::<f64>()
            .map(|v| (v - SCHEMA_VERSION).abs() < 0.01)
            .unwrap_or(false);
        if !schema_ok || !(6..=7).contains(&rev) {
            return Err(CatalogError::Unsupported {
                file: file.display().to_string(),
                schema,
                revision: rev,
            });
        }
        db.revision_schema = rev;
        if writable && rev == 6 {
            db.conn
                .execute_batch("ALTER TABLE catalog ADD mtimens INTEGER;")
                .map_err(|e| db.err(e))?;
            db.set_property("schema_revision", "7")?;
            db.revision_schema = 7;
        }
        Ok(db)
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The catalog's `schema_revision` (6 or 7).
    pub fn schema_revision(&self) -> i64 {
        self.revision_schema
    }

    /// Working mode for scratch copies being edited: one transaction for all edits, no fsync and
    /// an in-memory journal (the file is a private scratch copy until it is compressed and
    /// stored; [`CatalogDb::commit`] ends the transaction before that).
    pub fn scratch_mode(&self) -> Result<(), CatalogError> {
        self.conn
            .execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = MEMORY; BEGIN;")
            .map_err(|e| self.err(e))
    }

    pub fn begin(&self) -> Result<(), CatalogError> {
        self.conn.execute_batch("BEGIN").map_err(|e| self.err(e))
    }

    /// Ends the open transaction, if any.
    pub fn commit(&self) -> Result<(), CatalogError> {
        if self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn.execute_batch("COMMIT").map_err(|e| self.err(e))
    }

    pub fn property(&self, key: &str) -> Result<Option<String>, CatalogError> {
        self.conn
            .query_row(
                "SELECT CAST(value AS TEXT) FROM properties WHERE key = ?1",
                params![key],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map(|o| o.flatten())
            .map_err(|e| self.err(e))
    }

    pub fn set_property(&self, key: &str, value: &str) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO properties (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn remove_property(&self, key: &str) -> Result<(), CatalogError> {
        self.conn
            .execute("DELETE FROM properties WHERE key = ?1", params![key])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The `revision` property.
    pub fn revision(&self) -> Result<u64, CatalogError> {
        Ok(self
            .property("revision")?
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// The `root_prefix` property (`""` for the root catalog).
    pub fn root_prefix(&self) -> Result<String, CatalogError> {
        Ok(self.property("root_prefix")?.unwrap_or_default())
    }

    fn columns(&self) -> &'static str {
        if self.revision_schema >= 7 {
            "hardlinks, hash, size, mode, mtime, mtimens, flags, name, symlink, uid, gid, xattr, md5path_1, md5path_2, parent_1, parent_2"
        } else {
            "hardlinks, hash, size, mode, mtime, NULL, flags, name, symlink, uid, gid, xattr, md5path_1, md5path_2, parent_1, parent_2"
        }
    }

    fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Entry, RowKeys)> {
        let hardlinks: i64 = r.get(0)?;
        let hash: Option<Vec<u8>> = r.get(1)?;
        let xattr: Option<Vec<u8>> = r.get(11)?;
        let e = Entry {
            hardlink_group: (hardlinks >> 32) as u32,
            linkcount: (hardlinks & 0xFFFF_FFFF) as u32,
            hash: hash.and_then(|h| Digest20::from_slice(&h).ok()),
            size: r.get::<_, i64>(2)? as u64,
            mode: r.get::<_, i64>(3)? as u32,
            mtime: r.get(4)?,
            mtimens: r.get(5)?,
            flags: r.get(6)?,
            name: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
            symlink: r.get::<_, Option<String>>(8)?.unwrap_or_default(),
            uid: r.get::<_, i64>(9)? as u64,
            gid: r.get::<_, i64>(10)? as u64,
            xattrs: xattr.and_then(|b| Xattrs::deserialize(&b).ok()),
            chunks: Vec::new(),
        };
        let keys = RowKeys {
            path: (r.get(12)?, r.get(13)?),
            parent: (r.get(14)?, r.get(15)?),
            xattr_corrupt: false,
        };
        Ok((e, keys))
    }

    /// Looks up the entry at `path`, with its chunk list.
    pub fn lookup(&self, path: &str) -> Result<Option<Entry>, CatalogError> {
        self.lookup_key(path_key(path))
    }

    /// Looks up by path key.
    pub fn lookup_key(&self, key: (i64, i64)) -> Result<Option<Entry>, CatalogError> {
        let sql = format!(
            "SELECT {} FROM catalog WHERE md5path_1 = ?1 AND md5path_2 = ?2",
            self.columns()
        );
        let found = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut st| st.query_row(params![key.0, key.1], Self::row_to_entry))
            .optional()
            .map_err(|e| self.err(e))?;
        match found {
            None => Ok(None),
            Some((mut e, _)) => {
                if e.is_chunked() {
                    e.chunks = self.chunks(key)?;
                }
                Ok(Some(e))
            }
        }
    }

    /// Chunk rows of the file with path key `key`, by offset.
    pub fn chunks(&self, key: (i64, i64)) -> Result<Vec<FileChunk>, CatalogError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT offset, size, hash FROM chunks WHERE md5path_1 = ?1 AND md5path_2 = ?2 ORDER BY offset ASC",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![key.0, key.1], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (off, size, hash) = row.map_err(|e| self.err(e))?;
            let digest = hash
                .as_deref()
                .and_then(|h| Digest20::from_slice(h).ok())
                .ok_or_else(|| self.invalid(format!("chunk at offset {off} has no valid hash")))?;
            out.push(FileChunk {
                offset: off as u64,
                size: size as u64,
                id: ObjectId::new(digest, Suffix::Partial),
            });
        }
        Ok(out)
    }

    /// Children of the directory at `path` (rows whose parent key is the path's key), sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>, CatalogError> {
        Ok(self
            .list_with_keys(path_key(path))?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    /// Children of the row keyed `parent`, with their stored keys.
    pub fn list_with_keys(
        &self,
        parent: (i64, i64),
    ) -> Result<Vec<(Entry, RowKeys)>, CatalogError> {
        let sql = format!(
            "SELECT {} FROM catalog WHERE parent_1 = ?1 AND parent_2 = ?2",
            self.columns()
        );
        let mut st = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![parent.0, parent.1], Self::row_to_entry)
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in rows {
            let (mut e, k) = r.map_err(|e| self.err(e))?;
            if e.is_chunked() {
                e.chunks = self.chunks(k.path)?;
            }
            out.push((e, k));
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// Every row with its keys (for checks and copies).
    pub fn all_rows(&self) -> Result<Vec<(Entry, RowKeys)>, CatalogError> {
        let sql = format!("SELECT {} FROM catalog ORDER BY rowid", self.columns());
        let mut st = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], Self::row_to_entry)
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r.map_err(|e| self.err(e))?);
        }
        // Flag blobs that did not parse so `check` can report them.
        let mut st = self
            .conn
            .prepare("SELECT md5path_1, md5path_2, xattr FROM catalog WHERE xattr IS NOT NULL")
            .map_err(|e| self.err(e))?;
        let bad: Vec<(i64, i64)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Vec<u8>>(2)?)))
            .map_err(|e| self.err(e))?
            .filter_map(|r| r.ok())
            .filter(|(_, _, b)| Xattrs::deserialize(b).is_err())
            .map(|(a, b, _)| (a, b))
            .collect();
        for (_, k) in out.iter_mut() {
            if bad.contains(&k.path) {
                k.xattr_corrupt = true;
            }
        }
        Ok(out)
    }

    /// Inserts a row under explicit keys (used when rows move between catalogs).
    pub fn insert_row(
        &self,
        key: (i64, i64),
        parent: (i64, i64),
        e: &Entry,
    ) -> Result<(), CatalogError> {
        let written = self.write_row(key, parent, e);
        let has_xattr = e.xattrs.as_ref().is_some_and(|x| !x.is_empty());
        let row = row_counters(
            e.mode as i64,
            e.normalized_flags(),
            e.size as i64,
            has_xattr,
        );
        self.count(written.is_ok().then_some(&row), 1);
        written
    }

    /// Adds `row` (`sign` 1) to the kept counters or takes it away (-1); `None`, a write that
    /// failed part-way, stops keeping them.
    fn count(&self, row: Option<&Counters>, sign: i64) {
        let kept = self.tally.get().zip(row).and_then(|(mut t, row)| {
            for (a, b) in t.0.iter_mut().zip(row.0) {
                *a = a.checked_add(sign.checked_mul(b)?)?;
            }
            Some(t)
        });
        self.tally.set(kept);
    }

    fn write_row(
        &self,
        key: (i64, i64),
        parent: (i64, i64),
        e: &Entry,
    ) -> Result<(), CatalogError> {
        let xattr = e
            .xattrs
            .as_ref()
            .filter(|x| !x.is_empty())
            .map(|x| x.serialize());
        let hash = e.hash.map(|h| h.0.to_vec());
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT INTO catalog (md5path_1, md5path_2, parent_1, parent_2, hardlinks, hash, size, mode, mtime, mtimens, flags, name, symlink, uid, gid, xattr)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )
            .map_err(|e| self.err(e))?;
        st.execute(params![
            key.0,
            key.1,
            parent.0,
            parent.1,
            e.hardlinks_column(),
            hash,
            e.size as i64,
            e.mode as i64,
            e.mtime,
            e.mtimens,
            e.normalized_flags(),
            e.name,
            e.symlink,
            e.uid as i64,
            e.gid as i64,
            xattr
        ])
        .map_err(|err| self.err(err))?;
        for c in &e.chunks {
            self.conn
                .prepare_cached(
                    "INSERT INTO chunks (md5path_1, md5path_2, offset, size, hash) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(|err| self.err(err))?
                .execute(params![key.0, key.1, c.offset as i64, c.size as i64, c.id.digest.0.to_vec()])
                .map_err(|err| self.err(err))?;
        }
        Ok(())
    }

    /// Inserts the entry at `path` (its parent row must exist in this catalog or be its root).
    pub fn insert(&self, path: &str, e: &Entry) -> Result<(), CatalogError> {
        if e.kind() == super::Kind::Regular && e.hash.is_none() && e.chunks.is_empty() {
            return Err(self.invalid(format!("regular file {path} has neither hash nor chunks")));
        }
        let parent = {
            let dir = super::split_path(path).0;
            let mut last = self.parent_key.borrow_mut();
            match &*last {
                Some((d, key)) if d == dir => *key,
                _ => {
                    let key = path_key(dir);
                    *last = Some((dir.to_string(), key));
                    key
                }
            }
        };
        self.insert_row(path_key(path), parent, e)
    }

    /// Rewrites the row at `path` with `e` (chunks replaced too).
    pub fn update(&self, path: &str, e: &Entry) -> Result<(), CatalogError> {
        let key = path_key(path);
        let parent: (i64, i64) = self
            .conn
            .prepare_cached(
                "SELECT parent_1, parent_2 FROM catalog WHERE md5path_1 = ?1 AND md5path_2 = ?2",
            )
            .and_then(|mut st| st.query_row(params![key.0, key.1], |r| Ok((r.get(0)?, r.get(1)?))))
            .map_err(|err| self.err(err))?;
        self.delete_key(key)?;
        self.insert_row(key, parent, e)
    }

    fn delete_key(&self, key: (i64, i64)) -> Result<(), CatalogError> {
        // What the row counted, while the counters are kept (a row that cannot be read so
        // leaves them to a scan).
        let mut row = None;
        if self.tally.get().is_some() {
            let read = self
                .conn
                .prepare_cached(
                    "SELECT mode, flags, size, xattr IS NOT NULL FROM catalog WHERE md5path_1 = ?1 AND md5path_2 = ?2",
                )
                .and_then(|mut st| {
                    st.query_row(params![key.0, key.1], |r| {
                        Ok(row_counters(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .optional()
                });
            match read {
                Ok(r) => row = r,
                Err(_) => self.tally.set(None),
            }
        }
        let deleted = self.delete_rows(key);
        match (&deleted, row) {
            (Ok(()), Some(row)) => self.count(Some(&row), -1),
            (Ok(()), None) => {} // no such row (or counters not kept)
            (Err(_), _) => self.tally.set(None),
        }
        deleted
    }

    fn delete_rows(&self, key: (i64, i64)) -> Result<(), CatalogError> {
        self.conn
            .prepare_cached("DELETE FROM chunks WHERE md5path_1 = ?1 AND md5path_2 = ?2")
            .map_err(|e| self.err(e))?
            .execute(params![key.0, key.1])
            .map_err(|e| self.err(e))?;
        self.conn
            .prepare_cached("DELETE FROM catalog WHERE md5path_1 = ?1 AND md5path_2 = ?2")
            .map_err(|e| self.err(e))?
            .execute(params![key.0, key.1])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Deletes the row at `path` and its chunks.
    pub fn delete(&self, path: &str) -> Result<(), CatalogError> {
        self.delete_key(path_key(path))
    }

    /// Adds `delta` to the link count of the row at `path` (directories gaining or losing a
    /// subdirectory).
    pub fn adjust_linkcount(&self, path: &str, delta: i64) -> Result<(), CatalogError> {
        let key = path_key(path);
        self.conn
            .prepare_cached(
                "UPDATE catalog SET hardlinks = hardlinks + ?3 WHERE md5path_1 = ?1 AND md5path_2 = ?2",
            )
            .map_err(|e| self.err(e))?
            .execute(params![key.0, key.1, delta])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Adds `delta` to the link count of every member of hardlink group `group`.
    pub fn adjust_group_linkcount(&self, group: u32, delta: i64) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "UPDATE catalog SET hardlinks = hardlinks + ?2 WHERE (hardlinks >> 32) = ?1",
                params![group as i64, delta],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Largest hardlink group id in use.
    pub fn max_hardlink_group(&self) -> Result<u32, CatalogError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT MAX(hardlinks >> 32) FROM catalog", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(v.unwrap_or(0) as u32)
    }

    /// Every data object this catalog's rows name: whole-file objects (the `hash` column) and
    /// chunks (`P`). Used by garbage collection.
    pub fn object_refs(&self) -> Result<Vec<ObjectId>, CatalogError> {
        let mut out = Vec::new();
        for (sql, suffix) in [
            (
                "SELECT hash FROM catalog WHERE hash IS NOT NULL",
                Suffix::None,
            ),
            (
                "SELECT hash FROM chunks WHERE hash IS NOT NULL",
                Suffix::Partial,
            ),
        ] {
            let mut st = self.conn.prepare(sql).map_err(|e| self.err(e))?;
            let rows = st
                .query_map([], |r| r.get::<_, Vec<u8>>(0))
                .map_err(|e| self.err(e))?;
            for row in rows {
                let h = row.map_err(|e| self.err(e))?;
                let d = Digest20::from_slice(&h)
                    .map_err(|_| self.invalid(format!("a hash of {} bytes", h.len())))?;
                out.push(ObjectId::new(d, suffix));
            }
        }
        Ok(out)
    }

    /// The `nested_catalogs` rows.
    pub fn nested(&self) -> Result<Vec<NestedRef>, CatalogError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT path, sha1, size FROM nested_catalogs ORDER BY path")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (path, sha1, size) = row.map_err(|e| self.err(e))?;
            let hash = match sha1.as_deref() {
                None | Some("") => None,
                Some(h) => Some(ObjectId::new(
                    Digest20::from_hex(h).map_err(|e| self.invalid(e.to_string()))?,
                    Suffix::Catalog,
                )),
            };
            out.push(NestedRef {
                path,
                hash,
                size: size.unwrap_or(0) as u64,
            });
        }
        Ok(out)
    }

    /// Whether `path` is registered in `nested_catalogs`.
    pub fn has_nested(&self, path: &str) -> Result<bool, CatalogError> {
        self.with_nested(|paths| paths.contains(path))
    }

    /// Whether the catalog lists any nested catalog.
    pub fn any_nested(&self) -> Result<bool, CatalogError> {
        self.with_nested(|paths| !paths.is_empty())
    }

    /// `f` of the paths in `nested_catalogs` (read once, then kept up to date).
    fn with_nested<T>(
        &self,
        f: impl FnOnce(&foldhash::HashSet<String>) -> T,
    ) -> Result<T, CatalogError> {
        let mut cache = self.nested.borrow_mut();
        if cache.is_none() {
            let mut st = self
                .conn
                .prepare_cached("SELECT path FROM nested_catalogs")
                .map_err(|e| self.err(e))?;
            let paths = st
                .query_map([], |r| r.get::<_, String>(0))
                .and_then(|rows| rows.collect::<Result<_, _>>())
                .map_err(|e| self.err(e))?;
            *cache = Some(paths);
        }
        Ok(f(cache.get_or_insert_default()))
    }

    /// Inserts or updates a `nested_catalogs` row (hash text without the `C`, §3.8).
    pub fn set_nested(
        &self,
        path: &str,
        hash: Option<&Digest20>,
        size: u64,
    ) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO nested_catalogs (path, sha1, size) VALUES (?1, ?2, ?3)",
                params![path, hash.map(|h| h.hex()).unwrap_or_default(), size as i64],
            )
            .map_err(|e| self.err(e))?;
        if let Some(c) = self.nested.borrow_mut().as_mut() {
            c.insert(path.to_string());
        }
        Ok(())
    }

    pub fn remove_nested(&self, path: &str) -> Result<(), CatalogError> {
        self.conn
            .execute("DELETE FROM nested_catalogs WHERE path = ?1", params![path])
            .map_err(|e| self.err(e))?;
        if let Some(c) = self.nested.borrow_mut().as_mut() {
            c.remove(path);
        }
        Ok(())
    }

    /// Counts this catalog's own rows the way upstream's counters define them (§3.9).
    pub fn compute_self_counters(&self) -> Result<Counters, CatalogError> {
        let q = |sql: &str| -> Result<i64, CatalogError> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
                .map(|v| v.unwrap_or(0))
                .map_err(|e| self.err(e))
        };
        // One pass over the rows for every counter of the catalog table (a catalog of a
        // release has tens of thousands of rows; a scan per counter cost a tenth of building it).
        let (fmt, dir, reg, lnk) = (
            super::mode::S_IFMT,
            super::mode::S_IFDIR,
            super::mode::S_IFREG,
            super::mode::S_IFLNK,
        );
        let (chunked, external) = (flags::FILE_CHUNK, flags::FILE_EXTERNAL);
        let scan = || -> Result<Counters, CatalogError> {
            let sql = format!(
                "SELECT
               SUM(t = {reg}),
               SUM(t = {lnk}),
               SUM(t NOT IN ({dir}, {reg}, {lnk})),
               SUM(t = {dir}),
               SUM(t = {reg} AND (flags & {chunked}) != 0),
               SUM(CASE WHEN t = {reg} THEN size END),
               SUM(CASE WHEN t = {reg} AND (flags & {chunked}) != 0 THEN size END),
               SUM(xattr IS NOT NULL),
               SUM(t = {reg} AND (flags & {external}) != 0),
               SUM(CASE WHEN t = {reg} AND (flags & {external}) != 0 THEN size END)
             FROM (SELECT mode & {fmt} AS t, flags, size, xattr FROM catalog)"
            );
            let row: [Option<i64>; 10] = self
                .conn
                .query_row(&sql, [], |r| {
                    let mut v = [None; 10];
                    for (i, x) in v.iter_mut().enumerate() {
                        *x = r.get(i)?;
                    }
                    Ok(v)
                })
                .map_err(|e| self.err(e))?;
            let v = row.map(|x| x.unwrap_or(0));
            let mut c = Counters::default();
            c.0[0] = v[0];
            c.0[1] = v[1];
            c.0[2] = v[2];
            c.0[3] = v[3];
            c.0[5] = v[4];
            c.0[7] = v[5];
            c.0[8] = v[6];
            c.0[9] = v[7];
            c.0[10] = v[8];
            c.0[11] = v[9];
            Ok(c)
        };
        let mut c = match self.tally.get() {
            Some(kept) => {
                // Tests build catalogs in debug builds: every one checks what was kept.
                #[cfg(debug_assertions)]
                assert_eq!(
                    kept,
                    scan()?,
                    "counters kept while writing differ from a scan"
                );
                kept
            }
            None => scan()?,
        };
        c.0[4] = q("SELECT COUNT(*) FROM nested_catalogs")?;
        c.0[6] = q("SELECT COUNT(*) FROM chunks")?;
        Ok(c)
    }

    /// Reads the statistics table. All 24 counters must exist (r >= 5 readers require them).
    pub fn read_statistics(&self) -> Result<Statistics, CatalogError> {
        let mut s = Statistics::default();
        for (i, name) in COUNTER_NAMES.iter().enumerate() {
            for (half, dst) in [("self_", &mut s.self_), ("subtree_", &mut s.subtree)] {
                let counter = format!("{half}{name}");
                let v: Option<i64> = self
                    .conn
                    .query_row(
                        "SELECT value FROM statistics WHERE counter = ?1",
                        params![counter],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(|e| self.err(e))?;
                dst.0[i] = v.ok_or_else(|| {
                    self.invalid(format!("statistics counter {counter} is missing"))
                })?;
            }
        }
        Ok(s)
    }

    pub fn write_statistics(&self, s: &Statistics) -> Result<(), CatalogError> {
        for (i, name) in COUNTER_NAMES.iter().enumerate() {
            for (half, src) in [("self_", &s.self_), ("subtree_", &s.subtree)] {
                self.conn
                    .execute(
                        "INSERT OR REPLACE INTO statistics (counter, value) VALUES (?1, ?2)",
                        params![format!("{half}{name}"), src.0[i]],
                    )
                    .map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Number of rows in `catalog`.
    pub fn row_count(&self) -> Result<i64, CatalogError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM catalog", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Whether the catalog file `other` holds exactly these rows — entries, chunks and nested
    /// catalogs, column for column, in any order (properties and statistics are not compared).
    /// An edit's open transaction is committed first and a new one begun after (a database
    /// can only be attached outside one).
    pub fn same_rows_as(&self, other: &Path) -> Result<bool, CatalogError> {
        let in_tx = !self.conn.is_autocommit();
        self.commit()?;
        let other = other.to_str().ok_or_else(|| CatalogError::Invalid {
            file: other.display().to_string(),
            msg: "path is not UTF-8".into(),
        })?;
        // Counts first, then row by row by key, stopping at the first difference (a changed
        // release differs early; building the whole other side for an EXCEPT took longer).
        const QUERIES: [&str; 4] = [
            "SELECT (SELECT COUNT(*) FROM main.catalog) = (SELECT COUNT(*) FROM other.catalog)
                AND (SELECT COUNT(*) FROM main.chunks) = (SELECT COUNT(*) FROM other.chunks)
                AND (SELECT COUNT(*) FROM main.nested_catalogs)
                    = (SELECT COUNT(*) FROM other.nested_catalogs)",
            "SELECT NOT EXISTS (SELECT 1 FROM main.catalog m LEFT JOIN other.catalog o
                ON o.md5path_1 = m.md5path_1 AND o.md5path_2 = m.md5path_2
                WHERE o.md5path_1 IS NULL OR m.parent_1 IS NOT o.parent_1
                   OR m.parent_2 IS NOT o.parent_2 OR m.hardlinks IS NOT o.hardlinks
                   OR m.hash IS NOT o.hash OR m.size IS NOT o.size OR m.mode IS NOT o.mode
                   OR m.mtime IS NOT o.mtime OR m.mtimens IS NOT o.mtimens
                   OR m.flags IS NOT o.flags OR m.name IS NOT o.name
                   OR m.symlink IS NOT o.symlink OR m.uid IS NOT o.uid OR m.gid IS NOT o.gid
                   OR m.xattr IS NOT o.xattr)",
            "SELECT NOT EXISTS (SELECT 1 FROM main.chunks m LEFT JOIN other.chunks o
                ON o.md5path_1 = m.md5path_1 AND o.md5path_2 = m.md5path_2
                   AND o.offset = m.offset AND o.size = m.size
                WHERE o.md5path_1 IS NULL OR m.hash IS NOT o.hash)",
            "SELECT NOT EXISTS (SELECT 1 FROM main.nested_catalogs m
                LEFT JOIN other.nested_catalogs o ON o.path = m.path
                WHERE o.path IS NULL OR m.sha1 IS NOT o.sha1 OR m.size IS NOT o.size)",
        ];
        let compared = self
            .conn
            .execute("ATTACH DATABASE ?1 AS other", [other])
            .and_then(|_| {
                for q in QUERIES {
                    if !self.conn.query_row(q, [], |r| r.get::<_, bool>(0))? {
                        return Ok(false);
                    }
                }
                Ok(true)
            });
        let detached = self.conn.execute_batch("DETACH DATABASE other");
        let restarted = if in_tx { self.begin() } else { Ok(()) };
        let same = compared.map_err(|e| self.err(e))?;
        detached.map_err(|e| self.err(e))?;
        restarted?;
        Ok(same)
    }

    /// Makes the file compact before it is published: clients give every catalog `MAX(rowid)`
    /// inodes, so sparse rowids after many deletes waste inode space (§3.12). Like upstream, the
    /// table is rebuilt when more than 25 % of rowids are unused, then the file is vacuumed when
    /// more than 20 % of its pages are free.
    pub fn compact(&self) -> Result<(), CatalogError> {
        let (max_rowid, count): (Option<i64>, i64) = self
            .conn
            .query_row("SELECT MAX(rowid), COUNT(*) FROM catalog", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(|e| self.err(e))?;
        let max_rowid = max_rowid.unwrap_or(0);
        if max_rowid > 0 && (max_rowid - count) * 4 > max_rowid {
            // The chunks of chunked files reference their rows: the foreign keys are checked at
            // COMMIT, when every row is back, not while the table is empty.
            let rebuilt = self.conn.execute_batch(
                "BEGIN;
                 PRAGMA defer_foreign_keys = ON;
                 CREATE TEMPORARY TABLE defrag AS SELECT * FROM catalog ORDER BY rowid;
                 DELETE FROM catalog;
                 INSERT INTO catalog SELECT * FROM defrag;
                 DROP TABLE defrag;
                 COMMIT;",
            );
            if let Err(e) = rebuilt {
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                return Err(self.err(e));
            }
        }
        let (pages, free): (i64, i64) = self
            .conn
            .query_row(
                "SELECT (SELECT page_count FROM pragma_page_count()), (SELECT freelist_count FROM pragma_freelist_count())",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        if pages > 0 && free * 5 > pages {
            self.conn.execute_batch("VACUUM").map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Closes the connection, making sure the file is complete and journal-free.
    pub fn close(self) -> Result<PathBuf, CatalogError> {
        let file = self.file.clone();
        // Abandoned edits (a failed publish) are rolled back; the file is discarded anyway.
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.conn.close().map_err(|(_, source)| CatalogError::Sql {
            file: file.display().to_string(),
            source,
        })?;
        Ok(file)
    }
}

/// The stored path keys of a row (used by `check` to detect wrong md5path values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowKeys {
    pub path: (i64, i64),
    pub parent: (i64, i64),
    pub xattr_corrupt: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::mode;

    /// A new root catalog (`c.db` in `dir`) holding only its root entry.
    fn root_catalog(dir: &tempfile::TempDir) -> CatalogDb {
        CatalogDb::create(
            &dir.path().join("c.db"),
            "",
            &Entry::directory("", 0o755, 0, 0, 1),
        )
        .unwrap()
    }

    #[test]
    fn new_catalog_has_full_schema_and_counters() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.db");
        let db = CatalogDb::create(&f, "", &Entry::directory("", 0o755, 0, 0, 1)).unwrap();
        assert_eq!(db.property("schema").unwrap().as_deref(), Some("2.5"));
        assert_eq!(
            db.property("schema_revision").unwrap().as_deref(),
            Some("7")
        );
        assert_eq!(db.property("root_prefix").unwrap(), None);
        let s = db.read_statistics().unwrap();
        assert_eq!(s.self_.get("dir"), 1);
        assert_eq!(db.compute_self_counters().unwrap(), s.self_);
        let n: i64 = db
            .conn
            .query_row("SELECT COUNT(*) FROM statistics", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 24);
        let root = db.lookup("").unwrap().unwrap();
        assert_eq!(root.linkcount, 2);
        assert_eq!(root.flags, flags::DIR);
        let parent: (i64, i64) = db
            .conn
            .query_row("SELECT parent_1, parent_2 FROM catalog", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(parent, (0, 0));
    }

    #[test]
    fn each_row_names_its_own_parent_whatever_order_the_directories_come_in() {
        let dir = tempfile::tempdir().unwrap();
        let db = root_catalog(&dir);
        let file = |name: &str| {
            let mut e = Entry::directory(name, 0o644, 0, 0, 1);
            e.mode = mode::S_IFREG | 0o644;
            e.hash = Some(crate::hash::Digest20::of(name.as_bytes()));
            e
        };
        db.insert("/a", &Entry::directory("a", 0o755, 0, 0, 1))
            .unwrap();
        db.insert("/b", &Entry::directory("b", 0o755, 0, 0, 1))
            .unwrap();
        // Parents alternate, and the root comes back after a subdirectory.
        for (path, name) in [("/a/x", "x"), ("/b/y", "y"), ("/a/z", "z"), ("/c", "c")] {
            db.insert(path, &file(name)).unwrap();
        }
        let names = |d: &str| -> Vec<String> {
            let mut v: Vec<String> = db.list(d).unwrap().into_iter().map(|e| e.name).collect();
            v.sort();
            v
        };
        assert_eq!(names("/a"), ["x", "z"]);
        assert_eq!(names("/b"), ["y"]);
        assert_eq!(names(""), ["a", "b", "c"]);
        let parent_of = |path: &str| -> (i64, i64) {
            let k = path_key(path);
            db.conn
                .query_row(
                    "SELECT parent_1, parent_2 FROM catalog WHERE md5path_1 = ?1 AND md5path_2 = ?2",
                    [k.0, k.1],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
        };
        assert_eq!(parent_of("/a/z"), path_key("/a"));
        assert_eq!(parent_of("/c"), path_key(""));
    }

    #[test]
    fn self_counters_count_every_kind_of_row() {
        let dir = tempfile::tempdir().unwrap();
        let db = root_catalog(&dir);
        let file = |name: &str, size: u64, extra: i64| {
            let mut e = Entry::directory(name, 0o644, 0, 0, 1);
            e.mode = mode::S_IFREG | 0o644;
            e.size = size;
            e.flags = flags::FILE | extra;
            e.hash = Some(Digest20::of(name.as_bytes()));
            e
        };
        let chunk = |i: u8| FileChunk {
            offset: u64::from(i) * 10,
            size: 10,
            id: ObjectId::new(Digest20::of(&[i]), Suffix::Partial),
        };
        db.insert("/d", &Entry::directory("d", 0o755, 0, 0, 1))
            .unwrap();
        db.insert("/d/a", &file("a", 100, 0)).unwrap();
        let mut tagged = file("b", 7, 0);
        let mut x = Xattrs::default();
        x.insert(b"user.k", b"v").unwrap();
        tagged.xattrs = Some(x);
        db.insert("/d/b", &tagged).unwrap();
        let mut big = file("big", 30, flags::FILE_CHUNK);
        big.chunks = vec![chunk(0), chunk(1), chunk(2)];
        db.insert("/big", &big).unwrap();
        db.insert("/ext", &file("ext", 1000, flags::FILE_EXTERNAL))
            .unwrap();
        let mut link = Entry::directory("l", 0o777, 0, 0, 1);
        link.mode = mode::S_IFLNK | 0o777;
        link.flags = flags::LINK;
        link.symlink = "d/a".into();
        db.insert("/l", &link).unwrap();
        let mut fifo = Entry::directory("p", 0o644, 0, 0, 1);
        fifo.mode = 0o010644;
        fifo.flags = flags::FILE | flags::FILE_SPECIAL;
        db.insert("/p", &fifo).unwrap();

        let c = db.compute_self_counters().unwrap();
        let want = [
            ("regular", 4),
            ("symlink", 1),
            ("special", 1),
            ("dir", 2),
            ("nested", 0),
            ("chunked", 1),
            ("chunks", 3),
            ("file_size", 1137),
            ("chunked_size", 30),
            ("xattr", 1),
            ("external", 1),
            ("external_file_size", 1000),
        ];
        for (name, n) in want {
            assert_eq!(c.get(name), n, "{name}");
        }

        // A new catalog keeps its counters as rows are written, deletes and rewrites too.
        assert!(db.tally.get().is_some());
        db.delete("/ext").unwrap();
        db.update("/d/b", &file("b", 9, 0)).unwrap(); // 7 bytes and an xattr before
        db.delete("/d/none").unwrap(); // no such row
        let c = db.compute_self_counters().unwrap();
        assert!(db.tally.get().is_some());
        let counted = |c: &Counters| {
            [
                "regular",
                "external",
                "external_file_size",
                "xattr",
                "file_size",
                "chunks",
            ]
            .map(|name| c.get(name))
        };
        assert_eq!(counted(&c), [3, 0, 0, 0, 139, 3]);
        // An opened catalog counts its rows by a scan: the same.
        db.commit().unwrap();
        let file = db.close().unwrap();
        let opened = CatalogDb::open(&file, false).unwrap();
        assert!(opened.tally.get().is_none());
        assert_eq!(opened.compute_self_counters().unwrap(), c);
    }

    #[test]
    fn same_rows_compares_every_row_chunk_and_nested_catalog_by_key() {
        let dir = tempfile::tempdir().unwrap();
        // A catalog with a chunked file; `mtime`, `chunk` and `extra` make the others differ.
        let make = |name: &str, mtime: i64, chunk: u8, extra: Option<&str>| {
            let file = dir.path().join(name);
            let db =
                CatalogDb::create(&file, "/r", &Entry::directory("r", 0o755, 0, 0, 1)).unwrap();
            let mut big = Entry::directory("big", 0o644, 0, 0, mtime);
            big.mode = 0o100644;
            big.size = 20;
            big.flags = flags::FILE | flags::FILE_CHUNK;
            big.hash = Some(Digest20::of(b"whole"));
            big.chunks = [(0, chunk), (10, 9)]
                .into_iter()
                .map(|(offset, b)| FileChunk {
                    offset,
                    size: 10,
                    id: ObjectId::new(Digest20::of(&[b]), Suffix::Partial),
                })
                .collect();
            db.insert("/r/big", &big).unwrap();
            match extra {
                Some("row") => db
                    .insert("/r/d", &Entry::directory("d", 0o755, 0, 0, 1))
                    .unwrap(),
                Some(n) => db.set_nested(n, Some(&Digest20::of(b"n")), 1).unwrap(),
                None => {}
            }
            (db, file)
        };
        let (db, _) = make("a.db", 5, 1, None);
        assert!(db.same_rows_as(&make("same.db", 5, 1, None).1).unwrap());
        for (other, what) in [
            (make("mtime.db", 6, 1, None), "a column"),
            (make("chunk.db", 5, 2, None), "a chunk"),
            (make("row.db", 5, 1, Some("row")), "a row more"),
            (
                make("nested.db", 5, 1, Some("/r/n")),
                "a nested catalog more",
            ),
        ] {
            assert!(!db.same_rows_as(&other.1).unwrap(), "{what}");
        }
        // An edit in progress goes on in a transaction of its own.
        db.scratch_mode().unwrap();
        db.insert("/r/e", &Entry::directory("e", 0o755, 0, 0, 1))
            .unwrap();
        let (other, file) = make("e.db", 5, 1, None);
        other
            .insert("/r/e", &Entry::directory("e", 0o755, 0, 0, 1))
            .unwrap();
        assert!(db.same_rows_as(&file).unwrap());
        assert!(!db.conn.is_autocommit());
    }

    #[test]
    fn compaction_keeps_chunked_files_and_their_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = root_catalog(&dir);
        let chunk = |i: u8| FileChunk {
            offset: u64::from(i) * 10,
            size: 10,
            id: ObjectId::new(Digest20::of(&[i]), Suffix::Partial),
        };
        let mut big = Entry::directory("big", 0o644, 0, 0, 1);
        big.mode = 0o100644;
        big.size = 20;
        big.flags = flags::FILE | flags::FILE_CHUNK;
        big.hash = Some(Digest20::of(b"whole"));
        big.chunks = vec![chunk(0), chunk(1)];
        // Rows made and deleted first, so that more than a quarter of the rowids are unused.
        for i in 0..40 {
            db.insert(
                &format!("/gone{i}"),
                &Entry::directory(&format!("gone{i}"), 0o755, 0, 0, 1),
            )
            .unwrap();
        }
        db.insert("/big", &big).unwrap();
        for i in 0..40 {
            db.delete(&format!("/gone{i}")).unwrap();
        }
        db.compact().unwrap();
        let back = db.lookup("/big").unwrap().unwrap();
        assert_eq!(back.chunks, big.chunks);
        let max: i64 = db
            .conn
            .query_row("SELECT MAX(rowid) FROM catalog", [], |r| r.get(0))
            .unwrap();
        assert_eq!(max, 2, "rowids renumbered");
    }

    #[test]
    fn r6_catalog_is_read_and_upgraded_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r6.db");
        {
            let c = Connection::open(&f).unwrap();
            c.execute_batch(&DDL.replace("mtime INTEGER, mtimens INTEGER,", "mtime INTEGER,"))
                .unwrap();
            c.execute_batch(
                "INSERT INTO properties VALUES ('schema', '2.5'), ('schema_revision', '6'), ('revision', '3');",
            )
            .unwrap();
            let (a, b) = path_key("");
            c.execute(
                "INSERT INTO catalog (md5path_1, md5path_2, parent_1, parent_2, hardlinks, hash, size, mode, mtime, flags, name, symlink, uid, gid, xattr) VALUES (?1, ?2, 0, 0, 2, NULL, 4096, 16877, 5, 1, '', '', 0, 0, NULL)",
                params![a, b],
            )
            .unwrap();
        }
        let ro = CatalogDb::open(&f, false).unwrap();
        assert_eq!(ro.schema_revision(), 6);
        assert_eq!(ro.lookup("").unwrap().unwrap().mtime, 5);
        assert_eq!(ro.revision().unwrap(), 3);
        drop(ro);
        let rw = CatalogDb::open(&f, true).unwrap();
        assert_eq!(rw.schema_revision(), 7);
        assert_eq!(
            rw.property("schema_revision").unwrap().as_deref(),
            Some("7")
        );
        assert_eq!(rw.lookup("").unwrap().unwrap().mtimens, None);
    }

    #[test]
    fn unsupported_revision_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("old.db");
        {
            let c = Connection::open(&f).unwrap();
            c.execute_batch("CREATE TABLE properties (key TEXT, value TEXT); INSERT INTO properties VALUES ('schema','2.5'),('schema_revision','3');").unwrap();
        }
        assert!(matches!(
            CatalogDb::open(&f, false),
            Err(CatalogError::Unsupported { revision: 3, .. })
        ));
    }
}
