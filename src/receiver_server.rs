//! Receiver mode (`--mode receiver`): the Stratum 1 endpoint that publishers pre-warm before
//! they commit (install guide §6). Every route but health and metrics needs a signed request:
//! `X-Prepub-Timestamp: <unix seconds>`, `X-Prepub-Nonce: <unique>`,
//! `X-Prepub-Content-Sha256: <hex SHA-256 of the body>` and `Authorization: PREPUB-HMAC <hex>`
//! where the HMAC-SHA256 with the shared secret covers method, path, that digest, timestamp and
//! nonce; requests outside the replay window, or whose nonce was seen within it, are refused.
//! The signature is checked before the body is read, the body against the digest as it arrives. Routes, per repository:
//! `POST …/announce` (507 when the disk cannot take the payload), `POST …/inventory` (which of
//! these objects are missing), `PUT …/objects/<hash><suffix>` (verified against its name; catalogs
//! refused), `POST …/objects` (a `V2` pack of many small objects).
//!
//! Instead of signing, a publisher may authenticate with a client certificate (mutual TLS):
//! with `server.client_ca` set, a certificate that CA signed (and, if `auth.allowed_clients` is
//! set, whose CN is listed) is enough; without a secret configured it is the only way in.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use prepub_actors::receiver_agent::{Missing, Put, ReceiverAgent};
use prepub_core::cas::{Cas, LocalCas};
use prepub_core::hash::ObjectId;
use prepub_core::receiver::{ReceiveError, Receiver};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use serde::Deserialize;
use serde_json::json;
use sha2::Digest;

use crate::config::CasFile;
use crate::units::parse_duration;

/// The receiver's configuration file (`receiver.yaml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverFile {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub server: ReceiverServerFile,
    #[serde(default)]
    pub cas: CasFile,
    /// Repositories served; storage of R is `<cas.root>/R` unless `storage:` says otherwise.
    #[serde(default)]
    pub repositories: Vec<ReceiverRepoFile>,
    #[serde(default)]
    pub auth: ReceiverAuthFile,
    /// MQTT control plane (install guide §6.2): `tls://host:8883`, with this node's client
    /// certificate (its CN is the node id) and the broker's CA.
    #[serde(default)]
    pub broker_url: Option<String>,
    #[serde(default)]
    pub broker_client_cert: Option<PathBuf>,
    #[serde(default)]
    pub broker_client_key: Option<PathBuf>,
    #[serde(default)]
    pub broker_ca_cert: Option<PathBuf>,
    /// This node's id (default: the host name); must be the CN of `broker_client_cert`.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Repositories whose announcements this node answers (default: all it serves).
    #[serde(default)]
    pub repos: Option<Vec<String>>,
    /// Where publishers push objects, as published in presence and ready messages
    /// (default: `http(s)://<host name>:<listen port>`).
    #[serde(default)]
    pub data_url: Option<String>,
    /// Lifetime of the upload tokens handed out in ready answers.
    #[serde(default = "default_token_ttl")]
    pub upload_token_ttl: String,
}

fn default_token_ttl() -> String {
    "1h".into()
}

