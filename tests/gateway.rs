//! Gateway publish mode against the gateway double: publishing, forced and real lease
//! conflicts, a lease that expires mid-job, a lagging manifest (merge_error), bad credentials,
//! and a gateway restart. The repository is read back with the independent `cvmfs` reader.

mod common;

use std::path::Path;

use common::*;

const SECRET: &str = GATEWAY_SECRET;
type Double = GatewayDouble;

fn tree(tag: &'static str) -> Vec<Spec> {
    vec![
        Spec::Dir("bin", 0o755),
        Spec::File {
            path: "bin/tool",
            mode: 0o755,
            data: format!("tool {tag}\n").into_bytes(),
            xattrs: vec![],
        },
        Spec::Symlink("bin/link", "tool"),
        Spec::File {
            path: "lib/.cvmfscatalog",
            mode: 0o644,
            data: vec![],
            xattrs: vec![],
        },
        Spec::File {
            path: "lib/big.bin",
            mode: 0o644,
            data: pseudo_random(200_000, tag.len() as u64),
            xattrs: vec![],
        },
    ]
}

fn submit(d: &Daemon, path: &str, specs: &[Spec]) -> String {
    let r = d.submit_raw(ADMIN, path, &tar_bytes(specs), None);
    assert_eq!(r.status().as_u16(), 202);
    r.json::<serde_json::Value>().unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn check(storage: &Path) {
    ok(&["repo", "check", "--repo-dir", storage.to_str().unwrap()]);
}

#[test]
fn publishes_through_the_gateway_with_forced_busy_paths() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &["--force-path-busy", "2"], None);
    // With the master public key configured, the Stratum 0 whitelist is verified too.
    let extra = format!(
        "  public_keys_dir: {}\n  heartbeat_interval: 100ms\n",
        dir.path().join("keys").display()
    );
    let d = gateway_daemon(dir.path(), &gw, &extra, &[]);
    let h: serde_json::Value = client()
        .get(format!("{}/api/v1/health", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(h["status"], "ok", "{h}");
    let a = submit(&d, "/sw/a/1.0", &tree("a"));
    let ja = d.wait_terminal(&a, 60);
    assert_eq!(ja["state"], "published", "{ja}\n{}", d.log_text());
    assert_eq!(ja["revision"], 2);
    let b = submit(&d, "/sw/b", &tree("b"));
    let jb = d.wait_terminal(&b, 60);
    assert_eq!(jb["state"], "published", "{jb}");
    assert_eq!(jb["revision"], 3);
    // Replace the same path.
    let a2 = submit(&d, "/sw/a/1.0", &tree("a2"));
    assert_eq!(d.wait_terminal(&a2, 60)["state"], "published");
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw/a/1.0", &tree("a2"));
    verify(&repo, "/sw/b", &tree("b"));
    assert!(
        repo.lookup("/sw/a/1.0/lib")
            .unwrap()
            .is_nested_catalog_mountpoint()
            || repo
                .lookup("/sw/a/1.0/lib")
                .unwrap()
                .is_nested_catalog_root()
    );
    drop(repo);
    check(&d.storage);
    // The lease heartbeat ticked and its lateness was measured.
    let m = d.metrics_text();
    let ticks: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("cvmfs_prepub_lease_heartbeat_lateness_seconds_count "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(ticks >= 1.0, "{m}");
}

#[test]
fn waits_for_a_lease_held_by_another_publisher() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    // Another publisher holds the whole repository.
    let body = br#"{"path":"daemon.example.org/","api_version":"2","hostname":"other"}"#;
    let auth = prepub_core::gateway::authorization("prepub-key", SECRET.as_bytes(), body);
    let v: serde_json::Value = client()
        .post(format!("{}/api/v1/leases", gw.url))
        .header("Authorization", auth)
        .body(body.to_vec())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    let token = v["session_token"].as_str().unwrap().to_string();
    let d = gateway_daemon(dir.path(), &gw, "", &[]);
    let id = submit(&d, "/sw/x", &tree("x"));
    std::thread::sleep(std::time::Duration::from_secs(2));
    let j = d.job(&id);
    assert_eq!(j["state"], "committing", "must wait for the lease");
    assert!(
        j["waiting"]
            .as_str()
            .unwrap_or("")
            .contains("waiting for the gateway lease on daemon.example.org/sw"),
        "{j}"
    );
    let auth =
        prepub_core::gateway::authorization("prepub-key", SECRET.as_bytes(), token.as_bytes());
    let v: serde_json::Value = client()
        .delete(format!("{}/api/v1/leases/{token}", gw.url))
        .header("Authorization", auth)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    check(&d.storage);
}

#[test]
fn bad_credentials_fail_the_job_once_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    let d = gateway_daemon(
        dir.path(),
        &gw,
        "",
        &[("CVMFS_GATEWAY_SECRET", "wrong-secret")],
    );
    let id = submit(&d, "/sw/x", &tree("x"));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "failed");
    assert_eq!(j["error"]["code"], "gateway-credentials");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid_hmac"),
        "{j}"
    );
    assert_eq!(j["attempts"], 1, "no retry storm");
    assert!(
        !d.log_text().contains("wrong-secret"),
        "the secret must never be logged"
    );
}

