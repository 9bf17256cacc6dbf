//! Garbage collection and content lifecycle over the API. A run is a journaled record in the
//! spool (`prepub_core::gcrun`): every state change is written before its step starts, an
//! unfinished run found at start-up ends `aborted` with its tombstones revoked, and a run can
//! be aborted over the API (`POST /api/v1/gc/{repo}/abort`), which revokes its tombstones too.
//! The scanning and deleting run on a blocking thread; the handlers only send messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use prepub_actors::job_manager::{GcBegin, GcEnd, GcRunning, GetJob};
use prepub_core::access::AccessStore;
use prepub_core::gc::{GcError, Plan, Swept};
use prepub_core::gcrun::{GcRun, RunJournal, RunState};
use prepub_core::timefmt::now;

use super::api::{accept_removal, admin_only, auth, served, ApiError, AppState, Fields};

/// The runs in progress, per repository: run id and abort flag.
#[derive(Default)]
pub struct ActiveRuns(Mutex<HashMap<String, (String, Arc<AtomicBool>)>>);

impl ActiveRuns {
    fn claim(&self, repo: &str, id: &str) -> Result<Arc<AtomicBool>, String> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((other, _)) = m.get(repo) {
            return Err(format!(
                "garbage collection run {other} of {repo} is in progress"
            ));
        }
        let flag = Arc::new(AtomicBool::new(false));
        m.insert(repo.to_string(), (id.to_string(), flag.clone()));
        Ok(flag)
    }

    fn release(&self, repo: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(repo);
    }

    fn abort(&self, repo: &str) -> Option<String> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (id, flag) = m.get(repo)?;
        flag.store(true, Ordering::SeqCst);
        Some(id.clone())
    }
}

fn access_db(st: &AppState, repo: &str) -> std::path::PathBuf {
    st.cfg.spool_root.join("access").join(format!("{repo}.db"))
}

/// The journal of runs (`<spool>/gc/runs`).
pub fn journal(spool_root: &std::path::Path) -> Result<RunJournal, String> {
    RunJournal::open(&spool_root.join("gc").join("runs")).map_err(|e| e.to_string())
}

/// Ends the runs a crash or stop left unfinished: `aborted`, tombstones revoked. Called at
/// start-up, before anything else can start a run. Returns the runs it ended.
pub fn recover(cfg: &crate::config::Config) -> Result<Vec<GcRun>, String> {
    let j = journal(&cfg.spool_root)?;
    let mut ended = Vec::new();
    for mut run in j.unfinished() {
        let db = cfg
            .spool_root
            .join("access")
            .join(format!("{}.db", run.repo));
        let revoked = if db.exists() {
            AccessStore::open(&db, 0)
                .and_then(|mut s| s.revoke_run(&run.id))
                .map_err(|e| format!("run {}: {e}", run.id))?
                .objects
        } else {
            0
        };
        run.revoked += revoked;
        run.reason = Some(format!(
            "the daemon stopped while the run was {}; {revoked} tombstones of the run revoked",
            run.state.as_str()
        ));
        run.enter(RunState::Aborted, now());
        j.save(&run).map_err(|e| e.to_string())?;
        ended.push(run);
    }
    Ok(ended)
}

/// The repository's storage as the daemon's jobs see it (the shared S3 store, so its
/// known-object cache forgets what is deleted).
fn gc_store(st: &AppState, repo: &str) -> Result<GcStore, ApiError> {
    let rc = served(st, repo)?;
    let (cas, local): (Arc<dyn prepub_core::cas::Cas>, _) = match st.s3.get(repo) {
        Some(s) => (s.clone(), None),
        None => (
            Arc::new(
                prepub_core::cas::LocalCas::open(&rc.storage)
                    .map_err(|e| ApiError::Unavailable(e.to_string()))?,
            ),
            Some(rc.storage.clone()),
        ),
    };
    Ok((cas, rc.gc.clone(), local))
}

/// A repository's store, its GC settings, and its storage directory when local (whose publish
/// lock a run holds).
type GcStore = (
    Arc<dyn prepub_core::cas::Cas>,
    crate::config::GcConfig,
    Option<std::path::PathBuf>,
);

