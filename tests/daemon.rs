//! The publisher daemon over HTTP: publishing, ordering, validation and authentication, aborts,
//! and crash recovery at every journaled step. The independent `cvmfs` reader checks the result.

mod common;

use common::*;
use prepub_core::cas::Cas;

fn job_id(r: reqwest::blocking::Response) -> String {
    assert_eq!(
        r.status().as_u16(),
        202,
        "submission refused: {}",
        r.text().unwrap_or_default()
    );
    let v: serde_json::Value = r.json().unwrap();
    // `processing` when the upload was processed before its tar reached the disk.
    assert!(
        matches!(v["state"].as_str(), Some("queued" | "processing")),
        "{v}"
    );
    v["job_id"].as_str().unwrap().to_string()
}

fn small_tree(tag: &'static str) -> Vec<Spec> {
    vec![
        Spec::Dir("bin", 0o755),
        Spec::File {
            path: "bin/run",
            mode: 0o755,
            data: format!("#!/bin/sh\necho {tag}\n").into_bytes(),
            xattrs: vec![],
        },
        Spec::Symlink("bin/link", "run"),
        Spec::File {
            path: "lib/data.bin",
            mode: 0o644,
            data: pseudo_random(300_000, tag.len() as u64),
            xattrs: vec![],
        },
    ]
}

fn check_repo(storage: &std::path::Path) {
    ok(&["repo", "check", "--repo-dir", storage.to_str().unwrap()]);
}

