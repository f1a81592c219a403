//! A command's context and errors.

use crate::cli::protocol::Out;
use crate::context::Server;
use crate::core::call::Caller;
use corral_model::schema::{ClassId, error_def};
use corral_model::{ApiError, NULL_REF, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What xe prints for a reference to an object that is gone.
pub(crate) const NOT_IN_DATABASE: &str = "<not in database>";

/// One command's view of the API: it calls the API under the command's
/// session and nothing else, so each command is authorised, routed and
/// audited like the calls it maps to.
pub(crate) struct CliCtx {
    pub(crate) server: Arc<Server>,
    pub(crate) session: String,
    pub(crate) caller: Caller,
    /// ref → uuid, as learnt through `<class>.get_uuid` during the command.
    uuids: Mutex<HashMap<String, String>>,
}

impl CliCtx {
    pub(crate) fn new(server: Arc<Server>, session: String, caller: Caller) -> CliCtx {
        CliCtx {
            server,
            session,
            caller,
            uuids: Mutex::new(HashMap::new()),
        }
    }

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
    pub(crate) async fn api_error(&self, e: &ApiError) -> Vec<Out> {
        match error_def(&e.code) {
            Some(def) => {
                let mut s = format!("{}\n", def.doc);
                for (i, name) in def.params.iter().enumerate() {
                    let v = match e.params.get(i) {
                        Some(p) if p.starts_with("OpaqueRef:") && p != NULL_REF => {
                            self.uuid_of(p).await
                        }
                        Some(p) => p.clone(),
                        None => "<unknown>".into(),
                    };
                    s.push_str(&format!("{name}: {v}\n"));
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

/// Uuids of references, through the API.
impl CliCtx {
    /// The uuid of `r`, an object of class `c`; the null ref stays as it is.
    pub(crate) async fn uuid(&self, c: ClassId, r: &str) -> Result<String, CliError> {
        if r.is_empty() || r == NULL_REF {
            return Ok(r.to_owned());
        }
        if let Some(u) = self.uuids.lock().ok().and_then(|m| m.get(r).cloned()) {
            return Ok(u);
        }
        match self
            .call(&format!("{}.get_uuid", c.name()), vec![Value::str(r)])
            .await
        {
            Ok(v) => {
                let u = v.db_string();
                if let Ok(mut m) = self.uuids.lock() {
                    m.insert(r.to_owned(), u.clone());
                }
                Ok(u)
            }
            Err(CliError::Api(e)) if e.code == corral_model::errors::HANDLE_INVALID => {
                Ok(NOT_IN_DATABASE.into())
            }
            Err(e) => Err(e),
        }
    }

    /// The uuid of a reference whose class is not known (an error's
    /// parameter): each class with uuids is asked in turn.
    pub(crate) async fn uuid_of(&self, r: &str) -> String {
        for c in ClassId::all().filter(|c| c.def().getters && c.field("uuid").is_some()) {
            match self.uuid(c, r).await {
                Ok(u) if u != NOT_IN_DATABASE => return u,
                _ => {}
            }
        }
        NOT_IN_DATABASE.into()
    }
}

/// A record's field as xe prints it (absent: empty).
pub(crate) fn member(rec: &Value, name: &str) -> String {
    rec.member(name).map(Value::db_string).unwrap_or_default()
}
