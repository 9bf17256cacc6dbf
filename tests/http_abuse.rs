//! HTTP abuse against the daemon: every protected operation of the OpenAPI document refuses a
//! missing, forged or malformed token; oversized, stalled and malformed requests get a clear
//! 4xx (and leave nothing in the spool); path tricks in job ids find nothing; and after all of
//! it the daemon is healthy and serves a normal publish. Prints its counts. (Receivers with
//! forged HMACs and replayed requests: tests/receiver.rs.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn healthy(d: &Daemon) {
    let h: Value = client()
        .get(format!("{}/api/v1/health", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(h["status"], "ok", "{h}");
}

fn incoming_empty(dir: &std::path::Path) {
    let left = incoming_left(&dir.join("spool"));
    assert!(left.is_empty(), "uploads left in the spool: {left:?}");
}

/// Sends raw bytes and reads until the server answers or closes; returns what it said and
/// how long it took.
fn raw_exchange(addr: &str, send: &[u8], then_wait: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(then_wait)).unwrap();
    let start = Instant::now();
    // The server may answer and close before everything is sent.
    let _ = s.write_all(send);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

#[test]
fn every_protected_operation_refuses_missing_forged_and_malformed_tokens() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let doc: Value = client()
        .get(format!("{}/api/v1/openapi.json", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let c = client();
    let mut tried = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let needs_token = op["security"].as_array().is_some_and(|s| {
                !s.is_empty()
                    && s.iter()
                        .all(|r| r.as_object().is_some_and(|o| !o.is_empty()))
            });
            if !needs_token {
                continue;
            }
            let url = format!(
                "{}{}",
                d.url,
                path.replace("{id}", "0b8f52b4-8a0e-4b7e-9d35-6f0a3c1e2d4f")
                    .replace("{repo}", REPO)
            );
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            for auth in [
                None,
                Some("Bearer forged-token"),
                Some("Bearer "),
                Some(&format!("Bearer {ADMIN}x")[..]),
                Some(&format!("Basic {ADMIN}")[..]),
                Some(&format!("bearer{ADMIN}")[..]),
            ] {
                let mut r = c.request(m.clone(), &url);
                if let Some(a) = auth {
                    r = r.header("Authorization", a);
                }
                let r = r.send().unwrap();
                assert_eq!(
                    r.status(),
                    401,
                    "{method} {path} with {auth:?}: {}",
                    r.text().unwrap_or_default()
                );
                let body: Value = r.json().unwrap();
                assert_eq!(body["error"]["code"], "unauthorized", "{method} {path}");
                let text = body.to_string();
                assert!(!text.contains(ADMIN), "the token is echoed: {text}");
                tried += 1;
            }
        }
    }
    assert!(
        tried >= 6 * 15,
        "only {tried} requests: the document lists too few operations"
    );
    let log = d.log_text();
    assert!(!log.contains(ADMIN), "the admin token is in the log");
    healthy(&d);
    println!("http abuse: {tried} unauthenticated or forged requests, all 401, no token echoed or logged");
}

