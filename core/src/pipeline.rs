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

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use crossbeam_channel::{bounded, Receiver, Sender};
use sha1::{Digest, Sha1};

use crate::cas::{Cas, CasError, PutOutcome};
use crate::content::Content;
use crate::hash::{Digest20, ObjectId, Suffix};
use crate::object::{zlib_compress, Compression};
use crate::rawindex::{RawIndex, RawKey};

/// One object's bytes to encode and store.
pub struct Task {
    pub tag: usize,
    /// The content: its own bytes, or shared with the upload it came in, in the pieces it
    /// lies in there (see [`crate::intake::Input::take_shared`]).
    pub data: Content,
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
    /// The in-flight entry that later tasks of the same content wait on.
    inflight: InflightKey,
    reply: Sender<Encoded>,
}

/// Content being encoded or stored right now, per store: a second task of the same raw bytes
/// (a duplicate file or chunk) waits for the first one's outcome instead of compressing again.
type InflightKey = (usize, RawKey);

/// A task waiting for another one's object: its tag and where to answer.
type Waiter = (usize, Sender<Encoded>);

#[derive(Default)]
struct Inflight {
    waiting: Mutex<HashMap<InflightKey, Vec<Waiter>>>,
}

impl Inflight {
    /// Claims `key` for encoding; `false` (and the task queued as a waiter) if it is claimed.
    fn claim(&self, key: InflightKey, tag: usize, reply: &Sender<Encoded>) -> bool {
        let mut m = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(&key) {
            Some(w) => {
                w.push((tag, reply.clone()));
                false
            }
            None => {
                m.insert(key, Vec::new());
                true
            }
        }
    }

    /// Ends `key`'s encoding and answers its waiters with the same object.
    fn settle(&self, key: &InflightKey, result: &Result<(ObjectId, u64, PutOutcome), CasError>) {
        let waiters = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
            .unwrap_or_default();
        for (tag, reply) in waiters {
            let result = match result {
                Ok((id, n, _)) => Ok((*id, *n, PutOutcome::AlreadyPresent)),
                Err(e) => Err(CasError::Io {
                    op: "put",
                    path: String::new(),
                    source: std::io::Error::other(e.to_string()),
                }),
            };
            let _ = reply.send(Encoded { tag, result });
        }
    }
}

/// The address of a store, telling stores apart (not their vtables).
fn store_addr(cas: &Arc<dyn Cas>) -> usize {
    Arc::as_ptr(cas) as *const () as usize
}

/// At most this many object bytes go into one store batch.
const BATCH_BYTES: usize = 64 << 20;

/// The most objects one of `io_workers` store threads hands its store at once, whatever the
/// store would take: a local store holds each new object of a batch open until the batch is
/// named, so the batches of all threads together stay within a quarter of the process's
/// `open_files` limit (another quarter may hold local stores' shard directories, see
/// `cas::Shards`; the rest is for connections, spool files and databases).
fn batch_cap(open_files: u64, io_workers: usize) -> usize {
    let share = open_files / 4 / io_workers.max(1) as u64;
    usize::try_from(share).unwrap_or(usize::MAX).max(1)
}

/// Bytes in flight between submit and store.
struct Budget {
    used: Mutex<Used>,
    freed: Condvar,
    limit: usize,
}

#[derive(Default)]
struct Used {
    bytes: usize,
    /// Submitters waiting for bytes to be freed: a release wakes them only when there are
    /// some (a wake-up is a system call, and there is a release per object).
    waiting: usize,
}

impl Budget {
    fn acquire(&self, n: usize) {
        let n = n.min(self.limit);
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while u.bytes + n > self.limit && u.bytes > 0 {
            u.waiting += 1;
            u = self.freed.wait(u).unwrap_or_else(|e| e.into_inner());
            u.waiting -= 1;
        }
        u.bytes += n;
    }

    fn release(&self, n: usize) {
        let n = n.min(self.limit);
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        u.bytes = u.bytes.saturating_sub(n);
        if u.waiting > 0 {
            self.freed.notify_all();
        }
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
    inflight: Arc<Inflight>,
}

impl StorePool {
    /// Starts `io_workers` store threads; at most `budget_bytes` of object data may be in
    /// flight between submission and storage.
    pub fn new(io_workers: usize, budget_bytes: usize) -> StorePool {
        let cap = batch_cap(crate::cas::open_file_limit(), io_workers.max(1));
        StorePool::with_batch_cap(io_workers, budget_bytes, cap)
    }

