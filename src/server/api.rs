//! The REST API handlers. They authenticate, validate, stream uploads to the spool, and send
//! messages to the job manager — nothing else. Errors are JSON `{"error":{"code","message"}}`
//! with a stable kebab-case code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use prepub_actors::job_manager::{
    AbortError, AbortJob, AwaitUploadRun, CountJobs, GetJob, JobManager, ListJobs, ProcessUpload,
    SubmitJob, UploadAbandoned,
};
use prepub_actors::metrics::Metrics;
use prepub_core::directio::{DirectAppender, DirectReader, Gatherer};
use prepub_core::growing::{FinishGuard, Growing};
use prepub_core::jobs::{now_ms, valid_client_tag, JobRecord, JobState};
use sha2::{Digest, Sha256};

use super::auth::{Principal, Tokens};
use crate::api_types::{Check, ErrorBody, ErrorDetail, Health, JobList, JobView, Submitted};
use crate::config::Config;

/// Shared state of the HTTP workers.
pub struct AppState {
    pub cfg: Arc<Config>,
    pub tokens: Tokens,
    pub jobs: Addr<JobManager>,
    /// Changes whenever the job manager saves a record (job event streams wait on it).
    pub job_changes: tokio::sync::watch::Receiver<u64>,
    pub cas_writer: Addr<prepub_actors::cas_writer::CasWriter>,
    /// Local mode: repositories whose `cvmfs_server` publish is running.
    pub busy: prepub_actors::local_publisher::Busy,
    /// `cas.type: s3`: the store of each repository.
    pub s3: std::collections::HashMap<String, Arc<prepub_actors::s3_cas::S3Cas>>,
    pub metrics: Metrics,
    pub incoming: PathBuf,
    /// Shared with the job manager: set while draining.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    pub access: Addr<prepub_actors::access_tracker::AccessTracker>,
    /// Garbage-collection runs in progress (run id and abort flag per repository), and the
    /// next scheduled time per repository.
    pub gc_active: Arc<super::gc::ActiveRuns>,
    pub gc_next: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
    pub started: std::time::Instant,
    /// Recent results of the health checks that ask other servers.
    pub remote_checks: Arc<RemoteChecks>,
}

/// How long the result of a health check that asks other servers (an S3 store, the Stratum 0
/// and the gateway) is reused. Health needs no token: a burst of checks must not become a
/// burst of requests to those servers.
pub const REMOTE_CHECK_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// The last result of each remote health check and when it was taken. One check per
/// repository runs at a time; checks asked for meanwhile get the last result (they do not
/// wait: a slow server must not hold a blocking thread per health request).
#[derive(Default)]
pub struct RemoteChecks(std::sync::Mutex<std::collections::HashMap<String, Arc<RemoteSlot>>>);

#[derive(Default)]
struct RemoteSlotState {
    last: Option<(std::time::Instant, Result<String, String>)>,
    running: bool,
}

type RemoteSlot = std::sync::Mutex<RemoteSlotState>;

/// Clears a slot's `running` mark however its check ends (a panic included).
struct Running<'a>(&'a RemoteSlot);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).running = false;
    }
}

impl RemoteChecks {
    /// The result of `check` for `key`, taken at most [`REMOTE_CHECK_TTL`] ago.
    fn get(
        &self,
        key: &str,
        check: impl FnOnce() -> Result<String, String>,
    ) -> Result<String, String> {
        let slot = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        {
            let mut st = slot.lock().unwrap_or_else(|e| e.into_inner());
            match &st.last {
                Some((at, r)) if st.running || at.elapsed() < REMOTE_CHECK_TTL => return r.clone(),
                None if st.running => {
                    return Err("the first check of this repository is still running".into())
                }
                _ => st.running = true,
            }
        }
        let running = Running(&slot);
        let r = check();
        slot.lock().unwrap_or_else(|e| e.into_inner()).last =
            Some((std::time::Instant::now(), r.clone()));
        drop(running);
        r
    }
}

/// API errors and their statuses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{1}")]
    BadRequest(&'static str, String),
    #[error("upload exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("the upload stalled: no data for {0} s (server.upload_idle_timeout)")]
    Stalled(u64),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("the service is draining for maintenance: new jobs are refused until it is resumed (prepubctl resume) or restarted; jobs already accepted go on")]
    Draining,
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::BadRequest(c, _) => c,
            ApiError::TooLarge(_) => "payload-too-large",
            ApiError::Stalled(_) => "upload-stalled",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Draining => "draining",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(..) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) | ApiError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            r.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        if matches!(self, ApiError::Draining) {
            r.insert_header((header::RETRY_AFTER, "60"));
        }
        r.json(ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
            },
        })
    }
}

pub(crate) fn bad(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(code, msg.into())
}

pub(crate) fn auth(req: &HttpRequest, st: &AppState) -> Result<Principal, ApiError> {
    let h = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    st.tokens.authenticate(h).ok_or(ApiError::Unauthorized)
}

/// Deletes an unaccepted upload when the request ends early: on a blocking thread when there
/// is a runtime (unlinking a large file is filesystem work — freeing its extents — that would
/// hold an async worker). One the process stops before is cleared from `incoming/` at start-up.
struct UploadGuard(Option<PathBuf>);
impl Drop for UploadGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || {
                        let _ = std::fs::remove_file(p);
                    });
                }
                Err(_) => {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

#[derive(Default, Debug)]
pub(crate) struct Fields {
    pub(crate) repo: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) tag_name: Option<String>,
    pub(crate) tag_description: Option<String>,
    pub(crate) tar_sha256: Option<String>,
}

