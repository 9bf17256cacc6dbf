//! The S3 backend of the [`Cas`] trait, on `object_store` (aws, rustls).
//!
//! Layout matches a CVMFS S3 repository: `<prefix>/data/XX/<rest><suffix>` and root files at
//! `<prefix>/` (cvmfs-formats.md §1.3). An object below [`CONDITIONAL_PUT_MAX`] is stored with
//! one conditional PUT (`If-None-Match: *`: the store refuses it with 412 when the name exists,
//! and the existing object is kept), so a new small object costs one request instead of a HEAD
//! and a PUT; larger objects are checked with HEAD first, so bytes the store has are not sent
//! again. A store that does not implement conditional PUTs (501, or an error naming it) is
//! remembered and asked HEAD-then-PUT from then on. Objects seen are kept in an in-process set,
//! so a re-publish does not ask about them twice. Puts are
//! atomic in S3 (an object appears whole or not at all); objects above `multipart_threshold` are
//! uploaded in parts of [`PART_SIZE`], at most [`PARTS_IN_FLIGHT`] at once, and an object
//! written as a stream (a large unchunked file) is read back from its spill file a part at a
//! time, so memory stays at a few parts whatever the object's size; reads stream the body
//! too. Throttling and 5xx answers are retried with capped backoff by the client.
//! `object_store` is async: calls run on a small runtime owned by this struct, and the caller
//! waits on a plain channel, so it is safe from any thread (also from async ones that must not
//! start a nested runtime).

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::bounded;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};
use prepub_core::cas::{Cas, CasError, PendingObject, PutOutcome, StoredObject};
use prepub_core::hash::ObjectId;

/// Where the store is.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub region: String,
    /// Empty for AWS; e.g. `http://127.0.0.1:9000` for MinIO, Ceph, moto (path-style).
    pub endpoint: String,
    /// Key prefix, e.g. the repository name (no leading or trailing slash).
    pub prefix: String,
    /// Objects at least this large are uploaded in parts.
    pub multipart_threshold: usize,
    /// Longest a request may take, its body included (an 8 MiB part, a whole object up to
    /// `multipart_threshold`, or a large object read back while its reader consumes it). The
    /// only time limit on a request besides the 5 s to connect: the HTTP client's per-read
    /// timeout runs from sending the request to its answer's head, so it would bound an
    /// upload's whole body as well.
    pub request_timeout: Duration,
}

/// Default [`S3Settings::request_timeout`]. The client library's own default (30 s for the
/// whole request) cut off any transfer slower than about 2 MiB/s for a 64 MiB object.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

pub struct S3Cas {
    /// Owns the threads the client's requests run on.
    _rt: tokio::runtime::Runtime,
    client: Client,
}

/// The store's client, shared with the objects being written ([`S3Pending`]).
#[derive(Clone)]
pub struct Client {
    store: Arc<AmazonS3>,
    handle: tokio::runtime::Handle,
    settings: Arc<S3Settings>,
    known: Arc<Mutex<Seen>>,
    /// Cleared when the store answers a conditional PUT with "not implemented".
    conditional: Arc<AtomicBool>,
}