#[test]
fn lagging_manifest_merge_errors_are_retried_after_it_advances() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &["--manifest-lag", "2s"], None);
    let d = gateway_daemon(dir.path(), &gw, "", &[]);
    let a = submit(&d, "/sw/p", &tree("one"));
    assert_eq!(d.wait_terminal(&a, 60)["state"], "published");
    // Right after, the Stratum 0 still shows the old manifest: the next job builds on it.
    let b = submit(&d, "/sw/p", &tree("two"));
    let jb = d.wait_terminal(&b, 90);
    assert_eq!(jb["state"], "published", "{jb}\n{}", d.log_text());
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw/p", &tree("two"));
    drop(repo);
    check(&d.storage);
}

#[test]
fn a_lease_that_expires_mid_job_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &["--max-lease-time", "1s"], None);
    // The first lease runs out while the commit is held; the next one is not held.
    let d = gateway_daemon(
        dir.path(),
        &gw,
        "",
        &[("CVMFS_PREPUB_TEST_HOLD", "lease-acquired#1=1500")],
    );
    let id = submit(&d, "/sw/e", &tree("e"));
    let j = d.wait_terminal(&id, 90);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    check(&d.storage);
}

#[test]
fn survives_a_gateway_restart() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "  max_attempts: 8\n", "");
    let gw = Double::start(dir.path(), &[], None);
    let port = gw.port;
    let d = gateway_daemon(
        dir.path(),
        &gw,
        "",
        &[("CVMFS_PREPUB_TEST_HOLD", "lease-acquired#1=1500")],
    );
    let id = submit(&d, "/sw/r", &tree("r"));
    let lease_file = dir.path().join("spool/jobs").join(&id).join("lease.token");
    assert!(eventually(30, || lease_file.exists()), "no lease taken");
    drop(gw); // the gateway goes away mid-commit, holding the lease ...
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _gw2 = Double::start(dir.path(), &[], Some(port)); // ... and comes back.
    let j = d.wait_terminal(&id, 90);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    check(&d.storage);
}

