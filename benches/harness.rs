//! The benchmark harness (`make bench`, or `cargo bench --bench harness`): every figure of the
//! performance goals measured in one run, on the same inputs, against limits the run takes of
//! this machine, printed as a table and written to `BENCHMARKS.md` (BENCH_OUT overrides the
//! path; `-` writes nothing).
//!
//! Inputs: a real software tree (this machine's Python standard library, or BENCH_TREE) packed
//! as a tar; the same tree with every 20th file changed (5%); BENCH_TINY (100,000) tiny files;
//! one file of BENCH_BIG_GIB (4) GiB. The tree and tiny-file tars start with an empty
//! `.cvmfscatalog`, so each publish target is a nested catalog of its own, the way operators
//! lay out one catalog per release (a repository's root catalog then stays small). Limits: stock zlib level 6 compressing the tree's file
//! contents on every core at once (nothing else done), and SHA-1 throughput on every core.
//! Stages, each through a real daemon (release build, standalone mode) to `published`:
//! cold publish (local CAS), warm re-publish to another path, the 5%-changed tree over the first
//! path, the pre-warm push of the tree's data objects to one Stratum 1 receiver and to three at
//! once (real `cvmfs-prepub --mode receiver` processes), the tiny files, the big file (each with
//! the daemon's peak RSS), and the cold publish into S3 (`moto_server` on loopback) at
//! `upload_concurrency` 1, 16 and 64. BENCH_SKIP=s3,big,receivers,tiny,tree leaves stages out
//! (without the tree stages, the receivers and S3 stages, which need them, are left out too).
//! The tree stages (with their zlib-6 limits) run BENCH_ROUNDS (5) rounds, each on a fresh
//! daemon and storage; the table gives medians and lists every round under it.
//! On ext4 without a journal the run syncs and waits 361 s before its first measurement, for
//! files deleted just before it to age (see [`settle_deletions`]; BENCH_SETTLE=<seconds>
//! overrides that).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prepub_actors::s1_distributor::{push_objects, DistributionSettings, Payload};
use prepub_core::cas::{Cas, LocalCas};
use prepub_core::hash::Suffix;

mod common;
use common::{free_port, receiver, wait_up, Receiver, REPO, SECRET};

const TOKEN: &str = "bench";

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn skipped(stage: &str) -> bool {
    std::env::var("BENCH_SKIP")
        .map(|v| v.split(',').any(|s| s.trim() == stage))
        .unwrap_or(false)
}

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_cvmfs-prepub")
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap()
}

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

/// Regular files under `root`, sorted (relative path, absolute path).
fn files(root: &Path) -> Vec<(PathBuf, PathBuf)> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<(PathBuf, PathBuf)>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                walk(root, &e.path(), out);
            } else if ft.is_file() {
                let p = e.path();
                out.push((p.strip_prefix(root).unwrap().to_path_buf(), p));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn header(size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

/// Appends a directory entry for every parent of `rel` not yet in `seen`.
fn parents<W: Write>(
    b: &mut tar::Builder<W>,
    rel: &Path,
    seen: &mut std::collections::BTreeSet<PathBuf>,
) {
    let mut todo: Vec<&Path> = rel
        .ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .collect();
    todo.reverse();
    for a in todo {
        if seen.insert(a.to_path_buf()) {
            let mut h = header(0, 0o755);
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, a, std::io::empty()).unwrap();
        }
    }
}

/// Starts a tar whose target directory becomes a nested catalog (an empty `.cvmfscatalog`
/// marker at its top), as operators lay out one catalog per release.
fn release_tar(out: &Path) -> tar::Builder<std::io::BufWriter<std::fs::File>> {
    let mut b = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(out).unwrap()));
    b.append_data(&mut header(0, 0o644), ".cvmfscatalog", std::io::empty())
        .unwrap();
    b
}

/// The tree as a tar; files whose index is a multiple of `change_every` get a line appended.
fn tree_tar(list: &[(PathBuf, PathBuf)], out: &Path, change_every: Option<usize>) -> usize {
    let mut b = release_tar(out);
    let mut changed = 0;
    let mut seen = std::collections::BTreeSet::new();
    for (i, (rel, abs)) in list.iter().enumerate() {
        let Ok(mut data) = std::fs::read(abs) else {
            continue;
        };
        parents(&mut b, rel, &mut seen);
        if change_every.is_some_and(|n| i % n == 0) {
            data.extend_from_slice(format!("\n# changed for the benchmark ({i})\n").as_bytes());
            changed += 1;
        }
        let mut h = header(data.len() as u64, 0o644);
        b.append_data(&mut h, rel, &data[..]).unwrap();
    }
    b.into_inner().unwrap().flush().unwrap();
    changed
}

