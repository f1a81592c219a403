//! corrald: the Corral host daemon. See docs/architecture.md for the layers.

pub mod auth;
pub mod cli;
pub mod context;
pub mod core;
pub mod daemon;
pub mod dispatch;
pub mod drivers;
pub mod forward;
pub mod init;
pub mod ops;
pub mod wire;
