//! `ReceiverAgent`: the Stratum 1 receiver's storage work (inventory lookups and verified,
//! durable object writes) on a pool of sync threads, so that the receiver's HTTP handlers only
//! send messages and fsync never runs on an async arbiter. The state — the storages and their
//! inventory filters — is the plain `prepub_core::receiver::Receiver`, rebuilt from the disk
//! when the process starts; the agents share it.

use std::ops::Range;
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use prepub_core::cas::PutOutcome;
use prepub_core::hash::ObjectId;
use prepub_core::receiver::{ReceiveError, Receiver};

pub struct ReceiverAgent {
    receiver: Arc<Receiver>,
}

impl ReceiverAgent {
    /// Starts `threads` agents sharing `receiver`.
    pub fn start(receiver: Arc<Receiver>, threads: usize) -> Addr<ReceiverAgent> {
        SyncArbiter::start(threads.max(1), move || ReceiverAgent {
            receiver: receiver.clone(),
        })
    }
}

impl Actor for ReceiverAgent {
    type Context = SyncContext<Self>;
}

/// Which of `ids` the storage of `repo` lacks.
#[derive(Message)]
#[rtype(result = "Result<Vec<ObjectId>, ReceiveError>")]
pub struct Missing {
    pub repo: String,
    pub ids: Vec<ObjectId>,
}

impl Handler<Missing> for ReceiverAgent {
    type Result = Result<Vec<ObjectId>, ReceiveError>;
    fn handle(&mut self, m: Missing, _: &mut SyncContext<Self>) -> Self::Result {
        self.receiver.missing(&m.repo, &m.ids)
    }
}

/// Stores the objects found at `ranges` of `body` (one object, or a pack's objects) after
/// checking each against its name; answers `(objects stored, bytes stored)`, already-present
/// objects not counted.
#[derive(Message)]
#[rtype(result = "Result<(u64, u64), ReceiveError>")]
pub struct Put {
    pub repo: String,
    pub body: Bytes,
    pub objects: Vec<(ObjectId, Range<usize>)>,
}

impl Handler<Put> for ReceiverAgent {
    type Result = Result<(u64, u64), ReceiveError>;
    fn handle(&mut self, m: Put, _: &mut SyncContext<Self>) -> Self::Result {
        crate::testhook::point("receiver-put");
        let objects: Vec<(ObjectId, &[u8])> = m
            .objects
            .iter()
            .map(|(id, range)| (*id, &m.body[range.clone()]))
            .collect();
        let (mut stored, mut bytes) = (0, 0);
        for ((_, b), o) in objects
            .iter()
            .zip(self.receiver.put_all(&m.repo, &objects)?)
        {
            if o == PutOutcome::Stored {
                stored += 1;
                bytes += b.len() as u64;
            }
        }
        Ok((stored, bytes))
    }
}
