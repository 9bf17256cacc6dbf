//! Spooled tars written and read around the page cache (`O_DIRECT`), in aligned blocks.
//!
//! An upload is written once and read once, sequentially, by the job that processes it: the
//! page cache gains nothing from holding it, and filling it costs a copy per byte plus the
//! writeback — on a virtual machine whose free memory is handed back to the host, the copy
//! into never-touched pages costs several times more again (measured on the benchmark VM:
//! `dd` of 1 GiB with `conv=fsync` 390 MB/s into fresh pages, 2.0 GB/s into reused ones,
//! 1.7 GB/s `oflag=direct` either way). [`DirectAppender`] gathers the upload into aligned
//! blocks and writes them with `O_DIRECT`, the last partial block through the page cache;
//! [`DirectReader`] reads such a file back in aligned blocks. Both fall back to ordinary
//! reads and writes, for the rest of the file, where the filesystem refuses direct I/O.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Alignment of direct I/O offsets, lengths and memory (a page: enough for 512-byte and
/// 4 KiB logical blocks).
pub const ALIGN: usize = 4096;
/// Size of one direct write or read.
pub const BLOCK: usize = 1 << 20;

/// `BLOCK` bytes at an `ALIGN`-aligned address, without `unsafe`: an over-allocation and
/// the aligned window inside it.
struct AlignedBlock {
    mem: Vec<u8>,
    start: usize,
}

impl AlignedBlock {
    fn new() -> AlignedBlock {
        let mem = vec![0u8; BLOCK + ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN);
        AlignedBlock { mem, start }
    }

    fn get(&self) -> &[u8] {
        &self.mem[self.start..self.start + BLOCK]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + BLOCK]
    }
}

/// Turns `O_DIRECT` on or off for `f`'s open file description; false when refused.
fn set_direct(f: &File, on: bool) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor this `File` owns; no memory is passed.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 {
                return false;
            }
            let want = if on {
                flags | libc::O_DIRECT
            } else {
                flags & !libc::O_DIRECT
            };
            libc::fcntl(fd, libc::F_SETFL, want) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = f;
        !on
    }
}

