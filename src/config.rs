//! Daemon configuration: the YAML file of the install guide §4, parsed strictly (unknown keys are
//! errors) into file structs, then validated into a runtime [`Config`] with messages naming the
//! offending key. Command-line flags override file values; secrets come only from the
//! environment (`PREPUB_API_TOKEN`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prepub_core::chunker::ChunkParams;
use prepub_core::intake::IntakeLimits;
use prepub_core::object::{Compression, EncodeParams};
use serde::Deserialize;

use crate::units::{parse_duration, parse_size};

/// The configuration file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `publisher` (the default).
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub cas: CasFile,
    #[serde(default)]
    pub pipeline: PipelineFile,
    #[serde(default)]
    pub repositories: Vec<RepoFile>,
    /// Gateway mode: the `cvmfs_gateway` to publish through.
    #[serde(default)]
    pub gateway: Option<GatewayFile>,
    /// Stratum 1 pre-warming (install guide §6, Option B).
    #[serde(default)]
    pub distribution: Option<DistributionFile>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DistributionFile {
    /// Base URLs of the receivers (`cvmfs-prepub --mode receiver`), e.g. https://s1.example.org:9100;
    /// with MQTT, an entry may also be `{url: ..., node_id: ...}` to bind it to the node
    /// (certificate CN) that must answer for it.
    pub stratum1_endpoints: Vec<EndpointFile>,
    /// Fraction of endpoints that must hold every object before the commit.
    #[serde(default = "default_quorum")]
    pub quorum: f64,
    /// How long a job waits for the quorum.
    #[serde(default = "default_dist_timeout")]
    pub timeout: String,
    /// Commit even when the quorum was missed (else the job fails).
    #[serde(default = "yes")]
    pub commit_anyway: bool,
    /// Object uploads in flight per endpoint.
    #[serde(default = "default_per_s1")]
    pub per_s1_concurrency: usize,
    /// Environment variable with the receivers' shared secret. Optional when `client_cert`
    /// is set (the receivers then know the publisher by its certificate); when both are set,
    /// requests are signed and the certificate is shown.
    #[serde(default = "default_receiver_secret_env")]
    pub secret_env: String,
    /// Mutual TLS: PEM client certificate (chain) and key shown to the receivers.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// PEM CA bundle that signs the receivers' server certificates (replaces the system roots).
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// MQTT control plane (install guide §6.2): `tls://host:8883`. When set, announcements go
    /// through the broker instead of HTTP; the object push still uses the endpoints above.
    #[serde(default)]
    pub broker_url: Option<String>,
    #[serde(default)]
    pub broker_client_cert: Option<PathBuf>,
    #[serde(default)]
    pub broker_client_key: Option<PathBuf>,
    #[serde(default)]
    pub broker_ca_cert: Option<PathBuf>,
    /// How long ready answers are awaited after an announcement.
    #[serde(default = "default_mqtt_quorum_timeout")]
    pub mqtt_quorum_timeout: String,
}

/// One `stratum1_endpoints` entry.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum EndpointFile {
    Url(String),
    Bound {
        url: String,
        node_id: Option<String>,
    },
}

impl EndpointFile {
    pub fn url(&self) -> &str {
        match self {
            EndpointFile::Url(u) | EndpointFile::Bound { url: u, .. } => u,
        }
    }
    pub fn node_id(&self) -> Option<&str> {
        match self {
            EndpointFile::Url(_) => None,
            EndpointFile::Bound { node_id, .. } => node_id.as_deref(),
        }
    }
}

fn default_mqtt_quorum_timeout() -> String {
    "30s".into()
}

/// Validated MQTT settings of the publisher.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub broker_url: String,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub ca_cert: PathBuf,
    pub quorum_timeout: Duration,
    /// endpoint URL -> bound node id
    pub nodes: Vec<(String, Option<String>)>,
}

fn default_quorum() -> f64 {
    1.0
}
fn default_dist_timeout() -> String {
    "10m".into()
}
fn default_per_s1() -> usize {
    8
}
fn default_receiver_secret_env() -> String {
    "PREPUB_RECEIVER_SECRET".into()
}

/// Validated pre-warming settings (the secret stays in the environment until start-up).
#[derive(Debug, Clone)]
pub struct DistributionConfig {
    pub endpoints: Vec<String>,
    pub quorum: f64,
    pub timeout: Duration,
    pub commit_anyway: bool,
    pub per_s1_concurrency: usize,
    pub secret_env: String,
    /// Client certificate and key files (mutual TLS), both or neither.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    pub ca_cert: Option<PathBuf>,
    pub mqtt: Option<MqttConfig>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// Base URL of cvmfs_gateway, e.g. http://localhost:4929.
    pub url: String,
    /// Key id registered on the gateway for the repositories.
    pub key_id: String,
    /// Environment variable holding the key's secret.
    #[serde(default = "default_secret_env")]
    pub key_secret_env: String,
    /// A lease older than this is never committed on (cancel, re-lease, resubmit).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: String,
    /// How often held leases are renewed (the stock gateway has no renew endpoint; tolerated).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: String,
    /// HTTP base of the Stratum 0; repository R is read from `<stratum0_url>/<R>`.
    pub stratum0_url: String,
    /// How long a job waits for a busy lease path before it fails.
    #[serde(default = "default_lease_wait")]
    pub lease_wait: String,
    /// Largest object pack sent in one payload request.
    #[serde(default = "default_pack_size")]
    pub pack_size: String,
    /// Timeout of one gateway request.
    #[serde(default = "default_gw_timeout")]
    pub request_timeout: String,
    /// Directory with `<repo>.pub` master public keys; when set, the Stratum 0 whitelist is
    /// verified before its manifest is trusted (the manifest signature is always verified).
    #[serde(default)]
    pub public_keys_dir: Option<PathBuf>,
}

