//! The publish backend. `Publisher` (standalone mode) is the writer of repositories whose storage
//! and keys it holds: it applies a job's change set to the current revision, signs a new
//! manifest and tags it.
//!
//! Commits are strictly serialised per repository: each repository has one commit thread fed by
//! a crossbeam channel, so jobs commit in the order they became ready and a second job waits
//! instead of failing. Before it changes anything, the thread reports the root catalog it starts
//! from (`CommitStarting`) and waits until the job manager has journaled it; that is what lets a
//! restarted daemon tell whether an interrupted commit already happened (current root differs
//! and the job's tag is in the history) so that no job is ever committed twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use actix::prelude::*;
use crossbeam_channel::{bounded, unbounded, Sender};
use prepub_core::cas::{get_all, LocalCas};
use prepub_core::history::History;
use prepub_core::intake::ChangeSet;
use prepub_core::jobs::{JobRecord, JobResult};
use prepub_core::keys::RepoKeys;
use prepub_core::object::{decode_to_vec, EncodeParams};
use prepub_core::repo::{self, ApplyMode, RepoError, TagRequest};

/// Where a repository lives.
#[derive(Clone)]
pub struct RepoTarget {
    pub name: String,
    /// Local storage directory (`cas.type: localfs`).
    pub storage: PathBuf,
    pub keys_dir: PathBuf,
    /// The S3 store (`cas.type: s3`), shared so its known-object cache serves every job.
    pub s3: Option<Arc<crate::s3_cas::S3Cas>>,
    /// The storage's raw-content index (`pipeline.raw_index`).
    pub raw_index: Option<Arc<prepub_core::rawindex::RawIndex>>,
    /// Expired automatic tags to drop at each publish (`gc.auto_tag_timespan`, with garbage
    /// collection enabled).
    pub tag_expiry: Option<repo::TagExpiry>,
    /// Build the catalogs of a new release while its job is processed, so that the commit only
    /// mounts them (standalone mode: this daemon writes the catalogs; see `repo::prebuild`).
    pub prebuild_catalogs: bool,
}

impl std::fmt::Debug for RepoTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoTarget")
            .field("name", &self.name)
            .field("storage", &self.storage)
            .field(
                "s3",
                &self
                    .s3
                    .as_ref()
                    .map(|s| prepub_core::cas::Cas::describe(s.as_ref())),
            )
            .finish()
    }
}

impl RepoTarget {
    /// The repository's CAS. `bulk` batches local directory fsyncs (see `LocalCas`).
    pub fn cas(
        &self,
        bulk: bool,
    ) -> Result<Arc<dyn prepub_core::cas::Cas>, prepub_core::cas::CasError> {
        if let Some(s3) = &self.s3 {
            return Ok(s3.clone());
        }
        let c = LocalCas::open(&self.storage)?;
        Ok(Arc::new(if bulk { c.with_deferred_dir_sync() } else { c }))
    }
}

/// Sent by a commit thread before it changes the repository. The manager journals `base_root`
/// and answers on `ack` whether to go on (false: the job was aborted meanwhile, or its commit
/// was interrupted too often, see `not_landed`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CommitStarting {
    pub job_id: String,
    pub base_root: String,
    /// The commit thread found the job's commit not in the repository: a start journaled
    /// before was interrupted (the daemon stopped) without publishing, and counts as an
    /// attempt. False where the publisher cannot tell (local mode).
    pub not_landed: bool,
    pub ack: Sender<bool>,
}

/// A commit is waiting (for a busy lease path, say); shown on the job until it moves on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CommitWaiting {
    pub job_id: String,
    pub note: Option<String>,
}

/// The outcome of a commit.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Committed {
    pub job_id: String,
    pub outcome: Result<JobResult, CommitError>,
}

#[derive(Debug, Clone)]
pub struct CommitError {
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

/// Commits one job.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CommitJob {
    pub job: JobRecord,
    pub changeset: PathBuf,
    /// The change set saved at `changeset`, when the job manager still holds it from the
    /// processing (the commit then need not read it back).
    pub preloaded: Option<Arc<ChangeSet>>,
    pub params: EncodeParams,
    /// Marker tags of the repository's other jobs in `committing`: this publish must not drop
    /// them as expired (`gc.auto_tag_timespan`), because such a job may be published already
    /// without its outcome journaled (the daemon died, or an error came after the manifest was
    /// written), and its marker is how its retried commit recognises that instead of committing
    /// twice. A job whose commit has not begun has no marker yet; naming it keeps nothing.
    pub unconfirmed: Vec<String>,
    pub abort: Arc<AtomicBool>,
    pub starting: Recipient<CommitStarting>,
    pub waiting: Recipient<CommitWaiting>,
    pub done: Recipient<Committed>,
}

pub struct Publisher {
    queues: HashMap<String, Sender<CommitJob>>,
}