fn gc_policy(g: &crate::config::GcConfig) -> prepub_core::gc::GcPolicy {
    prepub_core::gc::GcPolicy {
        keep_revisions: g.keep_revisions,
        grace_secs: g.grace.as_secs() as i64,
        exempt_tags: g.exempt_tags.clone(),
    }
}

fn gc_error(e: GcError) -> ApiError {
    match e {
        GcError::Moved { .. } | GcError::Locked(_) => ApiError::Conflict(e.to_string()),
        e => ApiError::Unavailable(e.to_string()),
    }
}

fn plan_view(p: &Plan) -> serde_json::Value {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    v["sample"] = p
        .candidates
        .iter()
        .take(20)
        .map(|(id, _)| id.to_string())
        .collect();
    v
}

/// `GET /api/v1/gc/{repo}/plan` (admin): what a collection would delete now; deletes nothing.
pub async fn gc_plan(
    req: HttpRequest,
    repo: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_only(&auth(&req, &st)?)?;
    let (cas, g, _) = gc_store(&st, &repo)?;
    let plan = web::block(move || prepub_core::gc::plan(cas.as_ref(), &gc_policy(&g), now()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(gc_error)?;
    Ok(HttpResponse::Ok().json(plan_view(&plan)))
}

/// `POST /api/v1/gc/{repo}/run` (admin): collects the repository's unreferenced objects. Runs
/// only when `gc.enabled`, in standalone mode, and while no job of the repository is in flight;
/// jobs submitted meanwhile wait in `queued`. Every deletion is appended to
/// `<spool>/gc/audit.log`.
pub async fn gc_run(
    req: HttpRequest,
    repo: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_only(&auth(&req, &st)?)?;
    // A task of its own, so that the whole run — holding the repository, collecting, releasing
    // it — ends the same whether or not the client waits for the answer (a dropped request
    // must not leave the repository held or the run claimed).
    let st2 = st.clone();
    let v = actix_rt::spawn(async move { run_gc(&st2, repo.into_inner(), Trigger::Api).await })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(v))
}

/// `POST /api/v1/gc/{repo}/abort` (admin): stops the repository's run at its next step (or
/// next deletion); the run ends `aborted` and the tombstones it made are revoked. 202.
pub async fn gc_abort(
    req: HttpRequest,
    repo: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_only(&auth(&req, &st)?)?;
    let repo = repo.into_inner();
    gc_store(&st, &repo)?;
    match st.gc_active.abort(&repo) {
        Some(id) => {
            Ok(HttpResponse::Accepted().json(serde_json::json!({"run": id, "aborting": true})))
        }
        None => Err(ApiError::Conflict(format!(
            "no garbage collection of {repo} is in progress"
        ))),
    }
}

/// Who started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `POST /api/v1/gc/{repo}/run`: refused at once if the repository is busy.
    Api,
    /// `gc.schedule`: runs the content lifecycle first (`cleaning`), then waits for the
    /// repository to become idle.
    Schedule,
}

/// How long a scheduled run waits for its removal jobs and for the repository to be idle.
const IDLE_WAIT: Duration = Duration::from_secs(600);