fn default_secret_env() -> String {
    "CVMFS_GATEWAY_SECRET".into()
}
fn default_lease_ttl() -> String {
    "120s".into()
}
fn default_heartbeat() -> String {
    "40s".into()
}
fn default_lease_wait() -> String {
    "10m".into()
}
fn default_pack_size() -> String {
    "64MiB".into()
}
fn default_gw_timeout() -> String {
    "10m".into()
}

/// Gateway mode settings, validated (the secret stays in the environment until start-up).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub url: String,
    pub key_id: String,
    pub secret_env: String,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub stratum0_url: String,
    pub lease_wait: Duration,
    pub pack_bytes: usize,
    pub request_timeout: Duration,
    pub public_keys_dir: Option<PathBuf>,
}

/// Who writes the repositories.
#[derive(Debug, Clone)]
pub enum PublishMode {
    Standalone,
    Gateway(GatewayConfig),
    /// Through `cvmfs_server` on this host, repositories mounted under this directory.
    Local(PathBuf),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// Listen address, `:8080` or `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// PEM certificate chain; with `tls_key`, the API is served over TLS (rustls).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Spool directory: job records, journal, uploaded tars.
    #[serde(default = "default_spool")]
    pub spool_root: PathBuf,
    /// `standalone`: this service writes the repository itself.
    #[serde(default = "default_publish_mode")]
    pub publish_mode: String,
    /// Largest accepted upload.
    #[serde(default = "default_max_upload")]
    pub max_upload_size: String,
    /// An upload that sends nothing for this long is cut off (408) and its spool file removed.
    #[serde(default = "default_upload_idle")]
    pub upload_idle_timeout: String,
    /// How long a finished job keeps its tar in the spool.
    #[serde(default = "default_retention")]
    pub tar_retention: String,
    /// Scoped API tokens (each limited to repository/path prefixes).
    #[serde(default)]
    pub api_tokens: Vec<TokenFile>,
    /// `json` (for journald) or `text`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Local mode: where the repositories are mounted (`<cvmfs_mount>/<repo>`).
    #[serde(default = "default_cvmfs_mount")]
    pub cvmfs_mount: PathBuf,
    /// File holding the admin token — a bare token, or an environment file with a
    /// `PREPUB_API_TOKEN=` line (e.g. the systemd `EnvironmentFile`). Read at start and again on
    /// SIGHUP (`systemctl reload`); wins over the `PREPUB_API_TOKEN` variable.
    #[serde(default)]
    pub api_token_file: Option<PathBuf>,
}

fn default_cvmfs_mount() -> PathBuf {
    PathBuf::from("/cvmfs")
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            listen: default_listen(),
            tls_cert: None,
            tls_key: None,
            spool_root: default_spool(),
            publish_mode: default_publish_mode(),
            max_upload_size: default_max_upload(),
            upload_idle_timeout: default_upload_idle(),
            tar_retention: default_retention(),
            api_tokens: Vec::new(),
            log_format: default_log_format(),
            cvmfs_mount: default_cvmfs_mount(),
            api_token_file: None,
        }
    }
}

fn default_listen() -> String {
    ":8080".into()
}
fn default_spool() -> PathBuf {
    PathBuf::from("/var/spool/cvmfs-prepub")
}
fn default_publish_mode() -> String {
    "standalone".into()
}
fn default_max_upload() -> String {
    "50GiB".into()
}
fn default_upload_idle() -> String {
    "60s".into()
}
fn default_retention() -> String {
    "7d".into()
}
fn default_log_format() -> String {
    "json".into()
}

/// A scoped token: only its SHA-256 digest is stored.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    pub name: String,
    /// Hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: String,
    /// `repo` or `repo/path` prefixes the token may publish under.
    pub prefixes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasFile {
    /// `localfs` or `s3`.
    #[serde(rename = "type", default = "default_cas_type")]
    pub kind: String,
    /// localfs: parent directory of the repository storages (`<root>/<repo>` unless a
    /// repository says).
    #[serde(default = "default_cas_root")]
    pub root: PathBuf,
    /// s3: bucket name.
    #[serde(default)]
    pub bucket: String,
    /// s3: region.
    #[serde(default = "default_region")]
    pub region: String,
    /// s3: endpoint; empty for AWS, e.g. http://minio:9000 for MinIO or Ceph (path-style).
    #[serde(default)]
    pub endpoint: String,
    /// s3: key prefix above the repositories (repository R lives under `<prefix>/R/`).
    #[serde(default)]
    pub prefix: String,
    /// s3: objects at least this large are uploaded in parts.
    #[serde(default = "default_multipart")]
    pub multipart_threshold: String,
    /// s3: longest one request may take, its body included.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: String,
}

