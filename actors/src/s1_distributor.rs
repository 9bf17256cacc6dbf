//! `S1Distributor`: one per Stratum 1 endpoint, pushing a job's new data objects to that
//! endpoint's receiver before the commit (install guide §6, Option B).
//!
//! For each job: announce the payload, ask the receiver which of the job's data objects it lacks
//! (inventory), and push only those, `per_s1_concurrency` requests in flight, each request signed
//! (see `prepub_core::receiver`) and retried with backoff. Only data objects (whole files and `P`
//! chunks) are ever pushed: a catalog on a Stratum 1 ahead of replication would make it skip the
//! subtree. The outcome goes back to the job manager, which applies the quorum.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use actix::prelude::*;
use crossbeam_channel::unbounded;
use prepub_core::cas::{get_all, Cas};
use prepub_core::gateway::PackBuilder;
use prepub_core::hash::{ObjectId, Suffix};
use prepub_core::intake::ChangeSet;
use prepub_core::spool::AckLog;

/// Object names per inventory request (a receiver takes at most
/// [`prepub_core::receiver::INVENTORY_MAX`]).
const INVENTORY_BATCH: usize = 5000;

/// Objects smaller than this are pushed together, in packs (`POST …/objects`, the gateway's
/// `V2` format) of at most [`PACK_OBJECTS`] objects and about [`PACK_BYTES`]; the receiver
/// verifies and stores a pack's objects as one batch. Pushed one request each, every object
/// cost a signed request and, on the receiver, an fsync of the object and of its directory.
const PACK_OBJECT_MAX: usize = 1 << 20;
const PACK_OBJECTS: usize = 128;
const PACK_BYTES: usize = 4 << 20;
const _: () = assert!(INVENTORY_BATCH <= prepub_core::receiver::INVENTORY_MAX);

/// Settings shared by all distributors.
#[derive(Debug, Clone)]
pub struct DistributionSettings {
    pub quorum: f64,
    pub timeout: Duration,
    pub commit_anyway: bool,
    pub per_s1_concurrency: usize,
    /// Shared secret signing each request (HMAC); `None` when the receivers know the publisher
    /// by its client certificate alone.
    pub secret: Option<String>,
    /// Client certificate chain and key (PEM, concatenated) shown to receivers: mutual TLS.
    pub identity_pem: Option<Vec<u8>>,
    /// CA certificates (PEM) that sign the receivers' server certificates; when set, they
    /// replace the system roots for these connections.
    pub ca_pem: Option<Vec<u8>>,
}

impl DistributionSettings {
    /// The blocking HTTP client for receivers, with the client certificate and trusted CAs.
    /// Make it outside any async runtime.
    pub fn http_client(&self) -> Result<reqwest::blocking::Client, String> {
        let mut b = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120));
        if let Some(pem) = &self.identity_pem {
            let id =
                reqwest::Identity::from_pem(pem).map_err(|e| format!("client certificate: {e}"))?;
            b = b.identity(id);
        }
        if let Some(pem) = &self.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("CA certificates: {e}"))?;
            if certs.is_empty() {
                return Err("CA certificates: none found".into());
            }
            b = b.tls_certs_only(certs);
        }
        b.build().map_err(|e| e.to_string())
    }
}

/// Push a job's objects to this endpoint.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Distribute {
    pub job_id: String,
    pub repo: String,
    pub changeset: PathBuf,
    pub cas: Arc<dyn Cas>,
    pub done: Recipient<Distributed>,
    pub progress: Recipient<DistributionProgress>,
    /// From the MQTT control plane: the receiver already answered the announcement.
    pub grant: Option<crate::mqtt_bridge::ReadyGrant>,
}

/// What one endpoint achieved for one job.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Distributed {
    pub job_id: String,
    pub endpoint: String,
    pub outcome: Result<PushReport, String>,
}

