//! Publish jobs: the record every job carries through its life, and its states.
//!
//! A job is accepted once its tar is on the spool disk and its first record is journaled; from
//! then on every state change is a new record. States, in order:
//! `queued` (tar spooled, waiting for a worker) → `processing` (tar unpacked, files chunked,
//! compressed, hashed and written to the CAS) → `uploading` (objects confirmed in the store the
//! repository is served from) → `distributing` (Stratum 1 pre-warming; passed straight through
//! when no Stratum 1 is configured) → `committing` (catalogs, history and signed manifest
//! written, strictly one commit at a time per repository) → `published`. Any state may end in
//! `failed` (with the error and the state it failed in) or `aborted` (on request; nothing partial
//! is published).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The life-cycle states of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Processing,
    Uploading,
    Distributing,
    Committing,
    Published,
    Failed,
    Aborted,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Published | JobState::Failed | JobState::Aborted
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Processing => "processing",
            JobState::Uploading => "uploading",
            JobState::Distributing => "distributing",
            JobState::Committing => "committing",
            JobState::Published => "published",
            JobState::Failed => "failed",
            JobState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "processing" => JobState::Processing,
            "uploading" => JobState::Uploading,
            "distributing" => JobState::Distributing,
            "committing" => JobState::Committing,
            "published" => JobState::Published,
            "failed" => JobState::Failed,
            "aborted" => JobState::Aborted,
            _ => return None,
        })
    }
}

/// Work counters of a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub entries: u64,
    pub bytes_processed: u64,
    pub objects_new: u64,
    pub objects_dedup: u64,
    pub bytes_compressed: u64,
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// Stable kebab-case code.
    pub code: String,
    pub message: String,
    /// The state the job was in when it failed.
    pub state: JobState,
}

/// What a published job produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub root_hash: String,
    pub revision: u64,
    pub tag: String,
}

/// The durable record of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub repo: String,
    /// Target path in catalog form (`/a/b`, `""` = repository root).
    pub path: String,
    pub tag_name: Option<String>,
    pub tag_description: Option<String>,
    pub tar_sha256: Option<String>,
    /// Name of the scoped token that submitted it (`None` = admin token).
    pub owner: Option<String>,
    pub state: JobState,
    /// UNIX milliseconds.
    pub created: i64,
    pub updated: i64,
    /// When each state was entered (UNIX milliseconds).
    pub state_times: BTreeMap<JobState, i64>,
    pub progress: Progress,
    pub error: Option<JobError>,
    pub result: Option<JobResult>,
    /// Bytes of the spooled tar.
    pub tar_bytes: u64,
    /// Root catalog the commit started from (set when entering `committing`), used on recovery
    /// to tell whether the commit already happened.
    pub base_root: Option<String>,
    /// Processing attempts (retries after transient errors and restarts).
    pub attempts: u32,
    /// Set when the tar has been deleted after the retention period.
    #[serde(default)]
    pub tar_deleted: bool,
    /// A removal job: `path` is taken out of the namespace (no tar).
    #[serde(default)]
    pub removal: bool,
    /// What the job is waiting for right now, if anything (e.g. a busy lease path).
    #[serde(default)]
    pub waiting: Option<String>,
    /// Stratum 1 pre-warming: each endpoint's outcome.
    #[serde(default)]
    pub distribution: BTreeMap<String, String>,
    /// An abort was asked for while the commit ran: carried out by the commit (unless it had
    /// published already), also after a restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort_requested: bool,
}

impl JobRecord {
    /// A new job in `queued`.
    pub fn new(id: String, repo: String, path: String, now_ms: i64) -> JobRecord {
        let mut state_times = BTreeMap::new();
        state_times.insert(JobState::Queued, now_ms);
        JobRecord {
            id,
            repo,
            path,
            tag_name: None,
            tag_description: None,
            tar_sha256: None,
            owner: None,
            state: JobState::Queued,
            created: now_ms,
            updated: now_ms,
            state_times,
            progress: Progress::default(),
            error: None,
            result: None,
            tar_bytes: 0,
            base_root: None,
            attempts: 0,
            tar_deleted: false,
            removal: false,
            waiting: None,
            distribution: BTreeMap::new(),
            abort_requested: false,
        }
    }

    /// Moves to `state` at `now_ms`.
    pub fn transition(&mut self, state: JobState, now_ms: i64) {
        self.waiting = None;
        self.state = state;
        self.updated = now_ms;
        self.state_times.insert(state, now_ms);
    }

    /// Ends the job as failed in its current state.
    pub fn fail(&mut self, code: &str, message: impl Into<String>, now_ms: i64) {
        self.error = Some(JobError {
            code: code.to_string(),
            message: message.into(),
            state: self.state,
        });
        self.transition(JobState::Failed, now_ms);
    }
}

/// Tag names accepted from clients: `^[A-Za-z0-9._-]+$`, at most 255 characters.
pub fn valid_client_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 255
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// UNIX time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_states() {
        assert!(valid_client_tag("v1.2.3_rc-1"));
        assert!(!valid_client_tag("v 1"));
        assert!(!valid_client_tag(""));
        assert!(!valid_client_tag(&"a".repeat(256)));
        assert!(!valid_client_tag("a/b"));
        for s in [
            "queued",
            "processing",
            "uploading",
            "distributing",
            "committing",
            "published",
            "failed",
            "aborted",
        ] {
            assert_eq!(JobState::parse(s).unwrap().as_str(), s);
        }
        let mut j = JobRecord::new("x".into(), "r".into(), "/p".into(), 1);
        j.transition(JobState::Processing, 2);
        j.fail("bad-tar", "boom", 3);
        assert_eq!(j.error.as_ref().unwrap().state, JobState::Processing);
        assert_eq!(j.state, JobState::Failed);
        let json = serde_json::to_string(&j).unwrap();
        assert!(json.contains("\"state\":\"failed\""));
        assert_eq!(serde_json::from_str::<JobRecord>(&json).unwrap(), j);
    }
}