/// Command-line settings that override `receiver.yaml`.
#[derive(Debug, Default, Clone)]
pub struct ReceiverOverrides {
    pub listen: Option<String>,
    pub node_id: Option<String>,
    pub broker_url: Option<String>,
    pub broker_client_cert: Option<PathBuf>,
    pub broker_client_key: Option<PathBuf>,
    pub broker_ca_cert: Option<PathBuf>,
    pub data_url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverServerFile {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: PEM bundle of the CAs whose client certificates authenticate a publisher
    /// (needs `tls_cert`/`tls_key`). A client showing a certificate these CAs did not sign is
    /// refused in the handshake; one showing none must sign its requests.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Largest accepted request body (one object or one batch).
    #[serde(default = "default_body")]
    pub max_body_size: String,
    /// Space an announced payload must leave free on the storage's filesystem (besides 10 % of
    /// the payload); announcements that would eat into it get 507.
    #[serde(default = "default_min_free")]
    pub min_free_space: String,
}

impl Default for ReceiverServerFile {
    fn default() -> Self {
        ReceiverServerFile {
            listen: default_listen(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            max_body_size: default_body(),
            min_free_space: default_min_free(),
        }
    }
}

fn default_listen() -> String {
    ":9100".into()
}
fn default_body() -> String {
    "1GiB".into()
}
fn default_min_free() -> String {
    "1GiB".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverRepoFile {
    pub name: String,
    pub storage: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverAuthFile {
    /// Environment variable with the shared secret. It may be unset when `server.client_ca`
    /// is configured: then only publishers with a client certificate get in.
    #[serde(default = "default_secret_env")]
    pub secret_env: String,
    /// With mutual TLS: the certificate common names (CN) accepted; empty accepts any
    /// certificate that `server.client_ca` signed.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Signed requests older or newer than this are refused.
    #[serde(default = "default_window")]
    pub replay_window: String,
}

impl Default for ReceiverAuthFile {
    fn default() -> Self {
        ReceiverAuthFile {
            secret_env: default_secret_env(),
            allowed_clients: Vec::new(),
            replay_window: default_window(),
        }
    }
}

fn default_secret_env() -> String {
    "PREPUB_RECEIVER_SECRET".into()
}
fn default_window() -> String {
    "300s".into()
}

struct Metrics {
    registry: Registry,
    objects: IntCounter,
    bytes: IntCounter,
    packs: IntCounter,
    rejected: IntCounterVec,
    inventory: IntCounter,
    mqtt_announces: IntCounter,
    mqtt_ignored: IntCounterVec,
}

impl Metrics {
    fn new() -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        let objects = IntCounter::new("cvmfs_receiver_objects_received_total", "Objects stored")?;
        let bytes = IntCounter::new(
            "cvmfs_receiver_bytes_received_total",
            "Bytes of objects stored",
        )?;
        let packs = IntCounter::new(
            "cvmfs_receiver_packs_received_total",
            "Packs of objects stored (POST …/objects)",
        )?;
        registry.register(Box::new(packs.clone()))?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "cvmfs_receiver_rejected_total",
                "Requests or objects refused, by reason",
            ),
            &["reason"],
        )?;
        let inventory = IntCounter::new(
            "cvmfs_receiver_inventory_requests_total",
            "Inventory requests answered",
        )?;
        registry.register(Box::new(objects.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(inventory.clone()))?;
        let mqtt_announces = IntCounter::new(
            "cvmfs_receiver_mqtt_announces_total",
            "MQTT announcements received for this node's repositories",
        )?;
        let mqtt_ignored = IntCounterVec::new(
            Opts::new(
                "cvmfs_receiver_mqtt_ignored_total",
                "MQTT messages ignored, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(mqtt_announces.clone()))?;
        registry.register(Box::new(mqtt_ignored.clone()))?;
        Ok(Metrics {
            mqtt_announces,
            mqtt_ignored,
            registry,
            objects,
            packs,
            bytes,
            rejected,
            inventory,
        })
    }
}

struct State {
    receiver: Arc<Receiver>,
    agent: Addr<ReceiverAgent>,
    /// `None`: only client certificates authenticate.
    secret: Option<Vec<u8>>,
    allowed_clients: Vec<String>,
    window: i64,
    seen: Mutex<HashMap<String, i64>>,
    /// `server.max_body_size`, in bytes.
    max_body: usize,
    metrics: Metrics,
    roots: HashMap<String, PathBuf>,
    min_free: u64,
    /// Space promised to accepted announcements and not yet filled by uploads.
    reserved: Mutex<Reservations>,
    /// Upload tokens handed out in MQTT ready answers.
    tokens: prepub_core::receiver::UploadTokens,
    /// Recent answers to announcements, by (publisher, payload, repository): a repeated
    /// announcement (the publisher repeats them while any endpoint is silent) gets the same
    /// answer and token without another inventory pass; the same payload name for another
    /// repository is a different question (its objects are looked up in that store).
    answers: Mutex<HashMap<AnswerKey, (prepub_core::control::Ready, std::time::Instant)>>,
}

/// Space held for announced payloads, so two announcements at the same moment cannot both be
/// granted the same free bytes. A payload's reservation shrinks as objects are stored and
/// lapses after [`Reservations::HOLD`]; re-announcing a payload replaces its reservation (a
/// publisher announces `bytes: 0` when it is done, releasing the rest — over HTTP also when it
/// was granted over MQTT). A reservation is for one repository: the same payload name for
/// another repository is another reservation, never a replacement. All repositories count
/// against each other (their storages usually share one filesystem).
#[derive(Default)]
struct Reservations {
    /// (repository, payload) -> (bytes still expected, expiry)
    held: Vec<(ReservationKey, u64, std::time::Instant)>,
}

/// Repository and payload.
type ReservationKey = (String, String);

impl Reservations {
    const HOLD: Duration = Duration::from_secs(30 * 60);

    fn prune(&mut self) {
        let now = std::time::Instant::now();
        self.held.retain(|(_, b, t)| *b > 0 && *t > now);
    }

    /// Bytes reserved for announcements other than `key`.
    fn others(&mut self, key: &ReservationKey) -> u64 {
        self.prune();
        self.held
            .iter()
            .filter(|(k, _, _)| k != key)
            .map(|(_, b, _)| *b)
            .sum()
    }

    fn reserve(&mut self, key: ReservationKey, bytes: u64) {
        self.held.retain(|(k, _, _)| *k != key);
        self.held
            .push((key, bytes, std::time::Instant::now() + Self::HOLD));
    }

    /// `bytes` were stored: the oldest reservations are that much closer to filled.
    fn filled(&mut self, mut bytes: u64) {
        for (_, b, _) in self.held.iter_mut() {
            let take = bytes.min(*b);
            *b -= take;
            bytes -= take;
            if bytes == 0 {
                break;
            }
        }
        self.prune();
    }
}

fn err(status: actix_web::http::StatusCode, code: &str, msg: impl ToString) -> HttpResponse {
    HttpResponse::build(status).json(json!({"error": {"code": code, "message": msg.to_string()}}))
}

/// What the credentials of a request say before its body is read.
enum Credentials {
    /// An upload token or an allowed client certificate: accepted.
    Accepted,
    /// A signed request whose signature (over the body digest it declares) checked out; the
    /// body must still match that digest.
    Signed { digest: [u8; 32] },
}

/// Checks what a request for `repo` can show before its body is read (a request without
/// acceptable credentials is refused without reading a byte of its body).
fn credentials(
    st: &State,
    req: &HttpRequest,
    repo: &str,
) -> Result<Credentials, Box<HttpResponse>> {
    use actix_web::http::StatusCode;
    let unauthorized = |m: &str| {
        st.metrics
            .rejected
            .with_label_values(&["unauthorized"])
            .inc();
        Box::new(err(StatusCode::UNAUTHORIZED, "unauthorized", m))
    };
    // An upload token from an MQTT ready answer, valid for this repository.
    if let Some(t) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        if st.tokens.check(repo, t.trim()) {
            return Ok(Credentials::Accepted);
        }
        return Err(unauthorized(
            "upload token unknown, expired, or for another repository",
        ));
    }
    // Mutual TLS: rustls already verified the chain against `server.client_ca`.
    if let Some(cc) = req.conn_data::<crate::server::ClientCert>() {
        if st.allowed_clients.is_empty() || st.allowed_clients.contains(&cc.0) {
            return Ok(Credentials::Accepted);
        }
        return Err(unauthorized(&format!(
            "client certificate '{}' is not in auth.allowed_clients",
            cc.0
        )));
    }
    let Some(secret) = &st.secret else {
        return Err(unauthorized("a client certificate is required"));
    };
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (Some(ts), Some(nonce), Some(auth), Some(digest_hex)) = (
        h("x-prepub-timestamp"),
        h("x-prepub-nonce"),
        h("authorization"),
        h(prepub_core::receiver::BODY_DIGEST_HEADER),
    ) else {
        return Err(unauthorized("signed request required (X-Prepub-Timestamp, X-Prepub-Nonce, X-Prepub-Content-Sha256, Authorization: PREPUB-HMAC)"));
    };
    if nonce.is_empty() || nonce.len() > 64 {
        return Err(unauthorized("bad nonce"));
    }
    let Ok(ts) = ts.parse::<i64>() else {
        return Err(unauthorized("bad timestamp"));
    };
    if (prepub_core::timefmt::now() - ts).abs() > st.window {
        return Err(unauthorized("timestamp outside the replay window"));
    }
    let Some(sig) = auth.strip_prefix("PREPUB-HMAC ") else {
        return Err(unauthorized("unsupported authorization scheme"));
    };
    let mut digest = [0u8; 32];
    if hex::decode_to_slice(&digest_hex, &mut digest).is_err() {
        return Err(unauthorized(
            "X-Prepub-Content-Sha256 is not 64 hex characters",
        ));
    }
    // The signature covers the declared digest (as lowercase hex, whatever case the header
    // used): checked before a byte of the body is read.
    if !prepub_core::receiver::verify_digest(
        secret,
        req.method().as_str(),
        req.path(),
        &hex::encode(digest),
        ts,
        &nonce,
        sig,
    ) {
        return Err(unauthorized("bad signature"));
    }
    let now = prepub_core::timefmt::now();
    let mut seen = st.seen.lock().unwrap_or_else(|e| e.into_inner());
    seen.retain(|_, t| (now - *t).abs() <= st.window);
    if seen.insert(nonce, ts).is_some() {
        return Err(unauthorized("replayed request"));
    }
    Ok(Credentials::Signed { digest })
}

/// Reads the body of a request whose credentials passed [`credentials`], up to `max_body`
/// bytes; a signed request's body must match the digest its signature covered.
async fn authorized_body(
    st: &State,
    req: &HttpRequest,
    repo: &str,
    mut payload: web::Payload,
    limit: BodyLimit,
) -> Result<web::Bytes, HttpResponse> {
    use actix_web::http::StatusCode;
    use futures_util::StreamExt;
    let creds = credentials(st, req, repo).map_err(|r| *r)?;
    let (max_body, what) = match limit {
        BodyLimit::Configured => (st.max_body, "server.max_body_size"),
        BodyLimit::Inventory => (
            st.max_body.min(prepub_core::receiver::INVENTORY_BODY_MAX),
            "the limit of an inventory request",
        ),
    };
    let too_large = || {
        st.metrics.rejected.with_label_values(&["too-large"]).inc();
        err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("the body exceeds {what} ({max_body} bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(too_large());
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0));
    let mut hasher = match creds {
        Credentials::Signed { digest } => Some((sha2::Sha256::new(), digest)),
        Credentials::Accepted => None,
    };
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| err(StatusCode::BAD_REQUEST, "bad-request", e))?;
        if body.len() + chunk.len() > max_body {
            return Err(too_large());
        }
        if let Some((h, _)) = hasher.as_mut() {
            h.update(&chunk);
        }
        body.extend_from_slice(&chunk);
    }
    if let Some((h, digest)) = hasher {
        if h.finalize().as_slice() != digest {
            st.metrics
                .rejected
                .with_label_values(&["unauthorized"])
                .inc();
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the body does not match its signed X-Prepub-Content-Sha256",
            ));
        }
    }
    Ok(body.freeze())
}

