//! `prepubctl` as an operator uses it, against a running daemon: submit with --wait, show, jobs,
//! status, health, drain / drain --wait / resume (503 while draining), exit codes, shell
//! completions and the man page; SIGTERM and the documented zero-downtime upgrade (drain, stop,
//! start, verify).

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn ctl(d: &Daemon, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prepubctl"))
        .args(args)
        .env("PREPUB_URL", &d.url)
        .env("PREPUB_API_TOKEN", token)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `prepubctl submit TAR --repo REPO --path PATH [extra...]` with the admin token.
fn submit(d: &Daemon, tar: &std::path::Path, path: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "submit",
        tar.to_str().unwrap(),
        "--repo",
        REPO,
        "--path",
        path,
    ];
    args.extend_from_slice(extra);
    ctl(d, ADMIN, &args)
}

fn small_tar(dir: &std::path::Path, name: &str, tag: &str) -> std::path::PathBuf {
    let specs = vec![
        Spec::Dir("bin", 0o755),
        Spec::File {
            path: "bin/tool",
            mode: 0o755,
            data: format!("#!/bin/sh\necho {tag}\n").into_bytes(),
            xattrs: vec![],
        },
    ];
    let p = dir.join(name);
    std::fs::write(&p, tar_bytes(&specs)).unwrap();
    p
}

