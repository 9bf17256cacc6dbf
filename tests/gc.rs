//! Orphan reclaim through the daemon and prepubctl: what the kept revisions (current, the ones
//! before it, tagged ones) reference stays and the repository still checks clean; objects of
//! replaced content and leftovers of jobs that never committed go, each in the audit log; jobs in flight refuse a
//! run, jobs arriving during a run wait for it; an unreadable catalog stops the plan.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use prepub_core::cas::Cas;
use prepub_core::hash::{Digest20, ObjectId, Suffix};

fn gc_dir(dir: &std::path::Path, gc: &str) {
    prepare_daemon_dir(dir, "", "");
    set_gc(dir, gc);
}

fn file(path: &'static str, data: Vec<u8>) -> Spec {
    Spec::File {
        path,
        mode: 0o644,
        data,
        xattrs: vec![],
    }
}

fn publish(d: &Daemon, path: &str, specs: &[Spec], tag: Option<&str>) -> serde_json::Value {
    let r = d.submit_raw(ADMIN, path, &tar_bytes(specs), tag);
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_terminal(&id, 60)
}

fn object(data: &[u8]) -> ObjectId {
    object_of_small_file(data)
}

fn ctl(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_prepubctl"))
        .args(args)
        .env("PREPUB_URL", &d.url)
        .env("PREPUB_API_TOKEN", ADMIN)
        .output()
        .unwrap()
}

