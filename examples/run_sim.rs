//! `make run-sim`: an in-process cluster simulation. One process runs the gateway double and the
//! publisher (gateway mode) on loopback; simulated communities submit concurrent jobs to sibling
//! paths of one repository while the gateway injects errors, latency and a lagging manifest.
//! Stratum 1 receivers (child processes of the same binary in receiver mode; one slow, one
//! partitioned for a while) are pre-warmed before each commit with a 0.66 quorum.
//! At the end it checks: every job reached `published` or `failed` with a reason; the repository,
//! read by the independent `cvmfs` reader, holds exactly the published trees (no update lost, no
//! failed job visible); `repo check` passes. It prints a summary and exits non-zero on any
//! violation. Flags: --jobs N --communities N --error-rate P --drop-rate P --latency D
//! --manifest-lag D --receivers N.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cvmfs_prepub::config::{FileConfig, Overrides};

const REPO: &str = "sim.example.org";
const TOKEN: &str = "sim-admin-token";
const SECRET: &str = "sim-gateway-secret";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves a directory over HTTP for the reader (with the snapshot files it asks for).
fn serve(root: PathBuf) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let root = root.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let rel = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_string();
                let body = if rel == ".cvmfs_last_snapshot" || rel == ".cvmfs_is_snapshotting" {
                    Some(Vec::new())
                } else if rel.contains("..") {
                    None
                } else {
                    std::fs::read(root.join(&rel)).ok()
                };
                let _ = match body {
                    Some(b) => s
                        .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len()).as_bytes())
                        .and_then(|_| s.write_all(&b)),
                    None => s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                };
                let mut sink = Vec::new();
                let _ = r.read_to_end(&mut sink);
            });
        }
    });
    url
}

/// The files of job `j` of community `c`.
fn files(c: usize, j: usize) -> Vec<(String, Vec<u8>)> {
    (0..4)
        .map(|k| {
            let body: Vec<u8> = (0..(1000 + k * 3000 + j * 17))
                .map(|i| ((i * (k + 3) + c * 7 + j) % 251) as u8)
                .collect();
            (format!("lib/file{k}.dat"), body)
        })
        .chain([(
            String::from("VERSION"),
            format!("community {c} job {j}\n").into_bytes(),
        )])
        .collect()
}

