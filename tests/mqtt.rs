//! The MQTT control plane against a real Mosquitto broker (Debian package `mosquitto`), started
//! per test on a free loopback port with generated certificates, the shipped broker
//! configuration and the shipped ACL: presence, announce -> ready -> push -> quorum -> commit,
//! an absent receiver, a broker outage, refused certificates, ACL and forged answers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use prepub_actors::mqtt_link::{Link, LinkEvent, LinkSettings, QoS};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Certificates: `certs/` (the CA, the broker's, and clients `publisher`, `s1-a`, `s1-b`,
/// `s1-c`, `rogue`, `observer`) and `other-ca/` (a CA the broker does not trust, with its own
/// `publisher`).
fn make_certs(dir: &Path) -> PathBuf {
    let c = dir.join("certs");
    let o = dir.join("other-ca");
    let mut runs: Vec<(&Path, Vec<&str>)> = vec![
        (&c, vec!["ca"]),
        (&c, vec!["server", "broker", "127.0.0.1"]),
        (&o, vec!["ca"]),
        (&o, vec!["client", "publisher"]),
    ];
    for n in ["publisher", "s1-a", "s1-b", "s1-c", "rogue", "observer"] {
        runs.push((&c, vec!["client", n]));
    }
    for (d, args) in runs {
        let st = Command::new("bash")
            .arg(format!("{ROOT}/scripts/gen-certs.sh"))
            .arg(d)
            .args(&args)
            .env("CERT_KEY", "ec")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "gen-certs.sh {args:?}");
    }
    c
}

/// A Mosquitto broker run from the shipped configuration and ACL.
struct Broker {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
}

