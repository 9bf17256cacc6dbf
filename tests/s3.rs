//! S3 storage against a real S3 API server on loopback (`moto_server`, PyPI `moto[server]`,
//! installed by `.ci/run`): init, publish through the daemon, read back with the `cvmfs` crate
//! through an HTTP view of the bucket, `repo check --s3`, a missing bucket at start-up, and the
//! S3 server going away mid-job.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use prepub_core::cas::Cas;

struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start(dir: &Path) -> Moto {
        Moto::start_with(dir, &[])
    }

    fn start_with(dir: &Path, env: &[(&str, &str)]) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("moto_server (pip install 'moto[server]'; .ci/run does)");
        let m = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..200 {
            if client().get(&m.endpoint).send().is_ok() {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("moto_server did not start");
    }

    fn bucket(&self, name: &str) {
        let r = client()
            .put(format!("{}/{name}", self.endpoint))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "create bucket: {}", r.status());
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn store(m: &Moto, bucket: &str) -> prepub_actors::s3_cas::S3Cas {
    store_at(&m.endpoint, bucket, 1 << 20)
}

fn store_at(endpoint: &str, bucket: &str, multipart: usize) -> prepub_actors::s3_cas::S3Cas {
    store_with(
        endpoint,
        bucket,
        multipart,
        prepub_actors::s3_cas::DEFAULT_REQUEST_TIMEOUT,
    )
}

fn store_with(
    endpoint: &str,
    bucket: &str,
    multipart: usize,
    request_timeout: Duration,
) -> prepub_actors::s3_cas::S3Cas {
    prepub_actors::s3_cas::S3Cas::new(prepub_actors::s3_cas::S3Settings {
        bucket: bucket.into(),
        region: "us-east-1".into(),
        endpoint: endpoint.into(),
        prefix: REPO.into(),
        multipart_threshold: multipart,
        request_timeout,
    })
    .unwrap()
}

/// Serves the repository in S3 over plain HTTP (as a web server in front of a bucket would).
fn http_view(s3: Arc<prepub_actors::s3_cas::S3Cas>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let s3 = s3.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let rel = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_string();
                let body = if rel == ".cvmfs_last_snapshot" || rel == ".cvmfs_is_snapshotting" {
                    Some(Vec::new())
                } else if let Some(id) = prepub_core::hash::ObjectId::from_path(&rel) {
                    prepub_core::cas::get_all(s3.as_ref(), &id).ok()
                } else {
                    s3.get_root_file(&rel).ok().flatten()
                };
                let _ = match body {
                    Some(b) => s
                        .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len()).as_bytes())
                        .and_then(|_| s.write_all(&b)),
                    None => s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                };
                let mut sink = Vec::new();
                let _ = r.read_to_end(&mut sink);
            });
        }
    });
    url
}

fn s3_config(dir: &Path, endpoint: &str, bucket: &str) {
    prepare_daemon_dir(dir, "", "");
    let cfg = dir.join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let start = text.find("cas:\n").unwrap();
    let end = text.find("pipeline:\n").unwrap();
    let text = format!(
        "{}cas:\n  type: s3\n  bucket: {bucket}\n  endpoint: {}\n  multipart_threshold: 1MiB\n{}",
        &text[..start],
        endpoint,
        &text[end..]
    );
    std::fs::write(cfg, text).unwrap();
}

fn init_in_s3(dir: &Path, m: &Moto, bucket: &str) {
    ok(&[
        "repo",
        "init",
        "--s3",
        &format!("{bucket}/{REPO}"),
        "--s3-endpoint",
        &m.endpoint,
        "--name",
        REPO,
        "--keys-dir",
        dir.join("keys").to_str().unwrap(),
    ]);
}

