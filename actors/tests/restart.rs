//! Supervision: a stopped `JobManager` is restarted by its supervisor and rebuilds its job table
//! from the journal; jobs that were in flight still finish.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use prepub_actors::compressor_pool::CompressorPool;
use prepub_actors::job_manager::{Crash, GetJob, JobManager, Settings, SubmitJob};
use prepub_actors::metrics::Metrics;
use prepub_actors::publisher::{Publisher, RepoTarget};
use prepub_actors::spool_journal::SpoolJournal;
use prepub_core::intake::IntakeLimits;
use prepub_core::jobs::{now_ms, JobRecord, JobState};
use prepub_core::keys::RepoKeys;
use prepub_core::object::EncodeParams;
use prepub_core::spool::Spool;

fn tar_with(name: &str, body: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_cksum();
    b.append(&h, body).unwrap();
    b.into_inner().unwrap()
}

#[actix_rt::test]
async fn job_manager_restarts_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let keys_dir = dir.path().join("keys");
    let keys = RepoKeys::generate("restart.example.org", 30).unwrap();
    keys.save(&keys_dir).unwrap();
    let cas = prepub_core::cas::LocalCas::create(&storage).unwrap();
    prepub_core::repo::init(&cas, &keys, 0, 0, prepub_core::timefmt::now()).unwrap();

    let (spool, jobs) = Spool::open(&dir.path().join("spool")).unwrap();
    let slot = std::sync::Mutex::new(Some((spool, jobs)));
    let journal = SyncArbiter::start(1, move || {
        let (s, j) = slot.lock().unwrap().take().unwrap();
        SpoolJournal::new(s, j)
    });
    let pool =
        CompressorPool::new(1, &prepub_actors::cas_writer::CasWriter::new(4).store()).start();
    let target = RepoTarget {
        name: "restart.example.org".into(),
        storage: storage.clone(),
        keys_dir,
        s3: None,
        raw_index: None,
        tag_expiry: None,
        prebuild_catalogs: true,
    };
    let publisher = Publisher::new(vec![target.clone()]).start();
    let settings = Arc::new(Settings {
        repos: [(target.name.clone(), target)].into_iter().collect(),
        params: EncodeParams::default(),
        limits: IntakeLimits::default(),
        max_attempts: 3,
        retry_backoff: Duration::from_millis(100),
        tar_retention: Duration::from_secs(3600),
        spool_root: dir.path().join("spool"),
        distribution: None,
        draining: Default::default(),
        access: None,
    });
    let metrics = Metrics::new();
    let restarts = metrics.actor_restarts_total.clone();
    let jm = Supervisor::start(move |_| {
        JobManager::new(
            settings.clone(),
            journal.clone(),
            pool.clone(),
            publisher.clone().recipient(),
            metrics.clone(),
        )
    });

    let submit = |id: &str, path: &str| {
        let upload = dir.path().join("spool/incoming").join(format!("{id}.tar"));
        std::fs::write(&upload, tar_with("f", id.as_bytes())).unwrap();
        SubmitJob {
            record: JobRecord::new(
                id.into(),
                "restart.example.org".into(),
                path.into(),
                now_ms(),
            ),
            upload,
            tar_synced: true,
        }
    };
    jm.send(submit("job-1", "/one")).await.unwrap().unwrap();
    // Kill the actor while job-1 is in flight, and again after job-2 was accepted.
    jm.send(Crash).await.unwrap();
    jm.send(submit("job-2", "/two")).await.unwrap().unwrap();
    jm.do_send(Crash);
    let mut states = Vec::new();
    for _ in 0..300 {
        actix_rt::time::sleep(Duration::from_millis(50)).await;
        let a = jm.send(GetJob("job-1".into())).await.unwrap();
        let b = jm.send(GetJob("job-2".into())).await.unwrap();
        states = vec![a.map(|j| j.state), b.map(|j| j.state)];
        if states.iter().all(|s| *s == Some(JobState::Published)) {
            break;
        }
    }
    assert_eq!(
        states,
        vec![Some(JobState::Published), Some(JobState::Published)]
    );
    // Both restarts were counted.
    assert_eq!(restarts.with_label_values(&["JobManager"]).get(), 2);
    // Both publishes happened exactly once.
    let (m, _) = prepub_core::repo::current_manifest(&cas).unwrap().unwrap();
    assert_eq!(m.revision, 3);
    let report =
        prepub_core::check::check(&cas, Some(&keys.master_pub), prepub_core::timefmt::now());
    assert!(report.ok(), "{:?}", report.findings);
}