/// How large a signed request's body may be.
#[derive(Clone, Copy)]
enum BodyLimit {
    /// `server.max_body_size`.
    Configured,
    /// An inventory's: at most [`prepub_core::receiver::INVENTORY_BODY_MAX`].
    Inventory,
}

fn receive_error(st: &State, e: ReceiveError) -> HttpResponse {
    use actix_web::http::StatusCode;
    let (status, code) = match &e {
        ReceiveError::UnknownRepo(_) => (StatusCode::NOT_FOUND, "unknown-repository"),
        ReceiveError::Catalog => (StatusCode::FORBIDDEN, "catalog-refused"),
        ReceiveError::Tampered { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "hash-mismatch"),
        ReceiveError::Cas(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage-error"),
    };
    st.metrics.rejected.with_label_values(&[code]).inc();
    err(status, code, e)
}

type Shared = web::Data<Arc<State>>;

/// The receiver's API.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/v1/health", web::get().to(health))
        .route("/api/v1/metrics", web::get().to(metrics))
        .route("/api/v1/repos/{repo}/announce", web::post().to(announce))
        .route("/api/v1/repos/{repo}/inventory", web::post().to(inventory))
        .route("/api/v1/repos/{repo}/objects", web::post().to(put_batch))
        .route(
            "/api/v1/repos/{repo}/objects/{name}",
            web::put().to(put_object),
        );
}