/// A moto server with bucket `cvmfs`, a repository initialised in it, and a daemon
/// configuration for it (credentials in the environment).
fn s3_daemon_dir() -> (tempfile::TempDir, Moto) {
    for (k, v) in creds() {
        std::env::set_var(k, v);
    }
    let dir = tempfile::tempdir().unwrap();
    let m = Moto::start(dir.path());
    m.bucket("cvmfs");
    init_in_s3(dir.path(), &m, "cvmfs");
    s3_config(dir.path(), &m.endpoint, "cvmfs");
    (dir, m)
}

/// `repo check` of the repository in bucket `cvmfs`.
fn check_in_s3(dir: &Path, m: &Moto) {
    ok(&[
        "repo",
        "check",
        "--s3",
        &format!("cvmfs/{REPO}"),
        "--s3-endpoint",
        &m.endpoint,
        "--keys-dir",
        dir.join("keys").to_str().unwrap(),
    ]);
}

fn creds() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ]
}

#[test]
fn publishes_into_s3_and_reads_back() {
    let (dir, m) = s3_daemon_dir();
    let d = Daemon::start(dir.path(), &creds());
    let h: serde_json::Value = client()
        .get(format!("{}/api/v1/health", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(h["status"], "ok", "{h}");
    let specs = vec![
        Spec::Dir("pkg", 0o755),
        Spec::File {
            path: "pkg/small",
            mode: 0o644,
            data: b"small".to_vec(),
            xattrs: vec![],
        },
        Spec::File {
            path: "pkg/big.bin",
            mode: 0o644,
            data: pseudo_random(20 << 20, 4),
            xattrs: vec![],
        }, // > 16 MiB: at least one cut
        Spec::File {
            path: "pkg/.cvmfscatalog",
            mode: 0o644,
            data: vec![],
            xattrs: vec![],
        },
        Spec::Symlink("pkg/link", "small"),
    ];
    let id = d.submit_id(ADMIN, "/sw/s3", &tar_bytes(&specs), None);
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    let s3 = Arc::new(store(&m, "cvmfs"));
    let url = http_view(s3.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw/s3", &specs);
    drop(repo);
    check_in_s3(dir.path(), &m);
    // Objects sit under the repository prefix in the CVMFS layout.
    let listed = s3.list().unwrap();
    assert!(
        listed
            .iter()
            .any(|i| i.suffix == prepub_core::hash::Suffix::Partial),
        "chunks in S3: {listed:?}"
    );
}

#[test]
fn a_large_unchunked_file_is_streamed_into_s3_in_parts() {
    let (dir, m) = s3_daemon_dir();
    let cfg = dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "  retry_backoff: 200ms\n",
        "  retry_backoff: 200ms\n  chunking:\n    enabled: false\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let d = Daemon::start(dir.path(), &creds());
    // Above the size read whole into memory (16 MiB), and incompressible: about 20 MiB stored.
    let specs = vec![
        Spec::Dir("big", 0o755),
        Spec::File {
            path: "big/image.bin",
            mode: 0o644,
            data: pseudo_random(20 << 20, 7),
            xattrs: vec![],
        },
    ];
    let id = d.submit_id(ADMIN, "/big", &tar_bytes(&specs), None);
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    let s3 = Arc::new(store(&m, "cvmfs"));
    let url = http_view(s3.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/big", &specs);
    drop(repo);
    check_in_s3(dir.path(), &m);
    // One object, not chunked, uploaded from its spill file in parts of 8 MiB (a multipart
    // ETag ends with the number of parts).
    let multipart: Vec<String> = s3
        .list()
        .unwrap()
        .iter()
        .filter_map(|id| {
            let r = client()
                .head(format!("{}/cvmfs/{REPO}/{}", m.endpoint, id.path()))
                .send()
                .unwrap();
            let etag = r.headers().get("etag")?.to_str().ok()?.trim_matches('"');
            etag.contains('-').then(|| format!("{id} {etag}"))
        })
        .collect();
    assert_eq!(multipart.len(), 1, "{multipart:?}");
    assert!(multipart[0].ends_with("-3"), "{multipart:?}");
    assert!(
        !s3.list()
            .unwrap()
            .iter()
            .any(|i| i.suffix == prepub_core::hash::Suffix::Partial),
        "no chunks"
    );
}

/// Health needs no token: checks asked for in a burst share one look at the store (before,
/// every check listed the bucket and read the manifest).
#[test]
fn a_burst_of_health_checks_asks_the_store_once() {
    let (dir, m) = s3_daemon_dir();
    let (url, seen) = proxy(&m.endpoint, Box::new(|_, _| None));
    s3_config(dir.path(), &url, "cvmfs");
    let d = Daemon::start(dir.path(), &creds());
    // The check made while the daemon started is reused for a while: wait it out.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    seen.lock().unwrap().clear();
    let health = format!("{}/api/v1/health", d.url);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(|| {
                    let c = client();
                    (0..2)
                        .map(|_| c.get(&health).send().unwrap().status().as_u16())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![200; 20]);
    let listings = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.starts_with("GET ") && h.contains("list-type"))
        .count();
    // One check (two if the burst straddled the end of a result's two seconds).
    assert!(
        (1..=2).contains(&listings),
        "{listings} bucket listings for 20 health checks"
    );
}

#[test]
fn a_missing_bucket_stops_the_start_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let m = Moto::start(dir.path());
    s3_config(dir.path(), &m.endpoint, "no-such-bucket");
    let mut env = creds();
    env.push(("PREPUB_API_TOKEN", ADMIN));
    let out = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args([
            "--config",
            dir.path().join("config.yaml").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the bucket does not exist"), "{err}");
}

#[test]
fn s3_going_away_mid_job_fails_the_job_with_a_reason_and_leaves_no_partial_objects() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Moto::start(dir.path());
    m.bucket("cvmfs");
    for (k, v) in creds() {
        std::env::set_var(k, v);
    }
    init_in_s3(dir.path(), &m, "cvmfs");
    s3_config(dir.path(), &m.endpoint, "cvmfs");
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap().replace(
            "retry_backoff: 200ms",
            "retry_backoff: 200ms\n  max_attempts: 2",
        ),
    )
    .unwrap();
    let d = Daemon::start(dir.path(), &{
        let mut e = creds();
        e.push(("CVMFS_PREPUB_TEST_HOLD", "processing=1000"));
        e
    });
    let specs = vec![Spec::File {
        path: "f",
        mode: 0o644,
        data: pseudo_random(3 << 20, 9),
        xattrs: vec![],
    }];
    let id = d.submit_id(ADMIN, "/gone", &tar_bytes(&specs), None);
    d.wait_state(&id, "processing", 20);
    let _ = m.child.kill();
    let _ = m.child.wait();
    let j = d.wait_terminal(&id, 240);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "cas-write", "{j}");
    assert!(!j["error"]["message"].as_str().unwrap_or("").is_empty());
}

#[test]
fn wrong_credentials_stop_the_start_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    // moto enforces signatures after the first two unauthenticated actions: the readiness
    // probe and creating the bucket.
    let m = Moto::start_with(dir.path(), &[("INITIAL_NO_AUTH_ACTION_COUNT", "2")]);
    m.bucket("cvmfs");
    s3_config(dir.path(), &m.endpoint, "cvmfs");
    let out = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args([
            "--config",
            dir.path().join("config.yaml").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .envs([
            ("AWS_ACCESS_KEY_ID", "wrong"),
            ("AWS_SECRET_ACCESS_KEY", "wrong"),
            ("PREPUB_API_TOKEN", ADMIN),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the credentials were refused"), "{err}");
    assert!(
        !err.contains("wrong"),
        "credentials must not be echoed: {err}"
    );
}

/// Reads one HTTP message head (up to the blank line) and its body, given the request method
/// for responses (`HEAD` answers carry no body).
fn read_message(
    r: &mut BufReader<std::net::TcpStream>,
    head_request: bool,
) -> Option<(String, Vec<u8>)> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; if head_request { 0 } else { len }];
    r.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// A canned answer of a [`proxy`] (given a request's head and body), instead of forwarding the
/// request; an answer that starts with [`FORWARD_THEN`] is given after forwarding it (the
/// request takes effect, its client hears otherwise).
type Answer = Box<dyn Fn(&str, &[u8]) -> Option<String> + Send + Sync>;

const FORWARD_THEN: &str = "\0forward-then\0";

/// A proxy in front of moto that writes down every request head it sees and answers those
/// `answer` has a canned response for, forwarding the rest.
fn proxy(target: &str, answer: Answer) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let answer = Arc::new(answer);
    let target = target.trim_start_matches("http://").to_string();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut client_s) = conn else { continue };
            let (seen, answer, target) = (seen2.clone(), answer.clone(), target.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(client_s.try_clone().unwrap());
                while let Some((head, body)) = read_message(&mut r, false) {
                    seen.lock().unwrap().push(head.clone());
                    let canned = answer(&head, &body);
                    let forward = || -> Option<(String, Vec<u8>)> {
                        let mut up = std::net::TcpStream::connect(&target).ok()?;
                        // One request per upstream connection: moto closes or keeps it as it
                        // likes.
                        let h = head.replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1);
                        up.write_all(h.as_bytes()).ok()?;
                        up.write_all(&body).ok()?;
                        read_message(&mut BufReader::new(up), head.starts_with("HEAD "))
                    };
                    if let Some(canned) = canned {
                        let after = canned.strip_prefix(FORWARD_THEN);
                        if after.is_some() && forward().is_none() {
                            return;
                        }
                        let _ = client_s.write_all(after.unwrap_or(&canned).as_bytes());
                        return;
                    }
                    let Some((rh, rb)) = forward() else {
                        return;
                    };
                    let rh = rh
                        .lines()
                        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                        .collect::<Vec<_>>()
                        .join("\r\n")
                        + "\r\n";
                    if client_s
                        .write_all(rh.as_bytes())
                        .and_then(|_| client_s.write_all(&rb))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// An S3 error answer that closes the connection.
fn s3_error(status: &str, code: &str) -> String {
    let xml = format!("<Error><Code>{code}</Code><Message>{code}</Message></Error>");
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
        xml.len()
    )
}

/// A proxy in front of moto that answers the first `n` requests with `503 SlowDown`, as S3 does
/// when it throttles, and forwards the rest.
fn throttling_proxy(target: &str, n: usize) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let count = std::sync::atomic::AtomicUsize::new(0);
    proxy(
        target,
        Box::new(move |_, _| {
            (count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n)
                .then(|| s3_error("503 Slow Down", "SlowDown"))
        }),
    )
}

/// The requests a proxy saw, as "METHOD conditional?" per request for object keys.
fn object_requests(seen: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|h| h.contains("/data/"))
        .map(|h| {
            let method = h.split(' ').next().unwrap_or("").to_string();
            let conditional = h
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("if-none-match: *"));
            if conditional {
                format!("{method} if-none-match")
            } else {
                method
            }
        })
        .collect()
}