#[test]
fn publishes_plain_and_gzip_tars_and_the_reader_agrees() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let url = serve(d.storage.clone());
    let cache = dir.path().join("cache");

    // Plain tar, raw body.
    let a = big_tree();
    let id = job_id(d.submit_raw(ADMIN, "/sw/a", &tar_bytes(&a), Some("a-1")));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}");
    assert_eq!(j["revision"], 2);
    assert_eq!(j["tag"], "a-1");
    assert!(j["progress"]["entries"].as_u64().unwrap() >= 5);
    let repo = open_reader(&url, &cache);
    verify(&repo, "/sw/a", &a);
    drop(repo);
    check_repo(&d.storage);

    // gzip tar, multipart.
    let b = small_tree("b");
    let form = reqwest::blocking::multipart::Form::new()
        .text("repo", REPO)
        .text("path", "sw/b")
        .text("tag_name", "b-1")
        .part(
            "tar",
            reqwest::blocking::multipart::Part::bytes(gzip(&tar_bytes(&b))).file_name("b.tar.gz"),
        );
    let r = client()
        .post(format!("{}/api/v1/jobs", d.url))
        .bearer_auth(ADMIN)
        .multipart(form)
        .send()
        .unwrap();
    let id = job_id(r);
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    let repo = open_reader(&url, &cache);
    verify(&repo, "/sw/b", &b);
    verify(&repo, "/sw/a", &a);
    drop(repo);

    // The same path again replaces its content.
    let a2 = small_tree("a2");
    let id = job_id(d.submit_raw(ADMIN, "/sw/a", &gzip(&tar_bytes(&a2)), None));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published");
    assert_eq!(j["revision"], 4);
    assert_eq!(j["tag"], format!("prepub-{id}"));
    let repo = open_reader(&url, &cache);
    verify(&repo, "/sw/a", &a2);
    verify(&repo, "/sw/b", &b);
    assert!(
        repo.lookup("/sw/a/pkg").is_err(),
        "old content under /sw/a must be gone"
    );
    drop(repo);
    check_repo(&d.storage);

    // Health, metrics, listing.
    let h: serde_json::Value = client()
        .get(format!("{}/api/v1/health", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["jobs"]["published"], 3);
    let m = d.metrics_text();
    assert!(
        m.contains("cvmfs_prepub_jobs_submitted_total{path=\"/sw/a\"} 2"),
        "{m}"
    );
    assert!(m.contains("cvmfs_prepub_pipeline_dedup_hits_total"));
    assert!(m.contains("cvmfs_prepub_cas_upload_duration_seconds_count"));
    let l: serde_json::Value = client()
        .get(format!("{}/api/v1/jobs?state=published&limit=2", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(l["total"], 3);
    assert_eq!(l["jobs"].as_array().unwrap().len(), 2);
}

#[test]
fn a_daemon_allowed_few_open_files_stores_objects_in_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    // 256 open files: a local store's 256 shard directories, held open, would take them all.
    let d = Daemon::start_limited(dir.path(), &[], Some(256));
    let content = |i: usize| format!("small file {i}\n").into_bytes();
    let mut specs = vec![Spec::Dir("many", 0o755)];
    specs.extend((0..3000).map(|i| Spec::File {
        path: Box::leak(format!("many/{i}").into_boxed_str()),
        mode: 0o644,
        data: content(i),
        xattrs: vec![],
    }));
    let id = job_id(d.submit_raw(ADMIN, "/many", &tar_bytes(&specs), None));
    let j = d.wait_terminal(&id, 120);
    assert_eq!(j["state"], "published", "{j}");
    assert_eq!(j["progress"]["objects_new"].as_u64(), Some(3000), "{j}");
    // Every file's object is stored, in all 256 shards.
    let mut shards = std::collections::BTreeSet::new();
    for i in 0..3000 {
        let id = object_of_small_file(&content(i));
        let p = d.storage.join(id.path());
        let stored = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(stored, zlib6(&content(i)));
        shards.insert(id.digest.0[0]);
    }
    assert_eq!(shards.len(), 256);
    check_repo(&d.storage);
    // The operator was told at start.
    let log = d.log_text();
    assert!(
        log.contains("the open-file limit is low") && log.contains("open_files=256"),
        "{log}"
    );
}

fn big_tree() -> Vec<Spec> {
    vec![
        Spec::Dir("pkg", 0o755),
        Spec::File {
            path: "pkg/big.bin",
            mode: 0o644,
            data: pseudo_random(9 << 20, 77),
            xattrs: vec![],
        },
        Spec::File {
            path: "pkg/.cvmfscatalog",
            mode: 0o644,
            data: vec![],
            xattrs: vec![],
        },
        Spec::File {
            path: "pkg/tool",
            mode: 0o4755,
            data: b"tool".to_vec(),
            xattrs: vec![("user.k", "v")],
        },
        Spec::Symlink("pkg/abs", "/cvmfs/elsewhere.org/x"),
    ]
}

#[test]
fn concurrent_submissions_all_publish_in_order() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let n = 8;
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let d = &d;
                s.spawn(move || {
                    let t = tar_bytes(&[Spec::File {
                        path: "f",
                        mode: 0o644,
                        data: format!("job {i}").into_bytes(),
                        xattrs: vec![],
                    }]);
                    job_id(d.submit_raw(ADMIN, &format!("/c/{i}"), &t, None))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut revisions: Vec<(i64, u64)> = Vec::new();
    for id in &ids {
        let j = d.wait_terminal(id, 120);
        assert_eq!(j["state"], "published", "{j}");
        revisions.push((
            j["state_times"]["published"].as_i64().unwrap(),
            j["revision"].as_u64().unwrap(),
        ));
    }
    revisions.sort();
    let revs: Vec<u64> = revisions.iter().map(|r| r.1).collect();
    assert_eq!(
        revs,
        (2..2 + n as u64).collect::<Vec<_>>(),
        "each job its own revision, in commit order"
    );
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    for i in 0..n {
        assert_eq!(
            read_all(&repo, &format!("/c/{i}/f")),
            format!("job {i}").into_bytes()
        );
    }
    drop(repo);
    check_repo(&d.storage);
}

fn status_and_code(r: reqwest::blocking::Response) -> (u16, String) {
    let s = r.status().as_u16();
    let v: serde_json::Value = r.json().unwrap_or_default();
    (s, v["error"]["code"].as_str().unwrap_or("").to_string())
}

#[test]
fn authentication_and_validation_errors() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "  max_upload_size: 1MiB\n");
    let d = Daemon::start(dir.path(), &[]);
    let t = tar_bytes(&small_tree("x"));
    let post = || {
        client()
            .post(format!("{}/api/v1/jobs", d.url))
            .header("X-Cvmfs-Repo", REPO)
            .header("X-Cvmfs-Path", "/x")
    };
    assert_eq!(
        status_and_code(post().body(t.clone()).send().unwrap()),
        (401, "unauthorized".into())
    );
    assert_eq!(
        status_and_code(post().bearer_auth("wrong").body(t.clone()).send().unwrap()),
        (401, "unauthorized".into())
    );
    assert_eq!(
        status_and_code(
            client()
                .get(format!("{}/api/v1/jobs", d.url))
                .send()
                .unwrap()
        ),
        (401, "unauthorized".into())
    );
    // Scoped token: only under its prefix, and only its own jobs.
    assert_eq!(
        status_and_code(d.submit_raw(SCOPED, "/x", &t, None)),
        (403, "forbidden".into())
    );
    let mine = job_id(d.submit_raw(SCOPED, "/allowed/app", &t, None));
    let admins = job_id(d.submit_raw(ADMIN, "/other", &t, None));
    let get = |tok: &str, id: &str| {
        client()
            .get(format!("{}/api/v1/jobs/{id}", d.url))
            .bearer_auth(tok)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get(SCOPED, &mine), 200);
    assert_eq!(get(SCOPED, &admins), 404);
    assert_eq!(get(ADMIN, &mine), 200);
    let listed: serde_json::Value = client()
        .get(format!("{}/api/v1/jobs", d.url))
        .bearer_auth(SCOPED)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(listed["total"], 1);
    let abort = client()
        .post(format!("{}/api/v1/jobs/{admins}/abort", d.url))
        .bearer_auth(SCOPED)
        .send()
        .unwrap();
    assert_eq!(abort.status().as_u16(), 404);
    // Validation before anything is queued.
    let sub = |repo: &str, path: &str, tag: Option<&str>| {
        let mut r = client()
            .post(format!("{}/api/v1/jobs", d.url))
            .bearer_auth(ADMIN)
            .header("X-Cvmfs-Repo", repo)
            .header("X-Cvmfs-Path", path);
        if let Some(tag) = tag {
            r = r.header("X-Cvmfs-Tag-Name", tag);
        }
        status_and_code(r.body(t.clone()).send().unwrap())
    };
    assert_eq!(
        sub("nope.org", "/x", None),
        (400, "unknown-repository".into())
    );
    assert_eq!(sub(REPO, "/a/../b", None), (400, "bad-path".into()));
    assert_eq!(sub(REPO, "/.cvmfs/x", None), (400, "bad-path".into()));
    assert_eq!(sub(REPO, "/x", Some("bad tag")), (400, "bad-tag".into()));
    assert_eq!(sub(REPO, "/x", Some("trunk")), (400, "bad-tag".into()));
    // The automatic tag form is reserved: another job's marker would make that job take
    // itself for published on a retried commit.
    let marker = format!("prepub-{admins}");
    assert_eq!(sub(REPO, "/x", Some(&marker)), (400, "bad-tag".into()));
    let removal = client()
        .post(format!("{}/api/v1/removals", d.url))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"repo": REPO, "path": "/x", "tag_name": marker}))
        .send()
        .unwrap();
    assert_eq!(status_and_code(removal), (400, "bad-tag".into()));
    // Oversize bodies: 413.
    let big = vec![0u8; 2 << 20];
    assert_eq!(
        status_and_code(d.submit_raw(ADMIN, "/x", &big, None)),
        (413, "payload-too-large".into())
    );
    // Malformed multipart: 400.
    let r = client()
        .post(format!("{}/api/v1/jobs", d.url))
        .bearer_auth(ADMIN)
        .header("Content-Type", "multipart/form-data; boundary=XYZ")
        .body("--XYZ\r\nContent-Disposition: form-data; name=\"repo\"\r\n\r\nrepo-without-end")
        .send()
        .unwrap();
    assert_eq!(status_and_code(r), (400, "bad-multipart".into()));
    // Checksum mismatch: 400.
    let form = reqwest::blocking::multipart::Form::new()
        .text("repo", REPO)
        .text("path", "/x")
        .text("tar_sha256", "0".repeat(64))
        .part("tar", reqwest::blocking::multipart::Part::bytes(t.clone()));
    let r = client()
        .post(format!("{}/api/v1/jobs", d.url))
        .bearer_auth(ADMIN)
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(status_and_code(r), (400, "checksum-mismatch".into()));
    // The checksum after the tar field (the spooled tar is hashed then), and as a header: a
    // wrong one is refused either way, the right one accepted.
    let right = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&t));
    let after_tar = |sum: &str, path: &str| {
        let form = reqwest::blocking::multipart::Form::new()
            .text("repo", REPO)
            .text("path", path.to_string())
            .part("tar", reqwest::blocking::multipart::Part::bytes(t.clone()))
            .text("tar_sha256", sum.to_string());
        client()
            .post(format!("{}/api/v1/jobs", d.url))
            .bearer_auth(ADMIN)
            .multipart(form)
            .send()
            .unwrap()
    };
    let as_header = |sum: &str, path: &str| {
        client()
            .post(format!("{}/api/v1/jobs", d.url))
            .bearer_auth(ADMIN)
            .header("X-Cvmfs-Repo", REPO)
            .header("X-Cvmfs-Path", path)
            .header("X-Cvmfs-Tar-Sha256", sum)
            .body(t.clone())
            .send()
            .unwrap()
    };
    let wrong = "ab".repeat(32);
    let r = after_tar(&wrong, "/x");
    assert_eq!(status_and_code(r), (400, "checksum-mismatch".into()));
    let r = as_header(&wrong, "/x");
    let (status, body) = (r.status().as_u16(), r.text().unwrap());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(&format!("tar SHA-256 is {right}")), "{body}");
    for id in [
        job_id(after_tar(&right, "/sum-after")),
        job_id(as_header(&right.to_uppercase(), "/sum-header")),
    ] {
        assert_eq!(d.wait_terminal(&id, 30)["state"], "published");
    }
    // Nothing refused was queued; uploads left nothing in the spool.
    let all: serde_json::Value = d.jobs();
    assert_eq!(all["total"], 4);
    assert_eq!(
        incoming_left(&dir.path().join("spool")),
        Vec::<std::path::PathBuf>::new()
    );
    // A bad tar is accepted (it is only read later) and fails with its reason.
    let hostile = tar_bytes(&[
        Spec::Symlink("l", "/etc"),
        Spec::File {
            path: "l/passwd",
            mode: 0o644,
            data: b"x".to_vec(),
            xattrs: vec![],
        },
    ]);
    let id = job_id(d.submit_raw(ADMIN, "/hostile", &hostile, None));
    let j = d.wait_terminal(&id, 30);
    assert_eq!(j["state"], "failed");
    assert_eq!(j["error"]["code"], "bad-tar");
    assert_eq!(j["error"]["state"], "processing");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("would be placed through 'l'"),
        "{j}"
    );
}

