//! JSON-RPC v1 and v2 as XenAPI speaks them (`POST /jsonrpc`).

use crate::error::ApiError;
use crate::value::Value;
use serde_json::Value as Json;
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: String,
    pub params: Vec<Value>,
    /// The request id, echoed with its original JSON type.
    pub id: Json,
    pub v2: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JSON-RPC parse error: {}", self.0)
    }
}
impl std::error::Error for ParseError {}

/// Converts parsed JSON into a [`Value`]. Whole numbers become ints.
pub fn from_json(j: Json) -> Value {
    match j {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(0.0)),
        },
        Json::String(s) => Value::String(s),
        Json::Array(a) => Value::Array(a.into_iter().map(from_json).collect()),
        Json::Object(o) => Value::Struct(o.into_iter().map(|(k, v)| (k, from_json(v))).collect()),
    }
}

/// Parses a request. A missing or null `id` (a notification) is an error: the
/// server answers those with HTTP 500, as XAPI does.
pub fn parse_call(body: &[u8]) -> Result<Call, ParseError> {
    let j: Json = serde_json::from_slice(body).map_err(|e| ParseError(e.to_string()))?;
    let Json::Object(mut o) = j else {
        return Err(ParseError("request is not an object".into()));
    };
    let v2 = o.get("jsonrpc").and_then(Json::as_str) == Some("2.0");
    let id = match o.remove("id") {
        None | Some(Json::Null) => return Err(ParseError("missing id".into())),
        Some(id @ (Json::Number(_) | Json::String(_))) => id,
        Some(_) => return Err(ParseError("id must be a number or a string".into())),
    };
    let method = match o.remove("method") {
        Some(Json::String(m)) => m,
        _ => return Err(ParseError("missing method".into())),
    };
    let params = match o.remove("params") {
        Some(Json::Array(a)) => a.into_iter().map(from_json).collect(),
        None | Some(Json::Null) if v2 => Vec::new(),
        Some(obj @ Json::Object(_)) if v2 => vec![from_json(obj)],
        _ => return Err(ParseError("params must be an array".into())),
    };
    Ok(Call {
        method,
        params,
        id,
        v2,
    })
}

/// Appends `s` as a JSON string literal.
pub fn write_str(s: &str, out: &mut String) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends `v` as JSON.
pub fn write_value(v: &Value, out: &mut String) {
    match v {
        Value::String(s) | Value::DateTime(s) => write_str(s, out),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::I4(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) => {
            if f.is_finite() {
                let s = f.to_string();
                out.push_str(&s);
            } else {
                out.push_str("null");
            }
        }
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Nil => out.push_str("null"),
        Value::Array(items) => {
            out.push('[');
            for (n, i) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                write_value(i, out);
            }
            out.push(']');
        }
        Value::Struct(members) => {
            out.push('{');
            for (n, (k, v)) in members.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                write_str(k, out);
                out.push(':');
                write_value(v, out);
            }
            out.push('}');
        }
    }
}

fn id_text(id: &Json) -> String {
    id.to_string()
}

/// A success reply: v1 carries `"error": null`, v2 has no `error` key.
pub fn success(v: &Value, id: &Json, v2: bool) -> String {
    success_with(id, v2, 128, |out| write_value(v, out))
}

/// A success reply whose result is written by `result` straight into the
/// output (large replies are encoded without building a [`Value`] first).
pub fn success_with(
    id: &Json,
    v2: bool,
    capacity: usize,
    result: impl FnOnce(&mut String),
) -> String {
    let (head, tail) = success_envelope(id, v2);
    let mut out = String::with_capacity(capacity);
    out.push_str(head);
    result(&mut out);
    out.push_str(&tail);
    out
}

/// What goes before and after the result of a success reply, for replies
/// streamed in pieces.
pub fn success_envelope(id: &Json, v2: bool) -> (&'static str, String) {
    let head = if v2 {
        "{\"jsonrpc\":\"2.0\",\"result\":"
    } else {
        "{\"result\":"
    };
    let error = if v2 { "" } else { ",\"error\":null" };
    (head, format!("{error},\"id\":{}}}", id_text(id)))
}

/// A failure reply: v1 `error` is the description array; v2 is
/// `{code: 1, message: CODE, data: [params]}` and has no `result` key.
pub fn failure(e: &ApiError, id: &Json, v2: bool) -> String {
    let mut out = String::with_capacity(128);
    if v2 {
        out.push_str("{\"jsonrpc\":\"2.0\",\"error\":{\"code\":1,\"message\":");
        write_str(&e.code, &mut out);
        out.push_str(",\"data\":");
        write_value(&Value::string_set(e.params.iter().cloned()), &mut out);
        out.push('}');
    } else {
        out.push_str("{\"result\":null,\"error\":");
        write_value(&Value::string_set(e.description()), &mut out);
    }
    out.push_str(",\"id\":");
    out.push_str(&id_text(id));
    out.push('}');
    out
}