impl std::ops::Deref for S3Cas {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Objects known to be in the store, in two generations of at most `max` each: when the newer
/// one fills up, the older is dropped. Memory stays bounded however many objects a long-lived
/// daemon stores; an object forgotten is only asked about again.
pub struct Seen {
    new: HashSet<ObjectId>,
    old: HashSet<ObjectId>,
    max: usize,
}

/// Objects per generation of [`Seen`] (about 44 bytes each in the set: both generations full
/// take about 46 MB).
pub const SEEN_MAX: usize = 1 << 19;

impl Seen {
    pub fn new(max: usize) -> Seen {
        Seen {
            new: HashSet::new(),
            old: HashSet::new(),
            max: max.max(1),
        }
    }
    /// Whether `id` is known; one known from the older generation moves to the newer, so
    /// objects asked about often are not forgotten.
    pub fn contains(&mut self, id: &ObjectId) -> bool {
        if self.new.contains(id) {
            return true;
        }
        if self.old.remove(id) {
            self.insert(*id);
            return true;
        }
        false
    }
    pub fn insert(&mut self, id: ObjectId) {
        if self.new.len() >= self.max && !self.new.contains(&id) {
            self.old = std::mem::take(&mut self.new);
        }
        self.new.insert(id);
    }
    pub fn remove(&mut self, id: &ObjectId) {
        self.new.remove(id);
        self.old.remove(id);
    }
    pub fn len(&self) -> usize {
        self.new.len() + self.old.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes per part of a multipart upload, and how many parts are on their way at once: an
/// upload holds about `PARTS_IN_FLIGHT + 1` parts in memory, whatever the object's size.
pub const PART_SIZE: usize = 8 << 20;
pub const PARTS_IN_FLIGHT: usize = 4;

/// Objects smaller than this are put with `If-None-Match: *` and no HEAD before (sending such
/// an object again costs about what a HEAD does); larger ones are HEADed first.
pub const CONDITIONAL_PUT_MAX: usize = 1 << 20;

/// What a conditional PUT found.
enum Conditional {
    Stored,
    /// 412: the name exists (or, with 409, another write of it is under way): ask with HEAD.
    Exists,
    /// The store does not do conditional PUTs.
    Unsupported,
    /// Anything else (a transport error: a conditional PUT is not retried like a plain one).
    Failed,
}

fn s3err(op: &'static str, path: &str, e: impl std::fmt::Display) -> CasError {
    CasError::Io {
        op,
        path: path.to_string(),
        source: io::Error::other(e.to_string()),
    }
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3Cas {
    /// Builds the client; credentials come from the standard AWS chain (environment, profile,
    /// instance role).
    pub fn new(settings: S3Settings) -> Result<S3Cas, CasError> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(10),
                    base: 2.0,
                },
                max_retries: 6,
                // Counted from a request's first attempt: a request that used all of its
                // `request_timeout` is still retried.
                retry_timeout: settings.request_timeout + Duration::from_secs(180),
            })
            .with_client_options(ClientOptions::new().with_timeout(settings.request_timeout));
        if !settings.endpoint.is_empty() {
            b = b
                .with_endpoint(&settings.endpoint)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(settings.endpoint.starts_with("http://"));
        }
        let store = b
            .build()
            .map_err(|e| s3err("configure", &settings.bucket, e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-cas")
            .enable_all()
            .build()
            .map_err(|e| s3err("runtime", &settings.bucket, e))?;
        let client = Client {
            store: Arc::new(store),
            handle: rt.handle().clone(),
            settings: Arc::new(settings),
            known: Arc::new(Mutex::new(Seen::new(SEEN_MAX))),
            conditional: Arc::new(AtomicBool::new(true)),
        };
        Ok(S3Cas { _rt: rt, client })
    }
}

impl Client {
    /// The objects under `data/`, with the size and time the listing gives for each.
    fn list_data(&self) -> Result<Vec<StoredObject>, CasError> {
        let store = self.store.clone();
        let prefix = self.key("data");
        let strip = if self.settings.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.settings.prefix.trim_matches('/'))
        };
        let shown = prefix.to_string();
        self.run(async move {
            let mut out = Vec::new();
            let mut s = store.list(Some(&prefix));
            while let Some(m) = s.next().await {
                let m = m.map_err(|e| s3err("list", &shown, explain(&e)))?;
                let k = m.location.as_ref();
                if let Some(id) = ObjectId::from_path(k.strip_prefix(&strip).unwrap_or(k)) {
                    out.push(StoredObject {
                        id,
                        size: m.size,
                        modified: m.last_modified.timestamp(),
                    });
                }
            }
            Ok::<_, CasError>(out)
        })
    }

    /// One `If-None-Match: *` PUT of a small object.
    fn put_if_absent(&self, key: Path, data: Vec<u8>) -> Conditional {
        let store = self.store.clone();
        self.run(async move {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match store.put_opts(&key, PutPayload::from(data), opts).await {
                Ok(_) => Conditional::Stored,
                Err(object_store::Error::AlreadyExists { .. }) => Conditional::Exists,
                Err(object_store::Error::NotImplemented { .. }) => Conditional::Unsupported,
                Err(e) => {
                    // The status line or the S3 error code: not any "501" (object keys are hex,
                    // and one that holds it must not switch conditional puts off).
                    let s = e.to_string();
                    if s.contains("501 Not Implemented") || s.contains("NotImplemented") {
                        Conditional::Unsupported
                    } else {
                        Conditional::Failed
                    }
                }
            }
        })
    }

