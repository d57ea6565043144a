//! lbaas-ctl: the controller of the lbaas XDP load balancer.
//!
//! Modules, one per concern: [`config`] (YAML model and validation), [`compile`] (desired
//! state to data-path tables: weighted schedules, id and ring allocation), [`datapath`] (aya:
//! loading, attaching, map writes), [`net`] (VIP addresses via rtnetlink), [`diff`] (what an
//! apply changes), [`api`] (the daemon's HTTP/JSON API on a Unix socket and its client),
//! [`proxy`] (the L7 proxy for HTTP and TERMINATED_HTTPS listeners), [`daemon`] and
//! [`render`] (CLI output).
#![deny(missing_docs)]

pub mod api;
pub mod compile;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod diff;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod render;
pub mod status;