/// The `i`th tiny file's contents (16–271 bytes, all different).
fn tiny_body(i: usize) -> String {
    format!("tiny file {i}\n{}", "x".repeat(i * 31 % 256))
}

/// `n` tiny files ([`tiny_body`]) in directories of 100.
fn tiny_tar(n: usize, out: &Path) {
    let mut b = release_tar(out);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..n {
        let body = tiny_body(i);
        let rel = PathBuf::from(format!("d{:04}/f{i}.txt", i / 100));
        parents(&mut b, &rel, &mut seen);
        let mut h = header(body.len() as u64, 0o644);
        b.append_data(&mut h, &rel, body.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().flush().unwrap();
}

/// Reproducible bytes about as compressible as a build product (roughly 2.5:1 with zlib-6):
/// words drawn from a fixed random vocabulary.
struct Synthetic {
    left: u64,
    x: u64,
    vocab: Vec<Vec<u8>>,
}

impl Synthetic {
    fn new(len: u64) -> Synthetic {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let vocab = (0..4096)
            .map(|_| {
                let n = 3 + (next() % 12) as usize;
                (0..n).map(|_| (next() % 256) as u8).collect()
            })
            .collect();
        Synthetic {
            left: len,
            x: 0x2545_F491_4F6C_DD1D,
            vocab,
        }
    }
}

impl Read for Synthetic {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (buf.len() as u64).min(self.left) as usize;
        let mut n = 0;
        while n + 16 <= want {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let w = &self.vocab[(self.x % 4096) as usize];
            buf[n..n + w.len()].copy_from_slice(w);
            n += w.len();
        }
        while n < want {
            buf[n] = b' ';
            n += 1;
        }
        self.left -= want as u64;
        Ok(want)
    }
}

fn big_tar(len: u64, out: &Path) {
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(out).unwrap(),
    ));
    let mut h = header(0, 0o755);
    h.set_entry_type(tar::EntryType::Directory);
    b.append_data(&mut h, "big", std::io::empty()).unwrap();
    let mut h = header(len, 0o644);
    b.append_data(&mut h, "big/data.bin", Synthetic::new(len))
        .unwrap();
    b.into_inner().unwrap().flush().unwrap();
}

/// Wall time of `f` over `items`, split across every core.
fn all_cores<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) -> Duration {
    let cores = cores();
    let start = Instant::now();
    std::thread::scope(|s| {
        for c in 0..cores {
            let f = &f;
            s.spawn(move || {
                for it in items.iter().skip(c).step_by(cores) {
                    f(it);
                }
            });
        }
    });
    start.elapsed()
}

/// The machine's limit for a store of one file per object: `n` new files holding
/// `contents(i)`, made on every core and created in 256 directories (create, write, close),
/// then made durable by one `syncfs` — kernel work that no local store in CVMFS's layout
/// avoids. The files stay until the run ends (deleting many files slows the next ones'
/// creation on ext4 without a journal, see the notes).
fn create_files(dir: &Path, n: usize, contents: impl Fn(usize) -> Vec<u8> + Sync) -> Duration {
    use std::os::fd::AsRawFd;
    for k in 0..256 {
        std::fs::create_dir_all(dir.join(format!("{k:02x}"))).unwrap();
    }
    let ids: Vec<usize> = (0..n).collect();
    let start = Instant::now();
    all_cores(&ids, |&i| {
        let bytes = contents(i);
        let p = dir.join(format!("{:02x}", i % 256)).join(i.to_string());
        let mut f = std::fs::File::create_new(p).unwrap();
        f.write_all(&bytes).unwrap();
    });
    let root = std::fs::File::open(dir).unwrap();
    // SAFETY: a plain system call on a descriptor open for its duration.
    assert_eq!(unsafe { libc::syncfs(root.as_raw_fd()) }, 0, "syncfs");
    start.elapsed()
}

fn zlib6(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::new(6),
    );
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

