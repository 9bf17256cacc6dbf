//! Local publish mode through a test double of `cvmfs_server` (tests/fixtures/cvmfs_server).

mod common;

use std::path::{Path, PathBuf};

use common::*;

struct Local {
    state: PathBuf,
    mount: PathBuf,
}

fn setup(dir: &Path, extra_pipeline: &str) -> Local {
    prepare_daemon_dir(dir, extra_pipeline, "");
    let state = dir.join("double-state");
    let mount = dir.join("cvmfs");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&mount).unwrap();
    let cfg = dir.join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "  log_format: text\n",
        &format!(
            "  log_format: text\n  publish_mode: local\n  cvmfs_mount: {}\n",
            mount.display()
        ),
    );
    std::fs::write(cfg, text).unwrap();
    Local { state, mount }
}

fn start(dir: &Path, l: &Local, extra_env: &[(&str, &str)]) -> Daemon {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let path = format!(
        "{}:{}",
        fixtures.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let state = l.state.to_str().unwrap().to_string();
    let mount = l.mount.to_str().unwrap().to_string();
    let mut env = vec![
        ("PATH", path.as_str()),
        ("CVMFS_DOUBLE_DIR", state.as_str()),
        ("CVMFS_DOUBLE_MOUNT", mount.as_str()),
    ];
    env.extend_from_slice(extra_env);
    Daemon::start(dir, &env)
}

fn tree() -> Vec<Spec> {
    vec![
        Spec::Dir("bin", 0o755),
        Spec::File {
            path: "bin/tool",
            mode: 0o4755,
            data: b"tool\n".to_vec(),
            xattrs: vec![],
        },
        Spec::Symlink("bin/abs", "/cvmfs/other.org/x"),
        Spec::Hardlink("bin/tool2", "bin/tool"),
        Spec::File {
            path: "share/doc/README",
            mode: 0o644,
            data: b"readme".to_vec(),
            xattrs: vec![],
        },
    ]
}

fn submit(
    d: &Daemon,
    path: &str,
    specs: &[Spec],
    tag: Option<&str>,
) -> reqwest::blocking::Response {
    d.submit_raw(ADMIN, path, &tar_bytes(specs), tag)
}

fn id_of(r: reqwest::blocking::Response) -> String {
    assert_eq!(r.status().as_u16(), 202);
    r.json::<serde_json::Value>().unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn publishes_through_cvmfs_server() {
    let dir = tempfile::tempdir().unwrap();
    let l = setup(dir.path(), "");
    let d = start(dir.path(), &l, &[]);
    let h: serde_json::Value = client()
        .get(format!("{}/api/v1/health", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(h["status"], "ok", "{h}");
    let id = id_of(submit(&d, "/sw/app", &tree(), Some("app-1")));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    assert_eq!(j["tag"], "app-1");
    let published = l.state.join("published").join(REPO).join("sw/app");
    assert_eq!(
        std::fs::read(published.join("bin/tool")).unwrap(),
        b"tool\n"
    );
    assert_eq!(
        std::fs::read(published.join("bin/tool2")).unwrap(),
        b"tool\n"
    );
    assert_eq!(
        std::fs::read_link(published.join("bin/abs")).unwrap(),
        PathBuf::from("/cvmfs/other.org/x")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(published.join("bin/tool"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o4755
    );
    let calls = std::fs::read_to_string(l.state.join("calls.log")).unwrap();
    assert_eq!(
        calls,
        format!(
            "transaction {REPO}\npublish -a app-1 -m published by cvmfs-prepub job {id} {REPO}\n"
        )
    );
    // Publishing the same path again replaces it.
    let id = id_of(submit(
        &d,
        "/sw/app",
        &[Spec::File {
            path: "only",
            mode: 0o644,
            data: b"x".to_vec(),
            xattrs: vec![],
        }],
        None,
    ));
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    assert!(!published.join("bin").exists());
    assert!(published.join("only").is_file());
}

#[test]
fn a_second_job_during_a_publish_gets_409() {
    let dir = tempfile::tempdir().unwrap();
    let l = setup(dir.path(), "");
    let d = start(dir.path(), &l, &[("CVMFS_DOUBLE_PUBLISH_SLEEP", "2")]);
    let id = id_of(submit(&d, "/a", &tree(), None));
    d.wait_state(&id, "committing", 20);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let r = submit(&d, "/b", &tree(), None);
    assert_eq!(r.status().as_u16(), 409);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "conflict");
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    // Free again afterwards.
    let id = id_of(submit(&d, "/b", &tree(), None));
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
}

#[test]
fn a_failed_publish_aborts_the_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let l = setup(dir.path(), "  max_attempts: 1\n");
    std::fs::write(l.state.join("fail_publish"), b"").unwrap();
    let d = start(dir.path(), &l, &[]);
    let id = id_of(submit(&d, "/x", &tree(), None));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "failed");
    assert_eq!(j["error"]["code"], "publish-failed");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("simulated publish failure"),
        "{j}"
    );
    let calls = std::fs::read_to_string(l.state.join("calls.log")).unwrap();
    assert!(calls.ends_with(&format!("abort -f {REPO}\n")), "{calls}");
    assert!(
        !l.state.join(format!("{REPO}.lock")).exists(),
        "the transaction must be closed"
    );
}

#[test]
fn tar_tricks_cannot_write_outside_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let l = setup(dir.path(), "  max_attempts: 1\n");
    let d = start(dir.path(), &l, &[]);
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // Through a symlink inside the tar: refused at intake.
    let target: &'static str = Box::leak(outside.to_str().unwrap().to_string().into_boxed_str());
    let t = vec![
        Spec::Symlink("l", target),
        Spec::File {
            path: "l/pwned",
            mode: 0o644,
            data: b"x".to_vec(),
            xattrs: vec![],
        },
    ];
    let id = id_of(submit(&d, "/t1", &t, None));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(
        (j["state"].as_str(), j["error"]["code"].as_str()),
        (Some("failed"), Some("bad-tar"))
    );
    // Through a symlink planted in the repository on the way to the target: refused at extraction.
    std::fs::create_dir_all(l.mount.join(REPO)).unwrap();
    std::os::unix::fs::symlink(&outside, l.mount.join(REPO).join("evil")).unwrap();
    let id = id_of(submit(&d, "/evil/sub", &tree(), None));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "commit-rejected");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing may be written outside"
    );
    let calls = std::fs::read_to_string(l.state.join("calls.log")).unwrap();
    assert!(calls.ends_with(&format!("abort -f {REPO}\n")), "{calls}");
}