fn refused_direct(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Appends to a new, empty file in aligned direct writes of [`BLOCK`] bytes (whole aligned
/// pieces given with [`DirectAppender::append_piece`]: [`HELD_PIECES`] at a time).
pub struct DirectAppender {
    file: File,
    block: AlignedBlock,
    filled: usize,
    on_disk: u64,
    direct: bool,
    /// Whole aligned blocks given by [`DirectAppender::append_piece`], not written yet.
    held: Vec<bytes::Bytes>,
}

/// Whole blocks an appender holds to write them with one system call: on the benchmark VM a
/// direct write costs the kernel about as much per call as per MiB (644 MiB in 1 MiB writes
/// took 0.08 CPU-s, in 4 MiB writes 0.04).
pub const HELD_PIECES: usize = 4;

impl DirectAppender {
    /// Writes `file` (empty, positioned at 0) directly when `direct` and the filesystem lets
    /// it, else through the page cache. Turning `O_DIRECT` on applies to every descriptor
    /// duplicated from `file`; [`DirectAppender::finish`] turns it off again.
    pub fn new(file: File, direct: bool) -> DirectAppender {
        let direct = direct && set_direct(&file, true);
        DirectAppender {
            file,
            block: AlignedBlock::new(),
            filled: 0,
            on_disk: 0,
            direct,
            held: Vec::new(),
        }
    }

    /// Whether writes still go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// How many bytes the file holds: a reader may read this far.
    pub fn on_disk(&self) -> u64 {
        self.on_disk
    }

    /// How many bytes were appended (the file holds them once [`DirectAppender::finish`]ed).
    pub fn appended(&self) -> u64 {
        self.on_disk + self.held_bytes() as u64 + self.filled as u64
    }

    fn held_bytes(&self) -> usize {
        self.held.iter().map(|b| b.len()).sum()
    }

    /// Appends `piece`. A whole block at an aligned address (a [`Gatherer`]'s) that starts a
    /// block of the file is kept, and written with the next ones in one vectored write once
    /// [`HELD_PIECES`] are kept (or before anything else is appended); other bytes as
    /// [`DirectAppender::append`] takes them.
    pub fn append_piece(&mut self, piece: &bytes::Bytes) -> io::Result<()> {
        let whole = piece.len() == BLOCK && piece.as_ptr().align_offset(ALIGN) == 0;
        if self.direct && self.filled == 0 && whole {
            self.held.push(piece.clone());
            if self.held.len() >= HELD_PIECES {
                self.write_held()?;
            }
            return Ok(());
        }
        // `append` writes the held blocks first.
        self.append(piece)
    }

    /// Writes the kept blocks: one vectored direct write, the rest of a short or refused one
    /// as [`write_out`] writes it.
    fn write_held(&mut self) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let total = self.held_bytes();
        let mut done = 0;
        if self.direct {
            let parts: Vec<io::IoSlice<'_>> =
                self.held.iter().map(|b| io::IoSlice::new(b)).collect();
            match (&self.file).write_vectored(&parts) {
                Ok(n) => done = n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted || refused_direct(&e) => {}
                Err(e) => return Err(e),
            }
        }
        for piece in std::mem::take(&mut self.held) {
            if done >= piece.len() {
                done -= piece.len();
                continue;
            }
            write_out(&self.file, &mut self.direct, &piece[done..])?;
            done = 0;
        }
        self.on_disk += total as u64;
        Ok(())
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Appends `data`; whole blocks reach the file as they fill. A whole block at an aligned
    /// address (a [`Gatherer`]'s) that starts a block of the file is written as it is.
    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.write_held()?;
        if !self.direct && self.filled == 0 {
            self.file.write_all(data)?;
            self.on_disk += data.len() as u64;
            return Ok(());
        }
        if self.filled == 0 && data.len() == BLOCK && data.as_ptr().align_offset(ALIGN) == 0 {
            write_out(&self.file, &mut self.direct, data)?;
            self.on_disk += BLOCK as u64;
            return Ok(());
        }
        while !data.is_empty() {
            let n = data.len().min(BLOCK - self.filled);
            self.block.get_mut()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == BLOCK {
                self.write_block()?;
            }
        }
        Ok(())
    }

    /// Writes the gathered bytes (the last, partial block through the page cache, as direct
    /// writes must be whole aligned blocks), leaves `O_DIRECT` off, and returns the file.
    pub fn finish(mut self) -> io::Result<File> {
        self.write_held()?;
        if self.direct {
            self.direct = false;
            if !set_direct(&self.file, false) {
                return Err(io::Error::other("cannot turn direct I/O off for the tail"));
            }
        }
        self.write_block()?;
        Ok(self.file)
    }

    fn write_block(&mut self) -> io::Result<()> {
        write_out(
            &self.file,
            &mut self.direct,
            &self.block.get()[..self.filled],
        )?;
        self.on_disk += self.filled as u64;
        self.filled = 0;
        Ok(())
    }
}

/// [`DirectAppender::append`] for writers (`flush` does nothing: the file holds everything
/// once [`DirectAppender::finish`]ed).
impl Write for DirectAppender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.append(data)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes all of `data` at `file`'s position; a direct write refused (a filesystem without
/// direct I/O, or a short write that left the rest unaligned) turns `direct` off, and the
/// rest of the file goes through the page cache.
fn write_out(file: &File, direct: &mut bool, data: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        match (&*file).write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if *direct && refused_direct(&e) => {
                *direct = false;
                if !set_direct(file, false) {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Blocks a [`Gatherer`] keeps for reuse once the pieces cut from them are dropped.
const POOL_KEEP: usize = 16;

/// Gathers a stream of pieces (an upload's, as the HTTP server hands them over) into
/// [`BLOCK`]-sized pieces of aligned blocks of its own, which [`DirectAppender::append`]
/// writes without a copy, and whose blocks return to the gatherer once every handle of them
/// is dropped (a reader of the growing file holds them for a while).
///
/// Why copy at all: actix-http reads the socket into one buffer and cuts the payload's chunks
/// from it; while a chunk is kept (the reader's window keeps them), it cannot reuse the
/// buffer and starts a new one of 8 KiB, grown by doubling — a copy of what it holds each
/// time — up to 128 KiB, reading the socket 8–64 KiB at a time. Chunks copied out and dropped
/// at once let it read into the same buffer again: measured on the 614 MiB tree, 24,400
/// `recvfrom` calls became 4,500–5,300, and its reallocations went away.
pub struct Gatherer {
    pool: Arc<Mutex<Vec<AlignedBlock>>>,
    current: Option<AlignedBlock>,
    filled: usize,
    /// Bytes handed on so far: pieces are cut where the file's blocks end.
    offset: u64,
}

/// A piece of a pooled block: the block goes back to the pool when the last handle of the
/// piece is dropped.
struct Pooled {
    block: Option<AlignedBlock>,
    len: usize,
    pool: Arc<Mutex<Vec<AlignedBlock>>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.block.as_ref().map_or(&[], |b| &b.get()[..self.len])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            let mut free = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            if free.len() < POOL_KEEP {
                free.push(b);
            }
        }
    }
}

impl Default for Gatherer {
    fn default() -> Self {
        Self::new()
    }
}

impl Gatherer {
    pub fn new() -> Gatherer {
        Gatherer {
            pool: Arc::new(Mutex::new(Vec::new())),
            current: None,
            filled: 0,
            offset: 0,
        }
    }

    /// How many bytes the piece being gathered may hold: up to the end of the file's block.
    fn room(&self) -> usize {
        BLOCK - (self.offset % BLOCK as u64) as usize
    }

    /// Copies `data` in; the pieces it completes are added to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<bytes::Bytes>) {
        while !data.is_empty() {
            let room = self.room();
            let block = self.current.get_or_insert_with(|| {
                let reused = self
                    .pool
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop();
                reused.unwrap_or_else(AlignedBlock::new)
            });
            let n = data.len().min(room - self.filled);
            block.get_mut()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == room {
                out.extend(self.cut());
            }
        }
    }

    /// Whether bytes are gathered that no piece has yet.
    pub fn holding(&self) -> bool {
        self.filled > 0
    }

    /// The bytes gathered so far as a piece of their own (a short one: the next piece ends
    /// where the file's block does); `None` when nothing is held.
    pub fn cut(&mut self) -> Option<bytes::Bytes> {
        if self.filled == 0 {
            return None;
        }
        let piece = Pooled {
            block: self.current.take(),
            len: self.filled,
            pool: self.pool.clone(),
        };
        self.offset += self.filled as u64;
        self.filled = 0;
        Some(bytes::Bytes::from_owner(piece))
    }
}

thread_local! {
    /// The aligned block of this thread's [`write_new_direct`] calls (store threads write one
    /// object after another; a block of fresh memory each time would cost its page faults).
    static SCRATCH: std::cell::RefCell<Option<AlignedBlock>> =
        const { std::cell::RefCell::new(None) };
}

/// Writes `data` to `file`, new and empty, around the page cache: its whole pages in direct
/// writes of at most [`BLOCK`] bytes (copied through an aligned block of this thread's), the
/// last partial page through the page cache, where a direct write is refused (a filesystem
/// without direct I/O) the rest too. Leaves `O_DIRECT` off; returns how many bytes went
/// direct. For large new objects: the copy into fresh page-cache pages and their writeback
/// cost more than the direct write (see the module's note); a later read of the object (a
/// push to Stratum 1s) comes from the disk instead of the page cache.
pub fn write_new_direct(file: &File, data: &[u8]) -> io::Result<usize> {
    let whole_pages = data.len() / ALIGN * ALIGN;
    let mut done = 0;
    if whole_pages > 0 && set_direct(file, true) {
        let written = SCRATCH.with(|cell| -> io::Result<()> {
            let mut cell = cell.borrow_mut();
            let block = cell.get_or_insert_with(AlignedBlock::new);
            while done < whole_pages {
                let n = (whole_pages - done).min(BLOCK);
                block.get_mut()[..n].copy_from_slice(&data[done..done + n]);
                match file.write_at(&block.get()[..n], done as u64) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(w) => {
                        done += w;
                        if w % ALIGN != 0 {
                            break; // the rest is no longer aligned: through the page cache
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if refused_direct(&e) => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        if !set_direct(file, false) {
            return Err(io::Error::other("cannot turn direct I/O off for the tail"));
        }
        written?;
    }
    file.write_all_at(&data[done..], done as u64)?;
    Ok(done)
}

/// Blocks read ahead of the reader.
const DEPTH: usize = 4;

/// One block read from the file: `valid` bytes from offset `at`.
struct Filled {
    at: u64,
    block: AlignedBlock,
    valid: usize,
}

impl Filled {
    fn end(&self) -> u64 {
        self.at + self.valid as u64
    }
}

#[derive(Default)]
struct Ahead {
    /// The reader may read up to here; the file is read up to `fetched` (and ends there when
    /// `eof`).
    limit: u64,
    fetched: u64,
    eof: bool,
    ready: VecDeque<Filled>,
    free: Vec<AlignedBlock>,
    error: Option<io::Error>,
    /// Bumped when the reader moves where the read-ahead did not expect: a read under way
    /// when it changes is dropped.
    generation: u64,
    stop: bool,
}

struct Shared {
    ahead: Mutex<Ahead>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ahead> {
        self.ahead.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads a file from its start in aligned direct reads of up to [`BLOCK`] bytes, never past
/// a limit the caller gives (the part of a growing file known to be written). A thread of its
/// own reads up to [`DEPTH`] blocks ahead, into the same few blocks over and over, so the
/// reader neither waits for each read nor touches new memory.
pub struct DirectReader {
    file: Option<File>,
    direct: bool,
    shared: Arc<Shared>,
    current: Option<Filled>,
    pos: u64,
}

impl DirectReader {
    /// Reads `file` directly when `direct` and the filesystem lets it, else through the
    /// page cache. `file` should be a descriptor of its own (its `O_DIRECT` flag is changed).
    pub fn new(file: File, direct: bool) -> DirectReader {
        DirectReader {
            file: Some(file),
            direct,
            shared: Arc::new(Shared {
                ahead: Mutex::new(Ahead::default()),
                changed: Condvar::new(),
            }),
            current: None,
            pos: 0,
        }
    }

    /// Bytes returned so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Moves the position forward to `pos` (the bytes before it were had elsewhere).
    pub fn skip_to(&mut self, pos: u64) {
        self.pos = self.pos.max(pos);
    }

    /// Reads into `buf` from the current position, not past offset `limit`; `Ok(0)` only
    /// when the position has reached `limit` or the file's end.
    pub fn read_upto(&mut self, buf: &mut [u8], limit: u64) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let held = self.fill_upto(limit)?;
        let n = held.len().min(buf.len());
        buf[..n].copy_from_slice(&held[..n]);
        self.consume(n);
        Ok(n)
    }

    /// The bytes from the current position on that the block read there holds, not past
    /// offset `limit` (the next block is waited for when the position is past this one's);
    /// empty only when the position has reached `limit` or the file's end. The position
    /// moves past them with [`DirectReader::consume`].
    pub fn fill_upto(&mut self, limit: u64) -> io::Result<&[u8]> {
        if self.pos >= limit {
            return Ok(&[]);
        }
        let pos = self.pos;
        if !self
            .current
            .as_ref()
            .is_some_and(|c| c.at <= pos && pos < c.end())
        {
            match self.next_block(limit)? {
                Some(b) => {
                    if let Some(old) = self.current.replace(b) {
                        self.shared.lock().free.push(old.block);
                    }
                }
                None => return Ok(&[]),
            }
        }
        let Some(c) = &self.current else {
            return Ok(&[]);
        };
        let from = (pos - c.at) as usize;
        let end = c
            .valid
            .min(usize::try_from(limit - c.at).unwrap_or(usize::MAX));
        Ok(&c.block.get()[from..end])
    }

    /// Moves the position past `n` bytes [`DirectReader::fill_upto`] returned.
    pub fn consume(&mut self, n: usize) {
        self.pos += n as u64;
    }

    /// The read-ahead block holding the position (waiting for it); None at the file's end.
    fn next_block(&mut self, limit: u64) -> io::Result<Option<Filled>> {
        if let Some(file) = self.file.take() {
            let shared = self.shared.clone();
            let direct = self.direct;
            std::thread::Builder::new()
                .name("spool-read".into())
                .spawn(move || read_ahead(file, direct, &shared))?;
        }
        let pos = self.pos;
        let mut a = self.shared.lock();
        if limit > a.limit {
            a.limit = limit;
            self.shared.changed.notify_all();
        }
        loop {
            if let Some(e) = a.error.take() {
                return Err(e);
            }
            let next = a.ready.pop_front();
            if next.is_some() {
                // Room for the read-ahead.
                self.shared.changed.notify_all();
            }
            match next {
                Some(b) if b.end() <= pos => a.free.push(b.block),
                Some(b) if b.at <= pos => return Ok(Some(b)),
                Some(b) => {
                    a.free.push(b.block);
                    restart(&mut a, pos);
                    self.shared.changed.notify_all();
                }
                None if a.eof && a.fetched <= pos => return Ok(None),
                None if a.fetched > pos + ALIGN as u64
                    || a.eof
                    || a.fetched + (BLOCK as u64) < pos =>
                {
                    // The position moved past what was read ahead, or far beyond where the
                    // read-ahead is (`skip_to`): from here.
                    restart(&mut a, pos);
                    self.shared.changed.notify_all();
                }
                None => {
                    a = self
                        .shared
                        .changed
                        .wait(a)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }
}

/// Points the read-ahead at `pos`, dropping what it holds.
fn restart(a: &mut Ahead, pos: u64) {
    let dropped: Vec<AlignedBlock> = a.ready.drain(..).map(|b| b.block).collect();
    a.free.extend(dropped);
    a.fetched = pos - pos % ALIGN as u64;
    a.eof = false;
    a.generation += 1;
}

impl Drop for DirectReader {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
    }
}

/// The read-ahead thread: reads the next block whenever there is room, up to the limit.
fn read_ahead(file: File, direct: bool, shared: &Shared) {
    let mut direct = direct && set_direct(&file, true);
    loop {
        let (at, want, mut block, generation) = {
            let mut a = shared.lock();
            loop {
                if a.stop {
                    return;
                }
                let room = a.ready.len() < DEPTH && a.error.is_none() && !a.eof;
                if room && a.limit > a.fetched {
                    break;
                }
                a = shared
                    .changed
                    .wait(a)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            // Whole aligned blocks from the last aligned offset read to.
            let at = a.fetched - a.fetched % ALIGN as u64;
            let want = usize::try_from(a.limit - at)
                .unwrap_or(usize::MAX)
                .min(BLOCK);
            let block = a.free.pop().unwrap_or_else(AlignedBlock::new);
            (at, want, block, a.generation)
        };
        let got = read_block(&file, &mut direct, &mut block, at, want);
        let mut a = shared.lock();
        if a.generation != generation {
            a.free.push(block);
            continue;
        }
        match got {
            Ok(got) => {
                a.eof = got < want;
                a.fetched = at + got as u64;
                a.ready.push_back(Filled {
                    at,
                    block,
                    valid: got,
                });
            }
            Err(e) => {
                a.free.push(block);
                a.error = Some(e);
            }
        }
        shared.changed.notify_all();
    }
}

/// Reads `want` bytes at `at` (aligned) into `block`, fewer only at the file's end.
fn read_block(
    file: &File,
    direct: &mut bool,
    block: &mut AlignedBlock,
    at: u64,
    want: usize,
) -> io::Result<usize> {
    // Direct reads are whole aligned blocks; only bytes before `want` count.
    let len = want.div_ceil(ALIGN) * ALIGN;
    let mut got = 0;
    while got < want {
        match file.read_at(&mut block.get_mut()[got..len], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if *direct && refused_direct(&e) => {
                *direct = false;
                if !set_direct(file, false) {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        if *direct && got % ALIGN != 0 {
            break; // a direct read ends short only at the end of the file
        }
    }
    Ok(got.min(want))
}

impl Read for DirectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_upto(buf, u64::MAX)
    }
}

/// Buffered in its own blocks: a reader that wants small pieces (a tar's headers) takes them
/// from there, without a buffer (and a copy) of its own.
impl io::BufRead for DirectReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.fill_upto(u64::MAX)
    }

    fn consume(&mut self, n: usize) {
        DirectReader::consume(self, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_written_around_the_cache_holds_its_bytes_and_is_left_buffered() {
        let dir = tempfile::tempdir().unwrap();
        // Whether this filesystem takes direct writes at all (tmpfs may not).
        let probe = File::create(dir.path().join("probe")).unwrap();
        let direct_here = set_direct(&probe, true)
            && probe
                .write_at(&AlignedBlock::new().get()[..ALIGN], 0)
                .is_ok();
        for (i, len) in [
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            3 * BLOCK + 5,
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("o{i}"));
            let f = File::create(&path).unwrap();
            let data = pattern(len);
            let direct = write_new_direct(&f, &data).unwrap();
            let want = if direct_here { len / ALIGN * ALIGN } else { 0 };
            assert_eq!(direct, want, "{len} bytes");
            // Left buffered: an unaligned write now is taken.
            f.write_all_at(b"xyz", len as u64).unwrap();
            drop(f);
            let mut back = std::fs::read(&path).unwrap();
            assert_eq!(back.split_off(len), b"xyz", "{len} bytes");
            assert_eq!(back, data, "{len} bytes");
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    /// Writes `data` in pieces of `piece` bytes, returns the file's bytes and whether the
    /// writes stayed direct.
    fn append_all(data: &[u8], piece: usize, direct: bool) -> (Vec<u8>, bool) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("upload.tar");
        let mut a = DirectAppender::new(File::create(&p).unwrap(), direct);
        let mut reported = 0;
        for c in data.chunks(piece) {
            a.append(c).unwrap();
            assert!(
                a.on_disk() >= reported,
                "what a reader may read never shrinks"
            );
            reported = a.on_disk();
            assert_eq!(std::fs::metadata(&p).unwrap().len(), a.on_disk());
        }
        let was_direct = a.is_direct();
        a.finish().unwrap().sync_all().unwrap();
        (std::fs::read(&p).unwrap(), was_direct)
    }

    #[test]
    fn appended_bytes_are_the_file_whatever_the_piece_size_and_mode() {
        for len in [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            3 * BLOCK + 12345,
        ] {
            let data = pattern(len);
            for piece in [1000, 65536, BLOCK + 7] {
                for direct in [true, false] {
                    let (got, _) = append_all(&data, piece, direct);
                    assert!(got == data, "len {len} piece {piece} direct {direct}");
                }
            }
        }
    }

    #[test]
    fn whole_blocks_reach_the_file_as_they_fill() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("upload.tar");
        let mut a = DirectAppender::new(File::create(&p).unwrap(), true);
        a.append(&pattern(BLOCK - 1)).unwrap();
        assert_eq!(a.on_disk(), 0);
        a.append(&[1, 2]).unwrap();
        assert_eq!(a.on_disk(), BLOCK as u64);
        assert_eq!(a.appended(), BLOCK as u64 + 1);
        let f = a.finish().unwrap();
        assert_eq!(f.metadata().unwrap().len(), BLOCK as u64 + 1);
    }

    /// Feeds `data` to a gatherer in pieces of `piece` bytes, cutting what it holds after
    /// every piece numbered in `cuts` (as the upload does when no more arrives for a while).
    fn gather_all(data: &[u8], piece: usize, cuts: &[usize]) -> Vec<bytes::Bytes> {
        let mut g = Gatherer::new();
        let mut out = Vec::new();
        for (i, c) in data.chunks(piece).enumerate() {
            g.push(c, &mut out);
            if cuts.contains(&i) {
                out.extend(g.cut());
            }
        }
        out.extend(g.cut());
        assert!(!g.holding());
        out
    }

    #[test]
    fn gathered_pieces_end_where_the_files_blocks_do_and_hold_the_stream() {
        let data = pattern(3 * BLOCK + 12345);
        for piece in [1000, 65536, BLOCK + 7, 5 * BLOCK] {
            for cuts in [&[][..], &[0, 3, 17][..]] {
                let got = gather_all(&data, piece, cuts);
                assert!(got.concat() == data, "piece {piece} cuts {cuts:?}");
                let mut offset = 0;
                let mut whole = 0;
                for p in &got {
                    assert!(!p.is_empty());
                    let end = offset + p.len();
                    // No piece crosses the end of a block of the file.
                    assert!(offset / BLOCK == (end - 1) / BLOCK, "{offset}..{end}");
                    if offset % BLOCK == 0 && p.len() == BLOCK {
                        assert_eq!(p.as_ptr().align_offset(ALIGN), 0);
                        whole += 1;
                    }
                    offset = end;
                }
                if cuts.is_empty() {
                    assert_eq!(got.len(), 4, "piece {piece}");
                    assert_eq!(whole, 3);
                }
            }
        }
    }

    #[test]
    fn a_gatherers_blocks_come_back_once_their_pieces_are_dropped() {
        let mut g = Gatherer::new();
        let mut out = Vec::new();
        g.push(&pattern(BLOCK), &mut out);
        let first = out.pop().unwrap();
        let at = first.as_ptr();
        let held = first.clone();
        drop(first);
        g.push(&pattern(BLOCK), &mut out);
        let second = out.pop().unwrap();
        assert_ne!(second.as_ptr(), at, "a block still held is not reused");
        drop(held);
        drop(second);
        g.push(&[7; 10], &mut out);
        let third = g.cut().unwrap();
        assert_eq!(&third[..], &[7; 10]);
        assert!(
            third.as_ptr() == at || g.pool.lock().unwrap().len() == 1,
            "a dropped block is taken again before a new one is made"
        );
        assert!(g.pool.lock().unwrap().len() <= 1);
    }

    #[test]
    fn gathered_pieces_appended_make_the_same_file() {
        let data = pattern(4 * BLOCK + 999);
        for direct in [true, false] {
            for cuts in [&[][..], &[2, 40][..]] {
                let dir = tempfile::tempdir().unwrap();
                let p = dir.path().join("upload.tar");
                let mut a = DirectAppender::new(File::create(&p).unwrap(), direct);
                let mut offset = 0u64;
                for piece in gather_all(&data, 65536, cuts) {
                    a.append(&piece).unwrap();
                    offset += piece.len() as u64;
                    // What a reader may read: every whole block appended so far (all of it
                    // through the page cache).
                    let whole = offset / BLOCK as u64 * BLOCK as u64;
                    assert_eq!(a.on_disk(), if a.is_direct() { whole } else { offset });
                }
                a.finish().unwrap().sync_all().unwrap();
                assert!(
                    std::fs::read(&p).unwrap() == data,
                    "direct {direct} cuts {cuts:?}"
                );
            }
        }
    }

    #[test]
    fn whole_pieces_are_written_four_blocks_at_a_time_and_in_order() {
        // Nine whole blocks, a block in two pieces, two more whole blocks and the tail.
        let data = pattern(12 * BLOCK + 999);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("upload.tar");
        let mut a = DirectAppender::new(File::create(&p).unwrap(), true);
        let pieces = gather_all(&data, 65536, &[9 * 16 + 3]);
        assert_eq!(pieces.len(), 14);
        let mut offset = 0;
        for (i, piece) in pieces.iter().enumerate() {
            a.append_piece(piece).unwrap();
            offset += piece.len();
            assert_eq!(a.appended(), offset as u64);
            let expected = match i + 1 {
                // Whole blocks are held until four are, then written in one call.
                k @ 1..=9 => k / HELD_PIECES * HELD_PIECES * BLOCK,
                // The partial piece: the ninth block goes first, the piece waits for its block.
                10 => 9 * BLOCK,
                // Its block completed by the next piece, which is not a whole one.
                11 => 10 * BLOCK,
                // Whole blocks again: held.
                12 | 13 => 10 * BLOCK,
                // The tail: the held blocks go first.
                _ => 12 * BLOCK,
            };
            assert_eq!(a.on_disk() as usize, expected, "after piece {}", i + 1);
            assert_eq!(std::fs::metadata(&p).unwrap().len(), a.on_disk());
        }
        assert!(a.is_direct());
        a.finish().unwrap().sync_all().unwrap();
        assert!(std::fs::read(&p).unwrap() == data);
        // Without direct I/O nothing is held: the file has every piece as it comes.
        let mut b = DirectAppender::new(File::create(&p).unwrap(), false);
        for piece in &pieces[..3] {
            b.append_piece(piece).unwrap();
        }
        assert_eq!(b.on_disk(), 3 * BLOCK as u64);
    }

    #[test]
    fn the_scratch_filesystem_takes_direct_writes() {
        // Where the tests run (ext4 here and in CI) direct I/O works; on a filesystem that
        // refuses it the appender falls back, which the test above covers with `false`.
        let data = pattern(2 * BLOCK);
        let (got, direct) = append_all(&data, 1 << 16, true);
        assert!(got == data);
        let fs_refuses = std::env::var_os("PREPUB_TEST_NO_DIRECT_IO").is_some();
        assert_eq!(direct, !fs_refuses);
    }

    /// A file of `len` pattern bytes (kept while the directory lives), and its bytes.
    fn file_of(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let data = pattern(len);
        std::fs::write(&p, &data).unwrap();
        (dir, p, data)
    }

    #[test]
    fn reader_returns_the_file_and_respects_the_limit() {
        let (_d, p, data) = file_of(2 * BLOCK + 5000);
        for direct in [true, false] {
            let mut r = DirectReader::new(File::open(&p).unwrap(), direct);
            let mut got = Vec::new();
            let mut buf = vec![0u8; 300_000];
            // In steps that end mid-block and mid-page, as a growing file's length does.
            for limit in [10, 4096, 5000, BLOCK as u64 + 3, data.len() as u64] {
                loop {
                    let n = r.read_upto(&mut buf, limit).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                assert_eq!(got.len() as u64, limit, "direct {direct}");
                assert_eq!(r.position(), limit);
            }
            assert!(got == data);
            assert_eq!(r.read(&mut buf).unwrap(), 0, "end of file");
        }
    }

    #[test]
    fn buffered_reads_come_from_the_blocks_and_end_at_the_limit() {
        let (_d, p, data) = file_of(2 * BLOCK + 5000);
        let mut r = DirectReader::new(File::open(&p).unwrap(), true);
        // At most one block at a time, never past the limit.
        let held = r.fill_upto(7000).unwrap();
        assert_eq!(held, &data[..7000]);
        r.consume(100);
        assert_eq!(r.fill_upto(7000).unwrap(), &data[100..7000]);
        r.consume(6900);
        assert!(r.fill_upto(7000).unwrap().is_empty());
        // Past the old limit: what the block read then holds, or the next.
        let held = r.fill_upto(u64::MAX).unwrap();
        assert!(!held.is_empty() && held.len() <= BLOCK);
        assert_eq!(held, &data[7000..7000 + held.len()]);
        // The rest through `BufRead`, as a tar reader's input.
        let mut rest = Vec::new();
        loop {
            let held = io::BufRead::fill_buf(&mut r).unwrap();
            if held.is_empty() {
                break;
            }
            let n = held.len().min(3333);
            rest.extend_from_slice(&held[..n]);
            io::BufRead::consume(&mut r, n);
        }
        assert!(rest == data[7000..]);
    }

    #[test]
    fn reader_skips_what_was_had_elsewhere() {
        let (_d, p, data) = file_of(5 * BLOCK + 777);
        for direct in [true, false] {
            let mut r = DirectReader::new(File::open(&p).unwrap(), direct);
            let mut buf = vec![0u8; 10_000];
            for skip in [100, 20_000, BLOCK + 3, 4 * BLOCK + 1] {
                r.skip_to(skip as u64);
                let n = r.read_upto(&mut buf, data.len() as u64).unwrap();
                assert!(n > 0);
                assert!(
                    buf[..n] == data[skip..skip + n],
                    "skip {skip} direct {direct}"
                );
            }
            let mut rest = Vec::new();
            let at = r.position() as usize;
            r.read_to_end(&mut rest).unwrap();
            assert!(rest == data[at..]);
        }
    }

    #[test]
    fn reader_follows_a_file_as_its_limit_grows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let data = pattern(3 * BLOCK + 99);
        let mut a = DirectAppender::new(File::create(&p).unwrap(), true);
        let mut r = DirectReader::new(File::open(&p).unwrap(), true);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        for c in data.chunks(300_001) {
            a.append(c).unwrap();
            while let Ok(n) = r.read_upto(&mut buf, a.on_disk()) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got.len() as u64, a.on_disk());
        }
        a.finish().unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        got.extend_from_slice(&rest);
        assert!(got == data);
    }

    #[test]
    fn reader_stops_at_the_end_of_a_file_shorter_than_the_limit() {
        let (_d, p, data) = file_of(7000);
        let mut r = DirectReader::new(File::open(&p).unwrap(), true);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert!(got == data);
    }
}
