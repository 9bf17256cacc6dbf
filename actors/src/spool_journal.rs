//! `SpoolJournal`: the actor that owns the spool directory and its write-ahead journal.
//!
//! A sync actor (on its own thread): every message that changes a job is appended to the
//! journal and fsynced before the reply, so callers act only on durable state. It keeps the
//! latest record of every job in memory; a restarted `JobManager` rebuilds its table from it
//! (`Snapshot`). On process restart the journal file itself is replayed by [`Spool::open`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use prepub_core::intake::ChangeSet;
use prepub_core::jobs::JobRecord;
use prepub_core::spool::{SerializedChangeset, Spool, SpoolError};

pub struct SpoolJournal {
    spool: Spool,
    latest: BTreeMap<String, JobRecord>,
}

impl SpoolJournal {
    pub fn new(spool: Spool, latest: BTreeMap<String, JobRecord>) -> Self {
        SpoolJournal { spool, latest }
    }
}

impl Actor for SpoolJournal {
    type Context = SyncContext<Self>;
}

/// Accepts an uploaded tar as a new job (durable once answered `Ok`).
#[derive(Message)]
#[rtype(result = "Result<(), SpoolError>")]
pub struct AcceptJob {
    pub record: JobRecord,
    pub upload: PathBuf,
    /// The change set, when the upload was processed before it was accepted.
    pub changeset: Option<Arc<ChangeSet>>,
    /// That change set serialized ahead, if it was.
    pub serialized: Option<SerializedChangeset>,
}

impl Handler<AcceptJob> for SpoolJournal {
    type Result = Result<(), SpoolError>;
    fn handle(&mut self, m: AcceptJob, _: &mut SyncContext<Self>) -> Self::Result {
        crate::testhook::point("accepting");
        match &m.changeset {
            Some(cs) => {
                self.spool
                    .accept_processed(&m.record, &m.upload, cs, m.serialized.as_ref())?
            }
            None => self.spool.accept(&m.record, &m.upload)?,
        }
        self.latest.insert(m.record.id.clone(), m.record);
        Ok(())
    }
}

/// Journals a job's new record.
#[derive(Message)]
#[rtype(result = "Result<(), SpoolError>")]
pub struct RecordJob(pub JobRecord);

impl Handler<RecordJob> for SpoolJournal {
    type Result = Result<(), SpoolError>;
    fn handle(&mut self, m: RecordJob, _: &mut SyncContext<Self>) -> Self::Result {
        if crate::testhook::fails(&format!("record-{}", m.0.state.as_str())) {
            return Err(prepub_core::spool::SpoolError::Io {
                path: "journal.wal".into(),
                source: std::io::Error::other("test hook: journal write failed"),
            });
        }
        self.spool.record(&m.0)?;
        if m.0.tar_deleted {
            self.spool.delete_payload(&m.0.id);
        } else if m.0.state.is_terminal() {
            self.spool.delete_acks(&m.0.id);
        }
        self.latest.insert(m.0.id.clone(), m.0);
        Ok(())
    }
}

/// Stores a processed change set.
#[derive(Message)]
#[rtype(result = "Result<(), SpoolError>")]
pub struct SaveChangeset {
    pub id: String,
    pub changeset: Arc<ChangeSet>,
    /// The change set serialized ahead, if it was (then it is not serialized again).
    pub serialized: Option<SerializedChangeset>,
}

impl Handler<SaveChangeset> for SpoolJournal {
    type Result = Result<(), SpoolError>;
    fn handle(&mut self, m: SaveChangeset, _: &mut SyncContext<Self>) -> Self::Result {
        self.spool
            .save_changeset_ahead(&m.id, &m.changeset, m.serialized.as_ref())
    }
}

/// The latest record of every job.
#[derive(Message)]
#[rtype(result = "BTreeMap<String, JobRecord>")]
pub struct Snapshot;

impl Handler<Snapshot> for SpoolJournal {
    type Result = MessageResult<Snapshot>;
    fn handle(&mut self, _: Snapshot, _: &mut SyncContext<Self>) -> Self::Result {
        MessageResult(self.latest.clone())
    }
}