#[test]
fn submit_wait_show_jobs_status_health() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let tar = small_tar(dir.path(), "a.tar", "one");
    let o = submit(&d, &tar, "/sw/one", &["--tag", "one-1.0", "--wait"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let id = out.lines().next().unwrap().trim().to_string();
    assert_eq!(id.len(), 36, "{out}");
    // The live states came from the event stream.
    assert!(err.contains(&format!("{id}: published")), "{err}");
    assert!(
        out.contains("published") && out.contains("tag one-1.0"),
        "{out}"
    );

    let o = ctl(&d, ADMIN, &["show", &id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "published");
    assert_eq!(v["path"], "/sw/one");

    let o = ctl(&d, ADMIN, &["jobs", "--state", "published", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["job_id"], id.as_str());
    let o = ctl(&d, ADMIN, &["jobs", "--state", "failed", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.as_array().unwrap().is_empty());

    let o = ctl(&d, ADMIN, &["status"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0));
    assert!(out.contains("accepting jobs"), "{out}");
    assert!(out.contains("jobs: published 1"), "{out}");
    assert!(out.contains("no active jobs"), "{out}");
    for actor in [
        "JobManager",
        "CasWriter",
        "CompressorPool",
        "SpoolJournal",
        "Publisher",
    ] {
        assert!(out.contains(actor), "{actor} missing in:\n{out}");
    }
    let o = ctl(&d, ADMIN, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["draining"], false);
    assert_eq!(v["actors"][2]["name"], "CompressorPool");
    assert_eq!(v["actors"][2]["instances"], 2);

    let o = ctl(&d, ADMIN, &["health"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.starts_with("ok (version "), "{out}");
}

#[test]
fn exit_codes_completions_and_man_page() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    // A refused request: 3, with the server's message.
    let o = ctl(&d, "wrong-token", &["status"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    let o = ctl(&d, ADMIN, &["show", "no-such-job"]);
    assert_eq!(o.status.code(), Some(3));
    // Nothing listening: 4.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = Command::new(env!("CARGO_BIN_EXE_prepubctl"))
        .args(["--url", &format!("http://127.0.0.1:{port}"), "health"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o).1);
    // Usage: 2.
    assert_eq!(ctl(&d, ADMIN, &["abort"]).status.code(), Some(2));
    assert_eq!(ctl(&d, ADMIN, &["frobnicate"]).status.code(), Some(2));
    // A job that ends failed: 1.
    let bad = dir.path().join("bad.tar");
    std::fs::write(&bad, b"this is not a tar archive at all").unwrap();
    let o = submit(&d, &bad, "/sw/bad", &["--wait"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(err.contains("ended failed"), "{err}");
    // Completions and the man page come from the same command definition.
    let o = ctl(&d, ADMIN, &["completions", "bash"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        out.contains("_prepubctl()") && out.contains("drain"),
        "{out}"
    );
    let o = ctl(&d, ADMIN, &["man"]);
    let (out, _) = text(&o);
    assert!(
        out.contains(".TH prepubctl") && out.contains("Exit status"),
        "{out}"
    );
    // The token never appears in help output.
    let o = ctl(&d, ADMIN, &["--help"]);
    assert!(!text(&o).0.contains(ADMIN));
}

#[test]
fn drain_refuses_new_jobs_lets_accepted_ones_finish_and_resume_reopens() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    // Processing is held for 3 s, so the job is in flight when the drain starts.
    let d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=3000")]);
    let slow = small_tar(dir.path(), "slow.tar", "slow");
    let o = submit(&d, &slow, "/sw/slow", &[]);
    assert_eq!(o.status.code(), Some(0));
    let id = text(&o).0.trim().to_string();

    // A scoped token may not drain.
    assert_eq!(ctl(&d, SCOPED, &["drain"]).status.code(), Some(3));
    let o = ctl(&d, ADMIN, &["drain"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("1 active"), "{err}");
    // New jobs get 503 with a clear message, through prepubctl and plain HTTP.
    let other = small_tar(dir.path(), "other.tar", "other");
    let o = submit(&d, &other, "/sw/other", &[]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("HTTP 503") && err.contains("draining"),
        "{err}"
    );
    let r = d.submit_raw(ADMIN, "/sw/other", &std::fs::read(&other).unwrap(), None);
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "60");
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "draining");
    let o = ctl(&d, ADMIN, &["status"]);
    assert!(text(&o).0.contains("DRAINING"), "{}", text(&o).0);
    // Health stays ok while draining, and says so.
    let h: serde_json::Value = client()
        .get(format!("{}/api/v1/health", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        (h["status"].as_str(), h["draining"].as_bool()),
        (Some("ok"), Some(true))
    );
    // drain --wait returns once the accepted job has finished.
    let t = Instant::now();
    let o = ctl(&d, ADMIN, &["drain", "--wait", "--timeout", "60"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("idle"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60));
    assert_eq!(d.job(&id)["state"], "published");
    // Nothing was accepted while draining.
    let all: serde_json::Value = d.jobs();
    assert_eq!(all["total"], 1, "{all}");
    // resume reopens.
    let o = ctl(&d, ADMIN, &["resume"]);
    assert_eq!(o.status.code(), Some(0));
    let o = submit(&d, &other, "/sw/other", &["--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
}

#[test]
fn drain_wait_times_out_with_its_own_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=5000")]);
    let slow = small_tar(dir.path(), "slow.tar", "slow");
    submit(&d, &slow, "/sw/s", &[]);
    let o = ctl(&d, ADMIN, &["drain", "--wait", "--timeout", "1"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("1 jobs still active"), "{err}");
}

/// SIGTERM to the daemon, by PID.
fn terminate(d: &mut Daemon) -> Option<i32> {
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(40) {
        if let Ok(Some(st)) = d.child.try_wait() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn revision(storage: &std::path::Path) -> u64 {
    let cas = prepub_core::cas::LocalCas::open(storage).unwrap();
    prepub_core::repo::current_manifest(&cas)
        .unwrap()
        .unwrap()
        .0
        .revision
}

#[test]
fn sigterm_mid_job_then_restart_publishes_it_once() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let mut d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=3000")]);
    let before = revision(&d.storage);
    let tar = small_tar(dir.path(), "t.tar", "term");
    let o = submit(&d, &tar, "/sw/t", &[]);
    let id = text(&o).0.trim().to_string();
    d.wait_state(&id, "processing", 30);
    assert_eq!(terminate(&mut d), Some(0), "{}", d.log_text());
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    let j = d.wait_terminal(&id, 60);
    assert_eq!(j["state"], "published", "{j}");
    assert_eq!(revision(&d.storage), before + 1);
}

#[test]
fn zero_downtime_upgrade_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let mut d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=1500")]);
    let tar = small_tar(dir.path(), "u.tar", "upgrade");
    let o = submit(&d, &tar, "/sw/u", &[]);
    let id = text(&o).0.trim().to_string();
    // 1. drain --wait
    let o = ctl(&d, ADMIN, &["drain", "--wait", "--timeout", "60"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    assert_eq!(d.job(&id)["state"], "published");
    // 2./3. replace the binary and restart (the same build stands in for the new one).
    assert_eq!(terminate(&mut d), Some(0));
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    // 4. verify: healthy, accepting, history kept.
    let o = ctl(&d, ADMIN, &["health"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).0);
    let o = ctl(&d, ADMIN, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["draining"], false);
    assert_eq!(v["jobs"]["published"], 1);
    let o = submit(&d, &tar, "/sw/u2", &["--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
}

#[test]
fn a_spool_from_a_newer_version_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    std::fs::create_dir_all(dir.path().join("spool")).unwrap();
    std::fs::write(dir.path().join("spool/FORMAT"), "7\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args(["--config", dir.path().join("config.yaml").to_str().unwrap()])
        .env("PREPUB_API_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has format 7, newer than this binary's 3"),
        "{err}"
    );
}

#[test]
fn systemctl_reload_rereads_the_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("env");
    std::fs::write(
        &tf,
        "CVMFS_GATEWAY_SECRET=unused\nPREPUB_API_TOKEN=first-token\n",
    )
    .unwrap();
    prepare_daemon_dir(
        dir.path(),
        "",
        &format!("  api_token_file: {}\n", tf.display()),
    );
    let d = Daemon::start(dir.path(), &[]);
    // The file wins over the environment's token.
    assert_eq!(ctl(&d, ADMIN, &["status"]).status.code(), Some(3));
    assert_eq!(ctl(&d, "first-token", &["status"]).status.code(), Some(0));
    std::fs::write(&tf, "PREPUB_API_TOKEN=second-token\n").unwrap();
    // ExecReload=/bin/kill -HUP $MAINPID
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    let start = Instant::now();
    while ctl(&d, "second-token", &["status"]).status.code() != Some(0) {
        assert!(start.elapsed() < Duration::from_secs(10), "not reloaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ctl(&d, "first-token", &["status"]).status.code(), Some(3));
    assert!(d.log_text().contains("admin token reloaded"));
    assert!(!d.log_text().contains("second-token"));
    // A broken file keeps the old token.
    std::fs::write(&tf, "nothing useful\nhere\n").unwrap();
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ctl(&d, "second-token", &["status"]).status.code(), Some(0));
}