#[test]
fn unreferenced_objects_go_and_every_kept_revision_stays_whole() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=800")]);
    let v = |n: u8| format!("content of release {n} ").repeat(50).into_bytes();
    // Release 1 is tagged; 2 replaces 1; 3 replaces 2; an aborted job leaves its objects.
    assert_eq!(
        publish(&d, "/sw/app", &[file("bin/app", v(1))], Some("app-1"))["state"],
        "published"
    );
    assert_eq!(
        publish(&d, "/sw/app", &[file("bin/app", v(2))], None)["state"],
        "published"
    );
    assert_eq!(
        publish(&d, "/sw/app", &[file("bin/app", v(3))], None)["state"],
        "published"
    );
    assert_eq!(
        publish(&d, "/sw/app", &[file("bin/app", v(4))], None)["state"],
        "published"
    );
    // What a job that never committed leaves behind: a stored object no revision names.
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    std::io::Write::write_all(&mut enc, &v(9)).unwrap();
    cas.put_bytes(&object(&v(9)), &enc.finish().unwrap())
        .unwrap();
    // Revision 5 is current (4 publishes after init), trunk-previous is 4, app-1 is 2:
    // release 2's file (revision 3) is referenced by nothing kept; the leftover neither.
    for n in [1, 2, 3, 4, 9] {
        assert!(cas.exists(&object(&v(n))).unwrap(), "release {n} stored");
    }

    let o = ctl(&d, &["gc", "plan", "--repo", REPO, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let whys: Vec<&str> = plan["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["why"].as_str().unwrap())
        .collect();
    assert!(
        whys.contains(&"current") && whys.contains(&"tag app-1"),
        "{plan}"
    );
    assert!(whys.contains(&"tag trunk-previous"), "{plan}");
    let sample: Vec<String> = plan["sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert!(sample.contains(&object(&v(2)).to_string()), "{plan}");
    assert!(sample.contains(&object(&v(9)).to_string()), "{plan}");
    // A plan deletes nothing.
    assert!(cas.exists(&object(&v(2))).unwrap());

    let o = ctl(&d, &["gc", "run", "--repo", REPO]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let deleted = plan["candidate_count"].as_u64().unwrap();
    assert!(out.contains(&format!("deleted {deleted} objects")), "{out}");
    for n in [2, 9] {
        assert!(
            !cas.exists(&object(&v(n))).unwrap(),
            "release {n} still stored"
        );
    }
    for n in [1, 3, 4] {
        assert!(
            cas.exists(&object(&v(n))).unwrap(),
            "release {n} was deleted"
        );
    }
    // The current revision checks clean; the audit log lists every deletion.
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    // Every tag the history lists still names a whole root catalog: the automatic tags of
    // releases 2 and 3 were dropped by the publishes after them (auto_tag_timespan 0s), not
    // left naming collected catalogs.
    let tags = history_tags(&cas);
    let names: Vec<&str> = tags.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(
        names.contains(&"app-1") && names.contains(&"trunk"),
        "{names:?}"
    );
    assert!(names.contains(&"trunk-previous"), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.starts_with("prepub-")).count(),
        1,
        "{names:?}"
    );
    for t in &tags {
        let root = ObjectId::new(Digest20::from_hex(&t.hash).unwrap(), Suffix::Catalog);
        assert!(
            cas.exists(&root).unwrap(),
            "tag {} names a collected catalog",
            t.name
        );
    }
    let audit = std::fs::read_to_string(dir.path().join("spool/gc/audit.log")).unwrap();
    assert_eq!(audit.lines().count() as u64, deleted);
    assert!(audit.contains(&format!("{REPO} deleted {}", object(&v(2)))));
    let m = d.metrics_text();
    assert!(m.contains(&format!(
        "cvmfs_prepub_gc_objects_deleted_total{{repo=\"{REPO}\"}} {deleted}"
    )));
    // Nothing left to collect; publishing goes on.
    let again: serde_json::Value =
        serde_json::from_slice(&ctl(&d, &["gc", "plan", "--repo", REPO, "--json"]).stdout).unwrap();
    assert_eq!(again["candidate_count"], 0);
    assert_eq!(
        publish(&d, "/sw/app", &[file("bin/app", v(5))], None)["state"],
        "published"
    );
    read_back(
        &d,
        &dir.path().join("cache"),
        "/sw/app",
        &[file("bin/app", v(5))],
    );
}

#[test]
fn runs_wait_for_idle_and_jobs_wait_for_runs() {
    let dir = tempfile::tempdir().unwrap();
    // Two deletions a second: the run lasts long enough to submit during it.
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, max_deletion_rate: 2, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=1500")]);
    let junk: Vec<ObjectId> = (0..6u8)
        .map(|i| {
            let id = ObjectId::new(Digest20::of(&[i; 8]), Suffix::None);
            prepub_core::cas::LocalCas::open(&d.storage)
                .unwrap()
                .put_bytes(&id, &[i; 8])
                .unwrap();
            id
        })
        .collect();
    // A job in flight: refused.
    let busy = d.submit_id(
        ADMIN,
        "/sw/busy",
        &tar_bytes(&[file("a", b"a".to_vec())]),
        None,
    );
    let o = ctl(&d, &["gc", "run", "--repo", REPO]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("HTTP 409") && err.contains("in flight"),
        "{err}"
    );
    d.wait_terminal(&busy, 30);
    // A job arriving during the run waits in queued, then publishes.
    let (run, late) = std::thread::scope(|s| {
        let h = s.spawn(|| ctl(&d, &["gc", "run", "--repo", REPO, "--json"]));
        std::thread::sleep(Duration::from_millis(700));
        let id = d.submit_id(
            ADMIN,
            "/sw/late",
            &tar_bytes(&[file("b", b"b".to_vec())]),
            None,
        );
        std::thread::sleep(Duration::from_millis(300));
        let mid = d.job(&id);
        assert_eq!(mid["state"], "queued", "{mid}");
        assert_eq!(
            mid["waiting"],
            "garbage collection of the repository is running"
        );
        (h.join().unwrap(), id)
    });
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    // The six leftovers, plus what the published job made unreferenced (the old history).
    assert_eq!(v["swept"]["deleted"], v["plan"]["candidate_count"], "{v}");
    assert!(v["swept"]["deleted"].as_u64().unwrap() >= 6, "{v}");
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    assert!(junk.iter().all(|id| !cas.exists(id).unwrap()));
    assert_eq!(d.wait_terminal(&late, 30)["state"], "published");
    // Both publishes, the one before and the one held during the run, read back whole.
    read_back(
        &d,
        &dir.path().join("cache"),
        "/sw/busy",
        &[file("a", b"a".to_vec())],
    );
    read_back(
        &d,
        &dir.path().join("cache"),
        "/sw/late",
        &[file("b", b"b".to_vec())],
    );
}

#[test]
fn refusals_and_partial_knowledge() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(dir.path(), "{enabled: false}");
    let d = Daemon::start(dir.path(), &[]);
    // Plans are allowed, runs are not until enabled.
    assert!(ctl(&d, &["gc", "plan", "--repo", REPO]).status.success());
    let o = ctl(&d, &["gc", "run", "--repo", REPO]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3));
    assert!(err.contains("not enabled for"), "{err}");
    // A damaged catalog stops the plan and nothing is decided.
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let (m, _) = prepub_core::repo::current_manifest(&cas).unwrap().unwrap();
    let orphan = ObjectId::new(Digest20::of(b"orphan"), Suffix::None);
    cas.put_bytes(&orphan, b"orphan").unwrap();
    std::fs::write(d.storage.join(m.root_catalog.path()), b"damaged").unwrap();
    let o = ctl(&d, &["gc", "plan", "--repo", REPO]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("HTTP 503") && err.contains("partial knowledge"),
        "{err}"
    );
    assert!(cas.exists(&orphan).unwrap());
}

#[test]
fn with_a_soft_delete_period_objects_are_tombstoned_first_and_an_access_revokes() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s, soft_delete_period: 2s}",
    );
    let d = Daemon::start(dir.path(), &[]);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let junk: Vec<ObjectId> = (0..3u8)
        .map(|i| {
            let id = ObjectId::new(Digest20::of(&[i; 4]), Suffix::None);
            cas.put_bytes(&id, &[i; 4]).unwrap();
            id
        })
        .collect();
    let run = || -> serde_json::Value {
        let o = ctl(&d, &["gc", "run", "--repo", REPO, "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // First run: tombstones, deletes nothing.
    let r1 = run();
    assert_eq!(r1["swept"]["deleted"], 0, "{r1}");
    assert_eq!(r1["tombstones"]["new"], 3, "{r1}");
    assert!(junk.iter().all(|id| cas.exists(id).unwrap()));
    let o = ctl(&d, &["gc", "tombstones", "--repo", REPO]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("3 tombstones"), "{out}");
    // Someone reads junk[0]: its tombstone is revoked.
    let r = client()
        .post(format!("{}/api/v1/access-events", d.url))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"repo": REPO, "events": [{"object": junk[0].to_string()}]}))
        .send()
        .unwrap();
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["revoked"], 1, "{v}");
    std::thread::sleep(Duration::from_millis(2100));
    // Second run: the two still-tombstoned objects go; junk[0] is tombstoned afresh.
    let r2 = run();
    assert_eq!(r2["swept"]["deleted"], 2, "{r2}");
    assert_eq!(r2["tombstones"]["pending"], 1, "{r2}");
    assert!(cas.exists(&junk[0]).unwrap());
    assert!(!cas.exists(&junk[1]).unwrap() && !cas.exists(&junk[2]).unwrap());
    let m = d.metrics_text();
    assert!(
        m.contains(&format!(
            "cvmfs_prepub_gc_objects_tombstoned_total{{repo=\"{REPO}\"}} 4"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "cvmfs_prepub_gc_tombstones_revoked_total{{repo=\"{REPO}\"}} 1"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "cvmfs_prepub_gc_tombstones_pending{{repo=\"{REPO}\"}} 1"
        )),
        "{m}"
    );
    // Four tombstonings and one revocation of 4-byte objects.
    for (metric, v) in [
        ("gc_bytes_tombstoned_total", 16),
        ("gc_bytes_revoked_total", 4),
    ] {
        assert!(
            m.contains(&format!("cvmfs_prepub_{metric}{{repo=\"{REPO}\"}} {v}")),
            "{metric}: {m}"
        );
    }
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
}

