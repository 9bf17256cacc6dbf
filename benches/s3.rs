//! S3 publish benchmark: the same software tree (BENCH_TREE, default this machine's Python
//! standard library, capped at BENCH_FILES files) published into S3 (`moto_server` on loopback)
//! with `upload_concurrency` 1, 16 and 64, beside the same publish into a local CAS, all in one run.
//! Run with `cargo bench --bench s3` (needs `moto_server` on PATH).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prepub_core::cas::{Cas, LocalCas};
use prepub_core::intake::{read_tar_parallel, IntakeLimits};
use prepub_core::keys::RepoKeys;
use prepub_core::object::EncodeParams;
use prepub_core::pipeline::{Pipeline, StorePool};
use prepub_core::repo::{self, ApplyMode};

fn tree() -> PathBuf {
    if let Ok(p) = std::env::var("BENCH_TREE") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn collect(root: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    let mut v: Vec<_> = rd.flatten().collect();
    v.sort_by_key(|e| e.path());
    for e in v {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            collect(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

/// Publishes `tar` into `cas` (objects through a store pool of `concurrency` threads, then
/// catalogs); returns the wall time.
fn publish(cas: Arc<dyn Cas>, keys: &RepoKeys, tar: &Path, concurrency: usize) -> Duration {
    let start = Instant::now();
    let params = EncodeParams::default();
    let pool = Pipeline::with_store(0, &StorePool::new(concurrency, 256 << 20));
    let f = std::fs::File::open(tar).unwrap();
    let cs = read_tar_parallel(
        f,
        false,
        &params,
        &IntakeLimits::default(),
        cas.clone(),
        &pool,
        1,
    )
    .unwrap();
    repo::publish(cas.as_ref(), keys, &[], 2, |t| {
        repo::apply_changeset(
            t,
            cas.as_ref(),
            &cs,
            "/bench",
            ApplyMode::Replace,
            &params,
            2,
        )
    })
    .unwrap();
    start.elapsed()
}

fn main() {
    let limit: usize = std::env::var("BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let root = tree();
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.truncate(limit);
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("tree.tar");
    let mut bytes = 0u64;
    {
        let mut b = tar::Builder::new(std::io::BufWriter::new(
            std::fs::File::create(&tar).unwrap(),
        ));
        for p in &files {
            let rel = p.strip_prefix(&root).unwrap();
            if b.append_path_with_name(p, rel).is_ok() {
                bytes += std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            }
        }
        b.into_inner().unwrap().flush().unwrap();
    }
    let keys = RepoKeys::generate("bench.example.org", 30).unwrap();

    let local = LocalCas::create(&dir.path().join("local")).unwrap();
    repo::init(&local, &keys, 0, 0, 1).unwrap();
    let t_local = publish(
        Arc::new(
            LocalCas::open(&dir.path().join("local"))
                .unwrap()
                .with_deferred_dir_sync(),
        ),
        &keys,
        &tar,
        16,
    );

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut moto = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server on PATH (pip install 'moto[server]')");
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::blocking::Client::new();
    for _ in 0..200 {
        if http.get(&endpoint).send().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench");
    let mut rows = Vec::new();
    for c in [1usize, 16, 64] {
        let bucket = format!("bench-{c}");
        http.put(format!("{endpoint}/{bucket}")).send().unwrap();
        let s3 = prepub_actors::s3_cas::S3Cas::new(prepub_actors::s3_cas::S3Settings {
            bucket,
            region: "us-east-1".into(),
            endpoint: endpoint.clone(),
            prefix: "bench.example.org".into(),
            multipart_threshold: 64 << 20,
        })
        .unwrap();
        repo::init(&s3, &keys, 0, 0, 1).unwrap();
        rows.push((c, publish(Arc::new(s3), &keys, &tar, c)));
    }
    let _ = moto.kill();
    let _ = moto.wait();
    println!(
        "tree: {} ({} files, {:.0} MiB)",
        root.display(),
        files.len(),
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "local CAS (fsync, 16 puts in flight): {:7.2} s",
        t_local.as_secs_f64()
    );
    for (c, t) in rows {
        println!(
            "S3 (moto), upload_concurrency {c:>2}:    {:7.2} s   {:.2}x the local time",
            t.as_secs_f64(),
            t.as_secs_f64() / t_local.as_secs_f64()
        );
    }
}
