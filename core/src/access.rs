//! Access tracking for content lifecycle, as plain synchronous code: a per-repository SQLite
//! store of when each object and each path was last seen, fed by pluggable sources that are not
//! tied to any proxy product — a Stratum 1 web server's access log (tailed with an
//! operator-supplied regex field map, following rotation), batches posted to the API, and the
//! publisher's own publish events (which set a floor, so fresh content is never a candidate).
//! Repeated events for the same key within a short window are collapsed before they reach SQLite.

use std::collections::HashMap;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection};

use crate::hash::ObjectId;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("access store {path}: {source}")]
    Sql {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("access log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// One access: an object, a path, or both, seen at `time` (UNIX seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEvent {
    pub object: Option<ObjectId>,
    pub path: Option<String>,
    pub time: i64,
}

/// What recording a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recorded {
    /// Events written to the store.
    pub applied: usize,
    /// Events dropped as repeats within the collapse window.
    pub collapsed: usize,
    /// Tombstones revoked because their object was seen after it was tombstoned.
    pub revoked: usize,
    /// Their objects' bytes.
    pub revoked_bytes: u64,
}

/// How many tombstones an operation made or dropped, and their objects' bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counted {
    pub objects: usize,
    pub bytes: u64,
}

impl Counted {
    fn add(&mut self, size: i64) {
        self.objects += 1;
        self.bytes += size.max(0) as u64;
    }
}

/// An object marked for deletion: garbage collection deletes it once `delete_after` has passed
/// (and it is still unreferenced), unless it is seen again first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tombstone {
    pub object: String,
    pub size: u64,
    pub created: i64,
    pub delete_after: i64,
    /// The garbage-collection run that made it (revoked if that run is aborted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

/// The access store of one repository.
pub struct AccessStore {
    conn: Connection,
    path: PathBuf,
    /// Collapse window in seconds and the last time each key was written.
    window: i64,
    recent: HashMap<String, i64>,
}