/// Free bytes of the filesystem holding `path` (statvfs).
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// Room for `bytes` of payload plus 10 % and `server.min_free_space` for the replica itself,
/// besides what other accepted payloads still hold; reserved when there is.
fn reserve_space(st: &State, repo: &str, payload: &str, bytes: u64) -> Result<(), String> {
    let Some(free) = st.roots.get(repo).and_then(|r| free_bytes(r)) else {
        return Ok(());
    };
    let key = (repo.to_string(), payload.to_string());
    let mut reserved = st.reserved.lock().unwrap_or_else(|e| e.into_inner());
    let others = reserved.others(&key);
    let need = bytes
        .saturating_add(bytes / 10)
        .saturating_add(st.min_free)
        .saturating_add(others);
    if free < need {
        return Err(format!(
            "payload {payload} needs {need} bytes ({others} held for other payloads), {free} are free"
        ));
    }
    reserved.reserve(key, bytes);
    Ok(())
}

/// Whether `bytes` more can be written for `repo` and still leave `server.min_free_space`
/// free (announcements reserve ahead; this holds for every write, announced or not).
fn room_to_write(st: &State, repo: &str, bytes: u64) -> Option<HttpResponse> {
    let free = st.roots.get(repo).and_then(|r| free_bytes(r))?;
    let need = bytes.saturating_add(st.min_free);
    if free >= need {
        return None;
    }
    st.metrics.rejected.with_label_values(&["disk-full"]).inc();
    Some(err(
        actix_web::http::StatusCode::INSUFFICIENT_STORAGE,
        "insufficient-storage",
        format!(
            "{bytes} bytes would leave less than server.min_free_space ({}) of {free} free",
            st.min_free
        ),
    ))
}

