//! What the benchmarks share: free loopback ports and real Stratum 1 receivers
//! (`cvmfs-prepub --mode receiver` processes) for the pre-warm pushes.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const REPO: &str = "bench.example.org";
pub const SECRET: &str = "bench-receiver-secret";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `url` answers at all.
pub fn wait_up(url: &str) {
    let c = reqwest::blocking::Client::new();
    for _ in 0..400 {
        if c.get(url).send().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{url} did not come up");
}

/// A receiver process, stopped when dropped.
pub struct Receiver {
    child: Child,
    pub url: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a receiver for [`REPO`] with its storage under `dir/name`, signing with [`SECRET`].
pub fn receiver(dir: &Path, name: &str) -> Receiver {
    let root = dir.join(name);
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
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_cvmfs-prepub"))
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("PREPUB_RECEIVER_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_up(&format!("{url}/api/v1/health"));
    Receiver { child, url }
}
