//! A command's context and errors.

use crate::cli::protocol::Out;
use crate::context::Server;
use crate::core::call::Caller;
use corral_model::schema::error_def;
use corral_model::{ApiError, NULL_REF, Value};
use std::sync::Arc;

pub(crate) struct CliCtx {
    pub(crate) server: Arc<Server>,
    pub(crate) session: String,
    pub(crate) caller: Caller,
}

impl CliCtx {
    pub(crate) async fn call(
        &self,
        method: &str,
        mut params: Vec<Value>,
    ) -> Result<Value, CliError> {
        params.insert(0, Value::String(self.session.clone()));
        Ok(self.server.call(method, params, &self.caller).await?)
    }

    /// A message through the typed client, under the command's session.
    pub(crate) async fn invoke<A: corral_model::args::Args>(
        &self,
        args: A,
    ) -> Result<Value, CliError> {
        Ok(self
            .server
            .invoke(&self.session, args, &self.caller)
            .await?)
    }

    /// An API error as xe prints it: the datamodel's sentence and one line
    /// per parameter, or `Error code:` for codes the datamodel does not know.
    pub(crate) fn api_error(&self, e: &ApiError) -> Vec<Out> {
        match error_def(&e.code) {
            Some(def) => {
                let mut s = format!("{}\n", def.doc);
                for (i, name) in def.params.iter().enumerate() {
                    let v = e.params.get(i).map(|p| {
                        if p.starts_with("OpaqueRef:") && p != NULL_REF {
                            self.uuid_of(p)
                        } else {
                            p.clone()
                        }
                    });
                    s.push_str(&format!(
                        "{name}: {}\n",
                        v.unwrap_or_else(|| "<unknown>".into())
                    ));
                }
                for extra in e.params.iter().skip(def.params.len()) {
                    s.push_str(&format!("<extra>: {extra}\n"));
                }
                vec![Out::Stderr(s)]
            }
            None => vec![Out::Error(e.code.clone(), e.params.clone())],
        }
    }
}

#[derive(Debug)]
pub enum CliError {
    Text(String),
    Api(ApiError),
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> Self {
        CliError::Api(e)
    }
}

pub(crate) fn text<T>(t: impl Into<String>) -> Result<T, CliError> {
    Err(CliError::Text(t.into()))
}

/// Record lookups through the API, so each is authorised like the call it is.
impl CliCtx {
    /// `<class>.get_all_records_where(expr)` as (ref, record) pairs.
    pub(crate) async fn records_where(
        &self,
        class: &str,
        expr: &str,
    ) -> Result<Vec<(String, Value)>, CliError> {
        let v = self
            .call(
                &format!("{class}.get_all_records_where"),
                vec![Value::str(expr)],
            )
            .await?;
        Ok(match v {
            Value::Struct(m) => m,
            _ => Vec::new(),
        })
    }

    /// One field of a record (`<class>.get_<field>`).
    pub(crate) async fn get(&self, class: &str, r: &str, field: &str) -> Result<Value, CliError> {
        self.call(&format!("{class}.get_{field}"), vec![Value::str(r)])
            .await
    }

    /// The object with this uuid, if any.
    pub(crate) async fn find_uuid(
        &self,
        class: &str,
        uuid: &str,
    ) -> Result<Option<String>, CliError> {
        match self
            .call(&format!("{class}.get_by_uuid"), vec![Value::str(uuid)])
            .await
        {
            Ok(r) => Ok(Some(r.db_string())),
            Err(CliError::Api(e)) if e.code == corral_model::errors::UUID_INVALID => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The objects with this name-label.
    pub(crate) async fn find_named(
        &self,
        class: &str,
        name: &str,
    ) -> Result<Vec<String>, CliError> {
        let v = self
            .call(
                &format!("{class}.get_by_name_label"),
                vec![Value::str(name)],
            )
            .await?;
        Ok(v.as_array()
            .map(|a| a.iter().map(Value::db_string).collect())
            .unwrap_or_default())
    }
}

/// A record's field as xe prints it (absent: empty).
pub(crate) fn member(rec: &Value, name: &str) -> String {
    rec.member(name).map(Value::db_string).unwrap_or_default()
}