/// Moto with bucket `cvmfs` behind a [`proxy`] with `answer`; the proxy's URL and log.
fn moto_behind_proxy(
    dir: &Path,
    answer: Answer,
) -> (Moto, String, Arc<std::sync::Mutex<Vec<String>>>) {
    for (k, v) in creds() {
        std::env::set_var(k, v);
    }
    let m = Moto::start(dir);
    m.bucket("cvmfs");
    let (url, seen) = proxy(&m.endpoint, answer);
    (m, url, seen)
}

fn oid(n: u8) -> prepub_core::hash::ObjectId {
    use prepub_core::hash::{Digest20, ObjectId, Suffix};
    ObjectId::new(Digest20([n; 20]), Suffix::None)
}

#[test]
fn a_small_new_object_costs_one_conditional_put_and_an_existing_one_is_kept() {
    use prepub_core::cas::PutOutcome;
    let dir = tempfile::tempdir().unwrap();
    let (_m, url, seen) = moto_behind_proxy(dir.path(), Box::new(|_, _| None));
    let s = store_at(&url, "cvmfs", 8 << 20);
    assert_eq!(s.put_bytes(&oid(1), b"first").unwrap(), PutOutcome::Stored);
    assert_eq!(object_requests(&seen), ["PUT if-none-match"]);
    // Known now: no request at all.
    assert_eq!(
        s.put_bytes(&oid(1), b"first").unwrap(),
        PutOutcome::AlreadyPresent
    );
    assert_eq!(object_requests(&seen).len(), 1);
    // Another process (nothing known): the store refuses the PUT, HEAD confirms, and the
    // object already there is not replaced.
    seen.lock().unwrap().clear();
    let other = store_at(&url, "cvmfs", 8 << 20);
    assert_eq!(
        other.put_bytes(&oid(1), b"other bytes").unwrap(),
        PutOutcome::AlreadyPresent
    );
    assert_eq!(object_requests(&seen), ["PUT if-none-match", "HEAD"]);
    assert_eq!(
        prepub_core::cas::get_all(&other, &oid(1)).unwrap(),
        b"first"
    );
    // A large object is asked about first, then sent.
    seen.lock().unwrap().clear();
    let big = pseudo_random(prepub_actors::s3_cas::CONDITIONAL_PUT_MAX, 9);
    assert_eq!(other.put_bytes(&oid(2), &big).unwrap(), PutOutcome::Stored);
    assert_eq!(object_requests(&seen), ["HEAD", "PUT"]);
    assert_eq!(prepub_core::cas::get_all(&s, &oid(2)).unwrap(), big);
}

