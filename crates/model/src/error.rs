//! XenAPI errors as they travel: a code and string parameters.

use crate::errors;
use std::fmt;

/// An API-level failure: `[CODE, param…]` on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub params: Vec<String>,
}

impl ApiError {
    pub fn new(code: &str, params: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ApiError {
            code: code.to_owned(),
            params: params.into_iter().map(Into::into).collect(),
        }
    }
    pub fn code(code: &str) -> Self {
        ApiError {
            code: code.to_owned(),
            params: Vec::new(),
        }
    }
    pub fn handle_invalid(class: &str, handle: &str) -> Self {
        Self::new(errors::HANDLE_INVALID, [class, handle])
    }
    pub fn uuid_invalid(class: &str, uuid: &str) -> Self {
        Self::new(errors::UUID_INVALID, [class, uuid])
    }
    pub fn session_invalid(handle: &str) -> Self {
        Self::new(errors::SESSION_INVALID, [handle])
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        ApiError {
            code: errors::INTERNAL_ERROR.into(),
            params: vec![msg.into()],
        }
    }
    pub fn invalid_value(field: &str, value: &str) -> Self {
        Self::new(errors::INVALID_VALUE, [field, value])
    }
    pub fn field_type(field: &str) -> Self {
        Self::new(errors::FIELD_TYPE_ERROR, [field])
    }
    pub fn operation_not_allowed(reason: impl Into<String>) -> Self {
        ApiError {
            code: errors::OPERATION_NOT_ALLOWED.into(),
            params: vec![reason.into()],
        }
    }
    pub fn method_unknown(method: &str) -> Self {
        Self::new(errors::MESSAGE_METHOD_UNKNOWN, [method])
    }
    /// The whole description as a list of strings.
    pub fn description(&self) -> Vec<String> {
        let mut v = Vec::with_capacity(self.params.len() + 1);
        v.push(self.code.clone());
        v.extend(self.params.iter().cloned());
        v
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if !self.params.is_empty() {
            write!(f, " [{}]", self.params.join("; "))?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}
