//! The publisher's metrics as an operator scrapes them: every metric of the install guide's
//! §12.5 table (and the job-phase, queue, recovery and process metrics) moves when the daemon
//! works, per-path labels come from the job path, the scrape passes `promtool check metrics`
//! (Debian package `prometheus`, installed by `.ci/run`), and every metric the shipped Grafana
//! dashboard queries exists.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn scrape(d: &Daemon) -> String {
    d.metrics_text()
}

/// The value of the sample whose name-and-labels is exactly `series`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .unwrap_or_else(|| panic!("{series} not in the scrape:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn tree(tag: &str) -> Vec<Spec> {
    vec![
        Spec::Dir("lib", 0o755),
        Spec::File {
            path: "lib/common.so",
            mode: 0o644,
            data: pseudo_random(200_000, 7),
            xattrs: vec![],
        },
        Spec::File {
            path: "lib/own.txt",
            mode: 0o644,
            data: format!("only in {tag}").into_bytes(),
            xattrs: vec![],
        },
    ]
}

fn submit(d: &Daemon, path: &str, tar: &[u8]) -> String {
    let r = d.submit_raw(ADMIN, path, tar, None);
    assert_eq!(r.status(), 202);
    r.json::<serde_json::Value>().unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn every_metric_moves_and_the_scrape_passes_promtool() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    // A job interrupted by SIGTERM is recovered by the next start.
    let mut d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=3000")]);
    let held = submit(&d, "/sw/held", &tar_bytes(&tree("held")));
    d.wait_state(&held, "processing", 30);
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert!(d.wait_exit(40));
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    assert_eq!(d.wait_terminal(&held, 60)["state"], "published");

    let a = submit(&d, "/sw/lcg/1.0", &tar_bytes(&tree("a")));
    assert_eq!(d.wait_terminal(&a, 60)["state"], "published");
    // The same library again elsewhere: deduplicated.
    let b = submit(&d, "/sw/atlas/2.0", &tar_bytes(&tree("b")));
    assert_eq!(d.wait_terminal(&b, 60)["state"], "published");
    // A malformed tar: a permanent failure.
    let bad = submit(&d, "/sw/bad", b"not a tar at all, just words");
    assert_eq!(d.wait_terminal(&bad, 60)["state"], "failed");

    let m = scrape(&d);
    let p = |name: &str, path: &str| value(&m, &format!("cvmfs_prepub_{name}{{path=\"{path}\"}}"));
    // Install guide §12.5, per path.
    assert_eq!(p("jobs_submitted_total", "/sw/lcg/1.0"), 1.0);
    assert_eq!(p("jobs_submitted_total", "/sw/atlas/2.0"), 1.0);
    assert_eq!(p("jobs_published_total", "/sw/lcg/1.0"), 1.0);
    assert!(p("pipeline_objects_new_total", "/sw/lcg/1.0") >= 1.0);
    assert!(
        p("pipeline_dedup_hits_total", "/sw/atlas/2.0") >= 1.0,
        "{m}"
    );
    assert!(p("pipeline_bytes_total", "/sw/atlas/2.0") >= 200_000.0);
    assert!(value(&m, "cvmfs_prepub_cas_upload_duration_seconds_count") >= 3.0);
    assert!(value(&m, "cvmfs_prepub_commit_duration_seconds_count") >= 3.0);
    assert_eq!(value(&m, "cvmfs_prepub_jobs_recovered_total"), 1.0);
    assert_eq!(
        value(
            &m,
            "cvmfs_prepub_job_failures_by_class_total{class=\"permanent\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&m, "cvmfs_prepub_jobs_in_state{state=\"published\"}"),
        3.0
    );
    assert_eq!(
        value(&m, "cvmfs_prepub_jobs_in_state{state=\"failed\"}"),
        1.0
    );
    // Phases, queues, process.
    for phase in ["queued", "processing", "uploading", "committing"] {
        assert!(
            value(
                &m,
                &format!("cvmfs_prepub_job_phase_duration_seconds_count{{phase=\"{phase}\"}}")
            ) >= 2.0,
            "{phase}"
        );
    }
    assert_eq!(
        value(&m, "cvmfs_prepub_queue_depth{queue=\"processing\"}"),
        0.0
    );
    assert_eq!(value(&m, "cvmfs_prepub_queue_depth{queue=\"commit\"}"), 0.0);
    assert!(value(&m, "process_resident_memory_bytes") > 1e6);
    assert!(value(&m, "process_open_fds") > 3.0);

    // The exposition passes promtool's checks.
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric the shipped dashboard queries is exported.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config/grafana/cvmfs-prepub-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let exported: std::collections::HashSet<&str> = m
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let registered = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("actors/src/metrics.rs"),
    )
    .unwrap();
    // REFERENCE.md documents every exported metric.
    let reference = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("REFERENCE.md"),
    )
    .unwrap();
    for name in &exported {
        let short = name.trim_start_matches("cvmfs_prepub_");
        assert!(
            reference.contains(&format!("`{short}`"))
                || reference.contains(&format!("`{name}`"))
                || reference.contains(&format!("`{short},"))
                || reference.contains(&format!(" {short}`")),
            "{name} is not in REFERENCE.md"
        );
    }
    let mut queried = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !(word.starts_with("cvmfs_prepub_") || word.starts_with("process_")) {
                    continue;
                }
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                // Labelled families without samples yet (no Stratum 1, no MQTT here) are not
                // in the scrape; they must then be registered by the metrics module.
                assert!(
                    exported.contains(base)
                        || registered
                            .contains(&format!("\"{}\"", base.trim_start_matches("cvmfs_prepub_")))
                        || registered.contains(&format!("\"{base}\"")),
                    "dashboard queries {word}, which is neither exported nor registered"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 14, "{queried}");
}

#[test]
fn queue_depth_counts_jobs_waiting_for_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    // Commits of one repository run one at a time; each is held for 1 s, so the others wait.
    let d = Daemon::start(
        dir.path(),
        &[("CVMFS_PREPUB_TEST_HOLD", "commit-started=1000")],
    );
    let ids: Vec<String> = (0..3)
        .map(|i| {
            submit(
                &d,
                &format!("/sw/q{i}"),
                &tar_bytes(&tree(&format!("q{i}"))),
            )
        })
        .collect();
    let start = Instant::now();
    let mut seen = 0.0f64;
    while start.elapsed() < Duration::from_secs(3) {
        seen = seen.max(value(
            &scrape(&d),
            "cvmfs_prepub_queue_depth{queue=\"commit\"}",
        ));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen >= 2.0,
        "at most {seen} jobs were seen in the commit queue"
    );
    for id in &ids {
        assert_eq!(d.wait_terminal(id, 60)["state"], "published");
    }
    assert_eq!(
        value(&scrape(&d), "cvmfs_prepub_queue_depth{queue=\"commit\"}"),
        0.0
    );
}