#[test]
fn abort_while_queued_processing_and_committing() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    std::fs::write(
        dir.path().join("config.yaml"),
        std::fs::read_to_string(dir.path().join("config.yaml"))
            .unwrap()
            .replace("workers: 2", "workers: 1"),
    )
    .unwrap();
    let d = Daemon::start(
        dir.path(),
        &[(
            "CVMFS_PREPUB_TEST_HOLD",
            "processing=1500,commit-started=2000",
        )],
    );
    let t = tar_bytes(&small_tree("abort"));
    let url = serve(d.storage.clone());
    let manifest_before = std::fs::read(d.storage.join(".cvmfspublished")).unwrap();

    let a = job_id(d.submit_raw(ADMIN, "/p/a", &t, None));
    let b = job_id(d.submit_raw(ADMIN, "/p/b", &t, None));
    d.wait_state(&a, "processing", 10);
    // b waits for the only worker: it is queued (its processing record exists but the worker is busy).
    let abort = |id: &str| {
        client()
            .post(format!("{}/api/v1/jobs/{id}/abort", d.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap()
    };
    assert_eq!(abort(&a).status().as_u16(), 202);
    assert_eq!(abort(&b).status().as_u16(), 202);
    assert_eq!(d.wait_terminal(&a, 30)["state"], "aborted");
    assert_eq!(d.wait_terminal(&b, 30)["state"], "aborted");
    assert_eq!(abort(&a).status().as_u16(), 409);

    // Abort during the commit (held right after the commit started).
    let c = job_id(d.submit_raw(ADMIN, "/p/c", &t, None));
    for _ in 0..400 {
        let j = d.job(&c);
        if j["state"] == "committing" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(abort(&c).status().as_u16(), 202);
    assert_eq!(d.wait_terminal(&c, 30)["state"], "aborted");
    assert_eq!(
        std::fs::read(d.storage.join(".cvmfspublished")).unwrap(),
        manifest_before,
        "nothing may be published"
    );
    let repo = open_reader(&url, &dir.path().join("cache"));
    assert!(repo.lookup("/p").is_err());
    drop(repo);
    check_repo(&d.storage);
}

/// Kills the daemon at `point` while it handles one job, restarts it, and checks the job is
/// published exactly once.
fn crash_and_recover(point: &str) {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let t = tar_bytes(&small_tree("crash"));
    let mut env = vec![("CVMFS_PREPUB_TEST_CRASH", point)];
    if point == "processed" {
        // A tar processed as it uploads may be processed before it is accepted (a crash then
        // loses nothing accepted): hold the processing's start so the crash comes after.
        env.push(("CVMFS_PREPUB_TEST_HOLD", "processing=500"));
    }
    let mut d = Daemon::start(dir.path(), &env);
    let r = d.post_job(ADMIN, "/crash", &t, None);
    let submitted = r.ok().filter(|r| r.status().as_u16() == 202).map(|r| {
        r.json::<serde_json::Value>().unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_string()
    });
    assert!(
        d.wait_exit(30),
        "daemon did not crash at {point}; log:\n{}",
        d.log_text()
    );
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    let all: serde_json::Value = d.jobs();
    assert_eq!(
        all["total"], 1,
        "crash at {point}: the accepted job must survive: {all}"
    );
    let id = all["jobs"][0]["job_id"].as_str().unwrap().to_string();
    if let Some(s) = submitted {
        assert_eq!(s, id);
    }
    let j = d.wait_terminal(&id, 60);
    assert_eq!(
        j["state"],
        "published",
        "crash at {point}: {j}\n{}",
        d.log_text()
    );
    assert_eq!(j["revision"], 2, "crash at {point}: committed exactly once");
    let (m, _) = prepub_core::manifest::Manifest::parse(
        &std::fs::read(d.storage.join(".cvmfspublished")).unwrap(),
    )
    .unwrap();
    assert_eq!(m.revision, 2, "crash at {point}: exactly one new revision");
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/crash", &small_tree("crash"));
    drop(repo);
    check_repo(&d.storage);
}

#[test]
fn crash_at_every_journaled_step_recovers_exactly_once() {
    for point in [
        "accepted",
        "processing-journaled",
        "processed",
        "changeset-saved",
        "uploading-journaled",
        "distributing-journaled",
        "committing-journaled",
        "commit-started",
        "manifest-written",
        "published-journaled",
    ] {
        crash_and_recover(point);
    }
}

/// Submits `tar` to `path` on a daemon started with `env` (which makes it crash), waits for the
/// crash (the answer may never come), and returns the one job directory left in the spool.
fn crash_with_one_job(
    dir: &std::path::Path,
    env: &[(&str, &str)],
    path: &str,
    tar: &[u8],
) -> std::path::PathBuf {
    let mut d = Daemon::start(dir, env);
    let _ = d.post_job(ADMIN, path, tar, None);
    assert!(d.wait_exit(30), "no crash with {env:?}:\n{}", d.log_text());
    drop(d);
    let jobs: Vec<_> = std::fs::read_dir(dir.join("spool/jobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    jobs.into_iter().next().unwrap()
}

#[test]
fn a_corrupt_change_set_fails_its_commit_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let t = tar_bytes(&small_tree("corrupt"));
    let crash = [("CVMFS_PREPUB_TEST_CRASH", "committing-journaled")];
    let job = crash_with_one_job(dir.path(), &crash, "/corrupt", &t);
    let cs = job.join("changeset.json");
    let text = std::fs::read(&cs).unwrap();
    std::fs::write(&cs, &text[..text.len() / 2]).unwrap();
    // The commit parses the change set on its own thread while it opens the repository.
    let d = Daemon::start(dir.path(), &[]);
    let id = d.jobs()["jobs"][0]["job_id"].as_str().unwrap().to_string();
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "spool-corrupt", "{j}");
    assert_eq!(j["error"]["state"], "committing", "{j}");
    let (m, _) = prepub_core::manifest::Manifest::parse(
        &std::fs::read(d.storage.join(".cvmfspublished")).unwrap(),
    )
    .unwrap();
    assert_eq!(m.revision, 1, "nothing published");
}

#[test]
fn finished_jobs_keep_their_record_and_lose_their_tar_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "  tar_retention: 2s\n");
    let d = Daemon::start(dir.path(), &[]);
    let id = job_id(d.submit_raw(ADMIN, "/r", &tar_bytes(&small_tree("r")), None));
    assert_eq!(d.wait_terminal(&id, 30)["state"], "published");
    let job_dir = dir.path().join("spool/jobs").join(&id);
    assert!(job_dir.join("payload.tar").is_file());
    // The API shows the state as the job manager sets it; the journal records it right after
    // (the repository itself is already published), and job.json follows the journal.
    let mut on_disk = serde_json::Value::Null;
    for _ in 0..50 {
        on_disk =
            serde_json::from_slice(&std::fs::read(job_dir.join("job.json")).unwrap()).unwrap();
        if on_disk["state"] == "published" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        on_disk["state"], "published",
        "the job's state is visible on disk"
    );
    for _ in 0..100 {
        if !job_dir.join("payload.tar").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !job_dir.join("payload.tar").exists(),
        "tar must be deleted after the retention period"
    );
    assert!(!job_dir.join("changeset.json").exists());
    assert_eq!(d.job(&id)["state"], "published", "the record stays");
}