    fn remember(&self, id: &ObjectId) {
        self.seen().insert(*id);
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a future on the store's runtime and waits for it on a plain channel.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        run_on(&self.handle, fut)
    }

    /// The object's metadata (a HEAD); `NotFound` when absent.
    fn head(&self, id: &ObjectId) -> Result<object_store::ObjectMeta, CasError> {
        let store = self.store.clone();
        let key = self.key(&id.path());
        let shown = key.to_string();
        let idt = id.to_string();
        self.run(async move {
            match store.head(&key).await {
                Ok(m) => Ok(m),
                Err(e) if is_not_found(&e) => Err(CasError::NotFound(idt)),
                Err(e) => Err(s3err("head", &shown, explain(&e))),
            }
        })
    }

    fn key(&self, rel: &str) -> Path {
        if self.settings.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.settings.prefix.trim_matches('/')))
        }
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.settings.bucket, self.settings.prefix)
    }

    /// Start-up and health check: the bucket exists and the credentials work (a one-key listing,
    /// which a missing bucket or refused credentials fail, unlike a HEAD of a missing key).
    pub fn probe(&self) -> Result<(), CasError> {
        let store = self.store.clone();
        let prefix = self.key("data");
        let desc = self.describe();
        self.run(async move {
            let mut s = store.list(Some(&prefix));
            match s.next().await {
                None | Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(s3err("probe", &desc, explain(&e))),
            }
        })
    }

    /// Whether an object of `len` bytes is uploaded in parts (an empty one never is: S3
    /// refuses a multipart upload without parts).
    fn in_parts(&self, len: u64) -> bool {
        len > 0 && len >= self.settings.multipart_threshold as u64
    }

    fn upload(&self, key: Path, data: Vec<u8>) -> Result<(), CasError> {
        let len = data.len() as u64;
        if self.in_parts(len) {
            return self.upload_parts(key, &mut &data[..], len);
        }
        let store = self.store.clone();
        let shown = key.to_string();
        self.run(async move {
            store
                .put(&key, PutPayload::from(data))
                .await
                .map(|_| ())
                .map_err(|e| s3err("put", &shown, explain(&e)))
        })
    }

    /// A multipart upload of the `len` bytes `src` yields (see [`send_parts`]).
    fn upload_parts(&self, key: Path, src: &mut dyn Read, len: u64) -> Result<(), CasError> {
        let store = self.store.clone();
        let k = key.clone();
        let shown = key.to_string();
        let upload = self
            .run(async move { store.put_multipart(&k).await })
            .map_err(|e| s3err("put", &shown, explain(&e)))?;
        send_parts(&self.handle, upload, src, part_size(len)).map_err(|e| s3err("put", &shown, e))
    }

    /// Stores the `len` bytes of `file` (read from its start) as `id`, unless the store has it.
    fn put_file(
        &self,
        id: &ObjectId,
        file: &mut std::fs::File,
        len: u64,
    ) -> Result<PutOutcome, CasError> {
        if self.exists(id)? {
            return Ok(PutOutcome::AlreadyPresent);
        }
        let key = self.key(&id.path());
        if self.in_parts(len) {
            self.upload_parts(key, file, len)?;
        } else {
            let mut data = Vec::with_capacity(len as usize);
            file.read_to_end(&mut data)
                .map_err(|e| s3err("spill", "temp", e))?;
            self.upload(key, data)?;
        }
        self.remember(id);
        Ok(PutOutcome::Stored)
    }

    /// Whether the store has `id` (the set of objects seen first, then a HEAD).
    fn exists(&self, id: &ObjectId) -> Result<bool, CasError> {
        if self.seen().contains(id) {
            return Ok(true);
        }
        let store = self.store.clone();
        let key = self.key(&id.path());
        let shown = key.to_string();
        let found = self.run(async move {
            match store.head(&key).await {
                Ok(_) => Ok(true),
                Err(e) if is_not_found(&e) => Ok(false),
                Err(e) => Err(s3err("head", &shown, explain(&e))),
            }
        })?;
        if found {
            self.remember(id);
        }
        Ok(found)
    }
}

