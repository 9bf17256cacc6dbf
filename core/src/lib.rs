#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
//! prepub-core: the CVMFS repository formats, content-addressed storage and publish pipeline of
//! cvmfs-prepub, as plain synchronous Rust. Nothing here knows about actix or async; the daemon's
//! actors are thin shells around these types.

pub mod access;
pub mod cas;
pub mod catalog;
pub mod check;
pub mod chunker;
pub mod content;
pub mod control;
pub mod cron;
pub mod directio;
pub mod gateway;
pub mod gc;
pub mod gcrun;
pub mod growing;
pub mod hash;
pub mod history;
pub mod intake;
pub mod jobs;
pub mod keys;
pub mod lifecycle;
pub mod manifest;
pub mod merge;
pub mod object;
pub mod pipeline;
pub mod pzlib;
pub mod rawindex;
pub mod receiver;
pub mod repo;
pub mod spool;
pub mod timefmt;

/// The cores this process may run on (1 when that cannot be told).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Drops `v` on a thread of its own: freeing a large structure (the tens of thousands of
/// strings of a change set or of a catalog build's path sets) takes milliseconds that need
/// not delay whoever waits for the result. If no thread can be started, `v` is dropped here.
pub fn drop_aside<T: Send + 'static>(v: T) {
    let _ = std::thread::Builder::new()
        .name("drop".into())
        .spawn(move || drop(v));
}

#[cfg(test)]
mod tests {
    #[test]
    fn drop_aside_drops_on_another_thread() {
        struct Tell(std::sync::mpsc::Sender<Option<String>>);
        impl Drop for Tell {
            fn drop(&mut self) {
                let name = std::thread::current().name().map(String::from);
                let _ = self.0.send(name);
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        super::drop_aside(Tell(tx));
        let by = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(by.as_deref(), Some("drop"));
    }
}