#[test]
fn a_store_without_conditional_puts_is_asked_head_then_put() {
    use prepub_core::cas::PutOutcome;
    let dir = tempfile::tempdir().unwrap();
    // Refuses every PUT that carries If-None-Match, as a store without the feature may.
    let (_m, url, seen) = moto_behind_proxy(
        dir.path(),
        Box::new(|h, _| {
            h.lines()
                .any(|l| l.to_ascii_lowercase().starts_with("if-none-match"))
                .then(|| s3_error("501 Not Implemented", "NotImplemented"))
        }),
    );
    let s = store_at(&url, "cvmfs", 8 << 20);
    assert_eq!(s.put_bytes(&oid(1), b"one").unwrap(), PutOutcome::Stored);
    // The client retries 5xx answers a few times before the refusal counts.
    let r = object_requests(&seen);
    let tried = r.iter().take_while(|x| *x == "PUT if-none-match").count();
    assert!(tried >= 1, "{r:?}");
    assert_eq!(r[tried..], ["HEAD", "PUT"]);
    // Remembered: the next object goes HEAD-then-PUT straight away.
    seen.lock().unwrap().clear();
    assert_eq!(s.put_bytes(&oid(2), b"two").unwrap(), PutOutcome::Stored);
    assert_eq!(object_requests(&seen), ["HEAD", "PUT"]);
    assert_eq!(prepub_core::cas::get_all(&s, &oid(1)).unwrap(), b"one");
    assert_eq!(prepub_core::cas::get_all(&s, &oid(2)).unwrap(), b"two");
}

