//! `JobManager`: the job table, scheduling, retries, aborts, and the hand-offs between the
//! compressor pool and the per-repository commit queues.
//!
//! Every transition is sent to `SpoolJournal` first; the effect that depends on it (handing the
//! job to the next stage, letting a commit proceed) happens only after the journal confirmed the
//! record is on disk. On start — a new process or a supervisor restart — the table is rebuilt
//! from the journal and every unfinished job resumes from its last durable step: a job with a
//! saved change set is not unpacked again, and a job whose commit may have happened is checked
//! against the repository before anything is committed (see `publisher`).
//!
//! A tar is processed while it is still being uploaded ([`ProcessUpload`]): its outcome is kept
//! aside and becomes the job's processing when the upload is accepted ([`SubmitJob`]) for the same
//! repository and path. Nothing of it is journaled — if the upload fails, is refused, or the
//! process restarts, the result is dropped (the objects it stored are garbage for a later
//! collection) and an accepted job is processed from its spooled tar as before. A garbage
//! collection that starts cancels the repository's upload processing, so no dedup decision made
//! before it is used after it. Every processing run has a number, and only the answer of the
//! run the job waits for counts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use prepub_core::intake::{ChangeSet, IntakeLimits};
use prepub_core::jobs::{now_ms, JobRecord, JobState, Progress};
use prepub_core::object::EncodeParams;
use prepub_core::spool::{SerializedChangeset, SpoolError};

use crate::compressor_pool::{
    CompressorPool, ProcessError, ProcessJob, Processed, ProgressMade, TarSource,
};
use crate::metrics::Metrics;
use crate::publisher::{CommitJob, CommitStarting, CommitWaiting, Committed, RepoTarget};
use crate::spool_journal::{AcceptJob, RecordJob, SaveChangeset, Snapshot, SpoolJournal};

/// Static settings of the job manager.
#[derive(Debug, Clone)]
pub struct Settings {
    pub repos: HashMap<String, RepoTarget>,
    pub params: EncodeParams,
    pub limits: IntakeLimits,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub tar_retention: Duration,
    pub spool_root: PathBuf,
    /// Stratum 1 pre-warming, when configured.
    pub distribution: Option<Distribution>,
    /// Set while the service drains: new jobs are refused, accepted ones go on.
    pub draining: Arc<AtomicBool>,
    /// Access tracking: told of every publish (a floor for content lifecycle).
    pub access: Option<Recipient<crate::access_tracker::PublishSeen>>,
}

/// The distributors, one per Stratum 1 endpoint.
#[derive(Clone)]
pub struct Distribution {
    pub settings: Arc<crate::s1_distributor::DistributionSettings>,
    pub endpoints: Vec<(String, Recipient<crate::s1_distributor::Distribute>)>,
    /// The MQTT control plane, when `broker_url` is set: it replaces the HTTP announcement.
    pub mqtt: Option<MqttDistribution>,
}

/// How jobs reach the `MqttBridge`.
#[derive(Clone)]
pub struct MqttDistribution {
    pub announce: Recipient<crate::mqtt_bridge::AnnouncePayload>,
    pub forget: Recipient<crate::mqtt_bridge::Forget>,
    /// How long ready answers are awaited; endpoints silent by then have failed.
    pub quorum_timeout: Duration,
}