#[test]
fn serves_the_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let k = prepub_core::keys::RepoKeys::generate("localhost", 30).unwrap();
    let tls = dir.path().join("tls");
    k.save(&tls).unwrap();
    let server = format!(
        "  tls_cert: {}\n  tls_key: {}\n",
        tls.join("localhost.crt").display(),
        tls.join("localhost.key").display()
    );
    prepare_daemon_dir(dir.path(), "", &server);
    // The harness polls health over plain HTTP; start by hand and poll over HTTPS instead.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args([
            "--config",
            dir.path().join("config.yaml").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("PREPUB_API_TOKEN", ADMIN)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = reqwest::blocking::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let mut status = 0;
    for _ in 0..100 {
        if let Ok(r) = c
            .get(format!("https://127.0.0.1:{port}/api/v1/health"))
            .send()
        {
            status = r.status().as_u16();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let plain = client()
        .get(format!("http://127.0.0.1:{port}/api/v1/health"))
        .send();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
    assert!(
        plain.is_err() || plain.unwrap().status().as_u16() != 200,
        "plain HTTP must not be served on a TLS listener"
    );
}

/// The states of job `id`'s event stream, read until it ends (each event checked to be the
/// job's, the stream checked to be one).
fn job_event_states(d: &Daemon, id: &str) -> Vec<String> {
    use std::io::BufRead;
    let r = client()
        .get(format!("{}/api/v1/jobs/{id}/events", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut states = Vec::new();
    for line in std::io::BufReader::new(r).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["job_id"], id);
            states.push(v["state"].as_str().unwrap().to_string());
        }
    }
    states
}