/// Runs a future on `handle` and waits for it on a plain channel.
fn run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    // The task always sends; a dropped runtime means the process is shutting down.
    try_run_on(handle, fut).unwrap_or_else(unreachable_shutdown)
}

/// [`run_on`], or `None` when the runtime is gone (its store was dropped).
fn try_run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = bounded(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().ok()
}

/// The part size for an object of `len` bytes: [`PART_SIZE`], or more for an object that
/// would need more than the 10,000 parts S3 allows.
fn part_size(len: u64) -> usize {
    (PART_SIZE as u64).max(len.div_ceil(10_000)) as usize
}

/// Reads until `buf` is full or the input ends; how much it read.
fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Sends what `src` yields as the parts of `upload`, `part` bytes each, and completes it. The
/// input is read on the calling thread a part at a time, and a part read is handed over only
/// once fewer than [`PARTS_IN_FLIGHT`] are on their way: an object of any size costs about
/// `PARTS_IN_FLIGHT + 1` parts of memory. On failure the upload is aborted, so the store
/// drops the parts it holds.
fn send_parts(
    handle: &tokio::runtime::Handle,
    upload: Box<dyn object_store::MultipartUpload>,
    src: &mut dyn Read,
    part_len: usize,
) -> Result<(), String> {
    let mut w = WriteMultipart::new_with_chunk_size(upload, part_len);
    loop {
        let mut part = vec![0u8; part_len];
        let n = match read_full(src, &mut part) {
            Ok(n) => n,
            Err(e) => {
                let _ = run_on(handle, w.abort());
                return Err(format!("reading the object: {e}"));
            }
        };
        if n == 0 {
            break;
        }
        part.truncate(n);
        let (back, r) = run_on(handle, async move {
            let r = w.wait_for_capacity(PARTS_IN_FLIGHT).await;
            if r.is_ok() {
                // Spawns the part's upload once the part is full (on this runtime).
                w.put(bytes::Bytes::from(part));
            }
            (w, r)
        });
        w = back;
        if let Err(e) = r {
            let _ = run_on(handle, w.abort());
            return Err(explain(&e));
        }
        if n < part_len {
            break;
        }
    }
    run_on(handle, w.finish())
        .map(|_| ())
        .map_err(|e| explain(&e))
}

fn unreachable_shutdown<T>() -> T {
    // Only reachable while the process exits; blocking the thread is the least harmful answer.
    loop {
        std::thread::park();
    }
}

/// Turns common S3 failures into messages that name the cause.
fn explain(e: &object_store::Error) -> String {
    let s = e.to_string();
    for code in [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
    ] {
        if s.contains(code) {
            return format!("the credentials were refused ({code})");
        }
    }
    if s.contains("NoSuchBucket") {
        "the bucket does not exist (NoSuchBucket)".into()
    } else if s.contains("403 Forbidden") {
        "the credentials were refused (HTTP 403)".into()
    } else {
        // The first line is enough; object_store errors can carry whole XML documents.
        s.lines().next().unwrap_or("").chars().take(300).collect()
    }
}

/// A streamed put: bytes go to a local temporary file, then to S3 when the name is known,
/// read back a part at a time (see [`send_parts`]).
struct S3Pending {
    file: tempfile::NamedTempFile,
    client: Client,
}

