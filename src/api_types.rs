//! The JSON types of the REST API, shared by the daemon and `prepubctl`.

use std::collections::BTreeMap;

use prepub_core::jobs::{JobRecord, Progress};
use serde::{Deserialize, Serialize};

/// `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Answer to a submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submitted {
    pub job_id: String,
    pub state: String,
}

/// A job's error as shown to clients.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobErrorView {
    pub code: String,
    pub message: String,
    /// The state the job failed in.
    pub state: String,
}

/// A job as shown to clients (internal recovery fields are not exposed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobView {
    pub job_id: String,
    pub state: String,
    pub repo: String,
    pub path: String,
    pub tag_name: Option<String>,
    pub tag_description: Option<String>,
    /// UNIX milliseconds.
    pub created: i64,
    pub updated: i64,
    /// When each state was entered (UNIX milliseconds).
    pub state_times: BTreeMap<String, i64>,
    pub progress: Progress,
    pub error: Option<JobErrorView>,
    pub root_hash: Option<String>,
    pub revision: Option<u64>,
    /// The tag the published revision carries.
    pub tag: Option<String>,
    pub attempts: u32,
    pub tar_bytes: u64,
    /// What the job is waiting for, if anything (e.g. a busy gateway lease).
    pub waiting: Option<String>,
    /// Stratum 1 pre-warming outcome per endpoint.
    pub distribution: BTreeMap<String, String>,
    /// A removal job (`POST /api/v1/removals`): `path` is taken out of the namespace.
    pub removal: bool,
}

impl From<&JobRecord> for JobView {
    fn from(j: &JobRecord) -> JobView {
        JobView {
            job_id: j.id.clone(),
            state: j.state.as_str().into(),
            repo: j.repo.clone(),
            path: if j.path.is_empty() {
                "/".into()
            } else {
                j.path.clone()
            },
            tag_name: j.tag_name.clone(),
            tag_description: j.tag_description.clone(),
            created: j.created,
            updated: j.updated,
            state_times: j
                .state_times
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), *v))
                .collect(),
            progress: j.progress,
            error: j.error.as_ref().map(|e| JobErrorView {
                code: e.code.clone(),
                message: e.message.clone(),
                state: e.state.as_str().into(),
            }),
            // Local mode publishes through cvmfs_server and learns neither.
            root_hash: j
                .result
                .as_ref()
                .map(|r| r.root_hash.clone())
                .filter(|h| !h.is_empty()),
            revision: j.result.as_ref().map(|r| r.revision).filter(|r| *r > 0),
            tag: j.result.as_ref().map(|r| r.tag.clone()),
            attempts: j.attempts,
            tar_bytes: j.tar_bytes,
            waiting: j.waiting.clone(),
            distribution: j.distribution.clone(),
            removal: j.removal,
        }
    }
}

/// A page of jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
}

/// `GET /api/v1/status`: what an operator looks at first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    /// True while new jobs are refused (`POST /api/v1/drain`).
    pub draining: bool,
    /// Jobs per state (all the caller may see).
    pub jobs: BTreeMap<String, usize>,
    /// Jobs that have not ended, oldest first.
    pub active: Vec<ActiveJob>,
    /// The service's actors and worker pools.
    pub actors: Vec<ActorView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActiveJob {
    pub job_id: String,
    pub repo: String,
    pub path: String,
    pub state: String,
    pub age_seconds: u64,
    pub progress: Progress,
    pub waiting: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActorView {
    pub name: String,
    /// How many run (threads of a pool, distributors per endpoint, ...).
    pub instances: usize,
    /// `running`, `not responding`, `connected`, `disconnected`.
    pub status: String,
    pub detail: String,
}

/// Answer to `POST /api/v1/drain` and `POST /api/v1/resume`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainState {
    pub draining: bool,
    /// Jobs not yet ended.
    pub active: usize,
}

/// `GET /api/v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// True while the service drains (health stays "ok": draining is not a fault).
    #[serde(default)]
    pub draining: bool,
    pub checks: BTreeMap<String, Check>,
    pub jobs: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub ok: bool,
    pub detail: String,
}
