//! What the benchmarks share: the integration tests' helpers (free loopback ports, real
//! Stratum 1 receivers — `cvmfs-prepub --mode receiver` processes — for the pre-warm pushes),
//! plus a readiness wait for the daemons the harness starts. Not every bench uses every helper.
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::time::Duration;

#[path = "../../tests/common/mod.rs"]
mod shared;

pub use shared::{free_port, Rcv as Receiver, REPO};

pub const SECRET: &str = "bench-receiver-secret";

/// Waits until `url` answers at all.
pub fn wait_up(url: &str) {
    let c = reqwest::blocking::Client::new();
    for _ in 0..400 {
        if c.get(url).send().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{url} did not come up");
}

/// Starts a receiver for [`REPO`] with its storage under `dir/name`, signing with [`SECRET`].
pub fn receiver(dir: &Path, name: &str) -> Receiver {
    shared::start_receiver(&dir.join(name), SECRET, None, &[], "")
}
