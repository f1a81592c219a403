//! Sessions and passwords.

pub mod passwords;
pub mod sessions;