/// Checks the submission fields; returns (repo, catalog path).
fn validate(f: &Fields, st: &AppState, who: &Principal) -> Result<(String, String), ApiError> {
    let repo = f.repo.clone().filter(|r| !r.is_empty()).ok_or_else(|| {
        bad(
            "missing-repo",
            "field 'repo' (or header X-Cvmfs-Repo) is required",
        )
    })?;
    if !st.cfg.repos.contains_key(&repo) {
        return Err(bad(
            "unknown-repository",
            format!("repository '{repo}' is not served by this publisher"),
        ));
    }
    let raw_path = f.path.clone().ok_or_else(|| {
        bad(
            "missing-path",
            "field 'path' (or header X-Cvmfs-Path) is required",
        )
    })?;
    let path = prepub_core::repo::normalize_repo_path(&raw_path)
        .map_err(|e| bad("bad-path", e.to_string()))?;
    if let Some(t) = &f.tag_name {
        if !valid_client_tag(t) || t == "trunk" || t == "trunk-previous" {
            return Err(bad("bad-tag", format!("tag name '{t}' must match ^[A-Za-z0-9._-]+$, be at most 255 characters and not be trunk or trunk-previous")));
        }
        // `prepub-<job id>` names a job's own revision: a restarted commit recognises its
        // publish by it, and automatic tags expire. A client's tag of that form could make
        // another job take itself for published, or vanish with the automatic ones.
        if prepub_core::gc::is_auto_tag(t) {
            return Err(bad(
                "bad-tag",
                format!("tag name '{t}' is reserved: prepub-<job id> marks the revisions this publisher makes"),
            ));
        }
    }
    if let Some(d) = &f.tag_description {
        if d.len() > 4096 || d.contains('\0') {
            return Err(bad(
                "bad-tag",
                "tag description must be at most 4096 bytes without NUL",
            ));
        }
    }
    if let Some(s) = &f.tar_sha256 {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("bad-checksum", "tar_sha256 must be 64 hex characters"));
        }
    }
    if !who.may_publish(&repo, &path) {
        return Err(ApiError::Forbidden(format!(
            "this token may not publish to {repo}{path}"
        )));
    }
    // A scoped token may move only tags of its own, which standalone and gateway commits check
    // in the repository's history; `cvmfs_server publish` would move any tag unchecked.
    if let (Principal::Scoped { .. }, Some(t), crate::config::PublishMode::Local(_)) =
        (who, &f.tag_name, &st.cfg.publish)
    {
        return Err(ApiError::Forbidden(format!(
            "tag '{t}': in local mode only the admin token may name tags (whose a tag is cannot be checked there)"
        )));
    }
    if matches!(st.cfg.publish, crate::config::PublishMode::Local(_)) && st.busy.is_busy(&repo) {
        // Local mode, as the install guide says: one transaction per repository, fail fast.
        return Err(ApiError::Conflict(format!(
            "a cvmfs_server transaction on {repo} is running; try again when it ends"
        )));
    }
    Ok((repo, path))
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string())
}

/// A submission header's value; one that is there but not plain ASCII is refused (taken as
/// absent it would publish without a tag description, or report a missing repository).
fn submission_header(h: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.to_string())).map_err(|_| {
            bad(
                "bad-header",
                format!("header {name} is not plain ASCII (send UTF-8 values as multipart fields)"),
            )
        }),
    }
}

/// Streams one body into `file`, enforcing the size limit; returns (bytes, SHA-256 hex when
/// `hash`). `growing`, when the tar is processed while it uploads, is told of every byte written.
async fn stream_to_file<S, E>(
    mut body: S,
    file: &mut std::fs::File,
    limit: u64,
    growing: Option<Arc<Growing>>,
    hash: bool,
) -> Result<(u64, Option<String>), ApiError>
where
    S: futures_util::Stream<Item = Result<web::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let out = file.try_clone().map_err(spool_write_failed)?;
    // Pieces of up to a block (1 MiB) each: a few MiB on their way to the writer.
    let (tx, rx) = tokio::sync::mpsc::channel::<Upload>(4);
    let writer = std::thread::Builder::new()
        .name("upload-writer".into())
        .spawn(move || write_upload(out, rx, growing.map(FinishGuard::new), hash))
        .map_err(spool_write_failed)?;
    let mut n = 0u64;
    let mut refused = None;
    // The chunks are copied into blocks of our own and dropped at once (see `Gatherer`); a
    // partial block waits at most GATHER_WAIT for more (a slow upload is still processed as
    // it arrives).
    let mut gather = Gatherer::new();
    let mut pieces = Vec::new();
    'upload: loop {
        // `None`: nothing came for GATHER_WAIT, what is held goes on as it is.
        let next = if gather.holding() {
            tokio::time::timeout(GATHER_WAIT, body.next()).await.ok()
        } else {
            Some(body.next().await)
        };
        match next {
            None => pieces.extend(gather.cut()),
            Some(None) => break,
            Some(Some(Err(e))) => {
                refused = Some(bad("bad-upload", format!("reading the upload: {e}")));
                break;
            }
            Some(Some(Ok(chunk))) => {
                n += chunk.len() as u64;
                if n > limit {
                    refused = Some(ApiError::TooLarge(limit));
                    break;
                }
                gather.push(&chunk, &mut pieces);
                drop(chunk);
            }
        }
        for p in pieces.drain(..) {
            if tx.send(Upload::Piece(p)).await.is_err() {
                break 'upload; // The writer stopped on an error, reported below.
            }
        }
    }
    if refused.is_none() {
        if let Some(last) = gather.cut() {
            let _ = tx.send(Upload::Piece(last)).await;
        }
        let _ = tx.send(Upload::End).await;
    }
    drop(tx);
    let written = web::block(move || writer.join())
        .await
        .map_err(|_| ApiError::Unavailable("spool writer unavailable".into()))?
        .map_err(|_| ApiError::Unavailable("spool writer panicked".into()))?;
    if let Some(e) = refused {
        return Err(e);
    }
    let digest = written.map_err(spool_write_failed)?;
    Ok((n, digest))
}

/// How long a partly gathered block of an upload waits for more before it is handed on.
const GATHER_WAIT: Duration = Duration::from_millis(20);

/// What the upload writer is given.
enum Upload {
    Piece(web::Bytes),
    /// The body is complete: make it durable.
    End,
}

/// The upload's writer thread (no file I/O or hashing on the async workers): appends each
/// piece around the page cache ([`DirectAppender`]: the tar is read once, by its job, and
/// filling the page cache with it costs a copy and a writeback per byte), hashes it when
/// `hash` (the client gave a checksum to verify: hashing costs a core about 0.4 s per
/// 600 MiB, so nobody else's upload pays it). Where the filesystem refuses direct I/O, it
/// starts the disk writes of every 16 MiB as it goes, so that the final fsync finds most of
/// the tar on disk already — except with `follow` (the tar is processed as it arrives): the
/// job may never need the tar on disk (see `submit`). With `follow` it hands each piece to the
/// processing's reader and reports each length the file holds. Returns the SHA-256 when
/// hashed; an upload cut off before its end is not synced.
fn write_upload(
    f: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<Upload>,
    follow: Option<FinishGuard>,
    hash: bool,
) -> std::io::Result<Option<String>> {
    const WRITEBACK: u64 = 16 << 20;
    let mut sha = hash.then(Sha256::new);
    let mut out = DirectAppender::new(f, true);
    let mut started = 0u64;
    while let Some(m) = rx.blocking_recv() {
        match m {
            Upload::Piece(b) => {
                if let Some(sha) = &mut sha {
                    sha.update(&b);
                }
                if let Some(g) = &follow {
                    g.received(b.clone());
                }
                out.append_piece(&b)?;
                let written = out.on_disk();
                if let Some(g) = &follow {
                    g.grew(written);
                }
                if follow.is_none() && !out.is_direct() && written - started >= WRITEBACK {
                    start_writeback(out.file(), started, written - started);
                    started = written;
                }
            }
            Upload::End => {
                let total = out.appended();
                let f = out.finish()?;
                match follow {
                    Some(g) => {
                        g.grew(total);
                        g.complete()
                    }
                    None => f.sync_all()?,
                }
                return Ok(sha.map(|s| hex::encode(s.finalize())));
            }
        }
    }
    Err(std::io::Error::other("upload ended early"))
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk now, without waiting.
fn start_writeback(f: &std::fs::File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; failure only loses the head start.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, offset, len);
}

