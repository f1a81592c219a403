//! The server side of xe.

pub mod args;
pub mod commands;
pub mod context;
pub mod generic;
pub mod host;
pub mod network;
pub mod protocol;
pub mod records;
pub mod serve;
pub mod storage;
pub mod table;
pub mod vm;
