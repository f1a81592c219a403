//! corrald: the Corral host daemon. See docs/architecture.md.

pub mod api;
pub mod audit;
pub mod cli;
pub mod cli_storage;
pub mod cli_vm;
pub mod console;
pub mod daemon;
pub mod events;
pub mod filter;
pub mod handlers;
pub mod http;
pub mod init;
pub mod logfile;
pub mod logsafe;
pub mod sessions;
pub mod storage;
pub mod tasks;
pub mod tls;
pub mod transfer;
pub mod vm;