impl Publisher {
    /// Starts one commit thread per repository.
    pub fn new(targets: Vec<RepoTarget>) -> Publisher {
        let mut queues = HashMap::new();
        for t in targets {
            let (tx, rx) = unbounded::<CommitJob>();
            let name = t.name.clone();
            let _ = thread::Builder::new()
                .name(format!("commit-{name}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        let id = job.job.id.clone();
                        let done = job.done.clone();
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                commit(&t, job)
                            }))
                            .unwrap_or_else(|_| {
                                Err(err(
                                    "internal",
                                    "the commit panicked; see the daemon log",
                                    false,
                                ))
                            });
                        done.do_send(Committed {
                            job_id: id,
                            outcome,
                        });
                    }
                });
            queues.insert(name, tx);
        }
        Publisher { queues }
    }
}

impl Actor for Publisher {
    type Context = Context<Self>;
}

impl Handler<CommitJob> for Publisher {
    type Result = ();
    fn handle(&mut self, m: CommitJob, _: &mut Context<Self>) {
        let m = match self.queues.get(&m.job.repo) {
            Some(q) => match q.send(m) {
                Ok(()) => return,
                Err(e) => e.into_inner(),
            },
            None => m,
        };
        // No commit thread for this repository (not configured, or its thread is gone).
        m.done.do_send(Committed {
            job_id: m.job.id.clone(),
            outcome: Err(CommitError {
                code: "unknown-repository",
                message: format!("no commit queue for repository {}", m.job.repo),
                retryable: false,
            }),
        });
    }
}

fn err(code: &'static str, e: impl ToString, retryable: bool) -> CommitError {
    CommitError {
        code,
        message: e.to_string(),
        retryable,
    }
}

/// A job's saved change set: unreadable is worth a retry, unparsable is not.
fn load_changeset(path: &std::path::Path) -> Result<ChangeSet, CommitError> {
    prepub_core::spool::read_changeset(path).map_err(|e| match e {
        prepub_core::spool::SpoolError::Io { .. } => err("spool-read", e, true),
        e => err("spool-corrupt", e, false),
    })
}

impl CommitJob {
    /// Journals the start of the commit from `base_root` (see [`CommitStarting`]) and waits for
    /// the manager's answer; an error when it refused (the job was aborted) or did not answer
    /// (journal trouble, manager restart: retried).
    pub(crate) fn begin(&self, base_root: String, not_landed: bool) -> Result<(), CommitError> {
        let (ack_tx, ack_rx) = bounded(1);
        self.starting.do_send(CommitStarting {
            job_id: self.job.id.clone(),
            base_root,
            not_landed,
            ack: ack_tx,
        });
        if ack_rx.recv().unwrap_or(false) {
            return Ok(());
        }
        if self.abort.load(Ordering::SeqCst) {
            return Err(err("aborted", "job aborted before its commit", false));
        }
        Err(err(
            "commit-handshake",
            "the start of the commit was not journaled; retrying",
            true,
        ))
    }

    /// The job's change set: the one held from its processing, else read from the spool.
    pub(crate) fn load_changeset(&self) -> Result<Arc<ChangeSet>, CommitError> {
        match &self.preloaded {
            Some(cs) => Ok(cs.clone()),
            None => load_changeset(&self.changeset).map(Arc::new),
        }
    }
}

/// The tag that marks a job's revision: `prepub-<job id>`. It is added to every revision this
/// daemon publishes and never reused, which is how a restarted daemon recognises its own commit.
pub fn marker_tag(job: &JobRecord) -> TagRequest {
    TagRequest {
        name: format!("prepub-{}", job.id),
        description: format!("published by cvmfs-prepub job {}", job.id),
        owner: None,
    }
}

/// The description of the client's tag: the client's text (or a default), and the owner note
/// of a scoped token's job (see `repo::may_take_tag`).
pub fn client_tag_description(job: &JobRecord) -> String {
    let text = job
        .tag_description
        .clone()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| format!("published by cvmfs-prepub job {}", job.id));
    match &job.owner {
        Some(owner) => format!("{text} {}", repo::owner_note(owner)),
        None => text,
    }
}

/// The tags a job's revision gets: the marker, and the client's tag when one was given.
pub fn job_tags(job: &JobRecord) -> Vec<TagRequest> {
    let mut v = vec![marker_tag(job)];
    if let Some(name) = &job.tag_name {
        v.push(TagRequest {
            name: name.clone(),
            description: client_tag_description(job),
            owner: job.owner.clone(),
        });
    }
    v
}

/// Whether the job's commit is already in the repository (recovery after a crash, or a commit
/// request repeated by a restarted job manager): the current history holds the job's tag.
fn already_committed(
    cas: &dyn prepub_core::cas::Cas,
    job: &JobRecord,
) -> Result<Option<JobResult>, CommitError> {
    let (m, _) = repo::current_manifest(cas)
        .map_err(|e| err("repository-unreadable", e, true))?
        .ok_or_else(|| err("repository-missing", "no repository in storage", false))?;
    if job.base_root.as_deref() == Some(m.root_catalog.to_string().as_str()) {
        return Ok(None); // nothing was published since this job's commit began
    }
    let Some(h) = m.history else { return Ok(None) };
    let bytes = get_all(cas, &h)
        .map_err(|e| err("repository-unreadable", e, true))
        .and_then(|b| {
            decode_to_vec(&h, &b, true).map_err(|e| err("repository-unreadable", e, true))
        })?;
    let tmp = tempfile::NamedTempFile::new().map_err(|e| err("scratch", e, true))?;
    std::fs::write(tmp.path(), bytes).map_err(|e| err("scratch", e, true))?;
    let hist = History::open(tmp.path()).map_err(|e| err("repository-unreadable", e, true))?;
    let marker = marker_tag(job);
    let found = hist
        .tag(&marker.name)
        .map_err(|e| err("repository-unreadable", e, true))?;
    Ok(found.map(|t| JobResult {
        root_hash: format!("{}C", t.hash),
        revision: t.revision,
        tag: job.tag_name.clone().unwrap_or(t.name),
    }))
}