impl std::fmt::Debug for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distribution")
            .field(
                "endpoints",
                &self.endpoints.iter().map(|e| &e.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Each endpoint's outcome for one job: (objects pushed, bytes pushed, already present).
type EndpointOutcomes = HashMap<String, Result<crate::s1_distributor::PushReport, String>>;

/// One job's pre-warming in progress.
struct DistState {
    /// Endpoint outcomes so far.
    results: EndpointOutcomes,
    started: Instant,
    /// Endpoints whose push has begun (with MQTT: those that answered ready).
    dispatched: std::collections::HashSet<String>,
}

pub struct JobManager {
    settings: Arc<Settings>,
    jobs: BTreeMap<String, JobRecord>,
    /// The change sets of the last few jobs processed, as saved, for their commits to use
    /// instead of reading them back (see [`JobManager::keep_fresh`]).
    fresh: VecDeque<(String, Arc<ChangeSet>)>,
    aborts: HashMap<String, Arc<AtomicBool>>,
    started_at: HashMap<String, Instant>,
    journal: Addr<SpoolJournal>,
    pool: Addr<CompressorPool>,
    publisher: Recipient<CommitJob>,
    metrics: Metrics,
    recovered_once: bool,
    /// Jobs being pre-warmed.
    distributing: HashMap<String, DistState>,
    /// Jobs whose pre-warming is settled (go on to the commit).
    distributed: std::collections::HashSet<String>,
    /// The last state whose phase duration was recorded, per job.
    phase_seen: HashMap<String, JobState>,
    /// Repositories being garbage-collected: their new jobs wait in `queued`.
    gc_running: std::collections::HashSet<String>,
    /// Tars being processed while they upload, by job id (not jobs yet).
    uploads: HashMap<String, UploadRun>,
    /// Jobs submitted and being journaled (id → repository): not in `jobs` yet, but in flight
    /// for garbage collection — one accepted with the change set of its upload's processing
    /// goes straight on to its commit, with dedup decisions taken before.
    accepting: HashMap<String, String>,
    /// The processing run each processing job waits for.
    runs: HashMap<String, u64>,
    next_run: u64,
    /// Counts the records saved, so that event streams wake at once
    /// ([`JobManager::with_changes`]).
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

/// At most this many uploads are processed while they arrive; later ones wait for acceptance.
const MAX_UPLOAD_RUNS: usize = 2;
/// Change sets held for their commits (see [`JobManager::keep_fresh`]).
const FRESH: usize = 2;

/// What [`JobManager::take_processed_upload`] takes.
struct ProcessedUpload {
    run: u64,
    started: Instant,
    cs: ChangeSet,
    serialized: Option<SerializedChangeset>,
}

/// A tar processed while it uploads.
struct UploadRun {
    repo: String,
    path: String,
    run: u64,
    abort: Arc<AtomicBool>,
    started: Instant,
    /// The outcome, once the run answered.
    outcome: Option<Result<ChangeSet, ProcessError>>,
    /// Its change set serialized ahead, if it was.
    serialized: Option<SerializedChangeset>,
    /// Given up (upload failed, garbage collection began): only waits for its thread to answer.
    cancelled: bool,
    /// [`AwaitUploadRun`] callers: told whether the run ended with a change set.
    waiters: Vec<tokio::sync::oneshot::Sender<bool>>,
}

impl UploadRun {
    /// Ended with a change set that may still be used.
    fn produced(&self) -> bool {
        !self.cancelled && matches!(self.outcome, Some(Ok(_)))
    }

    fn tell_waiters(&mut self) {
        let ok = self.produced();
        for w in self.waiters.drain(..) {
            let _ = w.send(ok);
        }
    }
}

impl JobManager {
    pub fn new(
        settings: Arc<Settings>,
        journal: Addr<SpoolJournal>,
        pool: Addr<CompressorPool>,
        publisher: Recipient<CommitJob>,
        metrics: Metrics,
    ) -> JobManager {
        JobManager {
            settings,
            jobs: BTreeMap::new(),
            aborts: HashMap::new(),
            started_at: HashMap::new(),
            fresh: VecDeque::new(),
            journal,
            pool,
            publisher,
            metrics,
            recovered_once: false,
            distributing: HashMap::new(),
            distributed: std::collections::HashSet::new(),
            phase_seen: HashMap::new(),
            gc_running: Default::default(),
            uploads: HashMap::new(),
            accepting: HashMap::new(),
            runs: HashMap::new(),
            next_run: 0,
            changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// A job's change set is ready: its progress and the pipeline counters.
    fn count_processed(&self, job: &mut JobRecord, cs: &ChangeSet) {
        job.progress = progress_of(cs);
        self.metrics
            .pipeline_dedup_hits_total
            .with_label_values(&[&job.path])
            .inc_by(cs.stats.dedup_hits);
        self.metrics
            .pipeline_objects_new_total
            .with_label_values(&[&job.path])
            .inc_by(cs.stats.new_objects);
        self.metrics
            .pipeline_bytes_total
            .with_label_values(&[&job.path])
            .inc_by(cs.stats.bytes_in);
        // A release found unchanged keeps its catalog: none was built for it.
        if cs.prebuilt.as_ref().is_some_and(|p| !p.unchanged()) {
            self.metrics.catalogs_prebuilt_total.inc();
        }
    }

    /// Whether the upload run of `rec`'s id may stand for the job's processing: not cancelled,
    /// for the same repository and path, and no garbage collection of it began since.
    fn upload_run_fits(&self, rec: &JobRecord) -> bool {
        matches!(self.uploads.get(&rec.id), Some(u) if !u.cancelled
            && u.repo == rec.repo
            && u.path == rec.path
            && !rec.removal
            && !self.gc_running.contains(&rec.repo))
    }

    /// The change set of the finished run of upload `id`, taken for its acceptance, when the
    /// run may stand for the job (see [`adopt_upload_run`](Self::adopt_upload_run)).
    fn take_processed_upload(&mut self, rec: &JobRecord) -> Option<ProcessedUpload> {
        let done = self.uploads.get(&rec.id).is_some_and(|u| u.produced());
        if !done || !self.upload_run_fits(rec) {
            return None;
        }
        let u = self.uploads.remove(&rec.id)?;
        match u.outcome {
            Some(Ok(cs)) => Some(ProcessedUpload {
                run: u.run,
                started: u.started,
                cs,
                serialized: u.serialized,
            }),
            _ => None,
        }
    }

    fn new_run(&mut self) -> u64 {
        self.next_run += 1;
        self.next_run
    }

    /// Gives up an upload's processing run; its entry stays until the run answers, so the number
    /// of reader threads stays bounded.
    fn cancel_upload_run(&mut self, id: &str) {
        if let Some(u) = self.uploads.get_mut(id) {
            u.cancelled = true;
            u.abort.store(true, Ordering::SeqCst);
            u.tell_waiters();
            if u.outcome.is_some() {
                self.uploads.remove(id);
            }
        }
    }

    /// The job `id` was just accepted: takes over the processing of its upload when that ran for
    /// the same repository and path. Returns false when the job must be processed from the spool.
    fn adopt_upload_run(&mut self, id: &str, ctx: &mut Context<Self>) -> bool {
        let Some(job) = self.jobs.get(id).cloned() else {
            return false;
        };
        if !self.upload_run_fits(&job) {
            self.cancel_upload_run(id);
            return false;
        }
        let Some(u) = self.uploads.remove(id) else {
            return false;
        };
        let mut job = job;
        job.attempts += 1;
        job.transition(JobState::Processing, now_ms());
        self.runs.insert(id.to_string(), u.run);
        self.aborts.insert(id.to_string(), u.abort);
        self.started_at.insert(id.to_string(), u.started);
        let id = id.to_string();
        // The journal takes this record before the change set a finished run leads to.
        self.save(job, ctx, {
            let id = id.clone();
            move |act, ctx, ok| {
                if ok {
                    crate::testhook::point("processing-journaled");
                } else {
                    act.journal_retry(id, ctx);
                }
            }
        });
        if let Some(outcome) = u.outcome {
            ctx.notify(Processed {
                job_id: id,
                run: u.run,
                outcome,
                serialized: u.serialized,
            });
        }
        true
    }

    fn update_gauges(&self) {
        for s in [
            JobState::Queued,
            JobState::Processing,
            JobState::Uploading,
            JobState::Distributing,
            JobState::Committing,
            JobState::Published,
            JobState::Failed,
            JobState::Aborted,
        ] {
            let n = self.jobs.values().filter(|j| j.state == s).count() as i64;
            self.metrics
                .jobs_in_state
                .with_label_values(&[s.as_str()])
                .set(n);
        }
        let count = |s: JobState| self.jobs.values().filter(|j| j.state == s).count() as i64;
        self.metrics
            .queue_depth
            .with_label_values(&["processing"])
            .set(count(JobState::Queued));
        self.metrics
            .queue_depth
            .with_label_values(&["commit"])
            .set(count(JobState::Committing));
    }

    /// Tells `changes` of every record saved from now on (one sender shared by the managers
    /// a supervisor starts one after the other, so its receivers outlive a restart).
    pub fn with_changes(mut self, changes: Arc<tokio::sync::watch::Sender<u64>>) -> JobManager {
        self.changes = changes;
        self
    }

    /// Journals `rec`, makes it the current record, then runs `then(ok)`.
    fn save<F>(&mut self, rec: JobRecord, ctx: &mut Context<Self>, then: F)
    where
        F: FnOnce(&mut Self, &mut Context<Self>, bool) + 'static,
    {
        self.observe_phase(&rec);
        if rec.state.is_terminal() {
            self.aborts.remove(&rec.id);
            self.runs.remove(&rec.id);
            self.started_at.remove(&rec.id);
            self.phase_seen.remove(&rec.id);
        }
        self.jobs.insert(rec.id.clone(), rec.clone());
        self.update_gauges();
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        let terminal = rec.state.is_terminal().then(|| rec.clone());
        ctx.spawn(
            self.journal
                .send(RecordJob(rec))
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let ok = matches!(res, Ok(Ok(())));
                    if let (false, Some(rec)) = (ok, terminal) {
                        act.journal_terminal_later(rec, ctx);
                    }
                    then(act, ctx, ok)
                }),
        );
    }

    /// A job's final record could not be journaled: it is journaled again after the retry
    /// backoff (until it is), or a restart would resume the job from its last journaled step
    /// — committing a published job once more, or carrying on with an aborted one.
    fn journal_terminal_later(&mut self, rec: JobRecord, ctx: &mut Context<Self>) {
        ctx.run_later(self.settings.retry_backoff, move |act, ctx| {
            if act.jobs.get(&rec.id) != Some(&rec) {
                return; // superseded (forgotten, or a newer record)
            }
            ctx.spawn(
                act.journal
                    .send(RecordJob(rec.clone()))
                    .into_actor(act)
                    .map(move |res, act, ctx| {
                        if !matches!(res, Ok(Ok(()))) {
                            act.journal_terminal_later(rec, ctx);
                        }
                    }),
            );
        });
    }

    /// When `rec` has entered a new state, the time it spent in the one before goes into
    /// `cvmfs_prepub_job_phase_duration_seconds{phase}` (from the record's own state times).
    fn observe_phase(&mut self, rec: &JobRecord) {
        if self.phase_seen.get(&rec.id) == Some(&rec.state) {
            return;
        }
        self.phase_seen.insert(rec.id.clone(), rec.state);
        let Some(&entered) = rec.state_times.get(&rec.state) else {
            return;
        };
        let before = rec
            .state_times
            .iter()
            .filter(|(s, t)| **s != rec.state && **t <= entered)
            .max_by_key(|(_, t)| **t);
        if let Some((prev, t)) = before {
            self.metrics
                .job_phase_duration_seconds
                .with_label_values(&[prev.as_str()])
                .observe((entered - t).max(0) as f64 / 1000.0);
        }
    }

    fn abort_flag(&mut self, id: &str) -> Arc<AtomicBool> {
        self.aborts
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(AtomicBool::new(false)))
            .clone()
    }

    fn resume(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(job) = self.jobs.get(id).cloned() else {
            return;
        };
        match job.state {
            JobState::Queued | JobState::Processing => {
                if job.state == JobState::Processing
                    && prepub_core::spool::Spool::open_changeset_exists(
                        &self.settings.spool_root,
                        id,
                    )
                {
                    self.after_saved_changeset(id.to_string(), ctx);
                } else {
                    self.start_processing(id.to_string(), ctx);
                }
            }
            JobState::Uploading | JobState::Distributing => {
                self.after_saved_changeset(id.to_string(), ctx)
            }
            JobState::Committing => self.start_commit(id.to_string(), ctx),
            _ => {}
        }
    }

    fn start_processing(&mut self, id: String, ctx: &mut Context<Self>) {
        let Some(mut job) = self.jobs.get(&id).cloned() else {
            return;
        };
        if job.state.is_terminal() {
            return;
        }
        if self.gc_running.contains(&job.repo) {
            // Started when the collection ends (GcEnd): no dedup decision races a deletion.
            job.waiting = Some("garbage collection of the repository is running".into());
            self.jobs.insert(id, job);
            return;
        }
        let Some(target) = self.settings.repos.get(&job.repo).cloned() else {
            let message = format!("repository {} is not configured", job.repo);
            self.end_failed(job, "unknown-repository", message, "permanent", ctx);
            return;
        };
        if job.attempts >= self.settings.max_attempts {
            // Each attempt ended with the daemon (a retried failure would have been counted
            // and stopped by `retry_or_fail`): a job that takes the process down is not resumed
            // forever, holding up the queue.
            let message = format!(
                "processing was started {} times and never finished (the daemon stopped during each attempt); not tried again",
                job.attempts
            );
            self.end_failed(job, "processing-interrupted", message, "permanent", ctx);
            return;
        }
        job.attempts += 1;
        job.transition(JobState::Processing, now_ms());
        let run = self.new_run();
        self.runs.insert(id.clone(), run);
        if job.removal {
            // Nothing to unpack: the change set removes the target from its parent.
            let name = prepub_core::catalog::split_path(&job.path).1.to_string();
            let cs = prepub_core::intake::ChangeSet {
                removals: vec![name],
                ..Default::default()
            };
            self.save(job, ctx, move |act, ctx, ok| {
                if ok {
                    ctx.notify(crate::compressor_pool::Processed {
                        job_id: id,
                        run,
                        outcome: Ok(cs),
                        serialized: None,
                    });
                } else {
                    act.journal_retry(id, ctx);
                }
            });
            return;
        }
        let abort = self.abort_flag(&id);
        let tar = self
            .settings
            .spool_root
            .join("jobs")
            .join(&id)
            .join("payload.tar");
        let params = self.settings.params;
        let limits = self.settings.limits;
        let path = job.path.clone();
        self.save(job, ctx, move |act, ctx, ok| {
            if !ok {
                act.journal_retry(id, ctx);
                return;
            }
            crate::testhook::point("processing-journaled");
            act.started_at.insert(id.clone(), Instant::now());
            act.pool.do_send(ProcessJob {
                job_id: id,
                run,
                tar: TarSource::Spool(tar),
                target,
                path,
                params,
                limits,
                abort,
                done: ctx.address().recipient(),
                progress: ctx.address().recipient(),
            });
        });
    }

    /// The change set is durable: walk uploading → distributing → committing, then queue the
    /// commit. (The local CAS is the served storage, so objects are in place once processed;
    /// with no Stratum 1 configured, distributing passes straight through.)
    fn after_saved_changeset(&mut self, id: String, ctx: &mut Context<Self>) {
        let Some(mut job) = self.jobs.get(&id).cloned() else {
            return;
        };
        if job.state.is_terminal() {
            return;
        }
        let next = match job.state {
            JobState::Queued | JobState::Processing => JobState::Uploading,
            JobState::Uploading => JobState::Distributing,
            JobState::Distributing => {
                if self.settings.distribution.is_some() && !self.distributed.contains(&id) {
                    if !self.distributing.contains_key(&id) {
                        self.start_distribution(id, ctx);
                    }
                    return;
                }
                JobState::Committing
            }
            _ => {
                self.start_commit(id, ctx);
                return;
            }
        };
        job.transition(next, now_ms());
        self.save(job, ctx, move |act, ctx, ok| {
            if ok {
                crate::testhook::point(&format!("{}-journaled", next.as_str()));
                act.after_saved_changeset(id, ctx);
            } else {
                act.journal_retry(id, ctx);
            }
        });
    }

    fn start_distribution(&mut self, id: String, ctx: &mut Context<Self>) {
        let (Some(dist), Some(job)) = (
            self.settings.distribution.clone(),
            self.jobs.get(&id).cloned(),
        ) else {
            return;
        };
        let Some(target) = self.settings.repos.get(&job.repo).cloned() else {
            return;
        };
        let cas = match target.cas(false) {
            Ok(c) => c,
            Err(e) => {
                self.retry_or_fail(
                    id,
                    "cas-unavailable",
                    e.to_string(),
                    true,
                    ctx,
                    JobManager::after_saved_changeset,
                );
                return;
            }
        };
        let changeset = self
            .settings
            .spool_root
            .join("jobs")
            .join(&id)
            .join("changeset.json");
        let mut st = DistState {
            results: HashMap::new(),
            started: Instant::now(),
            dispatched: Default::default(),
        };
        if let Some(mq) = &dist.mqtt {
            // Announce through the broker; each ready answer starts that endpoint's push.
            mq.announce.do_send(crate::mqtt_bridge::AnnouncePayload {
                job_id: id.clone(),
                repo: job.repo.clone(),
                changeset,
                reply: ctx.address().recipient(),
            });
            let (wait, id2) = (mq.quorum_timeout, id.clone());
            ctx.run_later(wait, move |act, ctx| act.ready_deadline(id2, wait, ctx));
        } else {
            for (ep, r) in &dist.endpoints {
                st.dispatched.insert(ep.clone());
                r.do_send(crate::s1_distributor::Distribute {
                    job_id: id.clone(),
                    repo: job.repo.clone(),
                    changeset: changeset.clone(),
                    cas: cas.clone(),
                    done: ctx.address().recipient(),
                    progress: ctx.address().recipient(),
                    grant: None,
                });
            }
        }
        self.distributing.insert(id.clone(), st);
        let timeout = dist.settings.timeout;
        ctx.run_later(timeout, move |act, ctx| {
            act.settle_distribution(id, true, ctx)
        });
    }

    /// `mqtt_quorum_timeout` passed: endpoints that did not answer the announcement have
    /// failed for this job.
    fn ready_deadline(&mut self, id: String, wait: Duration, ctx: &mut Context<Self>) {
        let Some(dist) = self.settings.distribution.clone() else {
            return;
        };
        let Some(st) = self.distributing.get_mut(&id) else {
            return;
        };
        let mut silent = Vec::new();
        for (ep, _) in &dist.endpoints {
            if !st.dispatched.contains(ep) && !st.results.contains_key(ep) {
                let why = format!("no ready answer over MQTT within {}s", wait.as_secs());
                st.results.insert(ep.clone(), Err(why.clone()));
                silent.push((ep.clone(), why));
            }
        }
        if let Some(j) = self.jobs.get_mut(&id) {
            for (ep, why) in silent {
                j.distribution.insert(ep, format!("failed: {why}"));
            }
        }
        self.settle_distribution(id, false, ctx);
    }

    /// Applies the quorum once every endpoint answered, or at the timeout.
    fn settle_distribution(&mut self, id: String, timed_out: bool, ctx: &mut Context<Self>) {
        let Some(dist) = self.settings.distribution.clone() else {
            return;
        };
        let Some(DistState {
            results,
            dispatched,
            ..
        }) = self.distributing.get(&id)
        else {
            return;
        };
        let total = dist.endpoints.len();
        let ok = results.values().filter(|r| r.is_ok()).count();
        let all = results.len() == total;
        let met = total == 0 || (ok as f64) + 1e-9 >= dist.settings.quorum * total as f64;
        if !met && !all && !timed_out {
            return;
        }
        if !(met || all || timed_out) {
            return;
        }
        let Some(mut job) = self.jobs.get(&id).cloned() else {
            return;
        };
        for (ep, _) in &dist.endpoints {
            if results.contains_key(ep) {
                continue;
            }
            // No outcome yet: keep the last progress report beside the verdict.
            let seen = job
                .distribution
                .get(ep)
                .map(|p| format!(" ({p})"))
                .unwrap_or_default();
            let verdict = if timed_out {
                "failed: timed out"
            } else if !dispatched.contains(ep) {
                "skipped: no ready answer before the quorum was met"
            } else {
                "pending"
            };
            job.distribution
                .insert(ep.clone(), format!("{verdict}{seen}"));
        }
        self.distributing.remove(&id);
        if let Some(mq) = &dist.mqtt {
            mq.forget
                .do_send(crate::mqtt_bridge::Forget { job_id: id.clone() });
        }
        if job.state.is_terminal() {
            return; // aborted meanwhile: its pre-warming ends with it, whatever the quorum
        }
        if met || dist.settings.commit_anyway {
            self.distributed.insert(id.clone());
            self.jobs.insert(id.clone(), job);
            self.after_saved_changeset(id, ctx);
        } else {
            let message = format!(
                "{ok} of {total} Stratum 1 endpoints were pre-warmed, the quorum is {}",
                dist.settings.quorum
            );
            self.end_failed(job, "distribution-quorum", message, "transient", ctx);
        }
    }

    /// Holds a job's change set, as saved, for its commit; only the last [`FRESH`] jobs' (the
    /// commit usually follows at once; a job that waits for the repository reads its own back).
    fn keep_fresh(&mut self, id: &str, cs: Arc<ChangeSet>) {
        self.fresh.retain(|(k, _)| k != id);
        self.fresh.push_back((id.to_string(), cs));
        while self.fresh.len() > FRESH {
            self.fresh.pop_front();
        }
    }

    /// The held change set of `id`, no longer held.
    fn take_fresh(&mut self, id: &str) -> Option<Arc<ChangeSet>> {
        let i = self.fresh.iter().position(|(k, _)| k == id)?;
        self.fresh.remove(i).map(|(_, cs)| cs)
    }

    fn start_commit(&mut self, id: String, ctx: &mut Context<Self>) {
        let Some(job) = self.jobs.get(&id).cloned() else {
            return;
        };
        if job.state != JobState::Committing {
            return;
        }
        self.started_at
            .entry(id.clone())
            .or_insert_with(Instant::now);
        let abort = self.abort_flag(&id);
        if job.abort_requested {
            abort.store(true, Ordering::SeqCst);
        }
        let preloaded = self.take_fresh(&id);
        let unconfirmed = self
            .jobs
            .values()
            .filter(|j| j.id != id && j.repo == job.repo && j.state == JobState::Committing)
            .map(|j| crate::publisher::marker_tag(j).name)
            .collect();
        self.publisher.do_send(CommitJob {
            unconfirmed,
            preloaded,
            changeset: self
                .settings
                .spool_root
                .join("jobs")
                .join(&id)
                .join("changeset.json"),
            job,
            params: self.settings.params,
            abort,
            starting: ctx.address().recipient(),
            waiting: ctx.address().recipient(),
            done: ctx.address().recipient(),
        });
    }

    fn retry_or_fail(
        &mut self,
        id: String,
        code: &str,
        message: String,
        retryable: bool,
        ctx: &mut Context<Self>,
        again: fn(&mut Self, String, &mut Context<Self>),
    ) {
        let Some(job) = self.jobs.get(&id).cloned() else {
            return;
        };
        if retryable && job.attempts < self.settings.max_attempts {
            let backoff =
                self.settings.retry_backoff * 2u32.saturating_pow(job.attempts.saturating_sub(1));
            ctx.run_later(backoff, move |act, ctx| again(act, id, ctx));
            return;
        }
        let class = if retryable { "transient" } else { "permanent" };
        self.end_failed(job, code, message, class, ctx);
    }

    /// Ends `job` `failed` with `code` and `message`, counted under `class` (`transient` or
    /// `permanent`), and journals it.
    fn end_failed(
        &mut self,
        mut job: JobRecord,
        code: &str,
        message: String,
        class: &str,
        ctx: &mut Context<Self>,
    ) {
        job.fail(code, message, now_ms());
        self.metrics
            .job_failures_by_class_total
            .with_label_values(&[class])
            .inc();
        self.save(job, ctx, |_, _, _| {});
    }

    /// Rebuilds the table from the journal and resumes unfinished jobs — jobs waiting to
    /// commit in the order they became ready. Retried if the journal does not answer.
    fn reload(&mut self, ctx: &mut Context<Self>) {
        ctx.wait(
            self.journal
                .send(Snapshot)
                .into_actor(self)
                .map(|res, act, ctx| {
                    let Ok(jobs) = res else {
                        ctx.run_later(Duration::from_secs(1), |act, ctx| act.reload(ctx));
                        return;
                    };
                    act.jobs = jobs;
                    let mut unfinished: Vec<(i64, i64, String)> = act
                        .jobs
                        .values()
                        .filter(|j| !j.state.is_terminal())
                        .map(|j| {
                            let entered = j.state_times.get(&j.state).copied().unwrap_or(j.updated);
                            (entered, j.created, j.id.clone())
                        })
                        .collect();
                    unfinished.sort();
                    if !act.recovered_once {
                        act.metrics
                            .jobs_recovered_total
                            .inc_by(unfinished.len() as u64);
                    }
                    act.recovered_once = true;
                    act.update_gauges();
                    for (_, _, id) in unfinished {
                        act.resume(&id, ctx);
                    }
                }),
        );
    }

    /// A record could not be journaled: try the step again later from the current record.
    fn journal_retry(&mut self, id: String, ctx: &mut Context<Self>) {
        ctx.run_later(self.settings.retry_backoff, move |act, ctx| {
            act.resume(&id, ctx)
        });
    }

    fn cleanup_payloads(&mut self, ctx: &mut Context<Self>) {
        let cutoff = now_ms() - self.settings.tar_retention.as_millis() as i64;
        let expired: Vec<JobRecord> = self
            .jobs
            .values()
            .filter(|j| j.state.is_terminal() && !j.tar_deleted && j.updated < cutoff)
            .cloned()
            .collect();
        for mut j in expired {
            j.tar_deleted = true;
            self.save(j, ctx, |_, _, _| {});
        }
    }
}

impl Actor for JobManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.reload(ctx);
        // Check often enough that a tar outlives its retention by at most a quarter of it.
        let every = (self.settings.tar_retention / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        ctx.run_interval(every, |act, ctx| act.cleanup_payloads(ctx));
    }
}

impl Supervised for JobManager {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.metrics
            .actor_restarts_total
            .with_label_values(&["JobManager"])
            .inc();
        // In-memory state is rebuilt from the journal in `started`; runs given before are
        // stale (their answers are ignored) and uploads are processed again once accepted.
        self.jobs.clear();
        self.started_at.clear();
        self.runs.clear();
        for u in self.uploads.values_mut() {
            u.cancelled = true;
            u.abort.store(true, Ordering::SeqCst);
            u.tell_waiters();
        }
        self.uploads.clear();
    }
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the service is draining: new jobs are refused until it is resumed or restarted; accepted jobs go on")]
    Draining,
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("job manager unavailable")]
    Unavailable,
    #[error("the upload's processing was given up; its tar must be on disk to accept it")]
    NotProcessed,
}

