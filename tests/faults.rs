//! Fault injection at the spool: the spool on a small tmpfs (mounted by the test; CI runs as
//! root) runs out of space. A submission that does not fit gets 503 with the cause and leaves
//! no partial file; jobs accepted before keep going and publish; with the disk full to the last
//! byte nothing new is accepted and nothing accepted is lost; once space is back, work resumes,
//! also across a restart. (Gateway errors, latency, lease expiry and restarts: tests/gateway.rs;
//! S3 throttling and outage: tests/s3.rs; slow, partitioned and restarted receivers:
//! tests/distribution.rs and tests/crash_harness.rs; broker restarts: tests/mqtt.rs.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tmpfs mounted for the test, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn tree(tag: &str, bytes: usize) -> Vec<Spec> {
    vec![Spec::File {
        path: "payload.bin",
        mode: 0o644,
        data: pseudo_random(bytes, tag.len() as u64 * 7919),
        xattrs: vec![],
    }]
}

#[test]
fn a_full_spool_refuses_new_work_and_loses_nothing_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let _fs = Tmpfs::mount(&spool, "12m");
    prepare_daemon_dir(dir.path(), "", "  tar_retention: 0s\n");
    // Jobs wait a little in processing, so the first is still spooled when the second comes.
    let d = Daemon::start(dir.path(), &[("CVMFS_PREPUB_TEST_HOLD", "processing=1500")]);
    let first = d.submit_id(
        ADMIN,
        "/sw/first",
        &tar_bytes(&tree("first", 7 << 20)),
        None,
    );
    // 7 MiB spooled of 12: a second 7 MiB upload cannot fit.
    let r = d.submit_raw(
        ADMIN,
        "/sw/second",
        &tar_bytes(&tree("second", 7 << 20)),
        None,
    );
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{v}"
    );
    let incoming = incoming_left(&spool);
    assert!(incoming.is_empty(), "partial upload left: {incoming:?}");
    let j = d.wait_terminal(&first, 60);
    assert_eq!(j["state"], "published", "{j}");

    // Full to the last byte: a small submission is refused, the daemon stays up.
    let filler = spool.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 1 << 16];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    let _ = std::io::Write::write_all(&mut f, &[0u8; 1]);
    drop(f);
    let r = d.submit_raw(ADMIN, "/sw/tiny", &tar_bytes(&tree("tiny", 100)), None);
    assert_eq!(r.status(), 503, "{}", r.text().unwrap());
    let h: serde_json::Value = client()
        .get(format!("{}/api/v1/health", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(h["status"].is_string(), "{h}");
    let jobs = d.jobs();
    assert_eq!(
        jobs["total"], 1,
        "only the first job was ever accepted: {jobs}"
    );

    // Space back: work resumes, also after a restart.
    std::fs::remove_file(&filler).unwrap();
    let third = d.submit_id(
        ADMIN,
        "/sw/third",
        &tar_bytes(&tree("third", 1 << 20)),
        None,
    );
    drop(d);
    let d = Daemon::start(dir.path(), &[]);
    let j = d.wait_terminal(&third, 60);
    assert_eq!(j["state"], "published", "{j}");
    assert_eq!(d.job(&first)["state"], "published");
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    verify(&repo, "/sw/first", &tree("first", 7 << 20));
    verify(&repo, "/sw/third", &tree("third", 1 << 20));
    assert!(repo.lookup("/sw/second").is_err());
    println!("faults: spool disk full twice (one upload too large for the space left, one with no byte left): both refused with 503, 0 accepted jobs lost, 0 partial uploads left");
}
