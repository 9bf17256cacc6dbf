//! Content-addressed storage: the [`Cas`] trait and the local-filesystem backend.
//!
//! A CAS root is a repository storage directory as CVMFS lays it out (cvmfs-formats.md §1.3):
//! `data/00` … `data/ff` hold objects named `data/XX/<rest><suffix>`, `data/txn` holds objects
//! being written, and root files (`.cvmfspublished`, `.cvmfswhitelist`, …) sit beside `data/`.
//! Objects come in either whole (`put_bytes`) or streamed ([`Cas::begin`], name known only at the
//! end). Nobody can ever observe a partial object: bytes go to a temporary file, are fsynced, and
//! are renamed into place; the directory is fsynced so the rename survives a crash. Putting an
//! object that exists is a no-op that reports [`PutOutcome::AlreadyPresent`] (dedup). Batches of
//! objects ([`Cas::put_many`]) are made durable by filesystem syncs that the batches written at
//! the same time share, before any of them is named.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hash::ObjectId;

/// Errors of a CAS backend.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid root file name '{0}'")]
    BadName(String),
    #[error("this store does not support {0}")]
    Unsupported(&'static str),
}

impl CasError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> CasError {
        CasError::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CasError::Io { source, .. } => !matches!(
                source.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput
            ),
            _ => false,
        }
    }
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    AlreadyPresent,
}

/// An object being streamed into the CAS whose name is known only after the last byte.
pub trait PendingObject: Write + Send {
    /// Makes the written bytes visible under `id` (or drops them if `id` already exists).
    fn commit(self: Box<Self>, id: &ObjectId) -> Result<PutOutcome, CasError>;
}

/// A content-addressed store. Implementations must be safe to share between threads.
pub trait Cas: Send + Sync {
    /// Whether the object exists.
    fn exists(&self, id: &ObjectId) -> Result<bool, CasError>;
    /// Stores a whole object.
    fn put_bytes(&self, id: &ObjectId, data: &[u8]) -> Result<PutOutcome, CasError>;
    /// Starts a streamed put.
    fn begin(&self) -> Result<Box<dyn PendingObject>, CasError>;
    /// Opens an object for reading.
    fn get(&self, id: &ObjectId) -> Result<Box<dyn Read + Send>, CasError>;
    /// Stored size in bytes.
    fn size(&self, id: &ObjectId) -> Result<u64, CasError>;
    /// Every object in the store.
    fn list(&self) -> Result<Vec<ObjectId>, CasError>;
    /// Writes a root file such as `.cvmfspublished` atomically.
    fn put_root_file(&self, name: &str, data: &[u8]) -> Result<(), CasError>;
    /// Reads a root file; `None` if absent.
    fn get_root_file(&self, name: &str) -> Result<Option<Vec<u8>>, CasError>;
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
    /// Stores several whole objects, answering for each in order. The default stores them one
    /// by one; a backend with a cheaper way to make many objects durable at once overrides it.
    fn put_many(&self, items: &[(ObjectId, &[u8])]) -> Vec<Result<PutOutcome, CasError>> {
        items.iter().map(|(id, d)| self.put_bytes(id, d)).collect()
    }
    /// How many objects [`Cas::put_many`] is worth being given at once (1: no gain; the store
    /// pool then keeps every put concurrent instead).
    fn batch_hint(&self) -> usize {
        1
    }
    /// Makes every put that returned so far durable (for backends that batch that work).
    fn flush(&self) -> Result<(), CasError> {
        Ok(())
    }
    /// Deletes an object (garbage collection); an absent object is not an error.
    fn delete(&self, _id: &ObjectId) -> Result<(), CasError> {
        Err(CasError::Unsupported("delete"))
    }
    /// When the object was stored (UNIX seconds).
    fn modified(&self, _id: &ObjectId) -> Result<i64, CasError> {
        Err(CasError::Unsupported("modification times"))
    }
    /// Every object with its size and [`Cas::modified`] time, when the store's listing gives
    /// them at no extra cost (an S3 listing does); `None`: ask per object instead.
    fn list_stat(&self) -> Result<Option<Vec<StoredObject>>, CasError> {
        Ok(None)
    }
}

/// An object as a listing describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredObject {
    pub id: ObjectId,
    pub size: u64,
    /// UNIX seconds.
    pub modified: i64,
}

/// Reads a whole object into memory (metadata objects).
pub fn get_all(cas: &dyn Cas, id: &ObjectId) -> Result<Vec<u8>, CasError> {
    let mut r = cas.get(id)?;
    let mut v = Vec::new();
    r.read_to_end(&mut v).map_err(|e| CasError::Io {
        op: "read",
        path: id.path(),
        source: e,
    })?;
    Ok(v)
}

/// The local filesystem backend.
#[derive(Debug)]
pub struct LocalCas {
    root: PathBuf,
    /// Whether to fsync objects and directories. Always on in production; tests may turn it off.
    durable: bool,
    /// With deferred directory sync, directories that received a rename since the last
    /// [`Cas::flush`] (fsynced there, once each, instead of once per object).
    pending_dirs: Option<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
    shards: Shards,
    /// The filesystem syncs that make batches of new objects durable, shared by concurrent
    /// batches.
    syncs: SyncGroup,
}

/// Filesystem syncs shared by the batches written concurrently (group commit): a batch whose
/// objects are written waits for the next `syncfs` to start after that — run by one of the
/// batches waiting for it, for all of them — instead of running one of its own. One sync
/// runs at a time; store threads that each synced their own batch of a few objects made a
/// cold publish of the benchmark tree issue some ten thousand syncs and fsyncs (each a flush
/// of the disk's cache), most of them overlapping and flushing the same data.
///
/// Syncs also start at most every [`SYNC_INTERVAL`]: the batch that would start one sooner
/// waits for the rest of the interval, and the batches written meanwhile join its sync. Each
/// sync writes back every directory, inode-table and bitmap block dirtied since the last one,
/// and objects of one publish share those blocks; run back to back, each sync covered a
/// batch or two of a few objects and wrote the same blocks again and again.
#[derive(Debug)]
struct SyncGroup {
    /// A descriptor of the storage's root, opened by the first batch (a failed open is tried
    /// again by the next): `syncfs` on it reports each writeback error of the filesystem from
    /// then on, once.
    fs: std::sync::OnceLock<File>,
    state: std::sync::Mutex<SyncState>,
    finished: std::sync::Condvar,
    /// The shortest time from the start of one sync to the start of the next.
    interval: std::time::Duration,
}

/// The shortest time between the starts of two filesystem syncs of one store (see
/// [`SyncGroup`]). Measured on the cold publish of the benchmark tree (42,000 objects) on this
/// 2-core machine, interval against back-to-back syncs: in one series of alternating runs the
/// store threads used 2.9–3.3 CPU-seconds instead of 4.3–4.6 and the publish took 13.6, 13.7
/// and 15.4 s instead of 15.4–15.7 s (10 ms saved less, 50 or 100 ms little more and made the
/// end of a publish wait longer); in another, three pairs, 3.1–3.6 instead of 3.7–4.1
/// CPU-seconds and 12.4–14.6 s (mean 13.4) instead of 13.3–14.9 s (mean 14.1). A batch waits
/// at most this much more for its sync, and only right after another one.
const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(25);

impl Default for SyncGroup {
    fn default() -> Self {
        SyncGroup::with_interval(SYNC_INTERVAL)
    }
}

