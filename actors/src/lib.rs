//! prepub-actors: the supervised actix actors of the cvmfs-prepub daemon. Each is a thin shell
//! around plain structs of [`prepub_core`]: `JobManager` (job table, scheduling, retries),
//! `SpoolJournal` (the spool and its write-ahead journal), `CompressorPool` (tar readers and the
//! CPU work on OS threads fed by crossbeam channels), `CasWriter` (durable object puts, many in
//! flight) and `Publisher` (the standalone publish backend with one
//! commit queue per repository).

pub mod access_tracker;
pub mod cas_writer;
pub mod compressor_pool;
pub mod gateway_client;
pub mod gateway_publisher;
pub mod http_store;
pub mod job_manager;
pub mod local_publisher;
pub mod metrics;
pub mod mqtt_bridge;
pub mod mqtt_link;
pub mod publisher;
pub mod receiver_agent;
pub mod s1_distributor;
pub mod s3_cas;
pub mod spool_journal;
pub mod testhook;

pub use prepub_core;
