//! Single-core encoder throughput against raw stock-zlib level 6 on the same bytes, in the same
//! run. The encoder adds chunk detection, SHA-1 and the CAS write path to what zlib does; the goal
//! is an encoder/raw ratio of at least 0.95. Run with `cargo bench --bench encoder`.

use std::io::{Read, Write};
use std::time::Instant;

use prepub_core::cas::{Cas, CasError, LocalCas, PendingObject, PutOutcome};
use prepub_core::chunker::ChunkParams;
use prepub_core::hash::ObjectId;
use prepub_core::object::{encode_file, Compression, EncodeParams};

/// A CAS that discards bytes, to measure the encoder alone.
struct NullCas;
struct NullPending;
impl Write for NullPending {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl PendingObject for NullPending {
    fn commit(self: Box<Self>, _: &ObjectId) -> Result<PutOutcome, CasError> {
        Ok(PutOutcome::Stored)
    }
}
impl Cas for NullCas {
    fn exists(&self, _: &ObjectId) -> Result<bool, CasError> {
        Ok(false)
    }
    fn put_bytes(&self, _: &ObjectId, _: &[u8]) -> Result<PutOutcome, CasError> {
        Ok(PutOutcome::Stored)
    }
    fn begin(&self) -> Result<Box<dyn PendingObject>, CasError> {
        Ok(Box::new(NullPending))
    }
    fn get(&self, id: &ObjectId) -> Result<Box<dyn Read + Send>, CasError> {
        Err(CasError::NotFound(id.to_string()))
    }
    fn size(&self, id: &ObjectId) -> Result<u64, CasError> {
        Err(CasError::NotFound(id.to_string()))
    }
    fn list(&self) -> Result<Vec<ObjectId>, CasError> {
        Ok(vec![])
    }
    fn put_root_file(&self, _: &str, _: &[u8]) -> Result<(), CasError> {
        Ok(())
    }
    fn get_root_file(&self, _: &str) -> Result<Option<Vec<u8>>, CasError> {
        Ok(None)
    }
    fn describe(&self) -> String {
        "null".into()
    }
}

/// Software-like bytes: text with repetition plus incompressible stretches (~2.5:1 with zlib).
fn corpus(n: usize) -> Vec<u8> {
    let words = [
        "static ",
        "inline ",
        "return ",
        "struct ",
        "void ",
        "int ",
        "(x, y)",
        "{\n",
        "}\n",
        "const ",
        "char *",
        "for (i = 0; i < n; ++i) ",
        "if (",
        ") ",
        "= ",
        "+ ",
        "->next",
        "NULL",
        "0x7fff",
        ";\n",
    ];
    let mut v = Vec::with_capacity(n);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(16) {
            v.extend_from_slice(&x.to_le_bytes());
            v.extend_from_slice(&x.rotate_left(17).to_le_bytes());
        } else {
            v.extend_from_slice(words[(x >> 32) as usize % words.len()].as_bytes());
        }
    }
    v.truncate(n);
    v
}

fn best_of<F: FnMut() -> usize>(runs: usize, mut f: F) -> (f64, usize) {
    let mut best = f64::MAX;
    let mut out = 0;
    for _ in 0..runs {
        let t = Instant::now();
        out = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, out)
}

fn main() {
    let size = 128 << 20;
    let data = corpus(size);
    let mb = size as f64 / (1 << 20) as f64;

    let (raw_t, raw_len) = best_of(3, || {
        let mut z = flate2::write::ZlibEncoder::new(
            Vec::with_capacity(size / 2),
            flate2::Compression::new(6),
        );
        z.write_all(&data).unwrap();
        z.finish().unwrap().len()
    });
    let params = EncodeParams {
        chunking: ChunkParams::default(),
        compression: Compression::Zlib(6),
    };
    let (enc_t, _) = best_of(3, || {
        let e = encode_file(&data[..], &params, &NullCas).unwrap();
        e.size as usize
    });
    let dir = tempfile::tempdir().unwrap();
    let cas = LocalCas::create(dir.path()).unwrap();
    let mut n = 0;
    let (disk_t, _) = best_of(3, || {
        // A fresh storage each run so every object is really written (and fsynced).
        n += 1;
        let sub = dir.path().join(format!("r{n}"));
        let cas = LocalCas::create(&sub).unwrap();
        encode_file(&data[..], &params, &cas).unwrap().size as usize
    });
    drop(cas);
    println!(
        "input: {mb:.0} MiB software-like bytes, zlib ratio {:.2}",
        size as f64 / raw_len as f64
    );
    println!(
        "raw stock zlib level 6 (one core):      {:8.1} MiB/s",
        mb / raw_t
    );
    println!(
        "encoder: chunk+zlib+SHA-1, null sink:    {:8.1} MiB/s  ratio to raw zlib {:.3}",
        mb / enc_t,
        raw_t / enc_t
    );
    println!(
        "encoder into local CAS (fsync):         {:8.1} MiB/s  ratio to raw zlib {:.3}",
        mb / disk_t,
        raw_t / disk_t
    );
}