/// One garbage collection of `repo`, journaled as a run. In dry-run mode it only plans.
pub async fn run_gc(
    st: &AppState,
    repo: String,
    trigger: Trigger,
) -> Result<serde_json::Value, ApiError> {
    let (cas, g, local) = gc_store(st, &repo)?;
    let refused = |st: &AppState, e: ApiError| {
        st.metrics
            .gc_runs_total
            .with_label_values(&[repo.as_str(), "refused"])
            .inc();
        Err(e)
    };
    if !g.enabled {
        return refused(
            st,
            ApiError::Conflict(format!(
                "garbage collection is not enabled for {repo} (repositories[].gc.enabled)"
            )),
        );
    }
    // Only standalone mode collects: in gateway or local mode cvmfs_server owns the storage.
    // There a scheduled run with `access_ttl` still does its cleaning (removal jobs through
    // the gateway).
    let collects = matches!(st.cfg.publish, crate::config::PublishMode::Standalone);
    let cleans_only = !collects
        && trigger == Trigger::Schedule
        && g.access_ttl.is_some()
        && matches!(st.cfg.publish, crate::config::PublishMode::Gateway(_));
    if !collects && !cleans_only {
        return refused(st, ApiError::Conflict(
            "garbage collection runs in standalone mode only: in gateway or local mode the storage is shared with cvmfs_server, run `cvmfs_server gc` there".into(),
        ));
    }
    let journal = Arc::new(journal(&st.cfg.spool_root).map_err(ApiError::Unavailable)?);
    let mut run = GcRun::new(
        uuid::Uuid::new_v4().to_string(),
        &repo,
        match trigger {
            Trigger::Api => "api",
            Trigger::Schedule => "schedule",
        },
        g.dry_run,
        prepub_core::jobs::now_ms(),
    );
    let abort = match st.gc_active.claim(&repo, &run.id) {
        Ok(f) => f,
        Err(m) => return refused(st, ApiError::Conflict(m)),
    };
    let started = std::time::Instant::now();
    let held = match trigger {
        Trigger::Api => begin(st, &repo).await,
        Trigger::Schedule => prepare_scheduled(st, &journal, &mut run, &g, &abort, collects).await,
    };
    if let Err(e) = held {
        st.gc_active.release(&repo);
        if trigger == Trigger::Api {
            return refused(st, e);
        }
        let aborted = abort.load(Ordering::SeqCst);
        run.reason = Some(e.to_string());
        run.enter(
            if aborted {
                RunState::Aborted
            } else {
                RunState::Failed
            },
            now(),
        );
        let _ = save_off(&journal, &run).await;
        st.metrics
            .gc_runs_total
            .with_label_values(&[repo.as_str(), if aborted { "aborted" } else { "failed" }])
            .inc();
        return Err(e);
    }
    if cleans_only {
        st.gc_active.release(&repo);
        run.reason = Some(
            "gateway mode: the content lifecycle ran; the storage is collected by cvmfs_server gc"
                .into(),
        );
        run.enter(RunState::Complete, now());
        save_off(&journal, &run).await?;
        st.metrics
            .gc_runs_total
            .with_label_values(&[repo.as_str(), "cleaned"])
            .inc();
        return Ok(serde_json::json!({
            "run": run,
            "swept": Swept::default(),
            "tombstones": Tombstoning::default(),
            "dry_run": run.dry_run,
        }));
    }
    let audit_dir = st.cfg.spool_root.join("gc");
    let db = access_db(st, &repo);
    let rate = g.max_deletion_rate;
    // The run is a task of its own: a client that goes away mid-run neither stops it halfway
    // nor leaves the repository's jobs held (GcEnd is sent when the work ends, not when the
    // request does).
    let (jobs, repo2) = (st.jobs.clone(), repo.clone());
    let j2 = journal.clone();
    let work = web::block(move || {
        let out = collect(
            cas.as_ref(),
            local.as_deref(),
            &g,
            &db,
            &audit_dir,
            rate,
            &mut run,
            &j2,
            &abort,
        );
        (run, out)
    });
    let task = actix_rt::spawn(async move {
        let result = work.await;
        jobs.do_send(GcEnd { repo: repo2 });
        result
    });
    let result = task.await;
    st.gc_active.release(&repo);
    st.metrics
        .gc_run_duration_seconds
        .observe(started.elapsed().as_secs_f64());
    let (mut run, out) = match result {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Err(ApiError::Internal(e.to_string())),
        Err(e) => return Err(ApiError::Internal(e.to_string())),
    };
    let m = &st.metrics;
    let (plan, swept, tomb) = match out {
        Ok(x) => x,
        Err(e) => {
            m.gc_runs_total
                .with_label_values(&[repo.as_str(), "failed"])
                .inc();
            run.reason = Some(e.to_string());
            run.enter(RunState::Failed, now());
            save_off(&journal, &run).await?;
            return Err(gc_error(e));
        }
    };
    let outcome = match run.state {
        RunState::Aborted => "aborted",
        _ if run.dry_run => "dry-run",
        _ => "swept",
    };
    m.gc_runs_total
        .with_label_values(&[repo.as_str(), outcome])
        .inc();
    for (counter, n) in [
        (&m.gc_objects_deleted_total, swept.deleted as u64),
        (&m.gc_bytes_reclaimed_total, swept.bytes),
        (&m.gc_objects_tombstoned_total, tomb.new as u64),
        (&m.gc_tombstones_revoked_total, tomb.revoked as u64),
        (&m.gc_bytes_tombstoned_total, tomb.new_bytes),
        (&m.gc_bytes_revoked_total, tomb.revoked_bytes),
    ] {
        counter.with_label_values(&[repo.as_str()]).inc_by(n);
    }
    m.gc_tombstones_pending
        .with_label_values(&[repo.as_str()])
        .set(tomb.pending as i64);
    m.gc_last_run_timestamp_seconds
        .with_label_values(&[repo.as_str()])
        .set(now());
    Ok(serde_json::json!({
        "run": run,
        "plan": plan_view(&plan),
        "swept": swept,
        "tombstones": tomb,
        "dry_run": run.dry_run,
    }))
}