impl AccessStore {
    /// Opens (creating) the store; events for a key within `window` seconds of the last one
    /// written for it are collapsed.
    pub fn open(path: &Path, window: i64) -> Result<AccessStore, AccessError> {
        let sql = |source| AccessError::Sql {
            path: path.display().to_string(),
            source,
        };
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|source| AccessError::Io {
                path: d.display().to_string(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS objects (hash TEXT PRIMARY KEY, last_seen INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS paths (path TEXT PRIMARY KEY, last_seen INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS tombstones (hash TEXT PRIMARY KEY, size INTEGER NOT NULL,
                 created INTEGER NOT NULL, delete_after INTEGER NOT NULL, run TEXT);",
        )
        .map_err(sql)?;
        // Stores made before runs were journaled lack the column.
        let has_run: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('tombstones') WHERE name = 'run'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(sql)?
            > 0;
        if !has_run {
            conn.execute_batch("ALTER TABLE tombstones ADD COLUMN run TEXT")
                .map_err(sql)?;
        }
        Ok(AccessStore {
            conn,
            path: path.to_path_buf(),
            window,
            recent: HashMap::new(),
        })
    }

    fn sql(&self, source: rusqlite::Error) -> AccessError {
        AccessError::Sql {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Records a batch in one transaction; last-seen times only move forward.
    pub fn record(&mut self, events: &[AccessEvent]) -> Result<Recorded, AccessError> {
        let mut out = Recorded::default();
        let mut keys: Vec<(bool, String, i64)> = Vec::new();
        for e in events {
            let mut any = false;
            let mut keep = |is_obj: bool, k: String, recent: &mut HashMap<String, i64>| {
                let tag = format!("{}{k}", if is_obj { 'o' } else { 'p' });
                match recent.get(&tag) {
                    Some(&t) if e.time >= t && e.time - t < self.window => false,
                    _ => {
                        recent.insert(tag, e.time);
                        keys.push((is_obj, k, e.time));
                        true
                    }
                }
            };
            if let Some(o) = e.object {
                any |= keep(true, o.to_string(), &mut self.recent);
            }
            if let Some(p) = &e.path {
                any |= keep(false, p.clone(), &mut self.recent);
            }
            if any {
                out.applied += 1;
            } else {
                out.collapsed += 1;
            }
        }
        // Every object event may revoke a tombstone, collapsed or not.
        let seen: Vec<(String, i64)> = events
            .iter()
            .filter_map(|e| e.object.map(|o| (o.to_string(), e.time)))
            .collect();
        if keys.is_empty() && seen.is_empty() {
            return Ok(out);
        }
        let tx = self.conn.unchecked_transaction().map_err(|e| self.sql(e))?;
        {
            let mut obj = tx
                .prepare_cached(
                    "INSERT INTO objects (hash, last_seen) VALUES (?1, ?2)
                     ON CONFLICT(hash) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
                )
                .map_err(|e| self.sql(e))?;
            let mut path = tx
                .prepare_cached(
                    "INSERT INTO paths (path, last_seen) VALUES (?1, ?2)
                     ON CONFLICT(path) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
                )
                .map_err(|e| self.sql(e))?;
            let mut revoke = tx
                .prepare_cached(
                    "DELETE FROM tombstones WHERE hash = ?1 AND created <= ?2 RETURNING size",
                )
                .map_err(|e| self.sql(e))?;
            for (k, t) in &seen {
                let mut rows = revoke.query(params![k, t]).map_err(|e| self.sql(e))?;
                while let Some(r) = rows.next().map_err(|e| self.sql(e))? {
                    out.revoked += 1;
                    out.revoked_bytes += r.get::<_, i64>(0).map_err(|e| self.sql(e))?.max(0) as u64;
                }
            }
            for (is_obj, k, t) in &keys {
                if *is_obj {
                    obj.execute(params![k, t]).map_err(|e| self.sql(e))?;
                } else {
                    path.execute(params![k, t]).map_err(|e| self.sql(e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.sql(e))?;
        // Keep the collapse memory bounded.
        if self.recent.len() > 1_000_000 {
            self.recent.clear();
        }
        Ok(out)
    }

    /// Tombstones `objects` (object, size) at `now` to be deleted after `delete_after`, on
    /// behalf of garbage-collection run `run`; already tombstoned ones keep their times and
    /// run. Returns the new ones.
    pub fn tombstone(
        &mut self,
        objects: &[(ObjectId, u64)],
        now: i64,
        delete_after: i64,
        run: Option<&str>,
    ) -> Result<Counted, AccessError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.sql(e))?;
        let mut out = Counted::default();
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO tombstones (hash, size, created, delete_after, run) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(|e| self.sql(e))?;
            for (id, size) in objects {
                let n = st
                    .execute(params![
                        id.to_string(),
                        *size as i64,
                        now,
                        delete_after,
                        run
                    ])
                    .map_err(|e| self.sql(e))?;
                if n == 1 {
                    out.add(*size as i64);
                }
            }
        }
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(out)
    }

    /// Every tombstone, soonest due first.
    pub fn tombstones(&self) -> Result<Vec<Tombstone>, AccessError> {
        let mut st = self
            .conn
            .prepare("SELECT hash, size, created, delete_after, run FROM tombstones ORDER BY delete_after, hash")
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(Tombstone {
                    object: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    created: r.get(2)?,
                    delete_after: r.get(3)?,
                    run: r.get(4)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.sql(e))
    }

    /// Drops the tombstones of `objects` (deleted, or referenced again).
    pub fn untombstone(&mut self, objects: &[ObjectId]) -> Result<Counted, AccessError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.sql(e))?;
        let mut out = Counted::default();
        {
            let mut st = tx
                .prepare_cached("DELETE FROM tombstones WHERE hash = ?1 RETURNING size")
                .map_err(|e| self.sql(e))?;
            for id in objects {
                let mut rows = st.query(params![id.to_string()]).map_err(|e| self.sql(e))?;
                while let Some(r) = rows.next().map_err(|e| self.sql(e))? {
                    out.add(r.get(0).map_err(|e| self.sql(e))?);
                }
            }
        }
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(out)
    }

    /// Drops every tombstone run `run` made (the run was aborted).
    pub fn revoke_run(&mut self, run: &str) -> Result<Counted, AccessError> {
        let mut st = self
            .conn
            .prepare("DELETE FROM tombstones WHERE run = ?1 RETURNING size")
            .map_err(|e| self.sql(e))?;
        let mut rows = st.query(params![run]).map_err(|e| self.sql(e))?;
        let mut out = Counted::default();
        while let Some(r) = rows.next().map_err(|e| self.sql(e))? {
            out.add(r.get(0).map_err(|e| self.sql(e))?);
        }
        Ok(out)
    }

    /// Every tracked path with its last-seen time.
    pub fn paths(&self) -> Result<Vec<(String, i64)>, AccessError> {
        let mut st = self
            .conn
            .prepare("SELECT path, last_seen FROM paths ORDER BY path")
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.sql(e))
    }

    /// When the object was last seen.
    pub fn object_seen(&self, id: &ObjectId) -> Result<Option<i64>, AccessError> {
        self.one(
            "SELECT last_seen FROM objects WHERE hash = ?1",
            &id.to_string(),
        )
    }

    /// When the path was last seen (or published).
    pub fn path_seen(&self, path: &str) -> Result<Option<i64>, AccessError> {
        self.one("SELECT last_seen FROM paths WHERE path = ?1", path)
    }

    fn one(&self, sql: &str, key: &str) -> Result<Option<i64>, AccessError> {
        match self.conn.query_row(sql, params![key], |r| r.get(0)) {
            Ok(v) => Ok(Some(v)),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
            Err(e) => Err(self.sql(e)),
        }
    }

    /// (objects, paths) tracked.
    pub fn counts(&self) -> Result<(u64, u64), AccessError> {
        let n = |t: &str| -> Result<u64, AccessError> {
            self.conn
                .query_row(&format!("SELECT count(*) FROM {t}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|v| v as u64)
                .map_err(|e| self.sql(e))
        };
        Ok((n("objects")?, n("paths")?))
    }
}

/// How to read one access log: a regex whose named groups give the fields.
#[derive(Debug, Clone)]
pub struct LogFormat {
    pub regex: regex::Regex,
    /// Group with the object's path in the storage (`data/ab/cdef…C`) or its bare name.
    pub hash_group: String,
    /// Group with the repository name (events for other repositories are skipped).
    pub repo_group: Option<String>,
    /// Group with the time and how to read it.
    pub time_group: String,
    pub time_format: TimeFormat,
}

/// Time formats of access logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeFormat {
    /// `10/Oct/2000:13:55:36 -0700` (Apache/nginx common log format).
    Clf,
    /// `2000-10-10T13:55:36Z` or with an offset (RFC 3339).
    Rfc3339,
    /// Seconds since the epoch, possibly with a fraction (`1700000000.123`, nginx `$msec`).
    Unix,
}

impl TimeFormat {
    pub fn parse_name(s: &str) -> Result<TimeFormat, AccessError> {
        match s {
            "clf" | "%d/%b/%Y:%H:%M:%S %z" => Ok(TimeFormat::Clf),
            "rfc3339" | "iso8601" => Ok(TimeFormat::Rfc3339),
            "unix" | "epoch" => Ok(TimeFormat::Unix),
            other => Err(AccessError::Config(format!(
                "time_format '{other}': use clf, rfc3339 or unix"
            ))),
        }
    }

    /// UNIX seconds of `s`.
    pub fn parse(self, s: &str) -> Option<i64> {
        match self {
            TimeFormat::Unix => s.split('.').next()?.parse().ok(),
            TimeFormat::Clf => {
                // 10/Oct/2000:13:55:36 -0700
                let (dt, zone) = s.trim().split_once(' ')?;
                let mut it = dt.splitn(4, [':', '/']);
                let (d, mon, y) = (it.next()?, it.next()?, it.next()?);
                let hms = it.next()?;
                const M: [&str; 12] = [
                    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                    "Dec",
                ];
                let month = M.iter().position(|m| *m == mon)? as u32 + 1;
                let t = civil(y.parse().ok()?, month, d.parse().ok()?, hms)?;
                Some(t - zone_offset(zone)?)
            }
            TimeFormat::Rfc3339 => {
                let s = s.trim();
                let (date, rest) = s.split_once(['T', ' '])?;
                let mut d = date.split('-');
                let (y, m, dd) = (d.next()?, d.next()?, d.next()?);
                let (clock, zone) = if let Some(c) = rest.strip_suffix('Z') {
                    (c, "+0000".to_string())
                } else {
                    let i = rest.rfind(['+', '-'])?;
                    (&rest[..i], rest[i..].replace(':', ""))
                };
                let clock = clock.split('.').next()?;
                let t = civil(y.parse().ok()?, m.parse().ok()?, dd.parse().ok()?, clock)?;
                Some(t - zone_offset(&zone)?)
            }
        }
    }
}

/// Seconds of `+hhmm`/`-hhmm`.
fn zone_offset(z: &str) -> Option<i64> {
    let (sign, digits) = match z.as_bytes().first()? {
        b'+' => (1, &z[1..]),
        b'-' => (-1, &z[1..]),
        _ => return None,
    };
    if digits.len() != 4 {
        return None;
    }
    let h: i64 = digits[..2].parse().ok()?;
    let m: i64 = digits[2..].parse().ok()?;
    Some(sign * (h * 3600 + m * 60))
}

/// UNIX seconds of a UTC calendar time `y-m-d hh:mm:ss`.
fn civil(y: i64, m: u32, d: u32, hms: &str) -> Option<i64> {
    let mut p = hms.split(':');
    let (h, mi, s): (i64, i64, i64) = (
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from civil (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + s)
}

/// The object named by a request path or a bare name: `…/data/ab/cdef…[suffix]` or
/// `abcdef…[suffix]`.
pub fn object_of(s: &str) -> Option<ObjectId> {
    let s = s.split(['?', '#']).next()?;
    let tail = match s.rfind("/data/") {
        Some(i) => s[i + 6..].replace('/', ""),
        None => s.rsplit('/').next()?.to_string(),
    };
    ObjectId::parse(&tail).ok()
}

/// Reads new lines of an access log from where the last call stopped, following rotation
/// (a new inode, or a file shorter than the offset, is read from its start).
pub struct LogTail {
    path: PathBuf,
    offset: u64,
    inode: Option<u64>,
}

impl LogTail {
    /// Starts at the current end of the file (history before the tail started is not replayed).
    pub fn new(path: &Path) -> LogTail {
        use std::os::unix::fs::MetadataExt;
        let (offset, inode) = match std::fs::metadata(path) {
            Ok(m) => (m.len(), Some(m.ino())),
            Err(_) => (0, None),
        };
        LogTail {
            path: path.to_path_buf(),
            offset,
            inode,
        }
    }

    /// Reads complete new lines (a partial last line waits for the next call) and turns those
    /// `fmt` matches into events for `repo`. Returns (events, lines read, lines not matching).
    pub fn poll(
        &mut self,
        fmt: &LogFormat,
        repo: &str,
    ) -> Result<(Vec<AccessEvent>, usize, usize), AccessError> {
        use std::os::unix::fs::MetadataExt;
        let io = |source| AccessError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], 0, 0)),
            Err(e) => return Err(io(e)),
        };
        if self.inode != Some(meta.ino()) || meta.len() < self.offset {
            // Rotated (renamed away and recreated, or truncated): the new file from its start.
            self.inode = Some(meta.ino());
            self.offset = 0;
        }
        if meta.len() == self.offset {
            return Ok((vec![], 0, 0));
        }
        let mut f = std::fs::File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(self.offset)).map_err(io)?;
        let mut reader = std::io::BufReader::new(f.take(64 << 20));
        let (mut events, mut lines, mut skipped) = (Vec::new(), 0, 0);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(io)?;
            if n == 0 || !line.ends_with('\n') {
                break; // end, or a line still being written
            }
            self.offset += n as u64;
            lines += 1;
            match parse_line(fmt, line.trim_end(), repo) {
                Some(e) => events.push(e),
                None => skipped += 1,
            }
        }
        Ok((events, lines, skipped))
    }
}