/// How far one endpoint is with one job (sent at most twice a second while pushing).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct DistributionProgress {
    pub job_id: String,
    pub endpoint: String,
    /// Objects the endpoint holds so far (pushed, present, or acknowledged before).
    pub done: u64,
    pub total: u64,
    pub bytes: u64,
}

/// The result of pre-warming one endpoint with one payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Objects uploaded now, and their bytes.
    pub pushed: u64,
    pub bytes: u64,
    /// Objects the receiver's inventory said it already had.
    pub present: u64,
    /// Objects acknowledged before a publisher restart (from the job's acknowledgement log),
    /// neither asked about nor sent again.
    pub resumed: u64,
}

impl std::fmt::Display for PushReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} objects ({} bytes) pushed, {} already present",
            self.pushed, self.bytes, self.present
        )?;
        if self.resumed > 0 {
            write!(f, ", {} acknowledged before a restart", self.resumed)?;
        }
        Ok(())
    }
}

pub struct S1Distributor {
    endpoint: String,
    settings: Arc<DistributionSettings>,
    http: reqwest::blocking::Client,
}

impl S1Distributor {
    /// Makes the HTTP client, so call it outside the async runtime.
    pub fn new(
        endpoint: &str,
        settings: Arc<DistributionSettings>,
    ) -> Result<S1Distributor, String> {
        let http = settings.http_client()?;
        Ok(S1Distributor {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            settings,
            http,
        })
    }
}

impl Actor for S1Distributor {
    type Context = Context<Self>;
}

/// A fresh request nonce; None when the system's random source cannot be read (a fixed one
/// would be refused by the receiver as a replay).
fn nonce() -> Option<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .ok()?;
    Some(hex::encode(b))
}

struct Pusher {
    base: String,
    secret: Option<Vec<u8>>,
    /// Upload token from an MQTT ready answer (used instead of signing).
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl Pusher {
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> Result<reqwest::blocking::Response, String> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let url = format!("{}{path}", self.base);
        // Signed as the receiver sees it: with the endpoint's own path (`https://s1:9100/cvmfs`
        // sends `/cvmfs/api/v1/…`).
        let signed_path = reqwest::Url::parse(&url)
            .map(|u| u.path().to_string())
            .unwrap_or_else(|_| path.to_string());
        let mut r = self.http.request(m, url);
        for (name, value) in headers {
            r = r.header(*name, value);
        }
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        } else if let Some(secret) = &self.secret {
            let ts = prepub_core::timefmt::now();
            let n = nonce().ok_or("the system's random source (/dev/urandom) cannot be read")?;
            let digest = prepub_core::receiver::body_digest(&body);
            let sig =
                prepub_core::receiver::sign_digest(secret, method, &signed_path, &digest, ts, &n);
            r = r
                .header("X-Prepub-Timestamp", ts.to_string())
                .header("X-Prepub-Nonce", n)
                .header(prepub_core::receiver::BODY_DIGEST_HEADER, digest)
                .header("Authorization", format!("PREPUB-HMAC {sig}"));
        }
        // Keep the cause chain: a refused TLS handshake says why.
        r.body(body).send().map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                src = c.source();
            }
            msg
        })
    }

    /// [`ok`](Self::ok) with up to ~6 s of retries when the receiver is unreachable or
    /// answers 5xx/429 (a receiver restarting is back by then); a refusal is final.
    fn ok_retrying(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<serde_json::Value, String> {
        self.ok_retrying_with(method, path, body, &[])
    }

    /// [`ok_retrying`](Self::ok_retrying) with `headers` added to the request.
    fn ok_retrying_with(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, String)],
    ) -> Result<serde_json::Value, String> {
        let mut last = String::new();
        for attempt in 0..6u32 {
            match self.answer(method, path, body.to_vec(), headers) {
                Ok(v) => return Ok(v),
                Err((status, e)) => {
                    if status.is_some_and(|s| s < 500 && s != 429) {
                        return Err(e);
                    }
                    last = e;
                }
            }
            thread::sleep(Duration::from_millis((100u64 << attempt).min(2000)));
        }
        Err(last)
    }

    fn ok(&self, method: &str, path: &str, body: Vec<u8>) -> Result<serde_json::Value, String> {
        self.answer(method, path, body, &[]).map_err(|(_, e)| e)
    }

    /// The JSON of a 2xx answer; otherwise the status (none when there was no answer) and why.
    fn answer(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> Result<serde_json::Value, (Option<u16>, String)> {
        let r = self
            .send(method, path, body, headers)
            .map_err(|e| (None, e))?;
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().unwrap_or_default();
        if !(200..300).contains(&status) {
            let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
            return Err((Some(status), format!("HTTP {status}: {msg}")));
        }
        Ok(v)
    }
}