/// Accepts a spooled upload as a job.
#[derive(Message)]
#[rtype(result = "Result<JobRecord, SubmitError>")]
pub struct SubmitJob {
    pub record: JobRecord,
    pub upload: PathBuf,
    /// False when the tar is not known to be on disk: then the upload must have been processed
    /// while it arrived ([`AwaitUploadRun`] said so), and the job is accepted with its change
    /// set; otherwise [`SubmitError::NotProcessed`].
    pub tar_synced: bool,
}

impl Handler<SubmitJob> for JobManager {
    type Result = ResponseActFuture<Self, Result<JobRecord, SubmitError>>;
    fn handle(&mut self, m: SubmitJob, _: &mut Context<Self>) -> Self::Result {
        if self.settings.draining.load(Ordering::SeqCst) {
            return Box::pin(fut::ready(Err(SubmitError::Draining)));
        }
        let mut rec = m.record;
        // A tar not known to be on disk is accepted with the change set processed from it (the
        // spool makes that durable before the record), and walks on as after any processing.
        let (mut changeset, mut run, mut serialized) = (None, None, None);
        if !m.tar_synced {
            let Some(ProcessedUpload {
                run: r,
                started,
                cs,
                serialized: ahead,
            }) = self.take_processed_upload(&rec)
            else {
                return Box::pin(fut::ready(Err(SubmitError::NotProcessed)));
            };
            serialized = ahead;
            rec.attempts = 1;
            rec.transition(JobState::Processing, now_ms());
            self.count_processed(&mut rec, &cs);
            let cs = Arc::new(cs);
            changeset = Some(cs.clone());
            run = Some((r, started, cs));
        }
        self.accepting.insert(rec.id.clone(), rec.repo.clone());
        Box::pin(
            self.journal
                .send(AcceptJob {
                    record: rec.clone(),
                    upload: m.upload,
                    changeset,
                    serialized,
                })
                .into_actor(self)
                .map(move |res, act, ctx| {
                    act.accepting.remove(&rec.id);
                    match res {
                        Err(_) => return Err(SubmitError::Unavailable),
                        Ok(Err(e)) => return Err(SubmitError::Spool(e)),
                        Ok(Ok(())) => {}
                    }
                    crate::testhook::point("accepted");
                    act.metrics
                        .jobs_submitted_total
                        .with_label_values(&[&rec.path])
                        .inc();
                    act.jobs.insert(rec.id.clone(), rec.clone());
                    act.update_gauges();
                    match run {
                        Some((run, started, cs)) => {
                            act.keep_fresh(&rec.id, cs);
                            // Queued for no time: its phase is recorded like any job's.
                            act.observe_phase(&rec);
                            act.metrics
                                .cas_upload_duration_seconds
                                .observe(started.elapsed().as_secs_f64());
                            act.runs.insert(rec.id.clone(), run);
                            crate::testhook::point("changeset-saved");
                            act.after_saved_changeset(rec.id.clone(), ctx);
                        }
                        None => {
                            if !act.adopt_upload_run(&rec.id, ctx) {
                                act.start_processing(rec.id.clone(), ctx);
                            }
                        }
                    }
                    Ok(rec)
                }),
        )
    }
}

