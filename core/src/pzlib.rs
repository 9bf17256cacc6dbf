//! Block-parallel zlib for large metadata objects (catalogs compressed while the repository is
//! locked): one standard zlib stream, written by several threads — by stock zlib in blocks
//! ([`compress`]), or by libdeflate in parts ([`compress_parts`], for databases held in memory).
//!
//! The input is cut into [`BLOCK`]-sized blocks. Each is compressed as raw deflate with the
//! 32 KiB before it as its dictionary; every block but the last ends with its final byte in a
//! one-byte *stored* block, which leaves the stream on a byte boundary so the next block's
//! output can simply follow. Joints made by a sync flush (pigz's way) are empty stored blocks,
//! which some inflaters (the `compress` crate under the `cvmfs` reader the tests use) take for
//! the end of the stream; a stored block with a byte in it is read by every inflater. One zlib
//! header and the Adler-32 of the whole input frame the blocks.
//!
//! The output depends only on the input and the level (not on the number of threads), so a
//! catalog's name does not depend on the machine. It differs from a one-pass compression's
//! bytes: only for metadata objects, whose names nothing dedups against (data objects must
//! match `cvmfs_server`'s bytes and are compressed in one pass).

use std::ffi::{c_int, c_uint, c_void};
use std::io;

use libz_sys as z;

/// Input bytes per block.
pub const BLOCK: usize = 1 << 20;
const WINDOW: usize = 32 << 10;

extern "C" {
    // zlib >= 1.2.5.1; libz-sys leaves it out of its bindings.
    fn deflatePending(strm: z::z_streamp, pending: *mut c_uint, bits: *mut c_int) -> c_int;
}

unsafe extern "C" fn zalloc(_: *mut c_void, items: z::uInt, size: z::uInt) -> *mut c_void {
    // SAFETY: plain allocation; zlib frees it with `zfree`.
    unsafe { libc::calloc(items as usize, size as usize) }
}

unsafe extern "C" fn zfree(_: *mut c_void, p: *mut c_void) {
    // SAFETY: `p` came from `zalloc`.
    unsafe { libc::free(p) }
}

/// A z_stream with no buffers, allocating with `calloc`, for deflateInit2/inflateInit.
fn blank_stream() -> Box<z::z_stream> {
    Box::new(z::z_stream {
        next_in: std::ptr::null_mut(),
        avail_in: 0,
        total_in: 0,
        next_out: std::ptr::null_mut(),
        avail_out: 0,
        total_out: 0,
        msg: std::ptr::null_mut(),
        state: std::ptr::null_mut(),
        zalloc,
        zfree,
        opaque: std::ptr::null_mut(),
        data_type: 0,
        adler: 0,
        reserved: 0,
    })
}

/// A raw deflate state, ended on drop.
struct Deflate(Box<z::z_stream>);

