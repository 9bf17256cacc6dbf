//! `MqttBridge`: the publisher's side of the MQTT control plane (install guide §6.2).
//!
//! Instead of announcing a payload to each receiver over HTTP, the bridge publishes one
//! announcement on `cvmfs/repos/<repo>/announce` and collects the receivers' ready answers on
//! `cvmfs/publishers/<us>/ready/<payload>/<node>`. Each valid answer goes to the job manager,
//! which hands the endpoint to its `S1Distributor` to push exactly the absent objects over HTTP
//! with the answer's upload token. Answers are checked (size, schema, node named in the body =
//! node in the topic, data URL = a configured endpoint, that endpoint bound to that node) and
//! anything else is ignored and counted. Announcements still unanswered are published again on
//! every reconnection and every few seconds, so a broker restart or outage loses no job.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use prepub_core::control::{self, Announce, Reject};
use prepub_core::hash::ObjectId;
use slog::{info, warn, Logger};

use crate::metrics::Metrics;
use crate::mqtt_link::{Link, LinkEvent, LinkSettings, QoS};

/// One configured Stratum 1 endpoint, optionally bound to the node (certificate CN) that must
/// answer for it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub node_id: Option<String>,
}

/// What the bridge needs.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    pub link: LinkSettings,
    /// Our identity: the CN of our client certificate (the broker's user name for us).
    pub publisher_id: String,
    pub endpoints: Vec<Endpoint>,
}

/// Announce a job's payload and report each endpoint's answer to `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AnnouncePayload {
    pub job_id: String,
    pub repo: String,
    pub changeset: PathBuf,
    pub reply: Recipient<EndpointReady>,
}

/// The job no longer waits for answers.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Forget {
    pub job_id: String,
}

/// What one endpoint's receiver answered.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct EndpointReady {
    pub job_id: String,
    pub endpoint: String,
    pub node_id: String,
    /// The upload grant, or why the receiver cannot take the payload.
    pub grant: Result<ReadyGrant, String>,
}