/// Journals `run` on a blocking thread (a save writes and fsyncs the record and its directory).
async fn save_off(journal: &Arc<RunJournal>, run: &GcRun) -> Result<(), ApiError> {
    let (j, r) = (journal.clone(), run.clone());
    web::block(move || j.save(&r))
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))
}

/// Holds the repository's jobs for the run (refused while any is in flight).
async fn begin(st: &AppState, repo: &str) -> Result<(), ApiError> {
    match st
        .jobs
        .send(GcBegin {
            repo: repo.to_string(),
        })
        .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(m)) => Err(ApiError::Conflict(m)),
        Err(_) => Err(ApiError::Unavailable("job manager unavailable".into())),
    }
}

/// A scheduled run before it scans: journaled as `scheduled`; with `access_ttl`, the content
/// lifecycle (`cleaning`) and a wait for its removal jobs; then, if it is to `hold` the
/// repository, a wait for it to be idle.
async fn prepare_scheduled(
    st: &AppState,
    journal: &Arc<RunJournal>,
    run: &mut GcRun,
    g: &crate::config::GcConfig,
    abort: &AtomicBool,
    hold: bool,
) -> Result<(), ApiError> {
    save_off(journal, run).await?;
    let deadline = std::time::Instant::now() + IDLE_WAIT;
    let aborted = || ApiError::Conflict("the run was aborted".into());
    if g.access_ttl.is_some() {
        run.enter(RunState::Cleaning, now());
        save_off(journal, run).await?;
        let v = run_lifecycle(st, run.repo.clone()).await?;
        run.removals = v["submitted"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        save_off(journal, run).await?;
        // The removals commit before the scan, so their objects count as unreferenced now.
        for id in run.removals.clone() {
            loop {
                if abort.load(Ordering::SeqCst) {
                    return Err(aborted());
                }
                match st.jobs.send(GetJob(id.clone())).await {
                    Ok(Some(j)) if !j.state.is_terminal() => {}
                    _ => break,
                }
                if std::time::Instant::now() >= deadline {
                    return Err(ApiError::Conflict(format!(
                        "removal job {id} did not end within {}s",
                        IDLE_WAIT.as_secs()
                    )));
                }
                actix_rt::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    if !hold {
        return Ok(());
    }
    loop {
        if abort.load(Ordering::SeqCst) {
            return Err(aborted());
        }
        match begin(st, &run.repo).await {
            Ok(()) => return Ok(()),
            Err(ApiError::Conflict(_)) if std::time::Instant::now() < deadline => {
                actix_rt::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a run did with tombstones (all zero without a soft-delete period).
#[derive(Debug, Default, serde::Serialize)]
pub struct Tombstoning {
    /// Objects newly tombstoned.
    new: usize,
    /// Tombstones dropped because their object is referenced again (or the run was aborted).
    revoked: usize,
    /// Bytes of the objects newly tombstoned, and of those revoked.
    new_bytes: u64,
    revoked_bytes: u64,
    /// Tombstones left for later runs.
    pending: usize,
}

type Collected = (Plan, Swept, Tombstoning);

/// Temporary files of object writes younger than this are never removed as leftovers.
const LEFTOVER_AGE_SECS: u64 = 3600;

/// The run's steps after the repository is held: scanning, tombstoned, reaping, complete (or
/// aborted at the step boundary or deletion where the abort flag is seen). Blocking.
#[allow(clippy::too_many_arguments)]
fn collect(
    cas: &dyn prepub_core::cas::Cas,
    local: Option<&std::path::Path>,
    g: &crate::config::GcConfig,
    db: &std::path::Path,
    audit_dir: &std::path::Path,
    rate: u64,
    run: &mut GcRun,
    journal: &RunJournal,
    abort: &AtomicBool,
) -> Result<Collected, GcError> {
    let io =
        |e: prepub_core::spool::SpoolError| GcError::Audit(std::io::Error::other(e.to_string()));
    let ae =
        |e: prepub_core::access::AccessError| GcError::Audit(std::io::Error::other(e.to_string()));
    let step = |run: &mut GcRun, s: RunState, point: &str| -> Result<(), GcError> {
        run.enter(s, now());
        journal.save(run).map_err(io)?;
        prepub_actors::testhook::point(point);
        Ok(())
    };
    // Ends the run aborted: its tombstones go.
    let end_aborted = |run: &mut GcRun, tomb: &mut Tombstoning| -> Result<(), GcError> {
        let dropped = AccessStore::open(db, 0)
            .and_then(|mut s| {
                let n = s.revoke_run(&run.id)?;
                tomb.pending = s.tombstones()?.len();
                Ok(n)
            })
            .map_err(ae)?;
        let revoked = dropped.objects;
        tomb.revoked += revoked;
        tomb.revoked_bytes += dropped.bytes;
        run.revoked += revoked;
        run.reason = Some(format!(
            "aborted by request while {}; {revoked} tombstones of the run revoked",
            run.state.as_str()
        ));
        run.enter(RunState::Aborted, now());
        journal.save(run).map_err(io)
    };
    // Other writers of a local storage (`repo ingest`, another publisher) hold its publish
    // lock while they dedup against what is stored and commit; a run holds it from its plan to
    // its last deletion, so neither can name an object the run is deleting. (An S3 store has no
    // such lock: other writers must not run alongside a collection.)
    let _lock = match local {
        Some(dir) => {
            Some(prepub_core::repo::lock_storage(dir).map_err(|e| GcError::Locked(e.to_string()))?)
        }
        None => None,
    };
    step(run, RunState::Scanning, "gc-scanning")?;
    let t0 = now();
    let mut plan = prepub_core::gc::plan(cas, &gc_policy(g), t0)?;
    run.candidates = plan.candidate_count;
    let mut tomb = Tombstoning::default();
    if run.dry_run {
        run.enter(RunState::Complete, now());
        journal.save(run).map_err(io)?;
        return Ok((plan, Swept::default(), tomb));
    }
    if abort.load(Ordering::SeqCst) {
        end_aborted(run, &mut tomb)?;
        return Ok((plan, Swept::default(), tomb));
    }
    let mut due_ids = Vec::new();
    if !g.soft_delete.is_zero() {
        // Two phases: tombstone what is unreferenced now; delete the tombstones that are due
        // and still unreferenced (this plan's candidates); drop those referenced again.
        let mut store = AccessStore::open(db, 0).map_err(ae)?;
        let unreferenced: HashMap<_, u64> = plan.candidates.iter().copied().collect();
        let mut due = Vec::new();
        let (mut referenced_again, mut gone) = (Vec::new(), Vec::new());
        for t in store.tombstones().map_err(ae)? {
            let Ok(id) = prepub_core::hash::ObjectId::parse(&t.object) else {
                continue;
            };
            match unreferenced.get(&id) {
                Some(&size) if t.delete_after <= t0 => due.push((id, size)),
                Some(_) => {}
                // Deleted already (a run stopped between deleting and forgetting) or
                // referenced again.
                None if !cas.exists(&id).unwrap_or(true) => gone.push(id),
                None => referenced_again.push(id),
            }
        }
        store.untombstone(&gone).map_err(ae)?;
        let again = store.untombstone(&referenced_again).map_err(ae)?;
        (tomb.revoked, tomb.revoked_bytes) = (again.objects, again.bytes);
        run.revoked = tomb.revoked;
        let made = store
            .tombstone(
                &plan.candidates,
                t0,
                t0 + g.soft_delete.as_secs() as i64,
                Some(&run.id),
            )
            .map_err(ae)?;
        (tomb.new, tomb.new_bytes) = (made.objects, made.bytes);
        run.tombstoned = tomb.new;
        due_ids = due.iter().map(|(id, _)| *id).collect();
        plan.candidates = due;
        tomb.pending = store.tombstones().map_err(ae)?.len();
        step(run, RunState::Tombstoned, "gc-tombstoned")?;
        if abort.load(Ordering::SeqCst) {
            end_aborted(run, &mut tomb)?;
            return Ok((plan, Swept::default(), tomb));
        }
    }
    step(run, RunState::Reaping, "gc-reaping")?;
    let swept = sweep_to_audit(cas, &run.repo, &plan, rate, audit_dir, &mut || {
        prepub_actors::testhook::point("gc-delete");
        !abort.load(Ordering::SeqCst)
    })?;
    run.deleted = swept.deleted;
    run.bytes_reclaimed = swept.bytes;
    if let (Some(dir), false) = (local, swept.stopped) {
        // Still under the storage's lock, and no job of the repository in flight; an upload's
        // processing that the run cancelled may still be finishing a write, and writers that
        // take no lock may be at work: only files older than the grace period, and than an hour,
        // go.
        let age = g.grace.as_secs().max(LEFTOVER_AGE_SECS) as i64;
        let (n, bytes) = prepub_core::cas::sweep_temps(dir, t0 - age);
        run.leftovers_removed = n;
        run.bytes_reclaimed += bytes;
    }
    if !due_ids.is_empty() {
        let mut store = AccessStore::open(db, 0).map_err(ae)?;
        let deleted = &plan.candidates[..swept.deleted];
        let ids: Vec<_> = deleted.iter().map(|(id, _)| *id).collect();
        store.untombstone(&ids).map_err(ae)?;
        tomb.pending = store.tombstones().map_err(ae)?.len();
    }
    if swept.stopped {
        end_aborted(run, &mut tomb)?;
    } else {
        run.enter(RunState::Complete, now());
        journal.save(run).map_err(io)?;
    }
    Ok((plan, swept, tomb))
}

fn sweep_to_audit(
    cas: &dyn prepub_core::cas::Cas,
    repo: &str,
    plan: &Plan,
    rate: u64,
    audit_dir: &std::path::Path,
    proceed: &mut dyn FnMut() -> bool,
) -> Result<Swept, GcError> {
    std::fs::create_dir_all(audit_dir).map_err(GcError::Audit)?;
    let mut audit = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(audit_dir.join("audit.log"))
        .map_err(GcError::Audit)?;
    let swept = prepub_core::gc::sweep(cas, repo, plan, rate, &mut audit, now, proceed);
    audit.sync_all().map_err(GcError::Audit)?;
    swept
}

/// `POST /api/v1/gc/{repo}/lifecycle` (admin): published paths not seen for `gc.access_ttl`
/// (and not exempt) leave the namespace as removal jobs; with `gc.dry_run` they are only listed.
pub async fn gc_lifecycle(
    req: HttpRequest,
    repo: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_only(&auth(&req, &st)?)?;
    Ok(HttpResponse::Ok().json(run_lifecycle(&st, repo.into_inner()).await?))
}

/// One lifecycle pass over `repo` (asked for, or as the `cleaning` step of a scheduled run).
pub async fn run_lifecycle(st: &AppState, repo: String) -> Result<serde_json::Value, ApiError> {
    let g = served(st, &repo)?.gc.clone();
    let Some(ttl) = g.access_ttl else {
        return Err(ApiError::Conflict(format!(
            "no content lifecycle for {repo}: repositories[].gc.access_ttl is not set"
        )));
    };
    if !g.enabled {
        return Err(ApiError::Conflict(format!(
            "garbage collection is not enabled for {repo} (repositories[].gc.enabled)"
        )));
    }
    // The namespace is read where the publish backend commits: the storage, or in gateway
    // mode the Stratum 0.
    // Where the namespace is read: the storage, or in gateway mode the Stratum 0 (a blocking
    // HTTP client, made on the blocking thread).
    enum Namespace {
        Storage(Arc<dyn prepub_core::cas::Cas>),
        Stratum0(String),
    }
    let ns = match &st.cfg.publish {
            crate::config::PublishMode::Standalone => Namespace::Storage(gc_store(st, &repo)?.0),
            crate::config::PublishMode::Gateway(gw) => Namespace::Stratum0(format!(
                "{}/{repo}",
                gw.stratum0_url.trim_end_matches('/')
            )),
            crate::config::PublishMode::Local(_) => {
                return Err(ApiError::Conflict(
                    "content lifecycle runs in standalone or gateway mode (in local mode cvmfs_server owns the catalogs)".into(),
                ))
            }
        };
    let db = access_db(st, &repo);
    let cutoff = now() - ttl.as_secs() as i64;
    let (exempt, exempt_tags) = (g.exempt_paths.clone(), g.exempt_tags.clone());
    let expired = web::block(move || -> Result<_, String> {
        let cas: Arc<dyn prepub_core::cas::Cas> = match ns {
            Namespace::Storage(c) => c,
            Namespace::Stratum0(url) => Arc::new(
                prepub_actors::http_store::HttpStore::new(&url)
                    .map_err(|e| format!("stratum 0 {url}: {e}"))?,
            ),
        };
        let store = AccessStore::open(&db, 0).map_err(|e| e.to_string())?;
        let roots: Vec<_> = prepub_core::gc::exempt_tag_roots(cas.as_ref(), &exempt_tags)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        prepub_core::lifecycle::expired(cas.as_ref(), &store, cutoff, &exempt, &roots)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(ApiError::Unavailable)?;
    let mut submitted = Vec::new();
    if !g.dry_run {
        for e in &expired {
            let f = Fields {
                tag_description: Some(format!(
                    "lifecycle: {} not seen since {}",
                    e.path, e.last_seen
                )),
                ..Default::default()
            };
            let j = accept_removal(st, repo.clone(), e.path.clone(), &f, None).await?;
            st.metrics
                .gc_lifecycle_removals_total
                .with_label_values(&[repo.as_str()])
                .inc();
            submitted.push(j.id);
        }
    }
    Ok(serde_json::json!({"expired": expired, "submitted": submitted, "dry_run": g.dry_run}))
}

/// `GET /api/v1/gc/{repo}/status` (admin): the collection's settings, the run in progress,
/// the recent runs (newest first), the next scheduled one, pending tombstones and what access
/// tracking holds.
pub async fn gc_status(
    req: HttpRequest,
    repo: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_only(&auth(&req, &st)?)?;
    let repo = repo.into_inner();
    let (_, g, _) = gc_store(&st, &repo)?;
    let running = st
        .jobs
        .send(GcRunning { repo: repo.clone() })
        .await
        .map_err(|_| ApiError::Unavailable("job manager unavailable".into()))?;
    let db = access_db(&st, &repo);
    let spool = st.cfg.spool_root.clone();
    let repo2 = repo.clone();
    let (pending, (objects, paths), runs) = web::block(move || {
        let s = AccessStore::open(&db, 0).map_err(|e| e.to_string())?;
        let runs = journal(&spool)?.of_repo(&repo2);
        Ok::<_, String>((
            s.tombstones().map_err(|e| e.to_string())?.len(),
            s.counts().map_err(|e| e.to_string())?,
            runs,
        ))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(ApiError::Unavailable)?;
    let current = runs.iter().rev().find(|r| !r.state.is_terminal()).cloned();
    let last = runs.iter().rev().find(|r| r.state.is_terminal()).cloned();
    let recent: Vec<&GcRun> = runs.iter().rev().take(10).collect();
    let next = st
        .gc_next
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&repo)
        .copied();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "repo": repo,
        "enabled": g.enabled,
        "dry_run": g.dry_run,
        "running": running || current.is_some(),
        "current_run": current,
        "schedule": g.schedule_text,
        "next_run": next,
        "last_run": last,
        "runs": recent,
        "keep_revisions": g.keep_revisions,
        "grace_period_seconds": g.grace.as_secs(),
        "soft_delete_period_seconds": g.soft_delete.as_secs(),
        "access_ttl_seconds": g.access_ttl.map(|d| d.as_secs()),
        "exempt_paths": g.exempt_paths,
        "exempt_tags": g.exempt_tags,
        "tombstones_pending": pending,
        "objects_tracked": objects,
        "paths_tracked": paths,
    })))
}

/// `GET /api/v1/gc/{repo}/tombstones` (admin): objects awaiting deletion.
pub async fn gc_tombstones(
    req: HttpRequest,
    repo: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_only(&auth(&req, &st)?)?;
    let repo = repo.into_inner();
    served(&st, &repo)?;
    let db = access_db(&st, &repo);
    let list = web::block(move || AccessStore::open(&db, 0).and_then(|s| s.tombstones()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"count": list.len(), "tombstones": list.iter().take(1000).collect::<Vec<_>>()})))
}
