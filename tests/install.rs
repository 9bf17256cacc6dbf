//! install.sh as an operator runs it (install guide §10), inside throwaway roots (`--root`):
//! install, idempotent re-install, dry runs, templates kept, ReadWritePaths from the
//! configuration, every uninstall variant, the legacy purge, and `systemd-analyze verify` of the
//! installed units. Needs root (it creates accounts and chowns files), as CI runs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A checkout with install.sh, config/, systemd/ and bin/ (the built binaries).
fn checkout() -> tempfile::TempDir {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "tests/install.rs needs root (install.sh creates an account and chowns files)"
    );
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(ROOT).join("install.sh"),
        d.path().join("install.sh"),
    )
    .unwrap();
    for sub in ["config", "systemd"] {
        std::fs::create_dir_all(d.path().join(sub)).unwrap();
        for e in std::fs::read_dir(Path::new(ROOT).join(sub))
            .unwrap()
            .flatten()
        {
            if e.path().is_file() {
                std::fs::copy(e.path(), d.path().join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    std::fs::create_dir_all(d.path().join("bin")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_cvmfs-prepub"),
        d.path().join("bin/cvmfs-prepub"),
    )
    .unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_prepubctl"),
        d.path().join("bin/prepubctl"),
    )
    .unwrap();
    d
}

fn run(co: &Path, root: &Path, args: &[&str]) -> (Option<i32>, String) {
    let o: Output = Command::new("bash")
        .arg(co.join("install.sh"))
        .args(args)
        .args(["--root", root.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Every path under `root` with mode, uid and gid (account files excluded).
fn tree(root: &Path) -> Vec<(String, u32, u32, u32)> {
    fn walk(root: &Path, p: &Path, out: &mut Vec<(String, u32, u32, u32)>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            if rel.starts_with("etc/passwd")
                || rel.starts_with("etc/group")
                || rel.starts_with("etc/shadow")
                || rel.starts_with("etc/gshadow")
            {
                continue;
            }
            out.push((rel, m.mode() & 0o7777, m.uid(), m.gid()));
            if m.is_dir() {
                walk(root, &e.path(), out);
            }
        }
    }
    let mut v = Vec::new();
    walk(root, root, &mut v);
    v.sort();
    v
}

fn account(root: &Path) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).ok()?;
    let line = passwd.lines().find(|l| l.starts_with("cvmfs-prepub:"))?;
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

/// (mode, uid, gid) of an installed path.
fn entry(t: &[(String, u32, u32, u32)], path: &str) -> [u32; 3] {
    let e = t
        .iter()
        .find(|e| e.0 == path)
        .unwrap_or_else(|| panic!("{path} not installed: {t:?}"));
    [e.1, e.2, e.3]
}

#[test]
fn install_is_complete_idempotent_and_keeps_templates() {
    let co = checkout();
    let root = tempfile::tempdir().unwrap();
    // A dry run changes nothing.
    let (code, out) = run(co.path(), root.path(), &["--dry-run"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("would: install") && out.contains("dry run:"),
        "{out}"
    );
    assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());

    let (code, out) = run(co.path(), root.path(), &[]);
    assert_eq!(code, Some(0), "{out}");
    let (uid, gid) = account(root.path()).expect("account created");
    assert_ne!(uid, 0);
    let t = tree(root.path());
    let bin = "usr/local/bin/cvmfs-prepub";
    assert_eq!(entry(&t, bin), [0o755, 0, 0]);
    assert_eq!(entry(&t, "usr/local/bin/prepubctl"), [0o755, 0, 0]);
    assert_eq!(entry(&t, "etc/cvmfs-prepub"), [0o750, 0, gid]);
    assert_eq!(entry(&t, "etc/cvmfs-prepub/config.yaml"), [0o640, 0, gid]);
    assert_eq!(entry(&t, "etc/cvmfs-prepub/env"), [0o600, uid, gid]);
    assert_eq!(entry(&t, "var/spool/cvmfs-prepub"), [0o750, uid, gid]);
    assert_eq!(entry(&t, "srv/cvmfs"), [0o755, uid, gid]);
    assert_eq!(
        entry(&t, "etc/systemd/system/cvmfs-prepub.service"),
        [0o644, 0, 0]
    );
    assert!(!t.iter().any(|e| e.0.contains("receiver")), "{t:?}");
    assert_eq!(
        std::fs::read(root.path().join(bin)).unwrap(),
        std::fs::read(co.path().join("bin/cvmfs-prepub")).unwrap()
    );
    let unit = std::fs::read_to_string(root.path().join("etc/systemd/system/cvmfs-prepub.service"))
        .unwrap();
    assert!(
        unit.contains("\nReadWritePaths=/var/spool/cvmfs-prepub /srv/cvmfs\n"),
        "{unit}"
    );
    assert!(unit.contains("\nExecReload=/bin/kill -HUP $MAINPID\n"));

    // Again: nothing changes, and it says so.
    let (code, out) = run(co.path(), root.path(), &[]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out.trim(),
        "nothing to change: cvmfs-prepub (publisher) is installed and up to date"
    );
    assert_eq!(tree(root.path()), t);

    // An edited configuration is kept; the unit follows its paths.
    let cfg = root.path().join("etc/cvmfs-prepub/config.yaml");
    let edited = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "spool_root: /var/spool/cvmfs-prepub",
            "spool_root: /data/spool",
        )
        .replace("  root: /srv/cvmfs ", "  root: /data/cas ");
    std::fs::write(&cfg, &edited).unwrap();
    let (code, out) = run(co.path(), root.path(), &[]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), edited);
    let unit = std::fs::read_to_string(root.path().join("etc/systemd/system/cvmfs-prepub.service"))
        .unwrap();
    assert!(
        unit.contains("\nReadWritePaths=/data/spool /data/cas\n"),
        "{unit}"
    );
    let t = tree(root.path());
    assert_eq!(entry(&t, "data/spool"), [0o750, uid, gid]);
    assert_eq!(entry(&t, "data/cas"), [0o755, uid, gid]);
    // A new binary is installed over the old one.
    std::fs::write(co.path().join("bin/prepubctl"), b"#!/bin/sh\necho new\n").unwrap();
    let (_, out) = run(co.path(), root.path(), &[]);
    assert!(
        out.contains("done:  install") && out.contains("prepubctl"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(root.path().join("usr/local/bin/prepubctl")).unwrap(),
        b"#!/bin/sh\necho new\n"
    );
}

#[test]
fn installed_units_pass_systemd_analyze_verify() {
    let co = checkout();
    let root = tempfile::tempdir().unwrap();
    let (code, out) = run(co.path(), root.path(), &["--mode", "all"]);
    assert_eq!(code, Some(0), "{out}");
    let units = tempfile::tempdir().unwrap();
    for name in ["cvmfs-prepub.service", "cvmfs-prepub-receiver.service"] {
        // Verified with ExecStart pointing at the binary installed in the throwaway root.
        let text = std::fs::read_to_string(root.path().join("etc/systemd/system").join(name))
            .unwrap()
            .replace(
                "/usr/local/bin/",
                &format!("{}/usr/local/bin/", root.path().display()),
            );
        let p = units.path().join(name);
        std::fs::write(&p, text).unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&p)
            .output()
            .expect("systemd-analyze (systemd package)");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.trim().is_empty(), "{name}: {err}");
    }
    let rcv = std::fs::read_to_string(
        root.path()
            .join("etc/systemd/system/cvmfs-prepub-receiver.service"),
    )
    .unwrap();
    // receiver.yaml's cas.root and its per-repository storage are writable.
    assert!(
        rcv.contains("\nReadWritePaths=/srv/cvmfs/stratum1/cas /srv/cvmfs/stratum1/cms.cern.ch\n"),
        "{rcv}"
    );
}