/// Starts processing the upload `id` (spooled at `upload`) while it arrives, when its
/// repository and path are known and valid before the tar; returns what its writer tells the
/// reader. The job manager may decline; then the job is processed once accepted.
fn process_while_uploading(
    st: &AppState,
    who: &Principal,
    f: &Fields,
    id: &str,
    upload: &std::path::Path,
    run: &mut UploadRunGuard,
) -> Option<Arc<Growing>> {
    let (repo, path) = validate(f, st, who).ok()?;
    let reader = std::fs::File::open(upload).ok()?;
    let growing = Growing::new();
    st.jobs.do_send(ProcessUpload {
        job_id: id.to_string(),
        repo,
        path,
        tar: growing.reader(reader),
    });
    run.0 = Some((st.jobs.clone(), id.to_string()));
    Some(growing)
}

/// Cancels the processing of an upload that does not become a job (the job manager ignores it
/// for one that did).
struct UploadRunGuard(Option<(Addr<JobManager>, String)>);
impl Drop for UploadRunGuard {
    fn drop(&mut self) {
        if let Some((jobs, job_id)) = self.0.take() {
            jobs.do_send(UploadAbandoned { job_id });
        }
    }
}

/// Reads a submission's body (multipart or raw tar with headers) into `file`; returns the
/// fields, the tar's size and its SHA-256.
#[allow(clippy::too_many_arguments)]
async fn read_upload<S>(
    req: &HttpRequest,
    payload: S,
    st: &AppState,
    who: &Principal,
    file: &mut std::fs::File,
    limit: u64,
    (id, upload): (&str, &std::path::Path),
    run: &mut UploadRunGuard,
) -> Result<(Fields, u64, Option<String>), ApiError>
where
    S: futures_util::Stream<Item = Result<web::Bytes, actix_web::error::PayloadError>>
        + Unpin
        + 'static,
{
    let ctype = header_str(req.headers(), "content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut f = Fields::default();
    let (tar_bytes, digest);
    if ctype.starts_with("multipart/form-data") {
        let mut mp = actix_multipart::Multipart::new(req.headers(), payload);
        let mut got_tar = None;
        while let Some(field) = mp.next().await {
            let mut field = field
                .map_err(|e| bad("bad-multipart", format!("malformed multipart body: {e}")))?;
            let name = field.name().unwrap_or("").to_string();
            if name == "tar" {
                if got_tar.is_some() {
                    return Err(bad("bad-multipart", "more than one 'tar' field"));
                }
                let growing = process_while_uploading(st, who, &f, id, upload, run);
                let hash = f.tar_sha256.is_some();
                got_tar = Some(stream_to_file(&mut field, file, limit, growing, hash).await?);
                continue;
            }
            let mut v = Vec::new();
            while let Some(c) = field.next().await {
                let c =
                    c.map_err(|e| bad("bad-multipart", format!("malformed multipart body: {e}")))?;
                v.extend_from_slice(&c);
                if v.len() > 64 * 1024 {
                    return Err(bad("bad-multipart", format!("field '{name}' is too long")));
                }
            }
            let s = String::from_utf8(v)
                .map_err(|_| bad("bad-multipart", format!("field '{name}' is not UTF-8")))?;
            match name.as_str() {
                "repo" => f.repo = Some(s),
                "path" => f.path = Some(s),
                "tag_name" => f.tag_name = Some(s).filter(|x| !x.is_empty()),
                "tag_description" => f.tag_description = Some(s),
                "tar_sha256" => {
                    f.tar_sha256 = Some(s.trim().to_ascii_lowercase()).filter(|x| !x.is_empty())
                }
                other => return Err(bad("bad-multipart", format!("unknown field '{other}'"))),
            }
        }
        let (n, d) = got_tar.ok_or_else(|| bad("missing-tar", "field 'tar' is required"))?;
        tar_bytes = n;
        digest = match d {
            // The checksum came after the tar: hash what was spooled.
            None if f.tar_sha256.is_some() => Some(hash_spooled(upload.to_path_buf()).await?),
            d => d,
        };
        validate(&f, st, who)?;
    } else {
        let h = req.headers();
        f.repo = submission_header(h, "x-cvmfs-repo")?;
        f.path = submission_header(h, "x-cvmfs-path")?;
        f.tag_name = submission_header(h, "x-cvmfs-tag-name")?.filter(|x| !x.is_empty());
        f.tag_description = submission_header(h, "x-cvmfs-tag-description")?;
        f.tar_sha256 =
            submission_header(h, "x-cvmfs-tar-sha256")?.map(|s| s.trim().to_ascii_lowercase());
        // Refuse before reading a single body byte.
        validate(&f, st, who)?;
        let growing = process_while_uploading(st, who, &f, id, upload, run);
        let hash = f.tar_sha256.is_some();
        let (n, d) = stream_to_file(payload, file, limit, growing, hash).await?;
        tar_bytes = n;
        digest = d;
    }
    Ok((f, tar_bytes, digest))
}

/// The SHA-256 of a spooled upload, read back on a blocking thread.
async fn hash_spooled(path: PathBuf) -> Result<String, ApiError> {
    web::block(move || {
        let mut sha = Sha256::new();
        let file = std::fs::File::open(path)?;
        std::io::copy(&mut DirectReader::new(file, true), &mut sha)?;
        Ok(hex::encode(sha.finalize()))
    })
    .await
    .map_err(|_| ApiError::Unavailable("spool reader unavailable".into()))?
    .map_err(|e: std::io::Error| ApiError::Unavailable(format!("reading the spooled upload: {e}")))
}

/// The request body, cut off with an error when no data arrives for `idle` (then `stalled`
/// is set, so the handler answers 408 rather than blaming the body).
fn idle_limited(
    payload: web::Payload,
    idle: Duration,
    stalled: Arc<std::sync::atomic::AtomicBool>,
) -> std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<web::Bytes, actix_web::error::PayloadError>>>,
> {
    // Fused: multipart parsers poll again after the end.
    Box::pin(futures_util::StreamExt::fuse(futures_util::stream::unfold(
        Some(payload),
        move |p| {
            let stalled = stalled.clone();
            async move {
                let mut p = p?;
                match actix_rt::time::timeout(idle, p.next()).await {
                    Ok(Some(item)) => Some((item, Some(p))),
                    Ok(None) => None,
                    Err(_) => {
                        stalled.store(true, std::sync::atomic::Ordering::SeqCst);
                        let e = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no data for {} s", idle.as_secs()),
                        );
                        // The stream ends after the error.
                        Some((Err(actix_web::error::PayloadError::Io(e)), None))
                    }
                }
            }
        },
    )))
}