impl Deflate {
    fn new(level: u32) -> io::Result<Deflate> {
        let mut s = blank_stream();
        // SAFETY: a zeroed stream with allocators; the version and size are zlib's own.
        let rc = unsafe {
            z::deflateInit2_(
                &mut *s,
                level as c_int,
                z::Z_DEFLATED,
                -15, // raw deflate, 32 KiB window
                8,
                z::Z_DEFAULT_STRATEGY,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if rc != z::Z_OK {
            return Err(io::Error::other(format!("deflateInit2: {rc}")));
        }
        Ok(Deflate(s))
    }

    fn dictionary(&mut self, dict: &[u8]) -> io::Result<()> {
        // SAFETY: zlib copies the dictionary before returning.
        let rc =
            unsafe { z::deflateSetDictionary(&mut *self.0, dict.as_ptr(), dict.len() as z::uInt) };
        check(rc, "deflateSetDictionary")
    }

    /// Compresses all of `input` with `flush` into `out`; returns the last return code.
    fn run(&mut self, input: &[u8], flush: c_int, out: &mut Vec<u8>) -> io::Result<c_int> {
        let s = &mut *self.0;
        s.next_in = input.as_ptr() as *mut u8;
        s.avail_in = input.len() as c_uint;
        let result = loop {
            if out.capacity() - out.len() < 4096 {
                out.reserve(out.capacity().max(64 << 10));
            }
            let room = out.capacity() - out.len();
            // SAFETY: the output pointer covers `room` spare bytes of `out`, whose length is
            // raised by exactly what zlib wrote; the input outlives the call.
            let rc = unsafe {
                s.next_out = out.as_mut_ptr().add(out.len());
                s.avail_out = room.min(c_uint::MAX as usize) as c_uint;
                let rc = z::deflate(s, flush);
                let wrote = room.min(c_uint::MAX as usize) - s.avail_out as usize;
                out.set_len(out.len() + wrote);
                rc
            };
            match rc {
                z::Z_STREAM_END => break Ok(rc),
                // Done once the input is in and zlib left output space unused.
                z::Z_OK | z::Z_BUF_ERROR if s.avail_in == 0 && s.avail_out > 0 => break Ok(rc),
                z::Z_OK => continue,
                rc => break Err(io::Error::other(format!("deflate: {rc}"))),
            }
        };
        // No pointers into the caller's buffers outlive the call.
        s.next_in = std::ptr::null_mut();
        s.avail_in = 0;
        s.next_out = std::ptr::null_mut();
        s.avail_out = 0;
        result
    }

    /// (bytes, bits) held back by zlib, not yet in the output.
    fn pending(&mut self) -> io::Result<(u32, i32)> {
        let (mut bytes, mut bits) = (0 as c_uint, 0 as c_int);
        // SAFETY: a plain query on an initialised stream.
        check(
            unsafe { deflatePending(&mut *self.0, &mut bytes, &mut bits) },
            "deflatePending",
        )?;
        Ok((bytes, bits))
    }

    fn prime(&mut self, bits: c_int) -> io::Result<()> {
        // SAFETY: inserts `bits` zero bits into the stream's bit buffer.
        check(
            unsafe { z::deflatePrime(&mut *self.0, bits, 0) },
            "deflatePrime",
        )
    }
}

impl Drop for Deflate {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by deflateInit2 and is ended once.
        unsafe { z::deflateEnd(&mut *self.0) };
    }
}

fn check(rc: c_int, what: &str) -> io::Result<()> {
    if rc == z::Z_OK {
        Ok(())
    } else {
        Err(io::Error::other(format!("{what}: {rc}")))
    }
}

/// Compresses block `block` (preceded by `dict`, the input's 32 KiB before it); `last` ends the
/// stream, otherwise the block ends on a byte boundary with its final byte stored.
fn deflate_block(block: &[u8], dict: &[u8], last: bool, level: u32) -> io::Result<Vec<u8>> {
    let mut d = Deflate::new(level)?;
    if !dict.is_empty() {
        d.dictionary(dict)?;
    }
    let mut out = Vec::with_capacity(block.len() / 2 + 64);
    if last {
        let rc = d.run(block, z::Z_FINISH, &mut out)?;
        if rc != z::Z_STREAM_END {
            return Err(io::Error::other("deflate did not finish"));
        }
        return Ok(out);
    }
    let (body, tail) = block.split_at(block.len() - 1);
    d.run(body, z::Z_BLOCK, &mut out)?;
    // A stored block's header (BFINAL 0, BTYPE 00) and the padding to the next byte.
    let (_, held) = d.pending()?;
    d.prime(3 + (8 - (held + 3) % 8) % 8)?;
    // Only the primed bytes are left to come out.
    d.run(&[], z::Z_BLOCK, &mut out)?;
    if d.pending()? != (0, 0) {
        return Err(io::Error::other("deflate block not byte-aligned"));
    }
    // LEN 1, NLEN !1 (little-endian), the byte.
    out.extend_from_slice(&[0x01, 0x00, 0xfe, 0xff, tail[0]]);
    Ok(out)
}

/// One compressed block: its index, deflate bytes, and the Adler-32 and length of its input.
struct Part {
    index: usize,
    bytes: Vec<u8>,
    adler: u32,
    len: usize,
}

/// zlib (`level`) of `len` bytes that `read_at(offset, buf)` fills, on `threads` threads.
/// `len` must be at least 1.
pub fn compress(
    len: u64,
    level: u32,
    threads: usize,
    read_at: &(dyn Fn(u64, &mut [u8]) -> io::Result<()> + Sync),
) -> io::Result<Vec<u8>> {
    let blocks = len.div_ceil(BLOCK as u64) as usize;
    if blocks == 0 {
        return Err(io::Error::other("nothing to compress"));
    }
    let threads = threads.clamp(1, blocks);
    // Each worker takes the next block not taken (a worker slowed by other work takes fewer):
    // its output and the Adler-32 of its input.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || -> io::Result<Vec<Part>> {
        let mut done = Vec::new();
        let mut buf = vec![0u8; WINDOW + BLOCK];
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= blocks {
                break;
            }
            let start = i as u64 * BLOCK as u64;
            let n = (len - start).min(BLOCK as u64) as usize;
            let d = if i == 0 { 0 } else { WINDOW };
            read_at(start - d as u64, &mut buf[..d + n])?;
            let (dict, block) = buf[..d + n].split_at(d);
            let out = deflate_block(block, dict, i + 1 == blocks, level)?;
            // SAFETY: adler32 reads `n` bytes of `block`.
            let adler = unsafe { z::adler32(1, block.as_ptr(), n as z::uInt) } as u32;
            done.push(Part {
                index: i,
                bytes: out,
                adler,
                len: n,
            });
        }
        Ok(done)
    };
    Ok(frame(level, &gather(threads, work)?))
}

