//! The spool: job directories on disk and the write-ahead journal of job records.
//!
//! Layout under the spool root:
//! - `journal.wal` — one JSON job record per line, appended and fsynced before the transition it
//!   describes is acted on. The last record of a job is its current state.
//! - `jobs/<id>/job.json` — the job's current record (rewritten atomically after each journal
//!   append), so an operator can see every job's state with `cat`.
//! - `jobs/<id>/payload.tar` — the submitted tar (deleted after the retention period once the
//!   job is terminal); `jobs/<id>/changeset.json` — the processed change set, so a restart after
//!   processing does not unpack the tar again.
//! - `incoming/` — uploads in progress; anything left there at start-up was never accepted and
//!   is removed.
//!
//! On open the journal is replayed (a torn last line from a crash is ignored) and compacted to
//! one record per job; a running daemon compacts it again whenever it has doubled (and grown by
//! at least [`COMPACT_MIN`]) since.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::directio::DirectAppender;
use crate::intake::ChangeSet;
use crate::jobs::JobRecord;

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("spool {path}: {msg}")]
    Corrupt { path: String, msg: String },
    #[error("spool {path} has format {found}, newer than this binary's {supported}: run the newer binary, or restore a spool this version wrote")]
    TooNew {
        path: String,
        found: u32,
        supported: u32,
    },
}

/// The spool's on-disk format, kept in `<spool>/FORMAT`. History:
/// 1 — spools written before the file existed (journal, `jobs/<id>/{job.json,payload.tar,
///     changeset.json}`, `incoming/`);
/// 2 — adds `FORMAT` and the per-endpoint acknowledgement logs `jobs/<id>/acks-*.log`.
/// 3 — change sets leave out the entry fields that hold their usual value (see
///     [`crate::catalog::Entry`]); a binary of format 2 cannot read them, format 2's still read.
/// Older formats are migrated on open; a newer one is refused (no silent downgrade).
pub const SPOOL_FORMAT: u32 = 3;

