//! One MQTT connection over mutual TLS (rumqttc on rustls), kept alive on its own thread:
//! reconnects with capped exponential backoff, and reports every (re)connection so the owner
//! can subscribe and publish its retained state again (a restarted broker without persistence
//! remembers neither). Used by the publisher's `MqttBridge` and by receivers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

pub use rumqttc::{Client, QoS, SubscribeFilter};
use rumqttc::{Event, LastWill, MqttOptions, Packet, TlsConfiguration, Transport};

/// How to reach the broker and who we are.
#[derive(Clone)]
pub struct LinkSettings {
    /// `tls://host:port` (or `mqtts://`, `ssl://`); port 8883 when omitted.
    pub url: String,
    pub client_id: String,
    /// PEM: the CA that signs the broker's certificate, our certificate (chain) and key.
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub keep_alive: Duration,
    /// Retained message the broker publishes for us when we vanish: (topic, body).
    pub last_will: Option<(String, Vec<u8>)>,
    /// Largest packet accepted or sent.
    pub max_packet: usize,
}

impl std::fmt::Debug for LinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSettings")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// What the connection thread reports.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// (Re)connected; `session_present` tells whether the broker kept our session.
    Connected { session_present: bool },
    /// Lost or could not make the connection; it is retried after a backoff.
    Disconnected(String),
    /// A message on one of our subscriptions.
    Message { topic: String, body: Vec<u8> },
}

/// Splits a broker URL into host and port; only TLS schemes are accepted.
pub fn parse_broker_url(url: &str) -> Result<(String, u16), String> {
    let rest = ["tls://", "mqtts://", "ssl://"]
        .iter()
        .find_map(|p| url.strip_prefix(p))
        .ok_or_else(|| format!("'{url}': the broker must be reached over TLS (tls://host:port)"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("'{url}': bad port '{p}'"))?,
        ),
        _ => (rest, 8883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err(format!("'{url}': no host"));
    }
    Ok((host.to_string(), port))
}

/// The rustls client configuration: trust only `ca_pem`, show `cert_pem`/`key_pem`.
fn tls_config(s: &LinkSettings) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut s.ca_pem.as_slice()) {
        let c = c.map_err(|e| format!("CA certificate: {e}"))?;
        roots.add(c).map_err(|e| format!("CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("CA certificate: none found".into());
    }
    let chain = rustls_pemfile::certs(&mut s.cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("client certificate: {e}"))?;
    if chain.is_empty() {
        return Err("client certificate: none found".into());
    }
    let key = rustls_pemfile::private_key(&mut s.key_pem.as_slice())
        .map_err(|e| format!("client key: {e}"))?
        .ok_or("client key: no private key found")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate/key: {e}"))
}

/// A running connection; dropping it (or [`Link::stop`]) ends the thread.
pub struct Link {
    pub client: Client,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Link {
    /// Connects in the background; `on_event` runs on the connection thread for every event
    /// and must not block for long (hand heavy work to another thread; publish with
    /// `try_publish` there).
    pub fn start(
        s: &LinkSettings,
        mut on_event: impl FnMut(&Client, LinkEvent) + Send + 'static,
    ) -> Result<Link, String> {
        let (host, port) = parse_broker_url(&s.url)?;
        let tls = tls_config(s)?;
        let mut opts = MqttOptions::new(s.client_id.clone(), host, port);
        opts.set_keep_alive(s.keep_alive)
            // A persistent session: QoS 1 messages for us are kept while we reconnect.
            .set_clean_session(false)
            .set_max_packet_size(s.max_packet, s.max_packet)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        if let Some((topic, body)) = &s.last_will {
            opts.set_last_will(LastWill::new(
                topic.clone(),
                body.clone(),
                QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, mut connection) = Client::new(opts, 1024);
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, stop2) = (client.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("mqtt-link".into())
            .spawn(move || {
                let mut backoff = Duration::from_millis(200);
                for ev in connection.iter() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match ev {
                        Ok(Event::Incoming(Packet::ConnAck(a))) => {
                            backoff = Duration::from_millis(200);
                            on_event(
                                &c2,
                                LinkEvent::Connected {
                                    session_present: a.session_present,
                                },
                            );
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => on_event(
                            &c2,
                            LinkEvent::Message {
                                topic: p.topic,
                                body: p.payload.to_vec(),
                            },
                        ),
                        Ok(_) => {}
                        Err(e) => {
                            if stop2.load(Ordering::SeqCst) {
                                break;
                            }
                            on_event(&c2, LinkEvent::Disconnected(e.to_string()));
                            thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Link {
            client,
            stop,
            thread: Some(thread),
        })
    }

    /// Publishes `body` retained (QoS 1), then disconnects cleanly (no last will) and waits for
    /// the connection thread, at most `wait`.
    pub fn stop(mut self, farewell: Option<(String, Vec<u8>)>, wait: Duration) {
        if let Some((topic, body)) = farewell {
            let _ = self.client.try_publish(topic, QoS::AtLeastOnce, true, body);
        }
        // Give the farewell a moment to leave before the DISCONNECT.
        thread::sleep(Duration::from_millis(200));
        let _ = self.client.try_disconnect();
        let deadline = std::time::Instant::now() + wait;
        while let Some(t) = &self.thread {
            if t.is_finished() || std::time::Instant::now() > deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.client.try_disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_must_be_tls() {
        assert_eq!(
            parse_broker_url("tls://broker.cern.ch:8883").unwrap(),
            ("broker.cern.ch".into(), 8883)
        );
        assert_eq!(
            parse_broker_url("mqtts://127.0.0.1:18883").unwrap(),
            ("127.0.0.1".into(), 18883)
        );
        assert_eq!(
            parse_broker_url("tls://broker").unwrap(),
            ("broker".into(), 8883)
        );
        assert_eq!(
            parse_broker_url("tls://[::1]:9000").unwrap(),
            ("::1".into(), 9000)
        );
        assert!(parse_broker_url("tcp://broker:1883")
            .unwrap_err()
            .contains("over TLS"));
        assert!(parse_broker_url("broker:8883").is_err());
        assert!(parse_broker_url("tls://broker:x").is_err());
        assert!(parse_broker_url("tls://:8883").is_err());
    }
}
