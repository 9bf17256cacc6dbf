//! Crash harness: rounds of concurrent jobs through the real daemon (standalone mode), the
//! daemon SIGKILLed at every journaled step (`CVMFS_PREPUB_TEST_CRASH=<point>#<n>`) and at
//! random moments, then restarted. After each round: every accepted job ends `published`
//! exactly once (its automatic tag appears once in the history) or `failed`/`aborted` with a
//! reason; no accepted job vanished; each published job's files read back through the
//! independent reader; the repository passes `repo check`; every stored object's name is the
//! SHA-1 of its bytes (nothing truncated or mismatched); the spool holds nothing but the known
//! jobs' directories. `PREPUB_CRASH_ROUNDS=<n>` repeats the random rounds (default 4) for a
//! longer run; the figures are printed.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use prepub_core::cas::{get_all, Cas, LocalCas};
use prepub_core::hash::Digest20;

const JOBS: usize = 5;

fn specs(round: usize, job: usize) -> Vec<Spec> {
    vec![
        Spec::Dir("bin", 0o755),
        Spec::File {
            path: "bin/tool",
            mode: 0o755,
            data: format!("tool of round {round} job {job}\n")
                .repeat(50)
                .into_bytes(),
            xattrs: vec![],
        },
        Spec::File {
            path: "lib/data.bin",
            mode: 0o644,
            data: pseudo_random(150_000 + job * 1000, (round * 100 + job) as u64),
            xattrs: vec![],
        },
        Spec::File {
            path: "lib/shared.txt",
            mode: 0o644,
            data: b"the same in every job\n".repeat(100),
            xattrs: vec![],
        },
    ]
}

/// Submits the round's jobs concurrently; returns the accepted ones (id → path).
fn submit_round(d: &Daemon, round: usize) -> BTreeMap<String, String> {
    let url = d.url.clone();
    let handles: Vec<_> = (0..JOBS)
        .map(|j| {
            let url = url.clone();
            let tar = tar_bytes(&specs(round, j));
            std::thread::spawn(move || {
                let path = format!("/r{round}/j{j}");
                let r = client()
                    .post(format!("{url}/api/v1/jobs"))
                    .bearer_auth(ADMIN)
                    .header("X-Cvmfs-Repo", REPO)
                    .header("X-Cvmfs-Path", &path)
                    .body(tar)
                    .send()
                    .ok()?;
                if r.status() != 202 {
                    return None;
                }
                let v: serde_json::Value = r.json().ok()?;
                Some((v["job_id"].as_str()?.to_string(), path))
            })
        })
        .collect();
    handles
        .into_iter()
        .filter_map(|h| h.join().unwrap())
        .collect()
}

/// The automatic tags of the current history, counted.
fn tag_counts(cas: &LocalCas) -> BTreeMap<String, usize> {
    let (m, _) = prepub_core::repo::current_manifest(cas).unwrap().unwrap();
    let h = m.history.unwrap();
    let bytes = prepub_core::object::decode_to_vec(&h, &get_all(cas, &h).unwrap(), true).unwrap();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), bytes).unwrap();
    let hist = prepub_core::history::History::open(tmp.path()).unwrap();
    let mut out = BTreeMap::new();
    for t in hist.tags().unwrap() {
        *out.entry(t.name).or_insert(0) += 1;
    }
    out
}

#[derive(Default)]
struct Totals {
    rounds: usize,
    kills: usize,
    accepted: usize,
    published: usize,
    failed: usize,
}

