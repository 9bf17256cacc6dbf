//! `AccessTracker`: owns the per-repository access stores (`prepub_core::access`) and their
//! sources. A sync actor (SQLite writes block): API batches and publish events arrive as
//! messages; access logs are polled when a `PollLogs` tick arrives (a timer thread sends one
//! every couple of seconds).

use std::collections::HashMap;
use std::path::Path;

use actix::prelude::*;
use prepub_core::access::{AccessEvent, AccessStore, LogFormat, LogTail, Recorded};

use crate::metrics::Metrics;

/// One repository's tracking: its store and the access logs it follows.
pub struct Tracked {
    pub store: AccessStore,
    pub logs: Vec<(LogTail, LogFormat)>,
    /// Whether `POST /api/v1/access-events` may feed it.
    pub api: bool,
    /// Whether publishes set a floor.
    pub publish: bool,
}

pub struct AccessTracker {
    repos: HashMap<String, Tracked>,
    metrics: Metrics,
}

impl AccessTracker {
    pub fn new(repos: HashMap<String, Tracked>, metrics: Metrics) -> AccessTracker {
        AccessTracker { repos, metrics }
    }

    /// Opens the store of `repo` under `dir` (`<dir>/<repo>.db`).
    pub fn open_store(
        dir: &Path,
        repo: &str,
        window: i64,
    ) -> Result<AccessStore, prepub_core::access::AccessError> {
        AccessStore::open(&dir.join(format!("{repo}.db")), window)
    }

    fn count(&self, repo: &str, source: &str, r: Recorded) {
        self.metrics
            .access_events_total
            .with_label_values(&[repo, source])
            .inc_by(r.applied as u64);
        self.metrics
            .access_events_collapsed_total
            .with_label_values(&[repo])
            .inc_by(r.collapsed as u64);
        self.metrics
            .gc_tombstones_revoked_total
            .with_label_values(&[repo])
            .inc_by(r.revoked as u64);
        self.metrics
            .gc_bytes_revoked_total
            .with_label_values(&[repo])
            .inc_by(r.revoked_bytes);
    }
}

impl Actor for AccessTracker {
    type Context = SyncContext<Self>;
}

/// Why a batch was not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessRefused {
    /// The repository has no access tracking, or not from this source.
    NotTracked(String),
    Store(String),
}

/// A batch of events for `repo` from the API.
#[derive(Message)]
#[rtype(result = "Result<Recorded, AccessRefused>")]
pub struct RecordAccess {
    pub repo: String,
    pub events: Vec<AccessEvent>,
}

impl Handler<RecordAccess> for AccessTracker {
    type Result = Result<Recorded, AccessRefused>;
    fn handle(&mut self, m: RecordAccess, _: &mut SyncContext<Self>) -> Self::Result {
        let t = match self.repos.get_mut(&m.repo) {
            Some(t) if t.api => t,
            _ => {
                return Err(AccessRefused::NotTracked(format!(
                    "{} takes no access events from the API (repositories[].gc.access_sources)",
                    m.repo
                )))
            }
        };
        let r = t
            .store
            .record(&m.events)
            .map_err(|e| AccessRefused::Store(e.to_string()))?;
        self.count(&m.repo, "api", r);
        Ok(r)
    }
}

/// A job published `path` at `time`: fresh content is never a lifecycle candidate.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PublishSeen {
    pub repo: String,
    pub path: String,
    pub time: i64,
}

impl Handler<PublishSeen> for AccessTracker {
    type Result = ();
    fn handle(&mut self, m: PublishSeen, _: &mut SyncContext<Self>) {
        if let Some(t) = self.repos.get_mut(&m.repo).filter(|t| t.publish) {
            let ev = AccessEvent {
                object: None,
                path: Some(m.path),
                time: m.time,
            };
            if let Ok(r) = t.store.record(&[ev]) {
                self.count(&m.repo, "publish", r);
            }
        }
    }
}

/// Reads what the access logs gained since the last tick.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PollLogs;

impl Handler<PollLogs> for AccessTracker {
    type Result = ();
    fn handle(&mut self, _: PollLogs, _: &mut SyncContext<Self>) {
        let mut counts = Vec::new();
        for (repo, t) in self.repos.iter_mut() {
            let mut events = Vec::new();
            for (tail, fmt) in t.logs.iter_mut() {
                if let Ok((ev, _, skipped)) = tail.poll(fmt, repo) {
                    events.extend(ev);
                    self.metrics
                        .access_log_lines_skipped_total
                        .with_label_values(&[repo])
                        .inc_by(skipped as u64);
                }
            }
            if !events.is_empty() {
                if let Ok(r) = t.store.record(&events) {
                    counts.push((repo.clone(), r));
                }
            }
        }
        for (repo, r) in counts {
            self.count(&repo, "log", r);
        }
    }
}

/// When an object and a path were last seen, and how much is tracked.
#[derive(Message)]
#[rtype(result = "Result<AccessView, AccessRefused>")]
pub struct QueryAccess {
    pub repo: String,
    pub object: Option<prepub_core::hash::ObjectId>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AccessView {
    pub objects_tracked: u64,
    pub paths_tracked: u64,
    pub object_seen: Option<i64>,
    pub path_seen: Option<i64>,
}

impl Handler<QueryAccess> for AccessTracker {
    type Result = Result<AccessView, AccessRefused>;
    fn handle(&mut self, m: QueryAccess, _: &mut SyncContext<Self>) -> Self::Result {
        let t = self.repos.get(&m.repo).ok_or_else(|| {
            AccessRefused::NotTracked(format!("{} has no access tracking", m.repo))
        })?;
        let e = |e: prepub_core::access::AccessError| AccessRefused::Store(e.to_string());
        let (objects_tracked, paths_tracked) = t.store.counts().map_err(e)?;
        Ok(AccessView {
            objects_tracked,
            paths_tracked,
            object_seen: match &m.object {
                Some(o) => t.store.object_seen(o).map_err(e)?,
                None => None,
            },
            path_seen: match &m.path {
                Some(p) => t.store.path_seen(p).map_err(e)?,
                None => None,
            },
        })
    }
}
