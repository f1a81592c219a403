//! VM operations, one file per concern.

pub mod clone;
pub mod config;
pub mod lifecycle;
pub mod memory;
pub mod monitor;
pub mod placement;
pub mod power;
pub mod startup;
pub mod state;
pub mod suspend;