/// A commit's change set: held already, or being parsed.
enum Parsing {
    Held(Arc<ChangeSet>),
    Thread(thread::JoinHandle<Result<Arc<ChangeSet>, CommitError>>),
}

impl Parsing {
    fn get(self) -> Result<Arc<ChangeSet>, CommitError> {
        match self {
            Parsing::Held(cs) => Ok(cs),
            Parsing::Thread(h) => match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            },
        }
    }
}

fn commit(t: &RepoTarget, job: CommitJob) -> Result<JobResult, CommitError> {
    // Unless the job manager still holds it, the change set is parsed on its own thread while
    // the repository is opened (for many entries both take a fraction of a second: the parse,
    // and decompressing the root catalog).
    let parsing = match &job.preloaded {
        Some(cs) => Parsing::Held(cs.clone()),
        None => {
            let path = job.changeset.clone();
            Parsing::Thread(
                thread::Builder::new()
                    .name("changeset".into())
                    .spawn(move || load_changeset(&path).map(Arc::new))
                    .map_err(|e| err("internal", e, true))?,
            )
        }
    };
    let cas_arc = t.cas(false).map_err(|e| err("cas-unavailable", e, true))?;
    let cas = cas_arc.as_ref();
    let keys =
        RepoKeys::load(&t.keys_dir, &t.name).map_err(|e| err("keys-unavailable", e, false))?;
    // Local storages are also locked against other processes (e.g. `repo ingest`); commits of
    // this daemon are already serialised by this thread.
    let _lock = if t.s3.is_none() {
        Some(repo::lock_storage(&t.storage).map_err(|e| err("repository-locked", e, true))?)
    } else {
        None
    };
    if let Some(done) = already_committed(cas, &job.job)? {
        return Ok(done);
    }
    let (m, _) = repo::current_manifest(cas)
        .map_err(|e| err("repository-unreadable", e, true))?
        .ok_or_else(|| {
            err(
                "repository-missing",
                "no repository in storage (run repo init)",
                false,
            )
        })?;
    job.begin(m.root_catalog.to_string(), true)?;
    crate::testhook::point("commit-started");
    let tags = job_tags(&job.job);
    let now = prepub_core::timefmt::now();
    let abort = job.abort.clone();
    let proceed = move || !abort.load(Ordering::SeqCst);
    let expiry = t.tag_expiry.clone().map(|mut x| {
        x.exempt.extend(job.unconfirmed.iter().cloned());
        x
    });
    let expiry = expiry.as_ref();
    let mut unparsed = None;
    let p = repo::publish_guarded(cas, &keys, &tags, expiry, now, &proceed, |tree| {
        let cs = match parsing.get() {
            Ok(cs) => cs,
            Err(e) => {
                unparsed = Some(e);
                return Err(RepoError::Invalid("the change set cannot be read".into()));
            }
        };
        // A removal applies its change set (one removal) to the parent, merging.
        let (target, mode) = if job.job.removal {
            (
                prepub_core::catalog::split_path(&job.job.path).0,
                ApplyMode::Merge,
            )
        } else {
            (job.job.path.as_str(), ApplyMode::Replace)
        };
        if job.job.removal && tree.lookup(&job.job.path)?.is_none() {
            return Err(RepoError::Invalid(format!(
                "{} does not exist in the current revision",
                job.job.path
            )));
        }
        repo::apply_changeset(tree, cas, &cs, target, mode, &job.params, now)
    })
    .inspect(|_| crate::testhook::point("manifest-written"))
    .map_err(|e| match e {
        _ if unparsed.is_some() => unparsed.take().expect("checked"),
        RepoError::Cancelled => err(
            "aborted",
            "job aborted during its commit; nothing was published",
            false,
        ),
        e @ RepoError::TagTaken(_) => err("tag-taken", e, false),
        e => {
            let r = e.is_retryable();
            err(if r { "commit-io" } else { "commit-rejected" }, e, r)
        }
    })?;
    let done = JobResult {
        root_hash: p.commit.root.to_string(),
        revision: p.manifest.revision,
        tag: tags.last().map(|t| t.name.clone()).unwrap_or_default(),
    };
    // The change set the job manager handed over (the last reference to it, mostly) is freed
    // while the job walks on.
    prepub_core::drop_aside(job);
    Ok(done)
}