#[test]
fn the_double_keeps_the_stock_quirks() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    let c = client();
    // api_version must be a JSON string.
    let body = br#"{"path":"daemon.example.org/x","api_version":2,"hostname":"h"}"#;
    let auth = prepub_core::gateway::authorization("prepub-key", SECRET.as_bytes(), body);
    let r = c
        .post(format!("{}/api/v1/leases", gw.url))
        .header("Authorization", auth)
        .body(body.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // A bad HMAC is HTTP 200 with status error.
    let body = br#"{"path":"daemon.example.org/x","api_version":"2","hostname":"h"}"#;
    let bad = prepub_core::gateway::authorization("prepub-key", b"not-the-secret", body);
    let r = c
        .post(format!("{}/api/v1/leases", gw.url))
        .header("Authorization", bad)
        .body(body.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("error"), Some("invalid_hmac"))
    );
    // Overlapping paths conflict by string prefix.
    let auth = prepub_core::gateway::authorization("prepub-key", SECRET.as_bytes(), body);
    let v: serde_json::Value = c
        .post(format!("{}/api/v1/leases", gw.url))
        .header("Authorization", auth)
        .body(body.to_vec())
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token = v["session_token"].as_str().unwrap().to_string();
    let body2 = br#"{"path":"daemon.example.org/xyz","api_version":"2","hostname":"h"}"#;
    let auth2 = prepub_core::gateway::authorization("prepub-key", SECRET.as_bytes(), body2);
    let v: serde_json::Value = c
        .post(format!("{}/api/v1/leases", gw.url))
        .header("Authorization", auth2)
        .body(body2.to_vec())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["status"], "path_busy");
    // No renew endpoint.
    let tok_auth =
        prepub_core::gateway::authorization("prepub-key", SECRET.as_bytes(), token.as_bytes());
    let r = c
        .put(format!("{}/api/v1/leases/{token}", gw.url))
        .header("Authorization", tok_auth.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    // A failed commit cannot be retried on the same lease.
    let commit = |c: &reqwest::blocking::Client| -> serde_json::Value {
        c.post(format!("{}/api/v1/leases/{token}", gw.url))
            .header("Authorization", tok_auth.clone())
            .body(r#"{"old_root_hash":"0000000000000000000000000000000000000000C","new_root_hash":"1111111111111111111111111111111111111111C","tag_name":"","tag_description":""}"#)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let first = commit(&c);
    assert_eq!(first["status"], "error", "{first}");
    let second = commit(&c);
    assert!(
        second["reason"]
            .as_str()
            .unwrap()
            .starts_with("no statistics counters for lease"),
        "{second}"
    );
}

#[test]
fn publishes_at_the_repository_root() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    let d = gateway_daemon(dir.path(), &gw, "", &[]);
    // (Top-level names that exist on the host, like /bin, confuse the cvmfs crate.)
    let t = vec![
        Spec::Dir("toplevel", 0o755),
        Spec::File {
            path: "toplevel/f",
            mode: 0o644,
            data: b"at the root".to_vec(),
            xattrs: vec![],
        },
        Spec::File {
            path: "README.prepub",
            mode: 0o644,
            data: b"readme".to_vec(),
            xattrs: vec![],
        },
    ];
    let id = submit(&d, "/", &t);
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "", &t);
    drop(repo);
    check(&d.storage);
}

#[test]
fn an_untrusted_stratum0_whitelist_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    // The configured master key is not the one that signed the whitelist.
    let other = prepub_core::keys::RepoKeys::generate(REPO, 1).unwrap();
    let other_dir = dir.path().join("other-keys");
    other.save(&other_dir).unwrap();
    let extra = format!("  public_keys_dir: {}\n", other_dir.display());
    let d = gateway_daemon(dir.path(), &gw, &extra, &[]);
    let id = submit(&d, "/sw/u", &tree("u"));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "failed");
    assert_eq!(j["error"]["code"], "stratum0-untrusted");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("master public key"),
        "{j}"
    );
}

