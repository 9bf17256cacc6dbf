//! Stratum 1 pre-warming: a publisher with three receivers on loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const RSECRET: &str = "receiver-secret";

fn receiver(dir: &Path, name: &str) -> Rcv {
    receiver_with(dir, name, None, &[])
}

fn receiver_with(dir: &Path, name: &str, port: Option<u16>, env: &[(&str, &str)]) -> Rcv {
    start_receiver(&dir.join(name), RSECRET, port, env, "")
}

fn with_distribution(dir: &Path, rs: &[&Rcv], quorum: f64, commit_anyway: bool, timeout: &str) {
    with_distribution_extra(dir, rs, quorum, commit_anyway, timeout, "");
}

fn with_distribution_extra(
    dir: &Path,
    rs: &[&Rcv],
    quorum: f64,
    commit_anyway: bool,
    timeout: &str,
    extra: &str,
) {
    let cfg = dir.join("config.yaml");
    let eps: Vec<String> = rs.iter().map(|r| format!("\"{}\"", r.url)).collect();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = match text.find("distribution:") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    std::fs::write(
        &cfg,
        format!(
            "{text}distribution:\n  stratum1_endpoints: [{}]\n  quorum: {quorum}\n  commit_anyway: {commit_anyway}\n  timeout: {timeout}\n  per_s1_concurrency: 4\n{extra}",
            eps.join(", ")
        ),
    )
    .unwrap();
}

fn tree(tag: &str, extra: usize) -> Vec<Spec> {
    let mut v = vec![
        Spec::File {
            path: "lib/a.bin",
            mode: 0o644,
            data: pseudo_random(300_000, 1),
            xattrs: vec![],
        },
        Spec::File {
            path: "lib/big.bin",
            mode: 0o644,
            data: pseudo_random(20 << 20, 2),
            xattrs: vec![],
        },
        Spec::File {
            path: "lib/.cvmfscatalog",
            mode: 0o644,
            data: vec![],
            xattrs: vec![],
        },
    ];
    for i in 0..extra {
        let data = format!("{tag} extra {i}").into_bytes();
        v.push(Spec::File {
            path: Box::leak(format!("extra/{tag}-{i}").into_boxed_str()),
            mode: 0o644,
            data,
            xattrs: vec![],
        });
    }
    v
}

fn submit(d: &Daemon, path: &str, specs: &[Spec]) -> serde_json::Value {
    let id = d.submit_id(ADMIN, path, &tar_bytes(specs), None);
    d.wait_terminal(&id, 120)
}

/// Every data object of the current revision that the receiver must hold, checked by hash.
fn assert_prewarmed(publisher_storage: &Path, r: &Rcv) {
    let cas = prepub_core::cas::LocalCas::open(publisher_storage).unwrap();
    let ids: Vec<_> = prepub_core::cas::Cas::list(&cas).unwrap();
    let data: Vec<_> = ids.iter().filter(|i| i.suffix.is_data()).collect();
    assert!(!data.is_empty());
    for id in data {
        let bytes = std::fs::read(r.storage.join(id.path()))
            .unwrap_or_else(|_| panic!("{} lacks {id}", r.url));
        assert_eq!(prepub_core::hash::Digest20::of(&bytes), id.digest);
    }
    // Catalogs are never pre-placed.
    let placed =
        prepub_core::cas::Cas::list(&prepub_core::cas::LocalCas::open(&r.storage).unwrap())
            .unwrap();
    assert!(
        placed.iter().all(|i| i.suffix.is_data()),
        "a receiver holds a catalog"
    );
}

