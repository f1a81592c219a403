//! The one value universe both wire protocols share, and conversion of wire
//! values to the datamodel's types.

use crate::date;
use crate::error::ApiError;
use crate::errors;
use crate::schema::{Ty, enum_def};

/// A XenAPI value. Integers stay distinct from strings so that XML-RPC can
/// send them as untyped strings and JSON-RPC as numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Int(i64),
    /// A 32-bit integer that XML-RPC sends as `<i4>` (only `valid_ref_counts`).
    I4(i32),
    Float(f64),
    Bool(bool),
    /// Always normalised to `YYYYMMDDTHH:MM:SSZ`.
    DateTime(String),
    Array(Vec<Value>),
    /// Struct or map; member order is kept.
    Struct(Vec<(String, Value)>),
    Nil,
}

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::DateTime(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::I4(i) => Some(i64::from(*i)),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_struct(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Struct(s) => Some(s),
            _ => None,
        }
    }
    /// Looks a member up in a struct.
    pub fn member(&self, key: &str) -> Option<&Value> {
        self.as_struct()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
    pub fn string_set(items: impl IntoIterator<Item = impl Into<String>>) -> Value {
        Value::Array(items.into_iter().map(|s| Value::String(s.into())).collect())
    }
    pub fn string_map<'a>(items: impl IntoIterator<Item = (&'a str, &'a str)>) -> Value {
        Value::Struct(
            items
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Value::str(v)))
                .collect(),
        )
    }

    /// The database's string form of a scalar, as the `where` filter language
    /// compares them: bools `true`/`false`, ints in decimal.
    pub fn db_string(&self) -> String {
        match self {
            Value::String(s) | Value::DateTime(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::I4(i) => i.to_string(),
            Value::Float(f) => format_float(*f),
            Value::Bool(b) => b.to_string(),
            Value::Nil => String::new(),
            Value::Array(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|v| format!("'{}'", v.db_string()))
                    .collect();
                format!("({})", parts.join(" "))
            }
            Value::Struct(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|(k, v)| format!("('{}' '{}')", k, v.db_string()))
                    .collect();
                format!("({})", parts.join(" "))
            }
        }
    }
}

