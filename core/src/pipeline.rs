//! The parallel encode pipeline: CPU threads compress and hash object bytes, I/O threads store
//! them, both fed by bounded crossbeam channels.
//!
//! In: whole small files and content-defined chunks of large files, cut by the tar reader (see
//! `intake`). Out: one [`Encoded`] per task on the reply channel the submitter gave. The CPU side
//! runs `cpu_workers` threads (zlib, SHA-1); the I/O side runs `io_workers` threads, so that many
//! durable puts (each fsynced) are in flight at once — a local disk completes concurrent flushes
//! far faster than sequential ones. The I/O side is a [`StorePool`] of its own, shared by every
//! job (the daemon's `CasWriter` actor owns it). Memory is bounded by a byte budget that the submitter
//! acquires before handing bytes over and that is released once the object is stored.

use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use crossbeam_channel::{bounded, Receiver, Sender};
use sha1::{Digest, Sha1};

use crate::cas::{Cas, CasError, PutOutcome};
use crate::hash::{Digest20, ObjectId, Suffix};
use crate::object::{zlib_compress, Compression};
use crate::rawindex::{RawIndex, RawKey};

/// One object's bytes to encode and store.
pub struct Task {
    pub tag: usize,
    pub data: Vec<u8>,
    pub suffix: Suffix,
    pub compression: Compression,
    pub cas: Arc<dyn Cas>,
    /// The CAS's raw-content index: content encoded before is not compressed again.
    pub index: Option<Arc<RawIndex>>,
    pub reply: Sender<Encoded>,
}

/// The outcome of one task.
#[derive(Debug)]
pub struct Encoded {
    pub tag: usize,
    pub result: Result<(ObjectId, u64, PutOutcome), CasError>,
}

struct Put {
    tag: usize,
    id: ObjectId,
    bytes: Vec<u8>,
    raw_len: usize,
    cas: Arc<dyn Cas>,
    /// Where to record the encoding once stored.
    index: Option<(Arc<RawIndex>, RawKey)>,
    reply: Sender<Encoded>,
}

/// Bytes in flight between submit and store.
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    limit: usize,
}

impl Budget {
    fn acquire(&self, n: usize) {
        let n = n.min(self.limit);
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *u + n > self.limit && *u > 0 {
            u = self.freed.wait(u).unwrap_or_else(|e| e.into_inner());
        }
        *u += n;
    }

    fn release(&self, n: usize) {
        let n = n.min(self.limit);
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *u = u.saturating_sub(n);
        self.freed.notify_all();
    }
}

/// Counters of a store pool.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub stored: std::sync::atomic::AtomicU64,
    pub already_present: std::sync::atomic::AtomicU64,
    pub bytes_stored: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
}

/// The I/O side: threads that store encoded objects, `io_workers` puts in flight, skipping
/// objects the store already has (dedup by existence).
#[derive(Clone)]
pub struct StorePool {
    tx: Sender<Put>,
    budget: Arc<Budget>,
    workers: usize,
    stats: Arc<StoreStats>,
}

impl StorePool {
    /// Starts `io_workers` store threads; at most `budget_bytes` of object data may be in
    /// flight between submission and storage.
    pub fn new(io_workers: usize, budget_bytes: usize) -> StorePool {
        use std::sync::atomic::Ordering::Relaxed;
        let io_workers = io_workers.max(1);
        let budget = Arc::new(Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            limit: budget_bytes.max(32 << 20),
        });
        let stats = Arc::new(StoreStats::default());
        let (io_tx, io_rx) = bounded::<Put>(io_workers * 2);
        for i in 0..io_workers {
            let rx: Receiver<Put> = io_rx.clone();
            let budget = budget.clone();
            let stats = stats.clone();
            let _ = thread::Builder::new()
                .name(format!("store-{i}"))
                .spawn(move || {
                    while let Ok(p) = rx.recv() {
                        let put = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            p.cas.put_bytes(&p.id, &p.bytes)
                        }));
                        let result = match put {
                            Ok(r) => r.map(|o| (p.id, p.bytes.len() as u64, o)),
                            Err(_) => Err(CasError::Io {
                                op: "put",
                                path: p.id.path(),
                                source: std::io::Error::other("store thread panicked"),
                            }),
                        };
                        match &result {
                            Ok((_, n, PutOutcome::Stored)) => {
                                stats.stored.fetch_add(1, Relaxed);
                                stats.bytes_stored.fetch_add(*n, Relaxed);
                            }
                            Ok((_, _, PutOutcome::AlreadyPresent)) => {
                                stats.already_present.fetch_add(1, Relaxed);
                            }
                            Err(_) => {
                                stats.errors.fetch_add(1, Relaxed);
                            }
                        }
                        if let (Ok((id, n, _)), Some((ix, key))) = (&result, &p.index) {
                            ix.record(key, id, *n);
                        }
                        budget.release(p.raw_len);
                        let _ = p.reply.send(Encoded { tag: p.tag, result });
                    }
                });
        }
        StorePool {
            tx: io_tx,
            budget,
            workers: io_workers,
            stats,
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }
}

