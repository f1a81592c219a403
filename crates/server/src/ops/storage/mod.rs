//! Storage: the handlers of SR, PBD, VDI and VBD, and what they share.

pub mod backend;
pub mod journal;
pub mod records;
pub mod scan;