struct Daemon {
    child: Child,
    base: String,
    root: PathBuf,
    storage: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon on a fresh spool with `cas` as its `cas:` section (a local storage with a fresh
/// repository when `None`) and `upload_concurrency`.
fn daemon(dir: &Path, name: &str, s3: Option<(&str, &str)>, concurrency: usize) -> Daemon {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).unwrap();
    let keys = dir.join("keys");
    let storage = root.join("storage");
    // A fresh signed repository where the daemon will publish.
    let init = |at: &[&str]| {
        let st = Command::new(exe())
            .args(["repo", "init"])
            .args(at)
            .args(["--name", REPO, "--keys-dir"])
            .arg(&keys)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    };
    let cas = match s3 {
        None => {
            init(&["--repo-dir", storage.join(REPO).to_str().unwrap()]);
            format!("cas:\n  root: {}\n", storage.display())
        }
        Some((endpoint, bucket)) => {
            init(&[
                "--s3",
                &format!("{bucket}/{REPO}"),
                "--s3-endpoint",
                endpoint,
            ]);
            format!("cas:\n  type: s3\n  bucket: {bucket}\n  endpoint: {endpoint}\n")
        }
    };
    let cfg = format!(
        "server:\n  spool_root: {}\n  log_format: text\n  max_upload_size: 100GiB\n{cas}pipeline:\n  workers: 0\n  upload_concurrency: {concurrency}\nrepositories:\n  - name: {REPO}\n    keys_dir: {}\n",
        root.join("spool").display(),
        keys.display()
    );
    std::fs::write(root.join("config.yaml"), cfg).unwrap();
    let (child, base) = spawn(&root);
    Daemon {
        child,
        base,
        root,
        storage: storage.join(REPO),
    }
}

/// Writes the inputs this harness just made to disk, so their writeback (due 30 s later, and
/// below the background threshold until then) does not land in the middle of a measurement.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Waits out the files deleted just before the run (the build's temporaries, an earlier run's
/// scratch directory), on ext4 without a journal only: there the kernel skips each inode freed
/// in the last 60 s when it allocates a new one, and in the last 360 s while that inode's
/// table block is dirty — which a run's own new files in the same block make it — so for six
/// minutes after deleting many files, creating files ran up to three times slower here (the
/// limits and the publishes alike). Called after a `sync`; BENCH_SETTLE=<seconds> overrides the
/// wait (0 skips it).
fn settle_deletions(scratch: &Path) {
    let secs = match std::env::var("BENCH_SETTLE") {
        Ok(v) => v.parse().expect("BENCH_SETTLE: seconds"),
        Err(_) if ext4_without_journal(scratch) => 361,
        Err(_) => 0,
    };
    if secs > 0 {
        println!("waiting {secs} s for inodes freed before the run to age: ext4 without a journal skips them for up to 360 s (BENCH_SETTLE=0 skips the wait)");
        std::thread::sleep(Duration::from_secs(secs));
    }
}

/// Whether `p` is on ext4 mounted without a journal (a journaled one is listed in
/// /proc/fs/jbd2 as `<device>-8`).
fn ext4_without_journal(p: &Path) -> bool {
    let Some(m) = mount_of(p).filter(|m| m.fstype == "ext4") else {
        return false;
    };
    let dev = Path::new(&m.device)
        .canonicalize()
        .unwrap_or_else(|_| m.device.clone().into());
    dev.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|name| !Path::new(&format!("/proc/fs/jbd2/{name}-8")).exists())
}

fn spawn(root: &Path) -> (Child, String) {
    let port = free_port();
    let child = Command::new(exe())
        .arg("--config")
        .arg(root.join("config.yaml"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("PREPUB_API_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(root.join("daemon.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&format!("{base}/api/v1/health"));
    (child, base)
}

impl Daemon {
    /// A fresh process on the same spool and storage, so a stage's peak RSS is its own.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.child, self.base) = spawn(&self.root);
    }
}

/// The daemon's peak resident set since the last reset, in MiB.
fn peak_rss(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time (user + system, seconds) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    f.get(11)
        .zip(f.get(12))
        .map_or(0.0, |(u, s)| (u + s) / tick)
}

fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// One round of the tree stages.
struct Round {
    zlib: Duration,
    stored: Duration,
    cold: Published,
    warm: Published,
    five: Published,
}

/// The median (of an even number, the mean of the middle two).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Published {
    took: Duration,
    /// Until the submission was answered (upload, spool fsync, journal).
    accepted: Duration,
    processing: f64,
    commit: f64,
    rss_mib: f64,
    compressed: i64,
    /// The daemon's CPU time during the publish (user + system).
    cpu: f64,
}

/// Reads `file` through, so that the client sends it from the page cache, before the clock
/// starts. This VM's host pages out page-cache pages left idle for about a minute (DAMON
/// `pageout`, `/sys/kernel/mm/damon/admin`): the tars made before the start-up wait were
/// partly gone by the first round, whose uploads then read them from disk — the first round's
/// 5 % publish took 3.3–3.9 s in four runs of this harness, the later rounds' 2.0–2.7 s.
fn into_page_cache(file: &Path) {
    let mut f = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
}

