//! A file that is still being written, read as it grows: lets a job's tar be processed while
//! its upload is still arriving.
//!
//! The writer (the upload's writer thread) hands each piece it received to [`Growing::received`]
//! before writing it, reports how much the file holds with [`Growing::grew`], and the end with
//! [`Growing::finish`] — complete, or cut off. A [`FollowReader`] takes the bytes from the
//! writer's recent pieces while it keeps up (a window of at most [`WINDOW`] bytes of pieces it
//! has not read yet), and from its own descriptor of the file once it falls further behind;
//! it waits when it has caught up, returns end-of-file only once the upload is complete, and an
//! error if it was cut off. So a tar processed as fast as it arrives is never read back from
//! the file (which the writer fills around the page cache, see [`crate::directio`]); and a file
//! body is not even copied out of the pieces it lies in
//! ([`crate::intake::Input::take_shared`]).
//!
//! A reader about as fast as the upload falls behind the window now and then; read back from
//! the file, it then competes with the writer for the disk, both slow down, and it never
//! catches up (measured: a re-published tree of 649 MB read 800 MB back while it uploaded,
//! and took twice as long). So the writer paces itself to a reader more than [`WINDOW`]
//! behind — [`Growing::received`] waits for it — within a budget ([`pace_budget`]: [`PACE_FLOOR`]
//! plus half of the time since the first piece, and [`PACE_STALL_MAX`] at a time): a reader
//! that is much slower (compressing everything) or stuck exhausts it within a second, is let
//! behind for good and reads from the file, so its upload is accepted about as early as without
//! pacing; one at least half as fast as the upload keeps it paced, so it takes up to twice as
//! long. (With a third, a publish of the benchmark tree with 5 % of its files changed — its
//! reader compressing those — was let behind in two runs of three, read 300–390 MB back from
//! the file and took 2.46–2.88 s; with half it stayed paced in three of three, 2.01–2.10 s.)
//! Nothing here is durable: whether the bytes become a job is decided by the spool once the
//! upload is accepted. [`FinishGuard`] makes sure a writer that stops for any reason (error,
//! panic, request dropped) wakes its reader.

