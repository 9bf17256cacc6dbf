//! The raw-content index through the daemon: content published before is not compressed again
//! (the repeat publish reports every object as already stored, and its files read back whole);
//! an object deleted from the storage behind the index's back is stored again, never named
//! missing; with `pipeline.raw_index: false` there is no index.

mod common;

use common::*;
use prepub_core::cas::Cas;

const SMALL: &[u8] = b"from .a import f0\n";

fn tree() -> Vec<Spec> {
    let mut v = vec![Spec::Dir("lib", 0o755)];
    let names: Vec<&'static str> = vec!["lib/a.py", "lib/b.py", "lib/c.py", "lib/d.py"];
    for (i, n) in names.into_iter().enumerate() {
        v.push(Spec::File {
            path: n,
            mode: 0o644,
            data: format!("def f{i}():\n    return {i}\n")
                .repeat(200 + i)
                .into_bytes(),
            xattrs: vec![],
        });
    }
    // Under 512 bytes: remembered in memory only, never written to the index.
    v.push(Spec::File {
        path: "lib/__init__.py",
        mode: 0o644,
        data: SMALL.to_vec(),
        xattrs: vec![],
    });
    v.push(Spec::File {
        path: "lib/big.bin",
        mode: 0o644,
        // Large enough to be chunked: the chunks go through the index too.
        data: pseudo_random(40 << 20, 11),
        xattrs: vec![],
    });
    v
}

#[test]
fn repeated_content_skips_compression_and_missing_objects_are_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "", "");
    let d = Daemon::start(dir.path(), &[]);
    let t = tar_bytes(&tree());
    let first = d.wait_terminal(&d.submit_id(ADMIN, "/sw/one", &t, None), 120);
    assert_eq!(first["state"], "published", "{first}");
    assert!(
        first["progress"]["objects_new"].as_u64().unwrap() >= 5,
        "{first}"
    );
    let index = dir.path().join("spool/rawindex").join(format!("{REPO}.db"));
    assert!(index.is_file());

    // The same content elsewhere: every object is known, none is compressed or stored again.
    let second = d.wait_terminal(&d.submit_id(ADMIN, "/sw/two", &t, None), 120);
    assert_eq!(second["state"], "published", "{second}");
    assert_eq!(second["progress"]["objects_new"], 0, "{second}");
    assert_eq!(second["progress"]["bytes_compressed"], 0, "{second}");
    assert_eq!(
        second["progress"]["objects_dedup"],
        first["progress"]["objects_new"].as_u64().unwrap()
            + first["progress"]["objects_dedup"].as_u64().unwrap(),
        "{second}"
    );

    // The index written (in the background, as each job ends) has a row for every content
    // but the small one's.
    let rows = |cond: &str| -> i64 {
        let c = rusqlite::Connection::open(&index).unwrap();
        c.query_row(&format!("SELECT COUNT(*) FROM raw WHERE {cond}"), [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    // The four .py files and the big file's chunks.
    let large = first["progress"]["objects_new"].as_u64().unwrap() as i64 - 1;
    assert!(eventually(30, || rows("1") == large), "{}", rows("1"));
    assert_eq!(rows(&format!("len = {}", SMALL.len())), 0);
    let cas = prepub_core::cas::LocalCas::open(&d.storage).unwrap();
    assert!(cas.exists(&object_of_small_file(SMALL)).unwrap());

    // An object disappears behind the index's back (as garbage collection would delete it):
    // the next publish of that content stores it again.
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    std::io::Write::write_all(&mut enc, "def f0():\n    return 0\n".repeat(200).as_bytes())
        .unwrap();
    let a_py = prepub_core::hash::ObjectId::new(
        prepub_core::hash::Digest20::of(&enc.finish().unwrap()),
        prepub_core::hash::Suffix::None,
    );
    assert!(cas.exists(&a_py).unwrap());
    cas.delete(&a_py).unwrap();
    let third = d.wait_terminal(&d.submit_id(ADMIN, "/sw/three", &t, None), 120);
    assert_eq!(third["state"], "published", "{third}");
    assert_eq!(third["progress"]["objects_new"], 1, "{third}");
    assert!(cas.exists(&a_py).unwrap());
    ok(&["repo", "check", "--repo-dir", d.storage.to_str().unwrap()]);
    let url = serve(d.storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    for p in ["/sw/one", "/sw/two", "/sw/three"] {
        verify(&repo, p, &tree());
    }
}

#[test]
fn the_index_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    prepare_daemon_dir(dir.path(), "  raw_index: false\n", "");
    let d = Daemon::start(dir.path(), &[]);
    let j = d.wait_terminal(&d.submit_id(ADMIN, "/sw/x", &tar_bytes(&tree()), None), 120);
    assert_eq!(j["state"], "published", "{j}");
    assert!(!dir.path().join("spool/rawindex").exists());
}