/// Publisher, payload and repository of an announcement.
type AnswerKey = (String, String, String);

/// The answer to an MQTT announcement: space reserved, absent objects listed, a token issued.
fn answer_announce(
    st: &State,
    node_id: &str,
    data_url: &str,
    token_ttl: Duration,
    a: &prepub_core::control::Announce,
) -> prepub_core::control::Ready {
    let key = (a.publisher_id.clone(), a.payload_id.clone(), a.repo.clone());
    {
        let mut cache = st.answers.lock().unwrap_or_else(|e| e.into_inner());
        // Half the token's life: a repeated answer still leaves the publisher time to push.
        cache.retain(|_, (_, at)| at.elapsed() < token_ttl / 2);
        if let Some((r, _)) = cache.get(&key) {
            return r.clone();
        }
    }
    let ready = compute_answer(st, node_id, data_url, token_ttl, a);
    // Refusals (e.g. no space) are not cached: the next announcement asks again.
    if ready.error.is_none() {
        st.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (ready.clone(), std::time::Instant::now()));
    }
    ready
}

fn compute_answer(
    st: &State,
    node_id: &str,
    data_url: &str,
    token_ttl: Duration,
    a: &prepub_core::control::Announce,
) -> prepub_core::control::Ready {
    let mut ready = prepub_core::control::Ready {
        node_id: node_id.to_string(),
        payload_id: a.payload_id.clone(),
        data_url: data_url.to_string(),
        upload_token: None,
        absent: None,
        error: None,
    };
    if st.receiver.store(&a.repo).is_err() {
        ready.error = Some(format!("repository {} is not served here", a.repo));
        return ready;
    }
    if let Err(msg) = reserve_space(st, &a.repo, &a.payload_id, a.bytes) {
        st.metrics.rejected.with_label_values(&["disk-full"]).inc();
        ready.error = Some(format!("insufficient storage: {msg}"));
        return ready;
    }
    if let Some(list) = &a.objects {
        let ids = match prepub_core::control::parse_objects(list) {
            Ok(i) => i,
            Err(e) => {
                ready.error = Some(e.to_string());
                return ready;
            }
        };
        st.metrics.inventory.inc();
        match st.receiver.missing(&a.repo, &ids) {
            Ok(m) => ready.absent = Some(m.iter().map(|i| i.to_string()).collect()),
            Err(e) => {
                ready.error = Some(e.to_string());
                return ready;
            }
        }
    }
    ready.upload_token = Some(st.tokens.issue(&a.repo, token_ttl));
    ready
}

#[derive(Deserialize)]
struct Announce {
    payload_id: String,
    objects: u64,
    bytes: u64,
}

async fn announce(
    req: HttpRequest,
    repo: web::Path<String>,
    payload: web::Payload,
    st: Shared,
) -> HttpResponse {
    let body = match authorized_body(&st, &req, &repo, payload, BodyLimit::Configured).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let a: Announce = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return err(actix_web::http::StatusCode::BAD_REQUEST, "bad-request", e),
    };
    if st.receiver.store(&repo).is_err() {
        return receive_error(&st, ReceiveError::UnknownRepo(repo.to_string()));
    }
    if let Err(msg) = reserve_space(&st, &repo, &a.payload_id, a.bytes) {
        st.metrics.rejected.with_label_values(&["disk-full"]).inc();
        return err(
            actix_web::http::StatusCode::INSUFFICIENT_STORAGE,
            "insufficient-storage",
            msg,
        );
    }
    HttpResponse::Ok()
        .json(json!({"accepted": true, "payload_id": a.payload_id, "objects": a.objects}))
}

async fn inventory(
    req: HttpRequest,
    repo: web::Path<String>,
    payload: web::Payload,
    st: Shared,
) -> HttpResponse {
    let body = match authorized_body(&st, &req, &repo, payload, BodyLimit::Inventory).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ids = match prepub_core::receiver::parse_inventory(&body) {
        Ok(ids) => ids,
        Err(e) => return err(actix_web::http::StatusCode::BAD_REQUEST, "bad-request", e),
    };
    st.metrics.inventory.inc();
    let repo = repo.into_inner();
    match st.agent.send(Missing { repo, ids }).await {
        Ok(Ok(m)) => HttpResponse::Ok()
            .json(json!({"missing": m.iter().map(|i| i.to_string()).collect::<Vec<_>>()})),
        Ok(Err(e)) => receive_error(&st, e),
        Err(e) => err(
            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e,
        ),
    }
}

