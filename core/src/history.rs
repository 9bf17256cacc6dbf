//! The tag history database (`H` object) and the reflog (`.cvmfsreflog`).
//!
//! History: SQLite schema 1.0 revision 3 with `tags`, `recycle_bin`, `branches` (the default
//! branch row `('', NULL, 0)`) and the `fqrn` property (cvmfs-formats.md §1.8, upstream
//! `history_sql.cc`). Every publish moves `trunk` to the new root catalog and the old `trunk` to
//! `trunk-previous`, as `cvmfs_server` does, and adds the named tag if one was given.
//! Reflog: `refs(hash, type, timestamp)` listing every root catalog, certificate and history
//! object ever published; stored uncompressed; the manifest's `Y` is the SHA-1 of its file.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::hash::{Digest20, ObjectId, Suffix};

/// One tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub name: String,
    /// Root catalog hash (hex, no suffix).
    pub hash: String,
    pub revision: u64,
    pub timestamp: i64,
    pub description: String,
    /// Uncompressed root catalog size.
    pub size: u64,
}

/// Errors of the history and reflog databases.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("tag name '{0}' is invalid (non-empty, no whitespace or '/', at most 255 bytes)")]
    BadName(String),
}

/// Opens the scratch copy `file` of a history or reflog database. Every such file is a
/// temporary copy that a publish (or a check) reads and changes, then stores as an object or a
/// root file, which is what is made durable: syncing the copy's own transactions (SQLite's
/// default, `synchronous = FULL` with a rollback journal on disk) bought nothing and cost a
/// publish's commit five `fsync`s a transaction — some 20 ms of a 30–50 ms commit here, held
/// under the gateway lease in gateway mode. Its journal is kept in memory instead.
fn scratch_connection(file: &Path) -> Result<Connection, HistoryError> {
    let conn = Connection::open(file)?;
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = MEMORY;")?;
    Ok(conn)
}

/// Whether a tag name is acceptable (upstream forbids spaces).
pub fn valid_tag_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c.is_control())
}

/// A history database file on scratch disk.
pub struct History {
    conn: Connection,
}

impl History {
    /// Creates an empty history for repository `fqrn` at `file`.
    pub fn create(file: &Path, fqrn: &str) -> Result<History, HistoryError> {
        let _ = std::fs::remove_file(file);
        let conn = scratch_connection(file)?;
        conn.execute_batch(
            "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key));
             CREATE TABLE branches (branch TEXT, parent TEXT, initial_revision INTEGER,
               CONSTRAINT pk_branch PRIMARY KEY (branch), FOREIGN KEY (parent) REFERENCES branches (branch));
             CREATE TABLE tags (name TEXT, hash TEXT, revision INTEGER, timestamp INTEGER, channel INTEGER,
               description TEXT, size INTEGER, branch TEXT, CONSTRAINT pk_tags PRIMARY KEY (name),
               FOREIGN KEY (branch) REFERENCES branches (branch));
             CREATE TABLE recycle_bin (hash TEXT, flags INTEGER, CONSTRAINT pk_hash PRIMARY KEY (hash));
             INSERT INTO branches (branch, parent, initial_revision) VALUES ('', NULL, 0);",
        )?;
        conn.execute(
            "INSERT INTO properties (key, value) VALUES ('schema', ?1)",
            params![1.0f64],
        )?;
        conn.execute(
            "INSERT INTO properties (key, value) VALUES ('schema_revision', 3)",
            [],
        )?;
        conn.execute(
            "INSERT INTO properties (key, value) VALUES ('fqrn', ?1)",
            params![fqrn],
        )?;
        Ok(History { conn })
    }

    /// Opens an existing history file.
    pub fn open(file: &Path) -> Result<History, HistoryError> {
        Ok(History {
            conn: scratch_connection(file)?,
        })
    }

    pub fn tags(&self) -> Result<Vec<Tag>, HistoryError> {
        let mut st = self.conn.prepare(
            "SELECT name, hash, revision, timestamp, description, size FROM tags ORDER BY revision DESC, name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(Tag {
                name: r.get(0)?,
                hash: r.get(1)?,
                revision: r.get::<_, i64>(2)? as u64,
                timestamp: r.get(3)?,
                description: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                size: r.get::<_, Option<i64>>(5)?.unwrap_or(0) as u64,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn tag(&self, name: &str) -> Result<Option<Tag>, HistoryError> {
        Ok(self.tags()?.into_iter().find(|t| t.name == name))
    }

    /// Inserts or replaces a tag.
    pub fn put_tag(&self, t: &Tag) -> Result<(), HistoryError> {
        if !valid_tag_name(&t.name) {
            return Err(HistoryError::BadName(t.name.clone()));
        }
        self.conn.execute(
            "INSERT OR REPLACE INTO tags (name, hash, revision, timestamp, channel, description, size, branch)
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, '')",
            params![t.name, t.hash, t.revision as i64, t.timestamp, t.description, t.size as i64],
        )?;
        Ok(())
    }

    /// Removes a tag; whether it was there.
    pub fn remove_tag(&self, name: &str) -> Result<bool, HistoryError> {
        Ok(self
            .conn
            .execute("DELETE FROM tags WHERE name = ?1", params![name])?
            > 0)
    }

    /// Records a publish: `trunk` → `trunk-previous`, new `trunk`, and the named tags.
    pub fn record_publish(&self, trunk: &Tag, named: &[Tag]) -> Result<(), HistoryError> {
        if let Some(mut prev) = self.tag("trunk")? {
            prev.name = "trunk-previous".into();
            prev.description = "default undo target".into();
            self.put_tag(&prev)?;
        }
        self.put_tag(trunk)?;
        for n in named {
            self.put_tag(n)?;
        }
        Ok(())
    }

    /// Points this history at the one it was made from (`previous_revision`, the hex digest
    /// of the earlier history object, as upstream's `SetPreviousRevision` stores it), so the
    /// histories of a repository form a chain back to its first publish.
    pub fn set_previous_revision(&self, h: &ObjectId) -> Result<(), HistoryError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO properties (key, value) VALUES ('previous_revision', ?1)",
            params![h.digest.hex()],
        )?;
        Ok(())
    }

    /// The history object this one was made from, if it says (none for a repository's first
    /// history, or one written by a tool that does not record it).
    pub fn previous_revision(&self) -> Result<Option<ObjectId>, HistoryError> {
        let v: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM properties WHERE key = 'previous_revision'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.and_then(|v| Digest20::from_hex(v.trim()).ok())
            .map(|d| ObjectId::new(d, Suffix::History)))
    }

    pub fn close(self) -> Result<(), HistoryError> {
        self.conn.close().map_err(|(_, e)| HistoryError::Sql(e))
    }
}

