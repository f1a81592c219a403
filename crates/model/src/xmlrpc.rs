//! XML-RPC as XenAPI speaks it: untyped `<value>` strings, ints sent as
//! strings, the `Status`/`Value`/`ErrorDescription` envelope, no `<fault>`.
//!
//! The parser is a small recursive-descent reader over the XML-RPC subset
//! (elements, text, entities, CDATA, comments, an optional prolog). It never
//! panics on any input and bounds nesting depth.

use crate::date;
use crate::error::ApiError;
use crate::value::{Value, format_float};
use std::fmt::Write as _;

const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "XML-RPC parse error: {}", self.0)
    }
}
impl std::error::Error for ParseError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

/// A parsed `<methodCall>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: String,
    pub params: Vec<Value>,
}

/// A parsed `<methodResponse>` in XenAPI's envelope.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Success(Value),
    Failure(Vec<String>),
    /// A response without the envelope (`system.listMethods`).
    Bare(Value),
}

struct Reader<'a> {
    s: &'a str,
    pos: usize,
}

enum Tag<'a> {
    Open { name: &'a str, empty: bool },
    Close(&'a str),
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    /// Skips whitespace, comments, processing instructions.
    fn skip_misc(&mut self) -> Result<(), ParseError> {
        loop {
            let r = self.rest();
            let t = r.trim_start();
            self.pos += r.len() - t.len();
            if t.starts_with("<?") {
                match t.find("?>") {
                    Some(i) => self.pos += i + 2,
                    None => return err("unterminated processing instruction"),
                }
            } else if t.starts_with("<!--") {
                match t[4..].find("-->") {
                    Some(i) => self.pos += i + 7,
                    None => return err("unterminated comment"),
                }
            } else if t.starts_with("<!DOCTYPE") || t.starts_with("<!ENTITY") {
                return err("DTDs are not accepted");
            } else {
                return Ok(());
            }
        }
    }

    fn tag(&mut self) -> Result<Tag<'a>, ParseError> {
        self.skip_misc()?;
        let r = self.rest();
        if !r.starts_with('<') || r.starts_with("<![CDATA[") {
            return err(format!("expected a tag at byte {}", self.pos));
        }
        let end = match r.find('>') {
            Some(e) => e,
            None => return err("unterminated tag"),
        };
        let inner = &r[1..end];
        self.pos += end + 1;
        if let Some(name) = inner.strip_prefix('/') {
            return Ok(Tag::Close(name.trim()));
        }
        let (inner, empty) = match inner.strip_suffix('/') {
            Some(i) => (i, true),
            None => (inner, false),
        };
        let name = inner
            .split(|c: char| c.is_ascii_whitespace())
            .next()
            .unwrap_or("");
        if name.is_empty() {
            return err("empty tag name");
        }
        Ok(Tag::Open { name, empty })
    }

    fn peek_tag(&mut self) -> Result<Option<Tag<'a>>, ParseError> {
        let save = self.pos;
        self.skip_misc()?;
        let r = self.rest();
        if !r.starts_with('<') || r.starts_with("<![CDATA[") {
            self.pos = save;
            return Ok(None);
        }
        let t = self.tag()?;
        self.pos = save;
        Ok(Some(t))
    }

    fn open(&mut self, want: &str) -> Result<bool, ParseError> {
        match self.tag()? {
            Tag::Open { name, empty } if name == want => Ok(empty),
            Tag::Open { name, .. } => err(format!("expected <{want}>, found <{name}>")),
            Tag::Close(name) => err(format!("expected <{want}>, found </{name}>")),
        }
    }

    fn close(&mut self, want: &str) -> Result<(), ParseError> {
        match self.tag()? {
            Tag::Close(name) if name == want => Ok(()),
            Tag::Close(name) => err(format!("expected </{want}>, found </{name}>")),
            Tag::Open { name, .. } => err(format!("expected </{want}>, found <{name}>")),
        }
    }

    /// Text up to the next tag, with entities and CDATA decoded.
    fn text(&mut self) -> Result<String, ParseError> {
        let mut out = String::new();
        loop {
            let r = self.rest();
            if let Some(body) = r.strip_prefix("<![CDATA[") {
                match body.find("]]>") {
                    Some(i) => {
                        out.push_str(&body[..i]);
                        self.pos += 9 + i + 3;
                        continue;
                    }
                    None => return err("unterminated CDATA"),
                }
            }
            if r.starts_with("<!--") {
                match r[4..].find("-->") {
                    Some(i) => {
                        self.pos += i + 7;
                        continue;
                    }
                    None => return err("unterminated comment"),
                }
            }
            let stop = r.find('<').unwrap_or(r.len());
            if stop == r.len() {
                return err("unexpected end of document");
            }
            decode_entities(&r[..stop], &mut out)?;
            self.pos += stop;
            if !self.rest().starts_with("<![CDATA[") && !self.rest().starts_with("<!--") {
                return Ok(out);
            }
        }
    }

    fn element_text(&mut self, name: &str) -> Result<String, ParseError> {
        if self.open(name)? {
            return Ok(String::new());
        }
        let t = self.text()?;
        self.close(name)?;
        Ok(t)
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > MAX_DEPTH {
            return err("values nested too deeply");
        }
        if self.open("value")? {
            return Ok(Value::String(String::new()));
        }
        let text = self.text()?;
        let v = match self.peek_tag()? {
            Some(Tag::Close(_)) => {
                self.close("value")?;
                return Ok(Value::String(text));
            }
            Some(Tag::Open { name, empty }) => {
                if !text.trim().is_empty() {
                    return err("text mixed with a typed value");
                }
                match name {
                    "string" => Value::String(self.element_text("string")?),
                    "int" | "i4" | "i8" => {
                        let t = self.element_text(name)?;
                        match t.trim().parse::<i64>() {
                            Ok(i) => Value::Int(i),
                            Err(_) => return err(format!("bad integer {t:?}")),
                        }
                    }
                    "boolean" => Value::Bool(self.element_text("boolean")?.trim() == "1"),
                    "double" => {
                        let t = self.element_text("double")?;
                        match t.trim().parse::<f64>() {
                            Ok(f) => Value::Float(f),
                            Err(_) => return err(format!("bad double {t:?}")),
                        }
                    }
                    "dateTime.iso8601" => {
                        let t = self.element_text(name)?;
                        match date::parse(&t) {
                            Some(secs) => Value::DateTime(date::format(secs)),
                            None => return err(format!("bad date {t:?}")),
                        }
                    }
                    "base64" => Value::String(self.element_text("base64")?),
                    "nil" => {
                        if !self.open("nil")? {
                            self.close("nil")?;
                        }
                        Value::Nil
                    }
                    "array" => {
                        let mut items = Vec::new();
                        if !self.open("array")? {
                            if !self.open("data")? {
                                while let Some(Tag::Open { name: "value", .. }) = self.peek_tag()? {
                                    items.push(self.value(depth + 1)?);
                                }
                                self.close("data")?;
                            }
                            self.close("array")?;
                        }
                        Value::Array(items)
                    }
                    "struct" => {
                        let mut members = Vec::new();
                        if !empty {
                            self.open("struct")?;
                            while let Some(Tag::Open { name: "member", .. }) = self.peek_tag()? {
                                self.open("member")?;
                                let key = self.element_text("name")?;
                                let v = self.value(depth + 1)?;
                                self.close("member")?;
                                members.push((key, v));
                            }
                            self.close("struct")?;
                        } else {
                            self.open("struct")?;
                        }
                        Value::Struct(members)
                    }
                    other => return err(format!("unknown value type <{other}>")),
                }
            }
            None => return err("unexpected end of value"),
        };
        self.text()?;
        self.close("value")?;
        Ok(v)
    }

    fn end(&mut self) -> Result<(), ParseError> {
        self.skip_misc()?;
        if self.pos != self.s.len() {
            return err("trailing content after the document");
        }
        Ok(())
    }
}