/// The body types a submission may have: multipart, or a raw (gzip) tar — also under curl's
/// default `application/x-www-form-urlencoded` or no type at all. JSON, text and the rest are
/// refused (415) before a byte is read.
fn accepted_media_type(h: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = header_str(h, "content-type") else {
        return Ok(());
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "" | "multipart/form-data"
        | "application/x-tar"
        | "application/tar"
        | "application/gzip"
        | "application/x-gzip"
        | "application/octet-stream"
        | "application/x-www-form-urlencoded" => Ok(()),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "a submission is multipart/form-data or a tar (application/x-tar, application/gzip, application/octet-stream), not {other}"
        ))),
    }
}

/// `POST /api/v1/jobs`.
pub async fn submit(
    req: HttpRequest,
    payload: web::Payload,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let who = auth(&req, &st)?;
    // Refused before a byte of the upload is read.
    if st.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::Draining);
    }
    let limit = st.cfg.max_upload;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok())
    {
        // Multipart framing adds a little; the tar itself is checked while streaming.
        if len > limit.saturating_add(1 << 20) {
            return Err(ApiError::TooLarge(limit));
        }
    }
    accepted_media_type(req.headers())?;
    let id = uuid::Uuid::new_v4().to_string();
    let upload = st.incoming.join(format!("{id}.tar"));
    let mut guard = UploadGuard(Some(upload.clone()));
    let mut file =
        std::fs::File::create(&upload).map_err(|e| ApiError::Unavailable(format!("spool: {e}")))?;
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = idle_limited(payload, st.cfg.upload_idle, stalled.clone());
    let mut run = UploadRunGuard(None);
    let (f, tar_bytes, digest) = read_upload(
        &req,
        body,
        &st,
        &who,
        &mut file,
        limit,
        (&id, &upload),
        &mut run,
    )
    .await
    .map_err(|e| {
        if stalled.load(std::sync::atomic::Ordering::SeqCst) {
            ApiError::Stalled(st.cfg.upload_idle.as_secs())
        } else {
            e
        }
    })?;
    let (repo, path) = validate(&f, &st, &who)?;
    if tar_bytes == 0 {
        return Err(bad("missing-tar", "the tar is empty"));
    }
    if let (Some(want), Some(digest)) = (&f.tar_sha256, &digest) {
        if want != digest {
            return Err(bad(
                "checksum-mismatch",
                format!("tar SHA-256 is {digest}, tar_sha256 says {want}"),
            ));
        }
    }
    let tar_synced = if run.0.is_none() {
        true // the writer synced it
    } else if matches!(st.cfg.publish, crate::config::PublishMode::Local(_)) {
        // Local mode publishes from the tar itself (extracted into the transaction), not from
        // the change set: it is accepted only once the tar is on disk.
        let f = file.try_clone().map_err(spool_write_failed)?;
        sync_spool_file(move || Ok(f), Some("tar-sync")).await?;
        true
    } else {
        tar_on_disk_or_processed(&st, &id, &file).await?
    };
    drop(file);
    let mut rec = JobRecord::new(id.clone(), repo, path, now_ms());
    rec.tag_name = f.tag_name;
    rec.tag_description = f.tag_description;
    rec.tar_sha256 = digest;
    rec.owner = who.owner();
    rec.tar_bytes = tar_bytes;
    let accepted = hand_over(&st, rec, upload, tar_synced, &mut guard).await?;
    Ok(HttpResponse::Accepted().json(Submitted {
        job_id: accepted.id,
        state: accepted.state.as_str().into(),
    }))
}

async fn visible_job(st: &AppState, who: &Principal, id: &str) -> Result<JobRecord, ApiError> {
    let job = st
        .jobs
        .send(GetJob(id.to_string()))
        .await
        .map_err(|_| ApiError::Unavailable("job manager unavailable".into()))?;
    match job {
        Some(j) if who.may_see(&j.owner) => Ok(j),
        _ => Err(ApiError::NotFound(format!("no job {id}"))),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovalRequest {
    repo: String,
    path: String,
    tag_name: Option<String>,
    pub(crate) tag_description: Option<String>,
}

/// `POST /api/v1/removals`: a job that takes `path` out of the repository's namespace (the
/// objects it leaves unreferenced are garbage collection's), through the configured publish
/// backend: a standalone commit, a gateway lease on the parent, or a `cvmfs_server` transaction.
pub async fn submit_removal(
    req: HttpRequest,
    mut payload: web::Payload,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let who = auth(&req, &st)?;
    if st.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::Draining);
    }
    let body = small_body(&mut payload, 256 << 10).await?;
    let body: RemovalRequest =
        serde_json::from_slice(&body).map_err(|e| bad("bad-request", format!("removal: {e}")))?;
    let f = Fields {
        repo: Some(body.repo),
        path: Some(body.path),
        tag_name: body.tag_name,
        tag_description: body.tag_description,
        ..Default::default()
    };
    let (repo, path) = validate(&f, &st, &who)?;
    if path.is_empty() {
        return Err(bad("bad-path", "the repository root cannot be removed"));
    }
    let accepted = accept_removal(&st, repo, path, &f, who.owner()).await?;
    Ok(HttpResponse::Accepted().json(Submitted {
        job_id: accepted.id,
        state: accepted.state.as_str().into(),
    }))
}

/// Accepts a removal job for `path` (validated by the caller).
pub(crate) async fn accept_removal(
    st: &AppState,
    repo: String,
    path: String,
    f: &Fields,
    owner: Option<String>,
) -> Result<JobRecord, ApiError> {
    let id = uuid::Uuid::new_v4().to_string();
    // An empty upload stands in for the tar: the spool's accept path stays the same.
    let upload = st.incoming.join(format!("{id}.tar"));
    let mut guard = UploadGuard(Some(upload.clone()));
    std::fs::File::create(&upload).map_err(|e| ApiError::Unavailable(format!("spool: {e}")))?;
    let mut rec = JobRecord::new(id, repo, path, now_ms());
    rec.tag_name = f.tag_name.clone();
    rec.tag_description = f.tag_description.clone();
    rec.owner = owner;
    rec.removal = true;
    hand_over(st, rec, upload, true, &mut guard).await
}

