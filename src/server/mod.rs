//! The publisher daemon: starts the actors in dependency order (spool journal, compressor pool,
//! publisher, job manager), then the HTTP API; stops in reverse when the process is told to.

pub mod api;
pub mod auth;
pub mod gc;
pub mod logging;

use std::sync::{Arc, Mutex};

use actix::prelude::*;
use actix_web::{middleware, web, App, HttpServer};
use anyhow::{bail, Context as _};
use prepub_actors::cas_writer::CasWriter;
use prepub_actors::compressor_pool::CompressorPool;
use prepub_actors::gateway_client::GatewayClient;
use prepub_actors::gateway_publisher::{GatewayLease, GatewayPublisher, GatewaySettings};
use prepub_actors::job_manager::{JobManager, Settings};
use prepub_actors::metrics::Metrics;
use prepub_actors::publisher::{CommitJob, Publisher, RepoTarget};
use prepub_actors::spool_journal::SpoolJournal;
use prepub_core::spool::Spool;
use slog::{info, warn, Logger};

use crate::config::{Config, PublishMode};

/// Loads the TLS server configuration from PEM files.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<rustls::ServerConfig> {
    tls_config_with_clients(cert, key, None)
}

/// Reads every certificate of a PEM file; `key` names the setting in errors.
pub fn read_certs(
    path: &std::path::Path,
    key: &str,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| format!("{key} {}", path.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("{key} {}", path.display()))?;
    if certs.is_empty() {
        bail!("{key} {}: no certificate found", path.display());
    }
    Ok(certs)
}