async fn put_object(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    st: Shared,
) -> HttpResponse {
    let body = match authorized_body(&st, &req, &path.0, payload, BodyLimit::Configured).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (repo, name) = path.into_inner();
    let Ok(id) = ObjectId::parse(&name) else {
        return err(
            actix_web::http::StatusCode::BAD_REQUEST,
            "bad-request",
            format!("'{name}' is not an object name"),
        );
    };
    let len = body.len();
    if let Some(r) = room_to_write(&st, &repo, len as u64) {
        return r;
    }
    let put = Put {
        repo,
        body,
        objects: vec![(id, 0..len)],
    };
    match st.agent.send(put).await {
        Ok(Ok((stored, bytes))) => {
            if stored == 1 {
                st.metrics.objects.inc();
                st.metrics.bytes.inc_by(bytes);
                st.reserved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .filled(bytes);
                HttpResponse::Created().json(json!({"stored": true}))
            } else {
                HttpResponse::Ok().json(json!({"stored": false}))
            }
        }
        Ok(Err(e)) => receive_error(&st, e),
        Err(e) => err(
            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e,
        ),
    }
}

async fn put_batch(
    req: HttpRequest,
    repo: web::Path<String>,
    payload: web::Payload,
    st: Shared,
) -> HttpResponse {
    let body = match authorized_body(&st, &req, &repo, payload, BodyLimit::Configured).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (Some(size), Some(digest)) = (
        h("x-pack-header-size").and_then(|s| s.parse::<usize>().ok()),
        h("x-pack-digest"),
    ) else {
        return err(
            actix_web::http::StatusCode::BAD_REQUEST,
            "bad-request",
            "X-Pack-Header-Size and X-Pack-Digest are required",
        );
    };
    let objects = match prepub_core::gateway::parse_pack(&body, size, &digest) {
        Ok(o) => o,
        Err(prepub_core::gateway::PackError::ObjectHash(id)) => {
            st.metrics
                .rejected
                .with_label_values(&["hash-mismatch"])
                .inc();
            return err(
                actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                "hash-mismatch",
                format!("object {id} does not match its name"),
            );
        }
        Err(e) => return err(actix_web::http::StatusCode::BAD_REQUEST, "bad-pack", e),
    };
    if objects
        .iter()
        .any(|(id, _)| id.suffix == prepub_core::hash::Suffix::Catalog)
    {
        return receive_error(&st, ReceiveError::Catalog);
    }
    if let Some(r) = room_to_write(&st, &repo, body.len() as u64) {
        return r;
    }
    let repo = repo.into_inner();
    match st
        .agent
        .send(Put {
            repo,
            body,
            objects,
        })
        .await
    {
        Ok(Ok((n, b))) => {
            st.metrics.packs.inc();
            st.metrics.objects.inc_by(n);
            st.metrics.bytes.inc_by(b);
            st.reserved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .filled(b);
            HttpResponse::Ok().json(json!({"stored": n}))
        }
        Ok(Err(e)) => receive_error(&st, e),
        Err(e) => err(
            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e,
        ),
    }
}

async fn health(st: Shared) -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "repositories": st.receiver.repos()}))
}

async fn metrics(st: Shared) -> HttpResponse {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&st.metrics.registry.gather())
        .unwrap_or_default();
    HttpResponse::Ok()
        .insert_header(("Content-Type", "text/plain; version=0.0.4"))
        .body(text)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The MQTT side of a receiver, checked and ready to connect.
struct MqttPlan {
    link: prepub_actors::mqtt_link::LinkSettings,
    node_id: String,
    repos: Vec<String>,
    data_url: String,
    token_ttl: Duration,
}