/// Waits until the upload processed while it arrived is either on disk or processed, whichever
/// comes first; returns whether it is on disk. A job whose change set is ready does not need
/// its tar any more, so its acceptance does not wait for the tar's fsync (which goes on).
async fn tar_on_disk_or_processed(
    st: &AppState,
    id: &str,
    file: &std::fs::File,
) -> Result<bool, ApiError> {
    let f = file.try_clone().map_err(spool_write_failed)?;
    let sync = Box::pin(sync_spool_file(move || Ok(f), Some("tar-sync")));
    let processed = Box::pin(st.jobs.send(AwaitUploadRun {
        job_id: id.to_string(),
    }));
    match futures_util::future::select(sync, processed).await {
        futures_util::future::Either::Left((r, _)) => r.map(|()| true),
        futures_util::future::Either::Right((Ok(true), _)) => Ok(false),
        futures_util::future::Either::Right((_, sync)) => sync.await.map(|()| true),
    }
}

fn spool_write_failed(e: std::io::Error) -> ApiError {
    ApiError::Unavailable(format!("spool write failed: {e}"))
}

/// Opens (`open`) and fsyncs a spool file on a blocking thread, after test hook `hook`.
async fn sync_spool_file(
    open: impl FnOnce() -> std::io::Result<std::fs::File> + Send + 'static,
    hook: Option<&'static str>,
) -> Result<(), ApiError> {
    web::block(move || {
        if let Some(h) = hook {
            prepub_actors::testhook::point(h);
        }
        open()?.sync_all()
    })
    .await
    .map_err(|_| ApiError::Unavailable("spool writer unavailable".into()))?
    .map_err(spool_write_failed)
}

/// Hands a spooled upload and its record to the job manager; once it is accepted the spool owns
/// the upload (the guard no longer deletes it). An upload whose processing was given up after
/// all (a garbage collection began) is made durable and handed over again.
async fn hand_over(
    st: &AppState,
    record: JobRecord,
    upload: PathBuf,
    tar_synced: bool,
    guard: &mut UploadGuard,
) -> Result<JobRecord, ApiError> {
    use prepub_actors::job_manager::SubmitError;
    let submit = |record: JobRecord, tar_synced: bool| {
        st.jobs.send(SubmitJob {
            record,
            upload: upload.clone(),
            tar_synced,
        })
    };
    let unavailable = |_| ApiError::Unavailable("job manager unavailable".into());
    let mut answer = submit(record.clone(), tar_synced)
        .await
        .map_err(unavailable)?;
    if let Err(SubmitError::NotProcessed) = answer {
        let path = upload.clone();
        sync_spool_file(move || std::fs::File::open(path), None).await?;
        answer = submit(record, true).await.map_err(unavailable)?;
    }
    let accepted = answer.map_err(|e| match e {
        SubmitError::Draining => ApiError::Draining,
        e => ApiError::Unavailable(e.to_string()),
    })?;
    guard.0 = None;
    Ok(accepted)
}

/// `GET /api/v1/jobs/{id}`.
pub async fn get_job(
    req: HttpRequest,
    id: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let who = auth(&req, &st)?;
    let j = visible_job(&st, &who, &id).await?;
    Ok(HttpResponse::Ok().json(JobView::from(&j)))
}

#[derive(serde::Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    repo: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

/// `GET /api/v1/jobs?state=&repo=&offset=&limit=`.
pub async fn list_jobs(
    req: HttpRequest,
    q: web::Query<ListQuery>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let who = auth(&req, &st)?;
    // An empty parameter (`?state=`) is no filter.
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            JobState::parse(s)
                .ok_or_else(|| bad("bad-state", format!("'{s}' is not a job state")))?,
        ),
    };
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let (jobs, total) = st
        .jobs
        .send(ListJobs {
            state,
            repo: q.repo.clone().filter(|r| !r.is_empty()),
            owner: who.owner(),
            offset,
            limit,
        })
        .await
        .map_err(|_| ApiError::Unavailable("job manager unavailable".into()))?;
    Ok(HttpResponse::Ok().json(JobList {
        jobs: jobs.iter().map(JobView::from).collect(),
        total,
        offset,
        limit,
    }))
}

/// `POST /api/v1/jobs/{id}/abort`.
pub async fn abort_job(
    req: HttpRequest,
    id: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let who = auth(&req, &st)?;
    visible_job(&st, &who, &id).await?;
    let r = st
        .jobs
        .send(AbortJob(id.to_string()))
        .await
        .map_err(|_| ApiError::Unavailable("job manager unavailable".into()))?;
    match r {
        Ok(j) => Ok(HttpResponse::Accepted().json(JobView::from(&j))),
        Err(AbortError::NotFound) => Err(ApiError::NotFound(format!("no job {id}"))),
        Err(AbortError::Terminal(s)) => {
            Err(ApiError::Conflict(format!("job {id} already ended as {s}")))
        }
    }
}

/// `GET /api/v1/jobs/{id}/events`: server-sent events — the current record first, then every
/// change, keep-alive comments every 15 s, and the stream ends after a terminal state.
pub async fn job_events(
    req: HttpRequest,
    id: web::Path<String>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let who = auth(&req, &st)?;
    // Woken by every record the job manager saves (a state change is sent at once), and
    // every `event_tick()` for what changes without one (progress). Marked seen before the
    // first look: a record saved after it wakes the first wait.
    let mut changes = st.job_changes.clone();
    changes.mark_unchanged();
    let first = visible_job(&st, &who, &id).await?;
    let jobs = st.jobs.clone();
    let id = id.into_inner();
    struct S {
        last: Option<JobRecord>,
        last_sent: Instant,
        done: bool,
        changes: tokio::sync::watch::Receiver<u64>,
    }
    let init = S {
        last: None,
        last_sent: Instant::now(),
        done: false,
        changes,
    };
    let first_clone = first.clone();
    let stream =
        futures_util::stream::unfold((init, Some(first_clone)), move |(mut s, pending)| {
            let jobs = jobs.clone();
            let id = id.clone();
            async move {
                if s.done {
                    return None;
                }
                if let Some(j) = pending {
                    let ev = event(&j);
                    s.done = j.state.is_terminal();
                    s.last = Some(j);
                    s.last_sent = Instant::now();
                    return Some((Ok::<_, actix_web::Error>(ev), (s, None)));
                }
                loop {
                    {
                        let tick = actix_rt::time::sleep(event_tick());
                        let changed = s.changes.changed();
                        futures_util::pin_mut!(tick, changed);
                        // A sender gone (never, while the server runs) leaves the tick alone.
                        if let futures_util::future::Either::Right((Err(_), _)) =
                            futures_util::future::select(tick, changed).await
                        {
                            actix_rt::time::sleep(event_tick()).await;
                        }
                    }
                    // Saves from here on wake the next wait.
                    s.changes.mark_unchanged();
                    let cur = jobs.send(GetJob(id.clone())).await.ok().flatten();
                    match cur {
                        None => return None,
                        Some(j) if Some(&j) != s.last.as_ref() => {
                            let ev = event(&j);
                            s.done = j.state.is_terminal();
                            s.last = Some(j);
                            s.last_sent = Instant::now();
                            return Some((Ok(ev), (s, None)));
                        }
                        Some(_) if s.last_sent.elapsed() >= EVENT_KEEPALIVE => {
                            s.last_sent = Instant::now();
                            return Some((
                                Ok(web::Bytes::from_static(b": keep-alive\n\n")),
                                (s, None),
                            ));
                        }
                        Some(_) => {}
                    }
                }
            }
        });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(stream))
}

