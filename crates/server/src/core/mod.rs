//! The bottom layer: call context, configuration, records helpers, alerts, logs. Imports nothing above it.

pub mod alerts;
pub mod audit;
pub mod call;
pub mod config;
pub mod conns;
pub mod driver_errors;
pub mod events_hub;
pub mod logfile;
pub mod logsafe;
pub mod marks;
pub mod records;
pub mod tls;
