//! Receiver mode: signed requests, inventory backed by the filter and confirmed on disk,
//! verified single and batch uploads, refused catalogs and tampering, 507 on a short disk, and
//! the filter rebuilt after a restart.

mod common;

use std::path::Path;

use common::*;
use prepub_core::hash::{Digest20, ObjectId, Suffix};
use prepub_core::object::compress_metadata;

const RSECRET: &str = "receiver-secret-for-tests";

fn start(dir: &Path) -> Rcv {
    start_receiver(dir, RSECRET, None, &[], "")
}

fn signed(
    method: &str,
    url: &str,
    path: &str,
    body: Vec<u8>,
    secret: &str,
    ts: i64,
) -> reqwest::blocking::RequestBuilder {
    signed_nonce(
        method,
        url,
        path,
        body,
        secret,
        ts,
        &uuid::Uuid::new_v4().to_string(),
    )
}

fn signed_nonce(
    method: &str,
    url: &str,
    path: &str,
    body: Vec<u8>,
    secret: &str,
    ts: i64,
    nonce: &str,
) -> reqwest::blocking::RequestBuilder {
    let sig = prepub_core::receiver::sign(secret.as_bytes(), method, path, &body, ts, nonce);
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    client()
        .request(m, format!("{url}{path}"))
        .header("X-Prepub-Timestamp", ts.to_string())
        .header("X-Prepub-Nonce", nonce)
        .header(
            "X-Prepub-Content-Sha256",
            prepub_core::receiver::body_digest(&body),
        )
        .header("Authorization", format!("PREPUB-HMAC {sig}"))
        .body(body)
}

fn now() -> i64 {
    prepub_core::timefmt::now()
}

fn code(r: reqwest::blocking::Response) -> (u16, String) {
    let s = r.status().as_u16();
    let v: serde_json::Value = r.json().unwrap_or_default();
    (s, v["error"]["code"].as_str().unwrap_or("").to_string())
}