#[derive(Debug, Default)]
struct SyncState {
    /// Syncs started and finished so far, numbered from 1 (one runs at a time).
    started: u64,
    done: u64,
    running: bool,
    /// Batches waiting for a sync to finish (or to start).
    waiting: usize,
    /// A batch waits for the interval to pass before it starts the next sync.
    lingering: bool,
    /// When the last sync started.
    last_start: Option<std::time::Instant>,
    /// The newest syncs that reported an error, by number (a batch older than an error
    /// forgotten is older than these too).
    failed: std::collections::BTreeMap<u64, String>,
}

/// Sync errors remembered.
const SYNC_ERRORS_KEPT: usize = 64;

impl SyncGroup {
    fn with_interval(interval: std::time::Duration) -> SyncGroup {
        SyncGroup {
            fs: Default::default(),
            state: Default::default(),
            finished: Default::default(),
            interval,
        }
    }

    /// Taken by a batch before its writes: a sync error reported after this may concern them.
    fn ticket(&self, root: &Path) -> io::Result<u64> {
        if self.fs.get().is_none() {
            let _ = self.fs.set(File::open(root)?);
        }
        Ok(self.lock().done)
    }

    /// Whether a sync runs or batches wait for one: a batch of one object then shares it
    /// (else it is cheaper to fsync that one file than to sync the whole filesystem).
    fn busy(&self) -> bool {
        let s = self.lock();
        s.running || s.lingering || s.waiting > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes everything written before this call durable: waits for a sync that starts after
    /// it, running it unless another batch does. Fails if any sync that finished since
    /// `ticket` reported an error (a writeback error is reported once, to whichever sync comes
    /// next, so it may concern this batch's writes even if another batch's sync saw it).
    fn sync(&self, ticket: u64) -> io::Result<()> {
        let Some(fs) = self.fs.get() else {
            return Err(io::Error::other("no ticket taken before the writes"));
        };
        self.sync_by(ticket, &|| sync_filesystem(fs))
    }

    /// [`SyncGroup::sync`] with `run` as the sync.
    fn sync_by(&self, ticket: u64, run: &dyn Fn() -> io::Result<()>) -> io::Result<()> {
        let mut s = self.lock();
        // The running sync (if any) may have started before our writes ended: the next one
        // (which one waiting out the interval is).
        let need = s.started + 1;
        while s.done < need {
            if s.running || s.lingering {
                s.waiting += 1;
                s = self.finished.wait(s).unwrap_or_else(|e| e.into_inner());
                s.waiting -= 1;
                continue;
            }
            if let Some(at) = s.last_start.map(|t| t + self.interval) {
                let now = std::time::Instant::now();
                if now < at {
                    // Batches written meanwhile wait for this sync: it has not started.
                    s.lingering = true;
                    drop(s);
                    std::thread::sleep(at - now);
                    s = self.lock();
                    s.lingering = false;
                }
            }
            s.last_start = Some(std::time::Instant::now());
            s.running = true;
            s.started += 1;
            let n = s.started;
            drop(s);
            let r = run();
            s = self.lock();
            s.running = false;
            s.done = n;
            if let Err(e) = r {
                s.failed.insert(n, e.to_string());
                while s.failed.len() > SYNC_ERRORS_KEPT {
                    s.failed.pop_first();
                }
            }
            self.finished.notify_all();
        }
        match s.failed.range(ticket + 1..=need).next() {
            Some((_, msg)) => Err(io::Error::other(msg.clone())),
            None => Ok(()),
        }
    }
}

/// Open descriptors of the shard directories `data/00`…`data/ff`, each opened on first use
/// (Linux): an object is then found, created and named inside its shard by one path component
/// instead of a walk of the whole storage path for every stat, create and link. A shard that
/// cannot be opened is used by path, and so is one beyond the descriptors all local stores of
/// the process may hold together ([`SHARDS_OPEN`]).
#[derive(Debug)]
struct Shards(#[cfg(target_os = "linux")] Box<[std::sync::OnceLock<Option<File>>]>);

/// Shard directories held open by all local stores of the process: at most a quarter of its
/// open-file limit (256 a store, and a daemon may have many stores; store batches may hold
/// another quarter, see `pipeline::batch_cap`).
#[cfg(target_os = "linux")]
static SHARDS_OPEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(target_os = "linux")]
impl Shards {
    /// Opens the shard directory `dir` if the process may hold one more open.
    fn open(dir: &Path) -> Option<File> {
        use std::sync::atomic::Ordering::Relaxed;
        let cap = open_file_limit() / 4;
        SHARDS_OPEN
            .fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1))
            .ok()?;
        let f = File::open(dir).ok();
        if f.is_none() {
            SHARDS_OPEN.fetch_sub(1, Relaxed);
        }
        f
    }
}

#[cfg(target_os = "linux")]
impl Drop for Shards {
    fn drop(&mut self) {
        let open = self
            .0
            .iter()
            .filter(|s| matches!(s.get(), Some(Some(_))))
            .count();
        SHARDS_OPEN.fetch_sub(open as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The process's limit of open files (soft), unlimited where there is none.
pub fn open_file_limit() -> u64 {
    nofile().map_or(u64::MAX, |l| l.rlim_cur)
}

/// Raises the process's soft limit of open files to its hard one (a store batch holds its new
/// objects open until they are named, and systemd's default soft limit is 1024); returns the
/// limit then in force.
pub fn raise_open_file_limit() -> u64 {
    if let Some(mut l) = nofile().filter(|l| l.rlim_cur < l.rlim_max) {
        l.rlim_cur = l.rlim_max;
        // SAFETY: setrlimit reads a local struct.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) };
    }
    open_file_limit()
}

/// The process's open-file limits, if it has any.
fn nofile() -> Option<libc::rlimit> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a local struct.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0).then_some(l)
}

impl Default for Shards {
    fn default() -> Self {
        Shards(
            #[cfg(target_os = "linux")]
            (0..256).map(|_| std::sync::OnceLock::new()).collect(),
        )
    }
}

/// An object's shard directory (open) and its name inside it.
#[cfg(target_os = "linux")]
struct InShard<'a> {
    dir: &'a File,
    name: std::ffi::CString,
}

