//! Content-defined chunking with upstream's xor32 detector.
//!
//! Owns the cut-point decision only: bytes go in, cut offsets come out. The rolling value, the
//! window, the threshold and the min/avg/max rules follow upstream exactly
//! (cvmfs-formats.md §2.2, `cvmfs/ingestion/chunk_detector.{h,cc}`) so that our chunk boundaries —
//! and so our chunk object names — match what `cvmfs_server publish` produces for the same file,
//! which is what makes deduplication against existing repositories work.

/// Chunking parameters (upstream defaults 4/8/16 MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub enabled: bool,
    pub min: u64,
    pub avg: u64,
    pub max: u64,
}

/// The xor32 window: the rolling value only depends on the last 32 bytes.
const XOR32_WINDOW: u64 = 32;
/// Centre of the matching interval (`u32::MAX / 2`, upstream `kMagicNumber`).
const MAGIC: i32 = 0x7FFF_FFFF;

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            enabled: true,
            min: 4 * 1024 * 1024,
            avg: 8 * 1024 * 1024,
            max: 16 * 1024 * 1024,
        }
    }
}

impl ChunkParams {
    /// Chunking switched off: every file is one whole-file object.
    pub fn disabled() -> Self {
        ChunkParams {
            enabled: false,
            ..ChunkParams::default()
        }
    }

    /// Checks upstream's constraints `32 <= min < avg < max`.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.min < XOR32_WINDOW {
            return Err(format!("minimum chunk size {} is below 32 bytes", self.min));
        }
        if !(self.min < self.avg && self.avg < self.max) {
            return Err(format!(
                "chunk sizes must satisfy min < avg < max (got {}/{}/{})",
                self.min, self.avg, self.max
            ));
        }
        if self.avg > u64::from(u32::MAX) {
            return Err("average chunk size must fit in 32 bits".into());
        }
        Ok(())
    }
}

/// Incremental xor32 cut-point detector. Feed it the file's bytes in order, in buffers of any size.
#[derive(Debug, Clone)]
pub struct Xor32Detector {
    params: ChunkParams,
    threshold: i32,
    last_cut: u64,
    /// Absolute offset of the next byte `feed` will see.
    offset: u64,
    xor32: u32,
}

impl Xor32Detector {
    pub fn new(params: ChunkParams) -> Self {
        let threshold = (u32::MAX as u64).checked_div(params.avg).unwrap_or(0) as i32;
        Xor32Detector {
            params,
            threshold,
            last_cut: 0,
            offset: 0,
            xor32: 0,
        }
    }

    /// Looks for the next cut in `buf`, which holds the bytes at `[self.offset, self.offset+len)`.
    /// Returns `Some(i)` when the current chunk ends before `buf[i]` (the bytes before `i` belong
    /// to the current chunk, `buf[i]` starts the next); the caller then calls again with `&buf[i..]`.
    /// Returns `None` when all of `buf` belongs to the current chunk.
    pub fn find_cut(&mut self, buf: &[u8]) -> Option<usize> {
        let p = self.params;
        let begin = self.offset;
        let end = begin + buf.len() as u64;
        // Bytes before last_cut + min - 32 cannot influence the rolling value at the first
        // position where a cut is allowed, so they are skipped outright.
        let precompute_start = self.last_cut + p.min - XOR32_WINDOW;
        let precompute_end = self.last_cut + p.min;
        let hard_end = self.last_cut + p.max;
        let mut pos = begin.max(precompute_start);
        while pos < end && pos < precompute_end {
            self.xor32 = (self.xor32 << 1) ^ u32::from(buf[(pos - begin) as usize]);
            pos += 1;
        }
        let scan_end = end.min(hard_end);
        while pos < scan_end {
            self.xor32 = (self.xor32 << 1) ^ u32::from(buf[(pos - begin) as usize]);
            // Upstream computes abs((int32)x - MAGIC) with two's-complement wrap-around (x86).
            if (self.xor32 as i32).wrapping_sub(MAGIC).wrapping_abs() < self.threshold {
                return Some(self.cut_at(pos, begin));
            }
            pos += 1;
        }
        if pos == hard_end && pos <= end && hard_end > begin {
            return Some(self.cut_at(hard_end, begin));
        }
        self.offset = end;
        None
    }

    fn cut_at(&mut self, at: u64, begin: u64) -> usize {
        self.last_cut = at;
        self.xor32 = 0;
        self.offset = at;
        (at - begin) as usize
    }
}