    /// [`StorePool::new`] with at most `cap` objects in one store batch.
    fn with_batch_cap(io_workers: usize, budget_bytes: usize, cap: usize) -> StorePool {
        let io_workers = io_workers.max(1);
        let budget = Arc::new(Budget {
            used: Mutex::new(Used::default()),
            freed: Condvar::new(),
            limit: budget_bytes.max(32 << 20),
        });
        let stats = Arc::new(StoreStats::default());
        let inflight = Arc::new(Inflight::default());
        // Deep enough for whole batches; memory stays bounded by the byte budget.
        let (io_tx, io_rx) = bounded::<Put>((io_workers * 2).max(4096));
        for i in 0..io_workers {
            let rx: Receiver<Put> = io_rx.clone();
            let budget = budget.clone();
            let stats = stats.clone();
            let inflight = inflight.clone();
            let _ = thread::Builder::new()
                .name(format!("store-{i}"))
                .spawn(move || {
                    let mut carry: Option<Put> = None;
                    loop {
                        let first = match carry.take() {
                            Some(p) => p,
                            None => match rx.recv() {
                                Ok(p) => p,
                                Err(_) => return,
                            },
                        };
                        // Whatever else is queued for the same store joins the batch.
                        let hint = first.cas.batch_hint().clamp(1, cap);
                        let mut bytes = first.bytes.len();
                        let mut batch = vec![first];
                        while batch.len() < hint && bytes < BATCH_BYTES {
                            let Ok(p) = rx.try_recv() else { break };
                            if store_addr(&p.cas) != store_addr(&batch[0].cas) {
                                carry = Some(p);
                                break;
                            }
                            bytes += p.bytes.len();
                            batch.push(p);
                        }
                        store_batch(batch, &stats, &budget, &inflight);
                    }
                });
        }
        StorePool {
            tx: io_tx,
            budget,
            workers: io_workers,
            stats,
            inflight,
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }
}

/// What the raw-content index learns of one stored object.
type Encoding = (RawKey, ObjectId, u64);

/// Stores one batch (objects for one store) and answers every task in it and its waiters.
fn store_batch(batch: Vec<Put>, stats: &StoreStats, budget: &Budget, inflight: &Inflight) {
    use std::sync::atomic::Ordering::Relaxed;
    let cas = batch[0].cas.clone();
    let items: Vec<(ObjectId, &[u8])> = batch.iter().map(|p| (p.id, &p.bytes[..])).collect();
    let outcomes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cas.put_many(&items)))
        .ok()
        .filter(|o| o.len() == items.len());
    drop(items);
    let mut outcomes = outcomes.map(|o| o.into_iter());
    let mut recorded: Vec<(Arc<RawIndex>, Vec<Encoding>)> = Vec::new();
    let mut done = Vec::with_capacity(batch.len());
    for p in batch {
        let put = match outcomes.as_mut().and_then(|o| o.next()) {
            Some(r) => r,
            None => Err(CasError::Io {
                op: "put",
                path: p.id.path(),
                source: std::io::Error::other("store thread panicked"),
            }),
        };
        let result = put.map(|o| (p.id, p.bytes.len() as u64, o));
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
            match recorded.iter_mut().find(|(i, _)| Arc::ptr_eq(i, ix)) {
                Some((_, v)) => v.push((*key, *id, *n)),
                None => recorded.push((ix.clone(), vec![(*key, *id, *n)])),
            }
        }
        done.push((p.tag, p.raw_len, p.inflight, p.reply, result));
    }
    // Recorded before anyone hears of the objects, so a repeat finds them.
    for (ix, v) in recorded {
        ix.record_many(&v);
    }
    for (tag, raw_len, key, reply, result) in done {
        budget.release(raw_len);
        inflight.settle(&key, &result);
        let _ = reply.send(Encoded { tag, result });
    }
}

/// A task that could not be encoded: `why` (the encoder panicked, the pool stopped).
fn not_encoded(why: &str) -> CasError {
    CasError::Io {
        op: "encode",
        path: String::new(),
        source: std::io::Error::other(why.to_string()),
    }
}