impl Broker {
    fn start(dir: &Path, certs: &Path) -> Broker {
        let port = free_port();
        let shipped =
            std::fs::read_to_string(format!("{ROOT}/config/mosquitto/mosquitto.conf")).unwrap();
        let mut conf = String::new();
        for line in shipped.lines() {
            let line = match line.split_whitespace().next() {
                Some("listener") => format!("listener {port} 127.0.0.1"),
                Some("certfile") => format!("certfile {}/broker.crt", certs.display()),
                Some("keyfile") => format!("keyfile {}/broker.key", certs.display()),
                Some("cafile") => format!("cafile {}/ca.crt", certs.display()),
                Some("acl_file") => format!("acl_file {ROOT}/config/mosquitto/acl"),
                // Each test's broker starts empty; a restart loses sessions and retained
                // messages, which is the harder case for the clients.
                Some("persistence") => "persistence false".into(),
                Some("persistence_location") => String::new(),
                _ => line.to_string(),
            };
            conf.push_str(&line);
            conf.push('\n');
        }
        if unsafe { libc::geteuid() } == 0 {
            // Mosquitto started as root would switch to its own user, who cannot read the keys.
            conf.push_str("user root\n");
        }
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let mut b = Broker {
            child: None,
            port,
            conf: path,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.conf.with_extension("log")).unwrap();
        // Debian installs it in /usr/sbin, which is not always on a user's PATH.
        let bin = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("mosquitto (Debian package) must be installed; .ci/run installs it");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("mosquitto did not start: {}", self.log());
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.conf.with_extension("log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test's own MQTT client with the certificate `name` from `certs`.
struct Probe {
    link: Link,
    events: mpsc::Receiver<LinkEvent>,
}

impl Probe {
    fn connect(b: &Broker, certs: &Path, name: &str, ca: &Path) -> Probe {
        let (tx, rx) = mpsc::channel();
        let link = Link::start(
            &LinkSettings {
                url: b.url(),
                client_id: format!("test-probe-{name}-{}", free_port()),
                ca_pem: std::fs::read(ca.join("ca.crt")).unwrap(),
                cert_pem: std::fs::read(certs.join(format!("{name}.crt"))).unwrap(),
                key_pem: std::fs::read(certs.join(format!("{name}.key"))).unwrap(),
                keep_alive: Duration::from_secs(30),
                last_will: None,
                max_packet: 1 << 20,
            },
            move |_, ev| {
                let _ = tx.send(ev);
            },
        )
        .unwrap();
        Probe { link, events: rx }
    }

    /// Waits for the connection; false if none was made within `secs`.
    fn connected(&self, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(LinkEvent::Connected { .. }) = self.events.recv_timeout(left) {
                return true;
            }
        }
        false
    }

    fn subscribe(&self, filter: &str) {
        self.link
            .client
            .subscribe(filter, QoS::AtLeastOnce)
            .unwrap();
    }

    fn publish(&self, topic: &str, body: &[u8], retain: bool) {
        self.link
            .client
            .publish(topic, QoS::AtLeastOnce, retain, body.to_vec())
            .unwrap();
    }

    /// The next message whose topic is `topic` and whose body satisfies `pred`, within `secs`.
    fn expect(
        &self,
        topic: &str,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(LinkEvent::Message { topic: t, body }) if t == topic => {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                        if pred(&v) {
                            return Some(v);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

/// A receiver on the control plane as node `node` (its certificate), no shared secret.
fn mqtt_receiver(dir: &Path, certs: &Path, b: &Broker, node: &str, env: &[(&str, &str)]) -> Rcv {
    let port = free_port();
    let c = certs.display();
    start_receiver(
        &dir.join(node),
        "",
        Some(port),
        env,
        &format!(
            "broker_url: {}\nbroker_client_cert: {c}/{node}.crt\nbroker_client_key: {c}/{node}.key\nbroker_ca_cert: {c}/ca.crt\nnode_id: {node}\ndata_url: http://127.0.0.1:{port}\n",
            b.url()
        ),
    )
}

/// Adds the MQTT distribution block; `eps` are (url, node) pairs.
fn with_mqtt_distribution(
    dir: &Path,
    certs: &Path,
    b: &Broker,
    eps: &[(String, &str)],
    quorum: f64,
    commit_anyway: bool,
    ready_wait: &str,
) {
    let cfg = dir.join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = match text.find("distribution:") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    let eps: Vec<String> = eps
        .iter()
        .map(|(u, n)| format!("    - {{url: \"{u}\", node_id: {n}}}\n"))
        .collect();
    let c = certs.display();
    std::fs::write(
        &cfg,
        format!(
            "{text}distribution:\n  stratum1_endpoints:\n{}  quorum: {quorum}\n  commit_anyway: {commit_anyway}\n  timeout: 60s\n  per_s1_concurrency: 4\n  broker_url: {}\n  broker_client_cert: {c}/publisher.crt\n  broker_client_key: {c}/publisher.key\n  broker_ca_cert: {c}/ca.crt\n  mqtt_quorum_timeout: {ready_wait}\n",
            eps.concat(),
            b.url()
        ),
    )
    .unwrap();
}

fn file(path: &str, data: Vec<u8>) -> Spec {
    Spec::File {
        path: Box::leak(path.to_string().into_boxed_str()),
        mode: 0o644,
        data,
        xattrs: vec![],
    }
}

/// `files` files unique to `tag` plus one shared by every tree.
fn tree(tag: &str, files: usize) -> Vec<Spec> {
    let mut v = vec![Spec::Dir("bin", 0o755)];
    for i in 0..files {
        v.push(file(
            &format!("bin/f{i}"),
            format!("{tag} file {i} ").repeat(200 + i).into_bytes(),
        ));
    }
    v.push(file(
        "share/common.txt",
        b"shared by every release ".repeat(500),
    ));
    v
}

fn submit(d: &Daemon, path: &str, specs: &[Spec]) -> String {
    let resp = d.submit_raw(ADMIN, path, &tar_bytes(specs), None);
    assert_eq!(resp.status(), 202);
    resp.json::<serde_json::Value>().unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every data object of the publisher's storage is on `r`, byte for byte; no catalogs.
fn assert_prewarmed(publisher_storage: &Path, r: &Rcv) {
    let cas = prepub_core::cas::LocalCas::open(publisher_storage).unwrap();
    for id in prepub_core::cas::Cas::list(&cas)
        .unwrap()
        .iter()
        .filter(|i| i.suffix.is_data())
    {
        let bytes = std::fs::read(r.storage.join(id.path()))
            .unwrap_or_else(|_| panic!("{} lacks {id}", r.url));
        assert_eq!(prepub_core::hash::Digest20::of(&bytes), id.digest);
    }
    let placed =
        prepub_core::cas::Cas::list(&prepub_core::cas::LocalCas::open(&r.storage).unwrap())
            .unwrap();
    assert!(placed.iter().all(|i| i.suffix.is_data()));
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn daemon_metrics(d: &Daemon) -> String {
    client()
        .get(format!("{}/api/v1/metrics", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .text()
        .unwrap()
}

#[test]
fn presence_is_retained_and_turns_offline_when_a_receiver_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let b = Broker::start(dir.path(), &certs);
    let mut r = mqtt_receiver(dir.path(), &certs, &b, "s1-a", &[]);
    let topic = "cvmfs/receivers/s1-a/presence";
    // A client that connects later still gets the retained presence.
    std::thread::sleep(Duration::from_millis(500));
    let obs = Probe::connect(&b, &certs, "observer", &certs);
    assert!(obs.connected(10));
    obs.subscribe("cvmfs/receivers/+/presence");
    let p = obs
        .expect(topic, 10, |v| {
            v["online"] == true && v["bloom_ready"] == true
        })
        .unwrap_or_else(|| panic!("no presence; broker log:\n{}", b.log()));
    assert_eq!(p["node_id"], "s1-a");
    assert_eq!(p["repos"], serde_json::json!([REPO]));
    assert_eq!(p["data_url"], r.url.as_str());
    assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    // SIGKILL: no goodbye; the broker publishes the last will.
    r.child.kill().unwrap();
    r.child.wait().unwrap();
    let gone = obs.expect(topic, 10, |v| v["online"] == false);
    assert!(gone.is_some(), "no online:false after the kill");
    // And keeps it retained for newcomers.
    let late = Probe::connect(&b, &certs, "observer", &certs);
    assert!(late.connected(10));
    late.subscribe(topic);
    assert!(late.expect(topic, 5, |v| v["online"] == false).is_some());
}

#[test]
fn announce_ready_push_quorum_commit_with_three_receivers() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let certs = make_certs(dir.path());
    let b = Broker::start(dir.path(), &certs);
    let rs: Vec<Rcv> = ["s1-a", "s1-b", "s1-c"]
        .iter()
        .map(|n| mqtt_receiver(dir.path(), &certs, &b, n, &[]))
        .collect();
    let eps: Vec<(String, &str)> = rs
        .iter()
        .zip(["s1-a", "s1-b", "s1-c"])
        .map(|(r, n)| (r.url.clone(), n))
        .collect();
    with_mqtt_distribution(dir.path(), &certs, &b, &eps, 1.0, false, "20s");
    // No shared secret and no client certificate for HTTP: the upload tokens are the only way.
    let d = Daemon::start(dir.path(), &[]);
    let id = submit(&d, "/sw/v1", &tree("v1", 6));
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    for r in &rs {
        let o = j["distribution"][&r.url].as_str().unwrap();
        assert!(o.starts_with("ok: "), "{o}");
        assert_prewarmed(&d.storage, r);
    }
    let m = daemon_metrics(&d);
    assert_eq!(
        metric(
            &m,
            "cvmfs_prepub_mqtt_messages_total{kind=\"ready_received\"}"
        ),
        3.0,
        "{m}"
    );
    assert_eq!(metric(&m, "cvmfs_prepub_mqtt_connected"), 1.0);
    // A second release sharing most content: the ready answers list only the new objects.
    let mut v2 = tree("v1", 6);
    v2.push(file("bin/new-in-v2", b"only in v2 ".repeat(300)));
    let id2 = submit(&d, "/sw/v2", &v2);
    let j2 = d.wait_terminal(&id2, 120);
    assert_eq!(j2["state"], "published", "{j2}");
    for r in &rs {
        let o = j2["distribution"][&r.url].as_str().unwrap();
        assert!(o.starts_with("ok: 1 objects"), "{o}");
        assert_prewarmed(&d.storage, r);
        let rm = r.metrics_text();
        assert_eq!(
            metric(&rm, "cvmfs_receiver_mqtt_announces_total"),
            2.0,
            "{rm}"
        );
    }
}

#[test]
fn an_absent_receiver_and_the_quorum_rules() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let certs = make_certs(dir.path());
    let b = Broker::start(dir.path(), &certs);
    let up: Vec<Rcv> = ["s1-a", "s1-b"]
        .iter()
        .map(|n| mqtt_receiver(dir.path(), &certs, &b, n, &[]))
        .collect();
    let absent = format!("http://127.0.0.1:{}", free_port());
    let eps = vec![
        (up[0].url.clone(), "s1-a"),
        (up[1].url.clone(), "s1-b"),
        (absent.clone(), "s1-c"),
    ];
    // 2 of 3 meet a quorum of 0.66.
    with_mqtt_distribution(dir.path(), &certs, &b, &eps, 0.66, false, "2s");
    let d = Daemon::start(dir.path(), &[]);
    let j = d.wait_terminal(&submit(&d, "/sw/a", &tree("a", 3)), 120);
    assert_eq!(j["state"], "published", "{j}");
    // The quorum was met before anyone could wait for the silent one.
    assert_eq!(
        j["distribution"][&absent], "skipped: no ready answer before the quorum was met",
        "{j}"
    );
    drop(d);
    // 0.75 is missed: without commit_anyway the job fails with the reason ...
    with_mqtt_distribution(dir.path(), &certs, &b, &eps, 0.75, false, "2s");
    let d = Daemon::start(dir.path(), &[]);
    let j = d.wait_terminal(&submit(&d, "/sw/b", &tree("b", 3)), 120);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "distribution-quorum");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 of 3 Stratum 1 endpoints"),
        "{j}"
    );
    assert_eq!(
        j["distribution"][&absent], "failed: no ready answer over MQTT within 2s",
        "{j}"
    );
    drop(d);
    // ... and with commit_anyway it commits.
    with_mqtt_distribution(dir.path(), &certs, &b, &eps, 0.75, true, "2s");
    let d = Daemon::start(dir.path(), &[]);
    let j = d.wait_terminal(&submit(&d, "/sw/c", &tree("c", 3)), 120);
    assert_eq!(j["state"], "published", "{j}");
}

#[test]
fn a_broker_outage_loses_no_job() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let certs = make_certs(dir.path());
    let mut b = Broker::start(dir.path(), &certs);
    let rs: Vec<Rcv> = ["s1-a", "s1-b"]
        .iter()
        .map(|n| mqtt_receiver(dir.path(), &certs, &b, n, &[]))
        .collect();
    let eps = vec![(rs[0].url.clone(), "s1-a"), (rs[1].url.clone(), "s1-b")];
    with_mqtt_distribution(dir.path(), &certs, &b, &eps, 1.0, false, "40s");
    let d = Daemon::start(dir.path(), &[]);
    // The broker goes away before the job is announced ...
    b.stop();
    let id = submit(&d, "/sw/outage", &tree("outage", 4));
    d.wait_state(&id, "distributing", 60);
    std::thread::sleep(Duration::from_secs(2));
    let mid: serde_json::Value = client()
        .get(format!("{}/api/v1/jobs/{id}", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(mid["state"], "distributing", "{mid}");
    assert_eq!(
        metric(&daemon_metrics(&d), "cvmfs_prepub_mqtt_connected"),
        0.0
    );
    // ... and comes back empty (no persistence): everyone reconnects, subscribes again, and
    // the publisher announces again.
    b.spawn();
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    for r in &rs {
        assert_prewarmed(&d.storage, r);
    }
    // A broker restart in the middle of a push (slow receiver puts) does not disturb it either.
    let mut v2 = tree("outage", 4);
    v2.push(file("bin/more", b"more ".repeat(1000)));
    let id2 = submit(&d, "/sw/outage2", &v2);
    // (A push of one object can be over between two polls.)
    d.wait_reached(&id2, "distributing", 60);
    b.stop();
    std::thread::sleep(Duration::from_millis(500));
    b.spawn();
    let j2 = d.wait_terminal(&id2, 120);
    assert_eq!(j2["state"], "published", "{j2}");
}

#[test]
fn certificates_acl_and_forged_answers() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let certs = make_certs(dir.path());
    let b = Broker::start(dir.path(), &certs);

    // A client whose certificate the broker's CA did not sign never gets in.
    let other = dir.path().join("other-ca");
    let outsider = Probe::connect(&b, &other, "publisher", &certs);
    assert!(!outsider.connected(3), "a foreign certificate was accepted");

    // A node cannot publish presence for another node.
    let obs = Probe::connect(&b, &certs, "observer", &certs);
    assert!(obs.connected(10));
    obs.subscribe("cvmfs/receivers/+/presence");
    let a = Probe::connect(&b, &certs, "s1-a", &certs);
    assert!(a.connected(10));
    let fake = serde_json::json!({"node_id": "s1-b", "online": true, "bloom_ready": true,
        "repos": [REPO], "data_url": "http://127.0.0.1:1", "version": "x"});
    a.publish(
        "cvmfs/receivers/s1-b/presence",
        fake.to_string().as_bytes(),
        true,
    );
    let own = serde_json::json!({"node_id": "s1-a", "online": true, "bloom_ready": false,
        "repos": [REPO], "data_url": "http://127.0.0.1:2", "version": "x"});
    a.publish(
        "cvmfs/receivers/s1-a/presence",
        own.to_string().as_bytes(),
        true,
    );
    // Its own arrives; the forged one never does.
    assert!(obs
        .expect("cvmfs/receivers/s1-a/presence", 10, |_| true)
        .is_some());
    assert!(obs
        .expect("cvmfs/receivers/s1-b/presence", 2, |_| true)
        .is_none());
    // Nor may a receiver announce (only publishers' certificates may).
    let announce_topic = format!("cvmfs/repos/{REPO}/announce");
    obs.subscribe(&announce_topic);
    std::thread::sleep(Duration::from_millis(300));
    let body = serde_json::json!({"payload_id": "x", "publisher_id": "s1-a", "repo": REPO,
        "object_count": 0, "bytes": 0});
    a.publish(&announce_topic, body.to_string().as_bytes(), false);
    assert!(obs.expect(&announce_topic, 2, |_| true).is_none());
    // (while a publisher's certificate may)
    let p = Probe::connect(&b, &certs, "publisher", &certs);
    assert!(p.connected(10));
    p.publish(&announce_topic, body.to_string().as_bytes(), false);
    assert!(obs.expect(&announce_topic, 5, |_| true).is_some());
    drop(p);

    // The publisher ignores forged ready answers: s1-a is real, s1-b's endpoint has no
    // receiver, and others try to answer for it.
    let ra = mqtt_receiver(dir.path(), &certs, &b, "s1-a", &[]);
    let b_url = format!("http://127.0.0.1:{}", free_port());
    let eps = vec![(ra.url.clone(), "s1-a"), (b_url.clone(), "s1-b")];
    with_mqtt_distribution(dir.path(), &certs, &b, &eps, 1.0, false, "6s");
    let d = Daemon::start(dir.path(), &[]);
    let id = submit(&d, "/sw/forged", &tree("forged", 2));
    d.wait_state(&id, "distributing", 60);
    let ready = |node: &str| {
        serde_json::json!({"node_id": node, "payload_id": id, "data_url": b_url,
            "upload_token": "A".repeat(43), "absent": []})
        .to_string()
    };
    // "rogue" answers on its own topic but for s1-b's endpoint (bound to s1-b).
    let rogue = Probe::connect(&b, &certs, "rogue", &certs);
    assert!(rogue.connected(10));
    rogue.publish(
        &format!("cvmfs/publishers/publisher/ready/{id}/rogue"),
        ready("rogue").as_bytes(),
        false,
    );
    // s1-a's certificate, a body naming s1-b.
    a.publish(
        &format!("cvmfs/publishers/publisher/ready/{id}/s1-a"),
        ready("s1-b").as_bytes(),
        false,
    );
    // On s1-b's topic: the ACL drops it before the publisher could see it.
    rogue.publish(
        &format!("cvmfs/publishers/publisher/ready/{id}/s1-b"),
        ready("s1-b").as_bytes(),
        false,
    );
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "distribution-quorum");
    assert_eq!(
        j["distribution"][&b_url], "failed: no ready answer over MQTT within 6s",
        "{j}"
    );
    assert!(j["distribution"][&ra.url]
        .as_str()
        .unwrap()
        .starts_with("ok: "));
    let m = daemon_metrics(&d);
    assert_eq!(
        metric(
            &m,
            "cvmfs_prepub_mqtt_ignored_total{reason=\"endpoint-claimed\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "cvmfs_prepub_mqtt_ignored_total{reason=\"node-mismatch\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "cvmfs_prepub_mqtt_messages_total{kind=\"ready_received\"}"
        ),
        1.0,
        "{m}"
    );
    assert!(!d.log_text().contains(&"A".repeat(43)));
}

#[test]
fn a_receiver_must_be_known_by_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let c = certs.display();
    let cfg = dir.path().join("receiver.yaml");
    let run = |extra: &str| {
        std::fs::write(
            &cfg,
            format!(
                "mode: receiver\ncas:\n  root: {}\nrepositories:\n  - name: {REPO}\nbroker_client_cert: {c}/s1-a.crt\nbroker_client_key: {c}/s1-a.key\nbroker_ca_cert: {c}/ca.crt\n{extra}",
                dir.path().join("cas").display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
            .args(["--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run("broker_url: tls://127.0.0.1:1\nnode_id: s1-b\n");
    assert!(
        err.contains("node_id 's1-b' differs from the CN 's1-a' of broker_client_cert"),
        "{err}"
    );
    let err = run("broker_url: tcp://127.0.0.1:1883\nnode_id: s1-a\n");
    assert!(err.contains("must be reached over TLS"), "{err}");
    let err = run("broker_url: tls://127.0.0.1:1\nnode_id: s1-a\nrepos: [other.org]\n");
    assert!(
        err.contains("repos: other.org is not in repositories"),
        "{err}"
    );
}

#[test]
fn repeated_announcements_get_the_same_answer_without_another_inventory() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let certs = make_certs(dir.path());
    let b = Broker::start(dir.path(), &certs);
    let up = mqtt_receiver(dir.path(), &certs, &b, "s1-a", &[]);
    let silent = format!("http://127.0.0.1:{}", free_port());
    // One endpoint never answers: the announcement is repeated (every 5 s) until the
    // 7 s ready deadline, then the job commits anyway.
    with_mqtt_distribution(
        dir.path(),
        &certs,
        &b,
        &[(up.url.clone(), "s1-a"), (silent, "s1-b")],
        1.0,
        true,
        "7s",
    );
    let d = Daemon::start(dir.path(), &[]);
    let id = submit(&d, "/sw/repeat", &tree("repeat", 2));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}");
    let rm = up.metrics_text();
    let announces = metric(&rm, "cvmfs_receiver_mqtt_announces_total");
    assert!(announces >= 2.0, "the announcement was not repeated: {rm}");
    // One inventory pass for all of them, and the publisher saw the same answer again.
    assert_eq!(
        metric(&rm, "cvmfs_receiver_inventory_requests_total"),
        1.0,
        "{rm}"
    );
    let m = d.metrics_text();
    assert!(
        metric(&m, "cvmfs_prepub_mqtt_ignored_total{reason=\"duplicate\"}") >= 1.0,
        "{m}"
    );
    assert!(
        j["distribution"][&up.url]
            .as_str()
            .unwrap()
            .starts_with("ok: "),
        "{j}"
    );
}