#[test]
fn removals_and_the_content_lifecycle_go_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    set_gc(
        dir.path(),
        "{enabled: true, access_ttl: 2s, exempt_paths: ['/sw/keep']}",
    );
    let gw = Double::start(dir.path(), &[], None);
    let d = gateway_daemon(dir.path(), &gw, "", &[]);
    for p in ["/sw/a", "/sw/b", "/sw/keep"] {
        let id = submit(&d, p, &tree("t"));
        assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    }
    let remove = |path: &str| -> serde_json::Value {
        let r = client()
            .post(format!("{}/api/v1/removals", d.url))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"repo": REPO, "path": path}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202);
        let id = r.json::<serde_json::Value>().unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_string();
        d.wait_terminal(&id, 60)
    };
    let j = remove("/sw/a");
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    assert_eq!(j["revision"], 5);
    let j = remove("/sw/nope");
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/sw/nope does not exist"),
        "{j}"
    );
    check(&d.storage);
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache-1"));
    assert!(repo.lookup("/sw/a").is_err());
    verify(&repo, "/sw/b", &tree("t"));
    drop(repo);

    // Unseen for the TTL: /sw/b leaves through the gateway too; /sw/keep is exempt.
    std::thread::sleep(std::time::Duration::from_millis(3200));
    let v: serde_json::Value = client()
        .post(format!("{}/api/v1/gc/{REPO}/lifecycle", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["expired"][0]["path"], "/sw/b", "{v}");
    assert_eq!(v["expired"].as_array().unwrap().len(), 1, "{v}");
    let j = d.wait_terminal(v["submitted"][0].as_str().unwrap(), 60);
    assert_eq!(j["state"], "published", "{j}");
    check(&d.storage);
    let repo = open_reader(&url, &dir.path().join("cache-2"));
    assert!(repo.lookup("/sw/b").is_err());
    verify(&repo, "/sw/keep", &tree("t"));
    // Collection itself stays with cvmfs_server in gateway mode.
    let r = client()
        .post(format!("{}/api/v1/gc/{REPO}/run", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    assert_eq!(r.status(), 409);
}

/// A release: a nested catalog at its top, another below.
fn release(tag: &'static str) -> Vec<Spec> {
    let mut t = tree(tag);
    t.push(Spec::File {
        path: ".cvmfscatalog",
        mode: 0o644,
        data: vec![],
        xattrs: vec![],
    });
    // (No hard links: gateway publishing breaks them, as upstream's does.)
    t
}

#[test]
fn a_new_release_gets_its_catalogs_built_before_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    // The commit stops where the release's catalogs are built and no lease is taken yet.
    let mut d = gateway_daemon(
        dir.path(),
        &gw,
        "",
        &[("CVMFS_PREPUB_TEST_CRASH", "catalogs-prebuilt")],
    );
    let id = submit(&d, "/sw/rel/1.0", &release("r1"));
    assert!(d.wait_exit(60), "no crash:\n{}", d.log_text());
    drop(d);
    // Restarted, the job builds them again (nothing held from before) and publishes.
    let d = Daemon::start(dir.path(), &[("CVMFS_GATEWAY_SECRET", SECRET)]);
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    assert_eq!(j["revision"], 2);
    // Then a second release next to it, and the first one replaced (no prebuild: it exists).
    let next = submit(&d, "/sw/rel/2.0", &release("r2"));
    assert_eq!(d.wait_terminal(&next, 60)["state"], "published");
    let again = submit(&d, "/sw/rel/1.0", &release("r1b"));
    assert_eq!(d.wait_terminal(&again, 60)["state"], "published");
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw/rel/1.0", &release("r1b"));
    verify(&repo, "/sw/rel/2.0", &release("r2"));
    for p in ["/sw/rel/1.0", "/sw/rel/2.0/lib"] {
        let e = repo.lookup(p).unwrap();
        assert!(
            e.is_nested_catalog_mountpoint() || e.is_nested_catalog_root(),
            "{p} is not a nested catalog"
        );
    }
    drop(repo);
    check(&d.storage);
}

/// An abort asked for while the commit holds the gateway lease is carried out by the commit
/// (which gives the lease back), also when the daemon is killed first: the abort is journaled,
/// and the resumed commit gives back the lease the killed one held and aborts. Nothing is
/// published, and the next job on the same path gets the lease at once.
#[test]
fn an_abort_during_a_gateway_commit_survives_a_restart_and_the_lease_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    // The commit takes the lease (for the double's default two hours) and stops there.
    let d = gateway_daemon(
        dir.path(),
        &gw,
        "",
        &[("CVMFS_PREPUB_TEST_HOLD", "lease-acquired=60000")],
    );
    let id = submit(&d, "/sw/held", &tree("held"));
    let lease_file = dir.path().join("spool/jobs").join(&id).join("lease.token");
    assert!(
        eventually(30, || lease_file.exists()),
        "no lease taken:\n{}",
        d.log_text()
    );
    d.abort(&id);
    // The commit thread carries it out; it is held, so the job is still committing.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(d.job(&id)["state"], "committing");
    drop(d);
    let d = Daemon::start(dir.path(), &[("CVMFS_GATEWAY_SECRET", SECRET)]);
    let j = d.wait_terminal(&id, 30);
    assert_eq!(j["state"], "aborted", "{j}\n{}", d.log_text());
    assert!(!lease_file.exists(), "lease file kept");
    // (without giving the lease back, this waits `lease_wait`, 30 s, and does not finish)
    let next = submit(&d, "/sw/held", &tree("next"));
    let j = d.wait_terminal(&next, 25);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    assert_eq!(j["revision"], 2);
    check(&d.storage);
}