/// Reads the spool's format, migrating older ones to [`SPOOL_FORMAT`]; returns the format found.
fn migrate(root: &Path) -> Result<u32, SpoolError> {
    let p = root.join("FORMAT");
    let found = match fs::read_to_string(&p) {
        Ok(t) => t.trim().parse::<u32>().map_err(|_| SpoolError::Corrupt {
            path: p.display().to_string(),
            msg: format!("'{}' is not a format number", t.trim()),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if root.join("journal.wal").exists() {
                1
            } else {
                SPOOL_FORMAT
            }
        }
        Err(e) => return Err(ioe(&p)(e)),
    };
    if found > SPOOL_FORMAT {
        return Err(SpoolError::TooNew {
            path: root.display().to_string(),
            found,
            supported: SPOOL_FORMAT,
        });
    }
    // 1 -> 2 -> 3: each layout is a subset of the next's, and the change sets of 1 and 2 read
    // as 3's; only the stamp is new.
    if found < SPOOL_FORMAT || !p.exists() {
        write_atomic(&p, format!("{SPOOL_FORMAT}\n").as_bytes())?;
    }
    Ok(found)
}

fn ioe(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a saved change set (`jobs/<id>/changeset.json`, as [`Spool::save_changeset`] wrote
/// it); its file's bytes are dropped once parsed (they are as large as the change set).
pub fn read_changeset(path: &Path) -> Result<ChangeSet, SpoolError> {
    let b = fs::read(path).map_err(ioe(path))?;
    serde_json::from_slice(&b).map_err(|e| SpoolError::Corrupt {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}

/// Writes a file durably: temp name in the same directory, write, fsync, rename, fsync dir — so
/// a crash leaves either the old or the new content, never a torn file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), SpoolError> {
    write_atomic_with(path, |f| f.write_all(data))
}

/// Refreshes `job.json` in the job directory `dir` (if it exists) to show `rec`: written under a
/// temporary name and renamed over the old one, but not synced. The file is the operator's
/// view of the journal, never read back to recover a job; a crash may leave it older than the
/// journal (or empty), and [`Spool::open`] rewrites every job's from the replayed journal
/// before anything reads it. Syncing it (file and directory) cost every state change of a job
/// one to seven milliseconds here, on the path of each publish.
fn show_record(dir: &Path, rec: &JobRecord) -> Result<(), SpoolError> {
    if !dir.is_dir() {
        return Ok(());
    }
    let path = dir.join("job.json");
    let tmp = temp_beside(&path);
    let pretty = serde_json::to_vec_pretty(rec).unwrap_or_default();
    fs::write(&tmp, &pretty).map_err(ioe(&tmp))?;
    fs::rename(&tmp, &path).map_err(ioe(&path))
}

/// The temporary name `path`'s new content is written under before it is renamed into place:
/// `.<name>.tmp` in the same directory.
fn temp_beside(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ))
}

/// [`write_atomic`] with the content written by `fill`.
fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), SpoolError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_beside(path);
    let mut f = File::create(&tmp).map_err(ioe(&tmp))?;
    fill(&mut f).and_then(|_| f.sync_all()).map_err(ioe(&tmp))?;
    fs::rename(&tmp, path).map_err(ioe(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ioe(dir))?;
    Ok(())
}

/// [`write_atomic`] of what `fill` writes, around the page cache where the filesystem lets it
/// ([`DirectAppender`]): a change set is read again only after a restart,
/// and copying it into fresh page-cache pages costs more than its direct write and the fsync
/// together (11 MB, the Python tree's 46,000 entries, here: 40–47 ms buffered plus 7–8 ms
/// fsync, against 10–13 ms direct) — time a publish waits for before its commit.
fn write_around_cache(
    path: &Path,
    fill: impl FnOnce(&mut DirectAppender) -> io::Result<()>,
) -> Result<(), SpoolError> {
    write_atomic_with(path, |f| {
        let mut out = DirectAppender::new(f.try_clone()?, true);
        fill(&mut out)?;
        out.finish().map(drop)
    })
}

/// A change set serialized as [`Spool::save_changeset`] stores it, ahead of its save, by a
/// thread that has a core to spare meanwhile (one waiting for the change set's catalogs to be
/// compressed): a change set of 46,000 entries takes about 45 ms to serialize.
pub struct SerializedChangeset(Vec<u8>);

impl SerializedChangeset {
    pub fn of(cs: &ChangeSet) -> Option<SerializedChangeset> {
        // About 240 bytes a node (the Python tree's 46,000: 11 MB): one buffer of about the
        // right size instead of a doubling one's copies and page faults (32 MB touched).
        let mut out = Vec::with_capacity(cs.nodes.len().saturating_mul(256).saturating_add(4096));
        serde_json::to_writer(&mut out, cs).ok()?;
        Some(SerializedChangeset(out))
    }
}

impl std::fmt::Debug for SerializedChangeset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SerializedChangeset({} bytes)", self.0.len())
    }
}

/// The spool directory and its journal.
pub struct Spool {
    root: PathBuf,
    wal: File,
    /// An append failed: it may have left part of a line at the end of the journal, so the
    /// next record starts on a line of its own (the fragment is skipped at replay, and must
    /// not swallow an acknowledged record).
    torn: bool,
    /// A compaction replaced the journal but the directory's fsync failed: no record is
    /// acknowledged until the replacement is durable (a crash could bring the old file back).
    unsynced_rename: bool,
    /// Bytes in the journal, and the size at which it is compacted next.
    size: u64,
    compact_at: u64,
    compact_min: u64,
}

/// The journal is compacted (to one line per job) once it has grown by this much and to twice
/// its size after the last compaction: a long-running daemon's journal stays within a few
/// times the size of its jobs' current records, at an amortised cost of a few bytes rewritten
/// per byte appended, instead of growing with every transition until the next start.
pub const COMPACT_MIN: u64 = 8 << 20;

fn compact_threshold(size: u64, min: u64) -> u64 {
    size.saturating_mul(2).max(size + min)
}

/// Every job's latest record in the journal at `wal_path` (none if there is no journal).
fn replay(wal_path: &Path) -> Result<BTreeMap<String, JobRecord>, SpoolError> {
    let mut jobs: BTreeMap<String, JobRecord> = BTreeMap::new();
    if !wal_path.exists() {
        return Ok(jobs);
    }
    let f = File::open(wal_path).map_err(ioe(wal_path))?;
    for line in BufReader::new(f).split(b'\n') {
        let line = line.map_err(ioe(wal_path))?;
        if line.is_empty() {
            continue;
        }
        // A torn line (crash or failed write mid-append) was never acknowledged: skip it.
        if let Ok(rec) = serde_json::from_slice::<JobRecord>(&line) {
            jobs.insert(rec.id.clone(), rec);
        }
    }
    Ok(jobs)
}