/// Cuts an in-memory buffer into `(offset, len)` chunks (used by tests and benchmarks).
pub fn cut_all(data: &[u8], params: ChunkParams) -> Vec<(u64, u64)> {
    if !params.enabled || data.len() as u64 <= params.min {
        return vec![(0, data.len() as u64)];
    }
    let mut det = Xor32Detector::new(params);
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut rest = data;
    let mut base = 0usize;
    while let Some(i) = det.find_cut(rest) {
        let cut = base + i;
        if cut > start {
            out.push((start as u64, (cut - start) as u64));
        }
        start = cut;
        base = cut;
        rest = &data[cut..];
        if rest.is_empty() {
            break;
        }
    }
    if start < data.len() {
        out.push((start as u64, (data.len() - start) as u64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn small() -> ChunkParams {
        ChunkParams {
            enabled: true,
            min: 1024,
            avg: 2048,
            max: 4096,
        }
    }

    #[test]
    fn chunks_cover_file_and_respect_bounds() {
        let data = pseudo_random(200_000, 7);
        let chunks = cut_all(&data, small());
        assert!(
            chunks.len() > 20,
            "expected many chunks, got {}",
            chunks.len()
        );
        let mut off = 0;
        for (i, (o, l)) in chunks.iter().enumerate() {
            assert_eq!(*o, off);
            if i + 1 < chunks.len() {
                assert!(*l >= 1024 && *l <= 4096, "chunk {i} has size {l}");
            }
            off += l;
        }
        assert_eq!(off, data.len() as u64);
    }

    #[test]
    fn buffer_boundaries_do_not_change_cuts() {
        let data = pseudo_random(100_000, 99);
        let whole = cut_all(&data, small());
        for step in [1usize, 7, 31, 32, 33, 1000, 4096, 65536] {
            let mut det = Xor32Detector::new(small());
            let mut cuts = Vec::new();
            let mut pos = 0usize;
            while pos < data.len() {
                let end = (pos + step).min(data.len());
                let mut piece = &data[pos..end];
                let mut base = pos;
                while let Some(i) = det.find_cut(piece) {
                    cuts.push(base + i);
                    base += i;
                    piece = &piece[i..];
                    if piece.is_empty() {
                        break;
                    }
                }
                pos = end;
            }
            let expected: Vec<usize> = whole.iter().skip(1).map(|(o, _)| *o as usize).collect();
            assert_eq!(cuts, expected, "step {step}");
        }
    }

    /// Upstream's rule as cvmfs-formats.md §2.2 words it, one position at a time: per chunk
    /// from `last`, feed `[last+min-32, last+min)` untested, then test each position up to
    /// `last+max-1`; no match is a hard cut at `last+max`.
    fn reference_cuts(data: &[u8], p: ChunkParams) -> Vec<usize> {
        let t = (u32::MAX as u64 / p.avg) as i32;
        let (min, max) = (p.min as usize, p.max as usize);
        let mut cuts = Vec::new();
        let mut last = 0usize;
        while last + min < data.len() {
            let mut x = 0u32;
            for &b in &data[last + min - 32..last + min] {
                x = (x << 1) ^ u32::from(b);
            }
            let mut cut = None;
            for (p, &b) in data.iter().enumerate().take(last + max).skip(last + min) {
                x = (x << 1) ^ u32::from(b);
                if (x as i32).wrapping_sub(0x7FFF_FFFF).wrapping_abs() < t {
                    cut = Some(p);
                    break;
                }
            }
            match cut {
                Some(c) => last = c,
                None if last + max < data.len() => last += max,
                None => break,
            }
            cuts.push(last);
        }
        cuts
    }

    #[test]
    fn cuts_are_upstreams_position_for_position() {
        // Content cuts, hard cuts (runs of one byte never match), and data ending inside a
        // chunk's untested head, at two sizes; fed whole and in odd pieces.
        let mut data = pseudo_random(400_000, 11);
        data[150_000..170_000].fill(0x55);
        let tiny = ChunkParams {
            enabled: true,
            min: 64,
            avg: 256,
            max: 1024,
        };
        for p in [small(), tiny] {
            for len in [data.len(), 170_500, 1100] {
                let data = &data[..len];
                let want = reference_cuts(data, p);
                assert!(want.len() > 3 || len == 1100, "{want:?}");
                let whole: Vec<usize> = cut_all(data, p)
                    .iter()
                    .skip(1)
                    .map(|c| c.0 as usize)
                    .collect();
                assert_eq!(whole, want, "whole, {p:?}, {len} bytes");
                let mut det = Xor32Detector::new(p);
                let mut cuts = Vec::new();
                for (n, piece) in data.chunks(977).enumerate() {
                    let (mut rest, mut base) = (piece, n * 977);
                    while let Some(i) = det.find_cut(rest) {
                        cuts.push(base + i);
                        (rest, base) = (&rest[i..], base + i);
                    }
                }
                // A cut at the very end of the data starts no chunk.
                cuts.retain(|&c| c < len);
                assert_eq!(cuts, want, "pieces, {p:?}, {len} bytes");
            }
        }
    }

    #[test]
    fn content_defined_cuts_survive_an_insertion() {
        let data = pseudo_random(300_000, 3);
        let mut shifted = vec![0xAAu8; 100];
        shifted.extend_from_slice(&data);
        let a: Vec<u64> = cut_all(&data, small()).iter().map(|c| c.0).collect();
        let b: Vec<u64> = cut_all(&shifted, small())
            .iter()
            .map(|c| c.0 - 100.min(c.0))
            .collect();
        let common = a.iter().filter(|x| b.contains(x)).count();
        assert!(
            common * 2 > a.len(),
            "only {common} of {} cuts realigned",
            a.len()
        );
    }

    #[test]
    fn constant_data_hard_cuts_at_max() {
        let data = vec![0u8; 10_000];
        let chunks = cut_all(&data, small());
        assert_eq!(chunks[0], (0, 4096));
        assert_eq!(chunks[1], (4096, 4096));
        assert_eq!(chunks[2], (8192, 10_000 - 8192));
    }

    #[test]
    fn small_files_are_not_chunked_and_params_validate() {
        assert_eq!(cut_all(&[1, 2, 3], small()), vec![(0, 3)]);
        assert!(ChunkParams::default().validate().is_ok());
        assert!(ChunkParams { min: 16, ..small() }.validate().is_err());
        assert!(ChunkParams {
            avg: 9000,
            ..small()
        }
        .validate()
        .is_err());
        // threshold of the upstream defaults (cvmfs-formats.md §2.2)
        assert_eq!(Xor32Detector::new(ChunkParams::default()).threshold, 511);
    }
}
