//! Pre-warming benchmark: a payload of pseudo-random data objects (BENCH_OBJECTS, default 1500,
//! 4 KiB–256 KiB, about 190 MiB) pushed by the distributor to one receiver, then to three
//! receivers at once (real `cvmfs-prepub --mode receiver` processes on loopback), then again to
//! one that already holds everything (inventory only). The machine's own limit, measured in the
//! same run, is a local copy of the same objects into a fresh storage with the receiver's
//! durability (SHA-1 check, fsync, atomic rename) by eight threads — the work a receiver cannot
//! avoid, without HTTP.
//! Run with `cargo bench --bench distribution`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prepub_actors::s1_distributor::{push_objects, DistributionSettings, Payload};
use prepub_core::cas::{get_all, Cas, LocalCas};
use prepub_core::hash::{Digest20, ObjectId, Suffix};

mod common;
use common::{receiver, Receiver, REPO, SECRET};

/// xorshift bytes: incompressible, reproducible.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn main() {
    let n: usize = std::env::var("BENCH_OBJECTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let dir = tempfile::tempdir().unwrap();
    let src = Arc::new(LocalCas::create(&dir.path().join("publisher")).unwrap());
    let mut objects = Vec::new();
    let mut bytes = 0u64;
    for i in 0..n {
        let len = 4096 + (i * 7919) % (252 * 1024);
        let data = pseudo_random(len, i as u64 + 1);
        let id = ObjectId::new(Digest20::of(&data), Suffix::None);
        src.put_bytes(&id, &data).unwrap();
        objects.push(id);
        bytes += len as u64;
    }
    let mib = bytes as f64 / (1 << 20) as f64;

    // The limit: the same objects read, verified and written durably into a fresh storage.
    // Eight writers, as many as the pushes keep in flight, so fsync latency overlaps alike.
    let t = Instant::now();
    let copy = LocalCas::create(&dir.path().join("copy")).unwrap();
    std::thread::scope(|s| {
        for part in objects.chunks(objects.len().div_ceil(8)) {
            let (src, copy) = (&src, &copy);
            s.spawn(move || {
                for id in part {
                    let data = get_all(src.as_ref(), id).unwrap();
                    assert_eq!(Digest20::of(&data), id.digest);
                    copy.put_bytes(id, &data).unwrap();
                }
            });
        }
    });
    let limit = t.elapsed();

    let settings = DistributionSettings {
        quorum: 1.0,
        timeout: Duration::from_secs(600),
        commit_anyway: false,
        per_s1_concurrency: 8,
        secret: Some(SECRET.into()),
        identity_pem: None,
        ca_pem: None,
    };
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let cas: Arc<dyn Cas> = src.clone();
    let push = |url: &str, id: &str| {
        let payload = Payload {
            id,
            repo: REPO,
            objects: &objects,
            bytes,
            cas: cas.clone(),
            // Journaled acknowledgements, as in the daemon (one fresh log per push).
            ack_log: Some(prepub_core::spool::AckLog::path(
                dir.path(),
                &format!("{id}{url}"),
            )),
            progress: None,
            grant: None,
        };
        push_objects(url, &settings, http.clone(), &payload).unwrap()
    };

    let one = receiver(dir.path(), "s1-one");
    let t = Instant::now();
    let pushed = push(&one.url, "one").pushed;
    let t_one = t.elapsed();
    assert_eq!(pushed as usize, n);
    let t = Instant::now();
    let r = push(&one.url, "again");
    let (again, present) = (r.pushed, r.present);
    let t_again = t.elapsed();
    assert_eq!((again as usize, present as usize), (0, n));
    drop(one);

    let three: Vec<Receiver> = (0..3)
        .map(|i| receiver(dir.path(), &format!("s1-three-{i}")))
        .collect();
    let t = Instant::now();
    let each: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = three
            .iter()
            .map(|r| {
                s.spawn(|| {
                    let t = Instant::now();
                    let got = push(&r.url, "three");
                    (got, t.elapsed())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                let (got, d) = h.join().unwrap();
                assert_eq!(got.pushed as usize, n);
                d
            })
            .collect()
    });
    let t_three = t.elapsed();
    drop(three);

    let s = |d: Duration| d.as_secs_f64();
    println!(
        "distribution: {n} objects, {mib:.1} MiB, per_s1_concurrency 8, {} cores",
        std::thread::available_parallelism().map_or(1, |c| c.get())
    );
    println!(
        "  limit (verified durable local copy, 8 threads): {:.2} s ({:.0} MiB/s)",
        s(limit),
        mib / s(limit)
    );
    println!(
        "  1 receiver:  {:.2} s ({:.0} objects/s, {:.0} MiB/s) = {:.2} of the limit",
        s(t_one),
        n as f64 / s(t_one),
        mib / s(t_one),
        s(limit) / s(t_one)
    );
    println!(
        "  3 receivers: {:.2} s ({:.0} MiB/s pushed in all) = {:.2} of 3x the limit; {:.2}x the time of one",
        s(t_three),
        3.0 * mib / s(t_three),
        3.0 * s(limit) / s(t_three),
        s(t_three) / s(t_one)
    );
    for (i, d) in each.iter().enumerate() {
        println!(
            "    receiver {i}: {:.2} s ({:.0} objects/s, {:.0} MiB/s)",
            s(*d),
            n as f64 / s(*d),
            mib / s(*d)
        );
    }
    println!(
        "  again, receiver already holds everything (announce + inventory only): {:.3} s = {:.3} of the first push",
        s(t_again),
        s(t_again) / s(t_one)
    );
}
