//! Removal jobs (`POST /api/v1/removals`): a path leaves the namespace through the normal
//! publish path (journaled job, signed revision, tag), the rest of the tree stays, the
//! repository checks clean, and garbage collection can then reclaim what it held.

mod common;

use common::*;

fn tree(tag: &str) -> Vec<Spec> {
    vec![
        Spec::Dir("bin", 0o755),
        Spec::File {
            path: "bin/tool",
            mode: 0o755,
            data: format!("tool of {tag} ").repeat(300).into_bytes(),
            xattrs: vec![],
        },
    ]
}

fn remove(d: &Daemon, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = client()
        .post(format!("{}/api/v1/removals", d.url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or_default())
}

fn ls(d: &Daemon, path: &str) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args([
            "repo",
            "ls",
            "--repo-dir",
            d.storage.to_str().unwrap(),
            path,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_removed_path_leaves_the_namespace_and_its_objects_can_be_collected() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    set_gc(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(dir.path(), &[]);
    for p in ["/sw/old", "/sw/keep"] {
        let id = d.submit_id(ADMIN, p, &tar_bytes(&tree(p)), None);
        assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    }
    let (code, v) = remove(
        &d,
        ADMIN,
        serde_json::json!({"repo": REPO, "path": "/sw/old", "tag_name": "drop-old"}),
    );
    assert_eq!(code, 202, "{v}");
    let j = d.wait_terminal(v["job_id"].as_str().unwrap(), 60);
    assert_eq!(j["state"], "published", "{j}");
    assert_eq!(j["removal"], true);
    assert_eq!(j["tag"], "drop-old");
    let listing = ls(&d, "/sw");
    assert!(
        listing.contains("keep") && !listing.contains("old"),
        "{listing}"
    );
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    // Removing what is not there fails the job with the reason; the root is refused at once.
    let (_, v) = remove(
        &d,
        ADMIN,
        serde_json::json!({"repo": REPO, "path": "/sw/old"}),
    );
    let j = d.wait_terminal(v["job_id"].as_str().unwrap(), 60);
    assert_eq!(j["state"], "failed");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/sw/old does not exist"),
        "{j}"
    );
    let (code, v) = remove(&d, ADMIN, serde_json::json!({"repo": REPO, "path": "/"}));
    assert_eq!((code, v["error"]["code"].as_str()), (400, Some("bad-path")));
    let (code, _) = remove(
        &d,
        SCOPED,
        serde_json::json!({"repo": REPO, "path": "/sw/keep"}),
    );
    assert_eq!(code, 403);
    let (code, _) = remove(
        &d,
        ADMIN,
        serde_json::json!({"repo": REPO, "path": "/x", "bogus": 1}),
    );
    assert_eq!(code, 400);
    // What /sw/old held is still in trunk-previous (the revision before the removal); one
    // more publish and it is unreferenced: garbage collection's to reclaim.
    let id = d.submit_id(ADMIN, "/sw/keep", &tar_bytes(&tree("/sw/keep2")), None);
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    std::io::Write::write_all(&mut enc, "tool of /sw/old ".repeat(300).as_bytes()).unwrap();
    let old_obj = prepub_core::hash::Digest20::of(&enc.finish().unwrap()).hex();
    let plan: serde_json::Value = client()
        .get(format!("{}/api/v1/gc/{REPO}/plan", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        plan["sample"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str() == Some(old_obj.as_str())),
        "{plan}"
    );
    // Collected: the repository checks clean and the independent reader sees the kept tree.
    let r: serde_json::Value = client()
        .post(format!("{}/api/v1/gc/{REPO}/run", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["run"]["state"], "complete", "{r}");
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw/keep", &tree("/sw/keep2"));
    assert!(repo.lookup("/sw/old").is_err());
}