/// `POST /api/v1/jobs` of `tar` to `path` as a raw tar body, the bytes sent from the file by
/// the kernel ([`send_file`]). The client shares the machine with the daemon, so it should cost
/// as little as a CI runner's curl would on its own machine: reqwest's blocking body hands the
/// socket 8 KiB at a time across a channel and took a third of a core per 300 MB/s here.
fn post_tar(base: &str, tar: &Path, path: &str) -> serde_json::Value {
    let addr = base.strip_prefix("http://").expect("an http:// base");
    let file = std::fs::File::open(tar).unwrap();
    let len = file.metadata().unwrap().len();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    let head = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         X-Cvmfs-Repo: {REPO}\r\nX-Cvmfs-Path: {path}\r\nContent-Type: application/x-tar\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).unwrap();
    send_file(&file, &sock, len).unwrap();
    let mut answer = Vec::new();
    sock.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    let (status, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        status.starts_with("HTTP/1.1 202"),
        "submission refused: {text}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Sends the `len` bytes of `file` (from its start) to `sock` with `sendfile`: the kernel
/// hands the page-cache pages to the socket, and the client copies nothing. (`std::io::copy`
/// from a file to a socket does not: it reads and sends 8 KiB at a time, copying every byte
/// twice — half a core during a warm publish of the tree here, on the daemon's two cores.)
fn send_file(file: &std::fs::File, sock: &std::net::TcpStream, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
        // SAFETY: both descriptors are open for the call; a null offset sends from (and
        // advances) the file's own position.
        let n = unsafe {
            libc::sendfile(
                sock.as_raw_fd(),
                file.as_raw_fd(),
                std::ptr::null_mut(),
                want,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the tar ended before its length",
            ));
        }
        left -= n as u64;
    }
    Ok(())
}

/// Where a publish's time went, and the daemon's CPU time during it.
fn phases(p: &Published) -> String {
    format!(
        "accepted after {:.2} s, processing {:.2} s, commit {:.2} s; daemon CPU {:.1} s",
        p.accepted.as_secs_f64(),
        p.processing,
        p.commit,
        p.cpu
    )
}

/// Submits `tar` to `path` and waits for `published`: wall time from the first byte sent.
fn publish(d: &Daemon, tar: &Path, path: &str) -> Published {
    into_page_cache(tar);
    reset_peak_rss(d.child.id());
    let cpu_before = cpu_seconds(d.child.id());
    let start = Instant::now();
    let r = post_tar(&d.base, tar, path);
    let accepted = start.elapsed();
    let id = r["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("submission refused: {r}"))
        .to_string();
    // The job's event stream (as `prepubctl watch` follows it): the daemon sends each state as
    // it is saved, so the wait ends when `published` is reached, without a poll's delay or its
    // requests competing for the daemon's cores.
    let job = cvmfs_prepub::client::Client::new(&d.base, Some(TOKEN.into()), false)
        .unwrap()
        .watch(&id, Duration::from_secs(24 * 3600), |_| {})
        .unwrap();
    let took = start.elapsed();
    assert_eq!(job.state, "published", "{job:?}");
    let st = |s: &str| job.state_times.get(s).copied().unwrap_or(0) as f64 / 1000.0;
    Published {
        took,
        accepted,
        processing: st("uploading") - st("processing"),
        commit: st("published") - st("committing"),
        rss_mib: peak_rss(d.child.id()),
        cpu: cpu_seconds(d.child.id()) - cpu_before,
        compressed: job.progress.objects_new as i64,
    }
}

/// Pushes every object of `storage` to each receiver at once; the wall time until all hold them.
fn push_all(dir: &Path, storage: &Path, receivers: &[Receiver], tag: &str) -> Duration {
    let cas: Arc<dyn Cas> = Arc::new(LocalCas::open(storage).unwrap());
    // Data objects only: catalogs and other metadata are replicated, never pre-placed.
    let objects: Vec<_> = cas
        .list()
        .unwrap()
        .into_iter()
        .filter(|o| matches!(o.suffix, Suffix::None | Suffix::Partial))
        .collect();
    let bytes: u64 = objects.iter().map(|o| cas.size(o).unwrap()).sum();
    let settings = DistributionSettings {
        quorum: 1.0,
        timeout: Duration::from_secs(3600),
        commit_anyway: false,
        per_s1_concurrency: 8,
        secret: Some(SECRET.into()),
        identity_pem: None,
        ca_pem: None,
    };
    let start = Instant::now();
    std::thread::scope(|s| {
        for (i, r) in receivers.iter().enumerate() {
            let (cas, objects, settings) = (cas.clone(), &objects, &settings);
            s.spawn(move || {
                let id = format!("{tag}-{i}");
                let payload = Payload {
                    id: &id,
                    repo: REPO,
                    objects,
                    bytes,
                    cas,
                    ack_log: Some(prepub_core::spool::AckLog::path(dir, &id)),
                    progress: None,
                    grant: None,
                };
                let got = push_objects(&r.url, settings, http(), &payload).unwrap();
                assert_eq!(got.pushed as usize, objects.len());
            });
        }
    });
    start.elapsed()
}

/// What the table's figures include, written under it.
const READING: &str = "## Reading the table

- The zlib-6 limit is compression alone, of every file's contents on every core, from memory.
  A publish also receives the upload and writes it durably to the spool before it is accepted
  (with direct I/O, around the page cache), hashes every object, creates one file per object
  (kernel work that grows with the number of objects, not their bytes: in profiles of the cold
  publish about 3 CPU-seconds for 42,000 objects, the largest cost after zlib), builds and
  signs the catalogs. Identical contents inside one tar are compressed once.
- The tar is sent by a minimal client on this same machine (`sendfile` over one HTTP/1.1
  connection, from the page cache: the client reads it through before the clock starts —
  this VM's host pages out page-cache pages idle for about a minute, DAMON `pageout`, and
  the first round's uploads used to read the tars, made before the start-up wait, from
  disk), and processed by the daemon while it uploads: \"accepted after\" is the upload
  and the spool fsync (or the processing, when that ends first), \"processing\" the part of the
  job's processing left once it was accepted (job states `processing` to `uploading`),
  \"commit\" from `committing` to `published`. \"daemon CPU\" is the daemon's user + system
  time during the publish (two cores give two CPU-seconds per second). Every release here has
  its catalog built while its tar is read (completed at the end of its processing), so its
  commit only mounts it — in place of the stored one for the 5% publish, which replaces the
  first path's release.
- Run to run, on this virtual machine, the same stage's times vary by up to a fifth (the same
  work's CPU time too): the tree stages therefore run in rounds, each on a fresh daemon and
  storage and with its own zlib-6 limits, and the rows give medians (listed per round below
  the table). The VM
  hands freed memory back to its host (virtio-balloon free page reporting), so a page touched
  for the first time since costs a fault on the host: `dd` of 1 GiB with `conv=fsync` ran at
  390 MB/s into such pages and 2.0 GB/s into reused ones (1.7 GB/s with `oflag=direct`). The
  daemon spools uploads with direct I/O for that reason; object files and buffers still meet it.
- \"zlib-6 and files\" is the zlib-6 limit's work with each compressed result then written to
  a new file (256 directories, one `syncfs` at the end): compress-and-store done plainly on
  every core, what a cold publish into a local store of one file per object cannot do
  without. It is not a floor: a publish overlaps the writeback with compression (and
  compresses identical files once), so it can beat it while also reading, hashing and
  cataloguing.
- The file-creation limit is the kernel's part of a store of one file per object: the tiny
  files' contents written as new files into 256 directories on every core (create, write,
  close; nothing compressed, hashed or catalogued), then one `syncfs`. A publish of tiny
  files does that work and also reads, hashes, compresses and catalogues every file on the
  same cores, so it cannot reach this rate.