fn mqtt_plan(
    file: &ReceiverFile,
    o: &ReceiverOverrides,
    listen: std::net::SocketAddr,
) -> anyhow::Result<Option<MqttPlan>> {
    use anyhow::Context;
    let Some(url) = o.broker_url.clone().or(file.broker_url.clone()) else {
        return Ok(None);
    };
    prepub_actors::mqtt_link::parse_broker_url(&url)
        .map_err(|m| anyhow::anyhow!("broker_url: {m}"))?;
    let need = |o: &Option<PathBuf>, f: &Option<PathBuf>, key: &str| -> anyhow::Result<Vec<u8>> {
        let p = o.clone().or(f.clone()).with_context(|| {
            format!("{key}: required with broker_url (the broker takes mutual TLS only)")
        })?;
        std::fs::read(&p).with_context(|| format!("{key} {}", p.display()))
    };
    let cert_pem = need(
        &o.broker_client_cert,
        &file.broker_client_cert,
        "broker_client_cert",
    )?;
    let key_pem = need(
        &o.broker_client_key,
        &file.broker_client_key,
        "broker_client_key",
    )?;
    let ca_pem = need(&o.broker_ca_cert, &file.broker_ca_cert, "broker_ca_cert")?;
    let node_id = o
        .node_id
        .clone()
        .or(file.node_id.clone())
        .unwrap_or_else(host_name);
    if !prepub_core::control::valid_segment(&node_id) {
        anyhow::bail!("node_id: '{node_id}' cannot be an MQTT topic segment (A-Z a-z 0-9 . _ -)");
    }
    let cn = prepub_core::keys::pem_common_name(&cert_pem)
        .context("broker_client_cert: no certificate with a CN")?;
    if cn != node_id {
        anyhow::bail!(
            "node_id '{node_id}' differs from the CN '{cn}' of broker_client_cert: the broker knows nodes by their certificate CN"
        );
    }
    let served: Vec<String> = file.repositories.iter().map(|r| r.name.clone()).collect();
    let repos = file.repos.clone().unwrap_or_else(|| served.clone());
    for r in &repos {
        if !served.contains(r) {
            anyhow::bail!("repos: {r} is not in repositories (no storage for it)");
        }
    }
    let data_url = match o.data_url.clone().or(file.data_url.clone()) {
        Some(u) => u,
        None => format!(
            "{}://{}:{}",
            if file.server.tls_cert.is_some() {
                "https"
            } else {
                "http"
            },
            host_name(),
            listen.port()
        ),
    };
    if !(data_url.starts_with("http://") || data_url.starts_with("https://")) {
        anyhow::bail!("data_url: '{data_url}' is not an http(s) URL");
    }
    let token_ttl = parse_duration(&file.upload_token_ttl)
        .map_err(|m| anyhow::anyhow!("upload_token_ttl: {m}"))?;
    Ok(Some(MqttPlan {
        link: prepub_actors::mqtt_link::LinkSettings {
            url,
            client_id: format!("cvmfs-prepub-receiver-{node_id}"),
            ca_pem,
            cert_pem,
            key_pem,
            keep_alive: Duration::from_secs(30),
            last_will: None,
            max_packet: prepub_core::control::MAX_LIST_MESSAGE + 4096,
        },
        node_id,
        repos,
        data_url: data_url.trim_end_matches('/').to_string(),
        token_ttl,
    }))
}