#[test]
fn job_events_stream_snapshot_then_changes_then_closes() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=800")]);
    let id = job_id(d.submit_raw(ADMIN, "/ev", &tar_bytes(&small_tree("ev")), None));
    let states = job_event_states(&d, &id);
    // The stream ended by itself after the terminal state.
    assert_eq!(
        states.last().map(String::as_str),
        Some("published"),
        "{states:?}"
    );
    assert!(
        matches!(states[0].as_str(), "queued" | "processing"),
        "{states:?}"
    );
    assert!(states.len() >= 2, "{states:?}");
    let unauth = client()
        .get(format!("{}/api/v1/jobs/{id}/events", d.url))
        .send()
        .unwrap();
    assert_eq!(unauth.status().as_u16(), 401);
}

#[test]
fn job_events_are_sent_when_the_state_changes_not_at_the_next_look() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    // The stream's own look for changes comes every ten minutes here: only the job manager's
    // word that a record was saved can bring the later states within the client's minute.
    let d = Daemon::start(
        dir.path(),
        &[
            ("CVMFS_PREPUB_TEST_HOLD", "processing=500"),
            ("CVMFS_PREPUB_TEST_EVENT_TICK_MS", "600000"),
        ],
    );
    let id = job_id(d.submit_raw(ADMIN, "/ev", &tar_bytes(&small_tree("ev")), None));
    // Read until the stream ends by itself, well within the client's timeout.
    let states = job_event_states(&d, &id);
    assert!(
        matches!(states[0].as_str(), "queued" | "processing"),
        "{states:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("published"),
        "{states:?}"
    );
    assert_eq!(d.job(&id)["state"], "published");
}