/// With the (restarted) daemon `d`, waits for every accepted job and checks the invariants.
fn check_round(
    d: &Daemon,
    dir: &std::path::Path,
    accepted: &BTreeMap<String, String>,
    round: usize,
    all_accepted: &mut HashSet<String>,
    totals: &mut Totals,
    what: &str,
) {
    all_accepted.extend(accepted.keys().cloned());
    let mut published = Vec::new();
    for (id, path) in accepted {
        let j = d.wait_terminal(id, 180);
        match j["state"].as_str().unwrap() {
            "published" => published.push((id.clone(), path.clone())),
            "failed" | "aborted" => {
                let reason = j["error"]["message"].as_str().unwrap_or("");
                assert!(
                    !reason.is_empty(),
                    "{what}: {id} ended without a reason: {j}"
                );
                eprintln!("{what}: {id} failed: {}", j["error"]);
                totals.failed += 1;
            }
            s => panic!("{what}: {id} ended {s}"),
        }
    }
    // No accepted job vanished (earlier rounds' too).
    let mut known: HashSet<String> = HashSet::new();
    loop {
        let page: serde_json::Value = client()
            .get(format!(
                "{}/api/v1/jobs?limit=1000&offset={}",
                d.url,
                known.len()
            ))
            .bearer_auth(ADMIN)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let jobs = page["jobs"].as_array().unwrap();
        if jobs.is_empty() {
            break;
        }
        known.extend(
            jobs.iter()
                .map(|j| j["job_id"].as_str().unwrap().to_string()),
        );
    }
    for id in all_accepted.iter() {
        assert!(known.contains(id), "{what}: accepted job {id} vanished");
    }
    // A job the daemon journaled but whose answer the crash cut off (the client never learned
    // of it) runs on as well: let it end here, or the next round's daemon resumes it at its
    // start and may stop at that round's crash point before it answers its health check.
    for id in known.iter().filter(|id| !accepted.contains_key(*id)) {
        d.wait_terminal(id, 180);
    }
    // Published exactly once.
    let cas = LocalCas::open(&d.storage).unwrap();
    let tags = tag_counts(&cas);
    for (id, _) in &published {
        assert_eq!(
            tags.get(&format!("prepub-{id}")).copied(),
            Some(1),
            "{what}: job {id} is not in the history exactly once\n{}",
            d.log_text()
        );
    }
    totals.published += published.len();
    totals.accepted += accepted.len();
    // Readable, whole.
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.join(format!("cache-{round}")));
    for (id, path) in &published {
        let j: usize = path.rsplit('j').next().unwrap().parse().unwrap();
        let _ = id;
        verify(&repo, path, &specs(round, j));
    }
    drop(repo);
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    // Every stored object is named by the SHA-1 of its bytes.
    for oid in cas.list().unwrap() {
        let bytes = get_all(&cas, &oid).unwrap();
        assert_eq!(
            Digest20::of(&bytes),
            oid.digest,
            "{what}: object {oid} is truncated or mismatched"
        );
    }
    // The spool holds only known jobs; nothing is left in incoming.
    let spool = dir.join("spool");
    for e in std::fs::read_dir(spool.join("jobs")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            known.contains(&name),
            "{what}: orphan spool directory {name}"
        );
    }
    let incoming = incoming_left(&spool);
    assert!(incoming.is_empty(), "{what}: orphan uploads {incoming:?}");
    totals.rounds += 1;
}

/// Starts the daemon with `env` and a crash at `point`, submits a round, waits for the crash,
/// restarts it with `env` and checks the round.
fn crash_round(
    dir: &std::path::Path,
    env: &[(&str, &str)],
    point: &str,
    round: usize,
    all: &mut HashSet<String>,
    totals: &mut Totals,
) {
    let mut crashing = env.to_vec();
    crashing.push(("CVMFS_PREPUB_TEST_CRASH", point));
    let mut d = Daemon::start(dir, &crashing);
    let accepted = submit_round(&d, round);
    assert!(
        d.wait_exit(90),
        "round {round}: the daemon did not stop at {point}; log:\n{}",
        d.log_text()
    );
    totals.kills += 1;
    drop(d);
    let d = Daemon::start(dir, env);
    check_round(&d, dir, &accepted, round, all, totals, point);
}

#[test]
fn jobs_survive_kills_at_every_step_and_at_random() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let mut totals = Totals::default();
    let mut all = HashSet::new();
    // Every journaled step of a job, hit by the n-th job to reach it.
    let points = [
        "accepted#2",
        "processing-journaled#1",
        "processing#3",
        "processed#2",
        "changeset-saved#4",
        "uploading-journaled#2",
        "committing-journaled#3",
        "commit-started#1",
        "manifest-written#2",
        "published-journaled#5",
    ];
    let mut round = 0;
    for point in points {
        round += 1;
        crash_round(dir.path(), &[], point, round, &mut all, &mut totals);
    }
    // Random moments: a SIGKILL some milliseconds into the round.
    let random_rounds: usize = std::env::var("PREPUB_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    for _ in 0..random_rounds {
        round += 1;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(50 + seed % 1500);
        let mut d = Daemon::start(dir.path(), &[]);
        let killer = {
            let pid = d.child.id();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                // SIGKILL, by PID: this test's own daemon only.
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            })
        };
        let start = Instant::now();
        let accepted = submit_round(&d, round);
        killer.join().unwrap();
        assert!(d.wait_exit(10));
        totals.kills += 1;
        drop(d);
        let what = format!(
            "random kill after {delay:?} (submissions took {:?})",
            start.elapsed()
        );
        let d = Daemon::start(dir.path(), &[]);
        check_round(
            &d,
            dir.path(),
            &accepted,
            round,
            &mut all,
            &mut totals,
            &what,
        );
    }
    // Every fault here is recoverable: nothing may end failed (a stale lease, for one, would
    // fail its job with lease-timeout).
    assert_eq!(totals.failed, 0);
    assert!(totals.published > 0);
    println!(
        "crash harness: {} rounds survived, {} SIGKILLs ({} at journaled steps, {} at random moments), {} jobs accepted, {} published exactly once, {} failed with a reason, 0 lost, 0 partial",
        totals.rounds,
        totals.kills,
        points.len(),
        random_rounds,
        totals.accepted,
        totals.published,
        totals.failed
    );
}

