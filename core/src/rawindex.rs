//! The raw-content index of one CAS: a persistent map from (SHA-1 of an object's uncompressed
//! bytes, their length, the compression, the object suffix) to the stored object's name and
//! size. A file (or chunk) whose content was encoded before skips compression: one SHA-1 pass
//! over the raw bytes and one existence check in the CAS replace zlib and the store.
//!
//! The index is only a hint: an entry is trusted only after the CAS confirms the object exists
//! with the recorded stored size (an entry whose object is gone — deleted by garbage collection,
//! say — or differs is dropped), so it can never name an object that does not exist. It lives outside the served storage (the daemon
//! keeps `<spool>/rawindex/<repo>.db`); a missing or unreadable index is started afresh and
//! fills again as content is encoded.
//!
//! New entries are held in memory and written in one transaction, in key order, when
//! [`FLUSH_AT`] have gathered or, in the background, once the job that encoded them ends
//! ([`RawIndex::flush`], [`RawIndex::flush_in_background`]): each
//! small transaction rewrote the random pages its keys fell on (a sixth of the store threads'
//! time on 100,000 tiny files). Lookups see held entries; a crash loses only hints.
//!
//! Contents under [`MEMORY_ONLY_BELOW`] bytes are remembered in memory only (with the entries
//! seen lately, [`RECENT`]), never written: a tree of tiny files would fill the table with rows
//! that each cost about as much to write and look up as compressing the content again, but
//! within one daemon's lifetime a repeat (the nightly release's thousands of small files)
//! is answered without compressing, storing or asking the table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::cas::Cas;
use crate::content::Content;
use crate::hash::{Digest20, ObjectId, Suffix};
use crate::object::Compression;

/// What identifies an encoding of raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawKey {
    pub raw: Digest20,
    pub len: u64,
    pub compression: Compression,
    pub suffix: Suffix,
}

impl RawKey {
    /// The key of `data` encoded with `compression` under `suffix`.
    pub fn of(data: &[u8], compression: Compression, suffix: Suffix) -> RawKey {
        RawKey {
            raw: Digest20::of(data),
            len: data.len() as u64,
            compression,
            suffix,
        }
    }

    /// [`RawKey::of`] the bytes of `content`, hashed part after part.
    pub fn of_content(content: &Content, compression: Compression, suffix: Suffix) -> RawKey {
        RawKey {
            raw: content.sha1(),
            len: content.len() as u64,
            compression,
            suffix,
        }
    }

    fn comp(&self) -> String {
        match self.compression {
            Compression::Zlib(l) => format!("zlib{l}"),
            Compression::None => "none".into(),
        }
    }

    fn suffix(&self) -> String {
        self.suffix.as_char().map(String::from).unwrap_or_default()
    }
}

/// Contents shorter than this are remembered in memory only (see the module's note). Measured
/// when they bypassed the index altogether: zlib-6 of the Python tree's 12,442 files under 512
/// bytes (190 on average) took 10–11 µs each (zlib builds its Huffman trees for every one),
/// and on a warm re-publish of the tree a daemon answering them from memory was faster in
/// each of twelve alternating pairs (1.63 s → 1.42 s mean, 2.64 → 2.28 CPU-s); written to the
/// table, a cold publish of 100,000 tiny files would pay a table miss and a row for each.
pub const MEMORY_ONLY_BELOW: u64 = 512;

/// Entries held in memory before they are written.
pub const FLUSH_AT: usize = 32_768;

/// Entries written or found lately that are also kept in memory (in two generations of half
/// this each; about 90 bytes an entry), so a repeat publish in the same daemon's lifetime —
/// the nightly release that is mostly yesterday's — asks the table only for what it has not
/// seen lately. The entries of small contents ([`MEMORY_ONLY_BELOW`]) live here alone.
pub const RECENT: usize = 262_144;

/// Two generations of recently seen entries: when the young one is full it becomes the old one.
#[derive(Default)]
struct Recent {
    young: HashMap<RawKey, (ObjectId, u64)>,
    old: HashMap<RawKey, (ObjectId, u64)>,
}

impl Recent {
    fn get(&self, k: &RawKey) -> Option<(ObjectId, u64)> {
        self.young.get(k).or_else(|| self.old.get(k)).copied()
    }