/// A gateway commit that takes the daemon down while it holds the lease (building the
/// catalogs, say) is counted at each start like any commit: after `max_attempts` the job fails
/// `commit-interrupted` instead of being resumed for ever, and the next job publishes.
#[test]
fn a_gateway_commit_that_stops_the_daemon_each_time_fails_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    let crash = [("CVMFS_PREPUB_TEST_CRASH", "lease-acquired")];
    let mut d = gateway_daemon(dir.path(), &gw, "", &crash);
    let id = submit(&d, "/sw/poison", &tree("poison"));
    assert!(d.wait_exit(30), "no crash:\n{}", d.log_text());
    drop(d);
    let env = [
        ("CVMFS_GATEWAY_SECRET", SECRET),
        ("CVMFS_PREPUB_TEST_CRASH", "lease-acquired"),
    ];
    crash_on_resume(dir.path(), &env, 2);
    let d = Daemon::start(dir.path(), &[("CVMFS_GATEWAY_SECRET", SECRET)]);
    let j = d.wait_terminal(&id, 30);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "commit-interrupted", "{j}");
    assert_eq!(j["attempts"], 3, "{j}");
    let next = submit(&d, "/sw/poison", &tree("next"));
    let jn = d.wait_terminal(&next, 25);
    assert_eq!(jn["state"], "published", "{jn}\n{}", d.log_text());
    assert_eq!(jn["revision"], 2, "{jn}");
}

/// A TCP proxy in front of the gateway that forwards while `up`, and drops every connection
/// otherwise (the gateway unreachable, while it keeps its leases).
struct Proxy {
    url: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn proxy(to: &str) -> Proxy {
    use std::sync::atomic::Ordering;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (to, on) = (to.trim_start_matches("http://").to_string(), up.clone());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            if !on.load(Ordering::SeqCst) {
                continue; // dropped: reset
            }
            let Ok(g) = std::net::TcpStream::connect(&to) else {
                continue;
            };
            let (mut c2, mut g2) = (c.try_clone().unwrap(), g.try_clone().unwrap());
            let (mut c, mut g) = (c, g);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c, &mut g2);
                let _ = g2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut g, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Proxy { url, up }
}

