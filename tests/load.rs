//! Load: many clients poll job status and submit small jobs while a large publish runs, on
//! loopback, bounded in count. Asserted: no request fails, every job publishes, the daemon's
//! peak RSS stays bounded. Printed (not asserted — timings are for benchmarks): requests made,
//! status-poll latency p50/p99/max, and peak RSS. `PREPUB_LOAD_SCALE=<n>` multiplies the work.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn status_polls_and_small_jobs_while_a_large_publish_runs() {
    let scale: usize = std::env::var("PREPUB_LOAD_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let big = vec![Spec::File {
        path: "big.bin",
        mode: 0o644,
        data: pseudo_random(48 << 20, 77),
        xattrs: vec![],
    }];
    let big_id = d.submit_id(ADMIN, "/sw/big", &tar_bytes(&big), None);
    drop(big);

    let done = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let small_ids = Arc::new(Mutex::new(Vec::<String>::new()));
    let url = d.url.clone();
    let mut threads = Vec::new();
    // Pollers: job views and job lists, as CI pipelines and dashboards do.
    for p in 0..8 {
        let (done, requests, errors, latencies, url, big_id) = (
            done.clone(),
            requests.clone(),
            errors.clone(),
            latencies.clone(),
            url.clone(),
            big_id.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let c = client();
            let mut i = 0usize;
            while !done.load(Ordering::SeqCst) {
                let u = if (i + p).is_multiple_of(4) {
                    format!("{url}/api/v1/jobs?limit=50")
                } else {
                    format!("{url}/api/v1/jobs/{big_id}")
                };
                let t = Instant::now();
                match c.get(&u).bearer_auth(ADMIN).send() {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes();
                        latencies.lock().unwrap().push(t.elapsed());
                    }
                    Ok(r) => errors.lock().unwrap().push(format!("{u}: {}", r.status())),
                    Err(e) => errors.lock().unwrap().push(format!("{u}: {e}")),
                }
                requests.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    // Submitters: small jobs to their own paths.
    for s in 0..4 {
        let (requests, errors, url, small_ids) = (
            requests.clone(),
            errors.clone(),
            url.clone(),
            small_ids.clone(),
        );
        threads.push(std::thread::spawn(move || {
            for k in 0..(10 * scale) {
                let tar = tar_bytes(&[Spec::File {
                    path: "f.txt",
                    mode: 0o644,
                    data: format!("submitter {s} job {k}\n").into_bytes(),
                    xattrs: vec![],
                }]);
                let r = client()
                    .post(format!("{url}/api/v1/jobs"))
                    .bearer_auth(ADMIN)
                    .header("X-Cvmfs-Repo", REPO)
                    .header("X-Cvmfs-Path", format!("/small/s{s}/k{k}"))
                    .body(tar)
                    .send();
                requests.fetch_add(1, Ordering::SeqCst);
                match r {
                    Ok(r) if r.status() == 202 => {
                        let v: serde_json::Value = r.json().unwrap();
                        small_ids
                            .lock()
                            .unwrap()
                            .push(v["job_id"].as_str().unwrap().to_string());
                    }
                    Ok(r) => errors
                        .lock()
                        .unwrap()
                        .push(format!("submit: {}", r.status())),
                    Err(e) => errors.lock().unwrap().push(format!("submit: {e}")),
                }
            }
        }));
    }
    let start = Instant::now();
    let big_job = d.wait_terminal(&big_id, 600);
    let ids: Vec<String> = {
        // Let the submitters finish, then wait for their jobs.
        while small_ids.lock().unwrap().len() + errors.lock().unwrap().len() < 40 * scale
            && start.elapsed() < Duration::from_secs(300)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        small_ids.lock().unwrap().clone()
    };
    for id in &ids {
        let j = d.wait_terminal(id, 300);
        assert_eq!(j["state"], "published", "{j}");
    }
    done.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(big_job["state"], "published", "{big_job}");
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} failed requests: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert_eq!(ids.len(), 40 * scale);
    let rss_mib = peak_rss_kib(d.child.id()) / 1024;
    // A 48 MiB file streams through; nothing may hold it (or the uploads) in memory.
    assert!(rss_mib < 400, "peak RSS {rss_mib} MiB");
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort();
    let q = |f: f64| lat[((lat.len() as f64 - 1.0) * f) as usize];
    println!(
        "load: {} requests in {:.1} s ({} status polls, {} small jobs published during a 48 MiB publish), 0 errors; status latency p50 {:?}, p99 {:?}, max {:?}; daemon peak RSS {} MiB",
        requests.load(Ordering::SeqCst),
        elapsed.as_secs_f64(),
        lat.len(),
        ids.len(),
        q(0.5),
        q(0.99),
        lat.last().unwrap(),
        rss_mib
    );
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
}