use crate::directio::DirectReader;
use bytes::Bytes;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most bytes of received pieces held for a reader that has not read them yet (pieces the file
/// does not hold yet are held whatever their size: a writer's block, see `directio::BLOCK`).
pub const WINDOW: usize = 8 << 20;

/// The writer waits for a reader more than [`WINDOW`] behind for at most this long in all,
/// plus half of the time since the first piece ([`pace_budget`]).
pub const PACE_FLOOR: Duration = Duration::from_millis(250);

/// The longest the writer waits for the reader at one time: a reader stuck that long (its
/// job queued, its storage slow) is let behind for good, so that the client's connection
/// (and a proxy's send timeout) never sees the upload stop for longer.
pub const PACE_STALL_MAX: Duration = Duration::from_secs(1);

/// How long in all the writer may have waited for its reader by `since_first` after the first
/// piece: `floor` plus half of that time. A reader at least half as fast as the upload needs
/// the writer to wait at most half of the time, so it stays within the budget however long the
/// upload; a slower one exhausts it (within about `floor / (share of the time it needs - 1/2)`).
fn pace_budget(floor: Duration, since_first: Duration) -> Duration {
    floor + since_first / 2
}

#[derive(Default)]
struct State {
    /// Bytes received, and how many of them the file holds.
    received: u64,
    on_disk: u64,
    /// Received pieces from offset `window_at` on, not yet read or dropped.
    window: VecDeque<Bytes>,
    window_at: u64,
    window_bytes: usize,
    /// How far the reader has read.
    read: u64,
    /// `Some(true)`: the upload is complete; `Some(false)`: it was cut off.
    end: Option<bool>,
    /// When the first piece arrived, and how long the writer has waited for the reader.
    started: Option<Instant>,
    stalled: Duration,
    /// The writer gave up waiting for the reader (its budget ran out).
    unpaced: bool,
    /// The writer is waiting for the reader to read.
    writer_waits: bool,
    /// The reader is waiting for bytes: only then does the writer wake it (a wake-up is a
    /// system call, and there are two per received piece).
    reader_waits: bool,
    /// The reader was dropped: nobody to wait for.
    reader_gone: bool,
    /// The most bytes the window held.
    held_peak: usize,
}

impl State {
    /// Drops pieces the reader is past, and the oldest ones beyond [`WINDOW`] that the file
    /// holds (the reader finds those in the file).
    fn trim(&mut self) {
        while let Some(front) = self.window.front() {
            let end = self.window_at + front.len() as u64;
            let passed = end <= self.read;
            // While the writer paces itself to the reader, the reader finds everything here.
            let spill = self.window_bytes > WINDOW
                && end <= self.on_disk
                && (self.unpaced || self.reader_gone);
            if !(passed || spill) {
                break;
            }
            self.window_bytes -= front.len();
            self.window_at = end;
            self.window.pop_front();
        }
    }

    /// The reader has read up to `pos`: drops what it passed, wakes a writer waiting for it.
    fn advanced(&mut self, pos: u64, changed: &Condvar) {
        self.read = self.read.max(pos);
        self.trim();
        if self.writer_waits && self.received - self.read <= WINDOW as u64 {
            changed.notify_all();
        }
    }

    /// The window's bytes from `pos` to the end of the piece holding it (shared with the
    /// window, not copied); None when `pos` is not in it.
    fn piece_at(&self, pos: u64) -> Option<Bytes> {
        if pos < self.window_at {
            return None;
        }
        let mut at = self.window_at;
        for piece in &self.window {
            let end = at + piece.len() as u64;
            if pos < end {
                return Some(piece.slice((pos - at) as usize..));
            }
            at = end;
        }
        None
    }
}

/// The shared state of a file being written: its length, recent pieces, and end.
#[derive(Default)]
pub struct Growing {
    state: Mutex<State>,
    changed: Condvar,
    /// [`PACE_FLOOR`] and [`PACE_STALL_MAX`], or others for tests.
    pacing: Option<(Duration, Duration)>,
}

impl Growing {
    pub fn new() -> Arc<Growing> {
        Arc::new(Growing::default())
    }

    #[cfg(test)]
    fn with_pacing(floor: Duration, stall_max: Duration) -> Arc<Growing> {
        Arc::new(Growing {
            pacing: Some((floor, stall_max)),
            ..Growing::default()
        })
    }

    /// The next piece of the upload (to be written to the file after it). Waits while the
    /// reader is more than [`WINDOW`] behind, within the pacing budget (see the module's text).
    pub fn received(&self, piece: Bytes) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let started = *s.started.get_or_insert_with(Instant::now);
        if s.window.is_empty() {
            s.window_at = s.received;
        }
        s.received += piece.len() as u64;
        s.window_bytes += piece.len();
        s.window.push_back(piece);
        s.trim();
        s.held_peak = s.held_peak.max(s.window_bytes);
        if s.reader_waits {
            self.changed.notify_all();
        }
        let (floor, stall_max) = self.pacing.unwrap_or((PACE_FLOOR, PACE_STALL_MAX));
        let waiting = Instant::now();
        while !s.unpaced && !s.reader_gone && s.received - s.read > WINDOW as u64 {
            let budget = pace_budget(floor, started.elapsed());
            let left = budget
                .saturating_sub(s.stalled)
                .min(stall_max.saturating_sub(waiting.elapsed()));
            if left.is_zero() {
                s.unpaced = true;
                break;
            }
            let since = Instant::now();
            s.writer_waits = true;
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            s.writer_waits = false;
            s.stalled += since.elapsed();
        }
    }

    /// The file now holds `len` bytes.
    pub fn grew(&self, len: u64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.on_disk = s.on_disk.max(len);
        if s.received < s.on_disk {
            // A writer that does not hand over its pieces: the file is all there is.
            s.received = s.on_disk;
            s.window.clear();
            s.window_bytes = 0;
        }
        s.trim();
        if s.reader_waits {
            self.changed.notify_all();
        }
    }

    /// The writer is done: `complete` when every byte is written, false when the upload was cut
    /// off. Only the first call counts.
    pub fn finish(&self, complete: bool) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.end.is_none() {
            s.end = Some(complete);
        }
        self.changed.notify_all();
    }

    /// A reader of `file` (opened separately from the writer's descriptor) from its start.
    pub fn reader(self: &Arc<Growing>, file: File) -> FollowReader {
        FollowReader {
            file: DirectReader::new(file, true),
            growing: self.clone(),
            stop: None,
            before_wait: None,
            piece: Bytes::new(),
            used: 0,
            file_limit: None,
        }
    }
}

