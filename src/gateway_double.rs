//! A test double of `cvmfs_gateway` + `cvmfs_receiver` (a test tool, not for production): it
//! speaks the stock gateway API on loopback — HMAC-SHA1 authorization, leases with expiry and
//! prefix conflicts, legacy and token payload routes with `V2` object packs, commit that applies
//! `diff(old_root, new_root)` below the lease path onto the current head the way the receiver does,
//! signs and tags the new revision — and serves the repository storage over HTTP as the Stratum 0
//! (`/cvmfs/<repo>/...`). Facts: cvmfs-formats.md §4. Quirks kept on purpose: errors are HTTP 200
//! with `"status":"error"`; `api_version`/`header_size` must be JSON strings (else HTTP 400);
//! there is no renew endpoint (`PUT` answers 405); a failed commit cannot be retried on the same
//! lease. Fault knobs: error rate, latency, a lagging manifest, forced `path_busy`, and connections
//! dropped after a payload or commit was carried out.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use prepub_core::cas::{Cas, LocalCas};
use prepub_core::catalog::tree::CatalogTree;
use prepub_core::gateway::{check_authorization, go_duration, leases_conflict, parse_pack};
use prepub_core::hash::{ObjectId, Suffix};
use prepub_core::keys::RepoKeys;
use prepub_core::repo::{self, RepoError, TagRequest};
use serde_json::{json, Value};

/// Configuration of the double.
#[derive(Debug, Clone)]
pub struct DoubleConfig {
    pub repo: String,
    pub storage: PathBuf,
    /// Keep the repository in S3 instead of `storage` (the publisher's `cas: s3`).
    pub s3: Option<prepub_actors::s3_cas::S3Settings>,
    pub keys_dir: PathBuf,
    /// `key_id → (secret, allowed sub-path)`.
    pub keys: HashMap<String, (String, String)>,
    pub max_lease_time: Duration,
    /// Probability that a mutating API call fails (half HTTP 500, half HTTP 200 with an error).
    pub error_rate: f64,
    /// Added to every API call.
    pub latency: Duration,
    /// After a commit, `.cvmfspublished` keeps showing the previous manifest this long.
    pub manifest_lag: Duration,
    /// The first N lease requests are answered `path_busy`.
    pub force_path_busy: u32,
    /// Probability that a payload or commit is carried out but its connection is then dropped
    /// before the reply (the client cannot tell whether it happened).
    pub drop_rate: f64,
}

struct Lease {
    subpath: String,
    key_id: String,
    expires: Instant,
    commit_attempted: bool,
}

struct State {
    cfg: DoubleConfig,
    cas: Arc<dyn Cas>,
    leases: HashMap<String, Lease>,
    lagged: Option<(Vec<u8>, Instant)>,
    busy_left: u32,
    rng: u64,
    commits: u64,
}

type Shared = web::Data<(Arc<Mutex<State>>, Arc<Mutex<()>>)>;

fn reply(v: Value) -> HttpResponse {
    HttpResponse::Ok().json(v)
}

/// A response whose body fails at once: the server aborts the connection mid-reply.
fn dropped() -> HttpResponse {
    let s = futures_util::stream::once(async {
        Err::<web::Bytes, _>(actix_web::error::ErrorInternalServerError(
            "connection dropped",
        ))
    });
    HttpResponse::Ok().streaming(s)
}

fn error(reason: &str) -> HttpResponse {
    reply(json!({"status": "error", "reason": reason}))
}