    fn put(&mut self, k: RawKey, v: (ObjectId, u64)) {
        if self.young.len() >= RECENT / 2 {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(k, v);
    }

    fn remove(&mut self, k: &RawKey) {
        self.young.remove(k);
        self.old.remove(k);
    }
}

/// The index; safe to share between encoder threads.
pub struct RawIndex {
    conn: Mutex<Connection>,
    /// Recorded, not written yet: kept until written, so a lookup finds an entry here or, once
    /// it is gone from here, in the table. Lock order: `conn` before `pending`.
    pending: Mutex<HashMap<RawKey, (ObjectId, u64)>>,
    /// Written or found lately (a copy of table rows; see [`RECENT`]), and the small contents'
    /// entries (only here). Taken after `conn` when both are held, never together with
    /// `pending`; a stale copy (its row forgotten meanwhile) fails the store check of the next
    /// lookup like any stale entry, and goes.
    recent: Mutex<Recent>,
    path: PathBuf,
}

fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS raw (
             raw TEXT NOT NULL, len INTEGER NOT NULL, comp TEXT NOT NULL, suffix TEXT NOT NULL,
             object TEXT NOT NULL, stored INTEGER NOT NULL,
             PRIMARY KEY (raw, len, comp, suffix)) WITHOUT ROWID;",
    )?;
    // A file that is not an index of ours fails here rather than at the first lookup.
    c.query_row("SELECT COUNT(*) FROM raw WHERE 0", [], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(c)
}

