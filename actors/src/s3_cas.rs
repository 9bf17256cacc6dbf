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
//! uploaded in parts. Throttling and 5xx answers are retried with capped backoff by the client.
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
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use prepub_core::cas::{Cas, CasError, PendingObject, PutOutcome};
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
}

pub struct S3Cas {
    store: Arc<AmazonS3>,
    rt: tokio::runtime::Runtime,
    settings: S3Settings,
    known: Mutex<HashSet<ObjectId>>,
    /// Cleared when the store answers a conditional PUT with "not implemented".
    conditional: AtomicBool,
}

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
                retry_timeout: Duration::from_secs(180),
            });
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
        Ok(S3Cas {
            store: Arc::new(store),
            rt,
            settings,
            known: Mutex::new(HashSet::new()),
            conditional: AtomicBool::new(true),
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
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*id);
    }

    /// Runs a future on the store's runtime and waits for it on a plain channel.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = bounded(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        // The task always sends; a dropped runtime means the process is shutting down.
        rx.recv().unwrap_or_else(|_| unreachable_shutdown())
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

    fn upload(&self, key: Path, data: Vec<u8>) -> Result<(), CasError> {
        let store = self.store.clone();
        let threshold = self.settings.multipart_threshold;
        let shown = key.to_string();
        self.run(async move {
            if data.len() < threshold {
                store
                    .put(&key, PutPayload::from(data))
                    .await
                    .map(|_| ())
                    .map_err(|e| s3err("put", &shown, explain(&e)))
            } else {
                let upload = store
                    .put_multipart(&key)
                    .await
                    .map_err(|e| s3err("put", &shown, explain(&e)))?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, 16 << 20);
                w.write(&data);
                w.finish()
                    .await
                    .map(|_| ())
                    .map_err(|e| s3err("put", &shown, explain(&e)))
            }
        })
    }
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

/// A streamed put: bytes go to a local temporary file, then to S3 when the name is known.
struct S3Pending {
    file: tempfile::NamedTempFile,
    cas: Arc<S3Inner>,
}

/// Stores a finished pending object under its name.
type PutFn = Box<dyn Fn(&ObjectId, Vec<u8>) -> Result<PutOutcome, CasError> + Send + Sync>;

/// What a pending object needs of its store.
struct S3Inner {
    put: PutFn,
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
        let mut data = Vec::new();
        self.file.flush().map_err(|e| s3err("spill", "temp", e))?;
        let mut f = self.file.reopen().map_err(|e| s3err("spill", "temp", e))?;
        f.read_to_end(&mut data)
            .map_err(|e| s3err("spill", "temp", e))?;
        (self.cas.put)(id, data)
    }
}

impl Cas for S3Cas {
    fn exists(&self, id: &ObjectId) -> Result<bool, CasError> {
        if self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
        {
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

    fn put_bytes(&self, id: &ObjectId, data: &[u8]) -> Result<PutOutcome, CasError> {
        let known = || {
            self.known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(id)
        };
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
        // The pending object needs to call back into this store after the caller is done
        // writing; a fresh handle on the same client and settings does that.
        let store = self.store.clone();
        let settings = self.settings.clone();
        let handle = self.rt.handle().clone();
        let put = move |id: &ObjectId, data: Vec<u8>| -> Result<PutOutcome, CasError> {
            let key = if settings.prefix.is_empty() {
                Path::from(id.path())
            } else {
                Path::from(format!(
                    "{}/{}",
                    settings.prefix.trim_matches('/'),
                    id.path()
                ))
            };
            let store = store.clone();
            let shown = key.to_string();
            let threshold = settings.multipart_threshold;
            let (tx, rx) = bounded(1);
            handle.spawn(async move {
                let exists = store.head(&key).await.is_ok();
                let r = if exists {
                    Ok(PutOutcome::AlreadyPresent)
                } else if data.len() < threshold {
                    store
                        .put(&key, PutPayload::from(data))
                        .await
                        .map(|_| PutOutcome::Stored)
                        .map_err(|e| s3err("put", &shown, explain(&e)))
                } else {
                    match store.put_multipart(&key).await {
                        Ok(up) => {
                            let mut w = WriteMultipart::new_with_chunk_size(up, 16 << 20);
                            w.write(&data);
                            w.finish()
                                .await
                                .map(|_| PutOutcome::Stored)
                                .map_err(|e| s3err("put", &shown, explain(&e)))
                        }
                        Err(e) => Err(s3err("put", &shown, explain(&e))),
                    }
                };
                let _ = tx.send(r);
            });
            rx.recv().unwrap_or_else(|_| unreachable_shutdown())
        };
        Ok(Box::new(S3Pending {
            file: tempfile::NamedTempFile::new().map_err(|e| s3err("spill", "temp", e))?,
            cas: Arc::new(S3Inner { put: Box::new(put) }),
        }))
    }

    fn get(&self, id: &ObjectId) -> Result<Box<dyn Read + Send>, CasError> {
        let store = self.store.clone();
        let key = self.key(&id.path());
        let shown = key.to_string();
        let idt = id.to_string();
        let bytes = self.run(async move {
            match store.get(&key).await {
                Ok(r) => r
                    .bytes()
                    .await
                    .map_err(|e| s3err("get", &shown, explain(&e))),
                Err(e) if is_not_found(&e) => Err(CasError::NotFound(idt)),
                Err(e) => Err(s3err("get", &shown, explain(&e))),
            }
        })?;
        Ok(Box::new(io::Cursor::new(bytes)))
    }

    fn delete(&self, id: &ObjectId) -> Result<(), CasError> {
        let store = self.store.clone();
        let key = self.key(&id.path());
        let shown = key.to_string();
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
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
        let store = self.store.clone();
        let prefix = self.key("data");
        let strip = if self.settings.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.settings.prefix.trim_matches('/'))
        };
        let shown = prefix.to_string();
        let keys: Vec<String> = self.run(async move {
            let mut out = Vec::new();
            let mut s = store.list(Some(&prefix));
            while let Some(m) = s.next().await {
                out.push(
                    m.map_err(|e| s3err("list", &shown, explain(&e)))?
                        .location
                        .to_string(),
                );
            }
            Ok::<_, CasError>(out)
        })?;
        Ok(keys
            .iter()
            .filter_map(|k| ObjectId::from_path(k.strip_prefix(&strip).unwrap_or(k)))
            .collect())
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
        format!("s3://{}/{}", self.settings.bucket, self.settings.prefix)
    }
}