fn inventory(r: &Rcv, ids: &[ObjectId]) -> Vec<String> {
    let path = format!("/api/v1/repos/{REPO}/inventory");
    let body = serde_json::to_vec(
        &serde_json::json!({"objects": ids.iter().map(|i| i.to_string()).collect::<Vec<_>>()}),
    )
    .unwrap();
    let v: serde_json::Value = signed("POST", &r.url, &path, body, RSECRET, now())
        .send()
        .unwrap()
        .json()
        .unwrap();
    v["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn receives_verified_objects_and_answers_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let (a, ab) = compress_metadata(b"chunk a", Suffix::Partial);
    let (b, bb) = compress_metadata(b"whole file b", Suffix::None);
    let (c, cb) = compress_metadata(b"chunk c", Suffix::Partial);
    assert_eq!(inventory(&r, &[a, b, c]).len(), 3);
    // One object at a time.
    let path = format!("/api/v1/repos/{REPO}/objects/{a}");
    assert_eq!(
        signed("PUT", &r.url, &path, ab.clone(), RSECRET, now())
            .send()
            .unwrap()
            .status()
            .as_u16(),
        201
    );
    assert_eq!(
        signed("PUT", &r.url, &path, ab.clone(), RSECRET, now() + 1)
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200,
        "second put is a no-op"
    );
    // A batch pack.
    let mut p = prepub_core::gateway::PackBuilder::new();
    p.add(b, bb.len());
    p.add(c, cb.len());
    let h = p.header();
    let mut body = h.header.clone();
    body.extend_from_slice(&bb);
    body.extend_from_slice(&cb);
    let bpath = format!("/api/v1/repos/{REPO}/objects");
    let resp = signed("POST", &r.url, &bpath, body, RSECRET, now())
        .header("X-Pack-Header-Size", h.header.len().to_string())
        .header("X-Pack-Digest", h.digest.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(inventory(&r, &[a, b, c]).is_empty());
    for (id, bytes) in [(a, &ab), (b, &bb), (c, &cb)] {
        assert_eq!(&std::fs::read(r.storage.join(id.path())).unwrap(), bytes);
    }
    // After a restart the inventory answers from the rebuilt filter.
    drop(r);
    let r = start(dir.path());
    let (d, _) = compress_metadata(b"new d", Suffix::Partial);
    assert_eq!(inventory(&r, &[a, b, c, d]), vec![d.to_string()]);
    let m = client()
        .get(format!("{}/api/v1/metrics", r.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        m.contains("cvmfs_receiver_inventory_requests_total 1"),
        "{m}"
    );
}

#[test]
fn refuses_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let (a, ab) = compress_metadata(b"chunk a", Suffix::Partial);
    let path = format!("/api/v1/repos/{REPO}/objects/{a}");
    // Tampered bytes.
    let mut bad = ab.clone();
    bad[3] ^= 1;
    assert_eq!(
        code(
            signed("PUT", &r.url, &path, bad, RSECRET, now())
                .send()
                .unwrap()
        ),
        (422, "hash-mismatch".into())
    );
    // Catalogs are never pre-placed.
    let (cat, catb) = compress_metadata(b"a catalog", Suffix::Catalog);
    let cpath = format!("/api/v1/repos/{REPO}/objects/{cat}");
    assert_eq!(
        code(
            signed("PUT", &r.url, &cpath, catb, RSECRET, now())
                .send()
                .unwrap()
        ),
        (403, "catalog-refused".into())
    );
    // Wrong secret, no signature, stale timestamp, replay.
    assert_eq!(
        code(
            signed("PUT", &r.url, &path, ab.clone(), "wrong", now())
                .send()
                .unwrap()
        )
        .0,
        401
    );
    assert_eq!(
        code(
            client()
                .put(format!("{}{path}", r.url))
                .body(ab.clone())
                .send()
                .unwrap()
        )
        .0,
        401
    );
    assert_eq!(
        code(
            signed("PUT", &r.url, &path, ab.clone(), RSECRET, now() - 3600)
                .send()
                .unwrap()
        )
        .0,
        401
    );
    let ts = now();
    assert_eq!(
        signed_nonce("PUT", &r.url, &path, ab.clone(), RSECRET, ts, "once")
            .send()
            .unwrap()
            .status()
            .as_u16(),
        201
    );
    assert_eq!(
        code(
            signed_nonce("PUT", &r.url, &path, ab.clone(), RSECRET, ts, "once")
                .send()
                .unwrap()
        ),
        (401, "unauthorized".into())
    );
    // A payload the disk cannot take: 507.
    let apath = format!("/api/v1/repos/{REPO}/announce");
    let body = serde_json::to_vec(
        &serde_json::json!({"payload_id": "p1", "objects": 10, "bytes": 1u64 << 60}),
    )
    .unwrap();
    assert_eq!(
        code(
            signed("POST", &r.url, &apath, body, RSECRET, now())
                .send()
                .unwrap()
        ),
        (507, "insufficient-storage".into())
    );
    let body =
        serde_json::to_vec(&serde_json::json!({"payload_id": "p2", "objects": 1, "bytes": 1000}))
            .unwrap();
    assert_eq!(
        signed("POST", &r.url, &apath, body, RSECRET, now())
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // Unknown repository.
    let upath = format!("/api/v1/repos/other.org/objects/{a}");
    assert_eq!(
        code(
            signed("PUT", &r.url, &upath, ab, RSECRET, now())
                .send()
                .unwrap()
        ),
        (404, "unknown-repository".into())
    );
    let _ = Digest20::of(b"");
}

#[test]
fn the_example_receiver_config_parses() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/receiver.yaml"))
            .unwrap();
    let f: cvmfs_prepub::receiver_server::ReceiverFile = serde_yaml::from_str(&text).unwrap();
    assert_eq!(f.repositories.len(), 2);
    assert_eq!(f.mode.as_deref(), Some("receiver"));
    // The commented MQTT block parses once uncommented.
    let mqtt: String = text
        .lines()
        .map(|l| {
            let key = l.trim_start_matches("# ").split(':').next().unwrap_or("");
            if l.starts_with("# ") && !key.contains(' ') && l.contains(": ") {
                l.trim_start_matches("# ")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let f: cvmfs_prepub::receiver_server::ReceiverFile = serde_yaml::from_str(&mqtt).unwrap();
    assert_eq!(f.broker_url.as_deref(), Some("tls://broker.cern.ch:8883"));
    assert_eq!(f.node_id.as_deref(), Some("stratum1-cern"));
    assert_eq!(f.repos, Some(vec!["atlas.cern.ch".to_string()]));
}

/// Starts the receiver binary with `yaml` and the given secret; returns its exit status and
/// stderr (it must refuse to start).
fn refused_start(dir: &Path, yaml: &str, secret: &str) -> (Option<i32>, String) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("receiver.yaml");
    std::fs::write(
        &cfg,
        format!(
            "mode: receiver\ncas:\n  root: {}\nrepositories:\n  - name: {REPO}\n{yaml}",
            dir.join("cas").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args(["--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("PREPUB_RECEIVER_SECRET", secret)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_receiver_nobody_could_authenticate_to_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    // Neither a shared secret nor mutual TLS.
    let (code, err) = refused_start(&dir.path().join("a"), "", "");
    assert_ne!(code, Some(0));
    assert!(
        err.contains("PREPUB_RECEIVER_SECRET is not set, server.client_ca is not configured and there is no broker_url"),
        "{err}"
    );
    // Client certificates without a TLS listener.
    let (code, err) = refused_start(
        &dir.path().join("b"),
        "server:\n  client_ca: /nonexistent/ca.crt\n",
        "",
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("server.client_ca: mutual TLS needs server.tls_cert"),
        "{err}"
    );
}

#[test]
fn announcements_reserve_the_space_they_were_granted() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let free = {
        let c = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_bavail as u64 * s.f_frsize as u64
    };
    // Above the default server.min_free_space of 1 GiB.
    let room = free - (1u64 << 30);
    assert!(room > 2 << 30, "the test needs more than 3 GiB free");
    // Each payload alone fits (0.66 of the room with its 10 %), two together do not (1.26).
    let size = room / 10 * 6;
    let apath = format!("/api/v1/repos/{REPO}/announce");
    let announce = |id: &str| {
        let body = serde_json::to_vec(
            &serde_json::json!({"payload_id": id, "objects": 100, "bytes": size}),
        )
        .unwrap();
        signed("POST", &r.url, &apath, body, RSECRET, now())
            .send()
            .unwrap()
    };
    assert_eq!(announce("first").status(), 200);
    let second = announce("second");
    assert_eq!(second.status(), 507);
    let v: serde_json::Value = second.json().unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("({size} held for other payloads)")),
        "{v}"
    );
    // Announcing the same payload again replaces its own reservation.
    assert_eq!(announce("first").status(), 200);
    // A publisher that is done announces nothing more for its payload: the space is free again.
    let done =
        serde_json::to_vec(&serde_json::json!({"payload_id": "first", "objects": 0, "bytes": 0}))
            .unwrap();
    assert_eq!(
        signed("POST", &r.url, &apath, done, RSECRET, now())
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(announce("second").status(), 200);
}

/// A request without acceptable credentials is refused before its body is read: an
/// unauthenticated client declaring a huge body gets its 401 at once, without sending a byte
/// of it (the receiver never buffers what nobody may store).
#[test]
fn credentials_are_checked_before_the_body_is_read() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let addr = r.url.trim_start_matches("http://").to_string();
    let (a, _) = compress_metadata(b"chunk a", Suffix::Partial);
    for (what, auth, why) in [
        ("no credentials", String::new(), "signed request required"),
        (
            "an unknown upload token",
            "Authorization: Bearer not-a-token\r\n".into(),
            "upload token unknown",
        ),
        (
            "a stale signature",
            format!(
                "X-Prepub-Timestamp: {}\r\nX-Prepub-Nonce: n1\r\nX-Prepub-Content-Sha256: {}\r\nAuthorization: PREPUB-HMAC 00\r\n",
                now() - 86_400,
                "ab".repeat(32)
            ),
            "outside the replay window",
        ),
        // Fresh and well-formed but not made with the secret: before, the receiver read all
        // of a declared gigabyte to hash it before it could tell.
        (
            "a forged signature",
            format!(
                "X-Prepub-Timestamp: {}\r\nX-Prepub-Nonce: n2\r\nX-Prepub-Content-Sha256: {}\r\nAuthorization: PREPUB-HMAC {}\r\n",
                now(),
                "ab".repeat(32),
                "cd".repeat(32)
            ),
            "bad signature",
        ),
        (
            "a signature without the body digest",
            format!(
                "X-Prepub-Timestamp: {}\r\nX-Prepub-Nonce: n3\r\nAuthorization: PREPUB-HMAC {}\r\n",
                now(),
                "cd".repeat(32)
            ),
            "signed request required",
        ),
    ] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        write!(
            s,
            "PUT /api/v1/repos/{REPO}/objects/{a} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 1000000000\r\n\r\n"
        )
        .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = s.read(&mut answer).unwrap_or(0);
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "{what}: no refusal before the body: {answer:?}"
        );
        assert!(answer.contains("\"unauthorized\""), "{what}: {answer}");
        assert!(answer.contains(why), "{what}: {answer}");
    }
}

/// Writes, announced or not, leave `server.min_free_space` free: with more asked for than the
/// disk has, a valid object is refused (507) and not stored.
#[test]
fn a_write_that_would_eat_into_the_minimum_free_space_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = start_receiver(
        dir.path(),
        RSECRET,
        None,
        &[],
        "server:\n  min_free_space: 1000000TiB\n",
    );
    let (a, ab) = compress_metadata(b"chunk a", Suffix::Partial);
    let path = format!("/api/v1/repos/{REPO}/objects/{a}");
    assert_eq!(
        code(
            signed("PUT", &r.url, &path, ab, RSECRET, now())
                .send()
                .unwrap()
        ),
        (507, "insufficient-storage".into())
    );
    assert!(!r.storage.join(a.path()).exists());
}

/// A correctly signed request whose body is not the one its signature declares is refused
/// (and stores nothing).
#[test]
fn a_body_that_is_not_the_signed_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let (id, data) = compress_metadata(b"chunk a", Suffix::Partial);
    let path = format!("/api/v1/repos/{REPO}/objects/{id}");
    let signed_as = |body: &[u8], nonce: &str, shown: &dyn Fn(String) -> String| {
        let ts = now();
        let sig = prepub_core::receiver::sign(RSECRET.as_bytes(), "PUT", &path, body, ts, nonce);
        client()
            .put(format!("{}{path}", r.url))
            .header("X-Prepub-Timestamp", ts.to_string())
            .header("X-Prepub-Nonce", nonce)
            .header(
                "X-Prepub-Content-Sha256",
                shown(prepub_core::receiver::body_digest(body)),
            )
            .header("Authorization", format!("PREPUB-HMAC {sig}"))
    };
    let signed_for = |body: &[u8], nonce: &str| signed_as(body, nonce, &|d| d);
    let mut other = data.clone();
    other.push(0);
    let resp = signed_for(&other, "swap-1")
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let v: serde_json::Value = resp.json().unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{v}"
    );
    let stored = r.storage.join(id.path());
    assert!(!stored.exists());
    // Signed for what it carries: stored.
    let resp = signed_for(&data, "swap-2")
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(std::fs::read(&stored).unwrap(), data);
    // The digest header in capitals names the same bytes: the signature (over lowercase hex,
    // as documented) still holds.
    let resp = signed_as(&data, "swap-3", &|d| d.to_uppercase())
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text());
}