/// One job's current record.
#[derive(Message)]
#[rtype(result = "Option<JobRecord>")]
pub struct GetJob(pub String);

impl Handler<GetJob> for JobManager {
    type Result = Option<JobRecord>;
    fn handle(&mut self, m: GetJob, _: &mut Context<Self>) -> Self::Result {
        self.jobs.get(&m.0).cloned()
    }
}

/// A page of jobs, newest first.
#[derive(Message)]
#[rtype(result = "(Vec<JobRecord>, usize)")]
pub struct ListJobs {
    pub state: Option<JobState>,
    pub repo: Option<String>,
    /// `Some(owner)`: only jobs of that scoped token.
    pub owner: Option<String>,
    pub offset: usize,
    pub limit: usize,
}

impl Handler<ListJobs> for JobManager {
    type Result = MessageResult<ListJobs>;
    fn handle(&mut self, m: ListJobs, _: &mut Context<Self>) -> Self::Result {
        let mut all: Vec<&JobRecord> = self
            .jobs
            .values()
            .filter(|j| m.state.is_none_or(|s| j.state == s))
            .filter(|j| m.repo.as_ref().is_none_or(|r| &j.repo == r))
            .filter(|j| m.owner.is_none() || j.owner == m.owner)
            .collect();
        all.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
        let total = all.len();
        MessageResult((
            all.into_iter()
                .skip(m.offset)
                .take(m.limit)
                .cloned()
                .collect(),
            total,
        ))
    }
}