#[test]
fn throttling_answers_are_retried() {
    for (k, v) in creds() {
        std::env::set_var(k, v);
    }
    let dir = tempfile::tempdir().unwrap();
    let m = Moto::start(dir.path());
    m.bucket("cvmfs");
    init_in_s3(dir.path(), &m, "cvmfs");
    let (proxy, seen) = throttling_proxy(&m.endpoint, 6);
    s3_config(dir.path(), &proxy, "cvmfs");
    let d = Daemon::start(dir.path(), &creds());
    let specs = vec![Spec::File {
        path: "f",
        mode: 0o644,
        data: b"throttled but published".to_vec(),
        xattrs: vec![],
    }];
    let id = d.submit_id(ADMIN, "/throttle", &tar_bytes(&specs), None);
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    assert!(seen.lock().unwrap().len() > 6, "the proxy throttled");
    check_in_s3(dir.path(), &m);
}

#[test]
fn gateway_mode_works_with_s3() {
    let (dir, m) = s3_daemon_dir();
    // The gateway double keeps the same repository in the same bucket.
    let gw_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut gw = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args([
            "gateway-double",
            "--listen",
            &format!("127.0.0.1:{gw_port}"),
            "--repo",
            REPO,
            "--storage",
        ])
        .arg(dir.path().join("unused"))
        .arg("--keys-dir")
        .arg(dir.path().join("keys"))
        .args([
            "--key-id",
            "k",
            "--s3",
            &format!("cvmfs/{REPO}"),
            "--s3-endpoint",
            &m.endpoint,
        ])
        .envs(creds())
        .env("CVMFS_GATEWAY_SECRET", "gw-secret")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gw_url = format!("http://127.0.0.1:{gw_port}");
    for _ in 0..200 {
        if client().get(format!("{gw_url}/api/v1")).send().is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let cfg = dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "  log_format: text\n",
        "  log_format: text\n  publish_mode: gateway\n",
    );
    std::fs::write(
        &cfg,
        format!("{text}gateway:\n  url: {gw_url}\n  key_id: k\n  stratum0_url: {gw_url}/cvmfs\n"),
    )
    .unwrap();
    let mut env = creds();
    env.push(("CVMFS_GATEWAY_SECRET", "gw-secret"));
    let d = Daemon::start(dir.path(), &env);
    let specs = vec![
        Spec::File {
            path: "gw/a",
            mode: 0o644,
            data: b"through the gateway into S3".to_vec(),
            xattrs: vec![],
        },
        Spec::File {
            path: "gw/big",
            mode: 0o644,
            data: pseudo_random(20 << 20, 8),
            xattrs: vec![],
        },
    ];
    let id = d.submit_id(ADMIN, "/sw/gw", &tar_bytes(&specs), None);
    let j = d.wait_terminal(&id, 120);
    let _ = gw.kill();
    let _ = gw.wait();
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    let url = http_view(Arc::new(store(&m, "cvmfs")));
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw/gw", &specs);
    drop(repo);
    check_in_s3(dir.path(), &m);
}