impl Write for S3Pending {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl PendingObject for S3Pending {
    fn commit(mut self: Box<Self>, id: &ObjectId) -> Result<PutOutcome, CasError> {
        self.file.flush().map_err(|e| s3err("spill", "temp", e))?;
        let mut f = self.file.reopen().map_err(|e| s3err("spill", "temp", e))?;
        let len = f.metadata().map_err(|e| s3err("spill", "temp", e))?.len();
        self.client.put_file(id, &mut f, len)
    }
}

/// An object's body read as the store sends it, about [`READ_AHEAD`] bytes at a time, so a
/// large object is never held whole.
struct S3Reader {
    handle: tokio::runtime::Handle,
    /// `None` once the body has ended.
    body: Option<futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>>,
    ready: std::collections::VecDeque<bytes::Bytes>,
    shown: String,
    /// Why the body broke off: reported once what arrived before is read.
    failed: Option<String>,
}

/// How much of a body one trip to the runtime collects.
const READ_AHEAD: usize = 1 << 20;

impl Read for S3Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.ready.is_empty() {
            if let Some(m) = &self.failed {
                return Err(io::Error::other(m.clone()));
            }
            let Some(mut body) = self.body.take() else {
                return Ok(0);
            };
            let Some((body, got, end)) = try_run_on(&self.handle, async move {
                let mut got = Vec::new();
                let mut n = 0;
                loop {
                    match body.next().await {
                        None => return (body, got, Ok(true)),
                        Some(Err(e)) => return (body, got, Err(e)),
                        Some(Ok(b)) => {
                            n += b.len();
                            got.push(b);
                            if n >= READ_AHEAD {
                                return (body, got, Ok(false));
                            }
                        }
                    }
                }
            }) else {
                return Err(io::Error::other(format!(
                    "get {}: the store was closed",
                    self.shown
                )));
            };
            self.ready.extend(got.into_iter().filter(|b| !b.is_empty()));
            match end {
                Ok(false) => self.body = Some(body),
                Ok(true) => {}
                Err(e) => self.failed = Some(format!("get {}: {}", self.shown, explain(&e))),
            }
        }
        let chunk = self.ready.front_mut().expect("not empty");
        let n = buf.len().min(chunk.len());
        buf[..n].copy_from_slice(&chunk.split_to(n));
        if chunk.is_empty() {
            self.ready.pop_front();
        }
        Ok(n)
    }
}

impl Cas for S3Cas {
    fn exists(&self, id: &ObjectId) -> Result<bool, CasError> {
        self.client.exists(id)
    }

    fn put_bytes(&self, id: &ObjectId, data: &[u8]) -> Result<PutOutcome, CasError> {
        let known = || self.seen().contains(id);
        if data.len() < CONDITIONAL_PUT_MAX && self.conditional.load(Ordering::Relaxed) && !known()
        {
            match self.put_if_absent(self.key(&id.path()), data.to_vec()) {
                Conditional::Stored => {
                    self.remember(id);
                    return Ok(PutOutcome::Stored);
                }
                Conditional::Unsupported => self.conditional.store(false, Ordering::Relaxed),
                // Told apart below: HEAD says whether it is there, and a plain (retried) PUT
                // stores it if not.
                Conditional::Exists | Conditional::Failed => {}
            }
        }
        if self.exists(id)? {
            return Ok(PutOutcome::AlreadyPresent);
        }
        self.upload(self.key(&id.path()), data.to_vec())?;
        self.remember(id);
        Ok(PutOutcome::Stored)
    }

    fn begin(&self) -> Result<Box<dyn PendingObject>, CasError> {
        Ok(Box::new(S3Pending {
            file: tempfile::NamedTempFile::new().map_err(|e| s3err("spill", "temp", e))?,
            client: self.client.clone(),
        }))
    }

    fn get(&self, id: &ObjectId) -> Result<Box<dyn Read + Send>, CasError> {
        let store = self.store.clone();
        let key = self.key(&id.path());
        let shown = key.to_string();
        let idt = id.to_string();
        let shown2 = shown.clone();
        let body = self.run(async move {
            match store.get(&key).await {
                Ok(r) => Ok(r.into_stream()),
                Err(e) if is_not_found(&e) => Err(CasError::NotFound(idt)),
                Err(e) => Err(s3err("get", &shown2, explain(&e))),
            }
        })?;
        Ok(Box::new(S3Reader {
            handle: self.handle.clone(),
            body: Some(body),
            ready: std::collections::VecDeque::new(),
            shown,
            failed: None,
        }))
    }

    fn delete(&self, id: &ObjectId) -> Result<(), CasError> {
        let store = self.store.clone();
        let key = self.key(&id.path());
        let shown = key.to_string();
        self.seen().remove(id);
        self.run(async move {
            match store.delete(&key).await {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(s3err("delete", &shown, explain(&e))),
            }
        })
    }

    fn modified(&self, id: &ObjectId) -> Result<i64, CasError> {
        Ok(self.head(id)?.last_modified.timestamp())
    }

    fn size(&self, id: &ObjectId) -> Result<u64, CasError> {
        Ok(self.head(id)?.size)
    }

    fn list(&self) -> Result<Vec<ObjectId>, CasError> {
        Ok(self.list_data()?.into_iter().map(|o| o.id).collect())
    }