fn data_file(path: &'static str, data: Vec<u8>) -> Spec {
    Spec::File {
        path,
        mode: 0o644,
        data,
        xattrs: vec![],
    }
}

#[test]
fn a_tar_is_processed_while_it_uploads() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let first = pseudo_random(100_000, 71);
    let second = pseudo_random(300_000, 72);
    let specs = vec![
        data_file("early/first.bin", first.clone()),
        data_file("early/second.bin", second.clone()),
    ];
    let tar = tar_bytes(&specs);
    let up = d.begin_upload("/sw/early", &tar, cut_after(&tar, &first));
    // The first file is stored while the rest of the tar has not been sent: no job exists yet.
    assert!(
        eventually(30, || cas.exists(&object_of_small_file(&first)).unwrap()),
        "the first file was not processed before the upload ended\n{}",
        d.log_text()
    );
    assert_eq!(d.jobs()["jobs"].as_array().unwrap().len(), 0);
    assert!(!cas.exists(&object_of_small_file(&second)).unwrap());
    let (status, body) = up.finish();
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_str().unwrap();
    let j = d.wait_terminal(id, 60);
    assert_eq!(j["state"], "published", "{j}");
    assert_eq!(j["attempts"], 1, "{j}");
    assert_eq!(j["progress"]["objects_new"], 2, "{j}");
    let url = serve(d.storage.clone());
    verify(
        &open_reader(&url, &dir.path().join("cache")),
        "/sw/early",
        &specs,
    );
    check_repo(&d.storage);
}

#[test]
fn uploads_cut_off_while_processed_leave_no_job_and_free_their_reader() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    // More than the two uploads processed at once: each is processed while it arrives only if
    // the ones cut off before it gave their reader back.
    for seed in 0..4u64 {
        let first = pseudo_random(50_000, 100 + seed);
        let tar = tar_bytes(&[
            data_file("cut/first.bin", first.clone()),
            data_file("cut/rest.bin", pseudo_random(200_000, 200 + seed)),
        ]);
        let up = d.begin_upload("/sw/cut", &tar, cut_after(&tar, &first));
        assert!(
            eventually(30, || cas.exists(&object_of_small_file(&first)).unwrap()),
            "upload {seed} was not processed while it arrived\n{}",
            d.log_text()
        );
        drop(up);
    }
    assert!(eventually(30, || std::fs::read_dir(
        dir.path().join("spool/incoming")
    )
    .unwrap()
    .next()
    .is_none()));
    assert_eq!(d.jobs()["jobs"].as_array().unwrap().len(), 0);
    // The path publishes normally afterwards.
    let specs = vec![data_file("cut/first.bin", b"whole".to_vec())];
    let id = job_id(d.submit_raw(ADMIN, "/sw/cut", &tar_bytes(&specs), None));
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    check_repo(&d.storage);
}

#[test]
fn an_upload_processed_before_its_tar_is_on_disk_is_accepted_with_its_change_set() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let specs = small_tree("early");
    let t = tar_bytes(&specs);
    // The tar's fsync is held: the job is accepted once processed, already in `processing`.
    let hold = [("CVMFS_PREPUB_TEST_HOLD", "tar-sync=5000")];
    let d = Daemon::start(dir.path(), &hold);
    let r = d.submit_raw(ADMIN, "/early", &t, None);
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["state"], "processing", "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    assert!(dir
        .path()
        .join(format!("spool/jobs/{id}/changeset.json"))
        .is_file());
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    drop(d);

    // Killed right after such an acceptance, with the tar lost (it was never synced): the job
    // goes on from its change set.
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let crash = [hold[0], ("CVMFS_PREPUB_TEST_CRASH", "accepted")];
    let job = crash_with_one_job(dir.path(), &crash, "/early", &t);
    std::fs::write(job.join("payload.tar"), b"").unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let all = d.jobs();
    assert_eq!(all["total"], 1, "{all}");
    let id = all["jobs"][0]["job_id"].as_str().unwrap().to_string();
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    let url = serve(d.storage.clone());
    verify(
        &open_reader(&url, &dir.path().join("cache")),
        "/early",
        &specs,
    );
    check_repo(&d.storage);
}