/// Encodes one task and hands its object to the store threads (or answers it at once: content
/// the raw-content index knows, content encoded right now by another task, an encoder panic).
/// False when the store threads are gone.
fn encode_task(t: Task, budget: &Budget, inflight: &Inflight, io_tx: &Sender<Put>) -> bool {
    let key = RawKey::of_content(&t.data, t.compression, t.suffix);
    // Content encoded before, still stored: one SHA-1 pass, no zlib, no put.
    if let Some(ix) = &t.index {
        if let Some((id, stored)) = ix.lookup(&key, t.cas.as_ref()) {
            budget.release(t.data.len());
            let _ = t.reply.send(Encoded {
                tag: t.tag,
                result: Ok((id, stored, PutOutcome::AlreadyPresent)),
            });
            return true;
        }
    }
    // The same content is being encoded right now: its outcome answers.
    let claim = (store_addr(&t.cas), key);
    if !inflight.claim(claim, t.tag, &t.reply) {
        budget.release(t.data.len());
        return true;
    }
    // A panic must not swallow the reply: the submitter would wait forever.
    let Ok(bytes) = std::panic::catch_unwind(|| encode(&t.data.contiguous(), t.compression)) else {
        let result = Err(not_encoded("encoder panicked"));
        budget.release(t.data.len());
        inflight.settle(&claim, &result);
        let _ = t.reply.send(Encoded { tag: t.tag, result });
        return true;
    };
    let id = ObjectId::new(Digest20(Sha1::digest(&bytes).into()), t.suffix);
    let put = Put {
        tag: t.tag,
        id,
        bytes,
        raw_len: t.data.len(),
        cas: t.cas,
        index: t.index.map(|ix| (ix, key)),
        inflight: claim,
        reply: t.reply,
    };
    io_tx.send(put).is_ok()
}

/// Tasks go to the encoder threads in batches, handed over once this many or
/// [`TASK_BATCH_BYTES`] are queued (a large file or chunk at once, with what was queued before
/// it): one hand-over and one wake-up of an encoder for many small files instead of one each
/// (a tree of small files spent more on those than on hashing them).
pub const TASK_BATCH: usize = 32;
pub const TASK_BATCH_BYTES: usize = 256 << 10;

/// Tasks one submitter (a tar's reader) holds back to hand to a [`Pipeline`] together: at
/// [`TASK_BATCH`] tasks or [`TASK_BATCH_BYTES`], and whenever [`Batcher::hand_over`] is called —
/// at the tar's end, and before the reader waits for its input (an upload still arriving), so
/// that nothing sits queued while the reader is idle.
pub struct Batcher {
    pipeline: Pipeline,
    queued: Mutex<Vec<Task>>,
}

impl Batcher {
    pub fn new(pipeline: &Pipeline) -> Arc<Batcher> {
        Arc::new(Batcher {
            pipeline: pipeline.clone(),
            queued: Mutex::new(Vec::new()),
        })
    }

    /// Queues `t`, handing the batch over once it is full.
    pub fn push(&self, t: Task) {
        let full = {
            let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            q.push(t);
            q.len() >= TASK_BATCH
                || q.iter().map(|t| t.data.len()).sum::<usize>() >= TASK_BATCH_BYTES
        };
        if full {
            self.hand_over();
        }
    }

    /// Hands whatever is queued to the pipeline (blocking while its budget or queue is full).
    pub fn hand_over(&self) {
        let tasks = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|e| e.into_inner()));
        if !tasks.is_empty() {
            self.pipeline.submit_batch(tasks);
        }
    }
}