/// The TLS server configuration; with `client_ca`, clients may present a certificate, which
/// is verified against those CAs (a bad one ends the handshake). Clients without one still
/// connect; the application decides what they may do.
pub fn tls_config_with_clients(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> anyhow::Result<rustls::ServerConfig> {
    let certs = read_certs(cert, "server.tls_cert")?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("server.tls_key {}", key.display()))?,
    ))
    .with_context(|| format!("server.tls_key {}", key.display()))?
    .with_context(|| format!("server.tls_key {}: no private key found", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca, "server.client_ca")? {
                roots
                    .add(c)
                    .with_context(|| format!("server.client_ca {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .with_context(|| format!("server.client_ca {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(builder.with_single_cert(certs, key)?)
}

/// The verified client certificate of a TLS connection, by its subject's CN (stored in the
/// connection data by [`client_cert_on_connect`]).
#[derive(Debug, Clone)]
pub struct ClientCert(pub String);

/// `HttpServer::on_connect` hook: records the CN of a client certificate that rustls verified.
pub fn client_cert_on_connect(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    use actix_tls::accept::rustls_0_23::TlsStream;
    if let Some(tls) = conn.downcast_ref::<TlsStream<actix_web::rt::net::TcpStream>>() {
        let (_, session) = tls.get_ref();
        if let Some(leaf) = session.peer_certificates().and_then(|c| c.first()) {
            ext.insert(ClientCert(
                prepub_core::keys::common_name(leaf).unwrap_or_default(),
            ));
        }
    }
}

/// The pre-warming settings and one (not yet started) distributor per endpoint.
type Distributors = (
    Arc<prepub_actors::s1_distributor::DistributionSettings>,
    Vec<(String, prepub_actors::s1_distributor::S1Distributor)>,
);

/// Runs the daemon until it is stopped (SIGINT/SIGTERM).
pub fn run(cfg: Config, log: Logger) -> anyhow::Result<()> {
    let admin = match &cfg.api_token_file {
        Some(p) => Some(
            auth::read_token_file(p).map_err(|e| anyhow::anyhow!("server.api_token_file: {e}"))?,
        ),
        None => std::env::var("PREPUB_API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    if admin.is_none() && cfg.tokens.is_empty() {
        bail!("PREPUB_API_TOKEN is not set and no scoped tokens are configured: the API would accept nobody");
    }
    let tokens = auth::Tokens::new(admin.as_deref(), cfg.tokens.clone());
    // Blocking HTTP clients must be made (and dropped) outside the async runtime.
    let gateway_client: Option<(Arc<GatewayClient>, String)> = match &cfg.publish {
        PublishMode::Gateway(g) => {
            let secret = std::env::var(&g.secret_env)
                .ok()
                .filter(|s| !s.is_empty())
                .with_context(|| format!("gateway.key_secret_env: {} is not set", g.secret_env))?;
            let client = GatewayClient::new(&g.url, &g.key_id, &secret, g.request_timeout)
                .map_err(|e| anyhow::anyhow!("gateway client: {e}"))?;
            Some((Arc::new(client), secret))
        }
        PublishMode::Standalone | PublishMode::Local(_) => None,
    };
    if let PublishMode::Local(_) = &cfg.publish {
        // Probe: local mode cannot work without cvmfs_server.
        let found = prepub_actors::local_publisher::probe("cvmfs_server")
            .map_err(|e| anyhow::anyhow!("publish_mode local: {e}"))?;
        slog::info!(log, "cvmfs_server found"; "path" => %found.display());
    }
    let busy = prepub_actors::local_publisher::Busy::default();
    // Stratum 1 distributors: their blocking HTTP clients are made outside the async runtime.
    let distributors: Option<Distributors> = match &cfg.distribution {
        None => None,
        Some(d) => {
            let secret = std::env::var(&d.secret_env).ok().filter(|s| !s.is_empty());
            if secret.is_none() && d.client_identity.is_none() && d.mqtt.is_none() {
                bail!(
                    "distribution: {} is not set and no client_cert is configured: receivers would refuse every request",
                    d.secret_env
                );
            }
            let read = |key: &str, p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("distribution.{key} {}", p.display()))
            };
            let identity_pem = match &d.client_identity {
                Some((c, k)) => {
                    let mut pem = read("client_cert", c)?;
                    pem.push(b'\n');
                    pem.extend(read("client_key", k)?);
                    Some(pem)
                }
                None => None,
            };
            let ca_pem = d
                .ca_cert
                .as_deref()
                .map(|p| read("ca_cert", p))
                .transpose()?;
            let settings = Arc::new(prepub_actors::s1_distributor::DistributionSettings {
                quorum: d.quorum,
                timeout: d.timeout,
                commit_anyway: d.commit_anyway,
                per_s1_concurrency: d.per_s1_concurrency,
                secret,
                identity_pem,
                ca_pem,
            });
            let mut v = Vec::new();
            for e in &d.endpoints {
                let a = prepub_actors::s1_distributor::S1Distributor::new(e, settings.clone())
                    .map_err(|m| anyhow::anyhow!("distribution: {m}"))?;
                v.push((e.trim_end_matches('/').to_string(), a));
            }
            Some((settings, v))
        }
    };
    let metrics = Metrics::new();
    // Access tracking stores (`<spool>/access/<repo>.db`), opened before the runtime starts.
    let mut tracked = std::collections::HashMap::new();
    for r in cfg.repos.values() {
        let a = &r.gc.access;
        let store = prepub_actors::access_tracker::AccessTracker::open_store(
            &cfg.spool_root.join("access"),
            &r.name,
            a.collapse.as_secs() as i64,
        )
        .map_err(|e| anyhow::anyhow!("access store of {}: {e}", r.name))?;
        tracked.insert(
            r.name.clone(),
            prepub_actors::access_tracker::Tracked {
                store,
                logs: a
                    .logs
                    .iter()
                    .map(|(p, f)| (prepub_core::access::LogTail::new(p), f.clone()))
                    .collect(),
                api: a.api,
                publish: a.publish,
            },
        );
    }
    let tracked_slot = Mutex::new(Some(tracked));
    // The MQTT control plane: connected (in the background) before the runtime starts.
    let bridge = match cfg.distribution.as_ref().and_then(|d| d.mqtt.as_ref()) {
        None => None,
        Some(m) => {
            let read = |key: &str, p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("distribution.{key} {}", p.display()))
            };
            let cert_pem = read("broker_client_cert", &m.client_cert)?;
            let publisher_id = prepub_core::keys::pem_common_name(&cert_pem).with_context(|| {
                format!(
                    "distribution.broker_client_cert {}: no certificate with a CN (the CN is the publisher id)",
                    m.client_cert.display()
                )
            })?;
            if !prepub_core::control::valid_segment(&publisher_id) {
                bail!("distribution.broker_client_cert: CN '{publisher_id}' cannot be an MQTT topic segment");
            }
            let settings = prepub_actors::mqtt_bridge::BridgeSettings {
                link: prepub_actors::mqtt_link::LinkSettings {
                    url: m.broker_url.clone(),
                    client_id: format!("cvmfs-prepub-publisher-{publisher_id}"),
                    ca_pem: read("broker_ca_cert", &m.ca_cert)?,
                    cert_pem,
                    key_pem: read("broker_client_key", &m.client_key)?,
                    keep_alive: std::time::Duration::from_secs(30),
                    last_will: None,
                    max_packet: prepub_core::control::MAX_LIST_MESSAGE + 4096,
                },
                publisher_id: publisher_id.clone(),
                endpoints: m
                    .nodes
                    .iter()
                    .map(|(url, node_id)| prepub_actors::mqtt_bridge::Endpoint {
                        url: url.clone(),
                        node_id: node_id.clone(),
                    })
                    .collect(),
            };
            let b = prepub_actors::mqtt_bridge::MqttBridge::connect(
                settings,
                Arc::new(metrics.clone()),
                log.clone(),
            )
            .map_err(|e| anyhow::anyhow!("distribution.broker_url: {e}"))?;
            slog::info!(log, "MQTT control plane"; "actor" => "MqttBridge", "broker" => &m.broker_url, "publisher_id" => &publisher_id);
            Some((b, m.quorum_timeout))
        }
    };
    // S3 stores: made (with their runtimes) outside the async runtime, probed before anything
    // is accepted, so a missing bucket or refused credentials stop the start with the cause.
    let mut s3_stores = std::collections::HashMap::new();
    for r in cfg.repos.values() {
        if let Some(s) = &r.s3 {
            let store = prepub_actors::s3_cas::S3Cas::new(s.clone())
                .map_err(|e| anyhow::anyhow!("cas (s3) for {}: {e}", r.name))?;
            store
                .probe()
                .map_err(|e| anyhow::anyhow!("cas (s3) for {}: {e}", r.name))?;
            slog::info!(log, "S3 store ready"; "repo" => &r.name, "store" => prepub_core::cas::Cas::describe(&store));
            s3_stores.insert(r.name.clone(), Arc::new(store));
        }
    }
    let cfg = Arc::new(cfg);
    actix_rt::System::new().block_on(async move {
        let (spool, jobs) = Spool::open(&cfg.spool_root).with_context(|| format!("server.spool_root {}", cfg.spool_root.display()))?;
        info!(log, "spool opened"; "actor" => "SpoolJournal", "root" => %cfg.spool_root.display(), "jobs" => jobs.len());
        for run in gc::recover(&cfg).map_err(|e| anyhow::anyhow!("garbage collection runs: {e}"))? {
            warn!(log, "garbage collection run ended at start-up"; "run" => &run.id, "repo" => &run.repo,
                "state" => run.state.as_str(), "reason" => run.reason.as_deref().unwrap_or(""));
        }
        let spool_slot = Mutex::new(Some((spool, jobs)));
        let journal = SyncArbiter::start(1, move || {
            let (s, j) = spool_slot
                .lock()
                .ok()
                .and_then(|mut g| g.take())
                .expect("the spool journal is started once, on one thread");
            SpoolJournal::new(s, j)
        });
        let store_threads = store_threads(&cfg);
        let cas_writer = CasWriter::new(store_threads);
        let store = cas_writer.store();
        let cas_writer = cas_writer.start();
        let open_files = prepub_core::cas::open_file_limit();
        info!(log, "CAS writer started"; "actor" => "CasWriter", "upload_concurrency" => cfg.upload_concurrency, "store_threads" => store_threads, "open_files" => open_files);
        if open_files < LOW_OPEN_FILES {
            warn!(log, "the open-file limit is low: local stores get smaller batches and fewer open shard directories (raise LimitNOFILE)"; "open_files" => open_files);
        }
        let pool = CompressorPool::new(cfg.workers, &store);
        info!(log, "compressor pool started"; "actor" => "CompressorPool", "workers" => pool.workers());
        let pool = pool.start();
        let mut targets: Vec<RepoTarget> = Vec::new();
        for r in cfg.repos.values() {
            // The raw-content index lives in the spool, outside the served storage.
            let raw_index = if cfg.raw_index {
                let p = cfg.spool_root.join("rawindex").join(format!("{}.db", r.name));
                match prepub_core::rawindex::RawIndex::open(&p) {
                    Ok(ix) => Some(Arc::new(ix)),
                    Err(e) => {
                        warn!(log, "raw-content index unavailable; every file is compressed"; "repo" => &r.name, "reason" => e);
                        None
                    }
                }
            } else {
                None
            };
            targets.push(RepoTarget {
                name: r.name.clone(),
                storage: r.storage.clone(),
                keys_dir: r.keys_dir.clone(),
                s3: s3_stores.get(&r.name).cloned(),
                raw_index,
                tag_expiry: r.gc.enabled.then(|| prepub_core::repo::TagExpiry {
                    span_secs: r.gc.auto_tag_timespan.as_secs() as i64,
                    exempt: r.gc.exempt_tags.clone(),
                }),
                prebuild_catalogs: matches!(cfg.publish, PublishMode::Standalone),
            });
        }
        for t in &targets {
            if matches!(cfg.publish, PublishMode::Standalone) && t.s3.is_none() && !t.storage.join(".cvmfspublished").is_file() {
                warn!(log, "repository storage holds no repository yet (run cvmfs-prepub repo init)"; "repo" => &t.name, "storage" => %t.storage.display());
            }
        }
        let publisher: Recipient<CommitJob> = match &cfg.publish {
            PublishMode::Standalone => {
                let p = Publisher::new(targets.clone()).start();
                info!(log, "publisher started"; "actor" => "Publisher", "mode" => "standalone", "repositories" => targets.len());
                p.recipient()
            }
            PublishMode::Local(mount) => {
                let settings = Arc::new(prepub_actors::local_publisher::LocalSettings {
                    cvmfs_server: "cvmfs_server".into(),
                    cvmfs_mount: mount.clone(),
                    spool_root: cfg.spool_root.clone(),
                });
                let p = prepub_actors::local_publisher::LocalPublisher::new(targets.iter().map(|t| t.name.clone()).collect(), settings, busy.clone()).start();
                info!(log, "publisher started"; "actor" => "LocalPublisher", "mode" => "local", "cvmfs_mount" => %mount.display(), "repositories" => targets.len());
                p.recipient()
            }
            PublishMode::Gateway(g) => {
                let (client, secret) = gateway_client.clone().context("gateway client")?;
                let interval = g.heartbeat_interval;
                let hb_client = client.clone();
                let heartbeat = {
                    let lateness = metrics.lease_heartbeat_lateness_seconds.clone();
                    GatewayLease::start_in_arbiter(&Arbiter::new().handle(), move |_| GatewayLease::new(hb_client, interval).with_lateness(lateness))
                };
                info!(log, "lease heartbeat started"; "actor" => "GatewayLease", "interval_s" => interval.as_secs());
                let settings = Arc::new(GatewaySettings {
                    url: g.url.clone(),
                    key_id: g.key_id.clone(),
                    secret,
                    lease_ttl: g.lease_ttl,
                    heartbeat_interval: g.heartbeat_interval,
                    lease_wait: g.lease_wait,
                    stratum0_url: g.stratum0_url.clone(),
                    pack_bytes: g.pack_bytes,
                    public_keys_dir: g.public_keys_dir.clone(),
                });
                let p = GatewayPublisher::new(targets.iter().map(|t| t.name.clone()).collect(), settings, client, heartbeat, cfg.spool_root.clone()).start();
                info!(log, "publisher started"; "actor" => "GatewayPublisher", "mode" => "gateway", "gateway" => &g.url, "repositories" => targets.len());
                p.recipient()
            }
        };
        let mqtt = bridge.map(|(b, quorum_timeout)| {
            let arbiter = actix::Arbiter::new();
            let addr = prepub_actors::mqtt_bridge::MqttBridge::start_in_arbiter(&arbiter.handle(), move |_| b);
            prepub_actors::job_manager::MqttDistribution {
                announce: addr.clone().recipient(),
                forget: addr.recipient(),
                quorum_timeout,
            }
        });
        let m3 = metrics.clone();
        let access = SyncArbiter::start(1, move || {
            let repos = tracked_slot
                .lock()
                .ok()
                .and_then(|mut g| g.take())
                .unwrap_or_default();
            prepub_actors::access_tracker::AccessTracker::new(repos, m3.clone())
        });
        if cfg.repos.values().any(|r| !r.gc.access.logs.is_empty()) {
            // Access logs are read every two seconds.
            let a = access.clone();
            let _ = std::thread::Builder::new()
                .name("access-log-tick".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(2));
                    if !a.connected() {
                        break;
                    }
                    a.do_send(prepub_actors::access_tracker::PollLogs);
                });
        }
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let settings = Arc::new(Settings {
            access: Some(access.clone().recipient()),
            draining: draining.clone(),
            repos: targets.into_iter().map(|t| (t.name.clone(), t)).collect(),
            params: cfg.params,
            limits: cfg.limits,
            max_attempts: cfg.max_attempts,
            retry_backoff: cfg.retry_backoff,
            tar_retention: cfg.tar_retention,
            spool_root: cfg.spool_root.clone(),
            distribution: distributors.map(|(settings, v)| {
                let endpoints = v
                    .into_iter()
                    .map(|(e, a)| {
                        info!(log, "distributor started"; "actor" => "S1Distributor", "stratum1" => &e);
                        (e, a.start().recipient())
                    })
                    .collect();
                prepub_actors::job_manager::Distribution { settings, endpoints, mqtt }
            }),
        });
        let m2 = metrics.clone();
        let job_changes = Arc::new(tokio::sync::watch::channel(0u64).0);
        let changes = job_changes.clone();
        let jobs = Supervisor::start(move |_| {
            JobManager::new(settings.clone(), journal.clone(), pool.clone(), publisher.clone(), m2.clone())
                .with_changes(changes.clone())
        });
        info!(log, "job manager started"; "actor" => "JobManager");

        // SIGHUP (`systemctl reload`): read the admin token file again.
        if let Some(path) = cfg.api_token_file.clone() {
            let (tokens, log) = (tokens.clone(), log.clone());
            actix_rt::spawn(async move {
                let Ok(mut hup) = actix_rt::signal::unix::signal(actix_rt::signal::unix::SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    match auth::read_token_file(&path) {
                        Ok(t) => {
                            tokens.set_admin(&t);
                            info!(log, "admin token reloaded"; "file" => %path.display());
                        }
                        Err(e) => warn!(log, "admin token not reloaded, the old one stays"; "error" => e),
                    }
                }
            });
        }
        let state = web::Data::new(api::AppState {
            cfg: cfg.clone(),
            tokens,
            jobs,
            job_changes: job_changes.subscribe(),
            cas_writer,
            busy,
            s3: s3_stores.clone(),
            metrics,
            incoming: cfg.spool_root.join("incoming"),
            draining,
            started: std::time::Instant::now(),
            remote_checks: Default::default(),
            access,
            gc_active: Default::default(),
            gc_next: Default::default(),
        });
        // Scheduled garbage collection (`repositories[].gc.schedule`).
        let schedules: Vec<(String, prepub_core::cron::Schedule)> = cfg
            .repos
            .values()
            .filter(|r| r.gc.enabled)
            .filter_map(|r| Some((r.name.clone(), r.gc.schedule.clone()?)))
            .collect();
        if !schedules.is_empty() {
            let (st, log) = (state.clone(), log.clone());
            actix_rt::spawn(async move {
                let now = prepub_core::timefmt::now();
                let mut next: std::collections::HashMap<String, Option<i64>> = schedules
                    .iter()
                    .map(|(r, s)| (r.clone(), s.next(now, now)))
                    .collect();
                let publish_next = |next: &std::collections::HashMap<String, Option<i64>>| {
                    let mut g = st.gc_next.lock().unwrap_or_else(|e| e.into_inner());
                    g.clear();
                    g.extend(next.iter().filter_map(|(r, t)| Some((r.clone(), (*t)?))));
                };
                publish_next(&next);
                loop {
                    actix_rt::time::sleep(std::time::Duration::from_millis(500)).await;
                    for (repo, sched) in &schedules {
                        let now = prepub_core::timefmt::now();
                        if next.get(repo).copied().flatten().is_none_or(|t| now < t) {
                            continue;
                        }
                        // One journaled run: the lifecycle (cleaning) first, its removals
                        // committed, then the collection.
                        match gc::run_gc(&st, repo.clone(), gc::Trigger::Schedule).await {
                            Ok(v) => info!(log, "scheduled garbage collection";
                                "repo" => repo, "run" => %v["run"]["id"], "state" => %v["run"]["state"],
                                "removals" => v["run"]["removals"].as_array().map_or(0, |a| a.len()),
                                "deleted" => %v["swept"]["deleted"],
                                "tombstoned" => %v["tombstones"]["new"], "dry_run" => %v["dry_run"]),
                            Err(e) => warn!(log, "scheduled garbage collection did not complete";
                                "repo" => repo, "reason" => %e),
                        }
                        let done = prepub_core::timefmt::now();
                        next.insert(repo.clone(), sched.next(done, done));
                        publish_next(&next);
                    }
                }
            });
        }
        let http_log = log.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                // A query string that does not parse gets the API's JSON error, not text.
                .app_data(web::QueryConfig::default().error_handler(|e, _| {
                    api::ApiError::BadRequest("bad-query", e.to_string()).into()
                }))
                .wrap(logging::AccessLog(http_log.clone()))
                .wrap(middleware::NormalizePath::trim())
                .route("/api/v1/jobs", web::post().to(api::submit))
                .route("/api/v1/jobs", web::get().to(api::list_jobs))
                .route("/api/v1/removals", web::post().to(api::submit_removal))
                .route("/api/v1/jobs/{id}", web::get().to(api::get_job))
                .route("/api/v1/jobs/{id}/abort", web::post().to(api::abort_job))
                .route("/api/v1/jobs/{id}/events", web::get().to(api::job_events))
                .route("/api/v1/health", web::get().to(api::health))
                .route("/api/v1/status", web::get().to(api::status))
                .route("/api/v1/drain", web::post().to(api::drain))
                .route("/api/v1/resume", web::post().to(api::resume))
                .route("/api/v1/metrics", web::get().to(api::metrics))
                .route("/api/v1/openapi.json", web::get().to(api::openapi))
                .route("/api/v1/gc/{repo}/plan", web::get().to(gc::gc_plan))
                .route("/api/v1/gc/{repo}/run", web::post().to(gc::gc_run))
                .route("/api/v1/gc/{repo}/abort", web::post().to(gc::gc_abort))
                .route("/api/v1/gc/{repo}/tombstones", web::get().to(gc::gc_tombstones))
                .route("/api/v1/gc/{repo}/lifecycle", web::post().to(gc::gc_lifecycle))
                .route("/api/v1/gc/{repo}/status", web::get().to(gc::gc_status))
                .route("/api/v1/access-events", web::post().to(api::access_events))
                .route("/api/v1/access/{repo}", web::get().to(api::access_query))
                .default_service(web::to(api::not_found))
        })
        .shutdown_timeout(30);
        let server = match &cfg.tls {
            Some((c, k)) => server.bind_rustls_0_23(cfg.listen, tls_config(c, k)?)?,
            None => server.bind(cfg.listen)?,
        };
        info!(log, "listening"; "addr" => %cfg.listen, "tls" => cfg.tls.is_some());
        server.run().await?;
        info!(log, "stopped");
        System::current().stop();
        Ok(())
    })
}

/// An open-file limit under which the daemon warns at start: local stores take at most a
/// quarter of it for the new objects of their batches and another for shard directories (256
/// a repository), so below this they write smaller batches and name more objects by path.
const LOW_OPEN_FILES: u64 = 4096;

/// Store threads: `upload_concurrency` puts in flight when objects go to S3 (each waits on the
/// network); with local storage only, at most two per core — creating files and syncing the
/// filesystem is kernel work that more threads only contend for, in smaller batches (harness,
/// 2 cores: 100,000 tiny files at 7,200 files/s with 16 threads, 11,700–12,700 with 4).
fn store_threads(cfg: &Config) -> usize {
    if cfg.repos.values().any(|r| r.s3.is_some()) {
        return cfg.upload_concurrency;
    }
    cfg.upload_concurrency.min(2 * prepub_core::cores()).max(1)
}
