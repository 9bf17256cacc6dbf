//! Byte identity with stock zlib: object names from our streaming encoder must equal
//! SHA-1(zlib.compress(data, level)) as computed by Python (tests/data/zlib_vectors.txt, made by
//! scripts/make-zlib-vectors.sh). If these drift, deduplication against repositories written by
//! `cvmfs_server` breaks.

use prepub_core::cas::LocalCas;
use prepub_core::chunker::ChunkParams;
use prepub_core::object::{encode_file, Compression, EncodeParams, FileContent};

/// Feeds the encoder through a reader that returns odd-sized pieces, to prove that streaming
/// does not change the output.
struct Dribble<'a>(&'a [u8], usize);
impl std::io::Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.len().min(buf.len()).min(self.1);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        self.1 = if self.1 > 7000 { 13 } else { self.1 * 3 + 1 };
        Ok(n)
    }
}

#[test]
fn object_names_match_python_zlib() {
    let vectors = include_str!("data/zlib_vectors.txt");
    let dir = tempfile::tempdir().unwrap();
    let cas = LocalCas::create(dir.path()).unwrap().without_fsync();
    let mut n_checked = 0;
    for line in vectors.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (n, level, want): (usize, u32, &str) =
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2]);
        let data: Vec<u8> = (0..n).map(|i| ((i * 7 + i / 251) % 256) as u8).collect();
        let params = EncodeParams {
            chunking: ChunkParams::disabled(),
            compression: Compression::Zlib(level),
        };
        let enc = encode_file(Dribble(&data, 1), &params, &cas).unwrap();
        let FileContent::Whole(id) = enc.content else {
            panic!("unexpected chunks")
        };
        assert_eq!(id.digest.hex(), want, "length {n} level {level}");
        // The in-memory encoder of the pipeline, whose deflate state is reused from one object
        // to the next (vectors of different levels and sizes follow each other here).
        let whole = prepub_core::object::zlib_compress(&data, level);
        assert_eq!(
            prepub_core::hash::Digest20::of(&whole).hex(),
            want,
            "in memory: length {n} level {level}"
        );
        n_checked += 1;
    }
    assert_eq!(n_checked, 18);
}