/// Reports the upload cut off when dropped before [`FinishGuard::complete`].
pub struct FinishGuard(Option<Arc<Growing>>);

impl FinishGuard {
    pub fn new(g: Arc<Growing>) -> FinishGuard {
        FinishGuard(Some(g))
    }

    pub fn received(&self, piece: Bytes) {
        if let Some(g) = &self.0 {
            g.received(piece);
        }
    }

    pub fn grew(&self, len: u64) {
        if let Some(g) = &self.0 {
            g.grew(len);
        }
    }

    pub fn complete(mut self) {
        if let Some(g) = self.0.take() {
            g.finish(true);
        }
    }
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g.finish(false);
        }
    }
}

/// Reads a [`Growing`] file as it is written. Buffered in the window's pieces and the file's
/// blocks: read through [`BufRead`], nothing is copied before the reader's own copy.
pub struct FollowReader {
    /// Its position is the end of `piece` (while that is read), else the reader's.
    file: DirectReader,
    growing: Arc<Growing>,
    stop: Option<Arc<AtomicBool>>,
    before_wait: Option<Box<dyn FnMut() + Send>>,
    /// The window's bytes at the reader's position, `used` of them read.
    piece: Bytes,
    used: usize,
    /// Reading the file instead: where the bytes it returned last end.
    file_limit: Option<u64>,
}

/// Where a [`FollowReader`] finds the bytes at its position.
enum Source {
    Window(Bytes),
    /// The file, which holds this many bytes.
    File(u64),
}

impl FollowReader {
    /// A reader waiting for bytes gives up (with an error) once `flag` is set.
    pub fn stop_when(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// `f` runs (on the reading thread) whenever a read is about to wait for the upload:
    /// work the reader holds back for later is handed on before it sits idle.
    pub fn before_wait(&mut self, f: Box<dyn FnMut() + Send>) {
        self.before_wait = Some(f);
    }
}

/// How often a waiting reader looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

impl FollowReader {
    /// Where the bytes at `pos` (everything before it read) are, waiting for them; None at the
    /// end of a complete upload.
    fn next_source(&mut self, pos: u64) -> io::Result<Option<Source>> {
        let mut s = self
            .growing
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        s.advanced(pos, &self.growing.changed);
        let mut told = false;
        loop {
            if s.received > pos {
                break;
            }
            match s.end {
                Some(true) => return Ok(None),
                Some(false) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upload was cut off",
                    ))
                }
                None => {
                    if self.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                        // Not `Interrupted`: readers retry that.
                        return Err(io::Error::other("stopped while waiting for the upload"));
                    }
                    if let Some(f) = self.before_wait.as_mut().filter(|_| !told) {
                        told = true;
                        drop(s);
                        f();
                        s = self
                            .growing
                            .state
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        continue;
                    }
                    s.reader_waits = true;
                    s = self
                        .growing
                        .changed
                        .wait_timeout(s, STOP_CHECK)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    s.reader_waits = false;
                }
            }
        }
        match s.piece_at(pos) {
            Some(p) => {
                // Held here now: the window need not keep it.
                s.advanced(pos + p.len() as u64, &self.growing.changed);
                Ok(Some(Source::Window(p)))
            }
            // Behind the window: the file holds everything before it.
            None => Ok(Some(Source::File(s.on_disk))),
        }
    }
}

impl BufRead for FollowReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.used < self.piece.len() {
            return Ok(&self.piece[self.used..]);
        }
        let pos = self.file.position();
        if let Some(end) = self.file_limit.filter(|&end| pos < end) {
            // The rest of the file's bytes returned last time (of the block read then).
            return self.file.fill_upto(end);
        }
        // The next piece or block: the window is looked at (and the reader's position told)
        // once per piece or block.
        self.file_limit = None;
        match self.next_source(pos)? {
            None => Ok(&[]),
            Some(Source::Window(p)) => {
                self.file.skip_to(pos + p.len() as u64);
                self.piece = p;
                self.used = 0;
                Ok(&self.piece)
            }
            Some(Source::File(on_disk)) => {
                let held = self.file.fill_upto(on_disk)?;
                if held.is_empty() {
                    // The writer reported bytes the file does not hold: not the same file.
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upload file is shorter than written",
                    ));
                }
                self.file_limit = Some(pos + held.len() as u64);
                Ok(held)
            }
        }
    }

    fn consume(&mut self, n: usize) {
        if self.used < self.piece.len() {
            self.used = (self.used + n).min(self.piece.len());
        } else if self.file_limit.is_some() {
            self.file.consume(n);
        }
    }
}

