//! Helpers for reading and writing records of the database.

use crate::core::call::pstr;
use corral_db::{Txn, settable_at_create};
use corral_model::schema::{ClassId, Ty};
use corral_model::value::coerce;
use corral_model::{ApiError, NULL_REF, Value};
use std::collections::BTreeMap;

/// The fields given to a generic `create`, type-checked; RW and ctor fields
/// without a datamodel default must be present.
pub(crate) fn create_fields(c: ClassId, args: &Value) -> Result<Vec<(usize, Value)>, ApiError> {
    let members = args
        .as_struct()
        .ok_or_else(|| ApiError::field_type("args"))?;
    let mut out = Vec::new();
    for (i, f) in c.def().fields.iter().enumerate() {
        if !settable_at_create(f) {
            continue;
        }
        match members.iter().find(|(k, _)| k == f.name) {
            Some((_, v)) => out.push((i, coerce(v.clone(), &f.ty, f.name)?)),
            None if f.default.is_some() => {}
            None => {
                return Err(ApiError::internal(format!(
                    "Missing field {} in {}.create",
                    f.name,
                    c.name()
                )));
            }
        }
    }
    Ok(out)
}

/// Refs written to the database must name existing objects (or be null).
pub fn check_refs(t: &Txn<'_>, c: ClassId, fields: &[(usize, Value)]) -> Result<(), ApiError> {
    for (i, v) in fields {
        let f = &c.def().fields[*i];
        if let (Ty::Ref(target), Some(r)) = (f.ty, v.as_str()) {
            if let Some(tc) = ClassId::by_name(target) {
                if r != NULL_REF && tc.def().in_db && !t.state().exists(tc, r) {
                    return Err(ApiError::handle_invalid(target, r));
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn strmap(v: &Value) -> BTreeMap<String, String> {
    v.as_struct()
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (k.clone(), v.db_string()))
        .collect()
}

pub(crate) fn to_value(m: &BTreeMap<String, String>) -> Value {
    Value::Struct(m.iter().map(|(k, v)| (k.clone(), Value::str(v))).collect())
}

pub(crate) fn db<T>(r: Result<T, corral_db::DbError>) -> Result<T, ApiError> {
    r.map_err(ApiError::from)
}

/// A field of a create call's record, as `create_fields` parsed it.
pub(crate) fn given_field(given: &[(usize, Value)], f: corral_model::FieldId) -> Option<Value> {
    given
        .iter()
        .find(|(i, _)| *i == f.index)
        .map(|(_, v)| v.clone())
}

pub(crate) fn first(p: Vec<Value>) -> String {
    pstr(&mut p.into_iter())
}