/// `%.16g`, as XAPI prints floats.
pub fn format_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return "0".into();
    }
    let exp = f.abs().log10().floor() as i32;
    if (-5..16).contains(&exp) {
        let decimals = (15 - exp).max(0) as usize;
        let s = format!("{f:.decimals$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        };
        s
    } else {
        let s = format!("{f:.15e}");
        let (mant, e) = s.split_once('e').unwrap_or((&s, "0"));
        let mant = if mant.contains('.') {
            mant.trim_end_matches('0').trim_end_matches('.')
        } else {
            mant
        };
        let e: i32 = e.parse().unwrap_or(0);
        format!("{mant}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    }
}

/// The value a field or parameter takes when the spec gives `default` (or no
/// default at all: the type's empty value).
pub fn default_value(ty: &Ty, default: Option<&str>) -> Value {
    let d = default.unwrap_or("");
    match ty {
        Ty::String => Value::String(d.to_owned()),
        Ty::Int => Value::Int(d.parse().unwrap_or(0)),
        Ty::Float => Value::Float(d.trim_end_matches('.').parse().unwrap_or(0.0)),
        Ty::Bool => Value::Bool(d == "true"),
        Ty::DateTime => Value::DateTime(
            date::parse(d)
                .map(date::format)
                .unwrap_or_else(|| date::EPOCH.into()),
        ),
        Ty::Ref(_) => Value::String(if d.is_empty() {
            crate::NULL_REF.into()
        } else {
            d.to_owned()
        }),
        Ty::Enum(e) => {
            let first = enum_def(e)
                .and_then(|e| e.values.first())
                .copied()
                .unwrap_or("");
            Value::String(if d.is_empty() {
                first.to_owned()
            } else {
                d.to_owned()
            })
        }
        Ty::Set(_) => Value::Array(Vec::new()),
        Ty::Map(..) | Ty::Record(_) | Ty::EventBatch => Value::Struct(Vec::new()),
        Ty::Option(_) | Ty::Void => Value::String(String::new()),
    }
}

/// Converts a wire value to `ty`, accepting what XAPI accepts: ints as
/// numbers or decimal strings, floats from ints, dates in either format.
/// `name` names the field or parameter in errors.
pub fn coerce(v: Value, ty: &Ty, name: &str) -> Result<Value, ApiError> {
    match (ty, v) {
        (Ty::String | Ty::Ref(_), Value::String(s)) => Ok(Value::String(s)),
        (Ty::Enum(e), Value::String(s)) => {
            let def = enum_def(e).ok_or_else(|| ApiError::internal(format!("unknown enum {e}")))?;
            if def.values.contains(&s.as_str()) {
                Ok(Value::String(s))
            } else if let Some(v) = def.values.iter().find(|v| v.eq_ignore_ascii_case(&s)) {
                Ok(Value::String((*v).to_owned()))
            } else {
                Err(errors::invalid_value(name.to_owned(), s))
            }
        }
        (Ty::Int, Value::Int(i)) => Ok(Value::Int(i)),
        (Ty::Int, Value::I4(i)) => Ok(Value::Int(i64::from(i))),
        (Ty::Int, Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Value::Int)
            .map_err(|_| ApiError::field_type(name)),
        (Ty::Float, Value::Float(f)) => Ok(Value::Float(f)),
        (Ty::Float, Value::Int(i)) => Ok(Value::Float(i as f64)),
        (Ty::Float, Value::I4(i)) => Ok(Value::Float(f64::from(i))),
        (Ty::Float, Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| ApiError::field_type(name)),
        (Ty::Bool, Value::Bool(b)) => Ok(Value::Bool(b)),
        (Ty::DateTime, Value::DateTime(s) | Value::String(s)) => match date::parse(&s) {
            Some(t) => Ok(Value::DateTime(date::format(t))),
            None => Err(errors::invalid_value(name.to_owned(), s)),
        },
        // Duplicates go in one pass (a hash of what was seen), so a request
        // costs time linear in its size.
        (Ty::Set(inner), Value::Array(items)) => {
            let mut out: Vec<Value> = Vec::with_capacity(items.len());
            let mut seen = std::collections::HashSet::with_capacity(items.len());
            for i in items {
                let c = coerce(i, inner, name)?;
                if seen.insert(c.db_string()) {
                    out.push(c);
                }
            }
            Ok(Value::Array(out))
        }
        (Ty::Map(kt, vt), Value::Struct(items)) => {
            let mut out: Vec<(String, Value)> = Vec::with_capacity(items.len());
            let mut at = std::collections::HashMap::with_capacity(items.len());
            for (k, v) in items {
                let k = match coerce(Value::String(k), kt, name)? {
                    Value::String(s) => s,
                    other => other.db_string(),
                };
                let v = coerce(v, vt, name)?;
                match at.get(&k) {
                    Some(&i) => out[i] = (k, v),
                    None => {
                        at.insert(k.clone(), out.len());
                        out.push((k, v));
                    }
                }
            }
            Ok(Value::Struct(out))
        }
        (Ty::Record(_) | Ty::EventBatch, v @ Value::Struct(_)) => Ok(v),
        (Ty::Option(inner), v) => coerce(v, inner, name),
        _ => Err(ApiError::field_type(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_percent_16g() {
        assert_eq!(format_float(1.0), "1");
        assert_eq!(format_float(0.5), "0.5");
        assert_eq!(format_float(1e20), "1e+20");
        assert_eq!(format_float(-2.25), "-2.25");
        assert_eq!(format_float(0.0001), "0.0001");
    }

    #[test]
    fn coercion_follows_xapi() {
        assert_eq!(coerce(Value::str("42"), &Ty::Int, "x"), Ok(Value::Int(42)));
        assert_eq!(
            coerce(Value::str("x"), &Ty::Int, "f").unwrap_err().code,
            "FIELD_TYPE_ERROR"
        );
        assert_eq!(
            coerce(Value::str("true"), &Ty::Bool, "f").unwrap_err().code,
            "FIELD_TYPE_ERROR"
        );
        assert_eq!(
            coerce(Value::Int(3), &Ty::Float, "f"),
            Ok(Value::Float(3.0))
        );
        let e = coerce(
            Value::str("Bogus"),
            &Ty::Enum("vm_power_state"),
            "power_state",
        )
        .unwrap_err();
        assert_eq!(
            e.description(),
            vec!["INVALID_VALUE", "power_state", "Bogus"]
        );
        assert_eq!(
            coerce(Value::str("2025-03-19T04:16:24Z"), &Ty::DateTime, "d"),
            Ok(Value::DateTime("20250319T04:16:24Z".into()))
        );
    }
}