#[cfg(target_os = "linux")]
impl InShard<'_> {
    /// `fstatat` of the object: its metadata, `Ok(None)` if absent.
    fn stat(&self) -> io::Result<Option<libc::stat>> {
        use std::os::fd::AsRawFd;
        // SAFETY: `stat` is plain old data that fstatat fills; the name is NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::fstatat(self.dir.as_raw_fd(), self.name.as_ptr(), &mut st, 0) };
        if r == 0 {
            return Ok(Some(st));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::NotFound {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// How an anonymous file is named (Linux).
#[cfg(target_os = "linux")]
#[derive(Clone, Copy, Debug, PartialEq)]
enum Link {
    /// `linkat(fd, "", …, AT_EMPTY_PATH)`: Linux 6.10 and later allow it to the file's opener,
    /// earlier kernels only with `CAP_DAC_READ_SEARCH`.
    EmptyPath,
    /// `linkat` of `/proc/self/fd/N`: allowed everywhere, but the kernel walks procfs for it
    /// (measured here, a store's create-write-link of a new tiny file: 4–38 % more kernel time,
    /// five pairs of 20,000 files).
    ProcFd,
}

/// Whether [`Link::EmptyPath`] was refused here: then every name goes through procfs.
#[cfg(target_os = "linux")]
static EMPTY_PATH_REFUSED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Names the anonymous file `f` `to` (relative to the directory `dir`, or `AT_FDCWD`) unless
/// that name exists (`Ok(false)`): without procfs where the kernel allows it.
#[cfg(target_os = "linux")]
fn link_anonymous(f: &File, dir: libc::c_int, to: &std::ffi::CStr) -> io::Result<bool> {
    use std::sync::atomic::Ordering::Relaxed;
    if !EMPTY_PATH_REFUSED.load(Relaxed) {
        match link_by(Link::EmptyPath, f, dir, to) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) => {
                // Refused (or a real error, which the other way reports again).
                let r = link_by(Link::ProcFd, f, dir, to);
                if r.is_ok() {
                    EMPTY_PATH_REFUSED.store(true, Relaxed);
                }
                return r;
            }
            r => return r,
        }
    }
    link_by(Link::ProcFd, f, dir, to)
}

/// Whether an anonymous file made in `dir` can be named there with `linkat(AT_EMPTY_PATH)`:
/// tried with one (named with a temporary name, then removed at once).
#[cfg(target_os = "linux")]
fn empty_path_allowed(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(f) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    else {
        return false;
    };
    let probe = dir.join(temp_name());
    let Ok(to) = std::ffi::CString::new(probe.as_os_str().as_bytes()) else {
        return false;
    };
    let named = matches!(link_by(Link::EmptyPath, &f, libc::AT_FDCWD, &to), Ok(true));
    if named {
        let _ = fs::remove_file(&probe);
    }
    named
}

#[cfg(target_os = "linux")]
fn link_by(how: Link, f: &File, dir: libc::c_int, to: &std::ffi::CStr) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: every name is NUL-terminated and outlives the call; `f` and `dir` stay open.
    let r = match how {
        Link::EmptyPath => unsafe {
            libc::linkat(
                f.as_raw_fd(),
                c"".as_ptr(),
                dir,
                to.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        },
        Link::ProcFd => {
            let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))
                .map_err(io::Error::other)?;
            unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    dir,
                    to.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            }
        }
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::AlreadyExists {
        return Ok(false);
    }
    Err(e)
}

/// Removes the temporary files (`.tmp.*`) of a local storage at `root` — its top directory,
/// `data/00`…`data/ff` and `data/txn` — last modified before `before` (UNIX seconds): the
/// leftovers of writes that never completed because their process stopped mid-write (a
/// completed write renames its temporary file, a failed one removes it). Best effort: what
/// cannot be listed or removed is left. Returns how many were removed and their bytes. Only for
/// a storage no one writes to right now, or with `before` well in the past.
pub fn sweep_temps(root: &Path, before: i64) -> (usize, u64) {
    let data = root.join("data");
    let dirs = std::iter::once(root.to_path_buf())
        .chain((0..=255u8).map(|i| data.join(format!("{i:02x}"))))
        .chain(std::iter::once(data.join("txn")));
    let (mut n, mut bytes) = (0, 0);
    for d in dirs {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for ent in rd.flatten() {
            if !ent.file_name().to_string_lossy().starts_with(".tmp.") {
                continue;
            }
            let Ok(meta) = ent.metadata() else { continue };
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(i64::MAX, |d| d.as_secs() as i64);
            if meta.is_file() && modified < before && fs::remove_file(ent.path()).is_ok() {
                n += 1;
                bytes += meta.len();
            }
        }
    }
    (n, bytes)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_name() -> String {
    format!(
        ".tmp.{}.{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl LocalCas {
    /// Opens a storage directory, creating `data/00`…`data/ff` and `data/txn` if needed.
    pub fn create(root: &Path) -> Result<LocalCas, CasError> {
        let data = root.join("data");
        for i in 0..=255u8 {
            let d = data.join(format!("{i:02x}"));
            fs::create_dir_all(&d).map_err(|e| CasError::io("mkdir", &d, e))?;
        }
        let txn = data.join("txn");
        fs::create_dir_all(&txn).map_err(|e| CasError::io("mkdir", &txn, e))?;
        Ok(LocalCas {
            root: root.to_path_buf(),
            durable: true,
            pending_dirs: None,
            shards: Shards::default(),
            syncs: SyncGroup::default(),
        })
    }

    /// Opens an existing storage directory without creating anything.
    pub fn open(root: &Path) -> Result<LocalCas, CasError> {
        let data = root.join("data");
        if !data.is_dir() {
            return Err(CasError::io(
                "open",
                &data,
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "not a repository storage (no data/)",
                ),
            ));
        }
        Ok(LocalCas {
            root: root.to_path_buf(),
            durable: true,
            pending_dirs: None,
            shards: Shards::default(),
            syncs: SyncGroup::default(),
        })
    }

    /// Batches directory fsyncs: each object's bytes are still fsynced before its rename (so a
    /// name never points at unwritten data), but the directory entries are made durable together
    /// by [`Cas::flush`], which the caller runs before anything refers to the objects. A bulk
    /// publish then costs one fsync per object instead of two.
    pub fn with_deferred_dir_sync(mut self) -> Self {
        self.pending_dirs = Some(std::sync::Mutex::new(std::collections::HashSet::new()));
        self
    }

    /// Turns fsync off (tests and benchmarks on tmpfs-like scratch space only).
    pub fn without_fsync(mut self) -> Self {
        self.durable = false;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn object_path(&self, id: &ObjectId) -> PathBuf {
        self.root.join(id.path())
    }

    /// The object's open shard directory and its name there, unless the shard cannot be opened.
    #[cfg(target_os = "linux")]
    fn in_shard(&self, id: &ObjectId) -> Option<InShard<'_>> {
        let path = id.path(); // data/xx/name
        let shard = usize::from(id.digest.0[0]);
        let dir = self.shards.0[shard]
            .get_or_init(|| Shards::open(&self.root.join(&path[..7])))
            .as_ref()?;
        let name = std::ffi::CString::new(&path[8..]).ok()?;
        Some(InShard { dir, name })
    }

    /// Durable placement: the temp file is fsynced before the rename so the name never points at
    /// unwritten blocks after a crash, and the directory is fsynced after so the rename itself
    /// survives. `no_clobber` keeps an existing object (objects are immutable).
    fn place(&self, tmp: &Path, dest: &Path, no_clobber: bool) -> Result<PutOutcome, CasError> {
        if !name_temp(tmp, dest, no_clobber).map_err(|e| CasError::io("rename", dest, e))? {
            return Ok(PutOutcome::AlreadyPresent);
        }
        if self.durable {
            if let Some(dir) = dest.parent() {
                match &self.pending_dirs {
                    Some(set) => {
                        set.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(dir.to_path_buf());
                    }
                    None => sync_dir(dir)?,
                }
            }
        }
        Ok(PutOutcome::Stored)
    }

    fn write_temp(&self, dir: &Path, data: &[u8]) -> Result<PathBuf, CasError> {
        write_temp_file(dir, data, self.durable).map_err(|(op, tmp, e)| CasError::io(op, &tmp, e))
    }
}

/// Writes `data` to a new temporary file in `dir`, fsynced when `sync`; nothing is left behind
/// on error (which names the failed step and the file).
fn write_temp_file(
    dir: &Path,
    data: &[u8],
    sync: bool,
) -> Result<PathBuf, (&'static str, PathBuf, io::Error)> {
    let tmp = dir.join(temp_name());
    let mut f = File::create(&tmp).map_err(|e| ("create", tmp.clone(), e))?;
    let res = write_new_object(&mut f, data).and_then(|_| if sync { f.sync_all() } else { Ok(()) });
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(("write", tmp, e));
    }
    Ok(tmp)
}