fn default_request_timeout() -> String {
    "10m".into()
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_multipart() -> String {
    "64MiB".into()
}

impl Default for CasFile {
    fn default() -> Self {
        CasFile {
            kind: default_cas_type(),
            root: default_cas_root(),
            bucket: String::new(),
            region: default_region(),
            endpoint: String::new(),
            prefix: String::new(),
            multipart_threshold: default_multipart(),
            request_timeout: default_request_timeout(),
        }
    }
}

fn default_cas_type() -> String {
    "localfs".into()
}
fn default_cas_root() -> PathBuf {
    PathBuf::from("/srv/cvmfs")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Compressor threads; 0 = one per core.
    #[serde(default)]
    pub workers: usize,
    /// `zlib`, `zlib:1`..`zlib:9`, or `none`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Object puts in flight towards remote CAS backends (S3).
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
    #[serde(default)]
    pub chunking: ChunkingFile,
    /// Attempts per job before a transient error fails it.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    #[serde(default = "default_backoff")]
    pub retry_backoff: String,
    #[serde(default)]
    pub limits: LimitsFile,
    /// Keep a raw-content index per repository (`<spool>/rawindex/<repo>.db`): content encoded
    /// before skips compression.
    #[serde(default = "default_true")]
    pub raw_index: bool,
}

fn default_true() -> bool {
    true
}

impl Default for PipelineFile {
    fn default() -> Self {
        PipelineFile {
            workers: 0,
            compression: default_compression(),
            upload_concurrency: default_upload_concurrency(),
            chunking: ChunkingFile::default(),
            max_attempts: default_attempts(),
            retry_backoff: default_backoff(),
            limits: LimitsFile::default(),
            raw_index: true,
        }
    }
}

fn default_compression() -> String {
    "zlib".into()
}
fn default_upload_concurrency() -> usize {
    16
}
fn default_attempts() -> u32 {
    3
}
fn default_backoff() -> String {
    "5s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkingFile {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "chunk_min")]
    pub min: String,
    #[serde(default = "chunk_avg")]
    pub avg: String,
    #[serde(default = "chunk_max")]
    pub max: String,
}

impl Default for ChunkingFile {
    fn default() -> Self {
        ChunkingFile {
            enabled: true,
            min: chunk_min(),
            avg: chunk_avg(),
            max: chunk_max(),
        }
    }
}

fn yes() -> bool {
    true
}
fn chunk_min() -> String {
    "4MiB".into()
}
fn chunk_avg() -> String {
    "8MiB".into()
}
fn chunk_max() -> String {
    "16MiB".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default = "max_entry")]
    pub max_entry_size: String,
    #[serde(default = "max_total")]
    pub max_total_size: String,
    #[serde(default = "max_entries")]
    pub max_entries: u64,
    /// Drop device nodes and FIFOs instead of failing the job.
    #[serde(default)]
    pub skip_special: bool,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_entry_size: max_entry(),
            max_total_size: max_total(),
            max_entries: max_entries(),
            skip_special: false,
        }
    }
}

fn max_entry() -> String {
    "64GiB".into()
}
fn max_total() -> String {
    "1TiB".into()
}
fn max_entries() -> u64 {
    10_000_000
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RepoFile {
    pub name: String,
    /// Repository storage (the directory served as the Stratum 0); default `<cas.root>/<name>`.
    pub storage: Option<PathBuf>,
    /// Keys directory holding `<name>.key`, `.crt`, `.pub` (and `.masterkey` to re-sign the
    /// whitelist); default `/etc/cvmfs/keys`.
    pub keys_dir: Option<PathBuf>,
    /// Garbage collection of unreferenced objects (off by default).
    #[serde(default)]
    pub gc: GcFile,
}

/// `repositories[].gc`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GcFile {
    /// Allows `POST /api/v1/gc/<repo>/run` (plans are always allowed: they delete nothing).
    #[serde(default)]
    pub enabled: bool,
    /// Revisions whose objects are kept, counting back from the current one; tagged
    /// revisions are always kept.
    #[serde(default = "default_keep_revisions")]
    pub keep_revisions: usize,
    /// Unreferenced objects younger than this are kept.
    #[serde(default = "default_gc_grace")]
    pub grace_period: String,
    /// Deletions per second at most (0: unlimited).
    #[serde(default)]
    pub max_deletion_rate: u64,
    /// Automatic tags (`prepub-<job id>`) keep their revision this long; `0` not at all.
    /// Tags a job named are always kept.
    #[serde(default = "default_auto_tag_timespan")]
    pub auto_tag_timespan: String,
    /// Runs by themselves on this schedule (UTC cron `m h dom mon dow`, `@daily`, or
    /// `@every 6h`); without it, runs happen only when asked for.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Runs (asked for or scheduled) only plan: they count and log, delete and tombstone nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Content lifecycle: published paths not seen for this long leave the namespace (removal
    /// jobs) — off when unset.
    #[serde(default)]
    pub access_ttl: Option<String>,
    /// Paths (globs: `*` within a component, `**` across) the lifecycle never removes.
    #[serde(default)]
    pub exempt_paths: Vec<String>,
    /// Tag names (globs, `*` wildcards) whose revisions are always kept — automatic tags
    /// past `auto_tag_timespan` included — and whose paths the lifecycle never removes.
    #[serde(default)]
    pub exempt_tags: Vec<String>,
    /// Unreferenced objects are first tombstoned and deleted by a later run once this has
    /// passed (unless seen again meanwhile); `0s` deletes at once.
    #[serde(default = "default_soft_delete")]
    pub soft_delete_period: String,
    /// Where access times come from (default: the API and this publisher's publishes).
    #[serde(default = "default_access_sources")]
    pub access_sources: Vec<AccessSourceFile>,
    /// Repeated events for the same object or path within this window are collapsed.
    #[serde(default = "default_access_collapse")]
    pub access_collapse: String,
}

/// One `gc.access_sources` entry.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum AccessSourceFile {
    /// `POST /api/v1/access-events` batches (log shippers, proxies).
    Api,
    /// This publisher's publishes set a floor on their paths.
    Publish,
    /// A Stratum 1 web server's access log, tailed (rotation followed).
    Log {
        path: PathBuf,
        /// Regex with named groups for the object (`hash_group`), the time (`time_group`) and,
        /// optionally, the repository (`repo_group`).
        regex: String,
        #[serde(default = "default_time_format")]
        time_format: String,
        #[serde(default = "default_hash_group")]
        hash_group: String,
        #[serde(default)]
        repo_group: Option<String>,
        #[serde(default = "default_time_group")]
        time_group: String,
    },
}

fn default_soft_delete() -> String {
    "0s".into()
}

fn default_access_sources() -> Vec<AccessSourceFile> {
    vec![AccessSourceFile::Api, AccessSourceFile::Publish]
}
fn default_access_collapse() -> String {
    "60s".into()
}
fn default_time_format() -> String {
    "clf".into()
}
fn default_hash_group() -> String {
    "hash".into()
}
fn default_time_group() -> String {
    "time".into()
}