#[test]
fn three_receivers_quorum_and_incremental_pushes() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let rs: Vec<Rcv> = (0..3)
        .map(|i| receiver(dir.path(), &format!("s1-{i}")))
        .collect();
    with_distribution(
        dir.path(),
        &rs.iter().collect::<Vec<_>>(),
        1.0,
        false,
        "60s",
    );
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let j = submit(&d, "/sw/one", &tree("one", 5));
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    for r in &rs {
        let outcome = j["distribution"][&r.url].as_str().unwrap_or("");
        assert!(outcome.starts_with("ok:"), "{j}");
        assert_prewarmed(&d.storage, r);
    }
    // Mostly the same content again: only the new objects travel.
    let j2 = submit(&d, "/sw/two", &tree("two", 2));
    assert_eq!(j2["state"], "published", "{j2}");
    for r in &rs {
        let outcome = j2["distribution"][&r.url].as_str().unwrap();
        assert!(
            outcome.starts_with("ok: 2 objects"),
            "only the two new files: {outcome}"
        );
        assert_prewarmed(&d.storage, r);
    }
    drop(d);

    // One receiver down: a 0.66 quorum commits ...
    let mut rs = rs;
    let down = rs.pop().unwrap();
    let down_url = down.url.clone();
    drop(down);
    let all: Vec<&Rcv> = rs.iter().collect();
    let fake_down = Rcv {
        child: Command::new("true").spawn().unwrap(),
        url: down_url.clone(),
        storage: PathBuf::new(),
    };
    let mut with_down = all.clone();
    with_down.push(&fake_down);
    with_distribution(dir.path(), &with_down, 0.66, false, "20s");
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let j = submit(&d, "/sw/three", &tree("three", 1));
    assert_eq!(j["state"], "published", "{j}");
    // The dead endpoint is retried for a few seconds (a restarting receiver is back by then):
    // `pending` when the quorum let the commit go ahead, then its failure.
    let id = j["job_id"].as_str().unwrap();
    let seen = |j: &serde_json::Value| {
        j["distribution"][&down_url]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        seen(&j).starts_with("pending") || seen(&j).starts_with("failed"),
        "{j}"
    );
    assert!(
        eventually(30, || seen(&d.job(id)).starts_with("failed")),
        "{}",
        d.job(id)
    );
    drop(d);
    // ... 0.75 without commit_anyway fails with the reason ...
    with_distribution(dir.path(), &with_down, 0.75, false, "20s");
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let j = submit(&d, "/sw/four", &tree("four", 1));
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "distribution-quorum");
    assert_eq!(j["error"]["state"], "distributing");
    drop(d);
    // ... and with commit_anyway it commits.
    with_distribution(dir.path(), &with_down, 0.75, true, "20s");
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let j = submit(&d, "/sw/five", &tree("five", 1));
    assert_eq!(j["state"], "published", "{j}");
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    // Per-endpoint distribution metrics moved for the receivers that were up.
    let m = d.metrics_text();
    let up = &with_down[0].url;
    for name in [
        format!("cvmfs_prepub_distribution_duration_seconds_count{{stratum1=\"{up}\"}}"),
        format!("cvmfs_prepub_distribution_objects_total{{stratum1=\"{up}\"}}"),
        format!("cvmfs_prepub_distribution_bytes_total{{stratum1=\"{up}\"}}"),
    ] {
        let v: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
            .parse()
            .unwrap();
        assert!(v > 0.0, "{name} = {v}");
    }
}

/// Small objects travel together: a payload of some 300 of them reaches the receiver in a few
/// packs (of at most 128 objects each, one pack being built per pusher thread at a time),
/// every object stored and counted once; the big file's chunks go one request each.
#[test]
fn small_objects_are_pushed_in_packs() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let r = receiver(dir.path(), "s1");
    with_distribution(dir.path(), &[&r], 1.0, false, "60s");
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let j = submit(&d, "/sw/packs", &tree("packs", 300));
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    assert_prewarmed(&d.storage, &r);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let data: Vec<_> = prepub_core::cas::Cas::list(&cas)
        .unwrap()
        .into_iter()
        .filter(|i| i.suffix.is_data())
        .collect();
    let small = data
        .iter()
        .filter(|i| prepub_core::cas::Cas::size(&cas, i).unwrap() < 1 << 20)
        .count();
    assert!(small > 300, "{small} small objects");
    let m = r.metrics_text();
    let counter = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {m}"))
    };
    assert_eq!(
        counter("cvmfs_receiver_objects_received_total "),
        data.len() as u64
    );
    // At most one partly filled pack per pusher thread (8) beyond the full ones.
    let packs = counter("cvmfs_receiver_packs_received_total ");
    assert!(
        packs >= small.div_ceil(128) as u64 && packs <= (small.div_ceil(128) + 8) as u64,
        "{packs} packs for {small} small objects"
    );
}

#[test]
fn a_slow_receiver_runs_into_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let fast = receiver(dir.path(), "fast");
    let slow = receiver_with(
        dir.path(),
        "slow",
        None,
        &[("CVMFS_PREPUB_TEST_HOLD", "receiver-put=3000")],
    );
    with_distribution(dir.path(), &[&fast, &slow], 1.0, true, "2s");
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let j = submit(&d, "/sw/slow", &tree("slow", 3));
    assert_eq!(
        j["state"], "published",
        "commit_anyway after the timeout: {j}"
    );
    assert!(
        j["distribution"][&fast.url]
            .as_str()
            .unwrap()
            .starts_with("ok:"),
        "{j}"
    );
    // The verdict keeps the endpoint's last progress report.
    let slow_outcome = j["distribution"][&slow.url].as_str().unwrap();
    assert!(
        slow_outcome.starts_with("failed: timed out (pushing: ")
            && slow_outcome.contains(" objects held"),
        "{j}"
    );
    let waited = j["state_times"]["committing"].as_i64().unwrap()
        - j["state_times"]["distributing"].as_i64().unwrap();
    assert!(
        waited >= 1900,
        "the job waited for the timeout ({waited} ms)"
    );
}