#[test]
fn a_client_leaving_mid_run_neither_stops_it_nor_holds_jobs_forever() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, max_deletion_rate: 4, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(dir.path(), &[]);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let junk: Vec<ObjectId> = (0..8u8)
        .map(|i| {
            let id = ObjectId::new(Digest20::of(&[i; 16]), Suffix::None);
            cas.put_bytes(&id, &[i; 16]).unwrap();
            id
        })
        .collect();
    // The run takes about two seconds; the client gives up after half a second.
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{}/api/v1/gc/{REPO}/run", d.url))
        .bearer_auth(ADMIN)
        .send();
    assert!(r.is_err(), "the client should have timed out");
    // A job submitted now waits for the run, then publishes.
    let id = d.submit_id(
        ADMIN,
        "/sw/after",
        &tar_bytes(&[file("a", b"after".to_vec())]),
        None,
    );
    assert_eq!(d.wait_terminal(&id, 30)["state"], "published");
    assert!(
        junk.iter().all(|j| !cas.exists(j).unwrap()),
        "the run finished"
    );
    let audit = std::fs::read_to_string(dir.path().join("spool/gc/audit.log")).unwrap();
    assert!(audit.lines().count() >= 8);
    // Nor does it stay claimed: the next run is not refused as in progress.
    let o = ctl(&d, &["gc", "run", "--repo", REPO, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    read_back(
        &d,
        &dir.path().join("cache"),
        "/sw/after",
        &[file("a", b"after".to_vec())],
    );
}

#[test]
fn scheduled_runs_and_dry_runs() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s, schedule: '@every 1s'}",
    );
    let d = Daemon::start(dir.path(), &[]);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let id = ObjectId::new(Digest20::of(b"scheduled"), Suffix::None);
    cas.put_bytes(&id, b"scheduled").unwrap();
    let start = std::time::Instant::now();
    while cas.exists(&id).unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no scheduled run came"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The run is logged once it ends, after its deletions.
    assert!(
        eventually(10, || d.log_text().contains("scheduled garbage collection")),
        "{}",
        d.log_text()
    );
    let o = ctl(&d, &["gc", "status", "--repo", REPO, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["schedule"], "@every 1s", "{v}");
    assert!(
        v["next_run"].as_i64().unwrap() >= prepub_core::timefmt::now() - 2,
        "{v}"
    );
    assert_eq!(
        (
            v["last_run"]["state"].as_str(),
            v["last_run"]["trigger"].as_str()
        ),
        (Some("complete"), Some("schedule")),
        "{v}"
    );
    // Each run is journaled; the one that took the orphan says so.
    let runs = v["runs"].as_array().unwrap();
    assert!(
        runs.iter()
            .any(|r| r["deleted"] == 1 && r["state"] == "complete"),
        "{v}"
    );
    let journaled = std::fs::read_dir(dir.path().join("spool/gc/runs"))
        .unwrap()
        .count();
    assert!(journaled >= runs.len().min(1), "{journaled}");
    assert_eq!(v["enabled"], true);
    let text =
        String::from_utf8_lossy(&ctl(&d, &["gc", "status", "--repo", REPO]).stdout).into_owned();
    assert!(
        text.contains("garbage collection enabled") && text.contains("schedule: @every 1s"),
        "{text}"
    );
    drop(d);

    // A dry run plans and counts, and changes nothing.
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, dry_run: true}",
    );
    let d = Daemon::start(dir.path(), &[]);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    cas.put_bytes(&id, b"scheduled").unwrap();
    let o = ctl(&d, &["gc", "run", "--repo", REPO, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["swept"]["deleted"], 0);
    assert!(v["plan"]["candidate_count"].as_u64().unwrap() >= 1, "{v}");
    assert!(cas.exists(&id).unwrap());
    assert!(!dir.path().join("spool/gc/audit.log").exists());
    let o = ctl(&d, &["gc", "status", "--repo", REPO, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            v["dry_run"].as_bool(),
            v["last_run"]["state"].as_str(),
            v["last_run"]["dry_run"].as_bool()
        ),
        (Some(true), Some("complete"), Some(true)),
        "{v}"
    );
    assert!(v["schedule"].is_null() && v["next_run"].is_null(), "{v}");
}

