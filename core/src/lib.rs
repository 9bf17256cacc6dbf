#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
//! prepub-core: the CVMFS repository formats, content-addressed storage and publish pipeline of
//! cvmfs-prepub, as plain synchronous Rust. Nothing here knows about actix or async; the daemon's
//! actors are thin shells around these types.

pub mod access;
pub mod cas;
pub mod catalog;
pub mod check;
pub mod chunker;
pub mod control;
pub mod cron;
pub mod directio;
pub mod gateway;
pub mod gc;
pub mod gcrun;
pub mod growing;
pub mod hash;
pub mod history;
pub mod intake;
pub mod jobs;
pub mod keys;
pub mod lifecycle;
pub mod manifest;
pub mod merge;
pub mod object;
pub mod pipeline;
pub mod pzlib;
pub mod rawindex;
pub mod receiver;
pub mod repo;
pub mod spool;
pub mod timefmt;