#[test]
fn uninstall_variants() {
    let co = checkout();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (code, _) = run(co.path(), r, &["--mode", "all"]);
    assert_eq!(code, Some(0));
    std::fs::write(r.join("var/spool/cvmfs-prepub/journal.wal"), b"{}\n").unwrap();

    // Without --yes and without a terminal: refused, nothing removed.
    let before = tree(r);
    let (code, out) = run(co.path(), r, &["uninstall"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("use --yes"), "{out}");
    assert_eq!(tree(r), before);
    // A dry run lists and keeps.
    let (code, out) = run(co.path(), r, &["uninstall", "--dry-run", "--mode", "all"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("would: remove") && out.contains("cvmfs-prepub.service"),
        "{out}"
    );
    assert_eq!(tree(r), before);

    // The receiver role goes; the publisher and the shared binary stay.
    let (code, out) = run(co.path(), r, &["uninstall", "--mode", "receiver", "--yes"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!r
        .join("etc/systemd/system/cvmfs-prepub-receiver.service")
        .exists());
    assert!(!r.join("srv/cvmfs/stratum1/cas").exists());
    assert!(!r.join("etc/cvmfs-prepub/receiver.yaml").exists());
    assert!(r.join("usr/local/bin/cvmfs-prepub").exists());
    assert!(r.join("etc/cvmfs-prepub/config.yaml").exists());

    // Forensics: keep spool, CAS and account.
    let (code, out) = run(
        co.path(),
        r,
        &[
            "uninstall",
            "--keep-spool",
            "--keep-cas",
            "--keep-user",
            "--yes",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(r.join("var/spool/cvmfs-prepub/journal.wal").exists());
    assert!(r.join("srv/cvmfs").exists());
    assert!(account(r).is_some());
    for gone in [
        "usr/local/bin/cvmfs-prepub",
        "usr/local/bin/prepubctl",
        "etc/cvmfs-prepub",
        "etc/systemd/system/cvmfs-prepub.service",
    ] {
        assert!(!r.join(gone).exists(), "{gone} left behind");
    }
    // Final cleanup.
    let (code, out) = run(co.path(), r, &["uninstall", "--yes"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!r.join("var/spool/cvmfs-prepub").exists());
    assert!(!r.join("srv/cvmfs").exists());
    assert!(account(r).is_none());
    let (code, out) = run(co.path(), r, &["uninstall", "--yes"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out.trim(),
        "nothing to remove: cvmfs-prepub (publisher) is not installed"
    );
}

#[test]
fn legacy_daemon_is_reported_or_purged_and_bad_arguments_fail() {
    let co = checkout();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let legacy: Vec<PathBuf> = [
        "etc/systemd/system/cvmfs-local-publish.service",
        "usr/local/sbin/cvmfs-local-publish.sh",
        "usr/local/bin/cvmfs-spool-submit.sh",
        "etc/cvmfs-local-publish.conf",
    ]
    .iter()
    .map(|p| r.join(p))
    .collect();
    for p in &legacy {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"legacy").unwrap();
    }
    std::fs::create_dir_all(r.join("mnt/build/bits/spool/q")).unwrap();
    let (code, out) = run(co.path(), r, &[]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("warning: the legacy bits-console spool daemon"),
        "{out}"
    );
    assert!(legacy.iter().all(|p| p.exists()));
    let (code, out) = run(co.path(), r, &["--purge-legacy"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(legacy.iter().all(|p| !p.exists()), "{out}");
    assert!(!r.join("mnt/build/bits/spool").exists());

    let (code, _) = run(co.path(), r, &["--mode", "bogus"]);
    assert_eq!(code, Some(1));
    let (code, _) = run(co.path(), r, &["--frobnicate"]);
    assert_eq!(code, Some(1));
    // A missing binary is a failed step: exit 1.
    std::fs::remove_file(co.path().join("bin/cvmfs-prepub")).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let (code, out) = run(co.path(), fresh.path(), &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("run 'make build' first"), "{out}");
}
