//! Corral's XenAPI datamodel and wire codecs.
//!
//! The classes, fields, messages, enums, roles and errors are declared once in
//! `spec/xenapi.spec` and `spec/errors.spec`; `build.rs` turns them into the
//! static tables in [`schema`]. Everything that needs to know the API shape
//! (database, dispatch, RBAC, `xe` tables, the API reference) reads those
//! tables. The codecs in [`xmlrpc`] and [`jsonrpc`] are pure functions over
//! [`Value`].

pub mod args;
pub mod date;
pub mod enums;
pub mod error;
pub mod errors;
pub mod http;
pub mod jsonrpc;
pub mod reference;
pub mod refs;
pub mod schema;
pub mod value;
pub mod xmlrpc;

pub use error::ApiError;
pub use schema::{
    ClassDef, ClassId, EnumDef, ErrorDef, FieldDef, FieldId, Lifecycle, MessageDef, ParamDef, Qual,
    Role, Ty, class, field,
};
pub use value::Value;

/// The null reference.
pub const NULL_REF: &str = "OpaqueRef:NULL";

/// A fresh object reference, `OpaqueRef:<uuid v4>`.
pub fn new_ref() -> String {
    format!("OpaqueRef:{}", uuid::Uuid::new_v4())
}

/// A fresh lower-case canonical uuid.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}