/// Runs `work` on `threads` threads (this one among them), each taking parts until none is
/// left, and returns every part, in order.
fn gather(
    threads: usize,
    work: impl Fn() -> io::Result<Vec<Part>> + Sync,
) -> io::Result<Vec<Part>> {
    let mut all = std::thread::scope(|s| -> io::Result<Vec<Part>> {
        let workers: Vec<_> = (1..threads).map(|_| s.spawn(&work)).collect();
        let mut all = work()?;
        for w in workers {
            // A panic in a worker is a bug; let it reach the caller like the one-pass path.
            all.extend(w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?);
        }
        Ok(all)
    })?;
    all.sort_unstable_by_key(|p| p.index);
    Ok(all)
}

/// Input bytes per part of [`compress_parts`].
pub const PART: usize = 2 << 20;

/// zlib (level 6) of `data` by libdeflate, in [`PART`]-sized parts compressed on up to
/// `threads` threads at once: one zlib stream whose bytes depend only on `data`. libdeflate
/// compresses about three times as fast as stock zlib but cannot flush, so each part but the
/// last is compressed whole save its final byte and its stream is then joined in place: the
/// last block's BFINAL bit is cleared and the final byte follows in a one-byte stored block
/// (byte-aligned, so the next part's stream follows as it is, like [`compress`]'s joints).
/// Where the last block starts and ends is found by inflating the part's stream with
/// `Z_BLOCK` (a quarter of the cost of compressing it). Each part starts without the 32 KiB
/// before it as a dictionary (libdeflate takes none): a few hundred bytes more per joint.
pub fn compress_parts(data: &[u8], threads: usize) -> io::Result<Vec<u8>> {
    compress_in_parts(data, PART, threads)
}

/// [`compress_parts`] with parts of `part` bytes.
fn compress_in_parts(data: &[u8], part: usize, threads: usize) -> io::Result<Vec<u8>> {
    if data.is_empty() || part < 2 {
        return Err(io::Error::other("nothing to compress"));
    }
    let parts = data.len().div_ceil(part);
    let threads = threads.clamp(1, parts);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || -> io::Result<Vec<Part>> {
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= parts {
                break;
            }
            let piece = &data[i * part..((i + 1) * part).min(data.len())];
            let last = i + 1 == parts;
            let body = if last {
                piece
            } else {
                &piece[..piece.len() - 1]
            };
            let mut out = vec![0u8; c.deflate_compress_bound(body.len())];
            let n = c
                .deflate_compress(body, &mut out)
                .map_err(|e| io::Error::other(format!("libdeflate: {e:?}")))?;
            out.truncate(n);
            if !last {
                join_in_place(&mut out, piece[piece.len() - 1])?;
            }
            // SAFETY: adler32 reads `piece.len()` bytes of `piece`.
            let adler = unsafe { z::adler32(1, piece.as_ptr(), piece.len() as z::uInt) } as u32;
            done.push(Part {
                index: i,
                bytes: out,
                adler,
                len: piece.len(),
            });
        }
        Ok(done)
    };
    Ok(frame(6, &gather(threads, work)?))
}

