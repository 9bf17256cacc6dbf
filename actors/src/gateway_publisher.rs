//! Gateway publish mode: `GatewayPublisher` commits jobs through a stock `cvmfs_gateway`, and
//! `GatewayLease` keeps the heartbeat of every lease held.
//!
//! Per repository, one commit thread (so commits stay in order) runs each job as the stock
//! publisher does, but with the lease held only for the catalog work: the job's objects are
//! already in the CAS that is the Stratum 0 storage. Steps: read and verify `.cvmfspublished`
//! from the Stratum 0 (C_O); unless the job's tag is there already, journal the start; choose
//! the lease path (the target, or its first ancestor missing in the repository, since a receiver
//! applies changes only inside the lease); take the lease, waiting with backoff on `path_busy` up
//! to `lease_wait`; build the new catalogs from C_O with the core's editor (catalogs fetched over
//! HTTP, new ones written to scratch); send the catalogs as object packs (children before
//! parents); commit with old and new root.
//! Quirks handled: an expired `lease_ttl` is never committed on (cancel, new lease, resubmit); a
//! failed commit is never retried on the same lease; `merge_error` (a lagging manifest) waits
//! for the manifest to advance and starts over; bad credentials fail the job at once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use actix::prelude::*;
use crossbeam_channel::{unbounded, Sender};
use prepub_core::cas::{get_all, Cas, LocalCas, OverlayCas};
use prepub_core::catalog::tree::CatalogTree;
use prepub_core::gateway::{lease_path, PackBuilder};
use prepub_core::hash::ObjectId;
use prepub_core::history::History;
use prepub_core::jobs::{JobRecord, JobResult};
use prepub_core::object::decode_to_vec;
use prepub_core::repo::{self, ApplyMode, TagRequest};

use crate::gateway_client::{GatewayClient, GwError, LeaseReply};
use crate::http_store::HttpStore;
use crate::publisher::{CommitError, CommitJob, CommitWaiting, Committed};

/// Settings of gateway mode.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub url: String,
    pub key_id: String,
    pub secret: String,
    /// Never commit on a lease older than this.
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// How long to wait for a busy path before the job fails.
    pub lease_wait: Duration,
    /// Base URL of the Stratum 0; the repository is at `<stratum0_url>/<repo>`.
    pub stratum0_url: String,
    /// Largest object pack.
    pub pack_bytes: usize,
    /// Where `<repo>.pub` master keys are; when set, the Stratum 0 whitelist is verified too.
    pub public_keys_dir: Option<std::path::PathBuf>,
}

/// Verifies the Stratum 0's whitelist with the configured master public key: signature,
/// repository name, expiry, and that it lists the certificate that signed the manifest.
fn verify_whitelist(
    s: &GatewaySettings,
    repo_name: &str,
    remote: &dyn Cas,
    cert_pem: &str,
) -> Result<(), CommitError> {
    let Some(dir) = &s.public_keys_dir else {
        return Ok(());
    };
    use rsa::pkcs8::DecodePublicKey;
    let p = dir.join(format!("{repo_name}.pub"));
    let pem = std::fs::read_to_string(&p)
        .map_err(|e| err("keys-unavailable", format!("{}: {e}", p.display()), false))?;
    let key = rsa::RsaPublicKey::from_public_key_pem(&pem)
        .or_else(|_| <rsa::RsaPublicKey as rsa::pkcs1::DecodeRsaPublicKey>::from_pkcs1_pem(&pem))
        .map_err(|e| err("keys-unavailable", format!("{}: {e}", p.display()), false))?;
    let bytes = remote
        .get_root_file(repo::WHITELIST)
        .map_err(|e| err("stratum0-unreadable", e, true))?
        .ok_or_else(|| {
            err(
                "stratum0-untrusted",
                "the Stratum 0 has no .cvmfswhitelist",
                true,
            )
        })?;
    let w = prepub_core::manifest::Whitelist::parse(&bytes)
        .map_err(|e| err("stratum0-untrusted", e, true))?;
    w.verify(&key)
        .map_err(|e| err("stratum0-untrusted", e, true))?;
    if w.name != repo_name {
        return Err(err(
            "stratum0-untrusted",
            format!("whitelist is for {}", w.name),
            true,
        ));
    }
    if w.expires <= prepub_core::timefmt::now() {
        return Err(err(
            "stratum0-untrusted",
            "the Stratum 0 whitelist has expired",
            true,
        ));
    }
    let fp = prepub_core::keys::certificate_fingerprint(cert_pem)
        .map_err(|e| err("stratum0-untrusted", e, true))?;
    if !w.lists(&fp) {
        return Err(err(
            "stratum0-untrusted",
            "the manifest's certificate is not in the whitelist",
            true,
        ));
    }
    Ok(())
}

