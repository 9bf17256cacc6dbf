//! Test-only fault injection, driven by environment variables that production never sets:
//! `CVMFS_PREPUB_TEST_CRASH=<point>` aborts the process (like SIGKILL: no cleanup, no flush)
//! when execution reaches `<point>`; `CVMFS_PREPUB_TEST_HOLD=<point>=<ms>,...` sleeps there, to
//! hold a job in a state; `CVMFS_PREPUB_TEST_FAIL=<point>#<n>` makes the n-th pass of a point
//! that can fail (see [`fails`]) report an I/O error. Points are named after the journaled
//! steps of a job.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// `<point>#<n>`: the point, and the `n` given (None without `#`; Some(None) when it does not
/// parse).
fn split_nth(spec: &str) -> (&str, Option<Option<usize>>) {
    match spec.trim().split_once('#') {
        Some((p, n)) => (p, Some(n.parse().ok())),
        None => (spec.trim(), None),
    }
}

/// Holds by point: how long, and at which pass only (`<point>#<n>=<ms>`; every pass without).
fn holds() -> &'static HashMap<String, (u64, Option<usize>)> {
    static H: OnceLock<HashMap<String, (u64, Option<usize>)>> = OnceLock::new();
    H.get_or_init(|| {
        std::env::var("CVMFS_PREPUB_TEST_HOLD")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                let ms = v.trim().parse().ok()?;
                let (p, nth) = split_nth(k);
                let nth = match nth {
                    Some(n) => Some(n?),
                    None => None,
                };
                Some((p.to_string(), (ms, nth)))
            })
            .collect()
    })
}

/// Passes of each held point so far (for holds at one pass only).
fn passes(name: &str) -> usize {
    static P: OnceLock<std::sync::Mutex<HashMap<String, usize>>> = OnceLock::new();
    let mut m = P
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let n = m.entry(name.to_string()).or_insert(0);
    *n += 1;
    *n
}

/// The crash point and the pass to crash at (the first unless `#<n>` says otherwise).
fn crash_at() -> &'static Option<(String, usize)> {
    static C: OnceLock<Option<(String, usize)>> = OnceLock::new();
    C.get_or_init(|| nth_of_var("CVMFS_PREPUB_TEST_CRASH"))
}

/// A `<point>#<n>` variable: the point and `n` (1 when left out or unreadable).
fn nth_of_var(var: &str) -> Option<(String, usize)> {
    let v = std::env::var(var).ok().filter(|s| !s.is_empty())?;
    let (p, n) = split_nth(&v);
    Some((p.to_string(), n.flatten().unwrap_or(1)))
}

/// Marks a point: crashes or sleeps there if a test asked for it. Only call from blocking
/// threads when a hold is possible (holds sleep the calling thread). The `*-journaled` points
/// run on the job manager's thread: a hold there stalls every request (a test's status poll
/// and abort included), so tests crash there but hold elsewhere (`processing`,
/// `commit-started`). A crash point written
/// `<point>#<n>` crashes the n-th time the point is reached; a hold written `<point>#<n>=<ms>`
/// holds only the n-th time.
pub fn point(name: &str) {
    if let Some((p, nth)) = crash_at() {
        if p == name {
            static REACHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let k = REACHED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if k == *nth {
                eprintln!("test hook: crashing at {name} (time {k})");
                std::process::abort();
            }
        }
    }
    if let Some((ms, nth)) = holds().get(name) {
        if nth.is_none_or(|n| passes(name) == n) {
            std::thread::sleep(Duration::from_millis(*ms));
        }
    }
}

/// Whether the step at `name` is to fail this time (`CVMFS_PREPUB_TEST_FAIL=<point>#<n>`: the
/// n-th time it is reached, the first when `#<n>` is left out).
pub fn fails(name: &str) -> bool {
    static FAIL: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static REACHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Some((point, nth)) = FAIL.get_or_init(|| nth_of_var("CVMFS_PREPUB_TEST_FAIL")) else {
        return false;
    };
    point == name && REACHED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == *nth
}
