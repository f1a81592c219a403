//! Per-class operations.

pub mod event;
pub mod host;
pub mod message;
pub mod network;
pub mod pbd;
pub mod pif;
pub mod query;
pub mod session;
pub mod sr;
pub mod storage;
pub mod user;
pub mod vbd;
pub mod vdi;
pub mod vif;
pub mod vm;
