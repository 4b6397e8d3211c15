//! citygw: the IoT telemetry ingestion gateway of a city platform.
//!
//! Data flows left to right through the modules: [`sources`] take bytes in, [`codec`] decodes them,
//! [`pipeline`] checks identity, normalises and makes readings durable in [`store`], and [`api`]
//! serves them out. [`registry`] holds devices and credentials; [`kpi`] measures IoT connections
//! per resident; [`control`] sends commands to devices and raises alerts; [`tls`] secures the
//! listeners; [`app`] wires it all for
//! `citygw run`; [`cli`] is the operator's command line.

pub mod api;
pub mod app;
pub mod cli;
pub mod codec;
pub mod config;
pub mod control;
pub mod kpi;
pub mod observability;
pub mod pipeline;
pub mod proto;
pub mod reason;
#[cfg(test)]
mod reference_docs;
pub mod registry;
pub mod sinks;
pub mod sources;
pub mod store;
pub mod tls;

#[cfg(test)]
mod fuzz;
