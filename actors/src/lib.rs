//! prepub-actors: the supervised actix actors of the cvmfs-prepub daemon (`JobManager`,
//! `SpoolJournal`, `CompressorPool`, `CasWriter`, `GatewayLease`, `S1Distributor`,
//! `MqttBridge`, `ReceiverAgent`). Each is a thin shell around a plain struct of
//! [`prepub_core`]; the daemon that starts them arrives with the REST API.

pub use prepub_core;