/// Makes the raw deflate stream `out` (ending in its final block) continue: clears the last
/// block's BFINAL bit and appends a stored block holding `byte`, which ends on a byte boundary.
fn join_in_place(out: &mut Vec<u8>, byte: u8) -> io::Result<()> {
    let (start, end) = last_block_bits(out)?;
    out[(start / 8) as usize] &= !(1u8 << (start % 8));
    // The stored block's header (BFINAL 0, BTYPE 00) in the three bits from `end`, then zero
    // bits to the byte boundary.
    let keep = (end / 8) as usize;
    let bits = (end % 8) as u32;
    out.truncate(keep + usize::from(bits > 0));
    if bits > 0 {
        out[keep] &= (1u8 << bits) - 1;
    }
    out.resize(((end + 3).div_ceil(8)) as usize, 0);
    // LEN 1, NLEN !1 (little-endian), the byte.
    out.extend_from_slice(&[0x01, 0x00, 0xfe, 0xff, byte]);
    Ok(())
}

/// Where the last block of the raw deflate stream `stream` starts and where its end-of-block
/// code ends, in bits from the stream's start: stock inflate with `Z_BLOCK` stops at each
/// block boundary and tells, in `data_type`, the bits of its last input byte it has not used
/// (bits 0–2), whether the block just ended was the last (64), and that it stopped at a
/// boundary (128).
fn last_block_bits(stream: &[u8]) -> io::Result<(u64, u64)> {
    let mut s = blank_stream();
    // SAFETY: a zeroed stream with allocators; the version and size are zlib's own.
    let rc = unsafe {
        z::inflateInit2_(
            &mut *s,
            -15,
            z::zlibVersion(),
            std::mem::size_of::<z::z_stream>() as c_int,
        )
    };
    check(rc, "inflateInit2")?;
    let mut out = vec![0u8; 64 << 10];
    s.next_in = stream.as_ptr() as *mut u8;
    s.avail_in = stream.len() as c_uint;
    let mut start = 0u64;
    let found = loop {
        s.next_out = out.as_mut_ptr();
        s.avail_out = out.len() as c_uint;
        // SAFETY: input and output pointers cover live buffers for the call.
        let rc = unsafe { z::inflate(&mut *s, z::Z_BLOCK) };
        if rc != z::Z_OK && rc != z::Z_STREAM_END {
            break Err(io::Error::other(format!("inflate of a part: {rc}")));
        }
        let dt = s.data_type;
        if dt & 128 != 0 {
            let at = s.total_in * 8 - (dt & 7) as u64;
            if dt & 64 != 0 {
                break Ok((start, at));
            }
            start = at;
        }
        if rc == z::Z_STREAM_END || (s.avail_in == 0 && s.avail_out > 0) {
            break Err(io::Error::other(
                "a part's stream ended before its last block",
            ));
        }
    };
    s.next_in = std::ptr::null_mut();
    s.next_out = std::ptr::null_mut();
    // SAFETY: initialised above, ended once.
    unsafe { z::inflateEnd(&mut *s) };
    found
}

/// The zlib stream of `parts` (in order): header for `level`, the parts' deflate bytes, and
/// the Adler-32 of their inputs combined.
fn frame(level: u32, parts: &[Part]) -> Vec<u8> {
    // Header: deflate with a 32 KiB window, FLEVEL from the level, no dictionary, FCHECK.
    let flevel: u8 = match level {
        0 | 1 => 0,
        2..=5 => 1,
        6 => 2,
        _ => 3,
    };
    let cmf = 0x78u8;
    let mut flg = flevel << 6;
    flg += 31 - ((u16::from(cmf) * 256 + u16::from(flg)) % 31) as u8;
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.bytes.len()).sum::<usize>() + 6);
    out.extend_from_slice(&[cmf, flg]);
    let mut adler = 1u32;
    for p in parts {
        out.extend_from_slice(&p.bytes);
        adler = adler32_combine(adler, p.adler, p.len as u64);
    }
    out.extend_from_slice(&adler.to_be_bytes());
    out
}