/// The CPU side: threads that compress and hash, feeding a [`StorePool`].
#[derive(Clone)]
pub struct Pipeline {
    cpu: Sender<Vec<Task>>,
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
            crate::cores()
        } else {
            cpu_workers
        };
        let (cpu_tx, cpu_rx) = bounded::<Vec<Task>>(cpu_workers * 2);
        for i in 0..cpu_workers {
            let rx: Receiver<Vec<Task>> = cpu_rx.clone();
            let io_tx = store.tx.clone();
            let budget = store.budget.clone();
            let inflight = store.inflight.clone();
            let _ = thread::Builder::new()
                .name(format!("cpu-{i}"))
                .spawn(move || {
                    while let Ok(tasks) = rx.recv() {
                        for t in tasks {
                            let (tag, n, reply) = (t.tag, t.data.len(), t.reply.clone());
                            let run = || encode_task(t, &budget, &inflight, &io_tx);
                            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                                Ok(true) => {}
                                Ok(false) => return,
                                // Before its content was claimed (the encoding has its own
                                // guard): answered, so neither the submitter nor the rest
                                // of the batch is lost with it.
                                Err(_) => {
                                    budget.release(n);
                                    let _ = reply.send(Encoded {
                                        tag,
                                        result: Err(not_encoded("encoder panicked")),
                                    });
                                }
                            }
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
        self.submit_batch(vec![t]);
    }

    /// Hands several tasks to the pool at once, to be encoded one after the other by one
    /// thread (small files: one hand-over and one wake-up for many); blocks while the byte
    /// budget or the queue is full. A batch should be much smaller than the budget: one
    /// larger takes the whole budget and gives back more, for a while letting more in.
    pub fn submit_batch(&self, tasks: Vec<Task>) {
        // Taken at once (task by task, a batch larger than the budget would wait for its own
        // bytes): a batch counts as at most the whole budget.
        let total: usize = tasks.iter().map(|t| t.data.len()).sum();
        self.budget.acquire(total);
        if let Err(e) = self.cpu.send(tasks) {
            // The pool is gone (process shutting down): report the tasks as failed.
            for t in e.into_inner() {
                self.budget.release(t.data.len());
                let _ = t.reply.send(Encoded {
                    tag: t.tag,
                    result: Err(not_encoded("encoder pool stopped")),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::LocalCas;

    #[test]
    fn identical_content_gets_one_object_and_every_task_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::create(dir.path()).unwrap());
        let store = StorePool::new(4, 64 << 20);
        let p = Pipeline::with_store(2, &store);
        let (tx, rx) = crossbeam_channel::unbounded();
        // 60 tasks, 3 distinct contents, submitted back to back.
        for i in 0..60usize {
            p.submit(Task {
                tag: i,
                data: vec![(i % 3) as u8; 200_000].into(),
                suffix: Suffix::None,
                compression: Compression::Zlib(6),
                cas: cas.clone(),
                index: None,
                reply: tx.clone(),
            });
        }
        let mut ids = std::collections::HashMap::new();
        for _ in 0..60 {
            let e = rx.recv().unwrap();
            let (id, _, _) = e.result.unwrap();
            let want = zlib_compress(&vec![(e.tag % 3) as u8; 200_000], 6);
            assert_eq!(id.digest, Digest20::of(&want));
            ids.insert(e.tag % 3, id);
        }
        assert_eq!(ids.len(), 3);
        use std::sync::atomic::Ordering::Relaxed;
        let st = store.stats();
        assert_eq!(st.stored.load(Relaxed), 3);
        assert_eq!(st.errors.load(Relaxed), 0);
        assert_eq!(cas.list().unwrap().len(), 3);
    }

    #[test]
    fn a_batch_is_encoded_whole_even_one_larger_than_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::create(dir.path()).unwrap());
        // The smallest budget a pool takes (32 MiB).
        let store = StorePool::new(2, 0);
        let p = Pipeline::with_store(2, &store);
        let (tx, rx) = crossbeam_channel::unbounded();
        let task = |tag: usize, data: Vec<u8>| Task {
            tag,
            data: data.into(),
            suffix: Suffix::None,
            compression: Compression::Zlib(6),
            cas: cas.clone(),
            index: None,
            reply: tx.clone(),
        };
        // Small files, duplicates among them, in two batches.
        let small = |i: usize| format!("file {}", i % 7).repeat(40).into_bytes();
        p.submit_batch((0..20).map(|i| task(i, small(i))).collect());
        p.submit_batch((20..40).map(|i| task(i, small(i))).collect());
        // Three tasks of 20 MiB: more than the budget at once (had the batch's tasks taken
        // their bytes one by one before it was handed over, it would wait for its own bytes
        // forever). Afterwards the budget is free again.
        let big = |i: usize| vec![i as u8; 20 << 20];
        p.submit_batch((40..43).map(|i| task(i, big(i))).collect());
        let mut answered = std::collections::BTreeSet::new();
        for _ in 0..43 {
            let e = rx
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("every task is answered");
            let (id, _, _) = e.result.unwrap();
            let raw = if e.tag < 40 { small(e.tag) } else { big(e.tag) };
            assert_eq!(id.digest, Digest20::of(&zlib_compress(&raw, 6)));
            answered.insert(e.tag);
        }
        assert_eq!(answered.len(), 43);
        assert_eq!(cas.list().unwrap().len(), 7 + 3);
        assert_eq!(p.budget.used.lock().unwrap().bytes, 0);
    }

    /// The local store, with size lookups that panic (the raw-content index verifies what it
    /// finds with them) or batches that are counted, the first held until the gate opens.
    struct TestStore {
        local: LocalCas,
        size_panics: bool,
        batch_hint: usize,
        gate: Mutex<Option<crossbeam_channel::Receiver<()>>>,
        batches: Mutex<Vec<usize>>,
    }

    impl TestStore {
        fn new(local: LocalCas) -> TestStore {
            TestStore {
                local,
                size_panics: false,
                batch_hint: 1,
                gate: Mutex::new(None),
                batches: Mutex::new(Vec::new()),
            }
        }
    }

    impl Cas for TestStore {
        fn exists(&self, id: &ObjectId) -> Result<bool, CasError> {
            self.local.exists(id)
        }
        fn put_bytes(&self, id: &ObjectId, data: &[u8]) -> Result<PutOutcome, CasError> {
            self.local.put_bytes(id, data)
        }
        fn put_many(&self, items: &[(ObjectId, &[u8])]) -> Vec<Result<PutOutcome, CasError>> {
            self.batches.lock().unwrap().push(items.len());
            if let Some(gate) = self.gate.lock().unwrap().take() {
                let _ = gate.recv();
            }
            self.local.put_many(items)
        }
        fn batch_hint(&self) -> usize {
            self.batch_hint
        }
        fn begin(&self) -> Result<Box<dyn crate::cas::PendingObject>, CasError> {
            self.local.begin()
        }
        fn get(&self, id: &ObjectId) -> Result<Box<dyn std::io::Read + Send>, CasError> {
            self.local.get(id)
        }
        fn size(&self, id: &ObjectId) -> Result<u64, CasError> {
            assert!(!self.size_panics, "size lookup failed");
            self.local.size(id)
        }
        fn list(&self) -> Result<Vec<ObjectId>, CasError> {
            self.local.list()
        }
        fn put_root_file(&self, name: &str, data: &[u8]) -> Result<(), CasError> {
            self.local.put_root_file(name, data)
        }
        fn get_root_file(&self, name: &str) -> Result<Option<Vec<u8>>, CasError> {
            self.local.get_root_file(name)
        }
        fn describe(&self) -> String {
            self.local.describe()
        }
    }

    #[test]
    fn store_batches_take_what_is_queued_up_to_their_share_of_open_files() {
        // A quarter of the open-file limit, shared by the threads; never nothing.
        assert_eq!(batch_cap(1024, 4), 64);
        assert_eq!(batch_cap(524_288, 4), 32_768);
        assert_eq!(batch_cap(20_000, 64), 78);
        assert_eq!(batch_cap(3, 8), 1);
        // No limit (RLIM_INFINITY).
        assert!(batch_cap(u64::MAX, 2) > 1 << 30);

        let dir = tempfile::tempdir().unwrap();
        let (open, gate) = crossbeam_channel::bounded(1);
        let store = Arc::new(TestStore {
            batch_hint: 1024,
            gate: Mutex::new(Some(gate)),
            ..TestStore::new(LocalCas::create(dir.path()).unwrap())
        });
        let cas: Arc<dyn Cas> = store.clone();
        // One store thread, batches of at most 300 objects.
        let pool = StorePool::with_batch_cap(1, 64 << 20, 300);
        let p = Pipeline::with_store(2, &pool);
        let (tx, rx) = crossbeam_channel::unbounded();
        let content = |i: usize| format!("object {i}").into_bytes();
        for i in 0..1001 {
            p.submit(Task {
                tag: i,
                data: content(i).into(),
                suffix: Suffix::None,
                compression: Compression::Zlib(6),
                cas: cas.clone(),
                index: None,
                reply: tx.clone(),
            });
        }
        // The first batch (what was queued when the thread woke) is held; the rest queue
        // behind it.
        let start = std::time::Instant::now();
        let first = loop {
            let first = store.batches.lock().unwrap().first().copied();
            if let Some(n) = first.filter(|n| pool.tx.len() == 1001 - n) {
                break n;
            }
            assert!(
                start.elapsed().as_secs() < 60,
                "objects queued: {}",
                pool.tx.len()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!((1..=300).contains(&first), "{first}");
        open.send(()).unwrap();
        for _ in 0..1001 {
            let e = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("every object is stored");
            let (id, _, outcome) = e.result.unwrap();
            assert_eq!(outcome, PutOutcome::Stored);
            assert_eq!(id.digest, Digest20::of(&zlib_compress(&content(e.tag), 6)));
        }
        // Then whole batches of 300 while enough are queued.
        let mut want = vec![first];
        let mut left = 1001 - first;
        while left > 0 {
            want.push(left.min(300));
            left -= left.min(300);
        }
        assert_eq!(*store.batches.lock().unwrap(), want);
        assert_eq!(cas.list().unwrap().len(), 1001);
    }

    #[test]
    fn a_task_that_panics_is_answered_and_the_rest_of_its_batch_encoded() {
        let dir = tempfile::tempdir().unwrap();
        let cas: Arc<dyn Cas> = Arc::new(TestStore {
            size_panics: true,
            ..TestStore::new(LocalCas::create(&dir.path().join("cas")).unwrap())
        });
        let ix = Arc::new(RawIndex::open(&dir.path().join("raw.db")).unwrap());
        let known = vec![b'k'; 4096];
        let key = RawKey::of(&known, Compression::Zlib(6), Suffix::None);
        ix.record(&key, &ObjectId::new(Digest20([1; 20]), Suffix::None), 10);
        // One encoder: the whole batch is its.
        let store = StorePool::new(1, 64 << 20);
        let p = Pipeline::with_store(1, &store);
        let (tx, rx) = crossbeam_channel::unbounded();
        let task = |tag: usize, data: Vec<u8>, index: Option<Arc<RawIndex>>| Task {
            tag,
            data: data.into(),
            suffix: Suffix::None,
            compression: Compression::Zlib(6),
            cas: cas.clone(),
            index,
            reply: tx.clone(),
        };
        p.submit_batch(vec![
            task(0, known.clone(), Some(ix.clone())),
            task(1, vec![b'a'; 1000], None),
            task(2, vec![b'b'; 1000], None),
        ]);
        let mut got = std::collections::BTreeMap::new();
        for _ in 0..3 {
            let e = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("every task of the batch is answered");
            got.insert(e.tag, e.result);
        }
        assert!(matches!(&got[&0], Err(CasError::Io { op: "encode", .. })));
        for (tag, byte) in [(1, b'a'), (2, b'b')] {
            let (id, _, outcome) = got[&tag].as_ref().unwrap();
            assert_eq!(*outcome, PutOutcome::Stored);
            assert_eq!(id.digest, Digest20::of(&zlib_compress(&[byte; 1000], 6)));
        }
        // The encoder lives on.
        p.submit(task(3, vec![b'c'; 1000], None));
        assert!(rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap()
            .result
            .is_ok());
        assert_eq!(p.budget.used.lock().unwrap().bytes, 0);
    }

    /// Encodes `data` (zlib-6, under `ix`) through `p` into `cas` and waits for its answer.
    fn encode_one(
        p: &Pipeline,
        cas: &Arc<dyn Cas>,
        ix: &Arc<RawIndex>,
        data: Content,
    ) -> (ObjectId, u64, PutOutcome) {
        let (tx, rx) = crossbeam_channel::unbounded();
        p.submit(Task {
            tag: 0,
            data,
            suffix: Suffix::None,
            compression: Compression::Zlib(6),
            cas: cas.clone(),
            index: Some(ix.clone()),
            reply: tx,
        });
        rx.recv().unwrap().result.unwrap()
    }

    #[test]
    fn content_in_parts_is_the_object_of_its_bytes_and_found_again_in_other_parts() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::create(&dir.path().join("cas")).unwrap());
        let ix = Arc::new(RawIndex::open(&dir.path().join("raw.db")).unwrap());
        let store = StorePool::new(1, 64 << 20);
        let p = Pipeline::with_store(1, &store);
        let raw: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let whole = bytes::Bytes::from(raw.clone());
        let run = |content: Content| encode_one(&p, &cas, &ix, content);
        let three = Content::from_parts([
            whole.slice(..5),
            whole.slice(5..70_000),
            whole.slice(70_000..),
        ]);
        let (id, stored, first) = run(three);
        assert_eq!(first, PutOutcome::Stored);
        assert_eq!(id.digest, Digest20::of(&zlib_compress(&raw, 6)));
        let mut stored_bytes = Vec::new();
        cas.get(&id)
            .unwrap()
            .read_to_end(&mut stored_bytes)
            .unwrap();
        assert_eq!(stored_bytes, zlib_compress(&raw, 6));
        // The same bytes cut elsewhere are the same content: answered by the index.
        let two = Content::from_parts([whole.slice(..150_001), whole.slice(150_001..)]);
        assert_eq!(run(two), (id, stored, PutOutcome::AlreadyPresent));
        assert_eq!(
            store
                .stats()
                .stored
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn small_contents_are_answered_from_memory_and_never_written_to_the_index() {
        use crate::rawindex::MEMORY_ONLY_BELOW;
        let dir = tempfile::tempdir().unwrap();
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::create(&dir.path().join("cas")).unwrap());
        let path = dir.path().join("raw.db");
        let ix = Arc::new(RawIndex::open(&path).unwrap());
        let store = StorePool::new(2, 64 << 20);
        let p = Pipeline::with_store(2, &store);
        let small = b"x".repeat(MEMORY_ONLY_BELOW as usize - 1);
        let large = b"y".repeat(MEMORY_ONLY_BELOW as usize);
        let run = |data: &[u8]| encode_one(&p, &cas, &ix, data.to_vec().into());
        for data in [&small[..], &large[..]] {
            let (id, _, first) = run(data);
            assert_eq!(first, PutOutcome::Stored);
            assert_eq!(id.digest, Digest20::of(&zlib_compress(data, 6)));
            let stored = cas.size(&id).unwrap();
            assert_eq!(run(data), (id, stored, PutOutcome::AlreadyPresent));
        }
        use std::sync::atomic::Ordering::Relaxed;
        // Both repeats were answered by the index: the store saw neither.
        assert_eq!(store.stats().already_present.load(Relaxed), 0);
        assert_eq!(store.stats().stored.load(Relaxed), 2);
        // Only the large content's entry was written: a new index knows it alone.
        assert_eq!(ix.len(), 1);
        drop(p);
        drop(ix);
        let key = |d: &[u8]| RawKey::of(d, Compression::Zlib(6), Suffix::None);
        let reopened = RawIndex::open(&path).unwrap();
        assert!(reopened.lookup(&key(&small), cas.as_ref()).is_none());
        assert!(reopened.lookup(&key(&large), cas.as_ref()).is_some());
    }

    #[test]
    fn a_second_task_of_content_in_flight_waits_for_the_first_ones_object() {
        let inflight = Inflight::default();
        let key = (
            1usize,
            RawKey::of(b"same", Compression::Zlib(6), Suffix::None),
        );
        let other = (2usize, key.1);
        let (tx, rx) = crossbeam_channel::unbounded();
        assert!(inflight.claim(key, 0, &tx));
        assert!(!inflight.claim(key, 1, &tx));
        assert!(!inflight.claim(key, 2, &tx));
        // The same bytes bound for another store are encoded on their own.
        assert!(inflight.claim(other, 3, &tx));
        let id = ObjectId::new(Digest20::of(b"object"), Suffix::None);
        inflight.settle(&key, &Ok((id, 6, PutOutcome::Stored)));
        let mut tags = Vec::new();
        for _ in 0..2 {
            let e = rx.try_recv().unwrap();
            assert_eq!(e.result.unwrap(), (id, 6, PutOutcome::AlreadyPresent));
            tags.push(e.tag);
        }
        tags.sort();
        assert_eq!(tags, vec![1, 2]);
        assert!(rx.try_recv().is_err());
        // Settled: the next task of that content encodes again; a failure reaches waiters.
        assert!(inflight.claim(key, 4, &tx));
        assert!(!inflight.claim(key, 5, &tx));
        let failed: Result<(ObjectId, u64, PutOutcome), CasError> =
            Err(CasError::NotFound("x".into()));
        inflight.settle(&key, &failed);
        let e = rx.try_recv().unwrap();
        assert_eq!(e.tag, 5);
        assert!(e.result.unwrap_err().to_string().contains("not found"));
    }

    #[test]
    fn encodes_and_stores_in_parallel_with_the_same_names() {
        let dir = tempfile::tempdir().unwrap();
        let cas: Arc<dyn Cas> = Arc::new(LocalCas::create(dir.path()).unwrap().without_fsync());
        let p = Pipeline::new(2, 4, 1 << 20);
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..50usize {
            p.submit(Task {
                tag: i,
                data: vec![i as u8; 100_000 + i].into(),
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