const RSECRET: &str = "crash-harness-receiver-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn gateway_mode_with_receivers_survives_kills_of_the_daemon_the_gateway_and_a_receiver() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let ports = [free_port(), free_port()];
    let start_rcv = |i: usize| {
        start_receiver(
            &dir.path().join(format!("s1-{i}")),
            RSECRET,
            Some(ports[i]),
            &[],
            "",
        )
    };
    let mut rcvs: Vec<Option<Rcv>> = vec![Some(start_rcv(0)), Some(start_rcv(1))];
    let eps: Vec<String> = rcvs
        .iter()
        .map(|r| format!("\"{}\"", r.as_ref().unwrap().url))
        .collect();
    let cfg = dir.path().join("config.yaml");
    // Retries that span an outage of a few seconds (1 + 2 + 4 + 8 s), as an operator would set.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "retry_backoff: 200ms",
        "retry_backoff: 1s\n  max_attempts: 5",
    );
    std::fs::write(
        &cfg,
        format!(
            "{text}distribution:\n  stratum1_endpoints: [{}]\n  quorum: 1.0\n  commit_anyway: false\n  timeout: 90s\n",
            eps.join(", ")
        ),
    )
    .unwrap();
    let mut gw = Some(GatewayDouble::start(dir.path(), &[], None));
    let gw_port = gw.as_ref().unwrap().port;
    let env = [
        ("PREPUB_RECEIVER_SECRET", RSECRET),
        ("CVMFS_GATEWAY_SECRET", GATEWAY_SECRET),
    ];
    // Writes the gateway settings into the config once; later starts reuse them.
    drop(gateway_daemon(
        dir.path(),
        gw.as_ref().unwrap(),
        "  lease_ttl: 20s\n",
        &env,
    ));
    let mut totals = Totals::default();
    let mut all = HashSet::new();
    let mut round = 100;
    // The daemon killed at the steps of a gateway commit and of the push to the receivers.
    let points = [
        "distributing-journaled#2",
        "distribution-ack#3",
        "committing-journaled#1",
        "commit-started#2",
        "lease-acquired#1",
        "manifest-written#1",
    ];
    for point in points {
        round += 1;
        let t0 = Instant::now();
        crash_round(dir.path(), &env, point, round, &mut all, &mut totals);
        eprintln!("round {round} ({point}) done after {:?}", t0.elapsed());
    }
    // The gateway double killed mid-round and back a second later on the same port; then a
    // receiver the same way. The daemon keeps running through both.
    let mut other_kills = 0;
    for victim in ["gateway", "receiver"] {
        round += 1;
        let t0 = Instant::now();
        let d = Daemon::start(dir.path(), &env);
        let accepted = submit_round(&d, round);
        std::thread::sleep(Duration::from_millis(50));
        match victim {
            "gateway" => {
                drop(gw.take());
                std::thread::sleep(Duration::from_secs(1));
                gw = Some(GatewayDouble::start(dir.path(), &[], Some(gw_port)));
            }
            _ => {
                drop(rcvs[1].take());
                std::thread::sleep(Duration::from_secs(1));
                rcvs[1] = Some(start_rcv(1));
            }
        }
        other_kills += 1;
        check_round(
            &d,
            dir.path(),
            &accepted,
            round,
            &mut all,
            &mut totals,
            victim,
        );
        // Every published job reached both receivers before its commit.
        for id in accepted.keys() {
            let j = d.job(id);
            if j["state"] == "published" {
                for r in rcvs.iter().flatten() {
                    let outcome = j["distribution"][&r.url].as_str().unwrap_or("");
                    assert!(outcome.starts_with("ok"), "{victim}: {id}: {j}");
                }
            }
        }
        eprintln!("round {round} ({victim}) done after {:?}", t0.elapsed());
    }
    // A daemon killed holding a lease gives it back at restart; outages of the gateway and a
    // receiver are ridden out by retries: nothing may end failed.
    assert_eq!(totals.failed, 0);
    assert!(totals.published > 0);
    println!(
        "crash harness (gateway mode, 2 receivers): {} rounds survived, {} daemon SIGKILLs at journaled steps, {other_kills} gateway/receiver kills, {} jobs accepted, {} published exactly once, {} failed with a reason, 0 lost, 0 partial",
        totals.rounds, totals.kills, totals.accepted, totals.published, totals.failed
    );
}
