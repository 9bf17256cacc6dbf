//! The shipped bits-console pipeline (`.gitlab/cvmfs-prepub-publish.yml`, install guide §11–§12):
//! its packaging, submission and polling steps run in bash exactly as written, against a
//! running daemon — several communities at once to their own paths (per-path metrics), a
//! refused submission, and a job that is aborted while the pipeline polls.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Script steps 4–6 of the job (package, submit, poll), joined as GitLab runs them: one bash
/// shell with `set -eo pipefail`.
fn pipeline_steps() -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".gitlab/cvmfs-prepub-publish.yml"),
    )
    .unwrap();
    let y: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let script = y["compile_and_publish"]["script"].as_sequence().unwrap();
    let steps: Vec<&str> = script
        .iter()
        .map(|s| s.as_str().unwrap())
        .filter(|s| s.contains("tar -czf") || s.contains("/api/v1/jobs"))
        .collect();
    assert_eq!(steps.len(), 3, "package, submit, poll: {steps:?}");
    format!("set -eo pipefail\n{}", steps.join("\n"))
}

fn run_pipeline(d: &Daemon, token: &str, publish_path: &str, output: &Path) -> Output {
    let tarball = output.with_extension("tar.gz");
    Command::new("bash")
        .arg("-c")
        .arg(pipeline_steps())
        .env("PREPUB_URL", &d.url)
        .env("PREPUB_API_TOKEN", token)
        .env("PUBLISH_PATH", publish_path)
        .env("BITS_OUTPUT", output)
        .env("BUILD_TAR", &tarball)
        .env("POLL_INTERVAL", "0.3")
        .env("POLL_ATTEMPTS", "200")
        .output()
        .unwrap()
}

fn build_output(dir: &Path, community: &str) -> std::path::PathBuf {
    let out = dir.join(format!("bits-output-{community}"));
    std::fs::create_dir_all(out.join("bin")).unwrap();
    std::fs::create_dir_all(out.join("lib")).unwrap();
    std::fs::write(
        out.join("bin/app"),
        format!("#!/bin/sh\necho {community}\n"),
    )
    .unwrap();
    std::fs::write(
        out.join("lib/shared.so"),
        b"shared by all communities".repeat(100),
    )
    .unwrap();
    out
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn communities_publish_concurrently_through_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let communities = ["lcg", "atlas", "user/alice"];
    let outs: Vec<(String, Output)> = std::thread::scope(|s| {
        let hs: Vec<_> = communities
            .iter()
            .map(|c| {
                let d = &d;
                let out = build_output(dir.path(), &c.replace('/', "-"));
                s.spawn(move || {
                    let path = format!("/cvmfs/{REPO}/sw/{c}/1.0");
                    (c.to_string(), run_pipeline(d, ADMIN, &path, &out))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let metrics = d.metrics_text();
    for (c, o) in &outs {
        let log = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{c}: {log}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(log.contains("Submitted cvmfs-prepub job: "), "{log}");
        assert!(log.contains("state: published"), "{log}");
        let path = format!("/sw/{c}/1.0");
        assert_eq!(
            metric(
                &metrics,
                &format!("cvmfs_prepub_jobs_submitted_total{{path=\"{path}\"}}")
            ),
            1.0,
            "{metrics}"
        );
        assert_eq!(
            metric(
                &metrics,
                &format!("cvmfs_prepub_jobs_published_total{{path=\"{path}\"}}")
            ),
            1.0,
            "{metrics}"
        );
    }
    // Every community's files are in the published revision.
    for c in communities {
        let ls = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
            .args([
                "repo",
                "ls",
                "--repo-dir",
                d.storage.to_str().unwrap(),
                &format!("/sw/{c}/1.0/bin"),
            ])
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&ls.stdout);
        assert!(
            ls.status.success() && listing.contains("app"),
            "{c}: {listing}\n{}",
            String::from_utf8_lossy(&ls.stderr)
        );
    }
}

#[test]
fn a_refused_submission_and_an_aborted_job_fail_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=4000")]);
    let out = build_output(dir.path(), "x");
    // An unknown repository: the submission is refused and the pipeline stops there.
    let o = run_pipeline(&d, ADMIN, "/cvmfs/unknown.example.org/sw/x", &out);
    assert_ne!(o.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Submitted"));
    // Aborted while the pipeline polls: exit 1 with the reason.
    let o = std::thread::scope(|s| {
        let h = s.spawn(|| run_pipeline(&d, ADMIN, &format!("/cvmfs/{REPO}/sw/abort-me"), &out));
        let id = loop {
            let all: serde_json::Value = d.jobs();
            if let Some(id) = all["jobs"][0]["job_id"].as_str() {
                break id.to_string();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let r = client()
            .post(format!("{}/api/v1/jobs/{id}/abort", d.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap();
        assert!(r.status().is_success());
        h.join().unwrap()
    });
    let log = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("state: aborted") && log.contains("Job aborted:"),
        "{log}"
    );
}