/// The objects an inventory answer (`{"missing": [...]}`) says the receiver lacks. Anything
/// else (an answer that is not that JSON — a proxy's page, a cut-off body — or a name that does
/// not parse) is an error: read as "nothing missing" it would count every object as held.
fn missing_in(v: &serde_json::Value) -> Result<std::collections::HashSet<ObjectId>, String> {
    let unreadable = || {
        let mut text = v.to_string();
        text.truncate(200);
        format!("unreadable inventory answer: {text}")
    };
    v["missing"]
        .as_array()
        .ok_or_else(unreadable)?
        .iter()
        .map(|s| s.as_str().and_then(|s| ObjectId::parse(s).ok()))
        .collect::<Option<_>>()
        .ok_or_else(unreadable)
}

/// The data objects a change set references (whole files and chunks; never catalogs).
pub fn data_objects(cs: &ChangeSet) -> Vec<ObjectId> {
    let mut v: Vec<ObjectId> = Vec::new();
    for n in cs.nodes.values() {
        if let Some(h) = n.entry.hash {
            v.push(ObjectId::new(h, Suffix::None));
        }
        v.extend(n.entry.chunks.iter().map(|c| c.id));
    }
    v.sort();
    v.dedup();
    v
}

fn push(
    endpoint: &str,
    settings: &DistributionSettings,
    http: reqwest::blocking::Client,
    m: &Distribute,
) -> Result<PushReport, String> {
    // Only the object list and the byte count are needed while the push runs.
    let (objects, new_bytes) = {
        let cs = prepub_core::spool::read_changeset(&m.changeset).map_err(|e| e.to_string())?;
        (data_objects(&cs), cs.stats.new_bytes)
    };
    let job_dir = m.changeset.parent().unwrap_or(std::path::Path::new("."));
    let (job_id, ep, rcpt) = (m.job_id.clone(), endpoint.to_string(), m.progress.clone());
    let progress = move |done, total, bytes| {
        rcpt.do_send(DistributionProgress {
            job_id: job_id.clone(),
            endpoint: ep.clone(),
            done,
            total,
            bytes,
        })
    };
    let payload = Payload {
        id: &m.job_id,
        repo: &m.repo,
        objects: &objects,
        bytes: new_bytes,
        cas: m.cas.clone(),
        ack_log: Some(AckLog::path(job_dir, endpoint)),
        progress: Some(&progress),
        grant: m.grant.as_ref(),
    };
    push_objects(endpoint, settings, http, &payload)
}

/// One payload to pre-warm: data objects held in `cas`, announced as `bytes` of new data.
pub struct Payload<'a> {
    pub id: &'a str,
    pub repo: &'a str,
    pub objects: &'a [ObjectId],
    pub bytes: u64,
    pub cas: Arc<dyn Cas>,
    /// Where this endpoint's acknowledgements are journaled (and read back on a resume).
    pub ack_log: Option<PathBuf>,
    /// Called with (objects held, objects in total, bytes pushed), at most twice a second.
    pub progress: Option<&'a (dyn Fn(u64, u64, u64) + Sync)>,
    /// The receiver's MQTT ready answer: no HTTP announcement, its token instead of signing,
    /// and its list of absent objects instead of the inventory (when it sent one).
    pub grant: Option<&'a crate::mqtt_bridge::ReadyGrant>,
}