fn tar_of(fs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, d) in fs {
        let mut h = tar::Header::new_gnu();
        h.set_path(p).unwrap();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_cksum();
        b.append(&h, &d[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn main() {
    let jobs: usize = arg("--jobs", "12").parse().unwrap();
    let communities: usize = arg("--communities", "3").parse().unwrap();
    let error_rate: f64 = arg("--error-rate", "0.1").parse().unwrap();
    let latency = arg("--latency", "20ms");
    let lag = arg("--manifest-lag", "1s");
    let drop_rate: f64 = arg("--drop-rate", "0.05").parse().unwrap();
    let receivers: usize = arg("--receivers", "3").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage").join(REPO);
    let keys_dir = dir.path().join("keys");

    // The repository and its keys.
    let keys = prepub_core::keys::RepoKeys::generate(REPO, 30).unwrap();
    keys.save(&keys_dir).unwrap();
    let cas = prepub_core::cas::LocalCas::create(&storage).unwrap();
    prepub_core::repo::init(&cas, &keys, 0, 0, prepub_core::timefmt::now()).unwrap();

    // The gateway double, in this process.
    let gw_port = free_port();
    let gw_cfg = cvmfs_prepub::gateway_double::DoubleConfig {
        repo: REPO.into(),
        storage: storage.clone(),
        keys_dir: keys_dir.clone(),
        keys: [("sim-key".to_string(), (SECRET.to_string(), "/".to_string()))]
            .into_iter()
            .collect(),
        max_lease_time: Duration::from_secs(60),
        error_rate,
        latency: cvmfs_prepub::units::parse_duration(&latency).unwrap(),
        manifest_lag: cvmfs_prepub::units::parse_duration(&lag).unwrap(),
        force_path_busy: 2,
        drop_rate,
        s3: None,
    };
    std::thread::spawn(move || {
        cvmfs_prepub::gateway_double::run(gw_cfg, format!("127.0.0.1:{gw_port}").parse().unwrap())
    });

    // Stratum 1 receivers (the same binary in receiver mode, as child processes): one is slow,
    // one is partitioned away for a while during the run.
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("cvmfs-prepub"))
        .unwrap();
    assert!(
        bin.is_file(),
        "build the binary first (make run-sim does): {}",
        bin.display()
    );
    let start_receiver = |i: usize, port: u16, slow: bool| -> std::process::Child {
        let root = dir.path().join(format!("s1-{i}"));
        std::fs::create_dir_all(&root).unwrap();
        let cfg = root.join("receiver.yaml");
        std::fs::write(
            &cfg,
            format!(
                "mode: receiver\ncas:\n  root: {}\nrepositories:\n  - name: {REPO}\n",
                root.join("cas").display()
            ),
        )
        .unwrap();
        let mut c = std::process::Command::new(&bin);
        c.args([
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("PREPUB_RECEIVER_SECRET", "sim-receiver-secret")
        .stderr(std::process::Stdio::null());
        if slow {
            c.env("CVMFS_PREPUB_TEST_HOLD", "receiver-put=30");
        }
        c.spawn().unwrap()
    };
    let r_ports: Vec<u16> = (0..receivers).map(|_| free_port()).collect();
    let mut r_children = Receivers(
        r_ports
            .iter()
            .enumerate()
            .map(|(i, p)| start_receiver(i, *p, i == 1))
            .collect(),
    );
    for p in &r_ports {
        for _ in 0..200 {
            if reqwest::blocking::get(format!("http://127.0.0.1:{p}/api/v1/health")).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let endpoints: Vec<String> = r_ports
        .iter()
        .map(|p| format!("\"http://127.0.0.1:{p}\""))
        .collect();
    let distribution = if receivers == 0 {
        String::new()
    } else {
        format!(
            "distribution:\n  stratum1_endpoints: [{}]\n  quorum: 0.66\n  commit_anyway: true\n  timeout: 20s\n  per_s1_concurrency: 4\n  secret_env: SIM_RECEIVER_SECRET\n",
            endpoints.join(", ")
        )
    };

    // The publisher, in this process, in gateway mode.
    let port = free_port();
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:{port}\"\n  spool_root: {spool}\n  publish_mode: gateway\n  log_format: text\ncas:\n  root: {root}\npipeline:\n  workers: 2\n  max_attempts: 8\n  retry_backoff: 200ms\nrepositories:\n  - name: {REPO}\ngateway:\n  url: http://127.0.0.1:{gw_port}\n  key_id: sim-key\n  key_secret_env: SIM_GATEWAY_SECRET\n  stratum0_url: http://127.0.0.1:{gw_port}/cvmfs\n  lease_wait: 60s\n{distribution}",
        spool = dir.path().join("spool").display(),
        root = dir.path().join("storage").display(),
    );
    let file: FileConfig = serde_yaml::from_str(&yaml).unwrap();
    let cfg = file.validate(&Overrides::default()).unwrap();
    // SAFETY of set_var: nothing else runs yet that reads the environment.
    std::env::set_var("PREPUB_API_TOKEN", TOKEN);
    std::env::set_var("SIM_GATEWAY_SECRET", SECRET);
    std::env::set_var("SIM_RECEIVER_SECRET", "sim-receiver-secret");
    let log = cvmfs_prepub::server::logging::logger(false);
    let quiet = slog::Logger::root(slog::Discard, slog::o!());
    let _ = log;
    std::thread::spawn(move || cvmfs_prepub::server::run(cfg, quiet));

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut up = false;
    for _ in 0..200 {
        if http.get(format!("{base}/api/v1/health")).send().is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "publisher did not start");

    // Concurrent submissions: community c publishes version j to /sw/community-c/v<j>.
    let start = Instant::now();
    let submitted: Vec<(usize, usize, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..jobs)
            .map(|n| {
                let (c, j) = (n % communities, n / communities);
                let http = http.clone();
                let base = base.clone();
                s.spawn(move || {
                    let r: serde_json::Value = http
                        .post(format!("{base}/api/v1/jobs"))
                        .bearer_auth(TOKEN)
                        .header("X-Cvmfs-Repo", REPO)
                        .header("X-Cvmfs-Path", format!("/sw/community-{c}/v{j}"))
                        .body(tar_of(&files(c, j)))
                        .send()
                        .unwrap()
                        .json()
                        .unwrap();
                    (
                        c,
                        j,
                        r["job_id"].as_str().expect("job accepted").to_string(),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Partition chaos: the last receiver disappears for a few seconds and comes back.
    if receivers >= 3 {
        let last = receivers - 1;
        let _ = r_children.0[last].kill();
        let _ = r_children.0[last].wait();
        std::thread::sleep(Duration::from_secs(3));
        r_children.0[last] = start_receiver(last, r_ports[last], false);
    }
    let mut finals = Vec::new();
    for (c, j, id) in &submitted {
        let deadline = Instant::now() + Duration::from_secs(300);
        let v = loop {
            let v: serde_json::Value = http
                .get(format!("{base}/api/v1/jobs/{id}"))
                .bearer_auth(TOKEN)
                .send()
                .unwrap()
                .json()
                .unwrap();
            if matches!(
                v["state"].as_str(),
                Some("published" | "failed" | "aborted")
            ) || Instant::now() > deadline
            {
                break v;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        finals.push((*c, *j, v));
    }
    let took = start.elapsed();

    // Checks.
    let mut violations = Vec::new();
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let url = serve(storage.clone());
    let cache = dir.path().join("reader-cache");
    let reader = cvmfs::repository::Repository::new(
        cvmfs::fetcher::Fetcher::new(&url, cache.to_str().unwrap(), true).unwrap(),
    )
    .unwrap();
    for (c, j, v) in &finals {
        let state = v["state"].as_str().unwrap_or("?").to_string();
        *by_state.entry(state.clone()).or_default() += 1;
        let path = format!("/sw/community-{c}/v{j}");
        match state.as_str() {
            "published" => {
                for (rel, body) in files(*c, *j) {
                    let p = format!("{path}/{rel}");
                    let got = reader.get_file(&p).ok().map(|f| {
                        let mut out = vec![0u8; f.file_size() as usize];
                        let mut off = 0;
                        while off < out.len() {
                            let n = f.read_at(off as u64, &mut out[off..]).unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            off += n;
                        }
                        out
                    });
                    if got.as_deref() != Some(&body[..]) {
                        violations.push(format!(
                            "{path}: published but {rel} is missing or wrong (update lost)"
                        ));
                    }
                }
            }
            "failed" => {
                if v["error"]["code"].as_str().unwrap_or("").is_empty() {
                    violations.push(format!("{path}: failed without a reason"));
                }
                if reader.lookup(&path).is_ok() {
                    violations.push(format!("{path}: failed job is visible in the repository"));
                }
            }
            other => violations.push(format!("{path}: ended in state {other}")),
        }
    }
    // Pre-warming: endpoints reporting ok per published job, and every receiver holds only data
    // objects whose bytes match their names (never a catalog).
    let mut prewarm_ok = 0usize;
    for (_, _, v) in &finals {
        if v["state"] == "published" {
            let dist = v["distribution"].as_object().cloned().unwrap_or_default();
            prewarm_ok += dist
                .values()
                .filter(|o| o.as_str().unwrap_or("").starts_with("ok:"))
                .count();
        }
    }
    for (i, p) in r_ports.iter().enumerate() {
        let store = dir.path().join(format!("s1-{i}")).join("cas").join(REPO);
        if let Ok(rc) = prepub_core::cas::LocalCas::open(&store) {
            let held = prepub_core::cas::Cas::list(&rc).unwrap_or_default();
            if held.iter().any(|id| !id.suffix.is_data()) {
                violations.push(format!("receiver {p} holds a catalog object"));
            }
            for id in &held {
                let b = std::fs::read(store.join(id.path())).unwrap_or_default();
                if prepub_core::hash::Digest20::of(&b) != id.digest {
                    violations.push(format!("receiver {p}: object {id} does not match its name"));
                }
            }
        }
    }
    drop(r_children);
    let report =
        prepub_core::check::check(&cas, Some(&keys.master_pub), prepub_core::timefmt::now());
    violations.extend(report.findings.iter().map(|f| format!("repo check: {f}")));
    let (m, _) = prepub_core::repo::current_manifest(&cas).unwrap().unwrap();
    let published = by_state.get("published").copied().unwrap_or(0);
    if m.revision != 1 + published as u64 {
        violations.push(format!(
            "repository is at revision {}, expected {} (one per published job)",
            m.revision,
            1 + published
        ));
    }

    println!("run-sim: {jobs} jobs from {communities} communities, gateway error rate {error_rate}, dropped replies {drop_rate}, latency {latency}, manifest lag {lag}");
    println!("{:<12} {:>6}", "state", "jobs");
    for (s, n) in &by_state {
        println!("{s:<12} {n:>6}");
    }
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, v) in &finals {
        if v["state"] == "failed" {
            *reasons
                .entry(v["error"]["code"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        let _ = v;
    }
    for (r, n) in &reasons {
        println!("  failed: {r} x{n}");
    }
    let attempts: u64 = finals
        .iter()
        .map(|(_, _, v)| v["attempts"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "attempts total {attempts}, repository revision {}, wall {:.1} s",
        m.revision,
        took.as_secs_f64()
    );
    println!(
        "repo check: {} catalogs, {} objects, {} findings",
        report.catalogs,
        report.objects,
        report.findings.len()
    );
    println!("pre-warming: {receivers} receivers (one slow, one partitioned for 3 s), quorum 0.66, {prewarm_ok} endpoint pushes ok");
    if violations.is_empty() {
        println!("run-sim: OK");
    } else {
        for v in &violations {
            println!("VIOLATION: {v}");
        }
        println!("run-sim: {} violations", violations.len());
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// Receiver child processes; stopped (by PID, SIGKILL) when dropped, including on panic.
struct Receivers(Vec<std::process::Child>);

impl Drop for Receivers {
    fn drop(&mut self) {
        for c in self.0.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