/// The daemon stops while a commit holds its lease, and the gateway cannot be reached when it
/// comes back: the lease cannot be given back, the job fails `gateway-unavailable` (one
/// attempt here) and keeps the lease's file; neither its error (public: job views, events) nor
/// the log names the lease token (a request error's text carries its URL, and lease tokens are
/// part of the URLs of commits, renewals and cancellations). Once the gateway is reachable, the
/// next commit gives the ended job's lease back first, and a job on the same path publishes.
#[test]
fn a_lease_that_cannot_be_given_back_is_kept_and_its_token_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "  max_attempts: 1\n", "");
    let gw = Double::start(dir.path(), &[], None);
    let crash = [("CVMFS_PREPUB_TEST_CRASH", "lease-acquired")];
    let mut d = gateway_daemon(dir.path(), &gw, "", &crash);
    let id = submit(&d, "/sw/gone", &tree("gone"));
    assert!(d.wait_exit(30), "no crash:\n{}", d.log_text());
    drop(d);
    let lease_file = dir.path().join("spool/jobs").join(&id).join("lease.token");
    let token = std::fs::read_to_string(&lease_file).unwrap();
    let token = token.trim();
    assert!(token.len() >= 8, "{token}");
    // From now on the gateway API goes through a proxy (the Stratum 0 is read directly).
    let p = proxy(&gw.url);
    let cfg = dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace(
        &format!("  url: {}\n", gw.url),
        &format!("  url: {}\n", p.url),
    );
    std::fs::write(&cfg, text).unwrap();
    p.up.store(false, std::sync::atomic::Ordering::SeqCst);
    let d = Daemon::start(dir.path(), &[("CVMFS_GATEWAY_SECRET", SECRET)]);
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "gateway-unavailable", "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("giving back the lease"),
        "{j}"
    );
    assert!(!j.to_string().contains(token), "{j}");
    assert!(!d.log_text().contains(token), "the log names the token");
    assert_eq!(std::fs::read_to_string(&lease_file).unwrap().trim(), token);
    // The gateway is reachable again: the next commit gives the ended job's lease back first
    // (without, the path stays busy for the lease's two hours and this job does not finish).
    p.up.store(true, std::sync::atomic::Ordering::SeqCst);
    let next = submit(&d, "/sw/gone", &tree("next"));
    let j = d.wait_terminal(&next, 25);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    assert_eq!(j["revision"], 2);
    assert!(!lease_file.exists(), "the ended job's lease file is kept");
}

#[test]
fn a_scoped_token_moves_only_its_own_tags_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    let d = gateway_daemon(dir.path(), &gw, "", &[]);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let t = tar_bytes(&tree("tags"));
    let publish = |token: &str, path: &str, tag: &str| {
        d.wait_terminal(&d.submit_id(token, path, &t, Some(tag)), 60)
    };
    let tag = |name: &str| history_tag(&cas, name);
    let j = publish(ADMIN, "/allowed/a", "stable");
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    let stable = tag("stable");
    let j = publish(SCOPED, "/allowed/b", "stable");
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "tag-taken", "{j}");
    assert_eq!(tag("stable"), stable);
    // Its own tag: the owner note, then the job marker the gateway commit is recognised by.
    let j = publish(SCOPED, "/allowed/b", "team-nightly");
    assert_eq!(j["state"], "published", "{j}");
    let id = j["job_id"].as_str().unwrap();
    assert!(
        tag("team-nightly").description.ends_with(&format!(
            " [cvmfs-prepub owner scoped] [cvmfs-prepub job {id}]"
        )),
        "{:?}",
        tag("team-nightly")
    );
    let j = publish(SCOPED, "/allowed/c", "team-nightly");
    assert_eq!(j["state"], "published", "{j}");
    assert_eq!(
        tag("team-nightly").revision,
        j["revision"].as_u64().unwrap()
    );
}

/// A second daemon publishing through the same gateway (its own spool, the same storage).
fn second_publisher(dir: &Path, other: &Path) -> Daemon {
    let text = std::fs::read_to_string(dir.join("config.yaml")).unwrap();
    let text = text.replace(
        &format!("spool_root: {}", dir.join("spool").display()),
        &format!("spool_root: {}", other.join("spool").display()),
    );
    assert!(text.contains(&other.display().to_string()));
    std::fs::write(other.join("config.yaml"), text).unwrap();
    Daemon::start(other, &[("CVMFS_GATEWAY_SECRET", SECRET)])
}

/// The history object the current one was made from (its `previous_revision`).
fn previous_history(cas: &dyn prepub_core::cas::Cas) -> prepub_core::hash::ObjectId {
    with_current_history(cas, |h| h.previous_revision().unwrap())
        .expect("the history names the one before it")
}