#[test]
fn garbage_collection_reclaims_in_s3() {
    let (dir, m) = s3_daemon_dir();
    set_gc(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(dir.path(), &creds());
    let file = |data: &[u8]| {
        vec![Spec::File {
            path: "f",
            mode: 0o644,
            data: data.to_vec(),
            xattrs: vec![],
        }]
    };
    let mut ids = Vec::new();
    for n in 0..3u8 {
        let id = d.submit_id(
            ADMIN,
            "/sw/gc",
            &tar_bytes(&file(&pseudo_random(3000, 2 * n as u64 + 10))),
            None,
        );
        assert_eq!(d.wait_terminal(&id, 120)["state"], "published");
        ids.push(id);
    }
    // Killed at its second deletion, the run ends aborted at the next start; the head and
    // the kept revision stay whole.
    drop(d);
    let mut env = creds();
    env.push(("CVMFS_PREPUB_TEST_CRASH", "gc-delete#2"));
    let mut d = Daemon::start(dir.path(), &env);
    let r = client()
        .post(format!("{}/api/v1/gc/{REPO}/run", d.url))
        .bearer_auth(ADMIN)
        .send();
    assert!(r.map_or(true, |r| !r.status().is_success()));
    assert!(d.wait_exit(30), "the daemon did not stop at gc-delete#2");
    drop(d);
    let d = Daemon::start(dir.path(), &creds());
    let st: serde_json::Value = client()
        .get(format!("{}/api/v1/gc/{REPO}/status", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(st["last_run"]["state"], "aborted", "{st}");
    check_in_s3(dir.path(), &m);
    let s3 = Arc::new(store(&m, "cvmfs"));
    let last = file(&pseudo_random(3000, 14));
    let reader = |cache: &str| {
        let repo = open_reader(&http_view(s3.clone()), &dir.path().join(cache));
        verify(&repo, "/sw/gc", &last);
    };
    reader("cache-1");
    let before = s3.list().unwrap().len();
    let r: serde_json::Value = client()
        .post(format!("{}/api/v1/gc/{REPO}/run", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["run"]["state"], "complete", "{r}");
    let deleted = r["swept"]["deleted"].as_u64().unwrap();
    // The first release's file and catalog (two revisions back) and old histories, less the
    // one the killed run deleted.
    assert!(deleted >= 1, "{r}");
    assert_eq!(s3.list().unwrap().len(), before - deleted as usize, "{r}");
    reader("cache-2");
    check_in_s3(dir.path(), &m);
    // The daemon's store forgot what it deleted: re-publishing the first content writes it again.
    let id = d.submit_id(
        ADMIN,
        "/sw/gc",
        &tar_bytes(&file(&pseudo_random(3000, 10))),
        None,
    );
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}");
    assert!(j["progress"]["objects_new"].as_u64().unwrap() >= 1, "{j}");
    check_in_s3(dir.path(), &m);
}

#[test]
fn objects_of_an_aborted_job_go_after_the_grace_period_in_s3() {
    let (dir, m) = s3_daemon_dir();
    set_gc(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 5s, auto_tag_timespan: 0s}",
    );
    let mut env = creds();
    env.push(("CVMFS_PREPUB_TEST_HOLD", "commit-started=2500"));
    let d = Daemon::start(dir.path(), &env);
    let s3 = Arc::new(store(&m, "cvmfs"));
    aborted_job_objects_go_after_the_grace_period(&d, s3.as_ref());
    check_in_s3(dir.path(), &m);
    let repo = open_reader(&http_view(s3.clone()), &dir.path().join("cache"));
    assert!(repo.lookup("/sw/aborted").is_err());
}

/// The manifest of job A's publish is stored but every PUT of it is answered `500`, so A's
/// commit fails after it landed and A is retried; job B, waiting behind it, publishes first.
/// With `auto_tag_timespan: 0s` B's publish must keep A's marker, by which A's retry recognises
/// its own publish instead of publishing the same content again.
#[test]
fn a_commit_that_failed_after_its_manifest_landed_is_not_published_twice() {
    let dir = tempfile::tempdir().unwrap();
    let failing: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let f = failing.clone();
    let (m, url, seen) = moto_behind_proxy(
        dir.path(),
        Box::new(move |head, body| {
            let line = f.lock().unwrap().clone()?;
            (head.starts_with("PUT ")
                && head.contains("/.cvmfspublished")
                && body.windows(line.len()).any(|w| w == line.as_bytes()))
            .then(|| {
                format!(
                    "{FORWARD_THEN}{}",
                    s3_error("500 Internal Server Error", "InternalError")
                )
            })
        }),
    );
    init_in_s3(dir.path(), &m, "cvmfs");
    s3_config(dir.path(), &url, "cvmfs");
    set_gc(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}",
    );
    let s3 = store(&m, "cvmfs");
    let revision = || {
        prepub_core::repo::current_manifest(&s3)
            .unwrap()
            .unwrap()
            .0
            .revision
    };
    let initial = revision();
    // The manifest of the next revision (A's) lands but is refused.
    *failing.lock().unwrap() = Some(format!("\nS{}\n", initial + 1));
    let d = Daemon::start(dir.path(), &creds());
    let tar = |name: &str| {
        tar_bytes(&[Spec::File {
            path: "bin/tool",
            mode: 0o755,
            data: name.repeat(40).into_bytes(),
            xattrs: vec![],
        }])
    };
    let a = d.submit_id(ADMIN, "/sw/a", &tar("a"), None);
    d.wait_state(&a, "committing", 30);
    let b = d.submit_id(ADMIN, "/sw/b", &tar("b"), None);
    let (ja, jb) = (d.wait_terminal(&a, 120), d.wait_terminal(&b, 120));
    let refused = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.starts_with("PUT ") && h.contains("/.cvmfspublished"))
        .count();
    assert!(
        refused >= 3,
        "A's manifest was refused and retried: {refused} PUTs"
    );
    assert_eq!(
        (&ja["state"], &jb["state"]),
        (&"published".into(), &"published".into())
    );
    assert!(
        ja["attempts"].as_u64().unwrap() >= 2,
        "A's commit failed once: {ja}"
    );
    assert_eq!(
        ja["revision"],
        initial + 1,
        "A recognised its own publish: {ja}"
    );
    assert_eq!(jb["revision"], initial + 2, "{jb}");
    assert_eq!(revision(), initial + 2, "no second publish of A");
    check_in_s3(dir.path(), &m);
}