#[test]
fn a_receiver_restarted_mid_push_completes() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let port = free_port();
    let r = receiver_with(
        dir.path(),
        "restarting",
        Some(port),
        &[("CVMFS_PREPUB_TEST_HOLD", "receiver-put=300")],
    );
    let url = r.url.clone();
    with_distribution(dir.path(), &[&r], 1.0, false, "60s");
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let specs = tree("restart", 12);
    let t = tar_bytes(&specs);
    let resp = d.submit_raw(ADMIN, "/sw/r", &t, None);
    let id = resp.json::<serde_json::Value>().unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&id, "distributing", 30);
    std::thread::sleep(std::time::Duration::from_millis(700));
    drop(r); // the receiver goes away mid-push ...
    let r = receiver_with(dir.path(), "restarting", Some(port), &[]); // ... and comes back
    assert_eq!(r.url, url);
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    assert_prewarmed(&d.storage, &r);
}

#[test]
fn a_receiver_down_at_the_announcement_and_back_soon_gets_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let port = free_port();
    let r = receiver_with(dir.path(), "late", Some(port), &[]);
    with_distribution(dir.path(), &[&r], 1.0, false, "60s");
    drop(r); // down when the job announces its payload ...
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let id = d.submit_id(ADMIN, "/sw/late", &tar_bytes(&tree("late", 3)), None);
    d.wait_state(&id, "distributing", 30);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = receiver_with(dir.path(), "late", Some(port), &[]); // ... back a moment later
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    assert!(
        j["distribution"][&r.url]
            .as_str()
            .unwrap()
            .starts_with("ok:"),
        "{j}"
    );
    assert_prewarmed(&d.storage, &r);
}

#[test]
fn wrong_credentials_fail_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let r = receiver(dir.path(), "other-secret");
    with_distribution(dir.path(), &[&r], 1.0, false, "30s");
    // The publisher signs with a secret this receiver does not share.
    let d = Daemon::start(
        dir.path(),
        &[("PREPUB_RECEIVER_SECRET", "not-the-receivers-secret")],
    );
    let j = submit(&d, "/sw/x", &tree("x", 1));
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "distribution-quorum");
    let outcome = j["distribution"][&r.url].as_str().unwrap();
    assert!(outcome.starts_with("failed: HTTP 401"), "{outcome}");
    assert!(!d.log_text().contains("not-the-receivers-secret"));
}

#[test]
fn a_publisher_restart_while_distributing_resumes() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let rs: Vec<Rcv> = (0..2)
        .map(|i| receiver(dir.path(), &format!("s1-{i}")))
        .collect();
    with_distribution(
        dir.path(),
        &rs.iter().collect::<Vec<_>>(),
        1.0,
        false,
        "60s",
    );
    let mut d = Daemon::start(
        dir.path(),
        &[
            ("PREPUB_RECEIVER_SECRET", RSECRET),
            ("CVMFS_PREPUB_TEST_CRASH", "distributing-journaled"),
        ],
    );
    let _ = d.submit_raw(ADMIN, "/sw/resume", &tar_bytes(&tree("resume", 3)), None);
    assert!(
        d.wait_exit(30),
        "the daemon should crash at distributing-journaled"
    );
    drop(d);
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let all: serde_json::Value = d.jobs();
    let id = all["jobs"][0]["job_id"].as_str().unwrap().to_string();
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}");
    for r in &rs {
        assert_prewarmed(&d.storage, r);
    }
}

#[test]
fn a_receiver_without_room_refuses_the_payload_and_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let ok = receiver(dir.path(), "s1-ok");
    // No filesystem here has 100000 TiB free: every announcement is refused with 507.
    let full = start_receiver(
        &dir.path().join("s1-full"),
        RSECRET,
        None,
        &[],
        "server:\n  min_free_space: 100000TiB\n",
    );
    with_distribution(dir.path(), &[&ok, &full], 1.0, false, "30s");
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let j = submit(&d, "/sw/full", &tree("full", 2));
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "distribution-quorum", "{j}");
    let outcome = j["distribution"][&full.url].as_str().unwrap_or("");
    assert!(
        outcome.starts_with("failed: HTTP 507") && outcome.contains("needs"),
        "{j}"
    );
    assert!(
        j["distribution"][&ok.url]
            .as_str()
            .unwrap_or("")
            .starts_with("ok:"),
        "{j}"
    );
    // The refused receiver was sent nothing after the announcement.
    let held = prepub_core::cas::LocalCas::open(&full.storage)
        .map(|c| prepub_core::cas::Cas::list(&c).unwrap_or_default())
        .unwrap_or_default();
    assert!(
        held.is_empty(),
        "{} objects reached the full receiver",
        held.len()
    );
}