#[test]
fn a_schedule_needs_gc_enabled_and_a_valid_expression() {
    for (gc, want) in [
        (
            "{schedule: '@daily'}",
            "gc.schedule: a schedule needs gc.enabled: true",
        ),
        (
            "{enabled: true, schedule: '0 25 * * *'}",
            "gc.schedule: hour",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        gc_dir(dir.path(), gc);
        let out = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
            .args(["--config", dir.path().join("config.yaml").to_str().unwrap()])
            .env("PREPUB_API_TOKEN", ADMIN)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{gc}: {err}");
    }
}

fn gc_status(d: &Daemon) -> serde_json::Value {
    let o = ctl(d, &["gc", "status", "--repo", REPO, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The repository checks clean and the independent reader sees `specs` under `base`.
fn read_back(d: &Daemon, cache: &std::path::Path, base: &str, specs: &[Spec]) {
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, cache);
    verify(&repo, base, specs);
}

#[test]
fn killed_at_each_step_a_run_ends_aborted_with_its_tombstones_revoked_and_nothing_kept_lost() {
    let v = |n: u8| format!("release {n} of the app ").repeat(40).into_bytes();
    for (soft, point, state) in [
        ("1h", "gc-scanning", "scanning"),
        ("1h", "gc-tombstoned", "tombstoned"),
        ("1h", "gc-reaping", "reaping"),
        ("0s", "gc-delete#2", "reaping"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        gc_dir(
            dir.path(),
            &format!("{{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s, soft_delete_period: {soft}}}"),
        );
        let d = Daemon::start(dir.path(), &[]);
        // Release 1 is referenced by nothing kept (2 is trunk-previous, 3 current).
        for n in [1, 2, 3] {
            let j = publish(&d, "/sw/app", &[file("bin/app", v(n))], None);
            assert_eq!(j["state"], "published", "{j}");
        }
        let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
        for i in 0..3u8 {
            let id = ObjectId::new(Digest20::of(&[i; 8]), Suffix::None);
            cas.put_bytes(&id, &[i; 8]).unwrap();
        }
        let plan: serde_json::Value =
            serde_json::from_slice(&ctl(&d, &["gc", "plan", "--repo", REPO, "--json"]).stdout)
                .unwrap();
        let candidates = plan["candidate_count"].as_u64().unwrap();
        assert!(candidates >= 4, "{plan}");
        drop(d);

        // In the last case a publish arrives while the run reaps (held there 1.5 s): it waits
        // in queued, the daemon dies, and the next start publishes it.
        let during = point == "gc-delete#2";
        let mut env = vec![("CVMFS_PREPUB_TEST_CRASH", point)];
        if during {
            env.push(("CVMFS_PREPUB_TEST_HOLD", "gc-reaping=1500"));
        }
        let mut d = Daemon::start(dir.path(), &env);
        let running = {
            let (c, u) = (client(), format!("{}/api/v1/gc/{REPO}/run", d.url));
            std::thread::spawn(move || c.post(u).bearer_auth(ADMIN).send())
        };
        let late = [file("late.txt", b"published during the run".to_vec())];
        let late_job = during.then(|| {
            let start = std::time::Instant::now();
            while gc_status(&d)["current_run"]["state"] != "reaping" {
                assert!(start.elapsed() < Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(30));
            }
            let id = d.submit_id(ADMIN, "/sw/late", &tar_bytes(&late), None);
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(d.job(&id)["state"], "queued");
            id
        });
        let r = running.join().unwrap();
        assert!(
            r.as_ref().map_or(true, |r| !r.status().is_success()),
            "{point}: the run answered"
        );
        assert!(d.wait_exit(20), "{point}: the daemon did not stop there");
        drop(d);

        let d = Daemon::start(dir.path(), &[]);
        let s = gc_status(&d);
        let last = &s["last_run"];
        assert_eq!(last["state"], "aborted", "{point}: {s}");
        assert!(
            last["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("stopped while the run was {state}")),
            "{point}: {s}"
        );
        assert!(s["current_run"].is_null(), "{point}: {s}");
        assert_eq!(
            s["tombstones_pending"], 0,
            "{point}: tombstones not revoked: {s}"
        );
        let audit =
            std::fs::read_to_string(dir.path().join("spool/gc/audit.log")).unwrap_or_default();
        let deleted_before = audit.lines().count() as u64;
        assert_eq!(
            deleted_before,
            if point == "gc-delete#2" { 1 } else { 0 },
            "{point}: {audit}"
        );
        if let Some(id) = &late_job {
            let j = d.wait_terminal(id, 60);
            assert_eq!(j["state"], "published", "{j}");
            read_back(&d, &dir.path().join("cache-late"), "/sw/late", &late);
        }
        ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
        let kept = [file("bin/app", v(3))];
        read_back(&d, &dir.path().join("cache"), "/sw/app", &kept);

        // The next run starts over and completes.
        let o = ctl(&d, &["gc", "run", "--repo", REPO, "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["run"]["state"], "complete", "{point}: {r}");
        if soft == "0s" {
            // The late publish moved trunk-previous on: release 2 and the older catalogs and
            // histories became unreferenced too.
            let total = r["swept"]["deleted"].as_u64().unwrap() + deleted_before;
            if during {
                assert!(total > candidates, "{point}: {r}");
                assert!(!cas.exists(&object(&v(2))).unwrap());
            } else {
                assert_eq!(total, candidates, "{point}: {r}");
            }
            assert!(!cas.exists(&object(&v(1))).unwrap());
        } else {
            assert_eq!(
                r["tombstones"]["new"].as_u64().unwrap(),
                candidates,
                "{point}: {r}"
            );
            assert_eq!(r["swept"]["deleted"], 0);
            assert!(cas.exists(&object(&v(1))).unwrap());
        }
        assert!(during || cas.exists(&object(&v(2))).unwrap());
        assert!(cas.exists(&object(&v(3))).unwrap());
        read_back(&d, &dir.path().join("cache"), "/sw/app", &kept);
    }
}

#[test]
fn an_aborted_run_revokes_its_tombstones_and_keeps_older_ones() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s, soft_delete_period: 1h}",
    );
    let d = Daemon::start(
        dir.path(),
        &[("CVMFS_PREPUB_TEST_HOLD", "gc-tombstoned=1500")],
    );
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let put = |i: u8| {
        let id = ObjectId::new(Digest20::of(&[i; 8]), Suffix::None);
        cas.put_bytes(&id, &[i; 8]).unwrap();
        id
    };
    let first = put(1);
    let run = || {
        let (c, u) = (client(), format!("{}/api/v1/gc/{REPO}/run", d.url));
        std::thread::spawn(move || {
            c.post(u)
                .bearer_auth(ADMIN)
                .send()
                .unwrap()
                .json::<serde_json::Value>()
                .unwrap()
        })
    };
    let r1 = run().join().unwrap();
    assert_eq!(
        (
            r1["run"]["state"].as_str(),
            r1["tombstones"]["new"].as_u64()
        ),
        (Some("complete"), Some(1)),
        "{r1}"
    );
    let second = put(2);
    let pending = run();
    // Held in `tombstoned`: abort it.
    let start = std::time::Instant::now();
    loop {
        let s = gc_status(&d);
        if s["current_run"]["state"] == "tombstoned" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = ctl(&d, &["gc", "abort", "--repo", REPO]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("is being aborted"));
    let r2 = pending.join().unwrap();
    assert_eq!(r2["run"]["state"], "aborted", "{r2}");
    assert_eq!(r2["run"]["tombstoned"], 1, "{r2}");
    assert_eq!(r2["run"]["revoked"], 1, "{r2}");
    assert!(
        r2["run"]["reason"]
            .as_str()
            .unwrap()
            .contains("aborted by request while tombstoned"),
        "{r2}"
    );
    // The first run's tombstone stays, the aborted run's is gone; nothing was deleted.
    let t: serde_json::Value =
        serde_json::from_slice(&ctl(&d, &["gc", "tombstones", "--repo", REPO, "--json"]).stdout)
            .unwrap();
    let objs: Vec<&str> = t["tombstones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["object"].as_str().unwrap())
        .collect();
    assert_eq!(objs, vec![first.to_string().as_str()], "{t}");
    assert!(cas.exists(&first).unwrap() && cas.exists(&second).unwrap());
    let text =
        String::from_utf8_lossy(&ctl(&d, &["gc", "status", "--repo", REPO]).stdout).into_owned();
    assert!(
        text.contains(" aborted (api,") && text.contains(" complete (api,"),
        "{text}"
    );
    let m = d.metrics_text();
    assert!(
        m.contains(&format!(
            "cvmfs_prepub_gc_runs_total{{outcome=\"aborted\",repo=\"{REPO}\"}} 1"
        )),
        "{m}"
    );
    // Nothing in progress any more.
    let o = ctl(&d, &["gc", "abort", "--repo", REPO]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no garbage collection"));
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
}

#[test]
fn exempt_tags_keep_revisions_automatic_tags_would_not() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s, exempt_tags: ['prepub-*']}",
    );
    let d = Daemon::start(dir.path(), &[]);
    let v = |n: u8| format!("exempt release {n} ").repeat(40).into_bytes();
    for n in [1, 2, 3] {
        assert_eq!(
            publish(&d, "/sw/app", &[file("bin/app", v(n))], None)["state"],
            "published"
        );
    }
    let o = ctl(&d, &["gc", "run", "--repo", REPO, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let exempt = r["plan"]["kept"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["why"].as_str().unwrap().ends_with("(exempt)"))
        .count();
    // Release 1's revision is named only by its automatic tag, past auto_tag_timespan: the
    // exemption alone keeps it (the first test shows such a revision's objects go otherwise).
    assert!(exempt >= 1, "{r}");
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    for n in [1, 2, 3] {
        assert!(cas.exists(&object(&v(n))).unwrap(), "release {n} deleted");
    }
    let s = gc_status(&d);
    assert_eq!(s["exempt_tags"][0], "prepub-*", "{s}");
    read_back(
        &d,
        &dir.path().join("cache"),
        "/sw/app",
        &[file("bin/app", v(3))],
    );
}

#[test]
fn objects_of_an_aborted_job_go_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 5s, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(
        dir.path(),
        &[("CVMFS_PREPUB_TEST_HOLD", "commit-started=2500")],
    );
    let kept = [file("bin/app", b"kept release".repeat(30))];
    assert_eq!(publish(&d, "/sw/app", &kept, None)["state"], "published");
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    let id = aborted_job_objects_go_after_the_grace_period(&d, &cas);
    let audit = std::fs::read_to_string(dir.path().join("spool/gc/audit.log")).unwrap();
    assert!(audit.contains(&format!("deleted {id}")), "{audit}");
    read_back(&d, &dir.path().join("cache"), "/sw/app", &kept);
}

#[test]
fn a_dry_run_plans_exactly_what_the_real_run_then_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let gc = |dry: bool| {
        format!("{{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s, dry_run: {dry}}}")
    };
    gc_dir(dir.path(), &gc(true));
    let d = Daemon::start(dir.path(), &[]);
    let v = |n: u8| format!("planned release {n} ").repeat(40).into_bytes();
    for n in [1, 2, 3] {
        assert_eq!(
            publish(&d, "/sw/app", &[file("bin/app", v(n))], None)["state"],
            "published"
        );
    }
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    for i in 0..3u8 {
        cas.put_bytes(&ObjectId::new(Digest20::of(&[i; 5]), Suffix::None), &[i; 5])
            .unwrap();
    }
    let o = ctl(&d, &["gc", "run", "--repo", REPO, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dry: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(dry["run"]["state"], "complete");
    assert_eq!(dry["swept"]["deleted"], 0);
    let mut planned: Vec<String> = dry["plan"]["sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let count = dry["plan"]["candidate_count"].as_u64().unwrap();
    assert!(count >= 4 && count as usize == planned.len(), "{dry}");
    assert!(planned
        .iter()
        .all(|o| cas.exists(&ObjectId::parse(o).unwrap()).unwrap()));
    drop(d);

    // The same repository, not dry any more: the run deletes exactly the planned objects.
    let cfg = dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&gc(true), &gc(false));
    std::fs::write(&cfg, text).unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let o = ctl(&d, &["gc", "run", "--repo", REPO, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let real: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(real["swept"]["deleted"].as_u64(), Some(count), "{real}");
    let audit = std::fs::read_to_string(dir.path().join("spool/gc/audit.log")).unwrap();
    let mut deleted: Vec<String> = audit
        .lines()
        .map(|l| l.split_whitespace().nth(3).unwrap().to_string())
        .collect();
    deleted.sort();
    planned.sort();
    assert_eq!(deleted, planned);
    read_back(
        &d,
        &dir.path().join("cache"),
        "/sw/app",
        &[file("bin/app", v(3))],
    );
}

#[test]
fn a_collection_during_an_upload_cancels_its_early_processing_and_the_job_stays_whole() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(dir.path(), &[]);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    // An unreferenced object with the content of the upload's first file: processing the
    // upload finds it stored, then the collection deletes it.
    let shared = b"content already stored, but referenced by nothing ".repeat(40);
    let stored = object(&shared);
    cas.put_bytes(&stored, &zlib6(&shared)).unwrap();
    let marks: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(30_000, 300 + i)).collect();
    let mut specs = vec![file("up/shared.txt", shared.clone())];
    specs.push(file("up/m0", marks[0].clone()));
    specs.push(file("up/m1", marks[1].clone()));
    specs.push(file("up/m2", marks[2].clone()));
    specs.push(file("up/tail", pseudo_random(100_000, 399)));
    let tar = tar_bytes(&specs);
    let up = d.begin_upload("/sw/up", &tar, cut_after(&tar, &marks[2]));
    assert!(
        eventually(30, || marks.iter().all(|m| cas.exists(&object(m)).unwrap())),
        "the upload was not processed while it arrived\n{}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    let o = ctl(&d, &["gc", "run", "--repo", REPO]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !cas.exists(&stored).unwrap(),
        "the collection kept the object"
    );
    // Accepted after the collection: processed again, so the object it needs is stored again.
    let (status, body) = up.finish();
    assert_eq!(status, 202, "{body}");
    let j = d.wait_terminal(body["job_id"].as_str().unwrap(), 60);
    assert_eq!(j["state"], "published", "{j}");
    assert!(
        cas.exists(&stored).unwrap(),
        "the published file has no object"
    );
    // A repository check (read_back) verifies every referenced object exists and hashes right.
    read_back(&d, &dir.path().join("cache"), "/sw/up", &specs);
}

/// With `auto_tag_timespan: 0s` every publish drops the earlier automatic tags — but not the
/// marker of a job whose commit began and is not confirmed: job A's publish lands and the
/// daemon dies before journaling it; after the restart job B (ready before A, its first
/// commit refused by a held storage lock) publishes first. A's retried commit must still find
/// its marker and report the revision it already made, not publish a second one.
#[test]
fn a_publish_keeps_the_marker_of_an_unconfirmed_commit_so_it_is_not_committed_twice() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}",
    );
    let cfg = dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("retry_backoff: 200ms", "retry_backoff: 6s"),
    )
    .unwrap();
    let storage = dir.path().join("storage").join(REPO);
    let revision = || {
        let cas = prepub_core::cas::LocalCas::open(&storage).unwrap();
        prepub_core::repo::current_manifest(&cas)
            .unwrap()
            .unwrap()
            .0
            .revision
    };
    let initial = revision();

    let mut d = Daemon::start(
        dir.path(),
        &[("CVMFS_PREPUB_TEST_CRASH", "manifest-written")],
    );
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(storage.join(".cvmfs_prepub.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let tar = |name: &'static str| tar_bytes(&[file(name, name.repeat(50).into_bytes())]);
    let b = d.submit_id(ADMIN, "/sw/b", &tar("bin/b"), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while d.job(&b)["attempts"] != 2 {
        assert!(std::time::Instant::now() < deadline, "{}", d.job(&b));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.job(&b)["state"], "committing");
    drop(lock);
    // B retries in 6 s; A is committed before that, and the daemon dies once it is published.
    let a = d.submit_id(ADMIN, "/sw/a", &tar("bin/a"), None);
    assert!(d.wait_exit(30), "no crash:\n{}", d.log_text());
    drop(d);
    assert_eq!(revision(), initial + 1, "A's publish landed");

    let d = Daemon::start(dir.path(), &[]);
    let (jb, ja) = (d.wait_terminal(&b, 60), d.wait_terminal(&a, 60));
    assert_eq!(
        (&ja["state"], &jb["state"]),
        (&"published".into(), &"published".into())
    );
    assert_eq!(
        ja["revision"],
        initial + 1,
        "A recognised its own publish: {ja}"
    );
    assert_eq!(jb["revision"], initial + 2, "{jb}");
    assert_eq!(revision(), initial + 2, "no second commit of A");
    // A garbage-collected repository says so in its manifest (G=yes).
    let cas = prepub_core::cas::LocalCas::open(&storage).unwrap();
    let m = prepub_core::repo::current_manifest(&cas)
        .unwrap()
        .unwrap()
        .0;
    assert!(m.garbage_collectable);
}

/// Release `n` of `/sw/app` in the tests below.
fn release(n: u8) -> Vec<u8> {
    format!("release {n} of the app ").repeat(40).into_bytes()
}

/// A daemon (started with `env`, collecting at once) whose `/sw/app` had releases 1, 2 and 3:
/// release 1 is referenced by nothing kept (2 is trunk-previous, 3 current).
fn three_releases(dir: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
    gc_dir(
        dir,
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(dir, env);
    for n in [1, 2, 3] {
        let j = publish(&d, "/sw/app", &[file("bin/app", release(n))], None);
        assert_eq!(j["state"], "published", "{j}");
    }
    d
}

/// `POST /api/v1/gc/{repo}/run`: status and body.
fn api_run(d: &Daemon) -> (u16, String) {
    let r = client()
        .post(format!("{}/api/v1/gc/{REPO}/run", d.url))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// A job accepted with the change set processed while it uploaded goes on to its commit with
/// dedup decisions taken before; while the spool journals its acceptance it is in flight for
/// garbage collection already. Here it re-publishes an orphaned release's content (one stored
/// object, found by dedup) and a run is asked for in that window: refused, and the object
/// the job names survives.
#[test]
fn a_job_being_accepted_holds_off_a_run_that_would_delete_what_it_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    // The tar's fsync is held, so the processing wins and the job is accepted with its change
    // set; the acceptance is held long enough for a run to be asked for meanwhile.
    let d = three_releases(
        dir.path(),
        &[("CVMFS_PREPUB_TEST_HOLD", "tar-sync=6000,accepting=2500")],
    );
    let old = object(&release(1));
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    assert!(cas.exists(&old).unwrap());

    let again = [file("bin/app", release(1))];
    let (refusal, id) = std::thread::scope(|s| {
        let h = s.spawn(|| d.submit_id(ADMIN, "/sw/again", &tar_bytes(&again), None));
        std::thread::sleep(Duration::from_millis(1000));
        let refusal = api_run(&d);
        (refusal, h.join().unwrap())
    });
    assert_eq!(refusal.0, 409, "{}", refusal.1);
    assert!(refusal.1.contains("being accepted"), "{}", refusal.1);
    assert_eq!(d.wait_terminal(&id, 30)["state"], "published");
    assert!(
        cas.exists(&old).unwrap(),
        "the re-published object was deleted"
    );
    read_back(&d, &dir.path().join("cache"), "/sw/again", &again);
    // Idle again: a run goes ahead and keeps it.
    assert_eq!(api_run(&d).0, 200);
    assert!(cas.exists(&old).unwrap());
}

/// A run holds the local storage's publish lock from its plan to its last deletion, as every
/// writer does (`repo ingest` dedups against the store and commits under it): a run asked for
/// while another writer holds it is refused, and a writer starting during a run is refused.
#[test]
fn a_run_and_another_writer_of_the_storage_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let d = three_releases(
        dir.path(),
        &[("CVMFS_PREPUB_TEST_HOLD", "gc-scanning=3000")],
    );
    let objects = || {
        prepub_core::cas::LocalCas::open(&d.storage)
            .unwrap()
            .list()
            .unwrap()
            .len()
    };
    // Another writer holds the lock: refused, nothing deleted.
    let before = objects();
    let lock = prepub_core::repo::lock_storage(&d.storage).unwrap();
    let (status, body) = api_run(&d);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("another publish holds"), "{body}");
    assert_eq!(objects(), before);
    drop(lock);

    // During a run, a writer is refused.
    let tar = dir.path().join("ingest.tar");
    std::fs::write(&tar, tar_bytes(&[file("bin/other", release(9))])).unwrap();
    let ((status, body), ingest) = std::thread::scope(|s| {
        let h = s.spawn(|| api_run(&d));
        std::thread::sleep(Duration::from_millis(1500));
        let ingest = prepub(&[
            "repo",
            "ingest",
            tar.to_str().unwrap(),
            "--repo-dir",
            d.storage.to_str().unwrap(),
            "--keys-dir",
            dir.path().join("keys").to_str().unwrap(),
            "--path",
            "/sw/other",
        ]);
        (h.join().unwrap(), ingest)
    });
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"complete\""), "{body}");
    assert!(!ingest.0, "ingest ran during the run: {}", ingest.1);
    assert!(ingest.2.contains("another publish holds"), "{}", ingest.2);
    assert!(objects() < before, "the run deleted release 1");
    read_back(
        &d,
        &dir.path().join("cache"),
        "/sw/app",
        &[file("bin/app", release(3))],
    );
}

#[test]
fn a_run_whose_client_went_away_still_ends_and_releases_the_repository() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 0s, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(
        dir.path(),
        &[("CVMFS_PREPUB_TEST_HOLD", "gc-scanning=2000")],
    );
    let v = |n: u8| format!("release {n} of the app ").repeat(40).into_bytes();
    for n in [1, 2, 3] {
        assert_eq!(
            publish(&d, "/sw/app", &[file("bin/app", v(n))], None)["state"],
            "published"
        );
    }
    let addr = d.url.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /api/v1/gc/{REPO}/run HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    // The run goes on (held 2 s in scanning) and ends by itself.
    let status = || -> serde_json::Value {
        client()
            .get(format!("{}/api/v1/gc/{REPO}/status", d.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while status()["running"] != false {
        assert!(std::time::Instant::now() < deadline, "{}", status());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status()["last_run"]["state"], "complete", "{}", status());
    let o = ctl(&d, &["gc", "run", "--repo", REPO, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = publish(&d, "/sw/after", &[file("bin/after", v(7))], None);
    assert_eq!(j["state"], "published", "{j}");
}

/// Temporary files that writes cut off by a stopped process left in the storage go with a run
/// once they are older than the grace period; younger ones (a write that may still be going
/// on) and the objects stay.
#[test]
fn a_run_removes_leftovers_of_interrupted_writes_older_than_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    gc_dir(
        dir.path(),
        "{enabled: true, keep_revisions: 1, grace_period: 1h, auto_tag_timespan: 0s}",
    );
    let d = Daemon::start(dir.path(), &[]);
    let kept = [file("bin/app", release(1))];
    assert_eq!(publish(&d, "/sw/app", &kept, None)["state"], "published");
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    let leftover = |path: std::path::PathBuf, len: usize, old: bool| {
        std::fs::write(&path, vec![7u8; len]).unwrap();
        if old {
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(two_hours_ago).unwrap();
        }
        path
    };
    let data = d.storage.join("data");
    let old = [
        leftover(data.join("3f/.tmp.4242.17"), 1000, true),
        leftover(data.join("txn/.tmp.4242.18"), 200, true),
        leftover(d.storage.join(".tmp.4242.19"), 30, true),
    ];
    let young = leftover(data.join("3f/.tmp.4242.20"), 50, false);
    let (status, body) = api_run(&d);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let run = &v["run"];
    assert_eq!(run["leftovers_removed"], 3, "{run}");
    assert_eq!(run["deleted"], 0, "{run}");
    assert_eq!(run["bytes_reclaimed"], 1230, "{run}");
    for p in &old {
        assert!(!p.exists(), "{} kept", p.display());
    }
    assert!(young.exists(), "a young temporary file was removed");
    read_back(&d, &dir.path().join("cache"), "/sw/app", &kept);
}
