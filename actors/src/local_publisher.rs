//! Local publish mode: `LocalPublisher` publishes through `cvmfs_server` on this host, for Stratum
//! 0s without a gateway (install guide §5, local mode).
//!
//! Per repository one commit thread: `cvmfs_server transaction <repo>`, extraction of the job's
//! tar into `<cvmfs_mount>/<repo>/<path>` (the old content at the path is replaced), then
//! `cvmfs_server publish -a <tag> -m <description> <repo>`; any failure after the transaction opened runs
//! `cvmfs_server abort -f <repo>`. A removal job deletes the path in the transaction instead of
//! extracting. Extraction is defensive on top of the intake rules the tar
//! already passed: every directory on the way is checked with `lstat` and never followed if it is a
//! symlink, files are created with `O_CREAT|O_EXCL` (a planted symlink cannot redirect them),
//! and nothing can land outside the target path. A per-repository flag is raised only around
//! the publish; submissions for a repository whose publish is running are refused with 409.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use actix::prelude::*;
use crossbeam_channel::{unbounded, Sender};
use prepub_core::intake::{detect_compression, normalize};
use prepub_core::jobs::JobResult;
use tar::EntryType;

use crate::publisher::{CommitError, CommitJob, Committed};

/// Which repositories are publishing right now (shared with the API, which refuses with 409).
#[derive(Clone, Default)]
pub struct Busy(Arc<std::sync::Mutex<HashMap<String, Arc<AtomicBool>>>>);

impl Busy {
    pub fn flag(&self, repo: &str) -> Arc<AtomicBool> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(repo.to_string())
            .or_default()
            .clone()
    }

    pub fn is_busy(&self, repo: &str) -> bool {
        self.flag(repo).load(Ordering::SeqCst)
    }
}

fn err(code: &'static str, e: impl ToString, retryable: bool) -> CommitError {
    CommitError {
        code,
        message: e.to_string(),
        retryable,
    }
}

/// Runs `cvmfs_server <args>`; returns its combined output on failure.
fn cvmfs_server(bin: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| format!("running {bin}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{bin} {} failed: {}", args.join(" "), text.trim()))
    }
}

/// Whether `cvmfs_server` can be found on PATH (start-up and health probe).
pub fn probe(bin: &str) -> Result<PathBuf, String> {
    if bin.contains('/') {
        let p = PathBuf::from(bin);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{bin} not found"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(bin);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!("{bin} is not on PATH"))
}

/// Creates `root/rel`'s parent directories, refusing to pass through anything but real
/// directories; returns the full path.
fn safe_parent(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let mut cur = root.to_path_buf();
    let comps: Vec<&str> = rel.split('/').collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is not a directory (refusing to follow it)",
                        cur.display()
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&cur)?,
            Err(e) => return Err(e),
        }
    }
    Ok(root.join(rel))
}

/// Extracts a tar into `root` (which must not exist yet) with the defensive rules above.
pub fn extract(tar_path: &Path, root: &Path) -> Result<u64, String> {
    fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let f = fs::File::open(tar_path).map_err(|e| format!("{}: {e}", tar_path.display()))?;
    let stream = detect_compression(f).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(stream);
    let mut n = 0u64;
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    for item in archive.entries().map_err(|e| e.to_string())? {
        let mut ent = item.map_err(|e| e.to_string())?;
        let raw = ent.path_bytes().into_owned();
        let et = ent.header().entry_type();
        if matches!(
            et,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            continue;
        }
        let rel = normalize(&raw).map_err(|e| e.to_string())?;
        let mode = ent.header().mode().unwrap_or(0o644) & 0o7777;
        if rel.is_empty() {
            dirs.push((root.to_path_buf(), mode));
            continue;
        }
        let dest = safe_parent(root, &rel).map_err(|e| format!("entry '{rel}': {e}"))?;
        match et {
            EntryType::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => return Err(format!("entry '{rel}': exists and is not a directory")),
                    Err(_) => fs::create_dir(&dest).map_err(|e| format!("entry '{rel}': {e}"))?,
                }
                dirs.push((dest, mode));
            }
            // Sparse files unpack with their holes as zeros, as intake encoded them.
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .map_err(|e| format!("entry '{rel}': {e}"))?;
                io::copy(&mut ent, &mut out).map_err(|e| format!("entry '{rel}': {e}"))?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("entry '{rel}': {e}"))?;
                if let Ok(t) = ent.header().mtime() {
                    let _ =
                        out.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t));
                }
            }
            EntryType::Symlink => {
                let target = ent
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default();
                let target = String::from_utf8(target)
                    .map_err(|_| format!("entry '{rel}': link target not UTF-8"))?;
                std::os::unix::fs::symlink(&target, &dest)
                    .map_err(|e| format!("entry '{rel}': {e}"))?;
            }
            EntryType::Link => {
                let target = ent
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default();
                let target = normalize(&target).map_err(|e| e.to_string())?;
                let src = root.join(&target);
                let m = fs::symlink_metadata(&src)
                    .map_err(|e| format!("entry '{rel}': hard link target: {e}"))?;
                if !m.file_type().is_file() {
                    return Err(format!(
                        "entry '{rel}': hard link target is not a regular file"
                    ));
                }
                // An independent copy, as cvmfs_server ingest makes of tar hard links.
                let mut from = fs::File::open(&src).map_err(|e| format!("entry '{rel}': {e}"))?;
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .map_err(|e| format!("entry '{rel}': {e}"))?;
                io::copy(&mut from, &mut out).map_err(|e| format!("entry '{rel}': {e}"))?;
                fs::set_permissions(&dest, m.permissions())
                    .map_err(|e| format!("entry '{rel}': {e}"))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                // Refused at intake, or dropped there by `skip_special`: dropped here too.
                continue;
            }
            other => {
                // Intake refuses every other type; never publish without an entry it accepted.
                return Err(format!(
                    "entry '{rel}': unsupported tar entry type {other:?}"
                ));
            }
        }
        n += 1;
    }
    for (d, mode) in dirs.into_iter().rev() {
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(mode));
    }
    Ok(n)
}

