//! Transports and formats: HTTP, RPC, transfers, consoles, listeners.

pub mod console;
pub mod http;
pub mod listen;
pub mod query;
pub mod router;
pub mod rpc;
pub mod transfer;
