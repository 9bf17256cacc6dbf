//! `CasWriter`: owns the store threads that put encoded objects into the CAS —
//! `pipeline.upload_concurrency` puts in flight, objects the store already has skipped (dedup by
//! existence), each put durable before it is reported. Encoders of every job feed it through
//! the crossbeam channel of its [`StorePool`]; the actor shell reports its counters.

use actix::prelude::*;
use prepub_core::pipeline::StorePool;
use std::sync::atomic::Ordering::Relaxed;

/// Object bytes allowed in flight between the tar readers and the stored objects.
pub const IN_FLIGHT_BYTES: usize = 64 << 20;

pub struct CasWriter {
    store: StorePool,
}

impl CasWriter {
    pub fn new(upload_concurrency: usize) -> CasWriter {
        CasWriter {
            store: StorePool::new(upload_concurrency, IN_FLIGHT_BYTES),
        }
    }

    /// The pool encoders feed.
    pub fn store(&self) -> StorePool {
        self.store.clone()
    }

    pub fn status(&self) -> CasWriterStatus {
        let s = self.store.stats();
        CasWriterStatus {
            puts_in_flight_max: self.store.workers(),
            stored: s.stored.load(Relaxed),
            already_present: s.already_present.load(Relaxed),
            bytes_stored: s.bytes_stored.load(Relaxed),
            errors: s.errors.load(Relaxed),
        }
    }
}

impl Actor for CasWriter {
    type Context = Context<Self>;
}

/// Counters since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasWriterStatus {
    pub puts_in_flight_max: usize,
    pub stored: u64,
    pub already_present: u64,
    pub bytes_stored: u64,
    pub errors: u64,
}

/// Asks for the counters.
#[derive(Message)]
#[rtype(result = "CasWriterStatus")]
pub struct GetCasWriterStatus;

impl Handler<GetCasWriterStatus> for CasWriter {
    type Result = MessageResult<GetCasWriterStatus>;
    fn handle(&mut self, _: GetCasWriterStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.status())
    }
}