/// Permission to push one payload to one receiver.
#[derive(Debug, Clone)]
pub struct ReadyGrant {
    pub token: String,
    /// The announced objects the receiver lacks; `None`: ask its inventory.
    pub absent: Option<Vec<ObjectId>>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Incoming(LinkEvent);

struct Pending {
    repo: String,
    body: Vec<u8>,
    answered: HashSet<String>,
    reply: Recipient<EndpointReady>,
}

pub struct MqttBridge {
    settings: BridgeSettings,
    link: Link,
    events: Option<crossbeam_channel::Receiver<LinkEvent>>,
    pending: HashMap<String, Pending>,
    /// Jobs whose announcement is being built (see [`AnnounceBuilt`]).
    building: HashSet<String>,
    /// endpoint URL -> the node bound to it (configured, or the first to answer for it).
    bound: HashMap<String, String>,
    connected: bool,
    metrics: Arc<Metrics>,
    log: Logger,
}

fn norm(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

impl MqttBridge {
    /// Connects in the background (call outside the async runtime: it makes the MQTT client).
    pub fn connect(
        settings: BridgeSettings,
        metrics: Arc<Metrics>,
        log: Logger,
    ) -> Result<MqttBridge, String> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let link = Link::start(&settings.link, move |_, ev| {
            let _ = tx.send(ev);
        })?;
        let bound = settings
            .endpoints
            .iter()
            .filter_map(|e| Some((norm(&e.url), e.node_id.clone()?)))
            .collect();
        Ok(MqttBridge {
            settings,
            link,
            events: Some(rx),
            pending: HashMap::new(),
            building: HashSet::new(),
            bound,
            connected: false,
            metrics,
            log,
        })
    }

    fn ignore(&self, r: &str, why: impl std::fmt::Display) {
        self.metrics
            .mqtt_ignored_total
            .with_label_values(&[r])
            .inc();
        warn!(self.log, "MQTT message ignored"; "actor" => "MqttBridge", "reason" => r, "detail" => %why);
    }

    fn publish_announce(&self, job_id: &str) {
        let Some(p) = self.pending.get(job_id) else {
            return;
        };
        if !self.connected {
            return; // sent on (re)connection
        }
        match self.link.client.try_publish(
            control::announce_topic(&p.repo),
            QoS::AtLeastOnce,
            false,
            p.body.clone(),
        ) {
            Ok(()) => self
                .metrics
                .mqtt_messages_total
                .with_label_values(&["announce_sent"])
                .inc(),
            Err(e) => {
                warn!(self.log, "announce not queued, retried later"; "job_id" => job_id, "error" => %e)
            }
        }
    }

    fn on_message(&mut self, topic: &str, body: &[u8]) {
        let r = match control::parse_ready(&self.settings.publisher_id, topic, body) {
            Ok(r) => r,
            Err(e) => return self.ignore(e.label(), &e),
        };
        let endpoint = norm(&r.data_url);
        if !self
            .settings
            .endpoints
            .iter()
            .any(|e| norm(&e.url) == endpoint)
        {
            return self.ignore(
                "unknown-endpoint",
                format!(
                    "{} answered for {endpoint}, which is not configured",
                    r.node_id
                ),
            );
        }
        match self.bound.get(&endpoint) {
            Some(n) if *n != r.node_id => {
                return self.ignore(
                    "endpoint-claimed",
                    format!(
                        "{} answered for {endpoint}, which belongs to {n}",
                        r.node_id
                    ),
                )
            }
            Some(_) => {}
            None => {
                info!(self.log, "endpoint bound to node"; "actor" => "MqttBridge", "endpoint" => &endpoint, "node_id" => &r.node_id);
                self.bound.insert(endpoint.clone(), r.node_id.clone());
            }
        }
        let Some(p) = self.pending.get_mut(&r.payload_id) else {
            return self.ignore("unknown-payload", format!("payload {}", r.payload_id));
        };
        if !p.answered.insert(endpoint.clone()) {
            self.metrics
                .mqtt_ignored_total
                .with_label_values(&["duplicate"])
                .inc();
            return;
        }
        self.metrics
            .mqtt_messages_total
            .with_label_values(&["ready_received"])
            .inc();
        let grant = match (r.error, r.upload_token) {
            (Some(e), _) => Err(format!("{} refused the payload: {e}", r.node_id)),
            (None, Some(token)) => {
                let absent = r
                    .absent
                    .as_deref()
                    .map(control::parse_objects)
                    .transpose()
                    .map_err(|e: Reject| e.to_string());
                absent.map(|absent| ReadyGrant { token, absent })
            }
            (None, None) => Err("no upload token".into()),
        };
        p.reply.do_send(EndpointReady {
            job_id: r.payload_id,
            endpoint,
            node_id: r.node_id,
            grant,
        });
    }
}

impl Actor for MqttBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(rx) = self.events.take() {
            let addr = ctx.address();
            let _ = std::thread::Builder::new()
                .name("mqtt-bridge-events".into())
                .spawn(move || {
                    while let Ok(ev) = rx.recv() {
                        if !addr.connected() {
                            break;
                        }
                        addr.do_send(Incoming(ev));
                    }
                });
        }
        // Unanswered announcements go out again: a lost message never stalls a job.
        ctx.run_interval(Duration::from_secs(5), |act, _| {
            let ids: Vec<String> = act
                .pending
                .iter()
                .filter(|(_, p)| p.answered.len() < act.settings.endpoints.len())
                .map(|(id, _)| id.clone())
                .collect();
            for id in ids {
                act.publish_announce(&id);
            }
        });
    }
}

impl Handler<Incoming> for MqttBridge {
    type Result = ();
    fn handle(&mut self, m: Incoming, _: &mut Context<Self>) {
        match m.0 {
            LinkEvent::Connected { session_present } => {
                self.connected = true;
                self.metrics.mqtt_connected.set(1);
                self.metrics
                    .mqtt_messages_total
                    .with_label_values(&["reconnect"])
                    .inc();
                info!(self.log, "connected to the MQTT broker"; "actor" => "MqttBridge", "session_present" => session_present);
                let _ = self.link.client.try_subscribe(
                    control::ready_filter(&self.settings.publisher_id),
                    QoS::AtLeastOnce,
                );
                let ids: Vec<String> = self.pending.keys().cloned().collect();
                for id in ids {
                    self.publish_announce(&id);
                }
            }
            LinkEvent::Disconnected(e) => {
                if self.connected {
                    warn!(self.log, "MQTT broker connection lost, reconnecting"; "actor" => "MqttBridge", "error" => %e);
                }
                self.connected = false;
                self.metrics.mqtt_connected.set(0);
            }
            LinkEvent::Message { topic, body } => self.on_message(&topic, &body),
        }
    }
}

impl Handler<AnnouncePayload> for MqttBridge {
    type Result = ();
    fn handle(&mut self, m: AnnouncePayload, ctx: &mut Context<Self>) {
        // Reading and parsing a change set takes a while for a large job: not on this actor's
        // thread, which also carries the broker connection's events.
        self.building.insert(m.job_id.clone());
        let (job_id, reply) = (m.job_id.clone(), m.reply.clone());
        let me = ctx.address();
        let publisher_id = self.settings.publisher_id.clone();
        let spawned = std::thread::Builder::new()
            .name("mqtt-announce".into())
            .spawn(move || {
                let body = announce_body(&m.changeset, &m.job_id, &m.repo, publisher_id);
                me.do_send(AnnounceBuilt { m, body });
            });
        if let Err(e) = spawned {
            self.building.remove(&job_id);
            self.refuse_all(
                &job_id,
                &reply,
                &format!("cannot build the announcement: {e}"),
            );
        }
    }
}