#[test]
fn a_removal_deletes_the_path_in_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let l = setup(dir.path(), "");
    let d = start(dir.path(), &l, &[]);
    for p in ["/sw/app", "/sw/other"] {
        let id = id_of(submit(&d, p, &tree(), None));
        assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    }
    let remove = |path: &str| -> serde_json::Value {
        let r = client()
            .post(format!("{}/api/v1/removals", d.url))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"repo": REPO, "path": path, "tag_name": "gone", "tag_description": "app retired"}))
            .send()
            .unwrap();
        d.wait_terminal(&id_of(r), 60)
    };
    let j = remove("/sw/app");
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    let published = l.state.join("published").join(REPO).join("sw");
    assert!(!published.join("app").exists());
    assert!(published.join("other/bin/tool").is_file());
    // A path that is not there: the transaction is aborted, the job fails with the reason.
    let j = remove("/sw/app");
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/sw/app does not exist"),
        "{j}"
    );
    let calls = std::fs::read_to_string(l.state.join("calls.log")).unwrap();
    assert!(
        calls.ends_with(&format!(
            "transaction {REPO}\npublish -a gone -m app retired {REPO}\ntransaction {REPO}\nabort -f {REPO}\n"
        )),
        "{calls}"
    );
    // The tag's description went to `cvmfs_server publish -m`.
    let tags = std::fs::read_to_string(l.state.join("tags")).unwrap();
    assert!(tags.contains("gone\tapp retired\n"), "{tags}");
}

/// Local mode publishes from the tar (cvmfs_server's transaction gets it extracted), so an
/// upload processed before its tar is on disk is not accepted until the tar's fsync is done
/// (held here for 3 s): the 202 never comes earlier, and the job publishes.
#[test]
fn an_upload_is_accepted_only_once_its_tar_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let l = setup(dir.path(), "");
    let d = start(
        dir.path(),
        &l,
        &[("CVMFS_PREPUB_TEST_HOLD", "tar-sync=3000")],
    );
    let t0 = std::time::Instant::now();
    let r = submit(&d, "/sw/synced", &tree(), None);
    let took = t0.elapsed();
    let id = id_of(r);
    assert!(
        took >= std::time::Duration::from_millis(2900),
        "accepted after {took:?}, before the tar was on disk"
    );
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
}

#[test]
fn a_scoped_token_names_no_tags_in_local_mode() {
    let dir = tempfile::tempdir().unwrap();
    let l = setup(dir.path(), "");
    let d = start(dir.path(), &l, &[]);
    let t = tar_bytes(&tree());
    // `cvmfs_server publish -a` would move a tag whoever made it: refused before anything is kept.
    let r = d.submit_raw(SCOPED, "/allowed/a", &t, Some("stable"));
    assert_eq!(r.status().as_u16(), 403);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("'stable'"),
        "{v}"
    );
    assert_eq!(d.jobs()["total"], 0);
    // Without a tag it publishes; the admin token may name one.
    let id = id_of(d.submit_raw(SCOPED, "/allowed/a", &t, None));
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    let id = id_of(d.submit_raw(ADMIN, "/allowed/a", &t, Some("stable")));
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
}
