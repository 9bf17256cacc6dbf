//! Tar intake (plain or gzip) with every hostile-input rule: any input either gives a change
//! set or an `IntakeError`, never a panic, and stays within the limits. The same input read as
//! an upload is (in pieces, file bodies that one piece holds taken without a copy, encoded on
//! a pipeline) must give the same outcome: the same change set, or an error too.
#![no_main]

use std::collections::VecDeque;
use std::io::{self, BufRead, Read};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prepub_core::cas::{Cas, LocalCas};
use prepub_core::intake::{read_tar, read_tar_streamed, Input, IntakeLimits};
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

/// The input in pieces, like an upload's; a body one piece holds whole is handed over shared.
struct Pieces(VecDeque<Bytes>);

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let held = self.fill_buf()?;
        let n = held.len().min(buf.len());
        buf[..n].copy_from_slice(&held[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Pieces {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.0.front().is_some_and(|p| p.is_empty()) {
            self.0.pop_front();
        }
        Ok(self.0.front().map_or(&[][..], |p| &p[..]))
    }
    fn consume(&mut self, n: usize) {
        if let Some(p) = self.0.front_mut() {
            let _ = p.split_to(n);
        }
    }
}

impl Input for Pieces {
    fn take_shared(&mut self, n: usize) -> io::Result<Option<Bytes>> {
        self.fill_buf()?;
        Ok(self
            .0
            .front_mut()
            .filter(|p| p.len() >= n)
            .map(|p| p.split_to(n)))
    }
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
    let (_, store) = cas();
    let copied = read_tar(data, top, &params, &limits, store.as_ref(), 0);
    if let Ok(cs) = &copied {
        assert!(cs.stats.entries <= limits.max_entries);
    }
    // Pieces of 512 bytes to 64 KiB and a little, from the input's second byte.
    let piece = 512 * (1 + usize::from(data.get(1).copied().unwrap_or(0) % 128)) + 3;
    let input = Pieces(data.chunks(piece).map(Bytes::copy_from_slice).collect());
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