impl MqttBridge {
    /// Answers for every endpoint that the job's announcement failed.
    fn refuse_all(&self, job_id: &str, reply: &Recipient<EndpointReady>, msg: &str) {
        for ep in &self.settings.endpoints {
            reply.do_send(EndpointReady {
                job_id: job_id.to_string(),
                endpoint: norm(&ep.url),
                node_id: String::new(),
                grant: Err(msg.to_string()),
            });
        }
    }
}

/// The announcement of a job's data objects: the list, unless it makes the message too big
/// (receivers then answer without it, and the distributor asks their inventory over HTTP).
fn announce_body(
    changeset: &std::path::Path,
    job_id: &str,
    repo: &str,
    publisher_id: String,
) -> Result<Vec<u8>, String> {
    let cs = prepub_core::spool::read_changeset(changeset).map_err(|e| e.to_string())?;
    let objects = crate::s1_distributor::data_objects(&cs);
    let mut a = Announce {
        payload_id: job_id.to_string(),
        publisher_id,
        repo: repo.to_string(),
        object_count: objects.len() as u64,
        bytes: cs.stats.new_bytes,
        objects: (objects.len() <= control::MAX_OBJECTS)
            .then(|| objects.iter().map(|i| i.to_string()).collect()),
    };
    let mut body = serde_json::to_vec(&a).unwrap_or_default();
    if body.len() > control::MAX_LIST_MESSAGE {
        a.objects = None;
        body = serde_json::to_vec(&a).unwrap_or_default();
    }
    Ok(body)
}

/// An announcement built off the actor's thread.
#[derive(Message)]
#[rtype(result = "()")]
struct AnnounceBuilt {
    m: AnnouncePayload,
    body: Result<Vec<u8>, String>,
}

impl Handler<AnnounceBuilt> for MqttBridge {
    type Result = ();
    fn handle(&mut self, b: AnnounceBuilt, _: &mut Context<Self>) {
        let m = b.m;
        if !self.building.remove(&m.job_id) {
            return; // forgotten meanwhile: nobody waits for the answers
        }
        let body = match b.body {
            Ok(body) => body,
            Err(e) => return self.refuse_all(&m.job_id, &m.reply, &e),
        };
        self.pending.insert(
            m.job_id.clone(),
            Pending {
                repo: m.repo,
                body,
                answered: HashSet::new(),
                reply: m.reply,
            },
        );
        self.publish_announce(&m.job_id);
    }
}

impl Handler<Forget> for MqttBridge {
    type Result = ();
    fn handle(&mut self, m: Forget, _: &mut Context<Self>) {
        self.building.remove(&m.job_id);
        self.pending.remove(&m.job_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prepub_core::catalog::Entry;
    use prepub_core::hash::Digest20;
    use prepub_core::intake::{ChangeSet, Node};

    #[test]
    fn the_announcement_lists_the_change_sets_data_objects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changeset.json");
        let mut cs = ChangeSet::default();
        let h = "0123456789abcdef0123456789abcdef01234567";
        for (name, hash) in [("a", Some(h)), ("b", Some(h)), ("d", None)] {
            let mut entry = Entry::directory(name, 0o644, 0, 0, 0);
            entry.hash = hash.map(|x| Digest20::from_hex(x).unwrap());
            let node = Node {
                entry,
                hardlink_of: None,
                synthesized: false,
            };
            cs.nodes.insert(name.to_string(), node);
        }
        cs.stats.new_bytes = 42;
        std::fs::write(&path, serde_json::to_vec(&cs).unwrap()).unwrap();
        let body = announce_body(&path, "job-1", "r.example.org", "s0".into()).unwrap();
        let a: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(a["payload_id"], "job-1");
        assert_eq!(a["publisher_id"], "s0");
        assert_eq!(a["repo"], "r.example.org");
        assert_eq!(a["object_count"], 1, "one object, named twice");
        assert_eq!(a["bytes"], 42);
        assert_eq!(a["objects"], serde_json::json!([h]));
    }

    #[test]
    fn an_unreadable_change_set_fails_the_announcement() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("changeset.json");
        let e = announce_body(&missing, "job-1", "r", "s0".into()).unwrap_err();
        assert!(e.contains("changeset.json"), "{e}");
        std::fs::write(&missing, b"{not json").unwrap();
        assert!(announce_body(&missing, "job-1", "r", "s0".into()).is_err());
    }
}
