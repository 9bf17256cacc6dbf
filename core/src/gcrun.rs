//! Garbage-collection runs as journaled records in the spool (`<spool>/gc/runs/<id>.json`),
//! as plain synchronous code.
//!
//! A run moves through `scheduled` → `cleaning` (content lifecycle, scheduled runs only) →
//! `scanning` → `tombstoned` (with a soft-delete period) → `reaping` → `complete`, or ends
//! `aborted` or `failed`. Every state change is written durably before the step it names
//! starts, so after a crash the journal says how far a run got. A run found unfinished at
//! start-up is ended `aborted` and the tombstones it made are revoked (see
//! `AccessStore::revoke_run`); the objects it already deleted were due and re-checked, and
//! are in the audit log.

use std::path::{Path, PathBuf};

use crate::spool::{write_atomic, SpoolError};

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Scheduled,
    Cleaning,
    Scanning,
    Tombstoned,
    Reaping,
    Complete,
    Aborted,
    Failed,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Complete | RunState::Aborted | RunState::Failed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Scheduled => "scheduled",
            RunState::Cleaning => "cleaning",
            RunState::Scanning => "scanning",
            RunState::Tombstoned => "tombstoned",
            RunState::Reaping => "reaping",
            RunState::Complete => "complete",
            RunState::Aborted => "aborted",
            RunState::Failed => "failed",
        }
    }
}

/// One garbage-collection run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcRun {
    pub id: String,
    pub repo: String,
    /// `api` or `schedule`.
    pub trigger: String,
    pub dry_run: bool,
    pub state: RunState,
    /// UNIX seconds.
    pub created: i64,
    pub updated: i64,
    /// UNIX milliseconds of the creation: orders runs made within one second.
    #[serde(default)]
    pub created_ms: i64,
    /// Why the run failed or was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Each state with the time it was entered.
    #[serde(default)]
    pub history: Vec<(RunState, i64)>,
    /// Paths the lifecycle sent out of the namespace (removal job ids).
    #[serde(default)]
    pub removals: Vec<String>,
    #[serde(default)]
    pub candidates: usize,
    #[serde(default)]
    pub tombstoned: usize,
    #[serde(default)]
    pub revoked: usize,
    #[serde(default)]
    pub deleted: usize,
    #[serde(default)]
    pub bytes_reclaimed: u64,
    /// Temporary files of writes that never completed (a process stopped mid-write), older than
    /// the grace period, removed from a local storage; their bytes are in `bytes_reclaimed`.
    #[serde(default)]
    pub leftovers_removed: usize,
}

impl GcRun {
    /// A new run, created at `now_ms` (UNIX milliseconds).
    pub fn new(id: String, repo: &str, trigger: &str, dry_run: bool, now_ms: i64) -> GcRun {
        let now = now_ms.div_euclid(1000);
        GcRun {
            id,
            repo: repo.to_string(),
            trigger: trigger.to_string(),
            dry_run,
            state: RunState::Scheduled,
            created: now,
            updated: now,
            created_ms: now_ms,
            reason: None,
            history: vec![(RunState::Scheduled, now)],
            removals: Vec::new(),
            candidates: 0,
            tombstoned: 0,
            revoked: 0,
            deleted: 0,
            bytes_reclaimed: 0,
            leftovers_removed: 0,
        }
    }

    /// Moves to `state` (in memory; the caller saves).
    pub fn enter(&mut self, state: RunState, now: i64) {
        self.state = state;
        self.updated = now;
        self.history.push((state, now));
    }
}

/// The directory of run records. Keeps the newest `keep` finished runs per repository.
pub struct RunJournal {
    dir: PathBuf,
    keep: usize,
}