fn err(code: &'static str, e: impl ToString, retryable: bool) -> CommitError {
    CommitError {
        code,
        message: e.to_string(),
        retryable,
    }
}

fn gw_err(e: GwError) -> CommitError {
    match e {
        GwError::Credentials(m) => err(
            "gateway-credentials",
            format!("gateway refused the key: {m}"),
            false,
        ),
        GwError::Refused(m) => err("gateway-refused", format!("gateway refused: {m}"), true),
        GwError::Transport(m) => err("gateway-unavailable", m, true),
    }
}

/// Starts or stops the heartbeat of a lease.
#[derive(Message)]
#[rtype(result = "()")]
pub enum Heartbeat {
    Start(String),
    Stop(String),
}

/// `GatewayLease`: renews held leases every `heartbeat_interval` on its own arbiter (so a busy
/// mailbox elsewhere cannot make it late). The stock gateway has no renew endpoint and answers
/// 405; the actor then stops asking and the commit side relies on `lease_ttl` alone.
pub struct GatewayLease {
    client: Arc<GatewayClient>,
    interval: Duration,
    held: HashSet<String>,
    renew_supported: bool,
    /// `cvmfs_prepub_lease_heartbeat_lateness_seconds`
    lateness: Option<prometheus::Histogram>,
    last_tick: Option<std::time::Instant>,
}

impl GatewayLease {
    pub fn new(client: Arc<GatewayClient>, interval: Duration) -> GatewayLease {
        GatewayLease {
            client,
            interval,
            held: HashSet::new(),
            renew_supported: true,
            lateness: None,
            last_tick: None,
        }
    }

    /// Records how late each tick runs.
    pub fn with_lateness(mut self, h: prometheus::Histogram) -> GatewayLease {
        self.lateness = Some(h);
        self
    }
}

impl Actor for GatewayLease {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, _| {
            let now = std::time::Instant::now();
            if let (Some(h), Some(last)) = (&act.lateness, act.last_tick) {
                let late = now.duration_since(last).saturating_sub(act.interval);
                h.observe(late.as_secs_f64());
            }
            act.last_tick = Some(now);
            if !act.renew_supported {
                return;
            }
            for t in act.held.clone() {
                // Ok(false): no renew endpoint (stock gateway, 405); errors are retried next tick.
                if let Ok(false) = act.client.renew(&t) {
                    act.renew_supported = false;
                }
            }
        });
    }
}

impl Handler<Heartbeat> for GatewayLease {
    type Result = ();
    fn handle(&mut self, m: Heartbeat, _: &mut Context<Self>) {
        match m {
            Heartbeat::Start(t) => {
                self.held.insert(t);
            }
            Heartbeat::Stop(t) => {
                self.held.remove(&t);
            }
        }
    }
}

pub struct GatewayPublisher {
    queues: HashMap<String, Sender<CommitJob>>,
}

impl GatewayPublisher {
    /// One commit thread per repository of `repos`; `spool` is the spool root, whose job
    /// directories may hold leases that jobs which ended could not give back.
    pub fn new(
        repos: Vec<String>,
        settings: Arc<GatewaySettings>,
        client: Arc<GatewayClient>,
        heartbeat: Addr<GatewayLease>,
        spool: PathBuf,
    ) -> GatewayPublisher {
        let mut queues = HashMap::new();
        for name in repos {
            let (tx, rx) = unbounded::<CommitJob>();
            let (s, c, hb, repo, spool) = (
                settings.clone(),
                client.clone(),
                heartbeat.clone(),
                name.clone(),
                spool.clone(),
            );
            let _ = thread::Builder::new()
                .name(format!("gw-commit-{name}"))
                .spawn(move || {
                    // Before the first commit, and after a commit that failed (it may have
                    // kept a lease it could not give back, or panicked holding one).
                    let (mut sweep, mut left) = (true, false);
                    while let Ok(job) = rx.recv() {
                        if sweep || left {
                            left = give_back_ended_leases(&spool, &repo, &c);
                        }
                        let id = job.job.id.clone();
                        let done = job.done.clone();
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                commit(&s, &c, &hb, &repo, job)
                            }))
                            .unwrap_or_else(|_| {
                                Err(err(
                                    "internal",
                                    "the commit panicked; see the daemon log",
                                    false,
                                ))
                            });
                        sweep = outcome.is_err();
                        done.do_send(Committed {
                            job_id: id,
                            outcome,
                        });
                    }
                });
            queues.insert(name, tx);
        }
        GatewayPublisher { queues }
    }
}

