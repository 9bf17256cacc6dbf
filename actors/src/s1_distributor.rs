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
use prepub_core::hash::{ObjectId, Suffix};
use prepub_core::intake::ChangeSet;

/// Settings shared by all distributors.
#[derive(Debug, Clone)]
pub struct DistributionSettings {
    pub quorum: f64,
    pub timeout: Duration,
    pub commit_anyway: bool,
    pub per_s1_concurrency: usize,
    pub secret: String,
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
}

/// What one endpoint achieved for one job.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Distributed {
    pub job_id: String,
    pub endpoint: String,
    /// `(objects pushed, bytes pushed, objects already there)`, or why it failed.
    pub outcome: Result<(u64, u64, u64), String>,
}

pub struct S1Distributor {
    endpoint: String,
    settings: Arc<DistributionSettings>,
    http: reqwest::blocking::Client,
}

impl S1Distributor {
    pub fn new(
        endpoint: &str,
        settings: Arc<DistributionSettings>,
    ) -> Result<S1Distributor, String> {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| e.to_string())?;
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

fn nonce() -> String {
    let mut b = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    hex::encode(b)
}

struct Pusher {
    base: String,
    secret: Vec<u8>,
    http: reqwest::blocking::Client,
}

impl Pusher {
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::blocking::Response, String> {
        let ts = prepub_core::timefmt::now();
        let n = nonce();
        let sig = prepub_core::receiver::sign(&self.secret, method, path, &body, ts, &n);
        let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        self.http
            .request(m, format!("{}{path}", self.base))
            .header("X-Prepub-Timestamp", ts.to_string())
            .header("X-Prepub-Nonce", n)
            .header("Authorization", format!("PREPUB-HMAC {sig}"))
            .body(body)
            .send()
            .map_err(|e| e.to_string())
    }

    fn ok(&self, method: &str, path: &str, body: Vec<u8>) -> Result<serde_json::Value, String> {
        let r = self.send(method, path, body)?;
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().unwrap_or_default();
        if !(200..300).contains(&status) {
            let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
            return Err(format!("HTTP {status}: {msg}"));
        }
        Ok(v)
    }
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
) -> Result<(u64, u64, u64), String> {
    let data = std::fs::read(&m.changeset).map_err(|e| format!("spool: {e}"))?;
    let cs: ChangeSet = serde_json::from_slice(&data).map_err(|e| format!("spool: {e}"))?;
    let objects = data_objects(&cs);
    let payload = Payload {
        id: &m.job_id,
        repo: &m.repo,
        objects: &objects,
        bytes: cs.stats.new_bytes,
        cas: m.cas.clone(),
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
}

/// Announces `payload` to the receiver at `endpoint`, asks which objects it lacks and pushes
/// those; returns `(objects pushed, bytes pushed, objects already there)`. Blocking.
pub fn push_objects(
    endpoint: &str,
    settings: &DistributionSettings,
    http: reqwest::blocking::Client,
    payload: &Payload,
) -> Result<(u64, u64, u64), String> {
    let deadline = Instant::now() + settings.timeout;
    let objects = payload.objects;
    let p = Arc::new(Pusher {
        base: endpoint.trim_end_matches('/').to_string(),
        secret: settings.secret.as_bytes().to_vec(),
        http,
    });
    let repo = payload.repo;
    p.ok(
        "POST",
        &format!("/api/v1/repos/{repo}/announce"),
        serde_json::to_vec(&serde_json::json!({"payload_id": payload.id, "objects": objects.len(), "bytes": payload.bytes}))
            .unwrap_or_default(),
    )?;
    let mut missing: Vec<ObjectId> = Vec::new();
    for batch in objects.chunks(5000) {
        let body = serde_json::to_vec(&serde_json::json!({"objects": batch.iter().map(|i| i.to_string()).collect::<Vec<_>>()})).unwrap_or_default();
        let v = p.ok("POST", &format!("/api/v1/repos/{repo}/inventory"), body)?;
        for s in v["missing"].as_array().cloned().unwrap_or_default() {
            if let Some(id) = s.as_str().and_then(|s| ObjectId::parse(s).ok()) {
                missing.push(id);
            }
        }
    }
    let present = (objects.len() - missing.len()) as u64;
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
                s.spawn(move || -> Result<(u64, u64), String> {
                    let (mut n, mut bytes) = (0u64, 0u64);
                    while let Ok(id) = rx.recv() {
                        if Instant::now() > deadline {
                            return Err("timed out".into());
                        }
                        let body = get_all(cas.as_ref(), &id).map_err(|e| e.to_string())?;
                        let len = body.len() as u64;
                        let path = format!("/api/v1/repos/{repo}/objects/{id}");
                        let mut last = String::new();
                        let mut done = false;
                        // Up to ~6 s of retries: a receiver restarting is back by then.
                        for attempt in 0..6u32 {
                            match p.ok("PUT", &path, body.clone()) {
                                Ok(_) => {
                                    done = true;
                                    break;
                                }
                                Err(e) => {
                                    last = e;
                                    thread::sleep(Duration::from_millis(
                                        (100u64 << attempt).min(2000),
                                    ));
                                }
                            }
                        }
                        if !done {
                            return Err(format!("object {id}: {last}"));
                        }
                        n += 1;
                        bytes += len;
                    }
                    Ok((n, bytes))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("pusher panicked".into())))
            .collect()
    });
    let (mut n, mut bytes) = (0, 0);
    for r in results {
        let (a, b) = r?;
        n += a;
        bytes += b;
    }
    Ok((n, bytes, present))
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
