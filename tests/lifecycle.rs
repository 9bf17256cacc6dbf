//! Content lifecycle: published paths not seen for `access_ttl` leave the namespace as removal
//! jobs — unless a path under them or an object of theirs was seen since, or an exemption glob
//! matches; a dry run only lists them.

mod common;

use std::time::Duration;

use common::*;

fn tree(tag: &str) -> Vec<Spec> {
    vec![Spec::File {
        path: "lib.so",
        mode: 0o644,
        data: format!("library of {tag} ").repeat(200).into_bytes(),
        xattrs: vec![],
    }]
}

fn object_of(tag: &str) -> String {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    std::io::Write::write_all(
        &mut enc,
        format!("library of {tag} ").repeat(200).as_bytes(),
    )
    .unwrap();
    prepub_core::hash::Digest20::of(&enc.finish().unwrap()).hex()
}

fn setup(dir: &std::path::Path, extra: &str) -> Daemon {
    prepare_daemon_dir(dir, "", "");
    set_gc(dir, &format!("{{enabled: true, access_ttl: 2s, exempt_paths: ['/sw/lts-*'], keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s{extra}}}"));
    let d = Daemon::start(dir, &[]);
    for p in ["/sw/a", "/sw/b", "/sw/c", "/sw/lts-1"] {
        let id = d.submit_id(ADMIN, p, &tar_bytes(&tree(p)), None);
        assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    }
    // Times are whole seconds: 3.2 s after the last publish every publish is more than the
    // 2 s TTL old.
    std::thread::sleep(Duration::from_millis(3200));
    // /sw/b was read (a path under it), /sw/c's library was fetched (its object).
    let r = client()
        .post(format!("{}/api/v1/access-events", d.url))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"repo": REPO, "events": [
            {"path": "/sw/b/lib.so"},
            {"object": object_of("/sw/c")},
        ]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    d
}

fn lifecycle(d: &Daemon) -> serde_json::Value {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_prepubctl"))
        .args(["gc", "lifecycle", "--repo", REPO, "--json"])
        .env("PREPUB_URL", &d.url)
        .env("PREPUB_API_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The paths a lifecycle answer lists as expired.
fn expired_paths(v: &serde_json::Value) -> Vec<&str> {
    v["expired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect()
}

#[test]
fn unseen_paths_leave_and_seen_or_exempt_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let d = setup(dir.path(), "");
    let v = lifecycle(&d);
    let expired = expired_paths(&v);
    assert_eq!(expired, vec!["/sw/a"], "{v}");
    let jobs = v["submitted"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    let j = d.wait_terminal(jobs[0].as_str().unwrap(), 60);
    assert_eq!(j["state"], "published", "{j}");
    assert_eq!(j["removal"], true);
    let ls = std::process::Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args([
            "repo",
            "ls",
            "--repo-dir",
            d.storage.to_str().unwrap(),
            "/sw",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(
        !listing.contains(" a\n") && !listing.ends_with("a"),
        "{listing}"
    );
    for kept in ["b", "c", "lts-1"] {
        assert!(listing.contains(kept), "{kept} missing:\n{listing}");
    }
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    for kept in ["/sw/b", "/sw/c", "/sw/lts-1"] {
        verify(&repo, kept, &tree(kept));
    }
    assert!(repo.lookup("/sw/a").is_err());
    assert!(d.metrics_text().contains(&format!(
        "cvmfs_prepub_gc_lifecycle_removals_total{{repo=\"{REPO}\"}} 1"
    )));
}

#[test]
fn a_dry_run_lists_and_removes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = setup(dir.path(), ", dry_run: true");
    let v = lifecycle(&d);
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["expired"][0]["path"], "/sw/a", "{v}");
    assert!(v["submitted"].as_array().unwrap().is_empty());
    assert_eq!(d.jobs()["total"], 4);
}

#[test]
fn paths_in_a_revision_an_exempt_tag_names_stay() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    set_gc(dir.path(), "{enabled: true, access_ttl: 2s, exempt_tags: ['pin-*'], keep_revisions: 1, grace_period: 0s}");
    let d = Daemon::start(dir.path(), &[]);
    for (p, tag) in [("/sw/pinned", Some("pin-2026")), ("/sw/loose", None)] {
        let r = d.submit_raw(ADMIN, p, &tar_bytes(&tree(p)), tag);
        let id = r.json::<serde_json::Value>().unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    }
    std::thread::sleep(Duration::from_millis(3200));
    let v = lifecycle(&d);
    let expired = expired_paths(&v);
    assert_eq!(expired, vec!["/sw/loose"], "{v}");
    let j = d.wait_terminal(v["submitted"][0].as_str().unwrap(), 60);
    assert_eq!(j["state"], "published", "{j}");
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw/pinned", &tree("/sw/pinned"));
    assert!(repo.lookup("/sw/loose").is_err());
}

#[test]
fn a_scheduled_run_cleans_first_then_collects() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    set_gc(dir.path(), "{enabled: true, access_ttl: 2s, schedule: '@every 1s', keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}");
    let d = Daemon::start(dir.path(), &[]);
    let id = d.submit_id(ADMIN, "/sw/old", &tar_bytes(&tree("/sw/old")), None);
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    let start = std::time::Instant::now();
    let run = loop {
        let s: serde_json::Value = client()
            .get(format!("{}/api/v1/gc/{REPO}/status", d.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let done = s["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["removals"].as_array().is_some_and(|a| !a.is_empty()))
            .cloned();
        // Until the run has ended (the status may show any step before).
        if let Some(r) =
            done.filter(|r| matches!(r["state"].as_str(), Some("complete" | "aborted" | "failed")))
        {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(run["state"], "complete", "{run}");
    assert_eq!(run["trigger"], "schedule");
    let states: Vec<&str> = run["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        vec!["scheduled", "cleaning", "scanning", "reaping", "complete"],
        "{run}"
    );
    let j = d.job(run["removals"][0].as_str().unwrap());
    assert_eq!(
        (j["state"].as_str(), j["removal"].as_bool()),
        (Some("published"), Some(true)),
        "{j}"
    );
    assert_eq!(j["path"], "/sw/old");
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    assert!(repo.lookup("/sw/old").is_err());
    assert!(repo.lookup("/sw").is_ok());
}

/// An exempt path inside a published tree keeps the whole tree: the tree was published at
/// `/sw` (the tracked path), its `lts-2` release matches `exempt_paths`.
#[test]
fn a_tree_holding_an_exempt_path_stays() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    set_gc(dir.path(), "{enabled: true, access_ttl: 2s, exempt_paths: ['/sw/lts-*'], keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}");
    let d = Daemon::start(dir.path(), &[]);
    let spec = |rel: &'static str| Spec::File {
        path: rel,
        mode: 0o644,
        data: format!("library in {rel} ").repeat(100).into_bytes(),
        xattrs: vec![],
    };
    let files = [spec("lts-2/lib.so"), spec("dev/lib.so")];
    let id = d.submit_id(ADMIN, "/sw", &tar_bytes(&files), None);
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    let other = d.submit_id(ADMIN, "/other", &tar_bytes(&tree("/other")), None);
    assert_eq!(d.wait_terminal(&other, 60)["state"], "published");
    std::thread::sleep(Duration::from_millis(3200));
    let v = lifecycle(&d);
    // The unexempt tree beside it goes, as a check that the TTL has passed.
    assert_eq!(expired_paths(&v), vec!["/other"], "{v}");
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw", &files);
}