/// Writes a new object's bytes into `f` (new and empty): a large one around the page cache.
fn write_new_object(f: &mut File, data: &[u8]) -> io::Result<()> {
    if data.len() >= DIRECT_OBJECT_MIN {
        crate::directio::write_new_direct(f, data).map(|_| ())
    } else {
        f.write_all(data)
    }
}

/// Renames `tmp` to `dest`; with `no_clobber`, an existing `dest` is kept and `tmp` dropped
/// (`Ok(false)`). A failed rename drops `tmp` too.
fn name_temp(tmp: &Path, dest: &Path, no_clobber: bool) -> io::Result<bool> {
    if no_clobber && dest.exists() {
        let _ = fs::remove_file(tmp);
        return Ok(false);
    }
    fs::rename(tmp, dest).inspect_err(|_| {
        let _ = fs::remove_file(tmp);
    })?;
    Ok(true)
}

/// New objects at least this large are written around the page cache
/// ([`crate::directio::write_new_direct`]): on the benchmark VM, copying a big file's chunks
/// into fresh page-cache pages cost the store threads about 2.2 CPU-seconds per GiB.
pub const DIRECT_OBJECT_MIN: usize = 256 << 10;

/// Objects from this size on are looked up before a batch writes them, so one that exists
/// is not written again; smaller ones are written and then fail to be named (`linkat` of an
/// existing name), which costs less than looking up every new one: a lookup of a name that
/// does not exist took some 14 % of the store's kernel time for 100,000 new tiny files, and
/// its directory search is done again by the naming anyway.
pub const LOOKUP_BEFORE_WRITE: usize = 16 << 10;

/// A new object's bytes written but not yet named: an anonymous file (`O_TMPFILE`) that a
/// crash simply frees, or, where the filesystem has no anonymous files, a temporary name beside
/// the destination.
enum Unnamed {
    #[cfg(target_os = "linux")]
    Anonymous(File),
    Temp(PathBuf),
}

impl Unnamed {
    /// Writes `data` as a new file of `dir`, which `shard` is open on when given.
    fn write(
        dir: &Path,
        #[cfg(target_os = "linux")] shard: Option<&File>,
        data: &[u8],
    ) -> io::Result<Unnamed> {
        // An anonymous file is named through /proc/self/fd wherever `linkat(AT_EMPTY_PATH)`
        // is refused (before Linux 6.10, without CAP_DAC_READ_SEARCH): without procfs, only
        // where that is allowed (tried once), else a temporary name instead.
        #[cfg(target_os = "linux")]
        static NAMEABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        #[cfg(target_os = "linux")]
        if *NAMEABLE.get_or_init(|| Path::new("/proc/self/fd").is_dir() || empty_path_allowed(dir))
        {
            use std::os::fd::{AsRawFd, FromRawFd};
            use std::os::unix::fs::OpenOptionsExt;
            let opened = match shard {
                Some(d) => {
                    // SAFETY: a plain syscall on an open descriptor and a NUL-terminated name;
                    // a non-negative result is a new descriptor that the File then owns.
                    let fd = unsafe {
                        libc::openat(
                            d.as_raw_fd(),
                            c".".as_ptr(),
                            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o666 as libc::c_uint,
                        )
                    };
                    if fd < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(unsafe { File::from_raw_fd(fd) })
                    }
                }
                None => OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_TMPFILE)
                    .open(dir),
            };
            match opened {
                Ok(mut f) => {
                    write_new_object(&mut f, data)?;
                    return Ok(Unnamed::Anonymous(f));
                }
                // No O_TMPFILE here (old kernel, some filesystems), or no descriptor left to
                // hold one open until the batch is named: a temporary name instead.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            libc::EOPNOTSUPP
                                | libc::EISDIR
                                | libc::EINVAL
                                | libc::EMFILE
                                | libc::ENFILE
                        )
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        write_temp_file(dir, data, false)
            .map(Unnamed::Temp)
            .map_err(|(_, _, e)| e)
    }

    /// Gives the bytes the name `dest` (`at`: the same, inside its open shard) unless it
    /// exists; `Ok(false)` if it did.
    fn name(
        self,
        dest: &Path,
        #[cfg(target_os = "linux")] at: Option<&InShard>,
    ) -> io::Result<bool> {
        match self {
            #[cfg(target_os = "linux")]
            Unnamed::Anonymous(f) => {
                use std::ffi::CString;
                use std::os::fd::AsRawFd;
                use std::os::unix::ffi::OsStrExt;
                let whole;
                let (dir, to) = match at {
                    Some(s) => (s.dir.as_raw_fd(), s.name.as_c_str()),
                    None => {
                        whole =
                            CString::new(dest.as_os_str().as_bytes()).map_err(io::Error::other)?;
                        (libc::AT_FDCWD, whole.as_c_str())
                    }
                };
                link_anonymous(&f, dir, to)
            }
            Unnamed::Temp(tmp) => name_temp(&tmp, dest, true),
        }
    }

    /// Drops unnamed bytes (an anonymous file is freed when closed).
    fn discard(self) {
        if let Unnamed::Temp(tmp) = self {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Flushes every dirty page and inode of the filesystem holding `f` (`syncfs(2)`): one call
/// makes a whole batch of new files durable. Elsewhere than Linux, `f` alone is synced.
fn sync_filesystem(f: &File) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the duration of the call.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        f.sync_all()
    }
}

fn sync_dir(dir: &Path) -> Result<(), CasError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CasError::io("fsync", dir, e))
}

fn valid_root_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('/')
        && name != "."
        && name != ".."
        && !name.starts_with(".tmp.")
}

struct LocalPending {
    file: Option<File>,
    tmp: PathBuf,
    cas_root: PathBuf,
    durable: bool,
}