fn decode_entities(s: &str, out: &mut String) -> Result<(), ParseError> {
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        let semi = match rest.find(';') {
            Some(j) if j <= 10 => j,
            _ => return err("bad entity"),
        };
        let ent = &rest[..semi];
        let c = match ent {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code =
                    if let Some(h) = ent.strip_prefix("#x").or_else(|| ent.strip_prefix("#X")) {
                        u32::from_str_radix(h, 16).ok()
                    } else if let Some(d) = ent.strip_prefix('#') {
                        d.parse::<u32>().ok()
                    } else {
                        None
                    };
                match code.and_then(char::from_u32) {
                    Some(c) => c,
                    None => return err(format!("unknown entity &{ent};")),
                }
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Ok(())
}

fn reader(body: &[u8]) -> Result<Reader<'_>, ParseError> {
    match std::str::from_utf8(body) {
        Ok(s) => Ok(Reader { s, pos: 0 }),
        Err(_) => err("body is not valid UTF-8"),
    }
}

/// Parses a `<methodCall>`.
pub fn parse_call(body: &[u8]) -> Result<Call, ParseError> {
    let mut r = reader(body)?;
    r.open("methodCall")?;
    let method = r.element_text("methodName")?.trim().to_owned();
    let mut params = Vec::new();
    match r.peek_tag()? {
        Some(Tag::Open {
            name: "params",
            empty,
        }) => {
            r.open("params")?;
            if !empty {
                while let Some(Tag::Open { name: "param", .. }) = r.peek_tag()? {
                    r.open("param")?;
                    params.push(r.value(0)?);
                    r.close("param")?;
                }
                r.close("params")?;
            }
        }
        Some(Tag::Close("methodCall")) => {}
        _ => return err("expected <params>"),
    }
    r.close("methodCall")?;
    r.end()?;
    if method.is_empty() {
        return err("empty method name");
    }
    Ok(Call { method, params })
}