#[test]
fn an_inventory_of_more_names_than_a_request_may_hold_is_refused_before_it_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let path = format!("/api/v1/repos/{REPO}/inventory");
    let name = |i: usize| {
        let mut d = [0u8; 20];
        d[..8].copy_from_slice(&(i as u64).to_be_bytes());
        ObjectId::new(Digest20(d), Suffix::None).to_string()
    };
    let body = |n: usize| {
        serde_json::to_vec(&serde_json::json!({"objects": (0..n).map(name).collect::<Vec<_>>()}))
            .unwrap()
    };
    // The most a request may ask about is answered.
    let most = prepub_core::receiver::INVENTORY_MAX;
    let v: serde_json::Value = signed("POST", &r.url, &path, body(most), RSECRET, now())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["missing"].as_array().unwrap().len(), most);
    // One name more: refused, naming the limit.
    let resp = signed("POST", &r.url, &path, body(most + 1), RSECRET, now())
        .send()
        .unwrap();
    let (status, c) = code(resp);
    assert_eq!((status, c.as_str()), (400, "bad-request"));
    // A body larger than any such request (padded with spaces, still valid JSON): refused
    // as too large, though far below server.max_body_size (1 GiB by default).
    let mut padded = body(10);
    padded.extend(std::iter::repeat_n(
        b' ',
        prepub_core::receiver::INVENTORY_BODY_MAX,
    ));
    let resp = signed("POST", &r.url, &path, padded, RSECRET, now())
        .send()
        .unwrap();
    assert_eq!(code(resp), (413, "too-large".to_string()));
    // The receiver still answers.
    assert_eq!(
        inventory(&r, &[ObjectId::new(Digest20([7; 20]), Suffix::None)]).len(),
        1
    );
}