/// Why an abort was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbortError {
    #[error("no such job")]
    NotFound,
    #[error("job already ended as {0}")]
    Terminal(&'static str),
}

/// Aborts a job. Before its commit starts the job ends `aborted` at once; during the commit the
/// request stops it before the manifest is written, unless that already happened.
#[derive(Message)]
#[rtype(result = "Result<JobRecord, AbortError>")]
pub struct AbortJob(pub String);

impl Handler<AbortJob> for JobManager {
    type Result = Result<JobRecord, AbortError>;
    fn handle(&mut self, m: AbortJob, ctx: &mut Context<Self>) -> Self::Result {
        let Some(mut job) = self.jobs.get(&m.0).cloned() else {
            return Err(AbortError::NotFound);
        };
        if job.state.is_terminal() {
            return Err(AbortError::Terminal(job.state.as_str()));
        }
        self.abort_flag(&m.0).store(true, Ordering::SeqCst);
        if job.state == JobState::Committing && job.base_root.is_some() {
            // The commit thread is running; it reports the outcome. Journaled, so that a commit
            // resumed after a restart carries the abort out too.
            if !job.abort_requested {
                job.abort_requested = true;
                job.updated = now_ms();
                let id = job.id.clone();
                self.save(job.clone(), ctx, move |act, _, ok| {
                    // Not journaled: the flag holds for this process only; a repeated abort
                    // journals it again.
                    if let (false, Some(j)) = (ok, act.jobs.get_mut(&id)) {
                        j.abort_requested = false;
                    }
                });
            }
            return Ok(job);
        }
        job.transition(JobState::Aborted, now_ms());
        self.save(job.clone(), ctx, |_, _, _| {});
        Ok(job)
    }
}

