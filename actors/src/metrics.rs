//! Prometheus metrics of the publisher, registered once, all named `cvmfs_prepub_*` (install
//! guide §12.5), with a `path` label where the guide names one.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub jobs_submitted_total: IntCounterVec,
    pub jobs_published_total: IntCounterVec,
    pub job_failures_by_class_total: IntCounterVec,
    pub jobs_recovered_total: IntCounter,
    pub pipeline_dedup_hits_total: IntCounterVec,
    pub pipeline_objects_new_total: IntCounterVec,
    pub pipeline_bytes_total: IntCounterVec,
    pub catalogs_prebuilt_total: IntCounter,
    pub cas_upload_duration_seconds: Histogram,
    pub commit_duration_seconds: Histogram,
    pub jobs_in_state: IntGaugeVec,
    pub distribution_duration_seconds: prometheus::HistogramVec,
    pub distribution_objects_total: IntCounterVec,
    pub distribution_bytes_total: IntCounterVec,
    pub job_phase_duration_seconds: prometheus::HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub actor_restarts_total: IntCounterVec,
    pub lease_heartbeat_lateness_seconds: Histogram,
    pub access_events_total: IntCounterVec,
    pub access_events_collapsed_total: IntCounterVec,
    pub access_log_lines_skipped_total: IntCounterVec,
    pub gc_lifecycle_removals_total: IntCounterVec,
    pub gc_objects_tombstoned_total: IntCounterVec,
    pub gc_tombstones_revoked_total: IntCounterVec,
    pub gc_bytes_tombstoned_total: IntCounterVec,
    pub gc_bytes_revoked_total: IntCounterVec,
    pub gc_tombstones_pending: IntGaugeVec,
    pub gc_runs_total: IntCounterVec,
    pub gc_objects_deleted_total: IntCounterVec,
    pub gc_bytes_reclaimed_total: IntCounterVec,
    pub gc_run_duration_seconds: Histogram,
    pub gc_last_run_timestamp_seconds: IntGaugeVec,
    pub mqtt_connected: prometheus::IntGauge,
    pub mqtt_messages_total: IntCounterVec,
    pub mqtt_ignored_total: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let cv = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(format!("cvmfs_prepub_{name}"), help), labels)
                .expect("valid metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let jobs_submitted_total = cv(
            "jobs_submitted_total",
            "Jobs accepted, by publish path",
            &["path"],
        );
        let jobs_published_total = cv(
            "jobs_published_total",
            "Jobs published, by publish path",
            &["path"],
        );
        let job_failures_by_class_total = cv(
            "job_failures_by_class_total",
            "Failed jobs by class (permanent: bad input or configuration; transient: gave up after retries)",
            &["class"],
        );
        let pipeline_dedup_hits_total = cv(
            "pipeline_dedup_hits_total",
            "Objects already present in the CAS, by publish path",
            &["path"],
        );
        let pipeline_objects_new_total = cv(
            "pipeline_objects_new_total",
            "Objects written to the CAS, by publish path",
            &["path"],
        );
        let pipeline_bytes_total = cv(
            "pipeline_bytes_total",
            "Uncompressed file bytes processed, by publish path",
            &["path"],
        );
        let catalogs_prebuilt_total = IntCounter::new(
            "cvmfs_prepub_catalogs_prebuilt_total",
            "Jobs whose processing built their release's catalogs ahead of the commit",
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(catalogs_prebuilt_total.clone()))
            .expect("metric registered once");
        let jobs_recovered_total = IntCounter::new(
            "cvmfs_prepub_jobs_recovered_total",
            "Unfinished jobs resumed after a restart",
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(jobs_recovered_total.clone()))
            .expect("metric registered once");
        let hist = |name: &str, help: &str| {
            let h = Histogram::with_opts(
                HistogramOpts::new(format!("cvmfs_prepub_{name}"), help)
                    .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0]),
            )
            .expect("valid metric definition");
            registry
                .register(Box::new(h.clone()))
                .expect("metric registered once");
            h
        };
        let cas_upload_duration_seconds = hist(
            "cas_upload_duration_seconds",
            "Time to unpack, compress, hash and store one job's objects in the CAS",
        );
        let commit_duration_seconds = hist(
            "commit_duration_seconds",
            "Time from entering committing to published",
        );
        let jobs_in_state = IntGaugeVec::new(
            Opts::new("cvmfs_prepub_jobs_in_state", "Jobs currently in each state"),
            &["state"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(jobs_in_state.clone()))
            .expect("metric registered once");
        let distribution_duration_seconds = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "cvmfs_prepub_distribution_duration_seconds",
                "Time to pre-warm one Stratum 1 for one job",
            )
            .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0]),
            &["stratum1"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(distribution_duration_seconds.clone()))
            .expect("metric registered once");
        let distribution_objects_total = cv(
            "distribution_objects_total",
            "Objects pushed to each Stratum 1",
            &["stratum1"],
        );
        let distribution_bytes_total = cv(
            "distribution_bytes_total",
            "Bytes pushed to each Stratum 1",
            &["stratum1"],
        );
        let job_phase_duration_seconds = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "cvmfs_prepub_job_phase_duration_seconds",
                "Time jobs spent in each state before leaving it",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0,
            ]),
            &["phase"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(job_phase_duration_seconds.clone()))
            .expect("metric registered once");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "cvmfs_prepub_queue_depth",
                "Jobs waiting: for a processing slot (queue=processing) or in the commit queue (queue=commit)",
            ),
            &["queue"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("metric registered once");
        let actor_restarts_total = cv(
            "actor_restarts_total",
            "Supervised actors restarted after a failure",
            &["actor"],
        );
        let lease_heartbeat_lateness_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cvmfs_prepub_lease_heartbeat_lateness_seconds",
                "How late each gateway lease heartbeat tick ran",
            )
            .buckets(vec![0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(lease_heartbeat_lateness_seconds.clone()))
            .expect("metric registered once");
        // Process metrics (CPU, memory, file descriptors, start time) of this daemon.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric registered once");
        let access_events_total = cv(
            "access_events_total",
            "Access events recorded, by repository and source (api, log, publish)",
            &["repo", "source"],
        );
        let access_events_collapsed_total = cv(
            "access_events_collapsed_total",
            "Access events dropped as repeats within the collapse window",
            &["repo"],
        );
        let access_log_lines_skipped_total = cv(
            "access_log_lines_skipped_total",
            "Access log lines that did not match the configured format (or another repository)",
            &["repo"],
        );
        let gc_lifecycle_removals_total = cv(
            "gc_lifecycle_removals_total",
            "Paths the content lifecycle sent out of the namespace (removal jobs)",
            &["repo"],
        );
        let gc_objects_tombstoned_total = cv(
            "gc_objects_tombstoned_total",
            "Unreferenced objects tombstoned (deleted by a later run after the soft-delete period)",
            &["repo"],
        );
        let gc_tombstones_revoked_total = cv(
            "gc_tombstones_revoked_total",
            "Tombstones revoked: the object was seen again, or referenced again",
            &["repo"],
        );
        let gc_bytes_tombstoned_total = cv(
            "gc_bytes_tombstoned_total",
            "Bytes of the objects tombstoned",
            &["repo"],
        );
        let gc_bytes_revoked_total = cv(
            "gc_bytes_revoked_total",
            "Bytes of the objects whose tombstones were revoked (seen or referenced again, or the run aborted)",
            &["repo"],
        );
        let gc_tombstones_pending = IntGaugeVec::new(
            Opts::new(
                "cvmfs_prepub_gc_tombstones_pending",
                "Tombstoned objects awaiting deletion, as of the last run",
            ),
            &["repo"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(gc_tombstones_pending.clone()))
            .expect("metric registered once");
        let gc_runs_total = cv(
            "gc_runs_total",
            "Garbage collection runs, by repository and outcome (swept, dry-run, cleaned, aborted, failed, refused)",
            &["repo", "outcome"],
        );
        let gc_objects_deleted_total = cv(
            "gc_objects_deleted_total",
            "Unreferenced objects deleted by garbage collection",
            &["repo"],
        );
        let gc_bytes_reclaimed_total = cv(
            "gc_bytes_reclaimed_total",
            "Bytes of objects deleted by garbage collection",
            &["repo"],
        );
        let gc_run_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cvmfs_prepub_gc_run_duration_seconds",
                "Duration of garbage collection runs (scan and sweep)",
            )
            .buckets(vec![0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 7200.0]),
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(gc_run_duration_seconds.clone()))
            .expect("metric registered once");
        let gc_last_run_timestamp_seconds = IntGaugeVec::new(
            Opts::new(
                "cvmfs_prepub_gc_last_run_timestamp_seconds",
                "When the last successful garbage collection of a repository ended (UNIX time)",
            ),
            &["repo"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(gc_last_run_timestamp_seconds.clone()))
            .expect("metric registered once");
        let mqtt_connected = prometheus::IntGauge::new(
            "cvmfs_prepub_mqtt_connected",
            "1 while the MQTT control plane is connected to the broker",
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(mqtt_connected.clone()))
            .expect("metric registered once");
        let mqtt_messages_total = cv(
            "mqtt_messages_total",
            "MQTT control-plane messages, by kind (announce_sent, ready_received, reconnect)",
            &["kind"],
        );
        let mqtt_ignored_total = cv(
            "mqtt_ignored_total",
            "MQTT messages ignored, by reason (schema, too-large, topic, node-mismatch, unknown-endpoint, unknown-payload, duplicate)",
            &["reason"],
        );
        Metrics {
            gc_lifecycle_removals_total,
            gc_objects_tombstoned_total,
            gc_tombstones_revoked_total,
            gc_bytes_tombstoned_total,
            gc_bytes_revoked_total,
            gc_tombstones_pending,
            access_events_total,
            access_events_collapsed_total,
            access_log_lines_skipped_total,
            gc_runs_total,
            gc_objects_deleted_total,
            gc_bytes_reclaimed_total,
            gc_run_duration_seconds,
            gc_last_run_timestamp_seconds,
            job_phase_duration_seconds,
            queue_depth,
            actor_restarts_total,
            lease_heartbeat_lateness_seconds,
            mqtt_connected,
            mqtt_messages_total,
            mqtt_ignored_total,
            distribution_duration_seconds,
            distribution_objects_total,
            distribution_bytes_total,
            registry,
            jobs_submitted_total,
            jobs_published_total,
            job_failures_by_class_total,
            jobs_recovered_total,
            pipeline_dedup_hits_total,
            pipeline_objects_new_total,
            pipeline_bytes_total,
            catalogs_prebuilt_total,
            cas_upload_duration_seconds,
            commit_duration_seconds,
            jobs_in_state,
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let enc = prometheus::TextEncoder::new();
        enc.encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