/// The CPU side: threads that compress and hash, feeding a [`StorePool`].
#[derive(Clone)]
pub struct Pipeline {
    cpu: Sender<Task>,
    budget: Arc<Budget>,
    cpu_workers: usize,
}

fn encode(data: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::Zlib(level) => zlib_compress(data, level),
        Compression::None => data.to_vec(),
    }
}

impl Pipeline {
    /// Starts `cpu_workers` (0 = one per core) CPU threads and a store pool of `io_workers`
    /// threads, with at most `budget_bytes` of object data in flight.
    pub fn new(cpu_workers: usize, io_workers: usize, budget_bytes: usize) -> Pipeline {
        Pipeline::with_store(cpu_workers, &StorePool::new(io_workers, budget_bytes))
    }

    /// Starts `cpu_workers` (0 = one per core) CPU threads feeding `store`.
    pub fn with_store(cpu_workers: usize, store: &StorePool) -> Pipeline {
        let cpu_workers = if cpu_workers == 0 {
            thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            cpu_workers
        };
        let (cpu_tx, cpu_rx) = bounded::<Task>(cpu_workers * 2);
        for i in 0..cpu_workers {
            let rx: Receiver<Task> = cpu_rx.clone();
            let io_tx = store.tx.clone();
            let budget = store.budget.clone();
            let _ = thread::Builder::new()
                .name(format!("cpu-{i}"))
                .spawn(move || {
                    while let Ok(t) = rx.recv() {
                        // Content encoded before, still stored: one SHA-1 pass, no zlib, no put.
                        let key = t
                            .index
                            .as_ref()
                            .map(|_| RawKey::of(&t.data, t.compression, t.suffix));
                        if let (Some(ix), Some(k)) = (&t.index, &key) {
                            if let Some((id, stored)) = ix.lookup(k, t.cas.as_ref()) {
                                budget.release(t.data.len());
                                let _ = t.reply.send(Encoded {
                                    tag: t.tag,
                                    result: Ok((id, stored, PutOutcome::AlreadyPresent)),
                                });
                                continue;
                            }
                        }
                        // A panic must not swallow the reply: the submitter would wait forever.
                        let Ok(bytes) = std::panic::catch_unwind(|| encode(&t.data, t.compression))
                        else {
                            let _ = t.reply.send(Encoded {
                                tag: t.tag,
                                result: Err(CasError::Io {
                                    op: "encode",
                                    path: String::new(),
                                    source: std::io::Error::other("encoder panicked"),
                                }),
                            });
                            continue;
                        };
                        let id = ObjectId::new(Digest20(Sha1::digest(&bytes).into()), t.suffix);
                        let put = Put {
                            tag: t.tag,
                            id,
                            bytes,
                            raw_len: t.data.len(),
                            cas: t.cas,
                            index: t.index.zip(key),
                            reply: t.reply,
                        };
                        if io_tx.send(put).is_err() {
                            return;
                        }
                    }
                });
        }
        Pipeline {
            cpu: cpu_tx,
            budget: store.budget.clone(),
            cpu_workers,
        }
    }

    pub fn cpu_workers(&self) -> usize {
        self.cpu_workers
    }

    /// Hands a task to the pool; blocks while the byte budget or the queue is full.
    pub fn submit(&self, t: Task) {
        self.budget.acquire(t.data.len());
        let n = t.data.len();
        if let Err(e) = self.cpu.send(t) {
            // The pool is gone (process shutting down): report the task as failed.
            self.budget.release(n);
            let t = e.into_inner();
            let _ = t.reply.send(Encoded {
                tag: t.tag,
                result: Err(CasError::Io {
                    op: "encode",
                    path: String::new(),
                    source: std::io::Error::other("encoder pool stopped"),
                }),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::LocalCas;

    #[test]
    fn encodes_and_stores_in_parallel_with_the_same_names() {
        let dir = tempfile::tempdir().unwrap();
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::create(dir.path()).unwrap().without_fsync());
        let p = Pipeline::new(2, 4, 1 << 20);
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..50usize {
            p.submit(Task {
                tag: i,
                data: vec![i as u8; 100_000 + i],
                suffix: Suffix::None,
                compression: Compression::Zlib(6),
                cas: cas.clone(),
                index: None,
                reply: tx.clone(),
            });
        }
        let mut seen = [false; 50];
        for _ in 0..50 {
            let e = rx.recv().unwrap();
            let (id, _, outcome) = e.result.unwrap();
            assert_eq!(outcome, PutOutcome::Stored);
            let want = zlib_compress(&vec![e.tag as u8; 100_000 + e.tag], 6);
            assert_eq!(id.digest, Digest20::of(&want));
            assert_eq!(std::fs::read(dir.path().join(id.path())).unwrap(), want);
            seen[e.tag] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
