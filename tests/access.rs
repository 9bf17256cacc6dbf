//! Access tracking through the daemon: batches on `POST /api/v1/access-events`, the publish
//! floor, and a Stratum 1 access log tailed across rotation — each visible in
//! `GET /api/v1/access/{repo}` and the metrics.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use prepub_core::hash::{Digest20, ObjectId, Suffix};

fn with_gc(dir: &std::path::Path, gc: &str) {
    prepare_daemon_dir(dir, "", "");
    let cfg = dir.join("config.yaml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("    gc:\n{gc}"));
    std::fs::write(&cfg, text).unwrap();
}

fn post(d: &Daemon, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = client()
        .post(format!("{}/api/v1/access-events", d.url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or_default())
}

fn seen(d: &Daemon, query: &str) -> serde_json::Value {
    client()
        .get(format!("{}/api/v1/access/{REPO}?{query}", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn id(s: &[u8]) -> ObjectId {
    ObjectId::new(Digest20::of(s), Suffix::None)
}

#[test]
fn api_batches_and_the_publish_floor() {
    let dir = tempfile::tempdir().unwrap();
    with_gc(dir.path(), "      access_collapse: 60s\n");
    let d = Daemon::start(dir.path(), &[]);
    let (a, b) = (id(b"a"), id(b"b"));
    let hex = b.digest.hex();
    let (code, r) = post(
        &d,
        ADMIN,
        serde_json::json!({"repo": REPO, "events": [
            {"object": a.to_string(), "time": 1000},
            {"object": format!("/cvmfs/{REPO}/data/{}/{}", &hex[..2], &hex[2..]), "path": "/sw/b", "time": 2000},
            {"object": a.to_string(), "time": 1030},
        ]}),
    );
    assert_eq!(code, 202, "{r}");
    assert_eq!(
        r,
        serde_json::json!({"applied": 2, "collapsed": 1, "revoked": 0, "revoked_bytes": 0})
    );
    let v = seen(&d, &format!("object={a}&path=/sw/b"));
    assert_eq!(v["object_seen"], 1000);
    assert_eq!(v["path_seen"], 2000);
    assert_eq!(v["objects_tracked"], 2);
    // Later accesses move the time forward; older ones never move it back.
    post(
        &d,
        ADMIN,
        serde_json::json!({"repo": REPO, "events": [{"object": a.to_string(), "time": 5000}, {"path": "/sw/b", "time": 10}]}),
    );
    let v = seen(&d, &format!("object={a}&path=/sw/b"));
    assert_eq!(
        (v["object_seen"].as_i64(), v["path_seen"].as_i64()),
        (Some(5000), Some(2000))
    );
    // Refusals.
    for (body, want) in [
        (
            serde_json::json!({"repo": REPO, "events": [{"time": 1}]}),
            400,
        ),
        (
            serde_json::json!({"repo": REPO, "events": [{"object": "not-a-hash"}]}),
            400,
        ),
        (
            serde_json::json!({"repo": REPO, "events": [{"path": "/x", "time": i64::MAX / 2}]}),
            400,
        ),
        (
            serde_json::json!({"repo": REPO, "events": [{"path": "/x", "extra": 1}]}),
            400,
        ),
        (serde_json::json!({"repo": "other.org", "events": []}), 404),
    ] {
        let (code, r) = post(&d, ADMIN, body.clone());
        assert_eq!(code, want, "{body} -> {r}");
        assert!(r["error"]["code"].is_string(), "{r}");
    }
    let many: Vec<_> = (0..10_001)
        .map(|i| serde_json::json!({"path": format!("/p{i}")}))
        .collect();
    assert_eq!(
        post(&d, ADMIN, serde_json::json!({"repo": REPO, "events": many})).0,
        400
    );
    // A scoped token with a prefix in the repository may feed it; no token may not.
    assert_eq!(
        post(
            &d,
            SCOPED,
            serde_json::json!({"repo": REPO, "events": [{"path": "/allowed/x"}]})
        )
        .0,
        202
    );
    let r = client()
        .post(format!("{}/api/v1/access-events", d.url))
        .json(&serde_json::json!({"repo": REPO, "events": []}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // A publish sets the floor of its path.
    let before = prepub_core::timefmt::now();
    let job = d.submit_id(
        ADMIN,
        "/sw/fresh",
        &tar_bytes(&[Spec::Dir("d", 0o755)]),
        None,
    );
    assert_eq!(d.wait_terminal(&job, 60)["state"], "published");
    let start = Instant::now();
    let v = loop {
        let v = seen(&d, "path=/sw/fresh");
        if !v["path_seen"].is_null() || start.elapsed() > Duration::from_secs(5) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(v["path_seen"].as_i64().unwrap() >= before, "{v}");
    let m = d.metrics_text();
    assert!(
        m.contains(&format!(
            "cvmfs_prepub_access_events_total{{repo=\"{REPO}\",source=\"publish\"}} 1"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "cvmfs_prepub_access_events_collapsed_total{{repo=\"{REPO}\"}} 1"
        )),
        "{m}"
    );
}

#[test]
fn a_repository_without_the_api_source_refuses_batches() {
    let dir = tempfile::tempdir().unwrap();
    with_gc(dir.path(), "      access_sources: [{type: publish}]\n");
    let d = Daemon::start(dir.path(), &[]);
    let (code, r) = post(
        &d,
        ADMIN,
        serde_json::json!({"repo": REPO, "events": [{"path": "/x"}]}),
    );
    assert_eq!(code, 409, "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("access_sources"));
}

#[test]
fn a_stratum1_access_log_is_tailed_across_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    // History before the daemon starts is not replayed.
    let line = |o: &ObjectId, repo: &str, when: &str| {
        let hex = o.digest.hex();
        format!(
            "10.0.0.1 - - [{when}] \"GET /cvmfs/{repo}/data/{}/{} HTTP/1.1\" 200 512 \"-\" \"cvmfs Fuse 2.11\"\n",
            &hex[..2],
            &hex[2..]
        )
    };
    let (old, a, b, c) = (id(b"old"), id(b"la"), id(b"lb"), id(b"lc"));
    std::fs::write(&log, line(&old, REPO, "10/Oct/2024:13:55:36 +0000")).unwrap();
    with_gc(
        dir.path(),
        &format!(
            "      access_sources:\n        - {{type: log, path: {}, regex: '\\[(?P<time>[^\\]]+)\\] \"GET /cvmfs/(?P<repo>[^/ ]+)(?P<hash>/data/\\S+) ', repo_group: repo}}\n",
            log.display()
        ),
    );
    let d = Daemon::start(dir.path(), &[]);
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(line(&a, REPO, "10/Oct/2024:13:55:36 +0000").as_bytes())
        .unwrap();
    f.write_all(line(&b, "other.org", "10/Oct/2024:13:55:36 +0000").as_bytes())
        .unwrap();
    f.write_all(b"a line of something else\n").unwrap();
    drop(f);
    let wait_for = |o: &ObjectId| {
        let start = Instant::now();
        loop {
            let v = seen(&d, &format!("object={o}"));
            if !v["object_seen"].is_null() {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{o} never seen: {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(wait_for(&a)["object_seen"], 1728568536);
    assert!(seen(&d, &format!("object={old}"))["object_seen"].is_null());
    assert!(seen(&d, &format!("object={b}"))["object_seen"].is_null());
    // logrotate: renamed away, a fresh file.
    std::fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    std::fs::write(&log, line(&c, REPO, "11/Oct/2024:00:00:00 +0200")).unwrap();
    assert_eq!(wait_for(&c)["object_seen"], 1728597600);
    let m = d.metrics_text();
    assert!(
        m.contains(&format!(
            "cvmfs_prepub_access_events_total{{repo=\"{REPO}\",source=\"log\"}} 2"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "cvmfs_prepub_access_log_lines_skipped_total{{repo=\"{REPO}\"}} 2"
        )),
        "{m}"
    );
}

#[test]
fn bad_log_sources_stop_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    with_gc(
        dir.path(),
        "      access_sources: [{type: log, path: /var/log/x, regex: '(?P<hash>\\S+)'}]\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args(["--config", dir.path().join("config.yaml").to_str().unwrap()])
        .env("PREPUB_API_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("repositories[0].gc.access_sources[0].time_group")
            && err.contains("no group named 'time'"),
        "{err}"
    );
}
