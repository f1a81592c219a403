//! What every call carries: its context, result type and argument helpers.

use corral_model::schema::{ClassId, FieldId, Qual, Role};
use corral_model::{ApiError, Value};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

pub type ApiResult = Result<Value, ApiError>;

pub type BoxFut = Pin<Box<dyn Future<Output = ApiResult> + Send>>;

/// Who is calling, as far as the transport knows.
#[derive(Clone, Debug)]
pub struct Caller {
    pub origin: Origin,
    pub originator: Option<String>,
}

/// The session a call runs under.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub session: String,
    pub role: Role,
    pub user: String,
    pub user_ref: String,
    /// The task this call reports to, if any.
    pub task: Option<String>,
}

pub(crate) fn db_err(e: corral_db::DbError) -> ApiError {
    e.into()
}

pub fn uuid_field(c: ClassId) -> FieldId {
    c.field("uuid").unwrap_or(FieldId { class: c, index: 0 })
}

/// Convenience for handlers: take a string parameter.
pub fn pstr(p: &mut std::vec::IntoIter<Value>) -> String {
    match p.next() {
        Some(Value::String(s)) | Some(Value::DateTime(s)) => s,
        Some(v) => v.db_string(),
        None => String::new(),
    }
}

pub fn void() -> ApiResult {
    Ok(Value::String(String::new()))
}

pub fn is_rw(f: FieldId) -> bool {
    f.def().qual == Qual::RW
}

/// Where a connection came from.
#[derive(Clone, Copy, Debug)]
pub struct Origin {
    pub addr: Option<IpAddr>,
    /// The unix socket: callers are the local superuser.
    pub local_root: bool,
    /// The connection's socket when it carries plain HTTP (not TLS), so
    /// bulk transfers can splice into it without copying through memory.
    pub raw_fd: Option<i32>,
}