/// One access-log line as an event of `repo`, if it is one.
pub fn parse_line(fmt: &LogFormat, line: &str, repo: &str) -> Option<AccessEvent> {
    let c = fmt.regex.captures(line)?;
    if let Some(g) = &fmt.repo_group {
        if c.name(g)?.as_str() != repo {
            return None;
        }
    }
    let object = object_of(c.name(&fmt.hash_group)?.as_str())?;
    let time = fmt.time_format.parse(c.name(&fmt.time_group)?.as_str())?;
    Some(AccessEvent {
        object: Some(object),
        path: None,
        time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{Digest20, Suffix};

    #[test]
    fn times_parse() {
        assert_eq!(
            TimeFormat::Clf.parse("10/Oct/2000:13:55:36 -0700"),
            Some(971211336)
        );
        assert_eq!(
            TimeFormat::Rfc3339.parse("2000-10-10T20:55:36Z"),
            Some(971211336)
        );
        assert_eq!(
            TimeFormat::Rfc3339.parse("2000-10-10T22:55:36.250+02:00"),
            Some(971211336)
        );
        assert_eq!(TimeFormat::Unix.parse("971211336.999"), Some(971211336));
        assert_eq!(TimeFormat::Clf.parse("32/Oct/2000:13:55:36 -0700"), None);
        assert_eq!(TimeFormat::Clf.parse("nonsense"), None);
    }

    #[test]
    fn objects_from_request_paths() {
        let id = ObjectId::new(Digest20::of(b"x"), Suffix::Partial);
        let hex = id.digest.hex();
        let url = format!("/cvmfs/a.org/data/{}/{}P?x=1", &hex[..2], &hex[2..]);
        assert_eq!(object_of(&url), Some(id));
        assert_eq!(object_of(&format!("{hex}P")), Some(id));
        assert_eq!(object_of("/cvmfs/a.org/.cvmfspublished"), None);
    }

    #[test]
    fn store_moves_forward_and_collapses_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = AccessStore::open(&dir.path().join("a.db"), 60).unwrap();
        let id = ObjectId::new(Digest20::of(b"x"), Suffix::None);
        let ev = |t| AccessEvent {
            object: Some(id),
            path: Some("/sw/a".into()),
            time: t,
        };
        assert_eq!(
            s.record(&[ev(1000), ev(1010), ev(1100)]).unwrap(),
            Recorded {
                applied: 2,
                collapsed: 1,
                revoked: 0,
                revoked_bytes: 0
            }
        );
        assert_eq!(s.object_seen(&id).unwrap(), Some(1100));
        // An older event never moves last_seen back.
        s.record(&[ev(500)]).unwrap();
        assert_eq!(s.object_seen(&id).unwrap(), Some(1100));
        assert_eq!(s.path_seen("/sw/a").unwrap(), Some(1100));
        assert_eq!(s.path_seen("/sw/b").unwrap(), None);
        assert_eq!(s.counts().unwrap(), (1, 1));
        drop(s);
        // Persistent.
        let s = AccessStore::open(&dir.path().join("a.db"), 60).unwrap();
        assert_eq!(s.object_seen(&id).unwrap(), Some(1100));
    }

    #[test]
    fn tombstones_are_revoked_by_a_later_access() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = AccessStore::open(&dir.path().join("t.db"), 0).unwrap();
        let (a, b) = (
            ObjectId::new(Digest20::of(b"a"), Suffix::None),
            ObjectId::new(Digest20::of(b"b"), Suffix::None),
        );
        assert_eq!(
            s.tombstone(&[(a, 10), (b, 20)], 1000, 2000, Some("r1"))
                .unwrap()
                .objects,
            2
        );
        assert_eq!(
            s.tombstone(&[(a, 10)], 1500, 9999, Some("r2"))
                .unwrap()
                .objects,
            0,
            "kept its times"
        );
        // Seen before the tombstone: no effect; seen after: revoked.
        let ev = |o, t| AccessEvent {
            object: Some(o),
            path: None,
            time: t,
        };
        assert_eq!(s.record(&[ev(a, 900)]).unwrap().revoked, 0);
        let r = s.record(&[ev(a, 1200)]).unwrap();
        assert_eq!((r.revoked, r.revoked_bytes), (1, 10));
        let t = s.tombstones().unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].object.clone(), t[0].size, t[0].delete_after),
            (b.to_string(), 20, 2000)
        );
        assert_eq!(
            s.untombstone(&[b]).unwrap(),
            Counted {
                objects: 1,
                bytes: 20
            }
        );
        assert!(s.tombstones().unwrap().is_empty());
    }

    #[test]
    fn an_aborted_run_revokes_only_its_own_tombstones_and_old_stores_gain_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE tombstones (hash TEXT PRIMARY KEY, size INTEGER NOT NULL,
                     created INTEGER NOT NULL, delete_after INTEGER NOT NULL);
                 INSERT INTO tombstones VALUES ('00', 1, 1, 2);",
            )
            .unwrap();
        }
        let mut s = AccessStore::open(&path, 0).unwrap();
        assert_eq!(s.tombstones().unwrap()[0].run, None);
        let (a, b) = (
            ObjectId::new(Digest20::of(b"a"), Suffix::None),
            ObjectId::new(Digest20::of(b"b"), Suffix::None),
        );
        s.tombstone(&[(a, 1)], 10, 20, Some("first")).unwrap();
        s.tombstone(&[(a, 1), (b, 2)], 11, 21, Some("second"))
            .unwrap();
        assert_eq!(
            s.revoke_run("second").unwrap(),
            Counted {
                objects: 1,
                bytes: 2
            }
        );
        let left: Vec<(String, Option<String>)> = s
            .tombstones()
            .unwrap()
            .into_iter()
            .map(|t| (t.object, t.run))
            .collect();
        assert_eq!(
            left,
            vec![
                ("00".to_string(), None),
                (a.to_string(), Some("first".into()))
            ]
        );
    }

    #[test]
    fn tail_follows_rotation_and_waits_for_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let id = ObjectId::new(Digest20::of(b"y"), Suffix::None);
        let hex = id.digest.hex();
        let line = |repo: &str| {
            format!(
                "127.0.0.1 - - [10/Oct/2000:13:55:36 -0700] \"GET /cvmfs/{repo}/data/{}/{} HTTP/1.1\" 200 12\n",
                &hex[..2],
                &hex[2..]
            )
        };
        std::fs::write(&log, line("a.org")).unwrap(); // before the tail: not replayed
        let fmt = LogFormat {
            regex: regex::Regex::new(
                r#"\[(?P<time>[^\]]+)\] "GET /cvmfs/(?P<repo>[^/]+)(?P<hash>/data/\S+) "#,
            )
            .unwrap(),
            hash_group: "hash".into(),
            repo_group: Some("repo".into()),
            time_group: "time".into(),
            time_format: TimeFormat::Clf,
        };
        let mut t = LogTail::new(&log);
        assert_eq!(t.poll(&fmt, "a.org").unwrap().0.len(), 0);
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        use std::io::Write;
        f.write_all(line("a.org").as_bytes()).unwrap();
        f.write_all(line("b.org").as_bytes()).unwrap();
        f.write_all(b"garbage line\n").unwrap();
        f.write_all(b"partial").unwrap();
        let (ev, lines, skipped) = t.poll(&fmt, "a.org").unwrap();
        assert_eq!((ev.len(), lines, skipped), (1, 3, 2));
        assert_eq!(ev[0].object, Some(id));
        assert_eq!(ev[0].time, 971211336);
        // Rotation: renamed away, a new file appears.
        std::fs::rename(&log, dir.path().join("access.log.1")).unwrap();
        std::fs::write(&log, line("a.org")).unwrap();
        let (ev, lines, _) = t.poll(&fmt, "a.org").unwrap();
        assert_eq!((ev.len(), lines), (1, 1));
        // Truncation (copytruncate).
        std::fs::write(&log, b"").unwrap();
        assert_eq!(t.poll(&fmt, "a.org").unwrap().1, 0);
        std::fs::write(&log, line("a.org")).unwrap();
        assert_eq!(t.poll(&fmt, "a.org").unwrap().0.len(), 1);
    }
}
