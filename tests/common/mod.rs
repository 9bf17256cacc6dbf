//! Shared helpers for integration tests: building tars from a spec, serving a storage over HTTP
//! on 127.0.0.1, and running the binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One tar member of a test tree.
#[derive(Clone, Debug)]
pub enum Spec {
    Dir(&'static str, u32),
    File {
        path: &'static str,
        mode: u32,
        data: Vec<u8>,
        xattrs: Vec<(&'static str, &'static str)>,
    },
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
}

pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn header(path: &str, et: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).unwrap();
    h.set_entry_type(et);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h
}

/// Writes a tar of `specs` to `out`.
pub fn write_tar(specs: &[Spec], out: &Path) {
    let f = std::fs::File::create(out).unwrap();
    let mut b = tar::Builder::new(std::io::BufWriter::new(f));
    for s in specs {
        match s {
            Spec::Dir(p, m) => {
                let mut h = header(p, tar::EntryType::Directory, *m, 0);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            Spec::File {
                path,
                mode,
                data,
                xattrs,
            } => {
                if !xattrs.is_empty() {
                    let mut pax = Vec::new();
                    for (k, v) in xattrs {
                        let rec = format!(" SCHILY.xattr.{k}={v}\n");
                        let mut len = rec.len() + 1;
                        if (len + rec.len()).to_string().len() + rec.len() > len {
                            len = rec.len() + (rec.len() + 2).to_string().len();
                        }
                        pax.extend_from_slice(format!("{len}{rec}").as_bytes());
                    }
                    let mut h = header(
                        "././@PaxHeader",
                        tar::EntryType::XHeader,
                        0o644,
                        pax.len() as u64,
                    );
                    h.set_cksum();
                    b.append(&h, &pax[..]).unwrap();
                }
                let mut h = header(path, tar::EntryType::Regular, *mode, data.len() as u64);
                h.set_cksum();
                b.append(&h, &data[..]).unwrap();
            }
            Spec::Symlink(p, t) => {
                let mut h = header(p, tar::EntryType::Symlink, 0o777, 0);
                h.set_link_name(t).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            Spec::Hardlink(p, t) => {
                let mut h = header(p, tar::EntryType::Link, 0o644, 0);
                h.set_link_name(t).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap().flush().unwrap();
}

/// Serves `root` over HTTP on 127.0.0.1 until the process ends; returns the base URL.
pub fn serve(root: PathBuf) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let root = root.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let rel = path.trim_start_matches('/');
                let body = if rel == ".cvmfs_last_snapshot" || rel == ".cvmfs_is_snapshotting" {
                    Some(Vec::new())
                } else if rel.contains("..") {
                    None
                } else {
                    std::fs::read(root.join(rel)).ok()
                };
                let _ = match body {
                    Some(b) => s
                        .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len()).as_bytes())
                        .and_then(|_| s.write_all(&b)),
                    None => s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                };
                let _ = s.flush();
                let mut sink = Vec::new();
                let _ = r.read_to_end(&mut sink);
            });
        }
    });
    url
}

