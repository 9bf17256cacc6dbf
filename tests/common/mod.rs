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