/// Announces `payload` to the receiver at `endpoint`, asks which objects it lacks and pushes
/// those, journaling every acknowledgement in the payload's log. Blocking.
pub fn push_objects(
    endpoint: &str,
    settings: &DistributionSettings,
    http: reqwest::blocking::Client,
    payload: &Payload,
) -> Result<PushReport, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let deadline = Instant::now() + settings.timeout;
    let (acks, acked) = match &payload.ack_log {
        Some(p) => {
            let (log, seen) = AckLog::open(p).map_err(|e| e.to_string())?;
            (Some(log), seen)
        }
        None => (None, Default::default()),
    };
    let total = payload.objects.len() as u64;
    let objects: Vec<ObjectId> = payload
        .objects
        .iter()
        .filter(|id| !acked.contains(id))
        .copied()
        .collect();
    let resumed = total - objects.len() as u64;
    let p = Arc::new(Pusher {
        base: endpoint.trim_end_matches('/').to_string(),
        secret: settings.secret.as_ref().map(|s| s.as_bytes().to_vec()),
        token: payload.grant.map(|g| g.token.clone()),
        http,
    });
    let repo = payload.repo;
    if payload.grant.is_none() {
        p.ok_retrying(
            "POST",
            &format!("/api/v1/repos/{repo}/announce"),
            &serde_json::to_vec(&serde_json::json!({"payload_id": payload.id, "objects": total, "bytes": payload.bytes}))
                .unwrap_or_default(),
        )?;
    }
    let mut missing: Vec<ObjectId> = Vec::new();
    let told = payload.grant.and_then(|g| g.absent.as_ref());
    if let Some(absent) = told {
        // The ready answer listed what the receiver lacks; only announced objects count.
        let absent: std::collections::HashSet<&ObjectId> = absent.iter().collect();
        let (lacking, there): (Vec<ObjectId>, Vec<ObjectId>) =
            objects.iter().partition(|id| absent.contains(id));
        if let Some(log) = &acks {
            log.append(&there).map_err(|e| e.to_string())?;
        }
        missing = lacking;
    }
    for batch in objects.chunks(INVENTORY_BATCH).filter(|_| told.is_none()) {
        let body = serde_json::to_vec(&serde_json::json!({"objects": batch.iter().map(|i| i.to_string()).collect::<Vec<_>>()})).unwrap_or_default();
        let v = p.ok_retrying("POST", &format!("/api/v1/repos/{repo}/inventory"), &body)?;
        let lacks = missing_in(&v)?;
        let (absent, there): (Vec<ObjectId>, Vec<ObjectId>) =
            batch.iter().partition(|id| lacks.contains(id));
        if let Some(log) = &acks {
            log.append(&there).map_err(|e| e.to_string())?;
        }
        missing.extend(absent);
    }
    let present = (objects.len() - missing.len()) as u64;
    let held = AtomicU64::new(resumed + present);
    let sent_bytes = AtomicU64::new(0);
    let last_report = std::sync::Mutex::new(None::<Instant>);
    let report = |force: bool| {
        if let Some(f) = payload.progress {
            let mut last = last_report.lock().unwrap_or_else(|e| e.into_inner());
            if force || last.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
                *last = Some(Instant::now());
                f(
                    held.load(Ordering::Relaxed),
                    total,
                    sent_bytes.load(Ordering::Relaxed),
                );
            }
        }
    };
    report(true);
    let (tx, rx) = unbounded::<ObjectId>();
    for id in &missing {
        let _ = tx.send(*id);
    }
    drop(tx);
    let results: Vec<Result<(u64, u64), String>> = thread::scope(|s| {
        let hs: Vec<_> = (0..settings.per_s1_concurrency.max(1))
            .map(|_| {
                let rx = rx.clone();
                let p = p.clone();
                let cas = payload.cas.clone();
                let (acks, held, sent_bytes, report) = (&acks, &held, &sent_bytes, &report);
                s.spawn(move || -> Result<(u64, u64), String> {
                    let (mut n, mut bytes) = (0u64, 0u64);
                    // Read ahead of a pack it did not fit (a large object, sent on its own).
                    let mut next: Option<(ObjectId, Vec<u8>)> = None;
                    loop {
                        let first = match next.take() {
                            Some(o) => o,
                            None => match rx.recv() {
                                Ok(id) => {
                                    let body =
                                        get_all(cas.as_ref(), &id).map_err(|e| e.to_string())?;
                                    (id, body)
                                }
                                Err(_) => break,
                            },
                        };
                        if Instant::now() > deadline {
                            return Err("timed out".into());
                        }
                        // Small objects go together, as one pack, while more are queued.
                        let mut batch = vec![first];
                        let mut size = batch[0].1.len();
                        while batch[0].1.len() < PACK_OBJECT_MAX
                            && batch.len() < PACK_OBJECTS
                            && size < PACK_BYTES
                        {
                            let Ok(id) = rx.try_recv() else { break };
                            let body = get_all(cas.as_ref(), &id).map_err(|e| e.to_string())?;
                            if body.len() >= PACK_OBJECT_MAX {
                                next = Some((id, body));
                                break;
                            }
                            size += body.len();
                            batch.push((id, body));
                        }
                        let ids: Vec<ObjectId> = batch.iter().map(|(id, _)| *id).collect();
                        if let [(id, body)] = &batch[..] {
                            let path = format!("/api/v1/repos/{repo}/objects/{id}");
                            p.ok_retrying("PUT", &path, body)
                                .map_err(|e| format!("object {id}: {e}"))?;
                        } else {
                            let mut pack = PackBuilder::new();
                            for (id, body) in &batch {
                                pack.add(*id, body.len());
                            }
                            let h = pack.header();
                            let headers = [
                                ("X-Pack-Header-Size", h.header.len().to_string()),
                                ("X-Pack-Digest", h.digest),
                            ];
                            let mut body = h.header;
                            body.reserve(size);
                            for (_, b) in &batch {
                                body.extend_from_slice(b);
                            }
                            p.ok_retrying_with(
                                "POST",
                                &format!("/api/v1/repos/{repo}/objects"),
                                &body,
                                &headers,
                            )
                            .map_err(|e| {
                                format!("a pack of {} objects from {}: {e}", ids.len(), ids[0])
                            })?;
                        }
                        if let Some(log) = acks {
                            log.append(&ids).map_err(|e| e.to_string())?;
                        }
                        crate::testhook::point("distribution-ack");
                        n += ids.len() as u64;
                        bytes += size as u64;
                        held.fetch_add(ids.len() as u64, Ordering::Relaxed);
                        sent_bytes.fetch_add(size as u64, Ordering::Relaxed);
                        report(false);
                    }
                    Ok((n, bytes))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("pusher panicked".into())))
            .collect()
    });
    report(true);
    // Release what the receiver reserved for this payload (best effort: reservations lapse).
    let _ = p.ok(
        "POST",
        &format!("/api/v1/repos/{repo}/announce"),
        serde_json::to_vec(
            &serde_json::json!({"payload_id": payload.id, "objects": 0, "bytes": 0}),
        )
        .unwrap_or_default(),
    );
    let mut r = PushReport {
        present,
        resumed,
        ..Default::default()
    };
    for x in results {
        let (a, b) = x?;
        r.pushed += a;
        r.bytes += b;
    }
    Ok(r)
}

impl Handler<Distribute> for S1Distributor {
    type Result = ();
    fn handle(&mut self, m: Distribute, _: &mut Context<Self>) {
        let endpoint = self.endpoint.clone();
        let settings = self.settings.clone();
        let http = self.http.clone();
        let _ = thread::Builder::new()
            .name("s1-push".into())
            .spawn(move || {
                let outcome = push(&endpoint, &settings, http, &m);
                m.done.do_send(Distributed {
                    job_id: m.job_id.clone(),
                    endpoint,
                    outcome,
                });
            });
    }
}