/// Runs the cvmfs-prepub binary; returns (success, stdout, stderr).
pub fn prepub(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn ok(args: &[&str]) -> String {
    let (ok, out, err) = prepub(args);
    assert!(ok, "cvmfs-prepub {args:?} failed:\n{out}\n{err}");
    out
}

/// `repo init` of a repository named `name` at the storage `st` (keys beside it).
pub fn repo_init(st: &str, name: &str) {
    ok(&["repo", "init", "--repo-dir", st, "--name", name]);
}

/// `repo ingest` of `tar` at `path` into the storage `st`, then a `repo check` of it.
pub fn ingest_checked(tar: &Path, st: &str, path: &str) {
    ok(&[
        "repo",
        "ingest",
        tar.to_str().unwrap(),
        "--repo-dir",
        st,
        "--path",
        path,
    ]);
    ok(&["repo", "check", "--repo-dir", st]);
}

use cvmfs::repository::Repository;

const S_IFMT: u32 = 0o170000;

/// Opens the repository at `url` with the independent reader, with a fresh cache.
pub fn open_reader(url: &str, cache: &Path) -> Repository {
    let _ = std::fs::remove_dir_all(cache);
    let f = cvmfs::fetcher::Fetcher::new(url, cache.to_str().unwrap(), true).unwrap();
    Repository::new(f).unwrap()
}

pub fn read_all(repo: &Repository, path: &str) -> Vec<u8> {
    // cvmfs 0.4.2 prefetches chunks on background threads that write cache files
    // non-atomically, racing the reading thread (which then sees a short file). Fetch every
    // chunk into the cache first, one after the other, so no download races a read.
    let e = repo.lookup_with_chunks(path).unwrap();
    for c in &e.chunks {
        repo.retrieve_object_with_suffix(&c.content_hash_string(), "P")
            .unwrap();
    }
    let f = repo
        .get_file(path)
        .unwrap_or_else(|e| panic!("get_file {path}: {e:?}"));
    let mut out = vec![0u8; f.file_size() as usize];
    let mut off = 0;
    while off < out.len() {
        let n = f.read_at(off as u64, &mut out[off..]).unwrap();
        assert!(n > 0, "short read of {path} at {off}");
        off += n;
    }
    out
}

/// Checks every spec entry (below `base`) against the reader.
pub fn verify(repo: &Repository, base: &str, specs: &[Spec]) {
    let files: std::collections::HashMap<&str, &Spec> = specs
        .iter()
        .filter_map(|s| match s {
            Spec::File { path, .. } => Some((*path, s)),
            _ => None,
        })
        .collect();
    for s in specs {
        match s {
            Spec::Dir(p, mode) => {
                let rel = p.trim_end_matches('/');
                let rel = if rel == "." { "" } else { rel };
                let path = format!("{base}/{rel}");
                let path = path.trim_end_matches('/');
                let e = repo
                    .lookup(path)
                    .unwrap_or_else(|e| panic!("lookup {path}: {e:?}"));
                assert!(e.is_directory(), "{path} is not a directory");
                assert_eq!(e.mode as u32 & 0o7777, *mode, "mode of {path}");
                repo.list_directory(path)
                    .unwrap_or_else(|e| panic!("list {path}: {e:?}"));
            }
            Spec::File {
                path: p,
                mode,
                data,
                ..
            } => {
                let path = format!("{base}/{p}");
                let e = repo
                    .lookup(&path)
                    .unwrap_or_else(|e| panic!("lookup {path}: {e:?}"));
                assert_eq!(
                    e.mode as u32 & S_IFMT,
                    0o100000,
                    "{path} is not a regular file"
                );
                assert_eq!(e.mode as u32 & 0o7777, *mode, "mode of {path}");
                assert_eq!(e.size as usize, data.len(), "size of {path}");
                assert!(read_all(repo, &path) == *data, "content of {path} differs");
            }
            Spec::Symlink(p, target) => {
                let path = format!("{base}/{p}");
                let e = repo.lookup(&path).unwrap();
                assert!(e.is_symlink(), "{path} is not a symlink");
                assert_eq!(e.symlink.as_deref(), Some(*target), "target of {path}");
            }
            Spec::Hardlink(p, target) => {
                let path = format!("{base}/{p}");
                let Spec::File { data, mode, .. } = files[target] else {
                    unreachable!()
                };
                let e = repo.lookup(&path).unwrap();
                assert_eq!(e.mode as u32 & 0o7777, *mode, "mode of {path}");
                assert_eq!(e.nlink(), 2, "link count of {path}");
                assert!(
                    read_all(repo, &path) == *data,
                    "content of hard link {path}"
                );
            }
        }
    }
}

/// Sets the `gc` block of the repository of a daemon directory made by
/// [`prepare_daemon_dir`] (the repository is the last block of its config file).
pub fn set_gc(dir: &Path, gc: &str) {
    let cfg = dir.join("config.yaml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("    gc: {gc}\n"));
    std::fs::write(&cfg, text).unwrap();
}

/// A daemon process started by a test, stopped (by PID) on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub url: String,
    pub dir: PathBuf,
    pub storage: PathBuf,
    pub log: PathBuf,
}

pub const REPO: &str = "daemon.example.org";
pub const ADMIN: &str = "admin-token-for-tests";
pub const SCOPED: &str = "scoped-token-for-tests";

/// A port free on loopback right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Creates the repository and the config for a daemon under `dir`.
pub fn prepare_daemon_dir(dir: &Path, extra_pipeline: &str, extra_server: &str) -> PathBuf {
    let storage = dir.join("storage").join(REPO);
    if !storage.join(".cvmfspublished").exists() {
        ok(&[
            "repo",
            "init",
            "--repo-dir",
            storage.to_str().unwrap(),
            "--name",
            REPO,
            "--keys-dir",
            dir.join("keys").to_str().unwrap(),
        ]);
    }
    use sha2::Digest;
    let scoped_sha = hex::encode(sha2::Sha256::digest(SCOPED.as_bytes()));
    let cfg = format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  spool_root: {spool}\n  log_format: text\n  api_tokens:\n    - name: scoped\n      sha256: \"{scoped_sha}\"\n      prefixes: [\"{REPO}/allowed\"]\n{extra_server}\ncas:\n  type: localfs\n  root: {root}\npipeline:\n  workers: 2\n  retry_backoff: 200ms\n{extra_pipeline}\nrepositories:\n  - name: {REPO}\n    keys_dir: {keys}\n",
        spool = dir.join("spool").display(),
        root = dir.join("storage").display(),
        keys = dir.join("keys").display(),
    );
    let p = dir.join("config.yaml");
    std::fs::write(&p, cfg).unwrap();
    storage
}