impl Actor for GatewayPublisher {
    type Context = Context<Self>;
}

impl Handler<CommitJob> for GatewayPublisher {
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

/// Gives back the leases journaled (`jobs/<id>/lease.token`) by `repo`'s jobs that have ended
/// (their `job.json` says so): a job's own commit gives back a lease it finds, but one that
/// ended never commits again — its retries ran out while the gateway could not be reached to
/// cancel it, or its commit panicked holding it. Without this the path stays busy until the
/// gateway expires the lease. A lease that cannot be given back now (gateway unreachable)
/// stays for the next sweep. Returns whether any lease file of another job is left (one not
/// ended yet, or not given back): the next commit sweeps again.
fn give_back_ended_leases(spool: &Path, repo: &str, client: &GatewayClient) -> bool {
    let Ok(dirs) = std::fs::read_dir(spool.join("jobs")) else {
        return false;
    };
    let mut left = false;
    for dir in dirs.flatten().map(|e| e.path()) {
        let lease_file = dir.join("lease.token");
        let Ok(token) = std::fs::read_to_string(&lease_file) else {
            continue;
        };
        let ended = std::fs::read(dir.join("job.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<JobRecord>(&b).ok())
            .map(|j| (j.repo == repo, j.state.is_terminal()));
        match ended {
            Some((true, true)) => {}
            Some((true, false)) => {
                left = true;
                continue;
            }
            _ => continue,
        }
        if give_back(client, &lease_file, token.trim()).is_err() {
            left = true;
        }
    }
    left
}

/// Cancels the journaled lease `token` and removes its file `lease_file`, also when the gateway
/// refuses (the lease was consumed by a commit, or expired: nothing to give back). When the
/// gateway cannot be reached the file is kept and the transport error returned.
fn give_back(client: &GatewayClient, lease_file: &Path, token: &str) -> Result<(), String> {
    match client.cancel(token) {
        Ok(()) => crate::testhook::point("stale-lease-cancelled"),
        Err(GwError::Transport(e)) => return Err(e),
        Err(_) => {}
    }
    let _ = std::fs::remove_file(lease_file);
    Ok(())
}

fn aborted_during() -> CommitError {
    err(
        "aborted",
        "job aborted during its commit; nothing was published",
        false,
    )
}

/// The marker a job's tag description carries, so a restarted daemon recognises its commit.
fn marker(job: &JobRecord) -> String {
    format!("[cvmfs-prepub job {}]", job.id)
}

fn tag_for(job: &JobRecord) -> (String, String) {
    let name = job
        .tag_name
        .clone()
        .unwrap_or_else(|| format!("prepub-{}", job.id));
    let mut desc = match job.tag_description.as_deref() {
        Some(d) if !d.is_empty() => d.to_string(),
        _ => "published by cvmfs-prepub".to_string(),
    };
    // A scoped token's tag says whose it is (see `repo::may_take_tag`); the job marker ends it.
    if let (Some(owner), Some(_)) = (&job.owner, &job.tag_name) {
        desc = format!("{desc} {}", repo::owner_note(owner));
    }
    (name, format!("{desc} {}", marker(job)))
}

/// The tags of the Stratum 0's current history (none without one).
fn remote_tags(
    remote: &dyn Cas,
    m: &prepub_core::manifest::Manifest,
) -> Result<Vec<prepub_core::history::Tag>, CommitError> {
    Ok(current_history(remote, m)?.tags)
}

/// What a Stratum 0 history holds that a commit looks at.
#[derive(Default)]
struct RemoteHistory {
    tags: Vec<prepub_core::history::Tag>,
    /// The history it was made from (its `previous_revision`).
    previous: Option<ObjectId>,
}

/// The Stratum 0's current history (empty if the manifest names none).
fn current_history(
    remote: &dyn Cas,
    m: &prepub_core::manifest::Manifest,
) -> Result<RemoteHistory, CommitError> {
    match m.history {
        Some(h) => remote_history(remote, &h)?.ok_or_else(|| {
            err(
                "stratum0-unreadable",
                format!("history {h} not found"),
                true,
            )
        }),
        None => Ok(RemoteHistory::default()),
    }
}

/// The Stratum 0's history object `h`; `None` if the Stratum 0 does not have it.
fn remote_history(remote: &dyn Cas, h: &ObjectId) -> Result<Option<RemoteHistory>, CommitError> {
    let bytes = match get_all(remote, h) {
        Ok(b) => b,
        Err(prepub_core::cas::CasError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(err("stratum0-unreadable", e, true)),
    };
    let bytes = decode_to_vec(h, &bytes, true).map_err(|e| err("stratum0-unreadable", e, true))?;
    let tmp = tempfile::NamedTempFile::new().map_err(|e| err("scratch", e, true))?;
    std::fs::write(tmp.path(), bytes).map_err(|e| err("scratch", e, true))?;
    let hist = History::open(tmp.path()).map_err(|e| err("stratum0-unreadable", e, true))?;
    let tags = hist
        .tags()
        .map_err(|e| err("stratum0-unreadable", e, true))?;
    let previous = hist
        .previous_revision()
        .map_err(|e| err("stratum0-unreadable", e, true))?;
    Ok(Some(RemoteHistory { tags, previous }))
}

/// How many histories back `landed_since` looks before it gives up.
const HISTORY_WALK_LIMIT: usize = 1000;

/// What the repository's histories say of a commit request a job sent on root catalog `base`
/// without seeing the answer.
#[derive(Debug)]
enum SinceBase {
    /// A history made since holds the job's marker: its commit landed.
    Landed(JobResult),
    /// The histories made since `base` do not: the request never landed.
    NotLanded,
    /// The chain of histories breaks before reaching `base` (why).
    Unknown(String),
}

/// Looks for this job's marker in the histories made since `base`, newest first from `start`
/// along their `previous_revision` chain (upstream's history walk): a named tag another publish moved on
/// has lost the marker from the current history, but keeps it in the history the job's commit
/// made. Reaching the history whose `trunk` is `base` without finding it means the request did
/// not land. A history that does not name the one before it (written by a tool that does not
/// record it) or that the Stratum 0 no longer stores (collected) leaves the answer unknown.
fn landed_since(
    remote: &dyn Cas,
    start: Option<ObjectId>,
    base: &str,
    job: &JobRecord,
) -> Result<SinceBase, CommitError> {
    let Ok(base_hex) = ObjectId::parse(base).map(|id| id.digest.hex()) else {
        return Ok(SinceBase::Unknown(
            "its journaled base is unreadable".into(),
        ));
    };
    let mut next = start;
    for _ in 0..HISTORY_WALK_LIMIT {
        let Some(h) = next else {
            return Ok(SinceBase::Unknown(
                "a history on the way does not name the one before it".into(),
            ));
        };
        let Some(RemoteHistory { tags, previous }) = remote_history(remote, &h)? else {
            return Ok(SinceBase::Unknown(format!(
                "history {h} is no longer on the Stratum 0"
            )));
        };
        if let Some(done) = already_committed(&tags, job) {
            return Ok(SinceBase::Landed(done));
        }
        if tags.iter().any(|t| t.name == "trunk" && t.hash == base_hex) {
            return Ok(SinceBase::NotLanded);
        }
        next = previous;
    }
    Ok(SinceBase::Unknown(format!(
        "the request's base is more than {HISTORY_WALK_LIMIT} histories back"
    )))
}

/// The Stratum 0's current manifest and certificate (at `url`, for messages).
fn stratum0_manifest(
    remote: &dyn Cas,
    url: &str,
) -> Result<(prepub_core::manifest::Manifest, String), CommitError> {
    repo::current_manifest(remote)
        .map_err(|e| err("stratum0-unreadable", format!("{url}: {e}"), true))?
        .ok_or_else(|| {
            err(
                "stratum0-unreadable",
                format!("{url} has no .cvmfspublished"),
                true,
            )
        })
}

/// The job's revision if its commit is already in the repository's history (`tags`).
fn already_committed(tags: &[prepub_core::history::Tag], job: &JobRecord) -> Option<JobResult> {
    let mark = marker(job);
    tags.iter()
        .find(|t| t.description.ends_with(&mark))
        .map(|t| JobResult {
            root_hash: format!("{}C", t.hash),
            revision: t.revision,
            tag: t.name.clone(),
        })
}

/// Whether a commit request this job sent before (journaled in `sent_file`: its base root
/// catalog) landed unseen, which a retry must not repeat. Called once the job's marker was
/// looked for in the current history (`already_committed`) and not found, and once the lease
/// the request used was given back (a request the gateway is still applying then makes the
/// next one fail `merge_error`, and the next round finds its marker). A job without a tag of its own
/// is recognised by its marker tag (`prepub-<job id>`, which nobody else gives or moves), so
/// its commit did not land. A job whose marker is in the description of a named tag loses it
/// from the current history when another publish moves that tag: if the repository has moved
/// since the request's base, the histories made since are searched for the marker
/// (`landed_since`); found, the job is published at the revision its commit made. Where that
/// search cannot answer, the request may have landed (and a second commit would publish the
/// release again over whatever came since, and take the tag back), so the job fails
/// `commit-uncertain` and leaves the decision to the operator. Otherwise the job commits
/// again, journaling its new request over the old one.
/// `previous` is the history the current one was made from (the current one, read by the
/// caller, neither holds the marker nor has `base` as its trunk).
fn sent_before(
    remote: &dyn Cas,
    sent_file: &std::path::Path,
    current: &ObjectId,
    previous: Option<ObjectId>,
    job: &JobRecord,
) -> Result<Option<JobResult>, CommitError> {
    let Ok(base) = std::fs::read_to_string(sent_file) else {
        return Ok(None);
    };
    let base = base.trim();
    let Some(tag) = job
        .tag_name
        .as_deref()
        .filter(|_| base != current.to_string())
    else {
        return Ok(None);
    };
    match landed_since(remote, previous, base, job)? {
        SinceBase::Landed(done) => Ok(Some(done)),
        SinceBase::NotLanded => Ok(None),
        SinceBase::Unknown(why) => Err(err(
            "commit-uncertain",
            format!(
                "this job's earlier commit request (on root catalog {base}) went unanswered and may have landed: \
                 the repository has changed since (root catalog {current}), tag '{tag}' no longer marks this job's \
                 revision, and its history cannot be followed back to that request ({why}); check the repository's \
                 history (cvmfs_server tag -l) and submit the release again if it is missing"
            ),
            false,
        )),
    }
}

/// Fails a scoped token's job whose tag the history holds as someone else's (checked again
/// at every attempt: the tag may have been taken since the job was accepted).
fn check_tag_owner(tags: &[prepub_core::history::Tag], job: &JobRecord) -> Result<(), CommitError> {
    let Some(name) = &job.tag_name else {
        return Ok(());
    };
    let want = TagRequest {
        name: name.clone(),
        description: String::new(),
        owner: job.owner.clone(),
    };
    repo::may_take_tag(&want, tags.iter().find(|t| &t.name == name))
        .map_err(|e| err("tag-taken", e, false))
}

/// The lease sub-path for a publish at `target`: the target itself if its parent exists in the
/// repository, else its shallowest missing ancestor (the receiver only applies changes inside
/// the lease, so directories to be created must lie inside it).
fn choose_lease(tree: &mut CatalogTree<'_>, target: &str) -> Result<String, CommitError> {
    let mut prefix = String::new();
    for comp in target.split('/').filter(|c| !c.is_empty()) {
        let next = format!("{prefix}/{comp}");
        match tree
            .lookup(&next)
            .map_err(|e| err("stratum0-unreadable", e, true))?
        {
            Some(e) if e.is_dir() || next == target => prefix = next,
            Some(_) => {
                return Err(err(
                    "commit-rejected",
                    format!("cannot publish under {target}: {next} is not a directory"),
                    false,
                ))
            }
            None => return Ok(next),
        }
        if prefix == target {
            break;
        }
    }
    Ok(prefix)
}

fn acquire(
    client: &GatewayClient,
    path: &str,
    wait: Duration,
    job: &CommitJob,
) -> Result<String, CommitError> {
    let abort: &AtomicBool = &job.abort;
    let start = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        if abort.load(Ordering::SeqCst) {
            return Err(err(
                "aborted",
                "job aborted while waiting for a lease",
                false,
            ));
        }
        match client.acquire(path).map_err(gw_err)? {
            LeaseReply::Granted(t) => {
                job.waiting.do_send(CommitWaiting {
                    job_id: job.job.id.clone(),
                    note: None,
                });
                return Ok(t);
            }
            LeaseReply::Busy(remaining) => {
                job.waiting.do_send(CommitWaiting {
                    job_id: job.job.id.clone(),
                    note: Some(format!(
                        "waiting for the gateway lease on {path} (busy, {remaining} remaining)"
                    )),
                });
                if start.elapsed() >= wait {
                    return Err(err(
                        "lease-timeout",
                        format!(
                            "{path} stayed busy for {}s (gateway: {remaining} remaining)",
                            wait.as_secs()
                        ),
                        true,
                    ));
                }
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Waits (bounded) until the Stratum 0 manifest no longer shows `root`.
fn wait_manifest_change(remote: &dyn Cas, root: &ObjectId, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some((m, _))) = repo::current_manifest(remote) {
            if &m.root_catalog != root {
                return;
            }
        }
        thread::sleep(Duration::from_millis(250));
    }
}

fn commit(
    s: &GatewaySettings,
    client: &GatewayClient,
    hb: &Addr<GatewayLease>,
    repo_name: &str,
    job: CommitJob,
) -> Result<JobResult, CommitError> {
    let cs = job.load_changeset()?;
    let url = format!("{}/{}", s.stratum0_url.trim_end_matches('/'), repo_name);
    let remote: Arc<dyn Cas> =
        Arc::new(HttpStore::new(&url).map_err(|e| err("stratum0-unreadable", e, true))?);
    // A lease this job held when the daemon stopped is journaled next to its change set:
    // give it back first, or the path stays busy until the gateway expires it.
    let lease_file = job.changeset.with_file_name("lease.token");
    // The base of a commit request sent whose outcome this job has not seen (see `sent_before`).
    let sent_file = job.changeset.with_file_name("commit.sent");
    if let Ok(old) = std::fs::read_to_string(&lease_file) {
        // Unreachable: kept, to be given back by the next attempt (a new lease on the path
        // waits for it meanwhile).
        give_back(client, &lease_file, old.trim()).map_err(|e| {
            err(
                "gateway-unavailable",
                format!("giving back the lease held before the restart: {e}"),
                true,
            )
        })?;
    }
    let mut handshake_done = false;
    for _round in 0..5 {
        let (m, cert_pem) = stratum0_manifest(remote.as_ref(), &url)?;
        verify_whitelist(s, repo_name, remote.as_ref(), &cert_pem)?;
        let RemoteHistory { tags, previous } = current_history(remote.as_ref(), &m)?;
        if let Some(done) = already_committed(&tags, &job.job) {
            return Ok(done);
        }
        if let Some(done) = sent_before(
            remote.as_ref(),
            &sent_file,
            &m.root_catalog,
            previous,
            &job.job,
        )? {
            return Ok(done);
        }
        check_tag_owner(&tags, &job.job)?;
        let base = m.root_catalog;
        if !handshake_done {
            // Journaled before anything heavy (the catalog build, the lease): an abort from now
            // on is carried out by this thread, which gives back what it holds, and a start
            // that never ends (the daemon stopped) counts as an attempt when it resumes.
            job.begin(base.to_string(), true)?;
            handshake_done = true;
            crate::testhook::point("commit-started");
        }
        if job.abort.load(Ordering::SeqCst) {
            return Err(aborted_during());
        }
        let scratch = tempfile::tempdir().map_err(|e| err("scratch", e, true))?;
        let local = LocalCas::create(&scratch.path().join("cas"))
            .map_err(|e| err("scratch", e, true))?
            .without_fsync();
        let overlay = OverlayCas {
            local,
            remote: remote.clone(),
        };
        std::fs::create_dir_all(scratch.path().join("tree"))
            .map_err(|e| err("scratch", e, true))?;
        let mut tree = CatalogTree::open(&overlay, &scratch.path().join("tree"), &base)
            .map_err(|e| err("stratum0-unreadable", e, true))?;
        // A removal applies its change set (one removal) to the parent, merging; the lease
        // covers the parent, inside which the receiver applies the removal.
        let (target, mode) = if job.job.removal {
            (
                prepub_core::catalog::split_path(&job.job.path).0,
                ApplyMode::Merge,
            )
        } else {
            (job.job.path.as_str(), ApplyMode::Replace)
        };
        if job.job.removal
            && tree
                .lookup(&job.job.path)
                .map_err(|e| err("stratum0-unreadable", e, true))?
                .is_none()
        {
            return Err(err(
                "commit-rejected",
                format!("{} does not exist in the current revision", job.job.path),
                false,
            ));
        }
        // The catalogs of a new release are built (into the scratch store, uploaded with the
        // others) before the lease, which then covers only grafting them; any trouble here
        // only means they are built under the lease as before.
        let prebuilt = if job.job.removal {
            None
        } else {
            let now = prepub_core::timefmt::now();
            repo::prebuild_in(&mut tree, &overlay, &cs, target, &job.params, now)
                .ok()
                .flatten()
                .inspect(|_| crate::testhook::point("catalogs-prebuilt"))
        };
        if job.abort.load(Ordering::SeqCst) {
            return Err(aborted_during());
        }
        let lease_sub = choose_lease(&mut tree, target)?;
        let lpath = lease_path(repo_name, &lease_sub);
        // The lease is taken only now: everything before ran without locking the repository.
        let token = acquire(client, &lpath, s.lease_wait, &job)?;
        let acquired = Instant::now();
        hb.do_send(Heartbeat::Start(token.clone()));
        let release = |why_cancel: bool| {
            hb.do_send(Heartbeat::Stop(token.clone()));
            if why_cancel {
                let _ = client.cancel(&token);
            }
            let _ = std::fs::remove_file(&lease_file);
        };
        if let Err(e) = prepub_core::spool::write_atomic(&lease_file, token.as_bytes()) {
            release(true);
            return Err(err("spool-write", e, true));
        }
        crate::testhook::point("lease-acquired");
        let now = prepub_core::timefmt::now();
        let built = repo::apply_changeset_with(
            &mut tree,
            &overlay,
            &cs,
            target,
            mode,
            &job.params,
            now,
            prebuilt.as_ref(),
        )
        .map_err(|e| err("commit-rejected", e, false))
        .and_then(|_| tree.commit(now).map_err(|e| err("commit-io", e, true)));
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                release(true);
                return Err(e);
            }
        };
        if job.abort.load(Ordering::SeqCst) {
            release(true);
            return Err(aborted_during());
        }
        // Catalogs, children before parents (the order the tree wrote them), in bounded packs.
        let mut pack = PackBuilder::new();
        let mut objects: Vec<Vec<u8>> = Vec::new();
        let mut sent = Ok(());
        for id in &built.written {
            let bytes = match get_all(&overlay.local, id) {
                Ok(b) => b,
                Err(e) => {
                    sent = Err(err("scratch", e, true));
                    break;
                }
            };
            if !pack.is_empty() && pack.payload_bytes() + bytes.len() > s.pack_bytes {
                if let Err(e) = client.payload(&token, &pack.header(), &objects) {
                    sent = Err(gw_err(e));
                    break;
                }
                pack = PackBuilder::new();
                objects.clear();
            }
            pack.add(*id, bytes.len());
            objects.push(bytes);
        }
        if sent.is_ok() && !pack.is_empty() {
            sent = client
                .payload(&token, &pack.header(), &objects)
                .map_err(gw_err);
        }
        match sent {
            Ok(()) => {}
            Err(e) if e.message.contains("invalid lease") => {
                // The gateway expired the lease under us: take a new one and resubmit.
                release(false);
                continue;
            }
            Err(e) => {
                release(true);
                return Err(e);
            }
        }
        if job.abort.load(Ordering::SeqCst) {
            release(true);
            return Err(aborted_during());
        }
        if acquired.elapsed() >= s.lease_ttl {
            // Never commit on a lease that may have run out: start over with a new one.
            release(true);
            continue;
        }
        // A scoped token's tag, checked before the lease, may have been made by another
        // publisher since (the gateway applies the commit's tag unconditionally): checked
        // again as late as possible, right before the request.
        if let (Some(_), Some(_)) = (&job.job.owner, &job.job.tag_name) {
            let late = stratum0_manifest(remote.as_ref(), &url)
                .and_then(|(m, _)| remote_tags(remote.as_ref(), &m))
                .and_then(|tags| check_tag_owner(&tags, &job.job));
            if let Err(e) = late {
                release(true);
                return Err(e);
            }
        }
        let (tag, desc) = tag_for(&job.job);
        // Journaled before the request: if its answer is never seen (the daemon stops, the
        // connection breaks), the next attempt knows that this commit may have landed.
        if let Err(e) = prepub_core::spool::write_atomic(&sent_file, base.to_string().as_bytes()) {
            release(true);
            return Err(err("spool-write", e, true));
        }
        crate::testhook::point("commit-requested");
        match client.commit(
            &token,
            &format!("{base}"),
            &format!("{}", built.root),
            &tag,
            &desc,
        ) {
            Ok(rev) => {
                release(false);
                crate::testhook::point("manifest-written");
                // Report the repository's new root once the Stratum 0 shows it.
                wait_manifest_change(remote.as_ref(), &base, Duration::from_secs(10));
                let root = repo::current_manifest(remote.as_ref())
                    .ok()
                    .flatten()
                    .filter(|(m, _)| m.revision >= rev)
                    .map(|(m, _)| m.root_catalog.to_string())
                    .unwrap_or_else(|| built.root.to_string());
                return Ok(JobResult {
                    root_hash: root,
                    revision: rev,
                    tag,
                });
            }
            Err(GwError::Refused(r)) if r == "invalid lease" => {
                release(false);
                // Refused: nothing landed.
                let _ = std::fs::remove_file(&sent_file);
                continue;
            }
            Err(GwError::Refused(r)) if r == "merge_error" => {
                // Refused: nothing landed. Built on a manifest that lags behind the head: wait
                // for it to advance and redo.
                let _ = std::fs::remove_file(&sent_file);
                release(true);
                wait_manifest_change(
                    remote.as_ref(),
                    &base,
                    s.lease_wait.min(Duration::from_secs(60)),
                );
                continue;
            }
            Err(e) => {
                // A refusal is an answer (nothing landed); after a transport error the outcome
                // is unknown, and the journaled request stays for the next attempt to weigh.
                if !matches!(e, GwError::Transport(_)) {
                    let _ = std::fs::remove_file(&sent_file);
                }
                // A failed commit cannot be retried on the same lease.
                release(true);
                return Err(gw_err(e));
            }
        }
    }
    Err(err(
        "gateway-retries",
        "gave up after 5 lease rounds (expired leases or merge errors)",
        true,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prepub_core::hash::{Digest20, Suffix};
    use prepub_core::history::Tag;

    /// Root catalog `n` of the test repository.
    fn root(n: u8) -> ObjectId {
        ObjectId::new(Digest20([n; 20]), Suffix::Catalog)
    }

    fn tag(name: &str, revision: u8, description: &str) -> Tag {
        Tag {
            name: name.into(),
            hash: root(revision).digest.hex(),
            revision: u64::from(revision),
            timestamp: 1_700_000_000 + i64::from(revision),
            description: description.into(),
            size: 4096,
        }
    }

    /// Stores in `cas` a history with `tags` that names `previous`; its object name.
    fn history(cas: &LocalCas, tags: &[Tag], previous: Option<&ObjectId>) -> ObjectId {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("history.db");
        let h = History::create(&file, "test.example.org").unwrap();
        for t in tags {
            h.put_tag(t).unwrap();
        }
        if let Some(p) = previous {
            h.set_previous_revision(p).unwrap();
        }
        h.close().unwrap();
        let (id, bytes) =
            prepub_core::object::compress_metadata(&std::fs::read(&file).unwrap(), Suffix::History);
        cas.put_bytes(&id, &bytes).unwrap();
        id
    }

    /// A job's request on revision 1's root went unanswered; revision 3 (another publisher's)
    /// moved its tag `nightly`. `landed` says whether revision 2 is the job's commit.
    fn walk(landed: bool, cut: bool) -> SinceBase {
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap().without_fsync();
        let mut job = JobRecord::new("job-1".into(), "test.example.org".into(), "/sw".into(), 0);
        job.tag_name = Some("nightly".into());
        let ours = format!("release {}", marker(&job));
        let h1 = history(&cas, &[tag("trunk", 1, "")], None);
        let rev2 = if landed {
            ours.as_str()
        } else {
            "someone else's [cvmfs-prepub job job-0]"
        };
        let h2 = history(
            &cas,
            &[
                tag("trunk", 2, ""),
                tag("trunk-previous", 1, ""),
                tag("nightly", 2, rev2),
            ],
            (!cut).then_some(&h1),
        );
        let h3 = history(
            &cas,
            &[
                tag("trunk", 3, ""),
                tag("trunk-previous", 2, ""),
                tag("nightly", 3, "newer [cvmfs-prepub job job-2]"),
            ],
            Some(&h2),
        );
        landed_since(&cas, Some(h3), &root(1).to_string(), &job).unwrap()
    }

    #[test]
    fn the_history_walk_finds_a_lost_commit_or_the_request_base() {
        match walk(true, false) {
            SinceBase::Landed(r) => {
                assert_eq!(r.revision, 2);
                assert_eq!(r.tag, "nightly");
                assert_eq!(r.root_hash, root(2).to_string());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(walk(false, false), SinceBase::NotLanded));
        // The history before revision 2 is not named: neither the marker nor the base is found.
        match walk(false, true) {
            SinceBase::Unknown(why) => assert!(why.contains("does not name"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Found before the chain breaks: the break does not matter.
        assert!(matches!(walk(true, true), SinceBase::Landed(_)));
    }

    #[test]
    fn a_history_no_longer_stored_leaves_the_walk_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let cas = LocalCas::create(dir.path()).unwrap().without_fsync();
        let mut job = JobRecord::new("job-1".into(), "test.example.org".into(), "/sw".into(), 0);
        job.tag_name = Some("nightly".into());
        let gone = ObjectId::new(Digest20([7; 20]), Suffix::History);
        let h3 = history(&cas, &[tag("trunk", 3, "")], Some(&gone));
        match landed_since(&cas, Some(h3), &root(1).to_string(), &job).unwrap() {
            SinceBase::Unknown(why) => assert!(why.contains("no longer on the Stratum 0"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