impl Write for LocalPending {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.file.as_mut() {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("pending object already closed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LocalPending {
    fn drop(&mut self) {
        // An abandoned put leaves nothing behind.
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl PendingObject for LocalPending {
    fn commit(mut self: Box<Self>, id: &ObjectId) -> Result<PutOutcome, CasError> {
        let Some(f) = self.file.take() else {
            return Err(CasError::BadName("pending object committed twice".into()));
        };
        let cas = LocalCas {
            root: self.cas_root.clone(),
            durable: self.durable,
            pending_dirs: None,
            shards: Shards::default(),
            syncs: SyncGroup::default(),
        };
        let dest = cas.object_path(id);
        if dest.exists() {
            drop(f);
            let _ = fs::remove_file(&self.tmp);
            return Ok(PutOutcome::AlreadyPresent);
        }
        if self.durable {
            if let Err(e) = f.sync_all() {
                let _ = fs::remove_file(&self.tmp);
                return Err(CasError::io("fsync", &self.tmp, e));
            }
        }
        drop(f);
        // data/txn and data/XX are on the same filesystem, so the rename is atomic.
        cas.place(&self.tmp, &dest, true)
    }
}

impl Cas for LocalCas {
    fn exists(&self, id: &ObjectId) -> Result<bool, CasError> {
        Ok(self.object_path(id).exists())
    }

    fn put_bytes(&self, id: &ObjectId, data: &[u8]) -> Result<PutOutcome, CasError> {
        let dest = self.object_path(id);
        if dest.exists() {
            return Ok(PutOutcome::AlreadyPresent);
        }
        let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
        let tmp = self.write_temp(&dir, data)?;
        self.place(&tmp, &dest, true)
    }

    /// A batch costs a share of one filesystem sync instead of one fsync per object (a single
    /// object joins only a sync that others wait for or run already): every
    /// object is written to an unnamed (or temporary) file first, then the filesystem is synced
    /// (`syncfs`, shared with the batches written meanwhile: see [`SyncGroup`]), and only then
    /// are the objects named — so a name still never points at unwritten data, whatever the
    /// crash. The names are made durable like single puts (by another shared sync, or by
    /// [`Cas::flush`] with deferred directory sync).
    fn put_many(&self, items: &[(ObjectId, &[u8])]) -> Vec<Result<PutOutcome, CasError>> {
        if !self.durable
            || items.is_empty()
            || (items.len() == 1 && !self.syncs.busy())
            || !cfg!(target_os = "linux")
        {
            return items.iter().map(|(id, d)| self.put_bytes(id, d)).collect();
        }
        // Taken before the writes: a sync error reported from now on may concern them.
        let ticket = match self.syncs.ticket(&self.root) {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                return items
                    .iter()
                    .map(|_| {
                        Err(CasError::io(
                            "open",
                            &self.root,
                            io::Error::other(msg.clone()),
                        ))
                    })
                    .collect();
            }
        };
        let mut out: Vec<Result<PutOutcome, CasError>> = Vec::with_capacity(items.len());
        let mut written: Vec<(usize, Unnamed, PathBuf, Option<InShard>)> = Vec::new();
        for (i, (id, data)) in items.iter().enumerate() {
            let dest = self.object_path(id);
            let at = self.in_shard(id);
            // A small object is not looked up first: naming it fails if it exists (and the
            // copy is dropped), which costs less than a lookup of every new one.
            let present = data.len() >= LOOKUP_BEFORE_WRITE
                && match &at {
                    Some(s) => matches!(s.stat(), Ok(Some(_))),
                    None => dest.exists(),
                };
            if present {
                out.push(Ok(PutOutcome::AlreadyPresent));
                continue;
            }
            let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
            match Unnamed::write(&dir, at.as_ref().map(|s| s.dir), data) {
                Ok(u) => {
                    written.push((i, u, dest, at));
                    out.push(Ok(PutOutcome::Stored));
                }
                Err(e) => out.push(Err(CasError::io("write", &dir, e))),
            }
        }
        if written.is_empty() {
            return out;
        }
        if let Err(e) = self.syncs.sync(ticket) {
            let msg = e.to_string();
            for (i, u, _, _) in written {
                u.discard();
                out[i] = Err(CasError::io(
                    "sync",
                    &self.root,
                    io::Error::other(msg.clone()),
                ));
            }
            return out;
        }
        let mut dirs = std::collections::HashSet::new();
        for (i, u, dest, at) in written {
            match u.name(&dest, at.as_ref()) {
                Ok(true) => {
                    if let Some(d) = dest.parent() {
                        dirs.insert(d.to_path_buf());
                    }
                }
                // Stored meanwhile by another writer: objects are immutable, keep theirs.
                Ok(false) => out[i] = Ok(PutOutcome::AlreadyPresent),
                Err(e) => out[i] = Err(CasError::io("link", &dest, e)),
            }
        }
        match &self.pending_dirs {
            Some(set) => set.lock().unwrap_or_else(|e| e.into_inner()).extend(dirs),
            None => {
                if let Err(e) = self.syncs.sync(ticket) {
                    let msg = e.to_string();
                    for r in out
                        .iter_mut()
                        .filter(|r| matches!(r, Ok(PutOutcome::Stored)))
                    {
                        *r = Err(CasError::io(
                            "sync",
                            &self.root,
                            io::Error::other(msg.clone()),
                        ));
                    }
                }
            }
        }
        out
    }

    /// Large batches: each shares one filesystem sync, and a sync rewrites every directory,
    /// inode-table and bitmap block dirtied since the last one. Measured here (100,000 tiny
    /// files, each publish into a fresh filesystem, three each): batches of up to 128 objects
    /// made 438 syncs and took 7.1–8.8 s, up to 1,024 made 83 and took 5.7–6.7 s.
    fn batch_hint(&self) -> usize {
        if self.durable {
            1024
        } else {
            1
        }
    }

    fn begin(&self) -> Result<Box<dyn PendingObject>, CasError> {
        let txn = self.root.join("data").join("txn");
        let tmp = txn.join(temp_name());
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| CasError::io("create", &tmp, e))?;
        Ok(Box::new(LocalPending {
            file: Some(file),
            tmp,
            cas_root: self.root.clone(),
            durable: self.durable,
        }))
    }

    fn get(&self, id: &ObjectId) -> Result<Box<dyn Read + Send>, CasError> {
        let p = self.object_path(id);
        match File::open(&p) {
            Ok(f) => Ok(Box::new(io::BufReader::with_capacity(256 * 1024, f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(CasError::NotFound(id.to_string()))
            }
            Err(e) => Err(CasError::io("open", &p, e)),
        }
    }

    fn delete(&self, id: &ObjectId) -> Result<(), CasError> {
        let p = self.object_path(id);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CasError::io("delete", &p, e)),
        }
    }

    fn modified(&self, id: &ObjectId) -> Result<i64, CasError> {
        let p = self.object_path(id);
        let m = fs::metadata(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                CasError::NotFound(id.to_string())
            } else {
                CasError::io("stat", &p, e)
            }
        })?;
        let t = m.modified().map_err(|e| CasError::io("stat", &p, e))?;
        Ok(t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64))
    }

    fn size(&self, id: &ObjectId) -> Result<u64, CasError> {
        #[cfg(target_os = "linux")]
        if let Some(s) = self.in_shard(id) {
            return match s.stat() {
                Ok(Some(st)) => Ok(st.st_size as u64),
                Ok(None) => Err(CasError::NotFound(id.to_string())),
                Err(e) => Err(CasError::io("stat", &self.object_path(id), e)),
            };
        }
        let p = self.object_path(id);
        match fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(CasError::NotFound(id.to_string()))
            }
            Err(e) => Err(CasError::io("stat", &p, e)),
        }
    }

    fn list(&self) -> Result<Vec<ObjectId>, CasError> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            let shard = format!("{i:02x}");
            let d = self.root.join("data").join(&shard);
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CasError::io("list", &d, e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| CasError::io("list", &d, e))?;
                let name = ent.file_name();
                let Some(name) = name.to_str() else { continue };
                if let Some(id) = ObjectId::from_path(&format!("data/{shard}/{name}")) {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    fn put_root_file(&self, name: &str, data: &[u8]) -> Result<(), CasError> {
        if !valid_root_name(name) {
            return Err(CasError::BadName(name.to_string()));
        }
        let tmp = self.write_temp(&self.root, data)?;
        self.place(&tmp, &self.root.join(name), false)?;
        Ok(())
    }

    fn get_root_file(&self, name: &str) -> Result<Option<Vec<u8>>, CasError> {
        if !valid_root_name(name) {
            return Err(CasError::BadName(name.to_string()));
        }
        let p = self.root.join(name);
        match fs::read(&p) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CasError::io("read", &p, e)),
        }
    }

    fn describe(&self) -> String {
        format!("local storage {}", self.root.display())
    }

    fn flush(&self) -> Result<(), CasError> {
        let Some(set) = &self.pending_dirs else {
            return Ok(());
        };
        let dirs: Vec<PathBuf> = set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        if dirs.len() > 8 && cfg!(target_os = "linux") {
            // One filesystem sync instead of one fsync per directory (up to 256 of them).
            let root = File::open(&self.root).map_err(|e| CasError::io("open", &self.root, e))?;
            return sync_filesystem(&root).map_err(|e| CasError::io("sync", &self.root, e));
        }
        for d in dirs {
            sync_dir(&d)?;
        }
        Ok(())
    }
}