/// How often a job's event stream looks for changes no saved record announced (its progress).
/// Tests stretch it (`CVMFS_PREPUB_TEST_EVENT_TICK_MS`, never set in production) to show that
/// state changes do not wait for it.
fn event_tick() -> Duration {
    static TICK: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        std::env::var("CVMFS_PREPUB_TEST_EVENT_TICK_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_millis(200), Duration::from_millis)
    })
}

/// A comment line goes out when nothing else did for this long (proxies keep the stream open).
const EVENT_KEEPALIVE: Duration = Duration::from_secs(15);

fn event(j: &JobRecord) -> web::Bytes {
    let data = serde_json::to_string(&JobView::from(j)).unwrap_or_default();
    web::Bytes::from(format!("event: job\ndata: {data}\n\n"))
}

/// `GET /api/v1/health`: 200 when every check passes, 503 otherwise.
pub async fn health(st: web::Data<AppState>) -> HttpResponse {
    let cfg = st.cfg.clone();
    let s3 = st.s3.clone();
    let remote = st.remote_checks.clone();
    let checks = web::block(move || {
        let mut c = std::collections::BTreeMap::new();
        // A name of its own: probes running at once must not remove each other's file.
        let probe = cfg
            .spool_root
            .join("incoming")
            .join(format!(".health-probe-{}", uuid::Uuid::new_v4()));
        let spool_ok = std::fs::write(&probe, b"ok").and_then(|_| std::fs::remove_file(&probe));
        c.insert(
            "spool".to_string(),
            Check {
                ok: spool_ok.is_ok(),
                detail: match spool_ok {
                    Ok(()) => format!("{} writable", cfg.spool_root.display()),
                    Err(e) => format!("{}: {e}", cfg.spool_root.display()),
                },
            },
        );
        for (name, r) in &cfg.repos {
            let check = || -> Result<String, String> {
                let cas: Arc<dyn prepub_core::cas::Cas> = match s3.get(name) {
                    Some(store) => {
                        store.probe().map_err(|e| e.to_string())?;
                        store.clone()
                    }
                    None => Arc::new(
                        prepub_core::cas::LocalCas::open(&r.storage).map_err(|e| e.to_string())?,
                    ),
                };
                if let crate::config::PublishMode::Local(mount) = &cfg.publish {
                    prepub_actors::local_publisher::probe("cvmfs_server")?;
                    let _ = &cas;
                    return Ok(format!(
                        "cvmfs_server on PATH, mounted at {}",
                        mount.join(name).display()
                    ));
                }
                if let crate::config::PublishMode::Gateway(g) = &cfg.publish {
                    // Gateway mode: the CAS must exist here; the repository is read from the
                    // Stratum 0 and written by the gateway.
                    let url = format!("{}/{name}", g.stratum0_url.trim_end_matches('/'));
                    let s0 = prepub_actors::http_store::HttpStore::with_timeout(
                        &url,
                        std::time::Duration::from_secs(10),
                    )
                    .map_err(|e| e.to_string())?;
                    let (m, _) = prepub_core::repo::current_manifest(&s0)
                        .map_err(|e| format!("{url}: {e}"))?
                        .ok_or_else(|| format!("{url} has no .cvmfspublished"))?;
                    let gw = reqwest::blocking::Client::builder()
                        .timeout(std::time::Duration::from_secs(5))
                        .build()
                        .map_err(|e| e.to_string())?
                        .get(format!("{}/api/v1", g.url.trim_end_matches('/')))
                        .send()
                        .map_err(|e| format!("gateway {}: {e}", g.url))?;
                    if !gw.status().is_success() {
                        return Err(format!("gateway {} answered HTTP {}", g.url, gw.status()));
                    }
                    let _ = &cas;
                    return Ok(format!(
                        "revision {} at {url}, gateway {} reachable",
                        m.revision, g.url
                    ));
                }
                let (m, _) = prepub_core::repo::current_manifest(cas.as_ref())
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{} holds no repository", cas.describe()))?;
                if !prepub_core::keys::RepoKeys::present(&r.keys_dir, name) {
                    return Err(format!(
                        "keys for {name} missing in {}",
                        r.keys_dir.display()
                    ));
                }
                Ok(format!("revision {} at {}", m.revision, cas.describe()))
            };
            let asks_others = s3.contains_key(name)
                || matches!(cfg.publish, crate::config::PublishMode::Gateway(_));
            let res = if asks_others {
                remote.get(name, check)
            } else {
                check()
            };
            c.insert(
                format!("repository:{name}"),
                Check {
                    ok: res.is_ok(),
                    detail: res.unwrap_or_else(|e| e),
                },
            );
        }
        c
    })
    .await
    .unwrap_or_else(|e| {
        // The checks did not finish (a panic): say so rather than leave them out.
        let mut c = std::collections::BTreeMap::new();
        c.insert(
            "checks".to_string(),
            Check {
                ok: false,
                detail: format!("the storage checks failed to run: {e}"),
            },
        );
        c
    });
    let jobs = st.jobs.send(CountJobs).await;
    let mut checks = checks;
    checks.insert(
        "job_manager".into(),
        Check {
            ok: jobs.is_ok(),
            detail: if jobs.is_ok() {
                "responding".into()
            } else {
                "not responding".into()
            },
        },
    );
    let cw = st
        .cas_writer
        .send(prepub_actors::cas_writer::GetCasWriterStatus)
        .await;
    checks.insert(
        "cas_writer".into(),
        match cw {
            Ok(s) => Check {
                ok: true,
                detail: format!(
                    "{} objects stored ({} bytes), {} already present, {} failed puts, up to {} in flight",
                    s.stored, s.bytes_stored, s.already_present, s.errors, s.puts_in_flight_max
                ),
            },
            Err(_) => Check {
                ok: false,
                detail: "not responding".into(),
            },
        },
    );
    let ok = !checks.is_empty() && checks.values().all(|c| c.ok);
    let body = Health {
        status: if ok { "ok".into() } else { "degraded".into() },
        version: env!("CARGO_PKG_VERSION").into(),
        draining: st.draining.load(std::sync::atomic::Ordering::SeqCst),
        checks,
        jobs: jobs.unwrap_or_default(),
    };
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// The configuration of `repo`, or 404 if this daemon does not serve it.
pub(crate) fn served<'a>(
    st: &'a AppState,
    repo: &str,
) -> Result<&'a crate::config::RepoConfig, ApiError> {
    st.cfg
        .repos
        .get(repo)
        .ok_or_else(|| ApiError::NotFound(format!("repository {repo} is not served here")))
}