/// A test CA (`certs/`) with a receiver certificate for 127.0.0.1 and two client certificates
/// (`publisher`, `other-node`), plus a rogue CA (`rogue/`) with its own `publisher`.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gen-certs.sh");
    let (c, rogue) = (dir.join("certs"), dir.join("rogue"));
    let runs: [(&Path, &[&str]); 6] = [
        (&c, &["ca"]),
        (&c, &["server", "s1", "127.0.0.1"]),
        (&c, &["client", "publisher"]),
        (&c, &["client", "other-node"]),
        (&rogue, &["ca"]),
        (&rogue, &["client", "publisher"]),
    ];
    for (d, args) in runs {
        let st = Command::new("bash")
            .arg(script)
            .arg(d)
            .args(args)
            .env("CERT_KEY", "ec")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "gen-certs.sh {args:?}");
    }
    (c, rogue)
}

fn tls_client(ca: &Path, identity: Option<(&Path, &str)>) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(&std::fs::read(ca.join("ca.crt")).unwrap())
                .unwrap(),
        )
        .timeout(std::time::Duration::from_secs(10));
    if let Some((dir, name)) = identity {
        let mut pem = std::fs::read(dir.join(format!("{name}.crt"))).unwrap();
        pem.extend(std::fs::read(dir.join(format!("{name}.key"))).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

#[test]
fn mutual_tls_lets_in_certified_publishers_only() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let (c, rogue) = make_certs(dir.path());
    let c = c.display().to_string();
    // No shared secret at all: the client certificate is the only way in.
    let r = start_receiver(
        &dir.path().join("s1"),
        "",
        None,
        &[],
        &format!(
            "server:\n  tls_cert: {c}/s1.crt\n  tls_key: {c}/s1.key\n  client_ca: {c}/ca.crt\nauth:\n  allowed_clients: [publisher]\n"
        ),
    );
    assert!(r.url.starts_with("https://127.0.0.1:"), "{}", r.url);
    with_distribution_extra(
        dir.path(),
        &[&r],
        1.0,
        false,
        "60s",
        &format!(
            "  client_cert: {c}/publisher.crt\n  client_key: {c}/publisher.key\n  ca_cert: {c}/ca.crt\n"
        ),
    );
    let d = Daemon::start(dir.path(), &[]);
    let j = submit(&d, "/sw/mtls", &tree("mtls", 2));
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    let outcome = j["distribution"][&r.url].as_str().unwrap();
    assert!(outcome.starts_with("ok: "), "{outcome}");
    assert_prewarmed(&d.storage, &r);

    let c = PathBuf::from(c);
    let inventory = |client: &reqwest::blocking::Client| {
        client
            .post(format!("{}/api/v1/repos/{REPO}/inventory", r.url))
            .json(&serde_json::json!({"objects": []}))
            .send()
    };
    let ok = inventory(&tls_client(&c, Some((&c, "publisher")))).unwrap();
    assert_eq!(ok.status(), 200);
    // No certificate (and nothing to sign with): 401.
    let anon = inventory(&tls_client(&c, None)).unwrap();
    assert_eq!(anon.status(), 401);
    let v: serde_json::Value = anon.json().unwrap();
    assert_eq!(v["error"]["message"], "a client certificate is required");
    // A certificate from the right CA whose CN is not allowed: 401.
    let other = inventory(&tls_client(&c, Some((&c, "other-node")))).unwrap();
    assert_eq!(other.status(), 401);
    let v: serde_json::Value = other.json().unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'other-node' is not in auth.allowed_clients"),
        "{v}"
    );
    // The same CN from a CA the receiver does not trust: the handshake is refused.
    assert!(inventory(&tls_client(&c, Some((&rogue, "publisher")))).is_err());
    // The receiver is still healthy after the refused handshake.
    assert_eq!(
        inventory(&tls_client(&c, Some((&c, "publisher"))))
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn a_publisher_crash_mid_push_resumes_from_the_journaled_acknowledgements() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let r = receiver(dir.path(), "s1");
    with_distribution(dir.path(), &[&r], 1.0, false, "60s");
    let mut d = Daemon::start(
        dir.path(),
        &[
            ("PREPUB_RECEIVER_SECRET", RSECRET),
            ("CVMFS_PREPUB_TEST_CRASH", "distribution-ack#6"),
        ],
    );
    let _ = d.submit_raw(ADMIN, "/sw/acks", &tar_bytes(&tree("acks", 16)), None);
    assert!(d.wait_exit(60), "the daemon should crash at the 6th ack");
    drop(d);
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let all: serde_json::Value = d.jobs();
    let id = all["jobs"][0]["job_id"].as_str().unwrap().to_string();
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}");
    assert_prewarmed(&d.storage, &r);
    // "ok: P objects (B bytes) pushed, Q already present, A acknowledged before a restart"
    let outcome = j["distribution"][&r.url].as_str().unwrap().to_string();
    let nums: Vec<u64> = outcome
        .split(|ch: char| !ch.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    assert_eq!(nums.len(), 4, "{outcome}");
    let (pushed, present, resumed) = (nums[0], nums[2], nums[3]);
    assert!(
        outcome.ends_with("acknowledged before a restart") && resumed >= 6,
        "{outcome}"
    );
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let data = prepub_core::cas::Cas::list(&cas)
        .unwrap()
        .into_iter()
        .filter(|i| i.suffix.is_data())
        .count() as u64;
    assert_eq!(pushed + present + resumed, data, "{outcome}");
    // Every object reached the receiver exactly once over both runs.
    let m = r.metrics_text();
    assert!(
        m.contains(&format!("cvmfs_receiver_objects_received_total {data}\n")),
        "{m}"
    );
    // A terminal job keeps no acknowledgement log.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("spool/jobs").join(&id))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("acks-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A job aborted while it pre-warms stays `aborted` when its pre-warming later ends, even
/// without a quorum (`commit_anyway: false` would otherwise fail it).
#[test]
fn a_job_aborted_while_distributing_stays_aborted() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let slow = receiver_with(
        dir.path(),
        "slow",
        None,
        &[("CVMFS_PREPUB_TEST_HOLD", "receiver-put=3000")],
    );
    with_distribution(dir.path(), &[&slow], 1.0, false, "2s");
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let id = d.submit_id(ADMIN, "/sw/gone", &tar_bytes(&tree("gone", 3)), None);
    d.wait_state(&id, "distributing", 30);
    d.abort(&id);
    assert_eq!(d.wait_terminal(&id, 30)["state"], "aborted");
    // Past the pre-warming timeout: still aborted, no failure recorded.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let j = d.job(&id);
    assert_eq!(j["state"], "aborted", "{j}");
    assert!(j["error"].is_null(), "{j}");
}

/// An endpoint written with the CVMFS base path, as the install guide writes them
/// (`https://s1:9100/cvmfs`), is pushed to like one without it (signed requests included).
#[test]
fn an_endpoint_with_the_cvmfs_path_is_pushed_to() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let r = receiver(dir.path(), "s1-path");
    with_distribution(dir.path(), &[&r], 1.0, false, "60s");
    let cfg = dir.path().join("config.yaml");
    let endpoint = format!("{}/cvmfs", r.url);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace(&r.url, &endpoint)).unwrap();
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let j = submit(&d, "/sw/path", &tree("path", 3));
    assert_eq!(j["state"], "published", "{j}");
    let outcome = j["distribution"][&endpoint].as_str().unwrap_or("");
    assert!(outcome.starts_with("ok:"), "{j}");
    assert_prewarmed(&d.storage, &r);
}

/// An endpoint answering every request `200` with something that is not the receiver's JSON
/// (a proxy's page in front of a Stratum 1, say): its inventory answer is unreadable, so the
/// endpoint fails with that reason instead of counting every object as held (which met the
/// quorum with nothing pre-warmed).
#[test]
fn an_unreadable_inventory_answer_fails_the_endpoint() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let page = "<html>maintenance</html>";
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
            });
        }
    });
    let cfg = dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}distribution:\n  stratum1_endpoints: [\"{url}\"]\n  quorum: 1.0\n  commit_anyway: false\n  timeout: 30s\n"),
    )
    .unwrap();
    let d = Daemon::start(dir.path(), &[("PREPUB_RECEIVER_SECRET", RSECRET)]);
    let j = submit(&d, "/sw/proxy", &tree("proxy", 1));
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "distribution-quorum", "{j}");
    let outcome = j["distribution"][&url].as_str().unwrap();
    assert!(
        outcome.starts_with("failed: unreadable inventory answer"),
        "{outcome}"
    );
}