impl Handler<ProgressMade> for JobManager {
    type Result = ();
    fn handle(&mut self, m: ProgressMade, _: &mut Context<Self>) {
        if let Some(j) = self.jobs.get_mut(&m.job_id) {
            j.progress.bytes_processed = j.progress.bytes_processed.max(m.progress.bytes_processed);
        }
    }
}

impl Handler<Processed> for JobManager {
    type Result = ();
    fn handle(&mut self, m: Processed, ctx: &mut Context<Self>) {
        if let Some(u) = self.uploads.get_mut(&m.job_id).filter(|u| u.run == m.run) {
            if u.cancelled {
                self.uploads.remove(&m.job_id);
            } else {
                u.outcome = Some(m.outcome); // until the upload is accepted
                u.serialized = m.serialized;
                u.tell_waiters();
            }
            return;
        }
        if self.runs.get(&m.job_id) != Some(&m.run) {
            return; // a run given up on: retried, restarted, or an upload that was cancelled
        }
        let Some(job) = self.jobs.get(&m.job_id).cloned() else {
            return;
        };
        if job.state != JobState::Processing {
            return; // aborted meanwhile, or a duplicate report after a restart
        }
        if let Some(t) = self.started_at.get(&m.job_id) {
            self.metrics
                .cas_upload_duration_seconds
                .observe(t.elapsed().as_secs_f64());
        }
        match m.outcome {
            Ok(cs) => {
                let mut job = job;
                self.count_processed(&mut job, &cs);
                self.jobs.insert(job.id.clone(), job);
                let id = m.job_id.clone();
                let cs = Arc::new(cs);
                let saved = cs.clone();
                ctx.spawn(
                    self.journal
                        .send(SaveChangeset {
                            id: id.clone(),
                            changeset: cs,
                            serialized: m.serialized,
                        })
                        .into_actor(self)
                        .map(move |res, act, ctx| match res {
                            Ok(Ok(())) => {
                                crate::testhook::point("changeset-saved");
                                act.keep_fresh(&id, saved);
                                act.after_saved_changeset(id, ctx)
                            }
                            Ok(Err(e)) => act.retry_or_fail(
                                id,
                                "spool-write",
                                e.to_string(),
                                true,
                                ctx,
                                JobManager::start_processing,
                            ),
                            Err(_) => act.journal_retry(id, ctx),
                        }),
                );
            }
            Err(e) if e.code == "aborted" => {
                let mut job = job;
                job.transition(JobState::Aborted, now_ms());
                self.save(job, ctx, |_, _, _| {});
            }
            Err(e) => self.retry_or_fail(
                m.job_id,
                e.code,
                e.message,
                e.retryable,
                ctx,
                JobManager::start_processing,
            ),
        }
    }
}

fn progress_of(cs: &ChangeSet) -> Progress {
    Progress {
        entries: cs.stats.entries,
        bytes_processed: cs.stats.bytes_in,
        objects_new: cs.stats.new_objects,
        objects_dedup: cs.stats.dedup_hits,
        bytes_compressed: cs.stats.new_bytes,
    }
}

impl Handler<CommitStarting> for JobManager {
    type Result = ();
    fn handle(&mut self, m: CommitStarting, ctx: &mut Context<Self>) {
        let aborted = self
            .aborts
            .get(&m.job_id)
            .is_some_and(|a| a.load(Ordering::SeqCst));
        let Some(mut job) = self.jobs.get(&m.job_id).cloned() else {
            let _ = m.ack.send(false);
            return;
        };
        if aborted || job.state != JobState::Committing {
            let _ = m.ack.send(false);
            return;
        }
        if m.not_landed && job.base_root.is_some() {
            // The start of an earlier commit was journaled, and it neither landed nor failed:
            // the daemon stopped during it. A commit that takes the process down is not
            // resumed forever (the repository's queue waits behind it).
            if job.attempts >= self.settings.max_attempts {
                let message = format!(
                    "the commit was interrupted (the daemon stopped during it) after {} attempts of the job; not tried again, nothing of it was published",
                    job.attempts
                );
                let _ = m.ack.send(false);
                self.end_failed(job, "commit-interrupted", message, "permanent", ctx);
                return;
            }
            job.attempts += 1;
        }
        job.base_root = Some(m.base_root);
        job.updated = now_ms();
        let ack = m.ack;
        self.save(job, ctx, move |_, _, ok| {
            let _ = ack.send(ok);
        });
    }
}

