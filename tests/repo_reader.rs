//! Builds a repository with `repo init` + `repo ingest`, serves it on 127.0.0.1 and reads it back
//! with the independent `cvmfs` crate, comparing every path with the source. Then publishes a
//! second revision (add, replace, remove under a sub-path) and reads both revisions.

mod common;

use common::*;
use cvmfs::fetcher::Fetcher;
use cvmfs::repository::Repository;
use prepub_core::cas::Cas;
use std::io::Read;

fn tree_v1() -> Vec<Spec> {
    vec![
        Spec::Dir("./", 0o755),
        Spec::Dir("pkg", 0o755),
        Spec::Dir("pkg/bin", 0o755),
        Spec::File {
            path: "pkg/bin/tool",
            mode: 0o4755,
            data: b"#!/bin/sh\necho hello\n".to_vec(),
            xattrs: vec![("user.origin", "builder")],
        },
        Spec::Hardlink("pkg/bin/tool2", "pkg/bin/tool"),
        Spec::Symlink("pkg/bin/rel", "../lib/libfive.so"),
        Spec::Symlink("pkg/abs", "/cvmfs/other.example.org/x"),
        Spec::File {
            path: "pkg/empty.txt",
            mode: 0o644,
            data: vec![],
            xattrs: vec![],
        },
        Spec::Dir("pkg/share/empty", 0o700),
        Spec::Dir("pkg/lib", 0o755),
        Spec::File {
            path: "pkg/lib/.cvmfscatalog",
            mode: 0o644,
            data: vec![],
            xattrs: vec![],
        },
        Spec::File {
            path: "pkg/lib/libfive.so",
            mode: 0o755,
            data: pseudo_random(5 << 20, 5),
            xattrs: vec![],
        },
        Spec::File {
            path: "pkg/data/forty.bin",
            mode: 0o644,
            data: pseudo_random(40 << 20, 40),
            xattrs: vec![],
        },
    ]
}

fn tree_v2_bin() -> Vec<Spec> {
    vec![
        Spec::File {
            path: "tool",
            mode: 0o755,
            data: b"#!/bin/sh\necho v2\n".to_vec(),
            xattrs: vec![],
        },
        Spec::File {
            path: "newfile",
            mode: 0o640,
            data: pseudo_random(1000, 9),
            xattrs: vec![],
        },
    ]
}

#[test]
fn independent_reader_reads_both_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let st = storage.to_str().unwrap();
    repo_init(st, "test.example.org");
    assert!(dir
        .path()
        .join("storage.keys/test.example.org.masterkey")
        .is_file());
    assert!(!storage.join("test.example.org.key").exists());

    let v1 = tree_v1();
    let tar1 = dir.path().join("v1.tar");
    write_tar(&v1, &tar1);
    ok(&[
        "repo",
        "ingest",
        tar1.to_str().unwrap(),
        "--repo-dir",
        st,
        "--path",
        "/sw/1.0",
        "--tag",
        "v1",
    ]);
    ok(&["repo", "check", "--repo-dir", st]);

    let url = serve(storage.clone());
    let cache = dir.path().join("cache");
    let open = || {
        let f = Fetcher::new(&url, cache.to_str().unwrap(), true).unwrap();
        Repository::new(f).unwrap()
    };
    let repo = open();
    assert_eq!(repo.fqrn, "test.example.org");
    assert_eq!(repo.get_revision_number().unwrap(), 2);
    verify(&repo, "/sw/1.0", &v1);
    let top: Vec<String> = repo
        .list_directory("/")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(top, vec!["sw".to_string()]);
    let stats = repo.get_statistics().unwrap();
    let _ = stats;
    // xattrs and the setuid bit as stored (the crate does not expose xattrs, so read our catalog).
    let cas = prepub_core::cas::LocalCas::open(&storage).unwrap();
    let tool =
        prepub_core::repo::with_current_tree(&cas, |t| Ok(t.lookup("/sw/1.0/pkg/bin/tool")?))
            .unwrap()
            .unwrap();
    let x = tool.xattrs.expect("xattrs recorded");
    assert_eq!(
        x.0.get(&b"user.origin"[..]).map(|v| v.as_slice()),
        Some(&b"builder"[..])
    );
    assert_eq!(tool.mode & 0o7777, 0o4755);
    assert_eq!((tool.linkcount, tool.hardlink_group > 0), (2, true));
    // The 40 MiB file is chunked and the 5 MiB file sits in the nested catalog.
    let forty = repo
        .lookup_with_chunks("/sw/1.0/pkg/data/forty.bin")
        .unwrap();
    assert!(forty.has_chunks(), "40 MiB file should be chunked");
    assert!(
        repo.lookup("/sw/1.0/pkg/lib")
            .unwrap()
            .is_nested_catalog_mountpoint()
            || repo
                .lookup("/sw/1.0/pkg/lib")
                .unwrap()
                .is_nested_catalog_root()
    );
    drop(repo);

    // Revision 3: replace /sw/1.0/pkg/bin (tool replaced, newfile added, tool2 and rel removed).
    let v2 = tree_v2_bin();
    let tar2 = dir.path().join("v2.tar");
    write_tar(&v2, &tar2);
    ingest_checked(&tar2, st, "/sw/1.0/pkg/bin");
    ok(&[
        "repo",
        "check",
        "--url",
        &url,
        "--master-pub",
        dir.path()
            .join("storage.keys/test.example.org.pub")
            .to_str()
            .unwrap(),
    ]);

    let _ = std::fs::remove_dir_all(&cache);
    let repo = open();
    assert_eq!(repo.get_revision_number().unwrap(), 3);
    verify(&repo, "/sw/1.0/pkg/bin", &v2);
    assert!(
        repo.lookup("/sw/1.0/pkg/bin/tool2").is_err(),
        "tool2 should be gone"
    );
    assert!(
        repo.lookup("/sw/1.0/pkg/bin/rel").is_err(),
        "rel should be gone"
    );
    // Untouched parts are unchanged.
    let unchanged: Vec<Spec> = v1
        .iter()
        .filter(|s| !matches!(s, Spec::File { path, .. } if path.starts_with("pkg/bin")))
        .filter(|s| !matches!(s, Spec::Hardlink(..) | Spec::Symlink("pkg/bin/rel", _)))
        .cloned()
        .collect();
    verify(&repo, "/sw/1.0", &unchanged);

    // Revision 2 is still intact: its root catalog is reachable through the history. (A fresh
    // reader: the crate caches path-to-catalog lookups across tag switches.)
    drop(repo);
    let mut repo = open();
    repo.set_current_tag(2).unwrap();
    assert_eq!(repo.get_revision_number().unwrap(), 2);
    verify(&repo, "/sw/1.0", &v1);
}