/// Runs the receiver until it is stopped.
pub fn run(file: ReceiverFile, o: ReceiverOverrides) -> anyhow::Result<()> {
    use anyhow::Context;
    let log = crate::server::logging::logger(false);
    let secret = std::env::var(&file.auth.secret_env)
        .ok()
        .filter(|s| !s.is_empty());
    if file.server.client_ca.is_some() && file.server.tls_cert.is_none() {
        anyhow::bail!("server.client_ca: mutual TLS needs server.tls_cert and server.tls_key");
    }
    let window = parse_duration(&file.auth.replay_window)
        .map_err(|m| anyhow::anyhow!("auth.replay_window: {m}"))?;
    let listen =
        crate::config::parse_listen(&o.listen.clone().unwrap_or(file.server.listen.clone()))
            .map_err(|m| anyhow::anyhow!("server.listen: {m}"))?;
    let max_body = crate::units::parse_size(&file.server.max_body_size)
        .map_err(|m| anyhow::anyhow!("server.max_body_size: {m}"))?;
    let min_free = crate::units::parse_size(&file.server.min_free_space)
        .map_err(|m| anyhow::anyhow!("server.min_free_space: {m}"))?;
    if file.cas.kind != "localfs" {
        anyhow::bail!(
            "cas.type: receivers keep a local storage in this version ('{}')",
            file.cas.kind
        );
    }
    if file.repositories.is_empty() {
        anyhow::bail!("repositories: at least one repository is needed");
    }
    let plan = mqtt_plan(&file, &o, listen)?;
    if secret.is_none() && file.server.client_ca.is_none() && plan.is_none() {
        anyhow::bail!(
            "auth.secret_env: {} is not set, server.client_ca is not configured and there is no broker_url: nobody could push",
            file.auth.secret_env
        );
    }
    let rmetrics = Metrics::new()?;
    // With MQTT, presence goes up first (bloom_ready: false) and announcements are taken once
    // the inventory filters are built.
    let state_slot: Arc<std::sync::OnceLock<Arc<State>>> = Arc::default();
    let mqtt = match &plan {
        None => None,
        Some(p) => {
            let (slot, node, url, ttl) = (
                state_slot.clone(),
                p.node_id.clone(),
                p.data_url.clone(),
                p.token_ttl,
            );
            let answer: Arc<
                dyn Fn(&prepub_core::control::Announce) -> prepub_core::control::Ready
                    + Send
                    + Sync,
            > = Arc::new(move |a| match slot.get() {
                Some(st) => answer_announce(st, &node, &url, ttl, a),
                None => prepub_core::control::Ready {
                    node_id: node.clone(),
                    payload_id: a.payload_id.clone(),
                    data_url: url.clone(),
                    upload_token: None,
                    absent: None,
                    error: Some("starting up".into()),
                },
            });
            let m = crate::receiver_mqtt::ReceiverMqtt::start(
                p.link.clone(),
                p.node_id.clone(),
                p.repos.clone(),
                p.data_url.clone(),
                answer,
                crate::receiver_mqtt::MqttMetrics {
                    announces: rmetrics.mqtt_announces.clone(),
                    ignored: rmetrics.mqtt_ignored.clone(),
                },
                log.clone(),
            )
            .map_err(|e| anyhow::anyhow!("broker_url: {e}"))?;
            slog::info!(log, "MQTT control plane"; "node_id" => &p.node_id, "data_url" => &p.data_url, "repos" => p.repos.join(","));
            Some(m)
        }
    };
    let mut stores: Vec<(String, Arc<dyn Cas>)> = Vec::new();
    let mut roots = HashMap::new();
    for r in &file.repositories {
        let root = r
            .storage
            .clone()
            .unwrap_or_else(|| file.cas.root.join(&r.name));
        let cas = LocalCas::create(&root).with_context(|| format!("storage of {}", r.name))?;
        stores.push((r.name.clone(), Arc::new(cas)));
        roots.insert(r.name.clone(), root);
    }
    let receiver = Arc::new(Receiver::new(stores).context("building the inventory filters")?);
    let tls = match (&file.server.tls_cert, &file.server.tls_key) {
        (Some(c), Some(k)) => Some(crate::server::tls_config_with_clients(
            c,
            k,
            file.server.client_ca.as_deref(),
        )?),
        (None, None) => None,
        _ => anyhow::bail!("server.tls_cert and server.tls_key must be set together"),
    };
    let result = actix_rt::System::new().block_on(async move {
        // Eight storage threads: enough to overlap the fsyncs of concurrent uploads.
        let agent = ReceiverAgent::start(receiver.clone(), 8);
        let state = Arc::new(State {
            receiver,
            agent,
            secret: secret.map(String::into_bytes),
            allowed_clients: file.auth.allowed_clients.clone(),
            window: window.as_secs() as i64,
            max_body: max_body as usize,
            seen: Mutex::new(HashMap::new()),
            metrics: rmetrics,
            roots,
            min_free,
            reserved: Mutex::new(Reservations::default()),
            tokens: Default::default(),
            answers: Mutex::new(HashMap::new()),
        });
        let _ = state_slot.set(state.clone());
        let data = web::Data::new(state);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(max_body as usize))
                // Also under `/cvmfs`: endpoints are commonly written `https://s1:9100/cvmfs`
                // (the install guide's form), and the sender keeps the endpoint's path.
                .service(web::scope("/cvmfs").configure(routes))
                .configure(routes)
        })
        .on_connect(crate::server::client_cert_on_connect)
        .shutdown_timeout(10)
        .keep_alive(Duration::from_secs(30));
        let server = match tls {
            Some(t) => server.bind_rustls_0_23(listen, t)?,
            None => server.bind(listen)?,
        };
        let running = server.run();
        if let Some(m) = &mqtt {
            m.set_bloom_ready();
        }
        running.await?;
        Ok::<_, anyhow::Error>(mqtt)
    });
    // Stopped (SIGTERM/SIGINT): leave the broker with presence online: false.
    match result {
        Ok(Some(m)) => {
            m.shutdown();
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(repo: &str, payload: &str) -> ReservationKey {
        (repo.into(), payload.into())
    }

    #[test]
    fn the_same_payload_name_for_another_repository_is_another_reservation() {
        let mut r = Reservations::default();
        r.reserve(key("a.org", "nightly"), 100);
        r.reserve(key("b.org", "nightly"), 50);
        assert_eq!(r.others(&key("a.org", "nightly")), 50);
        assert_eq!(r.others(&key("b.org", "nightly")), 100);
        assert_eq!(r.others(&key("c.org", "x")), 150);
        // Announced again for its repository: replaced, here released.
        r.reserve(key("a.org", "nightly"), 0);
        assert_eq!(r.others(&key("c.org", "x")), 50);
    }
}
