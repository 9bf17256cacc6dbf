//! `CompressorPool`: the threads that do the CPU work of a job — unpacking the tar, cutting
//! chunks, zlib, SHA-1 — and write the objects into the repository's CAS.
//!
//! The actor is a thin front: `ProcessJob` puts a task on a crossbeam channel read by tar-reader
//! threads; each reader cuts files into whole-file and chunk tasks for the encode pipeline
//! (`pipeline.workers` zlib/SHA-1 threads, `pipeline.upload_concurrency` store threads), so no
//! CPU work ever runs on an async arbiter and one job uses every core. Each task
//! reports progress and its outcome back to the recipients given with it. Work is checked for
//! abort between reads, so an aborted job stops within one read buffer.
//!
//! A tar still being uploaded ([`TarSource::Upload`]) gets a reader thread of its own: it waits
//! for the client's bytes, and must not hold up the shared readers of accepted jobs while it does.

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use actix::prelude::*;
use crossbeam_channel::{unbounded, Receiver, Sender};
use prepub_core::cas::Cas;
use prepub_core::directio::DirectReader;
use prepub_core::growing::FollowReader;
use prepub_core::intake::{read_tar_streamed, ChangeSet, Input, IntakeError, IntakeLimits};
use prepub_core::jobs::Progress;
use prepub_core::object::EncodeParams;
use prepub_core::pipeline::{Batcher, Pipeline, StorePool};
use prepub_core::repo::PrebuildStream;
use prepub_core::spool::SerializedChangeset;

/// What finished processing reports.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Processed {
    pub job_id: String,
    /// The [`ProcessJob::run`] this answers.
    pub run: u64,
    pub outcome: Result<ChangeSet, ProcessError>,
    /// The change set serialized while its catalogs were compressed (see `run_task`), for the
    /// spool to store as it is.
    pub serialized: Option<SerializedChangeset>,
}

/// A progress report while processing.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ProgressMade {
    pub job_id: String,
    pub progress: Progress,
}

/// Why processing failed.
#[derive(Debug, Clone)]
pub struct ProcessError {
    pub code: &'static str,
    pub message: String,
    /// Worth retrying (I/O trouble) rather than a bad tar.
    pub retryable: bool,
}

/// Where a job's tar is read from.
pub enum TarSource {
    /// The accepted tar in the spool.
    Spool(PathBuf),
    /// An upload still arriving, followed as it grows.
    Upload(FollowReader),
}

/// Processes one job's tar into its repository's CAS.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProcessJob {
    pub job_id: String,
    /// Which processing of the job this is: echoed in [`Processed`], so the job manager can tell
    /// a stale answer (a run it gave up on) from the one it waits for.
    pub run: u64,
    pub tar: TarSource,
    pub target: crate::publisher::RepoTarget,
    /// The job's path in the repository (`""`: the root).
    pub path: String,
    pub params: EncodeParams,
    pub limits: IntakeLimits,
    pub abort: Arc<AtomicBool>,
    pub done: Recipient<Processed>,
    pub progress: Recipient<ProgressMade>,
}

pub struct CompressorPool {
    tx: Sender<ProcessJob>,
    workers: usize,
    pipeline: Pipeline,
}

impl CompressorPool {
    /// Starts `workers` encoder threads (0 = one per core) feeding `store` (the `CasWriter`'s
    /// pool), and as many tar-reader threads as encoders (jobs processed at once).
    pub fn new(workers: usize, store: &StorePool) -> CompressorPool {
        let pipeline = Pipeline::with_store(workers, store);
        let n = pipeline.cpu_workers();
        let (tx, rx) = unbounded::<ProcessJob>();
        for i in 0..n {
            let rx: Receiver<ProcessJob> = rx.clone();
            let pipeline = pipeline.clone();
            let _ = thread::Builder::new()
                .name(format!("tar-reader-{i}"))
                .spawn(move || {
                    while let Ok(task) = rx.recv() {
                        run_task(task, &pipeline);
                    }
                });
        }
        CompressorPool {
            tx,
            workers: n,
            pipeline,
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }
}

impl Actor for CompressorPool {
    type Context = Context<Self>;
}

impl Handler<ProcessJob> for CompressorPool {
    type Result = ();
    fn handle(&mut self, m: ProcessJob, _: &mut Context<Self>) {
        if let TarSource::Upload(_) = m.tar {
            let (done, job_id, run) = (m.done.clone(), m.job_id.clone(), m.run);
            let pipeline = self.pipeline.clone();
            let spawned = thread::Builder::new()
                .name("upload-reader".into())
                .spawn(move || run_task(m, &pipeline));
            if let Err(e) = spawned {
                // Retryable: an accepted job is then processed again from its spooled tar.
                done.do_send(Processed {
                    job_id,
                    run,
                    outcome: Err(ProcessError {
                        code: "spool-read",
                        message: format!("no thread to read the upload: {e}"),
                        retryable: true,
                    }),
                    serialized: None,
                });
            }
            return;
        }
        // The receiving threads live as long as the process; a send cannot fail while they do.
        let _ = self.tx.send(m);
    }
}

/// Counts bytes, reports progress now and then, and stops when the job is aborted.
struct Watched<R> {
    inner: R,
    abort: Arc<AtomicBool>,
    read: u64,
    last_report: u64,
    job_id: String,
    progress: Recipient<ProgressMade>,
}

impl<R> Watched<R> {
    fn check(&self) -> std::io::Result<()> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("job aborted"));
        }
        Ok(())
    }

    fn count(&mut self, n: usize) {
        self.read += n as u64;
        if self.read - self.last_report >= 32 << 20 {
            self.last_report = self.read;
            self.progress.do_send(ProgressMade {
                job_id: self.job_id.clone(),
                progress: Progress {
                    bytes_processed: self.read,
                    ..Progress::default()
                },
            });
        }
    }
}

