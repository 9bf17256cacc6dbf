//! Tar intake (plain or gzip) with every hostile-input rule: any input either gives a change
//! set or an `IntakeError`, never a panic, and stays within the limits. The same input read as
//! an upload is (in pieces through the upload's reader, file bodies that one piece holds taken
//! without a copy, encoded on a pipeline) must give the same outcome: the same change set, or an
//! error too.
#![no_main]

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prepub_core::cas::{Cas, LocalCas};
use prepub_core::growing::{FinishGuard, FollowReader, Growing};
use prepub_core::intake::{read_tar, read_tar_streamed, IntakeLimits};
use prepub_core::object::EncodeParams;
use prepub_core::pipeline::{Batcher, Pipeline};

fn cas() -> &'static (tempfile::TempDir, Arc<LocalCas>) {
    static CAS: OnceLock<(tempfile::TempDir, Arc<LocalCas>)> = OnceLock::new();
    CAS.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let c = LocalCas::create(&d.path().join("cas"))
            .unwrap()
            .without_fsync();
        (d, Arc::new(c))
    })
}

fn pipeline() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| Pipeline::new(2, 1, 8 << 20))
}

/// `data` as an upload arrives: in pieces of `piece` bytes, handed to a reader of the growing
/// spool file (which takes a body that one piece holds whole without a copy), then complete.
fn as_upload(dir: &Path, data: &[u8], piece: usize) -> FollowReader {
    let path = dir.join("upload.tar");
    let mut file = File::create(&path).unwrap();
    let growing = Growing::new();
    let reader = growing.reader(File::open(&path).unwrap());
    let writer = FinishGuard::new(growing);
    for p in data.chunks(piece) {
        writer.received(Bytes::copy_from_slice(p));
        file.write_all(p).unwrap();
    }
    writer.grew(data.len() as u64);
    writer.complete();
    reader
}

fuzz_target!(|data: &[u8]| {
    let limits = IntakeLimits {
        max_entry_size: 1 << 20,
        max_total_size: 4 << 20,
        max_entries: 10_000,
        skip_special: data.first().is_some_and(|b| b & 1 == 1),
    };
    let top = data.first().is_some_and(|b| b & 2 == 2);
    let params = EncodeParams::default();
    let store = &cas().1;
    let copied = read_tar(data, top, &params, &limits, store.as_ref(), 0);
    if let Ok(cs) = &copied {
        assert!(cs.stats.entries <= limits.max_entries);
    }
    // Pieces of 512 bytes to 64 KiB and a little, from the input's second byte.
    let piece = 512 * (1 + usize::from(data.get(1).copied().unwrap_or(0) % 128)) + 3;
    let input = as_upload(cas().0.path(), data, piece);
    let shared: Arc<dyn Cas> = store.clone();
    let streamed = read_tar_streamed(
        input,
        top,
        &params,
        &limits,
        shared,
        &Batcher::new(pipeline()),
        0,
        None,
    );
    match (&copied, &streamed) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.nodes, b.nodes);
            assert_eq!(a.stats.bytes_in, b.stats.bytes_in);
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("read whole: {a:?}\nread in pieces: {b:?}"),
    }
});