impl State {
    fn rand(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A simulated failure for this call, if the dice say so.
    fn fault(&mut self) -> Option<HttpResponse> {
        if self.cfg.error_rate > 0.0 && self.rand() < self.cfg.error_rate {
            if self.rand() < 0.5 {
                return Some(HttpResponse::InternalServerError().body("simulated internal error"));
            }
            return Some(error("simulated failure"));
        }
        None
    }

    fn drop_now(&mut self) -> bool {
        self.cfg.drop_rate > 0.0 && self.rand() < self.cfg.drop_rate
    }

    fn secret(&self, key_id: &str) -> Option<Vec<u8>> {
        self.cfg
            .keys
            .get(key_id)
            .map(|(s, _)| s.as_bytes().to_vec())
    }

    fn expire(&mut self) {
        let now = Instant::now();
        self.leases.retain(|_, l| l.expires > now);
    }
}

fn auth_header(req: &HttpRequest) -> String {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn new_token() -> String {
    // Stock: base32 (standard alphabet, padded) of 32 random bytes.
    let mut b = [0u8; 32];
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&rand_u64().to_le_bytes());
    }
    base32(&b)
}

fn rand_u64() -> u64 {
    let mut buf = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf));
    u64::from_le_bytes(buf)
}

fn base32(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let v = u64::from_be_bytes([0, 0, 0, buf[0], buf[1], buf[2], buf[3], buf[4]]);
        let chars = match chunk.len() {
            1 => 2,
            2 => 4,
            3 => 5,
            4 => 7,
            _ => 8,
        };
        for i in 0..8 {
            if i < chars {
                out.push(A[((v >> (35 - i * 5)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn delay(st: &Shared) {
    let d = st.0.lock().map(|s| s.cfg.latency).unwrap_or_default();
    if !d.is_zero() {
        actix_rt::time::sleep(d).await;
    }
}

async fn welcome() -> HttpResponse {
    reply(json!({"welcome": "cvmfs-prepub gateway double (a test tool)"}))
}

async fn repos(st: Shared) -> HttpResponse {
    let s = st.0.lock().unwrap_or_else(|e| e.into_inner());
    let keys: HashMap<String, String> = s
        .cfg
        .keys
        .iter()
        .map(|(k, (_, p))| (k.clone(), p.clone()))
        .collect();
    reply(json!({"status": "ok", "data": {s.cfg.repo.clone(): {"keys": keys, "enabled": true}}}))
}

async fn new_lease(req: HttpRequest, body: web::Bytes, st: Shared) -> HttpResponse {
    delay(&st).await;
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return HttpResponse::BadRequest().body(format!("could not decode request: {e}")),
    };
    let (Some(path), Some(api)) = (v["path"].as_str(), v.get("api_version")) else {
        return HttpResponse::BadRequest().body("missing path or api_version");
    };
    let Some(api) = api.as_str() else {
        return HttpResponse::BadRequest().body("api_version must be a string");
    };
    let mut s = st.0.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = s.fault() {
        return f;
    }
    let Some(key_id) = check_authorization(&auth_header(&req), &body, |k| s.secret(k)) else {
        return error("invalid_hmac");
    };
    let api: u32 = api.parse().unwrap_or(0);
    if api < 2 {
        return error("incompatible_api_version");
    }
    let Some((repo, sub)) = path.split_once('/') else {
        return error("missing repository name or subpath");
    };
    if repo != s.cfg.repo {
        return error("authorization error: invalid_repo");
    }
    let subpath = format!("/{}", sub.trim_end_matches('/'));
    let subpath = if subpath == "/" {
        "/".to_string()
    } else {
        subpath
    };
    let allowed = s
        .cfg
        .keys
        .get(&key_id)
        .map(|(_, p)| p.clone())
        .unwrap_or_default();
    let allowed_norm = if allowed.is_empty() {
        "/".to_string()
    } else {
        allowed
    };
    let inside = allowed_norm == "/"
        || subpath == allowed_norm
        || subpath.starts_with(&format!("{}/", allowed_norm.trim_end_matches('/')));
    if !inside {
        return error("authorization error: invalid_path");
    }
    s.expire();
    if s.busy_left > 0 {
        s.busy_left -= 1;
        return reply(json!({"status": "path_busy", "time_remaining": "2.5s"}));
    }
    let now = Instant::now();
    if let Some(l) = s
        .leases
        .values()
        .find(|l| leases_conflict(&l.subpath, &subpath))
    {
        let remaining = l.expires.saturating_duration_since(now);
        return reply(json!({"status": "path_busy", "time_remaining": go_duration(remaining)}));
    }
    let token = new_token();
    let expires = now + s.cfg.max_lease_time;
    s.leases.insert(
        token.clone(),
        Lease {
            subpath,
            key_id,
            expires,
            commit_attempted: false,
        },
    );
    reply(json!({"status": "ok", "session_token": token, "max_api_version": api.min(3)}))
}

async fn list_leases(st: Shared) -> HttpResponse {
    let mut s = st.0.lock().unwrap_or_else(|e| e.into_inner());
    s.expire();
    let repo = s.cfg.repo.clone();
    let data: HashMap<String, Value> = s
        .leases
        .values()
        .map(|l| {
            (
                format!("{repo}{}", l.subpath),
                json!({"key_id": l.key_id, "path": l.subpath}),
            )
        })
        .collect();
    reply(json!({"status": "ok", "data": data}))
}

async fn get_lease(token: web::Path<String>, st: Shared) -> HttpResponse {
    let mut s = st.0.lock().unwrap_or_else(|e| e.into_inner());
    s.expire();
    let repo = s.cfg.repo.clone();
    match s.leases.get(token.as_str()) {
        Some(l) => {
            reply(json!({"data": {"key_id": l.key_id, "path": format!("{repo}{}", l.subpath)}}))
        }
        None => HttpResponse::InternalServerError().body("invalid lease"),
    }
}

async fn cancel_lease(req: HttpRequest, token: web::Path<String>, st: Shared) -> HttpResponse {
    delay(&st).await;
    let mut s = st.0.lock().unwrap_or_else(|e| e.into_inner());
    if check_authorization(&auth_header(&req), token.as_bytes(), |k| s.secret(k)).is_none() {
        return error("invalid_hmac");
    }
    match s.leases.remove(token.as_str()) {
        Some(_) => reply(json!({"status": "ok"})),
        None => error("invalid lease"),
    }
}

async fn renew_lease() -> HttpResponse {
    // The stock gateway has no renew endpoint.
    HttpResponse::MethodNotAllowed().finish()
}

/// Validates the lease of a payload or commit; returns its sub-path.
fn live_lease(s: &mut State, token: &str) -> Result<String, Box<HttpResponse>> {
    s.expire();
    s.leases
        .get(token)
        .map(|l| l.subpath.clone())
        .ok_or_else(|| Box::new(error("invalid lease")))
}

fn store_pack(
    storage: &dyn Cas,
    pack: &[u8],
    header_size: usize,
    digest: &str,
) -> Result<usize, String> {
    let objects = parse_pack(pack, header_size, digest).map_err(|e| e.to_string())?;
    for (id, range) in &objects {
        storage
            .put_bytes(id, &pack[range.clone()])
            .map_err(|e| e.to_string())?;
    }
    Ok(objects.len())
}

async fn payload_legacy(req: HttpRequest, body: web::Bytes, st: Shared) -> HttpResponse {
    delay(&st).await;
    let size: usize = match req
        .headers()
        .get("message-size")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        Some(n) if n <= body.len() => n,
        _ => return HttpResponse::BadRequest().body("missing or bad Message-Size"),
    };
    let msg = &body[..size];
    let v: Value = match serde_json::from_slice(msg) {
        Ok(v) => v,
        Err(e) => return HttpResponse::BadRequest().body(format!("could not decode message: {e}")),
    };
    let (Some(token), Some(digest)) = (v["session_token"].as_str(), v["payload_digest"].as_str())
    else {
        return HttpResponse::BadRequest().body("missing session_token or payload_digest");
    };
    let Some(hs) = v.get("header_size").and_then(|h| h.as_str()) else {
        return HttpResponse::BadRequest().body("header_size must be a string");
    };
    let header_size: usize = hs.parse().unwrap_or(usize::MAX);
    let storage = {
        let mut s = st.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = s.fault() {
            return f;
        }
        if check_authorization(&auth_header(&req), msg, |k| s.secret(k)).is_none() {
            return error("invalid_hmac");
        }
        if let Err(r) = live_lease(&mut s, token) {
            return *r;
        }
        s.cas.clone()
    };
    let pack = body.slice(size..);
    let digest = digest.to_string();
    let res = web::block(move || store_pack(storage.as_ref(), &pack, header_size, &digest)).await;
    match res {
        Ok(Ok(_)) => {
            if st.0.lock().map(|mut s| s.drop_now()).unwrap_or(false) {
                return dropped();
            }
            reply(json!({"status": "ok"}))
        }
        Ok(Err(e)) => error(&format!("other_error: {e}")),
        Err(e) => error(&format!("uploader_error: {e}")),
    }
}

async fn commit_lease(
    req: HttpRequest,
    token: web::Path<String>,
    body: web::Bytes,
    st: Shared,
) -> HttpResponse {
    delay(&st).await;
    let token = token.into_inner();
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return HttpResponse::BadRequest().body(format!("could not decode request: {e}")),
    };
    let (subpath, cfg) = {
        let mut s = st.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = s.fault() {
            return f;
        }
        if check_authorization(&auth_header(&req), token.as_bytes(), |k| s.secret(k)).is_none() {
            return error("invalid_hmac");
        }
        let sub = match live_lease(&mut s, &token) {
            Ok(p) => p,
            Err(r) => return *r,
        };
        let lease = s.leases.get_mut(&token).map(|l| {
            let first = !l.commit_attempted;
            l.commit_attempted = true;
            first
        });
        if lease != Some(true) {
            // The receiver's per-lease statistics were consumed by the failed attempt.
            return error(&format!("no statistics counters for lease {token}"));
        }
        (sub, s.cfg.clone())
    };
    let old = v["old_root_hash"].as_str().unwrap_or("").to_string();
    let new = v["new_root_hash"].as_str().unwrap_or("").to_string();
    let tag_name = v["tag_name"].as_str().unwrap_or("").to_string();
    let tag_description = v["tag_description"].as_str().unwrap_or("").to_string();
    let lock = st.1.clone();
    let state = st.0.clone();
    let res = web::block(move || -> Result<u64, String> {
        let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
        let parse = |h: &str| {
            ObjectId::parse(h.strip_suffix('C').unwrap_or(h))
                .map(|id| ObjectId::new(id.digest, Suffix::Catalog))
        };
        let (Ok(old), Ok(new)) = (parse(&old), parse(&new)) else {
            return Err("miscellaneous: bad root hashes".into());
        };
        let cas = state.lock().unwrap_or_else(|e| e.into_inner()).cas.clone();
        let cas = cas.as_ref();
        let keys = RepoKeys::load(&cfg.keys_dir, &cfg.repo).map_err(|e| e.to_string())?;
        let prev_manifest = cas
            .get_root_file(repo::MANIFEST)
            .map_err(|e| e.to_string())?;
        let t1 = tempfile::tempdir().map_err(|e| e.to_string())?;
        let t2 = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut o = CatalogTree::open(cas, t1.path(), &old)
            .map_err(|e| format!("merge_error: old root: {e}"))?;
        let mut n = CatalogTree::open(cas, t2.path(), &new)
            .map_err(|e| format!("merge_error: new root: {e}"))?;
        let lease_path = if subpath == "/" {
            String::new()
        } else {
            subpath.clone()
        };
        let tags: Vec<TagRequest> = if tag_name.is_empty() {
            vec![]
        } else {
            vec![TagRequest {
                name: tag_name,
                description: tag_description,
                owner: None,
            }]
        };
        let p = repo::publish(cas, &keys, &tags, prepub_core::timefmt::now(), |head| {
            prepub_core::merge::merge(&mut o, &mut n, head, &lease_path)
                .map_err(|e| RepoError::Invalid(e.to_string()))
        })
        .map_err(|e| match e {
            RepoError::Invalid(m) if m.starts_with("merge conflict") => format!("merge_error: {m}"),
            e => format!("miscellaneous: {e}"),
        })?;
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.cfg.manifest_lag.is_zero() {
            if let Some(prev) = prev_manifest {
                s.lagged = Some((prev, Instant::now() + s.cfg.manifest_lag));
            }
        }
        s.commits += 1;
        Ok(p.manifest.revision)
    })
    .await;
    match res {
        Ok(Ok(rev)) => {
            let mut s = st.0.lock().unwrap_or_else(|e| e.into_inner());
            s.leases.remove(&token);
            if s.drop_now() {
                return dropped();
            }
            reply(json!({"status": "ok", "final_revision": rev}))
        }
        Ok(Err(e)) => {
            let reason = if e.starts_with("merge_error") {
                "merge_error"
            } else {
                "miscellaneous"
            };
            reply(json!({"status": "error", "reason": reason, "detail": e}))
        }
        Err(e) => error(&format!("miscellaneous: {e}")),
    }
}

/// The Stratum 0 view of the storage.
async fn stratum0(path: web::Path<(String, String)>, st: Shared) -> HttpResponse {
    let (repo, tail) = path.into_inner();
    let (cas, lagged) = {
        let mut s = st.0.lock().unwrap_or_else(|e| e.into_inner());
        if repo != s.cfg.repo {
            return HttpResponse::NotFound().finish();
        }
        if let Some((_, until)) = &s.lagged {
            if *until <= Instant::now() {
                s.lagged = None;
            }
        }
        (s.cas.clone(), s.lagged.as_ref().map(|(b, _)| b.clone()))
    };
    if tail.contains("..") {
        return HttpResponse::NotFound().finish();
    }
    if tail == repo::MANIFEST {
        if let Some(b) = lagged {
            return HttpResponse::Ok().body(b);
        }
    }
    let found = web::block(move || match ObjectId::from_path(&tail) {
        Some(id) => prepub_core::cas::get_all(cas.as_ref(), &id).ok(),
        None if !tail.contains('/') => cas.get_root_file(&tail).ok().flatten(),
        None => None,
    })
    .await
    .ok()
    .flatten();
    match found {
        Some(b) => HttpResponse::Ok().body(b),
        None => HttpResponse::NotFound().finish(),
    }
}

/// Runs the double until the process is stopped.
pub fn run(cfg: DoubleConfig, listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let cas: Arc<dyn Cas> = match &cfg.s3 {
        Some(s3) => Arc::new(prepub_actors::s3_cas::S3Cas::new(s3.clone())?),
        None => Arc::new(LocalCas::open(&cfg.storage)?),
    };
    let state = State {
        cas,
        busy_left: cfg.force_path_busy,
        cfg,
        leases: HashMap::new(),
        lagged: None,
        rng: rand_u64() | 1,
        commits: 0,
    };
    let shared = web::Data::new((Arc::new(Mutex::new(state)), Arc::new(Mutex::new(()))));
    actix_rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::PayloadConfig::new(1 << 30))
                .route("/api/v1", web::get().to(welcome))
                .route("/api/v1/repos", web::get().to(repos))
                .route("/api/v1/leases", web::post().to(new_lease))
                .route("/api/v1/leases", web::get().to(list_leases))
                .route("/api/v1/leases/{token}", web::get().to(get_lease))
                .route("/api/v1/leases/{token}", web::post().to(commit_lease))
                .route("/api/v1/leases/{token}", web::delete().to(cancel_lease))
                .route("/api/v1/leases/{token}", web::put().to(renew_lease))
                .route("/api/v1/payloads", web::post().to(payload_legacy))
                .route("/cvmfs/{repo}/{tail:.*}", web::get().to(stratum0))
        })
        .bind(listen)?
        .run()
        .await?;
        Ok(())
    })
}