#[test]
fn a_request_slower_than_the_request_timeout_is_given_up_and_retried() {
    // The first request through each proxy is answered after 1.5 s.
    let slow_first = || -> Answer {
        let n = std::sync::atomic::AtomicUsize::new(0);
        Box::new(move |_, _| {
            if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1500));
            }
            None
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let (m, url, seen) = moto_behind_proxy(dir.path(), slow_first());
    // cas.request_timeout 1s: the client gives the conditional PUT up after 1 s and asks
    // whether the object is there (then stores it, unless the slow PUT landed meanwhile).
    let s = store_with(&url, "cvmfs", 8 << 20, Duration::from_secs(1));
    s.put_bytes(&oid(1), b"first").unwrap();
    let asked = object_requests(&seen);
    assert!(
        asked.len() >= 2 && asked[..2] == ["PUT if-none-match", "HEAD"],
        "{asked:?}"
    );
    assert_eq!(prepub_core::cas::get_all(&s, &oid(1)).unwrap(), b"first");
    // With time enough, the slow answer is waited for.
    let (url, seen) = proxy(&m.endpoint, slow_first());
    let s = store_with(&url, "cvmfs", 8 << 20, Duration::from_secs(5));
    s.put_bytes(&oid(2), b"second").unwrap();
    assert_eq!(object_requests(&seen), ["PUT if-none-match"]);
}

