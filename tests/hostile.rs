//! Hostile and broken archives through the real daemon, in standalone and local mode: each of
//! the corpus's archives (crafted byte by byte: traversal in every form, symlink and hardlink
//! escapes, devices, duplicates, lying sizes, truncated tar and gzip, a gzip bomb, 200k empty
//! files, non-UTF-8 and overlong names, bogus PAX records) has its outcome asserted; afterwards
//! nothing exists outside the spool, the storage and the keys (nor at the absolute paths the
//! archives aim at), the daemon is healthy and the repository checks clean. Prints its counts.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;

/// One 512-byte ustar header; `size` is written as given (it may lie).
fn header(name: &[u8], kind: u8, size: u64, link: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    let mode: &[u8] = if kind == b'5' {
        b"0000755\0"
    } else {
        b"0000644\0"
    };
    h[100..108].copy_from_slice(mode);
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"14707044000\0");
    h[156] = kind;
    h[157..157 + link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Turns a ustar header into a GNU one (magic `ustar  `), checksum recomputed.
fn gnu(mut h: Vec<u8>) -> Vec<u8> {
    h[257..265].copy_from_slice(b"ustar  \0");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h[..512].iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn pad(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(512) {
        v.push(0);
    }
}

/// A whole entry: header and content.
fn entry(name: &[u8], kind: u8, data: &[u8], link: &[u8]) -> Vec<u8> {
    let mut v = header(name, kind, data.len() as u64, link);
    v.extend_from_slice(data);
    pad(&mut v);
    v
}

fn file(name: &str, data: &[u8]) -> Vec<u8> {
    entry(name.as_bytes(), b'0', data, b"")
}

fn dir(name: &str) -> Vec<u8> {
    entry(name.as_bytes(), b'5', b"", b"")
}

/// A PAX extended header (`x`) with `records`, for the entry that follows.
fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = 1 + k.len() + 1 + v.len() + 1;
        let mut len = rest + 1;
        while len.to_string().len() + rest != len {
            len += 1;
        }
        body.extend_from_slice(format!("{len} {k}=").as_bytes());
        body.extend_from_slice(v);
        body.push(b'\n');
    }
    entry(b"./PaxHeaders/x", b'x', &body, b"")
}

fn tar(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut v: Vec<u8> = parts.concat();
    v.extend_from_slice(&[0u8; 1024]);
    v
}