impl<R: BufRead> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check()?;
        let n = self.inner.read(buf)?;
        self.count(n);
        Ok(n)
    }
}

/// Passes the input's own buffer through (the tar's bytes are copied once, out of it, or not at
/// all: see [`Input::take_shared`]).
impl<R: BufRead> BufRead for Watched<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.check()?;
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.inner.consume(n);
        self.count(n);
    }
}

impl<R: Input> Input for Watched<R> {
    fn take_shared(&mut self, n: usize) -> std::io::Result<Option<bytes::Bytes>> {
        self.check()?;
        let taken = self.inner.take_shared(n)?;
        if let Some(t) = &taken {
            self.count(t.len());
        }
        Ok(taken)
    }
}

fn run_task(t: ProcessJob, pipeline: &Pipeline) {
    crate::testhook::point("processing");
    let mut serialized = None;
    let outcome = (|| -> Result<ChangeSet, ProcessError> {
        let io_err = |code: &'static str, e: String| ProcessError {
            code,
            message: e,
            retryable: true,
        };
        let cas: Arc<dyn Cas> = t
            .target
            .cas(true)
            .map_err(|e| io_err("cas-unavailable", e.to_string()))?;
        let batcher = Batcher::new(pipeline);
        let input: Box<dyn Input> = match t.tar {
            // Read around the page cache, in blocks, like the upload it was written as.
            TarSource::Spool(ref p) => Box::new(DirectReader::new(
                std::fs::File::open(p).map_err(|e| io_err("spool-read", e.to_string()))?,
                true,
            )),
            TarSource::Upload(mut r) => {
                // Nothing held back while the reader waits for the client's bytes.
                let b = batcher.clone();
                r.before_wait(Box::new(move || b.hand_over()));
                Box::new(r)
            }
        };
        let watched = Watched {
            inner: input,
            abort: t.abort.clone(),
            read: 0,
            last_report: 0,
            job_id: t.job_id.clone(),
            progress: t.progress.clone(),
        };
        let now = prepub_core::timefmt::now();
        let cas = prepub_core::intake::IndexedCas {
            cas,
            index: t.target.raw_index.clone(),
        };
        let top_level = t.path.is_empty();
        // The catalogs of a new release are built while its tar is read (see
        // `repo::PrebuildStream`); stored with durable puts, as the commit stores catalogs.
        let stream = if t.target.prebuild_catalogs {
            t.target.cas(false).ok().and_then(|c| {
                PrebuildStream::start(c, &t.path, t.params, prepub_core::timefmt::now())
            })
        } else {
            None
        };
        let tell = stream.as_ref().and_then(|s| s.sender());
        let cs = read_tar_streamed(watched, top_level, &t.params, &t.limits, cas, &batcher, now, tell).map_err(|e| {
            if t.abort.load(Ordering::Relaxed) {
                return ProcessError {
                    code: "aborted",
                    message: "job aborted".into(),
                    retryable: false,
                };
            }
            let retryable = matches!(&e, IntakeError::Encode { source: prepub_core::object::EncodeError::Cas(c), .. } if c.is_retryable());
            ProcessError {
                code: if retryable { "cas-write" } else { "bad-tar" },
                message: e.to_string(),
                retryable,
            }
        })?;
        let cs = match stream {
            Some(s) if !t.abort.load(Ordering::Relaxed) => {
                // The builder completes and compresses the catalogs; this one serializes the
                // change set for the spool meanwhile (it is saved before the commit).
                let (mut cs, built, ahead) = s.finish_with(cs, SerializedChangeset::of);
                cs.prebuilt = built.map(Arc::new);
                serialized = ahead;
                cs
            }
            _ => cs,
        };
        Ok(cs)
    })();
    crate::testhook::point("processed");
    t.done.do_send(Processed {
        job_id: t.job_id,
        run: t.run,
        outcome,
        serialized,
    });
}
