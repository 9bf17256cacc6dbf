//! `repo check` must catch corruption: each test breaks one thing in a good repository and
//! asserts the specific finding and a non-zero exit.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use prepub_core::cas::{get_all, Cas, LocalCas};
use prepub_core::hash::{ObjectId, Suffix};
use prepub_core::keys::RepoKeys;
use prepub_core::manifest::{make_whitelist, Manifest};
use prepub_core::object::{compress_metadata, decode_to_vec};

struct Repo {
    _dir: tempfile::TempDir,
    storage: PathBuf,
    keys: RepoKeys,
}

fn good_repo() -> Repo {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let st = storage.to_str().unwrap();
    repo_init(st, "check.example.org");
    let specs = vec![
        Spec::Dir("tool", 0o755),
        Spec::File {
            path: "tool/bin",
            mode: 0o755,
            data: b"binary".to_vec(),
            xattrs: vec![],
        },
        Spec::File {
            path: "tool/big",
            mode: 0o644,
            data: pseudo_random(9 << 20, 3),
            xattrs: vec![],
        },
    ];
    let tar = dir.path().join("t.tar");
    write_tar(&specs, &tar);
    ingest_checked(&tar, st, "/x");
    let keys = RepoKeys::load(&dir.path().join("storage.keys"), "check.example.org").unwrap();
    Repo {
        _dir: dir,
        storage,
        keys,
    }
}

fn check_fails(storage: &Path, expect: &str) {
    let (success, out, err) = prepub(&["repo", "check", "--repo-dir", storage.to_str().unwrap()]);
    assert!(!success, "check should fail; output:\n{out}\n{err}");
    assert!(
        out.contains(expect),
        "expected a finding containing {expect:?}, got:\n{out}\n{err}"
    );
    assert!(err.contains("repository check failed"), "stderr: {err}");
}

fn manifest(storage: &Path) -> Manifest {
    Manifest::parse(&std::fs::read(storage.join(".cvmfspublished")).unwrap())
        .unwrap()
        .0
}

/// Rewrites the root catalog with `sql`, stores it, and re-signs a manifest pointing at it.
fn edit_root_catalog(r: &Repo, sql: &str) {
    let cas = LocalCas::open(&r.storage).unwrap();
    let mut m = manifest(&r.storage);
    let bytes = decode_to_vec(
        &m.root_catalog,
        &get_all(&cas, &m.root_catalog).unwrap(),
        true,
    )
    .unwrap();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &bytes).unwrap();
    {
        let c = rusqlite::Connection::open(tmp.path()).unwrap();
        c.execute_batch(sql).unwrap();
    }
    let new = std::fs::read(tmp.path()).unwrap();
    let (id, stored) = compress_metadata(&new, Suffix::Catalog);
    cas.put_bytes(&id, &stored).unwrap();
    m.root_catalog = id;
    m.root_size = new.len() as u64;
    cas.put_root_file(".cvmfspublished", &m.sign(&r.keys))
        .unwrap();
}

fn some_data_object(storage: &Path) -> PathBuf {
    let cas = LocalCas::open(storage).unwrap();
    let id = cas
        .list()
        .unwrap()
        .into_iter()
        .find(|i| i.suffix == Suffix::Partial)
        .expect("a chunk object");
    storage.join(id.path())
}

#[test]
fn catches_tampered_object() {
    let r = good_repo();
    let p = some_data_object(&r.storage);
    let mut b = std::fs::read(&p).unwrap();
    b[10] ^= 0xff;
    std::fs::write(&p, b).unwrap();
    check_fails(&r.storage, "content hash is");
}

#[test]
fn catches_missing_object() {
    let r = good_repo();
    let p = some_data_object(&r.storage);
    std::fs::remove_file(&p).unwrap();
    check_fails(&r.storage, "is missing");
}

#[test]
fn catches_wrong_counter() {
    let r = good_repo();
    edit_root_catalog(
        &r,
        "UPDATE statistics SET value = value + 1 WHERE counter = 'self_dir';",
    );
    check_fails(&r.storage, "counter self_dir is");
}

#[test]
fn catches_wrong_md5path() {
    let r = good_repo();
    edit_root_catalog(
        &r,
        "UPDATE catalog SET md5path_1 = md5path_1 + 1 WHERE name = 'bin';",
    );
    check_fails(&r.storage, "/x/tool/bin: wrong md5path");
}

#[test]
fn catches_bad_manifest_signature() {
    let r = good_repo();
    let p = r.storage.join(".cvmfspublished");
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 5] ^= 0x01;
    std::fs::write(&p, b).unwrap();
    check_fails(&r.storage, "bad manifest signature");
}

#[test]
fn catches_expired_whitelist() {
    let r = good_repo();
    let now = prepub_core::timefmt::now();
    let w = make_whitelist(&r.keys, now - 40 * 86_400, 30).unwrap();
    std::fs::write(r.storage.join(".cvmfswhitelist"), w).unwrap();
    check_fails(&r.storage, "whitelist expired at");
}

#[test]
fn catches_whitelist_signed_by_another_master_key() {
    let r = good_repo();
    let mut other = RepoKeys::generate("check.example.org", 1).unwrap();
    other.certificate_pem = r.keys.certificate_pem.clone();
    let w = make_whitelist(&other, prepub_core::timefmt::now(), 30).unwrap();
    std::fs::write(r.storage.join(".cvmfswhitelist"), w).unwrap();
    check_fails(
        &r.storage,
        "signature does not verify with the master public key",
    );
}

#[test]
fn object_names_are_verified_not_trusted() {
    // A valid object copied under the wrong name is caught too.
    let r = good_repo();
    let cas = LocalCas::open(&r.storage).unwrap();
    let ids = cas.list().unwrap();
    let chunks: Vec<&ObjectId> = ids.iter().filter(|i| i.suffix == Suffix::Partial).collect();
    assert!(chunks.len() >= 2);
    std::fs::copy(
        r.storage.join(chunks[0].path()),
        r.storage.join(chunks[1].path()),
    )
    .unwrap();
    check_fails(&r.storage, "content hash is");
}