- Peak RSS is the daemon's VmHWM for that stage (the daemon is restarted before the tiny-file
  and big-file stages; the tree stages share one process).
- On ext4 without a journal the kernel skips inodes freed in the last 60 s (360 s while their
  table block is dirty) one by one when it allocates new ones, so a run right after deleting
  many files (a test suite's temporary directories, the build's own temporaries, the
  previous run's scratch directory) creates objects far more slowly — up to three times
  here, limits and publishes alike, and a run's own new files dirty the table blocks of the
  inodes freed before it. On such a filesystem the
  harness therefore syncs and waits 361 s before its first measurement (BENCH_SETTLE=<seconds>
  overrides that), and deletes nothing itself until its end.";

/// One line of the results table.
struct Row {
    what: String,
    value: String,
    ratio: String,
    goal: String,
}

fn row(what: impl Into<String>, value: String, ratio: String, goal: &str) -> Row {
    let what = what.into();
    // As it is measured, so a long run shows where it is.
    println!("{}: {value}  {ratio}  {goal}", what.trim());
    Row {
        what,
        value,
        ratio,
        goal: goal.into(),
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} cores ({cpu}), {} memory ({} free when the run began), Linux {}",
        cores(),
        field("MemTotal:"),
        field("MemFree:"),
        kernel.trim()
    )
}

/// The filesystem holding `p` (type and mount options), from /proc/mounts.
fn filesystem(p: &Path) -> String {
    mount_of(p).map_or_else(
        || "unknown".into(),
        |m| format!("{} on {} ({})", m.fstype, m.dir, m.options),
    )
}

/// The mount (from /proc/mounts) that holds `p`.
struct Mount {
    device: String,
    dir: String,
    fstype: String,
    options: String,
}

fn mount_of(p: &Path) -> Option<Mount> {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && p.starts_with(f[1])).then(|| {
                let m = Mount {
                    device: f[0].into(),
                    dir: f[1].into(),
                    fstype: f[2].into(),
                    options: f[3].into(),
                };
                (f[1].len(), m)
            })
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, m)| m)
}