/// The `last_modified` of the catalog mounted at `path` in the current revision, and of the
/// root catalog.
fn catalog_times(storage: &std::path::Path, path: &str) -> (i64, i64) {
    use prepub_core::catalog::db::CatalogDb;
    let cas = prepub_core::cas::LocalCas::open(storage).unwrap();
    let (m, _) = prepub_core::repo::current_manifest(&cas).unwrap().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let open = |id: &prepub_core::hash::ObjectId, name: &str| {
        let bytes = prepub_core::cas::get_all(&cas, id).unwrap();
        let file = tmp.path().join(name);
        let raw = prepub_core::object::decode_to_vec(id, &bytes, true).unwrap();
        std::fs::write(&file, raw).unwrap();
        CatalogDb::open(&file, false).unwrap()
    };
    let time = |db: &CatalogDb| -> i64 {
        db.property("last_modified")
            .unwrap()
            .unwrap()
            .parse()
            .unwrap()
    };
    let root = open(&m.root_catalog, "root.db");
    let nested = root
        .nested()
        .unwrap()
        .into_iter()
        .find(|n| n.path == path)
        .and_then(|n| n.hash)
        .expect("mounted in the root catalog");
    (time(&open(&nested, "nested.db")), time(&root))
}

#[test]
fn a_new_release_is_committed_with_the_catalogs_built_while_it_was_processed() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    // More than a second between the end of processing and the commit.
    let d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processed=1100")]);
    let mut rel = big_tree();
    rel.push(Spec::File {
        path: ".cvmfscatalog",
        mode: 0o644,
        data: vec![],
        xattrs: vec![],
    });
    rel.push(Spec::Hardlink("pkg/tool2", "pkg/tool"));
    let id = job_id(d.submit_raw(ADMIN, "/rel/1.0", &tar_bytes(&rel), None));
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}\n{}", d.log_text());
    // The release's catalog carries the time it was built, before the commit's.
    let (built, committed) = catalog_times(&d.storage, "/rel/1.0");
    let prebuilt = || -> String {
        d.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix("cvmfs_prepub_catalogs_prebuilt_total "))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(prebuilt(), "1");
    assert!(built < committed, "built {built}, committed {committed}");
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/rel/1.0", &rel);
    let pkg = repo.lookup("/rel/1.0/pkg").unwrap();
    assert!(pkg.is_nested_catalog_mountpoint() || pkg.is_nested_catalog_root());
    drop(repo);
    check_repo(&d.storage);

    // Replacing it (the path exists now) builds its catalogs in the commit, as before.
    let rel2 = small_tree("again");
    let id = job_id(d.submit_raw(ADMIN, "/rel/1.0", &tar_bytes(&rel2), None));
    assert_eq!(d.wait_terminal(&id, 60)["state"], "published");
    assert_eq!(prebuilt(), "1");
    let repo = open_reader(&url, &dir.path().join("cache2"));
    verify(&repo, "/rel/1.0", &rel2);
    drop(repo);
    check_repo(&d.storage);
}

