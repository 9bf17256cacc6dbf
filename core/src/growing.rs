//! A file that is still being written, read as it grows: lets a job's tar be processed while
//! its upload is still arriving.
//!
//! The writer (the upload's writer thread) reports each new length with [`Growing::grew`] and
//! the end with [`Growing::finish`] — complete, or cut off. A [`FollowReader`] on its own
//! descriptor of the same file returns bytes up to the reported length, waits when it has caught
//! up, returns end-of-file only once the upload is complete, and an error if it was cut off.
//! Nothing here is durable: whether the bytes become a job is decided by the spool once the
//! upload is accepted. [`FinishGuard`] makes sure a writer that stops for any reason (error,
//! panic, request dropped) wakes its reader.

use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

#[derive(Default)]
struct State {
    len: u64,
    /// `Some(true)`: the upload is complete; `Some(false)`: it was cut off.
    end: Option<bool>,
}

/// The shared length and end state of a file being written.
#[derive(Default)]
pub struct Growing {
    state: Mutex<State>,
    changed: Condvar,
}

impl Growing {
    pub fn new() -> Arc<Growing> {
        Arc::new(Growing::default())
    }

    /// The file now holds `len` bytes.
    pub fn grew(&self, len: u64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.len = s.len.max(len);
        self.changed.notify_all();
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
            file,
            pos: 0,
            growing: self.clone(),
            stop: None,
        }
    }
}

/// Reports the upload cut off when dropped before [`FinishGuard::complete`].
pub struct FinishGuard(Option<Arc<Growing>>);

impl FinishGuard {
    pub fn new(g: Arc<Growing>) -> FinishGuard {
        FinishGuard(Some(g))
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

/// Reads a [`Growing`] file as it is written.
pub struct FollowReader {
    file: File,
    pos: u64,
    growing: Arc<Growing>,
    stop: Option<Arc<AtomicBool>>,
}

impl FollowReader {
    /// A reader waiting for bytes gives up (with an error) once `flag` is set.
    pub fn stop_when(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }
}

/// How often a waiting reader looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

impl Read for FollowReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let available = {
            let mut s = self
                .growing
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            loop {
                if s.len > self.pos {
                    break s.len - self.pos;
                }
                match s.end {
                    Some(true) => return Ok(0),
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
                        s = self
                            .growing
                            .changed
                            .wait_timeout(s, STOP_CHECK)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                }
            }
        };
        let want = buf
            .len()
            .min(usize::try_from(available).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            // The writer reported bytes the file does not hold: not the same file.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the upload file is shorter than written",
            ));
        }
        self.pos += n as u64;
        Ok(n)
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
