//! End-to-end publish benchmark: a real software tree (by default this machine's Python standard
//! library; set BENCH_TREE to use another directory) is packed as a tar, submitted to a running
//! daemon (release build, standalone mode, local CAS) and timed until `published`. Beside it the
//! run measures the machine's zlib-6 limit: the wall time of stock zlib level 6 compressing the
//! same file contents on all cores at once. Run with `cargo bench --bench publish`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stdlib() -> PathBuf {
    if let Ok(p) = std::env::var("BENCH_TREE") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .expect("python3 to locate the standard library (or set BENCH_TREE)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn files(root: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            files(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

/// Wall time of zlib-6 over all contents, split across every core.
fn zlib_limit(contents: &[Vec<u8>]) -> Duration {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let start = Instant::now();
    std::thread::scope(|s| {
        for c in 0..cores {
            s.spawn(move || {
                let mut total = 0usize;
                for data in contents.iter().skip(c).step_by(cores) {
                    let mut z = flate2::write::ZlibEncoder::new(
                        Vec::with_capacity(data.len() / 2 + 64),
                        flate2::Compression::new(6),
                    );
                    z.write_all(data).unwrap();
                    total += z.finish().unwrap().len();
                }
                total
            });
        }
    });
    start.elapsed()
}

fn main() {
    let tree = stdlib();
    let mut list = Vec::new();
    files(&tree, &mut list);
    list.sort();
    let contents: Vec<Vec<u8>> = list.iter().filter_map(|p| std::fs::read(p).ok()).collect();
    let bytes: u64 = contents.iter().map(|c| c.len() as u64).sum();
    let mib = bytes as f64 / (1 << 20) as f64;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("tree.tar");
    {
        let f = std::fs::File::create(&tar_path).unwrap();
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        b.follow_symlinks(false);
        b.append_dir_all(".", &tree).unwrap();
        b.into_inner().unwrap().flush().unwrap();
    }

    let limit = zlib_limit(&contents);

    // Daemon on a free port with a fresh repository.
    let exe = env!("CARGO_BIN_EXE_cvmfs-prepub");
    let storage = dir.path().join("storage/bench.example.org");
    let st = Command::new(exe)
        .args([
            "repo",
            "init",
            "--repo-dir",
            storage.to_str().unwrap(),
            "--name",
            "bench.example.org",
            "--keys-dir",
        ])
        .arg(dir.path().join("keys"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let cfg = format!(
        "server:\n  spool_root: {}\n  log_format: text\n  max_upload_size: 100GiB\ncas:\n  root: {}\npipeline:\n  workers: 0\nrepositories:\n  - name: bench.example.org\n    keys_dir: {}\n",
        dir.path().join("spool").display(),
        dir.path().join("storage").display(),
        dir.path().join("keys").display()
    );
    std::fs::write(dir.path().join("config.yaml"), cfg).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(exe)
        .args([
            "--config",
            dir.path().join("config.yaml").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("PREPUB_API_TOKEN", "bench")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let c = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap();
    for _ in 0..200 {
        if c.get(format!("{base}/api/v1/health")).send().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tar_len = std::fs::metadata(&tar_path).unwrap().len();
    let publish = |path: &str| {
        let start = Instant::now();
        let r: serde_json::Value = c
            .post(format!("{base}/api/v1/jobs"))
            .bearer_auth("bench")
            .header("X-Cvmfs-Repo", "bench.example.org")
            .header("X-Cvmfs-Path", path)
            .body(reqwest::blocking::Body::sized(
                std::fs::File::open(&tar_path).unwrap(),
                tar_len,
            ))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let id = r["job_id"].as_str().unwrap().to_string();
        let job = loop {
            let j: serde_json::Value = c
                .get(format!("{base}/api/v1/jobs/{id}"))
                .bearer_auth("bench")
                .send()
                .unwrap()
                .json()
                .unwrap();
            if matches!(
                j["state"].as_str(),
                Some("published" | "failed" | "aborted")
            ) {
                break j;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (start.elapsed(), job)
    };
    let (took, job) = publish("/python/stdlib");
    // The same tree again to another path: every file's content is known (raw-content index).
    let (warm, warm_job) = publish("/python/stdlib-again");
    assert_eq!(warm_job["state"], "published", "{warm_job}");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(job["state"], "published", "{job}");
    let st = |s: &str| job["state_times"][s].as_i64().unwrap_or(0);
    println!(
        "tree: {} ({} files, {mib:.0} MiB of file contents, tar {:.0} MiB)",
        tree.display(),
        contents.len(),
        tar_len as f64 / (1 << 20) as f64
    );
    println!(
        "zlib-6 limit ({cores} cores at once):   {:7.2} s  {:8.1} MiB/s",
        limit.as_secs_f64(),
        mib / limit.as_secs_f64()
    );
    println!(
        "end-to-end publish (upload→published): {:7.2} s  {:8.1} MiB/s",
        took.as_secs_f64(),
        mib / took.as_secs_f64()
    );
    println!(
        "  processing {:.2} s, commit {:.2} s",
        (st("uploading") - st("processing")) as f64 / 1000.0,
        (st("published") - st("committing")) as f64 / 1000.0
    );
    println!(
        "ratio to the zlib-6 limit: {:.3} (goal >= 0.9)",
        limit.as_secs_f64() / took.as_secs_f64()
    );
    println!(
        "warm re-publish to another path:       {:7.2} s  {:8.1} MiB/s  {:.1}x faster than cold (goal >= 10x); {} objects compressed",
        warm.as_secs_f64(),
        mib / warm.as_secs_f64(),
        took.as_secs_f64() / warm.as_secs_f64(),
        warm_job["progress"]["objects_new"]
    );
}