    fn list_stat(&self) -> Result<Option<Vec<StoredObject>>, CasError> {
        self.list_data().map(Some)
    }

    fn put_root_file(&self, name: &str, data: &[u8]) -> Result<(), CasError> {
        if name.is_empty() || name.contains('/') {
            return Err(CasError::BadName(name.to_string()));
        }
        // A single PUT replaces the object atomically.
        self.upload(self.key(name), data.to_vec())
    }

    fn get_root_file(&self, name: &str) -> Result<Option<Vec<u8>>, CasError> {
        if name.is_empty() || name.contains('/') {
            return Err(CasError::BadName(name.to_string()));
        }
        let store = self.store.clone();
        let key = self.key(name);
        let shown = key.to_string();
        self.run(async move {
            match store.get(&key).await {
                Ok(r) => r
                    .bytes()
                    .await
                    .map(|b| Some(b.to_vec()))
                    .map_err(|e| s3err("get", &shown, explain(&e))),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(s3err("get", &shown, explain(&e))),
            }
        })
    }

    fn describe(&self) -> String {
        self.client.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::{MultipartUpload, PutResult, UploadPart};
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;

    /// What a [`SlowUpload`] received: each part by its place, and the bytes it has finished.
    #[derive(Debug, Default)]
    struct Received {
        parts: Mutex<Vec<(usize, Vec<u8>)>>,
        next: AtomicUsize,
        sent: AtomicUsize,
        aborted: AtomicBool,
    }

    /// A store's multipart upload that takes a while for every part.
    #[derive(Debug)]
    struct SlowUpload(Arc<Received>);

    type Boxed<'a, T> = Pin<Box<dyn Future<Output = object_store::Result<T>> + Send + 'a>>;

    impl MultipartUpload for SlowUpload {
        fn put_part(&mut self, data: PutPayload) -> UploadPart {
            let r = self.0.clone();
            let at = r.next.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(15)).await;
                let bytes: Vec<u8> = data.iter().flat_map(|b| b.iter().copied()).collect();
                r.sent.fetch_add(bytes.len(), Ordering::SeqCst);
                r.parts.lock().unwrap().push((at, bytes));
                Ok(())
            })
        }
        fn complete<'a, 'b>(&'a mut self) -> Boxed<'b, PutResult>
        where
            'a: 'b,
            Self: 'b,
        {
            Box::pin(async {
                Ok(PutResult {
                    e_tag: None,
                    version: None,
                    extensions: object_store::Extensions::default(),
                })
            })
        }
        fn abort<'a, 'b>(&'a mut self) -> Boxed<'b, ()>
        where
            'a: 'b,
            Self: 'b,
        {
            self.0.aborted.store(true, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
    }

    /// `len` bytes of a pattern, recording how far its reading ran ahead of the bytes the
    /// upload had finished; fails with an error at `fail_at` if given.
    struct Source {
        len: usize,
        pos: usize,
        received: Arc<Received>,
        most_ahead: usize,
        fail_at: Option<usize>,
    }

    fn pattern(i: usize) -> u8 {
        (i * 31 % 251) as u8
    }

    impl Read for Source {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if Some(self.pos) == self.fail_at {
                return Err(io::Error::other("disk gone"));
            }
            let end = self.len.min(self.pos + buf.len().min(1 << 20));
            let end = self.fail_at.map_or(end, |f| end.min(f));
            for (b, i) in buf.iter_mut().zip(self.pos..end) {
                *b = pattern(i);
            }
            let n = end - self.pos;
            self.pos = end;
            let ahead = self.pos - self.received.sent.load(Ordering::SeqCst);
            self.most_ahead = self.most_ahead.max(ahead);
            Ok(n)
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_large_object_is_read_a_few_parts_ahead_of_its_upload() {
        let rt = runtime();
        let received = Arc::new(Received::default());
        let part = 64 << 10;
        let len = 12 * part + 123;
        let mut src = Source {
            len,
            pos: 0,
            received: received.clone(),
            most_ahead: 0,
            fail_at: None,
        };
        send_parts(
            rt.handle(),
            Box::new(SlowUpload(received.clone())),
            &mut src,
            part,
        )
        .unwrap();
        // Reading an object whole before sending it would be `len` ahead.
        assert!(
            src.most_ahead <= (PARTS_IN_FLIGHT + 1) * part,
            "read {} bytes ahead of the upload",
            src.most_ahead
        );
        let mut parts = std::mem::take(&mut *received.parts.lock().unwrap());
        assert_eq!(parts.len(), 13);
        parts.sort_by_key(|p| p.0);
        let all: Vec<u8> = parts.into_iter().flat_map(|p| p.1).collect();
        assert_eq!(all.len(), len);
        assert!(all.iter().enumerate().all(|(i, b)| *b == pattern(i)));
        assert!(!received.aborted.load(Ordering::SeqCst));
    }

    #[test]
    fn a_read_error_aborts_the_upload() {
        let rt = runtime();
        let received = Arc::new(Received::default());
        let mut src = Source {
            len: 4 << 20,
            pos: 0,
            received: received.clone(),
            most_ahead: 0,
            fail_at: Some((2 << 20) + 5),
        };
        let e = send_parts(
            rt.handle(),
            Box::new(SlowUpload(received.clone())),
            &mut src,
            64 << 10,
        )
        .unwrap_err();
        assert!(e.contains("disk gone"), "{e}");
        assert!(received.aborted.load(Ordering::SeqCst));
    }

    fn reader(
        rt: &tokio::runtime::Runtime,
        body: Vec<object_store::Result<bytes::Bytes>>,
    ) -> S3Reader {
        S3Reader {
            handle: rt.handle().clone(),
            body: Some(futures_util::stream::iter(body).boxed()),
            ready: Default::default(),
            shown: "cvmfs/data/ab/cd".into(),
            failed: None,
        }
    }

    #[test]
    fn a_body_is_read_in_pieces_and_a_broken_one_is_an_error_not_an_end() {
        let rt = runtime();
        let pieces: Vec<bytes::Bytes> = (0..40)
            .map(|i| bytes::Bytes::from(vec![i as u8; 100_000 + i]))
            .collect();
        let whole: Vec<u8> = pieces.iter().flat_map(|b| b.iter().copied()).collect();
        let mut r = reader(&rt, pieces.iter().cloned().map(Ok).collect());
        let mut got = Vec::new();
        let mut buf = [0u8; 7777];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, whole);
        // The bytes before the failure, then the failure (again on every read).
        let broken = vec![
            Ok(pieces[0].clone()),
            Err(object_store::Error::Generic {
                store: "S3",
                source: "connection reset".into(),
            }),
            Ok(pieces[1].clone()),
        ];
        let mut r = reader(&rt, broken);
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).unwrap_err();
        assert_eq!(got, pieces[0]);
        assert!(e.to_string().contains("connection reset"), "{e}");
        assert!(r.read(&mut buf).is_err());
    }

    fn id(n: u32) -> ObjectId {
        let mut d = [0u8; 20];
        d[..4].copy_from_slice(&n.to_be_bytes());
        ObjectId::new(
            prepub_core::hash::Digest20(d),
            prepub_core::hash::Suffix::None,
        )
    }

    #[test]
    fn the_set_of_objects_seen_stays_within_two_generations() {
        let mut s = Seen::new(1000);
        for n in 0..10_000 {
            s.insert(id(n));
            assert!(s.len() <= 2000);
        }
        // The newest generation and the one before are remembered, older ones not.
        assert!(!s.contains(&id(7_999)) && !s.contains(&id(0)));
        assert!(s.contains(&id(9_999)));
        // One asked about from the older generation moves to the newer (which was full: the
        // generations turn), so it outlives its generation.
        assert!(s.contains(&id(8_000)));
        for n in 10_000..10_999 {
            s.insert(id(n));
        }
        s.insert(id(20_000));
        assert!(s.contains(&id(8_000)));
        assert!(!s.contains(&id(9_999)));
        // Removed: gone.
        s.remove(&id(10_500));
        assert!(!s.contains(&id(10_500)));
    }

    #[test]
    fn parts_grow_for_objects_s3_would_need_more_than_10000_parts_for() {
        assert_eq!(part_size(0), PART_SIZE);
        assert_eq!(part_size(10_000 * PART_SIZE as u64), PART_SIZE);
        let huge = 200u64 << 30;
        assert!(part_size(huge) > PART_SIZE);
        assert!(part_size(huge) as u64 * 10_000 >= huge);
    }
}