#[test]
fn a_collection_plan_in_s3_takes_sizes_and_times_from_the_listing() {
    let (_dir, m) = s3_daemon_dir();
    let (url, seen) = proxy(&m.endpoint, Box::new(|_, _| None));
    let s = store_at(&url, "cvmfs", 8 << 20);
    for n in 1..=3u8 {
        s.put_bytes(&oid(n), &vec![n; 100 * n as usize]).unwrap();
    }
    seen.lock().unwrap().clear();
    let policy = |grace_secs| prepub_core::gc::GcPolicy {
        keep_revisions: 1,
        grace_secs,
        exempt_tags: vec![],
    };
    let now = prepub_core::timefmt::now();
    // Past their grace period: the three unreferenced objects, with their sizes.
    let plan = prepub_core::gc::plan(&s, &policy(0), now + 10).unwrap();
    assert_eq!(
        plan.candidates,
        [(oid(1), 100), (oid(2), 200), (oid(3), 300)]
    );
    assert_eq!(plan.young, 0);
    // Stored just now: young, kept.
    let plan = prepub_core::gc::plan(&s, &policy(3600), now + 10).unwrap();
    assert!(plan.candidates.is_empty(), "{:?}", plan.candidates);
    assert_eq!(plan.young, 3);
    // Neither plan asked for an object on its own (HEAD per object, twice each, before).
    assert!(
        !object_requests(&seen).iter().any(|r| r.starts_with("HEAD")),
        "{:?}",
        object_requests(&seen)
    );
}