/// Rewrites the journal as one line per job, atomically (a crash leaves the old journal or the
/// new one, each with every job's latest record); returns the new one opened for appending, its
/// size, and whether the rename was made durable (the directory's fsync). An error means the old
/// journal is still in place; once the rename happened, the new journal is returned whatever
/// follows, so that nothing is appended to the replaced file.
fn compact(
    wal_path: &Path,
    jobs: &BTreeMap<String, JobRecord>,
) -> Result<(File, u64, bool), SpoolError> {
    let mut compacted = Vec::new();
    for rec in jobs.values() {
        compacted.extend(serde_json::to_vec(rec).map_err(|e| SpoolError::Corrupt {
            path: wal_path.display().to_string(),
            msg: e.to_string(),
        })?);
        compacted.push(b'\n');
    }
    let dir = wal_path.parent().unwrap_or(Path::new("."));
    let tmp = temp_beside(wal_path);
    let mut f = File::create(&tmp).map_err(ioe(&tmp))?;
    f.write_all(&compacted)
        .and_then(|_| f.sync_all())
        .map_err(ioe(&tmp))?;
    // Opened before the rename: the handle follows the file.
    let wal = OpenOptions::new()
        .append(true)
        .open(&tmp)
        .map_err(ioe(&tmp))?;
    fs::rename(&tmp, wal_path).map_err(ioe(wal_path))?;
    let synced = File::open(dir).and_then(|d| d.sync_all()).is_ok();
    Ok((wal, compacted.len() as u64, synced))
}