/// Validated access tracking of a repository.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    pub api: bool,
    pub publish: bool,
    pub logs: Vec<(PathBuf, prepub_core::access::LogFormat)>,
    pub collapse: Duration,
}

fn default_auto_tag_timespan() -> String {
    "30d".into()
}

impl Default for GcFile {
    fn default() -> Self {
        GcFile {
            enabled: false,
            keep_revisions: default_keep_revisions(),
            grace_period: default_gc_grace(),
            max_deletion_rate: 0,
            auto_tag_timespan: default_auto_tag_timespan(),
            soft_delete_period: default_soft_delete(),
            schedule: None,
            dry_run: false,
            access_ttl: None,
            exempt_paths: Vec::new(),
            exempt_tags: Vec::new(),
            access_sources: default_access_sources(),
            access_collapse: default_access_collapse(),
        }
    }
}

fn default_keep_revisions() -> usize {
    2
}
fn default_gc_grace() -> String {
    "24h".into()
}

fn access_config(g: &GcFile, i: usize) -> Result<AccessConfig, ConfigError> {
    let mut a = AccessConfig {
        api: false,
        publish: false,
        logs: Vec::new(),
        collapse: parse_duration(&g.access_collapse)
            .map_err(|m| cerr(&format!("repositories[{i}].gc.access_collapse"), m))?,
    };
    for (j, src) in g.access_sources.iter().enumerate() {
        let key = format!("repositories[{i}].gc.access_sources[{j}]");
        match src {
            AccessSourceFile::Api => a.api = true,
            AccessSourceFile::Publish => a.publish = true,
            AccessSourceFile::Log {
                path,
                regex,
                time_format,
                hash_group,
                repo_group,
                time_group,
            } => {
                let re = regex::Regex::new(regex)
                    .map_err(|e| cerr(&format!("{key}.regex"), e.to_string()))?;
                let names: Vec<&str> = re.capture_names().flatten().collect();
                for (k, g) in [
                    ("hash_group", Some(hash_group)),
                    ("time_group", Some(time_group)),
                    ("repo_group", repo_group.as_ref()),
                ] {
                    if let Some(g) = g {
                        if !names.contains(&g.as_str()) {
                            return Err(cerr(
                                &format!("{key}.{k}"),
                                format!("the regex has no group named '{g}'"),
                            ));
                        }
                    }
                }
                let tf = prepub_core::access::TimeFormat::parse_name(time_format)
                    .map_err(|e| cerr(&format!("{key}.time_format"), e.to_string()))?;
                a.logs.push((
                    path.clone(),
                    prepub_core::access::LogFormat {
                        regex: re,
                        hash_group: hash_group.clone(),
                        repo_group: repo_group.clone(),
                        time_group: time_group.clone(),
                        time_format: tf,
                    },
                ));
            }
        }
    }
    Ok(a)
}

/// Validated `gc` settings of a repository.
#[derive(Debug, Clone)]
pub struct GcConfig {
    pub enabled: bool,
    pub keep_revisions: usize,
    pub grace: Duration,
    pub max_deletion_rate: u64,
    pub auto_tag_timespan: Duration,
    pub soft_delete: Duration,
    pub schedule: Option<prepub_core::cron::Schedule>,
    /// The schedule as written.
    pub schedule_text: Option<String>,
    pub dry_run: bool,
    pub access_ttl: Option<Duration>,
    pub exempt_paths: Vec<String>,
    pub exempt_tags: Vec<String>,
    pub access: AccessConfig,
}

/// Flag overrides from the command line.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub spool_root: Option<PathBuf>,
    pub publish_mode: Option<String>,
    pub mode: Option<String>,
    pub cvmfs_mount: Option<PathBuf>,
}

/// A scoped token, validated.
#[derive(Debug, Clone)]
pub struct ScopedToken {
    pub name: String,
    pub digest: [u8; 32],
    /// `(repo, path-prefix in catalog form)`.
    pub prefixes: Vec<(String, String)>,
}

/// One repository this daemon publishes.
#[derive(Debug, Clone)]
pub struct RepoConfig {
    pub name: String,
    pub storage: PathBuf,
    pub keys_dir: PathBuf,
    /// Set when `cas.type: s3`.
    pub s3: Option<prepub_actors::s3_cas::S3Settings>,
    pub gc: GcConfig,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub publish: PublishMode,
    pub distribution: Option<DistributionConfig>,
    pub listen: SocketAddr,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub spool_root: PathBuf,
    pub max_upload: u64,
    pub upload_idle: Duration,
    pub tar_retention: Duration,
    pub log_json: bool,
    pub workers: usize,
    pub upload_concurrency: usize,
    pub raw_index: bool,
    pub params: EncodeParams,
    pub limits: IntakeLimits,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub repos: HashMap<String, RepoConfig>,
    pub tokens: Vec<ScopedToken>,
    pub api_token_file: Option<PathBuf>,
}

/// A configuration error naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {msg}")]
pub struct ConfigError {
    pub key: String,
    pub msg: String,
}

fn cerr(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        msg: msg.into(),
    }
}

/// Parses a listen address; `:8080` means all interfaces.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse()
        .map_err(|_| format!("'{s}' is not an address like :8080 or 127.0.0.1:8080"))
}

fn valid_repo_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 255
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