fn gz(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// What must become of a submission.
enum Expect {
    /// The job ends `failed` with a message containing this.
    Fails(&'static str),
    /// The submission is refused at once with this status.
    Refused(u16),
    /// The job publishes; the repository holds this path afterwards.
    Publishes(&'static str),
}

struct Case {
    name: &'static str,
    path: &'static str,
    body: Vec<u8>,
    expect: Expect,
}

/// The corpus. `token` makes the escape targets of this run unique.
fn corpus(token: &str, big: bool) -> Vec<Case> {
    let esc = |prefix: &str| format!("{prefix}prepub-escape-{token}");
    let deep = esc("../../../../../../../../../../../../tmp/");
    let c = |name, path, body, expect| Case {
        name,
        path,
        body,
        expect,
    };
    use Expect::*;
    let mut v = vec![
        c(
            "dotdot",
            "/h/a",
            tar(&[file(&esc("../"), b"x")]),
            Fails("'..' components are not allowed"),
        ),
        c(
            "deep dotdot to /tmp",
            "/h/a",
            tar(&[file(&deep, b"x")]),
            Fails("'..' components are not allowed"),
        ),
        c(
            "inner dotdot",
            "/h/a",
            tar(&[file(&esc("a/b/../../../"), b"x")]),
            Fails("'..' components are not allowed"),
        ),
        c(
            "dot then dotdot",
            "/h/a",
            tar(&[file(&esc("./../"), b"x")]),
            Fails("'..' components are not allowed"),
        ),
        c(
            "absolute",
            "/h/a",
            tar(&[file(&esc("/tmp/"), b"x")]),
            Fails("absolute paths are not allowed"),
        ),
        c(
            "double slash absolute",
            "/h/a",
            tar(&[file(&esc("//tmp/"), b"x")]),
            Fails("absolute paths are not allowed"),
        ),
        c(
            "PAX path with dotdot",
            "/h/a",
            tar(&[pax(&[("path", deep.as_bytes())]), file("innocent", b"x")]),
            Fails("'..' components are not allowed"),
        ),
        c(
            "GNU long name with dotdot",
            "/h/a",
            tar(&[
                entry(
                    b"././@LongLink",
                    b'L',
                    format!("{}/{}\0", "a".repeat(120), deep).as_bytes(),
                    b"",
                ),
                file("short", b"x"),
            ]),
            Fails("'..' components are not allowed"),
        ),
        c(
            "file through an absolute symlink",
            "/h/a",
            tar(&[
                entry(b"link", b'2', b"", b"/tmp"),
                file(&esc("link/"), b"x"),
            ]),
            Fails("would be placed through 'link'"),
        ),
        c(
            "file through a climbing symlink",
            "/h/a",
            tar(&[
                entry(b"up", b'2', b"", b"../../../../../../../../tmp"),
                file(&esc("up/"), b"x"),
            ]),
            Fails("would be placed through 'up'"),
        ),
        c(
            "directory through a symlink",
            "/h/a",
            tar(&[entry(b"l", b'2', b"", b"/"), dir("l/tmp")]),
            Fails("would be placed through 'l'"),
        ),
        c(
            "hardlink to an absolute path",
            "/h/a",
            tar(&[entry(b"h", b'1', b"", b"/etc/passwd")]),
            Fails("hard link target"),
        ),
        c(
            "hardlink climbing out",
            "/h/a",
            tar(&[entry(b"h", b'1', b"", b"../../../../etc/passwd")]),
            Fails("entry 'h'"),
        ),
        c(
            "hardlink to a later entry",
            "/h/a",
            tar(&[entry(b"h", b'1', b"", b"later"), file("later", b"x")]),
            Fails("hard link target 'later' is not an earlier regular file"),
        ),
        c(
            "hardlink to a directory",
            "/h/a",
            tar(&[dir("d"), entry(b"h", b'1', b"", b"d")]),
            Fails("hard link target 'd' is not an earlier regular file"),
        ),
        c(
            "PAX linkpath escaping a hardlink",
            "/h/a",
            tar(&[
                file("ok", b"x"),
                pax(&[("linkpath", b"/etc/shadow")]),
                entry(b"h", b'1', b"", b"ok"),
            ]),
            Fails("hard link target"),
        ),
        c(
            "character device",
            "/h/a",
            tar(&[entry(b"tty", b'3', b"", b"")]),
            Fails("character device entries are not allowed"),
        ),
        c(
            "block device",
            "/h/a",
            tar(&[entry(b"sda", b'4', b"", b"")]),
            Fails("block device entries are not allowed"),
        ),
        c(
            "FIFO",
            "/h/a",
            tar(&[entry(b"pipe", b'6', b"", b"")]),
            Fails("FIFO entries are not allowed"),
        ),
        c(
            "duplicate path",
            "/h/a",
            tar(&[file("a", b"1"), file("a", b"2")]),
            Fails("appears more than once"),
        ),
        c(
            "duplicate after normalisation",
            "/h/a",
            tar(&[file("a/b", b"1"), file("./a//b", b"2")]),
            Fails("appears more than once"),
        ),
        c(
            "file then a child of it",
            "/h/a",
            tar(&[file("f", b"1"), file("f/child", b"2")]),
            Fails("would be placed through 'f'"),
        ),
        c(
            "children then a file over them",
            "/h/a",
            tar(&[file("d/x", b"1"), file("d", b"2")]),
            Fails("is not a directory but earlier entries lie inside it"),
        ),
        c(
            "size larger than the data",
            "/h/a",
            {
                let mut v = header(b"liar", b'0', 1 << 20, b"");
                v.extend_from_slice(&[7u8; 1000]);
                v
            },
            Fails("reading archive"),
        ),
        c(
            "truncated in a header",
            "/h/a",
            {
                let mut v = file("first", b"1");
                v.extend_from_slice(&header(b"second", b'0', 1, b"")[..300]);
                v
            },
            Fails("reading archive"),
        ),
        c(
            "truncated in a body's padding",
            "/h/a",
            {
                // One byte of body, then 100 of its 511 padding bytes: the end comes while the
                // reader skips to the next header.
                let mut v = file("first", b"1");
                v.truncate(512 + 1 + 100);
                v
            },
            Fails("end of the archive stream while skipping"),
        ),
        c(
            "truncated gzip",
            "/h/a",
            {
                let g = gz(&tar(&[file("big", &pseudo_random(200_000, 3))]));
                g[..g.len() / 2].to_vec()
            },
            Fails("incomplete deflate stream"),
        ),
        c(
            "gzip bomb",
            "/h/a",
            {
                // 1 GiB of zeros in one file: about 1 MB compressed, four times the limit.
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
                e.write_all(&header(b"bomb", b'0', 1 << 30, b"")).unwrap();
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..1024 {
                    e.write_all(&zeros).unwrap();
                }
                e.write_all(&[0u8; 1024]).unwrap();
                e.finish().unwrap()
            },
            Fails("exceeds the per-entry limit"),
        ),
        c(
            "non-UTF-8 name",
            "/h/a",
            tar(&[entry(b"bad\xff\xfename", b'0', b"x", b"")]),
            Fails("name is not valid UTF-8"),
        ),
        c(
            "overlong component",
            "/h/a",
            tar(&[
                pax(&[("path", "c".repeat(300).as_bytes())]),
                file("x", b"1"),
            ]),
            Fails("longer than 255 bytes"),
        ),
        c(
            "overlong path",
            "/h/a",
            tar(&[
                pax(&[("path", vec!["d".repeat(200); 25].join("/").as_bytes())]),
                file("x", b"1"),
            ]),
            Fails("the path longer than 4096"),
        ),
        c(
            "NUL in a symlink target",
            "/h/a",
            tar(&[pax(&[("linkpath", b"a\0b")]), entry(b"s", b'2', b"", b"x")]),
            Fails("NUL byte"),
        ),
        c(
            "bogus PAX record length",
            "/h/a",
            {
                let mut x = header(b"./PaxHeaders/x", b'x', 20, b"");
                x.extend_from_slice(b"999 path=abc\n");
                pad(&mut x);
                tar(&[x, file("y", b"1")])
            },
            Fails("entry 'y': malformed PAX extended header"),
        ),
        c(
            "PAX size lying upwards",
            "/h/a",
            tar(&[pax(&[("size", b"99999999999999")]), file("z", b"1")]),
            Fails("entry 'z'"),
        ),
        c(
            "header checksum wrong",
            "/h/a",
            {
                let mut t = tar(&[file("cs", b"1")]);
                t[148] = b'7';
                t
            },
            Fails("reading archive"),
        ),
        c(
            "not a tar at all",
            "/h/a",
            pseudo_random(10_000, 99),
            Fails("reading archive"),
        ),
        c("empty body", "/h/a", Vec::new(), Refused(400)),
        c(
            "GNU sparse file (legitimate: holes read as zeros)",
            "/h/sparse",
            tar(&[gnu({
                let mut h = entry(b"sparse", b'S', b"", b"");
                h[483..495].copy_from_slice(b"00000000000\0");
                h
            })]),
            Publishes("/h/sparse/sparse"),
        ),
        c(
            "sparse bomb: 1 byte stored, 2 GiB claimed",
            "/h/a",
            {
                let mut h = header(b"sbomb", b'S', 1, b"");
                // One map entry: 1 byte at offset 2 GiB - 1; real size 2 GiB.
                h[386..398].copy_from_slice(format!("{:011o}\0", (2u64 << 30) - 1).as_bytes());
                h[398..410].copy_from_slice(b"00000000001\0");
                h[483..495].copy_from_slice(format!("{:011o}\0", 2u64 << 30).as_bytes());
                let mut v = gnu(h);
                v.push(b'x');
                pad(&mut v);
                tar(&[v])
            },
            Fails("exceeds the per-entry limit"),
        ),
        c(
            "catalog marker as a directory",
            "/h/a",
            tar(&[dir("sub/.cvmfscatalog")]),
            Fails("'.cvmfscatalog' must be a regular file"),
        ),
        c(
            "reserved .cvmfs at the root",
            "/",
            tar(&[file(".cvmfs/x", b"1")]),
            Fails("the name is reserved by CVMFS"),
        ),
        c(
            "empty symlink target",
            "/h/a",
            tar(&[entry(b"s", b'2', b"", b"")]),
            Fails("symlink with empty target"),
        ),
        c(
            "backslashes are plain name bytes",
            "/h/backslash",
            tar(&[file("..\\..\\name", b"kept inside")]),
            Publishes("/h/backslash/..\\..\\name"),
        ),
        c(
            "symlink pointing out (kept as a link, never followed)",
            "/h/links",
            tar(&[entry(b"out", b'2', b"", b"../../../../etc/passwd")]),
            Publishes("/h/links/out"),
        ),
    ];
    if big {
        let mut t = Vec::with_capacity(200_000 * 512 + 1024);
        for i in 0..200_000u32 {
            t.extend_from_slice(&header(format!("f/{i:06}").as_bytes(), b'0', 0, b""));
        }
        t.extend_from_slice(&[0u8; 1024]);
        v.push(c(
            "200k empty files",
            "/h/many",
            gz(&t),
            Publishes("/h/many/f/199999"),
        ));
    }
    v
}

/// Every file under `root` that is not in one of the allowed top-level places.
fn strays(root: &Path, allowed: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let top = rel.split('/').next().unwrap_or("").to_string();
            if allowed.iter().any(|a| top == *a || top.starts_with(a)) {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            } else {
                out.push(rel);
            }
        }
    }
    out
}

fn run_corpus(d: &Daemon, cases: &[Case], mode: &str) -> (usize, usize, usize) {
    let (mut refused, mut failed, mut published) = (0, 0, 0);
    let mut wrong = Vec::new();
    for case in cases {
        let r = d.submit_raw(ADMIN, case.path, &case.body, None);
        let status = r.status().as_u16();
        let outcome = if status == 202 {
            let id = r.json::<serde_json::Value>().unwrap()["job_id"]
                .as_str()
                .unwrap()
                .to_string();
            d.wait_terminal(&id, 300)
        } else {
            serde_json::json!({"status": status, "body": r.text().unwrap_or_default()})
        };
        let state = outcome["state"].as_str().unwrap_or("");
        let msg = outcome["error"]["message"].as_str().unwrap_or("");
        let right = match &case.expect {
            Expect::Refused(want) => status == *want,
            Expect::Fails(m) => state == "failed" && msg.contains(m),
            Expect::Publishes(_) => state == "published",
        };
        if !right {
            wrong.push(format!("{}: {outcome}", case.name));
        }
        match (&case.expect, right) {
            (Expect::Refused(_), true) => refused += 1,
            (Expect::Fails(_), true) => failed += 1,
            (Expect::Publishes(_), true) => published += 1,
            _ => {}
        }
        // Still healthy after each.
        let h: serde_json::Value = client()
            .get(format!("{}/api/v1/health", d.url))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(h["status"], "ok", "{mode}: after {}: {h}", case.name);
    }
    assert!(
        wrong.is_empty(),
        "{mode}: unexpected outcomes:\n{}",
        wrong.join("\n")
    );
    (refused, failed, published)
}

fn limits() -> &'static str {
    "  limits:\n    max_entry_size: 256MiB\n    max_total_size: 512MiB\n    max_entries: 250000\n"
}

