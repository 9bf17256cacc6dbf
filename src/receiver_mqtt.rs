//! The receiver's side of the MQTT control plane (install guide §6.2): a persistent session
//! with the broker, a retained presence (`online`, `bloom_ready`, repositories, data URL,
//! version) whose last will says `online: false`, announcements of its repositories answered
//! with a ready message (data URL, upload token, absent objects — or why it cannot take the
//! payload). Only the signalling goes through the broker; objects still arrive over HTTP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prepub_actors::mqtt_link::{Link, LinkEvent, LinkSettings, QoS};
use prepub_core::control::{self, Announce, Presence, Ready};
use prometheus::{IntCounter, IntCounterVec};

/// Announcements waiting for an answer beyond this are refused (the publisher repeats them).
const QUEUE: usize = 64;

pub struct ReceiverMqtt {
    link: Link,
    node_id: String,
    base: Presence,
    bloom_ready: Arc<AtomicBool>,
    repos: Vec<String>,
}

/// Counters of the control plane.
#[derive(Clone)]
pub struct MqttMetrics {
    pub announces: IntCounter,
    pub ignored: IntCounterVec,
}

fn presence_body(base: &Presence, online: bool, bloom_ready: bool) -> Vec<u8> {
    let mut p = base.clone();
    p.online = online;
    p.bloom_ready = bloom_ready;
    serde_json::to_vec(&p).unwrap_or_default()
}

fn subscribe(client: &prepub_actors::mqtt_link::Client, repos: &[String]) {
    let _ = client.try_subscribe_many(repos.iter().map(|r| {
        prepub_actors::mqtt_link::SubscribeFilter::new(control::announce_topic(r), QoS::AtLeastOnce)
    }));
}

impl ReceiverMqtt {
    /// Connects; announcements are subscribed to once [`ReceiverMqtt::set_bloom_ready`] says the
    /// inventory can answer. `answer` computes the ready message (on a worker thread).
    pub fn start(
        link: LinkSettings,
        node_id: String,
        repos: Vec<String>,
        data_url: String,
        answer: Arc<dyn Fn(&Announce) -> Ready + Send + Sync>,
        metrics: MqttMetrics,
        log: slog::Logger,
    ) -> Result<ReceiverMqtt, String> {
        let base = Presence {
            node_id: node_id.clone(),
            online: true,
            bloom_ready: false,
            repos: repos.clone(),
            data_url,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let mut link = link;
        link.last_will = Some((
            control::presence_topic(&node_id),
            presence_body(&base, false, false),
        ));
        let bloom_ready = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::bounded::<Announce>(QUEUE);
        let (b2, base2, repos2, node2, log2, m2) = (
            bloom_ready.clone(),
            base.clone(),
            repos.clone(),
            node_id.clone(),
            log.clone(),
            metrics.clone(),
        );
        let link = Link::start(&link, move |client, ev| match ev {
            LinkEvent::Connected { session_present } => {
                slog::info!(log2, "connected to the MQTT broker"; "node_id" => &node2, "session_present" => session_present);
                let ready = b2.load(Ordering::SeqCst);
                let _ = client.try_publish(
                    control::presence_topic(&node2),
                    QoS::AtLeastOnce,
                    true,
                    presence_body(&base2, true, ready),
                );
                if ready {
                    subscribe(client, &repos2);
                }
            }
            LinkEvent::Disconnected(e) => {
                slog::warn!(log2, "MQTT broker connection lost, reconnecting"; "error" => %e);
            }
            LinkEvent::Message { topic, body } => {
                let a = match control::parse_announce(&topic, &body) {
                    Ok(a) => a,
                    Err(e) => {
                        m2.ignored.with_label_values(&[e.label()]).inc();
                        slog::warn!(log2, "MQTT message ignored"; "topic" => &topic, "reason" => %e);
                        return;
                    }
                };
                if !repos2.contains(&a.repo) {
                    m2.ignored.with_label_values(&["topic"]).inc();
                    return;
                }
                m2.announces.inc();
                if tx.try_send(a).is_err() {
                    m2.ignored.with_label_values(&["busy"]).inc();
                }
            }
        })?;
        // Answers are computed off the connection thread (inventory work can take a while).
        for i in 0..2 {
            let (rx, client, node, answer, log) = (
                rx.clone(),
                link.client.clone(),
                node_id.clone(),
                answer.clone(),
                log.clone(),
            );
            std::thread::Builder::new()
                .name(format!("mqtt-answer-{i}"))
                .spawn(move || {
                    while let Ok(a) = rx.recv() {
                        let ready = answer(&a);
                        slog::info!(log, "announcement answered"; "payload_id" => &a.payload_id, "publisher_id" => &a.publisher_id,
                            "absent" => ready.absent.as_ref().map(|v| v.len()), "error" => ready.error.as_deref());
                        let body = serde_json::to_vec(&ready).unwrap_or_default();
                        let topic = control::ready_topic(&a.publisher_id, &a.payload_id, &node);
                        if client.publish(topic, QoS::AtLeastOnce, false, body).is_err() {
                            break; // the link is gone
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        Ok(ReceiverMqtt {
            link,
            node_id,
            base,
            bloom_ready,
            repos,
        })
    }

    /// The inventory filter is built: say so and start taking announcements.
    pub fn set_bloom_ready(&self) {
        self.bloom_ready.store(true, Ordering::SeqCst);
        let _ = self.link.client.try_publish(
            control::presence_topic(&self.node_id),
            QoS::AtLeastOnce,
            true,
            presence_body(&self.base, true, true),
        );
        subscribe(&self.link.client, &self.repos);
    }

    /// Leaves cleanly: retained presence `online: false`, then disconnect.
    pub fn shutdown(self) {
        let body = presence_body(&self.base, false, false);
        self.link.stop(
            Some((control::presence_topic(&self.node_id), body)),
            Duration::from_secs(3),
        );
    }
}