impl FileConfig {
    /// Reads and parses a file (strict: unknown keys are errors).
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| cerr("--config", format!("{}: {e}", path.display())))?;
        serde_yaml::from_str(&text).map_err(|e| cerr(&path.display().to_string(), e.to_string()))
    }

    /// Validates into a runtime configuration.
    pub fn validate(self, o: &Overrides) -> Result<Config, ConfigError> {
        let mode = o
            .mode
            .clone()
            .or(self.mode)
            .unwrap_or_else(|| "publisher".into());
        if mode != "publisher" {
            return Err(cerr(
                "mode",
                format!("'{mode}' is not a mode of this daemon (publisher)"),
            ));
        }
        let listen_s = o.listen.clone().unwrap_or(self.server.listen);
        let listen = parse_listen(&listen_s).map_err(|m| cerr("server.listen", m))?;
        let tls = match (self.server.tls_cert, self.server.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(cerr(
                    "server.tls_cert",
                    "tls_cert and tls_key must be set together",
                ))
            }
        };
        let publish_mode = o.publish_mode.clone().unwrap_or(self.server.publish_mode);
        let publish = match publish_mode.as_str() {
            "standalone" => PublishMode::Standalone,
            "local" => PublishMode::Local(
                o.cvmfs_mount
                    .clone()
                    .unwrap_or(self.server.cvmfs_mount.clone()),
            ),
            "gateway" => {
                let g = self.gateway.clone().ok_or_else(|| {
                    cerr("gateway", "publish_mode gateway needs a gateway: block")
                })?;
                let url_ok = |u: &str| u.starts_with("http://") || u.starts_with("https://");
                if !url_ok(&g.url) {
                    return Err(cerr(
                        "gateway.url",
                        format!("'{}' is not an http(s) URL", g.url),
                    ));
                }
                if !url_ok(&g.stratum0_url) {
                    return Err(cerr(
                        "gateway.stratum0_url",
                        format!("'{}' is not an http(s) URL", g.stratum0_url),
                    ));
                }
                if g.key_id.is_empty() || g.key_id.contains(char::is_whitespace) {
                    return Err(cerr("gateway.key_id", "must be a non-empty word"));
                }
                let positive = |key: &str, v: &str| {
                    parse_duration(v)
                        .and_then(|d| {
                            if d.is_zero() {
                                Err("must be more than zero".to_string())
                            } else {
                                Ok(d)
                            }
                        })
                        .map_err(|m| cerr(key, m))
                };
                let lease_ttl = positive("gateway.lease_ttl", &g.lease_ttl)?;
                let heartbeat_interval =
                    positive("gateway.heartbeat_interval", &g.heartbeat_interval)?;
                positive("gateway.request_timeout", &g.request_timeout)?;
                PublishMode::Gateway(GatewayConfig {
                    url: g.url,
                    key_id: g.key_id,
                    secret_env: g.key_secret_env,
                    lease_ttl,
                    heartbeat_interval,
                    stratum0_url: g.stratum0_url,
                    lease_wait: parse_duration(&g.lease_wait)
                        .map_err(|m| cerr("gateway.lease_wait", m))?,
                    pack_bytes: parse_size(&g.pack_size)
                        .map_err(|m| cerr("gateway.pack_size", m))?
                        as usize,
                    request_timeout: parse_duration(&g.request_timeout)
                        .map_err(|m| cerr("gateway.request_timeout", m))?,
                    public_keys_dir: g.public_keys_dir,
                })
            }
            other => {
                return Err(cerr(
                    "server.publish_mode",
                    format!("'{other}' is not a publish mode (standalone, gateway, local)"),
                ))
            }
        };
        let s3 = match self.cas.kind.as_str() {
            "localfs" => false,
            "s3" => {
                if self.cas.bucket.is_empty() {
                    return Err(cerr("cas.bucket", "cas.type s3 needs a bucket"));
                }
                let e = &self.cas.endpoint;
                if !(e.is_empty() || e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(cerr(
                        "cas.endpoint",
                        format!("'{}' is not an http(s) URL", self.cas.endpoint),
                    ));
                }
                true
            }
            other => {
                return Err(cerr(
                    "cas.type",
                    format!("'{other}' is not a CAS type (localfs, s3)"),
                ))
            }
        };
        let multipart_threshold = parse_size(&self.cas.multipart_threshold)
            .map_err(|m| cerr("cas.multipart_threshold", m))?;
        let request_timeout = parse_duration(&self.cas.request_timeout)
            .map_err(|m| cerr("cas.request_timeout", m))?;
        if request_timeout.is_zero() {
            return Err(cerr("cas.request_timeout", "must be more than 0s"));
        }
        let max_upload = parse_size(&self.server.max_upload_size)
            .map_err(|m| cerr("server.max_upload_size", m))?;
        let upload_idle = parse_duration(&self.server.upload_idle_timeout)
            .map_err(|m| cerr("server.upload_idle_timeout", m))?;
        if upload_idle.is_zero() {
            return Err(cerr("server.upload_idle_timeout", "must be more than 0s"));
        }
        let tar_retention = parse_duration(&self.server.tar_retention)
            .map_err(|m| cerr("server.tar_retention", m))?;
        let log_json = match self.server.log_format.as_str() {
            "json" => true,
            "text" => false,
            other => {
                return Err(cerr(
                    "server.log_format",
                    format!("'{other}' is not json or text"),
                ))
            }
        };
        let p = &self.pipeline;
        let compression =
            Compression::parse(&p.compression).map_err(|m| cerr("pipeline.compression", m))?;
        let chunking = ChunkParams {
            enabled: p.chunking.enabled,
            min: parse_size(&p.chunking.min).map_err(|m| cerr("pipeline.chunking.min", m))?,
            avg: parse_size(&p.chunking.avg).map_err(|m| cerr("pipeline.chunking.avg", m))?,
            max: parse_size(&p.chunking.max).map_err(|m| cerr("pipeline.chunking.max", m))?,
        };
        chunking
            .validate()
            .map_err(|m| cerr("pipeline.chunking", m))?;
        if p.upload_concurrency == 0 {
            return Err(cerr("pipeline.upload_concurrency", "must be at least 1"));
        }
        if p.max_attempts == 0 {
            return Err(cerr("pipeline.max_attempts", "must be at least 1"));
        }
        let limits = IntakeLimits {
            max_entry_size: parse_size(&p.limits.max_entry_size)
                .map_err(|m| cerr("pipeline.limits.max_entry_size", m))?,
            max_total_size: parse_size(&p.limits.max_total_size)
                .map_err(|m| cerr("pipeline.limits.max_total_size", m))?,
            max_entries: p.limits.max_entries,
            skip_special: p.limits.skip_special,
        };
        let retry_backoff =
            parse_duration(&p.retry_backoff).map_err(|m| cerr("pipeline.retry_backoff", m))?;
        if self.repositories.is_empty() {
            return Err(cerr("repositories", "at least one repository is needed"));
        }
        let mut repos = HashMap::new();
        for (i, r) in self.repositories.iter().enumerate() {
            if !valid_repo_name(&r.name) {
                return Err(cerr(
                    &format!("repositories[{i}].name"),
                    format!("'{}' is not a repository name", r.name),
                ));
            }
            let rc = RepoConfig {
                name: r.name.clone(),
                storage: r
                    .storage
                    .clone()
                    .unwrap_or_else(|| self.cas.root.join(&r.name)),
                keys_dir: r
                    .keys_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/etc/cvmfs/keys")),
                s3: s3.then(|| prepub_actors::s3_cas::S3Settings {
                    bucket: self.cas.bucket.clone(),
                    region: self.cas.region.clone(),
                    endpoint: self.cas.endpoint.clone(),
                    prefix: match self.cas.prefix.trim_matches('/') {
                        "" => r.name.clone(),
                        p => format!("{p}/{}", r.name),
                    },
                    multipart_threshold: multipart_threshold as usize,
                    request_timeout,
                }),
                gc: GcConfig {
                    enabled: r.gc.enabled,
                    keep_revisions: if r.gc.keep_revisions == 0 {
                        return Err(cerr(
                            &format!("repositories[{i}].gc.keep_revisions"),
                            "must be at least 1 (the current revision)",
                        ));
                    } else {
                        r.gc.keep_revisions
                    },
                    grace: parse_duration(&r.gc.grace_period)
                        .map_err(|m| cerr(&format!("repositories[{i}].gc.grace_period"), m))?,
                    max_deletion_rate: r.gc.max_deletion_rate,
                    auto_tag_timespan: parse_duration(&r.gc.auto_tag_timespan)
                        .map_err(|m| cerr(&format!("repositories[{i}].gc.auto_tag_timespan"), m))?,
                    soft_delete: parse_duration(&r.gc.soft_delete_period).map_err(|m| {
                        cerr(&format!("repositories[{i}].gc.soft_delete_period"), m)
                    })?,
                    schedule: r
                        .gc
                        .schedule
                        .as_deref()
                        .map(prepub_core::cron::Schedule::parse)
                        .transpose()
                        .map_err(|m| cerr(&format!("repositories[{i}].gc.schedule"), m))?,
                    schedule_text: r.gc.schedule.clone(),
                    dry_run: r.gc.dry_run,
                    access_ttl: r
                        .gc
                        .access_ttl
                        .as_deref()
                        .map(parse_duration)
                        .transpose()
                        .map_err(|m| cerr(&format!("repositories[{i}].gc.access_ttl"), m))?,
                    exempt_paths: r.gc.exempt_paths.clone(),
                    exempt_tags: match r
                        .gc
                        .exempt_tags
                        .iter()
                        .find(|t| t.is_empty() || t.contains('/'))
                    {
                        Some(t) => {
                            return Err(cerr(
                                &format!("repositories[{i}].gc.exempt_tags"),
                                format!("{t:?} is not a tag name glob (non-empty, no '/')"),
                            ))
                        }
                        None => r.gc.exempt_tags.clone(),
                    },
                    access: access_config(&r.gc, i)?,
                },
            };
            if rc.gc.schedule.is_some() && !rc.gc.enabled {
                return Err(cerr(
                    &format!("repositories[{i}].gc.schedule"),
                    "a schedule needs gc.enabled: true",
                ));
            }
            if repos.insert(r.name.clone(), rc).is_some() {
                return Err(cerr(
                    &format!("repositories[{i}].name"),
                    format!("'{}' is listed twice", r.name),
                ));
            }
        }
        let mut tokens = Vec::new();
        for (i, t) in self.server.api_tokens.iter().enumerate() {
            let key = format!("server.api_tokens[{i}]");
            let mut digest = [0u8; 32];
            hex::decode_to_slice(t.sha256.trim(), &mut digest).map_err(|_| {
                cerr(
                    &format!("{key}.sha256"),
                    "must be 64 hex characters (the SHA-256 of the token)",
                )
            })?;
            if t.prefixes.is_empty() {
                return Err(cerr(
                    &format!("{key}.prefixes"),
                    "at least one repo/path prefix is needed",
                ));
            }
            let mut prefixes = Vec::new();
            for (j, pfx) in t.prefixes.iter().enumerate() {
                let (repo, path) = pfx.split_once('/').unwrap_or((pfx.as_str(), ""));
                if !repos.contains_key(repo) {
                    return Err(cerr(
                        &format!("{key}.prefixes[{j}]"),
                        format!("repository '{repo}' is not configured"),
                    ));
                }
                let path = prepub_core::repo::normalize_repo_path(path)
                    .map_err(|e| cerr(&format!("{key}.prefixes[{j}]"), e.to_string()))?;
                prefixes.push((repo.to_string(), path));
            }
            // A job's owner is its token's name, also written into the descriptions of the
            // tags its jobs make (`repo::owner_note`): plain characters only, so that no name
            // can read back as another's.
            let plain = |c: char| c.is_ascii_alphanumeric() || "._@+:-".contains(c);
            if t.name.is_empty() || t.name.len() > 128 || !t.name.chars().all(plain) {
                return Err(cerr(
                    &format!("{key}.name"),
                    format!(
                        "'{}' is not a token name: 1 to 128 of A-Z a-z 0-9 . _ @ + : -",
                        t.name
                    ),
                ));
            }
            // Two tokens of one name would share their jobs and tags.
            if tokens.iter().any(|o: &ScopedToken| o.name == t.name) {
                return Err(cerr(
                    &format!("{key}.name"),
                    format!("'{}' is the name of another token", t.name),
                ));
            }
            if tokens.iter().any(|o: &ScopedToken| o.digest == digest) {
                return Err(cerr(
                    &format!("{key}.sha256"),
                    "is the digest of another token",
                ));
            }
            tokens.push(ScopedToken {
                name: t.name.clone(),
                digest,
                prefixes,
            });
        }
        let distribution = match &self.distribution {
            None => None,
            Some(d) => {
                if d.stratum1_endpoints.is_empty() {
                    return Err(cerr(
                        "distribution.stratum1_endpoints",
                        "at least one endpoint is needed",
                    ));
                }
                for (i, e) in d.stratum1_endpoints.iter().enumerate() {
                    if let Some(n) = e.node_id() {
                        if !prepub_core::control::valid_segment(n) {
                            return Err(cerr(
                                &format!("distribution.stratum1_endpoints[{i}].node_id"),
                                format!("'{n}' is not a valid node id"),
                            ));
                        }
                    }
                    let e = e.url();
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(cerr(
                            &format!("distribution.stratum1_endpoints[{i}]"),
                            format!("'{e}' is not an http(s) URL"),
                        ));
                    }
                }
                if !(0.0..=1.0).contains(&d.quorum) {
                    return Err(cerr("distribution.quorum", "must be between 0 and 1"));
                }
                if d.per_s1_concurrency == 0 {
                    return Err(cerr(
                        "distribution.per_s1_concurrency",
                        "must be at least 1",
                    ));
                }
                let mqtt = match &d.broker_url {
                    None => None,
                    Some(url) => {
                        prepub_actors::mqtt_link::parse_broker_url(url)
                            .map_err(|m| cerr("distribution.broker_url", m))?;
                        let need = |v: &Option<PathBuf>, k: &str| {
                            v.clone().ok_or_else(|| {
                                cerr(
                                    &format!("distribution.{k}"),
                                    "required with broker_url (the broker takes mutual TLS only)",
                                )
                            })
                        };
                        Some(MqttConfig {
                            broker_url: url.clone(),
                            client_cert: need(&d.broker_client_cert, "broker_client_cert")?,
                            client_key: need(&d.broker_client_key, "broker_client_key")?,
                            ca_cert: need(&d.broker_ca_cert, "broker_ca_cert")?,
                            quorum_timeout: parse_duration(&d.mqtt_quorum_timeout)
                                .map_err(|m| cerr("distribution.mqtt_quorum_timeout", m))?,
                            nodes: d
                                .stratum1_endpoints
                                .iter()
                                .map(|e| {
                                    (
                                        e.url().trim_end_matches('/').to_string(),
                                        e.node_id().map(str::to_string),
                                    )
                                })
                                .collect(),
                        })
                    }
                };
                Some(DistributionConfig {
                    mqtt,
                    endpoints: d
                        .stratum1_endpoints
                        .iter()
                        .map(|e| e.url().to_string())
                        .collect(),
                    quorum: d.quorum,
                    timeout: parse_duration(&d.timeout)
                        .map_err(|m| cerr("distribution.timeout", m))?,
                    commit_anyway: d.commit_anyway,
                    per_s1_concurrency: d.per_s1_concurrency,
                    secret_env: d.secret_env.clone(),
                    client_identity: match (&d.client_cert, &d.client_key) {
                        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                        (None, None) => None,
                        _ => {
                            return Err(cerr(
                                "distribution.client_cert",
                                "client_cert and client_key must be set together",
                            ))
                        }
                    },
                    ca_cert: d.ca_cert.clone(),
                })
            }
        };
        Ok(Config {
            distribution,
            publish,
            listen,
            tls,
            spool_root: o.spool_root.clone().unwrap_or(self.server.spool_root),
            max_upload,
            upload_idle,
            tar_retention,
            log_json,
            workers: p.workers,
            upload_concurrency: p.upload_concurrency,
            raw_index: p.raw_index,
            params: EncodeParams {
                chunking,
                compression,
            },
            limits,
            max_attempts: p.max_attempts,
            retry_backoff,
            repos,
            tokens,
            api_token_file: self.server.api_token_file.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) != Some("yaml")
                || p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("receiver")
            {
                continue;
            }
            FileConfig::load(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .validate(&Overrides::default())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
        assert!(n >= 2, "expected example configs in config/");
    }

    fn parse(y: &str) -> Result<Config, ConfigError> {
        let f: FileConfig = serde_yaml::from_str(y).map_err(|e| cerr("yaml", e.to_string()))?;
        f.validate(&Overrides::default())
    }

    #[test]
    fn s3_request_timeout_is_read_and_must_be_positive() {
        let s3 = |extra: &str| {
            parse(&format!(
                "repositories: [{{name: a.org}}]\ncas: {{type: s3, bucket: b{extra}}}"
            ))
        };
        let c = s3("").unwrap();
        let t = |c: &Config| c.repos["a.org"].s3.as_ref().unwrap().request_timeout;
        assert_eq!(t(&c), Duration::from_secs(600));
        assert_eq!(
            t(&s3(", request_timeout: 90s").unwrap()),
            Duration::from_secs(90)
        );
        let e = s3(", request_timeout: 0s").unwrap_err();
        assert_eq!(e.key, "cas.request_timeout");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("repositories: [{name: a.org}]\nserver: {listen: 'nope'}").unwrap_err();
        assert_eq!(e.key, "server.listen");
        let e = parse("repositories: [{name: a.org}]\nbogus: 1").unwrap_err();
        assert!(e.msg.contains("unknown field `bogus`"), "{e}");
        let e = parse("repositories: [{name: a.org}]\npipeline: {compression: zstd}").unwrap_err();
        assert_eq!(e.key, "pipeline.compression");
        let e = parse("repositories: []").unwrap_err();
        assert_eq!(e.key, "repositories");
        let e = parse("repositories: [{name: a.org}]\nserver: {api_tokens: [{name: t, sha256: xyz, prefixes: [a.org]}]}").unwrap_err();
        assert_eq!(e.key, "server.api_tokens[0].sha256");
        let e = parse("repositories: [{name: a.org}]\nserver: {api_tokens: [{name: t, sha256: '0000000000000000000000000000000000000000000000000000000000000000', prefixes: [b.org/x]}]}").unwrap_err();
        assert_eq!(e.key, "server.api_tokens[0].prefixes[0]");
        // Token names own jobs: no two tokens share one (nor a digest).
        let z = "0".repeat(64);
        let o = format!("{}1", "0".repeat(63));
        let e = parse(&format!("repositories: [{{name: a.org}}]\nserver: {{api_tokens: [{{name: ci, sha256: '{z}', prefixes: [a.org]}}, {{name: ci, sha256: '{o}', prefixes: [a.org]}}]}}")).unwrap_err();
        assert_eq!(e.key, "server.api_tokens[1].name");
        // Token names go into tag descriptions: none can read back as another's.
        for bad in [
            "'ci]x'",
            "'[cvmfs-prepub owner victim'",
            "'two words'",
            "''",
        ] {
            let e = parse(&format!("repositories: [{{name: a.org}}]\nserver: {{api_tokens: [{{name: {bad}, sha256: '{z}', prefixes: [a.org]}}]}}")).unwrap_err();
            assert_eq!(e.key, "server.api_tokens[0].name", "{bad}");
        }
        parse(&format!("repositories: [{{name: a.org}}]\nserver: {{api_tokens: [{{name: 'ci-bot@atlas.cern.ch', sha256: '{z}', prefixes: [a.org]}}]}}")).unwrap();
        let e = parse(&format!("repositories: [{{name: a.org}}]\nserver: {{api_tokens: [{{name: a, sha256: '{z}', prefixes: [a.org]}}, {{name: b, sha256: '{z}', prefixes: [a.org]}}]}}")).unwrap_err();
        assert_eq!(e.key, "server.api_tokens[1].sha256");
        // Gateway durations: more than zero.
        let gw = "repositories: [{name: a.org}]\nserver: {publish_mode: gateway}\ngateway: {url: 'http://g:4929', key_id: k, stratum0_url: 'http://s0/cvmfs'";
        for (extra, key) in [
            (", heartbeat_interval: 0s", "gateway.heartbeat_interval"),
            (", lease_ttl: 0s", "gateway.lease_ttl"),
            (", request_timeout: 0s", "gateway.request_timeout"),
        ] {
            let e = parse(&format!("{gw}{extra}}}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}");
        }
        assert!(parse(&format!("{gw}}}")).is_ok());
        let c = parse(
            "repositories: [{name: a.org}]\nserver: {listen: ':9000', max_upload_size: 1GiB}",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.max_upload, 1 << 30);
        assert_eq!(c.repos["a.org"].storage, PathBuf::from("/srv/cvmfs/a.org"));
    }

    #[test]
    fn distribution_settings_are_checked() {
        let base = "repositories: [{name: a.org}]\ndistribution:\n  stratum1_endpoints: ['https://s1:9100']\n";
        let e = parse(&format!("{base}  client_cert: /c.crt\n")).unwrap_err();
        assert_eq!(e.key, "distribution.client_cert");
        let e = parse(&format!("{base}  quorum: 1.5\n")).unwrap_err();
        assert_eq!(e.key, "distribution.quorum");
        let e =
            parse("repositories: [{name: a.org}]\ndistribution: {stratum1_endpoints: ['s1:9100']}")
                .unwrap_err();
        assert_eq!(e.key, "distribution.stratum1_endpoints[0]");
        let c = parse(&format!(
            "{base}  client_cert: /c.crt\n  client_key: /c.key\n  ca_cert: /ca.crt\n  timeout: 90s\n"
        ))
        .unwrap();
        let d = c.distribution.unwrap();
        assert_eq!(
            d.client_identity,
            Some((PathBuf::from("/c.crt"), PathBuf::from("/c.key")))
        );
        assert_eq!(d.ca_cert, Some(PathBuf::from("/ca.crt")));
        assert_eq!(d.timeout, Duration::from_secs(90));
        assert!(d.mqtt.is_none());
        // The MQTT control plane: TLS only, all three PEM files, node-bound endpoints.
        let e = parse(&format!("{base}  broker_url: tcp://b:1883\n")).unwrap_err();
        assert_eq!(e.key, "distribution.broker_url");
        let e = parse(&format!("{base}  broker_url: tls://b:8883\n")).unwrap_err();
        assert_eq!(e.key, "distribution.broker_client_cert");
        let c = parse(
            "repositories: [{name: a.org}]\ndistribution:\n  stratum1_endpoints:\n    - https://s1:9100/\n    - {url: 'https://s2:9100', node_id: s2}\n  broker_url: tls://b:8883\n  broker_client_cert: /p.crt\n  broker_client_key: /p.key\n  broker_ca_cert: /ca.crt\n  mqtt_quorum_timeout: 45s\n",
        )
        .unwrap();
        let m = c.distribution.unwrap().mqtt.unwrap();
        assert_eq!(m.quorum_timeout, Duration::from_secs(45));
        assert_eq!(
            m.nodes,
            vec![
                ("https://s1:9100".to_string(), None),
                ("https://s2:9100".to_string(), Some("s2".to_string()))
            ]
        );
        let e = parse("repositories: [{name: a.org}]\ndistribution:\n  stratum1_endpoints: [{url: 'https://s2:9100', node_id: 'a/b'}]\n").unwrap_err();
        assert_eq!(e.key, "distribution.stratum1_endpoints[0].node_id");
    }
}