/// Parses a `<methodResponse>`, recognising XenAPI's envelope.
pub fn parse_response(body: &[u8]) -> Result<Response, ParseError> {
    let mut r = reader(body)?;
    r.open("methodResponse")?;
    r.open("params")?;
    r.open("param")?;
    let v = r.value(0)?;
    r.close("param")?;
    r.close("params")?;
    r.close("methodResponse")?;
    r.end()?;
    Ok(envelope(v))
}

/// Parses a lone `<value>` fragment (a task's `result`).
pub fn parse_value(body: &str) -> Result<Value, ParseError> {
    let mut r = Reader { s: body, pos: 0 };
    let v = r.value(0)?;
    r.end()?;
    Ok(v)
}

fn envelope(v: Value) -> Response {
    match v.member("Status").and_then(Value::as_str) {
        Some("Success") => Response::Success(
            v.member("Value")
                .cloned()
                .unwrap_or(Value::String(String::new())),
        ),
        Some(_) => Response::Failure(
            v.member("ErrorDescription")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            x.as_str()
                                .map(str::to_owned)
                                .unwrap_or_else(|| x.db_string())
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        None => Response::Bare(v),
    }
}

/// Appends `s` escaped for XML text; drops control characters XML cannot carry.
pub fn escape_into(s: &str, out: &mut String) {
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let rep = match b {
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'&' => "&amp;",
            b'"' => "&quot;",
            b'\t' | b'\n' | b'\r' => continue,
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        out.push_str(rep);
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// Appends the `<value>` for `v`.
pub fn write_value(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str("<value>");
            escape_into(s, out);
            out.push_str("</value>");
        }
        Value::Int(i) => {
            let _ = write!(out, "<value>{i}</value>");
        }
        Value::I4(i) => {
            let _ = write!(out, "<value><i4>{i}</i4></value>");
        }
        Value::Float(f) => {
            out.push_str("<value><double>");
            out.push_str(&format_float(*f));
            out.push_str("</double></value>");
        }
        Value::Bool(b) => out.push_str(if *b {
            "<value><boolean>1</boolean></value>"
        } else {
            "<value><boolean>0</boolean></value>"
        }),
        Value::DateTime(d) => {
            out.push_str("<value><dateTime.iso8601>");
            escape_into(d, out);
            out.push_str("</dateTime.iso8601></value>");
        }
        Value::Array(items) => {
            out.push_str("<value><array><data>");
            for i in items {
                write_value(i, out);
            }
            out.push_str("</data></array></value>");
        }
        Value::Struct(members) => {
            out.push_str("<value><struct>");
            for (k, v) in members {
                out.push_str("<member><name>");
                escape_into(k, out);
                out.push_str("</name>");
                write_value(v, out);
                out.push_str("</member>");
            }
            out.push_str("</struct></value>");
        }
        Value::Nil => out.push_str("<value><nil/></value>"),
    }
}

/// The `<value>` text for `v` (what a task's `result` holds).
pub fn value_to_string(v: &Value) -> String {
    let mut s = String::new();
    write_value(v, &mut s);
    s
}

const HEAD: &str = "<?xml version=\"1.0\"?><methodResponse><params><param>";
const TAIL: &str = "</param></params></methodResponse>";

/// A success response in XenAPI's envelope.
pub fn success(v: &Value) -> String {
    success_with(256, |out| write_value(v, out))
}

/// A success response whose `<value>` is written by `value` straight into the
/// output (large replies are encoded without building a [`Value`] first).
pub fn success_with(capacity: usize, value: impl FnOnce(&mut String)) -> String {
    let (head, tail) = success_envelope();
    let mut out = String::with_capacity(capacity);
    out.push_str(head);
    value(&mut out);
    out.push_str(tail);
    out
}

/// What goes before and after the `<value>` of a success response, for
/// replies streamed in pieces.
pub fn success_envelope() -> (&'static str, &'static str) {
    const BEFORE: &str = concat!(
        "<?xml version=\"1.0\"?><methodResponse><params><param>",
        "<value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name>"
    );
    const AFTER: &str = "</member></struct></value></param></params></methodResponse>";
    debug_assert!(BEFORE.starts_with(HEAD) && AFTER.ends_with(TAIL));
    (BEFORE, AFTER)
}

/// A failure response in XenAPI's envelope.
pub fn failure(e: &ApiError) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(HEAD);
    out.push_str("<value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name>");
    write_value(&Value::string_set(e.description()), &mut out);
    out.push_str("</member></struct></value>");
    out.push_str(TAIL);
    out
}

/// A response without the envelope (`system.listMethods`).
pub fn bare(v: &Value) -> String {
    let mut out = String::from(HEAD);
    write_value(v, &mut out);
    out.push_str(TAIL);
    out
}

/// A `<methodCall>` (used by tests and the benchmark client).
pub fn call(method: &str, params: &[Value]) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodCall><methodName>");
    escape_into(method, &mut out);
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        write_value(p, &mut out);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out
}