/// A gateway commit whose answer the daemon never saw (it stopped right after the request)
/// landed, and its named tag was then moved by another publisher's release of the same path,
/// taking the job's marker out of the current history. The resumed job finds its marker in the
/// history its commit made (following the histories' `previous_revision` chain back) and is
/// published at that revision, without publishing its release again over the newer one. Where
/// that history is gone (collected), it cannot tell and fails `commit-uncertain`. A job stopped
/// after journaling its request but before sending it resumes and publishes once, whether the
/// repository is still at the request's base or has moved on.
#[test]
fn a_commit_whose_answer_was_lost_is_looked_for_in_the_history_not_repeated() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    // Writes the gateway configuration the starts below use.
    drop(gateway_daemon(dir.path(), &gw, "", &[]));
    let other = tempfile::tempdir().unwrap();
    let tar_a = tar_bytes(&tree("a"));
    let tar_b = tar_bytes(&tree("b"));
    let landed = [
        ("CVMFS_GATEWAY_SECRET", SECRET),
        ("CVMFS_PREPUB_TEST_CRASH", "manifest-written"),
    ];
    let unsent = [
        ("CVMFS_GATEWAY_SECRET", SECRET),
        ("CVMFS_PREPUB_TEST_CRASH", "commit-requested"),
    ];
    // A job publishing tree a at /sw/a with tag nightly is stopped at a crash point, then
    // another publisher releases tree b at `at` with the same tag (published at `other_rev`),
    // then the daemon resumes the job.
    let interrupted =
        |crash: &[(&str, &str)], at: &str, other_rev: u64, between: &dyn Fn(&Path)| {
            let mut d = Daemon::start(dir.path(), crash);
            let id = d.submit_id(ADMIN, "/sw/a", &tar_a, Some("nightly"));
            assert!(d.wait_exit(60), "no crash:\n{}", d.log_text());
            let storage = d.storage.clone();
            drop(d);
            let d2 = second_publisher(dir.path(), other.path());
            let b = d2.submit_id(ADMIN, at, &tar_b, Some("nightly"));
            let jb = d2.wait_terminal(&b, 60);
            assert_eq!(jb["state"], "published", "{jb}\n{}", d2.log_text());
            assert_eq!(jb["revision"], other_rev, "{jb}");
            drop(d2);
            between(&storage);
            let d = Daemon::start(dir.path(), &[("CVMFS_GATEWAY_SECRET", SECRET)]);
            let j = d.wait_terminal(&id, 60);
            (d, j, b)
        };
    let head = |storage: &Path| {
        let cas = prepub_core::cas::LocalCas::open(storage).unwrap();
        let rev = prepub_core::repo::current_manifest(&cas)
            .unwrap()
            .unwrap()
            .0
            .revision;
        (rev, history_tag(&cas, "nightly"))
    };

    // Landed at revision 2, then b at 3: found in revision 2's history.
    let (d, ja, b) = interrupted(&landed, "/sw/a", 3, &|_| {});
    assert_eq!(ja["state"], "published", "{ja}\n{}", d.log_text());
    assert_eq!(ja["revision"], 2, "{ja}");
    assert_eq!(ja["tag"], "nightly", "{ja}");
    // Nothing was published again: the newer release and its tag stand.
    let (rev, nightly) = head(&d.storage);
    assert_eq!(rev, 3);
    assert_eq!(nightly.revision, 3);
    assert!(nightly
        .description
        .ends_with(&format!("[cvmfs-prepub job {b}]")));
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw/a", &tree("b"));
    drop(repo);
    drop(d);

    // Landed at revision 4, then b at 5, and revision 4's history collected: unknown.
    let (d, jc, _) = interrupted(&landed, "/sw/a", 5, &|storage: &Path| {
        let cas = prepub_core::cas::LocalCas::open(storage).unwrap();
        std::fs::remove_file(storage.join(previous_history(&cas).path())).unwrap();
    });
    assert_eq!(jc["state"], "failed", "{jc}\n{}", d.log_text());
    assert_eq!(jc["error"]["code"], "commit-uncertain", "{jc}");
    let msg = jc["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("'nightly'")
            && msg.contains("may have landed")
            && msg.contains("no longer on the Stratum 0"),
        "{msg}"
    );
    assert_eq!(head(&d.storage).0, 5);
    drop(d);

    // Stopped before sending (its lease still held), then b at 6 elsewhere in the repository:
    // the histories since the base lack the marker, so it publishes (once) on top of b.
    let (d, je, _) = interrupted(&unsent, "/sw/b", 6, &|_| {});
    assert_eq!(je["state"], "published", "{je}\n{}", d.log_text());
    assert_eq!(je["revision"], 7, "{je}");
    let (rev, nightly) = head(&d.storage);
    assert_eq!((rev, nightly.revision), (7, 7));
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache2"));
    verify(&repo, "/sw/a", &tree("a"));
    verify(&repo, "/sw/b", &tree("b"));
    drop(repo);
    drop(d);

    // Stopped before sending, the repository still at the request's base: it publishes.
    let mut d = Daemon::start(dir.path(), &unsent);
    let g = d.submit_id(ADMIN, "/sw/a", &tar_b, Some("nightly"));
    assert!(d.wait_exit(60), "no crash:\n{}", d.log_text());
    drop(d);
    let d = Daemon::start(dir.path(), &[("CVMFS_GATEWAY_SECRET", SECRET)]);
    let jg = d.wait_terminal(&g, 60);
    assert_eq!(jg["state"], "published", "{jg}\n{}", d.log_text());
    assert_eq!(jg["revision"], 8, "{jg}");
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache3"));
    verify(&repo, "/sw/a", &tree("b"));
    drop(repo);
    check(&d.storage);
}