/// A store that writes locally and reads locally first, then from `remote` — the publisher's
/// view of a repository it does not hold (gateway mode): catalogs are fetched from the Stratum 0
/// over HTTP, new catalogs are written to local scratch space and then sent to the gateway.
pub struct OverlayCas {
    pub local: LocalCas,
    pub remote: std::sync::Arc<dyn Cas>,
}

impl Cas for OverlayCas {
    fn exists(&self, id: &ObjectId) -> Result<bool, CasError> {
        Ok(self.local.exists(id)? || self.remote.exists(id)?)
    }
    fn put_bytes(&self, id: &ObjectId, data: &[u8]) -> Result<PutOutcome, CasError> {
        self.local.put_bytes(id, data)
    }
    fn begin(&self) -> Result<Box<dyn PendingObject>, CasError> {
        self.local.begin()
    }
    fn get(&self, id: &ObjectId) -> Result<Box<dyn Read + Send>, CasError> {
        match self.local.get(id) {
            Err(CasError::NotFound(_)) => self.remote.get(id),
            r => r,
        }
    }
    fn size(&self, id: &ObjectId) -> Result<u64, CasError> {
        match self.local.size(id) {
            Err(CasError::NotFound(_)) => self.remote.size(id),
            r => r,
        }
    }
    fn list(&self) -> Result<Vec<ObjectId>, CasError> {
        self.local.list()
    }
    fn put_root_file(&self, name: &str, data: &[u8]) -> Result<(), CasError> {
        self.local.put_root_file(name, data)
    }
    fn get_root_file(&self, name: &str) -> Result<Option<Vec<u8>>, CasError> {
        self.remote.get_root_file(name)
    }
    fn describe(&self) -> String {
        format!("{} over {}", self.local.describe(), self.remote.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{Digest20, Suffix};

    #[cfg(target_os = "linux")]
    #[test]
    fn the_empty_path_probe_answers_as_linkat_does_and_leaves_nothing() {
        use std::os::unix::fs::OpenOptionsExt;
        let d = tempfile::tempdir().unwrap();
        let allowed = empty_path_allowed(d.path());
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(d.path())
            .unwrap();
        // What naming another anonymous file that way does here.
        let to =
            std::ffi::CString::new(d.path().join("named").into_os_string().into_encoded_bytes())
                .unwrap();
        let named = matches!(link_by(Link::EmptyPath, &f, libc::AT_FDCWD, &to), Ok(true));
        assert_eq!(allowed, named);
        let left: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let want: Vec<std::ffi::OsString> = if named { vec!["named".into()] } else { vec![] };
        assert_eq!(left, want, "the probe's file is gone");
        // No directory to make an anonymous file in: not allowed.
        assert!(!empty_path_allowed(&d.path().join("missing")));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_anonymous_file_is_named_either_way_and_never_over_an_existing_name() {
        use std::ffi::CString;
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStringExt;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        let anonymous = |content: &[u8]| {
            let mut f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .open(dir.path())
                .unwrap();
            f.write_all(content).unwrap();
            f
        };
        for (i, how) in [Link::EmptyPath, Link::ProcFd].into_iter().enumerate() {
            let name = format!("object-{i}");
            let content = format!("content {i}").into_bytes();
            let c = CString::new(name.clone()).unwrap();
            match link_by(how, &anonymous(&content), d.as_raw_fd(), &c) {
                Ok(true) => {}
                // Before Linux 6.10, only with CAP_DAC_READ_SEARCH.
                Err(e)
                    if how == Link::EmptyPath
                        && matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) =>
                {
                    eprintln!("AT_EMPTY_PATH refused here: {e}");
                    continue;
                }
                other => panic!("{how:?}: {other:?}"),
            }
            assert_eq!(fs::read(dir.path().join(&name)).unwrap(), content);
            // Another file for the same name: refused, the first one kept.
            let r = link_by(how, &anonymous(b"other"), d.as_raw_fd(), &c).unwrap();
            assert!(!r, "{how:?}");
            assert_eq!(fs::read(dir.path().join(&name)).unwrap(), content);
        }
        // Whichever way the kernel allows, by a whole path too.
        let whole = CString::new(dir.path().join("by-path").into_os_string().into_vec()).unwrap();
        assert!(link_anonymous(&anonymous(b"by path"), libc::AT_FDCWD, &whole).unwrap());
        assert_eq!(fs::read(dir.path().join("by-path")).unwrap(), b"by path");
        assert!(!link_anonymous(&anonymous(b"again"), libc::AT_FDCWD, &whole).unwrap());
        // An absent directory is an error, not a refusal to take for another way's.
        let lost = CString::new(dir.path().join("absent/x").into_os_string().into_vec()).unwrap();
        let e = link_anonymous(&anonymous(b"lost"), libc::AT_FDCWD, &lost).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    /// A sync run by a test: counts its runs, and blocks each until told to end (`Ok` or an
    /// error) through `end`.
    struct Gate {
        runs: std::sync::atomic::AtomicUsize,
        end: std::sync::Mutex<crossbeam_channel::Receiver<io::Result<()>>>,
    }

    impl Gate {
        fn new() -> (Gate, crossbeam_channel::Sender<io::Result<()>>) {
            let (tx, rx) = crossbeam_channel::unbounded();
            let g = Gate {
                runs: Default::default(),
                end: std::sync::Mutex::new(rx),
            };
            (g, tx)
        }

        fn run(&self) -> io::Result<()> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            self.end.lock().unwrap().recv().unwrap()
        }
    }

    /// Waits until `n` batches wait for the sync running in `g`.
    fn until_waiting(g: &SyncGroup, n: usize) {
        let start = std::time::Instant::now();
        while {
            let s = g.lock();
            s.waiting < n || !s.running
        } {
            assert!(start.elapsed().as_secs() < 10, "batches never came to wait");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn batches_written_while_a_sync_runs_share_the_next_one() {
        let group = SyncGroup::default();
        let (gate, end) = Gate::new();
        std::thread::scope(|sc| {
            let first = sc.spawn(|| group.sync_by(0, &|| gate.run()));
            until_waiting(&group, 0);
            // Three batches done writing while the first one's sync runs: that sync may have
            // started before their writes, so they wait for the next, which one of them runs.
            let late: Vec<_> = (0..3)
                .map(|_| sc.spawn(|| group.sync_by(0, &|| gate.run())))
                .collect();
            until_waiting(&group, 3);
            end.send(Ok(())).unwrap();
            first.join().unwrap().unwrap();
            end.send(Ok(())).unwrap();
            for h in late {
                h.join().unwrap().unwrap();
            }
        });
        assert_eq!(gate.runs.load(Ordering::SeqCst), 2);
        let s = group.lock();
        assert_eq!((s.started, s.done), (2, 2));
    }

    #[test]
    fn the_next_sync_waits_out_the_interval_and_batches_written_meanwhile_join_it() {
        let interval = std::time::Duration::from_millis(300);
        let group = SyncGroup::with_interval(interval);
        let starts = std::sync::Mutex::new(Vec::new());
        let run = || {
            starts.lock().unwrap().push(std::time::Instant::now());
            Ok(())
        };
        // The first sync starts at once.
        group.sync_by(0, &run).unwrap();
        std::thread::scope(|sc| {
            let (group, run) = (&group, &run);
            let b = sc.spawn(move || group.sync_by(1, run));
            // b waits for the interval; c, written meanwhile, waits for b's sync.
            let since = std::time::Instant::now();
            while !group.lock().lingering {
                assert!(since.elapsed().as_secs() < 10, "no batch waited");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(group.busy());
            let c = sc.spawn(move || group.sync_by(1, run));
            while group.lock().waiting < 1 {
                assert!(since.elapsed().as_secs() < 10, "the batch did not wait");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            b.join().unwrap().unwrap();
            c.join().unwrap().unwrap();
        });
        let starts = starts.into_inner().unwrap();
        assert_eq!(starts.len(), 2, "b and c share one sync");
        assert!(starts[1] - starts[0] >= interval);
        let s = group.lock();
        assert_eq!(
            (s.started, s.done, s.lingering, s.waiting),
            (2, 2, false, 0)
        );
    }

    #[test]
    fn a_sync_long_after_the_last_one_starts_at_once() {
        let interval = std::time::Duration::from_secs(20);
        let group = SyncGroup::with_interval(interval);
        group.lock().last_start = std::time::Instant::now().checked_sub(interval);
        let called = std::time::Instant::now();
        let started = std::sync::Mutex::new(None);
        group
            .sync_by(0, &|| {
                *started.lock().unwrap() = Some(std::time::Instant::now());
                Ok(())
            })
            .unwrap();
        let waited = started.into_inner().unwrap().unwrap() - called;
        assert!(waited < interval / 2, "waited {waited:?}");
        assert_eq!(group.lock().done, 1);
    }

    #[test]
    fn a_sync_error_fails_every_batch_written_before_it_was_reported() {
        let group = SyncGroup::default();
        let (gate, end) = Gate::new();
        // Batch a began (its ticket) before the failing sync 1, which batch b ran; a's own
        // sync (2) succeeds, but the error may have concerned a's writes.
        let a_ticket = group.lock().done;
        std::thread::scope(|sc| {
            let b_ticket = group.lock().done;
            let (group, gate) = (&group, &gate);
            let b = sc.spawn(move || group.sync_by(b_ticket, &|| gate.run()));
            until_waiting(group, 0);
            let a = sc.spawn(|| group.sync_by(a_ticket, &|| gate.run()));
            until_waiting(group, 1);
            end.send(Err(io::Error::other("EIO on writeback"))).unwrap();
            assert!(b.join().unwrap().unwrap_err().to_string().contains("EIO"));
            end.send(Ok(())).unwrap();
            assert!(a.join().unwrap().unwrap_err().to_string().contains("EIO"));
        });
        // A batch that began after the error was reported is not failed by it.
        let c_ticket = group.lock().done;
        end.send(Ok(())).unwrap();
        group.sync_by(c_ticket, &|| gate.run()).unwrap();
        assert_eq!(gate.runs.load(Ordering::SeqCst), 3);
        // Errors beyond the ones remembered still fail a batch older than them, and the
        // newest are remembered.
        let (old, mut mid) = (group.lock().done, 0);
        for _ in 0..SYNC_ERRORS_KEPT + 1 {
            end.send(Err(io::Error::other("EIO"))).unwrap();
            mid = group.lock().done;
            assert!(group.sync_by(mid, &|| gate.run()).is_err());
        }
        let recent = group.lock().done;
        end.send(Ok(())).unwrap();
        assert!(group.sync_by(mid, &|| gate.run()).is_err());
        end.send(Ok(())).unwrap();
        assert!(group.sync_by(old, &|| gate.run()).is_err());
        end.send(Ok(())).unwrap();
        group.sync_by(recent, &|| gate.run()).unwrap();
    }

    #[test]
    fn batches_from_many_threads_are_stored_whole_and_a_single_object_joins_only_a_busy_sync() {
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap();
        let batches: Vec<Vec<(ObjectId, Vec<u8>)>> = (0..64)
            .map(|b| {
                (0..3)
                    .map(|i| {
                        let data = format!("batch {b} object {i}").into_bytes();
                        (ObjectId::new(Digest20::of(&data), Suffix::None), data)
                    })
                    .collect()
            })
            .collect();
        std::thread::scope(|sc| {
            for chunk in batches.chunks(16) {
                let cas = &cas;
                sc.spawn(move || {
                    for batch in chunk {
                        let items: Vec<(ObjectId, &[u8])> =
                            batch.iter().map(|(id, d)| (*id, &d[..])).collect();
                        for r in cas.put_many(&items) {
                            assert_eq!(r.unwrap(), PutOutcome::Stored);
                        }
                    }
                });
            }
        });
        for (id, data) in batches.iter().flatten() {
            assert_eq!(&get_all(&cas, id).unwrap(), data);
        }
        let syncs = cas.syncs.lock().done;
        assert!(syncs > 0);
        // A single object alone is fsynced by itself (no filesystem sync); one that comes
        // while a sync runs or is waited for joins the next one.
        let id = ObjectId::new(Digest20::of(b"alone"), Suffix::None);
        assert_eq!(
            cas.put_many(&[(id, &b"alone"[..])])[0].as_ref().unwrap(),
            &PutOutcome::Stored
        );
        assert_eq!(get_all(&cas, &id).unwrap(), b"alone");
        assert_eq!(cas.syncs.lock().done, syncs);
        assert!(!cas.syncs.busy());
        cas.syncs.lock().running = true;
        assert!(cas.syncs.busy());
        let mut s = cas.syncs.lock();
        (s.running, s.waiting) = (false, 1);
        drop(s);
        assert!(cas.syncs.busy());
    }

    #[test]
    fn put_get_exists_list_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap();
        let id = ObjectId::new(Digest20::of(b"x"), Suffix::Partial);
        assert!(!cas.exists(&id).unwrap());
        assert_eq!(cas.put_bytes(&id, b"x").unwrap(), PutOutcome::Stored);
        assert_eq!(
            cas.put_bytes(&id, b"x").unwrap(),
            PutOutcome::AlreadyPresent
        );
        assert!(cas.exists(&id).unwrap());
        assert_eq!(cas.size(&id).unwrap(), 1);
        assert_eq!(get_all(&cas, &id).unwrap(), b"x");
        assert_eq!(cas.list().unwrap(), vec![id]);
        assert!(dir.path().join(id.path()).is_file());
        let absent = ObjectId::new(Digest20::of(b"y"), Suffix::None);
        assert!(matches!(cas.get(&absent), Err(CasError::NotFound(_))));
        assert!(matches!(cas.size(&absent), Err(CasError::NotFound(_))));
        // The size of the object under its full name and under its suffix-less twin.
        let plain = ObjectId::new(Digest20::of(b"x"), Suffix::None);
        assert!(matches!(cas.size(&plain), Err(CasError::NotFound(_))));
        cas.put_bytes(&plain, b"xyz").unwrap();
        assert_eq!((cas.size(&plain).unwrap(), cas.size(&id).unwrap()), (3, 1));
    }

    #[test]
    fn a_batch_stores_new_objects_once_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        for deferred in [false, true] {
            let root = dir.path().join(format!("d{deferred}"));
            let mut cas = LocalCas::create(&root).unwrap();
            if deferred {
                cas = cas.with_deferred_dir_sync();
            }
            let known = ObjectId::new(Digest20::of(b"known"), Suffix::None);
            cas.put_bytes(&known, b"known").unwrap();
            // Small objects, and large ones (written around the page cache), one of whole
            // pages only and one ending in a partial page.
            let mut bodies: Vec<Vec<u8>> = (0..38u8).map(|i| vec![i; 100 + i as usize]).collect();
            for len in [DIRECT_OBJECT_MIN, 3 * DIRECT_OBJECT_MIN + 4097] {
                bodies.push((0..len).map(|i| (i % 251) as u8 ^ deferred as u8).collect());
            }
            let mut items: Vec<(ObjectId, &[u8])> = bodies
                .iter()
                .map(|b| (ObjectId::new(Digest20::of(b), Suffix::None), &b[..]))
                .collect();
            items.push((known, b"known"));
            let out = cas.put_many(&items);
            assert_eq!(out.len(), 41);
            for (i, r) in out.iter().enumerate() {
                let want = if i == 40 {
                    PutOutcome::AlreadyPresent
                } else {
                    PutOutcome::Stored
                };
                assert_eq!(*r.as_ref().unwrap(), want, "item {i}");
            }
            cas.flush().unwrap();
            for (id, b) in &items {
                assert_eq!(get_all(&cas, id).unwrap(), *b);
            }
            assert_eq!(cas.list().unwrap().len(), 41);
            // Every shard directory holds objects only: no temporary survived.
            for i in 0..=255u8 {
                for e in fs::read_dir(root.join(format!("data/{i:02x}"))).unwrap() {
                    let n = e.unwrap().file_name().into_string().unwrap();
                    assert!(!n.starts_with(".tmp."), "{n} left behind");
                }
            }
            // A second batch of the same objects stores nothing.
            let again = cas.put_many(&items);
            assert!(again
                .iter()
                .all(|r| *r.as_ref().unwrap() == PutOutcome::AlreadyPresent));
        }
    }

    #[test]
    fn a_batch_keeps_existing_objects_whether_looked_up_or_not() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap();
        // Below the lookup size (written, then the naming yields) and from it on (looked up,
        // not written).
        let small = b"small object".to_vec();
        let large: Vec<u8> = (0..LOOKUP_BEFORE_WRITE).map(|i| (i % 7) as u8).collect();
        let ids: Vec<ObjectId> = [&small, &large]
            .iter()
            .map(|b| ObjectId::new(Digest20::of(b), Suffix::None))
            .collect();
        for (id, b) in ids.iter().zip([&small, &large]) {
            cas.put_bytes(id, b).unwrap();
        }
        let inode = |id: &ObjectId| fs::metadata(dir.path().join(id.path())).unwrap().ino();
        let before: Vec<u64> = ids.iter().map(inode).collect();
        // Each existing object twice, and a new small one twice in the same batch.
        let fresh = b"fresh".to_vec();
        let fresh_id = ObjectId::new(Digest20::of(&fresh), Suffix::None);
        let items: Vec<(ObjectId, &[u8])> = vec![
            (ids[0], &small),
            (ids[1], &large),
            (fresh_id, &fresh),
            (ids[0], &small),
            (ids[1], &large),
            (fresh_id, &fresh),
        ];
        let out: Vec<PutOutcome> = cas
            .put_many(&items)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        use PutOutcome::{AlreadyPresent as Had, Stored};
        assert_eq!(out, [Had, Had, Stored, Had, Had, Had]);
        // The existing files are the same files, with the same bytes.
        assert_eq!(ids.iter().map(inode).collect::<Vec<_>>(), before);
        assert_eq!(get_all(&cas, &ids[0]).unwrap(), small);
        assert_eq!(get_all(&cas, &ids[1]).unwrap(), large);
        assert_eq!(get_all(&cas, &fresh_id).unwrap(), fresh);
        assert_eq!(cas.list().unwrap().len(), 3);
    }

    #[test]
    fn unnamed_bytes_take_a_free_name_and_yield_to_an_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Anonymous (where the filesystem has O_TMPFILE), anonymous and named through an open
        // directory (a shard), and the temporary-name fallback.
        let tmp = d.join(".tmp.test");
        fs::write(&tmp, b"fallback").unwrap();
        let open_dir = File::open(d).unwrap();
        let shard = |p: &Path| InShard {
            dir: &open_dir,
            name: std::ffi::CString::new(p.file_name().unwrap().to_str().unwrap()).unwrap(),
        };
        for (u, body, by_fd) in [
            (
                Unnamed::write(d, None, b"anonymous").unwrap(),
                &b"anonymous"[..],
                false,
            ),
            (
                Unnamed::write(d, Some(&open_dir), b"in its shard").unwrap(),
                &b"in its shard"[..],
                true,
            ),
            (Unnamed::Temp(tmp), &b"fallback"[..], false),
        ] {
            let dest = d.join(format!("obj-{}", body.len()));
            let taken = d.join(format!("taken-{}", body.len()));
            fs::write(&taken, b"theirs").unwrap();
            let again = match &u {
                Unnamed::Temp(_) => {
                    fs::write(d.join(".tmp.test2"), body).unwrap();
                    Unnamed::Temp(d.join(".tmp.test2"))
                }
                _ => Unnamed::write(d, by_fd.then_some(&open_dir), body).unwrap(),
            };
            assert!(u.name(&dest, by_fd.then(|| shard(&dest)).as_ref()).unwrap());
            assert_eq!(fs::read(&dest).unwrap(), body);
            assert!(!again
                .name(&taken, by_fd.then(|| shard(&taken)).as_ref())
                .unwrap());
            assert_eq!(fs::read(&taken).unwrap(), b"theirs");
        }
        let left: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn abandoned_stream_leaves_no_trace_and_commit_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap();
        {
            let mut p = cas.begin().unwrap();
            p.write_all(b"partial").unwrap();
        }
        assert_eq!(
            fs::read_dir(dir.path().join("data/txn")).unwrap().count(),
            0
        );
        assert!(cas.list().unwrap().is_empty());
        let mut p = cas.begin().unwrap();
        p.write_all(b"whole").unwrap();
        let id = ObjectId::new(Digest20::of(b"whole"), Suffix::None);
        assert_eq!(p.commit(&id).unwrap(), PutOutcome::Stored);
        assert_eq!(fs::read(dir.path().join(id.path())).unwrap(), b"whole");
        assert_eq!(
            fs::read_dir(dir.path().join("data/txn")).unwrap().count(),
            0
        );
    }

    #[test]
    fn root_files_are_confined_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap();
        cas.put_root_file(".cvmfspublished", b"m").unwrap();
        assert_eq!(cas.get_root_file(".cvmfspublished").unwrap().unwrap(), b"m");
        assert!(cas.get_root_file(".cvmfswhitelist").unwrap().is_none());
        assert!(matches!(
            cas.put_root_file("../evil", b""),
            Err(CasError::BadName(_))
        ));
    }
}