#[test]
fn hostile_archives_are_refused_and_nothing_escapes() {
    let token = uuid::Uuid::new_v4().simple().to_string();
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), limits(), "");
    let d = Daemon::start(dir.path(), &[]);
    let cases = corpus(&token, true);
    let (refused, failed, published) = run_corpus(&d, &cases, "standalone");
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    for c in &cases {
        if let Expect::Publishes(p) = c.expect {
            repo.lookup(p)
                .unwrap_or_else(|e| panic!("{}: {p} not readable: {e:?}", c.name));
        }
    }
    assert!(
        repo.lookup("/h/a").is_err(),
        "a refused archive left a trace"
    );
    let link = repo.lookup("/h/links/out").unwrap();
    assert_eq!(link.symlink.as_deref(), Some("../../../../etc/passwd"));
    drop(repo);
    let stray = strays(
        dir.path(),
        &[
            "spool",
            "storage",
            "keys",
            "config.yaml",
            "daemon-",
            "cache",
            "scoped",
        ],
    );
    assert!(
        stray.is_empty(),
        "files outside spool, storage and keys: {stray:?}"
    );
    let escaped = std::path::Path::new("/tmp").join(format!("prepub-escape-{token}"));
    assert!(!escaped.exists());
    // The spool keeps nothing of the finished jobs but their records.
    let leftovers = incoming_left(&dir.path().join("spool"));
    assert!(leftovers.is_empty(), "{leftovers:?}");
    println!(
        "hostile archives (standalone): {} tried, {refused} refused at submission, {failed} failed with the expected reason, {published} published as expected, 0 escapes",
        cases.len()
    );
}