/// A scoped token's tag that another publisher makes while this job's commit holds its lease
/// (checked free before the lease) is seen by the check made again right before the commit
/// request: the job fails `tag-taken`, the other publisher's tag stays where it was put, and
/// the lease is given back.
#[test]
fn a_tag_made_by_another_publisher_during_the_lease_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let gw = Double::start(dir.path(), &[], None);
    let hold = [("CVMFS_PREPUB_TEST_HOLD", "lease-acquired=6000")];
    let d = gateway_daemon(dir.path(), &gw, "", &hold);
    let t = tar_bytes(&tree("scoped"));
    let id = d.submit_id(SCOPED, "/allowed/x", &t, Some("rel"));
    let lease_file = dir.path().join("spool/jobs").join(&id).join("lease.token");
    assert!(
        eventually(30, || lease_file.exists()),
        "no lease taken:\n{}",
        d.log_text()
    );
    let other = tempfile::tempdir().unwrap();
    let d2 = second_publisher(dir.path(), other.path());
    let b = d2.submit_id(ADMIN, "/other", &tar_bytes(&tree("other")), Some("rel"));
    let jb = d2.wait_terminal(&b, 60);
    assert_eq!(jb["state"], "published", "{jb}\n{}", d2.log_text());
    assert_eq!(d.job(&id)["state"], "committing", "held too briefly");
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let rel = history_tag(&cas, "rel");

    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "failed", "{j}\n{}", d.log_text());
    assert_eq!(j["error"]["code"], "tag-taken", "{j}");
    assert_eq!(history_tag(&cas, "rel"), rel);
    assert_eq!(
        prepub_core::repo::current_manifest(&cas)
            .unwrap()
            .unwrap()
            .0
            .revision,
        jb["revision"].as_u64().unwrap()
    );
    assert!(!lease_file.exists());
    // The lease went back: the same path publishes at once (with a tag of its own).
    drop(d);
    let d = Daemon::start(dir.path(), &[("CVMFS_GATEWAY_SECRET", SECRET)]);
    let j = d.wait_terminal(&d.submit_id(SCOPED, "/allowed/x", &t, Some("mine")), 20);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
}