/// Reflog entry types (upstream `reflog_sql.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefType {
    Catalog = 0,
    Certificate = 1,
    History = 2,
    Metainfo = 3,
}

/// The reflog database file.
pub struct Reflog {
    conn: Connection,
}

impl Reflog {
    /// Opens `file`, creating an empty reflog for `fqrn` if it does not exist.
    pub fn open_or_create(file: &Path, fqrn: &str) -> Result<Reflog, HistoryError> {
        let exists = file.exists();
        let conn = scratch_connection(file)?;
        if !exists {
            conn.execute_batch(
                "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key));
                 CREATE TABLE refs (hash TEXT, type INTEGER, timestamp INTEGER,
                   CONSTRAINT pk_refs PRIMARY KEY (type, hash));",
            )?;
            conn.execute(
                "INSERT INTO properties (key, value) VALUES ('schema', ?1)",
                params![1.0f64],
            )?;
            conn.execute(
                "INSERT INTO properties (key, value) VALUES ('schema_revision', 0)",
                [],
            )?;
            conn.execute(
                "INSERT INTO properties (key, value) VALUES ('fqrn', ?1)",
                params![fqrn],
            )?;
        }
        Ok(Reflog { conn })
    }

    pub fn add(&self, id: &ObjectId, t: RefType, ts: i64) -> Result<(), HistoryError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO refs (hash, type, timestamp) VALUES (?1, ?2, ?3)",
            params![id.digest.hex(), t as i64, ts],
        )?;
        Ok(())
    }

    pub fn contains(&self, id: &ObjectId, t: RefType) -> Result<bool, HistoryError> {
        Ok(self
            .conn
            .prepare("SELECT 1 FROM refs WHERE hash = ?1 AND type = ?2")?
            .exists(params![id.digest.hex(), t as i64])?)
    }

    /// Every root catalog ever published.
    pub fn catalogs(&self) -> Result<Vec<String>, HistoryError> {
        let mut st = self
            .conn
            .prepare("SELECT hash FROM refs WHERE type = 0 ORDER BY timestamp")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn close(self) -> Result<(), HistoryError> {
        self.conn.close().map_err(|(_, e)| HistoryError::Sql(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragmas(conn: &Connection) -> (i64, String) {
        let sync = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        let journal = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        (sync, journal)
    }

    #[test]
    fn scratch_copies_are_changed_without_syncing_and_keep_their_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("history.db");
        let tag = Tag {
            name: "nightly".into(),
            hash: "a".repeat(40),
            revision: 7,
            timestamp: 1_700_000_000,
            description: "d".into(),
            size: 4096,
        };
        let h = History::create(&file, "test.example.org").unwrap();
        assert_eq!(pragmas(&h.conn), (0, "memory".to_string()));
        h.put_tag(&tag).unwrap();
        // No rollback journal on disk while the copy is changed.
        assert!(!dir.path().join("history.db-journal").exists());
        h.close().unwrap();

        let h = History::open(&file).unwrap();
        assert_eq!(pragmas(&h.conn), (0, "memory".to_string()));
        assert_eq!(h.tag("nightly").unwrap(), Some(tag));
        h.close().unwrap();

        let file = dir.path().join("reflog.db");
        let id = ObjectId::new(Digest20([7; 20]), Suffix::Catalog);
        let r = Reflog::open_or_create(&file, "test.example.org").unwrap();
        assert_eq!(pragmas(&r.conn), (0, "memory".to_string()));
        r.add(&id, RefType::Catalog, 5).unwrap();
        assert!(!dir.path().join("reflog.db-journal").exists());
        r.close().unwrap();
        let r = Reflog::open_or_create(&file, "test.example.org").unwrap();
        assert!(r.contains(&id, RefType::Catalog).unwrap());
        assert!(!r.contains(&id, RefType::Certificate).unwrap());
    }
}
