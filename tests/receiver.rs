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
}