fn main() {
    let dir = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let d = dir.path();
    // Before the run fills the page cache.
    let machine = machine();
    let tree = stdlib();
    let list = files(&tree);
    let contents: Vec<Vec<u8>> = list
        .iter()
        .filter_map(|(_, p)| std::fs::read(p).ok())
        .collect();
    let bytes: u64 = contents.iter().map(|c| c.len() as u64).sum();
    let mib = bytes as f64 / (1 << 20) as f64;
    let s = |d: Duration| d.as_secs_f64();
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    let tar = d.join("tree.tar");
    tree_tar(&list, &tar, None);
    let changed_tar = d.join("tree-5pc.tar");
    let changed = tree_tar(&list, &changed_tar, Some(20));
    settle();
    settle_deletions(d);
    let tar_mib = std::fs::metadata(&tar).unwrap().len() as f64 / (1 << 20) as f64;
    println!(
        "input: {} ({} files, {mib:.0} MiB of contents, tar {tar_mib:.0} MiB); scratch {}",
        tree.display(),
        contents.len(),
        filesystem(d)
    );

    // The machine's limits, on the same contents. The zlib-6 limit is measured in every round
    // of the tree stages (below), next to the publishes it is the limit for.
    let zlib_limit = || {
        all_cores(&contents, |c| {
            zlib6(c);
        })
    };
    let sha = all_cores(&contents, |c| {
        use sha1::Digest;
        std::hint::black_box(sha1::Sha1::digest(c));
    });

    // Local CAS, one daemon for the tree stages.
    let mut local = daemon(d, "local", None, env_or("BENCH_LOCAL_CONCURRENCY", 16));
    let mut cold_took = None;
    // The rows of the zlib-6 limit (`zlib` seconds) and the SHA-1 one.
    let limit_rows = |rows: &mut Vec<Row>, zlib: f64| {
        rows.push(row(
            format!("limit: zlib-6 of the tree's contents, {} cores", cores()),
            format!("{zlib:.2} s ({:.0} MiB/s)", mib / zlib),
            "1.00".into(),
            "",
        ));
        rows.push(row(
            "limit: SHA-1 of the tree's contents, all cores",
            format!("{:.2} s ({:.0} MiB/s)", s(sha), mib / s(sha)),
            String::new(),
            "",
        ));
    };
    if skipped("tree") {
        limit_rows(&mut rows, s(zlib_limit()));
    } else {
        // BENCH_ROUNDS rounds (5), each on a fresh daemon and storage (the first round's is
        // kept for the later stages): the zlib-6 limit, zlib-6 and files, the cold publish,
        // the warm one and the 5% one. This virtual machine's speed drifts by up to a fifth
        // from minute to minute: the table gives each figure's median over the rounds and each
        // ratio's median over the rounds' own ratios (each round against its own limits).
        let n_rounds = env_or("BENCH_ROUNDS", 5).max(1);
        let mut rounds: Vec<Round> = Vec::new();
        for r in 0..n_rounds {
            let zlib = zlib_limit();
            // What a cold publish cannot do without, done plainly: compress every file and
            // store each result as a file of its own.
            let stored = create_files(&d.join(format!("store-limit-{r}")), contents.len(), |i| {
                zlib6(&contents[i])
            });
            let extra = (r > 0).then(|| {
                daemon(
                    d,
                    &format!("local-{r}"),
                    None,
                    env_or("BENCH_LOCAL_CONCURRENCY", 16),
                )
            });
            let at = extra.as_ref().unwrap_or(&local);
            let cold = publish(at, &tar, "/python/stdlib");
            let warm = publish(at, &tar, "/python/stdlib-again");
            let five = publish(at, &changed_tar, "/python/stdlib");
            println!(
                "round {}: zlib-6 limit {:.2} s, zlib-6 and files {:.2} s, cold {:.2} s, warm {:.2} s, 5% {:.2} s",
                r + 1,
                s(zlib),
                s(stored),
                s(cold.took),
                s(warm.took),
                s(five.took)
            );
            rounds.push(Round {
                zlib,
                stored,
                cold,
                warm,
                five,
            });
        }
        let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        // The round whose figure is the median (or nearest it), for its phases.
        let median_round = |f: &dyn Fn(&Round) -> f64| -> &Round {
            let m = med(f);
            rounds
                .iter()
                .min_by(|a, b| (f(a) - m).abs().total_cmp(&(f(b) - m).abs()))
                .unwrap_or(&rounds[0])
        };
        limit_rows(&mut rows, med(&|r| s(r.zlib)));
        rows.push(row(
            format!(
                "limit: zlib-6 of the tree's contents, each result written to a new file, {} cores",
                cores()
            ),
            format!("{:.2} s", med(&|r| s(r.stored))),
            format!(
                "{:.2} of the zlib-6 limit",
                med(&|r| s(r.zlib) / s(r.stored))
            ),
            "",
        ));
        let cold = &median_round(&|r| s(r.cold.took)).cold;
        let of_limit = med(&|r| s(r.zlib) / s(r.cold.took));
        let rss = rounds.iter().map(|r| r.cold.rss_mib).fold(0.0, f64::max);
        rows.push(row(
            "cold publish of the tree (upload → published)",
            format!(
                "{:.2} s ({}), peak RSS {:.0} MiB",
                s(cold.took),
                phases(cold),
                cold.rss_mib
            ),
            format!(
                "{of_limit:.2} of the zlib-6 limit, {:.2} of zlib-6 and files",
                med(&|r| s(r.stored) / s(r.cold.took))
            ),
            &format!(">= 0.90: {}", met(of_limit >= 0.9)),
        ));
        rows.push(row(
            "  peak RSS, tree (the highest of the rounds)",
            format!("{rss:.0} MiB"),
            String::new(),
            &format!("< 200 MiB: {}", met(rss < 200.0)),
        ));
        let warm = &median_round(&|r| s(r.warm.took)).warm;
        let x = med(&|r| s(r.cold.took) / s(r.warm.took));
        rows.push(row(
            "warm re-publish of the tree to another path",
            format!(
                "{:.2} s ({}), {} objects compressed",
                s(warm.took),
                phases(warm),
                warm.compressed
            ),
            format!("{x:.2}x faster than cold"),
            &format!(">= 10x: {}", met(x >= 10.0)),
        ));
        let five = &median_round(&|r| s(r.five.took)).five;
        let x = med(&|r| s(r.cold.took) / s(r.five.took));
        rows.push(row(
            format!("publish with 5% of files changed ({changed} files) over the first path"),
            format!(
                "{:.2} s ({}), {} objects compressed",
                s(five.took),
                phases(five),
                five.compressed
            ),
            format!("{x:.2}x faster than cold"),
            &format!(">= 6x: {}", met(x >= 6.0)),
        ));
        notes.push(format!(
            "The tree stages ran {} rounds; each row gives the median (the phases are those of the round with the median time, or nearest it), each ratio the median of the rounds' own ratios. Every round — zlib-6 limit, zlib-6 and files, cold, warm, 5%: {}.",
            rounds.len(),
            rounds
                .iter()
                .map(|r| format!(
                    "{:.2} / {:.2} / {:.2} / {:.2} / {:.2} s",
                    s(r.zlib),
                    s(r.stored),
                    s(r.cold.took),
                    s(r.warm.took),
                    s(r.five.took)
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ));
        cold_took = Some(Duration::from_secs_f64(med(&|r| s(r.cold.took))));

        if !skipped("receivers") {
            // The tree's objects (both publishes so far) pushed as a pre-warm would push them.
            let storage = local.storage.clone();
            let one = vec![receiver(d, "s1-one")];
            let t1 = push_all(d, &storage, &one, "one");
            drop(one);
            let three: Vec<Receiver> = (0..3).map(|i| receiver(d, &format!("s1-{i}"))).collect();
            let t3 = push_all(d, &storage, &three, "three");
            drop(three);
            let n = LocalCas::open(&storage)
                .unwrap()
                .list()
                .unwrap()
                .iter()
                .filter(|o| matches!(o.suffix, Suffix::None | Suffix::Partial))
                .count();
            rows.push(row(
                format!("pre-warm push of the tree's data objects ({n}) to 1 receiver"),
                format!("{:.2} s ({:.0} objects/s)", s(t1), n as f64 / s(t1)),
                String::new(),
                "",
            ));
            rows.push(row(
                "  the same to 3 receivers at once",
                format!(
                    "{:.2} s ({:.0} objects/s in all)",
                    s(t3),
                    3.0 * n as f64 / s(t3)
                ),
                format!("{:.2}x the time of one", s(t3) / s(t1)),
                "",
            ));
        }
    }

    if !skipped("tiny") {
        let tiny_n: usize = env_or("BENCH_TINY", 100_000);
        let tiny = d.join("tiny.tar");
        tiny_tar(tiny_n, &tiny);
        settle();
        let made = create_files(&d.join("file-limit"), tiny_n, |i| tiny_body(i).into_bytes());
        let limit = tiny_n as f64 / s(made);
        rows.push(row(
            format!(
                "limit: {tiny_n} small files created and synced, {} cores",
                cores()
            ),
            format!("{:.2} s ({limit:.0} files/s)", s(made)),
            "1.00".into(),
            "",
        ));
        local.restart();
        let t = publish(&local, &tiny, "/tiny");
        let rate = tiny_n as f64 / s(t.took);
        rows.push(row(
            format!("{tiny_n} tiny files"),
            format!(
                "{:.2} s ({}), peak RSS {:.0} MiB",
                s(t.took),
                phases(&t),
                t.rss_mib
            ),
            format!(
                "{rate:.0} files/s, {:.2} of the file-creation limit",
                rate / limit
            ),
            &format!(">= 20000 files/s: {}", met(rate >= 20_000.0)),
        ));
        std::fs::remove_file(&tiny).ok();
    }
    if !skipped("big") {
        let gib: u64 = env_or("BENCH_BIG_GIB", 4);
        let big = d.join("big.tar");
        big_tar(gib << 30, &big);
        settle();
        // The limit for this content: zlib-6 of 64 MiB pieces of it on every core, scaled.
        let mut sample = Vec::new();
        Synthetic::new(256 << 20).read_to_end(&mut sample).unwrap();
        let pieces: Vec<&[u8]> = sample.chunks(8 << 20).collect();
        let zt = all_cores(&pieces, |p| {
            zlib6(p);
        });
        let big_limit = s(zt) * (gib << 30) as f64 / sample.len() as f64;
        local.restart();
        let b = publish(&local, &big, "/big");
        rows.push(row(
            format!("one {gib} GiB file"),
            format!(
                "{:.1} s ({:.0} MiB/s; accepted after {:.1} s, processing {:.1} s), zlib-6 limit for it {:.1} s",
                s(b.took),
                (gib << 10) as f64 / s(b.took),
                s(b.accepted),
                b.processing,
                big_limit
            ),
            format!("{:.2} of its zlib-6 limit", big_limit / s(b.took)),
            "",
        ));
        rows.push(row(
            format!("  peak RSS, {gib} GiB file"),
            format!("{:.0} MiB", b.rss_mib),
            String::new(),
            &format!("< 200 MiB: {}", met(b.rss_mib < 200.0)),
        ));
        std::fs::remove_file(&big).ok();
    }

    drop(local);

    if let (false, Some(cold)) = (skipped("s3"), cold_took) {
        std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench");
        let port = free_port();
        let mut moto = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server on PATH (pip install 'moto[server]'), or BENCH_SKIP=s3");
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_up(&endpoint);
        for c in [1usize, 16, 64] {
            let bucket = format!("bench-{c}");
            http().put(format!("{endpoint}/{bucket}")).send().unwrap();
            let dm = daemon(d, &format!("s3-{c}"), Some((&endpoint, &bucket)), c);
            let p = publish(&dm, &tar, "/python/stdlib");
            let x = s(p.took) / s(cold);
            rows.push(row(
                format!("cold publish into S3 (moto), upload_concurrency {c}"),
                format!("{:.2} s ({})", s(p.took), phases(&p)),
                format!("{x:.2}x the local-CAS time"),
                &if c == 64 {
                    format!("<= 2x: {}", met(x <= 2.0))
                } else {
                    String::new()
                },
            ));
        }
        let _ = moto.kill();
        let _ = moto.wait();
        notes.push("S3 is moto_server (a single Python process) on loopback: its request rate, not the network, bounds these rows.".to_string());
    }

    // The table, as printed and as written.
    let w = rows.iter().map(|r| r.what.len()).max().unwrap_or(0);
    let v = rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
    let q = rows.iter().map(|r| r.ratio.len()).max().unwrap_or(0);
    println!();
    for r in &rows {
        println!(
            "{:<w$}  {:<v$}  {:<q$}  {}",
            r.what, r.value, r.ratio, r.goal
        );
    }
    let out = std::env::var("BENCH_OUT")
        .unwrap_or_else(|_| format!("{}/BENCHMARKS.md", env!("CARGO_MANIFEST_DIR")));
    if out != "-" {
        let commit = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Written by `make bench` (`cargo bench --bench harness`, benches/harness.rs); do not edit by hand.\n"
        );
        let _ = writeln!(md, "- Machine: {machine}");
        let _ = writeln!(
            md,
            "- Scratch space (spool and local CAS): {}",
            filesystem(d)
        );
        let _ = writeln!(md, "- Commit: {commit}");
        let _ = writeln!(
            md,
            "- Input: {} — {} files, {mib:.0} MiB of contents, tar {tar_mib:.0} MiB; the tree and tiny-file tars carry a `.cvmfscatalog` marker at their top, so every publish target is a nested catalog, one per release as operators lay them out",
            tree.display(),
            contents.len()
        );
        let _ = writeln!(md, "- Daemon: release build, standalone mode, `pipeline.workers: 0` (one encoder per core), `upload_concurrency: 16` unless a row says otherwise (with local storage the daemon starts at most two store threads per core); every time is wall time from the first byte of the upload to `published`.\n");
        let _ = writeln!(md, "| What | Measured | Ratio | Goal |");
        let _ = writeln!(md, "|---|---|---|---|");
        for r in &rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                r.what.trim(),
                r.value,
                r.ratio,
                r.goal
            );
        }
        for n in &notes {
            let _ = writeln!(md, "\n{n}");
        }
        let _ = writeln!(md, "\n{READING}");
        std::fs::write(&out, md).unwrap();
        println!("\nwritten to {out}");
    }
}