/// Settings of local mode.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub cvmfs_server: String,
    pub cvmfs_mount: PathBuf,
    pub spool_root: PathBuf,
}

pub struct LocalPublisher {
    queues: HashMap<String, Sender<CommitJob>>,
}

impl LocalPublisher {
    pub fn new(repos: Vec<String>, settings: Arc<LocalSettings>, busy: Busy) -> LocalPublisher {
        let mut queues = HashMap::new();
        for name in repos {
            let (tx, rx) = unbounded::<CommitJob>();
            let (s, b, repo) = (settings.clone(), busy.clone(), name.clone());
            let _ = thread::Builder::new()
                .name(format!("local-commit-{name}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        let id = job.job.id.clone();
                        let done = job.done.clone();
                        let flag = b.flag(&repo);
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                commit(&s, &repo, &flag, job)
                            }))
                            .unwrap_or_else(|_| {
                                Err(err(
                                    "internal",
                                    "the commit panicked; see the daemon log",
                                    false,
                                ))
                            });
                        flag.store(false, Ordering::SeqCst);
                        done.do_send(Committed {
                            job_id: id,
                            outcome,
                        });
                    }
                });
            queues.insert(name, tx);
        }
        LocalPublisher { queues }
    }
}

impl Actor for LocalPublisher {
    type Context = Context<Self>;
}

impl Handler<CommitJob> for LocalPublisher {
    type Result = ();
    fn handle(&mut self, m: CommitJob, _: &mut Context<Self>) {
        let m = match self.queues.get(&m.job.repo) {
            Some(q) => match q.send(m) {
                Ok(()) => return,
                Err(e) => e.into_inner(),
            },
            None => m,
        };
        m.done.do_send(Committed {
            job_id: m.job.id.clone(),
            outcome: Err(err(
                "unknown-repository",
                format!("no commit queue for repository {}", m.job.repo),
                false,
            )),
        });
    }
}

fn commit(
    s: &LocalSettings,
    repo: &str,
    busy: &AtomicBool,
    job: CommitJob,
) -> Result<JobResult, CommitError> {
    let bin = s.cvmfs_server.as_str();
    let tar = s
        .spool_root
        .join("jobs")
        .join(&job.job.id)
        .join("payload.tar");
    // Not `not_landed`: an interrupted commit cannot be told from one that landed here.
    job.begin(String::new(), false)?;
    busy.store(true, Ordering::SeqCst);
    cvmfs_server(bin, &["transaction", repo]).map_err(|e| err("transaction-failed", e, true))?;
    let abort_tx = |why: CommitError| -> CommitError {
        let _ = cvmfs_server(bin, &["abort", "-f", repo]);
        why
    };
    let target = s
        .cvmfs_mount
        .join(repo)
        .join(job.job.path.trim_start_matches('/'));
    if !job.job.path.is_empty() {
        // Parents up to the target must be real directories of the repository.
        let rel = job.job.path.trim_start_matches('/');
        // (A removal creates nothing: only the parents of the path itself are checked.)
        let checked = if job.job.removal {
            rel.to_string()
        } else {
            format!("{rel}/x")
        };
        if let Err(e) = safe_parent(&s.cvmfs_mount.join(repo), &checked) {
            return Err(abort_tx(err("commit-rejected", e, false)));
        }
        let existing = fs::symlink_metadata(&target);
        if job.job.removal && existing.is_err() {
            return Err(abort_tx(err(
                "commit-rejected",
                format!("{} does not exist in the repository", job.job.path),
                false,
            )));
        }
        match existing {
            Ok(m) if m.file_type().is_dir() => {
                if let Err(e) = fs::remove_dir_all(&target) {
                    return Err(abort_tx(err("commit-io", e, true)));
                }
            }
            Ok(_) => {
                if let Err(e) = fs::remove_file(&target) {
                    return Err(abort_tx(err("commit-io", e, true)));
                }
            }
            Err(_) => {}
        }
    }
    // A removal only takes the path away; anything else unpacks the job's tree there.
    if !job.job.removal {
        if let Err(e) = extract(&tar, &target) {
            return Err(abort_tx(err("extract-failed", e, false)));
        }
    }
    if job.abort.load(Ordering::SeqCst) {
        return Err(abort_tx(err(
            "aborted",
            "job aborted during its commit; nothing was published",
            false,
        )));
    }
    let tag = job
        .job
        .tag_name
        .clone()
        .unwrap_or_else(|| format!("prepub-{}", job.job.id));
    let description = match &job.job.tag_name {
        Some(_) => crate::publisher::client_tag_description(&job.job),
        None => crate::publisher::marker_tag(&job.job).description,
    };
    match cvmfs_server(bin, &["publish", "-a", &tag, "-m", &description, repo]) {
        Ok(_) => {
            crate::testhook::point("manifest-written");
            Ok(JobResult {
                root_hash: String::new(),
                revision: 0,
                tag,
            })
        }
        Err(e) => Err(abort_tx(err("publish-failed", e, true))),
    }
}