/// A catalog of more than one libdeflate part (16,000 entries, over 2 MiB uncompressed): the
/// parts, compressed at once and joined into one zlib stream, are read by the independent
/// reader's own inflate — every directory listed whole, every 97th file read back.
#[test]
fn independent_reader_reads_a_catalog_compressed_in_parts() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let st = storage.to_str().unwrap();
    repo_init(st, "test.example.org");
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let mut specs = vec![Spec::Dir("./", 0o755)];
    for d in 0..40 {
        specs.push(Spec::Dir(leak(format!("d{d:02}")), 0o755));
        for f in 0..400 {
            specs.push(Spec::File {
                path: leak(format!("d{d:02}/file-with-a-longer-name-{f:04}.py")),
                mode: 0o644,
                data: format!("# {d} {f}\n").into_bytes(),
                xattrs: vec![],
            });
        }
    }
    let tar = dir.path().join("many.tar");
    write_tar(&specs, &tar);
    ingest_checked(&tar, st, "/many");
    // The catalog holding the files is over one part.
    let cas = prepub_core::cas::LocalCas::open(&storage).unwrap();
    let largest = cas
        .list()
        .unwrap()
        .into_iter()
        .filter(|o| o.suffix == prepub_core::hash::Suffix::Catalog)
        .map(|o| {
            let mut raw = Vec::new();
            let f = cas.get(&o).unwrap();
            flate2::read::ZlibDecoder::new(f)
                .read_to_end(&mut raw)
                .unwrap();
            raw.len()
        })
        .max()
        .unwrap();
    assert!(largest > prepub_core::pzlib::PART, "{largest}");

    let url = serve(storage.clone());
    let repo = open_reader(&url, &dir.path().join("cache"));
    for d in 0..40 {
        let names = repo.list_directory(&format!("/many/d{d:02}")).unwrap();
        assert_eq!(names.len(), 400, "d{d:02}");
    }
    let files: Vec<Spec> = specs
        .into_iter()
        .filter(|s| !matches!(s, Spec::File { .. }))
        .chain((0..16_000).step_by(97).map(|i| Spec::File {
            path: leak(format!(
                "d{:02}/file-with-a-longer-name-{:04}.py",
                i / 400,
                i % 400
            )),
            mode: 0o644,
            data: format!("# {} {}\n", i / 400, i % 400).into_bytes(),
            xattrs: vec![],
        }))
        .collect();
    verify(&repo, "/many", &files);
}
