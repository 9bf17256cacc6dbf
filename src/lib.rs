//! cvmfs-prepub: the daemon, the operator commands and the API types shared with `prepubctl`.

pub mod api_types;
pub mod client;
pub mod config;
pub mod gateway_double;
pub use prepub_actors::http_store;
pub mod receiver_mqtt;
pub mod receiver_server;
pub mod repo_cmd;
pub mod server;
pub mod units;