/// A body is shared with the received pieces it lies in, not copied (each piece's block returns
/// to the upload's pool once every body sharing it is dropped); read back from the file, it is
/// not shared.
impl crate::intake::Input for FollowReader {
    fn take_shared(&mut self, n: usize) -> io::Result<Option<Bytes>> {
        if n == 0 {
            return Ok(None);
        }
        if self.used == self.piece.len() {
            // The next piece, or (far behind) the file's next block, or the end.
            self.fill_buf()?;
        }
        let k = n.min(self.piece.len() - self.used);
        if k == 0 {
            return Ok(None);
        }
        let body = self.piece.slice(self.used..self.used + k);
        self.used += k;
        Ok(Some(body))
    }
}

impl Read for FollowReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let held = self.fill_buf()?;
        let n = held.len().min(buf.len());
        buf[..n].copy_from_slice(&held[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl Drop for FollowReader {
    fn drop(&mut self) {
        let mut s = self
            .growing
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        s.reader_gone = true;
        self.growing.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn pair() -> (tempfile::TempDir, File, Arc<Growing>, FollowReader) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("upload.tar");
        let w = File::create(&p).unwrap();
        let g = Growing::new();
        let r = g.reader(File::open(&p).unwrap());
        (dir, w, g, r)
    }

    #[test]
    fn reads_what_is_written_while_it_is_written_then_ends() {
        let (_d, mut w, g, mut r) = pair();
        let writer = std::thread::spawn(move || {
            let guard = FinishGuard::new(g);
            let mut n = 0u64;
            for i in 0..50u8 {
                let piece = vec![i; 1000 + i as usize];
                w.write_all(&piece).unwrap();
                n += piece.len() as u64;
                guard.grew(n);
                if i % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            guard.complete();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        let want: Vec<u8> = (0..50u8).flat_map(|i| vec![i; 1000 + i as usize]).collect();
        assert_eq!(got, want);
    }

    /// A writer like the upload's: hands each piece over, then writes it, reporting what the
    /// file holds after every `flush_every` pieces (as whole blocks reach the file).
    fn write_handing_over(mut w: File, g: Arc<Growing>, pieces: Vec<Vec<u8>>, flush_every: usize) {
        let guard = FinishGuard::new(g);
        let mut pending = Vec::new();
        let mut on_disk = 0u64;
        for (i, p) in pieces.into_iter().enumerate() {
            guard.received(Bytes::from(p.clone()));
            pending.extend_from_slice(&p);
            if (i + 1) % flush_every == 0 {
                w.write_all(&pending).unwrap();
                on_disk += pending.len() as u64;
                pending.clear();
                guard.grew(on_disk);
            }
        }
        w.write_all(&pending).unwrap();
        guard.grew(on_disk + pending.len() as u64);
        guard.complete();
    }

    #[test]
    fn a_reader_that_keeps_up_reads_from_the_pieces_not_the_file() {
        let (_d, w, g, mut r) = pair();
        let pieces: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 3000 + i as usize]).collect();
        let want: Vec<u8> = pieces.concat();
        // Each piece read before the next arrives: none left in the window to hold.
        let guard = FinishGuard::new(g.clone());
        let mut got = Vec::new();
        for p in &pieces {
            guard.received(Bytes::from(p.clone()));
            let mut buf = vec![0u8; p.len()];
            r.read_exact(&mut buf).unwrap();
            got.extend_from_slice(&buf);
            assert_eq!(g.state.lock().unwrap().window_bytes, 0);
        }
        guard.complete();
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0);
        assert!(got == want);
        // The file was never written: the bytes can only have come from the pieces.
        assert_eq!(w.metadata().unwrap().len(), 0);
    }

    /// Pieces of 1 MiB, three windows' worth, each byte a function of its place.
    fn three_windows(a: usize, b: usize) -> Vec<Vec<u8>> {
        let piece = 1 << 20;
        (0..3 * WINDOW / piece)
            .map(|i| (0..piece).map(|j| (i * a + j / b) as u8).collect())
            .collect()
    }

    #[test]
    fn a_buffered_reader_is_handed_the_pieces_themselves_not_copies() {
        let (_d, _w, g, mut r) = pair();
        let guard = FinishGuard::new(g.clone());
        let a = Bytes::from(vec![1u8; 5000]);
        let b = Bytes::from(vec![2u8; 3000]);
        guard.received(a.clone());
        guard.received(b.clone());
        // The first piece, where the window holds it; then its rest after a partial read.
        let held = r.fill_buf().unwrap();
        assert_eq!((held.as_ptr(), held.len()), (a.as_ptr(), 5000));
        r.consume(512);
        let held = r.fill_buf().unwrap();
        assert_eq!((held.as_ptr(), held.len()), (a[512..].as_ptr(), 4488));
        let mut buf = [0u8; 4488];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [1u8; 4488]);
        // The next piece, and the window keeps neither once they are the reader's.
        assert_eq!(r.fill_buf().unwrap().as_ptr(), b.as_ptr());
        assert_eq!(g.state.lock().unwrap().window_bytes, 0);
        r.consume(3000);
        guard.complete();
        assert!(r.fill_buf().unwrap().is_empty());
    }

    #[test]
    fn a_body_is_taken_shared_with_the_pieces_it_lies_in() {
        use crate::intake::Input;
        let (_d, _w, g, mut r) = pair();
        let guard = FinishGuard::new(g.clone());
        let a = Bytes::from((0..5000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let b = Bytes::from(vec![2u8; 3000]);
        guard.received(a.clone());
        guard.received(b.clone());
        let mut head = [0u8; 512];
        r.read_exact(&mut head).unwrap();
        // Inside the first piece: the piece's own bytes, and the reader is past them.
        let body = r.take_shared(4000).unwrap().unwrap();
        assert_eq!((body.as_ptr(), body.len()), (a[512..].as_ptr(), 4000));
        // 488 left in this piece: a body of 600 is taken as those, then 112 of the next piece.
        let first = r.take_shared(600).unwrap().unwrap();
        assert_eq!((first.as_ptr(), first.len()), (a[4512..].as_ptr(), 488));
        let second = r.take_shared(112).unwrap().unwrap();
        assert_eq!((second.as_ptr(), second.len()), (b.as_ptr(), 112));
        // The rest of the second piece; then, at its end, the next piece is fetched for it.
        let tail = r.take_shared(2888).unwrap().unwrap();
        assert_eq!(tail.as_ptr(), b[112..].as_ptr());
        let c = Bytes::from(vec![3u8; 1000]);
        guard.received(c.clone());
        let next = r.take_shared(1000).unwrap().unwrap();
        assert_eq!((next.as_ptr(), next.len()), (c.as_ptr(), 1000));
        guard.complete();
        assert!(r.take_shared(1).unwrap().is_none());
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0);
    }

    #[test]
    fn a_buffered_reader_behind_the_window_reads_the_file_in_small_steps() {
        let (_d, w, g, mut r) = pair();
        let pieces = three_windows(17, 5);
        let want: Vec<u8> = pieces.concat();
        write_handing_over(w, g.clone(), pieces, 1);
        assert!(
            g.state.lock().unwrap().window_at > 0,
            "the start is in the file only"
        );
        // Read back from the file, a body is never shared (and nothing is consumed asking).
        assert!(crate::intake::Input::take_shared(&mut r, 100)
            .unwrap()
            .is_none());
        // As a tar is read: 512-byte headers and bodies of any length, through the buffer.
        let mut got = Vec::new();
        let mut step = 512;
        loop {
            let held = r.fill_buf().unwrap();
            if held.is_empty() {
                break;
            }
            let n = held.len().min(step);
            got.extend_from_slice(&held[..n]);
            r.consume(n);
            step = if step == 512 { 70_001 } else { 512 };
            // The writer hears how far the reader is, block by block.
            let told = g.state.lock().unwrap().read;
            assert!(told + (1 << 20) as u64 >= got.len() as u64, "told {told}");
        }
        assert!(got == want);
    }

    #[test]
    fn a_reader_that_falls_behind_the_window_reads_the_rest_from_the_file() {
        let (_d, w, g, mut r) = pair();
        let pieces = three_windows(31, 7);
        let want: Vec<u8> = pieces.concat();
        let g2 = g.clone();
        // The whole upload arrives before the reader starts: the writer waits for it within
        // its budget, then lets it behind, and most of the upload spills to the file.
        write_handing_over(w, g2, pieces, 1);
        {
            let s = g.state.lock().unwrap();
            assert!(s.unpaced, "the writer gave up waiting");
            assert!(s.stalled >= PACE_FLOOR, "waited {:?}", s.stalled);
            assert!(s.window_bytes <= WINDOW, "held {} bytes", s.window_bytes);
            assert!(s.window_at > 0, "the oldest pieces were dropped");
        }
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert!(got == want);
    }

    #[test]
    fn the_writer_waits_for_a_reader_just_behind_so_it_never_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("upload.tar");
        let mut w = File::create(&p).unwrap();
        let g = Growing::with_pacing(Duration::from_secs(3600), Duration::from_secs(3600));
        let mut r = g.reader(File::open(&p).unwrap());
        let g2 = g.clone();
        let pieces = three_windows(31, 7);
        let want: Vec<u8> = pieces.concat();
        // The file gets other bytes of the same length: what the reader takes from it shows.
        let writer = std::thread::spawn(move || {
            let guard = FinishGuard::new(g);
            let mut n = 0u64;
            for p in pieces {
                let len = p.len();
                guard.received(Bytes::from(p));
                w.write_all(&vec![0xEE; len]).unwrap();
                n += len as u64;
                guard.grew(n);
            }
            guard.complete();
        });
        // A reader that starts late: without pacing the whole upload would have passed it.
        std::thread::sleep(Duration::from_millis(200));
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert!(got == want, "the reader read bytes from the file");
        // And the writer waited rather than hold the upload in memory.
        let s = g2.state.lock().unwrap();
        assert!(
            s.held_peak <= WINDOW + (1 << 20),
            "held {} bytes",
            s.held_peak
        );
        assert!(!s.unpaced && !s.stalled.is_zero());
    }

    /// When (seconds after the first piece) a writer pacing itself to a reader that reads at
    /// `speed` times the upload's speed runs out of budget, within `limit` seconds.
    fn budget_runs_out(speed: f64, limit: f64) -> Option<f64> {
        let step = Duration::from_millis(10);
        let (mut t, mut waited) = (Duration::ZERO, Duration::ZERO);
        while t.as_secs_f64() < limit {
            t += step;
            // To stay WINDOW ahead, the writer waits whatever share of the time the reader
            // needs beyond the upload's own.
            waited += step.mul_f64(1.0 - speed);
            if waited > pace_budget(PACE_FLOOR, t) {
                return Some(t.as_secs_f64());
            }
        }
        None
    }

    #[test]
    fn a_reader_half_as_fast_as_the_upload_keeps_it_paced_and_a_slower_one_is_let_behind() {
        assert_eq!(pace_budget(PACE_FLOOR, Duration::ZERO), PACE_FLOOR);
        assert_eq!(
            pace_budget(Duration::from_millis(250), Duration::from_secs(2)),
            Duration::from_millis(1250)
        );
        // A re-publish with a few files to compress: its reader at 55–90 % of the upload.
        for speed in [0.55, 0.6, 0.9] {
            assert_eq!(budget_runs_out(speed, 600.0), None, "speed {speed}");
        }
        // Compressing everything (a tenth of the upload's speed): let behind within a second.
        let cold = budget_runs_out(0.1, 600.0).unwrap();
        assert!(cold < 1.0, "{cold}");
        // Just below half: let behind, later.
        let slow = budget_runs_out(0.4, 600.0).unwrap();
        assert!((2.0..4.0).contains(&slow), "{slow}");
    }

    #[test]
    fn a_stuck_reader_holds_the_writer_up_only_so_long_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("upload.tar");
        let w = File::create(&p).unwrap();
        let g = Growing::with_pacing(Duration::from_secs(3600), Duration::from_millis(50));
        let mut r = g.reader(File::open(&p).unwrap());
        let pieces: Vec<Vec<u8>> = (0..3 * WINDOW / (1 << 20))
            .map(|i| vec![i as u8; 1 << 20])
            .collect();
        let want = pieces.concat();
        // The reader reads nothing until the upload is complete: an hour of budget, but a
        // wait of 50 ms at most at a time, after which the writer goes on for good.
        write_handing_over(w, g.clone(), pieces, 1);
        {
            let s = g.state.lock().unwrap();
            assert!(s.unpaced);
            assert!(
                s.stalled < Duration::from_secs(60),
                "waited {:?}",
                s.stalled
            );
        }
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert!(got == want);
    }

    #[test]
    fn a_dropped_reader_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("upload.tar");
        let w = File::create(&p).unwrap();
        let g = Growing::with_pacing(Duration::from_secs(3600), Duration::from_secs(3600));
        drop(g.reader(File::open(&p).unwrap()));
        let pieces: Vec<Vec<u8>> = (0..3 * WINDOW / (1 << 20))
            .map(|i| vec![i as u8; 1 << 20])
            .collect();
        // Would wait an hour for a reader that is gone.
        write_handing_over(w, g.clone(), pieces, 1);
        let s = g.state.lock().unwrap();
        assert!(s.reader_gone && !s.unpaced && s.stalled.is_zero());
        assert!(s.window_bytes <= WINDOW, "held {} bytes", s.window_bytes);
    }

    #[test]
    fn pieces_the_file_does_not_hold_yet_stay_in_the_window() {
        let (_d, w, g, mut r) = pair();
        let pieces: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1 << 20]).collect();
        let want: Vec<u8> = pieces.concat();
        let g2 = g.clone();
        // Writes reach the file only every 16 pieces: the window may exceed its size then.
        let writer = std::thread::spawn(move || write_handing_over(w, g2, pieces, 16));
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert!(got == want);
    }

    #[test]
    fn the_reader_runs_its_hook_only_before_it_waits() {
        let (_d, mut w, g, mut r) = pair();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        r.before_wait(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        w.write_all(b"0123456789").unwrap();
        g.grew(10);
        let mut buf = [0u8; 4];
        assert_eq!(r.read(&mut buf).unwrap(), 4);
        assert_eq!(calls.load(Ordering::SeqCst), 0, "bytes were there: no wait");
        let mut rest = [0u8; 16];
        assert_eq!(r.read(&mut rest).unwrap(), 6);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.write_all(b"abc").unwrap();
            g.grew(13);
            g.finish(true);
        });
        // Caught up: the hook runs once, then the read waits for the writer's bytes.
        assert_eq!(r.read(&mut rest).unwrap(), 3);
        assert_eq!(&rest[..3], b"abc");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        writer.join().unwrap();
        assert_eq!(r.read(&mut rest).unwrap(), 0);
    }

    #[test]
    fn a_waiting_reader_sees_the_cut_off_when_the_writer_drops() {
        let (_d, mut w, g, mut r) = pair();
        w.write_all(b"half a tar").unwrap();
        g.grew(10);
        let writer = std::thread::spawn(move || {
            let guard = FinishGuard::new(g);
            std::thread::sleep(Duration::from_millis(50));
            drop(guard); // an error or a dropped request: never completed
        });
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).unwrap_err();
        writer.join().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"half a tar");
    }

    #[test]
    fn a_waiting_reader_stops_when_told() {
        let (_d, _w, g, mut r) = pair();
        let stop = Arc::new(AtomicBool::new(false));
        r.stop_when(stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            r.read(&mut buf)
        });
        std::thread::sleep(Duration::from_millis(30));
        stop.store(true, Ordering::SeqCst);
        let e = reader.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Other);
        drop(g);
    }

    #[test]
    fn only_the_first_finish_counts() {
        let (_d, _w, g, mut r) = pair();
        g.finish(true);
        g.finish(false);
        let mut got = Vec::new();
        assert_eq!(r.read_to_end(&mut got).unwrap(), 0);
    }

    #[test]
    fn a_length_the_file_does_not_hold_is_an_error_not_a_short_tar() {
        let (_d, _w, g, mut r) = pair();
        g.grew(100);
        g.finish(true);
        let mut buf = [0u8; 64];
        assert!(r.read(&mut buf).is_err());
    }
}