impl Daemon {
    /// Starts the daemon on a free port with `env` (test hooks) and waits for its health check.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_limited(dir, env, None)
    }

    /// [`Daemon::start`], with at most `open_files` open files (soft and hard limit) if given.
    pub fn start_limited(dir: &Path, env: &[(&str, &str)], open_files: Option<u64>) -> Daemon {
        let storage = dir.join("storage").join(REPO);
        let port = free_port();
        let log = dir.join(format!("daemon-{port}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"));
        cmd.args([
            "--config",
            dir.join("config.yaml").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("PREPUB_API_TOKEN", ADMIN)
        .env_remove("CVMFS_PREPUB_TEST_CRASH")
        .env_remove("CVMFS_PREPUB_TEST_HOLD")
        .stdout(logf.try_clone().unwrap())
        .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(n) = open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit (async-signal-safe) runs in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        let d = Daemon {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            storage,
            log,
        };
        let c = client();
        for _ in 0..200 {
            if let Ok(r) = c.get(format!("{}/api/v1/health", d.url)).send() {
                if r.status().as_u16() == 200 || r.status().as_u16() == 503 {
                    return d;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "daemon did not come up; log:\n{}",
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
    }

    /// Waits for the process to end by itself (a crash hook), up to `secs`.
    pub fn wait_exit(&mut self, secs: u64) -> bool {
        for _ in 0..secs * 20 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn submit_raw(
        &self,
        token: &str,
        path: &str,
        tar: &[u8],
        tag: Option<&str>,
    ) -> reqwest::blocking::Response {
        self.post_job(token, path, tar, tag).unwrap()
    }

    /// The submission's answer, or the transport error (a daemon that dies before answering).
    pub fn post_job(
        &self,
        token: &str,
        path: &str,
        tar: &[u8],
        tag: Option<&str>,
    ) -> reqwest::Result<reqwest::blocking::Response> {
        let mut r = client()
            .post(format!("{}/api/v1/jobs", self.url))
            .bearer_auth(token)
            .header("X-Cvmfs-Repo", REPO)
            .header("X-Cvmfs-Path", path)
            .body(tar.to_vec());
        if let Some(t) = tag {
            r = r.header("X-Cvmfs-Tag-Name", t);
        }
        r.send()
    }

    /// Submits a raw tar and returns the new job's id (the submission must be accepted).
    pub fn submit_id(&self, token: &str, path: &str, tar: &[u8], tag: Option<&str>) -> String {
        let r = self.submit_raw(token, path, tar, tag);
        assert_eq!(r.status().as_u16(), 202, "submission of {path} refused");
        r.json::<serde_json::Value>().unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// `GET /api/v1/jobs` with the admin token.
    pub fn jobs(&self) -> serde_json::Value {
        client()
            .get(format!("{}/api/v1/jobs", self.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// The Prometheus text of `/api/v1/metrics`.
    pub fn metrics_text(&self) -> String {
        client()
            .get(format!("{}/api/v1/metrics", self.url))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    pub fn job(&self, id: &str) -> serde_json::Value {
        client()
            .get(format!("{}/api/v1/jobs/{id}", self.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// Asks for the job's abort (admin token); the request must be accepted.
    pub fn abort(&self, id: &str) {
        let r = client()
            .post(format!("{}/api/v1/jobs/{id}/abort", self.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
    }

    /// Polls until the job reaches a terminal state; returns its view.
    pub fn wait_terminal(&self, id: &str, secs: u64) -> serde_json::Value {
        for _ in 0..secs * 20 {
            let j = self.job(id);
            if matches!(
                j["state"].as_str(),
                Some("published" | "failed" | "aborted")
            ) {
                return j;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "job {id} did not finish: {}\nlog:\n{}",
            self.job(id),
            self.log_text()
        );
    }

    /// Polls until the job has been in `state` (its `state_times` has it), for a state it
    /// may pass through faster than a poll sees.
    pub fn wait_reached(&self, id: &str, state: &str, secs: u64) {
        for _ in 0..secs * 50 {
            if !self.job(id)["state_times"][state].is_null() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("job {id} never reached {state}: {}", self.job(id));
    }

    /// Polls until the job is in `state`.
    pub fn wait_state(&self, id: &str, state: &str, secs: u64) {
        for _ in 0..secs * 50 {
            if self.job(id)["state"].as_str() == Some(state) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("job {id} never reached {state}: {}", self.job(id));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only the process this test started, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The name of the object a small (unchunked, zlib-stored) file's `data` becomes.
pub fn object_of_small_file(data: &[u8]) -> prepub_core::hash::ObjectId {
    prepub_core::hash::ObjectId::new(
        prepub_core::hash::Digest20::of(&zlib6(data)),
        prepub_core::hash::Suffix::None,
    )
}

/// `data` as stock zlib level 6 stores it.
pub fn zlib6(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Where `tar` should be cut so the first part ends just after the (padded) content `data`.
pub fn cut_after(tar: &[u8], data: &[u8]) -> usize {
    let at = tar
        .windows(data.len())
        .position(|w| w == data)
        .expect("content in the tar");
    (at + data.len()).div_ceil(512) * 512
}

/// A raw-tar submission sent over one connection in two parts: the first at once, the rest on
/// [`SlowUpload::finish`] — or never, when it is dropped.
pub struct SlowUpload {
    stream: std::net::TcpStream,
    rest: Vec<u8>,
}

impl SlowUpload {
    /// Sends the rest; returns the status and JSON body of the answer.
    pub fn finish(mut self) -> (u16, serde_json::Value) {
        self.stream.write_all(&self.rest).unwrap();
        let mut answer = Vec::new();
        self.stream.read_to_end(&mut answer).unwrap();
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text}"));
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        (
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }
}

impl Daemon {
    /// Starts submitting `tar` to `path` and sends its first `first` bytes.
    pub fn begin_upload(&self, path: &str, tar: &[u8], first: usize) -> SlowUpload {
        let addr = self.url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(120)))
            .unwrap();
        let head = format!(
            "POST /api/v1/jobs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN}\r\n\
             X-Cvmfs-Repo: {REPO}\r\nX-Cvmfs-Path: {path}\r\nContent-Type: application/x-tar\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            tar.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&tar[..first]).unwrap();
        SlowUpload {
            stream,
            rest: tar[first..].to_vec(),
        }
    }
}

/// Polls `cond` every 20 ms for up to `secs`; true once it held.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 50 {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Builds a tar in memory from specs (via a temp file).
pub fn tar_bytes(specs: &[Spec]) -> Vec<u8> {
    let t = tempfile::NamedTempFile::new().unwrap();
    write_tar(specs, t.path());
    std::fs::read(t.path()).unwrap()
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    g.write_all(b).unwrap();
    g.finish().unwrap()
}

/// A receiver (`cvmfs-prepub --mode receiver`) serving `REPO` from `<root>/cas/REPO` on a
/// loopback port; stopped by PID when dropped.
pub struct Rcv {
    pub child: std::process::Child,
    pub url: String,
    pub storage: PathBuf,
}

impl Rcv {
    /// The receiver's Prometheus text.
    pub fn metrics_text(&self) -> String {
        client()
            .get(format!("{}/api/v1/metrics", self.url))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }
}

impl Drop for Rcv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a receiver under `root` (config `<root>/receiver.yaml`, plus `extra_yaml`) with the
/// shared `secret`, on `port` or a free one, with extra environment `env`; returns once healthy.
pub fn start_receiver(
    root: &Path,
    secret: &str,
    port: Option<u16>,
    env: &[(&str, &str)],
    extra_yaml: &str,
) -> Rcv {
    std::fs::create_dir_all(root).unwrap();
    let cfg = root.join("receiver.yaml");
    std::fs::write(
        &cfg,
        format!(
            "mode: receiver\ncas:\n  root: {}\nrepositories:\n  - name: {REPO}\n{extra_yaml}",
            root.join("cas").display()
        ),
    )
    .unwrap();
    let port = port.unwrap_or_else(free_port);
    let child = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("PREPUB_RECEIVER_SECRET", secret)
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // With `tls_cert` in the extra configuration the receiver speaks HTTPS.
    let scheme = if extra_yaml.contains("tls_cert") {
        "https"
    } else {
        "http"
    };
    let r = Rcv {
        child,
        url: format!("{scheme}://127.0.0.1:{port}"),
        storage: root.join("cas").join(REPO),
    };
    // Readiness only: health needs no credentials, and the test CA is not trusted here.
    let probe = reqwest::blocking::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap();
    for _ in 0..200 {
        if probe.get(format!("{}/api/v1/health", r.url)).send().is_ok() {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("receiver did not start");
}

/// Garbage collection of what an aborted job left behind (the daemon holds jobs 2.5 s in
/// `committing`, on the commit thread before the manifest is written —
/// `CVMFS_PREPUB_TEST_HOLD=commit-started=2500` — and collects with
/// `grace_period: 5s`): the job's new object is stored, a run right away keeps it as young,
/// a run after the grace period deletes it; the head never names it. Returns the object.
pub fn aborted_job_objects_go_after_the_grace_period(
    d: &Daemon,
    cas: &dyn prepub_core::cas::Cas,
) -> prepub_core::hash::ObjectId {
    use prepub_core::hash::{Digest20, ObjectId, Suffix};
    let data = pseudo_random(40_000, 4242);
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(&data).unwrap();
    let id = ObjectId::new(Digest20::of(&enc.finish().unwrap()), Suffix::None);
    let spec = [Spec::File {
        path: "never/committed.bin",
        mode: 0o644,
        data,
        xattrs: vec![],
    }];
    let job = d.submit_id(ADMIN, "/sw/aborted", &tar_bytes(&spec), None);
    d.wait_state(&job, "committing", 60);
    d.abort(&job);
    assert_eq!(d.wait_terminal(&job, 30)["state"], "aborted");
    assert!(
        cas.exists(&id).unwrap(),
        "the aborted job's object was stored"
    );
    let stored = cas.modified(&id).unwrap();
    let run = || -> serde_json::Value {
        client()
            .post(format!("{}/api/v1/gc/{REPO}/run", d.url))
            .bearer_auth(ADMIN)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    // Asked of the storage itself (an S3 store's known-object cache would answer for it).
    let still_stored = || cas.modified(&id).is_ok();
    let first = run();
    if prepub_core::timefmt::now() - stored < 5 {
        assert!(still_stored(), "deleted inside the grace period: {first}");
        assert!(first["plan"]["young"].as_u64().unwrap() >= 1, "{first}");
    }
    while prepub_core::timefmt::now() - stored <= 5 {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let second = run();
    assert_eq!(second["run"]["state"], "complete", "{second}");
    assert!(
        !still_stored(),
        "still stored after the grace period: {second}"
    );
    id
}

/// The secret the gateway double and gateway-mode daemons share.
pub const GATEWAY_SECRET: &str = "gateway-secret-for-tests";

/// The gateway double (`cvmfs-prepub gateway-double`) serving `REPO` from `<dir>/storage`, on
/// loopback; stopped by PID when dropped.
pub struct GatewayDouble {
    pub child: std::process::Child,
    pub url: String,
    pub port: u16,
}

impl GatewayDouble {
    pub fn start(dir: &Path, extra: &[&str], port: Option<u16>) -> GatewayDouble {
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let log = std::fs::File::create(dir.join(format!("double-{port}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
            .args([
                "gateway-double",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--repo",
                REPO,
                "--storage",
            ])
            .arg(dir.join("storage").join(REPO))
            .arg("--keys-dir")
            .arg(dir.join("keys"))
            .args(["--key-id", "prepub-key"])
            .args(extra)
            .env("CVMFS_GATEWAY_SECRET", GATEWAY_SECRET)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = GatewayDouble {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
        };
        for _ in 0..200 {
            if client().get(format!("{}/api/v1", d.url)).send().is_ok() {
                return d;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        drop(d);
        panic!("gateway double did not start");
    }
}

impl Drop for GatewayDouble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon in gateway mode whose CAS is the double's repository storage.
pub fn gateway_daemon(
    dir: &Path,
    gw: &GatewayDouble,
    gateway_extra: &str,
    env: &[(&str, &str)],
) -> Daemon {
    let cfg = dir.join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace(
        "  log_format: text\n",
        "  log_format: text\n  publish_mode: gateway\n",
    );
    let text = format!(
        "{text}gateway:\n  url: {}\n  key_id: prepub-key\n  stratum0_url: {}/cvmfs\n  lease_wait: 30s\n{gateway_extra}",
        gw.url, gw.url
    );
    std::fs::write(&cfg, text).unwrap();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "CVMFS_GATEWAY_SECRET") {
        env.push(("CVMFS_GATEWAY_SECRET", GATEWAY_SECRET));
    }
    Daemon::start(dir, &env)
}

/// Starts the daemon of `dir` `times` times with `env` (a crash hook among it), each start
/// waited for until the process stops (the crash may come before the daemon answers its health
/// check, so these are plain processes).
pub fn crash_on_resume(dir: &Path, env: &[(&str, &str)], times: usize) {
    for _ in 0..times {
        let mut p = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
            .args([
                "--config",
                dir.join("config.yaml").to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .env("PREPUB_API_TOKEN", ADMIN)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while p.try_wait().unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "no crash on resume");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// `f` of the repository's current history database.
pub fn with_current_history<T>(
    cas: &dyn prepub_core::cas::Cas,
    f: impl FnOnce(&prepub_core::history::History) -> T,
) -> T {
    let (m, _) = prepub_core::repo::current_manifest(cas).unwrap().unwrap();
    let h = m.history.unwrap();
    let bytes = prepub_core::cas::get_all(cas, &h).unwrap();
    let db = prepub_core::object::decode_to_vec(&h, &bytes, true).unwrap();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), db).unwrap();
    f(&prepub_core::history::History::open(tmp.path()).unwrap())
}

/// The tags of the repository's current history.
pub fn history_tags(cas: &dyn prepub_core::cas::Cas) -> Vec<prepub_core::history::Tag> {
    with_current_history(cas, |h| h.tags().unwrap())
}

/// The tag `name` of the repository's current history (it must be there).
pub fn history_tag(cas: &dyn prepub_core::cas::Cas, name: &str) -> prepub_core::history::Tag {
    history_tags(cas)
        .into_iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tag {name} in the history"))
}

/// What is left in the spool's `incoming/` once refused uploads have had up to 10 s to go (the
/// daemon unlinks them off the request's thread).
pub fn incoming_left(spool: &Path) -> Vec<PathBuf> {
    let list = || -> Vec<PathBuf> {
        std::fs::read_dir(spool.join("incoming"))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    eventually(10, || list().is_empty());
    list()
}