pub(crate) fn admin_only(who: &Principal) -> Result<(), ApiError> {
    match who {
        Principal::Admin => Ok(()),
        Principal::Scoped { .. } => Err(ApiError::Forbidden(
            "this operation needs the admin token".into(),
        )),
    }
}

async fn drain_state(st: &AppState, draining: bool) -> Result<HttpResponse, ApiError> {
    st.draining
        .store(draining, std::sync::atomic::Ordering::SeqCst);
    let active = st
        .jobs
        .send(prepub_actors::job_manager::ActiveJobs)
        .await
        .map_err(|_| ApiError::Unavailable("job manager unavailable".into()))?
        .len();
    Ok(HttpResponse::Ok().json(crate::api_types::DrainState { draining, active }))
}

/// `POST /api/v1/drain` (admin): refuse new jobs (503 `draining`); accepted ones finish.
pub async fn drain(req: HttpRequest, st: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    admin_only(&auth(&req, &st)?)?;
    drain_state(&st, true).await
}

/// `POST /api/v1/resume` (admin): accept jobs again.
pub async fn resume(req: HttpRequest, st: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    admin_only(&auth(&req, &st)?)?;
    drain_state(&st, false).await
}

/// `GET /api/v1/status`: drain state, active jobs, job counts and the actor table. A scoped
/// token sees only its own jobs.
pub async fn status(req: HttpRequest, st: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    use crate::api_types::{ActiveJob, ActorView, Status};
    let who = auth(&req, &st)?;
    let active = st.jobs.send(prepub_actors::job_manager::ActiveJobs).await;
    let manager_up = active.is_ok();
    let now = now_ms();
    let mine = |j: &JobRecord| who.may_see(&j.owner);
    let active: Vec<ActiveJob> = active
        .unwrap_or_default()
        .iter()
        .filter(|j| mine(j))
        .map(|j| ActiveJob {
            job_id: j.id.clone(),
            repo: j.repo.clone(),
            path: if j.path.is_empty() {
                "/".into()
            } else {
                j.path.clone()
            },
            state: j.state.as_str().into(),
            age_seconds: ((now - j.created).max(0) / 1000) as u64,
            progress: j.progress,
            waiting: j.waiting.clone(),
        })
        .collect();
    let jobs = match &who {
        Principal::Admin => st.jobs.send(CountJobs).await.unwrap_or_default(),
        Principal::Scoped { .. } => {
            let (list, _) = st
                .jobs
                .send(ListJobs {
                    state: None,
                    repo: None,
                    owner: who.owner(),
                    offset: 0,
                    limit: usize::MAX,
                })
                .await
                .unwrap_or_default();
            let mut m = std::collections::BTreeMap::new();
            for j in list {
                *m.entry(j.state.as_str().to_string()).or_insert(0) += 1;
            }
            m
        }
    };
    let running = |up: bool| if up { "running" } else { "not responding" }.to_string();
    let mut actors = vec![ActorView {
        name: "JobManager".into(),
        instances: 1,
        status: running(manager_up),
        detail: format!("{} active jobs", active.len()),
    }];
    let cw = st
        .cas_writer
        .send(prepub_actors::cas_writer::GetCasWriterStatus)
        .await;
    actors.push(ActorView {
        name: "CasWriter".into(),
        instances: 1,
        status: running(cw.is_ok()),
        detail: cw
            .map(|s| {
                format!(
                    "{} objects stored, {} already present",
                    s.stored, s.already_present
                )
            })
            .unwrap_or_default(),
    });
    actors.push(ActorView {
        name: "CompressorPool".into(),
        instances: if st.cfg.workers == 0 {
            prepub_core::cores()
        } else {
            st.cfg.workers
        },
        status: "running".into(),
        detail: "zlib + SHA-1 worker threads".into(),
    });
    actors.push(ActorView {
        name: "SpoolJournal".into(),
        instances: 1,
        status: running(manager_up),
        detail: st.cfg.spool_root.display().to_string(),
    });
    let publisher = match &st.cfg.publish {
        crate::config::PublishMode::Standalone => ("Publisher", "standalone".to_string()),
        crate::config::PublishMode::Gateway(g) => {
            ("GatewayPublisher", format!("gateway {}", g.url))
        }
        crate::config::PublishMode::Local(_) => ("LocalPublisher", "cvmfs_server".to_string()),
    };
    actors.push(ActorView {
        name: publisher.0.into(),
        instances: st.cfg.repos.len(),
        status: "running".into(),
        detail: publisher.1,
    });
    if let crate::config::PublishMode::Gateway(_) = &st.cfg.publish {
        actors.push(ActorView {
            name: "GatewayLease".into(),
            instances: 1,
            status: "running".into(),
            detail: "lease heartbeats".into(),
        });
    }
    if let Some(d) = &st.cfg.distribution {
        actors.push(ActorView {
            name: "S1Distributor".into(),
            instances: d.endpoints.len(),
            status: "running".into(),
            detail: d.endpoints.join(" "),
        });
        if let Some(m) = &d.mqtt {
            let up = st.metrics.mqtt_connected.get() == 1;
            actors.push(ActorView {
                name: "MqttBridge".into(),
                instances: 1,
                status: if up { "connected" } else { "disconnected" }.into(),
                detail: m.broker_url.clone(),
            });
        }
    }
    Ok(HttpResponse::Ok().json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: st.started.elapsed().as_secs(),
        draining: st.draining.load(std::sync::atomic::Ordering::SeqCst),
        jobs,
        active,
        actors,
    }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessBatch {
    repo: String,
    events: Vec<AccessEventIn>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessEventIn {
    /// An object name (`<hash>[suffix]`) or a request path ending in `data/xx/…`.
    object: Option<String>,
    /// A path inside the repository.
    path: Option<String>,
    /// UNIX seconds; default now.
    time: Option<i64>,
}

/// Most events in one `POST /api/v1/access-events` batch.
pub const MAX_ACCESS_BATCH: usize = 10_000;

fn may_touch_repo(who: &Principal, repo: &str) -> bool {
    match who {
        Principal::Admin => true,
        Principal::Scoped { prefixes, .. } => prefixes.iter().any(|(r, _)| r == repo),
    }
}

/// A request body of at most `limit` bytes (413 beyond), read whole.
async fn small_body(payload: &mut web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| bad("bad-upload", format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `POST /api/v1/access-events`: a batch of accesses (from log shippers or proxies) for one
/// repository; 202 `{applied, collapsed}`.
pub async fn access_events(
    req: HttpRequest,
    mut payload: web::Payload,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let who = auth(&req, &st)?;
    // At most 8 MiB of JSON (10 000 events fit comfortably).
    let body = small_body(&mut payload, 8 << 20).await?;
    let batch: AccessBatch = serde_json::from_slice(&body)
        .map_err(|e| bad("bad-request", format!("access events: {e}")))?;
    served(&st, &batch.repo)?;
    if !may_touch_repo(&who, &batch.repo) {
        return Err(ApiError::Forbidden(format!(
            "this token has no prefix in {}",
            batch.repo
        )));
    }
    if batch.events.len() > MAX_ACCESS_BATCH {
        return Err(bad(
            "bad-request",
            format!(
                "{} events; at most {MAX_ACCESS_BATCH} per batch",
                batch.events.len()
            ),
        ));
    }
    let now = prepub_core::timefmt::now();
    let mut events = Vec::with_capacity(batch.events.len());
    for (i, e) in batch.events.into_iter().enumerate() {
        let object = match &e.object {
            None => None,
            Some(o) => Some(prepub_core::access::object_of(o).ok_or_else(|| {
                bad(
                    "bad-request",
                    format!("events[{i}].object '{o}' names no object"),
                )
            })?),
        };
        let path = match &e.path {
            None => None,
            Some(p) => Some(
                prepub_core::repo::normalize_repo_path(p)
                    .map(|p| if p.is_empty() { "/".to_string() } else { p })
                    .map_err(|err| bad("bad-request", format!("events[{i}].path: {err}")))?,
            ),
        };
        if object.is_none() && path.is_none() {
            return Err(bad(
                "bad-request",
                format!("events[{i}] needs an object or a path"),
            ));
        }
        let time = e.time.unwrap_or(now);
        if time > now + 300 {
            return Err(bad(
                "bad-request",
                format!("events[{i}].time is in the future"),
            ));
        }
        events.push(prepub_core::access::AccessEvent { object, path, time });
    }
    let r = st
        .access
        .send(prepub_actors::access_tracker::RecordAccess {
            repo: batch.repo,
            events,
        })
        .await
        .map_err(|_| ApiError::Unavailable("access tracker unavailable".into()))?;
    let rec = r.map_err(|e| access_refused(e, ApiError::Conflict))?;
    Ok(HttpResponse::Accepted().json(rec))
}

/// An access tracker refusal as an API error; `not_tracked` says what "not tracked" is here.
fn access_refused(
    e: prepub_actors::access_tracker::AccessRefused,
    not_tracked: fn(String) -> ApiError,
) -> ApiError {
    match e {
        prepub_actors::access_tracker::AccessRefused::NotTracked(m) => not_tracked(m),
        prepub_actors::access_tracker::AccessRefused::Store(m) => ApiError::Unavailable(m),
    }
}

#[derive(serde::Deserialize)]
pub struct AccessQuery {
    object: Option<String>,
    path: Option<String>,
}

/// `GET /api/v1/access/{repo}?object=&path=` (admin): what the access store knows.
pub async fn access_query(
    req: HttpRequest,
    repo: web::Path<String>,
    q: web::Query<AccessQuery>,
    st: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_only(&auth(&req, &st)?)?;
    let repo = repo.into_inner();
    served(&st, &repo)?;
    let object = match &q.object {
        None => None,
        Some(o) => Some(
            prepub_core::access::object_of(o)
                .ok_or_else(|| bad("bad-request", format!("'{o}' names no object")))?,
        ),
    };
    let r = st
        .access
        .send(prepub_actors::access_tracker::QueryAccess {
            repo,
            object,
            path: q.path.clone(),
        })
        .await
        .map_err(|_| ApiError::Unavailable("access tracker unavailable".into()))?;
    let v = r.map_err(|e| access_refused(e, ApiError::NotFound))?;
    Ok(HttpResponse::Ok().json(v))
}

/// `GET /api/v1/openapi.json`: the OpenAPI 3 description of this API (tests keep it in step
/// with the routes and the bodies they return).
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .body(include_str!("openapi.json"))
}

/// `GET /api/v1/metrics`: Prometheus text format.
pub async fn metrics(st: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/plain; version=0.0.4"))
        .body(st.metrics.render())
}

/// Unknown routes: JSON 404.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such endpoint".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_check_runs_once_at_a_time_and_nobody_waits_for_it() {
        let checks = Arc::new(RemoteChecks::default());
        let (started_tx, started) = crossbeam_channel::bounded(1);
        let (go, go_rx) = crossbeam_channel::bounded::<()>(1);
        let c = checks.clone();
        let first = std::thread::spawn(move || {
            c.get("repo", || {
                started_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok("revision 7".into())
            })
        });
        started.recv().unwrap();
        // While the first check runs: an answer at once, without running another.
        let t = std::time::Instant::now();
        let r = checks.get("repo", || panic!("a second check ran"));
        assert!(r.unwrap_err().contains("still running"));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        go.send(()).unwrap();
        assert_eq!(first.join().unwrap().unwrap(), "revision 7");
        // Fresh: reused.
        assert_eq!(
            checks.get("repo", || panic!("checked again")).unwrap(),
            "revision 7"
        );
        // A panicking check leaves no "running" mark behind; the next one runs.
        let c = checks.clone();
        let _ = std::thread::spawn(move || {
            let _ = c.get("other", || panic!("boom"));
        })
        .join();
        assert_eq!(checks.get("other", || Ok("fine".into())).unwrap(), "fine");
    }
}