/// The Adler-32 of A followed by B from those of A and of B (`len2` bytes): with s1, s2 the
/// sums of B alone, the joined sums are s1(A) + s1(B) - 1 and
/// s2(A) + s2(B) + len2 * (s1(A) - 1), modulo 65521.
fn adler32_combine(adler1: u32, adler2: u32, len2: u64) -> u32 {
    const BASE: u64 = 65_521;
    let (a1, b1) = (u64::from(adler1 & 0xffff), u64::from(adler1 >> 16));
    let (a2, b2) = (u64::from(adler2 & 0xffff), u64::from(adler2 >> 16));
    let rem = len2 % BASE;
    let s1 = (a1 + a2 + BASE - 1) % BASE;
    let s2 = (b1 + b2 + rem * a1 + BASE * 2 - rem) % BASE;
    (s1 | (s2 << 16)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Catalog-like input: SQLite-ish text with random 20-byte hashes and runs of zeros.
    fn sample(len: usize) -> Vec<u8> {
        let mut data = Vec::with_capacity(len + 64);
        let mut x = 7u64;
        while data.len() < len {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            match x % 7 {
                0 => data.extend_from_slice(&[0u8; 300]),
                1 | 2 => data.extend_from_slice(&x.to_le_bytes().repeat(3)[..20]),
                _ => data.extend_from_slice(
                    format!("/usr/lib/python3/site-{}/mod{}.py\0", x % 97, x % 5).as_bytes(),
                ),
            }
        }
        data.truncate(len);
        data
    }

    #[test]
    fn adler32_of_two_pieces_combines_to_that_of_the_whole() {
        let data = sample(200_000);
        let adler = |b: &[u8]| unsafe { z::adler32(1, b.as_ptr(), b.len() as z::uInt) } as u32;
        for cut in [0, 1, 5552, 65_521, 65_522, 131_042, 199_999, 200_000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(
                adler32_combine(adler(a), adler(b), b.len() as u64),
                adler(&data),
                "cut {cut}"
            );
        }
    }

    fn compress_mem(data: &[u8], threads: usize) -> Vec<u8> {
        compress(data.len() as u64, 6, threads, &|off, buf: &mut [u8]| {
            buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn a_worker_held_up_leaves_the_other_blocks_to_the_rest() {
        // The worker reading block 0 goes on only once every other block was read: with blocks
        // dealt out in advance it would hold blocks of its own and never see that (the wait
        // would time out); taken one by one, the other worker reads them all.
        let data = sample(6 * BLOCK);
        let others = std::sync::Mutex::new(0usize);
        let all_read = std::sync::Condvar::new();
        let timed_out = std::sync::atomic::AtomicBool::new(false);
        let out = compress(data.len() as u64, 6, 2, &|off, buf: &mut [u8]| {
            if off == 0 {
                let n = others.lock().unwrap();
                let (_n, wait) = all_read
                    .wait_timeout_while(n, std::time::Duration::from_secs(60), |n| *n < 5)
                    .unwrap();
                timed_out.store(wait.timed_out(), std::sync::atomic::Ordering::SeqCst);
            } else {
                *others.lock().unwrap() += 1;
                all_read.notify_all();
            }
            buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        assert!(!timed_out.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(out, compress_mem(&data, 1));
    }

    #[test]
    fn one_valid_stream_whatever_the_threads_with_no_empty_stored_block() {
        let data = sample(3 * BLOCK + 12_345);
        // Incompressible input makes zlib choose stored blocks of its own inside a block.
        let mut noise = vec![0u8; 2 * BLOCK + 7];
        let mut x = 1u32;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        for input in [
            &data[..1],
            &data[..BLOCK - 1],
            &data[..BLOCK],
            &data[..BLOCK + 1],
            &data[..2 * BLOCK],
            &data[..],
            &noise[..],
        ] {
            let one = compress_mem(input, 1);
            for threads in [2, 3, 8] {
                assert_eq!(compress_mem(input, threads), one, "len {}", input.len());
            }
            // Stock zlib's inflate checks the header and the Adler-32 trailer.
            let mut back = Vec::new();
            flate2::read::ZlibDecoder::new(&one[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, input, "len {}", input.len());
            // Within a few bytes per block of one-pass zlib.
            let single = crate::object::zlib_compress(input, 6);
            let blocks = input.len().div_ceil(BLOCK);
            assert!(
                one.len() <= single.len() + 64 * blocks,
                "len {}: {} vs {}",
                input.len(),
                one.len(),
                single.len()
            );
            // Every joint is a stored block holding one byte, never an empty one: walking the
            // stream with a reader that returns each block's bytes separately would show an
            // empty read. Stock inflate with Z_BLOCK stops at each block boundary.
            assert!(no_empty_block(&one), "len {}", input.len());
        }
        // The check itself: a sync flush's empty stored block is caught, one pass is clean.
        let mut z = flate2::Compress::new(flate2::Compression::new(6), true);
        let mut synced = Vec::with_capacity(2 * BLOCK);
        z.compress_vec(&data[..BLOCK], &mut synced, flate2::FlushCompress::Sync)
            .unwrap();
        z.compress_vec(
            &data[BLOCK..2 * BLOCK],
            &mut synced,
            flate2::FlushCompress::Finish,
        )
        .unwrap();
        assert!(!no_empty_block(&synced));
        assert!(no_empty_block(&crate::object::zlib_compress(&data, 6)));
    }

    #[test]
    fn libdeflate_parts_join_into_one_stream_whatever_the_threads() {
        let data = sample(5 * PART + 4321);
        let mut noise = vec![0u8; 2 * PART + 3];
        let mut x = 9u32;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let zeros = vec![0u8; 3 * PART];
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        for input in [
            &data[..1],
            &data[..PART],
            &data[..PART + 1],
            &data[..2 * PART + 2],
            &data[..],
            // libdeflate stores incompressible input: joints after stored blocks.
            &noise[..],
            // One long match per block: joints right after a short last block.
            &zeros[..],
        ] {
            let one = compress_parts(input, 1).unwrap();
            for threads in [2, 3, 8] {
                assert_eq!(
                    compress_parts(input, threads).unwrap(),
                    one,
                    "len {}",
                    input.len()
                );
            }
            let mut back = Vec::new();
            flate2::read::ZlibDecoder::new(&one[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, input, "len {}", input.len());
            assert!(no_empty_block(&one), "len {}", input.len());
            let mut whole = vec![0u8; c.zlib_compress_bound(input.len())];
            let n = c.zlib_compress(input, &mut whole).unwrap();
            if input.len() <= PART {
                // One part: libdeflate's own zlib stream.
                assert_eq!(one, whole[..n], "len {}", input.len());
            } else {
                // A joint costs the part after it the window before it, and five bytes.
                let parts = input.len().div_ceil(PART);
                assert!(
                    one.len() <= n + 2048 * parts,
                    "len {}: {} vs {n}",
                    input.len(),
                    one.len()
                );
            }
        }
        assert!(compress_parts(&[], 2).is_err());
    }

    #[test]
    fn a_part_cut_short_is_refused_not_joined() {
        let data = sample(PART);
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut out = vec![0u8; c.deflate_compress_bound(data.len())];
        let n = c.deflate_compress(&data, &mut out).unwrap();
        let (start, end) = last_block_bits(&out[..n]).unwrap();
        assert!(start < end && end <= n as u64 * 8 && end + 8 > n as u64 * 8);
        assert!(last_block_bits(&out[..n / 2]).is_err());
        assert!(last_block_bits(&[0xff; 64]).is_err());
    }

    /// Inflates `zlib` one deflate block at a time (`Z_BLOCK`); false if a non-final block
    /// produced no output (an empty stored block, as a sync flush writes).
    fn no_empty_block(zlib: &[u8]) -> bool {
        let mut s = blank_stream();
        s.next_in = zlib.as_ptr() as *mut u8;
        s.avail_in = zlib.len() as c_uint;
        let mut out = vec![0u8; 8 << 20];
        // SAFETY: test-only FFI on buffers that outlive every call.
        unsafe {
            assert_eq!(
                z::inflateInit_(
                    &mut *s,
                    z::zlibVersion(),
                    std::mem::size_of::<z::z_stream>() as c_int
                ),
                z::Z_OK
            );
            let mut ok = true;
            let mut before = 0;
            // The first stop is right after the zlib header, before the first block.
            let mut header = true;
            loop {
                s.next_out = out.as_mut_ptr();
                s.avail_out = out.len() as c_uint;
                let rc = z::inflate(&mut *s, z::Z_BLOCK);
                assert!(rc == z::Z_OK || rc == z::Z_STREAM_END, "inflate {rc}");
                // data_type bit 7: stopped at the end of a block (not the last).
                let at_block_end = s.data_type & 128 != 0 && s.data_type & 64 == 0;
                if at_block_end && std::mem::take(&mut header) {
                    // After the header: nothing to compare yet.
                } else if at_block_end {
                    if s.total_out == before {
                        ok = false;
                    }
                    before = s.total_out;
                }
                if rc == z::Z_STREAM_END {
                    break;
                }
            }
            z::inflateEnd(&mut *s);
            ok
        }
    }
}