impl Handler<crate::s1_distributor::Distributed> for JobManager {
    type Result = ();
    fn handle(&mut self, m: crate::s1_distributor::Distributed, ctx: &mut Context<Self>) {
        let Some(DistState {
            results, started, ..
        }) = self.distributing.get_mut(&m.job_id)
        else {
            // After the quorum settled: an endpoint still trying then gets its outcome now.
            if let Some(mut job) = self.jobs.get(&m.job_id).cloned() {
                if job
                    .distribution
                    .get(&m.endpoint)
                    .is_some_and(|v| v.starts_with("pending"))
                {
                    let text = match &m.outcome {
                        Ok(r) => format!("ok (after the commit went ahead): {r}"),
                        Err(e) => format!("failed (after the commit went ahead): {e}"),
                    };
                    job.distribution.insert(m.endpoint, text);
                    self.save(job, ctx, |_, _, _| {});
                }
            }
            return;
        };
        let elapsed = started.elapsed().as_secs_f64();
        let text = match &m.outcome {
            Ok(r) => {
                let (n, b) = (&r.pushed, &r.bytes);
                self.metrics
                    .distribution_duration_seconds
                    .with_label_values(&[&m.endpoint])
                    .observe(elapsed);
                self.metrics
                    .distribution_objects_total
                    .with_label_values(&[&m.endpoint])
                    .inc_by(*n);
                self.metrics
                    .distribution_bytes_total
                    .with_label_values(&[&m.endpoint])
                    .inc_by(*b);
                format!("ok: {r}")
            }
            Err(e) => format!("failed: {e}"),
        };
        results.insert(m.endpoint.clone(), m.outcome);
        if let Some(j) = self.jobs.get_mut(&m.job_id) {
            j.distribution.insert(m.endpoint, text);
        }
        self.settle_distribution(m.job_id, false, ctx);
    }
}

impl Handler<crate::s1_distributor::DistributionProgress> for JobManager {
    type Result = ();
    fn handle(&mut self, m: crate::s1_distributor::DistributionProgress, _: &mut Context<Self>) {
        // Only while the endpoint has no outcome yet: a late report never hides the result.
        let Some(DistState { results, .. }) = self.distributing.get(&m.job_id) else {
            return;
        };
        if results.contains_key(&m.endpoint) {
            return;
        }
        if let Some(j) = self.jobs.get_mut(&m.job_id) {
            j.distribution.insert(
                m.endpoint,
                format!(
                    "pushing: {} of {} objects held, {} bytes sent",
                    m.done, m.total, m.bytes
                ),
            );
        }
    }
}

impl Handler<crate::mqtt_bridge::EndpointReady> for JobManager {
    type Result = ();
    fn handle(&mut self, m: crate::mqtt_bridge::EndpointReady, ctx: &mut Context<Self>) {
        let Some(dist) = self.settings.distribution.clone() else {
            return;
        };
        let Some(job) = self.jobs.get(&m.job_id).cloned() else {
            return;
        };
        let Some(st) = self.distributing.get_mut(&m.job_id) else {
            return;
        };
        if st.results.contains_key(&m.endpoint) || st.dispatched.contains(&m.endpoint) {
            return;
        }
        let Some((_, distributor)) = dist.endpoints.iter().find(|(e, _)| *e == m.endpoint) else {
            return;
        };
        match m.grant {
            Err(why) => {
                st.results.insert(m.endpoint.clone(), Err(why.clone()));
                if let Some(j) = self.jobs.get_mut(&m.job_id) {
                    j.distribution.insert(m.endpoint, format!("failed: {why}"));
                }
                self.settle_distribution(m.job_id, false, ctx);
            }
            Ok(grant) => {
                let Some(cas) = self
                    .settings
                    .repos
                    .get(&job.repo)
                    .and_then(|t| t.cas(false).ok())
                else {
                    return;
                };
                st.dispatched.insert(m.endpoint.clone());
                if let Some(j) = self.jobs.get_mut(&m.job_id) {
                    j.distribution.insert(
                        m.endpoint.clone(),
                        format!("ready ({}): pushing", m.node_id),
                    );
                }
                distributor.do_send(crate::s1_distributor::Distribute {
                    job_id: m.job_id.clone(),
                    repo: job.repo.clone(),
                    changeset: self
                        .settings
                        .spool_root
                        .join("jobs")
                        .join(&m.job_id)
                        .join("changeset.json"),
                    cas,
                    done: ctx.address().recipient(),
                    progress: ctx.address().recipient(),
                    grant: Some(grant),
                });
            }
        }
    }
}

impl Handler<CommitWaiting> for JobManager {
    type Result = ();
    fn handle(&mut self, m: CommitWaiting, _: &mut Context<Self>) {
        if let Some(j) = self.jobs.get_mut(&m.job_id) {
            if !j.state.is_terminal() {
                j.waiting = m.note;
            }
        }
    }
}

impl Handler<Committed> for JobManager {
    type Result = ();
    fn handle(&mut self, m: Committed, ctx: &mut Context<Self>) {
        let Some(mut job) = self.jobs.get(&m.job_id).cloned() else {
            return;
        };
        if job.state != JobState::Committing {
            return;
        }
        match m.outcome {
            Ok(result) => {
                if let Some(t) = self.started_at.remove(&m.job_id) {
                    self.metrics
                        .commit_duration_seconds
                        .observe(t.elapsed().as_secs_f64());
                }
                self.metrics
                    .jobs_published_total
                    .with_label_values(&[&job.path])
                    .inc();
                if let Some(a) = &self.settings.access {
                    a.do_send(crate::access_tracker::PublishSeen {
                        repo: job.repo.clone(),
                        path: if job.path.is_empty() {
                            "/".into()
                        } else {
                            job.path.clone()
                        },
                        time: now_ms() / 1000,
                    });
                }
                job.result = Some(result);
                job.transition(JobState::Published, now_ms());
                self.save(job, ctx, |_, _, _| {
                    crate::testhook::point("published-journaled")
                });
            }
            Err(e) if e.code == "aborted" => {
                job.transition(JobState::Aborted, now_ms());
                self.save(job, ctx, |_, _, _| {});
            }
            Err(e) => {
                // A failed commit starts over from the (unchanged) base on retry.
                job.base_root = None;
                if e.retryable {
                    job.attempts += 1;
                }
                self.jobs.insert(job.id.clone(), job);
                self.retry_or_fail(
                    m.job_id,
                    e.code,
                    e.message,
                    e.retryable,
                    ctx,
                    JobManager::start_commit,
                );
            }
        }
    }
}