#[test]
fn oversized_stalled_and_malformed_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(
        dir.path(),
        "",
        "  max_upload_size: 64KiB\n  upload_idle_timeout: 2s\n",
    );
    let d = Daemon::start(dir.path(), &[]);
    let addr = d.url.trim_start_matches("http://").to_string();
    let c = client();
    let jobs = format!("{}/api/v1/jobs", d.url);
    let tried = std::cell::Cell::new(0);
    let check = |what: &str, r: reqwest::blocking::Response, status: u16, code: &str| {
        assert_eq!(r.status().as_u16(), status, "{what}");
        let v: Value = r.json().unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty());
        tried.set(tried.get() + 1);
    };
    let tarball = tar_bytes(&[Spec::File {
        path: "f",
        mode: 0o644,
        data: b"x".to_vec(),
        xattrs: vec![],
    }]);
    let raw = |body: Vec<u8>| {
        c.post(&jobs)
            .bearer_auth(ADMIN)
            .header("X-Cvmfs-Repo", REPO)
            .header("X-Cvmfs-Path", "/sw/x")
            .body(body)
    };
    // Too large, announced and not announced (chunked).
    check(
        "declared too large",
        raw(vec![0u8; 200 << 10]).send().unwrap(),
        413,
        "payload-too-large",
    );
    let mut chunked = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN}\r\nX-Cvmfs-Repo: {REPO}\r\nX-Cvmfs-Path: /sw/x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..20 {
        chunked.extend_from_slice(b"4000\r\n");
        chunked.extend_from_slice(&[0u8; 0x4000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (answer, _) = raw_exchange(&addr, &chunked, Duration::from_secs(30));
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "streamed too large: {answer}"
    );
    tried.set(tried.get() + 1);
    // Wrong media types are refused before the body is read.
    for ct in ["application/json", "text/plain", "image/png"] {
        check(
            ct,
            raw(tarball.clone())
                .header("Content-Type", ct)
                .send()
                .unwrap(),
            415,
            "unsupported-media-type",
        );
    }
    // Malformed multipart, bad JSON bodies, unknown fields.
    // A multipart body that ends without its closing boundary.
    let broken = "--XYZ\r\nContent-Disposition: form-data; name=\"tar\"\r\n\r\nabc";
    let (answer, _) = raw_exchange(
        &addr,
        format!(
            "POST /api/v1/jobs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: multipart/form-data; boundary=XYZ\r\nContent-Length: {}\r\n\r\n{broken}",
            broken.len()
        )
        .as_bytes(),
        Duration::from_secs(30),
    );
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("Multipart stream is incomplete"),
        "broken multipart: {answer}"
    );
    tried.set(tried.get() + 1);
    let removals = format!("{}/api/v1/removals", d.url);
    let access = format!("{}/api/v1/access-events", d.url);
    for (what, url, body) in [
        ("removal: truncated JSON", &removals, "{\"repo\":"),
        ("removal: not an object", &removals, "[]"),
        (
            "removal: unknown field",
            &removals,
            "{\"repo\":\"x\",\"path\":\"/a\",\"evil\":1}",
        ),
        (
            "removal: wrong type",
            &removals,
            "{\"repo\":1,\"path\":\"/a\"}",
        ),
        ("access: truncated JSON", &access, "{\"repo\":"),
        (
            "access: events not a list",
            &access,
            "{\"repo\":\"daemon.example.org\",\"events\":3}",
        ),
    ] {
        check(
            what,
            c.post(url)
                .bearer_auth(ADMIN)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .unwrap(),
            400,
            "bad-request",
        );
    }
    // Query strings and bodies that do not parse, or are too large: the JSON error too.
    for q in ["limit=abc", "offset=-1", "offset="] {
        check(
            q,
            c.get(format!("{jobs}?{q}"))
                .bearer_auth(ADMIN)
                .send()
                .unwrap(),
            400,
            "bad-query",
        );
    }
    let r = c
        .get(format!("{jobs}?state=&repo="))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "empty parameters filter nothing");
    check(
        "removal: too large",
        c.post(&removals)
            .bearer_auth(ADMIN)
            .header("Content-Type", "application/json")
            .body(vec![b' '; 300 << 10])
            .send()
            .unwrap(),
        413,
        "payload-too-large",
    );
    // Path tricks in job ids find nothing (and never a file).
    for id in [
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e",
        "..;",
        "%00",
        "job.json",
        &"a".repeat(4000),
        "0b8f52b4-8a0e-4b7e-9d35-6f0a3c1e2d4f%2F..%2F..",
    ] {
        let r = c
            .get(format!("{}/api/v1/jobs/{id}", d.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap();
        let s = r.status().as_u16();
        assert!(s == 404 || s == 400, "GET job {id}: {s}");
        let r = c
            .post(format!("{}/api/v1/jobs/{id}/abort", d.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap();
        let s = r.status().as_u16();
        assert!(s == 404 || s == 400, "abort job {id}: {s}");
        tried.set(tried.get() + 2);
    }
    // A body that stops: 408 after upload_idle_timeout, its spool file removed.
    let head = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN}\r\nX-Cvmfs-Repo: {REPO}\r\nX-Cvmfs-Path: /sw/slow\r\nContent-Type: application/x-tar\r\nContent-Length: 50000\r\n\r\n"
    );
    let mut send = head.into_bytes();
    send.extend_from_slice(&[0u8; 1000]);
    let (answer, took) = raw_exchange(&addr, &send, Duration::from_secs(30));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("upload-stalled") || answer.contains("408"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    tried.set(tried.get() + 1);
    // Headers that never end: the connection is closed by the server.
    let (answer, took) = raw_exchange(
        &addr,
        format!("GET /api/v1/health HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").as_bytes(),
        Duration::from_secs(30),
    );
    assert!(
        took < Duration::from_secs(20),
        "slow headers held for {took:?}: {answer}"
    );
    tried.set(tried.get() + 1);
    // Huge headers: refused, the daemon stays up.
    let (answer, _) = raw_exchange(
        &addr,
        format!(
            "GET /api/v1/health HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(256 << 10)
        )
        .as_bytes(),
        Duration::from_secs(30),
    );
    assert!(
        answer.starts_with("HTTP/1.1 431")
            || answer.starts_with("HTTP/1.1 400")
            || answer.is_empty(),
        "{answer}"
    );
    tried.set(tried.get() + 1);
    // Garbage instead of HTTP.
    let (answer, _) = raw_exchange(&addr, &pseudo_random(4096, 5), Duration::from_secs(30));
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    tried.set(tried.get() + 1);

    incoming_empty(dir.path());
    healthy(&d);
    // And real work still goes through.
    let id = d.submit_id(ADMIN, "/sw/after", &tarball, None);
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    println!("http abuse: {} oversized, stalled, malformed or tricky requests, each refused with its status; daemon healthy, spool clean", tried.get());
}

/// Health checks asked for at once (several monitors, a load balancer) each write and remove a
/// probe file of their own: none reports the spool unwritable because another removed its file.
#[test]
fn concurrent_health_checks_all_see_a_healthy_service() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let url = format!("{}/api/v1/health", d.url);
    let bad: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let c = client();
                    (0..25)
                        .filter_map(|_| {
                            let r = c.get(&url).send().unwrap();
                            let status = r.status().as_u16();
                            (status != 200).then(|| format!("{status}: {}", r.text().unwrap()))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(
        bad.is_empty(),
        "{} of 200 not healthy: {:?}",
        bad.len(),
        bad.first()
    );
    incoming_empty(dir.path());
}

/// A submission header that is not plain ASCII is refused with the reason (it used to be taken
/// as absent: the job published without its tag description); a multipart content type is
/// recognised whatever its case (it used to be taken for a raw tar: `missing-repo`).
#[test]
fn non_ascii_headers_are_refused_and_the_multipart_type_is_case_blind() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let tar = tar_bytes(&[Spec::File {
        path: "f",
        mode: 0o644,
        data: b"x".to_vec(),
        xattrs: vec![],
    }]);
    let r = client()
        .post(format!("{}/api/v1/jobs", d.url))
        .bearer_auth(ADMIN)
        .header("X-Cvmfs-Repo", REPO)
        .header("X-Cvmfs-Path", "/sw/accent")
        .header(
            "X-Cvmfs-Tag-Description",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9 build").unwrap(),
        )
        .body(tar.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "bad-header", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-cvmfs-tag-description"),
        "{v}"
    );
    let mut body = Vec::new();
    for (name, value) in [("repo", REPO), ("path", "/sw/case")] {
        body.extend_from_slice(
            format!("--B\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(b"--B\r\nContent-Disposition: form-data; name=\"tar\"; filename=\"t.tar\"\r\nContent-Type: application/x-tar\r\n\r\n");
    body.extend_from_slice(&tar);
    body.extend_from_slice(b"\r\n--B--\r\n");
    let r = client()
        .post(format!("{}/api/v1/jobs", d.url))
        .bearer_auth(ADMIN)
        .header("Content-Type", "Multipart/Form-Data; boundary=B")
        .body(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().unwrap();
    assert_eq!(status, 202, "{v}");
    let id = v["job_id"].as_str().unwrap().to_string();
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
}
