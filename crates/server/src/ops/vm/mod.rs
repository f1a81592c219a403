//! VM operations, one file per concern.

use crate::core::call::Ctx;
use crate::ops::query::int;
use crate::ops::vm::power::vm_start;
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