impl RunJournal {
    pub fn open(dir: &Path) -> Result<RunJournal, SpoolError> {
        std::fs::create_dir_all(dir).map_err(|source| SpoolError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(RunJournal {
            dir: dir.to_path_buf(),
            keep: 50,
        })
    }

    fn file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes the run durably (temp file, fsync, rename, fsync directory).
    pub fn save(&self, run: &GcRun) -> Result<(), SpoolError> {
        let data = serde_json::to_vec_pretty(run).map_err(|e| SpoolError::Corrupt {
            path: self.file(&run.id).display().to_string(),
            msg: e.to_string(),
        })?;
        write_atomic(&self.file(&run.id), &data)?;
        if run.state.is_terminal() {
            self.prune(&run.repo);
        }
        Ok(())
    }

    /// Every readable run, oldest first (unreadable files are skipped: a torn write cannot
    /// happen with `save`, so they are foreign).
    pub fn list(&self) -> Vec<GcRun> {
        let mut out: Vec<GcRun> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(".json") && !n.starts_with('.')
            })
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a: &GcRun, b| {
            (a.created, a.created_ms, &a.id).cmp(&(b.created, b.created_ms, &b.id))
        });
        out
    }

    /// The runs of `repo`, oldest first.
    pub fn of_repo(&self, repo: &str) -> Vec<GcRun> {
        self.list().into_iter().filter(|r| r.repo == repo).collect()
    }

    /// Runs left unfinished (by a crash or a stop), to be ended by the caller.
    pub fn unfinished(&self) -> Vec<GcRun> {
        self.list()
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .collect()
    }

    fn prune(&self, repo: &str) {
        let done: Vec<GcRun> = self
            .of_repo(repo)
            .into_iter()
            .filter(|r| r.state.is_terminal())
            .collect();
        if done.len() > self.keep {
            for r in &done[..done.len() - self.keep] {
                let _ = std::fs::remove_file(self.file(&r.id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_survive_reopening_and_unfinished_ones_are_found() {
        let d = tempfile::tempdir().unwrap();
        let j = RunJournal::open(d.path()).unwrap();
        let mut a = GcRun::new("a".into(), "r.example.org", "api", false, 100_000);
        a.enter(RunState::Scanning, 101);
        j.save(&a).unwrap();
        let mut b = GcRun::new("b".into(), "r.example.org", "schedule", true, 200_000);
        b.enter(RunState::Complete, 201);
        j.save(&b).unwrap();
        let j = RunJournal::open(d.path()).unwrap();
        assert_eq!(j.list(), vec![a.clone(), b]);
        assert_eq!(j.unfinished(), vec![a]);
        assert_eq!(
            j.unfinished()[0].history,
            vec![(RunState::Scheduled, 100), (RunState::Scanning, 101)]
        );
    }

    #[test]
    fn runs_of_the_same_second_keep_their_order() {
        let d = tempfile::tempdir().unwrap();
        let j = RunJournal::open(d.path()).unwrap();
        // Ids sort the other way round; creation decides.
        for (id, ms) in [("z-first", 5_000_100), ("a-second", 5_000_900)] {
            j.save(&GcRun::new(id.into(), "x", "api", false, ms))
                .unwrap();
        }
        let ids: Vec<String> = j.list().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec!["z-first", "a-second"]);
    }

    #[test]
    fn finished_runs_are_pruned_per_repository() {
        let d = tempfile::tempdir().unwrap();
        let mut j = RunJournal::open(d.path()).unwrap();
        j.keep = 2;
        let mut open = GcRun::new("open".into(), "x", "api", false, 1_000);
        open.enter(RunState::Reaping, 2);
        j.save(&open).unwrap();
        for i in 0..4 {
            let mut r = GcRun::new(format!("r{i}"), "x", "api", false, (10 + i) * 1000);
            r.enter(RunState::Complete, 20 + i);
            j.save(&r).unwrap();
        }
        let mut other = GcRun::new("o".into(), "y", "api", false, 5_000);
        other.enter(RunState::Failed, 6);
        j.save(&other).unwrap();
        let ids: Vec<String> = j.list().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec!["open", "o", "r2", "r3"]);
    }
}