/// Counts of jobs per state, for health and status.
#[derive(Message)]
#[rtype(result = "BTreeMap<String, usize>")]
pub struct CountJobs;

impl Handler<CountJobs> for JobManager {
    type Result = MessageResult<CountJobs>;
    fn handle(&mut self, _: CountJobs, _: &mut Context<Self>) -> Self::Result {
        let mut m = BTreeMap::new();
        for j in self.jobs.values() {
            *m.entry(j.state.as_str().to_string()).or_insert(0) += 1;
        }
        MessageResult(m)
    }
}

/// The jobs that have not ended, oldest first (for the status view and drain).
#[derive(Message)]
#[rtype(result = "Vec<JobRecord>")]
pub struct ActiveJobs;

impl Handler<ActiveJobs> for JobManager {
    type Result = MessageResult<ActiveJobs>;
    fn handle(&mut self, _: ActiveJobs, _: &mut Context<Self>) -> Self::Result {
        let mut v: Vec<JobRecord> = self
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal())
            .cloned()
            .collect();
        v.sort_by_key(|j| j.created);
        MessageResult(v)
    }
}

/// Starts a garbage collection of `repo`: refused while any job of it is in flight; until
/// [`GcEnd`], new jobs of the repository wait in `queued`.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct GcBegin {
    pub repo: String,
}

impl Handler<GcBegin> for JobManager {
    type Result = Result<(), String>;
    fn handle(&mut self, m: GcBegin, _: &mut Context<Self>) -> Self::Result {
        if self.gc_running.contains(&m.repo) {
            return Err(format!("a garbage collection of {} is running", m.repo));
        }
        let busy: Vec<(&str, &str)> = self
            .jobs
            .values()
            .filter(|j| j.repo == m.repo && !j.state.is_terminal())
            .map(|j| (j.id.as_str(), j.state.as_str()))
            .chain(
                self.accepting
                    .iter()
                    .filter(|(_, repo)| **repo == m.repo)
                    .map(|(id, _)| (id.as_str(), "being accepted")),
            )
            .collect();
        if let Some((id, state)) = busy.first() {
            return Err(format!(
                "{} jobs of {} are in flight (e.g. {id} {state}); garbage collection runs when the repository is idle",
                busy.len(),
                m.repo,
            ));
        }
        // Dedup decisions of uploads processed so far could name objects this run deletes.
        let running: Vec<String> = self
            .uploads
            .iter()
            .filter(|(_, u)| u.repo == m.repo)
            .map(|(id, _)| id.clone())
            .collect();
        for id in running {
            self.cancel_upload_run(&id);
        }
        self.gc_running.insert(m.repo);
        Ok(())
    }
}

/// Whether a garbage collection of `repo` runs now.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct GcRunning {
    pub repo: String,
}

impl Handler<GcRunning> for JobManager {
    type Result = bool;
    fn handle(&mut self, m: GcRunning, _: &mut Context<Self>) -> bool {
        self.gc_running.contains(&m.repo)
    }
}

/// Ends a garbage collection; jobs that arrived meanwhile start.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GcEnd {
    pub repo: String,
}

impl Handler<GcEnd> for JobManager {
    type Result = ();
    fn handle(&mut self, m: GcEnd, ctx: &mut Context<Self>) {
        self.gc_running.remove(&m.repo);
        let waiting: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.repo == m.repo && j.state == JobState::Queued)
            .map(|j| j.id.clone())
            .collect();
        for id in waiting {
            if let Some(j) = self.jobs.get_mut(&id) {
                j.waiting = None;
            }
            self.start_processing(id, ctx);
        }
    }
}

/// Test hook: makes the actor panic, to prove supervision restarts it from the journal.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

impl Handler<Crash> for JobManager {
    type Result = ();
    fn handle(&mut self, _: Crash, ctx: &mut Context<Self>) {
        // A supervised actor is restarted when it stops; stopping mid-flight loses the message
        // being handled, exactly as a panic would.
        ctx.stop();
    }
}

/// Processes a tar while it is being uploaded (refused silently — the job is then processed
/// once accepted — when the repository is unknown or being collected, the service drains, or
/// [`MAX_UPLOAD_RUNS`] uploads are processed already).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProcessUpload {
    /// The id the job will have if the upload is accepted.
    pub job_id: String,
    pub repo: String,
    pub path: String,
    pub tar: prepub_core::growing::FollowReader,
}

impl Handler<ProcessUpload> for JobManager {
    type Result = ();
    fn handle(&mut self, m: ProcessUpload, ctx: &mut Context<Self>) {
        let Some(target) = self.settings.repos.get(&m.repo).cloned() else {
            return;
        };
        if self.settings.draining.load(Ordering::SeqCst)
            || self.gc_running.contains(&m.repo)
            || self.uploads.len() >= MAX_UPLOAD_RUNS
            || self.uploads.contains_key(&m.job_id)
            || self.jobs.contains_key(&m.job_id)
        {
            return;
        }
        let run = self.new_run();
        let abort = Arc::new(AtomicBool::new(false));
        let mut tar = m.tar;
        tar.stop_when(abort.clone());
        self.uploads.insert(
            m.job_id.clone(),
            UploadRun {
                repo: m.repo,
                path: m.path.clone(),
                run,
                abort: abort.clone(),
                started: Instant::now(),
                outcome: None,
                serialized: None,
                cancelled: false,
                waiters: Vec::new(),
            },
        );
        self.pool.do_send(ProcessJob {
            job_id: m.job_id,
            run,
            tar: TarSource::Upload(tar),
            target,
            path: m.path.clone(),
            params: self.settings.params,
            limits: self.settings.limits,
            abort,
            done: ctx.address().recipient(),
            progress: ctx.address().recipient(),
        });
    }
}

/// An upload processed by [`ProcessUpload`] ended without becoming a job (refused, cut off,
/// checksum mismatch): its run is cancelled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UploadAbandoned {
    pub job_id: String,
}

impl Handler<UploadAbandoned> for JobManager {
    type Result = ();
    fn handle(&mut self, m: UploadAbandoned, _: &mut Context<Self>) {
        if !self.jobs.contains_key(&m.job_id) {
            self.cancel_upload_run(&m.job_id);
        }
    }
}

/// Waits for the processing of upload `job_id` to end: true when it produced a change set
/// that [`SubmitJob`] with `tar_synced: false` can accept; false when it failed, was cancelled,
/// or never ran.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct AwaitUploadRun {
    pub job_id: String,
}

impl Handler<AwaitUploadRun> for JobManager {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, m: AwaitUploadRun, _: &mut Context<Self>) -> Self::Result {
        let Some(u) = self.uploads.get_mut(&m.job_id) else {
            return Box::pin(async { false });
        };
        if u.cancelled || u.outcome.is_some() {
            let ok = u.produced();
            return Box::pin(async move { ok });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        u.waiters.push(tx);
        Box::pin(async move { rx.await.unwrap_or(false) })
    }
}