#[test]
fn hostile_archives_in_local_mode_extract_nothing_outside_the_target() {
    // Local mode unpacks into the mounted repository: the escape checks bite here.
    let token = uuid::Uuid::new_v4().simple().to_string();
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), limits(), "");
    let (state, mount) = (dir.path().join("double-state"), dir.path().join("cvmfs"));
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&mount).unwrap();
    let cfg = dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "  log_format: text\n",
        &format!(
            "  log_format: text\n  publish_mode: local\n  cvmfs_mount: {}\n",
            mount.display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let path = format!(
        "{}:{}",
        fixtures.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let d = Daemon::start(
        dir.path(),
        &[
            ("PATH", path.as_str()),
            ("CVMFS_DOUBLE_DIR", state.to_str().unwrap()),
            ("CVMFS_DOUBLE_MOUNT", mount.to_str().unwrap()),
        ],
    );
    let cases = corpus(&token, false);
    let (refused, failed, published) = run_corpus(&d, &cases, "local");
    let root = state.join("published").join(REPO);
    for c in &cases {
        if let Expect::Publishes(p) = c.expect {
            let f = root.join(p.trim_start_matches('/'));
            assert!(
                std::fs::symlink_metadata(&f).is_ok(),
                "{}: {} not published",
                c.name,
                f.display()
            );
        }
    }
    // The link is a link, pointing where the archive said, and nothing was written through it.
    let link = root.join("h/links/out");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("../../../../etc/passwd")
    );
    assert!(!root.join("h/a").exists(), "a refused archive left a trace");
    let stray = strays(
        dir.path(),
        &[
            "spool",
            "storage",
            "keys",
            "config.yaml",
            "daemon-",
            "cvmfs",
            "double-state",
        ],
    );
    assert!(
        stray.is_empty(),
        "files outside the spool, storage, keys and mount: {stray:?}"
    );
    for p in [
        format!("/tmp/prepub-escape-{token}"),
        format!("{}/prepub-escape-{token}", mount.display()),
        format!("{}/prepub-escape-{token}", dir.path().display()),
    ] {
        assert!(!Path::new(&p).exists(), "{p} was written");
    }
    println!(
        "hostile archives (local mode): {} tried, {refused} refused at submission, {failed} failed with the expected reason, {published} published as expected, 0 escapes",
        cases.len()
    );
}