impl RawIndex {
    /// Opens the index at `path`, creating it; one that cannot be read is replaced by an empty
    /// one (it is only a hint).
    pub fn open(path: &Path) -> Result<RawIndex, String> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let conn = match open_db(path) {
            Ok(c) => c,
            Err(_) => {
                for ext in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
                }
                open_db(path).map_err(|e| format!("{}: {e}", path.display()))?
            }
        };
        Ok(RawIndex {
            conn: Mutex::new(conn),
            pending: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::default()),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn get(&self, k: &RawKey) -> Option<(ObjectId, u64)> {
        if k.len < MEMORY_ONLY_BELOW {
            return self.recent.lock().unwrap_or_else(|e| e.into_inner()).get(k);
        }
        if let Some(v) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(k)
        {
            return Some(*v);
        }
        if let Some(v) = self.recent.lock().unwrap_or_else(|e| e.into_inner()).get(k) {
            return Some(v);
        }
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let row: Option<(String, i64)> = c
            .prepare_cached(
                "SELECT object, stored FROM raw WHERE raw = ?1 AND len = ?2 AND comp = ?3 AND suffix = ?4",
            )
            .and_then(|mut st| {
                st.query_row(
                    params![k.raw.hex(), k.len as i64, k.comp(), k.suffix()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
            })
            .ok()
            .flatten();
        drop(c);
        let (object, stored) = row?;
        let id = ObjectId::parse(&object).ok()?;
        // An entry of another suffix cannot answer (the key includes it; this guards the row).
        let found = (id.suffix == k.suffix).then_some((id, stored.max(0) as u64))?;
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(*k, found);
        Some(found)
    }

    /// The object that `k` was encoded to, if the index knows it and `cas` still holds it with
    /// the recorded size; an entry whose object is gone (or differs) is dropped.
    pub fn lookup(&self, k: &RawKey, cas: &dyn Cas) -> Option<(ObjectId, u64)> {
        let (id, stored) = self.get(k)?;
        match cas.size(&id) {
            Ok(n) if n == stored => Some((id, stored)),
            Ok(_) | Err(crate::cas::CasError::NotFound(_)) => {
                self.forget(k);
                None
            }
            Err(_) => None,
        }
    }

    /// Records that `k` is stored as `id` (`stored` bytes). Failures are ignored: the index is
    /// a hint, and the next encoding records it again.
    pub fn record(&self, k: &RawKey, id: &ObjectId, stored: u64) {
        self.record_many(&[(*k, *id, stored)]);
    }

    /// Records several encodings (a store batch); written with the next [`RawIndex::flush`],
    /// at once when [`FLUSH_AT`] are held and no write is under way.
    /// Contents under [`MEMORY_ONLY_BELOW`] bytes are only remembered.
    pub fn record_many(&self, items: &[(RawKey, ObjectId, u64)]) {
        let small = |k: &RawKey| k.len < MEMORY_ONLY_BELOW;
        if items.iter().any(|(k, _, _)| small(k)) {
            let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            for (k, id, n) in items.iter().filter(|(k, _, _)| small(k)) {
                r.put(*k, (*id, *n));
            }
        }
        if items.iter().all(|(k, _, _)| small(k)) {
            return;
        }
        let full = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let large = items.iter().filter(|(k, _, _)| !small(k));
            p.extend(large.map(|(k, id, n)| (*k, (*id, *n))));
            p.len() >= FLUSH_AT
        };
        if full {
            // Unless the index is busy (a write under way takes these too, or the next one).
            match self.conn.try_lock() {
                Ok(c) => self.flush_locked(c),
                Err(std::sync::TryLockError::Poisoned(c)) => self.flush_locked(c.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
    }

    /// Writes the held entries in one transaction, in key order (each page of the table is
    /// written once however many of them it takes). Failures are ignored, like any hint. The
    /// entries stay held (found without waiting for the write) until they are written.
    pub fn flush(&self) {
        self.flush_locked(self.conn.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn flush_locked(&self, mut c: std::sync::MutexGuard<'_, Connection>) {
        let mut items: Vec<(RawKey, (ObjectId, u64))> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        if items.is_empty() {
            return;
        }
        // The table's key order (ties, the same raw bytes encoded otherwise, are rare).
        items.sort_unstable_by_key(|(k, _)| (k.raw.0, k.len));
        let Ok(tx) = c.transaction() else { return };
        {
            let Ok(mut st) = tx.prepare_cached(
                "INSERT OR REPLACE INTO raw (raw, len, comp, suffix, object, stored) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            ) else {
                return;
            };
            for (k, (id, stored)) in &items {
                let _ = st.execute(params![
                    k.raw.hex(),
                    k.len as i64,
                    k.comp(),
                    k.suffix(),
                    id.to_string(),
                    *stored as i64
                ]);
            }
        }
        let written = tx.commit().is_ok();
        // Kept in memory as written (before they leave the held ones, so a lookup meanwhile
        // finds them in one or the other).
        if written {
            let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in &items {
                r.put(*k, *v);
            }
        }
        // Written (or failed: a hint is not retried): no longer held, unless recorded anew.
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in &items {
            if p.get(k) == Some(v) {
                p.remove(k);
            }
        }
    }

    /// [`RawIndex::flush`] on a thread of its own, so the caller goes on at once (the entries
    /// are found meanwhile, and a crash before the write only costs their next encoding).
    pub fn flush_in_background(self: &Arc<Self>) {
        let ix = self.clone();
        if std::thread::Builder::new()
            .name("rawindex-flush".into())
            .spawn(move || ix.flush())
            .is_err()
        {
            self.flush();
        }
    }

    fn forget(&self, k: &RawKey) {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(k);
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(k);
        if k.len < MEMORY_ONLY_BELOW {
            return;
        }
        let _ = c.execute(
            "DELETE FROM raw WHERE raw = ?1 AND len = ?2 AND comp = ?3 AND suffix = ?4",
            params![k.raw.hex(), k.len as i64, k.comp(), k.suffix()],
        );
    }

    /// Entries held (written first).
    pub fn len(&self) -> u64 {
        self.flush();
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        c.query_row("SELECT COUNT(*) FROM raw", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for RawIndex {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::LocalCas;
    use crate::object::compress_metadata;

    #[test]
    fn answers_only_for_stored_objects_and_the_exact_encoding() {
        let d = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(&d.path().join("cas")).unwrap();
        let ix = RawIndex::open(&d.path().join("ix/raw.db")).unwrap();
        let data = b"some file content".repeat(40);
        let k = RawKey::of(&data, Compression::Zlib(6), Suffix::None);
        assert_eq!(ix.lookup(&k, &cas), None);
        let (id, bytes) = compress_metadata(&data, Suffix::None);
        // Recorded but not stored: never trusted, and dropped.
        ix.record(&k, &id, bytes.len() as u64);
        assert_eq!(ix.lookup(&k, &cas), None);
        assert_eq!(ix.len(), 0);
        cas.put_bytes(&id, &bytes).unwrap();
        ix.record(&k, &id, bytes.len() as u64);
        assert_eq!(ix.lookup(&k, &cas), Some((id, bytes.len() as u64)));
        // Another compression, suffix or length is another key.
        for other in [
            RawKey {
                compression: Compression::Zlib(9),
                ..k
            },
            RawKey {
                compression: Compression::None,
                ..k
            },
            RawKey {
                suffix: Suffix::Partial,
                ..k
            },
            RawKey {
                len: k.len + 1,
                ..k
            },
        ] {
            assert_eq!(ix.lookup(&other, &cas), None);
        }
        // A recorded size that the stored object does not have: not trusted, dropped.
        ix.record(&k, &id, bytes.len() as u64 + 1);
        assert_eq!(ix.lookup(&k, &cas), None);
        ix.record(&k, &id, bytes.len() as u64);
        // Persistent; a deleted object is forgotten.
        drop(ix);
        let ix = RawIndex::open(&d.path().join("ix/raw.db")).unwrap();
        assert_eq!(ix.lookup(&k, &cas).map(|x| x.0), Some(id));
        cas.delete(&id).unwrap();
        assert_eq!(ix.lookup(&k, &cas), None);
        assert!(ix.is_empty());
    }

    #[test]
    fn small_contents_are_remembered_in_memory_only() {
        let d = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(&d.path().join("cas")).unwrap();
        let p = d.path().join("raw.db");
        let ix = RawIndex::open(&p).unwrap();
        let small = b"s".repeat(MEMORY_ONLY_BELOW as usize - 1);
        let large = b"l".repeat(MEMORY_ONLY_BELOW as usize);
        let mut items = Vec::new();
        for data in [&small, &large] {
            let (id, bytes) = compress_metadata(data, Suffix::None);
            cas.put_bytes(&id, &bytes).unwrap();
            let k = RawKey::of(data, Compression::Zlib(6), Suffix::None);
            items.push((k, id, bytes.len() as u64));
        }
        ix.record_many(&items);
        for (k, id, n) in &items {
            assert_eq!(ix.lookup(k, &cas), Some((*id, *n)));
        }
        // Only the large one is held for the table, and written.
        assert_eq!(ix.pending.lock().unwrap().len(), 1);
        assert_eq!(ix.len(), 1);
        // Still checked against the store: gone, it goes from memory too.
        cas.delete(&items[0].1).unwrap();
        assert_eq!(ix.lookup(&items[0].0, &cas), None);
        assert!(ix.recent.lock().unwrap().get(&items[0].0).is_none());
        drop(ix);
        cas.put_bytes(&items[0].1, &compress_metadata(&small, Suffix::None).1)
            .unwrap();
        let ix = RawIndex::open(&p).unwrap();
        assert_eq!(ix.lookup(&items[0].0, &cas), None, "not written");
        assert_eq!(ix.lookup(&items[1].0, &cas), Some((items[1].1, items[1].2)));
    }

    #[test]
    fn entries_are_held_until_a_flush_and_found_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(&d.path().join("cas")).unwrap();
        let p = d.path().join("raw.db");
        let ix = RawIndex::open(&p).unwrap();
        let other = RawIndex::open(&p).unwrap();
        let data = b"held content".repeat(50);
        let k = RawKey::of(&data, Compression::Zlib(6), Suffix::None);
        let (id, bytes) = compress_metadata(&data, Suffix::None);
        cas.put_bytes(&id, &bytes).unwrap();
        ix.record(&k, &id, bytes.len() as u64);
        // Found by the index that holds it; not written yet.
        assert_eq!(ix.lookup(&k, &cas), Some((id, bytes.len() as u64)));
        assert_eq!(other.lookup(&k, &cas), None);
        ix.flush();
        assert_eq!(other.lookup(&k, &cas), Some((id, bytes.len() as u64)));
        // Written in the background: found at once by the index that holds it, by another
        // handle once written.
        let ix = Arc::new(ix);
        let data2 = b"background".repeat(60);
        let k2 = RawKey::of(&data2, Compression::Zlib(6), Suffix::None);
        ix.record(&k2, &id, bytes.len() as u64);
        ix.flush_in_background();
        assert_eq!(ix.get(&k2), Some((id, bytes.len() as u64)));
        let start = std::time::Instant::now();
        while other.get(&k2).is_none() {
            assert!(start.elapsed().as_secs() < 10, "never written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let start = std::time::Instant::now();
        // Written entries are no longer held; the writer's handle goes with its thread.
        while !ix.pending.lock().unwrap().is_empty() || Arc::strong_count(&ix) > 1 {
            assert!(start.elapsed().as_secs() < 10, "still held once written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // A full buffer is written by itself, in one go.
        let many: Vec<(RawKey, ObjectId, u64)> = (0..FLUSH_AT as u32)
            .map(|i| {
                let raw = i.to_be_bytes().repeat(130);
                (
                    RawKey::of(&raw, Compression::Zlib(6), Suffix::None),
                    id,
                    bytes.len() as u64,
                )
            })
            .collect();
        ix.record_many(&many[..FLUSH_AT - 1]);
        assert_eq!(other.len(), 2);
        ix.record_many(&many[FLUSH_AT - 1..]);
        assert_eq!(other.len(), 2 + FLUSH_AT as u64);
        // Held entries of a dropped index are written.
        let last = RawKey::of(&b"last".repeat(200), Compression::Zlib(6), Suffix::None);
        ix.record(&last, &id, bytes.len() as u64);
        drop(ix);
        assert_eq!(other.lookup(&last, &cas), Some((id, bytes.len() as u64)));
    }

    #[test]
    fn an_unreadable_index_is_started_afresh() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("raw.db");
        std::fs::write(&p, b"this is not a database, and not an index either").unwrap();
        let ix = RawIndex::open(&p).unwrap();
        assert!(ix.is_empty());
    }

    #[test]
    fn entries_written_or_found_lately_answer_from_memory_and_stay_bounded() {
        let d = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(&d.path().join("cas")).unwrap();
        let data = b"remembered content".repeat(40);
        let (id, bytes) = compress_metadata(&data, Suffix::None);
        cas.put_bytes(&id, &bytes).unwrap();
        let k = RawKey::of(&data, Compression::Zlib(6), Suffix::None);
        let want = Some((id, bytes.len() as u64));
        let table = |ix: &RawIndex| -> i64 {
            let c = ix.conn.lock().unwrap();
            c.query_row("SELECT COUNT(*) FROM raw", [], |r| r.get(0))
                .unwrap()
        };
        // Written by a flush: kept in memory too, and answered from there once the row is gone
        // (another writer's doing, say), still checked against the store.
        let ix = RawIndex::open(&d.path().join("raw.db")).unwrap();
        ix.record(&k, &id, bytes.len() as u64);
        ix.flush();
        assert_eq!(table(&ix), 1);
        ix.conn
            .lock()
            .unwrap()
            .execute("DELETE FROM raw", [])
            .unwrap();
        assert_eq!(ix.lookup(&k, &cas), want);
        drop(ix);
        // Found in the table by a new index: remembered from then on.
        let ix = RawIndex::open(&d.path().join("raw.db")).unwrap();
        ix.record(&k, &id, bytes.len() as u64);
        drop(ix);
        let ix = RawIndex::open(&d.path().join("raw.db")).unwrap();
        assert!(ix.recent.lock().unwrap().get(&k).is_none());
        assert_eq!(ix.lookup(&k, &cas), want);
        assert_eq!(ix.recent.lock().unwrap().get(&k), want);
        // Its object gone, the entry goes from memory and table alike.
        std::fs::remove_file(d.path().join("cas").join(id.path())).unwrap();
        assert_eq!(ix.lookup(&k, &cas), None);
        assert!(ix.recent.lock().unwrap().get(&k).is_none());
        assert_eq!(table(&ix), 0);
        // Bounded: two generations of at most half of RECENT each.
        let mut r = Recent::default();
        for i in 0..(RECENT + RECENT / 4) as u32 {
            let key = RawKey::of(&i.to_le_bytes(), Compression::Zlib(6), Suffix::None);
            r.put(key, (id, 1));
        }
        assert!(r.young.len() <= RECENT / 2 && r.old.len() <= RECENT / 2);
        assert_eq!(r.young.len() + r.old.len(), RECENT / 2 + RECENT / 4);
        let newest = RawKey::of(
            &((RECENT + RECENT / 4 - 1) as u32).to_le_bytes(),
            Compression::Zlib(6),
            Suffix::None,
        );
        assert!(r.get(&newest).is_some());
        let oldest = RawKey::of(&0u32.to_le_bytes(), Compression::Zlib(6), Suffix::None);
        assert!(r.get(&oldest).is_none());
    }
}