/// A job's final record that fails to be journaled once is journaled again: after a restart
/// the job is `published` as it was, not resumed and committed once more.
#[test]
fn a_final_record_that_failed_to_journal_is_journaled_again() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(
        dir.path(),
        &[("CVMFS_PREPUB_TEST_FAIL", "record-published")],
    );
    let id = d.submit_id(ADMIN, "/p/final", &tar_bytes(&small_tree("final")), None);
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}");
    let journaled = || {
        std::fs::read_to_string(dir.path().join("spool/journal.wal"))
            .unwrap()
            .lines()
            .any(|l| l.contains(&id) && l.contains("\"state\":\"published\""))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !journaled() {
        assert!(
            std::time::Instant::now() < deadline,
            "published never journaled"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    let again = d.job(&id);
    assert_eq!(again["state"], "published", "{again}");
    assert_eq!(again["revision"], j["revision"]);
    assert!(
        d.metrics_text()
            .contains("cvmfs_prepub_jobs_recovered_total 0"),
        "the job was resumed after the restart"
    );
}

/// A job whose processing takes the daemon down every time is not resumed forever: after
/// `max_attempts` (3) interrupted attempts the next start ends it `failed`, with the reason, and
/// the service goes on.
#[test]
fn a_job_that_stops_the_daemon_each_time_fails_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    // The upload's processing is held so that it cannot end (and save the job's change set)
    // before the job is accepted and its `processing` record journaled: a resume would then
    // take the change set, and not process (and stop) again.
    let crash = [
        ("CVMFS_PREPUB_TEST_CRASH", "processing-journaled"),
        ("CVMFS_PREPUB_TEST_HOLD", "processing=20000"),
    ];
    let mut d = Daemon::start(dir.path(), &crash);
    let _ = d.post_job(ADMIN, "/p/poison", &tar_bytes(&small_tree("poison")), None);
    assert!(d.wait_exit(30), "no crash:\n{}", d.log_text());
    drop(d);
    // Two more starts, each resuming the job and stopping at the same step.
    crash_on_resume(
        dir.path(),
        &[("CVMFS_PREPUB_TEST_CRASH", "processing-journaled")],
        2,
    );
    let d = Daemon::start(dir.path(), &[]);
    let all = d.jobs();
    let id = all["jobs"][0]["job_id"].as_str().unwrap().to_string();
    let j = d.wait_terminal(&id, 30);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "processing-interrupted", "{j}");
    assert_eq!(j["attempts"], 3, "{j}");
    // The service goes on.
    let ok = d.submit_id(ADMIN, "/p/fine", &tar_bytes(&small_tree("fine")), None);
    assert_eq!(d.wait_terminal(&ok, 60)["state"], "published");
}

/// The same for a commit that takes the daemon down: every resumed commit finds its job's
/// revision not in the repository and counts as an attempt; after `max_attempts` the job ends
/// `failed` (nothing of it published) and the jobs queued behind it go ahead.
#[test]
fn a_commit_that_stops_the_daemon_each_time_fails_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let crash = [("CVMFS_PREPUB_TEST_CRASH", "commit-started")];
    let mut d = Daemon::start(dir.path(), &crash);
    let id = d.submit_id(ADMIN, "/p/poison", &tar_bytes(&small_tree("poison")), None);
    assert!(d.wait_exit(30), "no crash:\n{}", d.log_text());
    drop(d);
    crash_on_resume(dir.path(), &crash, 2);
    let d = Daemon::start(dir.path(), &[]);
    let j = d.wait_terminal(&id, 30);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "commit-interrupted", "{j}");
    assert_eq!(j["attempts"], 3, "{j}");
    let ok = d.submit_id(ADMIN, "/p/fine", &tar_bytes(&small_tree("fine")), None);
    let jf = d.wait_terminal(&ok, 60);
    assert_eq!(jf["state"], "published", "{jf}");
    // The failed job's commit never landed: the next one is the first revision after init.
    assert_eq!(jf["revision"], 2, "{jf}");
}

#[test]
fn a_scoped_token_names_new_tags_and_moves_only_its_own() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let t = tar_bytes(&small_tree("tags"));
    let publish = |token: &str, path: &str, tag: &str| {
        d.wait_terminal(&d.submit_id(token, path, &t, Some(tag)), 60)
    };
    let tag = |name: &str| history_tag(&cas, name);
    let revision = || {
        prepub_core::repo::current_manifest(&cas)
            .unwrap()
            .unwrap()
            .0
            .revision
    };
    // A tag the admin token's job made is not the scoped token's: its job fails, nothing is
    // published and the tag stays where it was.
    let j = publish(ADMIN, "/allowed/a", "stable");
    assert_eq!(j["state"], "published", "{j}");
    let stable = tag("stable");
    let before = revision();
    let objects = cas.list().unwrap().len();
    let j = publish(SCOPED, "/allowed/b", "stable");
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], "tag-taken", "{j}");
    assert_eq!(revision(), before);
    // Refused before its catalogs were built (the tar's contents were stored already).
    assert_eq!(cas.list().unwrap().len(), objects);
    let now = tag("stable");
    assert_eq!((now.revision, now.hash), (stable.revision, stable.hash));
    // A new tag becomes the token's, and the token may move it.
    let j = publish(SCOPED, "/allowed/b", "team-nightly");
    assert_eq!(j["state"], "published", "{j}");
    let mine = tag("team-nightly");
    assert!(
        mine.description.ends_with(" [cvmfs-prepub owner scoped]"),
        "{}",
        mine.description
    );
    let j = publish(SCOPED, "/allowed/c", "team-nightly");
    assert_eq!(j["state"], "published", "{j}");
    assert_eq!(
        tag("team-nightly").revision,
        j["revision"].as_u64().unwrap()
    );
    // The admin token may move any tag; moved by it, the tag is no longer the token's.
    let j = publish(ADMIN, "/allowed/d", "team-nightly");
    assert_eq!(j["state"], "published", "{j}");
    let j = publish(SCOPED, "/allowed/e", "team-nightly");
    assert_eq!(j["error"]["code"], "tag-taken", "{j}");
}