impl Spool {
    /// Opens (creating if needed) the spool at `root`, replays the journal and returns every
    /// known job's latest record.
    pub fn open(root: &Path) -> Result<(Spool, BTreeMap<String, JobRecord>), SpoolError> {
        for d in [root.to_path_buf(), root.join("jobs"), root.join("incoming")] {
            fs::create_dir_all(&d).map_err(ioe(&d))?;
        }
        migrate(root)?;
        let wal_path = root.join("journal.wal");
        let jobs = replay(&wal_path)?;
        // Uploads that never became jobs.
        let incoming = root.join("incoming");
        if let Ok(rd) = fs::read_dir(&incoming) {
            for e in rd.flatten() {
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        }
        // Job directories without a journal record were never accepted.
        if let Ok(rd) = fs::read_dir(root.join("jobs")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !jobs.contains_key(&name) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let (wal, size, synced) = compact(&wal_path, &jobs)?;
        // `job.json` is not synced as jobs change: after a crash it may be behind the journal.
        for (id, rec) in &jobs {
            show_record(&root.join("jobs").join(id), rec)?;
        }
        if !synced {
            File::open(root)
                .and_then(|d| d.sync_all())
                .map_err(ioe(root))?;
        }
        Ok((
            Spool {
                root: root.to_path_buf(),
                wal,
                torn: false,
                unsynced_rename: false,
                size,
                compact_at: compact_threshold(size, COMPACT_MIN),
                compact_min: COMPACT_MIN,
            },
            jobs,
        ))
    }

    /// Compacts the journal if it has grown enough since it last was (see [`COMPACT_MIN`]).
    /// Trouble leaves the journal as it is (every record in it still counts) and is tried again
    /// after as much growth once more.
    fn maybe_compact(&mut self) {
        if self.size < self.compact_at {
            return;
        }
        let wal_path = self.root.join("journal.wal");
        match replay(&wal_path).and_then(|jobs| compact(&wal_path, &jobs)) {
            Ok((wal, size, synced)) => {
                self.wal = wal;
                self.size = size;
                self.torn = false;
                self.unsynced_rename = !synced;
                self.compact_at = compact_threshold(size, self.compact_min);
            }
            Err(_) => self.compact_at = self.size + self.compact_min,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.root.join("jobs").join(id)
    }

    pub fn tar_path(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("payload.tar")
    }

    pub fn changeset_path(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("changeset.json")
    }

    /// A fresh path for an upload in progress.
    pub fn incoming_path(&self, id: &str) -> PathBuf {
        self.root.join("incoming").join(format!("{id}.tar"))
    }

    /// Accepts an uploaded tar: moves it into the job directory (durably) and journals the
    /// first record. Once this returns, the job is accepted and will not be lost.
    pub fn accept(&mut self, rec: &JobRecord, upload: &Path) -> Result<(), SpoolError> {
        File::open(upload)
            .and_then(|f| f.sync_all())
            .map_err(ioe(upload))?;
        self.file_and_record(rec, upload)
    }

    /// Accepts an upload that was processed while it arrived: its change set is made durable
    /// before the record, so the job never needs its tar again and the tar's own fsync need not
    /// be waited for (it is moved into the job directory for inspection, like any tar). `rec`
    /// is in `processing`: a restart continues from the change set (`serialized`, when it was
    /// serialized ahead).
    pub fn accept_processed(
        &mut self,
        rec: &JobRecord,
        upload: &Path,
        cs: &ChangeSet,
        serialized: Option<&SerializedChangeset>,
    ) -> Result<(), SpoolError> {
        let dir = self.job_dir(&rec.id);
        fs::create_dir_all(&dir).map_err(ioe(&dir))?;
        self.save_changeset_ahead(&rec.id, cs, serialized)?;
        self.file_and_record(rec, upload)
    }

    /// Moves `upload` into the job's directory, makes the move durable and journals `rec`.
    fn file_and_record(&mut self, rec: &JobRecord, upload: &Path) -> Result<(), SpoolError> {
        let dir = self.job_dir(&rec.id);
        fs::create_dir_all(&dir).map_err(ioe(&dir))?;
        let dest = self.tar_path(&rec.id);
        fs::rename(upload, &dest).map_err(ioe(&dest))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(ioe(&dir))?;
        self.record(rec)
    }

    /// Appends `rec` to the journal (fsynced) and refreshes `job.json`.
    pub fn record(&mut self, rec: &JobRecord) -> Result<(), SpoolError> {
        let wal_path = self.root.join("journal.wal");
        let mut line = serde_json::to_vec(rec).map_err(|e| SpoolError::Corrupt {
            path: wal_path.display().to_string(),
            msg: e.to_string(),
        })?;
        line.push(b'\n');
        if self.torn {
            line.insert(0, b'\n');
        }
        if let Err(e) = self.wal.write_all(&line) {
            self.torn = true;
            // Part of it may be there.
            self.size += line.len() as u64;
            return Err(ioe(&wal_path)(e));
        }
        self.torn = false;
        self.size += line.len() as u64;
        self.wal.sync_data().map_err(ioe(&wal_path))?;
        if self.unsynced_rename {
            File::open(&self.root)
                .and_then(|d| d.sync_all())
                .map_err(ioe(&self.root))?;
            self.unsynced_rename = false;
        }
        self.maybe_compact();
        show_record(&self.job_dir(&rec.id), rec)
    }

    /// Stores a job's processed change set durably.
    pub fn save_changeset(&self, id: &str, cs: &ChangeSet) -> Result<(), SpoolError> {
        let p = self.changeset_path(id);
        // Streamed to the file: a change set of many entries is not held twice in memory.
        write_around_cache(&p, |out| {
            let mut w = io::BufWriter::with_capacity(64 << 10, out);
            serde_json::to_writer(&mut w, cs).map_err(io::Error::other)?;
            w.flush()
        })
    }

    /// [`save_changeset`](Self::save_changeset), from `ahead` when the change set was
    /// serialized ahead: the same file, without the serializing.
    pub fn save_changeset_ahead(
        &self,
        id: &str,
        cs: &ChangeSet,
        ahead: Option<&SerializedChangeset>,
    ) -> Result<(), SpoolError> {
        match ahead {
            Some(a) => write_around_cache(&self.changeset_path(id), |out| out.write_all(&a.0)),
            None => self.save_changeset(id, cs),
        }
    }

    /// Loads a job's change set, if it was saved.
    pub fn load_changeset(&self, id: &str) -> Result<Option<ChangeSet>, SpoolError> {
        match read_changeset(&self.changeset_path(id)) {
            Err(SpoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            r => r.map(Some),
        }
    }

    /// Whether a job's change set was saved (usable without an open spool).
    pub fn open_changeset_exists(root: &Path, id: &str) -> bool {
        root.join("jobs").join(id).join("changeset.json").is_file()
    }

    /// Deletes the tar, change set and distribution acknowledgements of a terminal job (its
    /// record stays).
    pub fn delete_payload(&self, id: &str) {
        let _ = fs::remove_file(self.tar_path(id));
        let _ = fs::remove_file(self.changeset_path(id));
        self.delete_acks(id);
    }

    /// Deletes a job's distribution acknowledgement logs (done once the job is terminal).
    pub fn delete_acks(&self, id: &str) {
        if let Ok(rd) = fs::read_dir(self.job_dir(id)) {
            for e in rd.flatten() {
                let n = e.file_name();
                let n = n.to_string_lossy();
                if n.starts_with("acks-") && n.ends_with(".log") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// The append-only record of the objects one Stratum 1 endpoint acknowledged for one job:
/// `jobs/<id>/acks-<endpoint key>.log`, one object name per line, appended as acknowledgements
/// arrive and synced every [`AckLog::SYNC_EVERY`] lines and on drop. After a publisher restart
/// the distribution skips what is listed here. Losing an unsynced tail (or a torn last line) to
/// a crash only means those objects are asked about again; the receiver's inventory answers.
pub struct AckLog {
    path: PathBuf,
    file: std::sync::Mutex<(File, usize)>,
}

impl AckLog {
    /// Lines between two syncs.
    pub const SYNC_EVERY: usize = 256;

    /// Where the acknowledgements of `endpoint` for the job in `job_dir` are kept.
    pub fn path(job_dir: &Path, endpoint: &str) -> PathBuf {
        use sha1::Digest;
        let h = sha1::Sha1::digest(endpoint.trim_end_matches('/').as_bytes());
        job_dir.join(format!("acks-{}.log", &hex::encode(h)[..16]))
    }

    /// Opens (creating) the log and returns it with the objects it already lists.
    pub fn open(
        path: &Path,
    ) -> Result<(AckLog, std::collections::HashSet<crate::hash::ObjectId>), SpoolError> {
        let mut seen = std::collections::HashSet::new();
        let mut torn = false;
        match fs::read(path) {
            Ok(data) => {
                torn = !data.is_empty() && !data.ends_with(b"\n");
                for line in data.split(|b| *b == b'\n') {
                    // A torn last line does not parse and is ignored.
                    if let Some(id) = std::str::from_utf8(line)
                        .ok()
                        .and_then(|l| crate::hash::ObjectId::parse(l.trim()).ok())
                    {
                        seen.insert(id);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ioe(path)(e)),
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(ioe(path))?;
        if torn {
            // End the torn line so the next name starts on its own.
            file.write_all(b"\n").map_err(ioe(path))?;
        }
        Ok((
            AckLog {
                path: path.to_path_buf(),
                file: std::sync::Mutex::new((file, 0)),
            },
            seen,
        ))
    }

    /// Records acknowledged objects (one `write` per call, so lines of concurrent callers never
    /// interleave).
    pub fn append(&self, ids: &[crate::hash::ObjectId]) -> Result<(), SpoolError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(ids.len() * 42);
        for id in ids {
            text.push_str(&id.to_string());
            text.push('\n');
        }
        let mut g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        g.0.write_all(text.as_bytes()).map_err(ioe(&self.path))?;
        g.1 += ids.len();
        if g.1 >= Self::SYNC_EVERY {
            g.0.sync_data().map_err(ioe(&self.path))?;
            g.1 = 0;
        }
        Ok(())
    }
}

impl Drop for AckLog {
    fn drop(&mut self) {
        let g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let _ = g.0.sync_data();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobState;

    #[test]
    fn the_journal_is_compacted_while_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.compact_min = 16 << 10;
        spool.compact_at = compact_threshold(spool.size, spool.compact_min);
        let wal = dir.path().join("journal.wal");
        // One job that ended long ago, then many transitions of a few others.
        let mut old = JobRecord::new("old".into(), "r".into(), "/old".into(), 1);
        old.transition(JobState::Published, 2);
        spool.record(&old).unwrap();
        let one = serde_json::to_vec(&old).unwrap().len() as u64 + 1;
        let mut largest = 0;
        for i in 0..2000 {
            let mut rec = JobRecord::new(format!("j{}", i % 4), "r".into(), "/p".into(), 1);
            rec.updated = i;
            spool.record(&rec).unwrap();
            let size = fs::metadata(&wal).unwrap().len();
            assert_eq!(size, spool.size);
            largest = largest.max(size);
        }
        // Without compaction it would hold all 2,001 lines; it stays within twice the
        // threshold (five current records are far below it).
        assert!(
            2001 * one > 10 * (32 << 10),
            "records too small for the test"
        );
        assert!(
            largest <= 2 * (16 << 10) + 2 * one,
            "journal grew to {largest}"
        );
        // Every job's latest record is there, the old one too, after a restart.
        drop(spool);
        let (_, jobs) = Spool::open(dir.path()).unwrap();
        assert_eq!(jobs.len(), 5);
        assert_eq!(jobs["old"].state, JobState::Published);
        for (k, last) in [("j0", 1996), ("j1", 1997), ("j2", 1998), ("j3", 1999)] {
            assert_eq!(jobs[k].updated, last, "{k}");
        }
    }

    #[test]
    fn format_is_stamped_migrated_and_never_downgraded() {
        let dir = tempfile::tempdir().unwrap();
        // A fresh spool is stamped.
        Spool::open(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
            format!("{SPOOL_FORMAT}\n")
        );
        // A format-1 spool (journal, no stamp) keeps its jobs and is stamped.
        let old = tempfile::tempdir().unwrap();
        let rec = JobRecord::new("j1".into(), "r".into(), "/p".into(), 1);
        fs::create_dir_all(old.path().join("jobs/j1")).unwrap();
        fs::write(
            old.path().join("journal.wal"),
            format!("{}\n", serde_json::to_string(&rec).unwrap()),
        )
        .unwrap();
        assert_eq!(migrate(old.path()).unwrap(), 1);
        let (_, jobs) = Spool::open(old.path()).unwrap();
        assert!(jobs.contains_key("j1"));
        assert_eq!(
            fs::read_to_string(old.path().join("FORMAT"))
                .unwrap()
                .trim(),
            SPOOL_FORMAT.to_string()
        );
        // A newer spool is refused, untouched.
        fs::write(dir.path().join("FORMAT"), "99\n").unwrap();
        let e = Spool::open(dir.path()).err().unwrap();
        assert!(
            e.to_string().contains(&format!(
                "format 99, newer than this binary's {SPOOL_FORMAT}"
            )),
            "{e}"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
            "99\n"
        );
    }

    #[test]
    fn ack_log_lists_what_was_appended_and_ignores_a_torn_line() {
        use crate::hash::{ObjectId, Suffix};
        let dir = tempfile::tempdir().unwrap();
        let p = AckLog::path(dir.path(), "https://s1.example.org:9100/cvmfs/");
        assert_eq!(
            p,
            AckLog::path(dir.path(), "https://s1.example.org:9100/cvmfs")
        );
        assert_ne!(
            p,
            AckLog::path(dir.path(), "https://s2.example.org:9100/cvmfs")
        );
        let ids: Vec<ObjectId> = (0u8..5)
            .map(|i| ObjectId::new(crate::hash::Digest20([i; 20]), Suffix::None))
            .collect();
        {
            let (log, seen) = AckLog::open(&p).unwrap();
            assert!(seen.is_empty());
            log.append(&ids[..2]).unwrap();
            log.append(&ids[2..3]).unwrap();
        }
        // A crash in the middle of a line.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"0303030303").unwrap();
        drop(f);
        let (log, seen) = AckLog::open(&p).unwrap();
        assert_eq!(seen.len(), 3);
        assert!(ids[..3].iter().all(|i| seen.contains(i)));
        log.append(&ids[3..]).unwrap();
        drop(log);
        let (_, seen) = AckLog::open(&p).unwrap();
        assert_eq!(seen.len(), 5);
        assert!(ids.iter().all(|i| seen.contains(i)));
    }

    #[test]
    fn job_json_behind_the_journal_after_a_crash_is_rewritten_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sp, _) = Spool::open(dir.path()).unwrap();
        let mut recs = Vec::new();
        for id in ["j1", "j2"] {
            let up = sp.incoming_path(id);
            fs::write(&up, b"tar").unwrap();
            let mut rec = JobRecord::new(id.into(), "r".into(), "/p".into(), 1);
            sp.accept(&rec, &up).unwrap();
            rec.transition(JobState::Processing, 2);
            sp.record(&rec).unwrap();
            recs.push(rec);
        }
        recs[0].transition(JobState::Published, 3);
        sp.record(&recs[0]).unwrap();
        let shown = |id: &str| -> Option<JobRecord> {
            serde_json::from_slice(
                &fs::read(dir.path().join("jobs").join(id).join("job.json")).ok()?,
            )
            .ok()
        };
        assert_eq!(shown("j1").unwrap().state, JobState::Published);
        drop(sp);
        // What an unsynced rewrite may leave after a crash: an older record, an empty file.
        let older =
            serde_json::to_vec_pretty(&JobRecord::new("j1".into(), "r".into(), "/p".into(), 1))
                .unwrap();
        fs::write(dir.path().join("jobs/j1/job.json"), older).unwrap();
        fs::write(dir.path().join("jobs/j2/job.json"), b"").unwrap();
        assert_eq!(shown("j1").unwrap().state, JobState::Queued);
        assert!(shown("j2").is_none());

        let (_sp, jobs) = Spool::open(dir.path()).unwrap();
        assert_eq!(jobs["j1"].state, JobState::Published);
        assert_eq!(shown("j1").unwrap(), jobs["j1"]);
        assert_eq!(shown("j2").unwrap(), jobs["j2"]);
        assert_eq!(shown("j2").unwrap().state, JobState::Processing);
        assert!(!dir.path().join("jobs/j1/.job.json.tmp").exists());
    }

    #[test]
    fn journal_replays_latest_record_and_survives_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sp, jobs) = Spool::open(dir.path()).unwrap();
        assert!(jobs.is_empty());
        let up = sp.incoming_path("j1");
        fs::write(&up, b"tar").unwrap();
        let mut rec = JobRecord::new("j1".into(), "r".into(), "/p".into(), 1);
        sp.accept(&rec, &up).unwrap();
        assert_eq!(fs::read(sp.tar_path("j1")).unwrap(), b"tar");
        rec.transition(JobState::Processing, 2);
        sp.record(&rec).unwrap();
        let job_json: JobRecord =
            serde_json::from_slice(&fs::read(sp.job_dir("j1").join("job.json")).unwrap()).unwrap();
        assert_eq!(job_json.state, JobState::Processing);
        // A half-written record, an orphan upload and an unaccepted job dir.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("journal.wal"))
            .unwrap();
        f.write_all(b"{\"id\":\"j1\",\"sta").unwrap();
        fs::write(dir.path().join("incoming/x.tar"), b"partial").unwrap();
        fs::create_dir_all(dir.path().join("jobs/ghost")).unwrap();
        drop(sp);
        let (_sp, jobs) = Spool::open(dir.path()).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs["j1"].state, JobState::Processing);
        assert!(!dir.path().join("incoming/x.tar").exists());
        assert!(!dir.path().join("jobs/ghost").exists());
        let wal = fs::read_to_string(dir.path().join("journal.wal")).unwrap();
        assert_eq!(wal.lines().count(), 1);
    }

    /// A failed append (a full disk, say) may leave part of a line behind; the next record,
    /// acknowledged, must not be glued to it and lost at the next start.
    #[test]
    fn a_record_after_a_failed_append_survives_the_fragment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sp, _) = Spool::open(dir.path()).unwrap();
        let accept = |sp: &mut Spool, id: &str| {
            let up = sp.incoming_path(id);
            fs::write(&up, b"tar").unwrap();
            let rec = JobRecord::new(id.into(), "r".into(), "/p".into(), 1);
            sp.accept(&rec, &up)
        };
        accept(&mut sp, "a").unwrap();
        // The append fails (here: a descriptor that cannot write) after leaving a fragment.
        let wal_path = dir.path().join("journal.wal");
        let writable = std::mem::replace(&mut sp.wal, File::open(&wal_path).unwrap());
        let mut rec = JobRecord::new("a".into(), "r".into(), "/p".into(), 1);
        rec.transition(JobState::Processing, 2);
        assert!(sp.record(&rec).is_err());
        OpenOptions::new()
            .append(true)
            .open(&wal_path)
            .unwrap()
            .write_all(b"{\"id\":\"a\",\"sta")
            .unwrap();
        sp.wal = writable;
        accept(&mut sp, "b").unwrap();
        drop(sp);
        let (_sp, jobs) = Spool::open(dir.path()).unwrap();
        assert_eq!(jobs.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(jobs["a"].state, JobState::Queued);
        assert!(dir.path().join("jobs/b").is_dir());
    }

    #[test]
    fn change_sets_leave_out_usual_values_and_read_back_whole() {
        use crate::catalog::{Entry, Xattrs};
        use crate::hash::{Digest20, ObjectId, Suffix};
        use crate::intake::Node;
        use crate::object::FileChunk;
        let plain = Entry {
            name: "a.py".into(),
            mode: 0o100644,
            size: 5,
            mtime: 1700000000,
            mtimens: None,
            uid: 0,
            gid: 0,
            linkcount: 1,
            hardlink_group: 0,
            hash: Some(Digest20([0xab; 20])),
            flags: 0,
            symlink: String::new(),
            xattrs: None,
            chunks: Vec::new(),
        };
        let mut attrs = BTreeMap::new();
        attrs.insert(b"user.k".to_vec(), b"v".to_vec());
        let every = Entry {
            name: "b".into(),
            mtimens: Some(7),
            uid: 1000,
            gid: 100,
            linkcount: 2,
            hardlink_group: 3,
            hash: None,
            flags: 4,
            symlink: "t".into(),
            xattrs: Some(Xattrs(attrs)),
            chunks: vec![FileChunk {
                offset: 0,
                size: 5,
                id: ObjectId::new(Digest20([1; 20]), Suffix::Partial),
            }],
            ..plain.clone()
        };
        let node = |entry: &Entry, hardlink_of: Option<&str>, synthesized| Node {
            entry: entry.clone(),
            hardlink_of: hardlink_of.map(String::from),
            synthesized,
        };
        let mut cs = ChangeSet::default();
        cs.nodes.insert("a.py".into(), node(&plain, None, false));
        cs.nodes
            .insert("b".into(), node(&every, Some("a.py"), true));
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        fs::create_dir_all(dir.path().join("jobs/j")).unwrap();
        fs::create_dir_all(dir.path().join("jobs/k")).unwrap();
        spool.save_changeset("j", &cs).unwrap();
        let text = fs::read_to_string(spool.changeset_path("j")).unwrap();
        // Serialized ahead, it is saved as the same file; so is one of many direct blocks.
        let mut big = cs.clone();
        for i in 0..30_000 {
            big.nodes
                .insert(format!("d/{i}.py"), node(&plain, None, false));
        }
        for c in [&cs, &big] {
            spool.save_changeset("k", c).unwrap();
            let streamed = fs::read(spool.changeset_path("k")).unwrap();
            fs::remove_file(spool.changeset_path("k")).unwrap();
            let ahead = SerializedChangeset::of(c).unwrap();
            spool.save_changeset_ahead("k", c, Some(&ahead)).unwrap();
            assert_eq!(fs::read(spool.changeset_path("k")).unwrap(), streamed);
            assert_eq!(spool.load_changeset("k").unwrap().unwrap().nodes, c.nodes);
        }
        assert!(fs::metadata(spool.changeset_path("k")).unwrap().len() > 2 << 20);
        // The plain file is its name, mode, size, mtime and hash; nothing else.
        let hex = "ab".repeat(20);
        assert!(
            text.contains(&format!(
                r#""a.py":{{"entry":{{"name":"a.py","mode":33188,"size":5,"mtime":1700000000,"hash":"{hex}"}}}}"#
            )),
            "{text}"
        );
        // Every field that differs from its usual value is kept, and both read back whole.
        let back = spool.load_changeset("j").unwrap().unwrap();
        assert_eq!(back.nodes, cs.nodes);
        // A change set written by format 2 (every field spelt out) reads as the same.
        let full = format!(
            r#"{{"root":null,"nodes":{{"a.py":{{"entry":{{"name":"a.py","mode":33188,"size":5,"mtime":1700000000,"mtimens":null,"uid":0,"gid":0,"linkcount":1,"hardlink_group":0,"hash":"{hex}","flags":0,"symlink":"","xattrs":null,"chunks":[]}},"hardlink_of":null,"synthesized":false}}}},"markers":[],"removals":[],"stats":{{"entries":1,"files":1,"bytes_in":5,"new_objects":0,"new_bytes":0,"dedup_hits":1,"skipped_special":0}}}}"#
        );
        fs::write(spool.changeset_path("j"), full).unwrap();
        let old = spool.load_changeset("j").unwrap().unwrap();
        assert_eq!(old.nodes["a.py"], cs.nodes["a.py"]);
        assert_eq!(old.stats.dedup_hits, 1);
        // A hash that is not 40 hex digits is refused, not guessed at.
        fs::write(
            spool.changeset_path("j"),
            r#"{"root":null,"nodes":{"a":{"entry":{"name":"a","mode":33188,"size":0,"mtime":0,"hash":"abc"}}},"markers":[],"removals":[],"stats":{"entries":0,"files":0,"bytes_in":0,"new_objects":0,"new_bytes":0,"dedup_hits":0,"skipped_special":0}}"#,
        )
        .unwrap();
        let e = spool.load_changeset("j").err().unwrap().to_string();
        assert!(e.contains("abc"), "{e}");
    }
}
